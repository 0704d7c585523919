//! What the dashboard's pages and the JSON API read: handles to the hub's
//! owners of state, filled in once they exist.
//!
//! The web endpoint starts first (the notifier's links need its address),
//! so the handles arrive later through a [`SiteCell`]; until then every page
//! answers 503 "the hub is still starting". The web module only reads: every
//! fact it shows comes from the owner's own query (pipeline, results,
//! dispatch, credentials, notify, logs), never from a tree directly.

use std::sync::{Arc, OnceLock};

use crate::auth::credentials::Credentials;
use crate::dispatch::Dispatcher;
use crate::logs::JobLogs;
use crate::notify::Notifier;
use crate::pipeline::Pipeline;

/// The hub's owners, as the pages see them (all cheap to clone).
#[derive(Clone)]
#[allow(dead_code)] // Until every page reads its owner; remove then.
pub(crate) struct Site {
    pub(crate) pipeline: Pipeline,
    pub(crate) dispatch: Dispatcher,
    pub(crate) credentials: Credentials,
    pub(crate) notifier: Notifier,
    pub(crate) logs: Arc<JobLogs>,
}

/// Where [`Site`] is put once the hub has started.
pub(crate) type SiteCell = Arc<OnceLock<Site>>;
