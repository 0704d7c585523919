//! Room on the hub's data dir: new work is refused *before* the disk is
//! full or while it is read-only, so what the hub already holds (queued and
//! running jobs, results, mails) can still be written, and nothing is lost.
//!
//! The embedded database cannot be trusted to fail gracefully: once one of
//! its writes fails (ENOSPC, EROFS) it refuses every later write until it
//! is opened again. So the hub keeps a reserve
//! (`hub.min_free_space`), checked with `statvfs` on every request for new
//! work (cheap: one system call), and if the database failed anyway, `serve`
//! restarts the process once the data dir takes writes again (see
//! [`DataDir::writable_now`]).
//!
//! An upload's bytes are promised before they are written
//! ([`DataDir::reserve`]): each check counts what uploads in progress
//! announced and have not written yet, so that many uploads, each fitting
//! alone, cannot together cut into the reserve.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Why new work is refused. The message says what is wrong and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SpaceError {
    /// Free space is below the reserve.
    #[error(
        "the hub's data dir {dir} has {free} free{promised}, below hub.min_free_space ({min}): it takes no new {what} until space is freed there (or the reserve lowered); nothing it holds is lost, and running jobs still report"
    )]
    Low {
        /// The data dir.
        dir: String,
        /// Free bytes, human.
        free: String,
        /// What of it uploads in progress will still write, as
        /// `" (… of it promised to uploads in progress)"`, or empty.
        promised: String,
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

/// How the room of the data dir is read: [`room`], or a test's own.
type Probe = Arc<dyn Fn(&Path) -> std::io::Result<Room> + Send + Sync>;

struct Inner {
    dir: PathBuf,
    min_free: u64,
    /// Whether the last check refused (so a change is logged once).
    refusing: AtomicBool,
    /// Bytes uploads in progress announced and have not written yet; each
    /// check holds the lock from reading the room to promising more.
    promised: Mutex<u64>,
    probe: Probe,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataDir")
            .field("dir", &self.dir)
            .field("min_free", &self.min_free)
            .finish_non_exhaustive()
    }
}

/// Bytes of one upload promised against the reserve until written (or the
/// upload ends, when what is left is released).
#[derive(Debug)]
pub(crate) struct Promise {
    space: DataDir,
    what: &'static str,
    /// Promised and not written yet.
    left: u64,
}

impl Promise {
    /// `n` more bytes were written: the file system counts them now.
    pub(crate) fn wrote(&mut self, n: u64) {
        let n = n.min(self.left);
        self.left -= n;
        let mut promised = self.space.promised();
        *promised = promised.saturating_sub(n);
    }

    /// Checks the reserve again while the upload streams (something else
    /// may have filled the disk meanwhile); this upload's own bytes still
    /// to come count.
    pub(crate) fn still_fits(&self) -> Result<(), SpaceError> {
        let promised = self.space.promised();
        self.space.verdict(self.what, 0, *promised)
    }
}

impl Drop for Promise {
    fn drop(&mut self) {
        let mut promised = self.space.promised();
        *promised = promised.saturating_sub(self.left);
    }
}

fn human(bytes: u64) -> String {
    bytesize::ByteSize::b(bytes).to_string()
}

impl DataDir {
    /// Watches `dir`, keeping `min_free` bytes in reserve.
    pub(crate) fn new(dir: &Path, min_free: u64) -> DataDir {
        DataDir::with_probe(dir, min_free, Arc::new(room))
    }

    /// [`DataDir::new`] reading the room with `probe`.
    fn with_probe(dir: &Path, min_free: u64, probe: Probe) -> DataDir {
        DataDir {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                min_free,
                refusing: AtomicBool::new(false),
                promised: Mutex::new(0),
                probe,
            }),
        }
    }

    /// A data dir whose free space is whatever `free` says (tests of
    /// concurrent uploads need a disk that does not change under them).
    #[cfg(test)]
    pub(crate) fn with_free_space(
        dir: &Path,
        min_free: u64,
        free: impl Fn() -> u64 + Send + Sync + 'static,
    ) -> DataDir {
        DataDir::with_probe(
            dir,
            min_free,
            Arc::new(move |_: &Path| {
                Ok(Room {
                    free: free(),
                    read_only: false,
                })
            }),
        )
    }

    fn promised(&self) -> MutexGuard<'_, u64> {
        // A plain number: a panic elsewhere cannot leave it half-written.
        self.inner
            .promised
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether new work of `size` bytes (0 when small) may be taken: refused
    /// when the reserve would be cut into (counting what uploads in
    /// progress will still write) or the dir is read-only. Logs when the
    /// answer changes.
    pub(crate) fn admit(&self, what: &'static str, size: u64) -> Result<(), SpaceError> {
        let promised = self.promised();
        self.verdict(what, size, *promised)
    }

    /// Like [`DataDir::admit`] for an upload of `size` bytes, which are then
    /// promised (counted by every later check) until written or the
    /// returned [`Promise`] is dropped.
    pub(crate) fn reserve(&self, what: &'static str, size: u64) -> Result<Promise, SpaceError> {
        let mut promised = self.promised();
        self.verdict(what, size, *promised)?;
        *promised = promised.saturating_add(size);
        Ok(Promise {
            space: self.clone(),
            what,
            left: size,
        })
    }

    /// The check itself, with `promised` bytes still to be written by
    /// uploads in progress.
    fn verdict(&self, what: &'static str, size: u64, promised: u64) -> Result<(), SpaceError> {
        let dir = self.inner.dir.display().to_string();
        let needed = self
            .inner
            .min_free
            .saturating_add(size)
            .saturating_add(promised);
        let verdict = match (self.inner.probe)(&self.inner.dir) {
            Err(e) => Err(SpaceError::Unknown {
                dir,
                reason: e.to_string(),
            }),
            Ok(r) if r.read_only => Err(SpaceError::ReadOnly { dir, what }),
            Ok(r) if r.free < needed => Err(SpaceError::Low {
                dir,
                free: human(r.free),
                promised: if promised == 0 {
                    String::new()
                } else {
                    format!(
                        " ({} of it promised to uploads in progress)",
                        human(promised)
                    )
                },
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

/// The disk space the files under `path` take (allocated blocks, as `du`
/// counts them: a journal preallocated sparse counts what it holds).
/// Unreadable entries count as nothing.
pub(crate) fn dir_size(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
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
    fn bytes_promised_to_uploads_count_until_written() {
        let dir = tempfile::tempdir().unwrap();
        let free = Arc::new(std::sync::atomic::AtomicU64::new(100));
        let d = {
            let free = free.clone();
            DataDir::with_free_space(dir.path(), 10, move || free.load(Ordering::Relaxed))
        };
        let mut first = d.reserve("artifacts", 60).unwrap();
        let e = d.reserve("artifacts", 60).unwrap_err().to_string();
        assert!(
            e.contains("has 100 B free (60 B of it promised to uploads in progress), below hub.min_free_space (10 B)"),
            "{e}"
        );
        assert!(d.admit("jobs", 0).is_ok());
        // Written bytes leave the promise as the file system counts them.
        first.wrote(50);
        free.store(50, Ordering::Relaxed);
        first.still_fits().unwrap();
        assert!(d.reserve("artifacts", 31).is_err());
        let second = d.reserve("artifacts", 30).unwrap();
        // Something else filled the disk: the streams learn it.
        free.store(30, Ordering::Relaxed);
        assert!(first.still_fits().is_err());
        drop(first);
        drop(second);
        assert_eq!(*d.promised(), 0);
        d.reserve("artifacts", 20).unwrap();
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
