//! The hub as a gRPC service (health, reflection: what `grpcurl` needs) and
//! the README's main command, `trunkfarm demo --once`.

use std::process::Command;
use std::time::Duration;

use trunkfarm_e2e::{Hub, bins, combined, run_with_timeout, temp_dir};
use trunkfarm_proto::dial::{DialOptions, HubTrust};

#[tokio::test]
async fn health_and_reflection_answer_over_tls() {
    let hub = Hub::start();
    let trust = HubTrust::PinnedCa {
        sha256: hub.info.ca_sha256.clone(),
    };
    let channel = trunkfarm_proto::dial::connect(hub.address(), &trust, &DialOptions::default())
        .await
        .expect("dial the hub");

    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for service in ["", "trunkfarm.v1.AgentService", "trunkfarm.v1.AdminService"] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("health check of {service:?}: {e}"))
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service:?}"
        );
    }

    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .expect("reflection call")
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), responses.message())
        .await
        .expect("reflection answered in time")
        .expect("reflection stream")
        .expect("one response");
    let Some(MessageResponse::ListServicesResponse(list)) = first.message_response else {
        panic!("unexpected reflection response: {first:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "trunkfarm.v1.AgentService",
        "trunkfarm.v1.AdminService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
}

#[test]
fn demo_once_runs_its_story_and_reports_it() {
    let dir = temp_dir("demo");
    let mut cmd = Command::new(&bins().hub);
    cmd.args(["demo", "--once", "--dir"])
        .arg(dir.path().join("demo"));
    let out = run_with_timeout(cmd, Duration::from_secs(120));
    let text = combined(&out);
    assert!(out.status.success(), "demo --once failed:\n{text}");
    let summary = text
        .lines()
        .find(|l| l.starts_with("demo: builds="))
        .unwrap_or_else(|| panic!("no summary line:\n{text}"));
    // Three trunk commits (green, the break, the fix), three projects each:
    // exactly the two projects using upper() go red, then are fixed; each
    // went red is re-run again and on the baseline runtime, each fixed
    // again (6 re-runs).
    assert_eq!(
        summary,
        "demo: builds=3 jobs=18 green=7 red=2 fixed=2 mails=4"
    );
    assert!(
        text.contains("textkit went red") && text.contains("greeter went red"),
        "{text}"
    );
    assert!(text.contains("newly failing: textkit.test_upper"), "{text}");
    assert!(!text.contains("mathkit went red"), "{text}");
    assert!(!text.contains("not as designed"), "{text}");
    // Running it again reuses (wipes) its own directory.
    let mut again = Command::new(&bins().hub);
    again
        .args(["demo", "--once", "--dir"])
        .arg(dir.path().join("demo"));
    assert!(
        run_with_timeout(again, Duration::from_secs(120))
            .status
            .success()
    );
}

#[test]
fn demo_refuses_a_directory_that_is_not_its_own() {
    let dir = temp_dir("demo-foreign");
    std::fs::write(dir.path().join("precious.txt"), "keep me").unwrap();
    let mut cmd = Command::new(&bins().hub);
    cmd.args(["demo", "--once", "--dir"]).arg(dir.path());
    let out = run_with_timeout(cmd, Duration::from_secs(60));
    assert!(!out.status.success());
    assert!(combined(&out).contains("was not made by an earlier run of this command"));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("precious.txt")).unwrap(),
        "keep me"
    );
}

/// An agent speaking a protocol the hub does not serve is refused at hello,
/// over a real session, with a message telling it to upgrade.
#[tokio::test]
async fn incompatible_protocol_is_refused_with_upgrade_advice() {
    use tonic::metadata::MetadataValue;
    use trunkfarm_proto::v1::agent_service_client::AgentServiceClient;
    use trunkfarm_proto::v1::{AgentMessage, Hello, agent_message};

    let hub = Hub::start();
    let agent = trunkfarm_e2e::Agent::enroll(&hub, "old-agent", &[]);
    let cred: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(agent.state_dir.join("credential.json")).unwrap(),
    )
    .unwrap();
    let bearer = format!(
        "Bearer {}.{}",
        cred["agent_id"].as_str().unwrap(),
        cred["secret"].as_str().unwrap()
    );
    let trust = HubTrust::PinnedCa {
        sha256: hub.info.ca_sha256.clone(),
    };
    for (version, advice) in [
        (0, "upgrade trunkfarm-agent"),
        (trunkfarm_proto::PROTOCOL_VERSION + 1, "newer than the hub"),
    ] {
        let channel =
            trunkfarm_proto::dial::connect(hub.address(), &trust, &DialOptions::default())
                .await
                .unwrap();
        let hello = AgentMessage {
            msg: Some(agent_message::Msg::Hello(Hello {
                protocol_version: version,
                ..Default::default()
            })),
        };
        let mut request = tonic::Request::new(tokio_stream::iter(vec![hello]));
        request.metadata_mut().insert(
            trunkfarm_proto::AUTHORIZATION,
            MetadataValue::try_from(bearer.as_str()).unwrap(),
        );
        let status = AgentServiceClient::new(channel)
            .session(request)
            .await
            .expect_err("the hub must refuse this protocol version");
        assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
        assert!(status.message().contains(advice), "{}", status.message());
    }
    // The hub still serves a current agent afterwards.
    let mut current = agent;
    current.start(&[]);
    hub.wait_agents_connected(1);
}

