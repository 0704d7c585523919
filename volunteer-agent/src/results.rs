//! Results the hub has not acknowledged yet, and their attempts' logs.
//!
//! A finished job's result is the one thing the agent must not lose: the
//! hub's lease on the job waits for it. Each result is kept in memory and in
//! `<state-dir>/results/<job>-<attempt>.json` until the hub's `ResultAck`
//! for it arrives, so a result survives a lost connection (it is resent after
//! the next welcome) and a restart of the agent (it is loaded, listed in the
//! hello and resent).
//!
//! The attempt's log chunks the agent still keeps (all of them: the agent
//! cannot know which the hub stored durably, see `outbox.rs`) are saved
//! beside it, in `<job>-<attempt>.log`, written before the result file and
//! removed after it. So an agent killed after finishing a job, but before
//! the hub acknowledged it, sends the job's whole log again with its result
//! on the next start, and the hub keeps what it lacked. The file holds at
//! most the output cap of the run that made it (4 MiB by default). Chunks of
//! a job still running are not saved: an agent that dies loses its running
//! jobs' attempts anyway (the hub requeues them), and their logs with them.
//!
//! The log file's format (binary, so a log costs its own size): the magic
//! line [`LOG_MAGIC`], then per chunk its seq (u64), stream (i32) and length
//! (u32), big-endian, and the bytes.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use trunkfarm_proto::v1::{JobRef, JobResult, LogChunk};

use crate::state;

/// A job attempt as a map key: `(job_id, attempt)`, ordered.
pub(crate) type JobKey = (u64, u32);

/// The key of `job`.
pub(crate) fn key(job: &JobRef) -> JobKey {
    (job.job_id, job.attempt)
}

/// The `JobRef` of a key.
pub(crate) fn job_ref((job_id, attempt): JobKey) -> JobRef {
    JobRef { job_id, attempt }
}

/// Unacknowledged results, in memory and on disk.
#[derive(Debug)]
pub(crate) struct ResultStore {
    /// `<state-dir>/results`.
    dir: PathBuf,
    /// The results, by job attempt.
    pending: BTreeMap<JobKey, JobResult>,
    /// Log chunks saved with pending results by an earlier run, until
    /// [`ResultStore::take_logs`].
    loaded_logs: Vec<LogChunk>,
}

/// The first bytes of a saved log.
const LOG_MAGIC: &[u8] = b"trunkfarm-log 1\n";

impl ResultStore {
    /// Opens (creating it, 0700) the results directory and loads the results
    /// a previous run left, and their logs. A file that cannot be parsed is
    /// renamed to `*.corrupt` (kept for inspection, never resent) with a
    /// warning; a log without its result (acknowledged, then the agent
    /// stopped before deleting it) is deleted.
    pub fn open(dir: PathBuf) -> io::Result<ResultStore> {
        state::create_private_dir(&dir)?;
        let mut pending = BTreeMap::new();
        let mut logs: Vec<PathBuf> = Vec::new();
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if state::is_temp_file(&name) {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            if name.ends_with(".log") {
                logs.push(path);
                continue;
            }
            if !name.ends_with(".json") {
                continue;
            }
            match load(&path) {
                Ok(result) => {
                    if let Some(job) = result.job {
                        pending.insert(key(&job), result);
                    }
                }
                Err(detail) => {
                    let aside = path.with_extension("json.corrupt");
                    tracing::warn!(
                        path = %path.display(),
                        "cannot read a saved job result ({detail}); moving it to {}",
                        aside.display()
                    );
                    let _ = std::fs::rename(&path, &aside);
                }
            }
        }
        let mut store = ResultStore {
            dir,
            pending,
            loaded_logs: Vec::new(),
        };
        for path in logs {
            let job = store
                .pending
                .keys()
                .copied()
                .find(|job| store.log_path(&job_ref(*job)) == path);
            let Some(job) = job else {
                let _ = std::fs::remove_file(&path);
                continue;
            };
            match load_log(&path, job_ref(job)) {
                Ok(chunks) => store.loaded_logs.extend(chunks),
                Err(detail) => {
                    let aside = path.with_extension("log.corrupt");
                    tracing::warn!(
                        job = job.0,
                        attempt = job.1,
                        path = %path.display(),
                        "cannot read the job's saved log ({detail}); moving it to {}; the \
                         result is still delivered, but the hub may lack parts of the log",
                        aside.display()
                    );
                    let _ = std::fs::rename(&path, &aside);
                }
            }
        }
        Ok(store)
    }

