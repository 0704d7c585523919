//! Confirmations: a verdict that would change a series (went red, fixed) is
//! held until re-runs say what it is. Pure: the record and its rules; the
//! recorder ([`super::Results`]) stores it under `c/<job id>` and the
//! pipeline submits the re-runs it asks for.
//!
//! One record per original job, holding its verdict and a list of re-runs
//! with theirs. Two sets of rules:
//!
//! * **Classed** (a test run under `confirm = "volunteer"|"always"`,
//!   [`Rules::classify`]): `confirm_runs` identical re-runs
//!   ([`RerunKind::Again`]) and, for a went red, one run of the same project
//!   commit on the series' last good runtime ([`RerunKind::Baseline`]), all
//!   queued at once. What they say gives the [`Class`]:
//!   - went red, a re-run passes → **flaky** (not red); the original failed
//!     for the machine's sake (timeout, out of memory, disk, process limit,
//!     SIGKILL) and no re-run failed genuinely → **spurious** (not red), also
//!     when a re-run fails for the machine's sake too;
//!   - every identical re-run fails → the baseline decides: passes →
//!     **regressed**; fails → **project_side** when the project's own commit
//!     changed since the last green, else **broken**; gone (its artifact
//!     deleted) or never run → regressed, saying so; no green result ever,
//!     or the upstream unchanged since it → broken / project_side without a
//!     baseline run;
//!   - fixed: every identical re-run passes → it counts; one fails → flaky
//!     (the series stays red).
//!
//!   A re-run that says nothing (an infrastructure error, or a failure for
//!   the machine's sake after a genuine verdict) is tried once more per
//!   kind; then identical re-runs leave the verdict unconfirmed, a baseline
//!   is classed without.
//! * **Agree or not** (a volunteer's build, or a test verdict held by an
//!   older hub): one re-run ([`RerunKind::Confirm`]) must say the same (a
//!   build: the same artifact hash).
//!
//! Trust: a settled confirmation judges the original's agent when it was a
//! volunteer ([`Confirmation::judged`]). Classed, it counts an agreement when
//! the result counted, and a disagreement only when a *trusted* identical
//! re-run contradicted it (flaky) and the series is not known to be flaky on
//! trusted agents alone ([`Confirmation::known_flaky`]): a flaky test makes
//! honest volunteers "disagree", so once trusted agents flip too, nobody is
//! held to it. Spurious results judge nobody.

use serde::{Deserialize, Serialize};
use trunkfarm_proto::v1::{Outcome, RunStatus};

use super::Class;
use crate::job_key::RerunKind;

/// How many confirmation runs are tried before a verdict held under the
/// agree-or-not rules is left unconfirmed: one, and one more when the
/// first ended in an infrastructure error (its own retries within
/// `dispatch.max_attempts` used up).
pub(crate) const MAX_CONFIRM_RUNS: usize = 2;

/// Re-runs of one kind that said nothing, tried again before the kind
/// gives up (classed rules).
const MAX_SILENT_RERUNS: usize = 1;

/// Why a failed run ended for the machine's sake rather than the tests'
/// (empty: it did not), from its outcome and the agent's detail
/// (`volunteer-agent`'s executor and sandbox word these).
pub(crate) fn machine_failure(outcome: i32, detail: &str) -> String {
    if outcome == Outcome::TimedOut as i32 {
        return format!("timed out ({detail})");
    }
    if outcome != Outcome::Failed as i32 {
        return String::new();
    }
    const MARKERS: [&str; 4] = [
        "out of memory:",
        "process limit reached:",
        "of disk in its work directory",
        "(SIGKILL)",
    ];
    if MARKERS.iter().any(|m| detail.contains(m)) {
        detail.to_owned()
    } else {
        String::new()
    }
}

/// Where a confirmation stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ConfirmState {
    /// A re-run is queued or running: the verdict does not count yet.
    #[default]
    Awaiting,
    /// Re-runs repeated it: the verdict counted (classified when it
    /// settled; classed regressed, project_side or broken for a went red).
    Confirmed,
    /// A re-run disagreed: the verdict does not change the series (classed
    /// flaky or spurious: stored as a transition that leaves it as it was).
    Overruled,
    /// Re-runs ended in infrastructure errors: the verdict does not count,
    /// and is shown as unconfirmed.
    Unconfirmed,
}

