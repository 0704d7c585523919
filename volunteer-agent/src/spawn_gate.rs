//! Keeps a job from executing a file that another job's fork still holds
//! open for writing, which fails with "Text file busy" (`ETXTBSY`).
//!
//! A fork copies every open descriptor of the agent, among them the one an
//! unpack thread is writing a runtime's executable through, and holds the
//! copy until its exec closes it (`O_CLOEXEC`). A job executing that file in
//! between fails for no fault of its own, and the red would be the farm's.
//! So a spawn holds the gate shared from fork to exec (`spawn` returns only
//! once the child has exec'd, on std's fork and posix_spawn paths alike),
//! and an unpack, once its files are closed, passes the gate exclusively:
//! every fork that may still hold one of its descriptors has exec'd before
//! the runtime is run. Spawns never wait for each other, and an unpack waits
//! at most for the forks under way.
//!
//! Descriptors belong to the process, so the gate does too: one for every
//! hub's jobs (and every test in a test binary).

use std::io;
use std::sync::{PoisonError, RwLock, TryLockError};
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

/// Held shared from fork to exec, exclusively for a moment after an unpack.
static GATE: RwLock<()> = RwLock::new(());

/// The longest an unpack waits for the forks under way. A fork takes
/// milliseconds; one stuck before its exec must not stop the agent.
const FORK_WAIT: Duration = Duration::from_secs(10);

/// How often a waiting unpack looks again (it never blocks spawns).
const FORK_POLL: Duration = Duration::from_millis(1);

/// Spawns `cmd`; the child has exec'd when this returns.
pub(crate) fn spawn(cmd: &mut Command) -> io::Result<Child> {
    let _forking = GATE.read().unwrap_or_else(PoisonError::into_inner);
    cmd.spawn()
}

/// Waits until every spawn under way has exec'd, for at most [`FORK_WAIT`].
/// Call it after closing the files written, from a blocking thread. It
/// never holds up a spawn: it only takes the gate when nobody is forking.
pub(crate) fn wait_for_forks() {
    let since = Instant::now();
    loop {
        match GATE.try_write() {
            Ok(_) | Err(TryLockError::Poisoned(_)) => return,
            Err(TryLockError::WouldBlock) if since.elapsed() < FORK_WAIT => {
                std::thread::sleep(FORK_POLL);
            }
            Err(TryLockError::WouldBlock) => {
                tracing::warn!(
                    "a process this agent started has not begun running for {}s; \
                     going on without waiting for it (a job may see \"Text file busy\")",
                    FORK_WAIT.as_secs()
                );
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};
    use std::os::fd::{FromRawFd as _, OwnedFd};
    use std::os::unix::fs::OpenOptionsExt as _;

    use super::*;

    /// Writes an executable script and, while it is still open, starts a
    /// spawn whose fork says (over a pipe) that it has copied the
    /// descriptors, then lingers 300 ms before its exec; then closes the
    /// script, optionally waits at the gate, and runs the script.
    async fn run_while_a_fork_lingers(wait: bool) -> io::Result<bool> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tool");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o755)
            .open(&path)
            .unwrap();
        file.write_all(b"#!/bin/sh\nexit 0\n").unwrap();
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two descriptors, owned below.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both are open and owned by nothing else.
        let (read_end, write_end) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let forker = std::thread::spawn(move || {
            let mut cmd = Command::new("/bin/true");
            let signal = fds[1];
            // SAFETY: write and nanosleep are async-signal-safe and allocate nothing.
            unsafe {
                cmd.pre_exec(move || {
                    libc::write(signal, b"f".as_ptr().cast(), 1);
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
            let status = rt.block_on(async move { spawn(&mut cmd).unwrap().wait().await.unwrap() });
            drop(write_end);
            status
        });
        // The fork has copied the script's descriptor once it says so.
        let mut forked = std::fs::File::from(read_end);
        let mut byte = [0u8; 1];
        forked.read_exact(&mut byte).unwrap();
        drop(file);
        if wait {
            tokio::task::spawn_blocking(wait_for_forks).await.unwrap();
        }
        let ran = Command::new(&path).status().await;
        assert!(forker.join().unwrap().success());
        ran.map(|s| s.success())
    }

    #[tokio::test]
    async fn a_runtime_runs_only_once_the_forks_holding_its_files_have_execd() {
        assert!(run_while_a_fork_lingers(true).await.unwrap());
        // The control: without the wait, the fork still holds the file open
        // for writing (on kernels that refuse to run such a file: all but
        // Linux 6.11 and 6.12).
        match run_while_a_fork_lingers(false).await {
            Err(busy) => assert_eq!(busy.raw_os_error(), Some(libc::ETXTBSY), "{busy}"),
            Ok(_) => {
                eprintln!("this kernel runs files open for writing: the control proves nothing")
            }
        }
    }
}
