//! The trunk pipeline: notices new upstream and project commits, queues
//! runtime builds, fans a good runtime out to every project's tests, and
//! hands each finished job to [`crate::results`] for classification.
//!
//! ```text
//! poll upstream ─► build job ─► artifact ─► fan-out ─► test jobs ─► results ─► transitions
//!      poll project ──────────────────────────┘
//! ```
//!
//! Everything is *level-triggered*: each poll re-derives the jobs that
//! should exist (the upstream head's builds, each project head's runs against
//! the newest good runtime) and submits them under their [`JobKey`], which
//! dispatch stores at most once. A crash at any moment therefore loses
//! nothing and duplicates nothing: the next poll submits what is missing.
//! Finished jobs come back through dispatch's durable *inbox*; the pipeline
//! records each (idempotently, keyed by job id) and only then acknowledges
//! it, so a result is neither lost nor classified twice.
//!
//! Owns the `pipeline` tree: `h/u/<name>` and `h/p/<name>` → [`Head`], the
//! branch heads last seen by polling.

pub mod git;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use trunkfarm_proto::v1::{
    BuildInfo, BuildState, Commit, GetBreakageResponse, GetStatusResponse, JobSpec, Outcome,
    Repository, RunInfo, StatusCell, TestStatus, Transition, TransitionKind, UpstreamInfo,
};

use crate::artifacts::Artifacts;
use crate::commit::short;
use crate::config::{HubConfig, ProjectConfig, UpstreamConfig};
use crate::dispatch::{DispatchError, Dispatcher, JobRecord};
use crate::job_key::JobKey;
use crate::junit;
use crate::notify::Notifier;
use crate::results::{Results, RunRecord, run_status};
use crate::store::{Store, StoreError, now_ms};
pub use git::{Git, GitError};

/// The tree this module owns.
const TREE: &str = crate::store::trees::PIPELINE;

/// The directory (relative to the job's directory) a build installs into.
pub const BUILD_PREFIX_DIR: &str = "prefix";

/// Finished jobs taken from the inbox per round (each record may carry a
/// few MiB of report files).
const INBOX_BATCH: usize = 16;

/// How often the inbox is looked at even without a signal, in case one was
/// missed (e.g. jobs that finished while the hub was down).
const INBOX_TICK: Duration = Duration::from_secs(1);

/// Failing test cases kept in a run's summary (all cases are kept in its record).
const MAX_FAILING_IN_SUMMARY: usize = 200;

/// What the pipeline can fail with.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Dispatch refused a job.
    #[error(transparent)]
    Dispatch(#[from] DispatchError),
    /// Git failed.
    #[error(transparent)]
    Git(#[from] GitError),
    /// No such upstream in the config.
    #[error("no upstream named {0:?} is configured; known upstreams: {1}")]
    NoSuchUpstream(String, String),
}

/// A branch head as last seen.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Head {
    /// Full commit hash.
    pub commit: String,
    /// When polling first saw it, ms.
    pub seen_at_ms: u64,
}

/// The running pipeline (cheap to clone).
#[derive(Clone)]
pub struct Pipeline {
    inner: Arc<Inner>,
}

struct Inner {
    upstreams: Vec<UpstreamConfig>,
    projects: Vec<ProjectConfig>,
    keep_artifacts: u32,
    store: Store,
    tree: sled::Tree,
    dispatch: Dispatcher,
    results: Results,
    artifacts: Artifacts,
    notifier: Notifier,
    git: Git,
    /// Serialises writers of `results` (pollers and the inbox task) so a
    /// "queued" mark never overwrites a finished build.
    write: tokio::sync::Mutex<()>,
    /// The last poll error per `u/<name>` or `p/<name>` (empty: fine).
    poll_errors: Mutex<HashMap<String, String>>,
}