impl ConfirmState {
    /// The word shown (`RunInfo.confirmation`).
    pub(crate) fn word(self) -> &'static str {
        match self {
            ConfirmState::Awaiting => "awaiting",
            ConfirmState::Confirmed => "confirmed",
            ConfirmState::Overruled => "overruled",
            ConfirmState::Unconfirmed => "unconfirmed",
        }
    }
}

/// A verdict: what a run or build said.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct Said {
    /// The job.
    pub(crate) job_id: u64,
    /// Its agent.
    pub(crate) agent_id: String,
    /// Whether that agent was trusted when the job was leased to it.
    pub(crate) trusted: bool,
    /// A `v1::RunStatus` number: green, red, or error (decides nothing).
    pub(crate) status: i32,
    /// A build's artifact (builds agree only on the same bytes).
    pub(crate) artifact_sha256: String,
    /// A red run that ended for the machine's sake: why
    /// ([`machine_failure`]); empty otherwise.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(crate) machine: String,
}

/// What a verdict says, for the classed rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Says {
    Green,
    Red,
    /// Red for the machine's sake.
    Machine,
    /// An infrastructure error.
    Nothing,
}

impl Said {
    fn status(&self) -> RunStatus {
        RunStatus::try_from(self.status).unwrap_or(RunStatus::Error)
    }

    fn says(&self) -> Says {
        match self.status() {
            RunStatus::Green => Says::Green,
            RunStatus::Red if self.machine.is_empty() => Says::Red,
            RunStatus::Red => Says::Machine,
            _ => Says::Nothing,
        }
    }

    /// Whether it decided nothing (an infrastructure error).
    fn errored(&self) -> bool {
        !matches!(self.status(), RunStatus::Green | RunStatus::Red)
    }

    /// Whether `other` says the same.
    fn agrees(&self, other: &Said) -> bool {
        self.status() == other.status() && self.artifact_sha256 == other.artifact_sha256
    }

    /// In words, for people: "red on ag_x (volunteer)".
    fn words(&self) -> String {
        let what = match self.status() {
            RunStatus::Green if !self.artifact_sha256.is_empty() => {
                format!("built {}", short_hash(&self.artifact_sha256))
            }
            RunStatus::Green => "green".into(),
            RunStatus::Red if !self.machine.is_empty() => {
                format!("red for the machine's sake ({})", self.machine)
            }
            RunStatus::Red => "red".into(),
            _ => "an infrastructure error".into(),
        };
        let who = if self.trusted { "trusted" } else { "volunteer" };
        format!("{what} on {} ({who}, job {})", self.agent_id, self.job_id)
    }
}

fn short_hash(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}

/// One re-run of the original job and what it said.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct Rerun {
    /// What it is for.
    pub(crate) kind: RerunKind,
    /// Its verdict.
    pub(crate) said: Said,
    /// Why it could not be run (a baseline whose runtime is gone); empty
    /// when it ran.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(crate) note: String,
}

impl Rerun {
    /// A re-run that could not be run, and why (it says nothing).
    pub(crate) fn not_run(kind: RerunKind, why: String) -> Rerun {
        Rerun {
            kind,
            said: Said::default(),
            note: why,
        }
    }

    /// An identical re-run (`confirm` is what older hubs queued).
    fn identical(&self) -> bool {
        matches!(self.kind, RerunKind::Again | RerunKind::Confirm)
    }

    fn words(&self) -> String {
        let kind = match self.kind {
            RerunKind::Baseline => "on the baseline runtime",
            RerunKind::Again | RerunKind::Confirm => "again",
            RerunKind::Calibrate => "calibration run",
        };
        match self.note.is_empty() {
            true => format!("{kind}: {}", self.said.words()),
            false => format!("{kind}: not run, {}", self.note),
        }
    }
}

