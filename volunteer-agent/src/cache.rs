//! The artifact cache: runtime artifacts downloaded from the hub, kept by
//! SHA-256 so that each crosses the network once per machine.
//!
//! Files live in one directory as `<sha256>.tar.zst` (by default
//! `<state_dir>/cache/artifacts`). A download is written to a temporary file
//! in that directory while it is hashed, checked against the size and hash
//! the hub announced, synced and only then renamed into place: a file with
//! an artifact's name is always that artifact. A download that fails
//! verification is deleted and fetched once more; a second failure means the
//! hub's copy is bad.
//!
//! The agent asks with `accepts_url`: a hub keeping its artifacts in an
//! object store then answers with a presigned URL, and the bytes come from
//! there, checked the same way. A URL that cannot be fetched (no route,
//! refused, expired, any HTTP error) costs nothing but a line in the log: the
//! agent asks again without `accepts_url` and the hub streams the bytes
//! itself; for the next 10 minutes downloads ask without `accepts_url`
//! (an unreachable store would cost a connect timeout each time). Bytes from a URL that do not match are reported to the hub
//! (`url_bytes_corrupt`), which checks its copy and quarantines it or streams
//! it.
//!
//! The total size is capped: before a download starts, the least recently
//! used files are deleted until it fits, but never one a running job holds a
//! [`Lease`] on. Using a file touches its modification time, so the order
//! survives a restart. Two jobs asking for the same artifact at once share
//! one download (a lock per hash).

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt as _;
use tokio::time::Instant;
use tokio_stream::StreamExt as _;
use tonic::{Code, Status};
use trunkfarm_proto::settings::fmt_bytes;
use trunkfarm_proto::v1::{ArtifactChunk, DownloadArtifactRequest};

use crate::fsutil;
use crate::state;
use crate::transfer::{ArtifactHub, BodyStream, ChunkStream};

/// How long a download may go without receiving anything before it is
/// abandoned (the job's own timeout bounds the whole download).
const DOWNLOAD_STALL_TIMEOUT: Duration = Duration::from_secs(120);

/// After an object store URL failed, how long downloads go through the hub
/// without asking for a URL.
const URL_RETRY_AFTER: Duration = Duration::from_secs(600);

/// The file name suffix of cached artifacts.
const SUFFIX: &str = ".tar.zst";

/// The first 12 hex digits of a hash, as logs and messages show it.
pub(crate) fn short(sha256: &str) -> &str {
    sha256.get(..12).unwrap_or(sha256)
}

/// Checks that `sha256` is a SHA-256 in hex and returns it in lowercase (the
/// form file names and the hub use). `Err` says what is wrong.
pub(crate) fn parse_sha256(sha256: &str) -> Result<String, String> {
    if sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(sha256.to_ascii_lowercase())
    } else {
        Err(format!(
            "{:?} is not a SHA-256; expected 64 hex characters",
            sha256.chars().take(80).collect::<String>()
        ))
    }
}

/// Why an artifact could not be provided.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CacheError {
    /// The job named something that is not a SHA-256.
    #[error("invalid artifact_sha256: {0}")]
    InvalidSha(String),
    /// The hub does not have the artifact.
    #[error(
        "the hub has no artifact {sha256} ({message}); it may have been deleted on the hub after \
         the job was queued"
    )]
    NotOnHub {
        /// The full hash.
        sha256: String,
        /// The hub's message.
        message: String,
    },
    /// The download RPC failed (hub unreachable, refused, broken stream).
    #[error("downloading artifact {sha12} from the hub failed: {}", describe(.status))]
    Download {
        /// The hash, shortened.
        sha12: String,
        /// The call's status.
        status: Status,
    },
    /// Nothing arrived for [`DOWNLOAD_STALL_TIMEOUT`].
    #[error(
        "downloading artifact {sha12} from the hub stalled: nothing arrived for {}s",
        DOWNLOAD_STALL_TIMEOUT.as_secs()
    )]
    Stalled {
        /// The hash, shortened.
        sha12: String,
    },
    /// The hub's answer made no sense.
    #[error("the hub broke the download protocol for artifact {sha12}: {what}")]
    Protocol {
        /// The hash, shortened.
        sha12: String,
        /// What was wrong.
        what: String,
    },
    /// Two downloads in a row did not match the hash or size announced.
    #[error(
        "artifact {sha12} failed verification twice ({why}): the hub's copy is corrupt or was \
         tampered with; the hub's operator should check it"
    )]
    Verification {
        /// The hash, shortened.
        sha12: String,
        /// What did not match the second time.
        why: String,
    },
    /// The artifact alone is larger than the cache may hold.
    #[error(
        "artifact {sha12} is {}, more than this agent's cache may hold ({}); raise [cache] size \
         in agent.toml to run this job here",
        fmt_bytes(*.size_bytes),
        fmt_bytes(*.cap_bytes)
    )]
    TooBig {
        /// The hash, shortened.
        sha12: String,
        /// Its size.
        size_bytes: u64,
        /// The cache's cap.
        cap_bytes: u64,
    },
    /// Running jobs hold so much of the cache that the artifact does not fit.
    #[error(
        "no room in the artifact cache for {sha12} ({}): running jobs hold {} of its {}; raise \
         [cache] size in agent.toml or lower max_parallel_jobs",
        fmt_bytes(*.size_bytes),
        fmt_bytes(*.busy_bytes),
        fmt_bytes(*.cap_bytes)
    )]
    NoRoom {
        /// The hash, shortened.
        sha12: String,
        /// Its size.
        size_bytes: u64,
        /// Bytes held by leases and downloads in progress.
        busy_bytes: u64,
        /// The cache's cap.
        cap_bytes: u64,
    },
    /// A local file operation failed (disk full, permissions).
    #[error("cannot {what} {}: {source}", .path.display())]
    Io {
        /// What the agent was doing.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

impl CacheError {
    /// Whether the hub could not be reached or went away mid-download (it
    /// restarts, or the network is down): worth asking again once it is
    /// back (a download changes nothing).
    pub(crate) fn hub_unreachable(&self) -> bool {
        match self {
            CacheError::Download { status, .. } => crate::transfer::hub_unreachable(status),
            CacheError::Stalled { .. } => true,
            _ => false,
        }
    }
}

/// A status as a message says it: its code, and its message if it has one.
fn describe(status: &Status) -> String {
    if status.message().is_empty() {
        format!("{:?}", status.code())
    } else {
        format!("{:?}: {}", status.code(), status.message())
    }
}

/// How a leased artifact got into the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// It was already there.
    Cached,
    /// It was just downloaded.
    Downloaded {
        /// Its size.
        bytes: u64,
        /// How long the download took.
        took: Duration,
    },
}

