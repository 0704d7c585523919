//! The trunkfarm hub: a library so the binary, the demo and the tests share one
//! implementation. See ARCHITECTURE.md at the repository root for the map.

pub mod auth;
pub mod config;
pub mod store;
