//! The cluster file (who the replicas are, where they listen) and a replica's node file.
//!
//! ```toml
//! # cluster.toml: shared by every replica and every gateway
//! genesis = "genesis.toml"
//! [[replicas]]
//! id = 0
//! public_key = "<hex>"
//! address = "127.0.0.1:7100"
//! metrics = "127.0.0.1:7200"   # optional
//! [[clients]]                    # each gateway: its client id and public key
//! id = 1
//! public_key = "<hex>"
//! ```
//!
//! ```toml
//! # node.toml: one replica
//! id = 0
//! cluster = "cluster.toml"
//! key = "replica-0.key"         # hex ed25519 seed
//! data_dir = "data/replica-0"
//! engine = "redb"               # optional: "redb" (default) or "sled"
//! cache_bytes = 67108864        # optional: the store's page cache (64 MiB)
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use hoard_types::{Keypair, PublicKey};

use crate::error::{LedgerError, Result};
use crate::genesis::Genesis;
use crate::store::Engine;

/// One replica as the cluster file lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaInfo {
    pub id: u32,
    /// Hex ed25519 public key.
    pub public_key: String,
    pub address: SocketAddr,
    /// Where its Prometheus metrics are served, if anywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<SocketAddr>,
}

/// One client (a gateway) as the cluster file lists it: a replica serves a connection as
/// client `id` only when its hello is signed with this key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientInfo {
    pub id: u64,
    /// Hex ed25519 public key.
    pub public_key: String,
}

/// The cluster file. Like every configuration file of a replica, it refuses keys it does not
/// know (a misspelt key would otherwise be ignored without a word).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    /// Path of the genesis file, relative to the cluster file.
    pub genesis: PathBuf,
    pub replicas: Vec<ReplicaInfo>,
    /// The clients (gateways) the replicas serve; none listed, none served.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clients: Vec<ClientInfo>,
}

/// A loaded, checked cluster: replicas by id, their keys, the clients, and the genesis.
#[derive(Clone, Debug)]
pub struct Cluster {
    pub genesis: Genesis,
    pub replicas: Vec<ReplicaInfo>,
    pub keys: Vec<PublicKey>,
    /// The clients as listed, by id.
    pub clients: Vec<ClientInfo>,
    /// Their keys, by id.
    pub client_keys: std::collections::BTreeMap<u64, PublicKey>,
}

impl Cluster {
    pub fn load(path: &Path) -> Result<Cluster> {
        let text = read(path)?;
        let file: ClusterFile = toml::from_str(&text).map_err(|e| config(path, e))?;
        let genesis_path = relative_to(path, &file.genesis);
        let genesis = Genesis::load(&genesis_path)?;
        Cluster::new(genesis, file.replicas)?
            .with_clients(file.clients)
            .map_err(|e| config(path, e))
    }

    /// Checks that ids are `0..n`, in order, and that n = 3f+1 with f >= 1.
    pub fn new(genesis: Genesis, mut replicas: Vec<ReplicaInfo>) -> Result<Cluster> {
        replicas.sort_by_key(|r| r.id);
        let n = replicas.len();
        if n < 4 || !(n - 1).is_multiple_of(3) {
            return Err(LedgerError::Config(format!(
                "a cluster needs n = 3f+1 >= 4 replicas, not {n}"
            )));
        }
        if replicas.iter().enumerate().any(|(i, r)| r.id as usize != i) {
            return Err(LedgerError::Config(
                "replica ids must be 0..n without gaps".into(),
            ));
        }
        let keys = replicas
            .iter()
            .map(|r| PublicKey::from_hex(&r.public_key).map_err(|e| LedgerError::Config(e.to_string())))
            .collect::<Result<Vec<_>>>()?;
        Ok(Cluster {
            genesis,
            replicas,
            keys,
            clients: Vec::new(),
            client_keys: std::collections::BTreeMap::new(),
        })
    }

    /// The cluster with these clients, each id once with a well-formed key.
    pub fn with_clients(mut self, mut clients: Vec<ClientInfo>) -> Result<Cluster> {
        clients.sort_by_key(|c| c.id);
        let mut client_keys = std::collections::BTreeMap::new();
        for client in &clients {
            let key = PublicKey::from_hex(&client.public_key)
                .map_err(|e| LedgerError::Config(format!("client {}: {e}", client.id)))?;
            if client_keys.insert(client.id, key).is_some() {
                return Err(LedgerError::Config(format!(
                    "client {} is listed twice",
                    client.id
                )));
            }
        }
        self.clients = clients;
        self.client_keys = client_keys;
        Ok(self)
    }

