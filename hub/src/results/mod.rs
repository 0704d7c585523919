//! Results of the trunk pipeline: runtime builds, downstream test runs, and
//! the transitions between them (went red, still red, fixed, still green)
//! with culprit ranges. Owns the `results` tree.
//!
//! A *series* is what gets compared over time: one (project, upstream,
//! platform) for test runs, one (upstream, platform) for the runtime's own
//! builds. Each new decisive result (green or red; infrastructure errors
//! are recorded but decide nothing) is classified against the series'
//! previous one, and the transition is stored in the same atomic write as
//! the result, under a fresh increasing id: the notifier reads transitions
//! in id order.
//!
//! * `classify.rs` — the pure part: a result against its series' state.
//! * `keys.rs` — the tree's key layout.
//! * `query.rs` — the read models: status grid, breakage, transitions,
//!   red series, artifacts still referenced.
//! * `records.rs` — the stored records (this module's own serde types, in
//!   the bytes older releases wrote) and their conversions to the wire.
//! * here — the run record, what is recorded, and the one recorder,
//!   [`Results::record`].
//!
//! The recorder owns its locks: records run one at a time (the series read
//! before classifying cannot change before the write), and every
//! read-modify-write of the tree (a record's write, a build queued by a
//! poller) is serialised, so a "queued" mark never overwrites a finished
//! build. Listing the culprit range with git happens between classifying and
//! writing, holding only the records' lock, which no poller takes.

mod bisection;
mod classify;
mod confirm;
mod index;
mod keys;
mod noise;
mod query;
mod records;
mod retention;
mod suspicious;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use trunkfarm_proto::v1::{BuildState, RunStatus};

pub(crate) use bisection::{Bisection, Member, PointBuild, PointRun};
pub(crate) use classify::{CulpritRange, SeriesState, run_status};
pub(crate) use confirm::{ConfirmState, Confirmation, Hold, Judged, Rerun, Rules, Said};
pub(crate) use noise::{FlakyRule, Noise, TestNoise, wire as noise_wire};
pub(crate) use query::{
    Breakage, Grid, GridSeries, HistoryRequest, OpenRun, PAGE_RUNS, ProjectRow, SeriesHistory,
    UpstreamHistory, UpstreamRow,
};
pub(crate) use records::{Bisect, BisectState};
pub(crate) use records::{BuildInfo, Class, Commit, RunInfo, TestCase, Transition};
pub(crate) use retention::{Cursor, Kept, Policy, Pruned};

use crate::changes::Changes;
use crate::job_key::RerunKind;
use crate::store::{StoreError, Table, now_ms};
use keys::Pointer;

/// A run as stored: what the status grid shows plus every test case.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct RunRecord {
    /// The summary (its `failing_tests` holds the failing cases only).
    pub(crate) info: RunInfo,
    /// Every test case the JUnit reports named.
    pub(crate) cases: Vec<TestCase>,
}

/// A finished pipeline job, as the pipeline took it in: what is recorded.
#[derive(Clone, Debug)]
pub(crate) enum Finished {
    /// A runtime build (its `head_seq` orders it in its series).
    Build(BuildInfo),
    /// A test run; `head_seq` is when its upstream commit was the head
    /// (0: never, the run is stored but decides nothing).
    Run {
        /// The run.
        run: RunRecord,
        /// Its upstream commit's head sequence.
        head_seq: u64,
    },
}

impl Finished {
    fn job_id(&self) -> u64 {
        match self {
            Finished::Build(b) => b.job_id,
            Finished::Run { run, .. } => run.info.job_id,
        }
    }

    /// Why it failed for the machine's sake (a red run only; empty: it did
    /// not, or it is a build).
    fn machine_failure(&self) -> String {
        match self {
            Finished::Run { run, .. } if run.info.status == RunStatus::Red as i32 => {
                confirm::machine_failure(run.info.outcome, &run.info.detail)
            }
            _ => String::new(),
        }
    }

