//! The hub's embedded database (fjall, an LSM tree): its trees, key layout,
//! schema version, ids and flush policy.
//!
//! Every module that keeps durable state gets its tree from here and nothing
//! else opens the database or names its engine. Durability works by *group
//! commit*: a writer applies its change (to the journal and the memtable:
//! visible at once) and then awaits [`Store::commit`], which returns once an
//! `fsync` that started after the write has finished. Concurrent writers
//! share one flush, so throughput does not pay one `fsync` per job while
//! every acknowledgement still waits for the disk.
//!
//! fjall rather than sled (which earlier releases used, and which
//! [`from_sled`] copies once): sled's files grew by about the size of every
//! record ever written while a few old records stayed live in their segments
//! (BENCHMARKS.md, growth); an LSM tree gives removed records' space back when
//! it compacts, so under retention the files stop growing.

mod from_sled;
mod queue;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot};

/// The on-disk schema this build writes. Bumped on an incompatible change,
/// with a migration in [`Store::open`]; an older hub refuses a newer schema.
/// 3: fjall (1 and 2 were sled: [`from_sled`] copies them; 2 persisted ids
/// every [`ID_PERSIST_INTERVAL`], 1 at sled's default).
pub(crate) const SCHEMA_VERSION: u32 = 3;

/// How many ids are handed out between two durable writes of the id
/// counter's reservation. A start (after a clean stop or a `kill -9` alike)
/// resumes at the last reservation written, so no id is ever given twice
/// and ids skip at most this many at each start; it costs one small blocking
/// `fsync` every hundred ids.
const ID_PERSIST_INTERVAL: u64 = 100;

/// The default size of the database's block cache (`hub.database_cache`),
/// bytes.
pub(crate) const DEFAULT_CACHE_BYTES: u64 = 128 * 1024 * 1024;

/// The most journal the database keeps before it writes memtables out
/// (fjall's smallest; its default, 512 MiB, took seconds to replay at a
/// start and held as much on disk).
const MAX_JOURNAL_BYTES: u64 = 64 * 1024 * 1024;

/// One tree's in-memory write buffer before it is written out as a table
/// (fjall's default is 64 MiB per tree: ten trees of it are most of a
/// hub's memory for nothing).
const MEMTABLE_BYTES: u64 = 8 * 1024 * 1024;

/// The longest key the engine holds (its keys' length is a `u16`; a
/// longer one, or an empty one, makes it panic).
pub(crate) const MAX_KEY_BYTES: usize = u16::MAX as usize;

/// Whether the engine can hold `key`.
fn storable(key: &[u8]) -> bool {
    !key.is_empty() && key.len() <= MAX_KEY_BYTES
}

/// Where the database lives in a hub's data dir.
pub(crate) const DIR: &str = "store";

/// Opens fjall in `dir` with a block cache of `cache_bytes`.
fn open_fjall(dir: &Path, cache_bytes: u64) -> fjall::Result<fjall::Database> {
    fjall::Database::builder(dir)
        .cache_size(cache_bytes)
        .max_journaling_size(MAX_JOURNAL_BYTES)
        .open()
}

/// Opens (or creates) the tree `name` of `db`.
fn open_tree(db: &fjall::Database, name: &str) -> fjall::Result<fjall::Keyspace> {
    db.keyspace(name, || {
        fjall::KeyspaceCreateOptions::default().max_memtable_size(MEMTABLE_BYTES)
    })
}

/// Errors from the store. The message always says what the operator can do.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    /// The database failed (disk full, read-only file system, corruption...).
    #[error("hub database {path}: {source} (is the disk full or read-only?)")]
    Db {
        /// The database directory.
        path: PathBuf,
        /// fjall's error (boxed: it is large, and every result carries it).
        source: Box<fjall::Error>,
    },
    /// Another process has the database open.
    #[error(
        "hub database {path} is in use by another process (is another trunkfarm running on this data dir? stop it first)"
    )]
    Locked {
        /// The database directory.
        path: PathBuf,
    },
    /// Copying a database an older release wrote (sled) failed.
    #[error("hub database {path}: copying the older release's database failed: {reason}")]
    Import {
        /// The older database's directory.
        path: PathBuf,
        /// What failed.
        reason: String,
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
    /// A key the database cannot hold (empty, or longer than
    /// [`MAX_KEY_BYTES`]): refused before it reaches the engine, which
    /// would panic on it.
    #[error(
        "hub database {path}: a key of {len} bytes cannot be stored in {tree} (1 to {MAX_KEY_BYTES} bytes)"
    )]
    BadKey {
        /// The database directory.
        path: PathBuf,
        /// The tree.
        tree: &'static str,
        /// The key's length.
        len: usize,
    },
    /// The group-commit task is gone (the hub is shutting down).
    #[error("hub database is shutting down")]
    Closed,
}

/// A cloneable handle to the database and its trees.
#[derive(Clone)]
pub(crate) struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    db: fjall::Database,
    /// The `meta` tree: schema version and the id counter's reservation.
    meta: fjall::Keyspace,
    /// The id counter: the next id and the reservation on disk (no id at
    /// or above it was handed out).
    ids: std::sync::Mutex<Ids>,
    commits: mpsc::UnboundedSender<oneshot::Sender<Result<(), String>>>,
    /// A flush failed. The database then refuses every later write until
    /// it is opened again (see [`Store::failed`]).
    failed: Arc<AtomicBool>,
    /// Held by [`Table::update`]: one read-modify-write at a time.
    updates: std::sync::Mutex<()>,
    /// Each tree's queue marks, shared by its tables (see [`queue`]).
    queues: std::sync::Mutex<std::collections::HashMap<&'static str, Arc<queue::Queues>>>,
}

