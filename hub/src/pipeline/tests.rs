//! The pipeline in-process: polling → build jobs → intake → record →
//! fan-out → test jobs → intake → record, against a temporary store, a fake
//! git ([`FakeGit`]) and a dispatcher driven directly through its public API
//! (one agent session whose assignments the test finishes itself).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::{Notify, mpsc};
use trunkfarm_proto::v1::hub_message::Msg;
use trunkfarm_proto::v1::{
    ArtifactChunk, ArtifactMeta, HubMessage, JobRef, JobResult, LogChunk, LogStream, MailState,
    Outcome, ReportFile,
};

use super::git::Tip;
use super::*;
use crate::artifacts::{Backend, Origin};
use crate::dispatch::{DispatchSettings, Outgoing, Phase};
use crate::job_key::RerunKind;
use crate::logs::JobLogs;
use crate::results::{BisectState, Class};
use crate::space::DataDir;

/// Repositories in memory: each URL's branch history, oldest first.
#[derive(Default)]
pub(crate) struct FakeGit {
    repos: Mutex<HashMap<String, Vec<Commit>>>,
    next: AtomicU64,
    /// URLs every call to fails for (an unreachable server).
    pub(crate) broken: Mutex<HashSet<String>>,
    /// While set, `range` announces itself on `stalled` and waits for
    /// `released` (a fetch that takes long).
    stall: AtomicBool,
    stalled: Notify,
    released: Notify,
    /// The one branch every repository has, its default; empty: `main`.
    default_branch: Mutex<String>,
    /// Other branch names that exist, at the same commits as the default.
    other_branches: Mutex<HashSet<String>>,
}

impl FakeGit {
    /// Lands a new commit on `url`'s branch; its hash.
    pub(crate) fn commit(&self, url: &str) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let sha = hex::encode(Sha256::digest(format!("{url} {n}")))[..40].to_owned();
        self.repos
            .lock()
            .unwrap()
            .entry(url.to_owned())
            .or_default()
            .push(Commit {
                sha: sha.clone(),
                subject: format!("change {n}"),
                author: "Ada <ada@example.org>".into(),
                time_ms: n,
            });
        sha
    }

    fn history(&self, url: &str) -> Result<Vec<Commit>, GitError> {
        if self.broken.lock().unwrap().contains(url) {
            return Err(GitError::Failed {
                what: format!("ls-remote {url}"),
                stderr: "fatal: could not read from remote repository".into(),
            });
        }
        Ok(self
            .repos
            .lock()
            .unwrap()
            .get(url)
            .cloned()
            .unwrap_or_default())
    }
}

#[tonic::async_trait]
impl Repos for FakeGit {
    /// Every fake repository has one branch, its default
    /// (`default_branch`, `main` unless set).
    async fn head(&self, url: &str, branch: Option<&str>) -> Result<Tip, GitError> {
        let history = self.history(url)?;
        let default = match self.default_branch.lock().unwrap().as_str() {
            "" => "main".to_owned(),
            set => set.to_owned(),
        };
        let branch = branch.unwrap_or(&default);
        match history.last() {
            Some(c)
                if branch == default || self.other_branches.lock().unwrap().contains(branch) =>
            {
                Ok(Tip {
                    branch: branch.to_owned(),
                    commit: c.sha.clone(),
                })
            }
            _ => Err(GitError::NotFound(format!(
                "branch {branch:?} does not exist"
            ))),
        }
    }

    async fn resolve(
        &self,
        _name: &str,
        url: &str,
        _branch: &str,
        rev: &str,
    ) -> Result<String, GitError> {
        let history = self.history(url)?;
        let found = history.iter().find(|c| c.sha.starts_with(rev));
        found
            .map(|c| c.sha.clone())
            .ok_or_else(|| GitError::NotFound(format!("{rev:?} is not a commit")))
    }

    async fn range(
        &self,
        _name: &str,
        url: &str,
        _branch: &str,
        from: Option<&str>,
        to: &str,
    ) -> Result<(Vec<Commit>, bool), GitError> {
        if self.stall.load(Ordering::Relaxed) {
            self.stalled.notify_one();
            self.released.notified().await;
        }
        let history = self.history(url)?;
        let end = history.iter().position(|c| c.sha == to);
        let start = match from {
            Some(from) => history.iter().position(|c| c.sha == from).map(|i| i + 1),
            None => end,
        };
        match (start, end) {
            (Some(start), Some(end)) if start <= end => Ok((history[start..=end].to_vec(), false)),
            _ => Ok((Vec::new(), false)),
        }
    }

    async fn log(
        &self,
        name: &str,
        url: &str,
        branch: &str,
        spec: &str,
    ) -> Result<Vec<Commit>, GitError> {
        let (from, to) = spec
            .split_once("..")
            .ok_or_else(|| GitError::NotFound(format!("{spec:?} is not a range")))?;
        let from = self.resolve(name, url, branch, from).await?;
        let to = self.resolve(name, url, branch, to).await?;
        let (mut commits, _) = self.range(name, url, branch, Some(&from), &to).await?;
        commits.reverse();
        Ok(commits)
    }
}

pub(crate) const RT: &str = "fake:rt";
pub(crate) const ADDER: &str = "fake:adder";
pub(crate) const SHOUTER: &str = "fake:shouter";

/// One upstream built on two platforms; adder tests on both, shouter (with
/// a maintainer and JUnit reports) on linux only.
pub(crate) const CONFIG: &str = r#"
[hub]
data_dir = "DATA"

[[upstream]]
name = "rt"
url = "fake:rt"
platforms = ["linux", "mac"]
build = ["make install"]

[[project]]
name = "adder"
url = "fake:adder"
test = ["make test"]

[[project]]
name = "shouter"
url = "fake:shouter"
platforms = ["linux"]
test = ["make test"]
junit = ["junit.xml"]
maintainers = ["shouter-dev@example.org"]
network = true
"#;

/// A hub's pipeline without its tasks or server, and one agent session.
pub(crate) struct Farm {
    dir: tempfile::TempDir,
    config: HubConfig,
    pub(crate) store: Store,
    pub(crate) logs: Arc<JobLogs>,
    pub(crate) git: Arc<FakeGit>,
    pub(crate) dispatch: Dispatcher,
    pub(crate) results: Results,
    artifacts: Artifacts,
    pub(crate) notifier: Notifier,
    pub(crate) pipeline: Pipeline,
    agent: mpsc::UnboundedReceiver<Outgoing>,
    /// Agents joined besides `a` (see [`Farm::join`]): id, channel.
    others: Vec<(String, mpsc::UnboundedReceiver<Outgoing>)>,
    pub(crate) credentials: crate::auth::credentials::Credentials,
}

fn dispatch_settings(dir: &std::path::Path) -> DispatchSettings {
    DispatchSettings {
        lease_timeout: Duration::from_secs(600),
        heartbeat_interval: Duration::from_secs(200),
        max_attempts: 1,
        default_job_timeout: Duration::from_secs(60),
        max_job_timeout: Duration::from_secs(3600),
        timeout_grace: Duration::from_secs(60),
        space: DataDir::new(dir, 0),
        repo_credentials: Default::default(),
    }
}

impl Farm {
    pub(crate) async fn new() -> Farm {
        Farm::with_config(CONFIG).await
    }

    /// A farm whose hub reads `config` (`DATA`: the data dir).
    pub(crate) async fn with_config(config: &str) -> Farm {
        let dir = tempfile::tempdir().unwrap();
        let text = config.replace("DATA", dir.path().to_str().unwrap());
        let config = HubConfig::from_toml(&text, None).unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let logs = Arc::new(JobLogs::open_local(&store, 1 << 20).unwrap());
        let artifacts = Artifacts::open(
            &store,
            dir.path().join("artifacts"),
            1 << 20,
            DataDir::new(dir.path(), 0),
            Backend::Files,
        )
        .await
        .unwrap();
        let results = Results::open(&store)
            .unwrap()
            .with_flaky_rules(config.flaky_rules());
        let notifier = Notifier::start(
            &config,
            &store,
            results.clone(),
            logs.clone(),
            "http://hub.test".into(),
            CancellationToken::new(),
        )
        .unwrap();
        let git = Arc::new(FakeGit::default());
        let dispatch =
            Dispatcher::open(&store, logs.clone(), dispatch_settings(dir.path())).unwrap();
        let pipeline = Pipeline::open(
            &config,
            &store,
            dispatch.clone(),
            results.clone(),
            artifacts.clone(),
            notifier.clone(),
            git.clone(),
        )
        .unwrap();
        let agent = connect(&dispatch).await;
        let credentials = crate::auth::credentials::Credentials::open(&store).unwrap();
        Farm {
            others: Vec::new(),
            credentials,
            dir,
            config,
            store,
            logs,
            git,
            dispatch,
            results,
            artifacts,
            notifier,
            pipeline,
            agent,
        }
    }

    /// The hub's in-memory parts start over on the same database, as after
    /// a crash (dispatch reloads its open jobs, the pipeline its heads).
    async fn restart(&mut self) {
        self.dispatch = Dispatcher::open(
            &self.store,
            self.logs.clone(),
            dispatch_settings(self.dir.path()),
        )
        .unwrap();
        self.pipeline = Pipeline::open(
            &self.config,
            &self.store,
            self.dispatch.clone(),
            self.results.clone(),
            self.artifacts.clone(),
            self.notifier.clone(),
            self.git.clone(),
        )
        .unwrap();
        self.agent = connect(&self.dispatch).await;
        self.others.clear();
    }

    /// Enrolls an agent (with a trusted token or a volunteer's) and
    /// connects it; returns its id.
    pub(crate) async fn join(&mut self, name: &str, trusted: bool) -> String {
        let grant = crate::auth::credentials::Grant {
            trusted,
            ..Default::default()
        };
        let id = self.enroll(name, grant).await;
        let rx = crate::dispatch::tests::join_as(
            &self.dispatch,
            &id,
            name,
            64,
            &["linux", "mac"],
            &[],
            trusted,
        )
        .await;
        self.others.push((id.clone(), rx));
        id
    }

    /// Enrolls an agent with a token granting `grant`; returns its id.
    pub(crate) async fn enroll(
        &self,
        name: &str,
        grant: crate::auth::credentials::Grant,
    ) -> String {
        let (_, token) = self
            .credentials
            .create_token(grant, Duration::from_secs(60), 1, String::new())
            .await
            .unwrap();
        self.credentials.enroll(&token, name).await.unwrap().0.id
    }

    /// Only agent `id` gets new jobs from now on (the others are held
    /// back the way a quarantine holds an agent back).
    pub(crate) async fn only(&self, id: &str) {
        let all = std::iter::once("a").chain(self.others.iter().map(|(o, _)| o.as_str()));
        for other in all {
            self.dispatch
                .set_quarantined(other, other != id)
                .await
                .unwrap();
        }
    }

    /// The jobs assigned to any agent since last asked, with their keys
    /// (the record names the agent).
    pub(crate) fn assigned(&mut self) -> Vec<(JobRef, JobRecord, JobKey)> {
        let mut out = Vec::new();
        let channels =
            std::iter::once(&mut self.agent).chain(self.others.iter_mut().map(|(_, rx)| rx));
        for rx in channels {
            while let Ok(msg) = rx.try_recv() {
                if let Ok(HubMessage {
                    msg: Some(Msg::Assign(a)),
                }) = *msg
                {
                    let job = a.job.unwrap();
                    let rec = self.dispatch.get(job.job_id).unwrap().unwrap();
                    let key = JobKey::parse(&rec.key).unwrap();
                    out.push((job, rec, key));
                }
            }
        }
        out
    }

    /// Finishes a job as its agent would: a passed build uploads its
    /// runtime first.
    pub(crate) async fn finish(
        &self,
        job: JobRef,
        key: &JobKey,
        outcome: Outcome,
        reports: Vec<ReportFile>,
    ) {
        self.finish_built(job, key, outcome, reports, None).await
    }

    /// [`Farm::finish`], a passed build uploading `runtime` (default: bytes
    /// naming its job).
    async fn finish_built(
        &self,
        job: JobRef,
        key: &JobKey,
        outcome: Outcome,
        reports: Vec<ReportFile>,
        runtime: Option<&str>,
    ) {
        let agent = self.dispatch.get(job.job_id).unwrap().unwrap().agent_id;
        let agent = agent.as_str();
        let mut sha = String::new();
        if matches!(key.base(), JobKey::Build { .. }) && outcome == Outcome::Passed {
            let data = match runtime {
                Some(r) => r.as_bytes().to_vec(),
                None => format!("the runtime built by job {}", job.job_id).into_bytes(),
            };
            sha = hex::encode(Sha256::digest(&data));
            let chunks = vec![
                Ok(ArtifactChunk {
                    meta: Some(ArtifactMeta {
                        sha256: sha.clone(),
                        size: data.len() as u64,
                        job: Some(job),
                        ..Default::default()
                    }),
                    data: Vec::new(),
                }),
                Ok(ArtifactChunk { meta: None, data }),
            ];
            let text = key.to_string();
            self.artifacts
                .receive(agent, tokio_stream::iter(chunks), |j| {
                    Ok(Origin::from_job(j.job_id, &text))
                })
                .await
                .unwrap();
            // As the agent service does once an upload is verified.
            assert!(self.dispatch.uploaded(agent, &job, &sha).await.unwrap());
        }
        let result = JobResult {
            job: Some(job),
            outcome: outcome.into(),
            artifact_sha256: sha,
            reports,
            ..Default::default()
        };
        assert!(
            self.dispatch
                .record_result(agent, result)
                .await
                .unwrap()
                .recorded
        );
    }

    /// Finishes every assigned job with what `decide` says; returns their keys.
    pub(crate) async fn run_jobs(
        &mut self,
        decide: impl Fn(&JobKey) -> (Outcome, Vec<ReportFile>),
    ) -> Vec<JobKey> {
        let mut keys = Vec::new();
        for (job, _, key) in self.assigned() {
            let (outcome, reports) = decide(&key);
            self.finish(job, &key, outcome, reports).await;
            keys.push(key);
        }
        keys
    }

    /// One poll of upstream `i` (for tests outside the pipeline).
    pub(crate) async fn poll_upstream(&self, i: usize) {
        self.pipeline.poll_upstream(i).await
    }

    /// One poll of project `i` (for tests outside the pipeline).
    pub(crate) async fn poll_project(&self, i: usize) {
        self.pipeline.poll_project(i).await
    }

    /// Takes in everything finished.
    pub(crate) async fn take_in(&self) {
        while self.pipeline.take_inbox().await.unwrap() > 0 {}
    }

    fn transitions(&self, project: &str) -> Vec<Transition> {
        self.results
            .transitions_of("rt", project, 100, true)
            .unwrap()
    }
}

async fn connect(d: &Dispatcher) -> mpsc::UnboundedReceiver<Outgoing> {
    crate::dispatch::tests::agent(d, "a", 64, &["linux", "mac"], &[]).await
}