/// A cached artifact in use by a job: while the lease lives, the file is not
/// evicted.
#[derive(Debug)]
pub(crate) struct Lease {
    /// The cache.
    inner: Arc<Inner>,
    /// The artifact's hash (lowercase hex).
    sha256: String,
    /// Its file.
    path: PathBuf,
    /// How it got here.
    source: Source,
}

impl Lease {
    /// The artifact's file (read it; never modify it).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The artifact's SHA-256, lowercase hex.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Whether it was cached or downloaded for this lease.
    pub fn source(&self) -> Source {
        self.source
    }

    /// The file turned out corrupt (it no longer hashes to its name): remove
    /// it, so the next job downloads it again.
    pub fn discard(self) {
        let mut index = self.inner.index();
        if let Some(entry) = index.entries.remove(&self.sha256) {
            index.total_bytes = index.total_bytes.saturating_sub(entry.size_bytes);
        }
        drop(index);
        if let Err(e) = std::fs::remove_file(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), "cannot delete a corrupt cached artifact: {e}");
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut index = self.inner.index();
        if let Some(entry) = index.entries.get_mut(&self.sha256) {
            entry.in_use = entry.in_use.saturating_sub(1);
        }
    }
}

/// The artifact cache; cheap to clone (all clones share one cache).
#[derive(Debug, Clone)]
pub(crate) struct ArtifactCache {
    /// The shared state.
    inner: Arc<Inner>,
}

/// What the clones of a cache share.
#[derive(Debug)]
struct Inner {
    /// Where the files are.
    dir: PathBuf,
    /// The most bytes the files may take.
    cap_bytes: u64,
    /// What is cached and what is in use.
    index: Mutex<Index>,
    /// One lock per hash being looked up or downloaded.
    locks: Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
    /// Downloads completed since the agent started.
    downloads: AtomicU64,
    /// Set once an object store URL failed: the first fallback is a
    /// warning, later ones (every download, if this agent cannot reach the
    /// store) are only logged at debug level.
    url_fallback_warned: std::sync::atomic::AtomicBool,
    /// Until when downloads do not ask for an object store URL: one failed
    /// (this agent cannot reach the store), and trying every download would
    /// cost a connect timeout each time.
    urls_failing_until: Mutex<Option<Instant>>,
}

/// The cache's bookkeeping.
#[derive(Debug, Default)]
struct Index {
    /// Cached files by hash.
    entries: HashMap<String, Entry>,
    /// Their total size.
    total_bytes: u64,
    /// Room promised to downloads in progress.
    reserved_bytes: u64,
    /// Increases with every use: the LRU clock.
    tick: u64,
}

/// One cached file.
#[derive(Debug)]
struct Entry {
    /// Its size.
    size_bytes: u64,
    /// The tick of its last use.
    last_used: u64,
    /// Leases on it.
    in_use: u32,
}

impl Index {
    /// The next tick of the LRU clock.
    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// The least recently used entry nobody holds, if any.
    fn victim(&self) -> Option<String> {
        self.entries
            .iter()
            .filter(|(_, e)| e.in_use == 0)
            .min_by_key(|(_, e)| e.last_used)
            .map(|(sha, _)| sha.clone())
    }
}

impl Inner {
    /// The index, even if a panicking thread poisoned its lock (the data is
    /// plain counters, still consistent enough to go on).
    fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The file of `sha256`.
    fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}{SUFFIX}"))
    }

    /// Removes the entry `sha` (which nobody holds) and its file; called with
    /// the index locked.
    fn evict(&self, index: &mut Index, sha: &str, why: &str) {
        let Some(entry) = index.entries.remove(sha) else {
            return;
        };
        index.total_bytes = index.total_bytes.saturating_sub(entry.size_bytes);
        let path = self.path(sha);
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::info!(
                "evicted artifact {} ({}) from the cache {why}",
                short(sha),
                fmt_bytes(entry.size_bytes)
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(
                path = %path.display(),
                "cannot delete an evicted artifact: {e}"
            ),
        }
    }
}