    /// A confirmation for its verdict, held against its series' `series`.
    fn confirmation(&self, hold: Hold, series: &SeriesState) -> Confirmation {
        let Hold { mut said, rules } = hold;
        said.machine = self.machine_failure();
        let mut c = self.awaiting(said);
        if let (true, Some(green), Finished::Run { run, .. }) =
            (rules.classify, &series.last_green, self)
        {
            c.baseline = green.upstream.clone();
            c.project_changed = green.project != run.info.project_commit;
        }
        c.rules = rules;
        c
    }

    /// An awaiting confirmation of `original`'s verdict on it.
    fn awaiting(&self, original: Said) -> Confirmation {
        let (project, upstream, platform, commit, head_seq) = match self {
            Finished::Build(b) => (
                String::new(),
                b.upstream.clone(),
                b.platform.clone(),
                b.commit.clone(),
                b.head_seq,
            ),
            Finished::Run { run, head_seq, .. } => (
                run.info.project.clone(),
                run.info.upstream.clone(),
                run.info.platform.clone(),
                run.info.upstream_commit.clone(),
                *head_seq,
            ),
        };
        Confirmation {
            original,
            project,
            upstream,
            platform,
            commit,
            head_seq,
            state: ConfirmState::Awaiting,
            ..Default::default()
        }
    }

    /// Shows where its confirmation stands.
    fn show_confirmation(&mut self, c: &Confirmation) {
        let (confirmation, detail) = match self {
            Finished::Build(b) => (&mut b.confirmation, &mut b.confirmation_detail),
            Finished::Run { run, .. } => (
                &mut run.info.confirmation,
                &mut run.info.confirmation_detail,
            ),
        };
        *confirmation = c.state.word().into();
        *detail = c.detail();
    }

    /// Whether a held verdict changes its series when it counts: a run's
    /// went red or fixed (still green and still red count alone); any
    /// decisive build (a volunteer's passed build is what every test would
    /// run, its failed one turns the runtime red).
    fn held_if(&self, verdict: Option<&classify::Verdict>) -> bool {
        match self {
            Finished::Build(b) => {
                b.state == BuildState::Passed as i32 || b.state == BuildState::Failed as i32
            }
            Finished::Run { .. } => verdict.is_some_and(|v| v.changes_series()),
        }
    }
}

/// The series one recording writes: its name, its state as this recording
/// leaves it, and whether the verdicts it holds for confirmation changed
/// (then the state is written even when nothing is classified).
struct Series<'a> {
    name: &'a str,
    state: SeriesState,
    held_changed: bool,
}

/// What [`Results::record`] did.
#[derive(Debug)]
pub(crate) enum Recorded {
    /// The job was recorded before (the inbox hands a job over again after
    /// a crash between record and ack): nothing was written.
    Already,
    /// Recorded now, with the transition it caused, if it decided anything.
    New(Option<Box<Transition>>),
}

/// Lists a went-red result's culprit commits (git, for the pipeline).
#[tonic::async_trait]
pub(crate) trait Culprits: Send + Sync {
    /// The range's commits, oldest first, and why the list is incomplete
    /// (empty when it is not).
    async fn list(&self, range: &CulpritRange) -> (Vec<Commit>, String);

    /// Whether a went-red range of several commits is bisected
    /// (`pipeline.bisect_max_builds` > 0; see `bisection.rs`).
    fn bisects(&self) -> bool {
        false
    }

    /// The upstream's branch as its head was last polled (the default
    /// branch found, when none is configured; empty when unknown): stored
    /// with each transition for the mails that name it.
    fn branch(&self, _upstream: &str) -> String {
        String::new()
    }
}

/// Whoever must write in the same atomic transaction as a new transition
/// (the notifier's outbox: a mail is never lost between the transition and
/// its queueing, nor queued twice).
pub(crate) trait TransitionSink: Send + Sync {
    /// The table the staged writes go to.
    fn table(&self) -> &Table;
    /// Stages into `batch` what the stored transition `t` causes (for
    /// [`TransitionSink::table`], applied atomically with `t`).
    fn stage(&self, t: &Transition, batch: &mut crate::store::Batch) -> Result<(), StoreError>;
    /// Stages into `batch` what the bisection of the stored transition `t`
    /// ending causes (`t.bisect` settled: found, range or gave up), applied
    /// atomically with `t`'s update: the held went-red mail released with
    /// the first bad commit, or a follow-up in its thread.
    fn stage_bisected(
        &self,
        t: &Transition,
        batch: &mut crate::store::Batch,
    ) -> Result<(), StoreError> {
        let _ = (t, batch);
        Ok(())
    }
}