pub(crate) fn passed(_: &JobKey) -> (Outcome, Vec<ReportFile>) {
    (Outcome::Passed, Vec::new())
}

/// A JUnit report with one case, failing or not.
pub(crate) fn junit(name: &str, failing: bool) -> Vec<ReportFile> {
    let body = if failing {
        r#"<failure message="expected ABC"/>"#
    } else {
        ""
    };
    let xml = format!(
        r#"<testsuite name="s"><testcase classname="s" name="{name}">{body}</testcase></testsuite>"#
    );
    vec![ReportFile {
        path: "junit.xml".into(),
        data: xml.into_bytes(),
        ..Default::default()
    }]
}

fn test_keys(keys: &[JobKey]) -> Vec<(String, String, String)> {
    let mut out: Vec<_> = keys
        .iter()
        .filter_map(|k| match k {
            JobKey::Test {
                project,
                platform,
                upstream_commit,
                ..
            } => Some((project.clone(), platform.clone(), upstream_commit.clone())),
            _ => None,
        })
        .collect();
    out.sort();
    out
}

fn kind(t: &Transition) -> TransitionKind {
    TransitionKind::try_from(t.kind).unwrap()
}

/// Polls the projects, then lands and builds `c1` green with green tests.
pub(crate) async fn green_trunk(f: &mut Farm) -> String {
    f.git.commit(ADDER);
    f.git.commit(SHOUTER);
    f.pipeline.poll_project(0).await;
    f.pipeline.poll_project(1).await;
    let c1 = f.git.commit(RT);
    f.pipeline.poll_upstream(0).await;
    f.run_jobs(passed).await;
    f.take_in().await;
    f.run_jobs(|_| (Outcome::Passed, junit("upper", false)))
        .await;
    f.take_in().await;
    c1
}

#[tokio::test]
async fn a_new_upstream_commit_is_built_once_on_each_platform() {
    let mut f = Farm::new().await;
    let c1 = f.git.commit(RT);
    f.pipeline.poll_upstream(0).await;
    let jobs = f.assigned();
    let mut builds: Vec<(String, String)> = jobs
        .iter()
        .map(|(_, rec, key)| match key {
            JobKey::Build {
                platform, commit, ..
            } => {
                assert!(rec.spec.labels.contains(platform));
                assert_eq!(rec.spec.repository.as_ref().unwrap().rev, *commit);
                assert_eq!(rec.spec.upload_prefix, "prefix");
                assert!(!rec.spec.network, "builds never ask for the network");
                (platform.clone(), commit.clone())
            }
            _ => panic!("no runtime yet: no tests"),
        })
        .collect();
    builds.sort();
    assert_eq!(
        builds,
        [
            ("linux".to_string(), c1.clone()),
            ("mac".to_string(), c1.clone())
        ]
    );
    let status = f.pipeline.status("").unwrap();
    let rt = &status.upstreams[0];
    assert_eq!(rt.head, c1);
    assert_eq!(rt.latest_builds.len(), 2);
    assert!(
        rt.latest_builds
            .iter()
            .all(|b| b.state == BuildState::Pending as i32)
    );
    // Polled again: nothing new.
    f.pipeline.poll_upstream(0).await;
    assert!(f.assigned().is_empty(), "each build exists once");
    let again = f.pipeline.build("rt", &c1[..8], false).await.unwrap();
    assert_eq!((&again.commit, again.builds.len()), (&c1, 2));
    assert!(
        again.already_built,
        "`upstream build` says the commit was built (and by which jobs)"
    );
    let mut built_by: Vec<u64> = jobs.iter().map(|(job, ..)| job.job_id).collect();
    built_by.sort();
    let mut named: Vec<u64> = again.builds.iter().map(|b| b.job_id).collect();
    named.sort();
    assert_eq!(named, built_by, "the answer names the jobs that built it");
    assert!(
        f.assigned().is_empty(),
        "a manual build of a built commit builds nothing"
    );
    // A new commit built by hand is new; forced, a built one is built again.
    let c2 = f.git.commit(RT);
    let fresh = f.pipeline.build("rt", &c2, false).await.unwrap();
    assert!(!fresh.already_built);
    let forced = f.pipeline.build("rt", &c1, true).await.unwrap();
    assert!(!forced.already_built);
    assert!(
        forced.builds.iter().all(|b| !built_by.contains(&b.job_id)),
        "forced: built again by new jobs"
    );
}

#[tokio::test]
async fn a_passed_build_fans_test_jobs_out_to_subscribed_projects() {
    let mut f = Farm::new().await;
    let adder = f.git.commit(ADDER);
    f.pipeline.poll_project(0).await;
    f.pipeline.poll_project(1).await;
    assert!(
        f.assigned().is_empty(),
        "no good runtime to test against yet"
    );
    let c1 = f.git.commit(RT);
    f.pipeline.poll_upstream(0).await;
    // mac fails, linux passes.
    f.run_jobs(|k| match k {
        JobKey::Build { platform, .. } if platform == "mac" => (Outcome::Failed, Vec::new()),
        _ => (Outcome::Passed, Vec::new()),
    })
    .await;
    f.take_in().await;
    let jobs = f.assigned();
    let keys: Vec<JobKey> = jobs.iter().map(|(_, _, k)| k.clone()).collect();
    // Shouter has no commit yet: its branch is tested.
    assert_eq!(
        test_keys(&keys),
        [
            ("adder".to_string(), "linux".to_string(), c1.clone()),
            ("shouter".to_string(), "linux".to_string(), c1.clone()),
        ]
    );
    let good = f.results.good_build("rt", "linux").unwrap().unwrap();
    assert_eq!(good.fanned_out, 2);
    for (_, rec, key) in &jobs {
        assert_eq!(rec.spec.artifact_sha256, good.artifact_sha256);
        if let JobKey::Test {
            project,
            project_commit,
            ..
        } = key
        {
            let want = if project == "adder" {
                adder.as_str()
            } else {
                ""
            };
            assert_eq!(project_commit, want);
            // Only the project that says it needs the network asks for it.
            assert_eq!(rec.spec.network, project == "shouter", "{project}");
        }
    }
    let mac = f.results.latest_build("rt", "mac").unwrap().unwrap();
    assert_eq!((mac.state, mac.fanned_out), (BuildState::Failed as i32, 0));
    assert!(f.results.good_build("rt", "mac").unwrap().is_none());
    let status = f.pipeline.status("rt").unwrap();
    assert_eq!(
        status.cells.len(),
        3,
        "adder on two platforms, shouter on one"
    );
    assert_eq!(status.cells.iter().filter(|c| c.pending).count(), 2);
}

#[tokio::test]
async fn a_failed_run_after_a_green_one_went_red_naming_the_culprit_range() {
    let mut f = Farm::new().await;
    let c1 = green_trunk(&mut f).await;
    assert_eq!(
        kind(&f.transitions("shouter")[0]),
        TransitionKind::StillGreen
    );
    // Two commits land; polling sees only the second as the head.
    let c2 = f.git.commit(RT);
    let c3 = f.git.commit(RT);
    f.pipeline.poll_upstream(0).await;
    f.run_jobs(passed).await;
    f.take_in().await;
    // (adder reports its one test as before: a suite reporting none would
    // be a suspicious green.)
    f.run_jobs(shouter_red).await;
    f.take_in().await;
    // Held until its re-runs are in: it fails again, passes on c1's runtime.
    assert!(f.went_red("shouter").is_empty());
    let reruns = f.run_jobs(regressed).await;
    assert_eq!(reruns.len(), 2, "again and on the baseline: {reruns:?}");
    f.take_in().await;
    let t = &f.transitions("shouter")[0];
    assert_eq!(kind(t), TransitionKind::WentRed);
    assert_eq!(t.class, Some(Class::Regressed));
    assert_eq!(t.last_green_upstream_commit, c1);
    let culprits: Vec<&str> = t.culprits.iter().map(|c| c.sha.as_str()).collect();
    assert_eq!(culprits, [c2.as_str(), c3.as_str()]);
    assert!(t.culprits_error.is_empty());
    assert_eq!(t.newly_failing.len(), 1);
    assert!(
        f.transitions("adder")
            .iter()
            .all(|t| kind(t) != TransitionKind::WentRed)
    );
    // The maintainer's mail was queued with it.
    let mails = f.notifier.mails(10, MailState::Pending).unwrap();
    assert_eq!(mails.len(), 1);
    assert_eq!(mails[0].to, "shouter-dev@example.org");
    // Breakage at the middle commit names it.
    let b = f.pipeline.breakage("rt", &c2[..8]).await.unwrap();
    assert_eq!(b.went_red.len(), 1);
    let status = f.pipeline.status("").unwrap();
    let shouter = status
        .cells
        .iter()
        .find(|c| c.latest.project == "shouter")
        .unwrap();
    assert_eq!(shouter.red_since.as_ref().unwrap().id, t.id);
}

#[tokio::test]
async fn the_dashboards_history_shows_the_last_heads_their_builds_and_what_each_run_caused() {
    let mut f = Farm::new().await;
    let c1 = green_trunk(&mut f).await;
    let c2 = f.git.commit(RT);
    let c3 = f.git.commit(RT);
    let changed = f.pipeline.changes();
    f.pipeline.poll_upstream(0).await;
    assert!(
        changed.has_changed().unwrap(),
        "a new head wakes the dashboard"
    );
    f.run_jobs(passed).await;
    f.take_in().await;
    // shouter's test of c3 is open: the history says so, with no reason
    // to wait (an agent is connected and takes it).
    let open = f.pipeline.history(8).unwrap();
    let shouter = open[0]
        .series
        .iter()
        .find(|s| s.project == "shouter")
        .unwrap();
    assert_eq!(shouter.open.len(), 1, "{shouter:?}");
    assert_eq!(shouter.open[0].upstream_commit, c3);
    f.run_jobs(shouter_red).await;
    f.take_in().await;
    f.run_jobs(regressed).await;
    f.take_in().await;

    let h = f.pipeline.history(8).unwrap();
    assert_eq!(h.len(), 1);
    let rt = &h[0];
    // Polling saw c1 and c3 (never c2): newest first; c3's subject is
    // known from the went-red's culprit range.
    let shas: Vec<&str> = rt.commits.iter().map(|c| c.sha.as_str()).collect();
    assert_eq!(shas, [c3.as_str(), c1.as_str()]);
    assert!(!rt.commits[0].subject.is_empty(), "{:?}", rt.commits[0]);
    // Both commits built on both platforms.
    assert_eq!(rt.builds.len(), 4, "{:?}", rt.builds);
    let shouter = rt.series.iter().find(|s| s.project == "shouter").unwrap();
    assert!(shouter.open.is_empty());
    let red = &shouter.runs[0];
    assert_eq!(red.upstream_commit, c3);
    let t = shouter
        .transitions
        .iter()
        .find(|t| t.job_id == red.job_id)
        .expect("the red run's transition");
    assert_eq!(kind(t), TransitionKind::WentRed);
    let culprits: Vec<&str> = t.culprits.iter().map(|c| c.sha.as_str()).collect();
    assert_eq!(culprits, [c2.as_str(), c3.as_str()]);
    assert_eq!(shouter.runs.last().unwrap().upstream_commit, c1);
    // Bounded: one head asked, one head given.
    assert_eq!(f.pipeline.history(1).unwrap()[0].commits.len(), 1);

    // A database from before the heads' order was kept gets it at start.
    let order: Vec<_> = f.pipeline.inner.heads.keys("hs/").collect();
    assert_eq!(order.len(), 2);
    for k in order {
        f.pipeline.inner.heads.remove(k.unwrap()).unwrap();
    }
    assert!(f.pipeline.recent_heads("rt", 8).unwrap().is_empty());
    f.restart().await;
    let heads: Vec<String> = f
        .pipeline
        .recent_heads("rt", 8)
        .unwrap()
        .into_iter()
        .map(|h| h.commit)
        .collect();
    assert_eq!(heads, [c3, c1]);
}

#[tokio::test]
async fn the_dashboards_history_asks_dispatch_only_about_the_jobs_at_the_commits_it_shows() {
    let mut f = Farm::new().await;
    green_trunk(&mut f).await;
    // c2 built: its test jobs are given to agent `a`, not started.
    let c2 = f.git.commit(RT);
    f.pipeline.poll_upstream(0).await;
    f.run_jobs(passed).await;
    f.take_in().await;
    // c3's builds are given to `a` too; c2's tests stay open.
    let c3 = f.git.commit(RT);
    f.pipeline.poll_upstream(0).await;
    let h = f.pipeline.history(2).unwrap();
    let shas: Vec<&str> = h[0].commits.iter().map(|c| c.sha.as_str()).collect();
    assert_eq!(shas, [c3.as_str(), c2.as_str()]);
    let open: Vec<&OpenRun> = h[0].series.iter().flat_map(|s| &s.open).collect();
    assert!(!open.is_empty());
    for o in open {
        assert_eq!(o.upstream_commit, c2);
        assert_eq!(o.phase, Some(Phase::Starting), "{o:?}");
    }
    let c3_builds: Vec<&str> = h[0]
        .builds
        .iter()
        .filter(|b| b.commit == c3)
        .map(|b| b.phase.as_str())
        .collect();
    assert_eq!(c3_builds, ["starting", "starting"]);
    // Only c3 shown: c2's open jobs are not asked about (nor listed).
    let h = f.pipeline.history(1).unwrap();
    assert_eq!(h[0].commits.len(), 1);
    assert!(
        h[0].series.iter().all(|s| s.open.is_empty()),
        "{:?}",
        h[0].series
    );
    assert_eq!(h[0].builds.len(), 2);
}

#[tokio::test]
async fn a_redelivered_finished_build_fans_out_once_and_records_once() {
    let mut f = Farm::new().await;
    f.git.commit(ADDER);
    f.pipeline.poll_project(0).await;
    let c1 = f.git.commit(RT);
    f.pipeline.poll_upstream(0).await;
    f.run_jobs(passed).await;
    // The first build is recorded, then the hub dies: no fan-out, no ack.
    let inbox = f.dispatch.finished_inbox(10).unwrap();
    assert_eq!(inbox.len(), 2);
    let first = f.pipeline.record_job(&inbox[0]).await.unwrap().unwrap();
    assert!(first.fanned_out > 0);
    assert!(
        f.assigned().is_empty(),
        "nothing fanned out before the crash"
    );
    f.restart().await;
    // The inbox hands both builds over again.
    f.take_in().await;
    let mut keys: Vec<JobKey> = f.assigned().into_iter().map(|(_, _, k)| k).collect();
    assert_eq!(
        test_keys(&keys),
        [
            ("adder".to_string(), "linux".to_string(), c1.clone()),
            ("adder".to_string(), "mac".to_string(), c1.clone()),
            ("shouter".to_string(), "linux".to_string(), c1.clone()),
        ]
    );
    assert!(
        f.dispatch.finished_inbox(10).unwrap().is_empty(),
        "acknowledged"
    );
    let builds = f
        .results
        .transitions(100, |t| t.project.is_empty())
        .unwrap();
    assert_eq!(builds.len(), 2, "one transition per platform: {builds:?}");
    // Handed over yet again (a crash after the fan-out, before the ack):
    // nothing new.
    f.pipeline.take_in(&inbox[0]).await.unwrap();
    keys.extend(f.assigned().into_iter().map(|(_, _, k)| k));
    assert_eq!(keys.len(), 3);
    assert_eq!(f.results.transitions(100, |_| true).unwrap().len(), 2);
}

