//! `[storage]`: where artifacts and compacted logs live. The data dir (the
//! default, nothing to set up) or any S3-compatible object store (AWS S3,
//! MinIO, Ceph RGW, Cloudflare R2, …), always under this hub's own prefix so
//! several hubs can share one bucket. Credentials are read as for the EC2
//! provisioner (the hub's environment, else `~/.aws/credentials`); they never
//! appear here.

use std::time::Duration;

use serde::Deserialize;
use trunkfarm_proto::settings::{Problem, fmt_duration};

use super::de;

/// The longest a presigned URL may work: SigV4's own limit (7 days).
const MAX_PRESIGN_TTL: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// The shortest useful presigned URL: an agent must get to the GET.
const MIN_PRESIGN_TTL: Duration = Duration::from_secs(60);

/// Which backend holds the objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub(crate) enum StorageBackend {
    /// Files under `<data_dir>/objects` (and `<data_dir>/artifacts`).
    #[default]
    Local,
    /// An S3-compatible bucket.
    S3,
}

/// `[storage]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [storage] table")]
pub(crate) struct StorageSection {
    /// `local` (default) or `s3`.
    pub(crate) backend: StorageBackend,
    /// The bucket (s3 only; it must exist).
    pub(crate) bucket: String,
    /// Every object of this hub is under `<prefix>/` in the bucket.
    pub(crate) prefix: String,
    /// The bucket's region (s3; `us-east-1` by default).
    pub(crate) region: String,
    /// Another S3-compatible service than AWS (`http(s)://host:port`);
    /// requests are then path-style (`<endpoint>/<bucket>/<key>`).
    pub(crate) endpoint: Option<String>,
    /// How long a presigned download URL handed to an agent works.
    #[serde(deserialize_with = "de::duration")]
    pub(crate) presign_ttl: Duration,
    /// A finished job's log this large or larger is compacted into an
    /// object; a smaller one stays in the database (an object per tiny log
    /// costs a request and a file each and saves nothing) and goes with its
    /// job when retention prunes it. 0 compacts every log.
    #[serde(deserialize_with = "de::byte_size")]
    pub(crate) compact_logs_from: u64,
}

impl Default for StorageSection {
    fn default() -> Self {
        Self {
            backend: StorageBackend::Local,
            bucket: String::new(),
            prefix: "trunkfarm".into(),
            region: "us-east-1".into(),
            endpoint: None,
            presign_ttl: Duration::from_secs(15 * 60),
            compact_logs_from: 4 * 1024,
        }
    }
}

impl StorageSection {
    /// The prefix without leading or trailing slashes (`""` for none).
    pub(crate) fn clean_prefix(&self) -> &str {
        self.prefix.trim().trim_matches('/')
    }
}

/// The section's rules (what can be checked without the network; the hub
/// proves the bucket works when it starts).
pub(super) fn problems(s: &StorageSection) -> Result<(), Problem> {
    let prefix = s.clean_prefix();
    if prefix
        .split('/')
        .any(|part| part == "." || part == ".." || (part.is_empty() && !prefix.is_empty()))
        || !prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
    {
        return Err(Problem::new(
            "storage.prefix",
            format!(
                "{:?} is not a usable object prefix: use letters, digits and - _ . / (no empty, `.` or `..` parts), e.g. \"trunkfarm/hub-a\"",
                s.prefix
            ),
        ));
    }
    if !(MIN_PRESIGN_TTL..=MAX_PRESIGN_TTL).contains(&s.presign_ttl) {
        return Err(Problem::new(
            "storage.presign_ttl",
            format!(
                "{} is out of range: between {} and {} (S3's limit), e.g. \"15m\"",
                fmt_duration(s.presign_ttl),
                fmt_duration(MIN_PRESIGN_TTL),
                fmt_duration(MAX_PRESIGN_TTL)
            ),
        ));
    }
    match s.backend {
        StorageBackend::Local => {
            for (key, set) in [
                ("storage.bucket", !s.bucket.trim().is_empty()),
                ("storage.endpoint", s.endpoint.is_some()),
            ] {
                if set {
                    return Err(Problem::new(
                        key,
                        "is only used with `backend = \"s3\"`: set `storage.backend = \"s3\"` or remove it",
                    ));
                }
            }
        }
        StorageBackend::S3 => {
            let bucket = s.bucket.trim();
            if bucket.is_empty() {
                return Err(Problem::new(
                    "storage.bucket",
                    "is required with `backend = \"s3\"`: the name of an existing bucket, e.g. \"trunkfarm-artifacts\"",
                ));
            }
            let valid = (3..=63).contains(&bucket.len())
                && bucket
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
                && !bucket.starts_with(['-', '.'])
                && !bucket.ends_with(['-', '.']);
            if !valid {
                return Err(Problem::new(
                    "storage.bucket",
                    format!(
                        "{bucket:?} is not a valid bucket name: 3 to 63 lowercase letters, digits, - and ., starting and ending with a letter or digit"
                    ),
                ));
            }
            let region = s.region.trim();
            if region.is_empty()
                || !region
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            {
                return Err(Problem::new(
                    "storage.region",
                    format!("{region:?} is not a region name, e.g. \"us-east-1\" (R2: \"auto\")"),
                ));
            }
            if let Some(endpoint) = &s.endpoint {
                let ok = reqwest::Url::parse(endpoint.trim()).is_ok_and(|u| {
                    matches!(u.scheme(), "http" | "https")
                        && u.host_str().is_some()
                        && u.query().is_none()
                });
                if !ok {
                    return Err(Problem::new(
                        "storage.endpoint",
                        format!(
                            "{endpoint:?} is not an http(s) URL, e.g. \"https://minio.example.org:9000\""
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}
