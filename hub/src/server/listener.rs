//! The gRPC listener's defences against hostile clients.
//!
//! tonic serves HTTP/2 on connections this module accepts: [`incoming`] runs
//! the accept loop and the TLS handshakes (each bounded by
//! `network.tls_handshake_timeout`) and hands tonic [`Guarded`] connections.
//! A [`Registry`] counts them against `network.max_connections`; at the cap,
//! a new connection pushes out the oldest one that has not authenticated
//! (so a flood of idle sockets cannot lock agents and the CLI out), and when
//! every open connection has, the new one is closed at once rather than left
//! in the kernel's queue. A connection must make a call with a valid
//! credential within `network.unauthenticated_timeout` of its accept or it
//! is closed. [`GuardLayer`] sits in front of the services: it caps what a
//! call may send before its credential is checked
//! (`network.max_unauthenticated_message_size`: `Enroll`, the request of
//! `DownloadArtifact`, health, reflection) and tells the registry when a
//! credentialed call succeeded.
//!
//! Only the services know whether a credential is valid, and they say it
//! with the call's status: a credentialed call (every agent call but
//! `Enroll`, every admin call) whose response starts without an error has
//! passed its check. While such a call is in flight (an upload's response
//! comes only at its end) the connection is not timed out or pushed out:
//! each of those calls checks the credential before reading anything, so
//! one without a valid credential ends at once.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http_body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::Bytes;
use tonic::codegen::http::{Request, Response};
use tonic::transport::server::{Connected, TcpConnectInfo};
use trunkfarm_proto::settings::fmt_bytes;

use crate::auth::tls::HubIdentity;
use crate::config::{ConnectionCap, NetworkSection};

// ---------------------------------------------------------------------------
// The open-files limit
// ---------------------------------------------------------------------------

/// The process's open-files limit, before and after [`raise_open_files_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OpenFiles {
    /// The soft limit found at start.
    pub(crate) before: u64,
    /// The soft limit now in force.
    pub(crate) soft: u64,
    /// The hard limit (the most the soft one can be raised to).
    pub(crate) hard: u64,
}

/// Raises the soft open-files limit to the hard one: the usual soft 1024 is
/// far too few for a hub that holds one connection per agent, and a hub out
/// of descriptors can accept nobody (not even its operator's CLI).
pub(crate) fn raise_open_files_limit() -> io::Result<OpenFiles> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
        lim = raised;
    }
    Ok(OpenFiles {
        before,
        soft: lim.rlim_cur,
        hard: lim.rlim_max,
    })
}

/// Files kept aside for the database, logs, artifact files and child
/// processes' pipes when the connection cap is derived.
const RESERVED_FILES: u64 = 128;
/// The most connections `"auto"` allows, however high the limit.
const MAX_AUTO_CONNECTIONS: u64 = 65_536;
/// The fewest connections `"auto"` allows, however low the limit.
const MIN_AUTO_CONNECTIONS: u64 = 16;

/// `network.max_connections`: as configured, or half of what the open-files
/// limit leaves after the web endpoint's connections and [`RESERVED_FILES`]
/// (the other half is room for one file per connection: an artifact being
/// uploaded or sent).
pub(crate) fn connection_cap(cap: ConnectionCap, open_files: u64, web_connections: u32) -> usize {
    let n = match cap {
        ConnectionCap::Fixed(n) => u64::from(n),
        ConnectionCap::Auto => (open_files
            .saturating_sub(u64::from(web_connections))
            .saturating_sub(RESERVED_FILES)
            / 2)
        .clamp(MIN_AUTO_CONNECTIONS, MAX_AUTO_CONNECTIONS),
    };
    usize::try_from(n).unwrap_or(usize::MAX)
}

// ---------------------------------------------------------------------------
// Counting connections
// ---------------------------------------------------------------------------

/// One open connection, as the registry and [`GuardLayer`] see it.
pub(crate) struct Conn {
    id: u64,
    peer: SocketAddr,
    /// A credentialed call succeeded on it.
    authenticated: AtomicBool,
    /// Credentialed calls in flight.
    claims: AtomicUsize,
    /// Cancelled to close it (pushed out to make room).
    closed: CancellationToken,
    registry: Arc<Registry>,
}

impl Conn {
    fn authenticate(&self) {
        if !self.authenticated.swap(true, Ordering::AcqRel) {
            self.registry.lock().pending.remove(&self.id);
        }
    }

    fn evictable(&self) -> bool {
        !self.authenticated.load(Ordering::Acquire) && self.claims.load(Ordering::Acquire) == 0
    }
}

