//! Secrets stay secret on the farm's machines: credentials in upstream and
//! project URLs reach git through its environment only — never a command
//! line (`ps`), a log, a listing, the database or a job — and what the hub
//! keeps (its data dir, its mailbox) is readable by its own user only.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use trunkfarm_e2e::farm::Repos;
use trunkfarm_e2e::git_http::GitHttp;
use trunkfarm_e2e::{Agent, Hub, s, temp_dir, wait_for};

/// The git server's password: nothing but git may ever see it.
const PASSWORD: &str = "pw-Vq83rXk";

/// A project whose test shows the job's whole world in its log: its
/// environment and its checkout's git files (the test then looks for the
/// password there).
const SNOOP_TESTS: &str = r#"#!/bin/sh
env
cat .git/config .git/FETCH_HEAD 2>/dev/null
test -z "$TRUNKFARM_GIT_PASSWORD" && test -z "$GIT_CONFIG_COUNT"
"#;

/// Every `/proc/<pid>/cmdline` holding `needle`, as `pid: cmdline` with the
/// needle masked.
fn command_lines_with(needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return hits;
    };
    for entry in dir.flatten() {
        // Processes come and go: one that is gone has nothing to show.
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if cmdline.windows(needle.len()).any(|w| w == needle) {
            let shown = String::from_utf8_lossy(&cmdline)
                .replace('\0', " ")
                .replace(PASSWORD, "<PASSWORD>");
            hits.push(format!("{}: {shown}", entry.file_name().to_string_lossy()));
        }
    }
    hits
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_with(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return hits;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            hits.extend(files_with(&path, needle));
        } else if fs::read(&path).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle)) {
            hits.push(path.display().to_string());
        }
    }
    hits
}

/// Every file and directory under `dir` (itself included) that its group
/// or others may read, write or enter, with its mode.
fn open_to_others(dir: &Path) -> Vec<String> {
    let mut open = Vec::new();
    let mode = fs::symlink_metadata(dir).unwrap().permissions().mode();
    if mode & 0o077 != 0 {
        open.push(format!("{:o} {}", mode & 0o7777, dir.display()));
    }
    for entry in fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        let meta = fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            open.extend(open_to_others(&path));
        } else if !meta.file_type().is_symlink() && meta.permissions().mode() & 0o077 != 0 {
            open.push(format!(
                "{:o} {}",
                meta.permissions().mode() & 0o7777,
                path.display()
            ));
        }
    }
    open
}

