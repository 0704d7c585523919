//! File-system helpers shared by the executor, the artifact cache and the
//! archive code: removing whole trees (including the read-only directories
//! build tools leave behind) and making a rename durable; the agent's
//! private umask and the one its jobs run with.

use std::fs::File;
use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

/// The umask of a job's processes (its checkout and its commands): the
/// usual 022 whatever umask the agent was started with (a donor's, systemd's
/// `UMask=`, a hub's 077 for its pool agents), so that a build installs, and
/// its runtime packs, the same file modes on every agent.
pub(crate) const JOB_UMASK: libc::mode_t = 0o022;

/// Gives the agent the umask 077: its state, results, logs, cache and
/// jobs' directories are its user's alone. Jobs' processes get
/// [`JOB_UMASK`] instead.
pub(crate) fn private_umask() {
    // SAFETY: umask(2) only swaps the process's file mode mask; it cannot fail.
    unsafe { libc::umask(0o077) };
}

/// [`remove_tree`] on the blocking pool (a big tree takes a while).
pub(crate) async fn remove_tree_async(path: PathBuf) -> io::Result<()> {
    tokio::task::spawn_blocking(move || remove_tree(&path))
        .await
        .map_err(io::Error::other)?
}

/// Removes `path` whatever it is (directory tree, file, symlink; absent is
/// fine), never following a symlink. Build tools leave read-only directories
/// behind (Go's module cache), which `remove_dir_all` cannot empty, so on
/// failure the tree is made writable and removal is tried once more.
pub(crate) fn remove_tree(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.is_dir() {
        return std::fs::remove_file(path);
    }
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(first) => {
            make_writable(path);
            match std::fs::remove_dir_all(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(_) => Err(first),
            }
        }
    }
}

/// Gives the owner full access to every directory under `root` (not following
/// symlinks), best effort.
fn make_writable(root: &Path) {
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if let Ok(meta) = std::fs::symlink_metadata(&dir) {
            let mut perms = meta.permissions();
            perms.set_mode(perms.mode() | 0o700);
            let _ = std::fs::set_permissions(&dir, perms);
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(entry.path());
            }
        }
    }
}

/// Makes the entries of `dir` (a rename into it) durable. Not every file
/// system can sync a directory, and the data itself is already synced, so
/// errors are ignored.
pub(crate) fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_read_only_trees_files_and_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path().join("t");
        std::fs::create_dir_all(tree.join("ro/sub")).unwrap();
        std::fs::write(tree.join("ro/sub/f"), "x").unwrap();
        for d in ["ro/sub", "ro"] {
            std::fs::set_permissions(tree.join(d), std::fs::Permissions::from_mode(0o555)).unwrap();
        }
        remove_tree(&tree).unwrap();
        assert!(!tree.exists());
        remove_tree(&tree).unwrap();
        let file = tmp.path().join("f");
        std::fs::write(&file, "x").unwrap();
        remove_tree(&file).unwrap();
        assert!(!file.exists());
    }

    #[test]
    fn a_symlink_is_removed_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("target");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("keep"), "x").unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        remove_tree(&link).unwrap();
        assert!(!link.exists());
        assert!(target.join("keep").exists());
    }
}
