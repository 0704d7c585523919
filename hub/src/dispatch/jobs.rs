//! The job side of dispatch: job records and the `jobs` tree's layout
//! ([`JobTable`]), and the open jobs in memory ([`OpenJobs`]): the queue,
//! the leases, and every state change of a job from submission to its one
//! result.
//!
//! Layout (also on [`trees::JOBS`]): `j<id8>` → [`JobRecord`], `o<id8>` →
//! marker of every unfinished job (a restart reads only these), `k<pipeline
//! key>` → id8 of the keyed job, `f<id8>` → marker of a finished keyed job
//! the pipeline has not taken in yet (the finished inbox). [`JobTable::stage`]
//! is the one writer of it: a record and its markers change in one batch.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use trunkfarm_proto::v1::{Assignment, JobRef, JobSpec, Outcome, ResultAck};

use super::records::{JobResultRecord, JobSpecRecord};
use super::{DispatchError, DispatchSettings};
use crate::store::{Store, StoreError, Table, now_ms, trees};

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum JobState {
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
pub(crate) struct AttemptRecord {
    /// 1-based.
    pub(crate) attempt: u32,
    /// Who ran it.
    pub(crate) agent_id: String,
    /// When it was leased.
    pub(crate) leased_at_ms: u64,
    /// Why it ended without a result; empty if it has one.
    pub(crate) lost_reason: String,
    /// The artifact this attempt uploaded (a build's result counts only
    /// with it). Not written when empty: older records keep their bytes.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) uploaded_sha256: String,
    /// Its agent was trusted when the job was leased to it: whose verdict
    /// the result is, even after the agent is revoked or quarantined. Not
    /// written when false (older records read as volunteers').
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) trusted: bool,
}

/// Which agents a job may go to, beyond what its spec asks, and where it
/// queues (never sent to an agent): a re-run that must come from another
/// agent than the one it checks, preferably a trusted one; a bisection's
/// build or run, ahead of ordinary work.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct Placement {
    /// Never given to these agents.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) exclude_agents: Vec<String>,
    /// Among the agents that take it now, a trusted one first.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(crate) prefer_trusted: bool,
    /// Given to these agents only when no other takes it now (a trusted
    /// agent's result re-run: another agent where one fits).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) avoid_agents: Vec<String>,
    /// Queued ahead of every job queued without it (behind those queued
    /// with it before): a bisection's work is waited for by a held mail,
    /// ordinary fan-out is not.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(crate) ahead: bool,
}

impl Placement {
    /// Whether it says nothing (every job but re-runs and bisections).
    fn is_empty(&self) -> bool {
        *self == Placement::default()
    }
}

/// A job as stored: `jobs` tree, key `j` + id (big endian).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct JobRecord {
    /// Unique, increasing.
    pub(crate) id: u64,
    /// What to run.
    pub(crate) spec: JobSpecRecord,
    /// Attempts allowed.
    pub(crate) max_attempts: u32,
    /// Submission time.
    pub(crate) created_at_ms: u64,
    /// Current state.
    pub(crate) state: JobState,
    /// The current (or last) attempt; 0 before the first lease.
    pub(crate) attempt: u32,
    /// The agent of the current (or last) attempt.
    #[serde(default)]
    pub(crate) agent_id: String,
    /// Every attempt so far.
    #[serde(default)]
    pub(crate) attempts: Vec<AttemptRecord>,
    /// The one result, once finished.
    #[serde(default)]
    pub(crate) result: Option<JobResultRecord>,
    /// When it finished.
    #[serde(default)]
    pub(crate) finished_at_ms: u64,
    /// An operator asked to cancel it.
    #[serde(default)]
    pub(crate) cancel_requested: bool,
    /// The pipeline's name for the job (e.g. `build/lua/linux-x86_64/<sha>`),
    /// unique among jobs; empty for a job submitted by hand. Keyed jobs are
    /// submitted at most once, and their end is handed to the pipeline
    /// through the finished inbox.
    #[serde(default)]
    pub(crate) key: String,
    /// Which agents it may go to besides what its spec asks. Not written
    /// when empty, so other records keep their bytes.
    #[serde(default, skip_serializing_if = "Placement::is_empty")]
    pub(crate) placement: Placement,
}

