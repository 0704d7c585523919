//! Messages waiting to go to the hub.
//!
//! The session never blocks on the network: what it wants to send goes here
//! and is handed to the current connection as fast as that connection takes
//! it. Two queues keep small control messages (heartbeats, job starts, the
//! draining notice) from waiting behind megabytes of logs, while log chunks
//! and results share one queue so a job's log always precedes its result.
//!
//! While the agent is disconnected, log chunks pile up here (capped: the
//! oldest are dropped beyond the cap, and the drop is counted) and go out
//! after the next welcome. Everything else is regenerated on reconnect (the
//! hello lists running jobs; unacknowledged results are resent from the
//! result store), so a disconnect discards it.

use std::collections::VecDeque;

use trunkfarm_proto::v1::agent_message::Msg;
use trunkfarm_proto::v1::{AgentMessage, Heartbeat, JobRef, JobResult, LogChunk};

/// Default cap on buffered log bytes.
pub(crate) const LOG_BUFFER_CAP: usize = 16 * 1024 * 1024;

/// Outbound messages not yet handed to a connection.
#[derive(Debug)]
pub(crate) struct Outbox {
    /// Heartbeats, job starts, draining: sent first.
    control: VecDeque<Msg>,
    /// Log chunks and results, in the order they happened.
    data: VecDeque<Msg>,
    /// Bytes of log data in `data`.
    log_bytes: usize,
    /// Most log bytes kept.
    cap: usize,
    /// Log chunks dropped since [`Outbox::take_dropped`] was last called.
    dropped_chunks: u64,
    /// Their bytes.
    dropped_bytes: u64,
}

