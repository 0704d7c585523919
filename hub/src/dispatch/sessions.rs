//! The agent side of dispatch: the connected agents' sessions, matching a
//! job to the best agent for it, the job budgets pools give their agents,
//! and the messages a change sends once it is durable ([`Outbox`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tonic::Status;
use trunkfarm_proto::v1::{
    Assignment, Backlog, Capabilities, Drain, HubMessage, JobRef, Notice, Paused, hub_message,
};

use super::DispatchError;
use super::jobs::{JobRecord, Placement};
use super::records::JobSpecRecord;
use crate::store::now_ms;
use trunkfarm_proto::settings::fmt_duration;

/// What a session sends its agent: a message, or an `Err` that ends the
/// stream with that status (e.g. "agent revoked"). Boxed: the channel
/// allocates its first block of slots up front, which every idle agent
/// would otherwise hold at the size of the largest message.
pub(crate) type Outgoing = Box<Result<HubMessage, Status>>;

/// The channel a session task drains into its agent's stream.
pub(crate) type AgentTx = mpsc::UnboundedSender<Outgoing>;

/// Decides how many jobs an agent may be given before it drains; the pools
/// implement it (an instance serves at most `max_jobs_per_instance`, then is
/// replaced). Asked once per agent, when it first connects after the hub
/// started; dispatch counts its assignments down and drains it at zero.
pub(crate) trait JobBudget: Send + Sync {
    /// The jobs an agent matched by `labels` may be given; `None` for no
    /// limit.
    fn jobs_for(&self, labels: &HashSet<String>) -> Option<u64>;
}

/// Sends `msg` now. A closed channel means the session already ended:
/// whatever it would have said is settled by the agent's next session.
fn tell(tx: &AgentTx, agent_id: &str, msg: Result<HubMessage, Status>) {
    if tx.send(Box::new(msg)).is_err() {
        tracing::debug!(agent = agent_id, "session already closed");
    }
}

/// Messages to send once the change that produced them is durable.
#[derive(Default)]
pub(super) struct Outbox {
    messages: Vec<(AgentTx, Outgoing)>,
}

impl Outbox {
    pub(super) fn push(&mut self, tx: &AgentTx, msg: hub_message::Msg) {
        self.messages
            .push((tx.clone(), Box::new(Ok(HubMessage { msg: Some(msg) }))));
    }

    pub(super) fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// Sends everything (call only once the change is durable).
    pub(super) fn send(self) {
        for (tx, msg) in self.messages {
            if tx.send(msg).is_err() {
                // The session ended; its leases expire or are confirmed on
                // the agent's next Hello.
                tracing::debug!("a message for a closed session was dropped");
            }
        }
    }
}

/// What an agent reports as its sandbox when it has none it may run jobs
/// under (`sandbox = "auto"` without bubblewrap).
const SANDBOX_UNAVAILABLE: &str = "unavailable";

/// A connected agent, as the dispatcher sees it.
struct Conn {
    session: u64,
    /// Its display name (see [`Hello::name`]): what words about it say.
    name: String,
    tx: AgentTx,
    caps: Capabilities,
    labels: HashSet<String>,
    trusted: bool,
    /// Disagreed with confirmation runs too often: given no new job.
    quarantined: bool,
    max_parallel: usize,
    /// The slots an agent serving several hubs offers this hub now (its
    /// `Slots`), at most `max_parallel`; `None` for an agent serving only
    /// this hub (all of `max_parallel`).
    offered: Option<usize>,
    /// The backlog it was last told (`Backlog`), for agents that offer slots.
    backlog_told: Option<u32>,
    /// Jobs it holds.
    running: HashSet<u64>,
    draining: bool,
    /// Why its donor has it take no new job, in words ([`pause_words`]);
    /// `None` while it takes work.
    paused: Option<String>,
    last_heartbeat: Instant,
    last_assigned: u64,
    agent_version: String,
    remote: String,
    /// The notices its donor was sent this session ([`Sessions::tell_donors`]).
    told: HashSet<String>,
}

