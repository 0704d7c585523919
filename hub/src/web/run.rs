//! `/runs/<job id>` and `/api/v1/runs/<job id>`: one job — a test run, a
//! runtime build, a re-run, a bisection's job or a job submitted by hand —
//! as people ask about it: where it stands (and why it waits), what it
//! tested on which runtime, which tests failed, what its re-runs said, how
//! to run it again locally, and its log, one page at a time.
//!
//! The log is never read whole: a page is a byte range of one attempt's
//! stored chunks, or of the frames of its compacted object that cover it
//! ([`crate::logs::JobLogs::range`]), the last
//! [`LOG_PAGE`] bytes unless `?offset=` asks for another, and
//! `/api/v1/runs/<id>/log?offset=N&limit=M` serves the same ranges (at most
//! [`MAX_LOG_LIMIT`]) to `static/tail.js`, which appends what a running
//! job adds. The mails' "The run: …/runs/N" links carry the job id of the
//! result they are about (`Transition::job_id`), which is what this page
//! is keyed by.

use askama::Template;
use axum::Router;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use trunkfarm_proto::gitauth::{redact_text, redact_url};
use trunkfarm_proto::settings::fmt_duration;
use trunkfarm_proto::shell::quote;
use trunkfarm_proto::v1::{Outcome, RunStatus, TestStatus};

use super::Handlers;
use super::site::Site;
use super::view;
use crate::dispatch::{JobRecord, JobState, Phase};
use crate::job_key::{JobKey, RerunKind};
use crate::logs::LogRange;
use crate::pipeline::RunFacts;

/// The log bytes a page shows by default (its end).
pub(crate) const LOG_PAGE: u64 = 64 * 1024;
/// The most log bytes one request returns.
pub(crate) const MAX_LOG_LIMIT: u64 = 1024 * 1024;

/// One job as the run page and the API show it.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct RunView {
    pub(crate) id: u64,
    /// `test`, `build`, `rerun`, `bisection` or `job` (submitted by hand).
    pub(crate) kind: String,
    /// What it is, in words ("test run of attrs against lua on linux").
    pub(crate) what: String,
    /// The pipeline's key (empty for a job submitted by hand).
    pub(crate) key: String,
    /// `queued`, `starting`, `running`, `passed`, `failed`, `timed_out`,
    /// `error` or `cancelled`.
    pub(crate) status: String,
    /// A queued job: why no agent has taken it, in words.
    pub(crate) waiting: String,
    /// What the pipeline made of the result: a run's `green`, `red` or
    /// `error`, a build's `passed`, `failed` or `error`; empty before.
    pub(crate) verdict: String,
    /// Why it ended as it did (the result's detail, the run's reasons).
    pub(crate) detail: String,
    pub(crate) exit_code: Option<i32>,
    /// The class its re-runs gave it (`regressed`, `flaky`, …); empty when
    /// none did.
    pub(crate) class: String,
    /// The transition its result made (`went_red`, `fixed`, …); empty when none.
    pub(crate) transition: String,
    /// The agent of its current (or last) attempt, by display name.
    pub(crate) agent: String,
    pub(crate) attempt: u32,
    pub(crate) max_attempts: u32,
    pub(crate) created_at_ms: u64,
    pub(crate) created_at: String,
    /// When its current (or last) attempt was given to an agent (0: never).
    pub(crate) started_at_ms: u64,
    pub(crate) started_at: String,
    pub(crate) finished_at_ms: u64,
    pub(crate) finished_at: String,
    /// From submission until an agent took it (until now while queued).
    pub(crate) queued_for_ms: u64,
    pub(crate) queued_for: String,
    /// How long it ran (so far, while running).
    pub(crate) ran_for_ms: u64,
    pub(crate) ran_for: String,
    pub(crate) project: String,
    pub(crate) project_commit: String,
    pub(crate) upstream: String,
    /// The runtime's upstream commit (a build's: the commit it builds).
    pub(crate) upstream_commit: String,
    pub(crate) platform: String,
    /// The runtime artifact it ran with (a build: the one it made).
    pub(crate) artifact_sha256: String,
    /// The build job that made that runtime (0: unknown).
    pub(crate) runtime_job: u64,
    pub(crate) tests: TestsView,
    pub(crate) confirmation: ConfirmationView,
    /// Shell commands that run it again locally.
    pub(crate) reproduce: String,
    /// Its log: which attempt the page shows and how big it is.
    pub(crate) log: LogInfo,
}

