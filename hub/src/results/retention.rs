//! Retention's part in the `results` tree: old runs removed, old runs'
//! test cases dropped (the summary stays), old transitions removed with
//! their index entries — a few at a time (`max_ops` per step, each step one
//! atomic write under the write lock, then durable), resuming where the
//! last step stopped. What is still needed is never touched, whatever its
//! age ([`Results::kept`]): each series' newest `keep_last` runs (its
//! latest result and what the dashboard's grid and project pages show),
//! the result of a series' open went-red (not yet fixed), of a running
//! bisection's members and of a verdict awaiting its re-runs, and a
//! transition whose run is still stored (the grid marks runs with theirs).
//! The time is an argument: tests move it.

use std::collections::HashSet;

use serde::Deserialize;

use super::keys::{self, Pointer};
use super::{
    Bisection, BuildInfo, ConfirmState, Results, RunInfo, RunRecord, SeriesState, Transition, index,
};
use crate::store::StoreError;

/// What has expired, as times (ms) before which it goes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Policy {
    /// Runs (and transitions) finished before this go.
    pub(crate) runs_before_ms: u64,
    /// Test cases of runs finished before this go.
    pub(crate) cases_before_ms: u64,
    /// Each series' newest runs kept whatever their age (at least 1; the
    /// retention task asks for at least [`super::PAGE_RUNS`]).
    pub(crate) keep_last: usize,
}

/// What one step removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Pruned {
    /// Runs removed.
    pub(crate) runs: usize,
    /// Runs whose test cases were dropped.
    pub(crate) cases: usize,
    /// Transitions removed.
    pub(crate) transitions: usize,
    /// Builds removed (`b/`).
    pub(crate) builds: usize,
    /// Ended bisections removed (`x/`).
    pub(crate) bisections: usize,
}

impl Pruned {
    fn ops(&self) -> usize {
        self.runs + self.cases + self.transitions + self.builds + self.bisections
    }

    /// Adds `other`'s counts.
    pub(crate) fn add(&mut self, other: Pruned) {
        self.runs += other.runs;
        self.cases += other.cases;
        self.transitions += other.transitions;
        self.builds += other.builds;
        self.bisections += other.bisections;
    }
}

/// Where a pass stands between steps (start a pass with the default).
#[derive(Clone, Debug, Default)]
pub(crate) enum Cursor {
    /// Runs, from this key on (the start of a series).
    #[default]
    Start,
    /// Runs, from this key on: the start of a series, or the run of a
    /// series where the last step stopped (a step never reads again what
    /// an earlier one of the pass went through).
    Runs(String),
    /// Transitions, after this id.
    Transitions(u64),
    /// Builds, from this key on.
    Builds(String),
    /// Ended bisections, from this key on.
    Bisections(String),
    /// The pass is over.
    Done,
}

/// What nothing prunes, whatever its age.
#[derive(Clone, Debug, Default)]
pub(crate) struct Kept {
    /// Jobs whose run (and log) is still needed.
    pub(crate) jobs: HashSet<u64>,
    /// Transitions still needed.
    pub(crate) transitions: HashSet<u64>,
    /// Builds still needed, as (upstream, platform, commit): the newest
    /// and newest passed, each series' last decisive and last green
    /// result's build, open went-reds' builds (and, added by the retention
    /// task, the builds of the commits the dashboard's columns show).
    pub(crate) builds: HashSet<(String, String, String)>,
    /// (upstream, platform) with a running bisection: none of their builds
    /// goes (the bisection reads stored builds of commits in its range).
    pub(crate) bisecting: HashSet<(String, String)>,
    /// Original jobs whose verdict awaits its re-runs.
    pub(crate) awaiting: HashSet<u64>,
}

/// A stored run read without decoding its cases (only counted).
#[derive(Deserialize)]
struct Shape {
    #[serde(default)]
    info: RunInfo,
    #[serde(default)]
    cases: Vec<serde::de::IgnoredAny>,
}

/// A held verdict's state alone.
#[derive(Deserialize)]
struct Held {
    #[serde(default)]
    state: ConfirmState,
}

