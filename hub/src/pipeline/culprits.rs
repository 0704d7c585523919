//! Culprit ranges: the upstream commits between a series' last green result
//! and the one that went red, listed with git while results records (no
//! lock a poller takes is held meanwhile: a slow fetch stalls no poll).

use super::git::MAX_RANGE_COMMITS;
use super::poll::Repo;
use super::{Pipeline, PipelineError};
use crate::results::{Commit, CulpritRange, Culprits};

#[tonic::async_trait]
impl Culprits for Pipeline {
    /// Lists the range's commits; on failure, just the last commit and why.
    async fn list(&self, range: &CulpritRange) -> (Vec<Commit>, String) {
        let only_to = || {
            vec![Commit {
                sha: range.to.clone(),
                ..Default::default()
            }]
        };
        let Ok(u) = self.upstream(&range.upstream) else {
            return (only_to(), "the upstream is no longer configured".into());
        };
        let listed = match self.upstream_branch(u).await {
            Ok(branch) => self
                .inner
                .git
                .range(&u.name, &u.url, &branch, range.from.as_deref(), &range.to)
                .await
                .map_err(PipelineError::from),
            Err(e) => Err(e),
        };
        match listed {
            Ok((commits, false)) if !commits.is_empty() => (commits, String::new()),
            Ok((commits, true)) => (
                commits,
                format!(
                    "the range holds more than {MAX_RANGE_COMMITS} commits; only the newest are listed"
                ),
            ),
            Ok(_) => (only_to(), "git listed no commit in the range".into()),
            Err(e) => {
                tracing::warn!(upstream = %u.name, "cannot list the culprit range: {e}");
                (only_to(), e.to_string())
            }
        }
    }

    fn bisects(&self) -> bool {
        self.inner.bisect_max_builds > 0
    }

    /// The branch stored with the upstream's head (the default branch its
    /// poll found, when none is configured): what its mails name.
    fn branch(&self, upstream: &str) -> String {
        let configured = self
            .upstream(upstream)
            .ok()
            .and_then(|u| u.branch.as_deref());
        match self.known_branch(Repo::Upstream, upstream, configured) {
            Ok(branch) => branch.unwrap_or_default(),
            Err(e) => {
                tracing::warn!(upstream, "cannot read the branch its head is on: {e}");
                String::new()
            }
        }
    }
}
