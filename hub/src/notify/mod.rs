//! Maintainer notifications: subscriptions, the durable outbox, and the
//! sender that delivers it. Owns the `notify` tree.
//!
//! A transition that deserves a mail (went red, fixed, a failed runtime
//! build) gets its outbox entries in the *same atomic database step* as the
//! transition itself ([`TransitionSink`]): one entry per recipient, under a
//! fresh id, with a dedupe key `e/<event>/<email>`. Reminders and digests are
//! derived from time and queued under deterministic event keys, so a retry
//! after a crash finds the key and queues nothing twice. The sender marks a
//! mail sent only after the server accepted it; a crash between the server's
//! "250" and that mark re-sends it once on restart — SMTP's own window, which
//! the stable `Message-ID` lets receivers dedupe.
//!
//! Keys (all through [`Table`]; `<id>` is [`id_key`], `<email>` lowercase):
//! `s/<project>/<email>` and `d/<upstream>/<email>` → [`Subscription`]
//! (JSON); `x/<project>/<email>` → empty: a config maintainer who
//! unsubscribed; `u/<project>/<email>` → when the address last
//! unsubscribed from the project (JSON number, Unix ms: confirmation links
//! mailed before it no longer subscribe); `m/<id>` → [`OutMail`] (JSON); `q/<id>` → empty: pending;
//! `e/<event>/<email>` → the mail's id (8 bytes, big-endian);
//! `r/<went-red id>` → reminders sent (JSON number); `g/<upstream>/<email>` →
//! last digest period (JSON number); `a/<commit>/<transition id>` →
//! [`AuthorMark`]: a bisection found `commit` to break the transition's
//! project, its author not yet mailed (`notify_authors`).
//!
//! A went-red mail whose culprit range is being bisected (`Transition.bisect`
//! running) is queued *held*: due `notify.bisect_wait` later, saying what is
//! known. When the bisection ends ([`TransitionSink::stage_bisected`], in
//! the transition's update), a held mail not yet due is re-rendered with the
//! result and released; one that may be out already gets one follow-up in
//! its thread (event `bisect.<id>`). The records are this module's own
//! serde types (`record.rs`, [`OutMail`]), not proto messages: the admin API
//! converts them to its wire types, so a field added to the .proto does not
//! change what is stored.
//!
//! Delivery goes through a [`Mailer`] (SMTP or a mailbox directory in the
//! hub; a recorder in the tests) and time through a [`Clock`], so the tests
//! drive the outbox in-process (`notify/tests.rs`).

mod deliver;
mod record;
pub(crate) mod render;
mod retention;
mod subscribe;
#[cfg(test)]
mod tests;
mod token;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use trunkfarm_proto::v1::{MailState, TransitionKind};

use crate::config::{HubConfig, NotifySection, ProjectConfig, UpstreamConfig};
use crate::logs::JobLogs;
use crate::output;
use crate::results::{BisectState, Class, Commit, Results, RunInfo, Transition, TransitionSink};
use crate::store::{Store, StoreError, Table, id_key, now_ms, trees};
use deliver::{Failure, Mailer, Transport};
pub(crate) use record::{MailInfo, Subscription};
pub(crate) use subscribe::{ConfirmRefused, RequestError};
use token::UnsubscribeKey;
pub(crate) use token::{ConfirmError, TokenError, Unsub};

/// Milliseconds since the Unix epoch, as the notifier sees them: the system
/// clock in the hub ([`now_ms`]), a hand-moved one in the tests (reminders,
/// digests and retry backoff without waiting).
pub(crate) type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// How often reminders and digests are looked at.
const TICK: Duration = Duration::from_secs(30);

/// Mails the sender takes per round.
const SEND_BATCH: usize = 32;

/// A held mail due later than this is surely not being delivered: the end
/// of its bisection re-renders it in place. One due sooner may be out
/// already, so it gets a follow-up instead.
const RELEASE_MARGIN_MS: u64 = 1_000;

/// What a mail about a transition is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum About {
    /// The transition itself: went red, fixed.
    Transition,
    /// A reminder of a red series: days red, its number.
    Reminder(u64, u32),
    /// The follow-up of a went-red mail, once its bisection ended.
    Bisected,
}

/// A first bad commit whose author is to be mailed (`a/<sha>/<id>`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
struct AuthorMark {
    upstream: String,
    project: String,
    platform: String,
    /// The went-red run.
    job_id: u64,
    commit: Commit,
    /// The upstream's branch (the transition's; empty in older marks).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    branch: String,
}

/// What a went-red mail shows of why: failing tests' messages and the log.
#[derive(Default)]
struct Evidence {
    /// The run (without its cases): failing tests with messages, counts.
    run: Option<RunInfo>,
    log: render::Quote,
}

