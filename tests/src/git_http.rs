//! A git server over HTTP that asks for credentials
//! (`tests/fixtures/git-http-server.py`: `git http-backend` behind basic
//! auth on 127.0.0.1). It refuses every request without the right user and
//! password, so a fetch through it succeeds only if the credentials reached
//! git.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use crate::{Proc, read_lossy, temp_dir, wait_for};

/// The running server, killed when dropped.
pub struct GitHttp {
    proc: Proc,
    host: String,
    _logs: TempDir,
}

impl GitHttp {
    /// Serves every repository under `root` to `user` with `password`.
    pub fn start(root: &Path, user: &str, password: &str) -> GitHttp {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/git-http-server.py");
        let logs = temp_dir("trunkfarm-e2e-git-http-");
        let prefix = logs.path().join("server");
        let mut cmd = Command::new("python3");
        cmd.arg(script)
            .arg(root)
            .env("GIT_HTTP_USER", user)
            .env("GIT_HTTP_PASSWORD", password);
        let proc = Proc::spawn("git http server", cmd, &prefix);
        let stdout = prefix.with_extension("stdout.log");
        let port = wait_for(Duration::from_secs(20), "the git server's port", || {
            read_lossy(&stdout)
                .lines()
                .find_map(|l| l.trim().parse::<u16>().ok())
        });
        GitHttp {
            proc,
            host: format!("127.0.0.1:{port}"),
            _logs: logs,
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The requests it served (`ok …`) and refused (`denied …`).
    pub fn requests(&self) -> String {
        self.proc.logs()
    }
}
