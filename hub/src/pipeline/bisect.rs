//! Bisection: when a went-red result's culprit range holds several upstream
//! commits, find the first bad one by building commits inside the range and
//! running only the projects that went red there (same project commit, same
//! platform) until one commit is left.
//!
//! The record is `results`' ([`Bisection`], one per (upstream, platform,
//! range), shared by every project that went red in it); a member joins in
//! the write of its transition. Everything here is derived again from that
//! record, the stored builds and keyed submits, whenever a bisection job is
//! taken in and on the pipeline's tick (and so at start-up): a crash at any
//! moment loses and repeats nothing.
//!
//! * [`step`] — pure: given what each commit said, the next commit to try,
//!   or the answer. Binary search (at most ⌈log2 N⌉ tries for N commits);
//!   a commit that did not build is skipped, git-bisect style (its nearest
//!   neighbour is tried instead); when only skipped commits are left between
//!   the last good and the first bad, the answer is that range.
//! * a commit's build: a passed build already stored (its artifact on the
//!   hub) is reused and not counted; otherwise the bisection's own build,
//!   `<build key>/bisect/1`, trusted agents only, queued ahead of ordinary
//!   work, recorded as a build of a commit that never was the head (it
//!   decides nothing in the build series) and never fanned out. At most
//!   `pipeline.bisect_max_builds` of them per bisection; past that it gives
//!   up with the range narrowed so far.
//! * a member's run: `<test key>/bisect/<n>`, queued ahead, never classified
//!   into the series: what it said is written into the bisection. One that
//!   ends in an infrastructure error is run once more (`n` = 2), then that
//!   commit counts as skipped for the member.
//! * the end: the member's transition shows the answer (found, range, gave
//!   up; the builds made), and the notifier stages what that causes, in one
//!   atomic write ([`Results::end_bisection`]).

use trunkfarm_proto::v1::{BuildState, RunStatus};

use super::{Pipeline, PipelineError};
use crate::commit::short;
use crate::config::UpstreamConfig;
use crate::dispatch::{JobRecord, Placement};
use crate::job_key::JobKey;
use crate::results::{
    Bisect, BisectState, Bisection, BuildInfo, Class, Commit, Finished, Member, PointBuild,
    PointRun, Recorded, RunRecord,
};
use crate::store::now_ms;

/// How long a bisection may take before it gives up with the range it
/// narrowed (its builds and runs are queued ahead of other work; this only
/// ends one whose jobs never come: no trusted agent, a stuck build), in ms.
pub(crate) const MAX_BISECTION_MS: u64 = 48 * 3600 * 1000;

/// A member's answer when its bisection cannot go on at all (`why`):
/// every commit of the range is still a candidate.
fn gave_up(b: &Bisection, why: &str) -> Bisect {
    Bisect {
        state: BisectState::GaveUp,
        candidates: b.commits.clone(),
        builds: b.made(),
        detail: why.to_owned(),
        ..Default::default()
    }
}

/// Tries of a member's run at one commit before an infrastructure error
/// makes it a skipped commit.
const RUN_TRIES: usize = 2;

/// What one commit of the range said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Point {
    /// The project passed: the first bad commit is later.
    Good,
    /// The project failed: the first bad commit is this or earlier.
    Bad,
    /// It cannot say (did not build, or its runs kept failing for the
    /// machine's sake).
    Skip,
}

/// Where a search stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Step {
    /// Try this commit (index into the range) next.
    Try(usize),
    /// This commit is the first bad one.
    Found(usize),
    /// One of the commits `from..=to` is the first bad one; every commit
    /// between them that could tell was skipped.
    Range(usize, usize),
}

/// The search over a range of `said.len()` commits, oldest first, whose
/// last one is known bad and whose predecessor (outside the range) is known
/// good; `said[i]` is what commit `i` said (`None`: not tried yet or under
/// way). The candidates are the commits after the last good one up to the
/// first bad one; the next try is the candidate nearest their middle that
/// was not skipped.
pub(super) fn step(said: &[Option<Point>]) -> Step {
    if said.is_empty() {
        return Step::Found(0);
    }
    let (lo, hi) = bounds(said);
    if lo == hi {
        return Step::Found(lo);
    }
    // Candidates lo..=hi; hi is bad already: try one of lo..hi, splitting
    // the candidates in halves, its nearest neighbours when it was skipped.
    let mid = lo + (hi - lo - 1) / 2;
    let mut order = vec![mid];
    for d in 1..=(hi - lo) {
        if mid + d < hi {
            order.push(mid + d);
        }
        if let Some(i) = mid.checked_sub(d).filter(|i| *i >= lo) {
            order.push(i);
        }
    }
    match order.into_iter().find(|&i| said[i] != Some(Point::Skip)) {
        Some(i) => Step::Try(i),
        None => Step::Range(lo, hi),
    }
}

