//! Judging a run by its output where its exit code lies: real repositories,
//! a real hub, a real agent and a real SMTP server. A suite that prints
//! `[fail]` and exits 0 is red for a project with `fail_pattern =
//! '\[fail\]'` (and green for one without), and the went-red mail quotes the
//! lines around `[fail]` rather than the log's tail.

use std::time::Duration;

use serde_json::Value;
use trunkfarm_e2e::farm::{self, Repos, smtp_toml};
use trunkfarm_e2e::smtp::SmtpSink;
use trunkfarm_e2e::{Agent, Hub, s};

/// How long the pipeline may take for one step (build + fan-out + tests).
const STEP: Duration = Duration::from_secs(90);

/// A runner that prints each failure as `[fail] …` among many progress
/// lines, and exits 0 whatever happened.
const QUIET_TESTS: &str = r#"#!/bin/sh
i=1
while [ $i -le 10 ]; do echo "Starting test $i"; i=$((i + 1)); done
got=$(rt upper abc)
if [ "$got" = ABC ]; then
  echo "[ok] test_upper"
else
  echo "[fail] test_upper: expected ABC, got $got"
fi
while [ $i -le 70 ]; do echo "Starting test $i"; i=$((i + 1)); done
echo "ran 61 tests"
exit 0
"#;

const JUDGED_MAINTAINER: &str = "judged-dev@example.org";

/// Waits until `project`'s newest run tested upstream `commit` and finished
/// `want` ("green" or "red").
fn wait_run(hub: &Hub, project: &str, commit: &str, want: &str) -> Value {
    farm::wait_run(hub, project, commit, want, STEP)
}

#[test]
fn a_suite_that_prints_fail_and_exits_0_is_red_with_a_fail_pattern_and_its_mail_quotes_it() {
    let sink = SmtpSink::start();
    let repos = Repos::with(&[]);
    for name in ["judged", "trusting"] {
        repos.create(name, &[("test.sh", QUIET_TESTS)], name);
    }
    let project = |name: &str, extra: &str| {
        format!(
            r#"
[[project]]
name = "{name}"
url = "{url}"
poll_interval = "200ms"
test = ["sh test.sh"]
timeout = "1m"
{extra}
"#,
            url = repos.path(name).display()
        )
    };
    let extra = [
        project(
            "judged",
            &format!("fail_pattern = '\\[fail\\]'\nmaintainers = [\"{JUDGED_MAINTAINER}\"]"),
        ),
        project("trusting", "maintainers = [\"trusting-dev@example.org\"]"),
        smtp_toml(&sink),
    ]
    .concat();
    let hub = Hub::start_with(&repos.config(&extra), &[]);
    let mut agent = Agent::enroll(&hub, "judge", &["--trusted"]);
    agent.start(&["--max-parallel-jobs", "2"]);
    hub.wait_agents_connected(1);

    let c1 = repos.head("rt");
    wait_run(&hub, "judged", &c1, "green");
    wait_run(&hub, "trusting", &c1, "green");

    // The runtime breaks `upper`: the suite prints `[fail]` and exits 0.
    let c2 = repos.break_upper("Eve Breaker <eve@example.org>");
    let red = wait_run(&hub, "judged", &c2, "red");
    let detail = s(&red["run"], "detail");
    assert!(
        detail.contains(r"red by fail_pattern '\[fail\]'")
            && detail.contains("[fail] test_upper: expected ABC, got abc"),
        "the run says which pattern decided: {red:#}"
    );
    // Without the pattern the exit code decides, as before.
    wait_run(&hub, "trusting", &c2, "green");

    let mails = sink.wait_for_messages(1, STEP);
    assert_eq!(mails.len(), 1, "{:#?}", sink.messages());
    let mail = &mails[0];
    assert_eq!(mail.to(), [JUDGED_MAINTAINER]);
    assert!(
        mail.subject().contains("judged went red"),
        "{}",
        mail.subject()
    );
    let text = &mail.text;
    assert!(
        text.contains("From the log, around the first failures:"),
        "{text}"
    );
    assert!(
        text.contains("  | [fail] test_upper: expected ABC, got abc"),
        "{text}"
    );
    assert!(
        text.contains("  | Starting test 9"),
        "the lines before: {text}"
    );
    assert!(
        !text.contains("Starting test 70"),
        "not a blind tail of the log: {text}"
    );
}