impl Pipeline {
    /// Opens the pipeline's state and starts its pollers and inbox reader;
    /// they stop when `shutdown` is cancelled.
    pub fn start(
        config: &HubConfig,
        store: &Store,
        dispatch: Dispatcher,
        results: Results,
        artifacts: Artifacts,
        notifier: Notifier,
        shutdown: CancellationToken,
    ) -> Result<Pipeline, StoreError> {
        let pipeline = Pipeline {
            inner: Arc::new(Inner {
                upstreams: config.upstreams.clone(),
                projects: config.projects.clone(),
                keep_artifacts: config.artifacts.keep,
                store: store.clone(),
                tree: store.tree(TREE)?,
                dispatch,
                results,
                artifacts,
                notifier,
                git: Git {
                    mirrors: config.data_dir().join("git"),
                    timeout: config.pipeline.git_timeout,
                    locks: Default::default(),
                },
                write: tokio::sync::Mutex::new(()),
                poll_errors: Mutex::new(HashMap::new()),
            }),
        };
        let pollers = pipeline
            .inner
            .upstreams
            .iter()
            .enumerate()
            .map(|(i, u)| (true, i, u.poll_interval))
            .chain(
                pipeline
                    .inner
                    .projects
                    .iter()
                    .enumerate()
                    .map(|(i, p)| (false, i, p.poll_interval)),
            );
        for (upstream, i, every) in pollers {
            let p = pipeline.clone();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                loop {
                    if upstream {
                        p.poll_upstream(i).await;
                    } else {
                        p.poll_project(i).await;
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

    /// The head last seen for `kind` (`u` or `p`) and `name`.
    pub fn head(&self, kind: &str, name: &str) -> Result<Option<Head>, StoreError> {
        let key = format!("h/{kind}/{name}");
        let Some(raw) = self
            .inner
            .tree
            .get(&key)
            .map_err(|e| self.inner.store.err(e))?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&raw)
            .map(Some)
            .map_err(|e| self.inner.store.corrupt(format!("{TREE}/{key}"), e))
    }

    async fn save_head(&self, kind: &str, name: &str, commit: &str) -> Result<bool, StoreError> {
        if self.head(kind, name)?.is_some_and(|h| h.commit == commit) {
            return Ok(false);
        }
        let head = Head {
            commit: commit.to_owned(),
            seen_at_ms: now_ms(),
        };
        let bytes =
            serde_json::to_vec(&head).map_err(|e| self.inner.store.corrupt("(encode head)", e))?;
        let mut batch = sled::Batch::default();
        batch.insert(format!("h/{kind}/{name}").as_bytes(), bytes);
        // The order heads were seen in: what results are compared by.
        let seq_key = format!("hh/{kind}/{name}/{commit}");
        if !self
            .inner
            .tree
            .contains_key(&seq_key)
            .map_err(|e| self.inner.store.err(e))?
        {
            let seq = self.inner.store.next_id()?;
            batch.insert(seq_key.as_bytes(), &seq.to_be_bytes());
        }
        self.inner
            .tree
            .apply_batch(batch)
            .map_err(|e| self.inner.store.err(e))?;
        self.inner.store.commit().await?;
        Ok(true)
    }

    /// When polling first saw `commit` as `upstream`'s head (its order), or
    /// 0 if it never was the head.
    fn head_seq(&self, upstream: &str, commit: &str) -> Result<u64, StoreError> {
        let key = format!("hh/u/{upstream}/{commit}");
        Ok(
            match self
                .inner
                .tree
                .get(&key)
                .map_err(|e| self.inner.store.err(e))?
            {
                Some(raw) => raw.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0),
                None => 0,
            },
        )
    }

    fn set_poll_error(&self, key: String, error: String) {
        let mut errors = self
            .inner
            .poll_errors
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let previous = errors
            .insert(key.clone(), error.clone())
            .unwrap_or_default();
        if previous != error {
            if error.is_empty() {
                tracing::info!("polling {key} works again");
            } else {
                tracing::warn!("polling {key} failed: {error}");
            }
        }
    }

    fn poll_error(&self, key: &str) -> String {
        self.inner
            .poll_errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
            .unwrap_or_default()
    }

    /// Polls one branch head (`kind` is `u` for an upstream, `p` for a
    /// project): records a new head and the poll's error state. The head,
    /// once it is durably recorded.
    async fn poll_head(&self, kind: &str, name: &str, url: &str, branch: &str) -> Option<String> {
        let what = format!(
            "{} {name}",
            if kind == "u" { "upstream" } else { "project" }
        );
        match self.inner.git.head(url, branch).await {
            Ok(commit) => {
                self.set_poll_error(what.clone(), String::new());
                match self.save_head(kind, name, &commit).await {
                    Ok(true) => tracing::info!("{what}: new {branch} head {}", short(&commit)),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::error!("{what}: cannot record the new head: {e}");
                        return None;
                    }
                }
                Some(commit)
            }
            Err(e) => {
                self.set_poll_error(what, e.to_string());
                None
            }
        }
    }

    /// One poll of an upstream: record a new head, make sure its builds exist.
    async fn poll_upstream(&self, index: usize) {
        let u = &self.inner.upstreams[index];
        let Some(commit) = self.poll_head("u", &u.name, &u.url, &u.branch).await else {
            return;
        };
        if let Err(e) = self.ensure_builds(u, &commit, None).await {
            tracing::error!(upstream = %u.name, "cannot queue builds of {}: {e}", short(&commit));
        }
    }

    /// One poll of a project: record a new head, make sure it is tested
    /// against each upstream's newest good runtime.
    async fn poll_project(&self, index: usize) {
        let p = &self.inner.projects[index];
        let Some(commit) = self.poll_head("p", &p.name, &p.url, &p.branch).await else {
            return;
        };
        for u in &self.inner.upstreams {
            if !p.tests_against(&u.name) {
                continue;
            }
            for platform in p.platforms_for(u) {
                // Under the write lock: GC runs after a build is
                // recorded, also under it, and must not delete the
                // runtime between this read and the submit.
                let _w = self.inner.write.lock().await;
                let good = match self.inner.results.good_build(&u.name, platform) {
                    Ok(Some(good)) => good,
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::error!("{e}");
                        continue;
                    }
                };
                if let Err(e) = self.submit_test(p, u, platform, &good, &commit).await {
                    tracing::error!(project = %p.name, "cannot queue its tests: {e}");
                }
            }
        }
    }

