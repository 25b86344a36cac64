//! The gateway's narrow view of the chain: submit a batch of transactions, and follow committed
//! blocks in order. The batcher uses [`Chain::submit`]; the follower ([`crate::view`]) uses
//! [`Chain::follow`] and re-executes every block on its own `hoard_ledger::Ledger` copy (checking
//! every root), so reads and subscriptions come from committed state.
//!
//! [`LocalChain`] is the in-process backend: one real `Ledger` that orders batches itself and
//! executes them with `Ledger::execute` (no consensus, no disk). The PBFT cluster client
//! (`hoard_ledger::client`) implements the same trait and plugs in through
//! [`crate::run_with_chain`] without any change to the gateway.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use futures::stream::BoxStream;

use hoard_ledger::{Block, Genesis, Ledger};
use hoard_types::constants::BLOCK_TRANSACTIONS_MAX;
use hoard_types::Transaction;

use crate::constants::LOCAL_CHAIN_BLOCKS_RETAINED_MAX;

/// Failures of the chain connection.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ChainError {
    #[error("the chain is unreachable: {0}")]
    Unavailable(String),
    #[error("block {0} is no longer available to follow from")]
    Pruned(u64),
    #[error("the chain is stopped")]
    Stopped,
}

/// What the gateway needs from the chain.
pub trait Chain: Send + Sync + 'static {
    /// The chain id transactions must carry.
    fn chain_id(&self) -> u64;
    /// Hands a batch to the chain for ordering. `Ok` means "received", not "committed": commits
    /// arrive through [`Chain::follow`]. Transactions may be lost by the chain (a view change);
    /// the gateway resubmits anything not committed after `claim_idle_ms`, and the ledger's
    /// deduplication makes that safe.
    fn submit(&self, batch: Vec<Transaction>) -> BoxFuture<'_, Result<(), ChainError>>;
    /// Committed blocks from `from_height` on, in order, without gaps, forever.
    fn follow(&self, from_height: u64) -> BoxStream<'static, Result<Arc<Block>, ChainError>>;
    /// Replicas reachable now, and how many a commit needs the gateway to reach (f+1: its
    /// matching replies certify a result). `/readyz` reports the chain ready when reachable
    /// reaches needed. An in-process chain is always reachable: `(1, 1)`.
    fn reachable(&self) -> (usize, usize) {
        (1, 1)
    }
}

/// An in-process chain: one ledger, ordered by arrival, executed immediately.
#[derive(Clone)]
pub struct LocalChain {
    inner: Arc<LocalInner>,
}

struct LocalInner {
    chain_id: u64,
    ledger: Mutex<Ledger>,
    /// Retained blocks; `blocks[0]` has height `first_height`.
    blocks: Mutex<(u64, VecDeque<Arc<Block>>)>,
    height: tokio::sync::watch::Sender<u64>,
    paused: tokio::sync::watch::Sender<bool>,
}

impl LocalChain {
    pub fn new(genesis: &Genesis) -> LocalChain {
        LocalChain {
            inner: Arc::new(LocalInner {
                chain_id: genesis.chain_id,
                ledger: Mutex::new(Ledger::new(genesis)),
                blocks: Mutex::new((1, VecDeque::new())),
                height: tokio::sync::watch::channel(0).0,
                paused: tokio::sync::watch::channel(false).0,
            }),
        }
    }

    /// Stops (true) or resumes (false) committing: submissions wait. For tests of backpressure
    /// and crash recovery.
    pub fn set_paused(&self, paused: bool) {
        self.inner.paused.send_replace(paused);
    }

    /// The chain's height.
    pub fn height(&self) -> u64 {
        *self.inner.height.borrow()
    }

    /// Runs `read` on the chain's own ledger (tests compare it with the gateway's copy).
    pub fn with_ledger<T>(&self, read: impl FnOnce(&Ledger) -> T) -> T {
        read(&self.inner.ledger.lock().expect("ledger lock"))
    }

    fn commit(inner: &LocalInner, batch: Vec<Transaction>) {
        // Consensus checks signatures before ordering; so does this backend.
        let valid = hoard_types::tx::verify_transactions(&batch);
        let batch: Vec<Transaction> = batch
            .into_iter()
            .zip(valid)
            .filter_map(|(tx, ok)| ok.then_some(tx))
            .collect();
        for chunk in batch.chunks(BLOCK_TRANSACTIONS_MAX) {
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            let mut ledger = inner.ledger.lock().expect("ledger lock");
            let (block, _receipts) = ledger.execute(now_ms, chunk.to_vec());
            let height = block.header.height;
            let mut blocks = inner.blocks.lock().expect("blocks lock");
            blocks.1.push_back(Arc::new(block));
            while blocks.1.len() > LOCAL_CHAIN_BLOCKS_RETAINED_MAX {
                blocks.1.pop_front();
                blocks.0 += 1;
            }
            drop(blocks);
            drop(ledger);
            inner.height.send_replace(height);
        }
    }
}