/// The candidates a search left: `from..=to` of the range.
fn span(commits: &[Commit], from: usize, to: usize) -> Vec<Commit> {
    commits[from..=to.min(commits.len() - 1)].to_vec()
}

/// What a member's runs at one commit said: the last run's verdict; a run
/// that ended in an error counts once the run was tried [`RUN_TRIES`] times.
/// `suspicious`: the tests the member's suspicious run executed; then a
/// green run executing no more than that shows the same drop (bad).
fn run_point(said: &[PointRun], suspicious: Option<u32>) -> Option<Point> {
    let last = said.last()?;
    match RunStatus::try_from(last.status).unwrap_or(RunStatus::Error) {
        RunStatus::Green if suspicious.is_some_and(|n| last.executed <= n) => Some(Point::Bad),
        RunStatus::Green => Some(Point::Good),
        RunStatus::Red => Some(Point::Bad),
        _ if said.len() >= RUN_TRIES => Some(Point::Skip),
        _ => None,
    }
}

/// What the next step of one member is.
enum Next {
    /// It has its answer.
    End(Bisect),
    /// Build commit `i` of the range (the budget allows it).
    Build(usize),
    /// Run the member against commit `i`'s build, try `n`.
    Run(usize, Box<BuildInfo>, u32),
    /// Wait for a build or run under way.
    Wait,
}

impl Pipeline {
    /// Every running bisection, one step further where it can go. Errors
    /// are logged (one bisection's do not stop the others) and the next
    /// job taken in or tick tries again.
    pub(super) async fn follow_bisections(&self) {
        let running = match self.inner.results.running_bisections() {
            Ok(running) => running,
            Err(e) => {
                tracing::warn!("cannot read the bisections (will retry): {e}");
                return;
            }
        };
        for b in running {
            if let Err(e) = self.follow_bisection(&b.key()).await {
                tracing::warn!(
                    upstream = %b.upstream,
                    platform = %b.platform,
                    "cannot follow the bisection of {}..{} (will retry): {e}",
                    short(&b.good),
                    b.commits.last().map_or("", |c| short(&c.sha)),
                );
            }
        }
    }

    /// Takes a finished bisection job in (`of`: what it builds or runs):
    /// a build is recorded like any build of a commit that never was the
    /// head, a run is written into the bisections it answers; then every
    /// running bisection goes on.
    pub(super) async fn take_in_bisection(
        &self,
        rec: &JobRecord,
        of: &JobKey,
    ) -> Result<(), PipelineError> {
        let mut finished = self.intake(rec, of.clone()).await?;
        match &mut finished {
            Finished::Build(b) => {
                // Decides nothing in the build series, moves no pointer.
                b.head_seq = 0;
                let recorded = self
                    .inner
                    .results
                    .record(finished, None, self, &self.inner.notifier)
                    .await?;
                if let Recorded::New(_) = recorded {
                    tracing::info!(job = rec.id, "bisection build taken in");
                }
            }
            Finished::Run { run, .. } => self.note_bisect_run(rec.id, run).await?,
        }
        // Best effort, as after any job (see `take_in`).
        self.follow_bisections().await;
        self.collect_garbage().await;
        Ok(())
    }

    /// Writes what bisection run `job` said into every running bisection
    /// it answers (once per job: a redelivered or re-read run adds nothing).
    async fn note_bisect_run(&self, job: u64, run: &RunRecord) -> Result<(), PipelineError> {
        let i = &run.info;
        let said = PointRun {
            job,
            status: i.status,
            executed: i.tests_total.saturating_sub(i.tests_skipped),
        };
        for b in self.inner.results.running_bisections()? {
            let answers = b.upstream == i.upstream
                && b.platform == i.platform
                && b.builds.contains_key(&i.upstream_commit)
                && b.members.iter().any(|m| {
                    !m.ended && m.project == i.project && m.project_commit == i.project_commit
                });
            if !answers {
                continue;
            }
            let (project, pc, commit) = (&i.project, &i.project_commit, &i.upstream_commit);
            self.inner
                .results
                .update_bisection(&b.key(), |b| {
                    let mut changed = false;
                    for m in b
                        .members
                        .iter_mut()
                        .filter(|m| !m.ended && &m.project == project && &m.project_commit == pc)
                    {
                        let runs = m.said.entry(commit.clone()).or_default();
                        if !runs.iter().any(|r| r.job == said.job) {
                            runs.push(said.clone());
                            changed = true;
                        }
                    }
                    changed
                })
                .await?;
        }
        Ok(())
    }

