//! Secrets: how they are made, stored (hashed) and compared (constant time).
//!
//! Every secret trunkfarm issues is 256 random bits, so a plain SHA-256 is
//! enough to store it (no password-stretching needed: there is nothing to
//! guess). Secrets never reach a log: types that hold one redact it in `Debug`.

use std::io::Write;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// A new random secret, URL-safe (43 characters).
pub(crate) fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A new short random id with a prefix, e.g. `ag_3f9a0c17d2e4`.
pub(crate) fn new_id(prefix: &str) -> String {
    let mut bytes = [0u8; 6];
    rand::rng().fill_bytes(&mut bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}_{hex}")
}

/// The stored form of a secret: hex SHA-256.
pub(crate) fn hash(secret: &str) -> String {
    Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether `secret` matches `stored_hash`, in time independent of where they differ.
pub(crate) fn verify(secret: &str, stored_hash: &str) -> bool {
    hash(secret).as_bytes().ct_eq(stored_hash.as_bytes()).into()
}

/// Splits a presented credential `<id>.<secret>`.
pub(crate) fn split_credential(presented: &str) -> Option<(&str, &str)> {
    let (id, secret) = presented.trim().split_once('.')?;
    (!id.is_empty() && !secret.is_empty()).then_some((id, secret))
}

/// Makes `dir` (and its missing parents) a directory only its owner may
/// enter: created with mode 0700, or, if it exists with group or other
/// permissions (an older hub, a directory made by hand), closed to 0700.
/// Returns the mode it had when that was wider, for the caller to warn
/// about under its own config key.
pub(crate) fn private_dir(dir: &Path) -> std::io::Result<Option<u32>> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o7777;
    if mode & 0o077 == 0 {
        return Ok(None);
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    Ok(Some(mode))
}

/// Writes `contents` to `path` with mode 0600, atomically, so a crash never
/// leaves a half-written secret file.
pub(crate) fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    write_atomic(path, contents, 0o600)
}

/// Writes a file atomically with `mode`: a temp file beside it (whose mode is
/// set explicitly, since a leftover from a crash keeps its old one), synced,
/// renamed over `path`, then the directory synced so the rename lasts. On
/// failure the temp file is removed and the error names the file.
pub(crate) fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let context = |what: &str, p: &Path| {
        let p = p.display().to_string();
        let what = what.to_string();
        move |e: std::io::Error| std::io::Error::new(e.kind(), format!("cannot {what} {p}: {e}"))
    };
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(context("create", &tmp))?;
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(context("set permissions of", &tmp))?;
        file.write_all(contents).map_err(context("write", &tmp))?;
        file.sync_all().map_err(context("sync", &tmp))?;
        drop(file);
        std::fs::rename(&tmp, path).map_err(context("replace", path))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return result;
    }
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Reads the admin token from `path`, creating it (0600) on first start.
pub(crate) fn load_or_create_admin_token(path: &Path) -> std::io::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(token) if !token.trim().is_empty() => Ok(token.trim().to_string()),
        Ok(_) => Err(std::io::Error::other(format!(
            "admin token file {} is empty: delete it to have the hub create a new one",
            path.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let token = new_secret();
            write_private(path, format!("{token}\n").as_bytes())?;
            Ok(token)
        }
        Err(e) => Err(std::io::Error::new(
            e.kind(),
            format!("cannot read admin token file {}: {e}", path.display()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_verify_only_against_their_hash() {
        let s = new_secret();
        assert_eq!(s.len(), 43);
        let h = hash(&s);
        assert!(verify(&s, &h));
        assert!(!verify(&new_secret(), &h));
        assert!(!verify("", &h));
    }

    #[test]
    fn credentials_split() {
        assert_eq!(split_credential("ag_1.xyz"), Some(("ag_1", "xyz")));
        assert_eq!(split_credential("ag_1."), None);
        assert_eq!(split_credential("nodot"), None);
    }

    #[test]
    fn a_private_dir_is_created_closed_and_an_open_one_is_closed() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let fresh = tmp.path().join("a/b");
        assert_eq!(private_dir(&fresh).unwrap(), None);
        let mode = std::fs::metadata(&fresh).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(private_dir(&open).unwrap(), Some(0o755));
        let mode = std::fs::metadata(&open).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        assert_eq!(private_dir(&open).unwrap(), None);
    }

    #[test]
    fn a_leftover_temp_file_does_not_leak_its_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let tmp = dir.path().join(format!(".s.tmp-{}", std::process::id()));
        std::fs::write(&tmp, "old").unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&p, b"x").unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn private_files_are_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        write_private(&p, b"x").unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
