//! The hub's few conversations with git: `ls-remote` to notice new commits
//! (no clone), and a commits-only mirror (`--filter=tree:0`, no file
//! contents) to name the commits of a culprit range.
//!
//! Every call has a timeout, never prompts for credentials, never puts a
//! URL's credentials on its command line (they reach git through its
//! environment: `proto::gitauth`), and never shows them in an error or a log.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;
pub(crate) use trunkfarm_proto::gitauth::redact_url;
use trunkfarm_proto::gitauth::{GitAuthError, GitRemote, redact_text};

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
    /// The URL's credentials cannot be handed to git.
    #[error(transparent)]
    Url(#[from] GitAuthError),
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

    /// Runs git in `dir` with `args`; `what` names the call in errors. A
    /// call that talks to `remote` gets its credentials through the
    /// environment (`args` name only [`GitRemote::url`]).
    async fn run(
        &self,
        dir: Option<&Path>,
        args: &[&str],
        what: String,
        remote: Option<&GitRemote>,
    ) -> Result<String, GitError> {
        let mut cmd = Command::new("git");
        if let Some(dir) = dir {
            cmd.current_dir(dir);
        }
        if let Some(remote) = remote {
            cmd.envs(remote.env());
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
                stderr: redact_text(&tail),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `git ls-remote` of `url`'s refs matching `pattern` (no clone).
    async fn ls_remote(&self, url: &str, pattern: &str) -> Result<String, GitError> {
        self.ls_remote_with(url, &[], &[pattern]).await
    }

    /// `git ls-remote <options> -- url <patterns>` (no clone).
    async fn ls_remote_with(
        &self,
        url: &str,
        options: &[&str],
        patterns: &[&str],
    ) -> Result<String, GitError> {
        let remote = GitRemote::parse(url)?;
        let mut args = vec!["ls-remote"];
        args.extend(options);
        args.extend(["--", remote.url()]);
        args.extend(patterns);
        self.run(
            None,
            &args,
            format!("ls-remote {}", redact_url(url)),
            Some(&remote),
        )
        .await
    }

    /// The error for a configured branch `url` does not have: it names a
    /// few of the branches it has, so that the config can be fixed.
    async fn missing_branch(&self, url: &str, branch: &str) -> GitError {
        let shown = redact_url(url);
        let branches = match self.ls_remote_with(url, &["--heads"], &[]).await {
            Ok(out) => branch_names(&out),
            Err(e) => return e,
        };
        GitError::NotFound(missing_branch_message(&shown, branch, &branches))
    }

    /// Brings the commits-only mirror of `url`'s `branch` up to date and
    /// returns its path.
    async fn mirror(&self, name: &str, url: &str, branch: &str) -> Result<PathBuf, GitError> {
        let remote = GitRemote::parse(url)?;
        let lock = self
            .locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.to_owned())
            .or_default()
            .clone();
        let _held = lock.lock().await;
        let dir = self.mirrors.join(format!("{name}.git"));
        if dir.join("HEAD").exists() && config_names_credentials(&dir) {
            // Hubs before credentials went through the environment fetched
            // the URL as given, and git named a config section after it. The
            // mirror is only a cache: start it again.
            tracing::warn!(
                mirror = %dir.display(),
                "the commit mirror's git config holds a URL with credentials; recreating the mirror"
            );
            std::fs::remove_dir_all(&dir).map_err(GitError::Spawn)?;
        }
        if !dir.join("HEAD").exists() {
            std::fs::create_dir_all(&dir).map_err(GitError::Spawn)?;
            self.run(
                Some(&dir),
                &["init", "--bare", "--quiet"],
                "init --bare".into(),
                None,
            )
            .await?;
        }
        let refspec = format!("+refs/heads/{branch}:refs/heads/{branch}");
        let fetch = |filter: bool| {
            let mut args = vec!["fetch", "--quiet", "--no-tags"];
            if filter {
                args.push("--filter=tree:0");
            }
            args.extend(["--", remote.url(), refspec.as_str()]);
            args
        };
        let what = format!("fetch {}", redact_url(url));
        let run = |args| self.run(Some(&dir), args, what.clone(), Some(&remote));
        if let Err(first) = run(&fetch(true)).await {
            // Some servers refuse partial clones: fetch commits and trees then.
            run(&fetch(false)).await.map_err(|_| first)?;
        }
        Ok(dir)
    }
}

/// How many branch names a missing-branch error lists.
const LISTED_BRANCHES: usize = 8;

/// The branch names in `git ls-remote --heads` output, sorted.
fn branch_names(ls_remote: &str) -> Vec<String> {
    let mut names: Vec<String> = ls_remote
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .filter_map(|(_, r)| r.strip_prefix("refs/heads/"))
        .map(str::to_owned)
        .collect();
    names.sort();
    names
}

/// "branch X does not exist in URL", the branches it has (a few) and how to
/// fix the config.
fn missing_branch_message(url: &str, branch: &str, branches: &[String]) -> String {
    let has = match branches {
        [] => "it has no branches yet (push one, or fix `url`)".to_owned(),
        _ => {
            let mut listed = branches[..branches.len().min(LISTED_BRANCHES)].join(", ");
            if branches.len() > LISTED_BRANCHES {
                listed.push_str(&format!(" and {} more", branches.len() - LISTED_BRANCHES));
            }
            format!(
                "it has: {listed}; set `branch` to one of them, or leave `branch` out to follow its default branch"
            )
        }
    };
    format!("branch {branch:?} does not exist in {url}: {has}")
}

/// The default branch and its commit from `git ls-remote --symref URL HEAD`
/// output (`ref: refs/heads/X\tHEAD` then `<sha>\tHEAD`).
fn default_tip(ls_remote: &str) -> Option<Tip> {
    let mut branch = None;
    let mut commit = None;
    for line in ls_remote.lines() {
        let Some((left, name)) = line.split_once('\t') else {
            continue;
        };
        if name != "HEAD" {
            continue;
        }
        match left.strip_prefix("ref: ") {
            Some(target) => branch = target.strip_prefix("refs/heads/").map(str::to_owned),
            None => commit = Some(left.to_owned()),
        }
    }
    Some(Tip {
        branch: branch?,
        commit: commit?,
    })
}

/// Whether a mirror's git config names a URL with credentials (a
/// `[remote "https://user:pw@…"]` section git wrote for a partial fetch).
/// An unreadable config counts as clean: git itself will complain.
fn config_names_credentials(mirror: &Path) -> bool {
    std::fs::read_to_string(mirror.join("config")).is_ok_and(|config| {
        config.lines().any(|line| {
            line.trim_start()
                .strip_prefix("[remote \"")
                .is_some_and(|name| redact_url(name) != name)
        })
    })
}

/// A branch head as the repository shows it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Tip {
    /// The branch: the one configured, or the repository's default branch.
    pub(crate) branch: String,
    /// The commit it points at (full hash).
    pub(crate) commit: String,
}

