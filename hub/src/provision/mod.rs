//! On-demand agents: pools of instances the hub starts when matching work
//! waits and stops when they idle, through a [`Provisioner`] (local
//! processes, the operator's scripts). Owns the `provision` tree.
//!
//! Every instance's life cycle is written down before anything happens to it
//! (`i/<pool>/<instance>` → [`Instance`]): *starting* is recorded before the
//! provisioner is asked, *stopping* before it is told, so a restarted hub
//! knows every instance it ever started and none runs unaccounted for. Each
//! instance enrolls with its own single-use, short-lived token (never
//! logged), which also tells the hub which agent is which instance.
//!
//! Policy, per pool, every [`TICK`]: an instance whose agent never
//! connected within `missing_timeout` is terminated and counts as a failed
//! start (starts then back off, doubling up to `start_backoff_max`); an
//! instance whose agent has run nothing for `idle_timeout` is stopped, down
//! to `min_instances` (never one running a job); and when a matching job has
//! waited `pending_grace` with no idle matching agent, instances are started
//! for the waiting jobs, up to `max_instances`.
//!
//! Quotas are the pools' alone: an instance serves at most
//! `max_jobs_per_instance` jobs. The pools give the dispatcher a
//! [`JobBudget`] that limits each pool agent to that many, so the agent
//! drains once it got its last one; the pool then replaces the instance as
//! soon as that job is done.

pub(crate) mod ec2;
pub(crate) mod local;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use trunkfarm_proto::v1;

use crate::auth::credentials::{Credentials, Grant};
use crate::config::{HubConfig, PoolConfig, ProvisionerKind};
use crate::dispatch::{ConnectedAgent, Dispatcher, JobBudget};
use crate::store::{Store, StoreError, Table, now_ms, trees};

/// How often pools are reconciled.
const TICK: Duration = Duration::from_millis(500);

/// The first back-off after a failed start; it doubles per failure.
const FIRST_BACKOFF: Duration = Duration::from_secs(10);

/// Where an instance is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum InstanceState {
    /// Asked to start; its agent has not connected yet.
    Starting,
    /// Its agent connected.
    Running,
    /// Being stopped.
    Stopping,
    /// Stopped.
    Gone,
    /// Never came up (start failed or its agent never connected).
    Failed,
}

/// One instance, as recorded.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Instance {
    /// `<pool>-<n>`.
    pub(crate) id: String,
    /// The pool.
    pub(crate) pool: String,
    /// Where it is.
    pub(crate) state: InstanceState,
    /// The provisioner's handle (a pid, a cloud instance id), once started.
    #[serde(default)]
    pub(crate) handle: String,
    /// The single-use token it enrolls with.
    pub(crate) token_id: String,
    /// Its agent, once enrolled.
    #[serde(default)]
    pub(crate) agent_id: String,
    /// When it was asked to start.
    pub(crate) created_at_ms: u64,
    /// When its agent last ran a job (or connected).
    #[serde(default)]
    pub(crate) last_busy_ms: u64,
    /// Why it was stopped or failed.
    #[serde(default)]
    pub(crate) detail: String,
}

/// Failed starts of a pool and when the next start is allowed.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Backoff {
    /// Failed starts in a row.
    pub(crate) failures: u32,
    /// No start before this (ms).
    pub(crate) next_start_at_ms: u64,
    /// The last failure's reason.
    pub(crate) last_error: String,
}

/// What a provisioner needs to start one instance.
pub(crate) struct StartSpec {
    /// The instance's name.
    pub(crate) instance: String,
    /// The pool's config.
    pub(crate) pool: PoolConfig,
    /// The one-time enrollment string (a secret: never log it).
    pub(crate) enrollment: String,
}

