//! Shared setup for the SDK's integration tests: a real redis-server and a real gateway (the
//! server crate's harness), and a TCP proxy that can cut every connection through it.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hoard_sdk::{Client, ClientOptions, Credentials, Keypair, ReconnectPolicy, TenantId};
use hoard_server::testing::{RedisServer, TestGateway};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub const TENANT: TenantId = TenantId(1);

/// Redis plus a gateway over an in-process chain.
pub struct Stack {
    pub gateway: TestGateway,
    pub redis: RedisServer,
}

impl Stack {
    pub async fn start() -> Stack {
        Stack::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut hoard_server::GatewayConfig)) -> Stack {
        let redis = RedisServer::start();
        let gateway = TestGateway::start(&redis, tweak).await;
        Stack { gateway, redis }
    }

    pub fn url(&self) -> String {
        self.gateway.url()
    }

    pub fn ws_addr(&self) -> SocketAddr {
        self.gateway.gateway().ws_addr()
    }

    pub fn studio_key(&self) -> Keypair {
        self.gateway.studio(TENANT).clone()
    }

    pub fn studio_credentials(&self) -> Credentials {
        Credentials::studio(TENANT, self.studio_key())
    }

    /// A studio client with fast reconnects and status checks, at `url`.
    pub async fn studio_at(&self, url: &str) -> Client {
        fast_options()
            .connect(url, self.studio_credentials())
            .await
            .expect("the studio connects")
    }
}

/// Options that keep tests quick: reconnect within milliseconds, check stuck events early.
pub fn fast_options() -> ClientOptions {
    ClientOptions::new()
        .reconnect(ReconnectPolicy {
            initial_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(200),
            max_attempts: None,
        })
        .status_poll_after(Duration::from_millis(500))
        .request_timeout(Duration::from_secs(20))
}

/// A TCP proxy in front of the gateway; `cut()` drops every connection through it.
pub struct Proxy {
    pub port: u16,
    cut: watch::Sender<u64>,
    refusing: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let (cut, cuts) = watch::channel(0u64);
        let refusing = Arc::new(AtomicBool::new(false));
        let refuse = refusing.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                if refuse.load(Ordering::Relaxed) {
                    drop(inbound);
                    continue;
                }
                let mut cuts = cuts.clone();
                cuts.mark_unchanged();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (mut inbound, mut outbound) = (inbound, outbound);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cuts.changed() => {}
                    }
                });
            }
        });
        Proxy {
            port,
            cut,
            refusing,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    /// Drops every connection open through the proxy now.
    pub fn cut(&self) {
        self.cut.send_modify(|cuts| *cuts += 1);
    }

    /// While refusing, new connections are closed at once.
    /// Refuses new connections, cuts the open ones, and waits until `client` sees the cut.
    pub async fn cut_and_refuse(&self, client: &hoard_sdk::Client) {
        self.set_refusing(true);
        self.cut();
        let mut state = client.state();
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            state.wait_for(|state| *state != hoard_sdk::ConnectionState::Connected),
        )
        .await
        .expect("the client sees the cut")
        .unwrap();
    }

    pub fn set_refusing(&self, refusing: bool) {
        self.refusing.store(refusing, Ordering::Relaxed);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

/// Counts the changes of a client's state to anything but `Connected` (in a background task).
pub fn count_disconnects(client: &Client) -> Arc<std::sync::atomic::AtomicU64> {
    let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = count.clone();
    let mut state = client.state();
    tokio::spawn(async move {
        while state.changed().await.is_ok() {
            if *state.borrow_and_update() != hoard_sdk::ConnectionState::Connected {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    count
}

/// Defines currency GEM with unlimited supply and waits for its commit.
pub async fn define_gem(client: &Client) -> hoard_sdk::CurrencyId {
    let gem = hoard_sdk::CurrencyId::new("GEM");
    client
        .define_currency(gem.clone(), 0, hoard_sdk::Amount(u128::MAX))
        .await
        .unwrap()
        .committed()
        .await
        .unwrap();
    gem
}

/// Registers `count` new custodial players and waits for every commit.
pub async fn register_players(client: &Client, count: usize) -> Vec<hoard_sdk::PublicKey> {
    let players: Vec<hoard_sdk::PublicKey> = (0..count).map(|_| Keypair::generate().public()).collect();
    let mut handles = Vec::new();
    for player in &players {
        handles.push(
            client
                .register_account(*player, hoard_sdk::Custody::Custodial)
                .await
                .unwrap(),
        );
    }
    for handle in handles {
        handle.committed().await.expect("registered");
    }
    players
}
