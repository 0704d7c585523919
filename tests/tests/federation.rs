//! One agent, many hubs (issue 15 item 4): two real hubs and one real agent
//! enrolled with both. Shares 2:1 with long queues on both split the
//! finished jobs 2:1; a hub whose queue is empty leaves every slot to the
//! other; a hub that stops answering (SIGSTOP) or is killed with `kill -9`
//! does not hold up the other. `enroll`
//! with a second hub's string adds it (the same hub twice is refused),
//! `hubs` lists them, `[hubs.NAME]` gives one its own allowlist, a hub's
//! drain stops its work only, `unenroll --hub` leaves one while the agent
//! goes on with the other, and with that hub down fails cleanly saying what
//! remains.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use trunkfarm_e2e::proto::v1::{JobSpec, JobState, ListJobsRequest, SubmitJobRequest};
use trunkfarm_e2e::{
    AdminClient, Agent, Hub, bins, combined, run_with_timeout, runtime, s, temp_dir, wait_for,
    wait_until,
};

const WAIT: Duration = Duration::from_secs(60);

/// `trunkfarm-agent <args> --state-dir <dir>`.
fn agent_cmd(dir: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(&bins().agent);
    cmd.args(args).arg("--state-dir").arg(dir);
    run_with_timeout(cmd, Duration::from_secs(90))
}

