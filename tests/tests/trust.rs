//! Trust: the hub grants and verifies, it does not believe. A hostile agent
//! (a client holding a real credential, speaking the protocol itself)
//! claims a platform label and four billion slots, answers a build with an
//! artifact it never uploaded, keeps a job past its timeout, and lies about
//! test results until the confirmation runs have it quarantined.

use std::time::Duration;

use sha2::{Digest, Sha256};
use trunkfarm_e2e::farm::{
    FIXED, RUNTIME, Repos, SHOUTER_MAINTAINER, WENT_RED, broken_runtime, smtp_toml,
};
use trunkfarm_e2e::hostile::{HostileAgent, Served};
use trunkfarm_e2e::proto::v1::{Capabilities, JobRef, JobResult, Outcome, ReportFile, hub_message};
use trunkfarm_e2e::serde_json::Value;
use trunkfarm_e2e::smtp::SmtpSink;
use trunkfarm_e2e::{Agent, Hub, runtime, s, u, wait_for};

/// What a hostile volunteer claims: this machine's platform, a label nobody
/// granted, and slots for every job there is.
fn greedy_caps() -> Capabilities {
    let (os, arch) = (std::env::consts::OS, std::env::consts::ARCH);
    Capabilities {
        name: "hostile".into(),
        labels: vec![format!("{os}-{arch}"), "gpu".into()],
        os: os.into(),
        arch: arch.into(),
        cores: 1,
        max_parallel_jobs: 4_000_000_000,
        ..Default::default()
    }
}

fn platform() -> String {
    format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH)
}

/// A volunteer gets its token's labels and its platform's, never a
/// trusted-only (build) job, and at most its cap of jobs at once while an
/// honest agent takes the rest.
#[test]
fn a_hostile_volunteer_gets_what_its_token_grants_not_what_it_claims() {
    let rt = runtime();
    let hub = Hub::start();
    let hostile = rt.block_on(HostileAgent::enroll(&hub, "greedy", &[]));
    let mut session = rt.block_on(hostile.session(greedy_caps()));
    let granted = &session.welcome.labels;
    assert!(granted.contains(&platform()), "{granted:?}");
    assert!(
        !granted.contains(&"gpu".to_string()),
        "a label no token granted: {granted:?}"
    );

    let build = hub.submit(&["--trusted-only", "--labels", &platform(), "--", "true"]);
    let tests: Vec<u64> = (0..8)
        .map(|i| hub.submit(&["--labels", &platform(), "--", &format!("echo {i}")]))
        .collect();
    let got = rt.block_on(session.assignments(Duration::from_secs(3)));
    let ids: Vec<u64> = got
        .iter()
        .map(|a| a.job.expect("a job ref").job_id)
        .collect();
    assert!(
        !ids.contains(&build),
        "a volunteer was given the build: {ids:?}"
    );
    assert_eq!(
        ids.len(),
        4,
        "the default cap (enrollment.default_max_parallel_jobs = 4), not the claim: {ids:?}"
    );

    let agents = hub.agents();
    let me = agents
        .iter()
        .find(|a| s(a, "agent_id") == hostile.id)
        .expect("the hostile agent is listed");
    assert_eq!(s(me, "trust"), "volunteer", "{me:#}");
    assert_eq!(u(me, "max_parallel_jobs"), 4, "{me:#}");
    assert_eq!(u(me, "claimed_parallel_jobs"), 4_000_000_000, "{me:#}");

    // An honest trusted agent runs the build and the jobs the greedy one
    // could not take.
    let mut honest = Agent::enroll(&hub, "honest", &["--trusted"]);
    honest.start(&["--max-parallel-jobs", "2"]);
    for id in tests
        .iter()
        .copied()
        .filter(|id| !ids.contains(id))
        .chain([build])
    {
        let j = hub.wait_job_finished(id, Duration::from_secs(30));
        assert_eq!(s(&j, "outcome"), "passed", "{j:#}");
        assert_eq!(s(&j, "agent_id"), honest.id(&hub), "{j:#}");
    }
    drop(session);
}

