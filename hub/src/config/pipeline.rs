//! The trunk pipeline's part of `hub.toml`: the upstream runtimes to build
//! (`[[upstream]]`), the downstream projects to test against them
//! (`[[project]]`), how long artifacts are kept (`[artifacts]`) and how the
//! hub talks to git (`[pipeline]`).
//!
//! Entries of an array of tables are named `upstream[0]`, `project[2]` in
//! error messages (and by their `name` in the message text), so an operator
//! with forty projects finds the broken one.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use serde::Deserialize;
use trunkfarm_proto::settings::{Problem, fmt_bytes, fmt_duration};

use super::{MIB, de};
use crate::output::Pattern;
use crate::results::Class;

/// The platform a build or test runs on when an entry names none: the
/// platform label agents derive from `os-arch`.
pub(super) const DEFAULT_PLATFORM: &str = "linux-x86_64";

/// `[[upstream]]`: a language runtime whose trunk the hub builds.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an [[upstream]] table")]
pub(crate) struct UpstreamConfig {
    /// Short name used in commands, keys and mails (`[A-Za-z0-9._-]`).
    pub(crate) name: String,
    /// Where `git ls-remote` and agents fetch it (https, ssh, file or a path).
    pub(crate) url: String,
    /// The branch to follow; unset: the repository's default branch (its
    /// `HEAD`, asked at every poll), since `git init` makes `master` on many
    /// machines and `main` on others.
    #[serde(default)]
    pub(crate) branch: Option<String>,
    /// How often the branch head is polled.
    #[serde(default = "default_upstream_poll", deserialize_with = "de::duration")]
    pub(crate) poll_interval: Duration,
    /// Platforms to build for; each is a label build agents must carry
    /// (agents label themselves `os-arch`, e.g. `linux-x86_64`).
    #[serde(default = "default_platforms")]
    pub(crate) platforms: Vec<String>,
    /// Shell commands, run in the checkout, that build the runtime and install
    /// it into `$PREFIX`. The hub packs `$PREFIX` when they all pass.
    pub(crate) build: Vec<String>,
    /// How long one build may take.
    #[serde(default = "default_build_timeout", deserialize_with = "de::duration")]
    pub(crate) build_timeout: Duration,
    /// Extra environment for the build commands.
    #[serde(default)]
    pub(crate) env: BTreeMap<String, String>,
    /// Extra labels a build agent must carry (e.g. `big-memory`).
    #[serde(default)]
    pub(crate) labels: Vec<String>,
    /// Who hears about a failing build of the runtime itself.
    #[serde(default)]
    pub(crate) contacts: Vec<String>,
    /// Which agents may build it: only trusted ones (the default), or any,
    /// a volunteer's build then counting only once another agent's build of
    /// the same commit gave the same artifact hash.
    #[serde(default)]
    pub(crate) build_on: BuildOn,
    /// The author of a commit a bisection finds to be the first bad one
    /// gets one mail per commit, listing the projects it broke.
    #[serde(default)]
    pub(crate) notify_authors: bool,
}

/// `[[upstream]] build_on`: who may build a runtime.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum BuildOn {
    /// Only trusted agents: a runtime runs inside every test job on every
    /// donor's machine.
    #[default]
    Trusted,
    /// Any agent; a volunteer's build counts once an independent agent's
    /// build of the same commit has the same artifact hash.
    Any,
}

/// `[[project]] confirm`: how a result that would change a series (went
/// red, fixed) is confirmed before it counts. Under `volunteer` and
/// `always` every such result is held and re-run (`confirm_runs` times
/// the same, plus once on the series' last good runtime for a went red)
/// and classed (`results::confirm`); they differ in where the identical
/// re-runs may go.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Confirm {
    /// The default: never on a volunteer's own agent (nor one enrolled
    /// with its token); a trusted agent's result is re-run elsewhere when
    /// another agent fits, on itself otherwise.
    #[default]
    Volunteer,
    /// Never on the original's agent, trusted or not.
    Always,
    /// Nothing is re-run: every result counts alone, unclassed (fastest).
    Never,
}

impl Confirm {
    /// Whether a verdict that would change a series is held and re-run.
    pub(crate) fn holds(self) -> bool {
        self != Confirm::Never
    }