    /// The log chunks saved with pending results by an earlier run (once).
    pub fn take_logs(&mut self) -> Vec<LogChunk> {
        std::mem::take(&mut self.loaded_logs)
    }

    /// Keeps `result` until it is acknowledged (a result for the same attempt
    /// replaces it), saving `log` (the attempt's chunks the agent still
    /// keeps, in seq order) beside it first. Saving to disk is best effort:
    /// on failure the result (or log) is still delivered unless the agent
    /// stops first, and a warning says so.
    pub fn insert<'a>(&mut self, result: JobResult, log: impl IntoIterator<Item = &'a LogChunk>) {
        let Some(job) = result.job else {
            return;
        };
        let encoded = encode_log(log);
        if encoded.len() > LOG_MAGIC.len() {
            let path = self.log_path(&job);
            if let Err(e) = state::write_atomic(&path, &encoded, 0o600) {
                tracing::warn!(
                    job = job.job_id,
                    attempt = job.attempt,
                    "cannot save the job's log to {}: {e}; parts of it may be lost if the \
                     agent stops before the hub acknowledges the result",
                    path.display()
                );
            }
        }
        let path = self.path(&job);
        match serde_json::to_vec(&result) {
            Ok(json) => {
                if let Err(e) = state::write_atomic(&path, &json, 0o600) {
                    tracing::warn!(
                        job = job.job_id,
                        attempt = job.attempt,
                        "cannot save the job's result to {}: {e}; it is lost if the agent \
                         stops before the hub acknowledges it",
                        path.display()
                    );
                }
            }
            Err(e) => tracing::warn!(job = job.job_id, "cannot encode the job's result: {e}"),
        }
        self.pending.insert(key(&job), result);
    }

    /// The hub acknowledged `job`'s result: forget it and its log. Returns
    /// false if it was not pending.
    pub fn remove(&mut self, job: &JobRef) -> bool {
        // The result first: a log left without it is deleted at the next open.
        for path in [self.path(job), self.log_path(job)] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(
                    "cannot delete the delivered {}: {e}; it will be sent again (and \
                     ignored by the hub) on the next start",
                    path.display()
                ),
            }
        }
        self.pending.remove(&key(job)).is_some()
    }

    /// True if `job`'s result waits for an acknowledgement.
    pub fn contains(&self, job: &JobRef) -> bool {
        self.pending.contains_key(&key(job))
    }

    /// The job attempts whose result is pending, in order.
    pub fn jobs(&self) -> impl Iterator<Item = JobRef> + '_ {
        self.pending.keys().map(|k| job_ref(*k))
    }

    /// The pending results, in job order.
    pub fn results(&self) -> impl Iterator<Item = &JobResult> {
        self.pending.values()
    }

    /// How many results are pending.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// True if every result was acknowledged.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// The results directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file of `job`'s result.
    fn path(&self, job: &JobRef) -> PathBuf {
        self.dir
            .join(format!("{}-{}.json", job.job_id, job.attempt))
    }

    /// The file of `job`'s saved log.
    fn log_path(&self, job: &JobRef) -> PathBuf {
        self.dir.join(format!("{}-{}.log", job.job_id, job.attempt))
    }
}

