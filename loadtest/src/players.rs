//! The player simulator, shared by `hoard demo` and `hoard-loadtest`: N players clicking at game
//! rates, earning currency through settlement, receiving minted items and currency, moving them,
//! and trading with each other, all through the SDK.
//!
//! Players connect the two ways games connect:
//! - through **game-server connections** (studio credentials), each carrying many players: the
//!   SDK packs their clicks into frames; the game server also mints, transfers and settles;
//! - **one connection per player** (a web game's client, a player session token signed by the
//!   studio): the player clicks for itself and trades with other such players (offer + accept).
//!
//! Open loop: every sender computes what is due from the clock (`Schedule`) and sends it, however
//! late; latencies are measured from the **intended** send time, so a stalled system shows up as
//! latency, not as a lower offered rate (no coordinated omission). Asset events run as their own
//! tasks so that a slow commit never delays the next send. A sender more than
//! [`LAG_WARNING`] behind its schedule is reported loudly (`schedule_kept: false`).
//!
//! [`Simulation::start`] registers the accounts and starts the senders; [`Simulation::live`]
//! exposes counters and interval histograms for a progress line; [`Simulation::finish`] stops the
//! senders, waits for outstanding events, and returns a [`PlayersReport`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

use hoard_sdk::{
    keys, Amount, Asset, ClassId, Client, ClientOptions, Credentials, CurrencyId, Custody, Error, ErrorKind,
    Grant, Hash, ItemId, Keypair, PublicKey, Rejection, Settlement, TenantId,
};

use crate::stats::{per_second, ErrorCounts, Latency, LatencySummary, Schedule};

/// A sender this far behind its schedule makes the run's figures suspect: reported loudly.
pub const LAG_WARNING: Duration = Duration::from_millis(50);
/// The click counter the simulator uses (the gateway's demo rule converts it to GOLD).
pub const COUNTER: &str = "gold";
/// The currency players earn and trade.
pub const CURRENCY: &str = "GOLD";
/// The item class minted and traded.
pub const ITEM_CLASS: &str = "sword";
/// Entries of one `settle` transaction the game servers send.
pub const SETTLE_ENTRIES: usize = 32;
/// How long [`Simulation::finish`] waits for outstanding asset events.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);
/// Accounts registered concurrently during setup.
pub const REGISTER_CONCURRENCY: usize = 2_048;
/// Studio connections used to register many accounts.
pub const REGISTER_CONNECTIONS: usize = 4;
/// Registration passes (failed registrations are retried on new connections).
pub const REGISTER_PASSES: usize = 3;

/// What to simulate.
#[derive(Clone, Debug)]
pub struct PlayersConfig {
    /// `ws://host:port/v1`.
    pub url: String,
    pub tenant: TenantId,
    pub studio_key: Keypair,
    /// Players in all.
    pub players: usize,
    /// Of which this many connect one connection each with a session token.
    pub direct_players: usize,
    /// Players one game-server connection carries.
    pub players_per_game_server: usize,
    /// Clicks per second per player.
    pub clicks_per_second: f64,
    /// Asset events per click (0.01: one asset event per 100 clicks).
    pub asset_event_share: f64,
    /// Share of asset events that are player-to-player trades.
    pub trade_share: f64,
    /// Ask the gateway to settle click points this often (None: the gateway settles by itself).
    pub settle_every: Option<Duration>,
    /// How long to send.
    pub duration: Duration,
    /// The game servers' send period.
    pub tick: Duration,
    /// Register the players' accounts and define GOLD and `sword` first.
    pub setup: bool,
}

impl PlayersConfig {
    pub fn new(url: String, tenant: TenantId, studio_key: Keypair) -> PlayersConfig {
        PlayersConfig {
            url,
            tenant,
            studio_key,
            players: 100,
            direct_players: 10,
            players_per_game_server: 1_000,
            clicks_per_second: 10.0,
            asset_event_share: 0.01,
            trade_share: 0.2,
            settle_every: Some(Duration::from_secs(1)),
            duration: Duration::from_secs(10),
            tick: Duration::from_millis(10),
            setup: true,
        }
    }
}

/// Counters and interval histograms, readable while the simulation runs.
#[derive(Default)]
pub struct Live {
    pub clicks_sent: AtomicU64,
    pub clicks_acked: AtomicU64,
    pub events_sent: AtomicU64,
    pub events_accepted: AtomicU64,
    /// Committed with any outcome (applied or rejected by the ledger).
    pub events_committed: AtomicU64,
    pub events_rejected: AtomicU64,
    pub trades_sent: AtomicU64,
    pub trades_committed: AtomicU64,
    /// Trades not attempted: no directly connected player owned an item yet.
    pub trades_skipped: AtomicU64,
    /// Click acknowledgements still awaited.
    pub click_acks_pending: AtomicU64,
    pub settlement_windows: AtomicU64,
    pub settlement_entries: AtomicU64,
    /// Largest lag behind schedule seen, in microseconds.
    pub lag_max_micros: AtomicU64,
    pub latencies: Mutex<Latencies>,
    /// Accept-to-commit latencies since the last [`Live::take_interval`].
    pub interval_commit: Mutex<Latency>,
    pub errors: Mutex<ErrorCounts>,
}

