//! The agent's state directory: where it is, and how files are written in it.
//!
//! The state directory holds the agent's credential (a secret), its settings,
//! the results it has not delivered yet and, by default, the jobs' work
//! directories. It is created private (0700), and every file the agent keeps
//! there is written atomically (temporary file, fsync, rename, fsync of the
//! directory) so that a crash or a full disk never leaves half a credential or
//! half a result behind.

use std::ffi::OsString;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

/// The environment variable naming the state directory.
pub(crate) const STATE_DIR_ENV: &str = "TRUNKFARM_AGENT_STATE_DIR";

/// The state directory's name under `$XDG_STATE_HOME` or `~/.local/state`.
const APP_DIR: &str = "trunkfarm-agent";

/// Where the state directory is, in order of precedence: the command line,
/// `$TRUNKFARM_AGENT_STATE_DIR`, `$XDG_STATE_HOME/trunkfarm-agent`, then
/// `$HOME/.local/state/trunkfarm-agent`. `env` looks a variable up (empty
/// counts as unset), so tests need not touch the process environment.
///
/// The result is absolute, so the directory printed in messages works from
/// any working directory. `Err` says what to set when nothing is.
pub(crate) fn resolve_state_dir(
    cli: Option<&Path>,
    env: impl Fn(&str) -> Option<OsString>,
) -> Result<PathBuf, String> {
    let var = |name: &str| env(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    let dir = if let Some(dir) = cli {
        dir.to_path_buf()
    } else if let Some(dir) = var(STATE_DIR_ENV) {
        dir
    } else if let Some(xdg) = var("XDG_STATE_HOME").filter(|p| p.is_absolute()) {
        // The XDG spec says a relative value is invalid and must be ignored.
        xdg.join(APP_DIR)
    } else if let Some(home) = var("HOME") {
        home.join(".local").join("state").join(APP_DIR)
    } else {
        return Err(format!(
            "cannot tell where the agent's state directory is: HOME is not set; pass \
             --state-dir or set {STATE_DIR_ENV}"
        ));
    };
    if dir.as_os_str().is_empty() {
        return Err("the state directory must not be empty".to_owned());
    }
    std::path::absolute(&dir)
        .map_err(|e| format!("cannot resolve the state directory {}: {e}", dir.display()))
}

/// Creates `dir` (and its missing parents) with mode 0700: the directory
/// holds the agent's secret. An existing directory is left as it is.
pub(crate) fn create_private_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Writes `contents` to `path` atomically with the given mode: a reader (or
/// the agent after a crash) sees either the old file or the whole new one,
/// never a mix, and the file never exists with a wider mode than `mode`.
pub(crate) fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Unique per process and call, so two writers never share a temp file.
    let tmp = dir.join(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        fastrand::u64(..)
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)?;
        // Make the rename itself durable; not every filesystem supports
        // syncing a directory, and the data is already safe, so ignore errors.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// True for the temporary files [`write_atomic`] leaves behind when the agent
/// dies mid-write; directory scans skip (and may delete) them.
pub(crate) fn is_temp_file(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(".tmp")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn state_dir_precedence() {
        let all = [
            (STATE_DIR_ENV, "/srv/agent"),
            ("XDG_STATE_HOME", "/xdg"),
            ("HOME", "/home/u"),
        ];
        assert_eq!(
            resolve_state_dir(Some(Path::new("/cli")), env(&all)).unwrap(),
            Path::new("/cli")
        );
        assert_eq!(
            resolve_state_dir(None, env(&all)).unwrap(),
            Path::new("/srv/agent")
        );
        assert_eq!(
            resolve_state_dir(None, env(&all[1..])).unwrap(),
            Path::new("/xdg/trunkfarm-agent")
        );
        assert_eq!(
            resolve_state_dir(None, env(&all[2..])).unwrap(),
            Path::new("/home/u/.local/state/trunkfarm-agent")
        );
    }

    #[test]
    fn empty_and_relative_xdg_are_ignored() {
        let vars = [
            (STATE_DIR_ENV, ""),
            ("XDG_STATE_HOME", "relative/state"),
            ("HOME", "/home/u"),
        ];
        assert_eq!(
            resolve_state_dir(None, env(&vars)).unwrap(),
            Path::new("/home/u/.local/state/trunkfarm-agent")
        );
    }

    #[test]
    fn no_home_is_an_error_saying_what_to_set() {
        let e = resolve_state_dir(None, env(&[])).unwrap_err();
        assert!(e.contains("--state-dir"), "{e}");
        assert!(e.contains(STATE_DIR_ENV), "{e}");
    }

    #[test]
    fn relative_cli_dir_is_made_absolute() {
        let dir = resolve_state_dir(Some(Path::new("rel/state")), env(&[])).unwrap();
        assert!(dir.is_absolute());
        assert!(dir.ends_with("rel/state"));
    }

    #[test]
    fn private_dir_and_atomic_write() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        create_private_dir(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        // Existing: fine.
        create_private_dir(&dir).unwrap();

        let file = dir.join("f.json");
        write_atomic(&file, b"one", 0o600).unwrap();
        write_atomic(&file, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"two");
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // No temp file is left behind.
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["f.json"]);
    }

    #[test]
    fn failed_write_leaves_no_temp_file() {
        let tmp = tempfile::tempdir().unwrap();
        // The target is a non-empty directory: the rename fails.
        let target = tmp.path().join("d");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("x"), b"x").unwrap();
        assert!(write_atomic(&target, b"data", 0o600).is_err());
        let names: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["d"]);
        assert!(is_temp_file(".f.json.1.2.tmp"));
        assert!(!is_temp_file("1-2.json"));
    }
}
