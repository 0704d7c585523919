//! The jobs this agent runs: whether to accept one, running it in its own
//! task, cancelling it, and turning how it ended into a `JobResult`.
//!
//! Jobs outlive connections to the hub, so nothing here knows about one: a
//! job task reports its log chunks and its end as [`JobEvent`]s on a channel
//! the session drains (in order, so a job's log always precedes its result),
//! whether or not the hub is reachable at that moment.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use trunkfarm_proto::v1::{JobRef, JobResult, JobSpec, LogChunk, Outcome};

use crate::config::AgentConfig;
use crate::executor::{self, Artifacts, ExecOutcome, JobLimits};
use crate::results::{JobKey, job_ref, key};

/// Job events waiting for the session (each log chunk is at most 64 KiB, so
/// this bounds that memory to a few MiB; a full channel pauses the jobs'
/// output, not the jobs).
const EVENT_CHANNEL: usize = 64;

/// Log chunks between one executor and its job task.
const LOG_CHANNEL: usize = 8;

/// What the donor allows, and where jobs run: everything needed to accept
/// and start a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JobPolicy {
    /// Jobs that may run at once.
    pub max_parallel: u32,
    /// Projects accepted; empty means any.
    pub allowed_projects: Vec<String>,
    /// Projects never accepted.
    pub denied_projects: Vec<String>,
    /// The donor's ceiling on a job's run time.
    pub max_job_timeout: Option<Duration>,
    /// Log bytes kept per job.
    pub output_cap: u64,
    /// Where jobs' work directories go.
    pub work_root: PathBuf,
    /// Set when every job is refused (no working sandbox): the detail.
    pub refuse_all: Option<&'static str>,
}

impl JobPolicy {
    /// The policy of `config`; jobs run under its `work_dir`, or
    /// `<state_dir>/work` when it has none.
    pub fn from_config(config: &AgentConfig, state_dir: &Path) -> Self {
        JobPolicy {
            max_parallel: config.max_parallel_jobs,
            allowed_projects: config.allowed_projects.clone(),
            denied_projects: config.denied_projects.clone(),
            max_job_timeout: config.max_job_timeout,
            output_cap: config.output_cap,
            work_root: config.work_root(state_dir),
            refuse_all: None,
        }
    }

    /// Decides whether a job with `spec` may start now, given how many run
    /// and whether the agent drains. `Ok` gives its limits and whether the
    /// donor's ceiling shortened its timeout; `Err` is the detail of the
    /// `OUTCOME_ERROR` result that refuses it.
    pub fn admit(
        &self,
        spec: &JobSpec,
        running: usize,
        draining: bool,
    ) -> Result<(JobLimits, bool), String> {
        if draining {
            return Err("agent is draining".to_owned());
        }
        if let Some(why) = self.refuse_all {
            return Err(why.to_owned());
        }
        if !spec.project.is_empty()
            && !self.allowed_projects.is_empty()
            && !self.allowed_projects.contains(&spec.project)
        {
            return Err(format!(
                "this donor does not accept project {}",
                spec.project
            ));
        }
        if self.denied_projects.contains(&spec.project) {
            return Err(format!(
                "this donor does not accept project {} (its donor denies it)",
                spec.project
            ));
        }
        if running >= self.max_parallel as usize {
            return Err("agent has no free slot".to_owned());
        }
        let (timeout, capped) = effective_timeout(spec.timeout_secs, self.max_job_timeout);
        Ok((
            JobLimits {
                timeout,
                output_cap_bytes: self.output_cap,
            },
            capped,
        ))
    }
}

/// A job's time limit: its own `timeout_secs` (0 = none) capped by the
/// donor's ceiling. Zero means no limit. The flag is true when the donor's
/// ceiling is what applies.
pub(crate) fn effective_timeout(job_secs: u64, donor: Option<Duration>) -> (Duration, bool) {
    let own = (job_secs > 0).then(|| Duration::from_secs(job_secs));
    match (own, donor) {
        (Some(own), Some(donor)) if donor < own => (donor, true),
        (Some(own), _) => (own, false),
        (None, Some(donor)) => (donor, true),
        (None, None) => (Duration::ZERO, false),
    }
}

/// A result refusing a job the agent will not run.
pub(crate) fn refusal(job: JobRef, detail: String) -> JobResult {
    JobResult {
        job: Some(job),
        outcome: Outcome::Error as i32,
        detail,
        ..JobResult::default()
    }
}

