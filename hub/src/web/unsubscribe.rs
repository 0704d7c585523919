//! `/unsubscribe?token=T`: the one-click unsubscribe link every mail carries.
//!
//! A GET only shows a page naming the address and what it stops (read from
//! the signed token, which is checked but not acted on) with a button: mail
//! scanners and link previewers follow GET links, so a GET never
//! unsubscribes. The button (and a mail client's RFC 8058 one-click request)
//! POSTs to the same URL, which hands the token to the notifier. A POST
//! from another website's page is refused unless its body is the one-click
//! `List-Unsubscribe=One-Click` (a mail provider's, which may come from
//! anywhere). Every
//! interpolated string is HTML-escaped (askama), and the token never reaches
//! a log.

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::get;

use super::subscribe::{LinkPage, refuse_cross_site};
use super::{Handlers, TokenQuery, percent_encode, token_of};
use crate::notify::Unsub;

pub(super) fn routes() -> Router<Handlers> {
    Router::new().route("/unsubscribe", get(page).post(unsubscribe))
}

/// A page with one sentence.
fn say(status: StatusCode, title: &str, sentence: &str) -> Response {
    LinkPage {
        title,
        sentence,
        action: "",
        hidden: None,
        button: "",
        project: "",
    }
    .respond(status)
}

fn refused(sentence: &str) -> Response {
    say(StatusCode::BAD_REQUEST, "Cannot unsubscribe", sentence)
}

/// What pressing the button stops, in words.
fn what_it_stops(u: &Unsub) -> String {
    if u.digest {
        format!(
            "Press the button to stop mailing {} the {} digest.",
            u.email, u.upstream
        )
    } else if u.project.is_empty() {
        format!(
            "Press the button to stop mailing {} about {}'s failed builds.",
            u.email, u.upstream
        )
    } else {
        format!(
            "Press the button to stop mailing {} about {}.",
            u.email, u.project
        )
    }
}

/// `GET /unsubscribe?token=T`: what the link stops, and a button.
async fn page(
    State(handlers): State<Handlers>,
    query: Result<Query<TokenQuery>, QueryRejection>,
) -> Response {
    let token = match token_of(query) {
        Ok(t) => t,
        Err(sentence) => return refused(sentence),
    };
    let sentence = match handlers.site() {
        Ok(site) => match site.notifier.unsubscribe_link(&token) {
            Ok(unsub) => what_it_stops(&unsub),
            Err(e) => return refused(&e.to_string()),
        },
        // The notifier checks the token when the button is pressed.
        Err(_starting) => "Press the button to stop receiving these emails.".to_string(),
    };
    // Relative, so the form also works behind a reverse proxy's path prefix.
    let action = format!("unsubscribe?token={}", percent_encode(&token));
    LinkPage {
        title: "Unsubscribe",
        sentence: &sentence,
        action: &action,
        hidden: Some(("List-Unsubscribe", "One-Click")),
        button: "Unsubscribe",
        project: "",
    }
    .respond(StatusCode::OK)
}

/// `POST /unsubscribe?token=T`: the notifier removes what the token says.
async fn unsubscribe(
    State(handlers): State<Handlers>,
    headers: HeaderMap,
    query: Result<Query<TokenQuery>, QueryRejection>,
    body: Bytes,
) -> Response {
    // The body (`List-Unsubscribe=One-Click`, RFC 8058) carries nothing we
    // need, the token is in the URL; it only exempts the request from the
    // same-site check, which a browser's form post must pass.
    if !is_one_click(&body)
        && let Some(refused) = refuse_cross_site(&headers, &handlers)
    {
        return refused;
    }
    let Handlers { unsubscribe, .. } = handlers;
    let token = match token_of(query) {
        Ok(t) => t,
        Err(sentence) => {
            tracing::info!("web: unsubscribe refused: {sentence}");
            return refused(sentence);
        }
    };
    // Spawned so a client hanging up mid-request cannot cancel the
    // notifier's work halfway.
    let outcome = tokio::spawn(unsubscribe(token)).await.unwrap_or_else(|e| {
        tracing::error!("web: unsubscribe task failed: {e}");
        Err("the hub failed to process this request; please try again later".to_string())
    });
    match outcome {
        Ok(sentence) => {
            tracing::info!("web: unsubscribed: {sentence}");
            say(StatusCode::OK, "Unsubscribed", &sentence)
        }
        Err(sentence) => {
            tracing::info!("web: unsubscribe refused: {sentence}");
            refused(&sentence)
        }
    }
}

/// Whether a POST body is RFC 8058's one-click request: the form field
/// `List-Unsubscribe=One-Click`, URL-encoded or as a multipart part.
fn is_one_click(body: &[u8]) -> bool {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    text.split('&')
        .any(|pair| pair == "List-Unsubscribe=One-Click")
        || text
            .split_once("name=\"List-Unsubscribe\"")
            .and_then(|(_, part)| part.split_once("\r\n\r\n"))
            .is_some_and(|(_, value)| value.starts_with("One-Click\r\n"))
}
