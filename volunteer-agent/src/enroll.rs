//! `trunkfarm-agent enroll`: trades the enrollment string's one-time token
//! for this machine's own credential, and stores it.
//!
//! Everything that can be checked locally (the string, the name, the state
//! directory, an existing credential) is checked before the hub is called,
//! because the call consumes the token.

use std::ffi::OsString;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tonic::Code;
use trunkfarm_proto::PROTOCOL_VERSION;
use trunkfarm_proto::dial::{self, DialOptions, HubTrust};
use trunkfarm_proto::enrollment::Enrollment;
use trunkfarm_proto::shell::quote as shell_quote;
use trunkfarm_proto::v1::EnrollRequest;
use trunkfarm_proto::v1::agent_service_client::AgentServiceClient;

use crate::cli::EnrollArgs;
use crate::config::{AgentConfig, Overrides};
use crate::credential::Credential;
use crate::hubs;
use crate::state;

/// How long the hub may take to answer the enrollment.
const ENROLL_TIMEOUT: Duration = Duration::from_secs(30);

/// Why enrolling failed; the message is printed as is.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EnrollError {
    /// Fixable by the volunteer without the hub: a bad string, a name, an
    /// existing credential (exit code 2).
    #[error("{0}")]
    Usage(String),
    /// The hub could not be reached, refused, or the credential could not be
    /// saved (exit code 1).
    #[error("{0}")]
    Failed(String),
}

/// A successful enrollment, for the summary printed to the volunteer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Enrolled {
    /// The new agent id.
    pub agent_id: String,
    /// The name the agent enrolled under.
    pub name: String,
    /// The hub address.
    pub hub: String,
    /// The state directory holding the credential.
    pub state_dir: PathBuf,
    /// The hub's name on this machine.
    pub hub_name: String,
    /// How many other hubs this machine serves.
    pub other_hubs: usize,
}

impl Enrolled {
    /// The two lines printed on success.
    pub fn summary(&self) -> String {
        let also = match self.other_hubs {
            0 => String::new(),
            n => format!(
                " (hub name `{}`; this machine now serves {} hubs, see `trunkfarm-agent hubs`)",
                self.hub_name,
                n + 1
            ),
        };
        format!(
            "enrolled as {} (\"{}\") with hub {}{also}\nstart it with: trunkfarm-agent run --state-dir {}",
            self.agent_id,
            self.name,
            self.hub,
            shell_quote(&self.state_dir.display().to_string())
        )
    }
}

/// The environment variable `enroll` takes the enrollment string from when
/// neither an argument nor `--enrollment-file` gives it.
pub(crate) const ENROLLMENT_ENV: &str = "TRUNKFARM_ENROLLMENT";

/// The most read from standard input or a file for the enrollment string
/// (a string is a few hundred bytes).
const MAX_ENROLLMENT_READ: u64 = 64 * 1024;

/// The enrollment string from exactly one of its sources: the argument
/// (`-`: the first line of `stdin`), `--enrollment-file`, or `env` (the
/// value of [`ENROLLMENT_ENV`]; empty counts as unset). A process's
/// arguments are world-readable (`/proc/<pid>/cmdline`, `ps`); its
/// environment and standard input are not, which is why a program starting
/// the agent should use them.
pub(crate) fn enrollment_string(
    args: &EnrollArgs,
    env: Option<OsString>,
    stdin: impl BufRead,
) -> Result<String, EnrollError> {
    let env = env.filter(|v| !v.is_empty());
    let mut given = Vec::new();
    if args.enrollment.is_some() {
        given.push("the argument");
    }
    if args.enrollment_file.is_some() {
        given.push("--enrollment-file");
    }
    if env.is_some() {
        given.push(ENROLLMENT_ENV);
    }
    let (text, from) = match (&args.enrollment, &args.enrollment_file, env) {
        _ if given.len() > 1 => {
            return Err(EnrollError::Usage(format!(
                "the enrollment string was given {} ways ({}); give it exactly one way",
                given.len(),
                given.join(", ")
            )));
        }
        (Some(arg), _, _) if arg == "-" => (first_line(stdin)?, "standard input".to_owned()),
        (Some(arg), _, _) => (arg.clone(), "the argument".to_owned()),
        (_, Some(path), _) => {
            let file = std::fs::File::open(path).map_err(|e| {
                EnrollError::Usage(format!(
                    "cannot read the enrollment file {}: {e}",
                    path.display()
                ))
            })?;
            (
                first_line(std::io::BufReader::new(file))?,
                path.display().to_string(),
            )
        }
        (_, _, Some(value)) => (
            value
                .into_string()
                .map_err(|_| EnrollError::Usage(format!("{ENROLLMENT_ENV} is not valid UTF-8")))?,
            ENROLLMENT_ENV.to_owned(),
        ),
        (None, None, None) => {
            return Err(EnrollError::Usage(format!(
                "no enrollment string: pass `-` and give it on standard input, \
                 --enrollment-file PATH, the environment variable {ENROLLMENT_ENV}, or the \
                 string itself as the argument (it then shows in `ps` while the agent enrolls)"
            )));
        }
    };
    let text = text.trim();
    if text.is_empty() {
        return Err(EnrollError::Usage(format!(
            "the enrollment string from {from} is empty; ask the hub's operator for one \
             (`trunkfarm token create`)"
        )));
    }
    Ok(text.to_owned())
}

