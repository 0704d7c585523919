//! Know the noise: per project and per test, how often a result flipped on
//! an *identical* re-run (same project commit, same runtime), stored under
//! `n/<project>` (see `keys.rs`). A test that flipped often enough is
//! *known flaky* ([`FlakyRule`]); a went-red whose failing tests are all
//! known flaky does not turn its project red alone ([`excused`]), so a
//! flaky test stops paging people once the hub has seen it flip.
//!
//! Pure: [`Noise::observe`], [`excused`]. The store side is the `impl
//! Results` below: [`Results::stage_noise`] (idempotent per re-run job: a
//! re-delivered re-run is not counted twice; only pairs of trusted agents'
//! results are counted, so a volunteer's lies cannot make a test known
//! flaky and its real failures excused), the recorder's question
//! [`Results::excuse_flaky`], and calibration runs (`trunkfarm calibrate`:
//! the same job re-run N times, each counted against it, stored under
//! `k/<job>/<n>`, never classified).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use trunkfarm_proto::v1::{self, RunStatus, TestStatus, TransitionKind};

use super::classify::Verdict;
use super::{Class, Recorded, Results, RunInfo, RunRecord, keys};
use crate::store::StoreError;

/// How often a project's results, and each of its tests, flipped on
/// identical re-runs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct Noise {
    /// Identical re-runs observed (pairs of decisive results).
    pub(crate) runs: u64,
    /// Of those, pairs where one was green and the other red.
    pub(crate) flips: u64,
    /// Per test name (as the JUnit report names it).
    pub(crate) tests: BTreeMap<String, TestNoise>,
}

/// One test's re-run pairs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct TestNoise {
    /// Pairs in which it ran (passed or failed) both times.
    pub(crate) runs: u64,
    /// Of those, pairs where it passed once and failed once.
    pub(crate) flips: u64,
    /// When it last flipped (the later run's finish time), ms.
    pub(crate) last_flip_ms: u64,
}

/// `[[project]] flaky_after` and `flaky_counts_alone`: when a test is
/// known flaky, and whether known flaky tests still turn a project red
/// alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FlakyRule {
    /// Flips on identical re-runs that make a test known flaky (0: never).
    pub(crate) after: u32,
    /// Known flaky tests failing alone still turn the project red.
    pub(crate) counts_alone: bool,
}

impl Default for FlakyRule {
    fn default() -> Self {
        FlakyRule {
            after: 2,
            counts_alone: false,
        }
    }
}

impl FlakyRule {
    /// Whether `t` is known flaky under this rule.
    pub(crate) fn known_flaky(self, t: &TestNoise) -> bool {
        self.after > 0 && t.flips >= u64::from(self.after)
    }
}

/// A decisive result's colour (`None`: an error decides nothing).
fn red(info: &RunInfo) -> Option<bool> {
    match RunStatus::try_from(info.status) {
        Ok(RunStatus::Green) => Some(false),
        Ok(RunStatus::Red) => Some(true),
        _ => None,
    }
}

/// Each test that ran (passed or failed, not skipped) → whether it failed.
fn ran(run: &RunRecord) -> BTreeMap<&str, bool> {
    run.cases
        .iter()
        .filter_map(|c| match TestStatus::try_from(c.status) {
            Ok(TestStatus::Passed) => Some((c.name.as_str(), false)),
            Ok(TestStatus::Failed | TestStatus::Error) => Some((c.name.as_str(), true)),
            _ => None,
        })
        .collect()
}

impl Noise {
    /// Counts one identical re-run pair: `a` and `b` ran the same project
    /// commit on the same runtime. Returns whether it counted (both
    /// decisive: an infrastructure error says nothing about the tests).
    pub(crate) fn observe(&mut self, a: &RunRecord, b: &RunRecord) -> bool {
        let (Some(red_a), Some(red_b)) = (red(&a.info), red(&b.info)) else {
            return false;
        };
        self.runs += 1;
        if red_a != red_b {
            self.flips += 1;
        }
        let at = a.info.finished_at_ms.max(b.info.finished_at_ms);
        let later = ran(b);
        for (name, failed_a) in ran(a) {
            let Some(failed_b) = later.get(name) else {
                continue;
            };
            let t = self.tests.entry(name.to_owned()).or_default();
            t.runs += 1;
            if failed_a != *failed_b {
                t.flips += 1;
                t.last_flip_ms = at;
            }
        }
        true
    }

