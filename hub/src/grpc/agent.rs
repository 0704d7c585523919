//! `AgentService`: enrollment and the per-agent session stream.
//!
//! A thin layer: it authenticates, checks the protocol version, and turns
//! each message on the stream into a call on the [`Dispatcher`] or the
//! [`JobLogs`]; the decisions are made there. Artifact transfers go to the
//! [`Artifacts`] store.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use trunkfarm_proto::v1::agent_service_server::AgentService;
use trunkfarm_proto::v1::{
    AgentMessage, ArtifactChunk, DownloadArtifactRequest, EnrollRequest, EnrollResponse, Hello,
    HubMessage, JobRef, UnenrollRequest, UnenrollResponse, UploadArtifactResponse, Welcome,
    agent_message, hub_message,
};
use trunkfarm_proto::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

use super::bearer;
use crate::artifacts::{ArtifactError, Artifacts, Origin};
use crate::auth::credentials::{AuthError, Credentials};
use crate::auth::throttle::FailedEnrollments;
use crate::dispatch::{AgentTx, Dispatcher, Hello as DispatchHello, revoke_agent};
use crate::logs::JobLogs;

/// Results of one session being recorded at once; more wait (back-pressure).
const RESULTS_IN_FLIGHT: usize = 64;

/// How long a new session may take to send its Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(15);

/// The agent-facing service.
pub(crate) struct AgentApi {
    /// Tokens and agent credentials.
    pub(crate) credentials: Credentials,
    /// The job queue.
    pub(crate) dispatch: Dispatcher,
    /// Job logs.
    pub(crate) logs: Arc<JobLogs>,
    /// Told to agents in Welcome.
    pub(crate) heartbeat_interval: Duration,
    /// Runtime artifacts agents upload and download.
    pub(crate) artifacts: Artifacts,
    /// Jobs at once for an agent whose token sets no cap.
    pub(crate) default_max_parallel_jobs: u32,
    /// Failed enrollments per address (`network.enroll_failures`).
    pub(crate) enroll_failures: FailedEnrollments,
}

/// Why an enrollment was refused, for the hub's log: the kind of failure and
/// ids from the hub's own records, never text the client chose (its token
/// id, its name) nor anything of the token's secret. `None` for a failure
/// that is the hub's, not the client's (it is not charged to the address).
fn enroll_failure(e: &AuthError) -> Option<String> {
    Some(match e {
        AuthError::TokenMalformed => "malformed token".to_string(),
        AuthError::TokenInvalid(_) => "unknown token or wrong secret".to_string(),
        AuthError::TokenExpired { id, .. } => format!("token {id} expired"),
        AuthError::TokenUsedUp { id, .. } => format!("token {id} is used up"),
        AuthError::TokenRevoked(id) => format!("token {id} is revoked"),
        AuthError::Store(_)
        | AuthError::NoSuchToken(_)
        | AuthError::AgentInvalid
        | AuthError::AgentRevoked(_)
        | AuthError::NoSuchAgent(_) => return None,
    })
}

