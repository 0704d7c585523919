//! `/` and `/api/v1/status`: the grid. Per upstream, projects as rows and
//! the last heads polling saw × the upstream's platforms as columns; each
//! cell is one series' run at one upstream commit (green, red, running,
//! queued with why, infra error, flaky, being bisected, not run), linking
//! to its run; a red cell names the first bad commit when a bisection found
//! it, else the culprit range. The upstream's own row shows each commit's
//! build per platform. `/grid/fragment` is the grid without the page around
//! it, for `live.js` (`/events` says when to fetch it again).

use askama::Template;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use trunkfarm_proto::v1::{BuildState, RunStatus, TransitionKind};

use super::Handlers;
use super::site::Site;
use super::view;
use crate::commit::short;
use crate::dispatch::Phase;
use crate::results::{
    BisectState, BuildInfo, Class, RunInfo, SeriesHistory, Transition, UpstreamHistory,
};

/// How many of an upstream's newest heads the grid shows.
pub(crate) const COMMITS: usize = 8;
// Retention keeps at least the runs per series this page reads.
const _: () = assert!(COMMITS * 4 <= crate::results::PAGE_RUNS);

/// The grid, as the page shows it and `/api/v1/status` answers it.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct StatusView {
    pub(crate) generated_at_ms: u64,
    pub(crate) generated_at: String,
    /// Every configured upstream, in the config's order.
    pub(crate) upstreams: Vec<UpstreamGrid>,
}

/// One upstream's part of the grid.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct UpstreamGrid {
    pub(crate) name: String,
    /// Its URL without credentials.
    pub(crate) url: String,
    pub(crate) branch: String,
    /// The branch head last seen (full hash; empty before the first poll).
    pub(crate) head: String,
    /// Why the last poll failed; empty when it worked.
    pub(crate) poll_error: String,
    /// The platforms each commit's columns are, in this order.
    pub(crate) platforms: Vec<String>,
    /// The last heads polling saw, newest first, each with its builds.
    pub(crate) commits: Vec<CommitColumn>,
    /// One row per project tested against it.
    pub(crate) projects: Vec<ProjectRow>,
}

/// An upstream commit's columns.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct CommitColumn {
    pub(crate) sha: String,
    pub(crate) short: String,
    /// The first line of its message, when a culprit range named it.
    pub(crate) subject: String,
    /// Its runtime build per platform (`platforms`' order).
    pub(crate) builds: Vec<CellView>,
}

/// A project's row: its cells, commit by commit (newest first), platform
/// by platform within a commit.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct ProjectRow {
    pub(crate) name: String,
    /// The branch polling follows (the configured one, else the default
    /// branch it found; empty before the first poll).
    pub(crate) branch: String,
    /// Why its last poll failed (empty: it worked), shown under its name.
    pub(crate) poll_error: String,
    pub(crate) cells: Vec<CellView>,
}

/// What a cell shows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum CellState {
    /// Passed.
    Green,
    /// Failed (a regression, the project's own breakage or a broken one).
    Red,
    /// An agent was given it and has not said it started.
    Starting,
    /// An agent runs it.
    Running,
    /// No agent has taken it yet (`why` says why).
    Queued,
    /// Neither passed nor failed: the machine or the infrastructure failed
    /// (checkout, attempts used up, a spurious failure its re-runs found).
    Error,
    /// Failed, and an identical re-run passed: not red.
    Flaky,
    /// Red, and its culprit range is being bisected.
    Bisecting,
    /// Nothing ran at this commit.
    #[default]
    NotRun,
}

impl CellState {
    /// The CSS class and the word shown (never colour alone).
    pub(crate) fn word(self) -> &'static str {
        match self {
            CellState::Green => "green",
            CellState::Red => "red",
            CellState::Starting => "starting",
            CellState::Running => "running",
            CellState::Queued => "queued",
            CellState::Error => "error",
            CellState::Flaky => "flaky",
            CellState::Bisecting => "bisecting",
            CellState::NotRun => "not_run",
        }
    }

    /// An unfinished job's state: dispatch's phase (`None`: it finished
    /// a moment ago, its result not read yet: still running here).
    pub(crate) fn of_phase(phase: Option<&Phase>) -> CellState {
        match phase {
            Some(Phase::Queued(_)) => CellState::Queued,
            Some(Phase::Starting) => CellState::Starting,
            Some(Phase::Running) | None => CellState::Running,
        }
    }

    /// The word a person reads in the cell.
    pub(crate) fn label(self) -> &'static str {
        match self {
            CellState::Error => "infra error",
            CellState::NotRun => "not run",
            other => other.word(),
        }
    }
}