impl JobRecord {
    /// A new queued job, its spec (from the admin API or the pipeline)
    /// checked against the hub's limits (a timeout of 0 gets the default
    /// one) and taken over as stored.
    pub(super) fn new(
        id: u64,
        spec: JobSpec,
        max_attempts: u32,
        key: String,
        s: &DispatchSettings,
    ) -> Result<JobRecord, DispatchError> {
        let mut spec = JobSpecRecord::from(spec);
        if let Some(repo) = spec.repository.as_mut()
            && let Some(plain) = s.repo_credentials.strip(&repo.url)
        {
            repo.url = plain;
        }
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
        let max_attempts = if max_attempts == 0 {
            s.max_attempts
        } else {
            max_attempts
        };
        Ok(JobRecord::queued(id, spec, max_attempts, key))
    }

    /// A queued job as submitted, nothing checked (see [`JobRecord::new`]).
    pub(crate) fn queued(
        id: u64,
        spec: JobSpecRecord,
        max_attempts: u32,
        key: String,
    ) -> JobRecord {
        JobRecord {
            id,
            spec,
            max_attempts,
            created_at_ms: now_ms(),
            state: JobState::Queued,
            attempt: 0,
            agent_id: String::new(),
            attempts: Vec::new(),
            result: None,
            finished_at_ms: 0,
            cancel_requested: false,
            key,
            placement: Placement::default(),
        }
    }

    /// The (job, attempt) reference of the current attempt.
    pub(crate) fn job_ref(&self) -> JobRef {
        JobRef {
            job_id: self.id,
            attempt: self.attempt,
        }
    }

    /// Ends the job with a result the hub makes up (lost attempts, cancel).
    fn finish(&mut self, outcome: Outcome, detail: String) {
        self.state = JobState::Finished;
        self.finished_at_ms = now_ms();
        self.result = Some(JobResultRecord {
            job: Some(self.job_ref().into()),
            outcome: outcome.into(),
            detail,
            ..Default::default()
        });
    }

    /// Notes why the given attempt ended without a result.
    fn note_lost(&mut self, attempt: u32, reason: String) {
        if let Some(a) = self.attempt_mut(attempt) {
            a.lost_reason = reason;
        }
    }

    fn attempt_mut(&mut self, attempt: u32) -> Option<&mut AttemptRecord> {
        self.attempts
            .iter_mut()
            .rev()
            .find(|a| a.attempt == attempt)
    }

    /// Why a passed result of a build attempt does not count: it names an
    /// artifact this attempt did not upload. `None` when it counts (or is
    /// not a passed build).
    fn unproven_artifact(&self, result: &JobResultRecord) -> Option<String> {
        if self.spec.upload_prefix.is_empty() || result.outcome != Outcome::Passed as i32 {
            return None;
        }
        let attempt = result.job.map_or(0, |j| j.attempt);
        let uploaded = self
            .attempts
            .iter()
            .rev()
            .find(|a| a.attempt == attempt)
            .map_or("", |a| a.uploaded_sha256.as_str());
        if !uploaded.is_empty() && uploaded == result.artifact_sha256 {
            return None;
        }
        Some(if uploaded.is_empty() {
            format!(
                "the agent reported a passed build with artifact {:?} but uploaded none in this attempt; a build counts only with the artifact its attempt uploaded",
                result.artifact_sha256
            )
        } else {
            format!(
                "the agent reported a passed build with artifact {:?} but this attempt uploaded {uploaded}; a build counts only with the artifact its attempt uploaded",
                result.artifact_sha256
            )
        })
    }
}

/// `<prefix><id as 8 bytes big endian>`: sorts like the id.
fn id_key(prefix: u8, id: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = prefix;
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

/// The id in a `j`, `o` or `f` key.
fn key_id(key: &[u8]) -> Option<u64> {
    key.get(1..9)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
}

/// A key as people read it (`j42`), for "record unreadable" errors.
fn printable(key: &[u8]) -> String {
    match (key.first(), key_id(key)) {
        (Some(&prefix), Some(id)) if key.len() == 9 => format!("{}{id}", prefix as char),
        _ => String::from_utf8_lossy(key).into_owned(),
    }
}

const RECORD: u8 = b'j';
const OPEN: u8 = b'o';
const INBOX: u8 = b'f';

/// Maps a pipeline key to its job id: `k` + key.
fn name_key(key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(b'k');
    k.extend_from_slice(key.as_bytes());
    k
}

/// Where [`JobTable::prunable`] goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Next {
    /// Call again from this id.
    From(u64),
    /// Done: every job from this id on (`None`: none stored after those
    /// looked at) was made since the cutoff.
    Newer(Option<u64>),
}

