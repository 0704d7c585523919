//! The outbox driven in-process: real results and logs over a temporary
//! store, a [`Recorder`] in place of the mail server and a hand-moved
//! [`Clock`]. No tasks run: each test calls [`Notifier::send_due`],
//! [`Notifier::remind`] and [`Notifier::digest`] itself, as the hub's loops
//! do.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use lettre::Message;
use trunkfarm_proto::v1::{BuildState, JobRef, LogChunk, LogStream, RunStatus};

use super::deliver::Sending;
use super::*;
use crate::results::{BisectState, Class};
use crate::results::{
    BuildInfo, Commit, CulpritRange, Culprits, Finished, Recorded, RunInfo, RunRecord,
};

/// The notifier does not look at culprits: a went-red result lists none.
struct NoCulprits;

#[tonic::async_trait]
impl Culprits for NoCulprits {
    async fn list(&self, _range: &CulpritRange) -> (Vec<Commit>, String) {
        (Vec::new(), String::new())
    }
}

const DAY: u64 = 24 * 60 * 60 * 1000;

/// What the recorder kept of one accepted mail.
#[derive(Clone, Debug)]
struct Sent {
    to: String,
    subject: String,
    message_id: String,
    in_reply_to: String,
    /// `List-Unsubscribe`: `<url>`.
    unsubscribe: String,
    /// The whole message as sent.
    raw: String,
}

/// How the recorder answers one delivery.
enum Answer {
    /// 4xx: try again later.
    Later(&'static str),
    /// 5xx: refused for good.
    Refuse(&'static str),
    /// Accepts the mail and never answers: the hub dies between the
    /// server's "250" and marking the mail sent.
    AcceptAndHang,
}

/// The mail server of these tests: accepts and records every mail unless a
/// scripted [`Answer`] for its recipient says otherwise.
#[derive(Default)]
struct Recorder {
    sent: Mutex<Vec<Sent>>,
    /// Delivery attempts per recipient, answered or not.
    attempts: Mutex<HashMap<String, u32>>,
    script: Mutex<HashMap<String, VecDeque<Answer>>>,
    /// Signalled when an [`Answer::AcceptAndHang`] mail was accepted.
    hung: tokio::sync::Notify,
}

impl Recorder {
    fn then(&self, to: &str, answer: Answer) {
        self.script
            .lock()
            .unwrap()
            .entry(to.to_owned())
            .or_default()
            .push_back(answer);
    }

    fn sent(&self) -> Vec<Sent> {
        self.sent.lock().unwrap().clone()
    }

    fn attempts(&self, to: &str) -> u32 {
        self.attempts.lock().unwrap().get(to).copied().unwrap_or(0)
    }

    fn accept(&self, message: &Message) {
        let header = |name: &str| {
            message
                .headers()
                .get_raw(name)
                .unwrap_or_default()
                .to_owned()
        };
        self.sent.lock().unwrap().push(Sent {
            to: message
                .envelope()
                .to()
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(","),
            subject: header("Subject"),
            message_id: header("Message-ID"),
            in_reply_to: header("In-Reply-To"),
            unsubscribe: header("List-Unsubscribe"),
            raw: String::from_utf8_lossy(&message.formatted()).into_owned(),
        });
    }
}

impl Mailer for Recorder {
    fn send(&self, message: Message) -> Sending<'_> {
        Box::pin(async move {
            let to = message
                .envelope()
                .to()
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(",");
            *self.attempts.lock().unwrap().entry(to.clone()).or_default() += 1;
            let answer = self
                .script
                .lock()
                .unwrap()
                .get_mut(&to)
                .and_then(VecDeque::pop_front);
            match answer {
                None => {
                    self.accept(&message);
                    Ok("250 2.0.0 Ok: queued".to_owned())
                }
                Some(Answer::Later(e)) => Err(Failure::Transient(e.to_owned())),
                Some(Answer::Refuse(e)) => Err(Failure::Permanent(e.to_owned())),
                Some(Answer::AcceptAndHang) => {
                    self.accept(&message);
                    self.hung.notify_one();
                    std::future::pending().await
                }
            }
        })
    }

    fn describe(&self) -> String {
        "the test recorder".into()
    }
}

const ALICE: &str = "alice@example.org";
const BOB: &str = "bob@example.org";
const CAROL: &str = "carol@example.org";
const CORE: &str = "core@example.org";

/// A hub's notification side: results and logs over one store, and the
/// notifier on top, as `server.rs` wires them (without the tasks).
struct Farm {
    dir: tempfile::TempDir,
    store: Store,
    results: Results,
    logs: Arc<JobLogs>,
    notifier: Notifier,
    server: Arc<Recorder>,
    clock: Arc<AtomicU64>,
}

impl Farm {
    /// A farm whose project `textkit` (upstream `tiny`, one platform) is
    /// maintained by `maintainers`; the clock starts at the real time, the
    /// time results stamp transitions with.
    fn new(maintainers: &[&str]) -> Farm {
        Farm::configured(maintainers, "", "")
    }

    /// [`Farm::new`] with `upstream` keys added to `tiny`'s table and
    /// `project` keys to `textkit`'s.
    fn configured(maintainers: &[&str], upstream: &str, project: &str) -> Farm {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let clock = Arc::new(AtomicU64::new(now_ms()));
        let config = config_with(dir.path(), maintainers, upstream, project);
        Farm::with_config(dir, store, clock, config)
    }

    fn with(
        dir: tempfile::TempDir,
        store: Store,
        clock: Arc<AtomicU64>,
        maintainers: &[&str],
    ) -> Farm {
        let config = config(dir.path(), maintainers);
        Farm::with_config(dir, store, clock, config)
    }

    fn with_config(
        dir: tempfile::TempDir,
        store: Store,
        clock: Arc<AtomicU64>,
        config: HubConfig,
    ) -> Farm {
        let server = Arc::new(Recorder::default());
        let results = Results::open(&store).unwrap();
        let logs = Arc::new(JobLogs::open_local(&store, 1 << 20).unwrap());
        let now = clock.clone();
        let notifier = Notifier::open(
            &config,
            &store,
            results.clone(),
            logs.clone(),
            "https://farm.example.org".into(),
            server.clone(),
            Arc::new(move || now.load(Ordering::SeqCst)),
        )
        .unwrap();
        Farm {
            dir,
            store,
            results,
            logs,
            notifier,
            server,
            clock,
        }
    }

    /// The hub stops (the store with it) and starts again on the same data
    /// dir, with a fresh mail server and whatever the config now says.
    async fn restart(self, maintainers: &[&str]) -> Farm {
        let Farm {
            dir,
            store,
            results,
            logs,
            notifier,
            clock,
            ..
        } = self;
        drop((notifier, logs, results, store));
        let store = crate::store::tests::reopen(&dir.path().join("db")).await;
        Farm::with(dir, store, clock, maintainers)
    }

    fn set_clock(&self, ms: u64) {
        self.clock.store(ms, Ordering::SeqCst);
    }

    fn now(&self) -> u64 {
        self.clock.load(Ordering::SeqCst)
    }

    /// Records a finished `textkit` run as the pipeline does: the result and
    /// the mails it causes in one transaction. Job ids double as the order
    /// in which their commits were the head.
    async fn run(&self, job_id: u64, red: bool) -> Option<Transition> {
        let run = RunRecord {
            info: RunInfo {
                project: "textkit".into(),
                upstream: "tiny".into(),
                platform: "linux-x86_64".into(),
                upstream_commit: format!("{job_id:040x}"),
                project_commit: "p1".into(),
                status: if red {
                    RunStatus::Red
                } else {
                    RunStatus::Green
                }
                .into(),
                job_id,
                ..Default::default()
            },
            cases: Vec::new(),
        };
        self.record(Finished::Run {
            run,
            head_seq: job_id,
        })
        .await
    }