/// Room promised to one download; given back when dropped unless the
/// download was stored.
struct Reservation {
    /// The cache.
    inner: Arc<Inner>,
    /// Bytes promised.
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0 {
            let mut index = self.inner.index();
            index.reserved_bytes = index.reserved_bytes.saturating_sub(self.bytes);
        }
    }
}

/// A download's temporary file, deleted when dropped unless renamed into place.
struct TempFile {
    /// The file; `None` once renamed.
    path: Option<PathBuf>,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// How one download attempt ended, when it did not succeed.
enum Failure {
    /// The data did not match what was announced: worth one more try.
    Mismatch(String),
    /// The bytes from the object store URL did not match: the hub is told
    /// (`url_bytes_corrupt`) on the next ask.
    UrlMismatch(String),
    /// The object store URL gave no (complete) answer: the next ask goes
    /// through the hub.
    UrlFailed(String),
    /// Anything else: give up.
    Fatal(CacheError),
}

/// Where the bytes of one download attempt come from.
enum Bytes {
    /// The hub's stream, after its metadata chunk.
    Hub(ChunkStream),
    /// The object store URL the hub handed out.
    Url(BodyStream),
}

impl Bytes {
    /// The next piece; `None` at the end. Waits at most
    /// [`DOWNLOAD_STALL_TIMEOUT`].
    async fn next(&mut self, sha12: &str) -> Result<Option<Vec<u8>>, Failure> {
        match self {
            Bytes::Hub(stream) => Ok(next_chunk(stream, sha12).await?.map(|c| c.data)),
            Bytes::Url(body) => {
                match tokio::time::timeout(DOWNLOAD_STALL_TIMEOUT, body.next()).await {
                    Err(_) => Err(Failure::UrlFailed(format!(
                        "nothing arrived for {}s",
                        DOWNLOAD_STALL_TIMEOUT.as_secs()
                    ))),
                    Ok(None) => Ok(None),
                    Ok(Some(Ok(data))) => Ok(Some(data)),
                    Ok(Some(Err(e))) => Err(Failure::UrlFailed(e.to_string())),
                }
            }
        }
    }

