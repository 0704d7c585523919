//! Retention end to end (issue 16 item 4): a real hub with retention
//! counted in seconds (allowed with bisection off: nothing reads a finished
//! job's record later), a real agent, real git. shouter goes red and stays
//! red while a steady load of its commits runs; old runs, logs, test cases
//! and job records go, the latest result, the open went-red (its run, cases
//! and log) and the grid stay complete, and the database stops growing.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use trunkfarm_e2e::browser::{http_get, web_url};
use trunkfarm_e2e::farm::{Repos, SHOUTER_TESTS, cell, wait_run};
use trunkfarm_e2e::{Agent, Hub, s, temp_dir, u, wait_for, wait_until};

/// How long the pipeline may take for one step.
const STEP: Duration = Duration::from_secs(60);

/// Rounds of load: more than the pages keep (each series' newest 32 runs
/// stay whatever their age), so old runs go too.
const ROUNDS: usize = 44;

/// After which rounds the database is measured: the first ten rounds, and
/// the last ten once the pages' newest 32 runs are in place (before that
/// each round adds a run the pages keep, whatever its age).
const MEASURED: [usize; 4] = [1, 11, ROUNDS - 10, ROUNDS];

/// Longer than the longest retention below plus a pass.
const SETTLE: Duration = Duration::from_secs(12);

/// Retention in seconds: test cases and logs after 2 s, runs and job
/// records after 10 s, a pass every second.
const RETENTION: &str = r#"
[retention]
runs = "10s"
keep_last = 1
test_cases = "2s"
logs = "2s"
jobs = "10s"
interval = "1s"
"#;

