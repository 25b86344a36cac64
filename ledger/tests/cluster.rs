//! Four real replicas over TCP on loopback (as tasks of the test process), driven through the
//! chain client the gateway uses.

use std::time::Duration;

use hoard_ledger::client::ChainClient;
use hoard_ledger::testing::{key, LocalCluster, World};
use hoard_types::{Amount, CurrencyId, Custody, Outcome, TenantId};

const T: TenantId = TenantId(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_replicas_commit_agree_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut world = World::new(1);
    let mut cluster = LocalCluster::start(dir.path(), &world.genesis(), 4);
    let client = cluster.client(1);
    let mut blocks = client.blocks(1);

    let alice = key("alice", 0);
    let setup = vec![
        world.define_currency(T, "GOLD", 1_000_000),
        world.register(T, &alice.public(), Custody::Custodial),
    ];
    let committed = tokio::time::timeout(Duration::from_secs(20), client.submit(&setup))
        .await
        .unwrap()
        .unwrap();
    assert!(
        committed.receipts.iter().all(|r| r.outcome == Outcome::Applied),
        "{committed:?}"
    );

    // Many requests in flight at once.
    let mut handles = Vec::new();
    for _ in 0..40 {
        let tx = world.mint_currency(T, &alice.public(), "GOLD", 10);
        let client = client.clone();
        handles.push(tokio::spawn(async move { client.submit(&[tx]).await }));
    }
    for handle in handles {
        let committed = tokio::time::timeout(Duration::from_secs(20), handle)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(committed.receipts[0].outcome, Outcome::Applied);
    }

    // A backup goes down; the rest keep committing; it comes back and catches up.
    cluster.stop(3).await;
    let tx = world.mint_currency(T, &alice.public(), "GOLD", 1);
    let committed = tokio::time::timeout(Duration::from_secs(20), client.submit(&[tx]))
        .await
        .unwrap()
        .unwrap();
    cluster.restart(3);
    let statuses = cluster
        .wait_for_height(committed.height, Duration::from_secs(30))
        .await;
    let root = statuses[0].state_root;
    assert!(
        statuses
            .iter()
            .all(|s| s.state_root == root || s.height != statuses[0].height),
        "{statuses:?}"
    );

    // The block stream delivered every height in order, and a follower replaying it agrees.
    let mut follower = hoard_ledger::Ledger::new(&world.genesis());
    while follower.height() < committed.height {
        let block = tokio::time::timeout(Duration::from_secs(20), blocks.recv())
            .await
            .unwrap()
            .unwrap();
        follower.apply_block(&block.block).unwrap();
    }
    assert_eq!(
        follower.balance(T, &CurrencyId::new("GOLD"), &alice.public()),
        Amount(401)
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_keeps_at_most_its_byte_budget_in_flight() {
    use hoard_ledger::client::ClientLimits;
    use hoard_ledger::cluster::{Cluster, ReplicaInfo};
    use hoard_types::Transaction;
    // Four replicas that never answer: nothing commits, so submissions pile up in the client.
    let world = World::new(1);
    let replicas = (0..4u32)
        .map(|id| ReplicaInfo {
            id,
            public_key: key("replica", u64::from(id)).public().to_hex(),
            address: std::net::SocketAddr::from(([127, 0, 0, 1], hoard_ledger::testing::free_port())),
            metrics: None,
        })
        .collect();
    let cluster = Cluster::new(world.genesis(), replicas).unwrap();
    let limits = ClientLimits {
        requests_in_flight_max: 1_000,
        bytes_in_flight_max: 1024 * 1024,
    };
    let client = ChainClient::connect_with(&cluster, 1, hoard_ledger::testing::client_key(1), limits);
    // Distinct requests of about 300 KB: three fit in 1 MiB, the other seven wait in `submit`.
    let request = |n: u8| -> Vec<Transaction> {
        (0..5)
            .map(|_| Transaction {
                payload: vec![n; 60_000],
                signatures: Vec::new(),
            })
            .collect()
    };
    let submissions: Vec<_> = (0..10)
        .map(|n| {
            let (client, request) = (client.clone(), request(n));
            tokio::spawn(async move { client.submit(&request).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (requests, bytes) = client.in_flight();
    assert_eq!(requests, 3, "{bytes} bytes in flight");
    assert!(bytes <= 1024 * 1024);
    // A waiting submission that is dropped gives nothing back it did not take; one in flight
    // frees its share, and the next waiting one goes.
    submissions[0].abort();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(client.in_flight().0, 3);
    for submission in &submissions {
        submission.abort();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(client.in_flight().0, 0);
}

/// A client whose replies were lost (here: a gateway that restarted after its request committed
/// and sends the same request again under the same client id) is answered from the replicas'
/// remembered replies: the original height and receipts, and nothing is ordered again. Before
/// replicas remembered replies, every such retransmission was dropped as already executed and the
/// client waited for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_sent_again_after_it_committed_gets_its_original_reply() {
    let dir = tempfile::tempdir().unwrap();
    let mut world = World::new(1);
    let cluster = LocalCluster::start(dir.path(), &world.genesis(), 4);
    let alice = key("alice", 0);
    let setup = vec![
        world.define_currency(T, "GOLD", 1_000_000),
        world.register(T, &alice.public(), Custody::Custodial),
    ];
    let first = cluster.client(7);
    let committed = tokio::time::timeout(Duration::from_secs(20), first.submit(&setup))
        .await
        .expect("committed in time")
        .expect("committed");
    drop(first);
    cluster
        .wait_for_height(committed.height, Duration::from_secs(10))
        .await;

    let restarted = cluster.client(7);
    let answered = tokio::time::timeout(Duration::from_secs(10), restarted.submit(&setup))
        .await
        .expect("answered from the remembered replies")
        .expect("answered");
    assert_eq!(answered, committed, "the original height and receipts");
    let statuses = cluster
        .wait_for_height(committed.height, Duration::from_secs(10))
        .await;
    assert!(
        statuses.iter().all(|s| s.height == committed.height),
        "the request was ordered again: {statuses:?}"
    );
    cluster.shutdown().await;
}

#[tokio::test]
async fn when_the_primary_connection_drops_pending_requests_go_to_every_replica_at_once() {
    use futures::{SinkExt, StreamExt};
    use hoard_ledger::cluster::{Cluster, ReplicaInfo};
    use hoard_ledger::net::{codec, NetMessage};
    use hoard_types::Transaction;
    use tokio::net::TcpListener;
    use tokio_util::codec::Framed;
    // Replica 0 (the primary of view 0) takes the request and then its process dies; replica 1
    // records what reaches it. Replicas 2 and 3 are not there.
    let listeners = [
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    ];
    let world = World::new(1);
    let replicas = (0..4u32)
        .map(|id| ReplicaInfo {
            id,
            public_key: key("replica", u64::from(id)).public().to_hex(),
            address: match listeners.get(id as usize) {
                Some(listener) => listener.local_addr().unwrap(),
                None => std::net::SocketAddr::from(([127, 0, 0, 1], hoard_ledger::testing::free_port())),
            },
            metrics: None,
        })
        .collect();
    let cluster = Cluster::new(world.genesis(), replicas).unwrap();
    let [primary, backup] = listeners;
    let (backup_got, mut backup_requests) = tokio::sync::mpsc::unbounded_channel();
    // Each stand-in replica opens its connection as a replica does, with a challenge (the
    // client's hello is not checked here).
    let challenge = NetMessage::Challenge {
        nonce: hoard_types::Hash([3; 32]),
    }
    .encode();
    let backup_challenge = challenge.clone();
    tokio::spawn(async move {
        let (stream, _) = backup.accept().await.unwrap();
        let mut framed = Framed::new(stream, codec());
        framed.send(backup_challenge).await.unwrap();
        while let Some(Ok(frame)) = framed.next().await {
            if let Ok(NetMessage::Request(request)) = NetMessage::decode(&frame) {
                let _ = backup_got.send((request, tokio::time::Instant::now()));
            }
        }
    });
    let client = ChainClient::connect(&cluster, 1, hoard_ledger::testing::client_key(1));
    let (stream, _) = primary.accept().await.unwrap();
    let mut framed = Framed::new(stream, codec());
    framed.send(challenge).await.unwrap();
    // Both connections up (the client sends to all replicas while it has none to the primary).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let submission = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .submit(&[Transaction {
                    payload: vec![1; 100],
                    signatures: Vec::new(),
                }])
                .await
        })
    };
    loop {
        let frame = framed
            .next()
            .await
            .expect("the request reaches the primary")
            .unwrap();
        if matches!(NetMessage::decode(&frame), Ok(NetMessage::Request(_))) {
            break;
        }
    }
    assert!(
        backup_requests.try_recv().is_err(),
        "while the primary is up, the request goes to it alone"
    );
    drop(framed);
    let lost_at = tokio::time::Instant::now();
    let (_, arrived) = tokio::time::timeout(Duration::from_secs(5), backup_requests.recv())
        .await
        .expect("the backup gets the request")
        .unwrap();
    // No commit was ever observed, so the first retransmission timer is RETRANSMIT_AFTER
    // (1 s) after the submission: the request came because the primary's connection dropped.
    assert!(
        arrived.duration_since(lost_at) < hoard_ledger::client::RETRANSMIT_AFTER / 2,
        "resent {:?} after the primary's connection dropped",
        arrived.duration_since(lost_at)
    );
    submission.abort();
}

