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
use crate::control::{self, Answer, AskError, HubStatus, Request, Status};
use crate::credential::Credential;
use crate::donor::{self, Pause, seconds};
use crate::hubs::{self, EnrolledHub};
use crate::lock::{self, LockError, now_ms, utc};
use crate::{EXIT_FAILURE, EXIT_LOCKED, EXIT_NOT_RUNNING, EXIT_USAGE};

/// How long `unenroll` waits for a running agent to hand its jobs back
/// and stop.
const LEAVE_WAIT: Duration = Duration::from_secs(60);

/// How long `unenroll` waits for the hub's answer.
const UNENROLL_TIMEOUT: Duration = Duration::from_secs(15);

/// The enrolled hubs (at least one), or the exit code after saying none is.
fn enrolled(dir: &Path) -> Result<Vec<EnrolledHub>, u8> {
    hubs::enrolled(dir).map_err(|e| {
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
            let enrolled = match enrolled(dir) {
                Ok(hubs) => hubs,
                Err(code) => return code,
            };
            (offline(dir, &enrolled), EXIT_NOT_RUNNING)
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
fn offline(dir: &Path, enrolled: &[EnrolledHub]) -> Status {
    let config = AgentConfig::load(&dir.join("agent.toml"), false).unwrap_or_default();
    let cache_dir = config.cache.dir_or_default(dir);
    let hubs: Vec<HubStatus> = enrolled
        .iter()
        .map(|h| HubStatus {
            name: h.name.clone(),
            hub: h.credential.hub.clone(),
            agent_id: h.credential.agent_id.clone(),
            share: config.hub_terms(&h.name).share,
            undelivered_results: saved_results(&h.dir.join("results")),
            ..HubStatus::default()
        })
        .collect();
    let first = &enrolled[0].credential;
    Status {
        running: false,
        state_dir: dir.to_path_buf(),
        hub: first.hub.clone(),
        agent_id: first.agent_id.clone(),
        name: config
            .name
            .clone()
            .or_else(|| first.name.clone())
            .unwrap_or_default(),
        paused: donor::load_pause(dir).ok().flatten(),
        last_day: donor::recent(dir).unwrap_or_default(),
        cache_bytes: files_bytes(&cache_dir),
        cache_dir,
        undelivered_results: hubs.iter().map(|h| h.undelivered_results).sum(),
        hubs,
        ..Status::default()
    }
}

/// Results kept in a results directory.
fn saved_results(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
            .count()
    })
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
    if s.hubs.len() > 1 {
        // One agent id per hub: the hub lines say them.
        let state = if s.running {
            format!(
                "running (pid {}, since {})",
                s.pid.unwrap_or_default(),
                utc(s.started_ms.unwrap_or_default())
            )
        } else {
            "not running".to_owned()
        };
        let _ = writeln!(
            out,
            "Agent{name}: {state} on {}, serving {} hubs:",
            s.state_dir.display(),
            s.hubs.len()
        );
        for h in &s.hubs {
            let _ = writeln!(out, "  {}", hub_line(h, s.running));
        }
    } else if s.running {
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
                    "  job {} (attempt {}){}: {}, since {} ({}).",
                    j.job_id,
                    j.attempt,
                    j.of_hub(),
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
                "  {} job {}{}: {}: {} after {}.",
                utc(j.ended_ms),
                j.job_id,
                j.of_hub(),
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

/// One hub in words: `ci` (hub:7443) as ag_1, share 2: connected since …,
/// 1 job running, 2 slots offered, 5 jobs waiting.
fn hub_line(h: &HubStatus, running: bool) -> String {
    let mut line = format!(
        "`{}` ({}) as {}, share {}",
        h.name, h.hub, h.agent_id, h.share
    );
    if !running {
        line.push('.');
    } else if let Some(why) = &h.refused {
        line.push_str(&format!(": refused this agent ({why})."));
    } else {
        match h.connected_since_ms {
            Some(since) if h.connected => {
                line.push_str(&format!(": connected since {}", utc(since)))
            }
            _ => line.push_str(": not connected now (it retries)"),
        }
        line.push_str(&format!(", {} job(s) running", h.running));
        if let Some(offered) = h.offered {
            line.push_str(&format!(", {offered} slot(s) offered"));
        }
        if let Some(backlog) = h.backlog {
            line.push_str(&format!(", {backlog} job(s) waiting for it there"));
        }
        if h.leaving {
            line.push_str(", leaving");
        } else if h.draining {
            line.push_str(", draining (it asked)");
        }
        line.push('.');
    }
    if h.undelivered_results > 0 {
        line.push_str(&format!(
            " Results not yet delivered: {}.",
            h.undelivered_results
        ));
    }
    line
}

/// `trunkfarm-agent hubs`: the enrolled hubs, with the running agent's
/// view of each when it runs.
pub(crate) async fn hubs(dir: &Path, json: bool) -> u8 {
    let enrolled = match enrolled(dir) {
        Ok(hubs) => hubs,
        Err(code) => return code,
    };
    let (hubs, running) = match control::ask(dir, &Request::Status).await {
        Ok(Answer {
            status: Some(status),
            ..
        }) => {
            // The running agent's view, plus hubs enrolled since it started.
            let mut hubs = status.hubs;
            for h in offline(dir, &enrolled).hubs {
                if !hubs.iter().any(|r| r.name == h.name) {
                    hubs.push(h);
                }
            }
            (hubs, true)
        }
        _ => (offline(dir, &enrolled).hubs, false),
    };
    if json {
        match serde_json::to_string_pretty(&hubs) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("error: {e}");
                return EXIT_FAILURE;
            }
        }
    } else {
        for h in &hubs {
            println!("{}", hub_line(h, running));
        }
        if !running {
            println!(
                "(no agent runs on {}: connections not shown)",
                dir.display()
            );
        }
    }
    0
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
/// stops (with several hubs: hands back that hub's jobs and stops serving
/// it, going on with the others); then the hub revokes the credential and
/// the local state goes (with several hubs, that hub's only). With the hub
/// unreachable nothing is deleted (unless `force`).
pub(crate) async fn unenroll(dir: &Path, force: bool, hub: Option<&str>) -> u8 {
    let enrolled = match enrolled(dir) {
        Ok(hubs) => hubs,
        Err(code) => return code,
    };
    let chosen = match hubs::choose(&enrolled, hub) {
        Ok(chosen) => chosen.clone(),
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_USAGE;
        }
    };
    let only = enrolled.len() == 1;
    let credential = &chosen.credential;
    // Held until the end (`None`: the running agent holds the state dir):
    // no `run` starts while the hub's files go.
    let lock = if only {
        match take_over(dir).await {
            Ok(lock) => Some(lock),
            Err(code) => return code,
        }
    } else {
        match leave_hub(dir, &chosen.name).await {
            Ok(lock) => lock,
            Err(code) => return code,
        }
    };
    let again = if only {
        "`trunkfarm-agent unenroll`".to_owned()
    } else if lock.is_none() {
        // The running agent left the hub already; its files stay.
        format!(
            "`trunkfarm-agent unenroll --hub {}` (the running agent no longer serves that hub; \
             it does again once restarted)",
            chosen.name
        )
    } else {
        format!("`trunkfarm-agent unenroll --hub {}`", chosen.name)
    };
    match tell_hub(credential).await {
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
                    "error: cannot tell the hub at {}: {message}. Nothing was deleted: run {again} \
                     again when the hub is reachable, or pass --force to delete the local state \
                     anyway ({remains}).",
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
    let deleted = if only {
        delete_state(dir).map(|()| {
            format!(
                "Deleted the agent's state in {} (your settings agent.toml, if any, are kept).",
                dir.display()
            )
        })
    } else {
        hubs::remove(dir, &chosen).map(|()| {
            format!(
                "Deleted hub {}'s credential and results in {}; this machine serves {} other \
                 hub(s) (`trunkfarm-agent hubs`).",
                chosen.name,
                chosen.dir.display(),
                enrolled.len() - 1
            )
        })
    };
    match deleted {
        Ok(message) => {
            println!("{message}");
            0
        }
        Err(e) => {
            eprintln!(
                "error: the agent is unenrolled from {}, but its state in {} could not be \
                 deleted: {e}",
                credential.hub,
                chosen.dir.display()
            );
            EXIT_FAILURE
        }
    }
}

/// With several hubs: makes sure no agent serves hub `name` any more. A
/// running agent is asked to hand that hub's jobs back and leave it (it
/// goes on with the others; `None`); with none running, the state
/// directory's lock is taken, so none starts meanwhile.
async fn leave_hub(dir: &Path, name: &str) -> Result<Option<lock::StateLock>, u8> {
    let request = Request::LeaveHub {
        hub: name.to_owned(),
    };
    if let Some(lock) = lock_or_ask(dir, &request).await? {
        return Ok(Some(lock));
    }
    let deadline = Instant::now() + LEAVE_WAIT;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        match control::ask(dir, &Request::Status).await {
            Ok(Answer {
                status: Some(status),
                ..
            }) if status.hubs.iter().any(|h| h.name == name) => {}
            // Left it (or stopped): nothing serves the hub any more.
            Ok(_) | Err(AskError::NotRunning(_)) => return Ok(None),
            Err(e) => {
                eprintln!("error: {e}; nothing was revoked");
                return Err(EXIT_FAILURE);
            }
        }
        if Instant::now() >= deadline {
            eprintln!(
                "error: the agent did not leave hub {name} within {}s; nothing was revoked",
                LEAVE_WAIT.as_secs()
            );
            return Err(EXIT_FAILURE);
        }
    }
}

/// Takes the state directory's lock, asking a running agent to hand its
/// jobs back and stop first.
async fn take_over(dir: &Path) -> Result<lock::StateLock, u8> {
    if let Some(lock) = lock_or_ask(dir, &Request::Leave).await? {
        return Ok(lock);
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

/// The state directory's lock for `unenroll` when no agent runs on it
/// (`Some`); else the running agent is sent `request` and its answer
/// printed (`None`: the caller waits for it to act). The exit code when
/// neither works.
async fn lock_or_ask(dir: &Path, request: &Request) -> Result<Option<lock::StateLock>, u8> {
    match lock::acquire(dir, "unenroll") {
        Ok(lock) => Ok(Some(lock)),
        Err(LockError::Held {
            holder: Some(holder),
            ..
        }) if holder.command == "run" => match control::ask(dir, request).await {
            Ok(answer) => {
                println!("{}", answer.message);
                Ok(None)
            }
            Err(e) => {
                eprintln!("error: {e}; stop {} first", holder.describe());
                Err(EXIT_FAILURE)
            }
        },
        Err(e @ LockError::Held { .. }) => {
            eprintln!("error: {e}");
            Err(EXIT_LOCKED)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Err(EXIT_FAILURE)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::donor::JobInfo;

    #[test]
    fn status_with_several_hubs_lists_each_and_names_the_hub_of_each_job() {
        let hub = |name: &str, connected: bool| HubStatus {
            name: name.into(),
            hub: format!("{name}.example:7443"),
            agent_id: format!("ag_{name}"),
            share: if name == "work" { 2 } else { 1 },
            connected,
            connected_since_ms: connected.then_some(1_777_644_000_000),
            running: usize::from(connected),
            offered: connected.then_some(2),
            backlog: connected.then_some(5),
            undelivered_results: usize::from(!connected),
            ..HubStatus::default()
        };
        let status = Status {
            running: true,
            pid: Some(42),
            started_ms: Some(1_777_644_000_000),
            state_dir: "/s".into(),
            name: "box".into(),
            jobs: vec![JobInfo {
                job_id: 7,
                attempt: 1,
                kind: "test".into(),
                project: "alpha".into(),
                started_ms: now_ms(),
                hub: "work".into(),
                ..JobInfo::default()
            }],
            hubs: vec![hub("work", true), hub("oss", false)],
            ..Status::default()
        };
        let text = render(&status);
        assert!(
            text.starts_with(
                "Agent (box): running (pid 42, since 2026-05-01 14:00:00 UTC) on /s, serving 2 \
                 hubs:\n  `work` (work.example:7443) as ag_work, share 2: connected since \
                 2026-05-01 14:00:00 UTC, 1 job(s) running, 2 slot(s) offered, 5 job(s) waiting \
                 for it there.\n  `oss` (oss.example:7443) as ag_oss, share 1: not connected \
                 now (it retries), 0 job(s) running. Results not yet delivered: 1.\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("  job 7 (attempt 1) of hub `work`: test of alpha, since "),
            "{text}"
        );
        // One hub: as before several hubs.
        let one = Status {
            hubs: vec![hub("work", true)],
            hub: "work.example:7443".into(),
            agent_id: "ag_work".into(),
            connected: true,
            connected_since_ms: Some(1_777_644_000_000),
            ..status
        };
        assert!(
            render(&one).starts_with(
                "Agent ag_work (box): running (pid 42, since 2026-05-01 14:00:00 UTC) on /s.\nHub: \
                 work.example:7443, connected since 2026-05-01 14:00:00 UTC.\n"
            ),
            "{}",
            render(&one)
        );
    }
}
