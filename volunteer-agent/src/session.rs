//! `trunkfarm-agent run`: the agent's life, from the first dial to the drain.
//!
//! One task owns everything (no locks). For each hub it serves ([`Hub`]):
//! its running jobs ([`Jobs`]), the results it has not acknowledged
//! ([`ResultStore`]), the messages not yet sent to it ([`Outbox`]) and its
//! connection ([`Link`]); agent-wide: the donor's pause, the drain, the
//! control socket and, with several hubs, how the slots are divided among
//! them ([`Slots`], stride scheduling: each hub is offered slots with
//! `Slots` while it has work, told by its `Backlog`). Jobs outlive
//! connections, so a connection only forwards: when it breaks, the agent
//! keeps running its jobs, keeps their logs and results, and redials with
//! backoff; after the next welcome it sends again whatever the hub may have
//! missed: every log chunk and result of an attempt whose result the hub has
//! not acknowledged (see `outbox.rs`).
//! A single `select!` loop waits on every hub's connection and jobs (taking
//! turns), the signals and the drain timers, and never blocks on any one of
//! them: a hub that is down or slow holds up nothing of another's.

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
    JobResult, JobStarted, Outcome, Paused, ResultAck, Slots as SlotsMsg, Welcome,
};
use trunkfarm_proto::{AUTHORIZATION, PROTOCOL_VERSION};

use trunkfarm_proto::settings::fmt_bytes;

use crate::backoff::Backoff;
use crate::cache::ArtifactCache;
use crate::config::AgentConfig;
use crate::control::{self, Answer, Control, HubStatus, Request, Status as AgentStatus};
use crate::donor::{self, JobInfo, Pause, say};
use crate::executor::Artifacts;
use crate::hubs::EnrolledHub;
use crate::jobs::{self, JobPolicy, JobWake, Jobs};
use crate::limits::Gate;
use crate::outbox::{Outbox, kept_log_bound};
use crate::results::{JobKey, ResultStore, key};
use crate::sandbox::Sandbox;
use crate::slots::{Demand, Slots};
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

/// How long a hub serving beside others may leave the slots offered to it
/// unfilled before they go to the other hubs (it is slow or stuck: it said
/// it has work but sends none).
const OFFER_WAIT: Duration = Duration::from_secs(15);

/// How long such a hub is then offered no slot.
const SLOW_PAUSE: Duration = Duration::from_secs(30);

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