/// How a held verdict is confirmed (decided when it is held; stored with it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct Rules {
    /// The classed rules (a test run held by this hub); `false`: agree or
    /// not (builds, and what older hubs held).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(crate) classify: bool,
    /// Identical re-runs wanted (`confirm_runs`; at least one).
    #[serde(skip_serializing_if = "is_zero")]
    pub(crate) runs: u32,
    /// The original's agent may take a re-run when no other fits (a
    /// trusted agent's result under `confirm = "volunteer"`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(crate) may_rerun_on_original: bool,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A verdict to hold if it would change its series, and how to confirm it.
#[derive(Clone, Debug)]
pub(crate) struct Hold {
    /// What the original said, and who said it.
    pub(crate) said: Said,
    /// How it is confirmed.
    pub(crate) rules: Rules,
}

/// An agent whose verdict a re-run judged (see [`Confirmation::judged`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Judged {
    /// The agent.
    pub(crate) agent_id: String,
    /// The re-run that judged it (counted once per re-run).
    pub(crate) rerun_job: u64,
    /// Whether the re-run agreed with it.
    pub(crate) agreed: bool,
    /// Both verdicts, in words (for the log).
    pub(crate) detail: String,
}

/// A held verdict and its re-runs: `c/<original job id>` in `results`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct Confirmation {
    /// The original verdict.
    pub(crate) original: Said,
    /// Its series: project (empty for a build), upstream, platform.
    pub(crate) project: String,
    pub(crate) upstream: String,
    pub(crate) platform: String,
    /// The upstream commit (a build's commit, or the runtime's).
    pub(crate) commit: String,
    /// Its head sequence (orders it in the series when it is confirmed).
    pub(crate) head_seq: u64,
    /// Where it stands.
    pub(crate) state: ConfirmState,
    /// Its re-runs so far, oldest first.
    pub(crate) reruns: Vec<Rerun>,
    /// How it is confirmed.
    pub(crate) rules: Rules,
    /// The series' last good runtime when it was held: the upstream commit
    /// of its last green result (empty: none).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(crate) baseline: String,
    /// The project's own commit changed since that last green result.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(crate) project_changed: bool,
    /// What the re-runs found, once settled (classed rules).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) class: Option<Class>,
    /// The series had flipped on trusted agents alone when this settled:
    /// a volunteer contradicted by a re-run is not held to it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(crate) known_flaky: bool,
}

impl Confirmation {
    /// The re-runs to have queued now, as (kind, n): while awaiting, every
    /// one its rules still want (those queued already included: queueing is
    /// once per key).
    pub(crate) fn wanted_reruns(&self) -> Vec<(RerunKind, u32)> {
        if self.state != ConfirmState::Awaiting {
            return Vec::new();
        }
        if !self.rules.classify {
            return vec![(RerunKind::Confirm, self.reruns.len() as u32 + 1)];
        }
        let again = self.wanted_runs() + self.silent(true);
        let mut out: Vec<_> = (1..=again as u32).map(|n| (RerunKind::Again, n)).collect();
        if self.wants_baseline_run() && !self.baseline_given_up() {
            let n = 1 + self.silent(false) as u32;
            out.extend((1..=n).map(|n| (RerunKind::Baseline, n)));
        }
        out
    }

    /// Whether a baseline run is part of its rules: a classed went red
    /// whose series had a green result on another runtime.
    pub(crate) fn wants_baseline_run(&self) -> bool {
        self.rules.classify
            && self.original.status() == RunStatus::Red
            && !self.baseline.is_empty()
            && self.baseline != self.commit
    }

    fn wanted_runs(&self) -> usize {
        self.rules.runs.max(1) as usize
    }

    /// The re-runs of one sort (identical or baseline) that said nothing.
    fn silent(&self, identical: bool) -> usize {
        let original_machine = self.original.says() == Says::Machine;
        self.reruns
            .iter()
            .filter(|r| r.identical() == identical)
            .filter(|r| match r.said.says() {
                Says::Nothing => true,
                // Machine after machine is an answer (spurious).
                Says::Machine => !(identical && original_machine),
                _ => false,
            })
            .count()
    }

