//! Recovery: a hub restarted over a large history (a million finished jobs
//! with their results, ten thousand queued) until it hands out work again.
//!
//! The history is written straight into the stopped hub's database with
//! the dispatcher's own record layout ([`JobTable::stage`]), then the
//! hub is started and an agent that was enrolled before the stop dials it
//! until it is in and has its first assignment.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use trunkfarm_proto::v1::{HubMessage, Outcome, hub_message};

use super::farm::BenchHub;
use super::idle::open_session;
use super::{BenchArgs, Figure, Target};
use crate::config::HubConfig;
use crate::dispatch::{
    AttemptRecord, JobRecord, JobResultRecord, JobSpecRecord, JobState, JobTable,
};
use crate::store::{Store, now_ms};

/// Writes job records as they are, in batches, into a database no hub
/// serves, and flushes. Returns how many it wrote.
fn import(store: &Store, records: impl IntoIterator<Item = JobRecord>) -> anyhow::Result<u64> {
    const BATCH: usize = 10_000;
    let jobs = JobTable::open(store)?;
    let mut batch = crate::store::Batch::default();
    let (mut staged, mut written) = (0usize, 0u64);
    for rec in records {
        jobs.stage(&rec, &mut batch)?;
        staged += 1;
        written += 1;
        if staged == BATCH {
            jobs.apply(std::mem::take(&mut batch))?;
            staged = 0;
        }
    }
    jobs.apply(batch)?;
    store.flush_now()?;
    Ok(written)
}

/// How long the restarted hub may take before the benchmark gives up.
const RESTART_TIMEOUT: Duration = Duration::from_secs(300);

fn record(store: &Store, finished: bool) -> anyhow::Result<JobRecord> {
    let spec = JobSpecRecord {
        commands: vec!["true".into()],
        timeout_secs: 60,
        ..Default::default()
    };
    let mut rec = JobRecord::queued(store.next_id()?, spec, 3, String::new());
    if finished {
        let now = now_ms();
        let agent_id = "ag_benchhistory".to_string();
        rec.state = JobState::Finished;
        rec.attempt = 1;
        rec.agent_id = agent_id.clone();
        rec.attempts = vec![AttemptRecord {
            attempt: 1,
            agent_id,
            leased_at_ms: now,
            lost_reason: String::new(),
            uploaded_sha256: String::new(),
            trusted: false,
        }];
        rec.result = Some(JobResultRecord {
            job: Some(rec.job_ref().into()),
            outcome: Outcome::Passed.into(),
            exit_code: Some(0),
            duration_ms: 3,
            started_at_ms: now,
            last_log_seq: 1,
            ..Default::default()
        });
        rec.finished_at_ms = now;
    }
    Ok(rec)
}

