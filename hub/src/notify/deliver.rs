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
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};

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
    /// `.eml` files in a directory (see [`write_eml`]).
    Mailbox {
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
            return Ok(Transport::Mailbox { dir: dir.clone() });
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
            Transport::Mailbox { dir } => {
                let stem = eml_stem(&message, std::time::SystemTime::now());
                let bytes = message.formatted();
                let at = dir.clone();
                match tokio::task::spawn_blocking(move || write_eml(&at, &stem, &bytes)).await {
                    Ok(Ok(name)) => Ok(format!("written to {}", dir.join(name).display())),
                    Ok(Err(e)) => Err(Failure::Transient(format!(
                        "cannot write the mail into {}: {e}",
                        dir.display()
                    ))),
                    Err(e) => Err(Failure::Transient(format!("the mail writer failed: {e}"))),
                }
            }
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

/// The longest subject slug in a mailbox file name, in characters.
const SLUG_CHARS: usize = 60;

/// A mailbox file's name without its unique end: when it was written (UTC)
/// and its subject as a slug, so that a person listing the directory can
/// tell the mails apart (`20261207-120304-textkit-went-red-on-linux`).
/// The `[trunkfarm]` tag every subject starts with is left out.
fn eml_stem(message: &Message, now: std::time::SystemTime) -> String {
    let time: String = humantime::format_rfc3339_seconds(now)
        .to_string()
        .chars()
        .filter(|c| c.is_ascii_digit() || *c == 'T')
        .map(|c| if c == 'T' { '-' } else { c })
        .collect();
    let subject = message.headers().get_raw("Subject").unwrap_or_default();
    let subject = subject.strip_prefix("[trunkfarm]").unwrap_or(subject);
    let mut slug = String::new();
    for c in subject.chars().flat_map(char::to_lowercase) {
        if c.is_alphanumeric() {
            slug.push(c);
        } else if !slug.is_empty() && !slug.ends_with('-') {
            slug.push('-');
        }
        if slug.chars().count() >= SLUG_CHARS {
            break;
        }
    }
    let slug = slug.trim_end_matches('-');
    match slug.is_empty() {
        true => format!("{time}-mail"),
        false => format!("{time}-{slug}"),
    }
}

/// Writes one mail into `dir` as `<stem>-<8 hex>.eml`, atomically: the
/// bytes go to a temporary file (owner-only, synced) that is then linked
/// under its name, which never replaces a file already there (another
/// random end is tried). A reader never sees half a mail. Its file name.
fn write_eml(dir: &Path, stem: &str, bytes: &[u8]) -> std::io::Result<String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let part = dir.join(format!(".writing-{:016x}.part", rand::random::<u64>()));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&part)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    let linked = written.and_then(|()| {
        for _ in 0..16 {
            let name = format!("{stem}-{:08x}.eml", rand::random::<u32>());
            match std::fs::hard_link(&part, dir.join(&name)) {
                Ok(()) => return Ok(name),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(std::io::Error::other("no free file name after 16 tries"))
    });
    if let Err(e) = std::fs::remove_file(&part) {
        tracing::warn!("cannot remove {}: {e}", part.display());
    }
    let name = linked?;
    // The new name itself survives a crash once the directory is synced.
    std::fs::File::open(dir)?.sync_all()?;
    Ok(name)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn mail(subject: &str) -> Message {
        Message::builder()
            .from("farm@example.org".parse().unwrap())
            .to("dev@example.org".parse().unwrap())
            .subject(subject)
            .body(String::from("body"))
            .unwrap()
    }

    /// Mailbox files were named by a UUID alone: nobody could tell which
    /// was which without opening them.
    #[test]
    fn a_mailbox_file_is_named_by_its_time_and_subject() {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_796_644_984);
        let m = mail("[trunkfarm] textkit went red on linux-x86_64 with tiny main 1a2b3c4d5e");
        assert_eq!(
            eml_stem(&m, at),
            "20261207-120304-textkit-went-red-on-linux-x86-64-with-tiny-main-1a2b3c4d5e"
        );
        let long = mail(&format!("Überprüfung {}", "x".repeat(200)));
        let stem = eml_stem(&long, at);
        assert!(
            stem.starts_with("20261207-120304-überprüfung-xxx"),
            "{stem}"
        );
        assert!(stem.chars().count() <= 16 + SLUG_CHARS, "{stem}");
        assert_eq!(eml_stem(&mail("!!!"), at), "20261207-120304-mail");
    }

    #[tokio::test]
    async fn mailbox_files_are_unique_complete_and_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let t = Transport::Mailbox {
            dir: dir.path().to_path_buf(),
        };
        for _ in 0..3 {
            let answer = t.deliver(mail("[trunkfarm] same subject")).await.unwrap();
            assert!(answer.starts_with("written to "), "{answer}");
        }
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names.len(), 3, "one file each, no leftovers: {names:?}");
        for name in &names {
            assert!(
                name.ends_with(".eml") && name.contains("-same-subject-"),
                "{name}"
            );
            let path = dir.path().join(name);
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(text.contains("Subject: [trunkfarm] same subject"), "{text}");
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "{name}: {mode:o}");
        }
    }
}
