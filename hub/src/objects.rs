//! Where artifacts and compacted logs live, behind one handle: the hub's
//! data dir (`[storage] backend = "local"`, the default: object_store's
//! `LocalFileSystem` under `<data_dir>/objects`) or an S3-compatible bucket
//! (`backend = "s3"`: AWS S3, MinIO, Ceph RGW, R2, …) under this hub's
//! prefix. Callers name objects relative to the hub (`artifacts/<sha>.tar.zst`,
//! `logs/<job>/<attempt>.log.zst`) and use `object_store`'s own API on
//! [`Objects::store`] with [`Objects::path`]; only this module knows buckets,
//! endpoints, prefixes and credentials.
//!
//! Why `object_store`: one well-kept client for every S3 dialect (multipart
//! uploads, ranged reads, retries, SigV4 presigning) that is also a local
//! file store, so the same code serves both backends. It is built with ring
//! (no aws-lc, no OpenSSL), as the rest of the hub.
//!
//! The hub proves the store works when it starts ([`Objects::open`] writes,
//! reads back and deletes a probe object) and refuses to start otherwise,
//! with a message naming the `storage.*` key or credential to fix: a bucket
//! that is missing, denied or in another region is a configuration error,
//! not something to find out on the first upload.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3, AmazonS3Builder, AwsCredential};
use object_store::local::LocalFileSystem;
use object_store::signer::Signer;
use object_store::{
    BackoffConfig, ClientOptions, CredentialProvider, ObjectStore, ObjectStoreExt, RetryConfig,
};

use crate::aws_credentials::Credentials;
use crate::config::{StorageBackend, StorageSection};

/// The folder under the data dir that the local backend keeps objects in.
pub(crate) const LOCAL_DIR: &str = "objects";

/// Where the start-up probe writes (under the prefix).
const PROBE_DIR: &str = ".probe";

/// How long connecting to the object store may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one request may take (a multipart part, a ranged read).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a request is retried (transient errors, throttling) before the
/// caller sees the error. Short: callers retry on their own schedule (logs
/// stay in the database meanwhile), and the start-up probe must not hang.
const RETRY_FOR: Duration = Duration::from_secs(20);

/// Retries per request within [`RETRY_FOR`].
const MAX_RETRIES: usize = 3;

/// Why the object store cannot be used. Messages name what to check.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ObjectsError {
    /// The configuration cannot make a client (caught at start).
    #[error("storage: {0}")]
    Setup(String),
    /// A request failed. The message carries the service's own words (its
    /// error code, or the innermost network error), not the client's whole
    /// chain of wrappers.
    #[error("storage: cannot {action} {path} in {store}: {summary}{hint}")]
    Store {
        /// What the hub was doing, e.g. "write".
        action: &'static str,
        /// The object.
        path: String,
        /// [`Objects::describe`].
        store: String,
        /// What went wrong, in one line.
        summary: String,
        /// What to check, when the error says (`""` otherwise).
        hint: String,
        /// The client's error (for `NotFound` checks and the debug log).
        cause: Box<object_store::Error>,
    },
}

impl ObjectsError {
    /// Whether the store said the object does not exist.
    pub(crate) fn is_not_found(&self) -> bool {
        matches!(self, ObjectsError::Store { cause, .. }
            if matches!(**cause, object_store::Error::NotFound { .. }))
    }
}

/// The handle on the object store: cheap to clone, shared by artifacts,
/// logs and retention.
#[derive(Clone, Debug)]
pub(crate) struct Objects {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Arc<dyn ObjectStore>,
    /// Set for S3: what presigns URLs.
    signer: Option<AmazonS3>,
    /// Prepended to every relative name (no slashes at either end; empty
    /// for the local backend, whose directory is the hub's own).
    prefix: String,
    /// For messages: `s3://bucket/prefix (endpoint …)` or the directory.
    describe: String,
    /// How long presigned URLs work.
    presign_ttl: Duration,
}

/// The hub's credentials, re-read from their file before each use, for
/// object_store's signer.
#[derive(Debug)]
struct HubCredentials(Credentials);

#[async_trait::async_trait]
impl CredentialProvider for HubCredentials {
    type Credential = AwsCredential;

    async fn get_credential(&self) -> object_store::Result<Arc<AwsCredential>> {
        let c = self.0.current();
        Ok(Arc::new(AwsCredential {
            key_id: c.access_key_id,
            secret_key: c.secret_access_key,
            token: c.session_token,
        }))
    }
}