/// `trunkfarm <listing> | head` must end quietly when the reader closes the
/// pipe, not panic (exit 101) in `println!`.
#[test]
fn a_listing_piped_into_a_closed_reader_does_not_panic() {
    let hub = Hub::start();
    hub.cli_ok(&["token", "create"]);
    for args in [
        &["token", "list"][..],
        &["job", "list"][..],
        &["agent", "list"][..],
        &["status"][..],
    ] {
        // A pipe whose reader is gone before the command writes a byte.
        let mut fds = [0i32; 2];
        // SAFETY: pipe(2) fills the two descriptors we pass.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: closing the read end we own.
        unsafe { libc::close(fds[0]) };
        // SAFETY: the write end is ours; Stdio takes it over.
        let stdout =
            unsafe { <std::process::Stdio as std::os::fd::FromRawFd>::from_raw_fd(fds[1]) };
        let out = std::process::Command::new(&trunkfarm_e2e::bins().hub)
            .arg("--config")
            .arg(&hub.config)
            .args(args)
            .stdout(stdout)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("panicked") && out.status.code() != Some(101),
            "`trunkfarm {}` into a closed pipe: {:?}\n{stderr}",
            args.join(" "),
            out.status
        );
    }
}

/// The packaged systemd units (`config/systemd/`) are ones systemd accepts:
/// `systemd-analyze verify` reports nothing, not even an unknown key (which
/// systemd would only warn about, and ignore: a hardening line with a typo
/// protects nothing). `ExecStart=` names the binaries just built, since
/// verify checks that they exist. Skipped where systemd-analyze is missing.
#[test]
fn the_systemd_units_verify_cleanly() {
    let probe = Command::new("systemd-analyze").arg("--version").output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("skipped: systemd-analyze is not installed (Debian: apt install systemd)");
        return;
    }
    let units = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/systemd");
    let dir = temp_dir("trunkfarm-e2e-units-");
    let mut names = Vec::new();
    for (name, bin) in [
        ("trunkfarm.service", &bins().hub),
        ("trunkfarm-agent.service", &bins().agent),
    ] {
        let text = std::fs::read_to_string(units.join(name)).unwrap();
        let installed = format!(
            "/usr/local/bin/{}",
            bin.file_name().unwrap().to_string_lossy()
        );
        assert!(text.contains(&installed), "{name} does not run {installed}");
        for key in [
            "DynamicUser=yes",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "StateDirectory=",
        ] {
            assert!(text.contains(&format!("\n{key}")), "{name} has no {key}");
        }
        let path = dir.path().join(name);
        std::fs::write(&path, text.replace(&installed, &bin.display().to_string())).unwrap();
        names.push(path);
    }
    let mut cmd = Command::new("systemd-analyze");
    cmd.args(["verify", "--man=no"]).args(&names);
    let out = run_with_timeout(cmd, Duration::from_secs(60));
    assert!(
        out.status.success() && combined(&out).trim().is_empty(),
        "systemd-analyze verify:\n{}",
        combined(&out)
    );
}