/// A build result counts only with the artifact its own attempt uploaded:
/// naming a stored or made-up hash, or uploading other bytes under it, is
/// not a passed build.
#[test]
fn a_build_counts_only_with_the_artifact_its_attempt_uploaded() {
    let rt = runtime();
    let repos = Repos::with(&[]);
    let hub = Hub::start_with(&repos.config(""), &[]);
    // A trusted machine turned hostile: the only one that may build.
    let hostile = rt.block_on(HostileAgent::enroll(&hub, "turned", &["--trusted"]));
    let mut session = rt.block_on(hostile.session(Capabilities {
        max_parallel_jobs: 1,
        ..greedy_caps()
    }));
    let runtime_bytes = b"the runtime this attempt built".to_vec();
    let sha = hex(&runtime_bytes);
    let passed = |job, artifact: &str| JobResult {
        job: Some(job),
        outcome: Outcome::Passed.into(),
        exit_code: Some(0),
        artifact_sha256: artifact.into(),
        ..Default::default()
    };

    // 1: "passed", naming an artifact it never uploaded.
    let first = rt
        .block_on(session.next_assignment(Duration::from_secs(30)))
        .expect("the build of the upstream's head");
    let job = first.job.expect("a job ref");
    assert!(!first.spec.expect("a spec").upload_prefix.is_empty());
    rt.block_on(session.report(passed(job, &sha)));

    // 2: other bytes announced under the hash are refused at the upload.
    let second = rt
        .block_on(session.next_assignment(Duration::from_secs(30)))
        .expect("the build again: the unproven result was not counted");
    let job2 = second.job.expect("a job ref");
    assert_eq!((job2.job_id, job2.attempt), (job.job_id, 2));
    let forged = rt.block_on(hostile.upload(job2, &sha, b"a trojan".to_vec()));
    assert!(
        forged.is_err(),
        "bytes that do not hash to the name: {forged:?}"
    );
    rt.block_on(session.report(passed(job2, &sha)));

    // 3: it uploads the bytes and names them: that counts.
    let third = rt
        .block_on(session.next_assignment(Duration::from_secs(30)))
        .expect("a third attempt");
    let job3 = third.job.expect("a job ref");
    rt.block_on(hostile.upload(job3, &sha, runtime_bytes))
        .expect("the real upload");
    rt.block_on(session.report(passed(job3, &sha)));

    let j = hub.wait_job_finished(job.job_id, Duration::from_secs(30));
    assert_eq!(s(&j, "outcome"), "passed", "{j:#}");
    let shown = hub.cli_ok(&["job", "show", &job.job_id.to_string()]);
    assert!(
        shown.contains("uploaded none in this attempt"),
        "attempt 1's reason is shown:\n{shown}"
    );
    drop(session);
}

/// The hub ends a job at its timeout plus `dispatch.timeout_grace`, however
/// diligently its agent heartbeats, and tells the agent to stop.
#[test]
fn a_hostile_agent_cannot_outlive_a_job_timeout() {
    let rt = runtime();
    // Appended to the harness's [dispatch] table.
    let hub = Hub::start_with("timeout_grace = \"1s\"\n", &[]);
    let hostile = rt.block_on(HostileAgent::enroll(&hub, "sticky", &[]));
    let mut session = rt.block_on(hostile.session(greedy_caps()));
    let id = hub.submit(&["--timeout", "2s", "--max-attempts", "1", "--", "sleep 600"]);
    let job = rt
        .block_on(session.next_assignment(Duration::from_secs(10)))
        .and_then(|a| a.job)
        .expect("the job");
    assert_eq!(job.job_id, id);
    // Heartbeat for it, well past 2 s + 1 s, until the hub says stop.
    let cancel = rt.block_on(async {
        for _ in 0..40 {
            session.heartbeat(&[job]).await;
            for m in session.messages(Duration::from_millis(250)).await {
                if let hub_message::Msg::Cancel(c) = m {
                    return Some(c);
                }
            }
        }
        None
    });
    let cancel = cancel.expect("the hub tells the agent to stop within 10 s");
    assert_eq!(cancel.job, Some(job));
    let j = hub.wait_job_finished(id, Duration::from_secs(10));
    assert_eq!(s(&j, "outcome"), "error", "{j:#}");
    let shown = hub.cli_ok(&["job", "show", &id.to_string()]);
    assert!(shown.contains("ran past its timeout (2s)"), "{shown}");
    drop(session);
}

/// How long one pipeline step may take (build, fan-out, test, re-run).
const STEP: Duration = Duration::from_secs(90);

