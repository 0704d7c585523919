//! Maintainer notifications: subscriptions, the durable outbox, and the
//! sender that delivers it. Owns the `notify` tree.
//!
//! A transition that deserves a mail (went red, fixed, a failed runtime
//! build) gets its outbox entries in the *same sled transaction* as the
//! transition itself ([`TransitionSink`]): one entry per recipient, under a
//! fresh id, with a dedupe key `e/<event>/<email>`. Reminders and digests are
//! derived from time and queued under deterministic event keys, so a retry
//! after a crash finds the key and queues nothing twice. The sender marks a
//! mail sent only after the server accepted it; a crash between the server's
//! "250" and that mark re-sends it once on restart — SMTP's own window, which
//! the stable `Message-ID` lets receivers dedupe.
//!
//! Keys: `s/<project>/<email>` and `d/<upstream>/<email>` → [`Subscription`];
//! `x/<project>/<email>` → a config maintainer who unsubscribed; `m/<id>` →
//! [`OutMail`]; `q/<id>` → pending; `e/<event>/<email>` → mail id;
//! `r/<went-red id>` → reminders sent; `g/<upstream>/<email>` → last digest period.

pub mod deliver;
pub mod render;
pub mod token;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use trunkfarm_proto::v1::{MailInfo, MailState, Subscription, Transition, TransitionKind};

use crate::config::{HubConfig, NotifySection, ProjectConfig, UpstreamConfig};
use crate::logs::JobLogs;
use crate::results::{Results, TransitionSink, Writes};
use crate::store::{Store, StoreError, Table, now_ms};
use deliver::{Failure, Transport};
use token::{Unsub, UnsubscribeKey};

/// The tree this module owns.
const TREE: &str = crate::store::trees::NOTIFY;

/// How often reminders and digests are looked at.
const TICK: Duration = Duration::from_secs(30);

/// Mails the sender takes per round.
const SEND_BATCH: usize = 32;

/// What the notifier can fail with.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Bad input from a person (the message says what to fix).
    #[error("{0}")]
    Invalid(String),
    /// Delivery failed (test mail).
    #[error("{0}")]
    Delivery(String),
}

/// A mail in the outbox.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct OutMail {
    /// What `trunkfarm mail list` shows.
    pub info: MailInfo,
    /// The plain-text part.
    pub text: String,
    /// The HTML part.
    pub html: String,
    /// The one-click unsubscribe URL (List-Unsubscribe).
    pub unsubscribe_url: String,
}

/// The running notifier (cheap to clone).
#[derive(Clone)]
pub struct Notifier {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    tree: sled::Tree,
    table: Table,
    results: Results,
    logs: Arc<JobLogs>,
    projects: Vec<ProjectConfig>,
    upstreams: Vec<UpstreamConfig>,
    settings: NotifySection,
    public_url: String,
    domain: String,
    hub_name: String,
    key: UnsubscribeKey,
    transport: Transport,
    sender: lettre::message::Mailbox,
    wake: tokio::sync::Notify,
}

fn id20(id: u64) -> String {
    format!("{id:020}")
}

/// A short, stable tag of an address for Message-IDs (no address in headers
/// of other recipients' mails).
fn tag(email: &str) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(email.to_ascii_lowercase().as_bytes())[..4])
}

/// Checks an address the way delivery will.
pub fn check_email(email: &str) -> Result<String, NotifyError> {
    let trimmed = email.trim();
    trimmed
        .parse::<lettre::Address>()
        .map(|a| a.to_string())
        .map_err(|e| {
            NotifyError::Invalid(format!(
                "{email:?} is not an email address ({e}); expected e.g. \"dev@example.org\""
            ))
        })
}

