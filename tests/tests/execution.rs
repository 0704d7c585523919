//! Running jobs: timeouts, failures, checkouts, `job run` exit codes, drains,
//! and an oversized request.

use std::path::Path;
use std::time::{Duration, Instant};

use trunkfarm_e2e::proto::v1::{JobSpec, SubmitJobRequest};
use trunkfarm_e2e::{
    Agent, Hub, KillPidFiles, attempts, describe, git, lines_with, pid_gone, s, status_text,
    temp_dir, u,
};

fn read_pid(path: &Path) -> i32 {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{} holds no pid: {e}", path.display()))
}

/// A hub with one connected agent.
fn hub_and_agent(name: &str) -> (Hub, Agent) {
    let hub = Hub::start();
    let mut a = Agent::enroll(&hub, name, &[]);
    a.start(&[]);
    hub.wait_agents_connected(1);
    (hub, a)
}

#[test]
fn timeout_kills_the_whole_process_tree() {
    let (hub, _a) = hub_and_agent("x-timeout");
    let scratch = temp_dir("trunkfarm-e2e-pids-");
    let child_pidfile = scratch.path().join("child.pid");
    let shell_pidfile = scratch.path().join("shell.pid");
    let _cleanup = KillPidFiles(vec![child_pidfile.clone(), shell_pidfile.clone()]);
    let cmd = format!(
        "echo $$ > {}; sleep 300 & echo $! > {}; sleep 300",
        shell_pidfile.display(),
        child_pidfile.display()
    );
    let started = Instant::now();
    let id = hub.submit(&["--timeout", "2s", "--", &cmd]);
    let j = hub.wait_job_finished(id, Duration::from_secs(30));
    let took = started.elapsed();
    assert_eq!(s(&j, "outcome"), "timed_out", "{j:#}");
    assert!(
        took >= Duration::from_secs(2),
        "the job ended after {took:?}, before its 2 s timeout: {j:#}"
    );
    assert_eq!(u(&j, "attempt"), 1, "a timeout is not retried: {j:#}");
    for (what, file) in [
        ("background child", &child_pidfile),
        ("job shell", &shell_pidfile),
    ] {
        let pid = read_pid(file);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !pid_gone(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            pid_gone(pid),
            "the job's {what} (pid {pid}) survived the timeout: /proc/{pid}/stat = {stat}"
        );
    }
}

#[test]
fn missing_command_fails_with_command_not_found() {
    let (hub, _a) = hub_and_agent("x-missing");
    let id = hub.submit(&["--", "trunkfarm-e2e-no-such-command --flag"]);
    let j = hub.wait_job_finished(id, Duration::from_secs(20));
    assert_eq!(s(&j, "outcome"), "failed", "{j:#}");
    assert_eq!(j["exit_code"], 127, "{j:#}");
    assert!(
        s(&j, "detail").to_lowercase().contains("command not found"),
        "the detail should say `command not found`: {j:#}"
    );
    assert_eq!(u(&j, "attempt"), 1, "a test failure is not retried: {j:#}");
}

#[test]
fn commands_run_in_order_and_stop_at_the_first_failure() {
    let (hub, _a) = hub_and_agent("x-order");
    let id = hub.submit(&[
        "--command",
        "echo step-one",
        "--command",
        "echo step-two; exit 4",
        "--command",
        "echo step-three",
    ]);
    let j = hub.wait_job_finished(id, Duration::from_secs(20));
    assert_eq!(s(&j, "outcome"), "failed", "{j:#}");
    assert_eq!(j["exit_code"], 4, "{j:#}");
    let log = hub.job_log(id);
    let one = log
        .find("step-one")
        .unwrap_or_else(|| panic!("no step-one:\n{log}"));
    let two = log
        .find("step-two")
        .unwrap_or_else(|| panic!("no step-two:\n{log}"));
    assert!(one < two, "commands ran out of order:\n{log}");
    assert!(
        !log.contains("step-three"),
        "a command after the failing one ran:\n{log}"
    );
}

#[test]
fn env_and_trailing_words_make_one_command() {
    let (hub, _a) = hub_and_agent("x-env");
    // The words after `--` are joined with spaces into one shell command.
    let id = hub.submit(&[
        "--env",
        "GREETING=hi there",
        "--",
        "echo",
        "\"$GREETING\"",
        "&&",
        "echo",
        "second",
    ]);
    let j = hub.wait_job_finished(id, Duration::from_secs(20));
    assert_eq!(s(&j, "outcome"), "passed", "{j:#}");
    let log = hub.job_log(id);
    assert_eq!(lines_with(&log, "hi there"), ["hi there"], "{log}");
    assert_eq!(lines_with(&log, "second"), ["second"], "{log}");
}