/// What shouter's suite says: exit status and a JUnit report.
fn shouter_says(job: JobRef, passed: bool) -> JobResult {
    let upper = if passed {
        r#"<testcase classname="shouter" name="test_upper"/>"#
    } else {
        r#"<testcase classname="shouter" name="test_upper"><failure message="expected ABC, got abc"/></testcase>"#
    };
    let xml = format!(r#"<testsuites><testsuite name="shouter">{upper}</testsuite></testsuites>"#);
    JobResult {
        job: Some(job),
        outcome: if passed {
            Outcome::Passed
        } else {
            Outcome::Failed
        }
        .into(),
        exit_code: Some(if passed { 0 } else { 1 }),
        reports: vec![ReportFile {
            path: "junit.xml".into(),
            data: xml.into_bytes(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The liar's next job: shouter's test of upstream `commit`.
fn test_of(liar: &Served, commit: &str) -> JobRef {
    let a = liar
        .next(STEP)
        .unwrap_or_else(|| panic!("the liar gets shouter's test of {commit}"));
    let spec = a.spec.expect("a spec");
    assert_eq!(spec.project, "shouter");
    assert_eq!(spec.env["TRUNKFARM_UPSTREAM_COMMIT"], commit);
    a.job.expect("a job ref")
}

/// Waits until shouter's newest run tested `commit` and `ok` says so.
fn wait_shouter(hub: &Hub, commit: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    wait_for(STEP, &format!("shouter {what} at {commit}"), || {
        let status = hub.cli_json(&["status", "--json"]);
        let cell = status["cells"]
            .as_array()?
            .iter()
            .find(|c| s(c, "project") == "shouter")?
            .clone();
        (s(&cell["run"], "upstream_commit") == commit && ok(&cell)).then_some(cell)
    })
}

/// shouter's transitions' kinds, oldest first.
fn kinds(hub: &Hub) -> Vec<String> {
    let all = hub.cli_json(&["transitions", "--all", "--json", "--project", "shouter"]);
    let mut kinds: Vec<String> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|t| s(t, "kind").to_owned())
        .collect();
    kinds.reverse();
    kinds
}

fn agent(hub: &Hub, id: &str) -> Value {
    let agents = hub.agents();
    agents
        .into_iter()
        .find(|a| s(a, "agent_id") == id)
        .expect("the agent is listed")
}

/// A volunteer's verdict is never taken alone: the hostile volunteer's
/// false red and false green are re-run on the honest trusted agent and
/// overruled (no transition, no mail), its true red counts once confirmed,
/// and after two disagreements (`trust.quarantine_after = 2`) it is
/// quarantined: listed so, and given no more jobs.
#[test]
fn a_hostile_volunteers_false_red_and_false_green_are_overruled_and_it_is_quarantined() {
    let rt = runtime();
    let repos = Repos::with(&["shouter"]);
    let sink = SmtpSink::start();
    let extra = format!("{}\n[trust]\nquarantine_after = 2\n", smtp_toml(&sink));
    let hub = Hub::start_with(&repos.config(&extra), &[]);
    let hostile = rt.block_on(HostileAgent::enroll(&hub, "liar", &[]));
    let session = rt.block_on(hostile.session(Capabilities {
        max_parallel_jobs: 1,
        ..greedy_caps()
    }));
    let liar = {
        let _in = rt.enter();
        session.serve()
    };
    // The honest agent builds (only it may) and re-runs; the liar, given a
    // job least recently, gets every first run of shouter's tests.
    let mut honest = Agent::enroll(&hub, "honest", &["--trusted"]);
    honest.start(&["--max-parallel-jobs", "1"]);
    let honest_id = honest.id(&hub);

    // c1: the liar tells the truth; a green that changes nothing counts alone.
    let c1 = repos.head("rt");
    liar.answer(shouter_says(test_of(&liar, &c1), true));
    wait_shouter(&hub, &c1, "green", |c| s(c, "status") == "green");

    // c2 changes nothing shouter uses: the liar says red.
    let c2 = repos.commit(
        "rt",
        "rt.sh",
        &format!("{RUNTIME}# faster\n"),
        "rt: faster",
        "Ann Author <ann@example.org>",
    );
    liar.answer(shouter_says(test_of(&liar, &c2), false));
    let cell = wait_shouter(&hub, &c2, "overruled", |c| {
        s(&c["run"], "confirmation") == "overruled"
    });
    let detail = s(&cell["run"], "confirmation_detail");
    assert!(
        detail.contains(&format!("red on {}", hostile.id))
            && detail.contains(&format!("green on {honest_id} (trusted")),
        "both verdicts: {cell:#}"
    );
    assert_eq!(
        s(&cell, "status"),
        "red",
        "the liar's own word, shown as overruled"
    );
    assert!(cell["red_since"].is_null(), "not red: {cell:#}");
    assert!(!kinds(&hub).contains(&WENT_RED.to_string()));
    let me = agent(&hub, &hostile.id);
    assert_eq!(u(&me, "confirmations_disagreed"), 1, "{me:#}");
    assert_eq!(me["quarantined"], Value::Bool(false), "{me:#}");

    // c3 breaks upper and the liar says so: confirmed, red once, mailed once.
    let c3 = repos.break_upper("Eve Breaker <eve@example.org>");
    liar.answer(shouter_says(test_of(&liar, &c3), false));
    let cell = wait_shouter(&hub, &c3, "red, confirmed", |c| {
        s(&c["run"], "confirmation") == "confirmed"
    });
    assert_eq!(s(&cell["red_since"], "upstream_commit"), c3, "{cell:#}");
    assert!(u(&cell["red_since"], "confirmed_by_job") > 0, "{cell:#}");
    let mails = sink.wait_for_messages(1, STEP);
    assert_eq!(mails[0].to(), [SHOUTER_MAINTAINER.to_string()]);
    // No mail before it: the false red was never mailed.
    assert!(mails[0].subject().contains("red"), "{}", mails[0].subject());

    // c4 leaves upper broken; the liar says shouter is fixed.
    let c4 = repos.commit(
        "rt",
        "rt.sh",
        &format!("{}# tidied\n", broken_runtime()),
        "rt: tidy",
        "Ann Author <ann@example.org>",
    );
    liar.answer(shouter_says(test_of(&liar, &c4), true));
    let cell = wait_shouter(&hub, &c4, "overruled", |c| {
        s(&c["run"], "confirmation") == "overruled"
    });
    assert_eq!(
        s(&cell["red_since"], "upstream_commit"),
        c3,
        "still red: {cell:#}"
    );
    assert_eq!(kinds(&hub).iter().filter(|k| *k == FIXED).count(), 0);

    // Two disagreements: quarantined, and listed so.
    let me = wait_for(Duration::from_secs(10), "the liar quarantined", || {
        let me = agent(&hub, &hostile.id);
        (me["quarantined"] == Value::Bool(true)).then_some(me)
    });
    assert_eq!(u(&me, "confirmations_disagreed"), 2, "{me:#}");
    assert_eq!(u(&me, "confirmations_agreed"), 1, "{me:#}");
    assert!(
        s(&me, "quarantine_reason").contains("2 of its last 3"),
        "{me:#}"
    );
    let table = hub.cli_ok(&["agent", "list"]);
    assert!(table.contains("quarantined"), "{table}");

    // c5 fixes upper: the liar gets nothing now; the honest agent's green
    // is re-run (on itself: no other agent takes the job) and, passing
    // again, fixes the series.
    let c5 = repos.commit(
        "rt",
        "rt.sh",
        &format!("{RUNTIME}# upper fixed\n"),
        "rt: fix upper",
        "Fay Fixer <fay@example.org>",
    );
    let cell = wait_shouter(&hub, &c5, "green, confirmed", |c| {
        s(c, "status") == "green" && s(&c["run"], "confirmation") == "confirmed"
    });
    assert!(cell["red_since"].is_null(), "{cell:#}");
    assert!(
        liar.next(Duration::from_secs(1)).is_none(),
        "a quarantined agent gets no job"
    );
    assert_eq!(kinds(&hub).iter().filter(|k| *k == WENT_RED).count(), 1);
    assert_eq!(kinds(&hub).iter().filter(|k| *k == FIXED).count(), 1);
    let mails = sink.wait_for_messages(2, STEP);
    assert_eq!(mails.len(), 2, "went red and fixed, nothing for the lies");

    // The quarantine is the credential's: a new session is quarantined too.
    let mut again = rt.block_on(hostile.session(Capabilities {
        max_parallel_jobs: 1,
        ..greedy_caps()
    }));
    let waiting: Vec<u64> = (0..2)
        .map(|_| hub.submit(&["--labels", &platform(), "--", "sleep 10"]))
        .collect();
    assert!(
        rt.block_on(again.assignments(Duration::from_secs(2)))
            .is_empty(),
        "quarantined across sessions"
    );
    // Released by the operator, it gets work again.
    hub.cli_ok(&["agent", "release", &hostile.id]);
    let given = rt
        .block_on(async {
            again.heartbeat(&[]).await;
            again.next_assignment(Duration::from_secs(10)).await
        })
        .expect("a released agent gets a job");
    assert!(waiting.contains(&given.job.expect("a job ref").job_id));
    let me = agent(&hub, &hostile.id);
    assert_eq!(me["quarantined"], Value::Bool(false), "{me:#}");
    assert_eq!(
        u(&me, "confirmations_disagreed"),
        2,
        "the totals stay: {me:#}"
    );
}

fn hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