    /// Whether the baseline run was given up on (it could not run, or
    /// said nothing too often): the went red is classed without it.
    pub(crate) fn baseline_given_up(&self) -> bool {
        self.reruns
            .iter()
            .any(|r| r.kind == RerunKind::Baseline && !r.note.is_empty())
            || self.silent(false) > MAX_SILENT_RERUNS
    }

    /// Agents a re-run must not go to: the original's (an independent
    /// verdict), unless its rules let it take one when no other fits. An
    /// agent whose re-run ended in an infrastructure error may take the
    /// next one: it said nothing, and may be the only one that fits.
    pub(crate) fn exclude_agents(&self) -> Vec<String> {
        match self.rules.may_rerun_on_original {
            true => Vec::new(),
            false => vec![self.original.agent_id.clone()],
        }
    }

    /// Takes a finished re-run's verdict in and settles the state. A re-run
    /// arriving once settled changes nothing.
    pub(crate) fn settle(&mut self, rerun: Rerun) {
        if self.state != ConfirmState::Awaiting {
            return;
        }
        let said = rerun.said.clone();
        self.reruns.push(rerun);
        if self.rules.classify {
            (self.state, self.class) = self.classed();
            return;
        }
        self.state = if said.errored() {
            if self.reruns.len() >= MAX_CONFIRM_RUNS {
                ConfirmState::Unconfirmed
            } else {
                ConfirmState::Awaiting
            }
        } else if said.agrees(&self.original) {
            ConfirmState::Confirmed
        } else {
            ConfirmState::Overruled
        };
    }

    /// Where the classed rules put it with the re-runs in so far.
    fn classed(&self) -> (ConfirmState, Option<Class>) {
        use ConfirmState::*;
        let again: Vec<Says> = (self.reruns.iter())
            .filter(|r| r.identical())
            .map(|r| r.said.says())
            .collect();
        let has = |s: Says| again.contains(&s);
        let count = |s: Says| again.iter().filter(|a| **a == s).count();
        let unconfirmed_or_awaiting = if self.silent(true) > MAX_SILENT_RERUNS {
            (Unconfirmed, None)
        } else {
            (Awaiting, None)
        };
        match self.original.says() {
            Says::Green => {
                if has(Says::Red) {
                    (Overruled, Some(Class::Flaky))
                } else if count(Says::Green) >= self.wanted_runs() {
                    (Confirmed, None)
                } else {
                    unconfirmed_or_awaiting
                }
            }
            original @ (Says::Red | Says::Machine) => {
                let machine = original == Says::Machine;
                if has(Says::Green) {
                    let class = match machine && !has(Says::Red) {
                        true => Class::Spurious,
                        false => Class::Flaky,
                    };
                    return (Overruled, Some(class));
                }
                if machine && has(Says::Machine) {
                    return (Overruled, Some(Class::Spurious));
                }
                if count(Says::Red) < self.wanted_runs() {
                    return unconfirmed_or_awaiting;
                }
                match self.without_the_runtime() {
                    Some(class) => (Confirmed, Some(class)),
                    None => (Awaiting, None),
                }
            }
            Says::Nothing => (Unconfirmed, None),
        }
    }

    /// A went red that failed again: what the baseline says (`None`: not
    /// yet).
    fn without_the_runtime(&self) -> Option<Class> {
        let own = match self.project_changed {
            true => Class::ProjectSide,
            false => Class::Broken,
        };
        if self.baseline.is_empty() {
            // Never green: nothing regressed.
            return Some(Class::Broken);
        }
        if !self.wants_baseline_run() {
            // The runtime is the last green one's: the project changed.
            return Some(own);
        }
        let baseline = self.reruns.iter().filter(|r| r.kind == RerunKind::Baseline);
        match baseline
            .map(|r| r.said.says())
            .find(|s| matches!(s, Says::Green | Says::Red))
        {
            Some(Says::Green) => Some(Class::Regressed),
            Some(_) => Some(own),
            None if self.baseline_given_up() => Some(Class::Regressed),
            None => None,
        }
    }

