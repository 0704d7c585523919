//! `/agents` and `/api/v1/agents`: volunteers' agents and pool instances,
//! their trust, status, why one is unavailable, when it was last seen and
//! what it did. Never an address, a credential or a token.

use askama::Template;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;

use super::Handlers;
use super::site::Site;
use super::view;

/// Every enrolled agent, connected ones first.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct AgentsView {
    pub(crate) agents: Vec<AgentView>,
    /// How many are connected now.
    pub(crate) connected: usize,
}

/// One agent as the page and the API show it.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct AgentView {
    /// The display name its donor chose (or the pool instance's).
    pub(crate) name: String,
    /// `trusted` (an operator's or pool machine) or `volunteer`.
    pub(crate) trust: String,
    /// `connected`, `draining`, `quarantined`, `offline` or `revoked`.
    pub(crate) status: String,
    /// Why it takes no work now, in words; empty when it may.
    pub(crate) unavailable: String,
    pub(crate) last_seen_ms: u64,
    pub(crate) last_seen: String,
    /// `last_seen` as people say it ("3m ago").
    #[serde(skip)]
    pub(crate) last_seen_ago: String,
    /// The jobs it runs now.
    pub(crate) running: Vec<u64>,
    pub(crate) labels: Vec<String>,
    /// Jobs it ran to the end (results it reported that the hub recorded,
    /// whatever their outcome) since the hub started.
    pub(crate) jobs_done: u64,
    /// The most jobs at once the hub gives it (its donor's claim, capped
    /// by its token).
    pub(crate) max_parallel_jobs: u32,
    /// Its donor's ceiling on a job's timeout (0: none, or not connected:
    /// the hub knows a donor's limits only from a live session).
    pub(crate) max_job_timeout_secs: u64,
    /// Projects its donor accepts (empty: any).
    pub(crate) allowed_projects: Vec<String>,
    /// Projects its donor denies.
    pub(crate) denied_projects: Vec<String>,
    /// The cores and memory its donor offers (0: unknown or not connected).
    pub(crate) cores: u32,
    pub(crate) memory_bytes: u64,
    /// When its donor lets it take work, in words (empty: any time).
    pub(crate) schedule: String,
    /// Its donor's `only_when_idle`, in words (empty: not set).
    pub(crate) only_when_idle: String,
    /// The most disk its runtime cache takes (0: unknown).
    pub(crate) cache_bytes: u64,
    /// Every donor limit above in words (`dispatch::donor_limits`).
    pub(crate) limits: Vec<String>,
    pub(crate) enrolled_at_ms: u64,
    pub(crate) enrolled_at: String,
}

#[derive(Template)]
#[template(path = "agents.html")]
struct AgentsPage<'a> {
    view: &'a AgentsView,
}

pub(super) fn routes() -> Router<Handlers> {
    Router::new()
        .route("/agents", get(page))
        .route("/api/v1/agents", get(api))
}

async fn page(State(handlers): State<Handlers>) -> Response {
    match handlers.site().map(agents) {
        Ok(Ok(v)) => view::html(&AgentsPage { view: &v }),
        Ok(Err(e)) => view::error(StatusCode::INTERNAL_SERVER_ERROR, "Agents", &e),
        Err(starting) => starting.into_response(),
    }
}

async fn api(State(handlers): State<Handlers>) -> Response {
    match handlers.site_api().map(agents) {
        Ok(Ok(v)) => view::json(&v),
        Ok(Err(e)) => view::json_error(StatusCode::INTERNAL_SERVER_ERROR, &e),
        Err(starting) => starting.into_response(),
    }
}

/// The agents view, from credentials (everyone enrolled) and dispatch
/// (who is connected and what runs).
pub(crate) fn agents(site: &Site) -> Result<AgentsView, String> {
    let now_ms = crate::store::now_ms();
    let infos = crate::dispatch::agent_views(&site.credentials, &site.dispatch)
        .map_err(|e| format!("cannot read the agents: {e}"))?;
    let done = site.dispatch.jobs_done();
    let mut agents: Vec<AgentView> = infos
        .into_iter()
        .map(|a| {
            let (status, unavailable) = crate::dispatch::availability(&a);
            let caps = a.capabilities.unwrap_or_default();
            AgentView {
                jobs_done: done.get(&a.agent_id).copied().unwrap_or(0),
                max_parallel_jobs: a.max_parallel_jobs,
                max_job_timeout_secs: caps.max_job_timeout_secs,
                limits: crate::dispatch::donor_limits(&caps),
                denied_projects: caps.denied_projects,
                cores: caps.cores,
                memory_bytes: caps.memory_bytes,
                schedule: caps.schedule,
                only_when_idle: caps.only_when_idle,
                cache_bytes: caps.cache_bytes,
                allowed_projects: caps.allowed_projects,
                name: a.name,
                trust: if a.trusted { "trusted" } else { "volunteer" }.to_string(),
                status: status.to_string(),
                unavailable,
                last_seen: view::rfc3339(a.last_seen_ms),
                last_seen_ago: if a.connected {
                    "now".to_string()
                } else {
                    view::ago(a.last_seen_ms, now_ms)
                },
                last_seen_ms: a.last_seen_ms,
                running: a.running.iter().map(|j| j.job_id).collect(),
                labels: a.labels,
                enrolled_at: view::rfc3339(a.enrolled_at_ms),
                enrolled_at_ms: a.enrolled_at_ms,
            }
        })
        .collect();
    agents.sort_by_key(|a| (a.status != "connected", a.name.clone()));
    let connected = agents.iter().filter(|a| a.status == "connected").count();
    Ok(AgentsView { agents, connected })
}
