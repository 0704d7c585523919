//! The donor's settings: what this machine offers the farm and on what terms.
//!
//! They live in a TOML file (by default `<state_dir>/agent.toml`, optional;
//! `config/agent.example.toml` lists every key) and command-line options
//! override them after loading ([`AgentConfig::apply`]). Parsing is strict on
//! purpose: a donor who writes `max_paralel_jobs = 1` must hear about the typo
//! rather than lend the whole machine. Every error names the file (or the
//! command line), the key and, when TOML gives one, the line.
//!
//! Units: durations are [`std::time::Duration`], written as human strings
//! (`"90s"`, `"10m"`, `"1h 30m"`); byte sizes are `u64` byte counts, written
//! as human strings (`"4 MiB"`) or a whole number of bytes. Relative paths in
//! the file are resolved against the file's directory; relative paths given on
//! the command line stay relative to the working directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use trunkfarm_proto::settings::{self, Problem, check_path, de, fmt_bytes, fmt_duration};

pub(crate) use trunkfarm_proto::settings::ConfigError;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

/// The smallest `[cache] size` accepted: below it hardly any runtime fits.
const MIN_CACHE_BYTES: u64 = 64 * MIB;

/// The smallest `[cache] max_unpacked_size` accepted.
const MIN_UNPACKED_BYTES: u64 = MIB;

/// The smallest `job_memory` accepted.
const MIN_JOB_MEMORY: u64 = 64 * MIB;

/// The fewest `job_processes` accepted.
const MIN_JOB_PROCESSES: u32 = 16;

/// The smallest `job_disk` accepted.
const MIN_JOB_DISK: u64 = 16 * MIB;

/// The fewest `job_open_files` accepted.
const MIN_JOB_OPEN_FILES: u32 = 64;

/// The donor's settings after defaults, path resolution and validation.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table of agent settings")]
pub(crate) struct AgentConfig {
    /// The file the settings came from, for messages; `None` when there was
    /// no file (all defaults) or the text came from elsewhere.
    #[serde(skip)]
    pub source: Option<PathBuf>,
    /// The name shown for this machine in the hub's `agent list`; `None`
    /// means the host name.
    pub name: Option<String>,
    /// Labels the donor advertises (`[A-Za-z0-9._-]+` each), matched against
    /// jobs' label requirements; the enrollment token may grant more.
    pub labels: Vec<String>,
    /// How many jobs may run at once on this machine (at least 1).
    #[serde(deserialize_with = "de::count")]
    pub max_parallel_jobs: u32,
    /// Projects the donor accepts jobs from; empty means any project.
    pub allowed_projects: Vec<String>,
    /// Projects the donor never runs jobs of (checked after
    /// `allowed_projects`).
    pub denied_projects: Vec<String>,
    /// The donor's ceiling on any one job's run time, on top of the job's
    /// own timeout; `None` means no ceiling of the donor's own.
    #[serde(deserialize_with = "de::opt_duration")]
    pub max_job_timeout: Option<Duration>,
    /// CPU cores offered to the farm; `None`: every core this process may
    /// use. Told to the hub (never more than there are) and held by the
    /// jobs' CPU affinity.
    #[serde(deserialize_with = "opt_count")]
    pub cores: Option<u32>,
    /// Memory offered to the farm, all jobs together; `None`: the machine's.
    /// Told to the hub (never more than there is) and held by capping each
    /// job's `job_memory` at this divided by `max_parallel_jobs`.
    #[serde(deserialize_with = "opt_bytes")]
    pub memory: Option<u64>,
    /// When the machine takes work, in windows of the week (`limits.rs`):
    /// `["Mon-Fri 22:00-07:00", "Sat-Sun"]`; empty means any time.
    pub schedule: Vec<String>,
    /// The time zone `schedule` is read in (an IANA name such as
    /// "Europe/Berlin"); `None`: the system's.
    pub timezone: Option<String>,
    /// Take work only while the machine is idle: its load under `idle_load`
    /// per core and no terminal used for `idle_for`.
    pub only_when_idle: bool,
    /// `only_when_idle`: the highest 1-minute load average per core (less
    /// the agent's own running jobs) that counts as idle.
    pub idle_load: f64,
    /// `only_when_idle`: how long no terminal (ttys, ssh sessions) must have
    /// been used; "0s" looks at the load only.
    #[serde(deserialize_with = "de::duration")]
    pub idle_for: Duration,
    /// `only_when_idle`: how often the load and terminals are looked at.
    #[serde(deserialize_with = "de::duration")]
    pub idle_check: Duration,
    /// For tests: the load average is read from this file (the format of
    /// `/proc/loadavg`) instead of `/proc/loadavg`.
    pub loadavg_file: Option<PathBuf>,
    /// Log bytes kept per job (head and tail; the middle is cut), at least
    /// 4 KiB.
    #[serde(deserialize_with = "de::byte_size")]
    pub output_cap: u64,
    /// Where jobs' checkouts and scratch files go; `None` means a directory
    /// under the agent's state directory.
    pub work_dir: Option<PathBuf>,
    /// On shutdown, how long running jobs may finish before they are killed.
    #[serde(deserialize_with = "de::duration")]
    pub drain_grace: Duration,
    /// The longest wait between attempts to reach an unreachable hub.
    #[serde(deserialize_with = "de::duration")]
    pub reconnect_max_backoff: Duration,
    /// How jobs are confined: `auto` (bubblewrap when it works here,
    /// otherwise no job is accepted), `bwrap` (bubblewrap or the agent does
    /// not start) or `none` (jobs run with this agent's rights).
    pub sandbox: SandboxMode,
    /// Whether a job whose project asks for network access (`network = true`
    /// on the hub) gets it; without this, sandboxed jobs have no network.
    pub allow_network: bool,
    /// The most memory one job's processes may use together (a cgroup where
    /// the agent can make one; otherwise each process's address space).
    #[serde(deserialize_with = "de::byte_size")]
    pub job_memory: u64,
    /// The most processes (and threads) one job may have at once.
    #[serde(deserialize_with = "de::count")]
    pub job_processes: u32,
    /// The most disk one job may use in its work directory and `/tmp`
    /// together; also the largest file it may write.
    #[serde(deserialize_with = "de::byte_size")]
    pub job_disk: u64,
    /// The most files one process of a job may have open.
    #[serde(deserialize_with = "de::count")]
    pub job_open_files: u32,
    /// `[cache]`: where downloaded runtime artifacts are kept and how much
    /// disk they may take.
    pub cache: CacheConfig,
    /// `[hubs.NAME]`: one hub's share of the slots and its own limits, by
    /// the hub's name on this machine (`trunkfarm-agent hubs`).
    pub hubs: BTreeMap<String, HubConfig>,
}

