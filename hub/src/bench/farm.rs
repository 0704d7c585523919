//! The benchmark's farm: a hub as a separate `trunkfarm serve` process (so
//! its memory and restarts are its own), `trunkfarm-agent` processes, and
//! agent identities this process uses for sessions it holds itself.

use super::BenchArgs;
use crate::config::AgentSandbox;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::process::{Child, Command};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use trunkfarm_proto::dial::{self, DialOptions, HubTrust};
use trunkfarm_proto::v1::agent_service_client::AgentServiceClient;
use trunkfarm_proto::v1::{CreateTokenRequest, EnrollRequest, ListAgentsRequest};

use crate::admin_client::{self as client, AdminClient};
use crate::config::HubConfig;
use crate::server::HubInfo;

/// Marks a directory as the benchmark's own, so it may be wiped next time.
const MARKER: &str = ".trunkfarm-bench";

/// Names a profiler command the hub is started under (its output lands
/// where that tool puts it); the hub's own pid, from hub.json, is measured.
pub(super) const WRAP_ENV: &str = "TRUNKFARM_BENCH_WRAP";

/// How long a hub may take to write `hub.json`.
const HUB_START_TIMEOUT: Duration = Duration::from_secs(120);

/// How long agents may take to connect.
const AGENTS_TIMEOUT: Duration = Duration::from_secs(60);

/// Creates the benchmark's directory (wiping an earlier benchmark's).
pub(super) fn prepare_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    crate::demo::prepare_dir(dir, MARKER)
}

/// A hub process.
pub(super) struct BenchHub {
    /// Its directory (config, data, logs).
    pub(crate) dir: PathBuf,
    /// Its config.
    pub(crate) cfg: HubConfig,
    /// What it wrote to hub.json.
    pub(crate) info: HubInfo,
    child: Child,
    http: reqwest::Client,
}

impl BenchHub {
    /// Writes a config with the `[hub]` keys `args` sets and `extra` TOML
    /// appended, and starts the hub.
    pub(super) async fn start(
        dir: &Path,
        args: &BenchArgs,
        extra: &str,
    ) -> anyhow::Result<BenchHub> {
        std::fs::create_dir_all(dir)?;
        let config = dir.join("hub.toml");
        std::fs::write(
            &config,
            format!(
                "[hub]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"data\"\n{}\n[web]\nlisten = \"127.0.0.1:0\"\n{extra}\n",
                args.hub_keys()
            ),
        )?;
        let cfg = HubConfig::load(&config)?;
        Self::spawn(dir, cfg).await
    }

    /// Starts the hub of `cfg` (again) and waits for it to serve.
    pub(super) async fn spawn(dir: &Path, cfg: HubConfig) -> anyhow::Result<BenchHub> {
        let (child, info, _) = Self::spawn_timed(dir, &cfg).await?;
        Ok(Self::adopt(dir, cfg, child, info))
    }

    /// A hub started with [`BenchHub::spawn_timed`].
    pub(super) fn adopt(dir: &Path, cfg: HubConfig, child: Child, info: HubInfo) -> BenchHub {
        BenchHub {
            dir: dir.to_path_buf(),
            cfg,
            info,
            child,
            http: reqwest::Client::new(),
        }
    }

