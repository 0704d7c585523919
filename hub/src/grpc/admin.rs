//! `AdminService`: what the operator's CLI (and later the dashboard and the
//! benchmarks) call. Every call is checked against the admin token by
//! [`AdminAuth`] before it reaches a handler.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};
use trunkfarm_proto::enrollment::Enrollment;
use trunkfarm_proto::settings::fmt_duration;
use trunkfarm_proto::v1::admin_service_server::{AdminService, AdminServiceServer};
use trunkfarm_proto::v1::*;

use super::{bearer, job_info, state_from_proto};
use crate::artifacts::Artifacts;
use crate::auth::credentials::{Credentials, Grant};
use crate::auth::secret;
use crate::dispatch::{Dispatcher, JobState};
use crate::logs::{JobLogs, WatchEvent};
use crate::notify::Notifier;
use crate::pipeline::Pipeline;
use crate::provision::Pools;

/// The longest grace period a drain may ask for (a week).
const MAX_DRAIN_GRACE: Duration = Duration::from_secs(7 * 24 * 3600);

/// How many entries a listing returns when the request names no limit.
const DEFAULT_LIST_LIMIT: usize = 100;

/// A listing's limit: the request's, or the default for 0 (unset).
fn list_limit(requested: u32) -> usize {
    match requested {
        0 => DEFAULT_LIST_LIMIT,
        n => n as usize,
    }
}

/// The admin-facing service.
pub(crate) struct AdminApi {
    /// SHA-256 of the admin token.
    pub(crate) admin_token_hash: String,
    /// Tokens and agents.
    pub(crate) credentials: Credentials,
    /// The job queue.
    pub(crate) dispatch: Dispatcher,
    /// Job logs.
    pub(crate) logs: Arc<JobLogs>,
    /// The address put in enrollment strings.
    pub(crate) public_address: String,
    /// The CA fingerprint put in enrollment strings (`None`: plaintext hub).
    pub(crate) ca_sha256: Option<String>,
    /// Token lifetime when none is asked for.
    pub(crate) default_token_ttl: Duration,
    /// The longest token lifetime allowed.
    pub(crate) max_token_ttl: Duration,
    /// Drain grace when none is asked for.
    pub(crate) drain_grace: Duration,
    /// The trunk pipeline (status, breakage, builds on demand).
    pub(crate) pipeline: Pipeline,
    /// Stored runtime artifacts.
    pub(crate) artifacts: Artifacts,
    /// Subscriptions and the outbox.
    pub(crate) notifier: Notifier,
    /// On-demand agent pools.
    pub(crate) pools: Pools,
}

/// An admin service that admits only calls carrying the admin token.
pub(crate) type AdminServer = InterceptedService<AdminServiceServer<AdminApi>, AdminAuth>;

impl AdminApi {
    /// The service to serve: every call passes [`AdminAuth`] first, with
    /// messages up to `max_message` bytes either way.
    pub(crate) fn into_server(self, max_message: usize) -> AdminServer {
        let auth = AdminAuth {
            token_hash: Arc::from(self.admin_token_hash.as_str()),
        };
        InterceptedService::new(
            AdminServiceServer::new(self)
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message),
            auth,
        )
    }
}

/// The admin token check, in front of every admin call (one place, so no
/// handler can forget it). Agents authenticate with their own credentials
/// in the agent service.
#[derive(Clone)]
pub(crate) struct AdminAuth {
    /// SHA-256 of the admin token.
    token_hash: Arc<str>,
}