/// The most notices one session's donor is sent: a hint, never a flood.
const NOTICES_PER_SESSION: usize = 16;

/// Queued jobs looked at for an agent serving several hubs' notices, per
/// schedule (its donor hears of refused work waiting here).
const NOTICE_SCAN: usize = 64;

impl Conn {
    /// The jobs it may hold at once now: its slots, or those it offers
    /// this hub when it serves several.
    fn capacity(&self) -> usize {
        self.offered
            .map_or(self.max_parallel, |o| o.min(self.max_parallel))
    }

    fn free_slots(&self) -> usize {
        self.capacity().saturating_sub(self.running.len())
    }

    /// Why it may not run `spec` at all, whatever its load; `None` if it
    /// may. The one place matching checks what an agent accepts: [`Sessions::pick`]
    /// and [`Sessions::why_waiting`] both ask it.
    fn refuses(&self, spec: &JobSpecRecord) -> Option<Refusal> {
        if self.caps.sandbox == SANDBOX_UNAVAILABLE {
            // An agent without a sandbox it trusts refuses every job: give it none.
            Some(Refusal::NoSandbox)
        } else if spec.trusted_only && !self.trusted {
            Some(Refusal::Untrusted)
        } else if let Some(l) = spec.labels.iter().find(|l| !self.labels.contains(*l)) {
            Some(Refusal::Label(l.clone()))
        } else if !spec.project.is_empty()
            && !self.caps.allowed_projects.is_empty()
            && !self.caps.allowed_projects.contains(&spec.project)
        {
            Some(Refusal::Project)
        } else if !spec.project.is_empty() && self.caps.denied_projects.contains(&spec.project) {
            Some(Refusal::DeniedProject)
        } else if self.caps.max_job_timeout_secs != 0
            && spec.timeout_secs > self.caps.max_job_timeout_secs
        {
            Some(Refusal::Timeout)
        } else {
            None
        }
    }

    /// Why it takes no new work now; `None` if it does (not draining,
    /// paused or quarantined, a free slot, heard from recently).
    fn busy(&self, now: Instant, stale_after: Duration) -> Option<Busy> {
        if self.quarantined {
            Some(Busy::Quarantined)
        } else if self.draining {
            Some(Busy::Draining)
        } else if self.paused.is_some() {
            Some(Busy::Paused)
        } else if now.duration_since(self.last_heartbeat) >= stale_after {
            Some(Busy::Silent)
        } else if self.free_slots() == 0 && self.running.len() < self.max_parallel {
            Some(Busy::Given)
        } else if self.free_slots() == 0 {
            Some(Busy::Full)
        } else {
            None
        }
    }

    /// Takes new work now.
    fn available(&self, now: Instant, stale_after: Duration) -> bool {
        self.busy(now, stale_after).is_none()
    }

    /// A sentence for its donor when only the donor's own limits (allowed
    /// or denied projects, `max_job_timeout`) keep `spec` from it.
    fn donor_notice(&self, spec: &JobSpecRecord) -> Option<String> {
        match self.refuses(spec)? {
            Refusal::Project => Some(format!(
                "A job of project `{}` waits that your allowed_projects ({}) refuse.",
                spec.project,
                self.caps.allowed_projects.join(", ")
            )),
            Refusal::DeniedProject => Some(format!(
                "A job of project `{}` waits that your denied_projects refuse.",
                spec.project
            )),
            Refusal::Timeout => Some(format!(
                "A job that may run {} waits that your max_job_timeout ({}) refuses.",
                fmt_duration(Duration::from_secs(spec.timeout_secs)),
                fmt_duration(Duration::from_secs(self.caps.max_job_timeout_secs))
            )),
            _ => None,
        }
    }
}

/// Why an agent may never run a job (see [`Conn::refuses`]).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Refusal {
    /// It has no sandbox it may run jobs under.
    NoSandbox,
    /// The job is for trusted agents only.
    Untrusted,
    /// It lacks this label of the job's.
    Label(String),
    /// Its donor allows other projects only (`allowed_projects`).
    Project,
    /// Its donor denies the job's project (`denied_projects`).
    DeniedProject,
    /// Its donor allows shorter jobs only (`max_job_timeout`).
    Timeout,
}

