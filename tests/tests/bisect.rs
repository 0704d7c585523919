//! Bisection end to end: real git repositories, a real hub, real agents and
//! a real SMTP server. An upstream of 64 commits lands in one push with the
//! break at commit 37; the hub bisects the range and names commit 37 as the
//! first bad commit (in the transition, `breakage --json` and its text).

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use trunkfarm_e2e::farm::{
    RUNTIME, Repos, SHOUTER_MAINTAINER, WENT_RED, broken_runtime, smtp_toml,
};
use trunkfarm_e2e::smtp::SmtpSink;
use trunkfarm_e2e::{Agent, Hub, git, s, u, wait_for};

/// How long a whole bisection may take (six builds and runs, on a loaded
/// machine, with the hub restarted meanwhile).
const BISECTION: Duration = Duration::from_secs(240);

/// The commits of the push, and the index of the first bad one.
const PUSH: usize = 64;
const FIRST_BAD: usize = 36; // commit 37

/// A hub for `repos` (shouter only) mailing to `sink`, with two trusted agents.
fn farm(repos: &Repos, sink: &SmtpSink) -> (Hub, Vec<Agent>) {
    let hub = Hub::start_with(&repos.config(&smtp_toml(sink)), &[]);
    let mut agents = Vec::new();
    for i in 0..2 {
        let mut a = Agent::enroll(&hub, &format!("b{i}"), &["--trusted"]);
        a.start(&["--max-parallel-jobs", "2"]);
        agents.push(a);
    }
    hub.wait_agents_connected(2);
    (hub, agents)
}

/// Lands `PUSH` commits on `rt` in one push (made on a side branch, then
/// fast-forwarded, so polling never sees one in between): `upper` broken
/// from commit `FIRST_BAD` on, and the commits in `unbuildable` without the
/// file the build copies. Returns them, oldest first.
fn push(repos: &Repos, unbuildable: &[usize]) -> Vec<String> {
    let dir = repos.path("rt");
    git(&dir, &["checkout", "--quiet", "-b", "push"]);
    let mut commits = Vec::new();
    for i in 0..PUSH {
        let text = if i >= FIRST_BAD {
            broken_runtime()
        } else {
            RUNTIME.to_string()
        };
        let (message, author) = match i {
            FIRST_BAD => (
                "rt: speed up upper".to_string(),
                "Eve Breaker <eve@example.org>",
            ),
            _ => (
                format!("rt: change {}", i + 1),
                "Ann Other <ann@example.org>",
            ),
        };
        // Each commit differs (a trailer, and a note that survives a
        // removed rt.sh), so each build is a new artifact.
        std::fs::write(dir.join("rt.sh"), format!("{text}# change {}\n", i + 1)).unwrap();
        std::fs::write(dir.join("CHANGES"), format!("change {}\n", i + 1)).unwrap();
        if unbuildable.contains(&i) {
            std::fs::remove_file(dir.join("rt.sh")).unwrap();
        }
        git(&dir, &["add", "-A"]);
        git(
            &dir,
            &["commit", "--quiet", "--author", author, "-m", &message],
        );
        commits.push(repos.head("rt"));
    }
    git(&dir, &["checkout", "--quiet", "main"]);
    git(&dir, &["merge", "--quiet", "--ff-only", "push"]);
    assert_eq!(repos.head("rt"), commits[PUSH - 1]);
    commits
}

/// Shouter's went-red transitions.
fn went_red(hub: &Hub) -> Vec<Value> {
    let all = hub.cli_json(&[
        "transitions",
        "--json",
        "--project",
        "shouter",
        "--limit",
        "100",
    ]);
    all.as_array()
        .unwrap()
        .iter()
        .filter(|t| s(t, "kind") == WENT_RED)
        .cloned()
        .collect()
}

/// Waits for shouter's one went-red transition's bisection to end; returns
/// the transition.
fn wait_bisected(hub: &Hub, timeout: Duration) -> Value {
    wait_for(timeout, "shouter's bisection to end", || {
        let red = went_red(hub);
        let t = red.first()?;
        let state = t["bisect"]["state"].as_str()?;
        (state != "running").then(|| t.clone())
    })
}

/// The keys of every job the hub made.
fn job_keys(hub: &Hub) -> Vec<String> {
    let jobs = hub.cli_json(&["job", "list", "--json", "--limit", "2000"]);
    jobs.as_array()
        .unwrap()
        .iter()
        .map(|j| s(j, "key").to_string())
        .collect()
}

