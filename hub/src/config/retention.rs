//! `[retention]`: how long the hub keeps what piles up with every job (run
//! summaries, their test cases, logs, finished job records) and how often
//! `retention.rs` prunes it. What a latest result, an open transition, a
//! running bisection or the dashboard still shows is kept whatever these say.

use std::time::Duration;

use serde::Deserialize;
use trunkfarm_proto::settings::{Problem, fmt_duration};

use super::de;

const DAY: u64 = 24 * 60 * 60;

/// `[retention]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [retention] table")]
pub(crate) struct RetentionSection {
    /// Every run's summary is kept this long after it finished.
    #[serde(deserialize_with = "de::duration")]
    pub(crate) runs: Duration,
    /// …and each series' newest `keep_last` runs whatever their age.
    #[serde(deserialize_with = "de::count")]
    pub(crate) keep_last: u32,
    /// A run's per-test cases are kept this long (then only its summary,
    /// with the failing tests' names, stays).
    #[serde(deserialize_with = "de::duration")]
    pub(crate) test_cases: Duration,
    /// A finished job's log is kept this long.
    #[serde(deserialize_with = "de::duration")]
    pub(crate) logs: Duration,
    /// A finished job's dispatch record (spec, attempts, result) is kept
    /// this long.
    #[serde(deserialize_with = "de::duration")]
    pub(crate) jobs: Duration,
    /// How often pruning looks for what expired.
    #[serde(deserialize_with = "de::duration")]
    pub(crate) interval: Duration,
}

impl Default for RetentionSection {
    fn default() -> Self {
        Self {
            runs: Duration::from_secs(180 * DAY),
            keep_last: 50,
            test_cases: Duration::from_secs(30 * DAY),
            logs: Duration::from_secs(90 * DAY),
            jobs: Duration::from_secs(180 * DAY),
            interval: Duration::from_secs(10 * 60),
        }
    }
}

/// The section's rules; `bisecting`: bisection is on
/// (`pipeline.bisect_max_builds` > 0), so job records must outlive the
/// longest bisection.
pub(super) fn problems(r: &RetentionSection, bisecting: bool) -> Result<(), Problem> {
    for (key, d, example) in [
        ("retention.runs", r.runs, "180d"),
        ("retention.test_cases", r.test_cases, "30d"),
        ("retention.logs", r.logs, "90d"),
        ("retention.jobs", r.jobs, "180d"),
        ("retention.interval", r.interval, "10m"),
    ] {
        if d.is_zero() {
            return Err(Problem::new(
                key,
                format!("must be greater than zero, e.g. \"{example}\""),
            ));
        }
    }
    if r.keep_last < 1 {
        return Err(Problem::new(
            "retention.keep_last",
            "must be at least 1 (each series' latest result is always kept), e.g. 50",
        ));
    }
    if r.test_cases > r.runs {
        return Err(Problem::new(
            "retention.test_cases",
            format!(
                "{} is longer than `retention.runs` ({}); a run's test cases go with the run, so keep them at most as long",
                fmt_duration(r.test_cases),
                fmt_duration(r.runs),
            ),
        ));
    }
    let bisection = Duration::from_millis(crate::pipeline::MAX_BISECTION_MS);
    if bisecting && r.jobs < bisection {
        return Err(Problem::new(
            "retention.jobs",
            format!(
                "{} is too short; expected at least {}, the longest a bisection runs (it reads its jobs' records until it answers), or turn bisection off (`pipeline.bisect_max_builds = 0`)",
                fmt_duration(r.jobs),
                fmt_duration(bisection),
            ),
        ));
    }
    if r.logs > r.jobs {
        return Err(Problem::new(
            "retention.logs",
            format!(
                "{} is longer than `retention.jobs` ({}); a job's log goes with its record, so keep it at most as long",
                fmt_duration(r.logs),
                fmt_duration(r.jobs),
            ),
        ));
    }
    Ok(())
}
