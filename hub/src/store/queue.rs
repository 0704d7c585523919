//! Where a queue-like prefix's first live key is.
//!
//! Some prefixes are queues: keys go in (a finished job's inbox marker, a
//! pending mail) and are taken off the front once handled. The database
//! keeps a removed key as a tombstone until compaction drops it, and a
//! prefix scan walks every tombstone it meets: after a million jobs went
//! through the inbox, each look at it walked a million removed keys before
//! the first live one (the intake of `trunkfarm bench growth` fell from
//! about 560 to 160 jobs/s). So a store remembers, per tree and queue
//! prefix, a mark below which no live key is, and scans start there.
//!
//! The rule that keeps it safe: a scan moves the mark to the first key it
//! found, or lower to the lowest key written under the prefix while it
//! ran. A write reports its keys after it is applied, and each one moves
//! the mark down to it; so a key a scan did not see was either reported
//! before the scan began (then the scan started at or below it and would
//! have seen it, unless it was removed again), or while it ran (then the
//! scan leaves the mark at or below it), or after it ended (then the key
//! moves the mark itself). Nothing is persisted: a restarted hub starts
//! at the prefix and walks the tombstones once.
//!
//! A live key at the front that stays (a mail waiting for a late retry, a
//! job the pipeline is still taking in) holds the mark there: the keys
//! removed after it are walked until it goes.

use std::sync::Mutex;

/// The marks of one tree's queue prefixes; shared by every [`super::Table`]
/// of that tree in one store.
#[derive(Default)]
pub(super) struct Queues {
    marks: Mutex<Vec<Mark>>,
    /// Whether any prefix was scanned as a queue: until then writes need
    /// not report their keys (most trees never are).
    any: std::sync::atomic::AtomicBool,
}

/// One queue prefix's mark.
struct Mark {
    prefix: Vec<u8>,
    /// No live key under the prefix whose write was reported sorts before
    /// this one; `None`: none at all.
    from: Option<Vec<u8>>,
    /// Scans under way: each one's number and the lowest key written
    /// under the prefix since it began.
    scans: Vec<(u64, Option<Vec<u8>>)>,
    /// The next scan's number.
    next_scan: u64,
}

/// Where a scan starts, and what it must hand back to [`Queues::found`] or
/// [`Queues::abandoned`].
#[derive(Debug)]
pub(super) struct Start {
    /// The first key to look at; `None`: the queue is empty.
    pub(super) from: Option<Vec<u8>>,
    scan: u64,
}

/// The lower of two keys, `None` being above every key.
fn lowest(a: Option<Vec<u8>>, b: Option<&[u8]>) -> Option<Vec<u8>> {
    match (a, b) {
        (Some(a), Some(b)) if b < a.as_slice() => Some(b.to_vec()),
        (None, Some(b)) => Some(b.to_vec()),
        (a, _) => a,
    }
}

