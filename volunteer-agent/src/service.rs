//! `trunkfarm-agent service install|uninstall`: the third of the donor's
//! three commands (install, enroll, run as a service).
//!
//! It writes a systemd unit that runs this very binary's `run` on the
//! state directory just enrolled, and asks systemd to start it now and at
//! every boot. Two scopes:
//! - **user** (the default, no root): a user unit in
//!   `~/.config/systemd/user/`, run by the donor's own user manager;
//! - **system** (`--system`, as root): the packaged, hardened unit
//!   (`config/systemd/trunkfarm-agent.service`, built into the binary) in
//!   `/etc/systemd/system/`, run as a user systemd makes for it, with its
//!   state in `/var/lib/<name>`.
//!
//! Nothing here is clever: the unit is text, systemd does the rest, and
//! when `systemctl` cannot be asked (no systemd, no user session) the unit
//! stays written and the donor is told the exact commands to run.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::lock::{self, LockError};
use crate::{EXIT_FAILURE, EXIT_LOCKED, EXIT_USAGE};

/// The unit's name, in both scopes.
pub(crate) const UNIT: &str = "trunkfarm-agent.service";

/// The packaged system unit: the `--system` unit is this text with the
/// binary's path and the state directory filled in.
const SYSTEM_UNIT: &str = include_str!("../../config/systemd/trunkfarm-agent.service");

/// Where a system service's state must live (systemd's `StateDirectory=`
/// is relative to it, and `DynamicUser=` owns only what is there).
const SYSTEM_STATE_ROOT: &str = "/var/lib";

/// The system service's state directory when none is given.
pub(crate) const SYSTEM_STATE_DIR: &str = "/var/lib/trunkfarm-agent";

/// Where the donor's systemd user units live.
fn user_unit_dir(env: &impl Fn(&str) -> Option<OsString>) -> Result<PathBuf, String> {
    let var = |name: &str| env(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(config) = var("XDG_CONFIG_HOME").filter(|p| p.is_absolute()) {
        Ok(config.join("systemd").join("user"))
    } else if let Some(home) = var("HOME") {
        Ok(home.join(".config").join("systemd").join("user"))
    } else {
        Err("cannot tell where your systemd user units go: HOME is not set".to_owned())
    }
}

/// Which service manager runs the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    /// The donor's own user manager (`systemctl --user`).
    User,
    /// The system manager, as a dynamic user (`--system`, root).
    System,
}

impl Scope {
    /// `systemctl` with this scope's flag.
    fn systemctl(self, args: &[&str]) -> Vec<String> {
        let mut argv = vec!["systemctl".to_owned()];
        if self == Scope::User {
            argv.push("--user".to_owned());
        }
        argv.extend(args.iter().map(|a| (*a).to_owned()));
        argv
    }
}

/// A unit to write and the commands that start it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    pub scope: Scope,
    pub path: PathBuf,
    pub text: String,
    /// `systemctl` invocations, in order.
    pub commands: Vec<Vec<String>>,
}

