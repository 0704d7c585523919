//! Two provisioners that start processes: `local` runs `trunkfarm-agent` on
//! the hub's own machine (the embedded default), `command` runs the
//! operator's start/stop scripts; and the agent launcher they, the demo and
//! the benchmarks share.
//!
//! An agent the hub starts runs strangers' jobs, so it gets nothing of the
//! hub's: a cleared environment (the hub's may hold cloud credentials and
//! the SMTP password), state outside the hub's data dir (which holds the
//! admin token, the CA key and the unsubscribe key), another user when the
//! hub runs as root, and its enrollment string on standard input
//! (`/proc/<pid>/cmdline` is world-readable, a process's environment and
//! input are not).

use std::ffi::{CString, OsString};
use std::fs::{DirBuilder, File, OpenOptions};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::AsyncWriteExt as _;
use tokio::process::Child;

use super::{Instance, Provisioner, StartSpec};
use crate::config::{AgentSandbox, DEFAULT_POOL_USER, PoolConfig};

/// How long a stopped local agent may take to drain before it is killed.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(20);

/// The hub's variables an agent it starts keeps (besides `LC_*`): where
/// programs are, the language and the time zone. Nothing else of the hub's
/// environment, its own `TRUNKFARM_*` included, reaches an agent.
const AGENT_ENV: &[&str] = &["PATH", "LANG", "LANGUAGE", "TZ"];

/// The hub's variables the `command` scripts keep (besides `LC_*` and the
/// pool's `pass_env`): the operator's own scripts may need the hub's user
/// and home (SSH keys, a virtualisation tool's settings), never the secrets
/// the hub itself holds.
const SCRIPT_ENV: &[&str] = &["PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ"];

/// `PATH` for an agent when the hub has none.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// The variables of `vars` named in `keep` or `extra`, and the locale's
/// `LC_*`.
fn kept_env(
    vars: impl Iterator<Item = (OsString, OsString)>,
    keep: &[&str],
    extra: &[String],
) -> Vec<(OsString, OsString)> {
    vars.filter(|(k, _)| {
        let k = k.as_bytes();
        k.starts_with(b"LC_")
            || keep.iter().any(|n| n.as_bytes() == k)
            || extra.iter().any(|n| n.as_bytes() == k)
    })
    .collect()
}

/// An unprivileged user the hub switches its agents to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AgentUser {
    name: String,
    uid: u32,
    gid: u32,
}

/// `name`'s entry in the user database (`None`: no such user).
fn lookup_user(name: &str) -> Result<Option<AgentUser>, String> {
    let cname = CString::new(name).map_err(|_| format!("{name:?} is not a user name"))?;
    // SAFETY: `passwd` is plain old data (integers and pointers), valid zeroed.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 64 * 1024];
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwnam_r(3) writes only into `pwd`, `buf` (of the length
    // given) and `found`, all ours and alive for the call.
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 {
        return Err(format!(
            "cannot look up user {name:?}: {}",
            std::io::Error::from_raw_os_error(rc)
        ));
    }
    Ok((!found.is_null()).then(|| AgentUser {
        name: name.to_owned(),
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
    }))
}

/// Whether `user` may pass through (`x`) the directory or run the file that
/// `meta` describes (its supplementary groups are dropped at the switch,
/// so only its own group counts).
fn may_enter(meta: &std::fs::Metadata, user: &AgentUser) -> bool {
    let bit = if meta.uid() == user.uid {
        0o100
    } else if meta.gid() == user.gid {
        0o010
    } else {
        0o001
    };
    meta.mode() & bit != 0
}

/// Checks that `user` reaches `path` and may enter it (a directory) or run
/// it (a file): every directory above lets it through. `what` names `path`
/// in the error.
fn check_reachable(path: &Path, user: &AgentUser, what: &str) -> Result<(), String> {
    for p in path.ancestors().filter(|p| !p.as_os_str().is_empty()) {
        let meta = std::fs::metadata(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
        if !may_enter(&meta, user) {
            return Err(format!(
                "user {:?} cannot reach {what} {}: {} is mode {:o}, owned by uid {}; choose \
                 a place it can reach, or let it through that directory",
                user.name,
                path.display(),
                p.display(),
                meta.mode() & 0o7777,
                meta.uid()
            ));
        }
    }
    Ok(())
}

/// Creates the missing directories above `dir`, 0711 (passable, not
/// listable) whatever the hub's umask, owned by the hub.
fn create_parents(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let missing: Vec<&Path> = dir
        .ancestors()
        .skip(1)
        .take_while(|p| !p.as_os_str().is_empty() && !p.exists())
        .collect();
    for parent in missing.into_iter().rev() {
        match DirBuilder::new().mode(0o711).create(parent) {
            Ok(()) => std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o711))?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Creates `dir` (or takes the existing one) with `mode`, owned by `user`
/// (`None`: the hub's). Never follows a symbolic link: the directory is
/// opened with `O_NOFOLLOW` and changed through that handle, so a link a
/// job planted where an agent's directory will be cannot make a root hub
/// hand some other file to the agents' user.
fn create_owned_dir(dir: &Path, mode: u32, user: Option<&AgentUser>) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    create_parents(dir)?;
    match DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let handle = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir)
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "{} is not a directory of its own (a link?): {e}",
                    dir.display()
                ),
            )
        })?;
    if let Some(u) = user {
        std::os::unix::fs::fchown(&handle, Some(u.uid), Some(u.gid))?;
    }
    handle.set_permissions(std::fs::Permissions::from_mode(mode))
}

