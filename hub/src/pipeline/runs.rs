//! What the run page (`web/run.rs`) asks the pipeline about one job: the
//! run or build results recorded for it, the runtime it tested, the
//! confirmation its verdict (or the verdict it re-runs) is held in, and the
//! transition that classed it. Read only; every fact from `results`' own
//! queries.

use super::{Pipeline, PipelineError, intake};
use crate::dispatch::JobRecord;
use crate::job_key::JobKey;
use crate::results::{BuildInfo, Confirmation, Finished, RunRecord, Transition};

/// What the pipeline knows of one job besides its dispatch record.
#[derive(Clone, Debug, Default)]
pub(crate) struct RunFacts {
    /// Its pipeline key, read back (`None`: a job submitted by hand).
    pub(crate) key: Option<JobKey>,
    /// A test job's run with every test case: as `results` recorded it,
    /// or, for a job whose run is not in its series (a re-run, a
    /// bisection's run) while its record still holds its reports (until the
    /// pipeline took it in), read from them the way intake reads them.
    pub(crate) run: Option<RunRecord>,
    /// The run is the one `results` recorded (not read from the reports).
    pub(crate) recorded: bool,
    /// A build job's build as recorded (when it is this job's), or the
    /// build of the runtime a test job tested.
    pub(crate) build: Option<BuildInfo>,
    /// The build job that made the runtime a test job tested (0: unknown).
    pub(crate) runtime_job: u64,
    /// The confirmation of its verdict, or of the verdict it re-runs.
    pub(crate) confirmation: Option<Confirmation>,
    /// The transition its result made (or confirmed), if any.
    pub(crate) transition: Option<Transition>,
}

impl Pipeline {
    /// The facts the run page shows about job `rec`.
    pub(crate) async fn run_facts(&self, rec: &JobRecord) -> Result<RunFacts, PipelineError> {
        let mut facts = RunFacts {
            key: JobKey::parse(&rec.key),
            ..RunFacts::default()
        };
        let Some(key) = facts.key.clone() else {
            return Ok(facts);
        };
        let results = &self.inner.results;
        match key.base() {
            JobKey::Build {
                upstream,
                platform,
                commit,
                ..
            } => {
                facts.build = results
                    .build(upstream, platform, commit)?
                    .filter(|b| b.job_id == rec.id);
            }
            JobKey::Test {
                project,
                upstream,
                platform,
                upstream_commit,
                nonce,
                ..
            } => {
                facts.run = results.run(project, upstream, platform, rec.id)?;
                facts.recorded = facts.run.is_some();
                let build = results.build(upstream, platform, upstream_commit)?;
                facts.runtime_job = match (nonce, &build) {
                    (Some(job), _) => *job,
                    (None, Some(b)) if b.artifact_sha256 == rec.spec.artifact_sha256 => b.job_id,
                    _ => 0,
                };
                facts.build = build.filter(|b| b.job_id == facts.runtime_job);
                // Report files leave a job's record once the pipeline took
                // it in (`dispatch::JobTable::ack_inbox`): a re-run's cases
                // are only there until then.
                let reports = rec
                    .result
                    .as_ref()
                    .is_some_and(|r| r.reports.iter().any(|f| !f.data.is_empty()));
                if facts.run.is_none() && reports {
                    facts.run = Self::run_of_reports(rec, key.clone()).await;
                }
            }
            _ => {}
        }
        let judged = match &key {
            JobKey::Rerun { job, .. } => *job,
            _ => rec.id,
        };
        facts.confirmation = results.confirmation(judged)?;
        if rec.result.is_some() {
            // Recorded once the job's result (or the re-run confirming it)
            // was taken in, so never before the job was created: the scan
            // stops there, and a job that made no transition costs the
            // transitions since it, not the whole history.
            facts.transition = results
                .transitions_since(rec.created_at_ms, 1, |t| {
                    t.job_id == rec.id || t.confirmed_by_job == rec.id
                })?
                .into_iter()
                .next();
        }
        Ok(facts)
    }

    /// A finished test job's run read from its own reports, as intake
    /// reads them (off the async threads: reports may be megabytes).
    async fn run_of_reports(rec: &JobRecord, key: JobKey) -> Option<RunRecord> {
        let rec = rec.clone();
        let finished = tokio::task::spawn_blocking(move || {
            intake::finished(&rec, key, intake::Facts::default(), None)
        })
        .await
        .ok()?;
        match finished {
            Finished::Run { run, .. } => Some(run),
            Finished::Build(_) => None,
        }
    }
}