/// The run's latency histograms.
#[derive(Default)]
pub struct Latencies {
    /// Intended send time of a click → its `clicks_ack`.
    pub click_ack: Latency,
    /// Intended send time of an asset event → `accepted`.
    pub event_accept: Latency,
    /// `accepted` → `committed` (the chain's part).
    pub accept_to_commit: Latency,
    /// Intended send time → `committed`.
    pub event_end_to_end: Latency,
    /// Intended time of a trade → its swap committed (offer, accept, commit).
    pub trade: Latency,
}

impl Live {
    fn error(&self, reason: String) {
        self.errors.lock().expect("errors lock").add(reason);
    }

    fn lag(&self, lag: Duration) {
        self.lag_max_micros
            .fetch_max(lag.as_micros() as u64, Ordering::Relaxed);
    }

    /// Accept-to-commit percentiles since the last call (p50, p99 in ms), and resets them.
    pub fn take_interval(&self) -> (f64, f64, u64) {
        let mut interval = self.interval_commit.lock().expect("interval lock");
        let figures = (
            interval.quantile_ms(0.5),
            interval.quantile_ms(0.99),
            interval.count(),
        );
        interval.reset();
        figures
    }
}

/// The simulator's result (the JSON `--json` writes).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PlayersReport {
    pub players: usize,
    pub game_server_connections: usize,
    pub direct_connections: usize,
    pub setup_seconds: f64,
    pub duration_seconds: f64,
    pub clicks_per_second_offered: f64,
    pub clicks_sent: u64,
    pub clicks_acked: u64,
    pub clicks_per_second: f64,
    pub asset_events_per_second_offered: f64,
    pub events_sent: u64,
    pub events_accepted: u64,
    pub events_committed: u64,
    pub events_rejected: u64,
    pub events_committed_per_second: f64,
    pub trades_sent: u64,
    pub trades_committed: u64,
    pub trades_skipped: u64,
    pub settlement_windows: u64,
    pub settlement_entries: u64,
    pub click_ack: LatencySummary,
    pub event_accept: LatencySummary,
    pub accept_to_commit: LatencySummary,
    pub event_end_to_end: LatencySummary,
    pub trade: LatencySummary,
    pub errors: ErrorCounts,
    pub schedule_lag_max_ms: f64,
    /// False when a sender fell more than [`LAG_WARNING`] behind: the offered rate was not kept
    /// at every moment (latencies still count from the intended times).
    pub schedule_kept: bool,
}

impl PlayersReport {
    /// Prints the report for a person (the demo and `hoard-loadtest run` share this).
    pub fn print(&self) {
        println!(
            "  players: {} ({} game-server connections, {} direct), {:.1} s",
            self.players, self.game_server_connections, self.direct_connections, self.duration_seconds
        );
        println!(
            "  clicks: {} sent, {} acknowledged, {:.0}/s (offered {:.0}/s)",
            self.clicks_sent, self.clicks_acked, self.clicks_per_second, self.clicks_per_second_offered
        );
        println!(
            "  asset events: {} sent, {} accepted, {} committed ({} rejected by the ledger), {:.1}/s (offered {:.1}/s)",
            self.events_sent,
            self.events_accepted,
            self.events_committed,
            self.events_rejected,
            self.events_committed_per_second,
            self.asset_events_per_second_offered
        );
        for (name, summary) in [
            ("click ack", &self.click_ack),
            ("accept", &self.event_accept),
            ("accept-to-commit", &self.accept_to_commit),
            ("end-to-end", &self.event_end_to_end),
            ("trade", &self.trade),
        ] {
            println!(
                "    {name:<17} n {:>7} p50 {:>8.2} ms p99 {:>8.2} ms p99.9 {:>8.2} ms max {:>8.2} ms",
                summary.count, summary.p50_ms, summary.p99_ms, summary.p999_ms, summary.max_ms
            );
        }
        println!(
            "  trades: {} offered, {} committed, {} skipped (no item to offer yet); settlements: {} windows, {} entries",
            self.trades_sent, self.trades_committed, self.trades_skipped, self.settlement_windows, self.settlement_entries
        );
        if !self.errors.0.is_empty() {
            println!("  errors by reason: {:?}", self.errors.0);
        }
        if !self.schedule_kept {
            println!(
                "  WARNING: THE SIMULATOR FELL {:.0} ms BEHIND ITS SCHEDULE: the offered rate was not kept at all \
                 times (latencies count from the intended send times, so they include this lag)",
                self.schedule_lag_max_ms
            );
        }
    }
}

