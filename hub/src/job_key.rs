//! The pipeline's job keys: the name under which dispatch stores each job the
//! pipeline makes, unique per thing to do. Submitting a key twice is a no-op,
//! so the pipeline can re-derive its jobs after any crash; and the key says
//! what a finished job was for, so nothing else needs to remember it.
//!
//! * `build/<upstream>/<platform>/<commit>[/<nonce>]`
//! * `test/<project>/<upstream>/<platform>/<upstream commit>/<project commit or ->[/<build job id>]`
//! * `<a build or test key>/<re-run kind>/<its job id>/<n>`: the `n`th
//!   re-run of that job, of that kind (`confirm`: another agent's run of the
//!   same spec, before a volunteer's verdict counts; `again`: the same spec
//!   again; `baseline`: the same project commit on the series' last good
//!   runtime; see `results::confirm`; `calibrate`: `trunkfarm calibrate`'s N
//!   identical runs, counted in the project's noise record, never classified)
//! * `<a build or test key>/bisect/<n>`: a bisection's build of a commit
//!   inside a culprit range, or its run of a project against one (`n`: 1,
//!   then 2 for the retry of a run that ended in an infrastructure error);
//!   see `pipeline::bisect`. Its own key: a bisection build never fans out
//!   and a bisection run is never classified into its series.
//!
//! Names never contain `/` (the config allows `[A-Za-z0-9._-]`).
//!
//! Jobs submitted by hand with an idempotency key are stored under
//! `submit/<key>` (see [`submit_key`]): the same once-only guarantee, in a
//! namespace the pipeline's keys never use.

use std::fmt;

/// What every test job's key starts with (to find them among open jobs).
pub(crate) const TEST_PREFIX: &str = "test/";

/// The longest idempotency key a submit may carry, in bytes.
pub(crate) const MAX_IDEMPOTENCY_KEY_BYTES: usize = 200;

/// The dispatch key of a hand-submitted job with idempotency key `key`, or
/// why the key is unusable.
pub(crate) fn submit_key(key: &str) -> Result<String, String> {
    if key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
        return Err(format!(
            "the idempotency key is {} bytes long; use at most {MAX_IDEMPOTENCY_KEY_BYTES} (e.g. a UUID)",
            key.len()
        ));
    }
    if key.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(
            "the idempotency key contains spaces or control characters; use printable characters (e.g. a UUID)"
                .into(),
        );
    }
    Ok(format!("submit/{key}"))
}

/// What a pipeline job is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum JobKey {
    /// Build an upstream commit on a platform.
    Build {
        /// Upstream name.
        upstream: String,
        /// Platform label.
        platform: String,
        /// Full commit hash.
        commit: String,
        /// Set for a forced rebuild, to make the key new.
        nonce: Option<u64>,
    },
    /// Test a project commit against a built runtime.
    Test {
        /// Project name.
        project: String,
        /// Upstream name.
        upstream: String,
        /// Platform label.
        platform: String,
        /// The upstream commit the runtime was built from.
        upstream_commit: String,
        /// The project commit, empty when unknown (the branch is checked out).
        project_commit: String,
        /// The job id of the build tested (so a forced rebuild of the same
        /// commit is tested again).
        nonce: Option<u64>,
    },
    /// A re-run of a finished build or test job, checking its verdict.
    Rerun {
        /// The key of the job re-run (a build or a test, never a re-run).
        of: Box<JobKey>,
        /// What the re-run is for.
        kind: RerunKind,
        /// The job re-run.
        job: u64,
        /// 1 for its first re-run of this kind, 2 for the next (the first
        /// ended in an infrastructure error), …
        n: u32,
    },
    /// A bisection's build or run (see `pipeline::bisect`).
    Bisect {
        /// The build or test it is (never a re-run or another bisection's).
        of: Box<JobKey>,
        /// 1, or 2 for the retry of a run that ended in an infrastructure error.
        n: u32,
    },
}

/// The word that marks a bisection's key.
const BISECT: &str = "bisect";

