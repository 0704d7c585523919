//! Artifacts in the object store (`[storage] backend = "s3"`) against a real
//! S3 API (`moto_server`): a real hub and agent build and test, the runtime
//! is an object in the bucket, agents fetch it through presigned URLs (the
//! hub sends no artifact bytes), a tampered object is caught by the agent's
//! hash check and quarantined by the hub, and a hub killed while it uploads
//! an artifact loses nothing and stores nothing twice.

use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest as _, Sha256};
use trunkfarm_e2e::farm::{self, RUNTIME, Repos, cell};
use trunkfarm_e2e::hostile::HostileAgent;
use trunkfarm_e2e::moto::Moto;
use trunkfarm_e2e::{Agent, Hub, s, wait_for};
use trunkfarm_proto::v1::DownloadArtifactRequest;

/// How long the pipeline may take for one step (build + fan-out + tests).
const STEP: Duration = Duration::from_secs(90);

const BUCKET: &str = "farm";

/// The hub's prefix in the bucket.
const PREFIX: &str = "hubs/e2e";

/// moto checks no signature; any key pair does.
const KEYS: [(&str, &str); 2] = [
    ("AWS_ACCESS_KEY_ID", "AKIDE2EARTIFACTS"),
    ("AWS_SECRET_ACCESS_KEY", "e2e-artifacts-secret"),
];

/// A hub whose artifacts are in `moto`'s bucket, with one trusted agent.
fn farm(repos: &Repos, moto: &Moto) -> (Hub, Agent) {
    moto.create_bucket(BUCKET);
    let storage = format!(
        "\n[storage]\nbackend = \"s3\"\nbucket = \"{BUCKET}\"\nprefix = \"{PREFIX}\"\nendpoint = \"{}\"\npresign_ttl = \"5m\"\n",
        moto.endpoint()
    );
    let hub = Hub::start_with(&repos.config(&storage), &KEYS);
    let mut agent = Agent::enroll(&hub, "p0", &["--trusted"]);
    agent.start(&["--max-parallel-jobs", "2"]);
    hub.wait_agents_connected(1);
    (hub, agent)
}

/// The keys under `folder` of the hub's prefix (`artifacts`, `quarantine`),
/// relative to it.
fn keys(moto: &Moto, folder: &str) -> Vec<String> {
    let prefix = format!("{PREFIX}/{folder}/");
    moto.s3_keys(BUCKET, &prefix)
        .into_iter()
        .map(|k| k[prefix.len()..].to_string())
        .collect()
}

fn artifact_shas(hub: &Hub) -> Vec<String> {
    let list = hub.cli_json(&["artifact", "list", "--json"]);
    list.as_array()
        .unwrap()
        .iter()
        .map(|a| s(a, "sha256").to_string())
        .collect()
}

fn status(hub: &Hub) -> Value {
    hub.cli_json(&["status", "--json"])
}

