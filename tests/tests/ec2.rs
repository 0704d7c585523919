//! Pools on EC2 (`provisioner = "ec2"`), against a real EC2 API: moto's
//! server on 127.0.0.1 (see `trunkfarm_e2e::moto`). No machine ever boots
//! there, so a test that wants an instance to come up plays cloud-init: it
//! enrolls and runs an agent with what the instance's user data says.
//!
//! The test hubs set no `hub.hub_id`, so their instances carry the default
//! hub tag `trunkfarm:hub = trunkfarm`.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use trunkfarm_e2e::moto::{Moto, STOCK_AMI, without_aws_credentials};
use trunkfarm_e2e::proto::enrollment::Enrollment;
use trunkfarm_e2e::{
    Agent, Hub, KillPidFiles, Proc, bins, combined, describe, read_lossy, run_with_timeout, s,
    temp_dir, u, wait_for,
};

/// Serves `trunkfarm-agent` over HTTP on 127.0.0.1 (Python's http.server),
/// as `pool.ec2.agent_url` would.
struct Downloads {
    port: u16,
    _dir: tempfile::TempDir,
    _proc: Proc,
}

impl Downloads {
    fn serve_agent() -> Downloads {
        let dir = temp_dir("trunkfarm-e2e-ec2-downloads-");
        let files = dir.path().join("files");
        std::fs::create_dir_all(&files).unwrap();
        std::fs::copy(&bins().agent, files.join("trunkfarm-agent")).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let python = std::env::var("TRUNKFARM_E2E_PYTHON").unwrap_or_else(|_| "python3".into());
        let mut cmd = Command::new(python);
        cmd.args(["-m", "http.server", "--bind", "127.0.0.1", "--directory"])
            .arg(&files)
            .arg(port.to_string());
        let proc = Proc::spawn("http.server", cmd, &dir.path().join("http"));
        wait_for(Duration::from_secs(20), "http.server to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        Downloads {
            port,
            _dir: dir,
            _proc: proc,
        }
    }

    fn agent_url(&self) -> String {
        format!("http://127.0.0.1:{}/trunkfarm-agent", self.port)
    }
}

