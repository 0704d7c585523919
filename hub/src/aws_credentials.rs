//! AWS credentials, read the way AWS's own tools read them: the hub's
//! environment (`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`, and
//! `AWS_SESSION_TOKEN`) first, else a profile of the shared credentials file
//! (`AWS_SHARED_CREDENTIALS_FILE`, default `~/.aws/credentials`; `AWS_PROFILE`,
//! default `default`). A file is re-read before each use so rotated keys are
//! picked up. Shared by the EC2 provisioner and the S3 object store.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Mutex;

/// An access key. `Debug` shows only the key id.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct AwsCredentials {
    /// `AKIA…` / `ASIA…`.
    pub(crate) access_key_id: String,
    /// The secret: never logged.
    pub(crate) secret_access_key: String,
    /// For temporary credentials.
    pub(crate) session_token: Option<String>,
}

impl fmt::Debug for AwsCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// Where the credentials came from (a file is re-read before each call).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum CredentialSource {
    /// `AWS_ACCESS_KEY_ID` and friends.
    Env,
    /// A profile of a shared credentials file.
    File {
        /// The file.
        path: PathBuf,
        /// The profile.
        profile: String,
    },
}

const HOW_TO_SET: &str = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN \
     for temporary credentials) in the hub's environment, or put aws_access_key_id and \
     aws_secret_access_key in the [default] profile of ~/.aws/credentials \
     (AWS_SHARED_CREDENTIALS_FILE and AWS_PROFILE choose another file or profile)";

/// Finds credentials: the environment first, then the shared credentials
/// file. `env` looks a variable up (empty counts as unset).
pub(crate) fn load_credentials(
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(AwsCredentials, CredentialSource), String> {
    let var = |k: &str| env(k).filter(|v| !v.trim().is_empty());
    match (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
        (Some(id), Some(secret)) => {
            return Ok((
                AwsCredentials {
                    access_key_id: id.trim().to_owned(),
                    secret_access_key: secret.trim().to_owned(),
                    session_token: var("AWS_SESSION_TOKEN").map(|t| t.trim().to_owned()),
                },
                CredentialSource::Env,
            ));
        }
        (Some(_), None) => {
            return Err(
                "AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not: set both in the hub's environment"
                    .into(),
            );
        }
        (None, Some(_)) => {
            return Err(
                "AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not: set both in the hub's environment"
                    .into(),
            );
        }
        (None, None) => {}
    }
    let explicit = var("AWS_SHARED_CREDENTIALS_FILE");
    let path = match (&explicit, var("HOME")) {
        (Some(p), _) => PathBuf::from(p),
        (None, Some(home)) => PathBuf::from(home).join(".aws").join("credentials"),
        (None, None) => return Err(format!("no AWS credentials found: {HOW_TO_SET}")),
    };
    let profile = var("AWS_PROFILE").unwrap_or_else(|| "default".into());
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if explicit.is_some() => {
            return Err(format!(
                "cannot read the AWS credentials file {} (AWS_SHARED_CREDENTIALS_FILE): {e}",
                path.display()
            ));
        }
        Err(_) => {
            return Err(format!(
                "no AWS credentials found (not in the environment, and no {}): {HOW_TO_SET}",
                path.display()
            ));
        }
    };
    let creds = parse_credentials_file(&text, &profile).map_err(|e| {
        format!(
            "{} (profile {profile:?}{}): {e}",
            path.display(),
            if var("AWS_PROFILE").is_some() {
                ", from AWS_PROFILE"
            } else {
                ""
            }
        )
    })?;
    Ok((creds, CredentialSource::File { path, profile }))
}

/// Reads one profile of a shared credentials file (INI: `[profile]`, then
/// `key = value` lines; `#` and `;` start comments). Errors never quote a
/// value.
pub(crate) fn parse_credentials_file(text: &str, profile: &str) -> Result<AwsCredentials, String> {
    let mut sections: Vec<String> = Vec::new();
    let mut current: Option<String> = None;
    let mut keys: BTreeMap<String, String> = BTreeMap::new();
    let mut found = false;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.trim();
            // `[profile x]` is the config file's spelling; accept it here too.
            let name = name.strip_prefix("profile ").map_or(name, str::trim);
            sections.push(name.to_owned());
            current = Some(name.to_owned());
            if name == profile {
                found = true;
            }
            continue;
        }
        if current.as_deref() != Some(profile) {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            keys.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    if !found {
        return Err(if sections.is_empty() {
            format!("there is no [{profile}] profile (the file has no profile at all)")
        } else {
            format!(
                "there is no [{profile}] profile (it has: {})",
                sections.join(", ")
            )
        });
    }
    let get = |k: &str| keys.get(k).filter(|v| !v.is_empty()).cloned();
    match (get("aws_access_key_id"), get("aws_secret_access_key")) {
        (Some(access_key_id), Some(secret_access_key)) => Ok(AwsCredentials {
            access_key_id,
            secret_access_key,
            session_token: get("aws_session_token"),
        }),
        (None, _) => Err(format!("the [{profile}] profile has no aws_access_key_id")),
        (_, None) => Err(format!(
            "the [{profile}] profile has no aws_secret_access_key"
        )),
    }
}

/// Credentials that follow their source: [`Credentials::current`] re-reads a
/// file each time (keeping the last good ones if it cannot).
#[derive(Debug)]
pub(crate) struct Credentials {
    source: CredentialSource,
    held: Mutex<AwsCredentials>,
}

