//! Self-service subscription with double opt-in: a maintainer enters an
//! address on a project's page, the hub mails a signed, expiring link to that
//! address through the outbox (durable before the page answers, so a crash
//! loses no confirmation mail, and sent once), and only a POST of that link
//! subscribes. Nothing is subscribed before.
//!
//! The page answers the same whether or not the address is subscribed
//! already (no enumeration of subscribers). Requests are rate limited in
//! memory: per client address (IPv6 by /64) and per recipient address
//! (`notify.subscribe_per_client`, `notify.subscribe_per_address`, per hour).
//! With `notify.self_subscribe = false` neither requests nor links are
//! taken: the operator subscribes people (`trunkfarm subscribe`).

use std::net::IpAddr;
use std::time::{Duration, Instant};

use trunkfarm_proto::settings::fmt_duration;

use super::token::{Confirm, ConfirmError, format_date};
use super::{Notifier, Subscription, check_email, project_sub_key, render, tomb_key};
use crate::auth::throttle::{Buckets, Refused};
use crate::store::StoreError;

/// The window both rate limits count over.
const WINDOW: Duration = Duration::from_secs(3600);

/// Longer addresses are refused (RFC 5321's limit for a path).
const MAX_ADDRESS_CHARS: usize = 254;

/// The rate limits of self-service requests (cheap to clone).
#[derive(Clone)]
pub(crate) struct Limits {
    /// Confirmation mails per recipient address.
    per_address: Buckets<String>,
    /// Requests per client (IPv6 by /64).
    per_client: Buckets<IpAddr>,
}

impl Limits {
    /// `per_address` mails per address and `per_client` requests per client,
    /// each per hour.
    pub(crate) fn new(per_address: u32, per_client: u32) -> Limits {
        Limits {
            per_address: Buckets::new(per_address, WINDOW),
            per_client: Buckets::new(per_client, WINDOW),
        }
    }
}

/// Why a subscription request was not taken; each says what to do.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RequestError {
    /// `notify.self_subscribe = false`.
    #[error(
        "this hub's operator subscribes people to its mail; ask them (they use `trunkfarm subscribe`)"
    )]
    Off,
    /// No configured project has this name.
    #[error("there is no project named {0:?} on this hub")]
    UnknownProject(String),
    /// The address is not one mail can go to.
    #[error("{0}")]
    BadAddress(String),
    /// Too many requests from this client, or mails to this address.
    #[error("{what}; try again in {}", fmt_duration(*.retry_after))]
    TooMany {
        /// Which limit, in words.
        what: &'static str,
        /// When the next request would be taken.
        retry_after: Duration,
    },
    /// The outbox could not be written.
    #[error("the hub could not queue the mail ({0}); try again later")]
    Store(#[from] StoreError),
}

/// Why a confirmation link did not subscribe.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConfirmRefused {
    /// Forged, altered, or expired.
    #[error(transparent)]
    Token(#[from] ConfirmError),
    /// `notify.self_subscribe = false`.
    #[error(
        "this hub's operator subscribes people to its mail and no longer takes these links; ask them"
    )]
    Off,
    /// The address unsubscribed from the project after the link was mailed.
    #[error(
        "you unsubscribed from {project} after this link was sent; subscribe again on {project}'s page"
    )]
    UnsubscribedSince {
        /// The project (whose page to link).
        project: String,
    },
    /// The project left the config since the link was mailed.
    #[error("there is no project named {0:?} on this hub any more")]
    UnknownProject(String),
    /// The store failed.
    #[error("the hub could not record the subscription ({0}); try again later")]
    Store(#[from] StoreError),
}

/// What a followed link did: subscribed the address, or found it subscribed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Confirmed {
    pub(crate) email: String,
    pub(crate) project: String,
    /// False when the address was subscribed already (following a link
    /// twice subscribes once).
    pub(crate) added: bool,
}

