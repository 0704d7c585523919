use std::sync::Mutex;

use trunkfarm_proto::v1::{RunStatus, TestStatus, TransitionKind};

use super::*;

const GREEN: RunStatus = RunStatus::Green;
const RED: RunStatus = RunStatus::Red;
use crate::store::{Store, trees};

/// Lists only the range's end commit and remembers what it was asked.
#[derive(Default)]
struct OnlyTheEnd {
    asked: Mutex<Vec<CulpritRange>>,
}

#[tonic::async_trait]
impl Culprits for OnlyTheEnd {
    async fn list(&self, range: &CulpritRange) -> (Vec<Commit>, String) {
        self.asked.lock().unwrap().push(range.clone());
        (
            vec![Commit {
                sha: range.to.clone(),
                ..Default::default()
            }],
            String::new(),
        )
    }
}

/// Stages one `x/<transition id>` entry per transition into the notify tree.
struct Marks(Table);

impl TransitionSink for Marks {
    fn table(&self) -> &Table {
        &self.0
    }

    fn stage(&self, t: &Transition, batch: &mut crate::store::Batch) -> Result<(), StoreError> {
        batch.insert(format!("x/{}", t.id).as_bytes(), &[][..]);
        Ok(())
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    store: Store,
    results: Results,
    culprits: OnlyTheEnd,
    sink: Marks,
}

fn open() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    Fixture {
        results: Results::open(&store).unwrap(),
        culprits: OnlyTheEnd::default(),
        sink: Marks(Table::open(&store, trees::NOTIFY).unwrap()),
        store,
        _dir: dir,
    }
}

impl Fixture {
    async fn record(&self, finished: Finished) -> Recorded {
        self.results
            .record(finished, None, &self.culprits, &self.sink)
            .await
            .unwrap()
    }

    /// Records a job that must be new; its transition.
    async fn record_new(&self, finished: Finished) -> Option<Transition> {
        match self.record(finished).await {
            Recorded::New(t) => t.map(|t| *t),
            Recorded::Already => panic!("recorded before"),
        }
    }
}

/// A run of textkit against `c<head_seq>`, with `failing` cases failed.
pub(super) fn run(job_id: u64, head_seq: u64, status: RunStatus, failing: &[&str]) -> Finished {
    let cases: Vec<TestCase> = failing
        .iter()
        .map(|n| TestCase {
            name: (*n).into(),
            status: TestStatus::Failed.into(),
            ..Default::default()
        })
        .collect();
    Finished::Run {
        run: RunRecord {
            info: RunInfo {
                project: "textkit".into(),
                upstream: "tiny".into(),
                platform: "linux-x86_64".into(),
                upstream_commit: format!("c{head_seq}"),
                project_commit: "p1".into(),
                status: status.into(),
                job_id,
                tests_total: 5,
                failing_tests: cases.clone(),
                ..Default::default()
            },
            cases,
        },
        head_seq,
    }
}

/// A build of tiny's `c<head_seq>` on linux-x86_64.
pub(super) fn build(job_id: u64, head_seq: u64, state: BuildState, sha: &str) -> BuildInfo {
    BuildInfo {
        upstream: "tiny".into(),
        platform: "linux-x86_64".into(),
        commit: format!("c{head_seq}"),
        job_id,
        state: state.into(),
        artifact_sha256: sha.into(),
        head_seq,
        ..Default::default()
    }
}

fn kind(t: &Option<Transition>) -> TransitionKind {
    TransitionKind::try_from(t.as_ref().unwrap().kind).unwrap()
}

fn runs(r: &Results) -> Vec<RunRecord> {
    r.table
        .scan::<RunRecord>(keys::runs("textkit", "tiny", "linux-x86_64"))
        .map(|i| i.unwrap().1)
        .collect()
}