/// Why an agent that may run a job takes no new work now (see [`Conn::busy`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Busy {
    Quarantined,
    Draining,
    /// Its donor paused it (`Conn::paused` says why and until when).
    Paused,
    Silent,
    Full,
    /// It serves other hubs too and gives them its free slots now.
    Given,
}

/// `agent `a`` or `agents `a`, `b``, and whether the subject is plural:
/// agents named by their display names, never their ids (an id is half
/// an agent's credential, and these words reach public pages).
fn agents_named(conns: &[&Conn]) -> (String, bool) {
    let names: Vec<String> = conns.iter().map(|c| format!("`{}`", c.name)).collect();
    match names.len() {
        1 => (format!("agent {}", names[0]), false),
        _ => (format!("agents {}", names.join(", ")), true),
    }
}

/// The agents listed with `kind`.
fn of_kind<'a, K: PartialEq>(list: &[(K, &'a Conn)], kind: &K) -> Vec<&'a Conn> {
    list.iter()
        .filter(|(k, _)| k == kind)
        .map(|(_, c)| *c)
        .collect()
}

/// `conns` named, then `singular` or `plural` (e.g. "is quarantined" / "are quarantined").
fn say(conns: &[&Conn], singular: &str, plural: &str) -> String {
    let (who, many) = agents_named(conns);
    format!("{who} {}", if many { plural } else { singular })
}

/// Longest pause reason kept from an agent (its words reach the operator).
const PAUSE_REASON_MAX: usize = 200;

/// What an agent's `Paused` says, in words after its name: its reason
/// ("paused by its donor"; controls removed, capped) and until when (UTC);
/// `None` when it is not paused.
pub(crate) fn pause_words(paused: &Paused) -> Option<String> {
    if !paused.paused {
        return None;
    }
    let reason: String = paused
        .reason
        .chars()
        .filter(|c| !c.is_control())
        .take(PAUSE_REASON_MAX)
        .collect();
    let mut words = match reason.trim() {
        "" => "paused".to_owned(),
        r => r.to_owned(),
    };
    if paused.until_ms != 0 {
        let until = std::time::UNIX_EPOCH + Duration::from_millis(paused.until_ms);
        // "2026-05-01T14:00:00Z" → "2026-05-01 14:00 UTC".
        let stamp = humantime::format_rfc3339_seconds(until).to_string();
        let (day, time) = stamp.split_once('T').unwrap_or((&stamp, ""));
        words.push_str(&format!(
            " until {day} {} UTC",
            time.get(..5).unwrap_or(time)
        ));
    }
    Some(words)
}

/// A snapshot of one connected agent for `agent list` and the pools.
#[derive(Clone, Debug)]
pub(crate) struct ConnectedAgent {
    /// Capabilities from its Hello.
    pub(crate) caps: Capabilities,
    /// Labels it is matched by.
    pub(crate) labels: Vec<String>,
    /// Jobs at once it is given.
    pub(crate) max_parallel: u32,
    /// Jobs it holds.
    pub(crate) running: Vec<JobRef>,
    /// Draining: gets no new job.
    pub(crate) draining: bool,
    /// Paused by its donor, in words ([`pause_words`]): gets no new job.
    pub(crate) paused: Option<String>,
    /// Its version string.
    pub(crate) agent_version: String,
    /// Its address as the hub sees it.
    pub(crate) remote: String,
    /// Jobs it may still be given, if a [`JobBudget`] limits it (at 0 it
    /// drains).
    pub(crate) jobs_left: Option<u64>,
}

