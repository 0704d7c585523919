//! What `--json` prints: one serde view per listed thing, built from the
//! admin API's messages. The views are the CLI's JSON contract (described
//! in the README), kept apart from the wire and storage types so that
//! neither changes it by accident; every state and kind is a lowercase word
//! (`"status": "red"`, `"kind": "went_red"`), never a protobuf number.

use serde::Serialize;
use trunkfarm_proto::v1;

/// A job's state: `queued`, `leased`, `running`, `finished`.
pub(super) fn job_state(s: v1::JobState) -> &'static str {
    match s {
        v1::JobState::Queued => "queued",
        v1::JobState::Leased => "leased",
        v1::JobState::Running => "running",
        v1::JobState::Finished => "finished",
        v1::JobState::Unspecified => "unknown",
    }
}

/// How a job ended: `passed`, `failed`, `timed_out`, `error`, `cancelled`.
pub(super) fn outcome(o: v1::Outcome) -> &'static str {
    match o {
        v1::Outcome::Passed => "passed",
        v1::Outcome::Failed => "failed",
        v1::Outcome::TimedOut => "timed_out",
        v1::Outcome::Error => "error",
        v1::Outcome::Cancelled => "cancelled",
        v1::Outcome::Unspecified => "unknown",
    }
}

/// A runtime build's state: `pending`, `passed`, `failed`, `error`.
fn build_state(s: v1::BuildState) -> &'static str {
    match s {
        v1::BuildState::Pending => "pending",
        v1::BuildState::Passed => "passed",
        v1::BuildState::Failed => "failed",
        v1::BuildState::Error => "error",
        v1::BuildState::Unspecified => "unknown",
    }
}

/// A project run's status: `green`, `red`, `error`, or `none` for a cell
/// that has no result yet.
fn run_status(s: v1::RunStatus) -> &'static str {
    match s {
        v1::RunStatus::Green => "green",
        v1::RunStatus::Red => "red",
        v1::RunStatus::Error => "error",
        v1::RunStatus::Unspecified => "none",
    }
}

/// One test case's status: `passed`, `failed`, `error`, `skipped`.
fn test_status(s: v1::TestStatus) -> &'static str {
    match s {
        v1::TestStatus::Passed => "passed",
        v1::TestStatus::Failed => "failed",
        v1::TestStatus::Error => "error",
        v1::TestStatus::Skipped => "skipped",
        v1::TestStatus::Unspecified => "unknown",
    }
}

/// A transition's kind: `went_red`, `still_red`, `fixed`, `still_green`.
fn transition_kind(k: v1::TransitionKind) -> &'static str {
    match k {
        v1::TransitionKind::WentRed => "went_red",
        v1::TransitionKind::StillRed => "still_red",
        v1::TransitionKind::Fixed => "fixed",
        v1::TransitionKind::StillGreen => "still_green",
        v1::TransitionKind::Unspecified => "unknown",
    }
}

/// A mail's state in the outbox: `pending`, `sent`, `failed`.
pub(super) fn mail_state(s: v1::MailState) -> &'static str {
    match s {
        v1::MailState::Pending => "pending",
        v1::MailState::Sent => "sent",
        v1::MailState::Failed => "failed",
        v1::MailState::Unspecified => "unknown",
    }
}

/// Whether a token still enrolls anyone: `revoked`, `expired`, `used`
/// (no use left) or `active`.
pub(super) fn token_state(t: &v1::TokenInfo, now_ms: u64) -> &'static str {
    if t.revoked {
        "revoked"
    } else if now_ms >= t.expires_at_ms {
        "expired"
    } else if t.uses_left == 0 {
        "used"
    } else {
        "active"
    }
}

/// `token list --json`.
#[derive(Serialize)]
pub(super) struct Token<'a> {
    token_id: &'a str,
    /// [`token_state`] now.
    state: &'static str,
    labels: &'a [String],
    created_at_ms: u64,
    expires_at_ms: u64,
    uses_left: u32,
    uses_total: u32,
    revoked: bool,
    note: &'a str,
    trust: &'static str,
    /// 0: the hub's default.
    max_parallel_jobs: u32,
}

/// "trusted" or "volunteer".
pub(super) fn trust(trusted: bool) -> &'static str {
    if trusted { "trusted" } else { "volunteer" }
}

impl<'a> From<&'a v1::TokenInfo> for Token<'a> {
    fn from(t: &'a v1::TokenInfo) -> Self {
        Token {
            token_id: &t.token_id,
            state: token_state(t, crate::store::now_ms()),
            labels: &t.labels,
            created_at_ms: t.created_at_ms,
            expires_at_ms: t.expires_at_ms,
            uses_left: t.uses_left,
            uses_total: t.uses_total,
            revoked: t.revoked,
            note: &t.note,
            trust: trust(t.trusted),
            max_parallel_jobs: t.max_parallel_jobs,
        }
    }
}

