//! A deterministic world of keys and transaction builders, shared by the ledger's tests, its
//! property tests, the benchmark and the simulator (one harness, not four).

use hoard_types::{
    Amount, Asset, ClassId, CurrencyId, Custody, EventId, Grant, Hash, ItemId, Keypair, PublicKey, TenantId,
    Transaction, TxBody, TxPayload,
};

use crate::genesis::{Genesis, GenesisTenant};

/// Keys derived from small seeds, a genesis naming them, and a counter for event ids.
pub struct World {
    pub chain_id: u64,
    pub operator: Keypair,
    /// `(tenant, studio key)` for each genesis tenant.
    pub studios: Vec<(TenantId, Keypair)>,
    /// The expiry height put into every transaction built here.
    pub expires_at: u64,
    /// The genesis cap on a tenant's deduplication window (None: the default).
    pub window_cap: Option<u64>,
    next_event: u128,
}

/// A key from a label (tests name their players: `key("alice", 0)`).
pub fn key(label: &str, index: u64) -> Keypair {
    Keypair::from_seed(Hash::of_parts(&[label.as_bytes(), &index.to_be_bytes()]).0)
}

impl World {
    /// A world with `tenants` studios, tenant ids 1..=tenants.
    pub fn new(tenants: u64) -> World {
        World {
            chain_id: 7,
            operator: key("operator", 0),
            studios: (1..=tenants).map(|t| (TenantId(t), key("studio", t))).collect(),
            expires_at: 50_000,
            window_cap: None,
            next_event: 1,
        }
    }

    pub fn genesis(&self) -> Genesis {
        Genesis {
            chain_id: self.chain_id,
            operator: self.operator.public(),
            tenants: self
                .studios
                .iter()
                .map(|(id, key)| GenesisTenant {
                    id: *id,
                    name: format!("studio-{id}"),
                    studio_key: key.public(),
                })
                .collect(),
            window_events_per_tenant_max: self.window_cap,
        }
    }

    pub fn studio(&self, tenant: TenantId) -> &Keypair {
        &self
            .studios
            .iter()
            .find(|(id, _)| *id == tenant)
            .expect("a genesis tenant")
            .1
    }

    pub fn next_event_id(&mut self) -> EventId {
        self.next_event += 1;
        EventId::from_u128(self.next_event)
    }

    /// A transaction with a fresh event id, signed by `signers`.
    pub fn tx(&mut self, tenant: TenantId, body: TxBody, signers: &[&Keypair]) -> Transaction {
        let event_id = self.next_event_id();
        self.tx_with_id(tenant, event_id, body, signers)
    }

    pub fn tx_with_id(
        &self,
        tenant: TenantId,
        event_id: EventId,
        body: TxBody,
        signers: &[&Keypair],
    ) -> Transaction {
        TxPayload {
            chain_id: self.chain_id,
            tenant,
            event_id,
            expires_at: self.expires_at,
            body,
        }
        .sign(signers)
    }

    /// Studio-signed transaction for `tenant`.
    pub fn studio_tx(&mut self, tenant: TenantId, body: TxBody) -> Transaction {
        let studio = self.studio(tenant).clone();
        self.tx(tenant, body, &[&studio])
    }

    pub fn register(&mut self, tenant: TenantId, account: &PublicKey, custody: Custody) -> Transaction {
        self.studio_tx(
            tenant,
            TxBody::RegisterAccount {
                account: *account,
                custody,
            },
        )
    }

    pub fn define_currency(&mut self, tenant: TenantId, symbol: &str, max_supply: u128) -> Transaction {
        self.studio_tx(
            tenant,
            TxBody::DefineCurrency {
                currency: CurrencyId::new(symbol),
                decimals: 2,
                max_supply: Amount(max_supply),
            },
        )
    }

    pub fn define_class(
        &mut self,
        tenant: TenantId,
        class: &str,
        stackable: bool,
        max_supply: u128,
    ) -> Transaction {
        self.studio_tx(
            tenant,
            TxBody::DefineItemClass {
                class: ClassId::new(class),
                stackable,
                max_supply: Amount(max_supply),
                metadata_hash: Hash::of(class.as_bytes()),
            },
        )
    }

