//! Trust and credentials: the CA pin, enrollment token rules, agent
//! revocation, strict hub config, and secrets kept out of logs.

use std::process::Command;
use std::time::Duration;

use trunkfarm_e2e::proto::enrollment::Enrollment;
use trunkfarm_e2e::{
    Agent, Hub, bins, combined, describe, read_lossy, run_with_timeout, status_text, temp_dir,
};

/// The secret part (after the `.`) of an enrollment string's token.
fn secret_of(enrollment: &str) -> String {
    let e = Enrollment::parse(enrollment).expect("the hub's enrollment string parses");
    let (_, secret) = e.token.split_once('.').expect("token is <id>.<secret>");
    assert!(secret.len() >= 16, "suspiciously short secret");
    secret.to_string()
}

fn token_id_of(enrollment: &str) -> String {
    Enrollment::parse(enrollment)
        .expect("the hub's enrollment string parses")
        .token_id()
        .to_string()
}

#[test]
fn enrollment_string_carries_the_hub_address_and_ca_pin() {
    let hub = Hub::start();
    let s = hub.create_token(&[]);
    let e = Enrollment::parse(&s).expect("parses");
    assert_eq!(e.hub, hub.address(), "{e:?}");
    assert_eq!(
        e.ca_sha256.as_deref(),
        Some(hub.info.ca_sha256.as_str()),
        "the enrollment string must pin the CA named in hub.json"
    );
}

#[test]
fn wrong_fingerprint_is_refused_before_the_token_is_spent() {
    let hub = Hub::start();
    let good = hub.create_token(&["--uses", "1"]);
    let mut e = Enrollment::parse(&good).unwrap();
    let real = e.ca_sha256.clone().expect("TLS hub pins a CA");
    // Another valid fingerprint: the real one with every digit rotated.
    let fake: String = real
        .chars()
        .map(|c| match c {
            '0'..='8' | 'a'..='e' => char::from(c as u8 + 1),
            '9' => 'a',
            _ => '0',
        })
        .collect();
    assert_ne!(fake, real);
    e.ca_sha256 = Some(fake);
    let bad = e.encode();

    let agent = Agent::unenrolled("pin");
    let out = agent.try_enroll(&bad, &[]);
    assert!(
        !out.status.success(),
        "enrolling with a wrong CA pin succeeded:\n{}",
        describe(&out)
    );
    assert!(
        combined(&out).contains("not signed by the pinned CA"),
        "the refusal must say the hub is not signed by the pinned CA:\n{}",
        describe(&out)
    );
    // The agent did not hand the token to the impostor: it is still unused.
    let other = Agent::unenrolled("pin-retry");
    let out = other.try_enroll(&good, &[]);
    assert!(
        out.status.success(),
        "the token must still be usable after a refused TLS handshake (was it sent anyway?):\n{}",
        describe(&out)
    );
}

#[test]
fn a_second_hubs_pin_is_refused() {
    // A real second hub with its own CA: the string made by hub 2 but aimed at
    // hub 1's address must fail the pin check.
    let hub1 = Hub::start();
    let hub2 = Hub::start();
    assert_ne!(
        hub1.info.ca_sha256, hub2.info.ca_sha256,
        "two hubs share a CA"
    );
    let mut e = Enrollment::parse(&hub2.create_token(&[])).unwrap();
    e.hub = hub1.address().to_string();
    let agent = Agent::unenrolled("other-hub");
    let out = agent.try_enroll(&e.encode(), &[]);
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        combined(&out).contains("not signed by the pinned CA"),
        "{}",
        describe(&out)
    );
}

#[test]
fn expired_token_is_refused() {
    let hub = Hub::start();
    let s = hub.create_token(&["--ttl", "1s"]);
    std::thread::sleep(Duration::from_secs(2));
    let agent = Agent::unenrolled("late");
    let out = agent.try_enroll(&s, &[]);
    assert!(
        !out.status.success(),
        "an expired token enrolled:\n{}",
        describe(&out)
    );
    assert!(
        combined(&out).contains("expired"),
        "the refusal must say the token expired:\n{}",
        describe(&out)
    );
}