impl Notifier {
    /// Opens the outbox, syncs the config's maintainers into the
    /// subscriptions, and starts the sender and the reminder/digest task.
    pub fn start(
        config: &HubConfig,
        store: &Store,
        results: Results,
        logs: Arc<JobLogs>,
        public_url: String,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Notifier> {
        let key = UnsubscribeKey::load_or_create(&config.data_dir().join("unsubscribe.key"))?;
        let transport = Transport::from_config(&config.smtp).map_err(anyhow::Error::msg)?;
        let sender = deliver::sender(&config.smtp).map_err(anyhow::Error::msg)?;
        let domain = sender.email.domain().to_owned();
        let notifier = Notifier {
            inner: Arc::new(Inner {
                store: store.clone(),
                tree: store.tree(TREE)?,
                table: Table::open(store, TREE)?,
                results,
                logs,
                projects: config.projects.clone(),
                upstreams: config.upstreams.clone(),
                settings: config.notify.clone(),
                public_url: public_url.trim_end_matches('/').to_owned(),
                domain,
                hub_name: config
                    .hub
                    .hub_id
                    .clone()
                    .unwrap_or_else(|| "trunkfarm".into()),
                key,
                transport,
                sender,
                wake: tokio::sync::Notify::new(),
            }),
        };
        notifier.sync_maintainers()?;
        tracing::info!(delivery = %notifier.inner.transport.describe(), "notifier started");
        let n = notifier.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move { n.send_loop(stop).await });
        let n = notifier.clone();
        tokio::spawn(async move { n.tick_loop(shutdown).await });
        Ok(notifier)
    }

    fn get_json<T: for<'de> Deserialize<'de>>(&self, key: &str) -> Result<Option<T>, StoreError> {
        let s = &self.inner;
        match s.tree.get(key).map_err(|e| s.store.err(e))? {
            None => Ok(None),
            Some(raw) => serde_json::from_slice(&raw)
                .map(Some)
                .map_err(|e| s.store.corrupt(format!("{TREE}/{key}"), e)),
        }
    }

    fn encode<T: Serialize>(&self, value: &T) -> Result<Vec<u8>, StoreError> {
        serde_json::to_vec(value).map_err(|e| self.inner.store.corrupt("(encode notify)", e))
    }

    /// Makes the config's `maintainers` subscribers (unless they
    /// unsubscribed), and drops config subscriptions no longer in the config.
    fn sync_maintainers(&self) -> Result<(), StoreError> {
        let s = &self.inner;
        let mut wanted = HashMap::new();
        for p in &s.projects {
            for email in &p.maintainers {
                if let Ok(email) = check_email(email) {
                    wanted.insert(
                        format!("s/{}/{}", p.name, email.to_ascii_lowercase()),
                        (p, email),
                    );
                }
            }
        }
        let mut batch = sled::Batch::default();
        for item in s.tree.scan_prefix("s/") {
            let (k, v) = item.map_err(|e| s.store.err(e))?;
            let key = String::from_utf8_lossy(&k).into_owned();
            let sub: Subscription = serde_json::from_slice(&v)
                .map_err(|e| s.store.corrupt(format!("{TREE}/{key}"), e))?;
            if sub.source == "config" && !wanted.contains_key(&key) {
                batch.remove(k);
            }
        }
        for (key, (p, email)) in wanted {
            let tomb = format!("x/{}/{}", p.name, email.to_ascii_lowercase());
            if s.tree.contains_key(&key).map_err(|e| s.store.err(e))?
                || s.tree.contains_key(&tomb).map_err(|e| s.store.err(e))?
            {
                continue;
            }
            let sub = Subscription {
                email,
                project: p.name.clone(),
                source: "config".into(),
                created_at_ms: now_ms(),
                ..Default::default()
            };
            batch.insert(key.as_bytes(), self.encode(&sub)?);
        }
        s.tree.apply_batch(batch).map_err(|e| s.store.err(e))
    }

    fn sub_key(sub: &Subscription) -> String {
        let email = sub.email.to_ascii_lowercase();
        if sub.digest {
            format!("d/{}/{email}", sub.upstream)
        } else {
            format!("s/{}/{email}", sub.project)
        }
    }