#[test]
fn artifacts_are_objects_fetched_by_presigned_url_and_a_tampered_one_is_quarantined() {
    let moto = Moto::start(&[]);
    let repos = Repos::new();
    let c1 = repos.head("rt");
    let (hub, mut agent) = farm(&repos, &moto);
    farm::wait_run(&hub, "adder", &c1, "green", STEP);
    farm::wait_run(&hub, "shouter", &c1, "green", STEP);

    // The runtime is one object in the bucket, and nothing in the data dir.
    let shas = artifact_shas(&hub);
    assert_eq!(shas.len(), 1, "{shas:?}");
    let sha = shas[0].clone();
    assert_eq!(keys(&moto, "artifacts"), [format!("{sha}.tar.zst")]);
    let files: Vec<_> = std::fs::read_dir(hub.data_dir.join("artifacts"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files, ["tmp"], "no artifact files on the hub's disk");

    // The agent fetched it from the store: the hub counted the download
    // and sent none of its bytes.
    assert!(hub.metric("trunkfarm_artifact_downloads_total") >= 1.0);
    assert_eq!(hub.metric("trunkfarm_artifact_sent_bytes_total"), 0.0);
    let agent_log = agent.logs();
    assert!(
        agent_log.contains(&format!("downloaded artifact {}", &sha[..12])),
        "{agent_log}"
    );
    assert!(
        !agent_log.contains("through the hub instead"),
        "{agent_log}"
    );

    // A volunteer's agent (a real credential) cries wolf: it says the bytes
    // at the URL were corrupt, again and again. Each time it gets the bytes
    // through the hub; the hub reads its copy whole once, finds it sound,
    // and keeps the artifact.
    let rt = trunkfarm_e2e::runtime();
    let wolf = rt.block_on(HostileAgent::enroll(&hub, "wolf", &[]));
    for _ in 0..5 {
        let (meta, bytes) = rt
            .block_on(wolf.download(DownloadArtifactRequest {
                sha256: sha.clone(),
                accepts_url: true,
                url_bytes_corrupt: true,
            }))
            .expect("the artifact, streamed");
        assert!(meta.url.is_empty(), "streamed, not a URL again: {meta:?}");
        assert_eq!(format!("{:x}", Sha256::digest(&bytes)), sha);
    }
    assert_eq!(hub.metric("trunkfarm_artifact_url_reports_total"), 5.0);
    assert_eq!(hub.metric("trunkfarm_artifact_report_checks_total"), 1.0);
    assert_eq!(artifact_shas(&hub), std::slice::from_ref(&sha));
    assert_eq!(keys(&moto, "artifacts"), [format!("{sha}.tar.zst")]);
    assert!(keys(&moto, "quarantine").is_empty());
    let streamed = hub.metric("trunkfarm_artifact_sent_bytes_total");

    // Someone with access to the bucket swaps the object's bytes (same
    // size: only the hash can tell).
    let key = format!("{PREFIX}/artifacts/{sha}.tar.zst");
    let mut bytes = moto.s3_get(BUCKET, &key);
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    moto.s3_put(BUCKET, &key, &bytes);

    // A fresh agent (empty cache) must fetch it for adder's new commit.
    agent.kill9();
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
    assert_eq!(s(&run, "status"), "error", "{run:#}");
    let detail = s(&run["run"], "detail");
    // The first attempt hears "corrupt, quarantined"; retries find none.
    assert!(
        detail.contains("corrupt")
            || detail.contains("quarantined")
            || detail.contains("no artifact"),
        "{detail}"
    );
    let fresh_log = fresh.logs();
    assert!(
        fresh_log.contains("from the hub's object store failed verification"),
        "{fresh_log}"
    );
    // The hub checked its copy itself, took the object out of service and
    // forgot the record.
    let hub_log = hub.logs();
    assert!(
        hub_log.contains("reports that the bytes at the object store URL"),
        "{hub_log}"
    );
    assert!(artifact_shas(&hub).is_empty());
    assert!(keys(&moto, "artifacts").is_empty());
    let quarantined = keys(&moto, "quarantine");
    assert_eq!(quarantined.len(), 1, "{quarantined:?}");
    assert!(quarantined[0].starts_with(&format!("{sha}.")));
    assert_eq!(
        moto.s3_get(BUCKET, &format!("{PREFIX}/quarantine/{}", quarantined[0])),
        bytes
    );
    // Signatures are never logged.
    for log in [hub_log, fresh_log, agent_log] {
        assert!(!log.contains("X-Amz-Signature"), "{log}");
    }

    // A forced rebuild stores the runtime again; adder is green again.
    hub.cli_ok(&["upstream", "build", "rt", "--force"]);
    wait_for(STEP, "adder green again at its new commit", || {
        let c = cell(&status(&hub), "adder");
        (s(&c["run"], "project_commit") == p2 && s(&c, "status") == "green").then_some(())
    });
    assert_eq!(keys(&moto, "artifacts"), [format!("{sha}.tar.zst")]);
    assert_eq!(
        hub.metric("trunkfarm_artifact_sent_bytes_total"),
        streamed,
        "honest agents fetched from the bucket"
    );
}

/// `len` characters that zstd cannot shrink much (a fixed pseudo-random
/// sequence: every build of it packs to the same artifact).
fn noise(len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ALPHABET[(x % 64) as usize] as char
        })
        .collect()
}

#[test]
fn a_hub_killed_while_it_uploads_an_artifact_keeps_one_record_and_one_object() {
    let moto = Moto::start(&[]);
    let repos = Repos::with(&["adder"]);
    let c1 = repos.head("rt");
    let (mut hub, _agent) = farm(&repos, &moto);
    farm::wait_run(&hub, "adder", &c1, "green", STEP);

    // A runtime of ~30 MiB that packs to ~23 MiB: a multipart upload into
    // the bucket (16 MiB parts). The script exits before its long tail.
    let big = format!("{RUNTIME}exit\n# {}\n", noise(30 << 20));
    let c2 = repos.commit(
        "rt",
        "rt.sh",
        &big,
        "rt: vendor a blob",
        "Eve <eve@example.org>",
    );

    // Kill the hub once the upload has reached it whole (its temp file
    // stopped growing): it is then putting the object into the bucket.
    let tmp = hub.data_dir.join("artifacts/tmp");
    let part_size = || -> Option<u64> {
        std::fs::read_dir(&tmp)
            .ok()?
            .filter_map(|e| e.ok()?.metadata().ok())
            .map(|m| m.len())
            .max()
    };
    let deadline = Instant::now() + STEP;
    let mut last = 0u64;
    loop {
        assert!(
            Instant::now() < deadline,
            "the big runtime's upload never reached the hub\n{}",
            hub.logs()
        );
        match part_size() {
            Some(n) if n >= 20 << 20 && n == last => break,
            Some(n) => last = n,
            // Already gone: stored (or refused); kill now all the same.
            None if last >= 20 << 20 => break,
            None => {}
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    hub.kill9();

    // What a crash between putting an object and recording it leaves.
    let orphan = "0123456789abcdef".repeat(4);
    moto.s3_put(
        BUCKET,
        &format!("{PREFIX}/artifacts/{orphan}.tar.zst"),
        b"never recorded",
    );
    hub.restart();
    farm::wait_run(&hub, "adder", &c2, "green", STEP);

    // One record per runtime, each one object; the orphan is gone.
    let mut shas = artifact_shas(&hub);
    shas.sort();
    assert_eq!(shas.len(), 2, "{shas:?}");
    let objects = keys(&moto, "artifacts");
    let expected: Vec<String> = shas.iter().map(|s| format!("{s}.tar.zst")).collect();
    assert_eq!(objects, expected, "{}", hub.logs());
    assert!(keys(&moto, "quarantine").is_empty());
    let logs = hub.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains(&format!("{orphan}.tar.zst")) && l.contains("has no record")),
        "{logs}"
    );
}
