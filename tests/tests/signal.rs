//! Signal you can act on (issue 13): a red result counts only once its
//! re-runs say what it is. Real git repositories, a real hub, real agents
//! and a real SMTP server: a project that broke itself while the upstream
//! moved (project side, no upstream commit blamed), a test run killed at
//! its timeout (spurious, no mail), and a test that fails one run in three
//! over 20 upstream pushes (flaky, no mail at all).

use std::time::Duration;

use serde_json::Value;
use trunkfarm_e2e::farm::{RUNTIME, Repos, SHOUTER_TESTS, STILL_GREEN, WENT_RED, smtp_toml};
use trunkfarm_e2e::smtp::SmtpSink;
use trunkfarm_e2e::{Agent, Hub, s, temp_dir, wait_for};

/// How long the pipeline may take for one step (build, fan-out, tests and
/// their re-runs).
const STEP: Duration = Duration::from_secs(120);

/// A hub for `config` with two trusted agents (so a re-run goes to
/// another agent than the original's).
fn farm(config: &str) -> (Hub, Vec<Agent>) {
    let hub = Hub::start_with(config, &[]);
    let mut agents = Vec::new();
    for i in 0..2 {
        let mut a = Agent::enroll(&hub, &format!("s{i}"), &["--trusted"]);
        a.start(&["--max-parallel-jobs", "2"]);
        agents.push(a);
    }
    hub.wait_agents_connected(2);
    (hub, agents)
}

fn transitions(hub: &Hub, project: &str) -> Vec<Value> {
    let all = hub.cli_json(&[
        "transitions",
        "--all",
        "--json",
        "--project",
        project,
        "--limit",
        "200",
    ]);
    all.as_array().unwrap().clone()
}

/// `project`'s newest run (against `rt`), as `status --json` shows it.
fn run(hub: &Hub, project: &str) -> Option<Value> {
    let status = hub.cli_json(&["status", "--json"]);
    let cells = status["cells"].as_array()?;
    let cell = cells.iter().find(|c| s(c, "project") == project)?;
    Some(cell["run"].clone())
}

/// Waits until `project`'s newest run tested upstream `commit` and its
/// verdict is not held any more (counted alone or settled); returns it.
fn wait_settled(hub: &Hub, project: &str, commit: &str) -> Value {
    wait_for(STEP, &format!("{project} settled at {commit}"), || {
        let r = run(hub, project)?;
        let done = s(&r, "upstream_commit") == commit
            && matches!(s(&r, "status"), "green" | "red")
            && s(&r, "confirmation") != "awaiting";
        done.then_some(r)
    })
}

/// No mail arrives within a few seconds (mail goes out within a second).
fn assert_no_mail(sink: &SmtpSink) {
    std::thread::sleep(Duration::from_secs(3));
    assert!(sink.messages().is_empty(), "{:#?}", sink.messages());
}

#[test]
fn a_project_that_broke_itself_while_the_upstream_moved_is_project_side_and_blames_no_upstream_commit()
 {
    let repos = Repos::with(&["shouter"]);
    let sink = SmtpSink::start();
    let (hub, _agents) = farm(&repos.config(&smtp_toml(&sink)));
    let c1 = repos.head("rt");
    wait_settled(&hub, "shouter", &c1);

    // The project's own commit breaks its test_add, and the upstream moves
    // (an innocent commit) at the same time.
    repos.commit(
        "shouter",
        "test.sh",
        &SHOUTER_TESTS.replace("check test_add 4", "check test_add 5"),
        "shouter: expect the wrong sum",
        "Pat Project <pat@example.org>",
    );
    let c2 = repos.commit(
        "rt",
        "rt.sh",
        &format!("{RUNTIME}# a comment\n"),
        "rt: a comment",
        "Ivy Innocent <ivy@example.org>",
    );
    let red = wait_for(STEP, "shouter went red", || {
        let all = transitions(&hub, "shouter");
        all.into_iter().find(|t| s(t, "kind") == WENT_RED)
    });
    assert_eq!(s(&red, "class"), "project_side", "{red:#}");
    assert!(
        red["culprits"].as_array().unwrap().is_empty(),
        "no upstream commit blamed: {red:#}"
    );
    assert_eq!(red["project_commit_changed"], Value::Bool(true), "{red:#}");
    assert_eq!(s(&red, "last_green_upstream_commit"), c1);
    // Whichever run came first (the new project commit against c1, or
    // against c2), the other decides nothing more: one went red.
    wait_settled(&hub, "shouter", &c2);
    let all = transitions(&hub, "shouter");
    let went_red: Vec<_> = all.iter().filter(|t| s(t, "kind") == WENT_RED).collect();
    assert_eq!(went_red.len(), 1, "{all:#?}");
    assert!(
        all.iter()
            .all(|t| t["culprits"].as_array().unwrap().is_empty()),
        "{all:#?}"
    );
    // Who is mailed for a project_side result is `[notify] mail_classes`
    // (its maintainers only, no upstream culprit): the mail work's tests.
}

