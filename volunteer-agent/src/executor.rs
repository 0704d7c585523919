//! Runs one job on this machine.
//!
//! A job gets a fresh directory under the agent's work root
//! (`job-<id>-<attempt>`), optionally a checkout of its repository in
//! `<workdir>/src`, and then its commands, one `sh -c` after another, each in
//! its own process group so that the whole tree it starts can be killed: on
//! timeout, on cancel, and after the command itself exits (a stray
//! `sleep 1000 &` must not outlive the job on a volunteer's machine). Output
//! goes through an [`OutputCap`] so a chatty job cannot exhaust the donor's
//! memory or bandwidth. Each command runs confined by the agent's
//! [`Sandbox`] (bubblewrap and job limits; see `sandbox.rs`), and what of the
//! job still runs after its last command is killed with its cgroup. Whatever
//! happens, the work directory is removed
//! afterwards and the result comes back as an [`ExecOutcome`] value: nothing
//! here panics or returns early on a job's input.
//!
//! Runtime artifacts: a job with `artifact_sha256` gets that runtime (from
//! the [`ArtifactCache`], downloaded if needed) unpacked into
//! `<workdir>/runtime` before its commands, exported as
//! `TRUNKFARM_RUNTIME_PREFIX` with its `bin/` first on `PATH`. A job with
//! `upload_prefix` gets `<workdir>/<upload_prefix>` exported as `PREFIX`;
//! once every command passed, that directory is packed and uploaded and the
//! result names its hash. Fetching, unpacking, packing and uploading are part
//! of the job: the timeout and a cancel stop them too, and their failures are
//! infrastructure errors. `report_paths` are read after the commands ran to
//! a pass or a failure (not after a timeout, a cancel or an error, whose
//! reports would be partial or missing anyway).

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use trunkfarm_proto::gitauth::{GitRemote, redact_url};
use trunkfarm_proto::settings::fmt_bytes;
use trunkfarm_proto::v1::{JobRef, JobSpec, LogStream, Outcome, ReportFile, Repository};

use crate::backoff::Backoff;
use crate::cache::{self, ArtifactCache, CacheError, Lease, Source};
use crate::fsutil::{remove_tree, remove_tree_async};
use crate::output::{MAX_CHUNK, OutputCap};
use crate::pack::{self, UploadError};
use crate::reports;
use crate::sandbox::{Confinement, Sandbox};
use crate::spawn_gate;
use crate::transfer::ArtifactHub;
use crate::unpack::{self, UnpackLimits, UnpackStats};

/// The shell every command runs in. An absolute path, so that a job setting
/// its own `PATH` cannot make the agent fail to start the shell.
const SHELL: &str = "/bin/sh";

/// Live log bytes queued for the log receiver before the agent stops reading
/// the job's pipes (back-pressure instead of unbounded memory).
const MAX_PENDING: usize = 1024 * 1024;

/// How long the agent keeps reading output after a command's process group
/// was killed: a process that left the group (e.g. via `setsid`) may keep the
/// pipes open forever, and the job must still end.
const DRAIN_BOUND: Duration = Duration::from_secs(2);

/// How long to wait for a command to die after SIGKILL before giving up on
/// it (a process stuck in uninterruptible sleep ignores even SIGKILL).
const KILL_GRACE: Duration = Duration::from_secs(5);

/// Bytes of each process's stdout and stderr kept aside, to read git's
/// answers and put its error message into the job's detail.
const KEEP_TAIL: usize = 2048;

/// Longest command text quoted in a detail, so a multi-kilobyte script does
/// not become the headline of a result.
const DETAIL_COMMAND_MAX: usize = 200;

/// A log chunk as the agent's session forwards it to the hub.
type LogItem = (LogStream, Vec<u8>);

/// Where a job's runtime artifact is unpacked, under its work directory.
const RUNTIME_DIR: &str = "runtime";

/// Where a build's packed artifact is written, under its work directory
/// (created only when packing, after the job's processes are gone).
const PACK_DIR: &str = ".trunkfarm-pack";

/// How long a job's download or upload keeps trying while the hub cannot be
/// reached before the job ends as an infrastructure error. A hub restart
/// takes seconds and the job's lease outlives it (the restarted hub renews
/// it when this agent reconnects): a finished build or a test waiting for
/// its runtime is not thrown away for it, nor one of its attempts used up.
const HUB_OUTAGE_PATIENCE: Duration = Duration::from_secs(5 * 60);

/// The longest pause between two tries while the hub cannot be reached (an
/// upload sends the whole artifact again each time).
const HUB_OUTAGE_MAX_PAUSE: Duration = Duration::from_secs(30);

/// The reproducible-builds variable: a build's fixed time (seconds since
/// the epoch), <https://reproducible-builds.org/specs/source-date-epoch/>.
const SOURCE_DATE_EPOCH: &str = "SOURCE_DATE_EPOCH";

/// `PATH` for a job's commands when neither the job nor the agent has one.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// What jobs need beyond their spec: the runtime artifacts they use and
/// publish, and the sandbox their commands run in.
#[derive(Clone)]
pub(crate) struct Artifacts {
    /// Downloaded runtimes.
    pub cache: ArtifactCache,
    /// The hub's artifact store.
    pub hub: Arc<dyn ArtifactHub>,
    /// The most one runtime may take unpacked (`[cache] max_unpacked_size`).
    pub max_unpacked_bytes: u64,
    /// How commands are confined and limited.
    pub sandbox: Arc<Sandbox>,
}

impl std::fmt::Debug for Artifacts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Artifacts")
            .field("cache", &self.cache.dir())
            .field("max_unpacked_bytes", &self.max_unpacked_bytes)
            .field("sandbox", &self.sandbox.name())
            .finish_non_exhaustive()
    }
}

/// The limits the donor and the job together put on one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct JobLimits {
    /// Wall-clock limit for the whole job, checkout included; zero means none.
    pub timeout: Duration,
    /// Log bytes kept (head + tail, see [`OutputCap`]); zero means no cap.
    pub output_cap_bytes: u64,
}

/// How a run ended: everything the agent reports in its `JobResult`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ExecOutcome {
    /// Passed, failed, timed out, cancelled or infrastructure error.
    pub outcome: Outcome,
    /// Exit code of the last command run, when it exited normally.
    pub exit_code: Option<i32>,
    /// Human-readable reason for anything but a pass; empty on a pass.
    pub detail: String,
    /// Wall time from the start of the run to its outcome (checkout
    /// included, cleanup excluded).
    pub duration: Duration,
    /// Unix time in milliseconds the first command started (the start of
    /// the run if no command started).
    pub started_at_ms: u64,
    /// Log bytes cut from the middle to stay under the output cap.
    pub log_bytes_cut: u64,
    /// SHA-256 (lowercase hex) of the artifact the job uploaded; empty if none.
    pub artifact_sha256: String,
    /// The job's report files, as read after its commands.
    pub reports: Vec<ReportFile>,
}

/// Runs `spec` in a fresh directory under `work_root`, streaming capped output
/// to `log`.
///
/// The `log` receiver gets the head of the output live (chunks of at most
/// 64 KiB), then the cut notice and the tail when the job ends; it should keep
/// draining, since a full channel eventually pauses the job's output (the
/// timeout and `cancel` still work). If the receiver is dropped, the job keeps
/// running and its output is discarded. Firing `cancel` kills the job and
/// ends it as [`Outcome::Cancelled`]. `artifacts` provides the runtime a job
/// names and takes the one it builds.
pub(crate) async fn run_job(
    job: &JobRef,
    spec: &JobSpec,
    work_root: &Path,
    limits: JobLimits,
    log: mpsc::Sender<LogItem>,
    cancel: CancellationToken,
    artifacts: &Artifacts,
) -> ExecOutcome {
    let started = Instant::now();
    let run_started_ms = unix_ms();
    let deadline = if limits.timeout.is_zero() {
        None
    } else {
        // A timeout too large to add is no timeout at all.
        started.checked_add(limits.timeout)
    };
    let mut run = Run {
        sink: LogSink::new(limits.output_cap_bytes),
        tx: log,
        cancel,
        deadline,
        timeout: limits.timeout,
        first_command_ms: None,
        artifact_sha256: String::new(),
        reports: Vec::new(),
    };

    let (finish, duration) = if let Some(stop) = run.stop_requested() {
        (Finish::stopped(stop, run.timeout), started.elapsed())
    } else {
        let name = format!("job-{}-{}", job.job_id, job.attempt);
        match WorkDir::create(work_root, &name).await {
            Err(detail) => (Finish::error(detail), started.elapsed()),
            Ok(workdir) => {
                let finish = run.run_in(job, spec, workdir.path(), artifacts).await;
                let duration = started.elapsed();
                let path = workdir.path().to_path_buf();
                if let Err(e) = workdir.remove().await {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove work directory");
                    run.sink.system(&format!(
                        "[trunkfarm: cannot remove work directory {}: {e}]\n",
                        path.display()
                    ));
                }
                (finish, duration)
            }
        }
    };

    if finish.outcome != Outcome::Passed {
        run.sink
            .system(&format!("[trunkfarm: {}]\n", finish.detail));
    }
    let log_bytes_cut = run.sink.finish(&run.tx).await;
    ExecOutcome {
        outcome: finish.outcome,
        exit_code: finish.exit_code,
        detail: finish.detail,
        duration,
        started_at_ms: run.first_command_ms.unwrap_or(run_started_ms),
        log_bytes_cut,
        artifact_sha256: std::mem::take(&mut run.artifact_sha256),
        reports: std::mem::take(&mut run.reports),
    }
}

/// The result of a run before it is dressed up as an [`ExecOutcome`].
#[derive(Debug)]
struct Finish {
    /// How the run ended.
    outcome: Outcome,
    /// Exit code of the last command, when it exited normally.
    exit_code: Option<i32>,
    /// Why, for anything but a pass.
    detail: String,
}

impl Finish {
    /// Every command exited 0 (the last one with `exit_code`).
    fn passed(exit_code: Option<i32>) -> Self {
        Finish {
            outcome: Outcome::Passed,
            exit_code,
            detail: String::new(),
        }
    }

    /// A command failed: the project's fault.
    fn failed(exit_code: Option<i32>, detail: String) -> Self {
        Finish {
            outcome: Outcome::Failed,
            exit_code,
            detail,
        }
    }

    /// The farm's fault: the job never got a fair chance to run.
    fn error(detail: String) -> Self {
        Finish {
            outcome: Outcome::Error,
            exit_code: None,
            detail,
        }
    }

    /// The job was stopped from outside (timeout or cancel).
    fn stopped(stop: Stop, timeout: Duration) -> Self {
        let (outcome, detail) = match stop {
            Stop::TimedOut => (
                Outcome::TimedOut,
                format!("timed out after {}", humantime::format_duration(timeout)),
            ),
            Stop::Cancelled => (Outcome::Cancelled, "cancelled".to_owned()),
            Stop::Disk { used, limit } => (Outcome::Failed, disk_detail(used, limit)),
        };
        Finish {
            outcome,
            exit_code: None,
            detail,
        }
    }
}

/// Why a job was stopped before it ended on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// The job's timeout passed.
    TimedOut,
    /// The cancel token fired.
    Cancelled,
    /// The job's directories took more disk than `job_disk` allows.
    Disk {
        /// Bytes they took.
        used: u64,
        /// `job_disk`.
        limit: u64,
    },
}

/// The detail of a job stopped for its disk use.
fn disk_detail(used: u64, limit: u64) -> String {
    format!(
        "the job used {} of disk in its work directory and /tmp, more than this donor's \
         job_disk = {}",
        fmt_bytes(used),
        fmt_bytes(limit)
    )
}

/// How one process (a git step or a command) ended.
#[derive(Debug)]
struct ProcEnd {
    /// The leader's exit status; `None` if it had not been reaped when the
    /// agent gave up on it (only after a stop).
    status: Option<io::Result<ExitStatus>>,
    /// Set when the process was killed because of a timeout or cancel.
    stop: Option<Stop>,
    /// The last [`KEEP_TAIL`] bytes the process wrote to stdout.
    stdout_tail: Vec<u8>,
    /// The last [`KEEP_TAIL`] bytes the process wrote to stderr.
    stderr_tail: Vec<u8>,
}

impl ProcEnd {
    /// True if the process ran to its end and exited 0.
    fn succeeded(&self) -> bool {
        self.stop.is_none() && matches!(&self.status, Some(Ok(s)) if s.success())
    }
}

