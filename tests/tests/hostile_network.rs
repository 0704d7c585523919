//! Hostile network: one unauthenticated client must not take the hub down.
//! Attackers here are real clients on loopback: idle TCP sockets, a raw
//! HTTP/2 client over real TLS opening unfinished `Enroll` streams, a web
//! client dripping its headers, an address guessing enrollment tokens.

use std::future::poll_fn;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message as _;
use trunkfarm_e2e::proto::v1::EnrollRequest;
use trunkfarm_e2e::{Agent, Hub, HubOptions, combined, init, wait_for};

const ENROLL: &str = "/trunkfarm.v1.AgentService/Enroll";

/// Raises this test process's own open-files limit to at least `want`
/// (the hard limit too when allowed, as for root): the attacker needs more
/// sockets than 1024.
fn raise_own_open_files(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let want = want as libc::rlim_t;
    // SAFETY: getrlimit/setrlimit on structs we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur < want {
            let raised = libc::rlimit {
                rlim_cur: want,
                rlim_max: lim.rlim_max.max(want),
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
                lim.rlim_cur = want.min(lim.rlim_max);
                assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
            }
            assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        }
        assert!(
            lim.rlim_cur >= 1200,
            "this test needs 1200 open files; the hard limit is {}",
            lim.rlim_max
        );
    }
}

/// A `/proc/<pid>/status` figure in bytes (`VmRSS`, `VmHWM`).
fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap();
    kib * 1024
}

/// The web endpoint's address, from `hub.json`.
fn web_addr(hub: &Hub) -> SocketAddr {
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hub.data_dir.join("hub.json")).unwrap())
            .unwrap();
    info["web"].as_str().unwrap().parse().unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A raw HTTP/2 connection to the hub over TLS (trusting the hub's CA
/// file), from `source` if given: the attacker's own client, which does
/// whatever it likes with streams and flow control.
async fn raw_h2(hub: &Hub, source: Option<IpAddr>) -> h2::client::SendRequest<Bytes> {
    init();
    let addr: SocketAddr = hub.address().parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0)).unwrap();
    }
    let tcp = socket.connect(addr).await.unwrap();
    let ca = std::fs::read(hub.data_dir.join("tls").join("ca.pem")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject as _;
        for cert in CertificateDer::pem_slice_iter(&ca) {
            roots.add(cert.unwrap()).unwrap();
        }
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls::pki_types::ServerName::IpAddress(addr.ip().into()),
            tcp,
        )
        .await
        .unwrap();
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

fn grpc_request(path: &str) -> http::Request<()> {
    grpc_request_with(path, None)
}

