//! The records the `results` tree stores, owned here so that the storage
//! schema is not the wire contract: a field added to the `.proto` changes
//! nothing stored, and a record can grow without touching the wire.
//!
//! Each has exactly the JSON the proto-derived types wrote before (prost's
//! snake_case field names in `.proto` order, enums as their numbers so an
//! unknown one still reads, `default` for absent fields), so a database
//! written by an older release reads the same and records are rewritten in
//! the same bytes (`tests::records_keep_the_layout_and_bytes_of_older_databases`,
//! `tests::old_records_decode_to_the_same_bytes`).
//!
//! The wire types are made at the edges, through the `From`s below: they
//! destructure every field on both sides, so a field added to either is a
//! compile error here until someone decides whether it is stored.

use serde::{Deserialize, Serialize};
use trunkfarm_proto::v1;

/// A commit, as a culprit range lists it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct Commit {
    /// Full hash.
    pub(crate) sha: String,
    /// The first line of its message.
    pub(crate) subject: String,
    /// "Name <email>".
    pub(crate) author: String,
    /// Commit time, Unix milliseconds.
    pub(crate) time_ms: u64,
}

/// A runtime build of one upstream commit on one platform.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct BuildInfo {
    /// The upstream built.
    pub(crate) upstream: String,
    /// The platform built on.
    pub(crate) platform: String,
    /// The upstream commit built.
    pub(crate) commit: String,
    /// The build job.
    pub(crate) job_id: u64,
    /// A `v1::BuildState` number.
    pub(crate) state: i32,
    /// Hex SHA-256 of the runtime artifact, once passed.
    pub(crate) artifact_sha256: String,
    /// When the job was submitted, ms.
    pub(crate) created_at_ms: u64,
    /// When it finished, ms.
    pub(crate) finished_at_ms: u64,
    /// How long it ran, ms.
    pub(crate) duration_ms: u64,
    /// What went wrong, if anything.
    pub(crate) detail: String,
    /// Test jobs queued against it.
    pub(crate) fanned_out: u32,
    /// When polling saw its commit as the head (0: never; see
    /// [`super::Finished::Build`]).
    pub(crate) head_seq: u64,
    /// Where the confirmation of a volunteer's build stands (see
    /// [`RunInfo::confirmation`]); empty when it counted alone.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(crate) confirmation: String,
    /// Both verdicts, in words.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(crate) confirmation_detail: String,
    /// Pending and no agent has its job yet: why it waits. Never stored:
    /// the pipeline asks dispatch when it shows the build.
    #[serde(skip)]
    pub(crate) waiting: String,
    /// Pending: its job's phase word (`Phase::word`: queued, starting,
    /// running). Never stored, asked with `waiting`.
    #[serde(skip)]
    pub(crate) phase: String,
}

/// A test run's summary: what the status grid shows.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct RunInfo {
    /// The project tested.
    pub(crate) project: String,
    /// The upstream it was tested against.
    pub(crate) upstream: String,
    /// The platform tested on.
    pub(crate) platform: String,
    /// The upstream commit of the runtime.
    pub(crate) upstream_commit: String,
    /// The project commit tested.
    pub(crate) project_commit: String,
    /// A `v1::RunStatus` number.
    pub(crate) status: i32,
    /// A `v1::Outcome` number: the job's own outcome.
    pub(crate) outcome: i32,
    /// The test job.
    pub(crate) job_id: u64,
    /// How long it ran, ms.
    pub(crate) duration_ms: u64,
    /// When it finished, ms.
    pub(crate) finished_at_ms: u64,
    /// What went wrong, if anything.
    pub(crate) detail: String,
    /// Cases in the JUnit reports, when the project gives them.
    pub(crate) tests_total: u32,
    /// Of those, failed or errored.
    pub(crate) tests_failed: u32,
    /// Of those, skipped.
    pub(crate) tests_skipped: u32,
    /// The failing cases (capped; the run's record keeps every case).
    pub(crate) failing_tests: Vec<TestCase>,
    /// Why a report could not be used (the run's status stands regardless).
    pub(crate) report_error: String,
    /// Where the confirmation of its verdict stands (`ConfirmState`'s
    /// word); empty when it counted alone. Not written when empty: older
    /// records keep their bytes.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(crate) confirmation: String,
    /// Both verdicts, in words, once the confirmation settled.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(crate) confirmation_detail: String,
    /// A green run whose JUnit counts look wrong against its series'
    /// previous runs: the counts in words ("20 passed → 0 passed, 20
    /// skipped"); empty otherwise (not written then).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(crate) suspicious: String,
}

/// One test case of a run, as its JUnit report gave it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct TestCase {
    /// "classname.name" when the report gives a class name.
    pub(crate) name: String,
    /// A `v1::TestStatus` number.
    pub(crate) status: i32,
    /// How long it ran, ms.
    pub(crate) time_ms: u64,
    /// The failure's message, cut to a few hundred bytes.
    pub(crate) message: String,
}

