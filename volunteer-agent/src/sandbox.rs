//! The sandbox a job's commands run in: bubblewrap (`bwrap`) namespaces and
//! mounts, and limits on memory, processes, open files and disk.
//!
//! A job is a stranger's code. Under `bwrap` each command sees:
//! - the system read-only (`/usr`, `/etc`, `/opt`, the `/lib*` and `/bin`
//!   links; nothing else of the host: no `/home`, `/root`, `/var`, `/run`,
//!   `/srv`, `/mnt`, `/tmp`), with the usual secrets in `/etc` hidden
//!   (`shadow`, SSH host keys, `ssl/private`) and the agent's own paths
//!   hidden too wherever they fall inside it (state dir with the credential,
//!   artifact cache, work root with the other jobs, the donor's `HOME`);
//! - its work directory read-write at its own path (`$TRUNKFARM_WORK_DIR`
//!   stays true), with the runtime the agent unpacked there read-only, so a
//!   job cannot change what it is tested with, nor, since each job unpacks
//!   a fresh copy from the hash-checked cache, what a later job gets;
//! - a `/tmp` (and `/var/tmp`) of its own that lasts for the job (a
//!   directory beside the work directory, outside it, so the job cannot
//!   swap it for a link: bind sources are resolved on the host);
//! - its own PID namespace (every process of the job dies when its command
//!   ends: bubblewrap's init exits with the command and the kernel kills the
//!   rest, `setsid` and double forks included), network namespace (no
//!   network, not even this machine's ports, unless the project needs it
//!   and the donor allows it), IPC, UTS and user namespaces, no
//!   capabilities, no new user namespaces, a new session, and it dies with
//!   the agent;
//! - an environment reduced to `PATH`, locale and time zone, a private
//!   `HOME` in the work directory, the job's own variables and the agent's
//!   `TRUNKFARM_*` ones. Nothing goes on bubblewrap's command line but
//!   paths: the environment reaches it by `execve`, never by `--setenv`.
//!
//! Limits hold in every mode: memory and processes through a cgroup per job
//! where the agent can create one (v1 or v2, per controller; see
//! [`cgroup`]), otherwise per process (`RLIMIT_AS`, `RLIMIT_NPROC`); open
//! files (`RLIMIT_NOFILE`) and the largest file (`RLIMIT_FSIZE`, at
//! `job_disk`) always; the disk the job's directories take is measured
//! every few seconds and after each command, and a job over `job_disk` is
//! stopped. Wall time is the executor's timeout.

mod cgroup;

use std::collections::HashSet;
use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::ffi::{OsStrExt as _, OsStringExt as _};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::process::Command;
use trunkfarm_proto::settings::fmt_bytes;

use crate::config::{AgentConfig, SandboxMode};
use crate::fsutil::remove_tree;

use self::cgroup::{Controllers, Hits, JobCgroup};

/// The system directories a sandboxed job sees, read-only (those that
/// exist; a link such as `/bin -> usr/bin` is recreated as a link).
const SYSTEM: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt",
];

/// Files and directories inside [`SYSTEM`] that stay hidden (besides the SSH
/// host keys, found at start).
const SECRETS: &[&str] = &[
    "/etc/shadow",
    "/etc/shadow-",
    "/etc/gshadow",
    "/etc/gshadow-",
    "/etc/ssl/private",
];

/// Variables of the agent's environment a sandboxed job keeps (and every
/// `LC_*`); the rest (tokens, cloud keys, `SSH_AUTH_SOCK`) stays out.
const PASS_ENV: &[&str] = &["PATH", "LANG", "LANGUAGE", "TZ", "TERM"];

/// The file descriptor on which the first process inside the sandbox says
/// it got there (see [`STARTED`]): without that word, a failure is the
/// sandbox's, not the job's.
const INFO_FD: libc::c_int = 3;

/// What bubblewrap runs: a shell that reports on [`INFO_FD`], closes it and
/// becomes the job's command (`$0 "$@"`). bubblewrap's own `--info-fd`
/// would not do: it reports before the mounts are made.
const STARTED: &str = "printf . >&3 && exec 3>&- && exec \"$0\" \"$@\"";

/// Where a sandboxed job's `HOME` is, in its work directory (a name the
/// job's `upload_prefix` may not take).
pub(crate) const HOME_DIR: &str = ".trunkfarm-home";

/// How long the probe run of bubblewrap at start may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// The shortest wait between two measurements of a job's disk use; longer
/// when measuring takes long (a big checkout), so it stays a small share.
const DISK_CHECK_MIN: Duration = Duration::from_secs(2);

