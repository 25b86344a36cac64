//! Every metric the gateway exports (Prometheus, `hoard_gateway_*`, base units, bounded labels:
//! never a player, account or event id), and the HTTP endpoint that serves them with the health
//! checks: `GET /metrics`, `GET /healthz` (the process is up), `GET /readyz` (Redis answers and
//! the chain follower is running).
//!
//! [`METRICS`] is the list dashboards are built from: (name, type, labels, help).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use hoard_types::{Asset, TenantId, TxBody};

use crate::constants::HTTP_REQUEST_BYTES_MAX;
use crate::error::{Result, ServerError};

pub const CONNECTIONS_OPEN: &str = "hoard_gateway_connections_open";
pub const CONNECTIONS_TOTAL: &str = "hoard_gateway_connections_total";
pub const CONNECTIONS_REFUSED_TOTAL: &str = "hoard_gateway_connections_refused_total";
pub const MESSAGES_RECEIVED_TOTAL: &str = "hoard_gateway_messages_received_total";
pub const ERRORS_TOTAL: &str = "hoard_gateway_errors_total";
pub const CLOSES_TOTAL: &str = "hoard_gateway_closes_total";
pub const CLICKS_RECEIVED_TOTAL: &str = "hoard_gateway_clicks_received_total";
pub const CLICKS_FLUSHED_TOTAL: &str = "hoard_gateway_clicks_flushed_total";
pub const CLICK_FLUSH_DURATION_SECONDS: &str = "hoard_gateway_click_flush_duration_seconds";
pub const CLICK_FLUSH_FAILURES_TOTAL: &str = "hoard_gateway_click_flush_failures_total";
pub const CLICK_KEYS_PENDING: &str = "hoard_gateway_click_keys_pending";
pub const CLICK_FLUSH_INTERVAL_SECONDS: &str = "hoard_gateway_click_flush_interval_seconds";
pub const EVENTS_ACCEPTED_TOTAL: &str = "hoard_gateway_events_accepted_total";
pub const EVENTS_COMMITTED_TOTAL: &str = "hoard_gateway_events_committed_total";
pub const REJECTIONS_TOTAL: &str = "hoard_gateway_rejections_total";
pub const EVENTS_IN_FLIGHT: &str = "hoard_gateway_events_in_flight";
pub const EVENTS_CLAIMED_TOTAL: &str = "hoard_gateway_events_claimed_total";
pub const EVENTS_WINDOW_FULL_TOTAL: &str = "hoard_gateway_events_window_full_total";
pub const EVENTS_LOST_TOTAL: &str = "hoard_gateway_events_lost_total";
pub const BATCH_SIZE_TRANSACTIONS: &str = "hoard_gateway_batch_size_transactions";
pub const BATCH_SUBMIT_FAILURES_TOTAL: &str = "hoard_gateway_batch_submit_failures_total";
pub const COMMIT_LATENCY_SECONDS: &str = "hoard_gateway_commit_latency_seconds";
pub const STREAM_WRITER_QUEUE_DEPTH: &str = "hoard_gateway_stream_writer_queue_depth";
pub const STREAM_WRITE_DURATION_SECONDS: &str = "hoard_gateway_stream_write_duration_seconds";
pub const RATE_LIMITED_TOTAL: &str = "hoard_gateway_rate_limited_total";
pub const BUSY_TOTAL: &str = "hoard_gateway_busy_total";
pub const SLOW_CONSUMERS_TOTAL: &str = "hoard_gateway_slow_consumers_total";
pub const CHAIN_HEIGHT: &str = "hoard_gateway_chain_height";
pub const CHAIN_REPLICAS_REACHABLE: &str = "hoard_gateway_chain_replicas_reachable";
pub const SETTLEMENTS_TOTAL: &str = "hoard_gateway_settlements_total";
pub const SETTLEMENT_ENTRIES_TOTAL: &str = "hoard_gateway_settlement_entries_total";
pub const SETTLEMENT_STORE_REGRESSIONS_TOTAL: &str = "hoard_gateway_settlement_store_regressions_total";
pub const OFFERS_OPEN: &str = "hoard_gateway_offers_open";
pub const OFFERS_CLOSED_TOTAL: &str = "hoard_gateway_offers_closed_total";
pub const SUBSCRIPTIONS_OPEN: &str = "hoard_gateway_subscriptions_open";
pub const TENANT_EVENTS_APPLIED_TOTAL: &str = "hoard_gateway_tenant_events_applied_total";
pub const CURRENCY_MINTED_TOTAL: &str = "hoard_gateway_currency_minted_total";
pub const CURRENCY_BURNED_TOTAL: &str = "hoard_gateway_currency_burned_total";
pub const CURRENCY_TRANSFERRED_TOTAL: &str = "hoard_gateway_currency_transferred_total";
pub const CLASS_MINTED_TOTAL: &str = "hoard_gateway_class_minted_total";
pub const CLASS_BURNED_TOTAL: &str = "hoard_gateway_class_burned_total";
pub const CLASS_TRANSFERRED_TOTAL: &str = "hoard_gateway_class_transferred_total";

