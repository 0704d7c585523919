//! `trunkfarm`: the hub binary. The modules below read as the data's path:
//! poll → build → artifact → fan-out → test → results → transitions →
//! outbox → mail (see ARCHITECTURE.md at the repository root for the map).
//! A binary crate on purpose: nothing is exported, so the compiler reports
//! every item nothing uses.

// Shared leaf types: what a job is for, how a commit is written for people.
mod commit;
mod job_key;

// State and its owners, along the data path.
mod artifacts;
mod auth;
mod config;
mod dispatch;
mod junit;
mod logs;
mod metrics;
mod notify;
mod pipeline;
mod provision;
mod results;
mod space;
mod store;

// The edges: the wire, the web, the command line.
mod admin_client;
mod cli;
mod grpc;
mod server;
mod web;

// Tools beside the product: the embedded demo and the benchmarks.
mod bench;
mod demo;

fn main() -> std::process::ExitCode {
    cli::main()
}