/// The state of one run: where its output goes and what may stop it.
struct Run {
    /// Capped log capture plus the live chunks not yet handed to `tx`.
    sink: LogSink,
    /// The log receiver.
    tx: mpsc::Sender<LogItem>,
    /// Fired to cancel the job.
    cancel: CancellationToken,
    /// When the job times out, if it has a timeout.
    deadline: Option<Instant>,
    /// The configured timeout, for the detail.
    timeout: Duration,
    /// Unix time in ms the first command was started.
    first_command_ms: Option<u64>,
    /// The hash of the artifact the job uploaded.
    artifact_sha256: String,
    /// The job's reports.
    reports: Vec<ReportFile>,
}

impl Run {
    /// Reports a cancel or timeout that already happened, so that no new
    /// process is started after one.
    fn stop_requested(&self) -> Option<Stop> {
        if self.cancel.is_cancelled() {
            Some(Stop::Cancelled)
        } else if self.deadline.is_some_and(|d| Instant::now() >= d) {
            Some(Stop::TimedOut)
        } else {
            None
        }
    }

    /// Checks out the repository (if any), installs the runtime (if any),
    /// runs the commands in `workdir`, then reads the reports and publishes
    /// the build (if any).
    async fn run_in(
        &mut self,
        job: &JobRef,
        spec: &JobSpec,
        workdir: &Path,
        artifacts: &Artifacts,
    ) -> Finish {
        let prefix = match spec.upload_prefix.as_str() {
            "" => None,
            given => match check_upload_prefix(given) {
                Ok(rel) => Some(workdir.join(rel)),
                Err(detail) => return Finish::error(detail),
            },
        };
        let runtime_sha = match spec.artifact_sha256.as_str() {
            "" => None,
            given => match cache::parse_sha256(given) {
                Ok(sha) => Some(sha),
                Err(detail) => return Finish::error(format!("invalid artifact_sha256: {detail}")),
            },
        };
        let mut command_dir = workdir.to_path_buf();
        let mut commit_time = None;
        if let Some(repo) = spec.repository.as_ref().filter(|r| !r.url.is_empty()) {
            let src = workdir.join("src");
            match self.checkout(repo, workdir, &src).await {
                Ok(time) => commit_time = time,
                Err(finish) => return finish,
            }
            command_dir = src;
        }
        if let Some(detail) = invalid_env(spec) {
            return Finish::error(detail);
        }

        // The agent's variables win over the job's, like TRUNKFARM_JOB_ID.
        let mut env: Vec<(&str, std::ffi::OsString)> = Vec::new();
        if let Some(sha) = &runtime_sha {
            let runtime = workdir.join(RUNTIME_DIR);
            if let Err(finish) = self.install_runtime(sha, &runtime, artifacts).await {
                return finish;
            }
            let base_path = spec
                .env
                .get("PATH")
                .map(std::ffi::OsString::from)
                .or_else(|| std::env::var_os("PATH"))
                .unwrap_or_else(|| DEFAULT_PATH.into());
            let mut path = runtime.join("bin").into_os_string();
            if !base_path.is_empty() {
                path.push(":");
                path.push(&base_path);
            }
            env.push(("PATH", path));
            env.push(("TRUNKFARM_RUNTIME_PREFIX", runtime.into_os_string()));
        }
        if let Some(prefix) = &prefix {
            if let Err(e) = tokio::fs::create_dir_all(prefix).await {
                return Finish::error(format!(
                    "cannot create the build's prefix {}: {e}",
                    prefix.display()
                ));
            }
            env.push(("PREFIX", prefix.clone().into_os_string()));
        }
        // A build's file times: the job's SOURCE_DATE_EPOCH, else its
        // commit's time, given to the build (tools that honour it embed it)
        // and the newest mtime the packer writes, so two honest builds of
        // one commit pack to the same bytes (`build_on = "any"`).
        let clamp_mtime = prefix.as_ref().and_then(|_| {
            spec.env
                .get(SOURCE_DATE_EPOCH)
                .and_then(|v| v.trim().parse().ok())
                .or(commit_time)
        });
        if let Some(time) = clamp_mtime.filter(|_| !spec.env.contains_key(SOURCE_DATE_EPOCH)) {
            env.push((SOURCE_DATE_EPOCH, time.to_string().into()));
        }

        let finish = self
            .run_commands(job, spec, workdir, &command_dir, &env, &artifacts.sandbox)
            .await;
        if matches!(finish.outcome, Outcome::Passed | Outcome::Failed)
            && !spec.report_paths.is_empty()
        {
            self.collect_reports(&command_dir, &spec.report_paths).await;
        }
        match (&prefix, finish.outcome) {
            (Some(prefix), Outcome::Passed) => {
                match self
                    .publish(
                        job,
                        prefix,
                        clamp_mtime,
                        workdir,
                        finish.exit_code,
                        artifacts,
                    )
                    .await
                {
                    Ok(()) => finish,
                    Err(finish) => finish,
                }
            }
            _ => finish,
        }
    }

    /// Runs the job's commands in its sandbox (see [`Sandbox::confine`]),
    /// one after another, stopping at the first that fails; `env` is added
    /// to each command's environment last. Whatever of the job still runs
    /// afterwards is killed.
    async fn run_commands(
        &mut self,
        job: &JobRef,
        spec: &JobSpec,
        workdir: &Path,
        command_dir: &Path,
        env: &[(&str, std::ffi::OsString)],
        sandbox: &Sandbox,
    ) -> Finish {
        // The runtime the agent unpacked is not the job's to change.
        let read_only = if spec.artifact_sha256.is_empty() {
            Vec::new()
        } else {
            vec![workdir.join(RUNTIME_DIR)]
        };
        let name = format!("job-{}-{}", job.job_id, job.attempt);
        let mut confinement = match sandbox.confine(&name, workdir, read_only) {
            Ok(confinement) => confinement,
            Err(detail) => return Finish::error(detail),
        };
        if confinement.sandboxed() {
            let limits = confinement.limits();
            let network = match (spec.network, confinement.network_allowed()) {
                (true, true) => "network",
                (true, false) => {
                    "no network (the job asks for it; this donor does not allow it: allow_network)"
                }
                (false, _) => "no network",
            };
            self.sink.system(&format!(
                "[trunkfarm: sandbox: bubblewrap, {network}, memory {}, {} processes, {} of disk]\n",
                fmt_bytes(limits.memory),
                limits.processes,
                fmt_bytes(limits.disk)
            ));
        }
        let finish = self
            .run_confined(job, spec, workdir, command_dir, env, &mut confinement)
            .await;
        confinement.close().await;
        finish
    }

    /// [`Run::run_commands`] once the job is confined.
    async fn run_confined(
        &mut self,
        job: &JobRef,
        spec: &JobSpec,
        workdir: &Path,
        command_dir: &Path,
        env: &[(&str, std::ffi::OsString)],
        confinement: &mut Confinement<'_>,
    ) -> Finish {
        let total = spec.commands.len();
        let mut last_code = None;
        for (index, command) in spec.commands.iter().enumerate() {
            let number = index + 1;
            if let Some(stop) = self.stop_requested() {
                return Finish::stopped(stop, self.timeout);
            }
            self.sink.system(&format!("$ {command}\n"));
            let cannot_start = |e: io::Error| {
                format!("cannot start command {number} of {total} with {SHELL}: {e}")
            };
            let mut launch = match confinement.command(
                SHELL,
                &[OsStr::new("-c"), OsStr::new(command)],
                command_dir,
                spec.network,
            ) {
                Ok(launch) => launch,
                Err(e) => return Finish::error(cannot_start(e)),
            };
            launch
                .cmd
                .env("GIT_TERMINAL_PROMPT", "0")
                .envs(&spec.env)
                .env("TRUNKFARM_JOB_ID", job.job_id.to_string())
                .env("TRUNKFARM_ATTEMPT", job.attempt.to_string())
                .env("TRUNKFARM_WORK_DIR", workdir)
                .envs(env.iter().map(|(k, v)| (*k, v)));
            self.first_command_ms.get_or_insert_with(unix_ms);
            let end = match self
                .run_process(
                    launch.cmd,
                    LogStream::Stdout,
                    LogStream::Stderr,
                    Some(&*confinement),
                )
                .await
            {
                Ok(end) => end,
                Err(e) => return Finish::error(cannot_start(e)),
            };
            let notes = confinement.limit_notes();
            for note in &notes {
                self.sink.system(&format!("[trunkfarm: {note}]\n"));
            }
            if let Some(stop) = end.stop {
                return Finish::stopped(stop, self.timeout);
            }
            if !launch.probe.sandbox_started() {
                return Finish::error(format!(
                    "the sandbox could not start command {number} of {total}: {}",
                    String::from_utf8_lossy(&end.stderr_tail).trim()
                ));
            }
            let limit = confinement.limits().disk;
            if limit != u64::MAX {
                let used = confinement.disk_used().await;
                if used > limit {
                    return Finish::failed(None, disk_detail(used, limit));
                }
            }
            let status = match end.status {
                Some(Ok(status)) => status,
                Some(Err(e)) => {
                    return Finish::error(format!(
                        "lost track of command {number} of {total}: {e}"
                    ));
                }
                None => {
                    return Finish::error(format!(
                        "command {number} of {total} did not report an exit status"
                    ));
                }
            };
            // A failure at a limit says so (the kernel's SIGKILL alone does not).
            let failed = |code: Option<i32>, detail: String| {
                if notes.is_empty() {
                    Finish::failed(code, detail)
                } else {
                    Finish::failed(code, format!("{detail}: {}", notes.join("; ")))
                }
            };
            match (status.code(), status.signal()) {
                (Some(0), _) => last_code = Some(0),
                (Some(127), _) => {
                    return failed(
                        Some(127),
                        format!("command not found (exit 127): {}", short(command)),
                    );
                }
                (Some(code), _) => {
                    let hint = code
                        .checked_sub(128)
                        .and_then(signal_name)
                        .map(|name| format!(" (the shell's way of saying killed by {name})"))
                        .unwrap_or_default();
                    return failed(
                        Some(code),
                        format!("command {number} of {total} exited with status {code}{hint}"),
                    );
                }
                (None, Some(signal)) => {
                    let name = signal_name(signal).unwrap_or("an unknown signal");
                    return failed(
                        None,
                        format!(
                            "command {number} of {total} was killed by signal {signal} ({name})"
                        ),
                    );
                }
                (None, None) => {
                    return failed(
                        None,
                        format!("command {number} of {total} ended with {status}"),
                    );
                }
            }
        }
        Finish::passed(last_code)
    }

    /// Gets the runtime `sha` (cached or downloaded) and unpacks it into
    /// `dir`. Any failure is an infrastructure error.
    async fn install_runtime(
        &mut self,
        sha: &str,
        dir: &Path,
        artifacts: &Artifacts,
    ) -> Result<(), Finish> {
        let sha12 = cache::short(sha).to_owned();
        let lease = self
            .through_hub_outages(CacheError::hub_unreachable, || {
                artifacts.cache.get(sha, &*artifacts.hub)
            })
            .await?
            .map_err(|e| Finish::error(format!("cannot get the runtime {sha12}: {e}")))?;
        match lease.source() {
            Source::Cached => self
                .sink
                .system(&format!("[trunkfarm: runtime {sha12}: cached]\n")),
            Source::Downloaded { bytes, .. } => self.sink.system(&format!(
                "[trunkfarm: runtime {sha12}: downloaded {}]\n",
                fmt_bytes(bytes)
            )),
        }
        let limits = UnpackLimits {
            max_bytes: artifacts.max_unpacked_bytes,
            max_entries: unpack::MAX_ENTRIES,
        };
        let dest = dir.to_path_buf();
        let stats = self
            .blocking(move |cancel| {
                let stats = unpack_cached(lease, &dest, &limits, &cancel);
                // Its files are closed: no fork may hold them once run.
                spawn_gate::wait_for_forks();
                stats
            })
            .await?
            .map_err(Finish::error)?;
        self.sink.system(&format!(
            "[trunkfarm: runtime {sha12} unpacked into {}: {} files, {}]\n",
            dir.display(),
            stats.files + stats.hard_links,
            fmt_bytes(stats.bytes)
        ));
        Ok(())
    }