#[tokio::test]
async fn a_slow_culprit_fetch_leaves_the_pollers_unblocked() {
    let mut f = Farm::new().await;
    green_trunk(&mut f).await;
    let c2 = f.git.commit(RT);
    f.pipeline.poll_upstream(0).await;
    // linux's build fails: listing its culprit range hangs in git.
    f.run_jobs(|k| match k {
        JobKey::Build { platform, .. } if platform == "linux" => (Outcome::Failed, Vec::new()),
        _ => (Outcome::Passed, Vec::new()),
    })
    .await;
    f.git.stall.store(true, Ordering::Relaxed);
    let pipeline = f.pipeline.clone();
    let intake = tokio::spawn(async move { pipeline.take_inbox().await });
    f.git.stalled.notified().await;
    // Meanwhile every poller still gets through: new heads, new builds,
    // tests of a new project commit against the good runtime.
    let guard = Duration::from_secs(10);
    let c3 = f.git.commit(RT);
    f.git.commit(ADDER);
    tokio::time::timeout(guard, f.pipeline.poll_upstream(0))
        .await
        .expect("the upstream poller is not blocked");
    tokio::time::timeout(guard, f.pipeline.poll_project(0))
        .await
        .expect("the project poller is not blocked");
    let keys: Vec<JobKey> = f.assigned().into_iter().map(|(_, _, k)| k).collect();
    assert!(
        keys.iter()
            .any(|k| matches!(k, JobKey::Build { commit, .. } if *commit == c3))
    );
    assert!(
        keys.iter()
            .any(|k| matches!(k, JobKey::Test { project, .. } if project == "adder"))
    );
    f.git.released.notify_one();
    intake.await.unwrap().unwrap();
    let t = f
        .results
        .transitions(1, |t| t.project.is_empty() && t.platform == "linux")
        .unwrap();
    assert_eq!(kind(&t[0]), TransitionKind::WentRed);
    assert_eq!(t[0].culprits[0].sha, c2);
}

#[tokio::test]
async fn a_git_failure_is_shown_and_decides_nothing_else() {
    let mut f = Farm::new().await;
    let c1 = green_trunk(&mut f).await;
    let c2 = f.git.commit(RT);
    f.pipeline.poll_upstream(0).await;
    f.run_jobs(|_| (Outcome::Failed, Vec::new())).await;
    // The server goes away: the culprit range cannot be listed, the
    // upstream cannot be polled.
    f.git.broken.lock().unwrap().insert(RT.into());
    f.take_in().await;
    let t = f.results.transitions(1, |t| t.project.is_empty()).unwrap();
    assert_eq!(kind(&t[0]), TransitionKind::WentRed);
    assert_eq!(t[0].last_green_upstream_commit, c1);
    let culprits: Vec<&str> = t[0].culprits.iter().map(|c| c.sha.as_str()).collect();
    assert_eq!(culprits, [c2.as_str()], "only the commit that went red");
    assert!(
        t[0].culprits_error.contains("could not read"),
        "{}",
        t[0].culprits_error
    );
    f.git.commit(RT);
    f.pipeline.poll_upstream(0).await;
    let status = f.pipeline.status("").unwrap();
    assert!(status.upstreams[0].poll_error.contains("could not read"));
    assert_eq!(status.upstreams[0].head, c2, "the last head seen stays");
    // Projects are polled as before.
    f.git.commit(ADDER);
    f.pipeline.poll_project(0).await;
    assert!(!f.assigned().is_empty(), "adder's new commit is tested");
    f.git.broken.lock().unwrap().clear();
    f.pipeline.poll_upstream(0).await;
    assert!(
        f.pipeline.status("").unwrap().upstreams[0]
            .poll_error
            .is_empty()
    );
}

// ---- A volunteer's verdict is never taken alone (issue 12 item 3) ----

/// Shouter fails, everything else passes.
pub(crate) fn shouter_red(k: &JobKey) -> (Outcome, Vec<ReportFile>) {
    match k.base() {
        JobKey::Test { project, .. } if project == "shouter" => {
            (Outcome::Failed, junit("upper", true))
        }
        _ => (Outcome::Passed, junit("upper", false)),
    }
}

/// Every test passes (shouter with its report).
fn all_green(_: &JobKey) -> (Outcome, Vec<ReportFile>) {
    (Outcome::Passed, junit("upper", false))
}

/// Whether a job is a baseline re-run.
pub(crate) fn is_baseline(k: &JobKey) -> bool {
    matches!(
        k,
        JobKey::Rerun {
            kind: RerunKind::Baseline,
            ..
        }
    )
}

/// Shouter fails, but passes on the baseline runtime (a regression).
pub(crate) fn regressed(k: &JobKey) -> (Outcome, Vec<ReportFile>) {
    match is_baseline(k) {
        true => all_green(k),
        false => shouter_red(k),
    }
}

impl Farm {
    /// Lands an upstream commit, builds it on the trusted `a`, and fans it
    /// out to `tester` only; returns the commit.
    async fn land_tested_by(&mut self, tester: &str) -> String {
        self.only("a").await;
        let c = self.git.commit(RT);
        self.pipeline.poll_upstream(0).await;
        let built = self.run_jobs(passed).await;
        assert!(built.iter().all(|k| matches!(k, JobKey::Build { .. })));
        self.only(tester).await;
        self.take_in().await;
        c
    }

    /// A new upstream commit, tested by volunteer `v` only: shouter red,
    /// the rest green; taken in (shouter's red is held). Returns the commit.
    async fn volunteer_says_shouter_is_red(&mut self, v: &str) -> String {
        let c = self.land_tested_by(v).await;
        self.run_jobs(shouter_red).await;
        self.take_in().await;
        c
    }

    /// A new upstream commit lands while an older verdict awaits: its
    /// build and the re-runs both go to `a`, only the build finishes and is
    /// taken in. Returns the commit and the re-runs, unfinished.
    async fn land_while_a_confirmation_waits(&mut self) -> (String, Vec<(JobRef, JobKey)>) {
        self.only("a").await;
        let c = self.git.commit(RT);
        self.pipeline.poll_upstream(0).await;
        let mut reruns = Vec::new();
        for (job, _, key) in self.assigned() {
            match key {
                JobKey::Rerun { .. } => reruns.push((job, key)),
                _ => self.finish(job, &key, Outcome::Passed, Vec::new()).await,
            }
        }
        assert_eq!(reruns.len(), 2, "again and on the baseline: {reruns:?}");
        self.take_in().await;
        (c, reruns)
    }

    /// Finishes re-runs handed out earlier as `decide` says; takes them in.
    async fn finish_reruns(
        &mut self,
        reruns: Vec<(JobRef, JobKey)>,
        decide: impl Fn(&JobKey) -> (Outcome, Vec<ReportFile>),
    ) {
        for (job, key) in reruns {
            let (outcome, reports) = decide(&key);
            self.finish(job, &key, outcome, reports).await;
        }
        self.take_in().await;
    }

    /// The newest run of `project` on linux, as the grid shows it.
    fn cell(&self, project: &str) -> crate::results::RunInfo {
        let status = self.pipeline.status("").unwrap();
        status
            .cells
            .into_iter()
            .find(|c| c.latest.project == project && c.latest.platform == "linux")
            .unwrap()
            .latest
    }

    fn went_red(&self, project: &str) -> Vec<Transition> {
        let all = self.transitions(project);
        all.into_iter()
            .filter(|t| kind(t) == TransitionKind::WentRed)
            .collect()
    }

    fn pending_mails(&self) -> usize {
        self.notifier.mails(100, MailState::Pending).unwrap().len()
    }

    /// Open confirmation runs' keys.
    fn open_confirmations(&self) -> Vec<String> {
        let keys = self.dispatch.open_keys(crate::job_key::TEST_PREFIX);
        keys.into_iter()
            .map(|(k, _)| k)
            .filter(|k| matches!(JobKey::parse(k), Some(JobKey::Rerun { .. })))
            .collect()
    }

    fn verdicts(&self, agent: &str) -> crate::auth::credentials::Verdicts {
        let agents = self.credentials.list_agents().unwrap();
        agents.into_iter().find(|a| a.id == agent).unwrap().verdicts
    }
}

#[tokio::test]
async fn a_verdict_is_never_confirmed_by_an_agent_enrolled_with_the_same_token() {
    let mut f = Farm::new().await;
    // One person, two identities from one token (uses = 2).
    let (_, token) = f
        .credentials
        .create_token(
            crate::auth::credentials::Grant::default(),
            Duration::from_secs(60),
            2,
            String::new(),
        )
        .await
        .unwrap();
    let mut twins = Vec::new();
    for name in ["liar", "twin"] {
        let (agent, _) = f.credentials.enroll(&token, name).await.unwrap();
        let rx =
            crate::dispatch::tests::join(&f.dispatch, &agent.id, 64, &["linux", "mac"], &[], false)
                .await;
        f.others.push((agent.id.clone(), rx));
        twins.push(agent.id);
    }
    let (liar, twin) = (twins[0].clone(), twins[1].clone());
    green_trunk(&mut f).await;
    f.land_tested_by(&liar).await;
    for (job, _, key) in f.assigned() {
        let (outcome, reports) = shouter_red(&key);
        f.finish(job, &key, outcome, reports).await;
    }
    f.take_in().await;
    assert_eq!(f.cell("shouter").confirmation, "awaiting");
    // The twin is idle and free, yet the re-run waits for someone else.
    f.only(&twin).await;
    assert!(f.assigned().is_empty(), "the twin took the re-run");
    f.only("a").await;
    let reruns = f.assigned();
    assert_eq!(reruns.len(), 2, "again and on the baseline");
    for (_, rec, _) in &reruns {
        assert_eq!(rec.agent_id, "a");
        assert!(
            rec.placement.exclude_agents.contains(&twin),
            "{:?}",
            rec.placement
        );
    }
}

#[tokio::test]
async fn a_volunteers_went_red_counts_only_once_another_agent_agrees() {
    let mut f = Farm::new().await;
    let v = f.join("volunteer", false).await;
    let c1 = green_trunk(&mut f).await;
    let c2 = f.land_tested_by(&v).await;
    let ran = f.assigned();
    assert!(ran.iter().all(|(_, rec, _)| rec.agent_id == v));
    let original = ran
        .iter()
        .find(|(_, _, k)| matches!(k, JobKey::Test { project, platform, .. } if project == "shouter" && platform == "linux"))
        .map(|(_, rec, _)| rec.clone())
        .unwrap();
    for (job, _, key) in ran {
        let (outcome, reports) = shouter_red(&key);
        f.finish(job, &key, outcome, reports).await;
    }
    f.take_in().await;
    // Held: no transition, no mail, shown as awaiting.
    assert!(f.went_red("shouter").is_empty());
    assert_eq!(f.pending_mails(), 0);
    let cell = f.cell("shouter");
    assert_eq!(cell.confirmation, "awaiting");
    assert!(
        cell.confirmation_detail.contains(&v),
        "{}",
        cell.confirmation_detail
    );
    // The re-runs are queued, and never given to the agent it checks.
    assert_eq!(f.open_confirmations().len(), 2);
    assert!(
        f.assigned().is_empty(),
        "only the volunteer may take jobs now"
    );
    f.only("a").await;
    let reruns = f.assigned();
    assert_eq!(reruns.len(), 2, "again and on the baseline");
    let mut again = None;
    for (job, rec, key) in reruns {
        assert_eq!(rec.agent_id, "a");
        assert_eq!(rec.placement.exclude_agents, std::slice::from_ref(&v));
        assert!(rec.placement.prefer_trusted);
        assert!(matches!(&key, JobKey::Rerun { job, n: 1, .. } if *job == original.id));
        if is_baseline(&key) {
            // The same project commit on c1's runtime.
            let good = f.results.build("rt", "linux", &c1).unwrap().unwrap();
            assert_eq!(rec.spec.artifact_sha256, good.artifact_sha256);
            assert_eq!(rec.spec.repository, original.spec.repository);
        } else {
            assert_eq!(rec.spec, original.spec, "the same job, on another agent");
            again = Some(job);
        }
        let (outcome, reports) = regressed(&key);
        f.finish(job, &key, outcome, reports).await;
    }
    let job = again.unwrap();
    f.take_in().await;
    let red = f.went_red("shouter");
    assert_eq!(red.len(), 1, "one transition once they agree");
    assert_eq!(red[0].job_id, original.id, "the original result counts");
    assert_eq!(red[0].confirmed_by_job, job.job_id);
    assert_eq!(red[0].class, Some(Class::Regressed));
    assert_eq!(red[0].last_green_upstream_commit, c1);
    let culprits: Vec<&str> = red[0].culprits.iter().map(|c| c.sha.as_str()).collect();
    assert_eq!(culprits, [c2.as_str()]);
    assert_eq!(f.pending_mails(), 1, "the maintainer's mail, once");
    assert_eq!(f.cell("shouter").confirmation, "confirmed");
    let counted = f.verdicts(&v);
    assert_eq!((counted.agreed, counted.disagreed), (1, 0));
    // Handed over again (a crash before the ack): nothing twice.
    let again = f.dispatch.get(job.job_id).unwrap().unwrap();
    f.pipeline.take_in(&again).await.unwrap();
    assert_eq!(f.went_red("shouter").len(), 1);
    assert_eq!(f.verdicts(&v).agreed, 1);
}

#[tokio::test]
async fn a_volunteers_false_red_is_overruled_and_held_against_it() {
    let mut f = Farm::new().await;
    let v = f.join("volunteer", false).await;
    green_trunk(&mut f).await;
    f.volunteer_says_shouter_is_red(&v).await;
    f.only("a").await;
    // The trusted re-run passes: the volunteer lied (or flaked).
    f.run_jobs(all_green).await;
    f.take_in().await;
    assert!(f.went_red("shouter").is_empty());
    assert_eq!(f.pending_mails(), 0, "no went-red mail");
    let cell = f.cell("shouter");
    assert_eq!(cell.confirmation, "overruled");
    assert!(
        cell.confirmation_detail.contains("red on")
            && cell.confirmation_detail.contains("green on a (trusted"),
        "both verdicts shown: {}",
        cell.confirmation_detail
    );
    let counted = f.verdicts(&v);
    assert_eq!((counted.agreed, counted.disagreed), (0, 1));
    assert!(!counted.quarantined(), "once is not enough");
    // The series is as green as before: the next red from a trusted agent
    // goes red with the range after the last green.
    let status = f.pipeline.status("").unwrap();
    assert!(status.cells.iter().all(|c| c.red_since.is_none()));
}

