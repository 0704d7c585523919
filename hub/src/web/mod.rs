//! The hub's HTTP endpoint: the dashboard every mail link lands on, its JSON
//! API under `/api/v1/`, one-click unsubscribe links, `/healthz` and
//! `/metrics`.
//!
//! Pages: one module per page (`agents.rs`, …), each with a view struct
//! built from the owners' queries ([`site::Site`]) that its HTML page
//! renders (an askama template in `hub/templates/`) and its API route
//! serializes ([`view`]), so both always say the same.
//!
//! Links in mails act only on a POST: `GET /unsubscribe?token=T`
//! (`unsubscribe.rs`) and `GET /subscribe/confirm?token=T` (`subscribe.rs`,
//! self-service subscription) show a page naming the address and the project
//! with a button, because mail scanners and link previewers follow GET
//! links. Every interpolated string is HTML-escaped (askama), and tokens
//! never reach a log.
//!
//! The endpoint faces the internet (mail links point at it), so it holds at
//! most `web.max_connections` connections, drops a client that has not sent
//! a request's headers within `web.header_read_timeout` (slowloris), answers
//! 408 to a request that takes longer than `web.request_timeout`, and, with
//! `web.metrics_token_file`, serves `/metrics` only to a bearer of that token.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use crate::auth::secret;
use crate::config::WebSection;

pub(crate) mod agents;
#[cfg(test)]
mod page_tests;
pub(crate) mod project;
pub(crate) mod run;
pub(crate) mod site;
pub(crate) mod subscribe;
pub(crate) mod unsubscribe;
pub(crate) mod upstream;
pub(crate) mod view;

use site::{Site, SiteCell};

/// A boxed, sendable future (what [`UnsubscribeFn`] returns).
pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What the web endpoint asks the notifier to do with a token. Returns a
/// sentence for the page on success ("alice@example.org will no longer receive
/// mail about attrs.") or an error sentence (shown with status 400).
pub(crate) type UnsubscribeFn =
    Arc<dyn Fn(String) -> BoxFuture<Result<String, String>> + Send + Sync>;

/// Builds an [`UnsubscribeFn`] from an async closure or function:
/// `web::unsubscribe_fn(move |token| { let n = n.clone(); async move { n.unsubscribe(&token).await } })`.
pub(crate) fn unsubscribe_fn<F, Fut>(f: F) -> UnsubscribeFn
where
    F: Fn(String) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<String, String>> + Send + 'static,
{
    Arc::new(move |token| Box::pin(f(token)))
}

/// How long open connections may keep the server task alive after shutdown
/// is requested.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Longer tokens are refused without asking the notifier.
const MAX_TOKEN_CHARS: usize = 4096;

/// A running web endpoint.
pub(crate) struct Web {
    /// The bound address (useful when listening on port 0).
    pub(crate) addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Web {
    /// Waits for the server task to end (after `shutdown` is cancelled: in-flight
    /// requests finish, for at most a few seconds).
    pub(crate) async fn stopped(self) {
        if let Err(e) = self.task.await {
            tracing::error!("web endpoint task failed: {e}");
        }
    }
}

/// Why the web endpoint cannot start.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WebError {
    /// `web.listen` cannot be bound.
    #[error("cannot listen on {addr} for the web endpoint (web.listen): {error}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        error: std::io::Error,
    },
    /// `web.metrics_token_file` cannot be read or holds no token.
    #[error("web.metrics_token_file {}: {message}", path.display())]
    MetricsToken {
        /// The file.
        path: PathBuf,
        /// What is wrong and what to do.
        message: String,
    },
}

/// How the endpoint serves: `[web]` with the metrics token read.
pub(crate) struct Settings {
    pub(crate) listen: SocketAddr,
    pub(crate) header_read_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) max_connections: u32,
    /// The token `/metrics` requires, if any (kept only as its hash).
    pub(crate) metrics_token: Option<String>,
}

impl Settings {
    /// The `[web]` settings, reading `web.metrics_token_file` now.
    pub(crate) fn from_config(web: &WebSection) -> Result<Settings, WebError> {
        Ok(Settings {
            listen: web.listen,
            header_read_timeout: web.header_read_timeout,
            request_timeout: web.request_timeout,
            max_connections: web.max_connections,
            metrics_token: web
                .metrics_token_file
                .as_deref()
                .map(read_metrics_token)
                .transpose()?,
        })
    }
}