impl Chain for LocalChain {
    fn chain_id(&self) -> u64 {
        self.inner.chain_id
    }

    fn submit(&self, batch: Vec<Transaction>) -> BoxFuture<'_, Result<(), ChainError>> {
        Box::pin(async move {
            let mut paused = self.inner.paused.subscribe();
            while *paused.borrow_and_update() {
                paused.changed().await.map_err(|_| ChainError::Stopped)?;
            }
            if batch.is_empty() {
                return Ok(());
            }
            let inner = self.inner.clone();
            tokio::task::spawn_blocking(move || LocalChain::commit(&inner, batch))
                .await
                .map_err(|e| ChainError::Unavailable(e.to_string()))
        })
    }

    fn follow(&self, from_height: u64) -> BoxStream<'static, Result<Arc<Block>, ChainError>> {
        let inner = self.inner.clone();
        let watch = inner.height.subscribe();
        Box::pin(futures::stream::unfold(
            (inner, watch, from_height.max(1), false),
            |(inner, mut watch, next, failed)| async move {
                if failed {
                    return None;
                }
                loop {
                    let found = {
                        let blocks = inner.blocks.lock().expect("blocks lock");
                        if next < blocks.0 {
                            Some(Err(ChainError::Pruned(next)))
                        } else {
                            blocks.1.get((next - blocks.0) as usize).cloned().map(Ok)
                        }
                    };
                    match found {
                        Some(Ok(block)) => return Some((Ok(block), (inner, watch, next + 1, false))),
                        Some(Err(e)) => return Some((Err(e), (inner, watch, next, true))),
                        None => {
                            if watch.changed().await.is_err() {
                                return Some((Err(ChainError::Stopped), (inner, watch, next, true)));
                            }
                        }
                    }
                }
            },
        ))
    }
}

/// Batches handed to the cluster and not yet committed, per gateway. `submit` waits for a slot
/// beyond this, which backs the batcher (and so the clients, through `busy`) off.
pub const CLUSTER_BATCHES_IN_FLIGHT_MAX: usize = 256;

/// The PBFT cluster through `hoard_ledger::client::ChainClient` (f+1 matching replies and
/// blocks). `submit` hands the batch to a background task and returns at once, so that the
/// batcher keeps several batches in flight (at most [`CLUSTER_BATCHES_IN_FLIGHT_MAX`]); a batch
/// the cluster loses is resubmitted from the stream after `claim_idle_ms`.
#[derive(Clone)]
pub struct ClusterChain {
    client: hoard_ledger::client::ChainClient,
    chain_id: u64,
    in_flight: Arc<tokio::sync::Semaphore>,
}

impl ClusterChain {
    /// Connects to the replicas of `cluster` as client `client_id` (unique per gateway),
    /// signing each connection's hello with `key` (the cluster file lists its public key for
    /// `client_id`).
    pub fn connect(
        cluster: &hoard_ledger::cluster::Cluster,
        client_id: u64,
        key: hoard_types::Keypair,
    ) -> ClusterChain {
        ClusterChain {
            client: hoard_ledger::client::ChainClient::connect(cluster, client_id, key),
            chain_id: cluster.genesis.chain_id,
            in_flight: Arc::new(tokio::sync::Semaphore::new(CLUSTER_BATCHES_IN_FLIGHT_MAX)),
        }
    }

    /// Connects as the configuration's `chain.client_id`, with the key in `chain.client_key`,
    /// after checking that `cluster` lists that id with that key (a gateway with the wrong key
    /// stops at start, instead of being refused by every replica).
    pub fn connect_configured(
        cluster: &hoard_ledger::cluster::Cluster,
        config: &crate::config::ChainConfig,
    ) -> crate::error::Result<ClusterChain> {
        let path = config.client_key.as_ref().ok_or_else(|| {
            crate::error::ServerError::Config(
                "chain.client_key: the cluster backend needs this gateway's client key file".into(),
            )
        })?;
        let key = hoard_ledger::cluster::load_key(path)?;
        cluster.check_client(config.client_id, &key)?;
        Ok(ClusterChain::connect(cluster, config.client_id, key))
    }
}

impl Chain for ClusterChain {
    fn chain_id(&self) -> u64 {
        self.chain_id
    }