/// The longest wait between two measurements of a job's disk use.
const DISK_CHECK_MAX: Duration = Duration::from_secs(30);

/// The detail of every job refused for want of a sandbox.
pub(crate) const NO_SANDBOX_REFUSAL: &str = "this agent has no working sandbox and does not run \
     jobs unconfined: its donor can install bubblewrap (`apt install bubblewrap`) or set \
     sandbox = \"none\" in agent.toml";

/// Why the agent cannot start with the sandbox its donor asked for.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SandboxError {
    /// `sandbox = "bwrap"` without a working bubblewrap.
    #[error(
        "sandbox = \"bwrap\" but {0}; install bubblewrap (`apt install bubblewrap`), or set \
         sandbox = \"none\" to run jobs unconfined"
    )]
    NoBwrap(String),
}

/// The limits on one job, from the donor's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// `job_memory`, bytes.
    pub memory: u64,
    /// `job_processes`.
    pub processes: u32,
    /// `job_disk`, bytes.
    pub disk: u64,
    /// `job_open_files`.
    pub open_files: u32,
}

impl Limits {
    /// The limits `config` sets (`job_memory` within the donor's `memory`
    /// shared by `max_parallel_jobs`).
    pub fn from_config(config: &AgentConfig) -> Limits {
        Limits {
            memory: config.job_memory_offered(),
            processes: config.job_processes,
            disk: config.job_disk,
            open_files: config.job_open_files,
        }
    }
}

/// What bubblewrap of this machine supports beyond the basics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Features {
    /// `--disable-userns` and `--size` (bubblewrap 0.8 and later).
    pub modern: bool,
}

/// One mount of the system part of a sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Mount {
    /// A host directory at the same path, read-only.
    ReadOnly(PathBuf),
    /// A symbolic link at `path` to `target`.
    Link {
        /// What the link points to.
        target: PathBuf,
        /// Where it is.
        path: PathBuf,
    },
    /// An empty read-only directory over a host directory.
    HideDir(PathBuf),
    /// An unreadable node over a host file.
    HideFile(PathBuf),
}

/// How jobs are run, decided once at start.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    /// bubblewrap at this path.
    Bwrap(PathBuf, Features),
    /// No sandbox, by the donor's choice.
    None,
    /// No working bubblewrap under `auto`: every job is refused.
    Unavailable(String),
}

/// The sandbox every job of this agent runs in.
#[derive(Debug)]
pub(crate) struct Sandbox {
    /// bubblewrap, none, or none available.
    kind: Kind,
    /// The limits on each job.
    limits: Limits,
    /// The cgroup controllers the limits use.
    cgroups: Controllers,
    /// The system part of the sandbox.
    system: Vec<Mount>,
    /// Mounts added for a job with network access (the resolver's file
    /// where `/etc/resolv.conf` links outside the system directories).
    network_mounts: Vec<Mount>,
    /// The donor allows jobs that need the network to have it.
    allow_network: bool,
    /// The CPUs jobs run on when the donor offers fewer cores than the
    /// agent may use (`cores`); `None`: all of them.
    cpus: Option<CpuSet>,
}

/// A CPU affinity mask and how many CPUs it holds.
#[derive(Clone, Copy)]
struct CpuSet(libc::cpu_set_t, u32);

impl std::fmt::Debug for CpuSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CpuSet({} cpus)", self.1)
    }
}

/// The first `cores` CPUs of those this process may run on, when it may
/// run on more; `None` when there is nothing to hold (no `cores`, or no
/// more CPUs than offered) or the mask cannot be read (said in the log).
fn offered_cpus(cores: Option<u32>) -> Option<CpuSet> {
    let want = cores?;
    // SAFETY: an all-zero cpu_set_t is a valid (empty) set.
    let mut mine: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `mine` is a cpu_set_t of the size passed.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut mine) } != 0
    {
        tracing::warn!(
            "cannot read this process's CPUs ({}): `cores = {want}` is told to the hub but not \
             held on jobs",
            io::Error::last_os_error()
        );
        return None;
    }
    // SAFETY: as above.
    let mut kept: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let mut n = 0u32;
    for cpu in 0..libc::CPU_SETSIZE as usize {
        // SAFETY: `cpu` is below CPU_SETSIZE, the sets' size.
        if unsafe { libc::CPU_ISSET(cpu, &mine) } {
            if n == want {
                return Some(CpuSet(kept, n));
            }
            // SAFETY: as above.
            unsafe { libc::CPU_SET(cpu, &mut kept) };
            n += 1;
        }
    }
    None
}

