//! `/projects/<name>` and `/api/v1/projects/<name>`: one project's history
//! per (upstream, platform) series — its state now, its recent runs with
//! the transitions marked, the tests newly failing in its red spell, its
//! flaky tests, its repository and the subscription form; `/projects` and
//! `/api/v1/projects`: every configured project with its series' states.
//! Everything comes from `Pipeline::project_facts` (stored records, no git).

use askama::Template;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use trunkfarm_proto::v1::TransitionKind;

use super::Handlers;
use super::grid;
use super::site::Site;
use super::view;
use crate::commit::short;
use crate::pipeline::{PipelineError, ProjectFacts, RepoFacts, SeriesFacts};
use crate::results::{Class, Commit, RunInfo, Transition};

/// Runs shown per series on a project's page.
const HISTORY: usize = 30;
// Retention keeps at least the runs per series this page reads.
const _: () = assert!(HISTORY <= crate::results::PAGE_RUNS);

/// One project's page.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct ProjectView {
    pub(crate) name: String,
    #[serde(flatten)]
    pub(crate) repo: RepoView,
    pub(crate) series: Vec<SeriesView>,
    /// Its known flaky tests, most flips first.
    pub(crate) flaky_tests: Vec<FlakyTestView>,
    /// Flips on identical re-runs that make a test known flaky.
    pub(crate) flaky_after: u32,
}

/// A configured repository (project or upstream) as polling sees it.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct RepoView {
    /// Its URL, without credentials.
    pub(crate) url: String,
    pub(crate) branch: String,
    /// Its branch head as polling last saw it (empty: not yet).
    pub(crate) head: String,
    #[serde(skip)]
    pub(crate) head_short: String,
    pub(crate) head_seen_at_ms: u64,
    pub(crate) head_seen_at: String,
    /// Why its last poll failed (empty: it worked).
    pub(crate) poll_error: String,
}

/// A series' state now (also what `/api/v1/projects` lists).
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct SeriesNow {
    pub(crate) upstream: String,
    pub(crate) platform: String,
    /// Its newest run's state, the grid's word for it (`green`, `red`,
    /// `flaky`, `error`, …: `grid::run_state`), or `none` (no run yet).
    pub(crate) state: String,
    /// Its newest run's job (0: none).
    pub(crate) latest_job: u64,
    /// A newer run: `queued` (no agent has it: `waiting` says why),
    /// `starting` (an agent has it, not started), `running`, or empty.
    pub(crate) pending: String,
    pub(crate) pending_job: u64,
    pub(crate) waiting: String,
    /// The went-red transition its red spell began with (0: not red).
    pub(crate) red_since: u64,
}

/// A series on the project's page.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct SeriesView {
    #[serde(flatten)]
    pub(crate) now: SeriesNow,
    /// The went-red its red spell began with, if red.
    pub(crate) went_red: Option<TransitionView>,
    /// Tests failing in the red spell that did not before it.
    pub(crate) newly_failing: Vec<String>,
    /// Its newest runs, newest first (at most 30).
    pub(crate) history: Vec<RunRowView>,
}

/// One run in a series' history.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct RunRowView {
    pub(crate) job_id: u64,
    /// Its state, the grid's word (`green`, `red`, `flaky`, `error`).
    pub(crate) status: String,
    pub(crate) upstream_commit: String,
    #[serde(skip)]
    pub(crate) upstream_short: String,
    pub(crate) project_commit: String,
    #[serde(skip)]
    pub(crate) project_short: String,
    pub(crate) duration_ms: u64,
    #[serde(skip)]
    pub(crate) duration: String,
    pub(crate) finished_at_ms: u64,
    pub(crate) finished_at: String,
    pub(crate) tests_total: u32,
    pub(crate) tests_failed: u32,
    /// What this run did to its series, when it is worth marking (went
    /// red, fixed, or classed by its re-runs).
    pub(crate) transition: Option<TransitionView>,
}

/// A transition as pages show it.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct TransitionView {
    pub(crate) id: u64,
    /// `went_red`, `fixed`, `still_red` or `still_green`.
    pub(crate) kind: String,
    /// What its re-runs found (`regressed`, `flaky`, …); empty: not classed.
    pub(crate) class: String,
    pub(crate) project: String,
    pub(crate) platform: String,
    pub(crate) upstream_commit: String,
    #[serde(skip)]
    pub(crate) upstream_short: String,
    pub(crate) job_id: u64,
    /// Went red: the commits after the last green one, oldest first.
    pub(crate) culprits: Vec<CommitView>,
    /// Its bisection: `running`, `found`, `range`, `gave_up`; empty: none.
    pub(crate) bisect: String,
    /// The first bad commit the bisection found.
    pub(crate) first_bad: Option<CommitView>,
    pub(crate) at_ms: u64,
    pub(crate) at: String,
    /// In words for the page ("went red", "fixed (flaky)").
    #[serde(skip)]
    pub(crate) words: String,
}

