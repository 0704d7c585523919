//! Polling: each upstream's and project's branch head, as `git ls-remote`
//! shows it, recorded in the `pipeline` tree (the layout is in
//! [`crate::store::trees::PIPELINE`]), and what a new head sets off: an
//! upstream's builds, a project's tests against the newest good runtime.

use serde::{Deserialize, Serialize};

use super::Pipeline;
use super::PipelineError;
use super::git::{GitError, Tip};
use crate::commit::short;
use crate::config::{ProjectConfig, UpstreamConfig};
use crate::results::ProjectRow;
use crate::store::{StoreError, id_key, now_ms};

/// A branch head as last seen.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Head {
    /// Full commit hash.
    pub(crate) commit: String,
    /// When polling first saw it, ms.
    pub(crate) seen_at_ms: u64,
    /// The branch it is the head of: the configured one, or the
    /// repository's default branch when none is configured. Empty in a
    /// head an older hub wrote: it followed `main` unless configured
    /// otherwise (see [`OLD_DEFAULT_BRANCH`]).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) branch: String,
}

/// The branch hubs before the default-branch lookup followed when none was
/// configured: what a head they stored without its branch is the head of.
const OLD_DEFAULT_BRANCH: &str = "main";

/// Whose branch a head is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Repo {
    /// An `[[upstream]]`.
    Upstream,
    /// A `[[project]]`.
    Project,
}

impl Repo {
    /// The key part: `u` or `p`.
    fn tag(self) -> &'static str {
        match self {
            Repo::Upstream => "u",
            Repo::Project => "p",
        }
    }

    /// What the poll error and logs call it.
    fn describe(self, name: &str) -> String {
        match self {
            Repo::Upstream => format!("upstream {name}"),
            Repo::Project => format!("project {name}"),
        }
    }
}

/// `h/<u|p>/<name>` → the [`Head`] last seen.
fn head_key(repo: Repo, name: &str) -> String {
    format!("h/{}/{name}", repo.tag())
}

/// `hh/<u|p>/<name>/<commit>` → when polling first saw `commit` as the head
/// (8-byte big-endian sequence number; what results are ordered by).
pub(super) fn seq_key(repo: Repo, name: &str, commit: &str) -> String {
    format!("hh/{}/{name}/{commit}", repo.tag())
}

/// `hs/u/<upstream>/<sequence>` → the commit polling saw as the head then
/// (sequence as `id_key`: key order is the order heads were seen in), so
/// the dashboard reads the newest heads without scanning them all.
fn order_key(upstream: &str, seq: u64) -> String {
    format!("{}{}", order_prefix(upstream), id_key(seq))
}

pub(super) fn order_prefix(upstream: &str) -> String {
    format!("hs/u/{upstream}/")
}

/// An upstream commit that was the head, as [`Pipeline::recent_heads`]
/// lists it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct SeenHead {
    /// Full commit hash.
    pub(crate) commit: String,
    /// Its place in the order heads were seen in.
    pub(crate) seq: u64,
}

