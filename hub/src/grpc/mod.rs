//! The gRPC services: thin translations between the wire types and the
//! modules that own the state (credentials, dispatch, logs). The admin
//! token is checked once, by [`admin::AdminAuth`], for every admin call;
//! each module's error becomes a status through one `From` impl here, so a
//! handler only writes `?`.

pub(crate) mod admin;
pub(crate) mod agent;

use tonic::{Request, Status};
use trunkfarm_proto::v1;

use crate::artifacts::ArtifactError;
use crate::auth::credentials::AuthError;
use crate::dispatch::{DispatchError, JobRecord, JobState, RevokeError};
use crate::logs::LogsError;
use crate::notify::NotifyError;
use crate::pipeline::{GitError, PipelineError};
use crate::store::StoreError;

/// The credential in `authorization: Bearer <credential>`.
fn bearer<T>(request: &Request<T>) -> Result<&str, Status> {
    request
        .metadata()
        .get(trunkfarm_proto::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            Status::unauthenticated(
                "missing credential: send `authorization: Bearer <credential>` metadata",
            )
        })
}

/// A store failure: the hub could not make the change durable. Logged
/// here, since the caller only sees that it should try again.
impl From<StoreError> for Status {
    fn from(e: StoreError) -> Status {
        tracing::error!("{e}");
        Status::unavailable(format!("the hub cannot record this right now: {e}"))
    }
}

/// Credential errors; the message is shown as is.
impl From<AuthError> for Status {
    fn from(e: AuthError) -> Status {
        let msg = e.to_string();
        match e {
            AuthError::Store(s) => s.into(),
            AuthError::AgentRevoked(_) | AuthError::TokenRevoked(_) => {
                Status::permission_denied(msg)
            }
            AuthError::TokenExpired { .. } | AuthError::TokenUsedUp { .. } => {
                Status::permission_denied(msg)
            }
            AuthError::NoSuchAgent(_) | AuthError::NoSuchToken(_) => Status::not_found(msg),
            AuthError::TokenMalformed | AuthError::TokenInvalid(_) | AuthError::AgentInvalid => {
                Status::unauthenticated(msg)
            }
        }
    }
}

impl From<DispatchError> for Status {
    fn from(e: DispatchError) -> Status {
        match e {
            DispatchError::Store(s) => s.into(),
            DispatchError::InvalidJob(m) => Status::invalid_argument(m),
            e @ DispatchError::NoSuchJob(_) => Status::not_found(e.to_string()),
            e @ DispatchError::NotConnected(_) => Status::failed_precondition(e.to_string()),
            e @ DispatchError::NoRoom(_) => Status::resource_exhausted(e.to_string()),
        }
    }
}

/// Revoking an agent: the credential's error, or the session's.
impl From<RevokeError> for Status {
    fn from(e: RevokeError) -> Status {
        match e {
            RevokeError::Credential(e) => e.into(),
            RevokeError::Session(e) => e.into(),
        }
    }
}

impl From<NotifyError> for Status {
    fn from(e: NotifyError) -> Status {
        match e {
            NotifyError::Store(s) => s.into(),
            NotifyError::Invalid(m) => Status::invalid_argument(m),
            NotifyError::Delivery(m) => Status::unavailable(m),
        }
    }
}

impl From<PipelineError> for Status {
    fn from(e: PipelineError) -> Status {
        match e {
            PipelineError::Store(s) => s.into(),
            PipelineError::Dispatch(d) => d.into(),
            e @ (PipelineError::NoSuchUpstream(..) | PipelineError::NoSuchProject(..)) => {
                Status::not_found(e.to_string())
            }
            PipelineError::Invalid(why) => Status::invalid_argument(why),
            e @ PipelineError::Git(GitError::NotFound(_)) => Status::not_found(e.to_string()),
            e @ PipelineError::Git(_) => Status::unavailable(e.to_string()),
            PipelineError::Auth(a) => a.into(),
            PipelineError::Logs(l) => l.into(),
        }
    }
}