/// Every tree of the database, with its key layout. One module owns each
/// tree (named below) and is the only one that reads or writes it, through a
/// [`Table`]; the layouts are listed here so that one page shows the whole
/// database. `<id>` is [`id_key`]'s 20-digit decimal (sorts like the number),
/// `<id8>` an 8-byte big-endian id.
pub(crate) mod trees {
    /// `dispatch`: `j<id8>` → job record, `o<id8>` → marker of every
    /// unfinished job, `k<pipeline key>` → id8 of the keyed job,
    /// `f<id8>` → marker of a finished keyed job the pipeline has not taken
    /// in yet (the inbox).
    pub(crate) const JOBS: &str = "jobs";
    /// `logs`: (job id8, attempt u32, seq u64) → stream byte + data.
    pub(crate) const LOGS: &str = "logs";
    /// `logs::compact`: (job id8, attempt u32) → the record of that
    /// attempt's compacted log (object path, sizes, zstd frame index); its
    /// chunks are gone from `logs` in the same step.
    pub(crate) const LOG_OBJECTS: &str = "log_objects";
    /// `auth::credentials`: `t/<token id>` → enrollment token,
    /// `a/<agent id>` → agent credential.
    pub(crate) const AUTH: &str = "auth";
    /// `store`: `schema_version` → u32 big-endian.
    pub(crate) const META: &str = "meta";
    /// `artifacts`: `<sha256 hex>` → artifact record (the files live in
    /// `<data_dir>/artifacts`).
    pub(crate) const ARTIFACTS: &str = "artifacts";
    /// `pipeline`: `h/u/<upstream>` and `h/p/<project>` → branch head last
    /// seen by polling, `hh/u/<upstream>/<commit>` (and `hh/p/…`) → 8-byte
    /// big-endian sequence number: when polling first saw it as the head,
    /// `hs/u/<upstream>/<sequence>` → that commit (the heads in the order
    /// seen: the dashboard's newest columns).
    pub(crate) const PIPELINE: &str = "pipeline";
    /// `results`: `b/<upstream>/<platform>/<commit>` → build,
    /// `bl/<upstream>/<platform>` → newest build, `bg/…` → newest passed
    /// build, `r/<project>/<upstream>/<platform>/<job id>` → run,
    /// `rl/<project>/<upstream>/<platform>` → newest run (summary),
    /// `s/<project>/<upstream>/<platform>` → series state, `t/<id>` →
    /// transition, `p/<job id>` → marker: this finished job is recorded,
    /// `c/<job id>` → a held verdict's confirmation, `x/<upstream>/<platform>/<last
    /// good>/<bad>` → a bisection of that culprit range,
    /// `n/<project>` → flips on identical re-runs (per project and test),
    /// `nx/<job id>` → marker: this re-run is counted there, `k/<job
    /// id>/<n>` → calibration run `n` of that job, `tb/<upstream>/<commit>/<id>`,
    /// `tp/<project>/<id>` and `tu/<upstream>/<id>` → empty: the
    /// transitions' indexes by commit (the result's and each culprit, of
    /// the transitions that may blame: went red or suspicious), by project
    /// and by upstream, `tib` → marker: the indexes are built (older hubs'
    /// `tiu` and `ti` markers and their `tc/` commit index of every
    /// transition go when they are).
    pub(crate) const RESULTS: &str = "results";
    /// `notify`: `s/<project>/<email>` and `d/<upstream>/<email>` →
    /// subscription, `x/<project>/<email>` → a config maintainer who
    /// unsubscribed, `m/<id>` → mail, `q/<id>` → marker: mail pending,
    /// `e/<event>/<email>` → mail id, `r/<went-red id>` → reminders sent,
    /// `g/<upstream>/<email>` → last digest period, `u/<project>/<email>` →
    /// when the address last unsubscribed from the project.
    pub(crate) const NOTIFY: &str = "notify";
    /// `provision`: `i/<pool>/<instance>` → instance, `b/<pool>` → the
    /// pool's launch backoff.
    pub(crate) const PROVISION: &str = "provision";
}

/// The first key after every key that starts with `prefix` (`None`: there
/// is none, the prefix is all `0xff`).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// A record id as a key part: 20 decimal digits, so keys sort like ids.
pub(crate) fn id_key(id: u64) -> String {
    format!("{id:020}")
}

/// A key or value as the database hands it out (it derefs to `[u8]`).
pub(crate) type Bytes = fjall::Slice;