impl Interceptor for AdminAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let presented = bearer(&request)?;
        if secret::verify(presented, &self.token_hash) {
            Ok(request)
        } else {
            Err(Status::unauthenticated(
                "wrong admin token: use the one in the hub's data dir (admin.token) or its config's admin.token_file",
            ))
        }
    }
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn list_pools(
        &self,
        request: Request<ListPoolsRequest>,
    ) -> Result<Response<ListPoolsResponse>, Status> {
        let pools = crate::provision::pool_views(&self.pools, request.into_inner().all)?
            .into_iter()
            .map(PoolInfo::from)
            .collect();
        Ok(Response::new(ListPoolsResponse { pools }))
    }

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<SubscribeResponse>, Status> {
        let sub = request.into_inner().subscription.unwrap_or_default();
        let created = self.notifier.subscribe(sub.into()).await?;
        Ok(Response::new(SubscribeResponse { created }))
    }

    async fn unsubscribe(
        &self,
        request: Request<UnsubscribeRequest>,
    ) -> Result<Response<UnsubscribeResponse>, Status> {
        let sub = request.into_inner().subscription.unwrap_or_default();
        let removed = self.notifier.unsubscribe(&sub.into()).await?;
        Ok(Response::new(UnsubscribeResponse { removed }))
    }

    async fn list_subscriptions(
        &self,
        request: Request<ListSubscriptionsRequest>,
    ) -> Result<Response<ListSubscriptionsResponse>, Status> {
        let project = request.into_inner().project;
        let subscriptions = self
            .notifier
            .subscriptions(&project)?
            .into_iter()
            .map(Subscription::from)
            .collect();
        Ok(Response::new(ListSubscriptionsResponse { subscriptions }))
    }

    async fn send_test_mail(
        &self,
        request: Request<SendTestMailRequest>,
    ) -> Result<Response<SendTestMailResponse>, Status> {
        let to = request.into_inner().to;
        let response = self.notifier.send_test(&to).await?;
        Ok(Response::new(SendTestMailResponse {
            response,
            sender: self.notifier.describe(),
        }))
    }

    async fn list_mail(
        &self,
        request: Request<ListMailRequest>,
    ) -> Result<Response<ListMailResponse>, Status> {
        let req = request.into_inner();
        let limit = list_limit(req.limit);
        let mails = self
            .notifier
            .mails(limit, req.state())?
            .into_iter()
            .map(MailInfo::from)
            .collect();
        Ok(Response::new(ListMailResponse {
            mails,
            sender: self.notifier.describe(),
        }))
    }

    async fn build_upstream(
        &self,
        request: Request<BuildUpstreamRequest>,
    ) -> Result<Response<BuildUpstreamResponse>, Status> {
        let req = request.into_inner();
        let built = self
            .pipeline
            .build(&req.upstream, req.rev.trim(), req.force)
            .await?;
        tracing::info!(upstream = %req.upstream, "build of {} requested", crate::commit::short(&built.commit));
        Ok(Response::new(BuildUpstreamResponse {
            commit: built.commit,
            builds: built.builds.into_iter().map(Into::into).collect(),
            already_built: built.already_built,
        }))
    }

    async fn get_status(
        &self,
        request: Request<GetStatusRequest>,
    ) -> Result<Response<GetStatusResponse>, Status> {
        let req = request.into_inner();
        // Never show a result a crash could still take back.
        self.dispatch.sync().await?;
        let status = self.pipeline.status(&req.upstream)?;
        Ok(Response::new(status.into()))
    }

    async fn get_breakage(
        &self,
        request: Request<GetBreakageRequest>,
    ) -> Result<Response<GetBreakageResponse>, Status> {
        let req = request.into_inner();
        let resp = self
            .pipeline
            .breakage(&req.upstream, req.rev.trim())
            .await?;
        Ok(Response::new(resp.into()))
    }

    async fn list_transitions(
        &self,
        request: Request<ListTransitionsRequest>,
    ) -> Result<Response<ListTransitionsResponse>, Status> {
        let req = request.into_inner();
        let limit = list_limit(req.limit);
        let transitions = self
            .pipeline
            .transitions(&req.upstream, &req.project, limit, req.all)?;
        Ok(Response::new(ListTransitionsResponse {
            transitions: transitions.into_iter().map(Into::into).collect(),
        }))
    }

    async fn calibrate(
        &self,
        request: Request<CalibrateRequest>,
    ) -> Result<Response<CalibrateResponse>, Status> {
        let req = request.into_inner();
        // Never report a run a crash could still take back.
        self.dispatch.sync().await?;
        let asked = crate::pipeline::calibrate::CalibrateRequest {
            project: req.project,
            upstream: req.upstream,
            platform: req.platform,
            runs: match req.runs {
                0 => crate::pipeline::calibrate::DEFAULT_CALIBRATION_RUNS,
                n => n,
            },
            job: req.job,
        };
        Ok(Response::new(
            self.pipeline.calibration_summary(&asked).await?,
        ))
    }

    async fn list_flaky(
        &self,
        request: Request<ListFlakyRequest>,
    ) -> Result<Response<ListFlakyResponse>, Status> {
        let req = request.into_inner();
        self.dispatch.sync().await?;
        Ok(Response::new(ListFlakyResponse {
            projects: self.pipeline.flaky(&req.project)?,
        }))
    }

    async fn list_artifacts(
        &self,
        _request: Request<ListArtifactsRequest>,
    ) -> Result<Response<ListArtifactsResponse>, Status> {
        let artifacts = self.artifacts.list().map_err(|e| {
            tracing::error!("{e}");
            Status::unavailable(format!("cannot list artifacts: {e}"))
        })?;
        Ok(Response::new(ListArtifactsResponse { artifacts }))
    }

    async fn create_token(
        &self,
        request: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        let req = request.into_inner();
        let ttl = if req.ttl_secs == 0 {
            self.default_token_ttl
        } else {
            Duration::from_secs(req.ttl_secs)
        };
        if ttl > self.max_token_ttl {
            return Err(Status::invalid_argument(format!(
                "a token may live at most {} (enrollment.max_token_ttl); asked for {}",
                fmt_duration(self.max_token_ttl),
                fmt_duration(ttl)
            )));
        }
        for label in &req.labels {
            if label.is_empty()
                || !label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            {
                return Err(Status::invalid_argument(format!(
                    "{label:?} is not a valid label: use letters, digits, '.', '_' and '-'"
                )));
            }
        }
        let (rec, token) = self
            .credentials
            .create_token(
                Grant {
                    labels: req.labels,
                    trusted: req.trusted,
                    max_parallel_jobs: req.max_parallel_jobs,
                },
                ttl,
                req.uses,
                req.note,
            )
            .await?;
        tracing::info!(token = %rec.id, uses = rec.uses_total, trusted = rec.grant.trusted, "enrollment token created");
        let enrollment = Enrollment {
            hub: self.public_address.clone(),
            token,
            ca_sha256: self.ca_sha256.clone(),
        };
        Ok(Response::new(CreateTokenResponse {
            token_id: rec.id,
            enrollment: enrollment.encode(),
            expires_at_ms: rec.expires_at_ms,
        }))
    }

    async fn list_tokens(
        &self,
        _request: Request<ListTokensRequest>,
    ) -> Result<Response<ListTokensResponse>, Status> {
        let tokens = self
            .credentials
            .list_tokens()?
            .into_iter()
            .map(token_info)
            .collect();
        Ok(Response::new(ListTokensResponse { tokens }))
    }

    async fn revoke_token(
        &self,
        request: Request<RevokeTokenRequest>,
    ) -> Result<Response<RevokeTokenResponse>, Status> {
        let id = request.into_inner().token_id;
        let token = self.credentials.revoke_token(&id).await?;
        tracing::info!(token = %id, "enrollment token revoked");
        Ok(Response::new(RevokeTokenResponse {
            token: Some(token_info(token)),
        }))
    }

    async fn list_agents(
        &self,
        _request: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        let agents = crate::dispatch::agent_views(&self.credentials, &self.dispatch)?;
        Ok(Response::new(ListAgentsResponse { agents }))
    }

    async fn revoke_agent(
        &self,
        request: Request<RevokeAgentRequest>,
    ) -> Result<Response<RevokeAgentResponse>, Status> {
        let id = request.into_inner().agent_id;
        let requeued =
            crate::dispatch::revoke_agent(&self.credentials, &self.dispatch, &id).await?;
        tracing::info!(agent = %id, requeued = requeued.len(), "agent revoked");
        Ok(Response::new(RevokeAgentResponse { requeued }))
    }

    async fn release_agent(
        &self,
        request: Request<ReleaseAgentRequest>,
    ) -> Result<Response<ReleaseAgentResponse>, Status> {
        let id = request.into_inner().agent_id;
        crate::dispatch::release_agent(&self.credentials, &self.dispatch, &id).await?;
        tracing::info!(agent = %id, "agent released from quarantine");
        Ok(Response::new(ReleaseAgentResponse {}))
    }

    async fn drain_agent(
        &self,
        request: Request<DrainAgentRequest>,
    ) -> Result<Response<DrainAgentResponse>, Status> {
        let req = request.into_inner();
        let grace = if req.grace_secs == 0 {
            self.drain_grace
        } else {
            Duration::from_secs(req.grace_secs)
        };
        if grace > MAX_DRAIN_GRACE {
            return Err(Status::invalid_argument(format!(
                "a drain's grace period may be at most {}; asked for {}",
                fmt_duration(MAX_DRAIN_GRACE),
                fmt_duration(grace)
            )));
        }
        self.dispatch.drain(&req.agent_id, grace)?;
        tracing::info!(agent = %req.agent_id, "drain requested");
        Ok(Response::new(DrainAgentResponse {}))
    }

    async fn submit_job(
        &self,
        request: Request<SubmitJobRequest>,
    ) -> Result<Response<SubmitJobResponse>, Status> {
        let req = request.into_inner();
        let spec = req
            .spec
            .ok_or_else(|| Status::invalid_argument("SubmitJob needs a spec"))?;
        if req.idempotency_key.is_empty() {
            let job_id = self.dispatch.submit(spec, req.max_attempts).await?;
            return Ok(Response::new(SubmitJobResponse { job_id }));
        }
        let key =
            crate::job_key::submit_key(&req.idempotency_key).map_err(Status::invalid_argument)?;
        // A retry of a submit whose answer was lost gets the first job.
        let (job_id, _new) = self
            .dispatch
            .submit_keyed(spec, req.max_attempts, key)
            .await?;
        Ok(Response::new(SubmitJobResponse { job_id }))
    }

    async fn get_job(&self, request: Request<GetJobRequest>) -> Result<Response<JobInfo>, Status> {
        let id = request.into_inner().job_id;
        match self.dispatch.get(id)? {
            Some(rec) => {
                if rec.state == JobState::Finished {
                    // Never show a result a crash could still take back.
                    self.dispatch.sync().await?;
                }
                let mut info = job_info(rec);
                info.waiting = self.dispatch.waiting(id).unwrap_or_default();
                Ok(Response::new(info))
            }
            None => Err(Status::not_found(format!(
                "no job {id}: see `trunkfarm job list`"
            ))),
        }
    }

    async fn list_jobs(
        &self,
        request: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        let req = request.into_inner();
        let state = state_from_proto(req.state());
        let limit = list_limit(req.limit);
        let project = req.project.trim();
        let keep = |job: &crate::dispatch::JobRecord| {
            state.is_none_or(|want| want == job.state)
                && (project.is_empty() || job.spec.project == project)
        };
        let jobs = self
            .dispatch
            .list(keep, limit)?
            .into_iter()
            .map(|rec| {
                let mut info = job_info(rec);
                info.waiting = self.dispatch.waiting(info.job_id).unwrap_or_default();
                info
            })
            .collect();
        Ok(Response::new(ListJobsResponse { jobs }))
    }

    async fn cancel_job(
        &self,
        request: Request<CancelJobRequest>,
    ) -> Result<Response<CancelJobResponse>, Status> {
        let id = request.into_inner().job_id;
        self.dispatch.cancel(id).await?;
        Ok(Response::new(CancelJobResponse {}))
    }

    type WatchJobStream = ReceiverStream<Result<WatchJobEvent, Status>>;

    async fn watch_job(
        &self,
        request: Request<WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let id = request.into_inner().job_id;
        if self.dispatch.get(id)?.is_none() {
            return Err(Status::not_found(format!(
                "no job {id}: see `trunkfarm job list`"
            )));
        }
        let live = self.logs.subscribe(id);
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(watch(
            id,
            live,
            tx,
            self.dispatch.clone(),
            self.logs.clone(),
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Streams a job's stored log, then its live chunks, then its final record.
/// The job's log is pinned meanwhile ([`JobLogs::pin`]): no attempt of it is
/// compacted while chunks are matched by seq here.
async fn watch(
    id: u64,
    mut live: broadcast::Receiver<WatchEvent>,
    tx: mpsc::Sender<Result<WatchJobEvent, Status>>,
    dispatch: Dispatcher,
    logs: Arc<JobLogs>,
) {
    let _pin = logs.pin(id);
    let mut seen: HashSet<(u32, u64)> = HashSet::new();
    let finish = || -> Result<WatchJobEvent, Status> {
        let rec = dispatch
            .get(id)?
            .ok_or_else(|| Status::not_found(format!("job {id} vanished")))?;
        Ok(WatchJobEvent {
            event: Some(watch_job_event::Event::Finished(job_info(rec))),
        })
    };
    let already_finished = matches!(dispatch.get(id), Ok(Some(r)) if r.state == JobState::Finished);
    if already_finished {
        // Nothing will publish to the channel `subscribe` made: drop it.
        logs.finished(id, 0);
    }
    if !replay(&logs, id, &mut seen, &tx).await {
        return;
    }
    if !already_finished {
        loop {
            match live.recv().await {
                Ok(WatchEvent::Log(chunk)) => {
                    if !send_chunk(chunk, &mut seen, &tx).await {
                        return;
                    }
                }
                Ok(WatchEvent::Finished) | Err(broadcast::error::RecvError::Closed) => break,
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    if !replay(&logs, id, &mut seen, &tx).await {
                        return;
                    }
                }
            }
        }
        // Chunks stored between the last live event and the finish.
        if !replay(&logs, id, &mut seen, &tx).await {
            return;
        }
    }
    // Never show a result a crash could still take back.
    if let Err(e) = dispatch.sync().await {
        let _ = tx.send(Err(Status::from(e))).await;
        return;
    }
    let _ = tx.send(finish()).await;
}

/// Sends a chunk the watcher has not seen yet; false once the watcher is
/// gone.
async fn send_chunk(
    chunk: LogChunk,
    seen: &mut HashSet<(u32, u64)>,
    tx: &mpsc::Sender<Result<WatchJobEvent, Status>>,
) -> bool {
    let key = (chunk.job.map(|j| j.attempt).unwrap_or(0), chunk.seq);
    if !seen.insert(key) {
        return true;
    }
    let event = WatchJobEvent {
        event: Some(watch_job_event::Event::Log(chunk)),
    };
    tx.send(Ok(event)).await.is_ok()
}

/// Sends what is stored of the job's log that the watcher has not seen,
/// attempt by attempt: stored chunks as they are, a compacted attempt one
/// frame at a time (cut where the stream changes). False once the watcher is gone or the log
/// cannot be read (the watcher is told why).
async fn replay(
    logs: &JobLogs,
    id: u64,
    seen: &mut HashSet<(u32, u64)>,
    tx: &mpsc::Sender<Result<WatchJobEvent, Status>>,
) -> bool {
    let result: Result<bool, Status> = async {
        for attempt in logs.attempts(id)? {
            match logs.compacted(id, attempt)? {
                Some(rec) => {
                    let runs = logs.stream_runs(&rec).await?;
                    let (mut frame, mut seq) = (0, 0);
                    while let Some(chunks) = logs
                        .frame_chunks(id, attempt, &rec, &runs, frame, &mut seq)
                        .await?
                    {
                        for chunk in chunks {
                            if !send_chunk(chunk, seen, tx).await {
                                return Ok(false);
                            }
                        }
                        frame += 1;
                    }
                }
                None => {
                    for chunk in logs.read_attempt(id, attempt).await? {
                        if !send_chunk(chunk, seen, tx).await {
                            return Ok(false);
                        }
                    }
                }
            }
        }
        Ok(true)
    }
    .await;
    match result {
        Ok(alive) => alive,
        Err(status) => {
            let _ = tx.send(Err(status)).await;
            false
        }
    }
}

/// A token as the admin API shows it (never its secret).
fn token_info(t: crate::auth::credentials::TokenRecord) -> TokenInfo {
    TokenInfo {
        token_id: t.id,
        labels: t.grant.labels,
        trusted: t.grant.trusted,
        max_parallel_jobs: t.grant.max_parallel_jobs,
        created_at_ms: t.created_at_ms,
        expires_at_ms: t.expires_at_ms,
        uses_left: t.uses_left,
        uses_total: t.uses_total,
        revoked: t.revoked,
        note: t.note,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(auth: &mut AdminAuth, authorization: Option<&str>) -> Result<(), Status> {
        let mut request = Request::new(());
        if let Some(value) = authorization {
            request
                .metadata_mut()
                .insert(trunkfarm_proto::AUTHORIZATION, value.parse().unwrap());
        }
        auth.call(request).map(drop)
    }

    #[test]
    fn only_the_admin_token_passes_and_a_refusal_says_what_to_send() {
        let mut auth = AdminAuth {
            token_hash: Arc::from(secret::hash("right-token").as_str()),
        };
        assert!(call(&mut auth, Some("Bearer right-token")).is_ok());

        let missing = call(&mut auth, None).unwrap_err();
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);
        assert!(
            missing.message().contains("authorization: Bearer"),
            "{missing:?}"
        );
        let not_bearer = call(&mut auth, Some("right-token")).unwrap_err();
        assert_eq!(not_bearer.code(), tonic::Code::Unauthenticated);

        let wrong = call(&mut auth, Some("Bearer wrong-token")).unwrap_err();
        assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
        assert!(wrong.message().contains("admin.token"), "{wrong:?}");
    }
}
