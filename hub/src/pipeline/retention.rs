//! Retention's part in the pipeline: which job keys the pipeline could
//! still submit ([`LiveKeys`]: dispatch keeps those jobs' records and their
//! `k<key>` once-only markers), the builds the dashboard's columns show,
//! and pruning the head order (`hh/…`, `hs/…`) of commits long past.
//!
//! The invariant (ARCHITECTURE.md): a job's `k<key>` marker goes only with
//! its record, and only once nothing the pipeline does by itself can
//! submit that key again — otherwise a re-poll would run the job twice.
//! The pipeline submits keys only from what it holds now: the upstream
//! heads (their builds), the project heads against each upstream's newest
//! passed build (their tests), a build taken in (its fan-out: the inbox),
//! a held verdict (its re-runs), a running bisection (its builds and runs),
//! and `trunkfarm calibrate` of a job whose record is stored. A key none of
//! these can produce is never submitted again by the pipeline; a hand-made
//! `trunkfarm build --rev` of a pruned commit builds it again (asked for),
//! and a hand `submit --idempotency-key` is once-only for `retention.jobs`.

use std::collections::{HashMap, HashSet};

use super::Pipeline;
use super::poll::{Repo, order_prefix, seq_key};
use crate::dispatch::Dispatcher;
use crate::job_key::{JobKey, RerunKind};
use crate::results::Kept;
use crate::store::StoreError;

/// What the pipeline could still submit, as of one retention pass.
pub(crate) struct LiveKeys {
    /// Upstream → its head commit.
    upstream_heads: HashMap<String, String>,
    /// Project → its head commit.
    project_heads: HashMap<String, String>,
    /// (upstream, platform) → the newest passed build's job: what a
    /// project's poll tests its head against.
    good: HashMap<(String, String), u64>,
    /// Jobs whose re-runs or fan-out may still be submitted: held verdicts
    /// and the finished jobs not taken in yet.
    taking_in: HashSet<u64>,
    /// (upstream, platform) with a running bisection.
    bisecting: HashSet<(String, String)>,
    /// For a calibration's original (calibrating needs its record).
    dispatch: Dispatcher,
}

impl LiveKeys {
    /// Whether the pipeline could still submit `key` (an unknown key: yes,
    /// it is kept).
    pub(crate) fn submittable(&self, key: &str) -> bool {
        if key.starts_with("submit/") {
            // A hand submit's idempotency key: once-only for as long as
            // its record is kept (`retention.jobs`).
            return false;
        }
        let Some(parsed) = JobKey::parse(key) else {
            return true;
        };
        self.parsed(&parsed)
    }

    fn parsed(&self, key: &JobKey) -> bool {
        match key {
            JobKey::Build {
                upstream,
                commit,
                nonce,
                ..
            } => nonce.is_none() && self.upstream_heads.get(upstream) == Some(commit),
            JobKey::Test {
                project,
                upstream,
                platform,
                project_commit,
                nonce,
                ..
            } => {
                let head = self.project_heads.get(project);
                let at_head = project_commit.is_empty() || head == Some(project_commit);
                match nonce {
                    // Older hubs' keys name no build: any could be tested.
                    None => at_head,
                    Some(build) => {
                        self.taking_in.contains(build)
                            || (at_head
                                && self.good.get(&(upstream.clone(), platform.clone()))
                                    == Some(build))
                    }
                }
            }
            JobKey::Rerun {
                kind: RerunKind::Calibrate,
                job,
                ..
            } => !matches!(self.dispatch.get(*job), Ok(None)),
            JobKey::Rerun { job, .. } => self.taking_in.contains(job),
            JobKey::Bisect { of, .. } => match of.as_ref() {
                JobKey::Build {
                    upstream, platform, ..
                }
                | JobKey::Test {
                    upstream, platform, ..
                } => self
                    .bisecting
                    .contains(&(upstream.clone(), platform.clone())),
                _ => true,
            },
        }
    }
}

impl Pipeline {
    /// What the pipeline could still submit now (see [`LiveKeys`]), with
    /// `kept` (its held verdicts and running bisections) read by results.
    pub(crate) fn live_keys(&self, kept: &Kept) -> Result<LiveKeys, StoreError> {
        let mut upstream_heads = HashMap::new();
        let mut good = HashMap::new();
        for u in &self.inner.upstreams {
            if let Some(h) = self.head(Repo::Upstream, &u.name)? {
                upstream_heads.insert(u.name.clone(), h.commit);
            }
            for platform in &u.platforms {
                if let Some(b) = self.inner.results.good_build(&u.name, platform)? {
                    good.insert((u.name.clone(), platform.clone()), b.job_id);
                }
            }
        }
        let mut project_heads = HashMap::new();
        for p in &self.inner.projects {
            if let Some(h) = self.head(Repo::Project, &p.name)? {
                project_heads.insert(p.name.clone(), h.commit);
            }
        }
        let mut taking_in: HashSet<u64> = kept.awaiting.clone();
        taking_in.extend(self.inner.dispatch.inbox_ids()?);
        Ok(LiveKeys {
            upstream_heads,
            project_heads,
            good,
            taking_in,
            bisecting: kept.bisecting.clone(),
            dispatch: self.inner.dispatch.clone(),
        })
    }