/// Writes and removals in one table, applied atomically by [`Table::apply`]
/// (or together with another table's by [`Table::apply_with`]). Only this
/// module knows which database engine turns it into one durable step.
#[derive(Debug, Default, Clone)]
pub(crate) struct Batch {
    ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl Batch {
    /// Adds "write `value` at `key`".
    pub(crate) fn insert(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        self.ops
            .push((key.as_ref().to_vec(), Some(value.as_ref().to_vec())));
    }

    /// Adds "remove `key`".
    pub(crate) fn remove(&mut self, key: impl AsRef<[u8]>) {
        self.ops.push((key.as_ref().to_vec(), None));
    }

    /// Whether it holds nothing.
    pub(crate) fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Adds this batch's changes to `table`'s tree to an engine batch, or
    /// refuses it whole if a key cannot be stored. Returns the keys it
    /// writes (for [`queue::Queues::written`] once the batch is applied;
    /// none while no queue of the tree is watched).
    fn stage_into(
        self,
        batch: &mut fjall::OwnedWriteBatch,
        table: &Table,
    ) -> Result<Written, StoreError> {
        if let Some((key, _)) = self.ops.iter().find(|(k, _)| !storable(k)) {
            return Err(table.bad_key(key));
        }
        let mut written = Vec::new();
        let watched = table.queues.watched();
        for (key, value) in self.ops {
            match value {
                Some(value) if watched => {
                    batch.insert(&table.tree, &key, value);
                    written.push(key);
                }
                Some(value) => batch.insert(&table.tree, key, value),
                None => batch.remove(&table.tree, key),
            }
        }
        Ok(Written {
            keys: written,
            kept: watched,
        })
    }
}

/// The keys a staged batch writes, if they were kept (see
/// [`Batch::stage_into`]).
struct Written {
    keys: Vec<Vec<u8>>,
    kept: bool,
}

impl Written {
    /// Tells `table`'s queue marks, once the batch is applied.
    fn report(&self, table: &Table) {
        if self.kept {
            table.queues.written(self.keys.iter().map(Vec::as_slice));
        } else if table.queues.watched() {
            table.queues.written_unknown();
        }
    }
}

/// One tree, read and written as JSON records: the typed layer every owning
/// module uses instead of raw engine calls. Reads that fail to decode become
/// [`StoreError::Corrupt`] naming the tree and key; writes are not durable
/// until [`Store::commit`] returns.
#[derive(Clone)]
pub(crate) struct Table {
    store: Store,
    tree: fjall::Keyspace,
    name: &'static str,
    /// Where [`Table::queue_keys`] starts (shared by the tree's tables);
    /// every key written moves it down.
    queues: Arc<queue::Queues>,
}

impl Table {
    /// Opens the tree `name` (one of [`trees`]).
    pub(crate) fn open(store: &Store, name: &'static str) -> Result<Table, StoreError> {
        Ok(Table {
            store: store.clone(),
            tree: store.tree(name)?,
            name,
            queues: store.queues(name),
        })
    }

    /// The store this table lives in (for [`Store::commit`]).
    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// The record at `key`, if any.
    pub(crate) fn get<T: DeserializeOwned>(
        &self,
        key: impl AsRef<[u8]>,
    ) -> Result<Option<T>, StoreError> {
        let key = key.as_ref();
        match self.get_raw(key)? {
            None => Ok(None),
            Some(raw) => self.decode(key, &raw).map(Some),
        }
    }

    /// The raw bytes at `key` (markers, binary values). A key that cannot
    /// be stored (a token id of 70 KB in a request) is simply not there.
    pub(crate) fn get_raw(&self, key: impl AsRef<[u8]>) -> Result<Option<Bytes>, StoreError> {
        let key = key.as_ref();
        if !storable(key) {
            return Ok(None);
        }
        self.tree.get(key).map_err(|e| self.store.err(e))
    }

    /// Whether `key` is present.
    pub(crate) fn contains(&self, key: impl AsRef<[u8]>) -> Result<bool, StoreError> {
        let key = key.as_ref();
        if !storable(key) {
            return Ok(false);
        }
        self.tree.contains_key(key).map_err(|e| self.store.err(e))
    }

    /// The error for a key that cannot be stored.
    fn bad_key(&self, key: &[u8]) -> StoreError {
        StoreError::BadKey {
            path: self.store.inner.path.clone(),
            tree: self.name,
            len: key.len(),
        }
    }

