//! Retention: the background task that prunes what piles up with every job
//! — old runs and their test cases and transitions, builds, ended
//! bisections (`results`), finished jobs' logs (`logs`), job records with
//! their once-only markers (`dispatch`'s `k<key>`, results' `p/`, `nx/`,
//! settled `c/` and `k/` calibration runs), the head order of commits long
//! past (`pipeline`), delivered mails, reminder counts and unsubscribe
//! times (`notify`) — as `[retention]` says. Each owner removes its own
//! records (`Results::prune_step`, `Results::forget_jobs`,
//! `JobLogs::remove`, `Dispatcher::remove_jobs`, `Pipeline::prune_heads`,
//! `Notifier::prune_mails`…); this module holds the
//! policy and the pace: a pass every `retention.interval`, in steps of at
//! most [`STEP`] records, each one atomic write made durable, with a pause
//! between steps, so no lock is held for long and dispatch never waits on
//! a big delete. What is still needed — `Results::kept`: the latest
//! results, open went-reds, running bisections, held verdicts — is never
//! removed, whatever its age. A pass ends early at shutdown; the next one
//! starts over (every step is idempotent).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::RetentionSection;
use crate::dispatch::{Dispatcher, Next};
use crate::logs::JobLogs;
use crate::notify::Notifier;
use crate::pipeline::Pipeline;
use crate::results::{Cursor, PAGE_RUNS, Policy, Pruned, Results};
use crate::store::{StoreError, now_ms};

/// The most records one step removes or rewrites (log chunks, runs, job
/// records): one small write.
pub(crate) const STEP: usize = 64;

/// The pause between two steps of a pass in the hub.
const STEP_PAUSE: Duration = Duration::from_millis(10);

/// What one pass removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Report {
    /// Runs, test cases and transitions.
    pub(crate) results: Pruned,
    /// Jobs whose logs were removed.
    pub(crate) logs: usize,
    /// Finished jobs' records removed (each with its `k<key>` marker).
    pub(crate) jobs: usize,
    /// Per-job results records removed with them (`p/`, `nx/`, `c/`, `k/`).
    pub(crate) job_marks: usize,
    /// Commits whose head order went (`hh/`, `hs/`).
    pub(crate) heads: usize,
    /// Delivered mails removed.
    pub(crate) mails: usize,
    /// Reminder counts and unsubscribe times removed.
    pub(crate) notify_marks: usize,
    /// How long its parts took.
    pub(crate) took: Took,
}

/// How long each part of a pass took, pauses between steps included.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Took {
    /// Runs, test cases, transitions, builds, bisections.
    pub(crate) results: Duration,
    /// Logs.
    pub(crate) logs: Duration,
    /// Job records and the head order.
    pub(crate) jobs: Duration,
    /// Mails and notify marks.
    pub(crate) notify: Duration,
}

impl Report {
    /// Whether the pass removed anything (whatever it took).
    pub(crate) fn removed_any(&self) -> bool {
        let removed = Report {
            took: Took::default(),
            ..*self
        };
        removed != Report::default()
    }
}

/// The pruner: the owners it asks and the policy.
#[derive(Clone)]
pub(crate) struct Retention {
    results: Results,
    dispatch: Dispatcher,
    logs: Arc<JobLogs>,
    pipeline: Pipeline,
    notifier: Notifier,
    settings: RetentionSection,
}

/// The times (ms) before which each kind of record has expired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Cutoffs {
    /// Runs (beyond each series' newest) and transitions.
    pub(crate) runs: u64,
    /// Runs' test cases.
    pub(crate) test_cases: u64,
    /// Finished jobs' logs.
    pub(crate) logs: u64,
    /// Finished jobs' records.
    pub(crate) jobs: u64,
}

impl Cutoffs {
    /// The cutoffs at `now_ms` under `s`.
    pub(crate) fn at(now_ms: u64, s: &RetentionSection) -> Cutoffs {
        Cutoffs {
            runs: before(now_ms, s.runs),
            test_cases: before(now_ms, s.test_cases),
            logs: before(now_ms, s.logs),
            jobs: before(now_ms, s.jobs),
        }
    }
}

