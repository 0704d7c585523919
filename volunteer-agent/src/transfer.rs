//! Moving artifacts between this agent and the hub.
//!
//! Runtime artifacts travel over their own streaming RPCs
//! (`AgentService.DownloadArtifact` / `UploadArtifact`), on a channel of
//! their own, so a large transfer never delays the session's heartbeats and
//! results. The rest of the agent sees them through [`ArtifactHub`], which
//! the executor's and the cache's tests replace with an in-memory hub.
//!
//! A hub that keeps its artifacts in an object store (S3 and the like) may
//! answer a download with a presigned URL instead of the bytes
//! (`ArtifactMeta.url`); [`ArtifactHub::fetch_url`] then GETs it with a plain
//! HTTP client. The URL's query string is its signature: only
//! [`redact_url`]'s form of it is ever logged or put in an error.

use std::fmt;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;

use tokio::io::AsyncReadExt as _;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use trunkfarm_proto::AUTHORIZATION;
use trunkfarm_proto::dial::{self, DialOptions, HubTrust};
use trunkfarm_proto::v1::agent_service_client::AgentServiceClient;
use trunkfarm_proto::v1::{
    ArtifactChunk, ArtifactMeta, DownloadArtifactRequest, UploadArtifactResponse,
};

/// Bytes of artifact data per uploaded message: far below the hub's default
/// 4 MiB message limit (a hub configured below 256 KiB plus a few bytes of
/// framing would refuse uploads), large enough that per-message overhead
/// does not matter.
pub(crate) const CHUNK_BYTES: usize = 256 * 1024;

/// Chunks read ahead of the network while uploading (bounds memory to a few
/// chunks).
const UPLOAD_READ_AHEAD_CHUNKS: usize = 4;

/// How long connecting to an object store URL may take before the download
/// goes through the hub instead.
const URL_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long an object store URL may go without sending a byte (the cache's
/// own stall timeout bounds each chunk too).
const URL_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// A boxed, sendable future, so [`ArtifactHub`] stays object safe.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The chunks of one download as the hub sends them: the first carries the
/// artifact's metadata.
pub(crate) type ChunkStream = Pin<Box<dyn Stream<Item = Result<ArtifactChunk, Status>> + Send>>;

/// The body of an object store URL, in pieces as they arrive.
pub(crate) type BodyStream = Pin<Box<dyn Stream<Item = Result<Vec<u8>, UrlError>> + Send>>;

/// Why an object store URL gave no bytes (or stopped giving them). The
/// message names the URL without its query string (the signature).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct UrlError(pub(crate) String);

/// `url` as it may be shown: scheme, host, port and path, never the query
/// (a presigned URL's signature) or userinfo.
pub(crate) fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => format!(
            "{}://{}{}{}",
            u.scheme(),
            u.host_str().unwrap_or(""),
            u.port().map(|p| format!(":{p}")).unwrap_or_default(),
            u.path()
        ),
        Err(_) => "(an unparsable URL)".to_owned(),
    }
}

/// Whether a call failed because the hub could not be reached or the
/// connection broke (it restarts, or the network is down), rather than
/// because the hub refused: `Unavailable` (what tonic makes of a refused
/// connection, and what a hub answers while it shuts down or its store is
/// down), or any status tonic made from a transport error mid-call (those
/// carry their cause as `source`; the hub's own answers carry none).
pub(crate) fn hub_unreachable(status: &Status) -> bool {
    use std::error::Error as _;
    status.code() == tonic::Code::Unavailable
        || (status.source().is_some()
            && matches!(
                status.code(),
                tonic::Code::Unknown | tonic::Code::Internal | tonic::Code::Cancelled
            ))
}

/// The hub's artifact store, as the agent uses it. One implementation talks
/// gRPC ([`GrpcHub`]); tests use an in-memory one.
pub(crate) trait ArtifactHub: Send + Sync {
    /// Starts downloading the artifact `request.sha256` (lowercase hex) as
    /// the request asks (`accepts_url`: the hub may answer with a URL only;
    /// `url_bytes_corrupt`: its URL's bytes did not match); the stream
    /// yields its chunks, the first with the metadata.
    fn download(
        &self,
        request: DownloadArtifactRequest,
    ) -> BoxFuture<'_, Result<ChunkStream, Status>>;

