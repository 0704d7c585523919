//! Idle agents: many sessions over real TLS connections, each its own
//! enrolled agent, held by this process; the hub's memory per session and
//! the rate at which it takes them.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Channel;
use trunkfarm_proto::v1::agent_service_client::AgentServiceClient;
use trunkfarm_proto::v1::{
    AgentMessage, Capabilities, Hello, HubMessage, agent_message, hub_message,
};

use super::farm::{BenchHub, Dialer, Identity};
use super::{BenchArgs, Figure, Target};

/// Sessions being opened at once.
const CONNECTS_IN_FLIGHT: usize = 64;

/// How long the hub is left alone before its memory is read.
const SETTLE: Duration = Duration::from_secs(2);

/// An open, idle agent session.
pub(super) struct Session {
    /// Keeps the agent's side of the stream open.
    _outbound: mpsc::Sender<AgentMessage>,
    /// The hub's side.
    pub(crate) inbound: Streaming<HubMessage>,
    _channel: Channel,
}

/// Opens a session as `identity` on a new connection and waits for Welcome.
pub(super) async fn open_session(
    hub: &Dialer,
    identity: &Identity,
    slots: u32,
) -> anyhow::Result<Session> {
    let channel = hub.channel().await?;
    let (tx, rx) = mpsc::channel(4);
    tx.send(AgentMessage {
        msg: Some(agent_message::Msg::Hello(Hello {
            protocol_version: trunkfarm_proto::PROTOCOL_VERSION,
            agent_version: "bench".into(),
            capabilities: Some(Capabilities {
                name: "bench".into(),
                max_parallel_jobs: slots,
                ..Default::default()
            }),
            running: Vec::new(),
            draining: false,
            paused: None,
            slots: None,
        })),
    })
    .await?;
    let mut inbound = AgentServiceClient::new(channel.clone())
        .session(identity.request(ReceiverStream::new(rx)))
        .await?
        .into_inner();
    match inbound.message().await? {
        Some(HubMessage {
            msg: Some(hub_message::Msg::Welcome(_)),
        }) => {}
        other => bail!("expected Welcome, got {other:?}"),
    }
    Ok(Session {
        _outbound: tx,
        inbound,
        _channel: channel,
    })
}

/// Connects C idle agents; reports hub RSS per agent and connects per second.
pub(super) async fn run(args: &BenchArgs, dir: &Path) -> anyhow::Result<Vec<Figure>> {
    let c = args.connections.max(1);
    println!("idle: {c} agents, each its own TLS connection and session");
    let hub = BenchHub::start(dir, args, "").await?;
    let enrolled = Instant::now();
    let identities = hub.enroll_identities(c, CONNECTS_IN_FLIGHT).await?;
    let enroll_time = enrolled.elapsed();
    tokio::time::sleep(SETTLE).await;
    let base = hub.rss_bytes()?;

    let dialer = hub.dialer();
    let started = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(CONNECTS_IN_FLIGHT));
    let mut tasks = tokio::task::JoinSet::new();
    for id in identities {
        let permit = sem.clone().acquire_owned().await?;
        let dialer = dialer.clone();
        tasks.spawn(async move {
            let s = open_session(&dialer, &id, 1).await;
            drop(permit);
            s
        });
    }
    let mut sessions = Vec::with_capacity(c);
    while let Some(r) = tasks.join_next().await {
        sessions.push(r?.context("opening an idle session")?);
    }
    let connect_time = started.elapsed();
    hub.wait_connected(c).await?;
    tokio::time::sleep(SETTLE).await;
    let loaded = hub.rss_bytes()?;
    let per_agent = loaded.saturating_sub(base) as f64 / c as f64;
    drop(sessions);
    hub.stop().await?;

    let setup = format!("{c} agents");
    let rate = c as f64 / connect_time.as_secs_f64();
    println!(
        "idle: enrolled {c} in {:.1} s; connected in {:.1} s ({rate:.0}/s); hub RSS {:.1} MB before, {:.1} MB with them: {:.1} KB per agent",
        enroll_time.as_secs_f64(),
        connect_time.as_secs_f64(),
        base as f64 / 1e6,
        loaded as f64 / 1e6,
        per_agent / 1000.0
    );
    // The target: 10,000 agents in 300 MB, i.e. 30 KB each.
    Ok(vec![
        Figure::new(
            "idle",
            "hub_rss_per_agent",
            per_agent / 1000.0,
            "KB",
            Target::AtMost(30.0),
            setup.clone(),
        ),
        Figure::new(
            "idle",
            "hub_rss_total",
            loaded as f64 / 1e6,
            "MB",
            Target::AtMost(300.0 * c as f64 / 10_000.0),
            setup.clone(),
        ),
        Figure::new(
            "idle",
            "connects_per_s",
            rate,
            "conn/s",
            Target::AtLeast(1000.0),
            setup,
        ),
    ])
}