    /// One bisection, as far as it can go now: each waiting member's next
    /// step (its answer written, or the build or run it needs queued).
    async fn follow_bisection(&self, key: &str) -> Result<(), PipelineError> {
        // Each pass writes at most one build choice; a few passes settle it.
        for _ in 0..8 {
            let Some(b) = self.inner.results.bisection(key)? else {
                return Ok(());
            };
            let Ok(u) = self.upstream(&b.upstream).cloned() else {
                for m in b.members.iter().filter(|m| !m.ended) {
                    let answer = gave_up(&b, "the upstream is no longer configured");
                    self.end(key, m.transition, answer).await?;
                }
                return Ok(());
            };
            let mut chose_build = false;
            for m in b.members.iter().filter(|m| !m.ended) {
                match self.next(&b, m)? {
                    Next::End(answer) => self.end(key, m.transition, answer).await?,
                    Next::Wait => {}
                    Next::Run(i, build, n) => {
                        self.submit_bisect_run(&u, &b, m, i, &build, n).await?
                    }
                    Next::Build(i) => {
                        self.choose_build(&u, &b, i).await?;
                        chose_build = true;
                        break;
                    }
                }
            }
            if !chose_build {
                return Ok(());
            }
        }
        Ok(())
    }

    /// What each commit of the range said for member `m` so far, from the
    /// bisection's record and the builds stored.
    fn said(&self, b: &Bisection, m: &Member) -> Result<Vec<Option<Point>>, PipelineError> {
        let suspicious = match m.class {
            Some(Class::Suspicious) => self.executed_by(b, m)?,
            _ => None,
        };
        let mut said = Vec::with_capacity(b.commits.len());
        for c in &b.commits {
            said.push(match b.builds.get(&c.sha) {
                None => None,
                Some(pb) => match self.usable_build(b, &c.sha, pb)? {
                    Usable::Yes(_) => m.said.get(&c.sha).and_then(|s| run_point(s, suspicious)),
                    Usable::No => Some(Point::Skip),
                    Usable::NotYet => None,
                },
            });
        }
        Ok(said)
    }

    /// The commits member `m`'s search has narrowed its range to so far
    /// (the pages show a bisection in progress with them).
    pub(super) fn narrowed(&self, b: &Bisection, m: &Member) -> Result<Vec<Commit>, PipelineError> {
        if b.commits.is_empty() {
            return Ok(Vec::new());
        }
        let (from, to) = bounds(&self.said(b, m)?);
        Ok(span(&b.commits, from, to))
    }

    /// A member's next step, from the bisection's record and the builds stored.
    fn next(&self, b: &Bisection, m: &Member) -> Result<Next, PipelineError> {
        let said = self.said(b, m)?;
        let made = b.made();
        let answer = |state, first_bad, candidates, detail| Bisect {
            state,
            first_bad,
            candidates,
            builds: made,
            detail,
        };
        let skipped: Vec<&str> = (b.commits.iter().zip(&said))
            .filter(|(_, p)| **p == Some(Point::Skip))
            .map(|(c, _)| short(&c.sha))
            .collect();
        let skipped_words = match skipped.len() {
            0 => String::new(),
            _ => format!("; skipped (did not build or run): {}", skipped.join(", ")),
        };
        // Gave up (`why`) with the range narrowed so far as the candidates.
        let narrowed = |why: &str| {
            let (from, to) = bounds(&said);
            Next::End(answer(
                BisectState::GaveUp,
                None,
                span(&b.commits, from, to),
                format!("{why}: {} candidate(s) left{skipped_words}", to - from + 1),
            ))
        };
        Ok(match step(&said) {
            Step::Found(i) => Next::End(answer(
                BisectState::Found,
                Some(b.commits[i].clone()),
                Vec::new(),
                format!(
                    "first bad commit {} found after {made} build(s) of {} commit(s){skipped_words}",
                    short(&b.commits[i].sha),
                    b.commits.len(),
                ),
            )),
            Step::Range(from, to) => Next::End(answer(
                BisectState::Range,
                None,
                span(&b.commits, from, to),
                format!(
                    "one of {} commits is the first bad one: the others between them could not be tested{skipped_words}",
                    to - from + 1
                ),
            )),
            Step::Try(_) if now_ms().saturating_sub(b.started_at_ms) > MAX_BISECTION_MS => {
                // Its builds or runs never came (no trusted agent, a build
                // stuck elsewhere): say what is known rather than wait forever.
                let limit = std::time::Duration::from_millis(MAX_BISECTION_MS);
                let why = format!("no answer within {}", humantime::format_duration(limit));
                narrowed(&why)
            }
            Step::Try(i) => {
                let sha = &b.commits[i].sha;
                match b.builds.get(sha) {
                    None if self.reusable(b, sha)?.is_some() => Next::Build(i),
                    None if made >= self.inner.bisect_max_builds => narrowed(&format!(
                        "stopped after {made} build(s) (pipeline.bisect_max_builds)"
                    )),
                    None => Next::Build(i),
                    Some(pb) => match self.usable_build(b, sha, pb)? {
                        Usable::Yes(build) => {
                            let tries = m.said.get(sha).map_or(0, Vec::len);
                            Next::Run(i, build, tries as u32 + 1)
                        }
                        Usable::No | Usable::NotYet => Next::Wait,
                    },
                }
            }
        })
    }

