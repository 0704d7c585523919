//! What the dashboard's project and upstream pages read: each configured
//! project's or upstream's facts, joined here from the config, the heads
//! polling saw, `results`' stored records and dispatch's open jobs. Nothing
//! here writes, and nothing calls git: a page shows what is stored.

use std::collections::HashMap;

use super::poll::{Head, Repo};
use super::{Pipeline, PipelineError, git};

use crate::dispatch::Phase;
use crate::results::{Bisection, BuildInfo, Commit, RunInfo, TestNoise, Transition};

/// A series' runs that may have been recorded up to this long before the
/// transition that classified them (a clock step between agent and hub).
const SLACK_MS: u64 = 60_000;

/// A configured repository (project or upstream) as polling sees it.
#[derive(Clone, Debug, Default)]
pub(crate) struct RepoFacts {
    /// Its URL, without credentials.
    pub(crate) url: String,
    pub(crate) branch: String,
    /// Its branch head as polling last saw it.
    pub(crate) head: Option<Head>,
    /// Empty when its last poll worked.
    pub(crate) poll_error: String,
}

/// A configured project as its page shows it.
#[derive(Clone, Debug, Default)]
pub(crate) struct ProjectFacts {
    pub(crate) name: String,
    pub(crate) repo: RepoFacts,
    /// One per (upstream, platform) it is tested on, in config order.
    pub(crate) series: Vec<SeriesFacts>,
    /// Its known flaky tests (most flips first) and the rule's threshold.
    pub(crate) flaky: Vec<(String, TestNoise)>,
    pub(crate) flaky_after: u32,
}

/// One (upstream, platform) series of a project.
#[derive(Clone, Debug, Default)]
pub(crate) struct SeriesFacts {
    pub(crate) upstream: String,
    pub(crate) platform: String,
    /// Its newest runs, newest first (bounded by the caller's limit).
    pub(crate) history: Vec<RunInfo>,
    /// The went-red transition it is red since, if it is red now.
    pub(crate) red_since: Option<Transition>,
    /// A run of it is open: its job, and where it stands (dispatch's
    /// phase; `None`: it just finished).
    pub(crate) pending: Option<(u64, Option<Phase>)>,
    /// Transitions of the runs in `history` (matched by job id).
    pub(crate) transitions: Vec<Transition>,
}

/// A configured upstream as its page shows it.
#[derive(Clone, Debug, Default)]
pub(crate) struct UpstreamFacts {
    pub(crate) name: String,
    pub(crate) repo: RepoFacts,
    pub(crate) platforms: Vec<String>,
    /// The heads polling saw, newest first.
    pub(crate) commits: Vec<CommitFacts>,
    /// Its bisections still under way.
    pub(crate) bisections: Vec<BisectionFacts>,
}

/// One upstream commit polling saw as the head.
#[derive(Clone, Debug, Default)]
pub(crate) struct CommitFacts {
    /// The commit (its subject and author when a stored culprit range
    /// names it; empty otherwise).
    pub(crate) commit: Commit,
    /// Its build per platform (in the upstream's order; `None`: none).
    /// A pending build carries its job's phase (and `waiting`).
    pub(crate) builds: Vec<(String, Option<BuildInfo>)>,
    /// Went-red transitions recorded at this commit.
    pub(crate) went_red: Vec<Transition>,
    /// Went-red transitions (at later commits) whose bisection found this
    /// commit to be the first bad one.
    pub(crate) blamed: Vec<Transition>,
}

/// A bisection under way.
#[derive(Clone, Debug, Default)]
pub(crate) struct BisectionFacts {
    pub(crate) bisection: Bisection,
    /// Per member still waiting: its project, transition and the commits
    /// its search has narrowed the range to.
    pub(crate) members: Vec<(String, u64, Vec<Commit>)>,
}

impl Pipeline {
    /// The configured projects' names, in config order.
    pub(crate) fn project_names(&self) -> Vec<String> {
        self.inner.projects.iter().map(|p| p.name.clone()).collect()
    }

    /// The configured upstreams' names, in config order.
    pub(crate) fn upstream_names(&self) -> Vec<String> {
        self.inner
            .upstreams
            .iter()
            .map(|u| u.name.clone())
            .collect()
    }

    /// A configured repository's polling state; its branch is the
    /// configured one, else the default branch polling found (empty before
    /// the first poll).
    pub(super) fn repo_facts(
        &self,
        repo: Repo,
        name: &str,
        url: &str,
        configured: Option<&str>,
    ) -> Result<RepoFacts, PipelineError> {
        Ok(RepoFacts {
            url: git::redact_url(url),
            branch: self
                .known_branch(repo, name, configured)?
                .unwrap_or_default(),
            head: self.head(repo, name)?,
            poll_error: self.poll_error(repo, name),
        })
    }

    /// Open test jobs by series (project, upstream, platform): the job id.
    pub(super) fn pending_tests(&self) -> HashMap<(String, String, String), u64> {
        self.open_tests()
            .into_iter()
            .map(|t| ((t.project, t.upstream, t.platform), t.job_id))
            .collect()
    }