    /// Whether the re-runs of a verdict by an agent (trusted or not) may
    /// go to that agent when no other fits.
    pub(crate) fn may_rerun_on_original(self, trusted: bool) -> bool {
        self == Confirm::Volunteer && trusted
    }
}

/// The most identical re-runs `confirm_runs` may ask for.
pub(crate) const MAX_CONFIRM_RUNS: u32 = 10;

/// `[[project]]`: a downstream project whose tests run against the runtime.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [[project]] table")]
pub(crate) struct ProjectConfig {
    /// Short name used in commands, keys and mails (`[A-Za-z0-9._-]`).
    pub(crate) name: String,
    /// Where agents clone it.
    pub(crate) url: String,
    /// The branch to follow; unset: the repository's default branch (its
    /// `HEAD`, asked at every poll), since `git init` makes `master` on many
    /// machines and `main` on others.
    #[serde(default)]
    pub(crate) branch: Option<String>,
    /// How often the branch head is polled (a new commit re-runs the project
    /// against the latest good runtime).
    #[serde(default = "default_project_poll", deserialize_with = "de::duration")]
    pub(crate) poll_interval: Duration,
    /// The upstreams it is tested against; empty means every upstream.
    #[serde(default)]
    pub(crate) upstreams: Vec<String>,
    /// Platforms to test on; empty means each upstream's platforms.
    #[serde(default)]
    pub(crate) platforms: Vec<String>,
    /// Shell commands, run in the checkout with the runtime's `bin/` first on
    /// `PATH` and `TRUNKFARM_RUNTIME_PREFIX` set.
    pub(crate) test: Vec<String>,
    /// How long one test run may take.
    #[serde(default = "default_test_timeout", deserialize_with = "de::duration")]
    pub(crate) timeout: Duration,
    /// JUnit XML files the test commands write, relative to the checkout.
    #[serde(default)]
    pub(crate) junit: Vec<String>,
    /// Who hears when it goes red or is fixed.
    #[serde(default)]
    pub(crate) maintainers: Vec<String>,
    /// Extra labels a test agent must carry.
    #[serde(default)]
    pub(crate) labels: Vec<String>,
    /// Extra environment for the test commands.
    #[serde(default)]
    pub(crate) env: BTreeMap<String, String>,
    /// The tests need the network; sandboxed agents give it only where the
    /// donor allows it (`allow_network`), so leave it off unless needed.
    #[serde(default)]
    pub(crate) network: bool,
    /// How a went-red or fixed verdict is confirmed by re-runs before it
    /// counts.
    #[serde(default)]
    pub(crate) confirm: Confirm,
    /// How many identical re-runs a went red or fixed needs (each must
    /// repeat it: one that does not makes the result flaky).
    #[serde(default = "default_confirm_runs", deserialize_with = "de::count")]
    pub(crate) confirm_runs: u32,
    /// A regular expression over the run's output: where it matches, the
    /// run is red whatever its exit code (suites that exit 0 on failure).
    #[serde(default)]
    pub(crate) fail_pattern: Option<Pattern>,
    /// A regular expression the output of a passing run must match: where
    /// it matches nothing, the run is red.
    #[serde(default)]
    pub(crate) pass_pattern: Option<Pattern>,
    /// Which classes of went-red results are mailed (a result no class was
    /// given to is mailed as always).
    #[serde(default = "default_mail_classes")]
    pub(crate) mail_classes: Vec<Class>,
    /// Flips on identical re-runs (a test failing once and passing once on
    /// the same project commit and runtime) after which a test is known
    /// flaky; 0: never.
    #[serde(default = "default_flaky_after", deserialize_with = "de::count")]
    pub(crate) flaky_after: u32,
    /// Whether known flaky tests failing alone still turn the project red
    /// (by default such a run is recorded as flaky and the series stays).
    #[serde(default)]
    pub(crate) flaky_counts_alone: bool,
}

fn default_flaky_after() -> u32 {
    2
}

/// `[artifacts]`: the runtime artifacts the hub stores.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "an [artifacts] table")]
pub(crate) struct ArtifactsSection {
    /// Newest artifacts kept per (upstream, platform); older ones are deleted
    /// unless a project's last known result still refers to them.
    #[serde(deserialize_with = "de::count")]
    pub(crate) keep: u32,
    /// The largest artifact an agent may upload, in bytes.
    #[serde(deserialize_with = "de::byte_size")]
    pub(crate) max_size: u64,
}

