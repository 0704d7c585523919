//! The `trunkfarm` command line: `serve` runs a hub; `token`, `agent` and
//! `job` administer a running one over gRPC; `status`, `breakage`,
//! `transitions`, `upstream` and `artifact` show and drive the trunk
//! pipeline; `demo` runs the embedded demo; `bench` measures the hub.

pub(crate) mod jobs;
mod noise;
mod notify;
mod output;
mod pipeline;
mod pool;
mod view;

use crate::admin_client::{self as client, status_error};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use trunkfarm_proto::v1::{
    CreateTokenRequest, DrainAgentRequest, ListAgentsRequest, ListTokensRequest,
    ReleaseAgentRequest, RevokeAgentRequest, RevokeTokenRequest,
};

use output::{Column, Table};
use trunkfarm_proto::settings::fmt_duration;

use crate::config::HubConfig;
use crate::server::Hub;

/// Exit code for usage, configuration and connection errors.
const EXIT_USAGE: u8 = 2;

/// trunkfarm: test downstream projects against a language runtime's trunk.
#[derive(Parser)]
#[command(name = "trunkfarm", version, about, propagate_version = true)]
struct Cli {
    /// The hub's config file. Client commands read its data_dir to find the
    /// running hub (hub.json) and the admin token. Without one, the defaults
    /// apply (data dir ./trunkfarm-data).
    #[arg(long, global = true, env = "TRUNKFARM_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the hub: serve agents and admin clients until SIGTERM or Ctrl-C.
    Serve,
    /// Run the embedded demo: a hub with two local agents, no config needed.
    Demo(crate::demo::DemoArgs),
    /// Measure the hub on this machine (throughput, latency, idle agents,
    /// artifact fan-out, recovery) with real processes and production
    /// durability; prints a table and one `BENCH {json}` line per figure.
    Bench(crate::bench::BenchArgs),
    /// Enrollment tokens: the one string a volunteer pastes to join.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Agents: list them, drain them, cut them off.
    Agent {
        #[command(subcommand)]
        command: AgentCommand,
    },
    /// Jobs: run ad-hoc commands on agents, inspect results and logs.
    Job {
        #[command(subcommand)]
        command: jobs::JobCommand,
    },
    /// The grid: each project's newest result per upstream and platform.
    Status {
        /// Only this upstream.
        #[arg(long)]
        upstream: Option<String>,
        /// Print JSON (with --watch: one document per line).
        #[arg(long)]
        json: bool,
        /// Show it again every INTERVAL until Ctrl-C: redrawn in place in a
        /// terminal, printed one after the other into a pipe or file.
        #[arg(long, value_name = "INTERVAL", value_parser = humantime::parse_duration, num_args = 0..=1, default_missing_value = "5s")]
        watch: Option<Duration>,
    },
    /// Which projects went red at an upstream commit (or in a range), with
    /// their newly failing tests.
    Breakage {
        /// The upstream's name in the hub config (default: the only one).
        #[arg(long)]
        upstream: Option<String>,
        /// A commit (or its prefix), or a range "A..B"; default: the branch head.
        #[arg(long)]
        rev: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Went-red and fixed events, newest first (the notifier's input).
    Transitions {
        /// Only this upstream.
        #[arg(long)]
        upstream: Option<String>,
        /// Only this project.
        #[arg(long)]
        project: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Also still-red and still-green results.
        #[arg(long)]
        all: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Measure a project's noise: re-run its newest run N times (same
    /// project commit, same runtime) and say per test how often it failed.
    Calibrate(noise::CalibrateArgs),
    /// Tests that flipped on identical re-runs, per project (flips/runs,
    /// last flip, known flaky or not).
    Flaky {
        /// Only this project.
        #[arg(long)]
        project: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Upstream runtimes: build one now, list them.
    Upstream {
        #[command(subcommand)]
        command: pipeline::UpstreamCommand,
    },
    /// Runtime artifacts stored on the hub.
    Artifact {
        #[command(subcommand)]
        command: pipeline::ArtifactCommand,
    },
    /// Mail a maintainer when a project goes red or is fixed (or a daily
    /// digest of an upstream with --digest).
    Subscribe(notify::SubscriptionArgs),
    /// Stop those mails.
    Unsubscribe(notify::SubscriptionArgs),
    /// List subscriptions.
    Subscriptions {
        /// Only this project.
        #[arg(long)]
        project: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Mail delivery: send a test mail, look at the outbox.
    Mail {
        #[command(subcommand)]
        command: notify::MailCommand,
    },
    /// On-demand agent pools.
    Pool {
        #[command(subcommand)]
        command: PoolCommand,
    },
    /// Print a shell completion script, e.g. for bash:
    /// `trunkfarm completions bash > /etc/bash_completion.d/trunkfarm`
    /// (zsh: a file `_trunkfarm` on $fpath; fish:
    /// ~/.config/fish/completions/trunkfarm.fish).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand)]
enum PoolCommand {
    /// Each pool's instances (starting, idle, busy, stopping), failed starts and back-off.
    List {
        /// Include stopped and failed instances.
        #[arg(long)]
        all: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token; prints the enrollment string (alone on stdout).
    Create {
        /// Labels granted to agents enrolled with it, comma-separated.
        #[arg(long, value_delimiter = ',')]
        labels: Vec<String>,
        /// How long it stays valid, e.g. "24h" (default: enrollment.default_token_ttl).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// How many agents may enroll with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// A note for `token list` (who it was for).
        #[arg(long, default_value = "")]
        note: String,
        /// Agents enrolled with it are trusted: they may build runtimes and
        /// their verdicts need no confirmation. Only for machines you
        /// control; a volunteer's machine stays a volunteer.
        #[arg(long)]
        trusted: bool,
        /// The most jobs at once such an agent is given, whatever it claims
        /// (default: enrollment.default_max_parallel_jobs).
        #[arg(long)]
        max_parallel_jobs: Option<u32>,
    },
    /// List tokens.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token: nobody enrolls with it any more.
    Revoke {
        /// The token id (tok_…).
        id: String,
    },
}

#[derive(Subcommand)]
enum AgentCommand {
    /// List enrolled agents.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke an agent: it is disconnected now and refused from then on; its
    /// running jobs are requeued.
    Revoke {
        /// The agent id (ag_…).
        id: String,
    },
    /// Release a quarantined agent: it gets jobs again (its disagreements so
    /// far no longer count towards the next quarantine).
    Release {
        /// The agent id (ag_…).
        id: String,
    },
    /// Drain an agent: it takes no new job, finishes its running ones (up to
    /// the grace period) and exits.
    Drain {
        /// The agent id (ag_…).
        id: String,
        /// How long running jobs may take before they are cancelled
        /// (default: dispatch.drain_grace).
        #[arg(long, value_parser = humantime::parse_duration)]
        grace: Option<Duration>,
    },
}

/// Parses the command line and runs the command.
pub(crate) fn main() -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    // Needs no config, no hub and no runtime.
    if let Command::Completions { shell } = cli.command {
        exit_quietly_on_closed_stdout();
        completions(shell, &mut std::io::stdout());
        return ExitCode::SUCCESS;
    }
    if !matches!(
        cli.command,
        Command::Serve | Command::Demo(_) | Command::Bench(_)
    ) {
        exit_quietly_on_closed_stdout();
    }
    // The demo tells its own story on stdout; the hub's log would drown it.
    let level = match cli.command {
        Command::Serve => "info",
        Command::Demo(_) | Command::Bench(_) => "error",
        _ => "warn",
    };
    init_tracing(level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let code = match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_USAGE)
        }
    };
    // Everything durable is flushed by then; don't wait on idle worker threads.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    code
}

/// A listing piped into `head` ends quietly and successfully (exit 0)
/// when the reader goes: the reader took what it wanted, so a closed stdout
/// is not an error, and Rust's default (SIGPIPE ignored) would panic in
/// `println!` instead. Handled here once, for every client command's
/// output, by ending the process on SIGPIPE. Only for the client commands:
/// their sockets are written with MSG_NOSIGNAL by the standard library, so
/// a closed connection still comes back as an error, not as the signal.
fn exit_quietly_on_closed_stdout() {
    extern "C" fn exit_quietly(_signal: libc::c_int) {
        // SAFETY: _exit(2) is async-signal-safe; nothing is left to flush
        // for a reader that is gone.
        unsafe { libc::_exit(0) }
    }
    // SAFETY: signal(2) installs a handler that only calls _exit; no
    // memory is shared with it.
    unsafe {
        libc::signal(
            libc::SIGPIPE,
            exit_quietly as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// The config named on the command line, or the defaults.
fn load_config(path: Option<&PathBuf>) -> anyhow::Result<HubConfig> {
    match path {
        Some(p) => Ok(HubConfig::load(p)?),
        None => Ok(HubConfig::default_for(PathBuf::from("trunkfarm-data"))),
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let cfg = load_config(cli.config.as_ref())?;
    match cli.command {
        Command::Serve => serve(cfg).await,
        Command::Demo(args) => crate::demo::run(args).await,
        Command::Bench(args) => crate::bench::run(args).await,
        Command::Token { command } => token(&cfg, command).await,
        Command::Agent { command } => agent(&cfg, command).await,
        Command::Job { command } => jobs::run(&cfg, command).await,
        Command::Status {
            upstream,
            json,
            watch,
        } => pipeline::status(&cfg, upstream, json, watch).await,
        Command::Breakage {
            upstream,
            rev,
            json,
        } => pipeline::breakage(&cfg, upstream, rev, json).await,
        Command::Transitions {
            upstream,
            project,
            limit,
            all,
            json,
        } => pipeline::transitions(&cfg, upstream, project, limit, all, json).await,
        Command::Calibrate(args) => noise::calibrate(&cfg, args).await,
        Command::Flaky { project, json } => noise::flaky(&cfg, project, json).await,
        Command::Upstream { command } => pipeline::upstream(&cfg, command).await,
        Command::Artifact { command } => pipeline::artifact(&cfg, command).await,
        Command::Subscribe(args) => notify::subscribe(&cfg, args).await,
        Command::Unsubscribe(args) => notify::unsubscribe(&cfg, args).await,
        Command::Subscriptions { project, json } => notify::list(&cfg, project, json).await,
        Command::Mail { command } => notify::mail(&cfg, command).await,
        Command::Pool {
            command: PoolCommand::List { all, json },
        } => pool::list(&cfg, all, json).await,
        Command::Completions { shell } => {
            completions(shell, &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Writes the completion script of every command and flag for `shell`.
fn completions(shell: clap_complete::Shell, out: &mut dyn std::io::Write) {
    use clap::CommandFactory;
    clap_complete::generate(shell, &mut Cli::command(), "trunkfarm", out);
}

/// Overrides `hub.listen` (gRPC); a hub restarting itself in place sets it to
/// keep the port it had (agents dial that one), as with `listen = "...:0"`.
const LISTEN_ENV: &str = "TRUNKFARM_LISTEN";
/// Overrides `web.listen`, likewise.
const WEB_LISTEN_ENV: &str = "TRUNKFARM_WEB_LISTEN";

/// Applies [`LISTEN_ENV`] and [`WEB_LISTEN_ENV`] to the config.
fn listen_overrides(cfg: &mut HubConfig) -> anyhow::Result<()> {
    for (var, target) in [
        (LISTEN_ENV, &mut cfg.hub.listen),
        (WEB_LISTEN_ENV, &mut cfg.web.listen),
    ] {
        if let Some(value) = std::env::var_os(var) {
            let text = value.to_string_lossy();
            *target = text.parse().map_err(|e| {
                anyhow::anyhow!("{var}={text:?} is not an address such as 127.0.0.1:7443: {e}")
            })?;
        }
    }
    Ok(())
}

async fn serve(mut cfg: HubConfig) -> anyhow::Result<ExitCode> {
    listen_overrides(&mut cfg)?;
    let hub = Hub::start(&cfg).await?;
    let how = if hub.info.tls {
        format!("TLS, CA fingerprint sha256:{}", hub.info.ca_sha256)
    } else {
        "plaintext: TLS must be terminated in front of this hub".to_string()
    };
    println!("trunkfarm hub listening on {} ({how})", hub.addr);
    println!(
        "create an enrollment string for a volunteer: trunkfarm{} token create",
        cfg.source
            .as_ref()
            .map(|p| format!(" --config {}", p.display()))
            .unwrap_or_default()
    );
    // The database refuses writes after a failed write until it is opened again:
    // once the disk takes writes, start afresh as after a crash (which loses
    // nothing acknowledged); agents reconnect by themselves. On its own OS
    // thread: a failing database may stall the async runtime.
    let wait = hub.wait_database_recoverable();
    let (listen, web) = (hub.addr.to_string(), hub.info.web.clone());
    std::thread::spawn(move || {
        wait();
        tracing::warn!(
            "the data dir takes writes again: restarting the hub to reopen its database"
        );
        let err = restart_in_place(&listen, &web);
        tracing::error!("{err}");
        std::process::exit(i32::from(EXIT_USAGE));
    });
    crate::server::shutdown_signal().await;
    tracing::info!("shutting down");
    hub.shutdown().await?;
    Ok(ExitCode::SUCCESS)
}

/// Replaces this process with a fresh `trunkfarm` run with the same
/// arguments (same pid, so a supervisor sees no exit), listening where this
/// one did. Returns only if that failed.
fn restart_in_place(listen: &str, web: &str) -> anyhow::Error {
    use std::os::unix::process::CommandExt;
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| "trunkfarm".into());
    let err = std::process::Command::new("/proc/self/exe")
        .arg0(arg0)
        .args(args)
        .env(LISTEN_ENV, listen)
        .env(WEB_LISTEN_ENV, web)
        .exec();
    anyhow::anyhow!("cannot restart the hub ({err}): restart it by hand")
}

/// Formats a Unix time in ms for humans.
fn when(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// What `token revoke` prints: which token it was, and that agents
/// enrolled with it keep their own credentials.
fn revoked_text(t: &trunkfarm_proto::v1::TokenInfo) -> String {
    let mut text = format!(
        "revoked token {} ({}, {}/{} enrollment(s) used",
        t.token_id,
        view::trust(t.trusted),
        t.uses_total - t.uses_left,
        t.uses_total
    );
    if !t.labels.is_empty() {
        text.push_str(&format!(", labels {}", t.labels.join(",")));
    }
    if !t.note.is_empty() {
        text.push_str(&format!(", note {:?}", t.note));
    }
    text.push_str(
        "): nobody enrolls with it any more; agents enrolled with it stay (`trunkfarm agent revoke <id>` cuts one off)",
    );
    text
}

/// A token's cap on parallel jobs as `token list` prints it.
fn parallel(max_parallel_jobs: u32) -> String {
    match max_parallel_jobs {
        0 => "default".into(),
        n => n.to_string(),
    }
}

async fn token(cfg: &HubConfig, command: TokenCommand) -> anyhow::Result<ExitCode> {
    let mut client = client::connect(cfg).await?;
    match command {
        TokenCommand::Create {
            labels,
            ttl,
            uses,
            note,
            trusted,
            max_parallel_jobs,
        } => {
            if max_parallel_jobs == Some(0) {
                anyhow::bail!(
                    "--max-parallel-jobs 0 would give its agents no slot: give at least 1, or leave it out for the hub's default"
                );
            }
            let resp = client
                .create_token(CreateTokenRequest {
                    labels,
                    ttl_secs: ttl.map(|d| d.as_secs().max(1)).unwrap_or(0),
                    uses,
                    note,
                    trusted,
                    max_parallel_jobs: max_parallel_jobs.unwrap_or(0),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("{}", resp.enrollment);
            let valid = match ttl {
                Some(ttl) => format!(
                    "valid for {} (until {})",
                    fmt_duration(ttl),
                    when(resp.expires_at_ms)
                ),
                None => format!("valid until {}", when(resp.expires_at_ms)),
            };
            eprintln!(
                "token {} {valid} for {uses} enrollment(s); on the volunteer's machine run:\n  trunkfarm-agent enroll -\nand paste the string above (given as an argument instead, it shows in `ps`)",
                resp.token_id,
            );
        }
        TokenCommand::List { json } => {
            let tokens = client
                .list_tokens(ListTokensRequest {})
                .await
                .map_err(status_error)?
                .into_inner()
                .tokens;
            if json {
                output::json_list::<_, view::Token>(&tokens)?;
                return Ok(ExitCode::SUCCESS);
            }
            const COLUMNS: &[Column] = &[
                Column::left("TOKEN", 18),
                Column::left("STATE", 8),
                Column::left("USES", 6),
                Column::left("TRUST", 10),
                Column::left("JOBS", 5),
                Column::left("EXPIRES", 22),
                Column::left("LABELS", 20),
                Column::last("NOTE"),
            ];
            let table = Table::new(COLUMNS);
            let now = crate::store::now_ms();
            for t in tokens {
                table.row(&[
                    &t.token_id,
                    &view::token_state(&t, now),
                    &format!("{}/{}", t.uses_total - t.uses_left, t.uses_total),
                    &view::trust(t.trusted),
                    &parallel(t.max_parallel_jobs),
                    &when(t.expires_at_ms),
                    &t.labels.join(","),
                    &t.note,
                ]);
            }
        }
        TokenCommand::Revoke { id } => {
            let token = client
                .revoke_token(RevokeTokenRequest {
                    token_id: id.clone(),
                })
                .await
                .map_err(status_error)?
                .into_inner()
                .token
                .unwrap_or_default();
            println!("{}", revoked_text(&token));
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn agent(cfg: &HubConfig, command: AgentCommand) -> anyhow::Result<ExitCode> {
    let mut client = client::connect(cfg).await?;
    match command {
        AgentCommand::List { json } => {
            let agents = client
                .list_agents(ListAgentsRequest {})
                .await
                .map_err(status_error)?
                .into_inner()
                .agents;
            if json {
                output::json_list::<_, view::Agent>(&agents)?;
                return Ok(ExitCode::SUCCESS);
            }
            const COLUMNS: &[Column] = &[
                Column::left("AGENT", 16),
                Column::left("NAME", 20),
                Column::left("STATE", 10),
                Column::left("TRUST", 10),
                Column::left("CONFIRMED", 10),
                Column::left("JOBS", 8),
                Column::left("LAST SEEN", 22),
                Column::left("LABELS", 24),
                Column::last("UNAVAILABLE"),
            ];
            let table = Table::new(COLUMNS);
            let mut quarantined = Vec::new();
            let mut limits = Vec::new();
            for a in agents {
                let (state, unavailable) = crate::dispatch::availability(&a);
                // What the hub gives it, not what it claims.
                let slots = a.max_parallel_jobs;
                let last_seen = if a.connected {
                    "now".to_string()
                } else {
                    when(a.last_seen_ms)
                };
                table.row(&[
                    &a.agent_id,
                    &a.name,
                    &state,
                    &view::trust(a.trusted),
                    // Agreed / disagreed confirmation runs.
                    &format!("{}/{}", a.confirmations_agreed, a.confirmations_disagreed),
                    &format!("{}/{}", a.running.len(), slots),
                    &last_seen,
                    &jobs::or_dash(&a.labels.join(",")),
                    &jobs::or_dash(&unavailable),
                ]);
                if !a.quarantined.is_empty() {
                    quarantined.push(format!("{}: {}", a.agent_id, a.quarantined));
                }
                let words = a
                    .capabilities
                    .as_ref()
                    .map(crate::dispatch::donor_limits)
                    .unwrap_or_default();
                if !words.is_empty() {
                    limits.push(format!("{} ({}): {}", a.agent_id, a.name, words.join("; ")));
                }
            }
            // Each connected agent's donor limits, a line each (too long for a column).
            for l in limits {
                println!("limits of {l}");
            }
            for q in quarantined {
                println!("quarantined {q} (`trunkfarm agent release <id>` or `agent revoke <id>`)");
            }
        }
        AgentCommand::Release { id } => {
            client
                .release_agent(ReleaseAgentRequest {
                    agent_id: id.clone(),
                })
                .await
                .map_err(status_error)?;
            eprintln!("agent {id} released from quarantine: it gets jobs again");
        }
        AgentCommand::Revoke { id } => {
            let resp = client
                .revoke_agent(RevokeAgentRequest {
                    agent_id: id.clone(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            eprintln!(
                "agent {id} revoked; {} running job(s) requeued",
                resp.requeued.len()
            );
        }
        AgentCommand::Drain { id, grace } => {
            client
                .drain_agent(DrainAgentRequest {
                    agent_id: id.clone(),
                    grace_secs: grace.map(|g| g.as_secs().max(1)).unwrap_or(0),
                })
                .await
                .map_err(status_error)?;
            eprintln!("agent {id} is draining: it finishes its running jobs and exits");
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use trunkfarm_proto::v1::TokenInfo;

    #[test]
    fn revoke_says_which_token_it_revoked() {
        let text = revoked_text(&TokenInfo {
            token_id: "tok_abc".into(),
            labels: vec!["gpu".into()],
            uses_total: 3,
            uses_left: 2,
            note: "for ada".into(),
            revoked: true,
            ..Default::default()
        });
        assert!(
            text.starts_with("revoked token tok_abc (volunteer, 1/3 enrollment(s) used, labels gpu, note \"for ada\")"),
            "{text}"
        );
    }

    #[test]
    fn completion_scripts_know_every_command() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut script = Vec::new();
            completions(shell, &mut script);
            let script = String::from_utf8(script).unwrap();
            for word in ["breakage", "upstream", "completions", "project"] {
                assert!(script.contains(word), "{shell}: no {word}");
            }
        }
    }
}
