//! The shared test harness (public so that the SDK's and the load generator's tests reuse it
//! instead of writing it again): a real `redis-server` on a free loopback port in a temporary
//! directory, a gateway on free ports with an in-process chain and test tenants, and a raw
//! WebSocket client speaking the wire protocol. A gateway starts on a [`RedisServer`] or on a
//! [`TestStore`] (Redis or the embedded store: scenarios that must hold on both take one).
//!
//! ```no_run
//! # async fn demo() {
//! use hoard_server::testing::{RedisServer, TestGateway, WsClient};
//! let redis = RedisServer::start();
//! let gateway = TestGateway::start(&redis, |_config| {}).await;
//! let mut studio = WsClient::connect(&gateway.url()).await;
//! studio.auth_studio(hoard_types::TenantId(1), gateway.studio(hoard_types::TenantId(1))).await;
//! # }
//! ```
//!
//! Everything binds 127.0.0.1 only; the Redis process is killed when [`RedisServer`] drops.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use hoard_ledger::testing::World;
use hoard_ledger::Genesis;
use hoard_types::wire::{self, ClientMessage, ServerMessage, SessionToken};
use hoard_types::{Keypair, TenantId};

use crate::chain::{Chain, LocalChain};
use crate::config::{ConversionRule, GatewayConfig, StoreBackend, TenantConfig};
use crate::store::Store;
use crate::Gateway;

/// Path of the Redis binary the tests run.
pub const REDIS_SERVER_PATH: &str = "/usr/bin/redis-server";

/// A throwaway `redis-server` (no persistence) on a free port, killed on drop.
pub struct RedisServer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

pub use hoard_ledger::testing::free_port;

impl RedisServer {
    /// Starts redis-server and waits until it answers.
    pub fn start() -> RedisServer {
        for _ in 0..5 {
            let dir = tempfile::tempdir().expect("temp dir");
            let port = free_port();
            let mut server = RedisServer {
                child: spawn_redis(port, dir.path()),
                port,
                _dir: dir,
            };
            if server.wait_ready() {
                return server;
            }
            let _ = server.child.kill();
            let _ = server.child.wait();
        }
        panic!("redis-server did not start");
    }

    /// Polls PING until it answers (true) or the process exits or 5 s pass (false).
    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(client) = redis::Client::open(self.url()) {
                if let Ok(mut connection) = client.get_connection() {
                    // The server answering must be this one: another test's redis-server may
                    // have taken the port between `free_port` and the spawn (ours then exits).
                    if let Ok(info) = redis::cmd("INFO").arg("server").query::<String>(&mut connection) {
                        let ours = format!("process_id:{}", self.child.id());
                        return info.lines().any(|line| line.trim() == ours);
                    }
                }
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                return false; // the port was taken
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// SIGSTOP (`false`) or SIGCONT (`true`): a Redis that hangs with its connections open,
    /// answering nothing, then comes back.
    pub fn set_running(&self, running: bool) {
        let signal = if running { "-CONT" } else { "-STOP" };
        let status = std::process::Command::new("kill")
            .arg(signal)
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal} failed");
    }

