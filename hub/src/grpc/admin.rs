//! `AdminService`: what the operator's CLI (and later the dashboard and the
//! benchmarks) call. Every call is checked against the admin token.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use trunkfarm_proto::enrollment::Enrollment;
use trunkfarm_proto::v1::admin_service_server::AdminService;
use trunkfarm_proto::v1::*;

use super::{auth_status, bearer, dispatch_status, job_info, state_from_proto, store_status};
use crate::artifacts::Artifacts;
use crate::auth::credentials::Credentials;
use crate::auth::secret;
use crate::dispatch::{Dispatcher, JobState};
use crate::logs::{JobLogs, WatchEvent};
use crate::notify::{Notifier, NotifyError};
use crate::pipeline::{Pipeline, PipelineError};
use crate::provision::{InstanceState, Pools};

/// The longest grace period a drain may ask for (a week).
const MAX_DRAIN_GRACE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Default number of jobs `ListJobs` returns.
const DEFAULT_LIST_LIMIT: usize = 100;

/// The admin-facing service.
pub struct AdminApi {
    /// SHA-256 of the admin token.
    pub admin_token_hash: String,
    /// Tokens and agents.
    pub credentials: Credentials,
    /// The job queue.
    pub dispatch: Dispatcher,
    /// Job logs.
    pub logs: Arc<JobLogs>,
    /// The address put in enrollment strings.
    pub public_address: String,
    /// The CA fingerprint put in enrollment strings (`None`: plaintext hub).
    pub ca_sha256: Option<String>,
    /// Token lifetime when none is asked for.
    pub default_token_ttl: Duration,
    /// The longest token lifetime allowed.
    pub max_token_ttl: Duration,
    /// Drain grace when none is asked for.
    pub drain_grace: Duration,
    /// The trunk pipeline (status, breakage, builds on demand).
    pub pipeline: Pipeline,
    /// Stored runtime artifacts.
    pub artifacts: Artifacts,
    /// Subscriptions and the outbox.
    pub notifier: Notifier,
    /// On-demand agent pools.
    pub pools: Pools,
}

/// Maps notifier errors to statuses.
fn notify_status(e: NotifyError) -> Status {
    match e {
        NotifyError::Store(s) => store_status(s),
        NotifyError::Invalid(m) => Status::invalid_argument(m),
        NotifyError::Delivery(m) => Status::unavailable(m),
    }
}

/// Maps pipeline errors to statuses.
fn pipeline_status(e: PipelineError) -> Status {
    match e {
        PipelineError::Store(s) => store_status(s),
        PipelineError::Dispatch(d) => dispatch_status(d),
        e @ PipelineError::NoSuchUpstream(..) => Status::not_found(e.to_string()),
        e @ PipelineError::Git(crate::pipeline::GitError::NotFound(_)) => {
            Status::not_found(e.to_string())
        }
        e @ PipelineError::Git(_) => Status::unavailable(e.to_string()),
    }
}

impl AdminApi {
    fn check<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let presented = bearer(request)?;
        if secret::verify(presented, &self.admin_token_hash) {
            Ok(())
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
        self.check(&request)?;
        let all = request.into_inner().all;
        let connected = self.dispatch.connected();
        let mut pools = Vec::new();
        for cfg in self.pools.configs() {
            let backoff = self.pools.backoff(&cfg.name).map_err(store_status)?;
            let instances = self
                .pools
                .instances(&cfg.name)
                .map_err(store_status)?
                .into_iter()
                .filter(|i| {
                    all || matches!(
                        i.state,
                        InstanceState::Starting | InstanceState::Running | InstanceState::Stopping
                    )
                })
                .map(|i| InstanceInfo {
                    busy: connected
                        .get(&i.agent_id)
                        .is_some_and(|c| !c.running.is_empty()),
                    state: serde_json::to_value(i.state)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default(),
                    id: i.id,
                    handle: i.handle,
                    agent_id: i.agent_id,
                    created_at_ms: i.created_at_ms,
                    last_busy_ms: i.last_busy_ms,
                    detail: i.detail,
                })
                .collect();
            pools.push(PoolInfo {
                name: cfg.name.clone(),
                provisioner: format!("{:?}", cfg.provisioner).to_lowercase(),
                labels: cfg.labels.clone(),
                min_instances: cfg.min_instances,
                max_instances: cfg.max_instances,
                instances,
                failed_starts: backoff.failures,
                next_start_at_ms: backoff.next_start_at_ms,
                last_error: backoff.last_error,
            });
        }
        Ok(Response::new(ListPoolsResponse { pools }))
    }

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<SubscribeResponse>, Status> {
        self.check(&request)?;
        let sub = request.into_inner().subscription.unwrap_or_default();
        let created = self.notifier.subscribe(sub).await.map_err(notify_status)?;
        Ok(Response::new(SubscribeResponse { created }))
    }

