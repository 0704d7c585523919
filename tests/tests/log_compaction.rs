//! Logs in the object store, over a real hub and agent: a job's 30 MB log
//! is compacted into one object once its result is recorded; a hub killed
//! with `kill -9` in the middle of that compaction loses nothing and stores
//! nothing twice: after the restart `trunkfarm job log` gives the log byte
//! for byte, from one object, with no chunk left in the database. The same
//! log in an S3 bucket (`moto_server`) goes up as a multipart upload and
//! reads back the same; a hub switched from the local store to a bucket
//! moves its compacted logs there.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use trunkfarm_e2e::moto::Moto;
use trunkfarm_e2e::*;

/// About 30 MB of hex lines, the same on every run (a fixed seed), that
/// compress to about half: the compacted object is a multipart upload.
fn script() -> String {
    "awk 'BEGIN { srand(7); for (i = 0; i < 1800000; i++) printf \"%08x%08x\\n\", rand() * 4294967296, rand() * 4294967296 }'".into()
}

/// `GET path` on the hub's web endpoint, as JSON.
fn get_json(hub: &Hub, path: &str) -> Value {
    let (status, body) = browser::http_get(&format!("{}{path}", browser::web_url(hub)));
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

/// The files in `dir` (none if it does not exist).
fn files(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// `job log`'s bytes are the job's output, with the agent's own lines
/// around it (`$ command`, `[trunkfarm: …]`): every line once, in order.
fn assert_is_output(log: &[u8], expected: &[u8]) {
    let output: Vec<u8> = log
        .split_inclusive(|&b| b == b'\n')
        .filter(|line| !line.starts_with(b"[trunkfarm") && !line.starts_with(b"$ "))
        .flatten()
        .copied()
        .collect();
    assert_eq!(output.len(), expected.len(), "the whole output");
    if let Some(at) = output.iter().zip(expected).position(|(a, b)| a != b) {
        panic!("`job log` differs from the job's output at byte {at}");
    }
}

/// The job's output, run here.
fn expected_output() -> Vec<u8> {
    let expected = Command::new("sh")
        .args(["-c", &script()])
        .output()
        .unwrap()
        .stdout;
    assert!(expected.len() > 30_000_000, "{}", expected.len());
    expected
}

#[test]
fn a_hub_killed_while_compacting_a_30_mb_log_loses_nothing_and_stores_it_once() {
    init();
    let mut hub = Hub::start_with("\n[limits]\nmax_log_size = \"64 MiB\"\n", &[]);
    let mut agent = Agent::enroll(&hub, "chatty", &[]);
    agent.start(&["--output-cap", "64 MiB"]);
    hub.wait_agents_connected(1);
    let expected = expected_output();

    let id = hub.submit(&["--timeout", "5m", "--", &script()]);
    // The compaction starts once the result is recorded; it is killed as
    // soon as it has written anything of the object (the local backend
    // stages a multipart upload as `1.log.zst#N`).
    let dir = hub.data_dir.join("objects/logs").join(id.to_string());
    let deadline = Instant::now() + Duration::from_secs(300);
    while files(&dir).is_empty() {
        assert!(
            Instant::now() < deadline,
            "job {id}'s log was never compacted"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    hub.kill9();
    let at_kill = files(&dir);
    eprintln!("killed the hub with {at_kill:?} in {}", dir.display());
    assert!(
        at_kill.iter().any(|f| f.contains('#')),
        "killed during the upload: {at_kill:?}"
    );

    hub.restart();
    let job = hub.wait_job_finished(id, Duration::from_secs(60));
    assert_eq!(job["outcome"], "passed", "{job:#}");
    wait_until(Duration::from_secs(120), "the log compacted again", || {
        get_json(&hub, &format!("/api/v1/runs/{id}"))["log"]["compacted"] == true
    });
    let out = hub.cli(&["job", "log", &id.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = out.stdout;
    let run = get_json(&hub, &format!("/api/v1/runs/{id}"));
    assert_eq!(
        run["log"]["size"].as_u64(),
        Some(log.len() as u64),
        "{run:#}"
    );
    assert_is_output(&log, &expected);

    // One object; what the killed upload had staged is not an object (the
    // local backend never lists it; S3 never shows an unfinished upload).
    let objects: Vec<String> = files(&dir)
        .into_iter()
        .filter(|f| !f.contains('#'))
        .collect();
    assert_eq!(objects, ["1.log.zst"]);

    // A page of it, from the object.
    let mid = log.len() as u64 / 2;
    let page = get_json(
        &hub,
        &format!("/api/v1/runs/{id}/log?offset={mid}&limit=1000"),
    );
    assert_eq!(
        page["text"].as_str().unwrap().as_bytes(),
        &log[mid as usize..mid as usize + 1000]
    );
}

#[test]
fn a_log_compacted_into_an_s3_bucket_reads_back_the_same() {
    init();
    let moto = Moto::start(&[]);
    moto.create_bucket("logs");
    let storage = format!(
        "\n[storage]\nbackend = \"s3\"\nbucket = \"logs\"\nprefix = \"hub-l\"\nendpoint = \"{}\"\n",
        moto.endpoint()
    );
    let hub = Hub::start_with(
        &format!("\n[limits]\nmax_log_size = \"64 MiB\"\n{storage}"),
        &[
            ("AWS_ACCESS_KEY_ID", "AKIDE2ELOGS"),
            ("AWS_SECRET_ACCESS_KEY", "e2e-logs-secret"),
        ],
    );
    let mut agent = Agent::enroll(&hub, "chatty", &[]);
    agent.start(&["--output-cap", "64 MiB"]);
    hub.wait_agents_connected(1);
    let expected = expected_output();
    let id = hub.submit(&["--timeout", "5m", "--", &script()]);
    hub.wait_job_finished(id, Duration::from_secs(300));
    let key = format!("hub-l/logs/{id}/1.log.zst");
    wait_for(Duration::from_secs(120), "the log in the bucket", || {
        (get_json(&hub, &format!("/api/v1/runs/{id}"))["log"]["compacted"] == true).then_some(())
    });
    assert_eq!(
        moto.s3_keys("logs", "hub-l/logs/"),
        std::slice::from_ref(&key)
    );
    let object = moto.s3_get("logs", &key);
    assert!(
        object.len() > 8 << 20 && object.len() < expected.len() / 2 + (1 << 20),
        "zstd, in parts: {} bytes",
        object.len()
    );
    let out = hub.cli(&["job", "log", &id.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_is_output(&out.stdout, &expected);
    let metrics = hub.metrics();
    assert!(
        metrics.contains("\ntrunkfarm_logs_compacted_total 1\n")
            && metrics.contains("\ntrunkfarm_log_compaction_failures_total 0\n"),
        "{metrics}"
    );
    let tail = get_json(&hub, &format!("/api/v1/runs/{id}/log?limit=100"));
    assert_eq!(
        tail["text"].as_str().unwrap().as_bytes(),
        &out.stdout[out.stdout.len() - 100..]
    );
}

#[test]
fn a_hub_switched_from_local_to_s3_moves_its_compacted_logs_into_the_bucket() {
    init();
    let moto = Moto::start(&[]);
    moto.create_bucket("moved");
    let env = [
        ("AWS_ACCESS_KEY_ID", "AKIDE2EMOVE"),
        ("AWS_SECRET_ACCESS_KEY", "e2e-move-secret"),
    ];
    let mut hub = Hub::start_with("", &env);
    let mut agent = Agent::enroll(&hub, "mover", &[]);
    agent.start(&[]);
    hub.wait_agents_connected(1);
    let id = hub.submit(&["--", "seq 1 20000"]);
    hub.wait_job_finished(id, Duration::from_secs(120));
    wait_for(Duration::from_secs(60), "the log compacted locally", || {
        (get_json(&hub, &format!("/api/v1/runs/{id}"))["log"]["compacted"] == true).then_some(())
    });
    let before = hub.cli_ok(&["job", "log", &id.to_string()]);
    let local = hub.data_dir.join("objects/logs").join(id.to_string());
    assert_eq!(files(&local), ["1.log.zst"]);

    let storage = format!(
        "\n[storage]\nbackend = \"s3\"\nbucket = \"moved\"\nprefix = \"hub-m\"\nendpoint = \"{}\"\n",
        moto.endpoint()
    );
    hub.restart_with(&storage, &env);
    assert_eq!(
        moto.s3_keys("moved", "hub-m/logs/"),
        [format!("hub-m/logs/{id}/1.log.zst")]
    );
    assert!(files(&local).is_empty(), "moved, not copied");
    assert_eq!(hub.cli_ok(&["job", "log", &id.to_string()]), before);
}

#[test]
fn an_object_store_outage_keeps_finished_logs_in_the_database_until_it_is_back() {
    init();
    let mut moto = Moto::start(&[]);
    moto.create_bucket("logs");
    let storage = format!(
        "\n[storage]\nbackend = \"s3\"\nbucket = \"logs\"\nprefix = \"hub-o\"\nendpoint = \"{}\"\n",
        moto.endpoint()
    );
    let hub = Hub::start_with(
        &storage,
        &[
            ("AWS_ACCESS_KEY_ID", "AKIDE2EOUTAGE"),
            ("AWS_SECRET_ACCESS_KEY", "e2e-outage-secret"),
        ],
    );
    let mut agent = Agent::enroll(&hub, "steady", &[]);
    agent.start(&[]);
    hub.wait_agents_connected(1);
    let compacted =
        |id: u64| get_json(&hub, &format!("/api/v1/runs/{id}"))["log"]["compacted"] == true;

    // The store goes away; a job finishes meanwhile.
    moto.stop();
    let id = hub.submit(&["--", "seq 1 3000"]);
    hub.wait_job_finished(id, Duration::from_secs(60));
    let numbers: String = (1..=3000).map(|n| format!("{n}\n")).collect();
    wait_for(Duration::from_secs(60), "a failed compaction", || {
        (hub.metric("trunkfarm_log_compaction_failures_total") >= 1.0).then_some(())
    });
    // Its log is whole, read from the database.
    assert!(!compacted(id));
    let log = hub.job_log(id);
    assert!(log.contains(&numbers), "{log}");

    // The store is back (empty: moto keeps nothing): the retry puts it there.
    moto.restart();
    moto.create_bucket("logs");
    wait_for(
        Duration::from_secs(150),
        "the log compacted after the outage",
        || compacted(id).then_some(()),
    );
    assert_eq!(
        moto.s3_keys("logs", "hub-o/logs/"),
        [format!("hub-o/logs/{id}/1.log.zst")]
    );
    let log = hub.job_log(id);
    assert!(log.contains(&numbers), "{log}");
    assert!(hub.metric("trunkfarm_logs_compacted_total") >= 1.0);
}