/// One job attempt of one job, as `running` lists them.
#[derive(Serialize)]
struct JobRef {
    job_id: u64,
    attempt: u32,
}

/// `agent list --json`: its capabilities flattened into the row.
#[derive(Serialize)]
pub(super) struct Agent<'a> {
    agent_id: &'a str,
    name: &'a str,
    labels: &'a [String],
    connected: bool,
    revoked: bool,
    draining: bool,
    /// Why its donor has it take no new job ("paused by its donor until
    /// …"); empty when it takes work.
    paused: &'a str,
    running: Vec<JobRef>,
    last_seen_ms: u64,
    enrolled_at_ms: u64,
    agent_version: &'a str,
    remote_address: &'a str,
    os: &'a str,
    arch: &'a str,
    /// The cores and memory its donor offers (never more than it has).
    cores: u32,
    memory_bytes: u64,
    /// Its donor's limits (known while it is connected): the ceiling on a
    /// job's timeout (0: none), projects accepted (empty: any) and denied,
    /// the schedule (empty: any time), `only_when_idle` (empty: not set),
    /// the cache's size, and all of them in words (`limits`).
    max_job_timeout_secs: u64,
    allowed_projects: &'a [String],
    denied_projects: &'a [String],
    schedule: &'a str,
    only_when_idle: &'a str,
    cache_bytes: u64,
    limits: Vec<String>,
    /// What the hub gives it (its claim capped by its token).
    max_parallel_jobs: u32,
    /// What it claimed.
    claimed_parallel_jobs: u32,
    trust: &'static str,
    /// Confirmation runs that agreed with its verdicts.
    confirmations_agreed: u64,
    /// Confirmation runs that disagreed with its verdicts.
    confirmations_disagreed: u64,
    /// Quarantined: given no job until released.
    quarantined: bool,
    /// Why (empty when not quarantined).
    quarantine_reason: &'a str,
}

impl<'a> From<&'a v1::AgentInfo> for Agent<'a> {
    fn from(a: &'a v1::AgentInfo) -> Self {
        let caps = a.capabilities.as_ref();
        Agent {
            agent_id: &a.agent_id,
            name: &a.name,
            labels: &a.labels,
            connected: a.connected,
            revoked: a.revoked,
            draining: a.draining,
            paused: &a.paused,
            running: a
                .running
                .iter()
                .map(|j| JobRef {
                    job_id: j.job_id,
                    attempt: j.attempt,
                })
                .collect(),
            last_seen_ms: a.last_seen_ms,
            enrolled_at_ms: a.enrolled_at_ms,
            agent_version: &a.agent_version,
            remote_address: &a.remote_address,
            os: caps.map_or("", |c| &c.os),
            arch: caps.map_or("", |c| &c.arch),
            cores: caps.map_or(0, |c| c.cores),
            memory_bytes: caps.map_or(0, |c| c.memory_bytes),
            max_job_timeout_secs: caps.map_or(0, |c| c.max_job_timeout_secs),
            allowed_projects: caps.map_or(&[], |c| &c.allowed_projects),
            denied_projects: caps.map_or(&[], |c| &c.denied_projects),
            schedule: caps.map_or("", |c| &c.schedule),
            only_when_idle: caps.map_or("", |c| &c.only_when_idle),
            cache_bytes: caps.map_or(0, |c| c.cache_bytes),
            limits: caps.map(crate::dispatch::donor_limits).unwrap_or_default(),
            max_parallel_jobs: a.max_parallel_jobs,
            claimed_parallel_jobs: caps.map_or(0, |c| c.max_parallel_jobs),
            trust: trust(a.trusted),
            confirmations_agreed: a.confirmations_agreed,
            confirmations_disagreed: a.confirmations_disagreed,
            quarantined: !a.quarantined.is_empty(),
            quarantine_reason: &a.quarantined,
        }
    }
}

/// `job show/list/wait --json`: the record, its result's summary (`null`
/// fields until it has one) and its spec's commands, labels and project.
#[derive(Serialize)]
pub(super) struct Job<'a> {
    job_id: u64,
    pub(super) state: &'static str,
    attempt: u32,
    max_attempts: u32,
    agent_id: &'a str,
    pub(super) outcome: Option<&'static str>,
    exit_code: Option<i32>,
    detail: Option<&'a str>,
    duration_ms: Option<u64>,
    log_bytes_cut: Option<u64>,
    created_at_ms: u64,
    finished_at_ms: u64,
    attempts: Vec<Attempt<'a>>,
    commands: &'a [String],
    labels: &'a [String],
    pub(super) project: &'a str,
    key: &'a str,
    artifact_sha256: Option<&'a str>,
    /// Queued: why it waits (`null` once an agent has it).
    waiting: Option<&'a str>,
}

/// One attempt of a job.
#[derive(Serialize)]
struct Attempt<'a> {
    attempt: u32,
    agent_id: &'a str,
    leased_at_ms: u64,
    lost_reason: &'a str,
}