    /// The tests member `m`'s own went-red run executed.
    fn executed_by(&self, b: &Bisection, m: &Member) -> Result<Option<u32>, PipelineError> {
        let Some(t) = self.inner.results.transition(m.transition)? else {
            return Ok(None);
        };
        let run = (self.inner.results).run(&m.project, &b.upstream, &b.platform, t.job_id)?;
        Ok(run.map(|r| r.info.tests_total.saturating_sub(r.info.tests_skipped)))
    }

    /// A stored passed build of `commit` whose artifact is on the hub (any
    /// build of the commit serves).
    fn stored_build(
        &self,
        b: &Bisection,
        commit: &str,
    ) -> Result<Option<BuildInfo>, PipelineError> {
        let Some(build) = self.inner.results.build(&b.upstream, &b.platform, commit)? else {
            return Ok(None);
        };
        let counts = build.confirmation.is_empty() || build.confirmation == "confirmed";
        let stored = !build.artifact_sha256.is_empty()
            && self
                .inner
                .artifacts
                .get(&build.artifact_sha256)
                .ok()
                .flatten()
                .is_some();
        Ok((build.state == BuildState::Passed as i32 && counts && stored).then_some(build))
    }

    /// The job of a stored build of `commit` that answers without a new
    /// build: passed with its artifact on the hub, or failed (the commit
    /// does not build: skipped).
    fn reusable(&self, b: &Bisection, commit: &str) -> Result<Option<u64>, PipelineError> {
        if let Some(build) = self.stored_build(b, commit)? {
            return Ok(Some(build.job_id));
        }
        let stored = self.inner.results.build(&b.upstream, &b.platform, commit)?;
        Ok(stored
            .filter(|s| s.state == BuildState::Failed as i32)
            .map(|s| s.job_id))
    }

    /// Whether the build a bisection chose for `commit` can be tested against.
    fn usable_build(
        &self,
        b: &Bisection,
        commit: &str,
        pb: &PointBuild,
    ) -> Result<Usable, PipelineError> {
        if let Some(build) = self.stored_build(b, commit)? {
            return Ok(Usable::Yes(Box::new(build)));
        }
        let Some(build) = self.inner.results.build(&b.upstream, &b.platform, commit)? else {
            return Ok(Usable::NotYet);
        };
        let finished = build.state != BuildState::Pending as i32;
        Ok(if build.job_id == pb.job_id && finished {
            // Failed, or an error after dispatch's own attempts: skipped.
            Usable::No
        } else {
            Usable::NotYet
        })
    }

    /// Chooses commit `i`'s build: a stored one reused (see
    /// [`Pipeline::reusable`]), or the bisection's own queued (once per
    /// key) and counted.
    async fn choose_build(
        &self,
        u: &UpstreamConfig,
        b: &Bisection,
        i: usize,
    ) -> Result<(), PipelineError> {
        let sha = b.commits[i].sha.clone();
        let chosen = match self.reusable(b, &sha)? {
            Some(job_id) => PointBuild {
                job_id,
                made: false,
            },
            None => {
                let job_id = self.submit_bisect_build(u, &b.platform, &sha).await?;
                PointBuild { job_id, made: true }
            }
        };
        self.inner
            .results
            .update_bisection(&b.key(), |b| {
                if b.builds.contains_key(&sha) {
                    return false;
                }
                b.builds.insert(sha.clone(), chosen);
                true
            })
            .await?;
        Ok(())
    }

