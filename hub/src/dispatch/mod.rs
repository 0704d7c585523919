//! Dispatch: jobs meet agents. Two halves, tied together here:
//! [`jobs`] (job records and the `jobs` tree, the queue, leases, pipeline
//! keys, the finished inbox) and [`sessions`] (connected agents, matching a
//! job to an agent, the messages sent to them).
//!
//! ```text
//! queued ──lease──► leased ──started──► running ──result──► finished
//!   ▲                  │                   │
//!   └── lease lost (agent silent past its lease, revoked, restarted) ──┘
//!       (attempt + 1; after max_attempts: finished as an infrastructure error)
//! ```
//!
//! Every change is applied under one lock (in memory and to the database), then
//! [`Store::commit`] makes it durable *outside* the lock, and only then is
//! anything sent: an assignment to an agent, an acknowledgement of a result,
//! a job id to a submitter. A crash therefore can only lose changes nobody was
//! told about. Leases' deadlines live in memory: a restarted hub gives every
//! leased job a fresh lease, which the agent confirms by listing the job in
//! its `Hello` (or loses, and the job is requeued at once).

mod jobs;
mod records;
mod sessions;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use trunkfarm_proto::v1::{Cancel, JobRef, JobResult, JobSpec, ResultAck, hub_message};

use jobs::Expiry;
pub(crate) use jobs::{AttemptRecord, JobRecord, JobState, JobTable, Next, Placement};
pub(crate) use records::{JobResultRecord, JobSpecRecord, ReportFileRecord};
/// What a session's channel carries (the in-process tests and `trunkfarm
/// bench growth`'s simulated agent read it).
pub(crate) use sessions::Outgoing;
pub(crate) use sessions::{AgentTx, ConnectedAgent, Hello, JobBudget, pause_words};

use crate::logs::JobLogs;
use crate::repo_credentials::RepoCredentials;
use crate::space::{DataDir, SpaceError};
use crate::store::{Store, StoreError};
use jobs::{Cancelled, OpenJobs, Recorded};
use sessions::{Outbox, Sessions};

/// Settings the dispatcher needs from the hub config.
#[derive(Clone, Debug)]
pub(crate) struct DispatchSettings {
    /// How long an agent may stay silent before its jobs are requeued.
    pub(crate) lease_timeout: Duration,
    /// Agents heartbeat this often; one silent for two intervals gets no new job.
    pub(crate) heartbeat_interval: Duration,
    /// Attempts before a job is finished as an infrastructure error.
    pub(crate) max_attempts: u32,
    /// Timeout given to a job that names none.
    pub(crate) default_job_timeout: Duration,
    /// The longest timeout a job may ask for.
    pub(crate) max_job_timeout: Duration,
    /// How long past its timeout a job may run before the hub ends it.
    pub(crate) timeout_grace: Duration,
    /// The data dir's reserve: new jobs are refused when it is cut into.
    pub(crate) space: DataDir,
    /// The configured repositories' credentials: stripped from stored job
    /// specs, put back into assignments.
    pub(crate) repo_credentials: RepoCredentials,
}

impl DispatchSettings {
    /// The settings `[dispatch]` gives, with the data dir's reserve and the
    /// repositories' credentials.
    pub(crate) fn from_config(
        d: &crate::config::DispatchSection,
        space: DataDir,
        repo_credentials: RepoCredentials,
    ) -> DispatchSettings {
        DispatchSettings {
            lease_timeout: d.lease_timeout,
            heartbeat_interval: d.heartbeat_interval,
            max_attempts: d.max_attempts,
            default_job_timeout: d.default_job_timeout,
            max_job_timeout: d.max_job_timeout,
            timeout_grace: d.timeout_grace,
            space,
            repo_credentials,
        }
    }
}

/// Errors callers turn into gRPC statuses.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DispatchError {
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

/// Everything under the dispatcher's one lock.
struct State {
    jobs: OpenJobs,
    sessions: Sessions,
    /// Per agent id: results it reported that were recorded (any outcome)
    /// since the hub started; in memory, for the agents page.
    jobs_done: HashMap<String, u64>,
}

/// What a change produced, sent and announced once it is durable.
#[derive(Default)]
struct Effects {
    messages: Outbox,
    /// Jobs that finished: (job, its last attempt).
    finished: Vec<(u64, u32)>,
}

/// Where an unfinished job stands, as every page and the CLI say it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// No agent has it yet: why, in words (see [`Sessions::why_waiting`]).
    Queued(String),
    /// An agent was given it and has not said it started.
    Starting,
    /// An agent runs it.
    Running,
}

impl Phase {
    /// The word shown: `queued`, `starting` or `running`.
    pub(crate) fn word(&self) -> &'static str {
        match self {
            Phase::Queued(_) => "queued",
            Phase::Starting => "starting",
            Phase::Running => "running",
        }
    }

    /// Why it waits (empty unless queued).
    pub(crate) fn why(&self) -> &str {
        match self {
            Phase::Queued(why) => why,
            _ => "",
        }
    }
}

/// The dispatcher. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Dispatcher {
    shared: Arc<Shared>,
}

struct Shared {
    table: JobTable,
    logs: Arc<JobLogs>,
    settings: DispatchSettings,
    state: Mutex<State>,
    /// Wakes the pipeline's inbox reader when a job finished.
    finished: Arc<tokio::sync::Notify>,
    /// Jobs finished durably since the hub started (`/metrics`; the
    /// benchmark's clock stops when it reaches the jobs it submitted).
    finished_total: std::sync::atomic::AtomicU64,
    /// Bumped once a change of jobs is durable (the dashboard's live updates).
    changes: crate::changes::Changes,
}

impl Dispatcher {
    /// Loads every unfinished job and starts the lease reaper.
    pub(crate) fn open(
        store: &Store,
        logs: Arc<JobLogs>,
        settings: DispatchSettings,
    ) -> Result<Dispatcher, DispatchError> {
        let table = JobTable::open(store)?;
        let jobs = OpenJobs::load(
            &table,
            Instant::now() + settings.lease_timeout,
            settings.timeout_grace,
        )?;
        let shared = Arc::new(Shared {
            table,
            logs,
            state: Mutex::new(State {
                jobs,
                sessions: Sessions::new(settings.heartbeat_interval),
                jobs_done: HashMap::new(),
            }),
            settings,
            finished: Arc::new(tokio::sync::Notify::new()),
            finished_total: std::sync::atomic::AtomicU64::new(0),
            changes: crate::changes::Changes::default(),
        });
        tokio::spawn(reap_leases(Arc::downgrade(&shared)));
        Ok(Dispatcher { shared })
    }

    /// Lets `budget` (the pools) limit how many jobs an agent is given.
    pub(crate) fn set_job_budget(&self, budget: Arc<dyn JobBudget>) {
        self.lock().sessions.set_budget(budget);
    }

