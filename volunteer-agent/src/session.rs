//! `trunkfarm-agent run`: the agent's life, from the first dial to the drain.
//!
//! One task owns everything (no locks): the running jobs ([`Jobs`]), the
//! results the hub has not acknowledged ([`ResultStore`]), the messages not
//! yet sent ([`Outbox`]) and the current connection ([`Link`]). Jobs outlive
//! connections, so a connection only forwards: when it breaks, the agent
//! keeps running its jobs, keeps their logs and results, and redials with
//! backoff; after the next welcome it sends again whatever the hub may have
//! missed: every log chunk and result of an attempt whose result the hub has
//! not acknowledged (see `outbox.rs`).
//! A single `select!` loop waits on the connection, the jobs, the signals and
//! the drain timers, and never blocks on any one of them.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::mpsc;
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};
use trunkfarm_proto::dial::{self, DialError, DialOptions, HubTrust};
use trunkfarm_proto::v1::agent_message::Msg;
use trunkfarm_proto::v1::agent_service_client::AgentServiceClient;
use trunkfarm_proto::v1::hub_message::Msg as HubMsg;
use trunkfarm_proto::v1::{
    AgentMessage, Assignment, Cancel, Capabilities, Draining, Heartbeat, Hello, HubMessage, JobRef,
    JobResult, JobStarted, Outcome, Paused, ResultAck, Welcome,
};
use trunkfarm_proto::{AUTHORIZATION, PROTOCOL_VERSION};

use trunkfarm_proto::settings::fmt_bytes;

use crate::backoff::Backoff;
use crate::cache::ArtifactCache;
use crate::config::AgentConfig;
use crate::control::{self, Answer, Control, Request, Status as AgentStatus};
use crate::credential::Credential;
use crate::donor::{self, JobInfo, Pause, say};
use crate::executor::Artifacts;
use crate::jobs::{self, JobPolicy, JobWake, Jobs};
use crate::limits::Gate;
use crate::outbox::{Outbox, kept_log_bound};
use crate::results::{JobKey, ResultStore, key};
use crate::sandbox::Sandbox;
use crate::sysinfo::{self, Machine};
use crate::transfer::GrpcHub;

/// Longest wait from starting a dial to the hub's welcome.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(30);

/// Messages handed to a connection but not yet taken by the transport. Kept
/// small: what sits here when a connection breaks is lost (and sent again
/// after the next welcome: the outbox keeps results and log chunks until
/// the hub acknowledges the result).
const OUTBOUND_CHANNEL: usize = 8;

/// While connected, buffered log bytes above which the jobs' output is
/// paused instead of buffered (the network is the bottleneck: wait for it).
const SEND_HIGH_WATER: usize = 4 * 1024 * 1024;

/// Heartbeat interval when the hub names none.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(15);

/// How long a result may go unacknowledged on a live session before it is
/// sent again (the hub acknowledges every result it records; one it failed
/// to record is simply not acknowledged).
const RESULT_RESEND: Duration = Duration::from_secs(60);

/// How long a drained agent waits for the hub to acknowledge its results.
const ACK_WAIT: Duration = Duration::from_secs(30);

/// How long to wait for cancelled jobs to clean up when the agent must stop.
const ABANDON_WAIT: Duration = Duration::from_secs(10);

/// How `run` ended; decides the exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ending {
    /// Drained after a signal or the hub's request (exit code 0).
    Drained,
    /// The hub refused the credential: revoked or unknown (exit code 3).
    Refused(String),
    /// The hub refused this agent's protocol version (exit code 4).
    Incompatible(String),
}

/// Runs the agent until it is drained or the hub refuses it for good.
pub(crate) async fn run(
    state_dir: PathBuf,
    credential: Credential,
    config: AgentConfig,
    sandbox: Sandbox,
) -> anyhow::Result<Ending> {
    let mut results = ResultStore::open(state_dir.join("results")).with_context(|| {
        format!(
            "cannot open the results directory {}",
            state_dir.join("results").display()
        )
    })?;
    let mut policy = JobPolicy::from_config(&config, &state_dir);
    policy.refuse_all = sandbox.refusal();
    let fallback_name = credential.name.clone().or_else(crate::enroll::hostname);
    let machine = sysinfo::detect();
    let mut caps = capabilities(&config, fallback_name.as_deref(), &machine);
    caps.sandbox = sandbox.name().to_owned();
    // The donor's schedule and only_when_idle (`limits.rs`).
    let limits =
        crate::limits::start(&config, machine.cores, &mut caps).map_err(anyhow::Error::msg)?;
    let bearer = credential.bearer()?;
    let cache_dir = config.cache.dir_or_default(&state_dir);
    let cache = ArtifactCache::open(cache_dir.clone(), config.cache.size).with_context(|| {
        format!(
            "cannot open the artifact cache in {} (set [cache] dir in agent.toml to use another \
             directory)",
            cache_dir.display()
        )
    })?;
    let artifacts = Artifacts {
        cache,
        hub: Arc::new(GrpcHub::new(
            &credential.hub,
            &credential.trust(),
            bearer.clone(),
        )),
        max_unpacked_bytes: config.cache.max_unpacked_size,
        sandbox: Arc::new(sandbox),
    };
    let signals = Signals::new().context("cannot install the signal handlers")?;
    // The caller holds the state directory's lock: a socket there is stale.
    let (control_tx, control) = mpsc::channel(8);
    let server = match control::serve(&state_dir, control_tx) {
        Ok(server) => Some(server),
        Err(e) => {
            tracing::warn!(
                "cannot open the control socket in {}: {e}; `trunkfarm-agent status`, `pause` \
                 and `resume` cannot reach this agent",
                state_dir.display()
            );
            None
        }
    };
    let pause = donor::load_pause(&state_dir).with_context(|| {
        format!(
            "cannot read the donor's pause in {}",
            state_dir.join(donor::PAUSE_FILE).display()
        )
    })?;
    if let Some(pause) = &pause {
        say(&format!(
            "This agent is {}: it takes no job until `trunkfarm-agent resume`.",
            pause.describe()
        ));
    }
    if !results.is_empty() {
        tracing::info!(
            "{} job result(s) from an earlier run wait for delivery to the hub",
            results.len()
        );
    }
    tracing::info!(
        hub = %credential.hub,
        agent = %credential.agent_id,
        name = %caps.name,
        labels = ?caps.labels,
        max_parallel_jobs = caps.max_parallel_jobs,
        sandbox = %caps.sandbox,
        work_dir = %policy.work_root.display(),
        cache_dir = %artifacts.cache.dir().display(),
        cache_size = %fmt_bytes(config.cache.size),
        cached = %fmt_bytes(artifacts.cache.cached_bytes()),
        "starting trunkfarm-agent {}",
        env!("CARGO_PKG_VERSION")
    );
    // Logs saved with unacknowledged results go again with them.
    let mut outbox = Outbox::new(kept_log_bound(config.output_cap));
    outbox.restore(results.take_logs());
    let mut agent = Agent {
        hub: credential.hub.clone(),
        agent_id: credential.agent_id.clone(),
        trust: credential.trust(),
        bearer,
        caps,
        jobs: Jobs::new(policy.work_root.clone(), artifacts.clone()),
        policy,
        drain_grace: config.drain_grace,
        results,
        result_sent: HashMap::new(),
        outbox,
        link: Link::Down {
            retry_at: Instant::now(),
        },
        backoff: Backoff::new(config.reconnect_max_backoff),
        drain: Drain::default(),
        signals,
        control,
        pause_ends: pause.as_ref().and_then(|p| p.until_ms).map(instant_at),
        pause,
        limits,
        handing_back: BTreeSet::new(),
        running: HashMap::new(),
        state_dir,
        started_ms: crate::lock::now_ms(),
        connected_since_ms: None,
        cache: artifacts.cache.clone(),
    };
    let ending = agent.run().await;
    if let Some(server) = server {
        server.close().await;
    }
    let downloads = artifacts.cache.downloads();
    if downloads > 0 {
        tracing::info!(
            "downloaded {downloads} runtime artifact(s) since the agent started; {} cached in {}",
            fmt_bytes(artifacts.cache.cached_bytes()),
            artifacts.cache.dir().display()
        );
    }
    Ok(ending)
}