/// One cell: a series' run (or an upstream's build) at one commit.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct CellView {
    pub(crate) platform: String,
    /// The upstream commit (full hash).
    pub(crate) commit: String,
    pub(crate) state: CellState,
    /// The job shown (0: none); the cell links to `/runs/<job_id>`.
    pub(crate) job_id: u64,
    /// In words: why it waits, what failed, what its re-runs found.
    pub(crate) why: String,
    /// Red: the first bad commit a bisection found (short hash).
    pub(crate) first_bad: String,
    /// Red without a first bad commit: the culprit range (short hashes,
    /// oldest first), or the candidates a bisection left.
    pub(crate) culprits: Vec<String>,
}

impl CellView {
    /// The cell's link, empty when it has no job.
    pub(crate) fn href(&self) -> String {
        if self.job_id == 0 {
            String::new()
        } else {
            format!("/runs/{}", self.job_id)
        }
    }
}

#[derive(Template)]
#[template(path = "grid.html")]
struct GridPage<'a> {
    view: &'a StatusView,
    /// How many heads the grid shows at most.
    shown: usize,
}

#[derive(Template)]
#[template(path = "grid_table.html")]
struct GridFragment<'a> {
    view: &'a StatusView,
}

pub(super) fn routes() -> Router<Handlers> {
    Router::new()
        .route("/", get(page))
        .route("/grid/fragment", get(fragment))
        .route("/api/v1/status", get(api))
        .route("/events", get(super::events::stream))
}

async fn page(State(handlers): State<Handlers>) -> Response {
    match handlers.site().map(status) {
        Ok(Ok(v)) => view::html(&GridPage {
            view: &v,
            shown: COMMITS,
        }),
        Ok(Err(e)) => view::error(StatusCode::INTERNAL_SERVER_ERROR, "Grid", &e),
        Err(starting) => starting.into_response(),
    }
}

async fn fragment(State(handlers): State<Handlers>) -> Response {
    match handlers.site().map(status) {
        Ok(Ok(v)) => view::html(&GridFragment { view: &v }),
        Ok(Err(e)) => view::error(StatusCode::INTERNAL_SERVER_ERROR, "Grid", &e),
        Err(starting) => starting.into_response(),
    }
}

async fn api(State(handlers): State<Handlers>) -> Response {
    match handlers.site_api().map(status) {
        Ok(Ok(v)) => view::json(&v),
        Ok(Err(e)) => view::json_error(StatusCode::INTERNAL_SERVER_ERROR, &e),
        Err(starting) => starting.into_response(),
    }
}

/// The grid, from the pipeline's history of the last [`COMMITS`] heads.
pub(crate) fn status(site: &Site) -> Result<StatusView, String> {
    let now_ms = crate::store::now_ms();
    let history = site
        .pipeline
        .history(COMMITS)
        .map_err(|e| format!("cannot read the results: {e}"))?;
    Ok(StatusView {
        generated_at_ms: now_ms,
        generated_at: view::rfc3339(now_ms),
        upstreams: history.into_iter().map(upstream_grid).collect(),
    })
}

fn upstream_grid(h: UpstreamHistory) -> UpstreamGrid {
    let UpstreamHistory {
        row,
        commits,
        builds,
        series,
        projects: polled,
    } = h;
    let platforms = row.platforms.clone();
    let columns = commits
        .iter()
        .map(|c| CommitColumn {
            sha: c.sha.clone(),
            short: short(&c.sha).to_owned(),
            subject: c.subject.clone(),
            builds: platforms
                .iter()
                .map(|p| {
                    let build = builds
                        .iter()
                        .find(|b| b.commit == c.sha && &b.platform == p);
                    build_cell(p, &c.sha, build)
                })
                .collect(),
        })
        .collect();
    // A project's series, one per platform it is tested on.
    let mut projects: Vec<ProjectRow> = Vec::new();
    let mut names: Vec<&str> = Vec::new();
    for s in &series {
        if !names.contains(&s.project.as_str()) {
            names.push(&s.project);
        }
    }
    for name in names {
        let mut cells = Vec::new();
        for c in &commits {
            for p in &platforms {
                let cell = match series
                    .iter()
                    .find(|s| s.project == name && &s.platform == p)
                {
                    Some(s) => run_cell(s, &c.sha),
                    None => CellView {
                        platform: p.clone(),
                        commit: c.sha.clone(),
                        why: format!("{name} is not tested on {p}"),
                        ..Default::default()
                    },
                };
                cells.push(cell);
            }
        }
        let polled = polled.iter().find(|p| p.name == name);
        projects.push(ProjectRow {
            name: name.to_owned(),
            branch: polled.map(|p| p.branch.clone()).unwrap_or_default(),
            poll_error: polled.map(|p| p.poll_error.clone()).unwrap_or_default(),
            cells,
        });
    }
    UpstreamGrid {
        name: row.name,
        url: row.url,
        branch: row.branch,
        head: row.head,
        poll_error: row.poll_error,
        platforms,
        commits: columns,
        projects,
    }
}

