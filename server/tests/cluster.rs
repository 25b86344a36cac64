//! The gateway on the real PBFT cluster (four replicas as tasks of this process, on loopback):
//! the same events path as with the in-process chain, through `ClusterChain`.

mod common;

use std::sync::Arc;

use common::*;
use hoard_ledger::testing::{key, LocalCluster, World};
use hoard_server::testing::{test_config, RedisServer};
use hoard_server::{Chain, ClusterChain, Gateway};
use hoard_types::{Custody, Outcome};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_commit_through_the_pbft_cluster() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut world = World::new(2);
    let cluster = LocalCluster::start(dir.path(), &world.genesis(), 4);
    let chain: Arc<dyn Chain> = Arc::new(ClusterChain::connect(
        &cluster.cluster,
        1,
        hoard_ledger::testing::client_key(1),
    ));
    let config = test_config(&redis, &world);
    let gateway = Gateway::start(config, chain, &world.genesis())
        .await
        .expect("gateway starts");
    let url = gateway.ws_url();
    let mut studio1 = hoard_server::testing::WsClient::connect(&url).await;
    let studio_key = world.studio(T1).clone();
    studio1.auth_studio(T1, &studio_key).await;
    let alice = key("alice", 0);
    for tx in [
        world.register(T1, &alice.public(), Custody::SelfCustody),
        world.define_currency(T1, "GOLD", 1_000),
        world.mint_currency(T1, &alice.public(), "GOLD", 42),
    ] {
        assert_eq!(commit(&mut studio1, &tx).await.1, Outcome::Applied);
    }
    assert_eq!(balance(&mut studio1, alice.public(), "GOLD").await, 42);
    gateway.shutdown().await;
    drop(cluster);
}

/// `/readyz` follows the chain's reachability: 503 once fewer than f+1 replicas (2 of 4) are
/// connected, 200 again when they are back; the gauge says how many are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_needs_f_plus_one_replicas_reachable() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let world = World::new(1);
    let mut cluster = LocalCluster::start(dir.path(), &world.genesis(), 4);
    let chain: Arc<dyn Chain> = Arc::new(ClusterChain::connect(
        &cluster.cluster,
        1,
        hoard_ledger::testing::client_key(1),
    ));
    let gateway = Gateway::start(test_config(&redis, &world), chain, &world.genesis())
        .await
        .expect("gateway starts");
    let http = gateway.http_addr();
    let wait_for = |want_ready: bool| async move {
        let started = std::time::Instant::now();
        loop {
            let ready = http_get(http, "/readyz").await.starts_with("HTTP/1.1 200");
            if ready == want_ready {
                return;
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(20),
                "/readyz did not turn {}",
                if want_ready { "ready" } else { "not ready" }
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    wait_for(true).await;
    for id in 1..4 {
        cluster.stop(id).await;
    }
    wait_for(false).await;
    let metrics = http_get(http, "/metrics").await;
    assert!(
        counter_value(&metrics, "hoard_gateway_chain_replicas_reachable") <= 1,
        "{metrics}"
    );
    // Still healthy (the process is up), only not ready.
    assert!(http_get(http, "/healthz").await.starts_with("HTTP/1.1 200"));
    for id in 1..4 {
        cluster.restart(id);
    }
    wait_for(true).await;
    gateway.shutdown().await;
    drop(cluster);
}