#[test]
fn checkout_of_a_given_revision() {
    let (hub, _a) = hub_and_agent("x-git");
    let dir = temp_dir("trunkfarm-e2e-repo-");
    let repo = dir.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    git(&repo, &["init", "-q"]);
    std::fs::write(repo.join("version.txt"), "content-of-first-commit\n").unwrap();
    git(&repo, &["add", "version.txt"]);
    git(&repo, &["commit", "-q", "-m", "first"]);
    let first = git(&repo, &["rev-parse", "HEAD"]);
    std::fs::write(repo.join("version.txt"), "content-of-second-commit\n").unwrap();
    git(&repo, &["commit", "-q", "-am", "second"]);
    let second = git(&repo, &["rev-parse", "HEAD"]);
    assert_ne!(first, second);
    let url = repo.display().to_string();

    let id = hub.submit(&[
        "--repo",
        &url,
        "--rev",
        &first,
        "--",
        "cat version.txt; git rev-parse HEAD",
    ]);
    let j = hub.wait_job_finished(id, Duration::from_secs(30));
    let log = hub.job_log(id);
    assert_eq!(s(&j, "outcome"), "passed", "{j:#}\nlog:\n{log}");
    assert!(
        log.contains("content-of-first-commit"),
        "the job did not see the first commit's file:\n{log}"
    );
    assert!(
        !log.contains("content-of-second-commit"),
        "the job saw the second commit:\n{log}"
    );
    assert!(log.contains(&first), "HEAD is not the first commit:\n{log}");

    // Without --rev: the default branch, i.e. the second commit.
    let id = hub.submit(&["--repo", &url, "--", "cat version.txt"]);
    let j = hub.wait_job_finished(id, Duration::from_secs(30));
    let log = hub.job_log(id);
    assert_eq!(s(&j, "outcome"), "passed", "{j:#}\nlog:\n{log}");
    assert!(log.contains("content-of-second-commit"), "{log}");

    // A revision that does not exist is an infrastructure error, not a pass.
    let id = hub.submit(&[
        "--repo",
        &url,
        "--rev",
        "0123456789abcdef0123456789abcdef01234567",
        "--max-attempts",
        "1",
        "--",
        "echo should-not-run",
    ]);
    let j = hub.wait_job_finished(id, Duration::from_secs(30));
    let log = hub.job_log(id);
    assert_eq!(s(&j, "outcome"), "error", "{j:#}\nlog:\n{log}");
    assert!(!log.contains("should-not-run"), "{log}");
}

