//! Messages waiting to go to the hub, and the log chunks the hub may still
//! need.
//!
//! The session never blocks on the network: what it wants to send goes here
//! and is handed to the current connection as fast as that connection takes
//! it. Two queues keep small control messages (heartbeats, job starts, the
//! draining notice) from waiting behind megabytes of logs, while log chunks
//! and results share one queue so a job's log always precedes its result.
//!
//! A log chunk handed to a connection is not safe yet: it is lost if the link
//! drops while it is in flight, and the hub stores chunks without waiting for
//! its disk, so a hub killed before its next commit forgets chunks it already
//! showed to watchers. The first moment the agent knows an attempt's chunks
//! are durable is the hub's acknowledgement of the attempt's result: the hub
//! stores the chunks that precede a result on its stream before recording the
//! result, and that record's commit makes them durable. So each attempt's
//! chunks are *kept* here, by seq, until [`Outbox::forget`] (the result was
//! acknowledged: recorded, or refused for good), and [`Outbox::welcomed`]
//! queues them all again after every welcome, in seq order, each attempt's
//! before its result. The hub stores a (job, attempt, seq) once, so a chunk
//! it already has costs only bandwidth. A running job's new chunks are kept
//! and queued behind the resent ones, so it keeps streaming live.
//!
//! Memory: an attempt's chunks are bounded by the agent's output cap (the
//! executor keeps a head and a tail of at most `output_cap` bytes plus a
//! cut notice, see `output.rs`); [`kept_log_bound`] adds [`KEPT_LOG_SLACK`]
//! to it, and a chunk past that bound is dropped and reported (it cannot
//! happen unless the executor breaks its cap). Kept attempts are the running
//! jobs and those whose result is unacknowledged, so the total is at most
//! (running + unacknowledged) × the bound. The queue itself holds references
//! to kept chunks, not copies.
//!
//! Whatever else is queued is regenerated on reconnect (the hello lists
//! running jobs; unacknowledged results are resent from the result store),
//! so a disconnect discards it.

use std::collections::{BTreeMap, VecDeque};

use trunkfarm_proto::v1::agent_message::Msg;
use trunkfarm_proto::v1::{AgentMessage, Heartbeat, JobRef, JobResult, LogChunk};

use crate::output::MAX_CHUNK;
use crate::results::{JobKey, key};

/// Room above the output cap for one attempt's kept chunks (the cap's cut
/// notice and rounding of the head and tail halves).
pub(crate) const KEPT_LOG_SLACK: usize = MAX_CHUNK;

/// Most log bytes kept per attempt for an agent whose output cap is
/// `output_cap` (0, no cap, keeps everything).
pub(crate) fn kept_log_bound(output_cap: u64) -> usize {
    if output_cap == 0 {
        return usize::MAX;
    }
    usize::try_from(output_cap)
        .unwrap_or(usize::MAX)
        .saturating_add(KEPT_LOG_SLACK)
}

/// One attempt's chunks, kept until its result is acknowledged.
#[derive(Debug, Default)]
struct KeptLog {
    /// By seq.
    chunks: BTreeMap<u64, LogChunk>,
    /// Their bytes.
    bytes: usize,
    /// Chunks dropped past the bound.
    dropped: u64,
}

/// An entry of the data queue.
#[derive(Debug)]
enum Data {
    /// A kept chunk, by reference.
    Log {
        /// Its attempt.
        job: JobKey,
        /// Its seq.
        seq: u64,
        /// Its bytes.
        len: usize,
    },
    /// A result.
    Result(JobResult),
}

/// Outbound messages not yet handed to a connection, and the kept logs.
#[derive(Debug)]
pub(crate) struct Outbox {
    /// Heartbeats, job starts, draining: sent first.
    control: VecDeque<Msg>,
    /// Log chunks and results, in the order they are to go.
    data: VecDeque<Data>,
    /// Bytes of the log chunks in `data`.
    queued_log_bytes: usize,
    /// Each attempt's chunks until its result is acknowledged.
    kept: BTreeMap<JobKey, KeptLog>,
    /// Most bytes kept per attempt.
    per_attempt: usize,
    /// A welcomed session is up: new chunks are queued as well as kept.
    up: bool,
}

impl Outbox {
    /// An empty outbox keeping at most `per_attempt` bytes of each
    /// attempt's log (see [`kept_log_bound`]). Nothing is queued before
    /// the first [`Outbox::welcomed`].
    pub fn new(per_attempt: usize) -> Self {
        Outbox {
            control: VecDeque::new(),
            data: VecDeque::new(),
            queued_log_bytes: 0,
            kept: BTreeMap::new(),
            per_attempt,
            up: false,
        }
    }

    /// Queues a control message (job started, draining).
    pub fn push_control(&mut self, msg: Msg) {
        self.control.push_back(msg);
    }

