//! Job logs: stored per (job, attempt, seq) in the `logs` tree while a job
//! runs, fanned out live to whoever watches a job (`trunkfarm job run`, the
//! dashboard), and compacted into one object per attempt once the job's
//! result is recorded ([`compact`]).
//!
//! A job's log as the agent produced it (up to the agent's output cap, and
//! the hub's own `max_log_size`) is stored exactly once, whatever is killed
//! or dropped:
//!
//! - Chunks are written without waiting for the disk (a log line must not
//!   cost an fsync). They become durable with the next commit, at the latest
//!   the one that records the attempt's result: the hub stores the chunks
//!   that precede a result on its stream before it records the result, and
//!   the database persists writes in order (one journal for every tree,
//!   replayed as a prefix after a crash).
//! - A chunk can still be lost: in flight when the agent's link drops, or
//!   stored but not yet committed when the hub is killed. The agent therefore
//!   keeps every chunk of an attempt until the hub acknowledges the attempt's
//!   result, and after every reconnect sends them all again, in seq order,
//!   before the result (`volunteer-agent/src/outbox.rs`).
//! - So the same chunk may arrive more than once: storing is idempotent per
//!   (job, attempt, seq), and so is the byte accounting toward the per-attempt
//!   cap and the fan-out to live watchers. A chunk already stored is ignored.
//!   After a restart an attempt's accounting is rebuilt from the tree the
//!   first time one of its chunks arrives.
//! - When a result arrives, [`JobLogs::gap`] compares its `last_log_seq` with
//!   what is stored; a gap is only warned about (the result still counts).
//! - Once an attempt is compacted (or while it is being compacted) it is
//!   *sealed*: a chunk arriving for it is a resend of one already stored
//!   (the agent sends every chunk before the result, and the result was
//!   recorded), and is ignored.
//!
//! Readers ([`JobLogs::size`], [`JobLogs::range`], [`JobLogs::read`]) see
//! one log whichever form it has: they walk the chunks, then look for the
//! attempt's [`Compacted`] record, and the record wins (it is written in the
//! same atomic step that removes the chunks, so a walk that raced with a
//! compaction is noticed and redone from the object). A compacted log is
//! read paged: only the zstd frames covering the asked range are fetched
//! and decompressed.

mod compact;

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use trunkfarm_proto::v1::{JobRef, LogChunk, LogStream};

use crate::objects::{Objects, ObjectsError};
use crate::store::{Store, StoreError, Table, trees};

pub(crate) use compact::Compactor;

/// Live events for one job's watchers.
#[derive(Clone, Debug)]
pub(crate) enum WatchEvent {
    /// A chunk was stored.
    Log(LogChunk),
    /// The job finished; read its final record.
    Finished,
}

/// A byte range of one attempt's log ([`JobLogs::range`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct LogRange {
    /// Where `data` starts in the log.
    pub(crate) offset: u64,
    /// The bytes (fewer than asked at the end of the log).
    pub(crate) data: Vec<u8>,
    /// Where the next range starts (`offset + data.len()`).
    pub(crate) next_offset: u64,
    /// The log's size now.
    pub(crate) total: u64,
}

/// Errors reading or compacting logs.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LogsError {
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The object store failed (unreachable, access denied, …): the log is
    /// still there, try again later.
    #[error(transparent)]
    Objects(#[from] ObjectsError),
    /// The object store did not answer in time (a sync reader gave up).
    #[error("the object store did not answer within {0:?}; the log is read again on the next try")]
    Slow(std::time::Duration),
    /// Compressing or decompressing failed, or no runtime could be started
    /// to wait for the object store.
    #[error("cannot compress or read a log: {0}")]
    Io(#[source] std::io::Error),
    /// A compacted log's object does not match its record.
    #[error(
        "the compacted log {path} does not match its record ({reason}); it was changed or truncated in the object store"
    )]
    Damaged {
        /// The object's path.
        path: String,
        /// What does not match.
        reason: String,
    },
}

impl LogsError {
    /// Whether reading again cannot help: the log's object is gone (deleted,
    /// expired by a lifecycle rule, or the hub now points at another store)
    /// or does not match its record. Other errors (the store unreachable or
    /// slow) may pass.
    pub(crate) fn is_permanent(&self) -> bool {
        match self {
            LogsError::Damaged { .. } => true,
            LogsError::Objects(e) => e.is_not_found(),
            _ => false,
        }
    }
}

/// What web pages and mails say of a log that cannot be read: the why
/// (paths, buckets, the store's own words) is for the hub's operator only.
pub(crate) const UNREADABLE: &str =
    "the log cannot be read right now; the hub's operator sees why in its log";

/// How many jobs [`JobLogs::unreadable`] remembers having told about.
const TOLD_JOBS: usize = 10_000;

/// How long [`JobLogs::read_blocking`] waits for the object store.
const BLOCKING_READ_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

/// How many live events a slow watcher may lag behind before it re-reads
/// from the store.
const WATCH_BUFFER_EVENTS: usize = 256;

/// What is stored of one attempt's log: the cap's accounting and what
/// [`JobLogs::gap`] compares with a result.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct AttemptLog {
    /// Log bytes stored (a chunk's data, plus the cap notice if any).
    bytes: u64,
    /// Chunks stored.
    chunks: u64,
    /// The highest seq stored (0 if none).
    max_seq: u64,
    /// Compacted, or being compacted: chunks arriving now are resends.
    sealed: bool,
}

/// The record of an attempt's compacted log (tree `log_objects`): where
/// the object is and how to read a range of it without the rest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Compacted {
    /// The object's path under the hub's prefix
    /// (`logs/<job>/<attempt>.log.zst`).
    pub(crate) object: String,
    /// The log's size, uncompressed.
    pub(crate) size: u64,
    /// The object's size.
    pub(crate) stored: u64,
    /// Chunks the log was made of, and the highest seq among them
    /// ([`JobLogs::gap`] after a restart).
    pub(crate) chunks: u64,
    /// See `chunks`.
    pub(crate) max_seq: u64,
    /// The independent zstd frames, in order: frame `i` holds the log's
    /// bytes from `frames[i].raw` to the next frame's (or `size`).
    pub(crate) frames: Vec<Frame>,
    /// Where in the object the stream map is: one zstd frame after the
    /// log's, of `raw` runs of 9 bytes (where the run starts in the log,
    /// u64 little-endian, and its [`LogStream`] byte), one per change of
    /// stream (stdout, stderr, the agent's own lines).
    pub(crate) streams: Frame,
}

