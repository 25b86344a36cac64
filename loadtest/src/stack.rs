//! The whole Hoard stack on one machine, started by one call: a 4-replica PBFT cluster (each
//! replica a child process `<program> node --config replica-<i>.toml`, because each process can
//! hold only one metrics recorder), a private `redis-server` (or, when [`StackStore`] says so,
//! the gateway's embedded in-memory store instead), and the gateway in this process,
//! connected to the cluster through [`ClusterChain`]. `hoard demo`, `hoard dev` and
//! `hoard-loadtest` all start it through [`Stack::start`].
//!
//! Children are started in their own process group (a Ctrl-C reaches only this process, which
//! then stops them in order) with `PR_SET_PDEATHSIG` (they die with this process even if it is
//! killed), and are killed on drop.
//!
//! [`Stack::finish`] is the end check: it drains the gateway, waits for every replica to reach
//! the gateway's height, stops the replicas gracefully, then opens each replica's store, rebuilds
//! its state from snapshot and block log, and compares the state roots (with each other and with
//! the gateway's follower) and checks the ledger's invariants (supply conserved) on each.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use hoard_ledger::cluster::{local_client_key_file, write_local_cluster, Cluster, NodeConfig};
use hoard_ledger::Genesis;
use hoard_server::chain::ClusterChain;
use hoard_server::config::{demo_genesis, GatewayConfig, StoreBackend, DEMO_STUDIO_SEED};
use hoard_server::{Chain, Gateway};
use hoard_types::{Hash, Keypair, TenantId};

/// How long a replica gets to stop after SIGTERM before it is killed.
pub const REPLICA_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the replicas get to start answering on their metrics port.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Well-known places of the Redis binary, before `$PATH` is searched.
pub const REDIS_SERVER_PATHS: &[&str] = &["/usr/bin/redis-server", "/usr/local/bin/redis-server"];
/// Environment variable naming the redis-server binary to use (when set, nothing else is tried).
pub const REDIS_SERVER_ENV: &str = "HOARD_REDIS_SERVER";

/// Where the stack's gateway keeps clicks and the event stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StackStore {
    /// A private redis-server; an error if none is installed (benchmarks: real figures only).
    Redis,
    /// The gateway's embedded in-memory store (not durable), no redis-server.
    Embedded,
    /// A private redis-server if one is installed, else the embedded store (`hoard demo`, `hoard dev`).
    Auto,
}

impl StackStore {
    /// What to start: a redis-server (its binary) or nothing (the embedded store).
    pub fn resolve(self, found: Option<PathBuf>) -> anyhow::Result<Option<PathBuf>> {
        match (self, found) {
            (StackStore::Embedded, _) | (StackStore::Auto, None) => Ok(None),
            (StackStore::Redis | StackStore::Auto, Some(binary)) => Ok(Some(binary)),
            (StackStore::Redis, None) => bail!(
                "redis-server is required and was not found (tried ${REDIS_SERVER_ENV}, {REDIS_SERVER_PATHS:?} \
                 and $PATH); install it (Debian: apt-get install redis-server; scripts/test installs it), \
                 or use the gateway's embedded in-memory store (not durable)"
            ),
        }
    }
}

/// What to start.
#[derive(Clone, Debug)]
pub struct StackOptions {
    /// A program that runs a replica with `node --config <file>` (`hoard` or `hoard-loadtest`).
    pub node_program: PathBuf,
    pub replicas: usize,
    /// Where the cluster files, replica data and Redis files go (None: a temporary directory,
    /// removed at the end). A given directory is kept.
    pub data_dir: Option<PathBuf>,
    /// The gateway's WebSocket address (port 0: a free port).
    pub gateway_listen: SocketAddr,
    /// The gateway's HTTP (metrics) address (port 0: a free port).
    pub gateway_http_listen: SocketAddr,
    /// Automatic click settlement every so often (0: off; the simulator settles explicitly).
    pub settle_interval_ms: u64,
    /// Redis or the embedded store ([`StackOptions::new`]: Redis).
    pub store: StackStore,
    /// Redis appends to its AOF, fsync every second (else no persistence at all).
    pub redis_aof: bool,
    /// Show the children's logs on this process's stderr.
    pub children_logs: bool,
    /// Run the gateway as a child process (`<node_program> gateway ...`) instead of in this
    /// process: its memory and CPU are then its own (the idle-connection benchmark needs that),
    /// and it gets its own open-files limit.
    pub gateway_process: bool,
    /// The gateway batcher's transactions per chain request (`events.batch_max`; None: default).
    pub events_batch_max: Option<usize>,
}