    /// Project `name`'s page: every series with its newest `history` runs
    /// and their transitions (one scan back to the oldest run: a run's
    /// state word needs its class, the list's too), its red spell, its
    /// flaky tests.
    pub(crate) fn project_facts(
        &self,
        name: &str,
        history: usize,
    ) -> Result<ProjectFacts, PipelineError> {
        let p = self
            .inner
            .projects
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| {
                PipelineError::NoSuchProject(name.to_owned(), known(self.project_names()))
            })?;
        let results = &self.inner.results;
        let pending = self.pending_tests();
        let mut series = Vec::new();
        for u in self
            .inner
            .upstreams
            .iter()
            .filter(|u| p.tests_against(&u.name))
        {
            for platform in p.platforms_for(u) {
                let id = (p.name.clone(), u.name.clone(), platform.to_owned());
                series.push(SeriesFacts {
                    upstream: u.name.clone(),
                    platform: platform.to_owned(),
                    history: results.recent_runs(&p.name, &u.name, platform, history)?,
                    red_since: results.red_since(&p.name, &u.name, platform)?,
                    pending: pending
                        .get(&id)
                        .map(|job| (*job, self.inner.dispatch.phase(*job))),
                    transitions: Vec::new(),
                });
            }
        }
        // One scan for every series: back to the oldest run shown.
        let since = series
            .iter()
            .filter_map(|s| s.history.last())
            .map(|r| r.finished_at_ms)
            .min();
        if let Some(since) = since {
            let jobs: HashMap<u64, usize> = series
                .iter()
                .enumerate()
                .flat_map(|(i, s)| s.history.iter().map(move |r| (r.job_id, i)))
                .collect();
            let found =
                results.transitions_since(since.saturating_sub(SLACK_MS), usize::MAX, |t| {
                    t.project == p.name && jobs.contains_key(&t.job_id)
                })?;
            for t in found {
                if let Some(&i) = jobs.get(&t.job_id) {
                    series[i].transitions.push(t);
                }
            }
        }
        let rule = results.flaky_rule(&p.name);
        let noise = results.noise(&p.name)?;
        Ok(ProjectFacts {
            name: p.name.clone(),
            repo: self.repo_facts(Repo::Project, &p.name, &p.url, p.branch.as_deref())?,
            series,
            flaky: noise
                .flaky(rule)
                .into_iter()
                .map(|(n, t)| (n.to_owned(), t.clone()))
                .collect(),
            flaky_after: rule.after,
        })
    }

    /// Upstream `name`'s page: its newest `commits` heads with their
    /// builds and what each broke, and its bisections under way.
    pub(crate) fn upstream_facts(
        &self,
        name: &str,
        commits: usize,
    ) -> Result<UpstreamFacts, PipelineError> {
        let u = self.upstream(name)?;
        let results = &self.inner.results;
        let mut rows = Vec::new();
        for sha in self
            .recent_heads(&u.name, commits)?
            .into_iter()
            .map(|h| h.commit)
        {
            let mut builds = Vec::new();
            for platform in &u.platforms {
                builds.push((platform.clone(), results.build(&u.name, platform, &sha)?));
            }
            rows.push(CommitFacts {
                commit: Commit {
                    sha,
                    ..Default::default()
                },
                builds,
                ..Default::default()
            });
        }
        self.fill_phases(
            rows.iter_mut()
                .flat_map(|c| c.builds.iter_mut().filter_map(|(_, b)| b.as_mut())),
            std::iter::empty(),
        );
        // Whatever happened at these commits was recorded after their
        // builds were queued: read the transitions since the oldest.
        let since = rows
            .iter()
            .flat_map(|c| c.builds.iter().filter_map(|(_, b)| b.as_ref()))
            .map(|b| b.created_at_ms)
            .min();
        if let Some(since) = since {
            let at: HashMap<String, usize> = rows
                .iter()
                .enumerate()
                .map(|(i, c)| (c.commit.sha.clone(), i))
                .collect();
            let first_bad = |t: &Transition| {
                t.bisect
                    .as_ref()
                    .and_then(|b| b.first_bad.as_ref())
                    .map(|c| c.sha.clone())
            };
            let went_red = trunkfarm_proto::v1::TransitionKind::WentRed as i32;
            let found =
                results.transitions_since(since.saturating_sub(SLACK_MS), usize::MAX, |t| {
                    t.upstream == u.name
                        && t.kind == went_red
                        && (at.contains_key(&t.upstream_commit)
                            || first_bad(t).is_some_and(|c| at.contains_key(&c)))
                })?;
            for t in found {
                for c in &t.culprits {
                    if let Some(&i) = at.get(&c.sha)
                        && rows[i].commit.subject.is_empty()
                    {
                        rows[i].commit = c.clone();
                    }
                }
                if let Some(&i) = first_bad(&t).and_then(|c| at.get(&c)) {
                    rows[i].blamed.push(t.clone());
                }
                if let Some(&i) = at.get(&t.upstream_commit) {
                    rows[i].went_red.push(t);
                }
            }
        }
        let mut bisections = Vec::new();
        for b in results.running_bisections()? {
            if b.upstream != u.name {
                continue;
            }
            let mut members = Vec::new();
            for m in b.members.iter().filter(|m| !m.ended) {
                members.push((m.project.clone(), m.transition, self.narrowed(&b, m)?));
            }
            bisections.push(BisectionFacts {
                bisection: b,
                members,
            });
        }
        Ok(UpstreamFacts {
            name: u.name.clone(),
            repo: self.repo_facts(Repo::Upstream, &u.name, &u.url, u.branch.as_deref())?,
            platforms: u.platforms.clone(),
            commits: rows,
            bisections,
        })
    }
}

/// Configured names for an error message.
fn known(names: Vec<String>) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}
