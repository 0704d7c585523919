//! The credentials of the configured repositories, kept out of job records.
//!
//! An upstream's or project's URL may carry credentials
//! (`https://ci:token@git.example.org/x.git`). The jobs made for it are
//! stored with the URL without them ([`RepoCredentials::strip`]), so neither
//! the database nor a listing holds the secret, and the hub puts them back
//! only into the copy of the spec it sends the agent that runs the job
//! ([`RepoCredentials::restore`]), from the config it runs with: a password
//! rotated in the config applies to queued jobs too. A URL with credentials
//! that the config does not name (an ad-hoc `job submit --repo`) is stored as
//! given: the config is the place for secrets.

use std::collections::HashMap;
use std::sync::Arc;

use trunkfarm_proto::gitauth::GitRemote;

/// The configured URLs with credentials, by their URL without them.
#[derive(Clone, Default)]
pub(crate) struct RepoCredentials {
    /// Full URL by plain URL; `None` where two configured URLs share a
    /// plain URL with different credentials (neither is stripped then).
    by_plain: Arc<HashMap<String, Option<String>>>,
}

impl std::fmt::Debug for RepoCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RepoCredentials({} URLs)", self.by_plain.len())
    }
}

impl RepoCredentials {
    /// The credentials of `urls` (the config's upstream and project URLs;
    /// those without credentials, or that git cannot be given, are skipped:
    /// config validation reported the latter).
    pub(crate) fn from_urls<'a>(urls: impl IntoIterator<Item = &'a str>) -> RepoCredentials {
        let mut by_plain: HashMap<String, Option<String>> = HashMap::new();
        for url in urls {
            let Ok(remote) = GitRemote::parse(url) else {
                continue;
            };
            if !remote.has_credentials() {
                continue;
            }
            by_plain
                .entry(remote.url().to_owned())
                .and_modify(|known| {
                    if known.as_deref() != Some(url) {
                        *known = None;
                    }
                })
                .or_insert_with(|| Some(url.to_owned()));
        }
        RepoCredentials {
            by_plain: Arc::new(by_plain),
        }
    }

    /// The URL to store for `url`: without its credentials when the config
    /// holds them; `None` to store `url` as it is.
    pub(crate) fn strip(&self, url: &str) -> Option<String> {
        let remote = GitRemote::parse(url).ok()?;
        match self.by_plain.get(remote.url()) {
            Some(Some(full)) if full == url => Some(remote.url().to_owned()),
            _ => None,
        }
    }

    /// The URL to send an agent for stored `url`: with the configured
    /// credentials when `url` is a stripped one; `None` to send it as it is.
    pub(crate) fn restore(&self, url: &str) -> Option<&str> {
        self.by_plain.get(url)?.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_credentials_are_stripped_and_restored() {
        let book = RepoCredentials::from_urls([
            "https://ci:tok@git.example.org/rt.git",
            "https://git.example.org/open.git",
            "https://a:1@git.example.org/shared.git",
            "https://b:2@git.example.org/shared.git",
        ]);
        let plain = book.strip("https://ci:tok@git.example.org/rt.git").unwrap();
        assert_eq!(plain, "https://git.example.org/rt.git");
        assert_eq!(
            book.restore(&plain),
            Some("https://ci:tok@git.example.org/rt.git")
        );
        // Not the configured credentials, none at all, or ambiguous: as given.
        assert_eq!(book.strip("https://eve:x@git.example.org/rt.git"), None);
        assert_eq!(book.strip("https://git.example.org/open.git"), None);
        assert_eq!(book.restore("https://git.example.org/open.git"), None);
        assert_eq!(book.strip("https://a:1@git.example.org/shared.git"), None);
        assert_eq!(book.restore("https://git.example.org/shared.git"), None);
        assert!(!format!("{book:?}").contains("tok"));
    }
}
