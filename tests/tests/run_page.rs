//! The run page over a real hub and agent: a job no agent can take says why
//! on `job show`, on its run page and in its JSON; a job that printed
//! 100 MB of log is paged, not loaded: its page answers in under a second
//! and the hub's memory does not grow by anything near the log's size while
//! it serves the page and several pages of the log, which by then is
//! compacted into the object store and read from there frame by frame.

use std::time::{Duration, Instant};

use serde_json::Value;
use trunkfarm_e2e::*;

/// Where the hub's web endpoint listens (`hub.json`'s `web`).
fn web_addr(hub: &Hub) -> String {
    let info: Value =
        serde_json::from_str(&std::fs::read_to_string(hub.data_dir.join("hub.json")).unwrap())
            .unwrap();
    info["web"].as_str().unwrap().to_string()
}

/// `GET path` on the web endpoint `addr`: status and body.
fn get(addr: &str, path: &str) -> (u16, String) {
    trunkfarm_e2e::browser::http_get(&format!("http://{addr}{path}"))
}

fn get_json(addr: &str, path: &str) -> Value {
    let (status, body) = get(addr, path);
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

/// The resident memory of process `pid`, KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {status}"))
}

const LOG_BYTES: u64 = 100 * 1024 * 1024;

#[test]
fn a_100_mb_log_is_paged_fast_without_growing_the_hub_and_a_stuck_job_says_why() {
    init();
    let hub = Hub::start_with("\n[limits]\nmax_log_size = \"120 MiB\"\n", &[]);
    let mut agent = Agent::enroll(&hub, "big-box", &[]);
    agent.start(&["--output-cap", "120 MiB"]);
    hub.wait_agents_connected(1);
    let web = web_addr(&hub);

    // A job no agent can take: the reason everywhere it is shown.
    let stuck = hub.submit(&["--labels", "gpu", "--", "true"]);
    let reason = "no connected agent has label `gpu`";
    let shown = hub.cli_ok(&["job", "show", &stuck.to_string()]);
    assert!(shown.contains(reason), "{shown}");
    let run = get_json(&web, &format!("/api/v1/runs/{stuck}"));
    assert_eq!(run["status"], "queued");
    assert_eq!(run["waiting"], reason);
    let (status, page) = get(&web, &format!("/runs/{stuck}"));
    assert_eq!(status, 200);
    assert!(
        page.contains("no connected agent has label `gpu`")
            || page.contains("no connected agent has label &#96;gpu&#96;"),
        "{page}"
    );
    let (status, page) = get(&web, "/runs/987654321");
    assert_eq!(status, 404);
    assert!(page.contains("no job 987654321"), "{page}");

    // 100 MB of log, quickly.
    let started = Instant::now();
    let big = hub.submit(&[
        "--timeout",
        "5m",
        "--",
        &format!("yes 'trunkfarm says hello from a very chatty job' | head -c {LOG_BYTES}; echo; echo the-very-end"),
    ]);
    let job = hub.wait_job_finished(big, Duration::from_secs(300));
    assert_eq!(job["outcome"], "passed", "{job:#}");
    eprintln!(
        "the 100 MB job ran and was stored in {:?}",
        started.elapsed()
    );

    // The finished job's log moves into the object store (the data dir's
    // `objects/` here): the page reads it from there.
    wait_until(Duration::from_secs(120), "the log compacted", || {
        get_json(&web, &format!("/api/v1/runs/{big}"))["log"]["compacted"] == true
    });

    let pid = hub.pid();
    let before = rss_kib(pid);
    let t = Instant::now();
    let (status, page) = get(&web, &format!("/runs/{big}"));
    let page_time = t.elapsed();
    assert_eq!(status, 200);
    assert!(
        page.contains("the-very-end"),
        "the page shows the log's end"
    );
    assert!(
        page.len() < 1024 * 1024,
        "one page, not the log: {} bytes",
        page.len()
    );
    let run = get_json(&web, &format!("/api/v1/runs/{big}"));
    let size = run["log"]["size"].as_u64().unwrap();
    assert!(size > LOG_BYTES, "{run:#}");
    let mut slowest = Duration::ZERO;
    for offset in [0, size / 3, size / 2, size - 10] {
        let t = Instant::now();
        let p = get_json(
            &web,
            &format!("/api/v1/runs/{big}/log?offset={offset}&limit=1048576"),
        );
        slowest = slowest.max(t.elapsed());
        assert_eq!(p["offset"].as_u64().unwrap(), offset);
        assert_eq!(p["total"].as_u64().unwrap(), size);
        assert!(p["text"].as_str().unwrap().len() <= 1024 * 1024);
        let (status, _) = get(&web, &format!("/runs/{big}?offset={offset}"));
        assert_eq!(status, 200);
    }
    let after = rss_kib(pid);
    let grown = after.saturating_sub(before);
    eprintln!(
        "hub RSS {before} KiB before, {after} KiB after (grew {grown} KiB); page in {page_time:?}, slowest 1 MiB log page in {slowest:?}; log {size} bytes"
    );
    assert!(
        page_time < Duration::from_secs(1),
        "the run page took {page_time:?}"
    );
    assert!(
        grown < 30 * 1024,
        "the hub grew by {grown} KiB serving a {size}-byte log"
    );
}