impl Objects {
    /// Opens the store `[storage]` configures (the local one under
    /// `data_dir`) and proves it works: a probe object is written, read back
    /// and deleted. Fails with what to fix.
    pub(crate) async fn open(
        cfg: &StorageSection,
        data_dir: &Path,
    ) -> Result<Objects, ObjectsError> {
        let objects = match cfg.backend {
            StorageBackend::Local => {
                let dir = data_dir.join(LOCAL_DIR);
                let objects = Objects::local(&dir)?;
                // Nothing writes yet: what a killed put left is garbage.
                let removed = remove_staging_files(&dir).map_err(|e| {
                    ObjectsError::Setup(format!(
                        "cannot clean unfinished writes out of {}: {e}",
                        dir.display()
                    ))
                })?;
                if removed > 0 {
                    tracing::info!(
                        removed,
                        "deleted unfinished object writes left in {}",
                        dir.display()
                    );
                }
                objects
            }
            StorageBackend::S3 => {
                let creds = Credentials::load().map_err(|e| {
                    ObjectsError::Setup(format!(
                        "`storage.backend = \"s3\"` needs credentials: {e}"
                    ))
                })?;
                Objects::s3(cfg, creds)?
            }
        };
        objects.probe().await?;
        tracing::info!(store = %objects.describe(), "object store open");
        Ok(objects)
    }

