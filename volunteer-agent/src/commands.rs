//! The donor's commands: `status`, `pause`, `resume` and `unenroll`.
//!
//! Each asks the running agent through the control socket
//! ([`crate::control`]); with none running, it does what it can from the
//! state directory (a pause is kept there for the next start). Each returns
//! its exit code (see `main.rs`).

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use tonic::Code;
use trunkfarm_proto::AUTHORIZATION;
use trunkfarm_proto::dial::{self, DialOptions};
use trunkfarm_proto::settings::fmt_bytes;
use trunkfarm_proto::v1::UnenrollRequest;
use trunkfarm_proto::v1::agent_service_client::AgentServiceClient;

use crate::config::AgentConfig;
use crate::control::{self, AskError, Request, Status};
use crate::credential::Credential;
use crate::donor::{self, Pause, seconds};
use crate::lock::{self, LockError, now_ms, utc};
use crate::{EXIT_FAILURE, EXIT_LOCKED, EXIT_NOT_RUNNING, EXIT_USAGE};

/// How long `unenroll` waits for a running agent to hand its jobs back
/// and stop.
const LEAVE_WAIT: Duration = Duration::from_secs(60);

/// How long `unenroll` waits for the hub's answer.
const UNENROLL_TIMEOUT: Duration = Duration::from_secs(15);

/// The credential, or the exit code after saying it is missing.
fn enrolled(dir: &Path) -> Result<Credential, u8> {
    Credential::load(dir).map_err(|e| {
        eprintln!("error: {e}");
        EXIT_USAGE
    })
}

/// `trunkfarm-agent status`.
pub(crate) async fn status(dir: &Path, json: bool) -> u8 {
    let (status, code) = match control::ask(dir, &Request::Status).await {
        Ok(answer) => match answer.status {
            Some(status) => (status, 0),
            None => {
                eprintln!(
                    "error: the agent answered without a status: {}",
                    answer.message
                );
                return EXIT_FAILURE;
            }
        },
        Err(AskError::NotRunning(_)) => {
            if let Some(holder) = lock::holder(dir) {
                eprintln!(
                    "error: {} holds {} but does not answer on its control socket",
                    holder.describe(),
                    dir.display()
                );
                return EXIT_FAILURE;
            }
            let credential = match enrolled(dir) {
                Ok(c) => c,
                Err(code) => return code,
            };
            (offline(dir, &credential), EXIT_NOT_RUNNING)
        }
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_FAILURE;
        }
    };
    if json {
        match serde_json::to_string_pretty(&status) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("error: {e}");
                return EXIT_FAILURE;
            }
        }
    } else {
        print!("{}", render(&status));
    }
    code
}

/// What the state directory tells with no agent running.
fn offline(dir: &Path, credential: &Credential) -> Status {
    let config = AgentConfig::load(&dir.join("agent.toml"), false).unwrap_or_default();
    let cache_dir = config.cache.dir_or_default(dir);
    Status {
        running: false,
        state_dir: dir.to_path_buf(),
        hub: credential.hub.clone(),
        agent_id: credential.agent_id.clone(),
        name: config
            .name
            .or_else(|| credential.name.clone())
            .unwrap_or_default(),
        paused: donor::load_pause(dir).ok().flatten(),
        last_day: donor::recent(dir).unwrap_or_default(),
        cache_bytes: files_bytes(&cache_dir),
        cache_dir,
        undelivered_results: std::fs::read_dir(dir.join("results")).map_or(0, |entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
                .count()
        }),
        ..Status::default()
    }
}

/// Bytes in the files directly in `dir` (the cache keeps its packed
/// artifacts there).
fn files_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .filter_map(Result::ok)
            .filter_map(|e| e.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum()
    })
}

