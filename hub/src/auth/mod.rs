//! Who may talk to the hub: its TLS identity, enrollment tokens, agent
//! credentials and the admin token.

pub mod credentials;
pub mod secret;
pub mod tls;
