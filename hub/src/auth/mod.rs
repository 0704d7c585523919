//! Who may talk to the hub: its TLS identity, enrollment tokens, agent
//! credentials and the admin token; how often an address may fail to enroll.

pub(crate) mod credentials;
pub(crate) mod secret;
pub(crate) mod throttle;
pub(crate) mod tls;