impl Results {
    /// What retention must keep now: the latest results (each series'
    /// newest run, each upstream's newest and newest passed build), each red
    /// series' went-red and its result, each running bisection's members and their results, each
    /// verdict awaiting its re-runs. (Each series' newest runs are kept by
    /// position, in [`Results::prune_step`].)
    pub(crate) fn kept(&self) -> Result<Kept, StoreError> {
        let mut kept = Kept::default();
        let keep_transition = |kept: &mut Kept, id: u64| -> Result<(), StoreError> {
            kept.transitions.insert(id);
            if let Some(t) = self.transition(id)? {
                kept.jobs.insert(t.job_id);
                kept.builds
                    .insert((t.upstream.clone(), t.platform.clone(), t.upstream_commit));
            }
            Ok(())
        };
        // The latest results: each series' newest run and each upstream's
        // newest and newest passed build (their logs and job records).
        for item in self.table.scan::<Shape>(keys::LATEST_RUNS) {
            kept.jobs.insert(item?.1.info.job_id);
        }
        for pointer in [Pointer::Latest, Pointer::Good] {
            for item in self.table.scan::<BuildInfo>(pointer.prefix()) {
                let b = item?.1;
                kept.jobs.insert(b.job_id);
                kept.builds.insert((b.upstream, b.platform, b.commit));
            }
        }
        for item in self.table.scan::<SeriesState>(keys::SERIES) {
            let (k, state) = item?;
            if let Some(id) = state.red_now() {
                keep_transition(&mut kept, id)?;
            }
            // `s/<project>/<upstream>/<platform>` (builds: an empty project):
            // the builds its last and last green results ran on (a
            // baseline re-run runs on the last green one).
            let name = String::from_utf8_lossy(&k[keys::SERIES.len()..]).into_owned();
            if let [_, upstream, platform] = name.splitn(3, '/').collect::<Vec<_>>()[..] {
                let commits = [
                    state.last.as_ref().map(|d| &d.commits.upstream),
                    state.last_green.as_ref().map(|c| &c.upstream),
                ];
                for commit in commits.into_iter().flatten() {
                    kept.builds
                        .insert((upstream.to_owned(), platform.to_owned(), commit.clone()));
                }
            }
        }
        for b in self.running_bisections()? {
            kept.bisecting
                .insert((b.upstream.clone(), b.platform.clone()));
            for m in &b.members {
                keep_transition(&mut kept, m.transition)?;
            }
        }
        for item in self.table.scan::<Held>(keys::CONFIRMATIONS) {
            let (k, held) = item?;
            if held.state == ConfirmState::Awaiting
                && let Some(job) = keys::id_at_end(&k)
            {
                kept.jobs.insert(job);
                kept.awaiting.insert(job);
            }
        }
        Ok(kept)
    }

    /// One step of a pass: at most about `max_ops` removals or rewrites,
    /// applied atomically and durable when this returns. Advances `cursor`
    /// ([`Cursor::Done`] once the pass is over).
    pub(crate) async fn prune_step(
        &self,
        policy: Policy,
        kept: &Kept,
        cursor: &mut Cursor,
        max_ops: usize,
    ) -> Result<Pruned, StoreError> {
        let mut pruned = Pruned::default();
        let mut batch = crate::store::Batch::default();
        // Decided without the write lock (runs and transitions this removes
        // or rewrites are written by nobody else: old, not kept), applied
        // under it.
        {
            loop {
                if pruned.ops() >= max_ops {
                    break;
                }
                match cursor.clone() {
                    Cursor::Start => *cursor = Cursor::Runs(keys::RUNS.to_owned()),
                    Cursor::Runs(from) => {
                        let Some(series) = self.next_series(&from)? else {
                            // The step ends with the runs, so the
                            // transitions' step sees the runs removed.
                            *cursor = Cursor::Transitions(0);
                            break;
                        };
                        // Within the series where the last step stopped,
                        // from that run on.
                        let from = if from.starts_with(&series) {
                            from
                        } else {
                            series.clone()
                        };
                        let resume = self.prune_series(
                            (&series, &from),
                            policy,
                            kept,
                            &mut batch,
                            &mut pruned,
                            max_ops,
                        )?;
                        *cursor = Cursor::Runs(match resume {
                            Some(key) => key,
                            // Past every key of this series ('~' sorts
                            // after the ids' digits and before any longer
                            // name sharing the prefix: names hold no '/').
                            None => format!("{series}~"),
                        });
                    }
                    Cursor::Transitions(after) => {
                        let next = self.prune_transitions(
                            after,
                            policy,
                            kept,
                            &mut batch,
                            &mut pruned,
                            max_ops,
                        )?;
                        *cursor = match next {
                            Some(id) => Cursor::Transitions(id),
                            None => Cursor::Builds(keys::BUILDS.to_owned()),
                        };
                    }
                    Cursor::Builds(from) => {
                        let next = self.prune_builds(
                            &from,
                            policy,
                            kept,
                            &mut batch,
                            &mut pruned,
                            max_ops,
                        )?;
                        *cursor = match next {
                            Some(k) => Cursor::Builds(k),
                            None => Cursor::Bisections(keys::BISECTIONS.to_owned()),
                        };
                    }
                    Cursor::Bisections(from) => {
                        let next =
                            self.prune_bisections(&from, policy, &mut batch, &mut pruned, max_ops)?;
                        *cursor = match next {
                            Some(k) => Cursor::Bisections(k),
                            None => Cursor::Done,
                        };
                    }
                    Cursor::Done => break,
                }
            }
            if pruned.ops() > 0 {
                let _w = self.write_lock();
                self.table.apply(batch)?;
            }
        }
        if pruned.ops() > 0 {
            self.committed().await?;
        }
        Ok(pruned)
    }