    fn submit(&self, batch: Vec<Transaction>) -> BoxFuture<'_, Result<(), ChainError>> {
        Box::pin(async move {
            if batch.is_empty() {
                return Ok(());
            }
            for request in hoard_ledger::app::split_into_requests(batch) {
                let permit = self
                    .in_flight
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| ChainError::Stopped)?;
                let client = self.client.clone();
                tokio::spawn(async move {
                    if let Err(error) = client.submit(&request).await {
                        tracing::warn!(%error, "cluster did not commit a batch; it will be resubmitted");
                    }
                    drop(permit);
                });
            }
            Ok(())
        })
    }

    fn reachable(&self) -> (usize, usize) {
        let f = (self.client.replicas() - 1) / 3;
        (self.client.connected_replicas(), f + 1)
    }

    fn follow(&self, from_height: u64) -> BoxStream<'static, Result<Arc<Block>, ChainError>> {
        let receiver = self.client.blocks(from_height);
        Box::pin(futures::stream::unfold(receiver, |mut receiver| async move {
            receiver
                .recv()
                .await
                .map(|certified| (Ok(certified.block), receiver))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use hoard_ledger::testing::{key, World};
    use hoard_types::{Custody, TenantId};

    #[tokio::test]
    async fn local_chain_commits_in_order_and_followers_see_every_block() {
        let mut world = World::new(1);
        let chain = LocalChain::new(&world.genesis());
        let mut follower = chain.follow(1);
        let alice = key("alice", 0).public();
        chain
            .submit(vec![world.register(TenantId(1), &alice, Custody::SelfCustody)])
            .await
            .unwrap();
        chain
            .submit(vec![world.define_currency(TenantId(1), "GOLD", 1_000)])
            .await
            .unwrap();
        let mut mirror = Ledger::new(&world.genesis());
        for height in 1..=2 {
            let block = follower.next().await.unwrap().unwrap();
            assert_eq!(block.header.height, height);
            mirror.apply_block(&block).unwrap();
        }
        assert_eq!(chain.with_ledger(|l| l.state_root()), mirror.state_root());
        assert_eq!(mirror.account(TenantId(1), &alice), Some(Custody::SelfCustody));
    }

    #[tokio::test]
    async fn bad_signatures_never_reach_the_ledger() {
        let mut world = World::new(1);
        let chain = LocalChain::new(&world.genesis());
        let mut tx = world.register(TenantId(1), &key("bob", 0).public(), Custody::Custodial);
        tx.signatures[0].signature.0[0] ^= 1;
        chain.submit(vec![tx]).await.unwrap();
        assert_eq!(
            chain.with_ledger(|l| l.account(TenantId(1), &key("bob", 0).public())),
            None
        );
    }

    /// A gateway on the cluster backend starts only with the key the cluster file lists for its
    /// client id, and says which check failed.
    #[tokio::test]
    async fn a_gateway_connects_only_as_a_client_the_cluster_file_lists_with_its_key() {
        use hoard_ledger::cluster::{local_client_key_file, save_key, write_local_cluster, Cluster};
        let dir = tempfile::tempdir().unwrap();
        let keys: Vec<_> = (0..4).map(|i| key("replica", i)).collect();
        let addresses: Vec<_> = (0..4)
            .map(|i| (std::net::SocketAddr::from(([127, 0, 0, 1], 7100 + i)), None))
            .collect();
        let clients = [key("client", 1)];
        write_local_cluster(dir.path(), &World::new(1).genesis(), &addresses, &keys, &clients).unwrap();
        let cluster = Cluster::load(&dir.path().join("cluster.toml")).unwrap();
        let listed = dir.path().join(local_client_key_file(1));
        let other = dir.path().join("other.key");
        save_key(&other, &key("mallory", 0)).unwrap();
        let missing = dir.path().join("missing.key");
        let config = |client_id: u64, client_key: Option<&std::path::Path>| crate::config::ChainConfig {
            backend: "cluster".into(),
            cluster: Some(dir.path().join("cluster.toml")),
            client_id,
            client_key: client_key.map(|p| p.to_path_buf()),
            ..crate::config::ChainConfig::default()
        };
        assert!(ClusterChain::connect_configured(&cluster, &config(1, Some(&listed))).is_ok());
        for (client_id, client_key, because) in [
            (2, Some(listed.as_path()), "not listed"),
            (1, Some(other.as_path()), "not the one the cluster file lists"),
            (1, None, "chain.client_key"),
            (1, Some(missing.as_path()), "missing.key"),
        ] {
            match ClusterChain::connect_configured(&cluster, &config(client_id, client_key)) {
                Err(error) => assert!(error.to_string().contains(because), "{because}: {error}"),
                Ok(_) => panic!("client {client_id} with {client_key:?} connected"),
            }
        }
    }
}