/// Starts and stops instances: the seam between the pools' policy and a
/// kind of machine (local processes, scripts, EC2; a fake cloud in tests).
#[tonic::async_trait]
pub(crate) trait Provisioner: Send + Sync {
    /// Starts one; returns its handle.
    async fn start(&self, spec: &StartSpec) -> Result<String, String>;
    /// Stops one (idempotent).
    async fn stop(&self, instance: &Instance) -> Result<(), String>;
    /// Handles of instances it can see that carry this hub's tag, so unknown
    /// ones can be terminated; `None` if it cannot list.
    async fn list(&self, pool: &str) -> Option<Vec<String>>;
}

/// Everything the pools share.
struct Inner {
    store: Store,
    /// The `provision` tree: `i/<pool>/<instance>` → [`Instance`],
    /// `b/<pool>` → [`Backoff`].
    table: Table,
    dispatch: Dispatcher,
    credentials: Credentials,
    enrollment: Box<dyn Fn(String) -> String + Send + Sync>,
    pools: Vec<(PoolConfig, Arc<dyn Provisioner>)>,
    /// Serialises reconciliation (one tick at a time).
    busy: tokio::sync::Mutex<()>,
    /// Instances whose stop is in flight (provisioner, then record).
    stopping: Mutex<HashSet<String>>,
    /// Signalled whenever an in-flight stop is recorded.
    stopped: tokio::sync::Notify,
}

/// The pools (cheap to clone).
#[derive(Clone)]
pub(crate) struct Pools {
    inner: Arc<Inner>,
}

/// The pools' quota as the dispatcher applies it: an agent enrolled for a
/// pool (its token's `pool-<name>` label) gets at most that pool's
/// `max_jobs_per_instance` jobs.
struct JobsPerInstance(Vec<(String, u64)>);

impl JobBudget for JobsPerInstance {
    fn jobs_for(&self, labels: &HashSet<String>) -> Option<u64> {
        self.0
            .iter()
            .find(|(label, _)| labels.contains(label))
            .map(|(_, max)| *max)
    }
}

fn key(pool: &str, id: &str) -> String {
    format!("i/{pool}/{id}")
}

fn backoff_key(pool: &str) -> String {
    format!("b/{pool}")
}

/// The label every agent of a pool carries (from its enrollment token).
fn pool_label(pool: &str) -> String {
    format!("pool-{pool}")
}

