//! `/events`: server-sent events telling open pages that what they show
//! changed (`event: changed`), so `live.js` fetches their `data-live`
//! fragments again. One stream per open page, woken by the owners' change
//! counters (results and builds through the pipeline, jobs through
//! dispatch; [`crate::changes`]); a burst of changes is one event at most
//! every [`COALESCE`]; a comment every [`KEEP_ALIVE`] keeps proxies from
//! closing an idle stream. Streams end when the hub shuts down.
//!
//! A stream holds one of the endpoint's connections for as long as the
//! page is open, so at most half of `web.max_connections` may be streams:
//! beyond that `/events` answers 503 and pages stay reachable (they work
//! without live updates: a reload shows the same).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use super::{Handlers, view};

/// Changes closer together than this make one event.
pub(crate) const COALESCE: Duration = Duration::from_millis(500);

/// How often an idle stream sends a comment.
pub(crate) const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The streams' share of the endpoint: a cap and the hub's shutdown.
#[derive(Clone)]
pub(crate) struct Streams {
    slots: Arc<Semaphore>,
    shutdown: CancellationToken,
}

impl Streams {
    /// At most half of `max_connections` streams (at least one), ending
    /// when `shutdown` is cancelled.
    pub(crate) fn new(max_connections: u32, shutdown: CancellationToken) -> Streams {
        Streams {
            slots: Arc::new(Semaphore::new((max_connections as usize / 2).max(1))),
            shutdown,
        }
    }
}

/// `GET /events`.
pub(super) async fn stream(State(handlers): State<Handlers>) -> Response {
    let site = match handlers.site() {
        Ok(site) => site.clone(),
        Err(starting) => return starting.into_response(),
    };
    let Ok(slot) = handlers.events.slots.clone().try_acquire_owned() else {
        return view::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "Busy",
            "Too many pages are being kept live right now; reload the page to see what changed.",
        );
    };
    let mut jobs = site.dispatch.changes();
    let mut results = site.pipeline.changes();
    let shutdown = handlers.events.shutdown.clone();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(1);
    tokio::spawn(async move {
        let _slot = slot;
        let mut sent: u64 = 0;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tx.closed() => break,
                changed = jobs.changed() => if changed.is_err() { break },
                changed = results.changed() => if changed.is_err() { break },
            }
            // Whatever else changes meanwhile is in the same event.
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(COALESCE) => {}
            }
            jobs.mark_unchanged();
            results.mark_unchanged();
            sent += 1;
            // Browsers drop an event without data: the count is its data.
            let event = Event::default().event("changed").data(sent.to_string());
            if tx.send(Ok(event)).await.is_err() {
                break;
            }
        }
    });
    Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE).text("keep-alive"))
        .into_response()
}