/// An agent whose session opens: what it said about itself, and what the
/// hub grants it (see `auth::credentials::Grant::grant`).
pub(crate) struct Hello {
    /// The display name its donor chose (its credential's `name`). Words
    /// about the agent that others may read (why a job waits) name it by
    /// this, never by its id, which is half its credential.
    pub(crate) name: String,
    /// What it claimed (shown as claimed; matching uses the grants below).
    pub(crate) caps: Capabilities,
    /// The labels it is matched by: its token's and its platform's.
    pub(crate) labels: HashSet<String>,
    /// Trusted: may take `trusted_only` jobs (runtime builds).
    pub(crate) trusted: bool,
    /// Quarantined by its credential: connected, but given no job.
    pub(crate) quarantined: bool,
    /// Jobs at once it is given: its claim, capped by its token.
    pub(crate) max_parallel: u32,
    pub(crate) draining: bool,
    /// Paused by its donor (its Hello's `paused`).
    pub(crate) paused: Option<Paused>,
    /// The slots an agent serving several hubs offers this one to start
    /// with (its Hello's `slots`); `None`: all of `max_parallel`.
    pub(crate) offered: Option<u32>,
    pub(crate) agent_version: String,
    pub(crate) remote: String,
    pub(crate) tx: AgentTx,
}

/// The session registry.
pub(super) struct Sessions {
    agents: HashMap<String, Conn>,
    /// When each agent was last heard from (connected or not), ms.
    last_seen: HashMap<String, u64>,
    /// Who limits agents' jobs (the pools), if anyone.
    budget: Option<Arc<dyn JobBudget>>,
    /// Jobs each limited agent may still be given, kept across its
    /// reconnects while the hub runs.
    jobs_left: HashMap<String, u64>,
    /// Agents quarantined while this hub runs. A session opened with a
    /// credential read before its quarantine was stored (a second stream
    /// that authenticated, then waited to say `Hello`) still gets none;
    /// after a restart the stored credential says it.
    quarantined: HashSet<String>,
    /// Agents silent this long get no new job.
    stale_after: Duration,
    heartbeat_interval: Duration,
    assign_counter: u64,
    next_session: u64,
}

impl Sessions {
    pub(super) fn new(heartbeat_interval: Duration) -> Sessions {
        Sessions {
            agents: HashMap::new(),
            last_seen: HashMap::new(),
            budget: None,
            jobs_left: HashMap::new(),
            quarantined: HashSet::new(),
            stale_after: heartbeat_interval * 2 + Duration::from_millis(500),
            heartbeat_interval,
            assign_counter: 0,
            next_session: 0,
        }
    }

    pub(super) fn set_budget(&mut self, budget: Arc<dyn JobBudget>) {
        self.budget = Some(budget);
    }

    /// Registers a new session, closing an older one of the same agent.
    /// Returns the session id.
    pub(super) fn open(&mut self, agent_id: &str, hello: Hello, running: HashSet<u64>) -> u64 {
        self.next_session += 1;
        let session = self.next_session;
        if let Some(old) = self.agents.remove(agent_id) {
            tell(
                &old.tx,
                agent_id,
                Err(Status::aborted(
                    "this agent connected again from elsewhere; closing the older session",
                )),
            );
        }
        if !self.jobs_left.contains_key(agent_id)
            && let Some(jobs) = self.budget.as_ref().and_then(|b| b.jobs_for(&hello.labels))
        {
            self.jobs_left.insert(agent_id.to_owned(), jobs);
        }
        let used_up = self.jobs_left.get(agent_id) == Some(&0);
        self.agents.insert(
            agent_id.to_owned(),
            Conn {
                session,
                name: hello.name,
                tx: hello.tx,
                max_parallel: hello.max_parallel.max(1) as usize,
                offered: hello.offered.map(|o| o as usize),
                backlog_told: None,
                caps: hello.caps,
                labels: hello.labels,
                trusted: hello.trusted,
                quarantined: hello.quarantined || self.quarantined.contains(agent_id),
                running,
                draining: hello.draining || used_up,
                paused: hello.paused.as_ref().and_then(pause_words),
                last_heartbeat: Instant::now(),
                last_assigned: 0,
                agent_version: hello.agent_version,
                remote: hello.remote,
                told: HashSet::new(),
            },
        );
        self.last_seen.insert(agent_id.to_owned(), now_ms());
        session
    }

