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
//! Recording is split in two so the caller can ask git for the culprit range
//! between the steps without holding anything: [`Results::prepare`] reads the
//! series and classifies, [`Results::commit`] writes. Only the pipeline's one
//! inbox task records, so nothing changes in between.
//!
//! Key layout (all in `results`):
//! * `b/<upstream>/<platform>/<commit>` → [`BuildInfo`] (the newest build of it)
//! * `bl/<upstream>/<platform>` → the newest [`BuildInfo`]
//! * `bg/<upstream>/<platform>` → the newest passed [`BuildInfo`]
//! * `r/<project>/<upstream>/<platform>/<job id, 20 digits>` → [`RunRecord`]
//! * `rl/<project>/<upstream>/<platform>` → the newest [`RunRecord`]
//! * `s/<series>` → [`SeriesState`], `<series>` = `<project>/<upstream>/<platform>`
//!   or `/<upstream>/<platform>` for builds
//! * `t/<id, 20 digits>` → [`Transition`]
//! * `p/<job id, 20 digits>` → marks a finished job as recorded (idempotence)

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use trunkfarm_proto::v1::{
    BuildInfo, BuildState, Commit, RunInfo, RunStatus, TestCase, Transition, TransitionKind,
};

use crate::store::{Store, StoreError, now_ms};

/// The tree this module owns.
const TREE: &str = crate::store::trees::RESULTS;

/// A run as stored: what the status grid shows plus every test case.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RunRecord {
    /// The summary (its `failing_tests` holds the failing cases only).
    pub info: RunInfo,
    /// Every test case the JUnit reports named.
    pub cases: Vec<TestCase>,
}

/// What a series remembers between results.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SeriesState {
    /// Ordering of the last classified result: (build job id, test job id).
    /// A result older than this (finished out of order) is stored but not
    /// classified, so a slow old run cannot flip the series back.
    pub order: (u64, u64),
    /// The last decisive result.
    pub last: Option<Decisive>,
    /// The last green result's commits: the culprit range starts after it.
    pub last_green: Option<Commits>,
    /// The went-red transition the series is red since.
    pub red_since: Option<u64>,
}

/// A decisive (green or red) result, as the next one is compared with.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Decisive {
    /// Green or red.
    pub red: bool,
    /// Its commits.
    pub commits: Commits,
    /// Its failing test names (from JUnit), sorted.
    pub failing: Vec<String>,
}

/// The upstream and project commits a result was produced at.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Commits {
    /// Upstream commit.
    pub upstream: String,
    /// Project commit (empty for builds or when unknown).
    pub project: String,
}

/// What a new result amounts to, before it is written.
#[derive(Debug)]
pub struct Prepared {
    series_key: String,
    state: SeriesState,
    job_id: u64,
    /// The transition to store, if the result is decisive and not stale.
    pub transition: Option<Transition>,
    /// The series' next state, with the transition.
    next: Option<(Decisive, (u64, u64))>,
    kind: PreparedKind,
}

#[derive(Debug)]
enum PreparedKind {
    Build(BuildInfo),
    Run(Box<RunRecord>),
}

impl Prepared {
    /// The upstream range `(last green, this]` whose commits the caller
    /// should list as culprits, when the result went red. `None` for the
    /// start means "no green result yet": list only the end commit.
    pub fn culprit_range(&self) -> Option<(Option<String>, String)> {
        let t = self.transition.as_ref()?;
        if t.kind != TransitionKind::WentRed as i32 {
            return None;
        }
        let from = (!t.last_green_upstream_commit.is_empty())
            .then(|| t.last_green_upstream_commit.clone());
        Some((from, t.upstream_commit.clone()))
    }
}

/// Key/value pairs to insert into another tree.
pub type Writes = Vec<(Vec<u8>, Vec<u8>)>;