/// The status in plain lines.
pub(crate) fn render(s: &Status) -> String {
    let mut out = String::new();
    let name = if s.name.is_empty() {
        String::new()
    } else {
        format!(" ({})", s.name)
    };
    if s.running {
        let _ = writeln!(
            out,
            "Agent {}{name}: running (pid {}, since {}) on {}.",
            s.agent_id,
            s.pid.unwrap_or_default(),
            utc(s.started_ms.unwrap_or_default()),
            s.state_dir.display()
        );
        match s.connected_since_ms {
            Some(since) if s.connected => {
                let _ = writeln!(out, "Hub: {}, connected since {}.", s.hub, utc(since));
            }
            _ => {
                let _ = writeln!(out, "Hub: {}, not connected now (it retries).", s.hub);
            }
        }
    } else {
        let _ = writeln!(
            out,
            "Agent {}{name}: not running (state in {}).",
            s.agent_id,
            s.state_dir.display()
        );
        let _ = writeln!(out, "Hub: {}.", s.hub);
    }
    match &s.paused {
        Some(p) => {
            let _ = writeln!(
                out,
                "Paused: {} (`trunkfarm-agent resume` ends it).",
                p.describe()
            );
        }
        None if s.draining => {
            let _ = writeln!(out, "Draining: it finishes its jobs, then stops.");
        }
        None if s.unavailable.is_some() => {
            let _ = writeln!(
                out,
                "Takes work: not now: {}.",
                s.unavailable.as_deref().unwrap_or_default()
            );
        }
        None if s.running => {
            let _ = writeln!(out, "Takes work: yes.");
        }
        None => {}
    }
    if s.running {
        if s.jobs.is_empty() {
            let _ = writeln!(out, "Running now: nothing.");
        } else {
            let _ = writeln!(out, "Running now:");
            for j in &s.jobs {
                let _ = writeln!(
                    out,
                    "  job {} (attempt {}): {}, since {} ({}).",
                    j.job_id,
                    j.attempt,
                    j.what(),
                    utc(j.started_ms),
                    seconds(now_ms().saturating_sub(j.started_ms))
                );
            }
        }
    }
    let total: u64 = s.last_day.iter().map(|j| j.duration_ms).sum();
    let mut outcomes: Vec<(&str, usize)> = Vec::new();
    for j in &s.last_day {
        match outcomes.iter_mut().find(|(o, _)| *o == j.outcome) {
            Some((_, n)) => *n += 1,
            None => outcomes.push((&j.outcome, 1)),
        }
    }
    if s.last_day.is_empty() {
        let _ = writeln!(out, "In the last 24 hours: no job.");
    } else {
        let counts: Vec<String> = outcomes.iter().map(|(o, n)| format!("{n} {o}")).collect();
        let _ = writeln!(
            out,
            "In the last 24 hours: {} job(s) ({}), {} of job time:",
            s.last_day.len(),
            counts.join(", "),
            seconds(total)
        );
        for j in &s.last_day {
            let _ = writeln!(
                out,
                "  {} job {}: {}: {} after {}.",
                utc(j.ended_ms),
                j.job_id,
                j.what(),
                j.outcome,
                seconds(j.duration_ms)
            );
        }
    }
    let _ = writeln!(
        out,
        "Cache: {} in {}.",
        fmt_bytes(s.cache_bytes),
        s.cache_dir.display()
    );
    if s.undelivered_results > 0 {
        let _ = writeln!(
            out,
            "Results not yet delivered to the hub: {}.",
            s.undelivered_results
        );
    }
    out
}

/// `trunkfarm-agent pause`.
pub(crate) async fn pause(dir: &Path, for_: Option<Duration>, now: bool) -> u8 {
    let for_secs = for_.map(|d| d.as_secs().max(1));
    match control::ask(dir, &Request::Pause { for_secs, now }).await {
        Ok(answer) => {
            println!("{}", answer.message);
            0
        }
        Err(AskError::NotRunning(_)) => {
            if let Err(code) = enrolled(dir) {
                return code;
            }
            let since_ms = now_ms();
            let pause = Pause {
                since_ms,
                until_ms: for_secs.map(|s| since_ms.saturating_add(s.saturating_mul(1000))),
            };
            if let Err(e) = donor::save_pause(dir, Some(&pause)) {
                eprintln!("error: cannot keep the pause in {}: {e}", dir.display());
                return EXIT_FAILURE;
            }
            println!(
                "No agent runs on {}; it will start {}.",
                dir.display(),
                pause.describe()
            );
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            EXIT_FAILURE
        }
    }
}

/// `trunkfarm-agent resume`.
pub(crate) async fn resume(dir: &Path) -> u8 {
    match control::ask(dir, &Request::Resume).await {
        Ok(answer) => {
            println!("{}", answer.message);
            0
        }
        Err(AskError::NotRunning(_)) => {
            if let Err(code) = enrolled(dir) {
                return code;
            }
            if let Err(e) = donor::save_pause(dir, None) {
                eprintln!("error: cannot remove the pause in {}: {e}", dir.display());
                return EXIT_FAILURE;
            }
            println!(
                "No agent runs on {}; it will take work when it starts.",
                dir.display()
            );
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            EXIT_FAILURE
        }
    }
}

