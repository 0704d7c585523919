//! Green is not always green: a run that passes while its JUnit shows far
//! fewer tests executed than the series' previous runs (or far more
//! skipped, or none reported by a suite that used to report tests) is
//! *suspicious* — the original Python-trunk farm's best catch was a suite
//! that started skipping every test after a trunk change, still "green".
//!
//! [`suspicious`] is the pure predicate (a bisection judges a commit with
//! it too); [`watch`] applies it to a verdict as the recorder stores it:
//! the first suspicious green of a spell becomes a transition of class
//! suspicious (still green: the series stays green) carrying the counts in
//! words, later ones of the same spell are only marked on their run, and
//! the counts of suspicious runs never become the baseline.

use serde::{Deserialize, Serialize};
use trunkfarm_proto::v1::{RunStatus, TransitionKind};

use super::classify::{SeriesState, Verdict};
use super::{Class, Finished, RunInfo};

/// How many previous runs' counts a series remembers as its baseline.
pub(crate) const BASELINE_RUNS: usize = 5;

/// A run's JUnit counts, as the baseline remembers them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct Counts {
    /// Cases reported.
    pub(crate) total: u32,
    /// Of those, skipped.
    pub(crate) skipped: u32,
    /// Of those, failed or errored.
    pub(crate) failed: u32,
}

impl Counts {
    /// A run's counts.
    pub(crate) fn of(info: &RunInfo) -> Counts {
        Counts {
            total: info.tests_total,
            skipped: info.tests_skipped,
            failed: info.tests_failed,
        }
    }

    /// Tests that ran (not skipped).
    fn executed(self) -> u32 {
        self.total.saturating_sub(self.skipped)
    }

    /// Tests that passed.
    fn passed(self) -> u32 {
        self.executed().saturating_sub(self.failed)
    }

    /// "20 passed", "0 passed, 20 skipped", "no tests reported".
    fn words(self) -> String {
        if self.total == 0 {
            return "no tests reported".into();
        }
        let mut s = format!("{} passed", self.passed());
        if self.failed > 0 {
            s.push_str(&format!(", {} failed", self.failed));
        }
        if self.skipped > 0 {
            s.push_str(&format!(", {} skipped", self.skipped));
        }
        s
    }
}

/// The median of `values` (the upper one of an even count); 0 when empty.
fn median(mut values: Vec<u32>) -> u32 {
    values.sort_unstable();
    values.get(values.len() / 2).copied().unwrap_or(0)
}

/// Whether a green run's counts `now` are suspicious against the counts of
/// the series' previous runs (`before`, any order): the tests executed fell
/// below half of their median, the skipped ones rose to more than twice
/// theirs (by at least 2 and a quarter of the usual total), or the suite
/// reports no test where it used to. Returns the counts in words
/// ("20 passed → 0 passed, 20 skipped"), `None` when nothing looks wrong
/// (or there is nothing to compare with).
pub(crate) fn suspicious(before: &[Counts], now: Counts) -> Option<String> {
    if before.is_empty() {
        return None;
    }
    let column = |f: fn(Counts) -> u32| median(before.iter().map(|c| f(*c)).collect());
    let usual = Counts {
        total: column(|c| c.total),
        skipped: column(|c| c.skipped),
        failed: column(|c| c.failed),
    };
    let executed = column(Counts::executed);
    let none = usual.total > 0 && now.total == 0;
    let fell = executed > 0 && now.executed().saturating_mul(2) < executed;
    let rise = now.skipped.saturating_sub(usual.skipped);
    let rose = now.skipped > usual.skipped.saturating_mul(2) && rise >= (usual.total / 4).max(2);
    (none || fell || rose).then(|| format!("{} → {}", usual.words(), now.words()))
}

/// Applies [`suspicious`] to a run's `verdict` as it is about to be
/// stored, and moves the series' baseline in `state` on: a suspicious
/// green run is marked on its run (`RunInfo::suspicious`); the first of a
/// spell (the series was not suspicious already) makes the transition one
/// of class suspicious with the counts in words. Any other classified run
/// ends the spell and joins the baseline; so does the run after
/// [`BASELINE_RUNS`] suspicious ones in a row, whose counts then become the
/// only baseline (a suite that really shrank is not marked forever).
/// Builds, results deciding nothing and runs whose report could not be
/// read are left alone.
pub(super) fn watch(
    state: &mut SeriesState,
    verdict: Option<&mut Verdict>,
    finished: &mut Finished,
) {
    let (Some(v), Finished::Run { run, .. }) = (verdict, finished) else {
        return;
    };
    if !run.info.report_error.is_empty() {
        return;
    }
    let now = Counts::of(&run.info);
    let green = v.transition.status == RunStatus::Green as i32;
    let detail = green.then(|| suspicious(&state.baseline, now)).flatten();
    let Some(detail) = detail else {
        state.suspicious = 0;
        learn(state, now);
        return;
    };
    if state.suspicious as usize >= BASELINE_RUNS {
        // The spell lasted (and was mailed when it began): these counts
        // are the usual ones now.
        state.suspicious = 0;
        state.baseline.clear();
        learn(state, now);
        return;
    }
    run.info.suspicious = detail.clone();
    let t = &mut v.transition;
    if state.suspicious == 0 && t.kind == TransitionKind::StillGreen as i32 && t.class.is_none() {
        t.class = Some(Class::Suspicious);
        t.suspicious = detail;
    }
    state.suspicious += 1;
}

/// Adds a run's counts to the series' baseline (the newest
/// [`BASELINE_RUNS`] are kept).
fn learn(state: &mut SeriesState, now: Counts) {
    state.baseline.push(now);
    let over = state.baseline.len().saturating_sub(BASELINE_RUNS);
    state.baseline.drain(..over);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(total: u32, skipped: u32, failed: u32) -> Counts {
        Counts {
            total,
            skipped,
            failed,
        }
    }

    #[test]
    fn fewer_tests_executed_more_skipped_or_none_reported_is_suspicious() {
        let usual = [c(20, 0, 0), c(20, 0, 0), c(21, 1, 0)];
        assert_eq!(
            suspicious(&usual, c(20, 20, 0)).as_deref(),
            Some("20 passed → 0 passed, 20 skipped")
        );
        assert_eq!(
            suspicious(&usual, c(0, 0, 0)).as_deref(),
            Some("20 passed → no tests reported")
        );
        assert_eq!(
            suspicious(&usual, c(8, 0, 0)).as_deref(),
            Some("20 passed → 8 passed"),
            "fewer than half of the tests ran"
        );
        assert_eq!(
            suspicious(&[c(100, 0, 0)], c(100, 10, 0)).as_deref(),
            None,
            "90 of 100 still ran, 10 skipped is not a quarter"
        );
        assert_eq!(
            suspicious(&[c(100, 2, 0)], c(100, 40, 0)).as_deref(),
            Some("98 passed, 2 skipped → 60 passed, 40 skipped"),
            "skipped rose sharply"
        );
        assert_eq!(suspicious(&usual, c(19, 1, 0)), None, "ordinary wobble");
        assert_eq!(suspicious(&usual, c(40, 0, 0)), None, "more tests is fine");
        assert_eq!(suspicious(&[], c(0, 0, 0)), None, "nothing to compare");
        assert_eq!(
            suspicious(&[c(0, 0, 0)], c(0, 0, 0)),
            None,
            "a project without JUnit never is"
        );
        assert_eq!(
            suspicious(&[c(4, 0, 0)], c(4, 1, 0)),
            None,
            "one more skipped of a small suite is not sharp"
        );
    }
}