/// Why a job is re-run. Each kind's word is part of its re-runs' keys.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RerunKind {
    /// The same spec on another agent, trusted where one fits: a
    /// volunteer's verdict counts only when it agrees (what hubs before
    /// the signal-quality classes queued; still read, and taken as
    /// [`RerunKind::Again`] for a test).
    #[default]
    Confirm,
    /// The same spec again (same project commit, same runtime), on another
    /// agent where one fits: does the result repeat?
    Again,
    /// The same project commit on the series' last good runtime (the
    /// baseline): did the runtime break it, or the project itself?
    Baseline,
    /// The same spec again, `trunkfarm calibrate`'s `n`th run: measures
    /// how often the result flips (`results::noise`), decides nothing.
    Calibrate,
}

impl RerunKind {
    /// The word in keys.
    pub(crate) fn word(self) -> &'static str {
        match self {
            RerunKind::Confirm => "confirm",
            RerunKind::Again => "again",
            RerunKind::Baseline => "baseline",
            RerunKind::Calibrate => "calibrate",
        }
    }

    fn from_word(word: &str) -> Option<RerunKind> {
        match word {
            "confirm" => Some(RerunKind::Confirm),
            "again" => Some(RerunKind::Again),
            "baseline" => Some(RerunKind::Baseline),
            "calibrate" => Some(RerunKind::Calibrate),
            _ => None,
        }
    }
}

impl fmt::Display for JobKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JobKey::Build {
                upstream,
                platform,
                commit,
                nonce,
            } => {
                write!(f, "build/{upstream}/{platform}/{commit}")?;
                if let Some(n) = nonce {
                    write!(f, "/{n}")?;
                }
                Ok(())
            }
            JobKey::Test {
                project,
                upstream,
                platform,
                upstream_commit,
                project_commit,
                nonce,
            } => {
                let pc = if project_commit.is_empty() {
                    "-"
                } else {
                    project_commit
                };
                write!(
                    f,
                    "{TEST_PREFIX}{project}/{upstream}/{platform}/{upstream_commit}/{pc}"
                )?;
                if let Some(n) = nonce {
                    write!(f, "/{n}")?;
                }
                Ok(())
            }
            JobKey::Rerun { of, kind, job, n } => {
                write!(f, "{of}/{}/{job}/{n}", kind.word())
            }
            JobKey::Bisect { of, n } => write!(f, "{of}/{BISECT}/{n}"),
        }
    }
}

impl JobKey {
    /// The build or test job this key is about: itself, or the job a
    /// re-run re-runs, or what a bisection builds or runs.
    pub(crate) fn base(&self) -> &JobKey {
        match self {
            JobKey::Rerun { of, .. } | JobKey::Bisect { of, .. } => of,
            _ => self,
        }
    }

