//! Hub configuration: the operator's `hub.toml`, its defaults, and the checks
//! that turn a typo into an error instead of a silently ignored setting.
//!
//! Every section and every key is optional; `config/hub.example.toml` lists
//! them all with their defaults. Parsing is strict on purpose: an unknown key,
//! a value of the wrong kind, or a combination that cannot work is an error
//! that names the file, the line (when known) and the full dotted key, because
//! a farm running with a setting the operator *thinks* is applied is worse than
//! a farm that refuses to start.
//!
//! Units: durations are [`std::time::Duration`], written in the file as human
//! strings (`"90s"`, `"10m"`, `"1h 30m"`); byte sizes are plain `u64` byte
//! counts, written in the file as human strings (`"4 MiB"`, `"512 KiB"`) or a
//! bare integer number of bytes. Relative paths in a file are resolved against
//! the directory holding that file.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use trunkfarm_proto::settings::{self, Problem, check_path, fmt_bytes, fmt_duration};

pub(crate) use trunkfarm_proto::settings::ConfigError;

mod network;
mod notify;
mod pipeline;
mod pool;
mod retention;
mod storage;
pub(crate) use network::{ConnectionCap, NetworkSection};
pub(crate) use notify::{NotifySection, SmtpSection, SmtpSecurity, WebSection};
pub(crate) use pipeline::{
    ArtifactsSection, BuildOn, Confirm, PipelineSection, ProjectConfig, TrustSection,
    UpstreamConfig,
};
pub(crate) use pool::{AgentSandbox, DEFAULT_POOL_USER, Ec2Section, PoolConfig, ProvisionerKind};
pub(crate) use retention::RetentionSection;
pub(crate) use storage::{StorageBackend, StorageSection};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// The whole hub configuration, after defaults, path resolution and
/// validation. Built by [`HubConfig::load`], [`HubConfig::from_toml`] or
/// [`HubConfig::default_for`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HubConfig {
    /// The file this configuration came from, so later errors (and `config
    /// show`) can point the operator at it; `None` for defaults or inline text.
    pub(crate) source: Option<PathBuf>,
    /// `[hub]`: where the hub listens and keeps its data.
    pub(crate) hub: HubSection,
    /// `[tls]`: how agents' connections are secured.
    pub(crate) tls: TlsSection,
    /// `[admin]`: how the operator's CLI authenticates.
    pub(crate) admin: AdminSection,
    /// `[dispatch]`: leases, heartbeats, retries and job timeouts.
    pub(crate) dispatch: DispatchSection,
    /// `[limits]`: message and log sizes.
    pub(crate) limits: LimitsSection,
    /// `[enrollment]`: lifetimes of enrollment tokens.
    pub(crate) enrollment: EnrollmentSection,
    /// `[artifacts]`: how many runtime artifacts are kept, how large they may be.
    pub(crate) artifacts: ArtifactsSection,
    /// `[pipeline]`: how the hub talks to git.
    pub(crate) pipeline: PipelineSection,
    /// `[trust]`: when disagreeing with confirmation runs quarantines an agent.
    pub(crate) trust: TrustSection,
    /// `[[upstream]]`: the runtimes whose trunk is built.
    pub(crate) upstreams: Vec<UpstreamConfig>,
    /// `[[project]]`: the downstream projects tested against them.
    pub(crate) projects: Vec<ProjectConfig>,
    /// `[smtp]`: how mail is delivered.
    pub(crate) smtp: SmtpSection,
    /// `[notify]`: what is mailed, when.
    pub(crate) notify: NotifySection,
    /// `[web]`: the hub's HTTP endpoint (unsubscribe links).
    pub(crate) web: WebSection,
    /// `[network]`: the gRPC listener's limits against hostile clients.
    pub(crate) network: NetworkSection,
    /// `[retention]`.
    pub(crate) retention: RetentionSection,
    /// `[storage]`: where artifacts and compacted logs live.
    pub(crate) storage: StorageSection,
    /// `[[pool]]`: on-demand agents.
    pub(crate) pools: Vec<PoolConfig>,
}

/// `[hub]`: the hub's network identity and data location.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [hub] table")]
pub(crate) struct HubSection {
    /// Address the gRPC server binds. Port 0 picks a free port (tests, demos).
    #[serde(deserialize_with = "de::socket_addr")]
    pub(crate) listen: SocketAddr,
    /// The `host:port` agents dial, when it differs from `listen` (NAT, proxy,
    /// `0.0.0.0` binds); printed in enrollment strings.
    pub(crate) public_address: Option<String>,
    /// Where the database, generated TLS material and the admin token live.
    /// Relative paths are resolved against the config file's directory (or
    /// the working directory when there is no file).
    pub(crate) data_dir: PathBuf,
    /// A short name for this hub (`[a-z0-9-]`, at most 32 characters), shown
    /// to agents and in notifications when one donor serves several hubs.
    pub(crate) hub_id: Option<String>,
    /// Free space kept in reserve on the data dir's file system: below it
    /// the hub takes no new jobs or artifacts (running jobs still report),
    /// so the database never fills the disk.
    #[serde(deserialize_with = "de::byte_size")]
    pub(crate) min_free_space: u64,
    /// The database's block cache. Larger serves big histories' blocks
    /// (`breakage`, old runs) without reading the disk; the working set of
    /// dispatch is small.
    #[serde(deserialize_with = "de::byte_size")]
    pub(crate) database_cache: u64,
}

/// The smallest `hub.database_cache`, bytes: below it every read of a
/// large tree goes to the disk.
const MIN_DATABASE_CACHE: u64 = 1024 * 1024;

/// The default `hub.min_free_space`, bytes.
pub(crate) const DEFAULT_MIN_FREE_SPACE: u64 = 256 * 1024 * 1024;

impl Default for HubSection {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7443)),
            public_address: None,
            data_dir: PathBuf::from("trunkfarm-data"),
            hub_id: None,
            min_free_space: DEFAULT_MIN_FREE_SPACE,
            database_cache: crate::store::DEFAULT_CACHE_BYTES,
        }
    }
}

/// `[tls]`: transport security for agent and admin connections.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [tls] table")]
pub(crate) struct TlsSection {
    /// Serve plain HTTP/2 instead of TLS. Only for a hub behind a proxy that
    /// terminates TLS itself: agent secrets would otherwise cross the network
    /// in clear text.
    pub(crate) plaintext: bool,
    /// The operator's own PEM certificate chain (ending with the issuing CA,
    /// which agents pin). With neither `cert` nor `key` the hub creates its
    /// own CA and certificate in `<data_dir>/tls`.
    pub(crate) cert: Option<PathBuf>,
    /// The PEM private key for `cert`.
    pub(crate) key: Option<PathBuf>,
    /// Extra DNS names and IP addresses to put in the certificate the hub
    /// generates (it always includes `localhost`, `127.0.0.1` and `::1`).
    /// Not allowed together with `cert`, which it would not affect.
    pub(crate) hostnames: Vec<String>,
}

/// `[admin]`: the operator's credential.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "an [admin] table")]
pub(crate) struct AdminSection {
    /// Where the admin token is kept; `None` means `<data_dir>/admin.token`.
    /// See [`HubConfig::admin_token_path`].
    pub(crate) token_file: Option<PathBuf>,
}

/// `[dispatch]`: how jobs are leased to agents and when they are given up on.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [dispatch] table")]
pub(crate) struct DispatchSection {
    /// How often agents must send a heartbeat; sent to agents in `Welcome`.
    #[serde(deserialize_with = "de::duration")]
    pub(crate) heartbeat_interval: Duration,
    /// How long a lease survives without a heartbeat before its job is
    /// requeued. At least twice `heartbeat_interval`, so one lost heartbeat
    /// does not cost a job.
    #[serde(deserialize_with = "de::duration")]
    pub(crate) lease_timeout: Duration,
    /// How many times a job is started before it is reported as an error
    /// (lost leases and infrastructure errors count; test failures do not).
    #[serde(deserialize_with = "de::count")]
    pub(crate) max_attempts: u32,
    /// Timeout for a job whose project does not set one.
    #[serde(deserialize_with = "de::duration")]
    pub(crate) default_job_timeout: Duration,
    /// The longest timeout a project may ask for.
    #[serde(deserialize_with = "de::duration")]
    pub(crate) max_job_timeout: Duration,
    /// On shutdown, how long running jobs may finish before they are
    /// cancelled.
    #[serde(deserialize_with = "de::duration")]
    pub(crate) drain_grace: Duration,
    /// How long past its timeout a job may run before the hub ends it
    /// itself, whatever its agent says (an honest agent kills it at the
    /// timeout and reports that first). The job is requeued, or finished
    /// as an error once its attempts are used up.
    #[serde(deserialize_with = "de::duration")]
    pub(crate) timeout_grace: Duration,
}