    /// The mismatch of these bytes, as a [`Failure`] of their source.
    fn mismatch(&self, why: String) -> Failure {
        match self {
            Bytes::Hub(_) => Failure::Mismatch(why),
            Bytes::Url(_) => Failure::UrlMismatch(why),
        }
    }
}

impl From<CacheError> for Failure {
    fn from(e: CacheError) -> Self {
        Failure::Fatal(e)
    }
}

impl ArtifactCache {
    /// Opens (creating it, 0700) the cache in `dir`, capped at `cap_bytes`.
    /// Files already there are kept, least recently used first by their
    /// modification time; leftover temporary files are deleted, and if the
    /// cap shrank, the oldest files go until the rest fits.
    pub fn open(dir: PathBuf, cap_bytes: u64) -> Result<Self, CacheError> {
        let io_err = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| CacheError::Io { what, path, source }
        };
        state::create_private_dir(&dir).map_err(io_err("create the cache directory", &dir))?;
        let mut found: Vec<(SystemTime, String, u64)> = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io_err("read the cache directory", &dir))? {
            let entry = entry.map_err(io_err("read the cache directory", &dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if state::is_temp_file(&name) {
                let _ = std::fs::remove_file(entry.path());
                continue;
            }
            let Some(sha) = name
                .strip_suffix(SUFFIX)
                .filter(|s| parse_sha256(s).as_deref() == Ok(*s))
            else {
                tracing::debug!(path = %entry.path().display(), "ignoring a file the cache did not write");
                continue;
            };
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_file() {
                let used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                found.push((used, sha.to_owned(), meta.len()));
            }
        }
        found.sort();
        let mut index = Index::default();
        for (_, sha, size_bytes) in found {
            let last_used = index.next_tick();
            index.total_bytes += size_bytes;
            index.entries.insert(
                sha,
                Entry {
                    size_bytes,
                    last_used,
                    in_use: 0,
                },
            );
        }
        let inner = Arc::new(Inner {
            dir,
            cap_bytes,
            index: Mutex::new(Index::default()),
            locks: Mutex::new(HashMap::new()),
            downloads: AtomicU64::new(0),
            url_fallback_warned: std::sync::atomic::AtomicBool::new(false),
            urls_failing_until: Mutex::new(None),
        });
        while index.total_bytes > cap_bytes {
            let Some(victim) = index.victim() else { break };
            inner.evict(&mut index, &victim, "to fit the configured [cache] size");
        }
        *inner.index() = index;
        Ok(ArtifactCache { inner })
    }

    /// The cache's directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Downloads completed since the agent started.
    pub fn downloads(&self) -> u64 {
        self.inner.downloads.load(Ordering::Relaxed)
    }

    /// Bytes the cached files take.
    pub fn cached_bytes(&self) -> u64 {
        self.inner.index().total_bytes
    }

    /// True if the artifact `sha256` (lowercase hex) is cached.
    #[cfg(test)]
    pub fn contains(&self, sha256: &str) -> bool {
        self.inner.index().entries.contains_key(sha256)
    }

    /// The artifact `sha256`, from the cache or downloaded from `hub` (and
    /// then cached), held until the lease is dropped. Concurrent calls for
    /// the same hash share one download. A download that fails verification
    /// is fetched once more.
    pub async fn get(&self, sha256: &str, hub: &dyn ArtifactHub) -> Result<Lease, CacheError> {
        let sha = parse_sha256(sha256).map_err(CacheError::InvalidSha)?;
        let lock = self.lock_for(&sha);
        let _guard = lock.lock().await;
        if let Some(lease) = self.lease_cached(&sha) {
            return Ok(lease);
        }
        let mut ask = DownloadArtifactRequest {
            sha256: sha.clone(),
            accepts_url: !self.urls_failing(),
            url_bytes_corrupt: false,
        };
        let mut attempt = 1;
        loop {
            match self.download(&sha, hub, ask.clone()).await {
                Ok(lease) => return Ok(lease),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::UrlFailed(why)) => {
                    let first = !self.inner.url_fallback_warned.swap(true, Ordering::Relaxed);
                    *self
                        .inner
                        .urls_failing_until
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner) =
                        Some(Instant::now() + URL_RETRY_AFTER);
                    let text = format!(
                        "cannot download artifact {} from the hub's object store ({why}); \
                         downloading it and others for the next {} through the hub instead",
                        short(&sha),
                        humantime::format_duration(URL_RETRY_AFTER)
                    );
                    if first {
                        tracing::warn!("{text} (later fallbacks are logged at debug level)");
                    } else {
                        tracing::debug!("{text}");
                    }
                    ask.accepts_url = false;
                }
                Err(Failure::UrlMismatch(why)) => {
                    tracing::warn!(
                        "artifact {} from the hub's object store failed verification ({why}); \
                         deleted it, telling the hub and downloading it through the hub",
                        short(&sha)
                    );
                    ask.accepts_url = false;
                    ask.url_bytes_corrupt = true;
                }
                Err(Failure::Mismatch(why)) => {
                    tracing::warn!(
                        "downloaded artifact {} failed verification ({why}); deleted it{}",
                        short(&sha),
                        if attempt == 1 {
                            ", fetching it again"
                        } else {
                            ""
                        }
                    );
                    if attempt == 2 {
                        return Err(CacheError::Verification {
                            sha12: short(&sha).to_owned(),
                            why,
                        });
                    }
                    attempt += 1;
                    ask.url_bytes_corrupt = false;
                }
            }
        }
    }

    /// Whether an object store URL failed within [`URL_RETRY_AFTER`].
    fn urls_failing(&self) -> bool {
        self.inner
            .urls_failing_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|until| Instant::now() < until)
    }

    /// The lock serializing lookups and downloads of `sha`.
    fn lock_for(&self, sha: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self
            .inner
            .locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(lock) = locks.get(sha).and_then(Weak::upgrade) {
            return lock;
        }
        locks.retain(|_, weak| weak.strong_count() > 0);
        let lock = Arc::new(tokio::sync::Mutex::new(()));
        locks.insert(sha.to_owned(), Arc::downgrade(&lock));
        lock
    }

    /// A lease on `sha` if it is cached (and its file still exists).
    fn lease_cached(&self, sha: &str) -> Option<Lease> {
        let path = self.inner.path(sha);
        let mut index = self.inner.index();
        let size_bytes = index.entries.get(sha)?.size_bytes;
        if !std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file()) {
            // Deleted behind the agent's back: forget it.
            index.entries.remove(sha);
            index.total_bytes = index.total_bytes.saturating_sub(size_bytes);
            return None;
        }
        let tick = index.next_tick();
        if let Some(entry) = index.entries.get_mut(sha) {
            entry.last_used = tick;
            entry.in_use += 1;
        }
        drop(index);
        touch(&path);
        Some(Lease {
            inner: self.inner.clone(),
            sha256: sha.to_owned(),
            path,
            source: Source::Cached,
        })
    }

    /// Promises `size` bytes to a download of `sha`, evicting the least
    /// recently used files nobody holds until it fits.
    fn reserve(&self, sha: &str, size: u64) -> Result<Reservation, CacheError> {
        let cap = self.inner.cap_bytes;
        if size > cap {
            return Err(CacheError::TooBig {
                sha12: short(sha).to_owned(),
                size_bytes: size,
                cap_bytes: cap,
            });
        }
        let mut index = self.inner.index();
        loop {
            let used = index.total_bytes + index.reserved_bytes;
            if used.saturating_add(size) <= cap {
                index.reserved_bytes += size;
                return Ok(Reservation {
                    inner: self.inner.clone(),
                    bytes: size,
                });
            }
            match index.victim() {
                Some(victim) => self.inner.evict(
                    &mut index,
                    &victim,
                    &format!("to make room for {}", short(sha)),
                ),
                None => {
                    return Err(CacheError::NoRoom {
                        sha12: short(sha).to_owned(),
                        size_bytes: size,
                        busy_bytes: used,
                        cap_bytes: cap,
                    });
                }
            }
        }
    }

    /// One download of `sha` into the cache, asked for as `ask` says.
    async fn download(
        &self,
        sha: &str,
        hub: &dyn ArtifactHub,
        ask: DownloadArtifactRequest,
    ) -> Result<Lease, Failure> {
        let sha12 = short(sha).to_owned();
        let started = Instant::now();
        let status = |status: Status| {
            if status.code() == Code::NotFound {
                CacheError::NotOnHub {
                    sha256: sha.to_owned(),
                    message: status.message().to_owned(),
                }
            } else {
                CacheError::Download {
                    sha12: sha12.clone(),
                    status,
                }
            }
        };
        let accepts_url = ask.accepts_url;
        let mut stream = tokio::time::timeout(DOWNLOAD_STALL_TIMEOUT, hub.download(ask))
            .await
            .map_err(|_| CacheError::Stalled {
                sha12: sha12.clone(),
            })?
            .map_err(status)?;
        let protocol = |what: &str| CacheError::Protocol {
            sha12: sha12.clone(),
            what: what.to_owned(),
        };
        let first = next_chunk(&mut stream, &sha12)
            .await?
            .ok_or_else(|| protocol("the hub ended the download before sending anything"))?;
        let meta = first
            .meta
            .clone()
            .ok_or_else(|| protocol("its first message carried no metadata"))?;
        if !meta.sha256.eq_ignore_ascii_case(sha) {
            return Err(protocol(&format!(
                "the hub announced artifact {:?} instead",
                meta.sha256
            ))
            .into());
        }
        let reservation = self.reserve(sha, meta.size)?;
        let mut first = Some(first);
        let mut bytes = if meta.url.is_empty() {
            Bytes::Hub(stream)
        } else if !accepts_url {
            return Err(protocol("it sent a URL to a request that did not accept one").into());
        } else {
            if next_chunk(&mut stream, &sha12).await?.is_some() {
                return Err(protocol("it sent data after a URL").into());
            }
            // The meta chunk carried no data: nothing of it is written.
            first = None;
            let body = hub.fetch_url(&meta.url).await.map_err(|e| {
                let expired =
                    meta.url_expires_ms > 0 && meta.url_expires_ms < crate::lock::now_ms();
                Failure::UrlFailed(if expired {
                    format!("{e}; the URL had expired")
                } else {
                    e.to_string()
                })
            })?;
            Bytes::Url(body)
        };
        let progress = crate::donor::Download::start(&sha12, meta.size);

        let dir = &self.inner.dir;
        let tmp_path = dir.join(format!(
            ".{sha}.{}.{}.tmp",
            std::process::id(),
            fastrand::u64(..)
        ));
        let io_err = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| Failure::Fatal(CacheError::Io { what, path, source })
        };
        let std_file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp_path)
            .map_err(io_err("create", &tmp_path))?;
        let mut tmp = TempFile {
            path: Some(tmp_path.clone()),
        };
        let mut file = tokio::fs::File::from_std(std_file);
        let mut hasher = Sha256::new();
        let mut received = 0u64;
        let mut piece = first.map(|c| c.data);
        if piece.is_none() {
            piece = bytes.next(&sha12).await?;
        }
        while let Some(data) = piece {
            received += data.len() as u64;
            if received > meta.size {
                return Err(bytes.mismatch(format!(
                    "more than the {} the hub announced arrived",
                    fmt_bytes(meta.size)
                )));
            }
            hasher.update(&data);
            progress.advance(data.len() as u64);
            file.write_all(&data)
                .await
                .map_err(io_err("write", &tmp_path))?;
            piece = bytes.next(&sha12).await?;
        }
        if received != meta.size {
            return Err(bytes.mismatch(format!(
                "received {received} bytes of the {} announced",
                meta.size
            )));
        }
        let got = hex::encode(hasher.finalize());
        if got != sha {
            return Err(bytes.mismatch(format!("its SHA-256 is {got}")));
        }
        file.flush().await.map_err(io_err("write", &tmp_path))?;
        file.sync_all().await.map_err(io_err("sync", &tmp_path))?;
        drop(file);
        let path = self.inner.path(sha);
        std::fs::rename(&tmp_path, &path).map_err(io_err("store the download as", &path))?;
        tmp.path = None;
        fsutil::sync_dir(dir);

        let took = started.elapsed();
        {
            let mut index = self.inner.index();
            index.reserved_bytes = index.reserved_bytes.saturating_sub(reservation.bytes);
            let last_used = index.next_tick();
            let old = index.entries.insert(
                sha.to_owned(),
                Entry {
                    size_bytes: meta.size,
                    last_used,
                    in_use: 1,
                },
            );
            index.total_bytes += meta.size;
            if let Some(old) = old {
                index.total_bytes = index.total_bytes.saturating_sub(old.size_bytes);
            }
        }
        let mut reservation = reservation;
        reservation.bytes = 0;
        let downloads = self.inner.downloads.fetch_add(1, Ordering::Relaxed) + 1;
        progress.done(took);
        tracing::info!(
            downloads,
            "downloaded artifact {sha12} ({} in {})",
            fmt_bytes(meta.size),
            humantime::format_duration(Duration::from_millis(
                u64::try_from(took.as_millis()).unwrap_or(u64::MAX)
            ))
        );
        Ok(Lease {
            inner: self.inner.clone(),
            sha256: sha.to_owned(),
            path,
            source: Source::Downloaded {
                bytes: meta.size,
                took,
            },
        })
    }
}

