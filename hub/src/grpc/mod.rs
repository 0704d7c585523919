//! The gRPC services: thin translations between the wire types and the
//! modules that own the state (credentials, dispatch, logs).

pub mod admin;
pub mod agent;

use tonic::{Request, Status};
use trunkfarm_proto::v1;

use crate::auth::credentials::AuthError;
use crate::dispatch::{DispatchError, JobRecord, JobState};
use crate::store::StoreError;

/// The credential in `authorization: Bearer <credential>`.
pub fn bearer<T>(request: &Request<T>) -> Result<&str, Status> {
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

/// Maps credential errors to statuses; the message is shown as is.
pub fn auth_status(e: AuthError) -> Status {
    let msg = e.to_string();
    match e {
        AuthError::Store(s) => store_status(s),
        AuthError::AgentRevoked(_) | AuthError::TokenRevoked(_) => Status::permission_denied(msg),
        AuthError::TokenExpired { .. } | AuthError::TokenUsedUp { .. } => {
            Status::permission_denied(msg)
        }
        AuthError::NoSuchAgent(_) | AuthError::NoSuchToken(_) => Status::not_found(msg),
        AuthError::TokenMalformed | AuthError::TokenInvalid(_) | AuthError::AgentInvalid => {
            Status::unauthenticated(msg)
        }
    }
}

/// A store failure: the hub could not make the change durable.
pub fn store_status(e: StoreError) -> Status {
    tracing::error!("{e}");
    Status::unavailable(format!("the hub cannot record this right now: {e}"))
}

/// Maps dispatch errors to statuses.
pub fn dispatch_status(e: DispatchError) -> Status {
    match e {
        DispatchError::Store(s) => store_status(s),
        DispatchError::InvalidJob(m) => Status::invalid_argument(m),
        e @ DispatchError::NoSuchJob(_) => Status::not_found(e.to_string()),
        e @ DispatchError::NotConnected(_) => Status::failed_precondition(e.to_string()),
        e @ DispatchError::NoRoom(_) => Status::resource_exhausted(e.to_string()),
    }
}

/// The wire form of a job state.
pub fn state_to_proto(state: JobState) -> v1::JobState {
    match state {
        JobState::Queued => v1::JobState::Queued,
        JobState::Leased => v1::JobState::Leased,
        JobState::Running => v1::JobState::Running,
        JobState::Finished => v1::JobState::Finished,
    }
}

/// The stored form of a wire job state (`None` for "any").
pub fn state_from_proto(state: v1::JobState) -> Option<JobState> {
    match state {
        v1::JobState::Unspecified => None,
        v1::JobState::Queued => Some(JobState::Queued),
        v1::JobState::Leased => Some(JobState::Leased),
        v1::JobState::Running => Some(JobState::Running),
        v1::JobState::Finished => Some(JobState::Finished),
    }
}

/// A job record as the admin API shows it.
pub fn job_info(rec: JobRecord) -> v1::JobInfo {
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
            r
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
            spec
        }),
        key: rec.key,
    }
}
