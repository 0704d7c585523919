//! `trunkfarm demo`: a hub with two local agents and a few jobs, with no
//! config and no network. The README's first command.

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tokio::process::{Child, Command};
use trunkfarm_proto::v1::{
    CreateTokenRequest, JobSpec, ListAgentsRequest, Outcome, SubmitJobRequest,
};

use super::client;
use crate::config::HubConfig;
use crate::server::Hub;

/// Marks a directory as the demo's own, so it may be wiped on the next run.
const MARKER: &str = ".trunkfarm-demo";

/// Local agents the demo starts.
const AGENTS: usize = 2;

/// Options of `trunkfarm demo`.
#[derive(Args)]
pub struct DemoArgs {
    /// Where the demo keeps its hub and agents. An earlier demo there is
    /// wiped first; any other non-empty directory is refused.
    #[arg(long, default_value = "trunkfarm-demo")]
    dir: PathBuf,
    /// Run the scripted story, print one summary line, and exit (0 only if
    /// everything happened as designed).
    #[arg(long)]
    once: bool,
}

/// One scripted job and the outcome it must have.
struct DemoJob {
    name: &'static str,
    command: &'static str,
    timeout_secs: u64,
    expect: Outcome,
}

const JOBS: &[DemoJob] = &[
    DemoJob {
        name: "hello",
        command: "echo \"hello from $(uname -sm), job $TRUNKFARM_JOB_ID\"",
        timeout_secs: 60,
        expect: Outcome::Passed,
    },
    DemoJob {
        name: "count",
        command: "for i in 1 2 3 4 5; do echo step $i; sleep 0.2; done",
        timeout_secs: 60,
        expect: Outcome::Passed,
    },
    DemoJob {
        name: "stderr",
        command: "echo to stdout; echo to stderr >&2",
        timeout_secs: 60,
        expect: Outcome::Passed,
    },
    DemoJob {
        name: "red",
        command: "echo 'a failing test suite'; exit 3",
        timeout_secs: 60,
        expect: Outcome::Failed,
    },
    DemoJob {
        name: "hang",
        command: "echo 'this one hangs'; sleep 30",
        timeout_secs: 1,
        expect: Outcome::TimedOut,
    },
];