impl Sandbox {
    /// Sets up the sandbox `config` asks for: finds and tries bubblewrap,
    /// the cgroups, and what to hide. `private` are the agent's own paths
    /// (state dir, cache, work root, config file). Logs what it found; a
    /// `none` sandbox is warned about every time.
    pub async fn open(config: &AgentConfig, private: &[&Path]) -> Result<Sandbox, SandboxError> {
        let kind = match config.sandbox {
            SandboxMode::None => {
                tracing::warn!(
                    "sandbox = \"none\": jobs run unconfined with this agent's rights, so a job \
                     can read the agent's credential, your files and other jobs' files, and use \
                     the network; set sandbox = \"auto\" with bubblewrap installed to confine them"
                );
                Kind::None
            }
            SandboxMode::Bwrap => match probe().await {
                Ok((path, features)) => Kind::Bwrap(path, features),
                Err(why) => return Err(SandboxError::NoBwrap(why)),
            },
            SandboxMode::Auto => match probe().await {
                Ok((path, features)) => Kind::Bwrap(path, features),
                Err(why) => {
                    tracing::warn!(
                        "no sandbox: {why}; this agent refuses every job until bubblewrap works \
                         here: install it (`apt install bubblewrap`), or set sandbox = \"none\" \
                         in agent.toml to run jobs unconfined"
                    );
                    Kind::Unavailable(why)
                }
            },
        };
        let mut hidden: Vec<PathBuf> = private.iter().map(|p| p.to_path_buf()).collect();
        hidden.extend(std::env::var_os("HOME").map(PathBuf::from));
        hidden.push(PathBuf::from("/root"));
        let sandbox = Sandbox {
            kind,
            limits: Limits::from_config(config),
            cgroups: tokio::task::spawn_blocking(Controllers::detect)
                .await
                .unwrap_or_default(),
            system: system_mounts(&hidden),
            network_mounts: resolver_mounts(),
            allow_network: config.allow_network,
            cpus: offered_cpus(config.cores),
        };
        if let Some(memory) = config.memory {
            tracing::info!(
                "memory = {}: each of up to {} job(s) at once may use {}",
                fmt_bytes(memory),
                config.max_parallel_jobs,
                fmt_bytes(sandbox.limits.memory)
            );
        }
        if let Some(cpus) = &sandbox.cpus {
            tracing::info!(
                "cores = {}: jobs run on the first {} CPUs this agent may use",
                cpus.1,
                cpus.1
            );
        }
        if let Kind::Bwrap(path, features) = &sandbox.kind {
            tracing::info!(
                bwrap = %path.display(),
                "sandbox: bubblewrap{}; each job: {}, memory {}, {} processes, {} open files, \
                 {} of disk ({})",
                if features.modern { "" } else { " (older than 0.8: user namespaces stay allowed)" },
                if sandbox.allow_network { "network only if its project needs it" } else { "no network" },
                fmt_bytes(sandbox.limits.memory),
                sandbox.limits.processes,
                sandbox.limits.open_files,
                fmt_bytes(sandbox.limits.disk),
                sandbox.cgroups.describe(),
            );
        }
        if sandbox.kind != Kind::None
            && sandbox.cgroups.pids.is_none()
            // SAFETY: geteuid(2) has no preconditions.
            && unsafe { libc::geteuid() } == 0
        {
            tracing::warn!(
                "jobs' process counts are not limited: no pids cgroup can be created and the \
                 agent runs as root, which RLIMIT_NPROC does not bind"
            );
        }
        Ok(sandbox)
    }

    /// No sandbox and no limits: for tests of the executor itself.
    #[cfg(test)]
    pub fn unconfined() -> Sandbox {
        Sandbox {
            kind: Kind::None,
            limits: Limits {
                memory: u64::MAX,
                processes: u32::MAX,
                disk: u64::MAX,
                open_files: u32::MAX,
            },
            cgroups: Controllers::default(),
            system: Vec::new(),
            network_mounts: Vec::new(),
            allow_network: true,
            cpus: None,
        }
    }

