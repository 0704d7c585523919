//! A database written by an older trunkfarm opens and reads the same.
//!
//! `tests/fixtures/old-database/data.tar.gz` is a hub data dir that the
//! release binaries of commit 93ee57b wrote (`make.sh` beside it: the demo's
//! story, then tokens, subscriptions, an unsubscribe, a digest, an ad-hoc job
//! on a local pool). `expected.txt` is what that hub answered to every
//! listing of the admin API and to `job log` of every job, with this test's
//! own client. The test starts the hub under test on a copy of the data dir
//! and compares its answers line by line: a record that no longer decodes, a
//! key layout that moved, or a field read differently shows up as a diff.
//!
//! To record `expected.txt` again (only when a listing gains a field on
//! purpose, or after `make.sh` made a new fixture), run the test against the
//! binaries that wrote the fixture:
//! `TRUNKFARM_E2E_BIN_DIR=<their dir> TRUNKFARM_FIXTURE_RECORD=1 cargo test -p trunkfarm-e2e --test old_database`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use trunkfarm_e2e::Hub;
use trunkfarm_proto::v1::{
    GetBreakageRequest, GetStatusRequest, ListAgentsRequest, ListArtifactsRequest, ListJobsRequest,
    ListMailRequest, ListPoolsRequest, ListSubscriptionsRequest, ListTokensRequest,
    ListTransitionsRequest, TransitionKind,
};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/old-database")
}

/// The fixture's upstream and projects (as `trunkfarm demo` configures them),
/// their repositories out of reach so nothing new is polled; and its pool,
/// which starts nothing by itself.
const CONFIG: &str = r#"
[[upstream]]
name = "tiny"
url = "/nonexistent/trunkfarm-fixture/tiny"
poll_interval = "1h"
build = ["true"]

[[project]]
name = "mathkit"
url = "/nonexistent/trunkfarm-fixture/mathkit"
poll_interval = "1h"
test = ["sh run-tests.sh"]
maintainers = ["mathkit-dev@example.org"]

[[project]]
name = "textkit"
url = "/nonexistent/trunkfarm-fixture/textkit"
poll_interval = "1h"
test = ["sh run-tests.sh"]
junit = ["junit.xml"]
maintainers = ["textkit-dev@example.org"]

[[project]]
name = "greeter"
url = "/nonexistent/trunkfarm-fixture/greeter"
poll_interval = "1h"
test = ["sh run-tests.sh"]
maintainers = ["greeter-dev@example.org"]

[[pool]]
name = "fixture"
provisioner = "local"
labels = ["fixture"]
min_instances = 0
max_instances = 1
pending_grace = "1h"
max_jobs_per_instance = 1

# The fixture is read as written: no digest or reminder falls due while
# the test runs, however long ago the fixture was recorded (with the
# defaults, a digest was queued once the fixture was a day old).
[notify]
reminder_after = "36500d"
reminder_every = "36500d"
digest_every = "36500d"
"#;