    /// Records a finished build of `tiny` the same way.
    async fn build(&self, job_id: u64, passed: bool) -> Option<Transition> {
        let build = BuildInfo {
            upstream: "tiny".into(),
            platform: "linux-x86_64".into(),
            commit: format!("{job_id:040x}"),
            job_id,
            head_seq: job_id,
            state: if passed {
                BuildState::Passed
            } else {
                BuildState::Failed
            }
            .into(),
            ..Default::default()
        };
        self.record(Finished::Build(build)).await
    }

    /// Records `finished` with the notifier as the transition's sink: the
    /// transition it caused (none when the job was recorded before).
    async fn record(&self, finished: Finished) -> Option<Transition> {
        match self
            .results
            .record(finished, None, &NoCulprits, &self.notifier)
            .await
            .unwrap()
        {
            Recorded::New(t) => t.map(|t| *t),
            Recorded::Already => None,
        }
    }

    /// One round of the sender.
    async fn deliver(&self) -> Option<u64> {
        self.notifier.send_due().await.unwrap()
    }

    fn outbox(&self, state: MailState) -> Vec<MailInfo> {
        self.notifier.mails(1000, state).unwrap()
    }
}

fn config(dir: &Path, maintainers: &[&str]) -> HubConfig {
    config_with(dir, maintainers, "", "")
}

/// [`config`] with `upstream` keys added to `tiny` and `project` keys to
/// `textkit`, and a second project, `wordkit`, maintained by nobody.
fn config_with(dir: &Path, maintainers: &[&str], upstream: &str, project: &str) -> HubConfig {
    let maintainers = maintainers
        .iter()
        .map(|m| format!("{m:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let text = format!(
        r#"
[hub]
data_dir = {dir:?}

[smtp]
from = "trunkfarm <farm@example.org>"

[[upstream]]
name = "tiny"
url = "https://example.org/tiny.git"
branch = "main"
build = ["make install"]
contacts = ["{CORE}"]
{upstream}

[[project]]
name = "textkit"
url = "https://example.org/textkit.git"
test = ["make test"]
maintainers = [{maintainers}]
{project}

[[project]]
name = "wordkit"
url = "https://example.org/wordkit.git"
test = ["make test"]
"#,
        dir = dir.display().to_string(),
    );
    HubConfig::from_toml(&text, None).unwrap()
}

fn subscription(email: &str) -> Subscription {
    Subscription {
        email: email.into(),
        project: "textkit".into(),
        ..Default::default()
    }
}

fn recipients(sent: &[Sent]) -> Vec<String> {
    let mut to: Vec<String> = sent.iter().map(|s| s.to.clone()).collect();
    to.sort();
    to
}

fn log_line(job_id: u64, text: &str) -> LogChunk {
    LogChunk {
        job: Some(JobRef { job_id, attempt: 1 }),
        seq: 1,
        stream: LogStream::Stdout.into(),
        data: format!("{text}\n").into_bytes(),
    }
}

#[tokio::test]
async fn went_red_mails_each_matching_subscriber_once() {
    let farm = Farm::new(&[ALICE]);
    farm.notifier.subscribe(subscription(BOB)).await.unwrap();
    let elsewhere = Subscription {
        platform: "windows-x86_64".into(),
        ..subscription(CAROL)
    };
    assert!(
        farm.notifier.subscribe(elsewhere).await.is_err(),
        "textkit runs on no such platform"
    );
    farm.logs
        .append(log_line(2, "FAILED tests/test_wrap.py::test_width"))
        .unwrap();

    let green = farm.run(1, false).await.unwrap();
    assert_eq!(green.kind, TransitionKind::StillGreen as i32);
    assert_eq!(farm.notifier.pending_count(), 0, "green is never mailed");

    let red = farm.run(2, true).await.unwrap();
    assert_eq!(red.kind, TransitionKind::WentRed as i32);
    assert_eq!(farm.notifier.pending_count(), 2);
    let mut again = crate::store::Batch::default();
    assert_eq!(
        farm.notifier.stage(&red, &mut again).unwrap(),
        0,
        "the same event queues nothing twice (a retry after a crash)"
    );

    farm.deliver().await;
    let sent = farm.server.sent();
    assert_eq!(recipients(&sent), [ALICE, BOB]);
    for mail in &sent {
        assert!(mail.subject.contains("textkit went red"), "{mail:?}");
        assert!(
            mail.raw.contains("test_wrap.py::test_width"),
            "the log tail"
        );
        assert!(mail.message_id.contains(&format!("red.{}.", red.id)));
        assert!(mail.unsubscribe.contains("/unsubscribe?token="));
    }
    assert_ne!(sent[0].message_id, sent[1].message_id);

    farm.deliver().await;
    assert_eq!(farm.server.sent().len(), 2, "a second round sends nothing");
    let done = farm.outbox(MailState::Sent);
    assert_eq!(done.len(), 2);
    assert!(
        done.iter()
            .all(|m| m.attempts == 1 && m.response.starts_with("250"))
    );
    assert_eq!(farm.notifier.pending_count(), 0);

    let farm = farm.restart(&[ALICE]).await;
    assert!(farm.run(2, true).await.is_none(), "recorded once");
    farm.deliver().await;
    assert!(
        farm.server.sent().is_empty(),
        "nothing is sent again after a restart"
    );
    assert_eq!(farm.outbox(MailState::Unspecified).len(), 2);
}

#[tokio::test]
async fn a_crash_between_the_servers_answer_and_the_mark_resends_that_mail_once() {
    let farm = Farm::new(&[ALICE]);
    farm.run(1, false).await;
    farm.run(2, true).await.unwrap();
    farm.server.then(ALICE, Answer::AcceptAndHang);
    tokio::select! {
        _ = farm.deliver() => panic!("the server never answers"),
        _ = farm.server.hung.notified() => {}
    }
    let first = farm.server.sent();
    assert_eq!(first.len(), 1, "the server has it");
    // The hub dies here: the round is dropped before it marked the mail sent.
    let farm = farm.restart(&[ALICE]).await;
    assert_eq!(
        farm.notifier.pending_count(),
        1,
        "still pending after restart"
    );
    farm.deliver().await;
    farm.deliver().await;
    let again = farm.server.sent();
    assert_eq!(again.len(), 1, "sent once more, not twice");
    assert_eq!(
        again[0].message_id, first[0].message_id,
        "the same Message-ID, so mail clients show it once"
    );
    let outbox = farm.outbox(MailState::Unspecified);
    assert_eq!(outbox.len(), 1, "never queued twice");
    assert_eq!(outbox[0].state, MailState::Sent as i32);
}

#[tokio::test]
async fn fixed_mails_the_same_people_in_the_went_red_thread() {
    let farm = Farm::new(&[ALICE]);
    farm.notifier.subscribe(subscription(BOB)).await.unwrap();
    farm.run(1, false).await;
    farm.run(2, true).await.unwrap();
    farm.deliver().await;
    let red: HashMap<String, String> = farm
        .server
        .sent()
        .into_iter()
        .map(|s| (s.to, s.message_id))
        .collect();

    let still = farm.run(3, true).await.unwrap();
    assert_eq!(still.kind, TransitionKind::StillRed as i32);
    let fixed = farm.run(4, false).await.unwrap();
    assert_eq!(fixed.kind, TransitionKind::Fixed as i32);
    farm.deliver().await;
    let sent = farm.server.sent();
    let fixed_mails: Vec<&Sent> = sent.iter().skip(2).collect();
    assert_eq!(fixed_mails.len(), 2, "still red is not mailed; fixed is");
    assert_eq!(recipients(&sent[2..]), [ALICE, BOB]);
    for mail in fixed_mails {
        assert!(mail.subject.contains("textkit fixed"), "{mail:?}");
        assert_eq!(mail.in_reply_to, red[&mail.to], "answers the went-red mail");
    }
}

#[tokio::test]
async fn a_maintainer_who_unsubscribed_gets_nothing_even_after_a_restart() {
    let farm = Farm::new(&[ALICE, BOB]);
    farm.run(1, false).await;
    farm.run(2, true).await.unwrap();
    farm.deliver().await;
    let link = farm
        .server
        .sent()
        .into_iter()
        .find(|s| s.to == ALICE)
        .unwrap()
        .unsubscribe;
    let token = link
        .trim_matches(['<', '>'])
        .split_once("token=")
        .unwrap()
        .1
        .to_owned();
    let said = farm.notifier.unsubscribe_token(&token).await.unwrap();
    assert!(said.contains(ALICE) && said.contains("textkit"), "{said}");

    // The config still lists her: a restart must not subscribe her again.
    let farm = farm.restart(&[ALICE, BOB]).await;
    let subscribed: Vec<String> = farm
        .notifier
        .subscriptions("textkit")
        .unwrap()
        .into_iter()
        .map(|s| s.email)
        .collect();
    assert_eq!(subscribed, [BOB]);
    farm.run(3, false).await.unwrap();
    farm.deliver().await;
    assert_eq!(recipients(&farm.server.sent()), [BOB]);

    // Subscribing by hand brings her back.
    farm.notifier.subscribe(subscription(ALICE)).await.unwrap();
    let farm = farm.restart(&[ALICE, BOB]).await;
    farm.run(4, true).await.unwrap();
    farm.deliver().await;
    assert_eq!(recipients(&farm.server.sent()), [ALICE, BOB]);
}

#[tokio::test]
async fn a_maintainer_dropped_from_the_config_is_no_longer_mailed() {
    let farm = Farm::new(&[ALICE, BOB]);
    let farm = farm.restart(&[BOB]).await;
    farm.run(1, false).await;
    farm.run(2, true).await.unwrap();
    farm.deliver().await;
    assert_eq!(recipients(&farm.server.sent()), [BOB]);
}

#[tokio::test]
async fn a_failed_delivery_is_retried_with_backoff_and_a_refusal_is_final() {
    let farm = Farm::new(&[ALICE]);
    farm.notifier.subscribe(subscription(BOB)).await.unwrap();
    farm.server
        .then(ALICE, Answer::Later("421 4.3.2 try again later"));
    farm.server
        .then(ALICE, Answer::Later("421 4.3.2 still busy"));
    farm.server
        .then(BOB, Answer::Refuse("550 5.1.1 no such user"));
    farm.run(1, false).await;
    farm.run(2, true).await.unwrap();
    let first = farm.notifier.inner.settings.retry_first.as_millis() as u64;

    let t0 = farm.now();
    assert_eq!(farm.deliver().await, Some(t0 + first), "the next try");
    let pending = farm.outbox(MailState::Pending);
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].to, ALICE);
    assert_eq!(pending[0].attempts, 1);
    assert_eq!(pending[0].last_error, "421 4.3.2 try again later");
    let failed = farm.outbox(MailState::Failed);
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].to, BOB);
    assert_eq!(failed[0].last_error, "550 5.1.1 no such user");

    farm.deliver().await;
    assert_eq!(farm.server.attempts(ALICE), 1, "not before its time");

    farm.set_clock(t0 + first);
    assert_eq!(
        farm.deliver().await,
        Some(t0 + first + 2 * first),
        "the wait doubles"
    );
    farm.set_clock(t0 + 3 * first - 1);
    farm.deliver().await;
    assert_eq!(farm.server.attempts(ALICE), 2);
    farm.set_clock(t0 + 3 * first);
    assert_eq!(farm.deliver().await, None, "nothing left to send");

    assert_eq!(
        recipients(&farm.server.sent()),
        [ALICE],
        "delivered, not lost"
    );
    let sent = farm.outbox(MailState::Sent);
    assert_eq!((sent[0].attempts, sent[0].last_error.as_str()), (3, ""));
    assert_eq!(farm.server.attempts(BOB), 1, "a 5xx is not retried");
}