    /// Checks that the cluster lists client `id` with `key`'s public key: what a replica will
    /// ask of its hello. A gateway checks it at start, so that a wrong key file says so then,
    /// not as connections the replicas refuse.
    pub fn check_client(&self, id: u64, key: &Keypair) -> Result<()> {
        match self.client_keys.get(&id) {
            None => Err(LedgerError::Config(format!(
                "client {id} is not listed in the cluster file's [[clients]]: the replicas would refuse it"
            ))),
            Some(listed) if *listed != key.public() => Err(LedgerError::Config(format!(
                "the client key's public key is not the one the cluster file lists for client {id}"
            ))),
            Some(_) => Ok(()),
        }
    }

    /// The cluster file's text, with the genesis file beside it named `genesis_file`.
    pub fn to_toml(&self, genesis_file: &str) -> String {
        let file = ClusterFile {
            genesis: PathBuf::from(genesis_file),
            replicas: self.replicas.clone(),
            clients: self.clients.clone(),
        };
        toml::to_string_pretty(&file).expect("cluster serialises")
    }

    pub fn n(&self) -> usize {
        self.replicas.len()
    }

    pub fn f(&self) -> usize {
        (self.n() - 1) / 3
    }
}

/// One replica's own configuration file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    pub id: u32,
    /// Path of the cluster file (relative to this file).
    pub cluster: PathBuf,
    /// Path of the replica's secret key file: 64 hex digits (relative to this file).
    pub key: PathBuf,
    /// Where the block log, snapshots and consensus records live (relative to this file).
    pub data_dir: PathBuf,
    /// Blocks kept below the newest snapshot, for lagging peers and followers.
    #[serde(default = "default_retention")]
    pub block_retention_blocks: u64,
    /// Most bytes of blocks kept below the newest snapshot, whatever the count says (sled's
    /// memory grows with what it holds: a soak run at 100,000 events/s grew each replica by
    /// about 7 MiB/s while every block was kept).
    #[serde(default = "default_retention_bytes")]
    pub block_retention_bytes: u64,
    /// The storage engine of `data_dir`: `redb` (the default: fdatasync on every commit, and
    /// the shorter latency tails in the chain benchmark) or `sled`. A replica refuses a data
    /// directory that holds the other engine's store.
    #[serde(default = "default_engine")]
    pub engine: Engine,
    /// The store's page cache, bytes (64 MiB by default). At 200,000 events/s a replica on
    /// redb needed more: BENCHMARKS.md, "The store engine".
    #[serde(default = "default_cache_bytes")]
    pub cache_bytes: u64,
    /// Consensus tuning; defaults suit a local cluster.
    #[serde(default)]
    pub consensus: ConsensusTuning,
}

/// The storage engine of a replica whose node file names none.
pub const ENGINE_DEFAULT: Engine = Engine::Redb;

fn default_engine() -> Engine {
    ENGINE_DEFAULT
}

fn default_cache_bytes() -> u64 {
    crate::store::CACHE_BYTES_DEFAULT
}

fn default_retention() -> u64 {
    100_000
}

fn default_retention_bytes() -> u64 {
    crate::store::BLOCK_RETENTION_BYTES_DEFAULT
}

/// The consensus parameters an operator may tune.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsensusTuning {
    pub checkpoint_interval: u64,
    pub window: u64,
    pub batch_size_max: usize,
    pub batch_timeout_ms: u64,
    /// A backup holding a client request that sees no block executed for this long suspects
    /// the primary (f+1 suspicions start a view change); doubled after each failed view change.
    pub view_change_timeout_ms: u64,
}

impl Default for ConsensusTuning {
    fn default() -> Self {
        ConsensusTuning {
            checkpoint_interval: 64,
            window: 256,
            batch_size_max: 4,
            batch_timeout_ms: 2,
            view_change_timeout_ms: 400,
        }
    }
}

/// A node file with its paths resolved and its key loaded.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub id: u32,
    pub cluster: Cluster,
    pub keypair: Keypair,
    pub data_dir: PathBuf,
    pub block_retention_blocks: u64,
    pub block_retention_bytes: u64,
    pub engine: Engine,
    pub cache_bytes: u64,
    pub consensus: ConsensusTuning,
}