    async fn unsubscribe(
        &self,
        request: Request<UnsubscribeRequest>,
    ) -> Result<Response<UnsubscribeResponse>, Status> {
        self.check(&request)?;
        let sub = request.into_inner().subscription.unwrap_or_default();
        let removed = self
            .notifier
            .unsubscribe(&sub)
            .await
            .map_err(notify_status)?;
        Ok(Response::new(UnsubscribeResponse { removed }))
    }

    async fn list_subscriptions(
        &self,
        request: Request<ListSubscriptionsRequest>,
    ) -> Result<Response<ListSubscriptionsResponse>, Status> {
        self.check(&request)?;
        let project = request.into_inner().project;
        let subscriptions = self
            .notifier
            .subscriptions(&project)
            .map_err(notify_status)?;
        Ok(Response::new(ListSubscriptionsResponse { subscriptions }))
    }

    async fn send_test_mail(
        &self,
        request: Request<SendTestMailRequest>,
    ) -> Result<Response<SendTestMailResponse>, Status> {
        self.check(&request)?;
        let to = request.into_inner().to;
        let response = self.notifier.send_test(&to).await.map_err(notify_status)?;
        Ok(Response::new(SendTestMailResponse { response }))
    }

    async fn list_mail(
        &self,
        request: Request<ListMailRequest>,
    ) -> Result<Response<ListMailResponse>, Status> {
        self.check(&request)?;
        let req = request.into_inner();
        let limit = if req.limit == 0 {
            DEFAULT_LIST_LIMIT
        } else {
            req.limit as usize
        };
        let mails = self
            .notifier
            .mails(limit, req.state())
            .map_err(notify_status)?;
        Ok(Response::new(ListMailResponse {
            mails,
            sender: self.notifier.describe(),
        }))
    }

    async fn build_upstream(
        &self,
        request: Request<BuildUpstreamRequest>,
    ) -> Result<Response<BuildUpstreamResponse>, Status> {
        self.check(&request)?;
        let req = request.into_inner();
        let (commit, builds) = self
            .pipeline
            .build(&req.upstream, req.rev.trim(), req.force)
            .await
            .map_err(pipeline_status)?;
        tracing::info!(upstream = %req.upstream, "build of {} requested", crate::commit::short(&commit));
        Ok(Response::new(BuildUpstreamResponse { commit, builds }))
    }

    async fn get_status(
        &self,
        request: Request<GetStatusRequest>,
    ) -> Result<Response<GetStatusResponse>, Status> {
        self.check(&request)?;
        let req = request.into_inner();
        // Never show a result a crash could still take back.
        self.dispatch.sync().await.map_err(store_status)?;
        let status = self
            .pipeline
            .status(&req.upstream)
            .map_err(pipeline_status)?;
        Ok(Response::new(status))
    }

    async fn get_breakage(
        &self,
        request: Request<GetBreakageRequest>,
    ) -> Result<Response<GetBreakageResponse>, Status> {
        self.check(&request)?;
        let req = request.into_inner();
        let resp = self
            .pipeline
            .breakage(&req.upstream, req.rev.trim())
            .await
            .map_err(pipeline_status)?;
        Ok(Response::new(resp))
    }

    async fn list_transitions(
        &self,
        request: Request<ListTransitionsRequest>,
    ) -> Result<Response<ListTransitionsResponse>, Status> {
        self.check(&request)?;
        let req = request.into_inner();
        let limit = if req.limit == 0 {
            DEFAULT_LIST_LIMIT
        } else {
            req.limit as usize
        };
        let transitions = self
            .pipeline
            .transitions(&req.upstream, &req.project, limit, req.all)
            .map_err(pipeline_status)?;
        Ok(Response::new(ListTransitionsResponse { transitions }))
    }

