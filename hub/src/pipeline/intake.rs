//! Intake: a finished pipeline job (its record, with spec and result) turned
//! into what [`crate::results`] records — a build, or a run with its JUnit
//! summary. Pure: what it needs from the store comes in as [`Facts`].

use trunkfarm_proto::v1::{BuildState, Outcome, RunStatus, TestStatus};

use crate::dispatch::JobRecord;
use crate::job_key::JobKey;
use crate::junit;
use crate::output::{self, Pattern};
use crate::results::{BuildInfo, Finished, RunInfo, RunRecord, TestCase, run_status};

/// Failing test cases kept in a run's summary (all cases are kept in its record).
const MAX_FAILING_IN_SUMMARY: usize = 200;

/// What the pipeline knows about a finished job besides its record.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Facts {
    /// When the job's upstream commit was the head (0: never).
    pub(super) head_seq: u64,
    /// Whether the artifact the result names is stored on the hub (builds).
    pub(super) artifact_stored: bool,
}

/// A project's output patterns and the finished run's log they judge (the
/// hub's stored log of the attempt that gave the result, bounded by the
/// output caps).
#[derive(Clone, Debug, Default)]
pub(super) struct Output {
    /// `[[project]] fail_pattern`.
    pub(super) fail: Option<Pattern>,
    /// `[[project]] pass_pattern`.
    pub(super) pass: Option<Pattern>,
    /// The run's output.
    pub(super) log: String,
    /// The log could not be read (its object is gone or damaged): the
    /// patterns are not checked, and the run's detail says so.
    pub(super) unreadable: bool,
}

/// What a run's detail says when its log could not be read.
pub(super) const UNREADABLE_LOG: &str =
    "its log could not be read, so fail_pattern/pass_pattern were not checked";

/// The build or run `rec` amounts to (`key` is its parsed pipeline key);
/// a run that passed by its exit code is red when its `output` says so
/// (the detail names the pattern). Parses the JUnit reports of a test and
/// matches patterns: CPU work, so call it off the async threads.
pub(super) fn finished(
    rec: &JobRecord,
    key: JobKey,
    facts: Facts,
    output: Option<&Output>,
) -> Finished {
    let result = rec.result.clone().unwrap_or_default();
    let outcome = Outcome::try_from(result.outcome).unwrap_or(Outcome::Error);
    match key {
        JobKey::Build {
            upstream,
            platform,
            commit,
            ..
        } => {
            let mut detail = result.detail;
            let state = match outcome {
                Outcome::Passed if !result.artifact_sha256.is_empty() && facts.artifact_stored => {
                    BuildState::Passed
                }
                Outcome::Passed => {
                    detail = "the build passed but its runtime artifact is not on the hub (upload lost?)".into();
                    BuildState::Error
                }
                Outcome::Failed | Outcome::TimedOut => BuildState::Failed,
                _ => BuildState::Error,
            };
            Finished::Build(BuildInfo {
                upstream,
                platform,
                commit,
                job_id: rec.id,
                state: state.into(),
                artifact_sha256: if state == BuildState::Passed {
                    result.artifact_sha256
                } else {
                    String::new()
                },
                created_at_ms: rec.created_at_ms,
                finished_at_ms: rec.finished_at_ms,
                duration_ms: result.duration_ms,
                detail,
                fanned_out: 0,
                head_seq: facts.head_seq,
                confirmation: String::new(),
                confirmation_detail: String::new(),
                waiting: String::new(),
                phase: String::new(),
            })
        }
        // A re-run is what it re-runs, a bisection's job what it builds or runs.
        JobKey::Rerun { of, .. } | JobKey::Bisect { of, .. } => finished(rec, *of, facts, output),
        JobKey::Test {
            project,
            upstream,
            platform,
            upstream_commit,
            project_commit,
            ..
        } => {
            let report = junit::parse_reports(&result.reports);
            let cases: Vec<TestCase> = report.cases.into_iter().map(TestCase::from).collect();
            let is = |c: &TestCase, s: TestStatus| c.status == s as i32;
            let failed: Vec<_> = cases
                .iter()
                .filter(|c| is(c, TestStatus::Failed) || is(c, TestStatus::Error))
                .cloned()
                .collect();
            let mut status = run_status(outcome);
            let mut detail = result.detail;
            if status == RunStatus::Green
                && let Some(o) = output
                && o.unreadable
            {
                detail = if detail.is_empty() {
                    UNREADABLE_LOG.to_owned()
                } else {
                    format!("{detail}; {UNREADABLE_LOG}")
                };
            } else if status == RunStatus::Green
                && let Some(o) = output
                && let Some(why) = output::judge(&o.log, o.fail.as_ref(), o.pass.as_ref())
            {
                status = RunStatus::Red;
                detail = if detail.is_empty() {
                    why
                } else {
                    format!("{detail}; {why}")
                };
            }
            let info = RunInfo {
                project,
                upstream,
                platform,
                upstream_commit,
                project_commit,
                status: status.into(),
                outcome: outcome.into(),
                job_id: rec.id,
                duration_ms: result.duration_ms,
                finished_at_ms: rec.finished_at_ms,
                detail,
                tests_total: cases.len() as u32,
                tests_failed: failed.len() as u32,
                tests_skipped: cases.iter().filter(|c| is(c, TestStatus::Skipped)).count() as u32,
                failing_tests: failed.into_iter().take(MAX_FAILING_IN_SUMMARY).collect(),
                report_error: report.errors.join("; "),
                confirmation: String::new(),
                confirmation_detail: String::new(),
                // The recorder judges it against the series (results::suspicious).
                suspicious: String::new(),
            };
            Finished::Run {
                run: RunRecord { info, cases },
                head_seq: facts.head_seq,
            }
        }
    }
}