    /// The identical re-run that settled it (agreeing or disagreeing), if
    /// any: the first that said something.
    pub(crate) fn decisive_rerun(&self) -> Option<&Said> {
        let original_machine = self.original.says() == Says::Machine;
        (self.reruns.iter())
            .filter(|r| r.identical())
            .map(|r| &r.said)
            .find(|s| match s.says() {
                Says::Green | Says::Red => true,
                Says::Machine => original_machine,
                Says::Nothing => false,
            })
    }

    /// The identical re-run that contradicted the original (a pass after a
    /// red, a failure after a green).
    fn contradicting(&self) -> Option<&Said> {
        let wanted = match self.original.says() {
            Says::Green => Says::Red,
            _ => Says::Green,
        };
        (self.reruns.iter())
            .filter(|r| r.identical())
            .map(|r| &r.said)
            .find(|s| s.says() == wanted)
    }

    /// Both verdicts in words.
    pub(crate) fn detail(&self) -> String {
        let original = self.original.words();
        if self.rules.classify {
            let mut parts = vec![original];
            parts.extend(self.reruns.iter().map(Rerun::words));
            let mut out = parts.join("; ");
            match (self.state, self.class) {
                (ConfirmState::Awaiting, _) => out.push_str("; awaiting re-runs"),
                (state, Some(class)) => {
                    out.push_str(&format!(": {} ({})", state.word(), class.word()))
                }
                (state, None) => out.push_str(&format!(": {}", state.word())),
            }
            if self.class == Some(Class::Regressed) && self.baseline_given_up() {
                out.push_str(", classed without a baseline run");
            }
            return out;
        }
        match (self.state, self.decisive_rerun()) {
            (ConfirmState::Awaiting, _) => format!("{original}; awaiting a confirmation run"),
            (ConfirmState::Unconfirmed, _) => format!(
                "{original}; {} confirmation run(s) ended in infrastructure errors",
                self.reruns.len()
            ),
            (state, Some(rerun)) => format!("{original}; {}: {}", rerun.words(), state.word()),
            (state, None) => format!("{original}; {}", state.word()),
        }
    }

    /// Whose verdicts the settled confirmation judged, and whether it
    /// agreed (see the module's doc). Trusted agents are not counted.
    pub(crate) fn judged(&self) -> Vec<Judged> {
        if self.rules.classify {
            return self.judged_classed();
        }
        let Some(rerun) = self.decisive_rerun() else {
            return Vec::new();
        };
        let agreed = self.state == ConfirmState::Confirmed;
        let detail = self.detail();
        let mut out = Vec::new();
        if !self.original.trusted {
            out.push(Judged {
                agent_id: self.original.agent_id.clone(),
                rerun_job: rerun.job_id,
                agreed,
                detail: detail.clone(),
            });
        }
        if !rerun.trusted && !agreed {
            out.push(Judged {
                agent_id: rerun.agent_id.clone(),
                rerun_job: rerun.job_id,
                agreed,
                detail,
            });
        }
        out
    }

    /// [`Confirmation::judged`] under the classed rules: a volunteer's
    /// original agreed with when it counted; disagreed with when a trusted
    /// identical re-run made it flaky and the series is not known flaky.
    fn judged_classed(&self) -> Vec<Judged> {
        if self.original.trusted {
            return Vec::new();
        }
        let (rerun, agreed) = match (self.state, self.class) {
            (ConfirmState::Confirmed, _) => (self.decisive_rerun(), true),
            (ConfirmState::Overruled, Some(Class::Flaky)) if !self.known_flaky => {
                (self.contradicting().filter(|r| r.trusted), false)
            }
            _ => (None, false),
        };
        rerun
            .map(|r| Judged {
                agent_id: self.original.agent_id.clone(),
                rerun_job: r.job_id,
                agreed,
                detail: self.detail(),
            })
            .into_iter()
            .collect()
    }