impl Pools {
    /// Opens the records, terminates instances the hub does not know, and
    /// starts reconciling every pool until `shutdown`.
    pub(crate) async fn start(
        config: &HubConfig,
        store: &Store,
        dispatch: Dispatcher,
        credentials: Credentials,
        enrollment: Box<dyn Fn(String) -> String + Send + Sync>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Pools> {
        let mut pools: Vec<(PoolConfig, Arc<dyn Provisioner>)> = Vec::new();
        for p in &config.pools {
            let provisioner: Arc<dyn Provisioner> = match p.provisioner {
                ProvisionerKind::Local => Arc::new(local::Local::new(
                    config.data_dir().join("pools").join(&p.name),
                    p,
                    config.data_dir(),
                )?),
                ProvisionerKind::Command => Arc::new(local::Command::new(p.clone())),
                ProvisionerKind::Ec2 => Arc::new(ec2::Ec2::new(
                    p.clone(),
                    config
                        .hub
                        .hub_id
                        .clone()
                        .unwrap_or_else(|| "trunkfarm".into()),
                )?),
            };
            pools.push((p.clone(), provisioner));
        }
        let this = Pools::open(store, dispatch, credentials, enrollment, pools)?;
        if !this.inner.pools.is_empty() {
            let p = this.clone();
            tokio::spawn(async move {
                // First, before any new start: terminate what the hub does
                // not know (in the background: a slow stop must not hold up
                // serving).
                p.reap_orphans().await;
                loop {
                    if let Err(e) = p.tick().await {
                        tracing::error!("pools: {e}");
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(TICK) => {}
                    }
                }
            });
        }
        Ok(this)
    }

    /// The pools over their provisioners, their quotas handed to the
    /// dispatcher; nothing runs until [`Pools::reap_orphans`] and
    /// [`Pools::tick`] are called.
    fn open(
        store: &Store,
        dispatch: Dispatcher,
        credentials: Credentials,
        enrollment: Box<dyn Fn(String) -> String + Send + Sync>,
        pools: Vec<(PoolConfig, Arc<dyn Provisioner>)>,
    ) -> Result<Pools, StoreError> {
        let quotas: Vec<(String, u64)> = pools
            .iter()
            .filter(|(c, _)| c.max_jobs_per_instance > 0)
            .map(|(c, _)| (pool_label(&c.name), u64::from(c.max_jobs_per_instance)))
            .collect();
        if !quotas.is_empty() {
            dispatch.set_job_budget(Arc::new(JobsPerInstance(quotas)));
        }
        Ok(Pools {
            inner: Arc::new(Inner {
                store: store.clone(),
                table: Table::open(store, trees::PROVISION)?,
                dispatch,
                credentials,
                enrollment,
                pools,
                busy: tokio::sync::Mutex::new(()),
                stopping: Mutex::new(HashSet::new()),
                stopped: tokio::sync::Notify::new(),
            }),
        })
    }

    fn put(&self, inst: &Instance) -> Result<(), StoreError> {
        self.inner.table.put(key(&inst.pool, &inst.id), inst)
    }

    /// Every recorded instance of a pool (all states).
    pub(crate) fn instances(&self, pool: &str) -> Result<Vec<Instance>, StoreError> {
        self.inner
            .table
            .scan(format!("i/{pool}/"))
            .map(|item| item.map(|(_, inst)| inst))
            .collect()
    }

    /// A pool's back-off state.
    pub(crate) fn backoff(&self, pool: &str) -> Result<Backoff, StoreError> {
        Ok(self.inner.table.get(backoff_key(pool))?.unwrap_or_default())
    }

    /// The configured pools.
    pub(crate) fn configs(&self) -> Vec<PoolConfig> {
        self.inner.pools.iter().map(|(c, _)| c.clone()).collect()
    }

    /// Terminates what a provisioner shows for this hub's pools but the
    /// records do not know (and adopts nothing silently).
    async fn reap_orphans(&self) {
        for (cfg, prov) in &self.inner.pools {
            let Some(seen) = prov.list(&cfg.name).await else {
                continue;
            };
            let known: Vec<String> = match self.instances(&cfg.name) {
                Ok(list) => list
                    .into_iter()
                    .filter(|i| {
                        matches!(
                            i.state,
                            InstanceState::Starting
                                | InstanceState::Running
                                | InstanceState::Stopping
                        )
                    })
                    .map(|i| i.handle)
                    .collect(),
                Err(e) => {
                    tracing::error!("pool {}: cannot read its instances: {e}", cfg.name);
                    continue;
                }
            };
            for handle in seen {
                if !known.contains(&handle) {
                    tracing::warn!(pool = %cfg.name, %handle, "terminating an instance this hub does not know");
                    let orphan = Instance {
                        id: handle.clone(),
                        pool: cfg.name.clone(),
                        state: InstanceState::Stopping,
                        handle,
                        token_id: String::new(),
                        agent_id: String::new(),
                        created_at_ms: 0,
                        last_busy_ms: 0,
                        detail: "orphan".into(),
                    };
                    if let Err(e) = prov.stop(&orphan).await {
                        tracing::error!(pool = %cfg.name, "cannot terminate an orphan: {e}");
                    }
                }
            }
        }
    }

    /// One reconciliation of every pool, now.
    async fn tick(&self) -> Result<(), StoreError> {
        self.tick_at(now_ms()).await
    }

    /// One reconciliation of every pool as of `now` (ms since the epoch).
    async fn tick_at(&self, now: u64) -> Result<(), StoreError> {
        let _one = self.inner.busy.lock().await;
        let agents = self.inner.credentials.list_agents().unwrap_or_default();
        let by_token: HashMap<String, String> = agents
            .into_iter()
            .map(|a| (a.token_id.clone(), a.id.clone()))
            .collect();
        let seen = Seen {
            by_token,
            connected: self.inner.dispatch.connected(),
            queued: self.inner.dispatch.queued_labels(),
            now,
        };
        for (cfg, prov) in &self.inner.pools {
            self.reconcile(cfg, prov, &seen).await?;
        }
        Ok(())
    }

    async fn reconcile(
        &self,
        cfg: &PoolConfig,
        prov: &Arc<dyn Provisioner>,
        seen: &Seen,
    ) -> Result<(), StoreError> {
        let now = seen.now;
        let mut live = Vec::new();
        for mut inst in self.instances(&cfg.name)? {
            if inst.state == InstanceState::Stopping {
                // Interrupted (hub restart) or failed: try again.
                let end = if inst.agent_id.is_empty() {
                    InstanceState::Failed
                } else {
                    InstanceState::Gone
                };
                let why = inst.detail.clone();
                self.spawn_stop(cfg, prov, inst, end, why);
                continue;
            }
            if !matches!(inst.state, InstanceState::Starting | InstanceState::Running) {
                continue;
            }
            if inst.agent_id.is_empty()
                && let Some(agent) = seen.by_token.get(&inst.token_id)
            {
                inst.agent_id = agent.clone();
            }
            let conn = seen.connected.get(&inst.agent_id);
            if inst.state == InstanceState::Starting && conn.is_some() {
                inst.state = InstanceState::Running;
                inst.last_busy_ms = now;
                tracing::info!(pool = %cfg.name, instance = %inst.id, agent = %inst.agent_id, "instance connected");
                self.put(&inst)?;
                self.note_success(cfg)?;
            }
            if let Some(c) = conn {
                if !c.running.is_empty() {
                    inst.last_busy_ms = now;
                    self.put(&inst)?;
                }
                // A fresh machine every N jobs: its agent got no new job
                // after the N-th (its budget), and goes once that is done.
                if cfg.max_jobs_per_instance > 0 && c.jobs_left == Some(0) && c.running.is_empty() {
                    let why = format!(
                        "served {} job(s) (pool.max_jobs_per_instance)",
                        cfg.max_jobs_per_instance
                    );
                    self.stop(cfg, prov, inst, InstanceState::Gone, &why)
                        .await?;
                    continue;
                }
            }
            let missing_ms = cfg.missing_timeout.as_millis() as u64;
            if inst.state == InstanceState::Starting
                && now.saturating_sub(inst.created_at_ms) > missing_ms
            {
                let why = format!(
                    "its agent did not connect within {} (pool.missing_timeout)",
                    humantime::format_duration(cfg.missing_timeout)
                );
                self.stop(cfg, prov, inst, InstanceState::Failed, &why)
                    .await?;
                self.note_failure(cfg, &why, now)?;
                continue;
            }
            live.push(inst);
        }
        // Idle instances go, longest idle first, down to min_instances.
        let idle_ms = cfg.idle_timeout.as_millis() as u64;
        let mut count = live.len() as u32;
        let mut idle: Vec<&Instance> = live
            .iter()
            .filter(|i| {
                i.state == InstanceState::Running
                    && seen
                        .connected
                        .get(&i.agent_id)
                        .is_some_and(|c| c.running.is_empty())
                    && now.saturating_sub(i.last_busy_ms) > idle_ms
            })
            .collect();
        idle.sort_by_key(|i| i.last_busy_ms);
        let mut stopped = Vec::new();
        for inst in idle {
            if count <= cfg.min_instances {
                break;
            }
            stopped.push(inst.id.clone());
            count -= 1;
        }
        for id in &stopped {
            if let Some(inst) = live.iter().find(|i| &i.id == id).cloned() {
                self.stop(cfg, prov, inst, InstanceState::Gone, "idle")
                    .await?;
            }
        }
        live.retain(|i| !stopped.contains(&i.id));

        // Demand: matching jobs waiting past the grace period, with no idle
        // matching agent to take them.
        let grace_ms = cfg.pending_grace.as_millis() as u64;
        let labels = self.pool_labels(cfg);
        let covers = |wanted: &[String]| wanted.iter().all(|l| labels.contains(l));
        let waiting = seen
            .queued
            .iter()
            .filter(|(wanted, waited)| *waited >= grace_ms && covers(wanted))
            .count() as u32;
        let idle_capacity: u32 = seen
            .connected
            .values()
            .filter(|c| !c.draining && covers_all(&c.labels, &labels))
            .map(|c| {
                c.caps
                    .max_parallel_jobs
                    .saturating_sub(c.running.len() as u32)
            })
            .sum();
        let starting = live
            .iter()
            .filter(|i| i.state == InstanceState::Starting)
            .count() as u32;
        let per = cfg.max_parallel_jobs.max(1);
        let mut want = waiting
            .saturating_sub(idle_capacity)
            .div_ceil(per)
            .saturating_sub(starting);
        let count = live.len() as u32;
        want = want.max(cfg.min_instances.saturating_sub(count));
        want = want.min(cfg.max_instances.saturating_sub(count));
        if want > 0 {
            let backoff = self.backoff(&cfg.name)?;
            if now < backoff.next_start_at_ms {
                return Ok(());
            }
            for _ in 0..want {
                if !self.start_one(cfg, prov, now).await? {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Labels a pool's agents carry (the agents add their platform labels).
    fn pool_labels(&self, cfg: &PoolConfig) -> Vec<String> {
        let mut labels = cfg.labels.clone();
        labels.push(pool_label(&cfg.name));
        if cfg.provisioner == ProvisionerKind::Local {
            labels.extend(trunkfarm_proto::platform::labels(
                std::env::consts::OS,
                std::env::consts::ARCH,
            ));
        }
        labels
    }

    /// Starts one instance; false if it failed (the pool backs off).
    async fn start_one(
        &self,
        cfg: &PoolConfig,
        prov: &Arc<dyn Provisioner>,
        now: u64,
    ) -> Result<bool, StoreError> {
        let s = &self.inner;
        let id = format!("{}-{}", cfg.name, s.store.next_id()?);
        let mut labels = cfg.labels.clone();
        labels.push(pool_label(&cfg.name));
        let ttl = cfg.missing_timeout + Duration::from_secs(60);
        let (token, secret) = match s
            .credentials
            .create_token(
                // The operator's own machines: trusted, with the pool's slots.
                Grant {
                    labels,
                    trusted: true,
                    max_parallel_jobs: cfg.max_parallel_jobs,
                },
                ttl,
                1,
                format!("pool {} instance {id}", cfg.name),
            )
            .await
        {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(pool = %cfg.name, "cannot mint an enrollment token: {e}");
                return Ok(false);
            }
        };
        let mut inst = Instance {
            id: id.clone(),
            pool: cfg.name.clone(),
            state: InstanceState::Starting,
            handle: String::new(),
            token_id: token.id.clone(),
            agent_id: String::new(),
            created_at_ms: now,
            last_busy_ms: 0,
            detail: String::new(),
        };
        // Durable before the provisioner acts: a crash now leaves a record.
        self.put(&inst)?;
        s.store.commit().await?;
        let spec = StartSpec {
            instance: id.clone(),
            pool: cfg.clone(),
            enrollment: (s.enrollment)(secret),
        };
        match prov.start(&spec).await {
            Ok(handle) => {
                tracing::info!(pool = %cfg.name, instance = %id, %handle, "instance started");
                inst.handle = handle;
                self.put(&inst)?;
                s.store.commit().await?;
                Ok(true)
            }
            Err(why) => {
                tracing::warn!(pool = %cfg.name, instance = %id, "start failed: {why}");
                inst.state = InstanceState::Failed;
                inst.detail = format!("start failed: {why}");
                self.put(&inst)?;
                if let Err(e) = s.credentials.revoke_token(&token.id).await {
                    tracing::error!(pool = %cfg.name, instance = %id, "cannot revoke the failed instance's enrollment token (it expires by itself): {e}");
                }
                self.note_failure(cfg, &inst.detail, now)?;
                s.store.commit().await?;
                Ok(false)
            }
        }
    }

    /// Records the instance *stopping* (durably), then has it stopped in
    /// the background.
    async fn stop(
        &self,
        cfg: &PoolConfig,
        prov: &Arc<dyn Provisioner>,
        mut inst: Instance,
        end: InstanceState,
        why: &str,
    ) -> Result<(), StoreError> {
        inst.state = InstanceState::Stopping;
        inst.detail = why.to_owned();
        self.put(&inst)?;
        self.inner.store.commit().await?;
        self.spawn_stop(cfg, prov, inst, end, why.to_owned());
        Ok(())
    }

    /// Stops a *stopping* instance in the background (the provisioner may
    /// take a while: a draining agent, a cloud API; the pool goes on
    /// meanwhile), unless its stop is in flight already.
    fn spawn_stop(
        &self,
        cfg: &PoolConfig,
        prov: &Arc<dyn Provisioner>,
        inst: Instance,
        end: InstanceState,
        why: String,
    ) {
        let s = &self.inner;
        if !s
            .stopping
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(inst.id.clone())
        {
            return;
        }
        let this = self.clone();
        let (cfg, prov) = (cfg.clone(), prov.clone());
        tokio::spawn(async move {
            let id = inst.id.clone();
            if let Err(e) = this.finish_stop(&cfg, &prov, inst, end, &why).await {
                tracing::error!(pool = %cfg.name, instance = %id, "recording a stop failed (retried later): {e}");
            }
            let s = &this.inner;
            s.stopping
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            s.stopped.notify_waiters();
        });
    }

    /// Returns once no stop is in flight.
    #[cfg(test)]
    async fn stops_settled(&self) {
        loop {
            let stopped = self.inner.stopped.notified();
            tokio::pin!(stopped);
            stopped.as_mut().enable();
            if self
                .inner
                .stopping
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty()
            {
                return;
            }
            stopped.await;
        }
    }

    /// The provisioner's part of a stop, then the agent's credential and
    /// session, then the record.
    async fn finish_stop(
        &self,
        cfg: &PoolConfig,
        prov: &Arc<dyn Provisioner>,
        mut inst: Instance,
        end: InstanceState,
        why: &str,
    ) -> Result<(), StoreError> {
        let s = &self.inner;
        if let Err(e) = prov.stop(&inst).await {
            tracing::error!(pool = %cfg.name, instance = %inst.id, "stop failed (retried later): {e}");
            return Ok(());
        }
        if !inst.agent_id.is_empty() {
            // It will not come back: its credential goes too.
            if let Err(e) =
                crate::dispatch::revoke_agent(&s.credentials, &s.dispatch, &inst.agent_id).await
            {
                tracing::error!(pool = %cfg.name, instance = %inst.id, agent = %inst.agent_id, "cannot revoke the stopped instance's agent: {e}");
            }
        }
        tracing::info!(pool = %cfg.name, instance = %inst.id, "instance stopped: {why}");
        inst.state = end;
        self.put(&inst)?;
        s.store.commit().await
    }

    fn note_failure(&self, cfg: &PoolConfig, why: &str, now: u64) -> Result<(), StoreError> {
        let mut b = self.backoff(&cfg.name)?;
        b.failures += 1;
        let wait = FIRST_BACKOFF
            .saturating_mul(1u32 << (b.failures - 1).min(16))
            .min(cfg.start_backoff_max);
        b.next_start_at_ms = now + wait.as_millis() as u64;
        b.last_error = why.to_owned();
        self.inner.table.put(backoff_key(&cfg.name), &b)
    }

    fn note_success(&self, cfg: &PoolConfig) -> Result<(), StoreError> {
        let b = self.backoff(&cfg.name)?;
        if b.failures > 0 {
            self.inner
                .table
                .put(backoff_key(&cfg.name), &Backoff::default())?;
        }
        Ok(())
    }
}

/// What one tick sees of the rest of the hub.
struct Seen {
    /// Enrolled agents by the token they enrolled with.
    by_token: HashMap<String, String>,
    connected: HashMap<String, ConnectedAgent>,
    /// Queued jobs' labels and how long each waited (ms).
    queued: Vec<(Vec<String>, u64)>,
    /// The tick's time (ms since the epoch).
    now: u64,
}

fn covers_all(have: &[String], want: &[String]) -> bool {
    want.iter()
        .filter(|l| l.starts_with("pool-"))
        .all(|l| have.contains(l))
}

/// One configured pool as the operator's list shows it.
pub(crate) struct PoolView {
    pub(crate) config: PoolConfig,
    pub(crate) backoff: Backoff,
    pub(crate) instances: Vec<InstanceView>,
}

/// One instance in [`PoolView`].
pub(crate) struct InstanceView {
    pub(crate) instance: Instance,
    /// Its agent's session holds a job right now.
    pub(crate) busy: bool,
}

impl InstanceState {
    /// The word the operator sees (as the record spells it).
    fn as_str(self) -> &'static str {
        match self {
            InstanceState::Starting => "starting",
            InstanceState::Running => "running",
            InstanceState::Stopping => "stopping",
            InstanceState::Gone => "gone",
            InstanceState::Failed => "failed",
        }
    }
}

/// The operator's pool list: each configured pool with its back-off and
/// its instances (only starting, running and stopping ones unless `all`),
/// an instance being busy when its agent's session holds a job. The join
/// lives here, beside the records it reads; the admin API converts it to
/// its wire type ([`v1::PoolInfo`]).
pub(crate) fn pool_views(pools: &Pools, all: bool) -> Result<Vec<PoolView>, StoreError> {
    let connected = pools.inner.dispatch.connected();
    let mut views = Vec::new();
    for config in pools.configs() {
        let backoff = pools.backoff(&config.name)?;
        let instances = pools
            .instances(&config.name)?
            .into_iter()
            .filter(|i| {
                all || matches!(
                    i.state,
                    InstanceState::Starting | InstanceState::Running | InstanceState::Stopping
                )
            })
            .map(|instance| InstanceView {
                busy: connected
                    .get(&instance.agent_id)
                    .is_some_and(|c| !c.running.is_empty()),
                instance,
            })
            .collect();
        views.push(PoolView {
            config,
            backoff,
            instances,
        });
    }
    Ok(views)
}

impl From<PoolView> for v1::PoolInfo {
    fn from(p: PoolView) -> Self {
        v1::PoolInfo {
            provisioner: format!("{:?}", p.config.provisioner).to_lowercase(),
            name: p.config.name,
            labels: p.config.labels,
            min_instances: p.config.min_instances,
            max_instances: p.config.max_instances,
            instances: p.instances.into_iter().map(Into::into).collect(),
            failed_starts: p.backoff.failures,
            next_start_at_ms: p.backoff.next_start_at_ms,
            last_error: p.backoff.last_error,
        }
    }
}

impl From<InstanceView> for v1::InstanceInfo {
    fn from(v: InstanceView) -> Self {
        let i = v.instance;
        v1::InstanceInfo {
            state: i.state.as_str().to_owned(),
            id: i.id,
            handle: i.handle,
            agent_id: i.agent_id,
            created_at_ms: i.created_at_ms,
            last_busy_ms: i.last_busy_ms,
            busy: v.busy,
            detail: i.detail,
        }
    }
}
