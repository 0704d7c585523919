//! The core developers' commands: `status` (the grid), `breakage` (what a
//! trunk change broke), `transitions` (history), `upstream build` (build
//! now) and `artifact list`.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use trunkfarm_proto::v1::{
    BuildInfo, BuildState, BuildUpstreamRequest, BuildUpstreamResponse, GetBreakageRequest,
    GetStatusRequest, GetStatusResponse, ListArtifactsRequest, ListTransitionsRequest, RunInfo,
    RunStatus, StatusCell, Transition, TransitionKind,
};

use super::client::AdminClient;
use super::output::{self, Column, Table};
use super::{status_error, view, when};
use crate::commit::short;
use crate::config::HubConfig;
use trunkfarm_proto::settings::fmt_duration;

/// `trunkfarm upstream …`.
#[derive(Subcommand)]
pub(super) enum UpstreamCommand {
    /// Build an upstream now (default: its branch head) on every platform;
    /// when the build passes, every project is tested against it.
    Build {
        /// The upstream's name in the hub config (default: the only one).
        name: Option<String>,
        /// A commit (full or abbreviated), branch or tag.
        #[arg(long)]
        rev: Option<String>,
        /// Build again even if this commit was built before.
        #[arg(long)]
        force: bool,
    },
    /// List upstreams: branch head, newest and newest good build per platform.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `trunkfarm artifact …`.
#[derive(Subcommand)]
pub(super) enum ArtifactCommand {
    /// List stored runtime artifacts and their downloads per agent.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Colours for a terminal; none when stdout is not one or NO_COLOR is set.
struct Paint(bool);

impl Paint {
    fn new() -> Paint {
        Paint(std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none())
    }
    fn code(&self, code: &str, text: &str) -> String {
        if self.0 {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }
    /// Pads first, so colour codes do not break the column width.
    fn cell(&self, code: &str, text: &str, width: usize) -> String {
        self.code(code, &format!("{text:<width$}"))
    }
}

fn kind_name(kind: i32) -> &'static str {
    match TransitionKind::try_from(kind).unwrap_or(TransitionKind::Unspecified) {
        TransitionKind::WentRed => "went red",
        TransitionKind::StillRed => "still red",
        TransitionKind::Fixed => "fixed",
        TransitionKind::StillGreen => "still green",
        TransitionKind::Unspecified => "?",
    }
}

fn build_state(b: &BuildInfo) -> &str {
    match BuildState::try_from(b.state).unwrap_or(BuildState::Unspecified) {
        // The hub's phase of its job (queued, starting, running), the word
        // the dashboard shows too; `waiting` says why a queued one waits.
        BuildState::Pending => crate::web::view::pending_build(&b.phase),
        BuildState::Passed => "passed",
        BuildState::Failed => "FAILED",
        BuildState::Error => "error",
        BuildState::Unspecified => "?",
    }
}

/// One grid cell's words and colour.
fn cell_text(c: &StatusCell) -> (String, &'static str) {
    let run = c.latest.clone().unwrap_or_default();
    let pending = if c.pending { "…" } else { "" };
    if run.job_id == 0 {
        return (format!("-{pending}"), "90");
    }
    let at = short(&run.upstream_commit);
    // A verdict that does not count (yet): not painted as a result.
    match run.confirmation.as_str() {
        "awaiting" => {
            let said = if run.status == RunStatus::Red as i32 {
                "red"
            } else {
                "green"
            };
            return (format!("{said}? {at}{pending}"), "33");
        }
        "overruled" | "unconfirmed" => {
            return (format!("{} {at}{pending}", run.confirmation), "90");
        }
        _ => {}
    }
    match RunStatus::try_from(run.status).unwrap_or(RunStatus::Unspecified) {
        RunStatus::Green => (format!("green {at}{pending}"), "32"),
        RunStatus::Red => (format!("RED {at}{pending}"), "1;31"),
        _ => (format!("error {at}{pending}"), "33"),
    }
}

fn tests_text(run: &RunInfo) -> String {
    if run.tests_total == 0 {
        return String::new();
    }
    let mut s = format!(
        "{}/{} tests pass",
        run.tests_total - run.tests_failed,
        run.tests_total
    );
    if !run.failing_tests.is_empty() {
        let names: Vec<_> = run
            .failing_tests
            .iter()
            .take(3)
            .map(|t| t.name.as_str())
            .collect();
        s.push_str(&format!("; failing: {}", names.join(", ")));
        if run.failing_tests.len() > 3 {
            s.push_str(&format!(" (+{})", run.failing_tests.len() - 3));
        }
    }
    s
}

fn commit_line(c: &trunkfarm_proto::v1::Commit) -> String {
    if c.subject.is_empty() {
        short(&c.sha).to_owned()
    } else {
        format!("{} {:?} ({})", short(&c.sha), c.subject, c.author)
    }
}

/// Prints one transition in a few lines.
fn print_transition(t: &Transition, paint: &Paint) {
    let what = if t.project.is_empty() {
        format!("{} build", t.upstream)
    } else {
        t.project.clone()
    };
    let colour = match TransitionKind::try_from(t.kind).unwrap_or(TransitionKind::Unspecified) {
        TransitionKind::WentRed | TransitionKind::StillRed => "1;31",
        _ => "32",
    };
    println!(
        "{} {} on {} with {} {}  (job {}, {}){}",
        what,
        paint.code(colour, kind_name(t.kind)),
        t.platform,
        t.upstream,
        short(&t.upstream_commit),
        t.job_id,
        when(t.at_ms),
        if t.first { ", first result" } else { "" }
    );
    if !t.suspicious.is_empty() {
        println!("  suspicious: {}", t.suspicious);
    }
    if t.confirmed_by_job != 0 {
        println!(
            "  confirmed by job {} on another agent before it counted",
            t.confirmed_by_job
        );
    }
    if t.kind == TransitionKind::WentRed as i32 {
        if t.last_green_upstream_commit.is_empty() {
            println!("  culprit range: no green result before this one");
        } else {
            println!(
                "  culprit range: {}..{} ({} commit(s))",
                short(&t.last_green_upstream_commit),
                short(&t.upstream_commit),
                t.culprits.len()
            );
        }
        for c in &t.culprits {
            println!("    {}", commit_line(c));
        }
        if !t.culprits_error.is_empty() {
            println!("  ({})", t.culprits_error);
        }
        print_bisection(t);
        if t.project_commit_changed {
            println!(
                "  the project's own commit changed too: {} -> {}",
                short(&t.previous_project_commit),
                short(&t.project_commit)
            );
        }
    }
    if !t.newly_failing.is_empty() {
        println!("  newly failing: {}", t.newly_failing.join(", "));
    }
}

/// A went-red transition's bisection, if its range is bisected.
fn print_bisection(t: &Transition) {
    let Some(b) = &t.bisect else { return };
    match b.state.as_str() {
        "running" => println!("  bisection running over the {} commits", t.culprits.len()),
        "found" => {
            if let Some(c) = &b.first_bad {
                println!("  first bad commit: {}", commit_line(c));
            }
            println!("  (bisection: {})", b.detail);
        }
        _ => {
            let what = if b.state == "range" {
                "left"
            } else {
                "gave up with"
            };
            println!(
                "  bisection {what} {} candidate(s): {}",
                b.candidates.len(),
                b.detail
            );
            for c in &b.candidates {
                println!("    {}", commit_line(c));
            }
        }
    }
}

/// `trunkfarm status`; with `watch`, again and again at that interval
/// until interrupted: redrawn in place in a terminal, printed one after
/// the other (each under a dated line) otherwise.
pub(super) async fn status(
    cfg: &HubConfig,
    upstream: Option<String>,
    json: bool,
    watch: Option<Duration>,
) -> anyhow::Result<ExitCode> {
    if let Some(every) = watch
        && every < Duration::from_secs(1)
    {
        anyhow::bail!(
            "--watch {} would ask the hub without pause: give at least 1s, e.g. --watch 5s",
            fmt_duration(every)
        );
    }
    let mut client = super::client::connect(cfg).await?;
    let request = GetStatusRequest {
        upstream: upstream.unwrap_or_default(),
    };
    let paint = Paint::new();
    let terminal = std::io::stdout().is_terminal();
    loop {
        let answer = client.get_status(request.clone()).await;
        let resp = match (answer, watch) {
            (Ok(resp), _) => resp.into_inner(),
            (Err(e), None) => return Err(status_error(e)),
            // Watching: a hub that restarts is back in a moment.
            (Err(e), Some(every)) => {
                eprintln!(
                    "{:#} (trying again in {})",
                    status_error(e),
                    fmt_duration(every)
                );
                tokio::time::sleep(every).await;
                continue;
            }
        };
        let Some(every) = watch else {
            if json {
                output::json(&view::Status::from(&resp))?;
            } else {
                print_status(&resp, &paint);
            }
            return Ok(ExitCode::SUCCESS);
        };
        let at = when(crate::store::now_ms());
        if terminal && !json {
            // Home and clear: the next picture replaces this one.
            print!("\x1b[H\x1b[2J");
            println!(
                "{}",
                paint.code(
                    "90",
                    &format!("status at {at}, every {}; Ctrl-C ends", fmt_duration(every))
                )
            );
            print_status(&resp, &paint);
        } else if json {
            // One JSON document per line: a stream other tools can read.
            println!("{}", serde_json::to_string(&view::Status::from(&resp))?);
        } else {
            println!("status at {at}");
            print_status(&resp, &paint);
        }
        std::io::stdout().flush()?;
        tokio::time::sleep(every).await;
    }
}

/// The grid for people: per upstream its builds, then a row per project.
fn print_status(resp: &GetStatusResponse, paint: &Paint) {
    if resp.upstreams.is_empty() {
        println!(
            "no upstream is configured: add [[upstream]] and [[project]] entries to the hub config"
        );
    }
    for u in &resp.upstreams {
        println!(
            "{} {}",
            paint.code("1", &u.name),
            branch_head(&u.branch, &u.head, u.head_seen_at_ms)
        );
        if !u.poll_error.is_empty() {
            println!(
                "  {}",
                paint.code("33", &format!("poll error: {}", u.poll_error))
            );
        }
        for platform in &u.platforms {
            let latest = u.latest_builds.iter().find(|b| &b.platform == platform);
            let good = u.good_builds.iter().find(|b| &b.platform == platform);
            let text = match latest {
                // A volunteer's build not (yet) confirmed by another one.
                Some(b) if !b.confirmation.is_empty() && b.confirmation != "confirmed" => {
                    format!(
                        "{} {} ({}: {})",
                        build_state(b),
                        short(&b.commit),
                        b.confirmation,
                        b.confirmation_detail
                    )
                }
                // Queued: say why no agent has it.
                Some(b) if !b.waiting.is_empty() => {
                    format!("{} {} ({})", build_state(b), short(&b.commit), b.waiting)
                }
                Some(b) => format!("{} {}", build_state(b), short(&b.commit)),
                None => "no build yet".into(),
            };
            let colour = match latest.map(|b| BuildState::try_from(b.state)) {
                Some(Ok(BuildState::Passed)) => "32",
                Some(Ok(BuildState::Failed)) => "1;31",
                Some(Ok(BuildState::Error)) => "33",
                _ => "90",
            };
            let good_text = match good {
                Some(g) if latest.is_some_and(|l| l.job_id != g.job_id) => {
                    format!("  (testing against {})", short(&g.commit))
                }
                _ => String::new(),
            };
            println!(
                "  build {platform:<16} {}{good_text}",
                paint.code(colour, &text)
            );
        }
        let cells: Vec<&StatusCell> = resp
            .cells
            .iter()
            .filter(|c| c.latest.as_ref().is_some_and(|r| r.upstream == u.name))
            .collect();
        if cells.is_empty() {
            println!("  (no project tests against it)");
            println!();
            continue;
        }
        let mut projects: Vec<&str> = Vec::new();
        for c in &cells {
            let name = c.latest.as_ref().map(|r| r.project.as_str()).unwrap_or("");
            if !projects.contains(&name) {
                projects.push(name);
            }
        }
        let width = projects.iter().map(|p| p.len()).max().unwrap_or(7).max(7) + 2;
        print!("  {:<width$}", "PROJECT");
        for p in &u.platforms {
            print!("{p:<22}");
        }
        println!("NOTES");
        for project in projects {
            print!("  {project:<width$}");
            let mut notes = Vec::new();
            let mut flaky = 0;
            for platform in &u.platforms {
                let cell = cells.iter().find(|c| {
                    c.latest
                        .as_ref()
                        .is_some_and(|r| r.project == project && &r.platform == platform)
                });
                match cell {
                    Some(c) => {
                        let (text, colour) = cell_text(c);
                        print!("{}", paint.cell(colour, &text, 22));
                        let run = c.latest.clone().unwrap_or_default();
                        if let Some(t) = &c.red_since {
                            notes.push(format!("red since {}", short(&t.upstream_commit)));
                        }
                        let tests = tests_text(&run);
                        if !tests.is_empty() {
                            notes.push(tests);
                        }
                        if run.status == RunStatus::Error as i32 && !run.detail.is_empty() {
                            notes.push(run.detail.lines().next().unwrap_or("").to_owned());
                        }
                        if !run.report_error.is_empty() {
                            notes.push(format!("report: {}", run.report_error));
                        }
                        if !run.confirmation_detail.is_empty() {
                            notes.push(run.confirmation_detail.clone());
                        }
                        if !run.suspicious.is_empty() {
                            notes.push(format!("suspicious: {}", run.suspicious));
                        }
                        flaky = c.flaky_tests;
                    }
                    None => print!("{:<22}", ""),
                }
            }
            match flaky {
                0 => {}
                1 => notes.push("1 flaky test".into()),
                n => notes.push(format!("{n} flaky tests")),
            }
            if resp
                .projects
                .iter()
                .any(|p| p.name == project && !p.poll_error.is_empty())
            {
                notes.push("polling it fails (see below)".into());
            }
            println!("{}", notes.join("; "));
        }
        println!();
    }
    if !resp.projects.is_empty() {
        println!("{}", paint.code("1", "projects"));
    }
    for p in &resp.projects {
        println!(
            "  {} {}",
            p.name,
            branch_head(&p.branch, &p.head, p.head_seen_at_ms)
        );
        if !p.poll_error.is_empty() {
            println!(
                "    {}",
                paint.code("33", &format!("poll error: {}", p.poll_error))
            );
        }
    }
}

/// The upstream a command is about: the one given, or else the only one
/// the running hub has configured (`how` tells how to name one when there
/// are several).
pub(super) async fn upstream_or_only(
    client: &mut AdminClient,
    given: Option<String>,
    how: &str,
) -> anyhow::Result<String> {
    if let Some(name) = given {
        return Ok(name);
    }
    let status = client
        .get_status(GetStatusRequest::default())
        .await
        .map_err(status_error)?
        .into_inner();
    only_upstream(status.upstreams.iter().map(|u| u.name.as_str()), how)
}

/// The only name of `names`, or an error that lists them.
fn only_upstream<'a>(
    names: impl IntoIterator<Item = &'a str>,
    how: &str,
) -> anyhow::Result<String> {
    let names: Vec<&str> = names.into_iter().collect();
    match names[..] {
        [only] => Ok(only.to_owned()),
        [] => anyhow::bail!(
            "the hub has no upstream configured: add an [[upstream]] entry to its config"
        ),
        _ => anyhow::bail!(
            "the hub has {} upstreams ({}): name one with {how}",
            names.len(),
            names.join(", ")
        ),
    }
}

/// "main @ abc1234 (seen …)": the branch followed (the default branch
/// polling found when none is configured) and its head.
fn branch_head(branch: &str, head: &str, seen_at_ms: u64) -> String {
    let branch = if branch.is_empty() {
        "(default branch)"
    } else {
        branch
    };
    if head.is_empty() {
        format!("{branch} @ not polled yet")
    } else {
        format!("{branch} @ {} (seen {})", short(head), when(seen_at_ms))
    }
}

/// `trunkfarm breakage`.
pub(super) async fn breakage(
    cfg: &HubConfig,
    upstream: Option<String>,
    rev: Option<String>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut client = super::client::connect(cfg).await?;
    let upstream = upstream_or_only(&mut client, upstream, "--upstream NAME").await?;
    let resp = client
        .get_breakage(GetBreakageRequest {
            upstream: upstream.clone(),
            rev: rev.clone().unwrap_or_default(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if json {
        output::json(&view::Breakage::from(&resp))?;
        return Ok(ExitCode::SUCCESS);
    }
    let paint = Paint::new();
    let what = match &rev {
        Some(r) if r.contains("..") => format!("{} commit(s) in {r}", resp.commits.len()),
        Some(_) | None => resp
            .commits
            .first()
            .map(commit_line)
            .unwrap_or_else(|| "the head".into()),
    };
    if resp.went_red.is_empty() && resp.cleared.is_empty() {
        println!("{upstream}: nothing went red at {what}");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{upstream}: {} project(s) went red at {what}",
        resp.went_red.len()
    );
    for t in &resp.went_red {
        print_transition(t, &paint);
    }
    // Bisection found another commit of their range: never blamed here.
    for t in &resp.cleared {
        if let Some(bad) = view::first_bad(t) {
            println!(
                "{what} is innocent for {} on {}: bisection found {}",
                t.project,
                t.platform,
                commit_line(bad)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `trunkfarm transitions`.
pub(super) async fn transitions(
    cfg: &HubConfig,
    upstream: Option<String>,
    project: Option<String>,
    limit: u32,
    all: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut client = super::client::connect(cfg).await?;
    let list = client
        .list_transitions(ListTransitionsRequest {
            upstream: upstream.unwrap_or_default(),
            project: project.unwrap_or_default(),
            limit,
            all,
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .transitions;
    if json {
        output::json_list::<_, view::Transition>(&list)?;
        return Ok(ExitCode::SUCCESS);
    }
    let paint = Paint::new();
    if list.is_empty() {
        println!("no transition recorded yet");
    }
    for t in &list {
        print_transition(t, &paint);
    }
    Ok(ExitCode::SUCCESS)
}

/// `trunkfarm upstream …`.
pub(super) async fn upstream(
    cfg: &HubConfig,
    command: UpstreamCommand,
) -> anyhow::Result<ExitCode> {
    let mut client = super::client::connect(cfg).await?;
    match command {
        UpstreamCommand::Build { name, rev, force } => {
            let name =
                upstream_or_only(&mut client, name, "`trunkfarm upstream build NAME`").await?;
            let resp = client
                .build_upstream(BuildUpstreamRequest {
                    upstream: name.clone(),
                    rev: rev.unwrap_or_default(),
                    force,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("{}", resp.commit);
            eprintln!("{}", build_answer(&name, &resp));
        }
        UpstreamCommand::List { json } => {
            let resp = client
                .get_status(GetStatusRequest::default())
                .await
                .map_err(status_error)?
                .into_inner();
            if json {
                output::json(&view::upstreams(&resp))?;
                return Ok(ExitCode::SUCCESS);
            }
            const COLUMNS: &[Column] = &[
                Column::left("UPSTREAM", 16),
                Column::left("BRANCH", 12),
                Column::left("HEAD", 12),
                Column::left("PLATFORM", 16),
                Column::left("NEWEST BUILD", 24),
                Column::last("GOOD"),
            ];
            let table = Table::new(COLUMNS);
            for u in &resp.upstreams {
                let head = if u.head.is_empty() {
                    "-"
                } else {
                    short(&u.head)
                };
                for platform in &u.platforms {
                    let latest = u.latest_builds.iter().find(|b| &b.platform == platform);
                    let good = u.good_builds.iter().find(|b| &b.platform == platform);
                    table.row(&[
                        &u.name,
                        &u.branch,
                        &head,
                        platform,
                        &latest
                            .map(|b| format!("{} {}", build_state(b), short(&b.commit)))
                            .unwrap_or_else(|| "-".into()),
                        &good.map_or("-", |b| short(&b.commit)),
                    ]);
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What `upstream build` tells its user (on stderr: stdout has the commit).
fn build_answer(name: &str, resp: &BuildUpstreamResponse) -> String {
    let commit = short(&resp.commit);
    let jobs = |b: &BuildInfo| format!("job {} on {}, {}", b.job_id, b.platform, build_state(b));
    if resp.already_built {
        let each: Vec<String> = resp.builds.iter().map(jobs).collect();
        return format!(
            "{name} {commit} is already built ({}); use --force to build it again",
            each.join("; ")
        );
    }
    let mut lines = Vec::new();
    for b in &resp.builds {
        lines.push(format!("{name} {commit}: {}", jobs(b)));
    }
    if lines.is_empty() {
        lines.push(format!("{name} {commit}: no platform to build on"));
    }
    lines.join("\n")
}

/// `trunkfarm artifact …`.
pub(super) async fn artifact(
    cfg: &HubConfig,
    command: ArtifactCommand,
) -> anyhow::Result<ExitCode> {
    let mut client = super::client::connect(cfg).await?;
    match command {
        ArtifactCommand::List { json } => {
            let list = client
                .list_artifacts(ListArtifactsRequest {})
                .await
                .map_err(status_error)?
                .into_inner()
                .artifacts;
            if json {
                output::json_list::<_, view::Artifact>(&list)?;
                return Ok(ExitCode::SUCCESS);
            }
            const COLUMNS: &[Column] = &[
                Column::left("SHA256", 14),
                Column::right("SIZE", 10),
                Column::left("UPSTREAM", 12),
                Column::left("COMMIT", 12),
                Column::left("PLATFORM", 16),
                Column::last("DOWNLOADS"),
            ];
            let table = Table::new(COLUMNS);
            for a in list {
                let downloads: u32 = a.downloads.iter().map(|d| d.count).sum();
                table.row(&[
                    &a.sha256.get(..12).unwrap_or(&a.sha256),
                    &trunkfarm_proto::settings::fmt_bytes(a.size),
                    &a.upstream,
                    &short(&a.commit),
                    &a.platform,
                    &format!("{downloads} by {} agent(s)", a.downloads.len()),
                ]);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_upstream_defaults_to_the_only_one_and_otherwise_the_error_lists_them() {
        assert_eq!(
            only_upstream(["cpython"], "--upstream NAME").unwrap(),
            "cpython"
        );
        let several = only_upstream(["cpython", "lua"], "--upstream NAME")
            .unwrap_err()
            .to_string();
        assert_eq!(
            several,
            "the hub has 2 upstreams (cpython, lua): name one with --upstream NAME"
        );
        let none = only_upstream([], "--upstream NAME")
            .unwrap_err()
            .to_string();
        assert!(none.contains("[[upstream]]"), "{none}");
    }

    #[test]
    fn a_pending_build_says_its_jobs_phase_as_the_dashboard_does() {
        for phase in ["queued", "starting", "running"] {
            let b = BuildInfo {
                state: BuildState::Pending.into(),
                phase: phase.into(),
                ..Default::default()
            };
            assert_eq!(build_state(&b), phase);
        }
    }

    #[test]
    fn a_commit_built_before_says_by_which_job_and_how_to_build_it_again() {
        let build = |platform: &str, job_id| BuildInfo {
            platform: platform.into(),
            commit: "0123456789abcdef".into(),
            job_id,
            state: BuildState::Passed.into(),
            ..Default::default()
        };
        let mut resp = BuildUpstreamResponse {
            commit: "0123456789abcdef".into(),
            builds: vec![build("linux", 12)],
            already_built: true,
        };
        let said = build_answer("lua", &resp);
        assert!(
            said.contains("already built (job 12 on linux, passed)")
                && said.ends_with("use --force to build it again"),
            "{said}"
        );
        resp.already_built = false;
        resp.builds.push(build("mac", 13));
        let said = build_answer("lua", &resp);
        assert_eq!(said.lines().count(), 2, "{said}");
        assert!(!said.contains("already"), "{said}");
        assert!(said.contains("job 13 on mac"), "{said}");
    }
}