    /// Reads the job's report files (relative to `base`, the checkout) into
    /// the result, noting in the log those that could not be read.
    async fn collect_reports(&mut self, base: &Path, paths: &[String]) {
        let base = base.to_path_buf();
        let paths_owned = paths.to_vec();
        let reports = tokio::task::spawn_blocking(move || reports::collect(&base, &paths_owned))
            .await
            .unwrap_or_default();
        if paths.len() > reports::MAX_REPORT_FILES {
            self.sink.system(&format!(
                "[trunkfarm: only the first {} report paths are read]\n",
                reports::MAX_REPORT_FILES
            ));
        }
        for report in &reports {
            if !report.error.is_empty() {
                self.sink.system(&format!(
                    "[trunkfarm: report {}: {}]\n",
                    report.path, report.error
                ));
            } else if report.truncated {
                self.sink.system(&format!(
                    "[trunkfarm: report {}: cut to its first {}]\n",
                    report.path,
                    fmt_bytes(report.data.len() as u64)
                ));
            }
        }
        self.reports = reports;
    }

    /// Packs the build's `prefix` (file times clamped to `clamp_mtime`) and
    /// uploads it. An empty prefix is the build's failure; packing and
    /// upload failures are infrastructure errors (the hub retries the build
    /// elsewhere).
    async fn publish(
        &mut self,
        job: &JobRef,
        prefix: &Path,
        clamp_mtime: Option<u64>,
        workdir: &Path,
        exit_code: Option<i32>,
        artifacts: &Artifacts,
    ) -> Result<(), Finish> {
        let out_dir = workdir.join(PACK_DIR);
        tokio::fs::create_dir(&out_dir).await.map_err(|e| {
            Finish::error(format!(
                "cannot create {} to pack the build: {e}",
                out_dir.display()
            ))
        })?;
        let src = prefix.to_path_buf();
        let out = out_dir.join("artifact.tar.zst");
        let packed = self
            .blocking(move |cancel| pack::pack(&src, &out, clamp_mtime, &cancel))
            .await?
            .map_err(|e| match e {
                pack::PackError::NotADirectory(_) => Finish::failed(
                    exit_code,
                    format!("the build commands passed but $PREFIX is gone: {e}"),
                ),
                e @ pack::PackError::LinkOutside { .. } => Finish::failed(exit_code, e.to_string()),
                e => Finish::error(format!("cannot pack $PREFIX: {e}")),
            })?;
        for skipped in &packed.skipped {
            self.sink.system(&format!(
                "[trunkfarm: not packed (not a file, directory or symlink): {}]\n",
                skipped.display()
            ));
        }
        if packed.files + packed.symlinks == 0 {
            return Err(Finish::failed(
                exit_code,
                "the build commands passed but installed nothing into $PREFIX".to_owned(),
            ));
        }
        let sha12 = cache::short(&packed.sha256).to_owned();
        self.sink.system(&format!(
            "[trunkfarm: packed $PREFIX: {} files, {} symlinks, {} compressed, sha256 {sha12}]\n",
            packed.files,
            packed.symlinks,
            fmt_bytes(packed.size_bytes)
        ));
        let response = self
            .through_hub_outages(UploadError::hub_unreachable, || {
                pack::upload(&*artifacts.hub, *job, &packed)
            })
            .await?
            .map_err(|e| Finish::error(e.to_string()))?;
        self.sink.system(&format!(
            "[trunkfarm: uploaded runtime {sha12} ({}){}]\n",
            fmt_bytes(packed.size_bytes),
            if response.already_present {
                "; the hub already had it"
            } else {
                ""
            }
        ));
        self.artifact_sha256 = packed.sha256;
        Ok(())
    }

    /// Runs `call` (a download or upload through the hub) again while it
    /// fails because the hub cannot be reached (`unreachable`), for up to
    /// [`HUB_OUTAGE_PATIENCE`] from the first such failure (however long the
    /// call took), each try noted in the job's log; any other answer is
    /// returned. Stops with the job.
    async fn through_hub_outages<T, E, F>(
        &mut self,
        unreachable: fn(&E) -> bool,
        mut call: impl FnMut() -> F,
    ) -> Result<Result<T, E>, Finish>
    where
        F: std::future::Future<Output = Result<T, E>>,
        E: std::fmt::Display,
    {
        let mut since: Option<Instant> = None;
        let mut backoff = Backoff::new(HUB_OUTAGE_MAX_PAUSE);
        loop {
            let out = self.until_stopped(call()).await?;
            match &out {
                Err(e)
                    if unreachable(e)
                        && since.get_or_insert_with(Instant::now).elapsed()
                            < HUB_OUTAGE_PATIENCE =>
                {
                    let pause = backoff.next_delay();
                    let pause_ms = Duration::from_millis(pause.as_millis().try_into().unwrap_or(0));
                    tracing::info!("the hub cannot be reached, trying again in {pause_ms:?}: {e}");
                    self.sink.system(&format!(
                        "[trunkfarm: {e}; the hub may be restarting: trying again in {}]\n",
                        humantime::format_duration(pause_ms)
                    ));
                    self.until_stopped(tokio::time::sleep(pause)).await?;
                }
                _ => return Ok(out),
            }
        }
    }

    /// Runs `work` unless the job is stopped first (timeout or cancel), in
    /// which case `work` is dropped and the stop is returned.
    async fn until_stopped<F: std::future::Future>(&self, work: F) -> Result<F::Output, Finish> {
        if let Some(stop) = self.stop_requested() {
            return Err(Finish::stopped(stop, self.timeout));
        }
        tokio::select! {
            biased;
            () = self.cancel.cancelled() => Err(Finish::stopped(Stop::Cancelled, self.timeout)),
            () = sleep_until(self.deadline) => Err(Finish::stopped(Stop::TimedOut, self.timeout)),
            out = work => Ok(out),
        }
    }

    /// Runs blocking `work` on the blocking pool. If the job is stopped
    /// meanwhile, the flag handed to `work` is set and the work is waited for
    /// (it must check the flag and give up), so nothing still writes into the
    /// work directory when it is removed.
    async fn blocking<T, F>(&self, work: F) -> Result<T, Finish>
    where
        T: Send + 'static,
        F: FnOnce(Arc<AtomicBool>) -> T + Send + 'static,
    {
        let flag = Arc::new(AtomicBool::new(false));
        let task_flag = flag.clone();
        let mut task = tokio::task::spawn_blocking(move || work(task_flag));
        match self.until_stopped(&mut task).await {
            Ok(joined) => {
                joined.map_err(|e| Finish::error(format!("the agent's worker thread failed: {e}")))
            }
            Err(stopped) => {
                flag.store(true, Ordering::Relaxed);
                let _ = task.await;
                Err(stopped)
            }
        }
    }

    /// Checks `repo` out into `src` (detached at the wanted revision) with
    /// the git CLI. Any failure is an infrastructure error, not the job's.
    /// Returns the commit's committer time (seconds since the epoch), when
    /// git tells it: a build's `SOURCE_DATE_EPOCH`.
    async fn checkout(
        &mut self,
        repo: &Repository,
        workdir: &Path,
        src: &Path,
    ) -> Result<Option<u64>, Finish> {
        let url = repo.url.as_str();
        let shown_url = redact_url(url);
        let rev = repo.rev.as_str();
        let shown_rev = if rev.is_empty() {
            "the default branch"
        } else {
            rev
        };
        let fail = |what: String| {
            Finish::error(format!(
                "checkout of {shown_url} at {shown_rev} failed: {what}"
            ))
        };
        // A revision starting with '-' would be read as an option by git.
        if rev.starts_with('-') || rev.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(fail(format!("invalid revision {rev:?}")));
        }
        // The URL's credentials go to the fetches through their environment,
        // never their arguments (`ps` shows those to every local user).
        let remote = GitRemote::parse(url).map_err(|e| fail(e.to_string()))?;
        let url = remote.url();
        self.sink.system(&format!(
            "[trunkfarm: checking out {shown_url} at {shown_rev}]\n"
        ));

        let end = self
            .git(
                workdir,
                [OsStr::new("init"), OsStr::new("-q"), src.as_os_str()],
                None,
            )
            .await?;
        if !end.succeeded() {
            return Err(fail(format!("git init: {}", git_error(&end))));
        }

        let wanted = if rev.is_empty() { "HEAD" } else { rev };
        let shallow = self
            .git(
                src,
                ["fetch", "--depth", "1", "--no-tags", "--", url, wanted].map(OsStr::new),
                Some(&remote),
            )
            .await?;
        let commit = if shallow.succeeded() {
            "FETCH_HEAD".to_owned()
        } else {
            self.sink
                .system("[trunkfarm: shallow fetch failed; fetching the full history]\n");
            let mut args = vec![
                "fetch",
                "--tags",
                "--",
                url,
                "+refs/heads/*:refs/remotes/origin/*",
            ];
            if rev.is_empty() {
                args.push("+HEAD:refs/trunkfarm/default");
            }
            let full = self
                .git(src, args.iter().map(OsStr::new), Some(&remote))
                .await?;
            if !full.succeeded() {
                return Err(fail(git_error(&full)));
            }
            let candidates = if rev.is_empty() {
                vec!["refs/trunkfarm/default".to_owned()]
            } else {
                vec![
                    rev.to_owned(),
                    format!("refs/remotes/origin/{rev}"),
                    format!("refs/tags/{rev}"),
                ]
            };
            let mut found = None;
            for candidate in candidates {
                let spec = format!("{candidate}^{{commit}}");
                let end = self
                    .git(
                        src,
                        ["rev-parse", "--verify", "--quiet", &spec].map(OsStr::new),
                        None,
                    )
                    .await?;
                if end.succeeded() {
                    let sha = String::from_utf8_lossy(&end.stdout_tail).trim().to_owned();
                    if !sha.is_empty() {
                        found = Some(sha);
                        break;
                    }
                }
            }
            match found {
                Some(sha) => sha,
                None => return Err(fail(format!("no commit named {rev:?} in the repository"))),
            }
        };