impl<'a> From<&'a v1::JobInfo> for Job<'a> {
    fn from(info: &'a v1::JobInfo) -> Self {
        let r = info.result.as_ref();
        let spec = info.spec.as_ref();
        Job {
            job_id: info.job_id,
            state: job_state(info.state()),
            attempt: info.attempt,
            max_attempts: info.max_attempts,
            agent_id: &info.agent_id,
            outcome: r.map(|r| outcome(r.outcome())),
            exit_code: r.and_then(|r| r.exit_code),
            detail: r.map(|r| r.detail.as_str()),
            duration_ms: r.map(|r| r.duration_ms),
            log_bytes_cut: r.map(|r| r.log_bytes_cut),
            created_at_ms: info.created_at_ms,
            finished_at_ms: info.finished_at_ms,
            attempts: info
                .attempts
                .iter()
                .map(|a| Attempt {
                    attempt: a.attempt,
                    agent_id: &a.agent_id,
                    leased_at_ms: a.leased_at_ms,
                    lost_reason: &a.lost_reason,
                })
                .collect(),
            commands: spec.map_or(&[], |s| &s.commands),
            labels: spec.map_or(&[], |s| &s.labels),
            project: spec.map_or("", |s| &s.project),
            key: &info.key,
            artifact_sha256: r.map(|r| r.artifact_sha256.as_str()),
            waiting: (!info.waiting.is_empty()).then_some(info.waiting.as_str()),
        }
    }
}

/// `status --json`: the upstreams, the grid's cells and the projects.
#[derive(Serialize)]
pub(super) struct Status<'a> {
    upstreams: Vec<Upstream<'a>>,
    cells: Vec<Cell<'a>>,
    projects: Vec<Project<'a>>,
}

impl<'a> From<&'a v1::GetStatusResponse> for Status<'a> {
    fn from(s: &'a v1::GetStatusResponse) -> Self {
        Status {
            upstreams: upstreams(s),
            cells: s.cells.iter().map(Cell::from).collect(),
            projects: s.projects.iter().map(Project::from).collect(),
        }
    }
}

/// One project as polling sees it (`status --json`'s `projects`).
#[derive(Serialize)]
struct Project<'a> {
    name: &'a str,
    url: &'a str,
    /// The configured branch, or the default branch polling found (empty:
    /// not polled yet).
    branch: &'a str,
    head: &'a str,
    head_seen_at_ms: u64,
    /// Empty when the last poll worked.
    poll_error: &'a str,
}

impl<'a> From<&'a v1::ProjectInfo> for Project<'a> {
    fn from(p: &'a v1::ProjectInfo) -> Self {
        Project {
            name: &p.name,
            url: &p.url,
            branch: &p.branch,
            head: &p.head,
            head_seen_at_ms: p.head_seen_at_ms,
            poll_error: &p.poll_error,
        }
    }
}

/// `upstream list --json` (and `status --json`'s `upstreams`).
pub(super) fn upstreams(s: &v1::GetStatusResponse) -> Vec<Upstream<'_>> {
    s.upstreams.iter().map(Upstream::from).collect()
}

/// One upstream: its branch head and its newest (and newest passed)
/// build per platform.
#[derive(Serialize)]
pub(super) struct Upstream<'a> {
    name: &'a str,
    url: &'a str,
    branch: &'a str,
    platforms: &'a [String],
    head: &'a str,
    head_seen_at_ms: u64,
    poll_error: &'a str,
    latest_builds: Vec<Build<'a>>,
    good_builds: Vec<Build<'a>>,
}

impl<'a> From<&'a v1::UpstreamInfo> for Upstream<'a> {
    fn from(u: &'a v1::UpstreamInfo) -> Self {
        Upstream {
            name: &u.name,
            url: &u.url,
            branch: &u.branch,
            platforms: &u.platforms,
            head: &u.head,
            head_seen_at_ms: u.head_seen_at_ms,
            poll_error: &u.poll_error,
            latest_builds: u.latest_builds.iter().map(Build::from).collect(),
            good_builds: u.good_builds.iter().map(Build::from).collect(),
        }
    }
}

/// One runtime build.
#[derive(Serialize)]
struct Build<'a> {
    upstream: &'a str,
    platform: &'a str,
    commit: &'a str,
    job_id: u64,
    state: &'static str,
    artifact_sha256: &'a str,
    created_at_ms: u64,
    finished_at_ms: u64,
    duration_ms: u64,
    detail: &'a str,
    fanned_out: u32,
    head_seq: u64,
    /// A volunteer's build: where its confirmation stands (`null`: it
    /// counted alone).
    confirmation: Option<&'a str>,
    confirmation_detail: &'a str,
    /// Pending and no agent has its job yet: why it waits (`null` otherwise).
    waiting: Option<&'a str>,
    /// Pending: its job's phase, `queued`, `starting` or `running` (the
    /// dashboard's word; `null` otherwise).
    phase: Option<&'a str>,
}