    /// The session ended (unless a newer one replaced it already).
    pub(super) fn close(&mut self, agent_id: &str, session: u64) {
        if self
            .agents
            .get(agent_id)
            .is_some_and(|c| c.session == session)
        {
            self.agents.remove(agent_id);
            self.last_seen.insert(agent_id.to_owned(), now_ms());
        }
    }

    /// The agent was heard from; true if it had been silent so long that it
    /// got no new work (so a schedule may now find it).
    pub(super) fn heard(&mut self, agent_id: &str) -> bool {
        self.last_seen.insert(agent_id.to_owned(), now_ms());
        match self.agents.get_mut(agent_id) {
            Some(c) => {
                let stale = c.last_heartbeat.elapsed() > self.heartbeat_interval * 2;
                c.last_heartbeat = Instant::now();
                stale
            }
            None => false,
        }
    }

    /// Whether any agent takes new work at all.
    pub(super) fn any_available(&self, now: Instant) -> bool {
        self.agents
            .values()
            .any(|c| c.available(now, self.stale_after))
    }

    /// The agent a job goes to, and whether it is trusted: of those that
    /// take new work, accept the job and are not excluded by its placement,
    /// the least loaded (as a fraction of its slots), ties going to the one
    /// assigned least recently, so no agent grabs every pending job. A
    /// placement's avoided agents come last, and among the rest a placement
    /// preferring trusted agents puts them first.
    pub(super) fn pick(
        &self,
        spec: &JobSpecRecord,
        placement: &Placement,
        now: Instant,
    ) -> Option<(String, bool)> {
        self.agents
            .iter()
            .filter(|(id, c)| {
                c.available(now, self.stale_after)
                    && c.refuses(spec).is_none()
                    && !placement.exclude_agents.contains(id)
            })
            .min_by_key(|(id, c)| {
                (
                    placement.avoid_agents.contains(id),
                    placement.prefer_trusted && !c.trusted,
                    // Load as a fraction of capacity, scaled to an integer.
                    (c.running.len() * 1000) / c.capacity().max(1),
                    c.last_assigned,
                )
            })
            .map(|(id, c)| (id.clone(), c.trusted))
    }

    /// `spec` found no agent: tells each agent that takes work now but
    /// whose donor's own limits (allowed or denied projects,
    /// `max_job_timeout`) refuse it, in a [`Notice`] (each sentence once
    /// per session, at most [`NOTICES_PER_SESSION`]), so a donor who gets
    /// no work learns why; the operator reads the same in `why_waiting`.
    pub(super) fn tell_donors(&mut self, spec: &JobSpecRecord, now: Instant, out: &mut Outbox) {
        let stale_after = self.stale_after;
        for c in self.agents.values_mut() {
            // An agent that would take work but for its donor's terms: free,
            // full, or (serving several hubs) offering this hub no slot
            // because only refused work waits here.
            let could_take = matches!(
                c.busy(now, stale_after),
                None | Some(Busy::Full | Busy::Given)
            );
            if c.told.len() >= NOTICES_PER_SESSION || !could_take {
                continue;
            }
            if let Some(text) = c.donor_notice(spec)
                && c.told.insert(text.clone())
            {
                out.push(&c.tx, hub_message::Msg::Notice(Notice { text }));
            }
        }
    }