    /// Makes sure `commit` of `u` is built on every platform; returns the
    /// builds (new or existing).
    async fn ensure_builds(
        &self,
        u: &UpstreamConfig,
        commit: &str,
        nonce: Option<u64>,
    ) -> Result<Vec<BuildInfo>, PipelineError> {
        let mut builds = Vec::new();
        for platform in &u.platforms {
            let key = JobKey::Build {
                upstream: u.name.clone(),
                platform: platform.clone(),
                commit: commit.to_owned(),
                nonce,
            };
            let (job_id, new) = self
                .inner
                .dispatch
                .submit_keyed(build_spec(u, platform, commit), 0, key.to_string())
                .await?;
            if new {
                tracing::info!(
                    upstream = %u.name,
                    platform = %platform,
                    job = job_id,
                    "building {}",
                    short(commit)
                );
            }
            let _w = self.inner.write.lock().await;
            let existing = self.inner.results.build(&u.name, platform, commit)?;
            let build = match existing {
                Some(b) if b.job_id == job_id => b,
                // New, or queued before a crash took the mark with it.
                _ if self.inner.results.recorded(job_id)? => continue,
                _ => {
                    let b = BuildInfo {
                        upstream: u.name.clone(),
                        platform: platform.clone(),
                        commit: commit.to_owned(),
                        job_id,
                        state: BuildState::Pending.into(),
                        created_at_ms: now_ms(),
                        head_seq: self.head_seq(&u.name, commit)?,
                        ..Default::default()
                    };
                    self.inner.results.build_queued(&b).await?;
                    b
                }
            };
            builds.push(build);
        }
        Ok(builds)
    }

    /// Queues one project's tests against a built runtime (once per key).
    async fn submit_test(
        &self,
        p: &ProjectConfig,
        u: &UpstreamConfig,
        platform: &str,
        build: &BuildInfo,
        project_commit: &str,
    ) -> Result<bool, PipelineError> {
        let key = JobKey::Test {
            project: p.name.clone(),
            upstream: u.name.clone(),
            platform: platform.to_owned(),
            upstream_commit: build.commit.clone(),
            project_commit: project_commit.to_owned(),
            // The build's own job: a forced rebuild of the same commit is
            // tested again.
            nonce: Some(build.job_id),
        };
        let spec = test_spec(p, u, platform, build, project_commit);
        let (job_id, new) = self
            .inner
            .dispatch
            .submit_keyed(spec, 0, key.to_string())
            .await?;
        if new {
            tracing::info!(
                project = %p.name,
                upstream = %u.name,
                platform = %platform,
                job = job_id,
                "testing {} against {} {}",
                if project_commit.is_empty() { p.branch.as_str() } else { short(project_commit) },
                u.name,
                short(&build.commit)
            );
        }
        Ok(new)
    }

