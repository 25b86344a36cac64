//! The gateway as a real `hoard gateway --config` process in front of four real `hoard node`
//! replicas, with SDK clients submitting asset events at a steady rate:
//!
//! - the gateway process is killed with SIGKILL mid-load; a second gateway process (another
//!   consumer name, on addresses the SDK clients do not know, so that they cannot resend
//!   anything) must claim the dead one's pending stream entries (XAUTOCLAIM) and see every event
//!   that was in doubt committed; then the first gateway is started again for the SDK clients;
//! - redis-server (no persistence) is killed with SIGKILL mid-load and a fresh, empty one started
//!   on the same port; the gateway forgets the events whose entries went with it, and the SDK's
//!   status checks and resends of every event not seen committed finish them.
//!
//! Each crash happens only while at least [`MIN_IN_DOUBT`] events are in doubt (`accepted`, not
//! committed): the replicas are paused (SIGSTOP) just before it, so that accepted events pile up
//! uncommitted, and resumed (SIGCONT) after it. Every event the SDK submitted (and so every one
//! that got `accepted`) must commit exactly once; the ledger deduplicates by event id. The end
//! check reads the balance through the gateway and, after the replicas stop, from a replica's
//! own store.
//!
//! The replicas (and their cluster files) come from `hoard_loadtest::stack` (the same code
//! `hoard demo` uses); its in-process gateway is aborted at once and replaced by the processes
//! started here.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hoard_loadtest::stack::{ChildProcess, Stack, StackOptions};
use hoard_sdk::{
    Amount, Client, ClientOptions, Committed, Credentials, CurrencyId, Custody, EventId, EventState, Grant,
    Keypair, Outcome, ReconnectPolicy, TenantId,
};
use hoard_server::config::{GatewayConfig, DEMO_STUDIO_SEED};
use hoard_server::metrics::EVENTS_CLAIMED_TOTAL;
use hoard_server::testing::{free_port, RedisServer, REDIS_SERVER_PATH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TENANT: TenantId = TenantId(1);
/// Mints each SDK client submits per second.
const MINTS_PER_SECOND_PER_CLIENT: u64 = 40;
const CLIENTS: usize = 2;
/// How long everything may take to settle at the end.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(40);
/// Accepted, uncommitted events there must be at the crash (a gateway kill, a Redis restart).
const MIN_IN_DOUBT: usize = 10;
/// How long the paused chain may take to leave [`MIN_IN_DOUBT`] events in doubt (at the load's
/// rate that takes well under a second).
const IN_DOUBT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the second gateway may take to claim the dead one's entries and see them committed.
const CLAIM_TIMEOUT: Duration = Duration::from_secs(20);
/// The gateway the SDK clients use (killed, then started again), and the one that takes over.
const FIRST_INSTANCE: &str = "gateway-under-test";
const SECOND_INSTANCE: &str = "gateway-second";

/// A `hoard gateway --config <file>` child process (killed on drop).
struct GatewayChild {
    config_path: PathBuf,
    ws: SocketAddr,
    http: SocketAddr,
    process: Option<ChildProcess>,
}

impl GatewayChild {
    /// Writes the TOML configuration of gateway `instance` (its consumer name) for the cluster
    /// and Redis, as chain client `client_id` (its key file is beside the cluster file); does
    /// not start it.
    fn configure(
        dir: &Path,
        cluster: &Path,
        redis_url: &str,
        instance: &str,
        client_id: u64,
    ) -> GatewayChild {
        let ws = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut config = GatewayConfig {
            listen: ws,
            http_listen: http,
            instance: instance.into(),
            drain_timeout_ms: 5_000,
            ..GatewayConfig::default()
        };
        config.redis.url = redis_url.to_string();
        config.chain.backend = "cluster".into();
        config.chain.cluster = Some(cluster.to_path_buf());
        config.chain.client_id = client_id;
        config.chain.client_key =
            Some(cluster.with_file_name(hoard_ledger::cluster::local_client_key_file(client_id)));
        config.events.claim_idle_ms = 1_000;
        config.limits.connection_messages_per_second = 100_000;
        let config_path = dir.join(format!("{instance}.toml"));
        std::fs::write(&config_path, toml::to_string(&config).expect("config serialises")).unwrap();
        GatewayChild {
            config_path,
            ws,
            http,
            process: None,
        }
    }

    /// Starts the process and waits until `/readyz` answers 200 (Redis reachable, follower running).
    async fn start(&mut self) {
        let mut command = Command::new(env!("CARGO_BIN_EXE_hoard"));
        command
            .arg("gateway")
            .arg("--config")
            .arg(&self.config_path)
            .env(
                "RUST_LOG",
                std::env::var("HOARD_GATEWAY_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let mut process = ChildProcess::spawn("hoard gateway", command).expect("spawn hoard gateway");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if http_get(self.http, "/readyz").await.starts_with("HTTP/1.1 200") {
                break;
            }
            assert!(process.running(), "the gateway process exited at start");
            assert!(
                Instant::now() < deadline,
                "the gateway process did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.process = Some(process);
    }

    fn kill9(&mut self) {
        self.process.take().expect("running").kill();
    }

    async fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.stop(Duration::from_secs(10)).await;
        }
    }

    fn url(&self) -> String {
        format!("ws://{}/v1", self.ws)
    }

    async fn ready(&self) -> bool {
        http_get(self.http, "/readyz").await.starts_with("HTTP/1.1 200")
    }

    /// The sum of a metric's series on the process's `/metrics` (0 when absent).
    async fn metric(&self, name: &str) -> f64 {
        let samples = hoard_loadtest::sys::scrape(self.http)
            .await
            .expect("the gateway serves /metrics");
        hoard_loadtest::sys::sum(&samples, name)
    }
}

/// SIGSTOP (`false`) or SIGCONT (`true`) to every replica: a chain that stalls (nothing commits;
/// the gateway's requests wait in the replicas' sockets), then goes on.
fn set_replicas_running(stack: &Stack, running: bool) {
    let signal = if running { "-CONT" } else { "-STOP" };
    let pids: Vec<String> = stack
        .replicas
        .iter()
        .map(|r| r.process.pid().expect("replica running").to_string())
        .collect();
    let status = Command::new("kill")
        .arg(signal)
        .args(&pids)
        .status()
        .expect("kill");
    assert!(status.success(), "kill {signal} {pids:?} failed");
}

/// How many stream entries are pending (delivered, not acknowledged) for `consumer` in the
/// gateways' consumer group (XPENDING through redis-cli).
fn pending_entries(redis: &RedisServer, consumer: &str) -> usize {
    let config = GatewayConfig::default();
    let output = Command::new(Path::new(REDIS_SERVER_PATH).with_file_name("redis-cli"))
        .args(["-p", &redis.port().to_string(), "XPENDING"])
        .args([&config.redis.stream, &config.redis.group])
        .args(["-", "+", "1000000", consumer])
        .stdin(Stdio::null())
        .output()
        .expect("redis-cli runs");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && !text.starts_with("ERR"),
        "XPENDING failed: {text} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Each entry prints as its id, consumer, idle time and delivery count, one per line.
    text.lines().filter(|line| line.trim() == consumer).count()
}

async fn http_get(address: SocketAddr, path: &str) -> String {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        Some(response)
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// The replicas of a fresh local cluster, from the shared stack code; its in-process gateway
/// is stopped at once (the gateway under test is a process of its own).
async fn replicas() -> Stack {
    let mut options = StackOptions::new(PathBuf::from(env!("CARGO_BIN_EXE_hoard")));
    options.redis_aof = false;
    let mut stack = Stack::start(options).await.expect("replicas start");
    stack.gateway.take().expect("in-process gateway").abort();
    stack
}

fn studio_key() -> Keypair {
    Keypair::from_seed(DEMO_STUDIO_SEED)
}

async fn connect(url: &str) -> Client {
    let options = ClientOptions::new()
        .reconnect(ReconnectPolicy {
            initial_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(400),
            max_attempts: None,
        })
        .status_poll_after(Duration::from_secs(2))
        .request_timeout(Duration::from_secs(30));
    Client::connect_with(url, Credentials::studio(TENANT, studio_key()), options)
        .await
        .expect("the SDK connects")
}

fn gold(amount: u128) -> Grant {
    Grant::Currency {
        currency: CurrencyId::new("GOLD"),
        amount: Amount(amount),
    }
}

/// What the load saw.
#[derive(Default)]
struct Ledgerbook {
    submitted: Mutex<Vec<EventId>>,
    accepted: Mutex<HashSet<EventId>>,
    resolved: Mutex<HashMap<EventId, hoard_sdk::Result<Committed>>>,
}

impl Ledgerbook {
    fn submitted(&self) -> usize {
        self.submitted.lock().unwrap().len()
    }
    fn resolved(&self) -> usize {
        self.resolved.lock().unwrap().len()
    }
    fn committed_ok(&self) -> usize {
        self.resolved
            .lock()
            .unwrap()
            .values()
            .filter(|r| r.is_ok())
            .count()
    }
    /// Accepted but not resolved yet: the events a crash puts in doubt.
    fn doubted(&self) -> HashSet<EventId> {
        let resolved = self.resolved.lock().unwrap();
        self.accepted
            .lock()
            .unwrap()
            .iter()
            .filter(|e| !resolved.contains_key(e))
            .copied()
            .collect()
    }
    fn in_doubt(&self) -> usize {
        self.doubted().len()
    }
}

/// Steady load: each client mints 1 GOLD to `to` every `1/MINTS_PER_SECOND_PER_CLIENT` s, each
/// with a fresh random event id, until `stop`; a task per event records `accepted` and the outcome.
fn start_load(
    clients: &[Client],
    to: hoard_sdk::PublicKey,
    book: Arc<Ledgerbook>,
    stop: Arc<AtomicBool>,
    clicks_sent: Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<()>> {
    clients
        .iter()
        .cloned()
        .map(|client| {
            let (book, stop, clicks_sent) = (book.clone(), stop.clone(), clicks_sent.clone());
            tokio::spawn(async move {
                let mut ticker =
                    tokio::time::interval(Duration::from_millis(1_000 / MINTS_PER_SECOND_PER_CLIENT));
                while !stop.load(Ordering::Relaxed) {
                    ticker.tick().await;
                    if client.click(&to, "gold", 3).is_ok() {
                        clicks_sent.fetch_add(3, Ordering::Relaxed);
                    }
                    let mut handle = client.mint(to, gold(1)).await.expect("the SDK takes the event");
                    let event_id = handle.event_id();
                    book.submitted.lock().unwrap().push(event_id);
                    let book = book.clone();
                    tokio::spawn(async move {
                        if handle.accepted().await.is_ok() {
                            book.accepted.lock().unwrap().insert(event_id);
                        }
                        let result = handle.committed().await;
                        book.resolved.lock().unwrap().insert(event_id, result);
                    });
                }
            })
        })
        .collect()
}

async fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The SDK clients, their load tasks, the flag that stops them and what they saw.
struct Load {
    clients: Vec<Client>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    book: Arc<Ledgerbook>,
}

/// Pauses the chain and waits until at least [`MIN_IN_DOUBT`] accepted events wait for it.
async fn stall_chain_until_in_doubt(stack: &Stack, book: &Ledgerbook) {
    set_replicas_running(stack, false);
    let deadline = Instant::now() + IN_DOUBT_TIMEOUT;
    while book.in_doubt() < MIN_IN_DOUBT {
        assert!(
            Instant::now() < deadline,
            "with the chain paused, fewer than {MIN_IN_DOUBT} accepted events were in doubt after \
             {IN_DOUBT_TIMEOUT:?} ({} in doubt, {} submitted): is the load running?",
            book.in_doubt(),
            book.submitted()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn wait_progress(book: &Ledgerbook, what: &str, events: usize) {
    let before = book.committed_ok();
    wait_for(what, Duration::from_secs(30), || {
        book.committed_ok() >= before + events
    })
    .await;
}

/// Stops the load, waits for every submitted event to resolve, and checks that each committed
/// exactly once (through the gateway, then in replica 0's own store). Returns the event count.
async fn stop_and_check(
    stack: Stack,
    gateway: &mut GatewayChild,
    load: Load,
    alice: hoard_sdk::PublicKey,
    gateway_restarted: bool,
) -> usize {
    let Load {
        clients,
        tasks: load,
        stop,
        book,
    } = load;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    let submitted = book.submitted();
    wait_for("every submitted event resolves", SETTLE_TIMEOUT, || {
        book.resolved() == submitted
    })
    .await;
    for client in &clients {
        assert!(
            client.reconnect_count() >= u64::from(gateway_restarted),
            "the SDK reconnected to the new gateway process"
        );
    }
    let resolved = std::mem::take(&mut *book.resolved.lock().unwrap());
    for (event_id, result) in &resolved {
        match result {
            Ok(committed) => assert_eq!(committed.outcome, Outcome::Applied, "{event_id:?}"),
            Err(error) => panic!("event {event_id:?} did not commit: {error}"),
        }
    }
    let accepted = book.accepted.lock().unwrap().clone();
    assert!(
        accepted.iter().all(|e| resolved.contains_key(e)),
        "every accepted event resolved"
    );
    let ids: HashSet<EventId> = book.submitted.lock().unwrap().iter().copied().collect();
    assert_eq!(ids.len(), submitted, "event ids are distinct");

    // Through the gateway: each event committed (once: one outcome, one height), the balance is
    // the number of events (a second application would add 1 more).
    let client = &clients[0];
    for event_id in &ids {
        let status = client.event_status(*event_id).await.expect("event_status");
        assert_eq!(status.state, EventState::Committed, "{event_id:?}");
        assert_eq!(status.outcome, Some(Outcome::Applied));
        assert_eq!(
            Some(status.height.expect("a height")),
            resolved[event_id].as_ref().ok().map(|c| c.height),
            "the status and the push name the same single commit"
        );
    }
    let balance = client
        .balances(alice)
        .await
        .expect("balances")
        .of(&CurrencyId::new("GOLD"));
    assert_eq!(
        balance,
        Amount(submitted as u128),
        "each event applied exactly once"
    );
    let height = client.head().await.expect("head").height;
    for client in clients {
        client.close().await.expect("every click acknowledged at close");
    }
    gateway.stop().await;

    // On the chain itself: replica 0's store, rebuilt after the replicas stop.
    let mut stack = stack;
    let deadline = Instant::now() + Duration::from_secs(20);
    for replica in &stack.replicas {
        loop {
            let samples = hoard_loadtest::sys::scrape(replica.metrics)
                .await
                .unwrap_or_default();
            if hoard_loadtest::sys::max(&samples, "hoard_replica_height").unwrap_or(0.0) as u64 >= height
                || Instant::now() > deadline
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for replica in &mut stack.replicas {
        replica.process.stop(Duration::from_secs(10)).await;
    }
    let ledger =
        hoard_ledger::node::inspect(&stack.replicas[0].data_dir, &stack.genesis).expect("replica 0's state");
    ledger.check_invariants().expect("supply conserved");
    assert_eq!(
        ledger.balance(TENANT, &CurrencyId::new("GOLD"), &alice),
        Amount(submitted as u128),
        "replica 0 applied each event exactly once"
    );
    for event_id in &ids {
        assert!(
            matches!(ledger.event(TENANT, event_id), Some((_, Outcome::Applied))),
            "{event_id:?} on the chain"
        );
    }
    stack.abort().await;
    submitted
}

async fn setup(client: &Client) -> hoard_sdk::PublicKey {
    let alice = hoard_sdk::keys::generate().public();
    let define = client
        .define_currency(CurrencyId::new("GOLD"), 0, Amount(u128::MAX))
        .await
        .unwrap();
    define.committed().await.expect("GOLD defined");
    let register = client.register_account(alice, Custody::Custodial).await.unwrap();
    register.committed().await.expect("alice registered");
    alice
}

/// A `hoard gateway` process on `redis` and the cluster of `stack`, CLIENTS SDK clients
/// connected to it, and alice registered (the directory holds the gateway's files).
async fn start_gateway_and_clients(
    stack: &Stack,
    redis: &RedisServer,
) -> (tempfile::TempDir, GatewayChild, Vec<Client>, hoard_sdk::PublicKey) {
    let dir = tempfile::tempdir().unwrap();
    let mut gateway = GatewayChild::configure(
        dir.path(),
        &stack.dir.join("cluster/cluster.toml"),
        &redis.url(),
        FIRST_INSTANCE,
        3,
    );
    gateway.start().await;
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(connect(&gateway.url()).await);
    }
    let alice = setup(&clients[0]).await;
    (dir, gateway, clients, alice)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_commits_exactly_once_across_a_kill_9_of_the_gateway_process() {
    let started = Instant::now();
    let stack = replicas().await;
    let redis = RedisServer::start();
    let (dir, mut gateway, clients, alice) = start_gateway_and_clients(&stack, &redis).await;

    let book = Arc::new(Ledgerbook::default());
    let stop = Arc::new(AtomicBool::new(false));
    let load = start_load(&clients, alice, book.clone(), stop.clone(), Arc::default());
    wait_progress(&book, "before the kill", 40).await;

    // The kill comes while the chain is paused and at least MIN_IN_DOUBT accepted events wait
    // for it. Nothing commits until the replicas resume, so these stay in doubt.
    stall_chain_until_in_doubt(&stack, &book).await;
    gateway.kill9();
    let doubted = book.doubted();
    let unresolved = book.submitted() - book.resolved();
    // The dead gateway's entries: only an XAUTOCLAIM takes them off its consumer.
    let dead_pending = pending_entries(&redis, FIRST_INSTANCE);
    set_replicas_running(&stack, true);
    eprintln!(
        "killed the gateway with {unresolved} events unresolved, {} of them accepted; {dead_pending} \
         stream entries pending for it",
        doubted.len()
    );
    assert!(
        doubted.len() >= MIN_IN_DOUBT,
        "only {} accepted events in doubt at the kill",
        doubted.len()
    );
    assert!(dead_pending > 0, "no stream entry pending for the killed gateway");

    // A second gateway (another consumer, chain client and addresses) takes over. The SDK
    // clients only know the dead gateway's address, so they resend nothing meanwhile. The events
    // in doubt may commit from the dead gateway's own requests, still queued at the paused
    // replicas; what proves the claim path is that the dead consumer's entries leave its pending
    // list (only XAUTOCLAIM moves them), that the second gateway counts them claimed, and that it
    // acknowledges them all.
    let mut second = loop {
        let second = GatewayChild::configure(
            dir.path(),
            &stack.dir.join("cluster/cluster.toml"),
            &redis.url(),
            SECOND_INSTANCE,
            4,
        );
        if second.ws != gateway.ws && second.http != gateway.http {
            break second;
        }
    };
    second.start().await;
    let observer = connect(&second.url()).await;
    let deadline = Instant::now() + CLAIM_TIMEOUT;
    let mut open = doubted.clone();
    let claimed = loop {
        let mut still_open = HashSet::new();
        for event_id in &open {
            let status = observer.event_status(*event_id).await.expect("event_status");
            if status.state != EventState::Committed {
                still_open.insert(*event_id);
            }
        }
        open = still_open;
        let dead_left = pending_entries(&redis, FIRST_INSTANCE);
        let second_left = pending_entries(&redis, SECOND_INSTANCE);
        let claimed = second.metric(EVENTS_CLAIMED_TOTAL).await as usize;
        if open.is_empty() && dead_left == 0 && second_left == 0 && claimed >= dead_pending {
            break claimed;
        }
        assert!(
            Instant::now() < deadline,
            "after {CLAIM_TIMEOUT:?} the second gateway has claimed {claimed} entries of the dead \
             one's {dead_pending}; {dead_left} still pending for the dead gateway, {second_left} \
             for the second; {} of the {} events in doubt not committed",
            open.len(),
            doubted.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for client in &clients {
        assert_eq!(
            client.reconnect_count(),
            0,
            "an SDK client reached a gateway while the first one was down"
        );
    }
    observer.close().await.expect("the observer closes");
    second.stop().await;

    // The first gateway again, on its address and consumer name: the SDK clients reconnect and
    // resend what they have not seen committed (answered from the ledger: committed already).
    gateway.start().await;
    wait_progress(&book, "after the restart", 40).await;
    let load = Load {
        clients,
        tasks: load,
        stop,
        book,
    };
    let events = stop_and_check(stack, &mut gateway, load, alice, true).await;
    eprintln!(
        "RESULT kill9: in_doubt={} dead_pending={dead_pending} claimed={claimed}; {events} events \
         committed exactly once in {:?}",
        doubted.len(),
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_commits_exactly_once_when_redis_restarts_empty_under_load() {
    let started = Instant::now();
    let stack = replicas().await;
    let mut redis = RedisServer::start();
    let (_dir, mut gateway, clients, alice) = start_gateway_and_clients(&stack, &redis).await;

    let book = Arc::new(Ledgerbook::default());
    let stop = Arc::new(AtomicBool::new(false));
    let clicks_sent = Arc::new(AtomicU64::new(0));
    let load = start_load(&clients, alice, book.clone(), stop.clone(), clicks_sent.clone());
    wait_progress(&book, "before Redis dies", 40).await;

    // Redis dies with the stream (accepted, uncommitted entries), the consumer group and the
    // click totals, while the chain is paused and at least MIN_IN_DOUBT accepted events wait for
    // it; a fresh, empty one takes its port while the load goes on.
    stall_chain_until_in_doubt(&stack, &book).await;
    let in_doubt = book.in_doubt();
    redis.kill();
    eprintln!("killed redis-server with {in_doubt} accepted events not committed");
    assert!(
        in_doubt >= MIN_IN_DOUBT,
        "only {in_doubt} accepted events in doubt when Redis died"
    );
    // The gateway notices (not ready) ...
    let deadline = Instant::now() + Duration::from_secs(10);
    while gateway.ready().await {
        assert!(
            Instant::now() < deadline,
            "the gateway stayed ready without Redis"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    redis.restart_empty();
    let clicks_at_restart = clicks_sent.load(Ordering::Relaxed);
    // ... and is ready again only once it found its marker key gone, created the consumer group
    // again and forgot the events in flight. Only then does the chain go on: the commits of the
    // events in doubt reach the gateway after it forgot them, so the SDK learns of each through
    // its own status check or resend, not through the gateway's `committed` push.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gateway.ready().await {
        assert!(
            Instant::now() < deadline,
            "the gateway did not get ready on the new Redis"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    set_replicas_running(&stack, true);
    wait_progress(&book, "after Redis restarted", 40).await;
    stop.store(true, Ordering::Relaxed);

    // Clicks: what the old Redis held is gone (no persistence: PROTOCOL.md, 4.2); the new one
    // holds every click absorbed since, and never one twice.
    for client in &clients {
        client.flush_clicks().await.expect("clicks acknowledged");
    }
    let sent = clicks_sent.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(10);
    let counted = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let counted = clients[0]
            .counter("gold", Some(alice))
            .await
            .expect("counter")
            .player_total
            .unwrap_or(0);
        if counted >= sent - clicks_at_restart || Instant::now() > deadline {
            break counted;
        }
    };
    assert!(counted <= sent, "clicks counted twice: {counted} of {sent} sent");
    assert!(
        counted >= sent - clicks_at_restart,
        "clicks absorbed after the restart were lost: {counted} counted, {} sent since",
        sent - clicks_at_restart
    );
    let load = Load {
        clients,
        tasks: load,
        stop,
        book,
    };
    let events = stop_and_check(stack, &mut gateway, load, alice, false).await;
    eprintln!(
        "RESULT redis: in_doubt={in_doubt}; {events} events committed exactly once, {counted} of \
         {sent} clicks counted, in {:?}",
        started.elapsed()
    );
}
