//! The trunkfarm hub: a library so the binary, the demo and the tests share one
//! implementation. See ARCHITECTURE.md at the repository root for the map.

pub mod auth;
pub mod cli;
pub mod config;
pub mod dispatch;
pub mod grpc;
pub mod logs;
pub mod server;
pub mod store;
