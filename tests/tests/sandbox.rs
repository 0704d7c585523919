//! The agent's sandbox (`sandbox = "bwrap"`), attacked by hostile jobs: a
//! real hub, a real agent under bubblewrap whose donor has a (fake) AWS key
//! and SSH key in `HOME`, and jobs, submitted through the admin API, that
//! print what they could reach. Needs bubblewrap (`apt install bubblewrap`;
//! `.ci/run` installs it): without it the agent refuses to start and these
//! tests fail saying so.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use trunkfarm_e2e::proto::v1::{JobSpec, SubmitJobRequest};
use trunkfarm_e2e::{Agent, Hub, Proc, bins, s, temp_dir};

/// The donor's secrets in its fake `HOME`.
const AWS_SECRET: &str = "AKIA-DONOR-SECRET-0123456789";
const SSH_KEY: &str = "DONOR-PRIVATE-SSH-KEY-abcdef";

/// A hub and one agent under bubblewrap, with small job limits.
struct Farm {
    hub: Hub,
    agent: Agent,
    /// The donor's `HOME`.
    home: TempDir,
    /// The running agent (killed on drop).
    _proc: Proc,
}

impl Farm {
    fn start(name: &str) -> Farm {
        Farm::start_with(name, "")
    }

    /// A farm whose donor adds `extra` to the agent's `agent.toml`.
    fn start_with(name: &str, extra: &str) -> Farm {
        assert!(
            Path::new("/usr/bin/bwrap").exists() || which("bwrap"),
            "these tests need bubblewrap: `apt install bubblewrap` (.ci/run installs it)"
        );
        let hub = Hub::start();
        let agent = Agent::enroll(&hub, name, &[]);
        std::fs::write(
            agent.state_dir.join("agent.toml"),
            format!(
                "reconnect_max_backoff = \"2s\"\nsandbox = \"bwrap\"\nmax_parallel_jobs = 2\n\
             job_memory = \"256 MiB\"\njob_processes = 64\njob_disk = \"64 MiB\"\n{extra}"
            ),
        )
        .unwrap();
        let home = temp_dir("trunkfarm-e2e-donor-home-");
        for (file, text) in [
            (".aws/credentials", AWS_SECRET),
            (".ssh/id_ed25519", SSH_KEY),
        ] {
            let path = home.path().join(file);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        let mut cmd = Command::new(&bins().agent);
        cmd.arg("run")
            .arg("--state-dir")
            .arg(&agent.state_dir)
            .env("HOME", home.path());
        let proc = Proc::spawn(
            &format!("agent {name}"),
            cmd,
            &agent.dir.path().join("agent"),
        );
        hub.wait_agents_connected(1);
        Farm {
            hub,
            agent,
            home,
            _proc: proc,
        }
    }

    /// Submits `spec` through the admin API; the job id.
    fn submit(&self, spec: JobSpec) -> u64 {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            self.hub
                .admin()
                .await
                .submit_job(SubmitJobRequest {
                    spec: Some(spec),
                    ..Default::default()
                })
                .await
                .expect("SubmitJob")
                .into_inner()
                .job_id
        })
    }

    /// Submits `commands` (with `env`) and waits for the result: the job's
    /// JSON and its log.
    fn run(&self, commands: &[&str], artifact: &str) -> (serde_json::Value, String) {
        let id = self.submit(spec(commands, artifact));
        self.finished(id)
    }

    /// Waits for job `id`: its JSON and its log.
    fn finished(&self, id: u64) -> (serde_json::Value, String) {
        let j = self.hub.wait_job_finished(id, Duration::from_secs(60));
        (j, self.hub.job_log(id))
    }
}

fn spec(commands: &[&str], artifact: &str) -> JobSpec {
    JobSpec {
        commands: commands.iter().map(|c| (*c).to_owned()).collect(),
        artifact_sha256: artifact.to_owned(),
        timeout_secs: 60,
        ..Default::default()
    }
}

fn which(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).exists()))
}

/// True while some process on this machine has `marker` in its command line.
fn process_with(marker: &str) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        std::fs::read(e.path().join("cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker))
    })
}

/// How many processes run on this machine.
fn process_count() -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .count()
}

fn assert_sandboxed(log: &str) {
    assert!(
        log.contains("[trunkfarm: sandbox: bubblewrap, no network"),
        "the job did not run under bubblewrap:\n{log}"
    );
}