/// A test run's cases (every case its record keeps), failing first.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct TestsView {
    pub(crate) total: u32,
    pub(crate) failed: u32,
    pub(crate) skipped: u32,
    pub(crate) cases: Vec<CaseView>,
    /// Why a report could not be used.
    pub(crate) report_error: String,
    /// A green run whose counts look wrong, in words.
    pub(crate) suspicious: String,
}

/// One test case.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct CaseView {
    pub(crate) name: String,
    /// `passed`, `failed`, `error` or `skipped`.
    pub(crate) status: String,
    pub(crate) time_ms: u64,
    pub(crate) message: String,
}

/// The confirmation of its verdict (or of the verdict it re-runs).
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct ConfirmationView {
    /// `awaiting`, `confirmed`, `overruled` or `unconfirmed`; empty when
    /// its verdict counted alone.
    pub(crate) state: String,
    /// The job whose verdict is confirmed (this one, or the one it re-runs).
    pub(crate) original: u64,
    pub(crate) reruns: Vec<RerunView>,
    /// Where it stands, in words.
    pub(crate) words: String,
}

/// One re-run and what it said.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct RerunView {
    /// `again`, `baseline`, `confirm` or `calibrate`.
    pub(crate) kind: String,
    /// 0 when it could not be run.
    pub(crate) job_id: u64,
    /// `green`, `red` or `error`; empty when not run.
    pub(crate) said: String,
    pub(crate) agent: String,
    /// Why it could not be run.
    pub(crate) note: String,
}

/// Which attempt's log the page shows.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct LogInfo {
    /// 0: no attempt yet, no log.
    pub(crate) attempt: u32,
    /// Its size now, bytes.
    pub(crate) size: u64,
    /// More may come (the job has not finished).
    pub(crate) running: bool,
    /// The log was moved into the object store (read from there, paged).
    pub(crate) compacted: bool,
}

/// One page of a log (`/api/v1/runs/<id>/log`).
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct LogPage {
    pub(crate) job_id: u64,
    pub(crate) attempt: u32,
    /// Where `text` starts, bytes.
    pub(crate) offset: u64,
    /// Where the next page starts (ask again from here for more).
    pub(crate) next_offset: u64,
    /// The log's size now.
    pub(crate) total: u64,
    /// The bytes as text (invalid UTF-8 replaced; a character cut by the
    /// range's ends is left to the neighbouring page).
    pub(crate) text: String,
    /// The job has not finished: the log may grow.
    pub(crate) running: bool,
}

#[derive(Template)]
#[template(path = "run.html")]
struct RunPage<'a> {
    view: &'a RunView,
    log: &'a LogPage,
    /// The start of the page before this one, if any.
    earlier: Option<u64>,
    /// The start of the page after this one, if any.
    later: Option<u64>,
}

pub(super) fn routes() -> Router<Handlers> {
    Router::new()
        .route("/runs/{id}", get(page))
        .route("/api/v1/runs/{id}", get(api))
        .route("/api/v1/runs/{id}/log", get(log_api))
        .route(
            "/static/tail.js",
            get(|| async { view::asset("text/javascript; charset=utf-8", TAIL_JS) }),
        )
}

/// The script that appends a running job's log (`/static/tail.js`).
const TAIL_JS: &str = include_str!("static/tail.js");

/// `?offset=N&limit=M&attempt=A`, all optional.
#[derive(Debug, Default, Deserialize)]
struct LogQuery {
    offset: Option<u64>,
    limit: Option<u64>,
    attempt: Option<u32>,
}

/// Why a run cannot be shown: the answer's status and one sentence.
type Refusal = (StatusCode, String);

/// The job id in the path, or why it is not one.
fn job_id(path: Result<Path<String>, PathRejection>) -> Result<u64, Refusal> {
    let Path(raw) = path.map_err(|e| (StatusCode::BAD_REQUEST, e.body_text()))?;
    raw.parse().map_err(|_| {
        (
            StatusCode::NOT_FOUND,
            format!("{raw:?} is not a job id: run pages are /runs/<number>."),
        )
    })
}