/// One zstd frame of a compacted log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Frame {
    /// Where its bytes start in the log.
    pub(crate) raw: u64,
    /// Where it starts in the object.
    pub(crate) at: u64,
    /// Its compressed length.
    pub(crate) len: u64,
}

/// Owner of the `logs` and `log_objects` trees, of the compacted logs'
/// objects (`logs/` in the object store) and of the live watchers.
pub(crate) struct JobLogs {
    /// Binary keys ([`key`]) and values (stream byte + data), not JSON: read
    /// and written raw.
    table: Table,
    /// (job id8, attempt u32) → [`Compacted`].
    records: Table,
    objects: Objects,
    /// Logs smaller than this stay in the database (`storage.compact_logs_from`;
    /// 0: every log is compacted).
    compact_from: u64,
    /// Log bytes the hub keeps per attempt; beyond it chunks are dropped
    /// (agents cap their own output well below; this guards the hub).
    max_bytes: u64,
    live: Mutex<HashMap<u64, broadcast::Sender<WatchEvent>>>,
    /// Per (job, attempt) touched since the hub started, until the job
    /// finishes. Held while a chunk is checked and stored, so two copies of
    /// one chunk (an old session still draining, a new one resending) are
    /// stored and counted once.
    attempts: Mutex<HashMap<(u64, u32), AttemptLog>>,
    /// Jobs whose log someone is streaming chunk by chunk
    /// ([`JobLogs::pin`]): their compaction waits, so that a watcher never
    /// sees one attempt both as stored chunks and as its compacted pages.
    /// Also held while a compaction writes its record.
    pinned: Mutex<HashMap<u64, usize>>,
    /// Jobs whose unreadable log was told to the hub's log already
    /// ([`JobLogs::unreadable`]); forgotten past [`TOLD_JOBS`].
    told: Mutex<std::collections::HashSet<u64>>,
    /// Jobs whose result was recorded, for the compactor.
    queue: compact::Queue,
    /// Attempts compacted, and compactions that failed, since the hub
    /// started (`/metrics`).
    compacted_total: std::sync::atomic::AtomicU64,
    /// See `compacted_total`.
    compaction_failures_total: std::sync::atomic::AtomicU64,
    /// Walks of an attempt's chunks ([`JobLogs::range`], [`JobLogs::size`]):
    /// tests count what one request reads.
    #[cfg(test)]
    pub(crate) walks: std::sync::atomic::AtomicUsize,
}

fn key(job_id: u64, attempt: u32, seq: u64) -> [u8; 20] {
    let mut k = [0u8; 20];
    k[..8].copy_from_slice(&job_id.to_be_bytes());
    k[8..12].copy_from_slice(&attempt.to_be_bytes());
    k[12..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// The seq of a 20-byte key.
fn seq_of(k: &[u8]) -> u64 {
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&k[12..20]);
    u64::from_be_bytes(seq)
}

/// The (job, attempt) of a key of either tree (at least 12 bytes).
fn job_attempt_of(k: &[u8]) -> (u64, u32) {
    let mut id = [0u8; 8];
    id.copy_from_slice(&k[..8]);
    (
        u64::from_be_bytes(id),
        u32::from_be_bytes([k[8], k[9], k[10], k[11]]),
    )
}

/// The object path (relative to the hub's prefix) of an attempt's
/// compacted log.
pub(crate) fn object_name(job_id: u64, attempt: u32) -> String {
    format!("logs/{job_id}/{attempt}.log.zst")
}

/// `data` (the log's bytes from `from` on) as chunks, one per stretch of
/// one stream of the stream map `runs`, numbered on from `seq`.
fn cut_chunks(
    job_id: u64,
    attempt: u32,
    runs: &[(u64, i32)],
    from: u64,
    data: &[u8],
    seq: &mut u64,
) -> Vec<LogChunk> {
    let end = from + data.len() as u64;
    let mut out = Vec::new();
    let mut at = from;
    while at < end {
        let i = runs.partition_point(|r| r.0 <= at);
        let stream = match i {
            0 => LogStream::Stdout as i32,
            i => runs[i - 1].1,
        };
        let stop = runs.get(i).map_or(end, |r| r.0.min(end));
        *seq += 1;
        out.push(LogChunk {
            job: Some(JobRef { job_id, attempt }),
            seq: *seq,
            stream,
            data: data[(at - from) as usize..(stop - from) as usize].to_vec(),
        });
        at = stop;
    }
    out
}

/// Waits on this thread for `read`, at most `limit` (then
/// [`LogsError::Slow`]), from sync code on any thread: on a multi-threaded
/// runtime (the hub's) the runtime moves its other tasks off this thread
/// meanwhile. A single-threaded runtime (tests) cannot drive its timers or
/// sockets while its thread waits here, so the read then runs on a runtime
/// of its own on another thread (never `Handle::block_on` of the waiting
/// runtime: its timer, and so the limit, would never fire).
fn block_on_bounded<T: Send>(
    read: impl std::future::Future<Output = Result<T, LogsError>> + Send,
    limit: std::time::Duration,
) -> Result<T, LogsError> {
    use tokio::runtime::{Handle, RuntimeFlavor};
    let bounded = async {
        tokio::time::timeout(limit, read)
            .await
            .unwrap_or(Err(LogsError::Slow(limit)))
    };
    let own_runtime = |bounded| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(LogsError::Io)?
            .block_on(bounded)
    };
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| h.block_on(bounded))
        }
        Ok(_) => std::thread::scope(|s| {
            s.spawn(|| own_runtime(bounded))
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        }),
        Err(_) => own_runtime(bounded),
    }
}