/// The result reported for a run that ended as `out`, after `last_log_seq`
/// log chunks. `cancel_reason` replaces the executor's bare "cancelled" with
/// who cancelled it; `donor_capped` notes when the donor's ceiling (not the
/// job's own timeout) timed it out.
pub(crate) fn job_result(
    job: JobRef,
    out: &ExecOutcome,
    last_log_seq: u64,
    cancel_reason: Option<&str>,
    donor_capped: bool,
) -> JobResult {
    let mut detail = out.detail.clone();
    match out.outcome {
        Outcome::Cancelled => {
            if let Some(reason) = cancel_reason {
                detail = reason.to_owned();
            }
        }
        Outcome::TimedOut if donor_capped => detail.push_str(" (this donor's max_job_timeout)"),
        _ => {}
    }
    JobResult {
        job: Some(job),
        outcome: out.outcome as i32,
        exit_code: out.exit_code,
        detail,
        duration_ms: u64::try_from(out.duration.as_millis()).unwrap_or(u64::MAX),
        log_bytes_cut: out.log_bytes_cut,
        started_at_ms: out.started_at_ms,
        last_log_seq,
        artifact_sha256: out.artifact_sha256.clone(),
        reports: out.reports.clone(),
        handed_back: false,
    }
}

/// What a job task tells the session.
#[derive(Debug)]
enum JobEvent {
    /// A chunk of the job's log, numbered.
    Log(LogChunk),
    /// The job ended (always the job's last event).
    Finished {
        /// The job attempt.
        job: JobRef,
        /// How it ended.
        outcome: ExecOutcome,
        /// The seq of its last log chunk (0 if none).
        last_log_seq: u64,
    },
}

/// What [`Jobs::next`] hands the session.
#[derive(Debug)]
pub(crate) enum JobWake {
    /// A log chunk to forward (or buffer).
    Log(LogChunk),
    /// A job ended; its result must be kept until acknowledged.
    Finished(JobResult),
}

/// A job that is running.
#[derive(Debug)]
struct Running {
    /// Fired to cancel it.
    cancel: CancellationToken,
    /// Why it was cancelled, for its result's detail.
    cancel_reason: Option<String>,
    /// The donor's ceiling is its time limit.
    donor_capped: bool,
}

/// The running jobs and their tasks.
#[derive(Debug)]
pub(crate) struct Jobs {
    /// Running jobs by attempt.
    running: BTreeMap<JobKey, Running>,
    /// The job tasks (dropping the set aborts them, which kills their
    /// processes: the executor's process groups are killed on drop).
    tasks: JoinSet<()>,
    /// Which job each task runs, to report a task that died.
    task_jobs: HashMap<tokio::task::Id, JobKey>,
    /// Handed to each job task.
    events_tx: mpsc::Sender<JobEvent>,
    /// Drained by [`Jobs::next`].
    events_rx: mpsc::Receiver<JobEvent>,
    /// Where jobs run.
    work_root: PathBuf,
    /// Runtime artifacts: the cache and the hub's store.
    artifacts: Artifacts,
}

impl Jobs {
    /// No job running; jobs will run under `work_root`, getting and
    /// publishing runtimes through `artifacts`.
    pub fn new(work_root: PathBuf, artifacts: Artifacts) -> Self {
        let (events_tx, events_rx) = mpsc::channel(EVENT_CHANNEL);
        Jobs {
            running: BTreeMap::new(),
            tasks: JoinSet::new(),
            task_jobs: HashMap::new(),
            events_tx,
            events_rx,
            work_root,
            artifacts,
        }
    }

    /// How many jobs run.
    pub fn len(&self) -> usize {
        self.running.len()
    }

    /// True if no job runs.
    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    /// True if `job` runs.
    pub fn contains(&self, job: &JobRef) -> bool {
        self.running.contains_key(&key(job))
    }