/// The bisection's builds among `keys`, each checked to exist once.
fn bisection_builds(keys: &[String]) -> Vec<String> {
    let builds: Vec<String> = keys
        .iter()
        .filter(|k| k.starts_with("build/") && k.contains("/bisect/"))
        .cloned()
        .collect();
    let distinct: HashSet<&String> = builds.iter().collect();
    assert_eq!(distinct.len(), builds.len(), "each build once: {builds:#?}");
    builds
}

/// Waits until shouter's maintainer got the went-red mail; checks it is the
/// only one (a little longer: a second one would come now). A hub killed
/// between the server's "250" and its mark re-sends that mail once, with
/// the same `Message-ID` (SMTP's own window, which receivers dedupe: see
/// `notify`): one mail is one `Message-ID`.
fn one_went_red_mail(sink: &SmtpSink) {
    let went_red = || {
        sink.messages()
            .into_iter()
            .filter(|m| m.to().iter().any(|t| t.contains(SHOUTER_MAINTAINER)))
            .filter(|m| m.subject().contains("went red"))
            .map(|m| m.header("Message-ID").unwrap_or_default())
            .collect::<Vec<String>>()
    };
    wait_for(Duration::from_secs(60), "the went-red mail", || {
        (!went_red().is_empty()).then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    let ids = went_red();
    let distinct: HashSet<&String> = ids.iter().collect();
    assert_eq!(
        distinct.len(),
        1,
        "one went-red mail per maintainer: {ids:?}"
    );
    assert!(ids.len() <= 2, "re-sent more than once: {ids:?}");
}

/// Waits until shouter's series has its first result, at `c0`.
fn wait_first_result(hub: &Hub, c0: &str) {
    wait_for(BISECTION, "shouter green at the first commit", || {
        let t = hub.cli_json(&["transitions", "--all", "--json", "--project", "shouter"]);
        t.as_array()?
            .iter()
            .any(|t| s(t, "upstream_commit") == c0)
            .then_some(())
    });
}

#[test]
fn a_64_commit_push_broken_at_37_is_bisected_to_it_in_at_most_6_builds() {
    let sink = SmtpSink::start();
    let repos = Repos::with(&["shouter"]);
    let (hub, _agents) = farm(&repos, &sink);
    let c0 = repos.head("rt");
    wait_first_result(&hub, &c0);
    let pushed_at = Instant::now();
    let commits = push(&repos, &[]);
    let t = wait_bisected(&hub, BISECTION);
    eprintln!(
        "push to the end of the bisection: {:.1?}",
        pushed_at.elapsed()
    );
    assert_eq!(t["culprits"].as_array().unwrap().len(), PUSH, "{t:#}");
    let b = &t["bisect"];
    assert_eq!(s(b, "state"), "found", "{t:#}");
    assert_eq!(s(&b["first_bad"], "sha"), commits[FIRST_BAD], "{t:#}");
    assert!(u(b, "builds") <= 6, "{t:#}");
    let keys = job_keys(&hub);
    assert_eq!(bisection_builds(&keys).len() as u64, u(b, "builds"));
    // Only shouter ran against the bisection's builds.
    let runs: Vec<&String> = keys
        .iter()
        .filter(|k| k.starts_with("test/") && k.contains("/bisect/"))
        .collect();
    assert!(
        runs.iter().all(|k| k.starts_with("test/shouter/")),
        "{runs:#?}"
    );

    // breakage names commit 37, with its subject and author.
    let at = |c: &str| hub.cli_json(&["breakage", "--upstream", "rt", "--rev", c, "--json"]);
    let b37 = at(&commits[FIRST_BAD]);
    let red = b37["went_red"].as_array().unwrap();
    assert_eq!(red.len(), 1, "{b37:#}");
    assert_eq!(
        red[0]["first_bad"],
        serde_json::json!({
            "commit": commits[FIRST_BAD],
            "subject": "rt: speed up upper",
            "author": "Eve Breaker <eve@example.org>",
        })
    );
    // An innocent commit of the same range is never blamed.
    let innocent = &commits[10];
    let b10 = at(innocent);
    assert_eq!(b10["went_red"], serde_json::json!([]), "{b10:#}");
    let text = hub.cli_ok(&["breakage", "--upstream", "rt", "--rev", innocent]);
    assert!(text.contains("0 project(s) went red"), "{text}");
    assert!(text.contains("innocent"), "{text}");
    assert!(text.contains("rt: speed up upper"), "{text}");
    let shown = hub.cli_ok(&["transitions", "--project", "shouter"]);
    assert!(shown.contains("first bad commit:"), "{shown}");
    one_went_red_mail(&sink);
}

#[test]
fn two_commits_that_do_not_build_leave_the_answer_at_37() {
    let sink = SmtpSink::start();
    let repos = Repos::with(&["shouter"]);
    let (hub, _agents) = farm(&repos, &sink);
    let c0 = repos.head("rt");
    wait_first_result(&hub, &c0);
    // The first two commits the search would try do not build.
    let commits = push(&repos, &[31, 32]);
    let t = wait_bisected(&hub, BISECTION);
    let b = &t["bisect"];
    let candidates: Vec<&str> = b["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| s(c, "sha"))
        .collect();
    match s(b, "state") {
        "found" => assert_eq!(s(&b["first_bad"], "sha"), commits[FIRST_BAD], "{t:#}"),
        "range" => assert!(candidates.contains(&commits[FIRST_BAD].as_str()), "{t:#}"),
        other => panic!("bisection {other}: {t:#}"),
    }
    assert!(u(b, "builds") <= 6 + 2, "{t:#}");
    assert!(s(b, "detail").contains("skipped"), "{t:#}");
}

/// A seed from the clock (printed, so a failure can be replayed with
/// `BISECT_SEED`), and a small generator.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let seed = std::env::var("BISECT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
                now.as_nanos() as u64
            });
        eprintln!("BISECT_SEED={seed}");
        Rng(seed | 1)
    }

    fn millis(&mut self, from: u64, to: u64) -> Duration {
        // xorshift64
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        Duration::from_millis(from + self.0 % (to - from))
    }
}

