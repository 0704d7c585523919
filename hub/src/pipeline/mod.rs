//! The trunk pipeline: notices new upstream and project commits, queues
//! runtime builds, takes each finished job in and has [`crate::results`]
//! record it, and fans a good runtime out to every project's tests.
//!
//! ```text
//! poll.rs     poll upstream ─► jobs.rs: build jobs ─► (agents) ─► dispatch's inbox
//! intake.rs   finished job ─► build or run outcome ─► results.record (culprits.rs: git, no poller lock)
//! jobs.rs     recorded passed build ─► fan-out: test jobs ─► (agents) ─► inbox ─► intake …
//! poll.rs     poll project ─► test jobs against the newest good runtime
//! gc.rs       after each build: delete runtime artifacts nothing refers to
//! bisect.rs   went red over several commits ─► builds and runs inside the range ─► first bad commit
//! ```
//!
//! A volunteer's verdict that would change a series (went red, fixed) is
//! not taken alone: `confirm.rs` queues a re-run of the job on another
//! agent (keyed under the original's key), and only when it agrees does the
//! recorder classify the original; every settled re-run is counted on the
//! agents it judged, and repeated disagreement quarantines an agent.
//!
//! Everything is *level-triggered*: each poll re-derives the jobs that
//! should exist (the upstream head's builds, each project head's runs against
//! the newest good runtime) and submits them under their [`JobKey`], which
//! dispatch stores at most once. A crash at any moment therefore loses
//! nothing and duplicates nothing: the next poll submits what is missing.
//! Finished jobs come back through dispatch's durable *inbox*; the pipeline
//! records each (idempotently, keyed by job id), fans a passed build out
//! (keyed too: also when the inbox hands over a build recorded before a
//! crash), and only then acknowledges it, so a result is neither lost nor
//! classified twice, and no fan-out is lost.
//!
//! A went-red result whose culprit range holds several upstream commits is
//! bisected (`bisect.rs`): its bisection's record is `results`', every step
//! is derived again from it on each bisection job taken in and on a tick.
//!
//! Owns the `pipeline` tree (branch heads and their order; see `poll.rs`).

mod bisect;
pub(crate) use bisect::MAX_BISECTION_MS;
pub(crate) mod calibrate;
mod confirm;
mod culprits;
mod gc;
pub(crate) mod git;
mod intake;
mod jobs;
mod poll;
mod query;
mod retention;
mod runs;
#[cfg(test)]
pub(crate) mod tests;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use trunkfarm_proto::v1::{BuildState, TransitionKind};

use crate::artifacts::Artifacts;
use crate::auth::credentials::{Credentials, QuarantineRule};
use crate::commit::short;
use crate::config::{HubConfig, ProjectConfig, UpstreamConfig};
use crate::dispatch::{DispatchError, Dispatcher, JobRecord, JobResultRecord};
use crate::job_key::{JobKey, RerunKind, TEST_PREFIX};
use crate::notify::Notifier;
use crate::results::{
    Breakage, BuildInfo, Commit, Finished, Grid, GridSeries, HistoryRequest, OpenRun, Recorded,
    Results, Transition, UpstreamHistory, UpstreamRow,
};
use crate::store::{Store, StoreError, Table, trees};
pub(crate) use git::GitError;
use git::{Git, Repos};
use poll::Repo;
pub(crate) use query::{ProjectFacts, RepoFacts, SeriesFacts, UpstreamFacts};
pub(crate) use runs::RunFacts;

/// Finished jobs taken from the inbox per round (each record may carry a
/// few MiB of report files).
const INBOX_BATCH: usize = 16;

/// How often the inbox is looked at even without a signal, in case one was
/// missed (e.g. jobs that finished while the hub was down).
const INBOX_TICK: Duration = Duration::from_secs(1);

/// How long a finished job whose log the object store could not hand
/// over waits before it is taken in again (the others go on meanwhile).
const LOG_RETRY: Duration = Duration::from_secs(30);

/// How often running bisections are derived again without a job taken in
/// (and at start-up): what a crash interrupted goes on.
const BISECT_TICK: Duration = Duration::from_secs(10);

