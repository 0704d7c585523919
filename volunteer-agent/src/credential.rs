//! The agent's long-lived credential: what `enroll` obtains from the hub and
//! `run` presents to it on every session.
//!
//! It is stored as `<state-dir>/credential.json`, mode 0600, written
//! atomically. The secret in it is the agent's password: it never appears in
//! a log line, an error message or a `Debug` rendering.

use std::fmt;
use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tonic::metadata::{Ascii, MetadataValue};
use trunkfarm_proto::dial::HubTrust;

use crate::state;

/// The credential's file name inside the state directory.
const FILE_NAME: &str = "credential.json";

/// An enrolled agent's identity with its hub.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Credential {
    /// The hub's `host:port`, from the enrollment string.
    pub hub: String,
    /// The id the hub gave this agent (public: shown in `agent list`).
    pub agent_id: String,
    /// The agent's secret (without the `<agent-id>.` prefix).
    pub secret: String,
    /// The pinned SHA-256 of the hub's CA; `None` for a plaintext hub.
    pub ca_sha256: Option<String>,
    /// When the agent enrolled, RFC 3339 (informational).
    pub enrolled_at: String,
    /// The name chosen at enrollment, used by `run` unless the settings or
    /// the command line name the machine otherwise (so a restart does not
    /// rename the agent in the hub's list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Labels the enrollment token granted (informational: the hub applies
    /// them itself).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// The hub's name on this machine (`enroll --hub-name`, else made from
    /// its address; see `hubs.rs`); `None` in a credential written before
    /// an agent could serve several hubs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub_name: Option<String>,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("hub", &self.hub)
            .field("agent_id", &self.agent_id)
            .field("secret", &"<redacted>")
            .field("ca_sha256", &self.ca_sha256)
            .field("enrolled_at", &self.enrolled_at)
            .field("name", &self.name)
            .field("labels", &self.labels)
            .field("hub_name", &self.hub_name)
            .finish()
    }
}

/// Why the credential could not be loaded or used. No variant ever carries
/// the secret or the file's text.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CredentialError {
    /// There is no credential file: the machine was never enrolled (or the
    /// state directory is not the one used at enrollment).
    #[error(
        "this machine is not enrolled yet: run `trunkfarm-agent enroll <STRING>` first (looked in {})",
        .dir.display()
    )]
    NotEnrolled {
        /// The state directory searched.
        dir: PathBuf,
    },
    /// The file exists but cannot be read.
    #[error("cannot read the agent's credential {}: {error}", .path.display())]
    Read {
        /// The credential file.
        path: PathBuf,
        /// Why reading failed.
        error: io::Error,
    },
    /// The file is not a credential this agent understands.
    #[error(
        "the agent's credential {} is damaged ({detail}); enroll again with \
         `trunkfarm-agent enroll --force <STRING>`",
        .path.display()
    )]
    Invalid {
        /// The credential file.
        path: PathBuf,
        /// What is wrong, without quoting the file.
        detail: String,
    },
}

impl Credential {
    /// The credential file of the state directory `dir`.
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(FILE_NAME)
    }

    /// Loads the credential from the state directory `dir`.
    pub fn load(dir: &Path) -> Result<Credential, CredentialError> {
        let path = Self::path(dir);
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(CredentialError::NotEnrolled {
                    dir: dir.to_path_buf(),
                });
            }
            Err(error) => return Err(CredentialError::Read { path, error }),
        };
        let cred: Credential = serde_json::from_slice(&text).map_err(|e| {
            // serde_json's message may quote a value from the file (which
            // holds the secret): report only the kind and the position.
            let kind = match e.classify() {
                serde_json::error::Category::Io => "unreadable",
                serde_json::error::Category::Syntax => "not valid JSON",
                serde_json::error::Category::Data => "a field is missing or has the wrong type",
                serde_json::error::Category::Eof => "it ends too early",
            };
            CredentialError::Invalid {
                path: path.clone(),
                detail: format!("{kind}, at line {} column {}", e.line(), e.column()),
            }
        })?;
        let invalid = |detail: &str| CredentialError::Invalid {
            path: path.clone(),
            detail: detail.to_owned(),
        };
        if cred.hub.is_empty() {
            return Err(invalid("the hub address is empty"));
        }
        if cred.agent_id.is_empty() || cred.agent_id.contains('.') {
            return Err(invalid("the agent id is missing or malformed"));
        }
        if cred.secret.is_empty() || cred.bearer().is_err() {
            return Err(invalid("the secret is missing or malformed"));
        }
        if let Ok(meta) = std::fs::metadata(&path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                path = %path.display(),
                "the agent's credential is readable by other users; run `chmod 600` on it"
            );
        }
        Ok(cred)
    }

    /// Saves the credential into the state directory `dir` (which must
    /// exist): mode 0600, atomically.
    pub fn save(&self, dir: &Path) -> io::Result<()> {
        let mut json = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        json.push(b'\n');
        state::write_atomic(&Self::path(dir), &json, 0o600)
    }

    /// How to check the hub's identity: the pinned CA, or plaintext when the
    /// enrollment string carried no fingerprint.
    pub fn trust(&self) -> HubTrust {
        match &self.ca_sha256 {
            Some(sha256) => HubTrust::PinnedCa {
                sha256: sha256.clone(),
            },
            None => HubTrust::Plaintext,
        }
    }

    /// The `authorization` metadata value, `Bearer <agent-id>.<secret>`,
    /// marked sensitive so HTTP/2 never indexes it and `Debug` hides it.
    /// `Err` (with no detail, which could only quote the secret) when the
    /// credential holds characters a header cannot carry.
    pub fn bearer(&self) -> Result<MetadataValue<Ascii>, InvalidSecret> {
        let mut value =
            MetadataValue::try_from(format!("Bearer {}.{}", self.agent_id, self.secret))
                .map_err(|_| InvalidSecret)?;
        value.set_sensitive(true);
        Ok(value)
    }
}