/// A log that cannot be read: the database's failure as such, the object
/// store's as "try again" (the log is still there).
impl From<LogsError> for Status {
    fn from(e: LogsError) -> Status {
        match e {
            LogsError::Store(s) => s.into(),
            e => {
                tracing::warn!("{e}");
                Status::unavailable(format!("the log cannot be read right now: {e}"))
            }
        }
    }
}

/// Artifact errors as agents see them; the message is shown as is.
impl From<ArtifactError> for Status {
    fn from(e: ArtifactError) -> Status {
        let msg = e.to_string();
        match e {
            ArtifactError::Store(s) => s.into(),
            ArtifactError::Objects(_) => {
                tracing::error!("{msg}");
                Status::unavailable(format!(
                    "the hub cannot reach its artifact store right now: {msg}"
                ))
            }
            ArtifactError::Io { .. } => {
                tracing::error!("{msg}");
                Status::unavailable(format!("the hub cannot store artifacts right now: {msg}"))
            }
            ArtifactError::BadSha(_)
            | ArtifactError::NoMeta
            | ArtifactError::MetaRepeated
            | ArtifactError::NoJob
            | ArtifactError::TooLong { .. }
            | ArtifactError::TooShort { .. }
            | ArtifactError::HashMismatch { .. } => Status::invalid_argument(msg),
            ArtifactError::TooLarge { .. } | ArtifactError::NoRoom(_) => {
                Status::resource_exhausted(msg)
            }
            ArtifactError::NotHeld { .. } => Status::permission_denied(msg),
            ArtifactError::NotFound(_) => Status::not_found(msg),
            ArtifactError::Corrupt(_) => Status::data_loss(msg),
            ArtifactError::NotOurs(_) => Status::failed_precondition(msg),
            // The uploader's own stream failed: its status says why.
            ArtifactError::Stream(status) => status,
        }
    }
}

/// The wire form of a job state.
fn state_to_proto(state: JobState) -> v1::JobState {
    match state {
        JobState::Queued => v1::JobState::Queued,
        JobState::Leased => v1::JobState::Leased,
        JobState::Running => v1::JobState::Running,
        JobState::Finished => v1::JobState::Finished,
    }
}

/// The stored form of a wire job state (`None` for "any").
fn state_from_proto(state: v1::JobState) -> Option<JobState> {
    match state {
        v1::JobState::Unspecified => None,
        v1::JobState::Queued => Some(JobState::Queued),
        v1::JobState::Leased => Some(JobState::Leased),
        v1::JobState::Running => Some(JobState::Running),
        v1::JobState::Finished => Some(JobState::Finished),
    }
}

/// A job record as the admin API shows it.
fn job_info(rec: JobRecord) -> v1::JobInfo {
    v1::JobInfo {
        job_id: rec.id,
        state: state_to_proto(rec.state).into(),
        attempt: rec.attempt,
        max_attempts: rec.max_attempts,
        agent_id: rec.agent_id,
        created_at_ms: rec.created_at_ms,
        finished_at_ms: rec.finished_at_ms,
        // Report files are parsed into the run's results; listing jobs must
        // not carry megabytes of XML per job.
        result: rec.result.map(|mut r| {
            for report in &mut r.reports {
                report.data = Vec::new();
            }
            r.into()
        }),
        attempts: rec
            .attempts
            .into_iter()
            .map(|a| v1::Attempt {
                attempt: a.attempt,
                agent_id: a.agent_id,
                leased_at_ms: a.leased_at_ms,
                lost_reason: a.lost_reason,
            })
            .collect(),
        spec: Some({
            // Credentials in a repository URL are for agents, not for people
            // listing jobs.
            let mut spec = rec.spec;
            if let Some(repo) = spec.repository.as_mut() {
                repo.url = crate::pipeline::git::redact_url(&repo.url);
            }
            spec.into()
        }),
        key: rec.key,
        // Asked of dispatch by whoever shows a queued job (`Dispatcher::waiting`).
        waiting: String::new(),
    }
}
