//! "Something shown changed": a counter that owners of state bump after a
//! durable change a person would see (a result recorded, a job queued,
//! started or finished, a new upstream head), and the dashboard's
//! `/events` stream watches to tell browsers to fetch the grid again.
//!
//! Only the newest value matters (a `tokio::sync::watch`): a burst of
//! bumps wakes a watcher once, and bumping never blocks or allocates, so
//! owners call it freely. Each owner keeps its own (results, dispatch); a
//! watcher selects over the ones it shows.

use std::sync::Arc;

use tokio::sync::watch;

/// A change counter (cheap to clone; clones share it).
#[derive(Clone, Debug)]
pub(crate) struct Changes(Arc<watch::Sender<u64>>);

impl Default for Changes {
    fn default() -> Changes {
        Changes(Arc::new(watch::Sender::new(0)))
    }
}

impl Changes {
    /// Something shown changed (call after it is durable).
    pub(crate) fn bump(&self) {
        self.0.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver woken by the next bump.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.0.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_burst_of_bumps_wakes_a_watcher_once() {
        let changes = Changes::default();
        let mut rx = changes.subscribe();
        assert!(!rx.has_changed().unwrap());
        for _ in 0..100 {
            changes.clone().bump();
        }
        rx.changed().await.unwrap();
        assert_eq!(*rx.borrow_and_update(), 100);
        assert!(!rx.has_changed().unwrap());
    }
}