/// `now_ms` less `d` (0 when `d` reaches before the epoch).
fn before(now_ms: u64, d: Duration) -> u64 {
    now_ms.saturating_sub(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Retention {
    /// A pruner of these owners' records under `settings`.
    pub(crate) fn new(
        results: Results,
        dispatch: Dispatcher,
        logs: Arc<JobLogs>,
        pipeline: Pipeline,
        notifier: Notifier,
        settings: RetentionSection,
    ) -> Retention {
        Retention {
            results,
            dispatch,
            logs,
            pipeline,
            notifier,
            settings,
        }
    }

    /// Starts the background task: a pass every `retention.interval` until
    /// `stop`; the handle ends once it stopped (the hub awaits it at
    /// shutdown).
    pub(crate) fn start(self, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(self.settings.interval) => {}
                }
                match self.pass(now_ms(), STEP_PAUSE, &stop).await {
                    Ok(r) if r.removed_any() => tracing::info!(
                        runs = r.results.runs,
                        test_cases = r.results.cases,
                        transitions = r.results.transitions,
                        logs = r.logs,
                        jobs = r.jobs,
                        builds = r.results.builds,
                        bisections = r.results.bisections,
                        heads = r.heads,
                        mails = r.mails,
                        took_s = (r.took.results + r.took.logs + r.took.jobs + r.took.notify)
                            .as_secs_f64(),
                        "retention pruned what expired"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(
                        "retention could not prune ({e}); it tries again in {}",
                        trunkfarm_proto::settings::fmt_duration(self.settings.interval)
                    ),
                }
            }
        })
    }

    /// One pass at time `now_ms` (see [`Retention::prune`]).
    pub(crate) async fn pass(
        &self,
        now_ms: u64,
        pause: Duration,
        stop: &CancellationToken,
    ) -> Result<Report, StoreError> {
        self.prune(Cutoffs::at(now_ms, &self.settings), pause, stop)
            .await
    }

    /// One pass with these cutoffs: results, then logs, then job records,
    /// `pause` between steps; ends early (what it did stays done) once
    /// `stop` is cancelled.
    pub(crate) async fn prune(
        &self,
        cut: Cutoffs,
        pause: Duration,
        stop: &CancellationToken,
    ) -> Result<Report, StoreError> {
        let mut kept = self.results.kept()?;
        let keep_last = usize::try_from(self.settings.keep_last)
            .unwrap_or(usize::MAX)
            .max(PAGE_RUNS);
        // The builds of the commits the dashboard's columns show.
        kept.builds.extend(self.pipeline.shown_builds(keep_last)?);
        let mut report = Report::default();
        let step_pause = || async {
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            tokio::task::yield_now().await;
        };

        let policy = Policy {
            runs_before_ms: cut.runs,
            cases_before_ms: cut.test_cases,
            keep_last,
        };
        let mut part = std::time::Instant::now();
        let mut cursor = Cursor::default();
        while !matches!(cursor, Cursor::Done) && !stop.is_cancelled() {
            let pruned = self
                .results
                .prune_step(policy, &kept, &mut cursor, STEP)
                .await?;
            report.results.add(pruned);
            step_pause().await;
        }

        report.took.results = part.elapsed();
        part = std::time::Instant::now();

        // Logs, in job order (the order they were made): a finished job's
        // before the cutoff goes, unless it is kept; a log whose job record
        // is gone (pruned: finished long ago) goes too. Up to [`STEP`] jobs'
        // logs go in one step (a finished job's log is one record): one
        // step per job could not keep up with a busy farm.
        let logs_before = cut.logs;
        let mut expired = Vec::with_capacity(STEP);
        let mut with_logs = self.logs.jobs_with_logs();
        let mut next = with_logs.next_from(0)?;
        loop {
            if stop.is_cancelled() {
                return Ok(report);
            }
            // The scan is over at the last log or at a job newer than the
            // cutoff.
            let over = match next {
                None => true,
                Some(job) => {
                    let rec = self.dispatch.get(job)?;
                    if rec.as_ref().is_some_and(|r| r.created_at_ms >= logs_before) {
                        true
                    } else {
                        let finished_before = rec.is_none_or(|r| {
                            r.finished_at_ms != 0 && r.finished_at_ms < logs_before
                        });
                        if finished_before && !kept.jobs.contains(&job) {
                            expired.push(job);
                        }
                        false
                    }
                }
            };
            if expired.len() >= STEP || (over && !expired.is_empty()) {
                let mut left = &expired[..];
                while !left.is_empty() {
                    if stop.is_cancelled() {
                        return Ok(report);
                    }
                    let gone = self.logs.remove(left, STEP).await?;
                    report.logs += gone;
                    left = &left[gone..];
                    step_pause().await;
                }
                expired.clear();
            }
            if over {
                break;
            }
            next = match next.and_then(|job| job.checked_add(1)) {
                Some(from) => with_logs.next_from(from)?,
                None => None,
            };
        }

        report.took.logs = part.elapsed();
        part = std::time::Instant::now();

        // Job records with their once-only markers: only those whose key
        // the pipeline can no longer submit (`LiveKeys`); results' per-job
        // records go first, so a crash in between leaves none behind.
        let live = self.pipeline.live_keys(&kept)?;
        let submittable = |key: &str| live.submittable(key);
        let jobs_before = cut.jobs;
        let mut start = 0;
        // The first id given since the jobs' cutoff.
        let newer = loop {
            if stop.is_cancelled() {
                return Ok(report);
            }
            let (jobs, next) =
                self.dispatch
                    .prunable_jobs(jobs_before, &kept.jobs, &submittable, start, STEP)?;
            let ids: Vec<u64> = jobs.iter().map(|(id, _)| *id).collect();
            report.job_marks += self.results.forget_jobs(&ids).await?;
            self.dispatch.remove_jobs(&jobs).await?;
            report.jobs += jobs.len();
            step_pause().await;
            match next {
                Next::From(id) => start = id,
                Next::Newer(id) => break id,
            }
        };

        // The head order of commits seen before the jobs' cutoff (ids
        // and head sequences come from one counter).
        let oldest = newer.unwrap_or(u64::MAX);
        loop {
            if stop.is_cancelled() {
                return Ok(report);
            }
            let n = self.pipeline.prune_heads(oldest, keep_last, STEP).await?;
            report.heads += n;
            if n < STEP {
                break;
            }
            step_pause().await;
        }

        report.took.jobs = part.elapsed();
        part = std::time::Instant::now();

        // Delivered mails, reminder counts, unsubscribe times.
        let mut after = Some(0);
        while let Some(a) = after {
            if stop.is_cancelled() {
                return Ok(report);
            }
            let (n, next) = self
                .notifier
                .prune_mails(cut.runs, &kept.transitions, a, STEP)
                .await?;
            report.mails += n;
            after = next;
            step_pause().await;
        }
        loop {
            let n = self
                .notifier
                .prune_reminders(&kept.transitions, STEP)
                .await?
                + self.notifier.prune_unsubscribed(cut.runs, STEP).await?;
            report.notify_marks += n;
            if n == 0 || stop.is_cancelled() {
                break;
            }
            step_pause().await;
        }
        report.took.notify = part.elapsed();
        Ok(report)
    }
}

#[cfg(test)]
mod tests;