/// A commit as pages show it.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct CommitView {
    pub(crate) sha: String,
    #[serde(skip)]
    pub(crate) short: String,
    /// Its subject line, when a stored culprit range names it.
    pub(crate) subject: String,
}

/// A known flaky test.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct FlakyTestView {
    pub(crate) name: String,
    /// Identical re-run pairs it ran in, and of those, pairs that flipped.
    pub(crate) runs: u64,
    pub(crate) flips: u64,
    pub(crate) last_flip_ms: u64,
    pub(crate) last_flip: String,
}

/// Every configured project with its series' states.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct ProjectsView {
    pub(crate) projects: Vec<ProjectSummary>,
}

/// A project in the list.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct ProjectSummary {
    pub(crate) name: String,
    #[serde(flatten)]
    pub(crate) repo: RepoView,
    pub(crate) series: Vec<SeriesNow>,
    pub(crate) flaky_tests: usize,
}

impl From<&RepoFacts> for RepoView {
    fn from(r: &RepoFacts) -> RepoView {
        let head = r.head.as_ref();
        let seen = head.map_or(0, |h| h.seen_at_ms);
        RepoView {
            url: r.url.clone(),
            branch: r.branch.clone(),
            head: head.map(|h| h.commit.clone()).unwrap_or_default(),
            head_short: head
                .map(|h| short(&h.commit).to_owned())
                .unwrap_or_default(),
            head_seen_at_ms: seen,
            head_seen_at: view::rfc3339(seen),
            poll_error: r.poll_error.clone(),
        }
    }
}

impl From<&Commit> for CommitView {
    fn from(c: &Commit) -> CommitView {
        CommitView {
            short: short(&c.sha).to_owned(),
            sha: c.sha.clone(),
            subject: c.subject.clone(),
        }
    }
}

impl From<&Transition> for TransitionView {
    fn from(t: &Transition) -> TransitionView {
        let kind = TransitionKind::try_from(t.kind).map_or_else(
            |_| "unknown".into(),
            |k| view::word(k.as_str_name(), "TRANSITION_KIND_"),
        );
        let class = t.class.map(Class::word).unwrap_or_default().to_owned();
        let words = match class.as_str() {
            "" => kind.replace('_', " "),
            c => format!("{} ({})", kind.replace('_', " "), c.replace('_', " ")),
        };
        TransitionView {
            id: t.id,
            class,
            project: t.project.clone(),
            platform: t.platform.clone(),
            upstream_short: short(&t.upstream_commit).to_owned(),
            upstream_commit: t.upstream_commit.clone(),
            job_id: t.job_id,
            culprits: t.culprits.iter().map(CommitView::from).collect(),
            bisect: t
                .bisect
                .as_ref()
                .map(|b| b.state.word().to_owned())
                .unwrap_or_default(),
            first_bad: t
                .bisect
                .as_ref()
                .and_then(|b| b.first_bad.as_ref())
                .map(CommitView::from),
            at: view::rfc3339(t.at_ms),
            at_ms: t.at_ms,
            words,
            kind,
        }
    }
}

/// Whether a transition is marked in a history: it changed the series or
/// its re-runs classed it.
fn marked(t: &Transition) -> bool {
    t.kind == TransitionKind::WentRed as i32
        || t.kind == TransitionKind::Fixed as i32
        || t.class.is_some()
}

/// Run `r` of series `s` with what decides its state word (the grid's
/// [`grid::run_state`]): its transition and its red spell's went-red.
fn judged<'a>(r: &'a RunInfo, s: &'a SeriesFacts) -> grid::Judged<'a> {
    let find = |id: u64| {
        s.transitions
            .iter()
            .find(|t| t.id == id)
            .or(s.red_since.as_ref().filter(|t| t.id == id))
    };
    grid::Judged::new(r, s.transitions.iter().find(|t| t.job_id == r.job_id), find)
}

fn row(r: &RunInfo, s: &SeriesFacts) -> RunRowView {
    let transitions = &s.transitions;
    RunRowView {
        job_id: r.job_id,
        status: grid::run_state(judged(r, s)).word().to_owned(),
        upstream_short: short(&r.upstream_commit).to_owned(),
        upstream_commit: r.upstream_commit.clone(),
        project_short: short(&r.project_commit).to_owned(),
        project_commit: r.project_commit.clone(),
        duration: view::duration(r.duration_ms),
        duration_ms: r.duration_ms,
        finished_at: view::rfc3339(r.finished_at_ms),
        finished_at_ms: r.finished_at_ms,
        tests_total: r.tests_total,
        tests_failed: r.tests_failed,
        transition: transitions
            .iter()
            .find(|t| t.job_id == r.job_id && marked(t))
            .map(TransitionView::from),
    }
}