/// One argument of an `ExecStart=` or `Environment=` line, quoted as
/// systemd reads it: in double quotes, with `\` and `"` escaped and `%`
/// (a specifier) doubled.
fn quote(arg: &str) -> String {
    let mut out = String::with_capacity(arg.len() + 2);
    out.push('"');
    for c in arg.chars() {
        match c {
            '\\' | '"' => {
                out.push('\\');
                out.push(c);
            }
            '%' => out.push_str("%%"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Paths systemd and the sandbox can take as they are.
fn check_path(what: &str, path: &Path) -> Result<String, String> {
    let text = path
        .to_str()
        .ok_or_else(|| format!("{what} {} is not valid UTF-8", path.display()))?;
    if text.chars().any(char::is_control) {
        return Err(format!("{what} {text:?} holds a control character"));
    }
    Ok(text.to_owned())
}

/// The user unit: this binary's `run` on `state_dir`, drained by SIGTERM,
/// restarted when it fails, started with the donor's user manager.
fn user_unit(exe: &str, state_dir: &str) -> String {
    let mut unit = String::new();
    // Writing to a String cannot fail.
    let _ = write!(
        unit,
        "# A volunteer's trunkfarm agent, as the donor's own user service.\n\
         # Written by `trunkfarm-agent service install`; removed by\n\
         # `trunkfarm-agent service uninstall`. Settings: {state_dir}/agent.toml\n\
         [Unit]\n\
         Description=trunkfarm volunteer agent\n\
         After=network-online.target\n\
         \n\
         [Service]\n\
         ExecStart={} run --state-dir {}\n\
         # SIGTERM drains: no new job, running jobs finish (up to drain_grace), exit 0.\n\
         KillSignal=SIGTERM\n\
         KillMode=mixed\n\
         TimeoutStopSec=15min\n\
         Restart=on-failure\n\
         RestartSec=5\n\
         # Exit codes 2 to 5 (settings, refused credential or protocol, another\n\
         # agent on the state directory) need the donor: do not restart on them.\n\
         RestartPreventExitStatus=2 3 4 5\n\
         UMask=0077\n\
         NoNewPrivileges=yes\n\
         \n\
         [Install]\n\
         WantedBy=default.target\n",
        quote(exe),
        quote(state_dir),
    );
    unit
}

/// The packaged system unit with `exe` and the state directory's name
/// (under `/var/lib`) filled in.
fn system_unit(exe: &str, state_name: &str) -> String {
    let mut unit = String::with_capacity(SYSTEM_UNIT.len() + 64);
    for line in SYSTEM_UNIT.lines() {
        if line.starts_with("Environment=TRUNKFARM_AGENT_STATE_DIR=") {
            unit.push_str(&format!(
                "Environment={}",
                quote(&format!(
                    "TRUNKFARM_AGENT_STATE_DIR={SYSTEM_STATE_ROOT}/{state_name}"
                ))
            ));
        } else if line.starts_with("ExecStart=") {
            unit.push_str(&format!("ExecStart={} run", quote(exe)));
        } else if line.starts_with("StateDirectory=") {
            unit.push_str(&format!("StateDirectory={state_name}"));
        } else {
            unit.push_str(line);
        }
        unit.push('\n');
    }
    unit
}

/// What `service install` would do for `state_dir` in `scope`, running
/// `exe`; an error says what to change.
pub(crate) fn plan(
    scope: Scope,
    exe: &Path,
    state_dir: &Path,
    env: impl Fn(&str) -> Option<OsString>,
) -> Result<Plan, String> {
    let exe_text = check_path("the agent binary", exe)?;
    let dir_text = check_path("the state directory", state_dir)?;
    let (path, text) = match scope {
        Scope::User => (
            user_unit_dir(&env)?.join(UNIT),
            user_unit(&exe_text, &dir_text),
        ),
        Scope::System => {
            let name = state_dir
                .strip_prefix(SYSTEM_STATE_ROOT)
                .ok()
                .and_then(|rest| {
                    let mut parts = rest.components();
                    match (parts.next(), parts.next()) {
                        (Some(std::path::Component::Normal(name)), None) => name.to_str(),
                        _ => None,
                    }
                })
                .ok_or_else(|| {
                    format!(
                        "a system service keeps its state in a directory right under \
                         {SYSTEM_STATE_ROOT} (systemd's StateDirectory=), not in {dir_text}: \
                         enroll there (`sudo trunkfarm-agent enroll - --state-dir \
                         {SYSTEM_STATE_DIR}`) and run `sudo trunkfarm-agent service install \
                         --system --state-dir {SYSTEM_STATE_DIR}`, or install a user service \
                         (without --system)"
                    )
                })?;
            // ProtectHome=yes hides /home and /root from the service.
            if ["/home", "/root", "/run/user"]
                .iter()
                .any(|hidden| exe.starts_with(hidden))
            {
                return Err(format!(
                    "the system service cannot run {exe_text}: it hides /home and /root \
                     (ProtectHome=yes); copy the binary first (`sudo install -m 0755 {exe_text} \
                     /usr/local/bin/`) and run `sudo /usr/local/bin/trunkfarm-agent service \
                     install --system`"
                ));
            }
            (
                Path::new("/etc/systemd/system").join(UNIT),
                system_unit(&exe_text, name),
            )
        }
    };
    Ok(Plan {
        scope,
        path,
        text,
        commands: vec![
            scope.systemctl(&["daemon-reload"]),
            scope.systemctl(&["enable", "--now", UNIT]),
        ],
    })
}

/// Runs one `systemctl` invocation; its error output when it fails.
fn run(argv: &[String]) -> Result<(), String> {
    let (program, args) = argv.split_first().ok_or("an empty command")?;
    match Command::new(program).args(args).output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "`{}` failed ({}): {}",
            argv.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(format!(
            "`{}` failed: {program} is not installed (this machine does not run systemd?)",
            argv.join(" ")
        )),
        Err(e) => Err(format!("`{}` failed: {e}", argv.join(" "))),
    }
}

/// Shell words for the donor to copy.
fn shell_line(argv: &[String]) -> String {
    argv.join(" ")
}

/// The scope's checks before anything is written: enrolled, no agent
/// running on the state directory (the service would be refused its
/// lock), root for a system unit.
fn preflight(scope: Scope, state_dir: &Path) -> Result<(), u8> {
    if let Err(e) = crate::hubs::enrolled(state_dir) {
        eprintln!("error: {e}");
        return Err(EXIT_USAGE);
    }
    // Taken and released at once: only to know nobody holds it.
    match lock::acquire(state_dir, "service install") {
        Ok(_lock) => {}
        Err(e @ LockError::Held { .. }) => {
            eprintln!(
                "error: {e}; stop it first (Ctrl-C, or `kill -TERM` its pid): the service \
                 takes over the state directory"
            );
            return Err(EXIT_LOCKED);
        }
        Err(e) => {
            eprintln!("error: {e}");
            return Err(EXIT_FAILURE);
        }
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if scope == Scope::System && unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "error: a system service is installed as root: run it with sudo, or install a user \
             service (without --system)"
        );
        return Err(EXIT_USAGE);
    }
    Ok(())
}

/// `trunkfarm-agent service install`.
pub(crate) fn install(scope: Scope, state_dir: &Path, print: bool) -> u8 {
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("error: cannot tell where this binary is: {e}");
            return EXIT_FAILURE;
        }
    };
    let plan = match plan(scope, &exe, state_dir, |k| std::env::var_os(k)) {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_USAGE;
        }
    };
    if print {
        println!("# {}", plan.path.display());
        print!("{}", plan.text);
        for argv in &plan.commands {
            println!("# then: {}", shell_line(argv));
        }
        return 0;
    }
    if let Err(code) = preflight(scope, state_dir) {
        return code;
    }
    if let Some(parent) = plan.path.parent()
        && let Err(e) = std::fs::create_dir_all(parent)
    {
        eprintln!("error: cannot create {}: {e}", parent.display());
        return EXIT_FAILURE;
    }
    if let Err(e) = crate::state::write_atomic(&plan.path, plan.text.as_bytes(), 0o644) {
        eprintln!("error: cannot write {}: {e}", plan.path.display());
        return EXIT_FAILURE;
    }
    println!("Wrote {}.", plan.path.display());
    for argv in &plan.commands {
        if let Err(e) = run(argv) {
            let rest: Vec<String> = plan.commands.iter().map(|a| shell_line(a)).collect();
            eprintln!(
                "error: {e}\nThe unit is written; start it yourself with: {}",
                rest.join(" && ")
            );
            return EXIT_FAILURE;
        }
    }
    match scope {
        Scope::User => {
            println!(
                "The agent runs as your user service {UNIT}: `systemctl --user status {UNIT}`, \
                 its log: `journalctl --user -u {UNIT}`."
            );
            if !lingering() {
                println!(
                    "It stops when you log out and starts when you log in; to run it from boot \
                     without a login: sudo loginctl enable-linger $USER"
                );
            }
        }
        Scope::System => println!(
            "The agent runs as the system service {UNIT}: `systemctl status {UNIT}`, its log: \
             `journalctl -u {UNIT}`."
        ),
    }
    println!(
        "`trunkfarm-agent status --state-dir {}` shows what it does.",
        state_dir.display()
    );
    0
}

