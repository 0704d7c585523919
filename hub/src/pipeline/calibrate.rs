//! `trunkfarm calibrate`: measure a project's noise on demand. The
//! project's latest run (or a named one) is re-run N times with the same
//! spec — same project commit, same runtime — as keyed re-runs
//! `<its key>/calibrate/<its job>/<n>`: asking again (the CLI polls, an
//! operator repeats the command, the hub restarted) submits nothing twice.
//! Each finished run is counted against the original in the project's
//! noise record (`results::noise`) and stored; none is classified.

use std::collections::BTreeMap;

use trunkfarm_proto::v1::{self, JobSpec, RunStatus, TestStatus};

use super::confirm::said;
use super::{Pipeline, PipelineError};
use crate::dispatch::JobRecord;
use crate::job_key::{JobKey, RerunKind};
use crate::results::{FlakyRule, Noise, Recorded, RunInfo, RunRecord};

/// Runs per calibration when the request names none.
pub(crate) const DEFAULT_CALIBRATION_RUNS: u32 = 5;

/// The most runs one calibration may ask for.
pub(crate) const MAX_CALIBRATION_RUNS: u32 = 100;

/// What a calibration asks for.
#[derive(Clone, Debug, Default)]
pub(crate) struct CalibrateRequest {
    /// The project (required).
    pub(crate) project: String,
    /// Only its runs against this upstream (empty: any).
    pub(crate) upstream: String,
    /// Only its runs on this platform (empty: any).
    pub(crate) platform: String,
    /// How many identical runs.
    pub(crate) runs: u32,
    /// The run to repeat (its job id); 0: the project's latest run.
    pub(crate) job: u64,
}

/// Where a calibration stands.
#[derive(Clone, Debug)]
pub(crate) struct Calibration {
    /// The run repeated.
    pub(crate) original: RunInfo,
    /// How many runs were asked for.
    pub(crate) runs: u32,
    /// The calibration runs' job ids, run 1 first.
    pub(crate) jobs: Vec<u64>,
    /// The runs recorded so far (number, run), of those asked for.
    pub(crate) done: Vec<(u32, RunRecord)>,
}

impl Calibration {
    /// What the admin API answers: per test, in how many recorded runs it
    /// failed and ran (only tests that failed at least once), judged
    /// against the project's noise record `noise` under `rule`.
    pub(crate) fn summary(self, noise: &Noise, rule: FlakyRule) -> v1::CalibrateResponse {
        let status = |r: &RunRecord| RunStatus::try_from(r.info.status).unwrap_or(RunStatus::Error);
        let mut tests: BTreeMap<&str, (u32, u32)> = BTreeMap::new();
        for (_, run) in &self.done {
            for c in &run.cases {
                let failed = match TestStatus::try_from(c.status) {
                    Ok(TestStatus::Failed | TestStatus::Error) => true,
                    Ok(TestStatus::Passed) => false,
                    _ => continue,
                };
                let t = tests.entry(c.name.as_str()).or_default();
                t.0 += u32::from(failed);
                t.1 += 1;
            }
        }
        let tests = tests
            .into_iter()
            .filter(|(_, (failed, _))| *failed > 0)
            .map(|(name, (failed, ran))| v1::CalibratedTest {
                name: name.to_owned(),
                failed,
                ran,
                flaky: failed < ran,
                known_flaky: noise.tests.get(name).is_some_and(|t| rule.known_flaky(t)),
            })
            .collect();
        v1::CalibrateResponse {
            finished: self.done.len() as u32,
            red: self
                .done
                .iter()
                .filter(|(_, r)| status(r) == RunStatus::Red)
                .count() as u32,
            errors: self
                .done
                .iter()
                .filter(|(_, r)| status(r) == RunStatus::Error)
                .count() as u32,
            original: Some(self.original.into()),
            runs: self.runs,
            jobs: self.jobs,
            tests,
        }
    }
}

impl Pipeline {
    /// Every configured project's noise record (or `project`'s), with its
    /// known-flaky rule.
    pub(crate) fn flaky(&self, project: &str) -> Result<Vec<v1::ProjectNoise>, PipelineError> {
        if !project.is_empty() && !self.inner.projects.iter().any(|p| p.name == project) {
            return Err(self.no_such_project(project));
        }
        let mut out = Vec::new();
        for p in &self.inner.projects {
            if project.is_empty() || p.name == project {
                let noise = self.inner.results.noise(&p.name)?;
                out.push(crate::results::noise_wire(&p.name, &noise, p.flaky_rule()));
            }
        }
        Ok(out)
    }

    /// The calibration asked for, as the admin API answers it.
    pub(crate) async fn calibration_summary(
        &self,
        req: &CalibrateRequest,
    ) -> Result<v1::CalibrateResponse, PipelineError> {
        let c = self.calibrate(req).await?;
        let noise = self.inner.results.noise(&c.original.project)?;
        let rule = self.inner.results.flaky_rule(&c.original.project);
        Ok(c.summary(&noise, rule))
    }

    fn no_such_project(&self, name: &str) -> PipelineError {
        let known: Vec<_> = self
            .inner
            .projects
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        PipelineError::Invalid(format!(
            "no project named {name:?} is configured; known projects: {}",
            if known.is_empty() {
                "none (add [[project]] entries to the hub config)".to_owned()
            } else {
                known.join(", ")
            }
        ))
    }