#[test]
fn credentials_in_repository_urls_reach_git_and_nothing_else() {
    let repos = Repos::with(&["adder"]);
    repos.create("snoop", &[("test.sh", SNOOP_TESTS)], "snoop");
    let server = GitHttp::start(repos.root(), "ci", PASSWORD);
    let base = format!("http://ci:{PASSWORD}@{}", server.host());

    // Every process's arguments, scanned without pause from before the
    // first poll to the last checkout.
    let stop = Arc::new(AtomicBool::new(false));
    let scans = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let scanner = {
        let (stop, scans, seen) = (stop.clone(), scans.clone(), seen.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let hits = command_lines_with(PASSWORD.as_bytes());
                seen.lock().unwrap().extend(hits);
                scans.fetch_add(1, Ordering::Relaxed);
            }
        })
    };

    let extra = format!(
        r#"
[[project]]
name = "snoop"
url = "{base}/snoop"
poll_interval = "200ms"
test = ["sh test.sh"]
timeout = "1m"
"#
    );
    let hub = Hub::start_with(&repos.config_served(&base, &extra), &[]);
    let mut agent = Agent::enroll(&hub, "a", &["--trusted"]);
    // Under bubblewrap, as a donor's agent runs jobs: the checkout is the
    // agent's, the job's commands are the job's.
    fs::write(
        agent.state_dir.join("agent.toml"),
        "reconnect_max_backoff = \"2s\"\nsandbox = \"bwrap\"\nmax_parallel_jobs = 2\n",
    )
    .unwrap();
    agent.start(&[]);
    hub.wait_agents_connected(1);

    // The build checked out rt and the tests checked out adder and snoop,
    // all through the server that refuses anyone without the password.
    let head = repos.head("rt");
    for project in ["adder", "snoop"] {
        wait_for(
            Duration::from_secs(120),
            &format!("{project} to be green at {head}"),
            || {
                let status = hub.cli_json(&["status", "--json"]);
                status["cells"].as_array()?.iter().find_map(|c| {
                    (s(c, "project") == project
                        && s(&c["run"], "upstream_commit") == head
                        && s(c, "status") == "green")
                        .then_some(())
                })
            },
        );
    }
    stop.store(true, Ordering::Relaxed);
    scanner.join().unwrap();
    let requests = server.requests();
    assert!(
        requests.contains("denied GET /rt/") && requests.contains("ok POST /snoop/"),
        "the server asked for credentials and got them:\n{requests}"
    );
    let seen = seen.lock().unwrap();
    assert!(
        seen.is_empty(),
        "the password was on a command line ({} scans):\n{}",
        scans.load(Ordering::Relaxed),
        seen.join("\n")
    );
    assert!(scans.load(Ordering::Relaxed) > 20, "the scanner hardly ran");

    // Nor in a log, a listing, a job's log, the hub's data or the agent's.
    let jobs = hub.cli_json(&["job", "list", "--json"]);
    let jobs = jobs.as_array().unwrap();
    assert!(jobs.len() >= 3, "a build and two tests: {jobs:#?}");
    let mut shown = format!("{jobs:#?}");
    for job in jobs {
        let id = job["job_id"].as_u64().unwrap().to_string();
        shown.push_str(&hub.cli_ok(&["job", "show", &id, "--json"]));
        shown.push_str(&hub.cli_ok(&["job", "log", &id]));
    }
    shown.push_str(&hub.cli_ok(&["upstream", "list", "--json"]));
    shown.push_str(&hub.cli_ok(&["status", "--json"]));
    assert!(
        shown.contains(&format!("http://{}/snoop", server.host())),
        "the listings name the repository: {shown}"
    );
    assert!(
        shown.contains("GIT_CONFIG") || shown.contains("PATH="),
        "the snoop job printed its environment: {shown}"
    );
    for (what, text) in [
        ("the listings and job logs", shown),
        ("the hub's output", hub.logs()),
        ("the agent's output", agent.logs()),
    ] {
        assert!(
            !text.contains(PASSWORD),
            "{what} show the password:\n{text}"
        );
    }
    let stored = files_with(&hub.data_dir, PASSWORD.as_bytes());
    assert!(
        stored.is_empty(),
        "the hub stores the password in {stored:?}"
    );
    let kept = files_with(&agent.state_dir, PASSWORD.as_bytes());
    assert!(kept.is_empty(), "the agent keeps the password in {kept:?}");
}

#[test]
fn the_hubs_data_and_mailbox_and_the_agents_state_are_their_own() {
    let mailbox = temp_dir("trunkfarm-e2e-mailbox-");
    let mail_dir = mailbox.path().join("mail");
    let hub = Hub::start_with(
        &format!(
            "\n[smtp]\nmailbox_dir = \"{}\"\nfrom = \"farm@example.org\"\n",
            mail_dir.display()
        ),
        &[],
    );
    // The harness made the data dir under the usual umask (0755): the hub
    // closes it and says so.
    assert!(
        hub.logs().contains("was open to other users"),
        "{}",
        hub.logs()
    );
    hub.cli_ok(&["mail", "test", "--to", "maintainer@example.org"]);
    wait_for(Duration::from_secs(10), "the test mail's file", || {
        fs::read_dir(&mail_dir)
            .ok()?
            .flatten()
            .find(|e| e.path().extension().is_some_and(|x| x == "eml"))
    });
    // A job, its log and its result in the database too, and the agent's
    // state, cache and work dir; the job's own files get the usual umask.
    let mut agent = Agent::enroll(&hub, "a", &[]);
    agent.start(&[]);
    hub.wait_agents_connected(1);
    let id = hub.submit(&["--", "test \"$(umask)\" = 0022"]);
    let job = hub.wait_job_finished(id, Duration::from_secs(60));
    assert_eq!(job["outcome"], "passed", "{job:#}");
    let open: Vec<String> = open_to_others(&hub.data_dir)
        .into_iter()
        .chain(open_to_others(&mail_dir))
        .chain(open_to_others(&agent.state_dir))
        // The donor's own settings, which the harness wrote.
        .filter(|line| !line.ends_with("/state/agent.toml"))
        .collect();
    assert!(
        open.is_empty(),
        "readable by other users:\n{}",
        open.join("\n")
    );
}
