//! `[[pool]]` entries: on-demand agents the hub starts when work waits and
//! stops when idle.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use trunkfarm_proto::settings::{Problem, fmt_duration};

use super::de;

/// How a pool's instances are started and stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ProvisionerKind {
    /// `trunkfarm-agent` processes on the hub's own machine.
    Local,
    /// The operator's start/stop scripts (KVM, libvirt, a private cloud...).
    Command,
    /// The EC2 API (or an EC2-compatible cloud).
    Ec2,
}

/// The user `local` pool agents run as when the hub runs as root.
pub(crate) const DEFAULT_POOL_USER: &str = "trunkfarm-pool";

/// `[[pool]] sandbox`: the `--sandbox` a `local` pool's agents run with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub(crate) enum AgentSandbox {
    /// bubblewrap where it works; without it the agent refuses every job.
    #[default]
    Auto,
    /// bubblewrap, or the agent does not start.
    Bwrap,
    /// No sandbox: jobs run with the agent's rights.
    None,
}

impl AgentSandbox {
    /// The value of `trunkfarm-agent run --sandbox`.
    pub(crate) fn as_arg(self) -> &'static str {
        match self {
            AgentSandbox::Auto => "auto",
            AgentSandbox::Bwrap => "bwrap",
            AgentSandbox::None => "none",
        }
    }
}

/// `[[pool]]`: one group of on-demand agents.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [[pool]] table")]
pub(crate) struct PoolConfig {
    /// Short name (`[A-Za-z0-9._-]`), also used in instance names and tags.
    pub(crate) name: String,
    /// `"local"`, `"command"` or `"ec2"`.
    pub(crate) provisioner: ProvisionerKind,
    /// Labels its agents carry (besides their platform labels): jobs whose
    /// labels they cover make the pool grow.
    #[serde(default)]
    pub(crate) labels: Vec<String>,
    /// Instances kept running even when idle.
    #[serde(default, deserialize_with = "de::count")]
    pub(crate) min_instances: u32,
    /// Never more instances than this.
    #[serde(default = "default_max", deserialize_with = "de::count")]
    pub(crate) max_instances: u32,
    /// A matching job waiting this long with no idle matching agent starts an instance.
    #[serde(default = "default_grace", deserialize_with = "de::duration")]
    pub(crate) pending_grace: Duration,
    /// An instance idle this long is stopped (down to `min_instances`).
    #[serde(default = "default_idle", deserialize_with = "de::duration")]
    pub(crate) idle_timeout: Duration,
    /// An instance whose agent has not connected this long after its start
    /// is terminated and counted as a failed start.
    #[serde(default = "default_missing", deserialize_with = "de::duration")]
    pub(crate) missing_timeout: Duration,
    /// After this many jobs an instance is replaced by a fresh one (0: never).
    #[serde(default, deserialize_with = "de::count")]
    pub(crate) max_jobs_per_instance: u32,
    /// Failed starts back off, doubling from 10s up to this.
    #[serde(default = "default_backoff", deserialize_with = "de::duration")]
    pub(crate) start_backoff_max: Duration,
    /// Jobs one instance runs at once.
    #[serde(default = "default_parallel", deserialize_with = "de::count")]
    pub(crate) max_parallel_jobs: u32,
    /// `command`: the script that starts an instance. It gets the bootstrap
    /// data in its environment (`TRUNKFARM_ENROLLMENT`, `TRUNKFARM_POOL`,
    /// `TRUNKFARM_INSTANCE_NAME`, `TRUNKFARM_LABELS`,
    /// `TRUNKFARM_MAX_PARALLEL_JOBS`) beside the little it keeps of the
    /// hub's (see `pass_env`), and prints the instance id as its last line
    /// of output.
    pub(crate) start_command: Option<String>,
    /// `command`: the script that stops one; gets `TRUNKFARM_INSTANCE_ID`.
    pub(crate) stop_command: Option<String>,
    /// `command`: how long either script may run.
    #[serde(default = "default_command_timeout", deserialize_with = "de::duration")]
    pub(crate) command_timeout: Duration,
    /// `command`: variables of the hub's environment the scripts get too
    /// (e.g. `["LIBVIRT_DEFAULT_URI"]`); every other is removed, so the
    /// hub's secrets do not reach an agent a script starts.
    #[serde(default)]
    pub(crate) pass_env: Vec<String>,
    /// `local`: the agent binary (default: `trunkfarm-agent` beside
    /// `trunkfarm`, else on PATH).
    pub(crate) agent_binary: Option<PathBuf>,
    /// `local`: the user the agents run as when the hub runs as root
    /// (default [`DEFAULT_POOL_USER`]); a hub running as any other user
    /// cannot switch, and its agents run as itself.
    pub(crate) user: Option<String>,
    /// `local`: where the instances' state dirs (credential, work dirs,
    /// cache) are (default `<data_dir>-pools/<name>`); never inside the
    /// data dir, whose secrets their jobs must not reach.
    pub(crate) dir: Option<PathBuf>,
    /// `local`: how the agents confine their jobs (`trunkfarm-agent run
    /// --sandbox`): `"auto"` (default), `"bwrap"` or `"none"`.
    #[serde(default)]
    pub(crate) sandbox: AgentSandbox,
    /// `ec2`: the settings of the EC2 API and the instances.
    #[serde(default)]
    pub(crate) ec2: Option<Ec2Section>,
}

