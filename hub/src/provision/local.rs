//! Two provisioners that start processes: `local` runs `trunkfarm-agent` on
//! the hub's own machine (the embedded default), `command` runs the
//! operator's start/stop scripts.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Child;

use super::{Instance, Provisioner, StartSpec};

/// How long a stopped local agent may take to drain before it is killed.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(20);

/// `trunkfarm-agent` processes under `<data_dir>/pools/<pool>/<instance>/`.
pub(crate) struct Local {
    dir: PathBuf,
    agent: PathBuf,
}

impl Local {
    /// A provisioner keeping its instances under `dir`.
    pub(crate) fn new(dir: PathBuf, agent: Option<PathBuf>) -> anyhow::Result<Local> {
        let agent = match agent {
            Some(a) => a,
            None => find_agent_binary()?,
        };
        std::fs::create_dir_all(&dir)?;
        Ok(Local { dir, agent })
    }
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: kill(2) with signal 0 only checks that the process exists.
    let exists = pid > 1 && unsafe { libc::kill(pid, 0) } == 0;
    // A zombie (exited, not yet reaped by its parent) runs nothing.
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(|st| st == "Z"))
        })
        .unwrap_or(false);
    exists && !zombie
}

fn signal(pid: i32, sig: i32) {
    if pid > 1 {
        // SAFETY: kill(2) of a process this provisioner started.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

#[tonic::async_trait]
impl Provisioner for Local {
    async fn start(&self, spec: &StartSpec) -> Result<String, String> {
        let dir = self.dir.join(&spec.instance);
        let state = dir.join("state");
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let log = std::fs::File::create(dir.join("agent.log"))
            .map_err(|e| format!("cannot create the agent log: {e}"))?;
        let enrolled = tokio::process::Command::new(&self.agent)
            .arg("enroll")
            .arg(&spec.enrollment)
            .args(["--name", &spec.instance, "--state-dir"])
            .arg(&state)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.try_clone().map_err(|e| e.to_string())?)
            .status()
            .await
            .map_err(|e| format!("cannot run {}: {e}", self.agent.display()))?;
        if !enrolled.success() {
            return Err(format!(
                "the agent could not enroll ({enrolled}); see {}",
                dir.join("agent.log").display()
            ));
        }
        let child = tokio::process::Command::new(&self.agent)
            .args([
                "run",
                "--max-parallel-jobs",
                &spec.pool.max_parallel_jobs.to_string(),
                "--state-dir",
            ])
            .arg(&state)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            // Its own process group: a Ctrl-C meant for the hub does not
            // reach it; the hub stops it explicitly.
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.agent.display()))?;
        let pid = child.id().unwrap_or(0);
        let _ = std::fs::write(dir.join("pid"), pid.to_string());
        // Reap it when it exits (no zombie).
        tokio::spawn(async move {
            let mut child = child;
            let _ = child.wait().await;
        });
        Ok(pid.to_string())
    }

    async fn stop(&self, instance: &Instance) -> Result<(), String> {
        let dir = self.dir.join(&instance.id);
        let pid: i32 = instance
            .handle
            .parse()
            .ok()
            .or_else(|| {
                std::fs::read_to_string(dir.join("pid"))
                    .ok()
                    .and_then(|p| p.trim().parse().ok())
            })
            .unwrap_or(0);
        if pid_alive(pid) {
            // SIGTERM drains: running jobs finish (stopped instances are idle).
            signal(pid, libc::SIGTERM);
            let deadline = tokio::time::Instant::now() + STOP_GRACE;
            while pid_alive(pid) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            if pid_alive(pid) {
                signal(pid, libc::SIGKILL);
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    async fn list(&self, _pool: &str) -> Option<Vec<String>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).ok()?.flatten() {
            let pid = std::fs::read_to_string(entry.path().join("pid")).unwrap_or_default();
            let pid = pid.trim().to_owned();
            if pid.parse::<i32>().is_ok_and(pid_alive) {
                out.push(pid);
            } else {
                // A dead leftover: nothing runs, just clean it up.
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        Some(out)
    }
}

/// The operator's `start_command` / `stop_command`.
pub(crate) struct Command {
    pool: crate::config::PoolConfig,
}

impl Command {
    /// A provisioner running `pool`'s scripts.
    pub(crate) fn new(pool: crate::config::PoolConfig) -> Command {
        Command { pool }
    }
}

async fn run_script(
    script: &str,
    env: &[(&str, String)],
    timeout: std::time::Duration,
) -> Result<String, String> {
    let mut cmd = tokio::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot run the script: {e}"))?;
    let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(r) => r.map_err(|e| format!("the script failed to run: {e}"))?,
        Err(_) => {
            return Err(format!(
                "the script did not finish within {} (pool.command_timeout) and was killed",
                humantime::format_duration(timeout)
            ));
        }
    };
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last: Vec<&str> = stderr.lines().rev().take(3).collect();
        return Err(format!(
            "the script exited with {}: {}",
            out.status,
            last.into_iter().rev().collect::<Vec<_>>().join(" / ")
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tonic::async_trait]
impl Provisioner for Command {
    async fn start(&self, spec: &StartSpec) -> Result<String, String> {
        let script = spec.pool.start_command.clone().unwrap_or_default();
        let mut labels = spec.pool.labels.clone();
        labels.push(format!("pool-{}", spec.pool.name));
        let env = [
            ("TRUNKFARM_ENROLLMENT", spec.enrollment.clone()),
            ("TRUNKFARM_POOL", spec.pool.name.clone()),
            ("TRUNKFARM_INSTANCE_NAME", spec.instance.clone()),
            ("TRUNKFARM_LABELS", labels.join(",")),
            (
                "TRUNKFARM_MAX_PARALLEL_JOBS",
                spec.pool.max_parallel_jobs.to_string(),
            ),
        ];
        let out = run_script(&script, &env, spec.pool.command_timeout).await?;
        let id = out
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("");
        if id.is_empty() || id.len() > 256 || id.chars().any(char::is_whitespace) {
            return Err(format!(
                "the start script printed no instance id (its last line must be the id, got {id:?})"
            ));
        }
        Ok(id.to_owned())
    }

    async fn stop(&self, instance: &Instance) -> Result<(), String> {
        if instance.handle.is_empty() {
            // Its start never returned an id: nothing to stop.
            return Ok(());
        }
        let script = self.pool.stop_command.clone().unwrap_or_default();
        let env = [
            ("TRUNKFARM_INSTANCE_ID", instance.handle.clone()),
            ("TRUNKFARM_POOL", self.pool.name.clone()),
            ("TRUNKFARM_INSTANCE_NAME", instance.id.clone()),
        ];
        run_script(&script, &env, self.pool.command_timeout)
            .await
            .map(|_| ())
    }

    async fn list(&self, _pool: &str) -> Option<Vec<String>> {
        None
    }
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

/// Enrolls agent `n` as `<prefix>-agent-<n>` with its state in
/// `<dir>/agent-<n>` (log beside it) and starts it running `parallel` jobs
/// at once; the agent is killed when the returned child is dropped.
pub(crate) async fn start_agent(
    bin: &Path,
    dir: &Path,
    prefix: &str,
    n: usize,
    enrollment: &str,
    parallel: u32,
) -> anyhow::Result<Child> {
    let state = dir.join(format!("agent-{n}"));
    let log_path = dir.join(format!("agent-{n}.log"));
    let log = std::fs::File::create(&log_path)?;
    let status = tokio::process::Command::new(bin)
        .arg("enroll")
        .arg(enrollment)
        .args(["--name", &format!("{prefix}-agent-{n}"), "--state-dir"])
        .arg(&state)
        .stdout(Stdio::null())
        .stderr(log.try_clone()?)
        .status()
        .await?;
    if !status.success() {
        anyhow::bail!(
            "{prefix} agent {n} could not enroll: see {}",
            log_path.display()
        );
    }
    Ok(tokio::process::Command::new(bin)
        .args([
            "run",
            "--max-parallel-jobs",
            &parallel.to_string(),
            "--state-dir",
        ])
        .arg(&state)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()?)
}
