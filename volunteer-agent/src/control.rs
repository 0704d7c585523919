//! The control socket: how `trunkfarm-agent status`, `pause`, `resume` and
//! `unenroll` talk to the running agent (not by signals).
//!
//! A Unix socket in the state directory (`control.sock`, mode 0600 in the
//! 0700 directory: the agent's user only), opened by `run` once it holds the
//! state directory's lock (so any socket already there is stale and is
//! replaced) and removed when it exits. One request per connection, one
//! JSON line each way. The server only forwards: the agent's one task
//! answers each request from its loop ([`Control`]).

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::donor::{JobInfo, Pause};

/// The socket's name in the state directory.
pub(crate) const SOCKET_FILE: &str = "control.sock";

/// Longest request or answer line.
const MAX_LINE: u64 = 1 << 20;

/// How long a command waits for the agent's answer.
const ANSWER_WAIT: Duration = Duration::from_secs(10);

/// What a command asks the running agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub(crate) enum Request {
    /// What it does.
    Status,
    /// Take no new job (for `for_secs`, or until resumed); with `now`,
    /// hand the running jobs back to the hub at once.
    Pause { for_secs: Option<u64>, now: bool },
    /// Take work again.
    Resume,
    /// `unenroll`: hand the running jobs back and exit, so the command can
    /// revoke the credential and delete the state.
    Leave,
    /// `unenroll --hub`: hand that hub's running jobs back and stop serving
    /// it once it has their results (it then leaves `Status::hubs`); the
    /// other hubs go on.
    LeaveHub { hub: String },
}

/// The agent's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct Answer {
    /// What it did, in a sentence for the donor.
    pub message: String,
    /// Its status (for every request).
    pub status: Option<Status>,
}

/// What `status` shows (and prints with `--json`). With no agent running,
/// what the state directory tells.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct Status {
    /// An agent runs on this state directory.
    pub running: bool,
    /// Its pid and when it started (Unix ms), while it runs.
    pub pid: Option<u32>,
    pub started_ms: Option<u64>,
    pub state_dir: PathBuf,
    /// The hub, and this agent's id and name there.
    pub hub: String,
    pub agent_id: String,
    pub name: String,
    /// Connected to the hub now, and since when (Unix ms).
    pub connected: bool,
    pub connected_since_ms: Option<u64>,
    /// The donor's pause, if paused.
    pub paused: Option<Pause>,
    /// Why its donor's limits (schedule, only_when_idle) keep it from new
    /// work now, and until when in the donor's time; `None`: they do not.
    pub unavailable: Option<String>,
    /// Draining: finishing its jobs, then exiting.
    pub draining: bool,
    /// The jobs running now.
    pub jobs: Vec<JobInfo>,
    /// The jobs that ended in the last 24 hours, oldest first.
    pub last_day: Vec<JobInfo>,
    /// The artifact cache: where, and bytes in it.
    pub cache_dir: PathBuf,
    pub cache_bytes: u64,
    /// Results the hub has not acknowledged yet (all hubs').
    pub undelivered_results: usize,
    /// The machine's slots (`max_parallel_jobs`), while it runs.
    pub max_parallel_jobs: Option<u32>,
    /// Each hub it serves (the fields above about "the hub" are the
    /// first's, as before an agent could serve several).
    pub hubs: Vec<HubStatus>,
}

/// One hub in `status` and `hubs`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct HubStatus {
    /// Its name on this machine, its address, this agent's id there.
    pub name: String,
    pub hub: String,
    pub agent_id: String,
    /// Its share of the slots (`[hubs.NAME] share`).
    pub share: u32,
    /// Connected now (while the agent runs), and since when (Unix ms).
    pub connected: bool,
    pub connected_since_ms: Option<u64>,
    /// Its jobs running here.
    pub running: usize,
    /// The slots it may fill now (several hubs: its `Slots`), and the
    /// queued jobs it has for this agent (its `Backlog`), while connected.
    pub offered: Option<u32>,
    pub backlog: Option<u32>,
    /// Its results not yet acknowledged.
    pub undelivered_results: usize,
    /// Being left (`unenroll --hub`).
    pub leaving: bool,
    /// It asked this agent to drain: none of its jobs is taken any more.
    pub draining: bool,
    /// Why it refused this agent for good, if it did.
    pub refused: Option<String>,
}

/// A request from a command, with where its answer goes.
pub(crate) type Control = (Request, oneshot::Sender<Answer>);

/// The listening socket; removes its file when dropped (the agent exits).
#[derive(Debug)]
pub(crate) struct Server {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
    /// Closed once every answer being written is done: each answer's task
    /// holds a sender, so `recv` returns `None` when the last one ends.
    in_flight: mpsc::Receiver<()>,
}

/// How long a stopping agent waits for the answers it is still writing
/// (`unenroll`'s "stops once the hub has their results" must reach the
/// donor before the process exits).
const CLOSE_WAIT: Duration = Duration::from_secs(2);

