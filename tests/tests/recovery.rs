//! Failures: an agent killed mid-job, the hub killed with work in flight, an
//! agent frozen past its lease.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use trunkfarm_e2e::proto::v1::{JobSpec, JobState, ListJobsRequest, SubmitJobRequest};
use trunkfarm_e2e::{Agent, Hub, attempts, lines_with, s, u};

/// (a) kill -9 of the agent running a job: after the lease timeout the job is
/// requeued and passes on another agent as attempt 2.
#[test]
fn job_of_a_killed_agent_is_requeued_and_passes_elsewhere() {
    let hub = Hub::start();
    let mut a = Agent::enroll(&hub, "r-a", &["--labels", "long"]);
    let mut b = Agent::enroll(&hub, "r-b", &["--labels", "long"]);
    let (a_id, b_id) = (a.id(&hub), b.id(&hub));
    // Only A runs at first, so the job lands on A.
    a.start(&[]);
    hub.wait_agents_connected(1);

    let id = hub.submit(&[
        "--labels",
        "long",
        "--max-attempts",
        "3",
        "--",
        "sleep 4; echo done",
    ]);
    let j = hub.wait_job(id, Duration::from_secs(15), "it runs on agent A", |j| {
        j["state"] == "running"
    });
    assert_eq!(s(&j, "agent_id"), a_id, "job should run on A: {j:#}");
    assert_eq!(u(&j, "attempt"), 1, "{j:#}");
    std::thread::sleep(Duration::from_millis(500));
    a.kill9();
    let killed_at = Instant::now();
    b.start(&[]);

    let j = hub.wait_job_finished(id, Duration::from_secs(30));
    eprintln!("finished {:?} after the kill: {j:#}", killed_at.elapsed());
    assert_eq!(s(&j, "outcome"), "passed", "{j:#}");
    assert_eq!(s(&j, "agent_id"), b_id, "the job should finish on B: {j:#}");
    assert_eq!(u(&j, "attempt"), 2, "{j:#}");
    let att = attempts(&j);
    assert_eq!(att.len(), 2, "two attempts expected: {j:#}");
    assert_eq!(u(&att[0], "attempt"), 1, "{j:#}");
    assert_eq!(s(&att[0], "agent_id"), a_id, "{j:#}");
    assert!(
        !s(&att[0], "lost_reason").is_empty(),
        "attempt 1 on the killed agent must have a lost_reason: {j:#}"
    );
    assert_eq!(u(&att[1], "attempt"), 2, "{j:#}");
    assert_eq!(s(&att[1], "agent_id"), b_id, "{j:#}");
    assert_eq!(
        s(&att[1], "lost_reason"),
        "",
        "the attempt that produced the result has no lost_reason: {j:#}"
    );
    let log = hub.job_log(id);
    assert_eq!(lines_with(&log, "done"), ["done"], "job log:\n{log}");
}