#[tokio::test]
async fn a_volunteers_false_green_does_not_fix_a_red_series() {
    let mut f = Farm::new().await;
    let v = f.join("volunteer", false).await;
    green_trunk(&mut f).await;
    // A trusted agent's red counts once its re-runs say it regressed.
    f.land_tested_by("a").await;
    f.run_jobs(shouter_red).await;
    f.take_in().await;
    f.run_jobs(regressed).await;
    f.take_in().await;
    assert_eq!(f.went_red("shouter").len(), 1);
    assert!(f.open_confirmations().is_empty());
    assert_eq!(f.pending_mails(), 1);
    // The volunteer says it is fixed; the trusted re-run says it is not.
    f.land_tested_by(&v).await;
    f.run_jobs(all_green).await;
    f.take_in().await;
    assert_eq!(f.cell("shouter").confirmation, "awaiting");
    f.only("a").await;
    f.run_jobs(shouter_red).await;
    f.take_in().await;
    let fixed = f.transitions("shouter");
    assert!(fixed.iter().all(|t| kind(t) != TransitionKind::Fixed));
    assert_eq!(f.cell("shouter").confirmation, "overruled");
    assert_eq!(f.pending_mails(), 1, "no fixed mail");
    assert_eq!(f.verdicts(&v).disagreed, 1);
    let status = f.pipeline.status("").unwrap();
    let shouter = status
        .cells
        .iter()
        .find(|c| c.latest.project == "shouter")
        .unwrap();
    assert!(shouter.red_since.is_some(), "still red");
}

#[tokio::test]
async fn confirm_never_takes_a_volunteer_alone_and_always_confirms_a_trusted_agent() {
    let config = CONFIG
        .replace(
            "url = \"fake:adder\"",
            "url = \"fake:adder\"\nconfirm = \"never\"",
        )
        .replace(
            "url = \"fake:shouter\"",
            "url = \"fake:shouter\"\nconfirm = \"always\"",
        );
    let mut f = Farm::with_config(&config).await;
    let v = f.join("volunteer", false).await;
    let t = f.join("trusted", true).await;
    green_trunk(&mut f).await;
    // adder (never): the volunteer's red counts at once.
    f.land_tested_by(&v).await;
    f.run_jobs(|k| match k.base() {
        JobKey::Test { project, .. } if project == "adder" => (Outcome::Failed, Vec::new()),
        _ => (Outcome::Passed, junit("upper", false)),
    })
    .await;
    f.take_in().await;
    assert_eq!(f.went_red("adder").len(), 2, "linux and mac, unconfirmed");
    assert!(f.open_confirmations().is_empty());
    // shouter (always): even a trusted agent's red waits for another agent.
    f.land_tested_by("a").await;
    f.run_jobs(shouter_red).await;
    f.take_in().await;
    assert!(f.went_red("shouter").is_empty());
    assert_eq!(f.cell("shouter").confirmation, "awaiting");
    f.only(&t).await;
    let reruns = f.assigned();
    assert_eq!(reruns.len(), 2, "again and on the baseline");
    for (job, rec, key) in reruns {
        assert_eq!(rec.agent_id, t);
        assert_eq!(rec.placement.exclude_agents, ["a".to_string()]);
        let (outcome, reports) = regressed(&key);
        f.finish(job, &key, outcome, reports).await;
    }
    f.take_in().await;
    assert_eq!(f.went_red("shouter").len(), 1);
}

#[tokio::test]
async fn a_crash_between_holding_a_verdict_and_the_ack_makes_one_confirmation() {
    let mut f = Farm::new().await;
    let v = f.join("volunteer", false).await;
    green_trunk(&mut f).await;
    f.land_tested_by(&v).await;
    f.run_jobs(shouter_red).await;
    // The red run is recorded (held), then the hub dies: no re-run yet.
    let inbox = f.dispatch.finished_inbox(10).unwrap();
    let shouter = inbox
        .iter()
        .find(|r| matches!(JobKey::parse(&r.key), Some(JobKey::Test { project, .. }) if project == "shouter"))
        .unwrap()
        .clone();
    f.pipeline.record_job(&shouter).await.unwrap();
    assert!(f.open_confirmations().is_empty());
    f.restart().await;
    // The inbox hands everything over again: one confirmation.
    f.take_in().await;
    assert_eq!(f.open_confirmations().len(), 2, "again and on the baseline");
    f.pipeline.take_in(&shouter).await.unwrap();
    assert_eq!(f.open_confirmations().len(), 2, "submitted once per key");
    let reruns = f.assigned();
    assert_eq!(reruns.len(), 2, "{reruns:?}");
    assert!(reruns.iter().all(|(_, rec, _)| rec.agent_id == "a"));
}

#[tokio::test]
async fn a_confirmation_that_errors_is_tried_once_more_then_the_verdict_stays_unconfirmed() {
    let mut f = Farm::new().await;
    let v = f.join("volunteer", false).await;
    green_trunk(&mut f).await;
    f.volunteer_says_shouter_is_red(&v).await;
    f.only("a").await;
    let first = f.run_jobs(|_| (Outcome::Error, Vec::new())).await;
    assert_eq!(first.len(), 2, "again and on the baseline: {first:?}");
    assert!(
        first
            .iter()
            .all(|k| matches!(k, JobKey::Rerun { n: 1, .. }))
    );
    f.take_in().await;
    assert_eq!(f.cell("shouter").confirmation, "awaiting");
    let second = f.run_jobs(|_| (Outcome::Error, Vec::new())).await;
    assert_eq!(second.len(), 2, "{second:?}");
    assert!(
        second
            .iter()
            .all(|k| matches!(k, JobKey::Rerun { n: 2, .. })),
        "{second:?}"
    );
    f.take_in().await;
    assert!(f.open_confirmations().is_empty(), "no third try");
    let cell = f.cell("shouter");
    assert_eq!(cell.confirmation, "unconfirmed");
    assert!(f.went_red("shouter").is_empty());
    let counted = f.verdicts(&v);
    assert_eq!(
        (counted.agreed, counted.disagreed),
        (0, 0),
        "an error blames nobody"
    );
}

#[tokio::test]
async fn a_newer_result_decides_while_an_older_one_awaits_and_nothing_is_blamed_twice() {
    let mut f = Farm::new().await;
    let v = f.join("volunteer", false).await;
    let c1 = green_trunk(&mut f).await;
    // c2's red comes from the volunteer: held.
    let c2 = f.volunteer_says_shouter_is_red(&v).await;
    // c3 lands; its build and the confirmation both go to `a`; only the
    // build finishes now.
    let (c3, reruns) = f.land_while_a_confirmation_waits().await;
    // c3's red from the trusted agent counts once its re-runs say it
    // regressed: its range holds c2 too.
    f.run_jobs(shouter_red).await;
    f.take_in().await;
    f.run_jobs(regressed).await;
    f.take_in().await;
    let red = f.went_red("shouter");
    assert_eq!(red.len(), 1);
    assert_eq!(red[0].last_green_upstream_commit, c1);
    let culprits: Vec<&str> = red[0].culprits.iter().map(|c| c.sha.as_str()).collect();
    assert_eq!(culprits, [c2.as_str(), c3.as_str()]);
    // The older held red is confirmed late: it decides nothing more.
    f.finish_reruns(reruns, regressed).await;
    assert_eq!(f.went_red("shouter").len(), 1, "one went-red, one mail");
    assert_eq!(f.pending_mails(), 1);
    assert_eq!(f.verdicts(&v).agreed, 1);
}

#[tokio::test]
async fn a_newer_green_that_counts_alone_does_not_swallow_an_older_red_awaiting_confirmation() {
    let mut f = Farm::new().await;
    let v = f.join("volunteer", false).await;
    let c1 = green_trunk(&mut f).await;
    // c2's red comes from the volunteer: held.
    let c2 = f.volunteer_says_shouter_is_red(&v).await;
    // c3 lands; its build and the confirmation both go to `a`; only the
    // build finishes now.
    let (_, reruns) = f.land_while_a_confirmation_waits().await;
    // c3's results from the trusted agent: all green, shouter included
    // (still green, counted alone). It must not move the series past c2.
    f.run_jobs(all_green).await;
    f.take_in().await;
    assert!(f.went_red("shouter").is_empty());
    // c2's red is confirmed: it counts, blaming c2 alone.
    f.finish_reruns(reruns, regressed).await;
    let red = f.went_red("shouter");
    assert_eq!(red.len(), 1, "the confirmed red was swallowed");
    assert_eq!(red[0].last_green_upstream_commit, c1);
    let culprits: Vec<&str> = red[0].culprits.iter().map(|c| c.sha.as_str()).collect();
    assert_eq!(culprits, [c2.as_str()]);
    assert_eq!(f.pending_mails(), 1);
}

#[tokio::test]
async fn a_volunteer_overruled_again_and_again_is_quarantined() {
    let mut f = Farm::new().await;
    let v = f.join("liar", false).await;
    green_trunk(&mut f).await;
    for round in 1..=3 {
        f.volunteer_says_shouter_is_red(&v).await;
        f.only("a").await;
        f.run_jobs(all_green).await;
        f.take_in().await;
        let counted = f.verdicts(&v);
        assert_eq!(counted.disagreed, round);
        assert_eq!(counted.quarantined(), round == 3, "round {round}");
    }
    assert!(f.went_red("shouter").is_empty());
    assert_eq!(f.pending_mails(), 0);
    assert!(f.verdicts(&v).quarantined.contains("3 of its last 3"));
    // It stays connected but gets nothing, even with nobody else to take it.
    f.dispatch.set_quarantined("a", true).await.unwrap();
    let job = f
        .dispatch
        .submit(
            trunkfarm_proto::v1::JobSpec {
                commands: vec!["true".into()],
                labels: vec!["linux".into()],
                ..Default::default()
            },
            0,
        )
        .await
        .unwrap();
    let queued = f.dispatch.get(job).unwrap().unwrap();
    assert_eq!(
        queued.state,
        crate::dispatch::JobState::Queued,
        "a quarantined agent gets no job"
    );
    // The operator releases it: it gets work again.
    crate::dispatch::release_agent(&f.credentials, &f.dispatch, &v)
        .await
        .unwrap();
    let given = f.dispatch.get(job).unwrap().unwrap();
    assert_eq!(given.state, crate::dispatch::JobState::Leased);
    assert_eq!(given.agent_id, v);
    assert!(!f.verdicts(&v).quarantined());
    assert_eq!(f.verdicts(&v).disagreed, 3, "the totals stay");
}

// ---- build_on = "any": a volunteer's build counts once an independent
// build gave the same artifact ----

/// `CONFIG` with the runtime built on any agent.
fn built_anywhere() -> String {
    CONFIG.replace(
        "build = [\"make install\"]",
        "build = [\"make install\"]\nbuild_on = \"any\"",
    )
}

impl Farm {
    /// Lands a runtime commit and has volunteer `v` build it on every
    /// platform, packing `runtime(platform)`; returns the commit.
    async fn volunteer_builds(&mut self, v: &str, runtime: impl Fn(&str) -> String) -> String {
        self.git.commit(ADDER);
        self.pipeline.poll_project(0).await;
        self.only(v).await;
        let c = self.git.commit(RT);
        self.pipeline.poll_upstream(0).await;
        let builds = self.assigned();
        assert_eq!(builds.len(), 2, "a volunteer may build: {builds:?}");
        for (job, rec, key) in builds {
            assert!(!rec.spec.trusted_only);
            let JobKey::Build { platform, .. } = &key else {
                panic!("a build: {key:?}");
            };
            let bytes = runtime(platform);
            self.finish_built(job, &key, Outcome::Passed, Vec::new(), Some(&bytes))
                .await;
        }
        self.take_in().await;
        c
    }

    /// Has the trusted `a` run the confirmation builds, packing
    /// `runtime(platform)`.
    async fn trusted_confirms_builds(&mut self, runtime: impl Fn(&str) -> String) {
        self.only("a").await;
        let reruns = self.assigned();
        assert_eq!(reruns.len(), 2, "{reruns:?}");
        for (job, rec, key) in reruns {
            assert_eq!(rec.agent_id, "a");
            let JobKey::Build { platform, .. } = key.base() else {
                panic!("a build's confirmation: {key:?}");
            };
            let bytes = runtime(platform);
            self.finish_built(job, &key, Outcome::Passed, Vec::new(), Some(&bytes))
                .await;
        }
        self.take_in().await;
    }
}

fn reproducible(platform: &str) -> String {
    format!("the runtime, reproducibly built for {platform}")
}

#[tokio::test]
async fn a_volunteers_build_counts_once_another_build_has_the_same_hash() {
    let mut f = Farm::with_config(&built_anywhere()).await;
    let v = f.join("builder", false).await;
    f.volunteer_builds(&v, reproducible).await;
    // Stored, but not the good build, and nothing tested against it.
    assert!(f.results.good_build("rt", "linux").unwrap().is_none());
    let held = f.results.latest_build("rt", "linux").unwrap().unwrap();
    assert_eq!(held.confirmation, "awaiting");
    f.trusted_confirms_builds(reproducible).await;
    let good = f.results.good_build("rt", "linux").unwrap().unwrap();
    assert_eq!(good.job_id, held.job_id, "the volunteer's own build counts");
    assert_eq!(good.confirmation, "confirmed");
    let tests: Vec<(JobRef, JobRecord, JobKey)> = f.assigned();
    let keys: Vec<JobKey> = tests.iter().map(|(_, _, k)| k.clone()).collect();
    assert_eq!(
        test_keys(&keys).len(),
        3,
        "fanned out once confirmed: {keys:?}"
    );
    assert!(
        tests
            .iter()
            .filter(|(_, r, _)| r.spec.labels.contains(&"linux".to_string()))
            .all(|(_, r, _)| r.spec.artifact_sha256 == good.artifact_sha256)
    );
    assert_eq!(f.verdicts(&v).agreed, 2, "one per platform");
}

