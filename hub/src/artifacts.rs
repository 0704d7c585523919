//! The content-addressed artifact store: the packed runtimes (tar + zstd)
//! that build jobs upload and test jobs download, named by their SHA-256.
//!
//! ```text
//! <dir>/<sha256>.tar.zst      one verified artifact (lowercase hex name)
//! <dir>/tmp/                  uploads in progress (emptied at open)
//! <dir>/quarantine/           files found not to match their name
//! tree `artifacts`            <sha256> → ArtifactRecord (JSON)
//! ```
//!
//! With `[storage] backend = "s3"` ([`Backend::Objects`]) the bytes live in
//! the object store instead, as `artifacts/<sha256>.tar.zst` and
//! `quarantine/<sha256>.<ms>.tar.zst` under the hub's prefix; uploads are
//! still received into `<dir>/tmp/`, and records stay in the database. A download
//! that accepts one is answered with a presigned URL: the agent fetches the
//! bytes from the store and the hub sends none.
//!
//! Rules this module keeps (for both backends; [`Backend`] is the only
//! place they differ):
//! - A copy is put in place only after its bytes were counted and hashed
//!   against what the uploader announced; it is written to `tmp/`, synced,
//!   then renamed (atomic) with the directory synced, or put into the object
//!   store (atomic: a put or a completed multipart upload appears whole or
//!   not at all), and only then recorded. The upload is answered after the
//!   record is durable ([`Store::commit`]).
//! - Copies never change once in place: a second upload of the same hash is
//!   discarded (`already_present`), so concurrent uploads cannot corrupt one.
//! - A record exists only for a copy that exists: the open reconciles both
//!   sides (a copy without a record, e.g. an object put before a crash, is
//!   deleted), garbage collection removes the record (durably) before the
//!   copy, and a download that finds a corrupt copy quarantines it and
//!   removes its record so a rebuild can store it again.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use object_store::ObjectStoreExt as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;
use trunkfarm_proto::v1::{
    AgentDownloads, ArtifactChunk, ArtifactInfo, ArtifactMeta, DownloadArtifactRequest, JobRef,
};

use crate::objects::{Objects, ObjectsError};
use crate::space::{DataDir, SpaceError};
use crate::store::{Store, StoreError, Table, now_ms, trees};

/// Bytes of file data per download chunk: far below any sane
/// `limits.max_message_size` (default 4 MiB), large enough to keep
/// per-message overhead negligible.
pub(crate) const DOWNLOAD_CHUNK_BYTES: usize = 256 * 1024;

/// Download chunks buffered per transfer before reading waits for the
/// network (bounds the memory one slow agent can pin to 1 MiB).
const DOWNLOAD_CHUNKS_IN_FLIGHT: usize = 4;

/// The name every artifact file ends with.
const FILE_SUFFIX: &str = ".tar.zst";

/// How many bytes an upload writes between two checks of the reserve.
const RECHECK_BYTES: u64 = 8 * 1024 * 1024;

/// Subdirectory for uploads in progress.
const TMP_DIR: &str = "tmp";

/// Subdirectory for files that did not match their hash; also the object
/// store's folder for quarantined objects.
const QUARANTINE_DIR: &str = "quarantine";

/// The object store's folder for artifacts (under the hub's prefix).
const OBJECTS_DIR: &str = "artifacts";

/// The marker object under the store's prefix naming the database whose
/// artifacts are there: a mistyped `storage.prefix`/`bucket`/`endpoint`
/// finds no marker (or another hub's) and is refused instead of reading as
/// "every object vanished" and forgetting every record.
const MARKER: &str = ".trunkfarm-hub";

/// The `meta` tree key of this database's random identity (what the marker
/// holds).
const DATABASE_ID_KEY: &str = "database_id";

/// Parts of a multipart upload to the object store are this large (S3's
/// minimum is 5 MiB; larger parts mean fewer requests). Uploads up to this
/// size are one put. The in-process tests (a local store, which has no
/// minimum) use small parts so that their uploads take the multipart path.
const OBJECT_PART_BYTES: usize = if cfg!(test) {
    100 * 1024
} else {
    16 * 1024 * 1024
};

/// Why an artifact operation failed. Messages say what is wrong and, where
/// someone can act, what to do; `grpc/mod.rs` maps each to a status code.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ArtifactError {
    /// The data dir has no room for it.
    #[error(transparent)]
    NoRoom(#[from] SpaceError),
    /// The file system refused (disk full, permissions, read-only...).
    #[error("artifact store: cannot {action} {path}: {source} (is the disk full or read-only?)")]
    Io {
        /// What the hub was doing, e.g. "write".
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The object store failed (unreachable, access denied, ...).
    #[error(transparent)]
    Objects(#[from] ObjectsError),
    /// A hash that is not 64 hex characters.
    #[error("{0:?} is not a SHA-256: expected 64 hexadecimal characters")]
    BadSha(String),
    /// The first upload chunk had no `meta`.
    #[error(
        "the first chunk of an artifact upload must carry ArtifactMeta (sha256, size, job); upgrade trunkfarm-agent"
    )]
    NoMeta,
    /// A later upload chunk had `meta` again.
    #[error("only the first chunk of an artifact upload may carry ArtifactMeta")]
    MetaRepeated,
    /// The upload's `meta` named no job.
    #[error(
        "the upload's ArtifactMeta must name the job (JobRef) that built the artifact; upgrade trunkfarm-agent"
    )]
    NoJob,
    /// Larger than `artifacts.max_size`.
    #[error(
        "artifact {sha256} is {size} bytes, more than this hub accepts (artifacts.max_size = {max_size} bytes): make the runtime smaller or ask the hub's operator to raise artifacts.max_size"
    )]
    TooLarge {
        /// The announced hash.
        sha256: String,
        /// The announced size.
        size: u64,
        /// The limit.
        max_size: u64,
    },
    /// The uploader does not hold the job it names.
    #[error(
        "agent {agent_id} does not hold job {job_id} (attempt {attempt}): only the agent running a build may upload its artifact; the lease may have been lost, in which case the job runs again"
    )]
    NotHeld {
        /// The uploader.
        agent_id: String,
        /// The job it named.
        job_id: u64,
        /// The attempt it named.
        attempt: u32,
    },
    /// More bytes arrived than announced.
    #[error("artifact {sha256}: the upload sent more than the announced {announced} bytes")]
    TooLong {
        /// The announced hash.
        sha256: String,
        /// The announced size.
        announced: u64,
    },
    /// The stream ended before the announced size.
    #[error(
        "artifact {sha256}: the upload ended after {received} of the announced {announced} bytes"
    )]
    TooShort {
        /// The announced hash.
        sha256: String,
        /// The announced size.
        announced: u64,
        /// Bytes that arrived.
        received: u64,
    },
    /// The bytes do not hash to the announced SHA-256.
    #[error("hash mismatch: announced {announced}, received {received}")]
    HashMismatch {
        /// The announced hash.
        announced: String,
        /// The hash of what arrived.
        received: String,
    },
    /// The uploader's stream failed (it disconnected or cancelled).
    #[error("the upload stream broke: {}", .0.message())]
    Stream(Status),
    /// No such artifact.
    #[error("no artifact {0} on this hub (it may have been garbage-collected)")]
    NotFound(String),
    /// The stored file does not match its name; it was quarantined.
    #[error("artifact {0} on the hub is corrupt (hash mismatch); it has been quarantined")]
    Corrupt(String),
    /// The object store's prefix is not this database's (a mistyped
    /// `storage.*` key, or another hub's objects): refused at start, before
    /// anything is deleted.
    #[error("{0}")]
    NotOurs(String),
}

impl ArtifactError {
    fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ArtifactError {
        let path = path.to_path_buf();
        move |source| ArtifactError::Io {
            action,
            path,
            source,
        }
    }

    /// A `map_err` for an object store error of `objects`.
    fn object(
        objects: &Objects,
        action: &'static str,
        path: &object_store::path::Path,
    ) -> impl FnOnce(object_store::Error) -> ArtifactError + use<> {
        let error = objects.error(action, path);
        move |source| ArtifactError::Objects(error(source))
    }
}

/// Where the artifacts' bytes are kept (their records are always in the
/// database). Everything that differs between the two is a method of this
/// enum: put in place, open for reading, delete, quarantine, list.
#[derive(Clone)]
pub(crate) enum Backend {
    /// Files `<dir>/<sha256>.tar.zst` in the data dir (`[storage] backend =
    /// "local"`): the layout of every release before the object store.
    Files,
    /// Objects `artifacts/<sha256>.tar.zst` under the store's prefix
    /// (`backend = "s3"`; in tests also a local [`Objects`]).
    Objects(Objects),
}

impl Backend {
    /// The backend for `[storage]`: the object store when it is remote,
    /// else files in the data dir as before (a local object store would only
    /// move the same bytes to another folder of the same disk).
    pub(crate) fn for_storage(objects: &Objects) -> Backend {
        if objects.is_remote() {
            Backend::Objects(objects.clone())
        } else {
            Backend::Files
        }
    }
}

/// Which copy of an artifact was read: quarantine takes out exactly that
/// one (a good copy that replaced it meanwhile stays).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Version {
    /// A file's device and inode.
    File(u64, u64),
    /// An object's entity tag and size.
    Object(Option<String>, u64),
}

/// A stored copy opened for reading.
struct Opened {
    reader: Reader,
    size: u64,
    version: Version,
    /// What identifies this version for the `verified` cache (`None`: an
    /// object without an entity tag, never trusted).
    proof: Option<Proof>,
}

/// An object's body as object_store yields it.
type ObjectBody = std::pin::Pin<Box<dyn Stream<Item = object_store::Result<bytes::Bytes>> + Send>>;

/// The bytes of a stored copy, read in chunks.
enum Reader {
    /// A file and its path.
    File(tokio::fs::File, PathBuf),
    /// An object's body, what arrived of it beyond the last chunk, its path.
    Object {
        stream: ObjectBody,
        pending: Vec<u8>,
        path: object_store::path::Path,
        objects: Objects,
    },
}

impl Reader {
    /// Up to `max` next bytes (fewer only at the end; empty at the end).
    async fn next_chunk(&mut self, max: usize) -> Result<Vec<u8>, ArtifactError> {
        match self {
            Reader::File(file, path) => {
                let mut buf = vec![0u8; max];
                let n = read_full(file, &mut buf)
                    .await
                    .map_err(ArtifactError::io("read", path))?;
                buf.truncate(n);
                Ok(buf)
            }
            Reader::Object {
                stream,
                pending,
                path,
                objects,
            } => {
                while pending.len() < max {
                    match stream.next().await {
                        None => break,
                        Some(Ok(bytes)) => pending.extend_from_slice(&bytes),
                        Some(Err(e)) => {
                            return Err(ArtifactError::object(objects, "read", path)(e));
                        }
                    }
                }
                let rest = pending.split_off(max.min(pending.len()));
                Ok(std::mem::replace(pending, rest))
            }
        }
    }
}

/// One stored artifact, as kept in the `artifacts` tree (JSON; added fields
/// need a default so older records stay readable).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct ArtifactRecord {
    /// Lowercase hex SHA-256 of the file; also its name and key.
    pub(crate) sha256: String,
    /// Bytes.
    pub(crate) size: u64,
    /// The upstream it is a build of; empty for an ad-hoc upload.
    pub(crate) upstream: String,
    /// The upstream commit built; empty for an ad-hoc upload.
    pub(crate) commit: String,
    /// The platform built for; empty for an ad-hoc upload.
    pub(crate) platform: String,
    /// The job that uploaded it.
    pub(crate) build_job_id: u64,
    /// When it was stored (Unix ms); "newest" in garbage collection.
    pub(crate) stored_at_ms: u64,
}

impl ArtifactRecord {
    /// The admin API's view, with `downloads` left empty.
    fn info(self) -> ArtifactInfo {
        ArtifactInfo {
            sha256: self.sha256,
            size: self.size,
            upstream: self.upstream,
            commit: self.commit,
            platform: self.platform,
            build_job_id: self.build_job_id,
            stored_at_ms: self.stored_at_ms,
            downloads: Vec::new(),
        }
    }
}

/// Where an upload comes from, recorded with it so garbage collection can
/// keep the newest builds per (upstream, platform).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Origin {
    /// Empty for an ad-hoc upload.
    pub(crate) upstream: String,
    /// Empty for an ad-hoc upload.
    pub(crate) platform: String,
    /// Empty for an ad-hoc upload.
    pub(crate) commit: String,
    /// The uploading job.
    pub(crate) build_job_id: u64,
}

impl Origin {
    /// The origin of an upload by job `job_id` whose pipeline key is `key`:
    /// `build/<upstream>/<platform>/<commit>` names all three; any other key
    /// (a job submitted by hand has none) leaves them empty.
    pub(crate) fn from_job(job_id: u64, key: &str) -> Origin {
        let (upstream, platform, commit) = parse_build_key(key).unwrap_or_default();
        Origin {
            upstream,
            platform,
            commit,
            build_job_id: job_id,
        }
    }
}

/// The upstream, platform and commit of a build job's key (any form,
/// forced rebuilds included).
fn parse_build_key(key: &str) -> Option<(String, String, String)> {
    // A build's confirmation build uploads the same runtime.
    match crate::job_key::JobKey::parse(key)?.base() {
        crate::job_key::JobKey::Build {
            upstream,
            platform,
            commit,
            ..
        } => Some((upstream.clone(), platform.clone(), commit.clone())),
        _ => None,
    }
}

