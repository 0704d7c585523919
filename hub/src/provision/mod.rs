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

pub mod ec2;
pub mod local;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::auth::credentials::Credentials;
use crate::config::{HubConfig, PoolConfig, ProvisionerKind};
use crate::dispatch::Dispatcher;
use crate::store::{Store, StoreError, now_ms};

/// The tree this module owns.
const TREE: &str = crate::store::trees::PROVISION;

/// How often pools are reconciled.
const TICK: Duration = Duration::from_millis(500);

/// The first back-off after a failed start; it doubles per failure.
const FIRST_BACKOFF: Duration = Duration::from_secs(10);

/// Where an instance is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
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
pub struct Instance {
    /// `<pool>-<n>`.
    pub id: String,
    /// The pool.
    pub pool: String,
    /// Where it is.
    pub state: InstanceState,
    /// The provisioner's handle (a pid, a cloud instance id), once started.
    #[serde(default)]
    pub handle: String,
    /// The single-use token it enrolls with.
    pub token_id: String,
    /// Its agent, once enrolled.
    #[serde(default)]
    pub agent_id: String,
    /// When it was asked to start.
    pub created_at_ms: u64,
    /// When its agent last ran a job (or connected).
    #[serde(default)]
    pub last_busy_ms: u64,
    /// Why it was stopped or failed.
    #[serde(default)]
    pub detail: String,
}

/// Failed starts of a pool and when the next start is allowed.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Backoff {
    /// Failed starts in a row.
    pub failures: u32,
    /// No start before this (ms).
    pub next_start_at_ms: u64,
    /// The last failure's reason.
    pub last_error: String,
}

/// What a provisioner needs to start one instance.
pub struct StartSpec {
    /// The instance's name.
    pub instance: String,
    /// The pool's config.
    pub pool: PoolConfig,
    /// The one-time enrollment string (a secret: never log it).
    pub enrollment: String,
}

/// Starts and stops instances.
#[tonic::async_trait]
pub trait Provisioner: Send + Sync {
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
    tree: sled::Tree,
    dispatch: Dispatcher,
    credentials: Credentials,
    enrollment: Box<dyn Fn(String) -> String + Send + Sync>,
    pools: Vec<(PoolConfig, Arc<dyn Provisioner>)>,
    /// Serialises reconciliation (one tick at a time).
    busy: tokio::sync::Mutex<()>,
    errors: Mutex<HashMap<String, String>>,
    /// Instances whose provisioner stop is in flight.
    stopping: Mutex<std::collections::HashSet<String>>,
}

/// The pools (cheap to clone).
#[derive(Clone)]
pub struct Pools {
    inner: Arc<Inner>,
}

impl Pools {
    /// Opens the records, terminates instances the hub does not know, and
    /// starts reconciling every pool until `shutdown`.
    pub async fn start(
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
                    p.agent_binary.clone(),
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
            if p.max_jobs_per_instance > 0 {
                dispatch.limit_jobs_per_agent(
                    &format!("pool-{}", p.name),
                    u64::from(p.max_jobs_per_instance),
                );
            }
            pools.push((p.clone(), provisioner));
        }
        let this = Pools {
            inner: Arc::new(Inner {
                store: store.clone(),
                tree: store.tree(TREE)?,
                dispatch,
                credentials,
                enrollment,
                pools,
                busy: tokio::sync::Mutex::new(()),
                errors: Mutex::new(HashMap::new()),
                stopping: Mutex::new(Default::default()),
            }),
        };
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

    fn key(pool: &str, id: &str) -> String {
        format!("i/{pool}/{id}")
    }

    fn put<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StoreError> {
        let s = &self.inner;
        let bytes = serde_json::to_vec(value).map_err(|e| s.store.corrupt("(encode pool)", e))?;
        s.tree.insert(key, bytes).map_err(|e| s.store.err(e))?;
        Ok(())
    }