    /// A local store rooted at `dir` (created if missing).
    pub(crate) fn local(dir: &Path) -> Result<Objects, ObjectsError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            ObjectsError::Setup(format!(
                "cannot create the object directory {}: {e}",
                dir.display()
            ))
        })?;
        let store = LocalFileSystem::new_with_prefix(dir)
            .map_err(|e| ObjectsError::Setup(format!("cannot use {}: {e}", dir.display())))?
            .with_automatic_cleanup(true)
            .with_fsync(true);
        Ok(Objects {
            inner: Arc::new(Inner {
                store: Arc::new(store),
                signer: None,
                prefix: String::new(),
                describe: dir.display().to_string(),
                presign_ttl: Duration::ZERO,
            }),
        })
    }

    /// A local store at `dir` whose calls go through `wrap` (tests inject
    /// failures and count calls with it).
    #[cfg(test)]
    pub(crate) fn local_wrapped(
        dir: &Path,
        wrap: impl FnOnce(Arc<dyn ObjectStore>) -> Arc<dyn ObjectStore>,
    ) -> Result<Objects, ObjectsError> {
        let local = Objects::local(dir)?;
        let inner = &local.inner;
        Ok(Objects {
            inner: Arc::new(Inner {
                store: wrap(inner.store.clone()),
                signer: None,
                prefix: inner.prefix.clone(),
                describe: inner.describe.clone(),
                presign_ttl: inner.presign_ttl,
            }),
        })
    }

    /// An S3 store as `cfg` says, signing with `creds`.
    fn s3(cfg: &StorageSection, creds: Credentials) -> Result<Objects, ObjectsError> {
        let bucket = cfg.bucket.trim();
        let region = cfg.region.trim();
        let mut options = ClientOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_user_agent(reqwest::header::HeaderValue::from_static(concat!(
                "trunkfarm/",
                env!("CARGO_PKG_VERSION")
            )));
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(region)
            .with_credentials(Arc::new(HubCredentials(creds)))
            .with_retry(RetryConfig {
                backoff: BackoffConfig::default(),
                max_retries: MAX_RETRIES,
                retry_timeout: RETRY_FOR,
            });
        let describe = match cfg.endpoint.as_deref().map(str::trim) {
            Some(endpoint) => {
                let endpoint = endpoint.trim_end_matches('/');
                options = options.with_allow_http(endpoint.starts_with("http://"));
                builder = builder
                    .with_endpoint(endpoint)
                    .with_virtual_hosted_style_request(false);
                format!("s3://{bucket}/{} (endpoint {endpoint})", cfg.clean_prefix())
            }
            None => format!("s3://{bucket}/{} (region {region})", cfg.clean_prefix()),
        };
        // reqwest is built without a crypto provider of its own: ring, the
        // one the whole hub uses (harmless if already installed).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let s3 = builder
            .with_client_options(options)
            .build()
            .map_err(|e| ObjectsError::Setup(format!("cannot set up the S3 client: {e}")))?;
        Ok(Objects {
            inner: Arc::new(Inner {
                store: Arc::new(s3.clone()),
                signer: Some(s3),
                prefix: cfg.clean_prefix().to_owned(),
                describe,
                presign_ttl: cfg.presign_ttl,
            }),
        })
    }

    /// Writes, reads back and deletes a small object: the cheapest proof
    /// that the bucket exists, the credentials may write and read it, and
    /// the region is right.
    async fn probe(&self) -> Result<(), ObjectsError> {
        let rel = format!("{PROBE_DIR}/{}", crate::auth::secret::new_id("probe"));
        let path = self.path(&rel);
        let body = b"trunkfarm object store probe".to_vec();
        let store = self.store();
        store
            .put(&path, body.clone().into())
            .await
            .map_err(self.error("write", &path))?;
        let back = store
            .get(&path)
            .await
            .map_err(self.error("read", &path))?
            .bytes()
            .await
            .map_err(self.error("read", &path))?;
        if back.as_ref() != body.as_slice() {
            return Err(ObjectsError::Setup(format!(
                "{}: the probe object {path} read back different bytes than were written; is storage.endpoint an S3-compatible service?",
                self.describe()
            )));
        }
        store
            .delete(&path)
            .await
            .map_err(self.error("delete", &path))?;
        Ok(())
    }

    /// True for S3: objects can be fetched by agents through presigned URLs.
    pub(crate) fn is_remote(&self) -> bool {
        self.inner.signer.is_some()
    }

    /// The object `rel` (a `/`-separated name such as
    /// `artifacts/<sha>.tar.zst`) under this hub's prefix.
    pub(crate) fn path(&self, rel: &str) -> object_store::path::Path {
        let rel = rel.trim_start_matches('/');
        if self.inner.prefix.is_empty() {
            object_store::path::Path::from(rel)
        } else {
            object_store::path::Path::from(format!("{}/{rel}", self.inner.prefix))
        }
    }

    /// The store: use `object_store`'s API with paths from [`Objects::path`].
    pub(crate) fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.inner.store
    }

    /// A GET URL for `rel` that works for `storage.presign_ttl`, with when it
    /// stops working (Unix ms); `None` for the local backend. The URL holds
    /// a signature: never log its query.
    pub(crate) async fn presign_get(
        &self,
        rel: &str,
    ) -> Result<Option<(reqwest::Url, u64)>, ObjectsError> {
        let Some(signer) = &self.inner.signer else {
            return Ok(None);
        };
        let path = self.path(rel);
        let ttl = self.inner.presign_ttl;
        let url = signer
            .signed_url(reqwest::Method::GET, &path, ttl)
            .await
            .map_err(self.error("presign", &path))?;
        let expires = crate::store::now_ms().saturating_add(ttl.as_millis() as u64);
        Ok(Some((url, expires)))
    }

    /// Makes a just-written local object durable (fsync of the file and its
    /// directory); S3 objects are durable once `put` returned.
    pub(crate) async fn sync(&self, rel: &str) -> Result<(), ObjectsError> {
        if self.is_remote() {
            return Ok(());
        }
        let file = self.local_file(rel);
        let path = self.path(rel);
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            std::fs::File::open(&file)?.sync_all()?;
            if let Some(dir) = file.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        })
        .await
        .map_err(|e| ObjectsError::Setup(format!("cannot sync {path}: {e}")))?
        .map_err(|e| ObjectsError::Setup(format!("cannot sync {path}: {e}")))
    }

    /// The file of a local object (only meaningful for the local backend).
    fn local_file(&self, rel: &str) -> PathBuf {
        PathBuf::from(&self.inner.describe).join(rel.trim_start_matches('/'))
    }

    /// `s3://bucket/prefix (endpoint …)` or the local directory: for logs,
    /// `status` and messages.
    pub(crate) fn describe(&self) -> String {
        self.inner.describe.clone()
    }

    /// Maps a client error to one that says what the hub did and, where the
    /// error tells, which key to fix.
    pub(crate) fn error(
        &self,
        action: &'static str,
        path: &object_store::path::Path,
    ) -> impl FnOnce(object_store::Error) -> ObjectsError + use<> {
        let path = path.to_string();
        let store = self.describe();
        let remote = self.is_remote();
        move |cause| ObjectsError::Store {
            action,
            hint: if remote { hint(&cause) } else { String::new() },
            summary: summary(&cause),
            path,
            store,
            cause: Box::new(cause),
        }
    }
}