/// The first line of the metrics token file. A file other users may read
/// is warned about (the token is then theirs too), not refused: it guards
/// counters, not credentials.
fn read_metrics_token(path: &Path) -> Result<String, WebError> {
    use std::os::unix::fs::PermissionsExt as _;
    let fail = |message: String| WebError::MetricsToken {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read it: {e}")))?;
    let token = text.lines().next().unwrap_or("").trim();
    if token.is_empty() {
        return Err(fail(
            "it is empty; put the token /metrics requires on its first line (e.g. `head -c 32 /dev/urandom | base64 > FILE`)".into(),
        ));
    }
    match std::fs::metadata(path) {
        Ok(m) if m.permissions().mode() & 0o077 != 0 => tracing::warn!(
            "web.metrics_token_file {} is readable by other users (mode {:o}): `chmod 600` it",
            path.display(),
            m.permissions().mode() & 0o777
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(
            "cannot check the permissions of web.metrics_token_file {}: {e}",
            path.display()
        ),
    }
    Ok(token.to_string())
}

/// Binds `settings.listen` and serves the web endpoint until `shutdown` is
/// cancelled.
pub(crate) async fn serve(
    settings: Settings,
    unsubscribe: UnsubscribeFn,
    metrics: MetricsFn,
    site: SiteCell,
    shutdown: CancellationToken,
) -> Result<Web, WebError> {
    let listen = settings.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|error| WebError::Listen {
            addr: listen,
            error,
        })?;
    let addr = listener.local_addr().map_err(|error| WebError::Listen {
        addr: listen,
        error,
    })?;
    let app = router(Handlers {
        unsubscribe,
        metrics,
        site,
        metrics_token_hash: settings.metrics_token.as_deref().map(secret::hash),
    });
    let task = tokio::spawn(accept_loop(listener, app, settings, addr, shutdown));
    tracing::info!("web endpoint listening on http://{addr}");
    Ok(Web { addr, task })
}

/// Accepts connections until `shutdown`, then lets open ones finish for at
/// most [`SHUTDOWN_GRACE`].
async fn accept_loop(
    listener: tokio::net::TcpListener,
    app: Router,
    settings: Settings,
    addr: SocketAddr,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(
        settings.max_connections as usize,
    ));
    // Every connection task holds a receiver; all gone = all closed.
    let (closed_tx, closed_rx) = tokio::sync::watch::channel(());
    let mut refused: u64 = 0;
    let mut last_refusal_log: Option<std::time::Instant> = None;
    loop {
        let (tcp, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!("web endpoint on {addr}: accept failed: {e}");
                    // Out of descriptors: the connection waits in the queue.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(tcp);
            refused += 1;
            if last_refusal_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                tracing::warn!(
                    "web endpoint on {addr}: {refused} connection(s) closed on arrival, all {} slots taken (web.max_connections)",
                    settings.max_connections
                );
                refused = 0;
                last_refusal_log = Some(std::time::Instant::now());
            }
            continue;
        };
        let (app, limit) = (app.clone(), settings.request_timeout);
        let service = hyper::service::service_fn(move |mut req: axum::http::Request<_>| {
            // Who asked, for per-client rate limits (subscription requests).
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
            let app = app.clone();
            async move { Ok::<_, std::convert::Infallible>(respond(app, req, limit).await) }
        });
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(settings.header_read_timeout);
        let (shutdown, closed_rx) = (shutdown.clone(), closed_rx.clone());
        tokio::spawn(async move {
            let conn = http.serve_connection(TokioIo::new(tcp), service);
            tokio::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(%peer, "web connection ended: {e}");
                    }
                }
                () = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    if let Err(e) = conn.await {
                        tracing::debug!(%peer, "web connection ended: {e}");
                    }
                }
            }
            drop((slot, closed_rx));
        });
    }
    drop(listener);
    drop(closed_rx);
    if tokio::time::timeout(SHUTDOWN_GRACE, closed_tx.closed())
        .await
        .is_err()
    {
        tracing::warn!(
            "web endpoint on {addr}: connections still open {SHUTDOWN_GRACE:?} after shutdown; not waiting for them"
        );
    }
    tracing::debug!("web endpoint on {addr} stopped");
}

