//! A real SMTP server for the tests that check the hub's mail: `aiosmtpd`
//! (Python), started as a process on 127.0.0.1 and storing every message it
//! accepts in a Maildir, plus a minimal MIME reader for what it stored.
//!
//! The server runs as
//! `python3 -m aiosmtpd -n -d -l 127.0.0.1:PORT [--tlscert CHAIN --tlskey KEY] -c trunkfarm_sink.Sink MAILDIR`
//! (`TRUNKFARM_E2E_PYTHON` overrides `python3`); `.ci/run` installs it.
//! `trunkfarm_sink.Sink` (written next to the maildir) is aiosmtpd's Mailbox
//! handler, refusing recipients whose address starts with `bounce` (550). It appends `X-Peer`, `X-MailFrom` and `X-RcptTo` (the
//! envelope) to every message.

use std::fs;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use tempfile::TempDir;

use crate::{Proc, read_lossy, tail, temp_dir};

/// How long aiosmtpd may take to answer with its 220 banner once started.
pub const SMTP_START_TIMEOUT: Duration = Duration::from_secs(20);

/// The TLS material of a STARTTLS sink.
struct TlsFiles {
    /// The CA that signed the server certificate: what clients should trust.
    ca: PathBuf,
    /// Server certificate followed by the CA certificate.
    chain: PathBuf,
    /// The server certificate's private key (PKCS#8).
    key: PathBuf,
}

/// An aiosmtpd process on 127.0.0.1 that stores every message in a Maildir.
/// Killed when dropped; its output is printed when a test panics.
pub struct SmtpSink {
    port: u16,
    /// Maildir, logs and certificates.
    dir: TempDir,
    maildir: PathBuf,
    tls: Option<TlsFiles>,
    /// A login the server requires (plain connection).
    auth: Option<(String, String)>,
    proc: Option<Proc>,
    starts: u32,
}

/// The handler class: Maildir storage, and a permanent refusal (550) for
/// recipients whose address starts with `bounce`.
const SINK_HANDLER: &str = r#"
from aiosmtpd.handlers import Mailbox

class Sink(Mailbox):
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.lower().startswith("bounce"):
            return "550 5.1.1 <%s>: no such user here" % address
        envelope.rcpt_tos.append(address)
        return "250 OK"
"#;

/// A server that requires `AUTH` with one login (argv: port, maildir, user,
/// password), for the tests of the hub's SMTP credentials.
const AUTH_SERVER: &str = r#"
import signal, sys
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from trunkfarm_sink import Sink

port, maildir, user, password = sys.argv[1:5]

def check(server, session, envelope, mechanism, data):
    ok = isinstance(data, LoginPassword) and data.login.decode() == user and data.password.decode() == password
    return AuthResult(success=ok)

c = Controller(Sink(maildir), hostname="127.0.0.1", port=int(port), authenticator=check,
               auth_required=True, auth_require_tls=False)
c.start()
print("Server is listening on 127.0.0.1:%s" % port, flush=True)
signal.sigwait({signal.SIGTERM, signal.SIGINT})
c.stop()
"#;