    /// GETs an object store URL the hub handed out (`ArtifactMeta.url`).
    fn fetch_url(&self, url: &str) -> BoxFuture<'_, Result<BodyStream, UrlError>>;

    /// Uploads the packed artifact in `file`, described by `meta` (its hash,
    /// size and the job that built it), and returns the hub's answer.
    fn upload(
        &self,
        meta: ArtifactMeta,
        file: PathBuf,
    ) -> BoxFuture<'_, Result<UploadArtifactResponse, Status>>;
}

/// [`ArtifactHub`] over gRPC: a channel of its own to the hub (connected on
/// first use, reconnected after a failure) carrying the agent's credential.
pub(crate) struct GrpcHub {
    /// The channel, or why the hub address or pin cannot be used.
    channel: Result<Channel, String>,
    /// The `authorization` value (sensitive: never logged).
    bearer: MetadataValue<Ascii>,
    /// Largest gRPC message accepted or sent.
    max_message_bytes: usize,
    /// The client for object store URLs, or why none could be made.
    http: Result<reqwest::Client, String>,
}

impl fmt::Debug for GrpcHub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcHub")
            .field("connected", &self.channel.is_ok())
            .finish_non_exhaustive()
    }
}

impl GrpcHub {
    /// A client of the hub at `hub`, trusted as `trust`, authenticating with
    /// `bearer`. Nothing is dialled yet; an unusable address or pin shows up
    /// as the error of every call.
    pub fn new(hub: &str, trust: &HubTrust, bearer: MetadataValue<Ascii>) -> Self {
        let opts = DialOptions::default();
        GrpcHub {
            channel: dial::connect_lazy(hub, trust, &opts).map_err(|e| e.to_string()),
            bearer,
            max_message_bytes: opts.max_message_bytes,
            http: http_client(),
        }
    }

    /// A client stub on the channel.
    fn client(&self) -> Result<AgentServiceClient<Channel>, Status> {
        let channel = self.channel.clone().map_err(Status::unavailable)?;
        Ok(AgentServiceClient::new(channel)
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes))
    }

    /// `message` wrapped in a request carrying the credential.
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request
            .metadata_mut()
            .insert(AUTHORIZATION, self.bearer.clone());
        request
    }
}

/// The plain HTTP client for object store URLs: ring as the TLS provider
/// (reqwest is built without one), the system's roots, bounded waits.
fn http_client() -> Result<reqwest::Client, String> {
    // Harmless when main installed it already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .connect_timeout(URL_CONNECT_TIMEOUT)
        .read_timeout(URL_READ_TIMEOUT)
        .user_agent(concat!("trunkfarm-agent/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("cannot make an HTTP client: {}", e.without_url()))
}

impl ArtifactHub for GrpcHub {
    fn download(
        &self,
        request: DownloadArtifactRequest,
    ) -> BoxFuture<'_, Result<ChunkStream, Status>> {
        let request = self.request(request);
        Box::pin(async move {
            let mut client = self.client()?;
            let response = client.download_artifact(request).await?;
            let stream: ChunkStream = Box::pin(response.into_inner());
            Ok(stream)
        })
    }

    fn fetch_url(&self, url: &str) -> BoxFuture<'_, Result<BodyStream, UrlError>> {
        let url = url.to_owned();
        Box::pin(async move {
            let shown = redact_url(&url);
            let http = self.http.clone().map_err(UrlError)?;
            // reqwest's errors name the URL, signature included: never shown.
            let response = http
                .get(&url)
                .send()
                .await
                .map_err(|e| UrlError(format!("GET {shown}: {}", e.without_url())))?;
            let status = response.status();
            if !status.is_success() {
                return Err(UrlError(format!(
                    "GET {shown}: the object store answered {status}"
                )));
            }
            let (tx, rx) = mpsc::channel(UPLOAD_READ_AHEAD_CHUNKS);
            tokio::spawn(async move {
                let mut response = response;
                loop {
                    let item = match response.chunk().await {
                        Ok(Some(bytes)) => Ok(bytes.to_vec()),
                        Ok(None) => return,
                        Err(e) => Err(UrlError(format!(
                            "GET {shown}: the body broke off: {}",
                            e.without_url()
                        ))),
                    };
                    let failed = item.is_err();
                    if tx.send(item).await.is_err() || failed {
                        return;
                    }
                }
            });
            let body: BodyStream = Box::pin(ReceiverStream::new(rx));
            Ok(body)
        })
    }

    fn upload(
        &self,
        meta: ArtifactMeta,
        file: PathBuf,
    ) -> BoxFuture<'_, Result<UploadArtifactResponse, Status>> {
        Box::pin(async move {
            let mut client = self.client()?;
            let (chunks, mut read_error) = file_chunks(meta, file);
            let result = client.upload_artifact(self.request(chunks)).await;
            // A read error ends the stream early (the reader reports it
            // before the stream ends), which the hub sees as a size
            // mismatch; the local cause is the better explanation. Not
            // awaited: after an early refusal the reader may still wait for
            // the transport to take a chunk.
            if let Ok(Err(e)) = read_error.try_recv() {
                return Err(Status::data_loss(format!(
                    "cannot read the packed artifact: {e}"
                )));
            }
            Ok(result?.into_inner())
        })
    }
}

