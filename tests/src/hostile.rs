//! A hostile agent: a test client holding a real agent credential that
//! speaks the wire protocol itself, so it can claim what it likes (labels,
//! slots), keep jobs past their timeout and report results it never earned.
//! The trust tests use it to check that the hub grants and verifies instead
//! of believing; [`Session::serve`] keeps one in the background (heart-beating
//! like an honest agent) while the test decides what it answers.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use trunkfarm_proto::dial::{DialOptions, HubTrust};
use trunkfarm_proto::enrollment::Enrollment;
use trunkfarm_proto::v1::agent_service_client::AgentServiceClient;
use trunkfarm_proto::v1::{
    AgentMessage, ArtifactChunk, ArtifactMeta, Assignment, Capabilities, DownloadArtifactRequest,
    EnrollRequest, Heartbeat, Hello, HubMessage, JobRef, JobResult, UploadArtifactResponse,
    Welcome, agent_message, hub_message,
};

use crate::{Bearer, Hub};

type Client = AgentServiceClient<InterceptedService<Channel, Bearer>>;

/// An enrolled hostile agent.
pub struct HostileAgent {
    /// Its agent id.
    pub id: String,
    client: Client,
}

/// One open session of a [`HostileAgent`].
pub struct Session {
    tx: mpsc::Sender<AgentMessage>,
    rx: Streaming<HubMessage>,
    /// What the hub answered the Hello with (the labels it granted).
    pub welcome: Welcome,
}

impl HostileAgent {
    /// Enrolls with a new token made with `token_args` (`token create`).
    pub async fn enroll(hub: &Hub, name: &str, token_args: &[&str]) -> HostileAgent {
        let e = Enrollment::parse(&hub.create_token(token_args)).expect("an enrollment string");
        let trust = HubTrust::PinnedCa {
            sha256: e.ca_sha256.clone().expect("the CA fingerprint"),
        };
        let channel = trunkfarm_proto::dial::connect(&e.hub, &trust, &DialOptions::default())
            .await
            .expect("connect to the hub");
        let resp = AgentServiceClient::new(channel.clone())
            .enroll(EnrollRequest {
                token: e.token,
                name: name.into(),
                protocol_version: trunkfarm_proto::PROTOCOL_VERSION,
                agent_version: "hostile".into(),
            })
            .await
            .expect("enroll")
            .into_inner();
        let bearer: MetadataValue<Ascii> = format!("Bearer {}.{}", resp.agent_id, resp.secret)
            .parse()
            .expect("ASCII credential");
        HostileAgent {
            id: resp.agent_id,
            client: AgentServiceClient::with_interceptor(channel, Bearer(bearer)),
        }
    }

    /// Opens a session claiming `caps`.
    pub async fn session(&self, caps: Capabilities) -> Session {
        let (tx, rx) = mpsc::channel(64);
        tx.send(AgentMessage {
            msg: Some(agent_message::Msg::Hello(Hello {
                protocol_version: trunkfarm_proto::PROTOCOL_VERSION,
                agent_version: "hostile".into(),
                capabilities: Some(caps),
                running: Vec::new(),
                draining: false,
                paused: None,
                slots: None,
            })),
        })
        .await
        .expect("queue the Hello");
        let mut rx = self
            .client
            .clone()
            .session(ReceiverStream::new(rx))
            .await
            .expect("open a session")
            .into_inner();
        let welcome = match rx.message().await {
            Ok(Some(HubMessage {
                msg: Some(hub_message::Msg::Welcome(w)),
            })) => w,
            other => panic!("expected Welcome, got {other:?}"),
        };
        Session { tx, rx, welcome }
    }

    /// Uploads `data` as the artifact of `job`, announcing `sha256`.
    pub async fn upload(
        &self,
        job: JobRef,
        sha256: &str,
        data: Vec<u8>,
    ) -> Result<UploadArtifactResponse, tonic::Status> {
        let chunks = vec![ArtifactChunk {
            meta: Some(ArtifactMeta {
                sha256: sha256.into(),
                size: data.len() as u64,
                job: Some(job),
                ..Default::default()
            }),
            data,
        }];
        self.client
            .clone()
            .upload_artifact(tokio_stream::iter(chunks))
            .await
            .map(|r| r.into_inner())
    }
}

