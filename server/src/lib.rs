//! Hoard's gateway: the WebSocket game endpoint (`/v1`, protocol in `hoard_types::wire` and
//! `docs/PROTOCOL.md`). Clicks are absorbed in memory and flushed to Redis in pipelines; asset
//! events are made durable in a Redis stream, batched to the chain, and reported exactly once.
//!
//! Layout:
//! - [`config`]: the TOML configuration, environment overrides, demo defaults.
//! - [`connection`]: one WebSocket connection: handshake, authentication, permissions, handlers.
//! - [`hub`]: registry of connections, their bounded outgoing queues, subscriptions.
//! - [`clicks`]: the click aggregator, its Redis flusher and the counter/leaderboard reads.
//! - [`events`]: the event pipeline: stream writer (XADD), batcher (XREADGROUP/XAUTOCLAIM), acker.
//! - [`chain`]: the narrow [`chain::Chain`] trait and the in-process [`chain::LocalChain`].
//! - [`view`]: the follower: the gateway's own committed `Ledger` copy, item history, dispatch.
//! - [`settlement`]: click points → one batched `settle` transaction per window, exactly once.
//! - [`offers`]: open trade offers between players.
//! - [`ratelimit`]: token buckets.
//! - [`store`]: the one interface to the click store and event stream ([`store::Store`]): Redis
//!   (handle, key layout, scripts) or [`embedded`], the same semantics in memory (not durable).
//! - [`metrics`]: every metric name, the Prometheus recorder, `/metrics` `/healthz` `/readyz`.
//! - [`testing`]: the shared test harness (real redis-server, a gateway on free ports, a client).
//!
//! Invariants: nothing answers `accepted` before the event is in the Redis stream; nothing is
//! removed from the stream before its receipt is seen; every queue is bounded and a full one
//! answers `busy` (or closes a slow reader with 1013); no request reaches another tenant's data.

pub mod chain;
pub mod clicks;
pub mod config;
pub mod connection;
pub mod constants;
pub mod embedded;
pub mod error;
pub mod events;
pub mod hub;
pub mod metrics;
pub mod offers;
pub mod ratelimit;
pub mod settlement;
pub mod store;
pub mod testing;
pub mod view;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use hoard_ledger::Genesis;
use hoard_types::wire::OfferCloseReason;
use hoard_types::{Keypair, TenantId};

pub use chain::{Chain, ChainError, ClusterChain, LocalChain};
pub use config::GatewayConfig;
pub use error::{Result, ServerError};

/// What every connection and task of one gateway shares.
pub struct Shared {
    pub config: GatewayConfig,
    pub chain_id: u64,
    pub hub: Arc<hub::Hub>,
    pub view: Arc<view::ChainView>,
    pub clicks: Arc<clicks::Clicks>,
    pub events: Arc<events::Events>,
    pub offers: offers::Offers,
    /// Click totals, settlement windows and the event stream (Redis or embedded).
    pub store: Arc<store::Store>,
    /// Studio signing keys the gateway holds (settlement, tokens, custodial trades).
    pub studio_keys: HashMap<TenantId, Keypair>,
    pub tenant_messages: ratelimit::TenantBuckets,
    pub tenant_clicks: ratelimit::TenantBuckets,
    /// How far this gateway advanced each tenant's settlement window (detects a store that
    /// went back).
    pub settle_marks: settlement::Marks,
    pub health: Arc<metrics::Health>,
    /// Becomes true when connections must close (1001).
    pub stop_connections: watch::Receiver<bool>,
}

/// A running gateway.
pub struct Gateway {
    ws_addr: SocketAddr,
    http_addr: SocketAddr,
    shared: Arc<Shared>,
    stop_accepting: watch::Sender<bool>,
    stop_connections: watch::Sender<bool>,
    stop_background: watch::Sender<bool>,
    accept_task: JoinHandle<()>,
    flusher: JoinHandle<()>,
    batcher: Option<JoinHandle<()>>,
    others: Vec<JoinHandle<()>>,
}

