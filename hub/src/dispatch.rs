//! The job queue: jobs, their leases, the connected agents' free slots, and
//! the matching of one to the other.
//!
//! ```text
//! queued ──lease──► leased ──started──► running ──result──► finished
//!   ▲                  │                   │
//!   └── lease lost (agent silent past its lease, revoked, restarted) ──┘
//!       (attempt + 1; after max_attempts: finished as an infrastructure error)
//! ```
//!
//! Every change is applied under one lock (in memory and to sled), then
//! [`Store::commit`] makes it durable *outside* the lock, and only then is
//! anything sent: an assignment to an agent, an acknowledgement of a result,
//! a job id to a submitter. A crash therefore can only lose changes nobody was
//! told about. Leases' deadlines live in memory: a restarted hub gives every
//! leased job a fresh lease, which the agent confirms by listing the job in
//! its `Hello` (or loses, and the job is requeued at once).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tonic::Status;
use trunkfarm_proto::v1::{
    Assignment, Cancel, Capabilities, Drain, HubMessage, JobRef, JobResult, JobSpec, Outcome,
    ResultAck, hub_message,
};

use crate::logs::JobLogs;
use crate::space::{DataDir, SpaceError};
use crate::store::{Store, StoreError, now_ms, trees};

/// What a session sends its agent: a message, or an `Err` that ends the
/// stream with that status (e.g. "agent revoked"). Boxed: the channel
/// allocates its first block of slots up front, which every idle agent
/// would otherwise hold at the size of the largest message.
pub type Outgoing = Box<Result<HubMessage, Status>>;

/// The channel a session task drains into its agent's stream.
pub type AgentTx = mpsc::UnboundedSender<Outgoing>;

/// Settings the dispatcher needs from the hub config.
#[derive(Clone, Debug)]
pub struct DispatchSettings {
    /// How long an agent may stay silent before its jobs are requeued.
    pub lease_timeout: Duration,
    /// Agents heartbeat this often; one silent for two intervals gets no new job.
    pub heartbeat_interval: Duration,
    /// Attempts before a job is finished as an infrastructure error.
    pub max_attempts: u32,
    /// Timeout given to a job that names none.
    pub default_job_timeout: Duration,
    /// The longest timeout a job may ask for.
    pub max_job_timeout: Duration,
    /// The data dir's reserve: new jobs are refused when it is cut into.
    pub space: DataDir,
}

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for an agent.
    Queued,
    /// Sent to an agent, not yet reported started.
    Leased,
    /// The agent reported it started.
    Running,
    /// Has its one result.
    Finished,
}

/// One attempt of a job on one agent.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct AttemptRecord {
    /// 1-based.
    pub attempt: u32,
    /// Who ran it.
    pub agent_id: String,
    /// When it was leased.
    pub leased_at_ms: u64,
    /// Why it ended without a result; empty if it has one.
    pub lost_reason: String,
}

/// A job as stored: `jobs` tree, key `j` + id (big endian).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobRecord {
    /// Unique, increasing.
    pub id: u64,
    /// What to run.
    pub spec: JobSpec,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// Submission time.
    pub created_at_ms: u64,
    /// Current state.
    pub state: JobState,
    /// The current (or last) attempt; 0 before the first lease.
    pub attempt: u32,
    /// The agent of the current (or last) attempt.
    #[serde(default)]
    pub agent_id: String,
    /// Every attempt so far.
    #[serde(default)]
    pub attempts: Vec<AttemptRecord>,
    /// The one result, once finished.
    #[serde(default)]
    pub result: Option<JobResult>,
    /// When it finished.
    #[serde(default)]
    pub finished_at_ms: u64,
    /// An operator asked to cancel it.
    #[serde(default)]
    pub cancel_requested: bool,
    /// The pipeline's name for the job (e.g. `build/lua/linux-x86_64/<sha>`),
    /// unique among jobs; empty for a job submitted by hand. Keyed jobs are
    /// submitted at most once, and their end is handed to the pipeline
    /// through the finished inbox.
    #[serde(default)]
    pub key: String,
}

impl JobRecord {
    /// The (job, attempt) reference of the current attempt.
    pub fn job_ref(&self) -> JobRef {
        JobRef {
            job_id: self.id,
            attempt: self.attempt,
        }
    }
}

/// Errors callers turn into gRPC statuses.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// The store failed; nothing was acknowledged.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A job spec that cannot run.
    #[error("{0}")]
    InvalidJob(String),
    /// No such job.
    #[error("no job {0}: see `trunkfarm job list`")]
    NoSuchJob(u64),
    /// The agent is not connected.
    #[error("agent {0} is not connected")]
    NotConnected(String),
    /// The data dir has no room for new work.
    #[error(transparent)]
    NoRoom(#[from] SpaceError),
}

/// A connected agent, as the dispatcher sees it.
struct Conn {
    session: u64,
    tx: AgentTx,
    caps: Capabilities,
    labels: HashSet<String>,
    max_parallel: usize,
    running: HashSet<u64>,
    draining: bool,
    last_heartbeat: Instant,
    last_assigned: u64,
    /// Jobs assigned on this connection.
    assigned: u64,
    agent_version: String,
    remote: String,
}

/// Whether an agent carrying a label with a job limit reached it.
fn over_limit(limits: &HashMap<String, u64>, c: &Conn) -> bool {
    !limits.is_empty()
        && c.labels
            .iter()
            .any(|l| limits.get(l).is_some_and(|max| c.assigned >= *max))
}

impl Conn {
    fn free_slots(&self) -> usize {
        self.max_parallel.saturating_sub(self.running.len())
    }

    fn accepts(&self, spec: &JobSpec) -> bool {
        spec.labels.iter().all(|l| self.labels.contains(l))
            && (spec.project.is_empty()
                || self.caps.allowed_projects.is_empty()
                || self.caps.allowed_projects.contains(&spec.project))
            && (self.caps.max_job_timeout_secs == 0
                || spec.timeout_secs <= self.caps.max_job_timeout_secs)
    }
}

struct Lease {
    agent_id: String,
    attempt: u32,
    deadline: Instant,
}

#[derive(Default)]
struct State {
    /// Unfinished jobs (queued or leased), the authoritative copy.
    open: HashMap<u64, JobRecord>,
    /// Queued job ids, oldest first (requeued jobs go first).
    queue: VecDeque<u64>,
    leases: HashMap<u64, Lease>,
    agents: HashMap<String, Conn>,
    /// When each agent was last heard from (connected or not), ms.
    last_seen: HashMap<String, u64>,
    /// Results each agent delivered since the hub started (pools replace an
    /// instance after `max_jobs_per_instance`).
    completed: HashMap<String, u64>,
    /// Agents carrying one of these labels get at most this many jobs
    /// per connection (a pool's `max_jobs_per_instance`).
    label_limits: HashMap<String, u64>,
    assign_counter: u64,
    next_session: u64,
}

/// Messages to send once the change that produced them is durable.
#[derive(Default)]
struct Outbox {
    messages: Vec<(AgentTx, Outgoing)>,
    finished: Vec<(u64, u32)>,
}

impl Outbox {
    fn push(&mut self, tx: &AgentTx, msg: hub_message::Msg) {
        self.messages
            .push((tx.clone(), Box::new(Ok(HubMessage { msg: Some(msg) }))));
    }
}