/// What the pipeline can fail with.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PipelineError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Dispatch refused a job.
    #[error(transparent)]
    Dispatch(#[from] DispatchError),
    /// Git failed.
    #[error(transparent)]
    Git(#[from] GitError),
    /// An agent's record could not be updated.
    #[error(transparent)]
    Auth(#[from] crate::auth::credentials::AuthError),
    /// No such upstream in the config.
    #[error("no upstream named {0:?} is configured; known upstreams: {1}")]
    NoSuchUpstream(String, String),
    /// No such project in the config.
    #[error("no project named {0:?} is configured; known projects: {1}")]
    NoSuchProject(String, String),
    /// A finished job's log cannot be read (the object store is down).
    #[error(transparent)]
    Logs(#[from] crate::logs::LogsError),
    /// A request that cannot be carried out as asked (says what to do).
    #[error("{0}")]
    Invalid(String),
}

/// An unfinished test job, as its key names it.
struct OpenTest {
    project: String,
    upstream: String,
    platform: String,
    upstream_commit: String,
    job_id: u64,
}

/// What [`Pipeline::build`] did.
#[derive(Debug)]
pub(crate) struct ManualBuild {
    /// The full commit hash built.
    pub(crate) commit: String,
    /// Its build per platform: queued now, or as it stands.
    pub(crate) builds: Vec<BuildInfo>,
    /// Every platform's build existed before (nothing new was queued).
    pub(crate) already_built: bool,
}

/// The running pipeline (cheap to clone).
#[derive(Clone)]
pub(crate) struct Pipeline {
    inner: Arc<Inner>,
}

struct Inner {
    upstreams: Vec<UpstreamConfig>,
    projects: Vec<ProjectConfig>,
    keep_artifacts: u32,
    /// `pipeline.bisect_max_builds` (0: no bisection).
    bisect_max_builds: u32,
    /// When disagreeing with confirmation runs quarantines an agent.
    quarantine: QuarantineRule,
    /// Agents' records: confirmations are counted there.
    credentials: Credentials,
    /// The `pipeline` tree: branch heads.
    heads: Table,
    dispatch: Dispatcher,
    results: Results,
    artifacts: Artifacts,
    notifier: Notifier,
    git: Arc<dyn Repos>,
    /// Held by a poller from choosing a good runtime until its tests are
    /// queued, and by garbage collection: no runtime is deleted in between.
    runtimes: tokio::sync::Mutex<()>,
    /// The last poll error per upstream or project (empty: fine), by
    /// `Repo::describe`.
    poll_errors: Mutex<HashMap<String, String>>,
    /// Finished jobs whose log could not be read, until when they are left
    /// in the inbox ([`Pipeline::take_inbox`]).
    log_waits: Mutex<HashMap<u64, tokio::time::Instant>>,
}

impl Pipeline {
    /// Opens the pipeline's state and starts its pollers and inbox reader;
    /// they stop when `shutdown` is cancelled.
    pub(crate) fn start(
        config: &HubConfig,
        store: &Store,
        dispatch: Dispatcher,
        results: Results,
        artifacts: Artifacts,
        notifier: Notifier,
        shutdown: CancellationToken,
    ) -> Result<Pipeline, StoreError> {
        let git = Git::new(config.data_dir().join("git"), config.pipeline.git_timeout);
        let pipeline = Pipeline::open(
            config,
            store,
            dispatch,
            results,
            artifacts,
            notifier,
            Arc::new(git),
        )?;
        let upstreams = pipeline.inner.upstreams.iter().map(|u| u.poll_interval);
        let projects = pipeline.inner.projects.iter().map(|p| p.poll_interval);
        let pollers = (upstreams.map(|every| (Repo::Upstream, every)).enumerate())
            .chain(projects.map(|every| (Repo::Project, every)).enumerate());
        for (i, (repo, every)) in pollers {
            let p = pipeline.clone();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                loop {
                    match repo {
                        Repo::Upstream => p.poll_upstream(i).await,
                        Repo::Project => p.poll_project(i).await,
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(every) => {}
                    }
                }
            });
        }
        let p = pipeline.clone();
        tokio::spawn(async move { p.read_inbox(shutdown).await });
        Ok(pipeline)
    }

    /// The pipeline without its tasks, talking to repositories through `git`.
    fn open(
        config: &HubConfig,
        store: &Store,
        dispatch: Dispatcher,
        results: Results,
        artifacts: Artifacts,
        notifier: Notifier,
        git: Arc<dyn Repos>,
    ) -> Result<Pipeline, StoreError> {
        let pipeline = Pipeline {
            inner: Arc::new(Inner {
                upstreams: config.upstreams.clone(),
                projects: config.projects.clone(),
                keep_artifacts: config.artifacts.keep,
                bisect_max_builds: config.pipeline.bisect_max_builds,
                quarantine: QuarantineRule {
                    after: config.trust.quarantine_after,
                    window: config.trust.quarantine_window,
                },
                credentials: Credentials::open(store)?,
                heads: Table::open(store, trees::PIPELINE)?,
                dispatch,
                results,
                artifacts,
                notifier,
                git,
                runtimes: tokio::sync::Mutex::new(()),
                poll_errors: Mutex::new(HashMap::new()),
                log_waits: Mutex::new(HashMap::new()),
            }),
        };
        for u in &pipeline.inner.upstreams {
            pipeline.index_head_order(&u.name)?;
        }
        Ok(pipeline)
    }

    fn upstream(&self, name: &str) -> Result<&UpstreamConfig, PipelineError> {
        self.inner
            .upstreams
            .iter()
            .find(|u| u.name == name)
            .ok_or_else(|| {
                let known: Vec<_> = self
                    .inner
                    .upstreams
                    .iter()
                    .map(|u| u.name.as_str())
                    .collect();
                PipelineError::NoSuchUpstream(
                    name.to_owned(),
                    if known.is_empty() {
                        "none (add [[upstream]] entries to the hub config)".into()
                    } else {
                        known.join(", ")
                    },
                )
            })
    }

    /// Builds `rev` (default: the branch head) of an upstream now, on every
    /// platform. Without `force`, a commit already built is not built again
    /// (the answer says so, for `upstream build` to tell its user).
    pub(crate) async fn build(
        &self,
        upstream: &str,
        rev: &str,
        force: bool,
    ) -> Result<ManualBuild, PipelineError> {
        let u = self.upstream(upstream)?.clone();
        let git = &self.inner.git;
        let commit = if rev.is_empty() {
            git.head(&u.url, u.branch.as_deref()).await?.commit
        } else {
            let branch = self.upstream_branch(&u).await?;
            git.resolve(&u.name, &u.url, &branch, rev).await?
        };
        let nonce = if force {
            Some(self.inner.heads.store().next_id()?)
        } else {
            None
        };
        // Only for the answer's words: submitting below is keyed, so a
        // build that exists is not submitted again either way.
        let mut already_built = !force;
        for platform in &u.platforms {
            if self
                .inner
                .results
                .build(&u.name, platform, &commit)?
                .is_none()
            {
                already_built = false;
            }
        }
        let builds = self.ensure_builds(&u, &commit, nonce).await?;
        Ok(ManualBuild {
            commit,
            builds,
            already_built,
        })
    }

    /// Takes finished jobs from dispatch's inbox and records them, until shutdown.
    async fn read_inbox(&self, shutdown: CancellationToken) {
        let signal = self.inner.dispatch.finished_signal();
        let mut bisected_at: Option<tokio::time::Instant> = None;
        loop {
            if bisected_at.is_none_or(|at| at.elapsed() >= BISECT_TICK) {
                self.follow_bisections().await;
                bisected_at = Some(tokio::time::Instant::now());
            }
            loop {
                match self.take_inbox().await {
                    Ok(0) => break,
                    Ok(_) => continue,
                    Err(e) => {
                        tracing::error!("cannot record finished pipeline jobs (will retry): {e}");
                        break;
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = signal.notified() => {}
                _ = tokio::time::sleep(INBOX_TICK) => {}
            }
        }
    }

    /// One round: returns how many jobs were taken in. A job whose log
    /// cannot be read right now (the object store down or slow) stays in
    /// the inbox and is left out for [`LOG_RETRY`]; the others go on.
    async fn take_inbox(&self) -> Result<usize, PipelineError> {
        let skip: HashSet<u64> = {
            let mut waiting = self
                .inner
                .log_waits
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let now = tokio::time::Instant::now();
            waiting.retain(|_, until| *until > now);
            waiting.keys().copied().collect()
        };
        let jobs = self
            .inner
            .dispatch
            .finished_inbox_skipping(INBOX_BATCH, &skip)?;
        if jobs.is_empty() {
            return Ok(0);
        }
        let mut done = Vec::new();
        let mut failure = None;
        for rec in &jobs {
            match self.take_in(rec).await {
                Ok(()) => done.push(rec.id),
                Err(PipelineError::Logs(e)) => {
                    tracing::warn!(
                        job = rec.id,
                        "cannot read the finished job's log; it is taken in again in {}: {e}",
                        trunkfarm_proto::settings::fmt_duration(LOG_RETRY)
                    );
                    let until = tokio::time::Instant::now() + LOG_RETRY;
                    (self.inner.log_waits.lock())
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(rec.id, until);
                }
                Err(e @ (PipelineError::Store(_) | PipelineError::Dispatch(_))) => {
                    // Retried later: nothing is acknowledged past this point.
                    failure = Some(e);
                    break;
                }
                Err(e) => {
                    tracing::error!(job = rec.id, "finished job could not be recorded: {e}");
                    done.push(rec.id);
                }
            }
        }
        self.inner.dispatch.ack_finished(&done)?;
        self.inner.heads.store().commit().await?;
        match failure {
            Some(e) => Err(e),
            None => Ok(done.len()),
        }
    }

    /// Takes one finished pipeline job in: [`Pipeline::record_job`], then,
    /// for a build, [`Pipeline::follow_build`], and for a held verdict (the
    /// job's own or the one a re-run checks), [`Pipeline::follow_confirmation`].
    /// A bisection's job goes to [`Pipeline::take_in_bisection`]; after any
    /// job, running bisections go on (one may have begun with it).
    async fn take_in(&self, rec: &JobRecord) -> Result<(), PipelineError> {
        if let Some(JobKey::Bisect { of, .. }) = JobKey::parse(&rec.key) {
            return self.take_in_bisection(rec, &of).await;
        }
        if let Some(build) = self.record_job(rec).await? {
            self.follow_build(&build).await?;
        }
        match JobKey::parse(&rec.key) {
            Some(JobKey::Rerun {
                kind: RerunKind::Calibrate,
                ..
            }) => {}
            Some(JobKey::Rerun { job, .. }) => self.follow_confirmation(job).await?,
            Some(_) => self.follow_confirmation(rec.id).await?,
            None => {}
        }
        // Best effort: a tick retries, and a bisection's trouble (a full
        // disk refusing its jobs) never holds the inbox up.
        self.follow_bisections().await;
        Ok(())
    }

    /// Intake, then one record into results (a no-op if the job was
    /// recorded before). Returns the build, if the job was one.
    async fn record_job(&self, rec: &JobRecord) -> Result<Option<BuildInfo>, PipelineError> {
        let Some(key) = JobKey::parse(&rec.key) else {
            return Ok(None);
        };
        if let JobKey::Rerun { of, kind, job, n } = &key {
            let finished = self.intake(rec, (**of).clone()).await?;
            if *kind == RerunKind::Calibrate {
                self.record_calibration(rec, finished, *job, *n).await?;
                return Ok(None);
            }
            return self.record_rerun(rec, finished, *kind, *job).await;
        }
        let mut finished = self.intake(rec, key).await?;
        let unconfirmed = self.unconfirmed(rec, &finished);
        let build = match &mut finished {
            Finished::Build(b) => {
                // A held build fans out once it is confirmed.
                if b.state == BuildState::Passed as i32
                    && unconfirmed.is_none()
                    && !self.superseded(b)?
                {
                    if let Ok(u) = self.upstream(&b.upstream) {
                        b.fanned_out = self.fan_out_targets(u, &b.platform).count() as u32;
                    }
                }
                Some(b.clone())
            }
            Finished::Run { .. } => None,
        };
        // A red run's went-red mail quotes its log: read it now, not under
        // results' write lock.
        if let Finished::Run { run, .. } = &finished
            && run.info.status == trunkfarm_proto::v1::RunStatus::Red as i32
        {
            self.inner.notifier.preload_log(rec.id).await;
        }
        let recorded = self
            .inner
            .results
            .record(finished, unconfirmed, self, &self.inner.notifier)
            .await?;
        if let Recorded::New(t) = &recorded {
            self.inner.notifier.wake();
            if let Some(b) = &build {
                log_build(b);
            }
            log_transition(t.as_deref());
        }
        Ok(build)
    }

    /// A finished job, as results records it (`key`: what it was for).
    async fn intake(&self, rec: &JobRecord, key: JobKey) -> Result<Finished, PipelineError> {
        let facts = self.facts(&key, rec.result.as_ref())?;
        let output = self.output(rec, &key)?;
        let (job, job_key, judged) = (rec.clone(), key.clone(), output.clone());
        // Parsing megabytes of XML is CPU work: off the async threads.
        Ok(
            match tokio::task::spawn_blocking(move || {
                intake::finished(&job, job_key, facts, judged.as_ref())
            })
            .await
            {
                Ok(finished) => finished,
                Err(e) => intake::unparsed(rec, key, facts, output.as_ref(), &e.to_string()),
            },
        )
    }

    /// A test job's project's output patterns with the log of the attempt
    /// that gave its result (`None` for builds and projects without them).
    fn output(
        &self,
        rec: &JobRecord,
        key: &JobKey,
    ) -> Result<Option<intake::Output>, PipelineError> {
        let JobKey::Test { project, .. } = key.base() else {
            return Ok(None);
        };
        let Some(p) = self.inner.projects.iter().find(|p| &p.name == project) else {
            return Ok(None);
        };
        if p.fail_pattern.is_none() && p.pass_pattern.is_none() {
            return Ok(None);
        }
        let logs = self.inner.dispatch.logs();
        let (log, unreadable) = match crate::output::log_text(logs, rec.id, Some(rec.attempt)) {
            Ok(log) => (log, false),
            // Gone for good: the run is judged without it (see intake).
            Err(e) if e.is_permanent() => {
                tracing::warn!(
                    job = rec.id,
                    "the finished run's log cannot be read, so it is judged without its output patterns: {e}"
                );
                (String::new(), true)
            }
            Err(e) => return Err(e.into()),
        };
        Ok(Some(intake::Output {
            fail: p.fail_pattern.clone(),
            pass: p.pass_pattern.clone(),
            log,
            unreadable,
        }))
    }

    /// After a build's result is recorded: its fan-out, if it passed and is
    /// not superseded (idempotent, so it also runs for a build recorded
    /// before a crash took the inbox's ack), then garbage collection.
    async fn follow_build(&self, build: &BuildInfo) -> Result<(), PipelineError> {
        if build.fanned_out > 0 {
            self.fan_out(self.upstream(&build.upstream)?, build).await?;
        }
        self.collect_garbage().await;
        Ok(())
    }

    /// What intake needs from the store for a finished job.
    fn facts(
        &self,
        key: &JobKey,
        result: Option<&JobResultRecord>,
    ) -> Result<intake::Facts, StoreError> {
        let (upstream, commit, build) = match key.base() {
            JobKey::Build {
                upstream, commit, ..
            } => (upstream, commit, true),
            JobKey::Test {
                upstream,
                upstream_commit,
                ..
            } => (upstream, upstream_commit, false),
            JobKey::Rerun { .. } | JobKey::Bisect { .. } => {
                return Ok(intake::Facts::default());
            }
        };
        let sha = result.map(|r| r.artifact_sha256.as_str()).unwrap_or("");
        Ok(intake::Facts {
            // Results are compared in the order their upstream commits were
            // the head; one of a commit that never was decides nothing.
            head_seq: self.head_seq(upstream, commit)?,
            artifact_stored: build
                && !sha.is_empty()
                && self.inner.artifacts.get(sha).ok().flatten().is_some(),
        })
    }

    /// Whether a newer head's good build overtook `b` (it finished late):
    /// then it is not tested, as its results would decide nothing.
    fn superseded(&self, b: &BuildInfo) -> Result<bool, StoreError> {
        Ok(b.head_seq > 0
            && self
                .inner
                .results
                .good_build(&b.upstream, &b.platform)?
                .is_some_and(|g| g.head_seq > b.head_seq))
    }

    /// The grid: every upstream with its builds, every configured
    /// (project, upstream, platform) with its newest run.
    pub(crate) fn status(&self, only_upstream: &str) -> Result<Grid, PipelineError> {
        if !only_upstream.is_empty() {
            self.upstream(only_upstream)?;
        }
        let pending = self.pending_tests();
        let mut rows = Vec::new();
        for u in &self.inner.upstreams {
            if !only_upstream.is_empty() && u.name != only_upstream {
                continue;
            }
            let info = self.upstream_row(u)?;
            let mut series = Vec::new();
            for p in self
                .inner
                .projects
                .iter()
                .filter(|p| p.tests_against(&u.name))
            {
                for platform in p.platforms_for(u) {
                    let id = (p.name.clone(), u.name.clone(), platform.to_owned());
                    series.push(GridSeries {
                        project: &p.name,
                        platform,
                        pending: pending.contains_key(&id),
                    });
                }
            }
            rows.push((info, series));
        }
        let mut grid = self.inner.results.status(rows)?;
        self.fill_phases(
            grid.upstreams.iter_mut().flat_map(|u| &mut u.latest_builds),
            std::iter::empty(),
        );
        for p in &self.inner.projects {
            if only_upstream.is_empty() || p.tests_against(only_upstream) {
                grid.projects.push(self.project_row(p)?);
            }
        }
        Ok(grid)
    }

    /// An upstream as the status grid and the dashboard describe it (its
    /// builds not filled).
    fn upstream_row(&self, u: &UpstreamConfig) -> Result<UpstreamRow, StoreError> {
        let head = self.head(Repo::Upstream, &u.name)?;
        Ok(UpstreamRow {
            name: u.name.clone(),
            url: git::redact_url(&u.url),
            branch: self
                .known_branch(Repo::Upstream, &u.name, u.branch.as_deref())?
                .unwrap_or_default(),
            platforms: u.platforms.clone(),
            head: head.as_ref().map(|h| h.commit.clone()).unwrap_or_default(),
            head_seen_at_ms: head.map(|h| h.seen_at_ms).unwrap_or_default(),
            poll_error: self.poll_error(Repo::Upstream, &u.name),
            ..Default::default()
        })
    }

    /// The unfinished test jobs (not their re-runs or bisection runs), from
    /// dispatch's open keys.
    fn open_tests(&self) -> Vec<OpenTest> {
        self.inner
            .dispatch
            .open_keys(TEST_PREFIX)
            .into_iter()
            .filter_map(|(k, job_id)| match JobKey::parse(&k) {
                Some(JobKey::Test {
                    project,
                    upstream,
                    platform,
                    upstream_commit,
                    ..
                }) => Some(OpenTest {
                    project,
                    upstream,
                    platform,
                    upstream_commit,
                    job_id,
                }),
                _ => None,
            })
            .collect()
    }

    /// The dashboard's grid: per upstream, the last `commits` heads polling
    /// saw (newest first) with their builds, and every configured (project,
    /// platform) with its newest runs and open test jobs. Bounded: `commits`
    /// heads and builds per platform, `4 × commits` runs per series.
    pub(crate) fn history(&self, commits: usize) -> Result<Vec<UpstreamHistory>, PipelineError> {
        let open = self.open_tests();
        let mut asked = Vec::new();
        let mut rows = Vec::new();
        for u in &self.inner.upstreams {
            let heads: Vec<Commit> = self
                .recent_heads(&u.name, commits)?
                .into_iter()
                .map(|h| Commit {
                    sha: h.commit,
                    ..Default::default()
                })
                .collect();
            let mut series = Vec::new();
            let mut projects = Vec::new();
            for p in self
                .inner
                .projects
                .iter()
                .filter(|p| p.tests_against(&u.name))
            {
                projects.push(self.project_row(p)?);
                for platform in p.platforms_for(u) {
                    // Only the jobs at the commits shown: their phases are
                    // asked of dispatch below, all under one lock.
                    let open = open
                        .iter()
                        .filter(|t| {
                            t.project == p.name
                                && t.upstream == u.name
                                && t.platform == platform
                                && heads.iter().any(|c| c.sha == t.upstream_commit)
                        })
                        .map(|t| OpenRun {
                            upstream_commit: t.upstream_commit.clone(),
                            job_id: t.job_id,
                            phase: None,
                        })
                        .collect();
                    series.push((p.name.clone(), platform.to_owned(), open));
                }
            }
            rows.push(projects);
            asked.push(HistoryRequest {
                row: self.upstream_row(u)?,
                commits: heads,
                series,
            });
        }
        let mut history = self
            .inner
            .results
            .history(asked, commits.saturating_mul(4))?;
        for (h, projects) in history.iter_mut().zip(rows) {
            h.projects = projects;
        }
        let (builds, series): (Vec<_>, Vec<_>) = history
            .iter_mut()
            .map(|h| (&mut h.builds, &mut h.series))
            .unzip();
        self.fill_phases(
            builds.into_iter().flatten(),
            series.into_iter().flatten().flat_map(|s| &mut s.open),
        );
        Ok(history)
    }

    /// Asks dispatch, under one lock, where the jobs of these pending
    /// builds and open test runs stand (a finished build keeps none).
    fn fill_phases<'a>(
        &self,
        builds: impl IntoIterator<Item = &'a mut BuildInfo>,
        open: impl IntoIterator<Item = &'a mut OpenRun>,
    ) {
        let builds: Vec<&mut BuildInfo> = builds
            .into_iter()
            .filter(|b| b.state == BuildState::Pending as i32)
            .collect();
        let open: Vec<&mut OpenRun> = open.into_iter().collect();
        let ids: Vec<u64> = builds
            .iter()
            .map(|b| b.job_id)
            .chain(open.iter().map(|o| o.job_id))
            .collect();
        let mut phases = self.inner.dispatch.phases(&ids).into_iter();
        for b in builds {
            let phase = phases.next().flatten();
            b.waiting = phase
                .as_ref()
                .map(|p| p.why().to_owned())
                .unwrap_or_default();
            b.phase = phase.map(|p| p.word().to_owned()).unwrap_or_default();
        }
        for o in open {
            o.phase = phases.next().flatten();
        }
    }

    /// Woken whenever a result, a build or a new upstream head is recorded
    /// (the dashboard's live updates; jobs' own changes are dispatch's).
    pub(crate) fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.results.changes().subscribe()
    }

    /// Which projects went red at an upstream commit (or a prefix of its
    /// hash), in a range `A..B`, or at the newest head when `rev` is empty.
    pub(crate) async fn breakage(
        &self,
        upstream: &str,
        rev: &str,
    ) -> Result<Breakage, PipelineError> {
        let u = self.upstream(upstream)?.clone();
        let git = &self.inner.git;
        let branch = self.upstream_branch(&u).await?;
        let commits: Vec<Commit> = if rev.contains("..") {
            git.log(&u.name, &u.url, &branch, rev).await?
        } else {
            let sha = if rev.is_empty() {
                match self.head(Repo::Upstream, &u.name)? {
                    Some(h) => h.commit,
                    None => git.head(&u.url, Some(branch.as_str())).await?.commit,
                }
            } else {
                git.resolve(&u.name, &u.url, &branch, rev).await?
            };
            match git.range(&u.name, &u.url, &branch, None, &sha).await {
                Ok((c, _)) if !c.is_empty() => c,
                _ => vec![Commit {
                    sha,
                    ..Default::default()
                }],
            }
        };
        Ok(self.inner.results.breakage(&u.name, commits)?)
    }

    /// Stored transitions, newest first.
    pub(crate) fn transitions(
        &self,
        upstream: &str,
        project: &str,
        limit: usize,
        all: bool,
    ) -> Result<Vec<Transition>, PipelineError> {
        Ok(self
            .inner
            .results
            .transitions_of(upstream, project, limit, all)?)
    }
}

fn log_build(b: &BuildInfo) {
    let state = BuildState::try_from(b.state).unwrap_or(BuildState::Error);
    tracing::info!(
        upstream = %b.upstream,
        platform = %b.platform,
        job = b.job_id,
        "build of {} {}",
        short(&b.commit),
        state.as_str_name().trim_start_matches("BUILD_STATE_").to_lowercase()
    );
}

fn log_transition(t: Option<&Transition>) {
    let Some(t) = t else { return };
    let kind = TransitionKind::try_from(t.kind).unwrap_or(TransitionKind::Unspecified);
    if !matches!(kind, TransitionKind::WentRed | TransitionKind::Fixed) {
        return;
    }
    let what = if t.project.is_empty() {
        format!("the {} build", t.upstream)
    } else {
        t.project.clone()
    };
    let verb = if kind == TransitionKind::WentRed {
        "went red"
    } else {
        "was fixed"
    };
    let culprits = if kind == TransitionKind::WentRed {
        format!(" ({} culprit commit(s))", t.culprits.len())
    } else {
        String::new()
    };
    tracing::warn!(
        transition = t.id,
        "{what} {verb} on {} with {} {}{culprits}",
        t.platform,
        t.upstream,
        short(&t.upstream_commit),
    );
}