impl NodeConfig {
    pub fn load(path: &Path) -> Result<NodeConfig> {
        let text = read(path)?;
        let file: NodeFile = toml::from_str(&text).map_err(|e| config(path, e))?;
        let cluster = Cluster::load(&relative_to(path, &file.cluster))?;
        let keypair = load_key(&relative_to(path, &file.key))?;
        let config = NodeConfig {
            id: file.id,
            cluster,
            keypair,
            data_dir: relative_to(path, &file.data_dir),
            block_retention_blocks: file.block_retention_blocks,
            block_retention_bytes: file.block_retention_bytes,
            engine: file.engine,
            cache_bytes: file.cache_bytes,
            consensus: file.consensus,
        };
        config.check()?;
        Ok(config)
    }

    /// The key must be the one the cluster file lists for this id, and the engine durable.
    pub fn check(&self) -> Result<()> {
        if self.engine == Engine::Mem {
            return Err(LedgerError::Config(
                "engine \"mem\" keeps nothing across a restart: a replica needs \"redb\" or \"sled\"".into(),
            ));
        }
        let listed =
            self.cluster.keys.get(self.id as usize).ok_or_else(|| {
                LedgerError::Config(format!("replica {} is not in the cluster file", self.id))
            })?;
        if *listed != self.keypair.public() {
            return Err(LedgerError::Config(format!(
                "the key file's public key is not the one the cluster file lists for replica {}",
                self.id
            )));
        }
        Ok(())
    }

    pub fn address(&self) -> SocketAddr {
        self.cluster.replicas[self.id as usize].address
    }

    pub fn metrics_address(&self) -> Option<SocketAddr> {
        self.cluster.replicas[self.id as usize].metrics
    }
}

/// Reads a key file: the ed25519 seed as 64 hex digits.
pub fn load_key(path: &Path) -> Result<Keypair> {
    Keypair::from_seed_hex(&read(path)?).map_err(|e| LedgerError::Config(format!("{}: {e}", path.display())))
}

/// Writes a key file readable by its owner only.
pub fn save_key(path: &Path, key: &Keypair) -> Result<()> {
    write_private(path, &format!("{}\n", key.seed_hex()))
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options.open(path).map_err(|e| config(path, e))?;
    file.write_all(text.as_bytes()).map_err(|e| config(path, e))
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| config(path, e))
}

fn config(path: &Path, error: impl std::fmt::Display) -> LedgerError {
    LedgerError::Config(format!("{}: {error}", path.display()))
}

fn relative_to(file: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        file.parent().unwrap_or(Path::new(".")).join(path)
    }
}

/// Lists client `id` with `key` under the `[[clients]]` of the cluster file at `path` (written
/// again whole, through a temporary file and a rename: comments in it are not kept). Refuses an
/// id already listed. Replicas read the cluster file at start: each must be restarted with the
/// new file before it serves the new client.
pub fn add_client(path: &Path, id: u64, key: &PublicKey) -> Result<()> {
    let text = read(path)?;
    let mut file: ClusterFile = toml::from_str(&text).map_err(|e| config(path, e))?;
    if file.clients.iter().any(|client| client.id == id) {
        return Err(LedgerError::Config(format!(
            "{}: client {id} is listed already",
            path.display()
        )));
    }
    file.clients.push(ClientInfo {
        id,
        public_key: key.to_hex(),
    });
    file.clients.sort_by_key(|client| client.id);
    let text = toml::to_string_pretty(&file).expect("cluster file serialises");
    let temporary = path.with_extension("toml.new");
    std::fs::write(&temporary, text).map_err(|e| config(&temporary, e))?;
    std::fs::rename(&temporary, path).map_err(|e| config(path, e))?;
    // What a replica will load: the genesis, the replicas and the clients still check.
    Cluster::load(path).map(|_| ())
}

/// The key file of client `id` that [`write_local_cluster`] writes.
pub fn local_client_key_file(id: u64) -> String {
    format!("client-{id}.key")
}