        let end = self
            .git(
                src,
                [
                    "-c",
                    "advice.detachedHead=false",
                    "checkout",
                    "-q",
                    "--detach",
                    &commit,
                ]
                .map(OsStr::new),
                None,
            )
            .await?;
        if !end.succeeded() {
            return Err(fail(git_error(&end)));
        }
        let end = self
            .git(
                src,
                ["show", "-s", "--format=%H %ct", "HEAD"].map(OsStr::new),
                None,
            )
            .await?;
        let shown = String::from_utf8_lossy(&end.stdout_tail);
        let (head, time) = shown.trim().split_once(' ').unwrap_or((shown.trim(), ""));
        self.sink
            .system(&format!("[trunkfarm: checked out {head}]\n"));
        Ok(time.parse().ok())
    }

    /// Runs one git command in `dir`, its output going to the log as system
    /// lines. A command talking to `remote` gets its credentials through its
    /// own environment (only git's: the job's commands never see them). A
    /// stop or a git that cannot be started ends the job (`Err`).
    async fn git<I, S>(
        &mut self,
        dir: &Path,
        args: I,
        remote: Option<&GitRemote>,
    ) -> Result<ProcEnd, Finish>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        if let Some(stop) = self.stop_requested() {
            return Err(Finish::stopped(stop, self.timeout));
        }
        let mut cmd = Command::new("git");
        cmd.args(args)
            .current_dir(dir)
            .env("GIT_TERMINAL_PROMPT", "0");
        if let Some(remote) = remote {
            cmd.envs(remote.env());
        }
        // The checkout's files get the job's umask, as its commands' do.
        // SAFETY: umask(2) is async-signal-safe and allocates nothing.
        unsafe {
            cmd.pre_exec(|| {
                libc::umask(crate::fsutil::JOB_UMASK);
                Ok(())
            });
        }
        // ssh asks about unknown host keys on the terminal; never wait for it.
        if std::env::var_os("GIT_SSH_COMMAND").is_none() && std::env::var_os("GIT_SSH").is_none() {
            cmd.env("GIT_SSH_COMMAND", "ssh -o BatchMode=yes");
        }
        match self
            .run_process(cmd, LogStream::System, LogStream::System, None)
            .await
        {
            Ok(end) => match end.stop {
                Some(stop) => Err(Finish::stopped(stop, self.timeout)),
                None => Ok(end),
            },
            Err(e) => Err(Finish::error(format!("cannot run git: {e}"))),
        }
    }

    /// Spawns `cmd` in its own process group with stdin closed, streams its
    /// stdout and stderr (as `out_stream` / `err_stream`) into the log until
    /// it exits, then kills whatever is left of its process group. A timeout
    /// or cancel kills the group at once. `Err` only when it cannot start.
    async fn run_process(
        &mut self,
        mut cmd: Command,
        out_stream: LogStream,
        err_stream: LogStream,
        confinement: Option<&Confinement<'_>>,
    ) -> io::Result<ProcEnd> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = spawn_gate::spawn(&mut cmd)?;
        let group = ProcessGroup::of(child.id());
        let mut stdout = child.stdout.take();
        let mut stderr = child.stderr.take();
        let mut out_buf = vec![0u8; MAX_CHUNK];
        let mut err_buf = vec![0u8; MAX_CHUNK];
        let mut stdout_tail = Vec::new();
        let mut stderr_tail = Vec::new();
        let mut status: Option<io::Result<ExitStatus>> = None;
        let mut stop = None;
        // Once set: stop waiting for the leader and the pipes at this time.
        let mut give_up: Option<Instant> = None;

        let cancelled = self.cancel.cancelled();
        tokio::pin!(cancelled);
        let timed_out = sleep_until(self.deadline);
        tokio::pin!(timed_out);
        let disk_full = async {
            match confinement {
                Some(c) => (c.disk_exceeded().await, c.limits().disk),
                None => std::future::pending().await,
            }
        };
        tokio::pin!(disk_full);

        loop {
            let leader_done = status.is_some();
            if leader_done && stdout.is_none() && stderr.is_none() {
                break;
            }
            let running = !leader_done && stop.is_none();
            // While the job runs, a slow log receiver pauses reading; once it
            // is being killed, read what is left regardless.
            let may_read = !running || self.sink.pending_bytes < MAX_PENDING;
            tokio::select! {
                biased;
                () = &mut cancelled, if running => {
                    group.kill();
                    stop = Some(Stop::Cancelled);
                    give_up = Some(Instant::now() + KILL_GRACE);
                }
                () = &mut timed_out, if running => {
                    group.kill();
                    stop = Some(Stop::TimedOut);
                    give_up = Some(Instant::now() + KILL_GRACE);
                }
                (used, limit) = &mut disk_full, if running => {
                    group.kill();
                    stop = Some(Stop::Disk { used, limit });
                    give_up = Some(Instant::now() + KILL_GRACE);
                }
                () = sleep_until(give_up), if give_up.is_some() => {
                    if stdout.is_some() || stderr.is_some() {
                        self.sink.system(
                            "[trunkfarm: stopped reading output: a process outside the \
                             job's process group still holds it open]\n",
                        );
                    }
                    break;
                }
                result = child.wait(), if !leader_done => {
                    // Children that outlived the leader (`sleep 1000 &`) go too.
                    group.kill();
                    status = Some(result);
                    let bound = Instant::now() + DRAIN_BOUND;
                    give_up = Some(give_up.map_or(bound, |g| g.min(bound)));
                }
                permit = self.tx.reserve(), if self.sink.has_pending() => {
                    self.sink.send_one(permit);
                }
                read = read_pipe(&mut stdout, &mut out_buf), if may_read && stdout.is_some() => {
                    match read {
                        Ok(n) if n > 0 => {
                            let data = &out_buf[..n];
                            keep_tail(&mut stdout_tail, data);
                            self.sink.write(out_stream, data);
                        }
                        _ => stdout = None,
                    }
                }
                read = read_pipe(&mut stderr, &mut err_buf), if may_read && stderr.is_some() => {
                    match read {
                        Ok(n) if n > 0 => {
                            let data = &err_buf[..n];
                            keep_tail(&mut stderr_tail, data);
                            self.sink.write(err_stream, data);
                        }
                        _ => stderr = None,
                    }
                }
            }
        }
        group.kill();
        Ok(ProcEnd {
            status,
            stop,
            stdout_tail,
            stderr_tail,
        })
    }
}

/// Reads from a pipe that may already be closed (then never completes, so a
/// `select!` branch on it is simply idle).
async fn read_pipe<R: AsyncRead + Unpin>(
    pipe: &mut Option<R>,
    buf: &mut [u8],
) -> io::Result<usize> {
    match pipe {
        Some(reader) => reader.read(buf).await,
        None => std::future::pending().await,
    }
}

/// Sleeps until `at`, or forever when there is no such time.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Appends `data` to `tail`, keeping only its last [`KEEP_TAIL`] bytes.
fn keep_tail(tail: &mut Vec<u8>, data: &[u8]) {
    tail.extend_from_slice(&data[data.len().saturating_sub(KEEP_TAIL)..]);
    if tail.len() > KEEP_TAIL {
        let excess = tail.len() - KEEP_TAIL;
        tail.drain(..excess);
    }
}

/// The process group of one spawned command, killed (SIGKILL to every member)
/// on request and, as a safety net, when dropped, so that even an abandoned
/// run leaves no process behind.
struct ProcessGroup {
    /// The group id (= the leader's pid); `None` if unknown or unsafe to
    /// signal.
    pgid: Option<libc::pid_t>,
}

impl ProcessGroup {
    /// The group led by the process `pid` (spawned with `process_group(0)`).
    fn of(pid: Option<u32>) -> Self {
        // kill(-1) would signal every process we may signal and kill(-0) our
        // own group: only ever signal a real group id.
        let pgid = pid
            .and_then(|p| libc::pid_t::try_from(p).ok())
            .filter(|&p| p > 1);
        ProcessGroup { pgid }
    }

