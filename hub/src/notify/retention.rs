//! Retention's part in the `notify` tree: delivered mails older than
//! `retention.runs` (`m/<id>`) with the dedupe marks of events that cannot
//! happen again (`e/<event>/<email>`), reminder counts of went-reds that
//! are no longer open (`r/<id>`), and unsubscribe times (`u/…`) no
//! confirmation link can still be compared with. A few at a time, each
//! step one atomic write, durable when it returns.
//!
//! Kept whatever their age: mails not delivered (pending or failed: the
//! operator's to look at), mails of a transition retention keeps (an open
//! went-red's reminders and follow-ups are threaded on them), and the
//! dedupe marks of a first bad commit's author mail (`author.<sha>`: a
//! commit can be blamed again; one mark per blamed commit, not per job).

use std::collections::HashSet;

use trunkfarm_proto::v1::MailState;

use super::{Notifier, OutMail, event_key};
use crate::store::{StoreError, Table, id_key};

impl Notifier {
    /// Removes delivered mails sent before `before_ms` with ids after
    /// `after`, oldest first, at most `max`; with each, its event's dedupe
    /// mark when that event cannot be queued again (see
    /// [`Notifier::event_done`]). Returns how many mails it removed and
    /// the id to go on after (`None`: it got to mails made since
    /// `before_ms`, or to the end).
    pub(crate) async fn prune_mails(
        &self,
        before_ms: u64,
        kept_transitions: &HashSet<u64>,
        after: u64,
        max: usize,
    ) -> Result<(usize, Option<u64>), StoreError> {
        let table = &self.inner.table;
        let from = format!("m/{}", id_key(after.saturating_add(1)));
        let end = format!("m/{}", id_key(u64::MAX));
        let mut batch = crate::store::Batch::default();
        let mut removed = 0;
        let mut next = None;
        for item in table.range(from.as_bytes()..=end.as_bytes()) {
            let (k, v) = item?;
            let mail: OutMail = table.decode(&k, &v)?;
            let i = &mail.info;
            if i.created_at_ms >= before_ms {
                break;
            }
            if removed >= max {
                next = Some(i.id.saturating_sub(1));
                break;
            }
            let delivered = i.state == MailState::Sent as i32 && i.sent_at_ms < before_ms;
            if !delivered || transition_of(&i.event).is_some_and(|t| kept_transitions.contains(&t))
            {
                continue;
            }
            batch.remove(k);
            if self.event_done(&i.event, kept_transitions) {
                let mark = event_key(&i.event, &i.to);
                // Only the mark naming this mail (an event's one mail per
                // recipient).
                if table
                    .get_raw(&mark)?
                    .is_some_and(|id| id.as_ref() == i.id.to_be_bytes())
                {
                    batch.remove(mark.as_bytes());
                }
            }
            removed += 1;
        }
        if removed > 0 {
            table.apply(batch)?;
            table.store().commit().await?;
        }
        Ok((removed, next))
    }

    /// Whether `event` can never queue a mail again, so its dedupe mark may
    /// go with its mail: a transition's own mails (queued in its write),
    /// its bisection's follow-up and its reminders once it is not kept (no
    /// longer an open went-red or a running bisection's member), a digest
    /// of a period past, a subscription's confirmation (its own id). An
    /// author's mail and anything unknown: no.
    fn event_done(&self, event: &str, kept_transitions: &HashSet<u64>) -> bool {
        if let Some(t) = transition_of(event) {
            return !kept_transitions.contains(&t);
        }
        if let Some(rest) = event.strip_prefix("digest.") {
            return rest
                .rsplit('.')
                .next()
                .and_then(|p| p.parse::<u64>().ok())
                .is_some_and(|p| p < self.digest_period());
        }
        event.starts_with("confirm.")
    }

    /// Removes the reminder counts (`r/<id>`) of went-reds not kept (no
    /// longer red: reminders go only to an open went-red), at most `max`.
    pub(crate) async fn prune_reminders(
        &self,
        kept_transitions: &HashSet<u64>,
        max: usize,
    ) -> Result<usize, StoreError> {
        remove_up_to(&self.inner.table, "r/", max, |k, _| {
            let id = std::str::from_utf8(&k[2..])
                .ok()
                .and_then(|s| s.parse::<u64>().ok());
            Ok(id.is_some_and(|id| !kept_transitions.contains(&id)))
        })
        .await
    }

    /// Removes unsubscribe times (`u/<project>/<email>`) before
    /// `before_ms` and before the longest a confirmation link lives
    /// (`notify.subscribe_link_ttl`: a link mailed before the time is what
    /// it is compared with, and such a link has expired), at most `max`.
    pub(crate) async fn prune_unsubscribed(
        &self,
        before_ms: u64,
        max: usize,
    ) -> Result<usize, StoreError> {
        let table = &self.inner.table;
        let ttl =
            u64::try_from(self.inner.settings.subscribe_link_ttl.as_millis()).unwrap_or(u64::MAX);
        let before = before_ms.min(self.now().saturating_sub(ttl));
        remove_up_to(table, "u/", max, |k, raw| {
            Ok(table.decode::<u64>(k, raw)? < before)
        })
        .await
    }
}

/// Removes the records under `prefix` that `expired` (key, raw value)
/// says may go, at most `max`, in one durable step; how many went.
async fn remove_up_to(
    table: &Table,
    prefix: &str,
    max: usize,
    mut expired: impl FnMut(&[u8], &[u8]) -> Result<bool, StoreError>,
) -> Result<usize, StoreError> {
    let mut batch = crate::store::Batch::default();
    let mut removed = 0;
    for item in table.scan_raw(prefix) {
        let (k, v) = item?;
        if expired(&k, &v)? {
            batch.remove(k);
            removed += 1;
            if removed >= max {
                break;
            }
        }
    }
    if removed > 0 {
        table.apply(batch)?;
        table.store().commit().await?;
    }
    Ok(removed)
}

/// The transition an event is about: `t<id>`, `bisect.<id>`,
/// `remind<n>.<id>`.
fn transition_of(event: &str) -> Option<u64> {
    if let Some(id) = event.strip_prefix('t') {
        return id.parse().ok();
    }
    if let Some(id) = event.strip_prefix("bisect.") {
        return id.parse().ok();
    }
    if event.starts_with("remind") {
        return event.rsplit('.').next()?.parse().ok();
    }
    None
}
