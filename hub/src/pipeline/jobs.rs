//! The jobs the pipeline makes: a build per upstream commit and platform,
//! and the fan-out of a good build to every project that tests against it.
//! Each is submitted under its [`JobKey`], which dispatch stores at most
//! once, so deriving them again (a re-poll, a redelivered finished build)
//! submits nothing twice.

use std::collections::HashMap;

use trunkfarm_proto::v1::{BuildState, JobSpec, Repository};

use super::poll::Repo;
use super::{Pipeline, PipelineError};
use crate::commit::short;
use crate::config::{BuildOn, ProjectConfig, UpstreamConfig};
use crate::job_key::JobKey;
use crate::results::BuildInfo;
use crate::store::now_ms;

/// The directory (relative to the job's directory) a build installs into.
const BUILD_PREFIX_DIR: &str = "prefix";

impl Pipeline {
    /// Makes sure `commit` of `u` is built on every platform; returns the
    /// builds (new or existing).
    pub(super) async fn ensure_builds(
        &self,
        u: &UpstreamConfig,
        commit: &str,
        nonce: Option<u64>,
    ) -> Result<Vec<BuildInfo>, PipelineError> {
        let mut builds = Vec::new();
        for platform in &u.platforms {
            let key = JobKey::Build {
                upstream: u.name.clone(),
                platform: platform.clone(),
                commit: commit.to_owned(),
                nonce,
            };
            let (job_id, new) = self
                .inner
                .dispatch
                .submit_keyed(build_spec(u, platform, commit), 0, key.to_string())
                .await?;
            if new {
                tracing::info!(
                    upstream = %u.name,
                    platform = %platform,
                    job = job_id,
                    "building {}",
                    short(commit)
                );
            }
            let queued = BuildInfo {
                upstream: u.name.clone(),
                platform: platform.clone(),
                commit: commit.to_owned(),
                job_id,
                state: BuildState::Pending.into(),
                created_at_ms: now_ms(),
                head_seq: self.head_seq(&u.name, commit)?,
                ..Default::default()
            };
            // New, or queued before a crash took the mark with it.
            if let Some(build) = self.inner.results.build_queued(queued).await? {
                builds.push(build);
            }
        }
        Ok(builds)
    }

    /// Queues one project's tests against a built runtime (once per key).
    pub(super) async fn submit_test(
        &self,
        p: &ProjectConfig,
        u: &UpstreamConfig,
        platform: &str,
        build: &BuildInfo,
        project_commit: &str,
    ) -> Result<bool, PipelineError> {
        let key = JobKey::Test {
            project: p.name.clone(),
            upstream: u.name.clone(),
            platform: platform.to_owned(),
            upstream_commit: build.commit.clone(),
            project_commit: project_commit.to_owned(),
            // The build's own job: a forced rebuild of the same commit is
            // tested again.
            nonce: Some(build.job_id),
        };
        let spec = test_spec(p, u, platform, build, project_commit);
        let (job_id, new) = self
            .inner
            .dispatch
            .submit_keyed(spec, 0, key.to_string())
            .await?;
        if new {
            tracing::info!(
                project = %p.name,
                upstream = %u.name,
                platform = %platform,
                job = job_id,
                "testing {} against {} {}",
                if project_commit.is_empty() { p.branch.as_deref().unwrap_or("its default branch") } else { short(project_commit) },
                u.name,
                short(&build.commit)
            );
        }
        Ok(new)
    }

    /// The projects a build of `u` on `platform` is tested by.
    pub(super) fn fan_out_targets<'a>(
        &'a self,
        u: &'a UpstreamConfig,
        platform: &'a str,
    ) -> impl Iterator<Item = &'a ProjectConfig> + 'a {
        self.inner
            .projects
            .iter()
            .filter(move |p| p.tests_against(&u.name) && p.platforms_for(u).contains(&platform))
    }

    /// Queues every project's tests (at its head) against a build that
    /// passed. Idempotent: submits only what does not exist yet.
    pub(super) async fn fan_out(
        &self,
        u: &UpstreamConfig,
        build: &BuildInfo,
    ) -> Result<(), PipelineError> {
        for p in self.fan_out_targets(u, &build.platform) {
            let commit = self
                .head(Repo::Project, &p.name)?
                .map(|h| h.commit)
                .unwrap_or_default();
            self.submit_test(p, u, &build.platform, build, &commit)
                .await?;
        }
        Ok(())
    }
}

/// The job that builds `commit` of `u` on `platform`.
pub(super) fn build_spec(u: &UpstreamConfig, platform: &str, commit: &str) -> JobSpec {
    let mut env: HashMap<String, String> = u.env.clone().into_iter().collect();
    env.insert("TRUNKFARM_UPSTREAM".into(), u.name.clone());
    env.insert("TRUNKFARM_UPSTREAM_COMMIT".into(), commit.to_owned());
    env.insert("TRUNKFARM_PLATFORM".into(), platform.to_owned());
    let mut labels = vec![platform.to_owned()];
    labels.extend(u.labels.iter().cloned());
    JobSpec {
        commands: u.build.clone(),
        env,
        labels,
        project: u.name.clone(),
        repository: Some(Repository {
            url: u.url.clone(),
            rev: commit.to_owned(),
        }),
        timeout_secs: u.build_timeout.as_secs().max(1),
        artifact_sha256: String::new(),
        upload_prefix: BUILD_PREFIX_DIR.into(),
        report_paths: Vec::new(),
        // What a runtime is may not rest on a volunteer's word alone: its
        // artifact runs inside every test job on every donor's machine.
        // With `build_on = "any"` a volunteer's build is held until an
        // independent build of the commit gives the same artifact.
        trusted_only: u.build_on == BuildOn::Trusted,
        network: false,
    }
}

/// The job that tests `p` at `project_commit` (its branch when unknown)
/// against the runtime of `build`.
pub(super) fn test_spec(
    p: &ProjectConfig,
    u: &UpstreamConfig,
    platform: &str,
    build: &BuildInfo,
    project_commit: &str,
) -> JobSpec {
    let mut env: HashMap<String, String> = p.env.clone().into_iter().collect();
    env.insert("TRUNKFARM_PROJECT".into(), p.name.clone());
    env.insert("TRUNKFARM_UPSTREAM".into(), u.name.clone());
    env.insert("TRUNKFARM_UPSTREAM_COMMIT".into(), build.commit.clone());
    env.insert("TRUNKFARM_PLATFORM".into(), platform.to_owned());
    let mut labels = vec![platform.to_owned()];
    labels.extend(p.labels.iter().cloned());
    JobSpec {
        commands: p.test.clone(),
        env,
        labels,
        project: p.name.clone(),
        repository: Some(Repository {
            url: p.url.clone(),
            // Empty: the agent checks out the default branch.
            rev: if project_commit.is_empty() {
                p.branch.clone().unwrap_or_default()
            } else {
                project_commit.to_owned()
            },
        }),
        timeout_secs: p.timeout.as_secs().max(1),
        artifact_sha256: build.artifact_sha256.clone(),
        upload_prefix: String::new(),
        report_paths: p.junit.clone(),
        trusted_only: false,
        network: p.network,
    }
}