/// Whoever must write in the same atomic transaction as a new transition
/// (the notifier's outbox: a mail is never lost between the transition and
/// its queueing, nor queued twice).
pub trait TransitionSink: Send + Sync {
    /// The tree the writes go to.
    fn tree(&self) -> &sled::Tree;
    /// The key/value pairs to insert for this (stored) transition.
    fn writes(&self, t: &Transition) -> Result<Writes, StoreError>;
}

/// Owner of the `results` tree.
#[derive(Clone)]
pub struct Results {
    store: Store,
    tree: sled::Tree,
}

/// The status a job outcome gives a run.
pub fn run_status(outcome: trunkfarm_proto::v1::Outcome) -> RunStatus {
    use trunkfarm_proto::v1::Outcome;
    match outcome {
        Outcome::Passed => RunStatus::Green,
        Outcome::Failed | Outcome::TimedOut => RunStatus::Red,
        Outcome::Error | Outcome::Cancelled | Outcome::Unspecified => RunStatus::Error,
    }
}

fn id20(id: u64) -> String {
    format!("{id:020}")
}

fn series_of_run(info: &RunInfo) -> String {
    format!("{}/{}/{}", info.project, info.upstream, info.platform)
}

fn series_of_build(b: &BuildInfo) -> String {
    format!("/{}/{}", b.upstream, b.platform)
}

impl Results {
    /// Opens the `results` tree.
    pub fn open(store: &Store) -> Result<Results, StoreError> {
        Ok(Results {
            store: store.clone(),
            tree: store.tree(TREE)?,
        })
    }

    fn get_json<T: for<'de> Deserialize<'de>>(&self, key: &str) -> Result<Option<T>, StoreError> {
        let Some(raw) = self.tree.get(key).map_err(|e| self.store.err(e))? else {
            return Ok(None);
        };
        serde_json::from_slice(&raw)
            .map(Some)
            .map_err(|e| self.store.corrupt(format!("{TREE}/{key}"), e))
    }

