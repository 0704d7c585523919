//! The hub's metrics in the Prometheus text format (`GET /metrics` on the
//! web endpoint): queue, agents, pools, outbox as gauges computed on request
//! from the modules that own the state; finished jobs, artifact downloads
//! and log compactions as counters since the hub started.

use std::fmt::Write as _;

use crate::artifacts::Artifacts;
use crate::dispatch::Dispatcher;
use crate::notify::Notifier;
use crate::provision::{InstanceState, Pools};

/// Renders every gauge.
pub(crate) fn render(
    dispatch: &Dispatcher,
    artifacts: &Artifacts,
    notifier: &Notifier,
    pools: &Pools,
) -> String {
    let mut out = String::new();
    let (queued, leased) = dispatch.open_counts();
    let connected = dispatch.connected();
    let busy = connected.values().filter(|c| !c.running.is_empty()).count();
    let _ = writeln!(
        out,
        "# HELP trunkfarm_jobs_queued Jobs waiting for an agent."
    );
    let _ = writeln!(out, "# TYPE trunkfarm_jobs_queued gauge");
    let _ = writeln!(out, "trunkfarm_jobs_queued {queued}");
    let _ = writeln!(
        out,
        "# HELP trunkfarm_jobs_leased Jobs handed to an agent and not finished."
    );
    let _ = writeln!(out, "# TYPE trunkfarm_jobs_leased gauge");
    let _ = writeln!(out, "trunkfarm_jobs_leased {leased}");
    let _ = writeln!(
        out,
        "# HELP trunkfarm_agents_connected Agents with an open session, by activity."
    );
    let _ = writeln!(out, "# TYPE trunkfarm_agents_connected gauge");
    let _ = writeln!(
        out,
        "trunkfarm_agents_connected{{activity=\"busy\"}} {busy}"
    );
    let _ = writeln!(
        out,
        "trunkfarm_agents_connected{{activity=\"idle\"}} {}",
        connected.len() - busy
    );
    let _ = writeln!(
        out,
        "# HELP trunkfarm_pool_instances On-demand instances by pool and state."
    );
    let _ = writeln!(out, "# TYPE trunkfarm_pool_instances gauge");
    let _ = writeln!(
        out,
        "# HELP trunkfarm_pool_failed_starts Failed starts in a row, by pool."
    );
    let _ = writeln!(out, "# TYPE trunkfarm_pool_failed_starts gauge");
    for cfg in pools.configs() {
        let instances = pools.instances(&cfg.name).unwrap_or_default();
        for (state, name) in [
            (InstanceState::Starting, "starting"),
            (InstanceState::Running, "running"),
            (InstanceState::Stopping, "stopping"),
        ] {
            let n = instances.iter().filter(|i| i.state == state).count();
            let _ = writeln!(
                out,
                "trunkfarm_pool_instances{{pool=\"{}\",state=\"{name}\"}} {n}",
                cfg.name
            );
        }
        let failures = pools.backoff(&cfg.name).map(|b| b.failures).unwrap_or(0);
        let _ = writeln!(
            out,
            "trunkfarm_pool_failed_starts{{pool=\"{}\"}} {failures}",
            cfg.name
        );
    }
    let pending = notifier.pending_count();
    let _ = writeln!(
        out,
        "# HELP trunkfarm_mail_pending Mails waiting in the outbox."
    );
    let _ = writeln!(out, "# TYPE trunkfarm_mail_pending gauge");
    let _ = writeln!(out, "trunkfarm_mail_pending {pending}");
    let artifact = artifacts.download_totals();
    let (compacted, compaction_failures) = dispatch.logs().compaction_totals();
    for (name, help, value) in [
        (
            "trunkfarm_jobs_finished_total",
            "Jobs finished (result durably stored) since the hub started.",
            dispatch.finished_total(),
        ),
        (
            "trunkfarm_artifact_downloads_total",
            "Runtime artifact downloads served to the end or handed a presigned object store URL since the hub started.",
            artifact.downloads,
        ),
        (
            "trunkfarm_artifact_sent_bytes_total",
            "Runtime artifact bytes the hub itself sent to agents since the hub started (not those agents fetched from the object store).",
            artifact.sent_bytes,
        ),
        (
            "trunkfarm_artifact_url_reports_total",
            "Agents' reports that the bytes at an artifact's presigned object store URL did not match its hash, since the hub started.",
            artifact.url_reports,
        ),
        (
            "trunkfarm_artifact_report_checks_total",
            "Stored artifacts the hub read whole to check such a report (one per object version per 10 minutes, unless reports arrive at the same moment), since the hub started.",
            artifact.report_checks,
        ),
        (
            "trunkfarm_logs_compacted_total",
            "Finished attempts' logs moved from the database into the object store since the hub started.",
            compacted,
        ),
        (
            "trunkfarm_log_compaction_failures_total",
            "Log compactions that failed (the log stays in the database and is retried) since the hub started.",
            compaction_failures,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} counter");
        let _ = writeln!(out, "{name} {value}");
    }
    out
}