#[tokio::test]
async fn the_retry_wait_stops_growing_at_retry_max() {
    let farm = Farm::new(&[ALICE]);
    for _ in 0..12 {
        farm.server.then(ALICE, Answer::Later("421 busy"));
    }
    farm.run(1, false).await;
    farm.run(2, true).await.unwrap();
    let max = farm.notifier.inner.settings.retry_max.as_millis() as u64;
    let mut waits = Vec::new();
    for _ in 0..12 {
        let now = farm.now();
        let next = farm.deliver().await.unwrap();
        waits.push(next - now);
        farm.set_clock(next);
    }
    assert!(
        waits.windows(2).all(|w| w[1] == (w[0] * 2).min(max)),
        "{waits:?}"
    );
    assert_eq!(*waits.last().unwrap(), max);
    farm.deliver().await;
    assert_eq!(farm.server.sent().len(), 1);
}

#[tokio::test]
async fn a_red_series_is_reminded_in_its_thread_once_per_period() {
    let farm = Farm::new(&[ALICE]);
    farm.run(1, false).await;
    let red = farm.run(2, true).await.unwrap();
    farm.deliver().await;
    let red_id = farm.server.sent()[0].message_id.clone();
    let settings = farm.notifier.inner.settings.clone();
    let after = settings.reminder_after.as_millis() as u64;
    let every = settings.reminder_every.as_millis() as u64;

    assert_eq!(farm.notifier.remind().await.unwrap(), 0, "not yet");
    farm.set_clock(red.at_ms + after - 1);
    assert_eq!(farm.notifier.remind().await.unwrap(), 0, "not yet");
    farm.set_clock(red.at_ms + after);
    assert_eq!(farm.notifier.remind().await.unwrap(), 1);
    assert_eq!(farm.notifier.remind().await.unwrap(), 0, "once per period");
    farm.deliver().await;
    let reminder = farm.server.sent()[1].clone();
    assert!(
        reminder
            .subject
            .contains(&format!("still red ({} days)", after / DAY)),
        "{reminder:?}"
    );
    assert_eq!(reminder.in_reply_to, red_id);

    farm.set_clock(red.at_ms + after + every);
    let farm = farm.restart(&[ALICE]).await;
    assert_eq!(farm.notifier.remind().await.unwrap(), 1, "the second one");
    assert_eq!(farm.notifier.remind().await.unwrap(), 0);

    farm.run(3, false).await.unwrap();
    farm.set_clock(red.at_ms + after + 5 * every);
    assert_eq!(farm.notifier.remind().await.unwrap(), 0, "fixed: no more");
}