    /// The tests known flaky under `rule`, most flips first.
    pub(crate) fn flaky(&self, rule: FlakyRule) -> Vec<(&str, &TestNoise)> {
        let mut out: Vec<_> = self
            .tests
            .iter()
            .filter(|(_, t)| rule.known_flaky(t))
            .map(|(n, t)| (n.as_str(), t))
            .collect();
        out.sort_by(|a, b| b.1.flips.cmp(&a.1.flips).then(a.0.cmp(b.0)));
        out
    }
}

/// A project's noise as the admin API shows it: every test that flipped at
/// least once, most flips first.
pub(crate) fn wire(project: &str, noise: &Noise, rule: FlakyRule) -> v1::ProjectNoise {
    let mut tests: Vec<v1::TestNoise> = noise
        .tests
        .iter()
        .filter(|(_, t)| t.flips > 0)
        .map(|(name, t)| v1::TestNoise {
            name: name.clone(),
            runs: t.runs,
            flips: t.flips,
            last_flip_ms: t.last_flip_ms,
            known_flaky: rule.known_flaky(t),
        })
        .collect();
    tests.sort_by(|a, b| b.flips.cmp(&a.flips).then_with(|| a.name.cmp(&b.name)));
    v1::ProjectNoise {
        project: project.to_owned(),
        runs: noise.runs,
        flips: noise.flips,
        flaky_after: rule.after,
        tests,
    }
}

/// Whether a red result failing `failing` (every failing test's name) is
/// excused under `rule`: every one of them is known flaky, and known flaky
/// tests do not count alone. A red result without failing test names (no
/// JUnit, a crash) is never excused.
pub(crate) fn excused(noise: &Noise, rule: FlakyRule, failing: &[String]) -> bool {
    !rule.counts_alone
        && !failing.is_empty()
        && failing
            .iter()
            .all(|f| noise.tests.get(f).is_some_and(|t| rule.known_flaky(t)))
}

impl Results {
    /// A project's noise record (empty when nothing was observed yet).
    pub(crate) fn noise(&self, project: &str) -> Result<Noise, StoreError> {
        Ok(self.table.get(keys::noise(project))?.unwrap_or_default())
    }

    /// Stages into `batch` the identical re-run pair (`a`, then its re-run
    /// `b`: same project commit, same runtime) counted in `a`'s project's
    /// noise record, once per re-run job (`b`'s id): false when it was
    /// counted before or says nothing (an infrastructure error). Call
    /// holding the recording lock, once per batch (the record is read from
    /// the tree, not from the batch).
    pub(crate) fn stage_noise(
        &self,
        batch: &mut crate::store::Batch,
        a: &RunRecord,
        b: &RunRecord,
    ) -> Result<bool, StoreError> {
        let marker = keys::noise_counted(b.info.job_id);
        if self.table.contains(&marker)? {
            return Ok(false);
        }
        let mut noise = self.noise(&a.info.project)?;
        if !noise.observe(a, b) {
            return Ok(false);
        }
        self.table
            .stage(batch, keys::noise(&a.info.project), &noise)?;
        batch.insert(marker.as_bytes(), &[][..]);
        Ok(true)
    }

    /// The recorder's question before a went red is held or stored: when
    /// every failing test of the run is known flaky under its project's
    /// rule, the verdict leaves the series as it was, classed flaky.
    pub(super) fn excuse_flaky(&self, verdict: Option<&mut Verdict>) -> Result<(), StoreError> {
        let Some(v) = verdict else {
            return Ok(());
        };
        let t = &v.transition;
        if t.kind != TransitionKind::WentRed as i32 || t.project.is_empty() {
            return Ok(());
        }
        let rule = self.flaky_rule(&t.project);
        let noise = self.noise(&t.project)?;
        if excused(&noise, rule, &v.decisive.failing) {
            v.leave_series(Class::Flaky);
        }
        Ok(())
    }

