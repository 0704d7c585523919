//! The pools driven in-process: a temporary store, a dispatcher driven
//! directly (agents are channels), and a cloud in memory behind the
//! [`Provisioner`] seam. Time is the tick's argument, so nothing sleeps.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::mpsc;
use trunkfarm_proto::v1::hub_message::Msg;
use trunkfarm_proto::v1::{Capabilities, HubMessage, JobRef, JobSpec};

use super::*;
use crate::dispatch::tests::passed;
use crate::dispatch::{DispatchSettings, Hello};
use crate::logs::JobLogs;
use crate::space::DataDir;

/// A machine the cloud runs.
#[derive(Clone)]
struct Machine {
    handle: String,
    instance: String,
    enrollment: String,
}

/// A cloud in memory: what runs, and what the pools asked of it.
struct Cloud {
    /// The pools' records, to see what was written before a launch.
    records: Table,
    running: Mutex<Vec<Machine>>,
    /// Each start asked for: (instance, its recorded state at that moment).
    starts: Mutex<Vec<(String, Option<InstanceState>)>>,
    stopped: Mutex<Vec<String>>,
    /// Starts fail.
    fail: AtomicBool,
    /// The start with this number (1-based; 0: none) launches its machine
    /// but never returns (the hub dies during the call); `hung` is notified
    /// then.
    hang_at: AtomicUsize,
    hung: tokio::sync::Notify,
}

impl Cloud {
    fn new(store: &Store) -> Arc<Cloud> {
        Arc::new(Cloud {
            records: Table::open(store, trees::PROVISION).unwrap(),
            running: Mutex::default(),
            starts: Mutex::default(),
            stopped: Mutex::default(),
            fail: AtomicBool::new(false),
            hang_at: AtomicUsize::new(0),
            hung: tokio::sync::Notify::new(),
        })
    }

    fn running(&self) -> Vec<Machine> {
        self.running.lock().unwrap().clone()
    }

    fn starts(&self) -> Vec<(String, Option<InstanceState>)> {
        self.starts.lock().unwrap().clone()
    }

    fn stopped(&self) -> Vec<String> {
        self.stopped.lock().unwrap().clone()
    }
}

#[tonic::async_trait]
impl Provisioner for Cloud {
    async fn start(&self, spec: &StartSpec) -> Result<String, String> {
        let recorded = self
            .records
            .get::<Instance>(key(&spec.pool.name, &spec.instance))
            .unwrap()
            .map(|i| i.state);
        self.starts
            .lock()
            .unwrap()
            .push((spec.instance.clone(), recorded));
        if self.fail.load(Ordering::SeqCst) {
            return Err("no capacity".into());
        }
        let n = self.starts.lock().unwrap().len();
        let handle = format!("m-{n}");
        self.running.lock().unwrap().push(Machine {
            handle: handle.clone(),
            instance: spec.instance.clone(),
            enrollment: spec.enrollment.clone(),
        });
        if self.hang_at.load(Ordering::SeqCst) == n {
            self.hung.notify_one();
            std::future::pending::<()>().await;
        }
        Ok(handle)
    }

    async fn stop(&self, instance: &Instance) -> Result<(), String> {
        self.running
            .lock()
            .unwrap()
            .retain(|m| m.handle != instance.handle);
        self.stopped.lock().unwrap().push(instance.handle.clone());
        Ok(())
    }

    async fn list(&self, _pool: &str) -> Option<Vec<String>> {
        Some(self.running().into_iter().map(|m| m.handle).collect())
    }
}

/// A pool `fresh` (labels `fresh`, no grace), with `extra` TOML keys.
fn pool(extra: &str) -> PoolConfig {
    toml::from_str(&format!(
        "name = \"fresh\"\nprovisioner = \"command\"\nlabels = [\"fresh\"]\npending_grace = \"0s\"\n{extra}"
    ))
    .unwrap()
}

/// What a hub process holds, over a store that outlives it.
struct Hub {
    dispatch: Dispatcher,
    credentials: Credentials,
    pools: Pools,
}