#[test]
fn a_test_run_killed_at_its_timeout_is_spurious_and_mails_nobody() {
    let repos = Repos::with(&["shouter"]);
    let sink = SmtpSink::start();
    let config = repos.config(&smtp_toml(&sink)).replace(
        "test = [\"sh test.sh\"]\ntimeout = \"1m\"",
        "test = [\"sh test.sh\"]\ntimeout = \"3s\"",
    );
    assert!(config.contains("timeout = \"3s\""), "{config}");
    let (hub, _agents) = farm(&config);
    let c1 = repos.head("rt");
    wait_settled(&hub, "shouter", &c1);

    // The runtime's `upper` now hangs: shouter's run is killed at 3 s, on
    // the original agent and on the re-run alike.
    let c2 = repos.commit(
        "rt",
        "rt.sh",
        &RUNTIME.replace("upper) printf", "upper) sleep 30; printf"),
        "rt: upper takes its time",
        "Sam Slow <sam@example.org>",
    );
    let r = wait_settled(&hub, "shouter", &c2);
    assert_eq!(s(&r, "outcome"), "timed_out", "{r:#}");
    assert_eq!(s(&r, "confirmation"), "overruled", "{r:#}");
    let detail = s(&r, "confirmation_detail");
    assert!(
        detail.contains("(spurious)") && detail.contains("for the machine's sake"),
        "{detail}"
    );
    let all = transitions(&hub, "shouter");
    assert!(all.iter().all(|t| s(t, "kind") != WENT_RED), "{all:#?}");
    let newest = &all[0];
    assert_eq!(
        (s(newest, "kind"), s(newest, "class")),
        (STILL_GREEN, "spurious"),
        "{all:#?}"
    );
    assert_no_mail(&sink);
}

/// A suite whose one test fails every third run it makes (a counter file
/// outside the job's directory), whatever the runtime.
const FLAKY_TESTS: &str = r#"#!/bin/sh
n=$(cat "$FLAKY_COUNTER" 2>/dev/null || echo 0)
n=$((n + 1))
echo "$n" > "$FLAKY_COUNTER"
if [ $((n % 3)) -eq 0 ]; then
  case='<testcase classname="flaky" name="test_sometimes"><failure message="bad luck"/></testcase>'
  fail=1
else
  case='<testcase classname="flaky" name="test_sometimes"/>'
  fail=0
fi
printf '<testsuites><testsuite name="flaky">%s</testsuite></testsuites>\n' "$case" > junit.xml
exit $fail
"#;

#[test]
fn a_test_that_fails_one_run_in_three_over_twenty_pushes_mails_nobody() {
    let repos = Repos::with(&[]);
    repos.create("flaky", &[("test.sh", FLAKY_TESTS)], "flaky: one test");
    let counter = temp_dir("trunkfarm-e2e-flaky-");
    let sink = SmtpSink::start();
    let project = format!(
        r#"
[[project]]
name = "flaky"
url = "{url}"
poll_interval = "200ms"
test = ["sh test.sh"]
timeout = "1m"
junit = ["junit.xml"]
maintainers = ["flaky-dev@example.org"]
env = {{ FLAKY_COUNTER = "{counter}" }}
"#,
        url = repos.path("flaky").display(),
        counter = counter.path().join("runs").display(),
    );
    let (hub, _agents) = farm(&repos.config(&format!("{}{project}", smtp_toml(&sink))));
    let c1 = repos.head("rt");
    wait_settled(&hub, "flaky", &c1);

    for i in 1..=20 {
        let c = repos.commit(
            "rt",
            "rt.sh",
            &format!("{RUNTIME}# push {i}\n"),
            &format!("rt: push {i}"),
            "Ivy Innocent <ivy@example.org>",
        );
        wait_settled(&hub, "flaky", &c);
    }
    let all = transitions(&hub, "flaky");
    let kinds: Vec<&str> = all.iter().map(|t| s(t, "kind")).collect();
    assert!(
        kinds.iter().all(|k| *k == STILL_GREEN),
        "never red, never fixed: {kinds:?}"
    );
    let flaky: Vec<_> = all.iter().filter(|t| s(t, "class") == "flaky").collect();
    assert!(
        flaky.len() >= 3,
        "about one push in three failed and passed on its re-run: {all:#?}"
    );
    assert!(
        flaky
            .iter()
            .all(|t| t["newly_failing"] == serde_json::json!(["flaky.test_sometimes"])),
        "{flaky:#?}"
    );
    // Listed as flaky with its rate: `flaky` and `status`.
    let noise = hub.cli_json(&["flaky", "--project", "flaky", "--json"]);
    let t = &noise[0]["tests"][0];
    assert_eq!(s(t, "name"), "flaky.test_sometimes", "{noise:#}");
    assert!(t["flips"].as_u64().unwrap() >= 2, "{noise:#}");
    assert_eq!(t["known_flaky"], serde_json::Value::Bool(true), "{noise:#}");
    assert!(hub.cli_ok(&["status"]).contains("1 flaky test"));
    assert_no_mail(&sink);
}
