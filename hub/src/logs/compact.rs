//! Compaction: once a job's result is recorded, each attempt's log moves
//! from the `logs` tree into one object, `logs/<job>/<attempt>.log.zst`.
//!
//! The object is a row of independent zstd frames of [`FRAME_BYTES`] of log
//! each, so a byte range is read by fetching and decompressing only the
//! frames that cover it ([`read_range`]); the frame index lives in the
//! attempt's [`Compacted`] record in the `log_objects` tree.
//!
//! Nothing is lost or stored twice, whatever is killed when:
//!
//! 1. The attempt is sealed (chunks arriving for it now are resends, see
//!    the module above) and its chunks are read, framed and put as one
//!    object (a multipart upload once it passes [`PART_BYTES`]; either way
//!    the object appears whole or not at all).
//! 2. One atomic database step writes the record and removes the chunks, and is
//!    committed. Until then the chunks are the log; a hub killed between
//!    the two steps finds them at its next start and puts the same object
//!    again, which replaces the first whole.
//!
//! The [`Compactor`] task does this in the background, in batches of
//! [`PARALLEL`] jobs compacted side by side (an object store's latency is
//! paid once per batch; their records share the database's group commits):
//! for jobs [`JobLogs::finished`] queues, and at start for every
//! finished job whose chunks are still in the database (a hub killed
//! mid-way, an outage, a database from before compaction). When the object
//! store fails, the logs stay in the database and the compactor retries
//! with a growing pause, warning once per outage.
//!
//! Orphans: an object without a record (its compaction was killed before
//! the record, or retention removed the record but could not delete the
//! object) is deleted by the compactor's start-up sweep once it is older
//! than [`ORPHAN_AGE`] (a margin for clocks that disagree between the hub
//! and the store; younger ones go at a later sweep), and again every
//! [`SWEEP_EVERY`]. It runs before any compaction of this start and then
//! between batches, never beside a compaction: a compaction re-putting a
//! killed attempt's old object must not have it deleted under its new
//! record. It lists every object under `logs/` each time (in the
//! background: for a million logs, a thousand list requests on S3).

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, WriteMultipart};
use tokio::sync::Notify;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{Compacted, Frame, JobLogs, LogsError, key, object_name, seq_of};
use crate::objects::Objects;
use crate::store::StoreError;

/// Log bytes per zstd frame: a range read fetches and decompresses at most
/// this much more than it asks for on each side.
pub(crate) const FRAME_BYTES: usize = 1 << 20;

/// Compressed bytes up to which a log is put in one request; bigger ones
/// go as a multipart upload in parts of this size (S3's minimum is 5 MiB).
pub(crate) const PART_BYTES: usize = 8 << 20;

/// zstd's level: fast, and logs compress well anyway.
const ZSTD_LEVEL: i32 = 3;

/// An object under `logs/` without a record is deleted at start once it is
/// this old.
pub(crate) const ORPHAN_AGE: Duration = Duration::from_secs(3600);

/// Jobs compacted at once. Each holds up to [`PART_BYTES`] being filled
/// plus two parts in flight (about 24 MiB at worst, for a log bigger than
/// a part), so the compactor's peak stays near 100 MiB.
const PARALLEL: usize = 4;

/// How often the orphan sweep runs after the one at start.
const SWEEP_EVERY: Duration = Duration::from_secs(3600);

/// How long a job whose log someone watches waits before it is tried again.
const PINNED_RETRY: Duration = Duration::from_secs(1);

/// Jobs whose result was recorded, in order, for the compactor.
#[derive(Default)]
pub(super) struct Queue {
    jobs: Mutex<VecDeque<u64>>,
    wake: Notify,
}

impl Queue {
    pub(super) fn push(&self, job_id: u64) {
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(job_id);
        self.wake.notify_one();
    }

    fn pop(&self) -> Option<u64> {
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
    }
}

/// What [`JobLogs::compact`] did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Compaction {
    /// The log is now this object.
    Done(Compacted),
    /// It was compacted before.
    Already,
    /// Nothing is stored for the attempt.
    Empty,
    /// The log is smaller than `storage.compact_logs_from`: it stays in
    /// the database.
    Small,
    /// Someone streams the job's log ([`JobLogs::pin`]): the chunks stay
    /// until a later try (nothing is uploaded while it is pinned; an object
    /// put just before the pin is put again then).
    Pinned,
}

/// An object store error as [`LogsError`], naming what the hub did.
fn store_err(
    objects: &Objects,
    action: &'static str,
    path: &ObjectPath,
) -> impl FnOnce(object_store::Error) -> LogsError + use<> {
    let err = objects.error(action, path);
    move |e| LogsError::Objects(err(e))
}

/// Deletes the object `name` (relative to the hub's prefix).
pub(super) async fn delete(objects: &Objects, name: &str) -> Result<(), LogsError> {
    let path = objects.path(name);
    match objects.store().delete(&path).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(store_err(objects, "delete", &path)(e)),
    }
}

/// Bytes `offset..offset + len` of a compacted log (`len` already cut to
/// the log's size): the covering frames are fetched in one ranged GET and
/// decompressed one at a time.
pub(super) async fn read_range(
    objects: &Objects,
    rec: &Compacted,
    offset: u64,
    len: u64,
) -> Result<Vec<u8>, LogsError> {
    let end = offset.saturating_add(len).min(rec.size);
    if offset >= end || rec.frames.is_empty() {
        return Ok(Vec::new());
    }
    let first = rec
        .frames
        .partition_point(|f| f.raw <= offset)
        .saturating_sub(1);
    let last = rec.frames.partition_point(|f| f.raw < end).max(first + 1) - 1;
    let from = rec.frames[first].at;
    let to = rec.frames[last].at + rec.frames[last].len;
    let path = objects.path(&rec.object);
    let damaged = |reason: String| LogsError::Damaged {
        path: rec.object.clone(),
        reason,
    };
    let bytes = objects
        .store()
        .get_range(&path, from..to)
        .await
        .map_err(store_err(objects, "read", &path))?;
    if bytes.len() as u64 != to - from {
        return Err(damaged(format!(
            "asked for bytes {from}..{to}, got {}",
            bytes.len()
        )));
    }
    let mut out = Vec::with_capacity((end - offset) as usize);
    for i in first..=last {
        let f = rec.frames[i];
        let raw_end = rec.frames.get(i + 1).map_or(rec.size, |n| n.raw);
        let raw_len = (raw_end - f.raw) as usize;
        let at = (f.at - from) as usize;
        let plain = zstd::bulk::decompress(&bytes[at..at + f.len as usize], raw_len)
            .map_err(|e| damaged(format!("frame {i} does not decompress: {e}")))?;
        if plain.len() != raw_len {
            return Err(damaged(format!(
                "frame {i} holds {} bytes, not {raw_len}",
                plain.len()
            )));
        }
        let lo = offset.max(f.raw) - f.raw;
        let hi = end.min(raw_end) - f.raw;
        out.extend_from_slice(&plain[lo as usize..hi as usize]);
    }
    Ok(out)
}

