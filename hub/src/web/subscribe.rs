//! Self-service subscription (double opt-in): `POST /projects/<name>/subscribe`
//! (the project page's form, `subscribe_form.html`) asks the notifier to mail
//! a confirmation link; `GET /subscribe/confirm?token=…` shows what the link
//! would subscribe with a button, and only its `POST` subscribes (mail
//! scanners follow GET links). The notifier owns the rules (signing, expiry,
//! rate limits, the outbox: `notify/subscribe.rs`); this module turns its
//! answers into pages.
//!
//! The answer to a request is the same whether or not the address is
//! subscribed already, so the form cannot be used to learn who is.
//!
//! Every form POST here (and `/unsubscribe`'s, except a one-click one) must
//! come from the hub's own pages ([`refuse_cross_site`]): otherwise any web
//! page could make its visitors' browsers post the form, each from its own
//! address, past the per-client limit.

use std::net::SocketAddr;

use askama::Template;
use axum::extract::rejection::{FormRejection, QueryRejection};
use axum::extract::{ConnectInfo, Form, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};

use super::{Handlers, TokenQuery, token_of, view};
use crate::notify::{ConfirmError, ConfirmRefused, RequestError};

/// A page that says one thing, may ask for one button press (a form that
/// POSTs to `action`), and may point at a project's page. The unsubscribe
/// page is one too.
#[derive(Template)]
#[template(path = "link_page.html")]
pub(super) struct LinkPage<'a> {
    pub(super) title: &'a str,
    pub(super) sentence: &'a str,
    /// Where the button POSTs (relative); no form when empty.
    pub(super) action: &'a str,
    /// A hidden field the form sends (`name`, `value`), if any.
    pub(super) hidden: Option<(&'a str, &'a str)>,
    pub(super) button: &'a str,
    /// The project whose page to link; none when empty.
    pub(super) project: &'a str,
}

impl LinkPage<'_> {
    /// The page with `status`.
    pub(super) fn respond(&self, status: StatusCode) -> Response {
        let mut response = view::html(self);
        if response.status() == StatusCode::OK {
            *response.status_mut() = status;
        }
        response
    }
}

/// A page with a sentence and a link to `project`'s page.
fn sentence(status: StatusCode, title: &str, sentence: &str, project: &str) -> Response {
    LinkPage {
        title,
        sentence,
        action: "",
        hidden: None,
        button: "",
        project,
    }
    .respond(status)
}

/// The 403 page for a form posted from another site, or `None` when the
/// request may be from the hub's own pages. A browser says where a form
/// came from in `Origin` (compared with the request's `Host` and with
/// `notify.public_url`, for a hub behind a proxy that rewrites `Host`), or,
/// without it, in `Sec-Fetch-Site`. A request carrying neither (curl, a
/// script, a mail provider's one-click unsubscribe) is not a browser
/// tricked by another page, and is let through.
pub(super) fn refuse_cross_site(headers: &HeaderMap, handlers: &Handlers) -> Option<Response> {
    let public_url = handlers.site().ok().map(|s| s.notifier.public_url());
    if !is_cross_site(headers, public_url) {
        return None;
    }
    tracing::info!("web: refused a form posted from another site");
    Some(sentence(
        StatusCode::FORBIDDEN,
        "Refused",
        "This form was sent from another website; the hub only takes it from its own pages. Open the link or the project's page yourself and press the button there.",
        "",
    ))
}

/// Whether `headers` say a browser sent the request from another site
/// than the hub (see [`refuse_cross_site`]).
fn is_cross_site(headers: &HeaderMap, public_url: Option<&str>) -> bool {
    let text = |name| headers.get(name).map(|v| v.to_str().unwrap_or("").trim());
    match text(header::ORIGIN) {
        Some(origin) => {
            let own_host = text(header::HOST)
                .filter(|h| !h.is_empty())
                .is_some_and(|host| {
                    authority(origin).is_some_and(|a| a.eq_ignore_ascii_case(host))
                });
            let own_url = public_url
                .and_then(url_origin)
                .is_some_and(|o| o.eq_ignore_ascii_case(origin));
            // "null" (a sandboxed or privacy-sensitive context) is no site of ours.
            !(own_host || own_url)
        }
        None => text(header::HeaderName::from_static("sec-fetch-site"))
            .is_some_and(|s| s.eq_ignore_ascii_case("cross-site")),
    }
}

