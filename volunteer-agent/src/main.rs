//! `trunkfarm-agent`: the volunteer agent.
//!
//! `enroll` trades an enrollment string for this machine's credential;
//! `run` connects out to the hub and runs the jobs it sends until drained;
//! `status`, `pause`, `resume`, `unenroll` and `hubs` are the donor's
//! controls (`commands.rs`), talking to the running agent over its control
//! socket. Another hub's enrollment string adds that hub (`hubs.rs`): the
//! agent then serves each, sharing its slots (`slots.rs`).
//!
//! Exit codes (every command): 0 success (`run`: after a drain); 1 a failure
//! (the hub unreachable at `enroll` or `unenroll`, the hub refused the
//! enrollment token, I/O); 2 a usage, settings or "not enrolled" error; 3
//! the hub refused the credential (`run`: revoked, unknown; with several
//! hubs, once every hub refused it, the others serving on meanwhile); 4 the hub
//! refused this agent's protocol version; 5 another agent holds the state
//! directory (`run`, `enroll`, `unenroll`); 6 `status`: no agent runs (what
//! the state directory tells is shown).

mod backoff;
mod cache;
mod cli;
mod commands;
mod config;
mod control;
mod credential;
mod donor;
mod enroll;
mod executor;
mod fsutil;
mod hubs;
mod jobs;
mod limits;
mod lock;
mod outbox;
mod output;
mod pack;
mod reports;
mod results;
mod sandbox;
mod service;
mod session;
mod slots;
mod spawn_gate;
mod state;
mod sysinfo;
mod transfer;
mod unpack;

use std::io::IsTerminal as _;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser as _;
use tracing_subscriber::EnvFilter;

use crate::cli::{Cli, Command, EnrollArgs, RunArgs, ServiceArgs, ServiceCommand};
use crate::config::AgentConfig;
use crate::enroll::EnrollError;
use crate::session::Ending;

/// A failure that is not the volunteer's input (the hub unreachable at
/// enrollment, an I/O error).
pub(crate) const EXIT_FAILURE: u8 = 1;
/// A usage, settings or "not enrolled" error (or `sandbox = "bwrap"` without
/// a working bubblewrap): fix the command or the file.
pub(crate) const EXIT_USAGE: u8 = 2;
/// The hub refused the credential (revoked or unknown): enroll again.
const EXIT_REFUSED: u8 = 3;
/// The hub refused this agent's protocol version: upgrade the agent.
const EXIT_INCOMPATIBLE: u8 = 4;
/// Another agent holds the state directory's lock (`lock.rs`).
pub(crate) const EXIT_LOCKED: u8 = 5;
/// `status`: no agent runs on the state directory.
pub(crate) const EXIT_NOT_RUNNING: u8 = 6;

/// How long, at exit, cleanup still running on the blocking pool (removing a
/// job's work directory) may delay the process.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    // The dialer passes its provider explicitly; this covers anything that
    // asks rustls for the process default. An error means one is installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // On a usage error clap prints it and exits with code 2.
    let cli = Cli::parse();
    init_tracing(cli.verbose);
    fsutil::private_umask();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let code = runtime.block_on(async {
        match cli.command {
            Command::Enroll(args) => enroll_command(args).await,
            Command::Run(args) => run_command(args).await,
            Command::Status(args) => match state_dir(args.state.state_dir.as_deref()) {
                Ok(dir) => commands::status(&dir, args.json).await,
                Err(code) => code,
            },
            Command::Pause(args) => match state_dir(args.state.state_dir.as_deref()) {
                Ok(dir) => commands::pause(&dir, args.for_, args.now).await,
                Err(code) => code,
            },
            Command::Resume(args) => match state_dir(args.state_dir.as_deref()) {
                Ok(dir) => commands::resume(&dir).await,
                Err(code) => code,
            },
            Command::Unenroll(args) => match state_dir(args.state.state_dir.as_deref()) {
                Ok(dir) => commands::unenroll(&dir, args.force, args.hub.as_deref()).await,
                Err(code) => code,
            },
            Command::Hubs(args) => match state_dir(args.state.state_dir.as_deref()) {
                Ok(dir) => commands::hubs(&dir, args.json).await,
                Err(code) => code,
            },
            Command::Service(ServiceCommand::Install(args)) => match service_scope(&args) {
                Ok((scope, dir)) => service::install(scope, &dir, args.print),
                Err(code) => code,
            },
            Command::Service(ServiceCommand::Uninstall(args)) => match service_scope(&args) {
                Ok((scope, _)) => service::uninstall(scope),
                Err(code) => code,
            },
        }
    });
    runtime.shutdown_timeout(SHUTDOWN_WAIT);
    ExitCode::from(code)
}

