//! The noise commands: `calibrate` (repeat a project's run N times with the
//! same project commit and runtime, and say per test how often it failed)
//! and `flaky` (the tests that flipped on identical re-runs).

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use trunkfarm_proto::v1::{CalibrateRequest, CalibrateResponse, ListFlakyRequest};

use super::output::{self, Column, Table};
use super::{status_error, view, when};
use crate::commit::short;
use crate::config::HubConfig;

/// How often a waiting `calibrate` asks the hub how far it got.
const POLL: Duration = Duration::from_secs(1);

/// `trunkfarm calibrate`'s arguments.
#[derive(Args)]
pub(super) struct CalibrateArgs {
    /// The project's name in the hub config.
    #[arg(long)]
    project: String,
    /// How many identical runs (1 to 100).
    #[arg(long, default_value_t = 5)]
    runs: u32,
    /// Only its runs against this upstream (default: its newest run's).
    #[arg(long)]
    upstream: Option<String>,
    /// Only its runs on this platform (default: its newest run's).
    #[arg(long)]
    platform: Option<String>,
    /// Repeat this run (its job id) instead of the newest.
    #[arg(long)]
    job: Option<u64>,
    /// Only queue the runs; `calibrate` again (with `--job` of the run it
    /// names) to see how far they got.
    #[arg(long)]
    no_wait: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `trunkfarm calibrate`: queues the runs (once: asking again queues
/// nothing twice), waits until all are recorded unless `--no-wait`, prints.
pub(super) async fn calibrate(cfg: &HubConfig, args: CalibrateArgs) -> anyhow::Result<ExitCode> {
    let mut client = super::client::connect(cfg).await?;
    let mut req = CalibrateRequest {
        project: args.project,
        upstream: args.upstream.unwrap_or_default(),
        platform: args.platform.unwrap_or_default(),
        runs: args.runs,
        job: args.job.unwrap_or(0),
    };
    let mut seen = u32::MAX;
    let resp = loop {
        let resp = client
            .calibrate(req.clone())
            .await
            .map_err(status_error)?
            .into_inner();
        // Stay on the run first chosen, whatever lands meanwhile.
        req.job = resp.original.as_ref().map_or(req.job, |r| r.job_id);
        if args.no_wait || resp.finished >= resp.runs {
            break resp;
        }
        if resp.finished != seen && !args.json {
            eprintln!(
                "{} of {} runs recorded, waiting ...",
                resp.finished, resp.runs
            );
            seen = resp.finished;
        }
        tokio::time::sleep(POLL).await;
    };
    if args.json {
        output::json(&view::Calibration::from(&resp))?;
    } else {
        print_calibration(&resp, args.no_wait);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_calibration(c: &CalibrateResponse, no_wait: bool) {
    let o = c.original.clone().unwrap_or_default();
    println!(
        "{} at {} with {} {} on {}: job {} repeated {} time(s) (jobs {})",
        o.project,
        if o.project_commit.is_empty() {
            "its branch"
        } else {
            short(&o.project_commit)
        },
        o.upstream,
        short(&o.upstream_commit),
        o.platform,
        o.job_id,
        c.runs,
        c.jobs
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    if no_wait && c.finished < c.runs {
        println!(
            "  {} of {} recorded so far; add --job {} (without --no-wait) to wait for the rest",
            c.finished, c.runs, o.job_id
        );
    }
    if c.finished == 0 {
        return;
    }
    println!(
        "  red in {} of {} recorded run(s){}",
        c.red,
        c.finished,
        match c.errors {
            0 => String::new(),
            n => format!(", {n} infrastructure error(s)"),
        }
    );
    if c.tests.is_empty() {
        println!("  no test failed");
        return;
    }
    const COLUMNS: &[Column] = &[
        Column::left("  TEST", 40),
        Column::right("FAILED", 8),
        Column::last("  VERDICT"),
    ];
    let table = Table::new(COLUMNS);
    for t in &c.tests {
        let verdict = match (t.flaky, t.known_flaky) {
            (true, true) => "flaky (known flaky now)",
            (true, false) => "flaky",
            (false, true) => "failed every run (known flaky from earlier flips)",
            (false, false) => "failed every run",
        };
        table.row(&[
            &format!("  {}", t.name),
            &format!("{}/{}", t.failed, t.ran),
            &format!("  {verdict}"),
        ]);
    }
}

/// `trunkfarm flaky`: per project, the tests that flipped on identical
/// re-runs (flips/runs, last flip, known flaky or not).
pub(super) async fn flaky(
    cfg: &HubConfig,
    project: Option<String>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut client = super::client::connect(cfg).await?;
    let projects = client
        .list_flaky(ListFlakyRequest {
            project: project.unwrap_or_default(),
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .projects;
    if json {
        output::json_list::<_, view::ProjectNoise>(&projects)?;
        return Ok(ExitCode::SUCCESS);
    }
    if projects.is_empty() {
        println!("no project is configured");
    }
    for p in &projects {
        println!(
            "{}: {} of {} identical re-run(s) flipped; a test is known flaky after {} flip(s)",
            p.project,
            p.flips,
            p.runs,
            match p.flaky_after {
                0 => "never (flaky_after = 0)".to_owned(),
                n => n.to_string(),
            }
        );
        if p.tests.is_empty() {
            println!("  no test flipped");
            continue;
        }
        const COLUMNS: &[Column] = &[
            Column::left("  TEST", 40),
            Column::right("FLIPS/RUNS", 11),
            Column::left("  LAST FLIP", 24),
            Column::last("KNOWN FLAKY"),
        ];
        let table = Table::new(COLUMNS);
        for t in &p.tests {
            table.row(&[
                &format!("  {}", t.name),
                &format!("{}/{}", t.flips, t.runs),
                &format!("  {}", when(t.last_flip_ms)),
                &if t.known_flaky { "yes" } else { "no" },
            ]);
        }
    }
    Ok(ExitCode::SUCCESS)
}
