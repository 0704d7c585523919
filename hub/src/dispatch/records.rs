//! What a job record holds of the wire's messages — its spec and its result
//! — as dispatch's own types, so the `jobs` tree's schema is not the wire
//! contract: a field added to the .proto changes nothing stored until it is
//! added here too, and a stored field can change without touching the wire.
//!
//! Each type writes exactly the JSON the proto-derived message wrote before
//! (same field names and order, enums as their numbers, `bytes` as base64),
//! so databases written then read the same. Conversions go by value: a
//! result's report files (up to megabytes) are moved, never copied.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use trunkfarm_proto::v1;

/// Identifies one attempt of one job (`v1::JobRef`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct JobRefRecord {
    pub(crate) job_id: u64,
    pub(crate) attempt: u32,
}

/// Where a job's sources come from (`v1::Repository`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct RepositoryRecord {
    pub(crate) url: String,
    /// A commit, tag or branch; empty means the default branch.
    pub(crate) rev: String,
}

/// Everything an agent needs to run one job (`v1::JobSpec`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct JobSpecRecord {
    pub(crate) commands: Vec<String>,
    pub(crate) env: HashMap<String, String>,
    /// Labels an agent must have to take the job.
    pub(crate) labels: Vec<String>,
    /// The project the job belongs to (matched against donors' allowlists).
    pub(crate) project: String,
    pub(crate) repository: Option<RepositoryRecord>,
    pub(crate) timeout_secs: u64,
    /// A runtime artifact the agent unpacks before the commands run.
    pub(crate) artifact_sha256: String,
    /// A runtime build: the directory the agent packs and uploads.
    pub(crate) upload_prefix: String,
    /// Report files (JUnit XML) the agent sends back with the result.
    pub(crate) report_paths: Vec<String>,
    /// Only a trusted agent may take it. Not written when false, so records
    /// of jobs anyone may take keep the bytes older hubs wrote.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(crate) trusted_only: bool,
    /// The job needs the network. Left out of the JSON when false, so the
    /// records of jobs without it read and write as before.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(crate) network: bool,
}

/// One report file a job produced, capped by the agent (`v1::ReportFile`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct ReportFileRecord {
    /// The path as given in the spec's `report_paths`.
    pub(crate) path: String,
    /// Base64 in JSON: four times smaller than an array of numbers.
    #[serde(with = "trunkfarm_proto::serde_base64")]
    pub(crate) data: Vec<u8>,
    /// The file was larger than the agent's cap (`data` holds its start).
    pub(crate) truncated: bool,
    /// Why the file could not be read; empty on success.
    pub(crate) error: String,
}

/// A job's one result (`v1::JobResult`), from its agent or made up by the
/// hub (lost attempts, cancel).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct JobResultRecord {
    pub(crate) job: Option<JobRefRecord>,
    /// A `v1::Outcome` number, kept as a number: an outcome a newer agent
    /// sends still reads.
    pub(crate) outcome: i32,
    /// Exit code of the last command run, when it exited normally.
    pub(crate) exit_code: Option<i32>,
    /// Why, for anything but a plain pass or fail.
    pub(crate) detail: String,
    pub(crate) duration_ms: u64,
    /// Log bytes the agent cut from the middle to stay under its cap.
    pub(crate) log_bytes_cut: u64,
    /// Unix ms the first command started.
    pub(crate) started_at_ms: u64,
    /// Seq of the last log chunk sent.
    pub(crate) last_log_seq: u64,
    /// The artifact a build uploaded, hex SHA-256.
    pub(crate) artifact_sha256: String,
    /// The spec's report files as found after the commands ran.
    pub(crate) reports: Vec<ReportFileRecord>,
    /// The agent gave the job back unfinished (its donor paused it now or
    /// unenrolled). Left out of the JSON when false, so results read and
    /// write as before.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(crate) handed_back: bool,
}

/// One field converted: as it is, or an optional (`opt`) or repeated
/// (`vec`) message each converted.
macro_rules! convert {
    ($value:expr) => {
        $value
    };
    ($value:expr, opt) => {
        $value.map(Into::into)
    };
    ($value:expr, vec) => {
        $value.into_iter().map(Into::into).collect()
    };
}

/// `From` both ways between a wire message and its record, by value. Both
/// sides are taken apart field by field (no `..`): a field added to the
/// .proto stops the build here until it is stored or knowingly left out
/// (then the two impls are written by hand).
macro_rules! both_ways {
    ($wire:path, $record:ident { $($field:ident $(as $how:ident)?),* $(,)? }) => {
        impl From<$wire> for $record {
            fn from(wire: $wire) -> Self {
                let $wire { $($field),* } = wire;
                $record { $($field: convert!($field $(, $how)?)),* }
            }
        }

        impl From<$record> for $wire {
            fn from(record: $record) -> Self {
                let $record { $($field),* } = record;
                $wire { $($field: convert!($field $(, $how)?)),* }
            }
        }
    };
}

both_ways!(v1::JobRef, JobRefRecord { job_id, attempt });
both_ways!(v1::Repository, RepositoryRecord { url, rev });
both_ways!(
    v1::JobSpec,
    JobSpecRecord {
        commands,
        env,
        labels,
        project,
        repository as opt,
        timeout_secs,
        artifact_sha256,
        upload_prefix,
        report_paths,
        trusted_only,
        network,
    }
);
both_ways!(
    v1::ReportFile,
    ReportFileRecord {
        path,
        data,
        truncated,
        error
    }
);
both_ways!(
    v1::JobResult,
    JobResultRecord {
        job as opt,
        outcome,
        exit_code,
        detail,
        duration_ms,
        log_bytes_cut,
        started_at_ms,
        last_log_seq,
        artifact_sha256,
        reports as vec,
        handed_back,
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_is_stored_only_when_asked_and_older_specs_read_without_it() {
        let old = r#"{"commands":["true"],"env":{},"labels":[],"project":"p","repository":null,"timeout_secs":60,"artifact_sha256":"","upload_prefix":"","report_paths":[]}"#;
        let rec: JobSpecRecord = serde_json::from_str(old).unwrap();
        assert!(!rec.network);
        // A job without the network writes the same bytes as before.
        assert_eq!(serde_json::to_string(&rec).unwrap(), old);
        let wire = v1::JobSpec {
            network: true,
            ..v1::JobSpec::from(rec)
        };
        let rec = JobSpecRecord::from(wire);
        let text = serde_json::to_string(&rec).unwrap();
        assert!(text.ends_with(r#","network":true}"#), "{text}");
        let back: JobSpecRecord = serde_json::from_str(&text).unwrap();
        assert!(v1::JobSpec::from(back).network);
    }
}
