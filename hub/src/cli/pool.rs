//! `trunkfarm pool list`: on-demand agent pools and their instances.

use std::process::ExitCode;

use trunkfarm_proto::v1::ListPoolsRequest;

use super::{output, status_error, view, when};
use crate::config::HubConfig;

/// Prints every pool: its instances (starting, running idle/busy,
/// stopping), failed starts and back-off.
pub(super) async fn list(cfg: &HubConfig, all: bool, json: bool) -> anyhow::Result<ExitCode> {
    let mut client = super::client::connect(cfg).await?;
    let pools = client
        .list_pools(ListPoolsRequest { all })
        .await
        .map_err(status_error)?
        .into_inner()
        .pools;
    if json {
        output::json_list::<_, view::Pool>(&pools)?;
        return Ok(ExitCode::SUCCESS);
    }
    if pools.is_empty() {
        println!("no pool is configured: add [[pool]] entries to the hub config");
    }
    for p in pools {
        let live = p
            .instances
            .iter()
            .filter(|i| matches!(i.state.as_str(), "starting" | "running"))
            .count();
        println!(
            "pool {} ({}): {live} instance(s), min {}, max {}{}",
            p.name,
            p.provisioner,
            p.min_instances,
            p.max_instances,
            if p.labels.is_empty() {
                String::new()
            } else {
                format!(", labels {}", p.labels.join(","))
            }
        );
        if p.failed_starts > 0 {
            println!(
                "  {} failed start(s) in a row, next start not before {}: {}",
                p.failed_starts,
                when(p.next_start_at_ms),
                p.last_error
            );
        }
        for i in p.instances {
            let state = match (i.state.as_str(), i.busy) {
                ("running", true) => "busy".to_owned(),
                ("running", false) => "idle".to_owned(),
                (s, _) => s.to_owned(),
            };
            println!(
                "  {:<24} {:<9} {:<16} {:<14} started {}{}",
                i.id,
                state,
                i.agent_id,
                i.handle,
                when(i.created_at_ms),
                if i.detail.is_empty() {
                    String::new()
                } else {
                    format!("  ({})", i.detail)
                }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
