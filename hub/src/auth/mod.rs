//! Who may talk to the hub: its TLS identity, enrollment tokens, agent
//! credentials and the admin token.

pub(crate) mod credentials;
pub(crate) mod secret;
pub(crate) mod tls;
