//! Copies the database an older release wrote with sled (schema 1 or 2, in
//! `<data dir>/db`) into fjall (`<data dir>/store`), once, at the first
//! start of a release that uses fjall.
//!
//! Each step is safe to be killed in:
//! 1. Nothing to do when `store` exists (copied before) or `db` holds no
//!    sled database.
//! 2. The first id the copy hands out: one id taken from sled's counter,
//!    opened under the interval it ran with (above every id it gave).
//! 3. Every tree copied into a fresh `store.partial`, in batches, with the
//!    schema version and the id reservation; synced.
//! 4. sled's schema version set to [`SCHEMA_VERSION`] and flushed: an older
//!    trunkfarm now refuses `db` instead of running on it beside this hub.
//! 5. `store.partial` renamed to `store` (atomic) and the data dir synced.
//!
//! Killed before 5, the next start copies again from the start: `db` still
//! holds everything (its schema 3 then means "being copied"). The sled
//! files stay for the operator to delete (logged with their size).

use std::path::Path;
use std::time::Instant;

use super::{
    IDS_RESERVED, MAX_KEY_BYTES, SCHEMA_KEY, SCHEMA_VERSION, StoreError, open_fjall, open_tree,
    trees,
};

/// Where older releases kept their sled database in the data dir.
pub(super) const DIR: &str = "db";

/// How many ids sled handed out between two writes of its counter in
/// schema 2.
const ID_PERSIST_INTERVAL: u64 = 100;

/// sled's default interval, which schema 1 databases ran with: their ids
/// may run up to 2× this above the count on disk.
const OLD_ID_PERSIST_INTERVAL: u64 = 1_000_000;

/// Records copied per atomic batch, at most.
const COPY_BATCH: usize = 10_000;

/// Bytes (keys and values) copied per atomic batch, at most: a batch is
/// held in memory and written as one journal entry, and records run to
/// megabytes (a job's reports).
const COPY_BATCH_BYTES: usize = 32 * 1024 * 1024;

/// sled's own default tree, which trunkfarm never wrote.
const SLED_DEFAULT_TREE: &[u8] = b"__sled__default";

/// Copies the sled database in `from` into a new fjall database in `to`
/// unless `to` exists or `from` holds none; `cache_bytes` sizes both
/// engines' caches.
pub(super) fn import(from: &Path, to: &Path, cache_bytes: u64) -> Result<(), StoreError> {
    if to.exists() || !from.join("conf").exists() {
        return Ok(());
    }
    let started = Instant::now();
    let fail = |reason: String| StoreError::Import {
        path: from.to_path_buf(),
        reason,
    };
    let sled_err = |e: sled::Error| fail(format!("{e}"));
    let fjall_err = |e: fjall::Error| fail(format!("writing {}: {e}", to.display()));
    tracing::info!(
        "copying the hub database an older release wrote ({}) to {}; this happens once",
        from.display(),
        to.display()
    );

    let version = {
        let db = reopen_sled(from, ID_PERSIST_INTERVAL, cache_bytes).map_err(sled_err)?;
        let meta = db.open_tree(trees::META).map_err(sled_err)?;
        let raw = meta.get(SCHEMA_KEY).map_err(sled_err)?;
        match raw.map(|v| <[u8; 4]>::try_from(v.as_ref()).map(u32::from_be_bytes)) {
            // The first releases wrote no version: ids as schema 1.
            None => 1,
            Some(Ok(v)) => v,
            Some(Err(_)) => return Err(fail("meta/schema_version is not a 4-byte version".into())),
        }
    };
    if version > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            path: from.to_path_buf(),
            found: version,
        });
    }
    if version < 2 {
        migrate_ids(from, cache_bytes).map_err(sled_err)?;
        // As schema 2 from here on: sled writes its counter again (below,
        // and at close) under the new interval, and a copy made again
        // after a failure must not open it under the old one.
        let db = reopen_sled(from, ID_PERSIST_INTERVAL, cache_bytes).map_err(sled_err)?;
        db.open_tree(trees::META)
            .and_then(|meta| meta.insert(SCHEMA_KEY, &2u32.to_be_bytes()))
            .map_err(sled_err)?;
        db.flush().map_err(sled_err)?;
    }
    let db = reopen_sled(from, ID_PERSIST_INTERVAL, cache_bytes).map_err(sled_err)?;
    // trunkfarm's ids are sled's plus one; sled's next is above every one
    // it gave, so this one is above every id handed out.
    let first_id = db.generate_id().map_err(sled_err)? + 1;

    let partial = to.with_extension("partial");
    if partial.exists() {
        std::fs::remove_dir_all(&partial)
            .map_err(|e| fail(format!("removing {}: {e}", partial.display())))?;
    }
    let mut copied = 0u64;
    {
        let fj = open_fjall(&partial, cache_bytes).map_err(fjall_err)?;
        for name in db.tree_names() {
            if name.as_ref() == SLED_DEFAULT_TREE {
                continue;
            }
            let name = String::from_utf8(name.to_vec())
                .map_err(|_| fail("a tree's name is not UTF-8".into()))?;
            let tree = db.open_tree(&name).map_err(sled_err)?;
            let keyspace = open_tree(&fj, &name).map_err(fjall_err)?;
            let mut batch = fj.batch();
            let mut bytes = 0;
            for item in tree.iter() {
                let (k, v) = item.map_err(sled_err)?;
                if name == trees::META && (k == SCHEMA_KEY || k == IDS_RESERVED) {
                    continue;
                }
                if k.is_empty() || k.len() > MAX_KEY_BYTES {
                    return Err(fail(format!(
                        "a key of {} bytes in tree {name} cannot be copied (1 to {MAX_KEY_BYTES} bytes)",
                        k.len()
                    )));
                }
                bytes += k.len() + v.len();
                batch.insert(&keyspace, k.as_ref(), v.as_ref());
                copied += 1;
                if batch.len() >= COPY_BATCH || bytes >= COPY_BATCH_BYTES {
                    std::mem::replace(&mut batch, fj.batch())
                        .commit()
                        .map_err(fjall_err)?;
                    bytes = 0;
                }
            }
            batch.commit().map_err(fjall_err)?;
        }
        let meta = open_tree(&fj, trees::META).map_err(fjall_err)?;
        meta.insert(SCHEMA_KEY, SCHEMA_VERSION.to_be_bytes())
            .map_err(fjall_err)?;
        meta.insert(IDS_RESERVED, first_id.to_be_bytes())
            .map_err(fjall_err)?;
        fj.persist(fjall::PersistMode::SyncAll).map_err(fjall_err)?;
    }

    let meta = db.open_tree(trees::META).map_err(sled_err)?;
    meta.insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes())
        .map_err(sled_err)?;
    db.flush().map_err(sled_err)?;
    drop((meta, db));

    std::fs::rename(&partial, to).map_err(|e| {
        fail(format!(
            "renaming {} to {}: {e}",
            partial.display(),
            to.display()
        ))
    })?;
    if let Some(parent) = to.parent() {
        std::fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(|e| fail(format!("syncing {}: {e}", parent.display())))?;
    }
    tracing::info!(
        "copied {copied} records of the hub database in {:.1} s; {} ({} MiB) is no longer used: delete it once this hub runs well (an older trunkfarm refuses it now)",
        started.elapsed().as_secs_f64(),
        from.display(),
        crate::space::dir_size(from) / (1024 * 1024)
    );
    Ok(())
}