/// Bytes per run of the stream map: where it starts (u64 LE), the stream.
const RUN_BYTES: usize = 9;

/// The stream map of a compacted log: (where a run starts, its stream), in
/// order. One small ranged GET.
pub(super) async fn stream_runs(
    objects: &Objects,
    rec: &Compacted,
) -> Result<Vec<(u64, i32)>, LogsError> {
    let s = rec.streams;
    if s.raw == 0 {
        return Ok(Vec::new());
    }
    let path = objects.path(&rec.object);
    let damaged = |reason: String| LogsError::Damaged {
        path: rec.object.clone(),
        reason,
    };
    let bytes = objects
        .store()
        .get_range(&path, s.at..s.at + s.len)
        .await
        .map_err(store_err(objects, "read", &path))?;
    let want = s.raw as usize * RUN_BYTES;
    let plain = zstd::bulk::decompress(&bytes, want)
        .map_err(|e| damaged(format!("the stream map does not decompress: {e}")))?;
    if plain.len() != want {
        return Err(damaged(format!(
            "the stream map holds {} bytes, not {want}",
            plain.len()
        )));
    }
    Ok(plain
        .chunks_exact(RUN_BYTES)
        .map(|r| {
            let mut at = [0u8; 8];
            at.copy_from_slice(&r[..8]);
            (u64::from_le_bytes(at), i32::from(r[8]))
        })
        .collect())
}

/// One object being written: kept in memory up to [`PART_BYTES`] and put
/// in one request, or, past that, sent as a multipart upload.
struct Upload<'a> {
    objects: &'a Objects,
    path: ObjectPath,
    buf: Vec<u8>,
    multipart: Option<WriteMultipart>,
    len: u64,
}

impl Upload<'_> {
    async fn write(&mut self, data: &[u8]) -> Result<(), LogsError> {
        self.len += data.len() as u64;
        if let Some(w) = &mut self.multipart {
            w.wait_for_capacity(2)
                .await
                .map_err(store_err(self.objects, "upload", &self.path))?;
            w.write(data);
            return Ok(());
        }
        self.buf.extend_from_slice(data);
        if self.buf.len() >= PART_BYTES {
            let upload = self
                .objects
                .store()
                .put_multipart(&self.path)
                .await
                .map_err(store_err(self.objects, "upload", &self.path))?;
            let mut w = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
            w.write(&std::mem::take(&mut self.buf));
            self.multipart = Some(w);
        }
        Ok(())
    }

    async fn finish(self) -> Result<(), LogsError> {
        match self.multipart {
            Some(w) => {
                w.finish()
                    .await
                    .map(|_| ())
                    .map_err(store_err(self.objects, "upload", &self.path))
            }
            None => self
                .objects
                .store()
                .put(&self.path, self.buf.into())
                .await
                .map(|_| ())
                .map_err(store_err(self.objects, "upload", &self.path)),
        }
    }

    /// Gives up an unfinished multipart upload (best effort: S3 lifecycle
    /// rules clean up what is left).
    async fn abort(self) {
        if let Some(w) = self.multipart
            && let Err(e) = w.abort().await
        {
            tracing::debug!("aborting the upload of {}: {e}", self.path);
        }
    }
}

impl JobLogs {
    /// Compacts one attempt's stored chunks into its object and then, in
    /// one durable step, writes its record and removes the chunks (see the
    /// module doc). Safe to run again at any point: a compacted attempt is
    /// left alone, a half-done one is redone whole.
    pub(crate) async fn compact(&self, job_id: u64, attempt: u32) -> Result<Compaction, LogsError> {
        // Checked before the upload too: a watcher may stream the log for
        // hours, and each try would put the whole object again.
        if self.is_pinned(job_id) {
            return Ok(Compaction::Pinned);
        }
        if self.compact_from > 0
            && self.compacted(job_id, attempt)?.is_none()
            && self.chunks_size(job_id, attempt)? < self.compact_from
        {
            return Ok(Compaction::Small);
        }
        let Some(rec) = self.put_object(job_id, attempt).await? else {
            return Ok(match self.compacted(job_id, attempt)? {
                Some(_) => Compaction::Already,
                None => Compaction::Empty,
            });
        };
        self.write_record(job_id, attempt, rec).await
    }