    /// The prefix of the first series of runs whose keys are at or after
    /// `from`.
    fn next_series(&self, from: &str) -> Result<Option<String>, StoreError> {
        let mut range = self.table.range(from.as_bytes()..);
        let Some(item) = range.next() else {
            return Ok(None);
        };
        let (k, _) = item?;
        let key = String::from_utf8_lossy(&k);
        if !key.starts_with(keys::RUNS) {
            return Ok(None);
        }
        match key.rsplit_once('/') {
            Some((series, _)) => Ok(Some(format!("{series}/"))),
            None => Err(self.table.corrupt(key, "a run key without a job id")),
        }
    }

    /// Stages one series' expired runs (its newest `keep_last` and kept
    /// jobs aside) and expired test cases (kept jobs' aside: the pages read
    /// runs' summaries only), from its run at key `from` on (the series'
    /// prefix: all; the two as one argument). Returns `None` once it got to the end of the series,
    /// or the key to go on from when `max_ops` was reached first.
    fn prune_series(
        &self,
        (series, from): (&str, &str),
        policy: Policy,
        kept: &Kept,
        batch: &mut crate::store::Batch,
        pruned: &mut Pruned,
        max_ops: usize,
    ) -> Result<Option<String>, StoreError> {
        // The newest `keep_last` runs stay: find the oldest of them (a
        // bounded reverse read), then walk the older runs oldest first,
        // stopping at the first whose cases have not expired (job ids, and
        // so keys, grow with time).
        let keep_last = policy.keep_last.max(1);
        let boundary = match self.table.keys(series).rev().nth(keep_last - 1) {
            None => return Ok(None),
            Some(k) => k?,
        };
        let resume_at = |k: &[u8]| Some(String::from_utf8_lossy(k).into_owned());
        let start = from.as_bytes().max(series.as_bytes());
        let older = self.table.range(start..boundary.as_ref().max(start));
        for item in older {
            let (k, v) = item?;
            if pruned.ops() >= max_ops {
                return Ok(resume_at(&k));
            }
            let run: Shape = self.table.decode(&k, &v)?;
            let i = &run.info;
            if i.finished_at_ms >= policy.cases_before_ms.max(policy.runs_before_ms) {
                break;
            }
            if kept.jobs.contains(&i.job_id) || i.finished_at_ms == 0 {
                continue;
            }
            if i.finished_at_ms < policy.runs_before_ms {
                batch.remove(k);
                pruned.runs += 1;
            } else if i.finished_at_ms < policy.cases_before_ms && !run.cases.is_empty() {
                let mut full: RunRecord = self.table.decode(&k, &v)?;
                full.cases = Vec::new();
                self.table.stage(batch, &k, &full)?;
                pruned.cases += 1;
            }
        }
        // The newest runs' cases expire too (the pages read summaries),
        // unless their job is kept (the latest run's is).
        for item in self.table.scan::<Shape>(series).rev().take(keep_last) {
            if pruned.ops() >= max_ops {
                // The older runs are done: go on from the newest ones.
                return Ok(resume_at(&boundary));
            }
            let (k, run) = item?;
            let i = &run.info;
            if kept.jobs.contains(&i.job_id)
                || i.finished_at_ms == 0
                || i.finished_at_ms >= policy.cases_before_ms
                || run.cases.is_empty()
            {
                continue;
            }
            let Some(mut full) = self.table.get::<RunRecord>(&k)? else {
                continue;
            };
            full.cases = Vec::new();
            self.table.stage(batch, &k, &full)?;
            pruned.cases += 1;
        }
        Ok(None)
    }

