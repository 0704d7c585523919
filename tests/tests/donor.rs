//! Donors in control (issue 15): a real hub and real agents. A second `run`
//! on one state directory is refused; `pause` lets the running job finish
//! and takes nothing new while the hub shows why; `resume` takes work again;
//! `pause --now` hands the running job back and it runs elsewhere;
//! `unenroll` revokes the credential on the hub, and with the hub down fails
//! cleanly saying what remains.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;
use trunkfarm_e2e::{Agent, Hub, bins, combined, run_with_timeout, s, temp_dir, wait_for};

const WAIT: Duration = Duration::from_secs(30);

/// `trunkfarm-agent <args> --state-dir <dir>`.
fn agent_cmd(dir: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(&bins().agent);
    cmd.args(args).arg("--state-dir").arg(dir);
    run_with_timeout(cmd, Duration::from_secs(90))
}

/// The agent's entry in `agent list --json`.
fn listed(hub: &Hub, id: &str) -> Value {
    hub.cli_json(&["agent", "list", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .find(|a| s(a, "agent_id") == id)
        .cloned()
        .unwrap_or_else(|| panic!("agent {id} is not listed"))
}

#[test]
fn a_donor_pauses_resumes_hands_back_and_leaves() {
    let mut hub = Hub::start();
    let mut a = Agent::enroll(&hub, "box", &[]);
    a.start(&["--max-parallel-jobs", "1"]);
    hub.wait_agents_connected(1);
    let a_id = a.id(&hub);

    // A second `run` on the same state directory is refused, naming the first.
    let second = agent_cmd(&a.state_dir, &["run"]);
    assert_eq!(second.status.code(), Some(5), "{}", combined(&second));
    let said = combined(&second);
    assert!(said.contains(&format!("pid {}", a.pid())), "{said}");
    assert!(said.contains("trunkfarm-agent run"), "{said}");
    assert!(a.is_running(), "the first agent runs on");

    // Pause while a job runs: it finishes; nothing new starts; the hub says why.
    let long = hub.submit(&["--", "sleep 3"]);
    hub.wait_job(long, WAIT, "it runs", |j| s(j, "state") == "running");
    let out = agent_cmd(&a.state_dir, &["pause", "--for", "2h"]);
    assert!(out.status.success(), "{}", combined(&out));
    assert!(
        combined(&out).contains("paused by its donor"),
        "{}",
        combined(&out)
    );
    let queued = hub.submit(&["--", "true"]);
    let entry = wait_for(WAIT, "the hub shows the agent paused", || {
        let a = listed(&hub, &a_id);
        (!s(&a, "paused").is_empty()).then_some(a)
    });
    assert!(
        s(&entry, "paused").starts_with("paused by its donor until "),
        "{entry:#}"
    );
    let done = hub.wait_job_finished(long, WAIT);
    assert_eq!(s(&done, "outcome"), "passed", "{done:#}");
    std::thread::sleep(Duration::from_secs(2));
    let job = hub.job(queued);
    assert_eq!(s(&job, "state"), "queued", "{job:#}");
    let why = s(&job, "waiting");
    assert!(
        why.contains("agent `box` is paused by its donor until "),
        "{job:#}"
    );

    // `status` shows the pause and the job of the day.
    let out = agent_cmd(&a.state_dir, &["status", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", combined(&out));
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["running"], true, "{status:#}");
    assert!(status["paused"].is_object(), "{status:#}");
    assert!(
        status["last_day"]
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["job_id"] == long && j["outcome"] == "passed"),
        "{status:#}"
    );
    let out = agent_cmd(&a.state_dir, &["status"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Paused: paused by its donor"),
        "{}",
        combined(&out)
    );

    // Resume: the queued job runs.
    let out = agent_cmd(&a.state_dir, &["resume"]);
    assert!(out.status.success(), "{}", combined(&out));
    let done = hub.wait_job_finished(queued, WAIT);
    assert_eq!(s(&done, "outcome"), "passed", "{done:#}");
    assert_eq!(s(&listed(&hub, &a_id), "paused"), "");

    // `pause --now` hands the running job back; it runs on a second agent.
    let handed = hub.submit(&["--", "sleep 5"]);
    hub.wait_job(handed, WAIT, "it runs", |j| s(j, "state") == "running");
    let out = agent_cmd(&a.state_dir, &["pause", "--now"]);
    assert!(out.status.success(), "{}", combined(&out));
    hub.wait_job(handed, WAIT, "it is queued again", |j| {
        s(j, "state") == "queued"
    });
    let mut b = Agent::enroll(&hub, "other", &[]);
    b.start(&[]);
    let b_id = b.id(&hub);
    let j = hub.wait_job(handed, WAIT, "it runs on the other agent", |j| {
        s(j, "state") == "running" && s(j, "agent_id") == b_id
    });
    let first = &j["attempts"][0];
    assert!(
        s(first, "lost_reason").starts_with(&format!("handed back by agent {a_id}")),
        "{j:#}"
    );
    let done = hub.wait_job_finished(handed, WAIT);
    assert_eq!(s(&done, "outcome"), "passed", "{done:#}");
    // The agent told its donor in a plain sentence.
    assert!(a.logs().contains("Started job"), "{}", a.logs());
    assert!(a.logs().contains(": handed back after "), "{}", a.logs());

    // Unenroll: the running agent stops, the hub revokes the credential, the
    // state goes (the settings stay).
    let credential = std::fs::read(a.state_dir.join("credential.json")).unwrap();
    let out = agent_cmd(&a.state_dir, &["unenroll"]);
    assert_eq!(out.status.code(), Some(0), "{}", combined(&out));
    assert!(
        combined(&out).contains("revoked this agent"),
        "{}",
        combined(&out)
    );
    assert_eq!(a.wait_exit(WAIT).code(), Some(0), "{}", a.logs());
    let left: Vec<_> = std::fs::read_dir(&a.state_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(left, ["agent.toml"]);
    assert_eq!(listed(&hub, &a_id)["revoked"], true);
    // The hub refuses that credential from then on.
    let copy = temp_dir("trunkfarm-e2e-donor-copy-");
    std::fs::write(copy.path().join("credential.json"), &credential).unwrap();
    let out = agent_cmd(copy.path(), &["run"]);
    assert_eq!(out.status.code(), Some(3), "{}", combined(&out));

    // With the hub down, unenroll fails cleanly and says what remains.
    hub.kill9();
    let out = agent_cmd(&b.state_dir, &["unenroll"]);
    assert_eq!(out.status.code(), Some(1), "{}", combined(&out));
    let said = combined(&out);
    assert!(said.contains("Nothing was deleted"), "{said}");
    assert!(
        said.contains(&format!("trunkfarm agent revoke {b_id}")),
        "{said}"
    );
    assert!(b.state_dir.join("credential.json").exists());
    let out = agent_cmd(&b.state_dir, &["status"]);
    assert_eq!(
        out.status.code(),
        Some(6),
        "no agent runs: {}",
        combined(&out)
    );
}