    /// Step 1: seals the attempt and puts its chunks as one object; the
    /// record it would get. `None` if it is compacted or has no chunks.
    pub(super) async fn put_object(
        &self,
        job_id: u64,
        attempt: u32,
    ) -> Result<Option<Compacted>, LogsError> {
        if self.compacted(job_id, attempt)?.is_some() {
            return Ok(None);
        }
        {
            let mut attempts = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
            // Any append that was storing a chunk of it is done: the lock
            // was held for that.
            attempts.entry((job_id, attempt)).or_default().sealed = true;
        }
        let name = object_name(job_id, attempt);
        let mut upload = Upload {
            objects: &self.objects,
            path: self.objects.path(&name),
            buf: Vec::new(),
            multipart: None,
            len: 0,
        };
        let mut rec = Compacted {
            object: name,
            size: 0,
            stored: 0,
            chunks: 0,
            max_seq: 0,
            frames: Vec::new(),
            streams: Frame {
                raw: 0,
                at: 0,
                len: 0,
            },
        };
        match self
            .frame_into(job_id, attempt, &mut upload, &mut rec)
            .await
        {
            Ok(()) if rec.chunks == 0 => {
                upload.abort().await;
                // Nothing to seal: forget it again.
                self.attempts
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&(job_id, attempt));
                Ok(None)
            }
            Ok(()) => {
                rec.stored = upload.len;
                upload.finish().await?;
                // On disk before the chunks can go (a no-op on S3).
                self.objects.sync(&rec.object).await?;
                Ok(Some(rec))
            }
            Err(e) => {
                upload.abort().await;
                Err(e)
            }
        }
    }

    /// Reads the attempt's chunks a frame's worth at a time, compresses
    /// each frame off the async threads and writes it to `upload`.
    async fn frame_into(
        &self,
        job_id: u64,
        attempt: u32,
        upload: &mut Upload<'_>,
        rec: &mut Compacted,
    ) -> Result<(), LogsError> {
        let mut pending: Vec<u8> = Vec::with_capacity(FRAME_BYTES);
        // Where each stretch of one stream starts.
        let mut runs: Vec<u8> = Vec::new();
        let mut stream: Option<u8> = None;
        let mut next_seq = Some(0u64);
        // Where the next frame starts in the log.
        let mut raw = 0u64;
        while let Some(from) = next_seq {
            let mut more = false;
            let range = key(job_id, attempt, from)..=key(job_id, attempt, u64::MAX);
            for item in self.table.range(range) {
                let (k, v) = item?;
                self.check(&k, &v)?;
                let seq = seq_of(&k);
                if stream != Some(v[0]) {
                    stream = Some(v[0]);
                    runs.extend_from_slice(&rec.size.to_le_bytes());
                    runs.push(v[0]);
                }
                pending.extend_from_slice(&v[1..]);
                rec.chunks += 1;
                rec.max_seq = rec.max_seq.max(seq);
                rec.size += v.len() as u64 - 1;
                next_seq = seq.checked_add(1);
                more = true;
                if pending.len() >= FRAME_BYTES {
                    break;
                }
            }
            if !more {
                next_seq = None;
            }
            while pending.len() >= FRAME_BYTES || (next_seq.is_none() && !pending.is_empty()) {
                let rest = pending.split_off(pending.len().min(FRAME_BYTES));
                let frame = std::mem::replace(&mut pending, rest);
                let raw_len = frame.len() as u64;
                let bytes =
                    tokio::task::spawn_blocking(move || zstd::bulk::compress(&frame, ZSTD_LEVEL))
                        .await
                        .map_err(|e| LogsError::Io(std::io::Error::other(e)))?
                        .map_err(LogsError::Io)?;
                rec.frames.push(Frame {
                    raw,
                    at: upload.len,
                    len: bytes.len() as u64,
                });
                raw += raw_len;
                upload.write(&bytes).await?;
            }
        }
        let count = (runs.len() / RUN_BYTES) as u64;
        let bytes = zstd::bulk::compress(&runs, ZSTD_LEVEL).map_err(LogsError::Io)?;
        rec.streams = Frame {
            raw: count,
            at: upload.len,
            len: bytes.len() as u64,
        };
        upload.write(&bytes).await?;
        Ok(())
    }

    /// Step 2: writes the record and removes the chunks in one atomic
    /// step, made durable; unless someone streams the job's log.
    pub(super) async fn write_record(
        &self,
        job_id: u64,
        attempt: u32,
        rec: Compacted,
    ) -> Result<Compaction, LogsError> {
        let prefix = Self::attempt_prefix(job_id, attempt);
        let removed = {
            let pinned = self.pinned.lock().unwrap_or_else(|p| p.into_inner());
            if pinned.contains_key(&job_id) {
                return Ok(Compaction::Pinned);
            }
            if self.compacted(job_id, attempt)?.is_some() {
                // Another pass got there first (with the same object).
                return Ok(Compaction::Already);
            }
            let mut chunks = crate::store::Batch::default();
            let mut n = 0u64;
            for k in self.table.keys(prefix) {
                chunks.remove(k?);
                n += 1;
            }
            if n < rec.chunks {
                // Sealed attempts only lose chunks: retention removed (or
                // is removing) the job's log meanwhile. Nothing is lost,
                // and the object goes too (below).
                true
            } else if n != rec.chunks {
                // Sealed attempts do not change: a bug, not a race. The
                // chunks stay; the next pass tries again.
                return Err(LogsError::Damaged {
                    path: rec.object.clone(),
                    reason: format!(
                        "{n} chunks are stored now but {} were compacted",
                        rec.chunks
                    ),
                });
            } else {
                let mut record = crate::store::Batch::default();
                self.records.stage(&mut record, prefix, &rec)?;
                self.table.apply_with(chunks, &self.records, record)?;
                false
            }
        };
        if removed {
            delete(&self.objects, &rec.object).await?;
            return Ok(Compaction::Empty);
        }
        self.table.store().commit().await?;
        self.attempts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(job_id, attempt));
        self.compacted_total
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Compaction::Done(rec))
    }

    /// Whether someone streams the job's log ([`JobLogs::pin`]).
    fn is_pinned(&self, job_id: u64) -> bool {
        (self.pinned.lock().unwrap_or_else(|p| p.into_inner())).contains_key(&job_id)
    }

    /// The first job at or after `from` that still has stored chunks.
    fn next_stored_job(&self, from: u64) -> Result<Option<u64>, StoreError> {
        let Some(item) = self.table.range(key(from, 0, 0)..).next() else {
            return Ok(None);
        };
        let (k, v) = item?;
        self.check(&k, &v)?;
        Ok(Some(super::job_attempt_of(&k).0))
    }
}