#[test]
fn a_hostile_job_reaches_no_secret_no_other_job_no_network_and_leaves_nothing_running() {
    let farm = Farm::start("sb-hostile");
    let state = farm.agent.state_dir.clone();
    assert!(state.join("credential.json").exists());
    // A concurrently running job with a secret in its work directory.
    let victim = farm.submit(spec(
        &["echo VICTIM-JOB-SECRET > secret; echo ready; sleep 30"],
        "",
    ));
    let victim_secret = state.join(format!("work/job-{victim}-1/secret"));
    trunkfarm_e2e::wait_until(
        Duration::from_secs(30),
        "the victim job to write its secret",
        || victim_secret.exists(),
    );
    let marker = format!("tf-e2e-leak-{}", std::process::id());
    let hub_port = farm.hub.address().rsplit(':').next().unwrap().to_owned();
    let home = farm.home.path().display().to_string();
    let state_s = state.display().to_string();
    let hostile = [
        // The credential, relative to the work dir and by its absolute path.
        "cat $TRUNKFARM_WORK_DIR/../../credential.json".to_owned(),
        format!("cat {state_s}/credential.json"),
        // The donor's home.
        format!("cat {home}/.aws/credentials {home}/.ssh/id_ed25519 ~/.aws/credentials /root/.ssh/id_ed25519"),
        // The other job's directory and the agent's cache.
        "ls $TRUNKFARM_WORK_DIR/..; cat $TRUNKFARM_WORK_DIR/../job-*/secret".to_owned(),
        format!("cat {state_s}/work/job-{victim}-1/secret; ls {state_s}/cache/artifacts"),
        // The hub's port on this machine.
        format!(
            "python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", {hub_port}), 3); print(\"CONNECTED-\" + \"TO-HUB\")' 2>&1 | tail -1"
        ),
        // Processes that try to outlive the job.
        format!(
            "setsid sh -c 'sleep 60; : {marker}-setsid' & (setsid sh -c 'sleep 60; : {marker}-double' &); \
             nohup sh -c 'sleep 60; : {marker}-nohup' >/dev/null 2>&1 &"
        ),
        "sleep 0.5; echo hostile-done".to_owned(),
    ]
    .join("\n");
    let (j, log) = farm.run(&[&hostile], "");
    assert_sandboxed(&log);
    assert_eq!(s(&j, "outcome"), "passed", "{j:#}\n{log}");
    assert!(log.contains("hostile-done"), "{log}");
    let credential: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state.join("credential.json")).unwrap())
            .unwrap();
    let token = s(&credential, "secret").to_owned();
    assert!(
        token.len() >= 16,
        "no secret in the credential: {credential}"
    );
    for secret in [token.as_str(), AWS_SECRET, SSH_KEY, "VICTIM-JOB-SECRET"] {
        assert!(
            !log.contains(secret),
            "the job read a secret ({secret}):\n{log}"
        );
    }
    assert!(
        !log.lines().any(|l| l.trim() == format!("job-{victim}-1")),
        "the job listed the other job's directory:\n{log}"
    );
    assert!(
        !log.contains("CONNECTED-TO-HUB"),
        "the job reached the hub:\n{log}"
    );
    assert!(
        log.contains("Connection refused") || log.contains("Network is unreachable"),
        "{log}"
    );
    // Everything the job started is gone (bounded wait: killing lags).
    let deadline = Instant::now() + Duration::from_secs(5);
    while process_with(&marker) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !process_with(&marker),
        "a process of the job outlived it:\n{log}"
    );
    // The victim ran undisturbed beside it.
    let victim_job = farm.hub.job(victim);
    assert_eq!(s(&victim_job, "state"), "running", "{victim_job:#}");
    farm.hub.cli_ok(&["job", "cancel", &victim.to_string()]);
}

#[test]
fn a_job_cannot_change_the_runtime_a_later_job_runs() {
    let farm = Farm::start("sb-runtime");
    // A build under the sandbox publishes the real runtime.
    let build = farm.submit(JobSpec {
        upload_prefix: "install".into(),
        ..spec(
            &["mkdir -p \"$PREFIX/bin\" && printf '#!/bin/sh\\necho genuine-runtime\\n' > \"$PREFIX/bin/rt\" && chmod +x \"$PREFIX/bin/rt\""],
            "",
        )
    });
    let (j, log) = farm.finished(build);
    assert_eq!(s(&j, "outcome"), "passed", "{j:#}\n{log}");
    let sha = s(&j, "artifact_sha256").to_owned();
    assert_eq!(sha.len(), 64, "{j:#}");

    let marker = format!("tf-e2e-swapper-{}", std::process::id());
    let trojan = r##"printf "#!/bin/sh\necho trojan-runtime\n""##;
    let hostile = [
        format!("{trojan} > $TRUNKFARM_RUNTIME_PREFIX/bin/rt || echo write-refused"),
        "rm -f $TRUNKFARM_RUNTIME_PREFIX/bin/rt || echo remove-refused".to_owned(),
        "mv $TRUNKFARM_RUNTIME_PREFIX $TRUNKFARM_WORK_DIR/moved || echo move-refused".to_owned(),
        // A watcher that swaps the runtime of every later job it can find.
        format!(
            "setsid sh -c 'while :; do for f in \"$0\"/../job-*/runtime/bin/rt; do \
             {trojan} > \"$f\"; done; sleep 0.05; done; : {marker}' \"$TRUNKFARM_WORK_DIR\" \
             >/dev/null 2>&1 &"
        ),
        "rt".to_owned(),
    ]
    .join("\n");
    let (j, log) = farm.run(&[&hostile], &sha);
    assert_sandboxed(&log);
    assert_eq!(s(&j, "outcome"), "passed", "{j:#}\n{log}");
    for refused in ["write-refused", "remove-refused", "move-refused"] {
        assert!(log.contains(refused), "{refused} missing:\n{log}");
    }
    assert!(log.contains("genuine-runtime"), "{log}");
    assert!(!log.contains("trojan-runtime\n"), "{log}");
    let (j, log) = farm.run(&["sleep 1; rt"], &sha);
    assert_eq!(s(&j, "outcome"), "passed", "{j:#}\n{log}");
    assert!(log.contains("genuine-runtime\n"), "{log}");
    assert!(
        !log.contains("trojan-runtime\n"),
        "the later job ran a swapped runtime:\n{log}"
    );
    assert!(!process_with(&marker), "the swapper outlived its job");
}