impl<'a> From<&'a v1::BuildInfo> for Build<'a> {
    fn from(b: &'a v1::BuildInfo) -> Self {
        Build {
            upstream: &b.upstream,
            platform: &b.platform,
            commit: &b.commit,
            job_id: b.job_id,
            state: build_state(b.state()),
            artifact_sha256: &b.artifact_sha256,
            created_at_ms: b.created_at_ms,
            finished_at_ms: b.finished_at_ms,
            duration_ms: b.duration_ms,
            detail: &b.detail,
            fanned_out: b.fanned_out,
            head_seq: b.head_seq,
            confirmation: (!b.confirmation.is_empty()).then_some(b.confirmation.as_str()),
            confirmation_detail: &b.confirmation_detail,
            waiting: (!b.waiting.is_empty()).then_some(b.waiting.as_str()),
            phase: (!b.phase.is_empty()).then_some(b.phase.as_str()),
        }
    }
}

/// One grid cell: a project's newest run on one upstream and platform,
/// its status repeated at the top for scripts.
#[derive(Serialize)]
struct Cell<'a> {
    project: &'a str,
    upstream: &'a str,
    platform: &'a str,
    status: &'static str,
    pending: bool,
    run: Option<Run<'a>>,
    red_since: Option<Transition<'a>>,
    /// The project's known flaky tests (see `flaky`).
    flaky_tests: u32,
}

impl<'a> From<&'a v1::StatusCell> for Cell<'a> {
    fn from(c: &'a v1::StatusCell) -> Self {
        let run = c.latest.as_ref();
        Cell {
            project: run.map_or("", |r| &r.project),
            upstream: run.map_or("", |r| &r.upstream),
            platform: run.map_or("", |r| &r.platform),
            status: run_status(run.map_or(v1::RunStatus::Unspecified, |r| r.status())),
            pending: c.pending,
            run: run.map(Run::from),
            red_since: c.red_since.as_ref().map(Transition::from),
            flaky_tests: c.flaky_tests,
        }
    }
}

/// One project run against one runtime.
#[derive(Serialize)]
struct Run<'a> {
    project: &'a str,
    upstream: &'a str,
    platform: &'a str,
    upstream_commit: &'a str,
    project_commit: &'a str,
    status: &'static str,
    outcome: &'static str,
    job_id: u64,
    duration_ms: u64,
    finished_at_ms: u64,
    detail: &'a str,
    tests_total: u32,
    tests_failed: u32,
    tests_skipped: u32,
    failing_tests: Vec<TestCase<'a>>,
    report_error: &'a str,
    /// Where the confirmation of its verdict stands: `awaiting`,
    /// `confirmed`, `overruled`, `unconfirmed`; `null` when it counted alone.
    confirmation: Option<&'a str>,
    /// Both verdicts, in words.
    confirmation_detail: &'a str,
    /// A suspicious green: its counts against the usual ones, in words;
    /// `null` otherwise.
    suspicious: Option<&'a str>,
}

impl<'a> From<&'a v1::RunInfo> for Run<'a> {
    fn from(r: &'a v1::RunInfo) -> Self {
        Run {
            project: &r.project,
            upstream: &r.upstream,
            platform: &r.platform,
            upstream_commit: &r.upstream_commit,
            project_commit: &r.project_commit,
            status: run_status(r.status()),
            outcome: outcome(r.outcome()),
            job_id: r.job_id,
            duration_ms: r.duration_ms,
            finished_at_ms: r.finished_at_ms,
            detail: &r.detail,
            tests_total: r.tests_total,
            tests_failed: r.tests_failed,
            tests_skipped: r.tests_skipped,
            failing_tests: r.failing_tests.iter().map(TestCase::from).collect(),
            report_error: &r.report_error,
            confirmation: (!r.confirmation.is_empty()).then_some(r.confirmation.as_str()),
            confirmation_detail: &r.confirmation_detail,
            suspicious: (!r.suspicious.is_empty()).then_some(r.suspicious.as_str()),
        }
    }
}

/// One test case from a JUnit report.
#[derive(Serialize)]
struct TestCase<'a> {
    name: &'a str,
    status: &'static str,
    time_ms: u64,
    message: &'a str,
}

impl<'a> From<&'a v1::TestCase> for TestCase<'a> {
    fn from(t: &'a v1::TestCase) -> Self {
        TestCase {
            name: &t.name,
            status: test_status(t.status()),
            time_ms: t.time_ms,
            message: &t.message,
        }
    }
}

