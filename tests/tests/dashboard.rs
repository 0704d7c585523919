//! The dashboard in a real browser (headless chromium, `src/browser.rs`)
//! after a real green → red → fixed story: real git repositories, a real
//! hub and two real agents. The grid's cells carry the right state classes
//! and link to the right runs, the page says what `/api/v1/status` says,
//! the page without JavaScript shows the same as with it, `/events` tells an
//! open page when a result lands, and screenshots of the grid (desktop and
//! phone) are kept under `target/test-artifacts/`.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::Value;
use trunkfarm_e2e::browser::{self, Browser, DESKTOP, GridCell, PHONE};
use trunkfarm_e2e::farm::{self, RUNTIME, Repos, smtp_toml};
use trunkfarm_e2e::smtp::SmtpSink;
use trunkfarm_e2e::{Agent, Hub, HubOptions, s, u};

/// How long the pipeline may take for one step (build, fan-out, tests and
/// their re-runs).
const STEP: Duration = Duration::from_secs(120);

/// `/api/v1/status`.
fn api_status(web: &str) -> Value {
    let (code, body) = browser::http_get(&format!("{web}/api/v1/status"));
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// The cells `/api/v1/status` says the page shows, in the page's order:
/// per upstream the build row, then each project's row.
fn api_cells(status: &Value) -> Vec<(String, String, String, String)> {
    let mut out = Vec::new();
    let mut push = |c: &Value| {
        let job = u(c, "job_id");
        let href = if job == 0 {
            String::new()
        } else {
            format!("/runs/{job}")
        };
        out.push((
            s(c, "state").to_string(),
            href,
            s(c, "commit").to_string(),
            s(c, "platform").to_string(),
        ));
    };
    for up in status["upstreams"].as_array().unwrap() {
        for commit in up["commits"].as_array().unwrap() {
            commit["builds"]
                .as_array()
                .unwrap()
                .iter()
                .for_each(&mut push);
        }
        for p in up["projects"].as_array().unwrap() {
            p["cells"].as_array().unwrap().iter().for_each(&mut push);
        }
    }
    out
}

fn page_cells(cells: &[GridCell]) -> Vec<(String, String, String, String)> {
    cells
        .iter()
        .map(|c| {
            (
                c.class.clone(),
                c.href.clone(),
                c.commit.clone(),
                c.platform.clone(),
            )
        })
        .collect()
}

/// shouter's cell at upstream `commit` in the JSON.
fn shouter_at<'a>(status: &'a Value, commit: &str) -> &'a Value {
    let up = &status["upstreams"][0];
    let row = up["projects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| s(p, "name") == "shouter")
        .unwrap_or_else(|| panic!("no shouter row: {status:#}"));
    row["cells"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| s(c, "commit") == commit)
        .unwrap_or_else(|| panic!("no shouter cell at {commit}: {status:#}"))
}

/// The page (as the browser shows it after live.js ran, and as served
/// without JavaScript) agrees with `/api/v1/status`; the DOM's cells.
fn check_page(browser: &Browser, web: &str) -> (Value, Vec<GridCell>) {
    let status = api_status(web);
    let dom = browser.dump_dom(&format!("{web}/"));
    let cells = browser::grid_cells(&dom);
    // Nothing may have changed in between: the pipeline is settled.
    assert_eq!(
        page_cells(&cells),
        api_cells(&status),
        "the page and /api/v1/status differ:\n{dom}\n{status:#}"
    );
    let (code, plain) = browser::http_get(&format!("{web}/"));
    assert_eq!(code, 200);
    assert_eq!(
        page_cells(&browser::grid_cells(&plain)),
        page_cells(&cells),
        "without JavaScript the page shows something else"
    );
    (status, cells)
}

/// The DOM cell of shouter at `commit` (the project rows follow the build
/// row, so it is the last cell with that commit).
fn dom_shouter_at<'a>(cells: &'a [GridCell], commit: &str) -> &'a GridCell {
    cells
        .iter()
        .rev()
        .find(|c| c.commit == commit)
        .unwrap_or_else(|| panic!("no cell at {commit}: {cells:#?}"))
}