/// `[hubs.NAME]`: what one hub gets when this machine serves several.
/// Limits left out are the top-level ones.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [hubs.NAME] table")]
pub(crate) struct HubConfig {
    /// Its share of the slots while other hubs have work too (at least 1;
    /// a hub with share 2 gets twice the slots of a hub with share 1).
    #[serde(deserialize_with = "de::count")]
    pub share: u32,
    /// Jobs of this hub's that may run at once (at most `max_parallel_jobs`).
    #[serde(deserialize_with = "de::opt_count")]
    pub max_parallel_jobs: Option<u32>,
    /// Projects accepted from this hub (replaces `allowed_projects`).
    pub allowed_projects: Option<Vec<String>>,
    /// Projects refused from this hub (replaces `denied_projects`).
    pub denied_projects: Option<Vec<String>>,
    /// The ceiling on this hub's jobs' run time (replaces `max_job_timeout`).
    #[serde(deserialize_with = "de::opt_duration")]
    pub max_job_timeout: Option<Duration>,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            share: 1,
            max_parallel_jobs: None,
            allowed_projects: None,
            denied_projects: None,
            max_job_timeout: None,
        }
    }
}

/// One hub's terms: `[hubs.NAME]` merged over the top-level keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HubTerms {
    /// Its share of the slots.
    pub share: u32,
    /// Its jobs at once (at most the machine's `max_parallel_jobs`).
    pub max_parallel_jobs: u32,
    /// Projects accepted from it; empty: any.
    pub allowed_projects: Vec<String>,
    /// Projects refused from it.
    pub denied_projects: Vec<String>,
    /// The ceiling on its jobs' run time.
    pub max_job_timeout: Option<Duration>,
}

/// `sandbox`: how the agent confines a job (see the README's sandbox
/// section for what each mode protects).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(
    rename_all = "lowercase",
    expecting = "\"auto\", \"bwrap\" or \"none\""
)]
pub(crate) enum SandboxMode {
    /// bubblewrap when it is installed and works; otherwise every job is
    /// refused (a stranger's code never runs unconfined by accident).
    #[default]
    Auto,
    /// bubblewrap; the agent does not start without a working one.
    Bwrap,
    /// No sandbox: chosen explicitly, warned about at every start.
    None,
}

impl std::str::FromStr for SandboxMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "auto" => Ok(SandboxMode::Auto),
            "bwrap" => Ok(SandboxMode::Bwrap),
            "none" => Ok(SandboxMode::None),
            other => Err(format!(
                "{other:?} is not a sandbox mode; expected \"auto\", \"bwrap\" or \"none\""
            )),
        }
    }
}

/// `[cache]`: the artifact cache. Test jobs run against a runtime (an
/// interpreter, a compiler) built by an earlier job; the agent downloads it
/// once and keeps it, so each runtime crosses the network once per machine,
/// not once per job.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [cache] table")]
pub(crate) struct CacheConfig {
    /// Where artifacts are kept; `None` means `<state_dir>/cache/artifacts`.
    pub dir: Option<PathBuf>,
    /// The most disk the kept artifacts (compressed) may take; the least
    /// recently used are deleted to make room. At least 64 MiB.
    #[serde(deserialize_with = "de::byte_size")]
    pub size: u64,
    /// The most one artifact may take once unpacked into a job's directory:
    /// a bound against an archive that expands to fill the disk. At least
    /// 1 MiB.
    #[serde(deserialize_with = "de::byte_size")]
    pub max_unpacked_size: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            dir: None,
            size: 10 * GIB,
            max_unpacked_size: 16 * GIB,
        }
    }
}

impl CacheConfig {
    /// The directory artifacts are kept in, given the agent's state directory.
    pub fn dir_or_default(&self, state_dir: &Path) -> PathBuf {
        self.dir
            .clone()
            .unwrap_or_else(|| state_dir.join("cache").join("artifacts"))
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            source: None,
            name: None,
            labels: Vec::new(),
            max_parallel_jobs: 1,
            allowed_projects: Vec::new(),
            denied_projects: Vec::new(),
            max_job_timeout: None,
            cores: None,
            memory: None,
            schedule: Vec::new(),
            timezone: None,
            only_when_idle: false,
            idle_load: 0.5,
            idle_for: Duration::from_secs(10 * 60),
            idle_check: Duration::from_secs(30),
            loadavg_file: None,
            output_cap: 4 * MIB,
            work_dir: None,
            drain_grace: Duration::from_secs(10 * 60),
            reconnect_max_backoff: Duration::from_secs(60),
            sandbox: SandboxMode::Auto,
            allow_network: false,
            job_memory: 4 * GIB,
            job_processes: 1024,
            job_disk: 10 * GIB,
            job_open_files: 4096,
            cache: CacheConfig::default(),
            hubs: BTreeMap::new(),
        }
    }
}

/// Command-line options that override the file, one per setting a donor is
/// likely to change for a single run; `None` leaves the file's value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Overrides {
    /// Overrides `cores`.
    pub cores: Option<u32>,
    /// Overrides `memory`, in bytes.
    pub memory: Option<u64>,
    /// Replaces `denied_projects`.
    pub denied_projects: Option<Vec<String>>,
    /// Replaces `schedule`.
    pub schedule: Option<Vec<String>>,
    /// Overrides `only_when_idle`.
    pub only_when_idle: Option<bool>,
    /// Overrides `name`.
    pub name: Option<String>,
    /// Replaces `labels` (not added to them).
    pub labels: Option<Vec<String>>,
    /// Overrides `max_parallel_jobs`.
    pub max_parallel_jobs: Option<u32>,
    /// Replaces `allowed_projects`.
    pub allowed_projects: Option<Vec<String>>,
    /// Overrides `max_job_timeout`.
    pub max_job_timeout: Option<Duration>,
    /// Overrides `output_cap`, in bytes.
    pub output_cap: Option<u64>,
    /// Overrides `work_dir`; a relative path stays relative to the working
    /// directory.
    pub work_dir: Option<PathBuf>,
    /// Overrides `sandbox`.
    pub sandbox: Option<SandboxMode>,
    /// Overrides `allow_network`.
    pub allow_network: Option<bool>,
}

/// [`de::count`] for a setting that may be left out.
fn opt_count<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    de::count(d).map(Some)
}

/// [`de::byte_size`] for a setting that may be left out.
fn opt_bytes<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    de::byte_size(d).map(Some)
}

impl AgentConfig {
    /// One job's memory ceiling: `job_memory`, within the donor's `memory`
    /// shared by `max_parallel_jobs` jobs (so together they never pass it).
    pub fn job_memory_offered(&self) -> u64 {
        match self.memory {
            Some(memory) => self
                .job_memory
                .min(memory / u64::from(self.max_parallel_jobs.max(1))),
            None => self.job_memory,
        }
    }

    /// Where jobs' work directories go: `work_dir`, or `<state_dir>/work`.
    pub fn work_root(&self, state_dir: &Path) -> PathBuf {
        self.work_dir
            .clone()
            .unwrap_or_else(|| state_dir.join("work"))
    }

