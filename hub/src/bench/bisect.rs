//! `bisect`: the demo's runtime (a small interpreted language in C, really
//! compiled) and its three projects; once trunk is green, 64 upstream commits
//! land in one push with the demo story's breaking change as commit 37.
//! Measured: push → every went-red's bisection ended, and the builds the
//! bisection made (the target: ⌈log2 64⌉ = 6).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use trunkfarm_proto::v1::{GetStatusRequest, ListTransitionsRequest, RunStatus, TransitionKind};

use super::farm::BenchHub;
use super::{BenchArgs, Figure, Target};
use crate::commit::short;
use crate::config::{AgentSandbox, HubConfig};
use crate::demo::story::Story;
use crate::demo::{self, UPSTREAM};

/// Commits in the push, and which one breaks (0-based: commit 37).
const PUSH: usize = 64;
const FIRST_BAD: usize = 36;

/// Agents, and jobs each runs at once.
const AGENTS: usize = 2;
const PARALLEL: u32 = 2;

/// How long trunk may take to turn green, and the bisection to end.
const TIMEOUT: Duration = Duration::from_secs(600);

pub(super) async fn run(_args: &BenchArgs, dir: &Path) -> anyhow::Result<Vec<Figure>> {
    let story = Story::load().context("the embedded demo story is malformed")?;
    demo::check_tool("git", "--version", "the benchmark's repositories are git's")?;
    demo::check_tool(
        "cc",
        "--version",
        "the demo runtime is C, built from source",
    )?;
    let repos = dir.join("repos");
    let upstream = demo::write_repos(&story, &repos).await?;
    let config = dir.join("hub.toml");
    std::fs::write(&config, demo::hub_toml(&story, &repos))?;
    let hub = BenchHub::spawn(dir, HubConfig::load(&config)?).await?;
    let _agents = hub
        .start_agents(AGENTS, PARALLEL, AgentSandbox::None)
        .await?;
    let mut admin = hub.admin().await?;
    let first = demo::git(&upstream, &["rev-parse", "HEAD"], None).await?;
    let projects = story.project.len();
    wait(&format!("trunk {} green", short(&first)), || {
        let mut admin = admin.clone();
        let first = first.clone();
        async move {
            let status = admin.get_status(GetStatusRequest::default()).await?;
            let green = (status.into_inner().cells.iter())
                .filter_map(|c| c.latest.as_ref())
                .filter(|r| r.upstream_commit == first && r.status == RunStatus::Green as i32)
                .count();
            Ok(green == projects)
        }
    })
    .await?;

    // The push: made on a side branch, then fast-forwarded (polling never
    // sees a commit in between).
    demo::git(&upstream, &["checkout", "--quiet", "-b", "push"], None).await?;
    let mut commits = Vec::new();
    for i in 0..PUSH {
        let c = if i == FIRST_BAD {
            story.breaks.apply(&upstream)?;
            demo::commit(&upstream, &story.breaks.message, &story.breaks.author).await?
        } else {
            std::fs::write(upstream.join("CHANGES"), format!("change {}\n", i + 1))?;
            let message = format!("Note change {} in CHANGES", i + 1);
            demo::commit(&upstream, &message, "Ann Other <ann@example.org>").await?
        };
        commits.push(c);
    }
    demo::git(&upstream, &["checkout", "--quiet", "main"], None).await?;
    let pushed = Instant::now();
    demo::git(&upstream, &["merge", "--quiet", "--ff-only", "push"], None).await?;
    let head = commits[PUSH - 1].clone();
    let went_red = |admin: &mut crate::admin_client::AdminClient| {
        let mut admin = admin.clone();
        let head = head.clone();
        async move {
            let all = admin
                .list_transitions(ListTransitionsRequest {
                    upstream: UPSTREAM.into(),
                    limit: 1000,
                    ..Default::default()
                })
                .await?
                .into_inner()
                .transitions;
            anyhow::Ok(
                all.into_iter()
                    .filter(|t| t.kind == TransitionKind::WentRed as i32)
                    .filter(|t| t.upstream_commit == head)
                    .collect::<Vec<_>>(),
            )
        }
    };
    let expect_red = story.breaks.expect_red.len();
    wait("every went-red's bisection to end", || {
        let red = went_red(&mut admin);
        async move {
            let red = red.await?;
            let ended = red
                .iter()
                .filter(|t| t.bisect.as_ref().is_some_and(|b| b.state != "running"))
                .count();
            Ok(red.len() == expect_red && ended == expect_red)
        }
    })
    .await?;
    let elapsed = pushed.elapsed();
    let red = went_red(&mut admin).await?;
    let builds = red
        .iter()
        .filter_map(|t| t.bisect.as_ref())
        .map(|b| b.builds)
        .max()
        .unwrap_or(0);
    let found = red.iter().all(|t| {
        t.bisect
            .as_ref()
            .and_then(|b| b.first_bad.as_ref())
            .is_some_and(|c| c.sha == commits[FIRST_BAD])
    });
    if !found {
        bail!(
            "the bisection did not name commit {} ({}): {red:#?}",
            FIRST_BAD + 1,
            short(&commits[FIRST_BAD])
        );
    }
    hub.stop().await?;
    let setup = format!(
        "demo runtime (C), {PUSH} commits in one push, break at {}, {expect_red} projects red, {AGENTS} agents x {PARALLEL}",
        FIRST_BAD + 1
    );
    Ok(vec![
        Figure::new(
            "bisect",
            "push_to_bisected_s",
            elapsed.as_secs_f64(),
            "s",
            Target::None,
            setup.clone(),
        ),
        Figure::new(
            "bisect",
            "bisection_builds",
            f64::from(builds),
            "builds",
            Target::AtMost(6.0),
            setup,
        ),
    ])
}

/// Waits until `done` says so (checked every 200 ms), at most [`TIMEOUT`].
async fn wait<F, Fut>(what: &str, mut done: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if done().await? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("gave up after {TIMEOUT:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
