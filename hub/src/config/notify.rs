//! The notifier's part of `hub.toml`: how mail is delivered (`[smtp]`), what
//! is mailed when (`[notify]`), and the hub's web endpoint (`[web]`) that
//! serves unsubscribe links.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use trunkfarm_proto::settings::{Problem, fmt_duration};

use super::de;

/// How the SMTP connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum SmtpSecurity {
    /// TLS from the first byte (port 465).
    Tls,
    /// Plain connection upgraded with STARTTLS, which must succeed (port 587).
    Starttls,
    /// No encryption: only for a relay on the same machine or network.
    Plain,
}

/// `[smtp]`: where mail goes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "an [smtp] table")]
pub(crate) struct SmtpSection {
    /// The SMTP server. Without it (and without `mailbox_dir`) mails wait in
    /// the outbox and `trunkfarm mail list` says why.
    pub(crate) host: Option<String>,
    /// Its port; default 465 for `tls`, 587 for `starttls`, 25 for `plain`.
    pub(crate) port: Option<u16>,
    /// `"tls"`, `"starttls"` or `"plain"`.
    pub(crate) security: SmtpSecurity,
    /// The login, if the server wants one.
    pub(crate) username: Option<String>,
    /// A file holding the password (only its first line is used), so the
    /// secret is not in the config.
    pub(crate) password_file: Option<PathBuf>,
    /// The sender, e.g. `"trunkfarm <farm@example.org>"`.
    pub(crate) from: String,
    /// How long one SMTP exchange may take.
    #[serde(deserialize_with = "de::duration")]
    pub(crate) timeout: Duration,
    /// A PEM CA certificate to trust besides the usual roots (a relay with
    /// its own CA).
    pub(crate) ca_file: Option<PathBuf>,
    /// Instead of SMTP, write each mail as a `.eml` file into this
    /// directory (a local mailbox: demos, air-gapped hubs).
    pub(crate) mailbox_dir: Option<PathBuf>,
    /// Connections kept open to the server.
    #[serde(deserialize_with = "de::count")]
    pub(crate) max_connections: u32,
}

impl Default for SmtpSection {
    fn default() -> Self {
        Self {
            host: None,
            port: None,
            security: SmtpSecurity::Starttls,
            username: None,
            password_file: None,
            from: "trunkfarm <trunkfarm@localhost>".into(),
            timeout: Duration::from_secs(30),
            ca_file: None,
            mailbox_dir: None,
            max_connections: 4,
        }
    }
}

impl SmtpSection {
    /// The port to dial.
    pub(crate) fn effective_port(&self) -> u16 {
        self.port.unwrap_or(match self.security {
            SmtpSecurity::Tls => 465,
            SmtpSecurity::Starttls => 587,
            SmtpSecurity::Plain => 25,
        })
    }
}

/// `[notify]`: what is mailed, when.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [notify] table")]
pub(crate) struct NotifySection {
    /// The hub's web address as people reach it, for links in mails
    /// (default: `http://<web.listen>`).
    pub(crate) public_url: Option<String>,
    /// A project still red this long after it went red gets a reminder.
    #[serde(deserialize_with = "de::duration")]
    pub(crate) reminder_after: Duration,
    /// Then another reminder this often while it stays red.
    #[serde(deserialize_with = "de::duration")]
    pub(crate) reminder_every: Duration,
    /// How often digest subscribers get their summary.
    #[serde(deserialize_with = "de::duration")]
    pub(crate) digest_every: Duration,
    /// The first retry after a failed delivery; each next one waits twice
    /// as long, up to `retry_max`.
    #[serde(deserialize_with = "de::duration")]
    pub(crate) retry_first: Duration,
    /// The longest wait between two delivery attempts.
    #[serde(deserialize_with = "de::duration")]
    pub(crate) retry_max: Duration,
    /// Lines of the job log quoted in a went-red mail.
    #[serde(deserialize_with = "de::count")]
    pub(crate) log_tail_lines: u32,
    /// How long an unsubscribe link in a mail stays valid.
    #[serde(deserialize_with = "de::duration")]
    pub(crate) link_ttl: Duration,
    /// How long a went-red mail waits for its range's bisection to name
    /// the first bad commit before it goes out with what is known (zero:
    /// it never waits).
    #[serde(deserialize_with = "de::duration")]
    pub(crate) bisect_wait: Duration,
    /// Whether maintainers may subscribe themselves on a project's page
    /// (double opt-in: a mailed link they must follow); when false the form
    /// says the operator subscribes people (`trunkfarm subscribe`).
    pub(crate) self_subscribe: bool,
    /// How long the link in a subscription confirmation mail stays valid.
    #[serde(deserialize_with = "de::duration")]
    pub(crate) subscribe_link_ttl: Duration,
    /// Confirmation mails one address may be sent per hour.
    #[serde(deserialize_with = "de::count")]
    pub(crate) subscribe_per_address: u32,
    /// Subscription requests one client (IP address, IPv6 by /64) may make
    /// per hour.
    #[serde(deserialize_with = "de::count")]
    pub(crate) subscribe_per_client: u32,
}