    /// bubblewrap with the donor's `limits`, for tests.
    #[cfg(test)]
    pub fn bwrap_for_tests(limits: Limits, private: &[&Path]) -> Sandbox {
        let path = find_on_path("bwrap")
            .expect("these tests need bubblewrap: `apt install bubblewrap` (.ci/run installs it)");
        let hidden: Vec<PathBuf> = private.iter().map(|p| p.to_path_buf()).collect();
        Sandbox {
            kind: Kind::Bwrap(path, Features { modern: true }),
            limits,
            cgroups: Controllers::detect(),
            system: system_mounts(&hidden),
            network_mounts: Vec::new(),
            allow_network: false,
            cpus: None,
        }
    }

    /// How this agent confines jobs, as its capabilities say:
    /// `bwrap`, `none` or `unavailable`.
    pub fn name(&self) -> &'static str {
        match self.kind {
            Kind::Bwrap(..) => "bwrap",
            Kind::None => "none",
            Kind::Unavailable(_) => "unavailable",
        }
    }

    /// Why every job is refused, if it is.
    pub fn refusal(&self) -> Option<&'static str> {
        matches!(self.kind, Kind::Unavailable(_)).then_some(NO_SANDBOX_REFUSAL)
    }

    /// Prepares the job `name` (its work directory's name) for its commands:
    /// its cgroups and, under bubblewrap, its `/tmp` and `HOME`.
    /// `read_only` are directories in `workdir` the job must not change
    /// (its runtime). `Err` is the detail of an infrastructure error.
    pub fn confine(
        &self,
        name: &str,
        workdir: &Path,
        read_only: Vec<PathBuf>,
    ) -> Result<Confinement<'_>, String> {
        let mut confinement = Confinement {
            sandbox: self,
            workdir: workdir.to_path_buf(),
            tmp: None,
            read_only,
            cgroup: None,
            hits: Hits::default(),
            rlimits: Vec::new(),
        };
        if let Kind::Bwrap(..) = self.kind {
            let tmp = workdir.with_file_name(format!("{name}.tmp"));
            remove_tree(&tmp)
                .and_then(|()| std::fs::create_dir(&tmp))
                .and_then(|()| {
                    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o700))
                })
                .map_err(|e| format!("cannot create the job's /tmp {}: {e}", tmp.display()))?;
            confinement.tmp = Some(tmp);
            let home = workdir.join(HOME_DIR);
            std::fs::create_dir_all(&home)
                .map_err(|e| format!("cannot create the job's HOME {}: {e}", home.display()))?;
        }
        let limits = self.limits;
        if limits.memory != u64::MAX || limits.processes != u32::MAX {
            let cgroup = JobCgroup::create(&self.cgroups, name, limits.memory, limits.processes)
                .map_err(|e| format!("cannot create the job's cgroup: {e}"))?;
            confinement.cgroup = Some(cgroup);
        }
        confinement.rlimits = self.rlimits();
        Ok(confinement)
    }

    /// The rlimits every command of a job gets: open files, file size and
    /// no core dumps always; memory and processes where no cgroup limits
    /// them.
    fn rlimits(&self) -> Vec<(RlimitResource, libc::rlim_t)> {
        let l = self.limits;
        // u32::MAX and u64::MAX stand for "no limit" (tests of the executor).
        let count = |n: u32| {
            if n == u32::MAX {
                u64::MAX
            } else {
                u64::from(n)
            }
        };
        let mut out = Vec::new();
        let mut push = |resource: RlimitResource, value: u64| {
            if value != u64::MAX {
                out.push((
                    resource,
                    libc::rlim_t::from(value).min(hard_limit(resource)),
                ));
            }
        };
        push(libc::RLIMIT_NOFILE, count(l.open_files));
        push(libc::RLIMIT_FSIZE, l.disk);
        if l.disk != u64::MAX {
            push(libc::RLIMIT_CORE, 0);
        }
        if self.cgroups.memory.is_none() {
            push(libc::RLIMIT_AS, l.memory);
        }
        // SAFETY: getuid(2) has no preconditions.
        let uid = unsafe { libc::getuid() };
        if self.cgroups.pids.is_none() && l.processes != u32::MAX && uid != 0 {
            // RLIMIT_NPROC counts every task of the user, the agent's own too.
            push(
                libc::RLIMIT_NPROC,
                tasks_of(uid).saturating_add(count(l.processes)),
            );
        }
        out
    }
}

/// The resource type `setrlimit` takes on this libc.
type RlimitResource = libc::__rlimit_resource_t;