impl Notifier {
    /// A self-service request from `client` (its IP address, when known):
    /// queues one confirmation mail to `address` about `project`, durable
    /// when this returns. Returns the address as it will be written to.
    pub(crate) async fn request_subscription(
        &self,
        project: &str,
        address: &str,
        client: Option<IpAddr>,
    ) -> Result<String, RequestError> {
        let s = &self.inner;
        if !s.settings.self_subscribe {
            return Err(RequestError::Off);
        }
        if !s.projects.iter().any(|p| p.name == project) {
            return Err(RequestError::UnknownProject(project.to_owned()));
        }
        let now = Instant::now();
        if let Some(ip) = client {
            s.limits
                .per_client
                .take(&ip, now)
                .map_err(|r| too_many(r, "too many subscription requests from your network"))?;
        }
        let email = valid_address(address)?;
        s.limits
            .per_address
            .take(&email, now)
            .map_err(|r| too_many(r, "too many confirmation mails went to this address lately"))?;
        let ttl = s.settings.subscribe_link_ttl;
        let expires_at_ms = self.now().saturating_add(ttl.as_millis() as u64);
        let token = s.key.sign_confirm(&Confirm {
            email: email.clone(),
            project: project.to_owned(),
            issued_at_ms: self.now(),
            expires_at_ms,
        });
        let link = format!("{}/subscribe/confirm?token={token}", s.public_url);
        let project_url = format!("{}/projects/{project}", s.public_url);
        let r = render::confirm_subscription(&render::Confirmation {
            hub: &s.hub_name,
            email: &email,
            project,
            link: &link,
            project_url: &project_url,
            lifetime: &fmt_duration(ttl),
            expires: &format_date(expires_at_ms),
        });
        let id = s.table.store().next_id()?;
        // One event per request: a new request is a new mail, and the
        // outbox sends each once.
        let event = format!("confirm.{project}.{id}");
        let mail = self.pending(id, &email, r, event, "confirm", String::new());
        let mut writes = Vec::new();
        self.queue(&mut writes, &mail)?;
        self.apply(writes).await?;
        self.wake();
        tracing::info!(mail = id, %project, "subscription confirmation queued");
        Ok(email)
    }

    /// What a confirmation link would subscribe (for the page a GET shows;
    /// it subscribes nothing). A link mailed before the address last
    /// unsubscribed from the project is refused: unsubscribing ends what
    /// earlier links could do.
    pub(crate) fn confirmation(&self, token: &str) -> Result<Confirm, ConfirmRefused> {
        let s = &self.inner;
        let confirm = s.key.verify_confirm(token, self.now())?;
        if !s.settings.self_subscribe {
            return Err(ConfirmRefused::Off);
        }
        if !s.projects.iter().any(|p| p.name == confirm.project) {
            return Err(ConfirmRefused::UnknownProject(confirm.project));
        }
        if self
            .unsubscribed_at(&confirm.project, &confirm.email)?
            .is_some_and(|at| confirm.issued_at_ms <= at)
        {
            return Err(ConfirmRefused::UnsubscribedSince {
                project: confirm.project,
            });
        }
        Ok(confirm)
    }

    /// Follows a confirmation link (its POST): subscribes the address to
    /// per-event mail about the project, once however often it is followed.
    pub(crate) async fn confirm_subscription(
        &self,
        token: &str,
    ) -> Result<Confirmed, ConfirmRefused> {
        let confirm = self.confirmation(token)?;
        let s = &self.inner;
        let key = project_sub_key(&confirm.project, &confirm.email);
        let added = !s.table.contains(&key)?;
        if added {
            let sub = Subscription {
                email: confirm.email.clone(),
                project: confirm.project.clone(),
                source: "web".into(),
                created_at_ms: self.now(),
                ..Default::default()
            };
            let mut batch = crate::store::Batch::default();
            s.table.stage(&mut batch, &key, &sub)?;
            // A config maintainer who unsubscribed and now asks again.
            batch.remove(tomb_key(&confirm.project, &confirm.email).as_bytes());
            s.table.apply(batch)?;
            s.table.store().commit().await?;
            tracing::info!(project = %confirm.project, "subscription added by a confirmation link");
        }
        Ok(Confirmed {
            email: confirm.email,
            project: confirm.project,
            added,
        })
    }
}

/// The address a person typed, as mail will be sent to it, or a sentence
/// saying what is wrong with it.
fn valid_address(address: &str) -> Result<String, RequestError> {
    let trimmed = address.trim();
    if trimmed.is_empty() {
        return Err(RequestError::BadAddress(
            "the address is empty; enter one like you@example.org".into(),
        ));
    }
    if trimmed.chars().count() > MAX_ADDRESS_CHARS {
        return Err(RequestError::BadAddress(format!(
            "the address is longer than {MAX_ADDRESS_CHARS} characters; enter one like you@example.org"
        )));
    }
    if !trimmed.contains('@') {
        return Err(RequestError::BadAddress(format!(
            "{trimmed:?} has no @; enter an address like you@example.org"
        )));
    }
    check_email(trimmed).map_err(|e| RequestError::BadAddress(e.to_string()))
}

/// The refusal a rate limit's `r` makes: `what` when it is the key's own
/// allowance, "right now" when the limit's map is full of others' charges.
fn too_many(r: Refused, what: &'static str) -> RequestError {
    RequestError::TooMany {
        what: if r.full {
            "too many requests right now"
        } else {
            what
        },
        retry_after: round_up(r.retry_after),
    }
}

/// Whole seconds, at least one, and whole minutes beyond a minute (people
/// are told "try again in 20m", not "in 19m 59.8s").
fn round_up(d: Duration) -> Duration {
    let secs = (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1);
    if secs > 60 {
        Duration::from_secs(secs.div_ceil(60) * 60)
    } else {
        Duration::from_secs(secs)
    }
}