/// The `jobs` tree. Cheap to clone; reads need no lock.
#[derive(Clone)]
pub(crate) struct JobTable {
    table: Table,
}

impl JobTable {
    /// Opens the `jobs` tree.
    pub(crate) fn open(store: &Store) -> Result<JobTable, StoreError> {
        Ok(JobTable {
            table: Table::open(store, trees::JOBS)?,
        })
    }

    /// The store the tree lives in.
    pub(super) fn store(&self) -> &Store {
        self.table.store()
    }

    /// Adds a job record and its index entries (open marker, pipeline key,
    /// finished inbox) to `batch`: the one place the jobs tree's layout is
    /// written (also by `trunkfarm bench recovery`, which builds a history of
    /// a million jobs in a database no hub serves).
    pub(crate) fn stage(
        &self,
        rec: &JobRecord,
        batch: &mut crate::store::Batch,
    ) -> Result<(), StoreError> {
        self.table.stage(batch, id_key(RECORD, rec.id), rec)?;
        if rec.state == JobState::Finished {
            batch.remove(id_key(OPEN, rec.id));
            if !rec.key.is_empty() {
                // In the same write as the result: the pipeline cannot miss it.
                batch.insert(id_key(INBOX, rec.id), []);
            }
        } else {
            batch.insert(id_key(OPEN, rec.id), []);
            if !rec.key.is_empty() {
                batch.insert(name_key(&rec.key), rec.id.to_be_bytes());
            }
        }
        Ok(())
    }

    /// Applies a batch of [`JobTable::stage`]d records atomically.
    pub(crate) fn apply(&self, batch: crate::store::Batch) -> Result<(), StoreError> {
        self.table.apply(batch)
    }

    /// Writes one record with its index entries (durable after the next
    /// commit).
    fn persist(&self, rec: &JobRecord) -> Result<(), StoreError> {
        let mut batch = crate::store::Batch::default();
        self.stage(rec, &mut batch)?;
        self.apply(batch)
    }

    /// Takes back a submission whose commit failed (nobody was told its id),
    /// so it is not run behind the submitter's back. Best effort: the store
    /// is failing.
    pub(super) fn withdraw(&self, rec: &JobRecord) {
        let mut batch = crate::store::Batch::default();
        batch.remove(id_key(RECORD, rec.id));
        batch.remove(id_key(OPEN, rec.id));
        if !rec.key.is_empty() {
            batch.remove(name_key(&rec.key));
        }
        if let Err(e) = self.apply(batch) {
            tracing::warn!(job = rec.id, "cannot take back an unacknowledged job: {e}");
        }
    }

    fn decode(&self, key: &[u8], raw: &[u8]) -> Result<JobRecord, StoreError> {
        self.table.decode(printable(key).as_bytes(), raw)
    }

    /// One stored job record.
    pub(super) fn load(&self, id: u64) -> Result<Option<JobRecord>, StoreError> {
        let key = id_key(RECORD, id);
        match self.table.get_raw(key)? {
            None => Ok(None),
            Some(raw) => self.decode(&key, &raw).map(Some),
        }
    }

    /// Finished jobs' records that may go (finished before `before_ms`,
    /// taken in by the pipeline, not in `kept`, and whose pipeline key
    /// `still_submittable` says nothing can submit again) with ids from
    /// `from` on, looking at most at `max` records: each with its key.
    /// Removes nothing (see [`JobTable::remove_pruned`]). Returns them and
    /// where the next call starts: [`Next::From`], or [`Next::Newer`] once
    /// it got to the first job made since `before_ms` (which cannot have
    /// finished before it; its id: every id below was given before
    /// `before_ms`) or to the end.
    pub(crate) fn prunable(
        &self,
        before_ms: u64,
        kept: &std::collections::HashSet<u64>,
        still_submittable: &dyn Fn(&str) -> bool,
        from: u64,
        max: usize,
    ) -> Result<(Vec<(u64, String)>, Next), StoreError> {
        let mut out = Vec::new();
        let end = id_key(RECORD, u64::MAX);
        let records = self.table.range(id_key(RECORD, from)..=end);
        for (looked, item) in records.enumerate() {
            let (k, raw) = item?;
            let rec = self.decode(&k, &raw)?;
            if rec.created_at_ms >= before_ms {
                return Ok((out, Next::Newer(Some(rec.id))));
            }
            if looked == max {
                return Ok((out, Next::From(rec.id)));
            }
            let finished = rec.finished_at_ms != 0 && rec.finished_at_ms < before_ms;
            if finished
                && !kept.contains(&rec.id)
                && !self.table.contains(id_key(OPEN, rec.id))?
                && !self.table.contains(id_key(INBOX, rec.id))?
                && (rec.key.is_empty() || !still_submittable(&rec.key))
            {
                out.push((rec.id, rec.key));
            }
        }
        Ok((out, Next::Newer(None)))
    }

