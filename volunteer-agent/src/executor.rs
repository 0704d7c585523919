//! Runs one job on this machine.
//!
//! A job gets a fresh directory under the agent's work root
//! (`job-<id>-<attempt>`), optionally a checkout of its repository in
//! `<workdir>/src`, and then its commands, one `sh -c` after another, each in
//! its own process group so that the whole tree it starts can be killed: on
//! timeout, on cancel, and after the command itself exits (a stray
//! `sleep 1000 &` must not outlive the job on a volunteer's machine). Output
//! goes through an [`OutputCap`] so a chatty job cannot exhaust the donor's
//! memory or bandwidth. Whatever happens, the work directory is removed
//! afterwards and the result comes back as an [`ExecOutcome`] value: nothing
//! here panics or returns early on a job's input.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use trunkfarm_proto::v1::{JobRef, JobSpec, LogStream, Outcome, Repository};

use crate::output::{MAX_CHUNK, OutputCap};

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
}

/// Runs `spec` in a fresh directory under `work_root`, streaming capped output
/// to `log`.
///
/// The `log` receiver gets the head of the output live (chunks of at most
/// 64 KiB), then the cut notice and the tail when the job ends; it should keep
/// draining, since a full channel eventually pauses the job's output (the
/// timeout and `cancel` still work). If the receiver is dropped, the job keeps
/// running and its output is discarded. Firing `cancel` kills the job and
/// ends it as [`Outcome::Cancelled`].
pub(crate) async fn run_job(
    job: &JobRef,
    spec: &JobSpec,
    work_root: &Path,
    limits: JobLimits,
    log: mpsc::Sender<LogItem>,
    cancel: CancellationToken,
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
    };

    let (finish, duration) = if let Some(stop) = run.stop_requested() {
        (Finish::stopped(stop, run.timeout), started.elapsed())
    } else {
        let name = format!("job-{}-{}", job.job_id, job.attempt);
        match WorkDir::create(work_root, &name).await {
            Err(detail) => (Finish::error(detail), started.elapsed()),
            Ok(workdir) => {
                let finish = run.run_in(job, spec, workdir.path()).await;
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

    /// Checks out the repository (if any) and runs the commands in `workdir`.
    async fn run_in(&mut self, job: &JobRef, spec: &JobSpec, workdir: &Path) -> Finish {
        let mut command_dir = workdir.to_path_buf();
        if let Some(repo) = spec.repository.as_ref().filter(|r| !r.url.is_empty()) {
            let src = workdir.join("src");
            if let Err(finish) = self.checkout(repo, workdir, &src).await {
                return finish;
            }
            command_dir = src;
        }
        if let Some(detail) = invalid_env(spec) {
            return Finish::error(detail);
        }

        let total = spec.commands.len();
        let mut last_code = None;
        for (index, command) in spec.commands.iter().enumerate() {
            let number = index + 1;
            if let Some(stop) = self.stop_requested() {
                return Finish::stopped(stop, self.timeout);
            }
            self.sink.system(&format!("$ {command}\n"));
            let mut cmd = Command::new(SHELL);
            cmd.arg("-c")
                .arg(command)
                .current_dir(&command_dir)
                .env("GIT_TERMINAL_PROMPT", "0")
                .envs(&spec.env)
                .env("TRUNKFARM_JOB_ID", job.job_id.to_string())
                .env("TRUNKFARM_ATTEMPT", job.attempt.to_string())
                .env("TRUNKFARM_WORK_DIR", workdir);
            self.first_command_ms.get_or_insert_with(unix_ms);
            let end = match self
                .run_process(cmd, LogStream::Stdout, LogStream::Stderr)
                .await
            {
                Ok(end) => end,
                Err(e) => {
                    return Finish::error(format!(
                        "cannot start command {number} of {total} with {SHELL}: {e}"
                    ));
                }
            };
            if let Some(stop) = end.stop {
                return Finish::stopped(stop, self.timeout);
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
            match (status.code(), status.signal()) {
                (Some(0), _) => last_code = Some(0),
                (Some(127), _) => {
                    return Finish::failed(
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
                    return Finish::failed(
                        Some(code),
                        format!("command {number} of {total} exited with status {code}{hint}"),
                    );
                }
                (None, Some(signal)) => {
                    let name = signal_name(signal).unwrap_or("an unknown signal");
                    return Finish::failed(
                        None,
                        format!(
                            "command {number} of {total} was killed by signal {signal} ({name})"
                        ),
                    );
                }
                (None, None) => {
                    return Finish::failed(
                        None,
                        format!("command {number} of {total} ended with {status}"),
                    );
                }
            }
        }
        Finish::passed(last_code)
    }

    /// Checks `repo` out into `src` (detached at the wanted revision) with
    /// the git CLI. Any failure is an infrastructure error, not the job's.
    async fn checkout(
        &mut self,
        repo: &Repository,
        workdir: &Path,
        src: &Path,
    ) -> Result<(), Finish> {
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
        self.sink.system(&format!(
            "[trunkfarm: checking out {shown_url} at {shown_rev}]\n"
        ));

        let end = self
            .git(
                workdir,
                [OsStr::new("init"), OsStr::new("-q"), src.as_os_str()],
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
            let full = self.git(src, args.iter().map(OsStr::new)).await?;
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
            )
            .await?;
        if !end.succeeded() {
            return Err(fail(git_error(&end)));
        }
        let end = self.git(src, ["rev-parse", "HEAD"].map(OsStr::new)).await?;
        let head = String::from_utf8_lossy(&end.stdout_tail).trim().to_owned();
        self.sink
            .system(&format!("[trunkfarm: checked out {head}]\n"));
        Ok(())
    }

    /// Runs one git command in `dir`, its output going to the log as system
    /// lines. A stop or a git that cannot be started ends the job (`Err`).
    async fn git<I, S>(&mut self, dir: &Path, args: I) -> Result<ProcEnd, Finish>
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
        // ssh asks about unknown host keys on the terminal; never wait for it.
        if std::env::var_os("GIT_SSH_COMMAND").is_none() && std::env::var_os("GIT_SSH").is_none() {
            cmd.env("GIT_SSH_COMMAND", "ssh -o BatchMode=yes");
        }
        match self
            .run_process(cmd, LogStream::System, LogStream::System)
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
    ) -> io::Result<ProcEnd> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd.spawn()?;
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

/// [`remove_tree`] on the blocking pool (a big tree takes a while).
async fn remove_tree_async(path: PathBuf) -> io::Result<()> {
    tokio::task::spawn_blocking(move || remove_tree(&path))
        .await
        .map_err(io::Error::other)?
}

/// Removes `path` whatever it is (directory tree, file, symlink; absent is
/// fine). Build tools leave read-only directories behind (Go's module cache),
/// which `remove_dir_all` cannot empty, so on failure the tree is made
/// writable and removal is tried once more.
fn remove_tree(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.is_dir() {
        return std::fs::remove_file(path);
    }
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(first) => {
            make_writable(path);
            match std::fs::remove_dir_all(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(_) => Err(first),
            }
        }
    }
}

/// Gives the owner full access to every directory under `root` (not following
/// symlinks), best effort.
fn make_writable(root: &Path) {
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if let Ok(meta) = std::fs::symlink_metadata(&dir) {
            let mut perms = meta.permissions();
            perms.set_mode(perms.mode() | 0o700);
            let _ = std::fs::set_permissions(&dir, perms);
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(entry.path());
            }
        }
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

/// Hides the credentials of a URL (`https://user:token@host/...`) before it
/// is written to a log or a detail.
fn redact_url(url: &str) -> String {
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        if let Some(at) = rest[..authority_end].rfind('@') {
            return format!("{}://***@{}", &url[..scheme_end], &rest[at + 1..]);
        }
    }
    url.to_owned()
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

    /// Limits with the given timeout and no output cap.
    fn limits(timeout: Duration) -> JobLimits {
        JobLimits {
            timeout,
            output_cap_bytes: 0,
        }
    }

    /// Runs a job, collecting everything sent to the log.
    async fn run_with(
        spec: &JobSpec,
        root: &Path,
        limits: JobLimits,
        cancel: CancellationToken,
    ) -> (ExecOutcome, Vec<LogItem>) {
        let (tx, mut rx) = mpsc::channel(4);
        let collector = tokio::spawn(async move {
            let mut items = Vec::new();
            while let Some(item) = rx.recv().await {
                items.push(item);
            }
            items
        });
        let outcome = run_job(&JOB, spec, root, limits, tx, cancel).await;
        let log = collector.await.expect("collector");
        (outcome, log)
    }

    /// Runs a job without timeout, cap or cancel.
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
        let out = run_job(
            &JOB,
            &spec,
            root.path(),
            limits(Duration::from_secs(30)),
            tx,
            CancellationToken::new(),
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
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("https://u:tok@host/r.git"),
            "https://***@host/r.git"
        );
        assert_eq!(redact_url("https://host/r@x"), "https://host/r@x");
        assert_eq!(redact_url("git@host:r.git"), "git@host:r.git");
        assert_eq!(redact_url("/local/path"), "/local/path");
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
}
