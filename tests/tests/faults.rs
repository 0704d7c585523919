//! Fault injection: the hub and the agents `kill -9`ed at random moments while
//! work is in flight, and a network link that stalls and drops. What must hold
//! whatever the timing: every job submitted exists once and finishes once,
//! with one result and an attempt history that accounts for every run; each
//! pipeline transition is recorded once and mailed once per subscriber.
//!
//! The moments of the faults come from one seeded generator per test; the
//! seed is printed, and `TRUNKFARM_FAULTS_SEED=<n>` replays the same schedule
//! (the same delays and victims; the processes' own timing still varies).
//! Every test has a hard deadline and fails saying where it was stuck.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Display;
use std::fs;
use std::io::{Read as _, Write as _};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use trunkfarm_e2e::farm::{
    FIXED, RUNTIME, Repos, SHOUTER_MAINTAINER, STILL_GREEN, WENT_RED, broken_runtime, smtp_toml,
};
use trunkfarm_e2e::proto::enrollment::Enrollment;
use trunkfarm_e2e::proto::v1::{
    GetJobRequest, JobInfo, JobSpec, JobState, ListJobsRequest, Outcome, SubmitJobRequest,
    WatchJobRequest, watch_job_event,
};
use trunkfarm_e2e::smtp::SmtpSink;
use trunkfarm_e2e::{
    AdminClient, Agent, Hub, attempts, lines_with, read_lossy, runtime, s, temp_dir, u,
};

// ---------------------------------------------------------------------------
// Seeded randomness and the hard deadline
// ---------------------------------------------------------------------------

/// Replays a test's fault schedule: `TRUNKFARM_FAULTS_SEED=<n>`.
const SEED_ENV: &str = "TRUNKFARM_FAULTS_SEED";

/// xorshift64*: enough to spread faults over time, and reproducible from
/// its seed (the tests crate has no random-number dependency).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // Zero is xorshift's one fixed point.
        Rng((seed ^ 0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0; the modulo bias is irrelevant here).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A delay uniform in `[lo_ms, hi_ms)`.
    fn millis(&mut self, lo_ms: u64, hi_ms: u64) -> Duration {
        Duration::from_millis(lo_ms + self.below(hi_ms - lo_ms))
    }
}

/// Starts a fault test: builds the binaries (outside the clock: the harness
/// builds them on first use, which may take minutes), picks the seed — from
/// [`SEED_ENV`], else from the clock — and prints it so a failure can be
/// replayed, and starts the hard deadline.
fn faults(test: &'static str, limit: Duration) -> (Rng, Deadline) {
    let _ = trunkfarm_e2e::bins();
    let seed = match std::env::var(SEED_ENV) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{SEED_ENV}={v:?} is not an unsigned integer")),
        Err(_) => {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            nanos ^ (u64::from(std::process::id()) << 32)
        }
    };
    eprintln!("{test}: seed {seed} (replay the schedule with {SEED_ENV}={seed})");
    let deadline = Deadline {
        test,
        seed,
        started: Instant::now(),
        limit,
    };
    (Rng::new(seed), deadline)
}

/// A test's hard time limit: every wait checks it, so a stuck test fails
/// saying what it was waiting for instead of hanging CI.
struct Deadline {
    test: &'static str,
    seed: u64,
    started: Instant,
    limit: Duration,
}

impl Deadline {
    /// Panics if the limit passed, naming what the test was doing.
    fn check(&self, doing: impl Display) {
        let elapsed = self.started.elapsed();
        if elapsed > self.limit {
            panic!(
                "{} exceeded its hard deadline of {:?} ({:.1?} elapsed) while {doing} \
                 (replay with {SEED_ENV}={})",
                self.test, self.limit, elapsed, self.seed
            );
        }
    }

    fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Polls `f` every `every` until it gives a value, within the deadline.
    fn wait_for<T>(&self, doing: &str, every: Duration, mut f: impl FnMut() -> Option<T>) -> T {
        loop {
            if let Some(v) = f() {
                return v;
            }
            self.check(doing);
            std::thread::sleep(every);
        }
    }
}

// ---------------------------------------------------------------------------
// Jobs that leave a trace of every run
// ---------------------------------------------------------------------------

/// A job for the crash loops: prints its marker `done-<N>` to its log, and
/// when it completes appends `<job id> <attempt>` to the shared runs file,
/// outside every agent, so runs the hub never heard of are counted too.
fn traced_job(n: usize, runs: &Path) -> SubmitJobRequest {
    SubmitJobRequest {
        spec: Some(JobSpec {
            commands: vec![format!(
                "echo \"done-$N\"; sleep 0.0{}; echo \"$TRUNKFARM_JOB_ID $TRUNKFARM_ATTEMPT\" >> \"$RUNS\"",
                n % 9 + 1
            )],
            env: HashMap::from([
                ("N".to_string(), n.to_string()),
                ("RUNS".to_string(), runs.display().to_string()),
            ]),
            timeout_secs: 60,
            ..Default::default()
        }),
        // Far more than a job can lose here: each must end Passed, not
        // "attempts used up".
        max_attempts: 20,
        ..Default::default()
    }
}

/// Submits `traced_job(0..n)` before any fault (a submit that failed would
/// leave it open whether the job exists); returns job id → N.
async fn submit_all(admin: &AdminClient, n: usize, runs: &Path) -> HashMap<u64, usize> {
    // Several in flight share the hub's group commit (one fsync for many).
    let limit = Arc::new(tokio::sync::Semaphore::new(16));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let mut admin = admin.clone();
        let req = traced_job(i, runs);
        let permit = limit.clone().acquire_owned().await.expect("semaphore");
        set.spawn(async move {
            let id = admin
                .submit_job(req)
                .await
                .unwrap_or_else(|s| panic!("SubmitJob of job N={i} failed (no fault yet): {s}"))
                .into_inner()
                .job_id;
            drop(permit);
            (id, i)
        });
    }
    let mut ids = HashMap::new();
    while let Some(r) = set.join_next().await {
        let (id, i) = r.expect("submit task");
        if let Some(other) = ids.insert(id, i) {
            panic!("SubmitJob returned job id {id} twice: for N={other} and N={i}");
        }
    }
    ids
}

/// Every job the hub has, newest first.
async fn list_all(admin: &AdminClient) -> Result<Vec<JobInfo>, tonic::Status> {
    Ok(admin
        .clone()
        .list_jobs(ListJobsRequest {
            state: 0,
            limit: 100_000,
            ..Default::default()
        })
        .await?
        .into_inner()
        .jobs)
}

