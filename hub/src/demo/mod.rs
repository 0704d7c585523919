//! `trunkfarm demo`: the whole trunk story on one machine, with no config
//! and no network. It writes a tiny interpreted language (the upstream
//! runtime, in C) and three projects written in it as local git
//! repositories, starts a hub that watches them and two local agents, and
//! lets the pipeline do its work: build the runtime from trunk, test every
//! project against it. `--once` then lands a commit that really breaks one
//! language feature, checks that exactly the projects using it go red with
//! the right culprit, lands the fix, checks they turn green, and exits.

pub(crate) mod story;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use tokio::process::{Child, Command};
use trunkfarm_proto::v1::{
    BuildState, CreateTokenRequest, GetStatusRequest, GetStatusResponse, JobState,
    ListAgentsRequest, ListJobsRequest, ListMailRequest, ListTransitionsRequest, MailState,
    RunStatus, Transition, TransitionKind,
};

use crate::admin_client::{self as client, AdminClient};
use crate::commit::short;
use crate::config::HubConfig;
use crate::provision::local::{find_agent_binary, start_agent};
use crate::server::Hub;
use story::Story;

/// Marks a directory as the demo's own, so it may be wiped on the next run.
const MARKER: &str = ".trunkfarm-demo";

/// Local agents the demo starts.
const AGENTS: usize = 2;

/// The upstream's name in the demo's hub config.
pub(crate) const UPSTREAM: &str = "tiny";

/// How often the demo hub polls its repositories.
const POLL: &str = "500ms";

/// The demo hub's `smtp.mailbox_dir`, in the demo's directory.
const MAILBOX: &str = "mailbox";

/// How often the long-running demo asks the hub for new transitions.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// How long one step of the story (build + tests) may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(180);

/// Options of `trunkfarm demo`.
#[derive(Args)]
pub(crate) struct DemoArgs {
    /// Where the demo keeps its repositories, hub and agents. An earlier
    /// demo there is wiped first; any other non-empty directory is refused.
    #[arg(long, default_value = "trunkfarm-demo")]
    dir: PathBuf,
    /// Play the scripted story (green, a breaking commit, its fix), print
    /// one summary line, and exit: 0 only if it happened as designed.
    #[arg(long)]
    once: bool,
}