/// Compacts every attempt of `job` that has stored chunks; true if
/// someone streams its log (try again later).
async fn compact_job(logs: &JobLogs, job: u64) -> Result<bool, LogsError> {
    for attempt in logs.attempts(job)? {
        if logs.compact(job, attempt).await? == Compaction::Pinned {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Whether a job is finished (its log may be compacted). A job without a
/// record (pruned) counts as finished.
pub(crate) type IsFinished = Arc<dyn Fn(u64) -> Result<bool, StoreError> + Send + Sync>;

/// The background task that compacts finished jobs' logs.
pub(crate) struct Compactor {
    logs: Arc<JobLogs>,
    finished: IsFinished,
    /// The pause after a failed try, and its ceiling (it doubles).
    backoff: (Duration, Duration),
    /// How often the orphan sweep runs ([`SWEEP_EVERY`]).
    sweep_every: Duration,
}

impl Compactor {
    pub(crate) fn new(logs: Arc<JobLogs>, finished: IsFinished) -> Compactor {
        Compactor {
            logs,
            finished,
            backoff: (Duration::from_secs(1), Duration::from_secs(60)),
            sweep_every: SWEEP_EVERY,
        }
    }

    /// Sweeps orphans this often (tests).
    #[cfg(test)]
    pub(crate) fn with_sweep_every(mut self, every: Duration) -> Compactor {
        self.sweep_every = every;
        self
    }

    /// Shorter pauses (tests).
    #[cfg(test)]
    pub(crate) fn with_backoff(mut self, min: Duration, max: Duration) -> Compactor {
        self.backoff = (min, max);
        self
    }

    pub(crate) fn start(self, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move { self.run(stop).await })
    }

    /// [`Compactor::sweep_orphans`], saying what it did.
    async fn sweep(&self) {
        match self.sweep_orphans().await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!("deleted {n} orphaned log object(s) (no record points at them)")
            }
            Err(e) => tracing::warn!(
                "cannot look for orphaned log objects ({e}); the next sweep (within an hour) tries again"
            ),
        }
    }

    async fn run(self, stop: CancellationToken) {
        self.sweep().await;
        let mut swept = Instant::now();
        // Jobs with stored chunks, walked once from the start.
        let mut sweep = Some(0u64);
        let mut retry: BTreeSet<(Instant, u64)> = BTreeSet::new();
        let mut pause = self.backoff.0;
        let mut outage = false;
        let mut compacted = 0u64;
        loop {
            if stop.is_cancelled() {
                return;
            }
            // Between batches: never beside a compaction (see the module doc).
            if swept.elapsed() >= self.sweep_every {
                self.sweep().await;
                swept = Instant::now();
            }
            // A few jobs at a time: an object store's latency is paid once
            // per batch, and their records share the database's commits.
            let mut batch = Vec::new();
            while batch.len() < PARALLEL {
                match self.next_job(&mut sweep, &mut retry) {
                    Some(job) if batch.contains(&job) => {}
                    Some(job) => batch.push(job),
                    None => break,
                }
            }
            if batch.is_empty() {
                if sweep.is_some() {
                    continue;
                }
                let next_sweep =
                    (swept + self.sweep_every).saturating_duration_since(Instant::now());
                let wait = retry.first().map_or(next_sweep, |(t, _)| {
                    t.saturating_duration_since(Instant::now()).min(next_sweep)
                });
                tokio::select! {
                    _ = self.logs.queue.wake.notified() => {}
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.cancelled() => return,
                }
                continue;
            }
            let mut running = tokio::task::JoinSet::new();
            for job in batch {
                let logs = self.logs.clone();
                running.spawn(async move { (job, compact_job(&logs, job).await) });
            }
            let mut failed = false;
            while let Some(done) = running.join_next().await {
                let (job, result) = match done {
                    Ok(done) => done,
                    Err(e) => {
                        // A panic: the job's chunks are still there and
                        // the sweep at the next start finds them.
                        tracing::error!("a log compaction failed: {e}");
                        continue;
                    }
                };
                match result {
                    Ok(pinned) => {
                        if outage {
                            tracing::info!(
                                "the object store answers again: compacting the logs that waited"
                            );
                            outage = false;
                        }
                        if pinned {
                            retry.insert((Instant::now() + PINNED_RETRY, job));
                        } else {
                            compacted += 1;
                            tracing::debug!(job, compacted, "log compacted");
                        }
                    }
                    Err(e) => {
                        self.logs
                            .compaction_failures_total
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        match (&e, outage) {
                            (LogsError::Objects(_), false) => {
                                tracing::warn!(
                                    "cannot compact job logs into the object store: {e}; they stay in the database and compaction is retried (this is said once per outage)"
                                );
                                outage = true;
                            }
                            (LogsError::Objects(_), true) => {}
                            _ => tracing::error!("cannot compact the log of job {job}: {e}"),
                        }
                        retry.insert((Instant::now() + pause, job));
                        failed = true;
                    }
                }
            }
            if failed {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.cancelled() => return,
                }
                pause = (pause * 2).min(self.backoff.1);
            } else {
                pause = self.backoff.0;
            }
            tokio::task::yield_now().await;
        }
    }

    /// The next job to compact: one whose result was just recorded, else
    /// the start-up walk's next finished one, else a retry that is due.
    fn next_job(
        &self,
        sweep: &mut Option<u64>,
        retry: &mut BTreeSet<(Instant, u64)>,
    ) -> Option<u64> {
        if let Some(job) = self.logs.queue.pop() {
            return Some(job);
        }
        while let Some(from) = *sweep {
            match self.sweep_step(from) {
                Ok((next, job)) => {
                    *sweep = next;
                    if job.is_some() {
                        return job;
                    }
                }
                Err(e) => {
                    tracing::error!("cannot look for logs left to compact: {e}");
                    *sweep = None;
                }
            }
        }
        let due = retry
            .first()
            .filter(|(t, _)| *t <= Instant::now())
            .copied()?;
        retry.remove(&due);
        Some(due.1)
    }

    /// One step of the start-up walk: the cursor after the next job with
    /// stored chunks, and that job if it is finished.
    fn sweep_step(&self, from: u64) -> Result<(Option<u64>, Option<u64>), StoreError> {
        let Some(job) = self.logs.next_stored_job(from)? else {
            return Ok((None, None));
        };
        let finished = (self.finished)(job)?;
        Ok((job.checked_add(1), finished.then_some(job)))
    }

    /// Deletes objects under `logs/` older than [`ORPHAN_AGE`] that no
    /// record points at; returns how many.
    async fn sweep_orphans(&self) -> Result<usize, LogsError> {
        let objects = &self.logs.objects;
        let base = objects.path("logs");
        let base_str = format!("{base}/");
        let now_ms = crate::store::now_ms() as i64;
        let mut listed = objects.store().list(Some(&base));
        let mut orphans = Vec::new();
        while let Some(meta) = listed.next().await {
            let meta = meta.map_err(store_err(objects, "list", &base))?;
            let Some(rel) = meta.location.as_ref().strip_prefix(&base_str) else {
                continue;
            };
            let Some((job, attempt)) = parse_name(rel) else {
                continue;
            };
            let age_ms = now_ms - meta.last_modified.timestamp_millis();
            if age_ms < ORPHAN_AGE.as_millis() as i64 {
                continue;
            }
            if self.logs.compacted(job, attempt)?.is_none() {
                orphans.push(meta.location);
            }
        }
        for path in &orphans {
            match objects.store().delete(path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(store_err(objects, "delete", path)(e)),
            }
        }
        Ok(orphans.len())
    }
}