impl Pipeline {
    /// The last `n` commits polling saw as `upstream`'s head, newest first
    /// (at most `n` keys read).
    pub(crate) fn recent_heads(
        &self,
        upstream: &str,
        n: usize,
    ) -> Result<Vec<SeenHead>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .inner
            .heads
            .scan_raw(order_prefix(upstream))
            .rev()
            .take(n)
        {
            let (k, v) = item?;
            let seq = String::from_utf8_lossy(&k)
                .rsplit('/')
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            out.push(SeenHead {
                commit: String::from_utf8_lossy(&v).into_owned(),
                seq,
            });
        }
        Ok(out)
    }

    /// Writes the `hs/` order of `upstream`'s heads from their `hh/`
    /// sequence numbers when it has none (a database from before the
    /// order was kept). Idempotent; durable with the next commit.
    pub(super) fn index_head_order(&self, upstream: &str) -> Result<(), StoreError> {
        let heads = &self.inner.heads;
        if heads.keys(order_prefix(upstream)).next().is_some() {
            return Ok(());
        }
        let prefix = format!("hh/{}/{upstream}/", Repo::Upstream.tag());
        let mut batch = crate::store::Batch::default();
        for item in heads.scan_raw(&prefix) {
            let (k, v) = item?;
            let key = String::from_utf8_lossy(&k);
            let commit = key.trim_start_matches(&prefix);
            if let Ok(seq) = v.as_ref().try_into().map(u64::from_be_bytes) {
                batch.insert(order_key(upstream, seq).as_bytes(), commit.as_bytes());
            }
        }
        heads.apply(batch)
    }

    /// The head last seen of an upstream's or project's branch.
    pub(super) fn head(&self, repo: Repo, name: &str) -> Result<Option<Head>, StoreError> {
        self.inner.heads.get(head_key(repo, name))
    }

    /// Records `tip` as the head (durably); false if its commit already
    /// was (a default branch renamed on the same commit is recorded, too).
    async fn save_head(&self, repo: Repo, name: &str, tip: &Tip) -> Result<bool, StoreError> {
        let old = self.head(repo, name)?;
        if old
            .as_ref()
            .is_some_and(|h| h.commit == tip.commit && h.branch == tip.branch)
        {
            return Ok(false);
        }
        let new_commit = old.as_ref().is_none_or(|h| h.commit != tip.commit);
        let commit = tip.commit.as_str();
        let heads = &self.inner.heads;
        let head = Head {
            commit: commit.to_owned(),
            seen_at_ms: match old {
                Some(h) if !new_commit => h.seen_at_ms,
                _ => now_ms(),
            },
            branch: tip.branch.clone(),
        };
        let mut batch = crate::store::Batch::default();
        heads.stage(&mut batch, head_key(repo, name), &head)?;
        // The order heads were seen in: what results are compared by.
        let seq_key = seq_key(repo, name, commit);
        if !heads.contains(&seq_key)? {
            let seq = heads.store().next_id()?;
            batch.insert(seq_key.as_bytes(), seq.to_be_bytes());
            if repo == Repo::Upstream {
                batch.insert(order_key(name, seq).as_bytes(), commit.as_bytes());
            }
        }
        heads.apply(batch)?;
        heads.store().commit().await?;
        self.inner.results.changes().bump();
        Ok(new_commit)
    }

    /// When polling first saw `commit` as `upstream`'s head (its order), or
    /// 0 if it never was the head.
    pub(super) fn head_seq(&self, upstream: &str, commit: &str) -> Result<u64, StoreError> {
        let key = seq_key(Repo::Upstream, upstream, commit);
        Ok(match self.inner.heads.get_raw(&key)? {
            Some(raw) => raw.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0),
            None => 0,
        })
    }

    /// Records a poll's error (empty: it worked); logs only its changes.
    fn set_poll_error(&self, what: String, error: String) {
        let mut errors = self
            .inner
            .poll_errors
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let previous = errors
            .insert(what.clone(), error.clone())
            .unwrap_or_default();
        if previous != error {
            if error.is_empty() {
                tracing::info!("polling {what} works again");
            } else {
                tracing::warn!("polling {what} failed: {error}");
            }
        }
    }

    /// The last poll's error for an upstream or project (empty: it worked).
    pub(super) fn poll_error(&self, repo: Repo, name: &str) -> String {
        self.inner
            .poll_errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&repo.describe(name))
            .cloned()
            .unwrap_or_default()
    }

    /// The branch followed without asking git: the configured one, else
    /// the one stored with the head (the default branch a poll found);
    /// `None` before the first poll of a repository with no branch
    /// configured.
    pub(super) fn known_branch(
        &self,
        repo: Repo,
        name: &str,
        configured: Option<&str>,
    ) -> Result<Option<String>, StoreError> {
        if let Some(branch) = configured {
            return Ok(Some(branch.to_owned()));
        }
        Ok(self.head(repo, name)?.map(|h| match h.branch.is_empty() {
            true => OLD_DEFAULT_BRANCH.to_owned(),
            false => h.branch,
        }))
    }

    /// A project as `status` shows it: its branch (empty: not polled yet),
    /// head and poll error.
    pub(super) fn project_row(&self, p: &ProjectConfig) -> Result<ProjectRow, PipelineError> {
        let facts = self.repo_facts(Repo::Project, &p.name, &p.url, p.branch.as_deref())?;
        let head = facts.head.unwrap_or_default();
        Ok(ProjectRow {
            name: p.name.clone(),
            url: facts.url,
            branch: facts.branch,
            head: head.commit,
            head_seen_at_ms: head.seen_at_ms,
            poll_error: facts.poll_error,
        })
    }

    /// The branch of an upstream that its commit mirror fetches: the
    /// configured one, else the one stored with its head, else asked of the
    /// repository now (it was never polled).
    pub(super) async fn upstream_branch(
        &self,
        u: &UpstreamConfig,
    ) -> Result<String, PipelineError> {
        if let Some(branch) = self.known_branch(Repo::Upstream, &u.name, u.branch.as_deref())? {
            return Ok(branch);
        }
        Ok(self.inner.git.head(&u.url, None).await?.branch)
    }

    /// Polls one branch head (without `branch`: the repository's default
    /// branch): records a new head and the poll's state. The head, once it
    /// is durably recorded.
    ///
    /// The default branch is looked up once and then followed by name (it
    /// is stored with the head): a repository whose HEAD points elsewhere
    /// for a while (a checkout of a work branch in a non-bare repository)
    /// does not make the hub follow that branch. Only when the followed
    /// branch is gone (renamed) is the default looked up again.
    async fn poll_head(
        &self,
        repo: Repo,
        name: &str,
        url: &str,
        branch: Option<&str>,
    ) -> Option<String> {
        let what = repo.describe(name);
        let followed = match branch {
            Some(_) => None,
            None => match self.head(repo, name) {
                Ok(h) => h.map(|h| h.branch).filter(|b| !b.is_empty()),
                Err(e) => {
                    tracing::error!("{what}: cannot read the stored head: {e}");
                    return None;
                }
            },
        };
        let polled = match self
            .inner
            .git
            .head(url, branch.or(followed.as_deref()))
            .await
        {
            Err(GitError::NotFound(gone)) if followed.is_some() => {
                tracing::info!("{what}: {gone}; following the default branch again");
                self.inner.git.head(url, None).await
            }
            polled => polled,
        };
        match polled {
            Ok(tip) => {
                self.set_poll_error(what.clone(), String::new());
                match self.save_head(repo, name, &tip).await {
                    Ok(true) => {
                        tracing::info!("{what}: new {} head {}", tip.branch, short(&tip.commit));
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::error!("{what}: cannot record the new head: {e}");
                        return None;
                    }
                }
                Some(tip.commit)
            }
            Err(e) => {
                self.set_poll_error(what, e.to_string());
                None
            }
        }
    }

    /// One poll of an upstream: record a new head, make sure its builds exist.
    pub(super) async fn poll_upstream(&self, index: usize) {
        let u = &self.inner.upstreams[index];
        let Some(commit) = self
            .poll_head(Repo::Upstream, &u.name, &u.url, u.branch.as_deref())
            .await
        else {
            return;
        };
        if let Err(e) = self.ensure_builds(u, &commit, None).await {
            tracing::error!(upstream = %u.name, "cannot queue builds of {}: {e}", short(&commit));
        }
    }

    /// One poll of a project: record a new head, make sure it is tested
    /// against each upstream's newest good runtime.
    pub(super) async fn poll_project(&self, index: usize) {
        let p = &self.inner.projects[index];
        let Some(commit) = self
            .poll_head(Repo::Project, &p.name, &p.url, p.branch.as_deref())
            .await
        else {
            return;
        };
        for u in &self.inner.upstreams {
            if !p.tests_against(&u.name) {
                continue;
            }
            for platform in p.platforms_for(u) {
                // Garbage collection must not delete the runtime between
                // choosing it here and the submit.
                let _runtimes = self.inner.runtimes.lock().await;
                let good = match self.inner.results.good_build(&u.name, platform) {
                    Ok(Some(good)) => good,
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::error!("{e}");
                        continue;
                    }
                };
                if let Err(e) = self.submit_test(p, u, platform, &good, &commit).await {
                    tracing::error!(project = %p.name, "cannot queue its tests: {e}");
                }
            }
        }
    }
}
