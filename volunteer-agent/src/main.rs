//! `trunkfarm-agent`: the volunteer agent.

mod config;
mod executor;
mod output;
mod sysinfo;

fn main() {}
