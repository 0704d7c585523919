//! The read side: what the admin API shows (the status grid, breakage,
//! transitions), what the notifier reminds of, and what garbage collection
//! keeps. Nothing here writes.

use std::collections::HashSet;

use trunkfarm_proto::v1::{self, TransitionKind};

use super::index;
use super::keys::{self, Pointer};
use super::{
    BisectState, BuildInfo, Class, Commit, Results, RunInfo, RunRecord, SeriesState, Transition,
};
use crate::store::StoreError;

/// The most runs per series a page reads (the dashboard's grid: its 8
/// heads × 4; a project page 30): retention keeps at least these, whatever
/// `retention.keep_last` says, so the pages stay complete.
pub(crate) const PAGE_RUNS: usize = 32;

/// The most transitions a page's query looks at ([`Results::transitions_since`]).
pub(crate) const MAX_SCANNED: usize = 20_000;

/// One series of runs the status grid shows.
#[derive(Clone, Debug)]
pub(crate) struct GridSeries<'a> {
    /// The project tested.
    pub(crate) project: &'a str,
    /// The platform tested on (the upstream is the row's).
    pub(crate) platform: &'a str,
    /// Whether a run of it is queued or running.
    pub(crate) pending: bool,
}

/// The status grid: every upstream with its builds, and one cell per series.
#[derive(Clone, Debug, Default)]
pub(crate) struct Grid {
    /// The upstreams, in the order asked.
    pub(crate) upstreams: Vec<UpstreamRow>,
    /// Every upstream's series, in the order asked.
    pub(crate) cells: Vec<Cell>,
    /// The projects of those series, as polling sees them (what the caller
    /// describes; nothing of it is stored in results).
    pub(crate) projects: Vec<ProjectRow>,
}

/// A project as the grid shows it: its branch and whether polling it works.
#[derive(Clone, Debug, Default)]
pub(crate) struct ProjectRow {
    /// Its name.
    pub(crate) name: String,
    /// Its URL, with any credentials removed.
    pub(crate) url: String,
    /// The configured branch, or the default branch the last poll found.
    pub(crate) branch: String,
    /// The branch head last seen by polling.
    pub(crate) head: String,
    /// When that head was first seen, ms.
    pub(crate) head_seen_at_ms: u64,
    /// Empty when the last poll worked.
    pub(crate) poll_error: String,
}

/// An upstream as the grid shows it: what the caller describes (from the
/// config and polling) and its builds, which [`Results::status`] adds.
#[derive(Clone, Debug, Default)]
pub(crate) struct UpstreamRow {
    /// Its name.
    pub(crate) name: String,
    /// Its URL, with any credentials removed.
    pub(crate) url: String,
    /// The branch followed.
    pub(crate) branch: String,
    /// The platforms it is built on.
    pub(crate) platforms: Vec<String>,
    /// The branch head last seen by polling.
    pub(crate) head: String,
    /// When that head was first seen, ms.
    pub(crate) head_seen_at_ms: u64,
    /// Empty when the last poll worked.
    pub(crate) poll_error: String,
    /// The newest build per platform.
    pub(crate) latest_builds: Vec<BuildInfo>,
    /// The newest passed build per platform (what new project commits test against).
    pub(crate) good_builds: Vec<BuildInfo>,
}

/// One series' cell of the grid.
#[derive(Clone, Debug)]
pub(crate) struct Cell {
    /// Its newest run (only its names set when it has none yet).
    pub(crate) latest: RunInfo,
    /// The went-red transition it is red since, if it is red.
    pub(crate) red_since: Option<Transition>,
    /// A newer run is queued or running.
    pub(crate) pending: bool,
    /// Its project's known flaky tests (`noise.rs`).
    pub(crate) flaky_tests: u32,
}

/// What the dashboard's grid shows of one upstream: its recent heads, their
/// builds, and the recent history of each series tested against it.
#[derive(Clone, Debug, Default)]
pub(crate) struct UpstreamHistory {
    /// The upstream as the status grid describes it (builds not filled).
    pub(crate) row: UpstreamRow,
    /// The last heads polling saw, newest first; the subject when a loaded
    /// transition's culprit range or bisection names the commit.
    pub(crate) commits: Vec<Commit>,
    /// The builds of those commits, every platform that has one; a pending
    /// one carries its job's phase (the pipeline adds it).
    pub(crate) builds: Vec<BuildInfo>,
    /// Every series tested against it, in the order asked.
    pub(crate) series: Vec<SeriesHistory>,
    /// The projects tested against it as polling sees them (their branch,
    /// their poll error), in config order; the pipeline adds them.
    pub(crate) projects: Vec<ProjectRow>,
}