/// What this machine offers, as sent in every hello.
pub(crate) fn capabilities(
    config: &AgentConfig,
    fallback_name: Option<&str>,
    machine: &Machine,
) -> Capabilities {
    let mut labels: Vec<String> = Vec::new();
    for label in config
        .labels
        .iter()
        .cloned()
        .chain(trunkfarm_proto::platform::labels(
            &machine.os,
            &machine.arch,
        ))
    {
        if !labels.contains(&label) {
            labels.push(label);
        }
    }
    Capabilities {
        name: config
            .name
            .clone()
            .or_else(|| fallback_name.map(str::to_owned))
            .unwrap_or_default(),
        labels,
        os: machine.os.clone(),
        arch: machine.arch.clone(),
        // What the donor offers, never more than there is.
        cores: config.cores.map_or(machine.cores, |c| c.min(machine.cores)),
        memory_bytes: match (config.memory, machine.memory_bytes) {
            (Some(offered), 0) => offered,
            (Some(offered), there) => offered.min(there),
            (None, there) => there,
        },
        max_parallel_jobs: config.max_parallel_jobs,
        allowed_projects: config.allowed_projects.clone(),
        denied_projects: config.denied_projects.clone(),
        cache_bytes: config.cache.size,
        // Rounded up: a sub-second remainder must not turn into "no ceiling".
        max_job_timeout_secs: config
            .max_job_timeout
            .map_or(0, |d| d.as_secs() + u64::from(d.subsec_nanos() > 0)),
        output_cap_bytes: config.output_cap,
        // Set by `run` once the sandbox and the donor's limits are known.
        sandbox: String::new(),
        schedule: String::new(),
        only_when_idle: String::new(),
    }
}

/// The hello that opens a session. `held` lists the jobs whose leases the
/// agent still needs: running ones and those whose result is unacknowledged;
/// `paused` why it takes no new job (its donor's pause or limits).
pub(crate) fn hello(
    caps: &Capabilities,
    held: Vec<JobRef>,
    draining: bool,
    paused: Option<Paused>,
) -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        capabilities: Some(caps.clone()),
        running: held,
        draining,
        paused,
    }
}

/// What the hub is told of the donor's pause (`None`: resumed).
pub(crate) fn paused(pause: &Pause) -> Paused {
    Paused {
        paused: true,
        reason: pause.reason().to_owned(),
        until_ms: pause.until_ms.unwrap_or(0),
    }
}

/// The tokio instant of a Unix ms time (now, if it passed).
fn instant_at(ms: u64) -> Instant {
    let ahead = ms.saturating_sub(crate::lock::now_ms());
    // Capped like a drain's grace: never overflow.
    Instant::now() + Duration::from_millis(ahead.min(365 * 24 * 3600 * 1000))
}

/// A job handed back to the hub unfinished: it runs elsewhere without
/// using up an attempt (`JobResult.handed_back`).
fn handed_back(mut result: JobResult, why: &str) -> JobResult {
    result.outcome = Outcome::Error as i32;
    result.handed_back = true;
    result.detail = format!("handed back: {why}");
    result.exit_code = None;
    result.artifact_sha256.clear();
    result
}

/// The union of running and unacknowledged jobs, ordered, without repeats.
pub(crate) fn held_jobs(
    running: impl Iterator<Item = JobRef>,
    unacknowledged: impl Iterator<Item = JobRef>,
) -> Vec<JobRef> {
    let set: BTreeSet<(u64, u32)> = running.chain(unacknowledged).map(|j| key(&j)).collect();
    set.into_iter()
        .map(|(job_id, attempt)| JobRef { job_id, attempt })
        .collect()
}

/// Why a connection failed or ended.
#[derive(Debug)]
enum LinkError {
    /// Could not set up the channel (unreachable, TLS, pin mismatch).
    Dial(DialError),
    /// The hub (or the transport) ended the call with a status.
    Status(Status),
    /// No welcome within [`WELCOME_TIMEOUT`].
    Timeout,
    /// The hub ended the session without a status.
    Closed,
    /// The hub broke the protocol.
    Protocol(String),
}