/// Owner of the `results` tree (cheap to clone; clones share the locks).
#[derive(Clone)]
pub(crate) struct Results {
    table: Table,
    /// Held for a whole [`Results::record`]: one record at a time.
    recording: Arc<tokio::sync::Mutex<()>>,
    /// Held for every read-modify-write of the tree (never across an await).
    writing: Arc<Mutex<()>>,
    /// Per project: when a test is known flaky (the default for others).
    flaky: Arc<HashMap<String, FlakyRule>>,
    /// Bumped after every durable write (the dashboard's live updates).
    changes: Changes,
}

impl Results {
    /// Opens the `results` tree.
    pub(crate) fn open(store: &crate::store::Store) -> Result<Results, StoreError> {
        let table = Table::open(store, crate::store::trees::RESULTS)?;
        if let Some(n) = index::build_once(&table)? {
            tracing::info!(
                transitions = n,
                "indexed the stored transitions by commit, project and upstream"
            );
        }
        Ok(Results {
            table,
            recording: Arc::default(),
            writing: Arc::default(),
            flaky: Arc::default(),
            changes: Changes::default(),
        })
    }

    /// Makes the writes applied so far durable, then says so to
    /// [`Results::changes`]' watchers.
    async fn committed(&self) -> Result<(), StoreError> {
        self.table.store().commit().await?;
        self.changes.bump();
        Ok(())
    }

    /// Bumped after every durable write of this tree (and by the pipeline
    /// for a new upstream head): what the dashboard's live updates watch.
    pub(crate) fn changes(&self) -> &Changes {
        &self.changes
    }

    /// The same, judging known flaky tests per project by `rules`
    /// (`[[project]] flaky_after`, `flaky_counts_alone`).
    pub(crate) fn with_flaky_rules(mut self, rules: HashMap<String, FlakyRule>) -> Results {
        self.flaky = Arc::new(rules);
        self
    }

    /// A project's known-flaky rule.
    pub(crate) fn flaky_rule(&self, project: &str) -> FlakyRule {
        self.flaky.get(project).copied().unwrap_or_default()
    }

    fn write_lock(&self) -> MutexGuard<'_, ()> {
        self.writing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the finished job `job_id` was already recorded.
    fn recorded(&self, job_id: u64) -> Result<bool, StoreError> {
        self.table.contains(keys::recorded(job_id))
    }

    /// A build as last recorded.
    pub(crate) fn build(
        &self,
        upstream: &str,
        platform: &str,
        commit: &str,
    ) -> Result<Option<BuildInfo>, StoreError> {
        self.table.get(keys::build(upstream, platform, commit))
    }

    /// The newest build of an upstream on a platform.
    pub(crate) fn latest_build(
        &self,
        upstream: &str,
        platform: &str,
    ) -> Result<Option<BuildInfo>, StoreError> {
        self.table.get(Pointer::Latest.key(upstream, platform))
    }

    /// The newest passed build (what new project commits test against).
    pub(crate) fn good_build(
        &self,
        upstream: &str,
        platform: &str,
    ) -> Result<Option<BuildInfo>, StoreError> {
        self.table.get(Pointer::Good.key(upstream, platform))
    }

    /// The newest run of a series.
    pub(crate) fn latest_run(
        &self,
        project: &str,
        upstream: &str,
        platform: &str,
    ) -> Result<Option<RunRecord>, StoreError> {
        self.table
            .get(keys::latest_run(project, upstream, platform))
    }

    /// One run of a series, with every test case (what a went-red mail
    /// quotes: the failing tests' messages).
    pub(crate) fn run(
        &self,
        project: &str,
        upstream: &str,
        platform: &str,
        job_id: u64,
    ) -> Result<Option<RunRecord>, StoreError> {
        self.table
            .get(keys::run(project, upstream, platform, job_id))
    }