/// Creates `dir` (mode 0700) for `user`'s agent, or makes an existing one
/// so (see [`create_owned_dir`]).
fn create_agent_dir(dir: &Path, user: Option<&AgentUser>) -> std::io::Result<()> {
    create_owned_dir(dir, 0o700, user)
}

/// How the hub starts `trunkfarm-agent`: as whom, with what environment,
/// from which binary. The one way agents are started (pools, demo, bench).
#[derive(Debug, Clone)]
pub(crate) struct Launcher {
    bin: PathBuf,
    /// The user the agents run as (`None`: the hub's own).
    user: Option<AgentUser>,
}

impl Launcher {
    /// Agents run from `bin` as the hub's own user.
    pub(crate) fn new(bin: PathBuf) -> Launcher {
        Launcher { bin, user: None }
    }

    /// The agent binary and user for `pool`: when the hub runs as root, its
    /// `user` (default [`DEFAULT_POOL_USER`]), which must exist and be able
    /// to run the binary; otherwise the hub's own user.
    fn for_pool(pool: &PoolConfig) -> Result<Launcher, String> {
        let bin = match &pool.agent_binary {
            Some(bin) => bin.clone(),
            None => find_agent_binary().map_err(|e| e.to_string())?,
        };
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            if let Some(user) = &pool.user {
                tracing::info!(
                    pool = %pool.name,
                    "the hub does not run as root, so its agents run as its own user, not {user:?}"
                );
            }
            return Ok(Launcher::new(bin));
        }
        let name = pool.user.as_deref().unwrap_or(DEFAULT_POOL_USER);
        let user = lookup_user(name)?.ok_or_else(|| {
            format!(
                "the hub runs as root, and its agents must not: they run strangers' jobs as user \
                 {name:?}, which does not exist; create it (`useradd --system --no-create-home \
                 --shell /usr/sbin/nologin {name}`) or set `user` to another unprivileged user"
            )
        })?;
        if user.uid == 0 {
            return Err(format!(
                "user {name:?} is root (uid 0): set `user` to an unprivileged user"
            ));
        }
        check_reachable(&bin, &user, "the agent binary")?;
        Ok(Launcher {
            bin,
            user: Some(user),
        })
    }

    /// The agent command with state in `state`: a cleared environment but
    /// for [`AGENT_ENV`], `HOME` its state dir, and the agents' user.
    fn command(&self, state: &Path) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.bin);
        cmd.env_clear()
            .envs(kept_env(std::env::vars_os(), AGENT_ENV, &[]))
            .env("HOME", state)
            .current_dir(state);
        if std::env::var_os("PATH").is_none() {
            cmd.env("PATH", DEFAULT_PATH);
        }
        if let Some(u) = &self.user {
            // std also drops the supplementary groups when it switches.
            cmd.uid(u.uid).gid(u.gid);
        }
        cmd
    }

    /// Creates `state` (0700, the agents' user's) and enrolls an agent named
    /// `name` there, the string given on standard input; its messages go to
    /// `log`.
    async fn enroll(
        &self,
        enrollment: &str,
        name: &str,
        state: &Path,
        log: &File,
    ) -> Result<(), String> {
        create_agent_dir(state, self.user.as_ref())
            .map_err(|e| format!("cannot create {}: {e}", state.display()))?;
        let mut child = self
            .command(state)
            .args(["enroll", "-", "--name", name, "--state-dir"])
            .arg(state)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(log.try_clone().map_err(|e| e.to_string())?)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.bin.display()))?;
        if let Some(mut stdin) = child.stdin.take() {
            // A write error means the agent exited early: its status says why.
            let written = stdin.write_all(format!("{enrollment}\n").as_bytes()).await;
            drop(stdin);
            if let Err(e) = written {
                tracing::debug!("writing the enrollment string to the agent: {e}");
            }
        }
        let status = child
            .wait()
            .await
            .map_err(|e| format!("cannot run {}: {e}", self.bin.display()))?;
        if !status.success() {
            return Err(format!("the agent could not enroll ({status})"));
        }
        Ok(())
    }

    /// `trunkfarm-agent run` over `state`, running `parallel` jobs at once
    /// with `sandbox` (`None`: the agent's default), its messages to `log`.
    fn run(
        &self,
        state: &Path,
        parallel: u32,
        sandbox: Option<AgentSandbox>,
        log: File,
    ) -> tokio::process::Command {
        let mut cmd = self.command(state);
        cmd.args(["run", "--max-parallel-jobs", &parallel.to_string()]);
        if let Some(sandbox) = sandbox {
            cmd.args(["--sandbox", sandbox.as_arg()]);
        }
        cmd.arg("--state-dir")
            .arg(state)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        cmd
    }
}