    /// Queues the bisection's build of `commit` (once per key): trusted
    /// agents only, ahead of ordinary work. Returns its job.
    async fn submit_bisect_build(
        &self,
        u: &UpstreamConfig,
        platform: &str,
        commit: &str,
    ) -> Result<u64, PipelineError> {
        let key = JobKey::Bisect {
            of: Box::new(JobKey::Build {
                upstream: u.name.clone(),
                platform: platform.to_owned(),
                commit: commit.to_owned(),
                nonce: None,
            }),
            n: 1,
        };
        let mut spec = super::jobs::build_spec(u, platform, commit);
        // A bisection build is not confirmed by a second one: only a
        // trusted agent's runtime is run by others here.
        spec.trusted_only = true;
        let (job, new) = self
            .inner
            .dispatch
            .submit_placed(spec, 0, key.to_string(), ahead())
            .await?;
        if new {
            tracing::info!(
                upstream = %u.name,
                platform = %platform,
                job,
                "bisection: building {}",
                short(commit)
            );
        }
        Ok(job)
    }

    /// Queues member `m`'s run `n` against commit `i`'s build (once per key).
    async fn submit_bisect_run(
        &self,
        u: &UpstreamConfig,
        b: &Bisection,
        m: &Member,
        i: usize,
        build: &BuildInfo,
        n: u32,
    ) -> Result<(), PipelineError> {
        let Some(p) = self.inner.projects.iter().find(|p| p.name == m.project) else {
            let answer = gave_up(b, "the project is no longer configured");
            return self.end(&b.key(), m.transition, answer).await;
        };
        let key = JobKey::Bisect {
            of: Box::new(JobKey::Test {
                project: p.name.clone(),
                upstream: u.name.clone(),
                platform: b.platform.clone(),
                upstream_commit: b.commits[i].sha.clone(),
                project_commit: m.project_commit.clone(),
                nonce: Some(build.job_id),
            }),
            n,
        };
        let mut spec = super::jobs::test_spec(p, u, &b.platform, build, &m.project_commit);
        // One run decides a commit, and so the first bad commit named in
        // mails and `breakage`: a volunteer's word alone must not.
        spec.trusted_only = true;
        let (job, new) = self
            .inner
            .dispatch
            .submit_placed(spec, 0, key.to_string(), ahead())
            .await?;
        if !new
            && let Some(rec) = self.inner.dispatch.get(job)?
            && rec.result.is_some()
        {
            // Run before for another member of the same project commit
            // (the inbox handed it over then): what it said counts here too.
            if let Finished::Run { run, .. } = self.intake(&rec, key.base().clone()).await? {
                self.note_bisect_run(job, &run).await?;
            }
        }
        if new {
            tracing::info!(
                project = %p.name,
                upstream = %u.name,
                platform = %b.platform,
                job,
                "bisection: testing against {} {}",
                u.name,
                short(&b.commits[i].sha)
            );
        }
        Ok(())
    }

    /// Writes a member's answer (see [`crate::results::Results::end_bisection`]).
    async fn end(&self, key: &str, transition: u64, answer: Bisect) -> Result<(), PipelineError> {
        let ended = self
            .inner
            .results
            .end_bisection(key, transition, answer, &self.inner.notifier)
            .await?;
        if let Some(t) = ended
            && let Some(a) = &t.bisect
        {
            self.inner.notifier.wake();
            tracing::warn!(
                transition = t.id,
                project = %t.project,
                upstream = %t.upstream,
                platform = %t.platform,
                "bisection {}: {}",
                a.state.word(),
                a.detail
            );
        }
        Ok(())
    }
}

/// Whether a chosen build can be tested against.
enum Usable {
    /// Yes: this build.
    Yes(Box<BuildInfo>),
    /// Never: it failed (the commit is skipped).
    No,
    /// Not yet: under way.
    NotYet,
}

/// The candidates a search has narrowed to so far (`said` not empty):
/// after the last good commit before the first bad one, up to that bad one
/// (the range's last commit is bad whatever it said).
fn bounds(said: &[Option<Point>]) -> (usize, usize) {
    let n = said.len();
    let hi = said[..n - 1]
        .iter()
        .position(|p| *p == Some(Point::Bad))
        .unwrap_or(n - 1);
    let lo = said[..hi]
        .iter()
        .rposition(|p| *p == Some(Point::Good))
        .map_or(0, |i| i + 1);
    (lo, hi)
}

