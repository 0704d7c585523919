//! The trunk pipeline end to end: real git repositories, a real hub and real
//! agents. An upstream "runtime" (a shell script the build installs into
//! $PREFIX) and downstream projects that test against it; commits land on
//! the upstream, the hub notices by polling, builds, fans out, and
//! classifies each result.

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use trunkfarm_e2e::farm::{
    self, ADDER_TESTS, FIXED, RUNTIME, Repos, STILL_GREEN, STILL_RED, WENT_RED, broken_runtime,
    cell, smtp_toml,
};
use trunkfarm_e2e::{Agent, Hub, git, s, u, wait_for};

/// How long the pipeline may take for one step (build + fan-out + tests).
const STEP: Duration = Duration::from_secs(90);

/// A hub configured for `repos` with `agents` connected agents.
fn farm(repos: &Repos, extra: &str, agents: usize) -> (Hub, Vec<Agent>) {
    let hub = Hub::start_with(&repos.config(extra), &[]);
    let mut list = Vec::new();
    for i in 0..agents {
        let mut a = Agent::enroll(&hub, &format!("p{i}"), &["--trusted"]);
        // Two slots: one agent may run two tests of one runtime at once,
        // which must still cost one download.
        a.start(&["--max-parallel-jobs", "2"]);
        list.push(a);
    }
    hub.wait_agents_connected(agents);
    (hub, list)
}

fn status(hub: &Hub) -> Value {
    hub.cli_json(&["status", "--json"])
}

/// Waits until `project`'s newest run tested upstream `commit` and has
/// finished with `want` ("green", "red" or "error"), its verdict no longer
/// held for its re-runs (a went red or fixed counts once they class it).
fn wait_run(hub: &Hub, project: &str, commit: &str, want: &str) -> Value {
    farm::wait_run(hub, project, commit, want, STEP)
}

fn transitions(hub: &Hub, project: &str) -> Vec<Value> {
    hub.cli_json(&[
        "transitions",
        "--all",
        "--json",
        "--project",
        project,
        "--limit",
        "100",
    ])
    .as_array()
    .unwrap()
    .clone()
}

fn kind(t: &Value) -> &str {
    s(t, "kind")
}