#[tokio::test]
async fn a_volunteers_build_with_another_hash_does_not_count_and_the_trusted_one_does() {
    let mut f = Farm::with_config(&built_anywhere()).await;
    let v = f.join("trojan", false).await;
    f.volunteer_builds(&v, |p| format!("a trojan for {p}"))
        .await;
    let held = f.results.latest_build("rt", "linux").unwrap().unwrap();
    f.trusted_confirms_builds(reproducible).await;
    let overruled = f
        .results
        .build("rt", "linux", &held.commit)
        .unwrap()
        .unwrap();
    assert_ne!(
        overruled.job_id, held.job_id,
        "the trusted build took its place"
    );
    let good = f.results.good_build("rt", "linux").unwrap().unwrap();
    assert_eq!(good.job_id, overruled.job_id);
    assert_ne!(good.artifact_sha256, held.artifact_sha256);
    let tests = f.assigned();
    assert!(!tests.is_empty());
    assert!(
        tests
            .iter()
            .all(|(_, r, _)| r.spec.artifact_sha256 != held.artifact_sha256),
        "nothing runs the volunteer's artifact"
    );
    let counted = f.verdicts(&v);
    assert_eq!((counted.agreed, counted.disagreed), (0, 2));
    let c = f.results.confirmation(held.job_id).unwrap().unwrap();
    assert_eq!(c.state, crate::results::ConfirmState::Overruled);
}

#[tokio::test]
async fn a_volunteers_failed_build_turns_the_runtime_red_only_once_confirmed() {
    let mut f = Farm::with_config(&built_anywhere()).await;
    let v = f.join("builder", false).await;
    f.volunteer_builds(&v, reproducible).await;
    f.trusted_confirms_builds(reproducible).await;
    f.assigned();
    // The next commit "fails" on the volunteer: held, nothing red yet.
    f.only(&v).await;
    f.git.commit(RT);
    f.pipeline.poll_upstream(0).await;
    f.run_jobs(|_| (Outcome::Failed, Vec::new())).await;
    f.take_in().await;
    let red = |f: &Farm| {
        f.results
            .transitions(100, |t| {
                t.project.is_empty() && t.kind == TransitionKind::WentRed as i32
            })
            .unwrap()
    };
    assert!(red(&f).is_empty(), "a volunteer's failed build waits");
    let held = f.results.latest_build("rt", "linux").unwrap().unwrap();
    assert_eq!(held.confirmation, "awaiting");
    // The trusted agent's build fails too: now the runtime is red.
    f.only("a").await;
    let reruns = f.run_jobs(|_| (Outcome::Failed, Vec::new())).await;
    assert!(reruns.iter().all(|k| matches!(k, JobKey::Rerun { .. })));
    f.take_in().await;
    let went_red = red(&f);
    assert_eq!(went_red.len(), 2, "linux and mac: {went_red:?}");
    assert!(went_red.iter().all(|t| t.confirmed_by_job != 0));
    assert_eq!(f.verdicts(&v).agreed, 4);
}

// ---- Confirm before it counts: what a red (or a fix) turns out to be
// (issue 13 item 1) ----

/// Shouter's tests time out (the agent killed them), everything else passes.
fn shouter_times_out(k: &JobKey) -> (Outcome, Vec<ReportFile>) {
    match k.base() {
        JobKey::Test { project, .. } if project == "shouter" => (Outcome::TimedOut, Vec::new()),
        _ => (Outcome::Passed, junit("upper", false)),
    }
}

impl Farm {
    /// A new upstream commit, tested by the trusted `a` (the only agent):
    /// `decide` says how each test ends; taken in. Returns the commit.
    pub(crate) async fn trusted_tests_a_new_commit(
        &mut self,
        decide: impl Fn(&JobKey) -> (Outcome, Vec<ReportFile>),
    ) -> String {
        let c = self.land_tested_by("a").await;
        self.run_jobs(decide).await;
        self.take_in().await;
        c
    }

    /// Runs the re-runs queued now as `decide` says and takes them in;
    /// returns their keys.
    async fn rerun(
        &mut self,
        decide: impl Fn(&JobKey) -> (Outcome, Vec<ReportFile>),
    ) -> Vec<JobKey> {
        let keys = self.run_jobs(decide).await;
        assert!(
            keys.iter().all(|k| matches!(k, JobKey::Rerun { .. })),
            "only re-runs were queued: {keys:?}"
        );
        self.take_in().await;
        keys
    }

    /// The newest transition of shouter's series.
    fn last_shouter(&self) -> Transition {
        self.transitions("shouter").into_iter().next().unwrap()
    }

    fn shouter_red_since(&self) -> bool {
        let status = self.pipeline.status("").unwrap();
        let cell = status
            .cells
            .into_iter()
            .find(|c| c.latest.project == "shouter");
        cell.unwrap().red_since.is_some()
    }
}

#[tokio::test]
async fn a_red_that_fails_again_and_passes_on_the_last_good_runtime_regressed() {
    let mut f = Farm::new().await;
    let c1 = green_trunk(&mut f).await;
    let c2 = f.trusted_tests_a_new_commit(shouter_red).await;
    // Held: nothing red, nothing mailed, the run shows it waits.
    assert!(f.went_red("shouter").is_empty());
    assert_eq!(f.pending_mails(), 0);
    assert_eq!(f.cell("shouter").confirmation, "awaiting");
    // A trusted agent's red is judged by trusted agents only.
    let open = f.dispatch.open_keys(crate::job_key::TEST_PREFIX);
    assert_eq!(open.len(), 2, "again and on the baseline: {open:?}");
    for (key, id) in open {
        let rec = f.dispatch.get(id).unwrap().unwrap();
        assert!(rec.spec.trusted_only, "{key}");
        assert!(rec.placement.ahead, "ahead of ordinary fan-out: {key}");
    }
    let reruns = f.rerun(regressed).await;
    assert_eq!(reruns.len(), 2);
    let t = f.last_shouter();
    assert_eq!(
        (kind(&t), t.class),
        (TransitionKind::WentRed, Some(Class::Regressed))
    );
    assert_eq!(t.last_green_upstream_commit, c1);
    assert_eq!(
        t.culprits.iter().map(|c| c.sha.clone()).collect::<Vec<_>>(),
        [c2]
    );
    assert_eq!(f.pending_mails(), 1);
    let cell = f.cell("shouter");
    assert_eq!(cell.confirmation, "confirmed");
    assert!(
        cell.confirmation_detail
            .contains("on the baseline runtime: green")
            && cell.confirmation_detail.contains("(regressed)"),
        "{}",
        cell.confirmation_detail
    );
}

#[tokio::test]
async fn a_red_that_passes_on_its_rerun_is_flaky_not_red_and_a_redelivery_changes_nothing() {
    let mut f = Farm::new().await;
    green_trunk(&mut f).await;
    f.trusted_tests_a_new_commit(shouter_red).await;
    // The identical re-run passes (so does the baseline).
    let mut again = None;
    for (job, rec, key) in f.assigned() {
        if !is_baseline(&key) {
            again = Some(rec.id);
        }
        f.finish(job, &key, Outcome::Passed, junit("upper", false))
            .await;
    }
    f.take_in().await;
    assert!(f.went_red("shouter").is_empty());
    assert_eq!(f.pending_mails(), 0, "no mail for a flaky test");
    let t = f.last_shouter();
    assert_eq!(
        (kind(&t), t.class),
        (TransitionKind::StillGreen, Some(Class::Flaky))
    );
    assert_eq!(t.status, trunkfarm_proto::v1::RunStatus::Red as i32);
    assert_eq!(t.newly_failing.len(), 1, "the failing test is kept: {t:?}");
    assert!(t.culprits.is_empty());
    assert!(!f.shouter_red_since());
    assert_eq!(f.cell("shouter").confirmation, "overruled");
    // The re-run handed over again (a crash before its ack): nothing twice.
    let count = f.transitions("shouter").len();
    let rec = f.dispatch.get(again.unwrap()).unwrap().unwrap();
    f.pipeline.take_in(&rec).await.unwrap();
    assert_eq!(f.transitions("shouter").len(), count);
    assert!(f.open_confirmations().is_empty());
    // The series went on green: a real red later blames only what came after c1.
    let c3 = f.trusted_tests_a_new_commit(shouter_red).await;
    f.rerun(regressed).await;
    let red = f.went_red("shouter");
    assert_eq!(red.len(), 1);
    assert_eq!(red[0].culprits.last().unwrap().sha, c3);
}

#[tokio::test]
async fn a_volunteer_is_not_held_to_a_flaky_red_of_a_series_that_flips_on_trusted_agents() {
    let mut f = Farm::new().await;
    let v = f.join("honest", false).await;
    green_trunk(&mut f).await;
    // Trusted agents see the test flip: red, then green on the re-run.
    f.trusted_tests_a_new_commit(shouter_red).await;
    f.rerun(all_green).await;
    assert_eq!(f.last_shouter().class, Some(Class::Flaky));
    // The volunteer hits the same flaky test: flaky, and not counted.
    f.volunteer_says_shouter_is_red(&v).await;
    f.only("a").await;
    f.rerun(all_green).await;
    assert_eq!(f.last_shouter().class, Some(Class::Flaky));
    let counted = f.verdicts(&v);
    assert_eq!((counted.agreed, counted.disagreed), (0, 0));
    assert_eq!(f.pending_mails(), 0);
}

#[tokio::test]
async fn a_run_killed_at_its_timeout_twice_is_spurious_and_mails_nobody() {
    let mut f = Farm::new().await;
    green_trunk(&mut f).await;
    f.trusted_tests_a_new_commit(shouter_times_out).await;
    assert!(f.went_red("shouter").is_empty());
    f.rerun(shouter_times_out).await;
    let t = f.last_shouter();
    assert_eq!(
        (kind(&t), t.class),
        (TransitionKind::StillGreen, Some(Class::Spurious))
    );
    assert_eq!(f.pending_mails(), 0);
    assert!(!f.shouter_red_since());
    assert!(
        f.cell("shouter")
            .confirmation_detail
            .contains("for the machine's sake"),
        "{}",
        f.cell("shouter").confirmation_detail
    );
}

#[tokio::test]
async fn a_project_that_broke_itself_while_the_upstream_moved_is_project_side_blaming_no_upstream_commit()
 {
    let mut f = Farm::new().await;
    let c1 = green_trunk(&mut f).await;
    // Shouter's own new commit: polled, its run against c1 is lost to
    // the farm (decides nothing).
    f.git.commit(SHOUTER);
    f.only("a").await;
    f.pipeline.poll_project(1).await;
    f.run_jobs(|_| (Outcome::Error, Vec::new())).await;
    f.take_in().await;
    // The upstream moves too; shouter fails on c2 and on c1's runtime.
    f.trusted_tests_a_new_commit(shouter_red).await;
    let reruns = f.rerun(shouter_red).await;
    assert!(reruns.iter().any(is_baseline));
    let t = f.last_shouter();
    assert_eq!(
        (kind(&t), t.class),
        (TransitionKind::WentRed, Some(Class::ProjectSide))
    );
    assert!(t.project_commit_changed);
    assert!(
        t.culprits.is_empty(),
        "no upstream commit blamed: {:?}",
        t.culprits
    );
    assert_eq!(t.last_green_upstream_commit, c1);
    assert!(f.shouter_red_since());
    // `breakage` at the upstream commit tested blames it for nothing.
    let b = f.pipeline.breakage("rt", &t.upstream_commit).await.unwrap();
    assert!(b.went_red.is_empty(), "{:?}", b.went_red);
    assert_eq!(b.cleared.len(), 1);
}

#[tokio::test]
async fn a_project_that_fails_on_the_last_good_runtime_too_unchanged_is_broken() {
    let mut f = Farm::new().await;
    green_trunk(&mut f).await;
    f.trusted_tests_a_new_commit(shouter_red).await;
    f.rerun(shouter_red).await;
    let t = f.last_shouter();
    assert_eq!(
        (kind(&t), t.class),
        (TransitionKind::WentRed, Some(Class::Broken))
    );
    assert!(!t.project_commit_changed);
    assert!(t.culprits.is_empty());
}

#[tokio::test]
async fn a_baseline_whose_runtime_is_gone_is_said_and_the_red_classed_without_it() {
    let mut f = Farm::new().await;
    green_trunk(&mut f).await;
    f.only("a").await;
    f.git.commit(RT);
    f.pipeline.poll_upstream(0).await;
    f.run_jobs(passed).await;
    f.take_in().await;
    // c1's runtime is deleted before shouter's red comes in.
    let deleted = f.artifacts.gc(1, &HashSet::new()).await.unwrap();
    assert!(!deleted.is_empty());
    f.run_jobs(shouter_red).await;
    f.take_in().await;
    let reruns = f.rerun(shouter_red).await;
    assert!(!reruns.iter().any(is_baseline), "{reruns:?}");
    let t = f.last_shouter();
    assert_eq!(
        (kind(&t), t.class),
        (TransitionKind::WentRed, Some(Class::Regressed))
    );
    let detail = f.cell("shouter").confirmation_detail;
    assert!(
        detail.contains("artifact was deleted") && detail.contains("without a baseline run"),
        "{detail}"
    );
}

#[tokio::test]
async fn a_fix_counts_once_its_rerun_passes_and_a_flaky_pass_does_not_close_a_red() {
    let mut f = Farm::new().await;
    green_trunk(&mut f).await;
    f.trusted_tests_a_new_commit(shouter_red).await;
    f.rerun(regressed).await;
    assert_eq!(f.pending_mails(), 1);
    // A pass whose re-run fails: flaky, the series stays red.
    f.trusted_tests_a_new_commit(all_green).await;
    let reruns = f.rerun(shouter_red).await;
    assert_eq!(reruns.len(), 1, "no baseline for a fix: {reruns:?}");
    let t = f.last_shouter();
    assert_eq!(
        (kind(&t), t.class),
        (TransitionKind::StillRed, Some(Class::Flaky))
    );
    assert!(f.shouter_red_since());
    assert_eq!(f.pending_mails(), 1, "no fixed mail");
    // A pass that passes again: fixed.
    f.trusted_tests_a_new_commit(all_green).await;
    assert!(f.shouter_red_since(), "held until its re-run passes");
    f.rerun(all_green).await;
    let t = f.last_shouter();
    assert_eq!(kind(&t), TransitionKind::Fixed);
    assert_ne!(t.confirmed_by_job, 0);
    assert!(!f.shouter_red_since());
    assert_eq!(f.pending_mails(), 2, "the fixed mail");
}

#[tokio::test]
async fn confirm_runs_asks_for_that_many_identical_reruns_and_any_pass_is_flaky() {
    let config = CONFIG.replace(
        "url = \"fake:shouter\"",
        "url = \"fake:shouter\"\nconfirm_runs = 3",
    );
    let mut f = Farm::with_config(&config).await;
    green_trunk(&mut f).await;
    f.trusted_tests_a_new_commit(shouter_red).await;
    let jobs = f.assigned();
    let again: Vec<_> = jobs.iter().filter(|(_, _, k)| !is_baseline(k)).collect();
    assert_eq!(again.len(), 3, "{jobs:?}");
    // Two fail again, one passes.
    for (i, (job, _, key)) in jobs.iter().enumerate() {
        let (outcome, reports) = match (is_baseline(key), i) {
            (false, 0) => all_green(key),
            _ => regressed(key),
        };
        f.finish(*job, key, outcome, reports).await;
    }
    f.take_in().await;
    assert_eq!(f.last_shouter().class, Some(Class::Flaky));
    assert!(f.went_red("shouter").is_empty());
}