/// Refuses an agent speaking a protocol this hub cannot serve.
fn check_version(version: u32) -> Result<(), Status> {
    if (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) {
        return Ok(());
    }
    Err(Status::failed_precondition(format!(
        "this hub speaks trunkfarm protocol {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION} (hub version {}); this agent speaks protocol {version}: {}",
        env!("CARGO_PKG_VERSION"),
        if version < MIN_PROTOCOL_VERSION {
            "upgrade trunkfarm-agent to a version that matches the hub"
        } else {
            "this agent is newer than the hub: ask the hub's operator to upgrade trunkfarm, or install a matching trunkfarm-agent"
        }
    )))
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    async fn enroll(
        &self,
        request: Request<EnrollRequest>,
    ) -> Result<Response<EnrollResponse>, Status> {
        let peer = request.remote_addr().map(|a| a.ip());
        // Refused before the token is looked at: an address guessing tokens
        // gets no answer about them until its allowance refills.
        if let Some(ip) = peer
            && let Err(refused) = self.enroll_failures.check(&ip, Instant::now())
        {
            // Whole seconds, rounded up: "try again in 0s" would be wrong.
            let wait = refused.retry_after.as_secs_f64().ceil().max(1.0) as u64;
            if refused.first {
                tracing::warn!(
                    peer = %ip,
                    "enrollment refused: too many failed enrollments from this address; refusing its enrollments for {wait}s"
                );
            }
            return Err(Status::resource_exhausted(format!(
                "too many failed enrollments from {ip}: try again in {wait}s (check the enrollment string with the hub's operator)"
            )));
        }
        let peer_text = peer.map_or_else(|| "unknown".to_string(), |ip| ip.to_string());
        let req = request.into_inner();
        if req.protocol_version != 0 {
            check_version(req.protocol_version)?;
        }
        let (agent, credential) = match self.credentials.enroll(&req.token, &req.name).await {
            Ok(enrolled) => enrolled,
            Err(e) => {
                if let Some(reason) = enroll_failure(&e) {
                    tracing::warn!(peer = %peer_text, "enrollment refused: {reason}");
                    if let Some(ip) = peer {
                        self.enroll_failures.charge(&ip, Instant::now());
                    }
                }
                return Err(e.into());
            }
        };
        // The name is the client's text: Debug-quoted, so it cannot forge log lines.
        tracing::info!(agent = %agent.id, name = ?agent.name, token = %agent.token_id, peer = %peer_text, "agent enrolled");
        let secret = credential
            .split_once('.')
            .map(|(_, s)| s.to_string())
            .unwrap_or_default();
        Ok(Response::new(EnrollResponse {
            agent_id: agent.id,
            secret,
            labels: agent.grant.labels,
            trusted: agent.grant.trusted,
        }))
    }

    type SessionStream = Pin<Box<dyn Stream<Item = Result<HubMessage, Status>> + Send>>;

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let remote = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let agent = self.credentials.verify_agent(bearer(&request)?)?;
        let mut inbound = request.into_inner();
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(AgentMessage {
                msg: Some(agent_message::Msg::Hello(hello)),
            }))) => hello,
            Ok(Err(status)) => return Err(status),
            Err(_) => {
                return Err(Status::deadline_exceeded(
                    "no Hello within 15s of opening the session",
                ));
            }
            Ok(_) => {
                return Err(Status::invalid_argument(
                    "the first message of a session must be Hello",
                ));
            }
        };
        check_version(hello.protocol_version)?;
        let Hello {
            agent_version,
            capabilities,
            running,
            draining,
            paused,
            slots,
            ..
        } = hello;
        let caps = capabilities.unwrap_or_default();
        // The agent asks; the hub grants.
        let granted = agent.grant.grant(&caps, self.default_max_parallel_jobs);
        if !granted.refused.is_empty() {
            tracing::warn!(agent = %agent.id, refused = ?granted.refused, "the agent claims labels its token does not grant; they are ignored (grant them with `trunkfarm token create --labels`)");
        }
        if let Some(claimed) = granted.clamped_from {
            tracing::warn!(agent = %agent.id, claimed, granted = granted.max_parallel_jobs, "the agent claims more parallel jobs than its token allows; it gets the cap");
        }
        let labels = granted.labels;
        let (tx, rx) = mpsc::unbounded_channel();
        // Welcome goes first: `connect` may queue assignments right away.
        let _ = tx.send(Box::new(Ok(HubMessage {
            msg: Some(hub_message::Msg::Welcome(Welcome {
                agent_id: agent.id.clone(),
                hub_version: env!("CARGO_PKG_VERSION").to_string(),
                protocol_version: PROTOCOL_VERSION,
                heartbeat_interval_ms: self.heartbeat_interval.as_millis() as u64,
                labels: labels.clone(),
                shares_slots: true,
            })),
        })));
        let session = self
            .dispatch
            .connect(
                &agent.id,
                &running,
                DispatchHello {
                    name: agent.name.clone(),
                    caps,
                    labels: labels.into_iter().collect(),
                    trusted: granted.trusted,
                    quarantined: agent.verdicts.quarantined(),
                    max_parallel: granted.max_parallel_jobs,
                    draining,
                    paused,
                    offered: slots.map(|s| s.offered),
                    agent_version: agent_version.clone(),
                    remote: remote.clone(),
                    tx: tx.clone(),
                },
            )
            .await?;
        tracing::info!(agent = %agent.id, name = %agent.name, %remote, version = %agent_version, held = running.len(), "agent connected");
        tokio::spawn(run_session(
            agent.id,
            session,
            inbound,
            tx,
            self.dispatch.clone(),
            self.logs.clone(),
        ));
        Ok(Response::new(Box::pin(
            UnboundedReceiverStream::new(rx).map(|msg| *msg),
        )))
    }

    async fn upload_artifact(
        &self,
        request: Request<Streaming<ArtifactChunk>>,
    ) -> Result<Response<UploadArtifactResponse>, Status> {
        let agent = self.credentials.verify_agent(bearer(&request)?)?;
        let dispatch = &self.dispatch;
        let agent_id = agent.id.as_str();
        let mut for_job = None;
        let authorize = |job: &JobRef| -> Result<Origin, ArtifactError> {
            for_job = Some(*job);
            if !dispatch.holds(agent_id, job) {
                return Err(ArtifactError::NotHeld {
                    agent_id: agent_id.to_string(),
                    job_id: job.job_id,
                    attempt: job.attempt,
                });
            }
            let rec = dispatch.get(job.job_id)?;
            let is_build = rec
                .as_ref()
                .is_some_and(|r| !r.spec.upload_prefix.is_empty());
            if !is_build {
                // Only a build (a job with an upload_prefix) produces an artifact.
                return Err(ArtifactError::NotHeld {
                    agent_id: agent_id.to_string(),
                    job_id: job.job_id,
                    attempt: job.attempt,
                });
            }
            let key = rec.map(|r| r.key).unwrap_or_default();
            Ok(Origin::from_job(job.job_id, &key))
        };
        let received = self
            .artifacts
            .receive(agent_id, request.into_inner(), authorize)
            .await
            .map_err(|e| {
                tracing::warn!(agent = %agent_id, "artifact upload refused: {e}");
                Status::from(e)
            })?;
        // Every byte was hashed (also for an artifact stored before): the
        // attempt's build result may now name it, and only it.
        if let Some(job) = for_job
            && !dispatch.uploaded(agent_id, &job, &received.sha256).await?
        {
            return Err(Status::failed_precondition(format!(
                "agent {agent_id} no longer holds job {} attempt {}: the upload does not count",
                job.job_id, job.attempt
            )));
        }
        Ok(Response::new(UploadArtifactResponse {
            sha256: received.sha256,
            already_present: received.already_present,
        }))
    }

    async fn unenroll(
        &self,
        request: Request<UnenrollRequest>,
    ) -> Result<Response<UnenrollResponse>, Status> {
        let agent = self.credentials.verify_agent(bearer(&request)?)?;
        // The one way to revoke: the credential first, then the session.
        let requeued = revoke_agent(&self.credentials, &self.dispatch, &agent.id)
            .await
            .map_err(|e| {
                tracing::error!(agent = %agent.id, "cannot unenroll the agent: {e}");
                Status::internal(format!(
                    "the hub could not unenroll agent {}: {e}",
                    agent.id
                ))
            })?;
        tracing::info!(agent = %agent.id, name = %agent.name, requeued = requeued.len(), "agent unenrolled by its donor: its credential is revoked");
        Ok(Response::new(UnenrollResponse { requeued }))
    }

    type DownloadArtifactStream = Pin<Box<dyn Stream<Item = Result<ArtifactChunk, Status>> + Send>>;

    async fn download_artifact(
        &self,
        request: Request<DownloadArtifactRequest>,
    ) -> Result<Response<Self::DownloadArtifactStream>, Status> {
        let agent = self.credentials.verify_agent(bearer(&request)?)?;
        let request = request.into_inner();
        let sha = &request.sha256;
        let chunks = self
            .artifacts
            .download(&request, &agent.id)
            .await
            .map_err(|e| {
                tracing::warn!(agent = %agent.id, "artifact download refused: {e}");
                Status::from(e)
            })?;
        tracing::debug!(agent = %agent.id, sha = %sha, "artifact download started");
        Ok(Response::new(Box::pin(
            ReceiverStream::new(chunks).map(|c| c.map_err(Status::from)),
        )))
    }
}