/// `host[:port]` of an origin (`scheme://host[:port]`), if it is one.
fn authority(origin: &str) -> Option<&str> {
    let (_, rest) = origin.split_once("://")?;
    (!rest.is_empty() && !rest.contains('/')).then_some(rest)
}

/// The origin (`scheme://host[:port]`) of an http(s) URL.
fn url_origin(url: &str) -> Option<&str> {
    let (scheme, rest) = url.split_once("://")?;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    (end > 0).then(|| &url[..scheme.len() + 3 + end])
}

pub(super) fn routes() -> Router<Handlers> {
    Router::new()
        .route("/projects/{name}/subscribe", post(request))
        .route("/subscribe/confirm", get(confirm_page).post(confirm))
}

#[derive(serde::Deserialize)]
struct SubscribeForm {
    address: Option<String>,
}

/// `POST /projects/<name>/subscribe`: mail a confirmation link.
async fn request(
    State(handlers): State<Handlers>,
    Path(project): Path<String>,
    client: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    form: Result<Form<SubscribeForm>, FormRejection>,
) -> Response {
    if let Some(refused) = refuse_cross_site(&headers, &handlers) {
        return refused;
    }
    let site = match handlers.site() {
        Ok(site) => site,
        Err(starting) => return starting.into_response(),
    };
    let address = match form {
        Ok(Form(SubscribeForm { address: Some(a) })) => a,
        Ok(_) => String::new(),
        Err(e) => {
            return sentence(
                StatusCode::BAD_REQUEST,
                "Cannot subscribe",
                &format!("The form could not be read ({e}); use the form on the project's page."),
                "",
            );
        }
    };
    let client = client.map(|Extension(ConnectInfo(addr))| addr.ip());
    let notifier = site.notifier.clone();
    // Spawned so a client hanging up cannot cancel the outbox write halfway.
    let outcome = tokio::spawn(async move {
        notifier
            .request_subscription(&project, &address, client)
            .await
            .map_err(|e| (e, project))
    })
    .await;
    match outcome {
        Ok(Ok(email)) => sentence(
            StatusCode::OK,
            "Check your mail",
            &format!("We sent a link to {email}; nothing is subscribed until you follow it."),
            "",
        ),
        Ok(Err((e, project))) => request_refused(&e, &project),
        Err(e) => task_failed("request", &e),
    }
}

/// The page when the task doing a subscription `what` failed (a panic, or
/// the runtime shutting down).
fn task_failed(what: &str, e: &tokio::task::JoinError) -> Response {
    tracing::error!("web: subscription {what} task failed: {e}");
    view::error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Cannot subscribe",
        "The hub failed to process this request; please try again later.",
    )
}

