//! `trunkfarm bench`: measures the hub with real processes over real TLS on
//! this machine, and prints a table plus one machine-readable line per
//! figure (`BENCH {json}`).
//!
//! Every benchmark starts its own hub as a separate `trunkfarm serve`
//! process, with the production durability: each acknowledged submit and
//! result is fsynced before the reply (group commit). Nothing is relaxed for
//! speed; the output says so. The figures of record are in BENCHMARKS.md.
//!
//! - `throughput`: K real `trunkfarm-agent` processes, N `true` jobs.
//! - `latency`: one agent, one job at a time: submit → command started,
//!   submit → result stored.
//! - `idle`: C idle agent sessions over real TLS connections held by this
//!   process: hub memory per agent and connect rate.
//! - `fanout`: one runtime artifact downloaded by many agents at once.
//! - `recovery`: a hub restarted over a million stored results and ten
//!   thousand queued jobs: time until dispatch resumes.
//! - `bisect`: the demo runtime, a 64-commit push with one break: push →
//!   bisection ended, and the builds it made.
//! - `growth`: N jobs (10 KB log, 20 test cases each) with and without
//!   retention: database size, `breakage` latency, dispatch while pruning
//!   (in process: the hub's parts, a simulated agent).

mod bisect;
mod dispatch;
mod fanout;
mod farm;
mod growth;
mod idle;
mod recovery;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use serde::Serialize;

/// What `trunkfarm bench` prints before any figure.
pub(crate) const DURABILITY: &str = "durability: production settings (every acknowledged submit and result is fsynced before the reply, with group commit); nothing relaxed for the benchmark";

/// One benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Which {
    /// Jobs per second across K agent processes.
    Throughput,
    /// Per-job latency, one job at a time.
    Latency,
    /// Hub memory per idle connected agent, connect rate.
    Idle,
    /// One artifact to many agents at once.
    Fanout,
    /// Restart over a large history until dispatch resumes.
    Recovery,
    /// A 64-commit push with one break bisected on the demo runtime.
    Bisect,
    /// The database after N jobs with and without retention (not part of
    /// `all`: a million jobs take half an hour or more).
    Growth,
    /// All of the above but growth, in that order.
    All,
}

/// Options of `trunkfarm bench`.
#[derive(Args, Clone, Debug)]
pub(crate) struct BenchArgs {
    /// Which benchmarks to run.
    #[arg(value_enum, default_value = "all")]
    pub(crate) which: Vec<Which>,
    /// Where the benchmark keeps its hubs and agents. An earlier benchmark
    /// there is wiped first; any other non-empty directory is refused.
    #[arg(long, default_value = "trunkfarm-bench")]
    pub(crate) dir: PathBuf,
    /// throughput: agent processes.
    #[arg(long, default_value_t = 8)]
    pub(crate) agents: usize,
    /// throughput: jobs (default 2000); growth: jobs (default 1000000).
    #[arg(long)]
    pub(crate) jobs: Option<usize>,
    /// throughput: jobs each agent runs at once.
    #[arg(long, default_value_t = 4)]
    pub(crate) parallel: u32,
    /// throughput, latency, fanout: how the agent processes confine their
    /// jobs. `none` (the default) measures the hub's dispatch; `bwrap` adds
    /// bubblewrap's set-up for every job (namespaces, cgroup, limits) on the
    /// same two cores (latency then cannot reach its FIFO: throughput only).
    #[arg(long, value_enum, default_value = "none")]
    pub(crate) sandbox: crate::config::AgentSandbox,
    /// latency: jobs, one at a time.
    #[arg(long, default_value_t = 300)]
    pub(crate) samples: usize,
    /// idle: agent connections.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) connections: usize,
    /// fanout: artifact size in MiB.
    #[arg(long, default_value_t = 200)]
    pub(crate) artifact_mib: u64,
    /// fanout: agents downloading at once.
    #[arg(long, default_value_t = 16)]
    pub(crate) fanout_agents: usize,
    /// fanout: keep the artifact in an S3-compatible object store at this
    /// endpoint (e.g. a `moto_server` or MinIO on 127.0.0.1) instead of the
    /// data dir; the agents then fetch it through presigned URLs.
    /// Credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
    #[arg(long)]
    pub(crate) s3_endpoint: Option<String>,
    /// fanout with --s3-endpoint: the bucket (it must exist).
    #[arg(long, default_value = "trunkfarm-bench")]
    pub(crate) s3_bucket: String,
    /// growth: which runs: `both` (without and then with retention, in one
    /// process), `without` or `with` (alone: the memory figure of a second
    /// run includes what the allocator kept from the first).
    #[arg(long, value_enum, default_value = "both")]
    pub(crate) retention: growth::Runs,
    /// Every benchmark's hub: its database's page cache
    /// (`hub.database_cache`, e.g. "1 GiB"; default the hub's default).
    #[arg(long)]
    pub(crate) database_cache: Option<String>,
    /// recovery: finished jobs (with their results) stored before the restart.
    #[arg(long, default_value_t = 1_000_000)]
    pub(crate) results: u64,
    /// recovery: queued jobs stored before the restart.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) queued: u64,
}