/// The user this test runs as.
fn whoami() -> String {
    let out = run_with_timeout(
        {
            let mut c = Command::new("id");
            c.arg("-un");
            c
        },
        Duration::from_secs(10),
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The hub tag of a hub without `hub_id`.
const HUB_TAG: &str = "trunkfarm";
/// The test's AWS credentials (moto checks none unless told to).
const KEY_ID: &str = "AKIDTRUNKFARME2E";
const SECRET: &str = "e2e-Secret/Key+NeverLogged0123456789";
const AGENT_URL: &str = "https://downloads.example.org/trunkfarm-agent";

fn creds() -> Vec<(&'static str, &'static str)> {
    vec![
        ("AWS_ACCESS_KEY_ID", KEY_ID),
        ("AWS_SECRET_ACCESS_KEY", SECRET),
    ]
}

/// A `[[pool]]` on moto; `extra` lines go into the `[[pool]]` table.
fn pool_toml(moto: &Moto, name: &str, ami: &str, extra: &str) -> String {
    pool_toml_at(moto, name, ami, AGENT_URL, extra)
}

/// [`pool_toml`] with another `agent_url`.
fn pool_toml_at(moto: &Moto, name: &str, ami: &str, agent_url: &str, extra: &str) -> String {
    format!(
        r#"
[[pool]]
name = "{name}"
provisioner = "ec2"
labels = ["{name}"]
max_instances = 2
max_parallel_jobs = 2
pending_grace = "0s"
{extra}

[pool.ec2]
region = "us-east-1"
endpoint = "{}"
ami = "{ami}"
instance_type = "t2.micro"
agent_url = "{agent_url}"
tags = {{ team = "ci-e2e" }}
"#,
        moto.endpoint()
    )
}

fn pool(hub: &Hub, name: &str) -> Value {
    hub.cli_json(&["pool", "list", "--json", "--all"])
        .as_array()
        .unwrap()
        .iter()
        .find(|p| s(p, "name") == name)
        .unwrap_or_else(|| panic!("no pool {name} in `pool list`"))
        .clone()
}

fn instances(p: &Value) -> Vec<Value> {
    p["instances"].as_array().cloned().unwrap_or_default()
}

/// Instances moto has for this hub's pool, in any of `states`.
fn tagged(moto: &Moto, pool: &str, states: &[&str]) -> Vec<String> {
    moto.instance_ids(&[
        ("tag:trunkfarm:hub", &[HUB_TAG]),
        ("tag:trunkfarm:pool", &[pool]),
        ("instance-state-name", states),
    ])
}

const LIVE: &[&str] = &["pending", "running", "stopping", "stopped"];

/// The enrollment string in a user-data script made from the default template.
fn enrollment_in(script: &str) -> String {
    let start = script
        .find("ENROLLMENT='tf1_")
        .unwrap_or_else(|| panic!("no enrollment in the user data:\n{script}"))
        + "ENROLLMENT='".len();
    let len = script[start..].find('\'').expect("closing quote");
    script[start..start + len].to_string()
}

/// What the hub itself printed (the harness's banner lines show the
/// environment it was started with, secrets included).
fn hub_output(hub: &Hub) -> String {
    hub.logs()
        .lines()
        .filter(|l| !l.starts_with("==== hub (start"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn assert_no_secrets(hub: &Hub) {
    let logs = hub_output(hub);
    assert!(!logs.contains("tf1_"), "an enrollment string was logged");
    assert!(!logs.contains(SECRET), "the AWS secret key was logged");
    assert!(
        !logs.contains("Signature="),
        "a request signature was logged"
    );
}

#[test]
fn an_instance_boots_from_its_user_data_runs_the_job_and_is_terminated_when_idle() {
    let moto = Moto::start(&[]);
    let downloads = Downloads::serve_agent();
    let agent_url = downloads.agent_url();
    let config = pool_toml_at(
        &moto,
        "cloud",
        STOCK_AMI,
        &agent_url,
        "idle_timeout = \"2s\"\nmissing_timeout = \"60s\"",
    );
    let hub = Hub::start_with(&config, &creds());
    let job = hub.submit(&["--labels", "cloud", "--", "echo ran on an ec2 instance"]);

    // The hub asks EC2 for one instance, tagged for this hub and pool...
    let id = wait_for(Duration::from_secs(30), "an instance on EC2", || {
        tagged(&moto, "cloud", LIVE).into_iter().next()
    });
    let recorded = wait_for(Duration::from_secs(10), "the instance's record", || {
        instances(&pool(&hub, "cloud"))
            .into_iter()
            .find(|i| s(i, "handle") == id)
    });
    assert_eq!(s(&recorded, "state"), "starting", "{recorded:#}");
    let name = s(&recorded, "id").to_string();
    assert!(name.starts_with("cloud-"), "{recorded:#}");
    for (tag, value) in [
        ("tag:Name", name.as_str()),
        ("tag:trunkfarm:instance", name.as_str()),
        ("tag:team", "ci-e2e"),
    ] {
        assert_eq!(
            moto.instance_ids(&[(tag, &[value])]),
            vec![id.clone()],
            "{tag} = {value}"
        );
    }
    // ...whose user data is the default template, filled in.
    let script = moto.user_data(&id);
    assert!(script.starts_with("#!/bin/sh\n"), "{script}");
    assert!(!script.contains("{{"), "a placeholder was left:\n{script}");
    for line in [
        format!("AGENT_URL='{agent_url}'"),
        "POOL='cloud'".to_string(),
        format!("NAME='{name}'"),
        "LABELS='cloud,pool-cloud'".to_string(),
        "JOBS='2'".to_string(),
    ] {
        assert!(script.contains(&line), "no {line} in:\n{script}");
    }
    let enrollment = enrollment_in(&script);
    let parsed = Enrollment::parse(&enrollment).expect("a valid enrollment string");
    assert_eq!(parsed.hub, hub.address());
    assert_eq!(
        parsed.ca_sha256.as_deref(),
        Some(hub.info.ca_sha256.as_str())
    );

    // Play cloud-init: run the user data (as root would, with the paths
    // moved to a temporary directory and the agent in the background).
    let boot = temp_dir("trunkfarm-e2e-ec2-boot-");
    let state = boot.path().join("state");
    let _kill_agent = KillPidFiles(vec![state.join("agent.pid")]);
    let script_path = boot.path().join("user-data.sh");
    std::fs::write(&script_path, &script).unwrap();
    let mut cmd = Command::new("sh");
    cmd.arg(&script_path)
        .env(
            "TRUNKFARM_AGENT_BIN",
            boot.path().join("bin/trunkfarm-agent"),
        )
        .env("TRUNKFARM_AGENT_STATE_DIR", &state)
        .env("TRUNKFARM_AGENT_LOG", boot.path().join("agent.log"))
        .env("TRUNKFARM_AGENT_USER", whoami())
        .env("TRUNKFARM_AGENT_SERVICE", "nohup");
    let out = run_with_timeout(cmd, Duration::from_secs(90));
    assert!(
        out.status.success(),
        "the user data failed:\n{}\n---- agent.log ----\n{}",
        describe(&out),
        read_lossy(&boot.path().join("agent.log"))
    );
    assert!(
        combined(&out).contains(&format!(
            "enrolled as {name} (pool cloud) and started (nohup"
        )),
        "{}",
        describe(&out)
    );
    assert!(state.join("agent.pid").is_file());
    let done = hub.wait_job_finished(job, Duration::from_secs(60));
    assert_eq!(s(&done, "outcome"), "passed", "{done:#}");
    assert!(
        hub.job_log(job).contains("ran on an ec2 instance"),
        "{}",
        hub.job_log(job)
    );
    // The enrollment string was single-use.
    let again = Agent::unenrolled("replay").try_enroll(&enrollment, &[]);
    assert!(
        !again.status.success(),
        "a spent enrollment string enrolled again"
    );

    // Idle for idle_timeout: terminated on EC2, its agent's credential revoked.
    let gone = wait_for(Duration::from_secs(40), "the idle instance to go", || {
        instances(&pool(&hub, "cloud"))
            .into_iter()
            .find(|i| s(i, "id") == name && s(i, "state") == "gone")
    });
    assert_eq!(s(&gone, "detail"), "idle");
    assert_eq!(moto.state(&id), "terminated");
    assert!(tagged(&moto, "cloud", LIVE).is_empty());
    let a = hub.agent_named(&name).expect("the instance's agent");
    assert_eq!(a["revoked"], Value::Bool(true), "{a:#}");
    assert_no_secrets(&hub);
}

#[test]
fn an_instance_that_never_connects_is_terminated_and_the_pool_backs_off() {
    let moto = Moto::start(&[]);
    let config = pool_toml(&moto, "silent", STOCK_AMI, "missing_timeout = \"3s\"");
    let hub = Hub::start_with(&config, &creds());
    let _job = hub.submit(&["--labels", "silent", "--", "true"]);
    let id = wait_for(Duration::from_secs(30), "an instance on EC2", || {
        tagged(&moto, "silent", LIVE).into_iter().next()
    });
    // Its agent never connects: after missing_timeout it is terminated and
    // counts as a failed start.
    let p = wait_for(Duration::from_secs(30), "a failed start", || {
        let p = pool(&hub, "silent");
        (u(&p, "failed_starts") >= 1).then_some(p)
    });
    assert!(
        s(&p, "last_error").contains("did not connect within 3s"),
        "{p:#}"
    );
    // (The provisioner's stop runs in the background: wait for its end.)
    wait_for(Duration::from_secs(30), "the instance to be failed", || {
        instances(&pool(&hub, "silent"))
            .into_iter()
            .find(|i| s(i, "handle") == id && s(i, "state") == "failed")
    });
    assert_eq!(moto.state(&id), "terminated");
    // Backed off: no new instance for a while, though the job still waits.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(4) {
        let p = pool(&hub, "silent");
        assert_eq!(u(&p, "failed_starts"), 1, "{p:#}");
        assert!(
            tagged(&moto, "silent", LIVE).is_empty(),
            "started again at once"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(u(&p, "next_start_at_ms") > 0, "{p:#}");
    assert_no_secrets(&hub);
}

#[test]
fn instances_tagged_for_this_hub_but_unknown_to_it_are_terminated_at_start_up() {
    let moto = Moto::start(&[]);
    // Left behind by an earlier run of this hub (its records lost)...
    let orphan = moto.run_instance(&[("trunkfarm:hub", HUB_TAG), ("trunkfarm:pool", "fleet")]);
    // ...and instances that are not this pool's to touch.
    let other_hub = moto.run_instance(&[
        ("trunkfarm:hub", "another-hub"),
        ("trunkfarm:pool", "fleet"),
    ]);
    let other_pool =
        moto.run_instance(&[("trunkfarm:hub", HUB_TAG), ("trunkfarm:pool", "elsewhere")]);
    let untagged = moto.run_instance(&[("Name", "a web server")]);
    let hub = Hub::start_with(&pool_toml(&moto, "fleet", STOCK_AMI, ""), &creds());
    wait_for(
        Duration::from_secs(30),
        "the orphan to be terminated",
        || (moto.state(&orphan) == "terminated").then_some(()),
    );
    std::thread::sleep(Duration::from_secs(1));
    for id in [&other_hub, &other_pool, &untagged] {
        assert_eq!(moto.state(id), "running", "{id} was touched");
    }
    // Nothing was started (no work waits) and nothing adopted.
    assert!(instances(&pool(&hub, "fleet")).is_empty());
    assert!(
        hub.logs()
            .contains("terminating an instance this hub does not know")
    );
}

#[test]
fn an_ec2_error_is_reported_and_backed_off() {
    let moto = Moto::start(&[("MOTO_ENABLE_AMI_VALIDATION", "true")]);
    let config = pool_toml(&moto, "badami", "ami-00000bad", "");
    let hub = Hub::start_with(&config, &creds());
    let _job = hub.submit(&["--labels", "badami", "--", "true"]);
    let p = wait_for(Duration::from_secs(30), "a failed start", || {
        let p = pool(&hub, "badami");
        (u(&p, "failed_starts") >= 1).then_some(p)
    });
    let err = s(&p, "last_error");
    assert!(
        err.contains("EC2 refused RunInstances: InvalidAMIID.NotFound")
            && err.contains("ami-00000bad")
            && err.contains("check pool.ec2.ami"),
        "{p:#}"
    );
    std::thread::sleep(Duration::from_secs(3));
    let p = pool(&hub, "badami");
    assert_eq!(
        u(&p, "failed_starts"),
        1,
        "backed off, not retried at once: {p:#}"
    );
    assert!(moto.instance_ids(&[]).is_empty());
    let text = hub.cli_ok(&["pool", "list"]);
    assert!(text.contains("1 failed start(s) in a row"), "{text}");
    assert_no_secrets(&hub);
}

#[test]
fn requests_are_really_signed_and_a_wrong_key_says_to_check_the_credentials() {
    // After three unchecked calls (which make an IAM user and its key), moto
    // checks every request's SigV4 signature against IAM.
    let moto = Moto::start(&[("INITIAL_NO_AUTH_ACTION_COUNT", "3")]);
    let (key_id, secret) = moto.create_access_key();

    let good = Hub::start_with(
        &pool_toml(&moto, "signed", STOCK_AMI, ""),
        &[
            ("AWS_ACCESS_KEY_ID", &key_id),
            ("AWS_SECRET_ACCESS_KEY", &secret),
        ],
    );
    let _job = good.submit(&["--labels", "signed", "--", "true"]);
    let started = wait_for(Duration::from_secs(30), "a started instance", || {
        let p = pool(&good, "signed");
        assert_eq!(u(&p, "failed_starts"), 0, "{p:#}");
        instances(&p)
            .into_iter()
            .find(|i| s(i, "handle").starts_with("i-"))
    });
    assert_eq!(s(&started, "state"), "starting", "{started:#}");
    assert!(!hub_output(&good).contains(&secret));

    let wrong = format!("{}x", &secret[..secret.len() - 1]);
    let bad = Hub::start_with(
        &pool_toml(&moto, "unsigned", STOCK_AMI, ""),
        &[
            ("AWS_ACCESS_KEY_ID", &key_id),
            ("AWS_SECRET_ACCESS_KEY", &wrong),
        ],
    );
    let _job = bad.submit(&["--labels", "unsigned", "--", "true"]);
    let p = wait_for(Duration::from_secs(30), "a refused start", || {
        let p = pool(&bad, "unsigned");
        (u(&p, "failed_starts") >= 1).then_some(p)
    });
    let err = s(&p, "last_error");
    assert!(
        err.contains("EC2 refused RunInstances") && err.contains("check the hub's AWS credentials"),
        "{p:#}"
    );
    assert!(!err.contains(&wrong) && !hub_output(&bad).contains(&wrong));
}

#[test]
fn a_hub_without_aws_credentials_refuses_to_start_and_says_what_to_set() {
    let moto = Moto::start(&[]);
    let dir = temp_dir("trunkfarm-e2e-ec2-nocreds-");
    let config = dir.path().join("hub.toml");
    std::fs::write(
        &config,
        format!(
            "[hub]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n\n[web]\nlisten = \"127.0.0.1:0\"\n{}",
            dir.path().join("data").display(),
            pool_toml(&moto, "cloud", STOCK_AMI, "")
        ),
    )
    .unwrap();
    let mut cmd = Command::new(&bins().hub);
    cmd.arg("serve").arg("--config").arg(&config);
    without_aws_credentials(&mut cmd, dir.path());
    let out = run_with_timeout(cmd, Duration::from_secs(30));
    let text = combined(&out);
    assert!(
        !out.status.success(),
        "the hub started without credentials:\n{text}"
    );
    assert!(
        text.contains("pool \"cloud\"")
            && text.contains("AWS_ACCESS_KEY_ID")
            && text.contains("~/.aws/credentials"),
        "{text}"
    );
}
