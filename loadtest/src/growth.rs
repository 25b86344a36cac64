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
    /// What the replicas' stores and views did in the window (from their `/metrics`): a row
    /// whose tail is a disk stall or a view change says so.
    #[serde(default)]
    pub replicas_window: ReplicaWindow,
    /// Why this run would not count as sustained under the ladder's limits (None: it would).
    pub not_sustained: Option<String>,
}

/// The replicas' store syncs and view changes over a window, all replicas together, from the
/// differences of their `/metrics` (`hoard_replica_store_sync_seconds`,
/// `hoard_replica_view_changes_total`) at its start and end.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplicaWindow {
    pub store_syncs: u64,
    /// Syncs that took longer than 100 ms (one stalls every round in flight on that replica).
    pub store_syncs_over_100ms: u64,
    /// The slowest sync took at most this long: the histogram's smallest bucket bound that holds
    /// every sync of the window (None: no sync, or one over the largest bound, 5 s).
    pub store_sync_slowest_at_most_seconds: Option<f64>,
    pub view_changes: u64,
    /// A replica of the window had a sync over the largest bound (the slowest is then unbounded).
    #[serde(skip)]
    over_largest_bound: bool,
}

/// One replica's counters at one moment: (store sync histogram buckets as (bound, cumulative
/// count), sync count, view changes).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReplicaCounters {
    sync_buckets: Vec<(f64, f64)>,
    syncs: f64,
    view_changes: f64,
}

impl ReplicaCounters {
    /// Reads them from a replica's parsed `/metrics`.
    pub fn from_samples(samples: &[crate::sys::Sample]) -> ReplicaCounters {
        let mut sync_buckets: Vec<(f64, f64)> = samples
            .iter()
            .filter(|s| s.name == "hoard_replica_store_sync_seconds_bucket")
            .filter_map(|s| Some((label(&s.labels, "le")?.parse::<f64>().ok()?, s.value)))
            .collect();
        sync_buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        ReplicaCounters {
            sync_buckets,
            syncs: crate::sys::sum(samples, "hoard_replica_store_sync_seconds_count"),
            view_changes: crate::sys::sum(samples, "hoard_replica_view_changes_total"),
        }
    }

    /// None (and a warning) when the replica's metrics cannot be read: the row then counts
    /// nothing for that replica.
    async fn scrape(address: std::net::SocketAddr) -> Option<ReplicaCounters> {
        match crate::sys::scrape(address).await {
            Ok(samples) => Some(ReplicaCounters::from_samples(&samples)),
            Err(error) => {
                tracing::warn!(%address, %error, "replica metrics unreadable: the row counts nothing for this replica");
                None
            }
        }
    }
}

/// The value of label `name` in `{a="x",name="y"}`.
fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    let start = labels.find(&format!("{name}=\""))? + name.len() + 2;
    let length = labels[start..].find('"')?;
    Some(&labels[start..start + length])
}