/// The outcome of a successful upload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Received {
    /// The artifact's hash (lowercase hex).
    pub(crate) sha256: String,
    /// It was stored before; this upload was discarded.
    pub(crate) already_present: bool,
}

/// Checks that `sha` is a hex SHA-256 and returns it in lowercase, the form
/// used for file names and keys.
pub(crate) fn normalize_sha256(sha: &str) -> Result<String, ArtifactError> {
    if sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(sha.to_ascii_lowercase())
    } else {
        Err(ArtifactError::BadSha(sha.chars().take(80).collect()))
    }
}

/// The artifact store: a cheap handle (clone it freely) shared by the agent
/// API (uploads, downloads), the pipeline (gc) and the admin API (list).
#[derive(Clone)]
pub(crate) struct Artifacts {
    inner: Arc<Inner>,
}

struct Inner {
    /// `<sha256>` → [`ArtifactRecord`].
    table: Table,
    /// Files (backend `Files`) and uploads in progress (`tmp/`, both).
    dir: PathBuf,
    /// Where the bytes are kept.
    backend: Backend,
    max_size: u64,
    /// The data dir's reserve: an upload that would cut into it is refused.
    space: DataDir,
    /// Completed downloads since start: sha → agent id → count.
    downloads: Mutex<HashMap<String, HashMap<String, u32>>>,
    /// Copies whose content was hashed whole and matched, by artifact, with
    /// the version then (a file's identity and change time, an object's
    /// entity tag): a download of an unchanged copy is not hashed again (any
    /// write to a file changes its ctime, which no one can set back; a
    /// rewritten object gets a new entity tag), nor is an agent's repeated
    /// report of corrupt URL bytes checked again. Hashing every download
    /// cost a core per GB/s.
    verified: Mutex<HashMap<String, (Proof, std::time::Instant)>>,
    /// (agent, artifact) pairs whose report of corrupt URL bytes was logged
    /// (a warning once, then quietly).
    reports: Mutex<HashSet<(String, String)>>,
    /// Downloads served to the end or handed a URL since start, all
    /// artifacts (`/metrics`).
    downloads_total: AtomicU64,
    /// Artifact bytes the hub itself sent to agents since start (`/metrics`;
    /// not what agents fetched from presigned URLs).
    bytes_sent_total: AtomicU64,
    /// Agents' reports of corrupt bytes at a presigned URL since start
    /// (`/metrics`: a store serving bad bytes, or an agent crying wolf).
    url_reports_total: AtomicU64,
    /// Stored copies the hub read whole to check such a report since start
    /// (`/metrics`: one per object version per [`VERIFIED_FOR`], whatever an
    /// agent repeats, unless reports arrive at the same moment).
    report_checks_total: AtomicU64,
    /// Serializes what changes records together with which copies are in
    /// place (publishing an upload, quarantine, gc), so a record and its
    /// copy always appear and disappear as a pair. Never held across an
    /// object store call: what was learnt over the network without it is
    /// re-checked against [`Publish::generation`] once it is taken again.
    publish: tokio::sync::Mutex<Publish>,
}

/// Counters of downloads since the hub started ([`Artifacts::download_totals`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DownloadTotals {
    /// Downloads served to the end or handed a presigned URL.
    pub downloads: u64,
    /// Artifact bytes the hub itself sent.
    pub sent_bytes: u64,
    /// Reports of corrupt bytes at a presigned URL.
    pub url_reports: u64,
    /// Stored copies read whole to check such a report.
    pub report_checks: u64,
}

/// What the publish lock guards besides the records.
#[derive(Default)]
struct Publish {
    /// Bumped whenever a record is removed or a removed record's copy is
    /// gone: a step that looked at copies without the lock and sees another
    /// generation when it takes the lock again looks again.
    generation: u64,
    /// Artifacts whose records are removed and whose copies are being
    /// deleted or quarantined (after the lock was let go): an upload of
    /// one waits until that is done, so the deletion cannot take its copy.
    retiring: HashSet<String>,
}

/// How long a whole-file hash check vouches for an unchanged file: a burst
/// of downloads (a fan-out) hashes once, and silent corruption on the disk
/// (which changes no timestamp) is still caught within this time.
const VERIFIED_FOR: std::time::Duration = std::time::Duration::from_secs(600);

/// What identifies one version of a file: device, inode, size and change
/// time (seconds, nanoseconds).
type FileStamp = (u64, u64, u64, i64, i64);

/// One version of a copy, as the `verified` cache knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Proof {
    /// A file's [`FileStamp`].
    File(FileStamp),
    /// An object's entity tag and size.
    Object(String, u64),
}

fn stamp_of(meta: &std::fs::Metadata) -> FileStamp {
    (
        meta.dev(),
        meta.ino(),
        meta.len(),
        meta.ctime(),
        meta.ctime_nsec(),
    )
}