    /// `key`, if the engine can hold it.
    fn checked_key<'k>(&self, key: &'k [u8]) -> Result<&'k [u8], StoreError> {
        if storable(key) {
            Ok(key)
        } else {
            Err(self.bad_key(key))
        }
    }

    /// Writes `value` at `key` (durable after the next commit).
    pub(crate) fn put<T: Serialize>(
        &self,
        key: impl AsRef<[u8]>,
        value: &T,
    ) -> Result<(), StoreError> {
        self.put_raw(key, self.encode(value)?)
    }

    /// Writes raw bytes at `key` (markers, binary values).
    pub(crate) fn put_raw(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
    ) -> Result<(), StoreError> {
        let key = self.checked_key(key.as_ref())?;
        self.tree
            .insert(key, value.as_ref())
            .map_err(|e| self.store.err(e))?;
        self.queues.written([key]);
        Ok(())
    }

    /// Removes `key`.
    pub(crate) fn remove(&self, key: impl AsRef<[u8]>) -> Result<(), StoreError> {
        self.tree
            .remove(self.checked_key(key.as_ref())?)
            .map_err(|e| self.store.err(e))
    }

    /// Adds "write `value` at `key`" to `batch`.
    pub(crate) fn stage<T: Serialize>(
        &self,
        batch: &mut Batch,
        key: impl AsRef<[u8]>,
        value: &T,
    ) -> Result<(), StoreError> {
        batch.insert(key, self.encode(value)?);
        Ok(())
    }

    /// Applies `batch` atomically (durable after the next commit).
    pub(crate) fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut staged = self.store.inner.db.batch();
        let written = batch.stage_into(&mut staged, self)?;
        staged.commit().map_err(|e| self.store.err(e))?;
        written.report(self);
        Ok(())
    }

    /// Runs `change` as this store's only read-modify-write for its
    /// duration and applies the writes it staged in the batch it is given
    /// when it returns `Ok` (nothing when it returns `Err`). `change` reads
    /// through the table as usual; it does not see its own staged writes.
    /// Every writer of records that are read-modified-written must go
    /// through here, or a change could be lost between read and write.
    pub(crate) fn update<T, E: From<StoreError>>(
        &self,
        change: impl FnOnce(&Table, &mut Batch) -> Result<T, E>,
    ) -> Result<T, E> {
        // A panic in another update leaves nothing half-applied (its batch
        // is dropped), so a poisoned lock is safe to take.
        let _one_at_a_time = self
            .store
            .inner
            .updates
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut batch = Batch::default();
        let out = change(self, &mut batch)?;
        self.apply(batch)?;
        Ok(out)
    }

    /// Applies `mine` to this table and `theirs` to `other` in one atomic
    /// step (a result and the mails it causes land together or not at all).
    pub(crate) fn apply_with(
        &self,
        mine: Batch,
        other: &Table,
        theirs: Batch,
    ) -> Result<(), StoreError> {
        let mut staged = self.store.inner.db.batch();
        let mine = mine.stage_into(&mut staged, self)?;
        let theirs = theirs.stage_into(&mut staged, other)?;
        staged.commit().map_err(|e| self.store.err(e))?;
        mine.report(self);
        theirs.report(other);
        Ok(())
    }

    /// The records under `prefix` in key order (`.rev()` for newest first),
    /// each with its key.
    pub(crate) fn scan<T: DeserializeOwned>(
        &self,
        prefix: impl AsRef<[u8]>,
    ) -> impl DoubleEndedIterator<Item = Result<(Bytes, T), StoreError>> + '_ {
        self.scan_raw(prefix).map(move |item| {
            let (k, v) = item?;
            let value = self.decode(&k, &v)?;
            Ok((k, value))
        })
    }

    /// The keys under `prefix` in key order.
    pub(crate) fn keys(
        &self,
        prefix: impl AsRef<[u8]>,
    ) -> impl DoubleEndedIterator<Item = Result<Bytes, StoreError>> + '_ {
        self.prefix(prefix.as_ref())
            .map(move |item| item.key().map_err(|e| self.store.err(e)))
    }

    /// The keys under `prefix`, a queue whose front is taken off (the
    /// finished jobs' inbox, the pending mails), in key order. Starts where
    /// the last scan found the first key, not over the keys removed before
    /// it (see [`queue`]); keys removed between live ones are still walked.
    /// Reads the first key at once (so the mark moves when called).
    pub(crate) fn queue_keys(
        &self,
        prefix: impl AsRef<[u8]>,
    ) -> impl Iterator<Item = Result<Bytes, StoreError>> + '_ {
        let prefix = prefix.as_ref();
        let start = self.queues.start(prefix);
        let mut keys = start
            .from
            .clone()
            .map(|from| {
                self.scan_raw_from(prefix.to_vec(), from)
                    .map(|item| item.map(|(key, _)| key))
            })
            .into_iter()
            .flatten();
        let first = keys.next();
        match &first {
            Some(Ok(key)) => self.queues.found(prefix, start, Some(key)),
            None => self.queues.found(prefix, start, None),
            Some(Err(_)) => self.queues.abandoned(prefix, start),
        }
        first.into_iter().chain(keys)
    }

    /// The raw entries under `prefix` in key order.
    pub(crate) fn scan_raw(
        &self,
        prefix: impl AsRef<[u8]>,
    ) -> impl DoubleEndedIterator<Item = Result<(Bytes, Bytes), StoreError>> + '_ {
        self.prefix(prefix.as_ref())
            .map(move |item| item.into_inner().map_err(|e| self.store.err(e)))
    }

    /// The engine's entries under `prefix`; none under one longer than a
    /// key can be.
    fn prefix<'a>(
        &'a self,
        prefix: &[u8],
    ) -> impl DoubleEndedIterator<Item = fjall::Guard> + use<'a> {
        (prefix.len() <= MAX_KEY_BYTES)
            .then(|| self.tree.prefix(prefix))
            .into_iter()
            .flatten()
    }

    /// The raw entries under `prefix` from `from` on, in key order: a
    /// range that stops at the prefix's end (where a range left open would
    /// walk whatever removed keys the database still keeps after it).
    pub(crate) fn scan_raw_from(
        &self,
        prefix: impl AsRef<[u8]>,
        from: impl AsRef<[u8]>,
    ) -> impl DoubleEndedIterator<Item = Result<(Bytes, Bytes), StoreError>> + '_ {
        use std::ops::Bound;
        let prefix = prefix.as_ref();
        let start = Bound::Included(from.as_ref().max(prefix).to_vec());
        let end = prefix_end(prefix).map_or(Bound::Unbounded, Bound::Excluded);
        self.range((start, end))
    }

    /// The raw entries with keys in `range`, in key order (`.rev()` for
    /// the last first): where a prefix does not say where to start or stop.
    pub(crate) fn range<K: AsRef<[u8]>, R: std::ops::RangeBounds<K>>(
        &self,
        range: R,
    ) -> impl DoubleEndedIterator<Item = Result<(Bytes, Bytes), StoreError>> + '_ {
        use std::ops::Bound;
        let too_long = |b: Bound<&K>| match b {
            Bound::Included(k) | Bound::Excluded(k) => k.as_ref().len() > MAX_KEY_BYTES,
            Bound::Unbounded => false,
        };
        let fits = !too_long(range.start_bound()) && !too_long(range.end_bound());
        fits.then(|| self.tree.range(range))
            .into_iter()
            .flatten()
            .map(move |item| item.into_inner().map_err(|e| self.store.err(e)))
    }

    /// The JSON encoding of `value`.
    pub(crate) fn encode<T: Serialize>(&self, value: &T) -> Result<Vec<u8>, StoreError> {
        serde_json::to_vec(value).map_err(|e| self.corrupt("(encoding)", e))
    }

    /// Decodes the record stored at `key`.
    pub(crate) fn decode<T: DeserializeOwned>(
        &self,
        key: &[u8],
        raw: &[u8],
    ) -> Result<T, StoreError> {
        serde_json::from_slice(raw).map_err(|e| self.corrupt(String::from_utf8_lossy(key), e))
    }

    /// A "record unreadable" error for `key` of this tree.
    pub(crate) fn corrupt(&self, key: impl std::fmt::Display, reason: impl ToString) -> StoreError {
        self.store.corrupt(format!("{}/{key}", self.name), reason)
    }
}

