//! The command line: `trunkfarm-agent enroll`, `run`, and the donor's
//! `status`, `pause`, `resume` and `unenroll`, and `service`.
//!
//! Only parsing lives here; the commands themselves are in [`crate::enroll`],
//! [`crate::session`] and [`crate::commands`]. Options of `run` that change a setting become
//! [`Overrides`] of the settings file, so the command line and the file are
//! validated by the same rules.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::{Overrides, SandboxMode};

/// The trunkfarm volunteer agent: lends this machine to a trunkfarm CI hub.
///
/// The agent only ever dials out to the hub (it works behind NAT) and runs
/// the jobs the hub sends it, within the limits you set.
#[derive(Debug, Parser)]
#[command(name = "trunkfarm-agent", version, propagate_version = true)]
pub(crate) struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Log the agent's detail on stderr: -v info, -vv debug (`RUST_LOG`
    /// overrides). Without it, a terminal gets only warnings and the plain
    /// lines on stdout; a service (stderr not a terminal) logs info.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// The agent's commands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Register this machine with a hub, using the enrollment string its
    /// operator gave you (from `trunkfarm token create`).
    Enroll(EnrollArgs),
    /// Connect to the hub and run jobs until stopped (SIGTERM/Ctrl-C drain
    /// gracefully: running jobs may finish; a second signal cancels them).
    Run(RunArgs),
    /// Show what the agent does: its hub, the jobs running now, the jobs of
    /// the last day, its pause, its cache (exit 0; 6 when no agent runs:
    /// then what the state directory tells).
    Status(StatusArgs),
    /// Take no new job (running jobs finish; `--now` hands them back to the
    /// hub to run elsewhere). Kept across restarts until `resume`.
    Pause(PauseArgs),
    /// Take work again after `pause`.
    Resume(StateArgs),
    /// Leave the hub: revoke this agent's credential there, then delete its
    /// local state (your agent.toml is kept). A running agent hands its
    /// jobs back and stops first. With several hubs, `--hub NAME` leaves
    /// that one only (the agent goes on with the others).
    Unenroll(UnenrollArgs),
    /// List the hubs this machine is enrolled with: name, address, agent
    /// id, share and whether the running agent is connected to each.
    Hubs(StatusArgs),
    /// Run the agent as a systemd service, started now and at every boot
    /// (`install`), or no longer (`uninstall`).
    #[command(subcommand)]
    Service(ServiceCommand),
}

/// `trunkfarm-agent service`.
#[derive(Debug, Subcommand)]
pub(crate) enum ServiceCommand {
    /// Write a systemd unit that runs `trunkfarm-agent run` on this state
    /// directory, and enable and start it (a user service by default; exit
    /// 1 with the unit written when systemctl cannot be asked).
    Install(ServiceArgs),
    /// Stop and disable the service and remove its unit (the enrollment
    /// and settings stay).
    Uninstall(ServiceArgs),
}

/// `trunkfarm-agent service install|uninstall`.
#[derive(Debug, Args)]
pub(crate) struct ServiceArgs {
    /// Where the agent keeps its credential and state [default:
    /// $TRUNKFARM_AGENT_STATE_DIR, else /var/lib/trunkfarm-agent with
    /// --system, else $XDG_STATE_HOME/trunkfarm-agent, else
    /// ~/.local/state/trunkfarm-agent].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// A system service (as root, run as a user systemd makes for it, state
    /// in /var/lib) instead of your user service.
    #[arg(long)]
    pub system: bool,
    /// Print the unit and the commands instead of installing (`install`).
    #[arg(long)]
    pub print: bool,
}