/// The next chunk of a download; `None` at its end.
async fn next_chunk(
    stream: &mut ChunkStream,
    sha12: &str,
) -> Result<Option<ArtifactChunk>, Failure> {
    match tokio::time::timeout(DOWNLOAD_STALL_TIMEOUT, stream.next()).await {
        Err(_) => Err(Failure::Fatal(CacheError::Stalled {
            sha12: sha12.to_owned(),
        })),
        Ok(None) => Ok(None),
        Ok(Some(Ok(chunk))) => Ok(Some(chunk)),
        Ok(Some(Err(status))) => Err(Failure::Fatal(CacheError::Download {
            sha12: sha12.to_owned(),
            status,
        })),
    }
}

/// Sets `path`'s modification time to now (best effort): the LRU order
/// across restarts.
fn touch(path: &Path) {
    if let Ok(file) = std::fs::File::open(path) {
        let _ = file.set_modified(SystemTime::now());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::SeqCst;

    use super::*;
    use crate::transfer::fake::FakeHub;

    /// A cache capped at `cap` bytes in a fresh directory.
    fn cache(cap: u64) -> (tempfile::TempDir, ArtifactCache) {
        let dir = tempfile::tempdir().unwrap();
        let cache = ArtifactCache::open(dir.path().join("artifacts"), cap).unwrap();
        (dir, cache)
    }

    /// The names in the cache directory, sorted.
    fn files(cache: &ArtifactCache) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(cache.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn downloads_once_then_serves_from_the_cache() {
        let hub = FakeHub::default();
        let sha = hub.add(b"runtime bytes".repeat(300));
        let (_dir, cache) = cache(1 << 20);
        let lease = cache.get(&sha.to_uppercase(), &hub).await.unwrap();
        assert!(matches!(
            lease.source(),
            Source::Downloaded { bytes: 3900, .. }
        ));
        assert_eq!(lease.sha256(), sha);
        assert_eq!(
            std::fs::read(lease.path()).unwrap(),
            b"runtime bytes".repeat(300)
        );
        drop(lease);
        let lease = cache.get(&sha, &hub).await.unwrap();
        assert_eq!(lease.source(), Source::Cached);
        assert_eq!(hub.downloads.load(SeqCst), 1);
        assert_eq!(cache.downloads(), 1);
        assert_eq!(cache.cached_bytes(), 3900);
        assert_eq!(files(&cache), [format!("{sha}.tar.zst")]);
    }

    #[tokio::test]
    async fn least_recently_used_goes_first_and_the_cap_holds() {
        let hub = FakeHub::default();
        let a = hub.add(vec![b'a'; 40]);
        let b = hub.add(vec![b'b'; 40]);
        let c = hub.add(vec![b'c'; 40]);
        let (_dir, cache) = cache(100);
        drop(cache.get(&a, &hub).await.unwrap());
        drop(cache.get(&b, &hub).await.unwrap());
        // Using `a` again makes `b` the least recently used.
        drop(cache.get(&a, &hub).await.unwrap());
        drop(cache.get(&c, &hub).await.unwrap());
        assert!(cache.contains(&a));
        assert!(!cache.contains(&b));
        assert!(cache.contains(&c));
        assert_eq!(cache.cached_bytes(), 80);
        assert_eq!(files(&cache).len(), 2);
        // `b` again evicts `a` (now the oldest).
        drop(cache.get(&b, &hub).await.unwrap());
        assert!(!cache.contains(&a));
        assert!(cache.contains(&b) && cache.contains(&c));
        assert!(cache.cached_bytes() <= 100);
        assert_eq!(hub.downloads.load(SeqCst), 4);
    }

    #[tokio::test]
    async fn a_file_in_use_is_never_evicted() {
        let hub = FakeHub::default();
        let a = hub.add(vec![b'a'; 40]);
        let b = hub.add(vec![b'b'; 40]);
        let c = hub.add(vec![b'c'; 40]);
        let (_dir, cache) = cache(100);
        let lease_a = cache.get(&a, &hub).await.unwrap();
        let lease_b = cache.get(&b, &hub).await.unwrap();
        let e = cache.get(&c, &hub).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "no room in the artifact cache for {} (40 B): running jobs hold 80 B of its 100 B; \
                 raise [cache] size in agent.toml or lower max_parallel_jobs",
                &c[..12]
            )
        );
        assert!(lease_a.path().exists() && lease_b.path().exists());
        // Releasing `b` (the newer) lets it go, not the held `a`.
        drop(lease_b);
        let lease_c = cache.get(&c, &hub).await.unwrap();
        assert!(cache.contains(&a) && !cache.contains(&b));
        assert!(lease_a.path().exists() && lease_c.path().exists());
    }

    #[tokio::test]
    async fn an_artifact_larger_than_the_cache_is_refused() {
        let hub = FakeHub::default();
        let big = hub.add(vec![0; 200]);
        let (_dir, cache) = cache(100);
        let e = cache.get(&big, &hub).await.unwrap_err();
        assert!(matches!(e, CacheError::TooBig { .. }), "{e}");
        assert!(e.to_string().contains("raise [cache] size"), "{e}");
        assert!(files(&cache).is_empty());
    }

    #[tokio::test]
    async fn concurrent_requests_share_one_download() {
        let hub = Arc::new(FakeHub::default());
        *hub.delay.lock().unwrap() = Duration::from_millis(200);
        let sha = hub.add(vec![7; 5000]);
        let (_dir, cache) = cache(1 << 20);
        let mut tasks = Vec::new();
        for _ in 0..5 {
            let (cache, hub, sha) = (cache.clone(), hub.clone(), sha.clone());
            tasks.push(tokio::spawn(async move {
                let lease = cache.get(&sha, &*hub).await.unwrap();
                std::fs::read(lease.path()).unwrap()
            }));
        }
        for task in tasks {
            assert_eq!(task.await.unwrap(), vec![7; 5000]);
        }
        assert_eq!(hub.downloads.load(SeqCst), 1);
        assert_eq!(cache.downloads(), 1);
    }

    #[tokio::test]
    async fn a_corrupt_download_is_fetched_again_once() {
        let hub = FakeHub::default();
        let sha = hub.add(vec![1; 3000]);
        let (_dir, cache) = cache(1 << 20);
        hub.corrupt_next.store(1, SeqCst);
        let lease = cache.get(&sha, &hub).await.unwrap();
        assert_eq!(std::fs::read(lease.path()).unwrap(), vec![1; 3000]);
        assert_eq!(hub.downloads.load(SeqCst), 2);
        assert_eq!(files(&cache), [format!("{sha}.tar.zst")]);
    }

    #[tokio::test]
    async fn two_corrupt_downloads_fail_verification_and_cache_nothing() {
        let hub = FakeHub::default();
        let sha = hub.add(vec![1; 3000]);
        let (_dir, cache) = cache(1 << 20);
        hub.corrupt_next.store(2, SeqCst);
        let e = cache.get(&sha, &hub).await.unwrap_err();
        assert!(matches!(e, CacheError::Verification { .. }), "{e}");
        let text = e.to_string();
        assert!(text.contains("failed verification twice"), "{text}");
        assert!(text.contains("corrupt or was tampered with"), "{text}");
        assert_eq!(hub.downloads.load(SeqCst), 2);
        assert!(files(&cache).is_empty(), "{:?}", files(&cache));
        assert_eq!(cache.cached_bytes(), 0);
        // The reservations were given back: a good download fits again.
        let lease = cache.get(&sha, &hub).await.unwrap();
        assert!(lease.path().exists());
    }

    #[tokio::test]
    async fn a_hub_with_an_object_store_hands_out_a_url_and_the_bytes_come_from_it() {
        let hub = FakeHub::default();
        hub.serve_urls.store(true, SeqCst);
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let sha = hub.add(data.clone());
        let (_dir, cache) = cache(1 << 20);
        let lease = cache.get(&sha, &hub).await.unwrap();
        assert!(matches!(
            lease.source(),
            Source::Downloaded { bytes: 5000, .. }
        ));
        assert_eq!(std::fs::read(lease.path()).unwrap(), data);
        assert_eq!(hub.requests(), [(true, false)]);
        assert_eq!(hub.url_fetches.load(SeqCst), 1);
        drop(lease);
        // One download per agent per hash: the cache answers the next ask.
        assert_eq!(
            cache.get(&sha, &hub).await.unwrap().source(),
            Source::Cached
        );
        assert_eq!(hub.url_fetches.load(SeqCst), 1);
        assert_eq!(files(&cache), [format!("{sha}.tar.zst")]);
    }

    #[tokio::test]
    async fn an_unreachable_url_is_fetched_through_the_hub_instead() {
        let hub = FakeHub::default();
        hub.serve_urls.store(true, SeqCst);
        hub.urls_unreachable.store(true, SeqCst);
        let sha = hub.add(vec![9; 3000]);
        let (_dir, cache) = cache(1 << 20);
        let lease = cache.get(&sha, &hub).await.unwrap();
        assert_eq!(std::fs::read(lease.path()).unwrap(), vec![9; 3000]);
        assert_eq!(hub.requests(), [(true, false), (false, false)]);
        assert_eq!(cache.downloads(), 1);
        assert_eq!(files(&cache), [format!("{sha}.tar.zst")]);
    }

    #[tokio::test]
    async fn after_an_unreachable_url_downloads_skip_urls_for_a_while() {
        let hub = FakeHub::default();
        hub.serve_urls.store(true, SeqCst);
        hub.urls_unreachable.store(true, SeqCst);
        let (_dir, cache) = cache(1 << 20);
        let first = hub.add(vec![1; 3000]);
        drop(cache.get(&first, &hub).await.unwrap());
        // The next download does not try the URL again.
        let second = hub.add(vec![2; 3000]);
        drop(cache.get(&second, &hub).await.unwrap());
        assert_eq!(
            hub.requests(),
            [(true, false), (false, false), (false, false)]
        );
        assert_eq!(hub.url_fetches.load(SeqCst), 1);
        // After a while, URLs are tried again.
        hub.urls_unreachable.store(false, SeqCst);
        let until = *cache.inner.urls_failing_until.lock().unwrap();
        let until = until.expect("remembered");
        assert!(until > Instant::now() + URL_RETRY_AFTER - Duration::from_secs(60));
        // As if URL_RETRY_AFTER had passed.
        *cache.inner.urls_failing_until.lock().unwrap() = Some(Instant::now());
        let third = hub.add(vec![3; 3000]);
        drop(cache.get(&third, &hub).await.unwrap());
        assert_eq!(hub.requests()[3..], [(true, false)]);
        assert_eq!(hub.url_fetches.load(SeqCst), 2);
    }

    #[tokio::test]
    async fn corrupt_bytes_from_a_url_are_reported_and_fetched_through_the_hub() {
        let hub = FakeHub::default();
        hub.serve_urls.store(true, SeqCst);
        hub.corrupt_url_next.store(1, SeqCst);
        let sha = hub.add(vec![4; 3000]);
        let (_dir, cache) = cache(1 << 20);
        let lease = cache.get(&sha, &hub).await.unwrap();
        assert_eq!(std::fs::read(lease.path()).unwrap(), vec![4; 3000]);
        assert_eq!(hub.requests(), [(true, false), (false, true)]);
        assert_eq!(files(&cache), [format!("{sha}.tar.zst")]);

        // Corrupt at the URL and twice through the hub: the hub's copy is bad.
        let other = hub.add(vec![5; 3000]);
        hub.corrupt_url_next.store(1, SeqCst);
        hub.corrupt_next.store(2, SeqCst);
        let e = cache.get(&other, &hub).await.unwrap_err();
        assert!(matches!(e, CacheError::Verification { .. }), "{e}");
        assert_eq!(
            hub.requests()[2..],
            [(true, false), (false, true), (false, false)]
        );
        assert_eq!(files(&cache), [format!("{sha}.tar.zst")]);
        assert_eq!(cache.cached_bytes(), 3000, "reservations given back");
    }

    #[tokio::test]
    async fn unknown_and_invalid_hashes_are_errors() {
        let hub = FakeHub::default();
        let (_dir, cache) = cache(1 << 20);
        let e = cache.get(&"0".repeat(64), &hub).await.unwrap_err();
        assert!(matches!(e, CacheError::NotOnHub { .. }), "{e}");
        let e = cache.get("abc", &hub).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid artifact_sha256: \"abc\" is not a SHA-256; expected 64 hex characters"
        );
        assert_eq!(hub.downloads.load(SeqCst), 1);
    }

    #[tokio::test]
    async fn the_cache_survives_a_restart_in_lru_order() {
        let hub = FakeHub::default();
        let a = hub.add(vec![b'a'; 40]);
        let b = hub.add(vec![b'b'; 40]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("artifacts");
        {
            let cache = ArtifactCache::open(path.clone(), 1000).unwrap();
            drop(cache.get(&a, &hub).await.unwrap());
            drop(cache.get(&b, &hub).await.unwrap());
        }
        // `a` is older on disk; a leftover temp file is cleaned up.
        let old = SystemTime::now() - Duration::from_secs(3600);
        std::fs::File::open(path.join(format!("{a}.tar.zst")))
            .unwrap()
            .set_modified(old)
            .unwrap();
        std::fs::write(path.join(".x.1.2.tmp"), "half").unwrap();
        std::fs::write(path.join("notes.txt"), "donor's file").unwrap();
        // Reopened with room for one: the older goes.
        let cache = ArtifactCache::open(path.clone(), 60).unwrap();
        assert!(!cache.contains(&a));
        assert!(cache.contains(&b));
        assert_eq!(cache.cached_bytes(), 40);
        assert!(!path.join(".x.1.2.tmp").exists());
        assert!(path.join("notes.txt").exists());
        let lease = cache.get(&b, &hub).await.unwrap();
        assert_eq!(lease.source(), Source::Cached);
        assert_eq!(hub.downloads.load(SeqCst), 2);
    }

    #[tokio::test]
    async fn a_file_deleted_behind_the_cache_is_downloaded_again() {
        let hub = FakeHub::default();
        let a = hub.add(vec![b'a'; 40]);
        let (_dir, cache) = cache(1000);
        let lease = cache.get(&a, &hub).await.unwrap();
        std::fs::remove_file(lease.path()).unwrap();
        drop(lease);
        let lease = cache.get(&a, &hub).await.unwrap();
        assert!(matches!(lease.source(), Source::Downloaded { .. }));
        assert_eq!(cache.cached_bytes(), 40);
    }

    #[tokio::test]
    async fn a_discarded_lease_removes_the_file() {
        let hub = FakeHub::default();
        let a = hub.add(vec![b'a'; 40]);
        let (_dir, cache) = cache(1000);
        let lease = cache.get(&a, &hub).await.unwrap();
        let path = lease.path().to_path_buf();
        lease.discard();
        assert!(!path.exists());
        assert!(!cache.contains(&a));
        assert_eq!(cache.cached_bytes(), 0);
    }

    #[test]
    fn hashes_are_checked_and_shortened() {
        assert_eq!(parse_sha256(&"AB".repeat(32)).unwrap(), "ab".repeat(32));
        assert!(parse_sha256(&"g".repeat(64)).is_err());
        assert!(parse_sha256("").is_err());
        assert_eq!(short(&"ab".repeat(32)), "abababababab");
        assert_eq!(short("abc"), "abc");
    }
}
