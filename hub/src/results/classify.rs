//! The pure part of recording: what a finished build or run amounts to
//! against its series (went red, still red, fixed, still green), and how the
//! series moves on. No store, no clock, no git: [`judge`] takes the series'
//! state and the result, and says what to store.

use serde::{Deserialize, Serialize};
use trunkfarm_proto::v1::{BuildState, Outcome, RunStatus, TransitionKind};

use super::{Class, Finished, Transition, keys};

/// What a series remembers between results.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct SeriesState {
    /// Ordering of the last classified result: (the upstream commit's head
    /// sequence, test job id). A result older than this (finished out of
    /// order) is stored but not classified, so a slow old run cannot flip
    /// the series back.
    pub(crate) order: (u64, u64),
    /// The last decisive result.
    pub(crate) last: Option<Decisive>,
    /// The last green result's commits: the culprit range starts after it.
    pub(crate) last_green: Option<Commits>,
    /// The went-red transition the series is red since.
    pub(crate) red_since: Option<u64>,
    /// Verdicts of this series held for confirmation: (the held job, its
    /// order). While one is held, a newer result that would not change the
    /// series (still green, still red) is stored but not classified: moving
    /// the series past the held verdict would make it "late" once confirmed,
    /// so a real went-red (or fixed) would be lost to a later result that
    /// counted alone.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) awaiting: Vec<(u64, (u64, u64))>,
    /// How often a result of this series was classed flaky between trusted
    /// agents alone (see `confirm.rs`: a volunteer contradicted by a re-run
    /// of a series that flips in honest hands is not held to it).
    #[serde(skip_serializing_if = "is_zero")]
    pub(crate) flaky_on_trusted: u32,
    /// The JUnit counts of its last runs that were not suspicious, oldest
    /// first (at most `suspicious::BASELINE_RUNS`): what a green run's
    /// counts are compared with (`suspicious.rs`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) baseline: Vec<super::suspicious::Counts>,
    /// Suspicious greens in a row up to its last classified run (the
    /// spell): a spell is mailed once, when it begins.
    #[serde(skip_serializing_if = "is_zero")]
    pub(crate) suspicious: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl SeriesState {
    /// The went-red transition the series is red since, if it is red now.
    pub(crate) fn red_now(&self) -> Option<u64> {
        self.red_since
            .filter(|_| self.last.as_ref().is_some_and(|l| l.red))
    }
}

/// A decisive (green or red) result, as the next one is compared with.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct Decisive {
    /// Green or red.
    pub(crate) red: bool,
    /// Its commits.
    pub(crate) commits: Commits,
    /// Its failing test names (from JUnit), sorted.
    pub(crate) failing: Vec<String>,
}

/// The upstream and project commits a result was produced at.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct Commits {
    /// Upstream commit.
    pub(crate) upstream: String,
    /// Project commit (empty for builds or when unknown).
    pub(crate) project: String,
}

/// The status a job outcome gives a run.
pub(crate) fn run_status(outcome: Outcome) -> RunStatus {
    match outcome {
        Outcome::Passed => RunStatus::Green,
        Outcome::Failed | Outcome::TimedOut => RunStatus::Red,
        Outcome::Error | Outcome::Cancelled | Outcome::Unspecified => RunStatus::Error,
    }
}

/// The status a build's state gives its series.
fn build_status(state: i32) -> RunStatus {
    match BuildState::try_from(state).unwrap_or(BuildState::Error) {
        BuildState::Passed => RunStatus::Green,
        BuildState::Failed => RunStatus::Red,
        _ => RunStatus::Error,
    }
}

/// A result that decides something: the transition to store (its id, time
/// and culprits still unset) and where the series goes.
#[derive(Debug)]
pub(super) struct Verdict {
    pub(super) transition: Transition,
    pub(super) decisive: Decisive,
    pub(super) order: (u64, u64),
    /// Whether the series moves past it (not for a result classed flaky or
    /// spurious: see [`Verdict::leave_series`]).
    pub(super) advances: bool,
}

/// The upstream range `(from, to]` whose commits are a went-red result's
/// culprits. Without `from` (no green result yet) only `to` is listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CulpritRange {
    /// The upstream whose commits these are.
    pub(crate) upstream: String,
    /// The last green result's upstream commit.
    pub(crate) from: Option<String>,
    /// The commit that went red.
    pub(crate) to: String,
}

impl Verdict {
    /// Whether it changes the series (went red or fixed): what a verdict
    /// that needs confirming may do only once a re-run agrees.
    pub(super) fn changes_series(&self) -> bool {
        let k = self.transition.kind;
        k == TransitionKind::WentRed as i32 || k == TransitionKind::Fixed as i32
    }