/// The page for a request the notifier did not take.
fn request_refused(e: &RequestError, project: &str) -> Response {
    let text = capitalized(&e.to_string());
    match e {
        RequestError::Off => sentence(StatusCode::FORBIDDEN, "Ask the operator", &text, ""),
        RequestError::UnknownProject(_) => view::error(StatusCode::NOT_FOUND, "Not found", &text),
        RequestError::BadAddress(_) => {
            sentence(StatusCode::BAD_REQUEST, "Cannot subscribe", &text, project)
        }
        RequestError::TooMany { retry_after, .. } => {
            let mut r = sentence(
                StatusCode::TOO_MANY_REQUESTS,
                "Too many requests",
                &text,
                "",
            );
            if let Ok(v) = HeaderValue::from_str(&retry_after.as_secs().to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            r
        }
        RequestError::Store(err) => {
            tracing::error!("web: cannot queue a subscription confirmation: {err}");
            sentence(
                StatusCode::SERVICE_UNAVAILABLE,
                "Cannot subscribe",
                &text,
                "",
            )
        }
    }
}

/// `GET /subscribe/confirm?token=…`: what the link subscribes, and a button.
async fn confirm_page(
    State(handlers): State<Handlers>,
    query: Result<Query<TokenQuery>, QueryRejection>,
) -> Response {
    let token = match token_of(query) {
        Ok(t) => t,
        Err(why) => return link_refused(&ConfirmRefused::Token(ConfirmError::Invalid), why),
    };
    let site = match handlers.site() {
        Ok(site) => site,
        Err(starting) => return starting.into_response(),
    };
    match site.notifier.confirmation(&token) {
        Ok(c) => {
            // Relative, so the form also works behind a reverse proxy's path prefix.
            let action = format!("confirm?token={}", super::percent_encode(&token));
            LinkPage {
                title: "Confirm your subscription",
                sentence: &format!(
                    "Press the button to mail {} when {} goes red or is fixed.",
                    c.email, c.project
                ),
                action: &action,
                hidden: None,
                button: "Subscribe",
                project: &c.project,
            }
            .respond(StatusCode::OK)
        }
        Err(e) => link_refused(&e, ""),
    }
}

/// `POST /subscribe/confirm?token=…`: subscribes (once).
async fn confirm(
    State(handlers): State<Handlers>,
    headers: HeaderMap,
    query: Result<Query<TokenQuery>, QueryRejection>,
) -> Response {
    if let Some(refused) = refuse_cross_site(&headers, &handlers) {
        return refused;
    }
    let token = match token_of(query) {
        Ok(t) => t,
        Err(why) => return link_refused(&ConfirmRefused::Token(ConfirmError::Invalid), why),
    };
    let site = match handlers.site() {
        Ok(site) => site,
        Err(starting) => return starting.into_response(),
    };
    let notifier = site.notifier.clone();
    let outcome = tokio::spawn(async move { notifier.confirm_subscription(&token).await }).await;
    match outcome {
        Ok(Ok(done)) => sentence(
            StatusCode::OK,
            "Subscribed",
            &format!(
                "{} is subscribed to {}: it gets a mail when {} goes red or is fixed, each with a link to unsubscribe.",
                done.email, done.project, done.project
            ),
            &done.project,
        ),
        Ok(Err(e)) => link_refused(&e, ""),
        Err(e) => task_failed("confirmation", &e),
    }
}

/// The page for a link that does not subscribe; `why` replaces the
/// sentence when the request carried no token at all.
fn link_refused(e: &ConfirmRefused, why: &str) -> Response {
    let text = capitalized(&if why.is_empty() {
        e.to_string()
    } else {
        why.to_string()
    });
    tracing::info!("web: subscription confirmation refused: {text}");
    match e {
        ConfirmRefused::Token(ConfirmError::Expired { project, .. }) => {
            sentence(StatusCode::GONE, "Link expired", &text, project)
        }
        ConfirmRefused::UnsubscribedSince { project } => {
            sentence(StatusCode::GONE, "Link no longer valid", &text, project)
        }
        ConfirmRefused::Token(ConfirmError::Invalid) => {
            sentence(StatusCode::BAD_REQUEST, "Invalid link", &text, "")
        }
        ConfirmRefused::Off => sentence(StatusCode::FORBIDDEN, "Ask the operator", &text, ""),
        ConfirmRefused::UnknownProject(_) => view::error(StatusCode::NOT_FOUND, "Not found", &text),
        ConfirmRefused::Store(err) => {
            tracing::error!("web: cannot record a subscription: {err}");
            sentence(
                StatusCode::SERVICE_UNAVAILABLE,
                "Cannot subscribe",
                &text,
                "",
            )
        }
    }
}

/// A sentence starting with a capital letter and ending with a full stop.
fn capitalized(text: &str) -> String {
    let mut chars = text.chars();
    let mut out: String = match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    };
    if !out.ends_with(['.', '!', '?']) {
        out.push('.');
    }
    out
}
