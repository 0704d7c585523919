//! Job logs: stored per (job, attempt, seq) in the `logs` tree, and fanned out
//! live to whoever watches a job (`trunkfarm job run`, the dashboard).
//!
//! Chunks are written without waiting for the disk: the result that ends an
//! attempt arrives after its chunks on the same ordered stream, and its commit
//! makes them durable too (sled persists writes in order).

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::broadcast;
use trunkfarm_proto::v1::{JobRef, LogChunk, LogStream};

use crate::store::{Store, StoreError, trees};

/// Live events for one job's watchers.
#[derive(Clone, Debug)]
pub enum WatchEvent {
    /// A chunk was stored.
    Log(LogChunk),
    /// The job finished; read its final record.
    Finished,
}

/// How many live events a slow watcher may lag behind before it re-reads
/// from the store.
const WATCH_BUFFER_EVENTS: usize = 256;

/// Owner of the `logs` tree and of the live watchers.
pub struct JobLogs {
    store: Store,
    tree: sled::Tree,
    /// Log bytes the hub keeps per attempt; beyond it chunks are dropped
    /// (agents cap their own output well below; this guards the hub).
    max_bytes: u64,
    live: Mutex<HashMap<u64, broadcast::Sender<WatchEvent>>>,
    sizes: Mutex<HashMap<(u64, u32), u64>>,
}

fn key(job_id: u64, attempt: u32, seq: u64) -> [u8; 20] {
    let mut k = [0u8; 20];
    k[..8].copy_from_slice(&job_id.to_be_bytes());
    k[8..12].copy_from_slice(&attempt.to_be_bytes());
    k[12..].copy_from_slice(&seq.to_be_bytes());
    k
}

impl JobLogs {
    /// Opens the `logs` tree.
    pub fn open(store: &Store, max_bytes: u64) -> Result<JobLogs, StoreError> {
        Ok(JobLogs {
            store: store.clone(),
            tree: store.tree(trees::LOGS)?,
            max_bytes,
            live: Mutex::new(HashMap::new()),
            sizes: Mutex::new(HashMap::new()),
        })
    }

    /// Stores a chunk (idempotent per seq) and shows it to live watchers.
    pub fn append(&self, chunk: LogChunk) -> Result<(), StoreError> {
        let Some(job) = chunk.job else {
            return Ok(());
        };
        let over_cap = {
            let mut sizes = self.sizes.lock().unwrap_or_else(|p| p.into_inner());
            let used = sizes.entry((job.job_id, job.attempt)).or_insert(0);
            let before = *used;
            *used = used.saturating_add(chunk.data.len() as u64);
            if before >= self.max_bytes {
                return Ok(());
            }
            *used > self.max_bytes
        };
        let mut value = Vec::with_capacity(chunk.data.len() + 1);
        value.push(chunk.stream as u8);
        value.extend_from_slice(&chunk.data);
        if over_cap {
            value.extend_from_slice(
                format!(
                    "\n[trunkfarm hub: log reached the hub's limit of {} bytes; the rest is dropped]\n",
                    self.max_bytes
                )
                .as_bytes(),
            );
        }
        self.tree
            .insert(key(job.job_id, job.attempt, chunk.seq), value)
            .map_err(|e| self.store.err(e))?;
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = live.get(&job.job_id) {
            let _ = tx.send(WatchEvent::Log(chunk));
        }
        Ok(())
    }

    /// Stored chunks of a job, in order; only `attempt` if given.
    pub fn read(&self, job_id: u64, attempt: Option<u32>) -> Result<Vec<LogChunk>, StoreError> {
        let prefix: Vec<u8> = match attempt {
            Some(a) => key(job_id, a, 0)[..12].to_vec(),
            None => job_id.to_be_bytes().to_vec(),
        };
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(prefix) {
            let (k, v) = item.map_err(|e| self.store.err(e))?;
            if k.len() != 20 || v.is_empty() {
                return Err(self.store.corrupt("logs", "malformed log key or value"));
            }
            let attempt = u32::from_be_bytes([k[8], k[9], k[10], k[11]]);
            let mut seq = [0u8; 8];
            seq.copy_from_slice(&k[12..]);
            out.push(LogChunk {
                job: Some(JobRef { job_id, attempt }),
                seq: u64::from_be_bytes(seq),
                stream: LogStream::try_from(i32::from(v[0]))
                    .unwrap_or(LogStream::Unspecified)
                    .into(),
                data: v[1..].to_vec(),
            });
        }
        Ok(out)
    }

    /// Starts watching a job: events from now on. Read the stored chunks
    /// *after* subscribing, so nothing falls between the two.
    pub fn subscribe(&self, job_id: u64) -> broadcast::Receiver<WatchEvent> {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.entry(job_id)
            .or_insert_with(|| broadcast::channel(WATCH_BUFFER_EVENTS).0)
            .subscribe()
    }

    /// Tells watchers the job finished and forgets its live channel.
    pub fn finished(&self, job_id: u64, attempts: u32) {
        if let Some(tx) = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&job_id)
        {
            let _ = tx.send(WatchEvent::Finished);
        }
        let mut sizes = self.sizes.lock().unwrap_or_else(|p| p.into_inner());
        for a in 1..=attempts {
            sizes.remove(&(job_id, a));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(job_id: u64, attempt: u32, seq: u64, data: &str) -> LogChunk {
        LogChunk {
            job: Some(JobRef { job_id, attempt }),
            seq,
            stream: LogStream::Stdout.into(),
            data: data.as_bytes().to_vec(),
        }
    }

    #[tokio::test]
    async fn chunks_are_stored_in_order_per_attempt_and_resends_are_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let logs = JobLogs::open(&store, 1 << 20).unwrap();
        logs.append(chunk(7, 1, 2, "b")).unwrap();
        logs.append(chunk(7, 1, 1, "a")).unwrap();
        logs.append(chunk(7, 1, 1, "a")).unwrap();
        logs.append(chunk(7, 2, 1, "c")).unwrap();
        logs.append(chunk(8, 1, 1, "other")).unwrap();
        let all: Vec<_> = logs.read(7, None).unwrap();
        let text: String = all
            .iter()
            .map(|c| String::from_utf8_lossy(&c.data))
            .collect();
        assert_eq!(text, "abc");
        assert_eq!(logs.read(7, Some(2)).unwrap().len(), 1);
    }

    #[tokio::test]
    async fn watchers_see_live_chunks_then_finish() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let logs = JobLogs::open(&store, 1 << 20).unwrap();
        let mut rx = logs.subscribe(3);
        logs.append(chunk(3, 1, 1, "hi")).unwrap();
        logs.finished(3, 1);
        assert!(matches!(rx.recv().await.unwrap(), WatchEvent::Log(_)));
        assert!(matches!(rx.recv().await.unwrap(), WatchEvent::Finished));
    }

    #[tokio::test]
    async fn hub_cap_drops_the_excess_with_a_notice() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let logs = JobLogs::open(&store, 4).unwrap();
        logs.append(chunk(1, 1, 1, "abc")).unwrap();
        logs.append(chunk(1, 1, 2, "defg")).unwrap();
        logs.append(chunk(1, 1, 3, "never")).unwrap();
        let text: String = logs
            .read(1, None)
            .unwrap()
            .iter()
            .map(|c| String::from_utf8_lossy(&c.data).into_owned())
            .collect();
        assert!(text.starts_with("abcdefg"));
        assert!(text.contains("hub's limit"));
        assert!(!text.contains("never"));
    }
}