/// `trunkfarm-agent service install`, the donor's third command: it writes
/// a user unit running this very binary on the enrolled state directory and
/// asks systemd to start it. Where systemctl cannot be asked (here: not on
/// PATH) the unit stays written, the exit code is 1 and the donor is told
/// the exact commands. The unit (user and system alike) is one systemd
/// accepts; an agent already running on the state directory, or one not
/// enrolled, is refused before anything is written; `uninstall` removes it.
#[test]
fn the_agent_installs_itself_as_a_systemd_service() {
    use trunkfarm_e2e::Agent;
    let hub = Hub::start();
    let mut agent = Agent::enroll(&hub, "svc", &[]);
    let config = temp_dir("trunkfarm-e2e-svc-config-");
    let no_path = temp_dir("trunkfarm-e2e-svc-path-");
    let service = |args: &[&str], state_dir: &std::path::Path| {
        let mut cmd = Command::new(&bins().agent);
        cmd.arg("service")
            .args(args)
            .arg("--state-dir")
            .arg(state_dir)
            .env("XDG_CONFIG_HOME", config.path())
            .env("PATH", no_path.path());
        run_with_timeout(cmd, Duration::from_secs(30))
    };
    let unit = config.path().join("systemd/user/trunkfarm-agent.service");
    let exec = format!(
        "ExecStart=\"{}\" run --state-dir \"{}\"",
        bins().agent.display(),
        agent.state_dir.display()
    );

    // --print shows the unit and the commands, and writes nothing.
    let out = service(&["install", "--print"], &agent.state_dir);
    assert!(out.status.success(), "{}", combined(&out));
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains(&exec), "{printed}");
    assert!(
        printed.contains("# then: systemctl --user enable --now trunkfarm-agent.service"),
        "{printed}"
    );
    assert!(!unit.exists());

    // Not enrolled: refused, nothing written.
    let stranger = temp_dir("trunkfarm-e2e-svc-stranger-");
    let out = service(&["install"], stranger.path());
    assert_eq!(out.status.code(), Some(2), "{}", combined(&out));
    assert!(combined(&out).contains("enroll"), "{}", combined(&out));
    assert!(!unit.exists());

    // An agent runs on the state directory: the service could not take it.
    agent.start(&[]);
    hub.wait_agents_connected(1);
    let out = service(&["install"], &agent.state_dir);
    assert_eq!(out.status.code(), Some(5), "{}", combined(&out));
    assert!(
        combined(&out).contains("trunkfarm-agent run (pid"),
        "{}",
        combined(&out)
    );
    assert!(!unit.exists());
    agent.sigterm();
    agent.wait_exit(Duration::from_secs(30));

    // No systemctl: the unit is written, the donor told how to start it.
    let out = service(&["install"], &agent.state_dir);
    assert_eq!(out.status.code(), Some(1), "{}", combined(&out));
    let said = combined(&out);
    assert!(said.contains("systemctl is not installed"), "{said}");
    assert!(
        said.contains(
            "start it yourself with: systemctl --user daemon-reload && systemctl --user enable \
             --now trunkfarm-agent.service"
        ),
        "{said}"
    );
    let written = std::fs::read_to_string(&unit).expect("the unit is written");
    assert!(written.contains(&exec), "{written}");

    // systemd accepts the unit it wrote, and the system unit it would write.
    let system = {
        let mut cmd = Command::new(&bins().agent);
        cmd.args(["service", "install", "--system", "--print"])
            .args(["--state-dir", "/var/lib/tf-e2e"]);
        run_with_timeout(cmd, Duration::from_secs(30))
    };
    assert!(system.status.success(), "{}", combined(&system));
    let system_text: String = String::from_utf8_lossy(&system.stdout)
        .lines()
        .filter(|l| !l.starts_with("# /etc") && !l.starts_with("# then:"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(
        system_text.contains("StateDirectory=tf-e2e\n"),
        "{system_text}"
    );
    let probe = Command::new("systemd-analyze").arg("--version").output();
    if probe.is_ok_and(|o| o.status.success()) {
        let check = temp_dir("trunkfarm-e2e-svc-verify-");
        let system_unit = check.path().join("trunkfarm-agent.service");
        std::fs::write(&system_unit, &system_text).unwrap();
        for path in [&unit, &system_unit] {
            let mut cmd = Command::new("systemd-analyze");
            cmd.args(["verify", "--man=no"]).arg(path);
            let out = run_with_timeout(cmd, Duration::from_secs(60));
            assert!(
                out.status.success() && combined(&out).trim().is_empty(),
                "systemd-analyze verify {}:\n{}",
                path.display(),
                combined(&out)
            );
        }
    } else {
        eprintln!("systemd-analyze is not installed: the units were not verified");
    }

    // Uninstall removes the unit; without systemctl it says how to stop it.
    let out = service(&["uninstall"], &agent.state_dir);
    assert_eq!(out.status.code(), Some(1), "{}", combined(&out));
    assert!(!unit.exists());
    assert!(
        combined(&out).contains("systemctl --user stop trunkfarm-agent.service"),
        "{}",
        combined(&out)
    );
    let out = service(&["uninstall"], &agent.state_dir);
    assert_eq!(out.status.code(), Some(2), "{}", combined(&out));
    assert!(
        combined(&out).contains("no user service is installed"),
        "{}",
        combined(&out)
    );
}
