//! Memory per idle player connection on the gateway (`hoard-loadtest idle`).
//!
//! The gateway runs as a **child process** (its resident memory is its own, not mixed with the
//! clients'). N player connections (WebSocket, `auth_player` with a studio-signed session token)
//! are opened in steps of N/10 and then left idle; after each step the gateway's RSS is read from
//! `/proc/<pid>/status`. Reported: the RSS growth over the baseline divided by N (what an
//! operator sees), and the slope of a least-squares line through the steps (the marginal cost of
//! one more connection, free of one-time allocations).
//!
//! Limits of the machine are checked first: both processes need N plus a margin of open files
//! (the soft limit is raised to the hard limit; a hard limit below that is reported, not worked
//! around), and one source address reaches one server port through at most the ephemeral port
//! range, so clients bind source addresses 127.0.0.1, 127.0.0.2, ... in turn
//! ([`CONNECTIONS_PER_SOURCE_ADDRESS`] each).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use hoard_types::wire::{self, ClientMessage, ServerMessage};
use hoard_types::{Keypair, TenantId};

use crate::stats::{growth_per_unit, linear_fit, median};

/// Open files each process needs besides the connections (listeners, Redis, replicas, logs).
pub const FILES_MARGIN: u64 = 256;
/// Connections per client source address (under the 28,232 ports of Linux's default ephemeral
/// range 32768-60999).
pub const CONNECTIONS_PER_SOURCE_ADDRESS: usize = 20_000;
/// Connection attempts in flight while opening.
pub const CONNECT_CONCURRENCY: usize = 256;
/// Steps in which the connections are opened (one RSS reading after each).
pub const STEPS: usize = 10;
/// Wait after the last connection before the final RSS readings.
pub const SETTLE: Duration = Duration::from_secs(3);
/// RSS readings at the end (their median is used).
pub const FINAL_READINGS: usize = 5;
/// The clients' own socket read buffer: small, so that 50,000 clients fit in the load generator.
pub const CLIENT_READ_BUFFER_BYTES: usize = 4 * 1024;

/// One idle-connection measurement.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct IdleFigure {
    /// Connections asked for.
    pub connections: usize,
    /// Connections authenticated and open at the end (client side).
    pub established: usize,
    /// `hoard_gateway_connections_open` at the end (gateway side).
    pub gateway_connections_open: f64,
    /// Connections the gateway closed while they were idle.
    pub closed_while_idle: u64,
    /// Source addresses the clients used.
    pub source_addresses: usize,
    pub seconds_to_establish: f64,
    /// Gateway RSS before the first connection.
    pub rss_before_bytes: u64,
    /// Gateway RSS with every connection open and idle (median of the final readings).
    pub rss_after_bytes: u64,
    /// (rss_after - rss_before) / established.
    pub bytes_per_connection: f64,
    /// Slope of RSS over open connections through the steps (bytes per additional connection).
    pub marginal_bytes_per_connection: Option<f64>,
    /// (open connections, gateway RSS bytes) after each step.
    pub steps: Vec<(usize, u64)>,
}

/// Why N connections cannot be opened here, or None. `files_hard_limit`: RLIMIT_NOFILE's hard
/// limit (the gateway child and the load generator each hold N sockets).
pub fn fd_shortfall(connections: usize, files_hard_limit: u64) -> Option<String> {
    let needed = connections as u64 + FILES_MARGIN;
    (needed > files_hard_limit).then(|| {
        format!(
            "RLIMIT_NOFILE hard limit is {files_hard_limit}: {connections} connections need {needed} open files \
             in the gateway process and as many in the load generator. Raise the hard limit \
             (root: `ulimit -Hn 200000`; systemd: LimitNOFILE; docker: --ulimit nofile=200000:200000) and re-run"
        )
    })
}

/// The largest connection count (a multiple of 1,000) the open-files hard limit allows.
pub fn fd_feasible_max(files_hard_limit: u64) -> usize {
    (files_hard_limit.saturating_sub(FILES_MARGIN) / 1_000 * 1_000) as usize
}

/// Source address of client connection `index`: 127.0.0.1, then 127.0.0.2, ... every
/// [`CONNECTIONS_PER_SOURCE_ADDRESS`] connections.
pub fn source_address(index: usize) -> Ipv4Addr {
    let n = (index / CONNECTIONS_PER_SOURCE_ADDRESS) as u32 + 1;
    Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 0)) + n)
}

fn client_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(CLIENT_READ_BUFFER_BYTES)
        .write_buffer_size(0)
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Opens one player connection from `source` and authenticates it with `token`.
async fn connect_player(
    url: &str,
    gateway: SocketAddr,
    source: Ipv4Addr,
    token: wire::SessionToken,
) -> anyhow::Result<Ws> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::V4(SocketAddrV4::new(source, 0)))?;
    let stream = socket.connect(gateway).await?;
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(client_config())).await?;
    let hello = next_message(&mut ws).await?;
    anyhow::ensure!(
        matches!(hello, ServerMessage::Hello { .. }),
        "expected hello, got {hello:?}"
    );
    let auth = ClientMessage::AuthPlayer { request_id: 1, token };
    ws.send(Message::Binary(wire::encode(&auth).into())).await?;
    match next_message(&mut ws).await? {
        ServerMessage::Authenticated { .. } => Ok(ws),
        other => anyhow::bail!("authentication refused: {other:?}"),
    }
}

async fn next_message(ws: &mut Ws) -> anyhow::Result<ServerMessage> {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .context("no answer in 20 s")?
            .context("connection closed")??;
        if let Message::Binary(bytes) = message {
            return wire::decode_server(&bytes).map_err(|e| anyhow::anyhow!("{e:?}"));
        }
    }
}