#[tokio::test]
async fn green_red_red_green() {
    let f = open();
    let r = &f.results;

    let t1 = f.record_new(run(10, 1, GREEN, &[])).await;
    assert_eq!(kind(&t1), TransitionKind::StillGreen);
    assert!(t1.as_ref().unwrap().first);

    let t2 = f.record_new(run(20, 2, RED, &["a", "b"])).await;
    assert_eq!(kind(&t2), TransitionKind::WentRed);
    let t2 = t2.unwrap();
    assert_eq!(t2.last_green_upstream_commit, "c1");
    assert_eq!(t2.newly_failing, ["a", "b"]);
    assert_eq!(t2.culprits[0].sha, "c2", "the listed culprits are stored");
    assert!(f.sink.0.contains(format!("x/{}", t2.id)).unwrap());

    let t3 = f.record_new(run(30, 3, RED, &["a", "b", "c"])).await;
    assert_eq!(kind(&t3), TransitionKind::StillRed);
    assert_eq!(t3.unwrap().newly_failing, ["c"]);
    assert_eq!(
        f.culprits.asked.lock().unwrap().len(),
        1,
        "only going red lists culprits"
    );
    assert_eq!(
        r.series("textkit/tiny/linux-x86_64").unwrap().red_now(),
        Some(t2.id)
    );
    assert_eq!(r.red_series().unwrap()[0].1.id, t2.id);

    let t4 = f.record_new(run(40, 4, GREEN, &[])).await;
    assert_eq!(kind(&t4), TransitionKind::Fixed);
    let state = r.series("textkit/tiny/linux-x86_64").unwrap();
    assert_eq!(state.red_since, None);
    assert_eq!(state.last_green.unwrap().upstream, "c4");
    assert!(r.red_series().unwrap().is_empty());
    let latest = r.latest_run("textkit", "tiny", "linux-x86_64").unwrap();
    assert_eq!(latest.unwrap().info.job_id, 40);
    assert_eq!(runs(r).len(), 4);

    let all = r.transitions(10, |_| true).unwrap();
    let ids: Vec<u64> = all.iter().map(|t| t.id).collect();
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first: {ids:?}");
    assert_eq!(all.iter().filter(|t| t.id > t2.id).count(), 2);
    let shown = r.transitions_of("tiny", "textkit", 10, false).unwrap();
    assert_eq!(shown.len(), 2, "went red and fixed only: {shown:?}");
    assert!(r.transitions_of("other", "", 10, true).unwrap().is_empty());
    // What the pages read: the newest runs, transitions since a time.
    let recent = r.recent_runs("textkit", "tiny", "linux-x86_64", 2).unwrap();
    let jobs: Vec<u64> = recent.iter().map(|i| i.job_id).collect();
    assert_eq!(jobs, [40, 30]);
    assert!(
        r.red_since("textkit", "tiny", "linux-x86_64")
            .unwrap()
            .is_none()
    );
    let since = r.transitions_since(0, usize::MAX, |_| true).unwrap();
    assert_eq!(since, all);
    let newest = all[0].at_ms;
    assert!(
        r.transitions_since(newest + 1, 10, |_| true)
            .unwrap()
            .is_empty()
    );
    let kept = r.transitions_since(0, 1, |t| t.job_id == 20).unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].id, t2.id);
}

#[tokio::test]
async fn recording_a_job_twice_is_a_no_op_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let sink = |store: &Store| Marks(Table::open(store, trees::NOTIFY).unwrap());
    let culprits = OnlyTheEnd::default();
    {
        let store = Store::open(dir.path()).unwrap();
        let r = Results::open(&store).unwrap();
        let sink = sink(&store);
        r.record(run(10, 1, GREEN, &[]), None, &culprits, &sink)
            .await
            .unwrap();
        assert!(r.recorded(10).unwrap());
        let again = r.record(run(10, 1, RED, &[]), None, &culprits, &sink).await;
        assert!(matches!(again.unwrap(), Recorded::Already));
        assert_eq!(r.transitions(10, |_| true).unwrap().len(), 1);
    }
    let store = crate::store::tests::reopen(dir.path()).await;
    let r = Results::open(&store).unwrap();
    assert!(r.recorded(10).unwrap());
    let t = match r
        .record(run(20, 2, RED, &["x"]), None, &culprits, &sink(&store))
        .await
        .unwrap()
    {
        Recorded::New(t) => t.map(|t| *t),
        Recorded::Already => panic!("job 20 is new"),
    };
    assert_eq!(kind(&t), TransitionKind::WentRed);
}