/// [`finished`] when the report parser failed (it panicked): the run
/// without test cases, saying why.
pub(super) fn unparsed(
    rec: &JobRecord,
    key: JobKey,
    facts: Facts,
    output: Option<&Output>,
    why: &str,
) -> Finished {
    let mut rec = rec.clone();
    if let Some(result) = rec.result.as_mut() {
        result.reports.clear();
    }
    let mut finished = finished(&rec, key, facts, output);
    if let Finished::Run { run, .. } = &mut finished {
        run.info.report_error = format!("the report parser failed: {why}");
    }
    finished
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::{JobResultRecord, JobState, ReportFileRecord};
    use trunkfarm_proto::v1::RunStatus;

    fn record(outcome: Outcome, sha: &str, reports: Vec<ReportFileRecord>) -> JobRecord {
        JobRecord {
            id: 42,
            spec: Default::default(),
            max_attempts: 1,
            created_at_ms: 1,
            state: JobState::Finished,
            attempt: 1,
            agent_id: "a".into(),
            attempts: Vec::new(),
            result: Some(JobResultRecord {
                outcome: outcome.into(),
                artifact_sha256: sha.into(),
                duration_ms: 5,
                detail: "exit 0".into(),
                reports,
                ..Default::default()
            }),
            finished_at_ms: 9,
            cancel_requested: false,
            key: String::new(),
            placement: Default::default(),
        }
    }

    fn build_key() -> JobKey {
        JobKey::Build {
            upstream: "rt".into(),
            platform: "linux".into(),
            commit: "c1".into(),
            nonce: None,
        }
    }

    fn facts(artifact_stored: bool) -> Facts {
        Facts {
            head_seq: 3,
            artifact_stored,
        }
    }

    fn build_of(f: Finished) -> BuildInfo {
        match f {
            Finished::Build(b) => b,
            Finished::Run { .. } => panic!("a build key makes a build"),
        }
    }

    #[test]
    fn a_passed_build_counts_only_with_its_artifact_stored() {
        let b = build_of(finished(
            &record(Outcome::Passed, "aa", vec![]),
            build_key(),
            facts(true),
            None,
        ));
        assert_eq!(b.state, BuildState::Passed as i32);
        assert_eq!((b.artifact_sha256.as_str(), b.head_seq), ("aa", 3));
        let lost = build_of(finished(
            &record(Outcome::Passed, "aa", vec![]),
            build_key(),
            facts(false),
            None,
        ));
        assert_eq!(lost.state, BuildState::Error as i32);
        assert!(lost.artifact_sha256.is_empty());
        assert!(lost.detail.contains("not on the hub"), "{}", lost.detail);
        let timed_out = build_of(finished(
            &record(Outcome::TimedOut, "", vec![]),
            build_key(),
            facts(true),
            None,
        ));
        assert_eq!(timed_out.state, BuildState::Failed as i32);
        let cancelled = build_of(finished(
            &record(Outcome::Cancelled, "", vec![]),
            build_key(),
            facts(true),
            None,
        ));
        assert_eq!(cancelled.state, BuildState::Error as i32);
    }

    fn test_key() -> JobKey {
        JobKey::Test {
            project: "quiet".into(),
            upstream: "rt".into(),
            platform: "linux".into(),
            upstream_commit: "c1".into(),
            project_commit: String::new(),
            nonce: None,
        }
    }

    fn run_of(f: Finished) -> RunInfo {
        match f {
            Finished::Run { run, .. } => run.info,
            Finished::Build(_) => panic!("a test key makes a run"),
        }
    }

    #[test]
    fn a_run_that_exits_0_is_red_when_its_output_says_so() {
        let output = |fail: Option<&str>, pass: Option<&str>, log: &str| Output {
            fail: fail.map(|p| Pattern::new(p).unwrap()),
            pass: pass.map(|p| Pattern::new(p).unwrap()),
            log: log.into(),
            unreadable: false,
        };
        let passed = record(Outcome::Passed, "", vec![]);
        let log = "[ok] a\n[fail] b: expected 2, got 3\n";
        let judged = output(Some(r"\[fail\]"), None, log);
        let red = run_of(finished(&passed, test_key(), facts(true), Some(&judged)));
        assert_eq!(red.status, RunStatus::Red as i32);
        assert_eq!(red.outcome, Outcome::Passed as i32, "the job's own outcome");
        assert_eq!(
            red.detail,
            r#"exit 0; red by fail_pattern '\[fail\]', which matched line 2: "[fail] b: expected 2, got 3""#
        );
        // Without the pattern, or when it matches nothing, it is green.
        let green = run_of(finished(&passed, test_key(), facts(true), None));
        assert_eq!(green.status, RunStatus::Green as i32);
        let quiet = output(Some(r"\[fail\]"), None, "[ok] a\n");
        let green = run_of(finished(&passed, test_key(), facts(true), Some(&quiet)));
        assert_eq!(
            (green.status, green.detail.as_str()),
            (RunStatus::Green as i32, "exit 0")
        );
        // A pass pattern the output does not match.
        let unfinished = output(None, Some(r"^\d+ passed$"), "[ok] a\n");
        let red = run_of(finished(
            &passed,
            test_key(),
            facts(true),
            Some(&unfinished),
        ));
        assert_eq!(red.status, RunStatus::Red as i32);
        assert!(red.detail.contains("pass_pattern"), "{}", red.detail);
        // A re-run is judged the same way; a failed exit stays red.
        let rerun = JobKey::Rerun {
            of: Box::new(test_key()),
            kind: crate::job_key::RerunKind::Confirm,
            job: 42,
            n: 1,
        };
        let red = run_of(finished(&passed, rerun, facts(true), Some(&judged)));
        assert_eq!(red.status, RunStatus::Red as i32);
        let failed = record(Outcome::Failed, "", vec![]);
        let red = run_of(finished(&failed, test_key(), facts(true), Some(&quiet)));
        assert_eq!(
            (red.status, red.detail.as_str()),
            (RunStatus::Red as i32, "exit 0")
        );
    }

    #[test]
    fn a_run_summarises_its_junit_reports() {
        let xml = br#"<testsuite name="s">
            <testcase classname="s" name="ok"/>
            <testcase classname="s" name="bad"><failure message="no"/></testcase>
            <testcase classname="s" name="later"><skipped/></testcase>
        </testsuite>"#;
        let reports = vec![
            ReportFileRecord {
                path: "junit.xml".into(),
                data: xml.to_vec(),
                ..Default::default()
            },
            ReportFileRecord {
                path: "broken.xml".into(),
                data: b"<testsuite".to_vec(),
                ..Default::default()
            },
        ];
        let key = JobKey::Test {
            project: "adder".into(),
            upstream: "rt".into(),
            platform: "linux".into(),
            upstream_commit: "c1".into(),
            project_commit: String::new(),
            nonce: Some(7),
        };
        let Finished::Run { run, head_seq, .. } = finished(
            &record(Outcome::Failed, "", reports),
            key,
            facts(true),
            None,
        ) else {
            panic!("a test key makes a run");
        };
        let i = &run.info;
        assert_eq!(head_seq, 3);
        assert_eq!(i.status, RunStatus::Red as i32);
        assert_eq!((i.tests_total, i.tests_failed, i.tests_skipped), (3, 1, 1));
        assert_eq!(i.failing_tests.len(), 1);
        assert!(i.failing_tests[0].name.contains("bad"));
        assert!(i.report_error.contains("broken.xml"), "{}", i.report_error);
        assert_eq!(run.cases.len(), 3);
        assert_eq!((i.job_id, i.finished_at_ms), (42, 9));
    }
}