    /// Stages expired transitions after id `after`, oldest first; returns
    /// the last id looked at when `max_ops` was reached, `None` once it got
    /// to the first one not expired (ids grow with time) or the end.
    fn prune_transitions(
        &self,
        after: u64,
        policy: Policy,
        kept: &Kept,
        batch: &mut crate::store::Batch,
        pruned: &mut Pruned,
        max_ops: usize,
    ) -> Result<Option<u64>, StoreError> {
        let from = keys::transition(after.saturating_add(1));
        let end = keys::transition(u64::MAX);
        let mut last = after;
        for item in self.table.range(from.as_bytes()..=end.as_bytes()) {
            let (k, v) = item?;
            let t: Transition = self.table.decode(&k, &v)?;
            if t.at_ms >= policy.runs_before_ms {
                return Ok(None);
            }
            if pruned.ops() >= max_ops {
                return Ok(Some(last));
            }
            let still_shown = !t.project.is_empty()
                && self.table.contains(keys::run(
                    &t.project,
                    &t.upstream,
                    &t.platform,
                    t.job_id,
                ))?;
            if !kept.transitions.contains(&t.id) && !still_shown {
                batch.remove(k);
                index::unstage(batch, &t);
                pruned.transitions += 1;
            }
            last = t.id;
        }
        Ok(None)
    }

    /// Stages expired builds (`b/…`) from key `from` on: finished before
    /// the runs' cutoff and not needed ([`Kept::builds`], a kept job's,
    /// an (upstream, platform) being bisected); a pending build stays.
    /// Returns the key to go on from when `max_ops` was reached.
    fn prune_builds(
        &self,
        from: &str,
        policy: Policy,
        kept: &Kept,
        batch: &mut crate::store::Batch,
        pruned: &mut Pruned,
        max_ops: usize,
    ) -> Result<Option<String>, StoreError> {
        let end = format!("{}\u{ff}", keys::BUILDS);
        for item in self.table.range(from.as_bytes()..end.as_bytes()) {
            let (k, v) = item?;
            if pruned.ops() >= max_ops {
                return Ok(Some(String::from_utf8_lossy(&k).into_owned()));
            }
            let b: BuildInfo = self.table.decode(&k, &v)?;
            let needed = b.finished_at_ms == 0
                || b.finished_at_ms >= policy.runs_before_ms
                || kept.jobs.contains(&b.job_id)
                || kept
                    .bisecting
                    .contains(&(b.upstream.clone(), b.platform.clone()))
                || kept.builds.contains(&(b.upstream, b.platform, b.commit));
            if !needed {
                batch.remove(k);
                pruned.builds += 1;
            }
        }
        Ok(None)
    }

    /// Stages ended bisections (`x/…`: no member waits) that started
    /// before the runs' cutoff, from key `from` on (their answers stay in
    /// their transitions). Returns the key to go on from when `max_ops` was
    /// reached.
    fn prune_bisections(
        &self,
        from: &str,
        policy: Policy,
        batch: &mut crate::store::Batch,
        pruned: &mut Pruned,
        max_ops: usize,
    ) -> Result<Option<String>, StoreError> {
        let end = format!("{}\u{ff}", keys::BISECTIONS);
        for item in self.table.range(from.as_bytes()..end.as_bytes()) {
            let (k, v) = item?;
            if pruned.ops() >= max_ops {
                return Ok(Some(String::from_utf8_lossy(&k).into_owned()));
            }
            let b: Bisection = self.table.decode(&k, &v)?;
            if !b.running() && b.started_at_ms < policy.runs_before_ms {
                batch.remove(k);
                pruned.bisections += 1;
            }
        }
        Ok(None)
    }

    /// Removes what the results tree keeps per job once dispatch prunes
    /// the jobs' records (call before it does, so a crash in between
    /// leaves nothing behind): the `p/<job>` "recorded" marker (a job
    /// whose record is gone is never delivered again), a re-run's `nx/<job>`
    /// "counted as noise" marker, a settled `c/<job>` confirmation, and the
    /// `k/<job>/…` calibration runs of an original (calibrating needs the
    /// original's record). One atomic write, durable when this returns.
    /// Returns how many records it removed.
    pub(crate) async fn forget_jobs(&self, jobs: &[u64]) -> Result<usize, StoreError> {
        let mut batch = crate::store::Batch::default();
        let mut removed = 0;
        for &job in jobs {
            for k in [keys::recorded(job), keys::noise_counted(job)] {
                if self.table.contains(&k)? {
                    batch.remove(k.as_bytes());
                    removed += 1;
                }
            }
            if let Some(c) = self.table.get::<Held>(keys::confirmation(job))?
                && c.state != ConfirmState::Awaiting
            {
                batch.remove(keys::confirmation(job).as_bytes());
                removed += 1;
            }
            for k in self.table.keys(keys::calibration_runs(job)) {
                batch.remove(k?);
                removed += 1;
            }
        }
        if removed > 0 {
            {
                let _w = self.write_lock();
                self.table.apply(batch)?;
            }
            self.committed().await?;
        }
        Ok(removed)
    }
}
