//! Keeps a job from executing a file that another job's fork still holds
//! open for writing, which fails with "Text file busy" (`ETXTBSY`).
//!
//! A fork copies every open descriptor of the agent, among them the one an
//! unpack thread is writing a runtime's executable through, and holds the
//! copy until its exec closes it (`O_CLOEXEC`). A job executing that file in
//! between fails for no fault of its own, and the red would be the farm's.
//! So a spawn holds the gate shared from fork to exec (`spawn` returns only
//! once the child has exec'd), and an unpack, once its files are closed,
//! passes the gate exclusively: every fork that may still hold one of its
//! descriptors has exec'd before the runtime is run. Spawns never wait for
//! each other, and an unpack waits at most for the forks under way.

use std::io;
use std::sync::{Arc, PoisonError, RwLock};

use tokio::process::{Child, Command};

/// Shared by every job of this agent (cloning shares it).
#[derive(Clone, Debug, Default)]
pub(crate) struct SpawnGate(Arc<RwLock<()>>);

impl SpawnGate {
    /// Spawns `cmd`; the child has exec'd when this returns.
    pub(crate) fn spawn(&self, cmd: &mut Command) -> io::Result<Child> {
        let _forking = self.0.read().unwrap_or_else(PoisonError::into_inner);
        cmd.spawn()
    }

    /// Waits until every spawn under way has exec'd (call it after closing
    /// the files written, from a blocking thread: it blocks for as long as
    /// a fork and exec take).
    pub(crate) fn wait_for_forks(&self) {
        drop(self.0.write().unwrap_or_else(PoisonError::into_inner));
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    use std::time::Duration;

    use super::*;

    /// Writes an executable script at `path` and, while it is still open,
    /// starts a spawn (through `gate`) whose fork lingers 300 ms before its
    /// exec; then closes the script, optionally waits at the gate, and runs
    /// the script: its exit status, or the error of running it.
    async fn run_while_a_fork_lingers(gate: &SpawnGate, wait: bool) -> io::Result<bool> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tool");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o755)
            .open(&path)
            .unwrap();
        file.write_all(b"#!/bin/sh\nexit 0\n").unwrap();
        let forker = {
            let gate = gate.clone();
            std::thread::spawn(move || {
                let mut cmd = Command::new("/bin/true");
                // SAFETY: nanosleep is async-signal-safe and allocates nothing.
                unsafe {
                    cmd.pre_exec(|| {
                        let pause = libc::timespec {
                            tv_sec: 0,
                            tv_nsec: 300_000_000,
                        };
                        libc::nanosleep(&pause, std::ptr::null_mut());
                        Ok(())
                    });
                }
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move { gate.spawn(&mut cmd).unwrap().wait().await.unwrap() })
            })
        };
        // The fork has copied the script's descriptor by now.
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(file);
        if wait {
            let gate = gate.clone();
            tokio::task::spawn_blocking(move || gate.wait_for_forks())
                .await
                .unwrap();
        }
        let ran = Command::new(&path).status().await;
        assert!(forker.join().unwrap().success());
        ran.map(|s| s.success())
    }

    #[tokio::test]
    async fn a_runtime_runs_only_once_the_forks_holding_its_files_have_execd() {
        let gate = SpawnGate::default();
        assert!(run_while_a_fork_lingers(&gate, true).await.unwrap());
        // Without the wait, the fork still holds the file open for writing.
        let busy = run_while_a_fork_lingers(&gate, false).await.unwrap_err();
        assert_eq!(busy.raw_os_error(), Some(libc::ETXTBSY), "{busy}");
    }
}