/// Reads one agent's messages until its stream ends.
async fn run_session(
    agent_id: String,
    session: u64,
    mut inbound: Streaming<AgentMessage>,
    tx: AgentTx,
    dispatch: Dispatcher,
    logs: Arc<JobLogs>,
) {
    let in_flight = Arc::new(tokio::sync::Semaphore::new(RESULTS_IN_FLIGHT));
    loop {
        let msg = match inbound.message().await {
            Ok(Some(AgentMessage { msg: Some(msg) })) => msg,
            Ok(Some(_)) => continue,
            Ok(None) => break,
            Err(status) => {
                tracing::debug!(agent = %agent_id, "session stream ended: {}", status.message());
                break;
            }
        };
        let outcome = match msg {
            agent_message::Msg::Heartbeat(hb) => dispatch.heartbeat(&agent_id, &hb.running).await,
            agent_message::Msg::Started(s) => match s.job {
                Some(job) => dispatch.started(&agent_id, &job),
                None => Ok(()),
            },
            agent_message::Msg::Log(chunk) => match chunk.job {
                Some(job) if dispatch.holds(&agent_id, &job) => logs.append(chunk),
                _ => Ok(()),
            },
            agent_message::Msg::Result(result) => {
                // The chunks that preceded the result on this stream are
                // stored by now: say so if some are missing (the agent
                // resends unacknowledged chunks, so this should not happen;
                // the result counts regardless).
                if let Some(job) = result.job
                    && dispatch.holds(&agent_id, &job)
                {
                    match logs.gap(&job, result.last_log_seq) {
                        Ok(None) => {}
                        Ok(Some(gap)) => tracing::warn!(
                            agent = %agent_id,
                            job = job.job_id,
                            attempt = job.attempt,
                            "the job's stored log is incomplete: {gap}"
                        ),
                        Err(e) => tracing::warn!(
                            agent = %agent_id,
                            job = job.job_id,
                            attempt = job.attempt,
                            "cannot check the job's stored log: {e}"
                        ),
                    }
                }
                // Handled concurrently so one agent's results share flushes,
                // but boundedly: an agent flooding results waits here.
                let Ok(permit) = in_flight.clone().acquire_owned().await else {
                    break;
                };
                let dispatch = dispatch.clone();
                let tx = tx.clone();
                let agent_id = agent_id.clone();
                tokio::spawn(async move {
                    match dispatch.record_result(&agent_id, result).await {
                        Ok(ack) => {
                            let _ = tx.send(Box::new(Ok(HubMessage {
                                msg: Some(hub_message::Msg::ResultAck(ack)),
                            })));
                        }
                        // Not acknowledged: the agent keeps the result and resends it.
                        Err(e) => tracing::error!(agent = %agent_id, "cannot record a result: {e}"),
                    }
                    drop(permit);
                });
                Ok(())
            }
            agent_message::Msg::Draining(_) => {
                tracing::info!(agent = %agent_id, "agent is draining");
                dispatch.set_draining(&agent_id);
                Ok(())
            }
            agent_message::Msg::Paused(paused) => {
                match crate::dispatch::pause_words(&paused) {
                    Some(words) => tracing::info!(agent = %agent_id, "agent is {words}"),
                    None => tracing::info!(agent = %agent_id, "agent takes work again"),
                }
                dispatch.set_paused(&agent_id, &paused).await
            }
            agent_message::Msg::Slots(slots) => {
                tracing::debug!(agent = %agent_id, offered = slots.offered, "agent offers slots");
                dispatch.set_offered(&agent_id, slots.offered).await
            }
            agent_message::Msg::Hello(_) => Ok(()),
        };
        if let Err(e) = outcome {
            tracing::error!(agent = %agent_id, "{e}");
            let _ = tx.send(Box::new(Err(Status::from(e))));
            break;
        }
    }
    dispatch.disconnect(&agent_id, session);
    tracing::info!(agent = %agent_id, "agent disconnected");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_outside_the_range_are_refused_with_advice() {
        assert!(check_version(PROTOCOL_VERSION).is_ok());
        let old = check_version(0).unwrap_err();
        assert_eq!(old.code(), tonic::Code::FailedPrecondition);
        assert!(old.message().contains("upgrade trunkfarm-agent"));
        let new = check_version(PROTOCOL_VERSION + 1).unwrap_err();
        assert!(new.message().contains("newer than the hub"));
    }
}
