//! The transitions' secondary indexes (`tb/<upstream>/<commit>/<id>`,
//! `tp/<project>/<id>` and `tu/<upstream>/<id>`, see `keys.rs`): `breakage` and the transitions
//! listing read them instead of every transition. An entry is staged in the
//! same batch as its transition's first write (the fields it is keyed by —
//! upstream, result commit, culprit range, project, and whether it may
//! blame a commit at all — are decided before that write and never change
//! after), and removed with it by retention. A database from before the
//! indexes gets them built once when it is opened; so does one an older
//! hub wrote to since (it leaves its own marker behind).

use std::collections::BTreeSet;

use trunkfarm_proto::v1::TransitionKind;

use super::keys;
use super::records::{Class, Transition};
use crate::store::{StoreError, Table};

/// How many transitions one batch of the first build indexes.
const BUILD_BATCH: usize = 1000;

/// Whether `t` may blame an upstream commit (what `breakage` lists): a
/// went red, or a suspicious green. Only these are in the commit index: a
/// steady series records a still-green transition for every run.
pub(super) fn may_blame(t: &Transition) -> bool {
    t.kind == TransitionKind::WentRed as i32 || t.class == Some(Class::Suspicious)
}

/// Every index key of `t`.
fn entries(t: &Transition) -> Vec<String> {
    let mut out = Vec::new();
    if may_blame(t) {
        let commits: BTreeSet<&str> = std::iter::once(t.upstream_commit.as_str())
            .chain(t.culprits.iter().map(|c| c.sha.as_str()))
            .filter(|c| !c.is_empty())
            .collect();
        out.extend(
            commits
                .into_iter()
                .map(|c| keys::blamable(&t.upstream, c, t.id)),
        );
    }
    if !t.project.is_empty() {
        out.push(keys::transition_of(&t.project, t.id));
    }
    if !t.upstream.is_empty() {
        out.push(keys::transition_in(&t.upstream, t.id));
    }
    out
}

/// Adds `t`'s index entries to `batch`.
pub(super) fn stage(batch: &mut crate::store::Batch, t: &Transition) {
    for k in entries(t) {
        batch.insert(k.as_bytes(), &[] as &[u8]);
    }
}

/// Adds the removal of `t`'s index entries to `batch`.
pub(super) fn unstage(batch: &mut crate::store::Batch, t: &Transition) {
    for k in entries(t) {
        batch.remove(k.as_bytes());
    }
}

/// Builds the indexes of every stored transition unless they were built
/// (the `tib` marker, and no older one: an older hub that ran on the
/// database since leaves its own; a database with an older marker has `tp/` and maybe
/// `tu/`, writing them again is harmless, and the older commit index `tc/`
/// of every transition, which goes), then writes the marker (removing the
/// older ones) and flushes: run once, at open, before anything else writes
/// the tree. Idempotent: a start interrupted before the flush builds them
/// again. Returns how many transitions it indexed (`None`: already built).
pub(super) fn build_once(table: &Table) -> Result<Option<usize>, StoreError> {
    // An older hub's marker beside ours: that hub ran on this database
    // since (it knows nothing of `tb/`), and what it recorded is indexed
    // only in its `tc/`.
    let mut older = false;
    for marker in keys::INDEXED_BEFORE {
        older |= table.contains(marker)?;
    }
    if table.contains(keys::INDEXED)? && !older {
        return Ok(None);
    }
    let mut batch = crate::store::Batch::default();
    let mut in_batch = 0;
    let mut total = 0;
    for item in table.scan::<Transition>(keys::TRANSITIONS) {
        let (_, t) = item?;
        stage(&mut batch, &t);
        in_batch += 1;
        total += 1;
        if in_batch == BUILD_BATCH {
            table.apply(std::mem::take(&mut batch))?;
            in_batch = 0;
        }
    }
    for k in table.keys(keys::COMMIT_INDEX_BEFORE_BLAMABLE) {
        batch.remove(k?);
        in_batch += 1;
        if in_batch == BUILD_BATCH {
            table.apply(std::mem::take(&mut batch))?;
            in_batch = 0;
        }
    }
    batch.insert(keys::INDEXED.as_bytes(), &[] as &[u8]);
    for old in keys::INDEXED_BEFORE {
        batch.remove(old.as_bytes());
    }
    table.apply(batch)?;
    table.store().flush_now()?;
    Ok(Some(total))
}

/// The ids under an index prefix, newest first.
pub(super) fn ids(
    table: &Table,
    prefix: String,
) -> impl Iterator<Item = Result<u64, StoreError>> + '_ {
    table.keys(prefix).rev().filter_map(move |k| match k {
        Err(e) => Some(Err(e)),
        Ok(k) => keys::id_at_end(&k).map(Ok),
    })
}