struct RegistryState {
    next_id: u64,
    /// Connections counted against the cap.
    open: usize,
    /// Of those, the ones not authenticated yet, oldest first.
    pending: BTreeMap<u64, Arc<Conn>>,
}

/// The open connections of one listener, counted against its cap.
pub(crate) struct Registry {
    max: usize,
    state: Mutex<RegistryState>,
    tally: Tally,
}

impl Registry {
    pub(crate) fn new(max: usize) -> Arc<Registry> {
        Arc::new(Registry {
            max: max.max(1),
            state: Mutex::new(RegistryState {
                next_id: 0,
                open: 0,
                pending: BTreeMap::new(),
            }),
            tally: Tally::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RegistryState> {
        // The state is counters and a map: still consistent after a panic
        // elsewhere while it was held.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a new connection from `peer`, pushing out the oldest
    /// unauthenticated one if the cap is reached; `None` if every open
    /// connection has authenticated (the caller closes the new one).
    fn admit(self: &Arc<Self>, peer: SocketAddr) -> Option<Slot> {
        let mut s = self.lock();
        if s.open >= self.max {
            let oldest = s.pending.values().find(|c| c.evictable()).map(|c| c.id);
            let victim = oldest.and_then(|id| s.pending.remove(&id));
            let Some(victim) = victim else {
                drop(s);
                self.tally.bump(&self.tally.refused, self.max);
                return None;
            };
            s.open -= 1;
            victim.closed.cancel();
            tracing::debug!(peer = %victim.peer, "closing an unauthenticated connection to make room");
            self.tally.bump(&self.tally.evicted, self.max);
        }
        s.open += 1;
        s.next_id += 1;
        let conn = Arc::new(Conn {
            id: s.next_id,
            peer,
            authenticated: AtomicBool::new(false),
            claims: AtomicUsize::new(0),
            closed: CancellationToken::new(),
            registry: self.clone(),
        });
        s.pending.insert(conn.id, conn.clone());
        Some(Slot { conn })
    }

    /// Connections counted now.
    #[cfg(test)]
    fn open(&self) -> usize {
        self.lock().open
    }
}

/// A connection's place under the cap, given back when it is dropped
/// (unless it was pushed out, which gave it back already).
struct Slot {
    conn: Arc<Conn>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let conn = &self.conn;
        let mut s = conn.registry.lock();
        // Pushed-out connections left `pending` and the count together.
        let pushed_out = conn.closed.is_cancelled();
        if !pushed_out {
            s.pending.remove(&conn.id);
            s.open = s.open.saturating_sub(1);
        }
    }
}

/// How often a flood of refused, pushed-out or timed-out connections is
/// logged at most.
const TALLY_EVERY: Duration = Duration::from_secs(10);

/// Counts what happened to hostile or broken connections and logs it at
/// most every [`TALLY_EVERY`], so a flood cannot flood the log.
#[derive(Default)]
struct Tally {
    refused: AtomicU64,
    evicted: AtomicU64,
    handshake_timeouts: AtomicU64,
    unauthenticated: AtomicU64,
    last: Mutex<Option<std::time::Instant>>,
}

impl Tally {
    fn bump(&self, counter: &AtomicU64, max: usize) {
        counter.fetch_add(1, Ordering::Relaxed);
        let now = std::time::Instant::now();
        {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|t| now.duration_since(t) < TALLY_EVERY) {
                return;
            }
            *last = Some(now);
        }
        let take = |c: &AtomicU64| c.swap(0, Ordering::Relaxed);
        tracing::warn!(
            max_connections = max,
            refused = take(&self.refused),
            pushed_out = take(&self.evicted),
            tls_handshake_timeouts = take(&self.handshake_timeouts),
            unauthenticated_timeouts = take(&self.unauthenticated),
            "gRPC listener under pressure (counts since the last such line, at most one every {}s): connections refused because all {max} open ones are authenticated, unauthenticated ones closed to make room, TLS handshakes and unauthenticated connections that took too long; see network.* in the config",
            TALLY_EVERY.as_secs()
        );
    }
}

// ---------------------------------------------------------------------------
// Accepted connections
// ---------------------------------------------------------------------------

/// What a connection is underneath: TCP, or TLS over TCP.
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// What tonic puts in each request's extensions for a [`Guarded`]
/// connection; [`GuardLayer`] adds the `TcpConnectInfo` from it, so
/// `Request::remote_addr` works as with tonic's own listener.
#[derive(Clone)]
pub(crate) struct ConnInfo {
    tcp: TcpConnectInfo,
    conn: Arc<Conn>,
}

/// An accepted connection: closed with an error once it is pushed out, or
/// once `unauthenticated_timeout` passed without a successful credentialed
/// call (and none in flight).
pub(crate) struct Guarded {
    io: Box<dyn Io>,
    slot: Slot,
    tcp: TcpConnectInfo,
    timeout: Duration,
    deadline: Option<Pin<Box<Sleep>>>,
    closed: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl Guarded {
    /// Whether the connection may go on; registers the waker for both ends.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if self.closed.as_mut().poll(cx).is_ready() {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "closed to make room for a new connection (network.max_connections)",
            ));
        }
        let Some(deadline) = self.deadline.as_mut() else {
            return Ok(());
        };
        if deadline.as_mut().poll(cx).is_pending() {
            return Ok(());
        }
        let conn = &self.slot.conn;
        if conn.authenticated.load(Ordering::Acquire) {
            self.deadline = None;
            return Ok(());
        }
        if conn.claims.load(Ordering::Acquire) > 0 {
            // A credentialed call is under way: look again later.
            deadline.as_mut().reset(Instant::now() + self.timeout);
            let _ = deadline.as_mut().poll(cx);
            return Ok(());
        }
        self.deadline = None;
        tracing::debug!(peer = %conn.peer, "closing a connection that did not authenticate in time");
        conn.registry
            .tally
            .bump(&conn.registry.tally.unauthenticated, conn.registry.max);
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "no call with a valid credential within network.unauthenticated_timeout",
        ))
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl Connected for Guarded {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        ConnInfo {
            tcp: self.tcp.clone(),
            conn: self.slot.conn.clone(),
        }
    }
}

