//! The end-to-end harness: real `trunkfarm` and `trunkfarm-agent` processes on
//! 127.0.0.1, each in its own temporary directory, driven through the CLI and
//! the admin gRPC API.
//!
//! Rules every helper follows:
//! * every wait is bounded (a helper that times out panics with what it saw);
//! * every spawned process is SIGKILLed when its guard drops, including while
//!   a test panics (and, as a last resort, when the thread that spawned it
//!   dies: `PR_SET_PDEATHSIG`, so spawn processes from the test's own thread);
//! * when a test panics, the guards print the tail of the hub's and agents'
//!   output, so a failure comes with its evidence.
//!
//! Set `TRUNKFARM_E2E_SKIP_BUILD=1` to use already-built binaries,
//! `TRUNKFARM_E2E_BIN_DIR=/path` to take them from elsewhere, and
//! `TRUNKFARM_E2E_KEEP=1` to keep the temporary directories.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write as _};
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use trunkfarm_proto::dial::{DialOptions, HubTrust};
use trunkfarm_proto::v1::admin_service_client::AdminServiceClient;

pub use serde_json;
pub use tonic;
pub use trunkfarm_proto as proto;

pub mod browser;
pub mod farm;
pub mod git_http;
pub mod hostile;
pub mod moto;
pub mod smtp;

/// A two-thread tokio runtime for the gRPC calls of a synchronous test
/// (processes are spawned from the test's own thread, as the harness requires).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// How long a CLI command may take before the harness kills it.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a hub may take to write `hub.json` after it was started.
pub const HUB_START_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// Binaries
// ---------------------------------------------------------------------------

/// The two binaries under test.
#[derive(Debug, Clone)]
pub struct Bins {
    /// `trunkfarm`: the hub and its admin CLI.
    pub hub: PathBuf,
    /// `trunkfarm-agent`: the volunteer agent.
    pub agent: PathBuf,
}

static BINS: OnceLock<Result<Bins, String>> = OnceLock::new();

/// Builds (once per test process) and locates the binaries; panics with
/// cargo's output if they do not build.
pub fn bins() -> &'static Bins {
    init();
    match BINS.get_or_init(build_bins) {
        Ok(b) => b,
        Err(e) => panic!("the binaries under test are not available:\n{e}"),
    }
}

/// Installs the ring provider as the process default once (tonic's TLS and
/// rustls both want exactly one).
pub fn init() {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The profile directory (`target/debug`) this test executable was built
/// into, and the profile's name.
fn profile_dir() -> (PathBuf, String) {
    let exe = std::env::current_exe().expect("current_exe");
    let parent = exe.parent().expect("exe has a parent");
    let dir = if parent.file_name().is_some_and(|n| n == "deps") {
        parent.parent().expect("deps has a parent").to_path_buf()
    } else {
        parent.to_path_buf()
    };
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "debug".into());
    // Sanity: the usual layout is <target>/<profile>/deps/<exe>. If it is not,
    // fall back to CARGO_TARGET_DIR or <workspace>/target.
    if dir.join("deps").is_dir() {
        return (dir, name);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| {
            if p.is_absolute() {
                p
            } else {
                workspace_root().join(p)
            }
        })
        .unwrap_or_else(|| workspace_root().join("target"));
    (target.join("debug"), "debug".into())
}

/// The cargo target directory (`target/`) the tests were built in:
/// where test artifacts go (`target/test-artifacts/`).
pub fn target_dir() -> PathBuf {
    let (profile, _) = profile_dir();
    profile.parent().map(Path::to_path_buf).unwrap_or(profile)
}

fn build_bins() -> Result<Bins, String> {
    if let Some(dir) = std::env::var_os("TRUNKFARM_E2E_BIN_DIR") {
        let dir = PathBuf::from(dir);
        return locate(&dir);
    }
    let (dir, profile) = profile_dir();
    if std::env::var_os("TRUNKFARM_E2E_SKIP_BUILD").is_none() {
        let mut cmd = Command::new(env!("CARGO"));
        cmd.current_dir(workspace_root()).args([
            "build",
            "--bins",
            "-p",
            "trunkfarm",
            "-p",
            "trunkfarm-agent",
        ]);
        match profile.as_str() {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            other => {
                cmd.args(["--profile", other]);
            }
        }
        let started = Instant::now();
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run cargo build: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "`cargo build --bins -p trunkfarm -p trunkfarm-agent` failed ({}) after {:?}:\n{}",
                out.status,
                started.elapsed(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    locate(&dir)
}

fn locate(dir: &Path) -> Result<Bins, String> {
    let hub = dir.join("trunkfarm");
    let agent = dir.join("trunkfarm-agent");
    for b in [&hub, &agent] {
        if !b.is_file() {
            return Err(format!("{} does not exist", b.display()));
        }
    }
    Ok(Bins { hub, agent })
}

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

/// A child process whose output goes to files, SIGKILLed when dropped.
pub struct Proc {
    name: String,
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
    status: Option<ExitStatus>,
}

fn append_log(path: &Path, banner: &str) -> File {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    let _ = writeln!(f, "{banner}");
    f
}

/// Makes the child die with the thread that spawned it, and strips variables
/// that would change what the binaries under test do.
fn harden(cmd: &mut Command) {
    cmd.env_remove("TRUNKFARM_CONFIG").stdin(Stdio::null());
    // SAFETY: prctl and getppid are async-signal-safe; nothing else runs here.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            Ok(())
        });
    }
}