    /// Why a queued job waits, in words, from the same checks as
    /// [`Sessions::pick`] (computed when asked, never stored): no agent
    /// connected, no agent with its labels, agents whose donors refuse it
    /// (timeout, allowed or denied projects), none trusted, the matching
    /// ones quarantined, draining, paused (by the donor or its limits),
    /// silent or busy. Reasons for different agents are joined
    /// with "; ".
    pub(super) fn why_waiting(
        &self,
        spec: &JobSpecRecord,
        placement: &Placement,
        now: Instant,
    ) -> String {
        if self.agents.is_empty() {
            return "no agent connected".into();
        }
        if spec.trusted_only && !self.agents.values().any(|c| c.trusted) {
            return "trusted agents only: none connected".into();
        }
        let unheld: Vec<String> = spec
            .labels
            .iter()
            .filter(|l| !self.agents.values().any(|c| c.labels.contains(*l)))
            .map(|l| format!("`{l}`"))
            .collect();
        match unheld.len() {
            0 => {}
            1 => return format!("no connected agent has label {}", unheld[0]),
            _ => return format!("no connected agent has labels {}", unheld.join(", ")),
        }
        // By name (then id, for a stable order among equal names).
        let mut agents: Vec<(&String, &Conn)> = self.agents.iter().collect();
        agents.sort_by_key(|(id, c)| (&c.name, *id));
        let mut refused: Vec<(Refusal, &Conn)> = Vec::new();
        let mut excluded = Vec::new();
        let mut busy: Vec<(Busy, &Conn)> = Vec::new();
        let mut free = Vec::new();
        for (id, c) in agents {
            if let Some(r) = c.refuses(spec) {
                refused.push((r, c));
            } else if placement.exclude_agents.contains(id) {
                excluded.push(c);
            } else if let Some(b) = c.busy(now, self.stale_after) {
                busy.push((b, c));
            } else {
                free.push(c);
            }
        }
        let mut parts = Vec::new();
        if !free.is_empty() {
            parts.push(say(
                &free,
                "takes it at the next schedule",
                "take it at the next schedule",
            ));
        }
        let full: Vec<&Conn> = of_kind(&busy, &Busy::Full);
        if !full.is_empty() {
            let running: usize = full.iter().map(|c| c.running.len()).sum();
            if full.len() == busy.len() && free.is_empty() {
                parts.push(format!("every matching agent is busy ({running} running)"));
            } else {
                parts.push(format!(
                    "{} ({running} running)",
                    say(&full, "is busy", "are busy")
                ));
            }
        }
        let given = of_kind(&busy, &Busy::Given);
        if !given.is_empty() {
            // Never which hubs, nor what they run: only that this one waits.
            parts.push(say(
                &given,
                "gives its free slots to its other hubs",
                "give their free slots to their other hubs",
            ));
        }
        for c in of_kind(&busy, &Busy::Paused) {
            let words = c.paused.as_deref().unwrap_or("paused");
            parts.push(format!("agent `{}` is {words}", c.name));
        }
        for (kind, words) in [
            (Busy::Quarantined, ("is quarantined", "are quarantined")),
            (Busy::Draining, ("is draining", "are draining")),
            (
                Busy::Silent,
                (
                    "has not been heard from lately",
                    "have not been heard from lately",
                ),
            ),
        ] {
            let who: Vec<&Conn> = of_kind(&busy, &kind);
            if !who.is_empty() {
                parts.push(say(&who, words.0, words.1));
            }
        }
        if !excluded.is_empty() {
            parts.push(say(
                &excluded,
                "may not take it (it checks that agent's result)",
                "may not take it (it checks those agents' results)",
            ));
        }
        let timeouts: Vec<&Conn> = of_kind(&refused, &Refusal::Timeout);
        if !timeouts.is_empty() {
            let most = timeouts
                .iter()
                .map(|c| c.caps.max_job_timeout_secs)
                .max()
                .unwrap_or_default();
            let (n, verb, whose, allow) = match timeouts.len() {
                1 => ("1 agent".to_owned(), "matches", "its donor", "allows"),
                n => (format!("{n} agents"), "match", "their donors", "allow"),
            };
            parts.push(format!(
                "{n} {verb} the labels but {whose} {allow} at most {} (job asks {})",
                fmt_duration(Duration::from_secs(most)),
                fmt_duration(Duration::from_secs(spec.timeout_secs)),
            ));
        }
        for (r, c) in &refused {
            match r {
                Refusal::Project => parts.push(format!(
                    "{} only accepts projects {} (job is for `{}`)",
                    agents_named(&[c]).0,
                    c.caps.allowed_projects.join(", "),
                    spec.project
                )),
                Refusal::DeniedProject => parts.push(format!(
                    "{} does not accept project `{}` (its donor denies it)",
                    agents_named(&[c]).0,
                    spec.project
                )),
                Refusal::Label(l) => {
                    parts.push(format!("{} lacks label `{l}`", agents_named(&[c]).0))
                }
                _ => {}
            }
        }
        for (kind, words) in [
            (
                Refusal::Untrusted,
                (
                    "is not trusted (the job is for trusted agents only)",
                    "are not trusted (the job is for trusted agents only)",
                ),
            ),
            (
                Refusal::NoSandbox,
                (
                    "has no sandbox to run jobs in",
                    "have no sandbox to run jobs in",
                ),
            ),
        ] {
            let who: Vec<&Conn> = of_kind(&refused, &kind);
            if !who.is_empty() {
                parts.push(say(&who, words.0, words.1));
            }
        }
        parts.join("; ")
    }