impl Default for ArtifactsSection {
    fn default() -> Self {
        Self {
            keep: 5,
            max_size: 4096 * MIB,
        }
    }
}

/// `[trust]`: when disagreeing with confirmation runs quarantines an agent.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [trust] table")]
pub(crate) struct TrustSection {
    /// Disagreements among an agent's latest `quarantine_window`
    /// confirmations that quarantine it (no more jobs until the operator
    /// releases it); 0 never quarantines.
    #[serde(deserialize_with = "de::count")]
    pub(crate) quarantine_after: u32,
    /// How many of an agent's latest confirmations count, so an honest
    /// donor's occasional flaky test does not add up over months.
    #[serde(deserialize_with = "de::count")]
    pub(crate) quarantine_window: u32,
}

impl Default for TrustSection {
    fn default() -> Self {
        Self {
            quarantine_after: 3,
            quarantine_window: 10,
        }
    }
}

/// `[pipeline]`: how the hub watches repositories.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [pipeline] table")]
pub(crate) struct PipelineSection {
    /// How long one `git ls-remote` or metadata fetch may take.
    #[serde(deserialize_with = "de::duration")]
    pub(crate) git_timeout: Duration,
    /// The most runtime builds one bisection of a culprit range may make
    /// (builds already stored are reused and not counted); past it the
    /// bisection gives up with the range narrowed so far. 0: no bisection.
    #[serde(deserialize_with = "de::count")]
    pub(crate) bisect_max_builds: u32,
}

impl Default for PipelineSection {
    fn default() -> Self {
        Self {
            git_timeout: Duration::from_secs(120),
            bisect_max_builds: 12,
        }
    }
}

fn default_mail_classes() -> Vec<Class> {
    vec![Class::Regressed, Class::ProjectSide, Class::Suspicious]
}
fn default_upstream_poll() -> Duration {
    Duration::from_secs(60)
}
fn default_project_poll() -> Duration {
    Duration::from_secs(300)
}
fn default_platforms() -> Vec<String> {
    vec![DEFAULT_PLATFORM.into()]
}
fn default_build_timeout() -> Duration {
    Duration::from_secs(60 * 60)
}
fn default_confirm_runs() -> u32 {
    1
}

fn default_test_timeout() -> Duration {
    Duration::from_secs(30 * 60)
}