/// Where bisection jobs queue: ahead of ordinary work.
fn ahead() -> Placement {
    Placement {
        ahead: true,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the search over `n` commits whose first bad one is `bad`, with
    /// the commits in `broken` not building; returns the answer and the
    /// commits tried (skipped ones included).
    fn search(n: usize, bad: usize, broken: &[usize]) -> (Step, Vec<usize>) {
        let mut said = vec![None; n];
        let mut tried = Vec::new();
        loop {
            match step(&said) {
                Step::Try(i) => {
                    assert!(said[i].is_none(), "{i} tried twice");
                    tried.push(i);
                    said[i] = Some(if broken.contains(&i) {
                        Point::Skip
                    } else if i >= bad {
                        Point::Bad
                    } else {
                        Point::Good
                    });
                }
                end => return (end, tried),
            }
        }
    }

    #[test]
    fn a_range_of_n_commits_is_searched_in_at_most_log2_n_tries() {
        for n in 1..=70usize {
            let most = (n as f64).log2().ceil() as usize;
            for bad in 0..n {
                let (end, tried) = search(n, bad, &[]);
                assert_eq!(end, Step::Found(bad), "n {n} bad {bad}");
                assert!(tried.len() <= most, "n {n} bad {bad}: {tried:?}");
                assert!(!tried.contains(&(n - 1)), "the bad end is known");
            }
        }
        // The story's numbers: 64 commits, the 37th the first bad one.
        let (end, tried) = search(64, 36, &[]);
        assert_eq!((end, tried.len()), (Step::Found(36), 6));
        // The first try splits the range in halves.
        assert_eq!(step(&[None; 64]), Step::Try(31));
        assert_eq!(step(&[None; 2]), Step::Try(0));
    }

    #[test]
    fn a_commit_that_does_not_build_is_skipped_for_a_neighbour() {
        // The middle does not build: its neighbour is tried instead, and the
        // answer stays exact, one try more per skip.
        let (end, tried) = search(64, 36, &[31, 47]);
        assert_eq!(end, Step::Found(36));
        assert_eq!(tried[..2], [31, 32]);
        assert!(tried.len() <= 6 + 2, "{tried:?}");
        // When skips hide the answer: the honest range.
        let (end, _) = search(64, 36, &[35]);
        assert_eq!(end, Step::Range(35, 36));
        // The first bad commit itself does not build: it and the skipped
        // commits before it, up to the next bad one.
        let (end, _) = search(8, 3, &[1, 2, 3]);
        assert_eq!(end, Step::Range(1, 4));
        // Everything but the known bad end skipped: the whole range.
        let (end, tried) = search(4, 3, &[0, 1, 2]);
        assert_eq!((end, tried.len()), (Step::Range(0, 3), 3));
    }

    #[test]
    fn what_a_commit_said_is_read_from_its_runs() {
        let run = |job, status: RunStatus, executed| PointRun {
            job,
            status: status as i32,
            executed,
        };
        let (g, r, e) = (RunStatus::Green, RunStatus::Red, RunStatus::Error);
        assert_eq!(run_point(&[], None), None);
        assert_eq!(run_point(&[run(1, g, 20)], None), Some(Point::Good));
        assert_eq!(run_point(&[run(1, r, 20)], None), Some(Point::Bad));
        // An infrastructure error is tried once more, then skipped.
        assert_eq!(run_point(&[run(1, e, 0)], None), None);
        assert_eq!(
            run_point(&[run(1, e, 0), run(2, r, 20)], None),
            Some(Point::Bad)
        );
        assert_eq!(
            run_point(&[run(1, e, 0), run(2, e, 0)], None),
            Some(Point::Skip)
        );
        // A suspicious green (0 of 20 tests executed): green runs showing
        // the same drop are bad, those executing more are good.
        assert_eq!(run_point(&[run(1, g, 0)], Some(0)), Some(Point::Bad));
        assert_eq!(run_point(&[run(1, g, 20)], Some(0)), Some(Point::Good));
        assert_eq!(run_point(&[run(1, r, 20)], Some(0)), Some(Point::Bad));
        // The budget's narrowed range: after the last good, to the first bad.
        let mut said = vec![None; 10];
        said[2] = Some(Point::Good);
        said[7] = Some(Point::Bad);
        assert_eq!(bounds(&said), (3, 7));
    }
}