    /// Adds a subscription (checked against the config); false if it existed.
    pub async fn subscribe(&self, mut sub: Subscription) -> Result<bool, NotifyError> {
        let s = &self.inner;
        sub.email = check_email(&sub.email)?;
        if sub.digest {
            if !s.upstreams.iter().any(|u| u.name == sub.upstream) {
                return Err(NotifyError::Invalid(format!(
                    "a digest needs an upstream, and {:?} is not one; known upstreams: {}",
                    sub.upstream,
                    self.upstream_names()
                )));
            }
            sub.project.clear();
            sub.platform.clear();
        } else {
            let Some(p) = s.projects.iter().find(|p| p.name == sub.project) else {
                return Err(NotifyError::Invalid(format!(
                    "no project named {:?} is configured; known projects: {}",
                    sub.project,
                    self.project_names()
                )));
            };
            if !sub.upstream.is_empty() && !p.tests_against(&sub.upstream) {
                return Err(NotifyError::Invalid(format!(
                    "project {} is not tested against {:?}",
                    p.name, sub.upstream
                )));
            }
            if !sub.platform.is_empty()
                && !s.upstreams.iter().any(|u| {
                    p.tests_against(&u.name) && p.platforms_for(u).contains(&sub.platform.as_str())
                })
            {
                return Err(NotifyError::Invalid(format!(
                    "project {} does not run on platform {:?}",
                    p.name, sub.platform
                )));
            }
        }
        let key = Self::sub_key(&sub);
        let existed = s.tree.contains_key(&key).map_err(|e| s.store.err(e))?;
        sub.source = "cli".into();
        sub.created_at_ms = now_ms();
        let mut batch = sled::Batch::default();
        batch.insert(key.as_bytes(), self.encode(&sub)?);
        if sub.digest {
            // The first digest covers what goes red from now on.
            let period = s.settings.digest_every.as_millis().max(1) as u64;
            let gkey = format!("g/{}/{}", sub.upstream, sub.email.to_ascii_lowercase());
            if !s.tree.contains_key(&gkey).map_err(|e| s.store.err(e))? {
                batch.insert(gkey.as_bytes(), self.encode(&(now_ms() / period))?);
            }
        } else {
            batch
                .remove(format!("x/{}/{}", sub.project, sub.email.to_ascii_lowercase()).as_bytes());
        }
        s.tree.apply_batch(batch).map_err(|e| s.store.err(e))?;
        s.store.commit().await?;
        tracing::info!(project = %sub.project, upstream = %sub.upstream, digest = sub.digest, "subscription added");
        Ok(!existed)
    }

    /// Removes a subscription; a config maintainer stays unsubscribed
    /// across restarts. False if there was none.
    pub async fn unsubscribe(&self, sub: &Subscription) -> Result<bool, NotifyError> {
        let s = &self.inner;
        let key = Self::sub_key(sub);
        let existing: Option<Subscription> = self.get_json(&key)?;
        let mut batch = sled::Batch::default();
        batch.remove(key.as_bytes());
        if !sub.digest {
            let from_config = s.projects.iter().any(|p| {
                p.name == sub.project
                    && p.maintainers
                        .iter()
                        .any(|m| m.eq_ignore_ascii_case(&sub.email))
            });
            if from_config {
                batch.insert(
                    format!("x/{}/{}", sub.project, sub.email.to_ascii_lowercase()).as_bytes(),
                    &[],
                );
            }
        }
        s.tree.apply_batch(batch).map_err(|e| s.store.err(e))?;
        s.store.commit().await?;
        Ok(existing.is_some())
    }

