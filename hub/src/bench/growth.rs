//! Growth: what the database holds after N jobs (10 KB of log and 20 test
//! cases each), with and without retention, and what that costs: the
//! database part of `breakage` (one upstream commit in [`BREAK_EVERY`]
//! breaks the project and the next fixes it), and dispatch while retention
//! prunes.
//!
//! The hub's own parts run in this process, over a real database in the
//! benchmark's directory: the dispatcher (every job submitted under its
//! pipeline key, assigned to a connected agent session, its log chunks
//! stored and its result recorded as the agent service does), the pipeline
//! (polling a real upstream repository, which the benchmark commits to as
//! the load goes on, and taking every finished job in: runs, test cases,
//! series, transitions, indexes, through the code that records real
//! results), the notifier and retention. Only the agent is simulated: no
//! process runs the jobs, so the figures are the hub's.
//!
//! The load goes at the pace of the slowest part, as a hub's does in a
//! steady state: at most [`IN_FLIGHT`] jobs not yet recorded by dispatch,
//! and at most [`MAX_BACKLOG`] finished jobs not yet taken in by the
//! pipeline.
//!
//! Retention's clock is the load: a pass runs every 1 % of the jobs, with
//! cutoffs at the times earlier jobs finished — runs and job records kept
//! for the last 10 % of the jobs, test cases and logs for the last 5 % —
//! so a run of any size reaches its steady state (its records stop growing
//! at 10 % of the load: the files' size at half the load and at its end
//! say whether they stop too), and the passes run while the load goes on
//! (dispatch's latency is measured during them).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use trunkfarm_proto::v1::hub_message::Msg;
use trunkfarm_proto::v1::{
    Capabilities, JobRef, JobResult, JobSpec, LogChunk, LogStream, Outcome, ReportFile,
};

use super::{BenchArgs, Figure, Target, percentile};
use crate::artifacts::Artifacts;
use crate::config::HubConfig;
use crate::dispatch::{DispatchSettings, Dispatcher, Hello, Outgoing};
use crate::job_key::JobKey;
use crate::logs::JobLogs;
use crate::notify::Notifier;
use crate::pipeline::Pipeline;
use crate::repo_credentials::RepoCredentials;
use crate::results::{Commit, Results};
use crate::retention::{Cutoffs, Retention};
use crate::space::DataDir;
use crate::store::{Store, now_ms};

/// Log bytes per job.
const LOG_BYTES: usize = 10 * 1024;
/// Test cases per job.
const CASES: usize = 20;
/// Jobs in flight at once (submitted, not yet recorded by dispatch).
const IN_FLIGHT: usize = 32;
/// `breakage` calls measured.
const BREAKAGE_CALLS: usize = 300;
/// The agent session's slots.
const SLOTS: u32 = 64;
/// The most finished jobs left for the pipeline to take in before the load
/// waits for it.
const MAX_BACKLOG: usize = 1024;
/// How often the wait for the pipeline's intake says how far it is.
const PROGRESS_EVERY: Duration = Duration::from_secs(30);
/// Retention's passes: one every 1/PASSES of the jobs during the load
/// (unless the last one still runs; `PASSES - 1` when pruning keeps up),
/// and one after it.
const PASSES: usize = 100;
/// One job in this many fails one test. Its confirming re-run (another
/// job id) passes, so the verdict is classed flaky: the series records it,
/// but no transition may blame a commit.
const FAIL_EVERY: usize = 500;
/// One upstream commit in this many breaks the project: every test run
/// on it fails (its re-runs too), and a commit made after
/// [`BROKEN_RUNS`] jobs fixes it. So `breakage` over the heads reads real
/// went-red and fixed transitions, as on a trunk that breaks things.
const BREAK_EVERY: usize = 5;
/// Test runs fed on a breaking commit before the fix is committed (a
/// real trunk has one run per project and commit; each failing one holds
/// a confirmation with its re-runs).
const BROKEN_RUNS: usize = IN_FLIGHT;
/// The test case the flaky runs fail, and the one a breaking commit does.
const FLAKY_CASE: usize = 0;
const BROKEN_CASE: usize = 1;