impl JobLogs {
    /// Moves the compacted logs a local store (`local`: the hub's own
    /// `<data_dir>/objects`, before `storage.backend` became `"s3"`) holds
    /// into this hub's store: each object under `logs/` there that a record
    /// names is checked against the record's size, put into the store,
    /// then deleted locally (one without a record is left alone). Lists the
    /// local directory, so a start with nothing left to move costs little. Run
    /// at start, before anything reads a log (a record whose object stayed
    /// behind would read as gone). Idempotent: a killed move is redone.
    /// Returns how many objects moved.
    pub(crate) async fn migrate_from(&self, local: &Objects) -> Result<usize, LogsError> {
        let mut moved = 0;
        // What is there locally (none once moved), not every record.
        let base = local.path("logs");
        let base_str = format!("{base}/");
        let mut recs = Vec::new();
        let mut listed = local.store().list(Some(&base));
        while let Some(meta) = listed.next().await {
            let meta = meta.map_err(store_err(local, "list", &base))?;
            let rel = meta.location.as_ref().strip_prefix(&base_str);
            let Some((job, attempt)) = rel.and_then(parse_name) else {
                continue;
            };
            match self.compacted(job, attempt)? {
                Some(rec) => recs.push(rec),
                // No record: an orphan of the local store, left there.
                None => tracing::debug!("{} has no record; not moved", meta.location),
            }
        }
        for rec in recs {
            let from = local.path(&rec.object);
            let bytes = match local.store().get(&from).await {
                Ok(got) => got.bytes().await.map_err(store_err(local, "read", &from))?,
                Err(object_store::Error::NotFound { .. }) => continue,
                Err(e) => return Err(store_err(local, "read", &from)(e)),
            };
            if bytes.len() as u64 != rec.stored {
                tracing::error!(
                    "the compacted log {} holds {} bytes, not the {} its record says; not moving it into {} (left where it is)",
                    from,
                    bytes.len(),
                    rec.stored,
                    self.objects.describe()
                );
                continue;
            }
            let mut upload = Upload {
                objects: &self.objects,
                path: self.objects.path(&rec.object),
                buf: Vec::new(),
                multipart: None,
                len: 0,
            };
            for part in bytes.chunks(PART_BYTES) {
                if let Err(e) = upload.write(part).await {
                    upload.abort().await;
                    return Err(e);
                }
            }
            upload.finish().await?;
            delete(local, &rec.object).await?;
            moved += 1;
        }
        Ok(moved)
    }
}