/// A gRPC request's headers, with `authorization: Bearer <bearer>` if given.
fn grpc_request_with(path: &str, bearer: Option<&str>) -> http::Request<()> {
    let mut b = http::Request::builder()
        .method("POST")
        .uri(format!("https://127.0.0.1{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(token) = bearer {
        b = b.header("authorization", format!("Bearer {token}"));
    }
    b.body(()).unwrap()
}

/// One length-prefixed gRPC message.
fn grpc_frame(msg: &[u8]) -> Bytes {
    let mut b = vec![0u8];
    b.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    b.extend_from_slice(msg);
    Bytes::from(b)
}

/// `grpc-message` is percent-encoded.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(b) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A unary `Enroll` over `send`: the status code and message.
async fn enroll(send: &mut h2::client::SendRequest<Bytes>, token: &str) -> (u32, String) {
    let req = EnrollRequest {
        token: token.to_string(),
        name: "probe".into(),
        protocol_version: trunkfarm_e2e::proto::PROTOCOL_VERSION,
        agent_version: "test".into(),
    };
    unary(send, grpc_request(ENROLL), &req.encode_to_vec()).await
}

/// One unary call over `send`: the status code and message.
async fn unary(
    send: &mut h2::client::SendRequest<Bytes>,
    request: http::Request<()>,
    message: &[u8],
) -> (u32, String) {
    let mut ready = send.clone().ready().await.unwrap();
    let (response, mut stream) = ready.send_request(request, false).unwrap();
    stream.send_data(grpc_frame(message), true).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .expect("an answer to the call")
        .unwrap();
    let status_of = |h: &http::HeaderMap| {
        h.get("grpc-status").map(|v| {
            (
                v.to_str().unwrap().parse::<u32>().unwrap(),
                percent_decode(
                    h.get("grpc-message")
                        .map(|m| m.to_str().unwrap())
                        .unwrap_or(""),
                ),
            )
        })
    };
    if let Some(s) = status_of(response.headers()) {
        return s;
    }
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body.trailers().await.unwrap().expect("trailers");
    status_of(&trailers).expect("grpc-status in the trailers")
}

/// Sends a gRPC message header announcing `announced` bytes, then up to
/// `total` bytes of it within the flow-control windows, and never ends
/// the stream. Returns what was sent.
async fn push_unfinished(mut stream: h2::SendStream<Bytes>, announced: u32, total: usize) -> usize {
    const CHUNK: usize = 16 * 1024;
    let mut header = vec![0u8];
    header.extend_from_slice(&announced.to_be_bytes());
    if stream.send_data(Bytes::from(header), false).is_err() {
        return 0;
    }
    let mut sent = 0;
    while sent < total {
        stream.reserve_capacity(CHUNK);
        let granted = tokio::time::timeout(
            Duration::from_secs(3),
            poll_fn(|cx| stream.poll_capacity(cx)),
        )
        .await;
        let n = match granted {
            Ok(Some(Ok(n))) if n > 0 => n.min(CHUNK),
            _ => break,
        };
        if stream.send_data(Bytes::from(vec![7u8; n]), false).is_err() {
            break;
        }
        sent += n;
    }
    // Kept open (unfinished) until the caller drops the connection.
    std::mem::forget(stream);
    sent
}

#[test]
fn under_1024_open_files_a_flood_of_idle_sockets_does_not_lock_agents_or_the_cli_out() {
    raise_own_open_files(4096);
    let hub = Hub::start_opts(
        "",
        HubOptions {
            open_files: Some(1024),
            ..HubOptions::default()
        },
    );
    let addr: SocketAddr = hub.address().parse().unwrap();
    // 1,100 plain TCP connections that never send a byte, all kept open.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut idle = Vec::new();
    while idle.len() < 1100 && Instant::now() < deadline {
        if let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            idle.push(s);
        }
    }
    assert!(
        idle.len() >= 1024,
        "only {} idle sockets connected",
        idle.len()
    );
    // A real agent enrolls and comes online; the CLI answers.
    let mut agent = Agent::enroll(&hub, "survivor", &[]);
    agent.start(&[]);
    hub.wait_agents_connected(1);
    let list = hub.cli_ok(&["agent", "list"]);
    assert!(list.contains("survivor"), "{list}");
    // The idle sockets are closed by the hub, not held forever: the newest
    // after the TLS handshake timeout (10 s), the older ones sooner (pushed
    // out to make room).
    let newest = idle.last_mut().unwrap();
    newest
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut buf = [0u8; 16];
    let n = newest.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the hub sent bytes to a socket that sent none");
    let logs = hub.logs();
    assert!(
        logs.contains("open-files limit") && logs.contains("limit=1024"),
        "the hub logs its open-files limit:\n{logs}"
    );
    drop(idle);
    assert_eq!(hub.agents().len(), 1);
}

#[test]
fn unfinished_unauthenticated_enroll_streams_on_one_connection_stay_small() {
    let hub = Hub::start();
    let rt = runtime();
    let pid = hub.pid();
    rt.block_on(async {
        // Warm up: one ordinary (refused) enrollment on its own connection.
        let mut warm = raw_h2(&hub, None).await;
        let (code, _) = enroll(&mut warm, "tok_000000000000.not-a-secret").await;
        assert_eq!(code, 16, "an unknown token is UNAUTHENTICATED");
    });
    let before = proc_status_bytes(pid, "VmRSS");
    let (opened, pushed) = rt.block_on(async {
        let send = raw_h2(&hub, None).await;
        let mut pumps = Vec::new();
        let mut responses = Vec::new();
        for _ in 0..150 {
            let Ok(Ok(mut ready)) =
                tokio::time::timeout(Duration::from_secs(3), send.clone().ready()).await
            else {
                break;
            };
            let Ok((response, stream)) = ready.send_request(grpc_request(ENROLL), false) else {
                break;
            };
            responses.push(response);
            // Announce a message just under the hub's 4 MiB limit and send
            // nearly all of it, never the end.
            pumps.push(tokio::spawn(push_unfinished(
                stream,
                4 * 1024 * 1024 - 1,
                4 * 1024 * 1024 - 64 * 1024,
            )));
        }
        let opened = pumps.len();
        let mut pushed = 0;
        for p in pumps {
            pushed += tokio::time::timeout(Duration::from_secs(90), p)
                .await
                .expect("the attacker's pushes end")
                .unwrap();
        }
        // Measured while the connection and its streams are still open.
        std::mem::forget(responses);
        std::mem::forget(send);
        (opened, pushed)
    });
    let after = proc_status_bytes(pid, "VmRSS");
    let peak = proc_status_bytes(pid, "VmHWM");
    const MIB: u64 = 1024 * 1024;
    eprintln!(
        "{opened} streams, {} MiB pushed; VmRSS {} -> {} MiB, peak {} MiB",
        pushed as u64 / MIB,
        before / MIB,
        after / MIB,
        peak / MIB
    );
    assert_eq!(opened, 150, "the attacker could not open its 150 streams");
    assert!(
        after.saturating_sub(before) < 50 * MIB && peak.saturating_sub(before) < 50 * MIB,
        "150 unfinished Enroll streams grew the hub from {} MiB to {} MiB (peak {} MiB)",
        before / MIB,
        after / MIB,
        peak / MIB
    );
    // The hub still serves.
    assert!(hub.agents().is_empty());
    drop(rt);
}

