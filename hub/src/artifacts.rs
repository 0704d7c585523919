//! The content-addressed artifact store: the packed runtimes (tar + zstd)
//! that build jobs upload and test jobs download, named by their SHA-256.
//!
//! ```text
//! <dir>/<sha256>.tar.zst      one verified artifact (lowercase hex name)
//! <dir>/tmp/                  uploads in progress (emptied at open)
//! <dir>/quarantine/           files found not to match their name
//! sled tree `artifacts`       <sha256> → ArtifactRecord (JSON)
//! ```
//!
//! Rules this module keeps:
//! - A file is put in place only after its bytes were counted and hashed
//!   against what the uploader announced; it is written to `tmp/`, synced,
//!   renamed (atomic) and the directory synced, and only then recorded. The
//!   upload is answered after the record is durable ([`Store::commit`]).
//! - Files never change once in place: a second upload of the same hash is
//!   discarded (`already_present`), so concurrent uploads cannot corrupt one.
//! - A record exists only for a file that exists: the open reconciles both
//!   sides, garbage collection removes the record (durably) before the file,
//!   and a download that finds a corrupt file quarantines it and removes its
//!   record so a rebuild can store it again.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;
use trunkfarm_proto::v1::{AgentDownloads, ArtifactChunk, ArtifactInfo, ArtifactMeta, JobRef};

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

/// Subdirectory for files that did not match their hash.
const QUARANTINE_DIR: &str = "quarantine";

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
    dir: PathBuf,
    max_size: u64,
    /// The data dir's reserve: an upload that would cut into it is refused.
    space: DataDir,
    /// Completed downloads since start: sha → agent id → count.
    downloads: Mutex<HashMap<String, HashMap<String, u32>>>,
    /// Files whose content was hashed whole and matched, by artifact, with
    /// the file's identity and change time then: a download of an unchanged
    /// file is not hashed again (any write to it changes its ctime, which
    /// no one can set back). Hashing every download cost a core per GB/s.
    verified: Mutex<HashMap<String, (FileStamp, std::time::Instant)>>,
    /// Downloads served to the end since start, all artifacts (`/metrics`).
    downloads_total: AtomicU64,
    /// Artifact bytes sent to agents since start (`/metrics`).
    bytes_sent_total: AtomicU64,
    /// Serializes what changes which files are in place together with their
    /// records (publishing an upload, quarantine, gc), so a record and its
    /// file always appear and disappear as a pair.
    publish: tokio::sync::Mutex<()>,
}

/// How long a whole-file hash check vouches for an unchanged file: a burst
/// of downloads (a fan-out) hashes once, and silent corruption on the disk
/// (which changes no timestamp) is still caught within this time.
const VERIFIED_FOR: std::time::Duration = std::time::Duration::from_secs(600);