/// `transitions --json` (and `breakage --json`'s `went_red`).
#[derive(Serialize)]
pub(super) struct Transition<'a> {
    id: u64,
    kind: &'static str,
    project: &'a str,
    upstream: &'a str,
    platform: &'a str,
    upstream_commit: &'a str,
    last_green_upstream_commit: &'a str,
    culprits: Vec<Commit<'a>>,
    project_commit: &'a str,
    previous_project_commit: &'a str,
    project_commit_changed: bool,
    newly_failing: &'a [String],
    job_id: u64,
    at_ms: u64,
    first: bool,
    status: &'static str,
    culprits_error: &'a str,
    red_since_id: u64,
    /// The re-run that confirmed it before it counted; 0: it counted alone.
    confirmed_by_job: u64,
    /// What its re-runs found ("regressed", "flaky", "spurious",
    /// "project_side", "broken"); empty: it counted without being classed.
    class: &'a str,
    /// Class suspicious: the counts in words; `null` otherwise.
    suspicious: Option<&'a str>,
    /// The first bad commit its bisection found; `null` while unknown
    /// (no bisection, running, or it left several candidates).
    first_bad: Option<FirstBad<'a>>,
    /// Its bisection, if its range is bisected.
    bisect: Option<BisectView<'a>>,
}

/// `first_bad` of a went-red transition.
#[derive(Serialize)]
struct FirstBad<'a> {
    commit: &'a str,
    subject: &'a str,
    author: &'a str,
}

/// A transition's bisection.
#[derive(Serialize)]
struct BisectView<'a> {
    /// "running", "found", "range" or "gave_up".
    state: &'a str,
    /// Found: the first bad commit.
    first_bad: Option<Commit<'a>>,
    /// Range or gave up: the commits one of which is the first bad one.
    candidates: Vec<Commit<'a>>,
    /// Runtime builds it made.
    builds: u32,
    detail: &'a str,
}

impl<'a> From<&'a v1::BisectInfo> for BisectView<'a> {
    fn from(b: &'a v1::BisectInfo) -> Self {
        BisectView {
            state: &b.state,
            first_bad: b.first_bad.as_ref().map(Commit::from),
            candidates: b.candidates.iter().map(Commit::from).collect(),
            builds: b.builds,
            detail: &b.detail,
        }
    }
}

/// The first bad commit a transition's bisection found, if it found one.
pub(super) fn first_bad(t: &v1::Transition) -> Option<&v1::Commit> {
    let b = t.bisect.as_ref().filter(|b| b.state == "found")?;
    b.first_bad.as_ref()
}

impl<'a> From<&'a v1::Transition> for Transition<'a> {
    fn from(t: &'a v1::Transition) -> Self {
        Transition {
            id: t.id,
            kind: transition_kind(t.kind()),
            project: &t.project,
            upstream: &t.upstream,
            platform: &t.platform,
            upstream_commit: &t.upstream_commit,
            last_green_upstream_commit: &t.last_green_upstream_commit,
            culprits: t.culprits.iter().map(Commit::from).collect(),
            project_commit: &t.project_commit,
            previous_project_commit: &t.previous_project_commit,
            project_commit_changed: t.project_commit_changed,
            newly_failing: &t.newly_failing,
            job_id: t.job_id,
            at_ms: t.at_ms,
            first: t.first,
            status: run_status(t.status()),
            culprits_error: &t.culprits_error,
            red_since_id: t.red_since_id,
            confirmed_by_job: t.confirmed_by_job,
            class: &t.class,
            suspicious: (!t.suspicious.is_empty()).then_some(t.suspicious.as_str()),
            first_bad: first_bad(t).map(|c| FirstBad {
                commit: &c.sha,
                subject: &c.subject,
                author: &c.author,
            }),
            bisect: t.bisect.as_ref().map(BisectView::from),
        }
    }
}

/// One upstream commit.
#[derive(Serialize)]
struct Commit<'a> {
    sha: &'a str,
    subject: &'a str,
    author: &'a str,
    time_ms: u64,
}

impl<'a> From<&'a v1::Commit> for Commit<'a> {
    fn from(c: &'a v1::Commit) -> Self {
        Commit {
            sha: &c.sha,
            subject: &c.subject,
            author: &c.author,
            time_ms: c.time_ms,
        }
    }
}

/// `breakage --json`: the commits asked about, newest first, the went-red
/// transitions that blame one of them, and those whose bisection cleared
/// them (found another first bad commit in the range).
#[derive(Serialize)]
pub(super) struct Breakage<'a> {
    commits: Vec<Commit<'a>>,
    went_red: Vec<Transition<'a>>,
    cleared: Vec<Transition<'a>>,
}

impl<'a> From<&'a v1::GetBreakageResponse> for Breakage<'a> {
    fn from(b: &'a v1::GetBreakageResponse) -> Self {
        Breakage {
            commits: b.commits.iter().map(Commit::from).collect(),
            went_red: b.went_red.iter().map(Transition::from).collect(),
            cleared: b.cleared.iter().map(Transition::from).collect(),
        }
    }
}

/// `artifact list --json`.
#[derive(Serialize)]
pub(super) struct Artifact<'a> {
    sha256: &'a str,
    size: u64,
    upstream: &'a str,
    commit: &'a str,
    platform: &'a str,
    build_job_id: u64,
    stored_at_ms: u64,
    downloads: Vec<Downloads<'a>>,
}