/// Deletes the staging files of local puts a killed hub left (object_store
/// writes `<name>#<n>` and renames it into place; it never lists them, so
/// nothing else would). Returns how many it deleted.
fn remove_staging_files(dir: &Path) -> std::io::Result<usize> {
    let mut removed = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                pending.push(path);
                continue;
            }
            let name = entry.file_name();
            let staged = name
                .to_string_lossy()
                .rsplit_once('#')
                .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
            if staged {
                std::fs::remove_file(&path)?;
                removed += 1;
            }
        }
    }
    Ok(removed)
}

/// One line for people: the S3 error's code and message when the service
/// answered with one, else the innermost cause (e.g. "Connection refused").
fn summary(e: &object_store::Error) -> String {
    let text = e.to_string();
    let tag = |name: &str| {
        let open = format!("<{name}>");
        let start = text.find(&open)? + open.len();
        let end = text[start..].find(&format!("</{name}>"))? + start;
        Some(text[start..end].trim().to_owned())
    };
    if let Some(code) = tag("Code") {
        return match tag("Message") {
            Some(message) => format!("{code}: {message}"),
            None => code,
        };
    }
    let mut inner: &dyn std::error::Error = e;
    while let Some(next) = inner.source() {
        inner = next;
    }
    let line = inner.to_string();
    line.lines()
        .next()
        .unwrap_or_default()
        .chars()
        .take(300)
        .collect()
}