#[tokio::test]
async fn errors_and_stale_results_decide_nothing() {
    let f = open();
    let r = &f.results;
    f.record_new(run(10, 5, GREEN, &[])).await;
    assert!(
        f.record_new(run(20, 6, RunStatus::Error, &[]))
            .await
            .is_none()
    );
    // The newest run shown is the error, but the series is still green.
    let latest = r.latest_run("textkit", "tiny", "linux-x86_64").unwrap();
    assert_eq!(latest.unwrap().info.job_id, 20);
    // A run against an older build finishing late is stored, not classified.
    assert!(f.record_new(run(30, 4, RED, &[])).await.is_none());
    assert_eq!(runs(r).len(), 3);
    let t = f.record_new(run(40, 7, RED, &[])).await;
    assert_eq!(kind(&t), TransitionKind::WentRed);
    assert_eq!(t.unwrap().last_green_upstream_commit, "c5");
    assert_eq!(
        f.sink.0.keys("").count(),
        2,
        "one outbox mark per transition"
    );
}

#[tokio::test]
async fn builds_track_latest_and_good_and_references() {
    let f = open();
    let r = &f.results;
    let pending = r
        .build_queued(build(1, 1, BuildState::Pending, ""))
        .await
        .unwrap();
    assert_eq!(pending.unwrap().state, BuildState::Pending as i32);
    let latest = r.latest_build("tiny", "linux-x86_64").unwrap().unwrap();
    assert_eq!(latest.state, BuildState::Pending as i32);
    f.record_new(Finished::Build(build(1, 1, BuildState::Passed, "aaa")))
        .await;
    // Queued again (a re-poll): the finished build stays.
    let shown = r
        .build_queued(build(1, 1, BuildState::Pending, ""))
        .await
        .unwrap();
    assert_eq!(shown.unwrap().state, BuildState::Passed as i32);
    let t = f
        .record_new(Finished::Build(build(2, 2, BuildState::Failed, "")))
        .await
        .unwrap();
    assert_eq!(
        f.culprits.asked.lock().unwrap()[..],
        [CulpritRange {
            upstream: "tiny".into(),
            from: Some("c1".into()),
            to: "c2".into()
        }]
    );
    assert_eq!(t.kind, TransitionKind::WentRed as i32);
    assert!(t.project.is_empty());
    let good = r.good_build("tiny", "linux-x86_64").unwrap().unwrap();
    assert_eq!(good.commit, "c1");
    let latest = r.latest_build("tiny", "linux-x86_64").unwrap().unwrap();
    assert_eq!(latest.commit, "c2");
    // A build of a commit that never was the head moves no pointer.
    f.record_new(Finished::Build(build(3, 0, BuildState::Passed, "bbb")))
        .await;
    assert_eq!(
        r.good_build("tiny", "linux-x86_64")
            .unwrap()
            .unwrap()
            .job_id,
        1
    );
    f.record_new(run(10, 1, GREEN, &[])).await;
    let refs = r.referenced_artifacts().unwrap();
    assert!(refs.contains("aaa"));
    assert!(!refs.contains("bbb"));
}

#[tokio::test]
async fn a_queued_mark_never_replaces_a_recorded_job() {
    let f = open();
    let r = &f.results;
    f.record_new(Finished::Build(build(1, 1, BuildState::Passed, "aaa")))
        .await;
    // A forced rebuild of the same commit took the commit's place…
    f.record_new(Finished::Build(build(2, 1, BuildState::Passed, "bbb")))
        .await;
    // …so re-deriving the first job's build shows nothing and writes nothing.
    assert!(
        r.build_queued(build(1, 1, BuildState::Pending, ""))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        r.build("tiny", "linux-x86_64", "c1")
            .unwrap()
            .unwrap()
            .job_id,
        2
    );
}