/// `[pool.ec2]`: where and how instances are started on EC2 (or an
/// EC2-compatible cloud).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [pool.ec2] table")]
pub(crate) struct Ec2Section {
    /// The region, e.g. `"eu-west-1"`.
    pub(crate) region: String,
    /// The API endpoint (default `https://ec2.<region>.amazonaws.com`);
    /// another for EC2-compatible clouds.
    pub(crate) endpoint: Option<String>,
    /// The image to boot (any image with cloud-init: nothing is prepared in it).
    pub(crate) ami: String,
    /// The instance type, e.g. `"c6i.large"`.
    pub(crate) instance_type: String,
    /// The subnet to start in.
    pub(crate) subnet_id: Option<String>,
    /// Security groups.
    #[serde(default)]
    pub(crate) security_group_ids: Vec<String>,
    /// An SSH key pair name, for debugging.
    pub(crate) key_name: Option<String>,
    /// A cloud-init user-data template (default: the embedded
    /// `config/cloud-init/agent.sh`); see it for the placeholders.
    pub(crate) user_data_template: Option<PathBuf>,
    /// Where the instance downloads `trunkfarm-agent` from (used by the template).
    #[serde(default)]
    pub(crate) agent_url: String,
    /// Extra tags on every instance.
    #[serde(default)]
    pub(crate) tags: std::collections::BTreeMap<String, String>,
}

fn default_max() -> u32 {
    4
}
fn default_grace() -> Duration {
    Duration::from_secs(30)
}
fn default_idle() -> Duration {
    Duration::from_secs(10 * 60)
}
fn default_missing() -> Duration {
    Duration::from_secs(5 * 60)
}
fn default_backoff() -> Duration {
    Duration::from_secs(30 * 60)
}
fn default_parallel() -> u32 {
    1
}
fn default_command_timeout() -> Duration {
    Duration::from_secs(5 * 60)
}

impl PoolConfig {
    /// `local`: where the instances' state dirs are (`dir`, else
    /// `<data_dir>-pools/<name>`: beside the data dir, not in it).
    pub(crate) fn local_dir(&self, data_dir: &Path) -> PathBuf {
        if let Some(dir) = &self.dir {
            return dir.clone();
        }
        let mut sibling = data_dir.file_name().unwrap_or_default().to_owned();
        sibling.push("-pools");
        data_dir
            .parent()
            .unwrap_or(Path::new("/"))
            .join(sibling)
            .join(&self.name)
    }
}