/// Logs go to stderr: `RUST_LOG` if set, else by `-v` (info, `-vv` debug);
/// without either, a terminal gets warnings only (the donor reads the plain
/// lines on stdout) and a service's journal gets info.
fn init_tracing(verbose: u8) {
    let level = match verbose {
        0 if std::io::stderr().is_terminal() => "warn",
        0 | 1 => "info",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// The state directory from `--state-dir` or the environment.
fn state_dir(cli: Option<&Path>) -> Result<std::path::PathBuf, u8> {
    state::resolve_state_dir(cli, |name| std::env::var_os(name)).map_err(|e| {
        eprintln!("error: {e}");
        EXIT_USAGE
    })
}

/// The service's scope and state directory: a system service's defaults to
/// `/var/lib/trunkfarm-agent` (root's home is hidden from it).
fn service_scope(args: &ServiceArgs) -> Result<(service::Scope, std::path::PathBuf), u8> {
    if !args.system {
        return Ok((service::Scope::User, state_dir(args.state_dir.as_deref())?));
    }
    let given = args
        .state_dir
        .clone()
        .or_else(|| {
            std::env::var_os(state::STATE_DIR_ENV)
                .filter(|v| !v.is_empty())
                .map(Into::into)
        })
        .unwrap_or_else(|| service::SYSTEM_STATE_DIR.into());
    Ok((service::Scope::System, state_dir(Some(&given))?))
}

/// `trunkfarm-agent enroll`.
async fn enroll_command(args: EnrollArgs) -> u8 {
    let dir = match state_dir(args.state_dir.as_deref()) {
        Ok(dir) => dir,
        Err(code) => return code,
    };
    // An agent running on this state directory would lose its credential.
    let _lock = if dir.is_dir() {
        match lock::acquire(&dir, "enroll") {
            Ok(lock) => Some(lock),
            Err(e) => return lock_refused(&e),
        }
    } else {
        None
    };
    let enrollment = match enroll::enrollment_string(
        &args,
        std::env::var_os(enroll::ENROLLMENT_ENV),
        std::io::stdin().lock(),
    ) {
        Ok(enrollment) => enrollment,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_USAGE;
        }
    };
    match enroll::enroll(&enrollment, &args, &dir).await {
        Ok(enrolled) => {
            println!("{}", enrolled.summary());
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            match e {
                EnrollError::Usage(_) => EXIT_USAGE,
                EnrollError::Failed(_) => EXIT_FAILURE,
            }
        }
    }
}

/// Says why the state directory's lock was not taken; the exit code.
fn lock_refused(e: &lock::LockError) -> u8 {
    eprintln!("error: {e}");
    match e {
        lock::LockError::Held { .. } => EXIT_LOCKED,
        lock::LockError::Io { .. } => EXIT_FAILURE,
    }
}

/// `trunkfarm-agent run`.
async fn run_command(args: RunArgs) -> u8 {
    let dir = match state_dir(args.state_dir.as_deref()) {
        Ok(dir) => dir,
        Err(code) => return code,
    };
    let enrolled = match hubs::enrolled(&dir) {
        Ok(enrolled) => enrolled,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_USAGE;
        }
    };
    // Held until the process exits (the kernel releases it however it ends).
    let _lock = match lock::acquire(&dir, "run") {
        Ok(lock) => lock,
        Err(e) => return lock_refused(&e),
    };
    let (path, must_exist) = match &args.config {
        Some(path) => (path.clone(), true),
        None => (dir.join("agent.toml"), false),
    };
    let mut config = match AgentConfig::load(&path, must_exist) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_USAGE;
        }
    };
    if let Err(e) = config.apply(args.overrides()) {
        eprintln!("error: {e}");
        return EXIT_USAGE;
    }
    let cache_dir = config.cache.dir_or_default(&dir);
    let work_root = config.work_root(&dir);
    let mut private = vec![dir.as_path(), cache_dir.as_path(), work_root.as_path()];
    private.extend(config.source.as_deref());
    let sandbox = match sandbox::Sandbox::open(&config, &private).await {
        Ok(sandbox) => sandbox,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_USAGE;
        }
    };
    match session::run(dir, enrolled, config, sandbox).await {
        Ok(Ending::Drained) => 0,
        Ok(Ending::Refused(message)) => {
            eprintln!("error: the hub refused this agent: {message}");
            EXIT_REFUSED
        }
        Ok(Ending::Incompatible(message)) => {
            eprintln!("error: the hub refused this agent's protocol version: {message}");
            EXIT_INCOMPATIBLE
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            EXIT_FAILURE
        }
    }
}
