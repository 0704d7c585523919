//! On-demand agents: pools that grow when matching work waits and shrink
//! when idle, with real agent processes (local provisioner, and the
//! operator's scripts for the command provisioner).

use std::time::{Duration, Instant};

use serde_json::Value;
use trunkfarm_e2e::{Hub, bins, local_pool_keys, s, temp_dir, u, wait_for};

/// Whether the tests run as root (then a `local` pool's agents run as
/// `nobody`, as `trunkfarm_e2e::local_pool_keys` says).
fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn pools(hub: &Hub) -> Vec<Value> {
    hub.cli_json(&["pool", "list", "--json", "--all"])
        .as_array()
        .unwrap()
        .clone()
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
    let (_states, keys) = local_pool_keys("burst");
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
{keys}"#
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
            let m = hub.metrics();
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
    let m = hub.metrics();
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
"{agent}" enroll --name "$TRUNKFARM_INSTANCE_NAME" --state-dir "$d" >/dev/null 2>&1
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
    let (_states, keys) = local_pool_keys("steady");
    let config = format!(
        r#"
[[pool]]
name = "steady"
provisioner = "local"
min_instances = 1
max_instances = 1
pending_grace = "0s"
{keys}"#
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
    let (_states, keys) = local_pool_keys("fresh");
    let config = format!(
        r#"
[[pool]]
name = "fresh"
provisioner = "local"
labels = ["fresh"]
max_instances = 1
max_jobs_per_instance = 2
pending_grace = "0s"
{keys}"#
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

/// The parent of `pid`, from `/proc/<pid>/stat`.
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// What [`watch_cmdlines`] saw of the hub's descendants.
#[derive(Debug, Default)]
struct Cmdlines {
    /// Command lines that held an enrollment string.
    leaked: Vec<String>,
    /// `trunkfarm-agent enroll` processes seen (the scan was in time).
    enrolls: usize,
}

/// Scans `/proc/*/cmdline` of `hub`'s descendants (`/proc/<pid>/cmdline`
/// is world-readable: `ps` shows it to every user) until `stop` is set.
fn watch_cmdlines(
    hub: u32,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Cmdlines> {
    std::thread::spawn(move || {
        let mut seen = Cmdlines::default();
        let mut enrolls = std::collections::HashSet::new();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            for entry in std::fs::read_dir("/proc").unwrap().flatten() {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|p| p.parse::<u32>().ok())
                else {
                    continue;
                };
                let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                    continue;
                };
                let args: Vec<String> = cmdline
                    .split(|b| *b == 0)
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                if !args.iter().any(|a| a.contains("tf1_") || a == "enroll") {
                    continue;
                }
                // Only the hub's own descendants: other programs on this
                // machine are not this test's business.
                let mut up = pid;
                let mut descends = false;
                for _ in 0..8 {
                    match parent_of(up) {
                        Some(p) if p == hub => {
                            descends = true;
                            break;
                        }
                        Some(p) if p > 1 => up = p,
                        _ => break,
                    }
                }
                if !descends {
                    continue;
                }
                if args.iter().any(|a| a.contains("tf1_")) {
                    seen.leaked.push(args.join(" "));
                }
                if args.iter().any(|a| a == "enroll") && enrolls.insert(pid) {
                    seen.enrolls += 1;
                }
            }
        }
        seen
    })
}

/// A job on a `local` pool's agent sees none of the hub's secrets: not the
/// hub's environment (cloud credentials, an SMTP password, the hub's own
/// `TRUNKFARM_*`), and, when the hub runs as root (its agents then run as
/// `nobody`), not the admin token, the CA key, the unsubscribe key or a
/// listing of the data dir; its work dir is outside the data dir; and no
/// process shows the pool instance's enrollment string in its command line.
///
/// The pool's agent runs with `sandbox = "none"`: what keeps the secrets
/// from the job here is the launcher alone (cleared environment, state
/// outside the data dir, another user), not bubblewrap, which would hide
/// `/var`, `/proc` of other processes and the agent's environment too.
#[test]
fn a_local_pool_job_sees_none_of_the_hubs_secrets() {
    let (states, keys) = local_pool_keys("secrets");
    // The agent through a wrapper that waits a second before it becomes
    // the agent, with the same arguments: long enough for the scan below
    // to see every command line the hub gives it.
    let agent = states.path().join("trunkfarm-agent");
    let wrapper = states.path().join("slow-agent");
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\nsleep 1\nexec {} \"$@\"\n", agent.display()),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let keys = keys.replace(
        &format!("agent_binary = \"{}\"", agent.display()),
        &format!("agent_binary = \"{}\"", wrapper.display()),
    );
    assert!(keys.contains("slow-agent"), "{keys}");
    let config = format!(
        r#"
[[pool]]
name = "secrets"
provisioner = "local"
labels = ["secrets"]
max_instances = 1
pending_grace = "0s"
idle_timeout = "1h"
sandbox = "none"
{keys}"#
    );
    let secrets = [
        ("AWS_ACCESS_KEY_ID", "AKIAE2EHUBSECRETID"),
        ("AWS_SECRET_ACCESS_KEY", "aws-secret-e2e-4f7d1c"),
        ("SMTP_PASSWORD", "smtp-password-e2e-9b2a"),
        ("TRUNKFARM_SMTP_PASSWORD", "trunkfarm-smtp-e2e-77e1"),
        ("GITHUB_TOKEN", "ghp_e2ehubsecret0123"),
    ];
    let hub = Hub::start_with(&config, &secrets);
    let data = hub.data_dir.display().to_string();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = watch_cmdlines(hub.pid(), stop.clone());

    // The job's log starts with its script: the words checked below are
    // only ever put together when the script runs ($no, "end of" env).
    let script = format!(
        r#"no=DENIED; yes=READ
echo "uid: $(id -u)"
echo "cwd: $(pwd)"
echo "---- env"; env; echo "---- end of" env
for f in {data}/admin.token {data}/tls/ca.key {data}/unsubscribe.key; do
    if cat "$f"; then echo "$yes $f"; else echo "$no $f"; fi
done
if ls -la {data}; then echo "$yes the data dir"; else echo "$no the data dir"; fi
if tr '\0' '\n' < /proc/{hub_pid}/environ; then echo "$yes the hub's environ"; else echo "$no the hub's environ"; fi
true"#,
        hub_pid = hub.pid()
    );
    let id = hub.submit(&["--labels", "secrets", "--", &script]);
    let job = hub.wait_job_finished(id, Duration::from_secs(90));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let cmdlines = watcher.join().unwrap();
    assert_eq!(s(&job, "outcome"), "passed", "{job:#}");
    let log = hub.job_log(id);
    assert!(log.contains("---- end of env"), "{log}");

    // Every check below adds what it found to `problems`, so one run shows
    // every way a secret got through.
    let mut problems = Vec::new();
    let mut check = |ok: bool, what: String| {
        if !ok {
            problems.push(what);
        }
    };
    // The enrollment string reached the agent by its standard input.
    check(
        cmdlines.leaked.is_empty(),
        format!(
            "an enrollment string in a command line: {:?}",
            cmdlines.leaked
        ),
    );
    check(
        cmdlines.enrolls > 0,
        "the scan never saw the agent enroll".into(),
    );
    // Nothing of the hub's environment.
    for (name, value) in secrets {
        check(
            !log.contains(value) && !log.contains(&format!("{name}=")),
            format!("{name} reached the job"),
        );
    }
    // Its state, and so its work dir, are the pool's, outside the data dir.
    let cwd = log
        .lines()
        .find_map(|l| l.strip_prefix("cwd: "))
        .expect("the job's directory");
    check(
        cwd.starts_with(&states.path().display().to_string()) && !cwd.starts_with(&data),
        format!("the job ran in {cwd}"),
    );
    let pool_dir = states.path().join("states/secrets");
    let instance = std::fs::read_dir(&pool_dir)
        .unwrap()
        .next()
        .expect("the instance's state dir")
        .unwrap();
    use std::os::unix::fs::MetadataExt as _;
    let meta = instance.metadata().unwrap();
    check(
        meta.mode() & 0o777 == 0o700,
        format!(
            "{} is mode {:o}",
            instance.path().display(),
            meta.mode() & 0o777
        ),
    );

    if is_root() {
        // As root the agent, and its job, run as nobody, and so cannot
        // read the hub's files or its environment.
        let nobody = "65534";
        check(
            log.contains(&format!("uid: {nobody}\n")),
            "the job did not run as nobody".into(),
        );
        let handle: u32 = s(&pools(&hub)[0]["instances"][0], "handle")
            .parse()
            .unwrap();
        let status = std::fs::read_to_string(format!("/proc/{handle}/status")).unwrap();
        let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        check(
            uid.split_whitespace().skip(1).all(|u| u == nobody),
            format!("the agent runs as {uid}"),
        );
        check(
            meta.uid().to_string() == nobody,
            format!("its state dir belongs to uid {}", meta.uid()),
        );
        for f in ["admin.token", "tls/ca.key", "unsubscribe.key"] {
            check(
                log.contains(&format!("DENIED {data}/{f}")),
                format!("{f} was read"),
            );
        }
        // Whether others may list the data dir is the hub's own business
        // (it keeps it 0700, issue 12 item 7); the pool's part is that the
        // job's user is not its owner.
        let data_meta = std::fs::metadata(&hub.data_dir).unwrap();
        check(
            data_meta.uid().to_string() != nobody,
            "the job's user owns the data dir".into(),
        );
        if data_meta.mode() & 0o005 == 0 {
            check(
                log.contains("DENIED the data dir"),
                "the data dir was listed".into(),
            );
        } else {
            eprintln!(
                "the data dir is mode {:o}, open to every user: its listing is not checked",
                data_meta.mode() & 0o777
            );
        }
        check(
            log.contains("DENIED the hub's environ"),
            "the hub's environment was read".into(),
        );
        for (name, path) in [
            ("admin.token", "admin.token"),
            ("the CA key", "tls/ca.key"),
            ("unsubscribe.key", "unsubscribe.key"),
        ] {
            let text = std::fs::read_to_string(hub.data_dir.join(path)).unwrap();
            let line = text.lines().nth(1).unwrap_or(text.as_str()).trim();
            check(
                !line.is_empty() && !log.contains(line),
                format!("{name}'s contents reached the job"),
            );
        }
    } else {
        eprintln!(
            "not root: the pool's agent runs as the hub's own user, so only bubblewrap keeps an \
             unsandboxed job from the data dir and the hub's /proc; checked the environment, the \
             command lines and the directories only"
        );
    }
    assert!(
        problems.is_empty(),
        "{problems:#?}\n---- the job's log ----\n{log}"
    );
}