    /// A series' remembered state.
    fn series(&self, name: &str) -> Result<SeriesState, StoreError> {
        Ok(self.table.get(keys::series(name))?.unwrap_or_default())
    }

    /// One transition.
    pub(crate) fn transition(&self, id: u64) -> Result<Option<Transition>, StoreError> {
        self.table.get(keys::transition(id))
    }

    /// Marks a build job queued (state pending) so the status shows it
    /// before it finishes; not a decisive result. Returns what the build
    /// shows now: the stored build if it already is this job's (maybe
    /// finished), the pending mark, or `None` when this job was recorded
    /// already and a newer build of the commit has taken its place.
    pub(crate) async fn build_queued(
        &self,
        build: BuildInfo,
    ) -> Result<Option<BuildInfo>, StoreError> {
        {
            let _w = self.write_lock();
            if let Some(existing) = self.build(&build.upstream, &build.platform, &build.commit)?
                && existing.job_id == build.job_id
            {
                return Ok(Some(existing));
            }
            if self.recorded(build.job_id)? {
                return Ok(None);
            }
            let mut batch = crate::store::Batch::default();
            self.stage_build(&mut batch, &build)?;
            self.table.apply(batch)?;
        }
        self.committed().await?;
        Ok(Some(build))
    }

    /// Stages `b` under its commit and moves the newest-build pointer (and
    /// the newest-passed one, if it passed) to it, unless they point at a
    /// newer head already. Only commits that were the head move pointers.
    fn stage_build(
        &self,
        batch: &mut crate::store::Batch,
        b: &BuildInfo,
    ) -> Result<(), StoreError> {
        self.table
            .stage(batch, keys::build(&b.upstream, &b.platform, &b.commit), b)?;
        let mut pointers = vec![Pointer::Latest];
        // A volunteer's build counts only once confirmed.
        let counts = b.confirmation.is_empty() || b.confirmation == ConfirmState::Confirmed.word();
        if b.state == BuildState::Passed as i32 && counts {
            pointers.push(Pointer::Good);
        }
        for pointer in pointers {
            let key = pointer.key(&b.upstream, &b.platform);
            let current: Option<BuildInfo> = self.table.get(&key)?;
            if b.head_seq > 0 && current.is_none_or(|c| c.head_seq <= b.head_seq) {
                self.table.stage(batch, key, b)?;
            }
        }
        Ok(())
    }

    /// Records a finished job once: classifies it against its series, lists
    /// the culprits of a went-red result (`culprits`, without any lock the
    /// pollers take), and writes the result, its transition, the series'
    /// next state, the "recorded" marker and `sink`'s writes for the
    /// transition in one atomic step, durable when this returns. A job
    /// recorded before is [`Recorded::Already`].
    ///
    /// A result whose verdict (`unconfirmed`: what it said and who said it)
    /// needs confirming (see `confirm.rs`) and would change its series is
    /// stored *awaiting confirmation* with a `c/<job>` record instead: no
    /// transition, the series unchanged, a build not the good one; the
    /// pipeline queues the re-runs [`Confirmation::wanted_reruns`] asks for.
    pub(crate) async fn record(
        &self,
        mut finished: Finished,
        unconfirmed: Option<Hold>,
        culprits: &dyn Culprits,
        sink: &dyn TransitionSink,
    ) -> Result<Recorded, StoreError> {
        let _one = self.recording.lock().await;
        let job_id = finished.job_id();
        if self.recorded(job_id)? {
            return Ok(Recorded::Already);
        }
        let series_name = classify::series_of(&finished);
        let mut state = self.series(&series_name)?;
        let mut verdict = classify::judge(&state, &finished);
        // Known flaky tests alone do not turn a project red (noise.rs).
        self.excuse_flaky(verdict.as_mut())?;
        let trusted = unconfirmed.as_ref().is_none_or(|h| h.said.trusted);
        let mut held = None;
        if let Some(hold) = unconfirmed
            && finished.held_if(verdict.as_ref())
            && let Some(v) = verdict.take()
        {
            let c = finished.confirmation(hold, &state);
            finished.show_confirmation(&c);
            state.awaiting.push((job_id, v.order));
            held = Some(c);
        }
        // A green run whose JUnit counts look wrong (suspicious.rs): only a
        // trusted agent's run is watched and learnt from (a volunteer's
        // could mail maintainers, start a bisection or skew the usual
        // counts); under `confirm = "never"` every run counts alone.
        if trusted {
            suspicious::watch(&mut state, verdict.as_mut(), &mut finished);
        }
        let state_changed = held.is_some();
        let transition = self
            .write(
                verdict,
                Series {
                    name: &series_name,
                    state,
                    held_changed: state_changed,
                },
                culprits,
                sink,
                |batch| {
                    self.stage_finished(batch, &finished)?;
                    if let Some(c) = &held {
                        self.table.stage(batch, keys::confirmation(job_id), c)?;
                    }
                    batch.insert(keys::recorded(job_id).as_bytes(), &[][..]);
                    Ok(())
                },
            )
            .await?;
        Ok(Recorded::New(transition.map(Box::new)))
    }