/// Slot records at or below a stable checkpoint leave the disk (a few per round, after the
/// round's messages): over 3 checkpoints (interval 64) of one replica, none at or below the
/// second-last stable checkpoint is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_records_below_a_stable_checkpoint_are_deleted() {
    const INTERVAL: u64 = 64;
    let dir = tempfile::tempdir().unwrap();
    // One request at a time: one slot each.
    let height = hoard_ledger::testing::commit_one_per_slot(dir.path(), 3 * INTERVAL + 8).await;
    let config = hoard_ledger::cluster::NodeConfig::load(&dir.path().join("replica-0.toml")).unwrap();
    let store = config
        .engine
        .open(&config.data_dir, hoard_ledger::store::StoreConfig::default())
        .unwrap();
    let slots: Vec<u64> = store
        .records(b"pbft/slot/")
        .unwrap()
        .into_iter()
        .map(|(key, _)| u64::from_be_bytes(key[10..18].try_into().unwrap()))
        .collect();
    assert!(
        !slots.is_empty(),
        "slots above the last stable checkpoint have records"
    );
    let stable = (height / INTERVAL) * INTERVAL;
    assert!(
        slots.iter().all(|seq| *seq > stable - INTERVAL),
        "stable checkpoint {stable}: records left at {:?}",
        slots
            .iter()
            .filter(|seq| **seq <= stable - INTERVAL)
            .collect::<Vec<_>>()
    );
}