    /// Whether it settled as flaky between trusted agents only (the
    /// original and the re-run contradicting it): evidence the series
    /// flips in honest hands.
    pub(crate) fn flaky_on_trusted(&self) -> bool {
        self.class == Some(Class::Flaky)
            && self.original.trusted
            && self.contradicting().is_some_and(|r| r.trusted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn said(job_id: u64, agent: &str, trusted: bool, status: RunStatus) -> Said {
        Said {
            job_id,
            agent_id: agent.into(),
            trusted,
            status: status.into(),
            ..Default::default()
        }
    }

    fn held(status: RunStatus) -> Confirmation {
        Confirmation {
            original: said(1, "v", false, status),
            ..Default::default()
        }
    }

    fn rerun(s: Said) -> Rerun {
        Rerun {
            kind: RerunKind::Confirm,
            said: s,
            ..Default::default()
        }
    }

    /// A classed went red (or fixed) of trusted `t`, with a baseline.
    fn classed(status: RunStatus, runs: u32) -> Confirmation {
        Confirmation {
            original: said(1, "t", true, status),
            commit: "c2".into(),
            baseline: "c1".into(),
            rules: Rules {
                classify: true,
                runs,
                may_rerun_on_original: true,
            },
            ..Default::default()
        }
    }

    fn again(job: u64, status: RunStatus) -> Rerun {
        Rerun {
            kind: RerunKind::Again,
            said: said(job, "u", true, status),
            ..Default::default()
        }
    }

    fn baseline(job: u64, status: RunStatus) -> Rerun {
        Rerun {
            kind: RerunKind::Baseline,
            ..again(job, status)
        }
    }

    fn timed_out(mut r: Rerun) -> Rerun {
        r.said.machine = machine_failure(Outcome::TimedOut as i32, "timed out after 1s");
        r
    }

    #[test]
    fn a_went_red_that_fails_again_and_passes_on_the_baseline_regressed() {
        let mut c = classed(RunStatus::Red, 2);
        assert_eq!(
            c.wanted_reruns(),
            [
                (RerunKind::Again, 1),
                (RerunKind::Again, 2),
                (RerunKind::Baseline, 1)
            ]
        );
        assert!(
            c.exclude_agents().is_empty(),
            "a trusted original may re-run itself"
        );
        c.settle(baseline(4, RunStatus::Green));
        c.settle(again(2, RunStatus::Red));
        assert_eq!(
            c.state,
            ConfirmState::Awaiting,
            "two identical re-runs wanted"
        );
        c.settle(again(3, RunStatus::Red));
        assert_eq!(
            (c.state, c.class),
            (ConfirmState::Confirmed, Some(Class::Regressed))
        );
        assert!(c.wanted_reruns().is_empty());
        assert_eq!(c.decisive_rerun().unwrap().job_id, 2);
        assert!(
            c.detail().contains("on the baseline runtime: green"),
            "{}",
            c.detail()
        );
    }

    #[test]
    fn failing_on_the_baseline_too_is_the_projects_own_or_broken() {
        for (changed, class) in [(true, Class::ProjectSide), (false, Class::Broken)] {
            let mut c = classed(RunStatus::Red, 1);
            c.project_changed = changed;
            c.settle(again(2, RunStatus::Red));
            assert_eq!(c.state, ConfirmState::Awaiting, "the baseline decides");
            c.settle(baseline(3, RunStatus::Red));
            assert_eq!((c.state, c.class), (ConfirmState::Confirmed, Some(class)));
        }
        // The upstream did not move since the last green: no baseline run.
        let mut c = classed(RunStatus::Red, 1);
        c.baseline = "c2".into();
        c.project_changed = true;
        assert_eq!(c.wanted_reruns(), [(RerunKind::Again, 1)]);
        c.settle(again(2, RunStatus::Red));
        assert_eq!(c.class, Some(Class::ProjectSide));
        // Never green: nothing regressed.
        let mut c = classed(RunStatus::Red, 1);
        c.baseline.clear();
        c.settle(again(2, RunStatus::Red));
        assert_eq!(c.class, Some(Class::Broken));
    }

    #[test]
    fn a_baseline_that_cannot_run_is_classed_without() {
        let mut c = classed(RunStatus::Red, 1);
        c.settle(Rerun::not_run(
            RerunKind::Baseline,
            "its runtime is gone".into(),
        ));
        assert_eq!(
            c.wanted_reruns(),
            [(RerunKind::Again, 1)],
            "no baseline any more"
        );
        c.settle(again(2, RunStatus::Red));
        assert_eq!(c.class, Some(Class::Regressed));
        assert!(
            c.detail().contains("not run, its runtime is gone"),
            "{}",
            c.detail()
        );
        assert!(
            c.detail().contains("without a baseline run"),
            "{}",
            c.detail()
        );
        // Errors twice on the baseline: the same.
        let mut c = classed(RunStatus::Red, 1);
        c.settle(again(2, RunStatus::Red));
        c.settle(baseline(3, RunStatus::Error));
        assert_eq!(
            c.wanted_reruns(),
            [
                (RerunKind::Again, 1),
                (RerunKind::Baseline, 1),
                (RerunKind::Baseline, 2)
            ]
        );
        c.settle(baseline(4, RunStatus::Error));
        assert_eq!(c.class, Some(Class::Regressed));
    }

    #[test]
    fn a_pass_on_a_rerun_is_flaky_both_ways() {
        let mut c = classed(RunStatus::Red, 3);
        c.settle(again(2, RunStatus::Red));
        c.settle(again(3, RunStatus::Green));
        assert_eq!(
            (c.state, c.class),
            (ConfirmState::Overruled, Some(Class::Flaky))
        );
        assert_eq!(c.contradicting().unwrap().job_id, 3);
        assert!(c.flaky_on_trusted());
        let mut fixed = classed(RunStatus::Green, 1);
        assert_eq!(
            fixed.wanted_reruns(),
            [(RerunKind::Again, 1)],
            "no baseline for a fixed"
        );
        fixed.settle(again(2, RunStatus::Red));
        assert_eq!(fixed.class, Some(Class::Flaky));
        let mut fixed = classed(RunStatus::Green, 1);
        fixed.settle(again(2, RunStatus::Green));
        assert_eq!((fixed.state, fixed.class), (ConfirmState::Confirmed, None));
    }

    #[test]
    fn a_run_that_ended_for_the_machines_sake_is_spurious_unless_it_fails_genuinely() {
        let timeout = |c: &mut Confirmation| {
            c.original.machine = machine_failure(Outcome::TimedOut as i32, "timed out after 1s");
        };
        let mut c = classed(RunStatus::Red, 1);
        timeout(&mut c);
        c.settle(timed_out(again(2, RunStatus::Red)));
        assert_eq!(
            (c.state, c.class),
            (ConfirmState::Overruled, Some(Class::Spurious))
        );
        let mut c = classed(RunStatus::Red, 1);
        timeout(&mut c);
        c.settle(again(2, RunStatus::Green));
        assert_eq!(c.class, Some(Class::Spurious));
        let mut c = classed(RunStatus::Red, 1);
        timeout(&mut c);
        c.settle(again(2, RunStatus::Red));
        c.settle(baseline(3, RunStatus::Green));
        assert_eq!(
            c.class,
            Some(Class::Regressed),
            "a genuine failure goes on as a red"
        );
        // A genuine red whose re-run timed out: that re-run said nothing.
        let mut c = classed(RunStatus::Red, 1);
        c.settle(timed_out(again(2, RunStatus::Red)));
        assert_eq!(c.state, ConfirmState::Awaiting);
        assert!(c.wanted_reruns().contains(&(RerunKind::Again, 2)));
        c.settle(timed_out(again(3, RunStatus::Red)));
        assert_eq!(c.state, ConfirmState::Unconfirmed);
        // What the agent reports.
        assert!(
            machine_failure(
                Outcome::Failed as i32,
                "command 1 of 1 exited with status 1"
            )
            .is_empty()
        );
        assert!(
            !machine_failure(
                Outcome::Failed as i32,
                "exited with status 137: out of memory: the kernel killed 1 process(es)"
            )
            .is_empty()
        );
        assert!(machine_failure(Outcome::Passed as i32, "").is_empty());
    }

    #[test]
    fn a_volunteer_is_held_to_a_flaky_result_only_against_a_trusted_rerun_of_a_series_not_known_flaky()
     {
        let volunteer = |c: &mut Confirmation| {
            c.original = said(1, "v", false, RunStatus::Red);
            c.rules.may_rerun_on_original = false;
        };
        let mut c = classed(RunStatus::Red, 1);
        volunteer(&mut c);
        assert_eq!(c.exclude_agents(), ["v"]);
        c.settle(again(2, RunStatus::Green));
        let judged = c.judged();
        assert_eq!(judged.len(), 1);
        assert!(!judged[0].agreed && judged[0].agent_id == "v");
        assert!(!c.flaky_on_trusted());
        c.known_flaky = true;
        assert!(c.judged().is_empty(), "known flaky: nobody is held to it");
        // A volunteer's re-run contradicting a volunteer: nobody counted.
        let mut c = classed(RunStatus::Red, 1);
        volunteer(&mut c);
        c.settle(Rerun {
            said: said(2, "w", false, RunStatus::Green),
            ..again(2, RunStatus::Green)
        });
        assert!(c.judged().is_empty());
        // Counted: agreed.
        let mut c = classed(RunStatus::Red, 1);
        volunteer(&mut c);
        c.settle(again(2, RunStatus::Red));
        c.settle(baseline(3, RunStatus::Green));
        assert!(c.judged()[0].agreed);
    }

    #[test]
    fn a_rerun_that_agrees_confirms_and_one_that_does_not_overrules() {
        let mut c = held(RunStatus::Red);
        assert_eq!(c.wanted_reruns(), [(RerunKind::Confirm, 1)]);
        c.settle(rerun(said(2, "t", true, RunStatus::Red)));
        assert_eq!(c.state, ConfirmState::Confirmed);
        assert!(c.wanted_reruns().is_empty());
        let judged = c.judged();
        assert_eq!(judged.len(), 1);
        assert!(judged[0].agreed && judged[0].agent_id == "v");

        let mut c = held(RunStatus::Red);
        c.settle(rerun(said(2, "t", true, RunStatus::Green)));
        assert_eq!(c.state, ConfirmState::Overruled);
        assert!(c.detail().contains("red on v"), "{}", c.detail());
        assert!(c.detail().contains("green on t (trusted"), "{}", c.detail());
        // Settled: a late re-run changes nothing.
        c.settle(rerun(said(3, "u", true, RunStatus::Red)));
        assert_eq!((c.state, c.reruns.len()), (ConfirmState::Overruled, 1));
    }

    #[test]
    fn infrastructure_errors_are_retried_once_then_the_verdict_stays_unconfirmed() {
        let mut c = held(RunStatus::Green);
        c.settle(rerun(said(2, "t", true, RunStatus::Error)));
        assert_eq!(c.wanted_reruns(), [(RerunKind::Confirm, 2)]);
        assert_eq!(c.exclude_agents(), ["v"]);
        assert!(c.judged().is_empty());
        c.settle(rerun(said(3, "u", true, RunStatus::Error)));
        assert_eq!(c.state, ConfirmState::Unconfirmed);
        assert!(c.wanted_reruns().is_empty());
        assert!(c.judged().is_empty(), "nobody is blamed for an error");
    }

    #[test]
    fn two_volunteers_disagreeing_are_both_counted() {
        let mut c = held(RunStatus::Red);
        c.settle(rerun(said(2, "w", false, RunStatus::Green)));
        let who: Vec<_> = c.judged().into_iter().map(|j| j.agent_id).collect();
        assert_eq!(who, ["v", "w"]);
    }

    #[test]
    fn builds_agree_only_on_the_same_artifact() {
        let build = |job, agent: &str, sha: &str| Said {
            artifact_sha256: sha.into(),
            ..said(job, agent, agent == "t", RunStatus::Green)
        };
        let mut c = Confirmation {
            original: build(1, "v", "aa"),
            ..Default::default()
        };
        c.settle(rerun(build(2, "t", "bb")));
        assert_eq!(c.state, ConfirmState::Overruled);
        let mut c = Confirmation {
            original: build(1, "v", "aa"),
            ..Default::default()
        };
        c.settle(rerun(build(2, "t", "aa")));
        assert_eq!(c.state, ConfirmState::Confirmed);
    }
}