    pub fn mint_currency(
        &mut self,
        tenant: TenantId,
        to: &PublicKey,
        symbol: &str,
        amount: u128,
    ) -> Transaction {
        self.studio_tx(
            tenant,
            TxBody::Mint {
                to: *to,
                grant: Grant::Currency {
                    currency: CurrencyId::new(symbol),
                    amount: Amount(amount),
                },
            },
        )
    }

    pub fn mint_unique(&mut self, tenant: TenantId, to: &PublicKey, class: &str, item: u64) -> Transaction {
        self.studio_tx(
            tenant,
            TxBody::Mint {
                to: *to,
                grant: Grant::Unique {
                    class: ClassId::new(class),
                    item: ItemId(item),
                    attributes_hash: Hash::ZERO,
                },
            },
        )
    }

    pub fn mint_stack(
        &mut self,
        tenant: TenantId,
        to: &PublicKey,
        class: &str,
        item: u64,
        quantity: u128,
    ) -> Transaction {
        self.studio_tx(
            tenant,
            TxBody::Mint {
                to: *to,
                grant: Grant::Stack {
                    class: ClassId::new(class),
                    item: ItemId(item),
                    quantity: Amount(quantity),
                },
            },
        )
    }

    /// A currency transfer signed by `signer` (the owner, or the studio for custodial accounts).
    pub fn transfer(
        &mut self,
        tenant: TenantId,
        signer: &Keypair,
        from: &PublicKey,
        to: &PublicKey,
        symbol: &str,
        amount: u128,
    ) -> Transaction {
        self.tx(
            tenant,
            TxBody::Transfer {
                from: *from,
                to: *to,
                assets: vec![Asset::Currency {
                    currency: CurrencyId::new(symbol),
                    amount: Amount(amount),
                }],
            },
            &[signer],
        )
    }
}

/// `count` distinct event ids (at most 184,320) that the Fx hash (`rustc-hash` 2, the
/// ledger's hash before it was seeded) maps to one value within a tenant: a hash-flooding
/// attack on the deduplication index, which `hoard-ledger-bench --phases h` applies and a unit
/// test checks against the ledger's hash. For 16 bytes Fx computes `fold(lo ^ S1, hi ^ S2)`
/// (a 128-bit product folded to 64 bits) with public constants, so every `(d, Q / d)` for a
/// divisor `d` of one `Q` below 2^64 gives the same product, `Q`: here the highly composite
/// 18,401,055,938,125,660,800 (184,320 divisors).
pub fn fx_colliding_event_ids(count: usize) -> Vec<EventId> {
    const Q: u64 = 18_401_055_938_125_660_800;
    const PRIME_POWERS: [(u64, u32); 13] = [
        (2, 7),
        (3, 4),
        (5, 2),
        (7, 2),
        (11, 1),
        (13, 1),
        (17, 1),
        (19, 1),
        (23, 1),
        (29, 1),
        (31, 1),
        (37, 1),
        (41, 1),
    ];
    // rustc-hash 2.1's seeds for its byte hash.
    const S1: u64 = 0x243f_6a88_85a3_08d3;
    const S2: u64 = 0x1319_8a2e_0370_7344;
    let mut divisors = vec![1u64];
    for (prime, exponent) in PRIME_POWERS {
        let mut more = Vec::with_capacity(divisors.len() * (exponent as usize + 1));
        for &d in &divisors {
            let mut power = 1;
            for _ in 0..=exponent {
                more.push(d * power);
                power *= prime;
            }
        }
        divisors = more;
        if divisors.len() >= count {
            break;
        }
    }
    assert!(divisors.len() >= count, "at most 184,320 colliding ids");
    divisors
        .into_iter()
        .take(count)
        .map(|d| {
            debug_assert_eq!(Q % d, 0);
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&(d ^ S1).to_le_bytes());
            id[8..].copy_from_slice(&((Q / d) ^ S2).to_le_bytes());
            EventId(id)
        })
        .collect()
}