/// The shortest poll interval accepted: polling is `git ls-remote` against
/// someone else's server.
pub(super) const MIN_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Checks the pipeline's rules; `max_job_timeout` is `dispatch.max_job_timeout`.
pub(super) fn problems(
    upstreams: &[UpstreamConfig],
    projects: &[ProjectConfig],
    artifacts: &ArtifactsSection,
    pipeline: &PipelineSection,
    trust: &TrustSection,
    max_job_timeout: Duration,
) -> Result<(), Problem> {
    let mut names = HashSet::new();
    for (i, u) in upstreams.iter().enumerate() {
        let at = |key: &str| format!("upstream[{i}].{key}");
        check_name(&at("name"), "upstream", &u.name)?;
        if !names.insert(u.name.as_str()) {
            return Err(Problem::new(
                at("name"),
                format!(
                    "two upstreams are named {:?}; give each a different name",
                    u.name
                ),
            ));
        }
        check_url(&at("url"), &u.url)?;
        if let Some(branch) = &u.branch {
            check_branch(&at("branch"), branch)?;
        }
        check_poll(&at("poll_interval"), u.poll_interval)?;
        check_platforms(&at("platforms"), &u.platforms, false)?;
        check_commands(
            &at("build"),
            &u.build,
            "the build commands that install the runtime into $PREFIX, e.g. [\"make install PREFIX=$PREFIX\"]",
        )?;
        check_timeout(&at("build_timeout"), u.build_timeout, max_job_timeout)?;
        check_env(&at("env"), &u.env)?;
        check_labels(&at("labels"), &u.labels)?;
        check_emails(&at("contacts"), &u.contacts)?;
    }
    let mut project_names = HashSet::new();
    for (i, p) in projects.iter().enumerate() {
        let at = |key: &str| format!("project[{i}].{key}");
        check_name(&at("name"), "project", &p.name)?;
        if !project_names.insert(p.name.as_str()) {
            return Err(Problem::new(
                at("name"),
                format!(
                    "two projects are named {:?}; give each a different name",
                    p.name
                ),
            ));
        }
        check_url(&at("url"), &p.url)?;
        if let Some(branch) = &p.branch {
            check_branch(&at("branch"), branch)?;
        }
        check_poll(&at("poll_interval"), p.poll_interval)?;
        if upstreams.is_empty() {
            return Err(Problem::new(
                at("name"),
                format!(
                    "project {:?} has no upstream to test against: add an [[upstream]] entry",
                    p.name
                ),
            ));
        }
        for name in &p.upstreams {
            if !names.contains(name.as_str()) {
                let known: Vec<_> = upstreams.iter().map(|u| u.name.as_str()).collect();
                return Err(Problem::new(
                    at("upstreams"),
                    format!(
                        "project {:?} names upstream {name:?}, which is not configured; known upstreams: {}",
                        p.name,
                        known.join(", ")
                    ),
                ));
            }
        }
        check_platforms(&at("platforms"), &p.platforms, true)?;
        check_commands(
            &at("test"),
            &p.test,
            "the commands that run the project's tests, e.g. [\"make test\"]",
        )?;
        check_timeout(&at("timeout"), p.timeout, max_job_timeout)?;
        if !(1..=MAX_CONFIRM_RUNS).contains(&p.confirm_runs) {
            return Err(Problem::new(
                at("confirm_runs"),
                format!(
                    "{} is out of range: it is how many identical re-runs must repeat a went red or fixed before it counts; use 1 to {MAX_CONFIRM_RUNS} (or confirm = \"never\" to count results alone)",
                    p.confirm_runs
                ),
            ));
        }
        for path in &p.junit {
            check_relative(&at("junit"), path)?;
        }
        check_emails(&at("maintainers"), &p.maintainers)?;
        check_labels(&at("labels"), &p.labels)?;
        check_env(&at("env"), &p.env)?;
        check_mail_classes(&at("mail_classes"), &p.mail_classes)?;
    }
    if artifacts.keep < 1 {
        return Err(Problem::new(
            "artifacts.keep",
            "must be at least 1 (the newest good runtime is what new project commits test against)",
        ));
    }
    if artifacts.max_size < MIB {
        return Err(Problem::new(
            "artifacts.max_size",
            format!(
                "{} is too small for a runtime; expected at least 1 MiB, e.g. \"4 GiB\"",
                fmt_bytes(artifacts.max_size)
            ),
        ));
    }
    if trust.quarantine_window < 1 || trust.quarantine_window < trust.quarantine_after {
        return Err(Problem::new(
            "trust.quarantine_window",
            format!(
                "must be at least 1 and at least `trust.quarantine_after` ({}): it is how many of an agent's latest confirmations are counted, e.g. 10",
                trust.quarantine_after
            ),
        ));
    }
    if pipeline.git_timeout < Duration::from_secs(1) {
        return Err(Problem::new(
            "pipeline.git_timeout",
            "must be at least 1s, e.g. \"2m\"",
        ));
    }
    Ok(())
}

/// Names become parts of keys and command arguments: keep them plain.
fn check_name(key: &str, what: &str, name: &str) -> Result<(), Problem> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && !name.starts_with(['.', '-']);
    if ok {
        return Ok(());
    }
    Err(Problem::new(
        key.to_owned(),
        format!(
            "{name:?} is not a valid {what} name; expected 1 to 64 characters from A-Z, a-z, 0-9, '.', '_' and '-', not starting with '.' or '-'"
        ),
    ))
}

fn check_url(key: &str, url: &str) -> Result<(), Problem> {
    if url.trim().is_empty() {
        return Err(Problem::new(
            key.to_owned(),
            "must not be empty; give the repository's URL, e.g. \"https://github.com/python/cpython.git\"",
        ));
    }
    if url.starts_with('-') {
        return Err(Problem::new(
            key.to_owned(),
            format!("{url:?} starts with '-', which git would read as an option"),
        ));
    }
    // Credentials in the URL go to git through its environment; say now if
    // they cannot.
    trunkfarm_proto::gitauth::GitRemote::parse(url)
        .map_err(|e| Problem::new(key.to_owned(), e.to_string()))?;
    Ok(())
}

