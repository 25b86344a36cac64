//! The benchmarks of `hoard-loadtest bench`, all in one run on one machine:
//!
//! 1. **ceiling**: a bare tokio-tungstenite server that only reads and decodes the same
//!    MessagePack `clicks` frames (same WebSocket configuration, TCP_NODELAY like the gateway),
//!    driven by the same client connections as (2);
//! 2. **gateway**: Hoard's gateway absorbing clicks (real Redis), counted by the gateway itself
//!    (`hoard_gateway_clicks_received_total`), with Redis round trips from its flush histogram;
//! 3. **chain**: the 4 replicas alone through `ChainClient`: studio-signed settlements carrying
//!    many entries, and individually signed transfers;
//! 4. **full path**: simulated players clicking with 1% asset events and trades
//!    ([`crate::players`]).
//!
//! The click driver sends as fast as TCP takes the frames (the ceiling and the gateway are
//! throughput figures); the full path is open loop at a fixed offered rate.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;

use hoard_ledger::client::ChainClient;
use hoard_ledger::cluster::Cluster;
use hoard_types::wire::{self, Click, ClientMessage, ServerMessage};
use hoard_types::{
    Amount, Asset, CurrencyId, Custody, EventId, Grant, Keypair, Outcome, PublicKey, Settlement, TenantId,
    Transaction, TxBody, TxPayload,
};

use crate::stats::per_second;

/// Settlement entries per `settle` transaction in the chain benchmark (512 entries of ~80 bytes stay under the 64 KiB payload limit).
pub const CHAIN_SETTLE_ENTRIES: usize = 512;
/// Transactions per request to the replicas in the chain benchmark.
pub const CHAIN_REQUEST_TRANSACTIONS: usize = 512;
/// Settlement transactions (~41 KB each) per request: a request stays under the replicas'
/// `request_bytes_max` (4 MiB); a larger one is dropped by the replicas without an answer.
pub const CHAIN_REQUEST_SETTLEMENTS: usize = 64;
/// Requests in flight in the chain benchmark.
pub const CHAIN_REQUESTS_IN_FLIGHT: usize = 16;
/// Accounts the chain benchmark credits and moves between.
pub const CHAIN_ACCOUNTS: usize = 1_000;

/// How the click driver loads a server.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClickLoad {
    pub connections: usize,
    pub clicks_per_frame: usize,
    /// Distinct players the clicks name (one gateway flush part holds 1,024 of them).
    pub players: usize,
    pub warmup: Duration,
    pub duration: Duration,
}

/// One `clicks` frame body: the clicks array, encoded once and reused with a new sequence number.
pub fn encode_clicks_body(players: &[PublicKey], clicks: usize, offset: usize) -> Vec<u8> {
    let entries: Vec<Click> = (0..clicks)
        .map(|i| Click(players[(offset + i) % players.len()], "gold".into(), 1))
        .collect();
    rmp_serde::to_vec(&entries).expect("clicks encode")
}

/// `{"clicks": [request_id, <body>]}` (the struct-as-array form the gateway accepts).
pub fn clicks_frame(request_id: u64, body: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(body.len() + 20);
    frame.push(0x81);
    frame.push(0xa6);
    frame.extend_from_slice(b"clicks");
    frame.push(0x92);
    frame.push(0xcf);
    frame.extend_from_slice(&request_id.to_be_bytes());
    frame.extend_from_slice(body);
    frame
}

/// What the client side of a click run saw.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ClickRun {
    pub clicks_sent: u64,
    pub clicks_acked: u64,
    pub seconds: f64,
}

/// Sets TCP_NODELAY (both sides of every benchmark connection use it).
fn tune(stream: &tokio::net::TcpStream) {
    let _ = stream.set_nodelay(true);
}