impl HostileAgent {
    /// Downloads an artifact as `request` asks: the metadata the hub
    /// answered with, and the bytes it streamed (none if it handed a URL).
    pub async fn download(
        &self,
        request: DownloadArtifactRequest,
    ) -> Result<(ArtifactMeta, Vec<u8>), tonic::Status> {
        let mut stream = self
            .client
            .clone()
            .download_artifact(request)
            .await?
            .into_inner();
        let mut meta = None;
        let mut data = Vec::new();
        while let Some(chunk) = stream.message().await? {
            if meta.is_none() {
                meta = chunk.meta;
            }
            data.extend_from_slice(&chunk.data);
        }
        let meta = meta.ok_or_else(|| tonic::Status::internal("no metadata in the answer"))?;
        Ok((meta, data))
    }
}

/// A [`Session`] running in the background (see [`Session::serve`]).
pub struct Served {
    given: std::sync::mpsc::Receiver<Assignment>,
    answer: mpsc::UnboundedSender<JobResult>,
}

impl Served {
    /// The next job the hub gives it, waiting up to `timeout`.
    pub fn next(&self, timeout: Duration) -> Option<Assignment> {
        self.given.recv_timeout(timeout).ok()
    }

    /// Reports `result` (its job names the job).
    pub fn answer(&self, result: JobResult) {
        self.answer.send(result).expect("the session is served");
    }
}

impl Session {
    /// Everything the hub sends within `window`.
    pub async fn messages(&mut self, window: Duration) -> Vec<hub_message::Msg> {
        let end = Instant::now() + window;
        let mut out = Vec::new();
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match tokio::time::timeout(left, self.rx.message()).await {
                Ok(Ok(Some(HubMessage { msg: Some(m) }))) => out.push(m),
                Ok(Ok(Some(HubMessage { msg: None }))) => {}
                Ok(Ok(None)) | Ok(Err(_)) | Err(_) => break,
            }
        }
        out
    }

    /// The assignments the hub sends within `window`.
    pub async fn assignments(&mut self, window: Duration) -> Vec<Assignment> {
        self.messages(window)
            .await
            .into_iter()
            .filter_map(|m| match m {
                hub_message::Msg::Assign(a) => Some(a),
                _ => None,
            })
            .collect()
    }

    /// Waits up to `timeout` for one assignment.
    pub async fn next_assignment(&mut self, timeout: Duration) -> Option<Assignment> {
        let end = Instant::now() + timeout;
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match tokio::time::timeout(left, self.rx.message()).await {
                Ok(Ok(Some(HubMessage {
                    msg: Some(hub_message::Msg::Assign(a)),
                }))) => return Some(a),
                Ok(Ok(Some(_))) => {}
                Ok(Ok(None)) | Ok(Err(_)) | Err(_) => return None,
            }
        }
        None
    }

    /// Says it still runs `running`.
    pub async fn heartbeat(&self, running: &[JobRef]) {
        self.send(agent_message::Msg::Heartbeat(Heartbeat {
            running: running.to_vec(),
        }))
        .await;
    }

    /// Reports `result`.
    pub async fn report(&self, result: JobResult) {
        self.send(agent_message::Msg::Result(result)).await;
    }

    /// Runs the session in the background (call inside a tokio runtime):
    /// it heartbeats every 300 ms for the jobs it holds, so the hub keeps
    /// giving it work, hands every assignment to the test, and reports the
    /// results the test gives it.
    pub fn serve(mut self) -> Served {
        let (given_tx, given) = std::sync::mpsc::channel();
        let (answer, mut answers) = mpsc::unbounded_channel::<JobResult>();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(300));
            let mut running: Vec<JobRef> = Vec::new();
            loop {
                tokio::select! {
                    _ = tick.tick() => self.heartbeat(&running).await,
                    msg = self.rx.message() => match msg {
                        Ok(Some(HubMessage { msg: Some(hub_message::Msg::Assign(a)) })) => {
                            running.extend(a.job);
                            if given_tx.send(a).is_err() {
                                return;
                            }
                        }
                        Ok(Some(_)) => {}
                        Ok(None) | Err(_) => return,
                    },
                    result = answers.recv() => match result {
                        Some(result) => {
                            running.retain(|j| Some(*j) != result.job);
                            self.report(result).await;
                        }
                        None => return,
                    },
                }
            }
        });
        Served { given, answer }
    }

    async fn send(&self, msg: agent_message::Msg) {
        self.tx
            .send(AgentMessage { msg: Some(msg) })
            .await
            .expect("the session is open");
    }
}