    /// What an unsubscribe link asks for; the sentence for the web page.
    pub async fn unsubscribe_token(&self, token: &str) -> Result<String, String> {
        let unsub = self
            .inner
            .key
            .verify(token, now_ms())
            .map_err(|e| e.to_string())?;
        let sub = Subscription {
            email: unsub.email.clone(),
            project: unsub.project.clone(),
            upstream: unsub.upstream.clone(),
            digest: unsub.digest,
            ..Default::default()
        };
        self.unsubscribe(&sub).await.map_err(|e| e.to_string())?;
        tracing::info!(project = %sub.project, upstream = %sub.upstream, digest = sub.digest, "unsubscribed by link");
        Ok(if unsub.digest {
            format!(
                "{} will no longer receive the {} digest.",
                unsub.email, unsub.upstream
            )
        } else {
            format!(
                "{} will no longer receive mail about {}.",
                unsub.email, unsub.project
            )
        })
    }

    /// Subscriptions, optionally of one project.
    pub fn subscriptions(&self, project: &str) -> Result<Vec<Subscription>, NotifyError> {
        let s = &self.inner;
        let mut out = Vec::new();
        for prefix in ["s/", "d/"] {
            for item in s.tree.scan_prefix(prefix) {
                let (k, v) = item.map_err(|e| s.store.err(e))?;
                let sub: Subscription = serde_json::from_slice(&v).map_err(|e| {
                    s.store
                        .corrupt(format!("{TREE}/{}", String::from_utf8_lossy(&k)), e)
                })?;
                if project.is_empty() || sub.project == project {
                    out.push(sub);
                }
            }
        }
        Ok(out)
    }

    fn project_names(&self) -> String {
        let names: Vec<_> = self
            .inner
            .projects
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        if names.is_empty() {
            "none".into()
        } else {
            names.join(", ")
        }
    }

    fn upstream_names(&self) -> String {
        let names: Vec<_> = self
            .inner
            .upstreams
            .iter()
            .map(|u| u.name.as_str())
            .collect();
        if names.is_empty() {
            "none".into()
        } else {
            names.join(", ")
        }
    }

    fn unsubscribe_url(&self, unsub: &Unsub) -> String {
        let expires = now_ms().saturating_add(self.inner.settings.link_ttl.as_millis() as u64);
        format!(
            "{}/unsubscribe?token={}",
            self.inner.public_url,
            self.inner.key.sign(unsub, expires)
        )
    }

    fn message_id(&self, kind: &str, id: u64, email: &str) -> String {
        format!("<{kind}.{id}.{}@{}>", tag(email), self.inner.domain)
    }

    /// Who hears about a transition: the project's subscribers (filters
    /// applied), or the upstream's contacts for its own build.
    fn recipients(&self, t: &Transition) -> Result<Vec<(String, Unsub)>, StoreError> {
        let s = &self.inner;
        let mut out = Vec::new();
        if t.project.is_empty() {
            if let Some(u) = s.upstreams.iter().find(|u| u.name == t.upstream) {
                for c in &u.contacts {
                    if let Ok(email) = check_email(c) {
                        out.push((
                            email.clone(),
                            Unsub {
                                email,
                                project: String::new(),
                                upstream: t.upstream.clone(),
                                digest: false,
                            },
                        ));
                    }
                }
            }
            return Ok(out);
        }
        for item in s.tree.scan_prefix(format!("s/{}/", t.project)) {
            let (k, v) = item.map_err(|e| s.store.err(e))?;
            let sub: Subscription = serde_json::from_slice(&v).map_err(|e| {
                s.store
                    .corrupt(format!("{TREE}/{}", String::from_utf8_lossy(&k)), e)
            })?;
            if (!sub.platform.is_empty() && sub.platform != t.platform)
                || (!sub.upstream.is_empty() && sub.upstream != t.upstream)
            {
                continue;
            }
            out.push((
                sub.email.clone(),
                Unsub {
                    email: sub.email,
                    project: t.project.clone(),
                    upstream: String::new(),
                    digest: false,
                },
            ));
        }
        Ok(out)
    }