impl fmt::Display for LinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkError::Dial(e) => write!(f, "{e}"),
            LinkError::Status(s) if s.message().is_empty() => {
                write!(f, "the session ended: {}", s.code().description())
            }
            LinkError::Status(s) => {
                write!(
                    f,
                    "the session ended: {}: {}",
                    s.code().description(),
                    s.message()
                )
            }
            LinkError::Timeout => write!(
                f,
                "the hub did not welcome this agent within {}s",
                WELCOME_TIMEOUT.as_secs()
            ),
            LinkError::Closed => write!(f, "the hub closed the session"),
            LinkError::Protocol(what) => write!(f, "protocol error: {what}"),
        }
    }
}

impl LinkError {
    /// The ending this error forces, if it is one retrying cannot fix.
    fn fatal(&self) -> Option<Ending> {
        let LinkError::Status(status) = self else {
            return None;
        };
        let message = || {
            if status.message().is_empty() {
                format!("{} ({:?})", status.code().description(), status.code())
            } else {
                status.message().to_owned()
            }
        };
        match status.code() {
            Code::Unauthenticated | Code::PermissionDenied => Some(Ending::Refused(message())),
            Code::FailedPrecondition => Some(Ending::Incompatible(message())),
            _ => None,
        }
    }

    /// True for errors that will not go away by themselves (a pinned CA
    /// that does not match, an unusable address): worth an error, not a
    /// warning, each time.
    fn needs_operator(&self) -> bool {
        match self {
            LinkError::Dial(
                DialError::InvalidPin { .. }
                | DialError::InvalidAddress { .. }
                | DialError::TlsSetup(_),
            ) => true,
            // `DialError::Tls` also covers a connection reset mid-handshake
            // (a hub restarting), which fixes itself; only a certificate
            // the pin refuses, or a server that does not speak TLS, needs
            // someone to act.
            LinkError::Dial(DialError::Tls { message, .. }) => {
                message.contains("certificate")
                    || message.contains("pinned CA")
                    || message.contains("does not speak TLS")
            }
            _ => false,
        }
    }
}

/// A dial plus the `Session` call, resolving to the hub's message stream.
type ConnectFuture =
    Pin<Box<dyn Future<Output = Result<(Streaming<HubMessage>, Channel), LinkError>> + Send>>;

/// Dials the hub and opens the session; the hello is already in `outbound`.
fn connect(
    hub: String,
    trust: HubTrust,
    bearer: MetadataValue<Ascii>,
    outbound: mpsc::Receiver<AgentMessage>,
) -> ConnectFuture {
    Box::pin(async move {
        let opts = DialOptions::default();
        let channel = dial::connect(&hub, &trust, &opts)
            .await
            .map_err(LinkError::Dial)?;
        let mut client = AgentServiceClient::new(channel.clone())
            .max_decoding_message_size(opts.max_message_bytes)
            .max_encoding_message_size(opts.max_message_bytes);
        let mut request = tonic::Request::new(ReceiverStream::new(outbound));
        request.metadata_mut().insert(AUTHORIZATION, bearer);
        let response = client.session(request).await.map_err(LinkError::Status)?;
        Ok((response.into_inner(), channel))
    })
}

/// The connection to the hub, in one of its three states.
enum Link {
    /// Not connected; dial again at `retry_at`.
    Down {
        /// When to dial.
        retry_at: Instant,
    },
    /// Dialing, or waiting for the hub to accept the session.
    Connecting {
        /// Feeds the session's outbound stream (the hello is in it).
        tx: mpsc::Sender<AgentMessage>,
        /// The dial and call.
        future: ConnectFuture,
        /// Give up if not welcomed by then.
        deadline: Instant,
    },
    /// The session is open.
    Up(Box<Session>),
}

/// An open session.
struct Session {
    /// Feeds the outbound stream.
    tx: mpsc::Sender<AgentMessage>,
    /// The hub's messages.
    inbound: Streaming<HubMessage>,
    /// Keeps the HTTP/2 connection alive for as long as the session.
    _channel: Channel,
    /// The hub's welcome arrived: the session is usable.
    welcomed: bool,
    /// Give up if not welcomed by then.
    deadline: Instant,
    /// Heartbeat ticks, once welcomed.
    heartbeat: Option<Interval>,
    /// The outbound stream was closed by the transport: stop feeding it and
    /// let the inbound side report why.
    tx_closed: bool,
}

/// What the link has to say.
enum LinkWake {
    /// Time to dial again.
    RetryDue,
    /// The dial and call finished.
    Connected(Result<(Streaming<HubMessage>, Channel), LinkError>),
    /// No welcome in time.
    WelcomeOverdue,
    /// A message from the hub, its end, or an error.
    Inbound(Result<Option<HubMessage>, Status>),
    /// Time for a heartbeat.
    HeartbeatDue,
    /// Room in the outbound channel (or it is closed).
    Permit(Result<mpsc::OwnedPermit<AgentMessage>, mpsc::error::SendError<()>>),
}

impl Link {
    /// True once the hub welcomed this agent on the current session.
    fn welcomed(&self) -> bool {
        matches!(self, Link::Up(s) if s.welcomed)
    }

    /// Waits for the link's next event; `want_send` asks for room in the
    /// outbound channel. Cancel-safe.
    async fn next(&mut self, want_send: bool) -> LinkWake {
        match self {
            Link::Down { retry_at } => {
                tokio::time::sleep_until(*retry_at).await;
                LinkWake::RetryDue
            }
            Link::Connecting {
                future, deadline, ..
            } => tokio::select! {
                result = future => LinkWake::Connected(result),
                () = tokio::time::sleep_until(*deadline) => LinkWake::WelcomeOverdue,
            },
            Link::Up(s) => {
                let send = s.welcomed && want_send && !s.tx_closed;
                tokio::select! {
                    message = s.inbound.message() => LinkWake::Inbound(message),
                    () = tokio::time::sleep_until(s.deadline), if !s.welcomed => {
                        LinkWake::WelcomeOverdue
                    }
                    _ = tick(&mut s.heartbeat), if s.welcomed => LinkWake::HeartbeatDue,
                    permit = s.tx.clone().reserve_owned(), if send => LinkWake::Permit(permit),
                }
            }
        }
    }
}