/// What one run (with or without retention) measured.
struct Measured {
    retention: bool,
    jobs: usize,
    elapsed: Duration,
    /// Bytes of every key and value in the database.
    live_bytes: u64,
    /// Bytes of the database's files.
    disk_bytes: u64,
    /// Bytes of the database's files once half the jobs were fed (with
    /// retention the records have long reached their steady size then).
    disk_at_half: u64,
    /// This process's resident memory once every job was taken in (the
    /// hub's parts hold it all; a second run's includes what the allocator
    /// kept from the first).
    rss_bytes: u64,
    /// Objects the logs were compacted into (the object store's part of
    /// issue 16): `None` until compaction exists.
    objects: Option<u64>,
    breakage_ms: Vec<f64>,
    /// What `breakage` over each of the last `heads` heads found: went
    /// red there, cleared of it.
    breakage_found: (usize, usize),
    heads: usize,
    /// Submit → assignment, ms, of jobs submitted while a retention pass ran.
    dispatch_pruning_ms: Vec<f64>,
    /// Submit → assignment, ms, of every job.
    dispatch_ms: Vec<f64>,
    passes: usize,
    /// The last pass, after the load: what the passes during it left.
    last_pass: Duration,
}

/// How many objects the logs of the database in `data_dir` were compacted
/// into (the local object store under `<data_dir>/objects/logs`).
fn object_count(data_dir: &Path) -> Option<u64> {
    let mut count = 0u64;
    let mut pending = vec![data_dir.join(crate::objects::LOCAL_DIR).join("logs")];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).ok()?.flatten() {
            match entry.file_type() {
                Ok(t) if t.is_dir() => pending.push(entry.path()),
                Ok(_) => count += 1,
                Err(_) => {}
            }
        }
    }
    Some(count)
}

/// Which runs `bench growth` makes (`--retention`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Runs {
    /// Without and then with retention, in one process.
    Both,
    /// Without retention only.
    Without,
    /// With retention only.
    With,
}

/// Runs the benchmark without and with retention (as `--retention` says).
pub(super) async fn run(args: &BenchArgs, dir: &Path) -> anyhow::Result<Vec<Figure>> {
    let jobs = args.jobs.unwrap_or(1_000_000).max(100);
    let runs: &[bool] = match args.retention {
        Runs::Both => &[false, true],
        Runs::Without => &[false],
        Runs::With => &[true],
    };
    println!(
        "growth: {jobs} jobs ({} KiB log and {CASES} test cases each), {}",
        LOG_BYTES / 1024,
        match args.retention {
            Runs::Both => "without and then with retention",
            Runs::Without => "without retention",
            Runs::With => "with retention",
        }
    );
    let mut figures = Vec::new();
    for &retention in runs {
        let sub = dir.join(if retention { "with" } else { "without" });
        std::fs::create_dir_all(&sub)?;
        let o = one(args, &sub, jobs, retention).await?;
        print_outcome(&o);
        figures.extend(figures_of(&o));
    }
    Ok(figures)
}

fn print_outcome(o: &Measured) {
    let mut b = o.breakage_ms.clone();
    b.sort_by(f64::total_cmp);
    let mut d = o.dispatch_pruning_ms.clone();
    d.sort_by(f64::total_cmp);
    let mut all = o.dispatch_ms.clone();
    all.sort_by(f64::total_cmp);
    let pruning = if o.retention {
        format!(
            " ({:.2} ms while pruning); {} of {} passes ran during the load, the last after it took {:.1} s",
            percentile(&d, 99.0),
            o.passes.saturating_sub(1),
            PASSES - 1,
            o.last_pass.as_secs_f64(),
        )
    } else {
        String::new()
    };
    println!(
        "growth {}: {} jobs in {:.1} s; database {:.1} MiB of records, {:.1} MiB on disk ({:.1} MiB at half the load); memory {:.0} MiB; objects {}; breakage p50 {:.2} ms p99 {:.2} ms (over {} heads: {} went red there, {} cleared by re-runs or bisection); dispatch p99 {:.2} ms{pruning}",
        if o.retention {
            "with retention"
        } else {
            "without retention"
        },
        o.jobs,
        o.elapsed.as_secs_f64(),
        o.live_bytes as f64 / 1048576.0,
        o.disk_bytes as f64 / 1048576.0,
        o.disk_at_half as f64 / 1048576.0,
        o.rss_bytes as f64 / 1048576.0,
        o.objects
            .map(|n| n.to_string())
            .unwrap_or_else(|| "n/a".into()),
        percentile(&b, 50.0),
        percentile(&b, 99.0),
        o.heads,
        o.breakage_found.0,
        o.breakage_found.1,
        percentile(&all, 99.0),
    );
}