    /// The job was leased to `agent_id`: it holds it, and is sent the
    /// assignment once the lease is durable. An agent whose job budget is
    /// used up drains.
    pub(super) fn assign(
        &mut self,
        agent_id: &str,
        job_id: u64,
        assignment: Assignment,
        out: &mut Outbox,
    ) {
        self.assign_counter += 1;
        let Some(conn) = self.agents.get_mut(agent_id) else {
            return;
        };
        conn.running.insert(job_id);
        conn.last_assigned = self.assign_counter;
        if let Some(left) = self.jobs_left.get_mut(agent_id) {
            *left = left.saturating_sub(1);
            if *left == 0 {
                tracing::info!(
                    agent = agent_id,
                    "the agent got the last job of its budget: it drains"
                );
                conn.draining = true;
            }
        }
        out.push(&conn.tx, hub_message::Msg::Assign(assignment));
    }

    /// The agent no longer holds the job.
    pub(super) fn release(&mut self, agent_id: &str, job_id: u64) {
        if let Some(conn) = self.agents.get_mut(agent_id) {
            conn.running.remove(&job_id);
        }
    }

    /// The session's channel, if connected.
    pub(super) fn tx(&self, agent_id: &str) -> Option<&AgentTx> {
        self.agents.get(agent_id).map(|c| &c.tx)
    }

    /// The agent is (or is no longer) quarantined.
    pub(super) fn set_quarantined(&mut self, agent_id: &str, quarantined: bool) {
        if quarantined {
            self.quarantined.insert(agent_id.to_owned());
        } else {
            self.quarantined.remove(agent_id);
        }
        if let Some(c) = self.agents.get_mut(agent_id) {
            c.quarantined = quarantined;
        }
    }

    /// The agent gets no new jobs.
    pub(super) fn set_draining(&mut self, agent_id: &str) {
        if let Some(c) = self.agents.get_mut(agent_id) {
            c.draining = true;
        }
    }

    /// The agent is paused by its donor (or resumed, `None`); true if it
    /// is connected.
    pub(super) fn set_paused(&mut self, agent_id: &str, paused: Option<String>) -> bool {
        match self.agents.get_mut(agent_id) {
            Some(c) => {
                c.paused = paused;
                true
            }
            None => false,
        }
    }

    /// An agent serving several hubs offers this one `offered` slots from
    /// now on; true if it is connected.
    pub(super) fn set_offered(&mut self, agent_id: &str, offered: u32) -> bool {
        match self.agents.get_mut(agent_id) {
            Some(c) => {
                c.offered = Some(offered as usize);
                true
            }
            None => false,
        }
    }