/// At most this many missing ranges are named in a gap's description.
const GAP_RANGES_SHOWN: usize = 5;

/// A hold on a job's compaction ([`JobLogs::pin`]); released on drop.
pub(crate) struct LogPin<'a> {
    logs: &'a JobLogs,
    job_id: u64,
}

impl Drop for LogPin<'_> {
    fn drop(&mut self) {
        let mut pinned = self.logs.pinned.lock().unwrap_or_else(|p| p.into_inner());
        if let Entry::Occupied(mut e) = pinned.entry(self.job_id) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }
}

/// A walk over the jobs with a log ([`JobLogs::jobs_with_logs`]). Each
/// tree's next job is looked up again only once the walk is past it: the
/// stored chunks of finished jobs are removed as their logs are compacted,
/// and the database keeps removed keys (as tombstones, until it compacts)
/// that a lookup from every job would walk again and again.
pub(crate) struct JobsWithLogs<'a> {
    logs: &'a JobLogs,
    /// Per tree (chunks, compacted records): the first job with a key at
    /// or after where it was last looked up, `Some(None)` for none.
    ahead: [Option<Option<u64>>; 2],
}

impl JobsWithLogs<'_> {
    /// The first job at or after `from` with a log. Keys written since a
    /// tree was last looked up, before its next job, are not seen (a walk
    /// is one pass: the next one sees them).
    pub(crate) fn next_from(&mut self, from: u64) -> Result<Option<u64>, StoreError> {
        let start = key(from, 0, 0);
        let mut first: Option<u64> = None;
        for (i, table) in [&self.logs.table, &self.logs.records]
            .into_iter()
            .enumerate()
        {
            let stale = match self.ahead[i] {
                None => true,
                Some(None) => false,
                Some(Some(job)) => job < from,
            };
            if stale {
                let next = match table.range(&start[..12]..).next() {
                    None => None,
                    Some(item) => {
                        let (k, _) = item?;
                        if k.len() < 12 {
                            return Err(table.corrupt(hex::encode(&k), "malformed log key"));
                        }
                        Some(job_attempt_of(&k).0)
                    }
                };
                self.ahead[i] = Some(next);
            }
            if let Some(Some(job)) = self.ahead[i] {
                first = Some(first.map_or(job, |f| f.min(job)));
            }
        }
        Ok(first)
    }
}

impl JobLogs {
    /// Opens the `logs` and `log_objects` trees; compacted logs go to
    /// `objects`.
    pub(crate) fn open(
        store: &Store,
        max_bytes: u64,
        objects: Objects,
    ) -> Result<JobLogs, StoreError> {
        Ok(JobLogs {
            table: Table::open(store, trees::LOGS)?,
            records: Table::open(store, trees::LOG_OBJECTS)?,
            objects,
            compact_from: 0,
            max_bytes,
            live: Mutex::new(HashMap::new()),
            attempts: Mutex::new(HashMap::new()),
            pinned: Mutex::new(HashMap::new()),
            told: Mutex::new(Default::default()),
            queue: compact::Queue::default(),
            compacted_total: Default::default(),
            compaction_failures_total: Default::default(),
            #[cfg(test)]
            walks: Default::default(),
        })
    }

    /// Logs smaller than `bytes` are not compacted: they stay in the
    /// database (an object per tiny log would cost a request each and save
    /// nothing) and go with their job when retention prunes it.
    pub(crate) fn with_compact_from(mut self, bytes: u64) -> JobLogs {
        self.compact_from = bytes;
        self
    }

    /// A `JobLogs` whose objects live in a local store next to the
    /// database (tests of other modules).
    #[cfg(test)]
    pub(crate) fn open_local(store: &Store, max_bytes: u64) -> Result<JobLogs, StoreError> {
        let dir = store.dir().join("test-objects");
        let objects = Objects::local(&dir).expect("a local object store for tests");
        JobLogs::open(store, max_bytes, objects)
    }