    /// The terms of the hub named `hub`: its `[hubs.NAME]` over the
    /// top-level keys.
    pub fn hub_terms(&self, hub: &str) -> HubTerms {
        let own = self.hubs.get(hub).cloned().unwrap_or_default();
        HubTerms {
            share: own.share.max(1),
            max_parallel_jobs: own
                .max_parallel_jobs
                .unwrap_or(self.max_parallel_jobs)
                .min(self.max_parallel_jobs),
            allowed_projects: own
                .allowed_projects
                .unwrap_or_else(|| self.allowed_projects.clone()),
            denied_projects: own
                .denied_projects
                .unwrap_or_else(|| self.denied_projects.clone()),
            max_job_timeout: own.max_job_timeout.or(self.max_job_timeout),
        }
    }

    /// Reads, parses and validates the settings file. A missing file gives the
    /// defaults unless `must_exist` (the donor named the file explicitly, so
    /// its absence is a mistake to report).
    pub fn load(path: &Path, must_exist: bool) -> Result<AgentConfig, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::from_toml(&text, Some(path)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => {
                Ok(AgentConfig::default())
            }
            Err(error) => Err(ConfigError::Read {
                path: path.to_path_buf(),
                error,
            }),
        }
    }

    /// Parses and validates settings text. `origin` is the file it came from:
    /// named in messages, and the base for relative paths.
    pub fn from_toml(text: &str, origin: Option<&Path>) -> Result<AgentConfig, ConfigError> {
        let file = origin.map(Path::to_path_buf);
        let doc = settings::document(text, &file)?;
        let mut config: AgentConfig = settings::deserialize(text, &doc, &file)?;
        config.source = file.clone();
        config
            .check_paths()
            .map_err(|p| p.into_error(&file, text, &doc))?;
        if let Some(base) = origin.and_then(Path::parent) {
            for dir in [
                &mut config.work_dir,
                &mut config.cache.dir,
                &mut config.loadavg_file,
            ]
            .into_iter()
            .flatten()
            {
                if dir.is_relative() {
                    *dir = base.join(&*dir);
                }
            }
        }
        config
            .problems()
            .map_err(|p| p.into_error(&file, text, &doc))?;
        Ok(config)
    }

    /// Applies command-line overrides and validates the result. On error the
    /// settings are left unchanged; the error blames the command line when an
    /// overridden setting is at fault, otherwise the file.
    pub fn apply(&mut self, o: Overrides) -> Result<(), ConfigError> {
        let mut next = self.clone();
        let mut overridden: Vec<&'static str> = Vec::new();
        if let Some(v) = o.name {
            next.name = Some(v);
            overridden.push("name");
        }
        if let Some(v) = o.labels {
            next.labels = v;
            overridden.push("labels");
        }
        if let Some(v) = o.max_parallel_jobs {
            next.max_parallel_jobs = v;
            overridden.push("max_parallel_jobs");
        }
        if let Some(v) = o.allowed_projects {
            next.allowed_projects = v;
            overridden.push("allowed_projects");
        }
        if let Some(v) = o.max_job_timeout {
            next.max_job_timeout = Some(v);
            overridden.push("max_job_timeout");
        }
        if let Some(v) = o.cores {
            next.cores = Some(v);
            overridden.push("cores");
        }
        if let Some(v) = o.memory {
            next.memory = Some(v);
            overridden.push("memory");
        }
        if let Some(v) = o.denied_projects {
            next.denied_projects = v;
            overridden.push("denied_projects");
        }
        if let Some(v) = o.schedule {
            next.schedule = v;
            overridden.push("schedule");
        }
        if let Some(v) = o.only_when_idle {
            next.only_when_idle = v;
            overridden.push("only_when_idle");
        }
        if let Some(v) = o.output_cap {
            next.output_cap = v;
            overridden.push("output_cap");
        }
        if let Some(v) = o.work_dir {
            next.work_dir = Some(v);
            overridden.push("work_dir");
        }
        if let Some(v) = o.sandbox {
            next.sandbox = v;
            overridden.push("sandbox");
        }
        if let Some(v) = o.allow_network {
            next.allow_network = v;
            overridden.push("allow_network");
        }
        next.check_paths()
            .and_then(|()| next.problems())
            .map_err(|p| {
                if overridden.contains(&p.key.as_ref()) {
                    ConfigError::Override {
                        key: p.key.to_string(),
                        message: p.message,
                    }
                } else {
                    ConfigError::Invalid {
                        file: next.source.clone(),
                        line: None,
                        key: p.key.to_string(),
                        message: p.message,
                    }
                }
            })?;
        *self = next;
        Ok(())
    }

    fn check_paths(&self) -> Result<(), Problem> {
        if let Some(path) = &self.work_dir {
            check_path("work_dir", path)?;
        }
        if let Some(path) = &self.cache.dir {
            check_path("cache.dir", path)?;
        }
        if let Some(path) = &self.loadavg_file {
            check_path("loadavg_file", path)?;
        }
        Ok(())
    }

    /// The semantic rules, in key order; the first broken one is reported.
    fn problems(&self) -> Result<(), Problem> {
        if let Some(name) = &self.name
            && (name.trim().is_empty()
                || name.chars().count() > 64
                || name.chars().any(char::is_control))
        {
            return Err(Problem::new(
                "name",
                format!(
                    "{name:?} is not a usable name; expected 1 to 64 printable characters, e.g. \"alice-workstation\""
                ),
            ));
        }
        for label in &self.labels {
            let ok = !label.is_empty()
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            if !ok {
                return Err(Problem::new(
                    "labels",
                    format!(
                        "{label:?} is not a valid label; expected letters, digits, '.', '_' and '-' only, e.g. \"gpu\" or \"linux-x86_64\""
                    ),
                ));
            }
        }
        if self.max_parallel_jobs < 1 {
            return Err(Problem::new(
                "max_parallel_jobs",
                "must be at least 1 (to stop taking jobs, stop or drain the agent)",
            ));
        }
        for project in &self.allowed_projects {
            if project.is_empty() || project.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(Problem::new(
                    "allowed_projects",
                    format!(
                        "{project:?} is not a valid project name; expected a non-empty name without spaces (an empty list allows every project)"
                    ),
                ));
            }
        }
        for project in &self.denied_projects {
            if project.is_empty() || project.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(Problem::new(
                    "denied_projects",
                    format!(
                        "{project:?} is not a valid project name; expected a non-empty name without spaces"
                    ),
                ));
            }
            if self.allowed_projects.contains(project) {
                return Err(Problem::new(
                    "denied_projects",
                    format!("{project:?} is in allowed_projects too; keep it in one of the two"),
                ));
            }
        }
        if self.max_job_timeout.is_some_and(|d| d.is_zero()) {
            return Err(Problem::new(
                "max_job_timeout",
                "must be greater than zero, e.g. \"2h\" (leave it out for no ceiling of your own)",
            ));
        }
        if self.cores == Some(0) {
            return Err(Problem::new(
                "cores",
                "must be at least 1 (to stop taking jobs, pause or stop the agent)",
            ));
        }
        if let Some(memory) = self.memory
            && memory < MIN_JOB_MEMORY.saturating_mul(u64::from(self.max_parallel_jobs))
        {
            return Err(Problem::new(
                "memory",
                format!(
                    "{} is too small; expected at least {} for each of max_parallel_jobs ({}), e.g. \"8 GiB\"",
                    fmt_bytes(memory),
                    fmt_bytes(MIN_JOB_MEMORY),
                    self.max_parallel_jobs
                ),
            ));
        }
        let zone = crate::limits::time_zone(self.timezone.as_deref())
            .map_err(|e| Problem::new("timezone", e))?;
        crate::limits::Schedule::parse(&self.schedule, zone)
            .map_err(|e| Problem::new("schedule", e.to_string()))?;
        if !(self.idle_load.is_finite() && self.idle_load > 0.0) {
            return Err(Problem::new(
                "idle_load",
                format!(
                    "{} is not a load per core; expected a number above 0, e.g. 0.5 (half the cores busy)",
                    self.idle_load
                ),
            ));
        }
        if self.idle_check < Duration::from_secs(1) {
            return Err(Problem::new(
                "idle_check",
                format!(
                    "{} is too short; expected at least 1s, e.g. \"30s\"",
                    fmt_duration(self.idle_check)
                ),
            ));
        }
        if self.output_cap < 4 * KIB {
            return Err(Problem::new(
                "output_cap",
                format!(
                    "{} is too small; expected at least 4 KiB so a failure's log keeps its head and tail",
                    fmt_bytes(self.output_cap)
                ),
            ));
        }
        if self.reconnect_max_backoff < Duration::from_secs(1) {
            return Err(Problem::new(
                "reconnect_max_backoff",
                format!(
                    "{} is too short; expected at least 1s so an unreachable hub is not hammered",
                    fmt_duration(self.reconnect_max_backoff)
                ),
            ));
        }
        if self.job_memory < MIN_JOB_MEMORY {
            return Err(Problem::new(
                "job_memory",
                format!(
                    "{} is too small; expected at least {} so a shell and a test runner fit, e.g. \"4 GiB\"",
                    fmt_bytes(self.job_memory),
                    fmt_bytes(MIN_JOB_MEMORY)
                ),
            ));
        }
        if self.job_processes < MIN_JOB_PROCESSES {
            return Err(Problem::new(
                "job_processes",
                format!(
                    "{} is too few; expected at least {MIN_JOB_PROCESSES} (the sandbox and the job's shell count too), e.g. 1024",
                    self.job_processes
                ),
            ));
        }
        if self.job_disk < MIN_JOB_DISK {
            return Err(Problem::new(
                "job_disk",
                format!(
                    "{} is too small; expected at least {} for a checkout and its build, e.g. \"10 GiB\"",
                    fmt_bytes(self.job_disk),
                    fmt_bytes(MIN_JOB_DISK)
                ),
            ));
        }
        if self.job_open_files < MIN_JOB_OPEN_FILES {
            return Err(Problem::new(
                "job_open_files",
                format!(
                    "{} is too few; expected at least {MIN_JOB_OPEN_FILES}, e.g. 4096",
                    self.job_open_files
                ),
            ));
        }
        for (name, hub) in &self.hubs {
            crate::hubs::check_name(name).map_err(|e| Problem::new(format!("hubs.{name}"), e))?;
            if hub.share < 1 {
                return Err(Problem::new(
                    format!("hubs.{name}.share"),
                    "must be at least 1 (a hub with share 2 gets twice the slots of one with \
                     share 1; to take no work from a hub, unenroll it)",
                ));
            }
            if hub.max_parallel_jobs.is_some_and(|n| n < 1) {
                return Err(Problem::new(
                    format!("hubs.{name}.max_parallel_jobs"),
                    "must be at least 1 (leave it out for the machine's max_parallel_jobs)",
                ));
            }
            for project in hub.allowed_projects.iter().flatten() {
                if project.is_empty()
                    || project.chars().any(|c| c.is_whitespace() || c.is_control())
                {
                    return Err(Problem::new(
                        format!("hubs.{name}.allowed_projects"),
                        format!(
                            "{project:?} is not a valid project name; expected a non-empty name \
                             without spaces (an empty list allows every project)"
                        ),
                    ));
                }
            }
            if hub.max_job_timeout.is_some_and(|d| d.is_zero()) {
                return Err(Problem::new(
                    format!("hubs.{name}.max_job_timeout"),
                    "must be greater than zero, e.g. \"2h\"",
                ));
            }
        }
        if self.cache.size < MIN_CACHE_BYTES {
            return Err(Problem::new(
                "cache.size",
                format!(
                    "{} is too small; expected at least {} so a runtime artifact fits, e.g. \"10 GiB\"",
                    fmt_bytes(self.cache.size),
                    fmt_bytes(MIN_CACHE_BYTES)
                ),
            ));
        }
        if self.cache.max_unpacked_size < MIN_UNPACKED_BYTES {
            return Err(Problem::new(
                "cache.max_unpacked_size",
                format!(
                    "{} is too small; expected at least {}, e.g. \"16 GiB\"",
                    fmt_bytes(self.cache.max_unpacked_size),
                    fmt_bytes(MIN_UNPACKED_BYTES)
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../config/agent.example.toml");
    const FILE: &str = "/home/donor/.local/state/trunkfarm/agent.toml";

    fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        AgentConfig::from_toml(text, Some(Path::new(FILE)))
    }

    fn err(text: &str) -> String {
        match parse(text) {
            Ok(c) => panic!("expected an error for {text:?}, got {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn defaults_from_file() -> AgentConfig {
        AgentConfig {
            source: Some(PathBuf::from(FILE)),
            ..AgentConfig::default()
        }
    }

    /// Uncomments every `#key = value` line of the example file.
    fn uncommented(example: &str) -> String {
        example
            .lines()
            .map(|l| match l.strip_prefix('#') {
                Some(rest) if rest.starts_with(|c: char| c.is_ascii_lowercase()) => rest,
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn defaults() {
        let c = AgentConfig::default();
        assert_eq!(c.source, None);
        assert_eq!(c.name, None);
        assert!(c.labels.is_empty());
        assert_eq!(c.max_parallel_jobs, 1);
        assert!(c.allowed_projects.is_empty());
        assert_eq!(c.max_job_timeout, None);
        assert_eq!(c.output_cap, 4 * 1024 * 1024);
        assert_eq!(c.work_dir, None);
        assert_eq!(c.drain_grace, Duration::from_secs(600));
        assert_eq!(c.reconnect_max_backoff, Duration::from_secs(60));
        assert_eq!(c.cache.dir, None);
        assert_eq!(c.cache.size, 10 << 30);
        assert_eq!(c.cache.max_unpacked_size, 16 << 30);
        assert_eq!(
            c.cache.dir_or_default(Path::new("/s")),
            Path::new("/s/cache/artifacts")
        );
        assert_eq!(parse("").unwrap(), defaults_from_file());
        assert_eq!(
            AgentConfig::from_toml("", None).unwrap(),
            AgentConfig::default()
        );
    }

    #[test]
    fn example_file_parses_to_the_defaults() {
        assert_eq!(parse(EXAMPLE).unwrap(), defaults_from_file());
    }

    #[test]
    fn example_file_documents_every_key_with_its_default() {
        let text = uncommented(EXAMPLE);
        let c = parse(&text).unwrap();
        let expected = AgentConfig {
            name: Some("alice-workstation".into()),
            max_job_timeout: Some(Duration::from_secs(2 * 3600)),
            cores: Some(4),
            memory: Some(8 << 30),
            timezone: Some("Europe/Berlin".into()),
            loadavg_file: Some("/proc/loadavg".into()),
            work_dir: Some("/var/tmp/trunkfarm-work".into()),
            cache: CacheConfig {
                dir: Some("/var/cache/trunkfarm-agent".into()),
                ..CacheConfig::default()
            },
            ..defaults_from_file()
        };
        assert_eq!(c, expected);
        for key in [
            "name",
            "labels",
            "max_parallel_jobs",
            "allowed_projects",
            "denied_projects",
            "max_job_timeout",
            "cores",
            "memory",
            "schedule",
            "timezone",
            "only_when_idle",
            "idle_load",
            "idle_for",
            "idle_check",
            "loadavg_file",
            "output_cap",
            "work_dir",
            "drain_grace",
            "reconnect_max_backoff",
            "sandbox",
            "allow_network",
            "job_memory",
            "job_processes",
            "job_disk",
            "job_open_files",
            "dir",
            "size",
            "max_unpacked_size",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(&format!("{key} = "))),
                "{key} is not in the example"
            );
        }
    }

    #[test]
    fn full_file() {
        let c = parse(
            r#"
name = "Alice's box"
labels = ["gpu", "linux-x86_64", "v1.2"]
max_parallel_jobs = 4
allowed_projects = ["cpython", "pypy"]
max_job_timeout = "3h"
output_cap = "8 KiB"
work_dir = "work"
drain_grace = "0s"
reconnect_max_backoff = "5m"
"#,
        )
        .unwrap();
        assert_eq!(c.source.as_deref(), Some(Path::new(FILE)));
        assert_eq!(c.name.as_deref(), Some("Alice's box"));
        assert_eq!(c.labels, ["gpu", "linux-x86_64", "v1.2"]);
        assert_eq!(c.max_parallel_jobs, 4);
        assert_eq!(c.allowed_projects, ["cpython", "pypy"]);
        assert_eq!(c.max_job_timeout, Some(Duration::from_secs(3 * 3600)));
        assert_eq!(c.output_cap, 8192);
        assert_eq!(
            c.work_dir.as_deref(),
            Some(Path::new("/home/donor/.local/state/trunkfarm/work"))
        );
        assert_eq!(c.drain_grace, Duration::ZERO);
        assert_eq!(c.reconnect_max_backoff, Duration::from_secs(300));
    }

    #[test]
    fn cache_table() {
        let c = parse(
            "[cache]\ndir = \"artifacts\"\nsize = \"2 GiB\"\nmax_unpacked_size = \"3 GiB\"\n",
        )
        .unwrap();
        assert_eq!(
            c.cache,
            CacheConfig {
                dir: Some("/home/donor/.local/state/trunkfarm/artifacts".into()),
                size: 2 << 30,
                max_unpacked_size: 3 << 30,
            }
        );
        assert_eq!(
            c.cache.dir_or_default(Path::new("/s")),
            Path::new("/home/donor/.local/state/trunkfarm/artifacts")
        );
        assert_eq!(
            err("[cache]\nsise = \"1 GiB\"\n"),
            "/home/donor/.local/state/trunkfarm/agent.toml:2: unknown key `cache.sise`, expected one of `dir`, `size`, `max_unpacked_size`"
        );
        assert_eq!(
            err("[cache]\nsize = \"1 MiB\"\n"),
            "/home/donor/.local/state/trunkfarm/agent.toml:2: invalid `cache.size`: 1.0 MiB is too small; expected at least 64.0 MiB so a runtime artifact fits, e.g. \"10 GiB\""
        );
        assert_eq!(
            err("[cache]\nmax_unpacked_size = 1000\n"),
            "/home/donor/.local/state/trunkfarm/agent.toml:2: invalid `cache.max_unpacked_size`: 1000 B is too small; expected at least 1.0 MiB, e.g. \"16 GiB\""
        );
        assert_eq!(
            err("[cache]\ndir = \"~/c\"\n"),
            "/home/donor/.local/state/trunkfarm/agent.toml:2: invalid `cache.dir`: ~/c starts with `~`, which is not expanded here; write the full path"
        );
        assert_eq!(
            err("[cache]\nsize = \"lots\"\n"),
            "/home/donor/.local/state/trunkfarm/agent.toml:2: invalid value for `cache.size`: \"lots\" is not a byte size; expected a size such as \"4 MiB\", \"512 KiB\" or a whole number of bytes (units: B, KiB, MiB, GiB, or KB, MB, GB for powers of 1000)"
        );
    }

    #[test]
    fn relative_work_dir_resolves_against_the_file_directory() {
        let c = AgentConfig::from_toml(
            "work_dir = \"../w\"\n",
            Some(Path::new("/etc/ta/agent.toml")),
        )
        .unwrap();
        assert_eq!(c.work_dir.as_deref(), Some(Path::new("/etc/ta/../w")));
        let c = parse("work_dir = \"/abs/w\"\n").unwrap();
        assert_eq!(c.work_dir.as_deref(), Some(Path::new("/abs/w")));
        let c = AgentConfig::from_toml("work_dir = \"w\"\n", None).unwrap();
        assert_eq!(c.work_dir.as_deref(), Some(Path::new("w")));
    }

    #[test]
    fn load_missing_default_file_gives_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        assert_eq!(
            AgentConfig::load(&path, false).unwrap(),
            AgentConfig::default()
        );
    }

    #[test]
    fn load_missing_explicit_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        let e = AgentConfig::load(&path, true).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "cannot read config file {}: No such file or directory (os error 2)",
                path.display()
            )
        );
    }

    #[test]
    fn load_reads_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "max_parallel_jobs = 2\nwork_dir = \"w\"\n").unwrap();
        for must_exist in [false, true] {
            let c = AgentConfig::load(&path, must_exist).unwrap();
            assert_eq!(c.max_parallel_jobs, 2);
            assert_eq!(c.source.as_deref(), Some(path.as_path()));
            assert_eq!(c.work_dir, Some(dir.path().join("w")));
        }
        // A broken file is an error even when the file is optional.
        std::fs::write(&path, "max_parallel_jobs = \n").unwrap();
        let e = AgentConfig::load(&path, false).unwrap_err();
        assert!(
            matches!(e, ConfigError::Syntax { line: Some(1), .. }),
            "{e}"
        );
    }

    #[test]
    fn unknown_key_at_top_level() {
        let e = parse("labels = []\nmax_paralel_jobs = 2\n").unwrap_err();
        assert_eq!(e.key(), Some("max_paralel_jobs"));
        assert_eq!(e.line(), Some(2));
        assert_eq!(
            e.to_string(),
            "/home/donor/.local/state/trunkfarm/agent.toml:2: unknown key `max_paralel_jobs`, expected one of `name`, `labels`, `max_parallel_jobs`, `allowed_projects`, `denied_projects`, `max_job_timeout`, `cores`, `memory`, `schedule`, `timezone`, `only_when_idle`, `idle_load`, `idle_for`, `idle_check`, `loadavg_file`, `output_cap`, `work_dir`, `drain_grace`, `reconnect_max_backoff`, `sandbox`, `allow_network`, `job_memory`, `job_processes`, `job_disk`, `job_open_files`, `cache`, `hubs`"
        );
        // `source` is not a setting.
        assert!(err("source = \"x\"\n").contains("unknown key `source`"));
    }

    #[test]
    fn unknown_key_nested() {
        // The settings are flat: a table or dotted key is named in full.
        assert_eq!(
            err("[limits]\noutput_cap = \"1 MiB\"\n"),
            "/home/donor/.local/state/trunkfarm/agent.toml:1: unknown key `limits`, expected one of `name`, `labels`, `max_parallel_jobs`, `allowed_projects`, `denied_projects`, `max_job_timeout`, `cores`, `memory`, `schedule`, `timezone`, `only_when_idle`, `idle_load`, `idle_for`, `idle_check`, `loadavg_file`, `output_cap`, `work_dir`, `drain_grace`, `reconnect_max_backoff`, `sandbox`, `allow_network`, `job_memory`, `job_processes`, `job_disk`, `job_open_files`, `cache`, `hubs`"
        );
        assert_eq!(
            err("name = \"a\"\nlabels.gpu = true\n"),
            "/home/donor/.local/state/trunkfarm/agent.toml:2: invalid value for `labels`: invalid type: map, expected a sequence"
        );
    }

    #[test]
    fn errors_without_a_file_say_so() {
        assert_eq!(
            AgentConfig::from_toml("max_parallel_jobs = 0\n", None)
                .unwrap_err()
                .to_string(),
            "<inline config>:1: invalid `max_parallel_jobs`: must be at least 1 (to stop taking jobs, stop or drain the agent)"
        );
    }

    #[test]
    fn bad_duration() {
        let e = parse("drain_grace = \"90 parsecs\"\n").unwrap_err();
        assert_eq!(e.key(), Some("drain_grace"));
        assert_eq!(
            e.to_string(),
            "/home/donor/.local/state/trunkfarm/agent.toml:1: invalid value for `drain_grace`: \"90 parsecs\" is not a duration (unknown time unit \"parsecs\", supported units: ns, us/µs, ms, sec, min, hours, days, weeks, months, years (and few variations)); expected a duration such as \"90s\", \"10m\" or \"1h 30m\""
        );
        assert_eq!(
            err("max_job_timeout = 3600\n"),
            "/home/donor/.local/state/trunkfarm/agent.toml:1: invalid value for `max_job_timeout`: a bare number (3600) has no unit; write it as a string with a unit, e.g. \"3600s\" (expected a duration such as \"90s\", \"10m\" or \"1h 30m\")"
        );
    }

    #[test]
    fn bad_byte_size() {
        let e = parse("output_cap = \"4 megs\"\n").unwrap_err();
        assert_eq!(e.key(), Some("output_cap"));
        assert_eq!(
            e.to_string(),
            "/home/donor/.local/state/trunkfarm/agent.toml:1: invalid value for `output_cap`: \"4 megs\" is not a byte size; expected a size such as \"4 MiB\", \"512 KiB\" or a whole number of bytes (units: B, KiB, MiB, GiB, or KB, MB, GB for powers of 1000)"
        );
        assert_eq!(parse("output_cap = 5000\n").unwrap().output_cap, 5000);
    }

    #[test]
    fn bad_types() {
        assert_eq!(
            err("max_parallel_jobs = \"2\"\n"),
            "/home/donor/.local/state/trunkfarm/agent.toml:1: invalid value for `max_parallel_jobs`: invalid type: string \"2\", expected a whole number such as 3"
        );
        assert_eq!(
            err("labels = [\"gpu\", 7]\n"),
            "/home/donor/.local/state/trunkfarm/agent.toml:1: invalid value for `labels[1]`: invalid type: integer `7`, expected a string"
        );
        assert_eq!(
            err("labels = \"gpu\"\n"),
            "/home/donor/.local/state/trunkfarm/agent.toml:1: invalid value for `labels`: invalid type: string \"gpu\", expected a sequence"
        );
    }

    #[test]
    fn syntax_error_names_the_line() {
        let e = parse("name = \"a\"\n\nlabels = [\"gpu\"\n").unwrap_err();
        assert!(matches!(e, ConfigError::Syntax { .. }));
        // An unclosed array is reported where it starts.
        assert_eq!(e.line(), Some(3));
        assert_eq!(
            e.to_string(),
            "/home/donor/.local/state/trunkfarm/agent.toml:3: TOML syntax error: unclosed array, expected `]`"
        );
        assert_eq!(
            err("name = \"a\"\nname = \"b\"\n"),
            "/home/donor/.local/state/trunkfarm/agent.toml:2: TOML syntax error: duplicate key"
        );
    }

    #[test]
    fn labels_must_be_well_formed() {
        let e = parse("# labels\nlabels = [\"gpu\", \"big disk\"]\n").unwrap_err();
        assert_eq!(e.key(), Some("labels"));
        assert_eq!(
            e.to_string(),
            "/home/donor/.local/state/trunkfarm/agent.toml:2: invalid `labels`: \"big disk\" is not a valid label; expected letters, digits, '.', '_' and '-' only, e.g. \"gpu\" or \"linux-x86_64\""
        );
        for bad in ["", "a/b", "é", "a:b"] {
            assert!(
                err(&format!("labels = [\"{bad}\"]\n"))
                    .contains(&format!("{bad:?} is not a valid label")),
                "{bad}"
            );
        }
    }

    #[test]
    fn other_validation_errors() {
        assert_eq!(
            err("max_parallel_jobs = 0\n"),
            "/home/donor/.local/state/trunkfarm/agent.toml:1: invalid `max_parallel_jobs`: must be at least 1 (to stop taking jobs, stop or drain the agent)"
        );
        assert_eq!(
            err("max_parallel_jobs = -2\n"),
            "/home/donor/.local/state/trunkfarm/agent.toml:1: invalid value for `max_parallel_jobs`: -2 is out of range; expected a whole number such as 3"
        );
        assert_eq!(
            err("output_cap = \"1 KiB\"\n"),
            "/home/donor/.local/state/trunkfarm/agent.toml:1: invalid `output_cap`: 1.0 KiB is too small; expected at least 4 KiB so a failure's log keeps its head and tail"
        );
        assert_eq!(
            err("max_job_timeout = \"0s\"\n"),
            "/home/donor/.local/state/trunkfarm/agent.toml:1: invalid `max_job_timeout`: must be greater than zero, e.g. \"2h\" (leave it out for no ceiling of your own)"
        );
        assert_eq!(
            err("reconnect_max_backoff = \"100ms\"\n"),
            "/home/donor/.local/state/trunkfarm/agent.toml:1: invalid `reconnect_max_backoff`: 100ms is too short; expected at least 1s so an unreachable hub is not hammered"
        );
        assert_eq!(
            err("allowed_projects = [\"cpython\", \"my project\"]\n"),
            "/home/donor/.local/state/trunkfarm/agent.toml:1: invalid `allowed_projects`: \"my project\" is not a valid project name; expected a non-empty name without spaces (an empty list allows every project)"
        );
        assert_eq!(
            err("name = \"  \"\n"),
            "/home/donor/.local/state/trunkfarm/agent.toml:1: invalid `name`: \"  \" is not a usable name; expected 1 to 64 printable characters, e.g. \"alice-workstation\""
        );
        assert!(err(&format!("name = \"{}\"\n", "x".repeat(65))).contains("is not a usable name"));
        assert_eq!(
            err("work_dir = \"~/work\"\n"),
            "/home/donor/.local/state/trunkfarm/agent.toml:1: invalid `work_dir`: ~/work starts with `~`, which is not expanded here; write the full path"
        );
        assert_eq!(
            err("work_dir = \"\"\n"),
            "/home/donor/.local/state/trunkfarm/agent.toml:1: invalid `work_dir`: must not be empty; give a path"
        );
    }

    #[test]
    fn each_hub_has_a_share_and_its_own_limits_over_the_top_level_ones() {
        let c = parse(
            "max_parallel_jobs = 3\nallowed_projects = [\"cpython\"]\nmax_job_timeout = \"2h\"\n\
             [hubs.work]\nshare = 2\n\
             [hubs.\"oss.example-7443\"]\nmax_parallel_jobs = 5\nallowed_projects = []\n\
             denied_projects = [\"secret-sauce\"]\nmax_job_timeout = \"30m\"\n",
        )
        .unwrap();
        assert_eq!(
            c.hub_terms("work"),
            HubTerms {
                share: 2,
                max_parallel_jobs: 3,
                allowed_projects: vec!["cpython".into()],
                denied_projects: vec![],
                max_job_timeout: Some(Duration::from_secs(7200)),
            }
        );
        // Never more than the machine's slots; an empty list allows any project.
        assert_eq!(
            c.hub_terms("oss.example-7443"),
            HubTerms {
                share: 1,
                max_parallel_jobs: 3,
                allowed_projects: vec![],
                denied_projects: vec!["secret-sauce".into()],
                max_job_timeout: Some(Duration::from_secs(1800)),
            }
        );
        // A hub without a table gets the top-level terms and share 1.
        assert_eq!(c.hub_terms("other").share, 1);
        assert_eq!(c.hub_terms("other").max_parallel_jobs, 3);

        assert_eq!(
            err("[hubs.work]\nshare = 0\n"),
            format!(
                "{FILE}:2: invalid `hubs.work.share`: must be at least 1 (a hub with share 2 gets \
                 twice the slots of one with share 1; to take no work from a hub, unenroll it)"
            )
        );
        assert!(
            err("[hubs.work]\nshares = 2\n").contains("unknown key `hubs.work.shares`"),
            "{}",
            err("[hubs.work]\nshares = 2\n")
        );
        assert!(err("[hubs.\".bad\"]\nshare = 1\n").contains("not a usable hub name"));
        assert!(err("[hubs.w]\nmax_parallel_jobs = 0\n").contains("hubs.w.max_parallel_jobs"));
    }

    #[test]
    fn overrides_replace_file_values() {
        let mut c = parse("name = \"file\"\nlabels = [\"a\"]\nwork_dir = \"w\"\n").unwrap();
        c.apply(Overrides {
            name: Some("cli".into()),
            labels: Some(vec!["b".into(), "c".into()]),
            max_parallel_jobs: Some(3),
            allowed_projects: Some(vec!["cpython".into()]),
            max_job_timeout: Some(Duration::from_secs(60)),
            output_cap: Some(8192),
            work_dir: Some("rel".into()),
            sandbox: Some(SandboxMode::None),
            allow_network: Some(true),
            cores: Some(2),
            memory: Some(8 << 30),
            denied_projects: Some(vec!["beta".into()]),
            schedule: Some(vec!["Sat-Sun".into()]),
            only_when_idle: Some(true),
        })
        .unwrap();
        assert_eq!(c.cores, Some(2));
        assert_eq!(c.memory, Some(8 << 30));
        assert_eq!(c.denied_projects, ["beta"]);
        assert_eq!(c.schedule, ["Sat-Sun"]);
        assert!(c.only_when_idle);
        assert_eq!(c.sandbox, SandboxMode::None);
        assert!(c.allow_network);
        assert_eq!(c.name.as_deref(), Some("cli"));
        assert_eq!(c.labels, ["b", "c"]);
        assert_eq!(c.max_parallel_jobs, 3);
        assert_eq!(c.allowed_projects, ["cpython"]);
        assert_eq!(c.max_job_timeout, Some(Duration::from_secs(60)));
        assert_eq!(c.output_cap, 8192);
        // Relative to the working directory, not the file.
        assert_eq!(c.work_dir.as_deref(), Some(Path::new("rel")));

        // No overrides: nothing changes.
        let before = c.clone();
        c.apply(Overrides::default()).unwrap();
        assert_eq!(c, before);
    }

    #[test]
    fn bad_override_blames_the_command_line_and_changes_nothing() {
        let mut c = parse("labels = [\"a\"]\n").unwrap();
        let before = c.clone();
        let e = c
            .apply(Overrides {
                name: Some("ok".into()),
                labels: Some(vec!["fine".into(), "not fine".into()]),
                ..Overrides::default()
            })
            .unwrap_err();
        assert_eq!(e.key(), Some("labels"));
        assert_eq!(
            e.to_string(),
            "invalid `labels` from the command line: \"not fine\" is not a valid label; expected letters, digits, '.', '_' and '-' only, e.g. \"gpu\" or \"linux-x86_64\""
        );
        assert_eq!(c, before);
        assert_eq!(
            c.apply(Overrides {
                max_parallel_jobs: Some(0),
                ..Overrides::default()
            })
            .unwrap_err()
            .to_string(),
            "invalid `max_parallel_jobs` from the command line: must be at least 1 (to stop taking jobs, stop or drain the agent)"
        );
        assert_eq!(
            c.apply(Overrides {
                output_cap: Some(100),
                ..Overrides::default()
            })
            .unwrap_err()
            .to_string(),
            "invalid `output_cap` from the command line: 100 B is too small; expected at least 4 KiB so a failure's log keeps its head and tail"
        );
    }

    #[test]
    fn override_validation_still_blames_the_file_for_file_values() {
        // A value that only a caller could have broken after loading.
        let mut c = parse("").unwrap();
        c.labels = vec!["x y".into()];
        let e = c.apply(Overrides::default()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/home/donor/.local/state/trunkfarm/agent.toml: invalid `labels`: \"x y\" is not a valid label; expected letters, digits, '.', '_' and '-' only, e.g. \"gpu\" or \"linux-x86_64\""
        );
    }

    #[test]
    fn sandbox_and_job_limits() {
        let c = AgentConfig::default();
        assert_eq!(c.sandbox, SandboxMode::Auto);
        assert!(!c.allow_network);
        assert_eq!(c.job_memory, 4 << 30);
        assert_eq!(c.job_processes, 1024);
        assert_eq!(c.job_disk, 10 << 30);
        assert_eq!(c.job_open_files, 4096);
        let c = parse(
            "sandbox = \"bwrap\"\nallow_network = true\njob_memory = \"512 MiB\"\njob_processes = 64\njob_disk = \"1 GiB\"\njob_open_files = 256\n",
        )
        .unwrap();
        assert_eq!(c.sandbox, SandboxMode::Bwrap);
        assert!(c.allow_network);
        assert_eq!(c.job_memory, 512 << 20);
        assert_eq!(c.job_processes, 64);
        assert_eq!(c.job_disk, 1 << 30);
        assert_eq!(c.job_open_files, 256);
        assert_eq!(
            parse("sandbox = \"none\"\n").unwrap().sandbox,
            SandboxMode::None
        );
        assert_eq!(
            err("sandbox = \"bubblewrap\"\n"),
            "/home/donor/.local/state/trunkfarm/agent.toml:1: invalid value for `sandbox`: unknown variant `bubblewrap`, expected one of `auto`, `bwrap`, `none`"
        );
        assert_eq!(
            err("sandbox = false\n"),
            "/home/donor/.local/state/trunkfarm/agent.toml:1: invalid value for `sandbox`: wanted string or table"
        );
        assert_eq!(
            err("job_memory = \"1 MiB\"\n"),
            "/home/donor/.local/state/trunkfarm/agent.toml:1: invalid `job_memory`: 1.0 MiB is too small; expected at least 64.0 MiB so a shell and a test runner fit, e.g. \"4 GiB\""
        );
        assert_eq!(
            err("job_processes = 2\n"),
            "/home/donor/.local/state/trunkfarm/agent.toml:1: invalid `job_processes`: 2 is too few; expected at least 16 (the sandbox and the job's shell count too), e.g. 1024"
        );
        assert!(err("job_disk = 1000\n").contains("invalid `job_disk`: 1000 B is too small"));
        assert!(err("job_open_files = 3\n").contains("invalid `job_open_files`: 3 is too few"));
        assert_eq!("none".parse::<SandboxMode>(), Ok(SandboxMode::None));
        assert_eq!(
            "off".parse::<SandboxMode>().unwrap_err(),
            "\"off\" is not a sandbox mode; expected \"auto\", \"bwrap\" or \"none\""
        );
        assert_eq!(" bwrap".parse::<SandboxMode>(), Ok(SandboxMode::Bwrap));
        assert_eq!("auto".parse::<SandboxMode>(), Ok(SandboxMode::Auto));
    }

    #[test]
    fn donor_limits() {
        let c = AgentConfig::default();
        assert_eq!((c.cores, c.memory), (None, None));
        assert!(c.schedule.is_empty() && !c.only_when_idle);
        assert_eq!(c.idle_load, 0.5);
        assert_eq!(c.idle_for, Duration::from_secs(600));
        assert_eq!(c.idle_check, Duration::from_secs(30));
        let c = parse(
            "cores = 4\nmemory = \"8 GiB\"\ndenied_projects = [\"beta\"]\nschedule = [\"Mon-Fri 22:00-07:00\", \"Sat-Sun\"]\ntimezone = \"Europe/Berlin\"\nonly_when_idle = true\nidle_load = 1\nidle_for = \"0s\"\nidle_check = \"5s\"\nloadavg_file = \"load\"\n",
        )
        .unwrap();
        assert_eq!(c.cores, Some(4));
        assert_eq!(c.memory, Some(8 << 30));
        assert_eq!(c.denied_projects, ["beta"]);
        assert_eq!(c.schedule, ["Mon-Fri 22:00-07:00", "Sat-Sun"]);
        assert_eq!(c.timezone.as_deref(), Some("Europe/Berlin"));
        assert!(c.only_when_idle);
        assert_eq!(c.idle_load, 1.0);
        assert_eq!(c.idle_for, Duration::ZERO);
        assert_eq!(c.idle_check, Duration::from_secs(5));
        assert_eq!(
            c.loadavg_file.as_deref(),
            Some(Path::new("/home/donor/.local/state/trunkfarm/load"))
        );
        assert_eq!(
            err("schedule = [\"Sat-Sun\", \"Mon-Fry 22:00\"]\n"),
            "/home/donor/.local/state/trunkfarm/agent.toml:1: invalid `schedule`: schedule entry `Mon-Fry 22:00`: unknown day `Fry`, use Mon Tue Wed Thu Fri Sat Sun"
        );
        assert!(
            err("timezone = \"Mars/Olympus\"\n").starts_with(
                "/home/donor/.local/state/trunkfarm/agent.toml:1: invalid `timezone`: unknown time zone \"Mars/Olympus\""
            ),
            "{}",
            err("timezone = \"Mars/Olympus\"\n")
        );
        assert_eq!(
            err("cores = 0\n"),
            "/home/donor/.local/state/trunkfarm/agent.toml:1: invalid `cores`: must be at least 1 (to stop taking jobs, pause or stop the agent)"
        );
        assert!(err("memory = \"1 MiB\"\n").contains("invalid `memory`: 1.0 MiB is too small"));
        assert!(err("idle_load = 0\n").contains("invalid `idle_load`: 0 is not a load per core"));
        assert!(err("idle_load = -1.5\n").contains("invalid `idle_load`"));
        assert!(err("idle_check = \"10ms\"\n").contains("invalid `idle_check`: 10ms is too short"));
        assert_eq!(
            err("allowed_projects = [\"a\"]\ndenied_projects = [\"a\"]\n"),
            "/home/donor/.local/state/trunkfarm/agent.toml:2: invalid `denied_projects`: \"a\" is in allowed_projects too; keep it in one of the two"
        );
        assert!(err("denied_projects = [\"\"]\n").contains("is not a valid project name"));
        // A bad schedule from the command line blames it.
        let mut c = parse("").unwrap();
        assert_eq!(
            c.apply(Overrides {
                schedule: Some(vec!["Sun 7-9".into()]),
                ..Overrides::default()
            })
            .unwrap_err()
            .to_string(),
            "invalid `schedule` from the command line: schedule entry `Sun 7-9`: `7` is not a time of day; write HH:MM on a 24-hour clock, e.g. 07:30"
        );
    }
}