/// The first line of `input` (at most [`MAX_ENROLLMENT_READ`] bytes).
fn first_line(input: impl BufRead) -> Result<String, EnrollError> {
    let mut line = String::new();
    input
        .take(MAX_ENROLLMENT_READ)
        .read_line(&mut line)
        .map_err(|e| EnrollError::Usage(format!("cannot read the enrollment string: {e}")))?;
    Ok(line)
}

/// Enrolls this machine with the hub named by the `enrollment` string (see
/// [`enrollment_string`]), storing the credential in `state_dir`.
pub(crate) async fn enroll(
    enrollment: &str,
    args: &EnrollArgs,
    state_dir: &Path,
) -> Result<Enrolled, EnrollError> {
    let enrollment =
        Enrollment::parse(enrollment).map_err(|e| EnrollError::Usage(e.to_string()))?;
    let name = match &args.name {
        Some(name) => name.clone(),
        None => hostname().unwrap_or_default(),
    };
    if args.name.is_some() {
        AgentConfig::default()
            .apply(Overrides {
                name: Some(name.clone()),
                ..Overrides::default()
            })
            .map_err(|e| EnrollError::Usage(e.to_string()))?;
    }

    let hub_name = match &args.hub_name {
        Some(given) => {
            hubs::check_name(given).map_err(EnrollError::Usage)?;
            given.clone()
        }
        None => hubs::default_name(&enrollment.hub),
    };
    let (dir, hub_name, others) = target(state_dir, &enrollment.hub, hub_name, args.force)?;
    let cred_path = Credential::path(&dir);
    // Fail on an unusable state directory now, not after spending the token.
    state::create_private_dir(&dir).map_err(|e| {
        EnrollError::Usage(format!(
            "cannot create the state directory {}: {e}",
            dir.display()
        ))
    })?;

    let trust = match &enrollment.ca_sha256 {
        Some(sha256) => HubTrust::PinnedCa {
            sha256: sha256.clone(),
        },
        None => HubTrust::Plaintext,
    };
    if trust == HubTrust::Plaintext {
        tracing::warn!(hub = %enrollment.hub, "this hub is reached without TLS (plaintext)");
    }
    let opts = DialOptions::default();
    let channel = dial::connect(&enrollment.hub, &trust, &opts)
        .await
        .map_err(|e| EnrollError::Failed(e.to_string()))?;
    let mut client = AgentServiceClient::new(channel)
        .max_decoding_message_size(opts.max_message_bytes)
        .max_encoding_message_size(opts.max_message_bytes);
    let request = EnrollRequest {
        token: enrollment.token.clone(),
        name: name.clone(),
        protocol_version: PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let response = tokio::time::timeout(ENROLL_TIMEOUT, client.enroll(request))
        .await
        .map_err(|_| {
            EnrollError::Failed(format!(
                "the hub at {} did not answer within {}s; try again later",
                enrollment.hub,
                ENROLL_TIMEOUT.as_secs()
            ))
        })?
        .map_err(|status| EnrollError::Failed(status_message(&status)))?
        .into_inner();

    let agent_id = response.agent_id;
    // The hub may return the bare secret or the whole `<id>.<secret>`.
    let secret = response
        .secret
        .strip_prefix(&format!("{agent_id}."))
        .unwrap_or(&response.secret)
        .to_owned();
    if agent_id.is_empty() || agent_id.contains('.') || secret.is_empty() {
        return Err(EnrollError::Failed(format!(
            "the hub at {} answered the enrollment without a usable credential; ask its operator \
             to check the hub's version",
            enrollment.hub
        )));
    }
    let credential = Credential {
        hub: enrollment.hub.clone(),
        agent_id: agent_id.clone(),
        secret,
        ca_sha256: enrollment.ca_sha256.clone(),
        enrolled_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        name: (!name.is_empty()).then(|| name.clone()),
        labels: response.labels,
        hub_name: Some(hub_name.clone()),
    };
    if credential.bearer().is_err() {
        return Err(EnrollError::Failed(format!(
            "the hub at {} issued a credential this agent cannot use; ask its operator to check \
             the hub's version",
            enrollment.hub
        )));
    }
    credential.save(&dir).map_err(|e| {
        EnrollError::Failed(format!(
            "the hub enrolled this machine as {agent_id}, but its credential could not be saved \
             to {}: {e}; fix that, then ask the hub's operator for a new enrollment string (and \
             to revoke {agent_id})",
            cred_path.display()
        ))
    })?;
    if args.force {
        // Results the previous identity had not delivered can no longer be:
        // the hub only takes a job's result from the agent holding it.
        let _ = std::fs::remove_dir_all(dir.join("results"));
    }
    tracing::debug!(credential = ?credential, "saved the agent's credential");
    Ok(Enrolled {
        name: if name.is_empty() {
            agent_id.clone()
        } else {
            name
        },
        agent_id,
        hub: enrollment.hub,
        state_dir: state_dir.to_path_buf(),
        hub_name,
        other_hubs: others,
    })
}

/// Where the credential for the hub at `address` goes, its name, and how
/// many other hubs stay enrolled: the state directory itself for the first
/// hub, `hubs/<name>/` for another; the same hub again only with `force`
/// (it then becomes a new agent for that hub, in the same place).
fn target(
    state_dir: &Path,
    address: &str,
    name: String,
    force: bool,
) -> Result<(PathBuf, String, usize), EnrollError> {
    let enrolled = match hubs::list(state_dir) {
        Ok(enrolled) => enrolled,
        // A damaged credential is replaced only when asked to: the first
        // hub's, or the one of the hub of this name.
        Err(e) if force => {
            let named = state_dir.join(hubs::HUBS_DIR).join(&name);
            let damaged = |dir: &Path| {
                std::fs::symlink_metadata(Credential::path(dir)).is_ok()
                    && Credential::load(dir).is_err()
            };
            if damaged(state_dir) {
                return Ok((state_dir.to_path_buf(), name, 0));
            }
            if damaged(&named) {
                return Ok((named, name, 0));
            }
            return Err(EnrollError::Usage(e.to_string()));
        }
        Err(e) => return Err(EnrollError::Usage(e.to_string())),
    };
    let others = enrolled.len().saturating_sub(1);
    if let Some(same) = enrolled.iter().find(|h| h.credential.hub == address) {
        if force {
            return Ok((same.dir.clone(), same.name.clone(), others));
        }
        return Err(EnrollError::Usage(format!(
            "this machine is already enrolled as {} with hub {} (hub name `{}`, credential in \
             {}); to replace it with a new agent, run the same command with --force",
            same.credential.agent_id,
            same.credential.hub,
            same.name,
            Credential::path(&same.dir).display()
        )));
    }
    if let Some(clash) = enrolled.iter().find(|h| h.name == name) {
        return Err(EnrollError::Usage(format!(
            "a hub named `{name}` is enrolled already (at {}); give this one another name with \
             --hub-name NAME",
            clash.credential.hub
        )));
    }
    if enrolled.is_empty() {
        Ok((state_dir.to_path_buf(), name, 0))
    } else {
        Ok((
            state_dir.join(hubs::HUBS_DIR).join(&name),
            name,
            enrolled.len(),
        ))
    }
}

/// What to print for a status the hub returned: its message (the hub's
/// messages say what to do), or the code when it sent none.
pub(crate) fn status_message(status: &tonic::Status) -> String {
    if status.message().is_empty() {
        format!("the hub answered: {}", status.code().description())
    } else if status.code() == Code::Unavailable || status.code() == Code::Unknown {
        format!("the hub could not be reached: {}", status.message())
    } else {
        status.message().to_owned()
    }
}

/// This machine's host name: `/proc/sys/kernel/hostname`, else `uname`.
pub(crate) fn hostname() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .or_else(uname_nodename)?;
    // Keep it a valid agent name (1 to 64 printable characters).
    let name: String = name.chars().filter(|c| !c.is_control()).take(64).collect();
    (!name.trim().is_empty()).then_some(name)
}