fn check_branch(key: &str, branch: &str) -> Result<(), Problem> {
    let ok = !branch.is_empty()
        && !branch.starts_with(['-', '/'])
        && !branch.contains("..")
        && !branch
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "~^:?*[\\".contains(c));
    if ok {
        return Ok(());
    }
    Err(Problem::new(
        key.to_owned(),
        format!("{branch:?} is not a valid branch name, e.g. \"main\""),
    ))
}

fn check_poll(key: &str, interval: Duration) -> Result<(), Problem> {
    if interval < MIN_POLL_INTERVAL {
        return Err(Problem::new(
            key.to_owned(),
            format!(
                "{} is too short; expected at least {}, e.g. \"60s\"",
                fmt_duration(interval),
                fmt_duration(MIN_POLL_INTERVAL)
            ),
        ));
    }
    Ok(())
}

fn check_platforms(key: &str, platforms: &[String], may_be_empty: bool) -> Result<(), Problem> {
    if platforms.is_empty() && !may_be_empty {
        return Err(Problem::new(
            key.to_owned(),
            format!("must name at least one platform, e.g. [\"{DEFAULT_PLATFORM}\"]"),
        ));
    }
    let mut seen = HashSet::new();
    for p in platforms {
        check_name(key, "platform", p)?;
        if !seen.insert(p) {
            return Err(Problem::new(
                key.to_owned(),
                format!("names platform {p:?} twice"),
            ));
        }
    }
    Ok(())
}

fn check_commands(key: &str, commands: &[String], example: &str) -> Result<(), Problem> {
    if commands.iter().all(|c| c.trim().is_empty()) {
        return Err(Problem::new(
            key.to_owned(),
            format!("must hold at least one command: {example}"),
        ));
    }
    Ok(())
}

fn check_timeout(key: &str, timeout: Duration, max: Duration) -> Result<(), Problem> {
    if timeout.is_zero() {
        return Err(Problem::new(
            key.to_owned(),
            "must be greater than zero, e.g. \"30m\"",
        ));
    }
    if timeout > max {
        return Err(Problem::new(
            key.to_owned(),
            format!(
                "{} is longer than `dispatch.max_job_timeout` ({}); raise that or shorten this",
                fmt_duration(timeout),
                fmt_duration(max)
            ),
        ));
    }
    Ok(())
}

fn check_env(key: &str, env: &BTreeMap<String, String>) -> Result<(), Problem> {
    for name in env.keys() {
        let ok = !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            return Err(Problem::new(
                key.to_owned(),
                format!("{name:?} is not a valid environment variable name (A-Z, a-z, 0-9, '_')"),
            ));
        }
        if matches!(name.as_str(), "PREFIX" | "TRUNKFARM_RUNTIME_PREFIX") {
            return Err(Problem::new(
                key.to_owned(),
                format!("{name} is set by trunkfarm itself and cannot be overridden"),
            ));
        }
    }
    Ok(())
}

fn check_labels(key: &str, labels: &[String]) -> Result<(), Problem> {
    for label in labels {
        if label.is_empty() || label.chars().any(|c| c.is_whitespace() || c == ',') {
            return Err(Problem::new(
                key.to_owned(),
                format!("{label:?} is not a valid label: no spaces or commas, not empty"),
            ));
        }
    }
    Ok(())
}

/// A light check here; the notifier validates addresses fully.
fn check_emails(key: &str, emails: &[String]) -> Result<(), Problem> {
    for email in emails {
        let ok = email.split_once('@').is_some_and(|(user, domain)| {
            !user.is_empty() && domain.contains('.') && !domain.starts_with('.')
        }) && !email
            .chars()
            .any(|c| c.is_whitespace() || c == ',' || c == '<' || c == '>');
        if !ok {
            return Err(Problem::new(
                key.to_owned(),
                format!("{email:?} is not an email address; expected e.g. \"dev@example.org\""),
            ));
        }
    }
    Ok(())
}