/// The next tick of an optional interval (never, without one).
async fn tick(interval: &mut Option<Interval>) -> Instant {
    match interval {
        Some(i) => i.tick().await,
        None => std::future::pending().await,
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The drain's progress.
#[derive(Debug, Default)]
struct Drain {
    /// Draining: no new jobs, exit once jobs are done and results delivered.
    active: bool,
    /// When running jobs get cancelled.
    grace_deadline: Option<Instant>,
    /// When to stop waiting for acknowledgements, once no job runs.
    ack_deadline: Option<Instant>,
}

/// SIGTERM and SIGINT, counted.
struct Signals {
    /// SIGTERM (service managers).
    term: Signal,
    /// SIGINT (Ctrl-C).
    int: Signal,
    /// How many were received.
    count: u32,
}

impl Signals {
    /// Installs the handlers (from now on the signals no longer kill us).
    fn new() -> std::io::Result<Self> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            count: 0,
        })
    }

    /// The next signal's name. Cancel-safe.
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            Some(()) = self.term.recv() => "SIGTERM",
            Some(()) = self.int.recv() => "SIGINT",
            else => std::future::pending().await,
        }
    }
}

/// What woke the agent's loop.
enum Wake {
    /// The link.
    Link(LinkWake),
    /// A job.
    Job(JobWake),
    /// A signal, by name.
    Signal(&'static str),
    /// The drain's grace period is over.
    GraceOver,
    /// The drained agent waited long enough for acknowledgements.
    AckWaitOver,
    /// A donor's command on the control socket.
    Control(Control),
    /// The donor's `pause --for` ran out.
    PauseOver,
    /// Time to look at the donor's limits again (`limits.rs`).
    Limits,
}

/// The agent: all its state, owned by one task.
struct Agent {
    /// The hub address.
    hub: String,
    /// This agent's id.
    agent_id: String,
    /// How to trust the hub.
    trust: HubTrust,
    /// The `authorization` value (sensitive).
    bearer: MetadataValue<Ascii>,
    /// What the hello advertises.
    caps: Capabilities,
    /// What jobs are accepted and how they run.
    policy: JobPolicy,
    /// Grace period of a signal-initiated drain.
    drain_grace: Duration,
    /// Running jobs.
    jobs: Jobs,
    /// Results not yet acknowledged.
    results: ResultStore,
    /// When each unacknowledged result was last queued on this session.
    result_sent: HashMap<JobKey, Instant>,
    /// Messages not yet sent.
    outbox: Outbox,
    /// The connection.
    link: Link,
    /// Redial pacing.
    backoff: Backoff,
    /// Drain progress.
    drain: Drain,
    /// Signal handlers.
    signals: Signals,
    /// The donor's commands (`control.rs`).
    control: mpsc::Receiver<Control>,
    /// The donor's pause: no new job while set (kept in the state dir).
    pause: Option<Pause>,
    /// When a `pause --for` ends.
    pause_ends: Option<Instant>,
    /// The donor's schedule and `only_when_idle`: no new job while they
    /// say so (a pause wins over them).
    limits: Gate,
    /// Jobs cancelled to be handed back (`pause --now`, `unenroll`): their
    /// cancelled results go to the hub as handed back.
    handing_back: BTreeSet<JobKey>,
    /// What each running job is, for the donor.
    running: HashMap<JobKey, JobInfo>,
    /// The state directory (the journal, the pause).
    state_dir: PathBuf,
    /// When this agent started (Unix ms).
    started_ms: u64,
    /// When the current session was welcomed (Unix ms).
    connected_since_ms: Option<u64>,
    /// The artifact cache, for `status`.
    cache: ArtifactCache,
}

impl Agent {
    /// The main loop.
    async fn run(&mut self) -> Ending {
        loop {
            if let Some(ending) = self.check_drained() {
                return ending;
            }
            let welcomed = self.link.welcomed();
            // Back-pressure while the network is the bottleneck; buffer (with
            // a cap) while disconnected, so jobs are never held up by it.
            let accept = !(welcomed && self.outbox.log_bytes() >= SEND_HIGH_WATER);
            let want_send = !self.outbox.is_empty();
            let wake = tokio::select! {
                w = self.link.next(want_send) => Wake::Link(w),
                w = self.jobs.next(accept) => Wake::Job(w),
                s = self.signals.next() => Wake::Signal(s),
                () = sleep_opt(self.drain.grace_deadline) => Wake::GraceOver,
                () = sleep_opt(self.drain.ack_deadline) => Wake::AckWaitOver,
                Some(c) = self.control.recv() => Wake::Control(c),
                () = sleep_opt(self.pause_ends) => Wake::PauseOver,
                () = sleep_opt(self.limits.due()) => Wake::Limits,
            };
            let ending = match wake {
                Wake::Link(w) => self.on_link(w),
                Wake::Job(JobWake::Log(chunk)) => {
                    let job = chunk.job.unwrap_or_default();
                    if self.outbox.push_log(chunk) {
                        tracing::warn!(
                            job = job.job_id,
                            attempt = job.attempt,
                            "the job's log passed the agent's output cap (output_cap {}): \
                             dropping the rest of it",
                            fmt_bytes(self.policy.output_cap)
                        );
                    }
                    None
                }
                Wake::Job(JobWake::Finished(result)) => {
                    self.finished(result);
                    None
                }
                Wake::Control((request, reply)) => {
                    let answer = self.on_control(request);
                    if reply.send(answer).is_err() {
                        tracing::debug!("the donor's command left before its answer");
                    }
                    None
                }
                Wake::PauseOver => {
                    match self.limits.unavailable() {
                        Some(u) => say(&format!(
                            "The pause is over: this agent takes work again once its limits \
                             allow: it is {}.",
                            u.describe()
                        )),
                        None => say("The pause is over: this agent takes work again."),
                    }
                    self.set_pause(None);
                    None
                }
                Wake::Limits => {
                    if self.limits.check(self.jobs.len()) {
                        self.limits_changed();
                    }
                    None
                }
                Wake::Signal(name) => self.on_signal(name),
                Wake::GraceOver => {
                    self.drain.grace_deadline = None;
                    if !self.jobs.is_empty() {
                        tracing::info!(
                            "the drain's grace period is over: cancelling {} running job(s)",
                            self.jobs.len()
                        );
                    }
                    self.jobs.cancel_all(
                        "cancelled: the agent was draining and the job outlived the grace period",
                    );
                    None
                }
                Wake::AckWaitOver => {
                    tracing::warn!(
                        "the hub did not acknowledge {} result(s) within {}s; they are kept in \
                         {} and delivered on the next start",
                        self.results.len(),
                        ACK_WAIT.as_secs(),
                        self.results.dir().display()
                    );
                    Some(Ending::Drained)
                }
            };
            if let Some(ending) = ending {
                if ending != Ending::Drained {
                    self.jobs
                        .abandon("cancelled: the hub refused this agent", ABANDON_WAIT)
                        .await;
                }
                return ending;
            }
        }
    }

