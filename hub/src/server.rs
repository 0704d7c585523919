//! Starting and stopping a hub: opens the data dir, wires the modules
//! together, serves gRPC (agents, admin, health, reflection) over TLS, and
//! shuts down gracefully.

mod listener;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tonic::transport::Server;
use trunkfarm_proto::v1::admin_service_server::AdminServiceServer;
use trunkfarm_proto::v1::agent_service_server::AgentServiceServer;

use crate::artifacts::{Artifacts, Backend};
use crate::auth::credentials::Credentials;
use crate::auth::throttle::FailedEnrollments;
use crate::auth::{secret, tls};
use crate::config::HubConfig;
use crate::dispatch::{DispatchSettings, Dispatcher};
use crate::grpc::admin::AdminApi;
use crate::grpc::agent::AgentApi;
use crate::logs::JobLogs;
use crate::notify::Notifier;
use crate::objects::Objects;
use crate::pipeline::Pipeline;
use crate::provision::Pools;
use crate::repo_credentials::RepoCredentials;
use crate::results::Results;
use crate::space::DataDir;
use crate::store::Store;
use crate::web;
use tokio_util::sync::CancellationToken;

/// Written to `<data_dir>/hub.json` once the hub serves, so the CLI (and
/// tests, and scripts) find a hub started on port 0.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct HubInfo {
    /// The bound address.
    pub(crate) address: String,
    /// The address in enrollment strings.
    pub(crate) public_address: String,
    /// Whether it speaks TLS.
    pub(crate) tls: bool,
    /// The CA fingerprint agents pin (hex SHA-256); empty for plaintext.
    pub(crate) ca_sha256: String,
    /// The hub's process id.
    pub(crate) pid: u32,
    /// Where the web endpoint (unsubscribe links) listens.
    #[serde(default)]
    pub(crate) web: String,
}

/// The name of the file that says where a running hub is.
pub(crate) const HUB_INFO_FILE: &str = "hub.json";

impl HubInfo {
    /// Reads the file a running hub wrote into `data_dir`.
    pub(crate) fn read(data_dir: &Path) -> anyhow::Result<HubInfo> {
        let path = data_dir.join(HUB_INFO_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "cannot read {}: is the hub running (`trunkfarm serve`) with this config's data_dir?",
                path.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("{} is malformed", path.display()))
    }
}

/// HTTP/2 flow-control windows of the gRPC server: at most this much of a
/// call's (or a connection's) data waits unread in the hub.
const STREAM_WINDOW: u32 = 1024 * 1024;
const CONNECTION_WINDOW: u32 = 2 * 1024 * 1024;
/// The most header bytes one call may send (credentials are ~100 bytes).
const MAX_HEADER_LIST: u32 = 16 * 1024;