/// The bytes of every key and value the hub's database holds: its files
/// copied while the hub is stopped (SIGSTOP: what is on disk then is what a
/// crash would leave, which the database recovers), opened and read.
fn live_bytes(hub: &Hub) -> u64 {
    let copy = temp_dir("trunkfarm-e2e-retention-db-");
    let pid = hub.pid() as i32;
    // SAFETY: signals to the hub this test started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    copy_dir(&hub.data_dir.join("store"), copy.path());
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    // The copy holds the hub's lock file, which no process holds.
    let db = fjall::Database::builder(copy.path()).open().unwrap();
    let mut total = 0u64;
    for name in db.list_keyspace_names() {
        let tree = db
            .keyspace(&name, fjall::KeyspaceCreateOptions::default)
            .unwrap();
        for item in tree.iter() {
            let (k, v) = item.into_inner().unwrap();
            total += (k.len() + v.len()) as u64;
        }
    }
    total
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.metadata().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// `GET /api/v1/<path>`: the status and the JSON answer.
fn api(web: &str, path: &str) -> (u16, Value) {
    let (code, body) = http_get(&format!("{web}/api/v1/{path}"));
    (code, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// shouter's test script at round `n` (the same tests: a new commit).
fn round_script(n: usize) -> String {
    format!("{SHOUTER_TESTS}# round {n}\n")
}

#[test]
fn old_runs_logs_and_cases_go_while_the_latest_the_open_red_and_the_grid_stay() {
    let started = Instant::now();
    let repos = Repos::with(&["shouter"]);
    // Bisection off: what allows `retention.jobs` in seconds.
    let config = repos
        .config(RETENTION)
        .replace("[pipeline]\n", "[pipeline]\nbisect_max_builds = 0\n");
    let hub = Hub::start_with(&config, &[]);
    let mut agent = Agent::enroll(&hub, "n0", &["--trusted"]);
    agent.start(&["--max-parallel-jobs", "1"]);
    hub.wait_agents_connected(1);
    let web = web_url(&hub);

    // shouter goes red at the broken runtime and stays red.
    let bad = repos.break_upper("Eve Breaker <eve@example.org>");
    let red = wait_run(&hub, "shouter", &bad, "red", STEP);
    let red_job = u(&red["run"], "job_id");
    let went_red = u(&red["red_since"], "id");
    assert!(went_red > 0, "{red:#}");

    // The steady load: one shouter commit a round, each run with its log
    // and two test cases.
    let mut jobs = Vec::new();
    let mut sizes = Vec::new();
    for n in 0..ROUNDS {
        let commit = repos.commit(
            "shouter",
            "test.sh",
            &round_script(n),
            "round",
            "Dev <dev@example.org>",
        );
        let c = wait_for(STEP, &format!("round {n}'s run"), || {
            let c = cell(&hub.cli_json(&["status", "--json"]), "shouter");
            (s(&c["run"], "project_commit") == commit && s(&c, "status") == "red").then_some(c)
        });
        jobs.push(u(&c["run"], "job_id"));
        if MEASURED[..2].contains(&(n + 1)) {
            sizes.push(live_bytes(&hub));
        } else if n + 1 == MEASURED[2] {
            // In the steady state, measured once what has expired is gone
            // (runs and job records live 10 s, a pass every second): how
            // far pruning lags behind a loaded machine is not growth.
            std::thread::sleep(SETTLE);
            sizes.push(live_bytes(&hub));
        }
    }
    let load_took = started.elapsed();
    let last_job = *jobs.last().unwrap();

    // A recent run's test cases and log expire before its record: its page
    // still answers, with the summary but no cases.
    let recent = jobs[ROUNDS - 2];
    wait_until(
        Duration::from_secs(6),
        "a recent run's cases and log to go",
        || {
            let (code, run) = api(&web, &format!("runs/{recent}"));
            let (_, log) = api(&web, &format!("runs/{recent}/log"));
            code == 200
                && run["tests"]["cases"]
                    .as_array()
                    .is_some_and(|c| c.is_empty())
                && u(&run["tests"], "total") == 2
                && u(&log, "total") == 0
        },
    );

    // The first rounds' jobs are gone: record (run page), log, run.
    wait_until(
        Duration::from_secs(20),
        "the first rounds' jobs to be pruned",
        || {
            jobs[..4]
                .iter()
                .all(|j| api(&web, &format!("runs/{j}")).0 == 404)
        },
    );
    for j in &jobs[..4] {
        let (code, _) = api(&web, &format!("runs/{j}/log"));
        assert_eq!(code, 404, "job {j}'s log");
    }
    // The project's runs (what its page draws): the newest stay, the
    // first rounds' are gone.
    let (_, project) = api(&web, "projects/shouter");
    let shown: Vec<u64> = project_runs(&project);
    assert!(!shown.is_empty(), "{project:#}");
    assert!(shown.contains(&last_job), "{shown:?}");
    for j in &jobs[..4] {
        assert!(!shown.contains(j), "round run {j} still shown: {shown:?}");
    }

    // Whatever their age: the latest run with its cases and log, the open
    // went-red with its run, cases and log, and the grid.
    std::thread::sleep(Duration::from_secs(11));
    for (what, job) in [("the latest run", last_job), ("the went-red run", red_job)] {
        let (code, run) = api(&web, &format!("runs/{job}"));
        assert_eq!(code, 200, "{what}: {run:#}");
        assert_eq!(
            run["tests"]["cases"].as_array().map(Vec::len),
            Some(2),
            "{what}: {run:#}"
        );
        let (code, log) = api(&web, &format!("runs/{job}/log"));
        assert!(code == 200 && u(&log, "total") > 0, "{what}'s log: {log:#}");
    }
    let grid = cell(&hub.cli_json(&["status", "--json"]), "shouter");
    assert_eq!(s(&grid, "status"), "red", "{grid:#}");
    assert_eq!(u(&grid["run"], "job_id"), last_job, "{grid:#}");
    assert_eq!(u(&grid["red_since"], "id"), went_red, "{grid:#}");
    // The dashboard's grid: the runtime's build at its head, shouter's
    // latest run there.
    let (code, status) = api(&web, "status");
    assert_eq!(code, 200);
    let rt = &status["upstreams"][0];
    let builds: Vec<&Value> = rt["commits"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["builds"].as_array().unwrap())
        .collect();
    assert!(
        builds
            .iter()
            .any(|b| s(b, "commit").starts_with(&bad[..10]) && u(b, "job_id") != 0),
        "{status:#}"
    );
    let cells: Vec<&Value> = rt["projects"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["cells"].as_array().unwrap())
        .collect();
    assert!(
        cells
            .iter()
            .any(|c| u(c, "job_id") == last_job && s(c, "state") == "red"),
        "{status:#}"
    );
    let listed = hub.cli_json(&["transitions", "--json", "--project", "shouter"]);
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|t| u(t, "id") == went_red),
        "{listed:#}"
    );

    // The last measure, settled as the one ten rounds before (after the
    // checks above, which want a recent run's record still there).
    std::thread::sleep(SETTLE);
    sizes.push(live_bytes(&hub));

    // The database stops growing: once the pages' 32 runs are in place,
    // ten more rounds add far less than the first ten did (runs and job
    // records live 10 s, test cases and logs 2 s).
    let first = sizes[1].saturating_sub(sizes[0]);
    let last = sizes[3].saturating_sub(sizes[2]);
    println!(
        "database: {} bytes of records after round 1, {} after round 11 (+{first}), {} after round {}, {} after round {ROUNDS} (+{last}); load took {load_took:?}",
        sizes[0],
        sizes[1],
        sizes[2],
        ROUNDS - 10,
        sizes[3]
    );
    assert!(last <= first / 4, "{sizes:?}");
}

/// The job ids of a project's runs as `/api/v1/projects/<name>` lists them.
fn project_runs(project: &Value) -> Vec<u64> {
    let mut out = Vec::new();
    collect_job_ids(project, &mut out);
    out
}

fn collect_job_ids(v: &Value, out: &mut Vec<u64>) {
    match v {
        Value::Object(m) => {
            if let Some(id) = m.get("job_id").and_then(Value::as_u64) {
                out.push(id);
            }
            for x in m.values() {
                collect_job_ids(x, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect_job_ids(x, out)),
        _ => {}
    }
}