/// An upstream commit's build on one platform.
fn build_cell(platform: &str, commit: &str, build: Option<&BuildInfo>) -> CellView {
    let mut cell = CellView {
        platform: platform.to_owned(),
        commit: commit.to_owned(),
        ..Default::default()
    };
    let Some(b) = build else {
        cell.why = "not built".into();
        return cell;
    };
    cell.job_id = b.job_id;
    cell.why = view::detail(&b.detail);
    cell.state = match BuildState::try_from(b.state).unwrap_or(BuildState::Error) {
        BuildState::Pending => {
            cell.why = b.waiting.clone();
            match view::pending_build(&b.phase) {
                "queued" => CellState::Queued,
                "starting" => CellState::Starting,
                _ => CellState::Running,
            }
        }
        BuildState::Passed => CellState::Green,
        BuildState::Failed => CellState::Red,
        BuildState::Error | BuildState::Unspecified => CellState::Error,
    };
    cell
}

/// A series' cell at upstream commit `commit`: an unfinished job newer
/// than its newest run there (queued or running), else that run.
fn run_cell(s: &SeriesHistory, commit: &str) -> CellView {
    let mut cell = CellView {
        platform: s.platform.clone(),
        commit: commit.to_owned(),
        ..Default::default()
    };
    let run = s.runs.iter().find(|r| r.upstream_commit == commit);
    let open = s
        .open
        .iter()
        .filter(|o| o.upstream_commit == commit)
        .max_by_key(|o| o.job_id);
    let judged = run.map(|r| {
        let own = s.transitions.iter().find(|t| t.job_id == r.job_id);
        Judged::new(r, own, |id| s.transitions.iter().find(|t| t.id == id))
    });
    cell.state = series_state(judged, open.map(|o| (o.job_id, o.phase.as_ref())));
    if let (Some(o), CellState::Queued | CellState::Starting | CellState::Running) =
        (open, cell.state)
    {
        cell.job_id = o.job_id;
        cell.why = o
            .phase
            .as_ref()
            .map(|p| p.why().to_owned())
            .unwrap_or_default();
        return cell;
    }
    let Some(judged) = judged else {
        cell.why = "no run at this commit".into();
        return cell;
    };
    cell.job_id = judged.run.job_id;
    fill_from_run(&mut cell, judged);
    cell
}

/// A finished run with what decides its state beside its status.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Judged<'a> {
    pub(crate) run: &'a RunInfo,
    /// The transition it caused (its re-runs' class on it), if known.
    pub(crate) own: Option<&'a Transition>,
    /// The went-red of its red spell ([`red_spell`]), if red.
    pub(crate) spell: Option<&'a Transition>,
}

impl<'a> Judged<'a> {
    /// Run `run` of a series whose transitions `find` looks up by id.
    pub(crate) fn new(
        run: &'a RunInfo,
        own: Option<&'a Transition>,
        find: impl Fn(u64) -> Option<&'a Transition>,
    ) -> Judged<'a> {
        Judged {
            run,
            own,
            spell: red_spell(own, find),
        }
    }
}

/// The went-red a run's red spell began with: its own transition when it
/// went red, else the one its transition is red since (`find`: by id).
pub(crate) fn red_spell<'a>(
    own: Option<&'a Transition>,
    find: impl Fn(u64) -> Option<&'a Transition>,
) -> Option<&'a Transition> {
    match own {
        Some(t) if t.kind == TransitionKind::WentRed as i32 => Some(t),
        Some(t) if t.red_since_id != 0 => find(t.red_since_id),
        _ => None,
    }
}

/// A series' state at one commit, the one word the grid, the project
/// page and their APIs show: an open job newer than its run (`open`: its
/// job and dispatch's phase) is queued, starting or running; else the run
/// decides ([`run_state`]); else not run.
pub(crate) fn series_state(
    run: Option<Judged<'_>>,
    open: Option<(u64, Option<&Phase>)>,
) -> CellState {
    match (run, open) {
        (run, Some((job, phase))) if run.is_none_or(|j| job > j.run.job_id) => {
            CellState::of_phase(phase)
        }
        (Some(j), _) => run_state(j),
        (None, _) => CellState::NotRun,
    }
}

