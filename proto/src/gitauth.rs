//! Credentials in git URLs, kept off the command line.
//!
//! An upstream or project URL may carry credentials
//! (`https://user:token@host/repo.git`). Handed to git as an argument they
//! show in `ps` and `/proc/<pid>/cmdline` to every user of the machine, on
//! the hub (`ls-remote`, the mirror's fetch) and on the agent (the checkout).
//! Instead, [`GitRemote::parse`] splits such a URL into the URL without its
//! userinfo, which goes on the command line, and the credentials, which reach
//! git through the environment only ([`GitRemote::env`]): a one-shot
//! credential helper, configured with `GIT_CONFIG_COUNT`, that answers from
//! two environment variables (its script names the variables, never their
//! values) and only for the URL's own host. A process's environment is
//! readable by its own user and root only.
//!
//! Hub and agent both use this module, so there is one implementation of the
//! split, the helper and the redaction ([`redact_url`], [`redact_text`]).

use std::fmt;

/// The variable the helper reads the user name from.
const USERNAME_VAR: &str = "TRUNKFARM_GIT_USERNAME";
/// The variable the helper reads the password (or token) from.
const PASSWORD_VAR: &str = "TRUNKFARM_GIT_PASSWORD";
/// The variable naming the only host (`host[:port]`) the helper answers for,
/// so a redirect to another host is not handed the credentials.
const HOST_VAR: &str = "TRUNKFARM_GIT_HOST";
/// The variable naming the only protocol (`https` or `http`) the helper
/// answers for, so a redirect from https to plain http on the same host is
/// not handed the credentials in the clear.
const PROTOCOL_VAR: &str = "TRUNKFARM_GIT_PROTOCOL";

/// The credential helper: answers `get` for [`HOST_VAR`]'s host over
/// [`PROTOCOL_VAR`]'s protocol with the
/// user name and password from the environment, ignores `store` and `erase`.
/// git runs it with `sh -c`, so `read` and `printf` are shell built-ins and
/// no process ever has the secret in its arguments.
const HELPER: &str = concat!(
    "!f() { test \"$1\" = get || exit 0; h=; p=; ",
    "while IFS= read -r l && test -n \"$l\"; do case \"$l\" in host=*) h=${l#host=};; protocol=*) p=${l#protocol=};; esac; done; ",
    "test \"$h\" = \"$TRUNKFARM_GIT_HOST\" && test \"$p\" = \"$TRUNKFARM_GIT_PROTOCOL\" || exit 0; ",
    "printf 'username=%s\\npassword=%s\\n' \"$TRUNKFARM_GIT_USERNAME\" \"$TRUNKFARM_GIT_PASSWORD\"; }; f"
);

/// A URL whose credentials cannot be handed to git.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GitAuthError {
    /// The credentials contain a byte git's credential protocol cannot carry.
    #[error(
        "the credentials in {url} contain a line break or NUL (after %-decoding); \
         git cannot use them: fix the URL's user name or password"
    )]
    BadCredentials {
        /// The URL, redacted.
        url: String,
    },
}

/// The user name and password of a URL, %-decoded. `Debug` shows neither.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    username: String,
    password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Credentials(***)")
    }
}

/// A git remote as git is given it: the URL without credentials for the
/// command line, the credentials (if the URL had any) for the environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GitRemote {
    url: String,
    /// The credentials, and the `host[:port]` and protocol they are for.
    auth: Option<(Credentials, String, String)>,
}

impl GitRemote {
    /// Splits `url`. Only `http://` and `https://` URLs lose their userinfo
    /// (git's credential helpers serve those); any other URL is kept as it
    /// is (an `ssh://user@host` user name is no secret, and a local path has
    /// none). A user name without a password is a token: it goes to git with
    /// an empty password, as a `user@` URL with no prompt did before.
    pub fn parse(url: &str) -> Result<GitRemote, GitAuthError> {
        let plain = GitRemote {
            url: url.to_owned(),
            auth: None,
        };
        let Some((scheme, rest)) = url.split_once("://") else {
            return Ok(plain);
        };
        if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
            return Ok(plain);
        }
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(authority_end);
        let Some((userinfo, host)) = authority.rsplit_once('@') else {
            return Ok(plain);
        };
        let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
        let credentials = Credentials {
            username: percent_decode(user),
            password: percent_decode(password),
        };
        if [&credentials.username, &credentials.password]
            .iter()
            .any(|s| s.contains(['\n', '\r', '\0']))
        {
            return Err(GitAuthError::BadCredentials {
                url: redact_url(url),
            });
        }
        Ok(GitRemote {
            url: format!("{scheme}://{host}{path}"),
            auth: Some((credentials, host.to_owned(), scheme.to_ascii_lowercase())),
        })
    }

    /// The URL to put on git's command line: never any credentials.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether the URL carried credentials.
    pub fn has_credentials(&self) -> bool {
        self.auth.is_some()
    }

    /// The environment git must run with: no terminal prompt ever, and,
    /// when the URL had credentials, the credential helper (replacing any
    /// helper of the user's or system's git config for this run) and the
    /// variables it reads. Set these on git's own process only, never on a
    /// job's commands.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![("GIT_TERMINAL_PROMPT", "0".to_owned())];
        if let Some((credentials, host, protocol)) = &self.auth {
            env.extend([
                ("GIT_CONFIG_COUNT", "2".to_owned()),
                // An empty value resets the list of helpers from git config.
                ("GIT_CONFIG_KEY_0", "credential.helper".to_owned()),
                ("GIT_CONFIG_VALUE_0", String::new()),
                ("GIT_CONFIG_KEY_1", "credential.helper".to_owned()),
                ("GIT_CONFIG_VALUE_1", HELPER.to_owned()),
                (USERNAME_VAR, credentials.username.clone()),
                (PASSWORD_VAR, credentials.password.clone()),
                (HOST_VAR, host.clone()),
                (PROTOCOL_VAR, protocol.clone()),
            ]);
        }
        env
    }
}