/// What to check, from what the service answered (`""` when it says nothing
/// useful).
fn hint(e: &object_store::Error) -> String {
    let text = format!("{e} {:?}", e).to_ascii_lowercase();
    let hint = if text.contains("nosuchbucket") || text.contains("bucket does not exist") {
        "the bucket does not exist: create it, or fix `storage.bucket`"
    } else if text.contains("permanentredirect")
        // AWS answers a bucket in another region with a bare 301 (no
        // Location), which the client reports without the body.
        || text.contains("redirect without location")
        || text.contains("authorizationheadermalformed")
        || text.contains("illegallocationconstraint")
        || text.contains("incorrectendpoint")
    {
        "the bucket is in another region: fix `storage.region`"
    } else if matches!(e, object_store::Error::Unauthenticated { .. })
        || text.contains("invalidaccesskeyid")
        || text.contains("signaturedoesnotmatch")
    {
        "the credentials were refused: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the profile in ~/.aws/credentials) and the hub's clock"
    } else if matches!(e, object_store::Error::PermissionDenied { .. })
        || text.contains("accessdenied")
        || text.contains("forbidden")
    {
        "access denied: the credentials (AWS_ACCESS_KEY_ID or the profile in ~/.aws/credentials) may not read and write this bucket and prefix"
    } else if text.contains("error sending request")
        || text.contains("connection refused")
        || text.contains("dns error")
        || text.contains("timed out")
        || text.contains("connect")
    {
        "the object store cannot be reached: check `storage.endpoint` (or `storage.region`) and the network"
    } else {
        ""
    };
    if hint.is_empty() {
        String::new()
    } else {
        format!(" ({hint})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_local_store_proves_itself_and_names_objects_under_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = StorageSection::default();
        let objects = Objects::open(&cfg, dir.path()).await.unwrap();
        assert!(!objects.is_remote());
        assert_eq!(
            objects.path("logs/7/1.log.zst").as_ref(),
            "logs/7/1.log.zst"
        );
        let path = objects.path("logs/7/1.log.zst");
        objects
            .store()
            .put(&path, b"hello".to_vec().into())
            .await
            .unwrap();
        objects.sync("logs/7/1.log.zst").await.unwrap();
        assert!(
            dir.path()
                .join(LOCAL_DIR)
                .join("logs/7/1.log.zst")
                .is_file()
        );
        assert!(
            objects
                .presign_get("logs/7/1.log.zst")
                .await
                .unwrap()
                .is_none()
        );
        // The probe left nothing behind.
        assert!(
            !dir.path().join(LOCAL_DIR).join(PROBE_DIR).exists()
                || std::fs::read_dir(dir.path().join(LOCAL_DIR).join(PROBE_DIR))
                    .unwrap()
                    .next()
                    .is_none()
        );
    }

    #[tokio::test]
    async fn unfinished_local_writes_are_deleted_when_the_hub_starts() {
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path().join(LOCAL_DIR).join("logs/7");
        std::fs::create_dir_all(&logs).unwrap();
        std::fs::write(logs.join("1.log.zst"), b"whole").unwrap();
        std::fs::write(logs.join("2.log.zst#3"), b"half").unwrap();
        Objects::open(&StorageSection::default(), dir.path())
            .await
            .unwrap();
        assert!(logs.join("1.log.zst").is_file());
        assert!(!logs.join("2.log.zst#3").exists());
    }

    #[tokio::test]
    async fn a_local_store_that_cannot_be_created_is_refused_naming_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        // A file where the objects folder should be.
        std::fs::write(dir.path().join(LOCAL_DIR), b"not a directory").unwrap();
        let e = Objects::open(&StorageSection::default(), dir.path())
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(LOCAL_DIR), "{e}");
    }

    #[test]
    fn an_s3_prefix_is_put_before_every_name() {
        let cfg = StorageSection {
            backend: StorageBackend::S3,
            bucket: "farm".into(),
            prefix: "/hubs/a/".into(),
            endpoint: Some("http://127.0.0.1:1".into()),
            ..StorageSection::default()
        };
        let creds = Credentials::new(
            crate::aws_credentials::AwsCredentials {
                access_key_id: "AKIDTEST".into(),
                secret_access_key: "secret".into(),
                session_token: None,
            },
            crate::aws_credentials::CredentialSource::Env,
        );
        let objects = Objects::s3(&cfg, creds).unwrap();
        assert!(objects.is_remote());
        let path = objects.path("artifacts/ab.tar.zst");
        assert_eq!(path.as_ref(), "hubs/a/artifacts/ab.tar.zst");
        assert_eq!(
            objects.describe(),
            "s3://farm/hubs/a (endpoint http://127.0.0.1:1)"
        );
    }

    /// What AWS S3 answers (its error bodies, as the client reports them)
    /// reads as one line naming the key to fix. moto answers a wrong region
    /// as if it were right, so this case is checked here, not end to end.
    #[test]
    fn the_services_answers_name_the_key_to_fix() {
        let answer = |code: &str, message: &str| object_store::Error::Generic {
            store: "S3",
            source: format!(
                "Error performing PUT http://s3.amazonaws.com/farm/hubs/a/.probe in 120ms - \
                 Server returned non-2xx status code: 400 Bad Request: <?xml version=\"1.0\" \
                 encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message>\
                 <RequestId>4442587FB7D0A2F9</RequestId></Error>"
            )
            .into(),
        };
        for (code, message, key) in [
            (
                "AuthorizationHeaderMalformed",
                "The authorization header is malformed; the region 'us-east-1' is wrong; expecting 'eu-west-1'",
                "fix `storage.region`",
            ),
            (
                "PermanentRedirect",
                "The bucket you are attempting to access must be addressed using the specified endpoint.",
                "fix `storage.region`",
            ),
            (
                "NoSuchBucket",
                "The specified bucket does not exist",
                "fix `storage.bucket`",
            ),
            (
                "InvalidAccessKeyId",
                "The AWS Access Key Id you provided does not exist in our records.",
                "AWS_ACCESS_KEY_ID",
            ),
            ("AccessDenied", "Access Denied", "may not read and write"),
        ] {
            let e = answer(code, message);
            assert_eq!(summary(&e), format!("{code}: {message}"));
            let hint = hint(&e);
            assert!(hint.contains(key), "{code}: {hint}");
        }
        // A bucket in another region: AWS answers 301 with no Location.
        let redirected = object_store::Error::Generic {
            store: "S3",
            source: "Error performing PUT http://s3.amazonaws.com/farm/hubs/a/.probe in 80ms - \
                     Received redirect without LOCATION, this normally indicates an incorrectly \
                     configured region"
                .into(),
        };
        assert!(hint(&redirected).contains("fix `storage.region`"));
        let refused = object_store::Error::Generic {
            store: "S3",
            source: "error sending request: Connection refused (os error 111)".into(),
        };
        assert!(hint(&refused).contains("`storage.endpoint`"));
        assert_eq!(
            summary(&refused),
            "error sending request: Connection refused (os error 111)"
        );
    }
}