fn query(q: Result<Query<LogQuery>, QueryRejection>) -> Result<LogQuery, Refusal> {
    q.map(|Query(q)| q).map_err(|e| {
        (
            StatusCode::BAD_REQUEST,
            format!(
                "{}: offset, limit and attempt are whole numbers",
                e.body_text()
            ),
        )
    })
}

async fn page(
    State(handlers): State<Handlers>,
    path: Result<Path<String>, PathRejection>,
    q: Result<Query<LogQuery>, QueryRejection>,
) -> Response {
    let site = match handlers.site() {
        Ok(site) => site,
        Err(starting) => return starting.into_response(),
    };
    let answer = async {
        let (id, q) = (job_id(path)?, query(q)?);
        let view = run(site, id).await?;
        let log = match log_page(
            site,
            &view,
            q.attempt,
            q.offset,
            q.limit.unwrap_or(LOG_PAGE),
        )
        .await
        {
            Ok(log) => log,
            // The rest of the page does not need the log (its object store
            // may be down for a while): it says why the log is missing.
            Err((StatusCode::INTERNAL_SERVER_ERROR, sentence)) => LogPage {
                job_id: id,
                attempt: view.log.attempt,
                text: sentence,
                running: view.log.running,
                ..LogPage::default()
            },
            Err(refusal) => return Err(refusal),
        };
        Ok::<_, Refusal>((view, log))
    };
    match answer.await {
        Ok((view, log)) => {
            let size = log.next_offset - log.offset;
            let earlier = (log.offset > 0).then(|| log.offset.saturating_sub(LOG_PAGE.max(size)));
            let later = (log.next_offset < log.total).then_some(log.next_offset);
            view::html(&RunPage {
                view: &view,
                log: &log,
                earlier,
                later,
            })
        }
        Err((status, sentence)) => view::error(status, "Run", &sentence),
    }
}

async fn api(
    State(handlers): State<Handlers>,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    let site = match handlers.site_api() {
        Ok(site) => site,
        Err(starting) => return starting.into_response(),
    };
    let answer = async { run(site, job_id(path)?).await };
    match answer.await {
        Ok(view) => view::json(&view),
        Err((status, sentence)) => view::json_error(status, &sentence),
    }
}

async fn log_api(
    State(handlers): State<Handlers>,
    path: Result<Path<String>, PathRejection>,
    q: Result<Query<LogQuery>, QueryRejection>,
) -> Response {
    let site = match handlers.site_api() {
        Ok(site) => site,
        Err(starting) => return starting.into_response(),
    };
    let answer = async {
        let (id, q) = (job_id(path)?, query(q)?);
        let rec = record(site, id)?;
        let info = log_info(&rec, q.attempt)?;
        let limit = q.limit.unwrap_or(LOG_PAGE);
        read_log(site, id, &info, q.offset, limit, None).await
    };
    match answer.await {
        Ok(page) => view::json(&page),
        Err((status, sentence)) => view::json_error(status, &sentence),
    }
}

/// Job `id`'s record, or a 404 saying there is none.
fn record(site: &Site, id: u64) -> Result<JobRecord, Refusal> {
    match site.dispatch.get(id) {
        Ok(Some(rec)) => Ok(rec),
        Ok(None) => Err((
            StatusCode::NOT_FOUND,
            format!(
                "There is no job {id} on this hub. A finished job's record and log go after \
                 `retention.jobs` and `retention.logs` (see the hub's config); its run's \
                 summary stays on its project's page for `retention.runs`."
            ),
        )),
        Err(e) => Err((
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("Job {id} cannot be read: {e}"),
        )),
    }
}

/// Which attempt's log to read: `asked`, or the current (last) one.
fn log_info(rec: &JobRecord, asked: Option<u32>) -> Result<LogInfo, Refusal> {
    let attempt = asked.unwrap_or(rec.attempt);
    if asked.is_some() && (attempt == 0 || attempt > rec.attempt) {
        return Err((
            StatusCode::NOT_FOUND,
            format!(
                "Job {} has no attempt {attempt} (it has had {}).",
                rec.id, rec.attempt
            ),
        ));
    }
    Ok(LogInfo {
        attempt,
        size: 0,
        running: rec.state != JobState::Finished,
        compacted: false,
    })
}

