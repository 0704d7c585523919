//! The transitions' secondary indexes (`tc/<upstream>/<commit>/<id>`,
//! `tp/<project>/<id>` and `tu/<upstream>/<id>`, see `keys.rs`): `breakage` and the transitions
//! listing read them instead of every transition. An entry is staged in the
//! same batch as its transition's first write (the fields it is keyed by —
//! upstream, result commit, culprit range, project — never change after),
//! and removed with it by retention. A database from before the indexes
//! gets them built once when it is opened.

use std::collections::BTreeSet;

use super::keys;
use super::records::Transition;
use crate::store::{StoreError, Table};

/// How many transitions one batch of the first build indexes.
const BUILD_BATCH: usize = 1000;

/// Every index key of `t`.
fn entries(t: &Transition) -> Vec<String> {
    let commits: BTreeSet<&str> = std::iter::once(t.upstream_commit.as_str())
        .chain(t.culprits.iter().map(|c| c.sha.as_str()))
        .filter(|c| !c.is_empty())
        .collect();
    let mut out: Vec<String> = commits
        .into_iter()
        .map(|c| keys::transition_at(&t.upstream, c, t.id))
        .collect();
    if !t.project.is_empty() {
        out.push(keys::transition_of(&t.project, t.id));
    }
    if !t.upstream.is_empty() {
        out.push(keys::transition_in(&t.upstream, t.id));
    }
    out
}

/// Adds `t`'s index entries to `batch`.
pub(super) fn stage(batch: &mut sled::Batch, t: &Transition) {
    for k in entries(t) {
        batch.insert(k.as_bytes(), &[] as &[u8]);
    }
}

/// Adds the removal of `t`'s index entries to `batch`.
pub(super) fn unstage(batch: &mut sled::Batch, t: &Transition) {
    for k in entries(t) {
        batch.remove(k.as_bytes());
    }
}

/// Builds the indexes of every stored transition unless they were built
/// (the `tiu` marker; a database with the older `ti` has `tc/` and `tp/`
/// but not `tu/`: writing them again is harmless), then writes the marker
/// (removing `ti`) and flushes: run once, at
/// open, before anything else writes the tree. Idempotent: a start
/// interrupted before the flush builds them again. Returns how many
/// transitions it indexed (`None`: already built).
pub(super) fn build_once(table: &Table) -> Result<Option<usize>, StoreError> {
    if table.contains(keys::INDEXED)? {
        return Ok(None);
    }
    let mut batch = sled::Batch::default();
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
    batch.insert(keys::INDEXED.as_bytes(), &[] as &[u8]);
    batch.remove(keys::INDEXED_BEFORE_UPSTREAMS.as_bytes());
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