#[test]
fn trunk_breaks_one_project_and_a_fix_turns_it_green() {
    let repos = Repos::new();
    let c1 = repos.head("rt");
    let (hub, _agents) = farm(&repos, "", 2);

    // Commit 1: the hub polls, builds, fans out; everything green.
    wait_run(&hub, "adder", &c1, "green");
    let shouter = wait_run(&hub, "shouter", &c1, "green");
    assert_eq!(u(&shouter["run"], "tests_total"), 2, "{shouter:#}");

    // Commit 2 breaks `upper`, which only shouter uses.
    let c2 = repos.break_upper("Eve Breaker <eve@example.org>");
    let red = wait_run(&hub, "shouter", &c2, "red");
    wait_run(&hub, "adder", &c2, "green");
    let failing: Vec<&str> = red["run"]["failing_tests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| s(t, "name"))
        .collect();
    assert_eq!(failing, ["shouter.test_upper"], "{red:#}");
    assert_eq!(s(&red["red_since"], "upstream_commit"), c2, "{red:#}");

    // The breakage query names exactly commit 2 as the culprit.
    let b = hub.cli_json(&["breakage", "--upstream", "rt", "--rev", &c2[..8], "--json"]);
    let went_red = b["went_red"].as_array().unwrap();
    assert_eq!(went_red.len(), 1, "{b:#}");
    let t = &went_red[0];
    assert_eq!(s(t, "project"), "shouter");
    assert_eq!(s(t, "last_green_upstream_commit"), c1);
    let culprits = t["culprits"].as_array().unwrap();
    assert_eq!(
        culprits.len(),
        1,
        "culprit range is exactly commit 2: {t:#}"
    );
    assert_eq!(s(&culprits[0], "sha"), c2);
    assert_eq!(s(&culprits[0], "subject"), "rt: speed up upper");
    assert_eq!(s(&culprits[0], "author"), "Eve Breaker <eve@example.org>");
    assert_eq!(
        t["newly_failing"],
        serde_json::json!(["shouter.test_upper"])
    );
    assert_eq!(t["project_commit_changed"], Value::Bool(false), "{t:#}");
    // And the human form says so too.
    let text = hub.cli_ok(&["breakage", "--upstream", "rt", "--rev", &c2]);
    assert!(text.contains("shouter went red"), "{text}");
    assert!(text.contains("rt: speed up upper"), "{text}");
    assert!(text.contains("newly failing: shouter.test_upper"), "{text}");
    let nothing = hub.cli_ok(&["breakage", "--upstream", "rt", "--rev", &c1]);
    assert!(nothing.contains("nothing went red"), "{nothing}");

    // Commit 3 fixes it.
    // (Not byte-identical to commit 1: an identical runtime packed within
    // the same second is the same artifact, stored once.)
    let c3 = repos.commit(
        "rt",
        "rt.sh",
        &format!("{RUNTIME}# upper fixed\n"),
        "rt: fix upper",
        "Fay Fixer <fay@example.org>",
    );
    wait_run(&hub, "shouter", &c3, "green");
    wait_run(&hub, "adder", &c3, "green");
    let history = transitions(&hub, "shouter");
    let kinds: Vec<&str> = history.iter().rev().map(kind).collect();
    assert_eq!(kinds, [STILL_GREEN, WENT_RED, FIXED], "{history:#?}");
    assert!(
        transitions(&hub, "adder")
            .iter()
            .all(|t| kind(t) == STILL_GREEN),
        "adder never changed"
    );

    // Each agent downloaded each runtime at most once (3 builds, 2 agents,
    // 2 projects: without the cache some would be fetched twice).
    let artifacts = hub.cli_json(&["artifact", "list", "--json"]);
    let artifacts = artifacts.as_array().unwrap();
    assert_eq!(artifacts.len(), 3, "{artifacts:#?}");
    let mut total = 0;
    for a in artifacts {
        for d in a["downloads"].as_array().unwrap() {
            assert_eq!(u(d, "count"), 1, "downloaded twice by one agent: {a:#}");
            total += 1;
        }
        assert!(
            !s(a, "commit").is_empty() && s(a, "upstream") == "rt",
            "{a:#}"
        );
    }
    assert!(total >= 3, "every runtime was downloaded: {artifacts:#?}");

    // The grid, as a person sees it.
    let grid = hub.cli_ok(&["status"]);
    assert!(grid.contains("adder") && grid.contains("shouter"), "{grid}");
    assert!(grid.contains(&format!("green {}", &c3[..10])), "{grid}");
}

#[test]
fn a_failed_build_is_red_and_fans_nothing_out() {
    let repos = Repos::new();
    let c1 = repos.head("rt");
    let (hub, _agents) = farm(&repos, "", 1);
    wait_run(&hub, "adder", &c1, "green");
    // A commit that breaks the build itself.
    git(&repos.path("rt"), &["mv", "rt.sh", "rt2.sh"]);
    git(
        &repos.path("rt"),
        &[
            "commit",
            "--quiet",
            "--author",
            "Eve <eve@example.org>",
            "-m",
            "rt: rename the script",
        ],
    );
    let c3 = repos.head("rt");
    let build = wait_for(STEP, "the build of commit 3 to fail", || {
        let st = status(&hub);
        let b = st["upstreams"][0]["latest_builds"][0].clone();
        (s(&b, "commit") == c3 && s(&b, "state") == "failed").then_some(b)
    });
    assert!(s(&build, "detail").contains("exit"), "{build:#}");
    let st = status(&hub);
    // The good runtime is still commit 1, and no test ran against commit 3.
    assert_eq!(
        s(&st["upstreams"][0]["good_builds"][0], "commit"),
        c1,
        "{st:#}"
    );
    for p in ["adder", "shouter"] {
        assert_eq!(s(&cell(&st, p)["run"], "upstream_commit"), c1);
    }
    let jobs = hub.cli_json(&["job", "list", "--json"]);
    let tests_at = |c: &str| {
        jobs.as_array()
            .unwrap()
            .iter()
            .filter(|j| s(j, "key").starts_with("test/") && s(j, "key").contains(c))
            .count()
    };
    assert_eq!(
        tests_at(&c1),
        2,
        "both projects ran against commit 1: {jobs:#}"
    );
    assert_eq!(
        tests_at(&c3),
        0,
        "tests ran against a failed build: {jobs:#}"
    );
    // The runtime's own transition: the build went red at commit 3.
    let t = hub.cli_json(&["transitions", "--json", "--upstream", "rt"]);
    let build_red = t
        .as_array()
        .unwrap()
        .iter()
        .find(|t| s(t, "project").is_empty() && kind(t) == WENT_RED)
        .unwrap_or_else(|| panic!("no went-red transition for the build: {t:#}"));
    assert_eq!(s(build_red, "upstream_commit"), c3);
    let subjects: Vec<&str> = build_red["culprits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| s(c, "subject"))
        .collect();
    assert_eq!(subjects, ["rt: rename the script"]);
}

#[test]
fn an_unclonable_project_is_an_infrastructure_error_and_others_still_run() {
    let repos = Repos::new();
    let c1 = repos.head("rt");
    let missing = repos.path("does-not-exist");
    let extra = format!(
        r#"
[[project]]
name = "ghost"
url = "{}"
poll_interval = "200ms"
test = ["true"]
"#,
        missing.display()
    );
    let (hub, _agents) = farm(&repos, &extra, 1);
    wait_run(&hub, "adder", &c1, "green");
    wait_run(&hub, "shouter", &c1, "green");
    let ghost = wait_run(&hub, "ghost", &c1, "error");
    assert!(
        s(&ghost["run"], "detail").contains("checkout"),
        "the error says the checkout failed: {ghost:#}"
    );
    assert!(
        ghost["red_since"].is_null(),
        "an infra error is not red: {ghost:#}"
    );
    // The grid shows why it is an error.
    let text = hub.cli_ok(&["status"]);
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("ghost"))
        .unwrap_or_else(|| panic!("no ghost row:\n{text}"));
    assert!(
        line.contains("error") && line.contains("checkout"),
        "{line}"
    );
    // No transition for ghost: an error decides nothing.
    assert!(transitions(&hub, "ghost").is_empty());
}

#[test]
fn malformed_junit_keeps_the_runs_status_and_shows_the_parse_error() {
    let repos = Repos::new();
    repos.create(
        "sloppy",
        &[(
            "test.sh",
            "echo '<testsuites><testcase name=' > junit.xml; rt add 1 1\n",
        )],
        "sloppy",
    );
    let c1 = repos.head("rt");
    let extra = format!(
        r#"
[[project]]
name = "sloppy"
url = "{}"
poll_interval = "200ms"
test = ["sh test.sh"]
junit = ["junit.xml", "missing.xml"]
"#,
        repos.path("sloppy").display()
    );
    let (hub, _agents) = farm(&repos, &extra, 1);
    let c = wait_run(&hub, "sloppy", &c1, "green");
    let err = s(&c["run"], "report_error");
    assert!(err.contains("junit.xml"), "{c:#}");
    assert!(err.contains("missing.xml"), "{c:#}");
}

#[test]
fn a_new_project_commit_reruns_it_against_the_good_runtime() {
    let repos = Repos::new();
    let c1 = repos.head("rt");
    let (hub, _agents) = farm(&repos, "", 1);
    wait_run(&hub, "adder", &c1, "green");
    let p2 = repos.commit(
        "adder",
        "test.sh",
        &ADDER_TESTS.replace("= 5", "= 6"),
        "adder: wrong expectation",
        "Pat <pat@example.org>",
    );
    let red = wait_for(STEP, "adder to run at its new commit", || {
        let c = cell(&status(&hub), "adder");
        let counted = s(&c["run"], "confirmation") != "awaiting";
        (s(&c["run"], "project_commit") == p2 && counted).then_some(c)
    });
    assert_eq!(s(&red, "status"), "red", "{red:#}");
    assert_eq!(s(&red["run"], "upstream_commit"), c1);
    let t = &transitions(&hub, "adder")[0];
    assert_eq!(kind(t), WENT_RED);
    assert_eq!(t["project_commit_changed"], Value::Bool(true), "{t:#}");
    // Failing again on the runtime it passed on: the project broke itself.
    assert_eq!(s(t, "class"), "project_side", "{t:#}");
    assert!(t["culprits"].as_array().unwrap().is_empty(), "{t:#}");
    // Still red after a trunk commit that changes nothing for it.
    let c2 = repos.commit("rt", "NEWS", "x", "rt: news", "Eve <eve@example.org>");
    wait_run(&hub, "adder", &c2, "red");
    assert_eq!(kind(&transitions(&hub, "adder")[0]), STILL_RED);
}

#[test]
fn manual_build_of_a_rev_and_unknown_names() {
    let repos = Repos::new();
    let c1 = repos.head("rt");
    let c2 = repos.commit("rt", "NEWS", "x", "rt: news", "Eve <eve@example.org>");
    let hub = Hub::start_with(
        &repos.config("").replace(
            "poll_interval = \"200ms\"\nbuild",
            "poll_interval = \"1h\"\nbuild",
        ),
        &[],
    );
    let mut a = Agent::enroll(&hub, "m", &["--trusted"]);
    a.start(&[]);
    hub.wait_agents_connected(1);
    // The poller builds the head (c2) at start; then c1 by hand.
    wait_run(&hub, "adder", &c2, "green");
    let out = hub.cli_ok(&["upstream", "build", "rt", "--rev", &c1[..7]]);
    assert_eq!(out.trim(), c1);
    wait_run(&hub, "adder", &c1, "green");
    // A build of an older commit is recorded and tested, but the runtime new
    // project commits test against stays the head's, and nothing is classified.
    let st = status(&hub);
    assert_eq!(
        s(&st["upstreams"][0]["good_builds"][0], "commit"),
        c2,
        "{st:#}"
    );
    assert_eq!(
        s(&st["upstreams"][0]["latest_builds"][0], "commit"),
        c2,
        "{st:#}"
    );
    let t = transitions(&hub, "adder");
    assert!(t.iter().all(|t| s(t, "upstream_commit") == c2), "{t:#?}");
    // Built before: it says so and by which job; the only upstream needs no
    // name, here nor in `breakage`.
    let again = hub.cli(&["upstream", "build", "--rev", &c1[..7]]);
    let said = String::from_utf8_lossy(&again.stderr);
    assert!(
        again.status.success()
            && said.contains("is already built (job ")
            && said.contains("use --force to build it again"),
        "{said}"
    );
    let b = hub.cli_json(&["breakage", "--rev", &c2[..8], "--json"]);
    assert!(b["went_red"].as_array().is_some(), "{b:#}");
    let bad = hub.cli(&["upstream", "build", "nope"]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("no upstream named \"nope\"") && err.contains("rt"),
        "{err}"
    );
    let bad = hub.cli(&["upstream", "build", "rt", "--rev", "no-such-branch"]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("neither a branch, a tag nor a commit"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

#[test]
fn a_tampered_artifact_is_refused_quarantined_and_rebuilt() {
    let repos = Repos::new();
    let c1 = repos.head("rt");
    let (hub, mut agents) = farm(&repos, "", 1);
    wait_run(&hub, "adder", &c1, "green");
    let artifacts = hub.cli_json(&["artifact", "list", "--json"]);
    let sha = s(&artifacts[0], "sha256").to_string();
    // Flip bytes in the stored runtime (same size: only the hash can tell).
    let file = hub
        .data_dir
        .join("artifacts")
        .join(format!("{sha}.tar.zst"));
    let mut bytes = fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&file, &bytes).unwrap();
    // A fresh agent (empty cache) must fetch it for adder's new commit.
    agents[0].kill9();
    let mut fresh = Agent::enroll(&hub, "fresh", &["--trusted"]);
    fresh.start(&[]);
    let p2 = repos.commit(
        "adder",
        "NOTES",
        "x",
        "adder: notes",
        "Pat <pat@example.org>",
    );
    let run = wait_for(STEP, "adder's run against the tampered runtime", || {
        let c = cell(&status(&hub), "adder");
        (s(&c["run"], "project_commit") == p2).then_some(c)
    });
    assert_eq!(
        s(&run, "status"),
        "error",
        "a tampered runtime is an infrastructure error: {run:#}"
    );
    let detail = s(&run["run"], "detail");
    assert!(detail.contains("runtime"), "{detail}");
    assert!(
        detail.contains("corrupt")
            || detail.contains("quarantined")
            || detail.contains("no artifact"),
        "{detail}"
    );
    // The hub moved the bad file aside and forgot it.
    assert!(!file.exists());
    assert!(
        hub.data_dir
            .join("artifacts/quarantine")
            .read_dir()
            .unwrap()
            .count()
            >= 1
    );
    // A forced rebuild stores the runtime again and the project is retested green.
    hub.cli_ok(&["upstream", "build", "rt", "--force"]);
    wait_for(STEP, "adder green again at its new commit", || {
        let c = cell(&status(&hub), "adder");
        (s(&c["run"], "project_commit") == p2 && s(&c, "status") == "green").then_some(())
    });
}

#[test]
fn hub_killed_mid_pipeline_loses_and_repeats_nothing() {
    let repos = Repos::new();
    let c1 = repos.head("rt");
    let (mut hub, _agents) = farm(&repos, "", 2);
    wait_run(&hub, "shouter", &c1, "green");
    wait_run(&hub, "adder", &c1, "green");
    let mut commits = vec![c1];
    for (i, kill_after_ms) in [0u64, 30, 90, 150, 250, 400].into_iter().enumerate() {
        let text = if i % 2 == 0 {
            broken_runtime()
        } else {
            RUNTIME.to_string()
        };
        let c = repos.commit(
            "rt",
            "rt.sh",
            &format!("{text}# {i}\n"),
            &format!("change {i}"),
            "Eve <eve@example.org>",
        );
        std::thread::sleep(Duration::from_millis(kill_after_ms));
        hub.kill9();
        hub.restart();
        let want = if i % 2 == 0 { "red" } else { "green" };
        wait_run(&hub, "shouter", &c, want);
        wait_run(&hub, "adder", &c, "green");
        commits.push(c);
    }
    // Exactly one build per commit and one test run per (project, commit),
    // besides the re-runs of each went red and fixed (once per key).
    let jobs = hub.cli_json(&["job", "list", "--json", "--limit", "1000"]);
    let keys: Vec<&str> = jobs
        .as_array()
        .unwrap()
        .iter()
        .map(|j| s(j, "key"))
        .collect();
    for c in &commits {
        assert_eq!(
            keys.iter()
                .filter(|k| k.starts_with("build/") && k.ends_with(c.as_str()))
                .count(),
            1,
            "builds of {c}: {keys:#?}"
        );
        for p in ["adder", "shouter"] {
            assert_eq!(
                keys.iter()
                    .filter(|k| k.starts_with(&format!("test/{p}/")) && k.contains(c.as_str()))
                    .filter(|k| !k.contains("/again/") && !k.contains("/baseline/"))
                    .count(),
                1,
                "{p} runs at {c}: {keys:#?}"
            );
            for kind in ["again", "baseline"] {
                let reruns: Vec<_> = keys
                    .iter()
                    .filter(|k| k.starts_with(&format!("test/{p}/")) && k.contains(c.as_str()))
                    .filter(|k| k.contains(&format!("/{kind}/")))
                    .collect();
                let mut unique = reruns.clone();
                unique.sort();
                unique.dedup();
                assert_eq!(
                    unique.len(),
                    reruns.len(),
                    "{kind} re-runs twice: {keys:#?}"
                );
            }
        }
    }
    // One transition per finished test job: none lost, none twice.
    for p in ["adder", "shouter"] {
        let t = transitions(&hub, p);
        let mut jobs: Vec<u64> = t.iter().map(|t| u(t, "job_id")).collect();
        jobs.sort();
        jobs.dedup();
        assert_eq!(jobs.len(), t.len(), "a job classified twice: {t:#?}");
        assert_eq!(t.len(), commits.len(), "{p}: {t:#?}");
    }
    let shouter: Vec<String> = transitions(&hub, "shouter")
        .iter()
        .rev()
        .map(|t| kind(t).to_owned())
        .collect();
    assert_eq!(
        shouter,
        [
            STILL_GREEN,
            WENT_RED,
            FIXED,
            WENT_RED,
            FIXED,
            WENT_RED,
            FIXED
        ]
    );
}

// ---------------------------------------------------------------------------
// Mail (a real SMTP server: aiosmtpd)
// ---------------------------------------------------------------------------

use trunkfarm_e2e::smtp::SmtpSink;

/// A raw HTTP POST to the hub's web endpoint; returns (status code, body).
fn http_post(url: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("an http URL");
    let (host, path) = rest.split_once('/').unwrap();
    let mut stream = std::net::TcpStream::connect(host).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let body = "List-Unsubscribe=One-Click";
    write!(
        stream,
        "POST /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, response)
}

#[test]
fn went_red_and_fixed_are_mailed_once_per_subscriber_in_one_thread() {
    let sink = SmtpSink::start();
    let repos = Repos::new();
    let c1 = repos.head("rt");
    let (hub, _agents) = farm(&repos, &smtp_toml(&sink), 2);
    // A second subscriber at run time; a bad address is refused.
    hub.cli_ok(&[
        "subscribe",
        "--project",
        "shouter",
        "--email",
        "second@example.org",
    ]);
    let bad = hub.cli(&[
        "subscribe",
        "--project",
        "shouter",
        "--email",
        "not-an-address",
    ]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("is not an email address"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    let bad = hub.cli(&["subscribe", "--project", "nope", "--email", "a@example.org"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no project named \"nope\""));
    wait_run(&hub, "shouter", &c1, "green");

    let c2 = repos.break_upper("Eve Breaker <eve@example.org>");
    wait_run(&hub, "shouter", &c2, "red");
    let mails = sink.wait_for_messages(2, STEP);
    let mut to: Vec<String> = mails.iter().flat_map(|m| m.to()).collect();
    to.sort();
    assert_eq!(to, ["second@example.org", "shouter-dev@example.org"]);
    for m in &mails {
        assert_eq!(
            m.subject(),
            format!(
                "[trunkfarm] shouter went red on linux-x86_64 with rt main {}",
                &c2[..10]
            )
        );
        assert!(
            m.text
                .contains("rt: speed up upper (Eve Breaker <eve@example.org>)"),
            "{}",
            m.text
        );
        assert!(m.text.contains("shouter.test_upper"), "{}", m.text);
        assert!(m.text.contains("did not change"), "{}", m.text);
        assert!(m.html.as_deref().unwrap_or("").contains("speed up upper"));
        assert!(
            m.header("List-Unsubscribe")
                .is_some_and(|h| h.contains("/unsubscribe?token="))
        );
        assert!(m.header("Message-ID").is_some());
    }

    let c3 = repos.commit(
        "rt",
        "rt.sh",
        RUNTIME,
        "rt: fix upper",
        "Fay Fixer <fay@example.org>",
    );
    wait_run(&hub, "shouter", &c3, "green");
    let mails = sink.wait_for_messages(4, STEP);
    for fixed in &mails[2..] {
        assert_eq!(
            fixed.subject(),
            format!(
                "[trunkfarm] shouter fixed on linux-x86_64 with rt main {}",
                &c3[..10]
            )
        );
        let red = mails[..2].iter().find(|m| m.to() == fixed.to()).unwrap();
        assert_eq!(
            fixed.header("In-Reply-To"),
            red.header("Message-ID"),
            "fixed answers went red in one thread"
        );
    }
    // Nothing more: adder never changed, still-green and still-red are not mailed.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(sink.messages().len(), 4, "{:#?}", sink.messages());
    let outbox = hub.cli_json(&["mail", "list", "--json"]);
    assert!(
        outbox["mails"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["state"] == "sent"),
        "{outbox:#}"
    );

    // The one-click unsubscribe link works once; a forged one is refused.
    let link = mails[0]
        .header("List-Unsubscribe")
        .unwrap()
        .trim_matches(|c| c == '<' || c == '>')
        .to_string();
    let (code, body) = http_post(&link);
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("will no longer receive mail about shouter"),
        "{body}"
    );
    let subs = hub.cli_json(&["subscriptions", "--json"]);
    let left: Vec<&str> = subs
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["email"].as_str().unwrap())
        .collect();
    assert_eq!(left.len(), 1, "{subs:#}");
    assert!(!mails[0].to().iter().any(|t| left.contains(&t.as_str())));
    let forged = format!("{}x", &link[..link.len() - 3]);
    let (code, body) = http_post(&forged);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("invalid"), "{body}");
}

#[test]
fn a_mail_queued_while_smtp_is_down_survives_a_hub_kill_and_arrives_once() {
    let mut sink = SmtpSink::start();
    let repos = Repos::new();
    let c1 = repos.head("rt");
    let (mut hub, _agents) = farm(&repos, &smtp_toml(&sink), 1);
    wait_run(&hub, "shouter", &c1, "green");
    sink.stop();
    let c2 = repos.break_upper("Eve <eve@example.org>");
    wait_run(&hub, "shouter", &c2, "red");
    // The mail is queued and its delivery failed at least once.
    let failed = wait_for(STEP, "a failed delivery attempt", || {
        let outbox = hub.cli_json(&["mail", "list", "--json"]);
        let m = outbox["mails"].as_array()?.first()?.clone();
        (m["attempts"].as_u64().unwrap_or(0) >= 1).then_some(m)
    });
    assert_eq!(failed["state"], "pending", "still pending: {failed:#}");
    assert!(!s(&failed, "last_error").is_empty(), "{failed:#}");
    let text = hub.cli_ok(&["mail", "list"]);
    assert!(text.contains("last error"), "{text}");
    hub.kill9();
    hub.restart();
    sink.restart();
    let mails = sink.wait_for_messages(1, STEP);
    assert_eq!(mails[0].to(), ["shouter-dev@example.org"]);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        sink.messages().len(),
        1,
        "exactly once: {:#?}",
        sink.messages()
    );
}

#[test]
fn mail_test_reports_the_servers_answer_and_failures() {
    let mut sink = SmtpSink::start();
    let repos = Repos::new();
    let hub = Hub::start_with(&format!("{}{}", repos.config(""), smtp_toml(&sink)), &[]);
    let out = hub.cli_ok(&["mail", "test", "--to", "ops@example.org"]);
    assert!(out.starts_with("250"), "{out}");
    let mails = sink.wait_for_messages(1, Duration::from_secs(30));
    assert_eq!(mails[0].subject(), "[trunkfarm] test mail");
    // It says whose [smtp] that was: the running hub's.
    let again = hub.cli(&["mail", "test", "--to", "ops@example.org"]);
    let said = String::from_utf8_lossy(&again.stderr);
    assert!(
        said.contains("sent by the running hub with its own [smtp]: smtp 127.0.0.1:"),
        "{said}"
    );
    let bad = hub.cli(&["mail", "test", "--to", "nobody"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("is not an email address"));
    sink.stop();
    let down = hub.cli(&["mail", "test", "--to", "ops@example.org"]);
    assert!(!down.status.success());
    let err = String::from_utf8_lossy(&down.stderr);
    assert!(
        err.contains(&format!("smtp 127.0.0.1:{}", sink.port())),
        "{err}"
    );
}

#[test]
fn still_red_reminders_and_digests_follow_their_periods() {
    let sink = SmtpSink::start();
    let repos = Repos::new();
    let c1 = repos.head("rt");
    let extra = smtp_toml(&sink).replace(
        "[notify]\n",
        "[notify]\nreminder_after = \"2s\"\nreminder_every = \"1h\"\ndigest_every = \"3s\"\n",
    );
    let (hub, _agents) = farm(&repos, &extra, 1);
    hub.cli_ok(&[
        "subscribe",
        "--digest",
        "--upstream",
        "rt",
        "--email",
        "core@example.org",
    ]);
    wait_run(&hub, "shouter", &c1, "green");
    let c2 = repos.break_upper("Eve <eve@example.org>");
    wait_run(&hub, "shouter", &c2, "red");
    // went red (maintainer), a reminder 2 s later (same thread), one digest.
    let mails = sink.wait_for_messages(3, STEP);
    let subject = |m: &trunkfarm_e2e::smtp::Mail| m.subject();
    let red = mails
        .iter()
        .find(|m| subject(m).contains("went red"))
        .unwrap();
    let reminder = mails
        .iter()
        .find(|m| subject(m).contains("still red"))
        .unwrap_or_else(|| panic!("no reminder: {mails:#?}"));
    assert_eq!(reminder.to(), ["shouter-dev@example.org"]);
    assert_eq!(reminder.header("In-Reply-To"), red.header("Message-ID"));
    let digest = mails
        .iter()
        .find(|m| m.to() == ["core@example.org"])
        .unwrap_or_else(|| panic!("no digest: {mails:#?}"));
    assert_eq!(
        digest.subject(),
        "[trunkfarm] rt digest: 1 project(s) went red"
    );
    assert!(
        digest.text.contains("shouter on linux-x86_64"),
        "{}",
        digest.text
    );
    // Not repeated: the next reminder is an hour away, the next digest has nothing.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(sink.messages().len(), 3, "{:#?}", sink.messages());
}

#[test]
fn mail_over_starttls_trusts_the_configured_ca() {
    let sink = SmtpSink::start_starttls();
    let ca = sink.cert_pem_path().unwrap().display().to_string();
    let repos = Repos::new();
    let toml = smtp_toml(&sink).replace(
        "security = \"plain\"",
        &format!("security = \"starttls\"\nca_file = \"{ca}\""),
    );
    let hub = Hub::start_with(&format!("{}{toml}", repos.config("")), &[]);
    let out = hub.cli_ok(&["mail", "test", "--to", "ops@example.org"]);
    assert!(out.starts_with("250"), "{out}");
    assert_eq!(sink.wait_for_messages(1, Duration::from_secs(30)).len(), 1);
    // Without the CA the server's certificate is not trusted: refused, said why.
    let untrusting = Hub::start_with(
        &format!(
            "{}{}",
            repos.config(""),
            smtp_toml(&sink).replace("security = \"plain\"", "security = \"starttls\"")
        ),
        &[],
    );
    let refused = untrusting.cli(&["mail", "test", "--to", "ops@example.org"]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("starttls"), "{err}");
}

#[test]
fn a_recipient_refused_for_good_is_recorded_not_retried() {
    let sink = SmtpSink::start();
    let repos = Repos::new();
    let c1 = repos.head("rt");
    let (hub, _agents) = farm(&repos, &smtp_toml(&sink), 1);
    hub.cli_ok(&[
        "subscribe",
        "--project",
        "shouter",
        "--email",
        "bounce@example.org",
    ]);
    wait_run(&hub, "shouter", &c1, "green");
    let c2 = repos.break_upper("Eve <eve@example.org>");
    wait_run(&hub, "shouter", &c2, "red");
    // The other subscriber still gets theirs.
    let mails = sink.wait_for_messages(1, STEP);
    assert_eq!(mails[0].to(), ["shouter-dev@example.org"]);
    let failed = wait_for(STEP, "the bounced mail to be marked failed", || {
        let outbox = hub.cli_json(&["mail", "list", "--json", "--state", "failed"]);
        outbox["mails"].as_array()?.first().cloned()
    });
    assert_eq!(s(&failed, "to"), "bounce@example.org");
    assert!(s(&failed, "last_error").contains("550"), "{failed:#}");
    std::thread::sleep(Duration::from_secs(2));
    let outbox = hub.cli_json(&["mail", "list", "--json", "--state", "failed"]);
    assert_eq!(outbox["mails"][0]["attempts"], 1, "not retried: {outbox:#}");
    let text = hub.cli_ok(&["mail", "list"]);
    assert!(text.contains("failed") && text.contains("550"), "{text}");
}

#[test]
fn a_failed_runtime_build_is_mailed_to_the_upstreams_contacts() {
    let sink = SmtpSink::start();
    let repos = Repos::new();
    let c1 = repos.head("rt");
    let config = repos.config(&smtp_toml(&sink)).replace(
        "build_timeout = \"1m\"",
        "build_timeout = \"1m\"\ncontacts = [\"rt-core@example.org\"]",
    );
    let hub = Hub::start_with(&config, &[]);
    let mut a = Agent::enroll(&hub, "c", &["--trusted"]);
    a.start(&[]);
    hub.wait_agents_connected(1);
    wait_run(&hub, "adder", &c1, "green");
    git(&repos.path("rt"), &["mv", "rt.sh", "rt2.sh"]);
    git(
        &repos.path("rt"),
        &[
            "commit",
            "--quiet",
            "--author",
            "Eve <eve@example.org>",
            "-m",
            "rt: rename the script",
        ],
    );
    let c2 = repos.head("rt");
    let mails = sink.wait_for_messages(1, STEP);
    assert_eq!(mails[0].to(), ["rt-core@example.org"]);
    assert_eq!(
        mails[0].subject(),
        format!(
            "[trunkfarm] rt main build failed on linux-x86_64 at {}",
            &c2[..10]
        )
    );
    assert!(
        mails[0]
            .text
            .contains("rt: rename the script (Eve <eve@example.org>)"),
        "{}",
        mails[0].text
    );
    // The projects' maintainers hear nothing: nothing was tested.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(sink.messages().len(), 1, "{:#?}", sink.messages());
}

#[test]
fn smtp_login_works_and_a_rejected_login_keeps_the_mail_with_the_reason() {
    let sink = SmtpSink::start_with_auth("farm", "s3cret-pass");
    let repos = Repos::new();
    let dir = trunkfarm_e2e::temp_dir("trunkfarm-e2e-smtp-pass-");
    let good = dir.path().join("good");
    let bad = dir.path().join("bad");
    std::fs::write(&good, "s3cret-pass\n").unwrap();
    std::fs::write(&bad, "wrong\n").unwrap();
    let with_login = |file: &PathBuf| {
        smtp_toml(&sink).replace(
            "timeout = \"5s\"",
            &format!(
                "timeout = \"1s\"\nusername = \"farm\"\npassword_file = \"{}\"",
                file.display()
            ),
        )
    };
    let hub = Hub::start_with(&format!("{}{}", repos.config(""), with_login(&good)), &[]);

    let out = hub.cli_ok(&["mail", "test", "--to", "ops@example.org"]);
    assert!(out.starts_with("250"), "{out}");
    sink.wait_for_messages(1, Duration::from_secs(30));
    drop(hub);

    // A wrong password: the went-red mail waits in the outbox, saying why.
    let c1 = repos.head("rt");
    let (hub, _agents) = farm(&repos, &with_login(&bad), 1);
    let refused = hub.cli(&["mail", "test", "--to", "ops@example.org"]);
    assert!(!refused.status.success());
    wait_run(&hub, "shouter", &c1, "green");
    let c2 = repos.break_upper("Eve <eve@example.org>");
    wait_run(&hub, "shouter", &c2, "red");
    let pending = wait_for(STEP, "a failed delivery attempt", || {
        let outbox = hub.cli_json(&["mail", "list", "--json", "--state", "pending"]);
        let m = outbox["mails"].as_array()?.first()?.clone();
        (m["attempts"].as_u64().unwrap_or(0) >= 1).then_some(m)
    });
    // aiosmtpd answers a wrong password slowly (it stalls): the exchange is
    // cut off after 3 × smtp.timeout and retried later.
    let why = s(&pending, "last_error");
    assert!(
        why.contains("535")
            || why.to_lowercase().contains("auth")
            || why.contains("did not finish"),
        "{pending:#}"
    );
    assert_eq!(sink.messages().len(), 1, "only the first hub's test mail");
    // The password is in no log.
    assert!(!hub.logs().contains("s3cret-pass") && !hub.logs().contains("wrong\n"));
}
