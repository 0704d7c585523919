//! What the `notify` tree stores about subscriptions and mails: the
//! notifier's own serde types, so the stored JSON is this module's schema and
//! not the wire's. They write exactly the bytes the proto-derived types
//! (`v1::Subscription`, `v1::MailInfo`) wrote before, field for field and in
//! the same order; the wire types are made from them at the admin edge.

use serde::{Deserialize, Serialize};
use trunkfarm_proto::v1;

/// Who hears about what (`s/<project>/<email>` or `d/<upstream>/<email>`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct Subscription {
    pub(crate) email: String,
    /// The project whose transitions are mailed (empty for a digest).
    pub(crate) project: String,
    /// Only this platform; empty means any.
    pub(crate) platform: String,
    /// Only this upstream (the digest's upstream); empty means any.
    pub(crate) upstream: String,
    /// A digest of everything that went red in `upstream`.
    pub(crate) digest: bool,
    /// "config" (the hub config's maintainers), "cli" or "web" (self-service,
    /// after its confirmation link was followed).
    pub(crate) source: String,
    pub(crate) created_at_ms: u64,
}

/// One mail of the outbox, as `trunkfarm mail list` shows it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct MailInfo {
    pub(crate) id: u64,
    pub(crate) to: String,
    pub(crate) subject: String,
    /// A [`v1::MailState`] number: stored as the number, so a state this
    /// build does not know still reads.
    pub(crate) state: i32,
    pub(crate) attempts: u32,
    pub(crate) next_attempt_at_ms: u64,
    /// Why the last attempt failed.
    pub(crate) last_error: String,
    pub(crate) created_at_ms: u64,
    pub(crate) sent_at_ms: u64,
    /// What caused it: `t<transition id>`, `remind<n>.<id>`, `digest.<upstream>.<period>`,
    /// `confirm.<project>.<id>` (a self-service subscription request).
    pub(crate) event: String,
    pub(crate) message_id: String,
    pub(crate) in_reply_to: String,
    /// The server's answer when it was accepted.
    pub(crate) response: String,
}

impl From<v1::Subscription> for Subscription {
    fn from(s: v1::Subscription) -> Self {
        Subscription {
            email: s.email,
            project: s.project,
            platform: s.platform,
            upstream: s.upstream,
            digest: s.digest,
            source: s.source,
            created_at_ms: s.created_at_ms,
        }
    }
}

impl From<Subscription> for v1::Subscription {
    fn from(s: Subscription) -> Self {
        v1::Subscription {
            email: s.email,
            project: s.project,
            platform: s.platform,
            upstream: s.upstream,
            digest: s.digest,
            source: s.source,
            created_at_ms: s.created_at_ms,
        }
    }
}

impl From<MailInfo> for v1::MailInfo {
    fn from(m: MailInfo) -> Self {
        v1::MailInfo {
            id: m.id,
            to: m.to,
            subject: m.subject,
            state: m.state,
            attempts: m.attempts,
            next_attempt_at_ms: m.next_attempt_at_ms,
            last_error: m.last_error,
            created_at_ms: m.created_at_ms,
            sent_at_ms: m.sent_at_ms,
            event: m.event,
            message_id: m.message_id,
            in_reply_to: m.in_reply_to,
            response: m.response,
        }
    }
}