    /// A log of job `job_id` could not be read for `what` (e.g. "its
    /// page"): says why in the hub's log, once per job (not once per page
    /// view), and returns [`UNREADABLE`], what the public is shown.
    pub(crate) fn unreadable(&self, job_id: u64, what: &str, e: &LogsError) -> &'static str {
        let first = {
            let mut told = self.told.lock().unwrap_or_else(|p| p.into_inner());
            if told.len() >= TOLD_JOBS {
                told.clear();
            }
            told.insert(job_id)
        };
        if first {
            tracing::warn!(
                job = job_id,
                "the log of job {job_id} cannot be read for {what}: {e}"
            );
        } else {
            tracing::debug!(
                job = job_id,
                "the log of job {job_id} cannot be read for {what}: {e}"
            );
        }
        UNREADABLE
    }

    /// Refuses an entry that is not a 20-byte key with a stream byte.
    fn check(&self, k: &[u8], v: &[u8]) -> Result<(), StoreError> {
        if k.len() != 20 || v.is_empty() {
            return Err(self
                .table
                .corrupt(hex::encode(k), "malformed log key or value"));
        }
        Ok(())
    }

    /// The prefix of an attempt's keys (and the key of its record).
    fn attempt_prefix(job_id: u64, attempt: u32) -> [u8; 12] {
        let mut p = [0u8; 12];
        p.copy_from_slice(&key(job_id, attempt, 0)[..12]);
        p
    }

    /// The record of an attempt's compacted log, if it is compacted.
    pub(crate) fn compacted(
        &self,
        job_id: u64,
        attempt: u32,
    ) -> Result<Option<Compacted>, StoreError> {
        self.records.get(Self::attempt_prefix(job_id, attempt))
    }

    /// What is stored of an attempt (after a restart, or for an attempt
    /// not touched yet): its record's counts once compacted.
    fn scan_attempt(&self, job_id: u64, attempt: u32) -> Result<AttemptLog, StoreError> {
        let mut log = AttemptLog::default();
        for item in self.table.scan_raw(Self::attempt_prefix(job_id, attempt)) {
            let (k, v) = item?;
            self.check(&k, &v)?;
            log.bytes = log.bytes.saturating_add(v.len() as u64 - 1);
            log.chunks += 1;
            log.max_seq = log.max_seq.max(seq_of(&k));
        }
        if let Some(c) = self.compacted(job_id, attempt)? {
            return Ok(AttemptLog {
                bytes: c.size,
                chunks: c.chunks,
                max_seq: c.max_seq,
                sealed: true,
            });
        }
        Ok(log)
    }

    /// Stores a chunk and shows it to live watchers, once per (job,
    /// attempt, seq): a chunk already stored (an agent resending what the
    /// hub may have lost) is neither stored, counted toward the cap, nor
    /// shown again. Chunks past the per-attempt cap are dropped; the one
    /// that crosses it is stored with a notice. Chunks of a compacted
    /// attempt are resends, and dropped.
    pub(crate) fn append(&self, chunk: LogChunk) -> Result<(), StoreError> {
        let Some(job) = chunk.job else {
            return Ok(());
        };
        let k = key(job.job_id, job.attempt, chunk.seq);
        {
            let mut attempts = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
            let log = match attempts.entry((job.job_id, job.attempt)) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => {
                    let scanned = self.scan_attempt(job.job_id, job.attempt)?;
                    if scanned.sealed {
                        // Not kept: compacted attempts are not tracked.
                        return Ok(());
                    }
                    e.insert(scanned)
                }
            };
            if log.sealed || log.bytes >= self.max_bytes {
                return Ok(());
            }
            if self.table.contains(k)? {
                return Ok(());
            }
            let len = chunk.data.len() as u64;
            let over_cap = log.bytes.saturating_add(len) > self.max_bytes;
            let mut value = Vec::with_capacity(chunk.data.len() + 1);
            value.push(chunk.stream as u8);
            value.extend_from_slice(&chunk.data);
            if over_cap {
                value.extend_from_slice(
                    format!(
                        "\n[trunkfarm hub: log reached the hub's limit of {} bytes; the rest is dropped]\n",
                        self.max_bytes
                    )
                    .as_bytes(),
                );
            }
            let stored = value.len() as u64 - 1;
            self.table.put_raw(k, value)?;
            log.bytes = log.bytes.saturating_add(stored);
            log.chunks += 1;
            log.max_seq = log.max_seq.max(chunk.seq);
        }
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = live.get(&job.job_id) {
            let _ = tx.send(WatchEvent::Log(chunk));
        }
        Ok(())
    }

    /// Compares what is stored of `job`'s log with the `last_log_seq` its
    /// result reports (the agent numbers an attempt's chunks 1, 2, …).
    /// `Some` describes what is missing; `None` if nothing is, if the
    /// result names no last chunk (0: a refusal, a job whose task died), if
    /// the hub's own cap dropped the rest (that gap is expected and noted
    /// in the log itself), or if the log is compacted already (a result
    /// resent after its log was compacted: it was compared the first time).
    pub(crate) fn gap(
        &self,
        job: &JobRef,
        last_log_seq: u64,
    ) -> Result<Option<String>, StoreError> {
        let log = {
            let mut attempts = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
            match attempts.entry((job.job_id, job.attempt)) {
                Entry::Occupied(e) => *e.get(),
                Entry::Vacant(e) => {
                    let scanned = self.scan_attempt(job.job_id, job.attempt)?;
                    if scanned.sealed {
                        scanned
                    } else {
                        *e.insert(scanned)
                    }
                }
            }
        };
        if last_log_seq == 0
            || log.sealed
            || log.bytes >= self.max_bytes
            || (log.chunks == last_log_seq && log.max_seq <= last_log_seq)
        {
            return Ok(None);
        }
        // Rare: name the missing seqs.
        let mut missing: Vec<(u64, u64)> = Vec::new();
        let mut next = 1u64;
        let mut beyond = 0u64;
        for k in self
            .table
            .keys(Self::attempt_prefix(job.job_id, job.attempt))
        {
            let k = k?;
            if k.len() != 20 {
                return Err(self.table.corrupt(hex::encode(&k), "malformed log key"));
            }
            let seq = seq_of(&k);
            if seq > last_log_seq {
                beyond += 1;
                continue;
            }
            if seq > next {
                missing.push((next, seq - 1));
            }
            next = next.max(seq + 1);
        }
        if next <= last_log_seq {
            missing.push((next, last_log_seq));
        }
        let count: u64 = missing.iter().map(|(a, b)| b - a + 1).sum();
        let mut parts: Vec<String> = Vec::new();
        if count > 0 {
            let mut ranges: Vec<String> = missing
                .iter()
                .take(GAP_RANGES_SHOWN)
                .map(|&(a, b)| {
                    if a == b {
                        a.to_string()
                    } else {
                        format!("{a}..={b}")
                    }
                })
                .collect();
            if missing.len() > GAP_RANGES_SHOWN {
                ranges.push("…".to_owned());
            }
            parts.push(format!(
                "{count} of its {last_log_seq} log chunk(s) are missing (seq {})",
                ranges.join(", ")
            ));
        }
        if beyond > 0 {
            parts.push(format!(
                "{beyond} stored chunk(s) have a seq past the result's last_log_seq {last_log_seq}"
            ));
        }
        Ok((!parts.is_empty()).then(|| parts.join("; ")))
    }

    /// The attempts of a job that have a log (stored chunks or a compacted
    /// record), in order.
    pub(crate) fn attempts(&self, job_id: u64) -> Result<Vec<u32>, StoreError> {
        let mut out = Vec::new();
        for table in [&self.table, &self.records] {
            let mut from = key(job_id, 0, 0)[..12].to_vec();
            loop {
                // Within the job's keys: past them the database may keep
                // many removed keys to walk.
                let next = table.scan_raw_from(job_id.to_be_bytes(), &from).next();
                let Some(item) = next else { break };
                let (k, _) = item?;
                if !k.starts_with(&job_id.to_be_bytes()) {
                    break;
                }
                if k.len() < 12 {
                    return Err(table.corrupt(hex::encode(&k), "malformed log key"));
                }
                let (_, attempt) = job_attempt_of(&k);
                out.push(attempt);
                match attempt.checked_add(1) {
                    Some(a) => from = key(job_id, a, 0)[..12].to_vec(),
                    None => break,
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// Stored chunks of one attempt, in order, as stored (`None`: it has
    /// none, or it is compacted).
    fn stored_chunks(&self, job_id: u64, attempt: u32) -> Result<Vec<LogChunk>, StoreError> {
        let mut out = Vec::new();
        for item in self.table.scan_raw(Self::attempt_prefix(job_id, attempt)) {
            let (k, v) = item?;
            self.check(&k, &v)?;
            out.push(LogChunk {
                job: Some(JobRef { job_id, attempt }),
                seq: seq_of(&k),
                stream: LogStream::try_from(i32::from(v[0]))
                    .unwrap_or(LogStream::Unspecified)
                    .into(),
                data: v[1..].to_vec(),
            });
        }
        Ok(out)
    }

    /// One attempt's log, in order: its stored chunks, or, once compacted,
    /// its frames cut where the stream changes (as [`JobLogs::frame_chunks`]
    /// cuts them). Reads it whole, in two ranged GETs (the stream map, then
    /// every frame at once: a slow store costs one round trip, not one per
    /// frame): for logs bounded by the output caps (mails, the pipeline's
    /// patterns); [`JobLogs::range`] reads a part.
    pub(crate) async fn read_attempt(
        &self,
        job_id: u64,
        attempt: u32,
    ) -> Result<Vec<LogChunk>, LogsError> {
        let chunks = self.stored_chunks(job_id, attempt)?;
        let Some(rec) = self.compacted(job_id, attempt)? else {
            return Ok(chunks);
        };
        let runs = self.stream_runs(&rec).await?;
        let data = compact::read_range(&self.objects, &rec, 0, rec.size).await?;
        let mut out = Vec::new();
        let mut seq = 0;
        for (i, f) in rec.frames.iter().enumerate() {
            let end = rec.frames.get(i + 1).map_or(rec.size, |n| n.raw);
            let part = &data[f.raw as usize..end as usize];
            out.extend(cut_chunks(job_id, attempt, &runs, f.raw, part, &mut seq));
        }
        Ok(out)
    }

    /// The stream map of a compacted log (see [`Compacted::streams`]).
    pub(crate) async fn stream_runs(&self, rec: &Compacted) -> Result<Vec<(u64, i32)>, LogsError> {
        compact::stream_runs(&self.objects, rec).await
    }

    /// Frame `frame` of a compacted attempt's log as chunks, one per
    /// stretch of one stream, numbered on from `seq` (a replay that starts
    /// at frame 0 with `seq` 0 numbers every chunk the same each time).
    /// `None` past the last frame. Fetches and decompresses that frame only.
    pub(crate) async fn frame_chunks(
        &self,
        job_id: u64,
        attempt: u32,
        rec: &Compacted,
        runs: &[(u64, i32)],
        frame: usize,
        seq: &mut u64,
    ) -> Result<Option<Vec<LogChunk>>, LogsError> {
        let Some(f) = rec.frames.get(frame) else {
            return Ok(None);
        };
        let end = rec.frames.get(frame + 1).map_or(rec.size, |n| n.raw);
        let data = compact::read_range(&self.objects, rec, f.raw, end - f.raw).await?;
        Ok(Some(cut_chunks(job_id, attempt, runs, f.raw, &data, seq)))
    }

    /// A job's log, in order; only `attempt` if given (see
    /// [`JobLogs::read_attempt`]).
    pub(crate) async fn read(
        &self,
        job_id: u64,
        attempt: Option<u32>,
    ) -> Result<Vec<LogChunk>, LogsError> {
        let attempts = match attempt {
            Some(a) => vec![a],
            None => self.attempts(job_id)?,
        };
        let mut out = Vec::new();
        for a in attempts {
            out.extend(self.read_attempt(job_id, a).await?);
        }
        Ok(out)
    }

    /// [`JobLogs::read`] for code that cannot wait (the pipeline's and the
    /// mails' sync paths): blocks this thread until the object store
    /// answers, at most [`BLOCKING_READ_LIMIT`] (its callers may hold a
    /// lock: a mail then quotes that the log cannot be read, the pipeline
    /// takes the job in later); see [`block_on_bounded`].
    pub(crate) fn read_blocking(
        &self,
        job_id: u64,
        attempt: Option<u32>,
    ) -> Result<Vec<LogChunk>, LogsError> {
        self.read_blocking_within(job_id, attempt, BLOCKING_READ_LIMIT)
    }

    /// [`JobLogs::read_blocking`], waiting for the object store at most
    /// `limit`.
    pub(crate) fn read_blocking_within(
        &self,
        job_id: u64,
        attempt: Option<u32>,
        limit: std::time::Duration,
    ) -> Result<Vec<LogChunk>, LogsError> {
        // Nothing compacted: no object store involved, no need to block.
        let attempts = match attempt {
            Some(a) => vec![a],
            None => self.attempts(job_id)?,
        };
        let mut compacted = false;
        for &a in &attempts {
            compacted |= self.compacted(job_id, a)?.is_some();
        }
        if !compacted {
            let mut out = Vec::new();
            for &a in &attempts {
                out.extend(self.stored_chunks(job_id, a)?);
            }
            // A compaction may have raced with this walk: read again.
            let mut raced = false;
            for &a in &attempts {
                raced |= self.compacted(job_id, a)?.is_some();
            }
            if !raced {
                return Ok(out);
            }
        }
        block_on_bounded(self.read(job_id, attempt), limit)
    }

    /// Bytes `offset..offset + limit` of one attempt's log (its chunks'
    /// data in seq order, as [`JobLogs::read`] would concatenate them) and
    /// the log's total size; `offset` `None`: the last `limit` bytes of
    /// the log's `size`, measured here unless the caller did already (a
    /// request that measured it once passes it on rather than walking the
    /// chunks again).
    ///
    /// Only the chunks that overlap the range are copied: the others are
    /// only measured (the database hands out shared views of stored values), so a
    /// page of a 100 MB log costs its own size, not the log's. Of a
    /// compacted log only the frames that overlap the range are fetched
    /// and decompressed.
    pub(crate) async fn range(
        &self,
        job_id: u64,
        attempt: u32,
        offset: Option<u64>,
        limit: u64,
        size: Option<u64>,
    ) -> Result<LogRange, LogsError> {
        if let Some(rec) = self.compacted(job_id, attempt)? {
            return compacted_range(&self.objects, &rec, offset, limit).await;
        }
        let walked = self.chunks_range(job_id, attempt, offset, limit, size)?;
        // The chunks may have gone into an object during the walk.
        match self.compacted(job_id, attempt)? {
            Some(rec) => compacted_range(&self.objects, &rec, offset, limit).await,
            None => Ok(walked),
        }
    }

    /// [`JobLogs::range`] over the stored chunks.
    fn chunks_range(
        &self,
        job_id: u64,
        attempt: u32,
        offset: Option<u64>,
        limit: u64,
        size: Option<u64>,
    ) -> Result<LogRange, StoreError> {
        let prefix = Self::attempt_prefix(job_id, attempt);
        let offset = match (offset, size) {
            (Some(o), _) => o,
            (None, Some(size)) => size.saturating_sub(limit),
            (None, None) => self.chunks_size(job_id, attempt)?.saturating_sub(limit),
        };
        #[cfg(test)]
        self.walks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let end = offset.saturating_add(limit);
        let mut data = Vec::new();
        let mut pos = 0u64;
        for item in self.table.scan_raw(prefix) {
            let (k, v) = item?;
            self.check(&k, &v)?;
            let chunk = &v[1..];
            let (start, stop) = (pos, pos + chunk.len() as u64);
            if stop > offset && start < end {
                let from = offset.saturating_sub(start) as usize;
                let to = (end.min(stop) - start) as usize;
                data.extend_from_slice(&chunk[from..to]);
            }
            pos = stop;
        }
        let offset = offset.min(pos);
        Ok(LogRange {
            offset,
            next_offset: offset + data.len() as u64,
            data,
            total: pos,
        })
    }

    /// The size of one attempt's log, in bytes (measured or looked up,
    /// nothing copied).
    pub(crate) async fn size(&self, job_id: u64, attempt: u32) -> Result<u64, LogsError> {
        if let Some(rec) = self.compacted(job_id, attempt)? {
            return Ok(rec.size);
        }
        let walked = self.chunks_size(job_id, attempt)?;
        match self.compacted(job_id, attempt)? {
            Some(rec) => Ok(rec.size),
            None => Ok(walked),
        }
    }

    /// The size of one attempt's stored chunks.
    fn chunks_size(&self, job_id: u64, attempt: u32) -> Result<u64, StoreError> {
        #[cfg(test)]
        self.walks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut total = 0u64;
        for item in self.table.scan_raw(Self::attempt_prefix(job_id, attempt)) {
            let (k, v) = item?;
            self.check(&k, &v)?;
            total += v.len() as u64 - 1;
        }
        Ok(total)
    }

    /// Starts watching a job: events from now on. Read the stored chunks
    /// *after* subscribing, so nothing falls between the two.
    pub(crate) fn subscribe(&self, job_id: u64) -> broadcast::Receiver<WatchEvent> {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.entry(job_id)
            .or_insert_with(|| broadcast::channel(WATCH_BUFFER_EVENTS).0)
            .subscribe()
    }

    /// Holds off the compaction of `job_id`'s log until the pin is
    /// dropped: a watcher streaming chunks by seq takes one before it reads
    /// anything, so each attempt stays in one form for it (chunks, or a
    /// compacted log's pages) for as long as it watches.
    pub(crate) fn pin(&self, job_id: u64) -> LogPin<'_> {
        *self
            .pinned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(job_id)
            .or_default() += 1;
        LogPin { logs: self, job_id }
    }

    /// The first job at or after `from` with a log, stored or compacted.
    #[cfg(test)]
    pub(crate) fn next_job(&self, from: u64) -> Result<Option<u64>, StoreError> {
        self.jobs_with_logs().next_from(from)
    }

    /// A walk over the jobs with a log, stored or compacted, in job order
    /// (the order they were made): retention's.
    pub(crate) fn jobs_with_logs(&self) -> JobsWithLogs<'_> {
        JobsWithLogs {
            logs: self,
            ahead: [None, None],
        }
    }

    /// Removes the stored chunks and compacted records of `jobs`' logs
    /// (every attempt), in order, at most `max` entries in one atomic
    /// write, made durable, and then the removed records' objects; returns
    /// how many of `jobs`, from the front, surely have no log left (a job
    /// whose last entries filled the write counts in the next call). Retention
    /// calls it for finished jobs only, a few dozen at a time (one write
    /// for many jobs: a job's log is usually one record), again with the
    /// rest until all are gone. An object that cannot be deleted now (the
    /// store is down) is left: without its record it is an orphan, which
    /// the compactor's start-up sweep deletes ([`compact`]).
    pub(crate) async fn remove(&self, jobs: &[u64], max: usize) -> Result<usize, StoreError> {
        let mut chunks = crate::store::Batch::default();
        let mut records = crate::store::Batch::default();
        let mut objects = Vec::new();
        debug_assert!(max > 0, "a removal of nothing would never end");
        let (mut n, mut gone) = (0, 0);
        for job_id in jobs {
            for item in self.records.scan_raw(job_id.to_be_bytes()).take(max - n) {
                let (k, v) = item?;
                let rec: Compacted = self.records.decode(&k, &v)?;
                objects.push(rec.object);
                records.remove(k);
                n += 1;
            }
            for k in self.table.keys(job_id.to_be_bytes()).take(max - n) {
                chunks.remove(k?);
                n += 1;
            }
            if n >= max {
                // Perhaps more of this job's log is left: the next call sees.
                break;
            }
            gone += 1;
        }
        if n > 0 {
            self.table.apply_with(chunks, &self.records, records)?;
            // Durable before the objects go: a record never points at
            // nothing.
            self.table.store().commit().await?;
        }
        for name in objects {
            if let Err(e) = compact::delete(&self.objects, &name).await {
                tracing::warn!(
                    "the pruned log {name} could not be deleted from the object store ({e}); the next start deletes it"
                );
            }
        }
        Ok(gone)
    }

    /// Attempts compacted and compactions that failed since the hub
    /// started.
    pub(crate) fn compaction_totals(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.compacted_total.load(Relaxed),
            self.compaction_failures_total.load(Relaxed),
        )
    }

    /// Tells watchers the job finished and forgets its live channel. A
    /// job with attempts (its result is recorded and durable) goes to the
    /// compactor.
    pub(crate) fn finished(&self, job_id: u64, attempts: u32) {
        if let Some(tx) = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&job_id)
        {
            let _ = tx.send(WatchEvent::Finished);
        }
        {
            let mut known = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
            for a in 1..=attempts {
                known.remove(&(job_id, a));
            }
        }
        if attempts > 0 {
            self.queue.push(job_id);
        }
    }
}