    /// Ends a drain once no job runs and every result is acknowledged (or
    /// starts the bounded wait for the acknowledgements).
    fn check_drained(&mut self) -> Option<Ending> {
        if !self.drain.active || !self.jobs.is_empty() {
            return None;
        }
        if self.results.is_empty() {
            tracing::info!("drained: no job is running and every result was delivered");
            return Some(Ending::Drained);
        }
        if self.drain.ack_deadline.is_none() {
            tracing::info!(
                "waiting up to {}s for the hub to acknowledge {} result(s)",
                ACK_WAIT.as_secs(),
                self.results.len()
            );
            self.drain.ack_deadline = Some(Instant::now() + ACK_WAIT);
        }
        None
    }

    /// Handles a link event; `Some` ends the agent.
    fn on_link(&mut self, wake: LinkWake) -> Option<Ending> {
        match wake {
            LinkWake::RetryDue => {
                self.start_connect();
                None
            }
            LinkWake::Connected(Ok((inbound, channel))) => {
                let old = std::mem::replace(
                    &mut self.link,
                    Link::Down {
                        retry_at: Instant::now(),
                    },
                );
                if let Link::Connecting { tx, deadline, .. } = old {
                    self.link = Link::Up(Box::new(Session {
                        tx,
                        inbound,
                        _channel: channel,
                        welcomed: false,
                        deadline,
                        heartbeat: None,
                        tx_closed: false,
                    }));
                }
                None
            }
            LinkWake::Connected(Err(e)) => self.link_failed(e),
            LinkWake::WelcomeOverdue => self.link_failed(LinkError::Timeout),
            LinkWake::Inbound(Ok(Some(message))) => self.on_message(message),
            LinkWake::Inbound(Ok(None)) => self.link_failed(LinkError::Closed),
            LinkWake::Inbound(Err(status)) => self.link_failed(LinkError::Status(status)),
            LinkWake::HeartbeatDue => {
                self.outbox.push_heartbeat(Heartbeat {
                    running: self.held(),
                });
                self.resend_stale_results();
                None
            }
            LinkWake::Permit(Ok(permit)) => {
                if let Some(message) = self.outbox.pop() {
                    permit.send(message);
                }
                None
            }
            LinkWake::Permit(Err(_)) => {
                if let Link::Up(s) = &mut self.link {
                    s.tx_closed = true;
                }
                None
            }
        }
    }

    /// Starts dialing, with a hello describing the agent as it is now.
    fn start_connect(&mut self) {
        let (tx, rx) = mpsc::channel(OUTBOUND_CHANNEL);
        let hello = hello(
            &self.caps,
            self.held(),
            self.drain.active,
            self.paused_now(),
        );
        // A fresh channel has room for its first message.
        let _ = tx.try_send(AgentMessage {
            msg: Some(Msg::Hello(hello)),
        });
        tracing::debug!(hub = %self.hub, "connecting");
        self.link = Link::Connecting {
            tx,
            future: connect(
                self.hub.clone(),
                self.trust.clone(),
                self.bearer.clone(),
                rx,
            ),
            deadline: Instant::now() + WELCOME_TIMEOUT,
        };
    }

    /// The connection failed or ended: give up for good if the hub refused
    /// us, otherwise schedule a redial.
    fn link_failed(&mut self, error: LinkError) -> Option<Ending> {
        let was_welcomed = self.link.welcomed();
        self.outbox.disconnected();
        self.result_sent.clear();
        self.connected_since_ms = None;
        let delay = self.backoff.next_delay();
        self.link = Link::Down {
            retry_at: Instant::now() + delay,
        };
        if let Some(ending) = error.fatal() {
            return Some(ending);
        }
        let delay = humantime::format_duration(Duration::from_millis(
            u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
        ));
        let what = if was_welcomed {
            "lost the session with the hub"
        } else {
            "cannot connect to the hub"
        };
        if error.needs_operator() {
            tracing::error!(hub = %self.hub, "{what}: {error}; retrying in {delay}");
        } else {
            tracing::warn!(hub = %self.hub, "{what}: {error}; retrying in {delay}");
        }
        None
    }

    /// Handles a message from the hub.
    fn on_message(&mut self, message: HubMessage) -> Option<Ending> {
        let Some(msg) = message.msg else {
            tracing::debug!("ignoring an empty message from the hub");
            return None;
        };
        if !self.link.welcomed() {
            return match msg {
                HubMsg::Welcome(welcome) => {
                    self.welcomed(welcome);
                    None
                }
                _ => self.link_failed(LinkError::Protocol(
                    "the hub sent a message before its welcome".to_owned(),
                )),
            };
        }
        match msg {
            HubMsg::Welcome(_) => tracing::warn!("ignoring a second welcome from the hub"),
            HubMsg::Assign(assignment) => self.assign(assignment),
            HubMsg::Cancel(cancel) => self.cancel(cancel),
            HubMsg::Drain(drain) => self.start_drain(
                Duration::from_secs(drain.grace_secs),
                "the hub asked this agent to drain",
            ),
            HubMsg::ResultAck(ack) => self.acknowledged(ack),
            HubMsg::Notice(notice) => donor::hub_notice(&notice.text),
        }
        None
    }