    /// Sends SIGKILL to every process in the group (a no-op once it is empty).
    fn kill(&self) {
        if let Some(pgid) = self.pgid {
            // SAFETY: kill(2) takes plain integers and touches no memory of
            // ours; a negative pid addresses the process group `pgid`.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Capped log capture plus the queue of live chunks waiting for the log
/// receiver; keeps the job running whatever the receiver does.
struct LogSink {
    /// Decides what is kept.
    cap: OutputCap,
    /// Live (head) chunks not yet handed to the receiver.
    pending: VecDeque<LogItem>,
    /// Bytes in `pending`.
    pending_bytes: usize,
    /// The receiver was dropped: discard output from now on.
    receiver_gone: bool,
}

impl LogSink {
    /// An empty sink with the given cap (0 = none).
    fn new(cap: u64) -> Self {
        LogSink {
            cap: OutputCap::new(cap),
            pending: VecDeque::new(),
            pending_bytes: 0,
            receiver_gone: false,
        }
    }

    /// Records bytes the job (or the agent) wrote and queues the part of
    /// them that is streamed live, in chunks of at most [`MAX_CHUNK`].
    fn write(&mut self, stream: LogStream, data: &[u8]) {
        let live = self.cap.push(stream, data);
        if self.receiver_gone || live.is_empty() {
            return;
        }
        self.pending_bytes += live.len();
        let mut rest = live;
        if let Some((last_stream, last)) = self.pending.back_mut()
            && *last_stream == stream
            && last.len() < MAX_CHUNK
        {
            let n = (MAX_CHUNK - last.len()).min(rest.len());
            last.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
        }
        for piece in rest.chunks(MAX_CHUNK) {
            self.pending.push_back((stream, piece.to_vec()));
        }
    }

    /// Writes an agent line (checkout progress, kill reasons) to the log.
    fn system(&mut self, text: &str) {
        self.write(LogStream::System, text.as_bytes());
    }

    /// True if live chunks wait for a receiver that is still there.
    fn has_pending(&self) -> bool {
        !self.receiver_gone && !self.pending.is_empty()
    }

    /// Hands the oldest pending chunk to a reserved slot of the channel, or
    /// notes that the receiver is gone.
    fn send_one(&mut self, permit: Result<mpsc::Permit<'_, LogItem>, mpsc::error::SendError<()>>) {
        match permit {
            Ok(permit) => {
                if let Some(item) = self.pending.pop_front() {
                    self.pending_bytes -= item.1.len();
                    permit.send(item);
                }
            }
            Err(_) => self.receiver_gone(),
        }
    }

    /// The receiver is gone: drop what is queued and stop queuing.
    fn receiver_gone(&mut self) {
        self.receiver_gone = true;
        self.pending.clear();
        self.pending_bytes = 0;
    }

    /// Sends what is queued, then the cut notice and the tail, and returns
    /// the number of bytes cut.
    async fn finish(mut self, tx: &mpsc::Sender<LogItem>) -> u64 {
        while let Some(item) = self.pending.pop_front() {
            if self.receiver_gone || tx.send(item).await.is_err() {
                self.receiver_gone();
                break;
            }
        }
        let end = self.cap.finish();
        if !self.receiver_gone {
            for item in end.chunks {
                if tx.send(item).await.is_err() {
                    break;
                }
            }
        }
        end.bytes_cut
    }
}

/// A job's work directory: created fresh, removed when the run is over (or,
/// as a safety net, when an abandoned run drops it).
struct WorkDir {
    /// The directory; `None` once removed.
    path: Option<PathBuf>,
}

impl WorkDir {
    /// Creates `work_root/name` (and `work_root` if needed), removing a
    /// leftover of an earlier run first. `Err` is the detail of an
    /// infrastructure error naming the path and the OS error.
    async fn create(work_root: &Path, name: &str) -> Result<WorkDir, String> {
        let root = std::path::absolute(work_root)
            .map_err(|e| format!("cannot resolve work root {}: {e}", work_root.display()))?;
        tokio::fs::create_dir_all(&root)
            .await
            .map_err(|e| format!("cannot create work root {}: {e}", root.display()))?;
        let path = root.join(name);
        remove_tree_async(path.clone()).await.map_err(|e| {
            format!(
                "cannot remove leftover work directory {}: {e}",
                path.display()
            )
        })?;
        tokio::fs::create_dir(&path)
            .await
            .map_err(|e| format!("cannot create work directory {}: {e}", path.display()))?;
        Ok(WorkDir { path: Some(path) })
    }

    /// The directory's absolute path.
    fn path(&self) -> &Path {
        self.path.as_deref().unwrap_or(Path::new(""))
    }

    /// Removes the directory and everything in it.
    async fn remove(mut self) -> io::Result<()> {
        match self.path.take() {
            Some(path) => remove_tree_async(path).await,
            None => Ok(()),
        }
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            let _ = remove_tree(&path);
        }
    }
}

/// Checks a job's `upload_prefix`: relative, normal components only, and
/// clear of the directories the agent itself uses (`src`, `runtime`,
/// `.trunkfarm*`). `Err` is the detail of an infrastructure error.
pub(crate) fn check_upload_prefix(given: &str) -> Result<PathBuf, String> {
    let invalid = |why: &str| {
        Err(format!(
            "invalid upload_prefix {given:?}: {why}; expected a relative path such as \"install\""
        ))
    };
    if given.contains('\0') {
        return invalid("it contains a NUL byte");
    }
    let mut rel = PathBuf::new();
    for component in Path::new(given).components() {
        match component {
            std::path::Component::Normal(name) => rel.push(name),
            std::path::Component::CurDir => {}
            _ => return invalid("it must be relative, without `..`"),
        }
    }
    let Some(first) = rel.components().next() else {
        return invalid("it names the job's directory itself");
    };
    let first = first.as_os_str();
    if first == "src" || first == RUNTIME_DIR {
        return invalid(&format!(
            "{:?} is where the agent puts the checkout or the runtime",
            first
        ));
    }
    if first.as_encoded_bytes().starts_with(b".trunkfarm") {
        return invalid("names starting with .trunkfarm are the agent's own");
    }
    Ok(rel)
}

/// Unpacks the leased runtime into `dest`, hashing the file as it is read:
/// a cached copy that no longer matches its hash (disk corruption) is
/// removed from the cache and the job fails with an infrastructure error.
/// `Err` is the job's detail.
fn unpack_cached(
    lease: Lease,
    dest: &Path,
    limits: &UnpackLimits,
    cancel: &AtomicBool,
) -> Result<UnpackStats, String> {
    let sha12 = cache::short(lease.sha256()).to_owned();
    let file = std::fs::File::open(lease.path()).map_err(|e| {
        format!(
            "cannot open the cached runtime {}: {e}",
            lease.path().display()
        )
    })?;
    let mut reader = HashingReader {
        inner: file,
        hasher: Sha256::new(),
    };
    let result = unpack::unpack(&mut reader, dest, limits, cancel);
    if matches!(result, Err(unpack::UnpackError::Cancelled)) {
        return Err("cancelled".to_owned());
    }
    // The decompressor may stop before the end of the file: hash the rest.
    if let Err(e) = io::copy(&mut reader, &mut io::sink()) {
        return Err(format!("cannot read the cached runtime {sha12}: {e}"));
    }
    let got = hex::encode(reader.hasher.finalize());
    if got != lease.sha256() {
        let _ = remove_tree(dest);
        tracing::warn!(
            "the cached artifact {sha12} is corrupt on disk (its SHA-256 is now {got}); deleting it"
        );
        lease.discard();
        return Err(format!(
            "the cached copy of runtime {sha12} is corrupt on disk; it was deleted and will be \
             downloaded again when the job is retried"
        ));
    }
    result.map_err(|e| format!("cannot unpack the runtime {sha12}: {e}"))
}

/// A reader that hashes (SHA-256) everything read through it.
struct HashingReader<R> {
    /// The file.
    inner: R,
    /// The hash so far.
    hasher: Sha256,
}

impl<R: io::Read> io::Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Names an environment variable of the spec the OS cannot take (empty,
/// containing `=` or NUL), as the detail of an infrastructure error.
fn invalid_env(spec: &JobSpec) -> Option<String> {
    let mut keys: Vec<&String> = spec.env.keys().collect();
    keys.sort();
    for key in keys {
        if key.is_empty() || key.contains(['=', '\0']) {
            return Some(format!("invalid environment variable name {key:?}"));
        }
        if spec.env.get(key).is_some_and(|v| v.contains('\0')) {
            return Some(format!(
                "environment variable {key} has a NUL byte in its value"
            ));
        }
    }
    None
}

/// The last lines of what a failed git command said on stderr (or a note that
/// it said nothing), for the job's detail.
fn git_error(end: &ProcEnd) -> String {
    let text = String::from_utf8_lossy(&end.stderr_tail);
    let text = text.trim();
    if !text.is_empty() {
        return text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
    }
    match &end.status {
        Some(Ok(status)) => format!("git {status}"),
        Some(Err(e)) => format!("git: {e}"),
        None => "git did not exit".to_owned(),
    }
}

/// A command shortened for a detail: trimmed, at most [`DETAIL_COMMAND_MAX`]
/// characters.
fn short(command: &str) -> String {
    let command = command.trim();
    match command.char_indices().nth(DETAIL_COMMAND_MAX) {
        Some((cut, _)) => format!("{}…", &command[..cut]),
        None => command.to_owned(),
    }
}

/// The conventional name of a signal number, for details.
fn signal_name(signal: i32) -> Option<&'static str> {
    Some(match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGSYS => "SIGSYS",
        _ => return None,
    })
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::collections::HashMap;
    use std::os::unix::fs::PermissionsExt as _;
    use std::sync::atomic::Ordering::SeqCst;

    use tonic::Status;

    use crate::transfer::fake::FakeHub;

    /// The job every test runs as.
    const JOB: JobRef = JobRef {
        job_id: 7,
        attempt: 1,
    };

    /// A spec running `commands` with no repository.
    fn spec(commands: &[&str]) -> JobSpec {
        JobSpec {
            commands: commands.iter().map(|c| (*c).to_owned()).collect(),
            ..JobSpec::default()
        }
    }

    /// A build running `commands` that publishes `$PREFIX` (`install`).
    fn build_spec(commands: &[&str]) -> JobSpec {
        JobSpec {
            upload_prefix: "install".into(),
            ..spec(commands)
        }
    }

    /// Limits with the given timeout and no output cap.
    fn limits(timeout: Duration) -> JobLimits {
        JobLimits {
            timeout,
            output_cap_bytes: 0,
        }
    }

    /// Artifacts backed by `hub`, with a cache in `dir`.
    fn artifacts(dir: &Path, hub: Arc<FakeHub>) -> Artifacts {
        Artifacts {
            cache: ArtifactCache::open(dir.join("cache"), 1 << 30).unwrap(),
            hub,
            max_unpacked_bytes: 1 << 30,
            sandbox: Arc::new(Sandbox::unconfined()),
        }
    }

    /// Runs a job with `artifacts`, collecting everything sent to the log.
    async fn run_full(
        spec: &JobSpec,
        root: &Path,
        limits: JobLimits,
        cancel: CancellationToken,
        artifacts: &Artifacts,
    ) -> (ExecOutcome, Vec<LogItem>) {
        let (tx, mut rx) = mpsc::channel(4);
        let collector = tokio::spawn(async move {
            let mut items = Vec::new();
            while let Some(item) = rx.recv().await {
                items.push(item);
            }
            items
        });
        let outcome = run_job(&JOB, spec, root, limits, tx, cancel, artifacts).await;
        let log = collector.await.expect("collector");
        (outcome, log)
    }

    /// Runs a job (with an empty in-memory hub), collecting everything sent
    /// to the log.
    async fn run_with(
        spec: &JobSpec,
        root: &Path,
        limits: JobLimits,
        cancel: CancellationToken,
    ) -> (ExecOutcome, Vec<LogItem>) {
        let cache = tempfile::tempdir().unwrap();
        let artifacts = artifacts(cache.path(), Arc::new(FakeHub::default()));
        run_full(spec, root, limits, cancel, &artifacts).await
    }

    /// Runs a job without timeout, cap or cancel.
    /// [`run_full`] with no cancel.
    async fn run_arts(
        spec: &JobSpec,
        root: &Path,
        limits: JobLimits,
        artifacts: &Artifacts,
    ) -> (ExecOutcome, Vec<LogItem>) {
        run_full(spec, root, limits, CancellationToken::new(), artifacts).await
    }

    async fn run(spec: &JobSpec, root: &Path) -> (ExecOutcome, Vec<LogItem>) {
        run_with(spec, root, limits(Duration::ZERO), CancellationToken::new()).await
    }

    /// The bytes of one stream of the log, concatenated.
    fn stream_text(log: &[LogItem], stream: LogStream) -> String {
        let bytes: Vec<u8> = log
            .iter()
            .filter(|(s, _)| *s == stream)
            .flat_map(|(_, d)| d.iter().copied())
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The whole log, all streams, in order.
    fn all_text(log: &[LogItem]) -> String {
        let bytes: Vec<u8> = log.iter().flat_map(|(_, d)| d.iter().copied()).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The work directory `run_job` uses for [`JOB`] under `root`.
    fn job_dir(root: &Path) -> PathBuf {
        root.join("job-7-1")
    }

    /// Reads a pid a test command wrote.
    fn read_pid(path: &Path) -> libc::pid_t {
        let text = std::fs::read_to_string(path).expect("pid file");
        text.trim().parse().expect("pid")
    }

    /// True once `pid` no longer runs: gone (ESRCH) or a zombie. Zombies
    /// count as dead because an orphan is reaped by PID 1, and in some
    /// containers PID 1 never reaps. Retries for a while since killing and
    /// reaping lag.
    async fn wait_dead(pid: libc::pid_t) -> bool {
        for _ in 0..100 {
            // SAFETY: kill(2) with signal 0 only checks for existence.
            let rc = unsafe { libc::kill(pid, 0) };
            if rc == -1 && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
                return true;
            }
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim().chars().next());
            if matches!(state, Some('Z') | Some('X')) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// Kills a process a test may have leaked, so a failing test does not
    /// leave a `sleep 300` behind.
    fn kill_leftover(pid: libc::pid_t) {
        if pid > 1 {
            // SAFETY: plain signal to a pid the test itself started.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }

    #[tokio::test]
    async fn passing_job() {
        let root = tempfile::tempdir().unwrap();
        let (out, log) = run(&spec(&["echo hello", "echo oops >&2"]), root.path()).await;
        assert_eq!(out.outcome, Outcome::Passed, "{out:?}");
        assert_eq!(out.exit_code, Some(0));
        assert_eq!(out.detail, "");
        assert_eq!(out.log_bytes_cut, 0);
        assert!(out.started_at_ms > 1_600_000_000_000);
        assert_eq!(stream_text(&log, LogStream::Stdout), "hello\n");
        assert_eq!(stream_text(&log, LogStream::Stderr), "oops\n");
        assert_eq!(
            stream_text(&log, LogStream::System),
            "$ echo hello\n$ echo oops >&2\n"
        );
        assert_eq!(
            all_text(&log),
            "$ echo hello\nhello\n$ echo oops >&2\noops\n"
        );
        assert!(!job_dir(root.path()).exists());
    }

    #[tokio::test]
    async fn no_commands_passes() {
        let root = tempfile::tempdir().unwrap();
        let (out, log) = run(&spec(&[]), root.path()).await;
        assert_eq!(out.outcome, Outcome::Passed);
        assert_eq!(out.exit_code, None);
        assert!(log.is_empty());
    }

    #[tokio::test]
    async fn failing_job_stops_at_the_first_failure() {
        let root = tempfile::tempdir().unwrap();
        let (out, log) = run(
            &spec(&["true", "echo half; exit 3", "echo never"]),
            root.path(),
        )
        .await;
        assert_eq!(out.outcome, Outcome::Failed);
        assert_eq!(out.exit_code, Some(3));
        assert_eq!(out.detail, "command 2 of 3 exited with status 3");
        let text = all_text(&log);
        assert!(text.contains("half\n"));
        assert!(!text.contains("never"), "{text}");
        assert!(text.ends_with("[trunkfarm: command 2 of 3 exited with status 3]\n"));
        assert!(!job_dir(root.path()).exists());
    }

    #[tokio::test]
    async fn command_not_found() {
        let root = tempfile::tempdir().unwrap();
        let (out, log) = run(&spec(&["trunkfarm-no-such-command --flag"]), root.path()).await;
        assert_eq!(out.outcome, Outcome::Failed);
        assert_eq!(out.exit_code, Some(127));
        assert_eq!(
            out.detail,
            "command not found (exit 127): trunkfarm-no-such-command --flag"
        );
        assert!(stream_text(&log, LogStream::Stderr).contains("not found"));
    }

    #[tokio::test]
    async fn killed_by_a_signal() {
        let root = tempfile::tempdir().unwrap();
        let (out, _) = run(&spec(&["kill -SEGV $$"]), root.path()).await;
        assert_eq!(out.outcome, Outcome::Failed);
        assert_eq!(out.exit_code, None);
        assert_eq!(
            out.detail,
            "command 1 of 1 was killed by signal 11 (SIGSEGV)"
        );
    }

    #[tokio::test]
    async fn shell_reported_signal_gets_a_hint() {
        let root = tempfile::tempdir().unwrap();
        let (out, _) = run(&spec(&["exit 137"]), root.path()).await;
        assert_eq!(out.outcome, Outcome::Failed);
        assert_eq!(out.exit_code, Some(137));
        assert!(out.detail.contains("status 137"), "{}", out.detail);
        assert!(out.detail.contains("SIGKILL"), "{}", out.detail);
    }

    #[tokio::test]
    async fn environment_is_passed() {
        let root = tempfile::tempdir().unwrap();
        let mut spec = spec(&[
            r#"test "$FOO" = "bar baz""#,
            r#"test "$TRUNKFARM_JOB_ID" = 7 && test "$TRUNKFARM_ATTEMPT" = 1"#,
            r#"test "$TRUNKFARM_WORK_DIR" = "$PWD" && test -n "$PATH""#,
            r#"test "$TRUNKFARM_ATTEMPT" = 1"#,
            r#"echo "$FOO|$TRUNKFARM_WORK_DIR""#,
        ]);
        spec.env = HashMap::from([
            ("FOO".to_owned(), "bar baz".to_owned()),
            // The agent's own variables win over the spec's.
            ("TRUNKFARM_ATTEMPT".to_owned(), "99".to_owned()),
        ]);
        let (out, log) = run(&spec, root.path()).await;
        assert_eq!(out.outcome, Outcome::Passed, "{out:?} {}", all_text(&log));
        let dir = std::path::absolute(job_dir(root.path())).unwrap();
        assert_eq!(
            stream_text(&log, LogStream::Stdout),
            format!("bar baz|{}\n", dir.display())
        );
    }

    #[tokio::test]
    async fn stdin_is_closed() {
        let root = tempfile::tempdir().unwrap();
        let (out, log) = run(&spec(&["cat; echo done"]), root.path()).await;
        assert_eq!(out.outcome, Outcome::Passed);
        assert_eq!(stream_text(&log, LogStream::Stdout), "done\n");
    }

    #[tokio::test]
    async fn invalid_env_is_an_error() {
        let root = tempfile::tempdir().unwrap();
        let mut spec = spec(&["true"]);
        spec.env.insert("A=B".to_owned(), "x".to_owned());
        let (out, _) = run(&spec, root.path()).await;
        assert_eq!(out.outcome, Outcome::Error);
        assert!(out.detail.contains("\"A=B\""), "{}", out.detail);
        assert!(!job_dir(root.path()).exists());
    }

    #[tokio::test]
    async fn unstartable_command_is_an_error() {
        let root = tempfile::tempdir().unwrap();
        let (out, _) = run(&spec(&["echo a\0b"]), root.path()).await;
        assert_eq!(out.outcome, Outcome::Error);
        assert!(
            out.detail.starts_with("cannot start command 1 of 1"),
            "{}",
            out.detail
        );
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_process_tree() {
        let root = tempfile::tempdir().unwrap();
        let side = tempfile::tempdir().unwrap();
        let pid_file = side.path().join("child.pid");
        let mut spec = spec(&[r#"sleep 300 & echo $! > "$PIDFILE"; sleep 300"#]);
        spec.env
            .insert("PIDFILE".to_owned(), pid_file.display().to_string());
        let begun = std::time::Instant::now();
        let (out, log) = run_with(
            &spec,
            root.path(),
            limits(Duration::from_secs(1)),
            CancellationToken::new(),
        )
        .await;
        let pid = read_pid(&pid_file);
        let dead = wait_dead(pid).await;
        kill_leftover(pid);
        assert_eq!(out.outcome, Outcome::TimedOut);
        assert_eq!(out.exit_code, None);
        assert_eq!(out.detail, "timed out after 1s");
        assert!(
            begun.elapsed() < Duration::from_secs(10),
            "{:?}",
            begun.elapsed()
        );
        assert!(out.duration >= Duration::from_secs(1));
        assert!(dead, "background child {pid} survived the timeout");
        assert!(all_text(&log).ends_with("[trunkfarm: timed out after 1s]\n"));
        assert!(!job_dir(root.path()).exists());
    }

    #[tokio::test]
    async fn background_child_of_a_passing_command_is_killed() {
        let root = tempfile::tempdir().unwrap();
        let side = tempfile::tempdir().unwrap();
        let pid_file = side.path().join("child.pid");
        // The child also holds the stdout pipe open: the job must not wait on it.
        let mut spec = spec(&[r#"sleep 300 & echo $! > "$PIDFILE"; echo started"#]);
        spec.env
            .insert("PIDFILE".to_owned(), pid_file.display().to_string());
        let begun = std::time::Instant::now();
        let (out, log) = run(&spec, root.path()).await;
        let pid = read_pid(&pid_file);
        let dead = wait_dead(pid).await;
        kill_leftover(pid);
        assert_eq!(out.outcome, Outcome::Passed, "{out:?}");
        assert!(
            begun.elapsed() < Duration::from_secs(5),
            "{:?}",
            begun.elapsed()
        );
        assert!(dead, "background child {pid} survived the job");
        assert_eq!(stream_text(&log, LogStream::Stdout), "started\n");
    }

    #[tokio::test]
    async fn escaped_process_holding_the_pipe_does_not_hang_the_job() {
        let root = tempfile::tempdir().unwrap();
        let side = tempfile::tempdir().unwrap();
        let pid_file = side.path().join("escaped.pid");
        if !Path::new("/usr/bin/setsid").exists() && !Path::new("/bin/setsid").exists() {
            eprintln!("skipped: no setsid(1) on this machine");
            return;
        }
        // `setsid` leaves the job's process group, so the group kill misses it.
        let mut spec =
            spec(&[r#"setsid sh -c 'echo $$ > "$PIDFILE"; exec sleep 300' & sleep 0.5"#]);
        spec.env
            .insert("PIDFILE".to_owned(), pid_file.display().to_string());
        let begun = std::time::Instant::now();
        let (out, log) = run(&spec, root.path()).await;
        let elapsed = begun.elapsed();
        if let Ok(text) = std::fs::read_to_string(&pid_file) {
            kill_leftover(text.trim().parse().unwrap_or(0));
        }
        assert_eq!(out.outcome, Outcome::Passed, "{out:?}");
        assert!(elapsed < Duration::from_secs(6), "{elapsed:?}");
        assert!(all_text(&log).contains("still holds it open"));
    }

    #[tokio::test]
    async fn cancel_kills_the_job() {
        let root = tempfile::tempdir().unwrap();
        let side = tempfile::tempdir().unwrap();
        let pid_file = side.path().join("child.pid");
        let mut spec = spec(&[
            r#"sleep 300 & echo $! > "$PIDFILE"; sleep 300"#,
            "echo never",
        ]);
        spec.env
            .insert("PIDFILE".to_owned(), pid_file.display().to_string());
        let cancel = CancellationToken::new();
        let trigger = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            trigger.cancel();
        });
        let begun = std::time::Instant::now();
        let (out, log) =
            run_with(&spec, root.path(), limits(Duration::from_secs(60)), cancel).await;
        let pid = read_pid(&pid_file);
        let dead = wait_dead(pid).await;
        kill_leftover(pid);
        assert_eq!(out.outcome, Outcome::Cancelled);
        assert_eq!(out.detail, "cancelled");
        assert!(begun.elapsed() < Duration::from_secs(10));
        assert!(dead, "background child {pid} survived the cancel");
        assert!(!all_text(&log).contains("never"));
        assert!(!job_dir(root.path()).exists());
    }

    #[tokio::test]
    async fn cancelled_before_start_runs_nothing() {
        let root = tempfile::tempdir().unwrap();
        let cancel = CancellationToken::new();
        cancel.cancel();
        let (out, _) = run_with(
            &spec(&["touch /tmp/trunkfarm-should-not-exist"]),
            root.path(),
            limits(Duration::ZERO),
            cancel,
        )
        .await;
        assert_eq!(out.outcome, Outcome::Cancelled);
        assert!(!job_dir(root.path()).exists());
    }

    #[tokio::test]
    async fn huge_timeout_is_no_timeout() {
        let root = tempfile::tempdir().unwrap();
        let (out, _) = run_with(
            &spec(&["true"]),
            root.path(),
            limits(Duration::MAX),
            CancellationToken::new(),
        )
        .await;
        assert_eq!(out.outcome, Outcome::Passed);
    }

    #[tokio::test]
    async fn output_cap_keeps_head_and_tail() {
        let root = tempfile::tempdir().unwrap();
        let command = "i=0; while [ $i -lt 2000 ]; do printf '%05d\\n' $i; i=$((i+1)); done";
        let spec = spec(&[command]);
        let cap = 1000u64;
        let (out, log) = run_with(
            &spec,
            root.path(),
            JobLimits {
                timeout: Duration::ZERO,
                output_cap_bytes: cap,
            },
            CancellationToken::new(),
        )
        .await;
        assert_eq!(out.outcome, Outcome::Passed, "{out:?}");
        let echo = format!("$ {command}\n");
        let written = echo.len() as u64 + 2000 * 6;
        assert_eq!(out.log_bytes_cut, written - cap);
        let text = all_text(&log);
        let notice = format!(
            "[trunkfarm: {} bytes of output cut here to stay under the 1000 B cap]\n",
            written - cap
        );
        let (head, tail) = text.split_once(&notice).expect("notice in the log");
        let mut full = echo.clone();
        for i in 0..2000 {
            full.push_str(&format!("{i:05}\n"));
        }
        // The notice starts on a line of its own.
        let expected_head = if full[..500].ends_with('\n') {
            full[..500].to_owned()
        } else {
            format!("{}\n", &full[..500])
        };
        assert_eq!(head, expected_head);
        assert_eq!(tail, &full[full.len() - 500..]);
        assert!(tail.ends_with("01999\n"));
        assert!(log.iter().all(|(_, d)| d.len() <= MAX_CHUNK));
    }

    #[tokio::test]
    async fn big_output_without_cap_arrives_whole_in_bounded_chunks() {
        let root = tempfile::tempdir().unwrap();
        let spec = spec(&["head -c 3000000 /dev/zero"]);
        let (out, log) = run(&spec, root.path()).await;
        assert_eq!(out.outcome, Outcome::Passed);
        let stdout: usize = log
            .iter()
            .filter(|(s, _)| *s == LogStream::Stdout)
            .map(|(_, d)| d.len())
            .sum();
        assert_eq!(stdout, 3_000_000);
        assert!(log.iter().all(|(_, d)| d.len() <= MAX_CHUNK));
    }

    #[tokio::test]
    async fn job_keeps_running_when_the_log_receiver_is_gone() {
        let root = tempfile::tempdir().unwrap();
        let side = tempfile::tempdir().unwrap();
        let marker = side.path().join("ran");
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let mut spec = spec(&["head -c 500000 /dev/zero", r#"touch "$MARKER""#]);
        spec.env
            .insert("MARKER".to_owned(), marker.display().to_string());
        let cache = tempfile::tempdir().unwrap();
        let out = run_job(
            &JOB,
            &spec,
            root.path(),
            limits(Duration::from_secs(30)),
            tx,
            CancellationToken::new(),
            &artifacts(cache.path(), Arc::new(FakeHub::default())),
        )
        .await;
        assert_eq!(out.outcome, Outcome::Passed);
        assert!(marker.exists());
    }

    #[tokio::test]
    async fn work_dir_is_fresh_and_removed_afterwards() {
        let root = tempfile::tempdir().unwrap();
        let leftover = job_dir(root.path());
        std::fs::create_dir_all(leftover.join("old")).unwrap();
        std::fs::write(leftover.join("old/file"), "stale").unwrap();
        let spec = spec(&[
            "test ! -e old",
            "test -z \"$(ls -A)\"",
            // Read-only directories (as Go's module cache leaves) are removed too.
            "mkdir -p ro/sub && touch ro/sub/f && chmod 0555 ro/sub ro",
        ]);
        let (out, log) = run(&spec, root.path()).await;
        assert_eq!(out.outcome, Outcome::Passed, "{out:?} {}", all_text(&log));
        assert!(!leftover.exists());
        assert!(root.path().exists());
    }

    #[tokio::test]
    async fn missing_work_root_is_created() {
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("a/b");
        let (out, _) = run(&spec(&["true"]), &root).await;
        assert_eq!(out.outcome, Outcome::Passed);
        assert!(root.is_dir());
    }

    #[tokio::test]
    async fn unwritable_work_root_is_an_error() {
        let base = tempfile::tempdir().unwrap();
        // A file where a directory should be fails even for root, which
        // permission bits do not stop.
        let file = base.path().join("not-a-dir");
        std::fs::write(&file, "x").unwrap();
        let root = file.join("work");
        let (out, _) = run(&spec(&["true"]), &root).await;
        assert_eq!(out.outcome, Outcome::Error);
        assert!(
            out.detail.contains(&root.display().to_string()),
            "{}",
            out.detail
        );
        assert!(out.detail.contains("os error"), "{}", out.detail);
    }

    #[tokio::test]
    async fn read_only_work_root_is_an_error() {
        // Permission bits do not stop root; only meaningful for other users.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            return;
        }
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("ro");
        std::fs::create_dir(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o555)).unwrap();
        let (out, _) = run(&spec(&["true"]), &root).await;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(out.outcome, Outcome::Error);
        assert!(out.detail.contains("job-7-1"), "{}", out.detail);
        assert!(out.detail.contains("os error"), "{}", out.detail);
    }

    /// Runs git in `dir`, panicking on failure (test setup only).
    fn git(dir: &Path, args: &[&str]) -> String {
        let out = std::process::Command::new("git")
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "-c",
                "init.defaultBranch=main",
            ])
            .args(args)
            .current_dir(dir)
            .output()
            .expect("git runs");
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// A repository with two commits of `f` ("one", then "two"), a branch
    /// `old` and a tag `v1` at the first; returns (dir, first commit).
    fn two_commit_repo() -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        git(dir.path(), &["init", "-q"]);
        std::fs::write(dir.path().join("f"), "one\n").unwrap();
        git(dir.path(), &["add", "f"]);
        git(dir.path(), &["commit", "-q", "-m", "first"]);
        let first = git(dir.path(), &["rev-parse", "HEAD"]);
        git(dir.path(), &["branch", "old"]);
        git(dir.path(), &["tag", "v1"]);
        std::fs::write(dir.path().join("f"), "two\n").unwrap();
        git(dir.path(), &["commit", "-q", "-am", "second"]);
        (dir, first)
    }

    /// Checks out `rev` of `url` and returns the outcome and the content of `f`
    /// as the job saw it.
    async fn checkout(url: &str, rev: &str) -> (ExecOutcome, String) {
        let root = tempfile::tempdir().unwrap();
        let mut spec = spec(&[r#"test "$PWD" = "$TRUNKFARM_WORK_DIR/src""#, "cat f"]);
        spec.repository = Some(Repository {
            url: url.to_owned(),
            rev: rev.to_owned(),
        });
        let (out, log) = run(&spec, root.path()).await;
        assert!(!job_dir(root.path()).exists());
        if out.outcome != Outcome::Passed {
            eprintln!("log: {}", all_text(&log));
        }
        (out, stream_text(&log, LogStream::Stdout))
    }

    #[tokio::test]
    async fn two_builds_of_one_commit_at_other_times_upload_the_same_artifact() {
        let (repo, _) = two_commit_repo();
        let committed = git(repo.path(), &["show", "-s", "--format=%ct", "HEAD"]);
        let side = tempfile::tempdir().unwrap();
        let hub = Arc::new(FakeHub::default());
        let arts = artifacts(side.path(), hub.clone());
        let mut shas = Vec::new();
        for later in [1_000, 2_000] {
            let root = tempfile::tempdir().unwrap();
            let mut build = JobSpec {
                upload_prefix: "install".into(),
                ..spec(&[
                    r#"echo "epoch $SOURCE_DATE_EPOCH""#,
                    r#"mkdir -p "$PREFIX/bin" && cp f "$PREFIX/bin/f""#,
                    // Built later: file times after the commit's.
                    &format!(
                        r#"touch -d "@$(($SOURCE_DATE_EPOCH + {later}))" "$PREFIX/bin/f" "$PREFIX/bin""#
                    ),
                ])
            };
            build.repository = Some(Repository {
                url: repo.path().display().to_string(),
                rev: String::new(),
            });
            let (out, log) =
                run_arts(&build, root.path(), limits(Duration::from_secs(60)), &arts).await;
            assert_eq!(out.outcome, Outcome::Passed, "{out:?} {}", all_text(&log));
            assert_eq!(
                stream_text(&log, LogStream::Stdout),
                format!("epoch {}\n", committed.trim())
            );
            shas.push(out.artifact_sha256);
        }
        assert_eq!(shas[0].len(), 64);
        assert_eq!(shas[0], shas[1]);
    }

    #[tokio::test]
    async fn checks_out_a_specific_commit() {
        let (repo, first) = two_commit_repo();
        let url = repo.path().display().to_string();
        let (out, stdout) = checkout(&url, &first).await;
        assert_eq!(out.outcome, Outcome::Passed, "{out:?}");
        assert_eq!(stdout, "one\n");
        let (out, stdout) = checkout(&format!("file://{url}"), &first).await;
        assert_eq!(out.outcome, Outcome::Passed, "{out:?}");
        assert_eq!(stdout, "one\n");
    }

    #[tokio::test]
    async fn checks_out_the_default_branch_when_rev_is_empty() {
        let (repo, _) = two_commit_repo();
        let (out, stdout) = checkout(&repo.path().display().to_string(), "").await;
        assert_eq!(out.outcome, Outcome::Passed, "{out:?}");
        assert_eq!(stdout, "two\n");
    }

    #[tokio::test]
    async fn checks_out_branches_tags_and_short_hashes() {
        let (repo, first) = two_commit_repo();
        let url = repo.path().display().to_string();
        for rev in ["old", "v1", &first[..10]] {
            let (out, stdout) = checkout(&url, rev).await;
            assert_eq!(out.outcome, Outcome::Passed, "{rev}: {out:?}");
            assert_eq!(stdout, "one\n", "{rev}");
        }
        let (out, stdout) = checkout(&url, "main").await;
        assert_eq!(out.outcome, Outcome::Passed, "{out:?}");
        assert_eq!(stdout, "two\n");
    }

    #[tokio::test]
    async fn unknown_revision_is_an_error() {
        let (repo, _) = two_commit_repo();
        let (out, _) = checkout(&repo.path().display().to_string(), "no-such-branch").await;
        assert_eq!(out.outcome, Outcome::Error);
        assert!(out.detail.contains("no-such-branch"), "{}", out.detail);
        let (out, _) = checkout(&repo.path().display().to_string(), "--upload-pack=evil").await;
        assert_eq!(out.outcome, Outcome::Error);
        assert!(out.detail.contains("invalid revision"), "{}", out.detail);
    }

    #[tokio::test]
    async fn bad_repository_url_is_an_error() {
        let base = tempfile::tempdir().unwrap();
        let url = base.path().join("no-such-repo").display().to_string();
        let (out, _) = checkout(&url, "").await;
        assert_eq!(out.outcome, Outcome::Error);
        assert!(
            out.detail
                .starts_with(&format!("checkout of {url} at the default branch failed: ")),
            "{}",
            out.detail
        );
        assert!(out.detail.contains("fatal"), "{}", out.detail);
    }

    #[tokio::test]
    async fn empty_repository_url_means_no_checkout() {
        let root = tempfile::tempdir().unwrap();
        let mut spec = spec(&[r#"test "$PWD" = "$TRUNKFARM_WORK_DIR" && test ! -e src"#]);
        spec.repository = Some(Repository::default());
        let (out, _) = run(&spec, root.path()).await;
        assert_eq!(out.outcome, Outcome::Passed, "{out:?}");
    }

    #[test]
    fn long_commands_are_shortened() {
        assert_eq!(short("  ls  "), "ls");
        let long = "é".repeat(300);
        let s = short(&long);
        assert_eq!(s.chars().count(), DETAIL_COMMAND_MAX + 1);
        assert!(s.ends_with('…'));
    }

    #[test]
    fn keep_tail_keeps_the_last_bytes() {
        let mut tail = Vec::new();
        keep_tail(&mut tail, &[1; 3000]);
        assert_eq!(tail.len(), KEEP_TAIL);
        keep_tail(&mut tail, &[2; 10]);
        assert_eq!(tail.len(), KEEP_TAIL);
        assert_eq!(&tail[KEEP_TAIL - 10..], &[2; 10]);
    }

    #[test]
    fn process_group_never_signals_special_pids() {
        assert_eq!(ProcessGroup::of(None).pgid, None);
        assert_eq!(ProcessGroup::of(Some(0)).pgid, None);
        assert_eq!(ProcessGroup::of(Some(1)).pgid, None);
        assert_eq!(ProcessGroup::of(Some(u32::MAX)).pgid, None);
        let g = ProcessGroup::of(Some(12345));
        assert_eq!(g.pgid, Some(12345));
        std::mem::forget(g);
    }

    /// A packed runtime whose `bin/rt` prints "runtime-ok", and its hash.
    fn runtime_archive() -> Vec<u8> {
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path().join("tree");
        std::fs::create_dir_all(tree.join("bin")).unwrap();
        std::fs::write(tree.join("bin/rt"), "#!/bin/sh\necho runtime-ok\n").unwrap();
        std::fs::set_permissions(tree.join("bin/rt"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        let out = tmp.path().join("rt.tar.zst");
        pack::pack(&tree, &out, None, &AtomicBool::new(false)).unwrap();
        std::fs::read(out).unwrap()
    }

    /// A runtime job: no repository, `artifact_sha256` set.
    fn runtime_spec(sha: &str, commands: &[&str]) -> JobSpec {
        JobSpec {
            artifact_sha256: sha.to_owned(),
            ..spec(commands)
        }
    }

    #[tokio::test]
    async fn a_build_uploads_its_prefix_and_a_test_job_runs_against_it() {
        let root = tempfile::tempdir().unwrap();
        let side = tempfile::tempdir().unwrap();
        let hub = Arc::new(FakeHub::default());
        let arts = artifacts(side.path(), hub.clone());
        let build = JobSpec {
            upload_prefix: "install".into(),
            ..spec(&[
                r#"echo "$PREFIX""#,
                r#"mkdir -p "$PREFIX/bin" && printf '#!/bin/sh\necho built-ok\n' > "$PREFIX/bin/tool" && chmod 755 "$PREFIX/bin/tool""#,
                r#"ln -s tool "$PREFIX/bin/tool-link""#,
            ])
        };
        let (out, log) =
            run_arts(&build, root.path(), limits(Duration::from_secs(60)), &arts).await;
        assert_eq!(out.outcome, Outcome::Passed, "{out:?} {}", all_text(&log));
        let dir = std::path::absolute(job_dir(root.path())).unwrap();
        assert_eq!(
            stream_text(&log, LogStream::Stdout),
            format!("{}\n", dir.join("install").display())
        );
        assert_eq!(out.artifact_sha256.len(), 64);
        let stored = hub.lock().get(&out.artifact_sha256).cloned().unwrap();
        assert_eq!(hex::encode(Sha256::digest(&stored)), out.artifact_sha256);
        let system = stream_text(&log, LogStream::System);
        let sha12 = &out.artifact_sha256[..12];
        assert!(
            system.contains("[trunkfarm: packed $PREFIX: 1 files, 1 symlinks, ")
                && system.contains(&format!(", sha256 {sha12}]\n")),
            "{system}"
        );
        assert!(
            system.contains(&format!("[trunkfarm: uploaded runtime {sha12} (")),
            "{system}"
        );
        assert!(!job_dir(root.path()).exists());

        // The test job gets the build as its runtime.
        let mut test = runtime_spec(
            &out.artifact_sha256,
            &[
                r#"test "$TRUNKFARM_RUNTIME_PREFIX" = "$TRUNKFARM_WORK_DIR/runtime""#,
                "tool",
                "tool-link",
                r#"echo "$PATH""#,
            ],
        );
        test.env
            .insert("PATH".to_owned(), "/custom/bin:/usr/bin:/bin".to_owned());
        let (out2, log) =
            run_arts(&test, root.path(), limits(Duration::from_secs(60)), &arts).await;
        assert_eq!(out2.outcome, Outcome::Passed, "{out2:?} {}", all_text(&log));
        assert_eq!(
            stream_text(&log, LogStream::Stdout),
            format!(
                "built-ok\nbuilt-ok\n{}:/custom/bin:/usr/bin:/bin\n",
                dir.join("runtime/bin").display()
            )
        );
        let system = stream_text(&log, LogStream::System);
        assert!(
            system.starts_with(&format!("[trunkfarm: runtime {sha12}: downloaded ")),
            "{system}"
        );
        assert!(out2.artifact_sha256.is_empty());

        // A second job finds it in the cache.
        let (out3, log) = run_arts(
            &runtime_spec(&out.artifact_sha256, &["tool"]),
            root.path(),
            limits(Duration::from_secs(60)),
            &arts,
        )
        .await;
        assert_eq!(out3.outcome, Outcome::Passed, "{out3:?}");
        assert!(
            stream_text(&log, LogStream::System)
                .starts_with(&format!("[trunkfarm: runtime {sha12}: cached]\n")),
            "{}",
            all_text(&log)
        );
        assert_eq!(hub.downloads.load(SeqCst), 1);
        assert_eq!(hub.uploads.load(SeqCst), 1);
    }

    #[tokio::test]
    async fn runtime_path_goes_before_the_agents_path() {
        let root = tempfile::tempdir().unwrap();
        let side = tempfile::tempdir().unwrap();
        let hub = Arc::new(FakeHub::default());
        let sha = hub.add(runtime_archive());
        let arts = artifacts(side.path(), hub);
        let (out, log) = run_arts(
            &runtime_spec(&sha, &["rt", r#"echo "$PATH""#]),
            root.path(),
            limits(Duration::from_secs(60)),
            &arts,
        )
        .await;
        assert_eq!(out.outcome, Outcome::Passed, "{out:?} {}", all_text(&log));
        let dir = std::path::absolute(job_dir(root.path())).unwrap();
        let agent_path = std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.to_owned());
        assert_eq!(
            stream_text(&log, LogStream::Stdout),
            format!(
                "runtime-ok\n{}:{agent_path}\n",
                dir.join("runtime/bin").display()
            )
        );
        assert!(
            stream_text(&log, LogStream::System).contains(&format!(
                "[trunkfarm: runtime {} unpacked into {}: 1 files, ",
                &sha[..12],
                dir.join("runtime").display()
            )),
            "{}",
            all_text(&log)
        );
    }

    #[tokio::test]
    async fn an_empty_prefix_fails_the_build() {
        let root = tempfile::tempdir().unwrap();
        let side = tempfile::tempdir().unwrap();
        let hub = Arc::new(FakeHub::default());
        let arts = artifacts(side.path(), hub.clone());
        let build = JobSpec {
            upload_prefix: "out/usr".into(),
            ..spec(&[r#"test -d "$PREFIX" && mkdir "$PREFIX/empty-dir""#])
        };
        let (out, _) = run_arts(&build, root.path(), limits(Duration::ZERO), &arts).await;
        assert_eq!(out.outcome, Outcome::Failed);
        assert_eq!(
            out.detail,
            "the build commands passed but installed nothing into $PREFIX"
        );
        assert_eq!(out.exit_code, Some(0));
        assert!(out.artifact_sha256.is_empty());
        assert_eq!(hub.uploads.load(SeqCst), 0);
    }

    #[tokio::test]
    async fn a_failed_build_uploads_nothing() {
        let root = tempfile::tempdir().unwrap();
        let side = tempfile::tempdir().unwrap();
        let hub = Arc::new(FakeHub::default());
        let arts = artifacts(side.path(), hub.clone());
        let build = build_spec(&[r#"touch "$PREFIX/f"; exit 2"#]);
        let (out, _) = run_arts(&build, root.path(), limits(Duration::ZERO), &arts).await;
        assert_eq!(out.outcome, Outcome::Failed);
        assert_eq!(hub.uploads.load(SeqCst), 0);
        assert!(out.artifact_sha256.is_empty());
    }

    #[tokio::test]
    async fn a_refused_upload_is_an_infrastructure_error() {
        let root = tempfile::tempdir().unwrap();
        let side = tempfile::tempdir().unwrap();
        let hub = Arc::new(FakeHub::default());
        *hub.refuse_uploads.lock().unwrap() = Some(Status::resource_exhausted(
            "artifact too large: limit 4 GiB",
        ));
        let arts = artifacts(side.path(), hub);
        let build = build_spec(&[r#"echo x > "$PREFIX/f""#]);
        let (out, log) = run_arts(&build, root.path(), limits(Duration::ZERO), &arts).await;
        assert_eq!(out.outcome, Outcome::Error);
        assert!(
            out.detail.contains("it is larger than the hub accepts"),
            "{}",
            out.detail
        );
        assert!(out.artifact_sha256.is_empty());
        assert!(all_text(&log).ends_with(&format!("[trunkfarm: {}]\n", out.detail)));
    }

    /// A hub killed and restarted while a build uploads or a test fetches
    /// its runtime: the job waits for it instead of ending (which would use
    /// up one of its attempts and throw the build away).
    #[tokio::test]
    async fn a_restarting_hub_is_waited_for_by_uploads_and_downloads() {
        let root = tempfile::tempdir().unwrap();
        let side = tempfile::tempdir().unwrap();
        let hub = Arc::new(FakeHub::default());
        let arts = artifacts(side.path(), hub.clone());
        let build = build_spec(&[r#"echo x > "$PREFIX/f""#]);
        hub.unreachable_next.store(2, SeqCst);
        let (out, log) = run_arts(&build, root.path(), limits(Duration::ZERO), &arts).await;
        assert_eq!(out.outcome, Outcome::Passed, "{out:?} {}", all_text(&log));
        assert_eq!(hub.uploads.load(SeqCst), 3);
        assert_eq!(out.artifact_sha256.len(), 64);
        let system = stream_text(&log, LogStream::System);
        assert_eq!(
            system
                .matches(
                    "Connection refused (os error 111); the hub may be restarting: trying again in "
                )
                .count(),
            2,
            "{system}"
        );

        let sha = hub.add(runtime_archive());
        hub.unreachable_next.store(2, SeqCst);
        let root = tempfile::tempdir().unwrap();
        let (out, log) = run_arts(
            &runtime_spec(&sha, &["rt"]),
            root.path(),
            limits(Duration::from_secs(60)),
            &arts,
        )
        .await;
        assert_eq!(out.outcome, Outcome::Passed, "{out:?} {}", all_text(&log));
        assert_eq!(hub.downloads.load(SeqCst), 3);
        assert_eq!(stream_text(&log, LogStream::Stdout), "runtime-ok\n");
    }

    /// Waiting for the hub ends with the job: its timeout still holds.
    #[tokio::test]
    async fn a_hub_that_stays_away_ends_the_job_at_its_timeout() {
        let root = tempfile::tempdir().unwrap();
        let side = tempfile::tempdir().unwrap();
        let hub = Arc::new(FakeHub::default());
        let arts = artifacts(side.path(), hub.clone());
        hub.unreachable_next.store(usize::MAX, SeqCst);
        let build = build_spec(&[r#"echo x > "$PREFIX/f""#]);
        let (out, log) = run_arts(&build, root.path(), limits(Duration::from_secs(3)), &arts).await;
        assert_eq!(out.outcome, Outcome::TimedOut, "{out:?} {}", all_text(&log));
        assert_eq!(out.detail, "timed out after 3s");
        assert!(hub.uploads.load(SeqCst) >= 2);
    }

    #[tokio::test]
    async fn bad_upload_prefixes_are_errors() {
        let root = tempfile::tempdir().unwrap();
        for bad in [
            "../up",
            "/abs",
            "src",
            "runtime/x",
            ".",
            "./src/x",
            ".trunkfarm-pack",
        ] {
            let build = JobSpec {
                upload_prefix: bad.into(),
                ..spec(&["touch ran"])
            };
            let (out, _) = run(&build, root.path()).await;
            assert_eq!(out.outcome, Outcome::Error, "{bad}");
            assert!(
                out.detail
                    .starts_with(&format!("invalid upload_prefix {bad:?}: ")),
                "{}",
                out.detail
            );
        }
        assert_eq!(
            check_upload_prefix("./out//usr/").unwrap(),
            Path::new("out/usr")
        );
    }

    #[tokio::test]
    async fn runtime_failures_are_infrastructure_errors() {
        let root = tempfile::tempdir().unwrap();
        let side = tempfile::tempdir().unwrap();
        let hub = Arc::new(FakeHub::default());
        let arts = artifacts(side.path(), hub.clone());
        let run_rt = |spec: JobSpec| {
            let arts = arts.clone();
            let root = root.path().to_path_buf();
            async move { run_arts(&spec, &root, limits(Duration::ZERO), &arts).await }
        };

        let (out, _) = run_rt(runtime_spec(&"0".repeat(64), &["touch ran"])).await;
        assert_eq!(out.outcome, Outcome::Error);
        assert!(
            out.detail
                .starts_with("cannot get the runtime 000000000000: the hub has no artifact"),
            "{}",
            out.detail
        );

        let (out, _) = run_rt(runtime_spec("not-a-hash", &["true"])).await;
        assert_eq!(out.outcome, Outcome::Error);
        assert!(
            out.detail.starts_with("invalid artifact_sha256: "),
            "{}",
            out.detail
        );

        let sha = hub.add(runtime_archive());
        hub.corrupt_next.store(2, SeqCst);
        let (out, _) = run_rt(runtime_spec(&sha, &["true"])).await;
        assert_eq!(out.outcome, Outcome::Error);
        assert!(
            out.detail.contains("failed verification twice"),
            "{}",
            out.detail
        );

        // A hostile archive is refused before any command runs.
        let mut builder = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(1);
        h.as_old_mut().name[..6].copy_from_slice(b"../bad");
        h.set_cksum();
        builder.append(&h, &b"x"[..]).unwrap();
        let hostile = zstd::encode_all(&builder.into_inner().unwrap()[..], 3).unwrap();
        let sha = hub.add(hostile);
        let (out, log) = run_rt(runtime_spec(&sha, &["echo never"])).await;
        assert_eq!(out.outcome, Outcome::Error);
        assert_eq!(
            out.detail,
            format!(
                "cannot unpack the runtime {}: refused the archive: entry `../bad` has a `..` \
                 component, which would leave the directory",
                &sha[..12]
            )
        );
        assert!(!all_text(&log).contains("never"));
        assert!(!root.path().join("bad").exists());
    }

    #[tokio::test]
    async fn a_cached_runtime_corrupt_on_disk_is_dropped() {
        let root = tempfile::tempdir().unwrap();
        let side = tempfile::tempdir().unwrap();
        let hub = Arc::new(FakeHub::default());
        let sha = hub.add(runtime_archive());
        let arts = artifacts(side.path(), hub.clone());
        let spec = runtime_spec(&sha, &["rt"]);
        let (out, _) = run_arts(&spec, root.path(), limits(Duration::ZERO), &arts).await;
        assert_eq!(out.outcome, Outcome::Passed, "{out:?}");
        // Flip the last byte of the cached file (the zstd checksum region).
        let cached = arts.cache.dir().join(format!("{sha}.tar.zst"));
        let mut bytes = std::fs::read(&cached).unwrap();
        if let Some(b) = bytes.last_mut() {
            *b ^= 0x55;
        }
        std::fs::write(&cached, bytes).unwrap();
        let (out, _) = run_arts(&spec, root.path(), limits(Duration::ZERO), &arts).await;
        assert_eq!(out.outcome, Outcome::Error);
        assert!(out.detail.contains("is corrupt on disk"), "{}", out.detail);
        assert!(!cached.exists());
        // The next job downloads it again.
        let (out, _) = run_arts(&spec, root.path(), limits(Duration::ZERO), &arts).await;
        assert_eq!(out.outcome, Outcome::Passed, "{out:?}");
        assert_eq!(hub.downloads.load(SeqCst), 2);
    }

    #[tokio::test]
    async fn the_timeout_covers_the_download() {
        let root = tempfile::tempdir().unwrap();
        let side = tempfile::tempdir().unwrap();
        let hub = Arc::new(FakeHub::default());
        let sha = hub.add(runtime_archive());
        *hub.delay.lock().unwrap() = Duration::from_secs(30);
        let arts = artifacts(side.path(), hub);
        let begun = std::time::Instant::now();
        let (out, _) = run_arts(
            &runtime_spec(&sha, &["echo never"]),
            root.path(),
            limits(Duration::from_secs(1)),
            &arts,
        )
        .await;
        assert_eq!(out.outcome, Outcome::TimedOut);
        assert!(begun.elapsed() < Duration::from_secs(10));
        assert!(!job_dir(root.path()).exists());
    }

    #[tokio::test]
    async fn reports_are_read_after_a_failure() {
        let root = tempfile::tempdir().unwrap();
        let mut spec = spec(&["echo '<testsuite/>' > r.xml; exit 1"]);
        spec.report_paths = vec!["r.xml".into(), "missing.xml".into(), "../x".into()];
        let (out, log) = run(&spec, root.path()).await;
        assert_eq!(out.outcome, Outcome::Failed);
        assert_eq!(out.reports.len(), 3);
        assert_eq!(out.reports[0].path, "r.xml");
        assert_eq!(out.reports[0].data, b"<testsuite/>\n");
        assert_eq!(out.reports[1].error, "not found");
        assert!(out.reports[2].error.starts_with("refused"));
        let system = stream_text(&log, LogStream::System);
        assert!(
            system.contains("[trunkfarm: report missing.xml: not found]\n"),
            "{system}"
        );
    }

    #[tokio::test]
    async fn reports_are_relative_to_the_checkout() {
        let (repo, _) = two_commit_repo();
        let root = tempfile::tempdir().unwrap();
        let mut spec = spec(&["true"]);
        spec.repository = Some(Repository {
            url: repo.path().display().to_string(),
            rev: String::new(),
        });
        spec.report_paths = vec!["f".into()];
        let (out, _) = run(&spec, root.path()).await;
        assert_eq!(out.outcome, Outcome::Passed, "{out:?}");
        assert_eq!(out.reports[0].data, b"two\n");
    }

    #[tokio::test]
    async fn no_reports_after_a_timeout() {
        let root = tempfile::tempdir().unwrap();
        let mut spec = spec(&["touch r.xml; sleep 30"]);
        spec.report_paths = vec!["r.xml".into()];
        let (out, _) = run_with(
            &spec,
            root.path(),
            limits(Duration::from_secs(1)),
            CancellationToken::new(),
        )
        .await;
        assert_eq!(out.outcome, Outcome::TimedOut);
        assert!(out.reports.is_empty());
    }
}