/// Runs the demo.
pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let dir = prepare_dir(&args.dir)?;
    let agent_bin = find_agent_binary()?;
    let config_path = dir.join("hub.toml");
    std::fs::write(
        &config_path,
        "# Written by `trunkfarm demo`.\n[hub]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"hub\"\n\n[dispatch]\nheartbeat_interval = \"2s\"\nlease_timeout = \"10s\"\n",
    )?;
    let cfg = HubConfig::load(&config_path)?;
    let hub = Hub::start(&cfg).await?;
    println!(
        "demo: hub listening on {} (data in {})",
        hub.addr,
        dir.display()
    );

    let mut admin = client::connect(&cfg).await?;
    let enrollment = admin
        .create_token(CreateTokenRequest {
            labels: vec!["demo".into()],
            uses: AGENTS as u32,
            note: "trunkfarm demo".into(),
            ..Default::default()
        })
        .await
        .map_err(super::status_error)?
        .into_inner()
        .enrollment;
    let mut agents = Vec::new();
    for n in 1..=AGENTS {
        agents.push(start_agent(&agent_bin, &dir, n, &enrollment).await?);
    }
    wait_for_agents(&mut admin, AGENTS).await?;
    println!("demo: {AGENTS} local agents connected");

    let mut ids = Vec::new();
    for job in JOBS {
        let id = admin
            .submit_job(SubmitJobRequest {
                spec: Some(JobSpec {
                    commands: vec![job.command.to_string()],
                    labels: vec!["demo".into()],
                    timeout_secs: job.timeout_secs,
                    ..Default::default()
                }),
                max_attempts: 0,
            })
            .await
            .map_err(super::status_error)?
            .into_inner()
            .job_id;
        println!("demo: submitted job {id} ({})", job.name);
        ids.push(id);
    }
    let (mut green, mut red, mut as_designed) = (0, 0, true);
    for (job, id) in JOBS.iter().zip(&ids) {
        let info = super::jobs::wait(&mut admin, *id).await?;
        let outcome = info
            .result
            .as_ref()
            .map(|r| r.outcome())
            .unwrap_or(Outcome::Unspecified);
        if outcome == Outcome::Passed {
            green += 1;
        } else {
            red += 1;
        }
        let ok = outcome == job.expect;
        as_designed &= ok;
        println!(
            "demo: job {id} ({}) {:?} on {}{}",
            job.name,
            outcome,
            info.agent_id,
            if ok { "" } else { "  <-- not as designed" }
        );
    }
    let config_arg = format!("--config {}", config_path.display());
    if !args.once {
        println!("demo: the hub keeps serving; in another terminal try:");
        println!("  trunkfarm {config_arg} agent list");
        println!("  trunkfarm {config_arg} job list");
        println!("  trunkfarm {config_arg} job run -- echo hi from an agent");
        println!("demo: press Ctrl-C to stop");
        super::shutdown_signal().await;
    }
    for mut agent in agents {
        stop_agent(&mut agent).await;
    }
    hub.shutdown().await?;
    println!(
        "demo: builds=0 jobs={} green={green} red={red} fixed=0 mails=0",
        JOBS.len()
    );
    Ok(if as_designed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Creates (or wipes an earlier demo's) directory.
fn prepare_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    if dir.exists() {
        let is_demo = dir.join(MARKER).exists();
        let empty = std::fs::read_dir(dir)?.next().is_none();
        if is_demo {
            std::fs::remove_dir_all(dir)
                .with_context(|| format!("cannot clear the earlier demo in {}", dir.display()))?;
        } else if !empty {
            anyhow::bail!(
                "{} exists and is not a trunkfarm demo directory: pass another one with --dir",
                dir.display()
            );
        }
    }
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(MARKER), "")?;
    Ok(std::fs::canonicalize(dir)?)
}

/// `trunkfarm-agent` beside this binary, or on PATH.
pub(crate) fn find_agent_binary() -> anyhow::Result<PathBuf> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("trunkfarm-agent")));
    if let Some(p) = beside.filter(|p| p.is_file()) {
        return Ok(p);
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|d| d.join("trunkfarm-agent"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "cannot find the trunkfarm-agent binary beside trunkfarm or on PATH: build both with `cargo build --release`"
            )
        })
}

async fn start_agent(bin: &Path, dir: &Path, n: usize, enrollment: &str) -> anyhow::Result<Child> {
    let state = dir.join(format!("agent-{n}"));
    let log = std::fs::File::create(dir.join(format!("agent-{n}.log")))?;
    let status = Command::new(bin)
        .arg("enroll")
        .arg(enrollment)
        .args(["--name", &format!("demo-agent-{n}"), "--state-dir"])
        .arg(&state)
        .stdout(Stdio::null())
        .stderr(log.try_clone()?)
        .status()
        .await?;
    if !status.success() {
        anyhow::bail!(
            "demo agent {n} could not enroll: see {}",
            dir.join(format!("agent-{n}.log")).display()
        );
    }
    Ok(Command::new(bin)
        .args(["run", "--max-parallel-jobs", "2", "--state-dir"])
        .arg(&state)
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()?)
}

async fn stop_agent(agent: &mut Child) {
    if let Some(pid) = agent.id() {
        // SAFETY: kill(2) with a pid we spawned; no memory is involved.
        unsafe {
            libc::kill(pid as i32, libc::SIGTERM);
        }
    }
    if tokio::time::timeout(Duration::from_secs(15), agent.wait())
        .await
        .is_err()
    {
        let _ = agent.kill().await;
    }
}

async fn wait_for_agents(admin: &mut client::AdminClient, n: usize) -> anyhow::Result<()> {
    for _ in 0..300 {
        let agents = admin
            .list_agents(ListAgentsRequest {})
            .await
            .map_err(super::status_error)?
            .into_inner()
            .agents;
        if agents.iter().filter(|a| a.connected).count() >= n {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("the demo agents did not connect within 30s: see their logs in the demo dir")
}