/// How often a hub whose database failed checks whether its data dir takes
/// writes again.
const RECOVERY_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// A running hub.
pub(crate) struct Hub {
    /// The bound address.
    pub(crate) addr: SocketAddr,
    /// What was written to hub.json.
    pub(crate) info: HubInfo,
    info_path: PathBuf,
    dispatch: Dispatcher,
    web: Option<web::Web>,
    stop_pipeline: CancellationToken,
    /// The retention task (ends once `stop_pipeline` is cancelled).
    retention: Option<tokio::task::JoinHandle<()>>,
    /// The log compactor (ends once `stop_pipeline` is cancelled; a
    /// compaction cut short is redone at the next start).
    compactor: Option<tokio::task::JoinHandle<()>>,
    store: Store,
    space: DataDir,
    /// Stops the gRPC accept loop (just before `stop`).
    stop_accepting: CancellationToken,
    stop: Option<oneshot::Sender<()>>,
    served: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Hub {
    /// Opens the data dir and starts serving. Returns once the listener is
    /// bound and `hub.json` is written.
    pub(crate) async fn start(cfg: &HubConfig) -> anyhow::Result<Hub> {
        // First, before the database and the listeners take descriptors.
        let open_files = match listener::raise_open_files_limit() {
            Ok(f) => {
                if f.soft > f.before {
                    tracing::info!(
                        limit = f.soft,
                        was = f.before,
                        hard = f.hard,
                        "raised the open-files limit to its hard limit"
                    );
                } else {
                    tracing::info!(limit = f.soft, hard = f.hard, "open-files limit");
                }
                f.soft
            }
            Err(e) => {
                tracing::warn!("cannot read or raise the open-files limit ({e}); assuming 1024");
                1024
            }
        };
        let data_dir = cfg.data_dir().to_path_buf();
        // The database, artifacts, logs and pool agents' state are the
        // hub's alone (the process umask is 077 too: see main.rs).
        let opened = secret::private_dir(&data_dir)
            .with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
        if let Some(mode) = opened {
            tracing::warn!(
                "the data dir {} was open to other users (mode {mode:o}); it is now 0700",
                data_dir.display()
            );
        }
        let info_path = data_dir.join(HUB_INFO_FILE);
        // A stale file from a killed hub must not point clients at nothing.
        let _ = std::fs::remove_file(&info_path);

        let space = DataDir::new(&data_dir, cfg.hub.min_free_space);
        if let Err(e) = space.admit("work", 0) {
            // Serve anyway: agents may deliver results, operators may look.
            tracing::error!("{e}");
        }
        // Before anything is stored: a bucket that is missing, denied or in
        // another region must stop the start, not the first upload.
        let objects = Objects::open(&cfg.storage, &data_dir)
            .await
            .context("the object store in [storage] cannot be used")?;
        let store = Store::open_data_dir(&data_dir, cfg.hub.database_cache)?;
        let credentials = Credentials::open(&store)?;
        let logs = Arc::new(
            JobLogs::open(&store, cfg.limits.max_log_size, objects.clone())?
                .with_compact_from(cfg.storage.compact_logs_from),
        );
        // Logs compacted while the store was local move into the bucket
        // before anything reads them (as artifacts do).
        let local_dir = data_dir.join(crate::objects::LOCAL_DIR);
        if cfg.storage.backend == crate::config::StorageBackend::S3
            && local_dir.join("logs").is_dir()
        {
            let local = Objects::local(&local_dir)?;
            let moved = logs.migrate_from(&local).await.with_context(|| {
                format!(
                    "cannot move the compacted logs in {} into {}; fix the storage, or set `storage.backend = \"local\"` to start with them where they are",
                    local_dir.display(),
                    objects.describe()
                )
            })?;
            if moved > 0 {
                tracing::info!(
                    moved,
                    "moved compacted logs from {} into {}",
                    local_dir.display(),
                    objects.describe()
                );
            }
        }
        let dispatch = Dispatcher::open(
            &store,
            logs.clone(),
            DispatchSettings::from_config(
                &cfg.dispatch,
                space.clone(),
                RepoCredentials::from_urls(
                    cfg.upstreams
                        .iter()
                        .map(|u| u.url.as_str())
                        .chain(cfg.projects.iter().map(|p| p.url.as_str())),
                ),
            ),
        )?;
        let artifacts = Artifacts::open(
            &store,
            data_dir.join("artifacts"),
            cfg.artifacts.max_size,
            space.clone(),
            Backend::for_storage(&objects),
        )
        .await?;
        let admin_token = secret::load_or_create_admin_token(&cfg.admin_token_path())?;
        let results = Results::open(&store)?.with_flaky_rules(cfg.flaky_rules());
        let stop_pipeline = CancellationToken::new();
        // The web endpoint first (its port may be picked by the OS), then the
        // notifier whose links point at it.
        let notifier_cell: Arc<std::sync::OnceLock<Notifier>> = Arc::default();
        // Filled in once everything it reads exists.
        type Render = Box<dyn Fn() -> String + Send + Sync>;
        let metrics_cell: Arc<std::sync::OnceLock<Render>> = Arc::default();
        let site_cell = web::site::SiteCell::default();
        let cell = notifier_cell.clone();
        let web = web::serve(
            web::Settings::from_config(&cfg.web)?,
            web::unsubscribe_fn(move |token| {
                let cell = cell.clone();
                async move {
                    match cell.get() {
                        Some(n) => n.unsubscribe_token(&token).await,
                        None => Err("the hub is still starting; try again in a moment".into()),
                    }
                }
            }),
            {
                let cell = metrics_cell.clone();
                Arc::new(move || {
                    let cell = cell.clone();
                    Box::pin(async move {
                        match cell.get() {
                            Some(m) => m(),
                            None => String::new(),
                        }
                    })
                })
            },
            site_cell.clone(),
            stop_pipeline.clone(),
        )
        .await?;
        let public_url = cfg
            .notify
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", web.addr));
        let notifier = Notifier::start(
            cfg,
            &store,
            results.clone(),
            logs.clone(),
            public_url,
            stop_pipeline.clone(),
        )?;
        let _ = notifier_cell.set(notifier.clone());
        let compactor = start_compactor(&logs, &dispatch, &stop_pipeline);
        let pipeline = Pipeline::start(
            cfg,
            &store,
            dispatch.clone(),
            results.clone(),
            artifacts.clone(),
            notifier.clone(),
            stop_pipeline.clone(),
        )?;
        let retention = crate::retention::Retention::new(
            results,
            dispatch.clone(),
            logs.clone(),
            pipeline.clone(),
            notifier.clone(),
            cfg.retention.clone(),
        )
        .start(stop_pipeline.clone());
        // The pages read from here on (they answered 503 until now).
        let _ = site_cell.set(web::site::Site {
            pipeline: pipeline.clone(),
            dispatch: dispatch.clone(),
            credentials: credentials.clone(),
            notifier: notifier.clone(),
            logs: logs.clone(),
        });

        let identity = if cfg.tls.plaintext {
            None
        } else if let (Some(cert), Some(key)) = (&cfg.tls.cert, &cfg.tls.key) {
            Some(tls::load_configured(cert, key)?)
        } else {
            Some(tls::load_or_create(
                &cfg.generated_tls_dir(),
                &cfg.tls.hostnames,
            )?)
        };

        let tcp = tokio::net::TcpListener::bind(cfg.hub.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.hub.listen))?;
        let addr = tcp.local_addr()?;
        let public_address = match &cfg.hub.public_address {
            Some(a) => a.clone(),
            None if addr.ip().is_unspecified() => {
                tracing::warn!(
                    "hub.listen is {addr} (all interfaces) and hub.public_address is not set: enrollment strings will say 127.0.0.1:{}; set hub.public_address to the name agents dial",
                    addr.port()
                );
                format!("127.0.0.1:{}", addr.port())
            }
            None => addr.to_string(),
        };
        let ca_sha256 = identity.as_ref().map(|i| i.ca_sha256.clone());
        let max_message = usize::try_from(cfg.limits.max_message_size).unwrap_or(usize::MAX);
        let (hub_address, hub_ca) = (public_address.clone(), ca_sha256.clone());
        let pools = Pools::start(
            cfg,
            &store,
            dispatch.clone(),
            credentials.clone(),
            Box::new(move |token| {
                trunkfarm_proto::enrollment::Enrollment {
                    hub: hub_address.clone(),
                    token,
                    ca_sha256: hub_ca.clone(),
                }
                .encode()
            }),
            stop_pipeline.clone(),
        )
        .await?;

        let agent_api = AgentApi {
            credentials: credentials.clone(),
            dispatch: dispatch.clone(),
            logs: logs.clone(),
            heartbeat_interval: cfg.dispatch.heartbeat_interval,
            artifacts: artifacts.clone(),
            default_max_parallel_jobs: cfg.enrollment.default_max_parallel_jobs,
            enroll_failures: FailedEnrollments::new(
                cfg.network.enroll_failures,
                cfg.network.enroll_failure_window,
            ),
        };
        let admin_api = AdminApi {
            admin_token_hash: secret::hash(&admin_token),
            credentials,
            dispatch: dispatch.clone(),
            logs,
            public_address: public_address.clone(),
            ca_sha256: ca_sha256.clone(),
            default_token_ttl: cfg.enrollment.default_token_ttl,
            max_token_ttl: cfg.enrollment.max_token_ttl,
            drain_grace: cfg.dispatch.drain_grace,
            pipeline: pipeline.clone(),
            artifacts: artifacts.clone(),
            notifier: notifier.clone(),
            pools: pools.clone(),
        };
        {
            let (d, a, n, p) = (
                dispatch.clone(),
                artifacts.clone(),
                notifier.clone(),
                pools.clone(),
            );
            let _ = metrics_cell.set(Box::new(move || crate::metrics::render(&d, &a, &n, &p)));
        }
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<AgentServiceServer<AgentApi>>().await;
        health.set_serving::<AdminServiceServer<AdminApi>>().await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(trunkfarm_proto::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;

        let net = &cfg.network;
        let stop_accepting = CancellationToken::new();
        let max_connections =
            listener::connection_cap(net.max_connections, open_files, cfg.web.max_connections);
        tracing::info!(
            max_connections,
            "gRPC connections capped (network.max_connections)"
        );
        let incoming = listener::incoming(
            tcp,
            identity.as_ref().map(listener::tls_acceptor).transpose()?,
            listener::Limits {
                max_connections,
                tls_handshake_timeout: net.tls_handshake_timeout,
                unauthenticated_timeout: net.unauthenticated_timeout,
            },
            stop_accepting.clone(),
        );
        // Flow-control windows bound what one connection can make the hub
        // buffer before anything reads it; the stream limit bounds its calls.
        let router = Server::builder()
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(20)))
            .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
            .max_concurrent_streams(net.max_concurrent_streams)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .http2_max_header_list_size(MAX_HEADER_LIST)
            .layer(listener::GuardLayer::new(net))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(
                AgentServiceServer::new(agent_api)
                    .max_decoding_message_size(max_message)
                    .max_encoding_message_size(max_message),
            )
            .add_service(admin_api.into_server(max_message));
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let served = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
            let _ = stop_rx.await;
        }));

        let info = HubInfo {
            address: addr.to_string(),
            public_address,
            tls: identity.is_some(),
            ca_sha256: ca_sha256.unwrap_or_default(),
            pid: std::process::id(),
            web: web.addr.to_string(),
        };
        let json = serde_json::to_vec_pretty(&info)?;
        secret::write_private(&info_path, &json)
            .with_context(|| format!("cannot write {}", info_path.display()))?;
        let (queued, leased) = dispatch.open_counts();
        tracing::info!(%addr, queued, leased, "hub serving");
        Ok(Hub {
            addr,
            info,
            info_path,
            dispatch,
            web: Some(web),
            stop_pipeline,
            retention: Some(retention),
            compactor: Some(compactor),
            store,
            space,
            stop_accepting,
            stop: Some(stop_tx),
            served,
        })
    }

    /// Blocks (on the calling OS thread, not the async runtime, which a
    /// failing database may stall) until the database failed and the data
    /// dir takes writes again: the hub must then be restarted to open the
    /// database afresh. Never returns while all is well.
    pub(crate) fn wait_database_recoverable(&self) -> impl FnOnce() + Send + 'static {
        let (store, space) = (self.store.clone(), self.space.clone());
        move || loop {
            std::thread::sleep(RECOVERY_CHECK_INTERVAL);
            if store.failed() && space.writable_now() {
                return;
            }
        }
    }

    /// Stops serving: ends agent sessions (they reconnect to the next hub),
    /// waits for in-flight calls, and makes sure everything is on disk.
    pub(crate) async fn shutdown(mut self) -> anyhow::Result<()> {
        let _ = std::fs::remove_file(&self.info_path);
        self.stop_pipeline.cancel();
        if let Some(retention) = self.retention.take()
            && let Err(e) = retention.await
        {
            tracing::warn!("the retention task failed: {e}");
        }
        if let Some(compactor) = self.compactor.take()
            && let Err(e) = compactor.await
        {
            tracing::warn!("the log compactor failed: {e}");
        }
        if let Some(web) = self.web.take() {
            web.stopped().await;
        }
        self.dispatch.close_sessions();
        self.stop_accepting.cancel();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match tokio::time::timeout(std::time::Duration::from_secs(10), &mut self.served).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!("server ended with an error: {e}"),
            Ok(Err(e)) => tracing::warn!("server task failed: {e}"),
            Err(_) => {
                tracing::warn!("connections did not close within 10s; stopping anyway");
                self.served.abort();
            }
        }
        self.store.commit().await?;
        tracing::info!("hub stopped");
        Ok(())
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!("cannot listen for SIGTERM ({e}); only Ctrl-C stops the hub");
            if let Err(e) = tokio::signal::ctrl_c().await {
                tracing::error!("cannot listen for Ctrl-C either ({e}); stop the hub with SIGKILL");
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Starts moving finished jobs' logs into the object store in the
/// background: a job counts as finished once dispatch says so, or once its
/// record is gone (pruned).
pub(crate) fn start_compactor(
    logs: &Arc<JobLogs>,
    dispatch: &Dispatcher,
    stop: &CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let dispatch = dispatch.clone();
    crate::logs::Compactor::new(
        logs.clone(),
        Arc::new(move |job| {
            Ok(dispatch
                .get(job)?
                .is_none_or(|r| r.state == crate::dispatch::JobState::Finished))
        }),
    )
    .start(stop.clone())
}