/// Decodes `%XX` escapes as git does for a URL's user name and password;
/// a `%` not followed by two hex digits stays as it is.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                let value = hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0);
                out.push(value as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Hides the userinfo of a URL (`https://user:token@host/…` →
/// `https://***@host/…`) before it is shown in a log, a message or a listing.
pub fn redact_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(authority_end);
        if let Some((_, host)) = authority.rsplit_once('@') {
            return format!("{scheme}://***@{host}{path}");
        }
    }
    url.to_owned()
}

/// Redacts every URL with credentials inside a message (git's stderr).
pub fn redact_text(text: &str) -> String {
    text.split(' ')
        .map(|w| {
            if w.contains("://") {
                redact_url(w)
            } else {
                w.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_https_url_loses_its_credentials_to_the_environment() {
        let r = GitRemote::parse("https://ci:s3cr%40t@git.example.org:8443/x.git").unwrap();
        assert_eq!(r.url(), "https://git.example.org:8443/x.git");
        assert!(r.has_credentials());
        let env = r.env();
        let get = |k: &str| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str());
        assert_eq!(get(USERNAME_VAR), Some("ci"));
        assert_eq!(get(PASSWORD_VAR), Some("s3cr@t"));
        assert_eq!(get(HOST_VAR), Some("git.example.org:8443"));
        assert_eq!(get("GIT_TERMINAL_PROMPT"), Some("0"));
        assert!(!format!("{r:?}").contains("s3cr"), "{r:?}");
        assert!(!HELPER.contains("s3cr"));
    }

    /// What the helper answers git's `get` request `request`, run as git
    /// runs it (`sh -c`, the request on stdin), with `remote`'s environment.
    fn helper_answer(remote: &GitRemote, request: &str) -> String {
        use std::io::Write as _;
        let script = HELPER.strip_prefix('!').unwrap();
        let mut child = std::process::Command::new("sh")
            .args(["-c", &format!("{script} \"$@\""), "helper", "get"])
            .envs(remote.env())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(request.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn the_helper_answers_only_its_host_over_its_protocol() {
        let r = GitRemote::parse("https://ci:pw@git.example.org/x.git").unwrap();
        assert_eq!(
            helper_answer(&r, "protocol=https\nhost=git.example.org\n\n"),
            "username=ci\npassword=pw\n"
        );
        for other in [
            "protocol=http\nhost=git.example.org\n\n",
            "protocol=https\nhost=evil.example\n\n",
            "host=git.example.org\n\n",
        ] {
            assert_eq!(helper_answer(&r, other), "", "{other:?}");
        }
    }

    #[test]
    fn other_urls_are_kept_as_they_are() {
        for url in [
            "/srv/git/x",
            "file:///srv/git/x",
            "https://example.org/x@y.git",
            "ssh://git@example.org/x.git",
            "git@example.org:x.git",
        ] {
            let r = GitRemote::parse(url).unwrap();
            assert_eq!(r.url(), url);
            assert!(!r.has_credentials());
            assert_eq!(r.env(), [("GIT_TERMINAL_PROMPT", "0".to_owned())]);
        }
        let token = GitRemote::parse("http://tok@h/x").unwrap();
        assert_eq!(token.url(), "http://h/x");
        assert!(token.has_credentials());
    }

    #[test]
    fn credentials_git_cannot_carry_are_refused_without_showing_them() {
        let e = GitRemote::parse("https://u:a%0Ab@h/x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("https://***@h/x"), "{e}");
        assert!(!e.contains("a%0Ab"), "{e}");
    }

    #[test]
    fn urls_and_messages_are_redacted() {
        assert_eq!(
            redact_url("https://user:hunter2@example.org/x.git"),
            "https://***@example.org/x.git"
        );
        assert_eq!(redact_url("https://h/r@x"), "https://h/r@x");
        assert_eq!(redact_url("git@host:r.git"), "git@host:r.git");
        assert_eq!(redact_url("/srv/git/x"), "/srv/git/x");
        assert!(!redact_text("fatal: https://a:secret@h/x not found").contains("secret"));
    }
}