/// Following the red cell opens its run page, which shows the failing test
/// with its message and the log; the went-red mail's "The run:" link opens
/// that same page. A screenshot of it is kept.
fn follow_the_red_cell(browser: &Browser, web: &str, sink: &SmtpSink, href: &str, job: u64) {
    let page = browser.dump_dom(&format!("{web}{href}"));
    assert!(page.contains(&format!("Run {job}")), "{page}");
    assert!(
        page.contains("shouter.test_upper") && page.contains("expected ABC, got abc"),
        "the run page does not show the failing test and its message:\n{page}"
    );
    // The log the page shows is the run's own (the API pages the same).
    let (code, body) = browser::http_get(&format!("{web}/api/v1/runs/{job}/log"));
    assert_eq!(code, 200, "{body}");
    let log: Value = serde_json::from_str(&body).unwrap();
    let last_line = s(&log, "text")
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty() && !l.contains(['<', '>', '&', '"', '\'']))
        .unwrap_or_else(|| panic!("an empty log: {log:#}"))
        .trim()
        .to_string();
    assert!(
        page.contains(&last_line),
        "the page's log lacks {last_line:?}:\n{page}"
    );
    // The went-red mail links that same page.
    let mails = sink.wait_for_messages(1, STEP);
    let went_red = mails
        .iter()
        .find(|m| m.header("Subject").is_some_and(|s| s.contains("went red")))
        .unwrap_or_else(|| panic!("no went-red mail among {} mails", mails.len()));
    let link = went_red
        .text
        .lines()
        .find_map(|l| l.strip_prefix("The run:"))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no run link in:\n{}", went_red.text));
    assert_eq!(link, format!("{web}{href}"), "the mail links another page");
    let from_mail = browser.dump_dom(link);
    assert!(from_mail.contains(&format!("Run {job}")), "{from_mail}");
    browser.screenshot(link, &browser::artifact("run-red.png"), DESKTOP);
}

/// Opens `/events`: the connection once the stream started, or the
/// status it was refused with.
fn try_events(web: &str) -> Result<TcpStream, String> {
    let host = web.trim_start_matches("http://");
    let mut stream = TcpStream::connect(host).unwrap();
    write!(stream, "GET /events HTTP/1.1\r\nHost: {host}\r\n\r\n").unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let head = read_until(&mut stream, "\r\n\r\n", Duration::from_secs(10));
    if !head.starts_with("HTTP/1.1 200") {
        return Err(head);
    }
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/event-stream"),
        "{head}"
    );
    Ok(stream)
}

/// Opens `/events`, waiting for a free stream slot: the browser's own
/// streams hold theirs until the hub notices the browser is gone.
fn open_events(web: &str) -> TcpStream {
    let start = Instant::now();
    loop {
        match try_events(web) {
            Ok(stream) => return stream,
            Err(head) if head.starts_with("HTTP/1.1 503") && start.elapsed() < STREAM_SLOT => {
                std::thread::sleep(Duration::from_millis(300));
            }
            Err(head) => panic!("/events refused: {head}"),
        }
    }
}

/// How long a closed stream may hold its slot (the keep-alive interval,
/// when the hub writes and notices, with room).
const STREAM_SLOT: Duration = Duration::from_secs(40);