/// The credential cannot be sent as a header. Deliberately says nothing more.
#[derive(Debug, thiserror::Error)]
#[error("the agent's credential contains characters that cannot be sent to the hub")]
pub(crate) struct InvalidSecret;

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "s3cr3t-Value_0123456789abcdefghijklmnopqrstu";

    fn cred() -> Credential {
        Credential {
            hub: "hub.example:7443".into(),
            agent_id: "ag_0123456789ab".into(),
            secret: SECRET.into(),
            ca_sha256: Some("ab".repeat(32)),
            enrolled_at: "2025-01-02T03:04:05Z".into(),
            name: Some("box".into()),
            labels: vec!["gpu".into()],
            hub_name: None,
        }
    }

    #[test]
    fn round_trip_with_private_mode() {
        let dir = tempfile::tempdir().unwrap();
        let c = cred();
        c.save(dir.path()).unwrap();
        let path = Credential::path(dir.path());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(Credential::load(dir.path()).unwrap(), c);

        // The plaintext form: null fingerprint, no optional fields.
        let plain = Credential {
            ca_sha256: None,
            name: None,
            labels: Vec::new(),
            ..cred()
        };
        plain.save(dir.path()).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"ca_sha256\": null"), "{text}");
        assert_eq!(Credential::load(dir.path()).unwrap(), plain);
        assert_eq!(plain.trust(), HubTrust::Plaintext);
        assert_eq!(
            c.trust(),
            HubTrust::PinnedCa {
                sha256: "ab".repeat(32)
            }
        );
    }

    #[test]
    fn debug_redacts_the_secret() {
        let shown = format!("{:?}", cred());
        assert!(!shown.contains(SECRET), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
        assert!(shown.contains("ag_0123456789ab"), "{shown}");
        let bearer = cred().bearer().unwrap();
        assert!(!format!("{bearer:?}").contains(SECRET));
        assert_eq!(
            bearer.to_str().unwrap(),
            format!("Bearer ag_0123456789ab.{SECRET}")
        );
    }

    #[test]
    fn missing_file_means_not_enrolled() {
        let dir = tempfile::tempdir().unwrap();
        let e = Credential::load(dir.path()).unwrap_err();
        assert!(matches!(e, CredentialError::NotEnrolled { .. }));
        assert_eq!(
            e.to_string(),
            format!(
                "this machine is not enrolled yet: run `trunkfarm-agent enroll <STRING>` first \
                 (looked in {})",
                dir.path().display()
            )
        );
    }

    #[test]
    fn damaged_file_errors_never_quote_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        let path = Credential::path(dir.path());
        for text in [
            format!("{{\"hub\": \"h:1\", \"agent_id\": \"a\", \"secret\": \"{SECRET}\""),
            format!("{{\"hub\": \"h:1\", \"agent_id\": \"a\", \"labels\": \"{SECRET}\"}}"),
            format!(
                "{{\"hub\": \"h:1\", \"agent_id\": \"a\", \"secret\": \"{SECRET}\\n\", \
                 \"ca_sha256\": null, \"enrolled_at\": \"x\"}}"
            ),
            format!(
                "{{\"hub\": \"\", \"agent_id\": \"a\", \"secret\": \"{SECRET}\", \
                 \"ca_sha256\": null, \"enrolled_at\": \"x\"}}"
            ),
        ] {
            std::fs::write(&path, &text).unwrap();
            let e = Credential::load(dir.path()).unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, CredentialError::Invalid { .. }), "{msg}");
            assert!(!msg.contains(SECRET), "{msg}");
            assert!(msg.contains("enroll --force"), "{msg}");
        }
    }
}