/// Runs the gateway with the chain backend its config names until `shutdown` completes, then
/// shuts down gracefully. The `hoard gateway --config gateway.toml` command calls this.
pub async fn run(config: GatewayConfig, shutdown: impl Future<Output = ()>) -> Result<()> {
    let (chain, genesis): (Arc<dyn Chain>, Genesis) = match (
        config.chain.backend.as_str(),
        &config.chain.cluster,
    ) {
        ("cluster", Some(path)) => {
            let cluster = hoard_ledger::cluster::Cluster::load(path)?;
            let chain = chain::ClusterChain::connect_configured(&cluster, &config.chain)?;
            (Arc::new(chain), cluster.genesis)
        }
        _ => {
            tracing::warn!(
                    "chain.backend = \"local\": an in-process ledger with no replicas, no consensus and \
                     no disk (development only; set backend = \"cluster\" and chain.cluster for the PBFT replicas)"
                );
            let genesis = config.genesis()?;
            (Arc::new(LocalChain::new(&genesis)), genesis)
        }
    };
    run_with_chain(config, chain, genesis, shutdown).await
}

/// Runs the gateway on a given chain backend (the PBFT cluster client plugs in here).
pub async fn run_with_chain(
    config: GatewayConfig,
    chain: Arc<dyn Chain>,
    genesis: Genesis,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let gateway = Gateway::start(config, chain, &genesis).await?;
    tracing::info!(ws = %gateway.ws_url(), http = %gateway.http_addr(), "gateway running");
    shutdown.await;
    gateway.shutdown().await;
    Ok(())
}

impl Gateway {
    /// Binds the listeners, opens the store (connecting to Redis) and starts every task.
    pub async fn start(config: GatewayConfig, chain: Arc<dyn Chain>, genesis: &Genesis) -> Result<Gateway> {
        config.validate()?;
        if chain.chain_id() != genesis.chain_id {
            return Err(ServerError::Config(
                "the chain's id differs from the genesis".into(),
            ));
        }
        let prometheus = metrics::install()?;
        let store = Arc::new(store::Store::open(&config)?);
        store.ensure_group().await?;
        if !store.is_durable() {
            tracing::warn!("store = embedded: using {}", store::EMBEDDED_NOTICE);
        }
        let consumer = if config.instance.is_empty() {
            format!("gateway-{:016x}", rand::random::<u64>())
        } else {
            config.instance.clone()
        };
        let mut studio_keys = HashMap::new();
        for tenant in &config.tenants {
            if let Some(key) = tenant.studio_key()? {
                studio_keys.insert(TenantId(tenant.id), key);
            }
        }
        let health = Arc::new(metrics::Health::default());
        let hub = Arc::new(hub::Hub::default());
        let view = Arc::new(view::ChainView::new(genesis));
        let (events, queues) = events::Events::new(&config, consumer, hub.clone(), view.clone());
        store.check_marker(events.consumer()).await?;
        let clicks = Arc::new(clicks::Clicks::new(store.clone()));
        let (stop_accepting, stop_accepting_rx) = watch::channel(false);
        let (stop_connections, stop_connections_rx) = watch::channel(false);
        let (stop_background, stop_background_rx) = watch::channel(false);
        let listener = TcpListener::bind(config.listen).await?;
        let ws_addr = listener.local_addr()?;
        let http_listener = metrics::bind_http(config.http_listen).await?;
        let http_addr = http_listener.local_addr()?;
        let shared = Arc::new(Shared {
            chain_id: genesis.chain_id,
            hub: hub.clone(),
            view: view.clone(),
            clicks: clicks.clone(),
            events: events.clone(),
            offers: offers::Offers::default(),
            store: store.clone(),
            studio_keys,
            tenant_messages: ratelimit::TenantBuckets::new(config.limits.tenant_messages_per_second),
            tenant_clicks: ratelimit::TenantBuckets::new(config.limits.tenant_clicks_per_second),
            settle_marks: settlement::Marks::default(),
            health: health.clone(),
            stop_connections: stop_connections_rx.clone(),
            config,
        });
        let mut others = Vec::new();
        others.push(tokio::spawn(view::follow(
            view.clone(),
            chain.clone(),
            events.clone(),
            hub.clone(),
            health.clone(),
            stop_background_rx.clone(),
        )));
        others.push(tokio::spawn(events::run_writer(
            events.clone(),
            store.clone(),
            queues.writer,
        )));
        others.push(tokio::spawn(events::run_acker(store.clone(), queues.acks)));
        let batcher = shared.config.events.batcher.then(|| {
            tokio::spawn(events::run_batcher(
                events.clone(),
                store.clone(),
                chain.clone(),
                events::BatcherSettings {
                    batch_max: shared.config.events.batch_max,
                    wait_ms: shared.config.events.batch_wait_ms,
                    claim_idle_ms: shared.config.events.claim_idle_ms,
                },
                stop_background_rx.clone(),
            ))
        });
        let flusher = tokio::spawn(
            clicks
                .clone()
                .run_flusher(shared.config.clicks.clone(), stop_background_rx.clone()),
        );
        others.push(tokio::spawn(sweep_offers(
            shared.clone(),
            stop_background_rx.clone(),
        )));
        others.push(tokio::spawn(watch_redis(
            shared.clone(),
            stop_background_rx.clone(),
        )));
        others.push(tokio::spawn(watch_chain(
            chain.clone(),
            health.clone(),
            stop_background_rx.clone(),
        )));
        for tenant in &shared.config.tenants {
            if tenant.settle_interval_ms > 0 && !tenant.rules.is_empty() {
                others.push(tokio::spawn(settle_periodically(
                    shared.clone(),
                    TenantId(tenant.id),
                    Duration::from_millis(tenant.settle_interval_ms),
                    stop_background_rx.clone(),
                )));
            }
        }
        others.push(tokio::spawn(metrics::serve_http(
            http_listener,
            prometheus,
            health.clone(),
            stop_background_rx.clone(),
        )));
        let accept_task = tokio::spawn(accept_loop(
            shared.clone(),
            listener,
            stop_accepting_rx,
            stop_connections_rx,
        ));
        Ok(Gateway {
            ws_addr,
            http_addr,
            shared,
            stop_accepting,
            stop_connections,
            stop_background,
            accept_task,
            flusher,
            batcher,
            others,
        })
    }