/// [`JobLogs::range`] of a compacted log: the frames covering the range,
/// fetched in one request and decompressed one by one.
async fn compacted_range(
    objects: &Objects,
    rec: &Compacted,
    offset: Option<u64>,
    limit: u64,
) -> Result<LogRange, LogsError> {
    let offset = offset
        .unwrap_or_else(|| rec.size.saturating_sub(limit))
        .min(rec.size);
    let len = limit.min(rec.size - offset);
    let data = compact::read_range(objects, rec, offset, len).await?;
    Ok(LogRange {
        offset,
        next_offset: offset + data.len() as u64,
        data,
        total: rec.size,
    })
}

#[cfg(test)]
mod tests {

    /// The sync reader's limit holds on a single-threaded runtime (the
    /// tests'), whose timers cannot run while its thread waits: a read
    /// that never answers gives up, from the runtime's own thread and from
    /// its blocking pool.
    #[tokio::test]
    async fn a_blocking_read_gives_up_on_a_single_threaded_runtime() {
        let never = || async {
            tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
            Ok::<(), LogsError>(())
        };
        let limit = std::time::Duration::from_millis(100);
        assert!(matches!(
            block_on_bounded(never(), limit),
            Err(LogsError::Slow(_))
        ));
        let pooled = tokio::task::spawn_blocking(move || block_on_bounded(never(), limit))
            .await
            .unwrap();
        assert!(matches!(pooled, Err(LogsError::Slow(_))));
        // And without any runtime.
        let bare = std::thread::spawn(move || block_on_bounded(never(), limit))
            .join()
            .unwrap();
        assert!(matches!(bare, Err(LogsError::Slow(_))));
    }