/// A new log file (0600: it is the hub's, and may name paths) at `path`.
fn create_log(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// `trunkfarm-agent` processes: each instance's record (`pid`,
/// `agent.log`) under `<data_dir>/pools/<pool>/<instance>/`, the hub's; its
/// agent's state dir under the pool's `dir`, the agent's.
pub(crate) struct Local {
    /// The hub's side: one directory per instance.
    records: PathBuf,
    /// The agents' side: one state dir per instance.
    states: PathBuf,
    launcher: Launcher,
    sandbox: AgentSandbox,
}

impl Local {
    /// A provisioner for `pool` keeping its records under `records` (in the
    /// hub's data dir) and its agents' state dirs in `pool.local_dir`.
    /// Refuses (with what to do) when the hub runs as root and the agents'
    /// user is missing or cannot reach the binary or the directory.
    pub(crate) fn new(
        records: PathBuf,
        pool: &PoolConfig,
        data_dir: &Path,
    ) -> anyhow::Result<Local> {
        let at = |e: String| anyhow::anyhow!("pool {:?}: {e}", pool.name);
        let launcher = Launcher::for_pool(pool).map_err(at)?;
        let states = std::path::absolute(pool.local_dir(data_dir))?;
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&records)?;
        // The hub's, passable but not writable for the agents' user: no
        // agent or job can create (or plant a link at) a future instance's
        // directory.
        create_owned_dir(&states, 0o711, None)
            .map_err(|e| at(format!("cannot create {}: {e}", states.display())))?;
        if let Some(user) = &launcher.user {
            check_reachable(&states, user, "its state dirs in").map_err(at)?;
        }
        Ok(Local {
            records,
            states,
            launcher,
            sandbox: pool.sandbox,
        })
    }

    /// Removes an instance's record and state dir.
    fn remove(&self, instance: &str) {
        for dir in [self.records.join(instance), self.states.join(instance)] {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("cannot remove {}: {e}", dir.display());
                }
            }
        }
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
        let record = self.records.join(&spec.instance);
        let state = self.states.join(&spec.instance);
        DirBuilder::new()
            .mode(0o700)
            .create(&record)
            .map_err(|e| format!("cannot create {}: {e}", record.display()))?;
        let log_path = record.join("agent.log");
        let log = create_log(&log_path).map_err(|e| format!("cannot create the agent log: {e}"))?;
        self.launcher
            .enroll(&spec.enrollment, &spec.instance, &state, &log)
            .await
            .map_err(|e| format!("{e}; see {}", log_path.display()))?;
        let child = self
            .launcher
            .run(&state, spec.pool.max_parallel_jobs, Some(self.sandbox), log)
            // Its own process group: a Ctrl-C meant for the hub does not
            // reach it; the hub stops it explicitly.
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.launcher.bin.display()))?;
        let pid = child.id().unwrap_or(0);
        if let Err(e) = std::fs::write(record.join("pid"), pid.to_string()) {
            // The instance's record holds the pid too; only a restarted hub
            // looking for strays reads this file.
            tracing::warn!(instance = %spec.instance, "cannot record the agent's pid: {e}");
        }
        // Reap it when it exits (no zombie).
        tokio::spawn(async move {
            let mut child = child;
            if let Err(e) = child.wait().await {
                tracing::debug!("waiting for a pool agent: {e}");
            }
        });
        Ok(pid.to_string())
    }

    async fn stop(&self, instance: &Instance) -> Result<(), String> {
        let pid: i32 = instance
            .handle
            .parse()
            .ok()
            .or_else(|| {
                std::fs::read_to_string(self.records.join(&instance.id).join("pid"))
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
        self.remove(&instance.id);
        Ok(())
    }

    async fn list(&self, _pool: &str) -> Option<Vec<String>> {
        let mut out = Vec::new();
        // The pid files are the hub's (in its data dir): the agents, whose
        // jobs could rewrite their own state dirs, cannot name a process
        // for the hub to signal.
        for entry in std::fs::read_dir(&self.records).ok()?.flatten() {
            let pid = std::fs::read_to_string(entry.path().join("pid")).unwrap_or_default();
            let pid = pid.trim().to_owned();
            if pid.parse::<i32>().is_ok_and(pid_alive) {
                out.push(pid);
            } else {
                // A dead leftover: nothing runs, just clean it up.
                self.remove(&entry.file_name().to_string_lossy());
            }
        }
        Some(out)
    }
}

/// The operator's `start_command` / `stop_command`.
pub(crate) struct Command {
    pool: PoolConfig,
}

impl Command {
    /// A provisioner running `pool`'s scripts.
    pub(crate) fn new(pool: PoolConfig) -> Command {
        Command { pool }
    }
}

/// Runs `script` with `env` added to the hub's variables it may keep
/// ([`SCRIPT_ENV`], `LC_*`, the pool's `pass_env`), within the pool's
/// `command_timeout`. The rest of the hub's environment (cloud credentials,
/// the SMTP password) is left out: an agent the script starts in the
/// background inherits what the script has, and its jobs see it.
async fn run_script(
    script: &str,
    env: &[(&str, String)],
    pool: &PoolConfig,
) -> Result<String, String> {
    let timeout = pool.command_timeout;
    let mut cmd = tokio::process::Command::new("/bin/sh");
    cmd.env_clear()
        .envs(kept_env(std::env::vars_os(), SCRIPT_ENV, &pool.pass_env))
        .arg("-c")
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
        let out = run_script(&script, &env, &spec.pool).await?;
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
        run_script(&script, &env, &self.pool).await.map(|_| ())
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
/// at once, as this process's user with the launcher's environment; the
/// agent is killed when the returned child is dropped. For the demo and the
/// benchmarks.
pub(crate) async fn start_agent(
    bin: &Path,
    dir: &Path,
    prefix: &str,
    n: usize,
    enrollment: &str,
    parallel: u32,
    sandbox: Option<AgentSandbox>,
) -> anyhow::Result<Child> {
    let launcher = Launcher::new(bin.to_path_buf());
    let state = dir.join(format!("agent-{n}"));
    let log_path = dir.join(format!("agent-{n}.log"));
    let log = create_log(&log_path)?;
    if let Err(e) = launcher
        .enroll(enrollment, &format!("{prefix}-agent-{n}"), &state, &log)
        .await
    {
        anyhow::bail!("{prefix} agent {n}: {e}: see {}", log_path.display());
    }
    Ok(launcher
        .run(&state, parallel, sandbox, log)
        .kill_on_drop(true)
        .spawn()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn vars(names: &[&str]) -> Vec<(OsString, OsString)> {
        names
            .iter()
            .map(|n| (OsString::from(n), OsString::from(format!("value of {n}"))))
            .collect()
    }

    fn names(kept: Vec<(OsString, OsString)>) -> Vec<String> {
        kept.into_iter()
            .map(|(k, _)| k.to_string_lossy().into_owned())
            .collect()
    }

    /// The hub's environment, as an operator's might be.
    const HUB_ENV: &[&str] = &[
        "PATH",
        "HOME",
        "USER",
        "LANG",
        "LC_ALL",
        "LC_TIME",
        "TZ",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "SMTP_PASSWORD",
        "TRUNKFARM_CONFIG",
        "TRUNKFARM_SMTP_PASSWORD",
        "SSH_AUTH_SOCK",
        "LIBVIRT_DEFAULT_URI",
        "XPATH",
        "PATHX",
    ];

    #[test]
    fn an_agent_keeps_only_the_path_the_locale_and_the_time_zone() {
        let kept = names(kept_env(vars(HUB_ENV).into_iter(), AGENT_ENV, &[]));
        assert_eq!(kept, ["PATH", "LANG", "LC_ALL", "LC_TIME", "TZ"]);
    }

    #[test]
    fn a_script_keeps_its_user_and_what_the_pool_passes() {
        let pass = vec!["LIBVIRT_DEFAULT_URI".to_owned()];
        let kept = names(kept_env(vars(HUB_ENV).into_iter(), SCRIPT_ENV, &pass));
        assert_eq!(
            kept,
            [
                "PATH",
                "HOME",
                "USER",
                "LANG",
                "LC_ALL",
                "LC_TIME",
                "TZ",
                "LIBVIRT_DEFAULT_URI"
            ]
        );
    }

    #[test]
    fn users_are_looked_up_and_reachability_is_checked() {
        assert_eq!(lookup_user("no-such-user-trunkfarm").unwrap(), None);
        let root = lookup_user("root").unwrap().expect("root exists");
        assert_eq!((root.uid, root.gid), (0, 0));
        assert!(lookup_user("a\0b").is_err());

        let other = AgentUser {
            name: "other".into(),
            uid: 4_000_001,
            gid: 4_000_001,
        };
        let dir = tempfile::tempdir().unwrap();
        let inner = dir.path().join("inner");
        std::fs::create_dir(&inner).unwrap();
        let mode = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        mode(dir.path(), 0o711);
        mode(&inner, 0o755);
        check_reachable(&inner, &other, "its dir").unwrap();
        mode(dir.path(), 0o700);
        let e = check_reachable(&inner, &other, "its dir").unwrap_err();
        assert!(
            e.contains("user \"other\" cannot reach its dir")
                && e.contains(&format!("{} is mode 700", dir.path().display())),
            "{e}"
        );
    }

    /// A `local` pool with `extra` TOML keys.
    fn local_pool(extra: &str) -> PoolConfig {
        toml::from_str(&format!(
            "name = \"p\"\nprovisioner = \"local\"\nagent_binary = \"/bin/true\"\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn a_root_hub_refuses_a_missing_or_unreachable_pool_user() {
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            // Not root: nobody to switch to; the agents are the hub's user.
            let l = Launcher::for_pool(&local_pool("user = \"nobody\"")).unwrap();
            assert_eq!(l.user, None);
            return;
        }
        let e = Launcher::for_pool(&local_pool("user = \"no-such-user-trunkfarm\"")).unwrap_err();
        assert!(
            e.contains("\"no-such-user-trunkfarm\", which does not exist") && e.contains("useradd"),
            "{e}"
        );
        // The default user, where the machine has none.
        if lookup_user(DEFAULT_POOL_USER).unwrap().is_none() {
            let e = Launcher::for_pool(&local_pool("")).unwrap_err();
            assert!(e.contains(&format!("{DEFAULT_POOL_USER:?}")), "{e}");
        }
        let l = Launcher::for_pool(&local_pool("user = \"nobody\"")).unwrap();
        assert_eq!(l.user.as_ref().map(|u| u.uid), Some(65534));
        // A dir nobody cannot reach (a 0700 directory above it).
        let closed = tempfile::tempdir().unwrap();
        std::fs::set_permissions(closed.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let data = closed.path().join("data");
        let e = Local::new(
            data.join("pools/p"),
            &local_pool(&format!(
                "user = \"nobody\"\ndir = \"{}\"",
                closed.path().join("states").display()
            )),
            &data,
        )
        .err()
        .expect("an unreachable dir is refused")
        .to_string();
        assert!(
            e.starts_with("pool \"p\": user \"nobody\" cannot reach its state dirs in"),
            "{e}"
        );
    }

    #[test]
    fn a_link_planted_where_an_agents_dir_goes_is_refused_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        // SAFETY: geteuid(2) has no preconditions.
        let user = if unsafe { libc::geteuid() } == 0 {
            lookup_user("nobody").unwrap()
        } else {
            None
        };
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "the hub's").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
        let before = std::fs::metadata(&victim).unwrap();
        let planted = dir.path().join("states/pool-7");
        create_owned_dir(&dir.path().join("states"), 0o711, None).unwrap();
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        let e = create_agent_dir(&planted, user.as_ref()).unwrap_err();
        assert!(
            e.to_string().contains("is not a directory of its own"),
            "{e}"
        );
        let after = std::fs::metadata(&victim).unwrap();
        assert_eq!(
            (after.uid(), after.mode() & 0o7777),
            (before.uid(), 0o600),
            "the link's target was changed"
        );
        // The pool's dir is the hub's: passable, not writable for agents.
        let states = std::fs::metadata(dir.path().join("states")).unwrap();
        // SAFETY: geteuid(2) has no preconditions.
        assert_eq!(states.uid(), unsafe { libc::geteuid() });
        assert_eq!(states.mode() & 0o7777, 0o711);
        // A real directory is taken and handed over.
        let real = dir.path().join("states/pool-8");
        create_agent_dir(&real, user.as_ref()).unwrap();
        let meta = std::fs::metadata(&real).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o700);
        if let Some(u) = &user {
            assert_eq!(meta.uid(), u.uid);
        }
    }

    /// A stand-in for `trunkfarm-agent` in a directory anyone may enter:
    /// it writes what it was given (arguments, environment, user, the first
    /// line of its input) to `$HOME/<command>.out`.
    fn fake_agent(dir: &Path) -> PathBuf {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let bin = dir.join("trunkfarm-agent");
        std::fs::write(
            &bin,
            "#!/bin/sh\n\
             { echo \"args: $*\"; echo \"uid: $(id -u)\"; echo \"pwd: $(pwd)\";\n\
               IFS= read -r line; echo \"stdin: $line\"; env | sed 's/^/env: /'; } \
               > \"$HOME/$1.out\" 2>&1\n",
        )
        .unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        bin
    }

    #[tokio::test]
    async fn an_agent_gets_its_enrollment_on_stdin_and_nothing_of_the_hubs_environment() {
        let dir = tempfile::tempdir().unwrap();
        let bin = fake_agent(dir.path());
        // As root, the switch to an unprivileged user is exercised too.
        // SAFETY: geteuid(2) has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let user = if root {
            lookup_user("nobody").unwrap()
        } else {
            None
        };
        let launcher = Launcher {
            bin,
            user: user.clone(),
        };
        let state = dir.path().join("pool/agent-1");
        let log = create_log(&dir.path().join("agent.log")).unwrap();
        launcher
            .enroll("tf1_SECRET", "agent-1", &state, &log)
            .await
            .unwrap();
        let out = std::fs::read_to_string(state.join("enroll.out")).unwrap();
        assert!(
            out.contains(&format!(
                "args: enroll - --name agent-1 --state-dir {}\n",
                state.display()
            )),
            "{out}"
        );
        assert!(out.contains("stdin: tf1_SECRET\n"), "{out}");
        assert_eq!(out.matches("tf1_SECRET").count(), 1, "{out}");
        assert!(
            out.contains(&format!("pwd: {}\n", state.display())),
            "{out}"
        );
        // Only the allowlist, and what the shell sets itself.
        for line in out.lines().filter_map(|l| l.strip_prefix("env: ")) {
            let name = line.split('=').next().unwrap_or_default();
            assert!(
                AGENT_ENV.contains(&name)
                    || name.starts_with("LC_")
                    || ["HOME", "PWD", "OLDPWD", "SHLVL", "_"].contains(&name),
                "{name} reached the agent:\n{out}"
            );
        }
        // This test process has cargo's variables: none got through.
        assert!(std::env::vars_os().any(|(k, _)| k.as_bytes().starts_with(b"CARGO")));
        assert!(!out.contains("CARGO"), "{out}");
        assert!(
            out.contains(&format!("env: HOME={}\n", state.display())),
            "{out}"
        );
        let meta = std::fs::metadata(&state).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o700);
        let parent = std::fs::metadata(dir.path().join("pool")).unwrap();
        assert_eq!(parent.mode() & 0o777, 0o711, "passable, not listable");
        let uid = user.as_ref().map_or_else(|| meta.uid(), |u| u.uid);
        assert_eq!(meta.uid(), uid, "the state dir is the agent's");
        assert!(out.contains(&format!("uid: {uid}\n")), "{out}");

        let mut run = launcher
            .run(&state, 3, Some(AgentSandbox::None), log)
            .spawn()
            .unwrap();
        assert!(run.wait().await.unwrap().success());
        let out = std::fs::read_to_string(state.join("run.out")).unwrap();
        assert!(
            out.contains(&format!(
                "args: run --max-parallel-jobs 3 --sandbox none --state-dir {}\n",
                state.display()
            )),
            "{out}"
        );
        assert!(out.contains(&format!("uid: {uid}\n")), "{out}");
        assert!(!out.contains("CARGO"), "{out}");
    }
}
