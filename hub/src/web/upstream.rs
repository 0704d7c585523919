//! `/upstreams/<name>` and `/api/v1/upstreams/<name>`: an upstream's recent
//! heads with their builds per platform (a queued one says why it waits),
//! what each commit broke (went-red transitions at it, and those a
//! bisection blamed on it), and its bisections under way; `/upstreams` and
//! `/api/v1/upstreams`: every configured upstream. Everything comes from
//! `Pipeline::upstream_facts` (stored records, no git).

use askama::Template;
use axum::Router;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::get;
use serde::Serialize;
use trunkfarm_proto::v1::BuildState;

use super::Handlers;
use super::project::{CommitView, RepoView, TransitionView, api_of, page_of};
use super::site::Site;
use super::view;
use crate::commit::short;
use crate::pipeline::{PipelineError, UpstreamFacts};
use crate::results::BuildInfo;

/// Heads shown on an upstream's page.
const COMMITS: usize = 30;

/// One upstream's page.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct UpstreamView {
    pub(crate) name: String,
    #[serde(flatten)]
    pub(crate) repo: RepoView,
    pub(crate) platforms: Vec<String>,
    /// The heads polling saw, newest first (at most 30).
    pub(crate) commits: Vec<UpstreamCommitView>,
    /// Bisections of its culprit ranges under way.
    pub(crate) bisections: Vec<BisectionView>,
}

/// One head of the upstream.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct UpstreamCommitView {
    #[serde(flatten)]
    pub(crate) commit: CommitView,
    /// One per platform, in the upstream's order.
    pub(crate) builds: Vec<BuildView>,
    /// Went-red transitions recorded at this commit.
    pub(crate) broke: Vec<TransitionView>,
    /// Went-red transitions whose bisection found this commit first bad.
    pub(crate) blamed: Vec<TransitionView>,
}

/// A build of one commit on one platform.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct BuildView {
    pub(crate) platform: String,
    /// `none` (no build), `queued` (`waiting` says why), `starting`, `running`,
    /// `passed`, `failed` or `error`.
    pub(crate) state: String,
    pub(crate) job_id: u64,
    pub(crate) waiting: String,
    pub(crate) duration_ms: u64,
    #[serde(skip)]
    pub(crate) duration: String,
    pub(crate) finished_at_ms: u64,
    pub(crate) finished_at: String,
    /// What went wrong, if anything.
    pub(crate) detail: String,
}

/// A bisection under way.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct BisectionView {
    pub(crate) platform: String,
    /// The range: after `good`, up to `bad` (the went-red commit).
    pub(crate) good: String,
    #[serde(skip)]
    pub(crate) good_short: String,
    pub(crate) bad: String,
    #[serde(skip)]
    pub(crate) bad_short: String,
    pub(crate) commits: usize,
    /// Runtime builds it made itself (stored ones reused are not counted).
    pub(crate) builds_made: u32,
    pub(crate) started_at_ms: u64,
    pub(crate) started_at: String,
    /// The went-red transitions it answers, still waiting.
    pub(crate) members: Vec<BisectMemberView>,
}

/// A project whose went red a bisection answers.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct BisectMemberView {
    pub(crate) project: String,
    pub(crate) transition: u64,
    /// The commits its search has narrowed the range to so far.
    pub(crate) narrowed_to: Vec<CommitView>,
}

/// Every configured upstream.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct UpstreamsView {
    pub(crate) upstreams: Vec<UpstreamSummary>,
}

/// An upstream in the list.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct UpstreamSummary {
    pub(crate) name: String,
    #[serde(flatten)]
    pub(crate) repo: RepoView,
    pub(crate) platforms: Vec<String>,
    /// The newest head's builds.
    pub(crate) head_builds: Vec<BuildView>,
    pub(crate) bisections: usize,
}

fn build_view(platform: &str, b: Option<&BuildInfo>) -> BuildView {
    let Some(b) = b else {
        return BuildView {
            platform: platform.to_owned(),
            state: "none".into(),
            ..Default::default()
        };
    };
    let state = match BuildState::try_from(b.state) {
        Ok(BuildState::Pending) => view::pending_build(&b.phase).to_owned(),
        Ok(s) => view::word(s.as_str_name(), "BUILD_STATE_"),
        Err(_) => "unknown".to_owned(),
    };
    BuildView {
        platform: platform.to_owned(),
        state,
        job_id: b.job_id,
        waiting: b.waiting.clone(),
        duration: view::duration(b.duration_ms),
        duration_ms: b.duration_ms,
        finished_at: view::rfc3339(b.finished_at_ms),
        finished_at_ms: b.finished_at_ms,
        detail: view::detail(&b.detail),
    }
}

