//! Confirmation runs: the pipeline's side of a held verdict (the record and
//! its rules are `results::confirm`). A finished test whose verdict needs
//! confirming under its project's `confirm` policy goes to the recorder
//! with its verdict ([`Said`]); the recorder holds it if it would change the
//! series. Then, level-triggered like every pipeline job, whenever the
//! original or one of its re-runs is taken in: the re-run the confirmation
//! wants is submitted under `<original key>/confirm/<original job>/<n>`
//! (once per key, so a crash or a re-delivery makes no second one), to any
//! agent but those that already judged it, trusted ones first; and each
//! settled re-run is counted on the agents it judged (once per re-run),
//! which may quarantine one.

use trunkfarm_proto::v1::{BuildState, JobSpec, RunStatus};

use super::{Pipeline, PipelineError, log_transition};
use crate::auth::credentials::{AuthError, Counted};
use crate::commit::short;
use crate::config::Confirm;
use crate::dispatch::{DispatchError, JobRecord, Placement};
use crate::job_key::{JobKey, RerunKind};
use crate::results::{
    BuildInfo, ConfirmState, Confirmation, Finished, Hold, Judged, Recorded, Rerun, Rules, Said,
};

/// What a finished job said, and who said it: the agent of the attempt
/// that produced its result, trusted or not when it was leased.
pub(super) fn said(rec: &JobRecord, status: i32, artifact_sha256: &str) -> Said {
    let attempt = rec
        .result
        .as_ref()
        .and_then(|r| r.job)
        .map_or(rec.attempt, |j| j.attempt);
    let by = rec.attempts.iter().rev().find(|a| a.attempt == attempt);
    Said {
        job_id: rec.id,
        agent_id: by.map_or_else(|| rec.agent_id.clone(), |a| a.agent_id.clone()),
        trusted: by.is_some_and(|a| a.trusted),
        status,
        artifact_sha256: artifact_sha256.to_owned(),
        // Filled in by the recorder, which has the run's outcome.
        machine: String::new(),
    }
}

/// The status a build's state gives its verdict.
fn build_verdict(b: &BuildInfo) -> RunStatus {
    match BuildState::try_from(b.state).unwrap_or(BuildState::Error) {
        BuildState::Passed => RunStatus::Green,
        BuildState::Failed => RunStatus::Red,
        _ => RunStatus::Error,
    }
}

impl Pipeline {
    /// A project's `confirm` policy and `confirm_runs` (the defaults for a
    /// project no longer configured).
    fn confirm_policy(&self, project: &str) -> (Confirm, u32) {
        let p = self.inner.projects.iter().find(|p| p.name == project);
        p.map_or((Confirm::default(), 1), |p| (p.confirm, p.confirm_runs))
    }

    /// The verdict of `finished` (job `rec`) and how it is confirmed, when
    /// it must be before it counts: a test's under its project's `confirm`
    /// policy (classed re-runs); a volunteer's build (only an upstream with
    /// `build_on = "any"` gives it one: the same artifact from another).
    pub(super) fn unconfirmed(&self, rec: &JobRecord, finished: &Finished) -> Option<Hold> {
        match finished {
            Finished::Run { run, .. } => {
                let said = said(rec, run.info.status, "");
                let (policy, runs) = self.confirm_policy(&run.info.project);
                let rules = Rules {
                    classify: true,
                    runs,
                    may_rerun_on_original: policy.may_rerun_on_original(said.trusted),
                };
                policy.holds().then_some(Hold { said, rules })
            }
            Finished::Build(b) => {
                let said = said(rec, build_verdict(b).into(), &b.artifact_sha256);
                let rules = Rules::default();
                (!said.trusted).then_some(Hold { said, rules })
            }
        }
    }

    /// Records a finished re-run of job `original`.
    pub(super) async fn record_rerun(
        &self,
        rec: &JobRecord,
        finished: Finished,
        kind: RerunKind,
        original: u64,
    ) -> Result<Option<BuildInfo>, PipelineError> {
        let said = match &finished {
            Finished::Run { run, .. } => said(rec, run.info.status, ""),
            Finished::Build(b) => said(rec, build_verdict(b).into(), &b.artifact_sha256),
        };
        let rerun = Rerun {
            kind,
            said,
            ..Default::default()
        };
        let recorded = self
            .inner
            .results
            .record_rerun(original, rerun, finished, self, &self.inner.notifier)
            .await?;
        if let Recorded::New(Some(t)) = &recorded {
            self.inner.notifier.wake();
            log_transition(Some(t));
        }
        Ok(None)
    }