impl Credentials {
    /// Loads them from the hub's environment or credentials file.
    pub(crate) fn load() -> Result<Credentials, String> {
        let (creds, source) = load_credentials(&|k| std::env::var(k).ok())?;
        Ok(Credentials::new(creds, source))
    }

    /// Credentials already read from `source`.
    pub(crate) fn new(creds: AwsCredentials, source: CredentialSource) -> Credentials {
        Credentials {
            source,
            held: Mutex::new(creds),
        }
    }

    /// The credentials to sign with now (a file is re-read; if it cannot be,
    /// the last good ones are used).
    pub(crate) fn current(&self) -> AwsCredentials {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if let CredentialSource::File { path, profile } = &self.source {
            match std::fs::read_to_string(path)
                .map_err(|e| e.to_string())
                .and_then(|t| parse_credentials_file(&t, profile))
            {
                Ok(c) => *held = c,
                Err(e) => tracing::warn!(
                    "cannot re-read AWS credentials from {} ({e}); using the ones read before",
                    path.display()
                ),
            }
        }
        held.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_files_are_read_by_profile() {
        let text = "\
# a comment
[default]
aws_access_key_id = AKIDDEFAULT
aws_secret_access_key=secret/default+1

; another
[profile ci]
AWS_ACCESS_KEY_ID = AKIDCI
aws_secret_access_key = secret-ci
aws_session_token = tok

[broken]
aws_access_key_id = AKIDBROKEN
";
        let d = parse_credentials_file(text, "default").unwrap();
        assert_eq!(d.access_key_id, "AKIDDEFAULT");
        assert_eq!(d.secret_access_key, "secret/default+1");
        assert_eq!(d.session_token, None);
        let ci = parse_credentials_file(text, "ci").unwrap();
        assert_eq!(ci.access_key_id, "AKIDCI");
        assert_eq!(ci.session_token.as_deref(), Some("tok"));
        let e = parse_credentials_file(text, "broken").unwrap_err();
        assert!(e.contains("no aws_secret_access_key"), "{e}");
        assert!(!e.contains("AKIDBROKEN"));
        let e = parse_credentials_file(text, "prod").unwrap_err();
        assert!(
            e.contains("no [prod] profile") && e.contains("default, ci, broken"),
            "{e}"
        );
    }

    #[test]
    fn credentials_come_from_the_environment_then_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("creds");
        std::fs::write(
            &file,
            "[default]\naws_access_key_id=AKIDFILE\naws_secret_access_key=s1\n[other]\naws_access_key_id=AKIDOTHER\naws_secret_access_key=s2\n",
        )
        .unwrap();
        let env_of = |pairs: Vec<(&'static str, String)>| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(pk, _)| *pk == k)
                    .map(|(_, v)| v.clone())
            }
        };
        let f = file.display().to_string();
        // The environment wins.
        let env = env_of(vec![
            ("AWS_ACCESS_KEY_ID", "AKIDENV".into()),
            ("AWS_SECRET_ACCESS_KEY", "senv".into()),
            ("AWS_SESSION_TOKEN", "t".into()),
            ("AWS_SHARED_CREDENTIALS_FILE", f.clone()),
        ]);
        let (c, src) = load_credentials(&env).unwrap();
        assert_eq!(
            (c.access_key_id.as_str(), src),
            ("AKIDENV", CredentialSource::Env)
        );
        assert_eq!(c.session_token.as_deref(), Some("t"));
        // Half of a key pair is an error naming the other half.
        let env = env_of(vec![("AWS_ACCESS_KEY_ID", "AKIDENV".into())]);
        let e = load_credentials(&env).unwrap_err();
        assert!(e.contains("AWS_SECRET_ACCESS_KEY is not"), "{e}");
        // Then the file, with AWS_PROFILE.
        let env = env_of(vec![
            ("AWS_SHARED_CREDENTIALS_FILE", f.clone()),
            ("AWS_PROFILE", "other".into()),
        ]);
        let (c, src) = load_credentials(&env).unwrap();
        assert_eq!(c.access_key_id, "AKIDOTHER");
        assert_eq!(
            src,
            CredentialSource::File {
                path: file.clone(),
                profile: "other".into()
            }
        );
        // ~/.aws/credentials under HOME.
        std::fs::create_dir_all(dir.path().join(".aws")).unwrap();
        std::fs::copy(&file, dir.path().join(".aws/credentials")).unwrap();
        let env = env_of(vec![("HOME", dir.path().display().to_string())]);
        assert_eq!(load_credentials(&env).unwrap().0.access_key_id, "AKIDFILE");
        // Nothing at all: say what to set.
        let empty = tempfile::tempdir().unwrap();
        let env = env_of(vec![
            ("HOME", empty.path().display().to_string()),
            ("AWS_ACCESS_KEY_ID", "".into()),
        ]);
        let e = load_credentials(&env).unwrap_err();
        assert!(
            e.contains("no AWS credentials found")
                && e.contains("AWS_ACCESS_KEY_ID")
                && e.contains("~/.aws/credentials"),
            "{e}"
        );
        // A named file that is not there.
        let env = env_of(vec![(
            "AWS_SHARED_CREDENTIALS_FILE",
            "/nonexistent/creds".into(),
        )]);
        let e = load_credentials(&env).unwrap_err();
        assert!(e.contains("AWS_SHARED_CREDENTIALS_FILE"), "{e}");
    }
}