/// A replica that lost its disk while the others moved past two checkpoints (whose slots they
/// have garbage-collected) rejoins by state transfer; its store then holds the snapshot it
/// received as the base of its block log, and the ledger rebuilt from that disk alone agrees
/// with the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_lost_its_disk_rejoins_by_state_transfer_and_rebuilds_from_the_snapshot_it_received() {
    const INTERVAL: u64 = 64;
    let dir = tempfile::tempdir().unwrap();
    let mut minting = hoard_ledger::testing::MintingCluster::start(dir.path()).await;
    let genesis = minting.genesis();
    minting.cluster.stop(3).await;
    let config = |id: usize| {
        hoard_ledger::cluster::NodeConfig::load(&dir.path().join(format!("replica-{id}.toml"))).unwrap()
    };
    std::fs::remove_dir_all(&config(3).data_dir).unwrap();
    let height = minting.mint_until(2 * INTERVAL + 8).await;
    minting.cluster.restart(3);
    let statuses = minting
        .cluster
        .wait_for_height(height, Duration::from_secs(60))
        .await;
    assert!(
        statuses.iter().all(|s| s.state_root == statuses[0].state_root),
        "{statuses:?}"
    );
    minting.cluster.shutdown().await;

    let store = config(3)
        .engine
        .open(&config(3).data_dir, hoard_ledger::store::StoreConfig::default())
        .unwrap();
    let (base, _) = store
        .latest_snapshot()
        .unwrap()
        .expect("the transferred snapshot was stored");
    assert!(base >= INTERVAL && base % INTERVAL == 0, "snapshot at {base}");
    assert_eq!(
        store.block(1).unwrap(),
        None,
        "the block log starts after the transferred snapshot, not at genesis"
    );
    drop(store);
    let rebuilt = hoard_ledger::node::inspect(&config(3).data_dir, &genesis).unwrap();
    let reference = hoard_ledger::node::inspect(&config(0).data_dir, &genesis).unwrap();
    assert_eq!(rebuilt.height(), reference.height());
    assert_eq!(rebuilt.state_root(), reference.state_root());
    rebuilt.check_invariants().unwrap();
}