/// The git operations the pipeline needs, behind one seam so that its tests
/// run against a fake; [`Git`] is the real one.
#[tonic::async_trait]
pub(crate) trait Repos: Send + Sync {
    /// The commit `branch` points at; without a branch, the repository's
    /// default branch (its `HEAD`) and its commit.
    async fn head(&self, url: &str, branch: Option<&str>) -> Result<Tip, GitError>;

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
    /// The commit a branch points at, from `git ls-remote` (no clone);
    /// without a branch, the default branch from `git ls-remote --symref`.
    async fn head(&self, url: &str, branch: Option<&str>) -> Result<Tip, GitError> {
        let Some(branch) = branch else {
            let out = self.ls_remote_with(url, &["--symref"], &["HEAD"]).await?;
            return default_tip(&out).ok_or_else(|| {
                GitError::NotFound(format!(
                    "{} does not name a default branch (it has no HEAD, or no commit yet): set `branch` in its config",
                    redact_url(url)
                ))
            });
        };
        let refname = format!("refs/heads/{branch}");
        let out = self.ls_remote(url, &refname).await?;
        let found = out
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .find(|(_, r)| *r == refname)
            .map(|(sha, _)| sha.to_owned());
        match found {
            Some(commit) => Ok(Tip {
                branch: branch.to_owned(),
                commit,
            }),
            None => Err(self.missing_branch(url, branch).await),
        }
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
        let out = self.ls_remote(url, rev).await?;
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
                None,
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
        let remote = GitRemote::parse(url)?;
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
                    None,
                )
                .await
                .is_ok();
            if !have {
                // Best effort: `git log` below says what is still missing.
                if let Err(e) = self
                    .run(
                        Some(&mirror),
                        &[
                            "fetch",
                            "--quiet",
                            "--no-tags",
                            "--filter=tree:0",
                            "--",
                            remote.url(),
                            sha,
                        ],
                        format!("fetch {} {sha}", redact_url(url)),
                        Some(&remote),
                    )
                    .await
                {
                    tracing::debug!(error = %e, "cannot fetch a commit no longer on the branch");
                }
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
            .run(Some(&mirror), &args, format!("log {range}"), None)
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
                None,
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
        repo_on(dir, "main")
    }