impl Proc {
    /// Spawns `cmd` with stdout/stderr appended to `<log_prefix>.stdout.log`
    /// and `<log_prefix>.stderr.log`.
    pub fn spawn(name: &str, mut cmd: Command, log_prefix: &Path) -> Proc {
        let stdout = log_prefix.with_extension("stdout.log");
        let stderr = log_prefix.with_extension("stderr.log");
        // The program and arguments, not the environment (it may hold secrets).
        let banner = format!(
            "==== {name}: {:?} {:?} ====",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>()
        );
        harden(&mut cmd);
        cmd.stdout(append_log(&stdout, &banner))
            .stderr(append_log(&stderr, &banner));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {name} ({cmd:?}): {e}"));
        Proc {
            name: name.to_string(),
            child,
            stdout,
            stderr,
            status: None,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` (unless the process was already reaped).
    pub fn signal(&mut self, sig: libc::c_int) {
        if self.try_wait().is_none() {
            // SAFETY: plain kill(2) on our own, not yet reaped, child.
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, sig);
            }
        }
    }

    /// SIGKILLs the process and reaps it.
    pub fn kill9(&mut self) -> ExitStatus {
        self.signal(libc::SIGKILL);
        self.wait_exit(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("{} did not die after SIGKILL", self.name))
    }

    /// The exit status, if the process has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Both output files, as text.
    pub fn logs(&self) -> String {
        format!(
            "---- {} stdout ({}) ----\n{}\n---- {} stderr ({}) ----\n{}",
            self.name,
            self.stdout.display(),
            read_lossy(&self.stdout),
            self.name,
            self.stderr.display(),
            read_lossy(&self.stderr)
        )
    }

    /// The last `n` lines of both output files.
    pub fn log_tail(&self, n: usize) -> String {
        format!(
            "---- {} stdout, last {n} lines ({}) ----\n{}\n---- {} stderr, last {n} lines ({}) ----\n{}",
            self.name,
            self.stdout.display(),
            tail(&read_lossy(&self.stdout), n),
            self.name,
            self.stderr.display(),
            tail(&read_lossy(&self.stderr), n)
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, libc::SIGKILL);
            }
            let _ = self.child.wait();
        }
    }
}

/// A file's content, lossily decoded; empty if it cannot be read.
pub fn read_lossy(path: &Path) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs `cmd` to completion, killing it after `timeout` (then panicking with
/// what it printed so far).
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Output {
    harden(&mut cmd);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {desc}: {e}"));
    let mut out_pipe = child.stdout.take().expect("stdout piped");
    let mut err_pipe = child.stderr.take().expect("stderr piped");
    let out_reader = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out_pipe.read_to_end(&mut b);
        b
    });
    let err_reader = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = err_pipe.read_to_end(&mut b);
        b
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            // The pipes close when the child dies (unless it left children
            // holding them: do not wait for the readers then).
            std::thread::sleep(Duration::from_millis(200));
            let so = if out_reader.is_finished() {
                out_reader.join().unwrap_or_default()
            } else {
                Vec::new()
            };
            let se = if err_reader.is_finished() {
                err_reader.join().unwrap_or_default()
            } else {
                Vec::new()
            };
            panic!(
                "{desc} did not finish within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&so),
                String::from_utf8_lossy(&se)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // A grandchild could keep a pipe open: bound the wait for the readers.
    let read_deadline = Instant::now() + Duration::from_secs(5);
    while !(out_reader.is_finished() && err_reader.is_finished()) && Instant::now() < read_deadline
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let stdout = if out_reader.is_finished() {
        out_reader.join().unwrap_or_default()
    } else {
        Vec::new()
    };
    let stderr = if err_reader.is_finished() {
        err_reader.join().unwrap_or_default()
    } else {
        Vec::new()
    };
    Output {
        status,
        stdout,
        stderr,
    }
}

/// stdout and stderr of an `Output`, for messages.
pub fn describe(out: &Output) -> String {
    format!(
        "status: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// stdout and stderr together, for searching.
pub fn combined(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Polls `cond` every 50 ms until it holds; panics after `timeout` with `what`.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting until {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `f` every 100 ms until it returns `Some`; panics after `timeout`,
/// with `what` and the last value `describe_last` gave.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn keep_dirs() -> bool {
    std::env::var_os("TRUNKFARM_E2E_KEEP").is_some()
}

/// A fresh temporary directory (kept when `TRUNKFARM_E2E_KEEP` is set).
pub fn temp_dir(prefix: &str) -> TempDir {
    let mut b = tempfile::Builder::new();
    b.prefix(prefix);
    if keep_dirs() {
        b.disable_cleanup(true);
    }
    b.tempdir().expect("create temp dir")
}

/// The `[[pool]]` keys a `local` pool needs under a root hub, whose
/// agents run as `nobody`: that user, a copy of the agent binary and the
/// agents' state dirs in a temporary directory it can reach (the checkout
/// itself may sit below a directory only root may enter, as `/root` is).
/// Keep the returned directory while the hub runs.
pub fn local_pool_keys(pool: &str) -> (TempDir, String) {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = temp_dir("trunkfarm-e2e-pool-");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let agent = dir.path().join("trunkfarm-agent");
    std::fs::copy(&bins().agent, &agent).expect("copy the agent binary");
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).unwrap();
    let keys = format!(
        "agent_binary = \"{}\"\nuser = \"nobody\"\ndir = \"{}\"\n",
        agent.display(),
        dir.path().join("states").join(pool).display()
    );
    (dir, keys)
}

/// Whether `pid` is gone: no such process, or a zombie (PID 1 in this sandbox
/// does not reap orphans, so a killed orphan stays a zombie).
pub fn pid_gone(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => {
            // Format: pid (comm) STATE ...; comm may contain spaces/parens.
            let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            matches!(
                after.split_whitespace().next(),
                Some("Z") | Some("X") | None
            )
        }
    }
}

// ---------------------------------------------------------------------------
// The hub
// ---------------------------------------------------------------------------

/// What the hub writes to `<data_dir>/hub.json` once it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubInfo {
    /// `127.0.0.1:PORT`.
    pub address: String,
    /// Whether the hub serves TLS.
    pub tls: bool,
    /// The CA fingerprint, hex.
    pub ca_sha256: String,
    /// The hub's process id.
    pub pid: u32,
}

/// The default `[hub]`/`[dispatch]` settings every test hub gets; extra TOML
/// is appended after them (so bare keys land in `[dispatch]`). The disk
/// reserve is small: CI machines may have little free space, and the reserve
/// has its own test (disk.rs).
fn hub_toml(listen: &str, data_dir: &Path, web: &str, extra: &str) -> String {
    format!(
        "[hub]\nlisten = \"{listen}\"\ndata_dir = \"{}\"\nmin_free_space = \"16 MiB\"\n\n[web]\nlisten = \"127.0.0.1:0\"\n{web}\n\n[dispatch]\nheartbeat_interval = \"1s\"\nlease_timeout = \"3s\"\nmax_attempts = 3\n{extra}\n",
        data_dir.display()
    )
}

/// Less common ways to start a test hub.
#[derive(Debug, Clone, Copy, Default)]
pub struct HubOptions<'a> {
    /// Keys added to the hub's `[web]` section.
    pub web_toml: &'a str,
    /// Start the hub under this open-files limit, soft and hard alike (so
    /// it cannot raise it): a hub on a host with the usual 1024.
    pub open_files: Option<u64>,
}

/// A running hub in its own temporary directory.
pub struct Hub {
    /// The hub's temporary directory (config, data, logs).
    pub dir: TempDir,
    /// The config file.
    pub config: PathBuf,
    /// `<dir>/data`.
    pub data_dir: PathBuf,
    extra_toml: String,
    env: Vec<(String, String)>,
    /// Extra `[web]` keys.
    web_toml: String,
    /// RLIMIT_NOFILE (soft = hard) the hub is started under, if set.
    open_files: Option<u64>,
    proc: Option<Proc>,
    /// The contents of `hub.json` of the current run.
    pub info: HubInfo,
    starts: u32,
}

/// The admin gRPC client the tests use.
pub type AdminClient = AdminServiceClient<InterceptedService<Channel, Bearer>>;

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Bearer(MetadataValue<Ascii>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut()
            .insert(trunkfarm_proto::AUTHORIZATION, self.0.clone());
        Ok(req)
    }
}

impl Hub {
    /// Starts a hub with the default test settings.
    pub fn start() -> Hub {
        Hub::start_with("", &[])
    }

    /// Starts a hub with `extra_toml` appended to its config and `env` set.
    pub fn start_with(extra_toml: &str, env: &[(&str, &str)]) -> Hub {
        Hub::start_on(|_| {}, extra_toml, env)
    }

    /// Like [`Hub::start_with`], but `prepare` fills the (empty) data dir
    /// first: a hub that opens a database written elsewhere.
    pub fn start_on(prepare: impl FnOnce(&Path), extra_toml: &str, env: &[(&str, &str)]) -> Hub {
        Hub::start_limited(prepare, extra_toml, env, HubOptions::default())
    }

    /// Like [`Hub::start_with`], with the [`HubOptions`].
    pub fn start_opts(extra_toml: &str, opts: HubOptions<'_>) -> Hub {
        Hub::start_limited(|_| {}, extra_toml, &[], opts)
    }

    fn start_limited(
        prepare: impl FnOnce(&Path),
        extra_toml: &str,
        env: &[(&str, &str)],
        opts: HubOptions<'_>,
    ) -> Hub {
        bins();
        let dir = temp_dir("trunkfarm-e2e-hub-");
        let config = dir.path().join("hub.toml");
        let data_dir = dir.path().join("data");
        fs::create_dir_all(&data_dir).unwrap();
        prepare(&data_dir);
        fs::write(
            &config,
            hub_toml("127.0.0.1:0", &data_dir, opts.web_toml, extra_toml),
        )
        .unwrap();
        let mut hub = Hub {
            dir,
            config,
            data_dir,
            extra_toml: extra_toml.to_string(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            web_toml: opts.web_toml.to_string(),
            open_files: opts.open_files,
            proc: None,
            info: HubInfo {
                address: String::new(),
                tls: false,
                ca_sha256: String::new(),
                pid: 0,
            },
            starts: 0,
        };
        hub.spawn_and_wait();
        hub
    }

    fn hub_json(&self) -> PathBuf {
        self.data_dir.join("hub.json")
    }

    fn spawn_and_wait(&mut self) {
        self.starts += 1;
        let mut cmd = Command::new(&bins().hub);
        cmd.arg("serve").arg("--config").arg(&self.config);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if let Some(limit) = self.open_files {
            let lim = libc::rlimit {
                rlim_cur: limit as libc::rlim_t,
                rlim_max: limit as libc::rlim_t,
            };
            // SAFETY: setrlimit is async-signal-safe; it reads our struct.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let proc = Proc::spawn(
            &format!("hub (start #{})", self.starts),
            cmd,
            &self.dir.path().join("hub"),
        );
        let pid = proc.pid();
        self.proc = Some(proc);
        let deadline = Instant::now() + HUB_START_TIMEOUT;
        let path = self.hub_json();
        loop {
            if let Ok(text) = fs::read_to_string(&path)
                && let Ok(v) = serde_json::from_str::<Value>(&text)
            {
                let info = HubInfo {
                    address: v["address"].as_str().unwrap_or_default().to_string(),
                    tls: v["tls"].as_bool().unwrap_or(false),
                    ca_sha256: v["ca_sha256"].as_str().unwrap_or_default().to_string(),
                    pid: v["pid"].as_u64().unwrap_or(0) as u32,
                };
                assert!(
                    !info.address.is_empty() && info.tls && info.ca_sha256.len() == 64,
                    "hub.json lacks address/tls/ca_sha256: {text}\n{}",
                    self.logs()
                );
                assert_eq!(
                    info.pid, pid,
                    "hub.json names pid {} but the hub we started is {pid}: {text}",
                    info.pid
                );
                self.info = info;
                return;
            }
            if let Some(status) = self.proc.as_mut().unwrap().try_wait() {
                panic!(
                    "the hub exited ({status}) before writing {}\n{}",
                    path.display(),
                    self.logs()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "the hub did not write {} within {HUB_START_TIMEOUT:?}\n{}",
                    path.display(),
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The hub's address (`127.0.0.1:PORT`).
    pub fn address(&self) -> &str {
        &self.info.address
    }

    /// The hub process id.
    pub fn pid(&self) -> u32 {
        self.proc.as_ref().map(|p| p.pid()).unwrap_or(0)
    }

    /// Whether the hub process is still running.
    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(|p| p.try_wait().is_none())
    }

    /// SIGKILLs the hub.
    pub fn kill9(&mut self) {
        if let Some(p) = self.proc.as_mut() {
            p.kill9();
        }
    }

    /// Restarts the hub with the same config and data dir, on the same port
    /// (agents only know the address they enrolled with). Kills it first if
    /// it is still running.
    pub fn restart(&mut self) {
        if self.is_running() {
            self.kill9();
        }
        // Pin the port the first run picked.
        let listen = self.info.address.clone();
        fs::write(
            &self.config,
            hub_toml(&listen, &self.data_dir, &self.web_toml, &self.extra_toml),
        )
        .unwrap();
        let _ = fs::remove_file(self.hub_json());
        let before = self.info.clone();
        self.spawn_and_wait();
        assert_eq!(
            self.info.address, before.address,
            "the restarted hub listens elsewhere"
        );
        assert_eq!(
            self.info.ca_sha256, before.ca_sha256,
            "the restarted hub has another CA: agents could not trust it any more"
        );
    }

    /// [`Hub::restart`] with `extra_toml` as its config's extra and `env`
    /// set from now on (a hub whose operator changed its config).
    pub fn restart_with(&mut self, extra_toml: &str, env: &[(&str, &str)]) {
        self.extra_toml = extra_toml.to_owned();
        self.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.restart();
    }

    /// Runs `trunkfarm --config <file> <args>` (killed after [`CLI_TIMEOUT`]).
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(&bins().hub);
        cmd.arg("--config").arg(&self.config).args(args);
        run_with_timeout(cmd, CLI_TIMEOUT)
    }

    /// Like [`Hub::cli`] but asserts success and returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "`trunkfarm {}` failed:\n{}",
            args.join(" "),
            describe(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Parses the stdout of a successful CLI command as JSON.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        let out = self.cli_ok(args);
        serde_json::from_str(&out).unwrap_or_else(|e| {
            panic!(
                "`trunkfarm {}` printed invalid JSON ({e}):\n{out}",
                args.join(" ")
            )
        })
    }

    /// The admin token from `<data_dir>/admin.token`.
    pub fn admin_token(&self) -> String {
        let path = self.data_dir.join("admin.token");
        fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
            .trim()
            .to_string()
    }

    /// An admin gRPC client over TLS pinned to the hub's CA.
    pub async fn admin(&self) -> AdminClient {
        init();
        let trust = HubTrust::PinnedCa {
            sha256: self.info.ca_sha256.clone(),
        };
        let opts = DialOptions {
            connect_timeout: Duration::from_secs(5),
            ..DialOptions::default()
        };
        let channel = tokio::time::timeout(
            Duration::from_secs(10),
            trunkfarm_proto::dial::connect(&self.info.address, &trust, &opts),
        )
        .await
        .unwrap_or_else(|_| panic!("connecting to the hub at {} timed out", self.info.address))
        .unwrap_or_else(|e| panic!("cannot connect to the hub: {e}\n{}", self.logs()));
        let token: MetadataValue<Ascii> = format!("Bearer {}", self.admin_token())
            .parse()
            .expect("admin token is ASCII");
        AdminServiceClient::with_interceptor(channel, Bearer(token))
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024)
    }

    /// `GET /metrics` from the hub's web endpoint: its body.
    pub fn metrics(&self) -> String {
        let (status, body) = browser::http_get(&format!("{}/metrics", browser::web_url(self)));
        assert_eq!(status, 200, "/metrics: {body}");
        body
    }

    /// The value of the unlabelled metric `name` on `/metrics` (panics if
    /// the hub has none).
    pub fn metric(&self, name: &str) -> f64 {
        let body = self.metrics();
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{body}"))
    }

    /// The hub's whole output (all runs).
    pub fn logs(&self) -> String {
        let p = self.dir.path().join("hub");
        format!(
            "---- hub stdout ----\n{}\n---- hub stderr ----\n{}",
            read_lossy(&p.with_extension("stdout.log")),
            read_lossy(&p.with_extension("stderr.log"))
        )
    }

    /// The hub's stdout and stderr files.
    pub fn log_files(&self) -> [PathBuf; 2] {
        let p = self.dir.path().join("hub");
        [
            p.with_extension("stdout.log"),
            p.with_extension("stderr.log"),
        ]
    }

    // ---- CLI conveniences -------------------------------------------------

    /// `token create <args>`: the enrollment string.
    pub fn create_token(&self, args: &[&str]) -> String {
        let mut all = vec!["token", "create"];
        all.extend_from_slice(args);
        let out = self.cli_ok(&all);
        let lines: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(
            lines.len(),
            1,
            "`token create` must print the enrollment string alone on one line, got:\n{out}"
        );
        let s = lines[0].trim().to_string();
        assert!(s.starts_with("tf1_"), "not an enrollment string: {s}");
        s
    }

    /// `agent list --json`.
    pub fn agents(&self) -> Vec<Value> {
        match self.cli_json(&["agent", "list", "--json"]) {
            Value::Array(a) => a,
            other => panic!("`agent list --json` is not an array: {other}"),
        }
    }

    /// The `agent list` entry named `name`.
    pub fn agent_named(&self, name: &str) -> Option<Value> {
        self.agents().into_iter().find(|a| a["name"] == name)
    }

    /// Waits (≤ 20 s) until exactly `n` agents are connected.
    pub fn wait_agents_connected(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let agents = self.agents();
            let c = agents.iter().filter(|a| a["connected"] == true).count();
            if c == n {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{c} agents connected after 20 s, expected {n}: {}",
                    serde_json::to_string_pretty(&agents).unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `job submit <args>`: the job id.
    pub fn submit(&self, args: &[&str]) -> u64 {
        let mut all = vec!["job", "submit"];
        all.extend_from_slice(args);
        let out = self.cli_ok(&all);
        out.trim()
            .parse()
            .unwrap_or_else(|_| panic!("`job submit` must print a job id, printed {out:?}"))
    }

    /// `job show ID --json`.
    pub fn job(&self, id: u64) -> Value {
        self.cli_json(&["job", "show", &id.to_string(), "--json"])
    }

    /// Polls `job show` until the job is finished; panics after `timeout`.
    pub fn wait_job_finished(&self, id: u64, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let j = self.job(id);
            if j["state"] == "finished" {
                return j;
            }
            if Instant::now() >= deadline {
                panic!("job {id} not finished after {timeout:?}: {j:#}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Polls `job show` until `cond` holds on the job; panics after `timeout`.
    pub fn wait_job(
        &self,
        id: u64,
        timeout: Duration,
        what: &str,
        cond: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let j = self.job(id);
            if cond(&j) {
                return j;
            }
            if Instant::now() >= deadline {
                panic!("job {id}: timed out after {timeout:?} waiting until {what}: {j:#}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `job log ID`.
    pub fn job_log(&self, id: u64) -> String {
        self.cli_ok(&["job", "log", &id.to_string()])
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        if let Some(p) = self.proc.as_mut() {
            p.signal(libc::SIGKILL);
        }
        // Agents a `local` pool started outlive a killed hub by design (a
        // restarted hub keeps them): a finished test stops them.
        if let Ok(pools) = fs::read_dir(self.data_dir.join("pools")) {
            for pool in pools.flatten() {
                for inst in fs::read_dir(pool.path()).into_iter().flatten().flatten() {
                    if let Ok(pid) = fs::read_to_string(inst.path().join("pid"))
                        && let Ok(pid) = pid.trim().parse::<i32>()
                        && pid > 1
                    {
                        // SAFETY: kill(2) of an agent this test's hub started.
                        unsafe {
                            libc::kill(pid, libc::SIGKILL);
                        }
                    }
                }
            }
        }
        if std::thread::panicking() {
            let p = self.dir.path().join("hub");
            eprintln!(
                "\n==== hub in {} (address {}) ====\n---- hub stdout, last 150 lines ----\n{}\n---- hub stderr, last 150 lines ----\n{}",
                self.dir.path().display(),
                self.info.address,
                tail(&read_lossy(&p.with_extension("stdout.log")), 150),
                tail(&read_lossy(&p.with_extension("stderr.log")), 150),
            );
        }
        self.proc = None;
    }
}

// ---------------------------------------------------------------------------
// Agents
// ---------------------------------------------------------------------------

/// An enrolled agent in its own temporary state directory.
pub struct Agent {
    /// The name it enrolled with (unique within a test).
    pub name: String,
    /// The agent's temporary directory (logs, state).
    pub dir: TempDir,
    /// `<dir>/state`, passed as `--state-dir`.
    pub state_dir: PathBuf,
    proc: Option<Proc>,
    runs: u32,
    id: OnceLock<String>,
}

/// Runs `trunkfarm-agent enroll <enrollment> --name <name> --state-dir <dir> <extra>`.
pub fn agent_enroll_cmd(enrollment: &str, name: &str, state_dir: &Path, extra: &[&str]) -> Output {
    let mut cmd = Command::new(&bins().agent);
    cmd.arg("enroll")
        .arg(enrollment)
        .arg("--name")
        .arg(name)
        .arg("--state-dir")
        .arg(state_dir)
        .args(extra);
    run_with_timeout(cmd, CLI_TIMEOUT)
}

impl Agent {
    /// Creates a token (`token create <token_args>`) and enrolls a new agent
    /// with it. Does not start it.
    pub fn enroll(hub: &Hub, name: &str, token_args: &[&str]) -> Agent {
        let enrollment = hub.create_token(token_args);
        Agent::enroll_with(&enrollment, name, &[])
    }

    /// Enrolls a new agent with `enrollment`; panics if enrolling fails.
    pub fn enroll_with(enrollment: &str, name: &str, extra: &[&str]) -> Agent {
        let agent = Agent::unenrolled(name);
        let out = agent.try_enroll(enrollment, extra);
        assert!(
            out.status.success(),
            "`trunkfarm-agent enroll` for {name} failed:\n{}",
            describe(&out)
        );
        agent.write_settings();
        agent
    }

    /// An agent directory that has not enrolled yet.
    pub fn unenrolled(name: &str) -> Agent {
        let _ = bins();
        let dir = temp_dir(&format!("trunkfarm-e2e-agent-{name}-"));
        let state_dir = dir.path().join("state");
        Agent {
            name: name.to_string(),
            dir,
            state_dir,
            proc: None,
            runs: 0,
            id: OnceLock::new(),
        }
    }

    /// Runs `trunkfarm-agent enroll` for this agent and returns its output.
    pub fn try_enroll(&self, enrollment: &str, extra: &[&str]) -> Output {
        agent_enroll_cmd(enrollment, &self.name, &self.state_dir, extra)
    }

    /// Makes the agent reconnect quickly after a hub restart (the default
    /// backoff ceiling is 60 s), and run jobs unsandboxed, since most tests
    /// watch their jobs from outside (pid files, shared counters; the
    /// sandbox tests choose bubblewrap): `<state_dir>/agent.toml`.
    fn write_settings(&self) {
        let path = self.state_dir.join("agent.toml");
        let line = "reconnect_max_backoff = \"2s\"\nsandbox = \"none\"\n";
        let existing = fs::read_to_string(&path).unwrap_or_default();
        if existing.contains("reconnect_max_backoff") {
            return;
        }
        let _ = fs::create_dir_all(&self.state_dir);
        // Bare keys must come before any [table]: prepend.
        fs::write(&path, format!("{line}{existing}")).unwrap();
    }

    /// Starts `trunkfarm-agent run --state-dir <dir> <args>`.
    pub fn start(&mut self, args: &[&str]) {
        if let Some(p) = self.proc.as_mut() {
            assert!(
                p.try_wait().is_some(),
                "agent {} is already running",
                self.name
            );
        }
        self.runs += 1;
        let mut cmd = Command::new(&bins().agent);
        cmd.arg("run")
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(args);
        self.proc = Some(Proc::spawn(
            &format!("agent {} (run #{})", self.name, self.runs),
            cmd,
            &self.dir.path().join("agent"),
        ));
    }

    fn proc(&mut self) -> &mut Proc {
        self.proc
            .as_mut()
            .unwrap_or_else(|| panic!("agent {} was never started", self.name))
    }

    /// The agent's process id.
    pub fn pid(&mut self) -> u32 {
        self.proc().pid()
    }

    /// Whether the agent process is running.
    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(|p| p.try_wait().is_none())
    }

    /// SIGKILLs the agent.
    pub fn kill9(&mut self) {
        self.proc().kill9();
    }

    /// Sends SIGTERM.
    pub fn sigterm(&mut self) {
        self.proc().signal(libc::SIGTERM);
    }

    /// Sends SIGSTOP.
    pub fn sigstop(&mut self) {
        self.proc().signal(libc::SIGSTOP);
    }

    /// Sends SIGCONT.
    pub fn sigcont(&mut self) {
        self.proc().signal(libc::SIGCONT);
    }

    /// Waits for the agent to exit; panics (with its output) after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let waited = self.proc().wait_exit(timeout);
        match waited {
            Some(s) => s,
            None => {
                let logs = self.proc().log_tail(80);
                panic!(
                    "agent {} still running after {timeout:?}\n{logs}",
                    self.name
                )
            }
        }
    }

    /// The agent's id, looked up by name in `agent list` (cached).
    pub fn id(&self, hub: &Hub) -> String {
        if let Some(id) = self.id.get() {
            return id.clone();
        }
        let entry = wait_for(
            Duration::from_secs(10),
            &format!("agent {} to appear in `agent list`", self.name),
            || hub.agent_named(&self.name),
        );
        let id = entry["agent_id"]
            .as_str()
            .unwrap_or_else(|| panic!("agent entry without agent_id: {entry}"))
            .to_string();
        assert!(!id.is_empty(), "empty agent_id: {entry}");
        let _ = self.id.set(id.clone());
        id
    }

    /// The agent's whole output (all runs).
    pub fn logs(&self) -> String {
        let p = self.dir.path().join("agent");
        format!(
            "---- agent {} stdout ----\n{}\n---- agent {} stderr ----\n{}",
            self.name,
            read_lossy(&p.with_extension("stdout.log")),
            self.name,
            read_lossy(&p.with_extension("stderr.log"))
        )
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(p) = self.proc.as_mut() {
            // A stopped process dies of SIGKILL too.
            p.signal(libc::SIGKILL);
        }
        if std::thread::panicking() {
            let p = self.dir.path().join("agent");
            eprintln!(
                "\n==== agent {} in {} ====\n---- stdout, last 100 lines ----\n{}\n---- stderr, last 100 lines ----\n{}",
                self.name,
                self.dir.path().display(),
                tail(&read_lossy(&p.with_extension("stdout.log")), 100),
                tail(&read_lossy(&p.with_extension("stderr.log")), 100),
            );
        }
        self.proc = None;
    }
}

// ---------------------------------------------------------------------------
// Job JSON helpers
// ---------------------------------------------------------------------------

/// `job["key"]` as a string ("" if absent or not a string).
pub fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or("")
}

/// `job["key"]` as an integer (panics if absent).
pub fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("`{key}` is not an unsigned integer in {v:#}"))
}

/// The `attempts` array of a job.
pub fn attempts(job: &Value) -> Vec<Value> {
    job["attempts"]
        .as_array()
        .unwrap_or_else(|| panic!("job has no `attempts` array: {job:#}"))
        .clone()
}

/// Lines of `text` that, trimmed, start with `needle`: the job's own output
/// lines, not the agent's `$ command` echo or `[trunkfarm: ...]` notices.
pub fn lines_with<'a>(text: &'a str, needle: &str) -> Vec<&'a str> {
    text.lines()
        .map(str::trim)
        .filter(|l| l.starts_with(needle))
        .collect()
}

/// Kills the processes whose pids were written to the given files, when
/// dropped (cleanup for tests whose jobs may leave processes behind).
pub struct KillPidFiles(pub Vec<PathBuf>);

impl Drop for KillPidFiles {
    fn drop(&mut self) {
        for f in &self.0 {
            if let Ok(text) = fs::read_to_string(f)
                && let Ok(pid) = text.trim().parse::<i32>()
                && pid > 1
                && !pid_gone(pid)
            {
                // SAFETY: kill(2) of a pid our own job wrote.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
}

/// Runs `git <args>` in `dir` with a fixed identity; panics on failure.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let mut cmd = Command::new("git");
    cmd.current_dir(dir)
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir);
    let out = run_with_timeout(cmd, Duration::from_secs(30));
    assert!(
        out.status.success(),
        "git {args:?} failed:\n{}",
        describe(&out)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The exit code, or a description of the signal that killed the process.
pub fn status_text(s: &ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => s.to_string(),
    }
}

/// Counts of each value.
pub fn tally<I: IntoIterator<Item = String>>(it: I) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for k in it {
        *m.entry(k).or_insert(0) += 1;
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_gone_tells_live_from_dead_and_zombie() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id() as i32;
        assert!(!pid_gone(pid), "a running sleep looks gone");
        // SAFETY: our own child.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
        // Not reaped yet: a zombie counts as gone.
        wait_until(Duration::from_secs(5), "the child is a zombie", || {
            pid_gone(pid)
        });
        let _ = child.wait();
        assert!(pid_gone(pid));
    }

    #[test]
    fn run_with_timeout_kills_a_hung_command() {
        let started = Instant::now();
        let r = std::panic::catch_unwind(|| {
            let mut cmd = Command::new("sleep");
            cmd.arg("30");
            run_with_timeout(cmd, Duration::from_millis(300))
        });
        assert!(
            r.is_err(),
            "a hung command must make run_with_timeout panic"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