    /// Queues (once per key) and reports a calibration.
    pub(crate) async fn calibrate(
        &self,
        req: &CalibrateRequest,
    ) -> Result<Calibration, PipelineError> {
        if req.runs == 0 || req.runs > MAX_CALIBRATION_RUNS {
            return Err(PipelineError::Invalid(format!(
                "--runs {} is out of range: ask for 1 to {MAX_CALIBRATION_RUNS} runs (e.g. 5)",
                req.runs
            )));
        }
        let original = self.run_to_calibrate(req)?;
        let Some(rec) = self.inner.dispatch.get(original.job_id)? else {
            return Err(PipelineError::Invalid(format!(
                "job {} (the run of {} to repeat) is no longer stored; calibrate the latest run instead (omit --job)",
                original.job_id, original.project
            )));
        };
        let Some(of @ JobKey::Test { .. }) = JobKey::parse(&rec.key) else {
            return Err(PipelineError::Invalid(format!(
                "job {} is not a pipeline test run; name a test run of {}",
                rec.id, original.project
            )));
        };
        let mut jobs = Vec::new();
        for n in 1..=req.runs {
            let key = JobKey::Rerun {
                of: Box::new(of.clone()),
                kind: RerunKind::Calibrate,
                job: rec.id,
                n,
            };
            let spec = JobSpec::from(rec.spec.clone());
            let (job, new) = self
                .inner
                .dispatch
                .submit_keyed(spec, 0, key.to_string())
                .await?;
            if new {
                tracing::info!(
                    job,
                    original = rec.id,
                    project = %original.project,
                    "calibration run {n} of {} queued",
                    req.runs
                );
            }
            jobs.push(job);
        }
        let done = self
            .inner
            .results
            .calibration(rec.id)?
            .into_iter()
            .filter(|(n, _)| (1..=req.runs).contains(n))
            .collect();
        Ok(Calibration {
            original,
            runs: req.runs,
            jobs,
            done,
        })
    }

    /// The run a calibration repeats: the one named, or the project's
    /// newest (by job id) among its series that match the request.
    fn run_to_calibrate(&self, req: &CalibrateRequest) -> Result<RunInfo, PipelineError> {
        let Some(p) = self.inner.projects.iter().find(|p| p.name == req.project) else {
            return Err(self.no_such_project(&req.project));
        };
        if !req.upstream.is_empty() {
            self.upstream(&req.upstream)?;
        }
        let mut newest: Option<RunInfo> = None;
        for u in self
            .inner
            .upstreams
            .iter()
            .filter(|u| p.tests_against(&u.name))
        {
            if !req.upstream.is_empty() && u.name != req.upstream {
                continue;
            }
            for platform in p.platforms_for(u) {
                if !req.platform.is_empty() && platform != req.platform {
                    continue;
                }
                let Some(run) = self.inner.results.latest_run(&p.name, &u.name, platform)? else {
                    continue;
                };
                if req.job != 0 {
                    let key = (&p.name, &u.name, platform);
                    if let Some(r) = self.inner.results.run(key.0, key.1, key.2, req.job)? {
                        return Ok(r.info);
                    }
                    continue;
                }
                if newest.as_ref().is_none_or(|n| n.job_id < run.info.job_id) {
                    newest = Some(run.info);
                }
            }
        }
        if req.job != 0 {
            return Err(PipelineError::Invalid(format!(
                "job {} is not a recorded run of {} (matching --upstream/--platform)",
                req.job, p.name
            )));
        }
        newest.ok_or_else(|| {
            PipelineError::Invalid(format!(
                "{} has no recorded run{} yet to repeat; wait for one (`trunkfarm status`) and try again",
                p.name,
                match (req.upstream.as_str(), req.platform.as_str()) {
                    ("", "") => String::new(),
                    (u, "") => format!(" against {u}"),
                    ("", pl) => format!(" on {pl}"),
                    (u, pl) => format!(" against {u} on {pl}"),
                }
            ))
        })
    }

    /// Records a finished calibration run `n` (job `rec`) of job
    /// `original`; it counts in the noise record only when both runs came
    /// from trusted agents.
    pub(super) async fn record_calibration(
        &self,
        rec: &JobRecord,
        finished: crate::results::Finished,
        original: u64,
        n: u32,
    ) -> Result<(), PipelineError> {
        let crate::results::Finished::Run { run, .. } = finished else {
            tracing::warn!(
                job = original,
                "a calibration of a build is not supported; ignored"
            );
            return Ok(());
        };
        let trusted = |r: &JobRecord| said(r, 0, "").trusted;
        let original_trusted = self
            .inner
            .dispatch
            .get(original)?
            .is_some_and(|o| trusted(&o));
        let trusted_pair = original_trusted && trusted(rec);
        let job = run.info.job_id;
        if let Recorded::New(_) = self
            .inner
            .results
            .record_calibration(original, n, run, trusted_pair)
            .await?
        {
            tracing::info!(
                job,
                original,
                "calibration run {n} recorded{}",
                if trusted_pair {
                    ""
                } else {
                    " (not counted as noise: a volunteer ran one of the two)"
                }
            );
        }
        Ok(())
    }
}