    use super::*;

    fn chunk(job_id: u64, attempt: u32, seq: u64, data: &str) -> LogChunk {
        LogChunk {
            job: Some(JobRef { job_id, attempt }),
            seq,
            stream: LogStream::Stdout.into(),
            data: data.as_bytes().to_vec(),
        }
    }

    #[tokio::test]
    async fn chunks_are_stored_in_order_per_attempt_and_resends_are_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let logs = JobLogs::open_local(&store, 1 << 20).unwrap();
        logs.append(chunk(7, 1, 2, "b")).unwrap();
        logs.append(chunk(7, 1, 1, "a")).unwrap();
        logs.append(chunk(7, 1, 1, "a")).unwrap();
        logs.append(chunk(7, 2, 1, "c")).unwrap();
        logs.append(chunk(8, 1, 1, "other")).unwrap();
        let all: Vec<_> = logs.read(7, None).await.unwrap();
        let text: String = all
            .iter()
            .map(|c| String::from_utf8_lossy(&c.data))
            .collect();
        assert_eq!(text, "abc");
        assert_eq!(logs.read(7, Some(2)).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn watchers_see_live_chunks_then_finish() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let logs = JobLogs::open_local(&store, 1 << 20).unwrap();
        let mut rx = logs.subscribe(3);
        logs.append(chunk(3, 1, 1, "hi")).unwrap();
        logs.finished(3, 1);
        assert!(matches!(rx.recv().await.unwrap(), WatchEvent::Log(_)));
        assert!(matches!(rx.recv().await.unwrap(), WatchEvent::Finished));
    }