#[test]
fn single_use_token_cannot_be_reused() {
    let hub = Hub::start();
    let s = hub.create_token(&["--uses", "1"]);
    let _first = Agent::enroll_with(&s, "first", &[]);
    let second = Agent::unenrolled("second");
    let out = second.try_enroll(&s, &[]);
    assert!(
        !out.status.success(),
        "a used single-use token enrolled a second agent:\n{}",
        describe(&out)
    );
    assert!(
        combined(&out).contains("already been used"),
        "{}",
        describe(&out)
    );
    // Only the first agent exists.
    let names: Vec<String> = hub
        .agents()
        .iter()
        .map(|a| a["name"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(names, ["first"], "agents: {names:?}");
}

#[test]
fn multi_use_token_allows_exactly_n_enrollments() {
    let hub = Hub::start();
    let s = hub.create_token(&["--uses", "2"]);
    let _a = Agent::enroll_with(&s, "m1", &[]);
    let _b = Agent::enroll_with(&s, "m2", &[]);
    let c = Agent::unenrolled("m3");
    let out = c.try_enroll(&s, &[]);
    assert!(
        !out.status.success(),
        "a third enrollment succeeded:\n{}",
        describe(&out)
    );
    assert!(
        combined(&out).contains("already been used"),
        "{}",
        describe(&out)
    );
}

#[test]
fn revoked_token_is_refused() {
    let hub = Hub::start();
    let s = hub.create_token(&[]);
    let id = token_id_of(&s);
    hub.cli_ok(&["token", "revoke", &id]);
    let listed = hub.cli_json(&["token", "list", "--json"]);
    let entry = listed
        .as_array()
        .and_then(|a| a.iter().find(|t| t["token_id"] == id.as_str()))
        .unwrap_or_else(|| panic!("token {id} missing from `token list --json`: {listed:#}"));
    assert_eq!(entry["revoked"], true, "{entry:#}");
    let agent = Agent::unenrolled("revoked-token");
    let out = agent.try_enroll(&s, &[]);
    assert!(
        !out.status.success(),
        "a revoked token enrolled:\n{}",
        describe(&out)
    );
    assert!(combined(&out).contains("revoked"), "{}", describe(&out));
}

#[test]
fn revoked_agent_is_disconnected_and_cannot_come_back() {
    let hub = Hub::start();
    let mut a = Agent::enroll(&hub, "to-revoke", &[]);
    let mut keep = Agent::enroll(&hub, "keeper", &[]);
    a.start(&[]);
    keep.start(&[]);
    hub.wait_agents_connected(2);
    let id = a.id(&hub);
    hub.cli_ok(&["agent", "revoke", &id]);

    let status = a.wait_exit(Duration::from_secs(10));
    assert_eq!(
        status.code(),
        Some(3),
        "a revoked agent must exit with code 3, got {}:\n{}",
        status_text(&status),
        a.logs()
    );
    // It cannot reconnect.
    a.start(&[]);
    let status = a.wait_exit(Duration::from_secs(15));
    assert_eq!(
        status.code(),
        Some(3),
        "a revoked agent restarted must be refused (exit 3), got {}:\n{}",
        status_text(&status),
        a.logs()
    );
    let entry = hub
        .agent_named("to-revoke")
        .expect("revoked agent still listed");
    assert_eq!(entry["revoked"], true, "{entry:#}");
    assert_eq!(entry["connected"], false, "{entry:#}");
    // The other agent is unaffected.
    assert!(keep.is_running(), "the other agent died:\n{}", keep.logs());
    let other = hub.agent_named("keeper").unwrap();
    assert_eq!(other["connected"], true, "{other:#}");
    assert_eq!(other["revoked"], false, "{other:#}");
}

#[test]
fn unknown_config_key_stops_the_hub_naming_file_and_key() {
    let dir = temp_dir("trunkfarm-e2e-badconf-");
    let config = dir.path().join("bad-hub.toml");
    std::fs::write(
        &config,
        format!(
            "[hub]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n\n[dispatch]\nheartbeat_interval = \"1s\"\nlease_timout = \"3s\"\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(&bins().hub);
    cmd.arg("serve").arg("--config").arg(&config);
    let out = run_with_timeout(cmd, Duration::from_secs(15));
    assert!(
        !out.status.success(),
        "the hub accepted a config with an unknown key:\n{}",
        describe(&out)
    );
    let text = combined(&out);
    assert!(
        text.contains("dispatch.lease_timout"),
        "the error must name the dotted key `dispatch.lease_timout`:\n{}",
        describe(&out)
    );
    assert!(
        text.contains("bad-hub.toml"),
        "the error must name the file:\n{}",
        describe(&out)
    );
    assert!(
        !dir.path().join("data").join("hub.json").exists(),
        "the hub wrote hub.json despite a bad config"
    );
}

#[test]
fn no_secret_in_any_log() {
    // Verbose logging on purpose: secrets must not show even at debug level.
    let env = [("RUST_LOG", "debug"), ("TRUNKFARM_LOG", "debug")];
    let hub = Hub::start_with("", &env);
    let used = hub.create_token(&["--note", "used"]);
    let unused = hub.create_token(&["--note", "unused", "--labels", "x"]);
    let mut a = Agent::enroll_with(&used, "secretive", &[]);
    a.start(&[]);
    hub.wait_agents_connected(1);
    // A failed enrollment with a wrong secret (the hub sees that too).
    let mut wrong = Enrollment::parse(&unused).unwrap();
    let wrong_secret = "WrongSecretValue0123456789abcdefXYZ";
    wrong.token = format!("{}.{wrong_secret}", wrong.token_id());
    let probe = Agent::unenrolled("probe");
    let out = probe.try_enroll(&wrong.encode(), &[]);
    assert!(
        !out.status.success(),
        "a wrong secret enrolled:\n{}",
        describe(&out)
    );
    // Some traffic: a job.
    let id = hub.submit(&["--", "echo hello"]);
    let j = hub.wait_job_finished(id, Duration::from_secs(20));
    assert_eq!(j["outcome"], "passed", "{j:#}");
    // Revoke a token (by id) and list tokens: the secret is never needed.
    hub.cli_ok(&["token", "revoke", &token_id_of(&unused)]);
    let listing =
        combined(&hub.cli(&["token", "list", "--json"])) + &combined(&hub.cli(&["token", "list"]));

    let admin_token = hub.admin_token();
    let mut secrets = vec![
        ("used token secret", secret_of(&used)),
        ("unused token secret", secret_of(&unused)),
        ("wrong token secret", wrong_secret.to_string()),
        ("admin token", admin_token.clone()),
    ];
    // The agent's own credential, wherever the agent stored it: any file in
    // its state dir holding `<agent_id>.<secret>`.
    let agent_id = a.id(&hub);
    if let Some(cred) = find_credential(&a.state_dir, &agent_id) {
        secrets.push(("agent credential secret", cred));
    } else {
        eprintln!("note: no `<agent_id>.<secret>` credential found in the agent's state dir");
    }

    let mut sources: Vec<(String, String)> = hub
        .log_files()
        .iter()
        .map(|p| (p.display().to_string(), read_lossy(p)))
        .collect();
    sources.push(("agent logs".into(), a.logs()));
    sources.push(("agent enroll output of the probe".into(), combined(&out)));
    sources.push(("token list output".into(), listing));
    let hub_logs = hub.logs();
    assert!(
        hub_logs.lines().count() > 2,
        "the hub logged nothing at all, so this test proves little:\n{hub_logs}"
    );
    for (what, secret) in &secrets {
        for (src, text) in &sources {
            assert!(
                !text.contains(secret.as_str()),
                "the {what} appears in {src}"
            );
        }
    }
}

/// Looks in `dir` for text of the form `<agent_id>.<secret>` and returns the
/// secret, or a `secret = "..."` value next to the agent id.
fn find_credential(dir: &std::path::Path, agent_id: &str) -> Option<String> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in rd.flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let text = read_lossy(&p);
            let needle = format!("{agent_id}.");
            if let Some(pos) = text.find(&needle) {
                let secret: String = text[pos + needle.len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
                    .collect();
                if secret.len() >= 16 {
                    return Some(secret);
                }
            }
            for line in text.lines() {
                let l = line.trim();
                if let Some(rest) = l.strip_prefix("secret") {
                    let v = rest
                        .trim_start()
                        .trim_start_matches([':', '='])
                        .trim()
                        .trim_matches(['"', ',', '\''])
                        .to_string();
                    if v.len() >= 16 {
                        return Some(v);
                    }
                }
                if let Some(pos) = l.find("\"secret\"") {
                    let v: String = l[pos + 8..]
                        .trim_start_matches([' ', ':'])
                        .trim_start_matches('"')
                        .chars()
                        .take_while(|c| *c != '"')
                        .collect();
                    if v.len() >= 16 {
                        return Some(v);
                    }
                }
            }
        }
    }
    None
}