/// (b) kill -9 of the hub with jobs queued, running and finished; after a
/// restart every job finishes exactly once and none is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_killed_with_work_in_flight_loses_nothing() {
    const JOBS: u64 = 20;
    let mut hub = Hub::start();
    let mut agents: Vec<Agent> = ["h-one", "h-two"]
        .iter()
        .map(|n| Agent::enroll(&hub, n, &[]))
        .collect();
    for a in &mut agents {
        a.start(&["--max-parallel-jobs", "2"]);
    }
    hub.wait_agents_connected(2);

    let admin = hub.admin().await;
    let mut job_of: HashMap<u64, u64> = HashMap::new();
    for n in 0..JOBS {
        let spec = JobSpec {
            commands: vec!["sleep 1; echo done-$N".into()],
            env: HashMap::from([("N".to_string(), n.to_string())]),
            timeout_secs: 60,
            ..Default::default()
        };
        let id = admin
            .clone()
            .submit_job(SubmitJobRequest {
                spec: Some(spec),
                max_attempts: 5,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("SubmitJob {n}: {s}"))
            .into_inner()
            .job_id;
        job_of.insert(id, n);
    }

    // Wait for a mix: some finished, some running, most queued.
    let deadline = Instant::now() + Duration::from_secs(20);
    let before = loop {
        let jobs = admin
            .clone()
            .list_jobs(ListJobsRequest {
                state: 0,
                limit: 1000,
                ..Default::default()
            })
            .await
            .expect("ListJobs")
            .into_inner()
            .jobs;
        let count = |st: JobState| jobs.iter().filter(|j| j.state == st as i32).count();
        let (fin, run, queued) = (
            count(JobState::Finished),
            count(JobState::Running) + count(JobState::Leased),
            count(JobState::Queued),
        );
        if fin >= 1 && run >= 2 {
            eprintln!("killing the hub with {fin} finished, {run} running, {queued} queued");
            break jobs;
        }
        assert!(
            Instant::now() < deadline,
            "never saw finished and running jobs together: {fin} finished, {run} running, {queued} queued"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    hub.kill9();
    drop(admin);
    let finished_before: HashMap<u64, (String, u32, u64)> = before
        .iter()
        .filter(|j| j.state == JobState::Finished as i32)
        .map(|j| {
            let r = j.result.as_ref().expect("a finished job has a result");
            (j.job_id, (j.agent_id.clone(), j.attempt, r.started_at_ms))
        })
        .collect();

    std::thread::sleep(Duration::from_millis(500));
    hub.restart();
    // The agents come back by themselves.
    hub.wait_agents_connected(2);

    let admin = hub.admin().await;
    let deadline = Instant::now() + Duration::from_secs(45);
    let jobs = loop {
        let jobs = admin
            .clone()
            .list_jobs(ListJobsRequest {
                state: 0,
                limit: 1000,
                ..Default::default()
            })
            .await
            .expect("ListJobs after restart")
            .into_inner()
            .jobs;
        let fin = jobs
            .iter()
            .filter(|j| j.state == JobState::Finished as i32)
            .count();
        if fin >= job_of.len() {
            break jobs;
        }
        assert!(
            Instant::now() < deadline,
            "after the restart only {fin} of {JOBS} jobs finished within 45 s: {:#?}",
            jobs.iter()
                .filter(|j| j.state != JobState::Finished as i32)
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // None lost, none duplicated.
    let ids: HashSet<u64> = jobs.iter().map(|j| j.job_id).collect();
    assert_eq!(
        ids,
        job_of.keys().copied().collect::<HashSet<_>>(),
        "the hub's jobs after the restart differ from those submitted"
    );
    assert_eq!(jobs.len(), job_of.len(), "a job is listed twice");

    let mut problems = Vec::new();
    for j in &jobs {
        let n = job_of[&j.job_id];
        let r = j.result.as_ref();
        if r.map(|r| r.outcome) != Some(trunkfarm_e2e::proto::v1::Outcome::Passed as i32) {
            problems.push(format!("job {} (N={n}) did not pass: {j:?}", j.job_id));
            continue;
        }
        // The attempt history is consistent: every attempt but the last was
        // lost, the last one produced the result.
        let last = j.attempts.last();
        if j.attempts.len() != j.attempt as usize
            || last.map(|a| a.lost_reason.as_str()) != Some("")
            || j.attempts[..j.attempts.len() - 1]
                .iter()
                .any(|a| a.lost_reason.is_empty())
            || r.and_then(|r| r.job.as_ref()).map(|x| x.attempt) != Some(j.attempt)
        {
            problems.push(format!(
                "job {} (N={n}) has an inconsistent attempt history: {j:?}",
                j.job_id
            ));
        }
        // Jobs finished before the crash were not run again.
        if let Some((agent, attempt, started)) = finished_before.get(&j.job_id) {
            let now = (
                j.agent_id.clone(),
                j.attempt,
                r.map(|r| r.started_at_ms).unwrap_or(0),
            );
            if now != (agent.clone(), *attempt, *started) {
                problems.push(format!(
                    "job {} finished before the crash as {:?} but is now {now:?}",
                    j.job_id,
                    (agent, attempt, started)
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // Each stored log holds its own line exactly once.
    for (&id, &n) in &job_of {
        let log = hub.job_log(id);
        assert_eq!(
            lines_with(&log, "done-"),
            [format!("done-{n}").as_str()],
            "`job log {id}` (N={n}):\n{log}"
        );
    }
    drop(agents);
}

/// (c) An agent frozen (SIGSTOP) past its lease: the job is requeued and
/// finished elsewhere; the frozen agent's late result is refused.
#[test]
fn late_result_of_a_frozen_agent_is_refused() {
    let hub = Hub::start();
    let mut a = Agent::enroll(&hub, "f-a", &["--labels", "freeze"]);
    let mut b = Agent::enroll(&hub, "f-b", &["--labels", "freeze"]);
    let (a_id, b_id) = (a.id(&hub), b.id(&hub));
    a.start(&[]);
    hub.wait_agents_connected(1);

    let id = hub.submit(&[
        "--labels",
        "freeze",
        "--max-attempts",
        "3",
        "--",
        "echo \"ran in $(pwd)\"; sleep 3; echo done",
    ]);
    let j = hub.wait_job(id, Duration::from_secs(15), "it runs on agent A", |j| {
        j["state"] == "running"
    });
    assert_eq!(s(&j, "agent_id"), a_id, "{j:#}");
    a.sigstop();
    let stopped_at = Instant::now();
    b.start(&[]);

    let j = hub.wait_job_finished(id, Duration::from_secs(30));
    eprintln!("finished {:?} after SIGSTOP: {j:#}", stopped_at.elapsed());
    assert_eq!(s(&j, "outcome"), "passed", "{j:#}");
    assert_eq!(s(&j, "agent_id"), b_id, "the job should finish on B: {j:#}");
    assert_eq!(u(&j, "attempt"), 2, "{j:#}");
    let log_before = hub.job_log(id);
    assert!(
        log_before.contains(&format!("job-{id}-2")),
        "the log should be attempt 2's (its work dir is job-{id}-2):\n{log_before}"
    );

    // Thaw A: its job finished while it was frozen; it will now try to report
    // attempt 1, which must be refused.
    a.sigcont();
    let thawed_at = Instant::now();
    // A reports attempt 1 now; the refusal is visible in the hub's or the
    // agent's output (the only place a refused result leaves a trace), which
    // also proves the late result was really sent.
    trunkfarm_e2e::wait_until(
        Duration::from_secs(15),
        "the hub refuses A's late result (\"refused\" in the hub's or A's output)",
        || {
            hub.logs().to_lowercase().contains("refused")
                || a.logs().to_lowercase().contains("refused")
        },
    );
    eprintln!(
        "late result refused {:?} after SIGCONT",
        thawed_at.elapsed()
    );
    // A few more heartbeats, in case anything else were to change.
    std::thread::sleep(Duration::from_secs(2));
    assert!(a.is_running(), "agent A died after SIGCONT:\n{}", a.logs());

    let after = hub.job(id);
    assert_eq!(s(&after, "state"), "finished", "{after:#}");
    assert_eq!(s(&after, "outcome"), "passed", "{after:#}");
    assert_eq!(
        s(&after, "agent_id"),
        b_id,
        "the late result from A replaced B's: {after:#}"
    );
    assert_eq!(u(&after, "attempt"), 2, "{after:#}");
    for key in ["exit_code", "detail", "outcome", "agent_id", "attempt"] {
        assert_eq!(
            j[key], after[key],
            "`{key}` changed after A's late report: before {j:#}\nafter {after:#}"
        );
    }
    let att = attempts(&after);
    assert_eq!(att.len(), 2, "{after:#}");
    assert_eq!(s(&att[0], "agent_id"), a_id, "{after:#}");
    assert!(
        !s(&att[0], "lost_reason").is_empty(),
        "the stale attempt 1 must show why it was lost: {after:#}"
    );
    assert_eq!(s(&att[1], "agent_id"), b_id, "{after:#}");
    assert_eq!(s(&att[1], "lost_reason"), "", "{after:#}");
    let log_after = hub.job_log(id);
    assert_eq!(
        log_after, log_before,
        "the stored log changed after A's late report"
    );
    assert!(
        !log_after.contains(&format!("job-{id}-1")),
        "attempt 1's output leaked into the stored log:\n{log_after}"
    );
    assert_eq!(lines_with(&log_after, "done"), ["done"], "{log_after}");
}
