//! Artifact fan-out: one runtime artifact, built and uploaded by a real
//! agent, downloaded by many agents at once.
//!
//! Two measures: the hub's raw serving rate (F downloads at once over F TLS
//! connections held by this process, bytes counted as they arrive), and F
//! real `trunkfarm-agent` processes each running two jobs that need the
//! runtime, which must fetch it once per agent (their cache) as the hub's
//! download counter shows.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio_stream::StreamExt;
use trunkfarm_proto::v1::agent_service_client::AgentServiceClient;
use trunkfarm_proto::v1::{
    DownloadArtifactRequest, JobInfo, JobSpec, Outcome, SubmitJobRequest, WatchJobRequest,
    watch_job_event,
};

use super::farm::BenchHub;
use super::{BenchArgs, Figure, Target};
use crate::admin_client::AdminClient;

/// How long one job of this benchmark may take.
const JOB_TIMEOUT: Duration = Duration::from_secs(600);

async fn run_job(admin: &AdminClient, spec: JobSpec) -> anyhow::Result<JobInfo> {
    let mut admin = admin.clone();
    let id = admin
        .submit_job(SubmitJobRequest {
            spec: Some(spec),
            max_attempts: 1,
            ..Default::default()
        })
        .await?
        .into_inner()
        .job_id;
    let watch = async {
        let mut events = admin
            .watch_job(WatchJobRequest { job_id: id })
            .await?
            .into_inner();
        while let Some(ev) = events.next().await {
            if let Some(watch_job_event::Event::Finished(info)) = ev?.event {
                return Ok(info);
            }
        }
        bail!("WatchJob {id} ended without a result")
    };
    let info = tokio::time::timeout(JOB_TIMEOUT, watch)
        .await
        .with_context(|| format!("job {id} did not finish within {JOB_TIMEOUT:?}"))??;
    match &info.result {
        Some(r) if r.outcome == Outcome::Passed as i32 => Ok(info),
        other => bail!("job {id} did not pass: {other:?}"),
    }
}