#[tokio::test]
async fn a_digest_sums_up_what_went_red_in_its_period_once() {
    let farm = Farm::new(&[ALICE]);
    let digest = Subscription {
        email: CAROL.into(),
        upstream: "tiny".into(),
        digest: true,
        ..Default::default()
    };
    farm.notifier.subscribe(digest).await.unwrap();
    farm.run(1, false).await;
    let red = farm.run(2, true).await.unwrap();
    assert_eq!(
        farm.notifier.digest().await.unwrap(),
        0,
        "the period is not over"
    );

    let period = farm.notifier.period_ms();
    farm.set_clock((red.at_ms / period + 1) * period);
    assert_eq!(farm.notifier.digest().await.unwrap(), 1);
    assert_eq!(farm.notifier.digest().await.unwrap(), 0, "once per period");
    farm.deliver().await;
    let sent = farm.server.sent();
    let digest: Vec<&Sent> = sent.iter().filter(|s| s.to == CAROL).collect();
    assert_eq!(digest.len(), 1);
    assert!(
        digest[0]
            .subject
            .contains("tiny digest: 1 project(s) went red"),
        "{:?}",
        digest[0]
    );
    assert!(digest[0].raw.contains("textkit"));

    // A quiet period sends nothing.
    farm.set_clock(farm.now() + period);
    assert_eq!(farm.notifier.digest().await.unwrap(), 0);
}

#[tokio::test]
async fn a_failed_runtime_build_goes_to_the_upstreams_contacts() {
    let farm = Farm::new(&[ALICE]);
    farm.build(1, true).await;
    let failed = farm.build(2, false).await.unwrap();
    assert_eq!(failed.kind, TransitionKind::WentRed as i32);
    farm.deliver().await;
    let sent = farm.server.sent();
    assert_eq!(recipients(&sent), [CORE], "not the project's maintainers");
    assert!(
        sent[0].subject.contains("tiny main build failed"),
        "{:?}",
        sent[0]
    );
}

#[tokio::test]
async fn staged_outbox_entries_are_one_batch_applied_with_the_transition() {
    let farm = Farm::new(&[ALICE, BOB]);
    // A transition as results stores it: here only its mails are applied.
    let t = Transition {
        id: farm.store.next_id().unwrap(),
        kind: TransitionKind::WentRed.into(),
        project: "textkit".into(),
        upstream: "tiny".into(),
        platform: "linux-x86_64".into(),
        upstream_commit: "c".repeat(40),
        job_id: 9,
        at_ms: farm.now(),
        ..Default::default()
    };
    let mut batch = crate::store::Batch::default();
    assert_eq!(farm.notifier.stage(&t, &mut batch).unwrap(), 2);
    assert_eq!(farm.notifier.pending_count(), 0, "nothing before the apply");
    farm.notifier.table().apply(batch).unwrap();
    assert_eq!(farm.notifier.pending_count(), 2);
    let mut again = crate::store::Batch::default();
    assert_eq!(farm.notifier.stage(&t, &mut again).unwrap(), 0);
    let still_red = Transition {
        kind: TransitionKind::StillRed.into(),
        id: t.id + 1,
        ..t
    };
    assert_eq!(farm.notifier.stage(&still_red, &mut again).unwrap(), 0);
}