    /// Classed flaky or spurious: stored as a transition that leaves the
    /// series as it was (a went red becomes still green, a fixed still
    /// red), keeping the failing tests; the series does not move past it.
    pub(super) fn leave_series(&mut self, class: Class) {
        let t = &mut self.transition;
        t.class = Some(class);
        if t.kind == TransitionKind::WentRed as i32 {
            t.kind = TransitionKind::StillGreen.into();
        } else if t.kind == TransitionKind::Fixed as i32 {
            t.kind = TransitionKind::StillRed.into();
        }
        t.project_commit_changed = false;
        self.advances = false;
    }

    /// The range to list as culprits, when the result went red because of
    /// the upstream: not when its re-runs found the project broke itself or
    /// is broken on the last good runtime too (no upstream commit is blamed);
    /// and for the first suspicious green of a spell (since the last usual run).
    pub(super) fn culprit_range(&self) -> Option<CulpritRange> {
        let t = &self.transition;
        let own = matches!(t.class, Some(Class::ProjectSide | Class::Broken));
        let suspicious = t.class == Some(Class::Suspicious);
        ((t.kind == TransitionKind::WentRed as i32 && !own) || suspicious).then(|| CulpritRange {
            upstream: t.upstream.clone(),
            from: (!t.last_green_upstream_commit.is_empty())
                .then(|| t.last_green_upstream_commit.clone()),
            to: t.upstream_commit.clone(),
        })
    }
}

/// The series a result belongs to.
pub(super) fn series_of(finished: &Finished) -> String {
    match finished {
        Finished::Build(b) => keys::build_series(&b.upstream, &b.platform),
        Finished::Run { run, .. } => {
            let i = &run.info;
            keys::run_series(&i.project, &i.upstream, &i.platform)
        }
    }
}

/// What `finished` amounts to against its series' `state`. `None` when it
/// decides nothing: an infrastructure error, a result of a commit that never
/// was the upstream's head (`head_seq` 0), or one older than the last
/// classified result.
pub(super) fn judge(state: &SeriesState, finished: &Finished) -> Option<Verdict> {
    let (status, order, commits, failing) = match finished {
        Finished::Build(b) => (
            build_status(b.state),
            (b.head_seq, 0),
            Commits {
                upstream: b.commit.clone(),
                project: String::new(),
            },
            Vec::new(),
        ),
        Finished::Run { run, head_seq, .. } => {
            let i = &run.info;
            (
                RunStatus::try_from(i.status).unwrap_or(RunStatus::Error),
                (*head_seq, i.job_id),
                Commits {
                    upstream: i.upstream_commit.clone(),
                    project: i.project_commit.clone(),
                },
                // All cases, not the summary's capped list.
                crate::junit::failing(&run.cases),
            )
        }
    };
    if order.0 == 0 {
        return None;
    }
    let (mut transition, decisive) = classify(state, status, order, &commits, &failing)?;
    match finished {
        Finished::Build(b) => {
            transition.upstream = b.upstream.clone();
            transition.platform = b.platform.clone();
            transition.job_id = b.job_id;
        }
        Finished::Run { run, .. } => {
            let i = &run.info;
            transition.project = i.project.clone();
            transition.upstream = i.upstream.clone();
            transition.platform = i.platform.clone();
            transition.job_id = i.job_id;
        }
    }
    Some(Verdict {
        transition,
        decisive,
        order,
        advances: true,
    })
}

/// Compares a result with its series' last decisive one. `None` when the
/// result decides nothing (an infrastructure error) or is older than the
/// last classified one (it finished out of order).
fn classify(
    state: &SeriesState,
    status: RunStatus,
    order: (u64, u64),
    commits: &Commits,
    failing: &[String],
) -> Option<(Transition, Decisive)> {
    let red = match status {
        RunStatus::Green => false,
        RunStatus::Red => true,
        RunStatus::Error | RunStatus::Unspecified => return None,
    };
    if order < state.order {
        return None;
    }
    let previous = state.last.as_ref();
    let kind = match (previous.map(|p| p.red), red) {
        (None | Some(false), true) => TransitionKind::WentRed,
        (Some(true), true) => TransitionKind::StillRed,
        (Some(true), false) => TransitionKind::Fixed,
        (None | Some(false), false) => TransitionKind::StillGreen,
    };
    let changes = matches!(kind, TransitionKind::WentRed | TransitionKind::Fixed);
    if !changes && state.awaiting.iter().any(|(_, held)| *held < order) {
        return None;
    }
    let newly_failing = match previous {
        Some(p) => failing
            .iter()
            .filter(|f| p.failing.binary_search(f).is_err())
            .cloned()
            .collect(),
        None => failing.to_vec(),
    };
    let last_green = state.last_green.clone().unwrap_or_default();
    let transition = Transition {
        kind: kind.into(),
        status: status.into(),
        first: previous.is_none(),
        upstream_commit: commits.upstream.clone(),
        project_commit: commits.project.clone(),
        last_green_upstream_commit: last_green.upstream.clone(),
        project_commit_changed: kind == TransitionKind::WentRed
            && state.last_green.is_some()
            && last_green.project != commits.project,
        previous_project_commit: previous
            .map(|p| p.commits.project.clone())
            .unwrap_or_default(),
        red_since_id: if previous.is_some_and(|p| p.red) {
            state.red_since.unwrap_or(0)
        } else {
            0
        },
        newly_failing,
        ..Default::default()
    };
    let decisive = Decisive {
        red,
        commits: commits.clone(),
        failing: failing.to_vec(),
    };
    Some((transition, decisive))
}