/// The stored log of each job's last attempt (what `trunkfarm job log`
/// prints), read over `WatchJob`.
async fn last_attempt_logs(admin: &AdminClient, jobs: &[JobInfo]) -> HashMap<u64, String> {
    let limit = Arc::new(tokio::sync::Semaphore::new(8));
    let mut set = tokio::task::JoinSet::new();
    for j in jobs {
        let (id, attempt) = (j.job_id, j.attempt);
        let mut admin = admin.clone();
        let permit = limit.clone().acquire_owned().await.expect("semaphore");
        set.spawn(async move {
            let mut stream = admin
                .watch_job(WatchJobRequest { job_id: id })
                .await
                .unwrap_or_else(|s| panic!("WatchJob {id}: {s}"))
                .into_inner();
            let mut log = Vec::new();
            while let Some(ev) = stream
                .message()
                .await
                .unwrap_or_else(|s| panic!("WatchJob {id} stream: {s}"))
            {
                if let Some(watch_job_event::Event::Log(c)) = ev.event
                    && c.job.is_some_and(|r| r.attempt == attempt)
                {
                    log.extend_from_slice(&c.data);
                }
            }
            drop(permit);
            (id, String::from_utf8_lossy(&log).into_owned())
        });
    }
    let mut logs = HashMap::new();
    while let Some(r) = set.join_next().await {
        let (id, log) = r.expect("log task");
        logs.insert(id, log);
    }
    logs
}

/// When to strike: `n` seeded points in the run, as numbers of jobs run to
/// completion (sorted, before the last few jobs), so the faults land on work
/// in flight however fast the machine is. Points may coincide: a fault
/// then hits the recovery from the previous one.
fn strike_points(rng: &mut Rng, n: usize, jobs: usize) -> Vec<usize> {
    let mut points: Vec<usize> = (0..n)
        .map(|_| rng.below((jobs * 9 / 10) as u64) as usize)
        .collect();
    points.sort_unstable();
    points
}

/// Waits until at least `at` jobs ran to completion; returns how many had.
fn wait_until_run(runs: &Path, at: usize, deadline: &Deadline, before: &str) -> usize {
    deadline.wait_for(
        &format!("waiting for {at} jobs to have run before {before}"),
        Duration::from_millis(20),
        || {
            let done = completed_jobs(runs);
            (done >= at).then_some(done)
        },
    )
}

/// How many distinct jobs ran to completion at least once so far.
fn completed_jobs(runs: &Path) -> usize {
    completions(runs)
        .keys()
        .map(|(job, _)| *job)
        .collect::<HashSet<_>>()
        .len()
}

/// How often each (job, attempt) ran to completion, from the runs file.
fn completions(runs: &Path) -> BTreeMap<(u64, u32), usize> {
    let text = read_lossy(runs);
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let parsed = line
            .split_once(' ')
            .and_then(|(j, a)| Some((j.parse().ok()?, a.parse().ok()?)));
        let key = parsed.unwrap_or_else(|| {
            panic!(
                "malformed line {line:?} in the runs file {}",
                runs.display()
            )
        });
        *out.entry(key).or_insert(0) += 1;
    }
    out
}

fn state_name(j: &JobInfo) -> &'static str {
    match j.state() {
        JobState::Queued => "queued",
        JobState::Leased => "leased",
        JobState::Running => "running",
        JobState::Finished => "finished",
        JobState::Unspecified => "unspecified",
    }
}

/// A job in one line for failure messages: state, result, attempt history.
fn brief(j: &JobInfo) -> String {
    let result = j.result.as_ref().map(|r| {
        format!(
            "{:?} attempt {} ({})",
            r.outcome(),
            r.job.map(|x| x.attempt).unwrap_or(0),
            r.detail
        )
    });
    let history: Vec<String> = j
        .attempts
        .iter()
        .map(|a| {
            if a.lost_reason.is_empty() {
                format!("#{} on {}", a.attempt, a.agent_id)
            } else {
                format!("#{} on {} lost: {}", a.attempt, a.agent_id, a.lost_reason)
            }
        })
        .collect();
    format!(
        "job {} {} attempt {}/{} result {:?} attempts [{}]",
        j.job_id,
        state_name(j),
        j.attempt,
        j.max_attempts,
        result,
        history.join("; ")
    )
}

/// Counts of jobs per state, for progress lines.
fn state_counts(jobs: &[JobInfo]) -> String {
    let mut c: BTreeMap<&str, usize> = BTreeMap::new();
    for j in jobs {
        *c.entry(state_name(j)).or_insert(0) += 1;
    }
    format!("{c:?}")
}

