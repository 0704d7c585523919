//! A real browser for the dashboard's tests: Debian's `chromium`, headless,
//! driven through its command line (`--dump-dom` for the DOM after the
//! page's script ran, `--screenshot` for a PNG), one short-lived process
//! per call with its own profile directory and a timeout.
//!
//! Without chromium a test says so and skips ([`Browser::find`] returns
//! `None`), except on CI (`CI` set), where a missing browser fails: `.ci/run`
//! installs it.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{Hub, describe, run_with_timeout, temp_dir};

/// Where Debian installs chromium.
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// How long one page load may take.
const LOAD_TIMEOUT: Duration = Duration::from_secs(60);

/// Headless chromium.
pub struct Browser {
    binary: PathBuf,
}

impl Browser {
    /// Chromium, or `None` (after printing why) when it is not installed
    /// and `CI` is not set. Panics on CI without it.
    pub fn find() -> Option<Browser> {
        let binary = PathBuf::from(CHROMIUM);
        if binary.is_file() {
            return Some(Browser { binary });
        }
        if std::env::var_os("CI").is_some() {
            panic!(
                "{CHROMIUM} is missing: the browser tests need chromium (`apt-get install -y chromium`; .ci/run installs it)"
            );
        }
        println!(
            "SKIPPED: {CHROMIUM} is not installed (`apt-get install -y chromium`); the browser test does not run"
        );
        None
    }

    /// Headless chromium with a fresh profile, everything that phones
    /// home turned off, and `args`; its stdout once it exits.
    fn run(&self, args: &[&str], url: &str) -> String {
        let profile = temp_dir("trunkfarm-e2e-chromium-");
        let mut cmd = Command::new(&self.binary);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url);
        let out = run_with_timeout(cmd, LOAD_TIMEOUT);
        assert!(
            out.status.success(),
            "chromium failed on {url}: {}",
            describe(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The DOM of `url` once it loaded (its deferred scripts ran),
    /// serialized as HTML. (Not `--virtual-time-budget`: virtual time waits
    /// for the network to go idle, which a page listening on `/events`
    /// never does.)
    pub fn dump_dom(&self, url: &str) -> String {
        self.run(&["--dump-dom"], url)
    }

    /// A PNG of `url` in a `width`×`height` window, at `path` (its
    /// directory is created). Prints the path: the test's artifact.
    pub fn screenshot(&self, url: &str, path: &Path, (width, height): (u32, u32)) {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        self.run(
            &[
                &format!("--window-size={width},{height}"),
                &format!("--screenshot={}", path.display()),
            ],
            url,
        );
        let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        assert!(
            len > 0,
            "chromium wrote no screenshot of {url} at {}",
            path.display()
        );
        println!("screenshot of {url} ({width}x{height}): {}", path.display());
    }
}

/// A desktop window.
pub const DESKTOP: (u32, u32) = (1280, 900);
/// A phone's window.
pub const PHONE: (u32, u32) = (390, 844);

/// `target/test-artifacts/<name>`: where a test keeps what a person may
/// want to look at afterwards (screenshots).
pub fn artifact(name: &str) -> PathBuf {
    crate::target_dir().join("test-artifacts").join(name)
}

/// The hub's web endpoint as `http://127.0.0.1:PORT` (from `hub.json`).
pub fn web_url(hub: &Hub) -> String {
    let text = std::fs::read_to_string(hub.data_dir.join("hub.json")).unwrap();
    let info: serde_json::Value = serde_json::from_str(&text).unwrap();
    let addr = info["web"]
        .as_str()
        .unwrap_or_else(|| panic!("no web address in hub.json: {text}"));
    format!("http://{addr}")
}

/// `GET url` (plain HTTP on 127.0.0.1): the status and the body.
pub fn http_get(url: &str) -> (u16, String) {
    let rest = url.strip_prefix("http://").expect("an http:// URL");
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let mut stream = TcpStream::connect(host).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line from {url}: {head}"));
    (status, body.to_string())
}

/// The `<td class="cell …">` cells of a page's HTML, in document order:
/// (state class, link target or empty, the cell's text).
pub fn grid_cells(html: &str) -> Vec<GridCell> {
    let mut out = Vec::new();
    for part in html.split("<td class=\"cell ").skip(1) {
        let class = part.split('"').next().unwrap_or("").to_string();
        let cell = part.split("</td>").next().unwrap_or("");
        let attr = |name: &str| {
            cell.split(&format!("{name}=\""))
                .nth(1)
                .and_then(|v| v.split('"').next())
                .unwrap_or("")
                .to_string()
        };
        let mut text = String::new();
        let mut in_tag = false;
        for c in cell.split_once('>').map_or("", |(_, t)| t).chars() {
            match c {
                '<' => in_tag = true,
                '>' => in_tag = false,
                c if !in_tag => text.push(c),
                _ => {}
            }
        }
        out.push(GridCell {
            class,
            href: attr("href"),
            commit: attr("data-commit"),
            platform: attr("data-platform"),
            text,
        });
    }
    out
}

/// One grid cell as the page shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GridCell {
    /// Its state class (`green`, `red`, `queued`, `not_run`, …).
    pub class: String,
    /// Where it links (`/runs/<job id>`), empty when nowhere.
    pub href: String,
    /// The upstream commit (full hash).
    pub commit: String,
    pub platform: String,
    /// Its words.
    pub text: String,
}