    /// Queues a heartbeat, replacing one still waiting: only the newest
    /// list of running jobs matters.
    pub fn push_heartbeat(&mut self, heartbeat: Heartbeat) {
        self.control.retain(|m| !matches!(m, Msg::Heartbeat(_)));
        self.control.push_back(Msg::Heartbeat(heartbeat));
    }

    /// Queues an offer of slots, replacing one still waiting: only the
    /// newest offer matters.
    pub fn push_slots(&mut self, slots: trunkfarm_proto::v1::Slots) {
        self.control.retain(|m| !matches!(m, Msg::Slots(_)));
        self.control.push_back(Msg::Slots(slots));
    }

    /// Keeps a log chunk until its attempt's result is acknowledged, and
    /// queues it if a session is up (otherwise the next welcome does). A
    /// chunk past the attempt's bound is dropped: returns true for the
    /// first such drop of an attempt (so the caller says so once).
    pub fn push_log(&mut self, chunk: LogChunk) -> bool {
        let Some(job) = chunk.job.as_ref().map(key) else {
            return false;
        };
        let (seq, len) = (chunk.seq, chunk.data.len());
        let log = self.kept.entry(job).or_default();
        if log.chunks.contains_key(&seq) {
            return false;
        }
        if log.bytes.saturating_add(len) > self.per_attempt {
            log.dropped += 1;
            return log.dropped == 1;
        }
        log.bytes += len;
        log.chunks.insert(seq, chunk);
        if self.up {
            self.queued_log_bytes += len;
            self.data.push_back(Data::Log { job, seq, len });
        }
        false
    }

    /// Keeps chunks saved by an earlier run of the agent (with their
    /// result, not yet acknowledged); they go after the next welcome. Not
    /// held to the bound: they were within the cap of the run that made them.
    pub fn restore(&mut self, chunks: impl IntoIterator<Item = LogChunk>) {
        for chunk in chunks {
            let Some(job) = chunk.job.as_ref().map(key) else {
                continue;
            };
            let log = self.kept.entry(job).or_default();
            let len = chunk.data.len();
            if let Some(old) = log.chunks.insert(chunk.seq, chunk) {
                log.bytes -= old.data.len();
            }
            log.bytes += len;
        }
    }

    /// The chunks kept for `job`, in seq order (what the result store saves
    /// beside its result).
    pub fn kept_chunks(&self, job: &JobRef) -> impl Iterator<Item = &LogChunk> {
        self.kept
            .get(&key(job))
            .into_iter()
            .flat_map(|log| log.chunks.values())
    }

    /// Log chunks of `job` dropped past the bound.
    #[cfg(test)]
    pub fn dropped_chunks(&self, job: &JobRef) -> u64 {
        self.kept.get(&key(job)).map_or(0, |log| log.dropped)
    }

    /// Queues a job's result (after the log chunks already queued).
    pub fn push_result(&mut self, result: JobResult) {
        self.data.push_back(Data::Result(result));
    }

    /// True if `job`'s result is queued.
    pub fn has_result(&self, job: &JobRef) -> bool {
        self.data
            .iter()
            .any(|m| matches!(m, Data::Result(r) if r.job.as_ref() == Some(job)))
    }

    /// The next message to send: control first.
    pub fn pop(&mut self) -> Option<AgentMessage> {
        if let Some(msg) = self.control.pop_front() {
            return Some(AgentMessage { msg: Some(msg) });
        }
        loop {
            let msg = match self.data.pop_front()? {
                Data::Result(result) => Msg::Result(result),
                Data::Log { job, seq, len } => {
                    self.queued_log_bytes -= len;
                    // Gone only if forgotten (an entry is removed with it).
                    let Some(chunk) = self.kept.get(&job).and_then(|l| l.chunks.get(&seq)) else {
                        continue;
                    };
                    Msg::Log(chunk.clone())
                }
            };
            return Some(AgentMessage { msg: Some(msg) });
        }
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.control.is_empty() && self.data.is_empty()
    }

    /// Bytes of log data queued (not yet handed to a connection).
    pub fn log_bytes(&self) -> usize {
        self.queued_log_bytes
    }

    /// Bytes of log data kept, queued or not.
    pub fn kept_bytes(&self) -> usize {
        self.kept.values().map(|l| l.bytes).sum()
    }

    /// The connection is gone: drop the queues (the kept chunks stay and
    /// go again after the next welcome, with everything else).
    pub fn disconnected(&mut self) {
        self.up = false;
        self.control.clear();
        self.data.clear();
        self.queued_log_bytes = 0;
    }