#[test]
fn job_run_streams_the_log_and_maps_outcomes_to_exit_codes() {
    let (hub, _a) = hub_and_agent("x-run");
    let summary = regex_free_summary;

    let out = hub.cli(&["job", "run", "--", "echo run-passed-output"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("run-passed-output"), "{}", describe(&out));
    summary(&out, "passed");

    let out = hub.cli(&["job", "run", "--", "echo run-failed-output; exit 7"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a failed job must make `job run` exit 1:\n{}",
        describe(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("run-failed-output"),
        "{}",
        describe(&out)
    );
    summary(&out, "failed");

    let out = hub.cli(&["job", "run", "--timeout", "1s", "--", "sleep 30"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "a timed-out job must make `job run` exit 3:\n{}",
        describe(&out)
    );
    summary(&out, "timed");
}

/// Checks the final summary line on stderr: `job N <word> ...` (for a
/// timeout, `timed` matches both `timed out` and `timed_out`).
fn regex_free_summary(out: &std::process::Output, word: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let found = stderr.lines().any(|l| {
        let l = l.trim();
        l.starts_with("job ")
            && l.split_whitespace()
                .nth(1)
                .is_some_and(|n| n.parse::<u64>().is_ok())
            && l.contains(word)
    });
    assert!(
        found,
        "no summary line `job N {word} ...` on stderr:\n{}",
        describe(out)
    );
}

#[test]
fn job_run_reports_a_connection_error_with_exit_2() {
    let hub = Hub::start();
    // Kill the hub: the CLI cannot reach it.
    let mut hub = hub;
    hub.kill9();
    let out = hub.cli(&["job", "run", "--", "true"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
}

fn drain_scenario(use_sigterm: bool) {
    let name = if use_sigterm { "x-term" } else { "x-drain" };
    let hub = Hub::start();
    let mut a = Agent::enroll(&hub, name, &[]);
    // Two slots: the agent has room for more work while it drains.
    a.start(&["--max-parallel-jobs", "2"]);
    hub.wait_agents_connected(1);
    let agent_id = a.id(&hub);
    let id = hub.submit(&["--", "sleep 3; echo drained-ok"]);
    let j = hub.wait_job(id, Duration::from_secs(15), "the job runs", |j| {
        j["state"] == "running"
    });
    assert_eq!(s(&j, "agent_id"), agent_id, "{j:#}");
    if use_sigterm {
        a.sigterm();
    } else {
        hub.cli_ok(&["agent", "drain", &agent_id, "--grace", "30s"]);
    }
    // Give the drain a moment to reach the hub, then offer more work: a
    // draining agent must not take it.
    std::thread::sleep(Duration::from_millis(700));
    let j = hub.job(id);
    assert_eq!(
        s(&j, "state"),
        "running",
        "the first job should still be running when the second is submitted: {j:#}"
    );
    let later = hub.submit(&["--", "echo should-not-run-on-draining-agent"]);

    let status = a.wait_exit(Duration::from_secs(20));
    assert_eq!(
        status.code(),
        Some(0),
        "a drained agent must exit 0 after its jobs finish, got {}:\n{}",
        status_text(&status),
        a.logs()
    );
    let j = hub.wait_job_finished(id, Duration::from_secs(10));
    assert_eq!(s(&j, "outcome"), "passed", "{j:#}");
    assert_eq!(u(&j, "attempt"), 1, "{j:#}");
    assert_eq!(attempts(&j).len(), 1, "{j:#}");
    let log = hub.job_log(id);
    assert_eq!(lines_with(&log, "drained-ok"), ["drained-ok"], "{log}");
    let later_job = hub.job(later);
    assert_eq!(
        s(&later_job, "state"),
        "queued",
        "a job submitted during the drain must stay queued: {later_job:#}"
    );
    let entry = hub.agent_named(name).unwrap();
    assert_eq!(entry["connected"], false, "{entry:#}");
}

#[test]
fn hub_drain_lets_the_running_job_finish_then_the_agent_exits_0() {
    drain_scenario(false);
}

#[test]
fn sigterm_drains_the_agent_too() {
    drain_scenario(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_is_refused_clearly_and_the_hub_survives() {
    let hub = Hub::start();
    let mut admin = hub.admin().await;
    let huge = "x".repeat(20 * 1024 * 1024);
    let r = tokio::time::timeout(
        Duration::from_secs(30),
        admin.submit_job(SubmitJobRequest {
            spec: Some(JobSpec {
                commands: vec![format!("echo {huge}")],
                ..Default::default()
            }),
            max_attempts: 0,
            ..Default::default()
        }),
    )
    .await
    .expect("SubmitJob with 20 MiB did not return within 30 s");
    let status = match r {
        Ok(resp) => panic!(
            "the hub accepted a 20 MiB SubmitJob (job {})",
            resp.into_inner().job_id
        ),
        Err(s) => s,
    };
    use trunkfarm_e2e::tonic::Code;
    assert!(
        matches!(
            status.code(),
            Code::ResourceExhausted | Code::OutOfRange | Code::InvalidArgument
        ),
        "unexpected status for an oversized message: {status:?}"
    );
    let msg = status.message().to_lowercase();
    assert!(
        ["size", "large", "limit", "bytes"]
            .iter()
            .any(|w| msg.contains(w)),
        "the status should mention the size: {status:?}"
    );
    eprintln!("oversized SubmitJob refused: {status:?}");

    // Still serving: the same client, a fresh one, and the CLI.
    let first = admin
        .submit_job(SubmitJobRequest {
            spec: Some(JobSpec {
                commands: vec!["echo still-alive".into()],
                ..Default::default()
            }),
            max_attempts: 0,
            ..Default::default()
        })
        .await
        .expect("SubmitJob on the same client after the oversized one")
        .into_inner()
        .job_id;
    drop(admin);
    let mut admin = hub.admin().await;
    let second = admin
        .submit_job(SubmitJobRequest {
            spec: Some(JobSpec {
                commands: vec!["echo still-alive-2".into()],
                ..Default::default()
            }),
            max_attempts: 0,
            ..Default::default()
        })
        .await
        .expect("SubmitJob on a new client after the oversized one")
        .into_inner()
        .job_id;
    assert_eq!(s(&hub.job(first), "state"), "queued");
    let listed = hub.cli_ok(&["job", "list", "--json"]);
    let listed: trunkfarm_e2e::serde_json::Value =
        trunkfarm_e2e::serde_json::from_str(&listed).expect("job list --json");
    assert_eq!(
        listed.as_array().map(|a| a.len()),
        Some(2),
        "only the two small jobs exist: {listed:#}"
    );

    // And the jobs really run once an agent comes.
    let mut a = Agent::enroll(&hub, "x-big", &[]);
    a.start(&[]);
    hub.wait_agents_connected(1);
    for (id, word) in [(first, "still-alive"), (second, "still-alive-2")] {
        let j = hub.wait_job_finished(id, Duration::from_secs(20));
        assert_eq!(s(&j, "outcome"), "passed", "{j:#}");
        assert_eq!(lines_with(&hub.job_log(id), "still-alive"), [word]);
    }
}