/// A free TCP port on 127.0.0.1 for a server that binds it later: a child process, or a
/// replica whose address goes into a cluster file before it starts.
///
/// `bind(0)` would hand out ports from the kernel's ephemeral range, where every outgoing
/// connection of every concurrent test also takes its local port, and where concurrent
/// `bind(0)` callers collide. So the port is drawn at random below that range
/// (`ip_local_port_range`), checked free by binding it, and never handed out twice by this
/// process. Another process may still take it before the server binds: starters of child
/// processes retry on fresh ports when one exits at start.
pub fn free_port() -> u16 {
    use rand::Rng;
    use std::sync::Mutex;
    static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    const LOW: u16 = 10_000;
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if ephemeral_low > LOW + 1_000 {
        let mut rng = rand::thread_rng();
        for _ in 0..1_000 {
            let port = rng.gen_range(LOW..ephemeral_low);
            if handed_out.contains(&port) {
                continue;
            }
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                handed_out.push(port);
                return port;
            }
        }
    }
    // No room below the ephemeral range: let the kernel choose.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("bind a free port")
        .port();
    handed_out.push(port);
    port
}

/// Replicas running as tasks of this process, on free loopback ports, with their data under
/// one directory. Used by the ledger's, the gateway's and the SDK's tests, and `hoard dev`.
pub struct LocalCluster {
    pub dir: std::path::PathBuf,
    pub cluster: crate::cluster::Cluster,
    pub statuses: Vec<tokio::sync::watch::Receiver<crate::node::NodeStatus>>,
    stops: Vec<Option<tokio::sync::watch::Sender<bool>>>,
    tasks: Vec<Option<tokio::task::JoinHandle<crate::Result<()>>>>,
}

/// The clients a [`LocalCluster`] lists: ids `1..=LOCAL_CLIENTS`, keys [`client_key`].
pub const LOCAL_CLIENTS: u64 = 8;

/// The key of client `id` of a [`LocalCluster`] (deterministic; also in `dir/client-<id>.key`).
pub fn client_key(id: u64) -> Keypair {
    key("client", id)
}

impl LocalCluster {
    /// A client of these replicas as client `id` (`1..=LOCAL_CLIENTS`).
    pub fn client(&self, id: u64) -> crate::client::ChainClient {
        assert!(
            (1..=LOCAL_CLIENTS).contains(&id),
            "a local cluster lists clients 1..={LOCAL_CLIENTS}"
        );
        crate::client::ChainClient::connect(&self.cluster, id, client_key(id))
    }

    /// Writes a cluster of `n` replicas for `genesis` into `dir` (with [`LOCAL_CLIENTS`]
    /// clients) and starts every replica.
    pub fn start(dir: &std::path::Path, genesis: &Genesis, n: usize) -> LocalCluster {
        // A failing test shows the replicas' view changes and warnings (captured otherwise);
        // `RUST_LOG` overrides. The chain benchmark installs its own subscriber first.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "hoard_pbft=info,hoard_ledger=warn".into()),
            )
            .with_test_writer()
            .try_init();
        let keys: Vec<Keypair> = (0..n as u64).map(|i| key("replica", i)).collect();
        let addresses: Vec<_> = (0..n)
            .map(|_| (std::net::SocketAddr::from(([127, 0, 0, 1], free_port())), None))
            .collect();
        let clients: Vec<Keypair> = (1..=LOCAL_CLIENTS).map(client_key).collect();
        let cluster = crate::cluster::write_local_cluster(dir, genesis, &addresses, &keys, &clients)
            .expect("write cluster");
        let mut local = LocalCluster {
            dir: dir.to_path_buf(),
            cluster,
            statuses: Vec::new(),
            stops: Vec::new(),
            tasks: Vec::new(),
        };
        for id in 0..n {
            let (stop, status) = local.spawn(id);
            local.stops.push(Some(stop));
            local.statuses.push(status);
        }
        local
    }

    fn spawn(
        &mut self,
        id: usize,
    ) -> (
        tokio::sync::watch::Sender<bool>,
        tokio::sync::watch::Receiver<crate::node::NodeStatus>,
    ) {
        let config = crate::cluster::NodeConfig::load(&self.dir.join(format!("replica-{id}.toml")))
            .expect("node file");
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let (status_tx, status) = tokio::sync::watch::channel(crate::node::NodeStatus::default());
        let task = tokio::spawn(crate::node::run(config, stopped, Some(status_tx)));
        if id < self.tasks.len() {
            self.tasks[id] = Some(task);
        } else {
            self.tasks.push(Some(task));
        }
        (stop, status)
    }

    /// Stops replica `id` (its task ends; its disk stays).
    pub async fn stop(&mut self, id: usize) {
        if let Some(stop) = self.stops[id].take() {
            let _ = stop.send(true);
        }
        if let Some(task) = self.tasks[id].take() {
            let _ = task.await;
        }
    }

    /// Restarts a stopped replica from its disk.
    pub fn restart(&mut self, id: usize) {
        let (stop, status) = self.spawn(id);
        self.stops[id] = Some(stop);
        self.statuses[id] = status;
    }

    /// Waits until every running replica reports at least `height`; returns their statuses.
    pub async fn wait_for_height(
        &self,
        height: u64,
        timeout: std::time::Duration,
    ) -> Vec<crate::node::NodeStatus> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let statuses: Vec<_> = self.statuses.iter().map(|s| s.borrow().clone()).collect();
            let running: Vec<_> = statuses
                .iter()
                .enumerate()
                .filter(|(i, _)| self.stops[*i].is_some())
                .map(|(_, s)| s.clone())
                .collect();
            if running.iter().all(|s| s.height >= height) {
                return running;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "replicas did not reach height {height}: {statuses:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Stops every replica.
    pub async fn shutdown(mut self) {
        for id in 0..self.stops.len() {
            self.stop(id).await;
        }
    }
}