/// Checks the pools' rules; `data_dir` is the hub's (absolute).
pub(super) fn problems(pools: &[PoolConfig], data_dir: &Path) -> Result<(), Problem> {
    let mut names = HashSet::new();
    for (i, p) in pools.iter().enumerate() {
        let at = |key: &str| format!("pool[{i}].{key}");
        let ok_name = !p.name.is_empty()
            && p.name.len() <= 32
            && p.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !ok_name {
            return Err(Problem::new(
                at("name"),
                format!(
                    "{:?} is not a valid pool name; expected 1 to 32 characters from A-Z, a-z, 0-9, '.', '_' and '-'",
                    p.name
                ),
            ));
        }
        if !names.insert(p.name.as_str()) {
            return Err(Problem::new(
                at("name"),
                format!(
                    "two pools are named {:?}; give each a different name",
                    p.name
                ),
            ));
        }
        if p.max_instances < p.min_instances {
            return Err(Problem::new(
                at("max_instances"),
                format!(
                    "pool {:?} has max_instances = {}, less than min_instances = {}",
                    p.name, p.max_instances, p.min_instances
                ),
            ));
        }
        if p.max_parallel_jobs == 0 {
            return Err(Problem::new(at("max_parallel_jobs"), "must be at least 1"));
        }
        for (key, d) in [
            ("idle_timeout", p.idle_timeout),
            ("missing_timeout", p.missing_timeout),
            ("start_backoff_max", p.start_backoff_max),
            ("command_timeout", p.command_timeout),
        ] {
            if d < Duration::from_millis(100) {
                return Err(Problem::new(
                    at(key),
                    format!("{} is too short; expected e.g. \"5m\"", fmt_duration(d)),
                ));
            }
        }
        for label in &p.labels {
            if label.is_empty() || label.chars().any(|c| c.is_whitespace() || c == ',') {
                return Err(Problem::new(
                    at("labels"),
                    format!("{label:?} is not a valid label: no spaces or commas, not empty"),
                ));
            }
        }
        match p.provisioner {
            ProvisionerKind::Command => {
                for (key, v) in [
                    ("start_command", &p.start_command),
                    ("stop_command", &p.stop_command),
                ] {
                    if v.as_deref().is_none_or(|c| c.trim().is_empty()) {
                        return Err(Problem::new(
                            at(key),
                            format!(
                                "a pool with provisioner = \"command\" needs `{key}`: the script that {} an instance",
                                if key == "start_command" {
                                    "starts"
                                } else {
                                    "stops"
                                }
                            ),
                        ));
                    }
                }
            }
            ProvisionerKind::Local | ProvisionerKind::Ec2 => {
                for (key, set) in [
                    ("start_command", p.start_command.is_some()),
                    ("stop_command", p.stop_command.is_some()),
                    ("pass_env", !p.pass_env.is_empty()),
                ] {
                    if set {
                        return Err(Problem::new(
                            at(key),
                            format!("`{key}` is only for provisioner = \"command\""),
                        ));
                    }
                }
            }
        }
        for name in &p.pass_env {
            let ok = !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                return Err(Problem::new(
                    at("pass_env"),
                    format!("{name:?} is not an environment variable's name (A-Z, a-z, 0-9, '_')"),
                ));
            }
        }
        if p.provisioner == ProvisionerKind::Local {
            if let Some(user) = &p.user {
                if user.is_empty() || user == "root" || user.contains(['/', ':', '\0']) {
                    return Err(Problem::new(
                        at("user"),
                        format!(
                            "{user:?} cannot run pool agents: name an unprivileged user (default \
                             {DEFAULT_POOL_USER:?})"
                        ),
                    ));
                }
            }
            let dir = std::path::absolute(p.local_dir(data_dir)).unwrap_or_default();
            if dir.starts_with(data_dir) || data_dir.starts_with(&dir) {
                return Err(Problem::new(
                    at("dir"),
                    format!(
                        "{} overlaps the hub's data dir {}: its agents' jobs could reach the \
                         hub's secrets; choose a directory outside it (the default is \
                         <data_dir>-pools/<name>)",
                        dir.display(),
                        data_dir.display()
                    ),
                ));
            }
        } else {
            for (key, set) in [
                ("agent_binary", p.agent_binary.is_some()),
                ("user", p.user.is_some()),
                ("dir", p.dir.is_some()),
                ("sandbox", p.sandbox != AgentSandbox::default()),
            ] {
                if set {
                    return Err(Problem::new(
                        at(key),
                        format!("`{key}` is only for provisioner = \"local\""),
                    ));
                }
            }
        }
        match (p.provisioner, &p.ec2) {
            (ProvisionerKind::Ec2, None) => {
                return Err(Problem::new(
                    at("provisioner"),
                    format!(
                        "pool {:?} uses provisioner = \"ec2\" but has no [pool.ec2] table (region, ami, instance_type)",
                        p.name
                    ),
                ));
            }
            (ProvisionerKind::Ec2, Some(e)) => {
                for (key, v) in [
                    ("ec2.region", &e.region),
                    ("ec2.ami", &e.ami),
                    ("ec2.instance_type", &e.instance_type),
                ] {
                    if v.trim().is_empty() {
                        return Err(Problem::new(at(key), "must not be empty"));
                    }
                }
                if let Some(url) = &e.endpoint {
                    if !(url.starts_with("http://") || url.starts_with("https://")) {
                        return Err(Problem::new(
                            at("ec2.endpoint"),
                            format!("{url:?} is not an http(s) URL"),
                        ));
                    }
                }
            }
            (_, Some(_)) => {
                return Err(Problem::new(
                    at("ec2"),
                    "a [pool.ec2] table is only for provisioner = \"ec2\"",
                ));
            }
            (_, None) => {}
        }
    }
    Ok(())
}