/// Reads until `needle` arrived (or `within` passed: panics).
fn read_until(stream: &mut TcpStream, needle: &str, within: Duration) -> String {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains(needle) {
        assert!(
            start.elapsed() < within,
            "no {needle:?} within {within:?}: {}",
            String::from_utf8_lossy(&got)
        );
        match stream.read(&mut buf) {
            Ok(0) => panic!("the stream ended: {}", String::from_utf8_lossy(&got)),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[test]
fn the_grid_after_green_red_and_fixed_in_a_browser() {
    let Some(browser) = Browser::find() else {
        return;
    };
    let repos = Repos::with(&["shouter"]);
    let sink = SmtpSink::start();
    // 8 web connections: at most 4 live streams.
    let mut hub = Hub::start_opts(
        &repos.config(&smtp_toml(&sink)),
        HubOptions {
            web_toml: "max_connections = 8",
            ..HubOptions::default()
        },
    );
    let mut agents = Vec::new();
    for i in 0..2 {
        let mut a = Agent::enroll(&hub, &format!("d{i}"), &["--trusted"]);
        a.start(&["--max-parallel-jobs", "2"]);
        agents.push(a);
    }
    hub.wait_agents_connected(2);
    let web = browser::web_url(&hub);

    // Green.
    let c1 = repos.head("rt");
    let green = farm::wait_run(&hub, "shouter", &c1, "green", STEP);
    let green_job = u(&green["run"], "job_id");
    let (status, cells) = check_page(&browser, &web);
    assert_eq!(
        s(&status["upstreams"][0]["commits"][0], "sha"),
        c1,
        "{status:#}"
    );
    let cell = dom_shouter_at(&cells, &c1);
    assert_eq!(
        (cell.class.as_str(), cell.href.clone()),
        ("green", format!("/runs/{green_job}"))
    );
    assert_eq!(
        s(&status["upstreams"][0]["commits"][0]["builds"][0], "state"),
        "green"
    );

    // Red: the commit that broke it is the culprit (a range of one).
    let c2 = repos.break_upper("Eve Breaker <eve@example.org>");
    let red = farm::wait_run(&hub, "shouter", &c2, "red", STEP);
    let red_job = u(&red["run"], "job_id");
    let (status, cells) = check_page(&browser, &web);
    let commits: Vec<&str> = status["upstreams"][0]["commits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| s(c, "sha"))
        .collect();
    assert_eq!(commits, [c2.as_str(), c1.as_str()], "newest first");
    let cell = dom_shouter_at(&cells, &c2);
    assert_eq!(
        (cell.class.as_str(), cell.href.clone()),
        ("red", format!("/runs/{red_job}"))
    );
    assert!(
        cell.text.contains(&format!("culprit {}", &c2[..10])),
        "{cell:?}"
    );
    assert_eq!(shouter_at(&status, &c2)["culprits"][0], &c2[..10]);
    // The culprit's subject heads its column.
    assert_eq!(
        s(&status["upstreams"][0]["commits"][0], "subject"),
        "rt: speed up upper"
    );
    assert_eq!(dom_shouter_at(&cells, &c1).class, "green");
    follow_the_red_cell(&browser, &web, &sink, &cell.href, red_job);

    // Fixed, while a page listens to /events: it hears of the change.
    let mut events = open_events(&web);
    let c3 = repos.commit(
        "rt",
        "rt.sh",
        &format!("{RUNTIME}# upper fixed\n"),
        "rt: fix upper",
        "Fay Fixer <fay@example.org>",
    );
    read_until(&mut events, "event: changed", STEP);
    let fixed = farm::wait_run(&hub, "shouter", &c3, "green", STEP);
    let fixed_job = u(&fixed["run"], "job_id");
    let (status, cells) = check_page(&browser, &web);
    for (commit, class, job) in [
        (&c3, "green", fixed_job),
        (&c2, "red", red_job),
        (&c1, "green", green_job),
    ] {
        let cell = dom_shouter_at(&cells, commit);
        assert_eq!(
            (cell.class.as_str(), cell.href.clone()),
            (class, format!("/runs/{job}")),
            "at {commit}"
        );
        assert_eq!(u(shouter_at(&status, commit), "job_id"), job);
    }
    // The job ids the page links are the pipeline's own: `job list` knows them.
    let jobs = hub.cli_json(&["job", "list", "--json"]);
    for job in [green_job, red_job, fixed_job] {
        assert!(
            jobs.as_array()
                .unwrap()
                .iter()
                .any(|j| j["job_id"].as_u64() == Some(job)),
            "job {job} not in job list: {jobs:#}"
        );
    }

    // Live streams may take half the web connections, not more: the fifth
    // is refused, and pages are still served.
    let streams: Vec<TcpStream> = (1..4).map(|_| open_events(&web)).collect();
    let (code, body) = browser::http_get(&format!("{web}/events"));
    assert_eq!(code, 503, "{body}");
    assert_eq!(browser::http_get(&format!("{web}/")).0, 200);
    drop((streams, events));
    // Their slots come back once they are closed.
    open_events(&web);

    for (name, size) in [("grid-desktop.png", DESKTOP), ("grid-phone.png", PHONE)] {
        browser.screenshot(&format!("{web}/"), &browser::artifact(name), size);
    }

    // A stream ends when the hub shuts down (it does not hold the shutdown
    // up until the web endpoint gives up waiting).
    let mut live = open_events(&web);
    // SAFETY: kill(2) on the hub's pid, which this test started.
    assert_eq!(unsafe { libc::kill(hub.pid() as i32, libc::SIGTERM) }, 0);
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match live.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(_) => {}
        }
        assert!(
            start.elapsed() < Duration::from_secs(4),
            "the stream outlived the hub's shutdown"
        );
    }
    trunkfarm_e2e::wait_until(Duration::from_secs(20), "the hub to exit", || {
        !hub.is_running()
    });
    assert!(
        !hub.logs().contains("connections still open"),
        "{}",
        hub.logs()
    );
}
