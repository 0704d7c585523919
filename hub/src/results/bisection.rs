//! Bisections' records: keys `x/<upstream>/<platform>/<last good>/<bad>` of
//! the `results` tree (`keys::bisection`), one per (upstream, platform, culprit range), shared
//! by every went-red transition of that range (its *members*). Kept in this
//! tree so that a member joins in the same atomic write as its transition,
//! and a member's answer lands on its transition (and the notifier's
//! follow-up, [`TransitionSink::stage_bisected`]) in one write too.
//!
//! A record holds what the search needs to be derived again at any moment
//! (`pipeline::bisect` does the deriving): the range, which build each
//! commit tried uses (the bisection's own or one stored before), and what
//! each member's runs said per commit, keyed by the run's job so a job taken
//! in twice counts once.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use trunkfarm_proto::v1::TransitionKind;

use super::keys;
use super::records::{Bisect, BisectState, Class, Commit, Transition};
use super::{Results, TransitionSink};
use crate::store::{StoreError, Table, now_ms};

/// One bisection of a culprit range.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct Bisection {
    /// The upstream bisected.
    pub(crate) upstream: String,
    /// The platform its builds and runs are on.
    pub(crate) platform: String,
    /// The last green commit: the range starts after it.
    pub(crate) good: String,
    /// The range, oldest first; the last is the commit the members went red at.
    pub(crate) commits: Vec<Commit>,
    /// The build each commit tried uses, by commit hash.
    pub(crate) builds: BTreeMap<String, PointBuild>,
    /// The went-red transitions it answers.
    pub(crate) members: Vec<Member>,
    /// When the first member joined, ms.
    pub(crate) started_at_ms: u64,
}

/// The build of one commit a bisection tries.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct PointBuild {
    /// The build job: the bisection's own, or one stored before.
    pub(crate) job_id: u64,
    /// Made by the bisection (counted against `pipeline.bisect_max_builds`);
    /// false: a stored build reused.
    pub(crate) made: bool,
}

/// A went-red transition a bisection answers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct Member {
    /// The transition.
    pub(crate) transition: u64,
    /// Its project (runs are of this project only).
    pub(crate) project: String,
    /// The project commit it went red with: every run uses it (empty: the
    /// branch, as the went-red run did).
    pub(crate) project_commit: String,
    /// The transition's class (a suspicious one is judged by its tests
    /// executed, not its status alone).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) class: Option<Class>,
    /// What its runs said, by upstream commit, in the order taken in.
    pub(crate) said: BTreeMap<String, Vec<PointRun>>,
    /// Its transition shows the answer.
    pub(crate) ended: bool,
}

/// What one run of a member against a commit's build said.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct PointRun {
    /// The run's job (a job taken in twice counts once).
    pub(crate) job: u64,
    /// A `v1::RunStatus` number.
    pub(crate) status: i32,
    /// Tests its JUnit reports show executed (not skipped).
    pub(crate) executed: u32,
}

impl Bisection {
    /// Its key.
    pub(crate) fn key(&self) -> String {
        let bad = self.commits.last().map_or("", |c| c.sha.as_str());
        keys::bisection(&self.upstream, &self.platform, &self.good, bad)
    }

    /// Whether a member still waits for its answer.
    pub(crate) fn running(&self) -> bool {
        self.members.iter().any(|m| !m.ended)
    }

    /// Builds it made itself (builds reused are not counted).
    pub(crate) fn made(&self) -> u32 {
        self.builds.values().filter(|b| b.made).count() as u32
    }

    /// The member answering transition `id`.
    pub(crate) fn member_mut(&mut self, id: u64) -> Option<&mut Member> {
        self.members.iter_mut().find(|m| m.transition == id)
    }
}

/// Whether `t` (just classified, its culprits listed) is bisected: a went-red
/// run whose class is regressed or unclassed, or a suspicious green, and whose culprit
/// range was listed whole and holds more than one commit.
fn bisected(t: &Transition) -> bool {
    let went_red = t.kind == TransitionKind::WentRed as i32
        && matches!(t.class, None | Some(Class::Regressed));
    // A suspicious green is a still_green transition of that class.
    (went_red || t.class == Some(Class::Suspicious))
        && !t.project.is_empty()
        && t.culprits.len() > 1
        && t.culprits_error.is_empty()
        && !t.last_green_upstream_commit.is_empty()
        && t.culprits
            .last()
            .is_some_and(|c| c.sha == t.upstream_commit)
}