/// A series' recent history.
#[derive(Clone, Debug, Default)]
pub(crate) struct SeriesHistory {
    /// The project tested.
    pub(crate) project: String,
    /// The platform tested on.
    pub(crate) platform: String,
    /// Its newest runs, newest first (summaries, at most the limit asked).
    pub(crate) runs: Vec<RunInfo>,
    /// The transitions those runs caused (by `job_id`), and the went-red
    /// transitions the red ones are red since (by `id`).
    pub(crate) transitions: Vec<Transition>,
    /// Its unfinished test jobs (the caller's, from dispatch), each with
    /// why it waits when no agent has it yet.
    pub(crate) open: Vec<OpenRun>,
}

/// An unfinished test job of a series.
#[derive(Clone, Debug, Default)]
pub(crate) struct OpenRun {
    /// The upstream commit of the runtime it tests.
    pub(crate) upstream_commit: String,
    /// Its job.
    pub(crate) job_id: u64,
    /// Where its job stands (dispatch's phase; `None`: it just finished).
    pub(crate) phase: Option<crate::dispatch::Phase>,
}

/// What [`Results::history`] is asked about one upstream.
#[derive(Clone, Debug)]
pub(crate) struct HistoryRequest {
    /// The upstream's row (name, platforms, poll error, …).
    pub(crate) row: UpstreamRow,
    /// The commits shown, newest first.
    pub(crate) commits: Vec<Commit>,
    /// The series shown: (project, platform, its open test jobs).
    pub(crate) series: Vec<(String, String, Vec<OpenRun>)>,
}

/// How many of the newest transitions [`Results::history`] reads at most
/// (each run shown finds the transition it caused among them; older ones
/// are not looked for).
const HISTORY_TRANSITIONS: usize = 2000;

/// Which series went red at some upstream commits.
#[derive(Clone, Debug)]
pub(crate) struct Breakage {
    /// The commits asked about.
    pub(crate) commits: Vec<Commit>,
    /// The went-red transitions that blame one of them, newest first (see
    /// [`blames`]).
    pub(crate) went_red: Vec<Transition>,
    /// Went-red transitions whose range holds one of them but whose
    /// bisection found another first bad commit, newest first.
    pub(crate) cleared: Vec<Transition>,
}

/// Whether went-red `t` blames one of `commits` (`None`: its range holds
/// none of them). Once its bisection answered, only the first bad commit (or
/// the candidates it left) is blamed, never the rest of the range; before,
/// every commit of the range is. A project that broke itself (or is broken
/// on the last good runtime too) blames none.
fn blames(t: &Transition, commits: &HashSet<&str>) -> Option<bool> {
    let in_range = commits.contains(t.upstream_commit.as_str())
        || t.culprits.iter().any(|c| commits.contains(c.sha.as_str()));
    if !in_range {
        return None;
    }
    // Its re-runs found the project broke itself, or fails on the last good
    // runtime too: no upstream commit is to blame.
    if matches!(t.class, Some(Class::ProjectSide | Class::Broken)) {
        return Some(false);
    }
    let named = |c: &Commit| commits.contains(c.sha.as_str());
    Some(match &t.bisect {
        Some(b) if b.state == BisectState::Found => b.first_bad.as_ref().is_some_and(named),
        Some(b) if !b.candidates.is_empty() => b.candidates.iter().any(named),
        _ => true,
    })
}

/// Fills in the subjects of `commits` that `transitions`' culprit ranges
/// or bisections name (polling sees hashes only).
fn name_subjects<'a>(commits: &mut [Commit], transitions: impl Iterator<Item = &'a Transition>) {
    let mut subjects: std::collections::HashMap<&str, &Commit> = Default::default();
    for t in transitions {
        let bisect = t
            .bisect
            .iter()
            .flat_map(|b| b.first_bad.iter().chain(&b.candidates));
        for c in t.culprits.iter().chain(bisect) {
            subjects.insert(c.sha.as_str(), c);
        }
    }
    for c in commits.iter_mut().filter(|c| c.subject.is_empty()) {
        if let Some(known) = subjects.get(c.sha.as_str()) {
            c.subject = known.subject.clone();
            c.author = known.author.clone();
            c.time_ms = known.time_ms;
        }
    }
}