#[tokio::test]
async fn records_keep_the_layout_and_bytes_of_older_databases() {
    let f = open();
    let raw = f.store.table(trees::RESULTS);
    // Written the way the previous release wrote them: JSON at these keys.
    let old_build = build(1, 1, BuildState::Passed, "aaa");
    let old_state = SeriesState {
        order: (1, 0),
        ..Default::default()
    };
    raw.put_raw("b/tiny/linux-x86_64/c1", json(&old_build))
        .unwrap();
    raw.put_raw("bg/tiny/linux-x86_64", json(&old_build))
        .unwrap();
    raw.put_raw("s//tiny/linux-x86_64", json(&old_state))
        .unwrap();
    raw.put_raw("p/00000000000000000001", &[][..]).unwrap();
    let r = &f.results;
    assert_eq!(
        r.good_build("tiny", "linux-x86_64").unwrap(),
        Some(old_build)
    );
    assert!(matches!(
        f.record(Finished::Build(build(1, 1, BuildState::Passed, "aaa")))
            .await,
        Recorded::Already
    ));
    // What this release writes lands at the same keys, in the same bytes.
    let t = f
        .record_new(Finished::Build(build(7, 2, BuildState::Failed, "")))
        .await
        .unwrap();
    let stored = |key: &str| raw.get_raw(key).unwrap().unwrap().to_vec();
    assert_eq!(stored(&format!("t/{:020}", t.id)), json(&t));
    assert_eq!(
        stored("b/tiny/linux-x86_64/c2"),
        json(&build(7, 2, BuildState::Failed, ""))
    );
    assert_eq!(
        stored("bl/tiny/linux-x86_64"),
        stored("b/tiny/linux-x86_64/c2")
    );
    let state: SeriesState = serde_json::from_slice(&stored("s//tiny/linux-x86_64")).unwrap();
    assert_eq!((state.order, state.red_since), ((2, 0), Some(t.id)));
    assert_eq!(stored("p/00000000000000000007"), b"");
    f.record_new(run(9, 2, GREEN, &[])).await;
    let run9: RunRecord =
        serde_json::from_slice(&stored("r/textkit/tiny/linux-x86_64/00000000000000000009"))
            .unwrap();
    let summary: RunRecord =
        serde_json::from_slice(&stored("rl/textkit/tiny/linux-x86_64")).unwrap();
    assert_eq!((run9.info.job_id, summary.info.job_id), (9, 9));
    assert!(summary.cases.is_empty(), "the grid's copy has no cases");
}

/// JSON bytes of a record, as the previous release encoded them.
fn json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap()
}

/// Every record, with every field set, in the JSON the proto-derived types
/// of the previous release wrote (taken from running that code).
const OLD_BUILD: &str = r#"{"upstream":"tiny","platform":"linux-x86_64","commit":"c1","job_id":1,"state":2,"artifact_sha256":"aaa","created_at_ms":10,"finished_at_ms":20,"duration_ms":5,"detail":"ok","fanned_out":3,"head_seq":1}"#;
const OLD_RUN: &str = r#"{"info":{"project":"textkit","upstream":"tiny","platform":"linux-x86_64","upstream_commit":"c1","project_commit":"p1","status":2,"outcome":2,"job_id":9,"duration_ms":7,"finished_at_ms":30,"detail":"d","tests_total":5,"tests_failed":1,"tests_skipped":1,"failing_tests":[{"name":"t.a","status":3,"time_ms":12,"message":"boom"}],"report_error":"e"},"cases":[{"name":"t.a","status":3,"time_ms":12,"message":"boom"}]}"#;
const OLD_TRANSITION: &str = r#"{"id":4,"kind":1,"project":"textkit","upstream":"tiny","platform":"linux-x86_64","upstream_commit":"c2","last_green_upstream_commit":"c1","culprits":[{"sha":"c2","subject":"fix <it>","author":"Ada <ada@example.org>","time_ms":1700000000000}],"project_commit":"p1","previous_project_commit":"p0","project_commit_changed":true,"newly_failing":["t.a"],"job_id":9,"at_ms":40,"first":true,"status":2,"culprits_error":"e","red_since_id":3}"#;
const OLD_EMPTY_TRANSITION: &str = r#"{"id":0,"kind":0,"project":"","upstream":"","platform":"","upstream_commit":"","last_green_upstream_commit":"","culprits":[],"project_commit":"","previous_project_commit":"","project_commit_changed":false,"newly_failing":[],"job_id":0,"at_ms":0,"first":false,"status":0,"culprits_error":"","red_since_id":0}"#;

/// Decodes `old` as `T` and encodes it again.
fn round_trip<T: serde::Serialize + serde::de::DeserializeOwned>(old: &str) -> (T, String) {
    let record: T = serde_json::from_str(old).unwrap();
    let again = String::from_utf8(json(&record)).unwrap();
    (record, again)
}