/// The TLS acceptor for the hub's identity: HTTP/2 only (ALPN `h2`), ring.
pub(crate) fn tls_acceptor(id: &HubIdentity) -> anyhow::Result<TlsAcceptor> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(id.cert_chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("the hub's certificate chain is not PEM: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("the hub's private key is not PEM: {e}"))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// What [`incoming`] needs to know.
pub(crate) struct Limits {
    pub(crate) max_connections: usize,
    pub(crate) tls_handshake_timeout: Duration,
    pub(crate) unauthenticated_timeout: Duration,
}

/// Handshakes finished but not yet taken by tonic: a short queue, since
/// tonic takes each at once.
const HANDED_OVER: usize = 64;

/// How long the accept loop pauses when the process is out of descriptors
/// (the connection waits in the kernel's queue meanwhile).
const OUT_OF_FILES_PAUSE: Duration = Duration::from_millis(100);

/// Accepts connections on `listener` until `stop` is cancelled, handshakes
/// TLS (when `tls` is given) and yields the guarded connections for
/// `serve_with_incoming`.
pub(crate) fn incoming(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    limits: Limits,
    stop: CancellationToken,
) -> ReceiverStream<io::Result<Guarded>> {
    let (tx, rx) = mpsc::channel(HANDED_OVER);
    let registry = Registry::new(limits.max_connections);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                () = stop.cancelled() => break,
                () = tx.closed() => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)) {
                            tracing::warn!("cannot accept a connection: {e}; pausing (lower network.max_connections or raise the open-files limit)");
                            tokio::time::sleep(OUT_OF_FILES_PAUSE).await;
                        } else {
                            tracing::debug!("accept failed: {e}");
                        }
                        continue;
                    }
                },
            };
            let accepted_at = Instant::now();
            let Some(slot) = registry.admit(peer) else {
                // Closed now rather than left queued: the client learns at
                // once, and the kernel's queue stays free for others.
                drop(tcp);
                continue;
            };
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(%peer, "cannot set TCP_NODELAY: {e}");
            }
            let tcp_info = TcpConnectInfo {
                local_addr: tcp.local_addr().ok(),
                remote_addr: Some(peer),
            };
            let tx = tx.clone();
            let tls = tls.clone();
            let handshake_timeout = limits.tls_handshake_timeout;
            let timeout = limits.unauthenticated_timeout;
            tokio::spawn(async move {
                let conn = slot.conn.clone();
                let io: Box<dyn Io> = match tls {
                    None => Box::new(tcp),
                    Some(acceptor) => {
                        let handshake =
                            tokio::time::timeout(handshake_timeout, acceptor.accept(tcp));
                        tokio::select! {
                            () = conn.closed.cancelled() => return,
                            done = handshake => match done {
                                Ok(Ok(stream)) => Box::new(stream),
                                Ok(Err(e)) => {
                                    tracing::debug!(%peer, "TLS handshake failed: {e}");
                                    return;
                                }
                                Err(_) => {
                                    tracing::debug!(%peer, "TLS handshake timed out");
                                    let r = &conn.registry;
                                    r.tally.bump(&r.tally.handshake_timeouts, r.max);
                                    return;
                                }
                            },
                        }
                    }
                };
                let closed = Box::pin(conn.closed.clone().cancelled_owned());
                let guarded = Guarded {
                    io,
                    slot,
                    tcp: tcp_info,
                    timeout,
                    deadline: Some(Box::pin(tokio::time::sleep_until(accepted_at + timeout))),
                    closed,
                };
                // Fails only when the server stopped: the connection closes.
                let _ = tx.send(Ok(guarded)).await;
            });
        }
        tracing::debug!("gRPC accept loop stopped");
    });
    ReceiverStream::new(rx)
}