/// A broken promise: its kind (to summarize many) and what was seen.
type Problem = (&'static str, String);

/// Everything the crash loops promise about a batch of jobs; returns the
/// violations, each naming the offending records.
fn check_jobs(
    submitted: &HashMap<u64, usize>,
    jobs: &[JobInfo],
    runs: &BTreeMap<(u64, u32), usize>,
    logs: &HashMap<u64, String>,
) -> Vec<Problem> {
    let mut problems: Vec<Problem> = Vec::new();

    // Each submitted id exactly once, and nothing else.
    let listed = trunkfarm_e2e::tally(jobs.iter().map(|j| j.job_id.to_string()));
    for (id, n) in &listed {
        if *n != 1 {
            problems.push((
                "listing",
                format!("ListJobs shows job {id} {n} times (expected once)"),
            ));
        }
    }
    let have: HashSet<u64> = jobs.iter().map(|j| j.job_id).collect();
    let want: HashSet<u64> = submitted.keys().copied().collect();
    let mut missing: Vec<_> = want.difference(&have).collect();
    missing.sort();
    if !missing.is_empty() {
        problems.push((
            "listing",
            format!(
                "{} submitted job(s) (whose ids SubmitJob returned) are gone: {missing:?}",
                missing.len()
            ),
        ));
    }
    for j in jobs.iter().filter(|j| !want.contains(&j.job_id)) {
        problems.push((
            "listing",
            format!("a job nobody submitted appeared: {}", brief(j)),
        ));
    }

    for j in jobs.iter().filter(|j| want.contains(&j.job_id)) {
        let id = j.job_id;
        let n = submitted[&id];
        // Finished, passed, with its one result.
        let Some(r) = j.result.as_ref() else {
            problems.push((
                "result",
                format!("N={n}: expected finished with a result: {}", brief(j)),
            ));
            continue;
        };
        if j.state() != JobState::Finished || r.outcome() != Outcome::Passed {
            problems.push((
                "result",
                format!("N={n}: expected finished and passed: {}", brief(j)),
            ));
        }
        // The history accounts for every attempt: 1..=attempt in order,
        // all lost but the last, which produced the result.
        let numbers: Vec<u32> = j.attempts.iter().map(|a| a.attempt).collect();
        let expected: Vec<u32> = (1..=j.attempt).collect();
        let result_attempt = r.job.map(|x| x.attempt).unwrap_or(0);
        if numbers != expected
            || j.attempts.last().is_none_or(|a| !a.lost_reason.is_empty())
            || j.attempts[..j.attempts.len().saturating_sub(1)]
                .iter()
                .any(|a| a.lost_reason.is_empty())
            || result_attempt != j.attempt
            || j.attempts.last().is_some_and(|a| a.agent_id != j.agent_id)
        {
            problems.push((
                "history",
                format!(
                    "N={n}: inconsistent attempt history (expected attempts 1..={} in order, \
                 each lost but the last, whose agent produced the result of attempt {}): {}",
                    j.attempt,
                    j.attempt,
                    brief(j)
                ),
            ));
        }
        // Every run that completed is a recorded attempt: a run the hub lost
        // track of must show up as a lost attempt (and was retried), never
        // as a second, unrecorded run.
        let ran: Vec<(u32, usize)> = runs
            .range((id, 0)..=(id, u32::MAX))
            .map(|(&(_, a), &c)| (a, c))
            .collect();
        let total: usize = ran.iter().map(|(_, c)| c).sum();
        if total > j.attempts.len()
            || ran
                .iter()
                .any(|&(a, c)| c > 1 || a == 0 || a as usize > j.attempts.len())
        {
            problems.push((
                "runs",
                format!(
                    "N={n}: runs that completed (attempt, times) {ran:?} are not all recorded \
                 attempts (expected each attempt at most once, ≤ {} in all): {}",
                    j.attempts.len(),
                    brief(j)
                ),
            ));
        }
        if !ran.iter().any(|&(a, _)| a == result_attempt) {
            problems.push((
                "runs",
                format!(
                    "N={n}: the recorded result is attempt {result_attempt}, which never completed \
                 according to the runs file (completed: {ran:?}): {}",
                    brief(j)
                ),
            ));
        }
        // The stored log of the attempt that counts holds its output once.
        let marker = format!("done-{n}");
        match logs.get(&id) {
            Some(log) if lines_with(log, "done-") == [marker.as_str()] => {}
            Some(log) => problems.push((
                "log",
                format!(
                    "N={n}: expected `{marker}` exactly once in the log of attempt {}, got {:?}; \
                 {}; log:\n{log}",
                    j.attempt,
                    lines_with(log, "done-"),
                    brief(j)
                ),
            )),
            None => problems.push(("log", format!("N={n}: no log read for job {id}"))),
        }
    }
    problems
}

/// Fails listing how many violations of each kind there are, and the first
/// few of each.
fn assert_no_problems(what: &str, seed: u64, problems: &[Problem]) {
    const SHOWN_PER_KIND: usize = 8;
    if problems.is_empty() {
        return;
    }
    let mut by_kind: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (kind, text) in problems {
        by_kind.entry(kind).or_default().push(text);
    }
    let counts: Vec<String> = by_kind
        .iter()
        .map(|(k, v)| format!("{k}: {}", v.len()))
        .collect();
    let mut text = String::new();
    for (kind, list) in &by_kind {
        text.push_str(&format!(
            "---- {kind} ({} in all, first {}) ----\n",
            list.len(),
            list.len().min(SHOWN_PER_KIND)
        ));
        for p in list.iter().take(SHOWN_PER_KIND) {
            text.push_str(p);
            text.push('\n');
        }
    }
    panic!(
        "{what}: {} violation(s) [{}] (seed {seed}):\n{text}",
        problems.len(),
        counts.join(", ")
    );
}

/// Waits until every job is finished (polling ListJobs), within the
/// deadline; returns the final list.
fn wait_all_finished(
    rt: &tokio::runtime::Runtime,
    hub: &Hub,
    total: usize,
    deadline: &Deadline,
) -> Vec<JobInfo> {
    let admin = rt.block_on(hub.admin());
    let mut last_report = Instant::now();
    loop {
        let jobs = rt
            .block_on(list_all(&admin))
            .unwrap_or_else(|s| panic!("ListJobs failed with the hub up: {s}"));
        let done = jobs
            .iter()
            .filter(|j| j.state() == JobState::Finished)
            .count();
        if done >= total {
            return jobs;
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            eprintln!(
                "  {:.1?}: {done}/{total} finished {}",
                deadline.elapsed(),
                state_counts(&jobs)
            );
            last_report = Instant::now();
        }
        let open: Vec<String> = jobs
            .iter()
            .filter(|j| j.state() != JobState::Finished)
            .take(20)
            .map(brief)
            .collect();
        deadline.check(format_args!(
            "waiting for all {total} jobs to finish ({done} finished; some open ones:\n{})",
            open.join("\n")
        ));
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Enrolls and starts `n` trusted agents (they may build runtimes) with
/// two slots each.
fn start_agents(hub: &Hub, prefix: &str, n: usize) -> Vec<Agent> {
    let mut agents: Vec<Agent> = (0..n)
        .map(|i| Agent::enroll(hub, &format!("{prefix}{i}"), &["--trusted"]))
        .collect();
    for a in &mut agents {
        a.start(AGENT_ARGS);
    }
    hub.wait_agents_connected(n);
    agents
}

const AGENT_ARGS: &[&str] = &["--max-parallel-jobs", "2"];

/// Kills the hub, then restarts it; `down` is how long it stays dead.
fn crash_hub(hub: &mut Hub, down: Duration) {
    hub.kill9();
    std::thread::sleep(down);
    hub.restart();
}

/// The final check of a crash loop: everything finished, then one more
/// kill -9 and restart, and the same state must be read back (nothing shown
/// was only in memory); then every promise about the jobs is checked.
fn final_check(
    rt: &tokio::runtime::Runtime,
    hub: &mut Hub,
    submitted: &HashMap<u64, usize>,
    runs_file: &Path,
    deadline: &Deadline,
) {
    let before = wait_all_finished(rt, hub, submitted.len(), deadline);
    // ListJobs may show a result whose commit is still under way; GetJob
    // of a finished job waits for the disk, and so covers every earlier write.
    let last = before.first().expect("jobs were listed").job_id;
    rt.block_on(async {
        hub.admin()
            .await
            .get_job(GetJobRequest { job_id: last })
            .await
            .unwrap_or_else(|s| panic!("GetJob {last}: {s}"))
    });
    crash_hub(hub, Duration::ZERO);
    let admin = rt.block_on(hub.admin());
    let after = rt
        .block_on(list_all(&admin))
        .unwrap_or_else(|s| panic!("ListJobs after the last restart: {s}"));
    let key = |j: &JobInfo| {
        (
            j.job_id,
            j.state,
            j.attempt,
            j.agent_id.clone(),
            j.result.as_ref().map(|r| (r.outcome, r.started_at_ms)),
        )
    };
    let before_keys: HashMap<u64, _> = before.iter().map(|j| (j.job_id, key(j))).collect();
    let changed: Vec<String> = after
        .iter()
        .filter(|j| before_keys.get(&j.job_id) != Some(&key(j)))
        .take(20)
        .map(|j| {
            format!(
                "before: {}\n after: {}",
                before
                    .iter()
                    .find(|b| b.job_id == j.job_id)
                    .map(brief)
                    .unwrap_or_else(|| "(absent)".into()),
                brief(j)
            )
        })
        .collect();
    assert!(
        changed.is_empty() && after.len() == before.len(),
        "what the hub showed before a final kill -9 differs after the restart \
         ({} jobs before, {} after; expected the same, durable records):\n{}",
        before.len(),
        after.len(),
        changed.join("\n")
    );

    let logs = rt.block_on(last_attempt_logs(&admin, &after));
    let runs = completions(runs_file);
    let problems = check_jobs(submitted, &after, &runs, &logs);
    let lost: usize = after
        .iter()
        .map(|j| j.attempts.len().saturating_sub(1))
        .sum();
    let extra_runs: usize = runs.values().sum::<usize>().saturating_sub(after.len());
    eprintln!(
        "{:.1?}: {} jobs finished; {lost} attempt(s) lost and retried; {extra_runs} run(s) \
         completed beyond one per job",
        deadline.elapsed(),
        after.len()
    );
    assert_no_problems("after the faults", deadline.seed, &problems);
}

// ---------------------------------------------------------------------------
// 1. The hub killed again and again
// ---------------------------------------------------------------------------

/// 500 jobs across 4 agents while the hub is `kill -9`ed 10 times at random
/// moments: no job lost, none run without being recorded, one result each.
#[test]
fn hub_crash_loop_loses_and_duplicates_nothing() {
    const JOBS: usize = 500;
    const AGENTS: usize = 4;
    const KILLS: usize = 10;
    let (mut rng, deadline) = faults(
        "hub_crash_loop_loses_and_duplicates_nothing",
        Duration::from_secs(90),
    );
    let rt = runtime();
    let mut hub = Hub::start();
    let _agents = start_agents(&hub, "crash-", AGENTS);
    let scratch = temp_dir("trunkfarm-e2e-faults-");
    let runs_file = scratch.path().join("runs");

    // Everything is submitted before the first fault: a submit cut off by a
    // kill would leave it open whether its job exists.
    let admin = rt.block_on(hub.admin());
    let submitted = rt.block_on(submit_all(&admin, JOBS, &runs_file));
    drop(admin);
    eprintln!("{:.1?}: {JOBS} jobs submitted", deadline.elapsed());

    for (k, at) in strike_points(&mut rng, KILLS, JOBS).into_iter().enumerate() {
        let k = k + 1;
        wait_until_run(&runs_file, at, &deadline, &format!("hub kill #{k}"));
        // Off the beat of the runs file: anywhere in a job's life.
        std::thread::sleep(rng.millis(0, 200));
        let done = completed_jobs(&runs_file);
        let down = rng.millis(0, 400);
        eprintln!(
            "{:.1?}: kill #{k} of the hub with {done}/{JOBS} jobs run; down {down:?}",
            deadline.elapsed()
        );
        crash_hub(&mut hub, down);
    }

    final_check(&rt, &mut hub, &submitted, &runs_file, &deadline);
    eprintln!("done in {:.1?}", deadline.elapsed());
}

/// The smallest case of what the crash loop checks for every job's log: a
/// line the hub received (and showed to a watcher) before a `kill -9` is
/// still in the job's log once the job's result is recorded after the
/// restart. (The hub stores chunks without waiting for the disk, so this
/// holds only if a chunk lost with the hub is sent again.)
#[test]
fn a_log_line_the_hub_received_survives_a_hub_kill() {
    let (_, deadline) = faults(
        "a_log_line_the_hub_received_survives_a_hub_kill",
        Duration::from_secs(60),
    );
    let rt = runtime();
    let mut hub = Hub::start();
    let _agents = start_agents(&hub, "logkill-", 1);
    let id = hub.submit(&[
        "--max-attempts",
        "3",
        "--",
        "echo before-the-kill; sleep 3; echo after-the-kill",
    ]);
    // Read the line back from the hub over WatchJob: it has it.
    let admin = rt.block_on(hub.admin());
    rt.block_on(async {
        let mut stream = admin
            .clone()
            .watch_job(WatchJobRequest { job_id: id })
            .await
            .expect("WatchJob")
            .into_inner();
        let mut seen = String::new();
        while !seen.contains("before-the-kill") {
            deadline.check("waiting for the hub to show the job's first line");
            match tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
                Ok(Ok(Some(ev))) => {
                    if let Some(watch_job_event::Event::Log(c)) = ev.event {
                        seen.push_str(&String::from_utf8_lossy(&c.data));
                    }
                }
                other => panic!("WatchJob {id} ended before the first line: {other:?}"),
            }
        }
    });
    drop(admin);
    crash_hub(&mut hub, Duration::ZERO);
    let j = hub.wait_job_finished(id, Duration::from_secs(30));
    assert!(
        s(&j, "outcome") == "passed" && u(&j, "attempt") == 1,
        "the job should pass as attempt 1 (its agent kept the lease across the restart): {j:#}"
    );
    let log = hub.job_log(id);
    assert!(
        lines_with(&log, "before-the-kill") == ["before-the-kill"]
            && lines_with(&log, "after-the-kill") == ["after-the-kill"],
        "expected the log of the job's one attempt to hold both lines once; \
         `before-the-kill` reached the hub (a watcher saw it) before the kill. Log:\n{log}"
    );
    deadline.check("at the end");
}

// ---------------------------------------------------------------------------
// 2. Agents killed and restarted again and again
// ---------------------------------------------------------------------------

/// 300 jobs across 4 agents while agents are `kill -9`ed and restarted (same
/// state dir) at random moments, some back at once, some only after their
/// leases expired: one result per job, every completed run recorded.
#[test]
fn agent_churn_loses_and_duplicates_nothing() {
    const JOBS: usize = 300;
    const AGENTS: usize = 4;
    const KILLS: usize = 10;
    let (mut rng, deadline) = faults(
        "agent_churn_loses_and_duplicates_nothing",
        Duration::from_secs(90),
    );
    let rt = runtime();
    let mut hub = Hub::start();
    let mut agents = start_agents(&hub, "churn-", AGENTS);
    let scratch = temp_dir("trunkfarm-e2e-faults-");
    let runs_file = scratch.path().join("runs");

    let admin = rt.block_on(hub.admin());
    let submitted = rt.block_on(submit_all(&admin, JOBS, &runs_file));
    drop(admin);
    eprintln!("{:.1?}: {JOBS} jobs submitted", deadline.elapsed());

    // A killed agent comes back on its own schedule while the others (and
    // the next kills) go on: when each dead agent is due to restart.
    let mut back_at: Vec<Option<Instant>> = vec![None; AGENTS];
    let revive_due = |agents: &mut [Agent], back_at: &mut [Option<Instant>]| {
        for (a, due) in agents.iter_mut().zip(back_at.iter_mut()) {
            if due.is_some_and(|t| t <= Instant::now()) {
                a.start(AGENT_ARGS);
                *due = None;
            }
        }
    };
    for (k, at) in strike_points(&mut rng, KILLS, JOBS).into_iter().enumerate() {
        let k = k + 1;
        deadline.wait_for(
            &format!("waiting for {at} jobs to have run before agent kill #{k}"),
            Duration::from_millis(20),
            || {
                revive_due(&mut agents, &mut back_at);
                (completed_jobs(&runs_file) >= at).then_some(())
            },
        );
        // Off the beat of the runs file: anywhere in a job's life.
        std::thread::sleep(rng.millis(0, 200));
        // Every agent may be down at this moment (several long absences in
        // a row): the kill waits for the first one to come back.
        let up: Vec<usize> = deadline.wait_for(
            &format!("waiting for an agent to be up for kill #{k}"),
            Duration::from_millis(20),
            || {
                revive_due(&mut agents, &mut back_at);
                let up: Vec<usize> = (0..AGENTS).filter(|i| back_at[*i].is_none()).collect();
                (!up.is_empty()).then_some(up)
            },
        );
        let victim = up[rng.below(up.len() as u64) as usize];
        // Most come back at once (the hub learns from the hello that the
        // jobs are gone); every fourth stays away past the 3 s lease (the
        // reaper requeues them).
        let down = if k % 4 == 2 {
            rng.millis(3500, 4500)
        } else {
            rng.millis(0, 500)
        };
        eprintln!(
            "{:.1?}: kill #{k} of agent {} with {}/{JOBS} jobs run; down {down:?}",
            deadline.elapsed(),
            agents[victim].name,
            completed_jobs(&runs_file)
        );
        agents[victim].kill9();
        back_at[victim] = Some(Instant::now() + down);
    }
    deadline.wait_for(
        "waiting for the killed agents to restart",
        Duration::from_millis(20),
        || {
            revive_due(&mut agents, &mut back_at);
            back_at.iter().all(Option::is_none).then_some(())
        },
    );

    final_check(&rt, &mut hub, &submitted, &runs_file, &deadline);
    for a in &mut agents {
        assert!(a.is_running(), "agent {} died:\n{}", a.name, a.logs());
    }
    eprintln!("done in {:.1?}", deadline.elapsed());
}

// ---------------------------------------------------------------------------
// 3. The pipeline and its mail across hub kills
// ---------------------------------------------------------------------------

/// The toy runtime of pipeline.rs: `upper` is what a break breaks.
/// The subscribers of shouter: its configured maintainer and one added at
/// run time.
const SUBSCRIBERS: [&str; 2] = [SHOUTER_MAINTAINER, "second@example.org"];

/// Waits until shouter's newest run tested `commit` and is `want`, its
/// verdict no longer held for its re-runs.
fn wait_shouter(hub: &Hub, commit: &str, want: &str, deadline: &Deadline) {
    deadline.wait_for(
        &format!("waiting for shouter to be {want} at {commit}"),
        Duration::from_millis(200),
        || {
            let st = hub.cli_json(&["status", "--json"]);
            let cell = st["cells"]
                .as_array()?
                .iter()
                .find(|c| s(c, "project") == "shouter")?
                .clone();
            let held = s(&cell["run"], "confirmation") == "awaiting";
            (s(&cell["run"], "upstream_commit") == commit && s(&cell, "status") == want && !held)
                .then_some(())
        },
    )
}

fn json_array(v: &Value, what: &str) -> Vec<Value> {
    v.as_array()
        .unwrap_or_else(|| panic!("{what} is not a JSON array: {v:#}"))
        .clone()
}

/// Break and fix the trunk three times while the hub is `kill -9`ed at random
/// moments (ten kills in all): one build and one test job per commit, each
/// transition recorded once, queued once per subscriber, and received by
/// each subscriber under one Message-ID (a copy under the same Message-ID,
/// the one duplicate the design allows, is reported, not failed).
#[test]
fn pipeline_crash_loop_records_and_mails_each_transition_once() {
    const CYCLES: usize = 3;
    const KILLS: usize = 10;
    let (mut rng, deadline) = faults(
        "pipeline_crash_loop_records_and_mails_each_transition_once",
        // Each went red and fixed waits for its re-runs.
        Duration::from_secs(150),
    );
    let sink = SmtpSink::start();
    let repos = Repos::with(&["shouter"]);
    let mut hub = Hub::start_with(&repos.config(&smtp_toml(&sink)), &[]);
    let _agents = start_agents(&hub, "pipe-", 2);
    hub.cli_ok(&[
        "subscribe",
        "--project",
        "shouter",
        "--email",
        SUBSCRIBERS[1],
    ]);
    let c0 = repos.head("rt");
    wait_shouter(&hub, &c0, "green", &deadline);

    // Ten kills spread over the six commits (at least one each), each at a
    // random moment after its commit landed: polling, building, fanning
    // out, testing, classifying and mailing are all fair game.
    let steps = 2 * CYCLES;
    let mut plan = vec![1usize; steps];
    for _ in steps..KILLS {
        plan[rng.below(steps as u64) as usize] += 1;
    }
    let mut commits = vec![c0];
    for (step, kills) in plan.iter().enumerate() {
        let breaking = step % 2 == 0;
        // Each commit differs (a trailer), so each build is a new artifact.
        let text = if breaking {
            broken_runtime()
        } else {
            RUNTIME.to_string()
        };
        let c = repos.commit(
            "rt",
            "rt.sh",
            &format!("{text}# step {step}\n"),
            &format!("step {step}: {}", if breaking { "break" } else { "fix" }),
            "Eve <eve@example.org>",
        );
        for k in 0..*kills {
            std::thread::sleep(rng.millis(0, 2000));
            let down = rng.millis(0, 300);
            eprintln!(
                "{:.1?}: step {step} ({}), kill {} of {kills}; down {down:?}",
                deadline.elapsed(),
                if breaking { "break" } else { "fix" },
                k + 1
            );
            crash_hub(&mut hub, down);
        }
        wait_shouter(&hub, &c, if breaking { "red" } else { "green" }, &deadline);
        commits.push(c);
    }

    // One build and one test job per commit: keyed jobs are submitted once,
    // however often a restarted hub re-derives them.
    let keys: Vec<String> = json_array(
        &hub.cli_json(&["job", "list", "--json", "--limit", "1000"]),
        "job list",
    )
    .iter()
    .map(|j| s(j, "key").to_string())
    .collect();
    for c in &commits {
        let builds = keys
            .iter()
            .filter(|k| k.starts_with("build/") && k.ends_with(c.as_str()))
            .count();
        // Besides the re-runs that class each went red and fixed (keyed too).
        let tests = keys
            .iter()
            .filter(|k| k.starts_with("test/shouter/") && k.contains(c.as_str()))
            .filter(|k| !k.contains("/again/") && !k.contains("/baseline/"))
            .count();
        assert!(
            builds == 1 && tests == 1,
            "expected one build and one shouter test job at {c}, got {builds} and {tests}; \
             job keys: {keys:#?}"
        );
    }

    // Transitions: one per classified run, and the red/green story in order.
    let all = json_array(
        &hub.cli_json(&[
            "transitions",
            "--all",
            "--json",
            "--upstream",
            "rt",
            "--limit",
            "1000",
        ]),
        "transitions",
    );
    let per_run = trunkfarm_e2e::tally(
        all.iter()
            .map(|t| format!("{}@{}", s(t, "project"), s(t, "upstream_commit"))),
    );
    let twice: Vec<_> = per_run.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "runs classified more than once ((project@commit, times); expected once each): \
         {twice:?}\n{all:#?}"
    );
    let shouter: Vec<&Value> = all
        .iter()
        .filter(|t| s(t, "project") == "shouter")
        .collect();
    let story: Vec<(&str, String)> = shouter
        .iter()
        .rev()
        .map(|t| (s(t, "kind"), s(t, "upstream_commit").to_string()))
        .collect();
    let mut expected = vec![(STILL_GREEN, commits[0].clone())];
    for (i, c) in commits[1..].iter().enumerate() {
        expected.push((if i % 2 == 0 { WENT_RED } else { FIXED }, c.clone()));
    }
    assert_eq!(
        story, expected,
        "shouter's transitions (kind, upstream commit), oldest first: expected one per \
         commit, red and green in turn; all of them:\n{shouter:#?}"
    );
    let jobs: Vec<u64> = shouter.iter().map(|t| u(t, "job_id")).collect();
    assert_eq!(
        jobs.iter().collect::<HashSet<_>>().len(),
        jobs.len(),
        "a test job was classified twice (job ids {jobs:?}):\n{shouter:#?}"
    );
    let changes: Vec<&&Value> = shouter
        .iter()
        .filter(|t| matches!(s(t, "kind"), WENT_RED | FIXED))
        .collect();

    // The outbox: one mail per (transition, subscriber), all sent.
    let expected_mails = changes.len() * SUBSCRIBERS.len();
    let outbox = deadline.wait_for(
        "waiting for the outbox to send every mail",
        Duration::from_millis(300),
        || {
            let o = hub.cli_json(&["mail", "list", "--json", "--limit", "1000"]);
            let mails = json_array(&o["mails"], "mail list");
            (mails.len() >= expected_mails && mails.iter().all(|m| m["state"] == "sent"))
                .then_some(mails)
        },
    );
    let queued = trunkfarm_e2e::tally(
        outbox
            .iter()
            .map(|m| format!("{} to {}", s(m, "event"), s(m, "to"))),
    );
    assert!(
        outbox.len() == expected_mails && queued.values().all(|n| *n == 1),
        "expected exactly {expected_mails} mails in the outbox (one per went-red/fixed \
         transition and subscriber), each queued once; (event to recipient, times): \
         {queued:?}\n{outbox:#?}"
    );
    for t in &changes {
        for to in SUBSCRIBERS {
            // The outbox names a transition's mails `t<id>`.
            let id = u(t, "id");
            assert!(
                queued.contains_key(&format!("t{id} to {to}")),
                "no mail to {to} for transition {id} (event `t{id}`) in the outbox:\n{outbox:#?}"
            );
        }
    }

    // The sink: each (recipient, subject) arrived under one Message-ID,
    // the one the outbox holds. A second copy with the *same* Message-ID is
    // the one duplicate the design allows (a kill between the server's 250
    // and the outbox's mark, re-sent once on restart; receivers dedupe by
    // Message-ID); one with another Message-ID would be a mail queued twice.
    let mails = sink.wait_for_messages(expected_mails, Duration::from_secs(30));
    // Late duplicates would come within the outbox's retry delays.
    std::thread::sleep(Duration::from_secs(2));
    let mails = {
        let again = sink.messages();
        assert!(again.len() >= mails.len());
        again
    };
    let mut ids_of: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for m in &mails {
        for to in m.to() {
            ids_of
                .entry((to, m.subject()))
                .or_default()
                .push(m.header("Message-ID").unwrap_or_default());
        }
    }
    let summary: Vec<String> = mails
        .iter()
        .map(|m| format!("{} id={:?}", m.summary(), m.header("Message-ID")))
        .collect();
    assert_eq!(
        ids_of.len(),
        expected_mails,
        "expected {expected_mails} distinct (recipient, subject) pairs at the sink; got:\n{}",
        summary.join("\n")
    );
    let outbox_ids: HashSet<String> = outbox
        .iter()
        .map(|m| s(m, "message_id").trim_matches(['<', '>']).to_string())
        .collect();
    let mut redelivered = Vec::new();
    for ((to, subject), ids) in &ids_of {
        let distinct: HashSet<&String> = ids.iter().collect();
        assert!(
            distinct.len() == 1,
            "{to} got {subject:?} under {} different Message-IDs {ids:?} (expected one: the \
             mail was queued more than once); all mails:\n{}",
            distinct.len(),
            summary.join("\n")
        );
        assert!(
            outbox_ids.contains(ids[0].trim_matches(['<', '>'])),
            "{to} got {subject:?} with Message-ID {} that no outbox mail has:\n{outbox:#?}",
            ids[0]
        );
        if ids.len() > 1 {
            redelivered.push(format!(
                "{to}: {subject} ({} copies of {})",
                ids.len(),
                ids[0]
            ));
        }
    }
    let copies: usize = ids_of.values().map(|ids| ids.len() - 1).sum();
    assert!(
        copies <= KILLS,
        "{copies} redelivered copies for {KILLS} kills (expected at most one per kill: the \
         mail it interrupted); all mails:\n{}",
        summary.join("\n")
    );
    if !redelivered.is_empty() {
        eprintln!(
            "note: redelivered under the same Message-ID (a kill landed between the SMTP \
             server's 250 and the outbox's mark, the window ARCHITECTURE.md allows):\n  {}",
            redelivered.join("\n  ")
        );
    }
    let subjects: Vec<String> = ids_of
        .keys()
        .map(|(to, subject)| format!("{to}: {subject}"))
        .collect();
    eprintln!(
        "{} transitions, {} mails:\n  {}\ndone in {:.1?}",
        shouter.len(),
        mails.len(),
        subjects.join("\n  "),
        deadline.elapsed()
    );
}

// ---------------------------------------------------------------------------
// 4. A slow and a broken network (a relay between one agent and the hub)
// ---------------------------------------------------------------------------

/// A TCP relay between an agent and the hub that the test can stall (bytes
/// are held, connections stay open: a link that stopped delivering) and cut
/// (every connection through it is dropped, as by a broken link or a NAT
/// that forgot the mapping). TLS passes through untouched: the agent pins
/// the hub's CA, not an address.
struct Relay {
    addr: String,
    shared: Arc<RelayShared>,
}

#[derive(Default)]
struct RelayShared {
    stalled: AtomicBool,
    stop: AtomicBool,
    /// Both sockets of every connection, to cut them.
    conns: Mutex<Vec<TcpStream>>,
}

impl Relay {
    fn start(upstream: &str) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the relay");
        let addr = listener.local_addr().unwrap().to_string();
        listener.set_nonblocking(true).unwrap();
        let shared = Arc::new(RelayShared::default());
        let upstream = upstream.to_string();
        let sh = shared.clone();
        std::thread::spawn(move || {
            while !sh.stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let _ = client.set_nonblocking(false);
                        let Ok(server) = TcpStream::connect(&upstream) else {
                            continue;
                        };
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        {
                            let mut conns = sh.conns.lock().unwrap();
                            conns.push(client.try_clone().unwrap());
                            conns.push(server.try_clone().unwrap());
                        }
                        let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                        let (a, b) = (sh.clone(), sh.clone());
                        std::thread::spawn(move || pump(client, server, &a));
                        std::thread::spawn(move || pump(s2, c2, &b));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Relay { addr, shared }
    }

    /// Stops delivering (in both directions, on every connection, new ones
    /// too) until [`Relay::resume`].
    fn stall(&self) {
        self.shared.stalled.store(true, Ordering::SeqCst);
    }

    fn resume(&self) {
        self.shared.stalled.store(false, Ordering::SeqCst);
    }

    /// Drops every connection through the relay (what was held is lost).
    fn cut(&self) {
        for c in self.shared.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// An enrollment string of `hub` that makes the agent dial this relay.
    fn enrollment(&self, hub: &Hub, token_args: &[&str]) -> String {
        let mut e =
            Enrollment::parse(&hub.create_token(token_args)).expect("a valid enrollment string");
        e.hub = self.addr.clone();
        e.encode()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.resume();
        self.cut();
    }
}

/// Copies `from` to `to` until either side ends, holding what it read while
/// the relay is stalled.
fn pump(mut from: TcpStream, mut to: TcpStream, shared: &RelayShared) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while shared.stalled.load(Ordering::SeqCst) && !shared.stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// The lines of `text` that contain `needle` and name this (job, attempt)
/// (tracing prints fields as `job=7 attempt=1`).
fn log_lines_about(text: &str, needle: &str, job: u64, attempt: u32) -> Vec<String> {
    let (j, a) = (format!("job={job}"), format!("attempt={attempt}"));
    text.lines()
        .filter(|l| l.contains(needle))
        .filter(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            fields.contains(&j.as_str()) && fields.contains(&a.as_str())
        })
        .map(str::to_string)
        .collect()
}

/// A link that stalls for longer than the lease: the job is requeued and
/// passes elsewhere; when the link delivers again, the stalled agent's result
/// is refused by the hub (it says so, and the agent hears why and forgets the
/// result), is not recorded, and the agent keeps working. Unlike SIGSTOP
/// (recovery.rs), the agent itself runs on: it finishes the job and tries to
/// report it into a link that delivers nothing.
#[test]
fn a_result_held_up_by_a_stalled_link_is_refused_and_recorded_once() {
    let (_, deadline) = faults(
        "a_result_held_up_by_a_stalled_link_is_refused_and_recorded_once",
        Duration::from_secs(60),
    );
    let hub = Hub::start();
    let relay = Relay::start(hub.address());
    let mut a = Agent::enroll_with(
        &relay.enrollment(&hub, &["--labels", "net,only-a"]),
        "stall-a",
        &[],
    );
    let mut b = Agent::enroll(&hub, "stall-b", &["--labels", "net"]);
    let (a_id, b_id) = (a.id(&hub), b.id(&hub));
    a.start(&["--max-parallel-jobs", "1"]);
    hub.wait_agents_connected(1);
    let scratch = temp_dir("trunkfarm-e2e-faults-");
    let runs_file = scratch.path().join("runs");
    let runs_env = format!("RUNS={}", runs_file.display());

    let id = hub.submit(&[
        "--labels",
        "net",
        "--max-attempts",
        "3",
        "--env",
        &runs_env,
        "--",
        "echo \"ran in $(pwd)\"; sleep 2; echo \"$TRUNKFARM_JOB_ID $TRUNKFARM_ATTEMPT\" >> \"$RUNS\"; echo done",
    ]);
    let j = hub.wait_job(id, Duration::from_secs(15), "it runs on agent A", |j| {
        j["state"] == "running"
    });
    assert_eq!(s(&j, "agent_id"), a_id, "the job should run on A: {j:#}");
    relay.stall();
    b.start(&[]);

    // The lease runs out; B runs attempt 2.
    let j = hub.wait_job_finished(id, Duration::from_secs(30));
    assert_eq!(s(&j, "outcome"), "passed", "{j:#}");
    assert_eq!(
        s(&j, "agent_id"),
        b_id,
        "attempt 2 should finish on B: {j:#}"
    );
    assert_eq!(u(&j, "attempt"), 2, "{j:#}");
    let att = attempts(&j);
    assert!(
        att.len() == 2
            && s(&att[0], "agent_id") == a_id
            && s(&att[0], "lost_reason").contains("lease expired")
            && s(&att[1], "agent_id") == b_id
            && s(&att[1], "lost_reason").is_empty(),
        "expected attempt 1 on A lost to its lease expiring, attempt 2 on B with the result: {j:#}"
    );
    let log_before = hub.job_log(id);

    // Meanwhile A finished attempt 1 and keeps its result, unacknowledged.
    let held = a.state_dir.join("results").join(format!("{id}-1.json"));
    deadline.wait_for(
        "waiting for A to finish attempt 1 behind the stalled link",
        Duration::from_millis(100),
        || (completions(&runs_file).contains_key(&(id, 1)) && held.exists()).then_some(()),
    );

    // The link delivers again: A's result reaches the hub, which refuses it.
    relay.resume();
    let resumed = Instant::now();
    let refusal = deadline.wait_for(
        "waiting for the hub to refuse A's late result and A to hear it",
        Duration::from_millis(100),
        || {
            let hub_says = log_lines_about(&hub.logs(), "result refused", id, 1);
            let a_hears = log_lines_about(&a.logs(), "refused the job's result", id, 1);
            (!hub_says.is_empty() && !a_hears.is_empty() && !held.exists())
                .then_some((hub_says, a_hears))
        },
    );
    eprintln!(
        "refused {:?} after the link resumed:\n  hub: {}\n  A: {}",
        resumed.elapsed(),
        refusal.0.join("\n  hub: "),
        refusal.1.join("\n  A: ")
    );
    assert!(
        refusal
            .0
            .iter()
            .all(|l| l.contains(&format!("agent={a_id}"))
                || l.contains(&format!("agent=\"{a_id}\"")))
            && refusal
                .1
                .iter()
                .all(|l| l.contains("requeued as attempt 2")),
        "the refusal should name agent A and say the job was requeued as attempt 2:\n{refusal:#?}"
    );

    // A few heartbeats later nothing changed: the result was not sent again,
    // the job has one result, B's, and the log is attempt 2's.
    std::thread::sleep(Duration::from_secs(2));
    let refusals = log_lines_about(&hub.logs(), "result refused", id, 1);
    assert_eq!(
        refusals.len(),
        1,
        "A's late result should reach the hub once (then it is forgotten, not resent): \
         {refusals:#?}"
    );
    let after = hub.job(id);
    for key in [
        "state",
        "outcome",
        "exit_code",
        "detail",
        "agent_id",
        "attempt",
        "attempts",
    ] {
        assert_eq!(
            j[key], after[key],
            "`{key}` changed after A's late result (expected it refused, not recorded): \
             before {j:#}\nafter {after:#}"
        );
    }
    let log_after = hub.job_log(id);
    assert_eq!(
        log_after, log_before,
        "the stored log changed after A's late result"
    );
    assert!(
        log_after.contains(&format!("job-{id}-2")) && !log_after.contains(&format!("job-{id}-1")),
        "the log should be attempt 2's alone (work dir job-{id}-2):\n{log_after}"
    );
    assert_eq!(lines_with(&log_after, "done"), ["done"], "{log_after}");
    let runs = completions(&runs_file);
    assert_eq!(
        runs,
        BTreeMap::from([((id, 1), 1), ((id, 2), 1)]),
        "expected exactly one completed run per attempt"
    );

    // A is healthy and its slot free (it has one): it runs the next job.
    assert!(a.is_running(), "agent A died:\n{}", a.logs());
    let next = hub.submit(&["--labels", "only-a", "--", "echo next"]);
    let n = hub.wait_job_finished(next, Duration::from_secs(20));
    assert!(
        s(&n, "outcome") == "passed" && s(&n, "agent_id") == a_id && u(&n, "attempt") == 1,
        "A should run a new job after its late result was refused: {n:#}"
    );
    deadline.check("at the end");
}

/// The smallest case of what the flapping link below checks for every log:
/// a line the agent sent into a link that then dropped (what was in flight
/// is lost with the connection) is still in the job's log once its result
/// is recorded: the agent redials within the lease and keeps the attempt.
#[test]
fn a_log_line_sent_into_a_dropped_link_is_not_lost() {
    let (_, deadline) = faults(
        "a_log_line_sent_into_a_dropped_link_is_not_lost",
        Duration::from_secs(60),
    );
    let hub = Hub::start();
    let relay = Relay::start(hub.address());
    let mut a = Agent::enroll_with(&relay.enrollment(&hub, &[]), "cut-a", &[]);
    a.start(&[]);
    hub.wait_agents_connected(1);
    let scratch = temp_dir("trunkfarm-e2e-faults-");
    let (go, said) = (scratch.path().join("go"), scratch.path().join("said"));
    // The job speaks only when told to, so the line is sent into the
    // stalled link; `said` tells the test it was.
    let id = hub.submit(&[
        "--max-attempts",
        "3",
        "--env",
        &format!("GO={}", go.display()),
        "--env",
        &format!("SAID={}", said.display()),
        "--",
        "while [ ! -e \"$GO\" ]; do sleep 0.05; done; echo before-the-cut; touch \"$SAID\"; \
         sleep 2; echo after-the-cut",
    ]);
    hub.wait_job(id, Duration::from_secs(15), "it runs", |j| {
        j["state"] == "running"
    });
    relay.stall();
    fs::write(&go, "").unwrap();
    deadline.wait_for(
        "waiting for the job to print its first line",
        Duration::from_millis(20),
        || said.exists().then_some(()),
    );
    // Time for the agent to read the line and send it into the link.
    std::thread::sleep(Duration::from_millis(300));
    relay.cut();
    relay.resume();
    let j = hub.wait_job_finished(id, Duration::from_secs(20));
    assert!(
        s(&j, "outcome") == "passed" && u(&j, "attempt") == 1 && attempts(&j).len() == 1,
        "the agent should have redialled within the 3 s lease and kept attempt 1 \
         (the link was down for about 0.5 s): {j:#}"
    );
    let log = hub.job_log(id);
    assert!(
        lines_with(&log, "before-the-cut") == ["before-the-cut"]
            && lines_with(&log, "after-the-cut") == ["after-the-cut"],
        "expected the log of the job's one attempt to hold both lines once; \
         `before-the-cut` was sent into the link before it dropped. Log:\n{log}"
    );
    deadline.check("at the end");
}

/// A link that drops while a job runs, and comes back within the lease: the
/// agent redials, lists the job in its hello, keeps the lease, and the job
/// finishes once as attempt 1. Then a flapping link (dropped again and
/// again at random moments) under a stream of jobs: each finishes once, every
/// completed run is a recorded attempt, and each log holds its output once.
#[test]
fn a_dropped_link_keeps_the_lease_and_a_flapping_one_loses_nothing() {
    const JOBS: usize = 200;
    const MIN_CUTS: usize = 6;
    let (mut rng, deadline) = faults(
        "a_dropped_link_keeps_the_lease_and_a_flapping_one_loses_nothing",
        Duration::from_secs(60),
    );
    let rt = runtime();
    let hub = Hub::start();
    let relay = Relay::start(hub.address());
    let mut a = Agent::enroll_with(&relay.enrollment(&hub, &[]), "flap-a", &[]);
    let a_id = a.id(&hub);
    a.start(&["--max-parallel-jobs", "2"]);
    hub.wait_agents_connected(1);
    let scratch = temp_dir("trunkfarm-e2e-faults-");
    let runs_file = scratch.path().join("runs");
    let runs_env = format!("RUNS={}", runs_file.display());

    // One drop mid-job, shorter than the lease.
    let id = hub.submit(&[
        "--env",
        &runs_env,
        "--",
        "echo begin; sleep 2; echo \"$TRUNKFARM_JOB_ID $TRUNKFARM_ATTEMPT\" >> \"$RUNS\"; echo done",
    ]);
    hub.wait_job(id, Duration::from_secs(15), "it runs", |j| {
        j["state"] == "running"
    });
    std::thread::sleep(Duration::from_millis(300));
    // Held while cut, so the redial cannot win the race with the cut.
    relay.stall();
    relay.cut();
    std::thread::sleep(Duration::from_millis(500));
    relay.resume();
    let j = hub.wait_job_finished(id, Duration::from_secs(20));
    let att = attempts(&j);
    assert!(
        s(&j, "outcome") == "passed"
            && u(&j, "attempt") == 1
            && att.len() == 1
            && s(&att[0], "agent_id") == a_id,
        "a link down for 0.5 s (lease: 3 s) should cost nothing: expected attempt 1 passed on \
         A, no lost attempt: {j:#}"
    );
    assert_eq!(
        completions(&runs_file),
        BTreeMap::from([((id, 1), 1)]),
        "the job should have run once"
    );
    let log = hub.job_log(id);
    assert!(
        lines_with(&log, "begin") == ["begin"] && lines_with(&log, "done") == ["done"],
        "the log should hold the output before and after the drop once each:\n{log}"
    );
    let reconnects = a.logs().matches("connected to hub").count();
    assert!(
        reconnects >= 2,
        "A should have redialled after the drop ({reconnects} connections in its log):\n{}",
        a.logs()
    );

    // A flapping link under a stream of jobs.
    fs::remove_file(&runs_file).unwrap();
    let admin = rt.block_on(hub.admin());
    let submitted = rt.block_on(submit_all(&admin, JOBS, &runs_file));
    // Cut until the stream is through (every cut lands on work in flight).
    let mut cuts = 0;
    while completed_jobs(&runs_file) < JOBS {
        std::thread::sleep(rng.millis(50, 600));
        deadline.check(format_args!("before cut #{}", cuts + 1));
        let done = completed_jobs(&runs_file);
        if done >= JOBS {
            break;
        }
        cuts += 1;
        let down = rng.millis(0, 500);
        eprintln!(
            "{:.1?}: cut #{cuts} with {done}/{JOBS} jobs run; down {down:?}",
            deadline.elapsed(),
        );
        relay.stall();
        relay.cut();
        std::thread::sleep(down);
        relay.resume();
    }
    assert!(
        cuts >= MIN_CUTS,
        "only {cuts} cuts landed while jobs ran (expected at least {MIN_CUTS}; seed {}): \
         the stream finished too fast for the schedule",
        deadline.seed
    );
    let jobs = wait_all_finished(&rt, &hub, JOBS + 1, &deadline);
    // The first job is not one of the stream's.
    let jobs: Vec<JobInfo> = jobs.into_iter().filter(|j| j.job_id != id).collect();
    let logs = rt.block_on(last_attempt_logs(&admin, &jobs));
    let runs = completions(&runs_file);
    let problems = check_jobs(&submitted, &jobs, &runs, &logs);
    let lost: usize = jobs.iter().map(|j| j.attempts.len() - 1).sum();
    eprintln!(
        "{JOBS} jobs through a flapping link: {lost} attempt(s) lost; done in {:.1?}",
        deadline.elapsed()
    );
    assert_no_problems("through a flapping link", deadline.seed, &problems);
    assert!(a.is_running(), "agent A died:\n{}", a.logs());
}