/// What a decisive result did to its series (went red, still red, fixed,
/// still green), under an increasing id.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct Transition {
    /// Increasing: the notifier reads transitions in id order.
    pub(crate) id: u64,
    /// A `v1::TransitionKind` number.
    pub(crate) kind: i32,
    /// Empty for the runtime build itself.
    pub(crate) project: String,
    /// The series' upstream.
    pub(crate) upstream: String,
    /// The series' platform.
    pub(crate) platform: String,
    /// The upstream commit of the result.
    pub(crate) upstream_commit: String,
    /// The last green upstream commit (exclusive end of the culprit range);
    /// empty when there was none.
    pub(crate) last_green_upstream_commit: String,
    /// Went red: the culprit range, oldest first, ending at `upstream_commit`.
    pub(crate) culprits: Vec<Commit>,
    /// The project commit of the result.
    pub(crate) project_commit: String,
    /// The project commit of the series' previous decisive result.
    pub(crate) previous_project_commit: String,
    /// The project's own commit changed since the last green run, too.
    pub(crate) project_commit_changed: bool,
    /// Tests that fail now and did not in the previous run.
    pub(crate) newly_failing: Vec<String>,
    /// The job of the result.
    pub(crate) job_id: u64,
    /// When it was recorded, ms.
    pub(crate) at_ms: u64,
    /// This is the series' first result.
    pub(crate) first: bool,
    /// A `v1::RunStatus` number: the result's.
    pub(crate) status: i32,
    /// Why the culprit range could not be listed, if it could not.
    pub(crate) culprits_error: String,
    /// Still red / fixed: the went-red transition this red spell began with.
    pub(crate) red_since_id: u64,
    /// The re-run that confirmed the result before it counted (0: it
    /// counted alone). Not written when 0.
    #[serde(skip_serializing_if = "is_zero")]
    pub(crate) confirmed_by_job: u64,
    /// What confirming the result found (see [`Class`]); `None` when it
    /// counted without being classed (older records). Not written when `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) class: Option<Class>,
    /// The bisection of a went-red (or suspicious) result's culprit range,
    /// when it has more than one commit: where it stands and what it found.
    /// Not written when `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) bisect: Option<Bisect>,
    /// Class suspicious: the counts in words ("20 passed → 0 passed, 20
    /// skipped"). Not written when empty.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(crate) suspicious: String,
    /// The upstream's branch when it was recorded (the default branch its
    /// poll found, when none is configured): what mails name. Empty in
    /// older records and when unknown. Not written when empty.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(crate) branch: String,
}

/// What a result that would change its series turned out to be, once its
/// re-runs are in (the signal-quality rules: `results::confirm`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Class {
    /// Fails again on the new runtime and passes on the series' last good
    /// one (the baseline), same project commit: the runtime broke it.
    Regressed,
    /// Passed on an identical re-run: not red; its failing tests are
    /// counted as flaky.
    Flaky,
    /// Failed for the machine's sake (timeout, out of memory, disk full,
    /// network, sandbox kill, agent lost): not red.
    Spurious,
    /// Fails on the baseline runtime too, and the project's own commit
    /// changed: the project broke itself (mailed to its maintainers, no
    /// upstream culprit).
    ProjectSide,
    /// Fails on both runtimes, the project unchanged: shown, not mailed as
    /// a regression.
    Broken,
    /// Green, but its JUnit shows far fewer tests executed (or far more
    /// skipped, or none reported) than the series' previous runs.
    Suspicious,
}

impl Class {
    /// The word shown and stored.
    pub(crate) fn word(self) -> &'static str {
        match self {
            Class::Regressed => "regressed",
            Class::Flaky => "flaky",
            Class::Spurious => "spurious",
            Class::ProjectSide => "project_side",
            Class::Broken => "broken",
            Class::Suspicious => "suspicious",
        }
    }
}

/// Where the bisection of a transition's culprit range stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum BisectState {
    /// Builds and runs inside the range are under way.
    #[default]
    Running,
    /// One commit is left: [`Bisect::first_bad`].
    Found,
    /// Commits that did not build leave several candidates:
    /// [`Bisect::candidates`].
    Range,
    /// It stopped without an answer ([`Bisect::detail`] says why: the
    /// build budget, the upstream no longer configured, …).
    GaveUp,
}

impl BisectState {
    /// The word shown.
    pub(crate) fn word(self) -> &'static str {
        match self {
            BisectState::Running => "running",
            BisectState::Found => "found",
            BisectState::Range => "range",
            BisectState::GaveUp => "gave_up",
        }
    }
}