/// Anyone can reach a replica's port: a caller that never says who it is, sends a first frame
/// too large for a hello, sends garbage, or claims to be a replica without its key (a stolen
/// or made-up signature) is closed, without taking the slots that replicas and gateways use;
/// the cluster keeps committing through it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_connections_are_refused_and_the_cluster_keeps_committing() {
    use futures::{SinkExt, StreamExt};
    use hoard_ledger::net::{self, NetMessage};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio_util::codec::Framed;

    let dir = tempfile::tempdir().unwrap();
    let mut world = World::new(1);
    let mut cluster = LocalCluster::start(dir.path(), &world.genesis(), 4);
    let address = cluster.cluster.replicas[0].address;
    let client = cluster.client(1);
    let alice = key("alice", 0);
    let setup = vec![
        world.define_currency(T, "GOLD", 1_000_000),
        world.register(T, &alice.public(), Custody::Custodial),
    ];
    let within = Duration::from_secs(20);
    tokio::time::timeout(within, client.submit(&setup))
        .await
        .unwrap()
        .unwrap();
    let mut minted = 0;
    let mut mint = |world: &mut World| {
        minted += 1;
        world.mint_currency(T, &alice.public(), "GOLD", 1)
    };

    // The first frame on every accepted connection is a fresh challenge.
    async fn challenged(
        address: std::net::SocketAddr,
    ) -> (
        Framed<TcpStream, tokio_util::codec::LengthDelimitedCodec>,
        hoard_types::Hash,
    ) {
        let stream = TcpStream::connect(address).await.unwrap();
        let mut framed = Framed::new(stream, net::codec());
        let frame = tokio::time::timeout(Duration::from_secs(5), framed.next())
            .await
            .expect("a challenge in time")
            .expect("a frame")
            .unwrap();
        match NetMessage::decode(&frame).unwrap() {
            NetMessage::Challenge { nonce } => (framed, nonce),
            other => panic!("expected a challenge, got {other:?}"),
        }
    }
    /// Whether the replica closes the connection (reads end) within `wait`.
    async fn closed_within(
        framed: &mut Framed<TcpStream, tokio_util::codec::LengthDelimitedCodec>,
        wait: Duration,
    ) -> bool {
        matches!(
            tokio::time::timeout(wait, framed.next()).await,
            Ok(None) | Ok(Some(Err(_)))
        )
    }
    let (_, first) = challenged(address).await;
    let (_, second) = challenged(address).await;
    assert_ne!(first, second, "a nonce per connection");

    // Claims to be replica 1: with another key, with replica 1's key over another nonce (a
    // replayed hello), and as the replica itself.
    let quick = Duration::from_secs(3);
    let forged = [
        (1, key("mallory", 0), None),
        (1, key("replica", 1), Some(hoard_types::Hash([7; 32]))),
        (0, key("replica", 0), None),
        (9, key("replica", 1), None),
    ];
    for (id, signer, other_nonce) in forged {
        let (mut framed, nonce) = challenged(address).await;
        let signed = net::hello_signed_bytes(&other_nonce.unwrap_or(nonce), id);
        let hello = NetMessage::HelloReplica {
            id,
            signature: signer.sign(net::HELLO_DOMAIN, &signed),
        };
        framed.send(hello.encode()).await.unwrap();
        assert!(
            closed_within(&mut framed, quick).await,
            "hello as replica {id} accepted"
        );
    }
    // Claims to be a gateway: client 1 with another key, with client 1's key over another
    // nonce, a client the cluster file does not list, and replica 1's genuine replica hello
    // signature presented as client 1's (the domains differ).
    let forged_clients = [
        (1, key("mallory", 0), None, net::HELLO_CLIENT_DOMAIN),
        (
            1,
            hoard_ledger::testing::client_key(1),
            Some(hoard_types::Hash([7; 32])),
            net::HELLO_CLIENT_DOMAIN,
        ),
        (99, key("client", 99), None, net::HELLO_CLIENT_DOMAIN),
        (1, hoard_ledger::testing::client_key(1), None, net::HELLO_DOMAIN),
    ];
    for (client, signer, other_nonce, domain) in forged_clients {
        let (mut framed, nonce) = challenged(address).await;
        let signed = net::client_hello_signed_bytes(&other_nonce.unwrap_or(nonce), client);
        let hello = NetMessage::HelloClient {
            client,
            signature: signer.sign(domain, &signed),
        };
        framed.send(hello.encode()).await.unwrap();
        // Had it been served, a subscription from height 1 would bring blocks.
        let _ = framed
            .send(NetMessage::Subscribe { from_height: 1 }.encode())
            .await;
        assert!(
            closed_within(&mut framed, quick).await,
            "hello as client {client} accepted"
        );
    }

    // A first frame too large for a hello (its length is all it takes), and garbage.
    let (framed, _) = challenged(address).await;
    let mut stream = framed.into_inner();
    stream
        .write_all(&((64 * 1024 * 1024 - 1) as u32).to_be_bytes())
        .await
        .unwrap();
    let mut byte = [0u8; 1];
    assert_eq!(
        tokio::time::timeout(quick, stream.read(&mut byte))
            .await
            .unwrap()
            .unwrap_or(0),
        0,
        "an oversized hello is refused at its length"
    );
    let (mut framed, _) = challenged(address).await;
    framed.send(bytes::Bytes::from_static(b"\xc1\xc1")).await.unwrap();
    assert!(
        closed_within(&mut framed, quick).await,
        "garbage accepted as a hello"
    );

    let committed = tokio::time::timeout(within, client.submit(&[mint(&mut world)]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(committed.receipts[0].outcome, Outcome::Applied);

    // A client that connects again while its old connection is still open is served on the
    // new one, also after the old one ends.
    async fn client_connection(
        address: std::net::SocketAddr,
        client: u64,
    ) -> Framed<TcpStream, tokio_util::codec::LengthDelimitedCodec> {
        let (mut framed, nonce) = challenged(address).await;
        let hello = NetMessage::HelloClient {
            client,
            signature: hoard_ledger::testing::client_key(client).sign(
                net::HELLO_CLIENT_DOMAIN,
                &net::client_hello_signed_bytes(&nonce, client),
            ),
        };
        framed.send(hello.encode()).await.unwrap();
        framed
    }
    /// The next block frame's height on `framed`, within `wait`.
    async fn next_block(
        framed: &mut Framed<TcpStream, tokio_util::codec::LengthDelimitedCodec>,
        wait: Duration,
    ) -> Option<u64> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let frame = tokio::time::timeout_at(deadline, framed.next())
                .await
                .ok()??
                .ok()?;
            if let Ok(NetMessage::Block { height, .. }) = NetMessage::decode(&frame) {
                return Some(height);
            }
        }
    }
    let old = client_connection(address, 3).await;
    // The old connection is taken in before the new one says hello.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut new = client_connection(address, 3).await;
    new.send(NetMessage::Subscribe { from_height: 1 }.encode())
        .await
        .unwrap();
    assert_eq!(
        next_block(&mut new, within).await,
        Some(1),
        "the new connection is served"
    );
    drop(old);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let committed = tokio::time::timeout(within, client.submit(&[mint(&mut world)]))
        .await
        .unwrap()
        .unwrap();
    let mut newest = 0;
    while newest < committed.height {
        newest = next_block(&mut new, within)
            .await
            .expect("the new connection still gets blocks after the old one ended");
    }
    drop(new);

    // A genuine hello of replica 1 (its key, this connection's nonce) is served while replica 1
    // is down; when replica 1 comes back, its new connection takes the place and closes this
    // one. The cluster commits throughout.
    cluster.stop(1).await;
    let (mut framed, nonce) = challenged(address).await;
    let hello = NetMessage::HelloReplica {
        id: 1,
        signature: key("replica", 1).sign(net::HELLO_DOMAIN, &net::hello_signed_bytes(&nonce, 1)),
    };
    framed.send(hello.encode()).await.unwrap();
    let committed = tokio::time::timeout(within, client.submit(&[mint(&mut world)]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(committed.receipts[0].outcome, Outcome::Applied);
    assert!(
        !closed_within(&mut framed, Duration::from_secs(1)).await,
        "a genuine hello refused"
    );
    cluster.restart(1);
    assert!(
        closed_within(&mut framed, within).await,
        "replica 1's new connection did not take its place back"
    );

    // Callers that say nothing fill the handshake slots: one more is turned away at once, and
    // replicas and gateways still connect (their slots are their own) and commit.
    let mut silent = Vec::new();
    for _ in 0..hoard_ledger::node::HANDSHAKES_MAX {
        silent.push(challenged(address).await.0);
    }
    let mut turned_away = Framed::new(TcpStream::connect(address).await.unwrap(), net::codec());
    assert!(
        closed_within(&mut turned_away, quick).await,
        "a handshake beyond the limit"
    );
    let late = cluster.client(2);
    let committed = tokio::time::timeout(within, late.submit(&[mint(&mut world)]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(committed.receipts[0].outcome, Outcome::Applied);
    // Then each silent caller is closed after the hello timeout, and the slots are free again.
    let started = std::time::Instant::now();
    for framed in &mut silent {
        assert!(
            closed_within(framed, net::HELLO_TIMEOUT + Duration::from_secs(5)).await,
            "a caller that never said hello stays connected"
        );
    }
    assert!(started.elapsed() <= net::HELLO_TIMEOUT + Duration::from_secs(5));
    drop(silent);
    let (_, _) = challenged(address).await;

    let committed = tokio::time::timeout(within, client.submit(&[mint(&mut world)]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(committed.receipts[0].outcome, Outcome::Applied);
    let statuses = cluster
        .wait_for_height(committed.height, Duration::from_secs(30))
        .await;
    assert!(statuses.iter().all(|s| s.state_root == statuses[0].state_root));
    assert_eq!(minted, 5);
    cluster.shutdown().await;
}

/// A client whose hello a replica refuses (here: a stand-in that closes every connection right
/// after the hello) redials with backoff, not in a loop.
#[tokio::test]
async fn a_client_refused_after_its_hello_redials_with_backoff() {
    use futures::{SinkExt, StreamExt};
    use hoard_ledger::cluster::{Cluster, ReplicaInfo};
    use hoard_ledger::net::{codec, NetMessage};
    use tokio::net::TcpListener;
    use tokio_util::codec::Framed;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let world = World::new(1);
    let replicas = (0..4u32)
        .map(|id| ReplicaInfo {
            id,
            public_key: key("replica", u64::from(id)).public().to_hex(),
            address: if id == 0 {
                listener.local_addr().unwrap()
            } else {
                std::net::SocketAddr::from(([127, 0, 0, 1], hoard_ledger::testing::free_port()))
            },
            metrics: None,
        })
        .collect();
    let cluster = Cluster::new(world.genesis(), replicas).unwrap();
    let hellos = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = hellos.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let mut framed = Framed::new(stream, codec());
            let challenge = NetMessage::Challenge {
                nonce: hoard_types::Hash([5; 32]),
            };
            if framed.send(challenge.encode()).await.is_ok() {
                if let Some(Ok(frame)) = framed.next().await {
                    if let Ok(NetMessage::HelloClient { .. }) = NetMessage::decode(&frame) {
                        counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
            // Refused: closed.
        }
    });
    let client = ChainClient::connect(&cluster, 1, hoard_ledger::testing::client_key(1));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let seen = hellos.load(std::sync::atomic::Ordering::Relaxed);
    // Backoff 50, 100, 200, 400, 800 ms...: about 5 hellos in 2 s; a loop would make thousands.
    assert!((2..=10).contains(&seen), "{seen} hellos in 2 s");
    drop(client);
}
