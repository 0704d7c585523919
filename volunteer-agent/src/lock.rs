//! One agent per state directory: `agent.lock`, held with an OS advisory
//! lock (`flock`) for the process's life.
//!
//! Two agents on one state directory would share one credential, and the hub
//! would close each one's session whenever the other connected. The kernel
//! releases a `flock` when its holder exits however it exits (a `kill -9`
//! too), so a lock is never stale; the file's contents (pid, since when)
//! only name the holder in the refusal. `run`, `enroll` and `unenroll` take
//! it; `status`, `pause` and `resume` talk to its holder instead.

use std::fs::{File, OpenOptions};
use std::io::{self, Read as _, Seek as _, Write as _};
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The lock file's name in the state directory.
pub(crate) const LOCK_FILE: &str = "agent.lock";

/// Who holds the lock, as written in the lock file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Holder {
    pub pid: u32,
    /// Unix ms it took the lock.
    pub since_ms: u64,
    /// What it does: "run", "enroll" or "unenroll".
    pub command: String,
}

impl Holder {
    /// "trunkfarm-agent run (pid 1234, since 2026-05-01 14:00:00 UTC)".
    pub fn describe(&self) -> String {
        format!(
            "trunkfarm-agent {} (pid {}, since {})",
            self.command,
            self.pid,
            utc(self.since_ms)
        )
    }
}

/// A Unix ms time as people read it, in UTC: "2026-05-01 14:00:00 UTC".
pub(crate) fn utc(ms: u64) -> String {
    let stamp = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms));
    format!(
        "{} UTC",
        stamp.to_string().trim_end_matches('Z').replace('T', " ")
    )
}

/// Now, in Unix ms.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LockError {
    /// Another process holds it.
    #[error(
        "another agent uses the state directory {}: {}; stop it first (or talk to it: \
         `trunkfarm-agent status`)",
        .dir.display(),
        held_by(.holder)
    )]
    Held {
        dir: PathBuf,
        holder: Option<Holder>,
    },
    /// The file could not be opened or locked.
    #[error("cannot lock {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Who holds the lock, in words.
fn held_by(holder: &Option<Holder>) -> String {
    holder.as_ref().map_or_else(
        || "a trunkfarm-agent (it has not said which yet)".to_owned(),
        Holder::describe,
    )
}

/// The held lock; dropping it (or exiting) releases it.
#[derive(Debug)]
pub(crate) struct StateLock {
    _file: File,
}

/// Takes the state directory's lock for `command`, or says who holds it.
/// The directory must exist.
pub(crate) fn acquire(dir: &Path, command: &str) -> Result<StateLock, LockError> {
    let path = dir.join(LOCK_FILE);
    let io_err = |source| LockError::Io {
        path: path.clone(),
        source,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io_err)?;
    // SAFETY: flock(2) on a descriptor this function owns; no memory involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(LockError::Held {
                dir: dir.to_path_buf(),
                holder: read_holder(&mut file),
            });
        }
        return Err(io_err(e));
    }
    let holder = Holder {
        pid: std::process::id(),
        since_ms: now_ms(),
        command: command.to_owned(),
    };
    let text = serde_json::to_string(&holder).map_err(|e| io_err(io::Error::other(e)))?;
    file.set_len(0).map_err(io_err)?;
    file.rewind().map_err(io_err)?;
    file.write_all(text.as_bytes()).map_err(io_err)?;
    Ok(StateLock { _file: file })
}

/// Who holds the lock, if the file says (a holder that just took it may
/// not have written it yet).
fn read_holder(file: &mut File) -> Option<Holder> {
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    serde_json::from_str(&text).ok()
}

/// Whether an agent holds the state directory's lock now, and who (for
/// `status` when no agent answers on the control socket).
pub(crate) fn holder(dir: &Path) -> Option<Holder> {
    match acquire(dir, "status") {
        Err(LockError::Held { holder, .. }) => holder,
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_name_until_it_lets_go() {
        let tmp = tempfile::tempdir().unwrap();
        let first = acquire(tmp.path(), "run").unwrap();
        // flock locks belong to the open file description: a second open
        // in the same process conflicts just as another process would.
        let e = acquire(tmp.path(), "run").unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        assert!(text.contains("trunkfarm-agent run"), "{text}");
        assert!(text.contains(" UTC"), "{text}");
        match e {
            LockError::Held { holder, .. } => assert_eq!(holder.unwrap().command, "run"),
            other => panic!("{other}"),
        }
        drop(first);
        // Released: no stale lock.
        let again = acquire(tmp.path(), "unenroll").unwrap();
        drop(again);
        assert!(holder(tmp.path()).is_none());
    }

    #[test]
    fn utc_is_readable() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
    }
}