/// `trunkfarm-agent unenroll`: a running agent hands its jobs back and
/// stops; then the hub revokes the credential and the local state goes.
/// With the hub unreachable nothing is deleted (unless `force`).
pub(crate) async fn unenroll(dir: &Path, force: bool) -> u8 {
    let credential = match enrolled(dir) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let _lock = match take_over(dir).await {
        Ok(lock) => lock,
        Err(code) => return code,
    };
    match tell_hub(&credential).await {
        Ok(requeued) => {
            println!(
                "The hub at {} revoked this agent ({}){}.",
                credential.hub,
                credential.agent_id,
                match requeued {
                    0 => String::new(),
                    n => format!("; {n} job(s) it held were requeued"),
                }
            );
        }
        Err(HubAnswer::Refused(message)) => {
            println!(
                "The hub at {} already refuses this agent's credential ({message}).",
                credential.hub
            );
        }
        Err(HubAnswer::Unreachable(message)) => {
            let remains = format!(
                "the hub still lists this agent ({}) with a valid credential; ask its operator to \
                 run `trunkfarm agent revoke {}`",
                credential.agent_id, credential.agent_id
            );
            if !force {
                eprintln!(
                    "error: cannot tell the hub at {}: {message}. Nothing was deleted: run \
                     `trunkfarm-agent unenroll` again when the hub is reachable, or pass --force \
                     to delete the local state anyway ({remains}).",
                    credential.hub
                );
                return EXIT_FAILURE;
            }
            eprintln!(
                "warning: cannot tell the hub at {}: {message}; deleting the local state anyway \
                 (--force): {remains}.",
                credential.hub
            );
        }
    }
    match delete_state(dir) {
        Ok(()) => {
            println!(
                "Deleted the agent's state in {} (your settings agent.toml, if any, are kept).",
                dir.display()
            );
            0
        }
        Err(e) => {
            eprintln!(
                "error: the agent is unenrolled, but its state in {} could not be deleted: {e}",
                dir.display()
            );
            EXIT_FAILURE
        }
    }
}

/// Takes the state directory's lock, asking a running agent to hand its
/// jobs back and stop first.
async fn take_over(dir: &Path) -> Result<lock::StateLock, u8> {
    match lock::acquire(dir, "unenroll") {
        Ok(lock) => return Ok(lock),
        Err(LockError::Held {
            holder: Some(holder),
            ..
        }) if holder.command == "run" => match control::ask(dir, &Request::Leave).await {
            Ok(answer) => println!("{}", answer.message),
            Err(e) => {
                eprintln!("error: {e}; stop {} first", holder.describe());
                return Err(EXIT_FAILURE);
            }
        },
        Err(e @ LockError::Held { .. }) => {
            eprintln!("error: {e}");
            return Err(EXIT_LOCKED);
        }
        Err(e) => {
            eprintln!("error: {e}");
            return Err(EXIT_FAILURE);
        }
    }
    let deadline = Instant::now() + LEAVE_WAIT;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        match lock::acquire(dir, "unenroll") {
            Ok(lock) => return Ok(lock),
            Err(e @ LockError::Held { .. }) if Instant::now() >= deadline => {
                eprintln!(
                    "error: the agent did not stop within {}s ({e}); nothing was revoked",
                    LEAVE_WAIT.as_secs()
                );
                return Err(EXIT_FAILURE);
            }
            Err(LockError::Held { .. }) => {}
            Err(e) => {
                eprintln!("error: {e}");
                return Err(EXIT_FAILURE);
            }
        }
    }
}

/// How the hub answered `Unenroll`.
enum HubAnswer {
    /// It refuses the credential already (revoked or unknown).
    Refused(String),
    /// It could not be reached or failed.
    Unreachable(String),
}

/// Asks the hub to revoke this agent; how many jobs it requeued.
async fn tell_hub(credential: &Credential) -> Result<usize, HubAnswer> {
    let bearer = credential
        .bearer()
        .map_err(|e| HubAnswer::Unreachable(e.to_string()))?;
    let opts = DialOptions::default();
    let call = async {
        let channel = dial::connect(&credential.hub, &credential.trust(), &opts)
            .await
            .map_err(|e| HubAnswer::Unreachable(e.to_string()))?;
        let mut client = AgentServiceClient::new(channel);
        let mut request = tonic::Request::new(UnenrollRequest {});
        request.metadata_mut().insert(AUTHORIZATION, bearer);
        match client.unenroll(request).await {
            Ok(response) => Ok(response.into_inner().requeued.len()),
            Err(s) if matches!(s.code(), Code::Unauthenticated | Code::PermissionDenied) => {
                Err(HubAnswer::Refused(crate::enroll::status_message(&s)))
            }
            Err(s) => Err(HubAnswer::Unreachable(crate::enroll::status_message(&s))),
        }
    };
    tokio::time::timeout(UNENROLL_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| {
            Err(HubAnswer::Unreachable(format!(
                "no answer within {}s",
                UNENROLL_TIMEOUT.as_secs()
            )))
        })
}

/// Deletes everything in the state directory but the donor's settings.
fn delete_state(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name() == "agent.toml" {
            continue;
        }
        crate::fsutil::remove_tree(&entry.path())?;
    }
    Ok(())
}