/// Opens `load.connections` connections to `url` (authenticating as the studio when `studio` is
/// given), sends click frames as fast as TCP takes them for warmup + duration, reading whatever
/// the server answers. `window` is called at the start and the end of the measured window.
pub async fn drive_clicks(
    url: &str,
    studio: Option<(TenantId, Keypair)>,
    load: &ClickLoad,
    window: impl Fn(bool) -> futures::future::BoxFuture<'static, ()>,
) -> anyhow::Result<ClickRun> {
    let players: Vec<PublicKey> = (0..load.players.max(1))
        .map(|_| Keypair::generate().public())
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for index in 0..load.connections {
        let (mut ws, _) = tokio_tungstenite::connect_async_with_config(
            url,
            Some(hoard_server::connection::websocket_config()),
            true,
        )
        .await
        .with_context(|| format!("connecting to {url}"))?;
        if let tokio_tungstenite::MaybeTlsStream::Plain(stream) = ws.get_ref() {
            tune(stream);
        }
        if let Some((tenant, key)) = &studio {
            authenticate(&mut ws, *tenant, key).await?;
        }
        let body = encode_clicks_body(&players, load.clicks_per_frame, index * load.clicks_per_frame);
        let per_frame = load.clicks_per_frame as u64;
        let (mut sink, mut stream) = ws.split();
        let acked = acked.clone();
        let measuring_reader = measuring.clone();
        tasks.spawn(async move {
            let mut last_up_to = 0u64;
            while let Some(Ok(message)) = stream.next().await {
                if let Message::Binary(bytes) = message {
                    if let Ok(ServerMessage::ClicksAck { up_to }) = wire::decode_server(&bytes) {
                        if measuring_reader.load(Ordering::Relaxed) {
                            acked.fetch_add((up_to - last_up_to) * per_frame, Ordering::Relaxed);
                        }
                        last_up_to = up_to;
                    }
                }
            }
        });
        let stop = stop.clone();
        let sent = sent.clone();
        let measuring = measuring.clone();
        tasks.spawn(async move {
            let mut sequence = 10u64;
            while !stop.load(Ordering::Relaxed) {
                sequence += 1;
                let frame = clicks_frame(sequence, &body);
                if sink.send(Message::Binary(frame.into())).await.is_err() {
                    break;
                }
                if measuring.load(Ordering::Relaxed) {
                    sent.fetch_add(per_frame, Ordering::Relaxed);
                }
            }
            let _ = sink.close().await;
        });
    }
    tokio::time::sleep(load.warmup).await;
    window(true).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(load.duration).await;
    measuring.store(false, Ordering::Relaxed);
    let seconds = started.elapsed().as_secs_f64();
    window(false).await;
    stop.store(true, Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    Ok(ClickRun {
        clicks_sent: sent.load(Ordering::Relaxed),
        clicks_acked: acked.load(Ordering::Relaxed),
        seconds,
    })
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn authenticate(ws: &mut Ws, tenant: TenantId, key: &Keypair) -> anyhow::Result<()> {
    let hello = next_server_message(ws).await?;
    let ServerMessage::Hello { challenge, .. } = hello else {
        anyhow::bail!("expected hello, got {hello:?}");
    };
    let signature = wire::sign_auth(key, &challenge.0, tenant);
    let auth = ClientMessage::AuthStudio {
        request_id: 1,
        tenant,
        signature,
    };
    ws.send(Message::Binary(wire::encode(&auth).into())).await?;
    match next_server_message(ws).await? {
        ServerMessage::Authenticated { .. } => Ok(()),
        other => anyhow::bail!("authentication refused: {other:?}"),
    }
}

async fn next_server_message(ws: &mut Ws) -> anyhow::Result<ServerMessage> {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .context("no answer in 10 s")?
            .context("connection closed")??;
        if let Message::Binary(bytes) = message {
            return wire::decode_server(&bytes).map_err(|e| anyhow::anyhow!("{e:?}"));
        }
    }
}

/// The ceiling server: accepts WebSocket connections on `/v1` with the gateway's WebSocket
/// configuration, reads every frame and decodes it as a client message, counts clicks.
pub struct CeilingServer {
    pub url: String,
    pub clicks: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl CeilingServer {
    /// Starts the ceiling in this process, on a free loopback port.
    pub async fn start() -> anyhow::Result<CeilingServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("ws://{}{}", listener.local_addr()?, wire::WS_PATH);
        let clicks = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(serve_ceiling(listener, clicks.clone()));
        Ok(CeilingServer { url, clicks, task })
    }
}

/// Serves the ceiling on `listener`, adding every decoded click's count to `clicks`.
async fn serve_ceiling(listener: TcpListener, clicks: Arc<AtomicU64>) {
    let mut connections = JoinSet::new();
    while let Ok((stream, _)) = listener.accept().await {
        tune(&stream);
        let counter = clicks.clone();
        connections.spawn(async move {
            let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(
                stream,
                Some(hoard_server::connection::websocket_config()),
            )
            .await
            else {
                return;
            };
            while let Some(Ok(message)) = ws.next().await {
                if let Message::Binary(bytes) = message {
                    if let Ok(ClientMessage::Clicks { clicks, .. }) = wire::decode_client(&bytes) {
                        let count: u64 = clicks.iter().map(|c| u64::from(c.2)).sum();
                        counter.fetch_add(count, Ordering::Relaxed);
                    }
                }
            }
        });
        while connections.try_join_next().is_some() {}
    }
}

/// The name of the ceiling child process's click counter on its `/metrics`.
pub const CEILING_CLICKS_METRIC: &str = "hoard_ceiling_clicks_total";

/// The ceiling as a child process (`hoard-loadtest ceiling`): the WebSocket server on `ws`, and
/// on `http` a minimal `/metrics` that answers [`CEILING_CLICKS_METRIC`]. Runs until killed.
/// The benchmark runs it so when it runs the gateway as a child process, so that both servers
/// stand in the same layout (own process, own runtime threads) beside the same click driver.
pub async fn run_ceiling_process(ws: std::net::SocketAddr, http: std::net::SocketAddr) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let clicks = Arc::new(AtomicU64::new(0));
    let ws = TcpListener::bind(ws)
        .await
        .with_context(|| format!("binding {ws}"))?;
    let http = TcpListener::bind(http)
        .await
        .with_context(|| format!("binding {http}"))?;
    tokio::spawn(serve_ceiling(ws, clicks.clone()));
    loop {
        let (mut stream, _) = http.accept().await?;
        let clicks = clicks.load(Ordering::Relaxed);
        tokio::spawn(async move {
            // One small request per connection (`crate::sys::http_get`); its text is not needed.
            let mut request = [0u8; 1024];
            let _ = tokio::time::timeout(Duration::from_secs(1), stream.read(&mut request)).await;
            let body = format!("# TYPE {CEILING_CLICKS_METRIC} counter\n{CEILING_CLICKS_METRIC} {clicks}\n");
            let response = format!(
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}

impl Drop for CeilingServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Result of one ceiling or gateway click run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClickFigure {
    /// Counted by the server over the measured window.
    pub server_clicks_per_second: f64,
    pub client: ClickRun,
    /// Gateway only: Redis pipelines (one round trip each) per click in the window.
    pub redis_round_trips_per_click: Option<f64>,
    /// CPU cores the server process used over the window (None: it runs inside this process,
    /// whose CPU is mixed with the click driver's).
    pub server_cpu_cores: Option<f64>,
    /// Gateway only: CPU cores redis-server used over the window.
    pub store_cpu_cores: Option<f64>,
}

impl ClickFigure {
    /// Clicks per CPU-second of the server process (and of redis-server, for the gateway): what
    /// the ratio would be on equal cores, whatever share of the two the driver left each server.
    pub fn clicks_per_cpu_second(&self) -> Option<f64> {
        let cores = self.server_cpu_cores? + self.store_cpu_cores.unwrap_or(0.0);
        (cores > 0.0).then(|| self.server_clicks_per_second / cores)
    }
}

/// CPU seconds of `pid` (0 without one or when unreadable).
fn cpu_of(pid: Option<u32>) -> f64 {
    pid.and_then(crate::sys::cpu_seconds).unwrap_or(0.0)
}

/// CPU cores used between two readings `seconds` apart.
fn cores(before: f64, after: f64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        (after - before) / seconds
    } else {
        0.0
    }
}

/// Runs the ceiling once: in this process, or as a child process of `program` (this binary)
/// when `program` is given.
pub async fn ceiling_once(
    load: &ClickLoad,
    program: Option<&std::path::Path>,
) -> anyhow::Result<ClickFigure> {
    /// Reads (clicks decoded, CPU seconds of the server process if it is a child).
    type Reading = Box<dyn Fn() -> futures::future::BoxFuture<'static, (u64, Option<f64>)> + Send + Sync>;
    let marks = Arc::new(std::sync::Mutex::new(Vec::new()));
    let marks_in = marks.clone();
    let (url, read): (String, Reading) = match program {
        None => {
            let server = Arc::new(CeilingServer::start().await?);
            let url = server.url.clone();
            (
                url,
                Box::new(move || {
                    let clicks = server.clicks.load(Ordering::Relaxed);
                    Box::pin(async move { (clicks, None) })
                }),
            )
        }
        Some(program) => {
            let child = Arc::new(CeilingProcess::start(program).await?);
            let url = format!("ws://{}{}", child.ws, wire::WS_PATH);
            (
                url,
                Box::new(move || {
                    let child = child.clone();
                    Box::pin(async move {
                        let cpu = cpu_of(child.process.pid());
                        (child.clicks().await, Some(cpu))
                    })
                }),
            )
        }
    };
    let read = Arc::new(read);
    let client = drive_clicks(&url, None, load, move |_| {
        let read = read.clone();
        let marks = marks_in.clone();
        Box::pin(async move {
            let (clicks, cpu) = read().await;
            marks.lock().expect("marks").push((Instant::now(), clicks, cpu));
        })
    })
    .await?;
    let marks = marks.lock().expect("marks").clone();
    let seconds = (marks[1].0 - marks[0].0).as_secs_f64();
    let rate = crate::stats::rate_between(marks[0].1, marks[1].1, marks[1].0 - marks[0].0);
    Ok(ClickFigure {
        server_clicks_per_second: rate,
        client,
        redis_round_trips_per_click: None,
        server_cpu_cores: marks[0].2.zip(marks[1].2).map(|(a, b)| cores(a, b, seconds)),
        store_cpu_cores: None,
    })
}

/// The ceiling as a child process (see [`run_ceiling_process`]); killed on drop.
struct CeilingProcess {
    ws: std::net::SocketAddr,
    http: std::net::SocketAddr,
    process: crate::stack::ChildProcess,
}

impl CeilingProcess {
    async fn start(program: &std::path::Path) -> anyhow::Result<CeilingProcess> {
        let free = || std::net::SocketAddr::from(([127, 0, 0, 1], hoard_ledger::testing::free_port()));
        let (ws, http) = (free(), free());
        let mut command = std::process::Command::new(program);
        command
            .arg("ceiling")
            .arg("--ws")
            .arg(ws.to_string())
            .arg("--http")
            .arg(http.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null());
        let mut process = crate::stack::ChildProcess::spawn("ceiling", command)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while crate::sys::scrape(http).await.is_err() {
            anyhow::ensure!(process.running(), "the ceiling process exited at start");
            anyhow::ensure!(
                Instant::now() < deadline,
                "the ceiling process did not start in 10 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(CeilingProcess { ws, http, process })
    }

    /// Clicks decoded so far (0 if the counter cannot be read).
    async fn clicks(&self) -> u64 {
        crate::sys::scrape(self.http)
            .await
            .map(|samples| crate::sys::sum(&samples, CEILING_CLICKS_METRIC) as u64)
            .unwrap_or(0)
    }
}

/// The gateway's own counters, read from its `/metrics`.
#[derive(Clone, Copy, Debug, Default)]
struct GatewayCounters {
    at: Option<Instant>,
    clicks: f64,
    flushes: f64,
    /// CPU seconds of the gateway process and of redis-server.
    cpu: (f64, f64),
}

async fn gateway_counters(metrics: std::net::SocketAddr, pids: GatewayPids) -> GatewayCounters {
    let samples = crate::sys::scrape(metrics).await.unwrap_or_default();
    GatewayCounters {
        at: Some(Instant::now()),
        clicks: crate::sys::sum(&samples, "hoard_gateway_clicks_received_total"),
        flushes: crate::sys::sum(&samples, "hoard_gateway_click_flush_duration_seconds_count"),
        cpu: (cpu_of(pids.gateway), cpu_of(pids.redis)),
    }
}

/// The processes whose CPU counts as the gateway's: the gateway child process (None when it
/// runs inside the load generator) and redis-server (None: the embedded store).
#[derive(Clone, Copy, Debug, Default)]
pub struct GatewayPids {
    pub gateway: Option<u32>,
    pub redis: Option<u32>,
}

/// Runs the gateway click benchmark once against a running gateway.
pub async fn gateway_once(
    url: &str,
    metrics: std::net::SocketAddr,
    tenant: TenantId,
    studio: &Keypair,
    load: &ClickLoad,
    pids: GatewayPids,
) -> anyhow::Result<ClickFigure> {
    let marks = Arc::new(std::sync::Mutex::new(Vec::new()));
    let marks_in = marks.clone();
    let client = drive_clicks(url, Some((tenant, studio.clone())), load, move |_| {
        let marks = marks_in.clone();
        Box::pin(async move {
            let counters = gateway_counters(metrics, pids).await;
            marks.lock().expect("marks").push(counters);
        })
    })
    .await?;
    let marks = marks.lock().expect("marks").clone();
    let (before, after) = (marks[0], marks[1]);
    let elapsed = after.at.expect("set") - before.at.expect("set");
    let clicks = after.clicks - before.clicks;
    let flushes = after.flushes - before.flushes;
    Ok(ClickFigure {
        server_clicks_per_second: per_second(clicks as u64, elapsed),
        client,
        redis_round_trips_per_click: (clicks > 0.0).then(|| flushes / clicks),
        server_cpu_cores: pids
            .gateway
            .map(|_| cores(before.cpu.0, after.cpu.0, elapsed.as_secs_f64())),
        store_cpu_cores: pids
            .redis
            .map(|_| cores(before.cpu.1, after.cpu.1, elapsed.as_secs_f64())),
    })
}

/// Result of the chain benchmark.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ChainFigure {
    /// Settlement entries committed (applied) per second.
    pub settlement_entries_per_second: f64,
    pub settlement_transactions: u64,
    pub settlement_entries_applied: u64,
    pub settlement_seconds: f64,
    /// Individually signed transfers committed per second (applied or rejected: ordered and
    /// executed either way).
    pub transfers_per_second: f64,
    pub transfers_applied: u64,
    pub transfers_rejected: u64,
    pub transfers_seconds: f64,
    /// Request latency (submit → f+1 replies), ms.
    pub request_p50_ms: f64,
    pub request_p99_ms: f64,
    /// Rejections by reason (setup, settlement entries, transfers).
    pub rejections: crate::stats::ErrorCounts,
}

fn count_rejections(phase: &str, outcomes: &[Outcome], into: &mut crate::stats::ErrorCounts) {
    for outcome in outcomes {
        match outcome {
            Outcome::Applied => {}
            Outcome::Rejected { reason } => into.add(format!("{phase}:{reason:?}")),
            Outcome::Settled { entries } => {
                for reason in entries.iter().flatten() {
                    into.add(format!("{phase}_entry:{reason:?}"));
                }
            }
        }
    }
}

fn payload(chain_id: u64, tenant: TenantId, expires_at: u64, body: TxBody) -> TxPayload {
    TxPayload {
        chain_id,
        tenant,
        event_id: EventId::random(),
        expires_at,
        body,
    }
}

/// Submits `transactions` in requests of `per_request` with
/// [`CHAIN_REQUESTS_IN_FLIGHT`] in flight; returns the receipts' outcomes and the seconds taken.
async fn submit_all(
    client: &ChainClient,
    transactions: Vec<Transaction>,
    per_request: usize,
    latency: &mut crate::stats::Latency,
) -> anyhow::Result<(Vec<Outcome>, f64)> {
    let started = Instant::now();
    let mut outcomes = Vec::with_capacity(transactions.len());
    let mut requests = futures::stream::iter(
        transactions
            .chunks(per_request)
            .map(|chunk| chunk.to_vec())
            .collect::<Vec<_>>(),
    )
    .map(|chunk| {
        let client = client.clone();
        async move {
            let sent = Instant::now();
            let committed = client.submit(&chunk).await;
            (committed, sent.elapsed())
        }
    })
    .buffer_unordered(CHAIN_REQUESTS_IN_FLIGHT);
    while let Some((committed, took)) = requests.next().await {
        latency.record(took);
        outcomes.extend(committed?.receipts.into_iter().map(|r| r.outcome));
    }
    Ok((outcomes, started.elapsed().as_secs_f64()))
}

/// The chain alone, as client [`crate::stack::BENCH_CLIENT`] with `client_key`: defines GOLD
/// and registers accounts (not measured), then measures settlements of
/// [`CHAIN_SETTLE_ENTRIES`] entries and individually signed transfers.
pub async fn chain_once(
    cluster: &Cluster,
    client_key: Keypair,
    studio: &Keypair,
    tenant: TenantId,
    head: u64,
    settlements: usize,
    transfers: usize,
) -> anyhow::Result<ChainFigure> {
    let client = ChainClient::connect(cluster, crate::stack::BENCH_CLIENT, client_key);
    let chain_id = cluster.genesis.chain_id;
    let expires = head + hoard_types::constants::EXPIRY_HORIZON_BLOCKS_MAX / 2;
    let gold = CurrencyId::new("CHAINBENCH");
    let accounts: Vec<PublicKey> = (0..CHAIN_ACCOUNTS)
        .map(|_| Keypair::generate().public())
        .collect();
    let mut setup = vec![payload(
        chain_id,
        tenant,
        expires,
        TxBody::DefineCurrency {
            currency: gold.clone(),
            decimals: 0,
            max_supply: Amount(u128::MAX / 2),
        },
    )
    .sign(&[studio])];
    setup.extend(accounts.iter().map(|account| {
        payload(
            chain_id,
            tenant,
            expires,
            TxBody::RegisterAccount {
                account: *account,
                custody: Custody::Custodial,
            },
        )
        .sign(&[studio])
    }));
    let mut ignored = crate::stats::Latency::new();
    // The currency first (its own request), then the accounts.
    let rest = setup.split_off(1);
    let mut rejections = crate::stats::ErrorCounts::default();
    let (outcomes, _) = submit_all(&client, setup, CHAIN_REQUEST_TRANSACTIONS, &mut ignored).await?;
    count_rejections("setup", &outcomes, &mut rejections);
    let (outcomes, _) = submit_all(&client, rest, CHAIN_REQUEST_TRANSACTIONS, &mut ignored).await?;
    count_rejections("setup", &outcomes, &mut rejections);

    // Signed before the clock starts.
    let settle: Vec<Transaction> = (0..settlements)
        .map(|n| {
            let entries = (0..CHAIN_SETTLE_ENTRIES)
                .map(|i| Settlement {
                    to: accounts[(n * CHAIN_SETTLE_ENTRIES + i) % accounts.len()],
                    grant: Grant::Currency {
                        currency: gold.clone(),
                        amount: Amount(10),
                    },
                })
                .collect();
            payload(chain_id, tenant, expires, TxBody::Settle { entries }).sign(&[studio])
        })
        .collect();
    let transfer: Vec<Transaction> = (0..transfers)
        .map(|n| {
            let from = accounts[n % accounts.len()];
            let to = accounts[(n * 7 + 1) % accounts.len()];
            payload(
                chain_id,
                tenant,
                expires,
                TxBody::Transfer {
                    from,
                    to,
                    assets: vec![Asset::Currency {
                        currency: gold.clone(),
                        amount: Amount(1),
                    }],
                },
            )
            .sign(&[studio])
        })
        .collect();
    let mut latency = crate::stats::Latency::new();
    let (outcomes, settlement_seconds) =
        submit_all(&client, settle, CHAIN_REQUEST_SETTLEMENTS, &mut latency).await?;
    count_rejections("settle", &outcomes, &mut rejections);
    let settlement_entries_applied: u64 = outcomes
        .iter()
        .map(|o| match o {
            Outcome::Settled { entries } => entries.iter().filter(|e| e.is_none()).count() as u64,
            _ => 0,
        })
        .sum();
    let (outcomes, transfers_seconds) =
        submit_all(&client, transfer, CHAIN_REQUEST_TRANSACTIONS, &mut latency).await?;
    count_rejections("transfer", &outcomes, &mut rejections);
    let transfers_applied = outcomes.iter().filter(|o| matches!(o, Outcome::Applied)).count() as u64;
    Ok(ChainFigure {
        settlement_entries_per_second: settlement_entries_applied as f64 / settlement_seconds.max(1e-9),
        settlement_transactions: settlements as u64,
        settlement_entries_applied,
        settlement_seconds,
        transfers_per_second: outcomes.len() as f64 / transfers_seconds.max(1e-9),
        transfers_applied,
        transfers_rejected: outcomes.len() as u64 - transfers_applied,
        transfers_seconds,
        request_p50_ms: latency.quantile_ms(0.5),
        request_p99_ms: latency.quantile_ms(0.99),
        rejections,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_built_click_frames_decode_as_the_gateway_decodes_them() {
        let players: Vec<PublicKey> = (0..3).map(|i| PublicKey([i; 32])).collect();
        let body = encode_clicks_body(&players, 5, 1);
        let frame = clicks_frame(u64::MAX - 1, &body);
        match wire::decode_client(&frame).unwrap() {
            ClientMessage::Clicks { request_id, clicks } => {
                assert_eq!(request_id, u64::MAX - 1);
                assert_eq!(clicks.len(), 5);
                assert_eq!(clicks[0], Click(players[1], "gold".into(), 1));
                assert_eq!(clicks[4], Click(players[2], "gold".into(), 1));
            }
            other => panic!("decoded as {other:?}"),
        }
    }

    #[tokio::test]
    async fn the_ceiling_server_counts_what_the_driver_sends() {
        let load = ClickLoad {
            connections: 2,
            clicks_per_frame: 64,
            players: 100,
            warmup: Duration::from_millis(100),
            duration: Duration::from_millis(300),
        };
        let figure = ceiling_once(&load, None).await.unwrap();
        assert!(figure.client.clicks_sent > 0);
        assert!(figure.server_clicks_per_second > 0.0);
    }
}