impl Server {
    /// Stops listening and waits (up to [`CLOSE_WAIT`]) for the answers
    /// being written; then the socket file is removed.
    pub(crate) async fn close(mut self) {
        self.task.abort();
        if tokio::time::timeout(CLOSE_WAIT, self.in_flight.recv())
            .await
            .is_err()
        {
            tracing::debug!("an answer on the control socket was still being written at exit");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
        if let Err(e) = std::fs::remove_file(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(
                "cannot remove the control socket {}: {e}",
                self.path.display()
            );
        }
    }
}

/// Opens the control socket in `dir` (replacing a stale one: the caller
/// holds the state directory's lock) and forwards each request to `tx`.
pub(crate) fn serve(dir: &Path, tx: mpsc::Sender<Control>) -> io::Result<Server> {
    let path = dir.join(SOCKET_FILE);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(&path)?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let (guard, in_flight) = mpsc::channel::<()>(1);
    let task = tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(answer(stream, tx.clone(), guard.clone()));
                }
                Err(e) => {
                    tracing::warn!("the control socket failed: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    });
    Ok(Server {
        path,
        task,
        in_flight,
    })
}

/// Reads one request, has the agent answer it, writes the answer; holds
/// `_in_flight` until done (see [`Server::close`]).
async fn answer(stream: UnixStream, tx: mpsc::Sender<Control>, _in_flight: mpsc::Sender<()>) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_LINE));
    let answer = match reader.read_line(&mut line).await {
        Err(e) => {
            tracing::debug!("control request unreadable: {e}");
            return;
        }
        Ok(_) => match serde_json::from_str::<Request>(&line) {
            Err(e) => Answer {
                message: format!("error: not a request this agent knows: {e}"),
                status: None,
            },
            Ok(request) => {
                let (reply, answer) = oneshot::channel();
                if tx.send((request, reply)).await.is_err() {
                    return;
                }
                match answer.await {
                    Ok(answer) => answer,
                    Err(_) => return,
                }
            }
        },
    };
    let Ok(mut text) = serde_json::to_string(&answer) else {
        return;
    };
    text.push('\n');
    if let Err(e) = write.write_all(text.as_bytes()).await {
        tracing::debug!("cannot answer a control request: {e}");
    }
}

/// Why a command could not talk to the agent.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AskError {
    /// No agent listens (no socket, or a stale one).
    #[error("no agent is running on {0}")]
    NotRunning(PathBuf),
    /// It did not answer in time, or answered nonsense.
    #[error("the agent on {dir} did not answer: {detail}")]
    NoAnswer { dir: PathBuf, detail: String },
}

/// Asks the agent running on state directory `dir`.
pub(crate) async fn ask(dir: &Path, request: &Request) -> Result<Answer, AskError> {
    let path = dir.join(SOCKET_FILE);
    let mut stream = match UnixStream::connect(&path).await {
        Ok(stream) => stream,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(AskError::NotRunning(dir.to_path_buf()));
        }
        Err(e) => {
            return Err(AskError::NoAnswer {
                dir: dir.to_path_buf(),
                detail: format!("cannot connect to {}: {e}", path.display()),
            });
        }
    };
    let no_answer = |detail: String| AskError::NoAnswer {
        dir: dir.to_path_buf(),
        detail,
    };
    let exchange = async {
        let mut text = serde_json::to_string(request).map_err(|e| e.to_string())?;
        text.push('\n');
        stream
            .write_all(text.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(tokio::io::AsyncReadExt::take(&mut stream, MAX_LINE))
            .read_line(&mut line)
            .await
            .map_err(|e| e.to_string())?;
        if line.is_empty() {
            return Err("it closed the connection".to_owned());
        }
        serde_json::from_str::<Answer>(&line).map_err(|e| format!("an unreadable answer: {e}"))
    };
    match tokio::time::timeout(ANSWER_WAIT, exchange).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(detail)) => Err(no_answer(detail)),
        Err(_) => Err(no_answer(format!(
            "no answer within {}s",
            ANSWER_WAIT.as_secs()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[tokio::test]
    async fn a_request_reaches_the_agent_and_its_answer_comes_back() {
        let tmp = tempfile::tempdir().unwrap();
        // A stale socket file (an agent killed with -9) is replaced.
        std::fs::write(tmp.path().join(SOCKET_FILE), b"").unwrap();
        assert!(matches!(
            ask(tmp.path(), &Request::Status).await,
            Err(AskError::NotRunning(_))
        ));
        let (tx, mut rx) = mpsc::channel::<Control>(1);
        let server = serve(tmp.path(), tx).unwrap();
        let mode = std::fs::metadata(tmp.path().join(SOCKET_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let agent = tokio::spawn(async move {
            let (request, reply) = rx.recv().await.unwrap();
            reply
                .send(Answer {
                    message: format!("{request:?}"),
                    status: None,
                })
                .unwrap();
        });
        let request = Request::Pause {
            for_secs: Some(60),
            now: true,
        };
        let answer = ask(tmp.path(), &request).await.unwrap();
        assert_eq!(answer.message, format!("{request:?}"));
        agent.await.unwrap();
        drop(server);
        assert!(!tmp.path().join(SOCKET_FILE).exists(), "removed on exit");
        assert!(matches!(
            ask(tmp.path(), &Request::Status).await,
            Err(AskError::NotRunning(_))
        ));
    }
}