    /// Tells each agent that offers slots (serving several hubs) how many
    /// queued jobs it could run, when that changed: it offers its free
    /// slots to the hubs that have work for it. Counted with the same
    /// checks as [`Sessions::pick`], up to the slots this hub grants it
    /// (not less what it holds: the agent knows what it runs before this
    /// hub has recorded what it finished).
    pub(super) fn tell_backlogs<'a>(
        &mut self,
        queued: impl Iterator<Item = &'a JobRecord> + Clone,
        out: &mut Outbox,
    ) {
        for (id, c) in &mut self.agents {
            if c.offered.is_none() {
                continue;
            }
            // Quarantined or draining here: nothing for it, so it offers its
            // slots to its other hubs instead of leaving them unfilled.
            let jobs = if c.quarantined || c.draining {
                0
            } else {
                // Such an agent offers no slot here while only work its
                // donor refuses waits, so `schedule` never looks at it for
                // that work: its donor hears why from here (of the first
                // queued jobs only).
                for rec in queued.clone().take(NOTICE_SCAN) {
                    if c.told.len() >= NOTICES_PER_SESSION {
                        break;
                    }
                    if let Some(text) = c.donor_notice(&rec.spec)
                        && c.told.insert(text.clone())
                    {
                        out.push(&c.tx, hub_message::Msg::Notice(Notice { text }));
                    }
                }
                queued
                    .clone()
                    .filter(|rec| {
                        c.refuses(&rec.spec).is_none() && !rec.placement.exclude_agents.contains(id)
                    })
                    .take(c.max_parallel)
                    .count() as u32
            };
            if c.backlog_told != Some(jobs) {
                c.backlog_told = Some(jobs);
                let max_jobs = c.max_parallel as u32;
                out.push(&c.tx, hub_message::Msg::Backlog(Backlog { jobs, max_jobs }));
            }
        }
    }

    /// Asks a connected agent to drain (finish its jobs, then exit).
    pub(super) fn drain(&mut self, agent_id: &str, grace: Duration) -> Result<(), DispatchError> {
        let conn = self
            .agents
            .get_mut(agent_id)
            .ok_or_else(|| DispatchError::NotConnected(agent_id.to_string()))?;
        conn.draining = true;
        let msg = hub_message::Msg::Drain(Drain {
            grace_secs: grace.as_secs(),
        });
        tell(&conn.tx, agent_id, Ok(HubMessage { msg: Some(msg) }));
        Ok(())
    }

    /// Ends a revoked agent's session now; it will not come back, so its
    /// budget goes too.
    pub(super) fn cut_off(&mut self, agent_id: &str) {
        self.jobs_left.remove(agent_id);
        if let Some(conn) = self.agents.remove(agent_id) {
            tell(
                &conn.tx,
                agent_id,
                Err(Status::permission_denied(format!(
                    "agent {agent_id} was revoked by the hub's operator and may not connect again: enroll again with a new enrollment string if the operator agrees"
                ))),
            );
        }
    }

    /// Ends every session (hub shutdown): agents reconnect to the next hub.
    pub(super) fn close_all(&mut self) {
        for (id, conn) in self.agents.drain() {
            tell(
                &conn.tx,
                &id,
                Err(Status::unavailable(
                    "the hub is shutting down; reconnect later",
                )),
            );
        }
    }

    /// Connected agents by id; `attempt` gives the leased attempt of a job.
    pub(super) fn connected(
        &self,
        attempt: impl Fn(u64) -> Option<u32>,
    ) -> HashMap<String, ConnectedAgent> {
        self.agents
            .iter()
            .map(|(id, c)| {
                let mut running: Vec<JobRef> = c
                    .running
                    .iter()
                    .filter_map(|j| {
                        attempt(*j).map(|attempt| JobRef {
                            job_id: *j,
                            attempt,
                        })
                    })
                    .collect();
                running.sort_by_key(|j| j.job_id);
                let mut labels: Vec<String> = c.labels.iter().cloned().collect();
                labels.sort();
                (
                    id.clone(),
                    ConnectedAgent {
                        caps: c.caps.clone(),
                        max_parallel: c.max_parallel as u32,
                        labels,
                        running,
                        draining: c.draining,
                        paused: c.paused.clone(),
                        agent_version: c.agent_version.clone(),
                        remote: c.remote.clone(),
                        jobs_left: self.jobs_left.get(id).copied(),
                    },
                )
            })
            .collect()
    }

    /// When an agent was last heard from (ms), if since this hub started.
    pub(super) fn last_seen(&self, agent_id: &str) -> Option<u64> {
        self.last_seen.get(agent_id).copied()
    }
}