/// A log file's contents: [`LOG_MAGIC`], then each chunk.
fn encode_log<'a>(chunks: impl IntoIterator<Item = &'a LogChunk>) -> Vec<u8> {
    let mut out = LOG_MAGIC.to_vec();
    for chunk in chunks {
        out.extend_from_slice(&chunk.seq.to_be_bytes());
        out.extend_from_slice(&chunk.stream.to_be_bytes());
        out.extend_from_slice(
            &u32::try_from(chunk.data.len())
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        out.extend_from_slice(&chunk.data[..chunk.data.len().min(u32::MAX as usize)]);
    }
    out
}

/// Reads one saved log of `job`; `Err` is a short reason.
fn load_log(path: &Path, job: JobRef) -> Result<Vec<LogChunk>, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    decode_log(&bytes, job)
}

/// The chunks of a log file's contents.
fn decode_log(bytes: &[u8], job: JobRef) -> Result<Vec<LogChunk>, String> {
    let mut rest = bytes
        .strip_prefix(LOG_MAGIC)
        .ok_or("it is not a trunkfarm log file")?;
    let mut chunks = Vec::new();
    while !rest.is_empty() {
        let (head, tail) = rest
            .split_at_checked(16)
            .ok_or("it ends inside a chunk header")?;
        let seq = u64::from_be_bytes(head[..8].try_into().unwrap_or_default());
        let stream = i32::from_be_bytes(head[8..12].try_into().unwrap_or_default());
        let len = u32::from_be_bytes(head[12..].try_into().unwrap_or_default()) as usize;
        let (data, tail) = tail.split_at_checked(len).ok_or("it ends inside a chunk")?;
        chunks.push(LogChunk {
            job: Some(job),
            seq,
            stream,
            data: data.to_vec(),
        });
        rest = tail;
    }
    Ok(chunks)
}

