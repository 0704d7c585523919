//! How a page or an API answer leaves the hub: one HTML response shape (an
//! askama template inside `layout.html`, with the security headers every
//! page carries), one JSON shape, one error shape, and the time format.
//!
//! Every page has a view struct (`Serialize`) built by its module from the
//! owners' queries; the page renders it and `/api/v1/…` serializes the very
//! same value, so the API and the pages cannot say different things.
//! Conventions of those structs: enums as lowercase words, every `…_ms`
//! time (Unix milliseconds) with an RFC 3339 twin without the suffix
//! (`finished_at_ms` and `finished_at`), durations in `…_ms` plus a human
//! word where shown.

use askama::Template;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// The stylesheet every page links (`/static/style.css`).
pub(crate) const STYLE_CSS: &str = include_str!("static/style.css");
/// The script that keeps pages live (`/static/live.js`); pages work without it.
pub(crate) const LIVE_JS: &str = include_str!("static/live.js");

/// `ms` (Unix milliseconds) as RFC 3339 in UTC with milliseconds; empty
/// for 0 (never).
pub(crate) fn rfc3339(ms: u64) -> String {
    if ms == 0 {
        return String::new();
    }
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

/// How long ago `ms` was, as people say it ("3m ago"); "never" for 0.
pub(crate) fn ago(ms: u64, now_ms: u64) -> String {
    if ms == 0 {
        return "never".into();
    }
    let d = std::time::Duration::from_millis(now_ms.saturating_sub(ms));
    if d.as_secs() < 1 {
        return "just now".into();
    }
    format!(
        "{} ago",
        trunkfarm_proto::settings::fmt_duration(std::time::Duration::from_secs(d.as_secs()))
    )
}

/// A proto enum value's name as pages and the API say it: the name
/// without its prefix, lowercase (`RUN_STATUS_GREEN` → `green`).
pub(crate) fn word(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .to_ascii_lowercase()
}

/// A duration of `ms` as people say it, to the second ("2m 5s").
pub(crate) fn duration(ms: u64) -> String {
    let d = std::time::Duration::from_secs(ms / 1000);
    if d.is_zero() {
        return format!("{ms}ms");
    }
    trunkfarm_proto::settings::fmt_duration(d)
}

/// A rendered page (status 200) with the headers every page carries.
pub(crate) fn html(template: &impl Template) -> Response {
    match template.render() {
        Ok(body) => with_page_headers((StatusCode::OK, body).into_response()),
        Err(e) => {
            tracing::error!("web: a page failed to render: {e}");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Error",
                "This page failed to render; the hub's log says why.",
            )
        }
    }
}

/// A JSON answer of the API.
pub(crate) fn json(value: &impl Serialize) -> Response {
    let body = match serde_json::to_vec_pretty(value) {
        Ok(body) => body,
        Err(e) => {
            tracing::error!("web: an API answer failed to serialize: {e}");
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot serialize the answer",
            )
                .into_response();
        }
    };
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// An API error: `{"error": sentence}` with `status`.
pub(crate) fn json_error(status: StatusCode, sentence: &str) -> Response {
    #[derive(Serialize)]
    struct ApiError<'a> {
        error: &'a str,
    }
    let mut response = json(&ApiError { error: sentence });
    *response.status_mut() = status;
    response
}

/// The page an error shows: a title and one sentence.
#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage<'a> {
    title: &'a str,
    sentence: &'a str,
}

/// An error page with `status`.
pub(crate) fn error(status: StatusCode, title: &str, sentence: &str) -> Response {
    let body = ErrorPage { title, sentence }
        .render()
        .unwrap_or_else(|_| sentence.to_string());
    with_page_headers((status, body).into_response())
}

/// Content type, no caching, no sniffing, no referrer (unsubscribe and
/// confirmation tokens are in URLs), and a policy allowing only the hub's
/// own stylesheet and script.
pub(crate) fn with_page_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; script-src 'self'; connect-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    response
}

/// A static file with its type.
pub(crate) fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// A result's or a build's detail as any page shows it: credentials in
/// URLs it quotes removed (the one place pages redact it).
pub(crate) fn detail(text: &str) -> String {
    trunkfarm_proto::gitauth::redact_text(text)
}

/// A pending build's word, the one every page and the CLI show:
/// dispatch's phase (`queued`, `starting`, `running`; see
/// `Dispatcher::phases`), `running` when its job finished a moment ago.
pub(crate) fn pending_build(phase: &str) -> &str {
    if phase.is_empty() { "running" } else { phase }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_rfc3339_and_as_people_say_them() {
        assert_eq!(rfc3339(0), "");
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(ago(0, 5), "never");
        assert_eq!(ago(1_000, 1_500), "just now");
        assert_eq!(ago(1_000, 1_000 + 90_000), "1m 30s ago");
        assert_eq!(duration(450), "450ms");
        assert_eq!(duration(125_900), "2m 5s");
        assert_eq!(word("RUN_STATUS_GREEN", "RUN_STATUS_"), "green");
    }
}