/// Opens sled in `dir` with ids persisted every `id_interval` and a page
/// cache of `cache_bytes`.
fn open_sled(dir: &Path, id_interval: u64, cache_bytes: u64) -> sled::Result<sled::Db> {
    sled::Config::new()
        .path(dir)
        .flush_every_ms(None)
        .idgen_persist_interval(id_interval)
        .cache_capacity(cache_bytes)
        .open()
}

/// Schema 1: a database that ran with sled's default id interval may have
/// given ids up to 2 million above its count on disk, more than a start
/// with [`ID_PERSIST_INTERVAL`] skips. Opened once more with the old
/// interval, one id (above every id given) is taken and written durably;
/// opened again with the new interval, sled starts above it.
fn migrate_ids(dir: &Path, cache_bytes: u64) -> sled::Result<()> {
    let old = reopen_sled(dir, OLD_ID_PERSIST_INTERVAL, cache_bytes)?;
    old.generate_id()?;
    old.flush()?;
    Ok(())
}

/// [`open_sled`] right after this process dropped its handle: sled's
/// background I/O may hold the database's lock for a moment longer.
fn reopen_sled(dir: &Path, id_interval: u64, cache_bytes: u64) -> sled::Result<sled::Db> {
    let mut tries = 0;
    loop {
        match open_sled(dir, id_interval, cache_bytes) {
            Err(e) if tries < 100 => {
                tracing::debug!("reopening the older hub database: {e}");
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            done => return done,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{DIR as STORE_DIR, Store};

    const CACHE: u64 = 1024 * 1024;

    /// Writes a sled database as an older release did: schema `version`
    /// with ids persisted every `interval`, records in two trees, ids handed
    /// out across a restart. Returns every record and the last id given.
    fn older_release(dir: &Path, version: u32, interval: u64) -> (Vec<(String, Vec<u8>)>, u64) {
        let mut last = 0;
        let mut records = Vec::new();
        for start in 0..2 {
            let db = reopen_sled(dir, interval, CACHE).unwrap();
            db.open_tree(trees::META)
                .unwrap()
                .insert(SCHEMA_KEY, &version.to_be_bytes())
                .unwrap();
            for n in 0..300u32 {
                let (tree, key) = if n % 2 == 0 {
                    (trees::JOBS, format!("j{start}-{n:05}"))
                } else {
                    (trees::RESULTS, format!("r/{start}/{n:05}"))
                };
                let value = format!("{{\"n\":{n}}}").into_bytes();
                db.open_tree(tree)
                    .unwrap()
                    .insert(key.as_bytes(), value.clone())
                    .unwrap();
                records.push((format!("{tree}/{key}"), value));
            }
            for _ in 0..1000 {
                // trunkfarm's ids are sled's plus one.
                last = db.generate_id().unwrap() + 1;
            }
            db.flush().unwrap();
        }
        records.sort();
        (records, last)
    }

    fn stored(store: &Store) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        for tree in [trees::JOBS, trees::RESULTS] {
            for item in store.table(tree).scan_raw("") {
                let (k, v) = item.unwrap();
                out.push((
                    format!("{tree}/{}", String::from_utf8_lossy(&k)),
                    v.to_vec(),
                ));
            }
        }
        out.sort();
        out
    }

    fn sled_version(dir: &Path) -> u32 {
        let db = reopen_sled(dir, ID_PERSIST_INTERVAL, CACHE).unwrap();
        let raw = db.open_tree(trees::META).unwrap().get(SCHEMA_KEY).unwrap();
        u32::from_be_bytes(raw.unwrap().as_ref().try_into().unwrap())
    }

    #[tokio::test]
    async fn an_older_releases_database_is_copied_once_whole_and_gives_no_id_again() {
        for (version, interval) in [(1, OLD_ID_PERSIST_INTERVAL), (2, ID_PERSIST_INTERVAL)] {
            let data = tempfile::tempdir().unwrap();
            let old = data.path().join(DIR);
            let (records, last_id) = older_release(&old, version, interval);
            let store = Store::open_data_dir(data.path(), CACHE).unwrap();
            assert_eq!(stored(&store), records, "schema {version}");
            let id = store.next_id().unwrap();
            assert!(id > last_id, "schema {version}: {id} ≤ {last_id}");
            assert!(!data.path().join("store.partial").exists());
            // A change after the copy is not overwritten by a second copy.
            store
                .table(trees::JOBS)
                .put_raw("j0-00000", b"new")
                .unwrap();
            store.commit().await.unwrap();
            drop(store);
            let store = crate::store::tests::reopen_data_dir(data.path()).await;
            let again = store.table(trees::JOBS).get_raw("j0-00000").unwrap();
            assert_eq!(again.as_deref(), Some(&b"new"[..]));
            assert!(store.next_id().unwrap() > id);
            // An older trunkfarm now refuses the sled files (its newest
            // schema was 2) instead of running on them beside this hub.
            assert_eq!(sled_version(&old), SCHEMA_VERSION);
        }
    }

    #[tokio::test]
    async fn a_copy_killed_half_way_is_made_again_from_the_start() {
        let data = tempfile::tempdir().unwrap();
        let old = data.path().join(DIR);
        let (records, last_id) = older_release(&old, 2, ID_PERSIST_INTERVAL);
        // Killed after step 4: a partial copy and the sled files marked.
        let partial = data.path().join(STORE_DIR).with_extension("partial");
        std::fs::create_dir_all(&partial).unwrap();
        std::fs::write(partial.join("half-written"), b"x").unwrap();
        {
            let db = reopen_sled(&old, ID_PERSIST_INTERVAL, CACHE).unwrap();
            db.open_tree(trees::META)
                .unwrap()
                .insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes())
                .unwrap();
            db.flush().unwrap();
        }
        let store = Store::open_data_dir(data.path(), CACHE).unwrap();
        assert_eq!(stored(&store), records);
        assert!(store.next_id().unwrap() > last_id);
        assert!(!partial.exists());
    }

    /// A schema 1 copy that failed after sled's ids moved (here: a file
    /// where the partial copy goes) is made again at the next start, with
    /// ids above every one given, instead of sled refusing its own
    /// counter.
    #[tokio::test]
    async fn a_schema_1_copy_that_failed_is_made_again() {
        let data = tempfile::tempdir().unwrap();
        let old = data.path().join(DIR);
        let (records, last_id) = older_release(&old, 1, OLD_ID_PERSIST_INTERVAL);
        let partial = data.path().join(STORE_DIR).with_extension("partial");
        std::fs::write(&partial, b"in the way").unwrap();
        let err = Store::open_data_dir(data.path(), CACHE)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("copying the older release's database failed"),
            "{err}"
        );
        std::fs::remove_file(&partial).unwrap();
        let store = Store::open_data_dir(data.path(), CACHE).unwrap();
        assert_eq!(stored(&store), records);
        assert!(store.next_id().unwrap() > last_id);
    }

    #[tokio::test]
    async fn a_database_of_a_newer_release_is_not_copied() {
        let data = tempfile::tempdir().unwrap();
        let old = data.path().join(DIR);
        older_release(&old, SCHEMA_VERSION + 1, ID_PERSIST_INTERVAL);
        let err = Store::open_data_dir(data.path(), CACHE)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("run a newer trunkfarm"), "{err}");
        assert!(!data.path().join(STORE_DIR).exists());
    }
}
