//! Donors' limits (issue 15 item 2): a real hub and real agents. An agent
//! whose schedule excludes now takes nothing and the hub says why and until
//! when; an agent set `only_when_idle` takes nothing while its load (read
//! from a file the test writes: `loadavg_file`) is high and takes the job
//! once it falls; a denied project stays away from the agent that denies
//! it, the waiting reason says so and the donor is told; `agent list` (text
//! and JSON) and the agent's own `status` show the limits.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use trunkfarm_e2e::{Agent, Hub, bins, combined, run_with_timeout, s, wait_for};

const WAIT: Duration = Duration::from_secs(30);

/// `trunkfarm-agent <args> --state-dir <dir>`.
fn agent_cmd(dir: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(&bins().agent);
    cmd.args(args).arg("--state-dir").arg(dir);
    run_with_timeout(cmd, Duration::from_secs(90))
}

/// Adds `lines` to the agent's `agent.toml` (top-level keys only).
fn configure(agent: &Agent, lines: &str) {
    let path = agent.state_dir.join("agent.toml");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(lines);
    std::fs::write(&path, text).unwrap();
}

/// The `agent list --json` entry of agent `name`.
fn listed(hub: &Hub, name: &str) -> Value {
    hub.agent_named(name)
        .unwrap_or_else(|| panic!("agent {name} is not listed"))
}

/// The day after tomorrow in UTC, as a schedule names it: never today,
/// even if the test runs across midnight.
fn not_today() -> &'static str {
    const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
    let days = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 86_400;
    // 1970-01-01 was a Thursday (index 3).
    DAYS[((days + 3 + 2) % 7) as usize]
}

#[test]
fn limits_keep_work_away_and_the_hub_says_why() {
    let hub = Hub::start();
    let day = not_today();

    // `night` takes work only on a day that is not today.
    let mut night = Agent::enroll(&hub, "night", &[]);
    configure(
        &night,
        &format!("timezone = \"UTC\"\nschedule = [\"{day}\"]\n"),
    );
    night.start(&[]);

    // `idle` takes work only while its (test) load is low; it denies beta.
    let mut idle = Agent::enroll(&hub, "idle", &[]);
    let loadavg = idle.dir.path().join("loadavg");
    std::fs::write(&loadavg, "999.00 999.00 999.00 1/100 1\n").unwrap();
    configure(
        &idle,
        &format!(
            "only_when_idle = true\nidle_for = \"0s\"\nidle_check = \"1s\"\nloadavg_file = \"{}\"\n",
            loadavg.display()
        ),
    );
    idle.start(&["--deny-project", "beta", "--cores", "1"]);
    hub.wait_agents_connected(2);

    // The hub shows why each takes nothing, and their limits.
    let n = wait_for(WAIT, "the hub shows `night` outside its schedule", || {
        let a = listed(&hub, "night");
        (!s(&a, "paused").is_empty()).then_some(a)
    });
    let closed = format!("outside its donor's schedule ({day}, UTC time) until ");
    assert!(s(&n, "paused").starts_with(&closed), "{n:#}");
    assert!(s(&n, "paused").ends_with(" 00:00 UTC"), "{n:#}");
    assert_eq!(s(&n, "schedule"), format!("{day} (UTC)"), "{n:#}");
    assert!(
        n["limits"]
            .as_array()
            .unwrap()
            .contains(&Value::from(format!("{day} (UTC)"))),
        "{n:#}"
    );
    let i = wait_for(WAIT, "the hub shows `idle` waiting for idleness", || {
        let a = listed(&hub, "idle");
        (!s(&a, "paused").is_empty()).then_some(a)
    });
    assert!(
        s(&i, "paused").starts_with("waiting for the machine to be idle (load 999.0 > "),
        "{i:#}"
    );
    assert_eq!(i["denied_projects"], serde_json::json!(["beta"]), "{i:#}");
    assert_eq!(i["cores"], 1, "{i:#}");
    assert!(s(&i, "only_when_idle").starts_with("load under "), "{i:#}");
    let text = hub.cli_ok(&["agent", "list"]);
    assert!(
        text.contains("(night): ") && text.contains(&format!("; {day} (UTC); ")),
        "{text}"
    );
    assert!(
        text.contains("; not beta; when idle: load under "),
        "{text}"
    );

    // A job nobody takes says why, per agent.
    let any = hub.submit(&["--", "true"]);
    let beta = hub.submit(&["--project", "beta", "--", "true"]);
    std::thread::sleep(Duration::from_secs(2));
    let job = hub.job(any);
    assert_eq!(s(&job, "state"), "queued", "{job:#}");
    let why = s(&job, "waiting");
    assert!(
        why.contains(&format!("agent `night` is {closed}")),
        "{job:#}"
    );
    assert!(
        why.contains("agent `idle` is waiting for the machine to be idle (load 999.0 > "),
        "{job:#}"
    );
    let job = hub.job(beta);
    let why = s(&job, "waiting");
    assert!(
        why.contains("agent `idle` does not accept project `beta` (its donor denies it)"),
        "{job:#}"
    );
    assert!(
        why.contains(&format!("agent `night` is {closed}")),
        "{job:#}"
    );

    // The donor's own `status` says it too, in its time zone.
    let out = agent_cmd(&night.state_dir, &["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", combined(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!("Takes work: not now: {closed}{day} 00:00.")),
        "{said}"
    );
    let out = agent_cmd(&idle.state_dir, &["status", "--json"]);
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        s(&status, "unavailable").starts_with("waiting for the machine to be idle"),
        "{status:#}"
    );

    // The load falls: `idle` takes the job (not the denied one), and says so.
    std::fs::write(&loadavg, "0.00 0.00 0.00 1/100 1\n").unwrap();
    let done = hub.wait_job_finished(any, WAIT);
    assert_eq!(s(&done, "outcome"), "passed", "{done:#}");
    assert_eq!(s(&done, "agent_id"), idle.id(&hub), "{done:#}");
    assert_eq!(s(&listed(&hub, "idle"), "paused"), "");
    assert!(
        idle.logs()
            .contains("This agent's limits let it take work again."),
        "{}",
        idle.logs()
    );
    std::thread::sleep(Duration::from_secs(2));
    let job = hub.job(beta);
    assert_eq!(s(&job, "state"), "queued", "{job:#}");
    assert!(
        s(&job, "waiting").contains("agent `idle` does not accept project `beta`"),
        "{job:#}"
    );
    // Its donor is told why the beta job stays away.
    wait_for(WAIT, "the donor of `idle` is told about beta", || {
        idle.logs()
            .contains(
                "The hub says: A job of project `beta` waits that your denied_projects refuse.",
            )
            .then_some(())
    });
    // `night` never ran anything.
    assert!(!night.logs().contains("Started job"), "{}", night.logs());
}