#[test]
fn a_fork_bomb_a_memory_hog_and_a_disk_filler_are_contained_and_the_next_job_runs() {
    let farm = Farm::start("sb-limits");
    let before = process_count();
    let bomb = farm.submit(spec(&["b() { b | b & }; b; sleep 3; echo survived"], ""));
    let mut most = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while s(&farm.hub.job(bomb), "state") != "finished" && Instant::now() < deadline {
        most = most.max(process_count());
        std::thread::sleep(Duration::from_millis(20));
    }
    let (j, log) = farm.finished(bomb);
    assert_sandboxed(&log);
    assert!(
        most < before + 64 + 40,
        "the fork bomb grew the machine from {before} to {most} processes (limit 64): {j:#}\n{log}"
    );

    let (j, log) = farm.run(
        &["python3 -c 'x = bytearray(1 << 30); print(\"hog\" + \"-allocated\")'"],
        "",
    );
    assert_eq!(s(&j, "outcome"), "failed", "{j:#}\n{log}");
    assert!(!log.contains("hog-allocated"), "{log}");

    let (j, log) = farm.run(
        &[
            "for i in 1 2 3 4; do head -c 30000000 /dev/zero > f$i; done; echo filled",
            "echo second-command",
        ],
        "",
    );
    assert_eq!(s(&j, "outcome"), "failed", "{j:#}\n{log}");
    assert!(
        s(&j, "detail").contains("more than this donor's job_disk = 64.0 MiB"),
        "{j:#}\n{log}"
    );
    assert!(!log.contains("second-command\n"), "{log}");

    let (j, log) = farm.run(&["echo next-job-ran"], "");
    assert_eq!(s(&j, "outcome"), "passed", "{j:#}\n{log}");
    assert!(log.contains("next-job-ran"), "{log}");
}

#[test]
fn without_bubblewrap_auto_refuses_jobs_and_says_how_to_fix_it() {
    let hub = Hub::start();
    let agent = Agent::enroll(&hub, "sb-nobwrap", &[]);
    std::fs::write(
        agent.state_dir.join("agent.toml"),
        "reconnect_max_backoff = \"2s\"\nsandbox = \"auto\"\n",
    )
    .unwrap();
    // A PATH without bubblewrap (git and sh stay reachable by absolute path).
    let empty = temp_dir("trunkfarm-e2e-nopath-");
    let mut cmd = Command::new(&bins().agent);
    cmd.arg("run")
        .arg("--state-dir")
        .arg(&agent.state_dir)
        .env("PATH", empty.path());
    let _proc = Proc::spawn("agent sb-nobwrap", cmd, &agent.dir.path().join("agent"));
    hub.wait_agents_connected(1);
    let id = hub.submit(&["--", "echo should-not-run"]);
    // It reports no usable sandbox, so the hub gives it nothing to refuse:
    // the job waits for an agent that can run it.
    std::thread::sleep(Duration::from_secs(3));
    let j = hub.cli_json(&["job", "show", &id.to_string(), "--json"]);
    assert_eq!(s(&j, "state"), "queued", "{j:#}");
    let logs = agent.logs();
    assert!(
        logs.contains("no sandbox: bubblewrap (`bwrap`) is not installed"),
        "{logs}"
    );
}

#[test]
fn a_job_gets_the_network_only_when_it_asks_and_the_donor_allows() {
    let farm = Farm::start_with("sb-network", "allow_network = true\n");
    // A service on this machine the job may reach only with the network.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            drop(conn);
        }
    });
    let connect = format!(
        "python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", {port}), 3); print(\"REACHED-\" + \"SERVICE\")' 2>&1 | tail -1"
    );
    // Submitted with the CLI, as an operator would: `--network` asks for it.
    let with = farm
        .hub
        .cli_ok(&["job", "submit", "--network", "--", &connect]);
    let without = farm.hub.cli_ok(&["job", "submit", "--", &connect]);
    let (j, log) = farm.finished(with.trim().parse().unwrap());
    assert_eq!(s(&j, "outcome"), "passed", "{j:#}\n{log}");
    assert!(
        log.contains("[trunkfarm: sandbox: bubblewrap, network,"),
        "{log}"
    );
    assert!(log.contains("REACHED-SERVICE"), "asked and allowed:\n{log}");
    let (_, log) = farm.finished(without.trim().parse().unwrap());
    assert_sandboxed(&log);
    assert!(!log.contains("REACHED-SERVICE"), "not asked for:\n{log}");
}