    /// Removes the records [`JobTable::prunable`] found, each with its
    /// `k<key>` once-only marker, in one atomic write (durable after the
    /// next commit): a record and its marker go together, and only once
    /// its key can no longer be submitted (ARCHITECTURE.md's invariant).
    pub(crate) fn remove_pruned(&self, jobs: &[(u64, String)]) -> Result<(), StoreError> {
        if jobs.is_empty() {
            return Ok(());
        }
        let mut batch = crate::store::Batch::default();
        for (id, key) in jobs {
            batch.remove(id_key(RECORD, *id));
            if !key.is_empty() {
                // Only if it still names this job (a key is stored once).
                if self.keyed(key)? == Some(*id) {
                    batch.remove(name_key(key));
                }
            }
        }
        self.table.apply(batch)
    }

    /// Every unfinished job's stored record, by id.
    fn open_records(&self) -> Result<Vec<JobRecord>, StoreError> {
        let mut out = Vec::new();
        for key in self.table.keys([OPEN]) {
            let key = key?;
            let id =
                key_id(&key).ok_or_else(|| self.table.corrupt(printable(&key), "short key"))?;
            let rec = self.load(id)?.ok_or_else(|| {
                self.table
                    .corrupt(format!("j{id}"), "open job without record")
            })?;
            out.push(rec);
        }
        Ok(out)
    }

    /// Stored jobs newest first, the live copy of open ones taken from
    /// `open`, only those `keep` keeps (the limit counts kept ones).
    pub(super) fn list(
        &self,
        open: &HashMap<u64, JobRecord>,
        keep: impl Fn(&JobRecord) -> bool,
        limit: usize,
    ) -> Result<Vec<JobRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.table.scan_raw([RECORD]).rev() {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item?;
            let stored = self.decode(&k, &v)?;
            let rec = open.get(&stored.id).cloned().unwrap_or(stored);
            if keep(&rec) {
                out.push(rec);
            }
        }
        Ok(out)
    }

    /// The job submitted under a pipeline key, if any.
    pub(super) fn keyed(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let Some(raw) = self.table.get_raw(name_key(key))? else {
            return Ok(None);
        };
        let bytes: [u8; 8] = raw
            .as_ref()
            .try_into()
            .map_err(|_| self.table.corrupt(format!("k{key}"), "not an 8-byte id"))?;
        Ok(Some(u64::from_be_bytes(bytes)))
    }

    /// Finished keyed jobs the pipeline has not acknowledged yet, oldest
    /// first, at most `limit`, leaving out those in `skip`.
    pub(super) fn inbox(
        &self,
        limit: usize,
        skip: &HashSet<u64>,
    ) -> Result<Vec<JobRecord>, StoreError> {
        let mut out = Vec::new();
        for key in self.table.queue_keys([INBOX]) {
            if out.len() >= limit {
                break;
            }
            let key = key?;
            let id =
                key_id(&key).ok_or_else(|| self.table.corrupt(printable(&key), "short key"))?;
            if skip.contains(&id) {
                continue;
            }
            match self.load(id)? {
                Some(rec) => out.push(rec),
                // A marker without a record cannot be handed over; drop it.
                None => self.table.remove(key)?,
            }
        }
        Ok(out)
    }

    /// Whether the finished inbox is empty (one key read, whatever its size).
    pub(super) fn inbox_is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.table.queue_keys([INBOX]).next().transpose()?.is_none())
    }

    /// The ids in the finished inbox (keys only).
    pub(super) fn inbox_ids(&self) -> Result<Vec<u64>, StoreError> {
        let mut out = Vec::new();
        for key in self.table.queue_keys([INBOX]) {
            out.extend(key_id(&key?));
        }
        Ok(out)
    }

    /// The pipeline took in these finished jobs: they leave the inbox, and
    /// their report files (parsed and stored by the pipeline, up to
    /// megabytes each) leave the job record.
    pub(super) fn ack_inbox(&self, ids: &[u64]) -> Result<(), StoreError> {
        let mut batch = crate::store::Batch::default();
        for id in ids {
            batch.remove(id_key(INBOX, *id));
            if let Some(mut rec) = self.load(*id)? {
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
                    self.table.stage(&mut batch, id_key(RECORD, rec.id), &rec)?;
                }
            }
        }
        self.apply(batch)
    }
}