fn figures_of(o: &Measured) -> Vec<Figure> {
    let setup = format!(
        "{} jobs, {} KiB log + {CASES} cases each, {}",
        o.jobs,
        LOG_BYTES / 1024,
        if o.retention {
            "retention: runs and jobs of the last 10 %, cases and logs of the last 5 %"
        } else {
            "no retention"
        }
    );
    let sorted = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v
    };
    let b = sorted(&o.breakage_ms);
    let d = sorted(&o.dispatch_ms);
    let dp = sorted(&o.dispatch_pruning_ms);
    let (db, dbd, rss, bp50, bp99, dp99, dpp99, secs, objects) = if o.retention {
        (
            "db_mib_retained",
            "db_disk_mib_retained",
            "rss_mib_retained",
            "breakage_p50_retained",
            "breakage_p99_retained",
            "dispatch_p99_retained",
            "dispatch_p99_pruning",
            "elapsed_s_retained",
            "objects_retained",
        )
    } else {
        (
            "db_mib_unpruned",
            "db_disk_mib_unpruned",
            "rss_mib_unpruned",
            "breakage_p50_unpruned",
            "breakage_p99_unpruned",
            "dispatch_p99_unpruned",
            "",
            "elapsed_s_unpruned",
            "objects_unpruned",
        )
    };
    let breakage = format!(
        "{setup}; each call asks about one of the last {} heads; together they found {} went red there and {} cleared by re-runs or bisection",
        o.heads, o.breakage_found.0, o.breakage_found.1
    );
    let mut out = vec![
        Figure::new(
            "growth",
            db,
            o.live_bytes as f64 / 1048576.0,
            "MiB",
            Target::None,
            setup.clone(),
        ),
        Figure::new(
            "growth",
            dbd,
            o.disk_bytes as f64 / 1048576.0,
            "MiB",
            Target::None,
            setup.clone(),
        ),
        Figure::new(
            "growth",
            rss,
            o.rss_bytes as f64 / 1048576.0,
            "MiB",
            Target::None,
            setup.clone(),
        ),
        Figure::new(
            "growth",
            bp50,
            percentile(&b, 50.0),
            "ms",
            Target::None,
            breakage.clone(),
        ),
        Figure::new(
            "growth",
            bp99,
            percentile(&b, 99.0),
            "ms",
            Target::None,
            breakage,
        ),
        Figure::new(
            "growth",
            dp99,
            percentile(&d, 99.0),
            "ms",
            Target::None,
            setup.clone(),
        ),
        Figure::new(
            "growth",
            secs,
            o.elapsed.as_secs_f64(),
            "s",
            Target::None,
            setup.clone(),
        ),
    ];
    out.push(Figure::new(
        "growth",
        if o.retention {
            "db_disk_mib_half_retained"
        } else {
            "db_disk_mib_half_unpruned"
        },
        o.disk_at_half as f64 / 1048576.0,
        "MiB",
        Target::None,
        format!("{setup}; the files once half the jobs were fed"),
    ));
    if let Some(n) = o.objects {
        out.push(Figure::new(
            "growth",
            objects,
            n as f64,
            "objects",
            Target::None,
            setup.clone(),
        ));
    }
    if o.retention && !dp.is_empty() {
        out.push(Figure::new(
            "growth",
            dpp99,
            percentile(&dp, 99.0),
            "ms",
            Target::None,
            setup.clone(),
        ));
    }
    if o.retention {
        out.push(Figure::new(
            "growth",
            "retention_passes_during_load",
            o.passes.saturating_sub(1) as f64,
            "passes",
            Target::None,
            format!(
                "{setup}; one every 1 % of the jobs unless the last still runs: {} when pruning keeps up",
                PASSES - 1
            ),
        ));
        out.push(Figure::new(
            "growth",
            "retention_last_pass_s",
            o.last_pass.as_secs_f64(),
            "s",
            Target::None,
            format!("{setup}; after the load, unpaused"),
        ));
    }
    out
}