/// Replicas in a directory with tenant 1's GOLD defined and a custodial account, alice, that
/// holds it, and a client that commits one mint per request (one slot each).
pub struct MintingCluster {
    pub cluster: LocalCluster,
    pub client: crate::client::ChainClient,
    world: World,
    alice: Keypair,
}

impl MintingCluster {
    const TENANT: TenantId = TenantId(1);

    /// Starts 4 replicas in `dir` and commits the setup.
    pub async fn start(dir: &std::path::Path) -> MintingCluster {
        let mut world = World::new(1);
        let cluster = LocalCluster::start(dir, &world.genesis(), 4);
        let client = cluster.client(1);
        let alice = key("alice", 0);
        let setup = vec![
            world.define_currency(Self::TENANT, "GOLD", 1_000_000),
            world.register(Self::TENANT, &alice.public(), Custody::Custodial),
        ];
        tokio::time::timeout(std::time::Duration::from_secs(20), client.submit(&setup))
            .await
            .expect("setup committed in time")
            .expect("setup committed");
        MintingCluster {
            cluster,
            client,
            world,
            alice,
        }
    }

    pub fn genesis(&self) -> Genesis {
        self.world.genesis()
    }

    /// Commits one mint of 1 GOLD per request until the chain is at least `min_height` high;
    /// returns the height reached.
    pub async fn mint_until(&mut self, min_height: u64) -> u64 {
        let mut height = 0;
        while height < min_height {
            let tx = self
                .world
                .mint_currency(Self::TENANT, &self.alice.public(), "GOLD", 1);
            height = tokio::time::timeout(std::time::Duration::from_secs(20), self.client.submit(&[tx]))
                .await
                .expect("a mint committed in time")
                .expect("a mint committed")
                .height;
        }
        height
    }
}

/// Starts 4 replicas in `dir` (a [`MintingCluster`]), commits one mint per slot until the chain
/// is at least `min_height` high, waits for every replica to get there and stops them, their
/// disks left in `dir`. Returns the height reached.
pub async fn commit_one_per_slot(dir: &std::path::Path, min_height: u64) -> u64 {
    let mut minting = MintingCluster::start(dir).await;
    let height = minting.mint_until(min_height).await;
    minting
        .cluster
        .wait_for_height(height, std::time::Duration::from_secs(30))
        .await;
    minting.cluster.shutdown().await;
    height
}

#[cfg(test)]
mod tests {
    use super::free_port;

    #[test]
    fn free_ports_are_distinct_bindable_and_below_the_ephemeral_range() {
        let ephemeral_low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|range| range.split_whitespace().next()?.parse().ok())
            .unwrap_or(32768);
        let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
        let distinct: std::collections::BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "a port handed out twice");
        for port in ports {
            if ephemeral_low > 11_000 {
                assert!(port < ephemeral_low, "{port} is in the ephemeral range");
            }
            std::net::TcpListener::bind(("127.0.0.1", port)).expect("the port is free");
        }
    }
}
