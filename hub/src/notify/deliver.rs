//! Delivering one mail: over SMTP with lettre (implicit TLS, STARTTLS or
//! plain, with a pool of connections), or as a file in a mailbox directory.
//! Answers say whether a failure is worth retrying.
//!
//! The outbox hands each mail to a [`Mailer`]; [`Transport`] is the real
//! one. The seam lets the outbox's guarantees (once per event, retried until
//! accepted) be tested in-process with a recorder in place of a server.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;

use lettre::message::{Mailbox, Message};
use lettre::transport::smtp::PoolConfig;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncFileTransport, AsyncSmtpTransport, AsyncTransport, Tokio1Executor};

use crate::config::{SmtpSection, SmtpSecurity};

/// Where the outbox hands each mail.
pub(crate) trait Mailer: Send + Sync {
    /// Sends one message; on success, the server's answer (`250 …`).
    fn send(&self, message: Message) -> Sending<'_>;
    /// Where mail goes, for status lines and `mail list`.
    fn describe(&self) -> String;
}

/// A delivery attempt in progress (boxed: [`Mailer`] is used as a trait object).
pub(crate) type Sending<'a> = Pin<Box<dyn Future<Output = Result<String, Failure>> + Send + 'a>>;

/// How a delivery attempt ended, when it did not succeed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Worth another try later: the server is down, slow, or answered 4xx.
    Transient(String),
    /// The server refused this mail for good (5xx).
    Permanent(String),
}

/// Where mail goes.
pub(crate) enum Transport {
    /// An SMTP server.
    Smtp {
        /// The pooled lettre transport.
        transport: AsyncSmtpTransport<Tokio1Executor>,
        /// "smtp host:port (starttls)", for status lines.
        describe: String,
        /// The most one delivery may take, whatever the server does (a
        /// server that stops answering mid-dialogue must not stall the outbox).
        limit: std::time::Duration,
    },
    /// `.eml` files in a directory.
    Mailbox {
        /// The lettre file transport.
        transport: AsyncFileTransport<Tokio1Executor>,
        /// The directory.
        dir: std::path::PathBuf,
    },
    /// Nothing configured: mails wait.
    None,
}

impl Transport {
    /// Builds the transport `[smtp]` describes. Errors (an unreadable
    /// password file, a bad CA) say which key to fix.
    pub(crate) fn from_config(smtp: &SmtpSection) -> Result<Transport, String> {
        if let Some(dir) = &smtp.mailbox_dir {
            // Its mails hold working unsubscribe links: the hub's user only.
            let opened = crate::auth::secret::private_dir(dir)
                .map_err(|e| format!("cannot create smtp.mailbox_dir {}: {e}", dir.display()))?;
            if let Some(mode) = opened {
                tracing::warn!(
                    "smtp.mailbox_dir {} was open to other users (mode {mode:o}); it is now 0700",
                    dir.display()
                );
            }
            return Ok(Transport::Mailbox {
                transport: AsyncFileTransport::new(dir),
                dir: dir.clone(),
            });
        }
        let Some(host) = &smtp.host else {
            return Ok(Transport::None);
        };
        let port = smtp.effective_port();
        let tls = || -> Result<TlsParameters, String> {
            let mut b = TlsParameters::builder(host.clone());
            if let Some(ca) = &smtp.ca_file {
                let pem = std::fs::read(ca)
                    .map_err(|e| format!("cannot read smtp.ca_file {}: {e}", ca.display()))?;
                let cert = Certificate::from_pem(&pem).map_err(|e| {
                    format!(
                        "smtp.ca_file {} is not a PEM certificate: {e}",
                        ca.display()
                    )
                })?;
                b = b.add_root_certificate(cert);
            }
            b.build()
                .map_err(|e| format!("cannot set up TLS for {host}: {e}"))
        };
        let (security, tls) = match smtp.security {
            SmtpSecurity::Tls => ("tls", Tls::Wrapper(tls()?)),
            SmtpSecurity::Starttls => ("starttls", Tls::Required(tls()?)),
            SmtpSecurity::Plain => ("plain", Tls::None),
        };
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host.as_str())
            .port(port)
            .tls(tls)
            .timeout(Some(smtp.timeout))
            .pool_config(PoolConfig::new().max_size(smtp.max_connections));
        if let (Some(user), Some(file)) = (&smtp.username, &smtp.password_file) {
            builder = builder.credentials(Credentials::new(user.clone(), read_password(file)?));
        }
        Ok(Transport::Smtp {
            transport: builder.build(),
            describe: format!("smtp {host}:{port} ({security})"),
            limit: smtp.timeout.saturating_mul(3),
        })
    }

    /// Sends one message; on success, the server's answer.
    async fn deliver(&self, message: Message) -> Result<String, Failure> {
        match self {
            Transport::Smtp {
                transport, limit, ..
            } => match tokio::time::timeout(*limit, transport.send(message)).await {
                Err(_) => Err(Failure::Transient(format!(
                    "the server did not finish the exchange within {} (3 × smtp.timeout)",
                    humantime::format_duration(*limit)
                ))),
                Ok(Ok(r)) => Ok(format!(
                    "{} {}",
                    r.code(),
                    r.message().collect::<Vec<_>>().join(" ")
                )),
                Ok(Err(e)) if e.is_permanent() => Err(Failure::Permanent(e.to_string())),
                Ok(Err(e)) => Err(Failure::Transient(e.to_string())),
            },
            Transport::Mailbox { transport, dir } => match transport.send(message).await {
                Ok(id) => Ok(format!("written to {}/{id}.eml", dir.display())),
                Err(e) => Err(Failure::Transient(e.to_string())),
            },
            Transport::None => Err(Failure::Transient(self.describe())),
        }
    }
}

impl Mailer for Transport {
    fn send(&self, message: Message) -> Sending<'_> {
        Box::pin(self.deliver(message))
    }

    fn describe(&self) -> String {
        match self {
            Transport::Smtp { describe, .. } => describe.clone(),
            Transport::Mailbox { dir, .. } => format!("mailbox directory {}", dir.display()),
            Transport::None => {
                "no [smtp] host configured: mails wait in the outbox until one is".into()
            }
        }
    }
}

/// The first line of the password file.
fn read_password(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read smtp.password_file {}: {e}", path.display()))?;
    let line = text.lines().next().unwrap_or("").to_owned();
    if line.is_empty() {
        return Err(format!("smtp.password_file {} is empty", path.display()));
    }
    Ok(line)
}

/// The sender, parsed (the config checks it too).
pub(crate) fn sender(smtp: &SmtpSection) -> Result<Mailbox, String> {
    smtp.from
        .parse()
        .map_err(|e| format!("smtp.from {:?} is not a sender address: {e}", smtp.from))
}