/// Whether the donor's user manager runs without a login (`loginctl
/// enable-linger`); unknown counts as no (the advice is harmless).
fn lingering() -> bool {
    let user = std::env::var("USER").unwrap_or_default();
    if user.is_empty() {
        return false;
    }
    Command::new("loginctl")
        .args(["show-user", &user, "--property=Linger", "--value"])
        .output()
        .map(|out| out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "yes")
        .unwrap_or(false)
}

/// `trunkfarm-agent service uninstall`: stops and disables the service and
/// removes its unit; the state directory (enrollment, settings) stays.
pub(crate) fn uninstall(scope: Scope) -> u8 {
    let path = match scope {
        Scope::User => match user_unit_dir(&|k| std::env::var_os(k)) {
            Ok(dir) => dir.join(UNIT),
            Err(e) => {
                eprintln!("error: {e}");
                return EXIT_USAGE;
            }
        },
        Scope::System => Path::new("/etc/systemd/system").join(UNIT),
    };
    if !path.exists() {
        eprintln!(
            "error: no {} service is installed ({} does not exist){}",
            if scope == Scope::User {
                "user"
            } else {
                "system"
            },
            path.display(),
            if scope == Scope::User {
                "; for a system service add --system"
            } else {
                ""
            }
        );
        return EXIT_USAGE;
    }
    let stopped = run(&scope.systemctl(&["disable", "--now", UNIT]));
    if let Err(e) = std::fs::remove_file(&path) {
        eprintln!("error: cannot remove {}: {e}", path.display());
        return EXIT_FAILURE;
    }
    println!("Removed {}.", path.display());
    let reloaded = run(&scope.systemctl(&["daemon-reload"]));
    match stopped.and(reloaded) {
        Ok(()) => {
            println!(
                "The service is stopped and will not start again; the enrollment stays (leave \
                 the hub with `trunkfarm-agent unenroll`)."
            );
            0
        }
        Err(e) => {
            eprintln!(
                "error: {e}\nThe unit is removed; if the service still runs, stop it with: {}",
                shell_line(&scope.systemctl(&["stop", UNIT]))
            );
            EXIT_FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<OsString> {
        move |k| {
            pairs
                .iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn a_user_unit_runs_this_binary_on_the_state_dir() {
        let p = plan(
            Scope::User,
            Path::new("/home/d/.cargo/bin/trunkfarm-agent"),
            Path::new("/home/d/.local/state/trunkfarm-agent"),
            env(&[("HOME", "/home/d")]),
        )
        .expect("plan");
        assert_eq!(
            p.path,
            Path::new("/home/d/.config/systemd/user/trunkfarm-agent.service")
        );
        assert!(p.text.contains(
            "ExecStart=\"/home/d/.cargo/bin/trunkfarm-agent\" run --state-dir \
             \"/home/d/.local/state/trunkfarm-agent\"\n"
        ));
        assert!(p.text.contains("WantedBy=default.target"));
        assert_eq!(
            p.commands,
            vec![
                vec!["systemctl", "--user", "daemon-reload"],
                vec!["systemctl", "--user", "enable", "--now", UNIT]
            ]
        );
        // XDG_CONFIG_HOME wins when absolute, and is ignored when relative.
        let xdg = plan_path(&[("HOME", "/h"), ("XDG_CONFIG_HOME", "/cfg")]);
        assert_eq!(xdg, Path::new("/cfg/systemd/user/trunkfarm-agent.service"));
        let relative = plan_path(&[("HOME", "/h"), ("XDG_CONFIG_HOME", "cfg")]);
        assert_eq!(
            relative,
            Path::new("/h/.config/systemd/user/trunkfarm-agent.service")
        );
        assert!(plan(Scope::User, Path::new("/a"), Path::new("/s"), env(&[])).is_err());
    }

    fn plan_path(pairs: &'static [(&'static str, &'static str)]) -> PathBuf {
        plan(Scope::User, Path::new("/a"), Path::new("/s"), env(pairs))
            .expect("plan")
            .path
    }

    #[test]
    fn odd_paths_are_quoted_for_systemd() {
        assert_eq!(quote(r#"/a b/%h\"x"#), r#""/a b/%%h\\\"x""#);
        let p = plan(
            Scope::User,
            Path::new("/opt/my tools/trunkfarm-agent"),
            Path::new("/srv/100%/state"),
            env(&[("HOME", "/h")]),
        )
        .expect("plan");
        assert!(p.text.contains(
            "ExecStart=\"/opt/my tools/trunkfarm-agent\" run --state-dir \"/srv/100%%/state\""
        ));
        let control = plan(
            Scope::User,
            Path::new("/a"),
            Path::new("/s\nExecStartPre=/bin/evil"),
            env(&[("HOME", "/h")]),
        );
        assert!(control.expect_err("refused").contains("control character"));
    }

    #[test]
    fn a_system_unit_is_the_packaged_one_filled_in() {
        let p = plan(
            Scope::System,
            Path::new("/usr/local/bin/trunkfarm-agent"),
            Path::new("/var/lib/tf-box"),
            env(&[]),
        )
        .expect("plan");
        assert_eq!(
            p.path,
            Path::new("/etc/systemd/system/trunkfarm-agent.service")
        );
        assert!(
            p.text
                .contains("ExecStart=\"/usr/local/bin/trunkfarm-agent\" run\n")
        );
        assert!(p.text.contains("StateDirectory=tf-box\n"));
        assert!(
            p.text
                .contains("Environment=\"TRUNKFARM_AGENT_STATE_DIR=/var/lib/tf-box\"\n")
        );
        assert!(p.text.contains("DynamicUser=yes\n"));
        assert!(!p.text.contains("/usr/local/bin/trunkfarm-agent run\n"));
        assert_eq!(p.commands[1], vec!["systemctl", "enable", "--now", UNIT]);
        // Everything else of the packaged unit is kept as it is.
        assert_eq!(p.text.lines().count(), SYSTEM_UNIT.lines().count());
    }

    #[test]
    fn a_system_unit_refuses_what_it_could_not_run() {
        let elsewhere = plan(
            Scope::System,
            Path::new("/usr/local/bin/trunkfarm-agent"),
            Path::new("/home/d/.local/state/trunkfarm-agent"),
            env(&[]),
        )
        .expect_err("refused");
        assert!(elsewhere.contains("right under /var/lib"), "{elsewhere}");
        let nested = plan(
            Scope::System,
            Path::new("/usr/local/bin/trunkfarm-agent"),
            Path::new("/var/lib/a/b"),
            env(&[]),
        );
        assert!(nested.is_err());
        let home_binary = plan(
            Scope::System,
            Path::new("/root/.cargo/bin/trunkfarm-agent"),
            Path::new(SYSTEM_STATE_DIR),
            env(&[]),
        )
        .expect_err("refused");
        assert!(
            home_binary.contains("sudo install -m 0755"),
            "{home_binary}"
        );
    }
}