/// Every listing the admin API has, and every job's log, as text.
async fn read_everything(hub: &Hub) -> String {
    let mut admin = hub.admin().await;
    let mut out = String::new();
    macro_rules! section {
        ($name:expr, $call:expr) => {
            let answer = $call.await.unwrap_or_else(|e| panic!("{}: {e}", $name));
            writeln!(out, "==== {}\n{:#?}", $name, answer.into_inner()).unwrap();
        };
    }
    section!("tokens", admin.list_tokens(ListTokensRequest {}));
    section!("agents", admin.list_agents(ListAgentsRequest {}));
    let jobs = admin
        .list_jobs(ListJobsRequest {
            limit: 1000,
            ..Default::default()
        })
        .await
        .expect("list jobs")
        .into_inner();
    // A job's env is a hash map (no fixed order): printed sorted, apart.
    let mut listed = jobs.clone();
    for job in &mut listed.jobs {
        if let Some(spec) = job.spec.as_mut() {
            let env: BTreeMap<String, String> = spec.env.drain().collect();
            writeln!(out, "==== env of job {}\n{env:#?}", job.job_id).unwrap();
        }
    }
    writeln!(out, "==== jobs\n{listed:#?}").unwrap();
    section!("status", admin.get_status(GetStatusRequest::default()));
    let transitions = admin
        .list_transitions(ListTransitionsRequest {
            limit: 1000,
            all: true,
            ..Default::default()
        })
        .await
        .expect("list transitions")
        .into_inner();
    writeln!(out, "==== transitions\n{transitions:#?}").unwrap();
    section!(
        "breakage at the head",
        admin.get_breakage(GetBreakageRequest {
            upstream: "tiny".into(),
            rev: String::new(),
        })
    );
    let mut culprits: Vec<String> = transitions
        .transitions
        .iter()
        .filter(|t| t.kind == TransitionKind::WentRed as i32)
        .map(|t| t.upstream_commit.clone())
        .collect();
    culprits.dedup();
    for commit in culprits {
        {
            section!(
                format!("breakage at {commit}"),
                admin.get_breakage(GetBreakageRequest {
                    upstream: "tiny".into(),
                    rev: commit.clone(),
                })
            );
        }
    }
    section!("artifacts", admin.list_artifacts(ListArtifactsRequest {}));
    section!(
        "subscriptions",
        admin.list_subscriptions(ListSubscriptionsRequest::default())
    );
    section!(
        "mail",
        admin.list_mail(ListMailRequest {
            limit: 1000,
            ..Default::default()
        })
    );
    section!("pools", admin.list_pools(ListPoolsRequest { all: true }));
    for job in &jobs.jobs {
        writeln!(
            out,
            "==== log of job {}\n{}",
            job.job_id,
            hub.job_log(job.job_id)
        )
        .unwrap();
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_written_by_an_older_hub_reads_the_same() {
    let fixture = fixture_dir();
    // The pool's agents' user, binary and dir (a root hub refuses a pool
    // whose user does not exist).
    let (_pool_dir, pool_keys) = trunkfarm_e2e::local_pool_keys("fixture");
    let hub = Hub::start_on(
        |data_dir| {
            let status = Command::new("tar")
                .arg("-xzf")
                .arg(fixture.join("data.tar.gz"))
                .arg("-C")
                .arg(data_dir)
                .status()
                .expect("run tar");
            assert!(status.success(), "tar could not unpack the fixture");
        },
        &CONFIG.replace(
            "max_jobs_per_instance = 1\n",
            &format!("max_jobs_per_instance = 1\n{pool_keys}"),
        ),
        &[],
    );
    let got = read_everything(&hub).await;
    // Fields the protocol gained after the fixture was recorded: the old hub
    // could not answer them, and at their default values they say nothing
    // the old hub did not. Any other value of them is a difference.
    const ADDED_SINCE: &[&str] = &["handed_back: false,", "paused: \"\","];
    let got: String = got
        .lines()
        .filter(|line| !ADDED_SINCE.contains(&line.trim()))
        .map(|line| format!("{line}\n"))
        .collect();
    let expected_path = fixture.join("expected.txt");
    if std::env::var_os("TRUNKFARM_FIXTURE_RECORD").is_some() {
        std::fs::write(&expected_path, &got).expect("write expected.txt");
        return;
    }
    let expected = std::fs::read_to_string(&expected_path).expect("read expected.txt");
    if got != expected {
        let mut diff = String::new();
        for (i, (e, g)) in expected.lines().zip(got.lines()).enumerate() {
            if e != g {
                writeln!(diff, "line {}:\n  old hub: {e}\n  this hub: {g}", i + 1).unwrap();
            }
        }
        panic!(
            "the hub reads the old database differently ({} lines expected, {} read); first differences:\n{}",
            expected.lines().count(),
            got.lines().count(),
            diff.lines().take(60).collect::<Vec<_>>().join("\n")
        );
    }
}