    /// A held verdict's confirmation, if job `job_id` has one.
    pub(crate) fn confirmation(&self, job_id: u64) -> Result<Option<Confirmation>, StoreError> {
        self.table.get(keys::confirmation(job_id))
    }

    /// Records a finished re-run of job `original` once (like
    /// [`Results::record`]; `result` is the re-run's own): settles its
    /// confirmation (see `confirm.rs`), and once settled writes what it
    /// found in the same atomic write: a result that counts (confirmed,
    /// classed regressed, project_side or broken) is classified against its
    /// series as it is now (transition, culprits, mails; a result older
    /// than the series' last classified one decides nothing, as any late
    /// result); one classed flaky or spurious is stored as a transition
    /// that leaves the series as it was; an overruled or unconfirmed one
    /// changes nothing but what the run shows. A build re-run by a trusted
    /// agent that overrules a volunteer's counts in the original's place.
    pub(crate) async fn record_rerun(
        &self,
        original: u64,
        mut rerun: Rerun,
        result: Finished,
        culprits: &dyn Culprits,
        sink: &dyn TransitionSink,
    ) -> Result<Recorded, StoreError> {
        rerun.said.machine = result.machine_failure();
        self.settle(original, rerun, Some(result), culprits, sink)
            .await
    }

    /// The baseline run job `original`'s confirmation wants cannot run
    /// (`why`: its runtime's artifact is gone): the confirmation goes on
    /// without it (see `confirm.rs`), settling like [`Results::record_rerun`].
    /// Once given up, calling again changes nothing.
    pub(crate) async fn baseline_not_run(
        &self,
        original: u64,
        why: String,
        culprits: &dyn Culprits,
        sink: &dyn TransitionSink,
    ) -> Result<Recorded, StoreError> {
        let rerun = Rerun::not_run(RerunKind::Baseline, why);
        self.settle(original, rerun, None, culprits, sink).await
    }