#[tokio::test]
async fn the_outbox_reads_records_written_by_the_previous_release() {
    // Bytes as the release before the typed store wrote them.
    let farm = Farm::new(&[]);
    let table = farm.notifier.table();
    table
        .put_raw(
            "s/textkit/dave@example.org",
            &br#"{"email":"dave@example.org","project":"textkit","platform":"","upstream":"","digest":false,"source":"cli","created_at_ms":1750000000000}"#[..],
        )
        .unwrap();
    table
        .put_raw(
            format!("m/{}", id_key(7)),
            &br#"{"info":{"id":7,"to":"dave@example.org","subject":"[trunkfarm] textkit went red","state":1,"attempts":0,"next_attempt_at_ms":0,"last_error":"","created_at_ms":1750000000000,"sent_at_ms":0,"event":"t6","message_id":"<red.6.0a0b0c0d@example.org>","in_reply_to":"","response":""},"text":"red","html":"<p>red</p>","unsubscribe_url":""}"#[..],
        )
        .unwrap();
    table.put_raw(format!("q/{}", id_key(7)), &b""[..]).unwrap();
    table
        .put_raw("e/t6/dave@example.org", &7u64.to_be_bytes()[..])
        .unwrap();
    assert_eq!(
        farm.notifier.subscriptions("textkit").unwrap()[0].email,
        "dave@example.org"
    );
    let pending = farm.outbox(MailState::Pending);
    assert_eq!((pending[0].id, pending[0].event.as_str()), (7, "t6"));
    farm.deliver().await;
    let sent = farm.server.sent();
    assert_eq!(sent[0].message_id, "<red.6.0a0b0c0d@example.org>");

    // And writes what the previous release would have.
    let raw = table.get_raw(format!("m/{}", id_key(7))).unwrap().unwrap();
    let text = String::from_utf8(raw.to_vec()).unwrap();
    assert!(
        text.starts_with(r#"{"info":{"id":7,"to":"dave@example.org","#),
        "{text}"
    );
    assert!(text.contains(r#""state":2,"attempts":1,"#), "{text}");
    assert!(table.get_raw(format!("q/{}", id_key(7))).unwrap().is_none());
}

#[tokio::test]
async fn every_field_of_a_stored_record_reads_and_writes_back_the_same_bytes() {
    // Written by the release whose records were the proto-derived
    // `v1::Subscription` and `v1::MailInfo`, every field set.
    let farm = Farm::new(&[]);
    let table = farm.notifier.table();
    let project = br#"{"email":"erin@example.org","project":"textkit","platform":"linux-x86_64","upstream":"tiny","digest":false,"source":"config","created_at_ms":1750000000123}"#;
    let digest = br#"{"email":"carol@example.org","project":"","platform":"","upstream":"tiny","digest":true,"source":"cli","created_at_ms":1750000000456}"#;
    let mail = r#"{"info":{"id":12,"to":"erin@example.org","subject":"[trunkfarm] textkit fixed \"ü\"","state":3,"attempts":3,"next_attempt_at_ms":1750000009000,"last_error":"550 5.1.1 no such user","created_at_ms":1750000000000,"sent_at_ms":1750000001000,"event":"remind2.11","message_id":"<remind2.11.0a0b0c0d@example.org>","in_reply_to":"<red.11.0a0b0c0d@example.org>","response":"250 2.0.0 OK"},"text":"fixed\nline 2","html":"<p>fixed</p>","unsubscribe_url":"https://farm.example.org/unsubscribe?token=abc"}"#;
    let records: [(&str, &[u8]); 3] = [
        ("s/textkit/erin@example.org", project),
        ("d/tiny/carol@example.org", digest),
        ("m/00000000000000000012", mail.as_bytes()),
    ];
    for (key, bytes) in records {
        table.put_raw(key, bytes).unwrap();
    }
    let subs = farm.notifier.subscriptions("").unwrap();
    assert_eq!(
        subs.iter()
            .map(|s| (s.platform.as_str(), s.digest, s.created_at_ms))
            .collect::<Vec<_>>(),
        [
            ("linux-x86_64", false, 1750000000123),
            ("", true, 1750000000456)
        ]
    );
    let failed = farm.outbox(MailState::Failed);
    assert_eq!(
        (failed[0].attempts, failed[0].in_reply_to.as_str()),
        (3, "<red.11.0a0b0c0d@example.org>")
    );
    for (key, bytes) in records {
        if key.starts_with("m/") {
            let m: OutMail = table.get(key).unwrap().unwrap();
            table.put(key, &m).unwrap();
        } else {
            let s: Subscription = table.get(key).unwrap().unwrap();
            table.put(key, &s).unwrap();
        }
        assert_eq!(
            String::from_utf8(table.get_raw(key).unwrap().unwrap().to_vec()).unwrap(),
            String::from_utf8(bytes.to_vec()).unwrap(),
            "{key} written back"
        );
    }

    // A record missing fields reads them as empty and writes them all, as
    // the proto-derived type did.
    table
        .put_raw(
            "s/textkit/fay@example.org",
            &br#"{"email":"fay@example.org","project":"textkit"}"#[..],
        )
        .unwrap();
    let s: Subscription = table.get("s/textkit/fay@example.org").unwrap().unwrap();
    assert_eq!(
        String::from_utf8(table.encode(&s).unwrap()).unwrap(),
        r#"{"email":"fay@example.org","project":"textkit","platform":"","upstream":"","digest":false,"source":"","created_at_ms":0}"#
    );
}

/// Commits of `tiny` as a culprit range lists them; the fourth is by Dave.
fn range() -> Vec<Commit> {
    (1..=4)
        .map(|n| Commit {
            sha: format!("{n}{}", "abcdef0123".repeat(4))[..40].to_owned(),
            subject: format!("tiny: change {n}"),
            author: if n == 4 {
                "Dave Breaker <dave@example.org>".into()
            } else {
                format!("Dev {n} <dev{n}@example.org>")
            },
            time_ms: n,
        })
        .collect()
}

/// A went-red transition of `project` (job `job_id`) as results stores it,
/// classed `class`, its four-commit range being bisected.
fn went_red(farm: &Farm, project: &str, job_id: u64, class: Option<Class>) -> Transition {
    Transition {
        id: farm.store.next_id().unwrap(),
        kind: TransitionKind::WentRed.into(),
        project: project.into(),
        upstream: "tiny".into(),
        platform: "linux-x86_64".into(),
        upstream_commit: range()[3].sha.clone(),
        last_green_upstream_commit: "0".repeat(40),
        culprits: range(),
        project_commit: "b".repeat(40),
        previous_project_commit: "a".repeat(40),
        job_id,
        at_ms: farm.now(),
        class,
        bisect: Some(crate::results::Bisect::default()),
        ..Default::default()
    }
}

/// `t` as its bisection leaves it: the fourth commit found.
fn found(mut t: Transition) -> Transition {
    t.bisect = Some(crate::results::Bisect {
        state: BisectState::Found,
        first_bad: Some(range()[3].clone()),
        builds: 2,
        ..Default::default()
    });
    t
}

impl Farm {
    /// Stores `t`'s mails as results would (with the transition): how many.
    fn stage_went_red(&self, t: &Transition) -> usize {
        let mut batch = crate::store::Batch::default();
        let n = self.notifier.stage(t, &mut batch).unwrap();
        self.notifier.table().apply(batch).unwrap();
        n
    }

    /// Stores what the end of `t`'s bisection causes: mails staged or changed.
    fn stage_bisected(&self, t: &Transition) -> usize {
        let mut batch = crate::store::Batch::default();
        let n = self.notifier.stage_bisected(t, &mut batch).unwrap();
        self.notifier.table().apply(batch).unwrap();
        n
    }

    fn bisect_wait(&self) -> u64 {
        self.notifier.inner.settings.bisect_wait.as_millis() as u64
    }
}

const FIRST_BAD: &str =
    "First bad commit: 4abcdef012 tiny: change 4 (Dave Breaker <dave@example.org>)";

#[tokio::test]
async fn a_went_red_mail_waits_for_its_bisection_and_goes_with_the_first_bad_commit() {
    let farm = Farm::new(&[ALICE, BOB]);
    let t = went_red(&farm, "textkit", 9, Some(Class::Regressed));
    assert_eq!(farm.stage_went_red(&t), 2);
    farm.deliver().await;
    assert!(farm.server.sent().is_empty(), "held while bisecting");
    assert_eq!(farm.notifier.pending_count(), 2);

    // The bisection ends before notify.bisect_wait: the held mails go now,
    // saying what it found; no follow-up.
    farm.set_clock(farm.now() + farm.bisect_wait() / 2);
    assert_eq!(farm.stage_bisected(&found(t.clone())), 2);
    farm.deliver().await;
    let sent = farm.server.sent();
    assert_eq!(recipients(&sent), [ALICE, BOB]);
    for mail in &sent {
        let text = mail_text(mail);
        assert!(text.contains(FIRST_BAD), "{text}");
        assert!(text.contains("Class: regressed"), "{text}");
        assert!(
            !text.contains("tiny: change 2"),
            "no other commit is blamed: {text}"
        );
        assert!(!text.contains("Bisecting"), "{text}");
        assert!(mail.message_id.contains(&format!("red.{}.", t.id)));
        assert!(mail.in_reply_to.is_empty());
    }
    // Staging the end again queues nothing: the mails said it already.
    assert_eq!(farm.stage_bisected(&found(t)), 0);
    farm.deliver().await;
    assert_eq!(farm.server.sent().len(), 2);
}

#[tokio::test]
async fn a_suspicious_greens_one_mail_waits_for_its_bisection_and_names_the_first_bad_commit() {
    let farm = Farm::new(&[ALICE]);
    let mut t = went_red(&farm, "textkit", 9, Some(Class::Suspicious));
    t.kind = TransitionKind::StillGreen.into();
    t.suspicious = "20 passed → 0 passed, 20 skipped".into();
    assert_eq!(farm.stage_went_red(&t), 1);
    farm.deliver().await;
    assert!(farm.server.sent().is_empty(), "held while bisecting");
    assert_eq!(farm.stage_bisected(&found(t.clone())), 1);
    farm.deliver().await;
    let sent = farm.server.sent();
    assert_eq!(sent.len(), 1, "one mail");
    let text = mail_text(&sent[0]);
    assert!(text.contains(FIRST_BAD), "{text}");
    assert!(text.contains("Class: suspicious"), "{text}");
    assert!(text.contains("20 passed → 0 passed, 20 skipped"), "{text}");
    assert!(!text.contains("tiny: change 2"), "{text}");
    assert_eq!(farm.stage_bisected(&found(t)), 0);
}

#[tokio::test]
async fn a_held_mail_goes_after_bisect_wait_and_the_result_follows_in_its_thread_once() {
    let farm = Farm::new(&[ALICE]);
    let t = went_red(&farm, "textkit", 9, None);
    farm.stage_went_red(&t);
    let due = farm.now() + farm.bisect_wait();
    assert_eq!(
        farm.deliver().await,
        Some(due),
        "the sender wakes when it is due"
    );
    farm.set_clock(due);
    farm.deliver().await;
    let sent = farm.server.sent();
    assert_eq!(sent.len(), 1);
    let red = mail_text(&sent[0]);
    assert!(
        red.contains("Bisecting the 4 commits after the last green 0000000000"),
        "{red}"
    );
    assert!(
        red.contains("tiny: change 2"),
        "what is known: the range: {red}"
    );
    assert!(!red.contains("Class:"), "no class: {red}");

    let farm = farm.restart(&[ALICE]).await;
    assert_eq!(farm.stage_bisected(&found(t.clone())), 1);
    assert_eq!(
        farm.stage_bisected(&found(t.clone())),
        0,
        "once per recipient"
    );
    farm.deliver().await;
    let sent = farm.server.sent();
    assert_eq!(sent.len(), 1);
    let follow_up = &sent[0];
    assert_eq!(
        follow_up.in_reply_to,
        farm.notifier.message_id("red", t.id, ALICE),
        "in the went-red mail's thread"
    );
    assert!(
        follow_up
            .subject
            .starts_with("Re: [trunkfarm] textkit went red"),
        "{follow_up:?}"
    );
    let text = mail_text(follow_up);
    assert!(
        text.contains("Bisection finished: the first bad commit is 4abcdef012."),
        "{text}"
    );
    assert!(text.contains(FIRST_BAD), "{text}");
}

#[tokio::test]
async fn notify_authors_mails_each_first_bad_commits_author_once_listing_what_it_broke() {
    let farm = Farm::configured(&[ALICE], "notify_authors = true", "");
    let textkit = went_red(&farm, "textkit", 9, Some(Class::Regressed));
    let wordkit = went_red(&farm, "wordkit", 10, Some(Class::Regressed));
    farm.stage_went_red(&textkit);
    farm.stage_went_red(&wordkit);
    // Both bisections end in one write (they shared the builds).
    let mut batch = crate::store::Batch::default();
    for t in [&textkit, &wordkit] {
        farm.notifier
            .stage_bisected(&found(t.clone()), &mut batch)
            .unwrap();
    }
    farm.notifier.table().apply(batch).unwrap();
    assert_eq!(farm.notifier.mail_authors().await.unwrap(), 1);
    assert_eq!(farm.notifier.mail_authors().await.unwrap(), 0);
    farm.deliver().await;
    let dave: Vec<Sent> = farm
        .server
        .sent()
        .into_iter()
        .filter(|m| m.to == "dave@example.org")
        .collect();
    assert_eq!(dave.len(), 1, "one mail per commit");
    assert!(
        dave[0]
            .subject
            .contains("your tiny commit 4abcdef012 broke 2 project(s)"),
        "{:?}",
        dave[0]
    );
    let text = mail_text(&dave[0]);
    assert!(text.contains("textkit on linux-x86_64"), "{text}");
    assert!(text.contains("wordkit on linux-x86_64"), "{text}");
    assert!(text.contains(FIRST_BAD), "{text}");

    // A third project found later for the same commit mails nobody again.
    let later = went_red(&farm, "textkit", 11, Some(Class::Regressed));
    farm.stage_bisected(&found(later));
    assert_eq!(farm.notifier.mail_authors().await.unwrap(), 0);
    assert!(
        farm.notifier.table().keys("a/").next().is_none(),
        "marks consumed"
    );

    // Without notify_authors, authors get nothing.
    let quiet = Farm::new(&[ALICE]);
    let t = went_red(&quiet, "textkit", 9, Some(Class::Regressed));
    quiet.stage_bisected(&found(t));
    assert_eq!(quiet.notifier.mail_authors().await.unwrap(), 0);
}

#[tokio::test]
async fn mail_classes_decide_which_went_red_is_mailed_and_how() {
    let farm = Farm::new(&[ALICE]);
    let mut project_side = went_red(&farm, "textkit", 9, Some(Class::ProjectSide));
    project_side.bisect = None;
    project_side.project_commit_changed = true;
    assert_eq!(
        farm.stage_went_red(&project_side),
        1,
        "project_side is mailed"
    );
    let mut broken = went_red(&farm, "textkit", 10, Some(Class::Broken));
    broken.bisect = None;
    assert_eq!(
        farm.stage_went_red(&broken),
        0,
        "broken is shown, not mailed"
    );
    for class in [Class::Flaky, Class::Spurious] {
        let t = went_red(&farm, "textkit", 11, Some(class));
        assert_eq!(farm.stage_went_red(&t), 0, "{class:?}");
    }
    let suspicious = went_red(&farm, "textkit", 12, Some(Class::Suspicious));
    assert_eq!(farm.stage_went_red(&suspicious), 1);
    farm.deliver().await;
    farm.set_clock(farm.now() + farm.bisect_wait());
    farm.deliver().await;
    let sent = farm.server.sent();
    assert_eq!(sent.len(), 2);
    let own = &sent[0];
    assert_eq!(
        own.subject,
        "[trunkfarm] textkit went red on linux-x86_64: its own commit bbbbbbbbbb"
    );
    let text = mail_text(own);
    assert!(
        text.contains(
            "The project's own commit bbbbbbbbbb broke it: it fails on the previous runtime too."
        ),
        "{text}"
    );
    assert!(text.contains("Class: project_side"), "{text}");
    assert!(
        !text.contains("tiny: change"),
        "no upstream commit is blamed: {text}"
    );
    assert!(!text.contains("Culprit range"), "{text}");
    assert!(mail_text(&sent[1]).contains("Class: suspicious"));

    // A project that mails only regressions.
    let farm = Farm::configured(&[ALICE], "", r#"mail_classes = ["regressed"]"#);
    let t = went_red(&farm, "textkit", 9, Some(Class::ProjectSide));
    assert_eq!(farm.stage_went_red(&t), 0);
    let t = went_red(&farm, "textkit", 10, Some(Class::Regressed));
    assert_eq!(farm.stage_went_red(&t), 1);
    let t = went_red(&farm, "textkit", 11, None);
    assert_eq!(
        farm.stage_went_red(&t),
        1,
        "unclassed results mail as before"
    );
}

#[tokio::test]
async fn a_went_red_mail_quotes_the_failing_tests_then_the_log_around_the_failure() {
    let farm = Farm::configured(&[ALICE], "", r#"fail_pattern = '^\[fail\]'"#);
    farm.run(1, false).await;
    let mut lines: Vec<String> = (1..=80).map(|i| format!("Starting test {i}")).collect();
    lines[20] = "[fail] test_wrap: width 3 != 4".into();
    farm.logs.append(log_line(2, &lines.join("\n"))).unwrap();
    farm.run(2, true).await.unwrap();
    farm.deliver().await;
    let text = mail_text(&farm.server.sent()[0]);
    assert!(
        text.contains("From the log, around the first failures:"),
        "{text}"
    );
    assert!(
        text.contains("  | [fail] test_wrap: width 3 != 4"),
        "{text}"
    );
    assert!(text.contains("  | Starting test 18"), "{text}");
    assert!(
        !text.contains("Starting test 80"),
        "not a blind tail: {text}"
    );
}

/// A log the object store cannot hand over is not quoted, and the mail
/// says so in general words: no object path or store detail to recipients.
#[tokio::test]
async fn a_went_red_mail_whose_log_is_gone_says_so_without_store_details() {
    let farm = Farm::configured(&[ALICE], "", r#"fail_pattern = '^\[fail\]'"#);
    farm.run(1, false).await;
    farm.logs
        .append(log_line(2, "[fail] test_wrap: width 3 != 4"))
        .unwrap();
    farm.logs.compact(2, 1).await.unwrap();
    let object = farm
        .store
        .dir()
        .join("test-objects")
        .join(crate::logs::object_name(2, 1));
    std::fs::remove_file(&object).unwrap();
    farm.run(2, true).await.unwrap();
    farm.deliver().await;
    let text = mail_text(&farm.server.sent()[0]);
    assert!(text.contains(crate::logs::UNREADABLE), "{text}");
    assert!(!text.contains("log.zst"), "no object path: {text}");
    assert!(!text.contains("test-objects"), "no store: {text}");
}

/// A red run's log read before results takes its write lock (as the
/// pipeline does) is what the mail quotes: composing the mail under the
/// lock does not go to the object store again.
#[tokio::test]
async fn a_went_red_mail_quotes_the_log_preloaded_before_the_record() {
    let farm = Farm::configured(&[ALICE], "", r#"fail_pattern = '^\[fail\]'"#);
    farm.run(1, false).await;
    farm.logs
        .append(log_line(2, "[fail] test_wrap: width 3 != 4"))
        .unwrap();
    farm.logs.compact(2, 1).await.unwrap();
    farm.notifier.preload_log(2).await;
    // Gone from the store after the preload: only the preload can quote it.
    let object = farm
        .store
        .dir()
        .join("test-objects")
        .join(crate::logs::object_name(2, 1));
    std::fs::remove_file(&object).unwrap();
    farm.run(2, true).await.unwrap();
    farm.deliver().await;
    let text = mail_text(&farm.server.sent()[0]);
    assert!(
        text.contains("  | [fail] test_wrap: width 3 != 4"),
        "{text}"
    );
}

/// The plain-text part of a recorded mail, decoded.
fn mail_text(mail: &Sent) -> String {
    let raw = mail.raw.replace("\r\n", "\n");
    let part = raw
        .split("Content-Type: text/plain")
        .nth(1)
        .and_then(|p| p.split("\n--").next())
        .unwrap_or(&raw);
    let (headers, body) = part.split_once("\n\n").unwrap_or(("", part));
    if headers.contains("quoted-printable") {
        decode_qp(body)
    } else if headers.contains("base64") {
        use base64::Engine;
        let joined: String = body.split_whitespace().collect();
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(joined)
                .unwrap(),
        )
        .unwrap()
    } else {
        body.to_owned()
    }
}

fn decode_qp(body: &str) -> String {
    let mut out = Vec::new();
    let bytes = body.replace("=\n", "").into_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'='
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&String::from_utf8_lossy(&bytes[i + 1..i + 3]), 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn a_fix_releases_the_went_red_mail_it_answers() {
    let farm = Farm::new(&[ALICE]);
    let red = went_red(&farm, "textkit", 9, Some(Class::Regressed));
    assert_eq!(farm.stage_went_red(&red), 1);
    farm.deliver().await;
    assert!(farm.server.sent().is_empty(), "held while bisecting");
    // Fixed before the bisection ends: the red mail goes first, then the fix
    // answering it.
    let fixed = Transition {
        id: farm.store.next_id().unwrap(),
        kind: TransitionKind::Fixed.into(),
        red_since_id: red.id,
        job_id: 10,
        bisect: None,
        ..red.clone()
    };
    assert_eq!(farm.stage_went_red(&fixed), 1);
    farm.deliver().await;
    let sent = farm.server.sent();
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert!(
        sent[0].subject.contains("went red"),
        "the red mail first: {sent:?}"
    );
    assert!(sent[1].subject.contains("fixed"), "{sent:?}");
    assert_eq!(sent[1].in_reply_to, sent[0].message_id);
}

// Self-service subscription (double opt-in).

/// The token of the confirmation link in `mail`.
fn confirm_token(mail: &Sent) -> String {
    let text = mail_text(mail);
    let (_, after) = text
        .split_once("https://farm.example.org/subscribe/confirm?token=")
        .unwrap_or_else(|| panic!("no confirmation link in {text}"));
    after
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        .collect()
}

fn client(ip: &str) -> Option<std::net::IpAddr> {
    Some(ip.parse().unwrap())
}

fn web_subscribers(farm: &Farm) -> Vec<String> {
    let mut out: Vec<String> = farm
        .notifier
        .subscriptions("textkit")
        .unwrap()
        .into_iter()
        .filter(|s| s.source == "web")
        .map(|s| s.email)
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn a_subscription_request_mails_a_link_and_only_its_post_subscribes() {
    let farm = Farm::new(&[ALICE]);
    let n = &farm.notifier;
    let to = n
        .request_subscription("textkit", "  bob@example.org ", client("192.0.2.1"))
        .await
        .unwrap();
    assert_eq!(to, BOB);
    // An address subscribed already gets the same answer (and a mail).
    assert_eq!(
        n.request_subscription("textkit", ALICE, client("192.0.2.1"))
            .await
            .unwrap(),
        ALICE
    );
    assert!(web_subscribers(&farm).is_empty(), "nothing before the link");
    // Durable before the answer: a crash now still sends both, once.
    let farm = farm.restart(&[ALICE]).await;
    assert_eq!(farm.notifier.pending_count(), 2);
    farm.deliver().await;
    farm.deliver().await;
    let sent = farm.server.sent();
    assert_eq!(recipients(&sent), [ALICE, BOB]);
    let mail = sent.iter().find(|m| m.to == BOB).unwrap();
    assert_eq!(
        mail.subject,
        "[trunkfarm] confirm your subscription to textkit"
    );
    assert!(
        mail.unsubscribe.is_empty(),
        "nothing to unsubscribe from yet"
    );
    let text = mail_text(mail);
    assert!(
        text.contains("to mail bob@example.org when textkit goes red"),
        "{text}"
    );
    assert!(text.contains("It works for 1d, until "), "{text}");
    assert!(text.contains("Nothing is subscribed until then."), "{text}");
    assert!(
        text.contains("textkit's page: https://farm.example.org/projects/textkit"),
        "{text}"
    );
    let token = confirm_token(mail);

    // What a GET shows subscribes nothing.
    let n = &farm.notifier;
    let c = n.confirmation(&token).unwrap();
    assert_eq!((c.email.as_str(), c.project.as_str()), (BOB, "textkit"));
    assert!(web_subscribers(&farm).is_empty());
    // The POST does, once however often it comes.
    let done = n.confirm_subscription(&token).await.unwrap();
    assert_eq!(
        (done.email.as_str(), done.project.as_str(), done.added),
        (BOB, "textkit", true)
    );
    assert!(!n.confirm_subscription(&token).await.unwrap().added);
    assert_eq!(web_subscribers(&farm), [BOB]);
    assert_eq!(
        n.subscriptions("textkit").unwrap().len(),
        2,
        "alice (config) and bob"
    );

    // One character changed: refused, naming nothing.
    let mut forged = token.clone().into_bytes();
    let last = forged.len() - 1;
    forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    assert!(matches!(
        n.confirm_subscription(&forged).await,
        Err(ConfirmRefused::Token(ConfirmError::Invalid))
    ));
    // A day later the link has expired and says where to ask again.
    farm.set_clock(farm.now() + DAY);
    match n.confirmation(&token) {
        Err(ConfirmRefused::Token(e @ ConfirmError::Expired { .. })) => {
            assert!(
                e.to_string().contains("subscribe again on textkit's page"),
                "{e}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(farm.server.sent().len(), 2, "nothing sent twice");
}

#[tokio::test]
async fn bad_requests_say_what_is_wrong_and_queue_nothing() {
    let farm = Farm::new(&[]);
    let n = &farm.notifier;
    for (address, says) in [
        ("", "the address is empty"),
        ("bob.example.org", "\"bob.example.org\" has no @"),
        ("bob@", "is not an email address"),
        ("a b@example.org", "is not an email address"),
    ] {
        let e = n
            .request_subscription("textkit", address, None)
            .await
            .unwrap_err();
        assert!(
            matches!(e, RequestError::BadAddress(_)),
            "{address:?}: {e:?}"
        );
        assert!(e.to_string().contains(says), "{address:?}: {e}");
    }
    let long = format!("{}@example.org", "a".repeat(250));
    assert!(
        n.request_subscription("textkit", &long, None)
            .await
            .is_err()
    );
    let e = n.request_subscription("nope", BOB, None).await.unwrap_err();
    assert!(matches!(e, RequestError::UnknownProject(_)), "{e:?}");
    assert_eq!(
        e.to_string(),
        "there is no project named \"nope\" on this hub"
    );
    assert_eq!(n.pending_count(), 0);
}

#[tokio::test]
async fn subscription_requests_are_rate_limited_per_address_and_per_client() {
    let farm = Farm::new(&[]);
    let n = &farm.notifier;
    // Three confirmation mails per address and hour, whoever asks.
    for i in 1..=3 {
        n.request_subscription("textkit", CAROL, client(&format!("198.51.100.{i}")))
            .await
            .unwrap();
    }
    let e = n
        .request_subscription("wordkit", "Carol@Example.org", client("198.51.100.9"))
        .await
        .unwrap_err();
    match &e {
        RequestError::TooMany { retry_after, .. } => {
            assert_eq!(*retry_after, Duration::from_secs(20 * 60))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        e.to_string(),
        "too many confirmation mails went to this address lately; try again in 20m"
    );
    assert_eq!(n.pending_count(), 3);
    // Ten requests per client and hour, an IPv6 client counted by its /64.
    for i in 0..10 {
        n.request_subscription(
            "textkit",
            &format!("dev{i}@example.org"),
            client("2001:db8:1:2::1"),
        )
        .await
        .unwrap();
    }
    let e = n
        .request_subscription(
            "textkit",
            "other@example.org",
            client("2001:db8:1:2:ffff::7"),
        )
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("too many subscription requests from your network; try again in "),
        "{e}"
    );
    // A refused client does not use up the address's allowance.
    n.request_subscription("textkit", "other@example.org", client("2001:db8:1:3::1"))
        .await
        .unwrap();
    assert_eq!(n.pending_count(), 14);
}

#[tokio::test]
async fn with_self_subscribe_off_the_operator_subscribes_people() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("db")).unwrap();
    let clock = Arc::new(AtomicU64::new(now_ms()));
    let config = config_with(dir.path(), &[], "", "[notify]\nself_subscribe = false\n");
    let farm = Farm::with_config(dir, store, clock, config);
    let n = &farm.notifier;
    let e = n
        .request_subscription("textkit", BOB, None)
        .await
        .unwrap_err();
    assert!(matches!(e, RequestError::Off), "{e:?}");
    assert!(e.to_string().contains("operator subscribes people"), "{e}");
    // A link mailed before it was turned off no longer subscribes.
    let token = n.inner.key.sign_confirm(&token::Confirm {
        email: BOB.into(),
        project: "textkit".into(),
        issued_at_ms: farm.now(),
        expires_at_ms: farm.now() + DAY,
    });
    assert!(matches!(
        n.confirm_subscription(&token).await,
        Err(ConfirmRefused::Off)
    ));
    assert!(n.subscriptions("textkit").unwrap().is_empty());
    assert_eq!(n.pending_count(), 0);
}

#[tokio::test]
async fn a_confirmation_link_mailed_before_an_unsubscribe_no_longer_subscribes() {
    let farm = Farm::new(&[]);
    let n = &farm.notifier;
    n.request_subscription("textkit", BOB, client("192.0.2.1"))
        .await
        .unwrap();
    farm.deliver().await;
    let sent = farm.server.sent();
    let old = confirm_token(sent.iter().find(|m| m.to == BOB).unwrap());
    assert!(n.confirm_subscription(&old).await.unwrap().added);
    assert_eq!(web_subscribers(&farm), [BOB]);
    // Bob unsubscribes (the link in a mail, or the operator).
    farm.set_clock(farm.now() + 1000);
    let bob = Subscription {
        email: BOB.into(),
        project: "textkit".into(),
        ..Default::default()
    };
    assert!(n.unsubscribe(&bob).await.unwrap());
    assert_eq!(
        n.unsubscribed_at("textkit", "Bob@Example.org").unwrap(),
        Some(farm.now())
    );
    // The old link, still within its lifetime, neither shows nor subscribes.
    farm.set_clock(farm.now() + 1000);
    for refused in [
        n.confirmation(&old).map(|_| ()),
        n.confirm_subscription(&old).await.map(|_| ()),
    ] {
        match refused {
            Err(e @ ConfirmRefused::UnsubscribedSince { .. }) => assert_eq!(
                e.to_string(),
                "you unsubscribed from textkit after this link was sent; subscribe again on textkit's page"
            ),
            other => panic!("{other:?}"),
        }
    }
    assert!(web_subscribers(&farm).is_empty());
    // A link asked for after the unsubscribe works.
    n.request_subscription("textkit", BOB, client("192.0.2.1"))
        .await
        .unwrap();
    farm.deliver().await;
    let sent = farm.server.sent();
    let new = confirm_token(sent.iter().rfind(|m| m.to == BOB).unwrap());
    assert_ne!(new, old);
    assert!(n.confirm_subscription(&new).await.unwrap().added);
    assert_eq!(web_subscribers(&farm), [BOB]);
}

// ---- Retention (issue 16 item 4) ----

/// Delivered mails of transitions retention no longer keeps go with their
/// dedupe marks; an open went-red's mail (its reminders thread on it) and
/// its mark stay; pending mails stay; an unsubscribe time goes once no
/// confirmation link from before it can still be followed.
#[tokio::test]
async fn delivered_mails_of_closed_went_reds_go_those_of_an_open_one_stay() {
    let farm = Farm::new(&[ALICE]);
    farm.notifier.subscribe(subscription(BOB)).await.unwrap();
    farm.run(1, false).await;
    let first = farm.run(2, true).await.unwrap();
    farm.deliver().await;
    let fixed = farm.run(3, false).await.unwrap();
    farm.deliver().await;
    let open = farm.run(4, true).await.unwrap();
    farm.deliver().await;
    assert_eq!(farm.outbox(MailState::Sent).len(), 6);
    farm.run(5, false).await;
    assert_eq!(
        farm.outbox(MailState::Pending).len(),
        2,
        "the fix, not sent yet"
    );

    let kept: HashSet<u64> = [open.id].into();
    let later = farm.clock.load(Ordering::SeqCst) + 1;
    let (removed, next) = farm.notifier.prune_mails(later, &kept, 0, 3).await.unwrap();
    assert_eq!(removed, 3, "at most max a step");
    let (more, _) = farm
        .notifier
        .prune_mails(later, &kept, next.unwrap(), 100)
        .await
        .unwrap();
    assert_eq!(removed + more, 4, "the first went red's and the fix's");
    let sent = farm.outbox(MailState::Sent);
    assert_eq!(sent.len(), 2);
    assert!(
        sent.iter().all(|m| m.event == transition_event(open.id)),
        "{sent:?}"
    );
    assert_eq!(farm.outbox(MailState::Pending).len(), 2);
    let table = farm.notifier.table();
    for (t, marks) in [(first.id, 0), (fixed.id, 0), (open.id, 2)] {
        let n = table.keys(format!("e/t{t}/")).count();
        assert_eq!(n, marks, "transition {t}'s dedupe marks");
    }

    // An unsubscribe time: kept while a link mailed before it may still
    // be followed (`subscribe_link_ttl`), then gone.
    let sub = subscription(BOB);
    farm.notifier.unsubscribe(&sub).await.unwrap();
    let now = farm.clock.load(Ordering::SeqCst);
    assert_eq!(
        farm.notifier
            .prune_unsubscribed(now + 1, 100)
            .await
            .unwrap(),
        0
    );
    farm.clock.store(now + 2 * 86_400_000, Ordering::SeqCst);
    assert_eq!(
        farm.notifier
            .prune_unsubscribed(now + 1, 100)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        farm.notifier
            .unsubscribed_at(&sub.project, &sub.email)
            .unwrap(),
        None
    );
}