/// `app`'s answer to `req`, or 408 if it has none within `limit`.
async fn respond(
    app: Router,
    req: axum::http::Request<hyper::body::Incoming>,
    limit: Duration,
) -> Response {
    match tokio::time::timeout(limit, app.oneshot(req)).await {
        Ok(Ok(response)) => response,
        Ok(Err(never)) => match never {},
        Err(_) => view::error(
            StatusCode::REQUEST_TIMEOUT,
            "Request timeout",
            "The request took too long.",
        ),
    }
}

/// What the routes call.
#[derive(Clone)]
pub(crate) struct Handlers {
    unsubscribe: UnsubscribeFn,
    metrics: MetricsFn,
    /// The owners the pages read, once the hub has started.
    site: SiteCell,
    /// SHA-256 of the token `/metrics` requires, if any.
    metrics_token_hash: Option<String>,
}

/// Renders the hub's metrics in the Prometheus text format.
pub(crate) type MetricsFn = Arc<dyn Fn() -> BoxFuture<String> + Send + Sync>;

impl Handlers {
    /// The owners the pages read, or [`Starting`] while the hub starts.
    pub(crate) fn site(&self) -> Result<&Site, Starting> {
        self.site.get().ok_or(Starting::Page)
    }

    /// The same for the API (its 503 is JSON).
    pub(crate) fn site_api(&self) -> Result<&Site, Starting> {
        self.site.get().ok_or(Starting::Api)
    }
}

/// The hub has not finished starting: 503, as a page or as JSON.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Starting {
    Page,
    Api,
}

impl IntoResponse for Starting {
    fn into_response(self) -> Response {
        match self {
            Starting::Page => view::error(
                StatusCode::SERVICE_UNAVAILABLE,
                "Starting",
                "The hub is still starting; try again in a moment.",
            ),
            Starting::Api => view::json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the hub is still starting; try again in a moment",
            ),
        }
    }
}

fn router(handlers: Handlers) -> Router {
    Router::new()
        .merge(agents::routes())
        .merge(subscribe::routes())
        .merge(unsubscribe::routes())
        .merge(project::routes())
        .merge(upstream::routes())
        .merge(run::routes())
        .route(
            "/static/style.css",
            get(|| async { view::asset("text/css; charset=utf-8", view::STYLE_CSS) }),
        )
        .route(
            "/static/live.js",
            get(|| async { view::asset("text/javascript; charset=utf-8", view::LIVE_JS) }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics_page))
        .fallback(|| async {
            view::error(StatusCode::NOT_FOUND, "Not found", "There is nothing here.")
        })
        .with_state(handlers)
}

/// `GET /metrics`: queue, agents, pools and outbox as Prometheus gauges;
/// with a metrics token, only for `Authorization: Bearer <token>`.
async fn metrics_page(State(handlers): State<Handlers>, headers: HeaderMap) -> Response {
    if let Some(hash) = &handlers.metrics_token_hash {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        // Compared as hashes, in constant time.
        if !presented.is_some_and(|t| secret::verify(t, hash)) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer realm=\"trunkfarm metrics\"")],
                "/metrics needs `Authorization: Bearer <token>` with the token in the hub's web.metrics_token_file\n",
            )
                .into_response();
        }
    }
    let text = (handlers.metrics)().await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// A link's `?token=…` (unsubscribe, subscription confirmation).
#[derive(serde::Deserialize)]
pub(super) struct TokenQuery {
    token: Option<String>,
}

/// The token from the query, or the sentence explaining why there is none.
pub(super) fn token_of(
    query: Result<Query<TokenQuery>, QueryRejection>,
) -> Result<String, &'static str> {
    let token = match query {
        Ok(Query(TokenQuery { token: Some(t) })) if !t.trim().is_empty() => t.trim().to_string(),
        Ok(_) => return Err("the link has no token"),
        Err(_) => return Err("the link is malformed"),
    };
    if token.len() > MAX_TOKEN_CHARS {
        return Err("this link is invalid (it was altered or cut off)");
    }
    Ok(token)
}