impl StackOptions {
    pub fn new(node_program: PathBuf) -> StackOptions {
        StackOptions {
            node_program,
            replicas: 4,
            data_dir: None,
            gateway_listen: "127.0.0.1:0".parse().expect("literal"),
            gateway_http_listen: "127.0.0.1:0".parse().expect("literal"),
            settle_interval_ms: 0,
            store: StackStore::Redis,
            redis_aof: true,
            children_logs: false,
            gateway_process: false,
            events_batch_max: None,
        }
    }
}

/// One child process, killed on drop.
pub struct ChildProcess {
    pub name: String,
    child: Option<Child>,
}

impl ChildProcess {
    /// Spawns `command` in its own process group, to die with this process.
    pub fn spawn(name: &str, mut command: Command) -> anyhow::Result<ChildProcess> {
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: only async-signal-safe calls (setpgid, prctl) between fork and exec.
            unsafe {
                command.pre_exec(|| {
                    libc::setpgid(0, 0);
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {name} ({command:?})"))?;
        Ok(ChildProcess {
            name: name.to_string(),
            child: Some(child),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// SIGTERM, then SIGKILL after `timeout`. Returns whether it exited by itself with status 0.
    pub async fn stop(&mut self, timeout: Duration) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return status.success(),
                Ok(None) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
                _ => {
                    tracing::warn!(name = %self.name, "did not stop in time: killed");
                    let _ = child.kill();
                    let _ = child.wait();
                    return false;
                }
            }
        }
    }

    /// SIGKILL now.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The `redis-server` binary: the one `$HOARD_REDIS_SERVER` names (if it exists), else a
/// well-known path or `$PATH`.
pub fn find_redis_server() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(REDIS_SERVER_ENV) {
        let path = PathBuf::from(path);
        return path.is_file().then_some(path);
    }
    for path in REDIS_SERVER_PATHS {
        if Path::new(path).is_file() {
            return Some(PathBuf::from(path));
        }
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("redis-server"))
            .find(|candidate| candidate.is_file())
    })
}

/// A private redis-server on a free loopback port.
pub struct RedisProcess {
    pub process: ChildProcess,
    pub port: u16,
}

impl RedisProcess {
    /// Starts redis-server with its files in `dir` and waits until it answers PING.
    pub async fn start(dir: &Path, aof: bool, logs: bool) -> anyhow::Result<RedisProcess> {
        let binary = StackStore::Redis
            .resolve(find_redis_server())?
            .expect("Redis resolves to a binary");
        RedisProcess::start_binary(&binary, dir, aof, logs).await
    }