/// The current hard limit of `resource` (a limit may be lowered, never
/// raised past it).
fn hard_limit(resource: RlimitResource) -> libc::rlim_t {
    let mut current = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) writes into the struct we pass.
    if unsafe { libc::getrlimit(resource, &mut current) } == 0 {
        current.rlim_max
    } else {
        libc::RLIM_INFINITY
    }
}

/// How many tasks (threads) the user `uid` runs on this machine.
fn tasks_of(uid: libc::uid_t) -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut tasks = 0u64;
    for entry in entries.flatten() {
        if !entry.file_name().as_bytes().iter().all(u8::is_ascii_digit) {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
        };
        if field("Uid:") == Some(u64::from(uid)) {
            tasks += field("Threads:").unwrap_or(1);
        }
    }
    tasks
}

/// One job's confinement: where its commands run and what holds them.
/// Dropping it kills whatever of the job still runs in its cgroups and
/// removes them and the job's `/tmp`.
#[derive(Debug)]
pub(crate) struct Confinement<'a> {
    /// The agent's sandbox.
    sandbox: &'a Sandbox,
    /// The job's work directory.
    workdir: PathBuf,
    /// The job's `/tmp` on the host (bubblewrap only).
    tmp: Option<PathBuf>,
    /// Directories in the work directory mounted read-only.
    read_only: Vec<PathBuf>,
    /// The job's cgroups.
    cgroup: Option<JobCgroup>,
    /// The cgroups' counters when last looked at.
    hits: Hits,
    /// The rlimits each command gets.
    rlimits: Vec<(RlimitResource, libc::rlim_t)>,
}

/// A command about to start in a [`Confinement`], and how to tell whether
/// the sandbox came up.
pub(crate) struct Launch {
    /// The command (the job's variables still to be added by the caller).
    pub cmd: Command,
    /// Tells, once the command ended, whether bubblewrap got that far.
    pub probe: StartProbe,
}

/// The sandbox's report channel: the read end, and the write end that is
/// the child's fd 3 (kept until the command ended).
pub(crate) struct StartProbe(Option<(OwnedFd, OwnedFd)>);

impl StartProbe {
    /// After the command ended: false if it ran under bubblewrap and the
    /// sandbox never came up (that failure is the agent's, not the job's).
    pub fn sandbox_started(self) -> bool {
        let Some((read, write)) = self.0 else {
            return true;
        };
        drop(write);
        let mut file = std::fs::File::from(read);
        let mut buf = [0u8; 1];
        matches!(io::Read::read(&mut file, &mut buf), Ok(n) if n > 0)
    }
}