/// (name, type, labels, help) of every metric.
pub const METRICS: &[(&str, &str, &str, &str)] = &[
    (
        CONNECTIONS_OPEN,
        "gauge",
        "",
        "WebSocket connections currently open",
    ),
    (
        CONNECTIONS_TOTAL,
        "counter",
        "role",
        "Connections authenticated, by role (studio, player)",
    ),
    (
        CONNECTIONS_REFUSED_TOTAL,
        "counter",
        "",
        "Connections refused at the connection limit",
    ),
    (
        MESSAGES_RECEIVED_TOTAL,
        "counter",
        "kind",
        "Client messages decoded, by message name",
    ),
    (
        ERRORS_TOTAL,
        "counter",
        "code",
        "Error answers sent, by error code",
    ),
    (
        CLOSES_TOTAL,
        "counter",
        "code",
        "Connections closed by the gateway, by WebSocket close code",
    ),
    (
        CLICKS_RECEIVED_TOTAL,
        "counter",
        "",
        "Clicks absorbed (sum of counts)",
    ),
    (
        CLICKS_FLUSHED_TOTAL,
        "counter",
        "",
        "Clicks written to Redis (sum of counts)",
    ),
    (
        CLICK_FLUSH_DURATION_SECONDS,
        "histogram",
        "",
        "Duration of one Redis click flush part (one EVALSHA round trip)",
    ),
    (
        CLICK_FLUSH_FAILURES_TOTAL,
        "counter",
        "",
        "Click flushes that failed (retried next interval)",
    ),
    (
        CLICK_FLUSH_INTERVAL_SECONDS,
        "gauge",
        "",
        "Time from the start of the last click flush to the next (grows with the time flushes take)",
    ),
    (
        CLICK_KEYS_PENDING,
        "gauge",
        "",
        "Distinct (tenant, counter, player) keys buffered for the next flush",
    ),
    (
        EVENTS_ACCEPTED_TOTAL,
        "counter",
        "kind",
        "Asset events made durable in the stream, by transaction kind",
    ),
    (
        EVENTS_COMMITTED_TOTAL,
        "counter",
        "kind,outcome",
        "Asset events committed, by kind and outcome (applied, settled, rejected)",
    ),
    (
        REJECTIONS_TOTAL,
        "counter",
        "reason",
        "Ledger rejections of committed events, by reason",
    ),
    (
        EVENTS_IN_FLIGHT,
        "gauge",
        "",
        "Events accepted or claimed by this gateway and not yet committed",
    ),
    (
        EVENTS_CLAIMED_TOTAL,
        "counter",
        "",
        "Stream entries claimed from idle consumers (crash recovery, resubmission)",
    ),
    (
        EVENTS_WINDOW_FULL_TOTAL,
        "counter",
        "",
        "Events the ledger refused because their tenant's deduplication window was full (kept in flight and resubmitted)",
    ),
    (
        EVENTS_LOST_TOTAL,
        "counter",
        "",
        "Events in flight whose stream entries Redis lost (all gone, not committed): forgotten so that their resubmissions are appended again",
    ),
    (
        BATCH_SIZE_TRANSACTIONS,
        "histogram",
        "",
        "Transactions per batch submitted to the chain",
    ),
    (
        BATCH_SUBMIT_FAILURES_TOTAL,
        "counter",
        "",
        "Batches the chain did not take (retried after claim_idle_ms)",
    ),
    (
        COMMIT_LATENCY_SECONDS,
        "histogram",
        "",
        "From `accepted` (durable in the stream) to the commit this gateway saw, for events accepted by this gateway (not those it claimed from another)",
    ),
    (
        STREAM_WRITER_QUEUE_DEPTH,
        "gauge",
        "",
        "Submissions waiting to be written to the Redis stream (set on each submission and each write)",
    ),
    (
        STREAM_WRITE_DURATION_SECONDS,
        "histogram",
        "",
        "Duration of one XADD pipeline",
    ),
    (
        RATE_LIMITED_TOTAL,
        "counter",
        "scope",
        "Requests refused by a rate limit (connection, tenant)",
    ),
    (
        BUSY_TOTAL,
        "counter",
        "reason",
        "Requests answered busy (events_pending, writer_queue, clicks_pending, offers, connection_in_flight)",
    ),
    (
        SLOW_CONSUMERS_TOTAL,
        "counter",
        "",
        "Connections closed because their outgoing queue was full",
    ),
    (
        CHAIN_HEIGHT,
        "gauge",
        "",
        "Height of the gateway's committed ledger copy",
    ),
    (
        CHAIN_REPLICAS_REACHABLE,
        "gauge",
        "",
        "Replicas the gateway's chain client is connected to (ready needs f+1)",
    ),
    (SETTLEMENTS_TOTAL, "counter", "", "Settlement windows cut"),
    (
        SETTLEMENT_ENTRIES_TOTAL,
        "counter",
        "",
        "Entries in settle transactions submitted",
    ),
    (
        SETTLEMENT_STORE_REGRESSIONS_TOTAL,
        "counter",
        "",
        "Settlements that found the store's window counter behind what this gateway advanced it to (Redis lost or rolled back its data): points may be settled twice or lost",
    ),
    (OFFERS_OPEN, "gauge", "", "Open trade offers"),
    (
        OFFERS_CLOSED_TOTAL,
        "counter",
        "reason",
        "Offers closed (accepted, cancelled, expired)",
    ),
    (SUBSCRIPTIONS_OPEN, "gauge", "", "Live subscriptions"),
    (
        TENANT_EVENTS_APPLIED_TOTAL,
        "counter",
        "tenant,kind",
        "Committed events the ledger applied, by tenant and transaction kind (swap: a settled trade)",
    ),
    (
        CURRENCY_MINTED_TOTAL,
        "counter",
        "tenant,currency",
        "Currency units ever minted (smallest denomination), from the committed ledger",
    ),
    (
        CURRENCY_BURNED_TOTAL,
        "counter",
        "tenant,currency",
        "Currency units ever burned (smallest denomination), from the committed ledger",
    ),
    (
        CURRENCY_TRANSFERRED_TOTAL,
        "counter",
        "tenant,currency",
        "Currency units moved between accounts by applied transfers and swaps",
    ),
    (
        CLASS_MINTED_TOTAL,
        "counter",
        "tenant,class",
        "Item units ever minted (a unique item is 1, a stack its quantity), from the committed ledger",
    ),
    (
        CLASS_BURNED_TOTAL,
        "counter",
        "tenant,class",
        "Item units ever burned, from the committed ledger",
    ),
    (
        CLASS_TRANSFERRED_TOTAL,
        "counter",
        "tenant,class",
        "Items moved between accounts by applied transfers and swaps",
    ),
];