/// The id counter: what [`Store::next_id`] hands out next, and the
/// reservation written durably (every id handed out is below it).
struct Ids {
    next: u64,
    reserved: u64,
}

/// The `meta` key of the id counter's reservation (8 bytes big-endian).
const IDS_RESERVED: &str = "ids_reserved";

/// The `meta` key of the schema version (4 bytes big-endian).
const SCHEMA_KEY: &str = "schema_version";

/// Reads a big-endian number of `N` bytes stored at `key` in `meta`.
fn read_number<const N: usize>(
    meta: &fjall::Keyspace,
    key: &str,
    path: &Path,
) -> Result<Option<[u8; N]>, StoreError> {
    let Some(raw) = meta.get(key).map_err(|source| StoreError::Db {
        path: path.to_path_buf(),
        source: Box::new(source),
    })?
    else {
        return Ok(None);
    };
    raw.as_ref()
        .try_into()
        .map(Some)
        .map_err(|_| StoreError::Corrupt {
            path: path.to_path_buf(),
            key: format!("meta/{key}"),
            reason: format!("not a {N}-byte number"),
        })
}

impl Store {
    /// Opens (or creates) the database in `dir` with the default block
    /// cache and starts its group-commit task (tests; the hub and the
    /// benchmarks open it with the configured cache). Must be called inside
    /// a tokio runtime.
    #[cfg(test)]
    pub(crate) fn open(dir: &Path) -> Result<Store, StoreError> {
        Store::open_with_cache(dir, DEFAULT_CACHE_BYTES)
    }

    /// Opens (or creates) the database in `dir` with a block cache of
    /// `cache_bytes` (`hub.database_cache`) and starts its group-commit
    /// task. Must be called inside a tokio runtime.
    pub(crate) fn open_with_cache(dir: &Path, cache_bytes: u64) -> Result<Store, StoreError> {
        let db_err = |source: fjall::Error| match source {
            fjall::Error::Locked => StoreError::Locked {
                path: dir.to_path_buf(),
            },
            source => StoreError::Db {
                path: dir.to_path_buf(),
                source: Box::new(source),
            },
        };
        let db = open_fjall(dir, cache_bytes).map_err(db_err)?;
        let meta = open_tree(&db, trees::META).map_err(db_err)?;
        match read_number::<4>(&meta, SCHEMA_KEY, dir)?.map(u32::from_be_bytes) {
            None => {
                meta.insert(SCHEMA_KEY, SCHEMA_VERSION.to_be_bytes())
                    .map_err(db_err)?;
                db.persist(fjall::PersistMode::SyncAll).map_err(db_err)?;
            }
            Some(found) if found > SCHEMA_VERSION => {
                return Err(StoreError::TooNew {
                    path: dir.to_path_buf(),
                    found,
                });
            }
            Some(_) => {}
        }
        // Ids start at 1 so 0 can mean "none".
        let reserved = read_number::<8>(&meta, IDS_RESERVED, dir)?.map_or(1, u64::from_be_bytes);
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
                meta,
                ids: std::sync::Mutex::new(Ids {
                    next: reserved,
                    reserved,
                }),
                commits: tx,
                failed,
                updates: std::sync::Mutex::new(()),
                queues: Default::default(),
            }),
        })
    }

    /// Opens the database of the hub's data dir `data_dir` (in [`DIR`])
    /// as [`Store::open_with_cache`] does, after copying in the database
    /// an older release wrote there with sled (in `db`), the first time
    /// (see [`from_sled`]).
    pub(crate) fn open_data_dir(data_dir: &Path, cache_bytes: u64) -> Result<Store, StoreError> {
        let dir = data_dir.join(DIR);
        from_sled::import(&data_dir.join(from_sled::DIR), &dir, cache_bytes)?;
        Store::open_with_cache(&dir, cache_bytes)
    }

    /// The queue marks of the tree `name`, shared by all its tables.
    fn queues(&self, name: &'static str) -> Arc<queue::Queues> {
        let mut queues = self
            .inner
            .queues
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        queues.entry(name).or_default().clone()
    }

    /// Opens one of the [`trees`].
    fn tree(&self, name: &str) -> Result<fjall::Keyspace, StoreError> {
        open_tree(&self.inner.db, name).map_err(|e| self.err(e))
    }

    /// A table of one of the [`trees`], for tests that write what an older
    /// release wrote or look under the owning module.
    #[cfg(test)]
    pub(crate) fn table(&self, name: &'static str) -> Table {
        Table::open(self, name).expect("the test database opens its trees")
    }

    /// A fresh id, unique across restarts and kills: every
    /// [`ID_PERSIST_INTERVAL`] ids the next reservation is written and
    /// synced before any id of it is handed out.
    pub(crate) fn next_id(&self) -> Result<u64, StoreError> {
        // Nothing is left half-changed under this lock: safe after a panic.
        let mut ids = self
            .inner
            .ids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if ids.next >= ids.reserved {
            let reserved = ids.next + ID_PERSIST_INTERVAL;
            self.inner
                .meta
                .insert(IDS_RESERVED, reserved.to_be_bytes())
                .map_err(|e| self.err(e))?;
            self.inner
                .db
                .persist(fjall::PersistMode::SyncAll)
                .map_err(|e| self.err(e))?;
            ids.reserved = reserved;
        }
        let id = ids.next;
        ids.next += 1;
        Ok(id)
    }

    /// The database directory.
    #[cfg(test)]
    pub(crate) fn dir(&self) -> &Path {
        &self.inner.path
    }

    /// Waits until every write made before this call is on disk.
    pub(crate) async fn commit(&self) -> Result<(), StoreError> {
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

    /// Whether a flush failed (disk full, read-only, I/O error): the
    /// database then refuses all writes until it is opened again, which for
    /// the hub means a restart (`serve` does it once the disk takes writes).
    pub(crate) fn failed(&self) -> bool {
        self.inner.failed.load(Ordering::Relaxed)
    }

    /// Flushes on this thread, without the group-commit task: for tools that
    /// write a database no hub is serving.
    pub(crate) fn flush_now(&self) -> Result<(), StoreError> {
        self.inner
            .db
            .persist(fjall::PersistMode::SyncAll)
            .map_err(|e| self.err(e))
    }

    /// The bytes of every key and value in the database (what retention's
    /// tests and `trunkfarm bench growth` compare the files with). Reads
    /// everything: not for a serving hub.
    pub(crate) fn live_bytes(&self) -> Result<u64, StoreError> {
        let mut total = 0u64;
        for name in self.inner.db.list_keyspace_names() {
            let tree = self.tree(&name)?;
            for item in tree.iter() {
                let (k, v) = item.into_inner().map_err(|e| self.err(e))?;
                total += (k.len() + v.len()) as u64;
            }
        }
        Ok(total)
    }

    /// Wraps an engine error with the database path. An I/O error means
    /// the database refuses every later write: the store counts as failed.
    pub(crate) fn err(&self, source: fjall::Error) -> StoreError {
        if matches!(source, fjall::Error::Io(_) | fjall::Error::Poisoned)
            && !self.inner.failed.swap(true, Ordering::Relaxed)
        {
            tracing::error!(
                "hub database: {source}; nothing more can be stored until the hub restarts, which it does by itself once its data dir takes writes again"
            );
        }
        StoreError::Db {
            path: self.inner.path.clone(),
            source: Box::new(source),
        }
    }

    /// A decoding error for `key`.
    pub(crate) fn corrupt(&self, key: impl Into<String>, reason: impl ToString) -> StoreError {
        StoreError::Corrupt {
            path: self.inner.path.clone(),
            key: key.into(),
            reason: reason.to_string(),
        }
    }
}