/// (job, attempt) of `<job>/<attempt>.log.zst`.
fn parse_name(rel: &str) -> Option<(u64, u32)> {
    let (job, file) = rel.split_once('/')?;
    let attempt = file.strip_suffix(".log.zst")?;
    Some((job.parse().ok()?, attempt.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use trunkfarm_proto::v1::{JobRef, LogChunk, LogStream};

    use super::*;
    use crate::store::Store;

    fn chunk(job_id: u64, attempt: u32, seq: u64, data: &[u8]) -> LogChunk {
        LogChunk {
            job: Some(JobRef { job_id, attempt }),
            seq,
            stream: LogStream::Stdout.into(),
            data: data.to_vec(),
        }
    }

    /// A log of `len` bytes that compresses like a real one (lines with
    /// counters), not to nothing.
    fn sample_log(len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 64);
        let mut n = 0u64;
        while out.len() < len {
            n += 1;
            let noise = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
            out.extend_from_slice(format!("test {n} ... ok ({noise} µs)\n").as_bytes());
        }
        out.truncate(len);
        out
    }

    /// Appends `log` as chunks of varied sizes; returns how many.
    fn append_log(logs: &JobLogs, job_id: u64, attempt: u32, log: &[u8]) -> u64 {
        let (mut at, mut seq) = (0usize, 0u64);
        while at < log.len() {
            seq += 1;
            let len = [1000, 65_536, 7, 300_000][seq as usize % 4].min(log.len() - at);
            logs.append(chunk(job_id, attempt, seq, &log[at..at + len]))
                .unwrap();
            at += len;
        }
        seq
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        store: Store,
        objects_dir: std::path::PathBuf,
        objects: Objects,
        logs: Arc<JobLogs>,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let objects_dir = dir.path().join("objects");
        std::fs::create_dir_all(&objects_dir).unwrap();
        let objects = Objects::local(&objects_dir).unwrap();
        let logs = Arc::new(JobLogs::open(&store, 1 << 30, objects.clone()).unwrap());
        Fixture {
            _dir: dir,
            store,
            objects_dir,
            objects,
            logs,
        }
    }

    async fn log_objects(objects: &Objects) -> Vec<String> {
        let mut out = Vec::new();
        let mut listed = objects.store().list(Some(&objects.path("logs")));
        while let Some(meta) = listed.next().await {
            out.push(meta.unwrap().location.to_string());
        }
        out
    }

    fn stored_chunks(logs: &JobLogs, job_id: u64, attempt: u32) -> usize {
        logs.stored_chunks(job_id, attempt).unwrap().len()
    }

    async fn whole(logs: &JobLogs, job_id: u64, attempt: u32) -> Vec<u8> {
        logs.read(job_id, Some(attempt))
            .await
            .unwrap()
            .into_iter()
            .flat_map(|c| c.data)
            .collect()
    }

    #[tokio::test]
    async fn a_compacted_log_reads_back_byte_for_byte_in_any_range() {
        let f = fixture();
        let log = sample_log(2 * FRAME_BYTES + 123_457);
        let chunks = append_log(&f.logs, 4, 2, &log);
        append_log(&f.logs, 4, 1, b"the first attempt");

        let Compaction::Done(rec) = f.logs.compact(4, 2).await.unwrap() else {
            panic!("not compacted")
        };
        assert_eq!(rec.size, log.len() as u64);
        assert_eq!((rec.chunks, rec.max_seq), (chunks, chunks));
        assert_eq!(rec.frames.len(), 3, "frames of {FRAME_BYTES} bytes");
        assert!(rec.stored < rec.size / 2, "compressed: {rec:?}");
        assert_eq!(stored_chunks(&f.logs, 4, 2), 0, "the chunks are gone");
        assert_eq!(f.logs.compacted(4, 2).unwrap(), Some(rec.clone()));
        assert_eq!(stored_chunks(&f.logs, 4, 1), 1, "the other attempt stays");
        assert_eq!(log_objects(&f.objects).await.len(), 1);

        let frame = FRAME_BYTES as u64;
        let size = log.len() as u64;
        for (offset, limit) in [
            (0, 10),
            (frame - 10, 20),
            (frame - 1, 1),
            (frame, 1),
            (frame - 5, frame + 10),
            (0, size),
            (size - 3, 100),
            (size, 10),
            (size + 50, 10),
        ] {
            let r = f.logs.range(4, 2, Some(offset), limit, None).await.unwrap();
            let from = offset.min(size) as usize;
            let to = offset.saturating_add(limit).min(size) as usize;
            assert_eq!(r.data, &log[from..to], "range {offset}+{limit}");
            assert_eq!(
                (r.offset, r.next_offset, r.total),
                (from as u64, to as u64, size)
            );
        }
        let tail = f.logs.range(4, 2, None, 1000, None).await.unwrap();
        assert_eq!(tail.data, &log[log.len() - 1000..]);
        assert_eq!(f.logs.size(4, 2).await.unwrap(), size);
        assert_eq!(whole(&f.logs, 4, 2).await, log);
        // Both attempts, in order, through the sync reader the mails use.
        let all: Vec<u8> = tokio::task::spawn_blocking({
            let logs = f.logs.clone();
            move || logs.read_blocking(4, None)
        })
        .await
        .unwrap()
        .unwrap()
        .into_iter()
        .flat_map(|c| c.data)
        .collect();
        assert_eq!(all, [&b"the first attempt"[..], &log].concat());

        // Compacting again changes nothing.
        assert_eq!(f.logs.compact(4, 2).await.unwrap(), Compaction::Already);
        assert_eq!(f.logs.compact(4, 9).await.unwrap(), Compaction::Empty);
        assert_eq!(log_objects(&f.objects).await.len(), 1);
    }

    #[tokio::test]
    async fn a_compacted_log_keeps_which_stream_each_byte_came_from() {
        let f = fixture();
        let mut want: Vec<(i32, Vec<u8>)> = Vec::new();
        let streams = [LogStream::System, LogStream::Stdout, LogStream::Stderr];
        let mut seq = 0;
        // Stretches of each stream, some across a frame boundary.
        for (i, len) in [10, FRAME_BYTES - 15, 30, 7, FRAME_BYTES, 1]
            .into_iter()
            .enumerate()
        {
            let stream = streams[i % 3];
            let data = sample_log(len);
            // Two chunks per stretch: merged into one run.
            for half in [&data[..len / 2], &data[len / 2..]] {
                seq += 1;
                f.logs
                    .append(LogChunk {
                        stream: stream.into(),
                        ..chunk(2, 1, seq, half)
                    })
                    .unwrap();
            }
            want.push((stream as i32, data));
        }
        let Compaction::Done(rec) = f.logs.compact(2, 1).await.unwrap() else {
            panic!("not compacted")
        };
        assert_eq!(rec.streams.raw, 6, "one run per stretch");
        // Read back and merge consecutive chunks of one stream.
        let mut got: Vec<(i32, Vec<u8>)> = Vec::new();
        let chunks = f.logs.read(2, None).await.unwrap();
        let seqs: Vec<u64> = chunks.iter().map(|c| c.seq).collect();
        assert_eq!(seqs, (1..=chunks.len() as u64).collect::<Vec<_>>());
        for c in chunks {
            match got.last_mut() {
                Some((s, d)) if *s == c.stream => d.extend_from_slice(&c.data),
                _ => got.push((c.stream, c.data)),
            }
        }
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!((g.0, g.1.len()), (w.0, w.1.len()), "stretch {i}");
            assert!(g.1 == w.1, "stretch {i}'s bytes");
        }
    }

    #[tokio::test]
    async fn a_big_log_goes_up_in_parts_and_reads_back() {
        let f = fixture();
        // Noise compresses badly: more than one part.
        let mut log = Vec::with_capacity(PART_BYTES + 2 * FRAME_BYTES);
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        while log.len() < PART_BYTES + 2 * FRAME_BYTES {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            log.extend_from_slice(&x.to_le_bytes());
        }
        append_log(&f.logs, 8, 1, &log);
        let Compaction::Done(rec) = f.logs.compact(8, 1).await.unwrap() else {
            panic!("not compacted")
        };
        assert!(rec.stored > PART_BYTES as u64, "{}", rec.stored);
        assert_eq!(whole(&f.logs, 8, 1).await, log);
        let mid = PART_BYTES as u64 - 7;
        let r = f.logs.range(8, 1, Some(mid), 20, None).await.unwrap();
        assert_eq!(r.data, &log[mid as usize..mid as usize + 20]);
    }

    #[tokio::test]
    async fn a_crash_between_the_object_and_its_record_is_redone_once() {
        let f = fixture();
        let log = sample_log(FRAME_BYTES + 999);
        append_log(&f.logs, 3, 1, &log);
        // Step 1 only, as if the hub were killed right after the put.
        let rec = f.logs.put_object(3, 1).await.unwrap().expect("put");
        assert_eq!(log_objects(&f.objects).await.len(), 1);
        drop(rec);

        // The restarted hub: the chunks are the log.
        let logs = JobLogs::open(&f.store, 1 << 30, f.objects.clone()).unwrap();
        assert_eq!(logs.compacted(3, 1).unwrap(), None);
        assert_eq!(logs.size(3, 1).await.unwrap(), log.len() as u64);
        assert_eq!(whole(&logs, 3, 1).await, log);
        let Compaction::Done(_) = logs.compact(3, 1).await.unwrap() else {
            panic!("not compacted")
        };
        assert_eq!(log_objects(&f.objects).await.len(), 1, "the same object");
        assert_eq!(stored_chunks(&logs, 3, 1), 0);
        assert_eq!(whole(&logs, 3, 1).await, log);
    }

    #[tokio::test]
    async fn a_log_smaller_than_compact_logs_from_stays_in_the_database() {
        let f = fixture();
        let logs = JobLogs::open_local(&f.store, 1 << 30)
            .unwrap()
            .with_compact_from(4096);
        let small = sample_log(4000);
        append_log(&logs, 11, 1, &small);
        assert_eq!(logs.compact(11, 1).await.unwrap(), Compaction::Small);
        assert!(stored_chunks(&logs, 11, 1) > 0);
        assert_eq!(whole(&logs, 11, 1).await, small);
        let big = sample_log(5000);
        append_log(&logs, 12, 1, &big);
        let Compaction::Done(_) = logs.compact(12, 1).await.unwrap() else {
            panic!("a 5000-byte log is compacted")
        };
        assert_eq!(stored_chunks(&logs, 12, 1), 0);
        assert_eq!(whole(&logs, 12, 1).await, big);
    }

    #[tokio::test]
    async fn chunks_resent_after_compaction_are_ignored() {
        let f = fixture();
        f.logs.append(chunk(5, 1, 1, b"one ")).unwrap();
        f.logs.append(chunk(5, 1, 2, b"two")).unwrap();
        f.logs.compact(5, 1).await.unwrap();
        // The agent resends what the hub had not acknowledged.
        f.logs.append(chunk(5, 1, 2, b"two")).unwrap();
        let fresh = JobLogs::open(&f.store, 1 << 30, f.objects.clone()).unwrap();
        fresh.append(chunk(5, 1, 1, b"one ")).unwrap();
        assert_eq!(stored_chunks(&fresh, 5, 1), 0);
        assert_eq!(whole(&fresh, 5, 1).await, b"one two");
        let job = JobRef {
            job_id: 5,
            attempt: 1,
        };
        assert_eq!(fresh.gap(&job, 2).unwrap(), None);
    }

    #[tokio::test]
    async fn a_watched_log_waits_for_its_watcher() {
        let f = fixture();
        f.logs.append(chunk(6, 1, 1, b"watched")).unwrap();
        let pin = f.logs.pin(6);
        assert_eq!(f.logs.compact(6, 1).await.unwrap(), Compaction::Pinned);
        assert_eq!(f.logs.compact(6, 1).await.unwrap(), Compaction::Pinned);
        assert_eq!(stored_chunks(&f.logs, 6, 1), 1);
        assert!(
            log_objects(&f.objects).await.is_empty(),
            "nothing is uploaded while the log is watched"
        );
        drop(pin);
        assert!(matches!(
            f.logs.compact(6, 1).await.unwrap(),
            Compaction::Done(_)
        ));
        assert_eq!(log_objects(&f.objects).await.len(), 1);
    }

    #[tokio::test]
    async fn pruning_removes_the_record_then_the_object() {
        let f = fixture();
        append_log(&f.logs, 7, 1, &sample_log(5000));
        append_log(&f.logs, 7, 2, b"not compacted");
        f.logs.compact(7, 1).await.unwrap();
        assert_eq!(f.logs.next_job(0).unwrap(), Some(7));
        while f.logs.remove(&[7], 1).await.unwrap() == 0 {}
        assert_eq!(f.logs.compacted(7, 1).unwrap(), None);
        assert_eq!(f.logs.size(7, 2).await.unwrap(), 0);
        assert!(log_objects(&f.objects).await.is_empty());
        assert_eq!(f.logs.next_job(0).unwrap(), None);
    }

    /// Retention removes many jobs' logs in one step, never more entries
    /// than asked, and says which jobs are wholly gone.
    #[tokio::test]
    async fn pruning_removes_several_jobs_logs_in_one_bounded_step() {
        let f = fixture();
        append_log(&f.logs, 7, 1, &sample_log(5000));
        f.logs.compact(7, 1).await.unwrap();
        let chunks = append_log(&f.logs, 8, 1, &sample_log(65_544));
        assert_eq!(chunks, 3, "job 8's log is three chunks, not compacted");
        append_log(&f.logs, 9, 1, &sample_log(5000));
        f.logs.compact(9, 1).await.unwrap();
        assert_eq!(log_objects(&f.objects).await.len(), 2);

        // 7's record and two of 8's chunks: 8 may have more left.
        assert_eq!(f.logs.remove(&[7, 8, 9], 3).await.unwrap(), 1);
        assert_eq!(f.logs.compacted(7, 1).unwrap(), None);
        assert_eq!(log_objects(&f.objects).await.len(), 1, "7's object went");
        assert_eq!(f.logs.next_job(0).unwrap(), Some(8));
        // 8's last chunk and 9's record.
        assert_eq!(f.logs.remove(&[8, 9], 3).await.unwrap(), 2);
        assert_eq!(f.logs.size(8, 1).await.unwrap(), 0);
        assert_eq!(f.logs.compacted(9, 1).unwrap(), None);
        assert!(log_objects(&f.objects).await.is_empty());
        assert_eq!(f.logs.next_job(0).unwrap(), None);
    }

    /// Retention removing a job's log while it is compacted is no damage:
    /// the compaction stands down and its object goes.
    #[tokio::test]
    async fn a_log_removed_during_its_compaction_is_dropped_quietly() {
        let f = fixture();
        append_log(&f.logs, 8, 1, &sample_log(400_000));
        let rec = f.logs.put_object(8, 1).await.unwrap().unwrap();
        assert!(rec.chunks > 1);
        while f.logs.remove(&[8], 1).await.unwrap() == 0 {}
        assert_eq!(
            f.logs.write_record(8, 1, rec).await.unwrap(),
            Compaction::Empty
        );
        assert!(log_objects(&f.objects).await.is_empty());
        assert_eq!(f.logs.compacted(8, 1).unwrap(), None);
    }

    /// The orphan sweep runs again while the hub runs, not only at start.
    #[tokio::test]
    async fn orphans_are_swept_periodically_too() {
        let f = fixture();
        let stop = CancellationToken::new();
        let task = Compactor::new(f.logs.clone(), Arc::new(|_| Ok(false)))
            .with_sweep_every(Duration::from_millis(50))
            .start(stop.clone());
        // After the start's sweep: an object whose record is gone, old.
        tokio::time::sleep(Duration::from_millis(20)).await;
        append_log(&f.logs, 4, 1, b"orphaned later");
        f.logs.put_object(4, 1).await.unwrap();
        let old = std::time::SystemTime::now() - 2 * ORPHAN_AGE;
        for path in files(&f.objects_dir) {
            let file = std::fs::File::options().write(true).open(&path).unwrap();
            file.set_modified(old).unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !log_objects(&f.objects).await.is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the orphan was never swept"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.cancel();
        task.await.unwrap();
    }

    /// Every file under `dir`, recursively.
    fn files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(files(&p));
            } else {
                out.push(p);
            }
        }
        out
    }

    #[tokio::test]
    async fn old_orphans_are_swept_at_start() {
        let f = fixture();
        append_log(&f.logs, 1, 1, b"kept");
        f.logs.compact(1, 1).await.unwrap();
        append_log(&f.logs, 2, 1, b"orphaned");
        f.logs.put_object(2, 1).await.unwrap();
        append_log(&f.logs, 3, 1, b"young orphan");
        f.logs.put_object(3, 1).await.unwrap();
        // Age every object but job 3's by two hours.
        let old = std::time::SystemTime::now() - 2 * ORPHAN_AGE;
        for path in files(&f.objects_dir) {
            if !path.to_string_lossy().contains("logs/3/") {
                let file = std::fs::File::options().write(true).open(&path).unwrap();
                file.set_modified(old).unwrap();
            }
        }
        let compactor = Compactor::new(f.logs.clone(), Arc::new(|_| Ok(false)));
        assert_eq!(compactor.sweep_orphans().await.unwrap(), 1);
        let left = log_objects(&f.objects).await;
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(!left.iter().any(|p| p.contains("logs/2/")), "{left:?}");
        assert_eq!(whole(&f.logs, 1, 1).await, b"kept");
    }

    #[tokio::test]
    async fn an_outage_keeps_the_chunks_and_compaction_retries() {
        let f = fixture();
        let log = sample_log(3 * FRAME_BYTES / 2);
        append_log(&f.logs, 9, 1, &log);
        // The store breaks: its directory becomes a file.
        let moved = f.objects_dir.with_extension("away");
        std::fs::rename(&f.objects_dir, &moved).unwrap();
        std::fs::write(&f.objects_dir, b"not a directory").unwrap();
        assert!(matches!(
            f.logs.compact(9, 1).await,
            Err(LogsError::Objects(_))
        ));
        assert_eq!(whole(&f.logs, 9, 1).await, log, "still in the database");

        let asked = Arc::new(AtomicBool::new(false));
        let finished: IsFinished = {
            let asked = asked.clone();
            Arc::new(move |_| {
                asked.store(true, Ordering::Relaxed);
                Ok(true)
            })
        };
        let stop = CancellationToken::new();
        let task = Compactor::new(f.logs.clone(), finished)
            .with_backoff(Duration::from_millis(20), Duration::from_millis(100))
            .start(stop.clone());
        f.logs.finished(9, 1);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(asked.load(Ordering::Relaxed), "the start-up sweep ran");
        assert!(f.logs.compaction_totals().1 > 0, "failures are counted");
        assert_eq!(f.logs.compacted(9, 1).unwrap(), None);
        assert!(stored_chunks(&f.logs, 9, 1) > 0);

        // The store is back: the compactor gets there on its own.
        std::fs::remove_file(&f.objects_dir).unwrap();
        std::fs::rename(&moved, &f.objects_dir).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while f.logs.compacted(9, 1).unwrap().is_none() {
            assert!(Instant::now() < deadline, "not compacted after the outage");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.cancel();
        task.await.unwrap();
        assert_eq!(f.logs.compaction_totals().0, 1);
        assert_eq!(stored_chunks(&f.logs, 9, 1), 0);
        assert_eq!(whole(&f.logs, 9, 1).await, log);
        assert_eq!(log_objects(&f.objects).await.len(), 1);
    }

    #[tokio::test]
    async fn a_compacted_log_is_unreadable_while_the_store_is_down_and_readable_after() {
        let f = fixture();
        append_log(&f.logs, 12, 1, b"kept through an outage\n");
        f.logs.compact(12, 1).await.unwrap();
        let moved = f.objects_dir.with_extension("away");
        std::fs::rename(&f.objects_dir, &moved).unwrap();
        assert!(matches!(
            f.logs.range(12, 1, Some(0), 10, None).await,
            Err(LogsError::Objects(_))
        ));
        assert_eq!(f.logs.size(12, 1).await.unwrap(), 23, "from the record");
        let blocking = tokio::task::spawn_blocking({
            let logs = f.logs.clone();
            move || logs.read_blocking(12, None).map(|c| c.len())
        })
        .await
        .unwrap();
        assert!(
            matches!(blocking, Err(LogsError::Objects(_))),
            "{blocking:?}"
        );
        std::fs::rename(&moved, &f.objects_dir).unwrap();
        assert_eq!(whole(&f.logs, 12, 1).await, b"kept through an outage\n");
    }

    #[tokio::test]
    async fn the_start_up_sweep_compacts_finished_jobs_only() {
        let f = fixture();
        append_log(&f.logs, 10, 1, b"finished before the restart");
        append_log(&f.logs, 11, 1, b"still running");
        let stop = CancellationToken::new();
        let task =
            Compactor::new(f.logs.clone(), Arc::new(|job| Ok(job == 10))).start(stop.clone());
        let deadline = Instant::now() + Duration::from_secs(20);
        while f.logs.compacted(10, 1).unwrap().is_none() {
            assert!(Instant::now() < deadline, "not compacted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.cancel();
        task.await.unwrap();
        assert_eq!(f.logs.compacted(11, 1).unwrap(), None);
        assert_eq!(stored_chunks(&f.logs, 11, 1), 1);
    }

    /// Compacted logs of a hub whose store was local move into the new
    /// store (the bucket, here another directory) and read from there.
    #[tokio::test]
    async fn compacted_logs_move_from_the_local_store_into_the_new_one() {
        let f = fixture();
        let log = sample_log(3 * FRAME_BYTES / 2);
        append_log(&f.logs, 5, 1, &log);
        f.logs.compact(5, 1).await.unwrap();
        append_log(&f.logs, 6, 1, b"short");
        f.logs.compact(6, 1).await.unwrap();
        // The hub starts again with another store.
        let bucket_dir = f.objects_dir.with_extension("bucket");
        let bucket = Objects::local(&bucket_dir).unwrap();
        let moved = JobLogs::open(&f.store, 1 << 30, bucket.clone()).unwrap();
        assert!(
            moved.read(5, None).await.unwrap_err().is_permanent(),
            "not there before the move"
        );
        assert_eq!(moved.migrate_from(&f.objects).await.unwrap(), 2);
        assert_eq!(whole(&moved, 5, 1).await, log);
        assert_eq!(whole(&moved, 6, 1).await, b"short");
        assert!(log_objects(&f.objects).await.is_empty(), "deleted locally");
        assert_eq!(log_objects(&bucket).await.len(), 2);
        // Again (a start after a killed move): nothing left to move.
        assert_eq!(moved.migrate_from(&f.objects).await.unwrap(), 0);
        assert_eq!(whole(&moved, 5, 1).await, log);
    }
}
