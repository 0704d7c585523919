//! The hub's embedded database (sled): its trees, key layout, schema version
//! and flush policy.
//!
//! Every module that keeps durable state gets its tree from here and nothing
//! else opens the database. Durability works by *group commit*: a writer
//! applies its change to sled (fast, in memory) and then awaits
//! [`Store::commit`], which returns once an `fsync` that started after the
//! write has finished. Concurrent writers share one flush, so throughput does
//! not pay one `fsync` per job while every acknowledgement still waits for the
//! disk.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{mpsc, oneshot};

/// The on-disk schema this build writes. Bumped on an incompatible change,
/// with a migration in [`Store::open`]; an older hub refuses a newer schema.
pub const SCHEMA_VERSION: u32 = 1;

/// Errors from the store. The message always says what the operator can do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed (disk full, read-only file system, corruption...).
    #[error("hub database {path}: {source} (is the disk full or read-only?)")]
    Db {
        /// The database directory.
        path: PathBuf,
        /// sled's error.
        source: sled::Error,
    },
    /// The database was written by a newer hub.
    #[error(
        "hub database {path} has schema version {found}, but this trunkfarm only knows up to {SCHEMA_VERSION}: run a newer trunkfarm (data written by a newer hub is never rewritten by an older one)"
    )]
    TooNew {
        /// The database directory.
        path: PathBuf,
        /// The version on disk.
        found: u32,
    },
    /// A record could not be decoded.
    #[error("hub database {path}: record {key} is unreadable: {reason}")]
    Corrupt {
        /// The database directory.
        path: PathBuf,
        /// The record's key, printable.
        key: String,
        /// Why.
        reason: String,
    },
    /// The group-commit task is gone (the hub is shutting down).
    #[error("hub database is shutting down")]
    Closed,
}

/// A cloneable handle to the database and its trees.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    db: sled::Db,
    commits: mpsc::UnboundedSender<oneshot::Sender<Result<(), String>>>,
    /// A flush failed. sled then refuses every later write until the
    /// database is opened again (see [`Store::failed`]).
    failed: Arc<AtomicBool>,
}

/// Names of the trees, one per owning module.
pub mod trees {
    /// Jobs: `j<id>` → job record, `o<id>` → marker for every unfinished job.
    pub const JOBS: &str = "jobs";
    /// Job logs: (job id, attempt, seq) → stream byte + data.
    pub const LOGS: &str = "logs";
    /// Enrollment tokens and agent credentials.
    pub const AUTH: &str = "auth";
    /// Schema version and other hub-wide facts.
    pub const META: &str = "meta";
    /// Runtime artifacts: `<sha256 hex>` → artifact record (the files live in `<data_dir>/artifacts`).
    pub const ARTIFACTS: &str = "artifacts";
}

impl Store {
    /// Opens (or creates) the database in `dir` and starts its group-commit
    /// task. Must be called inside a tokio runtime.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let db_err = |source| StoreError::Db {
            path: dir.to_path_buf(),
            source,
        };
        let db = sled::Config::new()
            .path(dir)
            // We flush explicitly (group commit); no background timer needed.
            .flush_every_ms(None)
            .open()
            .map_err(db_err)?;
        let meta = db.open_tree(trees::META).map_err(db_err)?;
        match meta.get("schema_version").map_err(db_err)? {
            None => {
                meta.insert("schema_version", &SCHEMA_VERSION.to_be_bytes())
                    .map_err(db_err)?;
                db.flush().map_err(db_err)?;
            }
            Some(v) => {
                let found = v.as_ref().try_into().map(u32::from_be_bytes).map_err(|_| {
                    StoreError::Corrupt {
                        path: dir.to_path_buf(),
                        key: "meta/schema_version".into(),
                        reason: "not a 4-byte version".into(),
                    }
                })?;
                if found > SCHEMA_VERSION {
                    return Err(StoreError::TooNew {
                        path: dir.to_path_buf(),
                        found,
                    });
                }
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let failed = Arc::new(AtomicBool::new(false));
        tokio::spawn(group_commit(
            db.clone(),
            dir.to_path_buf(),
            rx,
            failed.clone(),
        ));
        Ok(Store {
            inner: Arc::new(Inner {
                path: dir.to_path_buf(),
                db,
                commits: tx,
                failed,
            }),
        })
    }

    /// Opens one of the [`trees`].
    pub fn tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        self.inner.db.open_tree(name).map_err(|e| self.err(e))
    }

    /// A fresh id, unique across restarts (sled persists its counter).
    pub fn next_id(&self) -> Result<u64, StoreError> {
        // sled's ids start at 0; trunkfarm's start at 1 so 0 can mean "none".
        self.inner
            .db
            .generate_id()
            .map(|id| id + 1)
            .map_err(|e| self.err(e))
    }

    /// Waits until every write made before this call is on disk.
    pub async fn commit(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .commits
            .send(tx)
            .map_err(|_| StoreError::Closed)?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(StoreError::Corrupt {
                path: self.inner.path.clone(),
                key: "(flush)".into(),
                reason,
            }),
            Err(_) => Err(StoreError::Closed),
        }
    }

    /// Whether a flush failed (disk full, read-only, I/O error): sled then
    /// refuses all writes until the database is opened again, which for the
    /// hub means a restart (`serve` does it once the disk takes writes).
    pub fn failed(&self) -> bool {
        self.inner.failed.load(Ordering::Relaxed)
    }

    /// Flushes on this thread, without the group-commit task: for tools that
    /// write a database no hub is serving.
    pub fn flush_now(&self) -> Result<(), StoreError> {
        self.inner.db.flush().map(|_| ()).map_err(|e| self.err(e))
    }

    /// Wraps a sled error with the database path. An I/O error means sled
    /// refuses every later write: the store counts as failed.
    pub fn err(&self, source: sled::Error) -> StoreError {
        if matches!(source, sled::Error::Io(_)) && !self.inner.failed.swap(true, Ordering::Relaxed)
        {
            tracing::error!(
                "hub database: {source}; nothing more can be stored until the hub restarts, which it does by itself once its data dir takes writes again"
            );
        }
        StoreError::Db {
            path: self.inner.path.clone(),
            source,
        }
    }

    /// A decoding error for `key`.
    pub fn corrupt(&self, key: impl Into<String>, reason: impl ToString) -> StoreError {
        StoreError::Corrupt {
            path: self.inner.path.clone(),
            key: key.into(),
            reason: reason.to_string(),
        }
    }
}