// ---------------------------------------------------------------------------
// In front of the services
// ---------------------------------------------------------------------------

/// What a call is, for [`GuardLayer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Class {
    /// Its request body is read before any credential is checked: capped.
    limited: bool,
    /// Its success proves a valid credential.
    authenticates: bool,
    /// It checks the credential before reading anything, so while it is in
    /// flight the connection is not timed out or pushed out.
    claims: bool,
}

impl Class {
    fn of(path: &str) -> Class {
        use tonic::server::NamedService as _;
        use trunkfarm_proto::v1::admin_service_server::AdminServiceServer;
        use trunkfarm_proto::v1::agent_service_server::AgentServiceServer;
        type Agent = AgentServiceServer<crate::grpc::agent::AgentApi>;
        type Admin = AdminServiceServer<crate::grpc::admin::AdminApi>;
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or(("", ""));
        let open = Class {
            limited: true,
            authenticates: false,
            claims: false,
        };
        if service == Agent::NAME {
            match method {
                "Enroll" => open,
                // A unary request: decoded before the handler checks.
                "DownloadArtifact" => Class {
                    authenticates: true,
                    ..open
                },
                _ => Class {
                    limited: false,
                    authenticates: true,
                    claims: true,
                },
            }
        } else if service == Admin::NAME {
            // The admin token is checked by an interceptor, before the body.
            Class {
                limited: false,
                authenticates: true,
                claims: true,
            }
        } else {
            // Health, reflection, anything unknown.
            open
        }
    }
}

/// Caps pre-authentication request bodies and reports credentialed
/// successes to the connection's registry (see the module docs).
#[derive(Clone)]
pub(crate) struct GuardLayer {
    /// `network.max_unauthenticated_message_size`.
    pub(crate) pre_auth_limit: u64,
}

impl GuardLayer {
    pub(crate) fn new(network: &NetworkSection) -> GuardLayer {
        GuardLayer {
            pre_auth_limit: network.max_unauthenticated_message_size,
        }
    }
}

impl<S> tower::Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Guard<S> {
        Guard {
            inner,
            pre_auth_limit: self.pre_auth_limit,
        }
    }
}

/// The service [`GuardLayer`] makes.
#[derive(Clone)]
pub(crate) struct Guard<S> {
    inner: S,
    pre_auth_limit: u64,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S> tower::Service<Request<Body>> for Guard<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let class = Class::of(req.uri().path());
        let info = req.extensions().get::<ConnInfo>().cloned();
        if let Some(info) = &info {
            req.extensions_mut().insert(info.tcp.clone());
        }
        if class.limited {
            let limit = self.pre_auth_limit;
            req = req.map(|body| Watched::capped(body, limit));
        }
        let conn = info.map(|i| i.conn);
        let claim = conn.clone().filter(|_| class.claims).map(Claim::new);
        // The clone that was made ready serves this call (tower's rule).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let call = inner.call(req);
        Box::pin(async move {
            let res = call.await?;
            if class.authenticates
                && let Some(conn) = &conn
                && succeeded(&res)
            {
                conn.authenticate();
            }
            Ok(match claim {
                Some(claim) => res.map(|body| Watched::claimed(body, claim)),
                None => res,
            })
        })
    }
}

/// Whether a gRPC response starts without an error (an error before any
/// message is a "trailers-only" response: its status is in the headers).
fn succeeded(res: &Response<Body>) -> bool {
    match res.headers().get("grpc-status") {
        None => true,
        Some(v) => v.as_bytes() == b"0",
    }
}

/// A credentialed call in flight on a connection, until its response ends.
struct Claim(Arc<Conn>);