impl Default for DispatchSection {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(10),
            lease_timeout: Duration::from_secs(60),
            max_attempts: 3,
            default_job_timeout: Duration::from_secs(60 * 60),
            max_job_timeout: Duration::from_secs(24 * 60 * 60),
            drain_grace: Duration::from_secs(10 * 60),
            timeout_grace: Duration::from_secs(60),
        }
    }
}

/// `[limits]`: sizes, in bytes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [limits] table")]
pub(crate) struct LimitsSection {
    /// Largest gRPC message the hub accepts or sends, in bytes (at least
    /// 4 MiB, since a job result carries up to 3 MiB of report files).
    #[serde(deserialize_with = "de::byte_size")]
    pub(crate) max_message_size: u64,
    /// Log bytes the hub keeps per job; beyond it the middle is cut.
    #[serde(deserialize_with = "de::byte_size")]
    pub(crate) max_log_size: u64,
}

impl Default for LimitsSection {
    fn default() -> Self {
        Self {
            max_message_size: 4 * MIB,
            max_log_size: 16 * MIB,
        }
    }
}

/// `[enrollment]`: lifetimes of the one-time tokens that enroll agents.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "an [enrollment] table")]
pub(crate) struct EnrollmentSection {
    /// Lifetime of a token created without `--ttl`.
    #[serde(deserialize_with = "de::duration")]
    pub(crate) default_token_ttl: Duration,
    /// The longest lifetime a token may be given.
    #[serde(deserialize_with = "de::duration")]
    pub(crate) max_token_ttl: Duration,
    /// The most jobs at once an agent is given when its token sets no cap
    /// (`token create --max-parallel-jobs`); an agent claiming more is
    /// clamped.
    #[serde(deserialize_with = "de::count")]
    pub(crate) default_max_parallel_jobs: u32,
}

impl Default for EnrollmentSection {
    fn default() -> Self {
        Self {
            default_token_ttl: Duration::from_secs(24 * 60 * 60),
            max_token_ttl: Duration::from_secs(30 * 24 * 60 * 60),
            default_max_parallel_jobs: 4,
        }
    }
}

/// The file's shape: every section optional.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table of sections")]
struct RawHubConfig {
    hub: HubSection,
    tls: TlsSection,
    admin: AdminSection,
    dispatch: DispatchSection,
    limits: LimitsSection,
    enrollment: EnrollmentSection,
    artifacts: ArtifactsSection,
    pipeline: PipelineSection,
    trust: TrustSection,
    upstream: Vec<UpstreamConfig>,
    project: Vec<ProjectConfig>,
    smtp: SmtpSection,
    notify: NotifySection,
    web: WebSection,
    network: NetworkSection,
    retention: RetentionSection,
    storage: StorageSection,
    pool: Vec<PoolConfig>,
}

impl HubConfig {
    /// Each project's known-flaky rule, by name (what results judges with).
    pub(crate) fn flaky_rules(
        &self,
    ) -> std::collections::HashMap<String, crate::results::FlakyRule> {
        self.projects
            .iter()
            .map(|p| (p.name.clone(), p.flaky_rule()))
            .collect()
    }

