//! Where a queue-like prefix's first live key is.
//!
//! Some prefixes are queues: keys go in (a finished job's inbox marker, a
//! pending mail) and are taken off the front once handled. The database
//! keeps a removed key as a tombstone until compaction drops it, and a
//! prefix scan walks every tombstone it meets: after a million jobs went
//! through the inbox, each look at it walked a million removed keys before
//! the first live one (the intake of `trunkfarm bench growth` fell from
//! about 560 to 160 jobs/s). So each table remembers, per queue prefix, a
//! key no live key sorts below, and scans start there.
//!
//! The rule that keeps it safe: a scan moves the mark up only to the first
//! key it found, and only if no key was written under the prefix while it
//! ran; every write that inserts under the prefix is counted, and moves the
//! mark down to its key, after it is applied (so a scan that did not see
//! the key either started before the count changed, and then does not
//! move the mark, or moved it before the write lowered it again). Nothing
//! is persisted: a restarted hub starts at the prefix, walking the
//! tombstones once.

use std::sync::Mutex;

/// The marks of one tree's queue prefixes; shared by every [`super::Table`]
/// of that tree in one store.
#[derive(Default)]
pub(super) struct Queues {
    marks: Mutex<Vec<Mark>>,
}

/// One queue prefix's mark.
struct Mark {
    prefix: Vec<u8>,
    /// No live key under the prefix sorts before this one; `None`: the
    /// last scan found none, and nothing was written since.
    from: Option<Vec<u8>>,
    /// Keys written under the prefix so far: a scan moves `from` up only
    /// if this did not change while it ran.
    writes: u64,
}

/// Where a scan starts, and what it must hand back to [`Queues::found`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Start {
    /// The first key to look at; `None`: the queue is empty.
    pub(super) from: Option<Vec<u8>>,
    writes: u64,
}

impl Queues {
    fn marks(&self) -> std::sync::MutexGuard<'_, Vec<Mark>> {
        // Every change under this lock is one assignment: safe after a panic.
        self.marks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Where a scan of the queue under `prefix` starts (its first scan: at
    /// the prefix).
    pub(super) fn start(&self, prefix: &[u8]) -> Start {
        let mut marks = self.marks();
        let mark = match marks.iter().position(|m| m.prefix == prefix) {
            Some(i) => &marks[i],
            None => {
                marks.push(Mark {
                    prefix: prefix.to_vec(),
                    from: Some(prefix.to_vec()),
                    writes: 0,
                });
                &marks[marks.len() - 1]
            }
        };
        Start {
            from: mark.from.clone(),
            writes: mark.writes,
        }
    }

    /// A scan that began at `start` found `first` as the queue's first key
    /// (`None`: it found none): later scans start there, unless a key was
    /// written under the prefix meanwhile.
    pub(super) fn found(&self, prefix: &[u8], start: &Start, first: Option<&[u8]>) {
        let mut marks = self.marks();
        if let Some(mark) = marks.iter_mut().find(|m| m.prefix == prefix)
            && mark.writes == start.writes
        {
            mark.from = first.map(<[u8]>::to_vec);
        }
    }

    /// `keys` were written (and are visible to new scans): each one under
    /// a queue prefix moves its mark down to it if it sorts below.
    pub(super) fn written<'k>(&self, keys: impl IntoIterator<Item = &'k [u8]>) {
        let mut marks = self.marks();
        if marks.is_empty() {
            return;
        }
        for key in keys {
            for mark in marks.iter_mut().filter(|m| key.starts_with(&m.prefix)) {
                mark.writes += 1;
                if mark.from.as_deref().is_none_or(|from| key < from) {
                    mark.from = Some(key.to_vec());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scan_moves_the_mark_up_to_the_first_key_it_found() {
        let q = Queues::default();
        let start = q.start(b"f");
        assert_eq!(start.from.as_deref(), Some(&b"f"[..]));
        q.found(b"f", &start, Some(b"f5"));
        assert_eq!(q.start(b"f").from.as_deref(), Some(&b"f5"[..]));
        let start = q.start(b"f");
        q.found(b"f", &start, None);
        assert_eq!(q.start(b"f").from, None, "an empty queue needs no look");
    }

    #[test]
    fn a_write_below_the_mark_moves_it_down() {
        let q = Queues::default();
        let start = q.start(b"f");
        q.found(b"f", &start, Some(b"f5"));
        q.written([&b"f3"[..], &b"g1"[..], &b"f9"[..]]);
        assert_eq!(q.start(b"f").from.as_deref(), Some(&b"f3"[..]));
        let start = q.start(b"f");
        q.found(b"f", &start, None);
        q.written([&b"f7"[..]]);
        assert_eq!(q.start(b"f").from.as_deref(), Some(&b"f7"[..]));
    }

    #[test]
    fn a_scan_that_a_write_overtook_leaves_the_mark_where_it_was() {
        let q = Queues::default();
        let start = q.start(b"q/");
        q.found(b"q/", &start, Some(b"q/10"));
        // A scan starts at q/10 and does not see q/12, written after it
        // began; q/12 is above the mark, so only the count tells.
        let scan = q.start(b"q/");
        q.written([&b"q/12"[..]]);
        q.found(b"q/", &scan, Some(b"q/20"));
        assert_eq!(
            q.start(b"q/").from.as_deref(),
            Some(&b"q/10"[..]),
            "moving up to q/20 would hide q/12 for good"
        );
    }

    #[test]
    fn prefixes_keep_their_own_marks() {
        let q = Queues::default();
        let f = q.start(b"f");
        let o = q.start(b"o");
        q.found(b"f", &f, None);
        q.found(b"o", &o, Some(b"o2"));
        q.written([&b"o1"[..]]);
        assert_eq!(q.start(b"f").from, None);
        assert_eq!(q.start(b"o").from.as_deref(), Some(&b"o1"[..]));
    }
}