/// Writes the history into the stopped hub's database, with the hub's
/// page cache (`hub.database_cache`).
async fn seed(db_dir: &Path, cache_bytes: u64, results: u64, queued: u64) -> anyhow::Result<()> {
    // The stopped hub's lock on the database may take a moment to go.
    let mut tries = 0;
    let store = loop {
        match Store::open_with_cache(db_dir, cache_bytes) {
            Ok(s) => break s,
            Err(e) if tries < 100 => {
                tries += 1;
                tracing::debug!("database still locked: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let mut error = None;
    let finished = (0..results).map_while(|_| match record(&store, true) {
        Ok(r) => Some(r),
        Err(e) => {
            error = Some(e);
            None
        }
    });
    import(&store, finished)?;
    let open: Vec<JobRecord> = (0..queued)
        .map(|_| record(&store, false))
        .collect::<anyhow::Result<_>>()?;
    import(&store, open)?;
    if let Some(e) = error {
        return Err(e);
    }
    drop(store);
    wait_unlocked(&db_dir.join("lock")).await
}

/// Waits until nothing in this process holds the database's lock on
/// `lock_file` (fjall's `lock`, an flock) any more (the store's background
/// task lets go of it asynchronously).
async fn wait_unlocked(lock_file: &Path) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    for _ in 0..400 {
        let f = std::fs::File::open(lock_file)?;
        // SAFETY: flock on a descriptor we own; released when `f` closes.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    bail!("{} stayed locked after seeding", lock_file.display())
}

/// Seeds a history, restarts the hub, times until the first assignment.
pub(super) async fn run(args: &BenchArgs, dir: &Path) -> anyhow::Result<Vec<Figure>> {
    println!(
        "recovery: restart with {} stored results and {} queued jobs",
        args.results, args.queued
    );
    if args.queued == 0 {
        bail!("recovery needs at least one queued job (--queued)");
    }
    let hub = BenchHub::start(dir, args, "").await?;
    let agent = hub
        .enroll_identities(1, 1)
        .await?
        .pop()
        .context("no identity")?;
    // The restarted hub must listen where the agent dials.
    let dialer = hub.dialer();
    let address = dialer.address.clone();
    let config = hub.cfg.source.clone().context("no config file")?;
    hub.stop().await?;
    let text = std::fs::read_to_string(&config)?.replace(
        "listen = \"127.0.0.1:0\"\ndata_dir",
        &format!("listen = \"{address}\"\ndata_dir"),
    );
    std::fs::write(&config, text)?;
    let cfg = HubConfig::load(&config)?;

    let seeding = Instant::now();
    let db_dir = cfg.data_dir().join(crate::store::DIR);
    seed(&db_dir, cfg.hub.database_cache, args.results, args.queued).await?;
    let seed_time = seeding.elapsed();
    let on_disk = crate::space::dir_size(&db_dir);
    println!(
        "recovery: wrote the history in {:.1} s ({:.0} MB in the database)",
        seed_time.as_secs_f64(),
        on_disk as f64 / 1e6
    );
    let started = Instant::now();
    let spawn_cfg = cfg.clone();
    let spawn = BenchHub::spawn_timed(dir, &spawn_cfg);
    tokio::pin!(spawn);
    let mut spawned = None;

    let (session, first) = loop {
        if started.elapsed() > RESTART_TIMEOUT {
            bail!("the restarted hub did not take the agent within {RESTART_TIMEOUT:?}");
        }
        tokio::select! {
            r = &mut spawn, if spawned.is_none() => {
                let (child, info, t) = r?;
                spawned = Some((child, info, t));
            }
                        r = open_session(&dialer, &agent, 1) => match r {
                Ok(mut s) => {
                    let msg = s.inbound.message().await?;
                    break (s, msg);
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    };
    let resumed = started.elapsed();
    let assigned = match first {
        Some(HubMessage {
            msg: Some(hub_message::Msg::Assign(a)),
        }) => a.job.map(|j| j.job_id).unwrap_or(0),
        other => bail!("the restarted hub's first message was not an assignment: {other:?}"),
    };
    drop(session);
    let (child, info, served) = match spawned {
        Some(s) => s,
        None => spawn.await?,
    };
    let hub = BenchHub::adopt(dir, cfg, child, info);
    let queued_now = hub.metric("trunkfarm_jobs_queued").await?;
    hub.stop().await?;
    println!(
        "recovery: serving after {:.2} s, first job ({assigned}) assigned {:.2} s after the restart; {queued_now} still queued",
        served.as_secs_f64(),
        resumed.as_secs_f64()
    );
    let setup = format!(
        "{} results, {} queued, {:.0} MB database",
        args.results,
        args.queued,
        on_disk as f64 / 1e6
    );
    Ok(vec![
        Figure::new(
            "recovery",
            "restart_to_dispatch",
            resumed.as_secs_f64(),
            "s",
            Target::AtMost(2.0),
            setup.clone(),
        ),
        Figure::new(
            "recovery",
            "restart_to_serving",
            served.as_secs_f64(),
            "s",
            Target::None,
            setup,
        ),
    ])
}
