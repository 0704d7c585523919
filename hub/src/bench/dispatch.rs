//! Dispatch throughput and latency with real `trunkfarm-agent` processes.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio_stream::StreamExt;
use trunkfarm_proto::v1::{
    JobSpec, JobState, ListJobsRequest, Outcome, SubmitJobRequest, WatchJobRequest, watch_job_event,
};

use super::farm::{BenchHub, cpu_seconds};
use super::{BenchArgs, Figure, Target, percentile};
use crate::admin_client::AdminClient;

/// Submissions in flight at once during the throughput run.
const SUBMITS_IN_FLIGHT: usize = 128;

/// How long the throughput run may take before it is called failed.
const RUN_TIMEOUT: Duration = Duration::from_secs(600);

/// Jobs run before the latency measurement starts (not counted).
const LATENCY_WARMUP: usize = 20;

fn job(command: &str) -> SubmitJobRequest {
    SubmitJobRequest {
        spec: Some(JobSpec {
            commands: vec![command.to_string()],
            timeout_secs: 60,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Submits `n` `true` jobs with [`SUBMITS_IN_FLIGHT`] in flight.
async fn submit_many(admin: &AdminClient, n: usize) -> anyhow::Result<()> {
    let sem = Arc::new(tokio::sync::Semaphore::new(SUBMITS_IN_FLIGHT));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let permit = sem.clone().acquire_owned().await?;
        let mut admin = admin.clone();
        tasks.spawn(async move {
            let r = admin.submit_job(job("true")).await;
            drop(permit);
            r
        });
    }
    while let Some(r) = tasks.join_next().await {
        r?.context("SubmitJob")?;
    }
    Ok(())
}

/// Waits until the hub's finished-jobs counter reaches `total`.
async fn wait_finished(hub: &BenchHub, total: f64) -> anyhow::Result<()> {
    let deadline = Instant::now() + RUN_TIMEOUT;
    loop {
        if hub.metric("trunkfarm_jobs_finished_total").await? >= total {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the jobs did not finish within {RUN_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// K agents, N `true` jobs: jobs per second from the first submit to the
/// last result durably stored.
pub(super) async fn throughput(args: &BenchArgs, dir: &Path) -> anyhow::Result<Vec<Figure>> {
    let (k, n) = (args.agents, args.jobs.unwrap_or(2000));
    println!(
        "throughput: {k} agent processes x {} slots (sandbox {}), {n} `true` jobs over TLS",
        args.parallel,
        args.sandbox.as_arg()
    );
    let hub = BenchHub::start(dir, args, "").await?;
    let _agents = hub.start_agents(k, args.parallel, args.sandbox).await?;
    let admin = hub.admin().await?;

    // Warm up: every agent has run jobs before the clock starts.
    let warmup = (k * args.parallel as usize * 4).max(32);
    submit_many(&admin, warmup).await?;
    wait_finished(&hub, warmup as f64).await?;
    let before = hub.metric("trunkfarm_jobs_finished_total").await?;

    let agent_pids: Vec<u32> = _agents.iter().filter_map(|c| c.id()).collect();
    let cpu = |pids: &[u32]| pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>();
    let (hub_cpu_0, agents_cpu_0) = (cpu_seconds(hub.pid()), cpu(&agent_pids));
    let started = Instant::now();
    let submitting = {
        let admin = admin.clone();
        tokio::spawn(async move {
            let t = Instant::now();
            submit_many(&admin, n).await.map(|_| t.elapsed())
        })
    };
    wait_finished(&hub, before + n as f64).await?;
    let elapsed = started.elapsed();
    let hub_cpu = cpu_seconds(hub.pid()) - hub_cpu_0;
    let agents_cpu = cpu(&agent_pids) - agents_cpu_0;
    let submit_time = submitting.await??;
    let rss = hub.rss_bytes()?;

    // Every job passed, and none is counted twice.
    let jobs = admin
        .clone()
        .list_jobs(ListJobsRequest {
            state: JobState::Finished as i32,
            limit: (n + warmup + 10) as u32,
            ..Default::default()
        })
        .await?
        .into_inner()
        .jobs;
    let passed = jobs
        .iter()
        .filter(|j| {
            j.result
                .as_ref()
                .is_some_and(|r| r.outcome == Outcome::Passed as i32)
        })
        .count();
    if passed != n + warmup || jobs.len() != n + warmup {
        bail!(
            "{} jobs finished and {passed} passed, expected {}",
            jobs.len(),
            n + warmup
        );
    }
    hub.stop().await?;

    let setup = format!(
        "{k} agents x {} slots, {n} jobs, sandbox {}",
        args.parallel,
        args.sandbox.as_arg()
    );
    let rate = n as f64 / elapsed.as_secs_f64();
    println!(
        "throughput: {n} jobs in {:.2} s = {rate:.0} jobs/s (all submitted after {:.2} s); CPU per job: hub {:.2} ms, agents with their commands {:.2} ms",
        elapsed.as_secs_f64(),
        submit_time.as_secs_f64(),
        hub_cpu * 1000.0 / n as f64,
        agents_cpu * 1000.0 / n as f64
    );
    Ok(vec![
        Figure::new(
            "throughput",
            "jobs_per_s",
            rate,
            "jobs/s",
            Target::AtLeast(600.0),
            setup.clone(),
        ),
        Figure::new(
            "throughput",
            "hub_cpu_per_job",
            hub_cpu * 1000.0 / n as f64,
            "ms",
            Target::None,
            setup.clone(),
        ),
        Figure::new(
            "throughput",
            "agents_cpu_per_job",
            agents_cpu * 1000.0 / n as f64,
            "ms",
            Target::None,
            setup.clone(),
        ),
        Figure::new(
            "throughput",
            "hub_rss_after",
            rss as f64 / (1024.0 * 1024.0),
            "MiB",
            Target::None,
            setup,
        ),
    ])
}

/// Timestamps each open-write-close of a FIFO: the job's command writes to
/// it, so the moment it is read is the moment the command ran.
fn fifo_clock(path: &Path) -> anyhow::Result<std::sync::mpsc::Receiver<Instant>> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: mkfifo with a valid NUL-terminated path.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        bail!(
            "cannot make the FIFO {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        loop {
            // Blocks until a writer opens it.
            let Ok(mut f) = std::fs::File::open(&path) else {
                return;
            };
            let mut buf = [0u8; 16];
            let n = f.read(&mut buf).unwrap_or(0);
            let at = Instant::now();
            let _ = f.read_to_end(&mut Vec::new());
            if n > 0 && tx.send(at).is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

/// One agent, one job at a time: submit → the command runs, and submit →
/// the result is stored (the hub's WatchJob reports it only once durable).
pub(super) async fn latency(args: &BenchArgs, dir: &Path) -> anyhow::Result<Vec<Figure>> {
    let samples = args.samples.max(1);
    println!(
        "latency: 1 agent (sandbox {}), {samples} jobs one at a time",
        args.sandbox.as_arg()
    );
    let hub = BenchHub::start(dir, args, "").await?;
    let _agent = hub.start_agents(1, 1, args.sandbox).await?;
    let mut admin = hub.admin().await?;
    let fifo = dir.join("started.fifo");
    let clock = fifo_clock(&fifo)?;
    let command = format!("printf x > '{}'", fifo.display());

    let (mut to_start, mut to_result) = (Vec::new(), Vec::new());
    for i in 0..samples + LATENCY_WARMUP {
        let submitted = Instant::now();
        let id = admin.submit_job(job(&command)).await?.into_inner().job_id;
        let mut events = admin
            .watch_job(WatchJobRequest { job_id: id })
            .await?
            .into_inner();
        let mut finished = None;
        while let Some(ev) = events.next().await {
            if let Some(watch_job_event::Event::Finished(info)) = ev?.event {
                finished = Some((Instant::now(), info));
                break;
            }
        }
        let (stored, info) = finished.context("WatchJob ended without the job's result")?;
        if info.result.as_ref().map(|r| r.outcome) != Some(Outcome::Passed as i32) {
            bail!("latency job {id} did not pass: {info:?}");
        }
        let ran = clock
            .recv_timeout(Duration::from_secs(10))
            .context("the job's command never wrote to the FIFO")?;
        if i >= LATENCY_WARMUP {
            to_start.push(ran.duration_since(submitted).as_secs_f64() * 1000.0);
            to_result.push(stored.duration_since(submitted).as_secs_f64() * 1000.0);
        }
    }
    hub.stop().await?;
    to_start.sort_by(f64::total_cmp);
    to_result.sort_by(f64::total_cmp);
    let setup = format!(
        "1 agent, {samples} jobs one at a time, sandbox {}",
        args.sandbox.as_arg()
    );
    println!(
        "latency: to start p50 {:.2} ms p99 {:.2} ms; end to end p50 {:.2} ms p99 {:.2} ms",
        percentile(&to_start, 50.0),
        percentile(&to_start, 99.0),
        percentile(&to_result, 50.0),
        percentile(&to_result, 99.0)
    );
    Ok(vec![
        Figure::new(
            "latency",
            "submit_to_start_p50",
            percentile(&to_start, 50.0),
            "ms",
            Target::None,
            setup.clone(),
        ),
        Figure::new(
            "latency",
            "submit_to_start_p99",
            percentile(&to_start, 99.0),
            "ms",
            Target::AtMost(10.0),
            setup.clone(),
        ),
        Figure::new(
            "latency",
            "end_to_end_p50",
            percentile(&to_result, 50.0),
            "ms",
            Target::None,
            setup.clone(),
        ),
        Figure::new(
            "latency",
            "end_to_end_p99",
            percentile(&to_result, 99.0),
            "ms",
            Target::AtMost(25.0),
            setup,
        ),
    ])
}