impl Queues {
    fn marks(&self) -> std::sync::MutexGuard<'_, Vec<Mark>> {
        // No change under this lock leaves a mark half-made: safe after a
        // panic.
        self.marks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether writes must report their keys to [`Queues::written`].
    pub(super) fn watched(&self) -> bool {
        self.any.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A scan of the queue under `prefix` begins (the first one at the
    /// prefix): where it starts.
    pub(super) fn start(&self, prefix: &[u8]) -> Start {
        let mut marks = self.marks();
        let i = match marks.iter().position(|m| m.prefix == prefix) {
            Some(i) => i,
            None => {
                // A write staged before this reports nothing it wrote;
                // it sees this once applied (`Table::apply`).
                self.any.store(true, std::sync::atomic::Ordering::SeqCst);
                marks.push(Mark {
                    prefix: prefix.to_vec(),
                    from: Some(prefix.to_vec()),
                    scans: Vec::new(),
                    next_scan: 0,
                });
                marks.len() - 1
            }
        };
        let mark = &mut marks[i];
        let scan = mark.next_scan;
        mark.next_scan += 1;
        mark.scans.push((scan, None));
        Start {
            from: mark.from.clone(),
            scan,
        }
    }

    /// The scan that began at `start` found `first` as the queue's first
    /// key (`None`: none): later scans start there, or at the lowest key
    /// written under the prefix meanwhile.
    pub(super) fn found(&self, prefix: &[u8], start: Start, first: Option<&[u8]>) {
        let mut marks = self.marks();
        if let Some(mark) = marks.iter_mut().find(|m| m.prefix == prefix)
            && let Some(i) = mark.scans.iter().position(|(n, _)| *n == start.scan)
        {
            let (_, written) = mark.scans.swap_remove(i);
            mark.from = lowest(written, first);
        }
    }

    /// The scan that began at `start` ended without finding the first key
    /// (a read failed): the mark stays.
    pub(super) fn abandoned(&self, prefix: &[u8], start: Start) {
        let mut marks = self.marks();
        if let Some(mark) = marks.iter_mut().find(|m| m.prefix == prefix) {
            mark.scans.retain(|(n, _)| *n != start.scan);
        }
    }

    /// Keys were written that were not kept to report (the batch was
    /// staged before any queue of the tree was watched): every mark, and
    /// every scan under way, goes back to its prefix.
    pub(super) fn written_unknown(&self) {
        let mut marks = self.marks();
        for mark in marks.iter_mut() {
            mark.from = Some(mark.prefix.clone());
            for (_, low) in &mut mark.scans {
                *low = Some(mark.prefix.clone());
            }
        }
    }

    /// `keys` were written (and are visible to new scans): each one under
    /// a queue prefix moves its mark down to it if it sorts below, and is
    /// noted by the scans under way.
    pub(super) fn written<'k>(&self, keys: impl IntoIterator<Item = &'k [u8]>) {
        let mut marks = self.marks();
        if marks.is_empty() {
            return;
        }
        for key in keys {
            for mark in marks.iter_mut().filter(|m| key.starts_with(&m.prefix)) {
                mark.from = lowest(mark.from.take(), Some(key));
                for (_, low) in &mut mark.scans {
                    *low = lowest(low.take(), Some(key));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(q: &Queues, prefix: &[u8]) -> Option<Vec<u8>> {
        let start = q.start(prefix);
        let from = start.from.clone();
        q.abandoned(prefix, start);
        from
    }

    #[test]
    fn a_scan_moves_the_mark_to_the_first_key_it_found() {
        let q = Queues::default();
        let start = q.start(b"f");
        assert_eq!(start.from.as_deref(), Some(&b"f"[..]));
        q.found(b"f", start, Some(b"f5"));
        assert_eq!(from(&q, b"f").as_deref(), Some(&b"f5"[..]));
        let start = q.start(b"f");
        q.found(b"f", start, None);
        assert_eq!(from(&q, b"f"), None, "an empty queue needs no look");
    }

    #[test]
    fn a_write_below_the_mark_moves_it_down() {
        let q = Queues::default();
        let start = q.start(b"f");
        q.found(b"f", start, Some(b"f5"));
        q.written([&b"f3"[..], &b"g1"[..], &b"f9"[..]]);
        assert_eq!(from(&q, b"f").as_deref(), Some(&b"f3"[..]));
        let start = q.start(b"f");
        q.found(b"f", start, None);
        q.written([&b"f7"[..]]);
        assert_eq!(from(&q, b"f").as_deref(), Some(&b"f7"[..]));
    }

    #[test]
    fn a_scan_that_a_write_overtook_moves_the_mark_only_down_to_that_write() {
        let q = Queues::default();
        let start = q.start(b"q/");
        q.found(b"q/", start, Some(b"q/10"));
        // A scan starts at q/10 and does not see q/12, written after it
        // began; q/12 is above the mark, so only the scan can tell.
        let scan = q.start(b"q/");
        q.written([&b"q/14"[..], &b"q/12"[..]]);
        q.found(b"q/", scan, Some(b"q/20"));
        assert_eq!(
            from(&q, b"q/").as_deref(),
            Some(&b"q/12"[..]),
            "moving up to q/20 would hide q/12 for good"
        );
        // The write does not keep the mark from moving past the tombstones
        // before it.
        let scan = q.start(b"q/");
        q.found(b"q/", scan, Some(b"q/12"));
        assert_eq!(from(&q, b"q/").as_deref(), Some(&b"q/12"[..]));
    }

    #[test]
    fn overlapping_scans_each_keep_what_was_written_during_their_own() {
        let q = Queues::default();
        let early = q.start(b"f");
        q.written([&b"f4"[..]]);
        let late = q.start(b"f");
        q.found(b"f", late, Some(b"f4"));
        q.found(b"f", early, Some(b"f9"));
        assert_eq!(from(&q, b"f").as_deref(), Some(&b"f4"[..]));
        let failed = q.start(b"f");
        q.abandoned(b"f", failed);
        assert_eq!(from(&q, b"f").as_deref(), Some(&b"f4"[..]));
    }

    #[test]
    fn writes_not_kept_to_report_send_every_mark_back_to_its_prefix() {
        let q = Queues::default();
        assert!(!q.watched());
        let scan = q.start(b"f");
        assert!(q.watched());
        q.written_unknown();
        q.found(b"f", scan, Some(b"f9"));
        assert_eq!(from(&q, b"f").as_deref(), Some(&b"f"[..]));
        let scan = q.start(b"f");
        q.found(b"f", scan, Some(b"f9"));
        q.written_unknown();
        assert_eq!(from(&q, b"f").as_deref(), Some(&b"f"[..]));
    }

    #[test]
    fn prefixes_keep_their_own_marks() {
        let q = Queues::default();
        let f = q.start(b"f");
        let o = q.start(b"o");
        q.found(b"f", f, None);
        q.found(b"o", o, Some(b"o2"));
        q.written([&b"o1"[..]]);
        assert_eq!(from(&q, b"f"), None);
        assert_eq!(from(&q, b"o").as_deref(), Some(&b"o1"[..]));
    }
}