/// Economy metrics of one applied, non-duplicate transaction, read from the committed ledger
/// right after its block was applied. Labels stay bounded: tenants are registered on chain,
/// currencies and classes are defined per tenant by its studio.
pub fn record_applied(ledger: &hoard_ledger::Ledger, tenant: TenantId, kind: &'static str, body: &TxBody) {
    let label = tenant.0.to_string();
    metrics::counter!(TENANT_EVENTS_APPLIED_TOTAL, "tenant" => label.clone(), "kind" => kind).increment(1);
    let moved = |assets: &[Asset]| {
        for asset in assets {
            match asset {
                Asset::Currency { currency, amount } => {
                    let units = u64::try_from(amount.0).unwrap_or(u64::MAX);
                    metrics::counter!(CURRENCY_TRANSFERRED_TOTAL, "tenant" => label.clone(), "currency" => currency.to_string())
                        .increment(units);
                }
                Asset::Item { item } => {
                    if let Some(found) = ledger.item(tenant, *item) {
                        metrics::counter!(CLASS_TRANSFERRED_TOTAL, "tenant" => label.clone(), "class" => found.class.0.clone())
                            .increment(1);
                    }
                }
            }
        }
    };
    match body {
        TxBody::Transfer { assets, .. } => moved(assets),
        TxBody::Swap { left, right } => {
            moved(&left.gives);
            moved(&right.gives);
        }
        _ => {}
    }
}