    /// Follows job `original`'s held verdict, if it has one: counts the
    /// settled re-run on the agents it judged, and queues the re-run the
    /// confirmation still wants. Idempotent.
    pub(super) async fn follow_confirmation(&self, original: u64) -> Result<(), PipelineError> {
        let Some(mut c) = self.inner.results.confirmation(original)? else {
            return Ok(());
        };
        if c.state == ConfirmState::Awaiting
            && c.wants_baseline_run()
            && !c.baseline_given_up()
            && let Some(why) = self.baseline_missing(&c)?
        {
            tracing::warn!(
                job = original,
                project = %c.project,
                "the baseline run of job {original} cannot run: {why}; it is classed without"
            );
            let recorded = (self.inner.results)
                .baseline_not_run(original, why, self, &self.inner.notifier)
                .await?;
            if let Recorded::New(Some(t)) = &recorded {
                self.inner.notifier.wake();
                log_transition(Some(t));
            }
            let Some(now) = self.inner.results.confirmation(original)? else {
                return Ok(());
            };
            c = now;
        }
        for judged in c.judged() {
            self.count(&judged).await?;
        }
        let wanted = c.wanted_reruns();
        for (kind, n) in &wanted {
            self.submit_confirmation(original, &c, *kind, *n).await?;
        }
        if wanted.is_empty() && c.project.is_empty() {
            self.follow_settled_build(&c).await?;
        }
        Ok(())
    }

    /// Why the baseline run of `c` cannot run (`None`: it can): its project
    /// or upstream is no longer configured, or the baseline runtime's build
    /// or artifact is gone (deleted by artifact GC).
    fn baseline_missing(&self, c: &Confirmation) -> Result<Option<String>, PipelineError> {
        Ok(self.baseline_spec(c)?.err())
    }

    /// The baseline run's spec: the original's project commit on the
    /// series' last good runtime; or why there is none.
    fn baseline_spec(&self, c: &Confirmation) -> Result<Result<JobSpec, String>, PipelineError> {
        let Some(p) = self.inner.projects.iter().find(|p| p.name == c.project) else {
            return Ok(Err(format!(
                "project {:?} is no longer configured",
                c.project
            )));
        };
        let Ok(u) = self.upstream(&c.upstream) else {
            return Ok(Err(format!(
                "upstream {:?} is no longer configured",
                c.upstream
            )));
        };
        let build = self
            .inner
            .results
            .build(&c.upstream, &c.platform, &c.baseline)?;
        let Some(build) = build.filter(|b| !b.artifact_sha256.is_empty()) else {
            return Ok(Err(format!(
                "no build of the baseline runtime {} is recorded",
                short(&c.baseline)
            )));
        };
        let stored = match self.inner.artifacts.contains(&build.artifact_sha256) {
            Ok(stored) => stored,
            Err(e) => return Ok(Err(format!("its artifact cannot be looked up: {e}"))),
        };
        if !stored {
            return Ok(Err(format!(
                "the baseline runtime {}'s artifact was deleted (artifact GC; raise artifacts.keep to keep more)",
                short(&c.baseline)
            )));
        }
        let Some(orig) = self.inner.dispatch.get(c.original.job_id)? else {
            return Ok(Err("the original job is gone".into()));
        };
        let project_commit = orig
            .spec
            .repository
            .as_ref()
            .map(|r| r.rev.clone())
            .unwrap_or_default();
        // The original's checkout (its commit), whatever the branch is now.
        let spec = super::jobs::test_spec(p, u, &c.platform, &build, &project_commit);
        Ok(Ok(spec))
    }

    /// A held build's confirmation settled: the commit's build that counts
    /// now (the confirmed original, or a trusted agent's build that
    /// overruled it) fans out, idempotently like every fan-out.
    async fn follow_settled_build(&self, c: &Confirmation) -> Result<(), PipelineError> {
        let Some(b) = self
            .inner
            .results
            .build(&c.upstream, &c.platform, &c.commit)?
        else {
            return Ok(());
        };
        let counts = b.confirmation.is_empty() || b.confirmation == ConfirmState::Confirmed.word();
        if b.state == BuildState::Passed as i32 && counts && !self.superseded(&b)? {
            self.fan_out(self.upstream(&c.upstream)?, &b).await?;
        }
        self.collect_garbage().await;
        Ok(())
    }