    /// A repository whose only branch is `branch`, with three commits.
    fn repo_on(dir: &Path, branch: &str) -> Vec<String> {
        git(dir, &["init", "--quiet", "-b", branch]);
        let mut shas = Vec::new();
        for i in 1..=3 {
            std::fs::write(dir.join("f"), format!("{i}")).unwrap();
            git(dir, &["add", "f"]);
            git(dir, &["commit", "--quiet", "-m", &format!("change {i}")]);
            shas.push(git(dir, &["rev-parse", "HEAD"]));
        }
        shas
    }

    /// `tests/fixtures/git-http-server.py` serving `root` with basic auth
    /// for `user:password`; killed on drop. Returns its base URL.
    struct HttpGit(std::process::Child);

    impl HttpGit {
        fn start(root: &Path, user: &str, password: &str) -> (HttpGit, String) {
            use std::io::BufRead as _;
            let script = concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../tests/fixtures/git-http-server.py"
            );
            let mut child = std::process::Command::new("python3")
                .args([script, root.to_str().unwrap()])
                .env("GIT_HTTP_USER", user)
                .env("GIT_HTTP_PASSWORD", password)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let mut port = String::new();
            std::io::BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut port)
                .unwrap();
            (HttpGit(child), format!("127.0.0.1:{}", port.trim()))
        }
    }

    impl Drop for HttpGit {
        fn drop(&mut self) {
            if let Err(e) = self.0.kill().and_then(|()| self.0.wait().map(drop)) {
                eprintln!("cannot stop the git server: {e}");
            }
        }
    }

    /// Every file under `dir`, as text where it is one.
    fn contents(dir: &Path) -> String {
        let mut all = String::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                all.push_str(&contents(&path));
            } else {
                all.push_str(&String::from_utf8_lossy(&std::fs::read(&path).unwrap()));
            }
        }
        all
    }

    #[tokio::test]
    async fn credentials_in_a_url_reach_git_through_the_environment_only() {
        let tmp = tempfile::tempdir().unwrap();
        let up = tmp.path().join("up");
        std::fs::create_dir(&up).unwrap();
        let shas = repo(&up);
        let secret = "pw-7f3kQ";
        let (_server, host) = HttpGit::start(tmp.path(), "ci", secret);
        let g = Git::new(tmp.path().join("mirrors"), Duration::from_secs(30));

        // The server refuses a wrong password: the right one did reach git.
        let wrong = format!("http://ci:nope@{host}/up");
        let e = g.head(&wrong, Some("main")).await.unwrap_err().to_string();
        assert!(!e.contains("nope"), "{e}");
        let url = format!("http://ci:{secret}@{host}/up");
        assert_eq!(g.head(&url, Some("main")).await.unwrap().commit, shas[2]);

        // A mirror an older hub made names the URL with its password in
        // its config: it is made again, clean.
        let mirror = tmp.path().join("mirrors/up.git");
        std::fs::create_dir_all(&mirror).unwrap();
        git(&mirror, &["init", "--bare", "--quiet"]);
        std::fs::write(
            mirror.join("config"),
            format!("[core]\n\tbare = true\n[remote \"{url}\"]\n\tpromisor = true\n"),
        )
        .unwrap();
        let (commits, _) = g
            .range("up", &url, "main", Some(&shas[0]), &shas[2])
            .await
            .unwrap();
        assert_eq!(commits.len(), 2);
        assert_eq!(
            g.resolve("up", &url, "main", &shas[1][..8]).await.unwrap(),
            shas[1]
        );
        let stored = contents(&mirror);
        assert!(stored.contains(&format!("http://{host}/up")), "{stored}");
        assert!(!stored.contains(secret), "the mirror keeps the password");
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
        assert_eq!(g.head(url, Some("main")).await.unwrap().commit, shas[2]);
        let e = g.head(url, Some("nope")).await.unwrap_err().to_string();
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
            .head(tmp.path().join("missing").to_str().unwrap(), Some("main"))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("git ls-remote"), "{e}");
    }

    /// `git init` makes `master` on many machines, and a config often names
    /// no branch: the repository's default branch is followed.
    #[tokio::test]
    async fn without_a_branch_the_default_branch_is_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let up = tmp.path().join("up");
        std::fs::create_dir(&up).unwrap();
        let shas = repo_on(&up, "master");
        let g = Git::new(tmp.path().join("mirrors"), Duration::from_secs(30));
        let url = up.to_str().unwrap();
        let tip = g.head(url, None).await.unwrap();
        assert_eq!(
            tip,
            Tip {
                branch: "master".into(),
                commit: shas[2].clone()
            }
        );
        // The branch found serves the commit mirror like a configured one.
        let (commits, _) = g
            .range("up", url, &tip.branch, Some(&shas[0]), &shas[2])
            .await
            .unwrap();
        assert_eq!(commits.len(), 2);

        // An empty repository has no default branch to follow yet.
        let empty = tmp.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        git(&empty, &["init", "--quiet", "-b", "main"]);
        let e = g
            .head(empty.to_str().unwrap(), None)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("set `branch`"), "{e}");
    }

    /// The default used to be `main`: a repository on `master` failed with
    /// an error that did not say what to write instead.
    #[tokio::test]
    async fn a_missing_branch_names_the_branches_there_are() {
        let tmp = tempfile::tempdir().unwrap();
        let up = tmp.path().join("up");
        std::fs::create_dir(&up).unwrap();
        repo_on(&up, "master");
        git(&up, &["branch", "develop"]);
        let g = Git::new(tmp.path().join("mirrors"), Duration::from_secs(30));
        let e = g
            .head(up.to_str().unwrap(), Some("main"))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("branch \"main\" does not exist"), "{e}");
        assert!(e.contains("it has: develop, master;"), "{e}");
        assert!(e.contains("set `branch` to one of them"), "{e}");
    }

    #[test]
    fn a_long_branch_list_is_cut() {
        let many: Vec<String> = (0..20).map(|i| format!("b{i:02}")).collect();
        let m = missing_branch_message("u", "main", &many);
        assert!(m.contains("b07 and 12 more"), "{m}");
        assert!(!m.contains("b08"), "{m}");
        let m = missing_branch_message("u", "main", &[]);
        assert!(m.contains("no branches yet"), "{m}");
    }
}
