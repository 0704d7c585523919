//! The trunkfarm hub: a library so the binary, the demo and the tests share one
//! implementation. See ARCHITECTURE.md at the repository root for the map.

pub mod artifacts;
pub mod auth;
pub mod cli;
pub mod config;
pub mod dispatch;
pub mod grpc;
pub mod junit;
pub mod logs;
pub mod metrics;
pub mod notify;
pub mod pipeline;
pub mod provision;
pub mod results;
pub mod server;
pub mod space;
pub mod store;
pub mod web;