/// One page of the log `info` names: `limit` bytes (capped) from
/// `offset`, or the last ones (of `size`, when this request measured the
/// log already: its chunks are walked once more, not twice).
async fn read_log(
    site: &Site,
    id: u64,
    info: &LogInfo,
    offset: Option<u64>,
    limit: u64,
    size: Option<u64>,
) -> Result<LogPage, Refusal> {
    let limit = limit.clamp(1, MAX_LOG_LIMIT);
    let range = if info.attempt == 0 {
        LogRange::default()
    } else {
        site.logs
            .range(id, info.attempt, offset, limit, size)
            .await
            .map_err(|e| {
                let why = site.logs.unreadable(id, "its web page", &e);
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("Job {id}: {why}."),
                )
            })?
    };
    let (text, offset, next_offset) = utf8_page(&range);
    Ok(LogPage {
        job_id: id,
        attempt: info.attempt,
        offset,
        next_offset,
        total: range.total,
        text,
        running: info.running,
    })
}

/// The page of the log the run page shows. The view measured its current
/// attempt's log ([`run`]): that size is passed on, not measured again.
async fn log_page(
    site: &Site,
    view: &RunView,
    attempt: Option<u32>,
    offset: Option<u64>,
    limit: u64,
) -> Result<LogPage, Refusal> {
    let rec = record(site, view.id)?;
    let info = log_info(&rec, attempt)?;
    let measured = (info.attempt == view.log.attempt).then_some(view.log.size);
    read_log(site, view.id, &info, offset, limit, measured).await
}

/// A range's bytes as text, without the pieces of a character its ends
/// cut (left to the neighbouring page); the range's start and end moved
/// accordingly.
fn utf8_page(r: &LogRange) -> (String, u64, u64) {
    let data = &r.data;
    let mut start = 0;
    if r.offset > 0 {
        while start < data.len().min(3) && data[start] & 0xC0 == 0x80 {
            start += 1;
        }
    }
    let mut end = data.len();
    if r.next_offset < r.total {
        end -= incomplete_tail(&data[start..]);
    }
    (
        String::from_utf8_lossy(&data[start..end]).into_owned(),
        r.offset + start as u64,
        r.offset + end as u64,
    )
}

/// How many bytes at the end of `b` are an unfinished UTF-8 character.
fn incomplete_tail(b: &[u8]) -> usize {
    for back in 1..=b.len().min(4) {
        let c = b[b.len() - back];
        if c & 0xC0 == 0x80 {
            continue;
        }
        let need = match c {
            0xF0.. => 4,
            0xE0.. => 3,
            0xC0.. => 2,
            _ => 1,
        };
        return if need > back { back } else { 0 };
    }
    0
}

/// The run view of job `id`, from dispatch (the job), the pipeline (what
/// it was for and what came of it), credentials (the agent's name) and
/// logs (its size).
pub(crate) async fn run(site: &Site, id: u64) -> Result<RunView, Refusal> {
    let rec = record(site, id)?;
    let internal = |e: String| (StatusCode::INTERNAL_SERVER_ERROR, e);
    let facts = site
        .pipeline
        .run_facts(&rec)
        .await
        .map_err(|e| internal(format!("What came of job {id} cannot be read: {e}")))?;
    let names: std::collections::HashMap<String, String> = site
        .credentials
        .list_agents()
        .map_err(|e| internal(format!("The agents cannot be read: {e}")))?
        .into_iter()
        .map(|a| (a.id, a.name))
        .collect();
    let name = |agent_id: &str| -> String {
        match names.get(agent_id) {
            Some(n) => n.clone(),
            None if agent_id.is_empty() => String::new(),
            None => "an agent no longer enrolled".into(),
        }
    };
    let mut log = log_info(&rec, None)?;
    if log.attempt > 0 {
        log.size = site
            .logs
            .size(id, log.attempt)
            .await
            .map_err(|e| internal(format!("The log of job {id} cannot be read: {e}")))?;
        log.compacted = site
            .logs
            .compacted(id, log.attempt)
            .map_err(|e| internal(format!("The log of job {id} cannot be read: {e}")))?
            .is_some();
    }
    Ok(build_view(
        &rec,
        &facts,
        site.dispatch.phase(id),
        &name,
        log,
    ))
}

