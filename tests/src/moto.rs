//! A real EC2 and S3 API for the tests of the `ec2` provisioner and the
//! `[storage] backend = "s3"` object store: `moto_server`
//! (Python's `moto[server]`), started as a process on 127.0.0.1, and a tiny
//! client of its Query API over plain HTTP.
//!
//! moto checks no signature unless it is started with
//! `INITIAL_NO_AUTH_ACTION_COUNT=N` (then only the first N calls go
//! unchecked; [`Moto::create_access_key`] spends three), so the test's own
//! calls carry a dummy `Authorization` header that only names the service.
//! `TRUNKFARM_E2E_MOTO` overrides the `moto_server` command (else
//! `python3 -m moto.server` when `moto_server` is not on PATH); install it
//! with `python3 -m pip install 'moto[server]'`.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use tempfile::TempDir;

use crate::{Proc, read_lossy, tail, temp_dir};

/// How long moto may take to answer once started (it is a Python program).
pub const MOTO_START_TIMEOUT: Duration = Duration::from_secs(40);

/// A stock AMI every moto ships (also accepted with `MOTO_ENABLE_AMI_VALIDATION`).
pub const STOCK_AMI: &str = "ami-03cf127a";

/// A `moto_server` process, killed when dropped (its output is printed when
/// a test panics).
pub struct Moto {
    port: u16,
    dir: TempDir,
    proc: Option<Proc>,
    /// How it was started (for [`Moto::restart`]).
    cmd: Vec<String>,
    env: Vec<(String, String)>,
}

/// The command that starts moto's server: `TRUNKFARM_E2E_MOTO`, else
/// `moto_server` on PATH, else `python3 -m moto.server` (a `pip install
/// --user` puts the script where PATH may not look).
fn moto_command() -> Option<Vec<String>> {
    if let Ok(cmd) = std::env::var("TRUNKFARM_E2E_MOTO") {
        return Some(cmd.split_whitespace().map(str::to_string).collect());
    }
    if on_path("moto_server") {
        return Some(vec!["moto_server".into()]);
    }
    let python = std::env::var("TRUNKFARM_E2E_PYTHON").unwrap_or_else(|_| "python3".into());
    let importable = Command::new(&python)
        .args(["-c", "import moto.server"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    importable.then(|| vec![python, "-m".into(), "moto.server".into()])
}

/// Takes every AWS credential source away from `cmd` (the variables, and
/// `HOME` pointed at `home`, which has no `.aws/credentials`).
pub fn without_aws_credentials(cmd: &mut Command, home: &std::path::Path) {
    for var in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_SHARED_CREDENTIALS_FILE",
        "AWS_PROFILE",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("HOME", home);
}

fn on_path(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// Percent-encodes a form value (RFC 3986 unreserved characters stay).
pub fn form_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One HTTP/1.1 request with `Connection: close`; the status and body.
fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> Result<(u16, String), String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n{headers}\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP header end in {text:?}"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no HTTP status in {head:?}"))?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:")
            && l.to_ascii_lowercase().contains("chunked")
    });
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

/// Every `<tag>…</tag>` text in `xml`, in order.
pub fn xml_values(xml: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        let after = &rest[i + open.len()..];
        let Some(j) = after.find(&close) else { break };
        out.push(after[..j].to_string());
        rest = &after[j + close.len()..];
    }
    out
}