/// One agent's completed downloads of an artifact.
#[derive(Serialize)]
struct Downloads<'a> {
    agent_id: &'a str,
    count: u32,
}

impl<'a> From<&'a v1::ArtifactInfo> for Artifact<'a> {
    fn from(a: &'a v1::ArtifactInfo) -> Self {
        Artifact {
            sha256: &a.sha256,
            size: a.size,
            upstream: &a.upstream,
            commit: &a.commit,
            platform: &a.platform,
            build_job_id: a.build_job_id,
            stored_at_ms: a.stored_at_ms,
            downloads: a
                .downloads
                .iter()
                .map(|d| Downloads {
                    agent_id: &d.agent_id,
                    count: d.count,
                })
                .collect(),
        }
    }
}

/// `subscriptions --json`.
#[derive(Serialize)]
pub(super) struct Subscription<'a> {
    email: &'a str,
    project: &'a str,
    platform: &'a str,
    upstream: &'a str,
    digest: bool,
    source: &'a str,
    created_at_ms: u64,
}

impl<'a> From<&'a v1::Subscription> for Subscription<'a> {
    fn from(s: &'a v1::Subscription) -> Self {
        Subscription {
            email: &s.email,
            project: &s.project,
            platform: &s.platform,
            upstream: &s.upstream,
            digest: s.digest,
            source: &s.source,
            created_at_ms: s.created_at_ms,
        }
    }
}

/// `mail list --json`: how delivery goes, and the outbox.
#[derive(Serialize)]
pub(super) struct MailList<'a> {
    sender: &'a str,
    mails: Vec<Mail<'a>>,
}

impl<'a> From<&'a v1::ListMailResponse> for MailList<'a> {
    fn from(m: &'a v1::ListMailResponse) -> Self {
        MailList {
            sender: &m.sender,
            mails: m.mails.iter().map(Mail::from).collect(),
        }
    }
}

/// One mail of the outbox.
#[derive(Serialize)]
struct Mail<'a> {
    id: u64,
    to: &'a str,
    subject: &'a str,
    state: &'static str,
    attempts: u32,
    next_attempt_at_ms: u64,
    last_error: &'a str,
    created_at_ms: u64,
    sent_at_ms: u64,
    event: &'a str,
    message_id: &'a str,
    in_reply_to: &'a str,
    response: &'a str,
}

impl<'a> From<&'a v1::MailInfo> for Mail<'a> {
    fn from(m: &'a v1::MailInfo) -> Self {
        Mail {
            id: m.id,
            to: &m.to,
            subject: &m.subject,
            state: mail_state(m.state()),
            attempts: m.attempts,
            next_attempt_at_ms: m.next_attempt_at_ms,
            last_error: &m.last_error,
            created_at_ms: m.created_at_ms,
            sent_at_ms: m.sent_at_ms,
            event: &m.event,
            message_id: &m.message_id,
            in_reply_to: &m.in_reply_to,
            response: &m.response,
        }
    }
}

/// `pool list --json`.
#[derive(Serialize)]
pub(super) struct Pool<'a> {
    name: &'a str,
    provisioner: &'a str,
    labels: &'a [String],
    min_instances: u32,
    max_instances: u32,
    instances: Vec<Instance<'a>>,
    failed_starts: u32,
    next_start_at_ms: u64,
    last_error: &'a str,
}

/// One instance of a pool; its state is already a word on the wire
/// (`starting`, `running`, `stopping`, `gone`, `failed`).
#[derive(Serialize)]
struct Instance<'a> {
    id: &'a str,
    state: &'a str,
    handle: &'a str,
    agent_id: &'a str,
    created_at_ms: u64,
    last_busy_ms: u64,
    busy: bool,
    detail: &'a str,
}