/// The view itself (pure: everything it shows comes in).
fn build_view(
    rec: &JobRecord,
    facts: &RunFacts,
    phase: Option<Phase>,
    name: &dyn Fn(&str) -> String,
    log: LogInfo,
) -> RunView {
    let now = crate::store::now_ms();
    let result = rec.result.as_ref();
    let started_at_ms = rec
        .attempts
        .iter()
        .find(|a| a.attempt == rec.attempt)
        .map_or(0, |a| a.leased_at_ms);
    let first_lease = rec.attempts.first().map_or(0, |a| a.leased_at_ms);
    let queued_for_ms = match (first_lease, rec.state) {
        (0, JobState::Queued) => now.saturating_sub(rec.created_at_ms),
        (0, _) => 0,
        (t, _) => t.saturating_sub(rec.created_at_ms),
    };
    let ran_for_ms = match (result, rec.state) {
        (Some(r), _) => r.duration_ms,
        (None, JobState::Leased | JobState::Running) => now.saturating_sub(started_at_ms),
        _ => 0,
    };
    let status = match (rec.state, &phase) {
        (JobState::Finished, _) => {
            match Outcome::try_from(result.map_or(0, |r| r.outcome)).unwrap_or(Outcome::Error) {
                Outcome::Passed => "passed",
                Outcome::Failed => "failed",
                Outcome::TimedOut => "timed_out",
                Outcome::Cancelled => "cancelled",
                _ => "error",
            }
        }
        // Unfinished: dispatch's phase, the word every page shows.
        (_, Some(p)) => p.word(),
        (_, None) => "running",
    };
    let mut v = RunView {
        id: rec.id,
        key: rec.key.clone(),
        status: status.into(),
        waiting: phase
            .as_ref()
            .map(|p| p.why().to_owned())
            .unwrap_or_default(),
        detail: result.map(|r| view::detail(&r.detail)).unwrap_or_default(),
        exit_code: result.and_then(|r| r.exit_code),
        agent: name(&rec.agent_id),
        attempt: rec.attempt,
        max_attempts: rec.max_attempts,
        created_at_ms: rec.created_at_ms,
        created_at: view::rfc3339(rec.created_at_ms),
        started_at_ms,
        started_at: view::rfc3339(started_at_ms),
        finished_at_ms: rec.finished_at_ms,
        finished_at: view::rfc3339(rec.finished_at_ms),
        queued_for_ms,
        queued_for: human(queued_for_ms),
        ran_for_ms,
        ran_for: human(ran_for_ms),
        project: rec.spec.project.clone(),
        artifact_sha256: rec.spec.artifact_sha256.clone(),
        runtime_job: facts.runtime_job,
        reproduce: reproduce(rec, facts),
        log,
        ..RunView::default()
    };
    describe(&mut v, facts.key.as_ref());
    if let Some(b) = &facts.build
        && b.job_id == rec.id
    {
        v.verdict = build_state_word(b.state).into();
        v.artifact_sha256 = b.artifact_sha256.clone();
        if !b.detail.is_empty() {
            v.detail = view::detail(&b.detail);
        }
    }
    if matches!(
        facts.key.as_ref().map(JobKey::base),
        Some(JobKey::Build { .. })
    ) && v.artifact_sha256.is_empty()
    {
        v.artifact_sha256 = result
            .map(|r| r.artifact_sha256.clone())
            .unwrap_or_default();
    }
    if let Some(run) = &facts.run {
        let info = &run.info;
        v.project_commit = info.project_commit.clone();
        if facts.recorded {
            v.verdict = run_status_word(info.status).into();
            v.detail = view::detail(&info.detail);
        }
        let mut cases: Vec<CaseView> = run
            .cases
            .iter()
            .map(|c| CaseView {
                name: c.name.clone(),
                status: test_status_word(c.status).into(),
                time_ms: c.time_ms,
                message: c.message.clone(),
            })
            .collect();
        // Failing first; the report's order otherwise.
        cases.sort_by_key(|c| !matches!(c.status.as_str(), "failed" | "error"));
        v.tests = TestsView {
            total: info.tests_total,
            failed: info.tests_failed,
            skipped: info.tests_skipped,
            cases,
            report_error: info.report_error.clone(),
            suspicious: info.suspicious.clone(),
        };
    }
    if let Some(t) = &facts.transition {
        v.transition = transition_word(t.kind).into();
        if let Some(class) = t.class {
            v.class = class.word().into();
        }
    }
    if let Some(c) = &facts.confirmation {
        if v.class.is_empty()
            && let Some(class) = c.class
        {
            v.class = class.word().into();
        }
        v.confirmation = ConfirmationView {
            state: c.state.word().into(),
            original: c.original.job_id,
            reruns: c
                .reruns
                .iter()
                .map(|r| RerunView {
                    kind: r.kind.word().into(),
                    job_id: r.said.job_id,
                    said: if r.note.is_empty() {
                        run_status_word(r.said.status).into()
                    } else {
                        String::new()
                    },
                    agent: name(&r.said.agent_id),
                    note: r.note.clone(),
                })
                .collect(),
            words: String::new(),
        };
        v.confirmation.words = confirmation_words(&v.confirmation, c.original.job_id == rec.id);
    }
    v
}