    /// Reads, parses and validates the config file at `path`. A missing file
    /// is an error naming it: the operator asked for that file.
    pub(crate) fn load(path: &Path) -> Result<HubConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        Self::from_toml(&text, Some(path))
    }

    /// Parses and validates configuration text. `origin` is the file the text
    /// came from: it names the file in messages and is the base for relative
    /// paths (without it, relative paths stay relative to the working
    /// directory).
    pub(crate) fn from_toml(text: &str, origin: Option<&Path>) -> Result<HubConfig, ConfigError> {
        let file = origin.map(Path::to_path_buf);
        let doc = settings::document(text, &file)?;
        let raw: RawHubConfig = settings::deserialize(text, &doc, &file)?;
        let base = origin.and_then(Path::parent);
        let mut config = HubConfig {
            source: file.clone(),
            hub: raw.hub,
            tls: raw.tls,
            admin: raw.admin,
            dispatch: raw.dispatch,
            limits: raw.limits,
            enrollment: raw.enrollment,
            artifacts: raw.artifacts,
            pipeline: raw.pipeline,
            trust: raw.trust,
            upstreams: raw.upstream,
            projects: raw.project,
            smtp: raw.smtp,
            notify: raw.notify,
            web: raw.web,
            network: raw.network,
            retention: raw.retention,
            storage: raw.storage,
            pools: raw.pool,
        };
        // Check paths as written (e.g. `~`) before resolving them.
        config
            .check_paths()
            .map_err(|p| p.into_error(&file, text, &doc))?;
        if let Some(base) = base {
            config.resolve_paths(base);
        }
        config
            .problems()
            .map_err(|p| p.into_error(&file, text, &doc))?;
        Ok(config)
    }

    /// The configuration with every default and no file: for a hub started
    /// without `--config`, and for tests.
    pub(crate) fn default_for(data_dir: PathBuf) -> HubConfig {
        HubConfig {
            source: None,
            hub: HubSection {
                data_dir,
                ..HubSection::default()
            },
            tls: TlsSection::default(),
            admin: AdminSection::default(),
            dispatch: DispatchSection::default(),
            limits: LimitsSection::default(),
            enrollment: EnrollmentSection::default(),
            artifacts: ArtifactsSection::default(),
            pipeline: PipelineSection::default(),
            trust: TrustSection::default(),
            upstreams: Vec::new(),
            projects: Vec::new(),
            smtp: SmtpSection::default(),
            notify: NotifySection::default(),
            web: WebSection::default(),
            network: NetworkSection::default(),
            retention: RetentionSection::default(),
            storage: StorageSection::default(),
            pools: Vec::new(),
        }
    }

    /// Checks the semantic rules again, for a caller that changed fields after
    /// loading (e.g. command-line overrides). Errors name `source` but no line.
    #[cfg(test)]
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        self.check_paths()
            .and_then(|()| self.problems())
            .map_err(|p| ConfigError::Invalid {
                file: self.source.clone(),
                line: None,
                key: p.key.to_string(),
                message: p.message,
            })
    }

    /// The directory holding the hub's database and generated files.
    pub(crate) fn data_dir(&self) -> &Path {
        &self.hub.data_dir
    }

    /// The file holding the admin token: `admin.token_file`, or
    /// `<data_dir>/admin.token` when that is not set.
    pub(crate) fn admin_token_path(&self) -> PathBuf {
        match &self.admin.token_file {
            Some(path) => path.clone(),
            None => self.hub.data_dir.join("admin.token"),
        }
    }

    /// Where the hub keeps the CA and certificate it generates when the
    /// operator supplies none.
    pub(crate) fn generated_tls_dir(&self) -> PathBuf {
        self.hub.data_dir.join("tls")
    }

    fn path_keys(&self) -> [(&'static str, Option<&Path>); 8] {
        [
            ("hub.data_dir", Some(self.hub.data_dir.as_path())),
            ("tls.cert", self.tls.cert.as_deref()),
            ("tls.key", self.tls.key.as_deref()),
            ("admin.token_file", self.admin.token_file.as_deref()),
            ("smtp.password_file", self.smtp.password_file.as_deref()),
            ("smtp.ca_file", self.smtp.ca_file.as_deref()),
            ("smtp.mailbox_dir", self.smtp.mailbox_dir.as_deref()),
            (
                "web.metrics_token_file",
                self.web.metrics_token_file.as_deref(),
            ),
        ]
    }

    fn check_paths(&self) -> Result<(), Problem> {
        for (key, path) in self.path_keys() {
            if let Some(path) = path {
                check_path(key, path)?;
            }
        }
        Ok(())
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut self.hub.data_dir);
        if let Some(p) = &mut self.tls.cert {
            resolve(p);
        }
        if let Some(p) = &mut self.tls.key {
            resolve(p);
        }
        for p in [
            &mut self.admin.token_file,
            &mut self.smtp.password_file,
            &mut self.smtp.ca_file,
            &mut self.smtp.mailbox_dir,
            &mut self.web.metrics_token_file,
        ]
        .into_iter()
        .flatten()
        {
            resolve(p);
        }
        for pool in &mut self.pools {
            if let Some(p) = &mut pool.dir {
                resolve(p);
            }
        }
    }

    /// The semantic rules, in file order; the first broken one is reported.
    fn problems(&self) -> Result<(), Problem> {
        let hub = &self.hub;
        if let Some(addr) = &hub.public_address {
            check_public_address(addr)?;
        }
        if let Some(id) = &hub.hub_id {
            let ok_chars = id
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
            if id.is_empty() || id.len() > 32 || !ok_chars {
                return Err(Problem::new(
                    "hub.hub_id",
                    format!(
                        "{id:?} is not a valid hub id; expected 1 to 32 characters from a-z, 0-9 and '-'"
                    ),
                ));
            }
        }
        if hub.database_cache < MIN_DATABASE_CACHE {
            return Err(Problem::new(
                "hub.database_cache",
                format!(
                    "{} is too small for the database's page cache; give at least {} (the default is {})",
                    trunkfarm_proto::settings::fmt_bytes(hub.database_cache),
                    trunkfarm_proto::settings::fmt_bytes(MIN_DATABASE_CACHE),
                    trunkfarm_proto::settings::fmt_bytes(crate::store::DEFAULT_CACHE_BYTES),
                ),
            ));
        }

        let tls = &self.tls;
        if tls.plaintext && (tls.cert.is_some() || tls.key.is_some()) {
            let key = if tls.cert.is_some() {
                "tls.cert"
            } else {
                "tls.key"
            };
            return Err(Problem::new(
                key,
                format!(
                    "`{key}` is set but `tls.plaintext = true` turns TLS off; remove one of them"
                ),
            ));
        }
        if tls.plaintext && !tls.hostnames.is_empty() {
            return Err(Problem::new(
                "tls.hostnames",
                "`tls.hostnames` names the hub's generated certificate, but `tls.plaintext = true` turns TLS off; remove one of them",
            ));
        }
        match (&tls.cert, &tls.key) {
            (Some(_), None) => {
                return Err(Problem::new(
                    "tls.key",
                    "`tls.cert` is set but `tls.key` is not; give both (your own certificate) or neither (the hub generates one)",
                ));
            }
            (None, Some(_)) => {
                return Err(Problem::new(
                    "tls.cert",
                    "`tls.key` is set but `tls.cert` is not; give both (your own certificate) or neither (the hub generates one)",
                ));
            }
            _ => {}
        }
        if tls.cert.is_some() && !tls.hostnames.is_empty() {
            return Err(Problem::new(
                "tls.hostnames",
                "`tls.hostnames` only applies to the certificate the hub generates, and `tls.cert` supplies your own; put the names in your certificate and remove `tls.hostnames`",
            ));
        }
        for name in &tls.hostnames {
            if name.parse::<IpAddr>().is_err()
                && !is_dns_name(name.strip_prefix("*.").unwrap_or(name))
            {
                return Err(Problem::new(
                    "tls.hostnames",
                    format!(
                        "{name:?} is neither a DNS name nor an IP address; expected names such as \"farm.example.org\" or \"192.0.2.10\""
                    ),
                ));
            }
        }

        let d = &self.dispatch;
        if d.heartbeat_interval.is_zero() {
            return Err(Problem::new(
                "dispatch.heartbeat_interval",
                "must be greater than zero, e.g. \"10s\"",
            ));
        }
        if d.lease_timeout < d.heartbeat_interval.saturating_mul(2) {
            return Err(Problem::new(
                "dispatch.lease_timeout",
                format!(
                    "{} is less than twice `dispatch.heartbeat_interval` ({}); expected at least {}, so one late heartbeat does not requeue a running job",
                    fmt_duration(d.lease_timeout),
                    fmt_duration(d.heartbeat_interval),
                    fmt_duration(d.heartbeat_interval.saturating_mul(2)),
                ),
            ));
        }
        if self.enrollment.default_max_parallel_jobs < 1 {
            return Err(Problem::new(
                "enrollment.default_max_parallel_jobs",
                "must be at least 1 (an agent given no slot runs nothing), e.g. 4",
            ));
        }
        if d.max_attempts < 1 {
            return Err(Problem::new(
                "dispatch.max_attempts",
                "must be at least 1 (the first run counts as an attempt)",
            ));
        }
        if d.default_job_timeout.is_zero() {
            return Err(Problem::new(
                "dispatch.default_job_timeout",
                "must be greater than zero, e.g. \"1h\"",
            ));
        }
        if d.default_job_timeout > d.max_job_timeout {
            return Err(Problem::new(
                "dispatch.default_job_timeout",
                format!(
                    "{} is longer than `dispatch.max_job_timeout` ({}); the default must be within the maximum",
                    fmt_duration(d.default_job_timeout),
                    fmt_duration(d.max_job_timeout),
                ),
            ));
        }

        let l = &self.limits;
        if l.max_message_size < 4 * MIB {
            return Err(Problem::new(
                "limits.max_message_size",
                format!(
                    "{} is too small; expected at least 4 MiB so job results with their report files (up to 3 MiB) and artifact chunks fit",
                    fmt_bytes(l.max_message_size)
                ),
            ));
        }
        if l.max_log_size == 0 {
            return Err(Problem::new(
                "limits.max_log_size",
                "must be greater than zero, e.g. \"16 MiB\"",
            ));
        }

        let e = &self.enrollment;
        if e.default_token_ttl.is_zero() {
            return Err(Problem::new(
                "enrollment.default_token_ttl",
                "must be greater than zero, e.g. \"24h\"",
            ));
        }
        if e.default_token_ttl > e.max_token_ttl {
            return Err(Problem::new(
                "enrollment.default_token_ttl",
                format!(
                    "{} is longer than `enrollment.max_token_ttl` ({}); the default must be within the maximum",
                    fmt_duration(e.default_token_ttl),
                    fmt_duration(e.max_token_ttl),
                ),
            ));
        }
        pipeline::problems(
            &self.upstreams,
            &self.projects,
            &self.artifacts,
            &self.pipeline,
            &self.trust,
            d.max_job_timeout,
        )?;
        notify::problems(&self.smtp, &self.notify)?;
        notify::web_problems(&self.web)?;
        network::problems(&self.network, l.max_message_size)?;
        retention::problems(&self.retention, self.pipeline.bisect_max_builds > 0)?;
        storage::problems(&self.storage)?;
        pool::problems(&self.pools, &self.hub.data_dir)
    }
}

fn check_public_address(addr: &str) -> Result<(), Problem> {
    let valid = match trunkfarm_proto::addr::split_host_port(addr) {
        Ok((host, _)) => host.parse::<IpAddr>().is_ok() || is_dns_name(host),
        Err(_) => false,
    };
    if valid {
        return Ok(());
    }
    Err(Problem::new(
        "hub.public_address",
        format!(
            "{addr:?} is not a \"host:port\" address; expected e.g. \"farm.example.org:7443\" or \"[2001:db8::1]:7443\" (no scheme, no path)"
        ),
    ))
}

/// A DNS name: dot-separated labels of letters, digits and inner hyphens.
fn is_dns_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// `deserialize_with` helpers for the config's human-readable units: the
/// shared ones, and the hub's own socket address.
mod de {
    use std::fmt;
    use std::net::SocketAddr;

    use serde::Deserializer;
    use serde::de::{self, Visitor};

    pub(crate) use trunkfarm_proto::settings::de::{byte_size, count, duration};

    const SOCKET: &str =
        "a socket address such as \"127.0.0.1:7443\", \"0.0.0.0:7443\" or \"[::]:7443\"";

