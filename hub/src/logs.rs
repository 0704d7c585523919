//! Job logs: stored per (job, attempt, seq) in the `logs` tree, and fanned out
//! live to whoever watches a job (`trunkfarm job run`, the dashboard).
//!
//! A job's log as the agent produced it (up to the agent's output cap, and
//! the hub's own `max_log_size`) is stored exactly once, whatever is killed
//! or dropped:
//!
//! - Chunks are written without waiting for the disk (a log line must not
//!   cost an fsync). They become durable with the next commit, at the latest
//!   the one that records the attempt's result: the hub stores the chunks
//!   that precede a result on its stream before it records the result, and
//!   sled persists writes in order.
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

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Mutex;

use tokio::sync::broadcast;
use trunkfarm_proto::v1::{JobRef, LogChunk, LogStream};

use crate::store::{Store, StoreError, Table, trees};

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
}

/// Owner of the `logs` tree and of the live watchers.
pub(crate) struct JobLogs {
    /// Binary keys ([`key`]) and values (stream byte + data), not JSON: read
    /// and written raw.
    table: Table,
    /// Log bytes the hub keeps per attempt; beyond it chunks are dropped
    /// (agents cap their own output well below; this guards the hub).
    max_bytes: u64,
    live: Mutex<HashMap<u64, broadcast::Sender<WatchEvent>>>,
    /// Per (job, attempt) touched since the hub started, until the job
    /// finishes. Held while a chunk is checked and stored, so two copies of
    /// one chunk (an old session still draining, a new one resending) are
    /// stored and counted once.
    attempts: Mutex<HashMap<(u64, u32), AttemptLog>>,
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

/// At most this many missing ranges are named in a gap's description.
const GAP_RANGES_SHOWN: usize = 5;

impl JobLogs {
    /// Opens the `logs` tree.
    pub(crate) fn open(store: &Store, max_bytes: u64) -> Result<JobLogs, StoreError> {
        Ok(JobLogs {
            table: Table::open(store, trees::LOGS)?,
            max_bytes,
            live: Mutex::new(HashMap::new()),
            attempts: Mutex::new(HashMap::new()),
            #[cfg(test)]
            walks: Default::default(),
        })
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

    /// The prefix of an attempt's keys.
    fn attempt_prefix(job_id: u64, attempt: u32) -> [u8; 12] {
        let mut p = [0u8; 12];
        p.copy_from_slice(&key(job_id, attempt, 0)[..12]);
        p
    }

    /// What the tree holds of an attempt (after a restart, or for an
    /// attempt not touched yet).
    fn scan_attempt(&self, job_id: u64, attempt: u32) -> Result<AttemptLog, StoreError> {
        let mut log = AttemptLog::default();
        for item in self.table.scan_raw(Self::attempt_prefix(job_id, attempt)) {
            let (k, v) = item?;
            self.check(&k, &v)?;
            log.bytes = log.bytes.saturating_add(v.len() as u64 - 1);
            log.chunks += 1;
            log.max_seq = log.max_seq.max(seq_of(&k));
        }
        Ok(log)
    }

    /// Stores a chunk and shows it to live watchers, once per (job,
    /// attempt, seq): a chunk already stored (an agent resending what the
    /// hub may have lost) is neither stored, counted toward the cap, nor
    /// shown again. Chunks past the per-attempt cap are dropped; the one
    /// that crosses it is stored with a notice.
    pub(crate) fn append(&self, chunk: LogChunk) -> Result<(), StoreError> {
        let Some(job) = chunk.job else {
            return Ok(());
        };
        let k = key(job.job_id, job.attempt, chunk.seq);
        {
            let mut attempts = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
            let log = match attempts.entry((job.job_id, job.attempt)) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => e.insert(self.scan_attempt(job.job_id, job.attempt)?),
            };
            if log.bytes >= self.max_bytes {
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
    /// result names no last chunk (0: a refusal, a job whose task died), or
    /// if the hub's own cap dropped the rest (that gap is expected and noted
    /// in the log itself).
    pub(crate) fn gap(
        &self,
        job: &JobRef,
        last_log_seq: u64,
    ) -> Result<Option<String>, StoreError> {
        let log = {
            let mut attempts = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
            match attempts.entry((job.job_id, job.attempt)) {
                Entry::Occupied(e) => *e.get(),
                Entry::Vacant(e) => *e.insert(self.scan_attempt(job.job_id, job.attempt)?),
            }
        };
        if last_log_seq == 0
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

    /// Stored chunks of a job, in order; only `attempt` if given.
    pub(crate) fn read(
        &self,
        job_id: u64,
        attempt: Option<u32>,
    ) -> Result<Vec<LogChunk>, StoreError> {
        let prefix: Vec<u8> = match attempt {
            Some(a) => key(job_id, a, 0)[..12].to_vec(),
            None => job_id.to_be_bytes().to_vec(),
        };
        let mut out = Vec::new();
        for item in self.table.scan_raw(prefix) {
            let (k, v) = item?;
            self.check(&k, &v)?;
            let attempt = u32::from_be_bytes([k[8], k[9], k[10], k[11]]);
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

    /// Bytes `offset..offset + limit` of one attempt's log (its chunks'
    /// data in seq order, as [`JobLogs::read`] would concatenate them) and
    /// the log's total size; `offset` `None`: the last `limit` bytes of
    /// the log's `size`, measured here unless the caller did already (a
    /// request that measured it once passes it on rather than walking the
    /// chunks again).
    ///
    /// Only the chunks that overlap the range are copied: the others are
    /// only measured (sled hands out shared views of stored values), so a
    /// page of a 100 MB log costs its own size, not the log's.
    pub(crate) fn range(
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
            (None, None) => self.size(job_id, attempt)?.saturating_sub(limit),
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

    /// The size of one attempt's stored log, in bytes (measured, nothing
    /// copied).
    pub(crate) fn size(&self, job_id: u64, attempt: u32) -> Result<u64, StoreError> {
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

    /// The first job at or after `from` with a stored log (retention walks
    /// the logs in job order, which is the order they were made).
    pub(crate) fn next_job(&self, from: u64) -> Result<Option<u64>, StoreError> {
        let start = key(from, 0, 0);
        let Some(item) = self.table.sled().range(start..).next() else {
            return Ok(None);
        };
        let (k, v) = item.map_err(|e| self.table.store().err(e))?;
        self.check(&k, &v)?;
        let mut id = [0u8; 8];
        id.copy_from_slice(&k[..8]);
        Ok(Some(u64::from_be_bytes(id)))
    }

    /// Removes up to `max` stored chunks of `job_id`'s log (every attempt)
    /// in one atomic write, durable after the next commit; returns how many.
    /// Retention calls it for finished jobs only, until it returns less
    /// than `max`.
    pub(crate) fn remove(&self, job_id: u64, max: usize) -> Result<usize, StoreError> {
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for k in self.table.keys(job_id.to_be_bytes()).take(max) {
            batch.remove(k?);
            n += 1;
        }
        if n > 0 {
            self.table.apply(batch)?;
        }
        Ok(n)
    }

    /// Tells watchers the job finished and forgets its live channel.
    pub(crate) fn finished(&self, job_id: u64, attempts: u32) {
        if let Some(tx) = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&job_id)
        {
            let _ = tx.send(WatchEvent::Finished);
        }
        let mut known = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
        for a in 1..=attempts {
            known.remove(&(job_id, a));
        }
    }
}

#[cfg(test)]
mod tests {
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
        let logs = JobLogs::open(&store, 1 << 20).unwrap();
        logs.append(chunk(7, 1, 2, "b")).unwrap();
        logs.append(chunk(7, 1, 1, "a")).unwrap();
        logs.append(chunk(7, 1, 1, "a")).unwrap();
        logs.append(chunk(7, 2, 1, "c")).unwrap();
        logs.append(chunk(8, 1, 1, "other")).unwrap();
        let all: Vec<_> = logs.read(7, None).unwrap();
        let text: String = all
            .iter()
            .map(|c| String::from_utf8_lossy(&c.data))
            .collect();
        assert_eq!(text, "abc");
        assert_eq!(logs.read(7, Some(2)).unwrap().len(), 1);
    }

    #[tokio::test]
    async fn watchers_see_live_chunks_then_finish() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let logs = JobLogs::open(&store, 1 << 20).unwrap();
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
        let logs = JobLogs::open(&store, 4).unwrap();
        logs.append(chunk(1, 1, 1, "abc")).unwrap();
        logs.append(chunk(1, 1, 2, "defg")).unwrap();
        logs.append(chunk(1, 1, 3, "never")).unwrap();
        let text: String = logs
            .read(1, None)
            .unwrap()
            .iter()
            .map(|c| String::from_utf8_lossy(&c.data).into_owned())
            .collect();
        assert!(text.starts_with("abcdefg"));
        assert!(text.contains("hub's limit"));
        assert!(!text.contains("never"));
    }

    fn text(logs: &JobLogs, job_id: u64) -> String {
        logs.read(job_id, None)
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
        let logs = JobLogs::open(&store, 4).unwrap();
        let mut rx = logs.subscribe(5);
        logs.append(chunk(5, 1, 1, "ab")).unwrap();
        logs.append(chunk(5, 1, 1, "ab")).unwrap();
        logs.append(chunk(5, 1, 2, "cd")).unwrap();
        logs.append(chunk(5, 1, 1, "ab")).unwrap();
        assert_eq!(text(&logs, 5), "abcd");
        assert_eq!(logs.read(5, Some(1)).unwrap().len(), 2);
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
        JobLogs::open(&store, 6)
            .unwrap()
            .append(chunk(2, 1, 1, "abc"))
            .unwrap();
        // A fresh JobLogs knows nothing in memory, like a restarted hub.
        let logs = JobLogs::open(&store, 6).unwrap();
        logs.append(chunk(2, 1, 1, "abc")).unwrap();
        logs.append(chunk(2, 1, 2, "defg")).unwrap();
        logs.append(chunk(2, 1, 3, "never")).unwrap();
        let t = text(&logs, 2);
        assert!(t.starts_with("abcdefg\n"), "{t}");
        assert_eq!(t.matches("abc").count(), 1, "{t}");
        assert!(t.contains("hub's limit") && !t.contains("never"), "{t}");
        // A resend of the chunk that crossed the cap changes nothing.
        logs.append(chunk(2, 1, 2, "defg")).unwrap();
        assert_eq!(text(&logs, 2), t);
    }

    #[tokio::test]
    async fn chunks_keep_their_binary_layout() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let logs = JobLogs::open(&store, 1 << 20).unwrap();
        let mut old_key = Vec::new();
        old_key.extend_from_slice(&9u64.to_be_bytes());
        old_key.extend_from_slice(&1u32.to_be_bytes());
        old_key.extend_from_slice(&1u64.to_be_bytes());
        let mut old_value = vec![LogStream::Stderr as u8];
        old_value.extend_from_slice(b"written before");
        logs.table.put_raw(&old_key, old_value).unwrap();
        let read = logs.read(9, None).unwrap();
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
        let err = logs.read(0, None).unwrap_err().to_string();
        assert!(
            err.contains("record logs/") && err.contains("malformed"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_range_reads_only_its_bytes_across_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let logs = JobLogs::open(&store, 1 << 20).unwrap();
        logs.append(chunk(6, 1, 1, "abc")).unwrap();
        logs.append(chunk(6, 1, 2, "defg")).unwrap();
        logs.append(chunk(6, 1, 3, "hi")).unwrap();
        logs.append(chunk(6, 2, 1, "other attempt")).unwrap();
        let r = logs.range(6, 1, Some(2), 4, None).unwrap();
        assert_eq!(
            (r.data.as_slice(), r.offset, r.next_offset, r.total),
            (&b"cdef"[..], 2, 6, 9)
        );
        let tail = logs.range(6, 1, None, 3, None).unwrap();
        assert_eq!(
            (tail.data.as_slice(), tail.offset, tail.total),
            (&b"ghi"[..], 6, 9)
        );
        // The size measured already is not measured again: one walk.
        let walks = || logs.walks.load(std::sync::atomic::Ordering::Relaxed);
        let before = walks();
        let known = logs.range(6, 1, None, 3, Some(9)).unwrap();
        assert_eq!((known.data, known.offset), (tail.data, tail.offset));
        assert_eq!(walks() - before, 1);
        let past = logs.range(6, 1, Some(50), 3, None).unwrap();
        assert_eq!((past.data.len(), past.offset, past.next_offset), (0, 9, 9));
        assert_eq!(
            logs.range(6, 1, Some(0), 100, None).unwrap().data,
            b"abcdefghi"
        );
        assert_eq!(logs.size(6, 2).unwrap(), 13);
        assert_eq!(logs.size(7, 1).unwrap(), 0);
    }

    #[tokio::test]
    async fn a_gap_between_the_stored_chunks_and_the_result_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let logs = JobLogs::open(&store, 1 << 20).unwrap();
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
        let fresh = JobLogs::open(&store, 1 << 20).unwrap();
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
        let capped = JobLogs::open(&store, 2).unwrap();
        assert_eq!(
            capped.gap(&job, 9).unwrap(),
            None,
            "the hub's cap dropped the rest"
        );
    }
}