    /// Starts `binary` as redis-server with its files in `dir` and waits until it answers PING.
    pub async fn start_binary(
        binary: &Path,
        dir: &Path,
        aof: bool,
        logs: bool,
    ) -> anyhow::Result<RedisProcess> {
        std::fs::create_dir_all(dir)?;
        for _attempt in 0..5 {
            let port = hoard_ledger::testing::free_port();
            let mut command = Command::new(binary);
            command
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
                .args(["--appendonly", if aof { "yes" } else { "no" }])
                .args(["--appendfsync", "everysec", "--protected-mode", "yes"])
                .arg("--dir")
                .arg(dir)
                .stdin(Stdio::null())
                .stdout(if logs { Stdio::inherit() } else { Stdio::null() })
                .stderr(if logs { Stdio::inherit() } else { Stdio::null() });
            let mut process = ChildProcess::spawn("redis-server", command)?;
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && process.running() {
                if ping(port).await {
                    return Ok(RedisProcess { process, port });
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            process.kill();
        }
        bail!("redis-server did not start")
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

async fn ping(port: u16) -> bool {
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    if stream.write_all(b"PING\r\n").await.is_err() {
        return false;
    }
    let mut answer = [0u8; 7];
    matches!(
        tokio::time::timeout(Duration::from_secs(1), stream.read_exact(&mut answer)).await,
        Ok(Ok(_))
    ) && &answer == b"+PONG\r\n"
}

/// The chain clients a stack's cluster file lists (ids 1, 2, ...; key files
/// `cluster/client-<id>.key`): the gateway is [`GATEWAY_CLIENT`], the benchmark's own chain
/// client [`BENCH_CLIENT`]; 3 and 4 are for more gateways (tests start them).
pub const STACK_CLIENTS: usize = 4;
/// The gateway's client id towards a stack's replicas.
pub const GATEWAY_CLIENT: u64 = 1;
/// The client id `hoard-loadtest bench` measures the chain alone with.
pub const BENCH_CLIENT: u64 = 2;

/// How many times [`Stack::start`] starts the replicas on fresh ports before it gives up.
const REPLICA_START_ATTEMPTS: u32 = 3;

/// Writes a cluster of `options.replicas` on free ports into `cluster_dir` and starts one
/// replica process per member. Returns once every replica serves `/metrics`, accepts on its
/// consensus port and still runs; on error, the replicas started are killed (dropped).
async fn start_replicas(
    options: &StackOptions,
    cluster_dir: &Path,
    genesis: &Genesis,
) -> anyhow::Result<(Cluster, Vec<ReplicaProcess>)> {
    let keys: Vec<Keypair> = (0..options.replicas).map(|_| Keypair::generate()).collect();
    let addresses: Vec<(SocketAddr, Option<SocketAddr>)> = (0..options.replicas)
        .map(|_| {
            (
                SocketAddr::from(([127, 0, 0, 1], hoard_ledger::testing::free_port())),
                Some(SocketAddr::from((
                    [127, 0, 0, 1],
                    hoard_ledger::testing::free_port(),
                ))),
            )
        })
        .collect();
    let clients: Vec<Keypair> = (0..STACK_CLIENTS).map(|_| Keypair::generate()).collect();
    let cluster = write_local_cluster(cluster_dir, genesis, &addresses, &keys, &clients)?;
    let mut replicas = Vec::new();
    for (id, (address, metrics)) in addresses.iter().enumerate() {
        let config = cluster_dir.join(format!("replica-{id}.toml"));
        let node = NodeConfig::load(&config)?;
        let mut command = Command::new(&options.node_program);
        command
            .arg("node")
            .arg("--config")
            .arg(&config)
            .env(
                "RUST_LOG",
                std::env::var("HOARD_NODE_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(if options.children_logs {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::inherit());
        replicas.push(ReplicaProcess {
            id,
            process: ChildProcess::spawn(&format!("replica {id}"), command)?,
            address: *address,
            metrics: metrics.expect("set above"),
            data_dir: node.data_dir,
        });
    }
    // Ready: `/metrics` answers (installed first thing) and the consensus port accepts (bound
    // after recovery). Then every replica must still run: one that lost its port exits.
    let deadline = Instant::now() + START_TIMEOUT;
    for replica in &mut replicas {
        loop {
            if crate::sys::scrape(replica.metrics).await.is_ok()
                && tokio::net::TcpStream::connect(replica.address).await.is_ok()
            {
                break;
            }
            if !replica.process.running() {
                bail!("replica {} exited at start (see its log above)", replica.id);
            }
            if Instant::now() > deadline {
                bail!("replica {} did not start in {START_TIMEOUT:?}", replica.id);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    for replica in &mut replicas {
        if !replica.process.running() {
            bail!("replica {} exited at start (see its log above)", replica.id);
        }
    }
    Ok((cluster, replicas))
}

/// One replica as the stack started it.
pub struct ReplicaProcess {
    pub id: usize,
    pub process: ChildProcess,
    pub address: SocketAddr,
    pub metrics: SocketAddr,
    pub data_dir: PathBuf,
}

/// A running stack.
pub struct Stack {
    pub dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
    pub genesis: Genesis,
    pub replicas: Vec<ReplicaProcess>,
    /// The private redis-server (None: the gateway uses its embedded store).
    pub redis: Option<RedisProcess>,
    pub gateway: Option<Gateway>,
    /// The gateway as a child process ([`StackOptions::gateway_process`]).
    pub gateway_process: Option<crate::gateway_process::GatewayProcess>,
    /// The tenant the simulated players and `hoard dev` use.
    pub tenant: TenantId,
    /// Its studio key (the public demo key: for local use only).
    pub studio: Keypair,
}

/// What [`Stack::finish`] found.
#[derive(Clone, Debug)]
pub struct EndCheck {
    /// Per replica: (height, state root) rebuilt from its store.
    pub replicas: Vec<(u64, Hash)>,
    /// The gateway follower's (height, state root) before it stopped.
    pub gateway: (u64, Hash),
    /// Every replica at the same height with the same root as the others and the gateway.
    pub roots_agree: bool,
    /// `Ledger::check_invariants` passed on every replica's state.
    pub invariants_hold: bool,
    /// Human-readable lines, one per finding.
    pub lines: Vec<String>,
}

impl EndCheck {
    pub fn ok(&self) -> bool {
        self.roots_agree && self.invariants_hold
    }
}

impl Stack {
    /// Starts replicas, Redis and the gateway; returns once the gateway answers.
    pub async fn start(options: StackOptions) -> anyhow::Result<Stack> {
        anyhow::ensure!(
            options.replicas >= 4 && (options.replicas - 1).is_multiple_of(3),
            "replicas must be 3f+1 with f >= 1"
        );
        let (dir, temp) = match &options.data_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)?;
                (dir.clone(), None)
            }
            None => {
                let temp = tempfile::Builder::new().prefix("hoard-demo-").tempdir()?;
                (temp.path().to_path_buf(), Some(temp))
            }
        };
        // Redis first: it fails fast with a clear message when missing.
        let redis = match options.store.resolve(find_redis_server())? {
            Some(binary) => Some(
                RedisProcess::start_binary(
                    &binary,
                    &dir.join("redis"),
                    options.redis_aof,
                    options.children_logs,
                )
                .await?,
            ),
            None => None,
        };

        let genesis = demo_genesis();
        let cluster_dir = dir.join("cluster");
        // A port picked free can be taken by another process before the replica binds it
        // (the replica then exits at start): start the whole cluster again on fresh ports.
        let mut attempt = 1;
        let (cluster, replicas) = loop {
            match start_replicas(&options, &cluster_dir, &genesis).await {
                Ok(started) => break started,
                Err(error) if attempt < REPLICA_START_ATTEMPTS => {
                    tracing::warn!(%error, attempt, "replicas did not start: again on fresh ports");
                    std::fs::remove_dir_all(&cluster_dir)?;
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        };

        let mut config = gateway_config(&options, redis.as_ref().map(|r| r.url()).unwrap_or_default());
        if redis.is_none() {
            config.store = StoreBackend::Embedded;
        }
        config.chain.backend = "cluster".into();
        config.chain.cluster = Some(cluster_dir.join("cluster.toml"));
        config.chain.client_id = GATEWAY_CLIENT;
        config.chain.client_key = Some(cluster_dir.join(local_client_key_file(GATEWAY_CLIENT)));
        let (gateway, gateway_process) = if options.gateway_process {
            let process = crate::gateway_process::GatewayProcess::start(
                &options.node_program,
                &dir,
                &cluster_dir.join("cluster.toml"),
                &config,
                options.children_logs,
            )
            .await?;
            (None, Some(process))
        } else {
            let chain: Arc<dyn Chain> = Arc::new(ClusterChain::connect_configured(&cluster, &config.chain)?);
            let gateway = Gateway::start(config, chain, &genesis)
                .await
                .context("starting the gateway")?;
            (Some(gateway), None)
        };
        Ok(Stack {
            dir,
            _temp: temp,
            genesis,
            replicas,
            redis,
            gateway,
            gateway_process,
            tenant: TenantId(1),
            studio: Keypair::from_seed(DEMO_STUDIO_SEED),
        })
    }

    /// The in-process gateway (panics when the gateway runs as a child process).
    pub fn gateway(&self) -> &Gateway {
        self.gateway.as_ref().expect("gateway running in this process")
    }

    /// `ws://127.0.0.1:port/v1`.
    pub fn ws_url(&self) -> String {
        match &self.gateway_process {
            Some(process) => process.ws_url(),
            None => self.gateway().ws_url(),
        }
    }

    /// The gateway's `/metrics` address.
    pub fn gateway_metrics(&self) -> SocketAddr {
        match &self.gateway_process {
            Some(process) => process.http,
            None => self.gateway().http_addr(),
        }
    }

    /// The gateway's process id (this process when the gateway runs in it).
    pub fn gateway_pid(&self) -> Option<u32> {
        match &self.gateway_process {
            Some(process) => process.process.pid(),
            None => Some(std::process::id()),
        }
    }

    /// The gateway follower's committed height (0 when the gateway runs as a child process: see
    /// [`Stack::chain_height`]).
    pub fn height(&self) -> u64 {
        self.gateway
            .as_ref()
            .map(|g| g.shared().view.height())
            .unwrap_or(0)
    }

    /// The gateway follower's committed height, read from its `/metrics` when it runs as a
    /// child process.
    pub async fn chain_height(&self) -> u64 {
        match &self.gateway_process {
            Some(process) => process.chain_height().await,
            None => self.height(),
        }
    }

    /// Resident memory of the gateway's process (this process, with the load generator, unless
    /// the gateway runs as a child) and of each replica, in bytes.
    pub fn memory(&self) -> (u64, Vec<u64>) {
        let gateway = self.gateway_pid().and_then(crate::sys::rss_bytes).unwrap_or(0);
        let replicas = self
            .replicas
            .iter()
            .map(|r| r.process.pid().and_then(crate::sys::rss_bytes).unwrap_or(0))
            .collect();
        (gateway, replicas)
    }

    /// Drains and stops the gateway, stops the replicas gracefully, rebuilds each replica's
    /// state from its store and compares roots and invariants. Stops Redis.
    pub async fn finish(mut self) -> anyhow::Result<EndCheck> {
        // The gateway follower's (height, root); only the height when it is a child process.
        let gateway_state: (u64, Option<Hash>) = if let Some(mut process) = self.gateway_process.take() {
            let height = process.drain().await;
            process.process.stop(Duration::from_secs(20)).await;
            (height, None)
        } else {
            let gateway = self.gateway.take().expect("gateway running");
            // Drain: accepted events reach the chain first.
            let deadline = Instant::now() + Duration::from_secs(20);
            while gateway.shared().events.in_flight() > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let state = gateway
                .shared()
                .view
                .read(|ledger| (ledger.height(), ledger.state_root()));
            gateway.shutdown().await;
            (state.0, Some(state.1))
        };

        // Every replica executes up to the gateway's height before it is stopped.
        let deadline = Instant::now() + Duration::from_secs(20);
        for replica in &self.replicas {
            loop {
                let height = crate::sys::scrape(replica.metrics)
                    .await
                    .ok()
                    .and_then(|s| crate::sys::max(&s, "hoard_replica_height"))
                    .unwrap_or(0.0) as u64;
                if height >= gateway_state.0 || Instant::now() > deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        for replica in &mut self.replicas {
            replica.process.stop(REPLICA_STOP_TIMEOUT).await;
        }
        if let Some(redis) = &mut self.redis {
            redis.process.stop(Duration::from_secs(5)).await;
        }

        let mut lines = Vec::new();
        let mut states = Vec::new();
        let mut invariants_hold = true;
        for replica in &self.replicas {
            let ledger = hoard_ledger::node::inspect(&replica.data_dir, &self.genesis)
                .with_context(|| format!("rebuilding replica {}'s state", replica.id))?;
            let state = (ledger.height(), ledger.state_root());
            lines.push(format!(
                "end check: replica {} height {} state root {}",
                replica.id,
                state.0,
                state.1.to_hex()
            ));
            if let Err(violation) = ledger.check_invariants() {
                invariants_hold = false;
                lines.push(format!(
                    "end check: FAILED: replica {} violates an invariant: {violation}",
                    replica.id
                ));
            }
            states.push(state);
        }
        let first = states[0];
        let replicas_agree = states.iter().all(|s| *s == first);
        let gateway_agrees = match gateway_state.1 {
            Some(root) => first == (gateway_state.0, root),
            // A child-process gateway: only its height is known; replicas may be ahead of it.
            None => first.0 >= gateway_state.0,
        };
        let roots_agree = replicas_agree && gateway_agrees;
        if roots_agree {
            lines.push(format!(
                "end check: all {} replicas hold state root {} at height {} ({})",
                states.len(),
                first.1.to_hex(),
                first.0,
                if gateway_state.1.is_some() {
                    "the gateway's follower agrees"
                } else {
                    "the gateway ran as a child process: its root was not compared, its height was reached"
                }
            ));
        } else {
            lines.push(format!(
                "end check: FAILED: state roots differ: replicas {:?}, gateway follower height {} root {}",
                states
                    .iter()
                    .map(|(h, r)| format!("{h}:{}", &r.to_hex()[..16]))
                    .collect::<Vec<_>>(),
                gateway_state.0,
                gateway_state
                    .1
                    .map(|r| r.to_hex())
                    .unwrap_or_else(|| "unknown (child process)".into())
            ));
        }
        if invariants_hold {
            lines.push(
                "end check: supply conserved (Ledger::check_invariants passed on every replica)".to_string(),
            );
        }
        Ok(EndCheck {
            replicas: states,
            gateway: (gateway_state.0, gateway_state.1.unwrap_or(Hash([0; 32]))),
            roots_agree,
            invariants_hold,
            lines,
        })
    }

    /// Stops everything at once (Ctrl-C, failure): no drain, no check.
    pub async fn abort(mut self) {
        if let Some(gateway) = self.gateway.take() {
            gateway.abort();
        }
        if let Some(mut process) = self.gateway_process.take() {
            process.process.kill();
        }
        for replica in &mut self.replicas {
            replica.process.stop(Duration::from_secs(2)).await;
        }
        if let Some(redis) = &mut self.redis {
            redis.process.kill();
        }
    }
}

/// The gateway configuration of a stack (limits raised for load tests; the connection limit
/// allows the idle-connection benchmark's 50,000).
pub fn gateway_config(options: &StackOptions, redis_url: String) -> GatewayConfig {
    let mut config = GatewayConfig {
        listen: options.gateway_listen,
        http_listen: options.gateway_http_listen,
        ..GatewayConfig::default()
    };
    config.redis.url = redis_url;
    config.connections_max = 60_000;
    config.limits.connection_messages_per_second = 100_000;
    config.limits.tenant_messages_per_second = 2_000_000;
    config.limits.tenant_clicks_per_second = 100_000_000;
    config.limits.connection_clicks_per_second = 100_000_000;
    config.events.pending_max = 200_000;
    if let Some(batch_max) = options.events_batch_max {
        config.events.batch_max = batch_max;
    }
    config.drain_timeout_ms = 15_000;
    for tenant in &mut config.tenants {
        tenant.settle_interval_ms = options.settle_interval_ms;
    }
    config
}

/// Runs one replica until SIGTERM or Ctrl-C (what `node --config` does in `hoard` and
/// `hoard-loadtest`).
pub async fn run_node(config: &Path, metrics: Option<SocketAddr>) -> anyhow::Result<()> {
    let config = NodeConfig::load(config).with_context(|| format!("loading {}", config.display()))?;
    if let Some(address) = metrics.or(config.metrics_address()) {
        hoard_ledger::node::install_metrics(address)?;
    }
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop.send(true);
    });
    hoard_ledger::node::run(config, stopped, None).await?;
    Ok(())
}

/// Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_is_a_redis_server_when_installed_else_embedded_unless_redis_is_required() {
        let binary = || Some(PathBuf::from("/usr/bin/redis-server"));
        assert_eq!(StackStore::Auto.resolve(binary()).unwrap(), binary());
        assert_eq!(StackStore::Auto.resolve(None).unwrap(), None);
        assert_eq!(StackStore::Embedded.resolve(binary()).unwrap(), None);
        assert_eq!(StackStore::Redis.resolve(binary()).unwrap(), binary());
        let missing = StackStore::Redis.resolve(None).unwrap_err().to_string();
        assert!(missing.contains("redis-server is required"), "{missing}");
    }
}
