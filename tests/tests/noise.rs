//! Know the noise, and green is not always green (issue 13 items 2 and 7),
//! end to end: real git repositories, a real hub, a real agent, a real SMTP
//! server. A suite that starts skipping every test after an upstream commit
//! is suspicious and its maintainer gets one mail naming that commit and the
//! counts; `trunkfarm calibrate` measures a test that fails every third run.

use std::time::Duration;

use serde_json::Value;
use trunkfarm_e2e::farm::{Repos, broken_runtime, cell, smtp_toml};
use trunkfarm_e2e::smtp::SmtpSink;
use trunkfarm_e2e::{Agent, Hub, s, temp_dir, u, wait_for};

/// How long the pipeline may take for one step (build + fan-out + tests).
const STEP: Duration = Duration::from_secs(90);

/// Twenty tests that pass while the runtime upper-cases, and are all
/// skipped (exit 0) once it does not: a suite that goes quiet, still green.
const SKIPPER_TESTS: &str = r#"#!/bin/sh
if [ "$(rt upper abc)" = ABC ]; then body=""; else body="<skipped/>"; fi
cases=""
i=1
while [ $i -le 20 ]; do
  cases="$cases<testcase classname=\"skipper\" name=\"test_$i\">$body</testcase>"
  i=$((i + 1))
done
printf '<testsuites><testsuite name="skipper">%s</testsuite></testsuites>\n' "$cases" > junit.xml
"#;

const SKIPPER_MAINTAINER: &str = "skipper-dev@example.org";

/// A hub for `repos` (plus `extra` config) with one trusted agent running
/// one job at a time.
fn farm(repos: &Repos, extra: &str) -> (Hub, Agent) {
    let hub = Hub::start_with(&repos.config(extra), &[]);
    let mut agent = Agent::enroll(&hub, "n0", &["--trusted"]);
    agent.start(&["--max-parallel-jobs", "1"]);
    hub.wait_agents_connected(1);
    (hub, agent)
}

/// `project`'s status cell.
fn status_cell(hub: &Hub, project: &str) -> Value {
    cell(&hub.cli_json(&["status", "--json"]), project)
}

/// Waits until `project`'s newest run tested upstream `commit` and is green.
fn wait_green(hub: &Hub, project: &str, commit: &str) -> Value {
    wait_for(STEP, &format!("{project} to be green at {commit}"), || {
        let c = status_cell(hub, project);
        (s(&c["run"], "upstream_commit") == commit && s(&c, "status") == "green").then_some(c)
    })
}

#[test]
fn a_suite_that_starts_skipping_every_test_is_suspicious_and_mailed_once() {
    let sink = SmtpSink::start();
    let repos = Repos::with(&[]);
    repos.create("skipper", &[("test.sh", SKIPPER_TESTS)], "skipper");
    let project = format!(
        r#"
[[project]]
name = "skipper"
url = "{}"
poll_interval = "200ms"
test = ["sh test.sh"]
timeout = "1m"
junit = ["junit.xml"]
maintainers = ["{SKIPPER_MAINTAINER}"]
"#,
        repos.path("skipper").display()
    );
    let (hub, _agent) = farm(&repos, &format!("{project}{}", smtp_toml(&sink)));
    let c1 = repos.head("rt");
    let usual = wait_green(&hub, "skipper", &c1);
    assert_eq!(u(&usual["run"], "tests_total"), 20, "{usual:#}");
    assert!(usual["run"]["suspicious"].is_null(), "{usual:#}");

    // The upstream commit after which every test is skipped: still green.
    let c2 = repos.break_upper("Eve Breaker <eve@example.org>");
    let quiet = wait_green(&hub, "skipper", &c2);
    assert_eq!(u(&quiet["run"], "tests_skipped"), 20, "{quiet:#}");
    assert_eq!(
        s(&quiet["run"], "suspicious"),
        "20 passed → 0 passed, 20 skipped",
        "{quiet:#}"
    );
    assert!(quiet["red_since"].is_null(), "the series stays green");

    // One mail to its maintainer, naming the commit and the counts.
    let mails = sink.wait_for_messages(1, STEP);
    assert_eq!(mails.len(), 1, "{mails:#?}");
    let mail = &mails[0];
    assert_eq!(mail.to(), [SKIPPER_MAINTAINER]);
    let subject = mail.subject();
    assert!(subject.contains("skipper looks suspicious"), "{subject}");
    assert!(subject.contains(&c2[..10]), "{subject}");
    assert!(
        subject.contains("20 passed → 0 passed, 20 skipped"),
        "{subject}"
    );
    assert!(
        mail.text.contains("20 passed → 0 passed, 20 skipped"),
        "{}",
        mail.text
    );
    assert!(mail.text.contains(&c2[..10]), "{}", mail.text);
    assert!(mail.text.contains("rt: speed up upper"), "{}", mail.text);

    // History: one suspicious transition (kind still green).
    let list = hub.cli_json(&["transitions", "--project", "skipper", "--json"]);
    let suspicious: Vec<&Value> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| !t["suspicious"].is_null())
        .collect();
    assert_eq!(suspicious.len(), 1, "{list:#}");
    assert_eq!(s(suspicious[0], "kind"), "still_green");
    assert_eq!(s(suspicious[0], "upstream_commit"), c2);

    // The next commit is still skipped: marked, but no second mail.
    let c3 = repos.commit(
        "rt",
        "rt.sh",
        &format!("{}# tidied\n", broken_runtime()),
        "rt: tidy",
        "Ada <ada@example.org>",
    );
    let still = wait_green(&hub, "skipper", &c3);
    assert!(!still["run"]["suspicious"].is_null(), "{still:#}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(sink.messages().len(), 1, "one mail per suspicious spell");
    let text = hub.cli_ok(&["status"]);
    assert!(
        text.contains("suspicious: 20 passed → 0 passed, 20 skipped"),
        "{text}"
    );
}

