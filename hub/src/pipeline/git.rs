//! The hub's few conversations with git: `ls-remote` to notice new commits
//! (no clone), and a commits-only mirror (`--filter=tree:0`, no file
//! contents) to name the commits of a culprit range.
//!
//! Every call has a timeout, never prompts for credentials, and never shows
//! a URL's password in an error or a log.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::results::Commit;

/// The most commits a culprit range lists; beyond it the oldest are left out
/// (and the caller says so).
pub(crate) const MAX_RANGE_COMMITS: usize = 500;

/// What went wrong talking to git. Messages show the URL without credentials.
#[derive(Debug, thiserror::Error)]
pub(crate) enum GitError {
    /// git could not be started.
    #[error("cannot run git: {0} (is git installed and on PATH?)")]
    Spawn(std::io::Error),
    /// git ran past the timeout and was killed.
    #[error("`git {what}` took longer than {timeout} and was stopped (pipeline.git_timeout)")]
    Timeout {
        /// The subcommand and its main argument.
        what: String,
        /// The limit, printable.
        timeout: String,
    },
    /// git exited with an error.
    #[error("`git {what}` failed: {stderr}")]
    Failed {
        /// The subcommand and its main argument.
        what: String,
        /// git's last lines of stderr.
        stderr: String,
    },
    /// The branch or rev does not exist there.
    #[error("{0}")]
    NotFound(String),
}

/// Runs git with a timeout and the given arguments.
#[derive(Clone, Debug)]
pub(crate) struct Git {
    /// Where commit mirrors are kept: `<dir>/<name>.git`.
    mirrors: PathBuf,
    /// Limit per git invocation.
    timeout: Duration,
    /// One lock per mirror: two fetches into one repository fail on its ref locks.
    locks: MirrorLocks,
}

/// The per-mirror locks of a [`Git`].
type MirrorLocks = std::sync::Arc<
    std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>>,
>;

/// Removes `user:password@` from a URL so it can be shown.
pub(crate) fn redact_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if let Some((_, host)) = authority.rsplit_once('@') {
            return format!("{scheme}://***@{host}{path}");
        }
    }
    url.to_owned()
}