/// A finished run's state: its status, except that a red run its re-runs
/// classed flaky (an identical re-run passed) is `flaky`, one they classed
/// spurious (the machine failed, not the tests) an infra error, and a red
/// run of a spell whose culprit range is being bisected `bisecting` (unless
/// the project broke itself: nothing upstream to bisect).
pub(crate) fn run_state(j: Judged<'_>) -> CellState {
    let class = j.own.and_then(|t| t.class);
    match RunStatus::try_from(j.run.status).unwrap_or(RunStatus::Error) {
        RunStatus::Green => CellState::Green,
        RunStatus::Red => match class {
            Some(Class::Flaky) => CellState::Flaky,
            Some(Class::Spurious) => CellState::Error,
            Some(Class::ProjectSide | Class::Broken) => CellState::Red,
            _ => match j.spell {
                Some(t)
                    if !matches!(t.class, Some(Class::ProjectSide | Class::Broken))
                        && t.bisect
                            .as_ref()
                            .is_some_and(|b| b.state == BisectState::Running) =>
                {
                    CellState::Bisecting
                }
                _ => CellState::Red,
            },
        },
        RunStatus::Error | RunStatus::Unspecified => CellState::Error,
    }
}

/// A finished run's cell beside its state: what it says, what its
/// re-runs classed it as, and for a red one its red spell's bisection or
/// culprit range.
fn fill_from_run(cell: &mut CellView, j: Judged<'_>) {
    let run = j.run;
    cell.why = view::detail(&run.detail);
    if run.confirmation == "awaiting" {
        cell.why = "its re-runs are checking this result".into();
    }
    let class = j.own.and_then(|t| t.class);
    if let Some(class) = class {
        cell.why = match class {
            Class::Suspicious => format!("suspicious: {}", run.suspicious),
            Class::ProjectSide => {
                "the project broke itself: it fails on the last good runtime too".into()
            }
            Class::Broken => "fails on the last good runtime too (project unchanged)".into(),
            Class::Flaky => "flaky: an identical re-run passed".into(),
            Class::Spurious => format!(
                "spurious (the machine's failure): {}",
                view::detail(&run.detail)
            ),
            Class::Regressed => std::mem::take(&mut cell.why),
        };
    }
    if !matches!(cell.state, CellState::Red | CellState::Bisecting)
        || matches!(class, Some(Class::ProjectSide | Class::Broken))
    {
        return;
    }
    let Some(t) = j.spell else { return };
    if matches!(t.class, Some(Class::ProjectSide | Class::Broken)) {
        return;
    }
    let shorts =
        |cs: &[crate::results::Commit]| cs.iter().map(|c| short(&c.sha).to_owned()).collect();
    match &t.bisect {
        Some(b) if b.state == BisectState::Found => {
            if let Some(c) = &b.first_bad {
                cell.first_bad = short(&c.sha).to_owned();
            }
        }
        Some(b) if b.state == BisectState::Running => cell.culprits = shorts(&t.culprits),
        Some(b) if !b.candidates.is_empty() => cell.culprits = shorts(&b.candidates),
        _ => cell.culprits = shorts(&t.culprits),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::{Bisect, Commit, OpenRun};

    fn commit(sha: &str) -> Commit {
        Commit {
            sha: sha.into(),
            ..Default::default()
        }
    }

    fn run(job: u64, at: &str, status: RunStatus) -> RunInfo {
        RunInfo {
            project: "p".into(),
            upstream: "rt".into(),
            platform: "linux".into(),
            upstream_commit: at.into(),
            status: status as i32,
            job_id: job,
            ..Default::default()
        }
    }

    fn transition(id: u64, job: u64, kind: TransitionKind) -> Transition {
        Transition {
            id,
            job_id: job,
            kind: kind as i32,
            project: "p".into(),
            ..Default::default()
        }
    }

    fn series(
        runs: Vec<RunInfo>,
        transitions: Vec<Transition>,
        open: Vec<OpenRun>,
    ) -> SeriesHistory {
        SeriesHistory {
            project: "p".into(),
            platform: "linux".into(),
            runs,
            transitions,
            open,
        }
    }

    #[test]
    fn a_cell_is_its_newest_job_at_that_commit() {
        let open = vec![
            OpenRun {
                upstream_commit: "c3".into(),
                job_id: 30,
                phase: Some(Phase::Queued("no agent connected".into())),
            },
            OpenRun {
                upstream_commit: "c2".into(),
                job_id: 21,
                phase: Some(Phase::Running),
            },
        ];
        let s = series(
            vec![
                run(20, "c2", RunStatus::Green),
                run(10, "c1", RunStatus::Green),
            ],
            vec![],
            open,
        );
        let c3 = run_cell(&s, "c3");
        assert_eq!(
            (c3.state, c3.job_id, c3.why.as_str()),
            (CellState::Queued, 30, "no agent connected")
        );
        assert_eq!(c3.href(), "/runs/30");
        let c2 = run_cell(&s, "c2");
        assert_eq!((c2.state, c2.job_id), (CellState::Running, 21));
        let c1 = run_cell(&s, "c1");
        assert_eq!((c1.state, c1.job_id), (CellState::Green, 10));
        let c0 = run_cell(&s, "c0");
        assert_eq!(
            (c0.state, c0.job_id, c0.href()),
            (CellState::NotRun, 0, String::new())
        );
        assert_eq!(c0.state.label(), "not run");
    }

    #[test]
    fn red_cells_name_the_first_bad_commit_or_the_range() {
        let mut went_red = transition(5, 20, TransitionKind::WentRed);
        went_red.culprits = vec![commit("aaaaaaaaaaaa1"), commit("bbbbbbbbbbbb2")];
        let still_red = Transition {
            red_since_id: 5,
            ..transition(6, 30, TransitionKind::StillRed)
        };
        let runs = vec![run(30, "c3", RunStatus::Red), run(20, "c2", RunStatus::Red)];
        let s = series(
            runs.clone(),
            vec![went_red.clone(), still_red.clone()],
            vec![],
        );
        for at in ["c2", "c3"] {
            let c = run_cell(&s, at);
            assert_eq!(c.state, CellState::Red, "{at}");
            assert_eq!(c.culprits, ["aaaaaaaaaa", "bbbbbbbbbb"], "{at}");
            assert_eq!(c.first_bad, "");
        }
        // Being bisected.
        went_red.bisect = Some(Bisect::default());
        let s = series(
            runs.clone(),
            vec![went_red.clone(), still_red.clone()],
            vec![],
        );
        assert_eq!(run_cell(&s, "c3").state, CellState::Bisecting);
        // Found.
        went_red.bisect = Some(Bisect {
            state: BisectState::Found,
            first_bad: Some(commit("bbbbbbbbbbbb2")),
            ..Default::default()
        });
        let s = series(runs, vec![went_red, still_red], vec![]);
        let c = run_cell(&s, "c3");
        assert_eq!(
            (c.state, c.first_bad.as_str()),
            (CellState::Red, "bbbbbbbbbb")
        );
        assert!(c.culprits.is_empty());
    }

    #[test]
    fn re_runs_class_a_red_run_flaky_or_an_infra_error() {
        for (class, state) in [
            (Class::Flaky, CellState::Flaky),
            (Class::Spurious, CellState::Error),
            (Class::ProjectSide, CellState::Red),
        ] {
            let t = Transition {
                class: Some(class),
                ..transition(7, 40, TransitionKind::StillGreen)
            };
            let s = series(vec![run(40, "c4", RunStatus::Red)], vec![t], vec![]);
            let c = run_cell(&s, "c4");
            assert_eq!(c.state, state, "{class:?}");
            assert!(c.culprits.is_empty() && !c.why.is_empty(), "{c:?}");
        }
    }

    #[test]
    fn builds_show_why_they_wait() {
        let mut b = BuildInfo {
            job_id: 3,
            state: BuildState::Pending as i32,
            waiting: "no connected agent has label `gpu`".into(),
            phase: "queued".into(),
            ..Default::default()
        };
        let c = build_cell("linux", "c1", Some(&b));
        assert_eq!(
            (c.state, c.why.as_str()),
            (CellState::Queued, "no connected agent has label `gpu`")
        );
        b.waiting.clear();
        b.phase = "starting".into();
        assert_eq!(
            build_cell("linux", "c1", Some(&b)).state,
            CellState::Starting
        );
        b.phase = "running".into();
        assert_eq!(
            build_cell("linux", "c1", Some(&b)).state,
            CellState::Running
        );
        b.state = BuildState::Failed as i32;
        assert_eq!(build_cell("linux", "c1", Some(&b)).state, CellState::Red);
        assert_eq!(build_cell("linux", "c1", None).state, CellState::NotRun);
    }

    #[test]
    fn states_serialize_as_lowercase_words() {
        let json =
            serde_json::to_string(&[CellState::NotRun, CellState::Error, CellState::Bisecting])
                .unwrap();
        assert_eq!(json, r#"["not_run","error","bisecting"]"#);
        for s in [CellState::Green, CellState::Queued, CellState::Flaky] {
            assert_eq!(serde_json::to_value(s).unwrap(), s.word());
        }
    }
}
