//! Garbage collection of runtime artifacts, after each build is taken in:
//! keep what a last known result or an unfinished job refers to (and the
//! newest few per upstream and platform, see [`crate::artifacts`]).

use super::Pipeline;

impl Pipeline {
    /// Deletes artifacts no one needs any more (errors are logged: a failed
    /// collection only costs disk). Holds the runtimes lock, so a poller
    /// never chooses a runtime this deletes before its tests are queued.
    pub(super) async fn collect_garbage(&self) {
        let _runtimes = self.inner.runtimes.lock().await;
        let referenced = match self.inner.results.referenced_artifacts() {
            Ok(mut r) => {
                // Queued and running tests still need theirs.
                r.extend(self.inner.dispatch.open_artifacts());
                r
            }
            Err(e) => {
                tracing::warn!("artifact garbage collection skipped: {e}");
                return;
            }
        };
        match self
            .inner
            .artifacts
            .gc(self.inner.keep_artifacts, &referenced)
            .await
        {
            Ok(deleted) if !deleted.is_empty() => {
                tracing::info!("deleted {} old runtime artifact(s)", deleted.len())
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("artifact garbage collection failed: {e}"),
        }
    }
}