fn is_full_hash(rev: &str) -> bool {
    (rev.len() == 40 || rev.len() == 64) && rev.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Git {
    /// Git keeping its mirrors in `mirrors`, each call limited to `timeout`.
    pub(crate) fn new(mirrors: PathBuf, timeout: Duration) -> Git {
        Git {
            mirrors,
            timeout,
            locks: MirrorLocks::default(),
        }
    }

    async fn run(
        &self,
        dir: Option<&Path>,
        args: &[&str],
        what: String,
    ) -> Result<String, GitError> {
        let mut cmd = Command::new("git");
        if let Some(dir) = dir {
            cmd.current_dir(dir);
        }
        cmd.args(args)
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_ASKPASS", "true")
            .env("SSH_ASKPASS", "true")
            .env("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
            .env_remove("GIT_DIR")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = cmd.spawn().map_err(GitError::Spawn)?;
        let output = match tokio::time::timeout(self.timeout, child.wait_with_output()).await {
            Ok(r) => r.map_err(GitError::Spawn)?,
            Err(_) => {
                return Err(GitError::Timeout {
                    what,
                    timeout: humantime::format_duration(self.timeout).to_string(),
                });
            }
        };
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
            let tail = lines[lines.len().saturating_sub(3)..].join(" / ");
            return Err(GitError::Failed {
                what,
                stderr: redact_all(&tail),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Brings the commits-only mirror of `url`'s `branch` up to date and
    /// returns its path.
    async fn mirror(&self, name: &str, url: &str, branch: &str) -> Result<PathBuf, GitError> {
        let lock = self
            .locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.to_owned())
            .or_default()
            .clone();
        let _held = lock.lock().await;
        let dir = self.mirrors.join(format!("{name}.git"));
        if !dir.join("HEAD").exists() {
            std::fs::create_dir_all(&dir).map_err(GitError::Spawn)?;
            self.run(
                Some(&dir),
                &["init", "--bare", "--quiet"],
                "init --bare".into(),
            )
            .await?;
        }
        let refspec = format!("+refs/heads/{branch}:refs/heads/{branch}");
        let fetch = |filter: bool| {
            let mut args = vec!["fetch", "--quiet", "--no-tags"];
            if filter {
                args.push("--filter=tree:0");
            }
            args.extend(["--", url, refspec.as_str()]);
            args.into_iter().map(str::to_owned).collect::<Vec<_>>()
        };
        let what = format!("fetch {}", redact_url(url));
        let args = fetch(true);
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        if let Err(first) = self.run(Some(&dir), &argv, what.clone()).await {
            // Some servers refuse partial clones: fetch commits and trees then.
            let args = fetch(false);
            let argv: Vec<&str> = args.iter().map(String::as_str).collect();
            self.run(Some(&dir), &argv, what).await.map_err(|_| first)?;
        }
        Ok(dir)
    }
}

/// The git operations the pipeline needs, behind one seam so that its tests
/// run against a fake; [`Git`] is the real one.
#[tonic::async_trait]
pub(crate) trait Repos: Send + Sync {
    /// The commit a branch points at.
    async fn head(&self, url: &str, branch: &str) -> Result<String, GitError>;

    /// Resolves a rev given by a person to a full commit hash.
    async fn resolve(
        &self,
        name: &str,
        url: &str,
        branch: &str,
        rev: &str,
    ) -> Result<String, GitError>;

    /// The commits in `(from, to]`, oldest first, and whether some were
    /// left out; without `from`, just `to` itself.
    async fn range(
        &self,
        name: &str,
        url: &str,
        branch: &str,
        from: Option<&str>,
        to: &str,
    ) -> Result<(Vec<Commit>, bool), GitError>;

    /// The commits of `spec` (`A..B`), newest first.
    async fn log(
        &self,
        name: &str,
        url: &str,
        branch: &str,
        spec: &str,
    ) -> Result<Vec<Commit>, GitError>;
}

#[tonic::async_trait]
impl Repos for Git {
    /// The commit a branch points at, from `git ls-remote` (no clone).
    async fn head(&self, url: &str, branch: &str) -> Result<String, GitError> {
        let refname = format!("refs/heads/{branch}");
        let out = self
            .run(
                None,
                &["ls-remote", "--", url, &refname],
                format!("ls-remote {}", redact_url(url)),
            )
            .await?;
        out.lines()
            .filter_map(|l| l.split_once('\t'))
            .find(|(_, r)| *r == refname)
            .map(|(sha, _)| sha.to_owned())
            .ok_or_else(|| {
                GitError::NotFound(format!(
                    "branch {branch:?} does not exist in {}",
                    redact_url(url)
                ))
            })
    }

    /// Resolves a rev given by a person (a full hash, a branch, a tag, or
    /// an abbreviated hash) to a full commit hash.
    async fn resolve(
        &self,
        name: &str,
        url: &str,
        branch: &str,
        rev: &str,
    ) -> Result<String, GitError> {
        if rev.starts_with('-') {
            return Err(GitError::NotFound(format!("{rev:?} is not a revision")));
        }
        if is_full_hash(rev) {
            return Ok(rev.to_ascii_lowercase());
        }
        let out = self
            .run(
                None,
                &["ls-remote", "--", url, rev],
                format!("ls-remote {}", redact_url(url)),
            )
            .await?;
        let wanted = [
            format!("refs/heads/{rev}"),
            format!("refs/tags/{rev}^{{}}"),
            format!("refs/tags/{rev}"),
            rev.to_owned(),
        ];
        let refs: Vec<(&str, &str)> = out.lines().filter_map(|l| l.split_once('\t')).collect();
        for want in &wanted {
            if let Some((sha, _)) = refs.iter().find(|(_, r)| r == want) {
                return Ok((*sha).to_owned());
            }
        }
        // An abbreviated hash: look it up among the branch's commits.
        let mirror = self.mirror(name, url, branch).await?;
        let spec = format!("{rev}^{{commit}}");
        match self
            .run(
                Some(&mirror),
                &["rev-parse", "--verify", "--quiet", &spec],
                format!("rev-parse {rev}"),
            )
            .await
        {
            Ok(out) if is_full_hash(out.trim()) => Ok(out.trim().to_owned()),
            _ => Err(GitError::NotFound(format!(
                "{rev:?} is neither a branch, a tag nor a commit of {} (branch {branch})",
                redact_url(url)
            ))),
        }
    }

    /// The commits in `(from, to]`, oldest first (at most
    /// [`MAX_RANGE_COMMITS`], the newest ones), and whether some were left
    /// out. Without `from`, just `to` itself.
    async fn range(
        &self,
        name: &str,
        url: &str,
        branch: &str,
        from: Option<&str>,
        to: &str,
    ) -> Result<(Vec<Commit>, bool), GitError> {
        let mirror = self.mirror(name, url, branch).await?;
        if !is_full_hash(to) || from.is_some_and(|f| !is_full_hash(f)) {
            return Err(GitError::NotFound("commits must be full hashes".into()));
        }
        // A commit no longer on the branch (force push) may need its own fetch.
        for sha in from.into_iter().chain([to]) {
            let have = self
                .run(
                    Some(&mirror),
                    &["cat-file", "-e", &format!("{sha}^{{commit}}")],
                    "cat-file".into(),
                )
                .await
                .is_ok();
            if !have {
                let _ = self
                    .run(
                        Some(&mirror),
                        &[
                            "fetch",
                            "--quiet",
                            "--no-tags",
                            "--filter=tree:0",
                            "--",
                            url,
                            sha,
                        ],
                        format!("fetch {} {sha}", redact_url(url)),
                    )
                    .await;
            }
        }
        let range = match from {
            Some(from) => format!("{from}..{to}"),
            None => to.to_owned(),
        };
        let limit = format!("--max-count={}", MAX_RANGE_COMMITS + 1);
        let mut args = vec![
            "log",
            "--format=%H%x1f%an <%ae>%x1f%ct%x1f%s",
            limit.as_str(),
        ];
        if from.is_none() {
            args.push("--max-count=1");
        }
        args.extend([range.as_str(), "--"]);
        let out = self
            .run(Some(&mirror), &args, format!("log {range}"))
            .await?;
        let mut commits: Vec<Commit> = out.lines().filter_map(parse_log_line).collect();
        let truncated = commits.len() > MAX_RANGE_COMMITS;
        commits.truncate(MAX_RANGE_COMMITS);
        commits.reverse();
        Ok((commits, truncated))
    }

    /// The commits of `spec` (`A..B`), newest first, at most
    /// [`MAX_RANGE_COMMITS`].
    async fn log(
        &self,
        name: &str,
        url: &str,
        branch: &str,
        spec: &str,
    ) -> Result<Vec<Commit>, GitError> {
        if spec
            .split("..")
            .any(|side| side.is_empty() || side.starts_with('-'))
        {
            return Err(GitError::NotFound(format!(
                "{spec:?} is not a range; expected \"A..B\" with two commits"
            )));
        }
        let mirror = self.mirror(name, url, branch).await?;
        let limit = format!("--max-count={MAX_RANGE_COMMITS}");
        let out = self
            .run(
                Some(&mirror),
                &[
                    "log",
                    "--format=%H%x1f%an <%ae>%x1f%ct%x1f%s",
                    &limit,
                    spec,
                    "--",
                ],
                format!("log {spec}"),
            )
            .await?;
        Ok(out.lines().filter_map(parse_log_line).collect())
    }
}

fn parse_log_line(line: &str) -> Option<Commit> {
    let mut parts = line.splitn(4, '\u{1f}');
    let sha = parts.next()?.to_owned();
    let author = parts.next()?.to_owned();
    let time: u64 = parts.next()?.parse().ok()?;
    let subject = parts.next().unwrap_or("").to_owned();
    Some(Commit {
        sha,
        subject,
        author,
        time_ms: time.saturating_mul(1000),
    })
}

/// Redacts every URL with credentials inside a message.
fn redact_all(text: &str) -> String {
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

    fn git(dir: &Path, args: &[&str]) -> String {
        let out = std::process::Command::new("git")
            .current_dir(dir)
            .args(args)
            .env("GIT_AUTHOR_NAME", "Ada")
            .env("GIT_AUTHOR_EMAIL", "ada@example.org")
            .env("GIT_COMMITTER_NAME", "Ada")
            .env("GIT_COMMITTER_EMAIL", "ada@example.org")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    fn repo(dir: &Path) -> Vec<String> {
        git(dir, &["init", "--quiet", "-b", "main"]);
        let mut shas = Vec::new();
        for i in 1..=3 {
            std::fs::write(dir.join("f"), format!("{i}")).unwrap();
            git(dir, &["add", "f"]);
            git(dir, &["commit", "--quiet", "-m", &format!("change {i}")]);
            shas.push(git(dir, &["rev-parse", "HEAD"]));
        }
        shas
    }

    #[test]
    fn urls_lose_their_credentials() {
        assert_eq!(
            redact_url("https://user:hunter2@example.org/x.git"),
            "https://***@example.org/x.git"
        );
        assert_eq!(
            redact_url("https://example.org/x.git"),
            "https://example.org/x.git"
        );
        assert_eq!(redact_url("/srv/git/x"), "/srv/git/x");
        assert!(!redact_all("fatal: https://a:secret@h/x not found").contains("secret"));
    }

    #[tokio::test]
    async fn head_range_and_resolve() {
        let tmp = tempfile::tempdir().unwrap();
        let up = tmp.path().join("up");
        std::fs::create_dir(&up).unwrap();
        let shas = repo(&up);
        let g = Git {
            mirrors: tmp.path().join("mirrors"),
            timeout: Duration::from_secs(30),
            locks: Default::default(),
        };
        let url = up.to_str().unwrap();
        assert_eq!(g.head(url, "main").await.unwrap(), shas[2]);
        let e = g.head(url, "nope").await.unwrap_err().to_string();
        assert!(e.contains("branch \"nope\" does not exist"), "{e}");

        let (commits, cut) = g
            .range("up", url, "main", Some(&shas[0]), &shas[2])
            .await
            .unwrap();
        assert!(!cut);
        let subjects: Vec<_> = commits.iter().map(|c| c.subject.as_str()).collect();
        assert_eq!(subjects, ["change 2", "change 3"]);
        assert_eq!(commits[0].author, "Ada <ada@example.org>");
        let (only, _) = g.range("up", url, "main", None, &shas[1]).await.unwrap();
        assert_eq!(only.len(), 1);
        assert_eq!(only[0].sha, shas[1]);

        assert_eq!(g.resolve("up", url, "main", "main").await.unwrap(), shas[2]);
        assert_eq!(
            g.resolve("up", url, "main", &shas[0][..8]).await.unwrap(),
            shas[0]
        );
        assert!(g.resolve("up", url, "main", "zzz").await.is_err());
    }

    #[tokio::test]
    async fn unreachable_repository_is_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        let g = Git {
            mirrors: tmp.path().join("m"),
            timeout: Duration::from_secs(30),
            locks: Default::default(),
        };
        let e = g
            .head(tmp.path().join("missing").to_str().unwrap(), "main")
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("git ls-remote"), "{e}");
    }
}