/// Kind, what it is in words, and its series' names, from its key.
fn describe(v: &mut RunView, key: Option<&JobKey>) {
    let Some(key) = key else {
        v.kind = "job".into();
        v.what = if v.project.is_empty() {
            "a job submitted by hand".into()
        } else {
            format!("a job of {} submitted by hand", v.project)
        };
        return;
    };
    let base = match key.base() {
        JobKey::Build {
            upstream,
            platform,
            commit,
            ..
        } => {
            v.upstream = upstream.clone();
            v.platform = platform.clone();
            v.upstream_commit = commit.clone();
            format!(
                "runtime build of {upstream} {} on {platform}",
                crate::commit::short(commit)
            )
        }
        JobKey::Test {
            project,
            upstream,
            platform,
            upstream_commit,
            project_commit,
            ..
        } => {
            v.project = project.clone();
            v.upstream = upstream.clone();
            v.platform = platform.clone();
            v.upstream_commit = upstream_commit.clone();
            v.project_commit = project_commit.clone();
            format!(
                "test run of {project} against {upstream} {} on {platform}",
                crate::commit::short(upstream_commit)
            )
        }
        _ => String::new(),
    };
    (v.kind, v.what) = match key {
        JobKey::Rerun { kind, job, .. } => (
            "rerun".into(),
            format!(
                "{} of job {job}: {base}",
                match kind {
                    RerunKind::Baseline => "re-run on the last good runtime",
                    RerunKind::Calibrate => "calibration run",
                    _ => "re-run",
                }
            ),
        ),
        JobKey::Bisect { .. } => ("bisection".into(), format!("bisection step: {base}")),
        JobKey::Build { .. } => ("build".into(), base),
        JobKey::Test { .. } => ("test".into(), base),
    };
}

/// Where a confirmation stands, in words.
fn confirmation_words(c: &ConfirmationView, original: bool) -> String {
    let whose = if original {
        "Its verdict".to_string()
    } else {
        format!("The verdict of job {} it re-runs", c.original)
    };
    let state = match c.state.as_str() {
        "awaiting" => "waits for its re-runs before it counts",
        "confirmed" => "was confirmed by its re-runs",
        "overruled" => "was overruled by its re-runs",
        _ => "stays unconfirmed (its re-runs could not decide)",
    };
    format!("{whose} {state}.")
}

