//! On-demand agents: pools that grow when matching work waits and shrink
//! when idle, with real agent processes (local provisioner, and the
//! operator's scripts for the command provisioner).

use std::time::{Duration, Instant};

use serde_json::Value;
use trunkfarm_e2e::{Hub, bins, s, temp_dir, u, wait_for};

fn pools(hub: &Hub) -> Vec<Value> {
    hub.cli_json(&["pool", "list", "--json", "--all"])
        .as_array()
        .unwrap()
        .clone()
}

/// `GET /metrics` from the hub's web endpoint.
fn metrics(hub: &Hub) -> String {
    use std::io::{Read, Write};
    let info: Value =
        serde_json::from_str(&std::fs::read_to_string(hub.data_dir.join("hub.json")).unwrap())
            .unwrap();
    let addr = info["web"].as_str().unwrap().to_string();
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
}

fn live(pool: &Value) -> usize {
    pool["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| matches!(s(i, "state"), "starting" | "running"))
        .count()
}

#[test]
fn local_pool_grows_to_max_for_a_burst_and_shrinks_to_min_when_idle() {
    let config = format!(
        r#"
[[pool]]
name = "burst"
provisioner = "local"
labels = ["burst"]
min_instances = 0
max_instances = 3
pending_grace = "0s"
idle_timeout = "2s"
missing_timeout = "60s"
agent_binary = "{}"
"#,
        bins().agent.display()
    );
    let hub = Hub::start_with(&config, &[]);
    // An empty hub: no agent at all, 20 jobs that only the pool can run.
    let ids: Vec<u64> = (0..20)
        .map(|_| hub.submit(&["--labels", "burst", "--", "sleep 0.2"]))
        .collect();
    let mut most = 0;
    let mut seen_in_metrics = false;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let p = &pools(&hub)[0];
        most = most.max(live(p));
        if !seen_in_metrics && live(p) > 0 {
            // The same is exposed as metrics.
            let m = metrics(&hub);
            seen_in_metrics = m.lines().any(|l| {
                (l.starts_with("trunkfarm_pool_instances{pool=\"burst\",state=\"running\"}")
                    || l.starts_with("trunkfarm_pool_instances{pool=\"burst\",state=\"starting\"}"))
                    && !l.ends_with(" 0")
            });
        }
        let done = ids.iter().all(|id| s(&hub.job(*id), "state") == "finished");
        if done {
            break;
        }
        assert!(Instant::now() < deadline, "the burst did not finish: {p:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(most, 3, "grew to max_instances and no further");
    assert!(seen_in_metrics, "the pool's instances were not in /metrics");
    for id in &ids {
        assert_eq!(s(&hub.job(*id), "outcome"), "passed");
    }
    // Idle for idle_timeout: back to min_instances (0), each stopped cleanly.
    let p = wait_for(Duration::from_secs(60), "the pool to shrink to 0", || {
        let p = pools(&hub)[0].clone();
        let stopped = p["instances"]
            .as_array()?
            .iter()
            .all(|i| s(i, "state") == "gone");
        (live(&p) == 0 && stopped).then_some(p)
    });
    let instances = p["instances"].as_array().unwrap();
    assert!(instances.len() >= 3, "{p:#}");
    for i in instances {
        assert_eq!(s(i, "state"), "gone", "{i:#}");
        assert_eq!(s(i, "detail"), "idle");
        // The agent process is gone too.
        let pid: i32 = s(i, "handle").parse().unwrap();
        wait_for(Duration::from_secs(30), "the agent process to exit", || {
            trunkfarm_e2e::pid_gone(pid).then_some(())
        });
    }
    // Their credentials were revoked: nothing left that could come back.
    for a in hub.agents() {
        assert_eq!(a["revoked"], Value::Bool(true), "{a:#}");
    }
    let text = hub.cli_ok(&["pool", "list", "--all"]);
    assert!(
        text.contains("pool burst (local): 0 instance(s), min 0, max 3"),
        "{text}"
    );
    let m = metrics(&hub);
    for line in [
        "trunkfarm_pool_instances{pool=\"burst\",state=\"running\"} 0",
        "trunkfarm_pool_failed_starts{pool=\"burst\"} 0",
        "trunkfarm_jobs_queued 0",
    ] {
        assert!(m.contains(line), "{line} not in\n{m}");
    }
}

#[test]
fn command_pool_starts_agents_with_scripts_and_backs_off_a_failing_start() {
    let work = temp_dir("trunkfarm-e2e-pool-scripts-");
    let dir = work.path().display().to_string();
    let agent = bins().agent.display().to_string();
    let start = format!(
        r#"set -e
d="{dir}/$TRUNKFARM_INSTANCE_NAME"
"{agent}" enroll "$TRUNKFARM_ENROLLMENT" --name "$TRUNKFARM_INSTANCE_NAME" --state-dir "$d" >/dev/null 2>&1
"{agent}" run --state-dir "$d" > "$d.log" 2>&1 &
echo "starting $TRUNKFARM_INSTANCE_NAME" >&2
echo $!"#
    );
    let config = format!(
        r#"
[[pool]]
name = "scripted"
provisioner = "command"
labels = ["scripted"]
max_instances = 1
pending_grace = "0s"
idle_timeout = "1h"
start_command = '''{start}'''
stop_command = "kill $TRUNKFARM_INSTANCE_ID"

[[pool]]
name = "broken"
provisioner = "command"
labels = ["broken"]
max_instances = 2
pending_grace = "0s"
start_command = "echo 'no capacity in rack 7' >&2; exit 3"
stop_command = "true"

[[pool]]
name = "hung"
provisioner = "command"
labels = ["hung"]
max_instances = 1
pending_grace = "0s"
command_timeout = "1s"
start_command = "sleep 60"
stop_command = "true"
"#
    );
    let hub = Hub::start_with(&config, &[]);
    let id = hub.submit(&[
        "--labels",
        "scripted",
        "--",
        "echo from a scripted instance",
    ]);
    let job = hub.wait_job_finished(id, Duration::from_secs(60));
    assert_eq!(s(&job, "outcome"), "passed", "{job:#}");
    let p = pools(&hub);
    let scripted = p.iter().find(|p| s(p, "name") == "scripted").unwrap();
    assert_eq!(live(scripted), 1, "{scripted:#}");
    // The enrollment string never reaches a log.
    assert!(
        !hub.logs().contains("tf1_"),
        "an enrollment string was logged"
    );

    // A failing start script: reported, counted, backed off (no retry storm).
    let _waiting = hub.submit(&["--labels", "broken", "--", "true"]);
    let broken = wait_for(Duration::from_secs(30), "a failed start", || {
        let p = pools(&hub);
        let b = p.iter().find(|p| s(p, "name") == "broken")?.clone();
        (u(&b, "failed_starts") >= 1).then_some(b)
    });
    assert!(
        s(&broken, "last_error").contains("no capacity in rack 7"),
        "{broken:#}"
    );
    std::thread::sleep(Duration::from_secs(3));
    let p = pools(&hub);
    let b = p.iter().find(|p| s(p, "name") == "broken").unwrap();
    assert_eq!(
        u(b, "failed_starts"),
        1,
        "backed off, not retried at once: {b:#}"
    );
    let text = hub.cli_ok(&["pool", "list"]);
    assert!(text.contains("1 failed start(s) in a row"), "{text}");
    // A start script that hangs is killed after command_timeout: a failed start.
    let _hung = hub.submit(&["--labels", "hung", "--", "true"]);
    let hung = wait_for(
        Duration::from_secs(30),
        "the hung start to time out",
        || {
            let p = pools(&hub);
            let h = p.iter().find(|p| s(p, "name") == "hung")?.clone();
            (u(&h, "failed_starts") >= 1).then_some(h)
        },
    );
    assert!(
        s(&hung, "last_error").contains("did not finish within 1s"),
        "{hung:#}"
    );
    // The scripted agent is the test's to stop (its pid is the instance id).
    for i in scripted["instances"].as_array().unwrap() {
        if let Ok(pid) = s(i, "handle").parse::<i32>() {
            // SAFETY: kill(2) of the agent the start script launched.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

#[test]
fn a_restarted_hub_keeps_its_instances_and_terminates_unknown_ones() {
    let config = format!(
        r#"
[[pool]]
name = "steady"
provisioner = "local"
min_instances = 1
max_instances = 1
pending_grace = "0s"
agent_binary = "{}"
"#,
        bins().agent.display()
    );
    let mut hub = Hub::start_with(&config, &[]);
    let first = wait_for(
        Duration::from_secs(60),
        "min_instances to be running",
        || {
            let p = pools(&hub)[0].clone();
            let running = p["instances"]
                .as_array()?
                .iter()
                .find(|i| s(i, "state") == "running")?
                .clone();
            Some(running)
        },
    );
    // Something under the pool's directory that the hub never started.
    let stray_dir = hub.data_dir.join("pools/steady/stray");
    std::fs::create_dir_all(&stray_dir).unwrap();
    let mut stray = std::process::Command::new("sleep")
        .arg("300")
        .spawn()
        .unwrap();
    std::fs::write(stray_dir.join("pid"), stray.id().to_string()).unwrap();
    hub.kill9();
    hub.restart();
    // The unknown process is terminated at start-up...
    wait_for(
        Duration::from_secs(30),
        "the stray process to be killed",
        || stray.try_wait().ok().flatten().map(|_| ()),
    );
    // ...and the known instance is kept: its agent reconnects, nothing new starts.
    std::thread::sleep(Duration::from_secs(2));
    let p = pools(&hub)[0].clone();
    let instances = p["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 1, "{p:#}");
    assert_eq!(s(&instances[0], "id"), s(&first, "id"));
    assert!(!trunkfarm_e2e::pid_gone(
        s(&first, "handle").parse().unwrap()
    ));
}

#[test]
fn an_instance_is_replaced_after_max_jobs_per_instance() {
    let config = format!(
        r#"
[[pool]]
name = "fresh"
provisioner = "local"
labels = ["fresh"]
max_instances = 1
max_jobs_per_instance = 2
pending_grace = "0s"
agent_binary = "{}"
"#,
        bins().agent.display()
    );
    let hub = Hub::start_with(&config, &[]);
    let ids: Vec<u64> = (0..4)
        .map(|_| hub.submit(&["--labels", "fresh", "--", "true"]))
        .collect();
    let mut agents = std::collections::HashSet::new();
    for id in &ids {
        let j = hub.wait_job_finished(*id, Duration::from_secs(90));
        assert_eq!(s(&j, "outcome"), "passed", "{j:#}");
        agents.insert(s(&j, "agent_id").to_string());
    }
    assert!(
        agents.len() >= 2,
        "4 jobs, 2 per instance, ran on {agents:?}"
    );
    let p = pools(&hub)[0].clone();
    assert!(
        p["instances"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| s(i, "detail").contains("max_jobs_per_instance")),
        "{p:#}"
    );
}