/// Sets the minted and burned counters of every currency and class of `tenant` from the
/// committed ledger (call once per block for each tenant the block touched).
pub fn record_supply(ledger: &hoard_ledger::Ledger, tenant: TenantId) {
    let label = tenant.0.to_string();
    let units = |amount: hoard_types::Amount| u64::try_from(amount.0).unwrap_or(u64::MAX);
    for (currency, info) in ledger.currencies(tenant) {
        metrics::counter!(CURRENCY_MINTED_TOTAL, "tenant" => label.clone(), "currency" => currency.to_string())
            .absolute(units(info.minted));
        metrics::counter!(CURRENCY_BURNED_TOTAL, "tenant" => label.clone(), "currency" => currency.to_string())
            .absolute(units(info.burned));
    }
    for (class, info) in ledger.classes(tenant) {
        metrics::counter!(CLASS_MINTED_TOTAL, "tenant" => label.clone(), "class" => class.0.clone())
            .absolute(units(info.minted));
        metrics::counter!(CLASS_BURNED_TOTAL, "tenant" => label.clone(), "class" => class.0)
            .absolute(units(info.burned));
    }
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder (once per process; later calls reuse it) and describes
/// every metric.
pub fn install() -> Result<PrometheusHandle> {
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let seconds = [
        0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
    ];
    let sizes = [
        1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 16384.0,
    ];
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_transactions".into()), &sizes))
        .map_err(|e| ServerError::Metrics(e.to_string()))?
        .build_recorder();
    let handle = recorder.handle();
    if metrics::set_global_recorder(recorder).is_err() {
        // Someone else installed a recorder (another component in the same process).
        tracing::warn!("a metrics recorder was already installed; /metrics shows only this gateway's handle");
    }
    for (name, kind, _labels, help) in METRICS {
        match *kind {
            "counter" => metrics::describe_counter!(*name, *help),
            "gauge" => metrics::describe_gauge!(*name, *help),
            _ => metrics::describe_histogram!(*name, *help),
        }
    }
    metrics::describe_gauge!(PROCESS_RESIDENT_MEMORY_BYTES, "Resident memory size in bytes");
    // Label-free counters and gauges, and the known values of the backpressure counters, start
    // at 0, so that dashboards and alerts see a series before the first occurrence.
    for (name, kind, labels, _help) in METRICS {
        if *kind == "counter" && labels.is_empty() {
            metrics::counter!(*name).increment(0);
        }
        if *kind == "gauge" && labels.is_empty() {
            metrics::gauge!(*name).set(0.0);
        }
    }
    for reason in [
        "events_pending",
        "writer_queue",
        "clicks_pending",
        "offers",
        "connection_in_flight",
    ] {
        metrics::counter!(BUSY_TOTAL, "reason" => reason).increment(0);
    }
    for scope in ["connection", "tenant"] {
        metrics::counter!(RATE_LIMITED_TOTAL, "scope" => scope).increment(0);
    }
    Ok(HANDLE
        .get_or_init(|| {
            spawn_upkeep(handle.clone());
            handle
        })
        .clone())
}

/// How often the recorder's upkeep runs when nothing scrapes `/metrics` (the interval
/// `PrometheusBuilder::install` uses for its own upkeep).
pub const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// The name of the thread that runs the upkeep (Linux shows it in `/proc/<pid>/task/*/comm`).
pub const UPKEEP_THREAD: &str = "metrics-upkeep";

/// Starts the recorder's upkeep, once per process. A histogram keeps each sample until a render
/// or an upkeep drains it into its buckets, and `build_recorder` (which the gateway uses, as it
/// serves `/metrics` itself) starts no upkeep: without this, a gateway nobody scrapes would hold
/// every commit latency and flush duration it ever measured.
fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name(UPKEEP_THREAD.into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_INTERVAL);
            handle.run_upkeep();
        });
    if let Err(error) = spawned {
        tracing::error!(%error, "the metrics upkeep thread did not start: histograms drain only when scraped");
    }
}