    /// The running job attempts, in order.
    pub fn jobs(&self) -> impl Iterator<Item = JobRef> + '_ {
        self.running.keys().map(|k| job_ref(*k))
    }

    /// Starts `job` in its own task.
    pub fn start(&mut self, job: JobRef, spec: JobSpec, limits: JobLimits, donor_capped: bool) {
        let cancel = CancellationToken::new();
        let task = job_task(
            job,
            spec,
            self.work_root.clone(),
            limits,
            cancel.clone(),
            self.events_tx.clone(),
            self.artifacts.clone(),
        );
        let handle = self.tasks.spawn(task);
        self.task_jobs.insert(handle.id(), key(&job));
        self.running.insert(
            key(&job),
            Running {
                cancel,
                cancel_reason: None,
                donor_capped,
            },
        );
    }

    /// Cancels `job` (its result will say `reason`). False if it does not run.
    pub fn cancel(&mut self, job: &JobRef, reason: &str) -> bool {
        match self.running.get_mut(&key(job)) {
            Some(running) => {
                running
                    .cancel_reason
                    .get_or_insert_with(|| reason.to_owned());
                running.cancel.cancel();
                true
            }
            None => false,
        }
    }

    /// Cancels every running job.
    pub fn cancel_all(&mut self, reason: &str) {
        for running in self.running.values_mut() {
            running
                .cancel_reason
                .get_or_insert_with(|| reason.to_owned());
            running.cancel.cancel();
        }
    }

    /// The next thing a job has to say. With `accept_logs` false the job
    /// events are left waiting (back-pressure on the jobs' output) and only
    /// a dead task is reported. Cancel-safe.
    pub async fn next(&mut self, accept_logs: bool) -> JobWake {
        loop {
            tokio::select! {
                event = self.events_rx.recv(), if accept_logs => match event {
                    Some(JobEvent::Log(chunk)) => return JobWake::Log(chunk),
                    Some(JobEvent::Finished { job, outcome, last_log_seq }) => {
                        if let Some(result) = self.finished(job, &outcome, last_log_seq) {
                            return JobWake::Finished(result);
                        }
                    }
                    // `self` holds a sender: never happens.
                    None => std::future::pending::<()>().await,
                },
                Some(joined) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    if let Some(result) = self.joined(joined) {
                        return JobWake::Finished(result);
                    }
                }
                else => std::future::pending::<()>().await,
            }
        }
    }

    /// Cancels every job and waits (at most `limit`) for their tasks to end,
    /// discarding what they report: used when the agent must stop at once.
    pub async fn abandon(&mut self, reason: &str, limit: Duration) {
        self.cancel_all(reason);
        let deadline = tokio::time::sleep(limit);
        tokio::pin!(deadline);
        while !self.tasks.is_empty() {
            tokio::select! {
                _ = self.events_rx.recv() => {}
                _ = self.tasks.join_next() => {}
                () = &mut deadline => break,
            }
        }
        self.running.clear();
        self.task_jobs.clear();
    }

    /// Records that `job` finished and builds its result; `None` if it was
    /// not running (already reported).
    fn finished(&mut self, job: JobRef, out: &ExecOutcome, last_log_seq: u64) -> Option<JobResult> {
        let running = self.running.remove(&key(&job))?;
        let result = job_result(
            job,
            out,
            last_log_seq,
            running.cancel_reason.as_deref(),
            running.donor_capped,
        );
        let took = humantime::format_duration(Duration::from_millis(
            u64::try_from(out.duration.as_millis()).unwrap_or(u64::MAX),
        ));
        if out.outcome == Outcome::Passed {
            tracing::info!(
                job = job.job_id,
                attempt = job.attempt,
                "job passed in {took}"
            );
        } else {
            tracing::info!(
                job = job.job_id,
                attempt = job.attempt,
                outcome = outcome_word(out.outcome),
                "job ended after {took}: {}",
                result.detail
            );
        }
        Some(result)
    }

    /// A job task ended. Normally its `Finished` event says how; if the task
    /// died instead (a panic), the job is reported as an infrastructure error.
    fn joined(
        &mut self,
        joined: Result<(tokio::task::Id, ()), tokio::task::JoinError>,
    ) -> Option<JobResult> {
        let (id, error) = match joined {
            Ok((id, ())) => (id, None),
            Err(e) => (e.id(), Some(e)),
        };
        let job = self.task_jobs.remove(&id)?;
        let error = error?;
        self.running.remove(&job)?;
        tracing::error!(job = job.0, attempt = job.1, "the job's task died: {error}");
        Some(refusal(
            job_ref(job),
            format!("the agent lost track of the job: its task died ({error})"),
        ))
    }
}

/// How an outcome reads in a log line.
fn outcome_word(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Unspecified => "unspecified",
        Outcome::Passed => "passed",
        Outcome::Failed => "failed",
        Outcome::TimedOut => "timed out",
        Outcome::Error => "error",
        Outcome::Cancelled => "cancelled",
    }
}