#[test]
fn a_web_client_dripping_its_headers_is_cut_off() {
    let hub = Hub::start();
    let web = web_addr(&hub);
    let mut slow = TcpStream::connect(web).unwrap();
    slow.set_read_timeout(Some(Duration::from_millis(250)))
        .unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        .unwrap();
    // One byte every 250 ms of a header that never ends, for up to 30 s.
    let started = Instant::now();
    let mut cut_off = false;
    while started.elapsed() < Duration::from_secs(30) {
        if slow.write_all(b"a").is_err() {
            cut_off = true;
            break;
        }
        let mut buf = [0u8; 512];
        match slow.read(&mut buf) {
            Ok(0) => {
                cut_off = true;
                break;
            }
            Ok(n) => {
                // hyper may answer 408 before closing: that is a cut too.
                let text = String::from_utf8_lossy(&buf[..n]);
                assert!(!text.contains(" 200 "), "answered: {text}");
                cut_off = true;
                break;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => {
                cut_off = true;
                break;
            }
        }
    }
    assert!(
        cut_off,
        "a client dripping its headers was still connected after {:?}",
        started.elapsed()
    );
    // A prompt client is served.
    let mut ok = TcpStream::connect(web).unwrap();
    ok.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut reply = String::new();
    ok.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
}

#[test]
fn bad_enrollments_from_one_address_are_logged_and_rate_limited() {
    let hub = Hub::start_with(
        "\n[network]\nenroll_failures = 3\nenroll_failure_window = \"3s\"\n",
        &[],
    );
    let good = hub.create_token(&["--uses", "5"]);
    let good_token = trunkfarm_e2e::proto::enrollment::Enrollment::parse(&good)
        .unwrap()
        .token;
    let rt = runtime();
    let bad_secret = "bad-secret-that-must-not-be-logged";
    rt.block_on(async {
        let mut attacker = raw_h2(&hub, None).await;
        for i in 0..3 {
            let (code, msg) =
                enroll(&mut attacker, &format!("tok_0000000000{i:02}.{bad_secret}")).await;
            assert_eq!(code, 16, "attempt {i}: {msg}");
        }
        let (code, msg) = enroll(&mut attacker, &format!("tok_000000000099.{bad_secret}")).await;
        assert_eq!(code, 8, "RESOURCE_EXHAUSTED after the burst: {msg}");
        assert!(
            msg.contains("too many failed enrollments from 127.0.0.1")
                && msg.contains("try again in"),
            "{msg}"
        );
        // Another address is not held back by this one: a good enrollment
        // from 127.0.0.2 goes through at once.
        let mut other = raw_h2(&hub, Some("127.0.0.2".parse().unwrap())).await;
        let (code, msg) = enroll(&mut other, &good_token).await;
        assert_eq!(code, 0, "a good enrollment from another address: {msg}");
    });
    // The real agent from the limited address is told when to retry...
    let waiting = Agent::unenrolled("patient");
    let out = waiting.try_enroll(&good, &[]);
    assert!(!out.status.success());
    assert!(
        combined(&out).contains("try again in"),
        "{}",
        combined(&out)
    );
    // ...and enrolls once the allowance refilled (one failure a second).
    let agent = wait_for(
        Duration::from_secs(10),
        "a good enrollment after the wait",
        || {
            std::thread::sleep(Duration::from_millis(500));
            let a = Agent::unenrolled("patient");
            a.try_enroll(&good, &[]).status.success().then_some(a)
        },
    );
    drop(agent);
    let logs = hub.logs();
    let refusals: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("enrollment refused"))
        .collect();
    assert!(
        refusals.len() >= 4 && refusals.iter().all(|l| l.contains("peer=127.0.0.1")),
        "each failure and the rate limit are logged with the address:\n{logs}"
    );
    assert!(
        refusals
            .iter()
            .any(|l| l.contains("too many failed enrollments")),
        "{logs}"
    );
    assert!(
        !logs.contains(bad_secret) && !logs.contains(&good_token),
        "token material in the hub's log:\n{logs}"
    );
}