/// Classes a went-red result can have: flaky and spurious results leave
/// their series as it was, so there is nothing to mail.
fn check_mail_classes(key: &str, classes: &[Class]) -> Result<(), Problem> {
    for class in classes {
        if matches!(class, Class::Flaky | Class::Spurious) {
            return Err(Problem::new(
                key.to_owned(),
                format!(
                    "{:?} results never turn a project red, so they are never mailed; choose from \"regressed\", \"project_side\", \"broken\" and \"suspicious\"",
                    class.word()
                ),
            ));
        }
    }
    Ok(())
}

fn check_relative(key: &str, path: &str) -> Result<(), Problem> {
    let p = std::path::Path::new(path);
    let escapes = p.components().any(|c| {
        !matches!(
            c,
            std::path::Component::Normal(_) | std::path::Component::CurDir
        )
    });
    if path.is_empty() || escapes {
        return Err(Problem::new(
            key.to_owned(),
            format!(
                "{path:?} must be a path inside the checkout, without '..' or a leading '/', e.g. \"junit.xml\""
            ),
        ));
    }
    Ok(())
}

impl ProjectConfig {
    /// When one of its tests is known flaky (`flaky_after`,
    /// `flaky_counts_alone`).
    pub(crate) fn flaky_rule(&self) -> crate::results::FlakyRule {
        crate::results::FlakyRule {
            after: self.flaky_after,
            counts_alone: self.flaky_counts_alone,
        }
    }

    /// Whether this project is tested against `upstream`.
    pub(crate) fn tests_against(&self, upstream: &str) -> bool {
        self.upstreams.is_empty() || self.upstreams.iter().any(|u| u == upstream)
    }

    /// The platforms it runs on against `upstream`: its own list (restricted
    /// to the upstream's), or the upstream's.
    pub(crate) fn platforms_for<'a>(&'a self, upstream: &'a UpstreamConfig) -> Vec<&'a str> {
        upstream
            .platforms
            .iter()
            .filter(|p| self.platforms.is_empty() || self.platforms.contains(p))
            .map(String::as_str)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use crate::config::HubConfig;

    /// One upstream and one project with `keys` added to the project.
    fn project_with(keys: &str) -> Result<HubConfig, String> {
        let text = format!(
            "[[upstream]]\nname = \"rt\"\nurl = \"https://example.org/rt.git\"\nbuild = [\"make\"]\n\n[[project]]\nname = \"quiet\"\nurl = \"https://example.org/quiet.git\"\ntest = [\"sh test.sh\"]\n{keys}\n"
        );
        HubConfig::from_toml(&text, None).map_err(|e| e.to_string())
    }

    #[test]
    fn output_patterns_are_checked_when_the_config_is_read() {
        let c = project_with("fail_pattern = '^\\[fail\\]'\npass_pattern = 'OK'").unwrap();
        let p = &c.projects[0];
        assert_eq!(
            p.fail_pattern.as_ref().map(|p| p.as_str()),
            Some("^\\[fail\\]")
        );
        assert_eq!(p.pass_pattern.as_ref().map(|p| p.as_str()), Some("OK"));
        let e = project_with("fail_pattern = '[fail'").unwrap_err();
        assert!(e.contains("project[0].fail_pattern"), "{e}");
        assert!(e.contains("\"[fail\" is not a regular expression"), "{e}");
        assert!(project_with("pass_pattern = 3").is_err());
    }

    #[test]
    fn mail_classes_default_and_refuse_what_never_goes_red() {
        use crate::results::Class;
        let c = project_with("").unwrap();
        assert_eq!(
            c.projects[0].mail_classes,
            [Class::Regressed, Class::ProjectSide, Class::Suspicious]
        );
        assert!(!c.upstreams[0].notify_authors);
        let c = project_with("mail_classes = [\"broken\"]").unwrap();
        assert_eq!(c.projects[0].mail_classes, [Class::Broken]);
        let e = project_with("mail_classes = [\"flaky\"]").unwrap_err();
        assert!(e.contains("project[0].mail_classes"), "{e}");
        assert!(e.contains("never turn a project red"), "{e}");
        let e = project_with("mail_classes = [\"sometimes\"]").unwrap_err();
        assert!(e.contains("regressed"), "{e}");
    }
}