/// Moves a series past its stored transition `t` (its id set).
pub(super) fn advance(state: &mut SeriesState, t: &Transition, verdict: Verdict) {
    let Verdict {
        decisive,
        order,
        advances,
        ..
    } = verdict;
    if !advances {
        return;
    }
    if decisive.red {
        if t.kind == TransitionKind::WentRed as i32 {
            state.red_since = Some(t.id);
        }
    } else {
        state.red_since = None;
        state.last_green = Some(decisive.commits.clone());
    }
    state.order = order;
    state.last = Some(decisive);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::tests::{build, run};

    /// Judges `finished` and moves `state` on as recording would.
    fn step(state: &mut SeriesState, finished: &Finished, id: u64) -> Option<Transition> {
        let verdict = judge(state, finished)?;
        let mut t = verdict.transition.clone();
        t.id = id;
        advance(state, &t, verdict);
        Some(t)
    }

    fn kind(t: &Transition) -> TransitionKind {
        TransitionKind::try_from(t.kind).unwrap()
    }

    #[test]
    fn a_series_goes_red_stays_red_and_is_fixed() {
        let mut s = SeriesState::default();
        let t = step(&mut s, &run(10, 1, RunStatus::Green, &[]), 1).unwrap();
        assert_eq!((kind(&t), t.first), (TransitionKind::StillGreen, true));
        let red = run(20, 2, RunStatus::Red, &["b", "a"]);
        let range = judge(&s, &red).unwrap().culprit_range();
        assert_eq!(
            range,
            Some(CulpritRange {
                upstream: "tiny".into(),
                from: Some("c1".into()),
                to: "c2".into()
            })
        );
        let t = step(&mut s, &red, 2).unwrap();
        assert_eq!(kind(&t), TransitionKind::WentRed);
        assert_eq!(t.newly_failing, ["a", "b"], "sorted, from every case");
        assert_eq!(s.red_now(), Some(2));
        let still = run(30, 3, RunStatus::Red, &["a", "b", "c"]);
        assert_eq!(judge(&s, &still).unwrap().culprit_range(), None);
        let t = step(&mut s, &still, 3).unwrap();
        assert_eq!((kind(&t), t.red_since_id), (TransitionKind::StillRed, 2));
        assert_eq!(t.newly_failing, ["c"]);
        let t = step(&mut s, &run(40, 4, RunStatus::Green, &[]), 4).unwrap();
        assert_eq!((kind(&t), t.red_since_id), (TransitionKind::Fixed, 2));
        assert_eq!(s.red_now(), None);
        assert_eq!(s.last_green.as_ref().unwrap().upstream, "c4");
    }

    #[test]
    fn errors_late_results_and_never_head_commits_decide_nothing() {
        let mut s = SeriesState::default();
        step(&mut s, &run(10, 5, RunStatus::Green, &[]), 1).unwrap();
        assert!(judge(&s, &run(20, 6, RunStatus::Error, &[])).is_none());
        assert!(
            judge(&s, &run(30, 4, RunStatus::Red, &[])).is_none(),
            "late"
        );
        assert!(
            judge(&s, &run(40, 0, RunStatus::Red, &[])).is_none(),
            "never head"
        );
        let t = step(&mut s, &run(50, 7, RunStatus::Red, &[]), 2).unwrap();
        assert_eq!(t.last_green_upstream_commit, "c5");
    }

    #[test]
    fn a_failed_build_after_a_passed_one_went_red_without_a_project() {
        let build = |job_id, head_seq, state| Finished::Build(build(job_id, head_seq, state, ""));
        let mut s = SeriesState::default();
        step(&mut s, &build(1, 1, BuildState::Passed), 1).unwrap();
        assert!(judge(&s, &build(2, 2, BuildState::Error)).is_none());
        let t = step(&mut s, &build(3, 3, BuildState::Failed), 2).unwrap();
        assert_eq!(kind(&t), TransitionKind::WentRed);
        assert!(t.project.is_empty());
        assert_eq!((t.job_id, t.last_green_upstream_commit.as_str()), (3, "c1"));
        assert_eq!(
            series_of(&build(3, 3, BuildState::Failed)),
            "/tiny/linux-x86_64"
        );
    }
}