/// Runs the agent until it is drained or every hub refused it for good.
pub(crate) async fn run(
    state_dir: PathBuf,
    enrolled: Vec<EnrolledHub>,
    config: AgentConfig,
    sandbox: Sandbox,
) -> anyhow::Result<Ending> {
    let cache_dir = config.cache.dir_or_default(&state_dir);
    let cache = ArtifactCache::open(cache_dir.clone(), config.cache.size).with_context(|| {
        format!(
            "cannot open the artifact cache in {} (set [cache] dir in agent.toml to use another \
             directory)",
            cache_dir.display()
        )
    })?;
    let refuse_all = sandbox.refusal();
    let sandbox_name = sandbox.name().to_owned();
    let sandbox = Arc::new(sandbox);
    let machine = sysinfo::detect();
    // The donor's schedule and only_when_idle (`limits.rs`), the machine's:
    // every hub is told them in words.
    let mut limit_words = Capabilities::default();
    let limits = crate::limits::start(&config, machine.cores, &mut limit_words)
        .map_err(anyhow::Error::msg)?;
    let work_root = config.work_root(&state_dir);
    for name in config.hubs.keys() {
        if !enrolled.iter().any(|h| &h.name == name) {
            tracing::warn!(
                "agent.toml has [hubs.{name}] but no hub of that name is enrolled (enrolled: {}); \
                 it is not used",
                enrolled
                    .iter()
                    .map(|h| h.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    let several = enrolled.len() > 1;
    let mut hubs = Vec::new();
    for hub in enrolled {
        let results_dir = hub.dir.join("results");
        let mut results = ResultStore::open(results_dir.clone()).with_context(|| {
            format!(
                "cannot open the results directory {}",
                results_dir.display()
            )
        })?;
        let terms = config.hub_terms(&hub.name);
        let mut policy = JobPolicy::from_config(&config, &state_dir);
        policy.refuse_all = refuse_all;
        policy.max_parallel = terms.max_parallel_jobs;
        policy.allowed_projects = terms.allowed_projects.clone();
        policy.denied_projects = terms.denied_projects.clone();
        policy.max_job_timeout = terms.max_job_timeout;
        policy.work_root = hub.work_root(&state_dir, &work_root);
        let credential = &hub.credential;
        let fallback_name = credential.name.clone().or_else(crate::enroll::hostname);
        let hub_config = AgentConfig {
            max_parallel_jobs: terms.max_parallel_jobs,
            allowed_projects: terms.allowed_projects,
            denied_projects: terms.denied_projects,
            max_job_timeout: terms.max_job_timeout,
            ..config.clone()
        };
        let mut caps = capabilities(&hub_config, fallback_name.as_deref(), &machine);
        caps.sandbox = sandbox_name.clone();
        caps.schedule = limit_words.schedule.clone();
        caps.only_when_idle = limit_words.only_when_idle.clone();
        let bearer = credential.bearer()?;
        let artifacts = Artifacts {
            cache: cache.clone(),
            hub: Arc::new(GrpcHub::new(
                &credential.hub,
                &credential.trust(),
                bearer.clone(),
            )),
            max_unpacked_bytes: config.cache.max_unpacked_size,
            sandbox: sandbox.clone(),
        };
        if !results.is_empty() {
            tracing::info!(
                hub = %credential.hub,
                "{} job result(s) from an earlier run wait for delivery to the hub",
                results.len()
            );
        }
        tracing::info!(
            hub = %credential.hub,
            hub_name = %hub.name,
            agent = %credential.agent_id,
            name = %caps.name,
            labels = ?caps.labels,
            max_parallel_jobs = caps.max_parallel_jobs,
            share = terms.share,
            work_dir = %policy.work_root.display(),
            "serving hub"
        );
        // Logs saved with unacknowledged results go again with them.
        let mut outbox = Outbox::new(kept_log_bound(config.output_cap));
        outbox.restore(results.take_logs());
        hubs.push(Hub {
            name: hub.name.clone(),
            address: credential.hub.clone(),
            agent_id: credential.agent_id.clone(),
            trust: credential.trust(),
            bearer,
            caps,
            share: terms.share,
            jobs: Jobs::new(policy.work_root.clone(), artifacts),
            policy,
            results,
            result_sent: HashMap::new(),
            outbox,
            link: Link::Down {
                retry_at: Instant::now(),
            },
            backoff: Backoff::new(config.reconnect_max_backoff),
            connected_since_ms: None,
            handing_back: BTreeSet::new(),
            running: HashMap::new(),
            backlog: 0,
            granted: 0,
            offered_told: None,
            hello_paused: None,
            own_terms: config.hubs.contains_key(&hub.name),
            leaving: None,
            ended: None,
            drained: false,
            offered_since: None,
            slow_until: None,
            label: if several {
                hub.name.clone()
            } else {
                String::new()
            },
        });
    }
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
    tracing::info!(
        hubs = hubs.len(),
        max_parallel_jobs = config.max_parallel_jobs,
        sandbox = %sandbox_name,
        cache_dir = %cache.dir().display(),
        cache_size = %fmt_bytes(config.cache.size),
        cached = %fmt_bytes(cache.cached_bytes()),
        "starting trunkfarm-agent {}",
        env!("CARGO_PKG_VERSION")
    );
    let shares: Vec<u32> = hubs.iter().map(|h| h.share).collect();
    let mut agent = Agent {
        slots: several.then(|| Slots::new(config.max_parallel_jobs, &shares)),
        hubs,
        max_parallel: config.max_parallel_jobs,
        drain_grace: config.drain_grace,
        drain: Drain::default(),
        signals,
        control,
        pause_ends: pause.as_ref().and_then(|p| p.until_ms).map(instant_at),
        pause,
        limits,
        state_dir,
        started_ms: crate::lock::now_ms(),
        cache: cache.clone(),
        turn: 0,
        first_ending: None,
    };
    let ending = agent.run().await;
    if let Some(server) = server {
        server.close().await;
    }
    let downloads = cache.downloads();
    if downloads > 0 {
        tracing::info!(
            "downloaded {downloads} runtime artifact(s) since the agent started; {} cached in {}",
            fmt_bytes(cache.cached_bytes()),
            cache.dir().display()
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
/// `paused` why it takes no new job (its donor's pause or limits); `slots`,
/// what an agent serving several hubs offers this one.
pub(crate) fn hello(
    caps: &Capabilities,
    held: Vec<JobRef>,
    draining: bool,
    paused: Option<Paused>,
    slots: Option<u32>,
) -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        capabilities: Some(caps.clone()),
        running: held,
        draining,
        paused,
        slots: slots.map(|offered| SlotsMsg { offered }),
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

/// The longest pause between two dials while this agent holds the hub's
/// jobs or undelivered results: a restarted hub keeps their leases only for
/// its `dispatch.lease_timeout` (a minute by default) from its start,
/// waiting for their agents to say they still hold them.
const HOLDING_MAX_REDIAL: Duration = Duration::from_secs(10);

/// The pause before dialling again: the backoff's draw, at most
/// [`HOLDING_MAX_REDIAL`] while `holding` jobs or results of this hub.
fn redial_pause(drawn: Duration, holding: bool) -> Duration {
    if holding {
        drawn.min(HOLDING_MAX_REDIAL)
    } else {
        drawn
    }
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
    /// The hub refused this agent for good: never dialled again.
    Closed,
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
            Link::Closed => std::future::pending().await,
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
    /// Hub `.0`'s link or jobs (boxed: a log chunk or a result is large).
    Hub(usize, Box<HubWake>),
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
    /// A hub being left (`unenroll --hub`) waited long enough for its
    /// acknowledgements.
    LeaveOver,
    /// A hub left its offered slots unfilled too long, or its time out
    /// for that ended.
    OfferCheck,
}

/// What one hub's link or jobs have to say.
enum HubWake {
    /// The link.
    Link(LinkWake),
    /// One of its jobs.
    Job(JobWake),
}

/// One hub the agent serves: its own connection, jobs, results and
/// outbox. A hub that is down or slow holds up nothing of another's.
struct Hub {
    /// Its name on this machine (`hubs.rs`).
    name: String,
    /// Its address.
    address: String,
    /// This agent's id there.
    agent_id: String,
    /// How to trust it.
    trust: HubTrust,
    /// The `authorization` value (sensitive).
    bearer: MetadataValue<Ascii>,
    /// What the hello advertises to it (its limits).
    caps: Capabilities,
    /// Its share of the slots (`[hubs.NAME] share`).
    share: u32,
    /// What jobs of its are accepted and how they run.
    policy: JobPolicy,
    /// Its running jobs.
    jobs: Jobs,
    /// Its results not yet acknowledged.
    results: ResultStore,
    /// When each unacknowledged result was last queued on this session.
    result_sent: HashMap<JobKey, Instant>,
    /// Messages not yet sent to it.
    outbox: Outbox,
    /// The connection.
    link: Link,
    /// Redial pacing.
    backoff: Backoff,
    /// When the current session was welcomed (Unix ms).
    connected_since_ms: Option<u64>,
    /// Jobs cancelled to be handed back (`pause --now`, `unenroll`): their
    /// cancelled results go to the hub as handed back.
    handing_back: BTreeSet<JobKey>,
    /// What each running job is, for the donor.
    running: HashMap<JobKey, JobInfo>,
    /// Queued jobs it has for this agent (its last `Backlog`; 0 while down).
    backlog: u32,
    /// The jobs it lets this agent hold at once (its `Backlog`'s
    /// `max_jobs`; 0: not said).
    granted: u32,
    /// The slots it was last offered (`Slots` or the hello's), this session.
    offered_told: Option<u32>,
    /// It has its own `[hubs.NAME]` terms in agent.toml.
    own_terms: bool,
    /// What the last hello said of the pause: a change before the welcome
    /// is sent once welcomed.
    hello_paused: Option<Paused>,
    /// Being left (`unenroll --hub`): no new job; it goes once its jobs are
    /// done and its results acknowledged, or at this deadline once no job
    /// runs.
    leaving: Option<Option<Instant>>,
    /// The hub refused this agent for good: it is not dialled again.
    ended: Option<Ending>,
    /// The hub asked this agent to drain while it serves others too: none
    /// of its jobs is taken any more (`hub_drains`).
    drained: bool,
    /// Its name in the donor's lines when the agent serves several hubs.
    label: String,
    /// Since when slots offered to it wait unfilled (several hubs).
    offered_since: Option<Instant>,
    /// It left offered slots unfilled for [`OFFER_WAIT`]: offered none
    /// until then.
    slow_until: Option<Instant>,
}

/// The agent: all its state, owned by one task.
struct Agent {
    /// The hubs it serves, in `hubs::list` order.
    hubs: Vec<Hub>,
    /// How the slots are divided among several hubs; `None` with one hub
    /// (it gets every slot, as its capabilities say).
    slots: Option<Slots>,
    /// The machine's slots (`max_parallel_jobs`).
    max_parallel: u32,
    /// Grace period of a signal-initiated drain.
    drain_grace: Duration,
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
    /// The state directory (the journal, the pause).
    state_dir: PathBuf,
    /// When this agent started (Unix ms).
    started_ms: u64,
    /// The artifact cache, for `status`.
    cache: ArtifactCache,
    /// Which hub's events are looked at first (turns, so a busy hub cannot
    /// starve another's).
    turn: usize,
    /// The first hub's refusal, reported once every hub refused.
    first_ending: Option<Ending>,
}

/// The next event of any hub, looking at `hubs[turn]` first. Cancel-safe
/// (each hub's wait is).
async fn next_hub(hubs: &mut [Hub], turn: usize) -> (usize, HubWake) {
    let n = hubs.len();
    if n == 0 {
        return std::future::pending().await;
    }
    let mut waits: Vec<Pin<Box<dyn Future<Output = HubWake> + '_>>> = hubs
        .iter_mut()
        .map(|h| Box::pin(h.next()) as Pin<Box<dyn Future<Output = HubWake> + '_>>)
        .collect();
    std::future::poll_fn(|cx| {
        for k in 0..n {
            let i = (turn % n + k) % n;
            if let std::task::Poll::Ready(w) = waits[i].as_mut().poll(cx) {
                return std::task::Poll::Ready((i, w));
            }
        }
        std::task::Poll::Pending
    })
    .await
}

impl Hub {
    /// Its link's or jobs' next event. Cancel-safe.
    async fn next(&mut self) -> HubWake {
        let welcomed = self.link.welcomed();
        // Back-pressure while the network is the bottleneck; buffer (with
        // a cap) while disconnected, so jobs are never held up by it.
        let accept = !(welcomed && self.outbox.log_bytes() >= SEND_HIGH_WATER);
        let want_send = !self.outbox.is_empty();
        tokio::select! {
            w = self.link.next(want_send) => HubWake::Link(w),
            w = self.jobs.next(accept) => HubWake::Job(w),
        }
    }

    /// The jobs whose leases this agent holds here: running or unacknowledged.
    fn held(&self) -> Vec<JobRef> {
        held_jobs(self.jobs.jobs(), self.results.jobs())
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

    /// Reports that this agent will not run `job`.
    fn refuse(&mut self, job: JobRef, detail: String) {
        tracing::info!(
            hub = %self.address,
            job = job.job_id,
            attempt = job.attempt,
            "refusing job: {detail}"
        );
        self.deliver(jobs::refusal(job, detail));
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

    /// Starts dialing, with a hello describing the agent as it is now;
    /// `slots`: what it offers this hub (an agent serving several).
    fn start_connect(&mut self, draining: bool, paused: Option<Paused>, slots: Option<u32>) {
        let (tx, rx) = mpsc::channel(OUTBOUND_CHANNEL);
        self.hello_paused = paused.clone();
        let hello = hello(&self.caps, self.held(), draining, paused, slots);
        self.offered_told = slots;
        // A fresh channel has room for its first message.
        let _ = tx.try_send(AgentMessage {
            msg: Some(Msg::Hello(hello)),
        });
        tracing::debug!(hub = %self.address, "connecting");
        self.link = Link::Connecting {
            tx,
            future: connect(
                self.address.clone(),
                self.trust.clone(),
                self.bearer.clone(),
                rx,
            ),
            deadline: Instant::now() + WELCOME_TIMEOUT,
        };
    }

    /// The connection failed or ended: the ending if the hub refused us
    /// for good, otherwise a redial is scheduled.
    fn link_failed(&mut self, error: LinkError) -> Option<Ending> {
        let was_welcomed = self.link.welcomed();
        self.outbox.disconnected();
        self.result_sent.clear();
        self.connected_since_ms = None;
        // A hub that is down has no work for anyone.
        self.backlog = 0;
        self.offered_told = None;
        let holding = !self.jobs.is_empty() || !self.results.is_empty();
        let delay = redial_pause(self.backoff.next_delay(), holding);
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
            tracing::error!(hub = %self.address, "{what}: {error}; retrying in {delay}");
        } else {
            tracing::warn!(hub = %self.address, "{what}: {error}; retrying in {delay}");
        }
        None
    }

    /// The hub welcomed us: the session is usable; send what it missed.
    fn welcomed(&mut self, welcome: Welcome, draining: bool, paused: Option<Paused>) {
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
            self.address,
            self.agent_id
        );
        self.connected_since_ms = Some(crate::lock::now_ms());
        say(&format!(
            "Connected to hub {} as agent {}{}.",
            self.address,
            self.agent_id,
            if paused.is_some() {
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
        if draining || self.drained || self.leaving.is_some() {
            self.outbox.push_control(Msg::Draining(Draining {}));
        }
        // Paused or resumed (by the donor or the limits) while dialling:
        // the hello said otherwise.
        if paused != self.hello_paused {
            self.outbox
                .push_control(Msg::Paused(paused.clone().unwrap_or_default()));
            self.hello_paused = paused;
        }
    }

    /// Its line in `status`.
    fn status(&self) -> HubStatus {
        HubStatus {
            name: self.name.clone(),
            hub: self.address.clone(),
            agent_id: self.agent_id.clone(),
            share: self.share,
            connected: self.link.welcomed(),
            connected_since_ms: self.connected_since_ms,
            running: self.jobs.len(),
            offered: self.offered_told,
            // Only an agent serving several hubs hears of their backlogs.
            backlog: self.offered_told.map(|_| self.backlog),
            undelivered_results: self.results.len(),
            leaving: self.leaving.is_some(),
            draining: self.drained,
            refused: self.ended.as_ref().map(|e| match e {
                Ending::Refused(m) | Ending::Incompatible(m) => m.clone(),
                Ending::Drained => String::new(),
            }),
        }
    }
}

impl Agent {
    /// The main loop.
    async fn run(&mut self) -> Ending {
        loop {
            if let Some(ending) = self.check_drained() {
                return ending;
            }
            self.retire_left_hubs();
            if self.hubs.is_empty() {
                return Ending::Drained;
            }
            if self.hubs.iter().all(|h| h.ended.is_some()) {
                for hub in &mut self.hubs {
                    hub.jobs
                        .abandon("cancelled: the hub refused this agent", ABANDON_WAIT)
                        .await;
                }
                return self.first_ending.clone().unwrap_or(Ending::Drained);
            }
            self.divide_slots();
            let turn = self.turn;
            self.turn = self.turn.wrapping_add(1);
            let leave_over = self.leave_deadline();
            let offer_check = self.offer_deadline();
            let wake = tokio::select! {
                (i, w) = next_hub(&mut self.hubs, turn) => Wake::Hub(i, Box::new(w)),
                s = self.signals.next() => Wake::Signal(s),
                () = sleep_opt(self.drain.grace_deadline) => Wake::GraceOver,
                () = sleep_opt(self.drain.ack_deadline) => Wake::AckWaitOver,
                Some(c) = self.control.recv() => Wake::Control(c),
                () = sleep_opt(self.pause_ends) => Wake::PauseOver,
                () = sleep_opt(self.limits.due()) => Wake::Limits,
                () = sleep_opt(leave_over) => Wake::LeaveOver,
                () = sleep_opt(offer_check) => Wake::OfferCheck,
            };
            let ending = match wake {
                Wake::Hub(i, w) => self.on_hub(i, *w),
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
                    if self.limits.check(self.running_jobs()) {
                        self.limits_changed();
                    }
                    None
                }
                Wake::Signal(name) => self.on_signal(name),
                Wake::GraceOver => {
                    self.drain.grace_deadline = None;
                    let running = self.running_jobs();
                    if running > 0 {
                        tracing::info!(
                            "the drain's grace period is over: cancelling {running} running job(s)"
                        );
                    }
                    for hub in &mut self.hubs {
                        hub.jobs.cancel_all(
                            "cancelled: the agent was draining and the job outlived the grace \
                             period",
                        );
                    }
                    None
                }
                Wake::AckWaitOver => {
                    for hub in self.hubs.iter().filter(|h| !h.results.is_empty()) {
                        tracing::warn!(
                            hub = %hub.address,
                            "the hub did not acknowledge {} result(s) within {}s; they are kept \
                             in {} and delivered on the next start",
                            hub.results.len(),
                            ACK_WAIT.as_secs(),
                            hub.results.dir().display()
                        );
                    }
                    Some(Ending::Drained)
                }
                Wake::OfferCheck => {
                    self.check_offers();
                    None
                }
                Wake::LeaveOver => {
                    for hub in &mut self.hubs {
                        if let Some(Some(at)) = hub.leaving
                            && at <= Instant::now()
                        {
                            tracing::warn!(
                                hub = %hub.address,
                                "the hub did not acknowledge {} result(s) within {}s; leaving it \
                                 anyway",
                                hub.results.len(),
                                ACK_WAIT.as_secs()
                            );
                            hub.leaving = Some(None);
                            hub.ended = Some(Ending::Drained);
                        }
                    }
                    None
                }
            };
            if let Some(ending) = ending {
                if ending != Ending::Drained {
                    for hub in &mut self.hubs {
                        hub.jobs
                            .abandon("cancelled: the hub refused this agent", ABANDON_WAIT)
                            .await;
                    }
                }
                return ending;
            }
        }
    }

    /// Handles hub `i`'s link or job event; `Some` ends the agent.
    fn on_hub(&mut self, i: usize, wake: HubWake) -> Option<Ending> {
        match wake {
            HubWake::Link(w) => self.on_link(i, w),
            HubWake::Job(JobWake::Log(chunk)) => {
                let hub = &mut self.hubs[i];
                let job = chunk.job.unwrap_or_default();
                if hub.outbox.push_log(chunk) {
                    tracing::warn!(
                        job = job.job_id,
                        attempt = job.attempt,
                        "the job's log passed the agent's output cap (output_cap {}): dropping \
                         the rest of it",
                        fmt_bytes(hub.policy.output_cap)
                    );
                }
                None
            }
            HubWake::Job(JobWake::Finished(result)) => {
                self.finished(i, result);
                None
            }
        }
    }

    /// Jobs running here, for every hub.
    fn running_jobs(&self) -> usize {
        self.hubs.iter().map(|h| h.jobs.len()).sum()
    }

    /// Ends a drain once no job runs and every result is acknowledged (or
    /// starts the bounded wait for the acknowledgements).
    fn check_drained(&mut self) -> Option<Ending> {
        if !self.drain.active || self.running_jobs() > 0 {
            return None;
        }
        let undelivered: usize = self
            .hubs
            .iter()
            .filter(|h| h.ended.is_none())
            .map(|h| h.results.len())
            .sum();
        if undelivered == 0 {
            tracing::info!("drained: no job is running and every result was delivered");
            return Some(Ending::Drained);
        }
        if self.drain.ack_deadline.is_none() {
            tracing::info!(
                "waiting up to {}s for the hub to acknowledge {undelivered} result(s)",
                ACK_WAIT.as_secs()
            );
            self.drain.ack_deadline = Some(Instant::now() + ACK_WAIT);
        }
        None
    }

    /// When the next hub's unfilled offer times out, or a slow hub's
    /// pause ends (several hubs).
    fn offer_deadline(&self) -> Option<Instant> {
        self.hubs
            .iter()
            .filter_map(|h| h.slow_until.or(h.offered_since.map(|t| t + OFFER_WAIT)))
            .min()
    }

    /// A hub that leaves its offered slots unfilled for [`OFFER_WAIT`] is
    /// slow or stuck: its slots go to the others for [`SLOW_PAUSE`], so it
    /// never holds them up. Once that is over it is offered slots again.
    fn check_offers(&mut self) {
        let now = Instant::now();
        for hub in &mut self.hubs {
            if hub.slow_until.is_some_and(|t| t <= now) {
                hub.slow_until = None;
            }
            if hub.offered_since.is_some_and(|t| t + OFFER_WAIT <= now) {
                hub.offered_since = None;
                hub.slow_until = Some(now + SLOW_PAUSE);
                tracing::warn!(
                    hub = %hub.address,
                    "the hub said it has work for this agent but filled none of the slots \
                     offered to it within {}s: they go to the other hubs for {}s",
                    OFFER_WAIT.as_secs(),
                    SLOW_PAUSE.as_secs()
                );
            }
        }
    }

    /// The earliest deadline of a hub being left once its jobs are done.
    fn leave_deadline(&self) -> Option<Instant> {
        self.hubs.iter().filter_map(|h| h.leaving.flatten()).min()
    }

    /// Drops the hubs being left (`unenroll --hub`) once nothing of theirs
    /// runs and their results are acknowledged (or waited for long enough):
    /// `status` stops listing them, which the command waits for.
    fn retire_left_hubs(&mut self) {
        let mut i = 0;
        while i < self.hubs.len() {
            let hub = &mut self.hubs[i];
            if hub.leaving.is_some() && hub.jobs.is_empty() {
                if hub.results.is_empty() || hub.ended.is_some() {
                    say(&format!(
                        "Left hub {} ({}): it gets no more work from this agent.",
                        hub.name, hub.address
                    ));
                    self.hubs.remove(i);
                    if let Some(slots) = &mut self.slots {
                        slots.remove(i);
                    }
                    continue;
                }
                if hub.leaving == Some(None) {
                    hub.leaving = Some(Some(Instant::now() + ACK_WAIT));
                }
            }
            i += 1;
        }
    }

    /// With several hubs: divides the free slots again and tells each hub
    /// what it may fill now (`Slots`), when that changed.
    fn divide_slots(&mut self) {
        let takes_work = self.paused_now().is_none() && !self.drain.active;
        let Some(slots) = &mut self.slots else {
            return;
        };
        let demand: Vec<Demand> = self
            .hubs
            .iter()
            .map(|h| Demand {
                running: h.jobs.len() as u32,
                backlog: h.backlog,
                // Its own cap, and the hub's on what it gives this agent.
                cap: match h.granted {
                    0 => h.policy.max_parallel,
                    granted => h.policy.max_parallel.min(granted),
                },
                open: takes_work
                    && h.link.welcomed()
                    && h.leaving.is_none()
                    && h.ended.is_none()
                    && !h.drained
                    && h.slow_until.is_none(),
            })
            .collect();
        slots.divide(&demand);
        for (i, hub) in self.hubs.iter_mut().enumerate() {
            if slots.outstanding(i) == 0 {
                hub.offered_since = None;
            } else if hub.offered_since.is_none() {
                hub.offered_since = Some(Instant::now());
            }
            if !hub.link.welcomed() {
                continue;
            }
            let offered = slots.offered(i, hub.jobs.len() as u32);
            if hub.offered_told != Some(offered) {
                hub.offered_told = Some(offered);
                hub.outbox.push_slots(SlotsMsg { offered });
            }
        }
    }

    /// What the hello offers hub `i`: its running jobs (more once it says
    /// it has work), with several hubs; `None` with one.
    fn hello_slots(&self, i: usize) -> Option<u32> {
        self.slots
            .as_ref()
            .map(|s| s.offered(i, self.hubs[i].jobs.len() as u32))
    }

    /// Handles hub `i`'s link event; `Some` ends the agent.
    fn on_link(&mut self, i: usize, wake: LinkWake) -> Option<Ending> {
        match wake {
            LinkWake::RetryDue => {
                let slots = self.hello_slots(i);
                let paused = self.paused_now();
                let hub = &mut self.hubs[i];
                let draining = self.drain.active || hub.drained || hub.leaving.is_some();
                hub.start_connect(draining, paused, slots);
                None
            }
            LinkWake::Connected(Ok((inbound, channel))) => {
                let hub = &mut self.hubs[i];
                let old = std::mem::replace(
                    &mut hub.link,
                    Link::Down {
                        retry_at: Instant::now(),
                    },
                );
                if let Link::Connecting { tx, deadline, .. } = old {
                    hub.link = Link::Up(Box::new(Session {
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
            LinkWake::Connected(Err(e)) => self.link_failed(i, e),
            LinkWake::WelcomeOverdue => self.link_failed(i, LinkError::Timeout),
            LinkWake::Inbound(Ok(Some(message))) => self.on_message(i, message),
            LinkWake::Inbound(Ok(None)) => self.link_failed(i, LinkError::Closed),
            LinkWake::Inbound(Err(status)) => self.link_failed(i, LinkError::Status(status)),
            LinkWake::HeartbeatDue => {
                let hub = &mut self.hubs[i];
                hub.outbox.push_heartbeat(Heartbeat {
                    running: hub.held(),
                });
                hub.resend_stale_results();
                None
            }
            LinkWake::Permit(Ok(permit)) => {
                if let Some(message) = self.hubs[i].outbox.pop() {
                    permit.send(message);
                }
                None
            }
            LinkWake::Permit(Err(_)) => {
                if let Link::Up(s) = &mut self.hubs[i].link {
                    s.tx_closed = true;
                }
                None
            }
        }
    }

    /// Hub `i`'s connection failed or ended. A refusal ends the agent when
    /// it serves that hub alone; with several, only that hub is given up
    /// (its jobs cancelled), and the agent ends once every hub refused it.
    fn link_failed(&mut self, i: usize, error: LinkError) -> Option<Ending> {
        let ending = self.hubs[i].link_failed(error)?;
        if self.hubs.len() == 1 {
            return Some(ending);
        }
        let hub = &mut self.hubs[i];
        let message = match &ending {
            Ending::Refused(m) => format!("the hub refused this agent: {m}"),
            Ending::Incompatible(m) => {
                format!("the hub refused this agent's protocol version: {m}")
            }
            Ending::Drained => String::new(),
        };
        tracing::error!(
            hub = %hub.address,
            "{message}; this agent goes on with its other hubs (`trunkfarm-agent unenroll --hub {}` \
             removes this one)",
            hub.name
        );
        hub.jobs.cancel_all("cancelled: the hub refused this agent");
        hub.link = Link::Closed;
        hub.ended = Some(ending.clone());
        // Once every hub refused, the loop ends the agent with the first refusal.
        self.first_ending.get_or_insert(ending);
        None
    }

    /// Handles a message from hub `i`.
    fn on_message(&mut self, i: usize, message: HubMessage) -> Option<Ending> {
        let Some(msg) = message.msg else {
            tracing::debug!("ignoring an empty message from the hub");
            return None;
        };
        if !self.hubs[i].link.welcomed() {
            return match msg {
                HubMsg::Welcome(welcome) => {
                    if self.slots.is_some() && !welcome.shares_slots {
                        // It would assign past this agent's slots, and every
                        // job would come straight back.
                        let name = self.hubs[i].name.clone();
                        return self.link_failed(
                            i,
                            LinkError::Status(Status::failed_precondition(format!(
                                "hub {name} is too old to share this agent with other hubs (it \
                                 does not take the agent's slot offers): ask its operator to \
                                 upgrade trunkfarm, or leave it with `trunkfarm-agent unenroll \
                                 --hub {name}`"
                            ))),
                        );
                    }
                    let (draining, paused) = (self.drain.active, self.paused_now());
                    self.hubs[i].welcomed(welcome, draining, paused);
                    None
                }
                _ => self.link_failed(
                    i,
                    LinkError::Protocol("the hub sent a message before its welcome".to_owned()),
                ),
            };
        }
        match msg {
            HubMsg::Welcome(_) => tracing::warn!("ignoring a second welcome from the hub"),
            HubMsg::Assign(assignment) => self.assign(i, assignment),
            HubMsg::Cancel(cancel) => self.hubs[i].cancel(cancel),
            HubMsg::Drain(drain) => self.hub_drains(i, Duration::from_secs(drain.grace_secs)),
            HubMsg::ResultAck(ack) => self.hubs[i].acknowledged(ack),
            HubMsg::Notice(notice) => donor::hub_notice(
                &self.hubs[i].name,
                self.slots.is_some(),
                self.hubs[i].own_terms,
                &notice.text,
            ),
            HubMsg::Backlog(backlog) => {
                let hub = &mut self.hubs[i];
                hub.backlog = backlog.jobs;
                hub.granted = backlog.max_jobs;
            }
        }
        None
    }

    /// Hub `i` asks this agent to drain (its operator's `agent drain`, a
    /// pool's budget). Serving that hub alone, the agent drains and exits,
    /// as always; serving several, it takes no more of that hub's work and
    /// goes on with the others, draining once every hub asked.
    fn hub_drains(&mut self, i: usize, grace: Duration) {
        if self.hubs.len() == 1 {
            self.start_drain(grace, "the hub asked this agent to drain");
            return;
        }
        let hub = &mut self.hubs[i];
        if !hub.drained {
            hub.drained = true;
            say(&format!(
                "Hub {} asked this agent to drain: it takes no more of that hub's jobs (its \
                 running ones finish) and goes on with its other hubs.",
                hub.name
            ));
            hub.outbox.push_control(Msg::Draining(Draining {}));
        }
        if self
            .hubs
            .iter()
            .all(|h| h.drained || h.ended.is_some() || h.leaving.is_some())
        {
            self.start_drain(grace, "every hub asked this agent to drain");
        }
    }

    /// Runs (or refuses, or hands back) a job hub `i` assigned.
    fn assign(&mut self, i: usize, assignment: Assignment) {
        let running_here = self.running_jobs();
        let paused_now = self.paused_now();
        let hub = &mut self.hubs[i];
        let Some(job) = assignment.job else {
            tracing::warn!("ignoring an assignment without a job reference");
            return;
        };
        if hub.jobs.contains(&job) || hub.results.contains(&job) {
            tracing::debug!(
                job = job.job_id,
                attempt = job.attempt,
                "ignoring a repeated assignment"
            );
            return;
        }
        let Some(spec) = assignment.spec else {
            hub.refuse(job, "the assignment carried no job spec".to_owned());
            return;
        };
        let given_back = if let Some(paused) = &paused_now {
            // Sent before the hub heard of the pause: it runs elsewhere.
            Some(format!("the agent is {}", paused.reason))
        } else if hub.leaving.is_some() {
            Some("the agent's donor leaves this hub".to_owned())
        } else if self.slots.is_some() && running_here >= self.max_parallel as usize {
            // Assigned across a withdrawn offer: the slot went to another hub.
            Some("the agent's slots are taken by its other hubs".to_owned())
        } else {
            None
        };
        if let Some(why) = given_back {
            tracing::info!(
                job = job.job_id,
                attempt = job.attempt,
                "handing back a job: {why}"
            );
            hub.deliver(handed_back(jobs::refusal(job, String::new()), &why));
            return;
        }
        match hub
            .policy
            .admit(&spec, hub.jobs.len(), self.drain.active || hub.drained)
        {
            Ok((limits, donor_capped)) => {
                tracing::info!(
                    hub = %hub.address,
                    job = job.job_id,
                    attempt = job.attempt,
                    project = %spec.project,
                    commands = spec.commands.len(),
                    "starting job"
                );
                let mut info = JobInfo::starting(job, &spec);
                info.hub = hub.label.clone();
                say(&info.started_line());
                hub.running.insert(key(&job), info);
                hub.jobs.start(job, spec, limits, donor_capped);
                hub.outbox
                    .push_control(Msg::Started(JobStarted { job: Some(job) }));
                if let Some(slots) = &mut self.slots {
                    slots.started(i);
                    // It fills its offers: the wait for the rest starts again.
                    hub.offered_since = None;
                }
            }
            Err(detail) => hub.refuse(job, detail),
        }
    }

    /// A job of hub `i` ended: a job being handed back goes back as such
    /// (unless it finished first), the donor is told, the journal keeps it,
    /// and the result goes to the hub.
    fn finished(&mut self, i: usize, mut result: JobResult) {
        let hub = &mut self.hubs[i];
        let job = result.job.unwrap_or_default();
        if hub.handing_back.remove(&key(&job)) && result.outcome == Outcome::Cancelled as i32 {
            result = handed_back(result, "the agent's donor took it back");
        }
        let mut info = hub.running.remove(&key(&job)).unwrap_or_else(|| JobInfo {
            job_id: job.job_id,
            attempt: job.attempt,
            hub: hub.label.clone(),
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
        hub.deliver(result);
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
                let running = self.running_jobs();
                if now && running > 0 {
                    let n: usize = self.hubs.iter_mut().map(Hub::hand_back_all).sum();
                    message.push_str(&format!(
                        " Its {n} running job(s) go back to the hub to run elsewhere."
                    ));
                } else if running > 0 {
                    message.push_str(&format!(
                        " Its {running} running job(s) finish first (`pause --now` hands them \
                         back)."
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
                let n: usize = self.hubs.iter_mut().map(Hub::hand_back_all).sum();
                self.start_drain(Duration::ZERO, "its donor unenrolls it");
                let message = format!(
                    "The agent hands back its {n} running job(s) and stops once the hub has \
                     their results."
                );
                say(&message);
                message
            }
            Request::LeaveHub { hub: name } => self.leave_hub(&name),
        };
        Answer {
            message,
            status: Some(self.status()),
        }
    }

    /// `unenroll --hub`: hands back that hub's jobs and stops taking its
    /// work; the hub is dropped once it has their results (see
    /// [`Agent::retire_left_hubs`]). The other hubs go on.
    fn leave_hub(&mut self, name: &str) -> String {
        if self.hubs.len() == 1 && self.hubs[0].name == name {
            return self.on_control(Request::Leave).message;
        }
        let Some(hub) = self.hubs.iter_mut().find(|h| h.name == name) else {
            return format!("This agent does not serve a hub named `{name}` (any more).");
        };
        let n = hub.hand_back_all();
        if hub.leaving.is_none() {
            hub.leaving = Some(None);
            if hub.link.welcomed() {
                hub.outbox.push_control(Msg::Draining(Draining {}));
            }
        }
        let message = format!(
            "The agent hands back its {n} running job(s) of hub {} and leaves it once the hub \
             has their results; it goes on with its other hubs.",
            hub.name
        );
        say(&message);
        message
    }

    /// Pauses (or resumes, `None`): kept in the state dir, told to every hub.
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

    /// Why it takes no new job now, as the hubs are told: the donor's
    /// pause, else the donor's limits; `None`: it takes work.
    fn paused_now(&self) -> Option<Paused> {
        match &self.pause {
            Some(pause) => Some(paused(pause)),
            None => self.limits.unavailable().map(|u| u.paused()),
        }
    }

    /// Tells every connected hub whether it takes work now (the next hello
    /// tells the others).
    fn tell_paused(&mut self) {
        let told = self.paused_now().unwrap_or_default();
        for hub in &mut self.hubs {
            if hub.link.welcomed() {
                hub.outbox.push_control(Msg::Paused(told.clone()));
            }
        }
    }

    /// The donor's limits changed their answer: say so to the donor and,
    /// unless the donor's pause covers it, to the hubs.
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

    /// What `status` shows.
    fn status(&self) -> AgentStatus {
        let mut jobs: Vec<JobInfo> = self
            .hubs
            .iter()
            .flat_map(|h| h.running.values().cloned())
            .collect();
        jobs.sort_by_key(|j| (j.started_ms, j.job_id, j.attempt));
        let first = self.hubs.first();
        AgentStatus {
            running: true,
            pid: Some(std::process::id()),
            started_ms: Some(self.started_ms),
            state_dir: self.state_dir.clone(),
            hub: first.map(|h| h.address.clone()).unwrap_or_default(),
            agent_id: first.map(|h| h.agent_id.clone()).unwrap_or_default(),
            name: first.map(|h| h.caps.name.clone()).unwrap_or_default(),
            connected: first.is_some_and(|h| h.link.welcomed()),
            connected_since_ms: first.and_then(|h| h.connected_since_ms),
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
            undelivered_results: self.hubs.iter().map(|h| h.results.len()).sum(),
            max_parallel_jobs: Some(self.max_parallel),
            hubs: self.hubs.iter().map(Hub::status).collect(),
        }
    }

    /// Starts draining (or shortens a drain's grace period).
    fn start_drain(&mut self, grace: Duration, why: &str) {
        if !self.drain.active {
            self.drain.active = true;
            let running = self.running_jobs();
            if running == 0 {
                tracing::info!("{why}: draining");
            } else {
                tracing::info!(
                    "{why}: draining; {running} running job(s) may finish within {}",
                    humantime::format_duration(grace)
                );
            }
            for hub in &mut self.hubs {
                if hub.link.welcomed() {
                    hub.outbox.push_control(Msg::Draining(Draining {}));
                }
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
                if self.running_jobs() > 0 {
                    tracing::info!("send the signal again to cancel the running jobs now");
                }
                None
            }
            2 => {
                // The first signal started the drain; this one ends its grace.
                self.drain.grace_deadline = None;
                let running = self.running_jobs();
                if running > 0 {
                    tracing::info!("received {name} again: cancelling {running} running job(s)");
                }
                for hub in &mut self.hubs {
                    hub.jobs
                        .cancel_all("cancelled: the agent was stopped by its operator");
                }
                None
            }
            _ => {
                for hub in self.hubs.iter().filter(|h| !h.results.is_empty()) {
                    tracing::warn!(
                        "received {name} a third time: exiting now; undelivered results stay in \
                         {} and are sent on the next start",
                        hub.results.dir().display()
                    );
                }
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

    /// A hub restarted while this agent held its jobs is dialled again
    /// within its leases' grace, however long the backoff has grown.
    #[test]
    fn an_agent_holding_jobs_redials_within_a_restarted_hubs_grace() {
        let grown = Duration::from_secs(55);
        assert_eq!(redial_pause(grown, true), HOLDING_MAX_REDIAL);
        assert_eq!(redial_pause(grown, false), grown);
        let short = Duration::from_millis(300);
        assert_eq!(redial_pause(short, true), short);
        assert!(
            HOLDING_MAX_REDIAL * 3 <= Duration::from_secs(60),
            "the hub's default lease_timeout"
        );
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
        let h = hello(&caps, held.clone(), true, None, Some(2));
        assert_eq!(h.slots, Some(SlotsMsg { offered: 2 }));
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