impl Claim {
    fn new(conn: Arc<Conn>) -> Claim {
        conn.claims.fetch_add(1, Ordering::AcqRel);
        Claim(conn)
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.0.claims.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A body as [`Guard`] passes it on: a request body cut off with
/// `RESOURCE_EXHAUSTED` past its cap, or a response body holding its call's
/// [`Claim`] until it ends.
struct Watched {
    inner: Body,
    /// The cap and the bytes still allowed under it.
    cap: Option<(u64, u64)>,
    _claim: Option<Claim>,
}

impl Watched {
    fn capped(inner: Body, limit: u64) -> Body {
        Body::new(Watched {
            inner,
            cap: Some((limit, limit)),
            _claim: None,
        })
    }

    fn claimed(inner: Body, claim: Claim) -> Body {
        Body::new(Watched {
            inner,
            cap: None,
            _claim: Some(claim),
        })
    }
}

impl http_body::Body for Watched {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if let (Some((limit, left)), Some(Ok(frame))) = (&mut this.cap, &frame)
            && let Some(data) = frame.data_ref()
        {
            let len = data.len() as u64;
            if len > *left {
                *left = 0;
                return Poll::Ready(Some(Err(Status::resource_exhausted(format!(
                    "this call sends more than {} before a credential is checked (network.max_unauthenticated_message_size); an enrollment is a few hundred bytes",
                    fmt_bytes(*limit)
                )))));
            }
            *left -= len;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], port))
    }

    #[test]
    fn the_cap_follows_the_open_files_limit() {
        // soft = hard = 1024: room stays for the web endpoint and files.
        assert_eq!(connection_cap(ConnectionCap::Auto, 1024, 128), 384);
        assert_eq!(connection_cap(ConnectionCap::Auto, 100, 128), 16);
        assert_eq!(connection_cap(ConnectionCap::Auto, 1 << 20, 128), 65_536);
        assert_eq!(connection_cap(ConnectionCap::Fixed(7), 1024, 128), 7);
    }

    #[test]
    fn at_the_cap_the_oldest_unauthenticated_connection_makes_room() {
        let r = Registry::new(2);
        let a = r.admit(peer(1)).unwrap();
        let b = r.admit(peer(2)).unwrap();
        a.conn.authenticate();
        // b is the oldest unauthenticated: pushed out for c.
        let c = r.admit(peer(3)).unwrap();
        assert!(b.conn.closed.is_cancelled());
        assert!(!a.conn.closed.is_cancelled());
        assert_eq!(r.open(), 2);
        drop(b);
        assert_eq!(r.open(), 2, "a pushed-out connection was uncounted already");
        // A credentialed call in flight protects c; all taken: refused.
        let claim = Claim::new(c.conn.clone());
        assert!(r.admit(peer(4)).is_none());
        drop(claim);
        let d = r.admit(peer(5)).unwrap();
        assert!(c.conn.closed.is_cancelled());
        drop((a, c));
        assert_eq!(r.open(), 1);
        drop(d);
        assert_eq!(r.open(), 0);
    }

    #[test]
    fn calls_are_classified_by_what_they_check_first() {
        let enroll = Class::of("/trunkfarm.v1.AgentService/Enroll");
        assert!(enroll.limited && !enroll.authenticates && !enroll.claims);
        let download = Class::of("/trunkfarm.v1.AgentService/DownloadArtifact");
        assert!(download.limited && download.authenticates && !download.claims);
        let session = Class::of("/trunkfarm.v1.AgentService/Session");
        assert!(!session.limited && session.authenticates && session.claims);
        let admin = Class::of("/trunkfarm.v1.AdminService/ListAgents");
        assert!(!admin.limited && admin.authenticates && admin.claims);
        for open in ["/grpc.health.v1.Health/Check", "/x/y", "", "/"] {
            let c = Class::of(open);
            assert!(c.limited && !c.authenticates && !c.claims, "{open}");
        }
    }

    #[tokio::test]
    async fn a_capped_body_ends_with_resource_exhausted() {
        use http_body_util::BodyExt as _;
        let body = Body::new(http_body_util::Full::new(Bytes::from(vec![0u8; 2048])));
        let err = Watched::capped(body, 1024).collect().await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(err.message().contains("1.0 KiB"), "{}", err.message());
        let small = Body::new(http_body_util::Full::new(Bytes::from(vec![0u8; 100])));
        let ok = Watched::capped(small, 1024).collect().await.unwrap();
        assert_eq!(ok.to_bytes().len(), 100);
    }
}