/// Reads one saved result; `Err` is a short reason.
fn load(path: &Path) -> Result<JobResult, String> {
    let text = std::fs::read(path).map_err(|e| e.to_string())?;
    let result: JobResult = serde_json::from_slice(&text).map_err(|e| e.to_string())?;
    match result.job {
        Some(job) if job.job_id != 0 => Ok(result),
        _ => Err("it names no job".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trunkfarm_proto::v1::Outcome;

    fn result(id: u64, attempt: u32) -> JobResult {
        JobResult {
            job: Some(JobRef {
                job_id: id,
                attempt,
            }),
            outcome: Outcome::Failed as i32,
            exit_code: Some(3),
            detail: "command 1 of 1 exited with status 3".into(),
            duration_ms: 1234,
            log_bytes_cut: 5,
            started_at_ms: 1_700_000_000_000,
            last_log_seq: 9,
            artifact_sha256: String::new(),
            reports: Vec::new(),
            handed_back: false,
        }
    }

    #[test]
    fn reports_and_artifacts_are_kept_and_old_files_still_load() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("results");
        let mut store = ResultStore::open(dir.clone()).unwrap();
        let full = JobResult {
            artifact_sha256: "ab".repeat(32),
            reports: vec![trunkfarm_proto::v1::ReportFile {
                path: "out/junit.xml".into(),
                data: vec![0, 1, 2, 255],
                truncated: true,
                error: String::new(),
            }],
            ..result(4, 1)
        };
        store.insert(full.clone(), []);
        // A file written by an agent that knew neither field.
        std::fs::write(
            dir.join("5-1.json"),
            r#"{"job":{"job_id":5,"attempt":1},"outcome":2,"exit_code":3,"detail":"d","duration_ms":1,"log_bytes_cut":0,"started_at_ms":1,"last_log_seq":2}"#,
        )
        .unwrap();
        let again = ResultStore::open(dir).unwrap();
        let loaded: Vec<&JobResult> = again.results().collect();
        assert_eq!(loaded[0], &full);
        assert_eq!(loaded[1].job.unwrap().job_id, 5);
        assert!(loaded[1].reports.is_empty());
        assert!(loaded[1].artifact_sha256.is_empty());
    }

    #[test]
    fn results_survive_a_restart_until_acknowledged() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("results");
        let mut store = ResultStore::open(dir.clone()).unwrap();
        assert!(store.is_empty());
        store.insert(result(7, 2), []);
        store.insert(result(3, 1), []);
        assert!(dir.join("7-2.json").is_file());

        let mut again = ResultStore::open(dir.clone()).unwrap();
        assert_eq!(again.len(), 2);
        let jobs: Vec<JobRef> = again.jobs().collect();
        assert_eq!(
            jobs,
            [
                JobRef {
                    job_id: 3,
                    attempt: 1
                },
                JobRef {
                    job_id: 7,
                    attempt: 2
                }
            ]
        );
        assert_eq!(again.results().nth(1), Some(&result(7, 2)));

        assert!(again.remove(&JobRef {
            job_id: 7,
            attempt: 2
        }));
        assert!(!again.remove(&JobRef {
            job_id: 7,
            attempt: 2
        }));
        assert!(!dir.join("7-2.json").exists());
        let third = ResultStore::open(dir).unwrap();
        assert_eq!(third.len(), 1);
        assert!(third.contains(&JobRef {
            job_id: 3,
            attempt: 1
        }));
    }

    #[test]
    fn damaged_files_are_set_aside() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("results");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("1-1.json"), b"{not json").unwrap();
        std::fs::write(dir.join("2-1.json"), b"{}").unwrap();
        std::fs::write(dir.join(".3-1.json.1.2.tmp"), b"half").unwrap();
        let store = ResultStore::open(dir.clone()).unwrap();
        assert!(store.is_empty());
        assert!(dir.join("1-1.json.corrupt").is_file());
        assert!(dir.join("2-1.json.corrupt").is_file());
        assert!(!dir.join(".3-1.json.1.2.tmp").exists());
    }

    fn chunk(job: JobRef, seq: u64, data: &[u8]) -> LogChunk {
        LogChunk {
            job: Some(job),
            seq,
            stream: if seq % 2 == 0 { 2 } else { 1 },
            data: data.to_vec(),
        }
    }

    #[test]
    fn the_log_of_an_unacknowledged_result_survives_a_restart() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("results");
        let mut store = ResultStore::open(dir.clone()).unwrap();
        let job = JobRef {
            job_id: 7,
            attempt: 2,
        };
        let log = vec![
            chunk(job, 1, b"first\n"),
            chunk(job, 2, b""),
            chunk(job, 3, &[0, 255, 10]),
        ];
        store.insert(result(7, 2), &log);
        store.insert(result(3, 1), []);
        assert!(dir.join("7-2.log").is_file());
        assert!(!dir.join("3-1.log").exists(), "no log, no file");

        let mut again = ResultStore::open(dir.clone()).unwrap();
        assert_eq!(again.len(), 2);
        assert_eq!(again.take_logs(), log);
        assert!(again.take_logs().is_empty(), "handed out once");
        assert!(again.remove(&job));
        assert!(!dir.join("7-2.log").exists() && !dir.join("7-2.json").exists());

        // A log whose result is gone is stale; a damaged one is set aside.
        std::fs::write(dir.join("9-1.log"), encode_log(&log)).unwrap();
        std::fs::write(dir.join("3-1.log"), b"trunkfarm-log 1\n\0\0").unwrap();
        let mut third = ResultStore::open(dir.clone()).unwrap();
        assert!(third.take_logs().is_empty());
        assert!(!dir.join("9-1.log").exists());
        assert!(dir.join("3-1.log.corrupt").is_file());
        assert_eq!(third.len(), 1, "the result is still delivered");
    }

    #[test]
    fn log_files_round_trip_and_truncation_is_detected() {
        let job = JobRef {
            job_id: 1,
            attempt: 1,
        };
        let log = vec![chunk(job, 1, b"abc"), chunk(job, 2, b"de")];
        let bytes = encode_log(&log);
        assert_eq!(decode_log(&bytes, job).unwrap(), log);
        assert_eq!(decode_log(LOG_MAGIC, job).unwrap(), []);
        for cut in [LOG_MAGIC.len() + 5, bytes.len() - 1] {
            assert!(decode_log(&bytes[..cut], job).is_err(), "cut at {cut}");
        }
        assert!(decode_log(b"{}", job).is_err());
    }
}