    /// Queues every project's tests against a build that passed.
    async fn fan_out(&self, u: &UpstreamConfig, build: &BuildInfo) -> Result<u32, PipelineError> {
        let mut count = 0;
        for p in &self.inner.projects {
            if !p.tests_against(&u.name) || !p.platforms_for(u).contains(&build.platform.as_str()) {
                continue;
            }
            let commit = self
                .head("p", &p.name)?
                .map(|h| h.commit)
                .unwrap_or_default();
            self.submit_test(p, u, &build.platform, build, &commit)
                .await?;
            count += 1;
        }
        Ok(count)
    }

    /// Builds `rev` (default: the branch head) of an upstream now, on every
    /// platform. Without `force`, a commit already built is not built again.
    pub async fn build(
        &self,
        upstream: &str,
        rev: &str,
        force: bool,
    ) -> Result<(String, Vec<BuildInfo>), PipelineError> {
        let u = self.upstream(upstream)?.clone();
        let git = &self.inner.git;
        let commit = if rev.is_empty() {
            git.head(&u.url, &u.branch).await?
        } else {
            git.resolve(&u.name, &u.url, &u.branch, rev).await?
        };
        let nonce = if force {
            Some(self.inner.store.next_id()?)
        } else {
            None
        };
        let builds = self.ensure_builds(&u, &commit, nonce).await?;
        Ok((commit, builds))
    }