/// Percent-encodes everything but RFC 3986 unreserved characters (a
/// base64url token passes through unchanged).
pub(super) fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Reply {
        status: u16,
        headers: String,
        body: String,
    }

    /// Sends one raw HTTP/1.1 request and reads the whole response.
    async fn send(addr: SocketAddr, request: &str) -> Reply {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
            .await
            .expect("response in time")
            .unwrap();
        let text = String::from_utf8(raw).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").expect("a complete response");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status line");
        Reply {
            status,
            headers: head.to_ascii_lowercase(),
            body: body.to_string(),
        }
    }

    async fn get(addr: SocketAddr, path: &str) -> Reply {
        send(
            addr,
            &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"),
        )
        .await
    }

    async fn post(addr: SocketAddr, path: &str, body: &str) -> Reply {
        send(
            addr,
            &format!(
                "POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
                 Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ),
        )
        .await
    }

    /// The default `[web]` settings on a free port.
    fn settings() -> Settings {
        Settings::from_config(&WebSection {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..WebSection::default()
        })
        .unwrap()
    }

    /// A server whose unsubscribe fn records calls and answers with `answer`.
    async fn start(
        answer: Result<&'static str, &'static str>,
    ) -> (
        Web,
        CancellationToken,
        Arc<AtomicUsize>,
        Arc<std::sync::Mutex<Vec<String>>>,
    ) {
        start_with(answer, settings()).await
    }

    async fn start_with(
        answer: Result<&'static str, &'static str>,
        settings: Settings,
    ) -> (
        Web,
        CancellationToken,
        Arc<AtomicUsize>,
        Arc<std::sync::Mutex<Vec<String>>>,
    ) {
        let calls = Arc::new(AtomicUsize::new(0));
        let tokens = Arc::new(std::sync::Mutex::new(Vec::new()));
        let f = {
            let calls = calls.clone();
            let tokens = tokens.clone();
            unsubscribe_fn(move |token| {
                calls.fetch_add(1, Ordering::SeqCst);
                tokens.lock().unwrap().push(token);
                async move { answer.map(str::to_string).map_err(str::to_string) }
            })
        };
        let shutdown = CancellationToken::new();
        let metrics: MetricsFn = Arc::new(|| Box::pin(async { "m 1\n".to_string() }));
        let web = serve(settings, f, metrics, SiteCell::default(), shutdown.clone())
            .await
            .unwrap();
        (web, shutdown, calls, tokens)
    }

    fn assert_html(r: &Reply) {
        assert!(
            r.headers.contains("content-type: text/html; charset=utf-8"),
            "{}",
            r.headers
        );
        assert!(r.body.starts_with("<!DOCTYPE html>"), "{}", r.body);
    }

    #[tokio::test]
    async fn get_shows_a_form_and_does_not_unsubscribe() {
        let (web, shutdown, calls, _) = start(Ok("done")).await;
        let r = get(web.addr, "/unsubscribe?token=abc-DEF_123").await;
        assert_eq!(r.status, 200);
        assert_html(&r);
        assert!(
            r.body
                .contains("<form method=\"post\" action=\"unsubscribe?token=abc-DEF_123\">"),
            "{}",
            r.body
        );
        assert!(r.body.contains("<button"));
        assert!(
            !r.body.contains("http://") && !r.body.contains("https://"),
            "no external resources"
        );
        assert!(r.headers.contains("referrer-policy: no-referrer"));
        // HEAD too.
        let r = send(
            web.addr,
            "HEAD /unsubscribe?token=x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        // A hostile token is encoded in the URL and escaped in the page.
        let r = get(web.addr, "/unsubscribe?token=%22%3E%3Cscript%3E&x=1").await;
        assert_eq!(r.status, 200);
        assert!(!r.body.contains("<script>"), "{}", r.body);
        assert!(
            r.body
                .contains("action=\"unsubscribe?token=%22%3E%3Cscript%3E\""),
            "{}",
            r.body
        );
        // No token.
        let r = get(web.addr, "/unsubscribe").await;
        assert_eq!(r.status, 400);
        assert!(r.body.contains("the link has no token"), "{}", r.body);
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        shutdown.cancel();
        web.stopped().await;
    }

    #[tokio::test]
    async fn post_unsubscribes_once_and_shows_the_sentence() {
        let (web, shutdown, calls, tokens) = start(Ok(
            "alice@example.org will no longer receive mail about attrs.",
        ))
        .await;
        let r = post(
            web.addr,
            "/unsubscribe?token=tok_1",
            "List-Unsubscribe=One-Click",
        )
        .await;
        assert_eq!(r.status, 200);
        assert_html(&r);
        assert!(
            r.body
                .contains("<p>alice@example.org will no longer receive mail about attrs.</p>"),
            "{}",
            r.body
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(*tokens.lock().unwrap(), ["tok_1"]);
        // An empty body works too (a plain form without fields).
        let r = post(web.addr, "/unsubscribe?token=tok_2", "").await;
        assert_eq!(r.status, 200);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // No token: the fn is not called.
        let r = post(web.addr, "/unsubscribe", "List-Unsubscribe=One-Click").await;
        assert_eq!(r.status, 400);
        assert!(r.body.contains("the link has no token"), "{}", r.body);
        let r = post(web.addr, "/unsubscribe?token=", "").await;
        assert_eq!(r.status, 400);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        shutdown.cancel();
        web.stopped().await;
    }

    #[tokio::test]
    async fn a_refusal_is_a_400_with_the_message_escaped() {
        let (web, shutdown, calls, _) = start(Err(
            "this unsubscribe link is invalid <script>alert(1)</script> & more",
        ))
        .await;
        let r = post(
            web.addr,
            "/unsubscribe?token=bad",
            "List-Unsubscribe=One-Click",
        )
        .await;
        assert_eq!(r.status, 400);
        assert_html(&r);
        assert!(!r.body.contains("<script>"), "{}", r.body);
        assert!(
            // askama's entities.
            r.body.contains(
                "this unsubscribe link is invalid &#60;script&#62;alert(1)&#60;/script&#62; &#38; more"
            ),
            "{}",
            r.body
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        shutdown.cancel();
        web.stopped().await;
    }

    #[tokio::test]
    async fn success_sentences_are_escaped_too() {
        let (web, shutdown, _, _) = start(Ok("<script>x</script>@example.org is out.")).await;
        let r = post(web.addr, "/unsubscribe?token=t", "").await;
        assert_eq!(r.status, 200);
        assert!(!r.body.contains("<script>"), "{}", r.body);
        assert!(
            r.body
                .contains("&#60;script&#62;x&#60;/script&#62;@example.org is out.")
        );
        shutdown.cancel();
        web.stopped().await;
    }

    #[tokio::test]
    async fn healthz_and_not_found() {
        let (web, shutdown, calls, _) = start(Ok("done")).await;
        let r = get(web.addr, "/healthz").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body, "ok");
        let r = get(web.addr, "/metrics").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body, "m 1\n");
        for path in ["/", "/nope", "/unsubscribe/extra", "/healthz/x"] {
            let r = get(web.addr, path).await;
            assert_eq!(r.status, 404, "{path}");
            assert_html(&r);
            assert!(r.body.contains("Not found"));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        shutdown.cancel();
        web.stopped().await;
    }

    #[tokio::test]
    async fn shutdown_stops_the_server_and_bind_errors_name_the_address() {
        let (web, shutdown, _, _) = start(Ok("done")).await;
        let addr = web.addr;
        let err = serve(
            Settings {
                listen: addr,
                ..settings()
            },
            unsubscribe_fn(|_| async { Ok(String::new()) }),
            Arc::new(|| Box::pin(async { String::new() })),
            SiteCell::default(),
            CancellationToken::new(),
        )
        .await
        .err()
        .expect("the port is taken");
        let msg = err.to_string();
        assert!(
            msg.contains(&format!(
                "cannot listen on {addr} for the web endpoint (web.listen)"
            )),
            "{msg}"
        );
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), web.stopped())
            .await
            .expect("stops promptly");
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn metrics_with_a_token_file_need_the_bearer_token() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("metrics.token");
        std::fs::write(&file, "s3cret-token\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let web_cfg = WebSection {
            listen: "127.0.0.1:0".parse().unwrap(),
            metrics_token_file: Some(file.clone()),
            ..WebSection::default()
        };
        let (web, shutdown, _, _) =
            start_with(Ok("done"), Settings::from_config(&web_cfg).unwrap()).await;
        let with = |auth: &str| {
            format!("GET /metrics HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n")
        };
        let r = send(web.addr, &with("")).await;
        assert_eq!(r.status, 401);
        assert!(
            r.headers.contains("www-authenticate: bearer"),
            "{}",
            r.headers
        );
        assert!(!r.body.contains("m 1"));
        for wrong in [
            "Bearer nope\r\n",
            "Bearer s3cret-toke\r\n",
            "Basic s3cret-token\r\n",
        ] {
            let r = send(web.addr, &with(&format!("Authorization: {wrong}"))).await;
            assert_eq!(r.status, 401, "{wrong}");
        }
        let r = send(web.addr, &with("Authorization: Bearer s3cret-token\r\n")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body, "m 1\n");
        // The other pages stay open.
        assert_eq!(get(web.addr, "/healthz").await.status, 200);
        shutdown.cancel();
        web.stopped().await;
        // An empty token file stops the start, naming the key.
        std::fs::write(&file, "\n").unwrap();
        let err = Settings::from_config(&web_cfg).err().unwrap().to_string();
        assert!(
            err.contains("web.metrics_token_file") && err.contains("empty"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_client_dripping_its_headers_is_cut_off() {
        let (web, shutdown, _, _) = start_with(
            Ok("done"),
            Settings {
                header_read_timeout: Duration::from_millis(500),
                ..settings()
            },
        )
        .await;
        let mut stream = tokio::net::TcpStream::connect(web.addr).await.unwrap();
        let started = std::time::Instant::now();
        let request = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
        let mut cut_off = false;
        for b in request {
            if stream.write_all(&[*b]).await.is_err() {
                cut_off = true;
                break;
            }
            let mut buf = [0u8; 256];
            match tokio::time::timeout(Duration::from_millis(100), stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    cut_off = true;
                    break;
                }
                Ok(Ok(_)) => panic!("answered a request whose headers never ended"),
                Err(_) => {}
            }
        }
        assert!(cut_off, "still connected after {:?}", started.elapsed());
        // An idle connection goes the same way; a prompt client is served.
        let mut idle = tokio::net::TcpStream::connect(web.addr).await.unwrap();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf))
            .await
            .expect("the idle connection is closed")
            .unwrap_or(0);
        assert_eq!(n, 0);
        assert_eq!(get(web.addr, "/healthz").await.status, 200);
        shutdown.cancel();
        web.stopped().await;
    }

    #[tokio::test]
    async fn a_slow_request_gets_408_and_connections_beyond_the_cap_are_closed() {
        let f = unsubscribe_fn(|_| async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok(String::new())
        });
        let shutdown = CancellationToken::new();
        let metrics: MetricsFn = Arc::new(|| Box::pin(async { String::new() }));
        let web = serve(
            Settings {
                request_timeout: Duration::from_millis(300),
                max_connections: 2,
                ..settings()
            },
            f,
            metrics,
            SiteCell::default(),
            shutdown.clone(),
        )
        .await
        .unwrap();
        let r = post(web.addr, "/unsubscribe?token=t", "").await;
        assert_eq!(r.status, 408);
        // Two connections held open take both slots: a third is closed.
        let _a = tokio::net::TcpStream::connect(web.addr).await.unwrap();
        let _b = tokio::net::TcpStream::connect(web.addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut c = tokio::net::TcpStream::connect(web.addr).await.unwrap();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
            .await
            .expect("closed at once")
            .unwrap_or(0);
        assert_eq!(n, 0);
        shutdown.cancel();
        web.stopped().await;
    }

    #[test]
    fn percent_encoding() {
        assert_eq!(percent_encode("aZ0-_.~ /&é"), "aZ0-_.~%20%2F%26%C3%A9");
    }
}