#[test]
fn old_records_decode_to_the_same_bytes() {
    let (build, again) = round_trip::<BuildInfo>(OLD_BUILD);
    assert_eq!(again, OLD_BUILD);
    assert_eq!(
        (build.state, build.head_seq),
        (BuildState::Passed as i32, 1)
    );
    let (run, again) = round_trip::<RunRecord>(OLD_RUN);
    assert_eq!(again, OLD_RUN);
    assert_eq!(run.cases[0].status, TestStatus::Error as i32);
    assert_eq!(run.info.failing_tests, run.cases);
    let (t, again) = round_trip::<Transition>(OLD_TRANSITION);
    assert_eq!(again, OLD_TRANSITION);
    assert_eq!(t.culprits[0].author, "Ada <ada@example.org>");
    assert_eq!(t.kind, TransitionKind::WentRed as i32);
    // A record missing fields (written before they were added) reads with
    // defaults and is written whole; an enum number unknown here still reads.
    let (t, again) = round_trip::<Transition>(r#"{"id":5,"kind":99}"#);
    assert_eq!((t.id, t.kind), (5, 99));
    assert_eq!(
        again,
        OLD_EMPTY_TRANSITION.replace(r#""id":0,"kind":0"#, r#""id":5,"kind":99"#)
    );
}

#[test]
fn records_reach_the_wire_field_for_field() {
    let t: Transition = serde_json::from_str(OLD_TRANSITION).unwrap();
    let wire = trunkfarm_proto::v1::Transition::from(t.clone());
    assert_eq!((wire.id, wire.kind, wire.red_since_id), (t.id, t.kind, 3));
    assert_eq!(wire.culprits[0].subject, "fix <it>");
    assert_eq!(wire.newly_failing, t.newly_failing);
    assert_eq!(
        (
            wire.culprits_error.as_str(),
            wire.previous_project_commit.as_str()
        ),
        ("e", "p0")
    );
    let run: RunRecord = serde_json::from_str(OLD_RUN).unwrap();
    let wire = trunkfarm_proto::v1::RunInfo::from(run.info.clone());
    assert_eq!(wire.failing_tests[0].message, "boom");
    assert_eq!((wire.outcome, wire.tests_skipped), (2, 1));
    let case = TestCase::from(wire.failing_tests[0].clone());
    assert_eq!(case, run.cases[0]);
    let build: BuildInfo = serde_json::from_str(OLD_BUILD).unwrap();
    let wire = trunkfarm_proto::v1::BuildInfo::from(build);
    assert_eq!((wire.fanned_out, wire.detail.as_str()), (3, "ok"));
}

#[tokio::test]
async fn a_rerun_is_counted_in_the_noise_record_once() {
    let f = open();
    let Finished::Run { run: green, .. } = run(1, 1, GREEN, &[]) else {
        unreachable!()
    };
    f.record_new(run(1, 1, GREEN, &[])).await;
    let Finished::Run { run: mut red, .. } = run(2, 1, RED, &["t"]) else {
        unreachable!()
    };
    red.cases.push(TestCase {
        name: "u".into(),
        status: TestStatus::Passed.into(),
        ..Default::default()
    });
    // A calibration run, delivered twice (a crash before the inbox's ack).
    let first = f
        .results
        .record_calibration(1, 1, red.clone(), true)
        .await
        .unwrap();
    assert!(matches!(first, Recorded::New(None)));
    let again = f
        .results
        .record_calibration(1, 1, red.clone(), true)
        .await
        .unwrap();
    assert!(matches!(again, Recorded::Already));
    let noise = f.results.noise("textkit").unwrap();
    assert_eq!((noise.runs, noise.flips), (1, 1));
    assert!(noise.tests.is_empty(), "no case ran in both runs");
    assert_eq!(f.results.calibration(1).unwrap().len(), 1);
    // A volunteer's calibration run is stored but measures nothing.
    red.info.job_id = 3;
    f.results
        .record_calibration(1, 2, red.clone(), false)
        .await
        .unwrap();
    assert_eq!(f.results.noise("textkit").unwrap().runs, 1);
    assert_eq!(f.results.calibration(1).unwrap().len(), 2);
    red.info.job_id = 2;
    // Staged again by another write: counted once still.
    let mut batch = crate::store::Batch::default();
    assert!(!f.results.stage_noise(&mut batch, &green, &red).unwrap());
    let history = f.results.transitions_of("", "textkit", 100, true).unwrap();
    assert_eq!(history.len(), 1, "calibration classifies nothing");
}