    /// SIGKILL: the server is gone at once, with everything it held (no persistence).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts a fresh, empty redis-server on the same port (after [`RedisServer::kill`]): what
    /// a Redis restart without persistence looks like to the gateway.
    pub fn restart_empty(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.child = spawn_redis(self.port, self._dir.path());
            if self.wait_ready() {
                return;
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
            assert!(
                Instant::now() < deadline,
                "redis-server did not restart on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A synchronous connection, for assertions on what the gateway wrote.
    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection())
            .expect("redis connection")
    }
}

fn spawn_redis(port: u16, dir: &std::path::Path) -> Child {
    Command::new(REDIS_SERVER_PATH)
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server runs (install it at /usr/bin/redis-server)")
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The store a test gateway uses: a real redis-server, or the embedded store (a fresh one per
/// gateway, inside it).
pub enum TestStore {
    Redis(RedisServer),
    Embedded,
}

impl TestStore {
    pub fn redis() -> TestStore {
        TestStore::Redis(RedisServer::start())
    }

    pub fn embedded() -> TestStore {
        TestStore::Embedded
    }

    /// The redis-server, for assertions on what the gateway wrote (None: embedded).
    pub fn redis_server(&self) -> Option<&RedisServer> {
        match self {
            TestStore::Redis(redis) => Some(redis),
            TestStore::Embedded => None,
        }
    }
}

/// Points a gateway configuration at a store.
pub trait StoreUnderTest {
    fn configure(&self, config: &mut GatewayConfig);
}

impl StoreUnderTest for RedisServer {
    fn configure(&self, config: &mut GatewayConfig) {
        config.store = StoreBackend::Redis;
        config.redis.url = self.url();
    }
}

impl StoreUnderTest for TestStore {
    fn configure(&self, config: &mut GatewayConfig) {
        match self {
            TestStore::Redis(redis) => redis.configure(config),
            TestStore::Embedded => config.store = StoreBackend::Embedded,
        }
    }
}

/// A gateway on free loopback ports with two test tenants (ids 1 and 2, keys from
/// `hoard_ledger::testing::World`), each with the rule "100 `gold` → 1 GOLD" and the studio key
/// configured; over an in-process chain ([`TestGateway::start`]) or a real 4-replica PBFT
/// cluster on loopback TCP ([`TestGateway::start_on_cluster`]).
pub struct TestGateway {
    pub gateway: Option<Gateway>,
    chain: Option<LocalChain>,
    /// The replicas, when on a cluster (dropped after the gateway).
    pub cluster: Option<(hoard_ledger::testing::LocalCluster, tempfile::TempDir)>,
    pub world: World,
    pub config: GatewayConfig,
}

/// The test configuration for `redis` (or another store): free ports, fast flushes, fast reclaim.
pub fn test_config(redis: &impl StoreUnderTest, world: &World) -> GatewayConfig {
    let mut config = GatewayConfig {
        listen: "127.0.0.1:0".parse().expect("literal"),
        http_listen: "127.0.0.1:0".parse().expect("literal"),
        drain_timeout_ms: 2_000,
        ..GatewayConfig::default()
    };
    redis.configure(&mut config);
    config.clicks.flush_interval_ms = 10;
    config.events.claim_idle_ms = 1_000;
    config.tenants = world
        .studios
        .iter()
        .map(|(tenant, key)| TenantConfig {
            id: tenant.0,
            studio_seed_hex: Some(key.seed_hex()),
            settle_interval_ms: 0,
            rules: vec![ConversionRule {
                counter: "gold".into(),
                currency: "GOLD".into(),
                points_per_unit: 100,
            }],
        })
        .collect();
    config
}

impl TestGateway {
    /// Starts a gateway with [`test_config`], adjusted by `tweak`.
    pub async fn start(redis: &impl StoreUnderTest, tweak: impl FnOnce(&mut GatewayConfig)) -> TestGateway {
        let world = World::new(2);
        let chain = LocalChain::new(&world.genesis());
        let mut config = test_config(redis, &world);
        tweak(&mut config);
        TestGateway::start_on(chain, world, config).await
    }

    /// Starts a gateway with [`test_config`], adjusted by `tweak`, on a real 4-replica PBFT
    /// cluster (replica tasks of this process, on loopback TCP, with their stores on disk).
    /// Needs a multi-threaded runtime.
    pub async fn start_on_cluster(
        redis: &impl StoreUnderTest,
        tweak: impl FnOnce(&mut GatewayConfig),
    ) -> TestGateway {
        init_test_log();
        let world = World::new(2);
        let dir = tempfile::tempdir().expect("temporary directory");
        let cluster = hoard_ledger::testing::LocalCluster::start(dir.path(), &world.genesis(), 4);
        let backend: Arc<dyn Chain> = Arc::new(crate::chain::ClusterChain::connect(
            &cluster.cluster,
            1,
            hoard_ledger::testing::client_key(1),
        ));
        let mut config = test_config(redis, &world);
        tweak(&mut config);
        let gateway = Gateway::start(config.clone(), backend, &world.genesis())
            .await
            .expect("gateway starts");
        TestGateway {
            gateway: Some(gateway),
            chain: None,
            cluster: Some((cluster, dir)),
            world,
            config,
        }
    }

    /// Starts a gateway on an existing chain (a second gateway of the same cluster).
    pub async fn start_on(chain: LocalChain, world: World, config: GatewayConfig) -> TestGateway {
        init_test_log();
        let genesis: Genesis = world.genesis();
        let backend: Arc<dyn Chain> = Arc::new(chain.clone());
        let gateway = Gateway::start(config.clone(), backend, &genesis)
            .await
            .expect("gateway starts");
        TestGateway {
            gateway: Some(gateway),
            chain: Some(chain),
            cluster: None,
            world,
            config,
        }
    }

    /// The in-process chain (to pause it, or to start a second gateway on it).
    pub fn chain(&self) -> &LocalChain {
        self.chain
            .as_ref()
            .expect("this test needs the in-process chain, not a cluster")
    }

    pub fn gateway(&self) -> &Gateway {
        self.gateway.as_ref().expect("running")
    }

    pub fn url(&self) -> String {
        self.gateway().ws_url()
    }

    /// The gateway's store.
    pub fn store(&self) -> &Store {
        &self.gateway().shared().store
    }

    pub fn studio(&self, tenant: TenantId) -> &Keypair {
        self.world.studio(tenant)
    }

    /// A session token for `player`, signed by the tenant's studio key, valid for an hour.
    pub fn token(&self, tenant: TenantId, player: &Keypair) -> SessionToken {
        let expires = now_unix_ms() + 3_600_000;
        SessionToken::issue(self.studio(tenant), tenant, player.public(), expires)
    }

    /// Waits until the gateway's committed view reaches `height`.
    pub async fn wait_height(&self, height: u64) {
        let mut watch = self.gateway().shared().view.watch_height();
        tokio::time::timeout(Duration::from_secs(10), watch.wait_for(|h| *h >= height))
            .await
            .expect("height reached in time")
            .expect("follower running");
    }

    pub async fn shutdown(mut self) {
        if let Some(gateway) = self.gateway.take() {
            gateway.shutdown().await;
        }
        if let Some((cluster, _dir)) = self.cluster.take() {
            cluster.shutdown().await;
        }
    }
}

/// `RUST_LOG=hoard_server=debug cargo nextest run ...` shows a failing test's gateway log.
fn init_test_log() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A raw protocol client: sends [`ClientMessage`]s, receives [`ServerMessage`]s.
pub struct WsClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The `hello` the gateway sent.
    pub hello: ServerMessage,
    next_request_id: u64,
}

/// How long a test waits for one message.
pub const RECEIVE_TIMEOUT: Duration = Duration::from_secs(10);

impl WsClient {
    /// Connects and reads `hello`.
    pub async fn connect(url: &str) -> WsClient {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("websocket connects");
        let mut client = WsClient {
            ws,
            hello: ServerMessage::ClicksAck { up_to: 0 },
            next_request_id: 1,
        };
        client.hello = client.recv().await;
        assert!(
            matches!(client.hello, ServerMessage::Hello { .. }),
            "first message is hello: {:?}",
            client.hello
        );
        client
    }

    /// A fresh request id.
    pub fn request_id(&mut self) -> u64 {
        self.next_request_id += 1;
        self.next_request_id
    }

    pub fn challenge(&self) -> [u8; 32] {
        match &self.hello {
            ServerMessage::Hello { challenge, .. } => challenge.0,
            _ => unreachable!("hello checked at connect"),
        }
    }

    pub async fn send(&mut self, message: &ClientMessage) {
        self.send_raw(wire::encode(message)).await;
    }

    pub async fn send_raw(&mut self, bytes: Vec<u8>) {
        self.ws.send(Message::Binary(bytes.into())).await.expect("send");
    }

    pub async fn send_message(
        &mut self,
        message: Message,
    ) -> Result<(), tokio_tungstenite::tungstenite::Error> {
        self.ws.send(message).await
    }

    /// The next protocol message (panics on close or timeout).
    pub async fn recv(&mut self) -> ServerMessage {
        match self.try_recv().await {
            Ok(message) => message,
            Err(close) => panic!("connection closed: {close:?}"),
        }
    }

    /// The next protocol message, or the close frame if the connection closed instead.
    pub async fn try_recv(&mut self) -> Result<ServerMessage, Option<CloseFrame>> {
        loop {
            let frame = tokio::time::timeout(RECEIVE_TIMEOUT, self.ws.next())
                .await
                .expect("a message in time");
            match frame {
                Some(Ok(Message::Binary(bytes))) => {
                    return Ok(wire::decode_server(&bytes).expect("the gateway sends valid messages"))
                }
                Some(Ok(Message::Close(frame))) => return Err(frame),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Err(None),
            }
        }
    }

    /// Messages until one matches `want` (others are skipped); returns it.
    pub async fn recv_until(&mut self, mut want: impl FnMut(&ServerMessage) -> bool) -> ServerMessage {
        loop {
            let message = self.recv().await;
            if want(&message) {
                return message;
            }
        }
    }

    /// Reads until the connection closes; the close frame.
    pub async fn closed(&mut self) -> Option<CloseFrame> {
        loop {
            match self.try_recv().await {
                Ok(_) => continue,
                Err(frame) => return frame,
            }
        }
    }

    /// Sends a request and returns the first answer carrying its request id (pushes are skipped).
    pub async fn request(&mut self, message: ClientMessage) -> ServerMessage {
        let request_id = message.request_id();
        self.send(&message).await;
        self.recv_until(|m| response_id(m) == Some(request_id)).await
    }

    /// Authenticates as the studio of `tenant`.
    pub async fn auth_studio(&mut self, tenant: TenantId, studio: &Keypair) -> ServerMessage {
        let signature = wire::sign_auth(studio, &self.challenge(), tenant);
        let request_id = self.request_id();
        self.request(ClientMessage::AuthStudio {
            request_id,
            tenant,
            signature,
        })
        .await
    }

    /// Authenticates as a player.
    pub async fn auth_player(&mut self, token: SessionToken) -> ServerMessage {
        let request_id = self.request_id();
        self.request(ClientMessage::AuthPlayer { request_id, token })
            .await
    }
}

/// The request id an answer carries (None for pushes).
pub fn response_id(message: &ServerMessage) -> Option<u64> {
    use ServerMessage as S;
    match message {
        S::Authenticated { request_id, .. }
        | S::Pong { request_id, .. }
        | S::Accepted { request_id, .. }
        | S::Error { request_id, .. }
        | S::Token { request_id, .. }
        | S::Settlement { request_id, .. }
        | S::OfferOpened { request_id, .. }
        | S::Offers { request_id, .. }
        | S::Head { request_id, .. }
        | S::Balances { request_id, .. }
        | S::Inventory { request_id, .. }
        | S::Item { request_id, .. }
        | S::EventStatus { request_id, .. }
        | S::Counter { request_id, .. }
        | S::PlayerTotals { request_id, .. }
        | S::Leaderboard { request_id, .. }
        | S::Subscribed { request_id, .. }
        | S::Unsubscribed { request_id, .. } => Some(*request_id),
        S::Hello { .. }
        | S::ClicksAck { .. }
        | S::Committed { .. }
        | S::Rejected { .. }
        | S::OfferReceived { .. }
        | S::OfferClosed { .. }
        | S::Activity { .. } => None,
    }
}