    pub(super) fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = SocketAddr;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(SOCKET)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SocketAddr, E> {
                v.trim().parse().map_err(|_| {
                    E::custom(format_args!(
                        "{v:?} is not a socket address; expected {SOCKET}"
                    ))
                })
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../config/hub.example.toml");
    const FILE: &str = "/etc/trunkfarm/hub.toml";

    fn parse(text: &str) -> Result<HubConfig, ConfigError> {
        HubConfig::from_toml(text, Some(Path::new(FILE)))
    }

    fn err(text: &str) -> String {
        match parse(text) {
            Ok(c) => panic!("expected an error for {text:?}, got {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn defaults_at(dir: &str) -> HubConfig {
        let mut c = HubConfig::default_for(PathBuf::from(dir).join("trunkfarm-data"));
        c.source = Some(PathBuf::from(FILE));
        c
    }

    /// Uncomments every `#key = value` line of the example file.
    fn uncommented(example: &str) -> String {
        example
            .lines()
            .map(|l| match l.strip_prefix('#') {
                Some(rest)
                    if rest.starts_with(|c: char| c.is_ascii_lowercase())
                        || rest.starts_with("[[") =>
                {
                    rest
                }
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn defaults() {
        let c = HubConfig::default_for(PathBuf::from("/var/lib/trunkfarm"));
        assert_eq!(c.source, None);
        assert_eq!(
            c.hub.listen,
            "127.0.0.1:7443".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(c.hub.public_address, None);
        assert_eq!(c.hub.hub_id, None);
        assert_eq!(c.data_dir(), Path::new("/var/lib/trunkfarm"));
        assert!(!c.tls.plaintext);
        assert_eq!((c.tls.cert.as_ref(), c.tls.key.as_ref()), (None, None));
        assert!(c.tls.hostnames.is_empty());
        assert_eq!(
            c.admin_token_path(),
            Path::new("/var/lib/trunkfarm/admin.token")
        );
        assert_eq!(c.generated_tls_dir(), Path::new("/var/lib/trunkfarm/tls"));
        assert_eq!(c.dispatch.heartbeat_interval, Duration::from_secs(10));
        assert_eq!(c.dispatch.lease_timeout, Duration::from_secs(60));
        assert_eq!(c.dispatch.max_attempts, 3);
        assert_eq!(c.dispatch.default_job_timeout, Duration::from_secs(3600));
        assert_eq!(c.dispatch.max_job_timeout, Duration::from_secs(86400));
        assert_eq!(c.dispatch.drain_grace, Duration::from_secs(600));
        assert_eq!(c.limits.max_message_size, 4 * 1024 * 1024);
        assert_eq!(c.limits.max_log_size, 16 * 1024 * 1024);
        assert_eq!(c.enrollment.default_token_ttl, Duration::from_secs(86400));
        assert_eq!(c.enrollment.max_token_ttl, Duration::from_secs(30 * 86400));
        c.validate().unwrap();
    }

    #[test]
    fn empty_text_is_all_defaults() {
        assert_eq!(parse("").unwrap(), defaults_at("/etc/trunkfarm"));
        // Without a file, the default data dir stays relative to the cwd.
        let c = HubConfig::from_toml("", None).unwrap();
        assert_eq!(c, HubConfig::default_for(PathBuf::from("trunkfarm-data")));
        // Empty sections are fine too.
        let c = parse("[hub]\n[tls]\n[admin]\n[dispatch]\n[limits]\n[enrollment]\n").unwrap();
        assert_eq!(c, defaults_at("/etc/trunkfarm"));
    }

    #[test]
    fn example_file_parses_to_the_defaults() {
        assert_eq!(parse(EXAMPLE).unwrap(), defaults_at("/etc/trunkfarm"));
    }

    #[test]
    fn example_file_documents_every_key_with_its_default() {
        let text = uncommented(EXAMPLE);
        let c = parse(&text).unwrap();
        let mut expected = defaults_at("/etc/trunkfarm");
        // The keys without a default show example values.
        expected.hub.public_address = Some("farm.example.org:7443".into());
        expected.hub.hub_id = Some("main-farm".into());
        expected.tls.cert = Some("/etc/trunkfarm/hub.crt".into());
        expected.tls.key = Some("/etc/trunkfarm/hub.key".into());
        expected.admin.token_file = Some("/etc/trunkfarm/admin.token".into());
        expected.smtp.host = Some("smtp.example.org".into());
        expected.smtp.port = Some(587);
        expected.smtp.username = Some("farm".into());
        expected.smtp.password_file = Some("/etc/trunkfarm/smtp.password".into());
        expected.smtp.ca_file = Some("/etc/trunkfarm/smtp-ca.pem".into());
        expected.notify.public_url = Some("https://farm.example.org".into());
        expected.web.metrics_token_file = Some("/etc/trunkfarm/metrics.token".into());
        expected.upstreams = vec![UpstreamConfig {
            name: "lua".into(),
            url: "https://github.com/lua/lua.git".into(),
            branch: Some("master".into()),
            poll_interval: Duration::from_secs(60),
            platforms: vec!["linux-x86_64".into()],
            build: vec![
                "make -j4 CFLAGS='-O2 -std=c99 -DLUA_USE_LINUX' MYLIBS=-ldl".into(),
                "install -D -m 755 lua \"$PREFIX/bin/lua\"".into(),
                "install -D -m 644 -t \"$PREFIX/include\" lua.h luaconf.h lualib.h lauxlib.h"
                    .into(),
                "install -D -m 644 liblua.a \"$PREFIX/lib/liblua.a\"".into(),
            ],
            build_timeout: Duration::from_secs(3600),
            env: [("LC_ALL".to_string(), "C".to_string())].into(),
            labels: vec![],
            contacts: vec!["lua-core@example.org".into()],
            build_on: pipeline::BuildOn::Trusted,
            notify_authors: false,
        }];
        expected.projects = vec![ProjectConfig {
            name: "lpeg".into(),
            url: "https://github.com/roberto-ieru/LPeg.git".into(),
            branch: Some("master".into()),
            poll_interval: Duration::from_secs(300),
            upstreams: vec!["lua".into()],
            platforms: vec![],
            test: vec![
                "make LUADIR=\"$TRUNKFARM_RUNTIME_PREFIX/include\"".into(),
                "lua test.lua".into(),
            ],
            timeout: Duration::from_secs(1800),
            junit: vec![],
            maintainers: vec!["lpeg-dev@example.org".into()],
            labels: vec![],
            env: Default::default(),
            network: false,
            confirm: Confirm::Volunteer,
            confirm_runs: 1,
            fail_pattern: Some(crate::output::Pattern::new(r"^\[fail\]").unwrap()),
            pass_pattern: Some(crate::output::Pattern::new("^OK$").unwrap()),
            mail_classes: vec![
                crate::results::Class::Regressed,
                crate::results::Class::ProjectSide,
                crate::results::Class::Suspicious,
            ],
            flaky_after: 2,
            flaky_counts_alone: false,
        }];
        assert_eq!(c, expected);
        for key in [
            "listen",
            "public_address",
            "data_dir",
            "hub_id",
            "plaintext",
            "cert",
            "key",
            "hostnames",
            "token_file",
            "heartbeat_interval",
            "lease_timeout",
            "max_attempts",
            "default_job_timeout",
            "max_job_timeout",
            "drain_grace",
            "timeout_grace",
            "max_message_size",
            "max_log_size",
            "default_token_ttl",
            "max_token_ttl",
            "default_max_parallel_jobs",
            "keep",
            "max_size",
            "git_timeout",
            "bisect_max_builds",
            "branch",
            "poll_interval",
            "platforms",
            "build",
            "build_timeout",
            "env",
            "labels",
            "contacts",
            "upstreams",
            "test",
            "timeout",
            "junit",
            "maintainers",
            "metrics_token_file",
            "header_read_timeout",
            "request_timeout",
            "max_connections",
            "tls_handshake_timeout",
            "unauthenticated_timeout",
            "max_concurrent_streams",
            "max_unauthenticated_message_size",
            "enroll_failures",
            "enroll_failure_window",
            "network",
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
[hub]
listen = "0.0.0.0:0"
public_address = "farm.example.org:443"
data_dir = "data"
hub_id = "main-2"

[tls]
cert = "certs/hub.pem"
key = "/secret/hub.key"

[admin]
token_file = "admin/token"

[dispatch]
heartbeat_interval = "5s"
lease_timeout = "10s"
max_attempts = 1
default_job_timeout = "30m"
max_job_timeout = "30m"
drain_grace = "0s"

[limits]
max_message_size = "8 MiB"
max_log_size = 1000

[enrollment]
default_token_ttl = "1h 30m"
max_token_ttl = "7d"
"#,
        )
        .unwrap();
        assert_eq!(c.source.as_deref(), Some(Path::new(FILE)));
        assert_eq!(c.hub.listen, "0.0.0.0:0".parse::<SocketAddr>().unwrap());
        assert_eq!(
            c.hub.public_address.as_deref(),
            Some("farm.example.org:443")
        );
        assert_eq!(c.data_dir(), Path::new("/etc/trunkfarm/data"));
        assert_eq!(c.hub.hub_id.as_deref(), Some("main-2"));
        assert_eq!(
            c.tls.cert.as_deref(),
            Some(Path::new("/etc/trunkfarm/certs/hub.pem"))
        );
        assert_eq!(c.tls.key.as_deref(), Some(Path::new("/secret/hub.key")));
        assert_eq!(
            c.admin_token_path(),
            Path::new("/etc/trunkfarm/admin/token")
        );
        assert_eq!(c.dispatch.heartbeat_interval, Duration::from_secs(5));
        assert_eq!(c.dispatch.lease_timeout, Duration::from_secs(10));
        assert_eq!(c.dispatch.max_attempts, 1);
        assert_eq!(c.dispatch.default_job_timeout, Duration::from_secs(1800));
        assert_eq!(c.dispatch.max_job_timeout, Duration::from_secs(1800));
        assert_eq!(c.dispatch.drain_grace, Duration::ZERO);
        assert_eq!(c.limits.max_message_size, 8 * 1024 * 1024);
        assert_eq!(c.limits.max_log_size, 1000);
        assert_eq!(c.enrollment.default_token_ttl, Duration::from_secs(5400));
        assert_eq!(c.enrollment.max_token_ttl, Duration::from_secs(7 * 86400));
    }

    #[test]
    fn plaintext_and_hostnames() {
        let c = parse("[tls]\nplaintext = true\n").unwrap();
        assert!(c.tls.plaintext);
        let c = parse("[tls]\nhostnames = [\"farm.example.org\", \"192.0.2.10\", \"2001:db8::1\", \"*.farm.example.org\"]\n").unwrap();
        assert_eq!(c.tls.hostnames.len(), 4);
    }

    #[test]
    fn relative_paths_resolve_against_the_file_directory() {
        let c = HubConfig::from_toml(
            "[hub]\ndata_dir = \"../var/farm\"\n",
            Some(Path::new("/opt/farm/conf/hub.toml")),
        )
        .unwrap();
        assert_eq!(c.data_dir(), Path::new("/opt/farm/conf/../var/farm"));
        assert_eq!(
            c.admin_token_path(),
            Path::new("/opt/farm/conf/../var/farm/admin.token")
        );
        // A file named relatively: paths stay relative to the same directory.
        let c = HubConfig::from_toml(
            "[hub]\ndata_dir = \"d\"\n",
            Some(Path::new("conf/hub.toml")),
        )
        .unwrap();
        assert_eq!(c.data_dir(), Path::new("conf/d"));
        // Absolute paths are kept; without a file, relative paths are kept.
        let c = parse("[hub]\ndata_dir = \"/srv/farm\"\n").unwrap();
        assert_eq!(c.data_dir(), Path::new("/srv/farm"));
        let c = HubConfig::from_toml("[hub]\ndata_dir = \"d\"\n", None).unwrap();
        assert_eq!(c.data_dir(), Path::new("d"));
    }

    #[test]
    fn load_reads_the_file_and_resolves_against_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.toml");
        std::fs::write(&path, "[dispatch]\nmax_attempts = 5\n").unwrap();
        let c = HubConfig::load(&path).unwrap();
        assert_eq!(c.dispatch.max_attempts, 5);
        assert_eq!(c.source.as_deref(), Some(path.as_path()));
        assert_eq!(c.data_dir(), dir.path().join("trunkfarm-data"));
    }

    #[test]
    fn missing_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope.toml");
        let e = HubConfig::load(&path).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }));
        assert_eq!(
            e.to_string(),
            format!(
                "cannot read config file {}: No such file or directory (os error 2)",
                path.display()
            )
        );
    }

    #[test]
    fn unknown_key_at_top_level() {
        assert_eq!(
            err("[dispath]\nlease_timeout = \"1m\"\n"),
            "/etc/trunkfarm/hub.toml:1: unknown key `dispath`, expected one of `hub`, `tls`, `admin`, `dispatch`, `limits`, `enrollment`, `artifacts`, `pipeline`, `trust`, `upstream`, `project`, `smtp`, `notify`, `web`, `network`, `retention`, `storage`, `pool`"
        );
        assert_eq!(
            err("listen = \"0.0.0.0:7443\"\n"),
            "/etc/trunkfarm/hub.toml:1: unknown key `listen`, expected one of `hub`, `tls`, `admin`, `dispatch`, `limits`, `enrollment`, `artifacts`, `pipeline`, `trust`, `upstream`, `project`, `smtp`, `notify`, `web`, `network`, `retention`, `storage`, `pool`"
        );
    }

    #[test]
    fn unknown_key_nested() {
        let e =
            parse("# comment\n[dispatch]\nmax_attempts = 2\nlease_timout = \"2m\"\n").unwrap_err();
        assert_eq!(e.key(), Some("dispatch.lease_timout"));
        assert_eq!(e.line(), Some(4));
        assert_eq!(
            e.to_string(),
            "/etc/trunkfarm/hub.toml:4: unknown key `dispatch.lease_timout`, expected one of `heartbeat_interval`, `lease_timeout`, `max_attempts`, `default_job_timeout`, `max_job_timeout`, `drain_grace`, `timeout_grace`"
        );
        // Dotted keys and inline tables are checked the same way.
        assert_eq!(
            err("tls.cert_file = \"x\"\n"),
            "/etc/trunkfarm/hub.toml:1: unknown key `tls.cert_file`, expected one of `plaintext`, `cert`, `key`, `hostnames`"
        );
        assert_eq!(
            err("admin = { token = \"x\" }\n"),
            "/etc/trunkfarm/hub.toml:1: unknown key `admin.token`, expected `token_file`"
        );
    }

    #[test]
    fn errors_without_a_file_say_so() {
        let e = HubConfig::from_toml("[hub]\nport = 1\n", None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "<inline config>:2: unknown key `hub.port`, expected one of `listen`, `public_address`, `data_dir`, `hub_id`, `min_free_space`, `database_cache`"
        );
    }

    #[test]
    fn bad_duration() {
        let e = parse("[dispatch]\nlease_timeout = \"90 parsecs\"\n").unwrap_err();
        assert_eq!(e.key(), Some("dispatch.lease_timeout"));
        assert_eq!(
            e.to_string(),
            "/etc/trunkfarm/hub.toml:2: invalid value for `dispatch.lease_timeout`: \"90 parsecs\" is not a duration (unknown time unit \"parsecs\", supported units: ns, us/µs, ms, sec, min, hours, days, weeks, months, years (and few variations)); expected a duration such as \"90s\", \"10m\" or \"1h 30m\""
        );
        assert_eq!(
            err("[enrollment]\nmax_token_ttl = 30\n"),
            "/etc/trunkfarm/hub.toml:2: invalid value for `enrollment.max_token_ttl`: a bare number (30) has no unit; write it as a string with a unit, e.g. \"30s\" (expected a duration such as \"90s\", \"10m\" or \"1h 30m\")"
        );
        assert_eq!(
            err("[dispatch]\ndrain_grace = true\n"),
            "/etc/trunkfarm/hub.toml:2: invalid value for `dispatch.drain_grace`: invalid type: boolean `true`, expected a duration such as \"90s\", \"10m\" or \"1h 30m\""
        );
    }

    #[test]
    fn bad_byte_size() {
        let e = parse("[limits]\nmax_log_size = \"16 MB/s\"\n").unwrap_err();
        assert_eq!(e.key(), Some("limits.max_log_size"));
        assert_eq!(
            e.to_string(),
            "/etc/trunkfarm/hub.toml:2: invalid value for `limits.max_log_size`: \"16 MB/s\" is not a byte size; expected a size such as \"4 MiB\", \"512 KiB\" or a whole number of bytes (units: B, KiB, MiB, GiB, or KB, MB, GB for powers of 1000)"
        );
        assert!(err("[limits]\nmax_log_size = \"MiB\"\n").contains("\"MiB\" is not a byte size"));
        assert!(err("[limits]\nmax_log_size = \"-1 MiB\"\n").contains("is not a byte size"));
        assert_eq!(
            err("[limits]\nmax_log_size = -5\n"),
            "/etc/trunkfarm/hub.toml:2: invalid value for `limits.max_log_size`: -5 is negative; expected a size such as \"4 MiB\", \"512 KiB\" or a whole number of bytes"
        );
        let c =
            parse("[limits]\nmax_message_size = \"4.5 MiB\"\nmax_log_size = \"2MB\"\n").unwrap();
        assert_eq!(c.limits.max_message_size, 4608 * 1024);
        assert_eq!(c.limits.max_log_size, 2_000_000);
    }

    #[test]
    fn bad_types() {
        assert_eq!(
            err("[dispatch]\nmax_attempts = \"3\"\n"),
            "/etc/trunkfarm/hub.toml:2: invalid value for `dispatch.max_attempts`: invalid type: string \"3\", expected a whole number such as 3"
        );
        assert_eq!(
            err("[dispatch]\nmax_attempts = -1\n"),
            "/etc/trunkfarm/hub.toml:2: invalid value for `dispatch.max_attempts`: -1 is out of range; expected a whole number such as 3"
        );
        assert_eq!(
            err("[tls]\nplaintext = \"yes\"\n"),
            "/etc/trunkfarm/hub.toml:2: invalid value for `tls.plaintext`: invalid type: string \"yes\", expected a boolean"
        );
        assert_eq!(
            err("[tls]\nhostnames = [\"a\", 3]\n"),
            "/etc/trunkfarm/hub.toml:2: invalid value for `tls.hostnames[1]`: invalid type: integer `3`, expected a string"
        );
        assert_eq!(
            err("hub = 3\n"),
            "/etc/trunkfarm/hub.toml:1: invalid value for `hub`: invalid type: integer `3`, expected a [hub] table"
        );
    }

    #[test]
    fn syntax_error_names_the_line() {
        let e = parse("[hub]\ndata_dir = \"x\"\nlisten = \"1.2.3.4:5\n").unwrap_err();
        assert!(matches!(e, ConfigError::Syntax { .. }));
        assert_eq!(e.line(), Some(3));
        assert_eq!(
            e.to_string(),
            "/etc/trunkfarm/hub.toml:3: TOML syntax error: invalid basic string, expected `\"`"
        );
        assert_eq!(
            err("[hub]\n\n[hub]\n"),
            "/etc/trunkfarm/hub.toml:3: TOML syntax error: duplicate key"
        );
    }

    #[test]
    fn listen_must_be_a_socket_address() {
        assert_eq!(
            err("[hub]\nlisten = \"localhost:7443\"\n"),
            "/etc/trunkfarm/hub.toml:2: invalid value for `hub.listen`: \"localhost:7443\" is not a socket address; expected a socket address such as \"127.0.0.1:7443\", \"0.0.0.0:7443\" or \"[::]:7443\""
        );
        assert!(err("[hub]\nlisten = \"127.0.0.1\"\n").contains("is not a socket address"));
        let c = parse("[hub]\nlisten = \"[::]:0\"\n").unwrap();
        assert_eq!(c.hub.listen.port(), 0);
    }

    #[test]
    fn public_address_needs_a_host_and_port() {
        for ok in [
            "farm.example.org:443",
            "192.0.2.1:7443",
            "[2001:db8::1]:7443",
            "farm:1",
        ] {
            parse(&format!("[hub]\npublic_address = \"{ok}\"\n")).unwrap();
        }
        assert_eq!(
            err("[hub]\npublic_address = \"farm.example.org\"\n"),
            "/etc/trunkfarm/hub.toml:2: invalid `hub.public_address`: \"farm.example.org\" is not a \"host:port\" address; expected e.g. \"farm.example.org:7443\" or \"[2001:db8::1]:7443\" (no scheme, no path)"
        );
        for bad in [
            "https://farm.example.org:443",
            "farm:0",
            "farm:http",
            ":7443",
            "2001:db8::1",
            "farm:443/x",
            "farm:70000",
        ] {
            assert!(
                err(&format!("[hub]\npublic_address = \"{bad}\"\n"))
                    .contains("is not a \"host:port\" address"),
                "{bad}"
            );
        }
    }

    #[test]
    fn hub_id_charset_and_length() {
        parse("[hub]\nhub_id = \"farm-01\"\n").unwrap();
        parse(&format!("[hub]\nhub_id = \"{}\"\n", "a".repeat(32))).unwrap();
        assert_eq!(
            err("[hub]\nhub_id = \"Main\"\n"),
            "/etc/trunkfarm/hub.toml:2: invalid `hub.hub_id`: \"Main\" is not a valid hub id; expected 1 to 32 characters from a-z, 0-9 and '-'"
        );
        for bad in [String::new(), "a".repeat(33), "a_b".into(), "é".into()] {
            assert!(err(&format!("[hub]\nhub_id = \"{bad}\"\n")).contains("is not a valid hub id"));
        }
    }

    #[test]
    fn database_cache_is_a_size_of_at_least_a_mebibyte() {
        assert_eq!(parse("").unwrap().hub.database_cache, 128 << 20);
        assert_eq!(
            parse("[hub]\ndatabase_cache = \"512 MiB\"\n")
                .unwrap()
                .hub
                .database_cache,
            512 << 20
        );
        assert_eq!(
            err("[hub]\ndatabase_cache = \"64 KiB\"\n"),
            "/etc/trunkfarm/hub.toml:2: invalid `hub.database_cache`: 64.0 KiB is too small for the database's page cache; give at least 1.0 MiB (the default is 128.0 MiB)"
        );
    }

    #[test]
    fn tls_cert_and_key_both_or_neither() {
        assert_eq!(
            err("[tls]\ncert = \"hub.pem\"\n"),
            "/etc/trunkfarm/hub.toml: invalid `tls.key`: `tls.cert` is set but `tls.key` is not; give both (your own certificate) or neither (the hub generates one)"
        );
        assert_eq!(
            err("[tls]\nkey = \"hub.key\"\n"),
            "/etc/trunkfarm/hub.toml: invalid `tls.cert`: `tls.key` is set but `tls.cert` is not; give both (your own certificate) or neither (the hub generates one)"
        );
    }

    #[test]
    fn tls_contradictions() {
        assert_eq!(
            err("[tls]\nplaintext = true\ncert = \"hub.pem\"\nkey = \"hub.key\"\n"),
            "/etc/trunkfarm/hub.toml:3: invalid `tls.cert`: `tls.cert` is set but `tls.plaintext = true` turns TLS off; remove one of them"
        );
        assert_eq!(
            err("[tls]\nplaintext = true\nkey = \"hub.key\"\n"),
            "/etc/trunkfarm/hub.toml:3: invalid `tls.key`: `tls.key` is set but `tls.plaintext = true` turns TLS off; remove one of them"
        );
        assert_eq!(
            err("[tls]\nplaintext = true\nhostnames = [\"farm.example.org\"]\n"),
            "/etc/trunkfarm/hub.toml:3: invalid `tls.hostnames`: `tls.hostnames` names the hub's generated certificate, but `tls.plaintext = true` turns TLS off; remove one of them"
        );
        assert_eq!(
            err("[tls]\ncert = \"a\"\nkey = \"b\"\nhostnames = [\"farm.example.org\"]\n"),
            "/etc/trunkfarm/hub.toml:4: invalid `tls.hostnames`: `tls.hostnames` only applies to the certificate the hub generates, and `tls.cert` supplies your own; put the names in your certificate and remove `tls.hostnames`"
        );
        assert_eq!(
            err("[tls]\nhostnames = [\"ok.example.org\", \"not a name\"]\n"),
            "/etc/trunkfarm/hub.toml:2: invalid `tls.hostnames`: \"not a name\" is neither a DNS name nor an IP address; expected names such as \"farm.example.org\" or \"192.0.2.10\""
        );
    }

    #[test]
    fn bad_paths() {
        assert_eq!(
            err("[hub]\ndata_dir = \"\"\n"),
            "/etc/trunkfarm/hub.toml:2: invalid `hub.data_dir`: must not be empty; give a path"
        );
        assert_eq!(
            err("[admin]\ntoken_file = \"~/token\"\n"),
            "/etc/trunkfarm/hub.toml:2: invalid `admin.token_file`: ~/token starts with `~`, which is not expanded here; write the full path"
        );
    }

    #[test]
    fn lease_timeout_at_least_twice_the_heartbeat() {
        parse("[dispatch]\nheartbeat_interval = \"30s\"\n").unwrap();
        let e = parse("[dispatch]\nheartbeat_interval = \"40s\"\n").unwrap_err();
        assert_eq!(e.key(), Some("dispatch.lease_timeout"));
        assert_eq!(
            e.to_string(),
            "/etc/trunkfarm/hub.toml: invalid `dispatch.lease_timeout`: 1m is less than twice `dispatch.heartbeat_interval` (40s); expected at least 1m 20s, so one late heartbeat does not requeue a running job"
        );
        // When the key is written, the line is given.
        assert_eq!(
            err("[dispatch]\nlease_timeout = \"15s\"\n"),
            "/etc/trunkfarm/hub.toml:2: invalid `dispatch.lease_timeout`: 15s is less than twice `dispatch.heartbeat_interval` (10s); expected at least 20s, so one late heartbeat does not requeue a running job"
        );
        assert_eq!(
            err("[dispatch]\nheartbeat_interval = \"0s\"\n"),
            "/etc/trunkfarm/hub.toml:2: invalid `dispatch.heartbeat_interval`: must be greater than zero, e.g. \"10s\""
        );
    }

    #[test]
    fn max_attempts_at_least_one() {
        assert_eq!(
            err("[dispatch]\nmax_attempts = 0\n"),
            "/etc/trunkfarm/hub.toml:2: invalid `dispatch.max_attempts`: must be at least 1 (the first run counts as an attempt)"
        );
    }

    #[test]
    fn self_service_subscription_keys() {
        let c = parse("[notify]\nself_subscribe = false\nsubscribe_link_ttl = \"2h\"\nsubscribe_per_address = 1\nsubscribe_per_client = 50\n").unwrap();
        assert!(!c.notify.self_subscribe);
        assert_eq!(c.notify.subscribe_link_ttl, Duration::from_secs(2 * 3600));
        assert_eq!(
            (
                c.notify.subscribe_per_address,
                c.notify.subscribe_per_client
            ),
            (1, 50)
        );
        assert_eq!(
            err("[notify]\nsubscribe_per_address = 0\n"),
            "/etc/trunkfarm/hub.toml:2: invalid `notify.subscribe_per_address`: must be at least 1 (to stop self-service subscription, set `notify.self_subscribe = false`)"
        );
        assert_eq!(
            err("[notify]\nsubscribe_link_ttl = \"0s\"\n"),
            "/etc/trunkfarm/hub.toml:2: invalid `notify.subscribe_link_ttl`: 0s is too short; expected e.g. \"7d\""
        );
    }

    #[test]
    fn job_timeouts() {
        assert_eq!(
            err("[dispatch]\ndefault_job_timeout = \"2d\"\n"),
            "/etc/trunkfarm/hub.toml:2: invalid `dispatch.default_job_timeout`: 2d is longer than `dispatch.max_job_timeout` (1d); the default must be within the maximum"
        );
        assert_eq!(
            err("[dispatch]\ndefault_job_timeout = \"0s\"\n"),
            "/etc/trunkfarm/hub.toml:2: invalid `dispatch.default_job_timeout`: must be greater than zero, e.g. \"1h\""
        );
    }

    #[test]
    fn size_limits() {
        assert_eq!(
            err("[limits]\nmax_message_size = \"32 KiB\"\n"),
            "/etc/trunkfarm/hub.toml:2: invalid `limits.max_message_size`: 32.0 KiB is too small; expected at least 4 MiB so job results with their report files (up to 3 MiB) and artifact chunks fit"
        );
        assert_eq!(
            err("[limits]\nmax_log_size = 0\n"),
            "/etc/trunkfarm/hub.toml:2: invalid `limits.max_log_size`: must be greater than zero, e.g. \"16 MiB\""
        );
    }

    #[test]
    fn retention_rules() {
        let c = parse("").unwrap();
        assert_eq!(c.retention.runs, Duration::from_secs(180 * 86400));
        assert_eq!(c.retention.test_cases, Duration::from_secs(30 * 86400));
        assert_eq!(c.retention.logs, Duration::from_secs(90 * 86400));
        assert_eq!(c.retention.keep_last, 50);
        let c = parse("[retention]\nruns = \"2h\"\ntest_cases = \"30m\"\nkeep_last = 3\n").unwrap();
        assert_eq!(c.retention.runs, Duration::from_secs(7200));
        assert_eq!(c.retention.keep_last, 3);
        assert_eq!(
            err("[retention]\nlogs = \"0s\"\n"),
            "/etc/trunkfarm/hub.toml:2: invalid `retention.logs`: must be greater than zero, e.g. \"90d\""
        );
        assert_eq!(
            err("[retention]\nkeep_last = 0\n"),
            "/etc/trunkfarm/hub.toml:2: invalid `retention.keep_last`: must be at least 1 (each series' latest result is always kept), e.g. 50"
        );
        assert_eq!(
            err("[retention]\nruns = \"7d\"\n"),
            "/etc/trunkfarm/hub.toml: invalid `retention.test_cases`: 30d is longer than `retention.runs` (7d); a run's test cases go with the run, so keep them at most as long"
        );
        assert_eq!(
            err("[retention]\nrun = \"7d\"\n"),
            "/etc/trunkfarm/hub.toml:2: unknown key `retention.run`, expected one of `runs`, `keep_last`, `test_cases`, `logs`, `jobs`, `interval`"
        );
        assert!(err("[retention]\nruns = \"soon\"\n").contains("retention.runs"));
        assert_eq!(
            err("[retention]\njobs = \"1d\"\nlogs = \"1d\"\n"),
            "/etc/trunkfarm/hub.toml:2: invalid `retention.jobs`: 1d is too short; expected at least 2d, the longest a bisection runs (it reads its jobs' records until it answers), or turn bisection off (`pipeline.bisect_max_builds = 0`)"
        );
        // Without bisection nothing reads a finished job's record later:
        // seconds are allowed (the retention e2e test uses them).
        let c = parse(
            "[pipeline]\nbisect_max_builds = 0\n[retention]\nruns = \"4s\"\ntest_cases = \"2s\"\nlogs = \"2s\"\njobs = \"4s\"\ninterval = \"1s\"\n",
        )
        .unwrap();
        assert_eq!(c.retention.jobs, Duration::from_secs(4));
        assert_eq!(
            err("[retention]\njobs = \"3d\"\n"),
            "/etc/trunkfarm/hub.toml: invalid `retention.logs`: 90d is longer than `retention.jobs` (3d); a job's log goes with its record, so keep it at most as long"
        );
    }

    #[test]
    fn token_ttls() {
        assert_eq!(
            err("[enrollment]\nmax_token_ttl = \"1h\"\n"),
            "/etc/trunkfarm/hub.toml: invalid `enrollment.default_token_ttl`: 1d is longer than `enrollment.max_token_ttl` (1h); the default must be within the maximum"
        );
        assert_eq!(
            err("[enrollment]\ndefault_token_ttl = \"0s\"\n"),
            "/etc/trunkfarm/hub.toml:2: invalid `enrollment.default_token_ttl`: must be greater than zero, e.g. \"24h\""
        );
    }

    #[test]
    fn validate_after_changes() {
        let mut c = HubConfig::default_for("d".into());
        c.dispatch.max_attempts = 0;
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "<inline config>: invalid `dispatch.max_attempts`: must be at least 1 (the first run counts as an attempt)"
        );
    }

    const PIPELINE: &str = r#"
[[upstream]]
name = "cpython"
url = "https://github.com/python/cpython.git"
build = ["make install"]

[[project]]
name = "attrs"
url = "https://github.com/python-attrs/attrs.git"
test = ["pytest"]
"#;

    #[test]
    fn pipeline_defaults() {
        let c = parse(PIPELINE).unwrap();
        let u = &c.upstreams[0];
        assert_eq!(
            u.branch, None,
            "the default branch is asked of the repository"
        );
        assert_eq!(u.platforms, ["linux-x86_64"]);
        assert_eq!(u.poll_interval, Duration::from_secs(60));
        let p = &c.projects[0];
        assert!(p.tests_against("cpython"));
        assert_eq!(p.platforms_for(u), ["linux-x86_64"]);
        assert_eq!(p.timeout, Duration::from_secs(1800));
    }

    #[test]
    fn pipeline_errors_name_the_entry_and_line() {
        let e = err(&format!(
            "{PIPELINE}\n[[project]]\nname = \"attrs\"\nurl = \"x\"\ntest = [\"t\"]\n"
        ));
        assert!(
            e.contains("project[1].name") && e.contains("two projects are named \"attrs\""),
            "{e}"
        );
        assert!(e.starts_with("/etc/trunkfarm/hub.toml:13:"), "{e}");

        let e = err(&PIPELINE.replace(
            "test = [\"pytest\"]",
            "test = [\"pytest\"]\nupstreams = [\"pypy\"]",
        ));
        assert!(
            e.contains("project[0].upstreams")
                && e.contains("\"pypy\"")
                && e.contains("known upstreams: cpython"),
            "{e}"
        );

        let e = err(&PIPELINE.replace("build = [\"make install\"]", "build = []"));
        assert!(
            e.contains("upstream[0].build") && e.contains("at least one command"),
            "{e}"
        );

        let e = err(&PIPELINE.replace("name = \"cpython\"", "name = \"c python\""));
        assert!(
            e.contains("upstream[0].name") && e.contains("not a valid upstream name"),
            "{e}"
        );

        let e = err(&format!("{PIPELINE}timeout = \"48h\"\n"));
        assert!(
            e.contains("project[0].timeout") && e.contains("dispatch.max_job_timeout"),
            "{e}"
        );

        let e = err(&format!("{PIPELINE}junit = [\"../x.xml\"]\n"));
        assert!(
            e.contains("project[0].junit") && e.contains("inside the checkout"),
            "{e}"
        );

        let e = err(&format!("{PIPELINE}maintainers = [\"nobody\"]\n"));
        assert!(
            e.contains("project[0].maintainers") && e.contains("not an email address"),
            "{e}"
        );

        let e = err(&format!("{PIPELINE}env = {{ PREFIX = \"/x\" }}\n"));
        assert!(e.contains("set by trunkfarm itself"), "{e}");

        let e = err(&PIPELINE.replace(
            "build = [\"make install\"]",
            "build = [\"make install\"]\npoll_interval = \"10ms\"",
        ));
        assert!(
            e.contains("upstream[0].poll_interval") && e.contains("too short"),
            "{e}"
        );

        let e = err(&format!("{PIPELINE}colour = \"red\"\n"));
        assert!(e.contains("unknown key `project[0].colour`"), "{e}");

        let e = err("[[project]]\nname = \"a\"\nurl = \"x\"\ntest = [\"t\"]\n");
        assert!(e.contains("no upstream to test against"), "{e}");

        let e = err("[artifacts]\nkeep = 0\n");
        assert!(e.contains("artifacts.keep"), "{e}");

        let e = err(&format!("{PIPELINE}confirm = \"sometimes\"\n"));
        assert!(
            e.contains("project[0].confirm")
                && e.contains("`volunteer`, `always`")
                && e.contains("`never`"),
            "{e}"
        );

        let e = err(&PIPELINE.replace(
            "build = [\"make install\"]",
            "build = [\"make install\"]\nbuild_on = \"volunteers\"",
        ));
        assert!(
            e.contains("upstream[0].build_on") && e.contains("`trusted` or `any`"),
            "{e}"
        );

        let e = err("[trust]\nquarantine_after = 5\nquarantine_window = 4\n");
        assert!(
            e.contains("trust.quarantine_window") && e.contains("quarantine_after` (5)"),
            "{e}"
        );
    }

    #[test]
    fn confirmation_and_build_trust_are_set_per_entry() {
        let c = parse(&format!(
            "{}confirm = \"always\"\n[trust]\nquarantine_after = 0\n",
            PIPELINE.replace(
                "build = [\"make install\"]",
                "build = [\"make install\"]\nbuild_on = \"any\"",
            )
        ))
        .unwrap();
        assert_eq!(c.upstreams[0].build_on, pipeline::BuildOn::Any);
        assert_eq!(c.projects[0].confirm, Confirm::Always);
        assert_eq!(c.trust.quarantine_after, 0, "0: never quarantine");
        let runs = parse(&format!("{PIPELINE}confirm_runs = 3\n")).unwrap();
        assert_eq!(runs.projects[0].confirm_runs, 3);
        let e = parse(&format!("{PIPELINE}confirm_runs = 0\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("confirm_runs") && e.contains("use 1 to 10"),
            "{e}"
        );
        let d = parse(PIPELINE).unwrap();
        assert_eq!(
            (d.upstreams[0].build_on, d.projects[0].confirm),
            (pipeline::BuildOn::Trusted, Confirm::Volunteer)
        );
        assert_eq!(d.projects[0].confirm_runs, 1);
        assert_eq!(
            (d.trust.quarantine_after, d.trust.quarantine_window),
            (3, 10)
        );
    }

    #[test]
    fn cpython_example_parses() {
        let text = include_str!("../../config/examples/cpython.toml");
        let c = parse(text).unwrap();
        assert_eq!(c.upstreams[0].name, "cpython");
        assert!(c.projects.len() >= 4);
        assert!(c.projects.iter().all(|p| p.junit == ["junit.xml"]));
    }

    #[test]
    fn pool_rules_name_the_key() {
        let c = parse("[[pool]]\nname = \"local\"\nprovisioner = \"local\"\nmax_instances = 3\n")
            .unwrap();
        assert_eq!(c.pools[0].provisioner, ProvisionerKind::Local);
        assert_eq!(c.pools[0].idle_timeout, Duration::from_secs(600));
        let e = err("[[pool]]\nname = \"p\"\nprovisioner = \"docker\"\n");
        assert!(
            e.contains("pool[0].provisioner") && e.contains("`local`, `command`, `ec2`"),
            "{e}"
        );
        let e = err(
            "[[pool]]\nname = \"p\"\nprovisioner = \"local\"\nmin_instances = 3\nmax_instances = 2\n",
        );
        assert!(
            e.contains("pool[0].max_instances") && e.contains("less than min_instances = 3"),
            "{e}"
        );
        let e = err("[[pool]]\nname = \"p\"\nprovisioner = \"command\"\nstart_command = \"x\"\n");
        assert!(e.contains("pool[0].stop_command"), "{e}");
        let e = err("[[pool]]\nname = \"p\"\nprovisioner = \"local\"\nidle = \"1m\"\n");
        assert!(e.contains("unknown key `pool[0].idle`"), "{e}");
    }

    #[test]
    fn a_local_pool_keeps_its_agents_out_of_the_data_dir() {
        let local = "[[pool]]\nname = \"p\"\nprovisioner = \"local\"\n";
        // By default beside the data dir, not in it; a relative `dir` is the
        // config file's.
        let c = parse(local).unwrap();
        let data = c.data_dir().to_path_buf();
        assert_eq!(
            c.pools[0].local_dir(&data),
            Path::new("/etc/trunkfarm/trunkfarm-data-pools/p")
        );
        assert_eq!(c.pools[0].sandbox, AgentSandbox::Auto);
        assert_eq!(
            c.pools[0].local_dir(Path::new("/var/lib/trunkfarm/")),
            Path::new("/var/lib/trunkfarm-pools/p")
        );
        let c = parse(&format!("{local}dir = \"pools/p\"\nsandbox = \"none\"\n")).unwrap();
        assert_eq!(
            c.pools[0].local_dir(&data),
            Path::new("/etc/trunkfarm/pools/p")
        );
        assert_eq!(c.pools[0].sandbox.as_arg(), "none");
        for dir in [
            "trunkfarm-data/pools",
            "trunkfarm-data",
            "/etc",
            "/etc/trunkfarm/",
        ] {
            let e = err(&format!("{local}dir = \"{dir}\"\n"));
            assert!(
                e.contains("pool[0].dir") && e.contains("overlaps the hub's data dir"),
                "{dir}: {e}"
            );
        }
        for user in ["root", ""] {
            let e = err(&format!("{local}user = \"{user}\"\n"));
            assert!(
                e.contains("pool[0].user") && e.contains("an unprivileged user"),
                "{e}"
            );
        }
        // Each provisioner's own keys.
        let command = "[[pool]]\nname = \"p\"\nprovisioner = \"command\"\nstart_command = \"a\"\nstop_command = \"b\"\n";
        for key in [
            "user = \"u\"",
            "dir = \"/d\"",
            "sandbox = \"none\"",
            "agent_binary = \"/a\"",
        ] {
            let e = err(&format!("{command}{key}\n"));
            assert!(e.contains("only for provisioner = \"local\""), "{key}: {e}");
        }
        let c = parse(&format!("{command}pass_env = [\"LIBVIRT_DEFAULT_URI\"]\n")).unwrap();
        assert_eq!(c.pools[0].pass_env, ["LIBVIRT_DEFAULT_URI"]);
        let e = err(&format!("{command}pass_env = [\"A=B\"]\n"));
        assert!(e.contains("not an environment variable's name"), "{e}");
        let e = err(&format!("{local}pass_env = [\"X\"]\n"));
        assert!(e.contains("only for provisioner = \"command\""), "{e}");
    }
}

/// Property-based fuzzing of the parser; see the module. `pub(crate)` for the
/// shared case-count settings of the hub's fuzz tests.
#[cfg(test)]
pub(crate) mod fuzz;