    #[tokio::test]
    async fn hub_cap_drops_the_excess_with_a_notice() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let logs = JobLogs::open_local(&store, 4).unwrap();
        logs.append(chunk(1, 1, 1, "abc")).unwrap();
        logs.append(chunk(1, 1, 2, "defg")).unwrap();
        logs.append(chunk(1, 1, 3, "never")).unwrap();
        let text: String = logs
            .read(1, None)
            .await
            .unwrap()
            .iter()
            .map(|c| String::from_utf8_lossy(&c.data).into_owned())
            .collect();
        assert!(text.starts_with("abcdefg"));
        assert!(text.contains("hub's limit"));
        assert!(!text.contains("never"));
    }

    async fn text(logs: &JobLogs, job_id: u64) -> String {
        logs.read(job_id, None)
            .await
            .unwrap()
            .iter()
            .map(|c| String::from_utf8_lossy(&c.data).into_owned())
            .collect()
    }

    #[tokio::test]
    async fn a_resent_chunk_is_stored_counted_and_shown_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // Room for exactly "ab" + "cd": counting "ab" twice would drop "cd".
        let logs = JobLogs::open_local(&store, 4).unwrap();
        let mut rx = logs.subscribe(5);
        logs.append(chunk(5, 1, 1, "ab")).unwrap();
        logs.append(chunk(5, 1, 1, "ab")).unwrap();
        logs.append(chunk(5, 1, 2, "cd")).unwrap();
        logs.append(chunk(5, 1, 1, "ab")).unwrap();
        assert_eq!(text(&logs, 5).await, "abcd");
        assert_eq!(logs.read(5, Some(1)).await.unwrap().len(), 2);
        logs.finished(5, 1);
        let mut shown = Vec::new();
        while let Ok(WatchEvent::Log(c)) = rx.recv().await {
            shown.push(c.seq);
        }
        assert_eq!(shown, [1, 2], "each chunk is shown to watchers once");
    }

    #[tokio::test]
    async fn after_a_restart_the_cap_counts_what_is_stored_and_resends_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        JobLogs::open_local(&store, 6)
            .unwrap()
            .append(chunk(2, 1, 1, "abc"))
            .unwrap();
        // A fresh JobLogs knows nothing in memory, like a restarted hub.
        let logs = JobLogs::open_local(&store, 6).unwrap();
        logs.append(chunk(2, 1, 1, "abc")).unwrap();
        logs.append(chunk(2, 1, 2, "defg")).unwrap();
        logs.append(chunk(2, 1, 3, "never")).unwrap();
        let t = text(&logs, 2).await;
        assert!(t.starts_with("abcdefg\n"), "{t}");
        assert_eq!(t.matches("abc").count(), 1, "{t}");
        assert!(t.contains("hub's limit") && !t.contains("never"), "{t}");
        // A resend of the chunk that crossed the cap changes nothing.
        logs.append(chunk(2, 1, 2, "defg")).unwrap();
        assert_eq!(text(&logs, 2).await, t);
    }

    #[tokio::test]
    async fn chunks_keep_their_binary_layout() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let logs = JobLogs::open_local(&store, 1 << 20).unwrap();
        let mut old_key = Vec::new();
        old_key.extend_from_slice(&9u64.to_be_bytes());
        old_key.extend_from_slice(&1u32.to_be_bytes());
        old_key.extend_from_slice(&1u64.to_be_bytes());
        let mut old_value = vec![LogStream::Stderr as u8];
        old_value.extend_from_slice(b"written before");
        logs.table.put_raw(&old_key, old_value).unwrap();
        let read = logs.read(9, None).await.unwrap();
        assert_eq!(read[0].data, b"written before");
        assert_eq!(read[0].stream, LogStream::Stderr as i32);

        logs.append(chunk(9, 1, 2, "now")).unwrap();
        let mut new_key = old_key.clone();
        new_key[12..].copy_from_slice(&2u64.to_be_bytes());
        let raw = logs.table.get_raw(&new_key).unwrap().unwrap();
        assert_eq!(
            &raw[..],
            &[&[LogStream::Stdout as u8][..], b"now"].concat()[..]
        );

        // A key that is not (job, attempt, seq) is named, not misread.
        let mut short_key = 0u64.to_be_bytes().to_vec();
        short_key.extend_from_slice(b"x");
        logs.table.put_raw(&short_key, &b"x"[..]).unwrap();
        let err = logs.read(0, None).await.unwrap_err().to_string();
        assert!(
            err.contains("record logs/") && err.contains("malformed"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_range_reads_only_its_bytes_across_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let logs = JobLogs::open_local(&store, 1 << 20).unwrap();
        logs.append(chunk(6, 1, 1, "abc")).unwrap();
        logs.append(chunk(6, 1, 2, "defg")).unwrap();
        logs.append(chunk(6, 1, 3, "hi")).unwrap();
        logs.append(chunk(6, 2, 1, "other attempt")).unwrap();
        let r = logs.range(6, 1, Some(2), 4, None).await.unwrap();
        assert_eq!(
            (r.data.as_slice(), r.offset, r.next_offset, r.total),
            (&b"cdef"[..], 2, 6, 9)
        );
        let tail = logs.range(6, 1, None, 3, None).await.unwrap();
        assert_eq!(
            (tail.data.as_slice(), tail.offset, tail.total),
            (&b"ghi"[..], 6, 9)
        );
        // The size measured already is not measured again: one walk.
        let walks = || logs.walks.load(std::sync::atomic::Ordering::Relaxed);
        let before = walks();
        let known = logs.range(6, 1, None, 3, Some(9)).await.unwrap();
        assert_eq!((known.data, known.offset), (tail.data, tail.offset));
        assert_eq!(walks() - before, 1);
        let past = logs.range(6, 1, Some(50), 3, None).await.unwrap();
        assert_eq!((past.data.len(), past.offset, past.next_offset), (0, 9, 9));
        assert_eq!(
            logs.range(6, 1, Some(0), 100, None).await.unwrap().data,
            b"abcdefghi"
        );
        assert_eq!(logs.size(6, 2).await.unwrap(), 13);
        assert_eq!(logs.size(7, 1).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_gap_between_the_stored_chunks_and_the_result_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let logs = JobLogs::open_local(&store, 1 << 20).unwrap();
        let job = JobRef {
            job_id: 4,
            attempt: 2,
        };
        for seq in [1, 2, 4] {
            logs.append(chunk(4, 2, seq, "x")).unwrap();
        }
        let gap = logs.gap(&job, 6).unwrap().expect("a gap");
        assert!(
            gap.contains("3 of its 6") && gap.contains("seq 3, 5..=6"),
            "{gap}"
        );
        logs.append(chunk(4, 2, 3, "x")).unwrap();
        assert_eq!(logs.gap(&job, 4).unwrap(), None);
        // Also from the tree alone (a restarted hub).
        let fresh = JobLogs::open_local(&store, 1 << 20).unwrap();
        assert_eq!(fresh.gap(&job, 4).unwrap(), None);
        assert!(
            fresh
                .gap(&job, 3)
                .unwrap()
                .unwrap()
                .contains("past the result")
        );
        assert_eq!(
            fresh.gap(&job, 0).unwrap(),
            None,
            "0: the agent names no last chunk"
        );
        let capped = JobLogs::open_local(&store, 2).unwrap();
        assert_eq!(
            capped.gap(&job, 9).unwrap(),
            None,
            "the hub's cap dropped the rest"
        );
    }
}