// ---- Know the noise; green is not always green (issue 13 items 2 and 7) ----

/// A JUnit report of `cases` (name, status: "pass", "fail" or "skip").
fn junit_cases(cases: &[(&str, &str)]) -> Vec<ReportFile> {
    let mut xml = String::from(r#"<testsuite name="s">"#);
    for (name, status) in cases {
        let body = match *status {
            "fail" => r#"<failure message="expected ABC"/>"#,
            "skip" => "<skipped/>",
            _ => "",
        };
        xml.push_str(&format!(
            r#"<testcase classname="s" name="{name}">{body}</testcase>"#
        ));
    }
    xml.push_str("</testsuite>");
    vec![ReportFile {
        path: "junit.xml".into(),
        data: xml.into_bytes(),
        ..Default::default()
    }]
}

/// Twenty tests, all with `status`.
fn twenty(status: &str) -> Vec<ReportFile> {
    let names: Vec<String> = (1..=20).map(|i| format!("t{i:02}")).collect();
    let cases: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), status)).collect();
    junit_cases(&cases)
}

impl Farm {
    /// Lands an upstream commit, builds it and runs every project's tests:
    /// shouter's as `shouter` says, the rest pass. Returns the commit.
    async fn land_with_shouter(&mut self, shouter: (Outcome, Vec<ReportFile>)) -> String {
        let c = self.git.commit(RT);
        self.pipeline.poll_upstream(0).await;
        self.run_jobs(passed).await;
        self.take_in().await;
        self.run_jobs(|k| match k {
            JobKey::Test { project, .. } if project == "shouter" => shouter.clone(),
            _ => (Outcome::Passed, Vec::new()),
        })
        .await;
        self.take_in().await;
        c
    }

    fn queued_mails(&self) -> Vec<crate::notify::MailInfo> {
        self.notifier.mails(100, MailState::Pending).unwrap()
    }
}

