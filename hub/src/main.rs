//! `trunkfarm`: the hub binary. The modules below read as the data's path:
//! poll → build → artifact → fan-out → test → results → transitions →
//! outbox → mail (see ARCHITECTURE.md at the repository root for the map).
//! A binary crate on purpose: nothing is exported, so the compiler reports
//! every item nothing uses.

// `pub(crate)` by default: a bare `pub` would claim an API nobody outside
// could use (clippy runs with -D warnings, so this is enforced).
#![warn(unreachable_pub)]

// Shared leaf types: what a job is for, how a commit is written for people,
// the configured repositories' credentials.
mod commit;
mod job_key;
mod repo_credentials;

// Under everything: the database, the config, the disk's reserve.
mod store;

// "Something shown changed": the dashboard's live updates.
mod changes;

mod config;

mod space;

// Where artifacts and compacted logs live: the data dir or an S3 bucket.
mod objects;

// The data path, in order.
// Watch trunk and projects; make build and test jobs; take finished ones in.
mod pipeline;

// Jobs meet agents: queue, leases, sessions, the one result.
mod dispatch;

// The runtimes the builds upload and the test jobs download.
mod artifacts;

// What the jobs printed, and their JUnit reports.
mod logs;

mod junit;

// What a run's output says: output patterns, excerpts for mails.
mod output;

// Builds, runs, series and the transitions they cause.
mod results;
// Pruning what expired, in the background (results, logs, job records).
mod retention;

// Subscriptions, the outbox and the mail.
mod notify;

// Beside the path: on-demand machines, who may connect, what is measured.
mod provision;

// AWS credentials, read once for EC2 and S3 alike.
mod aws_credentials;

mod auth;

mod metrics;

// The edges: the wire, the web, the command line.
mod grpc;

mod web;

mod server;

mod admin_client;

mod cli;

// Tools beside the product: the embedded demo and the benchmarks.
mod demo;

mod bench;

fn main() -> std::process::ExitCode {
    // Whatever the hub writes (database, artifacts, logs, mails, pool
    // agents' dirs, demo and bench files) is its user's alone, whatever
    // umask it was started with.
    // SAFETY: umask(2) only swaps the process's file mode mask; it cannot fail.
    unsafe { libc::umask(0o077) };
    cli::main()
}