/// The standard process metric the gateway exports besides [`METRICS`] (set on each scrape).
pub const PROCESS_RESIDENT_MEMORY_BYTES: &str = "process_resident_memory_bytes";

/// Sets [`PROCESS_RESIDENT_MEMORY_BYTES`] from `/proc/self/status` (Linux; elsewhere: absent).
fn record_process_memory() {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return;
    };
    let kilobytes = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<f64>().ok());
    if let Some(kilobytes) = kilobytes {
        metrics::gauge!(PROCESS_RESIDENT_MEMORY_BYTES).set(kilobytes * 1024.0);
    }
}

/// Readiness inputs, set by the gateway's tasks.
#[derive(Default)]
pub struct Health {
    /// The store answers and still holds this gateway's marker.
    pub redis_ok: AtomicBool,
    /// The chain follower runs (it stops when the block stream ends or the copy diverges).
    pub chain_ok: AtomicBool,
    /// At least f+1 replicas are connected ([`crate::chain::Chain::reachable`]).
    pub chain_reachable: AtomicBool,
    pub shutting_down: AtomicBool,
}

impl Health {
    pub fn ready(&self) -> bool {
        self.redis_ok.load(Ordering::Relaxed)
            && self.chain_ok.load(Ordering::Relaxed)
            && self.chain_reachable.load(Ordering::Relaxed)
            && !self.shutting_down.load(Ordering::Relaxed)
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown` fires.
pub async fn serve_http(
    listener: TcpListener,
    handle: PrometheusHandle,
    health: Arc<Health>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => return,
        };
        let Ok((mut stream, _)) = accepted else { continue };
        let handle = handle.clone();
        let health = health.clone();
        tokio::spawn(async move {
            let mut buffer = vec![0u8; HTTP_REQUEST_BYTES_MAX];
            let mut filled = 0;
            let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while filled < buffer.len() {
                    let n = stream.read(&mut buffer[filled..]).await.ok()?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                    if buffer[..filled].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                Some(())
            })
            .await;
            if !matches!(read, Ok(Some(()))) {
                return;
            }
            let head = String::from_utf8_lossy(&buffer[..filled]);
            let path = head.split_whitespace().nth(1).unwrap_or("/");
            let (status, content_type, body) = match path {
                "/metrics" => {
                    record_process_memory();
                    ("200 OK", "text/plain; version=0.0.4", handle.render())
                }
                "/healthz" => ("200 OK", "text/plain", "ok\n".to_string()),
                "/readyz" if health.ready() => ("200 OK", "text/plain", "ready\n".to_string()),
                "/readyz" => ("503 Service Unavailable", "text/plain", "not ready\n".to_string()),
                _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// Binds the HTTP listener (so that the caller learns the port before serving).
pub async fn bind_http(address: SocketAddr) -> Result<TcpListener> {
    Ok(TcpListener::bind(address).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_starts_one_upkeep_thread() {
        let upkeep_threads = || {
            std::fs::read_dir("/proc/self/task")
                .expect("Linux's /proc")
                .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
                .filter(|comm| comm.trim_end() == UPKEEP_THREAD)
                .count()
        };
        install().expect("the recorder installs");
        install().expect("a second install reuses the first");
        // A thread names itself once it runs.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while upkeep_threads() == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(upkeep_threads(), 1);
    }

    #[test]
    fn names_follow_the_conventions() {
        let mut seen = std::collections::HashSet::new();
        for (name, kind, labels, help) in METRICS {
            assert!(name.starts_with("hoard_gateway_"), "{name}");
            assert!(seen.insert(*name), "duplicate {name}");
            assert!(!help.is_empty());
            match *kind {
                "counter" => assert!(name.ends_with("_total"), "{name}"),
                "histogram" => assert!(
                    name.ends_with("_seconds") || name.ends_with("_transactions"),
                    "{name}"
                ),
                "gauge" => assert!(!name.ends_with("_total"), "{name}"),
                other => panic!("unknown kind {other}"),
            }
            for label in labels.split(',').filter(|l| !l.is_empty()) {
                assert!(
                    ["role", "kind", "code", "outcome", "reason", "scope", "tenant", "currency", "class"]
                        .contains(&label),
                    "{label}"
                );
            }
        }
    }
}