/// A temp file that deletes itself unless it was moved into place, so a
/// failed, refused or cancelled upload leaves nothing behind.
struct TempFile {
    path: PathBuf,
    file: tokio::fs::File,
    placed: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.placed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Artifacts {
    /// Opens the store in `dir` (created if missing) with records in `store`
    /// and bytes in `backend`: deletes leftover temp files and reconciles
    /// stored copies with records. Uploads larger than `max_size` bytes are
    /// refused.
    pub(crate) async fn open(
        store: &Store,
        dir: PathBuf,
        max_size: u64,
        space: DataDir,
        backend: Backend,
    ) -> Result<Artifacts, ArtifactError> {
        let mut dirs = vec![dir.clone(), dir.join(TMP_DIR)];
        if matches!(backend, Backend::Files) {
            dirs.push(dir.join(QUARANTINE_DIR));
        }
        for d in dirs {
            std::fs::create_dir_all(&d).map_err(ArtifactError::io("create directory", &d))?;
        }
        let artifacts = Artifacts {
            inner: Arc::new(Inner {
                table: Table::open(store, trees::ARTIFACTS)?,
                dir,
                backend,
                max_size,
                space,
                downloads: Mutex::new(HashMap::new()),
                verified: Mutex::new(HashMap::new()),
                reports: Mutex::new(HashSet::new()),
                downloads_total: AtomicU64::new(0),
                bytes_sent_total: AtomicU64::new(0),
                url_reports_total: AtomicU64::new(0),
                report_checks_total: AtomicU64::new(0),
                publish: tokio::sync::Mutex::new(Publish::default()),
            }),
        };
        artifacts.clear_tmp()?;
        artifacts.reconcile().await?;
        Ok(artifacts)
    }

    /// Where the store keeps its files.
    #[cfg(test)]
    pub(crate) fn dir(&self) -> &Path {
        &self.inner.dir
    }

    fn path_of(&self, sha: &str) -> PathBuf {
        self.inner.dir.join(format!("{sha}{FILE_SUFFIX}"))
    }

    fn tmp_dir(&self) -> PathBuf {
        self.inner.dir.join(TMP_DIR)
    }

    /// Removes whatever uploads in progress a previous run left.
    fn clear_tmp(&self) -> Result<(), ArtifactError> {
        let tmp = self.tmp_dir();
        let entries = std::fs::read_dir(&tmp).map_err(ArtifactError::io("list", &tmp))?;
        let mut removed = 0usize;
        for entry in entries {
            let path = entry.map_err(ArtifactError::io("list", &tmp))?.path();
            let result = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            result.map_err(ArtifactError::io("delete", &path))?;
            removed += 1;
        }
        if removed > 0 {
            tracing::info!(
                removed,
                "deleted unfinished artifact uploads left in {}",
                tmp.display()
            );
        }
        Ok(())
    }

    /// Makes copies and records agree: a record whose copy is missing is
    /// removed, a copy without a record is deleted (an upload interrupted
    /// between putting its copy in place and recording it), a copy whose
    /// size is not its record's is quarantined (its record removed).
    async fn reconcile(&self) -> Result<(), ArtifactError> {
        let mut copies = self.copies().await?;
        self.check_marker(&copies).await?;
        let table = &self.inner.table;
        let (mut kept, mut changed, mut migrated) = (0usize, false, 0usize);
        for item in table.scan_raw("") {
            let (key, value) = item?;
            let key_text = String::from_utf8_lossy(&key).into_owned();
            // An unreadable record is dropped here rather than failing the
            // open: its copy is then unrecorded and deleted below.
            let rec: ArtifactRecord = match table.decode(&key, &value) {
                Ok(rec) => rec,
                Err(e) => {
                    tracing::error!(
                        "{e}; removing the record (its copy, if any, is deleted as unrecorded)"
                    );
                    table.remove(&key)?;
                    changed = true;
                    continue;
                }
            };
            match copies.remove(&key_text) {
                None if self.migrate_file(&key_text, rec.size).await? => {
                    migrated += 1;
                    kept += 1;
                }
                None => {
                    tracing::warn!(
                        "artifact {key_text}: recorded but its copy {} is missing; removing the record (a rebuild stores it again)",
                        self.where_is(&key_text)
                    );
                    table.remove(&key)?;
                    changed = true;
                }
                Some(len) if len != rec.size => {
                    let dest = self.quarantine_copy(&key_text).await?;
                    tracing::error!(
                        "artifact {key_text}: {} is {len} bytes but was stored with {}; moved it to {dest} and removed the record",
                        self.where_is(&key_text),
                        rec.size,
                    );
                    table.remove(&key)?;
                    changed = true;
                }
                Some(_) => {
                    self.remove_migrated_file(&key_text).await?;
                    kept += 1;
                }
            }
        }
        for sha in copies.keys() {
            tracing::warn!(
                "artifact copy {} has no record (an upload interrupted before it was recorded?); deleting it",
                self.where_is(sha)
            );
            self.delete_copy(sha).await?;
        }
        if changed {
            table.store().flush_now()?;
        }
        if migrated > 0 {
            tracing::info!(
                migrated,
                "moved the artifacts stored in {} into {}",
                self.inner.dir.display(),
                self.describe()
            );
        }
        tracing::info!(artifacts = kept, "artifact store open: {}", self.describe());
        Ok(())
    }

    /// Makes sure the object store's prefix is this database's before
    /// [`Artifacts::reconcile`] deletes or forgets anything: the marker
    /// object must name this database. Without a marker (first use, or a
    /// hub from before markers) it is written, unless records exist and
    /// none of them is found there or in the data dir, which is what a
    /// mistyped key looks like. Files backend: nothing to check.
    async fn check_marker(&self, copies: &HashMap<String, u64>) -> Result<(), ArtifactError> {
        let Backend::Objects(objects) = &self.inner.backend else {
            return Ok(());
        };
        let ours = database_id(self.inner.table.store())?;
        let path = objects.path(MARKER);
        let found = match objects.store().get(&path).await {
            Ok(got) => Some(
                got.bytes()
                    .await
                    .map_err(ArtifactError::object(objects, "read", &path))?,
            ),
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => return Err(ArtifactError::object(objects, "read", &path)(e)),
        };
        let keys: Vec<String> = self
            .inner
            .table
            .keys("")
            .map(|k| k.map(|k| String::from_utf8_lossy(&k).into_owned()))
            .collect::<Result<_, _>>()?;
        let fix = "check storage.prefix, storage.bucket and storage.endpoint in the hub's config (a typo there points the hub at the wrong place); if the artifacts were moved, move their objects (with the marker) to where the config points";
        match found {
            Some(body) => {
                let theirs = String::from_utf8_lossy(&body).trim().to_owned();
                if theirs == ours {
                    return Ok(());
                }
                Err(ArtifactError::NotOurs(format!(
                    "refusing to start: the marker {path} in {} names hub database {theirs:?}, but this hub's database is {ours:?}; its objects belong to another hub and nothing was changed. {fix}; to give that place to this hub anyway, delete the marker (its objects that this database does not record are then deleted at the next start)",
                    objects.describe()
                )))
            }
            None => {
                let seen = keys
                    .iter()
                    .any(|k| copies.contains_key(k) || self.path_of(k).exists());
                if !keys.is_empty() && !seen {
                    return Err(ArtifactError::NotOurs(format!(
                        "refusing to start: the database records {} artifacts but {} has no marker {path} and none of their objects; nothing was deleted. {fix}; if this is the right place and the objects are really gone, put an object {path} there holding {ours} (the hub then forgets the missing artifacts and builds them again)",
                        keys.len(),
                        objects.describe()
                    )));
                }
                objects
                    .store()
                    .put(&path, ours.clone().into_bytes().into())
                    .await
                    .map_err(ArtifactError::object(objects, "write", &path))?;
                objects.sync(MARKER).await?;
                tracing::info!(
                    "wrote the marker {path} naming this hub database ({ours}) in {}",
                    objects.describe()
                );
                Ok(())
            }
        }
    }

    /// A recorded artifact with no object but a file `<dir>/<sha>.tar.zst`
    /// (the hub kept its artifacts in the data dir before `[storage]` said
    /// s3): the file is hashed, put into the object store and deleted, and
    /// `true` returned. A file that does not match its record is left where
    /// it is (`false`: the record goes). Files backend: always `false`.
    async fn migrate_file(&self, sha: &str, size: u64) -> Result<bool, ArtifactError> {
        if matches!(self.inner.backend, Backend::Files) {
            return Ok(false);
        }
        let path = self.path_of(sha);
        let file = match tokio::fs::File::open(&path).await {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(ArtifactError::io("open", &path)(e)),
        };
        let mut reader = Reader::File(file, path.clone());
        let (mut hasher, mut len) = (Sha256::new(), 0u64);
        loop {
            let data = reader.next_chunk(DOWNLOAD_CHUNK_BYTES).await?;
            if data.is_empty() {
                break;
            }
            len += data.len() as u64;
            hasher.update(&data);
        }
        let got = hex::encode(hasher.finalize());
        if got != sha || len != size {
            tracing::error!(
                "artifact {sha}: {} hashes to {got} ({len} bytes, {size} recorded); not moving it into the object store (left where it is)",
                path.display()
            );
            return Ok(false);
        }
        self.stage(sha, &path, size).await?;
        tokio::fs::remove_file(&path)
            .await
            .map_err(ArtifactError::io("delete", &path))?;
        tracing::info!(
            "artifact {sha}: moved {} into {}",
            path.display(),
            self.where_is(sha)
        );
        Ok(true)
    }

    /// Object store: deletes the data dir's file of `sha`, recorded and
    /// whose object is in place with its size, if there is one (a hub
    /// killed between moving it into the store and deleting it left it).
    async fn remove_migrated_file(&self, sha: &str) -> Result<(), ArtifactError> {
        if matches!(self.inner.backend, Backend::Files) {
            return Ok(());
        }
        let path = self.path_of(sha);
        match tokio::fs::remove_file(&path).await {
            Ok(()) => {
                tracing::info!(
                    "artifact {sha}: deleted {}, left over from its move into {}",
                    path.display(),
                    self.where_is(sha)
                );
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ArtifactError::io("delete", &path)(e)),
        }
    }

    /// Where the bytes are, for people.
    fn describe(&self) -> String {
        match &self.inner.backend {
            Backend::Files => self.inner.dir.display().to_string(),
            Backend::Objects(objects) => {
                format!("{} in {}", objects.path(OBJECTS_DIR), objects.describe())
            }
        }
    }

    /// Where the copy of `sha` is, for people.
    fn where_is(&self, sha: &str) -> String {
        match &self.inner.backend {
            Backend::Files => self.path_of(sha).display().to_string(),
            Backend::Objects(objects) => format!(
                "object {} in {}",
                objects.path(&object_rel(sha)),
                objects.describe()
            ),
        }
    }

    /// Every stored copy's hash and size. Names that are not
    /// `<sha256>.tar.zst` are left alone (with a warning).
    async fn copies(&self) -> Result<HashMap<String, u64>, ArtifactError> {
        let mut found: Vec<(String, u64, String)> = Vec::new();
        match &self.inner.backend {
            Backend::Files => {
                let dir = &self.inner.dir;
                let entries = std::fs::read_dir(dir).map_err(ArtifactError::io("list", dir))?;
                for entry in entries {
                    let entry = entry.map_err(ArtifactError::io("list", dir))?;
                    let path = entry.path();
                    let meta = entry
                        .metadata()
                        .map_err(ArtifactError::io("inspect", &path))?;
                    if !meta.is_dir() {
                        let name = entry.file_name().to_string_lossy().into_owned();
                        found.push((name, meta.len(), path.display().to_string()));
                    }
                }
            }
            Backend::Objects(objects) => {
                let folder = objects.path(OBJECTS_DIR);
                let mut listing = objects.store().list(Some(&folder));
                while let Some(meta) = listing.next().await {
                    let meta = meta.map_err(ArtifactError::object(objects, "list", &folder))?;
                    // Only direct children are artifacts.
                    let name = match meta
                        .location
                        .prefix_match(&folder)
                        .map(|p| p.collect::<Vec<_>>())
                    {
                        Some(parts) if parts.len() == 1 => parts[0].as_ref().to_owned(),
                        _ => String::new(),
                    };
                    found.push((name, meta.size, format!("object {}", meta.location)));
                }
            }
        }
        let mut copies = HashMap::new();
        for (name, len, shown) in found {
            match name.strip_suffix(FILE_SUFFIX).map(normalize_sha256) {
                Some(Ok(sha)) if name == format!("{sha}{FILE_SUFFIX}") => {
                    copies.insert(sha, len);
                }
                _ => tracing::warn!(
                    "{shown} is not an artifact (expected <sha256>{FILE_SUFFIX}); leaving it alone"
                ),
            }
        }
        Ok(copies)
    }

    /// Opens the copy of `sha` for reading; `None` if there is none.
    async fn open_copy(&self, sha: &str) -> Result<Option<Opened>, ArtifactError> {
        match &self.inner.backend {
            Backend::Files => {
                let path = self.path_of(sha);
                let file = match tokio::fs::File::open(&path).await {
                    Ok(file) => file,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(ArtifactError::io("open", &path)(e)),
                };
                let meta = file
                    .metadata()
                    .await
                    .map_err(ArtifactError::io("inspect", &path))?;
                Ok(Some(Opened {
                    reader: Reader::File(file, path),
                    size: meta.len(),
                    version: Version::File(meta.dev(), meta.ino()),
                    proof: Some(Proof::File(stamp_of(&meta))),
                }))
            }
            Backend::Objects(objects) => {
                let path = objects.path(&object_rel(sha));
                let got = match objects.store().get(&path).await {
                    Ok(got) => got,
                    Err(object_store::Error::NotFound { .. }) => return Ok(None),
                    Err(e) => return Err(ArtifactError::object(objects, "read", &path)(e)),
                };
                let (size, e_tag) = (got.meta.size, got.meta.e_tag.clone());
                let version = Version::Object(e_tag.clone(), size);
                Ok(Some(Opened {
                    reader: Reader::Object {
                        stream: got.into_stream(),
                        pending: Vec::new(),
                        path,
                        objects: objects.clone(),
                    },
                    size,
                    version,
                    proof: e_tag.map(|tag| Proof::Object(tag, size)),
                }))
            }
        }
    }

    /// Which copy of `sha` is in place now; `None` if none is.
    async fn version_of(&self, sha: &str) -> Result<Option<Version>, ArtifactError> {
        match &self.inner.backend {
            Backend::Files => match std::fs::metadata(self.path_of(sha)) {
                Ok(m) => Ok(Some(Version::File(m.dev(), m.ino()))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(ArtifactError::io("inspect", &self.path_of(sha))(e)),
            },
            Backend::Objects(objects) => {
                let path = objects.path(&object_rel(sha));
                match objects.store().head(&path).await {
                    Ok(meta) => Ok(Some(Version::Object(meta.e_tag, meta.size))),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(ArtifactError::object(objects, "inspect", &path)(e)),
                }
            }
        }
    }

    /// The slow part of putting a verified upload in place, done before the
    /// publish lock: the object store's copy is uploaded (the same bytes put
    /// twice by two uploads are the same object, whole either time). Files
    /// are only renamed, in [`Artifacts::place`].
    async fn stage(&self, sha: &str, file: &Path, size: u64) -> Result<(), ArtifactError> {
        let Backend::Objects(objects) = &self.inner.backend else {
            return Ok(());
        };
        let path = objects.path(&object_rel(sha));
        let source = file;
        let mut file = tokio::fs::File::open(source)
            .await
            .map_err(ArtifactError::io("open", source))?;
        let store = objects.store();
        if size <= OBJECT_PART_BYTES as u64 {
            let mut data = Vec::with_capacity(size as usize);
            file.read_to_end(&mut data)
                .await
                .map_err(ArtifactError::io("read", source))?;
            store
                .put(&path, data.into())
                .await
                .map_err(ArtifactError::object(objects, "store", &path))?;
            return Ok(());
        }
        // Larger: a multipart upload, which the store shows only once
        // completed (an interrupted one never appears as the object).
        let upload = store
            .put_multipart(&path)
            .await
            .map_err(ArtifactError::object(objects, "start uploading", &path))?;
        let mut writer =
            object_store::WriteMultipart::new_with_chunk_size(upload, OBJECT_PART_BYTES);
        let mut reader = Reader::File(file, source.to_path_buf());
        let sent = async {
            loop {
                let data = reader.next_chunk(OBJECT_PART_BYTES).await?;
                if data.is_empty() {
                    return Ok(());
                }
                writer
                    .wait_for_capacity(2)
                    .await
                    .map_err(ArtifactError::object(objects, "store", &path))?;
                writer.put(data.into());
            }
        }
        .await;
        match sent {
            Ok(()) => {
                writer
                    .finish()
                    .await
                    .map_err(ArtifactError::object(objects, "store", &path))?;
                Ok(())
            }
            Err(e) => {
                if let Err(abort) = writer.abort().await {
                    tracing::warn!(
                        "artifact {sha}: cannot abort the unfinished upload of {path}: {abort}"
                    );
                }
                Err(e)
            }
        }
    }

    /// Puts a verified upload (staged by [`Artifacts::stage`]) in place;
    /// called under the publish lock, so no quarantine or garbage
    /// collection runs between this and the record. An object was put by
    /// the stage already (and no deletion ran since: the caller checked).
    async fn place(&self, sha: &str, temp: &mut TempFile) -> Result<(), ArtifactError> {
        match &self.inner.backend {
            Backend::Files => {
                let path = self.path_of(sha);
                tokio::fs::rename(&temp.path, &path)
                    .await
                    .map_err(ArtifactError::io("store", &path))?;
                temp.placed = true;
                sync_dir(&self.inner.dir).await?;
                // Hashed whole on the way in: the first downloads need not again.
                if let Ok(meta) = tokio::fs::metadata(&path).await {
                    self.vouch(sha, Proof::File(stamp_of(&meta)));
                }
                Ok(())
            }
            Backend::Objects(_) => Ok(()),
        }
    }

    /// Deletes the copy of `sha` (none there is fine).
    async fn delete_copy(&self, sha: &str) -> Result<(), ArtifactError> {
        match &self.inner.backend {
            Backend::Files => {
                let path = self.path_of(sha);
                match tokio::fs::remove_file(&path).await {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(ArtifactError::io("delete", &path)(e)),
                }
            }
            Backend::Objects(objects) => {
                let path = objects.path(&object_rel(sha));
                match objects.store().delete(&path).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(e) => Err(ArtifactError::object(objects, "delete", &path)(e)),
                }
            }
        }
    }

    /// Moves the copy of `sha` to quarantine (kept for a post-mortem, never
    /// served again) and returns where it went.
    async fn quarantine_copy(&self, sha: &str) -> Result<String, ArtifactError> {
        let name = format!("{sha}.{}{FILE_SUFFIX}", now_ms());
        match &self.inner.backend {
            Backend::Files => {
                let from = self.path_of(sha);
                let to = self.inner.dir.join(QUARANTINE_DIR).join(name);
                std::fs::rename(&from, &to).map_err(ArtifactError::io("quarantine", &from))?;
                Ok(to.display().to_string())
            }
            Backend::Objects(objects) => {
                let from = objects.path(&object_rel(sha));
                let to = objects.path(&format!("{QUARANTINE_DIR}/{name}"));
                objects
                    .store()
                    .copy(&from, &to)
                    .await
                    .map_err(ArtifactError::object(objects, "quarantine", &from))?;
                self.delete_copy(sha).await?;
                Ok(format!("object {to}"))
            }
        }
    }

    /// The record of artifact `sha`, if stored.
    pub(crate) fn get(&self, sha: &str) -> Result<Option<ArtifactRecord>, ArtifactError> {
        let sha = normalize_sha256(sha)?;
        Ok(self.inner.table.get(&sha)?)
    }

    /// Whether artifact `sha` is stored (false for a malformed hash).
    pub(crate) fn contains(&self, sha: &str) -> Result<bool, ArtifactError> {
        match normalize_sha256(sha) {
            Ok(sha) => Ok(self.inner.table.contains(&sha)?),
            Err(_) => Ok(false),
        }
    }

    fn records(&self) -> Result<Vec<ArtifactRecord>, ArtifactError> {
        Ok(self
            .inner
            .table
            .scan::<ArtifactRecord>("")
            .map(|item| item.map(|(_, rec)| rec))
            .collect::<Result<Vec<_>, _>>()?)
    }

    /// Every stored artifact, newest first, with its completed downloads per
    /// agent since the hub started (what `ListArtifacts` shows).
    pub(crate) fn list(&self) -> Result<Vec<ArtifactInfo>, ArtifactError> {
        let mut records = self.records()?;
        sort_newest_first(&mut records);
        let downloads = self.lock_downloads();
        Ok(records
            .into_iter()
            .map(|rec| {
                let mut per_agent: Vec<AgentDownloads> = downloads
                    .get(&rec.sha256)
                    .into_iter()
                    .flatten()
                    .map(|(agent_id, count)| AgentDownloads {
                        agent_id: agent_id.clone(),
                        count: *count,
                    })
                    .collect();
                per_agent.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
                ArtifactInfo {
                    downloads: per_agent,
                    ..rec.info()
                }
            })
            .collect())
    }

    /// How many times `agent_id` downloaded all of `sha` since the hub started.
    #[cfg(test)]
    pub(crate) fn download_count(&self, sha: &str, agent_id: &str) -> u32 {
        let sha = sha.to_ascii_lowercase();
        self.lock_downloads()
            .get(&sha)
            .and_then(|m| m.get(agent_id))
            .copied()
            .unwrap_or(0)
    }

    /// What downloads did since the hub started (`/metrics`).
    pub(crate) fn download_totals(&self) -> DownloadTotals {
        let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
        DownloadTotals {
            downloads: load(&self.inner.downloads_total),
            sent_bytes: load(&self.inner.bytes_sent_total),
            url_reports: load(&self.inner.url_reports_total),
            report_checks: load(&self.inner.report_checks_total),
        }
    }

    fn lock_verified(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, (Proof, std::time::Instant)>> {
        self.inner
            .verified
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether version `proof` of `sha` was hashed whole and matched within
    /// [`VERIFIED_FOR`].
    fn is_verified(&self, sha: &str, proof: &Proof) -> bool {
        self.lock_verified()
            .get(sha)
            .is_some_and(|(known, at)| known == proof && at.elapsed() < VERIFIED_FOR)
    }

    /// Version `proof` of `sha` was hashed whole and matched just now.
    fn vouch(&self, sha: &str, proof: Proof) {
        self.lock_verified()
            .insert(sha.to_owned(), (proof, std::time::Instant::now()));
    }

    /// Logs `agent_id`'s report that the URL bytes of `sha` did not match:
    /// a warning the first time, quietly after (an agent may repeat it).
    fn note_report(&self, sha: &str, agent_id: &str) {
        self.inner.url_reports_total.fetch_add(1, Ordering::Relaxed);
        let first = self
            .inner
            .reports
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert((agent_id.to_owned(), sha.to_owned()));
        if first {
            tracing::warn!(
                agent = %agent_id,
                "agent {agent_id} reports that the bytes at the object store URL of artifact {sha} did not match; checking the stored copy (unless this version was checked in the last {}) and streaming it through the hub",
                trunkfarm_proto::settings::fmt_duration(VERIFIED_FOR)
            );
        } else {
            tracing::debug!(agent = %agent_id, sha = %sha, "agent repeats its report of corrupt URL bytes");
        }
    }

    fn lock_downloads(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<String, u32>>> {
        // A panic while counting cannot leave the map inconsistent.
        self.inner
            .downloads
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Receives one upload by `agent_id`. The first chunk's meta is checked
    /// (hash format, `max_size`, then `authorize` with the job it names, which
    /// says whether the agent may upload for it and where the artifact comes
    /// from); the data is streamed into a temp file while counted and hashed,
    /// and put in place and recorded durably only if both match. An artifact
    /// already stored is not written again: the stream is drained and
    /// `already_present` answered.
    pub(crate) async fn receive<S, F>(
        &self,
        agent_id: &str,
        mut chunks: S,
        authorize: F,
    ) -> Result<Received, ArtifactError>
    where
        S: Stream<Item = Result<ArtifactChunk, Status>> + Unpin,
        F: FnOnce(&JobRef) -> Result<Origin, ArtifactError>,
    {
        let first = next_chunk(&mut chunks)
            .await?
            .ok_or(ArtifactError::NoMeta)?;
        let ArtifactMeta {
            sha256, size, job, ..
        } = first.meta.ok_or(ArtifactError::NoMeta)?;
        let sha = normalize_sha256(&sha256)?;
        if size > self.inner.max_size {
            return Err(ArtifactError::TooLarge {
                sha256: sha,
                size,
                max_size: self.inner.max_size,
            });
        }
        let job = job.ok_or(ArtifactError::NoJob)?;
        let origin = authorize(&job)?;

        if self.contains(&sha)? {
            // Nothing is written, but every byte is hashed: an upload proves
            // its job made these bytes, and naming a stored hash is not that.
            drain(&mut chunks, &sha, size, first.data).await?;
            tracing::info!(agent = %agent_id, job = job.job_id, sha = %sha, "artifact already stored; upload discarded");
            return Ok(Received {
                sha256: sha,
                already_present: true,
            });
        }
        // Only bytes not stored yet need room (a known hash is drained
        // above); they stay promised until written, so that concurrent
        // uploads together cannot cut into the reserve.
        let mut promise = self.inner.space.reserve("artifacts", size)?;
        let mut checked = 0u64;

        let mut temp = self.create_temp(&sha).await?;
        let mut hasher = Sha256::new();
        let mut received = 0u64;
        let mut pending = Some(first.data);
        loop {
            let data = match pending.take() {
                Some(data) => data,
                None => match next_chunk(&mut chunks).await? {
                    None => break,
                    Some(chunk) if chunk.meta.is_some() => {
                        return Err(ArtifactError::MetaRepeated);
                    }
                    Some(chunk) => chunk.data,
                },
            };
            received += data.len() as u64;
            if received > size {
                return Err(ArtifactError::TooLong {
                    sha256: sha,
                    announced: size,
                });
            }
            hasher.update(&data);
            temp.file
                .write_all(&data)
                .await
                .map_err(ArtifactError::io("write", &temp.path))?;
            promise.wrote(data.len() as u64);
            if received - checked >= RECHECK_BYTES {
                // Something else may have filled the disk meanwhile.
                checked = received;
                promise.still_fits()?;
            }
        }
        if received != size {
            return Err(ArtifactError::TooShort {
                sha256: sha,
                announced: size,
                received,
            });
        }
        let got = hex::encode(hasher.finalize());
        if got != sha {
            tracing::warn!(agent = %agent_id, job = job.job_id, "artifact upload refused: announced {sha}, received {got}");
            return Err(ArtifactError::HashMismatch {
                announced: sha,
                received: got,
            });
        }
        temp.file
            .flush()
            .await
            .map_err(ArtifactError::io("write", &temp.path))?;
        temp.file
            .sync_all()
            .await
            .map_err(ArtifactError::io("sync", &temp.path))?;

        let already = Received {
            sha256: sha.clone(),
            already_present: true,
        };
        let published = loop {
            let generation = {
                let publish = self.inner.publish.lock().await;
                if self.contains(&sha)? {
                    // Another upload of the same bytes won the race; ours is dropped.
                    return Ok(already);
                }
                (!publish.retiring.contains(&sha)).then_some(publish.generation)
            };
            let Some(generation) = generation else {
                // A previous copy of this hash is being deleted: after that.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            };
            self.stage(&sha, &temp.path, size).await?;
            let publish = self.inner.publish.lock().await;
            if self.contains(&sha)? {
                return Ok(already);
            }
            if publish.generation == generation {
                break publish;
            }
            // A deletion ran meanwhile and may have taken the staged copy.
        };
        self.place(&sha, &mut temp).await?;
        let rec = ArtifactRecord {
            sha256: sha.clone(),
            size,
            upstream: origin.upstream,
            commit: origin.commit,
            platform: origin.platform,
            build_job_id: origin.build_job_id,
            stored_at_ms: now_ms(),
        };
        self.inner.table.put(&sha, &rec)?;
        drop(published);
        self.inner.table.store().commit().await?;
        tracing::info!(
            agent = %agent_id, job = job.job_id, sha = %sha, size,
            upstream = %rec.upstream, platform = %rec.platform, commit = %rec.commit,
            "artifact stored"
        );
        Ok(Received {
            sha256: sha,
            already_present: false,
        })
    }

    async fn create_temp(&self, sha: &str) -> Result<TempFile, ArtifactError> {
        // Unique per upload, so concurrent uploads of one hash never share a file.
        let path = self
            .tmp_dir()
            .join(format!("{sha}.{}.part", crate::auth::secret::new_id("up")));
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .await
            .map_err(ArtifactError::io("create", &path))?;
        Ok(TempFile {
            path,
            file,
            placed: false,
        })
    }

    /// Starts sending artifact `request.sha256` to `agent_id`. Unknown
    /// hashes fail here (before anything is sent). The receiver then yields
    /// the meta chunk (sha256, size) and either
    /// - nothing more, the meta carrying a presigned `url` of the object
    ///   store: when the request `accepts_url` and the backend has URLs; the
    ///   agent fetches the bytes itself, and the hand-out counts as its
    ///   download; or
    /// - data chunks of [`DOWNLOAD_CHUNK_BYTES`] and, if the copy turns out
    ///   not to match its hash, a final [`ArtifactError::Corrupt`] (the copy
    ///   is then quarantined and its record removed). Such a download is
    ///   counted once its last chunk was handed over.
    ///
    /// `url_bytes_corrupt` (the agent's URL download did not match; only
    /// heeded with the object store, otherwise a plain request) makes the
    /// hub hash its copy whole first, unless that version was verified
    /// within [`VERIFIED_FOR`]: a corrupt one is quarantined and `Corrupt`
    /// answered, a sound one is streamed without hashing it again (one
    /// agent's word never removes an artifact, nor costs more than one
    /// check per object version).
    pub(crate) async fn download(
        &self,
        request: &DownloadArtifactRequest,
        agent_id: &str,
    ) -> Result<mpsc::Receiver<Result<ArtifactChunk, ArtifactError>>, ArtifactError> {
        let sha = normalize_sha256(&request.sha256)?;
        let rec = self
            .get(&sha)?
            .ok_or_else(|| ArtifactError::NotFound(sha.clone()))?;
        let mut meta = ArtifactMeta {
            sha256: sha.clone(),
            size: rec.size,
            ..Default::default()
        };
        if request.url_bytes_corrupt && matches!(self.inner.backend, Backend::Objects(_)) {
            self.note_report(&sha, agent_id);
            self.check_whole(&sha, rec.size, agent_id).await?;
        } else if request.accepts_url
            && let Backend::Objects(objects) = &self.inner.backend
            && let Some((url, expires_ms)) = objects.presign_get(&object_rel(&sha)).await?
        {
            meta.url = url.to_string();
            meta.url_expires_ms = expires_ms;
            let (tx, rx) = mpsc::channel(1);
            // The channel is fresh and has room: this cannot wait.
            let _ = tx
                .send(Ok(ArtifactChunk {
                    meta: Some(meta),
                    data: Vec::new(),
                }))
                .await;
            self.count_download(&sha, agent_id);
            tracing::debug!(agent = %agent_id, sha = %sha, "artifact download handed a presigned URL");
            return Ok(rx);
        }
        let Some(opened) = self.open_copy(&sha).await? else {
            self.forget_missing(&sha).await?;
            return Err(ArtifactError::NotFound(sha));
        };
        if opened.size != rec.size {
            tracing::error!(
                "artifact {sha}: {} is {} bytes but was stored with {}",
                self.where_is(&sha),
                opened.size,
                rec.size
            );
            self.quarantine(&sha, opened.version).await?;
            return Err(ArtifactError::Corrupt(sha));
        }
        let trusted = opened
            .proof
            .as_ref()
            .is_some_and(|proof| self.is_verified(&sha, proof));
        let (tx, rx) = mpsc::channel(DOWNLOAD_CHUNKS_IN_FLIGHT);
        // The channel is fresh and has room: this cannot wait.
        let _ = tx
            .send(Ok(ArtifactChunk {
                meta: Some(meta),
                data: Vec::new(),
            }))
            .await;
        tokio::spawn(self.clone().send_copy(
            sha,
            rec.size,
            opened,
            trusted,
            agent_id.to_string(),
            tx,
        ));
        Ok(rx)
    }

    /// Counts one download of `sha` by `agent_id` (`ListArtifacts`, `/metrics`).
    fn count_download(&self, sha: &str, agent_id: &str) {
        *self
            .lock_downloads()
            .entry(sha.to_owned())
            .or_default()
            .entry(agent_id.to_owned())
            .or_default() += 1;
        self.inner.downloads_total.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads the copy of `sha` whole and hashes it: a copy that does not
    /// match (size or hash) is quarantined and [`ArtifactError::Corrupt`]
    /// returned; a missing one is forgotten ([`ArtifactError::NotFound`]).
    /// An object version verified within [`VERIFIED_FOR`] is not read.
    async fn check_whole(&self, sha: &str, size: u64, agent_id: &str) -> Result<(), ArtifactError> {
        if let Some(Version::Object(Some(tag), len)) = self.version_of(sha).await?
            && self.is_verified(sha, &Proof::Object(tag, len))
        {
            return Ok(());
        }
        let Some(mut opened) = self.open_copy(sha).await? else {
            self.forget_missing(sha).await?;
            return Err(ArtifactError::NotFound(sha.to_owned()));
        };
        self.inner
            .report_checks_total
            .fetch_add(1, Ordering::Relaxed);
        let mut hasher = Sha256::new();
        let mut read = 0u64;
        loop {
            let data = opened.reader.next_chunk(DOWNLOAD_CHUNK_BYTES).await?;
            if data.is_empty() || read > size {
                break;
            }
            read += data.len() as u64;
            hasher.update(&data);
        }
        let got = hex::encode(hasher.finalize());
        if got != sha || read != size || opened.size != size {
            tracing::error!(
                agent = %agent_id,
                "artifact {sha}: {} hashes to {got} ({read} bytes read, {size} recorded): the copy is corrupt",
                self.where_is(sha)
            );
            self.quarantine(sha, opened.version).await?;
            return Err(ArtifactError::Corrupt(sha.to_owned()));
        }
        if let Some(proof) = opened.proof {
            self.vouch(sha, proof);
        }
        Ok(())
    }

    /// Streams the copy into `tx`, hashing as it goes unless this version
    /// was verified whole before (`trusted`).
    async fn send_copy(
        self,
        sha: String,
        size: u64,
        opened: Opened,
        trusted: bool,
        agent_id: String,
        tx: mpsc::Sender<Result<ArtifactChunk, ArtifactError>>,
    ) {
        let Opened {
            mut reader,
            version,
            proof,
            ..
        } = opened;
        let mut hasher = (!trusted).then(Sha256::new);
        let mut sent = 0u64;
        loop {
            let buf = match reader.next_chunk(DOWNLOAD_CHUNK_BYTES).await {
                Ok(buf) => buf,
                Err(err) => {
                    tracing::error!(agent = %agent_id, "artifact download failed: {err}");
                    let _ = tx.send(Err(err)).await;
                    return;
                }
            };
            if buf.is_empty() {
                break;
            }
            let n = buf.len() as u64;
            if let Some(h) = hasher.as_mut() {
                h.update(&buf);
            }
            sent += n;
            self.inner.bytes_sent_total.fetch_add(n, Ordering::Relaxed);
            if sent > size {
                break;
            }
            let chunk = ArtifactChunk {
                meta: None,
                data: buf,
            };
            if tx.send(Ok(chunk)).await.is_err() {
                tracing::debug!(agent = %agent_id, sha = %sha, sent, "artifact download abandoned by the agent");
                return;
            }
        }
        let got = match hasher {
            Some(h) => hex::encode(h.finalize()),
            None => sha.clone(),
        };
        if got != sha || sent != size {
            tracing::error!(
                agent = %agent_id,
                "artifact {sha}: {} hashes to {got} ({sent} bytes read, {size} recorded): the copy is corrupt",
                self.where_is(&sha)
            );
            if let Err(e) = self.quarantine(&sha, version).await {
                tracing::error!("artifact {sha}: cannot quarantine the corrupt copy: {e}");
            }
            let _ = tx.send(Err(ArtifactError::Corrupt(sha))).await;
            return;
        }
        if !trusted && let Some(proof) = proof {
            self.vouch(&sha, proof);
        }
        self.count_download(&sha, &agent_id);
        tracing::debug!(agent = %agent_id, sha = %sha, size, "artifact downloaded");
    }

    /// Takes a copy found corrupt out of service: its record removed
    /// (durably) so a rebuild can store the artifact again, the copy moved
    /// to quarantine (kept for a post-mortem, never served again).
    /// `version` is the copy that was found corrupt: if a good copy replaced
    /// it meanwhile, nothing happens. Objects: the record goes first, then
    /// the object is copied and deleted, best effort (one that stays is
    /// unrecorded and deleted at the next start), so a failing delete cannot
    /// leave the record to be quarantined again and again.
    async fn quarantine(&self, sha: &str, version: Version) -> Result<(), ArtifactError> {
        if matches!(self.inner.backend, Backend::Files) {
            // Local renames: all under the lock.
            let mut publish = self.inner.publish.lock().await;
            if self.version_of(sha).await? != Some(version) {
                return Ok(());
            }
            self.lock_verified().remove(sha);
            let dest = self.quarantine_copy(sha).await?;
            self.inner.table.remove(sha)?;
            publish.generation += 1;
            drop(publish);
            self.inner.table.store().commit().await?;
            tracing::error!(
                "artifact {sha} did not match its hash: moved {} to {dest} and removed its record (a rebuild can store it again)",
                self.where_is(sha),
            );
            return Ok(());
        }
        let Some(generation) = self.recorded_generation(sha).await? else {
            return Ok(());
        };
        if self.version_of(sha).await? != Some(version) {
            return Ok(());
        }
        if !self.retire(sha, generation).await? {
            return Ok(());
        }
        self.lock_verified().remove(sha);
        let committed = self.inner.table.store().commit().await;
        if committed.is_ok() {
            match self.quarantine_copy(sha).await {
                Ok(dest) => tracing::error!(
                    "artifact {sha} did not match its hash: removed its record and moved {} to {dest} (a rebuild can store it again)",
                    self.where_is(sha),
                ),
                Err(e) => tracing::warn!(
                    "artifact {sha} did not match its hash: removed its record, but {e} (the next start deletes the unrecorded object)"
                ),
            }
        }
        self.retired(std::slice::from_ref(&sha.to_owned())).await;
        Ok(committed?)
    }

    /// The publish generation if `sha` is recorded (and not being retired).
    async fn recorded_generation(&self, sha: &str) -> Result<Option<u64>, ArtifactError> {
        let publish = self.inner.publish.lock().await;
        Ok((self.contains(sha)? && !publish.retiring.contains(sha)).then_some(publish.generation))
    }

    /// Removes the record of `sha` (not yet durably) if nothing changed
    /// since `generation`, marking it retiring until [`Artifacts::retired`];
    /// false if something did (whatever was checked is stale).
    async fn retire(&self, sha: &str, generation: u64) -> Result<bool, ArtifactError> {
        let mut publish = self.inner.publish.lock().await;
        if publish.generation != generation || !self.contains(sha)? {
            return Ok(false);
        }
        self.inner.table.remove(sha)?;
        publish.generation += 1;
        publish.retiring.insert(sha.to_owned());
        Ok(true)
    }

    /// The copies of retiring `shas` are dealt with: uploads of them may
    /// proceed.
    async fn retired(&self, shas: &[String]) {
        let mut publish = self.inner.publish.lock().await;
        for sha in shas {
            publish.retiring.remove(sha);
        }
        publish.generation += 1;
    }

    /// A recorded artifact whose copy vanished (someone deleted it by hand):
    /// the record goes too, so it reads as not stored.
    async fn forget_missing(&self, sha: &str) -> Result<(), ArtifactError> {
        let Some(generation) = self.recorded_generation(sha).await? else {
            return Ok(());
        };
        if self.version_of(sha).await?.is_some() {
            return Ok(());
        }
        {
            let mut publish = self.inner.publish.lock().await;
            if publish.generation != generation || !self.contains(sha)? {
                return Ok(());
            }
            self.inner.table.remove(sha)?;
            publish.generation += 1;
        }
        tracing::error!(
            "artifact {sha}: recorded but its copy {} is missing; removed the record (a rebuild stores it again)",
            self.where_is(sha)
        );
        self.inner.table.store().commit().await?;
        Ok(())
    }

    /// Garbage collection: for each (upstream, platform) keeps the
    /// `keep_newest` most recently stored artifacts and every hash in
    /// `referenced` (lowercase hex; e.g. what projects' last results still
    /// test against);
    /// deletes the rest, records first (durably), then copies (without the
    /// publish lock: uploads of those hashes wait). Ad-hoc uploads (no
    /// upstream) form their own group. Returns the deleted hashes.
    pub(crate) async fn gc(
        &self,
        keep_newest: u32,
        referenced: &HashSet<String>,
    ) -> Result<Vec<String>, ArtifactError> {
        let mut publish = self.inner.publish.lock().await;
        let mut groups: HashMap<(String, String), Vec<ArtifactRecord>> = HashMap::new();
        for rec in self.records()? {
            groups
                .entry((rec.upstream.clone(), rec.platform.clone()))
                .or_default()
                .push(rec);
        }
        let mut victims = Vec::new();
        for records in groups.values_mut() {
            sort_newest_first(records);
            victims.extend(
                records
                    .iter()
                    .skip(keep_newest as usize)
                    .filter(|r| !referenced.contains(&r.sha256))
                    .map(|r| r.sha256.clone()),
            );
        }
        if victims.is_empty() {
            return Ok(victims);
        }
        victims.sort();
        let mut batch = crate::store::Batch::default();
        for sha in &victims {
            batch.remove(sha.as_bytes());
        }
        self.inner.table.apply(batch)?;
        publish.generation += 1;
        publish.retiring.extend(victims.iter().cloned());
        drop(publish);
        let committed = self.inner.table.store().commit().await;
        if committed.is_ok() {
            for sha in &victims {
                if let Err(e) = self.delete_copy(sha).await {
                    // Unrecorded now: the next start deletes it.
                    tracing::warn!("artifact gc: {e}");
                }
            }
        }
        self.retired(&victims).await;
        committed?;
        {
            let mut downloads = self.lock_downloads();
            for sha in &victims {
                downloads.remove(sha);
            }
        }
        tracing::info!(
            deleted = victims.len(),
            keep_newest,
            "artifact gc: deleted {victims:?}"
        );
        Ok(victims)
    }
}

/// This database's random identity, created (durably) at first use.
fn database_id(store: &Store) -> Result<String, ArtifactError> {
    let meta = Table::open(store, trees::META)?;
    if let Some(id) = meta.get_raw(DATABASE_ID_KEY)? {
        return Ok(String::from_utf8_lossy(&id).into_owned());
    }
    let id = crate::auth::secret::new_id("db");
    meta.put_raw(DATABASE_ID_KEY, id.as_bytes())?;
    store.flush_now()?;
    Ok(id)
}

/// The object store path of artifact `sha`, relative to the hub's prefix.
fn object_rel(sha: &str) -> String {
    format!("{OBJECTS_DIR}/{sha}{FILE_SUFFIX}")
}

/// Newest first; equal times in hash order, so results are deterministic.
fn sort_newest_first(records: &mut [ArtifactRecord]) {
    records.sort_by(|a, b| {
        b.stored_at_ms
            .cmp(&a.stored_at_ms)
            .then_with(|| a.sha256.cmp(&b.sha256))
    });
}

/// The next chunk; `None` at the end of the stream.
async fn next_chunk<S>(chunks: &mut S) -> Result<Option<ArtifactChunk>, ArtifactError>
where
    S: Stream<Item = Result<ArtifactChunk, Status>> + Unpin,
{
    chunks
        .next()
        .await
        .transpose()
        .map_err(ArtifactError::Stream)
}

/// Reads and discards the rest of an upload whose artifact is already stored
/// (answering before the stream ends could fail the uploader's send), still
/// refusing more than the announced size.
async fn drain<S>(chunks: &mut S, sha: &str, size: u64, first: Vec<u8>) -> Result<(), ArtifactError>
where
    S: Stream<Item = Result<ArtifactChunk, Status>> + Unpin,
{
    let mut hasher = Sha256::new();
    let mut received = first.len() as u64;
    hasher.update(&first);
    while let Some(chunk) = next_chunk(chunks).await? {
        received += chunk.data.len() as u64;
        if received > size {
            return Err(ArtifactError::TooLong {
                sha256: sha.to_string(),
                announced: size,
            });
        }
        hasher.update(&chunk.data);
    }
    if received != size {
        return Err(ArtifactError::TooShort {
            sha256: sha.to_string(),
            announced: size,
            received,
        });
    }
    let got = hex::encode(hasher.finalize());
    if got != sha {
        return Err(ArtifactError::HashMismatch {
            announced: sha.to_string(),
            received: got,
        });
    }
    Ok(())
}

/// Fills `buf` unless the file ends first; returns the bytes read.
async fn read_full(file: &mut tokio::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]).await? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Syncs a directory so a rename in it survives a crash.
async fn sync_dir(dir: &Path) -> Result<(), ArtifactError> {
    let d = dir.to_path_buf();
    tokio::task::spawn_blocking(move || std::fs::File::open(&d)?.sync_all())
        .await
        .map_err(|e| ArtifactError::io("sync", dir)(std::io::Error::other(e)))?
        .map_err(ArtifactError::io("sync", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX_BYTES: u64 = 1 << 20;

    fn sha_of(data: &[u8]) -> String {
        hex::encode(Sha256::digest(data))
    }

    async fn open(dir: &Path) -> (Store, Artifacts) {
        with_store(dir, Store::open(&dir.join("db")).unwrap(), Backend::Files).await
    }

    /// [`open`] again once the previous store let go of the database.
    async fn reopen(dir: &Path) -> (Store, Artifacts) {
        with_store(
            dir,
            crate::store::tests::reopen(&dir.join("db")).await,
            Backend::Files,
        )
        .await
    }

    async fn with_store(dir: &Path, store: Store, backend: Backend) -> (Store, Artifacts) {
        let a = Artifacts::open(
            &store,
            dir.join("artifacts"),
            MAX_BYTES,
            DataDir::new(dir, 0),
            backend,
        )
        .await
        .unwrap();
        (store, a)
    }

    /// An upload of `data` announced as `sha`/`size`, split into `chunk` bytes.
    fn upload(
        sha: &str,
        size: u64,
        data: &[u8],
        chunk: usize,
    ) -> impl Stream<Item = Result<ArtifactChunk, Status>> + Unpin {
        let mut chunks = vec![Ok(ArtifactChunk {
            meta: Some(ArtifactMeta {
                sha256: sha.to_string(),
                size,
                job: Some(JobRef {
                    job_id: 7,
                    attempt: 1,
                }),
                ..Default::default()
            }),
            data: Vec::new(),
        })];
        for part in data.chunks(chunk) {
            chunks.push(Ok(ArtifactChunk {
                meta: None,
                data: part.to_vec(),
            }));
        }
        tokio_stream::iter(chunks)
    }

    fn build(
        upstream: &str,
        platform: &str,
    ) -> impl FnOnce(&JobRef) -> Result<Origin, ArtifactError> {
        let key = format!("build/{upstream}/{platform}/c0ffee");
        move |job: &JobRef| Ok(Origin::from_job(job.job_id, &key))
    }

    async fn store_one(a: &Artifacts, data: &[u8], upstream: &str, platform: &str) -> String {
        let sha = sha_of(data);
        let got = a
            .receive(
                "ag_1",
                upload(&sha, data.len() as u64, data, 1000),
                build(upstream, platform),
            )
            .await
            .unwrap();
        assert!(!got.already_present);
        sha
    }

    #[tokio::test]
    async fn concurrent_uploads_that_fit_alone_but_not_together_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        // 100 KiB free above a 10 KiB reserve (a disk nothing else writes
        // to, and which does not see what the uploads write).
        let space = DataDir::with_free_space(dir.path(), 10 << 10, || 110 << 10);
        let a = Artifacts::open(
            &store,
            dir.path().join("artifacts"),
            MAX_BYTES,
            space,
            Backend::Files,
        )
        .await
        .unwrap();
        let first = vec![1u8; 60 << 10];
        let second = vec![2u8; 60 << 10];

        // The first upload announces 60 KiB, then stalls before its data.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(Ok(ArtifactChunk {
            meta: Some(ArtifactMeta {
                sha256: sha_of(&first),
                size: first.len() as u64,
                job: Some(JobRef {
                    job_id: 7,
                    attempt: 1,
                }),
                ..Default::default()
            }),
            data: Vec::new(),
        }))
        .await
        .unwrap();
        let receiving = {
            let a = a.clone();
            tokio::spawn(async move {
                a.receive(
                    "ag_1",
                    tokio_stream::wrappers::ReceiverStream::new(rx),
                    build("rt", "linux"),
                )
                .await
            })
        };
        let promised = async {
            while a.inner.space.admit("jobs", 50 << 10).is_ok() {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), promised)
            .await
            .expect("the first upload promises its bytes");

        // The second fits alone, not beside the first's 60 KiB still to come.
        let e = a
            .receive(
                "ag_2",
                upload(&sha_of(&second), second.len() as u64, &second, 1000),
                build("rt", "linux"),
            )
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("below hub.min_free_space"), "{e}");
        assert!(e.contains("promised to uploads in progress"), "{e}");

        tx.send(Ok(ArtifactChunk {
            meta: None,
            data: first.clone(),
        }))
        .await
        .unwrap();
        drop(tx);
        assert!(!receiving.await.unwrap().unwrap().already_present);
        // Once the first is written (the fake disk did not shrink), the
        // second has room again.
        store_one(&a, &second, "rt", "linux").await;
    }

    async fn fetch(a: &Artifacts, sha: &str, agent: &str) -> Result<Vec<u8>, ArtifactError> {
        let mut rx = a.download(&ask(sha), agent).await?;
        let first = rx.recv().await.unwrap()?;
        let meta = first.meta.unwrap();
        assert_eq!(meta.sha256, sha);
        let mut data = Vec::new();
        while let Some(chunk) = rx.recv().await {
            let chunk = chunk?;
            assert!(chunk.data.len() <= DOWNLOAD_CHUNK_BYTES);
            data.extend(chunk.data);
        }
        assert_eq!(data.len() as u64, meta.size);
        Ok(data)
    }

    /// A download request as an agent before presigned URLs sends it.
    fn ask(sha: &str) -> DownloadArtifactRequest {
        DownloadArtifactRequest {
            sha256: sha.to_owned(),
            ..Default::default()
        }
    }

    fn files_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn build_keys_are_parsed_and_others_leave_the_origin_empty() {
        assert_eq!(
            Origin::from_job(3, "build/lua/linux-x86_64/abc"),
            Origin {
                upstream: "lua".into(),
                platform: "linux-x86_64".into(),
                commit: "abc".into(),
                build_job_id: 3
            }
        );
        for key in [
            "",
            "test/lua/x/abc",
            "build/lua/x",
            "build/lua//abc",
            "build/a/b/c/d",
        ] {
            assert_eq!(
                Origin::from_job(4, key),
                Origin {
                    build_job_id: 4,
                    ..Default::default()
                },
                "{key}"
            );
        }
    }

    #[test]
    fn hashes_are_checked_and_lowercased() {
        let upper = "AB".repeat(32);
        assert_eq!(normalize_sha256(&upper).unwrap(), "ab".repeat(32));
        assert!(normalize_sha256("abc").is_err());
        assert!(normalize_sha256(&"zz".repeat(32)).is_err());
    }

    #[tokio::test]
    async fn stored_artifacts_can_be_read_listed_and_downloaded() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, a) = open(dir.path()).await;
        // Larger than one download chunk, not a multiple of it.
        let data: Vec<u8> = (0..DOWNLOAD_CHUNK_BYTES * 2 + 123)
            .map(|i| (i % 251) as u8)
            .collect();
        let sha = store_one(&a, &data, "lua", "linux-x86_64").await;
        let rec = a.get(&sha).unwrap().unwrap();
        assert_eq!(rec.size, data.len() as u64);
        assert_eq!(
            (
                rec.upstream.as_str(),
                rec.platform.as_str(),
                rec.commit.as_str()
            ),
            ("lua", "linux-x86_64", "c0ffee")
        );
        assert_eq!(rec.build_job_id, 7);
        assert!(a.contains(&sha).unwrap());
        assert!(a.dir().join(format!("{sha}.tar.zst")).is_file());
        assert!(files_in(&a.dir().join(TMP_DIR)).is_empty());

        assert_eq!(fetch(&a, &sha, "ag_2").await.unwrap(), data);
        assert_eq!(fetch(&a, &sha, "ag_2").await.unwrap(), data);
        assert_eq!(fetch(&a, &sha, "ag_3").await.unwrap(), data);
        assert_eq!(a.download_count(&sha, "ag_2"), 2);
        let list = a.list().unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].sha256, sha);
        let counts: Vec<(&str, u32)> = list[0]
            .downloads
            .iter()
            .map(|d| (d.agent_id.as_str(), d.count))
            .collect();
        assert_eq!(counts, [("ag_2", 2), ("ag_3", 1)]);