impl ReplicaWindow {
    /// Adds one replica's window, from its counters at the start and at the end.
    pub fn add(&mut self, before: &ReplicaCounters, after: &ReplicaCounters) {
        let delta = |a: f64, b: f64| (a - b).max(0.0) as u64;
        let syncs = delta(after.syncs, before.syncs);
        let at = |counters: &ReplicaCounters, bound: f64| {
            counters
                .sync_buckets
                .iter()
                .find(|(le, _)| *le == bound)
                .map_or(0.0, |(_, n)| *n)
        };
        self.store_syncs += syncs;
        self.store_syncs_over_100ms += syncs.saturating_sub(delta(at(after, 0.1), at(before, 0.1)));
        self.view_changes += delta(after.view_changes, before.view_changes);
        if syncs == 0 {
            return;
        }
        let slowest = after
            .sync_buckets
            .iter()
            .filter(|(le, _)| le.is_finite())
            .find(|(le, _)| delta(at(after, *le), at(before, *le)) == syncs)
            .map(|(le, _)| *le);
        match slowest {
            None => self.over_largest_bound = true,
            Some(le) => {
                let seen = self.store_sync_slowest_at_most_seconds.unwrap_or(0.0);
                self.store_sync_slowest_at_most_seconds = Some(seen.max(le));
            }
        }
        if self.over_largest_bound {
            self.store_sync_slowest_at_most_seconds = None;
        }
    }
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
    let counters =
        || futures::future::join_all(stack.replicas.iter().map(|r| ReplicaCounters::scrape(r.metrics)));
    let counters_before = counters().await;
    let (gateway_before, replicas_before) = (cpu(&gateway_pid), cpu(&replica_pids));
    let report = simulation.run_for(std::future::pending()).await;
    let (gateway_after, replicas_after) = (cpu(&gateway_pid), cpu(&replica_pids));
    let mut replicas_window = ReplicaWindow::default();
    for (before, after) in counters_before.iter().zip(counters().await.iter()) {
        if let (Some(before), Some(after)) = (before, after) {
            replicas_window.add(before, after);
        }
    }
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
        replicas_window,
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
         replicas {:.2} cores ({:.2} ms/event); gateway RSS {} MB; replica store syncs {} ({} over 100 ms, slowest <= {}), \
         view changes {}{}{}",
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
        row.replicas_window.store_syncs,
        row.replicas_window.store_syncs_over_100ms,
        row.replicas_window
            .store_sync_slowest_at_most_seconds
            .map_or("-".to_string(), |s| format!("{:.0} ms", s * 1e3)),
        row.replicas_window.view_changes,
        if row.schedule_kept { "" } else { "; SIMULATOR BEHIND SCHEDULE" },
        row.not_sustained
            .as_ref()
            .map(|r| format!("; NOT SUSTAINED: {r}"))
            .unwrap_or_default()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(text: &str) -> ReplicaCounters {
        ReplicaCounters::from_samples(&crate::sys::parse_metrics(text))
    }

    fn replica(syncs: [u64; 4], views: u64) -> String {
        // Cumulative counts at le 0.01, 0.1, 0.5, +Inf.
        let [a, b, c, d] = syncs;
        format!(
            "hoard_replica_store_sync_seconds_bucket{{replica=\"0\",le=\"0.01\"}} {a}\n\
             hoard_replica_store_sync_seconds_bucket{{replica=\"0\",le=\"0.1\"}} {b}\n\
             hoard_replica_store_sync_seconds_bucket{{replica=\"0\",le=\"0.5\"}} {c}\n\
             hoard_replica_store_sync_seconds_bucket{{replica=\"0\",le=\"+Inf\"}} {d}\n\
             hoard_replica_store_sync_seconds_count{{replica=\"0\"}} {d}\n\
             hoard_replica_view_changes_total{{replica=\"0\"}} {views}\n"
        )
    }

    #[test]
    fn a_window_counts_slow_syncs_and_bounds_the_slowest_from_the_histogram_differences() {
        let mut window = ReplicaWindow::default();
        // Replica A: 100 syncs, 3 of them between 0.1 and 0.5 s; one view change.
        window.add(
            &counters(&replica([50, 60, 60, 60], 2)),
            &counters(&replica([147, 157, 160, 160], 3)),
        );
        assert_eq!(window.store_syncs, 100);
        assert_eq!(window.store_syncs_over_100ms, 3);
        assert_eq!(window.store_sync_slowest_at_most_seconds, Some(0.5));
        assert_eq!(window.view_changes, 1);
        // Replica B: 10 syncs, all under 10 ms (slow ones before the window do not count).
        window.add(
            &counters(&replica([5, 5, 9, 9], 0)),
            &counters(&replica([15, 15, 19, 19], 0)),
        );
        assert_eq!(window.store_syncs, 110);
        assert_eq!(window.store_syncs_over_100ms, 3);
        assert_eq!(window.store_sync_slowest_at_most_seconds, Some(0.5));
        // Replica C: one sync over the largest finite bound: the slowest is unbounded.
        window.add(
            &counters(&replica([0, 0, 0, 0], 0)),
            &counters(&replica([0, 0, 0, 1], 0)),
        );
        assert_eq!(window.store_syncs_over_100ms, 4);
        assert_eq!(window.store_sync_slowest_at_most_seconds, None);
        // A replica without the metrics (empty counters) counts nothing.
        let mut empty = ReplicaWindow::default();
        empty.add(&ReplicaCounters::default(), &ReplicaCounters::default());
        assert_eq!(empty, ReplicaWindow::default());
    }
}