/// An agent's hold on one attempt of a job. Deadlines live in memory only:
/// a restarted hub gives every leased job a fresh lease.
struct Lease {
    agent_id: String,
    attempt: u32,
    /// Heartbeats move it on.
    deadline: Instant,
    /// The job's timeout plus the hub's grace from when it was leased:
    /// nothing the agent says moves it.
    ends_at: Instant,
}

/// Why a lease is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Expiry {
    /// Its agent was not heard from within the lease timeout.
    Silent,
    /// The job ran past its timeout plus the hub's grace.
    Overran,
}

/// When a job leased at `leased_at_ms` must end at the latest, as an
/// instant: its timeout plus `grace`, counted from the lease (wall clock,
/// so a restarted hub keeps the deadline of a lease it loads).
fn ends_at(timeout_secs: u64, leased_at_ms: u64, grace: Duration) -> Instant {
    let allowed = Duration::from_secs(timeout_secs).saturating_add(grace);
    let elapsed = Duration::from_millis(now_ms().saturating_sub(leased_at_ms));
    let left = allowed.saturating_sub(elapsed);
    let now = Instant::now();
    now.checked_add(left)
        .unwrap_or(now + Duration::from_secs(365 * 24 * 3600))
}

/// What ended an attempt without a result did to its job.
pub(super) struct Lost {
    /// The agent that held it.
    pub(crate) agent_id: String,
    /// `Some(attempt)` if the job finished (attempts used up, or cancelled).
    pub(crate) finished: Option<u32>,
}

/// What recording a result did.
pub(super) enum Recorded {
    /// The agent does not hold that attempt: nothing changed.
    NotHeld,
    /// The lease ended; `Some(attempt)` if the job finished (else it was
    /// requeued after an infrastructure error).
    Released { finished: Option<u32> },
}

/// What cancelling an open job did.
pub(super) enum Cancelled {
    /// It was queued: finished as cancelled (`attempt`) at once.
    Finished(u32),
    /// It runs: the agent holding it (if any) is to be told.
    Running {
        job: JobRef,
        agent_id: Option<String>,
    },
}

/// The unfinished jobs: the authoritative copy of each, the queue, and the
/// leases. Every change is written to the [`JobTable`] before memory
/// changes, so a failing disk leaves the old state in place.
#[derive(Default)]
pub(super) struct OpenJobs {
    open: HashMap<u64, JobRecord>,
    /// Queued job ids, oldest first (requeued jobs go first).
    queue: VecDeque<u64>,
    leases: HashMap<u64, Lease>,
}

impl OpenJobs {
    /// Reads every unfinished job. Leased ones get a lease until `grace`:
    /// their agent confirms them by listing them in its `Hello`.
    pub(super) fn load(
        table: &JobTable,
        grace: Instant,
        timeout_grace: Duration,
    ) -> Result<OpenJobs, StoreError> {
        let mut jobs = OpenJobs::default();
        let mut queued = Vec::new();
        for rec in table.open_records()? {
            match rec.state {
                JobState::Queued => queued.push(rec.id),
                JobState::Leased | JobState::Running => {
                    let leased_at_ms = rec.attempts.last().map_or(0, |a| a.leased_at_ms);
                    jobs.leases.insert(
                        rec.id,
                        Lease {
                            agent_id: rec.agent_id.clone(),
                            attempt: rec.attempt,
                            deadline: grace,
                            ends_at: ends_at(rec.spec.timeout_secs, leased_at_ms, timeout_grace),
                        },
                    );
                }
                JobState::Finished => continue,
            }
            jobs.open.insert(rec.id, rec);
        }
        // Jobs queued ahead first, each group oldest first.
        queued.sort_unstable_by_key(|id| (!jobs.open[id].placement.ahead, *id));
        jobs.queue = queued.into();
        Ok(jobs)
    }

    /// (queued, leased).
    pub(super) fn counts(&self) -> (usize, usize) {
        (self.queue.len(), self.leases.len())
    }

    pub(super) fn get(&self, id: u64) -> Option<&JobRecord> {
        self.open.get(&id)
    }