fn python() -> String {
    std::env::var("TRUNKFARM_E2E_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

/// A port nobody listens on right now.
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// Connects, reads the greeting and says QUIT; the greeting if it is a 220.
fn banner(port: u16) -> Result<String, String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .map_err(|e| format!("read the banner: {e}"))?;
    if !line.starts_with("220") {
        return Err(format!("unexpected greeting {line:?}"));
    }
    let _ = reader.get_mut().write_all(b"QUIT\r\n");
    let mut bye = String::new();
    let _ = reader.read_line(&mut bye);
    Ok(line.trim_end().to_string())
}

/// Why starting aiosmtpd failed.
enum StartError {
    /// The port was taken (by someone else, or still by the previous run).
    PortInUse,
    Other(String),
}

impl SmtpSink {
    /// Starts aiosmtpd on a free 127.0.0.1 port, storing every message in a
    /// Maildir, and waits until it answers with a 220 banner.
    pub fn start() -> SmtpSink {
        SmtpSink::launch(false, None)
    }

    /// Like [`SmtpSink::start`], with STARTTLS offered — and required before
    /// MAIL FROM (aiosmtpd's default `require_starttls`), so a message that
    /// arrived came over TLS. The server certificate is valid for
    /// `localhost` and `127.0.0.1` and signed by a fresh CA whose PEM is at
    /// [`SmtpSink::cert_pem_path`].
    pub fn start_starttls() -> SmtpSink {
        SmtpSink::launch(true, None)
    }

    /// A sink that requires `AUTH PLAIN/LOGIN` with this login (no TLS).
    pub fn start_with_auth(user: &str, password: &str) -> SmtpSink {
        SmtpSink::launch(false, Some((user.to_string(), password.to_string())))
    }

    fn launch(tls: bool, auth: Option<(String, String)>) -> SmtpSink {
        let dir = temp_dir("trunkfarm-e2e-smtp-");
        let maildir = dir.path().join("maildir");
        let tls = tls.then(|| write_pki(dir.path()));
        let mut sink = SmtpSink {
            port: 0,
            dir,
            maildir,
            tls,
            auth,
            proc: None,
            starts: 0,
        };
        let mut attempts = 0;
        loop {
            attempts += 1;
            sink.port = free_port();
            match sink.spawn_and_wait() {
                Ok(()) => return sink,
                Err(StartError::PortInUse) if attempts < 5 => continue,
                Err(StartError::PortInUse) => {
                    panic!(
                        "aiosmtpd found its port taken {attempts} times\n{}",
                        sink.log_tail(40)
                    )
                }
                Err(StartError::Other(e)) => panic!("{e}"),
            }
        }
    }

    /// The CA certificate (PEM) the hub should trust, for a STARTTLS sink.
    pub fn cert_pem_path(&self) -> Option<&Path> {
        self.tls.as_ref().map(|t| t.ca.as_path())
    }

    /// The port it listens on (127.0.0.1); the same across restarts.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The Maildir messages are stored in.
    pub fn maildir(&self) -> &Path {
        &self.maildir
    }

    /// Whether the server process is running.
    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(|p| p.try_wait().is_none())
    }

    fn log_prefix(&self) -> PathBuf {
        self.dir.path().join("aiosmtpd")
    }

    /// The server's whole output (all runs).
    pub fn logs(&self) -> String {
        let p = self.log_prefix();
        format!(
            "---- aiosmtpd stdout ----\n{}\n---- aiosmtpd stderr ----\n{}",
            read_lossy(&p.with_extension("stdout.log")),
            read_lossy(&p.with_extension("stderr.log"))
        )
    }

    fn log_tail(&self, n: usize) -> String {
        let p = self.log_prefix();
        format!(
            "---- aiosmtpd ({}) stdout, last {n} lines ----\n{}\n---- aiosmtpd stderr, last {n} lines ----\n{}",
            self.dir.path().display(),
            tail(&read_lossy(&p.with_extension("stdout.log")), n),
            tail(&read_lossy(&p.with_extension("stderr.log")), n)
        )
    }

    fn command(&self) -> Command {
        let module = self.dir.path().join("trunkfarm_sink.py");
        let _ = std::fs::write(&module, SINK_HANDLER);
        if let Some((user, password)) = &self.auth {
            // aiosmtpd's command line has no authenticator: a small server
            // script with the same handler, requiring AUTH (plain connection).
            let script = self.dir.path().join("auth_server.py");
            let _ = std::fs::write(&script, AUTH_SERVER);
            let mut cmd = Command::new(python());
            cmd.arg(&script)
                .arg(self.port.to_string())
                .arg(&self.maildir)
                .arg(user)
                .arg(password)
                .env("PYTHONPATH", self.dir.path())
                .env("PYTHONUNBUFFERED", "1")
                .env("PYTHONDONTWRITEBYTECODE", "1");
            return cmd;
        }
        let mut cmd = Command::new(python());
        cmd.args(["-m", "aiosmtpd", "-n", "-d", "-l"])
            .arg(format!("127.0.0.1:{}", self.port));
        if let Some(t) = &self.tls {
            cmd.arg("--tlscert")
                .arg(&t.chain)
                .arg("--tlskey")
                .arg(&t.key);
        }
        // aiosmtpd's Mailbox handler, refusing recipients whose address
        // starts with "bounce" (550, for good) the way a real server does.
        cmd.args(["-c", "trunkfarm_sink.Sink"])
            .arg(&self.maildir)
            .env("PYTHONPATH", self.dir.path())
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1");
        cmd
    }

    /// Spawns aiosmtpd on `self.port` and waits for its banner.
    fn spawn_and_wait(&mut self) -> Result<(), StartError> {
        self.starts += 1;
        let cmd = self.command();
        let desc = format!("{cmd:?}");
        let log_prefix = self.log_prefix();
        let proc = self.proc.insert(Proc::spawn(
            &format!("aiosmtpd (start #{})", self.starts),
            cmd,
            &log_prefix,
        ));
        let deadline = Instant::now() + SMTP_START_TIMEOUT;
        loop {
            if let Some(status) = proc.try_wait() {
                let stderr = read_lossy(&log_prefix.with_extension("stderr.log"));
                // The log accumulates over runs: look at this run's part only.
                let this_run = stderr
                    .rsplit("==== aiosmtpd (start #")
                    .next()
                    .unwrap_or("")
                    .to_lowercase();
                // asyncio: "[Errno 98] error while attempting to bind on
                // address (...): address already in use".
                if this_run.contains("address already in use") {
                    return Err(StartError::PortInUse);
                }
                let hint = if this_run.contains("no module named aiosmtpd") {
                    "\n(aiosmtpd is not installed: run .ci/run, or `python3 -m pip install --user aiosmtpd`)"
                } else {
                    ""
                };
                return Err(StartError::Other(format!(
                    "aiosmtpd exited ({}) before answering: {desc}{hint}\n{}",
                    crate::status_text(&status),
                    self.log_tail(40)
                )));
            }
            let last = match banner(self.port) {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(StartError::Other(format!(
                    "aiosmtpd did not answer with a 220 banner on 127.0.0.1:{} within {SMTP_START_TIMEOUT:?} (last: {last}): {desc}\n{}",
                    self.port,
                    self.log_tail(40)
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server (SIGTERM, then SIGKILL), keeping the maildir and the
    /// port number.
    pub fn stop(&mut self) {
        if let Some(p) = self.proc.as_mut() {
            p.signal(libc::SIGTERM);
            if p.wait_exit(Duration::from_secs(5)).is_none() {
                p.kill9();
            }
        }
    }

    /// Starts it again on the same port and maildir (stopping it first if it
    /// still runs) and waits for the banner; retries for a few seconds while
    /// the port is still taken.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn_and_wait() {
                Ok(()) => return,
                Err(StartError::PortInUse) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(StartError::PortInUse) => panic!(
                    "aiosmtpd could not bind 127.0.0.1:{} again within 10 s\n{}",
                    self.port,
                    self.log_tail(40)
                ),
                Err(StartError::Other(e)) => panic!("{e}"),
            }
        }
    }

    /// Every message received so far, oldest first.
    pub fn messages(&self) -> Vec<Mail> {
        // (mtime, (secs, usecs, counter) of the name, name, path)
        type Entry = (SystemTime, (u64, u64, u64), String, PathBuf);
        let mut files: Vec<Entry> = Vec::new();
        for sub in ["new", "cur"] {
            let Ok(entries) = fs::read_dir(self.maildir.join(sub)) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue;
                }
                let Ok(meta) = e.metadata() else { continue };
                if !meta.is_file() {
                    continue;
                }
                let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                files.push((mtime, maildir_key(&name), name, e.path()));
            }
        }
        files.sort();
        files
            .into_iter()
            .filter_map(|(.., path)| fs::read(&path).ok())
            .map(|raw| Mail::parse(&raw))
            .collect()
    }

    /// Waits until at least `n` messages arrived and returns them all; panics
    /// with what did arrive (and the server's log) after `timeout`.
    pub fn wait_for_messages(&self, n: usize, timeout: Duration) -> Vec<Mail> {
        let deadline = Instant::now() + timeout;
        loop {
            let mails = self.messages();
            if mails.len() >= n {
                return mails;
            }
            if Instant::now() >= deadline {
                let list: Vec<String> =
                    mails.iter().map(|m| format!("  {}", m.summary())).collect();
                panic!(
                    "timed out after {timeout:?} waiting for {n} message(s) at the SMTP sink on 127.0.0.1:{}; {} arrived:\n{}\n{}",
                    self.port,
                    mails.len(),
                    list.join("\n"),
                    self.log_tail(60)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        if let Some(p) = self.proc.as_mut() {
            p.signal(libc::SIGKILL);
        }
        if std::thread::panicking() {
            eprintln!(
                "\n==== SMTP sink on 127.0.0.1:{} ====\n{}",
                self.port,
                self.log_tail(60)
            );
        }
        self.proc = None;
    }
}

/// `(seconds, microseconds, counter)` of a Maildir file name written by
/// Python's `mailbox` (`<secs>.M<usecs>P<pid>Q<count>.<host>`); zeros if it
/// does not look like one.
fn maildir_key(name: &str) -> (u64, u64, u64) {
    let mut parts = name.splitn(2, '.');
    let secs = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let rest = parts.next().unwrap_or("");
    let num_after = |tag: char| -> u64 {
        rest.split_once(tag)
            .map(|(_, r)| {
                r.chars()
                    .take_while(char::is_ascii_digit)
                    .collect::<String>()
            })
            .and_then(|d| d.parse().ok())
            .unwrap_or(0)
    };
    (secs, num_after('M'), num_after('Q'))
}

/// Writes a CA, and a server certificate for `localhost` and `127.0.0.1`
/// signed by it, into `dir`.
fn write_pki(dir: &Path) -> TlsFiles {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "trunkfarm e2e SMTP test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key"))
        .expect("self-sign the CA");

    let mut params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .expect("server params");
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let key = KeyPair::generate().expect("server key");
    let cert = params.signed_by(&key, &ca).expect("sign the server cert");

    let files = TlsFiles {
        ca: dir.join("smtp-ca.pem"),
        chain: dir.join("smtp-server-chain.pem"),
        key: dir.join("smtp-server-key.pem"),
    };
    fs::write(&files.ca, ca.pem()).expect("write the CA");
    fs::write(&files.chain, format!("{}{}", cert.pem(), ca.pem())).expect("write the chain");
    fs::write(&files.key, key.serialize_pem()).expect("write the key");
    files
}

// ---------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------

/// A received message, parsed.
#[derive(Debug, Clone)]
pub struct Mail {
    /// The message as stored (lossily decoded as UTF-8).
    pub raw: String,
    /// Every header in order, unfolded, values as sent (encoded-words not
    /// decoded; see [`Mail::header`]). Includes aiosmtpd's `X-Peer`,
    /// `X-MailFrom` and `X-RcptTo`.
    pub headers: Vec<(String, String)>,
    /// The decoded text/plain body (the first text/plain part of a
    /// multipart message), with `\n` line endings; empty if there is none.
    pub text: String,
    /// The decoded text/html part (or body), with `\n` line endings.
    pub html: Option<String>,
}

impl Mail {
    /// Parses a stored message (CRLF or LF line endings).
    pub fn parse(raw: &[u8]) -> Mail {
        let raw = String::from_utf8_lossy(raw).into_owned();
        let normalized = raw.replace("\r\n", "\n");
        let (head, body) = split_head_body(&normalized);
        let headers = parse_headers(head);
        let mut parts = Parts::default();
        walk(&headers, body, &mut parts, 0);
        Mail {
            raw,
            headers,
            text: parts.text.unwrap_or_default(),
            html: parts.html,
        }
    }

    /// First header with this name (case-insensitive), unfolded, with RFC
    /// 2047 encoded-words decoded.
    pub fn header(&self, name: &str) -> Option<String> {
        header_value(&self.headers, name).map(decode_encoded_words)
    }

    /// Every header with this name, decoded like [`Mail::header`].
    pub fn header_all(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| decode_encoded_words(v))
            .collect()
    }

    /// The decoded Subject ("" if there is none).
    pub fn subject(&self) -> String {
        self.header("subject").unwrap_or_default()
    }

    /// Recipient addresses from To: (bare addresses, lowercased).
    pub fn to(&self) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("to"))
            .flat_map(|(_, v)| addresses(v))
            .collect()
    }

    /// The envelope recipients (RCPT TO), from aiosmtpd's `X-RcptTo`,
    /// lowercased.
    pub fn envelope_to(&self) -> Vec<String> {
        self.last_header("x-rcptto")
            .map(|v| {
                v.split(',')
                    .map(|a| a.trim().to_lowercase())
                    .filter(|a| !a.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The envelope sender (MAIL FROM), from aiosmtpd's `X-MailFrom`,
    /// lowercased.
    pub fn envelope_from(&self) -> Option<String> {
        self.last_header("x-mailfrom")
            .map(|v| v.trim().to_lowercase())
    }

    /// aiosmtpd's headers come last: take the last one of a name.
    fn last_header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .rev()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// One line for failure messages: recipients and subject.
    pub fn summary(&self) -> String {
        format!(
            "to={:?} envelope_to={:?} subject={:?}",
            self.to(),
            self.envelope_to(),
            self.subject()
        )
    }
}

#[derive(Default)]
struct Parts {
    text: Option<String>,
    html: Option<String>,
}

fn header_value<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Splits at the first empty line (input has `\n` line endings).
fn split_head_body(s: &str) -> (&str, &str) {
    if let Some(body) = s.strip_prefix('\n') {
        return ("", body);
    }
    match s.find("\n\n") {
        Some(i) => (&s[..i], &s[i + 2..]),
        None => (s, ""),
    }
}

/// Header lines to (name, unfolded value) pairs.
fn parse_headers(head: &str) -> Vec<(String, String)> {
    let mut headers: Vec<(String, String)> = Vec::new();
    for line in head.split('\n') {
        if line.starts_with([' ', '\t']) {
            // Unfolding removes only the line break.
            if let Some((_, v)) = headers.last_mut() {
                v.push_str(line.trim_end());
            }
        } else if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_string(), value.trim().to_string()));
        }
    }
    for (_, v) in headers.iter_mut() {
        *v = v.trim().to_string();
    }
    headers
}