    /// The hub welcomed us: the session is usable; send what it missed.
    fn welcomed(&mut self, welcome: Welcome) {
        self.backoff.reset();
        let interval = match welcome.heartbeat_interval_ms {
            0 => DEFAULT_HEARTBEAT,
            ms => {
                Duration::from_millis(ms).clamp(Duration::from_secs(1), Duration::from_secs(3600))
            }
        };
        if let Link::Up(s) = &mut self.link {
            s.welcomed = true;
            let mut heartbeat = tokio::time::interval_at(Instant::now() + interval, interval);
            heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
            s.heartbeat = Some(heartbeat);
        }
        if !welcome.agent_id.is_empty() && welcome.agent_id != self.agent_id {
            tracing::warn!(
                "the hub welcomed this agent as {}, but its credential says {}",
                welcome.agent_id,
                self.agent_id
            );
        }
        tracing::info!(
            hub_version = %welcome.hub_version,
            labels = ?welcome.labels,
            "connected to hub {} as {}",
            self.hub,
            self.agent_id
        );
        self.connected_since_ms = Some(crate::lock::now_ms());
        say(&format!(
            "Connected to hub {} as agent {}{}.",
            self.hub,
            self.agent_id,
            if self.paused_now().is_some() {
                " (paused: it takes no job)"
            } else {
                ""
            }
        ));
        // The hub may lack any log chunk not covered by an acknowledged
        // result (lost in flight, or with a killed hub): all kept chunks go
        // again, each attempt's before its result; results without chunks
        // go first (they free leases).
        let held = self.held();
        self.outbox.welcomed(self.results.results(), &held);
        if self.outbox.log_bytes() > 0 {
            tracing::debug!(
                "sending again {} of log the hub may lack ({} kept in all)",
                fmt_bytes(self.outbox.log_bytes() as u64),
                fmt_bytes(self.outbox.kept_bytes() as u64)
            );
        }
        let now = Instant::now();
        self.result_sent = self.results.jobs().map(|j| (key(&j), now)).collect();
        if self.drain.active {
            self.outbox.push_control(Msg::Draining(Draining {}));
        }
    }

    /// The jobs whose leases this agent holds: running or unacknowledged.
    fn held(&self) -> Vec<JobRef> {
        held_jobs(self.jobs.jobs(), self.results.jobs())
    }

    /// Runs (or refuses) an assigned job.
    fn assign(&mut self, assignment: Assignment) {
        let Some(job) = assignment.job else {
            tracing::warn!("ignoring an assignment without a job reference");
            return;
        };
        if self.jobs.contains(&job) || self.results.contains(&job) {
            tracing::debug!(
                job = job.job_id,
                attempt = job.attempt,
                "ignoring a repeated assignment"
            );
            return;
        }
        let Some(spec) = assignment.spec else {
            self.refuse(job, "the assignment carried no job spec".to_owned());
            return;
        };
        if let Some(paused) = self.paused_now() {
            // Sent before the hub heard of the pause: it runs elsewhere.
            tracing::info!(
                job = job.job_id,
                attempt = job.attempt,
                "handing back a job: the agent is {}",
                paused.reason
            );
            self.deliver(handed_back(
                jobs::refusal(job, String::new()),
                &format!("the agent is {}", paused.reason),
            ));
            return;
        }
        match self.policy.admit(&spec, self.jobs.len(), self.drain.active) {
            Ok((limits, donor_capped)) => {
                tracing::info!(
                    job = job.job_id,
                    attempt = job.attempt,
                    project = %spec.project,
                    commands = spec.commands.len(),
                    "starting job"
                );
                let info = JobInfo::starting(job, &spec);
                say(&info.started_line());
                self.running.insert(key(&job), info);
                self.jobs.start(job, spec, limits, donor_capped);
                self.outbox
                    .push_control(Msg::Started(JobStarted { job: Some(job) }));
            }
            Err(detail) => self.refuse(job, detail),
        }
    }

    /// Reports that this agent will not run `job`.
    fn refuse(&mut self, job: JobRef, detail: String) {
        tracing::info!(
            job = job.job_id,
            attempt = job.attempt,
            "refusing job: {detail}"
        );
        self.deliver(jobs::refusal(job, detail));
    }

    /// Keeps a result until acknowledged (on disk, with the attempt's kept
    /// log chunks), and sends it if the session is up (otherwise it goes
    /// after the next welcome).
    fn deliver(&mut self, result: JobResult) {
        let job = result.job.unwrap_or_default();
        self.results
            .insert(result.clone(), self.outbox.kept_chunks(&job));
        if self.link.welcomed() {
            if let Some(job) = &result.job {
                self.result_sent.insert(key(job), Instant::now());
            }
            self.outbox.push_result(result);
        }
    }

    /// Sends again the results the hub has not acknowledged for a while (it
    /// does not acknowledge a result it failed to record), unless a copy is
    /// still waiting to go.
    fn resend_stale_results(&mut self) {
        let now = Instant::now();
        let stale: Vec<JobResult> = self
            .results
            .results()
            .filter(|r| {
                r.job.as_ref().is_some_and(|job| {
                    self.result_sent
                        .get(&key(job))
                        .is_none_or(|sent| now.duration_since(*sent) >= RESULT_RESEND)
                        && !self.outbox.has_result(job)
                })
            })
            .cloned()
            .collect();
        for result in stale {
            if let Some(job) = &result.job {
                tracing::debug!(
                    job = job.job_id,
                    attempt = job.attempt,
                    "resending an unacknowledged result"
                );
                self.result_sent.insert(key(job), now);
            }
            self.outbox.push_result(result);
        }
    }

    /// The hub cancels a job.
    fn cancel(&mut self, cancel: Cancel) {
        let Some(job) = cancel.job else {
            return;
        };
        let reason = if cancel.reason.is_empty() {
            "cancelled by the hub".to_owned()
        } else {
            format!("cancelled by the hub: {}", cancel.reason)
        };
        if self.jobs.cancel(&job, &reason) {
            tracing::info!(job = job.job_id, attempt = job.attempt, "{reason}");
        } else {
            tracing::debug!(
                job = job.job_id,
                attempt = job.attempt,
                "cancel for a job that is not running"
            );
        }
    }

    /// The hub acknowledged a result (recorded it, so the log chunks that
    /// preceded it are durable too, or refused it for good): stop resending
    /// it and its log.
    fn acknowledged(&mut self, ack: ResultAck) {
        let Some(job) = ack.job else {
            return;
        };
        self.outbox.forget(&job);
        self.result_sent.remove(&key(&job));
        let known = self.results.remove(&job);
        if !ack.recorded {
            tracing::warn!(
                job = job.job_id,
                attempt = job.attempt,
                "the hub refused the job's result (not recorded; it will not be sent again): {}",
                if ack.detail.is_empty() {
                    "no reason given"
                } else {
                    &ack.detail
                }
            );
        } else if known {
            tracing::debug!(
                job = job.job_id,
                attempt = job.attempt,
                "result acknowledged"
            );
        }
    }