/// Fails `test_flip` on every third run (counted in `counter`, outside the
/// checkout); `test_steady` always passes.
fn flipper_tests(counter: &std::path::Path) -> String {
    format!(
        r#"#!/bin/sh
n=$(cat '{c}' 2>/dev/null || echo 0)
n=$((n + 1))
echo $n > '{c}'
if [ $((n % 3)) -eq 0 ]; then
  flip='<testcase classname="flipper" name="test_flip"><failure message="run '$n' fails"/></testcase>'
  fail=1
else
  flip='<testcase classname="flipper" name="test_flip"/>'
  fail=0
fi
printf '<testsuites><testsuite name="flipper">%s<testcase classname="flipper" name="test_steady"/></testsuite></testsuites>\n' "$flip" > junit.xml
exit $fail
"#,
        c = counter.display()
    )
}

#[test]
fn calibrate_reports_a_test_failing_every_third_run_flaky_two_of_six() {
    let state = temp_dir("trunkfarm-e2e-flipper-");
    let counter = state.path().join("runs");
    let repos = Repos::with(&[]);
    repos.create(
        "flipper",
        &[("test.sh", &flipper_tests(&counter))],
        "flipper",
    );
    let project = format!(
        r#"
[[project]]
name = "flipper"
url = "{}"
poll_interval = "200ms"
test = ["sh test.sh"]
timeout = "1m"
junit = ["junit.xml"]
"#,
        repos.path("flipper").display()
    );
    let (hub, _agent) = farm(&repos, &project);
    // Its first run (the counter's 1) passes.
    wait_green(&hub, "flipper", &repos.head("rt"));

    // Queue six identical runs; asking again queues nothing twice.
    let args = ["calibrate", "--project", "flipper", "--runs", "6", "--json"];
    let queued = hub.cli_json(&[&args[..], &["--no-wait"]].concat());
    let jobs = queued["jobs"].as_array().unwrap().clone();
    assert_eq!(jobs.len(), 6, "{queued:#}");
    let original = u(&queued["original"], "job_id").to_string();
    let again = hub.cli_json(&[&args[..], &["--no-wait", "--job", &original]].concat());
    assert_eq!(again["jobs"].as_array().unwrap(), &jobs, "{again:#}");
    let done = wait_for(STEP, "six calibration runs", || {
        let c = hub.cli_json(&[&args[..], &["--no-wait", "--job", &original]].concat());
        (u(&c, "finished") == 6).then_some(c)
    });
    // Runs 2 to 7 of the counter: 3 and 6 fail.
    assert_eq!(u(&done, "red"), 2, "{done:#}");
    let tests = done["tests"].as_array().unwrap();
    assert_eq!(tests.len(), 1, "only the test that failed: {done:#}");
    assert_eq!(s(&tests[0], "name"), "flipper.test_flip");
    assert_eq!((u(&tests[0], "failed"), u(&tests[0], "ran")), (2, 6));
    assert_eq!(tests[0]["flaky"], Value::Bool(true));
    assert_eq!(tests[0]["known_flaky"], Value::Bool(true), "{done:#}");

    // The waiting form (all in: it returns at once) says it for people.
    let text = hub.cli_ok(&[
        "calibrate",
        "--project",
        "flipper",
        "--runs",
        "6",
        "--job",
        &original,
    ]);
    assert!(text.contains("flipper.test_flip"), "{text}");
    assert!(text.contains("2/6"), "{text}");
    assert!(text.contains("flaky"), "{text}");

    // Counted in the noise record, shown in `flaky` and `status`, and the
    // calibration runs classified nothing.
    let flaky = hub.cli_json(&["flaky", "--project", "flipper", "--json"]);
    let t = &flaky[0]["tests"][0];
    assert_eq!(s(t, "name"), "flipper.test_flip", "{flaky:#}");
    assert_eq!((u(t, "flips"), u(t, "runs")), (2, 6), "{flaky:#}");
    assert_eq!(u(&status_cell(&hub, "flipper"), "flaky_tests"), 1);
    assert!(hub.cli_ok(&["status"]).contains("1 flaky test"));
    let history = hub.cli_json(&["transitions", "--all", "--project", "flipper", "--json"]);
    assert_eq!(history.as_array().unwrap().len(), 1, "{history:#}");
}