/// `type/subtype` (lowercased) and its parameters (names lowercased).
fn parse_content_type(value: &str) -> (String, Vec<(String, String)>) {
    let mut items = split_outside_quotes(value, ';').into_iter();
    let mime = items.next().unwrap_or_default().trim().to_lowercase();
    let params = items
        .filter_map(|p| {
            let (k, v) = p.split_once('=')?;
            Some((k.trim().to_lowercase(), unquote(v.trim())))
        })
        .collect();
    (mime, params)
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn unquote(v: &str) -> String {
    match v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        Some(inner) => {
            let mut out = String::new();
            let mut chars = inner.chars();
            while let Some(c) = chars.next() {
                if c == '\\' {
                    if let Some(n) = chars.next() {
                        out.push(n);
                    }
                } else {
                    out.push(c);
                }
            }
            out
        }
        None => v.to_string(),
    }
}

/// Splits at `sep` outside double quotes.
fn split_outside_quotes(s: &str, sep: char) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut escaped = false;
    for c in s.chars() {
        if escaped {
            escaped = false;
        } else if quoted && c == '\\' {
            escaped = true;
        } else if c == '"' {
            quoted = !quoted;
        } else if c == sep && !quoted {
            out.push(std::mem::take(&mut cur));
            continue;
        }
        cur.push(c);
    }
    out.push(cur);
    out
}