/// The chunks of an upload of `file`: the first carries `meta` (and data),
/// each at most [`CHUNK_BYTES`] of data; read by a task as the transport
/// takes them. The receiver learns whether reading failed (the stream then
/// simply ends early).
pub(crate) fn file_chunks(
    meta: ArtifactMeta,
    file: PathBuf,
) -> (
    ReceiverStream<ArtifactChunk>,
    oneshot::Receiver<io::Result<()>>,
) {
    let (tx, rx) = mpsc::channel(UPLOAD_READ_AHEAD_CHUNKS);
    let (done_tx, done_rx) = oneshot::channel();
    tokio::spawn(async move {
        let result = send_chunks(meta, &file, &tx).await;
        let _ = done_tx.send(result);
        // Only now does the stream end: the outcome is known before the
        // hub can answer.
        drop(tx);
    });
    (ReceiverStream::new(rx), done_rx)
}

/// Reads `file` and feeds its chunks to `tx` (stops quietly if the receiver
/// is gone: the RPC ended).
async fn send_chunks(
    meta: ArtifactMeta,
    file: &std::path::Path,
    tx: &mpsc::Sender<ArtifactChunk>,
) -> io::Result<()> {
    let mut file = tokio::fs::File::open(file).await?;
    let mut meta = Some(meta);
    loop {
        let mut data = vec![0u8; CHUNK_BYTES];
        let mut filled = 0;
        while filled < data.len() {
            let n = file.read(&mut data[filled..]).await?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        data.truncate(filled);
        // An empty artifact still sends its metadata.
        if filled == 0 && meta.is_none() {
            return Ok(());
        }
        let last = filled < CHUNK_BYTES;
        let chunk = ArtifactChunk {
            meta: meta.take(),
            data,
        };
        if tx.send(chunk).await.is_err() || last {
            return Ok(());
        }
    }
}

/// An in-memory hub for tests of the cache and the executor.
#[cfg(test)]
pub(crate) mod fake {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;

    use sha2::{Digest, Sha256};
    use tokio_stream::StreamExt as _;

    use super::*;

    /// Artifacts by SHA-256, and counters of what was asked.
    #[derive(Debug, Default)]
    pub(crate) struct FakeHub {
        /// The stored artifacts.
        pub artifacts: Mutex<HashMap<String, Vec<u8>>>,
        /// Downloads started.
        pub downloads: AtomicUsize,
        /// Uploads received.
        pub uploads: AtomicUsize,
        /// The next this many downloads have one byte flipped.
        pub corrupt_next: AtomicUsize,
        /// Delay before a download starts (to make requests overlap).
        pub delay: Mutex<Duration>,
        /// When set, uploads fail with this status.
        pub refuse_uploads: Mutex<Option<Status>>,
        /// The next this many calls (downloads or uploads) find the hub
        /// unreachable, as while it restarts.
        pub unreachable_next: AtomicUsize,
        /// Answer a request that accepts one with a URL (as a hub with an
        /// object store does): `fake://<sha>?X-Amz-Signature=secret`.
        pub serve_urls: AtomicBool,
        /// Fetching a URL fails (the object store is out of reach).
        pub urls_unreachable: AtomicBool,
        /// The next this many URL fetches have one byte flipped.
        pub corrupt_url_next: AtomicUsize,
        /// URL fetches started.
        pub url_fetches: AtomicUsize,
        /// Every download request's (accepts_url, url_bytes_corrupt).
        pub requests: Mutex<Vec<(bool, bool)>>,
    }

    impl FakeHub {
        /// Stores `data` and returns its SHA-256.
        pub fn add(&self, data: Vec<u8>) -> String {
            let sha = hex::encode(Sha256::digest(&data));
            self.lock().insert(sha.clone(), data);
            sha
        }

        /// The stored artifacts.
        pub fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<u8>>> {
            self.artifacts.lock().unwrap()
        }

        /// The requests' (accepts_url, url_bytes_corrupt), in order.
        pub fn requests(&self) -> Vec<(bool, bool)> {
            self.requests.lock().unwrap().clone()
        }
    }

    /// What tonic answers while the hub's port is closed.
    fn restarting() -> Status {
        Status::unavailable(
            "could not connect to the hub at 127.0.0.1:1: Connection refused (os error 111)",
        )
    }

    /// Takes one from `counter` if it is above zero.
    fn take_one(counter: &AtomicUsize) -> bool {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    impl ArtifactHub for FakeHub {
        fn download(
            &self,
            request: DownloadArtifactRequest,
        ) -> BoxFuture<'_, Result<ChunkStream, Status>> {
            let sha = request.sha256.clone();
            Box::pin(async move {
                self.downloads.fetch_add(1, Ordering::SeqCst);
                if take_one(&self.unreachable_next) {
                    return Err(restarting());
                }
                self.requests
                    .lock()
                    .unwrap()
                    .push((request.accepts_url, request.url_bytes_corrupt));
                let delay = *self.delay.lock().unwrap();
                tokio::time::sleep(delay).await;
                let Some(mut data) = self.lock().get(&sha).cloned() else {
                    return Err(Status::not_found(format!("no artifact {sha}")));
                };
                let size = data.len() as u64;
                let mut meta = ArtifactMeta {
                    sha256: sha.clone(),
                    size,
                    job: None,
                    ..Default::default()
                };
                if request.accepts_url && self.serve_urls.load(Ordering::SeqCst) {
                    meta.url = format!("fake://hub/{sha}?X-Amz-Signature=secret");
                    meta.url_expires_ms = u64::MAX;
                    let only_meta = ArtifactChunk {
                        meta: Some(meta),
                        data: Vec::new(),
                    };
                    let stream: ChunkStream = Box::pin(tokio_stream::iter([Ok(only_meta)]));
                    return Ok(stream);
                }
                if take_one(&self.corrupt_next)
                    && let Some(b) = data.last_mut()
                {
                    *b ^= 0xff;
                }
                let mut chunks = vec![ArtifactChunk {
                    meta: Some(meta),
                    data: Vec::new(),
                }];
                for piece in data.chunks(1000) {
                    chunks.push(ArtifactChunk {
                        meta: None,
                        data: piece.to_vec(),
                    });
                }
                let stream: ChunkStream = Box::pin(tokio_stream::iter(chunks.into_iter().map(Ok)));
                Ok(stream)
            })
        }

        fn fetch_url(&self, url: &str) -> BoxFuture<'_, Result<BodyStream, UrlError>> {
            let url = url.to_owned();
            Box::pin(async move {
                self.url_fetches.fetch_add(1, Ordering::SeqCst);
                if self.urls_unreachable.load(Ordering::SeqCst) {
                    return Err(UrlError(format!(
                        "GET {}: connection refused",
                        redact_url(&url)
                    )));
                }
                let sha = url
                    .strip_prefix("fake://hub/")
                    .and_then(|rest| rest.split('?').next())
                    .unwrap_or_default()
                    .to_owned();
                let Some(mut data) = self.lock().get(&sha).cloned() else {
                    return Err(UrlError("404 Not Found".into()));
                };
                if take_one(&self.corrupt_url_next)
                    && let Some(b) = data.first_mut()
                {
                    *b ^= 0xff;
                }
                let pieces: Vec<Result<Vec<u8>, UrlError>> =
                    data.chunks(777).map(|p| Ok(p.to_vec())).collect();
                let body: BodyStream = Box::pin(tokio_stream::iter(pieces));
                Ok(body)
            })
        }

        fn upload(
            &self,
            meta: ArtifactMeta,
            file: PathBuf,
        ) -> BoxFuture<'_, Result<UploadArtifactResponse, Status>> {
            Box::pin(async move {
                self.uploads.fetch_add(1, Ordering::SeqCst);
                if take_one(&self.unreachable_next) {
                    return Err(restarting());
                }
                if let Some(status) = self.refuse_uploads.lock().unwrap().clone() {
                    return Err(status);
                }
                let (mut chunks, _) = file_chunks(meta, file);
                let mut data = Vec::new();
                let mut first_meta = None;
                while let Some(chunk) = chunks.next().await {
                    assert!(chunk.data.len() <= CHUNK_BYTES);
                    if first_meta.is_none() {
                        first_meta = Some(chunk.meta.clone().expect("meta on the first chunk"));
                    } else {
                        assert!(chunk.meta.is_none(), "meta on a later chunk");
                    }
                    data.extend_from_slice(&chunk.data);
                }
                let meta = first_meta.ok_or_else(|| Status::invalid_argument("no chunk"))?;
                let sha = hex::encode(Sha256::digest(&data));
                if sha != meta.sha256 || data.len() as u64 != meta.size {
                    return Err(Status::invalid_argument("hash or size mismatch"));
                }
                let already_present = self.lock().insert(sha.clone(), data).is_some();
                Ok(UploadArtifactResponse {
                    sha256: sha,
                    already_present,
                })
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt as _;

    use super::*;

    #[test]
    fn a_broken_connection_is_told_from_the_hubs_refusal() {
        // What tonic makes of a refused connection, and of one reset mid-call.
        assert!(hub_unreachable(&Status::unavailable("connection refused")));
        let reset = io::Error::new(io::ErrorKind::ConnectionReset, "connection reset by peer");
        let mid_call = Status::from_error(Box::new(reset));
        assert_eq!(mid_call.code(), tonic::Code::Unknown);
        assert!(hub_unreachable(&mid_call));
        // The hub's own answers (no transport cause).
        for refused in [
            Status::internal("the hub failed"),
            Status::unknown("?"),
            Status::cancelled("cancelled by the hub"),
            Status::permission_denied("not yours"),
            Status::failed_precondition("no longer holds the job"),
        ] {
            assert!(!hub_unreachable(&refused), "{refused}");
        }
    }

    async fn chunks_of(len: usize) -> Vec<ArtifactChunk> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let meta = ArtifactMeta {
            sha256: "ab".repeat(32),
            size: len as u64,
            job: None,
            ..Default::default()
        };
        let (stream, done) = file_chunks(meta.clone(), path);
        let chunks: Vec<ArtifactChunk> = stream.collect().await;
        done.await.unwrap().unwrap();
        assert_eq!(chunks[0].meta.as_ref(), Some(&meta));
        assert!(chunks[1..].iter().all(|c| c.meta.is_none()));
        let joined: Vec<u8> = chunks.iter().flat_map(|c| c.data.clone()).collect();
        assert_eq!(joined, data);
        chunks
    }

    #[tokio::test]
    async fn uploads_are_cut_into_bounded_chunks() {
        let sizes = |chunks: Vec<ArtifactChunk>| -> Vec<usize> {
            chunks.iter().map(|c| c.data.len()).collect()
        };
        assert_eq!(sizes(chunks_of(0).await), [0]);
        assert_eq!(sizes(chunks_of(10).await), [10]);
        assert_eq!(sizes(chunks_of(CHUNK_BYTES).await), [CHUNK_BYTES]);
        assert_eq!(
            sizes(chunks_of(2 * CHUNK_BYTES + 5).await),
            [CHUNK_BYTES, CHUNK_BYTES, 5]
        );
    }

    #[test]
    fn a_url_is_shown_without_its_signature() {
        assert_eq!(
            redact_url(
                "https://user:pw@bucket.s3.amazonaws.com:8443/hub/artifacts/ab.tar.zst?X-Amz-Signature=f00&X-Amz-Credential=AKIA"
            ),
            "https://bucket.s3.amazonaws.com:8443/hub/artifacts/ab.tar.zst"
        );
        assert_eq!(
            redact_url("http://127.0.0.1:9000/b/k?sig=1"),
            "http://127.0.0.1:9000/b/k"
        );
        assert_eq!(redact_url("not a url ?sig=1"), "(an unparsable URL)");
    }

    #[tokio::test]
    async fn an_unreachable_url_fails_without_naming_its_signature() {
        // A port nothing listens on (bound, then closed).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let hub = grpc_hub();
        let Err(e) = hub
            .fetch_url(&format!(
                "http://127.0.0.1:{port}/b/artifacts/x.tar.zst?X-Amz-Signature=s3cr3t"
            ))
            .await
        else {
            panic!("nothing listens there");
        };
        let text = e.to_string();
        assert!(
            text.starts_with(&format!(
                "GET http://127.0.0.1:{port}/b/artifacts/x.tar.zst: "
            )),
            "{text}"
        );
        assert!(!text.contains("s3cr3t"), "{text}");
    }

    fn grpc_hub() -> GrpcHub {
        GrpcHub::new(
            "127.0.0.1:1",
            &HubTrust::PinnedCa {
                sha256: "ab".repeat(32),
            },
            MetadataValue::from_static("Bearer x"),
        )
    }

    /// A one-request HTTP/1.1 server on 127.0.0.1 answering `response`;
    /// returns its base URL and the request line it got.
    async fn answer_once(response: Vec<u8>) -> (String, oneshot::Receiver<String>) {
        use tokio::io::AsyncWriteExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.ends_with(b"\r\n\r\n") {
                let n = conn.read(&mut buf).await.unwrap();
                assert!(n > 0, "the client hung up");
                request.extend_from_slice(&buf[..n]);
            }
            let text = String::from_utf8_lossy(&request);
            let _ = tx.send(text.lines().next().unwrap_or_default().to_owned());
            conn.write_all(&response).await.unwrap();
            conn.shutdown().await.unwrap();
        });
        (base, rx)
    }

    #[tokio::test]
    async fn a_url_is_fetched_with_one_plain_get_and_http_errors_are_errors() {
        let hub = grpc_hub();
        let body = vec![b'z'; 100_000];
        let mut ok = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        ok.extend_from_slice(&body);
        let (base, request) = answer_once(ok).await;
        let mut got = Vec::new();
        let mut stream = hub
            .fetch_url(&format!("{base}/b/k.tar.zst?X-Amz-Signature=s"))
            .await
            .unwrap();
        while let Some(piece) = stream.next().await {
            got.extend(piece.unwrap());
        }
        assert_eq!(got, body);
        assert_eq!(
            request.await.unwrap(),
            "GET /b/k.tar.zst?X-Amz-Signature=s HTTP/1.1"
        );

        // An expired URL: S3 answers 403.
        let (base, _) = answer_once(
            b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_vec(),
        )
        .await;
        let Err(e) = hub
            .fetch_url(&format!("{base}/b/k.tar.zst?X-Amz-Signature=s3cr3t"))
            .await
        else {
            panic!("403 is an error");
        };
        assert_eq!(
            e.to_string(),
            format!("GET {base}/b/k.tar.zst: the object store answered 403 Forbidden")
        );
    }

    #[tokio::test]
    async fn a_missing_file_is_reported() {
        let (stream, done) = file_chunks(ArtifactMeta::default(), "/nonexistent/x".into());
        let chunks: Vec<ArtifactChunk> = stream.collect().await;
        assert!(chunks.is_empty());
        assert!(done.await.unwrap().is_err());
    }
}