/// Runs one job: the executor, plus numbering its log chunks and passing
/// them on, concurrently (so a slow session never stalls the executor's own
/// timeout and cancel handling), then reports the end.
async fn job_task(
    job: JobRef,
    spec: JobSpec,
    work_root: PathBuf,
    limits: JobLimits,
    cancel: CancellationToken,
    events: mpsc::Sender<JobEvent>,
    artifacts: Artifacts,
) {
    let (log_tx, mut log_rx) = mpsc::channel(LOG_CHANNEL);
    let run = executor::run_job(&job, &spec, &work_root, limits, log_tx, cancel, &artifacts);
    let forward = async {
        let mut seq = 0u64;
        while let Some((stream, data)) = log_rx.recv().await {
            seq += 1;
            let chunk = LogChunk {
                job: Some(job),
                seq,
                stream: stream as i32,
                data,
            };
            if events.send(JobEvent::Log(chunk)).await.is_err() {
                // The session is gone: drop the receiver; the job goes on.
                break;
            }
        }
        seq
    };
    let (outcome, last_log_seq) = tokio::join!(run, forward);
    let _ = events
        .send(JobEvent::Finished {
            job,
            outcome,
            last_log_seq,
        })
        .await;
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::cache::ArtifactCache;
    use crate::transfer::fake::FakeHub;
    use trunkfarm_proto::v1::{LogStream, ReportFile};

    /// Artifacts backed by an in-memory hub and a cache under `dir`.
    fn artifacts(dir: &Path) -> Artifacts {
        Artifacts {
            cache: ArtifactCache::open(dir.join("cache"), 1 << 30).unwrap(),
            hub: Arc::new(FakeHub::default()),
            max_unpacked_bytes: 1 << 30,
            sandbox: Arc::new(crate::sandbox::Sandbox::unconfined()),
        }
    }

    const JOB: JobRef = JobRef {
        job_id: 42,
        attempt: 3,
    };

    fn policy() -> JobPolicy {
        JobPolicy {
            max_parallel: 2,
            allowed_projects: Vec::new(),
            denied_projects: Vec::new(),
            max_job_timeout: None,
            output_cap: 8192,
            work_root: PathBuf::from("/w"),
            refuse_all: None,
        }
    }

    fn spec(project: &str, timeout_secs: u64) -> JobSpec {
        JobSpec {
            commands: vec!["true".into()],
            project: project.into(),
            timeout_secs,
            ..JobSpec::default()
        }
    }

    #[test]
    fn timeouts() {
        let h = Duration::from_secs(3600);
        assert_eq!(effective_timeout(0, None), (Duration::ZERO, false));
        assert_eq!(
            effective_timeout(60, None),
            (Duration::from_secs(60), false)
        );
        assert_eq!(effective_timeout(0, Some(h)), (h, true));
        assert_eq!(effective_timeout(7200, Some(h)), (h, true));
        assert_eq!(
            effective_timeout(60, Some(h)),
            (Duration::from_secs(60), false)
        );
        assert_eq!(effective_timeout(3600, Some(h)), (h, false));
    }

    #[test]
    fn admission() {
        let p = policy();
        let (limits, capped) = p.admit(&spec("", 30), 1, false).unwrap();
        assert_eq!(limits.timeout, Duration::from_secs(30));
        assert_eq!(limits.output_cap_bytes, 8192);
        assert!(!capped);
        assert_eq!(
            p.admit(&spec("", 30), 0, true).unwrap_err(),
            "agent is draining"
        );
        assert_eq!(
            p.admit(&spec("", 30), 2, false).unwrap_err(),
            "agent has no free slot"
        );

        // Without a sandbox every job is refused, saying what to do.
        let p = JobPolicy {
            refuse_all: Some(crate::sandbox::NO_SANDBOX_REFUSAL),
            ..policy()
        };
        let refused = p.admit(&spec("", 30), 0, false).unwrap_err();
        assert!(refused.contains("apt install bubblewrap"), "{refused}");
        assert!(refused.contains("sandbox = \"none\""), "{refused}");

        let p = JobPolicy {
            allowed_projects: vec!["cpython".into()],
            max_job_timeout: Some(Duration::from_secs(10)),
            ..policy()
        };
        assert_eq!(
            p.admit(&spec("pypy", 0), 0, false).unwrap_err(),
            "this donor does not accept project pypy"
        );
        let (limits, capped) = p.admit(&spec("cpython", 0), 0, false).unwrap();
        assert_eq!(limits.timeout, Duration::from_secs(10));
        assert!(capped);
        // A job of no project is not refused by an allowlist.
        assert!(p.admit(&spec("", 0), 0, false).is_ok());

        // A denied project is refused even when the hub sends it anyway.
        let p = JobPolicy {
            denied_projects: vec!["beta".into()],
            ..policy()
        };
        assert_eq!(
            p.admit(&spec("beta", 0), 0, false).unwrap_err(),
            "this donor does not accept project beta (its donor denies it)"
        );
        assert!(p.admit(&spec("alpha", 0), 0, false).is_ok());

        // Runtime jobs and builds are accepted (the executor handles them).
        let artifact = JobSpec {
            artifact_sha256: "ab".repeat(32),
            upload_prefix: "install".into(),
            ..spec("", 0)
        };
        assert!(policy().admit(&artifact, 0, false).is_ok());
    }

    fn outcome(o: Outcome, detail: &str) -> ExecOutcome {
        ExecOutcome {
            outcome: o,
            exit_code: None,
            detail: detail.into(),
            duration: Duration::from_millis(1500),
            started_at_ms: 1_700_000_000_000,
            log_bytes_cut: 12,
            artifact_sha256: String::new(),
            reports: Vec::new(),
        }
    }

    #[test]
    fn results_from_outcomes() {
        let out = ExecOutcome {
            exit_code: Some(2),
            ..outcome(Outcome::Failed, "command 1 of 1 exited with status 2")
        };
        let r = job_result(JOB, &out, 4, None, false);
        assert_eq!(
            r,
            JobResult {
                job: Some(JOB),
                outcome: Outcome::Failed as i32,
                exit_code: Some(2),
                detail: "command 1 of 1 exited with status 2".into(),
                duration_ms: 1500,
                log_bytes_cut: 12,
                started_at_ms: 1_700_000_000_000,
                last_log_seq: 4,
                artifact_sha256: String::new(),
                reports: Vec::new(),
                handed_back: false,
            }
        );
        let built = ExecOutcome {
            artifact_sha256: "cd".repeat(32),
            reports: vec![ReportFile {
                path: "junit.xml".into(),
                data: b"<testsuite/>".to_vec(),
                ..ReportFile::default()
            }],
            ..outcome(Outcome::Passed, "")
        };
        let r = job_result(JOB, &built, 1, None, false);
        assert_eq!(r.artifact_sha256, "cd".repeat(32));
        assert_eq!(r.reports, built.reports);
        let r = job_result(
            JOB,
            &outcome(Outcome::Cancelled, "cancelled"),
            0,
            Some("cancelled by the hub: superseded"),
            false,
        );
        assert_eq!(r.detail, "cancelled by the hub: superseded");
        let r = job_result(
            JOB,
            &outcome(Outcome::TimedOut, "timed out after 10s"),
            0,
            None,
            true,
        );
        assert_eq!(
            r.detail,
            "timed out after 10s (this donor's max_job_timeout)"
        );
        let r = refusal(JOB, "agent has no free slot".into());
        assert_eq!(r.outcome, Outcome::Error as i32);
        assert_eq!(r.job, Some(JOB));
    }

    /// A real job through the task: numbered chunks, then the result whose
    /// last seq matches.
    #[tokio::test]
    async fn job_runs_and_reports_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut jobs = Jobs::new(dir.path().join("work"), artifacts(dir.path()));
        let (limits, capped) = policy().admit(&spec("", 30), 0, false).unwrap();
        let mut s = spec("", 30);
        s.commands = vec!["echo hello".into(), "echo oops >&2; exit 3".into()];
        jobs.start(JOB, s, limits, capped);
        assert!(jobs.contains(&JOB));
        let mut seqs = Vec::new();
        let mut text = Vec::new();
        let result = loop {
            match jobs.next(true).await {
                JobWake::Log(chunk) => {
                    assert_eq!(chunk.job, Some(JOB));
                    seqs.push(chunk.seq);
                    if chunk.stream != LogStream::System as i32 {
                        text.extend_from_slice(&chunk.data);
                    }
                }
                JobWake::Finished(result) => break result,
            }
        };
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
        assert_eq!(result.last_log_seq, seqs.len() as u64);
        assert_eq!(result.outcome, Outcome::Failed as i32);
        assert_eq!(result.exit_code, Some(3));
        assert_eq!(String::from_utf8_lossy(&text), "hello\noops\n");
        assert!(jobs.is_empty());
    }

    #[tokio::test]
    async fn cancel_reports_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let mut jobs = Jobs::new(dir.path().join("work"), artifacts(dir.path()));
        let mut s = spec("", 0);
        s.commands = vec!["sleep 30".into()];
        jobs.start(
            JOB,
            s,
            JobLimits {
                timeout: Duration::ZERO,
                output_cap_bytes: 0,
            },
            false,
        );
        assert!(jobs.cancel(&JOB, "cancelled by the hub"));
        assert!(!jobs.cancel(&JobRef::default(), "x"));
        let result = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if let JobWake::Finished(r) = jobs.next(true).await {
                    break r;
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(result.outcome, Outcome::Cancelled as i32);
        assert_eq!(result.detail, "cancelled by the hub");
    }
}
