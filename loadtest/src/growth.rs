//! How cost grows: runs of the player simulator ([`crate::players`]) at a ladder of player
//! counts, on stacks of 4 or 7 replicas with a given gateway batch size, one row per run
//! (`hoard-loadtest grow`), and the one-connection-per-player ladder that finds how many such
//! players the stack sustains (`hoard-loadtest ladder`).
//!
//! The gateway runs as a child process so that its CPU time and memory are its own; CPU time of
//! the gateway and of the replicas is read from `/proc/<pid>/stat` around the measured window
//! (after account setup), and divided by the window's clicks and committed events.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::players::{PlayersConfig, Simulation};
use crate::stack::Stack;
use crate::stats::{ladder_verdict, LadderLimits};

/// One run of the simulator on one stack.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct GrowthRow {
    pub replicas: usize,
    /// The gateway batcher's transactions per chain request.
    pub batch_max: usize,
    pub players: usize,
    pub direct_players: usize,
    pub seconds: f64,
    pub clicks_per_second_offered: f64,
    pub clicks_per_second: f64,
    pub asset_events_per_second_offered: f64,
    pub events_committed_per_second: f64,
    pub click_ack_p50_ms: f64,
    pub click_ack_p99_ms: f64,
    pub accept_to_commit_p50_ms: f64,
    pub accept_to_commit_p99_ms: f64,
    pub trade_p99_ms: f64,
    /// Errors other than the ledger's rejections.
    pub errors: u64,
    pub schedule_kept: bool,
    /// CPU cores the gateway process used over the window (CPU seconds / wall seconds).
    pub gateway_cores: f64,
    /// CPU cores all replicas used together.
    pub replica_cores: f64,
    /// Gateway CPU microseconds per acknowledged click (clicks dominate its work).
    pub gateway_cpu_us_per_click: f64,
    /// Replica CPU milliseconds (all replicas together) per committed asset event.
    pub replica_cpu_ms_per_event: f64,
    pub gateway_rss_bytes: u64,
    pub replica_rss_bytes_max: u64,
    /// Why this run would not count as sustained under the ladder's limits (None: it would).
    pub not_sustained: Option<String>,
}

fn cpu(pids: &[Option<u32>]) -> f64 {
    pids.iter()
        .map(|pid| pid.and_then(crate::sys::cpu_seconds).unwrap_or(0.0))
        .sum()
}

/// Runs the simulator once on `stack` with `players` (of which `direct_players` connect one
/// connection each) for `seconds`, and measures it.
pub async fn run_once(
    stack: &Stack,
    batch_max: usize,
    players: usize,
    direct_players: usize,
    seconds: u64,
    limits: &LadderLimits,
) -> anyhow::Result<GrowthRow> {
    let mut config = PlayersConfig::new(stack.ws_url(), stack.tenant, stack.studio.clone());
    config.players = players;
    config.direct_players = direct_players.min(players);
    config.players_per_game_server = 1_000;
    config.clicks_per_second = 10.0;
    config.asset_event_share = 0.01;
    config.trade_share = 0.1;
    config.duration = Duration::from_secs(seconds);
    let gateway_pid = [stack.gateway_pid()];
    let replica_pids: Vec<Option<u32>> = stack.replicas.iter().map(|r| r.process.pid()).collect();
    let simulation = Simulation::start(config).await?;
    let (gateway_before, replicas_before) = (cpu(&gateway_pid), cpu(&replica_pids));
    let report = simulation.run_for(std::future::pending()).await;
    let (gateway_after, replicas_after) = (cpu(&gateway_pid), cpu(&replica_pids));
    let wall = report.duration_seconds.max(1e-9);
    let gateway_cpu = gateway_after - gateway_before;
    let replica_cpu = replicas_after - replicas_before;
    let (gateway_rss, replica_rss) = stack.memory();
    let errors: u64 = report
        .errors
        .0
        .iter()
        .filter(|(reason, _)| !(reason.starts_with("rejected:") || reason.contains(":rejected:")))
        .map(|(_, n)| n)
        .sum();
    Ok(GrowthRow {
        replicas: stack.replicas.len(),
        batch_max,
        players,
        direct_players: report.direct_connections,
        seconds: report.duration_seconds,
        clicks_per_second_offered: report.clicks_per_second_offered,
        clicks_per_second: report.clicks_per_second,
        asset_events_per_second_offered: report.asset_events_per_second_offered,
        events_committed_per_second: report.events_committed_per_second,
        click_ack_p50_ms: report.click_ack.p50_ms,
        click_ack_p99_ms: report.click_ack.p99_ms,
        accept_to_commit_p50_ms: report.accept_to_commit.p50_ms,
        accept_to_commit_p99_ms: report.accept_to_commit.p99_ms,
        trade_p99_ms: report.trade.p99_ms,
        errors,
        schedule_kept: report.schedule_kept,
        gateway_cores: gateway_cpu / wall,
        replica_cores: replica_cpu / wall,
        gateway_cpu_us_per_click: if report.clicks_acked > 0 {
            gateway_cpu * 1e6 / report.clicks_acked as f64
        } else {
            0.0
        },
        replica_cpu_ms_per_event: if report.events_committed > 0 {
            replica_cpu * 1e3 / report.events_committed as f64
        } else {
            0.0
        },
        gateway_rss_bytes: gateway_rss,
        replica_rss_bytes_max: replica_rss.iter().copied().max().unwrap_or(0),
        not_sustained: ladder_verdict(
            limits,
            report.click_ack.p99_ms,
            report.accept_to_commit.p99_ms,
            &report.errors,
        ),
    })
}

/// Prints one row for a person.
pub fn print_row(row: &GrowthRow) {
    println!(
        "  replicas {} batch {} players {} ({} direct): clicks {:.0}/s (offered {:.0}), events {:.1}/s committed; \
         click ack p99 {:.1} ms; accept-to-commit p50 {:.1} p99 {:.1} ms; errors {}; gateway {:.2} cores ({:.2} us/click), \
         replicas {:.2} cores ({:.2} ms/event); gateway RSS {} MB{}{}",
        row.replicas,
        row.batch_max,
        row.players,
        row.direct_players,
        row.clicks_per_second,
        row.clicks_per_second_offered,
        row.events_committed_per_second,
        row.click_ack_p99_ms,
        row.accept_to_commit_p50_ms,
        row.accept_to_commit_p99_ms,
        row.errors,
        row.gateway_cores,
        row.gateway_cpu_us_per_click,
        row.replica_cores,
        row.replica_cpu_ms_per_event,
        row.gateway_rss_bytes / 1_000_000,
        if row.schedule_kept { "" } else { "; SIMULATOR BEHIND SCHEDULE" },
        row.not_sustained
            .as_ref()
            .map(|r| format!("; NOT SUSTAINED: {r}"))
            .unwrap_or_default()
    );
}