/// A command that only needs the state directory.
#[derive(Debug, Args)]
pub(crate) struct StateArgs {
    /// Where the agent keeps its credential and state [default:
    /// $TRUNKFARM_AGENT_STATE_DIR, else $XDG_STATE_HOME/trunkfarm-agent,
    /// else ~/.local/state/trunkfarm-agent].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

/// `trunkfarm-agent status`.
#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    #[command(flatten)]
    pub state: StateArgs,
    /// Print the status as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `trunkfarm-agent pause`.
#[derive(Debug, Args)]
pub(crate) struct PauseArgs {
    #[command(flatten)]
    pub state: StateArgs,
    /// Resume by itself after this long, e.g. "2h" or "30m" [default:
    /// until `trunkfarm-agent resume`].
    #[arg(long = "for", value_name = "DURATION", value_parser = parse_duration)]
    pub for_: Option<Duration>,
    /// Hand the running jobs back to the hub at once (they run elsewhere)
    /// instead of letting them finish.
    #[arg(long)]
    pub now: bool,
}

/// `trunkfarm-agent unenroll`.
#[derive(Debug, Args)]
pub(crate) struct UnenrollArgs {
    #[command(flatten)]
    pub state: StateArgs,
    /// Delete the local state even when the hub cannot be told (it then
    /// still lists this agent until its operator revokes it).
    #[arg(long)]
    pub force: bool,
    /// The hub to leave, by its name (`trunkfarm-agent hubs`) or address;
    /// required when this machine serves several hubs.
    #[arg(long, value_name = "NAME")]
    pub hub: Option<String>,
}

/// `trunkfarm-agent enroll`.
#[derive(Debug, Args)]
pub(crate) struct EnrollArgs {
    /// The enrollment string (`tf1_...`), or `-` to read it from the first
    /// line of standard input. It contains a one-time secret, and a string
    /// given here shows in `ps` to every user of this machine while the
    /// agent enrolls: prefer `-`, `--enrollment-file` or the environment
    /// variable `TRUNKFARM_ENROLLMENT` (exactly one of the four).
    #[arg(value_name = "STRING")]
    pub enrollment: Option<String>,
    /// Read the enrollment string from this file (its first line).
    #[arg(long, value_name = "PATH")]
    pub enrollment_file: Option<PathBuf>,
    /// The name shown for this machine in the hub's agent list [default: the
    /// host name].
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Where the agent keeps its credential and state [default:
    /// $TRUNKFARM_AGENT_STATE_DIR, else $XDG_STATE_HOME/trunkfarm-agent,
    /// else ~/.local/state/trunkfarm-agent].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Replace the credential for this hub (this machine then becomes a new
    /// agent for the hub; results the old one had not delivered are
    /// discarded). Another hub's string adds that hub instead.
    #[arg(long)]
    pub force: bool,
    /// This hub's name on this machine, used by `[hubs.NAME]` in agent.toml
    /// and `unenroll --hub` [default: its address, `host-port`].
    #[arg(long, value_name = "NAME")]
    pub hub_name: Option<String>,
}

/// `trunkfarm-agent run`.
#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// Where the agent keeps its credential and state [default:
    /// $TRUNKFARM_AGENT_STATE_DIR, else $XDG_STATE_HOME/trunkfarm-agent,
    /// else ~/.local/state/trunkfarm-agent].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Settings file (must exist when given) [default:
    /// <state-dir>/agent.toml, if it exists].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The name shown for this machine in the hub's agent list (overrides
    /// `name`).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Labels this machine advertises, comma-separated (replaces `labels`;
    /// the OS and architecture labels are always added).
    #[arg(long, value_name = "LABELS", value_delimiter = ',')]
    pub labels: Option<Vec<String>>,
    /// How many jobs may run at once (overrides `max_parallel_jobs`).
    #[arg(long, value_name = "N")]
    pub max_parallel_jobs: Option<u32>,
    /// Accept jobs only from this project; repeat for more (replaces
    /// `allowed_projects`).
    #[arg(long = "allow-project", value_name = "PROJECT")]
    pub allow_projects: Vec<String>,
    /// Never take jobs of this project; repeat for more (replaces
    /// `denied_projects`).
    #[arg(long = "deny-project", value_name = "PROJECT")]
    pub deny_projects: Vec<String>,
    /// CPU cores offered, e.g. 4 (overrides `cores`) [default: all].
    #[arg(long, value_name = "N")]
    pub cores: Option<u32>,
    /// Memory offered to all jobs together, e.g. "8 GiB" (overrides
    /// `memory`) [default: the machine's].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub memory: Option<u64>,
    /// When this machine takes work, e.g. "Mon-Fri 22:00-07:00"; repeat for
    /// more windows (replaces `schedule`) [default: any time].
    #[arg(long = "schedule", value_name = "WINDOW")]
    pub schedule: Vec<String>,
    /// Take work only while the machine is idle (overrides `only_when_idle`).
    #[arg(long)]
    pub only_when_idle: bool,
    /// Your ceiling on any one job's run time, e.g. "2h" or "90m" (overrides
    /// `max_job_timeout`).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub max_job_timeout: Option<Duration>,
    /// Log bytes kept per job, e.g. "4 MiB" (overrides `output_cap`).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub output_cap: Option<u64>,
    /// Where jobs' checkouts and scratch files go (overrides `work_dir`)
    /// [default: <state-dir>/work].
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
    /// How jobs are confined: auto, bwrap or none (overrides `sandbox`).
    #[arg(long, value_name = "MODE")]
    pub sandbox: Option<SandboxMode>,
    /// Give jobs whose project needs the network access to it (overrides
    /// `allow_network`).
    #[arg(long)]
    pub allow_network: bool,
}

impl RunArgs {
    /// The options that override the settings file.
    pub fn overrides(&self) -> Overrides {
        Overrides {
            name: self.name.clone(),
            // `--labels ""` clears the labels.
            labels: self.labels.as_ref().map(|labels| {
                labels
                    .iter()
                    .map(|l| l.trim().to_owned())
                    .filter(|l| !l.is_empty())
                    .collect()
            }),
            max_parallel_jobs: self.max_parallel_jobs,
            allowed_projects: (!self.allow_projects.is_empty())
                .then(|| self.allow_projects.clone()),
            max_job_timeout: self.max_job_timeout,
            cores: self.cores,
            memory: self.memory,
            denied_projects: (!self.deny_projects.is_empty()).then(|| self.deny_projects.clone()),
            schedule: (!self.schedule.is_empty()).then(|| self.schedule.clone()),
            only_when_idle: self.only_when_idle.then_some(true),
            output_cap: self.output_cap,
            work_dir: self.work_dir.clone(),
            sandbox: self.sandbox,
            allow_network: self.allow_network.then_some(true),
        }
    }
}

/// Parses a human duration ("90s", "2h", "1h 30m").
fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{e}; expected a duration such as \"90s\", \"10m\" or \"2h\""))
}