fn series_now(s: &SeriesFacts) -> SeriesNow {
    let latest = s.history.first();
    let (pending, pending_job, waiting) = match &s.pending {
        Some((job, phase)) => (
            grid::series_state(None, Some((*job, phase.as_ref()))).word(),
            *job,
            phase
                .as_ref()
                .map(|p| p.why().to_owned())
                .unwrap_or_default(),
        ),
        None => ("", 0, String::new()),
    };
    SeriesNow {
        upstream: s.upstream.clone(),
        platform: s.platform.clone(),
        state: latest.map_or_else(
            || "none".into(),
            |r| {
                grid::series_state(Some(judged(r, s)), None)
                    .word()
                    .to_owned()
            },
        ),
        latest_job: latest.map_or(0, |r| r.job_id),
        pending: pending.to_owned(),
        pending_job,
        waiting,
        red_since: s.red_since.as_ref().map_or(0, |t| t.id),
    }
}

impl From<&ProjectFacts> for ProjectView {
    fn from(p: &ProjectFacts) -> ProjectView {
        ProjectView {
            name: p.name.clone(),
            repo: RepoView::from(&p.repo),
            series: p
                .series
                .iter()
                .map(|s| SeriesView {
                    now: series_now(s),
                    went_red: s.red_since.as_ref().map(TransitionView::from),
                    newly_failing: s
                        .red_since
                        .as_ref()
                        .map(|t| t.newly_failing.clone())
                        .unwrap_or_default(),
                    history: s.history.iter().map(|r| row(r, s)).collect(),
                })
                .collect(),
            flaky_tests: p
                .flaky
                .iter()
                .map(|(name, t)| FlakyTestView {
                    name: name.clone(),
                    runs: t.runs,
                    flips: t.flips,
                    last_flip: view::rfc3339(t.last_flip_ms),
                    last_flip_ms: t.last_flip_ms,
                })
                .collect(),
            flaky_after: p.flaky_after,
        }
    }
}

#[derive(Template)]
#[template(path = "project.html")]
struct ProjectPage {
    view: ProjectView,
}

#[derive(Template)]
#[template(path = "projects.html")]
struct ProjectsPage {
    view: ProjectsView,
}

pub(super) fn routes() -> Router<Handlers> {
    Router::new()
        .route("/projects", get(list_page))
        .route("/projects/{name}", get(page))
        .route("/api/v1/projects", get(list_api))
        .route("/api/v1/projects/{name}", get(api))
}

/// Project `name`'s view.
pub(crate) fn project(site: &Site, name: &str) -> Result<ProjectView, PipelineError> {
    Ok(ProjectView::from(
        &site.pipeline.project_facts(name, HISTORY)?,
    ))
}

/// Every configured project's summary.
pub(crate) fn projects(site: &Site) -> Result<ProjectsView, PipelineError> {
    let mut projects = Vec::new();
    for name in site.pipeline.project_names() {
        let p = site.pipeline.project_facts(&name, 1)?;
        projects.push(ProjectSummary {
            series: p.series.iter().map(series_now).collect(),
            flaky_tests: p.flaky.len(),
            repo: RepoView::from(&p.repo),
            name: p.name,
        });
    }
    Ok(ProjectsView { projects })
}

/// The status a pipeline error answers with: 404 for an unknown name.
fn status_of(e: &PipelineError) -> StatusCode {
    match e {
        PipelineError::NoSuchProject(..) | PipelineError::NoSuchUpstream(..) => {
            StatusCode::NOT_FOUND
        }
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// An error page: "Not found" naming the configured ones, or the error.
fn error_page(title: &str, e: &PipelineError) -> Response {
    let status = status_of(e);
    let title = if status == StatusCode::NOT_FOUND {
        "Not found"
    } else {
        title
    };
    view::error(status, title, &format!("{e}."))
}

/// The page `render` makes of the view `build` reads, or the error page
/// (an unknown name: 404 naming the configured ones).
pub(super) fn page_of<V, T: Template>(
    handlers: &Handlers,
    title: &str,
    build: impl FnOnce(&Site) -> Result<V, PipelineError>,
    render: impl FnOnce(V) -> T,
) -> Response {
    match handlers.site().map(build) {
        Ok(Ok(v)) => view::html(&render(v)),
        Ok(Err(e)) => error_page(title, &e),
        Err(starting) => starting.into_response(),
    }
}

/// The same view as JSON, or the API's error.
pub(super) fn api_of<V: Serialize>(
    handlers: &Handlers,
    build: impl FnOnce(&Site) -> Result<V, PipelineError>,
) -> Response {
    match handlers.site_api().map(build) {
        Ok(Ok(v)) => view::json(&v),
        Ok(Err(e)) => view::json_error(status_of(&e), &e.to_string()),
        Err(starting) => starting.into_response(),
    }
}

async fn page(State(handlers): State<Handlers>, Path(name): Path<String>) -> Response {
    page_of(
        &handlers,
        "Project",
        |s| project(s, &name),
        |v| ProjectPage { view: v },
    )
}

async fn api(State(handlers): State<Handlers>, Path(name): Path<String>) -> Response {
    api_of(&handlers, |s| project(s, &name))
}

async fn list_page(State(handlers): State<Handlers>) -> Response {
    page_of(&handlers, "Projects", projects, |v| ProjectsPage {
        view: v,
    })
}

async fn list_api(State(handlers): State<Handlers>) -> Response {
    api_of(&handlers, projects)
}