/// Why the notifier could not start. The messages name the file or key to fix.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StartError {
    /// The unsubscribe key file.
    #[error(transparent)]
    Key(#[from] TokenError),
    /// `[smtp]` (a password file, a CA, the sender).
    #[error("{0}")]
    Smtp(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What the notifier can fail with.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NotifyError {
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
struct OutMail {
    /// What `trunkfarm mail list` shows.
    info: MailInfo,
    /// The plain-text part.
    text: String,
    /// The HTML part.
    html: String,
    /// The one-click unsubscribe URL (List-Unsubscribe).
    unsubscribe_url: String,
}

/// The running notifier (cheap to clone).
#[derive(Clone)]
pub(crate) struct Notifier {
    inner: Arc<Inner>,
}

struct Inner {
    /// The `notify` tree (keys above).
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
    mailer: Arc<dyn Mailer>,
    sender: lettre::message::Mailbox,
    clock: Clock,
    wake: tokio::sync::Notify,
    /// Self-service subscription requests' rate limits (in memory).
    limits: subscribe::Limits,
    /// Logs of red runs read before results takes its write lock
    /// ([`Notifier::preload_log`]), by job: the text, or `None` if it
    /// cannot be read. At most [`PRELOADED_LOGS`].
    preloaded: Mutex<HashMap<u64, Option<Arc<String>>>>,
}

/// How long [`Notifier::preload_log`] waits for the object store.
const PRELOAD_LIMIT: Duration = Duration::from_secs(30);

/// How long a mail's evidence waits for a log that was not preloaded
/// (a bisection's follow-up, a re-run's verdict): it is composed under
/// results' write lock.
const UNDER_LOCK_LIMIT: Duration = Duration::from_secs(1);

/// How many preloaded logs [`Notifier`] keeps (each bounded by the
/// output caps; the one wanted is the run just recorded).
const PRELOADED_LOGS: usize = 8;

/// `s/<project>/<email>`: a per-event subscription to a project.
fn project_sub_key(project: &str, email: &str) -> String {
    format!("s/{project}/{}", email.to_ascii_lowercase())
}

/// `x/<project>/<email>`: a config maintainer who unsubscribed.
fn tomb_key(project: &str, email: &str) -> String {
    format!("x/{project}/{}", email.to_ascii_lowercase())
}

/// `u/<project>/<email>`: when an address last unsubscribed from a project.
fn unsubscribed_key(project: &str, email: &str) -> String {
    format!("u/{project}/{}", email.to_ascii_lowercase())
}

/// `g/<upstream>/<email>`: the last digest period of a digest subscriber.
fn digest_period_key(upstream: &str, email: &str) -> String {
    format!("g/{upstream}/{}", email.to_ascii_lowercase())
}

/// The event of the mails a transition queues (`t<id>`; `mail list`
/// shows it): how the demo finds who was mailed about one.
pub(crate) fn transition_event(id: u64) -> String {
    format!("t{id}")
}

/// `e/<event>/<email>`: the mail queued for one event and recipient.
fn event_key(event: &str, email: &str) -> String {
    format!("e/{event}/{}", email.to_ascii_lowercase())
}

/// `m/<id>`: a mail.
fn mail_key(id: u64) -> String {
    format!("m/{}", id_key(id))
}

/// `q/<id>`: a mail is pending.
fn pending_key(id: u64) -> String {
    format!("q/{}", id_key(id))
}

/// Raw key/value writes to the `notify` tree, collected for one atomic
/// apply (JSON values already encoded by the [`Table`]).
type Writes = Vec<(Vec<u8>, Vec<u8>)>;

/// How many mails `writes` queue (a mail changed in place is not counted).
fn mails_in(writes: &Writes) -> usize {
    writes.iter().filter(|(k, _)| k.starts_with(b"q/")).count()
}

/// A short, stable tag of an address for Message-IDs (no address in headers
/// of other recipients' mails).
fn tag(email: &str) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(email.to_ascii_lowercase().as_bytes())[..4])
}

/// Checks an address the way delivery will.
fn check_email(email: &str) -> Result<String, NotifyError> {
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
    /// subscriptions, and starts the sender (over `[smtp]`) and the
    /// reminder/digest task.
    pub(crate) fn start(
        config: &HubConfig,
        store: &Store,
        results: Results,
        logs: Arc<JobLogs>,
        public_url: String,
        shutdown: CancellationToken,
    ) -> Result<Notifier, StartError> {
        let transport = Transport::from_config(&config.smtp).map_err(StartError::Smtp)?;
        let notifier = Notifier::open(
            config,
            store,
            results,
            logs,
            public_url,
            Arc::new(transport),
            Arc::new(now_ms),
        )?;
        tracing::info!(delivery = %notifier.describe(), "notifier started");
        let n = notifier.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move { n.send_loop(stop).await });
        let n = notifier.clone();
        tokio::spawn(async move { n.tick_loop(shutdown).await });
        Ok(notifier)
    }

    /// Opens the outbox and syncs the config's maintainers into the
    /// subscriptions, without starting any task: [`Notifier::start`] in the
    /// hub, the tests drive [`Notifier::send_due`], [`Notifier::remind`] and
    /// [`Notifier::digest`] themselves.
    fn open(
        config: &HubConfig,
        store: &Store,
        results: Results,
        logs: Arc<JobLogs>,
        public_url: String,
        mailer: Arc<dyn Mailer>,
        clock: Clock,
    ) -> Result<Notifier, StartError> {
        let key = UnsubscribeKey::load_or_create(&config.data_dir().join("unsubscribe.key"))?;
        let sender = deliver::sender(&config.smtp).map_err(StartError::Smtp)?;
        let domain = sender.email.domain().to_owned();
        let notifier = Notifier {
            inner: Arc::new(Inner {
                table: Table::open(store, trees::NOTIFY)?,
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
                mailer,
                sender,
                clock,
                wake: tokio::sync::Notify::new(),
                limits: subscribe::Limits::new(
                    config.notify.subscribe_per_address,
                    config.notify.subscribe_per_client,
                ),
                preloaded: Mutex::new(HashMap::new()),
            }),
        };
        notifier.sync_maintainers()?;
        Ok(notifier)
    }

    /// Now, by the notifier's [`Clock`].
    fn now(&self) -> u64 {
        (self.inner.clock)()
    }

    /// The `notify` table, for a caller that applies [`Notifier::stage`]d
    /// outbox entries in one atomic step with its own writes
    /// (`Table::apply_with`).
    pub(crate) fn table(&self) -> &Table {
        &self.inner.table
    }

    /// Stages into `batch` the outbox entries that the stored transition `t`
    /// causes: one mail per recipient for went red and fixed (nothing for
    /// other kinds), none for a recipient already queued for this event, so
    /// staging a transition again after a crash queues nothing twice. Apply
    /// `batch` to [`Notifier::table`] in the same atomic step that stores `t`,
    /// then [`Notifier::wake`] the sender. Returns the mails staged.
    pub(crate) fn stage(
        &self,
        t: &Transition,
        batch: &mut crate::store::Batch,
    ) -> Result<usize, StoreError> {
        let writes = self.transition_writes(t)?;
        let mails = mails_in(&writes);
        for (k, v) in writes {
            batch.insert(k, v);
        }
        Ok(mails)
    }

    /// The outbox entries for transition `t` (see [`Notifier::stage`]).
    fn transition_writes(&self, t: &Transition) -> Result<Writes, StoreError> {
        let kind = TransitionKind::try_from(t.kind).unwrap_or(TransitionKind::Unspecified);
        let mailed = match kind {
            TransitionKind::WentRed => self.mails_class(t),
            // A suspicious green: results makes one such transition per
            // spell, so its maintainers get one mail (render::suspicious).
            TransitionKind::StillGreen if t.class == Some(Class::Suspicious) => self.mails_class(t),
            // A fixed is mailed when its red spell was.
            TransitionKind::Fixed => match t.red_since_id {
                0 => true,
                id => self
                    .inner
                    .results
                    .transition(id)?
                    .is_none_or(|red| self.mails_class(&red)),
            },
            _ => false,
        };
        if !mailed {
            return Ok(Vec::new());
        }
        let mut writes = Writes::new();
        if kind == TransitionKind::Fixed && t.red_since_id != 0 {
            // A went-red mail still held for its bisection goes first: the
            // fixed answers it.
            for mut red in self.red_mails(t.red_since_id)? {
                if self.held(&red) {
                    red.info.next_attempt_at_ms = 0;
                    let key = mail_key(red.info.id).into_bytes();
                    writes.push((key, self.inner.table.encode(&red)?));
                }
            }
        }
        writes.extend(self.mails_for(t, &transition_event(t.id), About::Transition)?);
        Ok(writes)
    }

    /// The went-red mails of transition `id`, one per recipient.
    fn red_mails(&self, id: u64) -> Result<Vec<OutMail>, StoreError> {
        let s = &self.inner;
        let mut out = Vec::new();
        for item in s.table.scan_raw(format!("e/t{id}/")) {
            let (_, id) = item?;
            let Ok(id) = <[u8; 8]>::try_from(id.as_ref()).map(u64::from_be_bytes) else {
                continue;
            };
            if let Some(mail) = s.table.get::<OutMail>(mail_key(id))? {
                out.push(mail);
            }
        }
        Ok(out)
    }

    /// Whether `mail` is pending and due far enough ahead that the sender
    /// cannot be delivering it ([`RELEASE_MARGIN_MS`]): it may be changed
    /// in place.
    fn held(&self, mail: &OutMail) -> bool {
        mail.info.state == MailState::Pending as i32
            && mail.info.next_attempt_at_ms > self.now() + RELEASE_MARGIN_MS
    }

    /// Whether a went-red of `t`'s class is mailed: its project's
    /// `mail_classes` (a result without a class, from before classes, is;
    /// flaky and spurious ones never are).
    fn mails_class(&self, t: &Transition) -> bool {
        match t.class {
            None => true,
            Some(Class::Flaky | Class::Spurious) => false,
            Some(class) => self
                .inner
                .projects
                .iter()
                .find(|p| p.name == t.project)
                .is_none_or(|p| p.mail_classes.contains(&class)),
        }
    }

    /// Stages into `batch` what the end of `t`'s bisection causes (see
    /// [`TransitionSink::stage_bisected`]): each recipient's went-red mail
    /// re-rendered with the result and released when it is still held, else
    /// one follow-up in its thread; and, when a first bad commit was found
    /// and the upstream says `notify_authors`, the mark that mails its
    /// author. Staging again queues nothing twice. Returns the mails staged
    /// or changed.
    pub(crate) fn stage_bisected(
        &self,
        t: &Transition,
        batch: &mut crate::store::Batch,
    ) -> Result<usize, StoreError> {
        let writes = self.bisected_writes(t)?;
        let mails = writes.iter().filter(|(k, _)| k.starts_with(b"m/")).count();
        for (k, v) in writes {
            batch.insert(k, v);
        }
        Ok(mails)
    }

    /// The writes of [`Notifier::stage_bisected`].
    fn bisected_writes(&self, t: &Transition) -> Result<Writes, StoreError> {
        let s = &self.inner;
        let mut writes = Writes::new();
        let Some(b) = t
            .bisect
            .as_ref()
            .filter(|b| b.state != BisectState::Running)
        else {
            return Ok(writes);
        };
        let follow_up = format!("bisect.{}", t.id);
        let mut evidence = None;
        for red in self.red_mails(t.id)? {
            let id = red.info.id;
            let evidence = match &mut evidence {
                Some(e) => &*e,
                None => evidence.insert(self.evidence(t, About::Bisected)?),
            };
            let i = &red.info;
            let pending = i.state == MailState::Pending as i32;
            if self.held(&red) {
                // Still held (or waiting to retry): it goes now, and says it.
                let mut mail = self.transition_mail(
                    t,
                    i.id,
                    &i.event,
                    About::Transition,
                    &i.to,
                    red.unsubscribe_url.clone(),
                    evidence,
                );
                mail.info.created_at_ms = i.created_at_ms;
                mail.info.attempts = i.attempts;
                mail.info.last_error = i.last_error.clone();
                writes.push((mail_key(id).into_bytes(), s.table.encode(&mail)?));
                // It says the result: no follow-up is due for it.
                writes.push((
                    event_key(&follow_up, &i.to).into_bytes(),
                    id.to_be_bytes().to_vec(),
                ));
            } else if (pending || i.state == MailState::Sent as i32)
                && !s.table.contains(event_key(&follow_up, &i.to))?
            {
                let id = s.table.store().next_id()?;
                let mail = self.transition_mail(
                    t,
                    id,
                    &follow_up,
                    About::Bisected,
                    &i.to,
                    red.unsubscribe_url.clone(),
                    evidence,
                );
                self.queue(&mut writes, &mail)?;
            }
        }
        let notify_authors = s
            .upstreams
            .iter()
            .any(|u| u.name == t.upstream && u.notify_authors);
        if let (BisectState::Found, Some(c), true) = (b.state, &b.first_bad, notify_authors)
            && !t.project.is_empty()
            && self.mails_class(t)
        {
            let mark = AuthorMark {
                upstream: t.upstream.clone(),
                project: t.project.clone(),
                platform: t.platform.clone(),
                job_id: t.job_id,
                commit: c.clone(),
                branch: t.branch.clone(),
            };
            let key = format!("a/{}/{}", c.sha, id_key(t.id));
            writes.push((key.into_bytes(), s.table.encode(&mark)?));
        }
        Ok(writes)
    }

    /// Queues one mail to the author of each first bad commit marked since
    /// (`a/…`), listing every project marked for it; a commit whose author
    /// was mailed before is not mailed again. The marks go in the same
    /// write.
    async fn mail_authors(&self) -> Result<usize, StoreError> {
        let s = &self.inner;
        // Keyed by commit first: each commit's marks are neighbours.
        let all: Vec<(crate::store::Bytes, AuthorMark)> =
            s.table.scan::<AuthorMark>("a/").collect::<Result<_, _>>()?;
        let mut queued = 0;
        for marks in all.chunk_by(|(_, a), (_, b)| a.commit.sha == b.commit.sha) {
            let mut writes = Writes::new();
            let mut batch = crate::store::Batch::default();
            for (k, _) in marks {
                batch.remove(k);
            }
            let first = &marks[0].1;
            let author = first
                .commit
                .author
                .parse::<lettre::message::Mailbox>()
                .map(|m| m.email.to_string());
            match author {
                Err(e) => tracing::warn!(
                    commit = %first.commit.sha,
                    "the first bad commit's author {:?} has no address to mail ({e})",
                    first.commit.author
                ),
                Ok(email) => {
                    let event = format!("author.{}", first.commit.sha);
                    if !s.table.contains(event_key(&event, &email))? {
                        let mut broke: Vec<(String, String, String)> = marks
                            .iter()
                            .map(|(_, m)| {
                                let url = format!("{}/runs/{}", s.public_url, m.job_id);
                                (m.project.clone(), m.platform.clone(), url)
                            })
                            .collect();
                        broke.sort();
                        broke.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
                        let branch = self.branch_of(&first.upstream, &first.branch);
                        let r = render::first_bad_author(
                            &first.upstream,
                            &branch,
                            &first.commit,
                            &broke,
                        );
                        let id = s.table.store().next_id()?;
                        let mail = self.pending(id, &email, r, event, "author", String::new());
                        self.queue(&mut writes, &mail)?;
                        queued += 1;
                    }
                }
            }
            for (k, v) in writes {
                batch.insert(k, v);
            }
            s.table.apply(batch)?;
            s.table.store().commit().await?;
        }
        if queued > 0 {
            self.wake();
        }
        Ok(queued)
    }

    /// Makes the config's `maintainers` subscribers (unless they
    /// unsubscribed), and drops config subscriptions no longer in the config.
    fn sync_maintainers(&self) -> Result<(), StoreError> {
        let s = &self.inner;
        let mut wanted = HashMap::new();
        for p in &s.projects {
            for email in &p.maintainers {
                if let Ok(email) = check_email(email) {
                    wanted.insert(project_sub_key(&p.name, &email), (p, email));
                }
            }
        }
        let mut batch = crate::store::Batch::default();
        for item in s.table.scan::<Subscription>("s/") {
            let (k, sub) = item?;
            if sub.source == "config" && !wanted.contains_key(String::from_utf8_lossy(&k).as_ref())
            {
                batch.remove(k);
            }
        }
        for (key, (p, email)) in wanted {
            if s.table.contains(&key)? || s.table.contains(tomb_key(&p.name, &email))? {
                continue;
            }
            let sub = Subscription {
                email,
                project: p.name.clone(),
                source: "config".into(),
                created_at_ms: self.now(),
                ..Default::default()
            };
            s.table.stage(&mut batch, key, &sub)?;
        }
        s.table.apply(batch)
    }

    fn sub_key(sub: &Subscription) -> String {
        if sub.digest {
            format!("d/{}/{}", sub.upstream, sub.email.to_ascii_lowercase())
        } else {
            project_sub_key(&sub.project, &sub.email)
        }
    }

    /// Adds a subscription (checked against the config); false if it existed.
    pub(crate) async fn subscribe(&self, mut sub: Subscription) -> Result<bool, NotifyError> {
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
        let existed = s.table.contains(&key)?;
        sub.source = "cli".into();
        sub.created_at_ms = self.now();
        let mut batch = crate::store::Batch::default();
        s.table.stage(&mut batch, &key, &sub)?;
        if sub.digest {
            // The first digest covers what goes red from now on.
            let gkey = digest_period_key(&sub.upstream, &sub.email);
            if !s.table.contains(&gkey)? {
                s.table.stage(&mut batch, gkey, &self.digest_period())?;
            }
        } else {
            batch.remove(tomb_key(&sub.project, &sub.email).as_bytes());
        }
        s.table.apply(batch)?;
        s.table.store().commit().await?;
        tracing::info!(project = %sub.project, upstream = %sub.upstream, digest = sub.digest, "subscription added");
        Ok(!existed)
    }

    /// Removes a subscription; a config maintainer stays unsubscribed
    /// across restarts, and when an address left a project is kept (see
    /// [`Notifier::unsubscribed_at`]). False if there was none.
    pub(crate) async fn unsubscribe(&self, sub: &Subscription) -> Result<bool, NotifyError> {
        let s = &self.inner;
        let key = Self::sub_key(sub);
        let existed = s.table.contains(&key)?;
        let mut batch = crate::store::Batch::default();
        batch.remove(key.as_bytes());
        if !sub.digest {
            let from_config = s.projects.iter().any(|p| {
                p.name == sub.project
                    && p.maintainers
                        .iter()
                        .any(|m| m.eq_ignore_ascii_case(&sub.email))
            });
            if from_config {
                batch.insert(tomb_key(&sub.project, &sub.email).as_bytes(), []);
            }
            s.table.stage(
                &mut batch,
                unsubscribed_key(&sub.project, &sub.email),
                &self.now(),
            )?;
        }
        s.table.apply(batch)?;
        s.table.store().commit().await?;
        Ok(existed)
    }

    /// The hub's address as mail links name it (`notify.public_url`, or the
    /// web endpoint's), without a trailing slash.
    pub(crate) fn public_url(&self) -> &str {
        &self.inner.public_url
    }

    /// When `email` last unsubscribed from `project` (Unix ms), if ever:
    /// a confirmation link mailed before then no longer subscribes.
    pub(crate) fn unsubscribed_at(
        &self,
        project: &str,
        email: &str,
    ) -> Result<Option<u64>, StoreError> {
        self.inner.table.get(unsubscribed_key(project, email))
    }

    /// What an unsubscribe link would remove, if this hub signed it and it
    /// has not expired (for the page a GET shows; it removes nothing).
    pub(crate) fn unsubscribe_link(&self, token: &str) -> Result<Unsub, TokenError> {
        self.inner.key.verify(token, self.now())
    }

    /// What an unsubscribe link asks for; the sentence for the web page.
    pub(crate) async fn unsubscribe_token(&self, token: &str) -> Result<String, String> {
        let unsub = self
            .inner
            .key
            .verify(token, self.now())
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
    pub(crate) fn subscriptions(&self, project: &str) -> Result<Vec<Subscription>, NotifyError> {
        let mut out = Vec::new();
        for prefix in ["s/", "d/"] {
            for item in self.inner.table.scan::<Subscription>(prefix) {
                let (_, sub) = item?;
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
        let expires = self
            .now()
            .saturating_add(self.inner.settings.link_ttl.as_millis() as u64);
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
        for item in s.table.scan::<Subscription>(format!("s/{}/", t.project)) {
            let (_, sub) = item?;
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

    /// The branch a mail about `upstream` names: the one recorded with the
    /// transition (`recorded`: the branch its head was polled on, the
    /// repository's default branch when none is configured), else the
    /// configured one, else `main` (what older hubs followed by default).
    fn branch_of(&self, upstream: &str, recorded: &str) -> String {
        if !recorded.is_empty() {
            return recorded.to_owned();
        }
        self.inner
            .upstreams
            .iter()
            .find(|u| u.name == upstream)
            .and_then(|u| u.branch.clone())
            .unwrap_or_else(|| "main".into())
    }

    /// Reads the log of job `job_id` (a red run about to be recorded) for
    /// the mails its transition may cause, before results takes its write
    /// lock: the mails' evidence then does not wait for the object store
    /// under that lock. Best effort: what is not preloaded is read then.
    pub(crate) async fn preload_log(&self, job_id: u64) {
        let s = &self.inner;
        let read = tokio::time::timeout(PRELOAD_LIMIT, s.logs.read(job_id, None)).await;
        let text = match read {
            Ok(Ok(chunks)) => {
                let mut bytes = Vec::new();
                for c in chunks {
                    bytes.extend_from_slice(&c.data);
                }
                Some(Arc::new(String::from_utf8_lossy(&bytes).into_owned()))
            }
            Ok(Err(crate::logs::LogsError::Store(_))) => return,
            Ok(Err(e)) => {
                s.logs.unreadable(job_id, "its mail", &e);
                None
            }
            Err(_) => {
                let e = crate::logs::LogsError::Slow(PRELOAD_LIMIT);
                s.logs.unreadable(job_id, "its mail", &e);
                None
            }
        };
        let mut preloaded = s.preloaded.lock().unwrap_or_else(|p| p.into_inner());
        if preloaded.len() >= PRELOADED_LOGS && !preloaded.contains_key(&job_id) {
            preloaded.clear();
        }
        preloaded.insert(job_id, text);
    }

    /// Why `t`'s run failed, as a went-red mail (or its reminder or
    /// follow-up) shows it: the failing tests with their JUnit messages, and
    /// the log around the first failures (the project's `fail_pattern` or
    /// common markers) when no test said anything, else its tail.
    fn evidence(&self, t: &Transition, about: About) -> Result<Evidence, StoreError> {
        let s = &self.inner;
        let kind = TransitionKind::try_from(t.kind).unwrap_or(TransitionKind::Unspecified);
        if kind != TransitionKind::WentRed && about == About::Transition {
            return Ok(Evidence::default());
        }
        let run = match t.project.is_empty() {
            true => None,
            false => s
                .results
                .run(&t.project, &t.upstream, &t.platform, t.job_id)?
                .map(|r| r.info),
        };
        let failing = run.as_ref().map_or(&[][..], |r| &r.failing_tests[..]);
        // A log the object store cannot give now (an outage) does not hold
        // the mail up: it says so where the excerpt would be. The pipeline
        // preloads a red run's log (this runs under results' write lock);
        // only what was not preloaded is read here, bounded in time.
        let preloaded = (s.preloaded.lock().unwrap_or_else(|p| p.into_inner()))
            .get(&t.job_id)
            .cloned();
        let log = match preloaded.map(|p| p.ok_or(())) {
            Some(Ok(log)) => log.as_str().to_owned(),
            Some(Err(())) => format!("[trunkfarm hub: {}]", crate::logs::UNREADABLE),
            None => match output::log_text_within(&s.logs, t.job_id, None, UNDER_LOCK_LIMIT) {
                Ok(log) => log,
                Err(crate::logs::LogsError::Store(e)) => return Err(e),
                Err(e) => {
                    let why = s.logs.unreadable(t.job_id, "its mail", &e);
                    format!("[trunkfarm hub: {why}]")
                }
            },
        };
        let lines = s.settings.log_tail_lines as usize;
        let said = failing.iter().any(|c| !c.message.trim().is_empty());
        let fail = s
            .projects
            .iter()
            .find(|p| p.name == t.project)
            .and_then(|p| p.fail_pattern.as_ref());
        let excerpt = (!said)
            .then(|| output::excerpt(&log, fail, lines))
            .flatten();
        let log = match excerpt {
            Some(lines) => render::Quote::Excerpt(lines),
            None => {
                let all: Vec<&str> = log.lines().collect();
                render::Quote::Tail(all[all.len().saturating_sub(lines)..].join("\n"))
            }
        };
        Ok(Evidence { run, log })
    }

    /// The outbox writes for one mail to each recipient of an event; a
    /// went-red mail whose range is being bisected is held
    /// `notify.bisect_wait`.
    fn mails_for(&self, t: &Transition, event: &str, about: About) -> Result<Writes, StoreError> {
        let kind = TransitionKind::try_from(t.kind).unwrap_or(TransitionKind::Unspecified);
        let mut writes = Vec::new();
        let evidence = self.evidence(t, about)?;
        let wait = self.inner.settings.bisect_wait.as_millis() as u64;
        // A suspicious green is bisected like a went red: its one mail
        // waits for the first bad commit the same way.
        let held = about == About::Transition
            && (kind == TransitionKind::WentRed || t.class == Some(Class::Suspicious))
            && wait > 0
            && t.bisect
                .as_ref()
                .is_some_and(|b| b.state == BisectState::Running);
        for (email, unsub) in self.recipients(t)? {
            if self.inner.table.contains(event_key(event, &email))? {
                continue;
            }
            let unsubscribe_url = self.unsubscribe_url(&unsub);
            let id = self.inner.table.store().next_id()?;
            let mut mail =
                self.transition_mail(t, id, event, about, &email, unsubscribe_url, &evidence);
            if held {
                mail.info.next_attempt_at_ms = self.now() + wait;
            }
            self.queue(&mut writes, &mail)?;
        }
        Ok(writes)
    }

    /// The mail `id` about `t` to `email`, pending and due now.
    #[allow(clippy::too_many_arguments)]
    fn transition_mail(
        &self,
        t: &Transition,
        id: u64,
        event: &str,
        about: About,
        email: &str,
        unsubscribe_url: String,
        evidence: &Evidence,
    ) -> OutMail {
        let kind = TransitionKind::try_from(t.kind).unwrap_or(TransitionKind::Unspecified);
        let branch = self.branch_of(&t.upstream, &t.branch);
        let r = render::transition(
            t,
            &render::Context {
                branch: &branch,
                log: &evidence.log,
                run: evidence.run.as_ref(),
                public_url: &self.inner.public_url,
                unsubscribe_url: &unsubscribe_url,
                reminder: match about {
                    About::Reminder(days, n) => Some((days, n)),
                    _ => None,
                },
                follow_up: about == About::Bisected,
            },
        );
        let red = || self.message_id("red", t.id, email);
        let (message_id, in_reply_to) = match (about, kind) {
            (About::Reminder(_, n), _) => {
                (self.message_id(&format!("remind{n}"), t.id, email), red())
            }
            (About::Bisected, _) => (self.message_id("bisect", t.id, email), red()),
            (About::Transition, TransitionKind::Fixed) => (
                self.message_id("fixed", t.id, email),
                if t.red_since_id == 0 {
                    String::new()
                } else {
                    self.message_id("red", t.red_since_id, email)
                },
            ),
            (About::Transition, _) => (red(), String::new()),
        };
        OutMail {
            info: MailInfo {
                id,
                to: email.to_owned(),
                subject: r.subject,
                state: MailState::Pending.into(),
                created_at_ms: self.now(),
                event: event.to_owned(),
                message_id,
                in_reply_to,
                ..Default::default()
            },
            text: r.text,
            html: r.html,
            unsubscribe_url,
        }
    }

    /// A mail `id` to `to` of `r`, pending, for `event`; its `Message-ID`
    /// says `kind` (a mail with no thread to join: author, digest, confirm).
    fn pending(
        &self,
        id: u64,
        to: &str,
        r: render::Rendered,
        event: String,
        kind: &str,
        unsubscribe_url: String,
    ) -> OutMail {
        OutMail {
            info: MailInfo {
                id,
                to: to.to_owned(),
                subject: r.subject,
                state: MailState::Pending.into(),
                created_at_ms: self.now(),
                event,
                message_id: self.message_id(kind, id, to),
                ..Default::default()
            },
            text: r.text,
            html: r.html,
            unsubscribe_url,
        }
    }

    /// The writes that queue `mail` (its id, event and recipient set): the
    /// mail, its pending marker and its event key, which later attempts to
    /// queue the same event for the same recipient find.
    fn queue(&self, writes: &mut Writes, mail: &OutMail) -> Result<(), StoreError> {
        let i = &mail.info;
        let table = &self.inner.table;
        writes.push((mail_key(i.id).into_bytes(), table.encode(mail)?));
        writes.push((pending_key(i.id).into_bytes(), Vec::new()));
        writes.push((
            event_key(&i.event, &i.to).into_bytes(),
            i.id.to_be_bytes().to_vec(),
        ));
        Ok(())
    }

    /// Applies `writes` to the outbox and waits until they are durable.
    async fn apply(&self, writes: Writes) -> Result<(), StoreError> {
        let mut batch = crate::store::Batch::default();
        for (k, v) in writes {
            batch.insert(k, v);
        }
        self.inner.table.apply(batch)?;
        self.inner.table.store().commit().await
    }

    /// Wakes the sender (after something was queued).
    pub(crate) fn wake(&self) {
        self.inner.wake.notify_one();
    }

    /// The outbox, newest first.
    pub(crate) fn mails(
        &self,
        limit: usize,
        state: MailState,
    ) -> Result<Vec<MailInfo>, NotifyError> {
        let mut out = Vec::new();
        for item in self.inner.table.scan::<OutMail>("m/").rev() {
            let (_, mail) = item?;
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
    pub(crate) fn pending_count(&self) -> usize {
        self.inner.table.queue_keys("q/").count()
    }

    /// How delivery is configured, for `mail list`.
    pub(crate) fn describe(&self) -> String {
        self.inner.mailer.describe()
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
    pub(crate) async fn send_test(&self, to: &str) -> Result<String, NotifyError> {
        let to = check_email(to)?;
        let r = render::test_mail(&self.inner.hub_name);
        let mail = OutMail {
            info: MailInfo {
                to,
                subject: r.subject,
                message_id: self.message_id("test", self.now(), "test"),
                ..Default::default()
            },
            text: r.text,
            html: r.html,
            unsubscribe_url: String::new(),
        };
        let message = self.message(&mail).map_err(NotifyError::Invalid)?;
        match self.inner.mailer.send(message).await {
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
                    Some(self.now() + 5_000)
                }
            };
            let wait = next
                .map(|at| at.saturating_sub(self.now()))
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
        let now = self.now();
        let mut next: Option<u64> = None;
        let mut due = Vec::new();
        for k in s.table.queue_keys("q/") {
            let k = k?;
            // `q/<id>` → `m/<id>`.
            let key = [b"m/", &k[2..]].concat();
            let Some(mail) = s.table.get::<OutMail>(&key)? else {
                s.table.remove(&k)?;
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
                Ok(m) => s.mailer.send(m).await,
                Err(e) => Err(Failure::Permanent(e)),
            };
            mail.info.attempts += 1;
            let id = mail.info.id;
            let mut batch = crate::store::Batch::default();
            match result {
                Ok(answer) => {
                    mail.info.state = MailState::Sent.into();
                    mail.info.sent_at_ms = self.now();
                    mail.info.response = answer;
                    mail.info.last_error.clear();
                    batch.remove(pending_key(id).as_bytes());
                    tracing::info!(mail = id, event = %mail.info.event, "mail sent");
                }
                Err(Failure::Permanent(e)) => {
                    mail.info.state = MailState::Failed.into();
                    mail.info.last_error = e.clone();
                    batch.remove(pending_key(id).as_bytes());
                    tracing::warn!(mail = id, event = %mail.info.event, "mail refused for good: {e}");
                }
                Err(Failure::Transient(e)) => {
                    let s = &self.inner.settings;
                    let factor = 1u32 << (mail.info.attempts.saturating_sub(1)).min(20);
                    let wait = s.retry_first.saturating_mul(factor).min(s.retry_max);
                    mail.info.next_attempt_at_ms = self.now() + wait.as_millis() as u64;
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
            s.table.stage(&mut batch, mail_key(id), &mail)?;
            s.table.apply(batch)?;
            s.table.store().commit().await?;
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
            if let Err(e) = self.mail_authors().await {
                tracing::error!("mails to first bad commits' authors: {e}");
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
    async fn remind(&self) -> Result<usize, StoreError> {
        let s = &self.inner;
        let now = self.now();
        let mut queued = 0;
        for (_, t) in s.results.red_series()? {
            if !self.mails_class(&t) {
                continue;
            }
            let key = format!("r/{}", id_key(t.id));
            let sent: u32 = s.table.get(&key)?.unwrap_or(0);
            let after = s.settings.reminder_after.as_millis() as u64;
            let every = s.settings.reminder_every.as_millis() as u64;
            let due_at = t.at_ms + after + every * sent as u64;
            if now < due_at {
                continue;
            }
            let n = sent + 1;
            let days = (now.saturating_sub(t.at_ms)) / 86_400_000;
            let mut writes =
                self.mails_for(&t, &format!("remind{n}.{}", t.id), About::Reminder(days, n))?;
            queued += mails_in(&writes);
            writes.push((key.into_bytes(), s.table.encode(&n)?));
            self.apply(writes).await?;
        }
        if queued > 0 {
            self.wake();
        }
        Ok(queued)
    }

    /// Queues each digest subscriber's summary once per `digest_every`
    /// period that had something go red.
    async fn digest(&self) -> Result<usize, StoreError> {
        let s = &self.inner;
        let period = self.period_ms();
        let current = self.digest_period();
        let mut queued = 0;
        for item in s.table.scan::<Subscription>("d/") {
            let (_, sub) = item?;
            let gkey = digest_period_key(&sub.upstream, &sub.email);
            let mut writes = Writes::new();
            match s.table.get::<u64>(&gkey)? {
                // The first period of a new subscriber starts now.
                None => {}
                Some(last) if last >= current => continue,
                Some(last) => {
                    let (from, to) = (last * period, current * period);
                    let went_red = s.results.transitions(10_000, |t| {
                        t.upstream == sub.upstream
                            && t.kind == TransitionKind::WentRed as i32
                            // What the upstream broke: not a project's own.
                            && self.mails_class(t)
                            && !matches!(t.class, Some(Class::ProjectSide | Class::Broken))
                            && t.at_ms >= from
                            && t.at_ms < to
                    })?;
                    let event = format!("digest.{}.{current}", sub.upstream);
                    if !went_red.is_empty() && !s.table.contains(event_key(&event, &sub.email))? {
                        let unsub = Unsub {
                            email: sub.email.clone(),
                            project: String::new(),
                            upstream: sub.upstream.clone(),
                            digest: true,
                        };
                        let url = self.unsubscribe_url(&unsub);
                        let r = render::digest(&sub.upstream, &went_red, &s.public_url, &url);
                        let id = s.table.store().next_id()?;
                        let mail = self.pending(id, &sub.email, r, event, "digest", url);
                        self.queue(&mut writes, &mail)?;
                        queued += 1;
                    }
                }
            }
            writes.push((gkey.into_bytes(), s.table.encode(&current)?));
            self.apply(writes).await?;
        }
        if queued > 0 {
            self.wake();
        }
        Ok(queued)
    }

    /// The length of a digest period, in milliseconds (at least 1).
    fn period_ms(&self) -> u64 {
        self.inner.settings.digest_every.as_millis().max(1) as u64
    }

    /// The digest period now is in (periods since the Unix epoch).
    fn digest_period(&self) -> u64 {
        self.now() / self.period_ms()
    }
}

impl TransitionSink for Notifier {
    fn table(&self) -> &Table {
        Notifier::table(self)
    }

    fn stage(&self, t: &Transition, batch: &mut crate::store::Batch) -> Result<(), StoreError> {
        Notifier::stage(self, t, batch).map(|_mails| ())
    }

    fn stage_bisected(
        &self,
        t: &Transition,
        batch: &mut crate::store::Batch,
    ) -> Result<(), StoreError> {
        Notifier::stage_bisected(self, t, batch).map(|_mails| ())
    }
}