/// Writes everything a local cluster needs into `dir`: genesis, cluster file, for each
/// replica its key and node file (`replica-<id>.toml`), and for each of `clients` (client ids
/// 1, 2, ... in order) its key file ([`local_client_key_file`]), listed in the cluster file.
/// Returns the cluster. Used by `hoard cluster init`, the demo and the tests.
pub fn write_local_cluster(
    dir: &Path,
    genesis: &Genesis,
    addresses: &[(SocketAddr, Option<SocketAddr>)],
    keys: &[Keypair],
    clients: &[Keypair],
) -> Result<Cluster> {
    assert_eq!(addresses.len(), keys.len());
    std::fs::create_dir_all(dir).map_err(|e| config(dir, e))?;
    let replicas: Vec<ReplicaInfo> = addresses
        .iter()
        .zip(keys)
        .enumerate()
        .map(|(id, ((address, metrics), key))| ReplicaInfo {
            id: id as u32,
            public_key: key.public().to_hex(),
            address: *address,
            metrics: *metrics,
        })
        .collect();
    let cluster = Cluster::new(genesis.clone(), replicas)?.with_clients(
        clients
            .iter()
            .zip(1u64..)
            .map(|(key, id)| ClientInfo {
                id,
                public_key: key.public().to_hex(),
            })
            .collect(),
    )?;
    for (key, id) in clients.iter().zip(1u64..) {
        save_key(&dir.join(local_client_key_file(id)), key)?;
    }
    std::fs::write(dir.join("genesis.toml"), genesis.to_toml()).map_err(|e| config(dir, e))?;
    std::fs::write(dir.join("cluster.toml"), cluster.to_toml("genesis.toml")).map_err(|e| config(dir, e))?;
    for (id, key) in keys.iter().enumerate() {
        save_key(&dir.join(format!("replica-{id}.key")), key)?;
        let node = NodeFile {
            id: id as u32,
            cluster: PathBuf::from("cluster.toml"),
            key: PathBuf::from(format!("replica-{id}.key")),
            data_dir: PathBuf::from(format!("replica-{id}")),
            block_retention_blocks: default_retention(),
            block_retention_bytes: default_retention_bytes(),
            engine: ENGINE_DEFAULT,
            cache_bytes: default_cache_bytes(),
            consensus: ConsensusTuning::default(),
        };
        let text = toml::to_string_pretty(&node).expect("node file serialises");
        std::fs::write(dir.join(format!("replica-{id}.toml")), text).map_err(|e| config(dir, e))?;
    }
    Ok(cluster)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{key, World};

    /// The files of a local cluster of four replicas, in a temporary directory.
    fn four_replicas() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let keys: Vec<Keypair> = (0..4).map(|i| key("replica", i)).collect();
        let addresses: Vec<(SocketAddr, Option<SocketAddr>)> = (0..4)
            .map(|i| (SocketAddr::from(([127, 0, 0, 1], 7100 + i)), None))
            .collect();
        let clients = [key("client", 1)];
        write_local_cluster(dir.path(), &World::new(1).genesis(), &addresses, &keys, &clients).unwrap();
        dir
    }

    #[test]
    fn a_node_file_names_its_engine_redb_by_default_and_never_mem() {
        let dir = four_replicas();
        let path = dir.path().join("replica-0.toml");
        assert_eq!(NodeConfig::load(&path).unwrap().engine, ENGINE_DEFAULT);
        let written = std::fs::read_to_string(&path).unwrap();
        let without_engine: String = written
            .lines()
            .filter(|line| !line.starts_with("engine") && !line.starts_with("cache_bytes"))
            .map(|line| format!("{line}\n"))
            .collect();
        assert_ne!(without_engine, written, "the node file names its engine");
        std::fs::write(&path, &without_engine).unwrap();
        assert_eq!(NodeConfig::load(&path).unwrap().engine, Engine::Redb);
        let with = |engine: &str| {
            std::fs::write(&path, format!("engine = \"{engine}\"\n{without_engine}")).unwrap();
            NodeConfig::load(&path)
        };
        assert_eq!(with("sled").unwrap().engine, Engine::Sled);
        assert_eq!(
            NodeConfig::load(&path).unwrap().cache_bytes,
            crate::store::CACHE_BYTES_DEFAULT
        );
        std::fs::write(&path, format!("cache_bytes = 1073741824\n{without_engine}")).unwrap();
        assert_eq!(NodeConfig::load(&path).unwrap().cache_bytes, 1 << 30);
        for (refused, because) in [
            ("mem", "keeps nothing across a restart"),
            ("rocksdb", "unknown variant"),
        ] {
            match with(refused) {
                Err(LedgerError::Config(message)) => assert!(message.contains(because), "{message}"),
                other => panic!("engine {refused}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_cluster_file_lists_its_clients_and_a_gateway_key_is_checked_against_them() {
        let dir = four_replicas();
        let cluster = Cluster::load(&dir.path().join("cluster.toml")).unwrap();
        let client = key("client", 1);
        assert_eq!(cluster.client_keys.len(), 1);
        cluster.check_client(1, &client).unwrap();
        assert_eq!(
            load_key(&dir.path().join(local_client_key_file(1)))
                .unwrap()
                .public(),
            client.public(),
            "the client's key file"
        );
        for (id, key, because) in [
            (2, key("client", 2), "not listed"),
            (1, key("client", 2), "not the one the cluster file lists"),
        ] {
            match cluster.check_client(id, &key) {
                Err(LedgerError::Config(message)) => assert!(message.contains(because), "{message}"),
                other => panic!("client {id}: {other:?}"),
            }
        }
        let listed = ClientInfo {
            id: 5,
            public_key: client.public().to_hex(),
        };
        let refused = [
            (vec![listed.clone(), listed.clone()], "listed twice"),
            (
                vec![ClientInfo {
                    public_key: "zz".into(),
                    ..listed.clone()
                }],
                "client 5",
            ),
        ];
        for (clients, because) in refused {
            match cluster.clone().with_clients(clients) {
                Err(LedgerError::Config(message)) => assert!(message.contains(because), "{message}"),
                other => panic!("{because}: {other:?}"),
            }
        }
        // A cluster file written from a loaded one keeps its clients.
        let again = dir.path().join("again.toml");
        std::fs::write(&again, cluster.to_toml("genesis.toml")).unwrap();
        assert_eq!(Cluster::load(&again).unwrap().clients, cluster.clients);
    }

    #[test]
    fn a_client_added_to_the_cluster_file_is_listed_once() {
        let dir = four_replicas();
        let path = dir.path().join("cluster.toml");
        let second = key("client", 2);
        add_client(&path, 2, &second.public()).unwrap();
        let cluster = Cluster::load(&path).unwrap();
        cluster.check_client(2, &second).unwrap();
        cluster.check_client(1, &key("client", 1)).unwrap();
        assert_eq!(cluster.n(), 4, "the replicas are kept");
        match add_client(&path, 2, &key("client", 3).public()) {
            Err(LedgerError::Config(message)) => assert!(message.contains("listed already"), "{message}"),
            other => panic!("client 2 added twice: {other:?}"),
        }
        Cluster::load(&path).unwrap().check_client(2, &second).unwrap();
    }

    #[test]
    fn a_misspelt_key_in_any_replica_file_is_refused_by_name() {
        let dir = four_replicas();
        let node = dir.path().join("replica-0.toml");
        let cluster = dir.path().join("cluster.toml");
        let genesis = dir.path().join("genesis.toml");
        assert!(cluster.exists() && genesis.exists(), "the files this test edits");
        let originals: Vec<(PathBuf, String)> = [&node, &cluster, &genesis]
            .into_iter()
            .map(|path| (path.clone(), std::fs::read_to_string(path).unwrap()))
            .collect();
        NodeConfig::load(&node).unwrap();
        // Each edit adds one key that no file of a replica has, in a different table.
        let edits: [(&PathBuf, &str, &str); 6] = [
            (&node, "id = 0", "id = 0\ncache_byte = 1"),
            (&node, "[consensus]", "[consensus]\nwindw = 9"),
            (&cluster, "[[replicas]]", "[[replicas]]\nmetric = \"127.0.0.1:1\""),
            (&cluster, "[[clients]]", "[[clients]]\npublickey = \"00\""),
            (&cluster, "genesis = ", "genesiss = 1\ngenesis = "),
            (&genesis, "chain_id = ", "chainid = 2\nchain_id = "),
        ];
        for (path, anchor, replacement) in edits {
            let original = &originals.iter().find(|(p, _)| p == path).unwrap().1;
            assert!(original.contains(anchor), "{anchor} in {}", path.display());
            std::fs::write(path, original.replacen(anchor, replacement, 1)).unwrap();
            let misspelt = replacement.lines().find(|line| !anchor.contains(line)).unwrap();
            let name = misspelt.split(' ').next().unwrap();
            match NodeConfig::load(&node) {
                Err(LedgerError::Config(message)) => {
                    assert!(message.contains(name), "{name}: {message}")
                }
                other => panic!("{name} in {}: {other:?}", path.display()),
            }
            std::fs::write(path, original).unwrap();
            NodeConfig::load(&node).unwrap();
        }
    }
}