/// Parses a byte size ("4 MiB", "512KiB", "65536").
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    match t.parse::<bytesize::ByteSize>() {
        Ok(b) if t.starts_with(|c: char| c.is_ascii_digit()) && b.as_u64() != u64::MAX => {
            Ok(b.as_u64())
        }
        _ => Err(
            "expected a size such as \"4 MiB\", \"512 KiB\" or a whole number of bytes".to_owned(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("trunkfarm-agent").chain(args.iter().copied()))
    }

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn enroll_arguments() {
        let cli = parse(&["enroll", "tf1_abc", "--name", "box", "--force"]).unwrap();
        let Command::Enroll(a) = cli.command else {
            panic!("not enroll");
        };
        assert_eq!(a.enrollment.as_deref(), Some("tf1_abc"));
        assert_eq!(a.name.as_deref(), Some("box"));
        assert!(a.force);
        assert!(a.state_dir.is_none());
        // The string may come from elsewhere (checked by `enroll`).
        let Command::Enroll(a) = parse(&["enroll", "--enrollment-file", "/e"])
            .unwrap()
            .command
        else {
            panic!("not enroll");
        };
        assert_eq!(a.enrollment, None);
        assert_eq!(
            a.enrollment_file.as_deref(),
            Some(std::path::Path::new("/e"))
        );
    }

    #[test]
    fn run_arguments_become_overrides() {
        let cli = parse(&[
            "run",
            "--state-dir",
            "/s",
            "--labels",
            "gpu,big-disk",
            "--max-parallel-jobs",
            "3",
            "--allow-project",
            "cpython",
            "--allow-project",
            "pypy",
            "--max-job-timeout",
            "2h",
            "--output-cap",
            "4 MiB",
            "--work-dir",
            "/w",
            "--name",
            "n",
            "--sandbox",
            "bwrap",
            "--allow-network",
            "--deny-project",
            "beta",
            "--cores",
            "2",
            "--memory",
            "8 GiB",
            "--schedule",
            "Mon-Fri 22:00-07:00",
            "--schedule",
            "Sat-Sun",
            "--only-when-idle",
        ])
        .unwrap();
        let Command::Run(a) = cli.command else {
            panic!("not run");
        };
        assert_eq!(a.state_dir.as_deref(), Some(std::path::Path::new("/s")));
        assert_eq!(
            a.overrides(),
            Overrides {
                name: Some("n".into()),
                labels: Some(vec!["gpu".into(), "big-disk".into()]),
                max_parallel_jobs: Some(3),
                allowed_projects: Some(vec!["cpython".into(), "pypy".into()]),
                max_job_timeout: Some(Duration::from_secs(7200)),
                output_cap: Some(4 * 1024 * 1024),
                work_dir: Some("/w".into()),
                sandbox: Some(SandboxMode::Bwrap),
                allow_network: Some(true),
                cores: Some(2),
                memory: Some(8 << 30),
                denied_projects: Some(vec!["beta".into()]),
                schedule: Some(vec!["Mon-Fri 22:00-07:00".into(), "Sat-Sun".into()]),
                only_when_idle: Some(true),
            }
        );
    }

    #[test]
    fn run_without_options_overrides_nothing() {
        let Command::Run(a) = parse(&["run"]).unwrap().command else {
            panic!("not run");
        };
        assert_eq!(a.overrides(), Overrides::default());
        let Command::Run(a) = parse(&["run", "--labels", ""]).unwrap().command else {
            panic!("not run");
        };
        assert_eq!(a.overrides().labels, Some(vec![]));
    }

    #[test]
    fn the_donors_commands() {
        let Command::Pause(a) = parse(&["pause", "--for", "2h", "--now", "-v"])
            .unwrap()
            .command
        else {
            panic!("not pause");
        };
        assert_eq!(a.for_, Some(Duration::from_secs(7200)));
        assert!(a.now);
        let Command::Status(a) = parse(&["status", "--json", "--state-dir", "/s"])
            .unwrap()
            .command
        else {
            panic!("not status");
        };
        assert!(a.json);
        assert_eq!(
            a.state.state_dir.as_deref(),
            Some(std::path::Path::new("/s"))
        );
        assert!(matches!(
            parse(&["resume"]).unwrap().command,
            Command::Resume(_)
        ));
        let Command::Unenroll(a) = parse(&["unenroll", "--force"]).unwrap().command else {
            panic!("not unenroll");
        };
        assert!(a.force);
        assert_eq!(a.hub, None);
        let Command::Unenroll(a) = parse(&["unenroll", "--hub", "ci"]).unwrap().command else {
            panic!("not unenroll");
        };
        assert_eq!(a.hub.as_deref(), Some("ci"));
        let Command::Hubs(a) = parse(&["hubs", "--json"]).unwrap().command else {
            panic!("not hubs");
        };
        assert!(a.json);
        assert_eq!(parse(&["-vv", "run"]).unwrap().verbose, 2);
        assert_eq!(
            parse(&["pause", "--for", "soon"]).unwrap_err().exit_code(),
            2
        );
    }

    #[test]
    fn bad_values_are_usage_errors() {
        for args in [
            &["run", "--max-job-timeout", "soon"][..],
            &["run", "--output-cap", "lots"],
            &["run", "--max-parallel-jobs", "-1"],
            &["run", "--sandbox", "off"],
        ] {
            let e = parse(args).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{args:?}");
        }
    }
}