    /// Takes finished jobs from dispatch's inbox and records them, until shutdown.
    async fn read_inbox(&self, shutdown: CancellationToken) {
        let signal = self.inner.dispatch.finished_signal();
        loop {
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

    /// One round: returns how many jobs were taken in.
    async fn take_inbox(&self) -> Result<usize, PipelineError> {
        let jobs = self.inner.dispatch.finished_inbox(INBOX_BATCH)?;
        if jobs.is_empty() {
            return Ok(0);
        }
        let mut done = Vec::new();
        let mut failure = None;
        for rec in &jobs {
            match self.take_in(rec).await {
                Ok(()) => done.push(rec.id),
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
        self.inner.store.commit().await?;
        match failure {
            Some(e) => Err(e),
            None => Ok(done.len()),
        }
    }

    /// Records one finished pipeline job (a no-op if it already was).
    async fn take_in(&self, rec: &JobRecord) -> Result<(), PipelineError> {
        let Some(key) = JobKey::parse(&rec.key) else {
            return Ok(());
        };
        // Held while reading and writing results, but not across git (a
        // slow fetch of the culprit range must not stall the pollers): only
        // this task records, so the series cannot change in between.
        let write = self.inner.write.lock().await;
        if self.inner.results.recorded(rec.id)? {
            return Ok(());
        }
        let result = rec.result.clone().unwrap_or_default();
        let outcome = Outcome::try_from(result.outcome).unwrap_or(Outcome::Error);
        match key {
            JobKey::Build {
                upstream,
                platform,
                commit,
                ..
            } => {
                let mut detail = result.detail.clone();
                let state = match outcome {
                    Outcome::Passed => {
                        let stored = !result.artifact_sha256.is_empty()
                            && self
                                .inner
                                .artifacts
                                .get(&result.artifact_sha256)
                                .ok()
                                .flatten()
                                .is_some();
                        if stored {
                            BuildState::Passed
                        } else {
                            detail = "the build passed but its runtime artifact is not on the hub (upload lost?)".into();
                            BuildState::Error
                        }
                    }
                    Outcome::Failed | Outcome::TimedOut => BuildState::Failed,
                    _ => BuildState::Error,
                };
                let head_seq = self.head_seq(&upstream, &commit)?;
                let mut build = BuildInfo {
                    upstream: upstream.clone(),
                    platform,
                    commit,
                    job_id: rec.id,
                    state: state.into(),
                    artifact_sha256: if state == BuildState::Passed {
                        result.artifact_sha256.clone()
                    } else {
                        String::new()
                    },
                    created_at_ms: rec.created_at_ms,
                    finished_at_ms: rec.finished_at_ms,
                    duration_ms: result.duration_ms,
                    detail,
                    fanned_out: 0,
                    head_seq,
                };
                let u = self.upstream(&upstream).ok().cloned();
                // A build overtaken by a newer head's good build (it finished
                // late) is not tested: its results would decide nothing.
                let superseded = build.head_seq > 0
                    && self
                        .inner
                        .results
                        .good_build(&build.upstream, &build.platform)?
                        .is_some_and(|g| g.head_seq > build.head_seq);
                if state == BuildState::Passed && !superseded {
                    if let Some(u) = &u {
                        build.fanned_out = self.fan_out(u, &build).await?;
                    }
                }
                tracing::info!(
                    upstream = %build.upstream,
                    platform = %build.platform,
                    job = rec.id,
                    "build of {} {}",
                    short(&build.commit),
                    state.as_str_name().trim_start_matches("BUILD_STATE_").to_lowercase()
                );
                let prepared = self.inner.results.prepare_build(build)?;
                drop(write);
                let (culprits, error) = self.culprits(u.as_ref(), prepared.culprit_range()).await;
                let _write = self.inner.write.lock().await;
                let t = self
                    .inner
                    .results
                    .commit_with(prepared, culprits, error, Some(&self.inner.notifier))
                    .await?;
                self.inner.notifier.wake();
                self.log_transition(t.as_ref());
                self.collect_garbage().await;
            }
            JobKey::Test {
                project,
                upstream,
                platform,
                upstream_commit,
                project_commit,
                ..
            } => {
                // Parsing megabytes of XML is CPU work: off the async threads.
                let reports = result.reports.clone();
                let report = tokio::task::spawn_blocking(move || junit::parse_reports(&reports))
                    .await
                    .unwrap_or_else(|e| junit::Report {
                        cases: Vec::new(),
                        errors: vec![format!("the report parser failed: {e}")],
                    });
                let total = report.cases.len() as u32;
                let failed: Vec<_> = report
                    .cases
                    .iter()
                    .filter(|c| {
                        c.status == TestStatus::Failed as i32
                            || c.status == TestStatus::Error as i32
                    })
                    .cloned()
                    .collect();
                let skipped = report
                    .cases
                    .iter()
                    .filter(|c| c.status == TestStatus::Skipped as i32)
                    .count() as u32;
                let info = RunInfo {
                    project,
                    upstream: upstream.clone(),
                    platform: platform.clone(),
                    upstream_commit: upstream_commit.clone(),
                    project_commit,
                    status: run_status(outcome).into(),
                    outcome: outcome.into(),
                    job_id: rec.id,
                    duration_ms: result.duration_ms,
                    finished_at_ms: rec.finished_at_ms,
                    detail: result.detail.clone(),
                    tests_total: total,
                    tests_failed: failed.len() as u32,
                    tests_skipped: skipped,
                    failing_tests: failed.into_iter().take(MAX_FAILING_IN_SUMMARY).collect(),
                    report_error: report.errors.join("; "),
                };
                // Runs are compared in the order their upstream commits were
                // the head; a run against a commit that never was decides nothing.
                let head_seq = self.head_seq(&upstream, &upstream_commit)?;
                let run = RunRecord {
                    info,
                    cases: report.cases,
                };
                let prepared = self.inner.results.prepare_run(run, head_seq)?;
                let u = self.upstream(&upstream).ok().cloned();
                drop(write);
                let (culprits, error) = self.culprits(u.as_ref(), prepared.culprit_range()).await;
                let _write = self.inner.write.lock().await;
                let t = self
                    .inner
                    .results
                    .commit_with(prepared, culprits, error, Some(&self.inner.notifier))
                    .await?;
                self.inner.notifier.wake();
                self.log_transition(t.as_ref());
            }
        }
        Ok(())
    }

    /// Lists a culprit range's commits; on failure, just the last commit and why.
    async fn culprits(
        &self,
        u: Option<&UpstreamConfig>,
        range: Option<(Option<String>, String)>,
    ) -> (Vec<Commit>, String) {
        let Some((from, to)) = range else {
            return (Vec::new(), String::new());
        };
        let only_to = || {
            vec![Commit {
                sha: to.clone(),
                ..Default::default()
            }]
        };
        let Some(u) = u else {
            return (only_to(), "the upstream is no longer configured".into());
        };
        match self
            .inner
            .git
            .range(&u.name, &u.url, &u.branch, from.as_deref(), &to)
            .await
        {
            Ok((commits, false)) if !commits.is_empty() => (commits, String::new()),
            Ok((commits, true)) => (
                commits,
                format!(
                    "the range holds more than {} commits; only the newest are listed",
                    git::MAX_RANGE_COMMITS
                ),
            ),
            Ok(_) => (only_to(), "git listed no commit in the range".into()),
            Err(e) => {
                tracing::warn!(upstream = %u.name, "cannot list the culprit range: {e}");
                (only_to(), e.to_string())
            }
        }
    }

    fn log_transition(&self, t: Option<&Transition>) {
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

    /// Deletes artifacts no one needs any more (errors are logged: a failed
    /// collection only costs disk).
    async fn collect_garbage(&self) {
        let referenced = match self.inner.results.referenced_artifacts() {
            Ok(mut r) => {
                // Queued and running tests still need theirs.
                r.extend(self.inner.dispatch.open_artifacts());
                r
            }
            Err(e) => {
                tracing::warn!("artifact garbage collection skipped: {e}");
                return;
            }
        };
        match self
            .inner
            .artifacts
            .gc(self.inner.keep_artifacts, &referenced)
            .await
        {
            Ok(deleted) if !deleted.is_empty() => {
                tracing::info!("deleted {} old runtime artifact(s)", deleted.len())
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("artifact garbage collection failed: {e}"),
        }
    }

    /// The grid: every upstream with its builds, every configured
    /// (project, upstream, platform) with its newest run.
    pub fn status(&self, only_upstream: &str) -> Result<GetStatusResponse, PipelineError> {
        if !only_upstream.is_empty() {
            self.upstream(only_upstream)?;
        }
        let results = &self.inner.results;
        let mut out = GetStatusResponse::default();
        let pending: HashSet<String> = self
            .inner
            .dispatch
            .open_keys("test/")
            .into_iter()
            .filter_map(|(k, _)| match JobKey::parse(&k) {
                Some(JobKey::Test {
                    project,
                    upstream,
                    platform,
                    ..
                }) => Some(format!("{project}/{upstream}/{platform}")),
                _ => None,
            })
            .collect();
        for u in &self.inner.upstreams {
            if !only_upstream.is_empty() && u.name != only_upstream {
                continue;
            }
            let head = self.head("u", &u.name)?;
            let mut info = UpstreamInfo {
                name: u.name.clone(),
                url: git::redact_url(&u.url),
                branch: u.branch.clone(),
                platforms: u.platforms.clone(),
                head: head.as_ref().map(|h| h.commit.clone()).unwrap_or_default(),
                head_seen_at_ms: head.map(|h| h.seen_at_ms).unwrap_or_default(),
                poll_error: self.poll_error(&format!("upstream {}", u.name)),
                ..Default::default()
            };
            for platform in &u.platforms {
                if let Some(b) = results.latest_build(&u.name, platform)? {
                    info.latest_builds.push(b);
                }
                if let Some(b) = results.good_build(&u.name, platform)? {
                    info.good_builds.push(b);
                }
            }
            out.upstreams.push(info);
            for p in &self.inner.projects {
                if !p.tests_against(&u.name) {
                    continue;
                }
                for platform in p.platforms_for(u) {
                    let latest = results.latest_run(&p.name, &u.name, platform)?;
                    let series = results.series(&format!("{}/{}/{platform}", p.name, u.name))?;
                    let red_since = match series.red_since {
                        Some(id) if series.last.as_ref().is_some_and(|l| l.red) => {
                            results.transition(id)?
                        }
                        _ => None,
                    };
                    out.cells.push(StatusCell {
                        latest: Some(latest.map(|r| r.info).unwrap_or_else(|| RunInfo {
                            project: p.name.clone(),
                            upstream: u.name.clone(),
                            platform: platform.to_owned(),
                            ..Default::default()
                        })),
                        red_since,
                        pending: pending.contains(&format!("{}/{}/{platform}", p.name, u.name)),
                    });
                }
            }
        }
        Ok(out)
    }

    /// Which projects went red at an upstream commit (or a prefix of its
    /// hash), in a range `A..B`, or at the newest head when `rev` is empty.
    pub async fn breakage(
        &self,
        upstream: &str,
        rev: &str,
    ) -> Result<GetBreakageResponse, PipelineError> {
        let u = self.upstream(upstream)?.clone();
        let git = &self.inner.git;
        let commits: Vec<Commit> = if rev.contains("..") {
            git.log(&u.name, &u.url, &u.branch, rev).await?
        } else {
            let sha = if rev.is_empty() {
                match self.head("u", &u.name)? {
                    Some(h) => h.commit,
                    None => git.head(&u.url, &u.branch).await?,
                }
            } else {
                git.resolve(&u.name, &u.url, &u.branch, rev).await?
            };
            match git.range(&u.name, &u.url, &u.branch, None, &sha).await {
                Ok((c, _)) if !c.is_empty() => c,
                _ => vec![Commit {
                    sha,
                    ..Default::default()
                }],
            }
        };
        let wanted: HashSet<&str> = commits.iter().map(|c| c.sha.as_str()).collect();
        let went_red = self.inner.results.transitions(usize::MAX, |t| {
            t.upstream == u.name
                && t.kind == TransitionKind::WentRed as i32
                && (wanted.contains(t.upstream_commit.as_str())
                    || t.culprits.iter().any(|c| wanted.contains(c.sha.as_str())))
        })?;
        Ok(GetBreakageResponse { commits, went_red })
    }

    /// Stored transitions, newest first.
    pub fn transitions(
        &self,
        upstream: &str,
        project: &str,
        limit: usize,
        all: bool,
    ) -> Result<Vec<Transition>, PipelineError> {
        Ok(self.inner.results.transitions(limit, |t| {
            (upstream.is_empty() || t.upstream == upstream)
                && (project.is_empty() || t.project == project)
                && (all
                    || t.kind == TransitionKind::WentRed as i32
                    || t.kind == TransitionKind::Fixed as i32)
        })?)
    }
}

/// The job that builds `commit` of `u` on `platform`.
fn build_spec(u: &UpstreamConfig, platform: &str, commit: &str) -> JobSpec {
    let mut env: HashMap<String, String> = u.env.clone().into_iter().collect();
    env.insert("TRUNKFARM_UPSTREAM".into(), u.name.clone());
    env.insert("TRUNKFARM_UPSTREAM_COMMIT".into(), commit.to_owned());
    env.insert("TRUNKFARM_PLATFORM".into(), platform.to_owned());
    let mut labels = vec![platform.to_owned()];
    labels.extend(u.labels.iter().cloned());
    JobSpec {
        commands: u.build.clone(),
        env,
        labels,
        project: u.name.clone(),
        repository: Some(Repository {
            url: u.url.clone(),
            rev: commit.to_owned(),
        }),
        timeout_secs: u.build_timeout.as_secs().max(1),
        artifact_sha256: String::new(),
        upload_prefix: BUILD_PREFIX_DIR.into(),
        report_paths: Vec::new(),
    }
}

/// The job that tests `p` at `project_commit` (its branch when unknown)
/// against the runtime of `build`.
fn test_spec(
    p: &ProjectConfig,
    u: &UpstreamConfig,
    platform: &str,
    build: &BuildInfo,
    project_commit: &str,
) -> JobSpec {
    let mut env: HashMap<String, String> = p.env.clone().into_iter().collect();
    env.insert("TRUNKFARM_PROJECT".into(), p.name.clone());
    env.insert("TRUNKFARM_UPSTREAM".into(), u.name.clone());
    env.insert("TRUNKFARM_UPSTREAM_COMMIT".into(), build.commit.clone());
    env.insert("TRUNKFARM_PLATFORM".into(), platform.to_owned());
    let mut labels = vec![platform.to_owned()];
    labels.extend(p.labels.iter().cloned());
    JobSpec {
        commands: p.test.clone(),
        env,
        labels,
        project: p.name.clone(),
        repository: Some(Repository {
            url: p.url.clone(),
            rev: if project_commit.is_empty() {
                p.branch.clone()
            } else {
                project_commit.to_owned()
            },
        }),
        timeout_secs: p.timeout.as_secs().max(1),
        artifact_sha256: build.artifact_sha256.clone(),
        upload_prefix: String::new(),
        report_paths: p.junit.clone(),
    }
}