/// Flushes on behalf of every waiter that arrived before the flush started.
async fn group_commit(
    db: fjall::Database,
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

/// One flush (the journal written and synced). A flush still running
/// while the file system is full or read-only is given up as failed rather
/// than waited for (sled, which earlier releases used, never returned from
/// such a flush; the check costs nothing where a flush returns).
async fn flush(db: &fjall::Database, dir: &Path) -> Result<(), String> {
    let db = db.clone();
    let mut task = tokio::task::spawn_blocking(move || db.persist(fjall::PersistMode::SyncAll));
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
pub(crate) fn now_ms() -> u64 {
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

    /// [`reopen`] for [`Store::open_data_dir`].
    pub(crate) async fn reopen_data_dir(data_dir: &Path) -> Store {
        for _ in 0..100 {
            if let Ok(s) = Store::open_data_dir(data_dir, DEFAULT_CACHE_BYTES) {
                return s;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        Store::open_data_dir(data_dir, DEFAULT_CACHE_BYTES).unwrap()
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

    /// Job ids jumped by millions after each restart (sled's default id
    /// interval); a restart now skips at most a few hundred, and a kill
    /// (no clean close) still never gives an id twice.
    #[tokio::test]
    async fn ids_skip_little_at_a_restart_and_are_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let mut last = 0;
        for _ in 0..3 {
            let store = reopen(dir.path()).await;
            let first = store.next_id().unwrap();
            assert!(first > last, "{first} after {last}");
            assert!(
                first - last <= 2 * ID_PERSIST_INTERVAL + 1,
                "{first} after {last}"
            );
            for _ in 0..250 {
                last = store.next_id().unwrap();
            }
            // Closed or killed alike: a start resumes at the reservation
            // written before any of its ids was handed out.
            drop(store);
        }
    }

    #[tokio::test]
    async fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .table(trees::META)
                .put_raw(SCHEMA_KEY, 99u32.to_be_bytes())
                .unwrap();
            store.commit().await.unwrap();
        }
        for _ in 0..100 {
            match Store::open(dir.path()) {
                Err(StoreError::Locked { .. }) => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) => {
                    let err = e.to_string();
                    assert!(err.contains("schema version 99"), "{err}");
                    return;
                }
                Ok(_) => panic!("a newer schema was opened"),
            }
        }
        panic!("the database stayed locked");
    }

    #[tokio::test]
    async fn a_second_process_on_the_same_database_is_told_so() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("in use by another process"), "{err}");
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
        assert_eq!(t.len().unwrap(), 200);
    }

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Rec {
        n: u32,
    }

    #[tokio::test]
    async fn a_table_reads_writes_scans_and_stages_typed_records() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let t = Table::open(&store, trees::RESULTS).unwrap();
        assert_eq!(t.get::<Rec>("a/1").unwrap(), None);
        t.put("a/1", &Rec { n: 1 }).unwrap();
        let mut batch = Batch::default();
        t.stage(&mut batch, "a/2", &Rec { n: 2 }).unwrap();
        t.stage(&mut batch, "b/1", &Rec { n: 3 }).unwrap();
        assert!(
            !t.contains("a/2").unwrap(),
            "a staged write waits for apply"
        );
        t.apply(batch).unwrap();
        store.commit().await.unwrap();
        let newest_first: Vec<u32> = t.scan::<Rec>("a/").rev().map(|r| r.unwrap().1.n).collect();
        assert_eq!(newest_first, [2, 1]);
        assert_eq!(t.keys("b/").count(), 1);
        t.remove("a/1").unwrap();
        assert!(!t.contains("a/1").unwrap());
        assert_eq!(id_key(42), "00000000000000000042");
    }

    #[tokio::test]
    async fn a_queue_scan_finds_keys_written_below_where_the_last_one_started() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let t = Table::open(&store, trees::JOBS).unwrap();
        let queued = |t: &Table| -> Vec<Vec<u8>> {
            t.queue_keys("f").map(|k| k.unwrap().to_vec()).collect()
        };
        for i in 0u8..10 {
            t.put_raw([b'f', i], []).unwrap();
        }
        for i in 0u8..8 {
            t.remove([b'f', i]).unwrap();
        }
        assert_eq!(queued(&t), [vec![b'f', 8], vec![b'f', 9]]);
        // Below the mark, through each way of writing, and through another
        // handle of the same tree.
        t.put_raw([b'f', 3], []).unwrap();
        assert_eq!(queued(&t)[0], [b'f', 3]);
        let other = Table::open(&store, trees::JOBS).unwrap();
        let mut batch = Batch::default();
        batch.insert([b'f', 1], []);
        other.apply(batch).unwrap();
        assert_eq!(queued(&t)[0], [b'f', 1]);
        let notify = Table::open(&store, trees::NOTIFY).unwrap();
        let mut batch = Batch::default();
        batch.insert([b'f', 0], []);
        notify.apply_with(Batch::default(), &other, batch).unwrap();
        assert_eq!(queued(&t).len(), 5);
        for k in queued(&t) {
            t.remove(k).unwrap();
        }
        assert!(queued(&t).is_empty());
        t.update(|_, batch: &mut Batch| {
            batch.insert([b'f', 2], []);
            Ok::<_, StoreError>(())
        })
        .unwrap();
        assert_eq!(queued(&t), [vec![b'f', 2]]);
        assert_eq!(
            t.queue_keys("f").count(),
            t.keys("f").count(),
            "the queue holds what a full scan finds"
        );
    }

    /// Writers put keys in from several threads (out of order, as jobs
    /// finish) while a reader takes the front off: every key is taken
    /// exactly once, none is left behind the reader's mark.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_queue_taken_off_while_written_loses_no_key() {
        const WRITERS: u64 = 4;
        const EACH: u64 = 2_000;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let t = Table::open(&store, trees::JOBS).unwrap();
        let key = |id: u64| [&[b'f'][..], &id.to_be_bytes()].concat();
        let done = Arc::new(AtomicBool::new(false));
        let taken = std::thread::scope(|scope| {
            let reader = scope.spawn(|| {
                let mut taken = Vec::new();
                loop {
                    let finished = done.load(Ordering::SeqCst);
                    let front: Vec<_> = t.queue_keys("f").take(50).map(|k| k.unwrap()).collect();
                    if front.is_empty() && finished {
                        return taken;
                    }
                    let mut batch = Batch::default();
                    for k in &front {
                        batch.remove(k);
                        taken.push(u64::from_be_bytes(k[1..].try_into().unwrap()));
                    }
                    t.apply(batch).unwrap();
                }
            });
            let writers: Vec<_> = (0..WRITERS)
                .map(|w| {
                    let t = &t;
                    scope.spawn(move || {
                        for i in 0..EACH {
                            t.put_raw(key(i * WRITERS + w), []).unwrap();
                        }
                    })
                })
                .collect();
            for w in writers {
                w.join().unwrap();
            }
            done.store(true, Ordering::SeqCst);
            reader.join().unwrap()
        });
        let mut sorted = taken.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), taken.len(), "a key was taken twice");
        assert_eq!(sorted, (0..WRITERS * EACH).collect::<Vec<_>>());
        assert_eq!(t.keys("f").count(), 0);
    }

    /// The pattern that made sled's files grow without bound (earlier
    /// releases): records written and removed again (log chunks) while a
    /// few stay for good (latest results, open reds) beside them. The files
    /// take room for the journal (up to its 64 MiB) and the trees' tables,
    /// but the second half of the load leaves them no larger than the first
    /// half did (sled's doubled).
    #[tokio::test]
    async fn the_files_stop_growing_under_churn_that_keeps_a_few_records() {
        const ROUNDS: u64 = 3000;
        const CHUNKS: u64 = 8;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let chunks = Table::open(&store, trees::LOGS).unwrap();
        let kept = Table::open(&store, trees::RESULTS).unwrap();
        // Bytes that do not compress, as logs' chunks rarely do much.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut noise = || {
            (0..8 * 1024 / 8)
                .flat_map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x.to_le_bytes()
                })
                .collect::<Vec<u8>>()
        };
        let mut sizes = Vec::new();
        for round in 0..ROUNDS {
            for c in 0..CHUNKS {
                chunks
                    .put_raw([round.to_be_bytes(), c.to_be_bytes()].concat(), noise())
                    .unwrap();
            }
            let mut batch = Batch::default();
            for c in 0..CHUNKS {
                batch.remove([round.to_be_bytes(), c.to_be_bytes()].concat());
            }
            chunks.apply(batch).unwrap();
            kept.put_raw(format!("rl/{round:08}"), b"latest").unwrap();
            if round % 8 == 7 {
                store.commit().await.unwrap();
            }
            if (round + 1) % (ROUNDS / 6) == 0 {
                sizes.push(crate::space::dir_size(dir.path()));
            }
        }
        let mib = |b: &u64| b / (1024 * 1024);
        let sizes_mib: Vec<u64> = sizes.iter().map(mib).collect();
        let first_half = sizes[..3].iter().max().unwrap();
        let second_half = sizes[3..].iter().max().unwrap();
        assert!(
            // A quarter's slack for where in its cycle the journal is.
            *second_half <= first_half + first_half / 4,
            "the files grew from {} to {} MiB (MiB at each sixth of {} MiB written: {sizes_mib:?})",
            mib(first_half),
            mib(second_half),
            ROUNDS * CHUNKS * 8 / 1024
        );
        assert_eq!(kept.keys("rl/").count() as u64, ROUNDS);
        assert_eq!(chunks.keys("").count(), 0);
    }

    /// The engine panics on an empty key or one over 64 KiB: a read of one
    /// (a token id of 70 KB in a request) finds nothing, a write is refused
    /// with an error naming the tree, and the database goes on.
    #[tokio::test]
    async fn a_key_the_engine_cannot_hold_is_absent_or_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let t = Table::open(&store, trees::AUTH).unwrap();
        let long = vec![b't'; MAX_KEY_BYTES + 1];
        for key in [&long[..], b""] {
            assert_eq!(t.get::<Rec>(key).unwrap(), None);
            assert!(!t.contains(key).unwrap());
            let err = t.put(key, &Rec { n: 1 }).unwrap_err().to_string();
            let says = format!("a key of {} bytes cannot be stored in auth", key.len());
            assert!(err.contains(&says), "{err}");
            assert!(t.remove(key).is_err());
            let mut batch = Batch::default();
            batch.insert("fine", b"1");
            batch.insert(key, b"1");
            assert!(t.apply(batch).is_err());
            assert!(!t.contains("fine").unwrap(), "a batch is refused whole");
        }
        assert_eq!(t.scan_raw(&long).count(), 0);
        assert_eq!(t.range(long.clone()..).count(), 0);
        t.put(vec![b'k'; MAX_KEY_BYTES], &Rec { n: 2 }).unwrap();
        store.commit().await.unwrap();
        assert_eq!(t.scan_raw("").count(), 1);
        assert_eq!(t.range(long..).count(), 0);
    }

    #[tokio::test]
    async fn a_scan_from_a_key_stays_within_its_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let t = Table::open(&store, trees::LOGS).unwrap();
        for k in [
            &[1u8, 0xff, 1][..],
            &[1, 0xff, 2],
            &[2, 0],
            &[0xff, 0xff, 3],
        ] {
            t.put_raw(k, b"").unwrap();
        }
        let keys = |prefix: &[u8], from: &[u8]| -> Vec<Vec<u8>> {
            t.scan_raw_from(prefix, from)
                .map(|item| item.unwrap().0.to_vec())
                .collect()
        };
        assert_eq!(keys(&[1, 0xff], &[1, 0xff, 2]), [vec![1, 0xff, 2]]);
        assert_eq!(keys(&[1], &[0]), [vec![1, 0xff, 1], vec![1, 0xff, 2]]);
        assert_eq!(keys(&[0xff, 0xff], &[0xff]), [vec![0xff, 0xff, 3]]);
        assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff]), None);
    }

    #[tokio::test]
    async fn an_unreadable_record_names_its_tree_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let t = Table::open(&store, trees::NOTIFY).unwrap();
        t.put_raw("m/7", &b"{not json"[..]).unwrap();
        let err = t.get::<Rec>("m/7").unwrap_err().to_string();
        assert!(err.contains("record notify/m/7 is unreadable"), "{err}");
        let err = t.scan::<Rec>("m/").next().unwrap().unwrap_err().to_string();
        assert!(err.contains("notify/m/7"), "{err}");
    }

    #[tokio::test]
    async fn updates_from_many_threads_lose_no_change_and_a_refused_one_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let t = Table::open(&store, trees::AUTH).unwrap();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let t = t.clone();
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        t.update(|t, batch| {
                            let n = t.get::<Rec>("n").unwrap().map_or(0, |r| r.n);
                            std::thread::yield_now();
                            t.stage(batch, "n", &Rec { n: n + 1 })
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(t.get::<Rec>("n").unwrap(), Some(Rec { n: 800 }));
        let refused: Result<(), StoreError> = t.update(|t, batch| {
            t.stage(batch, "n", &Rec { n: 0 })?;
            Err(t.corrupt("n", "refused"))
        });
        assert!(refused.is_err());
        assert_eq!(t.get::<Rec>("n").unwrap(), Some(Rec { n: 800 }));
    }

    #[tokio::test]
    async fn two_tables_change_together_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let results = Table::open(&store, trees::RESULTS).unwrap();
        let notify = Table::open(&store, trees::NOTIFY).unwrap();
        let mut mine = Batch::default();
        results.stage(&mut mine, "t/1", &Rec { n: 1 }).unwrap();
        let mut theirs = Batch::default();
        notify.stage(&mut theirs, "m/1", &Rec { n: 2 }).unwrap();
        results.apply_with(mine, &notify, theirs).unwrap();
        assert_eq!(results.get::<Rec>("t/1").unwrap(), Some(Rec { n: 1 }));
        assert_eq!(notify.get::<Rec>("m/1").unwrap(), Some(Rec { n: 2 }));
    }
}