/// Flushes on behalf of every waiter that arrived before the flush started.
async fn group_commit(
    db: sled::Db,
    dir: PathBuf,
    mut waiters: mpsc::UnboundedReceiver<oneshot::Sender<Result<(), String>>>,
    failed: Arc<AtomicBool>,
) {
    let mut batch = Vec::new();
    while let Some(first) = waiters.recv().await {
        batch.push(first);
        while let Ok(next) = waiters.try_recv() {
            batch.push(next);
        }
        let result = if failed.load(Ordering::Relaxed) {
            Err("an earlier flush failed; the hub restarts once its data dir takes writes".into())
        } else {
            flush(&db, &dir).await
        };
        if let Err(e) = &result
            && !failed.swap(true, Ordering::Relaxed)
        {
            tracing::error!(
                "hub database: {e}; nothing more can be stored until the hub restarts, which it does by itself once its data dir takes writes again"
            );
        }
        for waiter in batch.drain(..) {
            let _ = waiter.send(result.clone());
        }
    }
}

/// How often a flush that has not finished checks whether the disk can
/// still take it.
const FLUSH_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// One flush. sled does not return from a flush whose write failed (it
/// waits for the buffer to become stable forever), so a flush still running
/// while the file system is full or read-only is given up as failed.
async fn flush(db: &sled::Db, dir: &Path) -> Result<(), String> {
    let db = db.clone();
    let mut task = tokio::task::spawn_blocking(move || db.flush());
    loop {
        tokio::select! {
            done = &mut task => {
                return match done {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(format!("flush failed: {e} (is the disk full or read-only?)")),
                    Err(e) => Err(format!("flush task failed: {e}")),
                };
            }
            _ = tokio::time::sleep(FLUSH_CHECK_INTERVAL) => {
                match crate::space::room(dir) {
                    Ok(r) if r.read_only => {
                        return Err("flush stuck: the file system is read-only".into());
                    }
                                        Ok(r) if r.free < 1024 * 1024 => {
                        return Err("flush stuck: no space left on device".into());
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Milliseconds since the Unix epoch, the timestamp unit of every record.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Opens again once the previous handle's group-commit task let go of the lock.
    pub(crate) async fn reopen(dir: &Path) -> Store {
        for _ in 0..100 {
            if let Ok(s) = Store::open(dir) {
                return s;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        Store::open(dir).unwrap()
    }

    #[tokio::test]
    async fn committed_writes_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let t = store.tree(trees::JOBS).unwrap();
            t.insert("k", "v").unwrap();
            store.commit().await.unwrap();
        }
        let store = reopen(dir.path()).await;
        let t = store.tree(trees::JOBS).unwrap();
        assert_eq!(t.get("k").unwrap().as_deref(), Some(&b"v"[..]));
    }

    #[tokio::test]
    async fn ids_are_unique_and_nonzero() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = store.next_id().unwrap();
        let b = store.next_id().unwrap();
        assert!(a > 0 && b > a);
    }

    #[tokio::test]
    async fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            let meta = db.open_tree(trees::META).unwrap();
            meta.insert("schema_version", &99u32.to_be_bytes()).unwrap();
            db.flush().unwrap();
        }
        let err = Store::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("schema version 99"), "{err}");
    }

    #[tokio::test]
    async fn many_concurrent_commits_share_flushes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let t = store.tree(trees::JOBS).unwrap();
        let mut handles = Vec::new();
        for i in 0u32..200 {
            let store = store.clone();
            let t = t.clone();
            handles.push(tokio::spawn(async move {
                t.insert(i.to_be_bytes(), &[1u8][..]).unwrap();
                store.commit().await.unwrap();
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
        assert_eq!(t.len(), 200);
    }
}