/// Collects the first text/plain and text/html leaves of a MIME tree.
fn walk(headers: &[(String, String)], body: &str, parts: &mut Parts, depth: usize) {
    let (mime, params) =
        parse_content_type(header_value(headers, "content-type").unwrap_or("text/plain"));
    let mime = if mime.is_empty() {
        "text/plain".to_string()
    } else {
        mime
    };
    if mime.starts_with("multipart/") {
        if let Some(boundary) = param(&params, "boundary")
            && depth < 10
        {
            for part in split_multipart(body, boundary) {
                let (head, body) = split_head_body(&part);
                walk(&parse_headers(head), body, parts, depth + 1);
            }
        }
        return;
    }
    let attachment = header_value(headers, "content-disposition")
        .is_some_and(|d| d.trim().to_lowercase().starts_with("attachment"));
    if attachment {
        return;
    }
    let slot = match mime.as_str() {
        "text/plain" => &mut parts.text,
        "text/html" => &mut parts.html,
        _ => return,
    };
    if slot.is_some() {
        return;
    }
    let cte = header_value(headers, "content-transfer-encoding")
        .unwrap_or("7bit")
        .trim()
        .to_lowercase();
    let text = match cte.as_str() {
        "quoted-printable" => decode_charset(param(&params, "charset"), &decode_qp(body)),
        "base64" => decode_charset(param(&params, "charset"), &decode_base64(body)),
        _ => body.to_string(),
    };
    *slot = Some(text.replace("\r\n", "\n"));
}