impl<'a> From<&'a v1::PoolInfo> for Pool<'a> {
    fn from(p: &'a v1::PoolInfo) -> Self {
        Pool {
            name: &p.name,
            provisioner: &p.provisioner,
            labels: &p.labels,
            min_instances: p.min_instances,
            max_instances: p.max_instances,
            instances: p
                .instances
                .iter()
                .map(|i| Instance {
                    id: &i.id,
                    state: &i.state,
                    handle: &i.handle,
                    agent_id: &i.agent_id,
                    created_at_ms: i.created_at_ms,
                    last_busy_ms: i.last_busy_ms,
                    busy: i.busy,
                    detail: &i.detail,
                })
                .collect(),
            failed_starts: p.failed_starts,
            next_start_at_ms: p.next_start_at_ms,
            last_error: &p.last_error,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    /// Every value's word is its protobuf name without the type's prefix,
    /// in lowercase (`TRANSITION_KIND_WENT_RED` → `went_red`).
    fn words_follow_the_proto_names<E: TryFrom<i32> + Copy>(
        name: fn(&E) -> &'static str,
        word: fn(E) -> &'static str,
    ) {
        let values: Vec<E> = (1..32).filter_map(|i| E::try_from(i).ok()).collect();
        assert!(values.len() >= 3);
        for v in values {
            let (name, word) = (name(&v).to_lowercase(), word(v));
            assert!(
                name.ends_with(&format!("_{word}")),
                "{name} printed as {word}"
            );
        }
    }

    #[test]
    fn every_state_and_kind_is_its_lowercase_name() {
        words_follow_the_proto_names(v1::JobState::as_str_name, job_state);
        words_follow_the_proto_names(v1::Outcome::as_str_name, outcome);
        words_follow_the_proto_names(v1::BuildState::as_str_name, build_state);
        words_follow_the_proto_names(v1::RunStatus::as_str_name, run_status);
        words_follow_the_proto_names(v1::TestStatus::as_str_name, test_status);
        words_follow_the_proto_names(v1::TransitionKind::as_str_name, transition_kind);
        words_follow_the_proto_names(v1::MailState::as_str_name, mail_state);
    }

    fn to_json<V: Serialize>(view: V) -> Value {
        serde_json::to_value(view).unwrap()
    }

    #[test]
    fn status_json_names_states_and_kinds_in_words_at_every_depth() {
        let went_red = v1::Transition {
            kind: v1::TransitionKind::WentRed.into(),
            status: v1::RunStatus::Red.into(),
            culprits: vec![v1::Commit {
                sha: "c2".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let status = v1::GetStatusResponse {
            upstreams: vec![v1::UpstreamInfo {
                name: "rt".into(),
                latest_builds: vec![v1::BuildInfo {
                    state: v1::BuildState::Failed.into(),
                    ..Default::default()
                }],
                good_builds: vec![v1::BuildInfo {
                    state: v1::BuildState::Passed.into(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            cells: vec![v1::StatusCell {
                latest: Some(v1::RunInfo {
                    project: "shouter".into(),
                    status: v1::RunStatus::Red.into(),
                    outcome: v1::Outcome::Failed.into(),
                    failing_tests: vec![v1::TestCase {
                        name: "t".into(),
                        status: v1::TestStatus::Error.into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                red_since: Some(went_red.clone()),
                pending: false,
                flaky_tests: 2,
            }],
            projects: vec![v1::ProjectInfo {
                name: "shouter".into(),
                branch: "master".into(),
                poll_error: "branch \"main\" does not exist".into(),
                ..Default::default()
            }],
        };
        let j = to_json(Status::from(&status));
        let p = &j["projects"][0];
        assert_eq!(p["branch"], "master", "{j:#}");
        assert_eq!(p["poll_error"], "branch \"main\" does not exist");
        let u = &j["upstreams"][0];
        assert_eq!(u["latest_builds"][0]["state"], "failed", "{j:#}");
        assert_eq!(u["good_builds"][0]["state"], "passed", "{j:#}");
        let cell = &j["cells"][0];
        assert_eq!(cell["project"], "shouter");
        assert_eq!(cell["status"], "red");
        assert_eq!(cell["run"]["status"], "red");
        assert_eq!(cell["run"]["outcome"], "failed");
        assert_eq!(cell["run"]["failing_tests"][0]["status"], "error");
        assert_eq!(cell["red_since"]["kind"], "went_red");
        assert_eq!(cell["flaky_tests"], 2);
        assert_eq!(cell["red_since"]["culprits"][0]["sha"], "c2");
        assert_eq!(to_json(upstreams(&status)), j["upstreams"]);

        let mut found = went_red.clone();
        found.bisect = Some(v1::BisectInfo {
            state: "found".into(),
            first_bad: Some(v1::Commit {
                sha: "c2".into(),
                subject: "break it".into(),
                author: "Ada <ada@example.org>".into(),
                time_ms: 0,
            }),
            builds: 3,
            ..Default::default()
        });
        let breakage = v1::GetBreakageResponse {
            commits: Vec::new(),
            went_red: vec![went_red.clone(), found],
            cleared: Vec::new(),
        };
        let b = to_json(Breakage::from(&breakage));
        assert!(b["went_red"][0]["first_bad"].is_null(), "unknown: {b:#}");
        assert_eq!(
            b["went_red"][1]["first_bad"],
            json!({"commit": "c2", "subject": "break it", "author": "Ada <ada@example.org>"})
        );
        assert_eq!(b["went_red"][1]["bisect"]["state"], "found");
        assert_eq!(b["went_red"][1]["bisect"]["builds"], 3);
        assert_eq!(b["cleared"], json!([]));
        assert_eq!(b["went_red"][0]["kind"], "went_red", "{b:#}");
        assert_eq!(b["went_red"][0]["status"], "red", "{b:#}");
        assert_eq!(b["went_red"][0], to_json(Transition::from(&went_red)));

        // A cell with no run yet says so.
        let empty = v1::StatusCell {
            latest: Some(v1::RunInfo::default()),
            ..Default::default()
        };
        assert_eq!(to_json(Cell::from(&empty))["status"], "none");
    }

    #[test]
    fn jobs_and_mails_show_their_state_in_words() {
        let job = v1::JobInfo {
            job_id: 7,
            state: v1::JobState::Finished.into(),
            result: Some(v1::JobResult {
                outcome: v1::Outcome::TimedOut.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let j = to_json(Job::from(&job));
        assert_eq!(
            (&j["state"], &j["outcome"]),
            (&json!("finished"), &json!("timed_out"))
        );
        let queued = to_json(Job::from(&v1::JobInfo {
            state: v1::JobState::Queued.into(),
            ..Default::default()
        }));
        assert_eq!(queued["state"], "queued");
        assert!(queued["outcome"].is_null(), "no result yet: {queued:#}");

        let mails = v1::ListMailResponse {
            mails: vec![v1::MailInfo {
                state: v1::MailState::Sent.into(),
                ..Default::default()
            }],
            sender: "smtp".into(),
        };
        let m = to_json(MailList::from(&mails));
        assert_eq!(m["mails"][0]["state"], "sent", "{m:#}");
        assert_eq!(m["sender"], "smtp");
    }

    #[test]
    fn a_job_names_its_project() {
        let job = v1::JobInfo {
            spec: Some(v1::JobSpec {
                project: "libfoo".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(to_json(Job::from(&job))["project"], "libfoo");
    }

    #[test]
    fn a_token_says_whether_it_still_enrolls_anyone() {
        let now = 1_000_000;
        let token = v1::TokenInfo {
            expires_at_ms: now + 1,
            uses_total: 2,
            uses_left: 1,
            ..Default::default()
        };
        assert_eq!(token_state(&token, now), "active");
        assert_eq!(token_state(&token, now + 1), "expired");
        let used = v1::TokenInfo {
            uses_left: 0,
            ..token.clone()
        };
        assert_eq!(token_state(&used, now), "used");
        let revoked = v1::TokenInfo {
            revoked: true,
            ..token.clone()
        };
        assert_eq!(
            token_state(&revoked, now + 1),
            "revoked",
            "revoked comes first"
        );
        assert_eq!(to_json(Token::from(&revoked))["state"], "revoked");
    }
}

/// `flaky --json`: one project's noise.
#[derive(Serialize)]
pub(super) struct ProjectNoise<'a> {
    project: &'a str,
    /// Identical re-run pairs observed, and how many flipped.
    runs: u64,
    flips: u64,
    /// Flips after which a test is known flaky (0: never).
    flaky_after: u32,
    /// Tests that flipped at least once, most flips first.
    tests: Vec<TestNoise<'a>>,
}

/// One test's flips on identical re-runs.
#[derive(Serialize)]
struct TestNoise<'a> {
    name: &'a str,
    runs: u64,
    flips: u64,
    last_flip_ms: u64,
    known_flaky: bool,
}

impl<'a> From<&'a v1::ProjectNoise> for ProjectNoise<'a> {
    fn from(p: &'a v1::ProjectNoise) -> Self {
        ProjectNoise {
            project: &p.project,
            runs: p.runs,
            flips: p.flips,
            flaky_after: p.flaky_after,
            tests: p
                .tests
                .iter()
                .map(|t| TestNoise {
                    name: &t.name,
                    runs: t.runs,
                    flips: t.flips,
                    last_flip_ms: t.last_flip_ms,
                    known_flaky: t.known_flaky,
                })
                .collect(),
        }
    }
}

/// `calibrate --json`: where a calibration stands.
#[derive(Serialize)]
pub(super) struct Calibration<'a> {
    /// The run repeated.
    original: Option<Run<'a>>,
    runs: u32,
    jobs: &'a [u64],
    /// Runs recorded so far; of those, red and infrastructure errors.
    finished: u32,
    red: u32,
    errors: u32,
    /// Tests that failed in at least one recorded run.
    tests: Vec<CalibratedTest<'a>>,
}

/// One test across a calibration's runs.
#[derive(Serialize)]
struct CalibratedTest<'a> {
    name: &'a str,
    failed: u32,
    ran: u32,
    flaky: bool,
    known_flaky: bool,
}

impl<'a> From<&'a v1::CalibrateResponse> for Calibration<'a> {
    fn from(c: &'a v1::CalibrateResponse) -> Self {
        Calibration {
            original: c.original.as_ref().map(Run::from),
            runs: c.runs,
            jobs: &c.jobs,
            finished: c.finished,
            red: c.red,
            errors: c.errors,
            tests: c
                .tests
                .iter()
                .map(|t| CalibratedTest {
                    name: &t.name,
                    failed: t.failed,
                    ran: t.ran,
                    flaky: t.flaky,
                    known_flaky: t.known_flaky,
                })
                .collect(),
        }
    }
}
