//! `[storage] backend = "s3"` against a real S3 API (`moto_server`): a hub
//! whose bucket cannot be used refuses to start and says what to fix, and
//! the whole trunk story (green → red → fixed) runs with its artifacts and
//! logs in the bucket.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use trunkfarm_e2e::farm::{RUNTIME, Repos, smtp_toml};
use trunkfarm_e2e::moto::{Moto, without_aws_credentials};
use trunkfarm_e2e::smtp::SmtpSink;
use trunkfarm_e2e::{Agent, Hub, bins, combined, run_with_timeout, temp_dir, u, wait_for};

/// How long the pipeline may take for one step (build + fan-out + tests).
const STEP: Duration = Duration::from_secs(90);

/// A `[storage]` section for `bucket` on `endpoint`.
fn storage_toml(endpoint: &str, bucket: &str) -> String {
    format!(
        "\n[storage]\nbackend = \"s3\"\nbucket = \"{bucket}\"\nprefix = \"hubs/e2e\"\nendpoint = \"{endpoint}\"\n"
    )
}

/// Runs `trunkfarm serve` with `storage`; it must exit (not serve) within
/// the timeout. Its combined output.
fn refused_start(dir: &Path, storage: &str, env: &[(&str, &str)]) -> String {
    let config = dir.join("hub.toml");
    std::fs::write(
        &config,
        format!(
            "[hub]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n\n[web]\nlisten = \"127.0.0.1:0\"\n{storage}",
            dir.join("data").display(),
        ),
    )
    .unwrap();
    let mut cmd = Command::new(&bins().hub);
    cmd.arg("serve").arg("--config").arg(&config);
    without_aws_credentials(&mut cmd, dir);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = run_with_timeout(cmd, Duration::from_secs(60));
    let text = combined(&out);
    assert!(!out.status.success(), "the hub started:\n{text}");
    assert!(
        !dir.join("data").join("hub.json").exists(),
        "the hub wrote hub.json before refusing:\n{text}"
    );
    text
}

const KEYS: [(&str, &str); 2] = [
    ("AWS_ACCESS_KEY_ID", "AKIDE2ESTORAGE"),
    ("AWS_SECRET_ACCESS_KEY", "e2e-storage-secret"),
];

#[test]
fn a_store_that_cannot_be_used_stops_the_start_and_says_what_to_fix() {
    let moto = Moto::start(&[]);
    moto.create_bucket("present");

    // The bucket does not exist.
    let dir = temp_dir("trunkfarm-e2e-storage-nobucket-");
    let text = refused_start(dir.path(), &storage_toml(&moto.endpoint(), "absent"), &KEYS);
    assert!(
        text.contains("[storage]")
            && text.contains("absent")
            && text.contains("the bucket does not exist")
            && text.contains("storage.bucket"),
        "{text}"
    );

    // Nothing listens at the endpoint.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dir = temp_dir("trunkfarm-e2e-storage-unreachable-");
    let text = refused_start(
        dir.path(),
        &storage_toml(&format!("http://127.0.0.1:{closed}"), "present"),
        &KEYS,
    );
    assert!(
        text.contains("cannot be reached") && text.contains("storage.endpoint"),
        "{text}"
    );

    // No credentials at all.
    let dir = temp_dir("trunkfarm-e2e-storage-nocreds-");
    let text = refused_start(dir.path(), &storage_toml(&moto.endpoint(), "present"), &[]);
    assert!(
        text.contains("AWS_ACCESS_KEY_ID") && text.contains("~/.aws/credentials"),
        "{text}"
    );
    assert!(!text.contains("e2e-storage-secret"), "{text}");

    // Keys the store does not know (moto checks signatures once its first
    // unchecked call, the bucket's creation, is spent).
    let strict = Moto::start(&[("INITIAL_NO_AUTH_ACTION_COUNT", "1")]);
    strict.create_bucket("present");
    let dir = temp_dir("trunkfarm-e2e-storage-badkeys-");
    let text = refused_start(
        dir.path(),
        &storage_toml(&strict.endpoint(), "present"),
        &KEYS,
    );
    assert!(
        text.contains("InvalidAccessKeyId") && text.contains("the credentials were refused"),
        "{text}"
    );
    assert!(!text.contains("e2e-storage-secret"), "{text}");

    // A config error is caught before the network: no bucket named.
    let dir = temp_dir("trunkfarm-e2e-storage-nobucketkey-");
    let text = refused_start(dir.path(), "\n[storage]\nbackend = \"s3\"\n", &KEYS);
    assert!(
        text.contains("storage.bucket") && text.contains("is required"),
        "{text}"
    );
}