    /// Jobs finished (and durable) since the hub started.
    pub(crate) fn finished_total(&self) -> u64 {
        self.shared
            .finished_total
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Counts of open jobs, for start-up messages and metrics: (queued, leased).
    pub(crate) fn open_counts(&self) -> (usize, usize) {
        self.lock().jobs.counts()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes everything durable, then sends what the change produced.
    async fn deliver(&self, eff: Effects) -> Result<(), StoreError> {
        self.shared.table.store().commit().await?;
        self.shared.changes.bump();
        eff.messages.send();
        if !eff.finished.is_empty() {
            self.shared.finished_total.fetch_add(
                eff.finished.len() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
            self.shared.finished.notify_one();
        }
        for (job, attempts) in eff.finished {
            self.shared.logs.finished(job, attempts);
        }
        Ok(())
    }

    /// Queues a new job; returns its id once it is durable.
    pub(crate) async fn submit(
        &self,
        spec: JobSpec,
        max_attempts: u32,
    ) -> Result<u64, DispatchError> {
        self.submit_keyed(spec, max_attempts, String::new())
            .await
            .map(|(id, _)| id)
    }

    /// Queues a job under a pipeline key, unless a job with that key already
    /// exists: returns its id and whether it is new. Submitting the same key
    /// again (after a crash, a re-poll, a retried hand-off) is a no-op, so
    /// the pipeline can re-derive its jobs from durable state at any time.
    pub(crate) async fn submit_keyed(
        &self,
        spec: JobSpec,
        max_attempts: u32,
        key: String,
    ) -> Result<(u64, bool), DispatchError> {
        self.submit_placed(spec, max_attempts, key, Placement::default())
            .await
    }

    /// [`Dispatcher::submit_keyed`] with a [`Placement`]: the agents the job
    /// must not go to, and whether a trusted one is preferred (re-runs).
    pub(crate) async fn submit_placed(
        &self,
        spec: JobSpec,
        max_attempts: u32,
        key: String,
        placement: Placement,
    ) -> Result<(u64, bool), DispatchError> {
        let s = &self.shared;
        let mut rec = JobRecord::new(
            s.table.store().next_id()?,
            spec,
            max_attempts,
            key,
            &s.settings,
        )?;
        rec.placement = placement;
        let id = rec.id;
        {
            // Under the lock, so two submits of one key cannot both pass the check.
            let _st = self.lock();
            if !rec.key.is_empty()
                && let Some(existing) = s.table.keyed(&rec.key)?
            {
                return Ok((existing, false));
            }
            // Only new work is refused on a full disk (a known key stores nothing).
            s.settings.space.admit("jobs", 0)?;
            let mut batch = crate::store::Batch::default();
            s.table.stage(&rec, &mut batch)?;
            s.table.apply(batch)?;
        }
        if let Err(e) = s.table.store().commit().await {
            s.table.withdraw(&rec);
            return Err(e.into());
        }
        let mut eff = Effects::default();
        {
            let mut st = self.lock();
            st.jobs.add(rec);
            self.schedule(&mut st, &mut eff)?;
        }
        self.deliver(eff).await?;
        Ok((id, true))
    }

    /// Keys of unfinished keyed jobs starting with `prefix`, with their ids.
    pub(crate) fn open_keys(&self, prefix: &str) -> Vec<(String, u64)> {
        self.lock().jobs.keys(prefix)
    }

    /// Queued jobs' labels and how long each has waited (ms), for the
    /// pools deciding whether to start an instance.
    pub(crate) fn queued_labels(&self) -> Vec<(Vec<String>, u64)> {
        self.lock().jobs.queued_labels()
    }

    /// Runtime artifacts that unfinished jobs will download: garbage
    /// collection must keep them.
    pub(crate) fn open_artifacts(&self) -> HashSet<String> {
        self.lock().jobs.artifacts()
    }

    /// Finished keyed jobs the pipeline has not acknowledged yet, oldest
    /// first, at most `limit`.
    #[cfg(test)]
    pub(crate) fn finished_inbox(&self, limit: usize) -> Result<Vec<JobRecord>, StoreError> {
        self.finished_inbox_skipping(limit, &std::collections::HashSet::new())
    }

    /// [`Dispatcher::finished_inbox`] without the jobs in `skip` (the
    /// pipeline's jobs whose log it retries later).
    pub(crate) fn finished_inbox_skipping(
        &self,
        limit: usize,
        skip: &std::collections::HashSet<u64>,
    ) -> Result<Vec<JobRecord>, StoreError> {
        self.shared.table.inbox(limit, skip)
    }

    /// The pipeline took in these finished jobs (durably, on its side):
    /// they leave the inbox, and their report files leave the job record.
    /// Durable once the next [`Store::commit`] returns.
    pub(crate) fn ack_finished(&self, ids: &[u64]) -> Result<(), StoreError> {
        self.shared.table.ack_inbox(ids)
    }

    /// The job logs it stores (the pipeline's intake reads a finished
    /// run's output there: `fail_pattern` / `pass_pattern`).
    pub(crate) fn logs(&self) -> &Arc<JobLogs> {
        &self.shared.logs
    }

    /// Notified whenever a job finished (so the pipeline's inbox may hold
    /// something new).
    pub(crate) fn finished_signal(&self) -> Arc<tokio::sync::Notify> {
        self.shared.finished.clone()
    }

    /// Hands queued jobs, oldest first, to agents with free slots (see
    /// [`Sessions::pick`] for which agent).
    fn schedule(&self, st: &mut State, eff: &mut Effects) -> Result<(), StoreError> {
        let State { jobs, sessions, .. } = st;
        let now = Instant::now();
        let deadline = now + self.shared.settings.lease_timeout;
        // Looked at but no agent takes them: they stay ahead of the rest.
        let mut waiting = Vec::new();
        let result = loop {
            if !sessions.any_available(now) {
                break Ok(());
            }
            let Some(id) = jobs.pop_queued() else {
                break Ok(());
            };
            let Some(rec) = jobs.get(id) else {
                continue;
            };
            let Some((agent_id, trusted)) = sessions.pick(&rec.spec, &rec.placement, now) else {
                sessions.tell_donors(&rec.spec, now, &mut eff.messages);
                waiting.push(id);
                continue;
            };
            match jobs.lease(
                &self.shared.table,
                id,
                &agent_id,
                trusted,
                deadline,
                &self.shared.settings,
            ) {
                Ok(Some(assignment)) => {
                    sessions.assign(&agent_id, id, assignment, &mut eff.messages)
                }
                Ok(None) => {}
                // A failing disk leaves the job queued, the queue in order.
                Err(e) => {
                    waiting.push(id);
                    break Err(e);
                }
            }
        };
        jobs.requeue_front(waiting);
        sessions.tell_backlogs(jobs.queued(), &mut eff.messages);
        result
    }

    /// Ends an attempt without a result (see [`OpenJobs::lose`]).
    fn lose(
        &self,
        st: &mut State,
        id: u64,
        reason: &str,
        eff: &mut Effects,
    ) -> Result<(), StoreError> {
        if let Some(lost) = st.jobs.lose(&self.shared.table, id, reason)? {
            st.sessions.release(&lost.agent_id, id);
            if let Some(attempt) = lost.finished {
                eff.finished.push((id, attempt));
            }
        }
        Ok(())
    }

    /// Registers a new session for an authenticated agent after its Hello.
    /// Leases it holds and lists in `held` are kept; the others are lost
    /// (the agent restarted without them). Returns the session id.
    pub(crate) async fn connect(
        &self,
        agent_id: &str,
        held: &[JobRef],
        hello: Hello,
    ) -> Result<u64, DispatchError> {
        let mut eff = Effects::default();
        let session = {
            let mut st = self.lock();
            let held: HashSet<(u64, u32)> = held.iter().map(|j| (j.job_id, j.attempt)).collect();
            let deadline = Instant::now() + self.shared.settings.lease_timeout;
            let mut running = HashSet::new();
            let mut kept = Vec::new();
            for (id, attempt) in st.jobs.held_by(agent_id) {
                if held.contains(&(id, attempt)) {
                    running.insert(id);
                    kept.push(JobRef {
                        job_id: id,
                        attempt,
                    });
                } else {
                    self.lose(
                        &mut st,
                        id,
                        "the agent reconnected without it (restarted?)",
                        &mut eff,
                    )?;
                }
            }
            st.jobs.extend(agent_id, &kept, deadline);
            let session = st.sessions.open(agent_id, hello, running);
            self.schedule(&mut st, &mut eff)?;
            session
        };
        self.deliver(eff).await?;
        Ok(session)
    }

    /// The session ended. Its leases stay until they expire: the agent may
    /// reconnect and keep running its jobs.
    pub(crate) fn disconnect(&self, agent_id: &str, session: u64) {
        self.lock().sessions.close(agent_id, session);
    }

    /// Extends the leases of the jobs the agent says it runs.
    pub(crate) async fn heartbeat(
        &self,
        agent_id: &str,
        running: &[JobRef],
    ) -> Result<(), StoreError> {
        let mut eff = Effects::default();
        {
            let mut st = self.lock();
            let deadline = Instant::now() + self.shared.settings.lease_timeout;
            st.jobs.extend(agent_id, running, deadline);
            if st.sessions.heard(agent_id) {
                self.schedule(&mut st, &mut eff)?;
            }
        }
        if !eff.messages.is_empty() {
            self.deliver(eff).await?;
        }
        Ok(())
    }

    /// Whether `agent_id` holds the lease for this attempt (log chunks from
    /// anyone else are dropped).
    pub(crate) fn holds(&self, agent_id: &str, job: &JobRef) -> bool {
        self.lock().jobs.holds(agent_id, job)
    }

    /// The agent holding `job` uploaded (and the hub verified) artifact
    /// `sha256` for it: the attempt's build result may name it. Durable
    /// before it returns, so the result that follows can rely on it.
    pub(crate) async fn uploaded(
        &self,
        agent_id: &str,
        job: &JobRef,
        sha256: &str,
    ) -> Result<bool, StoreError> {
        let held = self
            .lock()
            .jobs
            .uploaded(&self.shared.table, agent_id, job, sha256)?;
        self.shared.table.store().commit().await?;
        Ok(held)
    }

    /// The agent started a leased job. Recorded without waiting for the disk:
    /// losing it in a crash only makes the job show as leased.
    pub(crate) fn started(&self, agent_id: &str, job: &JobRef) -> Result<(), StoreError> {
        self.lock()
            .jobs
            .started(&self.shared.table, agent_id, job)?;
        self.shared.changes.bump();
        Ok(())
    }

    /// Bumped whenever jobs changed durably (queued, leased, started,
    /// finished, cancelled) or an agent connected: what the dashboard's
    /// live updates watch.
    pub(crate) fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }

    /// Records an agent's result exactly once. A resend of an already
    /// recorded result is acknowledged again; a result for an attempt the
    /// agent no longer holds is refused.
    pub(crate) async fn record_result(
        &self,
        agent_id: &str,
        result: JobResult,
    ) -> Result<ResultAck, DispatchError> {
        let job = result.job.unwrap_or_default();
        // Taken over as stored; the report files are moved, not copied.
        let result = JobResultRecord::from(result);
        let mut eff = Effects::default();
        let recorded = {
            let mut st = self.lock();
            match st.jobs.record(&self.shared.table, agent_id, result)? {
                Recorded::NotHeld => false,
                Recorded::Released { finished } => {
                    *st.jobs_done.entry(agent_id.to_owned()).or_default() += 1;
                    if let Some(attempt) = finished {
                        eff.finished.push((job.job_id, attempt));
                    }
                    st.sessions.release(agent_id, job.job_id);
                    self.schedule(&mut st, &mut eff)?;
                    true
                }
            }
        };
        let ack = if recorded {
            ResultAck {
                job: Some(job),
                recorded: true,
                detail: String::new(),
            }
        } else {
            jobs::resend_ack(self.get(job.job_id)?, agent_id, job)
        };
        // Also for a resend: "already recorded" only once that is durable.
        self.deliver(eff).await?;
        Ok(ack)
    }

    /// Gives up every lease whose deadline passed; `None` when none did.
    fn expire_leases(&self) -> Result<Option<Effects>, StoreError> {
        self.expire_leases_at(Instant::now())
    }

    /// [`Dispatcher::expire_leases`] as of `now`.
    fn expire_leases_at(&self, now: Instant) -> Result<Option<Effects>, StoreError> {
        let mut st = self.lock();
        let expired = st.jobs.expired(now);
        if expired.is_empty() {
            return Ok(None);
        }
        let mut eff = Effects::default();
        let settings = &self.shared.settings;
        let timeout = humantime::format_duration(settings.lease_timeout);
        for (id, attempt, agent, why) in expired {
            let reason = match why {
                Expiry::Silent => {
                    format!("its lease expired: agent {agent} was not heard from for {timeout}")
                }
                Expiry::Overran => {
                    let limit = st.jobs.get(id).map_or(0, |r| r.spec.timeout_secs);
                    let reason = format!(
                        "the hub ended it: it ran past its timeout ({}) plus dispatch.timeout_grace ({}) on agent {agent}, which had not reported",
                        humantime::format_duration(Duration::from_secs(limit)),
                        humantime::format_duration(settings.timeout_grace),
                    );
                    // The agent is told to stop; whatever it reports later
                    // is refused (it no longer holds the attempt).
                    if let Some(tx) = st.sessions.tx(&agent) {
                        eff.messages.push(
                            tx,
                            hub_message::Msg::Cancel(Cancel {
                                job: Some(JobRef {
                                    job_id: id,
                                    attempt,
                                }),
                                reason: reason.clone(),
                            }),
                        );
                    }
                    reason
                }
            };
            self.lose(&mut st, id, &reason, &mut eff)?;
        }
        self.schedule(&mut st, &mut eff)?;
        Ok(Some(eff))
    }

    /// The agent is draining (SIGTERM or an operator's drain): no new jobs.
    pub(crate) fn set_draining(&self, agent_id: &str) {
        self.lock().sessions.set_draining(agent_id);
    }

    /// The agent's donor paused it (no new job; what it runs finishes or
    /// comes back as a handed-back result) or resumed it (`paused.paused`
    /// false: queued work may go to it now).
    pub(crate) async fn set_paused(
        &self,
        agent_id: &str,
        paused: &trunkfarm_proto::v1::Paused,
    ) -> Result<(), StoreError> {
        let words = sessions::pause_words(paused);
        let mut eff = Effects::default();
        {
            let mut st = self.lock();
            let resumed = words.is_none();
            if st.sessions.set_paused(agent_id, words) && resumed {
                self.schedule(&mut st, &mut eff)?;
            }
        }
        if !eff.messages.is_empty() {
            self.deliver(eff).await?;
        }
        Ok(())
    }

    /// An agent serving several hubs offers this hub `offered` slots from
    /// now on (`Slots`): more may give it queued work now.
    pub(crate) async fn set_offered(&self, agent_id: &str, offered: u32) -> Result<(), StoreError> {
        let mut eff = Effects::default();
        {
            let mut st = self.lock();
            if st.sessions.set_offered(agent_id, offered) {
                self.schedule(&mut st, &mut eff)?;
            }
        }
        if !eff.messages.is_empty() {
            self.deliver(eff).await?;
        }
        Ok(())
    }

    /// Quarantines a connected agent (it keeps its session and its running
    /// jobs but is given no new one) or lifts its quarantine. The durable
    /// mark is its credential's (`auth::credentials`); this is the live
    /// session's copy, set again from the credential at every connect.
    pub(crate) async fn set_quarantined(
        &self,
        agent_id: &str,
        quarantined: bool,
    ) -> Result<(), StoreError> {
        let mut eff = Effects::default();
        {
            let mut st = self.lock();
            st.sessions.set_quarantined(agent_id, quarantined);
            if !quarantined {
                self.schedule(&mut st, &mut eff)?;
            }
        }
        if !eff.messages.is_empty() {
            self.deliver(eff).await?;
        }
        Ok(())
    }

    /// Asks a connected agent to drain.
    pub(crate) fn drain(&self, agent_id: &str, grace: Duration) -> Result<(), DispatchError> {
        self.lock().sessions.drain(agent_id, grace)
    }

    /// Cuts a revoked agent off now and requeues its jobs (see
    /// [`revoke_agent`], which revokes its credential first).
    async fn revoke(&self, agent_id: &str) -> Result<Vec<u64>, DispatchError> {
        let mut eff = Effects::default();
        let requeued = {
            let mut st = self.lock();
            st.sessions.cut_off(agent_id);
            let mine: Vec<u64> = st
                .jobs
                .held_by(agent_id)
                .into_iter()
                .map(|(id, _)| id)
                .collect();
            for id in &mine {
                self.lose(&mut st, *id, "its agent was revoked", &mut eff)?;
            }
            self.schedule(&mut st, &mut eff)?;
            mine
        };
        self.deliver(eff).await?;
        Ok(requeued)
    }

    /// Cancels a job: a queued one finishes as cancelled at once, a running
    /// one is cancelled on its agent (which reports the result).
    pub(crate) async fn cancel(&self, job_id: u64) -> Result<(), DispatchError> {
        let mut eff = Effects::default();
        {
            let mut st = self.lock();
            match st.jobs.cancel(&self.shared.table, job_id)? {
                // Not open: finished already, or unknown.
                None => {
                    return match self.shared.table.load(job_id)? {
                        Some(_) => Ok(()),
                        None => Err(DispatchError::NoSuchJob(job_id)),
                    };
                }
                Some(Cancelled::Finished(attempt)) => {
                    eff.finished.push((job_id, attempt));
                    // One queued job fewer: agents serving several hubs hear it.
                    let State { jobs, sessions, .. } = &mut *st;
                    sessions.tell_backlogs(jobs.queued(), &mut eff.messages);
                }
                Some(Cancelled::Running { job, agent_id }) => {
                    if let Some(tx) = agent_id.and_then(|a| st.sessions.tx(&a)) {
                        eff.messages.push(
                            tx,
                            hub_message::Msg::Cancel(Cancel {
                                job: Some(job),
                                reason: "cancelled by an operator".into(),
                            }),
                        );
                    }
                }
            }
        }
        self.deliver(eff).await?;
        Ok(())
    }

    /// Waits until every change made so far is on disk, so a reader never
    /// shows a result that a crash could still take back.
    pub(crate) async fn sync(&self) -> Result<(), StoreError> {
        self.shared.table.store().commit().await
    }

    /// Finished jobs' records retention may remove (see
    /// [`JobTable::prunable`]), each with its pipeline key.
    pub(crate) fn prunable_jobs(
        &self,
        before_ms: u64,
        kept: &HashSet<u64>,
        still_submittable: &dyn Fn(&str) -> bool,
        from: u64,
        max: usize,
    ) -> Result<(Vec<(u64, String)>, Next), StoreError> {
        self.shared
            .table
            .prunable(before_ms, kept, still_submittable, from, max)
    }

    /// Removes those records with their `k<key>` markers, durably.
    pub(crate) async fn remove_jobs(&self, jobs: &[(u64, String)]) -> Result<(), StoreError> {
        if jobs.is_empty() {
            return Ok(());
        }
        {
            // Under the lock: no submit of one of these keys reads the
            // marker half removed.
            let _st = self.lock();
            self.shared.table.remove_pruned(jobs)?;
        }
        self.shared.table.store().commit().await
    }

    /// The ids of finished keyed jobs the pipeline has not taken in yet.
    pub(crate) fn inbox_ids(&self) -> Result<Vec<u64>, StoreError> {
        self.shared.table.inbox_ids()
    }

    /// Whether every finished job was taken in (cheap, unlike
    /// [`Dispatcher::inbox_ids`] on a long inbox).
    pub(crate) fn inbox_is_empty(&self) -> Result<bool, StoreError> {
        self.shared.table.inbox_is_empty()
    }

    /// One job: the live copy if unfinished, else the stored one.
    pub(crate) fn get(&self, job_id: u64) -> Result<Option<JobRecord>, StoreError> {
        if let Some(rec) = self.lock().jobs.get(job_id) {
            return Ok(Some(rec.clone()));
        }
        self.shared.table.load(job_id)
    }

    /// Why job `job_id` waits, if it is queued (no agent has it yet): in
    /// words, from the connected sessions now (see
    /// [`Sessions::why_waiting`]); never stored. `None` for any other
    /// state or an unknown job.
    pub(crate) fn waiting(&self, job_id: u64) -> Option<String> {
        match self.phase(job_id) {
            Some(Phase::Queued(why)) => Some(why),
            _ => None,
        }
    }

    /// Where unfinished job `job_id` stands (see [`Dispatcher::phases`]).
    pub(crate) fn phase(&self, job_id: u64) -> Option<Phase> {
        self.phases(&[job_id]).pop().flatten()
    }

    /// Where each of these unfinished jobs stands, in the order asked
    /// (`None`: finished or unknown), under one lock: the one word every
    /// page and the CLI use for a job not finished, so a leased job no
    /// agent has started yet reads `starting` everywhere.
    pub(crate) fn phases(&self, job_ids: &[u64]) -> Vec<Option<Phase>> {
        let st = self.lock();
        let now = Instant::now();
        job_ids
            .iter()
            .map(|id| {
                let rec = st.jobs.get(*id)?;
                match rec.state {
                    JobState::Queued => Some(Phase::Queued(st.sessions.why_waiting(
                        &rec.spec,
                        &rec.placement,
                        now,
                    ))),
                    JobState::Leased => Some(Phase::Starting),
                    JobState::Running => Some(Phase::Running),
                    JobState::Finished => None,
                }
            })
            .collect()
    }

    /// Jobs newest first, only those `keep` keeps (the admin API filters
    /// by state and project; the limit counts kept jobs).
    pub(crate) fn list(
        &self,
        keep: impl Fn(&JobRecord) -> bool,
        limit: usize,
    ) -> Result<Vec<JobRecord>, StoreError> {
        let open = self.lock().jobs.records().clone();
        self.shared.table.list(&open, keep, limit)
    }

    /// Per agent id: the results it reported that were recorded (a job
    /// attempt it ran to the end, whatever the outcome) since the hub
    /// started. Agents without one are absent.
    pub(crate) fn jobs_done(&self) -> HashMap<String, u64> {
        self.lock().jobs_done.clone()
    }

    /// Connected agents by id.
    pub(crate) fn connected(&self) -> std::collections::HashMap<String, ConnectedAgent> {
        let st = self.lock();
        st.sessions.connected(|job| st.jobs.leased_attempt(job))
    }

    /// When an agent was last heard from (ms), if since this hub started.
    pub(crate) fn last_seen(&self, agent_id: &str) -> Option<u64> {
        self.lock().sessions.last_seen(agent_id)
    }

    /// Ends every session (hub shutdown): agents reconnect to the next hub.
    pub(crate) fn close_sessions(&self) {
        self.lock().sessions.close_all();
    }
}

/// Why revoking an agent failed part-way.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RevokeError {
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
pub(crate) async fn revoke_agent(
    credentials: &crate::auth::credentials::Credentials,
    dispatch: &Dispatcher,
    agent_id: &str,
) -> Result<Vec<u64>, RevokeError> {
    credentials.revoke_agent(agent_id).await?;
    Ok(dispatch.revoke(agent_id).await?)
}

/// Lifts an agent's quarantine: its credential first (durably), then its
/// live session, which is given jobs again. The operator's `agent release`.
pub(crate) async fn release_agent(
    credentials: &crate::auth::credentials::Credentials,
    dispatch: &Dispatcher,
    agent_id: &str,
) -> Result<(), RevokeError> {
    credentials.release_agent(agent_id).await?;
    dispatch
        .set_quarantined(agent_id, false)
        .await
        .map_err(|e| RevokeError::Session(e.into()))
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
        if d.shared.table.store().failed() {
            // Nothing can be recorded until the hub restarts (see store.rs).
            continue;
        }
        match d.expire_leases() {
            Ok(None) => {}
            Ok(Some(eff)) => {
                if let Err(e) = d.deliver(eff).await {
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
                paused: live.and_then(|c| c.paused.clone()).unwrap_or_default(),
                running: live.map(|c| c.running.clone()).unwrap_or_default(),
                capabilities: live.map(|c| c.caps.clone()),
                agent_version: live.map(|c| c.agent_version.clone()).unwrap_or_default(),
                remote_address: live.map(|c| c.remote.clone()).unwrap_or_default(),
                max_parallel_jobs: live.map_or(a.grant.max_parallel_jobs, |c| c.max_parallel),
                trusted: a.grant.trusted,
                confirmations_agreed: a.verdicts.agreed,
                confirmations_disagreed: a.verdicts.disagreed,
                quarantined: a.verdicts.quarantined.clone(),
                labels: live.map(|c| c.labels.clone()).unwrap_or(a.grant.labels),
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

/// Its donor's limits in words, one each ("4 cores", "8.0 GiB",
/// "jobs up to 30m", "only lua, luajit", "not beta", "Mon-Fri 22:00-07:00
/// (Europe/Berlin)", "when idle: load under 1.0", "cache 10.0 GiB"); empty
/// for an agent not connected (a donor's limits are known from its live
/// session only): one reading for `agent list`, the agents page and its API.
pub(crate) fn donor_limits(caps: &trunkfarm_proto::v1::Capabilities) -> Vec<String> {
    use trunkfarm_proto::settings::{fmt_bytes, fmt_duration};
    let mut words = Vec::new();
    if caps.cores != 0 {
        words.push(match caps.cores {
            1 => "1 core".to_owned(),
            n => format!("{n} cores"),
        });
    }
    if caps.memory_bytes != 0 {
        words.push(fmt_bytes(caps.memory_bytes));
    }
    if caps.max_job_timeout_secs != 0 {
        words.push(format!(
            "jobs up to {}",
            fmt_duration(Duration::from_secs(caps.max_job_timeout_secs))
        ));
    }
    // The agent's own words (project names, its schedule), shown as text:
    // controls removed, capped.
    let said =
        |text: &str| -> String { text.chars().filter(|c| !c.is_control()).take(200).collect() };
    if !caps.allowed_projects.is_empty() {
        words.push(format!("only {}", said(&caps.allowed_projects.join(", "))));
    }
    if !caps.denied_projects.is_empty() {
        words.push(format!("not {}", said(&caps.denied_projects.join(", "))));
    }
    if !caps.schedule.is_empty() {
        words.push(said(&caps.schedule));
    }
    if !caps.only_when_idle.is_empty() {
        words.push(format!("when idle: {}", said(&caps.only_when_idle)));
    }
    if caps.cache_bytes != 0 {
        words.push(format!("cache {}", fmt_bytes(caps.cache_bytes)));
    }
    words
}

/// An agent's status word (`revoked`, `quarantined`, `draining`,
/// `connected` or `offline`) and, when it takes no job now, why in words
/// (empty when it may): one reading for `agent list`, the agents page and
/// its API.
pub(crate) fn availability(a: &trunkfarm_proto::v1::AgentInfo) -> (&'static str, String) {
    if a.revoked {
        ("revoked", "its credential was revoked".into())
    } else if !a.quarantined.is_empty() {
        ("quarantined", format!("quarantined: {}", a.quarantined))
    } else if a.draining {
        (
            "draining",
            "draining: finishing its jobs, then leaving".into(),
        )
    } else if !a.paused.is_empty() {
        ("paused", a.paused.clone())
    } else if a.connected {
        ("connected", String::new())
    } else {
        ("offline", "not connected".into())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::sync::mpsc;
    use trunkfarm_proto::v1::Capabilities;
    use trunkfarm_proto::v1::hub_message::Msg;
    use trunkfarm_proto::v1::{HubMessage, Outcome};

    pub(crate) type Rx = mpsc::UnboundedReceiver<Outgoing>;

    fn settings(lease_ms: u64) -> DispatchSettings {
        DispatchSettings {
            lease_timeout: Duration::from_millis(lease_ms),
            heartbeat_interval: Duration::from_millis(lease_ms / 3),
            max_attempts: 2,
            default_job_timeout: Duration::from_secs(60),
            max_job_timeout: Duration::from_secs(3600),
            timeout_grace: Duration::from_secs(60),
            space: DataDir::new(&std::env::temp_dir(), 0),
            repo_credentials: Default::default(),
        }
    }

    fn open(dir: &std::path::Path, lease_ms: u64) -> (Store, Dispatcher) {
        let store = Store::open(dir).unwrap();
        let logs = Arc::new(JobLogs::open_local(&store, 1 << 20).unwrap());
        let d = Dispatcher::open(&store, logs, settings(lease_ms)).unwrap();
        (store, d)
    }

    /// Connects trusted agent `id` with `slots` and `labels`, holding
    /// `held`; its channel gets what the hub sends it (the pipeline's tests
    /// use it too).
    pub(crate) async fn agent(
        d: &Dispatcher,
        id: &str,
        slots: u32,
        labels: &[&str],
        held: &[JobRef],
    ) -> Rx {
        join(d, id, slots, labels, held, true).await
    }

    /// The display name these tests give agent `id`: its id in capitals,
    /// so words that name an agent show which of the two they use.
    fn name_of(id: &str) -> String {
        id.to_uppercase()
    }

    /// Connects agent `id`, trusted or a volunteer (the pipeline's tests
    /// use it too).
    pub(crate) async fn join(
        d: &Dispatcher,
        id: &str,
        slots: u32,
        labels: &[&str],
        held: &[JobRef],
        trusted: bool,
    ) -> Rx {
        join_as(d, id, &name_of(id), slots, labels, held, trusted).await
    }

    /// [`join`], for an agent whose display name is `name` (an enrolled
    /// one's).
    pub(crate) async fn join_as(
        d: &Dispatcher,
        id: &str,
        name: &str,
        slots: u32,
        labels: &[&str],
        held: &[JobRef],
        trusted: bool,
    ) -> Rx {
        let (tx, rx) = mpsc::unbounded_channel();
        let labels: Vec<String> = labels.iter().map(|s| s.to_string()).collect();
        let hello = Hello {
            name: name.to_owned(),
            caps: Capabilities {
                labels: labels.clone(),
                max_parallel_jobs: slots,
                ..Default::default()
            },
            labels: labels.into_iter().collect(),
            trusted,
            quarantined: false,
            max_parallel: slots,
            draining: false,
            paused: None,
            offered: None,
            agent_version: "test".into(),
            remote: "local".into(),
            tx,
        };
        d.connect(id, held, hello).await.unwrap();
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

    /// A passed result for `job`.
    pub(crate) fn passed(job: JobRef) -> JobResult {
        JobResult {
            job: Some(job),
            outcome: Outcome::Passed.into(),
            exit_code: Some(0),
            ..Default::default()
        }
    }

    /// The spec of the first job assigned on `rx`.
    fn assigned_spec(rx: &mut Rx) -> JobSpec {
        std::iter::from_fn(|| rx.try_recv().ok())
            .find_map(|msg| match *msg {
                Ok(HubMessage {
                    msg: Some(Msg::Assign(a)),
                }) => a.spec,
                _ => None,
            })
            .expect("the job is assigned")
    }

    #[tokio::test]
    async fn configured_repository_credentials_reach_the_agent_but_not_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let full = "https://ci:pw-Secret9@git.example.org/rt.git";
        let store = Store::open(dir.path()).unwrap();
        let logs = Arc::new(JobLogs::open_local(&store, 1 << 20).unwrap());
        let d = Dispatcher::open(
            &store,
            logs,
            DispatchSettings {
                repo_credentials: RepoCredentials::from_urls([full]),
                ..settings(5000)
            },
        )
        .unwrap();
        let mut with_repo = spec(&[]);
        with_repo.repository = Some(trunkfarm_proto::v1::Repository {
            url: full.into(),
            rev: "main".into(),
        });
        let id = d.submit(with_repo, 1).await.unwrap();
        let stored = d.get(id).unwrap().unwrap();
        assert_eq!(
            stored.spec.repository.unwrap().url,
            "https://git.example.org/rt.git"
        );
        store.commit().await.unwrap();
        let mut bytes = Vec::new();
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                bytes.extend(std::fs::read(&path).unwrap());
            }
        }
        assert!(
            !String::from_utf8_lossy(&bytes).contains("pw-Secret9"),
            "the database holds the password"
        );

        let mut rx = agent(&d, "a", 1, &[], &[]).await;
        let sent = assigned_spec(&mut rx);
        assert_eq!(sent.repository.unwrap().url, full);

        // A volunteer's copy has none.
        let mut other = spec(&["volunteer-only"]);
        other.repository = Some(trunkfarm_proto::v1::Repository {
            url: full.into(),
            rev: "main".into(),
        });
        d.submit(other, 1).await.unwrap();
        let mut rx = join(&d, "v", 1, &["volunteer-only"], &[], false).await;
        let sent = assigned_spec(&mut rx);
        assert_eq!(
            sent.repository.unwrap().url,
            "https://git.example.org/rt.git",
            "a volunteer was sent the operator's credentials"
        );
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
        let logs = Arc::new(JobLogs::open_local(&store, 1 << 20).unwrap());
        let d = Dispatcher::open(&store, logs, settings(5000)).unwrap();
        let inbox = d.finished_inbox(10).unwrap();
        assert_eq!(inbox.len(), 1);
        assert!(!d.inbox_is_empty().unwrap());
        assert_eq!(inbox[0].key, "build/x/p/c");
        assert_eq!(
            inbox[0].result.as_ref().unwrap().reports[0].data,
            b"<testsuites/>"
        );
        assert_eq!(d.shared.table.keyed("build/x/p/c").unwrap(), Some(id));
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
        assert!(d.inbox_is_empty().unwrap());
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
    async fn a_placed_job_skips_excluded_agents_and_prefers_trusted_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, d) = open(dir.path(), 5000);
        let mut checked = join(&d, "checked", 4, &["linux"], &[], false).await;
        let mut other = join(&d, "other", 4, &["linux"], &[], false).await;
        let placement = Placement {
            exclude_agents: vec!["checked".into()],
            prefer_trusted: true,
            ..Default::default()
        };
        let submit =
            |key: &str| d.submit_placed(spec(&["linux"]), 0, key.to_string(), placement.clone());
        // Both volunteers free: never the excluded one.
        let (first, _) = submit("k1").await.unwrap();
        assert!(assignments(&mut checked).is_empty());
        assert_eq!(assignments(&mut other)[0].job_id, first);
        let rec = d.get(first).unwrap().unwrap();
        assert_eq!(rec.placement, placement, "stored with the job");
        assert!(!rec.attempts[0].trusted, "leased to a volunteer");
        // A busier trusted agent is preferred to an idle volunteer.
        let mut trusted = agent(&d, "trusted", 4, &["linux"], &[]).await;
        let build = JobSpec {
            trusted_only: true,
            ..spec(&["linux"])
        };
        d.submit(build, 0).await.unwrap();
        assert_eq!(assignments(&mut trusted).len(), 1);
        let (second, _) = submit("k2").await.unwrap();
        assert_eq!(assignments(&mut trusted)[0].job_id, second);
        assert!(assignments(&mut other).is_empty());
        assert!(d.get(second).unwrap().unwrap().attempts[0].trusted);
        // With only the excluded agent left, it waits.
        d.set_quarantined("trusted", true).await.unwrap();
        d.set_quarantined("other", true).await.unwrap();
        let (third, _) = submit("k3").await.unwrap();
        assert!(assignments(&mut checked).is_empty());
        assert_eq!(d.get(third).unwrap().unwrap().state, JobState::Queued);
        d.set_quarantined("other", false).await.unwrap();
        assert_eq!(assignments(&mut other)[0].job_id, third);
    }

    #[tokio::test]
    async fn a_placed_job_goes_to_an_avoided_agent_only_when_no_other_takes_it() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, d) = open(dir.path(), 5000);
        let mut original = agent(&d, "original", 4, &["linux"], &[]).await;
        let mut other = join(&d, "other", 4, &["linux"], &[], false).await;
        let placement = Placement {
            prefer_trusted: true,
            avoid_agents: vec!["original".into()],
            ..Default::default()
        };
        let submit =
            |key: &str| d.submit_placed(spec(&["linux"]), 0, key.to_string(), placement.clone());
        // Another agent (even a volunteer) before the avoided trusted one.
        let (first, _) = submit("k1").await.unwrap();
        assert!(assignments(&mut original).is_empty());
        assert_eq!(assignments(&mut other)[0].job_id, first);
        // No other agent takes it now: the avoided one does.
        d.set_quarantined("other", true).await.unwrap();
        let (second, _) = submit("k2").await.unwrap();
        assert_eq!(assignments(&mut original)[0].job_id, second);
    }

    #[tokio::test]
    async fn a_job_placed_ahead_is_handed_out_before_ordinary_work_also_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let ahead = Placement {
            ahead: true,
            ..Default::default()
        };
        let submitted = {
            let (_s, d) = open(dir.path(), 5000);
            let mut ids = Vec::new();
            ids.push(d.submit(spec(&["linux"]), 0).await.unwrap());
            ids.push(d.submit(spec(&["linux"]), 0).await.unwrap());
            for key in ["b1", "b2"] {
                let placed = d.submit_placed(spec(&["linux"]), 0, key.into(), ahead.clone());
                ids.push(placed.await.unwrap().0);
            }
            ids.push(d.submit(spec(&["linux"]), 0).await.unwrap());
            // Nobody took them yet: queued in this order.
            let mut a = agent(&d, "a", 5, &["linux"], &[]).await;
            let got: Vec<u64> = assignments(&mut a).iter().map(|j| j.job_id).collect();
            assert_eq!(got, [ids[2], ids[3], ids[0], ids[1], ids[4]]);
            assert!(d.get(ids[2]).unwrap().unwrap().placement.ahead, "stored");
            ids
        };
        // Fresh database, same submissions, read back by a restarted hub.
        let dir2 = tempfile::tempdir().unwrap();
        {
            let (_s, d) = open(dir2.path(), 5000);
            for (i, _) in submitted.iter().enumerate() {
                if i == 2 || i == 3 {
                    let placed =
                        d.submit_placed(spec(&["linux"]), 0, format!("b{i}"), ahead.clone());
                    placed.await.unwrap();
                } else {
                    d.submit(spec(&["linux"]), 0).await.unwrap();
                }
            }
        }
        let store = crate::store::tests::reopen(dir2.path()).await;
        let logs = Arc::new(JobLogs::open_local(&store, 1 << 20).unwrap());
        let d = Dispatcher::open(&store, logs, settings(5000)).unwrap();
        let mut a = agent(&d, "a", 5, &["linux"], &[]).await;
        let got = assignments(&mut a);
        let keys: Vec<String> = got
            .iter()
            .map(|j| d.get(j.job_id).unwrap().unwrap().key)
            .collect();
        assert_eq!(
            keys,
            ["b2", "b3", "", "", ""],
            "ahead ones first after a restart"
        );
    }

    #[tokio::test]
    async fn a_session_opened_with_a_stale_credential_stays_quarantined() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, d) = open(dir.path(), 5000);
        let mut first = join(&d, "liar", 2, &["linux"], &[], false).await;
        d.set_quarantined("liar", true).await.unwrap();
        // A second stream read the credential before the quarantine was
        // stored and says Hello only now: it takes the session over.
        let mut second = join(&d, "liar", 2, &["linux"], &[], false).await;
        d.submit(spec(&["linux"]), 0).await.unwrap();
        assert!(
            assignments(&mut second).is_empty(),
            "a quarantined agent got a job"
        );
        assert!(assignments(&mut first).is_empty());
        // Released, the same session gets work.
        d.set_quarantined("liar", false).await.unwrap();
        assert_eq!(assignments(&mut second).len(), 1);
    }

    #[tokio::test]
    async fn a_volunteer_gets_no_trusted_only_job() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, d) = open(dir.path(), 5000);
        let build = d
            .submit(
                JobSpec {
                    trusted_only: true,
                    ..spec(&["linux"])
                },
                0,
            )
            .await
            .unwrap();
        let test = d.submit(spec(&["linux"]), 0).await.unwrap();
        let mut volunteer = join(&d, "v", 4, &["linux"], &[], false).await;
        let got: Vec<u64> = assignments(&mut volunteer)
            .iter()
            .map(|j| j.job_id)
            .collect();
        assert_eq!(got, [test], "the volunteer takes the test job only");
        let mut trusted = agent(&d, "t", 4, &["linux"], &[]).await;
        assert_eq!(assignments(&mut trusted)[0].job_id, build);
    }

    #[tokio::test]
    async fn an_agent_without_a_sandbox_gets_no_job() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, d) = open(dir.path(), 5000);
        let id = d.submit(spec(&[]), 0).await.unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let hello = Hello {
            name: name_of("bare"),
            caps: Capabilities {
                max_parallel_jobs: 1,
                sandbox: "unavailable".into(),
                ..Default::default()
            },
            labels: HashSet::new(),
            trusted: true,
            quarantined: false,
            max_parallel: 1,
            draining: false,
            paused: None,
            offered: None,
            agent_version: "test".into(),
            remote: "local".into(),
            tx,
        };
        d.connect("bare", &[], hello).await.unwrap();
        assert!(assignments(&mut rx).is_empty(), "it would only refuse it");
        let mut sandboxed = agent(&d, "boxed", 1, &[], &[]).await;
        assert_eq!(assignments(&mut sandboxed)[0].job_id, id);
    }

    #[tokio::test]
    async fn a_build_counts_only_with_the_artifact_its_attempt_uploaded() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, d) = open(dir.path(), 5000);
        let build = || JobSpec {
            upload_prefix: "prefix".into(),
            ..spec(&[])
        };
        let good = "a".repeat(64);
        let with_artifact = |job, sha: &str| JobResult {
            artifact_sha256: sha.into(),
            ..passed(job)
        };
        let id = d.submit(build(), 3).await.unwrap();
        let mut a = agent(&d, "a", 1, &[], &[]).await;
        // 1: a passed build naming an artifact it never uploaded.
        let first = assignments(&mut a)[0];
        assert!(
            d.record_result("a", with_artifact(first, &good))
                .await
                .unwrap()
                .recorded
        );
        // 2: it uploaded one artifact and names another.
        let second = assignments(&mut a)[0];
        assert_eq!(
            second.attempt, 2,
            "the unproven result was an error, retried"
        );
        assert!(d.uploaded("a", &second, &"b".repeat(64)).await.unwrap());
        assert!(
            d.record_result("a", with_artifact(second, &good))
                .await
                .unwrap()
                .recorded
        );
        // 3: the artifact it uploaded.
        let third = assignments(&mut a)[0];
        assert!(d.uploaded("a", &third, &good).await.unwrap());
        assert!(
            d.record_result("a", with_artifact(third, &good))
                .await
                .unwrap()
                .recorded
        );
        let rec = d.get(id).unwrap().unwrap();
        assert!(
            rec.attempts[0].lost_reason.contains("uploaded none"),
            "{:?}",
            rec.attempts
        );
        assert!(
            rec.attempts[1]
                .lost_reason
                .contains(&format!("uploaded {}", "b".repeat(64))),
            "{:?}",
            rec.attempts
        );
        let result = rec.result.unwrap();
        assert_eq!(result.outcome, Outcome::Passed as i32);
        assert_eq!(result.artifact_sha256, good);
        // Only the holder of an attempt can prove an upload for it.
        assert!(!d.uploaded("b", &third, &good).await.unwrap());
    }

    #[tokio::test]
    async fn the_hub_ends_a_job_past_its_timeout_whatever_its_agent_says() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, d) = open(dir.path(), 120_000);
        let id = d
            .submit(
                JobSpec {
                    timeout_secs: 10,
                    ..spec(&[])
                },
                0,
            )
            .await
            .unwrap();
        let mut a = agent(&d, "a", 1, &[], &[]).await;
        let first = assignments(&mut a)[0];
        d.set_draining("a");
        let mut b = agent(&d, "b", 1, &[], &[]).await;
        // It heartbeats, but heartbeats do not move the job's end.
        d.heartbeat("a", &[first]).await.unwrap();
        let now = Instant::now();
        assert!(
            d.expire_leases_at(now + Duration::from_secs(30))
                .unwrap()
                .is_none()
        );
        let eff = d
            .expire_leases_at(now + Duration::from_secs(71))
            .unwrap()
            .expect("10s timeout + 60s grace have passed");
        d.deliver(eff).await.unwrap();
        let mut cancelled = Vec::new();
        while let Ok(msg) = a.try_recv() {
            if let Ok(HubMessage {
                msg: Some(Msg::Cancel(c)),
            }) = *msg
            {
                cancelled.push(c);
            }
        }
        assert_eq!(cancelled.len(), 1, "the agent is told to stop");
        assert_eq!(cancelled[0].job, Some(first));
        assert_eq!(assignments(&mut b)[0].attempt, 2, "requeued elsewhere");
        let late = d.record_result("a", passed(first)).await.unwrap();
        assert!(!late.recorded, "its late word is refused");
        let rec = d.get(id).unwrap().unwrap();
        assert!(
            rec.attempts[0]
                .lost_reason
                .contains("ran past its timeout (10s)"),
            "{:?}",
            rec.attempts
        );
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
        let logs = Arc::new(JobLogs::open_local(&store, 1 << 20).unwrap());
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

    /// Two records exactly as the release before the split wrote them
    /// (raw keys and JSON bytes): a finished keyed job in the inbox and a
    /// queued keyed one.
    const OLD_FINISHED: &str = r#"{"id":7,"spec":{"commands":["make test"],"env":{},"labels":["linux"],"project":"","repository":null,"timeout_secs":60,"artifact_sha256":"","upload_prefix":"","report_paths":[]},"max_attempts":3,"created_at_ms":1700000000000,"state":"finished","attempt":1,"agent_id":"ag_1","attempts":[{"attempt":1,"agent_id":"ag_1","leased_at_ms":1700000000100,"lost_reason":""}],"result":{"job":{"job_id":7,"attempt":1},"outcome":1,"exit_code":0,"detail":"","duration_ms":0,"log_bytes_cut":0,"started_at_ms":0,"last_log_seq":0,"artifact_sha256":"","reports":[]},"finished_at_ms":1700000000200,"cancel_requested":false,"key":"build/lua/linux-x86_64/abc"}"#;
    const OLD_QUEUED: &str = r#"{"id":8,"spec":{"commands":["make test"],"env":{},"labels":["linux"],"project":"","repository":null,"timeout_secs":60,"artifact_sha256":"","upload_prefix":"","report_paths":[]},"max_attempts":3,"created_at_ms":1700000000000,"state":"queued","attempt":0,"agent_id":"","attempts":[],"result":null,"finished_at_ms":0,"cancel_requested":false,"key":"test/p/lua/linux-x86_64/abc/def/7"}"#;

    fn old_key(prefix: u8, id: u64) -> Vec<u8> {
        let mut k = vec![prefix];
        k.extend_from_slice(&id.to_be_bytes());
        k
    }

    #[tokio::test]
    async fn a_jobs_tree_written_by_the_previous_release_reads_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let raw = store.table(crate::store::trees::JOBS);
        raw.put_raw(old_key(b'j', 7), OLD_FINISHED.as_bytes())
            .unwrap();
        raw.put_raw(old_key(b'f', 7), &[][..]).unwrap();
        raw.put_raw(b"kbuild/lua/linux-x86_64/abc", &7u64.to_be_bytes()[..])
            .unwrap();
        raw.put_raw(old_key(b'j', 8), OLD_QUEUED.as_bytes())
            .unwrap();
        raw.put_raw(old_key(b'o', 8), &[][..]).unwrap();
        raw.put_raw(
            b"ktest/p/lua/linux-x86_64/abc/def/7",
            &8u64.to_be_bytes()[..],
        )
        .unwrap();
        let logs = Arc::new(JobLogs::open_local(&store, 1 << 20).unwrap());
        let d = Dispatcher::open(&store, logs, settings(5000)).unwrap();
        assert_eq!(d.open_counts(), (1, 0));
        let queued = d.get(8).unwrap().unwrap();
        assert_eq!(queued.state, JobState::Queued);
        assert_eq!(queued.spec.commands, ["make test"]);
        assert_eq!(
            d.open_keys("test/"),
            [("test/p/lua/linux-x86_64/abc/def/7".to_string(), 8)]
        );
        let inbox = d.finished_inbox(10).unwrap();
        assert_eq!(inbox.len(), 1);
        assert_eq!(inbox[0].attempts[0].agent_id, "ag_1");
        assert_eq!(
            inbox[0].result.as_ref().unwrap().outcome,
            Outcome::Passed as i32
        );
        assert_eq!(
            d.submit_keyed(spec(&[]), 0, "build/lua/linux-x86_64/abc".into())
                .await
                .unwrap(),
            (7, false)
        );
        // Written again, a record has the bytes it had.
        let mut batch = crate::store::Batch::default();
        d.shared.table.stage(&inbox[0], &mut batch).unwrap();
        d.shared.table.apply(batch).unwrap();
        assert_eq!(
            raw.get_raw(old_key(b'j', 7)).unwrap().unwrap().as_ref(),
            OLD_FINISHED.as_bytes()
        );
        // An unreadable record is named by tree and id.
        raw.put_raw(old_key(b'j', 9), &b"{broken"[..]).unwrap();
        let err = d.get(9).unwrap_err().to_string();
        assert!(err.contains("record jobs/j9 is unreadable"), "{err}");
    }

    /// A finished job with every stored field set (a repository, env, a
    /// lost attempt, no exit code, report files with and without data)
    /// exactly as the proto-derived types wrote it, before the job record
    /// had types of its own.
    const OLD_EVERY_FIELD: &str = r#"{"id":12,"spec":{"commands":["make","make check"],"env":{"LANG":"C"},"labels":["linux-x86_64"],"project":"textkit","repository":{"url":"https://example.org/t.git","rev":"def"},"timeout_secs":600,"artifact_sha256":"abababababababababababababababababababababababababababababababab","upload_prefix":"","report_paths":["junit.xml","missing.xml"]},"max_attempts":2,"created_at_ms":1700000000000,"state":"finished","attempt":2,"agent_id":"ag_2","attempts":[{"attempt":1,"agent_id":"ag_1","leased_at_ms":1700000000100,"lost_reason":"its lease expired"},{"attempt":2,"agent_id":"ag_2","leased_at_ms":1700000000300,"lost_reason":""}],"result":{"job":{"job_id":12,"attempt":2},"outcome":2,"exit_code":null,"detail":"exit 1","duration_ms":1234,"log_bytes_cut":5,"started_at_ms":1700000000400,"last_log_seq":9,"artifact_sha256":"","reports":[{"path":"junit.xml","data":"PHRlc3RzdWl0ZSBuYW1lPSJzIi8+","truncated":true,"error":""},{"path":"missing.xml","data":"","truncated":false,"error":"not found"}]},"finished_at_ms":1700000002000,"cancel_requested":true,"key":"test/textkit/tiny/linux-x86_64/abc/def/7"}"#;

    #[tokio::test]
    async fn a_record_with_every_field_set_reads_and_writes_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let raw = store.table(crate::store::trees::JOBS);
        raw.put_raw(old_key(b'j', 12), OLD_EVERY_FIELD.as_bytes())
            .unwrap();
        let table = JobTable::open(&store).unwrap();
        let rec = table.load(12).unwrap().unwrap();
        let mut batch = crate::store::Batch::default();
        table.stage(&rec, &mut batch).unwrap();
        table.apply(batch).unwrap();
        let written = raw.get_raw(old_key(b'j', 12)).unwrap().unwrap();
        assert_eq!(std::str::from_utf8(&written).unwrap(), OLD_EVERY_FIELD);
        // What an agent is sent and the admin API shows carries every field
        // to its own place on the wire, and comes back as it was.
        let spec = JobSpec::from(rec.spec.clone());
        let repo = spec.repository.clone().unwrap();
        assert_eq!(
            (repo.url.as_str(), repo.rev.as_str()),
            ("https://example.org/t.git", "def")
        );
        assert_eq!(spec.commands, ["make", "make check"]);
        assert_eq!(spec.env["LANG"], "C");
        assert_eq!((spec.labels.len(), spec.project.as_str()), (1, "textkit"));
        assert_eq!(spec.timeout_secs, 600);
        assert_eq!(spec.artifact_sha256, "ab".repeat(32));
        assert_eq!(spec.report_paths, ["junit.xml", "missing.xml"]);
        assert_eq!(JobSpecRecord::from(spec), rec.spec);
        let result = rec.result.clone().unwrap();
        let wire = JobResult::from(result.clone());
        assert_eq!(
            wire.job,
            Some(JobRef {
                job_id: 12,
                attempt: 2
            })
        );
        assert_eq!(
            (wire.outcome, wire.exit_code, wire.detail.as_str()),
            (Outcome::Failed as i32, None, "exit 1")
        );
        assert_eq!(
            (
                wire.duration_ms,
                wire.log_bytes_cut,
                wire.started_at_ms,
                wire.last_log_seq
            ),
            (1234, 5, 1_700_000_000_400, 9)
        );
        let (junit, missing) = (&wire.reports[0], &wire.reports[1]);
        assert_eq!(junit.path, "junit.xml");
        assert_eq!(junit.data, br#"<testsuite name="s"/>"#);
        assert!(junit.truncated && junit.error.is_empty());
        assert_eq!(
            (missing.error.as_str(), missing.truncated),
            ("not found", false)
        );
        assert_eq!(JobResultRecord::from(wire), result);
    }

    /// Gives agents carrying `pool-x` a budget of `jobs`.
    struct Budget(u64);

    impl JobBudget for Budget {
        fn jobs_for(&self, labels: &HashSet<String>) -> Option<u64> {
            labels.contains("pool-x").then_some(self.0)
        }
    }

    #[tokio::test]
    async fn an_agent_with_a_job_budget_drains_after_its_last_job() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, d) = open(dir.path(), 5000);
        d.set_job_budget(Arc::new(Budget(2)));
        let ids: Vec<u64> = submit_many(&d, 3).await;
        let mut a = agent(&d, "a", 1, &["pool-x"], &[]).await;
        let mut served = Vec::new();
        for _ in 0..3 {
            let got = assignments(&mut a);
            let Some(job) = got.first().copied() else {
                break;
            };
            served.push(job.job_id);
            d.record_result("a", passed(job)).await.unwrap();
        }
        assert_eq!(served, ids[..2], "two jobs, then no more");
        let seen = &d.connected()["a"];
        assert!(seen.draining);
        assert_eq!(seen.jobs_left, Some(0));
        // Reconnecting does not renew the budget while the hub runs.
        let mut a = agent(&d, "a", 1, &["pool-x"], &[]).await;
        assert!(assignments(&mut a).is_empty());
        assert!(d.connected()["a"].draining);
        // An agent without a budget takes the rest.
        let mut b = agent(&d, "b", 1, &[], &[]).await;
        assert_eq!(assignments(&mut b)[0].job_id, ids[2]);
        assert_eq!(d.connected()["b"].jobs_left, None);
    }

    async fn submit_many(d: &Dispatcher, n: usize) -> Vec<u64> {
        let mut ids = Vec::new();
        for _ in 0..n {
            ids.push(d.submit(spec(&[]), 0).await.unwrap());
        }
        ids
    }

    /// Connects agent `id` (labels `linux`, one slot) whose donor set `caps`
    /// (`allowed_projects`, `max_job_timeout_secs`).
    async fn donor(d: &Dispatcher, id: &str, caps: Capabilities, trusted: bool) -> Rx {
        let (tx, rx) = mpsc::unbounded_channel();
        let hello = Hello {
            name: name_of(id),
            caps: Capabilities {
                labels: vec!["linux".into()],
                max_parallel_jobs: 1,
                ..caps
            },
            labels: HashSet::from(["linux".to_owned()]),
            trusted,
            quarantined: false,
            max_parallel: 1,
            draining: false,
            paused: None,
            offered: None,
            agent_version: "test".into(),
            remote: "local".into(),
            tx,
        };
        d.connect(id, &[], hello).await.unwrap();
        rx
    }

    fn waiting(d: &Dispatcher, id: u64) -> String {
        d.waiting(id).expect("the job is queued")
    }

    #[tokio::test]
    async fn phases_say_queued_with_why_starting_then_running_in_the_order_asked() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, d) = open(dir.path(), 5000);
        let mut rx = agent(&d, "a", 1, &["linux"], &[]).await;
        let leased = d.submit(spec(&["linux"]), 0).await.unwrap();
        let queued = d.submit(spec(&["linux"]), 0).await.unwrap();
        let job = assignments(&mut rx)
            .pop()
            .expect("the first job is given to `a`");
        assert_eq!(job.job_id, leased);
        let waits = d.waiting(queued).expect("queued");
        assert_eq!(
            d.phases(&[queued, leased, 999]),
            [Some(Phase::Queued(waits)), Some(Phase::Starting), None]
        );
        assert_eq!(d.waiting(leased), None);
        d.started("a", &job).unwrap();
        assert_eq!(d.phase(leased), Some(Phase::Running));
        assert_eq!(d.phase(leased).map(|p| p.word()), Some("running"));
    }

    #[tokio::test]
    async fn a_job_waiting_without_agents_says_none_is_connected() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, d) = open(dir.path(), 5000);
        let id = d.submit(spec(&["linux"]), 0).await.unwrap();
        assert_eq!(waiting(&d, id), "no agent connected");
    }

    #[tokio::test]
    async fn a_job_waiting_for_a_label_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, d) = open(dir.path(), 5000);
        let _a = agent(&d, "a", 1, &["linux"], &[]).await;
        let id = d.submit(spec(&["linux", "gpu"]), 0).await.unwrap();
        assert_eq!(waiting(&d, id), "no connected agent has label `gpu`");
        // An agent with the label but another one's missing: said per agent.
        let _b = agent(&d, "b", 1, &["gpu"], &[]).await;
        assert_eq!(
            waiting(&d, id),
            "agent `A` lacks label `gpu`; agent `B` lacks label `linux`"
        );
    }

    #[tokio::test]
    async fn a_job_longer_than_the_donors_allow_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, d) = open(dir.path(), 5000);
        let mut rx = Vec::new();
        for id in ["a", "b", "c"] {
            let caps = Capabilities {
                max_job_timeout_secs: 1800,
                ..Default::default()
            };
            rx.push(donor(&d, id, caps, true).await);
        }
        let long = JobSpec {
            timeout_secs: 3600,
            ..spec(&["linux"])
        };
        let id = d.submit(long, 0).await.unwrap();
        assert_eq!(
            waiting(&d, id),
            "3 agents match the labels but their donors allow at most 30m (job asks 1h)"
        );
        assert!(rx.iter_mut().all(|rx| assignments(rx).is_empty()));
    }

    #[tokio::test]
    async fn a_job_of_a_project_the_donor_refuses_names_what_it_accepts() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, d) = open(dir.path(), 5000);
        let caps = Capabilities {
            allowed_projects: vec!["lua".into(), "luajit".into()],
            ..Default::default()
        };
        let _box = donor(&d, "box", caps, true).await;
        let other = JobSpec {
            project: "penlight".into(),
            ..spec(&["linux"])
        };
        let id = d.submit(other, 0).await.unwrap();
        assert_eq!(
            waiting(&d, id),
            "agent `BOX` only accepts projects lua, luajit (job is for `penlight`)"
        );
    }

    #[tokio::test]
    async fn a_job_of_a_project_the_donor_denies_says_so_and_goes_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, d) = open(dir.path(), 5000);
        let caps = Capabilities {
            denied_projects: vec!["beta".into()],
            ..Default::default()
        };
        let mut rx = donor(&d, "box", caps, true).await;
        let beta = JobSpec {
            project: "beta".into(),
            ..spec(&["linux"])
        };
        let id = d.submit(beta, 0).await.unwrap();
        assert!(assignments(&mut rx).is_empty(), "its donor denies beta");
        assert_eq!(
            waiting(&d, id),
            "agent `BOX` does not accept project `beta` (its donor denies it)"
        );
        // Another project goes to it; the denied one to an agent without the denial.
        let alpha = JobSpec {
            project: "alpha".into(),
            ..spec(&["linux"])
        };
        let other = d.submit(alpha, 0).await.unwrap();
        assert_eq!(assignments(&mut rx)[0].job_id, other);
        let mut free = donor(&d, "free", Capabilities::default(), true).await;
        assert_eq!(assignments(&mut free)[0].job_id, id);
    }

    #[tokio::test]
    async fn a_donor_whose_limits_refuse_waiting_jobs_is_told_once() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, d) = open(dir.path(), 5000);
        let caps = Capabilities {
            allowed_projects: vec!["beta".into()],
            max_job_timeout_secs: 1800,
            ..Default::default()
        };
        let mut rx = donor(&d, "box", caps, true).await;
        let notices = |rx: &mut Rx| -> Vec<String> {
            let mut said = Vec::new();
            while let Ok(m) = rx.try_recv() {
                if let Ok(HubMessage {
                    msg: Some(Msg::Notice(n)),
                }) = *m
                {
                    said.push(n.text);
                }
            }
            said
        };
        let alpha = || JobSpec {
            project: "alpha".into(),
            ..spec(&["linux"])
        };
        d.submit(alpha(), 0).await.unwrap();
        d.submit(alpha(), 0).await.unwrap();
        let long = JobSpec {
            project: "beta".into(),
            timeout_secs: 3600,
            ..spec(&["linux"])
        };
        d.submit(long, 0).await.unwrap();
        assert_eq!(
            notices(&mut rx),
            [
                "A job of project `alpha` waits that your allowed_projects (beta) refuse.",
                "A job that may run 1h waits that your max_job_timeout (30m) refuses.",
            ],
            "each sentence once"
        );
        // A busy (here: paused) agent is not told: its limits are not why it waits.
        let paused = trunkfarm_proto::v1::Paused {
            paused: true,
            ..Default::default()
        };
        d.set_paused("box", &paused).await.unwrap();
        let delta = JobSpec {
            project: "delta".into(),
            ..spec(&["linux"])
        };
        d.submit(delta, 0).await.unwrap();
        assert!(notices(&mut rx).is_empty());
        // A denied project is said too.
        let dir2 = tempfile::tempdir().unwrap();
        let (_s2, d2) = open(dir2.path(), 5000);
        let denied = Capabilities {
            denied_projects: vec!["gamma".into()],
            ..Default::default()
        };
        let mut rx2 = donor(&d2, "denier", denied, true).await;
        let gamma = JobSpec {
            project: "gamma".into(),
            ..spec(&["linux"])
        };
        d2.submit(gamma, 0).await.unwrap();
        assert_eq!(
            notices(&mut rx2),
            ["A job of project `gamma` waits that your denied_projects refuse."]
        );
    }

    #[test]
    fn a_donors_limits_read_as_words() {
        assert!(donor_limits(&Capabilities::default()).is_empty());
        let caps = Capabilities {
            cores: 4,
            memory_bytes: 8 << 30,
            max_job_timeout_secs: 1800,
            allowed_projects: vec!["lua".into(), "luajit".into()],
            denied_projects: vec!["beta\u{7}".into()],
            schedule: "Mon-Fri 22:00-07:00, Sat-Sun (Europe/Berlin)\u{1b}[2J".into(),
            only_when_idle: "load under 1.0".into(),
            cache_bytes: 10 << 30,
            ..Default::default()
        };
        assert_eq!(
            donor_limits(&caps),
            [
                "4 cores",
                "8.0 GiB",
                "jobs up to 30m",
                "only lua, luajit",
                "not beta",
                "Mon-Fri 22:00-07:00, Sat-Sun (Europe/Berlin)[2J",
                "when idle: load under 1.0",
                "cache 10.0 GiB",
            ]
        );
    }

    #[tokio::test]
    async fn a_trusted_only_job_with_volunteers_only_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, d) = open(dir.path(), 5000);
        let _v = join(&d, "v", 1, &["linux"], &[], false).await;
        let build = JobSpec {
            trusted_only: true,
            ..spec(&["linux"])
        };
        let id = d.submit(build, 0).await.unwrap();
        assert_eq!(waiting(&d, id), "trusted agents only: none connected");
    }

    #[tokio::test]
    async fn a_job_behind_busy_agents_counts_what_they_run() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, d) = open(dir.path(), 5000);
        let mut a = agent(&d, "a", 1, &["linux"], &[]).await;
        let first = d.submit(spec(&["linux"]), 0).await.unwrap();
        let second = d.submit(spec(&["linux"]), 0).await.unwrap();
        assert_eq!(assignments(&mut a)[0].job_id, first);
        assert_eq!(d.waiting(first), None, "leased: no longer waiting");
        assert_eq!(
            waiting(&d, second),
            "every matching agent is busy (1 running)"
        );
    }

    #[tokio::test]
    async fn a_job_whose_only_agent_is_quarantined_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, d) = open(dir.path(), 5000);
        let _a = agent(&d, "a", 1, &["linux"], &[]).await;
        d.set_quarantined("a", true).await.unwrap();
        let id = d.submit(spec(&["linux"]), 0).await.unwrap();
        assert_eq!(waiting(&d, id), "agent `A` is quarantined");
    }

    /// The `Backlog`s sent on `rx` so far, in order.
    fn backlogs(rx: &mut Rx) -> (Vec<u32>, Vec<JobRef>) {
        let mut told = Vec::new();
        let mut assigned = Vec::new();
        while let Ok(msg) = rx.try_recv() {
            match *msg {
                Ok(HubMessage {
                    msg: Some(Msg::Backlog(b)),
                }) => {
                    assert_eq!(b.max_jobs, 3, "its slots here");
                    told.push(b.jobs)
                }
                Ok(HubMessage {
                    msg: Some(Msg::Assign(a)),
                }) => assigned.push(a.job.unwrap()),
                _ => {}
            }
        }
        (told, assigned)
    }

    /// Connects agent `box` ("BOX": 3 slots, label linux, accepting
    /// `allowed` projects) as one serving several hubs: it has offered
    /// nothing yet and waits to hear of work.
    async fn sharing_agent(d: &Dispatcher, allowed: Vec<String>) -> Rx {
        let (tx, rx) = mpsc::unbounded_channel();
        let hello = Hello {
            name: "BOX".into(),
            caps: Capabilities {
                labels: vec!["linux".into()],
                max_parallel_jobs: 3,
                allowed_projects: allowed,
                ..Default::default()
            },
            labels: HashSet::from(["linux".to_owned()]),
            trusted: false,
            quarantined: false,
            max_parallel: 3,
            draining: false,
            paused: None,
            offered: Some(0),
            agent_version: "test".into(),
            remote: "local".into(),
            tx,
        };
        d.connect("box", &[], hello).await.unwrap();
        rx
    }

    #[tokio::test]
    async fn an_agent_serving_several_hubs_gets_what_it_offers_and_hears_of_waiting_work() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, d) = open(dir.path(), 5000);
        let mut rx = sharing_agent(&d, Vec::new()).await;
        assert_eq!(backlogs(&mut rx), (vec![0], vec![]), "told: nothing waits");
        let ids = submit_many(&d, 4).await;
        let (told, assigned) = backlogs(&mut rx);
        assert!(assigned.is_empty(), "no slot offered, no job: {assigned:?}");
        // Counted up to its slots, and said once per change.
        assert_eq!(told, [1, 2, 3]);
        assert_eq!(
            waiting(&d, ids[0]),
            "agent `BOX` gives its free slots to its other hubs"
        );
        // It offers two slots: two jobs go, the backlog says what is left.
        d.set_offered("box", 2).await.unwrap();
        let (told, assigned) = backlogs(&mut rx);
        assert_eq!(
            assigned.iter().map(|j| j.job_id).collect::<Vec<_>>(),
            ids[..2]
        );
        assert_eq!(told, [2]);
        assert_eq!(
            waiting(&d, ids[2]),
            "agent `BOX` gives its free slots to its other hubs"
        );
        // Never more than its slots, whatever it offers.
        d.set_offered("box", 9).await.unwrap();
        let (told, assigned) = backlogs(&mut rx);
        assert_eq!(assigned.len(), 1);
        assert_eq!(told, [1]);
        assert_eq!(
            waiting(&d, ids[3]),
            "every matching agent is busy (3 running)"
        );
        // An agent serving only this hub is told nothing.
        let mut other = agent(&d, "solo", 1, &["linux"], &[]).await;
        let (told, assigned) = backlogs(&mut other);
        assert!(told.is_empty());
        assert_eq!(assigned.len(), 1);
    }

    /// An agent serving several hubs that offers this hub no slot because
    /// only work its donor refuses waits here is still told why (the
    /// notice), and a quarantined one is told nothing waits (so it offers
    /// its slots to its other hubs instead of leaving them unfilled).
    #[tokio::test]
    async fn a_sharing_agent_hears_of_refused_work_and_of_none_while_quarantined() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, d) = open(dir.path(), 5000);
        let mut rx = sharing_agent(&d, vec!["beta".into()]).await;
        let alpha = JobSpec {
            project: "alpha".into(),
            ..spec(&["linux"])
        };
        d.submit(alpha, 0).await.unwrap();
        let mut notices = Vec::new();
        let mut told = Vec::new();
        while let Ok(m) = rx.try_recv() {
            match *m {
                Ok(HubMessage {
                    msg: Some(Msg::Notice(n)),
                }) => notices.push(n.text),
                Ok(HubMessage {
                    msg: Some(Msg::Backlog(b)),
                }) => told.push(b.jobs),
                _ => {}
            }
        }
        assert_eq!(
            notices,
            ["A job of project `alpha` waits that your allowed_projects (beta) refuse."]
        );
        assert_eq!(told, [0], "nothing it would take waits");
        let beta = || JobSpec {
            project: "beta".into(),
            ..spec(&["linux"])
        };
        d.submit(beta(), 0).await.unwrap();
        assert_eq!(backlogs(&mut rx), (vec![1], vec![]));
        d.set_quarantined("box", true).await.unwrap();
        d.submit(beta(), 0).await.unwrap();
        assert_eq!(
            backlogs(&mut rx),
            (vec![0], vec![]),
            "quarantined here: nothing for it"
        );
    }

    #[tokio::test]
    async fn a_paused_agent_gets_no_job_says_why_and_takes_work_once_resumed() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, d) = open(dir.path(), 5000);
        let mut rx = agent(&d, "box", 1, &["linux"], &[]).await;
        // 2026-05-01 14:00 UTC.
        let paused = trunkfarm_proto::v1::Paused {
            paused: true,
            reason: "paused by its donor\u{1b}[2J".into(),
            until_ms: 1_777_644_000_000,
        };
        d.set_paused("box", &paused).await.unwrap();
        let id = d.submit(spec(&["linux"]), 0).await.unwrap();
        assert!(
            assignments(&mut rx).is_empty(),
            "a paused agent gets nothing"
        );
        assert_eq!(
            waiting(&d, id),
            "agent `BOX` is paused by its donor[2J until 2026-05-01 14:00 UTC"
        );
        assert_eq!(
            d.connected()["box"].paused.as_deref(),
            Some("paused by its donor[2J until 2026-05-01 14:00 UTC")
        );
        let resumed = trunkfarm_proto::v1::Paused::default();
        d.set_paused("box", &resumed).await.unwrap();
        assert_eq!(
            assignments(&mut rx)[0].job_id,
            id,
            "resumed: it takes the job"
        );
        assert_eq!(d.connected()["box"].paused, None);
    }

    #[tokio::test]
    async fn a_job_handed_back_runs_elsewhere_without_using_up_an_attempt() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, d) = open(dir.path(), 5000);
        // One attempt only: an infrastructure error would finish it.
        let id = d.submit(spec(&[]), 1).await.unwrap();
        let mut a = agent(&d, "a", 1, &[], &[]).await;
        let first = assignments(&mut a)[0];
        let paused = trunkfarm_proto::v1::Paused {
            paused: true,
            ..Default::default()
        };
        d.set_paused("a", &paused).await.unwrap();
        let back = JobResult {
            job: Some(first),
            outcome: Outcome::Error.into(),
            detail: "handed back: the agent's donor took it back".into(),
            handed_back: true,
            ..Default::default()
        };
        assert!(d.record_result("a", back).await.unwrap().recorded);
        let rec = d.get(id).unwrap().unwrap();
        assert_eq!(rec.state, JobState::Queued, "requeued, not finished");
        assert!(
            rec.attempts[0]
                .lost_reason
                .starts_with("handed back by agent a"),
            "{:?}",
            rec.attempts[0]
        );
        assert_eq!(waiting(&d, id), "agent `A` is paused");
        let mut b = agent(&d, "b", 1, &[], &[]).await;
        let second = assignments(&mut b)[0];
        assert_eq!(
            (second.job_id, second.attempt),
            (id, 2),
            "it runs elsewhere"
        );
    }
}