/// The parts between `--boundary` lines (without the line break that
/// belongs to the delimiter), up to `--boundary--`.
fn split_multipart(body: &str, boundary: &str) -> Vec<String> {
    let delimiter = format!("--{boundary}");
    let mut parts = Vec::new();
    let mut current: Option<Vec<&str>> = None;
    for line in body.split('\n') {
        let trimmed = line.trim_end();
        if let Some(rest) = trimmed.strip_prefix(delimiter.as_str()) {
            if rest.is_empty() || rest == "--" {
                if let Some(lines) = current.take() {
                    parts.push(lines.join("\n"));
                }
                if rest == "--" {
                    return parts;
                }
                current = Some(Vec::new());
                continue;
            }
        }
        if let Some(lines) = current.as_mut() {
            lines.push(line);
        }
    }
    // No closing delimiter: keep what came.
    if let Some(lines) = current {
        parts.push(lines.join("\n"));
    }
    parts
}

fn hex_val(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Quoted-printable (RFC 2045) to bytes; `\n` line endings in and out.
fn decode_qp(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let lines: Vec<&str> = s.split('\n').collect();
    for (i, line) in lines.iter().enumerate() {
        // Trailing whitespace may have been added in transport.
        let line = line.trim_end_matches([' ', '\t', '\r']);
        let (line, soft) = match line.strip_suffix('=') {
            Some(l) => (l, true),
            None => (line, false),
        };
        let b = line.as_bytes();
        let mut j = 0;
        while j < b.len() {
            if b[j] == b'='
                && j + 2 < b.len()
                && let (Some(h), Some(l)) = (hex_val(b[j + 1]), hex_val(b[j + 2]))
            {
                out.push(h * 16 + l);
                j += 3;
            } else {
                out.push(b[j]);
                j += 1;
            }
        }
        if !soft && i + 1 < lines.len() {
            out.push(b'\n');
        }
    }
    out
}

/// Base64 with any whitespace and padding; the input itself if invalid.
fn decode_base64(s: &str) -> Vec<u8> {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    let engine = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let compact: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    engine
        .decode(compact.as_bytes())
        .unwrap_or_else(|_| s.as_bytes().to_vec())
}

/// Bytes in `charset` (UTF-8 and ASCII, Latin-1; anything else as UTF-8).
fn decode_charset(charset: Option<&str>, bytes: &[u8]) -> String {
    let cs = charset
        .unwrap_or("utf-8")
        .split('*')
        .next()
        .unwrap_or("")
        .trim()
        .to_lowercase();
    match cs.as_str() {
        "iso-8859-1" | "iso8859-1" | "latin1" | "latin-1" | "l1" => {
            bytes.iter().map(|&b| b as char).collect()
        }
        _ => String::from_utf8_lossy(bytes).into_owned(),
    }
}

/// One encoded-word at the start of `s`: its charset, decoded bytes and
/// length.
fn encoded_word(s: &str) -> Option<(String, Vec<u8>, usize)> {
    let rest = s.strip_prefix("=?")?;
    let (charset, rest) = rest.split_once('?')?;
    let (enc, rest) = rest.split_once('?')?;
    let end = rest.find("?=")?;
    let text = &rest[..end];
    if charset.is_empty() || text.contains(|c: char| c.is_whitespace() || c == '?') {
        return None;
    }
    let bytes = match enc {
        "b" | "B" => {
            use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
            let engine = GeneralPurpose::new(
                &base64::alphabet::STANDARD,
                GeneralPurposeConfig::new()
                    .with_decode_padding_mode(DecodePaddingMode::Indifferent),
            );
            engine.decode(text).ok()?
        }
        "q" | "Q" => {
            let b = text.as_bytes();
            let mut out = Vec::new();
            let mut j = 0;
            while j < b.len() {
                match b[j] {
                    b'_' => {
                        out.push(b' ');
                        j += 1;
                    }
                    b'=' if j + 2 < b.len() => {
                        let (h, l) = (hex_val(b[j + 1])?, hex_val(b[j + 2])?);
                        out.push(h * 16 + l);
                        j += 3;
                    }
                    c => {
                        out.push(c);
                        j += 1;
                    }
                }
            }
            out
        }
        _ => return None,
    };
    let len = 2 + charset.len() + 1 + enc.len() + 1 + end + 2;
    Some((charset.to_string(), bytes, len))
}

/// Decodes RFC 2047 encoded-words; whitespace between two adjacent
/// encoded-words is dropped, and adjacent words of one charset are decoded
/// together (a character may be split across them).
pub fn decode_encoded_words(s: &str) -> String {
    let mut out = String::new();
    // Bytes of the encoded-words seen since the last plain text.
    let mut pending: Option<(String, Vec<u8>)> = None;
    let mut rest = s;
    loop {
        let Some(i) = rest.find("=?") else {
            if let Some((cs, bytes)) = pending.take() {
                out.push_str(&decode_charset(Some(&cs), &bytes));
            }
            out.push_str(rest);
            return out;
        };
        match encoded_word(&rest[i..]) {
            Some((charset, bytes, len)) => {
                let between = &rest[..i];
                let adjacent = pending.is_some() && between.chars().all(char::is_whitespace);
                match pending.as_mut() {
                    Some((cs, acc)) if adjacent && cs.eq_ignore_ascii_case(&charset) => {
                        acc.extend_from_slice(&bytes);
                    }
                    _ => {
                        if let Some((cs, acc)) = pending.take() {
                            out.push_str(&decode_charset(Some(&cs), &acc));
                        }
                        if !adjacent {
                            out.push_str(between);
                        }
                        pending = Some((charset, bytes));
                    }
                }
                rest = &rest[i + len..];
            }
            None => {
                if let Some((cs, acc)) = pending.take() {
                    out.push_str(&decode_charset(Some(&cs), &acc));
                }
                out.push_str(&rest[..i + 2]);
                rest = &rest[i + 2..];
            }
        }
    }
}

/// Bare addresses (lowercased) of an address-list header value.
fn addresses(value: &str) -> Vec<String> {
    // Split at commas outside quotes, angle brackets and comments.
    let mut items = Vec::new();
    let mut cur = String::new();
    let (mut quoted, mut escaped, mut angle, mut comment) = (false, false, false, 0usize);
    for c in value.chars() {
        if escaped {
            escaped = false;
            cur.push(c);
            continue;
        }
        match c {
            '\\' if quoted || comment > 0 => escaped = true,
            '"' if comment == 0 => quoted = !quoted,
            '(' if !quoted => comment += 1,
            ')' if !quoted && comment > 0 => comment -= 1,
            '<' if !quoted && comment == 0 => angle = true,
            '>' if !quoted && comment == 0 => angle = false,
            ',' | ';' if !quoted && !angle && comment == 0 => {
                items.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    items.push(cur);
    items
        .into_iter()
        .filter_map(|item| {
            let addr = match (item.rfind('<'), item.rfind('>')) {
                (Some(a), Some(b)) if a < b => item[a + 1..b].to_string(),
                _ => {
                    // Drop comments, and a group's "name:" prefix.
                    let mut bare = String::new();
                    let mut depth = 0usize;
                    for c in item.chars() {
                        match c {
                            '(' => depth += 1,
                            ')' if depth > 0 => depth -= 1,
                            _ if depth == 0 => bare.push(c),
                            _ => {}
                        }
                    }
                    match bare.split_once(':') {
                        Some((_, a)) if !bare.starts_with('"') => a.to_string(),
                        _ => bare,
                    }
                }
            };
            let addr = addr.trim().to_lowercase();
            (!addr.is_empty()).then_some(addr)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// Reads one (possibly multi-line) reply: its code and text.
    fn reply<S: Read>(r: &mut BufReader<S>) -> (u16, String) {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            let n = r.read_line(&mut line).expect("read an SMTP reply");
            assert!(n > 0, "the server closed the connection; so far: {all:?}");
            all.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                let code = line[..3]
                    .parse()
                    .unwrap_or_else(|_| panic!("bad reply {line:?}"));
                return (code, all);
            }
        }
    }

    fn cmd<S: Read + Write>(r: &mut BufReader<S>, line: &str, expect: u16) -> String {
        r.get_mut()
            .write_all(format!("{line}\r\n").as_bytes())
            .unwrap();
        r.get_mut().flush().unwrap();
        let (code, text) = reply(r);
        assert_eq!(code, expect, "`{line}` got {text:?}");
        text
    }

    /// MAIL FROM, RCPT TO, DATA (dot-stuffed, CRLF line endings).
    fn transaction<S: Read + Write>(r: &mut BufReader<S>, from: &str, rcpts: &[&str], data: &str) {
        cmd(r, &format!("MAIL FROM:<{from}>"), 250);
        for rcpt in rcpts {
            cmd(r, &format!("RCPT TO:<{rcpt}>"), 250);
        }
        cmd(r, "DATA", 354);
        let mut wire = String::new();
        for line in data
            .replace("\r\n", "\n")
            .trim_end_matches('\n')
            .split('\n')
        {
            if line.starts_with('.') {
                wire.push('.');
            }
            wire.push_str(line);
            wire.push_str("\r\n");
        }
        wire.push_str(".\r\n");
        r.get_mut().write_all(wire.as_bytes()).unwrap();
        let (code, text) = reply(r);
        assert_eq!(code, 250, "end of DATA got {text:?}");
    }

    fn connect(port: u16) -> BufReader<TcpStream> {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the sink");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut r = BufReader::new(s);
        let (code, text) = reply(&mut r);
        assert_eq!(code, 220, "banner {text:?}");
        r
    }

    /// A whole plain-text SMTP session.
    fn send(port: u16, from: &str, rcpts: &[&str], data: &str) {
        let mut r = connect(port);
        cmd(&mut r, "EHLO client.test", 250);
        transaction(&mut r, from, rcpts, data);
        cmd(&mut r, "QUIT", 221);
    }

    const PLAIN: &str = "From: Trunkfarm <hub@farm.test>\r\n\
To: \"Doe, Jane\" <Jane@Example.test>, bob@example.test\r\n\
Subject: =?utf-8?q?Caf=C3=A9_cr=C3=A8me?=\r\n =?utf-8?b?IOKAlCDinJM=?= done\r\n\
X-Folded: first part\r\n\tsecond part\r\n   third\r\n\
MIME-Version: 1.0\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
Content-Transfer-Encoding: 7bit\r\n\
\r\n\
Hello Jane,\r\n\
.hidden line starting with a dot\r\n\
bye\r\n";

    const ALTERNATIVE: &str = "From: hub@farm.test\r\n\
To: ops@example.test\r\n\
Subject: Build #42 failed\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/alternative;\r\n boundary=\"=_b0und; ary\"\r\n\
\r\n\
This is a multi-part message.\r\n\
--=_b0und; ary\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
Content-Transfer-Encoding: quoted-printable\r\n\
\r\n\
Le build num=C3=A9ro 42 a =C3=A9chou=C3=A9. Une tr=\r\n\
=C3=A8s longue ligne, 1+1=3D2.\r\n\
--=_b0und; ary\r\n\
Content-Type: text/html; charset=\"UTF-8\"\r\n\
Content-Transfer-Encoding: base64\r\n\
\r\n\
PHA+QnVpbGQgPGI+IzQyPC9iPiBmYWlsZWQg\r\n\
4oCUIHNlZSBsb2c8L3A+DQo=\r\n\
--=_b0und; ary--\r\n\
epilogue\r\n";

    fn third(n: u32) -> String {
        format!(
            "From: hub@farm.test\r\nTo: <Ops@Example.test>\r\nSubject: after restart {n}\r\n\r\nstill here\r\n"
        )
    }

    #[test]
    fn sink_receives_parses_and_survives_a_restart() {
        let started = Instant::now();
        let mut sink = SmtpSink::start();
        assert!(sink.messages().is_empty());
        assert!(sink.cert_pem_path().is_none());
        let port = sink.port();

        send(
            port,
            "hub@farm.test",
            &["Jane@Example.test", "bob@example.test"],
            PLAIN,
        );
        send(port, "hub@farm.test", &["ops@example.test"], ALTERNATIVE);
        let mails = sink.wait_for_messages(2, Duration::from_secs(10));
        assert_eq!(mails.len(), 2);

        let a = &mails[0];
        assert_eq!(a.subject(), "Café crème — ✓ done");
        assert_eq!(
            a.header("x-folded").as_deref(),
            Some("first part\tsecond part   third")
        );
        assert_eq!(a.to(), ["jane@example.test", "bob@example.test"]);
        assert_eq!(a.envelope_to(), ["jane@example.test", "bob@example.test"]);
        assert_eq!(a.envelope_from().as_deref(), Some("hub@farm.test"));
        assert!(
            a.header("X-Peer").is_some_and(|p| p.contains("127.0.0.1")),
            "{:?}",
            a.headers
        );
        assert_eq!(
            a.text.trim_end(),
            "Hello Jane,\n.hidden line starting with a dot\nbye"
        );
        assert_eq!(a.html, None);

        let b = &mails[1];
        assert_eq!(b.subject(), "Build #42 failed");
        assert_eq!(b.to(), ["ops@example.test"]);
        assert_eq!(
            b.text,
            "Le build numéro 42 a échoué. Une très longue ligne, 1+1=2."
        );
        assert_eq!(
            b.html.as_deref(),
            Some("<p>Build <b>#42</b> failed — see log</p>\n")
        );

        sink.stop();
        assert!(!sink.is_running());
        let err = TcpStream::connect(("127.0.0.1", port))
            .expect_err("a stopped sink still accepts connections");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
        assert_eq!(sink.messages().len(), 2, "stopping lost messages");

        sink.restart();
        assert_eq!(sink.port(), port);
        send(port, "hub@farm.test", &["ops@example.test"], &third(3));
        let mails = sink.wait_for_messages(3, Duration::from_secs(10));
        let subjects: Vec<String> = mails.iter().map(Mail::subject).collect();
        assert_eq!(
            subjects,
            ["Café crème — ✓ done", "Build #42 failed", "after restart 3"]
        );
        assert_eq!(mails[2].to(), ["ops@example.test"]);
        assert_eq!(mails[2].text, "still here\n");
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "took {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn starttls_sink_requires_tls_with_a_trusted_certificate() {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, ServerName};

        crate::init();
        let sink = SmtpSink::start_starttls();
        let ca = sink.cert_pem_path().expect("a STARTTLS sink has a CA");
        assert!(ca.is_file());

        let mut r = connect(sink.port());
        let ehlo = cmd(&mut r, "EHLO client.test", 250);
        assert!(ehlo.contains("STARTTLS"), "{ehlo}");
        // TLS is required before a transaction.
        r.get_mut()
            .write_all(b"MAIL FROM:<hub@farm.test>\r\n")
            .unwrap();
        let (code, text) = reply(&mut r);
        assert_eq!(code, 530, "plain MAIL FROM got {text:?}");
        cmd(&mut r, "STARTTLS", 220);
        let tcp = r.into_inner();

        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(ca).expect("read the CA"))
            .unwrap();
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        // What a hub configured with host 127.0.0.1 checks.
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
        let mut r = BufReader::new(rustls::StreamOwned::new(conn, tcp));
        cmd(&mut r, "EHLO client.test", 250);
        transaction(&mut r, "hub@farm.test", &["sec@example.test"], &third(1));
        cmd(&mut r, "QUIT", 221);

        let mails = sink.wait_for_messages(1, Duration::from_secs(10));
        assert_eq!(mails[0].subject(), "after restart 1");
        assert_eq!(mails[0].envelope_to(), ["sec@example.test"]);
    }

    #[test]
    fn restart_waits_for_a_busy_port() {
        let mut sink = SmtpSink::start();
        let port = sink.port();
        sink.stop();
        // Someone holds the port for a second: restart retries until it is free.
        let blocker = TcpListener::bind(("127.0.0.1", port)).expect("take the sink's port");
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(1000));
            drop(blocker);
        });
        let started = Instant::now();
        sink.restart();
        release.join().unwrap();
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "restarted on a taken port?"
        );
        assert!(sink.is_running());
        assert_eq!(sink.port(), port);
        send(port, "hub@farm.test", &["ops@example.test"], &third(1));
        assert_eq!(sink.wait_for_messages(1, Duration::from_secs(10)).len(), 1);
        assert!(
            sink.logs().contains("address already in use"),
            "the first restart attempt should have found the port taken"
        );
    }

    #[test]
    fn parses_without_a_server() {
        assert_eq!(
            decode_encoded_words(
                "=?UTF-8?B?w6k=?= =?utf-8?Q?=C3=A8?=  and =?iso-8859-1?q?=E9t=E9?="
            ),
            "éè  and été"
        );
        // One character split across two words.
        assert_eq!(
            decode_encoded_words("=?utf-8?b?ww==?=\r\n =?utf-8?b?qQ==?="),
            "é"
        );
        assert_eq!(
            decode_encoded_words("x =?bogus and =?utf-8?q?ok?="),
            "x =?bogus and ok"
        );
        assert_eq!(
            addresses("Group: a@x.test, \"Last, First\" <B@X.test> (c), d@x.test (Dee);"),
            ["a@x.test", "b@x.test", "d@x.test"]
        );
        let m = Mail::parse(b"Subject: hi\nContent-Type: text/html\n\n<p>x</p>\n");
        assert_eq!(m.subject(), "hi");
        assert_eq!(m.text, "");
        assert_eq!(m.html.as_deref(), Some("<p>x</p>\n"));
        assert_eq!(decode_qp("a=\nb =3D c  \nd=4"), b"ab = c\nd=4");
        let mut keys = [
            maildir_key("1795440916.M87476P27930Q2.vm"),
            maildir_key("1795440916.M100P27930Q10.vm"),
        ];
        keys.sort();
        assert_eq!(keys[0], (1795440916, 100, 10));
    }
}