/// Stages `t` joining the bisection of its range (made if it is the first),
/// and marks it running, when it is bisected; call before staging `t`,
/// holding the results' write lock.
pub(super) fn join(
    table: &Table,
    batch: &mut crate::store::Batch,
    t: &mut Transition,
) -> Result<(), StoreError> {
    if !bisected(t) {
        return Ok(());
    }
    let k = keys::bisection(
        &t.upstream,
        &t.platform,
        &t.last_green_upstream_commit,
        &t.upstream_commit,
    );
    let mut b: Bisection = table.get(&k)?.unwrap_or_else(|| Bisection {
        upstream: t.upstream.clone(),
        platform: t.platform.clone(),
        good: t.last_green_upstream_commit.clone(),
        commits: t.culprits.clone(),
        started_at_ms: now_ms(),
        ..Default::default()
    });
    if b.member_mut(t.id).is_none() {
        b.members.push(Member {
            transition: t.id,
            project: t.project.clone(),
            project_commit: t.project_commit.clone(),
            class: t.class,
            ..Default::default()
        });
    }
    table.stage(batch, &k, &b)?;
    t.bisect = Some(Bisect {
        state: BisectState::Running,
        ..Default::default()
    });
    Ok(())
}

impl Results {
    /// One bisection.
    pub(crate) fn bisection(&self, key: &str) -> Result<Option<Bisection>, StoreError> {
        self.table.get(key)
    }

    /// Every bisection with a member still waiting for its answer.
    pub(crate) fn running_bisections(&self) -> Result<Vec<Bisection>, StoreError> {
        let mut out = Vec::new();
        for item in self.table.scan::<Bisection>(keys::BISECTIONS) {
            let (_, b) = item?;
            if b.running() {
                out.push(b);
            }
        }
        Ok(out)
    }

    /// Changes bisection `key` as `change` says (read, changed and written
    /// under the write lock; `change` returns whether it changed anything).
    /// Durable when this returns.
    pub(crate) async fn update_bisection(
        &self,
        key: &str,
        change: impl FnOnce(&mut Bisection) -> bool,
    ) -> Result<(), StoreError> {
        {
            let _w = self.write_lock();
            let Some(mut b) = self.bisection(key)? else {
                return Ok(());
            };
            if !change(&mut b) {
                return Ok(());
            }
            self.table.put(key, &b)?;
        }
        self.committed().await
    }

    /// A member's answer: its transition shows `answer`, the member is
    /// ended, and `sink` stages what that causes (the mail's release or
    /// follow-up), in one atomic write. A member ended before is left alone.
    pub(crate) async fn end_bisection(
        &self,
        key: &str,
        transition: u64,
        answer: Bisect,
        sink: &dyn TransitionSink,
    ) -> Result<Option<Transition>, StoreError> {
        let t = {
            let _w = self.write_lock();
            let Some(mut b) = self.bisection(key)? else {
                return Ok(None);
            };
            let Some(m) = b.member_mut(transition).filter(|m| !m.ended) else {
                return Ok(None);
            };
            m.ended = true;
            let Some(mut t) = self.transition(transition)? else {
                return Ok(None);
            };
            t.bisect = Some(answer);
            let mut batch = crate::store::Batch::default();
            self.table.stage(&mut batch, key, &b)?;
            self.table.stage(&mut batch, keys::transition(t.id), &t)?;
            let mut theirs = crate::store::Batch::default();
            sink.stage_bisected(&t, &mut theirs)?;
            self.table.apply_with(batch, sink.table(), theirs)?;
            t
        };
        self.committed().await?;
        Ok(Some(t))
    }

    /// Artifacts of running bisections' builds (garbage collection keeps
    /// them: members may still run against them).
    pub(super) fn bisection_artifacts(&self) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        for b in self.running_bisections()? {
            for commit in b.builds.keys() {
                if let Some(build) = self.build(&b.upstream, &b.platform, commit)?
                    && !build.artifact_sha256.is_empty()
                {
                    out.push(build.artifact_sha256);
                }
            }
        }
        Ok(out)
    }
}