#[test]
fn a_hub_killed_during_a_bisection_finds_the_same_commit_building_each_once() {
    let mut rng = Rng::new();
    let sink = SmtpSink::start();
    let repos = Repos::with(&["shouter"]);
    let (mut hub, _agents) = farm(&repos, &sink);
    let c0 = repos.head("rt");
    wait_first_result(&hub, &c0);
    let commits = push(&repos, &[]);
    // Kills at random moments from the push on (polling, the head's build
    // and run, the went-red, the bisection's builds and runs) until the
    // bisection has ended, at most twelve.
    let mut during = 0;
    let bisection = |hub: &Hub| {
        went_red(hub)
            .first()
            .and_then(|t| t["bisect"]["state"].as_str().map(str::to_owned))
    };
    for kill in 0..12 {
        // Sooner once the bisection runs: it takes a few seconds only (less
        // on a quiet machine, where it may end within a restart or two).
        // Not much sooner: kills faster than its jobs run use up their
        // attempts, and the bisection then ends without an answer.
        let pause = match during {
            0 => rng.millis(200, 1500),
            _ => rng.millis(50, 600),
        };
        // Until the first kill inside the bisection, the pause ends early
        // once it starts, so one kill always lands inside it.
        let until = std::time::Instant::now() + pause;
        let mut state = bisection(&hub);
        while during == 0 && state.is_none() && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
            state = bisection(&hub);
        }
        if during > 0 || state.is_none() {
            std::thread::sleep(until.saturating_duration_since(std::time::Instant::now()));
            state = bisection(&hub);
        }
        if state.as_deref().is_some_and(|s| s != "running") {
            break;
        }
        during += usize::from(state.is_some());
        eprintln!("kill {kill} (bisection: {state:?})");
        hub.kill9();
        std::thread::sleep(rng.millis(0, 300));
        hub.restart();
    }
    // At least one kill lands inside the bisection (usually several do; a
    // fast machine may finish it after the first restart: requiring two
    // failed about one run in five, and a random first pause could miss it
    // altogether).
    assert!(during >= 1, "no kill while the bisection ran");
    eprintln!("{during} kill(s) while the bisection ran");
    let t = wait_bisected(&hub, BISECTION);
    let b = &t["bisect"];
    assert_eq!(s(b, "state"), "found", "{t:#}");
    assert_eq!(s(&b["first_bad"], "sha"), commits[FIRST_BAD], "{t:#}");
    assert_eq!(went_red(&hub).len(), 1, "one went-red transition");
    let keys = job_keys(&hub);
    let builds = bisection_builds(&keys);
    assert_eq!(builds.len() as u64, u(b, "builds"), "{builds:#?}");
    assert!(builds.len() <= 6, "{builds:#?}");
    let runs: Vec<&String> = keys
        .iter()
        .filter(|k| k.starts_with("test/") && k.contains("/bisect/"))
        .collect();
    let distinct: HashSet<&&String> = runs.iter().collect();
    assert_eq!(distinct.len(), runs.len(), "each run once: {runs:#?}");
    one_went_red_mail(&sink);
}