fn hub(store: &Store, cloud: &Arc<Cloud>, cfg: &PoolConfig) -> Hub {
    let credentials = Credentials::open(store).unwrap();
    let logs = Arc::new(JobLogs::open_local(store, 1 << 20).unwrap());
    let dispatch = Dispatcher::open(
        store,
        logs,
        DispatchSettings {
            lease_timeout: Duration::from_secs(60),
            heartbeat_interval: Duration::from_secs(20),
            max_attempts: 3,
            default_job_timeout: Duration::from_secs(60),
            max_job_timeout: Duration::from_secs(3600),
            timeout_grace: Duration::from_secs(60),
            space: DataDir::new(&std::env::temp_dir(), 0),
            repo_credentials: Default::default(),
        },
    )
    .unwrap();
    let provisioner: Arc<dyn Provisioner> = cloud.clone();
    let pools = Pools::open(
        store,
        dispatch.clone(),
        credentials.clone(),
        // The enrollment string is the bare token: the cloud enrolls with it.
        Box::new(|token| token),
        vec![(cfg.clone(), provisioner)],
    )
    .unwrap();
    Hub {
        dispatch,
        credentials,
        pools,
    }
}

type Rx = mpsc::UnboundedReceiver<Box<Result<HubMessage, tonic::Status>>>;

impl Hub {
    async fn submit(&self, labels: &[&str]) -> u64 {
        let spec = JobSpec {
            commands: vec!["true".into()],
            labels: labels.iter().map(|l| l.to_string()).collect(),
            ..Default::default()
        };
        self.dispatch.submit(spec, 0).await.unwrap()
    }

    /// The machine's agent enrolls with its one-time token and connects.
    async fn boot(&self, machine: &Machine) -> (String, Rx) {
        let (agent, _) = self
            .credentials
            .enroll(&machine.enrollment, &machine.instance)
            .await
            .unwrap();
        let rx = self.connect(&agent.id, &agent.grant).await;
        (agent.id, rx)
    }

    /// Connects the agent as the agent service does: with what its grant
    /// gives a one-slot machine.
    async fn connect(&self, agent_id: &str, grant: &Grant) -> Rx {
        let (tx, rx) = mpsc::unbounded_channel();
        let caps = Capabilities {
            max_parallel_jobs: 1,
            ..Default::default()
        };
        let granted = grant.grant(&caps, 1);
        self.dispatch
            .connect(
                agent_id,
                &[],
                Hello {
                    name: agent_id.to_uppercase(),
                    caps,
                    labels: granted.labels.into_iter().collect(),
                    trusted: granted.trusted,
                    quarantined: false,
                    max_parallel: granted.max_parallel_jobs,
                    draining: false,
                    paused: None,
                    offered: None,
                    agent_version: "test".into(),
                    remote: "cloud".into(),
                    tx,
                },
            )
            .await
            .unwrap();
        rx
    }

    fn instances(&self) -> Vec<Instance> {
        self.pools.instances("fresh").unwrap()
    }
}

/// The jobs assigned on a session so far, and whether it was ended.
fn drain_rx(rx: &mut Rx) -> (Vec<JobRef>, Option<tonic::Status>) {
    let (mut jobs, mut ended) = (Vec::new(), None);
    while let Ok(msg) = rx.try_recv() {
        match *msg {
            Ok(HubMessage {
                msg: Some(Msg::Assign(a)),
            }) => jobs.push(a.job.unwrap()),
            Ok(_) => {}
            Err(status) => ended = Some(status),
        }
    }
    (jobs, ended)
}

/// A hub with one pool `fresh` (see [`pool`]) over a new store and cloud.
fn setup(extra: &str) -> (tempfile::TempDir, Arc<Cloud>, Hub) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let cloud = Cloud::new(&store);
    let hub = hub(&store, &cloud, &pool(extra));
    (dir, cloud, hub)
}

#[tokio::test]
async fn waiting_work_starts_an_instance_recorded_before_its_launch() {
    let (_dir, cloud, hub) = setup("max_instances = 1");
    let t0 = now_ms();
    hub.pools.tick_at(t0).await.unwrap();
    hub.submit(&["gpu"]).await;
    hub.pools.tick_at(t0 + 1).await.unwrap();
    assert!(cloud.starts().is_empty(), "no work the pool covers waits");

    let job = hub.submit(&["fresh"]).await;
    hub.pools.tick_at(t0 + 2).await.unwrap();
    let starts = cloud.starts();
    assert_eq!(starts.len(), 1);
    assert_eq!(
        starts[0].1,
        Some(InstanceState::Starting),
        "recorded starting before the cloud was asked"
    );
    let inst = &hub.instances()[0];
    assert_eq!(
        (inst.id.as_str(), inst.state, inst.handle.as_str()),
        (starts[0].0.as_str(), InstanceState::Starting, "m-1")
    );
    hub.pools.tick_at(t0 + 3).await.unwrap();
    assert_eq!(cloud.starts().len(), 1, "the starting one covers the job");

    let (agent_id, mut rx) = hub.boot(&cloud.running()[0]).await;
    assert_eq!(drain_rx(&mut rx).0[0].job_id, job);
    hub.pools.tick_at(t0 + 4).await.unwrap();
    let inst = &hub.instances()[0];
    assert_eq!(inst.state, InstanceState::Running);
    assert_eq!(inst.agent_id, agent_id);
}