    /// A job ended: a job being handed back goes back as such (unless it
    /// finished first), the donor is told, the journal keeps it, and the
    /// result goes to the hub.
    fn finished(&mut self, mut result: JobResult) {
        let job = result.job.unwrap_or_default();
        if self.handing_back.remove(&key(&job)) && result.outcome == Outcome::Cancelled as i32 {
            result = handed_back(result, "the agent's donor took it back");
        }
        let mut info = self.running.remove(&key(&job)).unwrap_or_else(|| JobInfo {
            job_id: job.job_id,
            attempt: job.attempt,
            ..JobInfo::default()
        });
        info.finish(&result);
        say(&info.finished_line());
        if let Err(e) = donor::record(&self.state_dir, &info) {
            tracing::warn!(
                "cannot keep the job in {}: {e}",
                self.state_dir.join(donor::HISTORY_FILE).display()
            );
        }
        self.deliver(result);
    }

    /// Answers a donor's command.
    fn on_control(&mut self, request: Request) -> Answer {
        let message = match request {
            Request::Status => String::new(),
            Request::Pause { for_secs, now } => {
                let now_ms = crate::lock::now_ms();
                let pause = Pause {
                    since_ms: self.pause.as_ref().map_or(now_ms, |p| p.since_ms),
                    until_ms: for_secs.map(|s| now_ms.saturating_add(s.saturating_mul(1000))),
                };
                let mut message = format!("This agent is {}.", pause.describe());
                self.set_pause(Some(pause));
                if now && !self.jobs.is_empty() {
                    let n = self.hand_back_all();
                    message.push_str(&format!(
                        " Its {n} running job(s) go back to the hub to run elsewhere."
                    ));
                } else if !self.jobs.is_empty() {
                    message.push_str(&format!(
                        " Its {} running job(s) finish first (`pause --now` hands them back).",
                        self.jobs.len()
                    ));
                }
                say(&message);
                message
            }
            Request::Resume => {
                let mut message = if self.pause.is_some() {
                    "This agent takes work again".to_owned()
                } else {
                    "This agent was not paused: it takes work".to_owned()
                };
                if let Some(u) = self.limits.unavailable() {
                    message.push_str(&format!(" once its limits allow: it is {}", u.describe()));
                }
                message.push('.');
                self.set_pause(None);
                say(&message);
                message
            }
            Request::Leave => {
                let n = self.hand_back_all();
                self.start_drain(Duration::ZERO, "its donor unenrolls it");
                let message = format!(
                    "The agent hands back its {n} running job(s) and stops once the hub has \
                     their results."
                );
                say(&message);
                message
            }
        };
        Answer {
            message,
            status: Some(self.status()),
        }
    }

    /// Pauses (or resumes, `None`): kept in the state dir, told to the hub.
    fn set_pause(&mut self, pause: Option<Pause>) {
        if let Err(e) = donor::save_pause(&self.state_dir, pause.as_ref()) {
            tracing::warn!(
                "cannot keep the pause in {} (it ends when the agent stops): {e}",
                self.state_dir.join(donor::PAUSE_FILE).display()
            );
        }
        self.pause_ends = pause.as_ref().and_then(|p| p.until_ms).map(instant_at);
        self.pause = pause;
        self.tell_paused();
    }

    /// Why it takes no new job now, as the hub is told: the donor's pause,
    /// else the donor's limits; `None`: it takes work.
    fn paused_now(&self) -> Option<Paused> {
        match &self.pause {
            Some(pause) => Some(paused(pause)),
            None => self.limits.unavailable().map(|u| u.paused()),
        }
    }

    /// Tells the hub whether it takes work now (if connected; else the
    /// next hello says it).
    fn tell_paused(&mut self) {
        if self.link.welcomed() {
            let told = self.paused_now().unwrap_or_default();
            self.outbox.push_control(Msg::Paused(told));
        }
    }

    /// The donor's limits changed their answer: say so to the donor and,
    /// unless the donor's pause covers it, to the hub.
    fn limits_changed(&mut self) {
        match self.limits.unavailable() {
            Some(u) => say(&format!(
                "This agent takes no new job: it is {}.",
                u.describe()
            )),
            None => say("This agent's limits let it take work again."),
        }
        if self.pause.is_none() {
            self.tell_paused();
        }
    }

    /// Cancels every running job to hand it back; how many.
    fn hand_back_all(&mut self) -> usize {
        let running: Vec<JobRef> = self.jobs.jobs().collect();
        for job in &running {
            self.handing_back.insert(key(job));
            self.jobs
                .cancel(job, "handed back: the agent's donor took it back");
        }
        running.len()
    }

    /// What `status` shows.
    fn status(&self) -> AgentStatus {
        let mut jobs: Vec<JobInfo> = self.running.values().cloned().collect();
        jobs.sort_by_key(|j| (j.job_id, j.attempt));
        AgentStatus {
            running: true,
            pid: Some(std::process::id()),
            started_ms: Some(self.started_ms),
            state_dir: self.state_dir.clone(),
            hub: self.hub.clone(),
            agent_id: self.agent_id.clone(),
            name: self.caps.name.clone(),
            connected: self.link.welcomed(),
            connected_since_ms: self.connected_since_ms,
            paused: self.pause.clone(),
            unavailable: self.limits.unavailable().map(|u| u.describe()),
            draining: self.drain.active,
            jobs,
            last_day: donor::recent(&self.state_dir).unwrap_or_else(|e| {
                tracing::warn!("cannot read the jobs of the last day: {e}");
                Vec::new()
            }),
            cache_dir: self.cache.dir().to_path_buf(),
            cache_bytes: self.cache.cached_bytes(),
            undelivered_results: self.results.len(),
        }
    }