/// A snapshot of one connected agent for `agent list`.
#[derive(Clone, Debug)]
pub struct ConnectedAgent {
    /// Capabilities from its Hello.
    pub caps: Capabilities,
    /// Labels it is matched by.
    pub labels: Vec<String>,
    /// Jobs it holds.
    pub running: Vec<JobRef>,
    /// Draining: gets no new job.
    pub draining: bool,
    /// Its version string.
    pub agent_version: String,
    /// Its address as the hub sees it.
    pub remote: String,
    /// Results it delivered since the hub started.
    pub completed: u64,
}

/// The dispatcher. Cheap to clone.
#[derive(Clone)]
pub struct Dispatcher {
    shared: Arc<Shared>,
}

struct Shared {
    store: Store,
    tree: sled::Tree,
    logs: Arc<JobLogs>,
    settings: DispatchSettings,
    state: Mutex<State>,
    /// Wakes the pipeline's inbox reader when a job finished.
    finished: Arc<tokio::sync::Notify>,
    /// Jobs finished durably since the hub started (`/metrics`; the
    /// benchmark's clock stops when it reaches the jobs it submitted).
    finished_total: std::sync::atomic::AtomicU64,
}

fn job_key(id: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = b'j';
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

fn open_key(id: u64) -> [u8; 9] {
    let mut k = job_key(id);
    k[0] = b'o';
    k
}

/// Marks a finished keyed job the pipeline has not taken in yet.
fn inbox_key(id: u64) -> [u8; 9] {
    let mut k = job_key(id);
    k[0] = b'f';
    k
}

/// Adds a job record and its index entries (open marker, pipeline key,
/// finished inbox) to `batch`: the one place the jobs tree's layout is
/// written (also by `trunkfarm bench recovery`, which builds a history of a
/// million jobs in a database no hub serves).
pub(crate) fn stage(rec: &JobRecord, batch: &mut sled::Batch) -> Result<(), serde_json::Error> {
    batch.insert(&job_key(rec.id), serde_json::to_vec(rec)?);
    if rec.state == JobState::Finished {
        batch.remove(&open_key(rec.id));
        if !rec.key.is_empty() {
            // In the same write as the result: the pipeline cannot miss it.
            batch.insert(&inbox_key(rec.id), &[]);
        }
    } else {
        batch.insert(&open_key(rec.id), &[]);
        if !rec.key.is_empty() {
            batch.insert(name_key(&rec.key), &rec.id.to_be_bytes());
        }
    }
    Ok(())
}

/// Maps a pipeline key to its job id: `k` + key.
fn name_key(key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(b'k');
    k.extend_from_slice(key.as_bytes());
    k
}

impl Dispatcher {
    /// Loads every unfinished job and starts the lease reaper.
    pub fn open(
        store: &Store,
        logs: Arc<JobLogs>,
        settings: DispatchSettings,
    ) -> Result<Dispatcher, DispatchError> {
        let tree = store.tree(trees::JOBS)?;
        let mut state = State::default();
        let grace = Instant::now() + settings.lease_timeout;
        let mut queued = Vec::new();
        for item in tree.scan_prefix([b'o']) {
            let (k, _) = item.map_err(|e| store.err(e))?;
            let mut id = [0u8; 8];
            id.copy_from_slice(
                k.get(1..9)
                    .ok_or_else(|| store.corrupt("jobs/o", "short key"))?,
            );
            let id = u64::from_be_bytes(id);
            let raw = tree
                .get(job_key(id))
                .map_err(|e| store.err(e))?
                .ok_or_else(|| store.corrupt(format!("jobs/j{id}"), "open job without record"))?;
            let rec: JobRecord = serde_json::from_slice(&raw)
                .map_err(|e| store.corrupt(format!("jobs/j{id}"), e))?;
            match rec.state {
                JobState::Queued => queued.push(id),
                JobState::Leased | JobState::Running => {
                    state.leases.insert(
                        id,
                        Lease {
                            agent_id: rec.agent_id.clone(),
                            attempt: rec.attempt,
                            deadline: grace,
                        },
                    );
                }
                JobState::Finished => continue,
            }
            state.open.insert(id, rec);
        }
        queued.sort_unstable();
        state.queue = queued.into();
        let shared = Arc::new(Shared {
            store: store.clone(),
            tree,
            logs,
            settings,
            state: Mutex::new(state),
            finished: Arc::new(tokio::sync::Notify::new()),
            finished_total: std::sync::atomic::AtomicU64::new(0),
        });
        tokio::spawn(reap_leases(Arc::downgrade(&shared)));
        Ok(Dispatcher { shared })
    }

    /// Jobs finished (and durable) since the hub started.
    pub fn finished_total(&self) -> u64 {
        self.shared
            .finished_total
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Counts of open jobs, for start-up messages: (queued, leased).
    pub fn open_counts(&self) -> (usize, usize) {
        let st = self.lock();
        (st.queue.len(), st.leases.len())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes everything durable, then sends what the change produced.
    async fn deliver(&self, out: Outbox) -> Result<(), StoreError> {
        self.shared.store.commit().await?;
        for (tx, msg) in out.messages {
            let _ = tx.send(msg);
        }
        if !out.finished.is_empty() {
            self.shared.finished_total.fetch_add(
                out.finished.len() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
            self.shared.finished.notify_one();
        }
        for (job, attempts) in out.finished {
            self.shared.logs.finished(job, attempts);
        }
        Ok(())
    }

    fn persist(&self, rec: &JobRecord) -> Result<(), StoreError> {
        let s = &self.shared;
        let mut batch = sled::Batch::default();
        stage(rec, &mut batch).map_err(|e| s.store.corrupt("(encode job)", e))?;
        s.tree.apply_batch(batch).map_err(|e| s.store.err(e))
    }

    /// Queues a new job; returns its id once it is durable.
    pub async fn submit(&self, spec: JobSpec, max_attempts: u32) -> Result<u64, DispatchError> {
        self.submit_keyed(spec, max_attempts, String::new())
            .await
            .map(|(id, _)| id)
    }

    /// Queues a job under a pipeline key, unless a job with that key already
    /// exists: returns its id and whether it is new. Submitting the same key
    /// again (after a crash, a re-poll, a retried hand-off) is a no-op, so
    /// the pipeline can re-derive its jobs from durable state at any time.
    pub async fn submit_keyed(
        &self,
        mut spec: JobSpec,
        max_attempts: u32,
        key: String,
    ) -> Result<(u64, bool), DispatchError> {
        let s = &self.shared.settings;
        if spec.commands.is_empty() || spec.commands.iter().all(|c| c.trim().is_empty()) {
            return Err(DispatchError::InvalidJob(
                "the job has no command: give at least one (e.g. `trunkfarm job run -- make test`)"
                    .into(),
            ));
        }
        if spec.timeout_secs == 0 {
            spec.timeout_secs = s.default_job_timeout.as_secs().max(1);
        }
        if spec.timeout_secs > s.max_job_timeout.as_secs() {
            return Err(DispatchError::InvalidJob(format!(
                "the job asks for a timeout of {}, more than this hub's dispatch.max_job_timeout ({})",
                humantime::format_duration(Duration::from_secs(spec.timeout_secs)),
                humantime::format_duration(s.max_job_timeout)
            )));
        }

        let rec = JobRecord {
            id: self.shared.store.next_id()?,
            spec,
            max_attempts: if max_attempts == 0 {
                s.max_attempts
            } else {
                max_attempts
            },
            created_at_ms: now_ms(),
            state: JobState::Queued,
            attempt: 0,
            agent_id: String::new(),
            attempts: Vec::new(),
            result: None,
            finished_at_ms: 0,
            cancel_requested: false,
            key,
        };
        let id = rec.id;
        {
            // Under the lock, so two submits of one key cannot both pass the check.
            let _st = self.lock();
            if !rec.key.is_empty() {
                if let Some(existing) = self.keyed(&rec.key)? {
                    return Ok((existing, false));
                }
            }
            // Only new work is refused on a full disk (a known key stores nothing).
            s.space.admit("jobs", 0)?;
            self.persist(&rec)?;
        }
        if let Err(e) = self.shared.store.commit().await {
            // Not acknowledged: take it back so it is not run behind the
            // submitter's back (best effort; the store is failing).
            let _ = self.shared.tree.remove(job_key(id));
            let _ = self.shared.tree.remove(open_key(id));
            if !rec.key.is_empty() {
                let _ = self.shared.tree.remove(name_key(&rec.key));
            }
            return Err(e.into());
        }
        let out = {
            let mut st = self.lock();
            st.open.insert(id, rec);
            st.queue.push_back(id);
            self.schedule(&mut st)?
        };
        self.deliver(out).await?;
        Ok((id, true))
    }

    /// The job submitted under a pipeline key, if any.
    pub fn keyed(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let s = &self.shared;
        let Some(raw) = s.tree.get(name_key(key)).map_err(|e| s.store.err(e))? else {
            return Ok(None);
        };
        let bytes: [u8; 8] = raw
            .as_ref()
            .try_into()
            .map_err(|_| s.store.corrupt(format!("jobs/k{key}"), "not an 8-byte id"))?;
        Ok(Some(u64::from_be_bytes(bytes)))
    }

    /// Keys of unfinished keyed jobs starting with `prefix`, with their ids.
    pub fn open_keys(&self, prefix: &str) -> Vec<(String, u64)> {
        let st = self.lock();
        let mut keys: Vec<_> = st
            .open
            .values()
            .filter(|r| !r.key.is_empty() && r.key.starts_with(prefix))
            .map(|r| (r.key.clone(), r.id))
            .collect();
        keys.sort_unstable();
        keys
    }

    /// Gives agents carrying `label` at most `max_jobs` jobs per
    /// connection (then they get none, and their pool replaces them).
    pub fn limit_jobs_per_agent(&self, label: &str, max_jobs: u64) {
        self.lock().label_limits.insert(label.to_owned(), max_jobs);
    }

    /// Queued jobs' labels and how long each has waited (ms), for the
    /// pools deciding whether to start an instance.
    pub fn queued_labels(&self) -> Vec<(Vec<String>, u64)> {
        let st = self.lock();
        let now = now_ms();
        st.queue
            .iter()
            .filter_map(|id| st.open.get(id))
            .map(|r| (r.spec.labels.clone(), now.saturating_sub(r.created_at_ms)))
            .collect()
    }

    /// Runtime artifacts that unfinished jobs will download: garbage
    /// collection must keep them.
    pub fn open_artifacts(&self) -> std::collections::HashSet<String> {
        self.lock()
            .open
            .values()
            .filter(|r| !r.spec.artifact_sha256.is_empty())
            .map(|r| r.spec.artifact_sha256.clone())
            .collect()
    }

    /// Finished keyed jobs the pipeline has not acknowledged yet, oldest
    /// first, at most `limit`.
    pub fn finished_inbox(&self, limit: usize) -> Result<Vec<JobRecord>, StoreError> {
        let s = &self.shared;
        let mut out = Vec::new();
        for item in s.tree.scan_prefix([b'f']).take(limit) {
            let (k, _) = item.map_err(|e| s.store.err(e))?;
            let id: [u8; 8] = k
                .get(1..9)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| s.store.corrupt("jobs/f", "short key"))?;
            let id = u64::from_be_bytes(id);
            match self.get(id)? {
                Some(rec) => out.push(rec),
                None => {
                    // A marker without a record cannot be handed over; drop it.
                    s.tree.remove(inbox_key(id)).map_err(|e| s.store.err(e))?;
                }
            }
        }
        Ok(out)
    }

    /// The pipeline took in these finished jobs (durably, on its side):
    /// they leave the inbox, and their report files (parsed and stored by
    /// the pipeline, up to megabytes each) leave the job record. Durable once
    /// the next [`Store::commit`] returns.
    pub fn ack_finished(&self, ids: &[u64]) -> Result<(), StoreError> {
        let s = &self.shared;
        let mut batch = sled::Batch::default();
        for id in ids {
            batch.remove(&inbox_key(*id));
            if let Some(mut rec) = self.get(*id)? {
                let mut changed = false;
                if let Some(result) = rec.result.as_mut() {
                    for report in &mut result.reports {
                        if !report.data.is_empty() {
                            report.data = Vec::new();
                            changed = true;
                        }
                    }
                }
                if changed {
                    let bytes =
                        serde_json::to_vec(&rec).map_err(|e| s.store.corrupt("(encode job)", e))?;
                    batch.insert(&job_key(rec.id), bytes);
                }
            }
        }
        s.tree.apply_batch(batch).map_err(|e| s.store.err(e))
    }

    /// Notified whenever a job finished (so the pipeline's inbox may hold
    /// something new).
    pub fn finished_signal(&self) -> Arc<tokio::sync::Notify> {
        self.shared.finished.clone()
    }

    /// Hands queued jobs to agents with free slots: for each job, oldest
    /// first, the least-loaded matching agent, ties going to the one assigned
    /// least recently — so no agent grabs every pending job.
    fn schedule(&self, st: &mut State) -> Result<Outbox, StoreError> {
        let mut out = Outbox::default();
        if st.queue.is_empty() {
            return Ok(out);
        }
        let stale_after = self.shared.settings.heartbeat_interval * 2 + Duration::from_millis(500);
        let now = Instant::now();
        let mut skipped = VecDeque::new();
        while let Some(id) = st.queue.pop_front() {
            let any_free = st.agents.values().any(|c| {
                !c.draining
                    && c.free_slots() > 0
                    && now.duration_since(c.last_heartbeat) < stale_after
            });
            if !any_free {
                skipped.push_back(id);
                break;
            }
            let Some(rec) = st.open.get(&id) else {
                continue;
            };
            let best = st
                .agents
                .iter()
                .filter(|(_, c)| {
                    !c.draining
                        && c.free_slots() > 0
                        && now.duration_since(c.last_heartbeat) < stale_after
                        && c.accepts(&rec.spec)
                        && !over_limit(&st.label_limits, c)
                })
                .min_by_key(|(_, c)| {
                    (
                        // Load as a fraction of capacity, scaled to an integer.
                        (c.running.len() * 1000) / c.max_parallel.max(1),
                        c.last_assigned,
                    )
                })
                .map(|(id, _)| id.clone());
            let Some(agent_id) = best else {
                skipped.push_back(id);
                continue;
            };
            let Some(mut rec) = st.open.get(&id).cloned() else {
                continue;
            };
            rec.attempt += 1;
            rec.state = JobState::Leased;
            rec.agent_id = agent_id.clone();
            rec.attempts.push(AttemptRecord {
                attempt: rec.attempt,
                agent_id: agent_id.clone(),
                leased_at_ms: now_ms(),
                lost_reason: String::new(),
            });
            // Durable first; memory changes only once the write succeeded, so
            // a failing disk leaves the job queued (and the queue in order).
            if let Err(e) = self.persist(&rec) {
                st.queue.push_front(id);
                while let Some(id) = skipped.pop_back() {
                    st.queue.push_front(id);
                }
                return Err(e);
            }
            st.assign_counter += 1;
            let counter = st.assign_counter;
            let assignment = Assignment {
                job: Some(rec.job_ref()),
                spec: Some(rec.spec.clone()),
            };
            let attempt = rec.attempt;
            st.open.insert(id, rec);
            st.leases.insert(
                id,
                Lease {
                    agent_id: agent_id.clone(),
                    attempt,
                    deadline: now + self.shared.settings.lease_timeout,
                },
            );
            if let Some(conn) = st.agents.get_mut(&agent_id) {
                conn.running.insert(id);
                conn.last_assigned = counter;
                conn.assigned += 1;
                out.push(&conn.tx, hub_message::Msg::Assign(assignment));
            }
        }
        // Keep the order: skipped jobs stay ahead of the ones not looked at.
        while let Some(id) = skipped.pop_back() {
            st.queue.push_front(id);
        }
        Ok(out)
    }

    /// Ends an attempt without a result: requeues the job, or finishes it as
    /// an infrastructure error once its attempts are used up (or as
    /// cancelled, if an operator asked for that).
    fn lose(
        &self,
        st: &mut State,
        id: u64,
        reason: &str,
        out: &mut Outbox,
    ) -> Result<(), StoreError> {
        let Some(lease) = st.leases.get(&id) else {
            return Ok(());
        };
        let agent_id = lease.agent_id.clone();
        let lost_attempt = lease.attempt;
        let Some(mut rec) = st.open.get(&id).cloned() else {
            st.leases.remove(&id);
            return Ok(());
        };
        if let Some(a) = rec
            .attempts
            .iter_mut()
            .rev()
            .find(|a| a.attempt == lost_attempt)
        {
            a.lost_reason = reason.to_string();
        }
        let finish = rec.cancel_requested || rec.attempt >= rec.max_attempts;
        if finish {
            let (outcome, detail) = if rec.cancel_requested {
                (
                    Outcome::Cancelled,
                    format!("cancelled by an operator ({reason})"),
                )
            } else {
                (
                    Outcome::Error,
                    format!(
                        "infrastructure failure: {} attempt(s) lost, the last because {reason}",
                        rec.attempt
                    ),
                )
            };
            rec.state = JobState::Finished;
            rec.finished_at_ms = now_ms();
            rec.result = Some(JobResult {
                job: Some(rec.job_ref()),
                outcome: outcome.into(),
                detail,
                ..Default::default()
            });
        } else {
            rec.state = JobState::Queued;
        }
        // Durable first: on a write error the lease stays and is retried.
        self.persist(&rec)?;
        tracing::warn!(job = id, attempt = lost_attempt, agent = %agent_id, "attempt lost: {reason}");
        st.leases.remove(&id);
        if let Some(conn) = st.agents.get_mut(&agent_id) {
            conn.running.remove(&id);
        }
        if finish {
            out.finished.push((id, rec.attempt));
            st.open.remove(&id);
        } else {
            st.open.insert(id, rec);
            st.queue.push_front(id);
        }
        Ok(())
    }

    /// Registers a new session for an authenticated agent after its Hello.
    /// Leases it holds and lists in `held` are kept; the others are lost
    /// (the agent restarted without them). Returns the session id.
    #[allow(clippy::too_many_arguments)]
    pub async fn connect(
        &self,
        agent_id: &str,
        token_labels: &[String],
        caps: Capabilities,
        held: &[JobRef],
        draining: bool,
        agent_version: String,
        remote: String,
        tx: AgentTx,
    ) -> Result<u64, DispatchError> {
        let mut out = Outbox::default();
        let session = {
            let mut st = self.lock();
            st.next_session += 1;
            let session = st.next_session;
            let mut labels: HashSet<String> = caps.labels.iter().cloned().collect();
            labels.extend(token_labels.iter().cloned());
            let held: HashSet<(u64, u32)> = held.iter().map(|j| (j.job_id, j.attempt)).collect();
            let mine: Vec<(u64, u32)> = st
                .leases
                .iter()
                .filter(|(_, l)| l.agent_id == agent_id)
                .map(|(id, l)| (*id, l.attempt))
                .collect();
            let deadline = Instant::now() + self.shared.settings.lease_timeout;
            let mut running = HashSet::new();
            for (id, attempt) in mine {
                if held.contains(&(id, attempt)) {
                    running.insert(id);
                    if let Some(l) = st.leases.get_mut(&id) {
                        l.deadline = deadline;
                    }
                } else {
                    self.lose(
                        &mut st,
                        id,
                        "the agent reconnected without it (restarted?)",
                        &mut out,
                    )?;
                }
            }
            if let Some(old) = st.agents.remove(agent_id) {
                let _ = old.tx.send(Box::new(Err(Status::aborted(
                    "this agent connected again from elsewhere; closing the older session",
                ))));
            }
            let max_parallel = caps.max_parallel_jobs.max(1) as usize;
            st.agents.insert(
                agent_id.to_string(),
                Conn {
                    session,
                    tx,
                    caps,
                    labels,
                    max_parallel,
                    running,
                    draining,
                    last_heartbeat: Instant::now(),
                    last_assigned: 0,
                    assigned: 0,
                    agent_version,
                    remote,
                },
            );
            st.last_seen.insert(agent_id.to_string(), now_ms());
            let more = self.schedule(&mut st)?;
            out.messages.extend(more.messages);
            session
        };
        self.deliver(out).await?;
        Ok(session)
    }

    /// The session ended. Its leases stay until they expire: the agent may
    /// reconnect and keep running its jobs.
    pub fn disconnect(&self, agent_id: &str, session: u64) {
        let mut st = self.lock();
        if st
            .agents
            .get(agent_id)
            .is_some_and(|c| c.session == session)
        {
            st.agents.remove(agent_id);
            st.last_seen.insert(agent_id.to_string(), now_ms());
        }
    }

    /// Extends the leases of the jobs the agent says it runs.
    pub async fn heartbeat(&self, agent_id: &str, running: &[JobRef]) -> Result<(), StoreError> {
        let out = {
            let mut st = self.lock();
            let deadline = Instant::now() + self.shared.settings.lease_timeout;
            for j in running {
                if let Some(l) = st.leases.get_mut(&j.job_id)
                    && l.agent_id == agent_id
                    && l.attempt == j.attempt
                {
                    l.deadline = deadline;
                }
            }
            st.last_seen.insert(agent_id.to_string(), now_ms());
            let was_stale = match st.agents.get_mut(agent_id) {
                Some(c) => {
                    let stale =
                        c.last_heartbeat.elapsed() > self.shared.settings.heartbeat_interval * 2;
                    c.last_heartbeat = Instant::now();
                    stale
                }
                None => false,
            };
            if was_stale {
                self.schedule(&mut st)?
            } else {
                Outbox::default()
            }
        };
        if !out.messages.is_empty() {
            self.deliver(out).await?;
        }
        Ok(())
    }

    /// Whether `agent_id` holds the lease for this attempt (log chunks from
    /// anyone else are dropped).
    pub fn holds(&self, agent_id: &str, job: &JobRef) -> bool {
        let st = self.lock();
        st.leases
            .get(&job.job_id)
            .is_some_and(|l| l.agent_id == agent_id && l.attempt == job.attempt)
    }

    /// The agent started a leased job. Recorded without waiting for the disk:
    /// losing it in a crash only makes the job show as leased.
    pub fn started(&self, agent_id: &str, job: &JobRef) -> Result<(), StoreError> {
        let mut st = self.lock();
        let holds = st
            .leases
            .get(&job.job_id)
            .is_some_and(|l| l.agent_id == agent_id && l.attempt == job.attempt);
        if !holds {
            return Ok(());
        }
        if let Some(rec) = st.open.get_mut(&job.job_id) {
            rec.state = JobState::Running;
            let rec = rec.clone();
            self.persist(&rec)?;
        }
        Ok(())
    }

    /// Records an agent's result exactly once. A resend of an already
    /// recorded result is acknowledged again; a result for an attempt the
    /// agent no longer holds is refused.
    pub async fn record_result(
        &self,
        agent_id: &str,
        mut result: JobResult,
    ) -> Result<ResultAck, DispatchError> {
        let job = result.job.unwrap_or_default();
        let (ack, out) = {
            let mut st = self.lock();
            let holds = st
                .leases
                .get(&job.job_id)
                .is_some_and(|l| l.agent_id == agent_id && l.attempt == job.attempt);
            if holds {
                let mut out = Outbox::default();
                if let Some(mut rec) = st.open.get(&job.job_id).cloned() {
                    if result.outcome == Outcome::Unspecified as i32 {
                        result.outcome = Outcome::Error.into();
                        result.detail = format!("agent reported no outcome. {}", result.detail);
                    }
                    let retry = result.outcome == Outcome::Error as i32
                        && !rec.cancel_requested
                        && rec.attempt < rec.max_attempts;
                    if retry {
                        // An infrastructure error (checkout, download, upload,
                        // disk) is the farm's fault, not the project's: try
                        // again, like a lost lease, within max_attempts.
                        if let Some(a) = rec
                            .attempts
                            .iter_mut()
                            .rev()
                            .find(|a| a.attempt == job.attempt)
                        {
                            a.lost_reason =
                                format!("infrastructure error on the agent: {}", result.detail);
                        }
                        rec.state = JobState::Queued;
                        // Durable first: on a write error the job keeps its
                        // lease and the agent resends the result.
                        self.persist(&rec)?;
                        tracing::warn!(
                            job = rec.id,
                            attempt = rec.attempt,
                            agent = agent_id,
                            "infrastructure error, requeued: {}",
                            result.detail
                        );
                        st.open.insert(job.job_id, rec);
                        st.queue.push_front(job.job_id);
                    } else {
                        rec.state = JobState::Finished;
                        rec.finished_at_ms = now_ms();
                        rec.result = Some(result);
                        // Durable first: on a write error the job keeps its lease
                        // and the agent resends the (unacknowledged) result.
                        self.persist(&rec)?;
                        out.finished.push((rec.id, rec.attempt));
                        st.open.remove(&job.job_id);
                    }
                }
                st.leases.remove(&job.job_id);
                *st.completed.entry(agent_id.to_owned()).or_default() += 1;
                if let Some(conn) = st.agents.get_mut(agent_id) {
                    conn.running.remove(&job.job_id);
                }
                let more = self.schedule(&mut st)?;
                out.messages.extend(more.messages);
                (
                    ResultAck {
                        job: Some(job),
                        recorded: true,
                        detail: String::new(),
                    },
                    out,
                )
            } else {
                drop(st);
                let ack = match self.get(job.job_id)? {
                    None => ResultAck {
                        job: Some(job),
                        recorded: false,
                        detail: format!("job {} does not exist on this hub", job.job_id),
                    },
                    Some(rec)
                        if rec.state == JobState::Finished
                            && rec.attempt == job.attempt
                            && rec.agent_id == agent_id
                            // Not an attempt that `lose` ended (its result came too late).
                            && rec.attempts.last().is_some_and(|a| a.lost_reason.is_empty()) =>
                    {
                        ResultAck {
                            job: Some(job),
                            recorded: true,
                            detail: "already recorded".into(),
                        }
                    }
                    Some(rec) => {
                        let why = if rec.attempt > job.attempt {
                            format!(
                                "the job was requeued as attempt {} after this agent's lease on attempt {} was lost",
                                rec.attempt, job.attempt
                            )
                        } else {
                            "this agent does not hold that job".to_string()
                        };
                        tracing::warn!(
                            job = job.job_id,
                            attempt = job.attempt,
                            agent = agent_id,
                            "result refused: {why}"
                        );
                        ResultAck {
                            job: Some(job),
                            recorded: false,
                            detail: format!(
                                "result for job {} attempt {} refused: {why}",
                                job.job_id, job.attempt
                            ),
                        }
                    }
                };
                (ack, Outbox::default())
            }
        };
        self.deliver(out).await?;
        Ok(ack)
    }

    /// Gives up every lease whose deadline passed; `None` when none did.
    fn expire_leases(&self) -> Result<Option<Outbox>, StoreError> {
        let mut st = self.lock();
        let now = Instant::now();
        let expired: Vec<(u64, String)> = st
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, l)| (*id, l.agent_id.clone()))
            .collect();
        let mut out = Outbox::default();
        if expired.is_empty() {
            return Ok(None);
        }
        let timeout = humantime::format_duration(self.shared.settings.lease_timeout);
        for (id, agent) in expired {
            let reason =
                format!("its lease expired: agent {agent} was not heard from for {timeout}");
            self.lose(&mut st, id, &reason, &mut out)?;
        }
        let more = self.schedule(&mut st)?;
        out.messages.extend(more.messages);
        Ok(Some(out))
    }

    /// The agent is draining (SIGTERM or an operator's drain): no new jobs.
    pub fn set_draining(&self, agent_id: &str) {
        if let Some(c) = self.lock().agents.get_mut(agent_id) {
            c.draining = true;
        }
    }

    /// Asks a connected agent to drain.
    pub fn drain(&self, agent_id: &str, grace: Duration) -> Result<(), DispatchError> {
        let mut st = self.lock();
        let conn = st
            .agents
            .get_mut(agent_id)
            .ok_or_else(|| DispatchError::NotConnected(agent_id.to_string()))?;
        conn.draining = true;
        let _ = conn.tx.send(Box::new(Ok(HubMessage {
            msg: Some(hub_message::Msg::Drain(Drain {
                grace_secs: grace.as_secs(),
            })),
        })));
        Ok(())
    }

    /// Cuts a revoked agent off now and requeues its jobs.
    pub async fn revoke(&self, agent_id: &str) -> Result<Vec<u64>, DispatchError> {
        let mut out = Outbox::default();
        let requeued = {
            let mut st = self.lock();
            if let Some(conn) = st.agents.remove(agent_id) {
                let _ = conn.tx.send(Box::new(Err(Status::permission_denied(format!(
                    "agent {agent_id} was revoked by the hub's operator and may not connect again: enroll again with a new enrollment string if the operator agrees"
                )))));
            }
            let mine: Vec<u64> = st
                .leases
                .iter()
                .filter(|(_, l)| l.agent_id == agent_id)
                .map(|(id, _)| *id)
                .collect();
            for id in &mine {
                self.lose(&mut st, *id, "its agent was revoked", &mut out)?;
            }
            let more = self.schedule(&mut st)?;
            out.messages.extend(more.messages);
            mine
        };
        self.deliver(out).await?;
        Ok(requeued)
    }

    /// Cancels a job: a queued one finishes as cancelled at once, a running
    /// one is cancelled on its agent (which reports the result).
    pub async fn cancel(&self, job_id: u64) -> Result<(), DispatchError> {
        let mut out = Outbox::default();
        {
            let mut st = self.lock();
            let Some(rec) = st.open.get_mut(&job_id) else {
                // Not open: finished already, or unknown. (`load`, not `get`:
                // the lock is held.)
                return match self.load(job_id)? {
                    Some(_) => Ok(()),
                    None => Err(DispatchError::NoSuchJob(job_id)),
                };
            };
            rec.cancel_requested = true;
            if rec.state == JobState::Queued {
                rec.state = JobState::Finished;
                rec.finished_at_ms = now_ms();
                rec.result = Some(JobResult {
                    job: Some(rec.job_ref()),
                    outcome: Outcome::Cancelled.into(),
                    detail: "cancelled by an operator before it started".into(),
                    ..Default::default()
                });
                let rec = rec.clone();
                self.persist(&rec)?;
                st.open.remove(&job_id);
                st.queue.retain(|id| *id != job_id);
                out.finished.push((job_id, rec.attempt));
            } else {
                let job = rec.job_ref();
                let rec = rec.clone();
                self.persist(&rec)?;
                if let Some(conn) = st
                    .leases
                    .get(&job_id)
                    .and_then(|l| st.agents.get(&l.agent_id))
                {
                    out.push(
                        &conn.tx,
                        hub_message::Msg::Cancel(Cancel {
                            job: Some(job),
                            reason: "cancelled by an operator".into(),
                        }),
                    );
                }
            }
        }
        self.deliver(out).await?;
        Ok(())
    }

    /// Waits until every change made so far is on disk, so a reader never
    /// shows a result that a crash could still take back.
    pub async fn sync(&self) -> Result<(), StoreError> {
        self.shared.store.commit().await
    }

    /// One job: the live copy if unfinished, else the stored one.
    pub fn get(&self, job_id: u64) -> Result<Option<JobRecord>, StoreError> {
        if let Some(rec) = self.lock().open.get(&job_id) {
            return Ok(Some(rec.clone()));
        }
        self.load(job_id)
    }

    fn load(&self, job_id: u64) -> Result<Option<JobRecord>, StoreError> {
        let s = &self.shared;
        match s.tree.get(job_key(job_id)).map_err(|e| s.store.err(e))? {
            None => Ok(None),
            Some(raw) => serde_json::from_slice(&raw)
                .map(Some)
                .map_err(|e| s.store.corrupt(format!("jobs/j{job_id}"), e)),
        }
    }

    /// Jobs newest first, optionally only those in `state`.
    pub fn list(
        &self,
        state: Option<JobState>,
        limit: usize,
    ) -> Result<Vec<JobRecord>, StoreError> {
        let s = &self.shared;
        let open = self.lock().open.clone();
        let mut out = Vec::new();
        for item in s.tree.scan_prefix([b'j']).rev() {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(|e| s.store.err(e))?;
            let key = String::from_utf8_lossy(&k).into_owned();
            let stored: JobRecord =
                serde_json::from_slice(&v).map_err(|e| s.store.corrupt(key, e))?;
            let rec = open.get(&stored.id).cloned().unwrap_or(stored);
            if state.is_none_or(|want| want == rec.state) {
                out.push(rec);
            }
        }
        Ok(out)
    }

    /// Connected agents by id.
    pub fn connected(&self) -> HashMap<String, ConnectedAgent> {
        let st = self.lock();
        st.agents
            .iter()
            .map(|(id, c)| {
                let mut running: Vec<JobRef> = c
                    .running
                    .iter()
                    .filter_map(|j| {
                        st.leases.get(j).map(|l| JobRef {
                            job_id: *j,
                            attempt: l.attempt,
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
                        labels,
                        running,
                        draining: c.draining,
                        agent_version: c.agent_version.clone(),
                        remote: c.remote.clone(),
                        completed: st.completed.get(id).copied().unwrap_or(0),
                    },
                )
            })
            .collect()
    }

    /// When an agent was last heard from (ms), if since this hub started.
    pub fn last_seen(&self, agent_id: &str) -> Option<u64> {
        self.lock().last_seen.get(agent_id).copied()
    }

    /// Ends every session (hub shutdown): agents reconnect to the next hub.
    pub fn close_sessions(&self) {
        let mut st = self.lock();
        for (_, conn) in st.agents.drain() {
            let _ = conn.tx.send(Box::new(Err(Status::unavailable(
                "the hub is shutting down; reconnect later",
            ))));
        }
    }
}

/// Why revoking an agent failed part-way.
#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    /// Its credential could not be revoked: nothing else was done.
    #[error(transparent)]
    Credential(#[from] crate::auth::credentials::AuthError),
    /// The credential is revoked, but cutting the session off failed.
    #[error("the agent's credential is revoked, but its session could not be ended: {0}")]
    Session(#[from] DispatchError),
}

/// Revokes an agent for good, always in this order: its credential first
/// (durably, so it cannot connect again), then its session (cut off now,
/// its jobs requeued). Returns the requeued jobs. The one way to revoke,
/// for the operator's `agent revoke` and for a pool's stopped instance.
pub async fn revoke_agent(
    credentials: &crate::auth::credentials::Credentials,
    dispatch: &Dispatcher,
    agent_id: &str,
) -> Result<Vec<u64>, RevokeError> {
    credentials.revoke_agent(agent_id).await?;
    Ok(dispatch.revoke(agent_id).await?)
}

/// How often leases are checked for expiry, in milliseconds.
const LEASE_CHECK_INTERVAL_MS: u64 = 250;

/// Requeues jobs whose agents went silent. Stops when the dispatcher is dropped.
async fn reap_leases(shared: std::sync::Weak<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_millis(LEASE_CHECK_INTERVAL_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let d = Dispatcher { shared };
        if d.shared.store.failed() {
            // Nothing can be recorded until the hub restarts (see store.rs).
            continue;
        }
        match d.expire_leases() {
            Ok(None) => {}
            Ok(Some(out)) => {
                if let Err(e) = d.deliver(out).await {
                    tracing::error!("cannot record expired leases: {e}");
                }
            }
            Err(e) => tracing::error!("cannot record expired leases: {e}"),
        }
    }
}

/// The operator's agent list: each enrolled agent's credential joined with
/// its live session (labels, capabilities, running jobs, version, address)
/// when it is connected, sorted by name. The join lives here, beside the
/// sessions it reads; the admin API only passes it on.
pub(crate) fn agent_views(
    credentials: &crate::auth::credentials::Credentials,
    dispatch: &Dispatcher,
) -> Result<Vec<trunkfarm_proto::v1::AgentInfo>, crate::auth::credentials::AuthError> {
    let connected = dispatch.connected();
    let mut agents: Vec<_> = credentials
        .list_agents()?
        .into_iter()
        .map(|a| {
            let live = connected.get(&a.id);
            trunkfarm_proto::v1::AgentInfo {
                last_seen_ms: dispatch.last_seen(&a.id).unwrap_or(0),
                connected: live.is_some(),
                draining: live.is_some_and(|c| c.draining),
                running: live.map(|c| c.running.clone()).unwrap_or_default(),
                capabilities: live.map(|c| c.caps.clone()),
                agent_version: live.map(|c| c.agent_version.clone()).unwrap_or_default(),
                remote_address: live.map(|c| c.remote.clone()).unwrap_or_default(),
                labels: live.map(|c| c.labels.clone()).unwrap_or(a.labels),
                agent_id: a.id,
                name: a.name,
                revoked: a.revoked,
                enrolled_at_ms: a.enrolled_at_ms,
            }
        })
        .collect();
    agents.sort_by(|a, b| a.name.cmp(&b.name).then(a.agent_id.cmp(&b.agent_id)));
    Ok(agents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use trunkfarm_proto::v1::hub_message::Msg;

    type Rx = mpsc::UnboundedReceiver<super::Outgoing>;

    fn settings(lease_ms: u64) -> DispatchSettings {
        DispatchSettings {
            lease_timeout: Duration::from_millis(lease_ms),
            heartbeat_interval: Duration::from_millis(lease_ms / 3),
            max_attempts: 2,
            default_job_timeout: Duration::from_secs(60),
            max_job_timeout: Duration::from_secs(3600),
            space: DataDir::new(&std::env::temp_dir(), 0),
        }
    }

    fn open(dir: &std::path::Path, lease_ms: u64) -> (Store, Dispatcher) {
        let store = Store::open(dir).unwrap();
        let logs = Arc::new(JobLogs::open(&store, 1 << 20).unwrap());
        let d = Dispatcher::open(&store, logs, settings(lease_ms)).unwrap();
        (store, d)
    }

    async fn agent(d: &Dispatcher, id: &str, slots: u32, labels: &[&str], held: &[JobRef]) -> Rx {
        let (tx, rx) = mpsc::unbounded_channel();
        let caps = Capabilities {
            labels: labels.iter().map(|s| s.to_string()).collect(),
            max_parallel_jobs: slots,
            ..Default::default()
        };
        d.connect(
            id,
            &[],
            caps,
            held,
            false,
            "test".into(),
            "local".into(),
            tx,
        )
        .await
        .unwrap();
        rx
    }

    fn spec(labels: &[&str]) -> JobSpec {
        JobSpec {
            commands: vec!["true".into()],
            labels: labels.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn assignments(rx: &mut Rx) -> Vec<JobRef> {
        let mut out = Vec::new();
        while let Ok(msg) = rx.try_recv() {
            if let Ok(HubMessage {
                msg: Some(Msg::Assign(a)),
            }) = *msg
            {
                out.push(a.job.unwrap());
            }
        }
        out
    }

    fn passed(job: JobRef) -> JobResult {
        JobResult {
            job: Some(job),
            outcome: Outcome::Passed.into(),
            exit_code: Some(0),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn an_infrastructure_error_is_retried_within_max_attempts() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, d) = open(dir.path(), 5000);
        let id = d.submit(spec(&[]), 2).await.unwrap();
        let mut rx = agent(&d, "a", 1, &[], &[]).await;
        let error = |job| JobResult {
            job: Some(job),
            outcome: Outcome::Error.into(),
            detail: "checkout failed".into(),
            ..Default::default()
        };
        let first = assignments(&mut rx)[0];
        assert!(d.record_result("a", error(first)).await.unwrap().recorded);
        let rec = d.get(id).unwrap().unwrap();
        assert_eq!(rec.state, JobState::Leased, "requeued and leased again");
        assert!(rec.attempts[0].lost_reason.contains("checkout failed"));
        let second = assignments(&mut rx)[0];
        assert_eq!(second.attempt, 2);
        assert!(d.record_result("a", error(second)).await.unwrap().recorded);
        let rec = d.get(id).unwrap().unwrap();
        assert_eq!(rec.state, JobState::Finished, "max_attempts = 2 used up");
        assert_eq!(rec.result.unwrap().outcome, Outcome::Error as i32);
    }

    #[tokio::test]
    async fn keyed_jobs_exist_once_and_reach_the_inbox_once() {
        let dir = tempfile::tempdir().unwrap();
        let (id, job) = {
            let (_s, d) = open(dir.path(), 5000);
            let (id, new) = d
                .submit_keyed(spec(&[]), 0, "build/x/p/c".into())
                .await
                .unwrap();
            assert!(new);
            let (again, new) = d
                .submit_keyed(spec(&[]), 0, "build/x/p/c".into())
                .await
                .unwrap();
            assert_eq!((again, new), (id, false));
            assert_eq!(d.open_keys("build/"), vec![("build/x/p/c".to_string(), id)]);
            assert!(d.finished_inbox(10).unwrap().is_empty());
            let mut rx = agent(&d, "a", 1, &[], &[]).await;
            let job = assignments(&mut rx)[0];
            let mut result = passed(job);
            result.reports.push(trunkfarm_proto::v1::ReportFile {
                path: "junit.xml".into(),
                data: b"<testsuites/>".to_vec(),
                ..Default::default()
            });
            d.record_result("a", result).await.unwrap();
            (id, job)
        };
        // The inbox marker was written with the result: it survives a restart.
        let store = crate::store::tests::reopen(dir.path()).await;
        let logs = Arc::new(JobLogs::open(&store, 1 << 20).unwrap());
        let d = Dispatcher::open(&store, logs, settings(5000)).unwrap();
        let inbox = d.finished_inbox(10).unwrap();
        assert_eq!(inbox.len(), 1);
        assert_eq!(inbox[0].key, "build/x/p/c");
        assert_eq!(
            inbox[0].result.as_ref().unwrap().reports[0].data,
            b"<testsuites/>"
        );
        assert_eq!(d.keyed("build/x/p/c").unwrap(), Some(id));
        assert_eq!(
            d.submit_keyed(spec(&[]), 0, "build/x/p/c".into())
                .await
                .unwrap(),
            (id, false),
            "a finished keyed job is not submitted again"
        );
        d.ack_finished(&[job.job_id]).unwrap();
        d.sync().await.unwrap();
        assert!(d.finished_inbox(10).unwrap().is_empty());
        // Acknowledged report files leave the record; the result stays.
        let rec = d.get(id).unwrap().unwrap();
        let result = rec.result.unwrap();
        assert_eq!(result.outcome, Outcome::Passed as i32);
        assert!(result.reports[0].data.is_empty());
        // A job submitted by hand never reaches the inbox.
        let plain = d.submit(spec(&[]), 0).await.unwrap();
        let mut rx = agent(&d, "b", 1, &[], &[]).await;
        let job = assignments(&mut rx)[0];
        assert_eq!(job.job_id, plain);
        d.record_result("b", passed(job)).await.unwrap();
        assert!(d.finished_inbox(10).unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_result_is_recorded_once_and_resends_are_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, d) = open(dir.path(), 5000);
        let id = d.submit(spec(&[]), 0).await.unwrap();
        let mut rx = agent(&d, "a", 1, &[], &[]).await;
        let got = assignments(&mut rx);
        assert_eq!(
            got,
            vec![JobRef {
                job_id: id,
                attempt: 1
            }]
        );
        let ack = d.record_result("a", passed(got[0])).await.unwrap();
        assert!(ack.recorded && ack.detail.is_empty());
        let again = d.record_result("a", passed(got[0])).await.unwrap();
        assert!(again.recorded);
        assert_eq!(again.detail, "already recorded");
        let rec = d.get(id).unwrap().unwrap();
        assert_eq!(rec.state, JobState::Finished);
        assert_eq!(rec.attempts.len(), 1);
        // Someone else's claim on the same job is refused.
        let other = d.record_result("b", passed(got[0])).await.unwrap();
        assert!(!other.recorded);
    }

    #[tokio::test]
    async fn work_is_spread_over_agents() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, d) = open(dir.path(), 5000);
        let mut a = agent(&d, "a", 4, &[], &[]).await;
        let mut b = agent(&d, "b", 4, &[], &[]).await;
        for _ in 0..6 {
            d.submit(spec(&[]), 0).await.unwrap();
        }
        let (na, nb) = (assignments(&mut a).len(), assignments(&mut b).len());
        assert_eq!((na, nb), (3, 3));
    }

    #[tokio::test]
    async fn labels_and_slots_are_respected() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, d) = open(dir.path(), 5000);
        let mut plain = agent(&d, "plain", 1, &["linux"], &[]).await;
        let gpu_job = d.submit(spec(&["gpu"]), 0).await.unwrap();
        d.submit(spec(&["linux"]), 0).await.unwrap();
        d.submit(spec(&["linux"]), 0).await.unwrap();
        let got = assignments(&mut plain);
        assert_eq!(got.len(), 1, "one slot, one job");
        assert_ne!(got[0].job_id, gpu_job);
        let mut gpu = agent(&d, "gpu", 1, &["gpu", "linux"], &[]).await;
        assert_eq!(assignments(&mut gpu)[0].job_id, gpu_job);
    }

    #[tokio::test]
    async fn a_silent_agent_loses_its_lease_and_its_late_result_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, d) = open(dir.path(), 300);
        let id = d.submit(spec(&[]), 0).await.unwrap();
        let mut a = agent(&d, "a", 1, &[], &[]).await;
        let first = assignments(&mut a)[0];
        d.set_draining("a"); // keep the retry off agent a
        let mut b = agent(&d, "b", 1, &[], &[]).await;
        tokio::time::sleep(Duration::from_millis(900)).await;
        let second = assignments(&mut b);
        assert_eq!(
            second,
            vec![JobRef {
                job_id: id,
                attempt: 2
            }]
        );
        let late = d.record_result("a", passed(first)).await.unwrap();
        assert!(!late.recorded);
        assert!(
            late.detail.contains("requeued as attempt 2"),
            "{}",
            late.detail
        );
        assert!(
            d.record_result("b", passed(second[0]))
                .await
                .unwrap()
                .recorded
        );
        let rec = d.get(id).unwrap().unwrap();
        assert!(rec.attempts[0].lost_reason.contains("lease expired"));
        assert_eq!(rec.result.unwrap().outcome, Outcome::Passed as i32);
    }

    #[tokio::test]
    async fn attempts_are_bounded_then_the_job_is_an_infrastructure_error() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, d) = open(dir.path(), 200);
        let id = d.submit(spec(&[]), 0).await.unwrap();
        let _a = agent(&d, "a", 1, &[], &[]).await;
        // Never heartbeats: both attempts (max_attempts = 2) expire.
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if d.get(id).unwrap().unwrap().state == JobState::Finished {
                break;
            }
        }
        let rec = d.get(id).unwrap().unwrap();
        assert_eq!(rec.state, JobState::Finished);
        let result = rec.result.unwrap();
        assert_eq!(result.outcome, Outcome::Error as i32);
        assert!(
            result.detail.contains("2 attempt(s) lost"),
            "{}",
            result.detail
        );
    }

    #[tokio::test]
    async fn a_restarted_hub_resumes_queued_and_leased_jobs() {
        let dir = tempfile::tempdir().unwrap();
        let (kept, dropped, queued) = {
            let (_s, d) = open(dir.path(), 5000);
            let mut a = agent(&d, "a", 2, &[], &[]).await;
            let j1 = d.submit(spec(&[]), 0).await.unwrap();
            let j2 = d.submit(spec(&[]), 0).await.unwrap();
            let j3 = d.submit(spec(&[]), 0).await.unwrap();
            assert_eq!(assignments(&mut a).len(), 2);
            (j1, j2, j3)
        };
        let store = crate::store::tests::reopen(dir.path()).await;
        let logs = Arc::new(JobLogs::open(&store, 1 << 20).unwrap());
        let d = Dispatcher::open(&store, logs, settings(5000)).unwrap();
        assert_eq!(d.open_counts(), (1, 2));
        // The agent comes back still holding j1 only: j2 is requeued at once.
        let mut a = agent(
            &d,
            "a",
            2,
            &[],
            &[JobRef {
                job_id: kept,
                attempt: 1,
            }],
        )
        .await;
        let got = assignments(&mut a);
        let ids: Vec<u64> = got.iter().map(|j| j.job_id).collect();
        // One slot is free: the requeued job goes ahead of the queued one.
        assert_eq!(ids, vec![dropped]);
        assert_eq!(d.get(queued).unwrap().unwrap().state, JobState::Queued);
        let rec = d.get(dropped).unwrap().unwrap();
        assert!(
            rec.attempts[0]
                .lost_reason
                .contains("reconnected without it")
        );
        assert!(
            d.record_result(
                "a",
                passed(JobRef {
                    job_id: kept,
                    attempt: 1
                })
            )
            .await
            .unwrap()
            .recorded
        );
    }

    #[tokio::test]
    async fn a_late_result_for_a_lost_last_attempt_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, d) = open(dir.path(), 200);
        let id = d.submit(spec(&[]), 1).await.unwrap();
        let mut a = agent(&d, "a", 1, &[], &[]).await;
        let first = assignments(&mut a)[0];
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if d.get(id).unwrap().unwrap().state == JobState::Finished {
                break;
            }
        }
        let late = d.record_result("a", passed(first)).await.unwrap();
        assert!(!late.recorded, "{late:?}");
        let rec = d.get(id).unwrap().unwrap();
        assert_eq!(rec.result.unwrap().outcome, Outcome::Error as i32);
    }

    #[tokio::test]
    async fn cancelling_a_queued_job_finishes_it() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, d) = open(dir.path(), 5000);
        let id = d.submit(spec(&[]), 0).await.unwrap();
        d.cancel(id).await.unwrap();
        let rec = d.get(id).unwrap().unwrap();
        assert_eq!(rec.result.unwrap().outcome, Outcome::Cancelled as i32);
        let mut a = agent(&d, "a", 1, &[], &[]).await;
        assert!(assignments(&mut a).is_empty());
        assert!(matches!(
            d.cancel(9999).await,
            Err(DispatchError::NoSuchJob(_))
        ));
    }

    #[tokio::test]
    async fn bad_specs_are_refused_with_advice() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, d) = open(dir.path(), 5000);
        let err = d
            .submit(JobSpec::default(), 0)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("no command"), "{err}");
        let mut long = spec(&[]);
        long.timeout_secs = 7200;
        let err = d.submit(long, 0).await.unwrap_err().to_string();
        assert!(err.contains("max_job_timeout"), "{err}");
    }
}