impl Confinement<'_> {
    /// The job's limits.
    pub fn limits(&self) -> Limits {
        self.sandbox.limits
    }

    /// True under bubblewrap.
    pub fn sandboxed(&self) -> bool {
        matches!(self.sandbox.kind, Kind::Bwrap(..))
    }

    /// Whether a job that asks for the network gets it.
    pub fn network_allowed(&self) -> bool {
        self.sandbox.allow_network
    }

    /// `program args…` in `cwd`, confined: under bubblewrap, in the
    /// sandbox with the reduced environment (the caller adds the job's
    /// variables); in every mode, in the job's cgroups with its rlimits.
    /// `network` is the job's request (granted only if the donor allows).
    pub fn command(
        &self,
        program: &str,
        args: &[&OsStr],
        cwd: &Path,
        network: bool,
    ) -> io::Result<Launch> {
        let mut info = None;
        let mut cmd = match &self.sandbox.kind {
            Kind::Bwrap(bwrap, features) => {
                let (read, write) = pipe()?;
                let plan = Plan {
                    workdir: &self.workdir,
                    tmp: self.tmp.as_deref().unwrap_or(Path::new("/nonexistent")),
                    read_only: &self.read_only,
                    cwd,
                    network: network && self.sandbox.allow_network,
                    shm_bytes: self.sandbox.limits.memory,
                    modern: features.modern,
                };
                let mut cmd = Command::new(bwrap);
                cmd.args(bwrap_args(
                    &self.sandbox.system,
                    &self.sandbox.network_mounts,
                    &plan,
                ))
                .args(["/bin/sh", "-c", STARTED])
                .arg(program)
                .args(args)
                .env_clear()
                .envs(passed_env(std::env::vars_os()))
                .env("HOME", self.workdir.join(HOME_DIR))
                .env("TMPDIR", "/tmp");
                info = Some((read, write));
                cmd
            }
            Kind::None | Kind::Unavailable(_) => {
                let mut cmd = Command::new(program);
                cmd.args(args);
                cmd
            }
        };
        cmd.current_dir(cwd);
        let join: Vec<CString> = self
            .cgroup
            .as_ref()
            .map(JobCgroup::procs_files)
            .unwrap_or_default()
            .into_iter()
            .map(|p| CString::new(p.into_os_string().into_vec()))
            .collect::<Result<_, _>>()
            .map_err(io::Error::other)?;
        let rlimits = self.rlimits.clone();
        let cpus = self.sandbox.cpus;
        let info_fd = info.as_ref().map(|(_, w)| w.as_raw_fd());
        // SAFETY: the closure runs between fork and exec and only makes
        // async-signal-safe calls (umask, open, write, close, setrlimit,
        // sched_setaffinity, dup2, fcntl) on data prepared before the fork;
        // it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                // The job's umask, not the agent's private one.
                libc::umask(crate::fsutil::JOB_UMASK);
                for path in &join {
                    let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                    let error = io::Error::last_os_error();
                    libc::close(fd);
                    if written != 1 {
                        return Err(error);
                    }
                }
                for (resource, value) in &rlimits {
                    let limit = libc::rlimit {
                        rlim_cur: *value,
                        rlim_max: *value,
                    };
                    if libc::setrlimit(*resource, &limit) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                // The donor's `cores`: the job and all it starts inherit it.
                if let Some(CpuSet(set, _)) = &cpus
                    && libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                if let Some(fd) = info_fd {
                    let ok = if fd == INFO_FD {
                        libc::fcntl(fd, libc::F_SETFD, 0) == 0
                    } else {
                        libc::dup2(fd, INFO_FD) == INFO_FD
                    };
                    if !ok {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        Ok(Launch {
            cmd,
            probe: StartProbe(info),
        })
    }

    /// Completes when the job's directories take more than `job_disk`, with
    /// the bytes they take; never without a disk limit.
    pub async fn disk_exceeded(&self) -> u64 {
        let limit = self.sandbox.limits.disk;
        if limit == u64::MAX {
            return std::future::pending().await;
        }
        let mut wait = DISK_CHECK_MIN;
        loop {
            tokio::time::sleep(wait).await;
            let started = Instant::now();
            let used = self.disk_used().await;
            wait = (started.elapsed() * 10).clamp(DISK_CHECK_MIN, DISK_CHECK_MAX);
            if used > limit {
                return used;
            }
        }
    }

    /// The bytes the job's work directory and `/tmp` take (the read-only
    /// runtime not counted: the agent put it there, within
    /// `max_unpacked_size`).
    pub async fn disk_used(&self) -> u64 {
        let mut roots = vec![self.workdir.clone()];
        roots.extend(self.tmp.clone());
        let skip = self.read_only.clone();
        tokio::task::spawn_blocking(move || disk_usage(&roots, &skip))
            .await
            .unwrap_or(0)
    }

    /// Notes about limits the job hit since the last call (out of memory,
    /// forks refused), one line each, for the job's log and detail.
    pub fn limit_notes(&mut self) -> Vec<String> {
        let Some(cgroup) = &self.cgroup else {
            return Vec::new();
        };
        let now = cgroup.hits();
        let mut notes = Vec::new();
        let limits = self.sandbox.limits;
        if now.oom_kills > self.hits.oom_kills {
            notes.push(format!(
                "out of memory: the kernel killed {} process(es) of this job at its limit \
                 (job_memory = {})",
                now.oom_kills - self.hits.oom_kills,
                fmt_bytes(limits.memory)
            ));
        }
        if now.fork_refusals > self.hits.fork_refusals {
            notes.push(format!(
                "process limit reached: {} fork(s) refused (job_processes = {})",
                now.fork_refusals - self.hits.fork_refusals,
                limits.processes
            ));
        }
        self.hits = now;
        notes
    }

    /// Ends the job: kills what is left in its cgroups, removes them and its
    /// `/tmp` (on the blocking pool).
    pub async fn close(mut self) {
        let cgroup = self.cgroup.take();
        let tmp = self.tmp.take();
        let done = tokio::task::spawn_blocking(move || {
            drop(cgroup);
            remove_tmp(tmp);
        })
        .await;
        if let Err(e) = done {
            tracing::warn!(error = %e, "cleaning up after a job failed");
        }
    }
}

impl Drop for Confinement<'_> {
    fn drop(&mut self) {
        self.cgroup = None;
        remove_tmp(self.tmp.take());
    }
}

/// Removes a job's `/tmp`, if it has one.
fn remove_tmp(tmp: Option<PathBuf>) {
    if let Some(tmp) = tmp
        && let Err(e) = remove_tree(&tmp)
    {
        tracing::warn!(path = %tmp.display(), error = %e, "cannot remove a job's /tmp");
    }
}

/// A pipe, both ends close-on-exec.
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2(2) writes two descriptors into the array we pass.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The agent's variables a sandboxed job keeps.
fn passed_env(vars: impl Iterator<Item = (OsString, OsString)>) -> Vec<(OsString, OsString)> {
    vars.filter(|(k, _)| {
        let k = k.as_bytes();
        PASS_ENV.iter().any(|p| p.as_bytes() == k) || k.starts_with(b"LC_")
    })
    .collect()
}

/// One command's part of a sandbox: the job's directories and wishes.
#[derive(Debug)]
pub(crate) struct Plan<'a> {
    /// The work directory, bound read-write at its own path.
    pub workdir: &'a Path,
    /// The host directory bound at `/tmp` and `/var/tmp`.
    pub tmp: &'a Path,
    /// Directories in the work directory bound read-only over themselves.
    pub read_only: &'a [PathBuf],
    /// Where the command starts.
    pub cwd: &'a Path,
    /// The command gets the host's network.
    pub network: bool,
    /// The size cap of `/dev/shm`.
    pub shm_bytes: u64,
    /// bubblewrap 0.8 or later (`--disable-userns`, `--size`).
    pub modern: bool,
}