    /// Counts one judged verdict on its agent's record; quarantines the
    /// agent when that says so.
    async fn count(&self, j: &Judged) -> Result<(), PipelineError> {
        let counted = match self
            .inner
            .credentials
            .count_confirmation(&j.agent_id, j.rerun_job, j.agreed, self.inner.quarantine)
            .await
        {
            Ok(counted) => counted,
            Err(AuthError::Store(e)) => return Err(e.into()),
            Err(e) => {
                tracing::warn!(agent = %j.agent_id, "cannot count a confirmation run on the agent: {e}");
                return Ok(());
            }
        };
        if counted == Counted::Before {
            return Ok(());
        }
        if !j.agreed {
            tracing::warn!(
                agent = %j.agent_id,
                job = j.rerun_job,
                "a confirmation run disagreed with the agent's verdict: {}",
                j.detail
            );
        }
        if let Counted::Quarantined(why) = counted {
            tracing::warn!(
                agent = %j.agent_id,
                "agent quarantined, it gets no job until the operator runs `trunkfarm agent release {}` (or revokes it): {why}",
                j.agent_id
            );
            self.inner
                .dispatch
                .set_quarantined(&j.agent_id, true)
                .await?;
        }
        Ok(())
    }

    /// Submits re-run `n` of `kind` of job `original` (once per key): the
    /// same spec (or, for the baseline, the same project commit on the
    /// series' last good runtime), to another agent than the original's
    /// (where its rules only prefer another: the original's when no other
    /// fits), trusted first.
    async fn submit_confirmation(
        &self,
        original: u64,
        c: &Confirmation,
        kind: RerunKind,
        n: u32,
    ) -> Result<(), PipelineError> {
        let Some(rec) = self.inner.dispatch.get(original)? else {
            tracing::warn!(
                job = original,
                "the job whose verdict awaits confirmation is gone"
            );
            return Ok(());
        };
        let Some(of) = JobKey::parse(&rec.key) else {
            return Ok(());
        };
        let key = JobKey::Rerun {
            of: Box::new(of.base().clone()),
            kind,
            job: original,
            n,
        };
        let mut spec = match kind {
            RerunKind::Baseline => match self.baseline_spec(c)? {
                Ok(spec) => spec,
                // Gone since it was checked: the next follow says so.
                Err(_) => return Ok(()),
            },
            // The same spec: a build of an upstream that builds on any agent
            // is not trusted-only, and neither is its confirmation; one that
            // is (a verdict held from an older record) stays so.
            RerunKind::Confirm | RerunKind::Again | RerunKind::Calibrate => {
                JobSpec::from(rec.spec.clone())
            }
        };
        // A trusted agent's result is judged by trusted agents only: a
        // volunteer's re-run would otherwise decide its class (a lying
        // "green" makes a real regression flaky; a lying baseline makes it
        // the project's own), and nothing would hold it to that.
        if c.original.trusted {
            spec.trusted_only = true;
        }
        // Not the agent it checks, nor one enrolled with the same token;
        // or, where its rules allow it, those only when no other fits.
        let mut others = vec![c.original.agent_id.clone()];
        others.extend(
            self.inner
                .credentials
                .enrolled_alongside(&c.original.agent_id)?,
        );
        // Ahead of ordinary work: a held verdict's mail (or its absence)
        // waits for these runs, fan-out of newer commits does not.
        let placement = match c.exclude_agents().is_empty() {
            true => Placement {
                avoid_agents: others,
                prefer_trusted: true,
                ahead: true,
                ..Default::default()
            },
            false => Placement {
                exclude_agents: others,
                prefer_trusted: true,
                ahead: true,
                ..Default::default()
            },
        };
        let (job, new) = match self
            .inner
            .dispatch
            .submit_placed(spec, 0, key.to_string(), placement)
            .await
        {
            Ok(submitted) => submitted,
            // The original's spec no longer passes (the operator lowered
            // dispatch.max_job_timeout since): no retry makes it pass, so
            // say so and let the inbox go on; the verdict stays awaiting.
            Err(DispatchError::InvalidJob(why)) => {
                tracing::warn!(
                    job = original,
                    "cannot queue the confirmation of job {original}: {why}; its verdict stays awaiting confirmation"
                );
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        if new {
            tracing::info!(
                job,
                original,
                upstream = %c.upstream,
                "re-running job {original} ({} at {}): {}",
                if c.project.is_empty() { "the build" } else { c.project.as_str() },
                short(&c.commit),
                match kind {
                    RerunKind::Baseline => format!("the same project commit on the baseline runtime {}", short(&c.baseline)),
                    _ => format!("the same spec again (#{n})"),
                },
            );
        }
        Ok(())
    }
}