#[test]
fn metrics_with_a_token_file_require_the_bearer_token() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = trunkfarm_e2e::temp_dir("trunkfarm-e2e-metrics-");
    let file = dir.path().join("metrics.token");
    std::fs::write(&file, "metrics-s3cret\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let web_toml = format!("metrics_token_file = \"{}\"", file.display());
    let hub = Hub::start_opts(
        "",
        HubOptions {
            web_toml: &web_toml,
            ..HubOptions::default()
        },
    );
    let web = web_addr(&hub);
    let get = |auth: &str| {
        let mut s = TcpStream::connect(web).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n"
        )
        .unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        reply
    };
    let status = |reply: &str| reply.split(' ').nth(1).unwrap_or("").to_string();
    let none = get("");
    assert_eq!(status(&none), "401", "{none}");
    assert!(!none.contains("trunkfarm_"), "{none}");
    for wrong in [
        "Bearer metrics-s3cre",
        "Bearer nope",
        "Basic metrics-s3cret",
    ] {
        let r = get(&format!("Authorization: {wrong}\r\n"));
        assert_eq!(status(&r), "401", "{wrong}: {r}");
    }
    let ok = get("Authorization: Bearer metrics-s3cret\r\n");
    assert_eq!(status(&ok), "200", "{ok}");
    assert!(ok.contains("trunkfarm_"), "the metrics themselves: {ok}");
    assert!(!hub.logs().contains("metrics-s3cret"));
}

#[test]
fn a_connection_that_never_authenticates_is_closed_and_an_authenticated_one_stays() {
    let hub = Hub::start_with(
        "\n[network]\ntls_handshake_timeout = \"1s\"\nunauthenticated_timeout = \"2s\"\n",
        &[],
    );
    let admin_token = hub.admin_token();
    let list_agents = "/trunkfarm.v1.AdminService/ListAgents";
    runtime().block_on(async {
        let idle = raw_h2(&hub, None).await;
        // A health check does not authenticate a connection either.
        let mut prober = raw_h2(&hub, None).await;
        let (code, msg) = unary(
            &mut prober,
            grpc_request("/grpc.health.v1.Health/Check"),
            &[],
        )
        .await;
        assert_eq!(code, 0, "{msg}");
        // A wrong admin token is no authentication.
        let mut pretender = raw_h2(&hub, None).await;
        let (code, _) = unary(
            &mut pretender,
            grpc_request_with(list_agents, Some("not-the-token")),
            &[],
        )
        .await;
        assert_eq!(code, 16);
        let mut admin = raw_h2(&hub, None).await;
        let (code, msg) = unary(
            &mut admin,
            grpc_request_with(list_agents, Some(&admin_token)),
            &[],
        )
        .await;
        assert_eq!(code, 0, "{msg}");
        tokio::time::sleep(Duration::from_secs(4)).await;
        for (name, conn) in [("idle", idle), ("prober", prober), ("pretender", pretender)] {
            let r = tokio::time::timeout(Duration::from_secs(5), conn.ready()).await;
            assert!(
                matches!(r, Ok(Err(_))),
                "the {name} connection is still open after network.unauthenticated_timeout"
            );
        }
        let (code, msg) = unary(
            &mut admin,
            grpc_request_with(list_agents, Some(&admin_token)),
            &[],
        )
        .await;
        assert_eq!(code, 0, "the authenticated connection was closed: {msg}");
    });
}