/// `trunkfarm-agent hubs --json`.
fn hubs_json(dir: &Path) -> Vec<Value> {
    let out = agent_cmd(dir, &["hubs", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", combined(&out));
    match serde_json::from_slice(&out.stdout) {
        Ok(Value::Array(hubs)) => hubs,
        other => panic!("`hubs --json` is not a list: {other:?}\n{}", combined(&out)),
    }
}

/// The hub named `name` in `hubs --json`.
fn hub_entry(dir: &Path, name: &str) -> Value {
    hubs_json(dir)
        .into_iter()
        .find(|h| s(h, "name") == name)
        .unwrap_or_else(|| panic!("no hub `{name}` in `hubs --json`"))
}

/// Enrolls `agent` with a second hub under `name`.
fn enroll_second(agent: &Agent, hub: &Hub, name: &str) {
    let out = agent.try_enroll(&hub.create_token(&[]), &["--hub-name", name]);
    assert_eq!(out.status.code(), Some(0), "{}", combined(&out));
    assert!(
        combined(&out).contains("this machine now serves 2 hubs"),
        "{}",
        combined(&out)
    );
}

/// Appends `text` to the agent's agent.toml.
fn settings(agent: &Agent, text: &str) {
    let path = agent.state_dir.join("agent.toml");
    let mut toml = std::fs::read_to_string(&path).unwrap_or_default();
    toml.push_str(text);
    std::fs::write(&path, toml).unwrap();
}

/// Submits `n` jobs of `command` through the admin API (several in flight,
/// sharing the hub's group commit).
async fn submit(admin: &AdminClient, n: usize, command: &str) {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        let mut admin = admin.clone();
        let req = SubmitJobRequest {
            spec: Some(JobSpec {
                commands: vec![command.to_owned()],
                timeout_secs: 120,
                ..Default::default()
            }),
            ..Default::default()
        };
        set.spawn(async move { admin.submit_job(req).await.expect("submit") });
    }
    while let Some(r) = set.join_next().await {
        r.expect("submit task");
    }
}

/// When each finished job of the hub finished (ms), and how many are on an
/// agent now (leased or running).
async fn finished_and_running(admin: &AdminClient) -> (Vec<u64>, usize) {
    let jobs = admin
        .clone()
        .list_jobs(ListJobsRequest {
            limit: 100_000,
            ..Default::default()
        })
        .await
        .expect("list jobs")
        .into_inner()
        .jobs;
    let finished = jobs
        .iter()
        .filter(|j| j.state == JobState::Finished as i32)
        .map(|j| j.finished_at_ms)
        .collect();
    let running = jobs
        .iter()
        .filter(|j| j.state == JobState::Running as i32 || j.state == JobState::Leased as i32)
        .count();
    (finished, running)
}

#[test]
fn shares_split_the_slots_an_idle_hub_leaves_them_all_and_a_dead_hub_blocks_nothing() {
    let rt = runtime();
    let mut a = Hub::start();
    let b = Hub::start();
    let mut agent = Agent::enroll_with(&a.create_token(&[]), "fed", &["--hub-name", "a"]);
    enroll_second(&agent, &b, "b");
    settings(&agent, "max_parallel_jobs = 3\n[hubs.a]\nshare = 2\n");
    let (admin_a, admin_b) = rt.block_on(async { (a.admin().await, b.admin().await) });

    // Long queues on both before the agent starts.
    const JOB: &str = "sleep 0.3";
    rt.block_on(async {
        submit(&admin_a, 80, JOB).await;
        submit(&admin_b, 50, JOB).await;
    });
    agent.start(&[]);
    a.wait_agents_connected(1);
    b.wait_agents_connected(1);

    // Over 60 finished jobs (after the first few, while both connect) the
    // split is 2:1 within ±15 %.
    let (done_a, done_b) = wait_for(WAIT * 2, "66 jobs finished on the two hubs", || {
        let (fa, _) = rt.block_on(finished_and_running(&admin_a));
        let (fb, _) = rt.block_on(finished_and_running(&admin_b));
        (fa.len() + fb.len() >= 66).then_some((fa, fb))
    });
    let mut all: Vec<(u64, char)> = done_a
        .iter()
        .map(|t| (*t, 'a'))
        .chain(done_b.iter().map(|t| (*t, 'b')))
        .collect();
    all.sort();
    let window = &all[6..66];
    let on_a = window.iter().filter(|(_, h)| *h == 'a').count() as f64;
    let on_b = window.iter().filter(|(_, h)| *h == 'b').count() as f64;
    let ratio = on_a / on_b.max(1.0);
    assert!(
        (1.7..=2.3).contains(&ratio),
        "60 finished jobs split {on_a} (share 2) : {on_b} (share 1) = {ratio:.2}, not 2:1 ± 15 %\n{}",
        agent.logs()
    );

    // Hub a's queue empties first (it gets two thirds): then b gets every slot.
    wait_until(WAIT * 2, "hub a's 80 jobs finish", || {
        rt.block_on(finished_and_running(&admin_a)).0.len() == 80
    });
    rt.block_on(submit(&admin_b, 6, "sleep 4"));
    wait_until(
        WAIT,
        "hub b runs 3 jobs at once on the agent (all its slots)",
        || rt.block_on(finished_and_running(&admin_b)).1 == 3,
    );
    let entry = hub_entry(&agent.state_dir, "b");
    assert_eq!(entry["connected"], true, "{entry:#}");

    // Both busy again, then hub a is killed: b's jobs keep finishing at a
    // comparable rate (not a speed assertion: b is not held up).
    wait_until(WAIT, "b's long jobs finish", || {
        rt.block_on(finished_and_running(&admin_b)).1 == 0
            && rt.block_on(finished_and_running(&admin_b)).0.len() >= 56
    });
    rt.block_on(async {
        submit(&admin_a, 200, JOB).await;
        submit(&admin_b, 200, JOB).await;
    });
    let rate = |window: Duration| {
        let before = rt.block_on(finished_and_running(&admin_b)).0.len();
        std::thread::sleep(window);
        let after = rt.block_on(finished_and_running(&admin_b)).0.len();
        after - before
    };
    std::thread::sleep(Duration::from_secs(2));
    let with_a = rate(Duration::from_secs(6));
    assert!(with_a > 0, "b finished nothing while a ran");
    // Hub a stops answering (SIGSTOP: connected, but silent): the slots it
    // leaves unfilled go to b once the agent's offer wait (15 s) is over.
    // SAFETY: kill(2) on the hub process this test started.
    assert_eq!(unsafe { libc::kill(a.pid() as i32, libc::SIGSTOP) }, 0);
    std::thread::sleep(Duration::from_secs(17));
    let while_stuck = rate(Duration::from_secs(4));
    // Per second, at least half of what b did beside a working hub a.
    assert!(
        while_stuck * 6 * 2 >= with_a * 4,
        "with hub a stuck, b finished {while_stuck} jobs in 4 s against {with_a} in 6 s before: \
         held up\n{}",
        agent.logs()
    );
    a.kill9();
    std::thread::sleep(Duration::from_secs(1));
    let without_a = rate(Duration::from_secs(6));
    assert!(
        without_a * 2 >= with_a,
        "with hub a killed, b finished {without_a} jobs in 6 s against {with_a} before: held up\n{}",
        agent.logs()
    );
    let entry = hub_entry(&agent.state_dir, "a");
    assert_eq!(entry["connected"], false, "{entry:#}");
    assert!(agent.is_running(), "the agent goes on with hub b");
    agent.kill9();
}

#[test]
fn a_second_hub_is_enrolled_listed_and_left_alone() {
    let mut a = Hub::start();
    let b = Hub::start();
    let mut agent = Agent::enroll_with(&a.create_token(&[]), "many", &["--hub-name", "a"]);

    // The same hub twice is refused, naming the enrollment there is.
    let out = agent.try_enroll(&a.create_token(&[]), &[]);
    assert_eq!(out.status.code(), Some(2), "{}", combined(&out));
    assert!(
        combined(&out).contains("already enrolled") && combined(&out).contains("--force"),
        "{}",
        combined(&out)
    );
    // Another hub's string adds it; a name taken already is refused.
    let out = agent.try_enroll(&b.create_token(&[]), &["--hub-name", "a"]);
    assert_eq!(out.status.code(), Some(2), "{}", combined(&out));
    assert!(combined(&out).contains("--hub-name"), "{}", combined(&out));
    enroll_second(&agent, &b, "b");
    let listed = hubs_json(&agent.state_dir);
    let names: Vec<&str> = listed.iter().map(|h| s(h, "name")).collect();
    assert_eq!(names, ["a", "b"], "{listed:#?}");
    assert_eq!(s(&listed[0], "hub"), a.address());
    assert_eq!(s(&listed[1], "hub"), b.address());
    assert_ne!(s(&listed[0], "agent_id"), s(&listed[1], "agent_id"));

    // Plain `unenroll` must say which hub.
    let out = agent_cmd(&agent.state_dir, &["unenroll"]);
    assert_eq!(out.status.code(), Some(2), "{}", combined(&out));
    assert!(combined(&out).contains("--hub NAME"), "{}", combined(&out));

    // With hub a down, `unenroll --hub a` fails cleanly and says what remains.
    let a_id = s(&listed[0], "agent_id").to_owned();
    a.kill9();
    let out = agent_cmd(&agent.state_dir, &["unenroll", "--hub", "a"]);
    assert_eq!(out.status.code(), Some(1), "{}", combined(&out));
    let said = combined(&out);
    assert!(said.contains("Nothing was deleted"), "{said}");
    assert!(said.contains("unenroll --hub a"), "{said}");
    assert!(
        said.contains(&format!("trunkfarm agent revoke {a_id}")),
        "{said}"
    );
    assert_eq!(hubs_json(&agent.state_dir).len(), 2);

    // Both up, the agent serving both: `unenroll --hub b` leaves b (its
    // running job handed back), the hub revokes it, the agent goes on with a.
    a.restart();
    // Per-hub terms: hub b's jobs only of project `only-b`.
    settings(&agent, "[hubs.b]\nallowed_projects = [\"only-b\"]\n");
    agent.start(&[]);
    a.wait_agents_connected(1);
    b.wait_agents_connected(1);
    let other = b.submit(&["--project", "other", "--", "true"]);
    let j = b.wait_job(other, WAIT, "it says why it waits", |j| {
        s(j, "waiting").contains("only accepts projects only-b")
    });
    assert_eq!(
        s(&j, "waiting"),
        "agent `many` only accepts projects only-b (job is for `other`)",
        "{j:#}"
    );
    let b_id = s(&hub_entry(&agent.state_dir, "b"), "agent_id").to_owned();
    let b_credential = std::fs::read(agent.state_dir.join("hubs/b/credential.json")).unwrap();
    let long = b.submit(&["--", "sleep 30"]);
    b.wait_job(long, WAIT, "it runs on the agent", |j| {
        s(j, "state") == "running"
    });
    // Hub b's operator drains the agent: that stops b's work only.
    b.cli_ok(&["agent", "drain", &b_id]);
    wait_until(WAIT, "the agent hears hub b's drain", || {
        hub_entry(&agent.state_dir, "b")["draining"] == true
    });
    assert!(agent.is_running(), "the agent goes on with hub a");
    assert_eq!(hub_entry(&agent.state_dir, "a")["draining"], false);
    let out = agent_cmd(&agent.state_dir, &["unenroll", "--hub", "b"]);
    assert_eq!(out.status.code(), Some(0), "{}", combined(&out));
    let said = combined(&out);
    assert!(said.contains("revoked this agent"), "{said}");
    assert!(said.contains("serves 1 other hub"), "{said}");
    assert!(agent.is_running(), "the agent goes on with hub a");
    let names: Vec<String> = hubs_json(&agent.state_dir)
        .iter()
        .map(|h| s(h, "name").to_owned())
        .collect();
    assert_eq!(names, ["a"]);
    assert!(!agent.state_dir.join("hubs/b").exists());
    let revoked = b
        .agents()
        .into_iter()
        .find(|x| s(x, "agent_id") == b_id)
        .expect("b lists the agent");
    assert_eq!(revoked["revoked"], true, "{revoked:#}");
    // The job it ran was handed back: it is queued again on b, for another agent.
    let j = b.wait_job(long, WAIT, "handed back", |j| s(j, "state") == "queued");
    assert!(
        s(&j["attempts"][0], "lost_reason").contains("handed back"),
        "{j:#}"
    );
    // Hub a still gets its jobs done, of any project (the top-level terms).
    let id = a.submit(&["--project", "other", "--", "true"]);
    let done = a.wait_job_finished(id, WAIT);
    assert_eq!(s(&done, "outcome"), "passed", "{done:#}");

    // Hub b refuses that credential from then on.
    let copy = temp_dir("trunkfarm-e2e-federation-copy-");
    std::fs::write(copy.path().join("credential.json"), &b_credential).unwrap();
    let out = agent_cmd(copy.path(), &["run"]);
    assert_eq!(out.status.code(), Some(3), "{}", combined(&out));

    // `status` with one hub left reads as before.
    let out = agent_cmd(&agent.state_dir, &["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", combined(&out));
    assert!(
        combined(&out).contains(&format!("Hub: {}, connected since", a.address())),
        "{}",
        combined(&out)
    );
    let started = Instant::now();
    agent.sigterm();
    agent.wait_exit(WAIT);
    assert!(started.elapsed() < WAIT);
}