#[tokio::test]
async fn an_instance_that_served_max_jobs_per_instance_is_retired() {
    let (_dir, cloud, hub) = setup("max_instances = 1\nmax_jobs_per_instance = 2");
    let t0 = now_ms();
    let mut jobs = Vec::new();
    for _ in 0..3 {
        jobs.push(hub.submit(&["fresh"]).await);
    }
    hub.pools.tick_at(t0).await.unwrap();
    let first = cloud.running()[0].clone();
    let (agent_id, mut rx) = hub.boot(&first).await;
    hub.pools.tick_at(t0 + 1).await.unwrap();
    let mut served = Vec::new();
    loop {
        let (got, _) = drain_rx(&mut rx);
        let Some(job) = got.first().copied() else {
            break;
        };
        served.push(job.job_id);
        hub.dispatch
            .record_result(&agent_id, passed(job))
            .await
            .unwrap();
    }
    assert_eq!(served, jobs[..2], "two jobs, then none");

    hub.pools.tick_at(t0 + 2).await.unwrap();
    hub.pools.stops_settled().await;
    assert_eq!(cloud.stopped(), std::slice::from_ref(&first.handle));
    let retired = hub
        .instances()
        .into_iter()
        .find(|i| i.handle == first.handle)
        .unwrap();
    assert_eq!(retired.state, InstanceState::Gone);
    assert!(
        retired.detail.contains("max_jobs_per_instance"),
        "{}",
        retired.detail
    );
    let (_, ended) = drain_rx(&mut rx);
    assert_eq!(ended.unwrap().code(), tonic::Code::PermissionDenied);
    let record = hub
        .credentials
        .list_agents()
        .unwrap()
        .into_iter()
        .find(|a| a.id == agent_id)
        .unwrap();
    assert!(
        record.revoked,
        "a retired instance's agent cannot come back"
    );

    // The third job gets a fresh instance.
    let running = cloud.running();
    assert_eq!(running.len(), 1);
    assert_ne!(running[0].handle, first.handle);
    let (_, mut rx) = hub.boot(&running[0]).await;
    assert_eq!(drain_rx(&mut rx).0[0].job_id, jobs[2]);
}

#[tokio::test]
async fn a_restarted_hub_keeps_its_recorded_instances_and_stops_unknown_ones() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let cloud = Cloud::new(&store);
    let cfg = pool("max_instances = 2\nmissing_timeout = \"5m\"");
    let t0 = now_ms();
    let (agent_id, labels) = {
        let before = hub(&store, &cloud, &cfg);
        before.submit(&["fresh"]).await;
        before.submit(&["fresh"]).await;
        // The second start launches its machine, and the hub dies before
        // the cloud answers: that machine's handle was never recorded.
        cloud.hang_at.store(2, Ordering::SeqCst);
        tokio::select! {
            r = before.pools.tick_at(t0) => panic!("the second start was to hang: {r:?}"),
            _ = cloud.hung.notified() => {}
        }
        let first = cloud.running()[0].clone();
        let (agent_id, _rx) = before.boot(&first).await;
        let labels = before
            .credentials
            .list_agents()
            .unwrap()
            .into_iter()
            .find(|a| a.id == agent_id)
            .unwrap()
            .grant;
        (agent_id, labels)
    };
    assert_eq!(cloud.running().len(), 2);

    let after = hub(&store, &cloud, &cfg);
    after.pools.reap_orphans().await;
    let recorded = after.instances();
    let known: Vec<&str> = recorded
        .iter()
        .map(|i| i.handle.as_str())
        .filter(|h| !h.is_empty())
        .collect();
    assert_eq!(cloud.stopped().len(), 1, "the machine nobody recorded");
    assert!(!known.contains(&cloud.stopped()[0].as_str()));
    // The recorded one is adopted again once its agent reconnects; nothing
    // new is started for the work it and the starting one cover.
    let _rx = after.connect(&agent_id, &labels).await;
    after.pools.tick_at(t0 + 1_000).await.unwrap();
    let adopted = after
        .instances()
        .into_iter()
        .find(|i| i.agent_id == agent_id)
        .unwrap();
    assert_eq!(adopted.state, InstanceState::Running);
    assert_eq!(cloud.starts().len(), 2);
    // The one whose launch was cut short never connects: it fails.
    after.pools.tick_at(t0 + 5 * 60_000 + 1_000).await.unwrap();
    after.pools.stops_settled().await;
    let states: Vec<InstanceState> = after.instances().iter().map(|i| i.state).collect();
    assert!(states.contains(&InstanceState::Failed), "{states:?}");
    assert!(states.contains(&InstanceState::Running), "{states:?}");
    // No machine runs that the records do not know.
    let live: Vec<String> = after
        .instances()
        .into_iter()
        .filter(|i| matches!(i.state, InstanceState::Starting | InstanceState::Running))
        .map(|i| i.handle)
        .collect();
    for m in cloud.running() {
        assert!(live.contains(&m.handle), "{} runs unrecorded", m.handle);
    }
}