impl From<&UpstreamFacts> for UpstreamView {
    fn from(u: &UpstreamFacts) -> UpstreamView {
        UpstreamView {
            name: u.name.clone(),
            repo: RepoView::from(&u.repo),
            platforms: u.platforms.clone(),
            commits: u
                .commits
                .iter()
                .map(|c| UpstreamCommitView {
                    commit: CommitView::from(&c.commit),
                    builds: c
                        .builds
                        .iter()
                        .map(|(p, b)| build_view(p, b.as_ref()))
                        .collect(),
                    broke: c.went_red.iter().map(TransitionView::from).collect(),
                    blamed: c.blamed.iter().map(TransitionView::from).collect(),
                })
                .collect(),
            bisections: u
                .bisections
                .iter()
                .map(|f| {
                    let b = &f.bisection;
                    let bad = b.commits.last().map(|c| c.sha.clone()).unwrap_or_default();
                    BisectionView {
                        platform: b.platform.clone(),
                        good_short: short(&b.good).to_owned(),
                        good: b.good.clone(),
                        bad_short: short(&bad).to_owned(),
                        bad,
                        commits: b.commits.len(),
                        builds_made: b.made(),
                        started_at: view::rfc3339(b.started_at_ms),
                        started_at_ms: b.started_at_ms,
                        members: f
                            .members
                            .iter()
                            .map(|(project, transition, narrowed)| BisectMemberView {
                                project: project.clone(),
                                transition: *transition,
                                narrowed_to: narrowed.iter().map(CommitView::from).collect(),
                            })
                            .collect(),
                    }
                })
                .collect(),
        }
    }
}

#[derive(Template)]
#[template(path = "upstream.html")]
struct UpstreamPage {
    view: UpstreamView,
}

#[derive(Template)]
#[template(path = "upstreams.html")]
struct UpstreamsPage {
    view: UpstreamsView,
}

pub(super) fn routes() -> Router<Handlers> {
    Router::new()
        .route("/upstreams", get(list_page))
        .route("/upstreams/{name}", get(page))
        .route("/api/v1/upstreams", get(list_api))
        .route("/api/v1/upstreams/{name}", get(api))
}

/// Upstream `name`'s view.
pub(crate) fn upstream(site: &Site, name: &str) -> Result<UpstreamView, PipelineError> {
    Ok(UpstreamView::from(
        &site.pipeline.upstream_facts(name, COMMITS)?,
    ))
}

/// Every configured upstream's summary.
pub(crate) fn upstreams(site: &Site) -> Result<UpstreamsView, PipelineError> {
    let mut upstreams = Vec::new();
    for name in site.pipeline.upstream_names() {
        let mut u = UpstreamView::from(&site.pipeline.upstream_facts(&name, 1)?);
        let head_builds = u
            .commits
            .first_mut()
            .map(|c| std::mem::take(&mut c.builds))
            .unwrap_or_default();
        upstreams.push(UpstreamSummary {
            name: u.name,
            repo: u.repo,
            platforms: u.platforms,
            head_builds,
            bisections: u.bisections.len(),
        });
    }
    Ok(UpstreamsView { upstreams })
}

async fn page(State(handlers): State<Handlers>, Path(name): Path<String>) -> Response {
    page_of(
        &handlers,
        "Upstream",
        |s| upstream(s, &name),
        |v| UpstreamPage { view: v },
    )
}

async fn api(State(handlers): State<Handlers>, Path(name): Path<String>) -> Response {
    api_of(&handlers, |s| upstream(s, &name))
}

async fn list_page(State(handlers): State<Handlers>) -> Response {
    page_of(&handlers, "Upstreams", upstreams, |v| UpstreamsPage {
        view: v,
    })
}

async fn list_api(State(handlers): State<Handlers>) -> Response {
    api_of(&handlers, upstreams)
}