    /// Records calibration run `n` of job `original` once (the inbox may
    /// hand it over again): stores it under `k/<original>/<n>` and, when
    /// both runs came from trusted agents (`trusted_pair`: a volunteer's
    /// word does not measure noise), counts it against the original run in
    /// the noise record, in one atomic write with its "recorded" marker.
    /// Not classified: no transition, the series untouched.
    pub(crate) async fn record_calibration(
        &self,
        original: u64,
        n: u32,
        run: RunRecord,
        trusted_pair: bool,
    ) -> Result<Recorded, StoreError> {
        let _one = self.recording.lock().await;
        let job_id = run.info.job_id;
        if self.recorded(job_id)? {
            return Ok(Recorded::Already);
        }
        let i = &run.info;
        let before = self.run(&i.project, &i.upstream, &i.platform, original)?;
        {
            let _w = self.write_lock();
            let mut batch = crate::store::Batch::default();
            if let (Some(a), true) = (&before, trusted_pair) {
                self.stage_noise(&mut batch, a, &run)?;
            }
            self.table
                .stage(&mut batch, keys::calibration_run(original, n), &run)?;
            batch.insert(keys::recorded(job_id).as_bytes(), &[][..]);
            self.table.apply(batch)?;
        }
        self.table.store().commit().await?;
        Ok(Recorded::New(None))
    }

    /// The calibration runs of job `original` recorded so far, by number.
    pub(crate) fn calibration(&self, original: u64) -> Result<Vec<(u32, RunRecord)>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .table
            .scan::<RunRecord>(keys::calibration_runs(original))
        {
            let (k, run) = item?;
            let key = String::from_utf8_lossy(&k);
            let n = key.rsplit('/').next().and_then(|n| n.parse().ok());
            out.push((n.unwrap_or(0), run));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::TestCase;

    fn run(status: RunStatus, cases: &[(&str, TestStatus)]) -> RunRecord {
        RunRecord {
            info: RunInfo {
                status: status.into(),
                finished_at_ms: 7,
                ..Default::default()
            },
            cases: cases
                .iter()
                .map(|(n, s)| TestCase {
                    name: (*n).into(),
                    status: (*s).into(),
                    ..Default::default()
                })
                .collect(),
        }
    }

    #[test]
    fn a_flip_on_an_identical_rerun_is_counted_per_project_and_per_test() {
        use TestStatus::*;
        let red = run(
            RunStatus::Red,
            &[("t.flaky", Failed), ("t.ok", Passed), ("t.skip", Skipped)],
        );
        let green = run(
            RunStatus::Green,
            &[("t.flaky", Passed), ("t.ok", Passed), ("t.skip", Passed)],
        );
        let error = run(RunStatus::Error, &[]);
        let mut n = Noise::default();
        assert!(n.observe(&red, &green));
        assert!(n.observe(&green, &green));
        assert!(!n.observe(&red, &error), "an error says nothing");
        assert_eq!((n.runs, n.flips), (2, 1));
        let flaky = &n.tests["t.flaky"];
        assert_eq!((flaky.runs, flaky.flips, flaky.last_flip_ms), (2, 1, 7));
        assert_eq!((n.tests["t.ok"].runs, n.tests["t.ok"].flips), (2, 0));
        assert_eq!(
            n.tests["t.skip"].runs, 1,
            "a skipped test did not run: only the green pair counts"
        );
    }

    #[test]
    fn only_known_flaky_tests_failing_alone_are_excused() {
        let mut n = Noise::default();
        n.tests.insert(
            "t.flaky".into(),
            TestNoise {
                runs: 5,
                flips: 2,
                last_flip_ms: 1,
            },
        );
        n.tests.insert(
            "t.once".into(),
            TestNoise {
                runs: 5,
                flips: 1,
                last_flip_ms: 1,
            },
        );
        let rule = FlakyRule::default();
        let names = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert!(excused(&n, rule, &names(&["t.flaky"])));
        assert!(!excused(&n, rule, &names(&["t.flaky", "t.once"])));
        assert!(!excused(&n, rule, &names(&["t.flaky", "t.new"])));
        assert!(!excused(&n, rule, &[]), "no test names: never excused");
        let alone = FlakyRule {
            counts_alone: true,
            ..rule
        };
        assert!(!excused(&n, alone, &names(&["t.flaky"])));
        let strict = FlakyRule { after: 3, ..rule };
        assert!(!excused(&n, strict, &names(&["t.flaky"])));
        let off = FlakyRule { after: 0, ..rule };
        assert!(!excused(&n, off, &names(&["t.flaky"])));
        assert_eq!(
            n.flaky(rule).iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            ["t.flaky"]
        );
    }
}