#[tokio::test]
async fn failed_launches_back_off() {
    let (_dir, cloud, hub) = setup("max_instances = 1\nstart_backoff_max = \"15s\"");
    cloud.fail.store(true, Ordering::SeqCst);
    hub.submit(&["fresh"]).await;
    let t0 = now_ms();
    hub.pools.tick_at(t0).await.unwrap();
    assert_eq!(cloud.starts().len(), 1);
    let failed = &hub.instances()[0];
    assert_eq!(failed.state, InstanceState::Failed);
    assert!(failed.detail.contains("no capacity"), "{}", failed.detail);
    let backoff = hub.pools.backoff("fresh").unwrap();
    assert_eq!(
        (backoff.failures, backoff.next_start_at_ms),
        (1, t0 + 10_000)
    );
    let token = hub
        .credentials
        .list_tokens()
        .unwrap()
        .into_iter()
        .find(|t| t.id == failed.token_id)
        .unwrap();
    assert!(token.revoked, "a failed instance's token enrolls nobody");

    hub.pools.tick_at(t0 + 9_999).await.unwrap();
    assert_eq!(cloud.starts().len(), 1, "backing off");
    hub.pools.tick_at(t0 + 10_000).await.unwrap();
    assert_eq!(cloud.starts().len(), 2);
    let backoff = hub.pools.backoff("fresh").unwrap();
    assert_eq!(
        (backoff.failures, backoff.next_start_at_ms),
        (2, t0 + 10_000 + 15_000),
        "doubled to 20s, capped at start_backoff_max"
    );

    cloud.fail.store(false, Ordering::SeqCst);
    hub.pools.tick_at(t0 + 25_000).await.unwrap();
    assert_eq!(cloud.starts().len(), 3);
    hub.boot(&cloud.running()[0]).await;
    hub.pools.tick_at(t0 + 25_001).await.unwrap();
    assert_eq!(
        hub.pools.backoff("fresh").unwrap().failures,
        0,
        "a start that connected ends the back-off"
    );
}

#[tokio::test]
async fn records_written_by_the_previous_release_read_the_same() {
    let (_dir, _cloud, hub) = setup("");
    let raw = hub.pools.inner.store.table(trees::PROVISION);
    let instance = r#"{"id":"fresh-3","pool":"fresh","state":"running","handle":"m-1","token_id":"tok_1","agent_id":"ag_1","created_at_ms":1700000000000,"last_busy_ms":1700000000500,"detail":""}"#;
    let backoff = r#"{"failures":2,"next_start_at_ms":1700000030000,"last_error":"start failed: no capacity"}"#;
    raw.put_raw("i/fresh/fresh-3", instance.as_bytes()).unwrap();
    raw.put_raw("b/fresh", backoff.as_bytes()).unwrap();
    let read = hub.instances();
    assert_eq!(read.len(), 1);
    assert_eq!(
        (
            read[0].state,
            read[0].agent_id.as_str(),
            read[0].handle.as_str()
        ),
        (InstanceState::Running, "ag_1", "m-1")
    );
    let b = hub.pools.backoff("fresh").unwrap();
    assert_eq!((b.failures, b.next_start_at_ms), (2, 1700000030000));
    // Written again, a record has the bytes it had.
    hub.pools.put(&read[0]).unwrap();
    assert_eq!(
        raw.get_raw("i/fresh/fresh-3").unwrap().unwrap().as_ref(),
        instance.as_bytes()
    );
    raw.put_raw("i/fresh/fresh-4", &b"{broken"[..]).unwrap();
    let err = hub.pools.instances("fresh").unwrap_err().to_string();
    assert!(err.contains("record provision/i/fresh/fresh-4"), "{err}");
}