impl BenchArgs {
    /// The `[hub]` keys the options set, as TOML lines.
    pub(crate) fn hub_keys(&self) -> String {
        match &self.database_cache {
            Some(size) => format!("database_cache = {}\n", toml::Value::String(size.clone())),
            None => String::new(),
        }
    }
}

/// One measured figure.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Figure {
    /// The benchmark (`throughput`, ...).
    pub(crate) bench: &'static str,
    /// What was measured (`jobs_per_s`, ...).
    pub(crate) name: &'static str,
    /// The value.
    pub(crate) value: f64,
    /// Its unit.
    pub(crate) unit: &'static str,
    /// The target, as text (`>= 600`), empty when there is none.
    pub(crate) target: String,
    /// Whether the target was met (`None` without a target).
    pub(crate) met: Option<bool>,
    /// The conditions (agents, jobs, ...).
    pub(crate) setup: String,
}

/// Targets are "at least" or "at most" a value.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Target {
    /// No target: the figure is information.
    None,
    /// The value must be at least this.
    AtLeast(f64),
    /// The value must be at most this.
    AtMost(f64),
}

impl Figure {
    /// A figure checked against `target`.
    pub(crate) fn new(
        bench: &'static str,
        name: &'static str,
        value: f64,
        unit: &'static str,
        target: Target,
        setup: String,
    ) -> Figure {
        let (target, met) = match target {
            Target::None => (String::new(), None),
            Target::AtLeast(t) => (format!(">= {t}"), Some(value >= t)),
            Target::AtMost(t) => (format!("<= {t}"), Some(value <= t)),
        };
        Figure {
            bench,
            name,
            value,
            unit,
            target,
            met,
            setup,
        }
    }

    /// Prints the machine-readable line.
    fn print_line(&self) {
        match serde_json::to_string(self) {
            Ok(json) => println!("BENCH {json}"),
            Err(e) => eprintln!("cannot encode a figure: {e}"),
        }
    }
}

/// Runs the chosen benchmarks; exit code 0 even when a target is missed (the
/// figures are the product; the table says which missed), 2 on errors.
pub(crate) async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let dir = farm::prepare_dir(&args.dir)?;
    let mut which: Vec<Which> = args.which.clone();
    if which.contains(&Which::All) {
        which = vec![
            Which::Throughput,
            Which::Latency,
            Which::Idle,
            Which::Fanout,
            Which::Recovery,
            Which::Bisect,
        ];
    }
    println!(
        "trunkfarm bench {} on {}",
        env!("CARGO_PKG_VERSION"),
        machine()
    );
    println!("{DURABILITY}");
    let mut figures = Vec::new();
    for w in which {
        let sub = dir.join(format!("{w:?}").to_lowercase());
        std::fs::create_dir_all(&sub)?;
        let got = match w {
            Which::Throughput => dispatch::throughput(&args, &sub).await?,
            Which::Latency => dispatch::latency(&args, &sub).await?,
            Which::Idle => idle::run(&args, &sub).await?,
            Which::Fanout => fanout::run(&args, &sub).await?,
            Which::Recovery => recovery::run(&args, &sub).await?,
            Which::Bisect => bisect::run(&args, &sub).await?,
            Which::Growth => growth::run(&args, &sub).await?,
            Which::All => Vec::new(),
        };
        for f in &got {
            f.print_line();
        }
        figures.extend(got);
    }
    print_table(&figures);
    Ok(ExitCode::SUCCESS)
}

/// The machine, for the record: cores and memory.
fn machine() -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| format!("{:.0} GiB", kb as f64 / 1024.0 / 1024.0))
        .unwrap_or_else(|| "? GiB".into());
    format!("{cores} cores, {mem}")
}

fn print_table(figures: &[Figure]) {
    println!();
    println!(
        "{:<11} {:<26} {:>12} {:<9} {:<10} {:<6} setup",
        "bench", "figure", "value", "unit", "target", "met"
    );
    for f in figures {
        let met = match f.met {
            Some(true) => "yes",
            Some(false) => "MISSED",
            None => "",
        };
        println!(
            "{:<11} {:<26} {:>12} {:<9} {:<10} {:<6} {}",
            f.bench,
            f.name,
            format_value(f.value),
            f.unit,
            f.target,
            met,
            f.setup
        );
    }
}

fn format_value(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The `p`-th percentile (0..=100) of `sorted` by nearest rank.
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn targets_are_checked_both_ways() {
        let f = Figure::new("b", "n", 700.0, "x", Target::AtLeast(600.0), String::new());
        assert_eq!((f.met, f.target.as_str()), (Some(true), ">= 600"));
        let f = Figure::new("b", "n", 30.0, "ms", Target::AtMost(25.0), String::new());
        assert_eq!(f.met, Some(false));
        let f = Figure::new("b", "n", 1.0, "x", Target::None, String::new());
        assert_eq!(f.met, None);
    }
}