fn calibrate(runs: u32) -> calibrate::CalibrateRequest {
    calibrate::CalibrateRequest {
        project: "shouter".into(),
        runs,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_test_that_flipped_on_calibration_runs_no_longer_turns_its_project_red_alone() {
    let mut f = Farm::new().await;
    green_trunk(&mut f).await;
    let before = f.transitions("shouter").len();
    // Calibrate shouter's green run 4 times: "upper" fails in runs 1 and 3.
    let c = f.pipeline.calibrate(&calibrate(4)).await.unwrap();
    assert_eq!((c.jobs.len(), c.done.len()), (4, 0));
    let jobs = f.assigned();
    assert_eq!(jobs.len(), 4);
    for (job, _, key) in jobs {
        let JobKey::Rerun {
            kind: RerunKind::Calibrate,
            n,
            ..
        } = key
        else {
            panic!("only calibration runs: {key}");
        };
        let red = n % 2 == 1;
        let outcome = if red {
            Outcome::Failed
        } else {
            Outcome::Passed
        };
        let report = junit_cases(&[
            ("upper", if red { "fail" } else { "pass" }),
            ("lower", "pass"),
        ]);
        f.finish(job, &key, outcome, report).await;
    }
    f.take_in().await;
    // Asked again (the CLI polls): nothing queued twice, all four in.
    let c = f.pipeline.calibration_summary(&calibrate(4)).await.unwrap();
    assert!(f.assigned().is_empty(), "each calibration run exists once");
    assert_eq!((c.finished, c.red, c.errors), (4, 2, 0));
    assert_eq!(c.tests.len(), 1, "only tests that failed: {:?}", c.tests);
    let upper = &c.tests[0];
    assert_eq!(
        (upper.name.as_str(), upper.failed, upper.ran),
        ("s.upper", 2, 4)
    );
    assert!(upper.flaky && upper.known_flaky);
    let noise = f.results.noise("shouter").unwrap();
    assert_eq!((noise.runs, noise.flips), (4, 2));
    assert_eq!(
        f.transitions("shouter").len(),
        before,
        "calibration classifies nothing"
    );
    let listed = f.pipeline.flaky("shouter").unwrap();
    assert_eq!(listed[0].tests.len(), 1);
    assert_eq!((listed[0].tests[0].flips, listed[0].tests[0].runs), (2, 4));
    // Now "upper" alone fails after an upstream commit: flaky, not red.
    f.land_with_shouter((
        Outcome::Failed,
        junit_cases(&[("upper", "fail"), ("lower", "pass")]),
    ))
    .await;
    let t = &f.transitions("shouter")[0];
    assert_eq!(kind(t), TransitionKind::StillGreen);
    assert_eq!(t.class, Some(crate::results::Class::Flaky));
    assert!(t.culprits.is_empty(), "nobody is blamed");
    let status = f.pipeline.status("rt").unwrap();
    let cell = status
        .cells
        .iter()
        .find(|c| c.latest.project == "shouter")
        .unwrap();
    assert!(cell.red_since.is_none(), "the series stays green");
    assert_eq!(cell.flaky_tests, 1);
    assert!(f.pending_mails() == 0, "no flake mail");
    // A known flaky test failing with another one still turns it red, once
    // its re-runs class it: it fails again, and passes on the last good runtime.
    let both_fail = || junit_cases(&[("upper", "fail"), ("lower", "fail")]);
    f.land_with_shouter((Outcome::Failed, both_fail())).await;
    f.rerun(|k| match k {
        JobKey::Rerun {
            kind: RerunKind::Baseline,
            ..
        } => (
            Outcome::Passed,
            junit_cases(&[("upper", "pass"), ("lower", "pass")]),
        ),
        _ => (Outcome::Failed, both_fail()),
    })
    .await;
    let t = &f.transitions("shouter")[0];
    assert_eq!(t.class, Some(crate::results::Class::Regressed));
    assert_eq!(kind(t), TransitionKind::WentRed);
    assert_eq!(f.pending_mails(), 1);
}

#[tokio::test]
async fn a_volunteers_green_that_skips_every_test_is_neither_suspicious_nor_learnt() {
    let mut f = Farm::new().await;
    f.git.commit(ADDER);
    f.git.commit(SHOUTER);
    f.pipeline.poll_project(0).await;
    f.pipeline.poll_project(1).await;
    for _ in 0..3 {
        f.land_with_shouter((Outcome::Passed, twenty("pass"))).await;
    }
    let v = f.join("volunteer", false).await;
    // The volunteer reports every test skipped: not believed, not mailed,
    // and not what the next runs are compared with.
    f.land_tested_by(&v).await;
    f.run_jobs(|_| (Outcome::Passed, twenty("skip"))).await;
    f.take_in().await;
    let suspicious = |f: &Farm| {
        f.transitions("shouter")
            .iter()
            .filter(|t| t.class == Some(Class::Suspicious))
            .count()
    };
    assert_eq!(suspicious(&f), 0);
    assert_eq!(f.pending_mails(), 0);
    // A trusted agent's run of the same is.
    f.only("a").await;
    f.land_with_shouter((Outcome::Passed, twenty("skip"))).await;
    assert_eq!(suspicious(&f), 1);
}

#[tokio::test]
async fn a_green_run_that_skips_every_test_is_suspicious_and_mailed_once_per_spell() {
    let mut f = Farm::new().await;
    f.git.commit(ADDER);
    f.git.commit(SHOUTER);
    f.pipeline.poll_project(0).await;
    f.pipeline.poll_project(1).await;
    f.land_with_shouter((Outcome::Passed, twenty("pass"))).await;
    let usual = f.land_with_shouter((Outcome::Passed, twenty("pass"))).await;
    assert!(f.pending_mails() == 0);
    // Every test skipped, still green.
    let culprit = f.land_with_shouter((Outcome::Passed, twenty("skip"))).await;
    let t = f.transitions("shouter")[0].clone();
    assert_eq!(kind(&t), TransitionKind::StillGreen);
    assert_eq!(t.class, Some(crate::results::Class::Suspicious));
    assert_eq!(t.suspicious, "20 passed → 0 passed, 20 skipped");
    assert_eq!(t.last_green_upstream_commit, usual);
    let culprits: Vec<&str> = t.culprits.iter().map(|c| c.sha.as_str()).collect();
    assert_eq!(culprits, [culprit.as_str()]);
    let run = f
        .results
        .latest_run("shouter", "rt", "linux")
        .unwrap()
        .unwrap();
    assert_eq!(run.info.suspicious, t.suspicious, "the run is marked");
    let mails = f.queued_mails();
    assert_eq!(mails.len(), 1, "{mails:?}");
    assert_eq!(mails[0].to, "shouter-dev@example.org");
    assert!(
        mails[0].subject.contains("suspicious"),
        "{}",
        mails[0].subject
    );
    assert!(
        mails[0]
            .subject
            .contains("20 passed → 0 passed, 20 skipped"),
        "{}",
        mails[0].subject
    );
    assert!(mails[0].subject.contains(crate::commit::short(&culprit)));
    // Still skipping: marked, but no second transition of its class, no mail.
    f.land_with_shouter((Outcome::Passed, twenty("skip"))).await;
    let suspicious = |f: &Farm| {
        f.transitions("shouter")
            .iter()
            .filter(|t| t.class == Some(crate::results::Class::Suspicious))
            .count()
    };
    assert_eq!(suspicious(&f), 1);
    let run = f
        .results
        .latest_run("shouter", "rt", "linux")
        .unwrap()
        .unwrap();
    assert!(!run.info.suspicious.is_empty());
    assert_eq!(f.pending_mails(), 1, "one mail per spell");
    // Back to normal, then skipping again: a new spell, a new mail.
    f.land_with_shouter((Outcome::Passed, twenty("pass"))).await;
    f.land_with_shouter((Outcome::Passed, twenty("skip"))).await;
    assert_eq!(suspicious(&f), 2);
    assert_eq!(f.pending_mails(), 2);
    // A spell of five suspicious runs: the sixth's counts are the usual ones.
    let marked = |f: &Farm| {
        let run = f.results.latest_run("shouter", "rt", "linux").unwrap();
        !run.unwrap().info.suspicious.is_empty()
    };
    for _ in 2..=5 {
        f.land_with_shouter((Outcome::Passed, twenty("skip"))).await;
        assert!(marked(&f));
    }
    for _ in 6..=7 {
        f.land_with_shouter((Outcome::Passed, twenty("skip"))).await;
        assert!(!marked(&f), "accepted after a spell of five");
    }
    assert_eq!((suspicious(&f), f.pending_mails()), (2, 2));
}

#[tokio::test]
async fn a_test_that_trusted_confirmation_runs_saw_flip_twice_is_known_flaky_and_its_next_failure_is_not_held()
 {
    let config = CONFIG.replace(
        "url = \"fake:shouter\"",
        "url = \"fake:shouter\"\nconfirm = \"always\"",
    );
    let mut f = Farm::with_config(&config).await;
    let v = f.join("volunteer", false).await;
    let t = f.join("trusted", true).await;
    green_trunk(&mut f).await;
    // A volunteer's red overruled by a trusted re-run: a lie or a flake,
    // nobody knows, so it measures nothing.
    f.volunteer_says_shouter_is_red(&v).await;
    f.only("a").await;
    f.run_jobs(all_green).await;
    f.take_in().await;
    assert_eq!(f.results.noise("shouter").unwrap().runs, 0);
    for flips in 1..=2 {
        // The trusted a's red, overruled by the trusted t's green re-run.
        f.land_tested_by("a").await;
        f.run_jobs(shouter_red).await;
        f.take_in().await;
        // Held: its identical re-run and its baseline run are queued.
        assert_eq!(f.open_confirmations().len(), 2, "held");
        f.only(&t).await;
        f.run_jobs(all_green).await;
        f.take_in().await;
        let noise = f.results.noise("shouter").unwrap();
        assert_eq!((noise.runs, noise.flips), (flips, flips));
        assert_eq!(noise.tests["s.upper"].flips, flips);
    }
    // Known flaky now: its next failure alone is recorded as flaky at once.
    f.land_tested_by("a").await;
    f.run_jobs(shouter_red).await;
    f.take_in().await;
    assert!(f.open_confirmations().is_empty(), "nothing held");
    let last = &f.transitions("shouter")[0];
    assert_eq!(last.class, Some(crate::results::Class::Flaky));
    assert_eq!(kind(last), TransitionKind::StillGreen);
    assert!(f.went_red("shouter").is_empty());
    assert_eq!(f.pending_mails(), 0);
    assert_eq!(f.pipeline.flaky("shouter").unwrap()[0].tests[0].flips, 2);
}

// ---- Bisection: the first bad commit (issue 13 item 3) ----

/// [`CONFIG`] with the upstream on linux only, and
/// `pipeline.bisect_max_builds = max`.
pub(crate) fn bisect_config(max: u32) -> String {
    CONFIG
        .replace(
            r#"platforms = ["linux", "mac"]"#,
            r#"platforms = ["linux"]"#,
        )
        .replacen(
            "[[upstream]]",
            &format!("[pipeline]\nbisect_max_builds = {max}\n\n[[upstream]]"),
            1,
        )
}

/// A push of many upstream commits at once and what each is.
struct Push {
    /// The commits, oldest first.
    commits: Vec<String>,
    /// Index of each commit.
    index: HashMap<String, usize>,
    /// The first bad commit's index, per project that it breaks.
    breaks: HashMap<&'static str, usize>,
    /// Commits that do not build.
    broken: HashSet<usize>,
}

impl Push {
    /// What a job of this push does: builds pass but for the broken
    /// commits; a project fails from its first bad commit on.
    fn decide(&self, k: &JobKey) -> (Outcome, Vec<ReportFile>) {
        let at = |c: &str| self.index.get(c).copied();
        if is_baseline(k) {
            // On the last good runtime (before the push): it passes.
            return all_green(k);
        }
        match k.base() {
            JobKey::Build { commit, .. } => match at(commit) {
                Some(i) if self.broken.contains(&i) => (Outcome::Failed, Vec::new()),
                _ => (Outcome::Passed, Vec::new()),
            },
            JobKey::Test {
                project,
                upstream_commit,
                ..
            } => {
                let bad = self.breaks.get(project.as_str()).copied();
                match (at(upstream_commit), bad) {
                    (Some(i), Some(bad)) if i >= bad => (Outcome::Failed, junit("upper", true)),
                    _ => (Outcome::Passed, junit("upper", false)),
                }
            }
            JobKey::Rerun { .. } | JobKey::Bisect { .. } => unreachable!("base() is plain"),
        }
    }
}

impl Farm {
    /// A green trunk, then `n` upstream commits pushed at once: polling
    /// sees the last as the head; it is built and tested (the projects in
    /// `breaks` fail from their first bad commit on), each red re-run and
    /// classed, and taken in.
    async fn push_at_once(
        &mut self,
        n: usize,
        breaks: &[(&'static str, usize)],
        broken: &[usize],
    ) -> Push {
        green_trunk(self).await;
        let commits: Vec<String> = (0..n).map(|_| self.git.commit(RT)).collect();
        let push = Push {
            index: commits.iter().cloned().zip(0..).collect(),
            commits,
            breaks: breaks.iter().copied().collect(),
            broken: broken.iter().copied().collect(),
        };
        self.pipeline.poll_upstream(0).await;
        self.run_jobs(|k| push.decide(k)).await;
        self.take_in().await;
        self.run_jobs(|k| push.decide(k)).await;
        self.take_in().await;
        // A red is classed before it counts: again, and on the baseline.
        self.run_jobs(|k| push.decide(k)).await;
        self.take_in().await;
        push
    }

    /// Runs every job as `push` says until nothing is left; returns the
    /// keys of the bisection's builds and runs, in order (each checked to
    /// be the bisection's, queued ahead of ordinary work).
    async fn bisect(&mut self, push: &Push) -> Vec<JobKey> {
        let mut seen = Vec::new();
        loop {
            let jobs = self.assigned();
            if jobs.is_empty() {
                return seen;
            }
            for (job, rec, key) in jobs {
                assert!(
                    matches!(key, JobKey::Bisect { .. }) && rec.placement.ahead,
                    "only the bisection works, ahead of other work: {key} {:?}",
                    rec.placement
                );
                // What a commit is, and what a project said of it, rests on
                // trusted agents only: one run decides a commit.
                assert!(rec.spec.trusted_only, "{key}");
                let (outcome, reports) = push.decide(&key);
                self.finish(job, &key, outcome, reports).await;
                seen.push(key);
            }
            self.take_in().await;
        }
    }
}

/// The builds among a bisection's jobs.
fn bisect_builds(keys: &[JobKey]) -> Vec<&JobKey> {
    keys.iter()
        .filter(|k| matches!(k.base(), JobKey::Build { .. }))
        .collect()
}

fn bisect_of(t: &Transition) -> &crate::results::Bisect {
    t.bisect.as_ref().expect("the transition is bisected")
}

#[tokio::test]
async fn a_64_commit_push_broken_at_37_is_bisected_to_it_in_at_most_6_builds() {
    let mut f = Farm::with_config(&bisect_config(12)).await;
    let push = f.push_at_once(64, &[("shouter", 36)], &[]).await;
    let red = f.went_red("shouter");
    assert_eq!(red.len(), 1);
    assert_eq!(red[0].culprits.len(), 64);
    assert_eq!(bisect_of(&red[0]).state, BisectState::Running);
    let head_run = f.cell("shouter");
    let keys = f.bisect(&push).await;
    let builds = bisect_builds(&keys);
    assert!(builds.len() <= 6, "{} builds: {builds:?}", builds.len());
    let t = &f.went_red("shouter")[0];
    let b = bisect_of(t);
    assert_eq!(b.state, BisectState::Found, "{b:?}");
    let first_bad = b.first_bad.as_ref().unwrap();
    assert_eq!(first_bad.sha, push.commits[36]);
    assert!(!first_bad.subject.is_empty() && !first_bad.author.is_empty());
    assert_eq!(b.builds as usize, builds.len());
    // Only shouter ran, against each build once, on the went-red's project commit.
    let runs: Vec<_> = keys
        .iter()
        .filter_map(|k| match k.base() {
            JobKey::Test {
                project,
                project_commit,
                ..
            } => Some((project.clone(), project_commit.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(runs.len(), builds.len());
    assert!(
        runs.iter()
            .all(|(p, pc)| p == "shouter" && *pc == t.project_commit)
    );
    // A bisection's runs are not the series': the grid still shows the head's.
    assert_eq!(f.cell("shouter").job_id, head_run.job_id);
    assert_eq!(f.went_red("shouter").len(), 1, "nothing else classified");
    // A bisection build fans nothing out and moves no build pointer.
    let good = f.results.good_build("rt", "linux").unwrap().unwrap();
    assert_eq!(good.commit, push.commits[63]);
    // breakage: the first bad commit is blamed, an innocent one of the range never.
    let at = f
        .pipeline
        .breakage("rt", &push.commits[36][..10])
        .await
        .unwrap();
    assert_eq!((at.went_red.len(), at.cleared.len()), (1, 0));
    for innocent in [10, 35, 37, 63] {
        let at = f
            .pipeline
            .breakage("rt", &push.commits[innocent])
            .await
            .unwrap();
        assert!(at.went_red.is_empty(), "commit {innocent} is innocent");
        assert_eq!(at.cleared.len(), 1);
    }
    // Nothing is left to do: a tick queues nothing.
    f.pipeline.follow_bisections().await;
    assert!(f.assigned().is_empty());
    assert!(f.results.running_bisections().unwrap().is_empty());
}

#[tokio::test]
async fn commits_that_do_not_build_are_skipped_and_the_answer_stays_exact_or_an_honest_range() {
    let mut f = Farm::with_config(&bisect_config(12)).await;
    // The first two commits bisection would try do not build.
    let push = f.push_at_once(64, &[("shouter", 36)], &[31, 32]).await;
    let keys = f.bisect(&push).await;
    let t = &f.went_red("shouter")[0];
    let b = bisect_of(t);
    assert_eq!(b.state, BisectState::Found, "{b:?}");
    assert_eq!(b.first_bad.as_ref().unwrap().sha, push.commits[36]);
    assert!(bisect_builds(&keys).len() <= 6 + 2, "{keys:?}");
    assert!(b.detail.contains("skipped"), "{}", b.detail);

    // A commit that does not build right before the first bad one hides it.
    let mut f = Farm::with_config(&bisect_config(12)).await;
    let push = f.push_at_once(8, &[("shouter", 5)], &[4]).await;
    f.bisect(&push).await;
    let t = &f.went_red("shouter")[0];
    let b = bisect_of(t);
    assert_eq!(b.state, BisectState::Range, "{b:?}");
    let candidates: Vec<&str> = b.candidates.iter().map(|c| c.sha.as_str()).collect();
    assert_eq!(
        candidates,
        [push.commits[4].as_str(), push.commits[5].as_str()]
    );
    assert!(b.first_bad.is_none());
    // Both candidates are blamed, the others are not.
    let at = f.pipeline.breakage("rt", &push.commits[4]).await.unwrap();
    assert_eq!(at.went_red.len(), 1);
    let at = f.pipeline.breakage("rt", &push.commits[2]).await.unwrap();
    assert!(at.went_red.is_empty());
}

#[tokio::test]
async fn two_projects_that_went_red_in_one_range_share_the_builds() {
    let mut f = Farm::with_config(&bisect_config(12)).await;
    // Adder breaks at 20, shouter at 36: one bisection, builds shared.
    let push = f
        .push_at_once(64, &[("adder", 20), ("shouter", 36)], &[])
        .await;
    assert_eq!(f.results.running_bisections().unwrap().len(), 1);
    let keys = f.bisect(&push).await;
    let builds = bisect_builds(&keys);
    let distinct: HashSet<String> = builds.iter().map(|k| k.to_string()).collect();
    assert_eq!(distinct.len(), builds.len(), "each build once");
    // Both searches start at the same commit: the first build serves both,
    // and every build counts against the one budget.
    assert!(builds.len() <= 12, "{}", builds.len());
    let adder = bisect_of(&f.went_red("adder")[0]).clone();
    let shouter = bisect_of(&f.went_red("shouter")[0]).clone();
    assert_eq!(adder.first_bad.unwrap().sha, push.commits[20]);
    assert_eq!(shouter.first_bad.unwrap().sha, push.commits[36]);
    let first = builds[0].to_string();
    let runs_on_first = keys
        .iter()
        .filter(|k| match k.base() {
            JobKey::Test {
                upstream_commit, ..
            } => first.contains(upstream_commit.as_str()),
            _ => false,
        })
        .count();
    assert_eq!(
        runs_on_first, 2,
        "both projects ran against the first build"
    );
}

#[tokio::test]
async fn a_bisection_stops_at_its_build_budget_with_the_range_narrowed() {
    let mut f = Farm::with_config(&bisect_config(2)).await;
    let push = f.push_at_once(64, &[("shouter", 36)], &[]).await;
    let keys = f.bisect(&push).await;
    assert_eq!(bisect_builds(&keys).len(), 2);
    let b = bisect_of(&f.went_red("shouter")[0]).clone();
    assert_eq!(b.state, BisectState::GaveUp, "{b:?}");
    assert_eq!(b.builds, 2);
    // 31 good, 47 bad: 32..=47 left.
    let candidates: Vec<&str> = b.candidates.iter().map(|c| c.sha.as_str()).collect();
    let want: Vec<&str> = push.commits[32..=47].iter().map(String::as_str).collect();
    assert_eq!(candidates, want);
    assert!(b.detail.contains("bisect_max_builds"), "{}", b.detail);

    // 0 turns bisection off.
    let mut f = Farm::with_config(&bisect_config(0)).await;
    f.push_at_once(8, &[("shouter", 3)], &[]).await;
    assert!(f.went_red("shouter")[0].bisect.is_none());
    assert!(f.assigned().is_empty());
}

#[tokio::test]
async fn a_bisection_whose_jobs_never_come_gives_up_after_48_hours() {
    let mut f = Farm::with_config(&bisect_config(12)).await;
    f.push_at_once(8, &[("shouter", 3)], &[]).await;
    // Its first build is queued, but nobody runs it (no trusted agent
    // free, say) — and two days pass.
    let running = f.results.running_bisections().unwrap();
    assert_eq!(running.len(), 1);
    let key = running[0].key();
    let long_ago = crate::store::now_ms() - 49 * 3600 * 1000;
    f.results
        .update_bisection(&key, |b| {
            b.started_at_ms = long_ago;
            true
        })
        .await
        .unwrap();
    f.pipeline.follow_bisections().await;
    let b = bisect_of(&f.went_red("shouter")[0]).clone();
    assert_eq!(b.state, BisectState::GaveUp, "{b:?}");
    assert!(
        b.detail.starts_with("no answer within 2days"),
        "{}",
        b.detail
    );
    assert_eq!(b.candidates.len(), 8, "nothing narrowed yet");
    assert!(f.results.running_bisections().unwrap().is_empty());
}

#[tokio::test]
async fn a_stored_build_inside_the_range_is_reused_and_not_counted() {
    for outcome in [Outcome::Passed, Outcome::Failed] {
        let mut f = Farm::with_config(&bisect_config(12)).await;
        green_trunk(&mut f).await;
        let commits: Vec<String> = (0..4).map(|_| f.git.commit(RT)).collect();
        // Someone built the second commit by hand before the head was polled.
        f.pipeline.build("rt", &commits[1], false).await.unwrap();
        f.run_jobs(|_| (outcome, Vec::new())).await;
        f.take_in().await;
        let push = Push {
            index: commits.iter().cloned().zip(0..).collect(),
            commits,
            breaks: [("shouter", 2)].into_iter().collect(),
            broken: HashSet::new(),
        };
        f.pipeline.poll_upstream(0).await;
        // Built, tested, the red re-run and classed (again, baseline).
        for _ in 0..3 {
            f.run_jobs(|k| push.decide(k)).await;
            f.take_in().await;
        }
        let keys = f.bisect(&push).await;
        let b = bisect_of(&f.went_red("shouter")[0]).clone();
        // Commit 1 (the middle) is never built again.
        let built: Vec<&JobKey> = bisect_builds(&keys);
        assert!(
            built
                .iter()
                .all(|k| !k.to_string().contains(&push.commits[1])),
            "{keys:?}"
        );
        assert_eq!(b.builds as usize, built.len());
        if outcome == Outcome::Passed {
            // Tried with the stored build (good), then commit 2 built (bad).
            assert_eq!(b.first_bad.unwrap().sha, push.commits[2]);
            assert_eq!(b.builds, 1);
        } else {
            // The stored failure is a skip: 2 is bad, 0 good, 1 cannot tell.
            assert_eq!(b.state, BisectState::Range, "{b:?}");
            let candidates: Vec<&str> = b.candidates.iter().map(|c| c.sha.as_str()).collect();
            assert_eq!(candidates, [&push.commits[1], &push.commits[2]]);
            assert_eq!(b.builds, 2);
        }
    }
}

#[tokio::test]
async fn a_bisection_redelivered_and_restarted_at_every_step_repeats_nothing() {
    let mut f = Farm::with_config(&bisect_config(12)).await;
    let push = f
        .push_at_once(64, &[("adder", 36), ("shouter", 36)], &[40])
        .await;
    let mut seen: Vec<JobKey> = Vec::new();
    loop {
        let keys = f.run_jobs(|k| push.decide(k)).await;
        if keys.is_empty() {
            break;
        }
        seen.extend(keys);
        // The hub dies with every job finished, none taken in; after the
        // restart it takes each in and dies again before the ack (handed
        // over again), and its tick runs in between.
        f.restart().await;
        f.pipeline.follow_bisections().await;
        let inbox = f.dispatch.finished_inbox(100).unwrap();
        for rec in &inbox {
            f.pipeline.take_in(rec).await.unwrap();
        }
        f.pipeline.follow_bisections().await;
        f.take_in().await;
        f.pipeline.follow_bisections().await;
    }
    let distinct: HashSet<String> = seen.iter().map(|k| k.to_string()).collect();
    assert_eq!(distinct.len(), seen.len(), "each job once: {seen:?}");
    let builds = bisect_builds(&seen).len();
    for project in ["adder", "shouter"] {
        let b = bisect_of(&f.went_red(project)[0]).clone();
        assert_eq!(b.state, BisectState::Found, "{b:?}");
        assert_eq!(b.first_bad.unwrap().sha, push.commits[36]);
        assert_eq!(b.builds as usize, builds, "one count of the builds made");
    }
    assert!(builds <= 7, "{builds}");
}

/// For the dashboard's tests (`web/`): the farm's owners as the pages read
/// them.
impl Farm {
    pub(crate) fn site(&self) -> crate::web::site::Site {
        crate::web::site::Site {
            pipeline: self.pipeline.clone(),
            dispatch: self.dispatch.clone(),
            credentials: self.credentials.clone(),
            notifier: self.notifier.clone(),
            logs: self.logs.clone(),
        }
    }
}

/// For the dashboard's tests: shouter green on a first runtime, then red on
/// the next one and classed regressed by its re-runs (a went-red mailed to
/// its maintainer), run by two enrolled trusted agents, `alice-box` and
/// `bob-box` (the unnamed `a` is held back).
pub(crate) async fn regressed_farm() -> Farm {
    let mut f = Farm::new().await;
    f.join("alice-box", true).await;
    f.join("bob-box", true).await;
    f.dispatch.set_quarantined("a", true).await.unwrap();
    green_then_regressed(&mut f).await;
    assert_eq!(f.went_red("shouter").len(), 1);
    f
}

/// Shouter green on a first runtime, then red on the next one and classed
/// regressed by its re-runs.
async fn green_then_regressed(f: &mut Farm) {
    green_trunk(f).await;
    f.git.commit(RT);
    f.pipeline.poll_upstream(0).await;
    f.run_jobs(passed).await;
    f.take_in().await;
    f.run_jobs(shouter_red).await;
    f.take_in().await;
    f.run_jobs(regressed).await;
    f.take_in().await;
}

// ---- Errors in the open (issue 14 item 5) ----

/// A project whose poll fails says why in `status` (and its JSON), not only
/// in the hub's log; a project without `branch` follows the repository's
/// default branch, and `status` names the branch found.
#[tokio::test]
async fn a_projects_poll_error_is_shown_in_status() {
    let config = CONFIG.replace(
        "name = \"shouter\"\n",
        "name = \"shouter\"\nbranch = \"trunk\"\n",
    );
    let f = Farm::with_config(&config).await;
    let adder = f.git.commit(ADDER);
    f.git.commit(SHOUTER);
    let before = f.pipeline.status("").unwrap();
    assert_eq!(before.projects[0].branch, "", "not polled yet");
    f.pipeline.poll_project(0).await;
    f.pipeline.poll_project(1).await;

    let status = f.pipeline.status("rt").unwrap();
    let names: Vec<&str> = status.projects.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["adder", "shouter"]);
    let (a, s) = (&status.projects[0], &status.projects[1]);
    assert_eq!(a.branch, "main", "the default branch polling found");
    assert_eq!(a.head, adder);
    assert!(a.poll_error.is_empty(), "{}", a.poll_error);
    assert_eq!(s.branch, "trunk", "the configured branch");
    assert!(s.head.is_empty());
    assert!(
        s.poll_error.contains("branch \"trunk\" does not exist"),
        "{}",
        s.poll_error
    );

    // adder's server goes away: its last head stays, the error is shown,
    // over the wire too.
    f.git.broken.lock().unwrap().insert(ADDER.into());
    f.pipeline.poll_project(0).await;
    let wire = trunkfarm_proto::v1::GetStatusResponse::from(f.pipeline.status("").unwrap());
    let a = &wire.projects[0];
    assert_eq!(a.head, adder);
    assert!(a.poll_error.contains("could not read"), "{}", a.poll_error);
    f.git.broken.lock().unwrap().clear();
    f.pipeline.poll_project(0).await;
    assert!(
        f.pipeline.status("").unwrap().projects[0]
            .poll_error
            .is_empty()
    );
}

/// An upstream without `branch` follows its repository's default branch;
/// the branch found is stored with its head, and the went-red mail names
/// it (it used to name the config's, "default branch"), also after the
/// hub restarted (nothing polled yet).
#[tokio::test]
async fn a_went_red_mail_names_the_default_branch_polling_found() {
    let mut f = Farm::new().await;
    *f.git.default_branch.lock().unwrap() = "trunk".into();
    green_then_regressed(&mut f).await;
    let t = &f.transitions("shouter")[0];
    assert_eq!(kind(t), TransitionKind::WentRed);
    assert_eq!(t.branch, "trunk");
    let mails = f.queued_mails();
    let red = mails
        .iter()
        .find(|m| m.subject.contains("went red"))
        .unwrap_or_else(|| panic!("{mails:?}"));
    assert!(red.subject.contains("with rt trunk "), "{}", red.subject);

    // A restarted hub knows the branch from the stored head before it
    // polls (breakage and status need no git for it).
    f.restart().await;
    *f.git.broken.lock().unwrap() = [RT.to_owned()].into();
    assert_eq!(f.pipeline.status("").unwrap().upstreams[0].branch, "trunk");
    f.pipeline.breakage("rt", "").await.unwrap();
}

/// The default branch is followed by name once found (a HEAD pointing
/// elsewhere for a while changes nothing); when it is renamed (the old name
/// gone), the default is looked up again.
#[tokio::test]
async fn a_renamed_default_branch_is_found_again() {
    let f = Farm::new().await;
    *f.git.default_branch.lock().unwrap() = "trunk".into();
    f.git.commit(RT);
    f.poll_upstream(0).await;
    assert_eq!(f.pipeline.status("").unwrap().upstreams[0].branch, "trunk");
    // HEAD points at a work branch for a while: trunk is still followed.
    f.git.other_branches.lock().unwrap().insert("trunk".into());
    *f.git.default_branch.lock().unwrap() = "push".into();
    f.poll_upstream(0).await;
    assert_eq!(f.pipeline.status("").unwrap().upstreams[0].branch, "trunk");
    // trunk renamed to main: the default is looked up again.
    f.git.other_branches.lock().unwrap().clear();
    *f.git.default_branch.lock().unwrap() = "main".into();
    f.poll_upstream(0).await;
    let row = &f.pipeline.status("").unwrap().upstreams[0];
    assert_eq!(row.branch, "main");
    assert_eq!(row.poll_error, "", "{row:?}");
}

// ---- Retention and indexes (issue 16 item 4) ----

/// A database from before the transitions' indexes (no `tb/`, `tp/`, `tu/`
/// or `tib` keys) gets them built once when results opens it:
/// breakage, a project's and an upstream's listing answer as before.
#[tokio::test]
async fn a_database_without_transition_indexes_gets_them_built_at_open() {
    let f = regressed_farm().await;
    let went_red = f.went_red("shouter").remove(0);
    let listed = f.transitions("shouter");
    let of_upstream = f.results.transitions_of("rt", "", 100, true).unwrap();
    let everything = f.results.transitions(100, |t| t.upstream == "rt").unwrap();
    assert_eq!(of_upstream, everything);
    assert!(of_upstream.len() > listed.len());
    let tree = f.store.table(crate::store::trees::RESULTS);
    let index: Vec<_> = ["tb/", "tp/", "tu/", "tib"]
        .iter()
        .flat_map(|p| tree.keys(p).map(|k| k.unwrap()))
        .collect();
    assert!(index.len() > listed.len(), "{} index keys", index.len());
    for k in &index {
        tree.remove(k).unwrap();
    }
    let commit = |sha: &str| Commit {
        sha: sha.to_owned(),
        ..Default::default()
    };
    let unindexed = f
        .results
        .breakage("rt", vec![commit(&went_red.upstream_commit)])
        .unwrap();
    assert!(unindexed.went_red.is_empty(), "the index is gone");

    let reopened = Results::open(&f.store).unwrap();
    let b = reopened
        .breakage("rt", vec![commit(&went_red.upstream_commit)])
        .unwrap();
    assert_eq!(b.went_red, vec![went_red]);
    assert_eq!(
        reopened.transitions_of("rt", "shouter", 100, true).unwrap(),
        listed
    );
    assert_eq!(
        reopened.transitions_of("rt", "", 100, true).unwrap(),
        everything
    );
    let rebuilt = ["tb/", "tp/", "tu/", "tib"]
        .iter()
        .map(|p| tree.scan_raw(p).count())
        .sum::<usize>();
    assert_eq!(rebuilt, index.len());
}

/// A database of a hub before `tb/` (its commit index `tc/` held every
/// transition, a steady series' still greens too, under the marker `tiu`)
/// gets `tb/` built at open and `tc/` removed: breakage answers as before,
/// through an index of only the transitions that may blame a commit.
#[tokio::test]
async fn an_older_commit_index_of_every_transition_gives_way_to_one_of_those_that_may_blame() {
    let f = regressed_farm().await;
    let went_red = f.went_red("shouter").remove(0);
    let all = f.results.transitions(1000, |_| true).unwrap();
    let tree = f.store.table(crate::store::trees::RESULTS);
    let blamable = |tree: &crate::store::Table| tree.scan_raw("tb/").count();
    let may_blame = blamable(&tree);
    assert!(
        may_blame > 0 && may_blame < all.len(),
        "{may_blame} index entries for {} transitions",
        all.len()
    );
    // The older layout.
    for k in tree.keys("tb/") {
        tree.remove(k.unwrap()).unwrap();
    }
    tree.remove("tib").unwrap();
    tree.put_raw("tiu", &[] as &[u8]).unwrap();
    for t in &all {
        let k = format!(
            "tc/{}/{}/{}",
            t.upstream,
            t.upstream_commit,
            crate::store::id_key(t.id)
        );
        tree.put_raw(k, &[] as &[u8]).unwrap();
    }

    let reopened = Results::open(&f.store).unwrap();
    let commit = Commit {
        sha: went_red.upstream_commit.clone(),
        ..Default::default()
    };
    let b = reopened.breakage("rt", vec![commit]).unwrap();
    assert_eq!(b.went_red, vec![went_red.clone()]);
    assert_eq!(blamable(&tree), may_blame);
    assert_eq!(tree.scan_raw("tc/").count(), 0, "the older index went");
    assert!(tree.contains("tib").unwrap());
    assert!(!tree.contains("tiu").unwrap());

    // An older hub ran on it again: what it recorded has only `tc/`, and
    // its marker sits beside ours. The next open indexes it.
    for k in tree.keys("tb/") {
        tree.remove(k.unwrap()).unwrap();
    }
    tree.put_raw("tiu", &[] as &[u8]).unwrap();
    let again = Results::open(&f.store).unwrap();
    let commit = Commit {
        sha: went_red.upstream_commit.clone(),
        ..Default::default()
    };
    assert_eq!(
        again.breakage("rt", vec![commit]).unwrap().went_red,
        vec![went_red]
    );
    assert_eq!(blamable(&tree), may_blame);
    assert!(!tree.contains("tiu").unwrap());
}

/// A run whose compacted log is gone from the object store (deleted, or
/// expired by a lifecycle rule) is judged without it, saying so, and never
/// holds up the other finished jobs.
#[tokio::test]
async fn a_run_whose_compacted_log_is_gone_is_judged_without_it_and_the_others_go_on() {
    let config = CONFIG.replace(
        "name = \"adder\"\nurl = \"fake:adder\"\n",
        "name = \"adder\"\nurl = \"fake:adder\"\nfail_pattern = '^\\[fail\\]'\n",
    );
    let mut f = Farm::with_config(&config).await;
    f.git.commit(ADDER);
    f.git.commit(RT);
    f.pipeline.poll_upstream(0).await;
    f.run_jobs(passed).await;
    f.take_in().await;
    let mut tests: Vec<_> = f
        .assigned()
        .into_iter()
        .filter(|(_, _, key)| matches!(key, JobKey::Test { project, .. } if project == "adder"))
        .collect();
    tests.sort_by_key(|(job, ..)| job.job_id);
    assert_eq!(tests.len(), 2, "adder runs on linux and mac");
    for (job, _, key) in &tests {
        f.logs
            .append(LogChunk {
                job: Some(*job),
                seq: 1,
                stream: LogStream::Stdout as i32,
                data: b"[ok] a\n[fail] b: expected 2\n".to_vec(),
            })
            .unwrap();
        f.finish(*job, key, Outcome::Passed, Vec::new()).await;
        f.logs.compact(job.job_id, job.attempt).await.unwrap();
    }
    // The older job's object is gone.
    let gone = &tests[0].0;
    let path = f
        .store
        .dir()
        .join("test-objects")
        .join(crate::logs::object_name(gone.job_id, gone.attempt));
    std::fs::remove_file(&path).unwrap();
    f.take_in().await;
    assert!(
        f.dispatch.finished_inbox(10).unwrap().is_empty(),
        "every job was taken in"
    );
    let platform = |key: &JobKey| match key {
        JobKey::Test { platform, .. } => platform.clone(),
        _ => unreachable!(),
    };
    let unread = f
        .results
        .run("adder", "rt", &platform(&tests[0].2), gone.job_id)
        .unwrap()
        .expect("the run without its log is recorded");
    assert_eq!(
        unread.info.status,
        trunkfarm_proto::v1::RunStatus::Green as i32
    );
    assert!(
        unread.info.detail.contains(intake::UNREADABLE_LOG),
        "{}",
        unread.info.detail
    );
    let read = f
        .results
        .run("adder", "rt", &platform(&tests[1].2), tests[1].0.job_id)
        .unwrap()
        .expect("the other run is recorded");
    assert_eq!(read.info.status, trunkfarm_proto::v1::RunStatus::Red as i32);
    assert!(
        read.info.detail.contains("fail_pattern"),
        "{}",
        read.info.detail
    );
}

/// While the object store cannot hand a run's log over (an outage), only
/// that job waits in the inbox: the other finished jobs are taken in.
#[tokio::test]
async fn a_log_the_store_cannot_give_now_holds_up_only_its_own_job() {
    let config = CONFIG.replace(
        "name = \"adder\"\nurl = \"fake:adder\"\n",
        "name = \"adder\"\nurl = \"fake:adder\"\nfail_pattern = '^\\[fail\\]'\n",
    );
    let mut f = Farm::with_config(&config).await;
    f.git.commit(ADDER);
    f.git.commit(RT);
    f.pipeline.poll_upstream(0).await;
    f.run_jobs(passed).await;
    f.take_in().await;
    let mut tests: Vec<_> = f
        .assigned()
        .into_iter()
        .filter(|(_, _, key)| matches!(key, JobKey::Test { project, .. } if project == "adder"))
        .collect();
    tests.sort_by_key(|(job, ..)| job.job_id);
    assert_eq!(tests.len(), 2);
    for (i, (job, _, key)) in tests.iter().enumerate() {
        f.logs
            .append(LogChunk {
                job: Some(*job),
                seq: 1,
                stream: LogStream::Stdout as i32,
                data: b"[ok] a\n".to_vec(),
            })
            .unwrap();
        f.finish(*job, key, Outcome::Passed, Vec::new()).await;
        // The older job's log is compacted, the newer one's is not yet.
        if i == 0 {
            f.logs.compact(job.job_id, job.attempt).await.unwrap();
        }
    }
    // The store breaks: its directory becomes a file.
    let dir = f.store.dir().join("test-objects");
    let away = dir.with_extension("away");
    std::fs::rename(&dir, &away).unwrap();
    std::fs::write(&dir, b"not a directory").unwrap();
    f.take_in().await;
    let waiting: Vec<u64> = f
        .dispatch
        .finished_inbox(10)
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(
        waiting,
        [tests[0].0.job_id],
        "only the unreadable one waits"
    );
    let platform = |key: &JobKey| match key {
        JobKey::Test { platform, .. } => platform.clone(),
        _ => unreachable!(),
    };
    assert!(
        f.results
            .run("adder", "rt", &platform(&tests[1].2), tests[1].0.job_id)
            .unwrap()
            .is_some(),
        "the other run is recorded"
    );
    assert!(
        f.results
            .run("adder", "rt", &platform(&tests[0].2), tests[0].0.job_id)
            .unwrap()
            .is_none(),
        "not judged without a log that may come back"
    );
}