    /// The hub welcomed a new session: queue everything it may have missed.
    /// `results` are the unacknowledged results; `held` the attempts the
    /// agent still holds (running or unacknowledged), whose kept chunks
    /// are all queued again, in seq order, each attempt's result right
    /// after them. Results of attempts without a kept chunk go first (they
    /// free leases without waiting behind logs). Kept chunks of an attempt
    /// not held any more are dropped.
    pub fn welcomed<'a>(
        &mut self,
        results: impl IntoIterator<Item = &'a JobResult>,
        held: &[JobRef],
    ) {
        self.up = true;
        self.data.clear();
        self.queued_log_bytes = 0;
        let held: Vec<JobKey> = held.iter().map(key).collect();
        self.kept.retain(|job, _| held.contains(job));
        let mut behind: BTreeMap<JobKey, JobResult> = BTreeMap::new();
        for result in results {
            let Some(job) = result.job.as_ref().map(key) else {
                continue;
            };
            if self.kept.get(&job).is_some_and(|l| !l.chunks.is_empty()) {
                behind.insert(job, result.clone());
            } else {
                self.data.push_back(Data::Result(result.clone()));
            }
        }
        for (&job, log) in &self.kept {
            for (&seq, chunk) in &log.chunks {
                let len = chunk.data.len();
                self.queued_log_bytes += len;
                self.data.push_back(Data::Log { job, seq, len });
            }
            if let Some(result) = behind.remove(&job) {
                self.data.push_back(Data::Result(result));
            }
        }
    }

    /// The hub acknowledged `job`'s result (recorded it, or refused it for
    /// good): its kept chunks, and whatever of it is still queued, need not
    /// go any more.
    pub fn forget(&mut self, job: &JobRef) {
        let k = key(job);
        self.kept.remove(&k);
        let mut freed = 0;
        self.data.retain(|m| match m {
            Data::Log { job, len, .. } if *job == k => {
                freed += len;
                false
            }
            Data::Result(r) => r.job.as_ref().map(key) != Some(k),
            Data::Log { .. } => true,
        });
        self.queued_log_bytes -= freed;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trunkfarm_proto::v1::{Draining, JobStarted};

    fn job(id: u64) -> JobRef {
        JobRef {
            job_id: id,
            attempt: 1,
        }
    }

    fn log(id: u64, seq: u64, len: usize) -> LogChunk {
        LogChunk {
            job: Some(job(id)),
            seq,
            stream: 1,
            data: vec![b'x'; len],
        }
    }

    fn result(id: u64) -> JobResult {
        JobResult {
            job: Some(job(id)),
            ..JobResult::default()
        }
    }

    fn drain(o: &mut Outbox) -> Vec<Msg> {
        std::iter::from_fn(|| o.pop().and_then(|m| m.msg)).collect()
    }

    /// What `msgs` say, briefly: `L<job>.<seq>`, `R<job>`, or the kind.
    fn brief(msgs: &[Msg]) -> Vec<String> {
        msgs.iter()
            .map(|m| match m {
                Msg::Log(c) => format!("L{}.{}", c.job.unwrap().job_id, c.seq),
                Msg::Result(r) => format!("R{}", r.job.unwrap().job_id),
                Msg::Heartbeat(_) => "heartbeat".into(),
                Msg::Started(_) => "started".into(),
                Msg::Draining(_) => "draining".into(),
                Msg::Hello(_) => "hello".into(),
                Msg::Paused(_) => "paused".into(),
                Msg::Slots(s) => format!("slots{}", s.offered),
            })
            .collect()
    }

    /// An outbox with a welcomed session and nothing pending.
    fn up(cap: usize) -> Outbox {
        let mut o = Outbox::new(cap);
        o.welcomed([], &[]);
        o
    }

    #[test]
    fn control_goes_first_and_logs_precede_results() {
        let mut o = up(1000);
        o.push_log(log(1, 1, 10));
        o.push_result(result(1));
        o.push_control(Msg::Started(JobStarted { job: Some(job(2)) }));
        o.push_heartbeat(Heartbeat { running: vec![] });
        o.push_heartbeat(Heartbeat {
            running: vec![job(2)],
        });
        // Only the newest offer of slots goes.
        o.push_slots(trunkfarm_proto::v1::Slots { offered: 1 });
        o.push_slots(trunkfarm_proto::v1::Slots { offered: 3 });
        let out = drain(&mut o);
        assert_eq!(brief(&out[2..3]), ["slots3"], "{out:?}");
        let out: Vec<Msg> = out
            .into_iter()
            .filter(|m| !matches!(m, Msg::Slots(_)))
            .collect();
        assert_eq!(out.len(), 4, "{out:?}");
        assert!(matches!(out[0], Msg::Started(_)));
        assert!(matches!(&out[1], Msg::Heartbeat(h) if h.running == [job(2)]));
        assert!(matches!(out[2], Msg::Log(_)));
        assert!(matches!(out[3], Msg::Result(_)));
        assert!(o.is_empty());
        assert_eq!(o.log_bytes(), 0);
    }

    #[test]
    fn sent_chunks_are_kept_until_the_result_is_acknowledged() {
        let mut o = up(1000);
        o.push_log(log(1, 1, 10));
        o.push_log(log(1, 2, 20));
        o.push_result(result(1));
        assert_eq!(o.log_bytes(), 30);
        assert_eq!(brief(&drain(&mut o)), ["L1.1", "L1.2", "R1"]);
        // Handed to the connection, but still kept.
        assert_eq!(o.log_bytes(), 0);
        assert_eq!(o.kept_bytes(), 30);
        let seqs: Vec<u64> = o.kept_chunks(&job(1)).map(|c| c.seq).collect();
        assert_eq!(seqs, [1, 2]);
        o.forget(&job(1));
        assert_eq!(o.kept_bytes(), 0);
        assert_eq!(o.kept_chunks(&job(1)).count(), 0);
        // A later session sends nothing of it.
        o.disconnected();
        o.welcomed([], &[job(1)]);
        assert!(drain(&mut o).is_empty());
    }

    #[test]
    fn after_a_reconnect_kept_chunks_go_again_in_order_before_their_result() {
        let mut o = up(1000);
        // Job 1 finished; job 2 still runs; job 3 finished without a log.
        o.push_log(log(1, 1, 5));
        o.push_log(log(2, 1, 5));
        o.push_log(log(1, 2, 5));
        o.push_result(result(1));
        o.push_control(Msg::Draining(Draining {}));
        // Some of it went out, then the link dropped.
        let first: Vec<Msg> = (0..3).filter_map(|_| o.pop().and_then(|m| m.msg)).collect();
        assert_eq!(brief(&first), ["draining", "L1.1", "L2.1"]);
        o.disconnected();
        assert!(o.is_empty() && o.log_bytes() == 0);
        // While down: kept, not queued.
        o.push_log(log(2, 2, 5));
        o.push_log(log(1, 3, 5));
        assert!(o.is_empty());
        let results = [result(1), result(3)];
        o.welcomed(&results, &[job(1), job(2), job(3)]);
        assert_eq!(o.log_bytes(), 25);
        // Still running: job 2's next chunk streams behind the resent ones.
        o.push_log(log(2, 3, 5));
        assert_eq!(
            brief(&drain(&mut o)),
            ["R3", "L1.1", "L1.2", "L1.3", "R1", "L2.1", "L2.2", "L2.3"]
        );
        // Every reconnect resends until the acknowledgement.
        o.disconnected();
        o.welcomed(&results[..1], &[job(1), job(2)]);
        o.forget(&job(1));
        assert_eq!(brief(&drain(&mut o)), ["L2.1", "L2.2", "L2.3"]);
        assert_eq!(o.log_bytes(), 0);
    }

    #[test]
    fn an_acknowledgement_drops_what_is_still_queued_of_the_job() {
        let mut o = up(1000);
        o.push_log(log(1, 1, 5));
        o.push_log(log(2, 1, 7));
        o.push_result(result(1));
        o.push_result(result(2));
        assert!(o.has_result(&job(1)) && o.has_result(&job(2)));
        assert!(!o.has_result(&job(3)));
        o.forget(&job(1));
        assert_eq!(o.log_bytes(), 7);
        assert_eq!(brief(&drain(&mut o)), ["L2.1", "R2"]);
    }

    #[test]
    fn chunks_past_the_bound_are_dropped_and_reported_once_per_attempt() {
        let mut o = up(100);
        assert!(!o.push_log(log(1, 1, 60)));
        assert!(!o.push_log(log(1, 2, 40)));
        assert!(o.push_log(log(1, 3, 1)), "the first drop is reported");
        assert!(!o.push_log(log(1, 4, 1)), "once");
        assert!(
            !o.push_log(log(2, 1, 100)),
            "each attempt has its own bound"
        );
        assert_eq!(o.dropped_chunks(&job(1)), 2);
        assert_eq!(o.kept_bytes(), 200);
        assert_eq!(brief(&drain(&mut o)), ["L1.1", "L1.2", "L2.1"]);
        assert_eq!(kept_log_bound(4096), 4096 + KEPT_LOG_SLACK);
        assert_eq!(kept_log_bound(0), usize::MAX);
    }

    #[test]
    fn restored_chunks_go_after_the_welcome_and_attempts_not_held_are_dropped() {
        let mut o = Outbox::new(10);
        // Saved by an earlier run; more than the bound of this one.
        o.restore([log(4, 2, 30), log(4, 1, 30)]);
        o.restore([log(5, 1, 3)]);
        assert!(o.is_empty());
        o.welcomed(&[result(4)], &[job(4)]);
        assert_eq!(brief(&drain(&mut o)), ["L4.1", "L4.2", "R4"]);
        assert_eq!(o.kept_chunks(&job(5)).count(), 0);
    }
}