    /// The builds the dashboard's columns show: each upstream's newest
    /// `n` heads on each of its platforms, as (upstream, platform, commit).
    pub(crate) fn shown_builds(
        &self,
        n: usize,
    ) -> Result<Vec<(String, String, String)>, StoreError> {
        let mut out = Vec::new();
        for u in &self.inner.upstreams {
            for head in self.recent_heads(&u.name, n)? {
                for platform in &u.platforms {
                    out.push((u.name.clone(), platform.clone(), head.commit.clone()));
                }
            }
        }
        Ok(out)
    }

    /// Removes the head order of commits long past, at most `max` keys in
    /// one write (durable when this returns): an upstream commit's
    /// `hh/u/…` sequence and `hs/u/…` order entry, a project commit's
    /// `hh/p/…`, when the commit is not the head, not among the newest
    /// `keep` heads (the dashboard's columns), was first the head before
    /// `oldest_job` was given (the first id since `retention.jobs`' cutoff:
    /// head sequences and job ids come from one counter), and no job not yet taken in (open or
    /// in the inbox) names it. A sequence is read only when a build or run
    /// of its commit is taken in, and a commit that is the head again gets
    /// a new one. Returns how many commits' entries it removed.
    pub(crate) async fn prune_heads(
        &self,
        oldest_job: u64,
        keep: usize,
        max: usize,
    ) -> Result<usize, StoreError> {
        let heads = &self.inner.heads;
        // Upstream commits named by jobs not taken in yet.
        let mut pending: HashSet<(String, String)> = HashSet::new();
        let mut keys: Vec<String> = self
            .inner
            .dispatch
            .open_keys("")
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        for id in self.inner.dispatch.inbox_ids()? {
            if let Some(rec) = self.inner.dispatch.get(id)? {
                keys.push(rec.key);
            }
        }
        for k in keys {
            if let Some(key) = JobKey::parse(&k) {
                match key.base() {
                    JobKey::Build {
                        upstream, commit, ..
                    } => {
                        pending.insert((upstream.clone(), commit.clone()));
                    }
                    JobKey::Test {
                        upstream,
                        upstream_commit,
                        ..
                    } => {
                        pending.insert((upstream.clone(), upstream_commit.clone()));
                    }
                    _ => {}
                }
            }
        }
        let mut batch = crate::store::Batch::default();
        let mut removed = 0;
        'upstreams: for u in &self.inner.upstreams {
            let head = self.head(Repo::Upstream, &u.name)?.map(|h| h.commit);
            let prefix = order_prefix(&u.name);
            let order: Vec<_> = heads.scan_raw(&prefix).collect::<Result<_, _>>()?;
            let older = order.len().saturating_sub(keep);
            for (k, commit) in &order[..older] {
                if removed >= max {
                    break 'upstreams;
                }
                let seq: u64 = String::from_utf8_lossy(&k[prefix.len()..])
                    .parse()
                    .unwrap_or(u64::MAX);
                if seq >= oldest_job {
                    break;
                }
                let commit = String::from_utf8_lossy(commit).into_owned();
                if head.as_ref() == Some(&commit)
                    || pending.contains(&(u.name.clone(), commit.clone()))
                {
                    continue;
                }
                batch.remove(k);
                batch.remove(seq_key(Repo::Upstream, &u.name, &commit).as_bytes());
                removed += 1;
            }
        }
        for p in &self.inner.projects {
            let head = self.head(Repo::Project, &p.name)?.map(|h| h.commit);
            let prefix = seq_key(Repo::Project, &p.name, "");
            for item in heads.scan_raw(&prefix) {
                if removed >= max {
                    break;
                }
                let (k, v) = item?;
                let seq = v
                    .as_ref()
                    .try_into()
                    .map(u64::from_be_bytes)
                    .unwrap_or(u64::MAX);
                let commit = String::from_utf8_lossy(&k[prefix.len()..]);
                if seq < oldest_job && head.as_deref() != Some(&*commit) {
                    batch.remove(k);
                    removed += 1;
                }
            }
        }
        if removed > 0 {
            heads.apply(batch)?;
            heads.store().commit().await?;
        }
        Ok(removed)
    }
}