    /// Reads a key back; `None` for anything that is not a pipeline key.
    pub(crate) fn parse(key: &str) -> Option<JobKey> {
        let parts: Vec<&str> = key.split('/').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return None;
        }
        if let [head @ .., kind, job, n] = parts.as_slice()
            && let Some(kind) = RerunKind::from_word(kind)
            && let (Ok(job), Ok(n)) = (job.parse(), n.parse())
            && let Some(of) = JobKey::parse_plain(&head.join("/"))
        {
            return Some(JobKey::Rerun {
                of: Box::new(of),
                kind,
                job,
                n,
            });
        }
        if let [head @ .., word, n] = parts.as_slice()
            && *word == BISECT
            && let Ok(n) = n.parse()
            && let Some(of) = JobKey::parse_plain(&head.join("/"))
        {
            return Some(JobKey::Bisect {
                of: Box::new(of),
                n,
            });
        }
        JobKey::parse_plain(key)
    }

    /// A build or test key (not a re-run).
    fn parse_plain(key: &str) -> Option<JobKey> {
        let parts: Vec<&str> = key.split('/').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return None;
        }
        let nonce = |p: Option<&&str>| -> Option<Option<u64>> {
            match p {
                None => Some(None),
                Some(n) => n.parse().ok().map(Some),
            }
        };
        match parts.as_slice() {
            ["build", upstream, platform, commit, rest @ ..] if rest.len() <= 1 => {
                Some(JobKey::Build {
                    upstream: (*upstream).to_owned(),
                    platform: (*platform).to_owned(),
                    commit: (*commit).to_owned(),
                    nonce: nonce(rest.first())?,
                })
            }
            ["test", project, upstream, platform, uc, pc, rest @ ..] if rest.len() <= 1 => {
                Some(JobKey::Test {
                    project: (*project).to_owned(),
                    upstream: (*upstream).to_owned(),
                    platform: (*platform).to_owned(),
                    upstream_commit: (*uc).to_owned(),
                    project_commit: if *pc == "-" {
                        String::new()
                    } else {
                        (*pc).to_owned()
                    },
                    nonce: nonce(rest.first())?,
                })
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for key in [
            JobKey::Build {
                upstream: "lua".into(),
                platform: "linux-x86_64".into(),
                commit: "ab".repeat(20),
                nonce: None,
            },
            JobKey::Build {
                upstream: "lua".into(),
                platform: "linux-x86_64".into(),
                commit: "ab".repeat(20),
                nonce: Some(7),
            },
            JobKey::Test {
                project: "attrs".into(),
                upstream: "cpython".into(),
                platform: "linux-aarch64".into(),
                upstream_commit: "cd".repeat(20),
                project_commit: String::new(),
                nonce: None,
            },
            JobKey::Test {
                project: "attrs".into(),
                upstream: "cpython".into(),
                platform: "linux-aarch64".into(),
                upstream_commit: "cd".repeat(20),
                project_commit: "ef".repeat(20),
                nonce: Some(3),
            },
        ] {
            let text = key.to_string();
            let is_test = matches!(key, JobKey::Test { .. });
            assert_eq!(text.starts_with(TEST_PREFIX), is_test, "{text}");
            assert_eq!(JobKey::parse(&text), Some(key));
        }
        let test = JobKey::parse(&format!("test/p/rt/linux/{}/-/7", "cd".repeat(20))).unwrap();
        let rerun = JobKey::Rerun {
            of: Box::new(test.clone()),
            kind: RerunKind::Confirm,
            job: 42,
            n: 2,
        };
        let text = rerun.to_string();
        assert!(text.ends_with("/-/7/confirm/42/2"), "{text}");
        assert!(text.starts_with(TEST_PREFIX));
        let back = JobKey::parse(&text).unwrap();
        assert_eq!(back.base(), &test);
        assert_eq!(back, rerun);
        for kind in [RerunKind::Again, RerunKind::Baseline] {
            let rerun = JobKey::Rerun {
                of: Box::new(test.clone()),
                kind,
                job: 42,
                n: 1,
            };
            let text = rerun.to_string();
            assert!(text.ends_with(&format!("/{}/42/1", kind.word())), "{text}");
            assert_eq!(JobKey::parse(&text), Some(rerun));
        }
        let calibrate = JobKey::Rerun {
            of: Box::new(test.clone()),
            kind: RerunKind::Calibrate,
            job: 42,
            n: 6,
        };
        let text = calibrate.to_string();
        assert!(text.ends_with("/-/7/calibrate/42/6"), "{text}");
        assert_eq!(JobKey::parse(&text), Some(calibrate));
        // A platform named like a re-run kind is still a test key.
        let odd = "test/p/rt/confirm/c1/-";
        assert!(matches!(JobKey::parse(odd), Some(JobKey::Test { .. })));
        assert_eq!(JobKey::parse("test/p/rt/linux/c1/-/confirm/x/1"), None);
        assert_eq!(JobKey::parse(""), None);
        // A bisection's run and build.
        let bisect = JobKey::Bisect {
            of: Box::new(test.clone()),
            n: 2,
        };
        let text = bisect.to_string();
        assert!(text.ends_with("/-/7/bisect/2"), "{text}");
        assert_eq!(JobKey::parse(&text), Some(bisect.clone()));
        assert_eq!(JobKey::parse(&text).unwrap().base(), &test);
        let build = JobKey::parse(&format!("build/rt/linux/{}/bisect/1", "ab".repeat(20)));
        assert!(
            matches!(&build, Some(JobKey::Bisect { of, n: 1 }) if matches!(**of, JobKey::Build { nonce: None, .. })),
            "{build:?}"
        );
        // A platform named "bisect" is still a build key.
        assert!(matches!(
            JobKey::parse("build/rt/bisect/1"),
            Some(JobKey::Build { .. })
        ));
        assert_eq!(JobKey::parse("build/rt/linux/c1/bisect/x"), None);
        assert_eq!(JobKey::parse("build/a/b"), None);
        assert_eq!(JobKey::parse("build/a/b/c/notanumber"), None);
        assert_eq!(JobKey::parse("deploy/a/b/c"), None);
    }
}