impl Moto {
    /// Starts `moto_server` on a free 127.0.0.1 port with `env` set (e.g.
    /// `MOTO_ENABLE_AMI_VALIDATION=true`) and waits until it answers.
    pub fn start(env: &[(&str, &str)]) -> Moto {
        let cmd = moto_command().unwrap_or_else(|| {
            panic!(
                "moto's server is not installed: the EC2 tests need it (`python3 -m pip install 'moto[server]'`; \
                 TRUNKFARM_E2E_MOTO names another command)"
            )
        });
        let dir = temp_dir("trunkfarm-e2e-moto-");
        let mut moto = Moto {
            port: 0,
            dir,
            proc: None,
            cmd,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        for attempt in 1..=5 {
            moto.port = free_port();
            if moto.spawn(attempt) {
                return moto;
            }
        }
        panic!("moto_server would not start\n{}", moto.log_tail(40));
    }

    /// Starts the server on `self.port`; false if it exited at once (the
    /// port was taken, most likely).
    fn spawn(&mut self, attempt: u32) -> bool {
        let mut c = Command::new(&self.cmd[0]);
        c.args(&self.cmd[1..])
            .args(["-H", "127.0.0.1", "-p", &self.port.to_string()])
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1");
        for (k, v) in &self.env {
            c.env(k, v);
        }
        let log = self.log_prefix();
        self.proc = Some(Proc::spawn(
            &format!("moto_server (attempt {attempt})"),
            c,
            &log,
        ));
        let deadline = Instant::now() + MOTO_START_TIMEOUT;
        loop {
            // /moto-api/ is moto's own page: not an AWS call, so it does
            // not count against INITIAL_NO_AUTH_ACTION_COUNT.
            if let Ok((200, _)) = http(self.port, "GET", "/moto-api/", "", "") {
                return true;
            }
            if self.proc.as_mut().unwrap().try_wait().is_some() {
                return false;
            }
            assert!(
                Instant::now() < deadline,
                "moto_server did not answer within {MOTO_START_TIMEOUT:?}\n{}",
                self.log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills the server (an outage: connections are refused).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    /// Starts the server again on the same port (its state is gone: moto
    /// keeps everything in memory).
    pub fn restart(&mut self) {
        let deadline = Instant::now() + MOTO_START_TIMEOUT;
        for attempt in 10.. {
            if self.spawn(attempt) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "moto_server would not start again on port {}\n{}",
                self.port,
                self.log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// `http://127.0.0.1:PORT`: the hub's `pool.ec2.endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Calls `action` of `service` (`ec2`, `iam`) unsigned; the status and
    /// answer.
    pub fn call(
        &self,
        service: &str,
        version: &str,
        action: &str,
        params: &[(&str, &str)],
    ) -> (u16, String) {
        let mut body = format!("Action={action}&Version={version}");
        for (k, v) in params {
            body.push_str(&format!("&{}={}", form_encode(k), form_encode(v)));
        }
        let headers = format!(
            "Content-Type: application/x-www-form-urlencoded; charset=utf-8\r\n\
             Authorization: AWS4-HMAC-SHA256 Credential=testing/20240101/us-east-1/{service}/aws4_request, SignedHeaders=host, Signature=00\r\n"
        );
        http(self.port, "POST", "/", &headers, &body)
            .unwrap_or_else(|e| panic!("moto {service} {action}: {e}\n{}", self.log_tail(30)))
    }

    /// One S3 request (path-style: `/<bucket>/<key>?<query>`), unsigned but
    /// carrying an S3 `Authorization` header as moto wants; status and body.
    pub fn s3(&self, method: &str, path_and_query: &str, body: &[u8]) -> (u16, Vec<u8>) {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let send = || -> Result<(u16, Vec<u8>), String> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                .map_err(|e| format!("connect: {e}"))?;
            s.set_read_timeout(Some(Duration::from_secs(30)))
                .map_err(|e| e.to_string())?;
            let head = format!(
                "{method} {path_and_query} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\nContent-Length: {}\r\n\
                 Authorization: AWS4-HMAC-SHA256 Credential=testing/20240101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=00\r\n\
                 x-amz-content-sha256: UNSIGNED-PAYLOAD\r\n\r\n",
                self.port,
                body.len()
            );
            s.write_all(head.as_bytes())
                .and_then(|()| s.write_all(body))
                .map_err(|e| format!("send: {e}"))?;
            let mut raw = Vec::new();
            s.read_to_end(&mut raw).map_err(|e| format!("read: {e}"))?;
            let end = raw
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .ok_or("no HTTP header end")?;
            let head = String::from_utf8_lossy(&raw[..end]).into_owned();
            let status: u16 = head
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| format!("no HTTP status in {head:?}"))?;
            let mut body = raw[end + 4..].to_vec();
            if head
                .to_ascii_lowercase()
                .contains("transfer-encoding: chunked")
            {
                body = dechunk(&String::from_utf8_lossy(&body)).into_bytes();
            }
            Ok((status, body))
        };
        send().unwrap_or_else(|e| {
            panic!(
                "moto s3 {method} {path_and_query}: {e}\n{}",
                self.log_tail(30)
            )
        })
    }

    /// Creates an S3 bucket (the hub's `storage.bucket`).
    pub fn create_bucket(&self, bucket: &str) {
        let (status, body) = self.s3("PUT", &format!("/{bucket}"), b"");
        assert_eq!(
            status,
            200,
            "moto refused to create bucket {bucket}: {}",
            String::from_utf8_lossy(&body)
        );
    }

    /// The keys in `bucket` that start with `prefix`, sorted.
    pub fn s3_keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut q = format!("/{bucket}?list-type=2&prefix={}", form_encode(prefix));
            if let Some(t) = &token {
                q.push_str(&format!("&continuation-token={}", form_encode(t)));
            }
            let (status, body) = self.s3("GET", &q, b"");
            let body = String::from_utf8_lossy(&body).into_owned();
            assert_eq!(status, 200, "moto ListObjectsV2 {bucket} {prefix}: {body}");
            keys.extend(xml_values(&body, "Key"));
            token = xml_values(&body, "NextContinuationToken")
                .into_iter()
                .next();
            if token.is_none() {
                break;
            }
        }
        keys.sort();
        keys
    }

    /// The bytes of `bucket`/`key` (panics unless it exists).
    pub fn s3_get(&self, bucket: &str, key: &str) -> Vec<u8> {
        let (status, body) = self.s3("GET", &format!("/{bucket}/{key}"), b"");
        assert_eq!(
            status,
            200,
            "moto GetObject {bucket}/{key}: {}",
            String::from_utf8_lossy(&body)
        );
        body
    }

    /// Overwrites `bucket`/`key` with `body` (a tampering attacker with
    /// access to the bucket).
    pub fn s3_put(&self, bucket: &str, key: &str, body: &[u8]) {
        let (status, answer) = self.s3("PUT", &format!("/{bucket}/{key}"), body);
        assert_eq!(
            status,
            200,
            "moto PutObject {bucket}/{key}: {}",
            String::from_utf8_lossy(&answer)
        );
    }

    /// An EC2 call that must succeed; its answer.
    pub fn ec2(&self, action: &str, params: &[(&str, &str)]) -> String {
        let (status, body) = self.call("ec2", "2016-11-15", action, params);
        assert_eq!(status, 200, "moto refused {action} {params:?}: {body}");
        body
    }

    /// Ids of the instances matching the filters (`tag:<key>`,
    /// `instance-state-name`, ...).
    pub fn instance_ids(&self, filters: &[(&str, &[&str])]) -> Vec<String> {
        let mut params: Vec<(String, String)> = Vec::new();
        for (i, (name, values)) in filters.iter().enumerate() {
            params.push((format!("Filter.{}.Name", i + 1), name.to_string()));
            for (j, v) in values.iter().enumerate() {
                params.push((format!("Filter.{}.Value.{}", i + 1, j + 1), v.to_string()));
            }
        }
        let p: Vec<(&str, &str)> = params
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let mut ids = xml_values(&self.ec2("DescribeInstances", &p), "instanceId");
        ids.dedup();
        ids
    }

    /// The state (`running`, `terminated`...) of one instance.
    pub fn state(&self, id: &str) -> String {
        let xml = self.ec2("DescribeInstances", &[("InstanceId.1", id)]);
        let state = xml
            .split_once("<instanceState>")
            .map(|(_, s)| s)
            .unwrap_or_default();
        xml_values(state, "name")
            .into_iter()
            .next()
            .unwrap_or_default()
    }

    /// Starts an instance with these tags (as some hub would have); its id.
    pub fn run_instance(&self, tags: &[(&str, &str)]) -> String {
        let mut params: Vec<(String, String)> = vec![
            ("ImageId".into(), STOCK_AMI.into()),
            ("InstanceType".into(), "t2.micro".into()),
            ("MinCount".into(), "1".into()),
            ("MaxCount".into(), "1".into()),
            ("TagSpecification.1.ResourceType".into(), "instance".into()),
        ];
        for (i, (k, v)) in tags.iter().enumerate() {
            params.push((
                format!("TagSpecification.1.Tag.{}.Key", i + 1),
                k.to_string(),
            ));
            params.push((
                format!("TagSpecification.1.Tag.{}.Value", i + 1),
                v.to_string(),
            ));
        }
        let p: Vec<(&str, &str)> = params
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        xml_values(&self.ec2("RunInstances", &p), "instanceId")
            .into_iter()
            .next()
            .expect("RunInstances named no instance")
    }

    /// An instance's user data, decoded.
    pub fn user_data(&self, id: &str) -> String {
        let xml = self.ec2(
            "DescribeInstanceAttribute",
            &[("InstanceId", id), ("Attribute", "userData")],
        );
        let inner = xml
            .split_once("<userData>")
            .map(|(_, s)| s)
            .unwrap_or_default();
        let b64 = xml_values(inner, "value")
            .into_iter()
            .next()
            .unwrap_or_default();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .unwrap_or_else(|e| panic!("the user data of {id} is not base64 ({e}): {xml}"));
        String::from_utf8(raw).expect("user data is UTF-8")
    }

    /// Makes an IAM user allowed `ec2:*` and an access key for it (three
    /// calls: a moto started with `INITIAL_NO_AUTH_ACTION_COUNT=3` checks
    /// every signature after them); the key id and secret.
    pub fn create_access_key(&self) -> (String, String) {
        let iam = |action: &str, params: &[(&str, &str)]| {
            let (status, body) = self.call("iam", "2010-05-08", action, params);
            assert_eq!(status, 200, "moto refused IAM {action}: {body}");
            body
        };
        iam("CreateUser", &[("UserName", "hub")]);
        let key = iam("CreateAccessKey", &[("UserName", "hub")]);
        let policy = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"ec2:*","Resource":"*"}]}"#;
        iam(
            "PutUserPolicy",
            &[
                ("UserName", "hub"),
                ("PolicyName", "ec2"),
                ("PolicyDocument", policy),
            ],
        );
        let id = xml_values(&key, "AccessKeyId")
            .into_iter()
            .next()
            .expect("AccessKeyId");
        let secret = xml_values(&key, "SecretAccessKey")
            .into_iter()
            .next()
            .expect("SecretAccessKey");
        (id, secret)
    }

    fn log_prefix(&self) -> PathBuf {
        self.dir.path().join("moto")
    }

    /// The last `n` lines of moto's output (its request log).
    pub fn log_tail(&self, n: usize) -> String {
        let p = self.log_prefix();
        format!(
            "---- moto_server ({}) stdout, last {n} lines ----\n{}\n---- moto_server stderr, last {n} lines ----\n{}",
            self.dir.path().display(),
            tail(&read_lossy(&p.with_extension("stdout.log")), n),
            tail(&read_lossy(&p.with_extension("stderr.log")), n)
        )
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "\n==== moto_server on port {} ====\n{}",
                self.port,
                self.log_tail(60)
            );
        }
        self.proc = None;
    }
}