/// A transition's bisection, as the transition shows it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct Bisect {
    /// Where it stands.
    pub(crate) state: BisectState,
    /// Found: the first bad commit.
    pub(crate) first_bad: Option<Commit>,
    /// Range: the commits one of which is the first bad one, oldest first.
    pub(crate) candidates: Vec<Commit>,
    /// Runtime builds it made (builds already stored are not counted).
    pub(crate) builds: u32,
    /// In words, for people (why it gave up, which commits did not build).
    pub(crate) detail: String,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl From<Commit> for v1::Commit {
    fn from(c: Commit) -> v1::Commit {
        let Commit {
            sha,
            subject,
            author,
            time_ms,
        } = c;
        v1::Commit {
            sha,
            subject,
            author,
            time_ms,
        }
    }
}

impl From<BuildInfo> for v1::BuildInfo {
    fn from(b: BuildInfo) -> v1::BuildInfo {
        let BuildInfo {
            upstream,
            platform,
            commit,
            job_id,
            state,
            artifact_sha256,
            created_at_ms,
            finished_at_ms,
            duration_ms,
            detail,
            fanned_out,
            head_seq,
            confirmation,
            confirmation_detail,
            waiting,
            phase,
        } = b;
        v1::BuildInfo {
            upstream,
            platform,
            commit,
            job_id,
            state,
            artifact_sha256,
            created_at_ms,
            finished_at_ms,
            duration_ms,
            detail,
            fanned_out,
            head_seq,
            confirmation,
            confirmation_detail,
            waiting,
            phase,
        }
    }
}

impl From<RunInfo> for v1::RunInfo {
    fn from(r: RunInfo) -> v1::RunInfo {
        let RunInfo {
            project,
            upstream,
            platform,
            upstream_commit,
            project_commit,
            status,
            outcome,
            job_id,
            duration_ms,
            finished_at_ms,
            detail,
            tests_total,
            tests_failed,
            tests_skipped,
            failing_tests,
            report_error,
            confirmation,
            confirmation_detail,
            suspicious,
        } = r;
        v1::RunInfo {
            project,
            upstream,
            platform,
            upstream_commit,
            project_commit,
            status,
            outcome,
            job_id,
            duration_ms,
            finished_at_ms,
            detail,
            tests_total,
            tests_failed,
            tests_skipped,
            failing_tests: failing_tests.into_iter().map(Into::into).collect(),
            report_error,
            confirmation,
            confirmation_detail,
            suspicious,
        }
    }
}

impl From<TestCase> for v1::TestCase {
    fn from(c: TestCase) -> v1::TestCase {
        let TestCase {
            name,
            status,
            time_ms,
            message,
        } = c;
        v1::TestCase {
            name,
            status,
            time_ms,
            message,
        }
    }
}

/// A case as the JUnit parser gives it, taken in to be stored.
impl From<v1::TestCase> for TestCase {
    fn from(c: v1::TestCase) -> TestCase {
        let v1::TestCase {
            name,
            status,
            time_ms,
            message,
        } = c;
        TestCase {
            name,
            status,
            time_ms,
            message,
        }
    }
}

impl crate::junit::Case for TestCase {
    fn name(&self) -> &str {
        &self.name
    }

    fn status(&self) -> i32 {
        self.status
    }
}

impl From<Transition> for v1::Transition {
    fn from(t: Transition) -> v1::Transition {
        let Transition {
            id,
            kind,
            project,
            upstream,
            platform,
            upstream_commit,
            last_green_upstream_commit,
            culprits,
            project_commit,
            previous_project_commit,
            project_commit_changed,
            newly_failing,
            job_id,
            at_ms,
            first,
            status,
            culprits_error,
            red_since_id,
            confirmed_by_job,
            class,
            bisect,
            suspicious,
            // Mails name it; the admin API's transitions do not (yet).
            branch: _,
        } = t;
        v1::Transition {
            id,
            kind,
            project,
            upstream,
            platform,
            upstream_commit,
            last_green_upstream_commit,
            culprits: culprits.into_iter().map(Into::into).collect(),
            project_commit,
            previous_project_commit,
            project_commit_changed,
            newly_failing,
            job_id,
            at_ms,
            first,
            status,
            culprits_error,
            red_since_id,
            confirmed_by_job,
            class: class.map(|c| c.word().to_owned()).unwrap_or_default(),
            bisect: bisect.map(Into::into),
            suspicious,
        }
    }
}

impl From<Bisect> for v1::BisectInfo {
    fn from(b: Bisect) -> v1::BisectInfo {
        let Bisect {
            state,
            first_bad,
            candidates,
            builds,
            detail,
        } = b;
        v1::BisectInfo {
            state: state.word().to_owned(),
            first_bad: first_bad.map(Into::into),
            candidates: candidates.into_iter().map(Into::into).collect(),
            builds,
            detail,
        }
    }
}