    /// Every recorded instance of a pool (all states).
    pub fn instances(&self, pool: &str) -> Result<Vec<Instance>, StoreError> {
        let s = &self.inner;
        let mut out = Vec::new();
        for item in s.tree.scan_prefix(format!("i/{pool}/")) {
            let (k, v) = item.map_err(|e| s.store.err(e))?;
            out.push(serde_json::from_slice(&v).map_err(|e| {
                s.store
                    .corrupt(format!("{TREE}/{}", String::from_utf8_lossy(&k)), e)
            })?);
        }
        Ok(out)
    }

    /// A pool's back-off state.
    pub fn backoff(&self, pool: &str) -> Result<Backoff, StoreError> {
        let s = &self.inner;
        match s
            .tree
            .get(format!("b/{pool}"))
            .map_err(|e| s.store.err(e))?
        {
            None => Ok(Backoff::default()),
            Some(raw) => serde_json::from_slice(&raw)
                .map_err(|e| s.store.corrupt(format!("{TREE}/b/{pool}"), e)),
        }
    }

    /// The configured pools.
    pub fn configs(&self) -> Vec<PoolConfig> {
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

    /// One reconciliation of every pool.
    async fn tick(&self) -> Result<(), StoreError> {
        let _one = self.inner.busy.lock().await;
        let agents = self.inner.credentials.list_agents().unwrap_or_default();
        let by_token: HashMap<String, String> = agents
            .into_iter()
            .map(|a| (a.token_id.clone(), a.id.clone()))
            .collect();
        let connected = self.inner.dispatch.connected();
        let queued = self.inner.dispatch.queued_labels();
        for i in 0..self.inner.pools.len() {
            let (cfg, prov) = {
                let (c, p) = &self.inner.pools[i];
                (c.clone(), p.clone())
            };
            self.reconcile(&cfg, prov, &by_token, &connected, &queued)
                .await?;
        }
        Ok(())
    }

    async fn reconcile(
        &self,
        cfg: &PoolConfig,
        prov: Arc<dyn Provisioner>,
        by_token: &HashMap<String, String>,
        connected: &HashMap<String, crate::dispatch::ConnectedAgent>,
        queued: &[(Vec<String>, u64)],
    ) -> Result<(), StoreError> {
        let now = now_ms();
        let mut live = Vec::new();
        for mut inst in self.instances(&cfg.name)? {
            if inst.state == InstanceState::Stopping {
                // Interrupted (hub restart) or failed: try again.
                let in_flight = self
                    .inner
                    .stopping
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains(&inst.id);
                if !in_flight {
                    let end = if inst.agent_id.is_empty() {
                        InstanceState::Failed
                    } else {
                        InstanceState::Gone
                    };
                    let why = inst.detail.clone();
                    let this = self.clone();
                    let (c, p) = (cfg.clone(), prov.clone());
                    tokio::spawn(async move {
                        let _ = this.finish_stop(&c, &p, inst, end, &why).await;
                    });
                }
                continue;
            }
            if !matches!(inst.state, InstanceState::Starting | InstanceState::Running) {
                continue;
            }
            if inst.agent_id.is_empty() {
                if let Some(agent) = by_token.get(&inst.token_id) {
                    inst.agent_id = agent.clone();
                }
            }
            let conn = connected.get(&inst.agent_id);
            if inst.state == InstanceState::Starting && conn.is_some() {
                inst.state = InstanceState::Running;
                inst.last_busy_ms = now;
                tracing::info!(pool = %cfg.name, instance = %inst.id, agent = %inst.agent_id, "instance connected");
                self.put(&Self::key(&cfg.name, &inst.id), &inst)?;
                self.note_success(cfg)?;
            }
            if let Some(c) = conn {
                if !c.running.is_empty() {
                    inst.last_busy_ms = now;
                    self.put(&Self::key(&cfg.name, &inst.id), &inst)?;
                }
                // A fresh machine every N jobs: no new job once it served N,
                // stopped as soon as its last one is done.
                let max = u64::from(cfg.max_jobs_per_instance);
                if max > 0 && c.completed >= max {
                    self.inner.dispatch.set_draining(&inst.agent_id);
                    if c.running.is_empty() {
                        let why =
                            format!("served {} job(s) (pool.max_jobs_per_instance)", c.completed);
                        self.stop(cfg, &prov, inst, InstanceState::Gone, &why)
                            .await?;
                        continue;
                    }
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
                self.stop(cfg, &prov, inst, InstanceState::Failed, &why)
                    .await?;
                self.note_failure(cfg, &why)?;
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
                    && connected
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
                self.stop(cfg, &prov, inst, InstanceState::Gone, "idle")
                    .await?;
            }
        }
        live.retain(|i| !stopped.contains(&i.id));

        // Demand: matching jobs waiting past the grace period, with no idle
        // matching agent to take them.
        let grace_ms = cfg.pending_grace.as_millis() as u64;
        let covers = |labels: &[String]| labels.iter().all(|l| self.pool_labels(cfg).contains(l));
        let waiting = queued
            .iter()
            .filter(|(labels, waited)| *waited >= grace_ms && covers(labels))
            .count() as u32;
        let idle_capacity: u32 = connected
            .values()
            .filter(|c| !c.draining && covers_all(&c.labels, &self.pool_labels(cfg)))
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
                if !self.start_one(cfg, &prov).await? {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Labels a pool's agents carry (the agents add their platform labels).
    fn pool_labels(&self, cfg: &PoolConfig) -> Vec<String> {
        let mut labels = cfg.labels.clone();
        labels.push(format!("pool-{}", cfg.name));
        if cfg.provisioner == ProvisionerKind::Local {
            let (os, arch) = (std::env::consts::OS, std::env::consts::ARCH);
            labels.extend([os.to_owned(), arch.to_owned(), format!("{os}-{arch}")]);
        }
        labels
    }

    /// Starts one instance; false if it failed (the pool backs off).
    async fn start_one(
        &self,
        cfg: &PoolConfig,
        prov: &Arc<dyn Provisioner>,
    ) -> Result<bool, StoreError> {
        let s = &self.inner;
        let id = format!("{}-{}", cfg.name, s.store.next_id()?);
        let mut labels = cfg.labels.clone();
        labels.push(format!("pool-{}", cfg.name));
        let ttl = cfg.missing_timeout + Duration::from_secs(60);
        let (token, secret) = match s
            .credentials
            .create_token(labels, ttl, 1, format!("pool {} instance {id}", cfg.name))
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
            created_at_ms: now_ms(),
            last_busy_ms: 0,
            detail: String::new(),
        };
        // Durable before the provisioner acts: a crash now leaves a record.
        self.put(&Self::key(&cfg.name, &id), &inst)?;
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
                self.put(&Self::key(&cfg.name, &id), &inst)?;
                s.store.commit().await?;
                Ok(true)
            }
            Err(why) => {
                tracing::warn!(pool = %cfg.name, instance = %id, "start failed: {why}");
                inst.state = InstanceState::Failed;
                inst.detail = format!("start failed: {why}");
                self.put(&Self::key(&cfg.name, &id), &inst)?;
                if let Err(e) = s.credentials.revoke_token(&token.id).await {
                    tracing::error!(pool = %cfg.name, instance = %id, "cannot revoke the failed instance's enrollment token (it expires by itself): {e}");
                }
                self.note_failure(cfg, &inst.detail)?;
                s.store.commit().await?;
                Ok(false)
            }
        }
    }

    async fn stop(
        &self,
        cfg: &PoolConfig,
        prov: &Arc<dyn Provisioner>,
        mut inst: Instance,
        end: InstanceState,
        why: &str,
    ) -> Result<(), StoreError> {
        let s = &self.inner;
        inst.state = InstanceState::Stopping;
        inst.detail = why.to_owned();
        self.put(&Self::key(&cfg.name, &inst.id), &inst)?;
        s.store.commit().await?;
        // The provisioner may take a while (a draining agent, a cloud API):
        // the pool goes on meanwhile.
        let this = self.clone();
        let (cfg, prov, why) = (cfg.clone(), prov.clone(), why.to_owned());
        tokio::spawn(async move {
            if let Err(e) = this.finish_stop(&cfg, &prov, inst, end, &why).await {
                tracing::error!(pool = %cfg.name, "recording a stop failed: {e}");
            }
        });
        Ok(())
    }

    /// The provisioner's part of a stop, then the record.
    async fn finish_stop(
        &self,
        cfg: &PoolConfig,
        prov: &Arc<dyn Provisioner>,
        mut inst: Instance,
        end: InstanceState,
        why: &str,
    ) -> Result<(), StoreError> {
        let s = &self.inner;
        if !s
            .stopping
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(inst.id.clone())
        {
            return Ok(());
        }
        let result = prov.stop(&inst).await;
        s.stopping
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&inst.id);
        if let Err(e) = result {
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
        self.put(&Self::key(&cfg.name, &inst.id), &inst)?;
        s.store.commit().await
    }

    fn note_failure(&self, cfg: &PoolConfig, why: &str) -> Result<(), StoreError> {
        let mut b = self.backoff(&cfg.name)?;
        b.failures += 1;
        let wait = FIRST_BACKOFF
            .saturating_mul(1u32 << (b.failures - 1).min(16))
            .min(cfg.start_backoff_max);
        b.next_start_at_ms = now_ms() + wait.as_millis() as u64;
        b.last_error = why.to_owned();
        self.inner
            .errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(cfg.name.clone(), why.to_owned());
        self.put(&format!("b/{}", cfg.name), &b)
    }

    fn note_success(&self, cfg: &PoolConfig) -> Result<(), StoreError> {
        let b = self.backoff(&cfg.name)?;
        if b.failures > 0 {
            self.put(&format!("b/{}", cfg.name), &Backoff::default())?;
        }
        Ok(())
    }
}

fn covers_all(have: &[String], want: &[String]) -> bool {
    want.iter()
        .filter(|l| l.starts_with("pool-"))
        .all(|l| have.contains(l))
}

/// The operator's pool list: each configured pool with its back-off and
/// its instances (only starting, running and stopping ones unless `all`),
/// an instance being busy when its agent's session holds a job. The join
/// lives here, beside the records it reads; the admin API only passes it on.
pub(crate) fn pool_views(
    pools: &Pools,
    all: bool,
) -> Result<Vec<trunkfarm_proto::v1::PoolInfo>, StoreError> {
    let connected = pools.inner.dispatch.connected();
    let mut views = Vec::new();
    for cfg in pools.configs() {
        let backoff = pools.backoff(&cfg.name)?;
        let instances = pools
            .instances(&cfg.name)?
            .into_iter()
            .filter(|i| {
                all || matches!(
                    i.state,
                    InstanceState::Starting | InstanceState::Running | InstanceState::Stopping
                )
            })
            .map(|i| trunkfarm_proto::v1::InstanceInfo {
                busy: connected
                    .get(&i.agent_id)
                    .is_some_and(|c| !c.running.is_empty()),
                state: match i.state {
                    InstanceState::Starting => "starting",
                    InstanceState::Running => "running",
                    InstanceState::Stopping => "stopping",
                    InstanceState::Gone => "gone",
                    InstanceState::Failed => "failed",
                }
                .to_owned(),
                id: i.id,
                handle: i.handle,
                agent_id: i.agent_id,
                created_at_ms: i.created_at_ms,
                last_busy_ms: i.last_busy_ms,
                detail: i.detail,
            })
            .collect();
        views.push(trunkfarm_proto::v1::PoolInfo {
            name: cfg.name.clone(),
            provisioner: format!("{:?}", cfg.provisioner).to_lowercase(),
            labels: cfg.labels.clone(),
            min_instances: cfg.min_instances,
            max_instances: cfg.max_instances,
            instances,
            failed_starts: backoff.failures,
            next_start_at_ms: backoff.next_start_at_ms,
            last_error: backoff.last_error,
        });
    }
    Ok(views)
}