        let unknown = "0".repeat(64);
        let err = a.download(&ask(&unknown), "ag_2").await.unwrap_err();
        assert!(matches!(err, ArtifactError::NotFound(_)), "{err}");
        assert!(err.to_string().contains("garbage-collected"));
    }

    #[tokio::test]
    async fn records_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let sha = {
            let (_store, a) = open(dir.path()).await;
            store_one(&a, b"runtime", "lua", "p").await
        };
        let (_store, a) = reopen(dir.path()).await;
        assert_eq!(a.get(&sha).unwrap().unwrap().size, 7);
    }

    #[tokio::test]
    async fn records_keep_the_previous_releases_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let sha = sha_of(b"old runtime");
        let old = format!(
            r#"{{"sha256":"{sha}","size":11,"upstream":"lua","commit":"c0ffee","platform":"p","build_job_id":4,"stored_at_ms":1750000000000}}"#
        );
        {
            let (store, a) = open(dir.path()).await;
            std::fs::write(a.path_of(&sha), b"old runtime").unwrap();
            let table = Table::open(&store, trees::ARTIFACTS).unwrap();
            table.put_raw(&sha, old.as_bytes()).unwrap();
            store.commit().await.unwrap();
        }
        let (store, a) = reopen(dir.path()).await;
        let rec = a.get(&sha).unwrap().expect("read as before");
        assert_eq!((rec.size, rec.build_job_id), (11, 4));
        assert_eq!(fetch(&a, &sha, "ag_1").await.unwrap(), b"old runtime");

        let new = store_one(&a, b"new runtime", "lua", "p").await;
        let table = Table::open(&store, trees::ARTIFACTS).unwrap();
        let raw = table.get_raw(&new).unwrap().unwrap();
        let text = String::from_utf8(raw.to_vec()).unwrap();
        let expected_start = format!(
            r#"{{"sha256":"{new}","size":11,"upstream":"lua","commit":"c0ffee","platform":"p","build_job_id":7,"stored_at_ms":"#
        );
        assert!(text.starts_with(&expected_start), "{text}");
    }

    #[tokio::test]
    async fn a_second_upload_of_the_same_hash_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, a) = open(dir.path()).await;
        let sha = store_one(&a, b"same bytes", "lua", "p").await;
        let before = a.get(&sha).unwrap().unwrap();
        let got = a
            .receive(
                "ag_2",
                upload(&sha, 10, b"same bytes", 3),
                build("other", "q"),
            )
            .await
            .unwrap();
        assert!(got.already_present);
        assert_eq!(a.get(&sha).unwrap().unwrap(), before);
        assert!(files_in(&a.dir().join(TMP_DIR)).is_empty());
    }

    #[tokio::test]
    async fn concurrent_uploads_of_one_hash_store_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, a) = open(dir.path()).await;
        let data = vec![42u8; 100_000];
        let sha = sha_of(&data);
        let mut handles = Vec::new();
        for _ in 0..4 {
            let (a, data, sha) = (a.clone(), data.clone(), sha.clone());
            handles.push(tokio::spawn(async move {
                a.receive(
                    "ag_1",
                    upload(&sha, data.len() as u64, &data, 999),
                    build("lua", "p"),
                )
                .await
                .unwrap()
                .already_present
            }));
        }
        let mut fresh = 0;
        for h in handles {
            fresh += usize::from(!h.await.unwrap());
        }
        assert_eq!(fresh, 1);
        assert_eq!(fetch(&a, &sha, "ag_1").await.unwrap(), data);
    }

    #[tokio::test]
    async fn uploads_over_the_size_limit_are_refused_before_any_byte_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, a) = open(dir.path()).await;
        let err = a
            .receive(
                "ag_1",
                upload(&"a".repeat(64), MAX_BYTES + 1, b"", 1),
                build("lua", "p"),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, ArtifactError::TooLarge { .. }), "{err}");
        assert!(err.to_string().contains("artifacts.max_size"), "{err}");
        // Sending more than announced is refused too.
        let err = a
            .receive(
                "ag_1",
                upload(&sha_of(b"abc"), 2, b"abc", 1),
                build("lua", "p"),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, ArtifactError::TooLong { .. }), "{err}");
        assert!(files_in(&a.dir().join(TMP_DIR)).is_empty());
    }

    #[tokio::test]
    async fn a_hash_mismatch_is_refused_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, a) = open(dir.path()).await;
        let claimed = sha_of(b"what was built");
        let err = a
            .receive(
                "ag_1",
                upload(&claimed, 13, b"something els", 4),
                build("lua", "p"),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, ArtifactError::HashMismatch { .. }), "{err}");
        assert!(
            err.to_string()
                .starts_with(&format!("hash mismatch: announced {claimed}, received "))
        );
        assert!(!a.contains(&claimed).unwrap());
        assert!(files_in(&a.dir().join(TMP_DIR)).is_empty());
        assert_eq!(files_in(a.dir()), [QUARANTINE_DIR, TMP_DIR]);
        // Short uploads likewise.
        let err = a
            .receive(
                "ag_1",
                upload(&claimed, 100, b"short", 4),
                build("lua", "p"),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(err, ArtifactError::TooShort { received: 5, .. }),
            "{err}"
        );
        assert!(files_in(&a.dir().join(TMP_DIR)).is_empty());
    }

    #[tokio::test]
    async fn meta_is_required_and_the_authorizer_decides() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, a) = open(dir.path()).await;
        let no_meta = tokio_stream::iter(vec![Ok(ArtifactChunk {
            meta: None,
            data: b"x".to_vec(),
        })]);
        let err = a
            .receive("ag_1", no_meta, build("l", "p"))
            .await
            .unwrap_err();
        assert!(matches!(err, ArtifactError::NoMeta), "{err}");
        let err = a
            .receive("ag_1", upload("nothex", 1, b"x", 1), build("l", "p"))
            .await
            .unwrap_err();
        assert!(matches!(err, ArtifactError::BadSha(_)), "{err}");
        let refuse = |job: &JobRef| {
            Err(ArtifactError::NotHeld {
                agent_id: "ag_1".into(),
                job_id: job.job_id,
                attempt: job.attempt,
            })
        };
        let err = a
            .receive("ag_1", upload(&sha_of(b"x"), 1, b"x", 1), refuse)
            .await
            .unwrap_err();
        assert!(
            matches!(err, ArtifactError::NotHeld { job_id: 7, .. }),
            "{err}"
        );
        assert!(!a.contains(&sha_of(b"x")).unwrap());
        // A broken stream is passed on.
        let broken = tokio_stream::iter(vec![Err(Status::cancelled("gone"))]);
        let err = a
            .receive("ag_1", broken, build("l", "p"))
            .await
            .unwrap_err();
        assert!(matches!(err, ArtifactError::Stream(_)), "{err}");
    }

    #[tokio::test]
    async fn gc_keeps_the_newest_per_upstream_and_platform_and_referenced_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, a) = open(dir.path()).await;
        let mut lua_x = Vec::new();
        for i in 0..4u8 {
            lua_x.push(store_one(&a, &[b'x', i], "lua", "x").await);
            // Distinct stored_at_ms so "newest" is well defined.
            tokio::time::sleep(std::time::Duration::from_millis(3)).await;
        }
        let lua_y = store_one(&a, b"y0", "lua", "y").await;
        let other_x = store_one(&a, b"o0", "other", "x").await;
        let adhoc: Vec<String> = {
            let mut v = Vec::new();
            for d in [&b"h0"[..], b"h1"] {
                let sha = sha_of(d);
                a.receive("ag_1", upload(&sha, 2, d, 2), |job: &JobRef| {
                    Ok(Origin::from_job(job.job_id, ""))
                })
                .await
                .unwrap();
                v.push(sha);
                tokio::time::sleep(std::time::Duration::from_millis(3)).await;
            }
            v
        };
        let referenced: HashSet<String> = [lua_x[0].clone()].into();
        let mut deleted = a.gc(2, &referenced).await.unwrap();
        deleted.sort();
        let mut expected = vec![lua_x[1].clone()];
        expected.sort();
        assert_eq!(deleted, expected);
        for sha in [
            &lua_x[0], &lua_x[2], &lua_x[3], &lua_y, &other_x, &adhoc[0], &adhoc[1],
        ] {
            assert!(a.contains(sha).unwrap(), "{sha} was kept");
            assert!(a.dir().join(format!("{sha}.tar.zst")).is_file());
        }
        assert!(!a.contains(&lua_x[1]).unwrap());
        assert!(!a.dir().join(format!("{}.tar.zst", lua_x[1])).exists());

        // keep 1: the older ad-hoc upload goes; lua_x[0] stays referenced.
        let deleted = a.gc(1, &referenced).await.unwrap();
        let mut expected = vec![lua_x[2].clone(), adhoc[0].clone()];
        expected.sort();
        assert_eq!(deleted, expected);
        let listed: Vec<String> = a.list().unwrap().into_iter().map(|i| i.sha256).collect();
        assert_eq!(listed.len(), 5);
        assert_eq!(listed[0], adhoc[1], "newest first");
    }

    #[tokio::test]
    async fn open_reconciles_files_and_records() {
        let dir = tempfile::tempdir().unwrap();
        let (kept, recorded_only) = {
            let (_store, a) = open(dir.path()).await;
            let kept = store_one(&a, b"kept", "lua", "p").await;
            let recorded_only = store_one(&a, b"lost its file", "lua", "p").await;
            std::fs::remove_file(a.dir().join(format!("{recorded_only}.tar.zst"))).unwrap();
            (kept, recorded_only)
        };
        let art = dir.path().join("artifacts");
        let unrecorded = sha_of(b"never recorded");
        std::fs::write(art.join(format!("{unrecorded}.tar.zst")), b"never recorded").unwrap();
        std::fs::write(art.join(TMP_DIR).join("half.part"), b"half").unwrap();
        std::fs::write(art.join("README"), b"not ours").unwrap();

        let store = crate::store::tests::reopen(&dir.path().join("db")).await;
        let a = Artifacts::open(
            &store,
            art.clone(),
            MAX_BYTES,
            DataDir::new(&art, 0),
            Backend::Files,
        )
        .await
        .unwrap();
        assert!(a.contains(&kept).unwrap());
        assert!(!a.contains(&recorded_only).unwrap());
        assert!(!art.join(format!("{unrecorded}.tar.zst")).exists());
        assert!(files_in(&art.join(TMP_DIR)).is_empty());
        assert!(art.join("README").exists(), "unknown files are left alone");
        assert_eq!(a.list().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_corrupt_file_fails_its_download_and_is_quarantined() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, a) = open(dir.path()).await;
        let data = vec![7u8; DOWNLOAD_CHUNK_BYTES + 10];
        let sha = store_one(&a, &data, "lua", "p").await;
        // Same size, one byte flipped; written as a new file, as a restore
        // from a bad backup would (an in-place write within the same clock
        // tick as the upload could keep the ctime the upload's check saw).
        let mut bad = data.clone();
        bad[5] ^= 1;
        std::fs::write(a.dir().join("bad"), &bad).unwrap();
        std::fs::rename(a.dir().join("bad"), a.dir().join(format!("{sha}.tar.zst"))).unwrap();

        let err = fetch(&a, &sha, "ag_2").await.unwrap_err();
        assert!(matches!(err, ArtifactError::Corrupt(_)), "{err}");
        assert!(err.to_string().contains("quarantined"), "{err}");
        assert_eq!(a.download_count(&sha, "ag_2"), 0);
        assert!(!a.contains(&sha).unwrap());
        assert!(!a.dir().join(format!("{sha}.tar.zst")).exists());
        let quarantined = files_in(&a.dir().join(QUARANTINE_DIR));
        assert_eq!(quarantined.len(), 1);
        assert!(quarantined[0].starts_with(&sha));

        // A rebuild stores it again.
        assert_eq!(store_one(&a, &data, "lua", "p").await, sha);
        assert_eq!(fetch(&a, &sha, "ag_2").await.unwrap(), data);

        // A truncated file is caught before anything is streamed.
        std::fs::write(a.dir().join(format!("{sha}.tar.zst")), b"short").unwrap();
        let err = a.download(&ask(&sha), "ag_2").await.unwrap_err();
        assert!(matches!(err, ArtifactError::Corrupt(_)), "{err}");
        assert!(!a.contains(&sha).unwrap());
    }

    /// An artifact store in `dir` whose bytes are objects of a local object
    /// store in `dir/objects` (the S3 backend's code path, without S3).
    async fn open_objects(dir: &Path) -> (Store, Artifacts, Objects) {
        let objects = Objects::local(&dir.join("objects")).unwrap();
        let store = Store::open(&dir.join("db")).unwrap();
        let (store, a) = with_store(dir, store, Backend::Objects(objects.clone())).await;
        (store, a, objects)
    }

    /// [`open_objects`] again once the previous store let go of the database.
    async fn reopen_objects(dir: &Path) -> (Store, Artifacts, Objects) {
        let objects = Objects::local(&dir.join("objects")).unwrap();
        let store = crate::store::tests::reopen(&dir.join("db")).await;
        let (store, a) = with_store(dir, store, Backend::Objects(objects.clone())).await;
        (store, a, objects)
    }

    /// A real local object store whose deletes can be made to fail and
    /// whose reads are counted.
    #[derive(Debug)]
    struct Faulty {
        inner: Arc<dyn object_store::ObjectStore>,
        fail_deletes: std::sync::atomic::AtomicBool,
        gets: AtomicU64,
        /// Deletes wait for a read lock: a test holding the write lock
        /// holds them.
        gate: Arc<tokio::sync::RwLock<()>>,
        deletes_started: AtomicU64,
    }

    impl std::fmt::Display for Faulty {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "Faulty({})", self.inner)
        }
    }

    type Listing<T> = std::pin::Pin<Box<dyn Stream<Item = object_store::Result<T>> + Send>>;

    #[async_trait::async_trait]
    impl object_store::ObjectStore for Faulty {
        async fn put_opts(
            &self,
            location: &object_store::path::Path,
            payload: object_store::PutPayload,
            opts: object_store::PutOptions,
        ) -> object_store::Result<object_store::PutResult> {
            self.inner.put_opts(location, payload, opts).await
        }
        async fn put_multipart_opts(
            &self,
            location: &object_store::path::Path,
            opts: object_store::PutMultipartOptions,
        ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
            self.inner.put_multipart_opts(location, opts).await
        }
        async fn get_opts(
            &self,
            location: &object_store::path::Path,
            options: object_store::GetOptions,
        ) -> object_store::Result<object_store::GetResult> {
            if !options.head {
                self.gets.fetch_add(1, Ordering::SeqCst);
            }
            self.inner.get_opts(location, options).await
        }
        fn delete_stream(
            &self,
            locations: Listing<object_store::path::Path>,
        ) -> Listing<object_store::path::Path> {
            if self.fail_deletes.load(Ordering::SeqCst) {
                return Box::pin(locations.map(|_| {
                    Err(object_store::Error::Generic {
                        store: "Faulty",
                        source: "deletes fail".into(),
                    })
                }));
            }
            self.deletes_started.fetch_add(1, Ordering::SeqCst);
            let (inner, gate) = (self.inner.clone(), self.gate.clone());
            let (tx, rx) = mpsc::channel(1);
            tokio::spawn(async move {
                let _open = gate.read().await;
                let mut deleted = inner.delete_stream(locations);
                while let Some(result) = deleted.next().await {
                    if tx.send(result).await.is_err() {
                        break;
                    }
                }
            });
            Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
        }
        fn list(
            &self,
            prefix: Option<&object_store::path::Path>,
        ) -> Listing<object_store::ObjectMeta> {
            self.inner.list(prefix)
        }
        async fn list_with_delimiter(
            &self,
            prefix: Option<&object_store::path::Path>,
        ) -> object_store::Result<object_store::ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }
        async fn copy_opts(
            &self,
            from: &object_store::path::Path,
            to: &object_store::path::Path,
            options: object_store::CopyOptions,
        ) -> object_store::Result<()> {
            self.inner.copy_opts(from, to, options).await
        }
    }

    /// [`open_objects`] through a [`Faulty`] store.
    async fn open_faulty(dir: &Path) -> (Store, Artifacts, Objects, Arc<Faulty>) {
        let mut faulty = None;
        let objects = Objects::local_wrapped(&dir.join("objects"), |inner| {
            let f = Arc::new(Faulty {
                inner,
                fail_deletes: Default::default(),
                gets: AtomicU64::new(0),
                gate: Default::default(),
                deletes_started: AtomicU64::new(0),
            });
            faulty = Some(f.clone());
            f
        })
        .unwrap();
        let store = Store::open(&dir.join("db")).unwrap();
        let (store, a) = with_store(dir, store, Backend::Objects(objects.clone())).await;
        (store, a, objects, faulty.unwrap())
    }

    #[tokio::test]
    async fn a_corrupt_object_whose_delete_fails_loses_its_record_first_and_is_copied_once() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, a, objects, faulty) = open_faulty(dir.path()).await;
        let data = vec![4u8; 1000];
        let sha = store_one(&a, &data, "lua", "p").await;
        let mut bad = data.clone();
        bad[1] ^= 1;
        put_object(&objects, &object_rel(&sha), &bad).await;
        faulty.fail_deletes.store(true, Ordering::SeqCst);

        for agent in ["ag_1", "ag_2"] {
            let err = fetch(&a, &sha, agent).await.unwrap_err();
            assert!(
                matches!(err, ArtifactError::Corrupt(_) | ArtifactError::NotFound(_)),
                "{err}"
            );
        }
        assert!(
            !a.contains(&sha).unwrap(),
            "the record went despite the failed delete"
        );
        assert_eq!(
            objects_in(&objects, QUARANTINE_DIR).await.len(),
            1,
            "quarantined once"
        );
        // The object the delete left is unrecorded: the next start deletes it.
        assert_eq!(objects_in(&objects, OBJECTS_DIR).await.len(), 1);
    }

    /// The objects under `folder` (relative to the prefix), by name.
    async fn objects_in(objects: &Objects, folder: &str) -> Vec<String> {
        let root = objects.path(folder);
        let mut names: Vec<String> = objects
            .store()
            .list(Some(&root))
            .map(|m| m.unwrap().location.filename().unwrap().to_owned())
            .collect()
            .await;
        names.sort();
        names
    }

    async fn object_bytes(objects: &Objects, rel: &str) -> Vec<u8> {
        let got = objects.store().get(&objects.path(rel)).await.unwrap();
        got.bytes().await.unwrap().to_vec()
    }

    async fn put_object(objects: &Objects, rel: &str, data: &[u8]) {
        objects
            .store()
            .put(&objects.path(rel), data.to_vec().into())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn with_an_object_store_uploads_become_objects_and_downloads_read_them() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, a, objects) = open_objects(dir.path()).await;
        // One put, and one multipart upload (over OBJECT_PART_BYTES).
        let small = b"small runtime".to_vec();
        let large: Vec<u8> = (0..OBJECT_PART_BYTES * 2 + 77)
            .map(|i| (i % 253) as u8)
            .collect();
        let small_sha = store_one(&a, &small, "lua", "x").await;
        let large_sha = store_one(&a, &large, "lua", "y").await;
        let mut expected = vec![
            format!("{small_sha}.tar.zst"),
            format!("{large_sha}.tar.zst"),
        ];
        expected.sort();
        assert_eq!(objects_in(&objects, OBJECTS_DIR).await, expected);
        assert_eq!(object_bytes(&objects, &object_rel(&large_sha)).await, large);
        assert!(files_in(&a.dir().join(TMP_DIR)).is_empty());
        // No files beside the uploads in progress: the bytes are objects.
        assert_eq!(files_in(a.dir()), [TMP_DIR]);

        // A second upload of a stored hash is discarded.
        let again = a
            .receive(
                "ag_2",
                upload(&small_sha, small.len() as u64, &small, 5),
                build("lua", "x"),
            )
            .await
            .unwrap();
        assert!(again.already_present);
        assert_eq!(objects_in(&objects, OBJECTS_DIR).await.len(), 2);

        // A store without presigned URLs streams, even to an agent that
        // accepts a URL.
        assert_eq!(fetch(&a, &large_sha, "ag_2").await.unwrap(), large);
        let mut rx = a
            .download(
                &DownloadArtifactRequest {
                    accepts_url: true,
                    ..ask(&small_sha)
                },
                "ag_3",
            )
            .await
            .unwrap();
        let meta = rx.recv().await.unwrap().unwrap().meta.unwrap();
        assert!(meta.url.is_empty());
        let mut data = Vec::new();
        while let Some(chunk) = rx.recv().await {
            data.extend(chunk.unwrap().data);
        }
        assert_eq!(data, small);
        assert_eq!(a.download_count(&large_sha, "ag_2"), 1);
        assert_eq!(a.download_count(&small_sha, "ag_3"), 1);
        let totals = a.download_totals();
        assert_eq!(
            (totals.downloads, totals.sent_bytes),
            (2, (large.len() + small.len()) as u64)
        );
    }

    #[tokio::test]
    async fn with_an_object_store_the_open_deletes_orphans_and_forgets_missing_objects() {
        let dir = tempfile::tempdir().unwrap();
        let (kept, lost) = {
            let (_store, a, objects) = open_objects(dir.path()).await;
            let kept = store_one(&a, b"kept", "lua", "p").await;
            let lost = store_one(&a, b"lost its object", "lua", "p").await;
            objects
                .store()
                .delete(&objects.path(&object_rel(&lost)))
                .await
                .unwrap();
            (kept, lost)
        };
        // As a hub killed between putting an object and recording it leaves it.
        let orphan = sha_of(b"never recorded");
        let objects = Objects::local(&dir.path().join("objects")).unwrap();
        put_object(&objects, &object_rel(&orphan), b"never recorded").await;
        put_object(&objects, &format!("{OBJECTS_DIR}/README"), b"not ours").await;

        let (_store, a, objects) = reopen_objects(dir.path()).await;
        assert!(a.contains(&kept).unwrap());
        assert!(!a.contains(&lost).unwrap());
        assert!(!a.contains(&orphan).unwrap());
        assert_eq!(
            objects_in(&objects, OBJECTS_DIR).await,
            [format!("{kept}.tar.zst"), "README".to_owned()],
            "the orphan is deleted, unknown objects are left alone"
        );
        assert_eq!(fetch(&a, &kept, "ag_1").await.unwrap(), b"kept");
        // The lost one can be stored again.
        assert_eq!(store_one(&a, b"lost its object", "lua", "p").await, lost);
    }

    #[tokio::test]
    async fn switching_to_an_object_store_moves_the_stored_files_into_it() {
        let dir = tempfile::tempdir().unwrap();
        let (moved, bad) = {
            let (_store, a) = open(dir.path()).await;
            let moved = store_one(&a, b"kept across the switch", "lua", "p").await;
            let bad = store_one(&a, b"rotten on disk", "lua", "q").await;
            std::fs::write(a.path_of(&bad), b"rotten on dis!").unwrap();
            (moved, bad)
        };
        let (_store, a, objects) = reopen_objects(dir.path()).await;
        assert!(a.contains(&moved).unwrap());
        assert_eq!(
            objects_in(&objects, OBJECTS_DIR).await,
            [format!("{moved}.tar.zst")]
        );
        assert!(!a.path_of(&moved).exists(), "the file moved");
        assert_eq!(
            fetch(&a, &moved, "ag_1").await.unwrap(),
            b"kept across the switch"
        );
        // A file that no longer matches is not moved, and its record goes.
        assert!(!a.contains(&bad).unwrap());
        assert!(a.path_of(&bad).exists(), "left for a post-mortem");
    }

    #[tokio::test]
    async fn a_mistyped_store_or_another_hubs_objects_are_refused_and_nothing_is_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let sha = {
            let (_store, a, objects) = open_objects(dir.path()).await;
            let marker = object_bytes(&objects, MARKER).await;
            assert!(String::from_utf8(marker).unwrap().starts_with("db_"));
            store_one(&a, b"precious", "lua", "p").await
        };
        // A typo: the config points at an empty place.
        let typo = Objects::local(&dir.path().join("typo")).unwrap();
        let store = crate::store::tests::reopen(&dir.path().join("db")).await;
        let err = Artifacts::open(
            &store,
            dir.path().join("artifacts"),
            MAX_BYTES,
            DataDir::new(dir.path(), 0),
            Backend::Objects(typo.clone()),
        )
        .await
        .err()
        .expect("refused");
        let msg = err.to_string();
        assert!(matches!(err, ArtifactError::NotOurs(_)), "{msg}");
        assert!(
            msg.contains("storage.prefix") && msg.contains("storage.bucket"),
            "{msg}"
        );
        assert!(objects_in(&typo, "").await.is_empty(), "no marker written");
        drop(store);

        // The typo fixed: the record and its object are still there.
        let (_store, a, objects) = reopen_objects(dir.path()).await;
        assert!(a.contains(&sha).unwrap());
        assert_eq!(fetch(&a, &sha, "ag_1").await.unwrap(), b"precious");
        drop((a, _store));

        // Another database (a fresh one) pointed at these objects: refused,
        // its objects are not deleted as unrecorded.
        let other = tempfile::tempdir().unwrap();
        let store = Store::open(&other.path().join("db")).unwrap();
        let err = Artifacts::open(
            &store,
            other.path().join("artifacts"),
            MAX_BYTES,
            DataDir::new(other.path(), 0),
            Backend::Objects(objects.clone()),
        )
        .await
        .err()
        .expect("refused");
        assert!(err.to_string().contains("another hub"), "{err}");
        assert_eq!(
            objects_in(&objects, OBJECTS_DIR).await,
            [format!("{sha}.tar.zst")]
        );
    }

    #[tokio::test]
    async fn a_file_left_by_a_move_killed_after_its_object_was_stored_is_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let sha = {
            let (_store, a) = open(dir.path()).await;
            store_one(&a, b"moved, then killed", "lua", "p").await
        };
        let file = dir.path().join("artifacts").join(format!("{sha}.tar.zst"));
        // As a move killed between storing the object and deleting the file.
        let objects = Objects::local(&dir.path().join("objects")).unwrap();
        put_object(&objects, &object_rel(&sha), b"moved, then killed").await;
        assert!(file.exists());
        let (_store, a, objects) = reopen_objects(dir.path()).await;
        assert!(!file.exists(), "the leftover file is deleted");
        assert!(a.contains(&sha).unwrap());
        assert_eq!(
            objects_in(&objects, OBJECTS_DIR).await,
            [format!("{sha}.tar.zst")]
        );
        assert_eq!(
            fetch(&a, &sha, "ag_1").await.unwrap(),
            b"moved, then killed"
        );
    }

    #[tokio::test]
    async fn with_an_object_store_gc_deletes_records_then_objects() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, a, objects) = open_objects(dir.path()).await;
        let old = store_one(&a, b"old", "lua", "x").await;
        tokio::time::sleep(std::time::Duration::from_millis(3)).await;
        let new = store_one(&a, b"new", "lua", "x").await;
        let deleted = a.gc(1, &HashSet::new()).await.unwrap();
        assert_eq!(deleted, std::slice::from_ref(&old));
        assert!(!a.contains(&old).unwrap());
        assert_eq!(
            objects_in(&objects, OBJECTS_DIR).await,
            [format!("{new}.tar.zst")]
        );
    }

    #[tokio::test]
    async fn with_an_object_store_a_corrupt_object_is_quarantined_in_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, a, objects) = open_objects(dir.path()).await;
        let data = vec![7u8; DOWNLOAD_CHUNK_BYTES + 10];
        let sha = store_one(&a, &data, "lua", "p").await;
        let mut bad = data.clone();
        bad[5] ^= 1;
        put_object(&objects, &object_rel(&sha), &bad).await;

        let err = fetch(&a, &sha, "ag_2").await.unwrap_err();
        assert!(matches!(err, ArtifactError::Corrupt(_)), "{err}");
        assert_eq!(a.download_count(&sha, "ag_2"), 0);
        assert!(!a.contains(&sha).unwrap());
        assert!(objects_in(&objects, OBJECTS_DIR).await.is_empty());
        let quarantined = objects_in(&objects, QUARANTINE_DIR).await;
        assert_eq!(quarantined.len(), 1, "{quarantined:?}");
        assert!(quarantined[0].starts_with(&format!("{sha}.")));
        assert_eq!(
            object_bytes(&objects, &format!("{QUARANTINE_DIR}/{}", quarantined[0])).await,
            bad
        );

        // A rebuild stores it again.
        assert_eq!(store_one(&a, &data, "lua", "p").await, sha);
        assert_eq!(fetch(&a, &sha, "ag_2").await.unwrap(), data);
    }

    #[tokio::test]
    async fn an_agents_report_of_corrupt_url_bytes_is_checked_against_the_copy() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, a, objects) = open_objects(dir.path()).await;
        let data = vec![9u8; 3 * DOWNLOAD_CHUNK_BYTES];
        let sha = store_one(&a, &data, "lua", "p").await;
        let report = DownloadArtifactRequest {
            url_bytes_corrupt: true,
            ..ask(&sha)
        };

        // The copy is sound: one agent's word removes nothing; it gets the
        // bytes through the hub.
        let mut rx = a.download(&report, "ag_liar").await.unwrap();
        let meta = rx.recv().await.unwrap().unwrap().meta.unwrap();
        assert!(meta.url.is_empty());
        let mut got = Vec::new();
        while let Some(chunk) = rx.recv().await {
            got.extend(chunk.unwrap().data);
        }
        assert_eq!(got, data);
        assert!(a.contains(&sha).unwrap());
        assert_eq!(a.download_count(&sha, "ag_liar"), 1);

        // The copy really is corrupt: quarantined before anything is sent.
        let mut bad = data.clone();
        bad[2 * DOWNLOAD_CHUNK_BYTES] ^= 1;
        put_object(&objects, &object_rel(&sha), &bad).await;
        let err = a.download(&report, "ag_2").await.unwrap_err();
        assert!(matches!(err, ArtifactError::Corrupt(_)), "{err}");
        assert!(!a.contains(&sha).unwrap());
        assert_eq!(objects_in(&objects, QUARANTINE_DIR).await.len(), 1);
        assert!(objects_in(&objects, OBJECTS_DIR).await.is_empty());
    }

    /// Reads the whole answer of `rx` after the meta chunk.
    async fn drain_rx(
        mut rx: mpsc::Receiver<Result<ArtifactChunk, ArtifactError>>,
    ) -> Result<Vec<u8>, ArtifactError> {
        let meta = rx.recv().await.unwrap()?.meta.unwrap();
        assert!(meta.url.is_empty());
        let mut got = Vec::new();
        while let Some(chunk) = rx.recv().await {
            got.extend(chunk?.data);
        }
        Ok(got)
    }

    #[tokio::test]
    async fn gc_deletes_objects_without_holding_up_uploads() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, a, objects, faulty) = open_faulty(dir.path()).await;
        let old = store_one(&a, b"old", "lua", "x").await;
        tokio::time::sleep(std::time::Duration::from_millis(3)).await;
        store_one(&a, b"new", "lua", "x").await;

        // The object store stalls on the gc's delete.
        let hold = faulty.gate.clone().write_owned().await;
        let gc = tokio::spawn({
            let a = a.clone();
            async move { a.gc(1, &HashSet::new()).await }
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while faulty.deletes_started.load(Ordering::SeqCst) == 0 {
            assert!(std::time::Instant::now() < deadline, "gc never deleted");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!(!a.contains(&old).unwrap(), "the record went first");
        // Other uploads are not held up by it.
        let other = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            store_one(&a, b"other", "lua", "y"),
        )
        .await
        .expect("an upload finished while the gc's delete was stalled");
        assert!(a.contains(&other).unwrap());
        // An upload of the hash being deleted waits for the delete, so the
        // delete cannot take its object.
        let again = tokio::spawn({
            let a = a.clone();
            async move { store_one(&a, b"old", "lua", "x").await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(!again.is_finished());
        drop(hold);
        assert_eq!(gc.await.unwrap().unwrap(), std::slice::from_ref(&old));
        assert_eq!(again.await.unwrap(), old);
        assert!(a.contains(&old).unwrap());
        assert_eq!(object_bytes(&objects, &object_rel(&old)).await, b"old");
    }

    #[tokio::test]
    async fn a_repeated_report_of_corrupt_url_bytes_checks_each_object_version_once() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, a, _objects, faulty) = open_faulty(dir.path()).await;
        let data = vec![5u8; 2 * DOWNLOAD_CHUNK_BYTES + 3];
        let sha = store_one(&a, &data, "lua", "p").await;
        let report = DownloadArtifactRequest {
            url_bytes_corrupt: true,
            ..ask(&sha)
        };
        let gets = || faulty.gets.load(Ordering::SeqCst);
        let before = gets();
        let rx = a.download(&report, "ag_hostile").await.unwrap();
        assert_eq!(drain_rx(rx).await.unwrap(), data);
        assert_eq!(gets() - before, 2, "one read to check, one to stream");
        for _ in 0..3 {
            let before = gets();
            let rx = a.download(&report, "ag_hostile").await.unwrap();
            assert_eq!(drain_rx(rx).await.unwrap(), data);
            assert_eq!(
                gets() - before,
                1,
                "this version was checked: only streamed"
            );
        }
        assert_eq!(a.download_count(&sha, "ag_hostile"), 4);
        let totals = a.download_totals();
        assert_eq!((totals.url_reports, totals.report_checks), (4, 1));
    }

    #[tokio::test]
    async fn without_an_object_store_a_report_of_corrupt_url_bytes_is_a_plain_request() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, a) = open(dir.path()).await;
        let data = vec![6u8; DOWNLOAD_CHUNK_BYTES + 9];
        let sha = store_one(&a, &data, "lua", "p").await;
        std::fs::write(a.path_of(&sha), vec![0u8; data.len()]).unwrap();
        let report = DownloadArtifactRequest {
            url_bytes_corrupt: true,
            ..ask(&sha)
        };
        // Not checked whole before the answer starts (no URL was ever handed
        // out): streamed, hashed on the way, found corrupt at the end.
        let rx = a.download(&report, "ag_1").await.unwrap();
        let err = drain_rx(rx).await.unwrap_err();
        assert!(matches!(err, ArtifactError::Corrupt(_)), "{err}");
        assert!(!a.contains(&sha).unwrap());
    }

    #[tokio::test]
    async fn a_verified_file_replaced_behind_the_stores_back_is_hashed_again() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, a) = open(dir.path()).await;
        let data = vec![3u8; DOWNLOAD_CHUNK_BYTES * 2];
        let sha = store_one(&a, &data, "lua", "p").await;
        // Verified whole once; served again unchanged.
        assert_eq!(fetch(&a, &sha, "ag_1").await.unwrap(), data);
        assert_eq!(fetch(&a, &sha, "ag_2").await.unwrap(), data);
        // Another file (new inode) with the same size, one byte off.
        let path = a.dir().join(format!("{sha}.tar.zst"));
        let mut bad = data.clone();
        bad[DOWNLOAD_CHUNK_BYTES] ^= 1;
        let tmp = a.dir().join("replacement");
        std::fs::write(&tmp, &bad).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        let err = fetch(&a, &sha, "ag_3").await.unwrap_err();
        assert!(matches!(err, ArtifactError::Corrupt(_)), "{err}");
        assert!(!a.contains(&sha).unwrap());
    }
}