/// The commands that run job `rec` again on one's own machine: its
/// runtime unpacked where the agent puts it, its repository at its commit,
/// its environment, and each command the way the agent runs it (`sh -c`,
/// stopping at the first failure). Credentials never appear: the stored
/// spec has none, URLs are redacted again in case, and the values of
/// variables whose names look secret ([`secret_name`]) are not shown (the
/// page is public). Names and values are shell-quoted.
fn reproduce(rec: &JobRecord, facts: &RunFacts) -> String {
    let spec = &rec.spec;
    let mut s = format!(
        "# Job {} again, on your machine (a POSIX shell; git, tar and zstd).\nset -e\nmkdir trunkfarm-job-{0} && cd trunkfarm-job-{0}\nexport TRUNKFARM_WORK_DIR=\"$PWD\" TRUNKFARM_JOB_ID={0} TRUNKFARM_ATTEMPT=1\n",
        rec.id
    );
    if !spec.artifact_sha256.is_empty() {
        let sha = &spec.artifact_sha256;
        let built_by = match facts.runtime_job {
            0 => String::new(),
            job => format!(" (built by job {job}: /runs/{job} shows how)"),
        };
        s.push_str(&format!(
            "# The runtime {sha}{built_by}: the hub keeps it as\n# artifacts/{sha}.tar.zst in its data directory, or under its prefix in its\n# object store bucket ([storage]; `trunkfarm artifact list` lists it).\nmkdir runtime && zstd -dc {sha}.tar.zst | tar -x -C runtime\nexport TRUNKFARM_RUNTIME_PREFIX=\"$PWD/runtime\" PATH=\"$PWD/runtime/bin:$PATH\"\n",
        ));
    }
    if !spec.upload_prefix.is_empty() {
        s.push_str(&format!(
            "# The build installs into $PREFIX (the agent packs and uploads it).\nexport PREFIX=\"$PWD\"/{}\nmkdir -p \"$PREFIX\"\n",
            quote(&spec.upload_prefix)
        ));
    }
    if let Some(repo) = spec.repository.as_ref().filter(|r| !r.url.is_empty()) {
        let url = quote(&redact_url(&repo.url));
        s.push_str(&format!("git clone {url} src\n"));
        if !repo.rev.is_empty() {
            s.push_str(&format!(
                "git -C src checkout --detach {}\n",
                quote(&repo.rev)
            ));
        }
        s.push_str("cd src\n");
    }
    let mut env: Vec<_> = spec.env.iter().collect();
    env.sort();
    for (k, val) in env {
        let shown = match secret_name(k) {
            true => REDACTED.to_owned(),
            false => redact_text(val),
        };
        s.push_str(&format!("export {}={}\n", quote(k), quote(&shown)));
    }
    for c in &spec.commands {
        s.push_str(&format!("sh -c {}\n", quote(&redact_text(c))));
    }
    s
}

/// What the run page shows instead of a secret-looking variable's value.
const REDACTED: &str = "<redacted>";

/// Words in an environment variable's name (any case) that mark its value
/// as a secret the public run page must not show.
const SECRET_WORDS: [&str; 7] = [
    "TOKEN",
    "SECRET",
    "PASSWORD",
    "PASSWD",
    "KEY",
    "CREDENTIAL",
    "AUTH",
];

/// Whether environment variable `name` looks like it holds a secret
/// (`GITHUB_TOKEN`, `api_key`, `DB_PASSWD`, …): its value is redacted.
fn secret_name(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    SECRET_WORDS.iter().any(|w| upper.contains(w))
}

fn human(ms: u64) -> String {
    if ms < 1000 {
        return format!("{ms}ms");
    }
    fmt_duration(std::time::Duration::from_secs(ms / 1000))
}

fn run_status_word(status: i32) -> &'static str {
    match RunStatus::try_from(status) {
        Ok(RunStatus::Green) => "green",
        Ok(RunStatus::Red) => "red",
        _ => "error",
    }
}

fn build_state_word(state: i32) -> &'static str {
    use trunkfarm_proto::v1::BuildState;
    match BuildState::try_from(state) {
        Ok(BuildState::Passed) => "passed",
        Ok(BuildState::Failed) => "failed",
        Ok(BuildState::Pending) => "pending",
        _ => "error",
    }
}

fn test_status_word(status: i32) -> &'static str {
    match TestStatus::try_from(status) {
        Ok(TestStatus::Passed) => "passed",
        Ok(TestStatus::Failed) => "failed",
        Ok(TestStatus::Skipped) => "skipped",
        _ => "error",
    }
}

fn transition_word(kind: i32) -> &'static str {
    use trunkfarm_proto::v1::TransitionKind;
    match TransitionKind::try_from(kind) {
        Ok(TransitionKind::WentRed) => "went_red",
        Ok(TransitionKind::StillRed) => "still_red",
        Ok(TransitionKind::Fixed) => "fixed",
        Ok(TransitionKind::StillGreen) => "still_green",
        _ => "",
    }
}

#[cfg(test)]
mod tests;