/// Runs the demo.
pub(crate) async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let story = Story::load().context("the embedded demo story is malformed")?;
    check_tool("git", "--version", "the demo keeps its repositories in git")?;
    check_tool(
        "cc",
        "--version",
        "the demo's runtime is C, built from source",
    )?;
    let dir = prepare_dir(&args.dir, MARKER)?;
    let agent_bin = find_agent_binary()?;
    let repos = dir.join("repos");
    let upstream_repo = write_repos(&story, &repos).await?;
    let config_path = dir.join("hub.toml");
    std::fs::write(&config_path, hub_toml(&story, &repos))?;
    let cfg = HubConfig::load(&config_path)?;
    let hub = Hub::start(&cfg).await?;
    println!(
        "demo: hub on {}; repositories, hub data and logs in {}",
        hub.addr,
        dir.display()
    );
    println!("demo: dashboard: http://{}/", hub.info.web);
    println!(
        "demo: mailbox: {} (one .eml file per mail, named by its time and subject)",
        dir.join(MAILBOX).display()
    );
    println!(
        "demo: upstream {UPSTREAM} (a small interpreted language in C) and projects {}",
        story
            .project
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );

    let mut admin = client::connect(&cfg).await?;
    let enrollment = admin
        .create_token(CreateTokenRequest {
            uses: AGENTS as u32,
            note: "trunkfarm demo".into(),
            // The demo's agents are the operator's: they build the runtime.
            trusted: true,
            ..Default::default()
        })
        .await
        .map_err(crate::admin_client::status_error)?
        .into_inner()
        .enrollment;
    let mut agents = Vec::new();
    for n in 1..=AGENTS {
        agents.push(start_agent(&agent_bin, &dir, "demo", n, &enrollment, 2, None).await?);
    }
    wait_for_agents(&mut admin, AGENTS).await?;
    println!("demo: {AGENTS} local agents connected");

    let outcome = if args.once {
        play(&mut admin, &story, &upstream_repo).await
    } else {
        let config_arg = format!("--config {}", config_path.display());
        println!("demo: the hub builds trunk and tests every project against it; watch it with");
        println!("  trunkfarm {config_arg} status");
        println!("  trunkfarm {config_arg} transitions");
        println!(
            "demo: then break trunk yourself: edit {}/tiny.c, `git commit -am ...` there, and",
            upstream_repo.display()
        );
        println!("  trunkfarm {config_arg} breakage --upstream {UPSTREAM}");
        println!("demo: each project going red or fixed is said below as it happens (times UTC)");
        println!("demo: press Ctrl-C to stop");
        tokio::select! {
            _ = crate::server::shutdown_signal() => {}
            _ = say_transitions(&mut admin) => {}
        }
        Ok(true)
    };
    let counts = if outcome.is_ok() {
        summary(&mut admin).await
    } else {
        Err(anyhow::anyhow!("no summary"))
    };
    for mut agent in agents {
        stop_agent(&mut agent).await;
    }
    hub.shutdown().await?;
    let as_designed = match outcome {
        Ok(ok) => ok,
        Err(e) => {
            println!("demo: the story stopped: {e:#}");
            println!(
                "demo: logs: {}/agent-*.log; `trunkfarm --config {} job list` after restarting the hub with `serve`",
                dir.display(),
                config_path.display()
            );
            false
        }
    };
    if let Ok(line) = counts {
        println!(
            "demo: the maintainers' mails are in {} (one .eml file each)",
            dir.join(MAILBOX).display()
        );
        println!("{line}");
    }
    Ok(if as_designed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Writes the upstream and the projects of `story` as git repositories
/// under `repos` (one commit each); returns the upstream's.
pub(crate) async fn write_repos(story: &Story, repos: &Path) -> anyhow::Result<PathBuf> {
    let upstream_repo = repos.join(UPSTREAM);
    story::write_tree("runtime/", &upstream_repo)?;
    git_init(
        &upstream_repo,
        &story.upstream.first_message,
        &story.upstream.first_author,
    )
    .await?;
    for p in &story.project {
        let repo = repos.join(&p.name);
        story::write_tree(&format!("projects/{}/", p.name), &repo)?;
        git_init(
            &repo,
            &format!("{}: initial import", p.name),
            &story.upstream.first_author,
        )
        .await?;
    }
    Ok(upstream_repo)
}

/// The demo hub's config: the upstream and projects as local repositories.
pub(crate) fn hub_toml(story: &Story, repos: &Path) -> String {
    let list = |items: &[String]| {
        let quoted: Vec<String> = items.iter().map(|i| format!("{i:?}")).collect();
        format!("[{}]", quoted.join(", "))
    };
    let mut toml = format!(
        "# Written by `trunkfarm demo`.\n[hub]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"hub\"\n# The demo stores little: a small reserve lets it run on a nearly full disk.\nmin_free_space = \"16 MiB\"\n\n[web]\nlisten = \"127.0.0.1:0\"\n\n[smtp]\nmailbox_dir = \"{MAILBOX}\"\nfrom = \"trunkfarm demo <trunkfarm@demo.invalid>\"\n\n[dispatch]\nheartbeat_interval = \"2s\"\nlease_timeout = \"10s\"\n\n[[upstream]]\nname = \"{UPSTREAM}\"\nurl = {:?}\npoll_interval = \"{POLL}\"\nbuild = {}\nbuild_timeout = \"5m\"\n",
        repos.join(UPSTREAM).display().to_string(),
        list(&story.upstream.build)
    );
    for p in &story.project {
        toml.push_str(&format!(
            "\n[[project]]\nname = {:?}\nurl = {:?}\npoll_interval = \"{POLL}\"\ntest = {}\njunit = {}\ntimeout = \"5m\"\nmaintainers = [\"{}-dev@example.org\"]\n",
            p.name,
            repos.join(&p.name).display().to_string(),
            list(&p.test),
            list(&p.junit),
            p.name
        ));
    }
    toml
}

/// Fails early, with a reason, when a tool the demo needs is missing.
pub(crate) fn check_tool(tool: &str, arg: &str, why: &str) -> anyhow::Result<()> {
    match std::process::Command::new(tool)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => Ok(()),
        _ => anyhow::bail!("the demo needs `{tool}` on PATH ({why}); install it and try again"),
    }
}