impl Outbox {
    /// An empty outbox keeping at most `cap` bytes of log data.
    pub fn new(cap: usize) -> Self {
        Outbox {
            control: VecDeque::new(),
            data: VecDeque::new(),
            log_bytes: 0,
            cap,
            dropped_chunks: 0,
            dropped_bytes: 0,
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

    /// Queues a log chunk, dropping the oldest buffered chunks if the log
    /// data goes over the cap. Returns true if this push dropped something
    /// and nothing had been dropped since the last [`Outbox::take_dropped`]
    /// (so the caller can say so once, not per chunk).
    pub fn push_log(&mut self, chunk: LogChunk) -> bool {
        let first_drop = self.dropped_chunks == 0;
        self.log_bytes += chunk.data.len();
        self.data.push_back(Msg::Log(chunk));
        let mut dropped = false;
        while self.log_bytes > self.cap {
            let Some(i) = self.data.iter().position(|m| matches!(m, Msg::Log(_))) else {
                break;
            };
            if let Some(Msg::Log(old)) = self.data.remove(i) {
                self.log_bytes -= old.data.len();
                self.dropped_chunks += 1;
                self.dropped_bytes += old.data.len() as u64;
                dropped = true;
            }
        }
        dropped && first_drop
    }

    /// Queues a job's result (after the log chunks already queued).
    pub fn push_result(&mut self, result: JobResult) {
        self.data.push_back(Msg::Result(result));
    }

    /// Queues a result ahead of every log chunk and result already queued:
    /// for a result whose job has no buffered chunk, so it frees the job's
    /// lease without waiting behind other jobs' logs.
    pub fn push_result_first(&mut self, result: JobResult) {
        self.data.push_front(Msg::Result(result));
    }

    /// True if `job`'s result is queued.
    pub fn has_result(&self, job: &JobRef) -> bool {
        self.data
            .iter()
            .any(|m| matches!(m, Msg::Result(r) if r.job.as_ref() == Some(job)))
    }

    /// True if log chunks of `job` are queued (its result must follow them).
    pub fn has_logs_of(&self, job: &JobRef) -> bool {
        self.data
            .iter()
            .any(|m| matches!(m, Msg::Log(c) if c.job.as_ref() == Some(job)))
    }

    /// The next message to send: control first.
    pub fn pop(&mut self) -> Option<AgentMessage> {
        let msg = match self.control.pop_front() {
            Some(msg) => msg,
            None => {
                let msg = self.data.pop_front()?;
                if let Msg::Log(chunk) = &msg {
                    self.log_bytes -= chunk.data.len();
                }
                msg
            }
        };
        Some(AgentMessage { msg: Some(msg) })
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.control.is_empty() && self.data.is_empty()
    }

    /// Bytes of log data waiting.
    pub fn log_bytes(&self) -> usize {
        self.log_bytes
    }

    /// The connection is gone: keep only the log chunks (everything else is
    /// sent again, fresh, after the next welcome).
    pub fn disconnected(&mut self) {
        self.control.clear();
        self.data.retain(|m| matches!(m, Msg::Log(_)));
    }

    /// The hub acknowledged `job`'s result: a copy still queued (a resend)
    /// need not go.
    pub fn forget_result(&mut self, job: &JobRef) {
        self.data
            .retain(|m| !matches!(m, Msg::Result(r) if r.job.as_ref() == Some(job)));
    }

    /// Log chunks and bytes dropped since the last call, and resets them.
    pub fn take_dropped(&mut self) -> (u64, u64) {
        let counts = (self.dropped_chunks, self.dropped_bytes);
        self.dropped_chunks = 0;
        self.dropped_bytes = 0;
        counts
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

    #[test]
    fn control_goes_first_and_logs_precede_results() {
        let mut o = Outbox::new(1000);
        o.push_log(log(1, 1, 10));
        o.push_result(result(1));
        o.push_control(Msg::Started(JobStarted { job: Some(job(2)) }));
        o.push_heartbeat(Heartbeat { running: vec![] });
        o.push_heartbeat(Heartbeat {
            running: vec![job(2)],
        });
        let out = drain(&mut o);
        assert_eq!(out.len(), 4, "{out:?}");
        assert!(matches!(out[0], Msg::Started(_)));
        assert!(matches!(&out[1], Msg::Heartbeat(h) if h.running == [job(2)]));
        assert!(matches!(out[2], Msg::Log(_)));
        assert!(matches!(out[3], Msg::Result(_)));
        assert!(o.is_empty());
        assert_eq!(o.log_bytes(), 0);
    }

    #[test]
    fn cap_drops_the_oldest_log_chunks_and_counts_them() {
        let mut o = Outbox::new(100);
        o.push_result(result(9));
        assert!(!o.push_log(log(1, 1, 40)));
        assert!(!o.push_log(log(1, 2, 40)));
        // Over the cap: seq 1 goes, once reported.
        assert!(o.push_log(log(1, 3, 40)));
        assert!(!o.push_log(log(1, 4, 40)), "reported once");
        assert_eq!(o.log_bytes(), 80);
        assert_eq!(o.take_dropped(), (2, 80));
        assert_eq!(o.take_dropped(), (0, 0));
        let out = drain(&mut o);
        // The result is never dropped.
        assert!(matches!(out[0], Msg::Result(_)));
        let seqs: Vec<u64> = out
            .iter()
            .filter_map(|m| match m {
                Msg::Log(c) => Some(c.seq),
                _ => None,
            })
            .collect();
        assert_eq!(seqs, [3, 4]);
    }

    #[test]
    fn disconnect_keeps_only_logs() {
        let mut o = Outbox::new(1000);
        o.push_control(Msg::Draining(Draining {}));
        o.push_log(log(1, 1, 5));
        o.push_result(result(1));
        o.push_log(log(2, 1, 5));
        o.disconnected();
        let out = drain(&mut o);
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|m| matches!(m, Msg::Log(_))));
    }

    #[test]
    fn results_can_jump_the_log_queue() {
        let mut o = Outbox::new(1000);
        o.push_log(log(1, 1, 5));
        assert!(o.has_logs_of(&job(1)));
        assert!(!o.has_logs_of(&job(2)));
        o.push_result(result(1));
        o.push_result_first(result(2));
        assert!(o.has_result(&job(1)) && o.has_result(&job(2)));
        assert!(!o.has_result(&job(3)));
        let out = drain(&mut o);
        assert!(matches!(&out[0], Msg::Result(r) if r.job == Some(job(2))));
        assert!(matches!(out[1], Msg::Log(_)));
        assert!(matches!(&out[2], Msg::Result(r) if r.job == Some(job(1))));
    }

    #[test]
    fn acknowledged_results_are_not_resent() {
        let mut o = Outbox::new(1000);
        o.push_result(result(1));
        o.push_result(result(2));
        o.forget_result(&job(1));
        let out = drain(&mut o);
        assert_eq!(out.len(), 1);
        assert!(matches!(&out[0], Msg::Result(r) if r.job == Some(job(2))));
    }
}