    /// Starts draining (or shortens a drain's grace period).
    fn start_drain(&mut self, grace: Duration, why: &str) {
        if !self.drain.active {
            self.drain.active = true;
            if self.jobs.is_empty() {
                tracing::info!("{why}: draining");
            } else {
                tracing::info!(
                    "{why}: draining; {} running job(s) may finish within {}",
                    self.jobs.len(),
                    humantime::format_duration(grace)
                );
            }
            if self.link.welcomed() {
                self.outbox.push_control(Msg::Draining(Draining {}));
            }
        }
        // A grace from the network may be absurd: never overflow, cap at a year.
        let grace = grace.min(Duration::from_secs(365 * 24 * 3600));
        let deadline = Instant::now()
            .checked_add(grace)
            .unwrap_or_else(Instant::now);
        self.drain.grace_deadline = Some(
            self.drain
                .grace_deadline
                .map_or(deadline, |d| d.min(deadline)),
        );
    }

    /// SIGTERM / SIGINT: the first drains, the second cancels the running
    /// jobs, the third exits at once.
    fn on_signal(&mut self, name: &str) -> Option<Ending> {
        self.signals.count += 1;
        match self.signals.count {
            1 => {
                self.start_drain(self.drain_grace, &format!("received {name}"));
                if !self.jobs.is_empty() {
                    tracing::info!("send the signal again to cancel the running jobs now");
                }
                None
            }
            2 => {
                // The first signal started the drain; this one ends its grace.
                self.drain.grace_deadline = None;
                if !self.jobs.is_empty() {
                    tracing::info!(
                        "received {name} again: cancelling {} running job(s)",
                        self.jobs.len()
                    );
                }
                self.jobs
                    .cancel_all("cancelled: the agent was stopped by its operator");
                None
            }
            _ => {
                tracing::warn!(
                    "received {name} a third time: exiting now; undelivered results stay in {} \
                     and are sent on the next start",
                    self.results.dir().display()
                );
                Some(Ending::Drained)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> Machine {
        Machine {
            os: "linux".into(),
            arch: "x86_64".into(),
            cores: 8,
            memory_bytes: 16 << 30,
        }
    }

    #[test]
    fn hello_contents() {
        let config = AgentConfig {
            labels: vec!["gpu".into(), "linux".into()],
            max_parallel_jobs: 3,
            allowed_projects: vec!["cpython".into()],
            max_job_timeout: Some(Duration::from_millis(5_400_500)),
            output_cap: 8192,
            ..AgentConfig::default()
        };
        let caps = capabilities(&config, Some("host-a"), &machine());
        assert_eq!(
            caps,
            Capabilities {
                name: "host-a".into(),
                labels: vec![
                    "gpu".into(),
                    "linux".into(),
                    "x86_64".into(),
                    "linux-x86_64".into()
                ],
                os: "linux".into(),
                arch: "x86_64".into(),
                cores: 8,
                memory_bytes: 16 << 30,
                max_parallel_jobs: 3,
                allowed_projects: vec!["cpython".into()],
                max_job_timeout_secs: 5401,
                output_cap_bytes: 8192,
                sandbox: String::new(),
                denied_projects: Vec::new(),
                schedule: String::new(),
                only_when_idle: String::new(),
                cache_bytes: 10 << 30,
            }
        );
        // What the donor offers, never more than the machine has.
        let offered = AgentConfig {
            cores: Some(4),
            memory: Some(8 << 30),
            denied_projects: vec!["beta".into()],
            ..AgentConfig::default()
        };
        let caps3 = capabilities(&offered, None, &machine());
        assert_eq!((caps3.cores, caps3.memory_bytes), (4, 8 << 30));
        assert_eq!(caps3.denied_projects, ["beta"]);
        let greedy = AgentConfig {
            cores: Some(64),
            memory: Some(1 << 40),
            ..AgentConfig::default()
        };
        let caps4 = capabilities(&greedy, None, &machine());
        assert_eq!((caps4.cores, caps4.memory_bytes), (8, 16 << 30));
        let named = AgentConfig {
            name: Some("cfg-name".into()),
            ..AgentConfig::default()
        };
        let caps2 = capabilities(&named, Some("host-a"), &machine());
        assert_eq!(caps2.name, "cfg-name");
        assert_eq!(caps2.max_job_timeout_secs, 0);
        assert_eq!(caps2.output_cap_bytes, 4 * 1024 * 1024);

        let j = |job_id, attempt| JobRef { job_id, attempt };
        let held = held_jobs(
            [j(5, 1), j(2, 1)].into_iter(),
            [j(9, 2), j(5, 1)].into_iter(),
        );
        assert_eq!(held, [j(2, 1), j(5, 1), j(9, 2)]);
        let h = hello(&caps, held.clone(), true, None);
        assert_eq!(h.protocol_version, PROTOCOL_VERSION);
        assert_eq!(h.agent_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(h.capabilities.as_ref(), Some(&caps));
        assert_eq!(h.running, held);
        assert!(h.draining);
    }

    #[test]
    fn refusals_are_fatal_other_errors_are_retried() {
        let refused = LinkError::Status(Status::permission_denied("agent ag_1 was revoked"));
        assert_eq!(
            refused.fatal(),
            Some(Ending::Refused("agent ag_1 was revoked".into()))
        );
        assert!(matches!(
            LinkError::Status(Status::unauthenticated("bad")).fatal(),
            Some(Ending::Refused(_))
        ));
        assert_eq!(
            LinkError::Status(Status::failed_precondition("upgrade trunkfarm-agent")).fatal(),
            Some(Ending::Incompatible("upgrade trunkfarm-agent".into()))
        );
        for retry in [
            LinkError::Status(Status::unavailable("down")),
            LinkError::Status(Status::internal("oops")),
            LinkError::Timeout,
            LinkError::Closed,
        ] {
            assert_eq!(retry.fatal(), None, "{retry}");
            assert!(!retry.needs_operator());
        }
        let pin = LinkError::Dial(DialError::Tls {
            addr: "h:1".into(),
            message: "not signed by the pinned CA".into(),
        });
        assert!(pin.needs_operator());
        assert_eq!(pin.fatal(), None);
        let reset = LinkError::Dial(DialError::Tls {
            addr: "h:1".into(),
            message: "Connection reset by peer (os error 104)".into(),
        });
        assert!(!reset.needs_operator());
    }
}