/// Runs git in `repo` with a fixed identity (nothing from the user's config).
pub(crate) async fn git(
    repo: &Path,
    args: &[&str],
    author: Option<&str>,
) -> anyhow::Result<String> {
    let mut cmd = Command::new("git");
    cmd.current_dir(repo)
        .args([
            "-c",
            "user.name=trunkfarm demo",
            "-c",
            "user.email=demo@trunkfarm.invalid",
        ])
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .stdin(Stdio::null());
    if let Some(author) = author {
        if let Some((name, email)) = author.split_once(" <") {
            cmd.env("GIT_AUTHOR_NAME", name)
                .env("GIT_AUTHOR_EMAIL", email.trim_end_matches('>'))
                .env("GIT_COMMITTER_NAME", name)
                .env("GIT_COMMITTER_EMAIL", email.trim_end_matches('>'));
        }
    }
    let out = cmd.output().await.context("cannot run git")?;
    anyhow::ensure!(
        out.status.success(),
        "git {} failed in {}: {}",
        args.join(" "),
        repo.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

async fn git_init(repo: &Path, message: &str, author: &str) -> anyhow::Result<String> {
    git(repo, &["init", "--quiet", "-b", "main"], None).await?;
    commit(repo, message, author).await
}

pub(crate) async fn commit(repo: &Path, message: &str, author: &str) -> anyhow::Result<String> {
    git(repo, &["add", "-A"], None).await?;
    git(repo, &["commit", "--quiet", "-m", message], Some(author)).await?;
    git(repo, &["rev-parse", "HEAD"], None).await
}

async fn status(admin: &mut AdminClient) -> anyhow::Result<GetStatusResponse> {
    Ok(admin
        .get_status(GetStatusRequest::default())
        .await
        .map_err(crate::admin_client::status_error)?
        .into_inner())
}

/// Waits until the upstream's build of `commit` finished and every project
/// has a result against it; returns project → status. An error if the build
/// failed or time ran out.
async fn wait_step(
    admin: &mut AdminClient,
    commit: &str,
) -> anyhow::Result<BTreeMap<String, RunStatus>> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let st = status(admin).await?;
        if let Some(b) = st
            .upstreams
            .iter()
            .flat_map(|u| &u.latest_builds)
            .find(|b| b.commit == commit)
        {
            match BuildState::try_from(b.state) {
                Ok(BuildState::Failed) | Ok(BuildState::Error) => anyhow::bail!(
                    "the build of {} failed: {} (job {})",
                    short(commit),
                    b.detail,
                    b.job_id
                ),
                _ => {}
            }
        }
        let runs: Vec<_> = st.cells.iter().filter_map(|c| c.latest.as_ref()).collect();
        // A went red or fixed counts once its re-runs class it.
        let settled = |r: &&trunkfarm_proto::v1::RunInfo| {
            r.upstream_commit == commit && r.confirmation != "awaiting"
        };
        if !runs.is_empty() && runs.iter().all(settled) {
            return Ok(runs
                .iter()
                .map(|r| {
                    (
                        r.project.clone(),
                        RunStatus::try_from(r.status).unwrap_or(RunStatus::Error),
                    )
                })
                .collect());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "trunk {} was not built and tested within {}s",
            short(commit),
            STEP_TIMEOUT.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Newest-first transitions of projects at `commit`.
async fn transitions_at(admin: &mut AdminClient, commit: &str) -> anyhow::Result<Vec<Transition>> {
    Ok(list_transitions(
        admin,
        ListTransitionsRequest {
            upstream: UPSTREAM.into(),
            all: true,
            limit: 1000,
            ..Default::default()
        },
    )
    .await?
    .into_iter()
    .filter(|t| t.upstream_commit == commit && !t.project.is_empty())
    .collect())
}

fn words(runs: &BTreeMap<String, RunStatus>) -> String {
    runs.iter()
        .map(|(p, s)| {
            format!(
                "{p} {}",
                match s {
                    RunStatus::Green => "green",
                    RunStatus::Red => "RED",
                    _ => "error",
                }
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Prints one line per went-red and fixed as the hub records them, read
/// through the admin API once a second, until cancelled. It starts after
/// the newest transition there is, and moves past each one it printed (by
/// id, which only grows): nothing is said twice.
async fn say_transitions(admin: &mut AdminClient) {
    let mut after = None;
    let mut last_error = String::new();
    loop {
        match new_transitions(admin, after).await {
            Ok((lines, newest)) => {
                for line in lines {
                    println!("{line}");
                }
                after = Some(newest);
                last_error.clear();
            }
            Err(e) => {
                let e = format!("{e:#}");
                if e != last_error {
                    eprintln!("demo: cannot read the hub's transitions (trying again): {e}");
                    last_error = e;
                }
            }
        }
        tokio::time::sleep(WATCH_EVERY).await;
    }
}

/// The lines for went-red and fixed transitions after id `after` (all of
/// them are only skipped on the first call: `None`), oldest first, and
/// the newest id seen.
async fn new_transitions(
    admin: &mut AdminClient,
    after: Option<u64>,
) -> anyhow::Result<(Vec<String>, u64)> {
    let mut transitions = list_transitions(
        admin,
        ListTransitionsRequest {
            limit: 1000,
            ..Default::default()
        },
    )
    .await?;
    let newest = transitions.iter().map(|t| t.id).max().unwrap_or(0);
    let Some(after) = after else {
        return Ok((Vec::new(), newest));
    };
    transitions.retain(|t| t.id > after);
    if transitions.is_empty() {
        return Ok((Vec::new(), after));
    }
    transitions.sort_by_key(|t| t.id);
    // Mails are queued with their transition, in the same write.
    let mails = list_mail(admin, 1000).await?;
    let lines = transitions
        .iter()
        .filter_map(|t| transition_line(t, &mails))
        .collect();
    Ok((lines, newest.max(after)))
}

/// "12:03:04 textkit went red on linux-x86_64 at 1a2b3c4d5e (Make upper()
/// branch-free); mail to textkit-dev@example.org", for a went-red or fixed
/// transition (`None` for the others).
fn transition_line(t: &Transition, mails: &[trunkfarm_proto::v1::MailInfo]) -> Option<String> {
    let what = match TransitionKind::try_from(t.kind) {
        Ok(TransitionKind::WentRed) => "went red",
        Ok(TransitionKind::Fixed) => "is fixed",
        _ => return None,
    };
    let who = match t.project.is_empty() {
        true => format!("{} build", t.upstream),
        false => t.project.clone(),
    };
    let mut line = format!(
        "{} {who} {what} on {} at {}",
        clock(t.at_ms),
        t.platform,
        short(&t.upstream_commit)
    );
    if let Some(c) = t.culprits.iter().find(|c| c.sha == t.upstream_commit)
        && !c.subject.is_empty()
    {
        line.push_str(&format!(" ({})", cut(&c.subject, 40)));
    }
    if !t.class.is_empty() && t.class != "regressed" {
        line.push_str(&format!("; class {}", t.class));
    }
    let event = crate::notify::transition_event(t.id);
    let to: Vec<&str> = mails
        .iter()
        .filter(|m| m.event == event)
        .map(|m| m.to.as_str())
        .collect();
    match to.is_empty() {
        true => line.push_str("; no mail"),
        false => line.push_str(&format!("; mail to {}", to.join(", "))),
    }
    Some(line)
}

/// The hub's transitions, newest first.
async fn list_transitions(
    admin: &mut AdminClient,
    request: ListTransitionsRequest,
) -> anyhow::Result<Vec<Transition>> {
    Ok(admin
        .list_transitions(request)
        .await
        .map_err(crate::admin_client::status_error)?
        .into_inner()
        .transitions)
}

/// The hub's `limit` newest mails.
async fn list_mail(
    admin: &mut AdminClient,
    limit: u32,
) -> anyhow::Result<Vec<trunkfarm_proto::v1::MailInfo>> {
    Ok(admin
        .list_mail(ListMailRequest {
            limit,
            ..Default::default()
        })
        .await
        .map_err(crate::admin_client::status_error)?
        .into_inner()
        .mails)
}

/// `ms` as the UTC time of day, `12:03:04`.
fn clock(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms);
    let full = humantime::format_rfc3339_seconds(t).to_string();
    full.get(11..19).unwrap_or(&full).to_owned()
}

/// `text` cut to at most `max` characters, with `…` when cut.
fn cut(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// Plays the story; `Ok(true)` when everything happened as designed.
async fn play(admin: &mut AdminClient, story: &Story, repo: &Path) -> anyhow::Result<bool> {
    let mut ok = true;
    let c1 = git(repo, &["rev-parse", "HEAD"], None).await?;
    let runs = wait_step(admin, &c1).await?;
    println!(
        "demo: [1/3] trunk {} {:?} built and tested: {}",
        short(&c1),
        story.upstream.first_message,
        words(&runs)
    );
    if runs.values().any(|s| *s != RunStatus::Green) {
        println!("demo:   expected every project green  <-- not as designed");
        ok = false;
    }

    story.breaks.apply(repo)?;
    let c2 = commit(repo, &story.breaks.message, &story.breaks.author).await?;
    println!(
        "demo: [2/3] landed {} {:?} by {}; the hub polls, rebuilds, retests...",
        short(&c2),
        story.breaks.message,
        story.breaks.author
    );
    let runs = wait_step(admin, &c2).await?;
    println!("demo:   {}", words(&runs));
    let red: Vec<&String> = runs
        .iter()
        .filter(|(_, s)| **s == RunStatus::Red)
        .map(|(p, _)| p)
        .collect();
    let mut expected: Vec<&String> = story.breaks.expect_red.iter().collect();
    expected.sort();
    if red != expected {
        println!("demo:   expected exactly {expected:?} red  <-- not as designed");
        ok = false;
    }
    let mut newly_failing = Vec::new();
    for t in transitions_at(admin, &c2).await? {
        if t.kind != TransitionKind::WentRed as i32 {
            continue;
        }
        let culprits: Vec<String> = t
            .culprits
            .iter()
            .map(|c| format!("{} {:?} ({})", short(&c.sha), c.subject, c.author))
            .collect();
        println!(
            "demo:   {} went red; culprit: {}{}",
            t.project,
            culprits.join(", "),
            if t.newly_failing.is_empty() {
                String::new()
            } else {
                format!("; newly failing: {}", t.newly_failing.join(", "))
            }
        );
        if t.culprits.len() != 1 || t.culprits[0].sha != c2 || t.last_green_upstream_commit != c1 {
            println!(
                "demo:   expected the culprit range to be exactly {}  <-- not as designed",
                short(&c2)
            );
            ok = false;
        }
        newly_failing.extend(t.newly_failing);
    }
    for want in &story.breaks.expect_newly_failing {
        if !newly_failing.contains(want) {
            println!("demo:   expected {want} among the newly failing tests  <-- not as designed");
            ok = false;
        }
    }

    story.fix.apply(repo)?;
    let c3 = commit(repo, &story.fix.message, &story.fix.author).await?;
    println!(
        "demo: [3/3] landed {} {:?} by {}",
        short(&c3),
        story.fix.message,
        story.fix.author
    );
    let runs = wait_step(admin, &c3).await?;
    let fixed: Vec<String> = transitions_at(admin, &c3)
        .await?
        .into_iter()
        .filter(|t| t.kind == TransitionKind::Fixed as i32)
        .map(|t| t.project)
        .collect();
    println!("demo:   {}; fixed: {}", words(&runs), fixed.join(", "));
    if runs.values().any(|s| *s != RunStatus::Green) {
        println!("demo:   expected every project green again  <-- not as designed");
        ok = false;
    }
    let mut fixed_sorted: Vec<&String> = fixed.iter().collect();
    fixed_sorted.sort();
    if fixed_sorted != expected {
        println!("demo:   expected {expected:?} to be fixed  <-- not as designed");
        ok = false;
    }
    Ok(ok)
}

/// `demo: builds=B jobs=J green=G red=R fixed=F mails=M`, from the hub's records.
async fn summary(admin: &mut AdminClient) -> anyhow::Result<String> {
    let jobs = admin
        .list_jobs(ListJobsRequest {
            state: JobState::Finished.into(),
            limit: 100_000,
            ..Default::default()
        })
        .await
        .map_err(crate::admin_client::status_error)?
        .into_inner()
        .jobs;
    let builds = jobs.iter().filter(|j| j.key.starts_with("build/")).count();
    let all = list_transitions(
        admin,
        ListTransitionsRequest {
            all: true,
            limit: 100_000,
            ..Default::default()
        },
    )
    .await?;
    let runs: Vec<_> = all.iter().filter(|t| !t.project.is_empty()).collect();
    let count = |kinds: &[TransitionKind]| {
        runs.iter()
            .filter(|t| kinds.iter().any(|k| *k as i32 == t.kind))
            .count()
    };
    let green = count(&[TransitionKind::StillGreen, TransitionKind::Fixed]);
    let red = count(&[TransitionKind::WentRed, TransitionKind::StillRed]);
    let fixed = count(&[TransitionKind::Fixed]);
    // Mails go out asynchronously: give the outbox a moment to drain.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mails = loop {
        let list = list_mail(admin, 10_000).await?;
        let pending = list.iter().any(|m| m.state == MailState::Pending as i32);
        if !pending || Instant::now() >= deadline {
            break list
                .iter()
                .filter(|m| m.state == MailState::Sent as i32)
                .count();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    Ok(format!(
        "demo: builds={builds} jobs={} green={green} red={red} fixed={fixed} mails={mails}",
        jobs.len()
    ))
}

/// Creates a scratch directory, or wipes one an earlier run marked with
/// `marker`; refuses any other non-empty directory.
pub(crate) fn prepare_dir(dir: &Path, marker: &str) -> anyhow::Result<PathBuf> {
    if dir.exists() {
        let is_demo = dir.join(marker).exists();
        let empty = std::fs::read_dir(dir)?.next().is_none();
        if is_demo {
            std::fs::remove_dir_all(dir)
                .with_context(|| format!("cannot clear the earlier demo in {}", dir.display()))?;
        } else if !empty {
            anyhow::bail!(
                "{} exists and was not made by an earlier run of this command: pass another directory with --dir",
                dir.display()
            );
        }
    }
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(marker), "")?;
    Ok(std::fs::canonicalize(dir)?)
}

async fn stop_agent(agent: &mut Child) {
    if let Some(pid) = agent.id() {
        // SAFETY: kill(2) with a pid we spawned; no memory is involved.
        unsafe {
            libc::kill(pid as i32, libc::SIGTERM);
        }
    }
    if tokio::time::timeout(Duration::from_secs(15), agent.wait())
        .await
        .is_err()
    {
        let _ = agent.kill().await;
    }
}

async fn wait_for_agents(admin: &mut client::AdminClient, n: usize) -> anyhow::Result<()> {
    for _ in 0..300 {
        let agents = admin
            .list_agents(ListAgentsRequest {})
            .await
            .map_err(crate::admin_client::status_error)?
            .into_inner()
            .agents;
        if agents.iter().filter(|a| a.connected).count() >= n {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("the demo agents did not connect within 30s: see their logs in the demo dir")
}

#[cfg(test)]
mod tests {
    use super::*;
    use trunkfarm_proto::v1::{Commit, MailInfo};

    #[test]
    fn a_went_red_is_one_line_with_its_commit_and_mail() {
        let sha = "1a2b3c4d5e".repeat(4);
        let t = Transition {
            id: 42,
            kind: TransitionKind::WentRed as i32,
            project: "textkit".into(),
            upstream: UPSTREAM.into(),
            platform: "linux-x86_64".into(),
            upstream_commit: sha.clone(),
            at_ms: 1_796_644_984_000,
            culprits: vec![Commit {
                sha: sha.clone(),
                subject: "Make upper() branch-free for speed, as measured on the bench".into(),
                ..Default::default()
            }],
            class: "regressed".into(),
            ..Default::default()
        };
        let mails = [
            MailInfo {
                to: "textkit-dev@example.org".into(),
                event: "t42".into(),
                ..Default::default()
            },
            MailInfo {
                to: "other@example.org".into(),
                event: "t7".into(),
                ..Default::default()
            },
        ];
        assert_eq!(
            transition_line(&t, &mails).unwrap(),
            "12:03:04 textkit went red on linux-x86_64 at 1a2b3c4d5e (Make upper() branch-free for speed, as m…); mail to textkit-dev@example.org"
        );
        let fixed = Transition {
            kind: TransitionKind::Fixed as i32,
            culprits: Vec::new(),
            ..t.clone()
        };
        assert_eq!(
            transition_line(&fixed, &[]).unwrap(),
            "12:03:04 textkit is fixed on linux-x86_64 at 1a2b3c4d5e; no mail"
        );
        let still = Transition {
            kind: TransitionKind::StillRed as i32,
            ..t
        };
        assert_eq!(transition_line(&still, &mails), None);
    }
}