    fn scan_json<T: for<'de> Deserialize<'de>>(&self, prefix: &str) -> Result<Vec<T>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(prefix) {
            let (k, v) = item.map_err(|e| self.store.err(e))?;
            out.push(serde_json::from_slice(&v).map_err(|e| {
                self.store
                    .corrupt(format!("{TREE}/{}", String::from_utf8_lossy(&k)), e)
            })?);
        }
        Ok(out)
    }

    fn encode<T: Serialize>(&self, value: &T) -> Result<Vec<u8>, StoreError> {
        serde_json::to_vec(value).map_err(|e| self.store.corrupt("(encode result)", e))
    }

    /// Whether the finished job `job_id` was already recorded (the inbox
    /// hands a job over again after a crash between record and ack).
    pub fn recorded(&self, job_id: u64) -> Result<bool, StoreError> {
        self.tree
            .contains_key(format!("p/{}", id20(job_id)))
            .map_err(|e| self.store.err(e))
    }

    /// A build as last recorded.
    pub fn build(
        &self,
        upstream: &str,
        platform: &str,
        commit: &str,
    ) -> Result<Option<BuildInfo>, StoreError> {
        self.get_json(&format!("b/{upstream}/{platform}/{commit}"))
    }

    /// The newest build of an upstream on a platform.
    pub fn latest_build(
        &self,
        upstream: &str,
        platform: &str,
    ) -> Result<Option<BuildInfo>, StoreError> {
        self.get_json(&format!("bl/{upstream}/{platform}"))
    }

    /// The newest passed build (what new project commits test against).
    pub fn good_build(
        &self,
        upstream: &str,
        platform: &str,
    ) -> Result<Option<BuildInfo>, StoreError> {
        self.get_json(&format!("bg/{upstream}/{platform}"))
    }

    /// Records that a build job was queued (state pending), so the status
    /// shows it before it finishes. Not a decisive result: no transition.
    pub async fn build_queued(&self, build: &BuildInfo) -> Result<(), StoreError> {
        let key = format!("b/{}/{}/{}", build.upstream, build.platform, build.commit);
        if let Some(existing) = self.get_json::<BuildInfo>(&key)? {
            if existing.job_id == build.job_id {
                return Ok(());
            }
        }
        let bytes = self.encode(build)?;
        let mut batch = sled::Batch::default();
        batch.insert(key.as_bytes(), bytes.clone());
        self.move_pointer(&mut batch, "bl", build, &bytes)?;
        self.tree
            .apply_batch(batch)
            .map_err(|e| self.store.err(e))?;
        self.store.commit().await
    }

    /// Points `<pointer>/<upstream>/<platform>` (`bl`: newest build, `bg`:
    /// newest passed build) at `build`, unless it points at a newer head
    /// already. Only commits that were the head move pointers.
    fn move_pointer(
        &self,
        batch: &mut sled::Batch,
        pointer: &str,
        build: &BuildInfo,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        let key = format!("{pointer}/{}/{}", build.upstream, build.platform);
        let current: Option<BuildInfo> = self.get_json(&key)?;
        if build.head_seq > 0 && current.is_none_or(|c| c.head_seq <= build.head_seq) {
            batch.insert(key.as_bytes(), bytes);
        }
        Ok(())
    }

    /// The newest run of a series.
    pub fn latest_run(
        &self,
        project: &str,
        upstream: &str,
        platform: &str,
    ) -> Result<Option<RunRecord>, StoreError> {
        self.get_json(&format!("rl/{project}/{upstream}/{platform}"))
    }

    /// A series' remembered state.
    pub fn series(&self, key: &str) -> Result<SeriesState, StoreError> {
        Ok(self.get_json(&format!("s/{key}"))?.unwrap_or_default())
    }

    /// The runs of a series, oldest first.
    #[cfg(test)]
    pub fn runs(
        &self,
        project: &str,
        upstream: &str,
        platform: &str,
    ) -> Result<Vec<RunRecord>, StoreError> {
        self.scan_json(&format!("r/{project}/{upstream}/{platform}/"))
    }

    /// Series that are red now, with the went-red transition each began with.
    pub fn red_series(&self) -> Result<Vec<(String, Transition)>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix("s/") {
            let (k, v) = item.map_err(|e| self.store.err(e))?;
            let key = String::from_utf8_lossy(&k).into_owned();
            let state: SeriesState = serde_json::from_slice(&v)
                .map_err(|e| self.store.corrupt(format!("{TREE}/{key}"), e))?;
            if let (Some(id), Some(true)) = (state.red_since, state.last.as_ref().map(|l| l.red)) {
                if let Some(t) = self.transition(id)? {
                    out.push((key.trim_start_matches("s/").to_owned(), t));
                }
            }
        }
        Ok(out)
    }

    /// One transition.
    pub fn transition(&self, id: u64) -> Result<Option<Transition>, StoreError> {
        self.get_json(&format!("t/{}", id20(id)))
    }

    /// Transitions, newest first, that pass `keep`, at most `limit`.
    pub fn transitions(
        &self,
        limit: usize,
        mut keep: impl FnMut(&Transition) -> bool,
    ) -> Result<Vec<Transition>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix("t/").rev() {
            let (k, v) = item.map_err(|e| self.store.err(e))?;
            let t: Transition = serde_json::from_slice(&v).map_err(|e| {
                self.store
                    .corrupt(format!("{TREE}/{}", String::from_utf8_lossy(&k)), e)
            })?;
            if keep(&t) {
                out.push(t);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Artifacts a last known result still refers to (the good and newest
    /// builds, and the builds every series' newest run tested): garbage
    /// collection keeps them.
    pub fn referenced_artifacts(&self) -> Result<HashSet<String>, StoreError> {
        let mut keep = HashSet::new();
        for prefix in ["bl/", "bg/"] {
            for b in self.scan_json::<BuildInfo>(prefix)? {
                if !b.artifact_sha256.is_empty() {
                    keep.insert(b.artifact_sha256);
                }
            }
        }
        for run in self.scan_json::<RunRecord>("rl/")? {
            let i = &run.info;
            if let Some(b) = self.build(&i.upstream, &i.platform, &i.upstream_commit)? {
                if !b.artifact_sha256.is_empty() {
                    keep.insert(b.artifact_sha256);
                }
            }
        }
        Ok(keep)
    }

    /// Classifies a finished build against its series.
    pub fn prepare_build(&self, build: BuildInfo) -> Result<Prepared, StoreError> {
        let series_key = series_of_build(&build);
        let state = self.series(&series_key)?;
        let status = match BuildState::try_from(build.state).unwrap_or(BuildState::Error) {
            BuildState::Passed => RunStatus::Green,
            BuildState::Failed => RunStatus::Red,
            _ => RunStatus::Error,
        };
        let commits = Commits {
            upstream: build.commit.clone(),
            project: String::new(),
        };
        let order = (build.head_seq, 0);
        let classified = if build.head_seq == 0 {
            None
        } else {
            classify(&state, status, order, &commits, &[])
        };
        let (transition, next) = match classified {
            Some((mut t, d)) => {
                t.upstream = build.upstream.clone();
                t.platform = build.platform.clone();
                t.job_id = build.job_id;
                (Some(t), Some((d, order)))
            }
            None => (None, None),
        };
        Ok(Prepared {
            series_key,
            state,
            job_id: build.job_id,
            transition,
            next,
            kind: PreparedKind::Build(build),
        })
    }

    /// Classifies a finished test run against its series. `head_seq` (the
    /// order in which its upstream commit was the head; 0 for never) orders
    /// runs; a run with 0 is stored but decides nothing.
    pub fn prepare_run(&self, run: RunRecord, head_seq: u64) -> Result<Prepared, StoreError> {
        let info = &run.info;
        let series_key = series_of_run(info);
        let state = self.series(&series_key)?;
        let status = RunStatus::try_from(info.status).unwrap_or(RunStatus::Error);
        let commits = Commits {
            upstream: info.upstream_commit.clone(),
            project: info.project_commit.clone(),
        };
        // All cases, not the summary's capped list.
        let failing = crate::junit::failing(&run.cases);
        let order = (head_seq, info.job_id);
        let classified = if head_seq == 0 {
            None
        } else {
            classify(&state, status, order, &commits, &failing)
        };
        let (transition, next) = match classified {
            Some((mut t, d)) => {
                t.project = info.project.clone();
                t.upstream = info.upstream.clone();
                t.platform = info.platform.clone();
                t.job_id = info.job_id;
                (Some(t), Some((d, order)))
            }
            None => (None, None),
        };
        let job_id = info.job_id;
        Ok(Prepared {
            series_key,
            state,
            job_id,
            transition,
            next,
            kind: PreparedKind::Run(Box::new(run)),
        })
    }

    /// [`Results::commit`], with `sink`'s writes for the new transition in
    /// the same atomic transaction.
    pub async fn commit_with(
        &self,
        prepared: Prepared,
        culprits: Vec<Commit>,
        culprits_error: String,
        sink: Option<&dyn TransitionSink>,
    ) -> Result<Option<Transition>, StoreError> {
        let done_key = format!("p/{}", id20(prepared.job_id));
        if self
            .tree
            .contains_key(&done_key)
            .map_err(|e| self.store.err(e))?
        {
            return Ok(None);
        }
        let Prepared {
            series_key,
            mut state,
            job_id: _,
            mut transition,
            next,
            kind,
        } = prepared;
        let mut batch = sled::Batch::default();
        if let (Some(t), Some((decisive, order))) = (&mut transition, next) {
            t.id = self.store.next_id()?;
            t.at_ms = now_ms();
            t.culprits = culprits;
            t.culprits_error = culprits_error;
            advance(&mut state, t, decisive, order);
            batch.insert(format!("t/{}", id20(t.id)).as_bytes(), self.encode(t)?);
            batch.insert(format!("s/{series_key}").as_bytes(), self.encode(&state)?);
        }
        match kind {
            PreparedKind::Build(b) => {
                let bytes = self.encode(&b)?;
                let key = format!("b/{}/{}/{}", b.upstream, b.platform, b.commit);
                batch.insert(key.as_bytes(), bytes.clone());
                self.move_pointer(&mut batch, "bl", &b, &bytes)?;
                if b.state == BuildState::Passed as i32 {
                    self.move_pointer(&mut batch, "bg", &b, &bytes)?;
                }
            }
            PreparedKind::Run(run) => {
                let i = &run.info;
                let bytes = self.encode(&*run)?;
                batch.insert(
                    format!(
                        "r/{}/{}/{}/{}",
                        i.project,
                        i.upstream,
                        i.platform,
                        id20(i.job_id)
                    )
                    .as_bytes(),
                    bytes.clone(),
                );
                let latest: Option<RunRecord> =
                    self.latest_run(&i.project, &i.upstream, &i.platform)?;
                if latest.is_none_or(|l| l.info.job_id <= i.job_id) {
                    // The grid reads these often: the summary only, not every case.
                    let summary = RunRecord {
                        info: i.clone(),
                        cases: Vec::new(),
                    };
                    batch.insert(
                        format!("rl/{}/{}/{}", i.project, i.upstream, i.platform).as_bytes(),
                        self.encode(&summary)?,
                    );
                }
            }
        }
        batch.insert(done_key.as_bytes(), &[]);
        let extra = match (sink, &transition) {
            (Some(sink), Some(t)) => Some((sink.tree(), sink.writes(t)?)),
            _ => None,
        };
        match extra {
            None => self
                .tree
                .apply_batch(batch)
                .map_err(|e| self.store.err(e))?,
            Some((other, writes)) => {
                use sled::Transactional;
                (&self.tree, other)
                    .transaction(|(results, other)| {
                        results.apply_batch(&batch)?;
                        for (k, v) in &writes {
                            other.insert(k.as_slice(), v.as_slice())?;
                        }
                        Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
                    })
                    .map_err(|e| match e {
                        sled::transaction::TransactionError::Storage(e) => self.store.err(e),
                        sled::transaction::TransactionError::Abort(()) => {
                            self.store.corrupt("(results transaction)", "aborted")
                        }
                    })?;
            }
        }
        self.store.commit().await?;
        Ok(transition)
    }
}

/// Compares a result with its series' last decisive one. `None` when the
/// result decides nothing (an infrastructure error) or is older than the
/// last classified one (it finished out of order).
fn classify(
    state: &SeriesState,
    status: RunStatus,
    order: (u64, u64),
    commits: &Commits,
    failing: &[String],
) -> Option<(Transition, Decisive)> {
    let red = match status {
        RunStatus::Green => false,
        RunStatus::Red => true,
        RunStatus::Error | RunStatus::Unspecified => return None,
    };
    if order < state.order {
        return None;
    }
    let previous = state.last.as_ref();
    let kind = match (previous.map(|p| p.red), red) {
        (None | Some(false), true) => TransitionKind::WentRed,
        (Some(true), true) => TransitionKind::StillRed,
        (Some(true), false) => TransitionKind::Fixed,
        (None | Some(false), false) => TransitionKind::StillGreen,
    };
    let newly_failing = match previous {
        Some(p) => failing
            .iter()
            .filter(|f| p.failing.binary_search(f).is_err())
            .cloned()
            .collect(),
        None => failing.to_vec(),
    };
    let last_green = state.last_green.clone().unwrap_or_default();
    let transition = Transition {
        kind: kind.into(),
        status: status.into(),
        first: previous.is_none(),
        upstream_commit: commits.upstream.clone(),
        project_commit: commits.project.clone(),
        last_green_upstream_commit: last_green.upstream.clone(),
        project_commit_changed: kind == TransitionKind::WentRed
            && state.last_green.is_some()
            && last_green.project != commits.project,
        previous_project_commit: previous
            .map(|p| p.commits.project.clone())
            .unwrap_or_default(),
        red_since_id: if previous.is_some_and(|p| p.red) {
            state.red_since.unwrap_or(0)
        } else {
            0
        },
        newly_failing,
        ..Default::default()
    };
    let decisive = Decisive {
        red,
        commits: commits.clone(),
        failing: failing.to_vec(),
    };
    Some((transition, decisive))
}

/// Moves a series past a stored transition.
fn advance(state: &mut SeriesState, t: &Transition, decisive: Decisive, order: (u64, u64)) {
    if decisive.red {
        if t.kind == TransitionKind::WentRed as i32 {
            state.red_since = Some(t.id);
        }
    } else {
        state.red_since = None;
        state.last_green = Some(decisive.commits.clone());
    }
    state.order = order;
    state.last = Some(decisive);
}

#[cfg(test)]
mod tests {
    use super::*;
    use trunkfarm_proto::v1::TestStatus;

    fn run(job_id: u64, upstream_commit: &str, red: bool, failing: &[&str]) -> RunRecord {
        RunRecord {
            info: RunInfo {
                project: "textkit".into(),
                upstream: "tiny".into(),
                platform: "linux-x86_64".into(),
                upstream_commit: upstream_commit.into(),
                project_commit: "p1".into(),
                status: if red {
                    RunStatus::Red
                } else {
                    RunStatus::Green
                }
                .into(),
                job_id,
                tests_total: 5,
                failing_tests: failing
                    .iter()
                    .map(|n| TestCase {
                        name: (*n).into(),
                        status: TestStatus::Failed.into(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            },
            cases: failing
                .iter()
                .map(|n| TestCase {
                    name: (*n).into(),
                    status: TestStatus::Failed.into(),
                    ..Default::default()
                })
                .collect(),
        }
    }

    async fn record(r: &Results, rec: RunRecord, build_job: u64) -> Option<Transition> {
        let p = r.prepare_run(rec, build_job).unwrap();
        let culprits = p
            .culprit_range()
            .map(|(_, to)| {
                vec![Commit {
                    sha: to,
                    ..Default::default()
                }]
            })
            .unwrap_or_default();
        r.commit_with(p, culprits, String::new(), None)
            .await
            .unwrap()
    }

    fn kind(t: &Option<Transition>) -> TransitionKind {
        TransitionKind::try_from(t.as_ref().unwrap().kind).unwrap()
    }

    #[tokio::test]
    async fn green_red_red_green() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let r = Results::open(&store).unwrap();

        let t1 = record(&r, run(10, "c1", false, &[]), 1).await;
        assert_eq!(kind(&t1), TransitionKind::StillGreen);
        assert!(t1.as_ref().unwrap().first);

        let t2 = record(&r, run(20, "c2", true, &["a", "b"]), 2).await;
        assert_eq!(kind(&t2), TransitionKind::WentRed);
        let t2 = t2.unwrap();
        assert_eq!(t2.last_green_upstream_commit, "c1");
        assert_eq!(t2.newly_failing, ["a", "b"]);
        assert_eq!(
            r.prepare_run(run(21, "c2", true, &[]), 2)
                .unwrap()
                .culprit_range(),
            None
        );

        let t3 = record(&r, run(30, "c3", true, &["a", "b", "c"]), 3).await;
        assert_eq!(kind(&t3), TransitionKind::StillRed);
        assert_eq!(t3.unwrap().newly_failing, ["c"]);
        assert_eq!(
            r.series("textkit/tiny/linux-x86_64").unwrap().red_since,
            Some(t2.id)
        );

        let t4 = record(&r, run(40, "c4", false, &[]), 4).await;
        assert_eq!(kind(&t4), TransitionKind::Fixed);
        let state = r.series("textkit/tiny/linux-x86_64").unwrap();
        assert_eq!(state.red_since, None);
        assert_eq!(state.last_green.unwrap().upstream, "c4");
        assert_eq!(
            r.latest_run("textkit", "tiny", "linux-x86_64")
                .unwrap()
                .unwrap()
                .info
                .job_id,
            40
        );
        assert_eq!(r.runs("textkit", "tiny", "linux-x86_64").unwrap().len(), 4);

        let all = r.transitions(10, |_| true).unwrap();
        let ids: Vec<u64> = all.iter().map(|t| t.id).collect();
        assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first: {ids:?}");
        assert_eq!(all.iter().filter(|t| t.id > t2.id).count(), 2);
    }

    #[tokio::test]
    async fn recording_a_job_twice_is_a_no_op_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let r = Results::open(&store).unwrap();
            record(&r, run(10, "c1", false, &[]), 1).await;
            assert!(r.recorded(10).unwrap());
            assert!(record(&r, run(10, "c1", false, &[]), 1).await.is_none());
            assert_eq!(r.transitions(10, |_| true).unwrap().len(), 1);
        }
        let store = crate::store::tests::reopen(dir.path()).await;
        let r = Results::open(&store).unwrap();
        assert!(r.recorded(10).unwrap());
        let t = record(&r, run(20, "c2", true, &["x"]), 2).await;
        assert_eq!(kind(&t), TransitionKind::WentRed);
    }

    #[tokio::test]
    async fn errors_and_stale_results_decide_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let r = Results::open(&store).unwrap();
        record(&r, run(10, "c1", false, &[]), 5).await;
        let mut infra = run(20, "c2", false, &[]);
        infra.info.status = RunStatus::Error.into();
        assert!(record(&r, infra, 6).await.is_none());
        // The newest run shown is the error, but the series is still green.
        assert_eq!(
            r.latest_run("textkit", "tiny", "linux-x86_64")
                .unwrap()
                .unwrap()
                .info
                .job_id,
            20
        );
        // A run against an older build finishing late is stored, not classified.
        assert!(record(&r, run(30, "c0", true, &[]), 4).await.is_none());
        let t = record(&r, run(40, "c3", true, &[]), 7).await;
        assert_eq!(kind(&t), TransitionKind::WentRed);
        assert_eq!(t.unwrap().last_green_upstream_commit, "c1");
    }

    #[tokio::test]
    async fn builds_track_latest_and_good_and_references() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let r = Results::open(&store).unwrap();
        let build = |job_id, commit: &str, state: BuildState, sha: &str| BuildInfo {
            upstream: "tiny".into(),
            platform: "linux-x86_64".into(),
            commit: commit.into(),
            job_id,
            state: state.into(),
            artifact_sha256: sha.into(),
            head_seq: job_id,
            ..Default::default()
        };
        r.build_queued(&build(1, "c1", BuildState::Pending, ""))
            .await
            .unwrap();
        assert_eq!(
            r.latest_build("tiny", "linux-x86_64")
                .unwrap()
                .unwrap()
                .state,
            BuildState::Pending as i32
        );
        let p = r
            .prepare_build(build(1, "c1", BuildState::Passed, "aaa"))
            .unwrap();
        r.commit_with(p, vec![], String::new(), None).await.unwrap();
        let p = r
            .prepare_build(build(2, "c2", BuildState::Failed, ""))
            .unwrap();
        assert_eq!(p.culprit_range(), Some((Some("c1".into()), "c2".into())));
        let t = r
            .commit_with(p, vec![], String::new(), None)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(t.kind, TransitionKind::WentRed as i32);
        assert!(t.project.is_empty());
        assert_eq!(
            r.good_build("tiny", "linux-x86_64")
                .unwrap()
                .unwrap()
                .commit,
            "c1"
        );
        assert_eq!(
            r.latest_build("tiny", "linux-x86_64")
                .unwrap()
                .unwrap()
                .commit,
            "c2"
        );
        record(&r, run(10, "c1", false, &[]), 1).await;
        let refs = r.referenced_artifacts().unwrap();
        assert!(refs.contains("aaa"));
    }
}