impl From<Grid> for v1::GetStatusResponse {
    fn from(g: Grid) -> v1::GetStatusResponse {
        let Grid {
            upstreams,
            cells,
            projects,
        } = g;
        v1::GetStatusResponse {
            upstreams: upstreams.into_iter().map(Into::into).collect(),
            cells: cells.into_iter().map(Into::into).collect(),
            projects: projects.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<ProjectRow> for v1::ProjectInfo {
    fn from(p: ProjectRow) -> v1::ProjectInfo {
        let ProjectRow {
            name,
            url,
            branch,
            head,
            head_seen_at_ms,
            poll_error,
        } = p;
        v1::ProjectInfo {
            name,
            url,
            branch,
            head,
            head_seen_at_ms,
            poll_error,
        }
    }
}

impl From<UpstreamRow> for v1::UpstreamInfo {
    fn from(u: UpstreamRow) -> v1::UpstreamInfo {
        let UpstreamRow {
            name,
            url,
            branch,
            platforms,
            head,
            head_seen_at_ms,
            poll_error,
            latest_builds,
            good_builds,
        } = u;
        v1::UpstreamInfo {
            name,
            url,
            branch,
            platforms,
            head,
            head_seen_at_ms,
            poll_error,
            latest_builds: latest_builds.into_iter().map(Into::into).collect(),
            good_builds: good_builds.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<Cell> for v1::StatusCell {
    fn from(c: Cell) -> v1::StatusCell {
        let Cell {
            latest,
            red_since,
            pending,
            flaky_tests,
        } = c;
        v1::StatusCell {
            latest: Some(latest.into()),
            red_since: red_since.map(Into::into),
            pending,
            flaky_tests,
        }
    }
}

impl From<Breakage> for v1::GetBreakageResponse {
    fn from(b: Breakage) -> v1::GetBreakageResponse {
        let Breakage {
            commits,
            went_red,
            cleared,
        } = b;
        v1::GetBreakageResponse {
            commits: commits.into_iter().map(Into::into).collect(),
            went_red: went_red.into_iter().map(Into::into).collect(),
            cleared: cleared.into_iter().map(Into::into).collect(),
        }
    }
}

impl Results {
    /// The status grid: for each upstream (in order, as the caller describes
    /// it), its newest and newest passed build per platform, then the newest
    /// run of each of its series with the went-red transition the series is
    /// red since. A pending build's phase (queued and why, starting,
    /// running) is dispatch's, which the caller adds.
    pub(crate) fn status(
        &self,
        rows: Vec<(UpstreamRow, Vec<GridSeries<'_>>)>,
    ) -> Result<Grid, StoreError> {
        let mut out = Grid::default();
        for (mut info, series) in rows {
            for platform in &info.platforms {
                if let Some(b) = self.latest_build(&info.name, platform)? {
                    info.latest_builds.push(b);
                }
                if let Some(b) = self.good_build(&info.name, platform)? {
                    info.good_builds.push(b);
                }
            }
            for s in series {
                out.cells.push(self.cell(s, &info.name)?);
            }
            out.upstreams.push(info);
        }
        Ok(out)
    }

    fn cell(&self, s: GridSeries<'_>, upstream: &str) -> Result<Cell, StoreError> {
        let latest = self.latest_run(s.project, upstream, s.platform)?;
        let red_since = self.red_since(s.project, upstream, s.platform)?;
        Ok(Cell {
            latest: latest.map(|r| r.info).unwrap_or_else(|| RunInfo {
                project: s.project.to_owned(),
                upstream: upstream.to_owned(),
                platform: s.platform.to_owned(),
                ..Default::default()
            }),
            red_since,
            pending: s.pending,
            flaky_tests: self
                .noise(s.project)?
                .flaky(self.flaky_rule(s.project))
                .len() as u32,
        })
    }

    /// The recent history of every upstream asked: each shown commit's
    /// builds and each series' newest `runs_per_series` runs with the
    /// transitions they caused. Bounded: per upstream, commits × platforms
    /// builds and `runs_per_series` runs per series, and at most
    /// [`HISTORY_TRANSITIONS`] transitions read in all (plus the went-red
    /// transitions of red runs, one read each).
    pub(crate) fn history(
        &self,
        asked: Vec<HistoryRequest>,
        runs_per_series: usize,
    ) -> Result<Vec<UpstreamHistory>, StoreError> {
        let upstreams: HashSet<&str> = asked.iter().map(|a| a.row.name.as_str()).collect();
        let mut by_job: std::collections::HashMap<u64, Transition> = Default::default();
        for item in self
            .table
            .scan::<Transition>(keys::TRANSITIONS)
            .rev()
            .take(HISTORY_TRANSITIONS)
        {
            let (_, t) = item?;
            if upstreams.contains(t.upstream.as_str()) && !t.project.is_empty() {
                by_job.entry(t.job_id).or_insert(t);
            }
        }
        let mut out = Vec::new();
        for HistoryRequest {
            row,
            mut commits,
            series,
        } in asked
        {
            let mut builds = Vec::new();
            for c in &commits {
                for platform in &row.platforms {
                    if let Some(b) = self.build(&row.name, platform, &c.sha)? {
                        builds.push(b);
                    }
                }
            }
            let mut shown = Vec::new();
            for (project, platform, open) in series {
                let runs = self.recent_runs(&project, &row.name, &platform, runs_per_series)?;
                let mut transitions: Vec<Transition> = Vec::new();
                for r in &runs {
                    let Some(t) = by_job.get(&r.job_id) else {
                        continue;
                    };
                    let since = t.red_since_id;
                    transitions.push(t.clone());
                    if since != 0 && !transitions.iter().any(|x| x.id == since) {
                        let known = by_job.values().find(|x| x.id == since).cloned();
                        if let Some(went_red) =
                            known.map_or_else(|| self.transition(since), |t| Ok(Some(t)))?
                        {
                            transitions.push(went_red);
                        }
                    }
                }
                shown.push(SeriesHistory {
                    project,
                    platform,
                    runs,
                    transitions,
                    open,
                });
            }
            name_subjects(&mut commits, shown.iter().flat_map(|s| &s.transitions));
            out.push(UpstreamHistory {
                row,
                commits,
                builds,
                series: shown,
                projects: Vec::new(),
            });
        }
        Ok(out)
    }

    /// A series' newest `limit` runs, newest first (summaries: the test
    /// cases are skipped while reading).
    pub(crate) fn recent_runs(
        &self,
        project: &str,
        upstream: &str,
        platform: &str,
        limit: usize,
    ) -> Result<Vec<RunInfo>, StoreError> {
        /// A stored run read without its cases.
        #[derive(serde::Deserialize)]
        struct Summary {
            #[serde(default)]
            info: RunInfo,
        }
        let mut out = Vec::new();
        for item in self
            .table
            .scan::<Summary>(keys::runs(project, upstream, platform))
            .rev()
            .take(limit)
        {
            out.push(item?.1.info);
        }
        Ok(out)
    }

    /// Which series of `upstream` went red blaming one of `commits` (at
    /// one, or with one among the culprits until a bisection answered), and
    /// which were cleared of them by a bisection.
    pub(crate) fn breakage(
        &self,
        upstream: &str,
        commits: Vec<Commit>,
    ) -> Result<Breakage, StoreError> {
        let wanted: HashSet<&str> = commits.iter().map(|c| c.sha.as_str()).collect();
        // Through the commit index: only the transitions that may blame
        // one of the commits are read (not a steady series' still greens).
        let mut ids = std::collections::BTreeSet::new();
        for sha in &wanted {
            for id in index::ids(&self.table, keys::blamable_at(upstream, sha)) {
                ids.insert(id?);
            }
        }
        let mut touched = Vec::new();
        for id in ids.into_iter().rev() {
            if let Some(t) = self.transition(id)?
                && t.upstream == upstream
                && index::may_blame(&t)
                && blames(&t, &wanted).is_some()
            {
                touched.push(t);
            }
        }
        let (went_red, cleared) = touched
            .into_iter()
            .partition(|t| blames(t, &wanted) == Some(true));
        Ok(Breakage {
            commits,
            went_red,
            cleared,
        })
    }

    /// Stored transitions of `upstream` and `project` (empty: any), newest
    /// first, at most `limit`; only went red, fixed and suspicious unless `all`.
    pub(crate) fn transitions_of(
        &self,
        upstream: &str,
        project: &str,
        limit: usize,
        all: bool,
    ) -> Result<Vec<Transition>, StoreError> {
        let keep = |t: &Transition| {
            (upstream.is_empty() || t.upstream == upstream)
                && (project.is_empty() || t.project == project)
                && (all
                    || t.kind == TransitionKind::WentRed as i32
                    || t.kind == TransitionKind::Fixed as i32
                    || t.class == Some(Class::Suspicious))
        };
        // Through the project's or the upstream's index, not every
        // transition; only a listing of everything reads them all.
        let prefix = match (project.is_empty(), upstream.is_empty()) {
            (false, _) => keys::transitions_of(project),
            (true, false) => keys::transitions_in(upstream),
            (true, true) => return self.transitions(limit, keep),
        };
        let mut out = Vec::new();
        for id in index::ids(&self.table, prefix) {
            if let Some(t) = self.transition(id?)?
                && keep(&t)
            {
                out.push(t);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Transitions, newest first, that pass `keep`, at most `limit`.
    pub(crate) fn transitions(
        &self,
        limit: usize,
        mut keep: impl FnMut(&Transition) -> bool,
    ) -> Result<Vec<Transition>, StoreError> {
        let mut out = Vec::new();
        for item in self.table.scan::<Transition>(keys::TRANSITIONS).rev() {
            let (_, t) = item?;
            if keep(&t) {
                out.push(t);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Transitions recorded at or after `since_ms`, newest first, that
    /// pass `keep`; at most `limit` kept and [`MAX_SCANNED`] looked at. The
    /// scan stops at the first older one: a page asking about recent runs
    /// or commits reads the transitions since then, not the whole history
    /// (ids increase with the time they are recorded).
    pub(crate) fn transitions_since(
        &self,
        since_ms: u64,
        limit: usize,
        mut keep: impl FnMut(&Transition) -> bool,
    ) -> Result<Vec<Transition>, StoreError> {
        let mut out = Vec::new();
        let scan = self.table.scan::<Transition>(keys::TRANSITIONS).rev();
        for item in scan.take(MAX_SCANNED) {
            let (_, t) = item?;
            if t.at_ms < since_ms {
                break;
            }
            if keep(&t) {
                out.push(t);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// The went-red transition a series is red since, if it is red now.
    pub(crate) fn red_since(
        &self,
        project: &str,
        upstream: &str,
        platform: &str,
    ) -> Result<Option<Transition>, StoreError> {
        match self
            .series(&keys::run_series(project, upstream, platform))?
            .red_now()
        {
            Some(id) => self.transition(id),
            None => Ok(None),
        }
    }

    /// Series that are red now, with the went-red transition each began with.
    pub(crate) fn red_series(&self) -> Result<Vec<(String, Transition)>, StoreError> {
        let mut out = Vec::new();
        for item in self.table.scan::<SeriesState>(keys::SERIES) {
            let (k, state) = item?;
            if let Some(id) = state.red_now()
                && let Some(t) = self.transition(id)?
            {
                let key = String::from_utf8_lossy(&k);
                out.push((key.trim_start_matches(keys::SERIES).to_owned(), t));
            }
        }
        Ok(out)
    }

    /// Artifacts a last known result still refers to (the good and newest
    /// builds, and the builds every series' newest run tested): garbage
    /// collection keeps them.
    pub(crate) fn referenced_artifacts(&self) -> Result<HashSet<String>, StoreError> {
        let mut keep = HashSet::new();
        for pointer in [Pointer::Latest, Pointer::Good] {
            for item in self.table.scan::<BuildInfo>(pointer.prefix()) {
                let (_, b) = item?;
                if !b.artifact_sha256.is_empty() {
                    keep.insert(b.artifact_sha256);
                }
            }
        }
        for item in self.table.scan::<RunRecord>(keys::LATEST_RUNS) {
            let (_, run) = item?;
            let i = &run.info;
            if let Some(b) = self.build(&i.upstream, &i.platform, &i.upstream_commit)?
                && !b.artifact_sha256.is_empty()
            {
                keep.insert(b.artifact_sha256);
            }
        }
        keep.extend(self.bisection_artifacts()?);
        Ok(keep)
    }
}