    pub fn ws_addr(&self) -> SocketAddr {
        self.ws_addr
    }

    /// `ws://host:port/v1`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}{}", self.ws_addr, hoard_types::wire::WS_PATH)
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Graceful shutdown, in this order:
    /// 1. `/readyz` turns 503, no new connection is accepted, and open connections are refused
    ///    new clicks and asset events (`shutting_down`) but stay open;
    /// 2. the clicks received so far are flushed (their strict-mode acks go out);
    /// 3. accepted events are drained: up to `drain_timeout_ms` for them to commit, their
    ///    pushes reaching the open connections (what does not commit in time stays in the
    ///    stream for the next gateway);
    /// 4. connections write what is queued for them and close with 1001;
    /// 5. every background task stops (the flusher after one last flush).
    pub async fn shutdown(self) {
        self.shared.health.shutting_down.store(true, Ordering::Relaxed);
        self.stop_accepting.send_replace(true);
        for attempt in 1..=3 {
            match self.shared.clicks.flush().await {
                Ok(()) => break,
                Err(error) => tracing::warn!(%error, attempt, "shutdown: click flush failed"),
            }
        }
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(self.shared.config.drain_timeout_ms);
        if self.batcher.is_some() {
            while self.shared.events.in_flight() > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if self.shared.events.in_flight() > 0 {
                tracing::warn!(
                    events = self.shared.events.in_flight(),
                    "shutdown: events still in flight stay in the stream for the next gateway"
                );
            }
        }
        // Give the acker a moment for the last XACKs, and the connections for the last pushes.
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.stop_connections.send_replace(true);
        let _ = self.accept_task.await;
        self.stop_background.send_replace(true);
        let _ = self.flusher.await;
        if let Some(batcher) = self.batcher {
            let _ = tokio::time::timeout(Duration::from_secs(2), batcher).await;
        }
        for task in self.others {
            task.abort();
        }
    }

    /// Stops everything at once without flushing or draining: what a crash looks like to Redis
    /// and to the chain (for crash-recovery tests).
    pub fn abort(self) {
        self.accept_task.abort();
        self.flusher.abort();
        if let Some(batcher) = self.batcher {
            batcher.abort();
        }
        for task in self.others {
            task.abort();
        }
        self.stop_accepting.send_replace(true);
        self.stop_connections.send_replace(true);
    }
}