/// What the simulation knows about the players' committed holdings (to choose transfers and
/// trades that can succeed).
struct World {
    publics: Vec<PublicKey>,
    /// Players from this index on connect directly (and trade).
    direct_from: usize,
    /// GOLD each player received (committed), minus what the simulator moved away.
    gold: Vec<AtomicU64>,
    /// Items each player owns (committed).
    items: Vec<Mutex<Vec<ItemId>>>,
    next_item: AtomicU64,
}

impl World {
    fn credit(&self, player: usize, amount: u64) {
        self.gold[player].fetch_add(amount, Ordering::Relaxed);
    }

    /// Takes `amount` from a player's known GOLD if it has that much.
    fn debit(&self, player: usize, amount: u64) -> bool {
        self.gold[player]
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |g| g.checked_sub(amount))
            .is_ok()
    }

    fn take_item(&self, player: usize) -> Option<ItemId> {
        self.items[player].lock().expect("items lock").pop()
    }

    fn give_item(&self, player: usize, item: ItemId) {
        self.items[player].lock().expect("items lock").push(item);
    }
}

/// A running simulation.
pub struct Simulation {
    config: PlayersConfig,
    live: Arc<Live>,
    stop: Arc<AtomicBool>,
    senders: JoinSet<()>,
    events: Arc<Mutex<JoinSet<()>>>,
    clients: Vec<Client>,
    setup_seconds: f64,
    started: Instant,
}

fn reason(error: &Error) -> String {
    match error.kind() {
        ErrorKind::Rejected(rejection) => format!("rejected:{rejection:?}"),
        ErrorKind::Server(code) => format!("server:{code:?}"),
        other => format!("{other:?}"),
    }
}

fn client_options() -> ClientOptions {
    ClientOptions::new()
        .max_in_flight_events(1_024)
        .click_frames_buffered_max(256)
        .request_timeout(Duration::from_secs(30))
}

impl Simulation {
    /// Connects, sets up the tenant's currency, item class and accounts, and starts sending.
    pub async fn start(config: PlayersConfig) -> anyhow::Result<Simulation> {
        anyhow::ensure!(config.players > 0, "at least one player");
        anyhow::ensure!(
            config.direct_players <= config.players,
            "direct players <= players"
        );
        let setup_started = Instant::now();
        let studio = client_options()
            .connect(
                &config.url,
                Credentials::studio(config.tenant, config.studio_key.clone()),
            )
            .await
            .context("connecting the studio")?;
        // Custodial players: the studio signs for them, so only their public keys are needed.
        let publics: Vec<PublicKey> = (0..config.players)
            .map(|_| Keypair::generate().public())
            .collect();
        if config.setup {
            setup(&config, &studio, &publics).await?;
        }
        let world = Arc::new(World {
            gold: (0..config.players).map(|_| AtomicU64::new(0)).collect(),
            items: (0..config.players).map(|_| Mutex::new(Vec::new())).collect(),
            next_item: AtomicU64::new((rand::random::<u64>() >> 24) << 20),
            direct_from: config.players - config.direct_players,
            publics,
        });
        let live = Arc::new(Live::default());
        let stop = Arc::new(AtomicBool::new(false));
        let events = Arc::new(Mutex::new(JoinSet::new()));
        let mut senders = JoinSet::new();
        let mut clients = vec![studio.clone()];

        // Game servers carry the players that do not connect directly.
        let via_servers = config.players - config.direct_players;
        let per_server = config.players_per_game_server.max(1);
        let mut game_servers = Vec::new();
        let mut first = 0;
        while first < via_servers {
            let last = (first + per_server).min(via_servers);
            let client = client_options()
                .connect(
                    &config.url,
                    Credentials::studio(config.tenant, config.studio_key.clone()),
                )
                .await
                .context("connecting a game server")?;
            game_servers.push((client, first..last));
            first = last;
        }
        // Asset events come from game servers (the studio mints, transfers, settles): when every
        // player connects directly, one game-server connection without players issues them.
        if game_servers.is_empty() && config.asset_event_share > 0.0 {
            let client = client_options()
                .connect(
                    &config.url,
                    Credentials::studio(config.tenant, config.studio_key.clone()),
                )
                .await
                .context("connecting a game server")?;
            game_servers.push((client, 0..0));
        }
        // Direct players: one connection each.
        let mut direct = Vec::new();
        for index in via_servers..config.players {
            let token = keys::issue_session_token(
                &config.studio_key,
                config.tenant,
                world.publics[index],
                Duration::from_secs(3_600),
            )?;
            let client = client_options()
                .connect(&config.url, Credentials::player(token))
                .await
                .context("connecting a player")?;
            direct.push((client, index));
        }
        let setup_seconds = setup_started.elapsed().as_secs_f64();
        let started = Instant::now();
        let event_rate_total = config.players as f64 * config.clicks_per_second * config.asset_event_share;
        let trades_possible = config.direct_players >= 2;
        let trade_rate = if trades_possible {
            event_rate_total * config.trade_share
        } else {
            0.0
        };
        let server_event_rate_total = event_rate_total - trade_rate;
        let servers = game_servers.len();
        for (client, range) in &game_servers {
            clients.push(client.clone());
            // Each game server issues its players' share of the asset events (all of them when
            // it is the only one, as the events-only server above).
            let share = if via_servers == 0 {
                1.0 / servers as f64
            } else {
                range.len() as f64 / via_servers as f64
            };
            senders.spawn(game_server(
                config.clone(),
                client.clone(),
                range.clone(),
                server_event_rate_total * share,
                world.clone(),
                live.clone(),
                stop.clone(),
                events.clone(),
                started,
            ));
        }
        let direct_clients: Arc<Vec<(Client, usize)>> = Arc::new(direct);
        for (client, index) in direct_clients.iter() {
            clients.push(client.clone());
            senders.spawn(direct_player(
                config.clone(),
                client.clone(),
                world.publics[*index],
                live.clone(),
                stop.clone(),
                started,
            ));
        }
        if trade_rate > 0.0 {
            senders.spawn(trader(
                direct_clients.clone(),
                trade_rate,
                world.clone(),
                live.clone(),
                stop.clone(),
                events.clone(),
                started,
            ));
        }
        if let Some(every) = config.settle_every {
            senders.spawn(settler(studio.clone(), every, live.clone(), stop.clone()));
        }
        Ok(Simulation {
            config,
            live,
            stop,
            senders,
            events,
            clients,
            setup_seconds,
            started,
        })
    }