impl Default for NotifySection {
    fn default() -> Self {
        const DAY: u64 = 24 * 60 * 60;
        Self {
            public_url: None,
            reminder_after: Duration::from_secs(7 * DAY),
            reminder_every: Duration::from_secs(7 * DAY),
            digest_every: Duration::from_secs(DAY),
            retry_first: Duration::from_secs(10),
            retry_max: Duration::from_secs(60 * 60),
            log_tail_lines: 40,
            link_ttl: Duration::from_secs(180 * DAY),
            bisect_wait: Duration::from_secs(30 * 60),
            self_subscribe: true,
            subscribe_link_ttl: Duration::from_secs(DAY),
            subscribe_per_address: 3,
            subscribe_per_client: 10,
        }
    }
}

/// `[web]`: the hub's HTTP endpoint (unsubscribe links, later the dashboard).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [web] table")]
pub(crate) struct WebSection {
    /// Address the web endpoint binds; port 0 picks a free one.
    #[serde(deserialize_with = "super::de::socket_addr")]
    pub(crate) listen: SocketAddr,
    /// A file holding the token `GET /metrics` requires (as `Authorization:
    /// Bearer <token>`; only its first line counts). Without it `/metrics`
    /// is open to whoever reaches `listen`.
    pub(crate) metrics_token_file: Option<PathBuf>,
    /// How long a client may take to send a request's headers (and how long
    /// an idle keep-alive connection stays open), so a client dripping its
    /// headers byte by byte cannot hold a connection.
    #[serde(deserialize_with = "de::duration")]
    pub(crate) header_read_timeout: Duration,
    /// How long one request may take from its headers to its response.
    #[serde(deserialize_with = "de::duration")]
    pub(crate) request_timeout: Duration,
    /// Connections the web endpoint holds open at once; more are closed on
    /// arrival.
    #[serde(deserialize_with = "de::count")]
    pub(crate) max_connections: u32,
}

impl Default for WebSection {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7480)),
            metrics_token_file: None,
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_connections: 128,
        }
    }
}

/// Checks the `[web]` rules.
pub(super) fn web_problems(web: &WebSection) -> Result<(), Problem> {
    for (key, d) in [
        ("web.header_read_timeout", web.header_read_timeout),
        ("web.request_timeout", web.request_timeout),
    ] {
        if d.is_zero() {
            return Err(Problem::new(key, "must be greater than zero, e.g. \"10s\""));
        }
    }
    if web.max_connections == 0 {
        return Err(Problem::new(
            "web.max_connections",
            "must be at least 1, e.g. 128",
        ));
    }
    Ok(())
}

/// Checks the notifier's rules.
pub(super) fn problems(smtp: &SmtpSection, notify: &NotifySection) -> Result<(), Problem> {
    if let Some(host) = &smtp.host {
        if host.trim().is_empty() || host.contains(['/', ' ', ':']) && !host.starts_with('[') {
            return Err(Problem::new(
                "smtp.host",
                format!(
                    "{host:?} is not a host name; expected e.g. \"smtp.example.org\" (the port goes in smtp.port)"
                ),
            ));
        }
    }
    if smtp.host.is_some() && smtp.mailbox_dir.is_some() {
        return Err(Problem::new(
            "smtp.mailbox_dir",
            "`smtp.mailbox_dir` writes mails to files instead of sending them, and `smtp.host` sends them: keep one",
        ));
    }
    if smtp.username.is_some() != smtp.password_file.is_some() {
        return Err(Problem::new(
            if smtp.username.is_some() {
                "smtp.password_file"
            } else {
                "smtp.username"
            },
            "give both `smtp.username` and `smtp.password_file` (a file holding the password), or neither",
        ));
    }
    if let Err(e) = smtp.from.parse::<lettre::message::Mailbox>() {
        return Err(Problem::new(
            "smtp.from",
            format!(
                "{:?} is not a sender address ({e}); expected e.g. \"trunkfarm <farm@example.org>\"",
                smtp.from
            ),
        ));
    }
    if smtp.timeout.is_zero() {
        return Err(Problem::new(
            "smtp.timeout",
            "must be greater than zero, e.g. \"30s\"",
        ));
    }
    if smtp.max_connections == 0 {
        return Err(Problem::new("smtp.max_connections", "must be at least 1"));
    }
    if let Some(url) = &notify.public_url {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(Problem::new(
                "notify.public_url",
                format!(
                    "{url:?} is not an http(s) URL; expected e.g. \"https://farm.example.org\""
                ),
            ));
        }
    }
    for (key, d) in [
        ("notify.reminder_after", notify.reminder_after),
        ("notify.reminder_every", notify.reminder_every),
        ("notify.digest_every", notify.digest_every),
        ("notify.retry_first", notify.retry_first),
        ("notify.link_ttl", notify.link_ttl),
        ("notify.subscribe_link_ttl", notify.subscribe_link_ttl),
    ] {
        if d < Duration::from_millis(100) {
            return Err(Problem::new(
                key,
                format!("{} is too short; expected e.g. \"7d\"", fmt_duration(d)),
            ));
        }
    }
    for (key, n) in [
        ("notify.subscribe_per_address", notify.subscribe_per_address),
        ("notify.subscribe_per_client", notify.subscribe_per_client),
    ] {
        if n == 0 {
            return Err(Problem::new(
                key,
                "must be at least 1 (to stop self-service subscription, set `notify.self_subscribe = false`)",
            ));
        }
    }
    if notify.retry_max < notify.retry_first {
        return Err(Problem::new(
            "notify.retry_max",
            format!(
                "{} is shorter than `notify.retry_first` ({})",
                fmt_duration(notify.retry_max),
                fmt_duration(notify.retry_first)
            ),
        ));
    }
    Ok(())
}