    fn branch_of(&self, upstream: &str) -> String {
        self.inner
            .upstreams
            .iter()
            .find(|u| u.name == upstream)
            .map(|u| u.branch.clone())
            .unwrap_or_default()
    }

    fn log_tail(&self, job_id: u64) -> String {
        let lines = self.inner.settings.log_tail_lines as usize;
        let Ok(chunks) = self.inner.logs.read(job_id, None) else {
            return String::new();
        };
        let mut bytes = Vec::new();
        for c in chunks {
            bytes.extend_from_slice(&c.data);
        }
        let text = String::from_utf8_lossy(&bytes);
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The outbox writes for one mail to each recipient of an event.
    fn mails_for(
        &self,
        t: &Transition,
        event: &str,
        reminder: Option<(u64, u32)>,
    ) -> Result<Writes, StoreError> {
        let kind = TransitionKind::try_from(t.kind).unwrap_or(TransitionKind::Unspecified);
        let mut writes = Vec::new();
        let branch = self.branch_of(&t.upstream);
        let tail = if kind == TransitionKind::WentRed || reminder.is_some() {
            self.log_tail(t.job_id)
        } else {
            String::new()
        };
        for (email, unsub) in self.recipients(t)? {
            let dedupe = format!("e/{event}/{}", email.to_ascii_lowercase());
            if self
                .inner
                .tree
                .contains_key(&dedupe)
                .map_err(|e| self.inner.store.err(e))?
            {
                continue;
            }
            let unsubscribe_url = self.unsubscribe_url(&unsub);
            let r = render::transition(
                t,
                &render::Context {
                    branch: &branch,
                    log_tail: &tail,
                    public_url: &self.inner.public_url,
                    unsubscribe_url: &unsubscribe_url,
                    reminder,
                },
            );
            let (message_id, in_reply_to) = match (kind, reminder) {
                (_, Some((_, n))) => (
                    self.message_id(&format!("remind{n}"), t.id, &email),
                    self.message_id("red", t.id, &email),
                ),
                (TransitionKind::Fixed, _) => (
                    self.message_id("fixed", t.id, &email),
                    if t.red_since_id == 0 {
                        String::new()
                    } else {
                        self.message_id("red", t.red_since_id, &email)
                    },
                ),
                _ => (self.message_id("red", t.id, &email), String::new()),
            };
            let id = self.inner.store.next_id()?;
            let mail = OutMail {
                info: MailInfo {
                    id,
                    to: email.clone(),
                    subject: r.subject,
                    state: MailState::Pending.into(),
                    created_at_ms: now_ms(),
                    event: event.to_owned(),
                    message_id,
                    in_reply_to,
                    ..Default::default()
                },
                text: r.text,
                html: r.html,
                unsubscribe_url,
            };
            writes.push((format!("m/{}", id20(id)).into_bytes(), self.encode(&mail)?));
            writes.push((format!("q/{}", id20(id)).into_bytes(), Vec::new()));
            writes.push((dedupe.into_bytes(), id.to_be_bytes().to_vec()));
        }
        Ok(writes)
    }

    /// Wakes the sender (after something was queued).
    pub fn wake(&self) {
        self.inner.wake.notify_one();
    }

    /// The outbox, newest first.
    pub fn mails(&self, limit: usize, state: MailState) -> Result<Vec<MailInfo>, NotifyError> {
        let s = &self.inner;
        let mut out = Vec::new();
        for item in s.tree.scan_prefix("m/").rev() {
            let (k, v) = item.map_err(|e| s.store.err(e))?;
            let mail: OutMail = serde_json::from_slice(&v).map_err(|e| {
                s.store
                    .corrupt(format!("{TREE}/{}", String::from_utf8_lossy(&k)), e)
            })?;
            if state == MailState::Unspecified || mail.info.state == state as i32 {
                out.push(mail.info);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Mails waiting for delivery (the pending index, not the whole outbox).
    pub fn pending_count(&self) -> usize {
        self.inner.tree.scan_prefix("q/").count()
    }

    /// How delivery is configured, for `mail list`.
    pub fn describe(&self) -> String {
        self.inner.transport.describe()
    }

    fn message(&self, mail: &OutMail) -> Result<lettre::Message, String> {
        use lettre::message::header::{HeaderName, HeaderValue};
        use lettre::message::{MultiPart, SinglePart, header::ContentType};
        let to: lettre::message::Mailbox = mail
            .info
            .to
            .parse()
            .map_err(|e| format!("recipient {:?}: {e}", mail.info.to))?;
        let mut b = lettre::Message::builder()
            .from(self.inner.sender.clone())
            .to(to)
            .subject(mail.info.subject.clone())
            .message_id(Some(mail.info.message_id.clone()));
        if !mail.info.in_reply_to.is_empty() {
            b = b
                .in_reply_to(mail.info.in_reply_to.clone())
                .references(mail.info.in_reply_to.clone());
        }
        let mut message = b
            .multipart(
                MultiPart::alternative()
                    .singlepart(
                        SinglePart::builder()
                            .header(ContentType::TEXT_PLAIN)
                            .body(mail.text.clone()),
                    )
                    .singlepart(
                        SinglePart::builder()
                            .header(ContentType::TEXT_HTML)
                            .body(mail.html.clone()),
                    ),
            )
            .map_err(|e| format!("cannot build the mail: {e}"))?;
        if !mail.unsubscribe_url.is_empty() {
            let headers = message.headers_mut();
            headers.insert_raw(HeaderValue::new(
                HeaderName::new_from_ascii_str("List-Unsubscribe"),
                format!("<{}>", mail.unsubscribe_url),
            ));
            headers.insert_raw(HeaderValue::new(
                HeaderName::new_from_ascii_str("List-Unsubscribe-Post"),
                "List-Unsubscribe=One-Click".into(),
            ));
        }
        Ok(message)
    }

    /// Sends one test mail now, outside the outbox.
    pub async fn send_test(&self, to: &str) -> Result<String, NotifyError> {
        let to = check_email(to)?;
        let r = render::test_mail(&self.inner.hub_name);
        let mail = OutMail {
            info: MailInfo {
                to,
                subject: r.subject,
                message_id: self.message_id("test", now_ms(), "test"),
                ..Default::default()
            },
            text: r.text,
            html: r.html,
            unsubscribe_url: String::new(),
        };
        let message = self.message(&mail).map_err(NotifyError::Invalid)?;
        match self.inner.transport.send(message).await {
            Ok(answer) => Ok(answer),
            Err(Failure::Permanent(e)) | Err(Failure::Transient(e)) => Err(NotifyError::Delivery(
                format!("{} refused or failed: {e}", self.describe()),
            )),
        }
    }

    /// Delivers due mails until shutdown.
    async fn send_loop(&self, shutdown: CancellationToken) {
        loop {
            let next = match self.send_due().await {
                Ok(next) => next,
                Err(e) => {
                    tracing::error!("outbox: {e}");
                    Some(now_ms() + 5_000)
                }
            };
            let wait = next
                .map(|at| at.saturating_sub(now_ms()))
                .unwrap_or(60_000)
                .clamp(10, 60_000);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.inner.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
            }
        }
    }

    /// Sends every pending mail that is due; returns when the next one is.
    async fn send_due(&self) -> Result<Option<u64>, StoreError> {
        let s = &self.inner;
        let now = now_ms();
        let mut next: Option<u64> = None;
        let mut due = Vec::new();
        for item in s.tree.scan_prefix("q/") {
            let (k, _) = item.map_err(|e| s.store.err(e))?;
            let key = String::from_utf8_lossy(&k).replacen("q/", "m/", 1);
            let Some(mail) = self.get_json::<OutMail>(&key)? else {
                s.tree.remove(k).map_err(|e| s.store.err(e))?;
                continue;
            };
            if mail.info.next_attempt_at_ms <= now {
                due.push(mail);
                if due.len() >= SEND_BATCH {
                    next = Some(now);
                    break;
                }
            } else {
                next = Some(next.map_or(mail.info.next_attempt_at_ms, |n| {
                    n.min(mail.info.next_attempt_at_ms)
                }));
            }
        }
        for mut mail in due {
            let result = match self.message(&mail) {
                Ok(m) => s.transport.send(m).await,
                Err(e) => Err(Failure::Permanent(e)),
            };
            mail.info.attempts += 1;
            let id = mail.info.id;
            let mut batch = sled::Batch::default();
            match result {
                Ok(answer) => {
                    mail.info.state = MailState::Sent.into();
                    mail.info.sent_at_ms = now_ms();
                    mail.info.response = answer;
                    mail.info.last_error.clear();
                    batch.remove(format!("q/{}", id20(id)).as_bytes());
                    tracing::info!(mail = id, event = %mail.info.event, "mail sent");
                }
                Err(Failure::Permanent(e)) => {
                    mail.info.state = MailState::Failed.into();
                    mail.info.last_error = e.clone();
                    batch.remove(format!("q/{}", id20(id)).as_bytes());
                    tracing::warn!(mail = id, event = %mail.info.event, "mail refused for good: {e}");
                }
                Err(Failure::Transient(e)) => {
                    let s = &self.inner.settings;
                    let factor = 1u32 << (mail.info.attempts.saturating_sub(1)).min(20);
                    let wait = s.retry_first.saturating_mul(factor).min(s.retry_max);
                    mail.info.next_attempt_at_ms = now_ms() + wait.as_millis() as u64;
                    tracing::warn!(
                        mail = id,
                        attempts = mail.info.attempts,
                        "delivery failed, retrying in {}: {e}",
                        humantime::format_duration(wait)
                    );
                    mail.info.last_error = e;
                    next = Some(next.map_or(mail.info.next_attempt_at_ms, |n| {
                        n.min(mail.info.next_attempt_at_ms)
                    }));
                }
            }
            batch.insert(format!("m/{}", id20(id)).as_bytes(), self.encode(&mail)?);
            self.inner
                .tree
                .apply_batch(batch)
                .map_err(|e| self.inner.store.err(e))?;
            self.inner.store.commit().await?;
        }
        Ok(next)
    }

    /// Reminders and digests, every [`TICK`], until shutdown.
    async fn tick_loop(&self, shutdown: CancellationToken) {
        loop {
            if let Err(e) = self.remind().await {
                tracing::error!("reminders: {e}");
            }
            if let Err(e) = self.digest().await {
                tracing::error!("digests: {e}");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.tick()) => {}
            }
        }
    }

    /// How often reminders and digests are looked at: often enough for the
    /// shortest configured period.
    fn tick(&self) -> Duration {
        let s = &self.inner.settings;
        TICK.min(s.reminder_after / 2)
            .min(s.reminder_every / 2)
            .min(s.digest_every / 2)
            .max(Duration::from_millis(50))
    }

    /// Queues a reminder for every project red longer than `reminder_after`
    /// (then every `reminder_every`).
    pub async fn remind(&self) -> Result<usize, StoreError> {
        let s = &self.inner;
        let now = now_ms();
        let mut queued = 0;
        for (_, t) in s.results.red_series()? {
            let key = format!("r/{}", id20(t.id));
            let sent: u32 = self.get_json(&key)?.unwrap_or(0);
            let after = s.settings.reminder_after.as_millis() as u64;
            let every = s.settings.reminder_every.as_millis() as u64;
            let due_at = t.at_ms + after + every * sent as u64;
            if now < due_at {
                continue;
            }
            let n = sent + 1;
            let days = (now.saturating_sub(t.at_ms)) / 86_400_000;
            let mut writes = self.mails_for(&t, &format!("remind{n}.{}", t.id), Some((days, n)))?;
            writes.push((key.into_bytes(), self.encode(&n)?));
            queued += writes.len();
            let mut batch = sled::Batch::default();
            for (k, v) in writes {
                batch.insert(k, v);
            }
            s.tree.apply_batch(batch).map_err(|e| s.store.err(e))?;
            s.store.commit().await?;
        }
        if queued > 0 {
            self.wake();
        }
        Ok(queued)
    }

    /// Queues each digest subscriber's summary once per `digest_every`
    /// period that had something go red.
    pub async fn digest(&self) -> Result<usize, StoreError> {
        let s = &self.inner;
        let period = s.settings.digest_every.as_millis().max(1) as u64;
        let now = now_ms();
        let current = now / period;
        let mut queued = 0;
        for item in s.tree.scan_prefix("d/") {
            let (k, v) = item.map_err(|e| s.store.err(e))?;
            let sub: Subscription = serde_json::from_slice(&v).map_err(|e| {
                s.store
                    .corrupt(format!("{TREE}/{}", String::from_utf8_lossy(&k)), e)
            })?;
            let gkey = format!("g/{}/{}", sub.upstream, sub.email.to_ascii_lowercase());
            let last: Option<u64> = self.get_json(&gkey)?;
            let mut batch = sled::Batch::default();
            match last {
                // The first period of a new subscriber starts now.
                None => {}
                Some(last) if last >= current => continue,
                Some(last) => {
                    let (from, to) = (last * period, current * period);
                    let went_red = s.results.transitions(10_000, |t| {
                        t.upstream == sub.upstream
                            && t.kind == TransitionKind::WentRed as i32
                            && t.at_ms >= from
                            && t.at_ms < to
                    })?;
                    let event = format!("digest.{}.{current}", sub.upstream);
                    let dedupe = format!("e/{event}/{}", sub.email.to_ascii_lowercase());
                    if !went_red.is_empty()
                        && !s.tree.contains_key(&dedupe).map_err(|e| s.store.err(e))?
                    {
                        let unsub = Unsub {
                            email: sub.email.clone(),
                            project: String::new(),
                            upstream: sub.upstream.clone(),
                            digest: true,
                        };
                        let url = self.unsubscribe_url(&unsub);
                        let r = render::digest(&sub.upstream, &went_red, &s.public_url, &url);
                        let id = s.store.next_id()?;
                        let mail = OutMail {
                            info: MailInfo {
                                id,
                                to: sub.email.clone(),
                                subject: r.subject,
                                state: MailState::Pending.into(),
                                created_at_ms: now,
                                event: event.clone(),
                                message_id: self.message_id("digest", id, &sub.email),
                                ..Default::default()
                            },
                            text: r.text,
                            html: r.html,
                            unsubscribe_url: url,
                        };
                        batch.insert(format!("m/{}", id20(id)).as_bytes(), self.encode(&mail)?);
                        batch.insert(format!("q/{}", id20(id)).as_bytes(), &[]);
                        batch.insert(dedupe.as_bytes(), &id.to_be_bytes());
                        queued += 1;
                    }
                }
            }
            batch.insert(gkey.as_bytes(), self.encode(&current)?);
            s.tree.apply_batch(batch).map_err(|e| s.store.err(e))?;
            s.store.commit().await?;
        }
        if queued > 0 {
            self.wake();
        }
        Ok(queued)
    }
}

impl TransitionSink for Notifier {
    fn table(&self) -> &Table {
        &self.inner.table
    }

    fn stage(&self, t: &Transition, batch: &mut sled::Batch) -> Result<(), StoreError> {
        let kind = TransitionKind::try_from(t.kind).unwrap_or(TransitionKind::Unspecified);
        if matches!(kind, TransitionKind::WentRed | TransitionKind::Fixed) {
            for (k, v) in self.mails_for(t, &format!("t{}", t.id), None)? {
                batch.insert(k, v);
            }
        }
        Ok(())
    }
}