    /// The live counters (for a progress line).
    pub fn live(&self) -> &Arc<Live> {
        &self.live
    }

    /// When sending started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Runs for the configured duration (or until `interrupted` resolves), then finishes.
    pub async fn run_for(self, interrupted: impl std::future::Future<Output = ()>) -> PlayersReport {
        let until = self.started + self.config.duration;
        tokio::select! {
            _ = tokio::time::sleep_until(until.into()) => {}
            _ = interrupted => {}
        }
        self.finish().await
    }

    /// Stops sending, waits for outstanding events (up to [`DRAIN_TIMEOUT`]), and reports.
    pub async fn finish(mut self) -> PlayersReport {
        self.stop.store(true, Ordering::Relaxed);
        let sending = self.started.elapsed();
        while self.senders.join_next().await.is_some() {}
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.live.click_acks_pending.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
        loop {
            let next = {
                let mut events = self.events.lock().expect("events lock");
                if events.is_empty() {
                    break;
                }
                events.try_join_next()
            };
            if next.is_none() {
                if tokio::time::Instant::now() > deadline {
                    let mut events = self.events.lock().expect("events lock");
                    let left = events.len();
                    events.abort_all();
                    self.live
                        .error(format!("not_committed_within_{}s", DRAIN_TIMEOUT.as_secs()));
                    tracing::warn!(left, "asset events still outstanding at the end");
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        // Each close waits for its clicks' acknowledgements: all at once, not one after another.
        let closes = self.clients.iter().map(|client| client.close());
        for closed in futures::future::join_all(closes).await {
            if let Err(error) = closed {
                self.live.error(reason(&error));
            }
        }
        report(
            &self.config,
            &self.live,
            sending,
            self.setup_seconds,
            self.clients.len(),
        )
    }
}

fn report(
    config: &PlayersConfig,
    live: &Live,
    sending: Duration,
    setup_seconds: f64,
    connections: usize,
) -> PlayersReport {
    let latencies = live.latencies.lock().expect("latencies lock");
    let direct = config.direct_players;
    let lag = Duration::from_micros(live.lag_max_micros.load(Ordering::Relaxed));
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    PlayersReport {
        players: config.players,
        game_server_connections: connections.saturating_sub(1 + direct),
        direct_connections: direct,
        setup_seconds,
        duration_seconds: sending.as_secs_f64(),
        clicks_per_second_offered: config.players as f64 * config.clicks_per_second,
        clicks_sent: load(&live.clicks_sent),
        clicks_acked: load(&live.clicks_acked),
        clicks_per_second: per_second(load(&live.clicks_acked), sending),
        asset_events_per_second_offered: config.players as f64
            * config.clicks_per_second
            * config.asset_event_share,
        events_sent: load(&live.events_sent),
        events_accepted: load(&live.events_accepted),
        events_committed: load(&live.events_committed),
        events_rejected: load(&live.events_rejected),
        events_committed_per_second: per_second(load(&live.events_committed), sending),
        trades_sent: load(&live.trades_sent),
        trades_committed: load(&live.trades_committed),
        trades_skipped: load(&live.trades_skipped),
        settlement_windows: load(&live.settlement_windows),
        settlement_entries: load(&live.settlement_entries),
        click_ack: latencies.click_ack.summary(),
        event_accept: latencies.event_accept.summary(),
        accept_to_commit: latencies.accept_to_commit.summary(),
        event_end_to_end: latencies.event_end_to_end.summary(),
        trade: latencies.trade.summary(),
        errors: live.errors.lock().expect("errors lock").clone(),
        schedule_lag_max_ms: lag.as_secs_f64() * 1_000.0,
        schedule_kept: lag <= LAG_WARNING,
    }
}

/// Defines GOLD and `sword` (already defined is fine) and registers every player (custodial).
async fn setup(config: &PlayersConfig, studio: &Client, players: &[PublicKey]) -> anyhow::Result<()> {
    let tolerate = |result: Result<hoard_sdk::Committed, Error>, exists: Rejection| match result {
        Ok(_) => Ok(()),
        Err(Error::Rejected { reason, .. }) if reason == exists => Ok(()),
        Err(error) => Err(error),
    };
    let currency = studio
        .define_currency(CurrencyId::new(CURRENCY), 0, Amount(u128::from(u64::MAX)))
        .await?;
    let class = studio
        .define_item_class(
            ClassId::new(ITEM_CLASS),
            false,
            Amount(u128::from(u64::MAX)),
            Hash([0; 32]),
        )
        .await?;
    tolerate(currency.committed().await, Rejection::CurrencyExists).context("defining GOLD")?;
    tolerate(class.committed().await, Rejection::ClassExists).context("defining sword")?;
    // Registration runs on its own connections, retried on fresh ones if a connection fails
    // (only ledger answers are final), so that a lost connection never fails the whole run.
    let mut remaining: Vec<PublicKey> = players.to_vec();
    for pass in 1..=REGISTER_PASSES {
        let connections = if remaining.len() > 10_000 {
            REGISTER_CONNECTIONS
        } else {
            1
        };
        let mut registrars = Vec::new();
        for _ in 0..connections {
            registrars.push(
                client_options()
                    .connect(
                        &config.url,
                        Credentials::studio(config.tenant, config.studio_key.clone()),
                    )
                    .await?,
            );
        }
        let mut tasks = JoinSet::new();
        let limit = Arc::new(tokio::sync::Semaphore::new(REGISTER_CONCURRENCY));
        for (index, player) in remaining.iter().enumerate() {
            let client = registrars[index % registrars.len()].clone();
            let permit = limit.clone().acquire_owned().await?;
            let player = *player;
            tasks.spawn(async move {
                let result = async {
                    let handle = client.register_account(player, Custody::Custodial).await?;
                    handle.committed().await
                }
                .await;
                drop(permit);
                match result {
                    Ok(_)
                    | Err(Error::Rejected {
                        reason: Rejection::AccountExists,
                        ..
                    }) => Ok(()),
                    Err(error) => Err((player, error)),
                }
            });
        }
        let mut failed = Vec::new();
        let mut last_error = None;
        while let Some(done) = tasks.join_next().await {
            if let Err((player, error)) = done? {
                if matches!(error, Error::Rejected { .. }) {
                    return Err(error).context("registering a player");
                }
                failed.push(player);
                last_error = Some(error);
            }
        }
        for registrar in &registrars {
            // Registrars send no clicks: their close has nothing to report.
            let _ = registrar.close().await;
        }
        if failed.is_empty() {
            return Ok(());
        }
        tracing::warn!(
            pass,
            failed = failed.len(),
            error = ?last_error,
            "some registrations failed on a lost connection; retrying them on new connections"
        );
        remaining = failed;
    }
    anyhow::bail!(
        "{} players could not be registered after {REGISTER_PASSES} passes",
        remaining.len()
    )
}

/// Sleeps until `start + tick * k` for the next k, returns (k, lag behind it).
async fn next_tick(start: Instant, tick: Duration, k: &mut u64) -> Duration {
    *k += 1;
    let at = start + tick * (*k as u32);
    tokio::time::sleep_until(at.into()).await;
    Instant::now().saturating_duration_since(at)
}

/// Asks for the clicks sent so far to be acknowledged; records latency from `intended`.
fn await_click_ack(client: &Client, clicks: u64, intended: Instant, live: &Arc<Live>) {
    let client = client.clone();
    let live = live.clone();
    live.click_acks_pending.fetch_add(1, Ordering::Relaxed);
    tokio::spawn(async move {
        let flushed = client.flush_clicks().await;
        live.click_acks_pending.fetch_sub(1, Ordering::Relaxed);
        match flushed {
            Ok(()) => {
                live.clicks_acked.fetch_add(clicks, Ordering::Relaxed);
                live.latencies
                    .lock()
                    .expect("latencies lock")
                    .click_ack
                    .record_n(intended.elapsed(), clicks);
            }
            Err(error) => live.error(format!("clicks:{}", reason(&error))),
        }
    });
}

#[derive(Clone, Copy)]
enum ServerEvent {
    MintGold,
    MintItem,
    TransferGold,
    TransferItem,
    Settle,
}

const SERVER_EVENTS: [ServerEvent; 5] = [
    ServerEvent::MintGold,
    ServerEvent::MintItem,
    ServerEvent::TransferGold,
    ServerEvent::TransferItem,
    ServerEvent::Settle,
];

/// One game-server connection: clicks for its players every tick, and asset events at its share
/// of the event rate.
#[allow(clippy::too_many_arguments)]
async fn game_server(
    config: PlayersConfig,
    client: Client,
    players: std::ops::Range<usize>,
    event_rate: f64,
    world: Arc<World>,
    live: Arc<Live>,
    stop: Arc<AtomicBool>,
    events: Arc<Mutex<JoinSet<()>>>,
    start: Instant,
) {
    let clicks = Schedule {
        rate_per_second: players.len() as f64 * config.clicks_per_second,
    };
    let asset_events = Schedule {
        rate_per_second: event_rate,
    };
    let mut clicks_sent = 0u64;
    let mut events_sent = 0u64;
    let mut next_player = players.start;
    let mut k = 0;
    while !stop.load(Ordering::Relaxed) {
        let lag = next_tick(start, config.tick, &mut k).await;
        live.lag(lag);
        let elapsed = start.elapsed();
        let due = clicks.due(elapsed);
        // The first click's intended time (only when one is due: with no players the rate is
        // 0 and `intended` is Duration::MAX).
        let first_index = clicks_sent;
        let mut batch = 0u64;
        while clicks_sent < due {
            let player = &world.publics[next_player];
            next_player += 1;
            if next_player == players.end {
                next_player = players.start;
            }
            clicks_sent += 1;
            match client.click(player, COUNTER, 1) {
                Ok(()) => batch += 1,
                Err(error) => live.error(format!("clicks:{}", reason(&error))),
            }
        }
        if batch > 0 {
            live.clicks_sent.fetch_add(batch, Ordering::Relaxed);
            await_click_ack(&client, batch, start + clicks.intended(first_index), &live);
        }
        let due = asset_events.due(elapsed);
        while events_sent < due {
            let intended = start + asset_events.intended(events_sent);
            let kind = SERVER_EVENTS[(events_sent % SERVER_EVENTS.len() as u64) as usize];
            events_sent += 1;
            let task = server_event(client.clone(), kind, world.clone(), live.clone(), intended);
            events.lock().expect("events lock").spawn(task);
        }
    }
}

fn random_player(world: &World) -> usize {
    rand::thread_rng().gen_range(0..world.publics.len())
}

/// Builds and follows one game-server asset event.
async fn server_event(
    client: Client,
    kind: ServerEvent,
    world: Arc<World>,
    live: Arc<Live>,
    intended: Instant,
) {
    let gold = |amount: u64| Asset::Currency {
        currency: CurrencyId::new(CURRENCY),
        amount: Amount(u128::from(amount)),
    };
    let to = random_player(&world);
    // After commit: what the simulator learns.
    enum Effect {
        Gold(usize, u64),
        Item(usize, ItemId),
        GoldBack(usize, u64),
        ItemBack(usize, ItemId),
        Settled(Vec<usize>),
    }
    let (submitted, on_commit, on_reject) = match kind {
        ServerEvent::MintGold => (
            client
                .mint(
                    world.publics[to],
                    Grant::Currency {
                        currency: CurrencyId::new(CURRENCY),
                        amount: Amount(10),
                    },
                )
                .await,
            Some(Effect::Gold(to, 10)),
            None,
        ),
        ServerEvent::MintItem => {
            // Half of the items go to directly connected players, who trade them.
            let to = if world.direct_from < world.publics.len() && rand::thread_rng().gen_bool(0.5) {
                rand::thread_rng().gen_range(world.direct_from..world.publics.len())
            } else {
                to
            };
            let item = ItemId(world.next_item.fetch_add(1, Ordering::Relaxed));
            (
                client
                    .mint(
                        world.publics[to],
                        Grant::Unique {
                            class: ClassId::new(ITEM_CLASS),
                            item,
                            attributes_hash: Hash([7; 32]),
                        },
                    )
                    .await,
                Some(Effect::Item(to, item)),
                None,
            )
        }
        ServerEvent::TransferGold => {
            // From a player known to hold GOLD (a few tries), else from anyone: a rejection.
            let from = (0..8)
                .map(|_| random_player(&world))
                .find(|p| *p != to && world.debit(*p, 1))
                .unwrap_or_else(|| random_player(&world));
            (
                client
                    .transfer(world.publics[from], world.publics[to], vec![gold(1)])
                    .await,
                Some(Effect::Gold(to, 1)),
                Some(Effect::GoldBack(from, 1)),
            )
        }
        ServerEvent::TransferItem => {
            let found = (0..8).map(|_| random_player(&world)).find_map(|p| {
                if p == to {
                    return None;
                }
                world.take_item(p).map(|item| (p, item))
            });
            match found {
                Some((from, item)) => (
                    client
                        .transfer(world.publics[from], world.publics[to], vec![Asset::Item { item }])
                        .await,
                    Some(Effect::Item(to, item)),
                    Some(Effect::ItemBack(from, item)),
                ),
                // No item known yet: mint one instead.
                None => {
                    let item = ItemId(world.next_item.fetch_add(1, Ordering::Relaxed));
                    (
                        client
                            .mint(
                                world.publics[to],
                                Grant::Unique {
                                    class: ClassId::new(ITEM_CLASS),
                                    item,
                                    attributes_hash: Hash([7; 32]),
                                },
                            )
                            .await,
                        Some(Effect::Item(to, item)),
                        None,
                    )
                }
            }
        }
        ServerEvent::Settle => {
            let receivers: Vec<usize> = (0..SETTLE_ENTRIES).map(|_| random_player(&world)).collect();
            let entries = receivers
                .iter()
                .map(|p| Settlement {
                    to: world.publics[*p],
                    grant: Grant::Currency {
                        currency: CurrencyId::new(CURRENCY),
                        amount: Amount(1),
                    },
                })
                .collect();
            (
                client.settle(entries).await,
                Some(Effect::Settled(receivers)),
                None,
            )
        }
    };
    let apply = |effect: Option<Effect>| match effect {
        Some(Effect::Gold(p, a)) | Some(Effect::GoldBack(p, a)) => world.credit(p, a),
        Some(Effect::Item(p, i)) | Some(Effect::ItemBack(p, i)) => world.give_item(p, i),
        Some(Effect::Settled(players)) => players.into_iter().for_each(|p| world.credit(p, 1)),
        None => {}
    };
    live.events_sent.fetch_add(1, Ordering::Relaxed);
    let mut handle = match submitted {
        Ok(handle) => handle,
        Err(error) => {
            apply(on_reject);
            live.error(format!("submit:{}", reason(&error)));
            return;
        }
    };
    if let Err(error) = handle.accepted().await {
        apply(on_reject);
        live.error(format!("accept:{}", reason(&error)));
        return;
    }
    let accepted_at = Instant::now();
    live.events_accepted.fetch_add(1, Ordering::Relaxed);
    let result = handle.committed().await;
    let now = Instant::now();
    let committed = match &result {
        Ok(_) => true,
        Err(Error::Rejected { .. }) => {
            live.events_rejected.fetch_add(1, Ordering::Relaxed);
            true
        }
        Err(_) => false,
    };
    if committed {
        live.events_committed.fetch_add(1, Ordering::Relaxed);
        let mut latencies = live.latencies.lock().expect("latencies lock");
        latencies.event_accept.record(accepted_at - intended);
        latencies.accept_to_commit.record(now - accepted_at);
        latencies.event_end_to_end.record(now - intended);
        drop(latencies);
        live.interval_commit
            .lock()
            .expect("interval lock")
            .record(now - accepted_at);
    }
    match result {
        Ok(_) => apply(on_commit),
        Err(error) => {
            apply(on_reject);
            live.error(reason(&error));
        }
    }
}

/// A player connected by itself: clicks for itself at its rate, one frame per send.
async fn direct_player(
    config: PlayersConfig,
    client: Client,
    me: PublicKey,
    live: Arc<Live>,
    stop: Arc<AtomicBool>,
    start: Instant,
) {
    let clicks = Schedule {
        rate_per_second: config.clicks_per_second,
    };
    // A web client sends at most every 100 ms (or per click, when clicking slower).
    let tick = Duration::from_millis(100).max(config.tick);
    let mut sent = 0u64;
    let mut k = 0;
    // Spread players over the tick so that they do not all send at once.
    let offset = Duration::from_micros(rand::thread_rng().gen_range(0..tick.as_micros() as u64));
    let start = start + offset;
    tokio::time::sleep_until(start.into()).await;
    while !stop.load(Ordering::Relaxed) {
        let lag = next_tick(start, tick, &mut k).await;
        live.lag(lag);
        let due = clicks.due(start.elapsed());
        if due > sent {
            let intended = start + clicks.intended(sent);
            let count = due - sent;
            sent = due;
            match client.click(&me, COUNTER, count as u32) {
                Ok(()) => {
                    live.clicks_sent.fetch_add(count, Ordering::Relaxed);
                    await_click_ack(&client, count, intended, &live);
                }
                Err(error) => live.error(format!("clicks:{}", reason(&error))),
            }
        }
    }
}

/// Player-to-player trades between directly connected players: the maker offers an item it owns
/// for 1 GOLD, the taker accepts; measured from the intended time to the swap's commit.
async fn trader(
    direct: Arc<Vec<(Client, usize)>>,
    rate: f64,
    world: Arc<World>,
    live: Arc<Live>,
    stop: Arc<AtomicBool>,
    events: Arc<Mutex<JoinSet<()>>>,
    start: Instant,
) {
    let schedule = Schedule {
        rate_per_second: rate,
    };
    let mut sent = 0u64;
    let mut k = 0;
    let tick = Duration::from_millis(10);
    while !stop.load(Ordering::Relaxed) {
        let lag = next_tick(start, tick, &mut k).await;
        live.lag(lag);
        let due = schedule.due(start.elapsed());
        while sent < due {
            let intended = start + schedule.intended(sent);
            sent += 1;
            let (maker, taker) = {
                let mut rng = rand::thread_rng();
                // A maker that owns an item (a few tries), and any other player as the taker.
                let a = (0..8)
                    .map(|_| rng.gen_range(0..direct.len()))
                    .find(|a| !world.items[direct[*a].1].lock().expect("items lock").is_empty())
                    .unwrap_or_else(|| rng.gen_range(0..direct.len()));
                let mut b = rng.gen_range(0..direct.len() - 1);
                if b >= a {
                    b += 1;
                }
                (a, b)
            };
            let maker = direct[maker].clone();
            let taker = direct[taker].clone();
            let world = world.clone();
            let live = live.clone();
            events
                .lock()
                .expect("events lock")
                .spawn(trade(maker, taker, world, live, intended));
        }
    }
}

async fn trade(
    (maker, maker_index): (Client, usize),
    (taker, taker_index): (Client, usize),
    world: Arc<World>,
    live: Arc<Live>,
    intended: Instant,
) {
    let Some(item) = world.take_item(maker_index) else {
        live.trades_skipped.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let paid = world.debit(taker_index, 1);
    let gold = Asset::Currency {
        currency: CurrencyId::new(CURRENCY),
        amount: Amount(1),
    };
    let undo = |world: &World| {
        world.give_item(maker_index, item);
        if paid {
            world.credit(taker_index, 1);
        }
    };
    live.trades_sent.fetch_add(1, Ordering::Relaxed);
    live.events_sent.fetch_add(1, Ordering::Relaxed);
    let offer = match maker
        .offer(
            world.publics[taker_index],
            vec![Asset::Item { item }],
            vec![gold],
            Duration::from_secs(30),
        )
        .await
    {
        Ok(offer) => offer,
        Err(error) => {
            undo(&world);
            live.error(format!("offer:{}", reason(&error)));
            return;
        }
    };
    let mut handle = match taker.accept(&offer).await {
        Ok(handle) => handle,
        Err(error) => {
            undo(&world);
            live.error(format!("trade_accept:{}", reason(&error)));
            return;
        }
    };
    if let Err(error) = handle.accepted().await {
        undo(&world);
        live.error(format!("trade_accept:{}", reason(&error)));
        return;
    }
    let accepted_at = Instant::now();
    live.events_accepted.fetch_add(1, Ordering::Relaxed);
    let result = handle.committed().await;
    let now = Instant::now();
    match result {
        Ok(_) => {
            live.events_committed.fetch_add(1, Ordering::Relaxed);
            live.trades_committed.fetch_add(1, Ordering::Relaxed);
            world.give_item(taker_index, item);
            world.credit(maker_index, 1);
        }
        Err(error) => {
            if matches!(error, Error::Rejected { .. }) {
                live.events_committed.fetch_add(1, Ordering::Relaxed);
                live.events_rejected.fetch_add(1, Ordering::Relaxed);
            }
            // A rejected swap moved nothing.
            undo(&world);
            live.error(format!("trade:{}", reason(&error)));
            if !matches!(error, Error::Rejected { .. }) {
                return;
            }
        }
    }
    let mut latencies = live.latencies.lock().expect("latencies lock");
    latencies.trade.record(now - intended);
    latencies.accept_to_commit.record(now - accepted_at);
    drop(latencies);
    live.interval_commit
        .lock()
        .expect("interval lock")
        .record(now - accepted_at);
}

/// Asks the gateway to settle click points every `every` (clicks → GOLD by the tenant's rule).
async fn settler(studio: Client, every: Duration, live: Arc<Live>, stop: Arc<AtomicBool>) {
    let mut ticker = tokio::time::interval(every);
    ticker.tick().await;
    while !stop.load(Ordering::Relaxed) {
        ticker.tick().await;
        match studio.settle_clicks().await {
            Ok(window) => {
                live.settlement_windows.fetch_add(1, Ordering::Relaxed);
                live.settlement_entries
                    .fetch_add(u64::from(window.entries), Ordering::Relaxed);
            }
            Err(error) => {
                tracing::warn!(%error, "settle_clicks failed");
                live.error(format!("settle:{}", reason(&error)));
            }
        }
    }
}