    async fn list_artifacts(
        &self,
        request: Request<ListArtifactsRequest>,
    ) -> Result<Response<ListArtifactsResponse>, Status> {
        self.check(&request)?;
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
        self.check(&request)?;
        let req = request.into_inner();
        let ttl = if req.ttl_secs == 0 {
            self.default_token_ttl
        } else {
            Duration::from_secs(req.ttl_secs)
        };
        if ttl > self.max_token_ttl {
            return Err(Status::invalid_argument(format!(
                "a token may live at most {} (enrollment.max_token_ttl); asked for {}",
                humantime::format_duration(self.max_token_ttl),
                humantime::format_duration(ttl)
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
            .create_token(req.labels, ttl, req.uses, req.note)
            .await
            .map_err(auth_status)?;
        tracing::info!(token = %rec.id, uses = rec.uses_total, "enrollment token created");
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
        request: Request<ListTokensRequest>,
    ) -> Result<Response<ListTokensResponse>, Status> {
        self.check(&request)?;
        let tokens = self
            .credentials
            .list_tokens()
            .map_err(auth_status)?
            .into_iter()
            .map(|t| TokenInfo {
                token_id: t.id,
                labels: t.labels,
                created_at_ms: t.created_at_ms,
                expires_at_ms: t.expires_at_ms,
                uses_left: t.uses_left,
                uses_total: t.uses_total,
                revoked: t.revoked,
                note: t.note,
            })
            .collect();
        Ok(Response::new(ListTokensResponse { tokens }))
    }

    async fn revoke_token(
        &self,
        request: Request<RevokeTokenRequest>,
    ) -> Result<Response<RevokeTokenResponse>, Status> {
        self.check(&request)?;
        let id = request.into_inner().token_id;
        self.credentials
            .revoke_token(&id)
            .await
            .map_err(auth_status)?;
        tracing::info!(token = %id, "enrollment token revoked");
        Ok(Response::new(RevokeTokenResponse {}))
    }

    async fn list_agents(
        &self,
        request: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        self.check(&request)?;
        let connected = self.dispatch.connected();
        let mut agents: Vec<AgentInfo> = self
            .credentials
            .list_agents()
            .map_err(auth_status)?
            .into_iter()
            .map(|a| {
                let live = connected.get(&a.id);
                AgentInfo {
                    last_seen_ms: self.dispatch.last_seen(&a.id).unwrap_or(0),
                    connected: live.is_some(),
                    draining: live.is_some_and(|c| c.draining),
                    running: live.map(|c| c.running.clone()).unwrap_or_default(),
                    capabilities: live.map(|c| c.caps.clone()),
                    agent_version: live.map(|c| c.agent_version.clone()).unwrap_or_default(),
                    remote_address: live.map(|c| c.remote.clone()).unwrap_or_default(),
                    labels: live.map(|c| c.labels.clone()).unwrap_or(a.labels),
                    agent_id: a.id,
                    name: a.name,
                    revoked: a.revoked,
                    enrolled_at_ms: a.enrolled_at_ms,
                }
            })
            .collect();
        agents.sort_by(|a, b| a.name.cmp(&b.name).then(a.agent_id.cmp(&b.agent_id)));
        Ok(Response::new(ListAgentsResponse { agents }))
    }

    async fn revoke_agent(
        &self,
        request: Request<RevokeAgentRequest>,
    ) -> Result<Response<RevokeAgentResponse>, Status> {
        self.check(&request)?;
        let id = request.into_inner().agent_id;
        let requeued = crate::dispatch::revoke_agent(&self.credentials, &self.dispatch, &id)
            .await
            .map_err(|e| match e {
                crate::dispatch::RevokeError::Credential(e) => auth_status(e),
                crate::dispatch::RevokeError::Session(e) => dispatch_status(e),
            })?;
        tracing::info!(agent = %id, requeued = requeued.len(), "agent revoked");
        Ok(Response::new(RevokeAgentResponse { requeued }))
    }

    async fn drain_agent(
        &self,
        request: Request<DrainAgentRequest>,
    ) -> Result<Response<DrainAgentResponse>, Status> {
        self.check(&request)?;
        let req = request.into_inner();
        let grace = if req.grace_secs == 0 {
            self.drain_grace
        } else {
            Duration::from_secs(req.grace_secs)
        };
        if grace > MAX_DRAIN_GRACE {
            return Err(Status::invalid_argument(format!(
                "a drain's grace period may be at most {}; asked for {}",
                humantime::format_duration(MAX_DRAIN_GRACE),
                humantime::format_duration(grace)
            )));
        }
        self.dispatch
            .drain(&req.agent_id, grace)
            .map_err(dispatch_status)?;
        tracing::info!(agent = %req.agent_id, "drain requested");
        Ok(Response::new(DrainAgentResponse {}))
    }

    async fn submit_job(
        &self,
        request: Request<SubmitJobRequest>,
    ) -> Result<Response<SubmitJobResponse>, Status> {
        self.check(&request)?;
        let req = request.into_inner();
        let spec = req
            .spec
            .ok_or_else(|| Status::invalid_argument("SubmitJob needs a spec"))?;
        let job_id = self
            .dispatch
            .submit(spec, req.max_attempts)
            .await
            .map_err(dispatch_status)?;
        Ok(Response::new(SubmitJobResponse { job_id }))
    }

    async fn get_job(&self, request: Request<GetJobRequest>) -> Result<Response<JobInfo>, Status> {
        self.check(&request)?;
        let id = request.into_inner().job_id;
        match self.dispatch.get(id).map_err(store_status)? {
            Some(rec) => {
                if rec.state == JobState::Finished {
                    // Never show a result a crash could still take back.
                    self.dispatch.sync().await.map_err(store_status)?;
                }
                Ok(Response::new(job_info(rec)))
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
        self.check(&request)?;
        let req = request.into_inner();
        let state = state_from_proto(req.state());
        let limit = if req.limit == 0 {
            DEFAULT_LIST_LIMIT
        } else {
            req.limit as usize
        };
        let jobs = self
            .dispatch
            .list(state, limit)
            .map_err(store_status)?
            .into_iter()
            .map(job_info)
            .collect();
        Ok(Response::new(ListJobsResponse { jobs }))
    }

    async fn cancel_job(
        &self,
        request: Request<CancelJobRequest>,
    ) -> Result<Response<CancelJobResponse>, Status> {
        self.check(&request)?;
        let id = request.into_inner().job_id;
        self.dispatch.cancel(id).await.map_err(dispatch_status)?;
        Ok(Response::new(CancelJobResponse {}))
    }

    type WatchJobStream = ReceiverStream<Result<WatchJobEvent, Status>>;

    async fn watch_job(
        &self,
        request: Request<WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        self.check(&request)?;
        let id = request.into_inner().job_id;
        if self.dispatch.get(id).map_err(store_status)?.is_none() {
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
async fn watch(
    id: u64,
    mut live: broadcast::Receiver<WatchEvent>,
    tx: mpsc::Sender<Result<WatchJobEvent, Status>>,
    dispatch: Dispatcher,
    logs: Arc<JobLogs>,
) {
    let mut seen: HashSet<(u32, u64)> = HashSet::new();
    let send_chunk = |chunk: LogChunk, seen: &mut HashSet<(u32, u64)>| {
        let key = (chunk.job.map(|j| j.attempt).unwrap_or(0), chunk.seq);
        seen.insert(key).then(|| {
            Ok(WatchJobEvent {
                event: Some(watch_job_event::Event::Log(chunk)),
            })
        })
    };
    let replay = |seen: &mut HashSet<(u32, u64)>| -> Result<Vec<_>, Status> {
        Ok(logs
            .read(id, None)
            .map_err(store_status)?
            .into_iter()
            .filter_map(|c| send_chunk(c, seen))
            .collect())
    };
    let finish = || -> Result<WatchJobEvent, Status> {
        let rec = dispatch
            .get(id)
            .map_err(store_status)?
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
    match replay(&mut seen) {
        Ok(events) => {
            for e in events {
                if tx.send(e).await.is_err() {
                    return;
                }
            }
        }
        Err(status) => {
            let _ = tx.send(Err(status)).await;
            return;
        }
    }
    if !already_finished {
        loop {
            match live.recv().await {
                Ok(WatchEvent::Log(chunk)) => {
                    if let Some(e) = send_chunk(chunk, &mut seen)
                        && tx.send(e).await.is_err()
                    {
                        return;
                    }
                }
                Ok(WatchEvent::Finished) | Err(broadcast::error::RecvError::Closed) => break,
                Err(broadcast::error::RecvError::Lagged(_)) => match replay(&mut seen) {
                    Ok(events) => {
                        for e in events {
                            if tx.send(e).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                },
            }
        }
        // Chunks stored between the last live event and the finish.
        if let Ok(events) = replay(&mut seen) {
            for e in events {
                if tx.send(e).await.is_err() {
                    return;
                }
            }
        }
    }
    // Never show a result a crash could still take back.
    if let Err(e) = dispatch.sync().await {
        let _ = tx.send(Err(store_status(e))).await;
        return;
    }
    let _ = tx.send(finish()).await;
}
