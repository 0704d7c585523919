//! Room on the hub's data dir: new work is refused *before* the disk is
//! full or while it is read-only, so what the hub already holds (queued and
//! running jobs, results, mails) can still be written, and nothing is lost.
//!
//! The embedded database cannot be trusted to fail gracefully: once one of
//! sled's writes fails (ENOSPC, EROFS) it refuses every later operation
//! until it is opened again. So the hub keeps a reserve
//! (`hub.min_free_space`), checked with `statvfs` on every request for new
//! work (cheap: one system call), and if the database failed anyway, `serve`
//! restarts the process once the data dir takes writes again (see
//! [`DataDir::writable_now`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Why new work is refused. The message says what is wrong and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SpaceError {
    /// Free space is below the reserve.
    #[error(
        "the hub's data dir {dir} has {free} free, below hub.min_free_space ({min}): it takes no new {what} until space is freed there (or the reserve lowered); nothing it holds is lost, and running jobs still report"
    )]
    Low {
        /// The data dir.
        dir: String,
        /// Free bytes, human.
        free: String,
        /// The reserve, human.
        min: String,
        /// What was refused ("jobs", "artifacts", ...).
        what: &'static str,
    },
    /// The file system is mounted read-only.
    #[error(
        "the hub's data dir {dir} is on a read-only file system: it takes no new {what} until it is writable again; nothing it holds is lost"
    )]
    ReadOnly {
        /// The data dir.
        dir: String,
        /// What was refused.
        what: &'static str,
    },
    /// `statvfs` itself failed.
    #[error("cannot check the free space of the hub's data dir {dir}: {reason}")]
    Unknown {
        /// The data dir.
        dir: String,
        /// The OS error.
        reason: String,
    },
}

/// What `statvfs` says about a directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Room {
    /// Bytes an unprivileged writer may still use.
    pub(crate) free: u64,
    /// Mounted read-only.
    pub(crate) read_only: bool,
}

/// `statvfs(dir)`.
pub(crate) fn room(dir: &Path) -> std::io::Result<Room> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: a valid NUL-terminated path and a buffer of the right type;
    // the struct is read only after the call reports success.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled the struct.
    let st = unsafe { st.assume_init() };
    Ok(Room {
        free: st.f_bavail.saturating_mul(st.f_frsize),
        read_only: st.f_flag & libc::ST_RDONLY != 0,
    })
}

/// The hub's data dir and its reserve. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct DataDir {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    min_free: u64,
    /// Whether the last check refused (so a change is logged once).
    refusing: AtomicBool,
}

fn human(bytes: u64) -> String {
    bytesize::ByteSize::b(bytes).to_string()
}

impl DataDir {
    /// Watches `dir`, keeping `min_free` bytes in reserve.
    pub(crate) fn new(dir: &Path, min_free: u64) -> DataDir {
        DataDir {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                min_free,
                refusing: AtomicBool::new(false),
            }),
        }
    }

    /// Whether new work of `size` bytes (0 when small) may be taken: refused
    /// when the reserve would be cut into or the dir is read-only. Logs when
    /// the answer changes.
    pub(crate) fn admit(&self, what: &'static str, size: u64) -> Result<(), SpaceError> {
        let dir = self.inner.dir.display().to_string();
        let verdict = match room(&self.inner.dir) {
            Err(e) => Err(SpaceError::Unknown {
                dir,
                reason: e.to_string(),
            }),
            Ok(r) if r.read_only => Err(SpaceError::ReadOnly { dir, what }),
            Ok(r) if r.free < self.inner.min_free.saturating_add(size) => Err(SpaceError::Low {
                dir,
                free: human(r.free),
                min: human(self.inner.min_free),
                what,
            }),
            Ok(_) => Ok(()),
        };
        let refusing = verdict.is_err();
        if self.inner.refusing.swap(refusing, Ordering::Relaxed) != refusing {
            match &verdict {
                Err(e) => tracing::error!("{e}"),
                Ok(()) => tracing::warn!(
                    "the hub's data dir {} has room again: taking new work",
                    self.inner.dir.display()
                ),
            }
        }
        verdict
    }

    /// Whether the dir takes writes now: room above the reserve, not
    /// read-only, and a probe file written, synced and removed.
    pub(crate) fn writable_now(&self) -> bool {
        if self.admit("work", 0).is_err() {
            return false;
        }
        let probe = self.inner.dir.join(".write-probe");
        let ok = (|| -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&probe)?;
            f.write_all(b"trunkfarm")?;
            f.sync_all()
        })()
        .is_ok();
        let _ = std::fs::remove_file(&probe);
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_reads_the_file_system() {
        let dir = tempfile::tempdir().unwrap();
        let r = room(dir.path()).unwrap();
        assert!(!r.read_only);
        assert!(r.free > 0);
        assert!(room(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn a_reserve_larger_than_the_disk_refuses_with_advice() {
        let dir = tempfile::tempdir().unwrap();
        let d = DataDir::new(dir.path(), u64::MAX / 2);
        let e = d.admit("jobs", 0).unwrap_err().to_string();
        assert!(e.contains("below hub.min_free_space"), "{e}");
        assert!(e.contains("takes no new jobs"), "{e}");
        assert!(!d.writable_now());
        let d = DataDir::new(dir.path(), 0);
        d.admit("jobs", 0).unwrap();
        assert!(d.writable_now());
        // The probe leaves nothing behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn the_size_of_the_work_counts_against_the_reserve() {
        let dir = tempfile::tempdir().unwrap();
        let free = room(dir.path()).unwrap().free;
        let d = DataDir::new(dir.path(), 0);
        d.admit("artifacts", 0).unwrap();
        assert!(d.admit("artifacts", free.saturating_mul(2)).is_err());
    }
}