    /// [`Results::record_rerun`] and [`Results::baseline_not_run`]: `rerun`
    /// with job id 0 and no `result` is one that did not run.
    async fn settle(
        &self,
        original: u64,
        rerun: Rerun,
        result: Option<Finished>,
        culprits: &dyn Culprits,
        sink: &dyn TransitionSink,
    ) -> Result<Recorded, StoreError> {
        let _one = self.recording.lock().await;
        let job_id = rerun.said.job_id;
        if job_id != 0 && self.recorded(job_id)? {
            return Ok(Recorded::Already);
        }
        let identical = matches!(rerun.kind, RerunKind::Again | RerunKind::Confirm);
        let mark = |batch: &mut crate::store::Batch| {
            if job_id != 0 {
                batch.insert(keys::recorded(job_id).as_bytes(), &[][..]);
            }
        };
        let held = self.confirmation(original)?;
        let awaiting = held.as_ref().is_some_and(|c| {
            c.state == ConfirmState::Awaiting && (job_id != 0 || !c.baseline_given_up())
        });
        let (Some(mut c), true) = (held, awaiting) else {
            // Settled already (or never held): nothing to decide, but an
            // identical re-run is still a second run of the same spec.
            let mut batch = crate::store::Batch::default();
            mark(&mut batch);
            if let (true, Some(c)) = (identical, self.confirmation(original)?) {
                let first = self.held_result(&c)?;
                let trusted_pair = c.original.trusted && rerun.said.trusted;
                self.identical_runs(&mut batch, (first.as_ref(), result.as_ref()), trusted_pair)?;
            }
            {
                let _w = self.write_lock();
                self.table.apply(batch)?;
            }
            self.committed().await?;
            return Ok(Recorded::New(None));
        };
        // Only trusted agents' word measures noise: a volunteer's false red
        // must not make a test "known flaky" (noise.rs).
        let trusted_pair = c.original.trusted && rerun.said.trusted;
        c.settle(rerun);
        let mut finished = self.held_result(&c)?;
        if let Some(f) = &mut finished {
            f.show_confirmation(&c);
        }
        // What counts now: the original once confirmed, or classed flaky
        // or spurious (a transition leaving the series as it was); a build
        // overruled by a trusted agent's, that one.
        let trusted_rerun = c.decisive_rerun().is_some_and(|r| r.trusted);
        let counts = match c.state {
            ConfirmState::Confirmed => finished.as_ref(),
            ConfirmState::Overruled if c.class.is_some() => finished.as_ref(),
            ConfirmState::Overruled
                if trusted_rerun && matches!(result, Some(Finished::Build(_))) =>
            {
                result.as_ref()
            }
            _ => None,
        };
        let series_name = finished
            .as_ref()
            .or(counts)
            .map(classify::series_of)
            .unwrap_or_default();
        let mut state = match series_name.is_empty() {
            false => self.series(&series_name)?,
            true => SeriesState::default(),
        };
        // Settled: the series no longer waits for it.
        let held_before = state.awaiting.len();
        if c.state != ConfirmState::Awaiting {
            state.awaiting.retain(|(job, _)| *job != original);
            c.known_flaky = state.flaky_on_trusted > 0;
        }
        let mut state_changed = state.awaiting.len() != held_before;
        if c.flaky_on_trusted() {
            state.flaky_on_trusted += 1;
            state_changed = true;
        }
        let mut verdict = counts.and_then(|f| classify::judge(&state, f));
        if let Some(v) = &mut verdict {
            match (c.state, c.class) {
                (ConfirmState::Confirmed, class) => {
                    v.transition.class = class;
                    v.transition.confirmed_by_job = c.decisive_rerun().map_or(0, |r| r.job_id);
                }
                (ConfirmState::Overruled, Some(class)) => v.leave_series(class),
                _ => {}
            }
        }
        let replaced = (c.state == ConfirmState::Overruled && c.class.is_none())
            .then_some(counts)
            .flatten();
        let transition = self
            .write(
                verdict,
                Series {
                    name: &series_name,
                    state,
                    held_changed: state_changed,
                },
                culprits,
                sink,
                |batch| {
                    if let Some(f) = &finished {
                        self.stage_finished(batch, f)?;
                    }
                    // Staged after the original: the commit's build from now on.
                    if let Some(r) = replaced {
                        self.stage_finished(batch, r)?;
                    }
                    if identical {
                        let pair = (finished.as_ref(), result.as_ref());
                        self.identical_runs(batch, pair, trusted_pair)?;
                    }
                    self.table.stage(batch, keys::confirmation(original), &c)?;
                    mark(batch);
                    Ok(())
                },
            )
            .await?;
        Ok(Recorded::New(transition.map(Box::new)))
    }

    /// Two runs of the same spec (same project commit, same runtime): a
    /// held original and its identical re-run, in the write that takes the
    /// re-run in (whether or not it settled the confirmation): counted in
    /// the project's noise record (how often its tests flip on an identical
    /// re-run, `noise.rs`) when both came from trusted agents
    /// (`trusted_pair`: a volunteer's false red must not make a test known
    /// flaky). Builds (and a missing original) are not counted.
    fn identical_runs(
        &self,
        batch: &mut crate::store::Batch,
        (original, rerun): (Option<&Finished>, Option<&Finished>),
        trusted_pair: bool,
    ) -> Result<(), StoreError> {
        if let (Some(Finished::Run { run: a, .. }), Some(Finished::Run { run: b, .. }), true) =
            (original, rerun, trusted_pair)
        {
            self.stage_noise(batch, a, b)?;
        }
        Ok(())
    }