    /// Every open job (for a listing that overlays them on stored records).
    pub(super) fn records(&self) -> &HashMap<u64, JobRecord> {
        &self.open
    }

    /// A new job, durable already, joins the back of the queue, or one
    /// placed `ahead` the back of the jobs queued ahead at its front.
    pub(super) fn add(&mut self, rec: JobRecord) {
        if rec.placement.ahead {
            let open = &self.open;
            let at = self
                .queue
                .iter()
                .position(|id| open.get(id).is_none_or(|r| !r.placement.ahead))
                .unwrap_or(self.queue.len());
            self.queue.insert(at, rec.id);
        } else {
            self.queue.push_back(rec.id);
        }
        self.open.insert(rec.id, rec);
    }

    /// The queued jobs, in queue order.
    pub(super) fn queued(&self) -> impl Iterator<Item = &JobRecord> + Clone {
        self.queue.iter().filter_map(|id| self.open.get(id))
    }

    /// The oldest queued job, taken off the queue.
    pub(super) fn pop_queued(&mut self) -> Option<u64> {
        self.queue.pop_front()
    }

    /// Puts jobs back at the front of the queue, in the order given.
    pub(super) fn requeue_front(&mut self, ids: Vec<u64>) {
        for id in ids.into_iter().rev() {
            self.queue.push_front(id);
        }
    }

    /// Leases an open job to `agent_id` (its next attempt) until
    /// `deadline`, and at most for its timeout plus `timeout_grace`; `None`
    /// if it is not open. Written first: on a write error nothing changes.
    /// The assignment's repository URL gets back the configured credentials
    /// the stored spec was stripped of.
    pub(super) fn lease(
        &mut self,
        table: &JobTable,
        id: u64,
        agent_id: &str,
        trusted: bool,
        deadline: Instant,
        settings: &DispatchSettings,
    ) -> Result<Option<Assignment>, StoreError> {
        let Some(mut rec) = self.open.get(&id).cloned() else {
            return Ok(None);
        };
        rec.attempt += 1;
        rec.state = JobState::Leased;
        rec.agent_id = agent_id.to_owned();
        let leased_at_ms = now_ms();
        rec.attempts.push(AttemptRecord {
            attempt: rec.attempt,
            agent_id: agent_id.to_owned(),
            leased_at_ms,
            lost_reason: String::new(),
            uploaded_sha256: String::new(),
            trusted,
        });
        table.persist(&rec)?;
        let mut spec: JobSpec = rec.spec.clone().into();
        // The operator's repository credentials go to machines they control
        // only: a volunteer checks out without them (a private repository
        // then fails there as an infrastructure error, retried elsewhere).
        if trusted
            && let Some(repo) = spec.repository.as_mut()
            && let Some(full) = settings.repo_credentials.restore(&repo.url)
        {
            repo.url = full.to_owned();
        }
        let assignment = Assignment {
            job: Some(rec.job_ref()),
            spec: Some(spec),
        };
        self.leases.insert(
            id,
            Lease {
                agent_id: agent_id.to_owned(),
                attempt: rec.attempt,
                deadline,
                ends_at: ends_at(rec.spec.timeout_secs, leased_at_ms, settings.timeout_grace),
            },
        );
        self.open.insert(id, rec);
        Ok(Some(assignment))
    }

    /// Whether `agent_id` holds the lease for exactly this attempt.
    pub(super) fn holds(&self, agent_id: &str, job: &JobRef) -> bool {
        self.leases
            .get(&job.job_id)
            .is_some_and(|l| l.agent_id == agent_id && l.attempt == job.attempt)
    }

    /// The attempt of a leased job.
    pub(super) fn leased_attempt(&self, id: u64) -> Option<u32> {
        self.leases.get(&id).map(|l| l.attempt)
    }

    /// The agent holding a job's lease.
    fn holder(&self, id: u64) -> Option<&str> {
        self.leases.get(&id).map(|l| l.agent_id.as_str())
    }

    /// The (job, attempt)s `agent_id` holds leases for.
    pub(super) fn held_by(&self, agent_id: &str) -> Vec<(u64, u32)> {
        self.leases
            .iter()
            .filter(|(_, l)| l.agent_id == agent_id)
            .map(|(id, l)| (*id, l.attempt))
            .collect()
    }