#[test]
fn the_trunk_story_runs_with_artifacts_and_logs_in_the_bucket() {
    let moto = Moto::start(&[]);
    moto.create_bucket("farm");
    let sink = SmtpSink::start();
    let repos = Repos::new();
    let c1 = repos.head("rt");
    // These runs print a few lines: compact every log, however small.
    let extra = format!(
        "{}{}compact_logs_from = \"0 B\"\n",
        smtp_toml(&sink),
        storage_toml(&moto.endpoint(), "farm")
    );
    let hub = Hub::start_with(&repos.config(&extra), &KEYS);
    let mut agents = Vec::new();
    for i in 0..2 {
        let mut a = Agent::enroll(&hub, &format!("s3-{i}"), &["--trusted"]);
        a.start(&["--max-parallel-jobs", "2"]);
        agents.push(a);
    }
    hub.wait_agents_connected(2);

    trunkfarm_e2e::farm::wait_run(&hub, "shouter", &c1, "green", STEP);
    let c2 = repos.break_upper("Eve Breaker <eve@example.org>");
    let red = trunkfarm_e2e::farm::wait_run(&hub, "shouter", &c2, "red", STEP);
    let c3 = repos.commit(
        "rt",
        "rt.sh",
        RUNTIME,
        "rt: fix upper",
        "Fay Fixer <fay@example.org>",
    );
    trunkfarm_e2e::farm::wait_run(&hub, "shouter", &c3, "green", STEP);

    // The maintainer heard of both, once each.
    let mails = sink.wait_for_messages(2, STEP);
    let subjects: Vec<String> = mails.iter().map(|m| m.subject()).collect();
    assert!(subjects[0].contains("shouter went red"), "{subjects:?}");
    assert!(subjects[1].contains("shouter fixed"), "{subjects:?}");

    // Every stored artifact is an object in the bucket under the hub's
    // prefix, and nothing of the hub's is outside it.
    let listed = hub.cli_json(&["artifact", "list", "--json"]);
    let shas: Vec<String> = listed
        .as_array()
        .or_else(|| listed["artifacts"].as_array())
        .unwrap()
        .iter()
        .map(|a| a["sha256"].as_str().unwrap().to_string())
        .collect();
    assert!(shas.len() >= 3, "three runtimes built: {listed:#}");
    let keys = moto.s3_keys("farm", "");
    for sha in &shas {
        assert!(
            keys.contains(&format!("hubs/e2e/artifacts/{sha}.tar.zst")),
            "{sha} not in the bucket: {keys:#?}"
        );
    }
    assert!(keys.iter().all(|k| k.starts_with("hubs/e2e/")), "{keys:#?}");
    // The agents fetched them from the store, not through the hub.
    assert!(hub.metric("trunkfarm_artifact_downloads_total") >= 2.0);
    let sent = hub.metric("trunkfarm_artifact_sent_bytes_total");
    assert!(
        sent < 1024.0,
        "the hub streamed {sent} artifact bytes itself"
    );

    // Finished logs are compacted into the bucket, and still read whole.
    let red_job = u(&red["run"], "job_id");
    wait_for(STEP, "the red run's log compacted into the bucket", || {
        moto.s3_keys("farm", &format!("hubs/e2e/logs/{red_job}/"))
            .first()
            .cloned()
    });
    let log = hub.job_log(red_job);
    assert!(log.contains("sh test.sh"), "{log}");
    assert!(log.contains("exited with status 1"), "{log}");
}