fn git(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("git")
        .current_dir(dir)
        .args([
            "-c",
            "user.name=bench",
            "-c",
            "user.email=bench@example.org",
        ])
        .args(args)
        .output()
        .context("cannot run git (the growth benchmark polls a real repository)")?;
    if !out.status.success() {
        bail!(
            "git {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn repo(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    git(dir, &["init", "--quiet", "-b", "main"])?;
    git(dir, &["commit", "--quiet", "--allow-empty", "-m", "start"])?;
    Ok(())
}

/// The parts of a hub this benchmark drives.
struct Parts {
    dispatch: Dispatcher,
    logs: Arc<JobLogs>,
    results: Results,
    pipeline: Pipeline,
    retention: Retention,
    store: Store,
    stop: CancellationToken,
    /// Moves finished logs into the object store, as the hub's does.
    compactor: tokio::task::JoinHandle<()>,
}

async fn parts(cfg: &HubConfig, data: &Path) -> anyhow::Result<Parts> {
    let space = DataDir::new(data, 0);
    let objects = crate::objects::Objects::open(&cfg.storage, data).await?;
    let store = Store::open_data_dir(data, cfg.hub.database_cache)?;
    let logs = Arc::new(
        JobLogs::open(&store, cfg.limits.max_log_size, objects.clone())?
            .with_compact_from(cfg.storage.compact_logs_from),
    );
    let dispatch = Dispatcher::open(
        &store,
        logs.clone(),
        DispatchSettings::from_config(
            &cfg.dispatch,
            space.clone(),
            RepoCredentials::from_urls(std::iter::empty()),
        ),
    )?;
    let artifacts = Artifacts::open(
        &store,
        data.join("artifacts"),
        cfg.artifacts.max_size,
        space,
        crate::artifacts::Backend::for_storage(&objects),
    )
    .await?;
    let results = Results::open(&store)?.with_flaky_rules(cfg.flaky_rules());
    let stop = CancellationToken::new();
    let compactor = crate::server::start_compactor(&logs, &dispatch, &stop);
    let notifier = Notifier::start(
        cfg,
        &store,
        results.clone(),
        logs.clone(),
        "http://bench.invalid".into(),
        stop.clone(),
    )?;
    let pipeline = Pipeline::start(
        cfg,
        &store,
        dispatch.clone(),
        results.clone(),
        artifacts,
        notifier.clone(),
        stop.clone(),
    )?;
    let retention = Retention::new(
        results.clone(),
        dispatch.clone(),
        logs.clone(),
        pipeline.clone(),
        notifier,
        cfg.retention.clone(),
    );
    Ok(Parts {
        dispatch,
        logs,
        results,
        pipeline,
        retention,
        store,
        stop,
        compactor,
    })
}

/// A JUnit report of `CASES` cases, the first failing when `failing`.
fn report(failing: Option<usize>) -> Vec<ReportFile> {
    let cases: String = (0..CASES)
        .map(|i| {
            let body = if failing == Some(i) {
                r#"<failure message="expected 5, got 6"/>"#
            } else {
                ""
            };
            format!(
                r#"<testcase classname="growth.suite" name="case_number_{i}">{body}</testcase>"#
            )
        })
        .collect();
    vec![ReportFile {
        path: "junit.xml".into(),
        data: format!(r#"<testsuite name="growth">{cases}</testsuite>"#).into_bytes(),
        ..Default::default()
    }]
}

/// Shared between the feeder, the agent and the pruner.
#[derive(Default)]
struct Shared {
    /// Each job's submit or assignment, whichever was seen first (the
    /// assignment may reach the agent before the submit returns).
    halves: Mutex<HashMap<u64, Half>>,
    dispatch_ms: Mutex<Vec<f64>>,
    pruning_ms: Mutex<Vec<f64>>,
    /// When each job (by its number in the load) was recorded, ms.
    finished_at: Mutex<Vec<u64>>,
    pruning: AtomicBool,
    done: AtomicUsize,
    /// The upstream commits that break the project.
    breaking: Mutex<HashSet<String>>,
}

/// One end of a job's submit → assignment, with whether a retention pass
/// ran then.
#[derive(Clone, Copy)]
enum Half {
    Submitted(Instant, bool),
    Assigned(Instant, bool),
}

impl Shared {
    /// Notes one end of job `id`'s dispatch; with both, its latency.
    fn meet(&self, id: u64, half: Half) {
        let other = {
            let mut halves = lock(&self.halves);
            match halves.remove(&id) {
                Some(other) => other,
                None => {
                    halves.insert(id, half);
                    return;
                }
            }
        };
        let (submitted, assigned, pruning) = match (half, other) {
            (Half::Submitted(s, a), Half::Assigned(t, b))
            | (Half::Assigned(t, b), Half::Submitted(s, a)) => (s, t, a || b),
            // A job seen twice from one side (a re-assignment): ignored.
            _ => return,
        };
        let ms = assigned.saturating_duration_since(submitted).as_secs_f64() * 1000.0;
        let list = if pruning {
            &self.pruning_ms
        } else {
            &self.dispatch_ms
        };
        lock(list).push(ms);
    }
}

/// One run of the load.
async fn one(
    args: &BenchArgs,
    dir: &Path,
    jobs: usize,
    with_retention: bool,
) -> anyhow::Result<Measured> {
    let rt = dir.join("rt");
    repo(&rt)?;
    let data = dir.join("data");
    let toml = format!(
        r#"
[hub]
data_dir = "{data}"
{hub_keys}

[pipeline]
bisect_max_builds = 0

[[upstream]]
name = "rt"
url = "{rt}"
poll_interval = "200ms"
platforms = ["linux"]
build = ["true"]

[[project]]
name = "growth"
url = "{rt}"
poll_interval = "1h"
test = ["true"]
junit = ["junit.xml"]
"#,
        data = data.display(),
        rt = rt.display(),
        hub_keys = args.hub_keys(),
    );
    let cfg = HubConfig::from_toml(&toml, None)?;
    let p = parts(&cfg, &data).await?;
    let shared = Arc::new(Shared::default());

    // The agent: takes every assignment, logs 10 KB, reports the result.
    let (tx, mut rx) = mpsc::unbounded_channel::<Outgoing>();
    let labels = vec!["linux".to_string()];
    p.dispatch
        .connect(
            "ag_growth",
            &[],
            Hello {
                name: "growth".into(),
                caps: Capabilities {
                    labels: labels.clone(),
                    max_parallel_jobs: SLOTS,
                    ..Default::default()
                },
                labels: labels.into_iter().collect(),
                trusted: true,
                quarantined: false,
                max_parallel: SLOTS,
                draining: false,
                paused: None,
                offered: None,
                agent_version: "bench".into(),
                remote: "local".into(),
                tx,
            },
        )
        .await?;
    let agent = {
        let (dispatch, logs, shared) = (p.dispatch.clone(), p.logs.clone(), shared.clone());
        tokio::spawn(async move {
            while let Some(msg) = rx.recv().await {
                let Ok(hm) = *msg else { continue };
                let Some(Msg::Assign(a)) = hm.msg else {
                    continue;
                };
                let Some(job) = a.job else { continue };
                let pruning = shared.pruning.load(Ordering::Relaxed);
                shared.meet(job.job_id, Half::Assigned(Instant::now(), pruning));
                let (dispatch, logs, shared) = (dispatch.clone(), logs.clone(), shared.clone());
                tokio::spawn(async move {
                    match finish(&dispatch, &logs, &shared.breaking, job).await {
                        Ok(true) => {
                            let mut at = lock(&shared.finished_at);
                            at.push(now_ms());
                            shared.done.fetch_add(1, Ordering::Relaxed);
                        }
                        // A build or a re-run: the load did not submit it, so
                        // its assignment meets no submit.
                        Ok(false) => {
                            lock(&shared.halves).remove(&job.job_id);
                        }
                        Err(e) => tracing::error!("growth: job {}: {e}", job.job_id),
                    }
                });
            }
        })
    };

    // Its heartbeats, as a real agent sends them (an agent silent for two
    // heartbeats gets no work).
    let beat = {
        let (dispatch, every) = (p.dispatch.clone(), cfg.dispatch.heartbeat_interval / 2);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = dispatch.heartbeat("ag_growth", &[]).await {
                    tracing::error!("growth: heartbeat: {e}");
                }
            }
        })
    };

    // The upstream's head, once polled.
    let head = || {
        p.pipeline
            .recent_heads("rt", 1)
            .map(|h| h.first().map(|h| h.commit.clone()))
    };
    let mut commit = wait_head(&head, None).await?;
    let started = Instant::now();
    let commit_every = (jobs / 50).max(BROKEN_RUNS + 1);
    // When the fix of a breaking commit is made.
    let mut fix_at = None;
    let pass_every = (jobs / PASSES).max(1);
    let mut passes = 0;
    let mut pass: Option<tokio::task::JoinHandle<anyhow::Result<()>>> = None;
    let mut in_flight = Vec::new();
    let mut disk_at_half = 0;
    for n in 0..jobs {
        let breaks = n > 0 && n % commit_every == 0 && (n / commit_every) % BREAK_EVERY == 0;
        if n > 0 && n % commit_every == 0 || fix_at == Some(n) {
            let message = if breaks {
                format!("load {n}: breaks the project")
            } else {
                format!("load {n}")
            };
            git(&rt, &["commit", "--quiet", "--allow-empty", "-m", &message])?;
            commit = wait_head(&head, Some(&commit)).await?;
            if breaks {
                lock(&shared.breaking).insert(commit.clone());
                fix_at = Some(n + BROKEN_RUNS);
            }
        }
        if with_retention
            && n > 0
            && n % pass_every == 0
            && pass.as_ref().is_none_or(|h| h.is_finished())
        {
            if let Some(h) = pass.take() {
                h.await??;
            }
            let cut = cutoffs(&shared, n, jobs);
            let (r, s) = (p.retention.clone(), shared.clone());
            passes += 1;
            pass = Some(tokio::spawn(async move {
                s.pruning.store(true, Ordering::Relaxed);
                let done = r
                    .prune(cut, Duration::from_millis(10), &CancellationToken::new())
                    .await;
                s.pruning.store(false, Ordering::Relaxed);
                done.map(|_| ()).map_err(Into::into)
            }));
        }
        let key = JobKey::Test {
            project: "growth".into(),
            upstream: "rt".into(),
            platform: "linux".into(),
            upstream_commit: commit.clone(),
            project_commit: format!("{n:040x}"),
            nonce: Some(1),
        };
        let spec = JobSpec {
            commands: vec!["true".into()],
            labels: vec!["linux".into()],
            project: "growth".into(),
            timeout_secs: 60,
            report_paths: vec!["junit.xml".into()],
            ..Default::default()
        };
        let d = p.dispatch.clone();
        let s = shared.clone();
        in_flight.push(tokio::spawn(async move {
            let t = Instant::now();
            let pruning = s.pruning.load(Ordering::Relaxed);
            let (id, _) = d.submit_keyed(spec, 1, key.to_string()).await?;
            s.meet(id, Half::Submitted(t, pruning));
            anyhow::Ok(id)
        }));
        if in_flight.len() >= IN_FLIGHT {
            for h in in_flight.drain(..) {
                h.await??;
            }
            // Keep the agent from falling far behind.
            while (n + 1).saturating_sub(shared.done.load(Ordering::Relaxed)) > 4 * IN_FLIGHT {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            // And the pipeline's intake: a hub in a steady state takes its
            // finished jobs in as they come. A backlog of hundreds of
            // thousands (the load outran the intake fourfold) held their
            // results, reports and logs in the database at once.
            while p.dispatch.inbox_ids()?.len() > MAX_BACKLOG {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        if n % 10_000 == 9_999 {
            let files = crate::space::dir_size(&data.join(crate::store::DIR));
            println!(
                "growth: {} jobs in {:.0} s; database files {:.0} MiB",
                n + 1,
                started.elapsed().as_secs_f64(),
                files as f64 / 1048576.0
            );
        }
        if n + 1 == jobs / 2 {
            disk_at_half = crate::space::dir_size(&data.join(crate::store::DIR));
        }
    }
    for h in in_flight.drain(..) {
        h.await??;
    }
    if let Some(h) = pass.take() {
        h.await??;
    }
    // Everything recorded and taken in.
    // Polled cheaply (one key): a scan of a long inbox every 20 ms took a
    // core from the intake it waits for.
    let mut told = Instant::now();
    while shared.done.load(Ordering::Relaxed) < jobs || !p.dispatch.inbox_is_empty()? {
        if told.elapsed() >= PROGRESS_EVERY {
            told = Instant::now();
            println!(
                "growth: {} finished jobs still to be taken in by the pipeline ({:.0} s)",
                p.dispatch.inbox_ids()?.len(),
                started.elapsed().as_secs_f64()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let last_started = Instant::now();
    if with_retention {
        let last = p
            .retention
            .prune(
                cutoffs(&shared, jobs, jobs),
                Duration::ZERO,
                &CancellationToken::new(),
            )
            .await?;
        passes += 1;
        let t = last.took;
        println!(
            "growth: the last retention pass took {:.1} s for results, {:.1} s for logs, {:.1} s for job records, {:.1} s for mails",
            t.results.as_secs_f64(),
            t.logs.as_secs_f64(),
            t.jobs.as_secs_f64(),
            t.notify.as_secs_f64()
        );
    }
    let last_pass = last_started.elapsed();
    let elapsed = started.elapsed();
    let rss_bytes = super::farm::rss_bytes(std::process::id())?;

    // breakage over the recent upstream commits.
    let commits: Vec<String> = p
        .pipeline
        .recent_heads("rt", 50)?
        .into_iter()
        .map(|h| h.commit)
        .collect();
    let mut breakage_ms = Vec::with_capacity(BREAKAGE_CALLS);
    let mut breakage_found = (0, 0);
    for i in 0..BREAKAGE_CALLS {
        let sha = commits[i % commits.len()].clone();
        let t = Instant::now();
        let b = p.results.breakage(
            "rt",
            vec![Commit {
                sha,
                ..Default::default()
            }],
        )?;
        breakage_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        if i < commits.len() {
            breakage_found.0 += b.went_red.len();
            breakage_found.1 += b.cleared.len();
        }
    }

    p.stop.cancel();
    agent.abort();
    beat.abort();
    if let Err(e) = p.compactor.await {
        tracing::warn!("the log compactor failed: {e}");
    }
    p.store.flush_now()?;
    let live_bytes = p.store.live_bytes()?;
    let disk_bytes = crate::space::dir_size(&data.join(crate::store::DIR));
    let take = |m: &Mutex<Vec<f64>>| std::mem::take(&mut *lock(m));
    let mut dispatch_ms = take(&shared.dispatch_ms);
    let dispatch_pruning_ms = take(&shared.pruning_ms);
    dispatch_ms.extend(dispatch_pruning_ms.iter().copied());
    Ok(Measured {
        retention: with_retention,
        jobs,
        elapsed,
        live_bytes,
        disk_bytes,
        disk_at_half,
        rss_bytes,
        objects: object_count(&data),
        breakage_ms,
        breakage_found,
        heads: commits.len(),
        dispatch_pruning_ms,
        dispatch_ms,
        passes,
        last_pass,
    })
}

/// Retention's clock: runs and job records of the last 10 % of the
/// `jobs` the load feeds are kept, test cases and logs of the last 5 %
/// (cutoffs at the times those finished, once `n` jobs were fed): a window
/// of a fixed number of jobs, so the records reach their steady size at
/// 10 % of the load and the files' growth after it is what retention does
/// not bound.
fn cutoffs(shared: &Shared, n: usize, jobs: usize) -> Cutoffs {
    let finished = lock(&shared.finished_at);
    let at = |back: usize| -> u64 {
        let i = n.saturating_sub(back).min(finished.len());
        match i.checked_sub(1) {
            Some(i) => finished[i],
            None => 0,
        }
    };
    let (runs, cases) = (at(jobs / 10), at(jobs / 20));
    Cutoffs {
        runs,
        test_cases: cases,
        logs: cases,
        jobs: runs,
    }
}

async fn wait_head(
    head: &impl Fn() -> Result<Option<String>, crate::store::StoreError>,
    old: Option<&str>,
) -> anyhow::Result<String> {
    for _ in 0..3000 {
        if let Some(h) = head()?
            && old != Some(h.as_str())
        {
            return Ok(h);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("the upstream's new head was not polled within 30 s")
}

/// As an agent would: the log (in 4 KiB chunks), then the result with
/// its JUnit report; one test run in [`FAIL_EVERY`] fails a test, and
/// every run (or re-run) on a `breaking` upstream commit. A build (the
/// poller's, of each new upstream head) fails at once. Returns whether it
/// was a job the load submitted (not a build or a re-run).
async fn finish(
    dispatch: &Dispatcher,
    logs: &JobLogs,
    breaking: &Mutex<HashSet<String>>,
    job: JobRef,
) -> anyhow::Result<bool> {
    let Some(rec) = dispatch.get(job.job_id)? else {
        bail!("job {} is not stored", job.job_id);
    };
    let test = rec.key.starts_with(crate::job_key::TEST_PREFIX);
    let key = JobKey::parse(&rec.key);
    // One the load submitted (not a re-run the pipeline queued).
    let fed = matches!(key, Some(JobKey::Test { .. }));
    let on_breaking = match key.as_ref().map(JobKey::base) {
        Some(JobKey::Test {
            upstream_commit, ..
        }) => lock(breaking).contains(upstream_commit),
        _ => false,
    };
    let (outcome, reports) = if !test {
        (Outcome::Failed, Vec::new())
    } else {
        let line = b"growth: a line of test output, as a suite prints it ......\n";
        let mut log = Vec::with_capacity(LOG_BYTES);
        while log.len() < LOG_BYTES {
            log.extend_from_slice(line);
        }
        log.truncate(LOG_BYTES);
        for (i, data) in log.chunks(4096).enumerate() {
            logs.append(LogChunk {
                job: Some(job),
                seq: i as u64 + 1,
                stream: LogStream::Stdout.into(),
                data: data.to_vec(),
            })?;
        }
        // Another test than the flaky one (whose failures are excused once
        // it is known flaky).
        let failing = if on_breaking {
            Some(BROKEN_CASE)
        } else if job.job_id % FAIL_EVERY as u64 == 0 {
            Some(FLAKY_CASE)
        } else {
            None
        };
        let outcome = if failing.is_some() {
            Outcome::Failed
        } else {
            Outcome::Passed
        };
        (outcome, report(failing))
    };
    let result = JobResult {
        job: Some(job),
        outcome: outcome.into(),
        exit_code: Some(i32::from(outcome != Outcome::Passed)),
        reports,
        last_log_seq: if test {
            LOG_BYTES.div_ceil(4096) as u64
        } else {
            0
        },
        ..Default::default()
    };
    dispatch.record_result("ag_growth", result).await?;
    Ok(fed)
}

/// The value behind `m` (a panic elsewhere leaves it whole: each change
/// under these locks is one push or insert).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