    /// Extends the agent's leases on these attempts until `deadline`.
    pub(super) fn extend(&mut self, agent_id: &str, jobs: &[JobRef], deadline: Instant) {
        for j in jobs {
            if let Some(l) = self.leases.get_mut(&j.job_id)
                && l.agent_id == agent_id
                && l.attempt == j.attempt
            {
                l.deadline = deadline;
            }
        }
    }

    /// Leases that are over: (job, attempt, agent, why). A job past its
    /// end counts as overrun even while its agent heartbeats.
    pub(super) fn expired(&self, now: Instant) -> Vec<(u64, u32, String, Expiry)> {
        self.leases
            .iter()
            .filter_map(|(id, l)| {
                let why = if l.ends_at <= now {
                    Expiry::Overran
                } else if l.deadline <= now {
                    Expiry::Silent
                } else {
                    return None;
                };
                Some((*id, l.attempt, l.agent_id.clone(), why))
            })
            .collect()
    }

    /// The agent holding this attempt uploaded artifact `sha256` for it
    /// (verified byte for byte); false if it does not hold the attempt.
    pub(super) fn uploaded(
        &mut self,
        table: &JobTable,
        agent_id: &str,
        job: &JobRef,
        sha256: &str,
    ) -> Result<bool, StoreError> {
        if !self.holds(agent_id, job) {
            return Ok(false);
        }
        if let Some(mut rec) = self.open.get(&job.job_id).cloned() {
            if let Some(a) = rec.attempt_mut(job.attempt) {
                a.uploaded_sha256 = sha256.to_owned();
            }
            table.persist(&rec)?;
            self.open.insert(job.job_id, rec);
        }
        Ok(true)
    }

    /// The agent started a leased job. Written without waiting for the disk:
    /// losing it in a crash only makes the job show as leased.
    pub(super) fn started(
        &mut self,
        table: &JobTable,
        agent_id: &str,
        job: &JobRef,
    ) -> Result<(), StoreError> {
        if !self.holds(agent_id, job) {
            return Ok(());
        }
        if let Some(rec) = self.open.get_mut(&job.job_id) {
            rec.state = JobState::Running;
            table.persist(rec)?;
        }
        Ok(())
    }