/// What identifies one version of a file: device, inode, size and change
/// time (seconds, nanoseconds).
type FileStamp = (u64, u64, u64, i64, i64);

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
    /// Opens the store in `dir` (created if missing) with records in `store`:
    /// deletes leftover temp files and reconciles files with records. Uploads
    /// larger than `max_size` bytes are refused.
    pub(crate) fn open(
        store: &Store,
        dir: PathBuf,
        max_size: u64,
        space: DataDir,
    ) -> Result<Artifacts, ArtifactError> {
        for d in [dir.clone(), dir.join(TMP_DIR), dir.join(QUARANTINE_DIR)] {
            std::fs::create_dir_all(&d).map_err(ArtifactError::io("create directory", &d))?;
        }
        let artifacts = Artifacts {
            inner: Arc::new(Inner {
                table: Table::open(store, trees::ARTIFACTS)?,
                dir,
                max_size,
                space,
                downloads: Mutex::new(HashMap::new()),
                verified: Mutex::new(HashMap::new()),
                downloads_total: AtomicU64::new(0),
                bytes_sent_total: AtomicU64::new(0),
                publish: tokio::sync::Mutex::new(()),
            }),
        };
        artifacts.clear_tmp()?;
        artifacts.reconcile()?;
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

    /// Makes files and records agree: a record whose file is missing is
    /// removed, a file without a record is deleted, a file whose size is not
    /// its record's is quarantined (its record removed).
    fn reconcile(&self) -> Result<(), ArtifactError> {
        let dir = &self.inner.dir;
        let mut files: HashMap<String, u64> = HashMap::new();
        let entries = std::fs::read_dir(dir).map_err(ArtifactError::io("list", dir))?;
        for entry in entries {
            let entry = entry.map_err(ArtifactError::io("list", dir))?;
            let path = entry.path();
            let meta = entry
                .metadata()
                .map_err(ArtifactError::io("inspect", &path))?;
            if meta.is_dir() {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            match name.strip_suffix(FILE_SUFFIX).map(normalize_sha256) {
                Some(Ok(sha)) if name == format!("{sha}{FILE_SUFFIX}") => {
                    files.insert(sha, meta.len());
                }
                _ => tracing::warn!(
                    "{} is not an artifact file (expected <sha256>{FILE_SUFFIX}); leaving it alone",
                    path.display()
                ),
            }
        }
        let table = &self.inner.table;
        let (mut kept, mut changed) = (0usize, false);
        for item in table.scan_raw("") {
            let (key, value) = item?;
            let key_text = String::from_utf8_lossy(&key).into_owned();
            // An unreadable record is dropped here rather than failing the
            // open: its file is then unrecorded and deleted below.
            let rec: ArtifactRecord = match table.decode(&key, &value) {
                Ok(rec) => rec,
                Err(e) => {
                    tracing::error!(
                        "{e}; removing the record (its file, if any, is deleted as unrecorded)"
                    );
                    table.remove(&key)?;
                    changed = true;
                    continue;
                }
            };
            let path = self.path_of(&key_text);
            match files.remove(&key_text) {
                None => {
                    tracing::warn!(
                        "artifact {key_text}: recorded but its file {} is missing; removing the record (a rebuild stores it again)",
                        path.display()
                    );
                    table.remove(&key)?;
                    changed = true;
                }
                Some(len) if len != rec.size => {
                    let dest = self.move_to_quarantine(&key_text)?;
                    tracing::error!(
                        "artifact {key_text}: file {} is {len} bytes but was stored with {}; moved it to {} and removed the record",
                        path.display(),
                        rec.size,
                        dest.display()
                    );
                    table.remove(&key)?;
                    changed = true;
                }
                Some(_) => kept += 1,
            }
        }
        for sha in files.keys() {
            let path = self.path_of(sha);
            tracing::warn!(
                "artifact file {} has no record (an upload interrupted before it was recorded?); deleting the file",
                path.display()
            );
            std::fs::remove_file(&path).map_err(ArtifactError::io("delete", &path))?;
        }
        if changed {
            table.store().flush_now()?;
        }
        tracing::info!(artifacts = kept, dir = %dir.display(), "artifact store open");
        Ok(())
    }

    /// Moves `<sha>.tar.zst` into `quarantine/` (kept for a post-mortem,
    /// never served again) and returns where it went.
    fn move_to_quarantine(&self, sha: &str) -> Result<PathBuf, ArtifactError> {
        let from = self.path_of(sha);
        let to = self
            .inner
            .dir
            .join(QUARANTINE_DIR)
            .join(format!("{sha}.{}{FILE_SUFFIX}", now_ms()));
        std::fs::rename(&from, &to).map_err(ArtifactError::io("quarantine", &from))?;
        Ok(to)
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

    /// Downloads served to the end and bytes sent, since the hub started.
    pub(crate) fn download_totals(&self) -> (u64, u64) {
        (
            self.inner.downloads_total.load(Ordering::Relaxed),
            self.inner.bytes_sent_total.load(Ordering::Relaxed),
        )
    }

    fn lock_verified(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, (FileStamp, std::time::Instant)>> {
        self.inner
            .verified
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
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

        let published = self.inner.publish.lock().await;
        if self.contains(&sha)? {
            // Another upload of the same bytes won the race; ours is dropped.
            return Ok(Received {
                sha256: sha,
                already_present: true,
            });
        }
        let path = self.path_of(&sha);
        tokio::fs::rename(&temp.path, &path)
            .await
            .map_err(ArtifactError::io("store", &path))?;
        temp.placed = true;
        sync_dir(&self.inner.dir).await?;
        // Hashed whole on the way in: the first downloads need not again.
        if let Ok(meta) = tokio::fs::metadata(&path).await {
            self.lock_verified()
                .insert(sha.clone(), (stamp_of(&meta), std::time::Instant::now()));
        }
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

    /// Starts sending artifact `sha` to `agent_id`. Unknown hashes fail here
    /// (before anything is sent). The receiver then yields the meta chunk
    /// (sha256, size), data chunks of [`DOWNLOAD_CHUNK_BYTES`], and, if the
    /// file turns out not to match its hash, a final [`ArtifactError::Corrupt`]
    /// (the file is then quarantined and its record removed). A download is
    /// counted for [`Artifacts::list`] once its last chunk was handed over.
    pub(crate) async fn download(
        &self,
        sha: &str,
        agent_id: &str,
    ) -> Result<mpsc::Receiver<Result<ArtifactChunk, ArtifactError>>, ArtifactError> {
        let sha = normalize_sha256(sha)?;
        let rec = self
            .get(&sha)?
            .ok_or_else(|| ArtifactError::NotFound(sha.clone()))?;
        let path = self.path_of(&sha);
        let file = match tokio::fs::File::open(&path).await {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.forget_missing(&sha).await?;
                return Err(ArtifactError::NotFound(sha));
            }
            Err(e) => return Err(ArtifactError::io("open", &path)(e)),
        };
        let meta = file
            .metadata()
            .await
            .map_err(ArtifactError::io("inspect", &path))?;
        let identity = (meta.dev(), meta.ino());
        if meta.len() != rec.size {
            tracing::error!(
                "artifact {sha}: {} is {} bytes but was stored with {}",
                path.display(),
                meta.len(),
                rec.size
            );
            self.quarantine(&sha, identity).await?;
            return Err(ArtifactError::Corrupt(sha));
        }
        let stamp = stamp_of(&meta);
        let trusted = self
            .lock_verified()
            .get(&sha)
            .is_some_and(|(known, at)| *known == stamp && at.elapsed() < VERIFIED_FOR);
        let (tx, rx) = mpsc::channel(DOWNLOAD_CHUNKS_IN_FLIGHT);
        let first = ArtifactChunk {
            meta: Some(ArtifactMeta {
                sha256: sha.clone(),
                size: rec.size,
                job: None,
                ..Default::default()
            }),
            data: Vec::new(),
        };
        // The channel is fresh and has room: this cannot wait.
        let _ = tx.send(Ok(first)).await;
        tokio::spawn(self.clone().send_file(
            sha,
            rec.size,
            file,
            (stamp, trusted),
            agent_id.to_string(),
            tx,
        ));
        Ok(rx)
    }

    /// Streams the file into `tx`, hashing as it goes unless this version
    /// of it (`stamp`) was verified whole before (`trusted`).
    async fn send_file(
        self,
        sha: String,
        size: u64,
        mut file: tokio::fs::File,
        (stamp, trusted): (FileStamp, bool),
        agent_id: String,
        tx: mpsc::Sender<Result<ArtifactChunk, ArtifactError>>,
    ) {
        let identity = (stamp.0, stamp.1);
        let path = self.path_of(&sha);
        let mut hasher = (!trusted).then(Sha256::new);
        let mut sent = 0u64;
        loop {
            let mut buf = vec![0u8; DOWNLOAD_CHUNK_BYTES];
            let n = match read_full(&mut file, &mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    let err = ArtifactError::io("read", &path)(e);
                    tracing::error!(agent = %agent_id, "artifact download failed: {err}");
                    let _ = tx.send(Err(err)).await;
                    return;
                }
            };
            if n == 0 {
                break;
            }
            buf.truncate(n);
            if let Some(h) = hasher.as_mut() {
                h.update(&buf);
            }
            sent += n as u64;
            self.inner
                .bytes_sent_total
                .fetch_add(n as u64, Ordering::Relaxed);
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
                "artifact {sha}: {} hashes to {got} ({sent} bytes read, {size} recorded): the file is corrupt",
                path.display()
            );
            if let Err(e) = self.quarantine(&sha, identity).await {
                tracing::error!("artifact {sha}: cannot quarantine the corrupt file: {e}");
            }
            let _ = tx.send(Err(ArtifactError::Corrupt(sha))).await;
            return;
        }
        if !trusted {
            self.lock_verified()
                .insert(sha.clone(), (stamp, std::time::Instant::now()));
        }
        *self
            .lock_downloads()
            .entry(sha.clone())
            .or_default()
            .entry(agent_id.clone())
            .or_default() += 1;
        self.inner.downloads_total.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(agent = %agent_id, sha = %sha, size, "artifact downloaded");
    }

    /// Takes a file found corrupt out of service: moved to `quarantine/`, its
    /// record removed (durably) so a rebuild can store the artifact again.
    /// `identity` (device, inode) is the file that was found corrupt: if a
    /// good copy replaced it meanwhile, nothing happens.
    async fn quarantine(&self, sha: &str, identity: (u64, u64)) -> Result<(), ArtifactError> {
        let _published = self.inner.publish.lock().await;
        let path = self.path_of(sha);
        match std::fs::metadata(&path) {
            Ok(m) if (m.dev(), m.ino()) == identity => {}
            _ => return Ok(()),
        }
        self.lock_verified().remove(sha);
        let dest = self.move_to_quarantine(sha)?;
        self.inner.table.remove(sha)?;
        self.inner.table.store().commit().await?;
        tracing::error!(
            "artifact {sha} did not match its hash: moved {} to {} and removed its record (a rebuild can store it again)",
            path.display(),
            dest.display()
        );
        Ok(())
    }

    /// A recorded artifact whose file vanished (someone deleted it by hand):
    /// the record goes too, so it reads as not stored.
    async fn forget_missing(&self, sha: &str) -> Result<(), ArtifactError> {
        let _published = self.inner.publish.lock().await;
        if self.path_of(sha).exists() {
            return Ok(());
        }
        tracing::error!(
            "artifact {sha}: recorded but its file {} is missing; removing the record (a rebuild stores it again)",
            self.path_of(sha).display()
        );
        self.inner.table.remove(sha)?;
        self.inner.table.store().commit().await?;
        Ok(())
    }

    /// Garbage collection: for each (upstream, platform) keeps the
    /// `keep_newest` most recently stored artifacts and every hash in
    /// `referenced` (lowercase hex; e.g. what projects' last results still
    /// test against);
    /// deletes the rest, records first (durably), then files. Ad-hoc uploads
    /// (no upstream) form their own group. Returns the deleted hashes.
    pub(crate) async fn gc(
        &self,
        keep_newest: u32,
        referenced: &HashSet<String>,
    ) -> Result<Vec<String>, ArtifactError> {
        let _published = self.inner.publish.lock().await;
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
        let mut batch = sled::Batch::default();
        for sha in &victims {
            batch.remove(sha.as_bytes());
        }
        self.inner.table.apply(batch)?;
        self.inner.table.store().commit().await?;
        for sha in &victims {
            let path = self.path_of(sha);
            match tokio::fs::remove_file(&path).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                // Unrecorded now: the next start deletes it.
                Err(e) => tracing::warn!("artifact gc: cannot delete {}: {e}", path.display()),
            }
        }
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

    fn open(dir: &Path) -> (Store, Artifacts) {
        with_store(dir, Store::open(&dir.join("db")).unwrap())
    }

    /// [`open`] again once the previous store let go of the database.
    async fn reopen(dir: &Path) -> (Store, Artifacts) {
        with_store(dir, crate::store::tests::reopen(&dir.join("db")).await)
    }

    fn with_store(dir: &Path, store: Store) -> (Store, Artifacts) {
        let a = Artifacts::open(
            &store,
            dir.join("artifacts"),
            MAX_BYTES,
            DataDir::new(dir, 0),
        )
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
        let a = Artifacts::open(&store, dir.path().join("artifacts"), MAX_BYTES, space).unwrap();
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
        let mut rx = a.download(sha, agent).await?;
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
        let (_store, a) = open(dir.path());
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
        let err = a.download(&unknown, "ag_2").await.unwrap_err();
        assert!(matches!(err, ArtifactError::NotFound(_)), "{err}");
        assert!(err.to_string().contains("garbage-collected"));
    }

    #[tokio::test]
    async fn records_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let sha = {
            let (_store, a) = open(dir.path());
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
            let (store, a) = open(dir.path());
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
        let (_store, a) = open(dir.path());
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
        let (_store, a) = open(dir.path());
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
        let (_store, a) = open(dir.path());
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
        let (_store, a) = open(dir.path());
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
        let (_store, a) = open(dir.path());
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
        let (_store, a) = open(dir.path());
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
            let (_store, a) = open(dir.path());
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
        let a = Artifacts::open(&store, art.clone(), MAX_BYTES, DataDir::new(&art, 0)).unwrap();
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
        let (_store, a) = open(dir.path());
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
        let err = a.download(&sha, "ag_2").await.unwrap_err();
        assert!(matches!(err, ArtifactError::Corrupt(_)), "{err}");
        assert!(!a.contains(&sha).unwrap());
    }

    #[tokio::test]
    async fn a_verified_file_replaced_behind_the_stores_back_is_hashed_again() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, a) = open(dir.path());
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