    /// Starts the hub and returns it with the time it took to write hub.json.
    pub(super) async fn spawn_timed(
        dir: &Path,
        cfg: &HubConfig,
    ) -> anyhow::Result<(Child, HubInfo, Duration)> {
        let info_path = cfg.data_dir().join(crate::server::HUB_INFO_FILE);
        let _ = std::fs::remove_file(&info_path);
        let exe = std::env::current_exe().context("cannot find this trunkfarm binary")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("hub.log"))?;
        let config = cfg
            .source
            .clone()
            .context("the benchmark's hub config has no file")?;
        let started = Instant::now();
        // A profiler to run the hub under, e.g. "heaptrack" or "perf record -g".
        let wrapper = std::env::var(WRAP_ENV).unwrap_or_default();
        let mut words = wrapper.split_whitespace();
        let mut command = match words.next() {
            Some(program) => {
                let mut c = Command::new(program);
                c.args(words).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        let mut child = command
            .arg("--config")
            .arg(&config)
            .arg("serve")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start `trunkfarm serve`")?;
        let pid = child.id().unwrap_or(0);
        loop {
            if let Ok(info) = HubInfo::read(cfg.data_dir())
                && (info.pid == pid || !wrapper.is_empty())
            {
                return Ok((child, info, started.elapsed()));
            }
            if let Some(status) = child.try_wait()? {
                bail!(
                    "the hub exited ({status}) before serving; see {}",
                    dir.join("hub.log").display()
                );
            }
            if started.elapsed() > HUB_START_TIMEOUT {
                bail!(
                    "the hub did not serve within {HUB_START_TIMEOUT:?}; see {}",
                    dir.join("hub.log").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// An admin client.
    pub(super) async fn admin(&self) -> anyhow::Result<AdminClient> {
        client::connect(&self.cfg).await
    }

    /// The hub's process id.
    pub(super) fn pid(&self) -> u32 {
        self.info.pid
    }

    /// Resident memory of the hub process, bytes.
    pub(super) fn rss_bytes(&self) -> anyhow::Result<u64> {
        rss_bytes(self.pid())
    }

    /// One counter or gauge from `/metrics` (the first sample of `name`).
    pub(super) async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        let text = self
            .http
            .get(format!("http://{}/metrics", self.info.web))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                (k == name).then(|| v.parse::<f64>().ok()).flatten()
            })
            .with_context(|| format!("the hub's /metrics has no {name}"))
    }

    /// Stops the hub: SIGTERM, then waits (it flushes and exits).
    pub(super) async fn stop(mut self) -> anyhow::Result<()> {
        // The hub itself (hub.json's pid), which may be a profiler's child.
        let pid = self.info.pid;
        if pid != 0 && self.child.id().is_some() {
            // SAFETY: kill(2) on the hub we started, which is still running
            // (our child, or our child's, not yet reaped).
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
        }
        match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(status) => {
                status?;
            }
            Err(_) => {
                self.child.kill().await?;
                bail!("the hub did not stop within 30 s of SIGTERM");
            }
        }
        Ok(())
    }

    /// An enrollment string for `uses` agents.
    pub(super) async fn enrollment(&self, uses: u32) -> anyhow::Result<String> {
        Ok(self
            .admin()
            .await?
            .create_token(CreateTokenRequest {
                uses,
                note: "trunkfarm bench".into(),
                // The bench's own machines: trusted, and given the slots
                // they claim (the figures measure dispatch, not the cap).
                trusted: true,
                max_parallel_jobs: u32::MAX,
                ..Default::default()
            })
            .await?
            .into_inner()
            .enrollment)
    }

    /// Waits until `n` agents are connected.
    pub(super) async fn wait_connected(&self, n: usize) -> anyhow::Result<()> {
        let mut admin = self.admin().await?;
        let deadline = Instant::now() + AGENTS_TIMEOUT;
        loop {
            let agents = admin
                .list_agents(ListAgentsRequest {})
                .await?
                .into_inner()
                .agents;
            let up = agents.iter().filter(|a| a.connected).count();
            if up >= n {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("only {up} of {n} agents connected within {AGENTS_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts `n` enrolled `trunkfarm-agent` processes running `parallel`
    /// jobs each under `sandbox`, and waits until they are connected.
    pub(super) async fn start_agents(
        &self,
        n: usize,
        parallel: u32,
        sandbox: AgentSandbox,
    ) -> anyhow::Result<Vec<Child>> {
        let bin = crate::provision::local::find_agent_binary()?;
        let enrollment = self.enrollment(n as u32).await?;
        let mut children = Vec::new();
        for i in 1..=n {
            children.push(
                crate::provision::local::start_agent(
                    &bin,
                    &self.dir,
                    "bench",
                    i,
                    &enrollment,
                    parallel,
                    Some(sandbox),
                )
                .await?,
            );
        }
        self.wait_connected(n).await?;
        Ok(children)
    }

    /// Enrolls `n` agent identities for sessions this process holds itself,
    /// `concurrency` enrollments at a time.
    pub(super) async fn enroll_identities(
        &self,
        n: usize,
        concurrency: usize,
    ) -> anyhow::Result<Vec<Identity>> {
        let enrollment = self.enrollment(n as u32).await?;
        let parsed = trunkfarm_proto::enrollment::Enrollment::parse(&enrollment)?;
        let channel = self.agent_channel().await?;
        let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..n {
            let permit = sem.clone().acquire_owned().await?;
            let mut client = AgentServiceClient::new(channel.clone());
            let token = parsed.token.clone();
            tasks.spawn(async move {
                let r = client
                    .enroll(EnrollRequest {
                        token,
                        name: format!("bench-idle-{i}"),
                        protocol_version: trunkfarm_proto::PROTOCOL_VERSION,
                        agent_version: "bench".into(),
                    })
                    .await;
                drop(permit);
                r
            });
        }
        let mut out = Vec::with_capacity(n);
        while let Some(r) = tasks.join_next().await {
            let resp = r??.into_inner();
            out.push(Identity::new(&resp.agent_id, &resp.secret)?);
        }
        Ok(out)
    }

    /// A new TLS connection to the hub, as agents make it.
    pub(super) async fn agent_channel(&self) -> anyhow::Result<Channel> {
        self.dialer().channel().await
    }

    /// How agents reach this hub (the same after a restart on its port).
    pub(super) fn dialer(&self) -> Dialer {
        Dialer {
            address: self.info.address.clone(),
            ca_sha256: self.info.ca_sha256.clone(),
        }
    }
}

/// A hub's address and CA pin: what an agent dials.
#[derive(Clone, Debug)]
pub(super) struct Dialer {
    /// `127.0.0.1:PORT`.
    pub(crate) address: String,
    /// The pinned CA's SHA-256, hex.
    pub(crate) ca_sha256: String,
}

impl Dialer {
    /// A new TLS connection, as agents make it.
    pub(super) async fn channel(&self) -> anyhow::Result<Channel> {
        let trust = HubTrust::PinnedCa {
            sha256: self.ca_sha256.clone(),
        };
        Ok(dial::connect(&self.address, &trust, &DialOptions::default()).await?)
    }
}

/// An enrolled agent's credential.
#[derive(Clone)]
pub(super) struct Identity {
    /// The `authorization` metadata value.
    pub(crate) bearer: MetadataValue<Ascii>,
}

impl Identity {
    fn new(agent_id: &str, secret: &str) -> anyhow::Result<Identity> {
        Ok(Identity {
            bearer: format!("Bearer {agent_id}.{secret}").parse()?,
        })
    }

    /// `request` with this agent's credential.
    pub(super) fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(message);
        r.metadata_mut()
            .insert(trunkfarm_proto::AUTHORIZATION, self.bearer.clone());
        r
    }
}

/// CPU time (user + system) process `pid` used so far, with that of the
/// children it waited for (an agent's job commands), seconds; 0 if it cannot
/// be read.
pub(super) fn cpu_seconds(pid: u32) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // Fields after the command name (which may hold spaces) start
            // at field 3: utime, stime, cutime, cstime are fields 14 to 17.
            let rest = stat.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let mut total = 0.0;
            for i in 11..=14 {
                total += f.get(i)?.parse::<f64>().ok()?;
            }
            Some(total / ticks)
        })
        .unwrap_or(0.0)
}

/// Resident memory of process `pid`, bytes (`VmRSS`).
pub(super) fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .with_context(|| format!("/proc/{pid}/status has no VmRSS"))
}