    /// Ends an attempt without a result: requeues the job at the front, or
    /// finishes it as an infrastructure error once its attempts are used up
    /// (or as cancelled, if an operator asked for that). `None` if it was
    /// not leased.
    pub(super) fn lose(
        &mut self,
        table: &JobTable,
        id: u64,
        reason: &str,
    ) -> Result<Option<Lost>, StoreError> {
        let Some(lease) = self.leases.get(&id) else {
            return Ok(None);
        };
        let agent_id = lease.agent_id.clone();
        let lost_attempt = lease.attempt;
        let Some(mut rec) = self.open.get(&id).cloned() else {
            self.leases.remove(&id);
            return Ok(None);
        };
        rec.note_lost(lost_attempt, reason.to_string());
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
            rec.finish(outcome, detail);
        } else {
            rec.state = JobState::Queued;
        }
        // Durable first: on a write error the lease stays and is retried.
        table.persist(&rec)?;
        tracing::warn!(job = id, attempt = lost_attempt, agent = %agent_id, "attempt lost: {reason}");
        self.leases.remove(&id);
        let finished = if finish {
            self.open.remove(&id);
            Some(rec.attempt)
        } else {
            self.open.insert(id, rec);
            self.queue.push_front(id);
            None
        };
        Ok(Some(Lost { agent_id, finished }))
    }

    /// Records the result of the attempt `agent_id` holds: finishes the job,
    /// or requeues it after an infrastructure error while attempts are left.
    /// Written first: on a write error the agent keeps its lease and resends
    /// the (unacknowledged) result.
    pub(super) fn record(
        &mut self,
        table: &JobTable,
        agent_id: &str,
        mut result: JobResultRecord,
    ) -> Result<Recorded, StoreError> {
        let job: JobRef = result.job.unwrap_or_default().into();
        if !self.holds(agent_id, &job) {
            return Ok(Recorded::NotHeld);
        }
        let mut finished = None;
        if let Some(mut rec) = self.open.get(&job.job_id).cloned() {
            if result.outcome == Outcome::Unspecified as i32 {
                result.outcome = Outcome::Error.into();
                result.detail = format!("agent reported no outcome. {}", result.detail);
            }
            if let Some(why) = rec.unproven_artifact(&result) {
                tracing::warn!(
                    job = rec.id,
                    attempt = job.attempt,
                    agent = agent_id,
                    "build result not counted: {why}"
                );
                result.outcome = Outcome::Error.into();
                result.detail = why;
                result.artifact_sha256.clear();
            }
            let error = result.outcome == Outcome::Error as i32;
            // A job its agent's donor handed back was not tried: it runs
            // elsewhere without using up one of its attempts.
            let handed_back = error && result.handed_back && !rec.cancel_requested;
            if handed_back {
                rec.max_attempts = rec.max_attempts.saturating_add(1);
            }
            let retry = error && !rec.cancel_requested && rec.attempt < rec.max_attempts;
            if retry {
                // An infrastructure error (checkout, download, upload, disk)
                // is the farm's fault, not the project's: try again, like a
                // lost lease, within max_attempts.
                rec.note_lost(
                    job.attempt,
                    if handed_back {
                        format!("handed back by agent {agent_id}: {}", result.detail)
                    } else {
                        format!("infrastructure error on the agent: {}", result.detail)
                    },
                );
                rec.state = JobState::Queued;
                table.persist(&rec)?;
                tracing::warn!(
                    job = rec.id,
                    attempt = rec.attempt,
                    agent = agent_id,
                    "infrastructure error, requeued: {}",
                    result.detail
                );
                self.open.insert(job.job_id, rec);
                self.queue.push_front(job.job_id);
            } else {
                rec.state = JobState::Finished;
                rec.finished_at_ms = now_ms();
                rec.result = Some(result);
                table.persist(&rec)?;
                finished = Some(rec.attempt);
                self.open.remove(&job.job_id);
            }
        }
        self.leases.remove(&job.job_id);
        Ok(Recorded::Released { finished })
    }

    /// Marks an open job cancelled: a queued one finishes at once, a running
    /// one waits for its agent's result. `None` if it is not open.
    pub(super) fn cancel(
        &mut self,
        table: &JobTable,
        id: u64,
    ) -> Result<Option<Cancelled>, StoreError> {
        let Some(mut rec) = self.open.get(&id).cloned() else {
            return Ok(None);
        };
        rec.cancel_requested = true;
        if rec.state == JobState::Queued {
            rec.finish(
                Outcome::Cancelled,
                "cancelled by an operator before it started".into(),
            );
            table.persist(&rec)?;
            self.open.remove(&id);
            self.queue.retain(|q| *q != id);
            Ok(Some(Cancelled::Finished(rec.attempt)))
        } else {
            table.persist(&rec)?;
            let job = rec.job_ref();
            self.open.insert(id, rec);
            Ok(Some(Cancelled::Running {
                job,
                agent_id: self.holder(id).map(str::to_owned),
            }))
        }
    }

    /// Keys of unfinished keyed jobs starting with `prefix`, with their ids.
    pub(super) fn keys(&self, prefix: &str) -> Vec<(String, u64)> {
        let mut keys: Vec<_> = self
            .open
            .values()
            .filter(|r| !r.key.is_empty() && r.key.starts_with(prefix))
            .map(|r| (r.key.clone(), r.id))
            .collect();
        keys.sort_unstable();
        keys
    }

    /// Queued jobs' labels and how long each has waited (ms).
    pub(super) fn queued_labels(&self) -> Vec<(Vec<String>, u64)> {
        let now = now_ms();
        self.queue
            .iter()
            .filter_map(|id| self.open.get(id))
            .map(|r| (r.spec.labels.clone(), now.saturating_sub(r.created_at_ms)))
            .collect()
    }

    /// Runtime artifacts that unfinished jobs will download.
    pub(super) fn artifacts(&self) -> std::collections::HashSet<String> {
        self.open
            .values()
            .filter(|r| !r.spec.artifact_sha256.is_empty())
            .map(|r| r.spec.artifact_sha256.clone())
            .collect()
    }
}

/// The answer to a result from an agent that no longer holds its attempt,
/// given the job's stored record: a resend of the result already recorded
/// is acknowledged again; anything else is refused, saying why.
pub(super) fn resend_ack(stored: Option<JobRecord>, agent_id: &str, job: JobRef) -> ResultAck {
    let refused = |why: String| {
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
    };
    match stored {
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
        Some(rec) if rec.attempt > job.attempt => refused(format!(
            "the job was requeued as attempt {} after this agent's lease on attempt {} was lost",
            rec.attempt, job.attempt
        )),
        Some(_) => refused("this agent does not hold that job".to_string()),
    }
}