/// bubblewrap's arguments up to the command (ending with `--`): namespaces,
/// the system read-only with its secrets hidden, the job's directories, and
/// a read-only root.
pub(crate) fn bwrap_args(
    system: &[Mount],
    network_mounts: &[Mount],
    plan: &Plan<'_>,
) -> Vec<OsString> {
    let mut a = Args::default();
    a.flag("--unshare-all");
    if plan.network {
        a.flag("--share-net");
    }
    a.flag("--unshare-user");
    if plan.modern {
        a.flag("--disable-userns");
    }
    a.flags(&["--cap-drop", "ALL", "--die-with-parent", "--new-session"]);
    a.flags(&["--hostname", "trunkfarm-job"]);
    for mount in system {
        a.mount(mount);
    }
    if plan.network {
        for mount in network_mounts {
            a.mount(mount);
        }
    }
    a.flags(&["--proc", "/proc", "--dev", "/dev"]);
    if plan.modern && plan.shm_bytes != u64::MAX {
        a.flag("--size");
        a.path(OsStr::new(&plan.shm_bytes.to_string()));
    }
    a.flag("--tmpfs");
    a.path(OsStr::new("/dev/shm"));
    a.pair("--bind", plan.tmp, Path::new("/tmp"));
    a.pair("--bind", plan.tmp, Path::new("/var/tmp"));
    a.pair("--bind", plan.workdir, plan.workdir);
    for dir in plan.read_only {
        a.pair("--ro-bind", dir, dir);
    }
    a.flags(&["--remount-ro", "/"]);
    a.flag("--chdir");
    a.path(plan.cwd.as_os_str());
    a.flag("--");
    a.0
}

/// bubblewrap's argument list being built.
#[derive(Default)]
struct Args(Vec<OsString>);

impl Args {
    fn flag(&mut self, flag: &str) {
        self.0.push(flag.into());
    }

    fn flags(&mut self, flags: &[&str]) {
        self.0.extend(flags.iter().map(OsString::from));
    }

    fn path(&mut self, path: &OsStr) {
        self.0.push(path.to_os_string());
    }

    fn pair(&mut self, flag: &str, src: &Path, dest: &Path) {
        self.flag(flag);
        self.path(src.as_os_str());
        self.path(dest.as_os_str());
    }

    fn mount(&mut self, mount: &Mount) {
        match mount {
            Mount::ReadOnly(p) => self.pair("--ro-bind", p, p),
            Mount::Link { target, path } => self.pair("--symlink", target, path),
            Mount::HideDir(p) => {
                self.flag("--tmpfs");
                self.path(p.as_os_str());
                self.flag("--remount-ro");
                self.path(p.as_os_str());
            }
            Mount::HideFile(p) => self.pair("--ro-bind", Path::new("/dev/null"), p),
        }
    }
}