async fn gateway_open(metrics: SocketAddr) -> f64 {
    crate::sys::scrape(metrics)
        .await
        .map(|s| crate::sys::sum(&s, "hoard_gateway_connections_open"))
        .unwrap_or(f64::NAN)
}

/// Opens `connections` idle player connections to the gateway at `url` (process `gateway_pid`,
/// metrics at `metrics`) and measures its RSS growth. The connections are closed at the end.
pub async fn measure(
    url: &str,
    metrics: SocketAddr,
    gateway_pid: u32,
    tenant: TenantId,
    studio: &Keypair,
    connections: usize,
) -> anyhow::Result<IdleFigure> {
    anyhow::ensure!(connections > 0, "at least one connection");
    let gateway: SocketAddr = url
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .unwrap_or_default()
        .parse()
        .with_context(|| format!("gateway address in {url}"))?;
    let rss = || crate::sys::rss_bytes(gateway_pid).context("reading the gateway's RSS");
    // Tokens first (signing is not what is measured).
    let tokens: Vec<wire::SessionToken> = (0..connections)
        .map(|_| {
            hoard_sdk::keys::issue_session_token(
                studio,
                tenant,
                Keypair::generate().public(),
                Duration::from_secs(3_600),
            )
            .map_err(|e| anyhow::anyhow!("{e}"))
        })
        .collect::<anyhow::Result<_>>()?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = rss()?;
    let closed = Arc::new(AtomicU64::new(0));
    let mut holders = JoinSet::new();
    let mut steps = Vec::new();
    let started = Instant::now();
    let mut tokens = tokens.into_iter().enumerate();
    let per_step = connections.div_ceil(STEPS);
    let mut opened = 0usize;
    while opened < connections {
        let step: Vec<(usize, wire::SessionToken)> = tokens.by_ref().take(per_step).collect();
        let results: Vec<anyhow::Result<Ws>> =
            futures::stream::iter(step.into_iter().map(|(index, token)| {
                let url = url.to_string();
                async move {
                    // A refused or reset connect (accept backlog full) is retried a few times.
                    let mut last = None;
                    for attempt in 0..5u64 {
                        match connect_player(&url, gateway, source_address(index), token.clone()).await {
                            Ok(ws) => return Ok(ws),
                            Err(error) => last = Some(error),
                        }
                        tokio::time::sleep(Duration::from_millis(50 * (attempt + 1))).await;
                    }
                    Err(last.expect("attempted"))
                }
            }))
            .buffer_unordered(CONNECT_CONCURRENCY)
            .collect()
            .await;
        for result in results {
            let mut ws =
                result.with_context(|| format!("opening connection {} of {connections}", opened + 1))?;
            opened += 1;
            let closed = closed.clone();
            holders.spawn(async move {
                // Idle: nothing is sent; reading answers pings and notices a close.
                while let Some(Ok(_)) = ws.next().await {}
                closed.fetch_add(1, Ordering::Relaxed);
            });
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        steps.push((opened, rss()?));
    }
    let seconds_to_establish = started.elapsed().as_secs_f64();
    // Wait for the gateway to count them all.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut open = gateway_open(metrics).await;
    while open < connections as f64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        open = gateway_open(metrics).await;
    }
    tokio::time::sleep(SETTLE).await;
    let mut readings = Vec::new();
    for _ in 0..FINAL_READINGS {
        readings.push(rss()? as f64);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let rss_after = median(&readings).unwrap_or(0.0) as u64;
    let open = gateway_open(metrics).await;
    let closed_while_idle = closed.load(Ordering::Relaxed);
    let established = connections - closed_while_idle as usize;
    let points: Vec<(f64, f64)> = steps.iter().map(|(n, r)| (*n as f64, *r as f64)).collect();
    holders.abort_all();
    while holders.join_next().await.is_some() {}
    // Let the gateway notice the closes before the next measurement.
    let deadline = Instant::now() + Duration::from_secs(30);
    while gateway_open(metrics).await > 0.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(IdleFigure {
        connections,
        established,
        gateway_connections_open: open,
        closed_while_idle,
        source_addresses: connections.div_ceil(CONNECTIONS_PER_SOURCE_ADDRESS),
        seconds_to_establish,
        rss_before_bytes: rss_before,
        rss_after_bytes: rss_after,
        bytes_per_connection: growth_per_unit(rss_before, rss_after, established as u64).unwrap_or(0.0),
        marginal_bytes_per_connection: linear_fit(&points).map(|(slope, _)| slope),
        steps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_addresses_rotate_under_the_ephemeral_range() {
        assert_eq!(source_address(0), Ipv4Addr::new(127, 0, 0, 1));
        assert_eq!(
            source_address(CONNECTIONS_PER_SOURCE_ADDRESS - 1),
            Ipv4Addr::new(127, 0, 0, 1)
        );
        assert_eq!(
            source_address(CONNECTIONS_PER_SOURCE_ADDRESS),
            Ipv4Addr::new(127, 0, 0, 2)
        );
        assert_eq!(source_address(49_999), Ipv4Addr::new(127, 0, 0, 3));
    }

    #[test]
    fn open_file_limits_are_checked_before_connecting() {
        assert!(fd_shortfall(10_000, 20_000).is_none());
        let refusal = fd_shortfall(50_000, 20_000).unwrap();
        assert!(refusal.contains("hard limit is 20000"), "{refusal}");
        assert_eq!(fd_feasible_max(20_000), 19_000);
        assert_eq!(fd_feasible_max(100), 0);
    }
}