    /// The stored result a confirmation holds, as recording took it in
    /// (`None` when it is gone: never stored, or a newer build of the
    /// commit took its place).
    fn held_result(&self, c: &Confirmation) -> Result<Option<Finished>, StoreError> {
        if c.project.is_empty() {
            let build = self.build(&c.upstream, &c.platform, &c.commit)?;
            return Ok(build
                .filter(|b| b.job_id == c.original.job_id)
                .map(Finished::Build));
        }
        let key = keys::run(&c.project, &c.upstream, &c.platform, c.original.job_id);
        let run: Option<RunRecord> = self.table.get(key)?;
        Ok(run.map(|run| Finished::Run {
            run,
            head_seq: c.head_seq,
        }))
    }

    /// Stages a finished build or run: its record and the pointers to the
    /// newest (summary only for runs: the grid reads them often).
    fn stage_finished(
        &self,
        batch: &mut crate::store::Batch,
        finished: &Finished,
    ) -> Result<(), StoreError> {
        match finished {
            Finished::Build(b) => self.stage_build(batch, b),
            Finished::Run { run, .. } => {
                let i = &run.info;
                self.table.stage(
                    batch,
                    keys::run(&i.project, &i.upstream, &i.platform, i.job_id),
                    run,
                )?;
                let latest = self.latest_run(&i.project, &i.upstream, &i.platform)?;
                if latest.is_none_or(|l| l.info.job_id <= i.job_id) {
                    let summary = RunRecord {
                        info: i.clone(),
                        cases: Vec::new(),
                    };
                    self.table.stage(
                        batch,
                        keys::latest_run(&i.project, &i.upstream, &i.platform),
                        &summary,
                    )?;
                }
                Ok(())
            }
        }
    }

    /// Writes one decision: `verdict`'s transition (culprits listed first,
    /// holding no write lock) and the series' next state, what `stage` adds,
    /// and `sink`'s writes for the transition, in one atomic step; durable
    /// when this returns. Call holding the recording lock.
    async fn write(
        &self,
        verdict: Option<classify::Verdict>,
        series: Series<'_>,
        culprits: &dyn Culprits,
        sink: &dyn TransitionSink,
        stage: impl FnOnce(&mut crate::store::Batch) -> Result<(), StoreError>,
    ) -> Result<Option<Transition>, StoreError> {
        let Series {
            name: series_name,
            mut state,
            held_changed,
        } = series;
        let (listed, listed_error) = match verdict.as_ref().and_then(|v| v.culprit_range()) {
            Some(range) => culprits.list(&range).await,
            None => (Vec::new(), String::new()),
        };
        let transition = {
            let _w = self.write_lock();
            let mut batch = crate::store::Batch::default();
            let transition = match verdict {
                Some(verdict) => {
                    let mut t = verdict.transition.clone();
                    t.id = self.table.store().next_id()?;
                    t.at_ms = now_ms();
                    t.culprits = listed;
                    t.culprits_error = listed_error;
                    t.branch = culprits.branch(&t.upstream);
                    if culprits.bisects() {
                        bisection::join(&self.table, &mut batch, &mut t)?;
                    }
                    classify::advance(&mut state, &t, verdict);
                    self.table.stage(&mut batch, keys::transition(t.id), &t)?;
                    index::stage(&mut batch, &t);
                    self.table
                        .stage(&mut batch, keys::series(series_name), &state)?;
                    Some(t)
                }
                None => {
                    if held_changed {
                        self.table
                            .stage(&mut batch, keys::series(series_name), &state)?;
                    }
                    None
                }
            };
            stage(&mut batch)?;
            match &transition {
                None => self.table.apply(batch)?,
                Some(t) => {
                    let mut theirs = crate::store::Batch::default();
                    sink.stage(t, &mut theirs)?;
                    self.table.apply_with(batch, sink.table(), theirs)?;
                }
            }
            transition
        };
        self.committed().await?;
        Ok(transition)
    }
}
