//! Confirmations: a verdict that would change a series (went red, fixed),
//! from an agent whose word does not count alone (a volunteer, under the
//! project's `confirm` policy), is held until a re-run of the same job on
//! another agent agrees. Pure: the record and its rules; the recorder
//! ([`super::Results`]) stores it under `c/<job id>` and the pipeline
//! submits the re-runs it asks for.
//!
//! One record per original job, holding its verdict and a list of re-runs
//! with theirs: the signal-quality work adds re-run kinds (same runtime
//! again, the series' last good runtime) and classes without changing the
//! shape.

use serde::{Deserialize, Serialize};
use trunkfarm_proto::v1::RunStatus;

use crate::job_key::RerunKind;

/// How many confirmation runs are tried before a verdict is left
/// unconfirmed: one, and one more when the first ended in an
/// infrastructure error (its own retries within `dispatch.max_attempts`
/// used up).
pub(crate) const MAX_CONFIRM_RUNS: usize = 2;

/// Where a confirmation stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ConfirmState {
    /// A re-run is queued or running: the verdict does not count yet.
    #[default]
    Awaiting,
    /// A re-run agreed: the verdict counted (classified when it agreed).
    Confirmed,
    /// A re-run disagreed: the verdict does not count, and the
    /// disagreement is held against its agent.
    Overruled,
    /// Every re-run ended in an infrastructure error: the verdict does not
    /// count, and is shown as unconfirmed.
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
}

impl Said {
    fn status(&self) -> RunStatus {
        RunStatus::try_from(self.status).unwrap_or(RunStatus::Error)
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
}

impl Confirmation {
    /// The `n` of the confirmation run to have queued now, if one is
    /// wanted: while awaiting, one more than the re-runs that errored.
    pub(crate) fn wanted_rerun(&self) -> Option<u32> {
        (self.state == ConfirmState::Awaiting).then_some(self.reruns.len() as u32 + 1)
    }

    /// Agents a re-run must not go to: the original's (an independent
    /// verdict). An agent whose re-run ended in an infrastructure error may
    /// take the next one: it said nothing, and may be the only one that fits.
    pub(crate) fn exclude_agents(&self) -> Vec<String> {
        vec![self.original.agent_id.clone()]
    }

    /// Takes a finished re-run's verdict in and settles the state: agreed,
    /// disagreed, or (after [`MAX_CONFIRM_RUNS`] infrastructure errors)
    /// unconfirmed. A re-run arriving once settled changes nothing.
    pub(crate) fn settle(&mut self, rerun: Rerun) {
        if self.state != ConfirmState::Awaiting {
            return;
        }
        let said = rerun.said.clone();
        self.reruns.push(rerun);
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

    /// The re-run that settled it (agreeing or disagreeing), if any.
    pub(crate) fn decisive_rerun(&self) -> Option<&Said> {
        self.reruns.iter().map(|r| &r.said).find(|s| !s.errored())
    }

    /// Both verdicts in words, once settled.
    pub(crate) fn detail(&self) -> String {
        let original = self.original.words();
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

    /// Whose verdicts the settling re-run judged, and whether it agreed:
    /// the original volunteer's, and the re-run's own when it ran on a
    /// volunteer too (two volunteers disagreeing: either may lie). Trusted
    /// agents are not counted.
    pub(crate) fn judged(&self) -> Vec<Judged> {
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
            artifact_sha256: String::new(),
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
        }
    }

    #[test]
    fn a_rerun_that_agrees_confirms_and_one_that_does_not_overrules() {
        let mut c = held(RunStatus::Red);
        assert_eq!(c.wanted_rerun(), Some(1));
        c.settle(rerun(said(2, "t", true, RunStatus::Red)));
        assert_eq!(c.state, ConfirmState::Confirmed);
        assert_eq!(c.wanted_rerun(), None);
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
        assert_eq!(c.wanted_rerun(), Some(2));
        assert_eq!(c.exclude_agents(), ["v"]);
        assert!(c.judged().is_empty());
        c.settle(rerun(said(3, "u", true, RunStatus::Error)));
        assert_eq!(c.state, ConfirmState::Unconfirmed);
        assert_eq!(c.wanted_rerun(), None);
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