/// The system part of every sandbox on this machine: [`SYSTEM`] read-only,
/// then [`SECRETS`], the SSH host keys and those of `private` that lie
/// inside it hidden.
fn system_mounts(private: &[PathBuf]) -> Vec<Mount> {
    let mut mounts = Vec::new();
    let mut exposed = Vec::new();
    for root in SYSTEM {
        let path = Path::new(root);
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_symlink() => {
                if let Ok(target) = std::fs::read_link(path) {
                    mounts.push(Mount::Link {
                        target,
                        path: path.to_path_buf(),
                    });
                }
            }
            Ok(m) if m.is_dir() => {
                mounts.push(Mount::ReadOnly(path.to_path_buf()));
                exposed.push(path.to_path_buf());
            }
            _ => {}
        }
    }
    let mut hide: Vec<PathBuf> = SECRETS.iter().map(PathBuf::from).collect();
    if let Ok(entries) = std::fs::read_dir("/etc/ssh") {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("ssh_host_") && name.ends_with("_key") {
                hide.push(entry.path());
            }
        }
    }
    for path in private {
        hide.push(path.clone());
        if let Ok(real) = std::fs::canonicalize(path) {
            hide.push(real);
        }
    }
    let mut seen = HashSet::new();
    for path in hide {
        let Ok(path) = std::path::absolute(&path) else {
            continue;
        };
        if !exposed.iter().any(|root| path.starts_with(root)) || !seen.insert(path.clone()) {
            continue;
        }
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => mounts.push(Mount::HideDir(path)),
            Ok(_) => mounts.push(Mount::HideFile(path)),
            Err(_) => {}
        }
    }
    mounts
}

/// Where `/etc/resolv.conf` links outside the system directories (systemd-
/// resolved's stub file in `/run`), that file read-only, so a job with the
/// network can resolve names.
fn resolver_mounts() -> Vec<Mount> {
    match std::fs::canonicalize("/etc/resolv.conf") {
        Ok(real) if !SYSTEM.iter().any(|root| real.starts_with(root)) => {
            vec![Mount::ReadOnly(real)]
        }
        _ => Vec::new(),
    }
}

/// The bytes allocated to everything under `roots` (files with several
/// links counted once), not following links and skipping `skip`.
fn disk_usage(roots: &[PathBuf], skip: &[PathBuf]) -> u64 {
    let mut total = 0u64;
    let mut linked = HashSet::new();
    let mut stack: Vec<PathBuf> = roots.to_vec();
    while let Some(path) = stack.pop() {
        if skip.contains(&path) {
            continue;
        }
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.nlink() > 1 && !meta.is_dir() && !linked.insert((meta.dev(), meta.ino())) {
            continue;
        }
        total = total.saturating_add(meta.blocks().saturating_mul(512));
        if meta.is_dir()
            && let Ok(entries) = std::fs::read_dir(&path)
        {
            stack.extend(entries.flatten().map(|e| e.path()));
        }
    }
    total
}

/// Finds bubblewrap and checks that it can make a sandbox here (user
/// namespaces allowed, mounts permitted), with the flags jobs use; on an
/// older bubblewrap without `--disable-userns` and `--size`, without them.
async fn probe() -> Result<(PathBuf, Features), String> {
    let path = find_on_path("bwrap")
        .ok_or_else(|| "bubblewrap (`bwrap`) is not installed (not found on PATH)".to_owned())?;
    let mut last = String::new();
    for modern in [true, false] {
        let mut args: Vec<&str> = vec!["--unshare-all", "--unshare-user"];
        if modern {
            args.extend(["--disable-userns", "--size", "1048576", "--tmpfs", "/tmp"]);
        }
        args.extend([
            "--cap-drop",
            "ALL",
            "--die-with-parent",
            "--new-session",
            "--ro-bind",
            "/",
            "/",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--",
            "/bin/sh",
            "-c",
            ":",
        ]);
        let run = Command::new(&path)
            .args(&args)
            .env_clear()
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        match tokio::time::timeout(PROBE_TIMEOUT, run).await {
            Ok(Ok(out)) if out.status.success() => return Ok((path, Features { modern })),
            Ok(Ok(out)) => {
                last = format!(
                    "{} cannot make a sandbox here ({}): {}",
                    path.display(),
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            Ok(Err(e)) => last = format!("{} cannot be run: {e}", path.display()),
            Err(_) => {
                last = format!(
                    "{} did not finish a test run within {}s",
                    path.display(),
                    PROBE_TIMEOUT.as_secs()
                );
            }
        }
    }
    Err(last)
}

/// The first executable file named `name` in the agent's `PATH`.
fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

#[cfg(test)]
mod tests;
