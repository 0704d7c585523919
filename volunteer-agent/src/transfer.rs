//! Moving artifacts between this agent and the hub.
//!
//! Runtime artifacts travel over their own streaming RPCs
//! (`AgentService.DownloadArtifact` / `UploadArtifact`), on a channel of
//! their own, so a large transfer never delays the session's heartbeats and
//! results. The rest of the agent sees them through [`ArtifactHub`], which
//! the executor's and the cache's tests replace with an in-memory hub.

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

/// A boxed, sendable future, so [`ArtifactHub`] stays object safe.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The chunks of one download as the hub sends them: the first carries the
/// artifact's metadata.
pub(crate) type ChunkStream = Pin<Box<dyn Stream<Item = Result<ArtifactChunk, Status>> + Send>>;

/// The hub's artifact store, as the agent uses it. One implementation talks
/// gRPC ([`GrpcHub`]); tests use an in-memory one.
pub(crate) trait ArtifactHub: Send + Sync {
    /// Starts downloading the artifact whose SHA-256 is `sha256` (lowercase
    /// hex); the stream yields its chunks.
    fn download(&self, sha256: &str) -> BoxFuture<'_, Result<ChunkStream, Status>>;

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

impl ArtifactHub for GrpcHub {
    fn download(&self, sha256: &str) -> BoxFuture<'_, Result<ChunkStream, Status>> {
        let request = self.request(DownloadArtifactRequest {
            sha256: sha256.to_owned(),
            ..Default::default()
        });
        Box::pin(async move {
            let mut client = self.client()?;
            let response = client.download_artifact(request).await?;
            let stream: ChunkStream = Box::pin(response.into_inner());
            Ok(stream)
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
    use std::sync::atomic::{AtomicUsize, Ordering};
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
    }

    impl ArtifactHub for FakeHub {
        fn download(&self, sha256: &str) -> BoxFuture<'_, Result<ChunkStream, Status>> {
            let sha = sha256.to_owned();
            Box::pin(async move {
                self.downloads.fetch_add(1, Ordering::SeqCst);
                let delay = *self.delay.lock().unwrap();
                tokio::time::sleep(delay).await;
                let Some(mut data) = self.lock().get(&sha).cloned() else {
                    return Err(Status::not_found(format!("no artifact {sha}")));
                };
                let corrupt = self
                    .corrupt_next
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                let size = data.len() as u64;
                if corrupt && let Some(b) = data.last_mut() {
                    *b ^= 0xff;
                }
                let mut chunks = vec![ArtifactChunk {
                    meta: Some(ArtifactMeta {
                        sha256: sha.clone(),
                        size,
                        job: None,
                        ..Default::default()
                    }),
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

        fn upload(
            &self,
            meta: ArtifactMeta,
            file: PathBuf,
        ) -> BoxFuture<'_, Result<UploadArtifactResponse, Status>> {
            Box::pin(async move {
                self.uploads.fetch_add(1, Ordering::SeqCst);
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

    #[tokio::test]
    async fn a_missing_file_is_reported() {
        let (stream, done) = file_chunks(ArtifactMeta::default(), "/nonexistent/x".into());
        let chunks: Vec<ArtifactChunk> = stream.collect().await;
        assert!(chunks.is_empty());
        assert!(done.await.unwrap().is_err());
    }
}