/// The node name from `uname(2)`.
fn uname_nodename() -> Option<String> {
    // SAFETY: `utsname` is plain old data (arrays of c_char), valid zeroed.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname(2) writes into the struct we own and nothing else.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return None;
    }
    let bytes: Vec<u8> = uts
        .nodename
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    let name = String::from_utf8_lossy(&bytes).trim().to_owned();
    (!name.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credential::CredentialError;

    #[test]
    fn summary_lines() {
        let e = Enrolled {
            agent_id: "ag_1".into(),
            name: "box".into(),
            hub: "hub:7443".into(),
            state_dir: "/var/lib/ta".into(),
            hub_name: "hub-7443".into(),
            other_hubs: 0,
        };
        assert_eq!(
            e.summary(),
            "enrolled as ag_1 (\"box\") with hub hub:7443\nstart it with: trunkfarm-agent run \
             --state-dir /var/lib/ta"
        );
        let e = Enrolled {
            state_dir: "/home/me/my state".into(),
            ..e
        };
        assert!(e.summary().ends_with("--state-dir '/home/me/my state'"));
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn a_host_name_is_found() {
        let name = hostname().expect("a host name");
        assert!(!name.is_empty() && name.chars().count() <= 64);
        assert!(uname_nodename().is_some());
    }

    #[test]
    fn status_messages() {
        assert_eq!(
            status_message(&tonic::Status::permission_denied("token expired 3h ago")),
            "token expired 3h ago"
        );
        assert_eq!(
            status_message(&tonic::Status::unavailable("connection reset")),
            "the hub could not be reached: connection reset"
        );
        assert!(status_message(&tonic::Status::internal("")).starts_with("the hub answered: "));
    }

    fn args(force: bool) -> EnrollArgs {
        EnrollArgs {
            enrollment: None,
            enrollment_file: None,
            name: Some("box".into()),
            state_dir: None,
            force,
            hub_name: None,
        }
    }

    /// `enrollment_string` with `arg`, `file`, `env` and `stdin`.
    fn from(
        arg: Option<&str>,
        file: Option<&Path>,
        env: Option<&str>,
        stdin: &str,
    ) -> Result<String, EnrollError> {
        let a = EnrollArgs {
            enrollment: arg.map(str::to_owned),
            enrollment_file: file.map(Path::to_path_buf),
            ..args(false)
        };
        enrollment_string(&a, env.map(OsString::from), stdin.as_bytes())
    }

    #[test]
    fn the_enrollment_string_comes_from_exactly_one_source() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("enrollment");
        std::fs::write(&file, "tf1_file\nignored second line\n").unwrap();
        let ok = |r: Result<String, EnrollError>| r.unwrap();
        assert_eq!(ok(from(Some("tf1_arg"), None, None, "")), "tf1_arg");
        assert_eq!(ok(from(Some("-"), None, None, " tf1_in \nmore")), "tf1_in");
        assert_eq!(ok(from(None, Some(&file), None, "")), "tf1_file");
        assert_eq!(ok(from(None, None, Some("tf1_env\n"), "")), "tf1_env");
        // An empty variable is no source: the argument alone is given.
        assert_eq!(ok(from(Some("tf1_arg"), None, Some(""), "")), "tf1_arg");

        let usage = |r: Result<String, EnrollError>| match r {
            Err(EnrollError::Usage(m)) => m,
            other => panic!("not a usage error: {other:?}"),
        };
        let none = usage(from(None, None, None, "tf1_unasked"));
        assert!(none.starts_with("no enrollment string"), "{none}");
        assert!(none.contains("--enrollment-file") && none.contains(ENROLLMENT_ENV));
        let two = usage(from(Some("tf1_a"), None, Some("tf1_b"), ""));
        assert!(
            two.contains("2 ways (the argument, TRUNKFARM_ENROLLMENT)"),
            "{two}"
        );
        let three = usage(from(Some("-"), Some(&file), Some("tf1_b"), ""));
        assert!(three.contains("3 ways"), "{three}");
        let empty = usage(from(Some("-"), None, None, "\n"));
        assert!(empty.contains("from standard input is empty"), "{empty}");
        let missing = usage(from(None, Some(&dir.path().join("nope")), None, ""));
        assert!(
            missing.contains("cannot read the enrollment file"),
            "{missing}"
        );
        // No message repeats a string it was given.
        assert!(!two.contains("tf1_") && !three.contains("tf1_"));
    }

    /// A string for a hub on a port nothing listens on.
    fn unreachable_enrollment() -> String {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Enrollment {
            hub: format!("127.0.0.1:{port}"),
            token: "tok_1.supersecret".into(),
            ca_sha256: Some("ab".repeat(32)),
        }
        .encode()
    }

    #[test]
    fn another_hub_is_added_under_hubs_and_the_same_hub_twice_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path();
        // The first hub goes at the top, as before several hubs.
        let (dir, name, others) = target(state, "a.example:1", "a".into(), false).unwrap();
        assert_eq!((dir.as_path(), name.as_str(), others), (state, "a", 0));
        let cred = |hub: &str, name: &str| Credential {
            hub: hub.into(),
            agent_id: "ag_1".into(),
            secret: "s3cr3t-Value_0123456789abcdefghijklmnopqrstu".into(),
            ca_sha256: None,
            enrolled_at: "2025-01-02T03:04:05Z".into(),
            name: None,
            labels: Vec::new(),
            hub_name: Some(name.into()),
        };
        cred("a.example:1", "a").save(state).unwrap();
        // Another hub goes under hubs/<name>.
        let (dir, name, others) = target(state, "b.example:2", "b".into(), false).unwrap();
        assert_eq!(dir, state.join("hubs").join("b"));
        assert_eq!((name.as_str(), others), ("b", 1));
        // The same hub again: refused, unless replaced with --force (in place).
        let e = target(state, "a.example:1", "a2".into(), false).unwrap_err();
        assert!(matches!(e, EnrollError::Usage(_)), "{e}");
        assert!(
            e.to_string()
                .contains("already enrolled as ag_1 with hub a.example:1")
                && e.to_string().contains("--force"),
            "{e}"
        );
        let (dir, name, _) = target(state, "a.example:1", "a2".into(), true).unwrap();
        assert_eq!((dir.as_path(), name.as_str()), (state, "a"));
        // A name taken by another hub: refused, saying how to choose one.
        let e = target(state, "c.example:3", "a".into(), false).unwrap_err();
        assert!(e.to_string().contains("--hub-name"), "{e}");
    }

    #[tokio::test]
    async fn local_problems_are_usage_errors_found_before_dialing() {
        let dir = tempfile::tempdir().unwrap();
        let e = enroll("nonsense", &args(false), dir.path())
            .await
            .unwrap_err();
        assert!(matches!(e, EnrollError::Usage(_)), "{e}");
        assert!(e.to_string().contains("tf1_"), "{e}");

        let mut a = args(false);
        a.name = Some(" ".into());
        let e = enroll(&unreachable_enrollment(), &a, dir.path())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("invalid `name`"), "{e}");

        std::fs::write(Credential::path(dir.path()), b"{}").unwrap();
        let e = enroll(&unreachable_enrollment(), &args(false), dir.path())
            .await
            .unwrap_err();
        assert!(matches!(e, EnrollError::Usage(_)), "{e}");
        assert!(e.to_string().contains("--force"), "{e}");

        // With --force it gets as far as the hub, which is not there; the
        // token's secret is in no message.
        let e = enroll(&unreachable_enrollment(), &args(true), dir.path())
            .await
            .unwrap_err();
        assert!(matches!(e, EnrollError::Failed(_)), "{e}");
        assert!(!e.to_string().contains("supersecret"), "{e}");
        // The old credential is untouched by a failed enrollment.
        assert!(matches!(
            Credential::load(dir.path()),
            Err(CredentialError::Invalid { .. })
        ));
    }
}