/// Accepts connections until `stop_accepting`, then waits for the open ones: they end on their
/// own or on `stop_connections` (closing with 1001), and are given 2 s for that.
async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    mut stop_accepting: watch::Receiver<bool>,
    mut stop_connections: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(shared.config.connections_max));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let permit = permits.clone().try_acquire_owned();
                let shared = shared.clone();
                connections.spawn(async move {
                    let refuse = permit.is_err();
                    connection::serve(shared, stream, refuse).await;
                    drop(permit);
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = crate::stopped(&mut stop_accepting) => break,
        }
    }
    drop(listener);
    loop {
        tokio::select! {
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = crate::stopped(&mut stop_connections) => break,
        }
    }
    // Connections see the same signal and close with 1001; give them a moment.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while connections.join_next().await.is_some() {}
    })
    .await;
}

async fn sweep_offers(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = crate::stopped(&mut stop) => return,
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        for (tenant, offer) in shared.offers.expire(now) {
            connection::close_offer_everywhere(&shared, tenant, &offer, OfferCloseReason::Expired);
        }
    }
}

/// Checks Redis every 500 ms (readiness), and that it still holds this gateway's marker key. A
/// missing marker means Redis restarted without its data (no persistence, or a lost disk): the
/// consumer group is created again and the events whose stream entries may be gone are
/// forgotten (`event_status` then answers `unknown`), so that the SDK's resend of every event
/// not seen committed appends them again; the ledger keeps each event once. Every
/// `LOST_SWEEP_INTERVAL_MS` it also forgets in-flight events whose stream entries are gone
/// although the marker is not (`Events::forget_lost`: Redis with AOF `everysec` can lose the
/// last second of writes and keep an older marker).
/// Every 500 ms: whether the chain is reachable, for `/readyz` and its gauge.
async fn watch_chain(chain: Arc<dyn Chain>, health: Arc<metrics::Health>, mut stop: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(Duration::from_millis(500));
    loop {
        let (reachable, needed) = chain.reachable();
        ::metrics::gauge!(metrics::CHAIN_REPLICAS_REACHABLE).set(reachable as f64);
        health
            .chain_reachable
            .store(reachable >= needed, Ordering::Relaxed);
        tokio::select! {
            _ = ticker.tick() => {}
            _ = crate::stopped(&mut stop) => return,
        }
    }
}

async fn watch_redis(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(Duration::from_millis(500));
    let mut last_sweep = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = crate::stopped(&mut stop) => return,
        }
        // Entries Redis lost without losing the marker (the last second of AOF `everysec`).
        if shared.store.is_durable()
            && last_sweep.elapsed() >= Duration::from_millis(constants::LOST_SWEEP_INTERVAL_MS)
        {
            last_sweep = tokio::time::Instant::now();
            let older_than = Duration::from_millis(shared.config.events.claim_idle_ms);
            shared.events.forget_lost(&shared.store, older_than).await;
        }
        let ok = match shared.store.check_marker(shared.events.consumer()).await {
            Ok(true) => true,
            Ok(false) => {
                let group = shared.store.ensure_group().await;
                let forgotten = shared.events.forget_durable(&shared.store).await;
                tracing::warn!(
                    forgotten,
                    "Redis lost its data (this gateway's marker key is gone): consumer group created \
                     again; events in flight forgotten so that their resubmissions are appended again"
                );
                group.is_ok()
            }
            Err(_) => false,
        };
        shared.health.redis_ok.store(ok, Ordering::Relaxed);
    }
}

async fn settle_periodically(
    shared: Arc<Shared>,
    tenant: TenantId,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let Some(studio) = shared.studio_keys.get(&tenant).cloned() else {
        tracing::warn!(%tenant, "settle_interval_ms set but no studio key: automatic settlement off");
        return;
    };
    let rules = shared
        .config
        .tenant(tenant)
        .map(|t| t.rules.clone())
        .unwrap_or_default();
    let mut ticker = tokio::time::interval(every);
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = crate::stopped(&mut stop) => return,
        }
        let result = settlement::settle(
            &shared.store,
            &shared.events,
            &shared.view,
            &shared.settle_marks,
            shared.chain_id,
            tenant,
            &studio,
            &rules,
        )
        .await;
        if let Err(error) = result {
            tracing::warn!(%tenant, %error, "automatic settlement failed; retrying next interval");
        }
    }
}

/// Resolves when a stop signal becomes true (or its sender is gone).
pub(crate) async fn stopped(signal: &mut watch::Receiver<bool>) {
    let _ = signal.wait_for(|stop| *stop).await;
}
