//! Trust: the hub grants and verifies, it does not believe. A hostile agent
//! (a client holding a real credential, speaking the protocol itself)
//! claims a platform label and four billion slots, answers a build with an
//! artifact it never uploaded, and keeps a job past its timeout.

use std::time::Duration;

use sha2::{Digest, Sha256};
use trunkfarm_e2e::farm::Repos;
use trunkfarm_e2e::hostile::HostileAgent;
use trunkfarm_e2e::proto::v1::{Capabilities, JobResult, Outcome, hub_message};
use trunkfarm_e2e::{Agent, Hub, runtime, s, u};

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

fn hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