/// Builds a `size`-byte runtime on an agent, serves it to F agents at once.
pub(super) async fn run(args: &BenchArgs, dir: &Path) -> anyhow::Result<Vec<Figure>> {
    let f = args.fanout_agents.max(1);
    let size = args.artifact_mib * 1024 * 1024;
    println!(
        "fanout: a {} MiB runtime artifact to {f} agents at once",
        args.artifact_mib
    );
    let mut extra = format!(
        "[artifacts]\nmax_size = \"{} MiB\"\n",
        args.artifact_mib * 2 + 16
    );
    let store = match &args.s3_endpoint {
        Some(endpoint) => {
            extra.push_str(&format!(
                "\n[storage]\nbackend = \"s3\"\nbucket = \"{}\"\nprefix = \"bench/{}\"\nendpoint = \"{endpoint}\"\n",
                args.s3_bucket,
                std::process::id()
            ));
            format!("s3 {endpoint}")
        }
        None => "data dir".to_owned(),
    };
    println!("fanout: artifacts in the {store}");
    let hub = Arc::new(BenchHub::start(dir, args, &extra).await?);
    let _agents = hub.start_agents(f, 1, args.sandbox).await?;
    let admin = hub.admin().await?;

    // The runtime: incompressible bytes, built into $PREFIX by an agent.
    let built = run_job(
        &admin,
        JobSpec {
            commands: vec![format!(
                "head -c {size} /dev/urandom > \"$PREFIX/runtime.bin\""
            )],
            upload_prefix: "install".into(),
            timeout_secs: JOB_TIMEOUT.as_secs(),
            ..Default::default()
        },
    )
    .await?;
    let sha = built
        .result
        .map(|r| r.artifact_sha256)
        .filter(|s| !s.is_empty())
        .context("the build job stored no artifact")?;

    // 1. The hub's raw serving rate.
    let identities = hub.enroll_identities(f, f).await?;
    let mut channels = Vec::new();
    for _ in 0..f {
        channels.push(hub.agent_channel().await?);
    }
    let (downloads_0, sent_0) = counters(&hub).await?;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (id, channel) in identities.into_iter().zip(channels) {
        let sha = sha.clone();
        tasks.spawn(async move {
            let mut stream = AgentServiceClient::new(channel)
                .max_decoding_message_size(16 * 1024 * 1024)
                .download_artifact(id.request(DownloadArtifactRequest {
                    sha256: sha,
                    ..Default::default()
                }))
                .await?
                .into_inner();
            let mut bytes = 0u64;
            while let Some(chunk) = stream.next().await {
                bytes += chunk?.data.len() as u64;
            }
            anyhow::Ok(bytes)
        });
    }
    let mut total = 0u64;
    while let Some(r) = tasks.join_next().await {
        total += r??;
    }
    let raw_time = started.elapsed();
    let (downloads_1, sent_1) = counters(&hub).await?;
    let compressed = (sent_1 - sent_0) / f as u64;
    if total != sent_1 - sent_0 {
        bail!(
            "received {total} bytes but the hub counted {} sent",
            sent_1 - sent_0
        );
    }
    let raw_rate = total as f64 / 1e6 / raw_time.as_secs_f64();
    println!(
        "fanout: {f} downloads of {:.1} MB at once in {:.2} s: {raw_rate:.0} MB/s aggregate ({} served)",
        compressed as f64 / 1e6,
        raw_time.as_secs_f64(),
        downloads_1 - downloads_0
    );

    // 2. Real agents, two jobs each that need the runtime.
    let jobs = 2 * f;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..jobs {
        let admin = admin.clone();
        let spec = JobSpec {
            commands: vec!["test -s \"$TRUNKFARM_RUNTIME_PREFIX/runtime.bin\"".into()],
            artifact_sha256: sha.clone(),
            timeout_secs: JOB_TIMEOUT.as_secs(),
            ..Default::default()
        };
        tasks.spawn(async move { run_job(&admin, spec).await });
    }
    let mut ran_on = HashSet::new();
    while let Some(r) = tasks.join_next().await {
        ran_on.insert(r??.agent_id);
    }
    let agents_time = started.elapsed();
    let (downloads_2, sent_2) = counters(&hub).await?;
    let fetched = downloads_2 - downloads_1;
    let hub_sent = sent_2 - sent_1;
    println!(
        "fanout: {jobs} jobs on {} agents in {:.1} s (download, verify, unpack, run): the runtime was handed out {fetched} times, {hub_sent} bytes of it through the hub",
        ran_on.len(),
        agents_time.as_secs_f64()
    );
    drop(_agents);
    if let Ok(hub) = Arc::try_unwrap(hub) {
        hub.stop().await?;
    }
    let setup = format!("{} MiB artifact, {f} agents, {store}", args.artifact_mib);
    Ok(vec![
        Figure::new(
            "fanout",
            "aggregate_mb_per_s",
            raw_rate,
            "MB/s",
            Target::AtLeast(1000.0),
            setup.clone(),
        ),
        Figure::new(
            "fanout",
            "sends_per_agent",
            fetched as f64 / ran_on.len().max(1) as f64,
            "sends",
            Target::AtMost(1.0),
            format!("{setup}, {jobs} jobs on {} agents", ran_on.len()),
        ),
        Figure::new(
            "fanout",
            "hub_bytes_per_agent",
            hub_sent as f64 / ran_on.len().max(1) as f64,
            "bytes",
            Target::None,
            format!("{setup}: artifact bytes the hub itself sent to the real agents"),
        ),
        Figure::new(
            "fanout",
            "agents_jobs_wall",
            agents_time.as_secs_f64(),
            "s",
            Target::None,
            format!("{setup}, {jobs} jobs incl. download+verify+unpack"),
        ),
    ])
}

async fn counters(hub: &BenchHub) -> anyhow::Result<(u64, u64)> {
    Ok((
        hub.metric("trunkfarm_artifact_downloads_total").await? as u64,
        hub.metric("trunkfarm_artifact_sent_bytes_total").await? as u64,
    ))
}
