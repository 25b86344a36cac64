//! Asset events end to end through a real WebSocket, a real Redis stream and the in-process
//! chain: permissions, exactly-once retries, reads, subscriptions, crash recovery, backpressure.

mod common;

/// XPENDING's summary: (count, smallest id, largest id, [(consumer, count)]).
type XPendingSummary = (u64, Option<String>, Option<String>, Option<Vec<(String, String)>>);

use std::time::Duration;

use common::*;
use hoard_ledger::testing::key;
use hoard_server::testing::{RedisServer, TestGateway, TestStore, WsClient};
use hoard_types::wire::{Click, ClientMessage, ErrorCode, EventState, ServerMessage};
use hoard_types::{Custody, Keypair, Outcome, TxBody};

#[tokio::test]
async fn events_commit_once_reads_follow_and_players_are_confined() {
    events_commit_once_reads_follow_and_players_are_confined_on(TestStore::redis()).await;
}

#[tokio::test]
async fn events_commit_once_through_the_embedded_store() {
    events_commit_once_reads_follow_and_players_are_confined_on(TestStore::embedded()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_commit_once_through_the_pbft_cluster() {
    let store = TestStore::redis();
    let gw = TestGateway::start_on_cluster(&store, |_| {}).await;
    events_commit_once_reads_follow_and_players_are_confined_with(gw).await;
}

async fn events_commit_once_reads_follow_and_players_are_confined_on(store: TestStore) {
    let gw = TestGateway::start(&store, |_| {}).await;
    events_commit_once_reads_follow_and_players_are_confined_with(gw).await;
}

async fn events_commit_once_reads_follow_and_players_are_confined_with(mut gw: TestGateway) {
    let alice = key("alice", 0);
    let bob = key("bob", 0);
    let mut studio1 = studio(&gw, T1).await;
    let mut watcher = studio(&gw, T1).await;
    let sub = request(&mut watcher, |request_id| ClientMessage::Subscribe {
        request_id,
        account: None,
        from_height: None,
    })
    .await;
    assert!(matches!(sub, ServerMessage::Subscribed { .. }), "{sub:?}");

    let txs = vec![
        gw.world.register(T1, &alice.public(), Custody::SelfCustody),
        gw.world.register(T1, &bob.public(), Custody::Custodial),
        gw.world.define_currency(T1, "GOLD", 1_000_000),
        gw.world.mint_currency(T1, &alice.public(), "GOLD", 500),
    ];
    let mut mint_height = 0;
    for tx in &txs {
        let (height, outcome) = commit(&mut studio1, tx).await;
        assert_eq!(outcome, Outcome::Applied);
        mint_height = height;
    }
    // A retry of a committed event: accepted again, the original outcome and height at once.
    let (again, outcome) = commit(&mut studio1, &txs[3]).await;
    assert_eq!((again, outcome), (mint_height, Outcome::Applied));
    // The subscription saw every event once, in commit order.
    let status = request(&mut studio1, |request_id| ClientMessage::EventStatus {
        request_id,
        event_id: event_id_of(&txs[3]),
    })
    .await;
    assert!(
        matches!(status, ServerMessage::EventStatus { state: EventState::Committed, height: Some(h), .. } if h == mint_height)
    );

    let mut alice_conn = player(&gw, T1, &alice).await;
    assert_eq!(balance(&mut alice_conn, alice.public(), "GOLD").await, 500);
    let denied = request(&mut alice_conn, |request_id| ClientMessage::Balances {
        request_id,
        account: bob.public(),
    })
    .await;
    assert_error(&denied, ErrorCode::Forbidden);

    // A player moves its own assets, signed by itself.
    let transfer = gw
        .world
        .transfer(T1, &alice, &alice.public(), &bob.public(), "GOLD", 120);
    assert_eq!(commit(&mut alice_conn, &transfer).await.1, Outcome::Applied);
    assert_eq!(balance(&mut studio1, bob.public(), "GOLD").await, 120);
    assert_eq!(balance(&mut alice_conn, alice.public(), "GOLD").await, 380);

    // A player may not mint, nor move someone else's assets, nor sign with another key.
    let mint = gw.world.mint_currency(T1, &alice.public(), "GOLD", 1);
    assert_error(&submit(&mut alice_conn, &mint).await, ErrorCode::Forbidden);
    let steal = gw
        .world
        .transfer(T1, &alice, &bob.public(), &alice.public(), "GOLD", 1);
    assert_error(&submit(&mut alice_conn, &steal).await, ErrorCode::Forbidden);
    let other_signer = gw
        .world
        .transfer(T1, &bob, &alice.public(), &bob.public(), "GOLD", 1);
    assert_error(
        &submit(&mut alice_conn, &other_signer).await,
        ErrorCode::Forbidden,
    );

    // A ledger rejection is a push, not an error.
    let too_much = gw
        .world
        .transfer(T1, &alice, &alice.public(), &bob.public(), "GOLD", 10_000);
    let (_, outcome) = commit(&mut alice_conn, &too_much).await;
    assert_eq!(
        outcome,
        Outcome::Rejected {
            reason: hoard_types::Rejection::InsufficientFunds
        }
    );

    // The tenant subscription got activity for each applied or rejected event, in order.
    let mut heights = Vec::new();
    while heights.len() < 6 {
        if let ServerMessage::Activity { height, body, .. } = watcher.recv().await {
            heights.push(height);
            if heights.len() == 5 {
                assert!(matches!(body, TxBody::Transfer { .. }));
            }
        }
    }
    assert!(heights.windows(2).all(|w| w[0] <= w[1]), "{heights:?}");

    // A late subscriber with from_height gets the history replayed, then live activity.
    let mut late = player(&gw, T1, &bob).await;
    let sub = request(&mut late, |request_id| ClientMessage::Subscribe {
        request_id,
        account: Some(bob.public()),
        from_height: Some(1),
    })
    .await;
    assert!(matches!(sub, ServerMessage::Subscribed { .. }));
    let first = late
        .recv_until(|m| matches!(m, ServerMessage::Activity { .. }))
        .await;
    assert!(
        matches!(
            first,
            ServerMessage::Activity {
                body: TxBody::RegisterAccount { .. },
                ..
            }
        ),
        "{first:?}"
    );

    // The gateway's ledger copy equals the chain's (every replica's, on a cluster).
    let ours = match &gw.cluster {
        None => {
            gw.wait_height(gw.chain().height()).await;
            let root = gw.chain().with_ledger(|l| l.state_root());
            assert_eq!(gw.gateway().shared().view.read(|l| l.state_root()), root);
            root
        }
        Some((cluster, _)) => {
            // No more blocks come: wait until every replica and the gateway's copy are at one
            // height, then their roots must be equal.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            loop {
                let ours = gw.gateway().shared().view.read(|l| (l.height(), l.state_root()));
                let replicas: Vec<_> = cluster
                    .statuses
                    .iter()
                    .map(|s| (s.borrow().height, s.borrow().state_root))
                    .collect();
                if replicas.iter().all(|(height, _)| *height == ours.0) {
                    for (_, root) in &replicas {
                        assert_eq!(*root, ours.1, "a replica and the gateway differ at {}", ours.0);
                    }
                    break ours.1;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "heights never met: gateway {ours:?}, replicas {replicas:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert_ne!(ours, hoard_types::Hash::ZERO);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_second_gateway_finishes_what_a_crashed_one_accepted_exactly_once() {
    let redis = RedisServer::start();
    // Gateway A accepts (durably) and its batcher reads the entries, but the chain is stalled
    // and A "crashes" with everything pending under its name.
    let mut a = TestGateway::start(&redis, |c| c.instance = "gateway-a".into()).await;
    let alice = key("alice", 0);
    let mut studio_a = studio(&a, T1).await;
    let setup = vec![
        a.world.register(T1, &alice.public(), Custody::SelfCustody),
        a.world.define_currency(T1, "GOLD", 1_000_000),
    ];
    for tx in &setup {
        assert_eq!(commit(&mut studio_a, tx).await.1, Outcome::Applied);
    }
    let start_height = a.chain().height();
    a.chain().set_paused(true);
    let mut txs = Vec::new();
    for _ in 0..20 {
        txs.push(a.world.mint_currency(T1, &alice.public(), "GOLD", 10));
    }
    for tx in &txs {
        let answer = submit(&mut studio_a, tx).await;
        assert!(matches!(answer, ServerMessage::Accepted { .. }), "{answer:?}");
    }
    let mut connection = redis.connection();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let pending: XPendingSummary = redis::cmd("XPENDING")
            .arg("hoard:events")
            .arg("hoard-gateways")
            .query(&mut connection)
            .unwrap();
        if pending.0 > 0 {
            // The batcher holds its first batch (blocked on the stalled chain); the rest is unread.
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "A's batcher did not read the entries"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let chain = a.chain().clone();
    let world = std::mem::replace(&mut a.world, hoard_ledger::testing::World::new(2));
    let mut config = a.config.clone();
    a.gateway.take().expect("running").abort();
    drop(studio_a);
    assert_eq!(chain.height(), start_height, "no mint reached the chain");
    chain.set_paused(false);

    // Gateway B, same Redis and chain, claims A's pending entries after claim_idle_ms.
    config.events.claim_idle_ms = 300;
    config.instance = "gateway-b".into();
    let b = TestGateway::start_on(chain.clone(), world, config).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let minted = b.gateway().shared().view.read(|l| {
            l.balance(T1, &hoard_types::CurrencyId::new("GOLD"), &alice.public())
                .0
        });
        if minted == 200 && b.gateway().shared().events.in_flight() == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "recovery did not finish: {minted}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Exactly once, on the chain itself. (Registration before mint: entries were claimed in
    // stream order; a mint committed before the registration would have been rejected and
    // the balance would be short.)
    let on_chain = chain.with_ledger(|l| {
        l.balance(T1, &hoard_types::CurrencyId::new("GOLD"), &alice.public())
            .0
    });
    assert_eq!(on_chain, 200);

    // A crash between commit and XACK: the entry comes back; it is acknowledged, not reapplied.
    let bytes = rmp_serde::to_vec(&txs[5]).unwrap();
    let _: String = redis::cmd("XADD")
        .arg("hoard:events")
        .arg("*")
        .arg("tx")
        .arg(bytes)
        .query(&mut connection)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pending: XPendingSummary = redis::cmd("XPENDING")
        .arg("hoard:events")
        .arg("hoard-gateways")
        .query(&mut connection)
        .unwrap();
    assert_eq!(pending.0, 0, "every entry acknowledged");
    assert_eq!(
        chain.with_ledger(|l| l
            .balance(T1, &hoard_types::CurrencyId::new("GOLD"), &alice.public())
            .0),
        200
    );
    let length: u64 = redis::cmd("XLEN")
        .arg("hoard:events")
        .query(&mut connection)
        .unwrap();
    assert_eq!(length, 0, "committed entries are deleted from the stream");
    b.shutdown().await;
}

#[tokio::test]
async fn a_stalled_chain_turns_into_busy_not_memory() {
    a_stalled_chain_turns_into_busy_not_memory_on(TestStore::redis()).await;
}

#[tokio::test]
async fn a_stalled_chain_turns_into_busy_not_memory_with_the_embedded_store() {
    a_stalled_chain_turns_into_busy_not_memory_on(TestStore::embedded()).await;
}

async fn a_stalled_chain_turns_into_busy_not_memory_on(store: TestStore) {
    let mut gw = TestGateway::start(&store, |c| c.events.pending_max = 3).await;
    let mut studio1 = studio(&gw, T1).await;
    gw.chain().set_paused(true);
    let (accepted, tx) = fill_until_busy(&mut gw, &mut studio1, "p", 3).await;
    // Pending is visible, then everything commits once the chain moves again.
    let status = request(&mut studio1, |request_id| ClientMessage::EventStatus {
        request_id,
        event_id: event_id_of(&accepted[0]),
    })
    .await;
    assert!(
        matches!(
            status,
            ServerMessage::EventStatus {
                state: EventState::Pending,
                ..
            }
        ),
        "{status:?}"
    );
    // A different transaction under an in-flight event id is a replay.
    let mut forged = gw
        .world
        .register(T1, &key("forger", 0).public(), Custody::Custodial);
    let mut payload = forged.decode_payload().unwrap();
    payload.event_id = event_id_of(&accepted[1]);
    forged = payload.sign(&[gw.studio(T1)]);
    assert_error(&submit(&mut studio1, &forged).await, ErrorCode::Replay);
    gw.chain().set_paused(false);
    for tx in &accepted {
        assert_eq!(
            wait_commit(&mut studio1, event_id_of(tx)).await.1,
            Outcome::Applied
        );
    }
    assert_eq!(commit(&mut studio1, &tx).await.1, Outcome::Applied);
    gw.shutdown().await;
}

/// Reads answer from committed state only: an accepted event that has not committed yet (the
/// chain is paused) changes no balance, inventory or item owner until its commit.
#[tokio::test]
async fn reads_see_an_accepted_event_only_once_it_commits() {
    let redis = RedisServer::start();
    let mut gw = TestGateway::start(&redis, |_| {}).await;
    let mut studio1 = studio(&gw, T1).await;
    let alice = key("alice", 0).public();
    for tx in [
        gw.world.register(T1, &alice, Custody::Custodial),
        gw.world.define_currency(T1, "GOLD", 1_000),
        gw.world.define_class(T1, "sword", false, 10),
        gw.world.mint_currency(T1, &alice, "GOLD", 10),
    ] {
        assert_eq!(commit(&mut studio1, &tx).await.1, Outcome::Applied);
    }
    gw.chain().set_paused(true);
    let gold = gw.world.mint_currency(T1, &alice, "GOLD", 5);
    let sword = gw.world.mint_unique(T1, &alice, "sword", 3);
    for tx in [&gold, &sword] {
        let answer = submit(&mut studio1, tx).await;
        assert!(matches!(answer, ServerMessage::Accepted { .. }), "{answer:?}");
    }
    assert_eq!(
        balance(&mut studio1, alice, "GOLD").await,
        10,
        "uncommitted mint not visible"
    );
    let inventory = request(&mut studio1, |request_id| ClientMessage::Inventory {
        request_id,
        account: alice,
    })
    .await;
    assert!(
        matches!(inventory, ServerMessage::Inventory { ref items, .. } if items.is_empty()),
        "{inventory:?}"
    );
    let item = request(&mut studio1, |request_id| ClientMessage::Item {
        request_id,
        item: hoard_types::ItemId(3),
    })
    .await;
    assert!(matches!(item, ServerMessage::Item { item: None, .. }), "{item:?}");
    gw.chain().set_paused(false);
    for tx in [&gold, &sword] {
        assert_eq!(
            wait_commit(&mut studio1, event_id_of(tx)).await.1,
            Outcome::Applied
        );
    }
    assert_eq!(balance(&mut studio1, alice, "GOLD").await, 15);
    let item = request(&mut studio1, |request_id| ClientMessage::Item {
        request_id,
        item: hoard_types::ItemId(3),
    })
    .await;
    assert!(
        matches!(item, ServerMessage::Item { item: Some(ref i), .. } if i.owner == alice),
        "{item:?}"
    );
    gw.shutdown().await;
}

/// Graceful shutdown drains before it closes: `/readyz` turns 503, new events and clicks are
/// refused with `shutting_down` while the connection stays open, an event accepted before the
/// stop still reaches its connection as a `committed` push, and only then comes the 1001 close.
#[tokio::test]
async fn a_graceful_shutdown_pushes_drained_commits_before_it_closes() {
    let redis = RedisServer::start();
    let mut gw = TestGateway::start(&redis, |c| c.drain_timeout_ms = 20_000).await;
    let mut studio1 = studio(&gw, T1).await;
    let chain = gw.chain().clone();
    let http = gw.gateway().http_addr();
    chain.set_paused(true);
    let tx = gw
        .world
        .register(T1, &key("drained", 0).public(), Custody::Custodial);
    let answer = submit(&mut studio1, &tx).await;
    assert!(matches!(answer, ServerMessage::Accepted { .. }), "{answer:?}");
    let late = gw
        .world
        .register(T1, &key("late", 0).public(), Custody::Custodial);
    let shutdown = tokio::spawn(gw.shutdown());
    let started = std::time::Instant::now();
    while http_get(http, "/readyz").await.starts_with("HTTP/1.1 200") {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "readyz stays 200 while stopping"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_error(&submit(&mut studio1, &late).await, ErrorCode::ShuttingDown);
    let request_id = studio1.request_id();
    let clicks = studio1
        .request(ClientMessage::Clicks {
            request_id,
            clicks: vec![Click(key("drained", 0).public(), "gold".into(), 1)],
        })
        .await;
    assert_error(&clicks, ErrorCode::ShuttingDown);
    // Reads are still answered while draining.
    let head = request(&mut studio1, |request_id| ClientMessage::Head { request_id }).await;
    assert!(matches!(head, ServerMessage::Head { .. }), "{head:?}");
    chain.set_paused(false);
    assert_eq!(
        wait_commit(&mut studio1, event_id_of(&tx)).await.1,
        Outcome::Applied
    );
    let close = studio1.closed().await.expect("a close frame");
    assert_eq!(u16::from(close.code), hoard_types::wire::close_code::GOING_AWAY);
    shutdown.await.unwrap();
}

/// An accept whose swap cannot be made durable (Redis hangs; the stream write times out) gets
/// `unavailable`, and the offer is not closed: it is back in the book, and accepting it again
/// once Redis answers settles the swap.
#[tokio::test]
async fn an_accept_that_is_not_durable_leaves_the_offer_open() {
    let redis = RedisServer::start();
    let mut gw = TestGateway::start(&redis, |c| c.redis.command_timeout_ms = 300).await;
    let Traders {
        alice,
        bob,
        mut alice_conn,
        mut bob_conn,
        ..
    } = traders(&mut gw).await;
    let offer_tx = gold_for_item(&mut gw.world, &alice, &bob.public(), 7, 40);
    let offer = open_offer(&mut alice_conn, offer_tx, 60_000).await;
    let signature = bob.sign(hoard_types::tx::TX_SIGNING_DOMAIN, &offer.tx.payload);
    let accept = |request_id| ClientMessage::Accept {
        request_id,
        offer_id: offer.offer_id,
        signature: Some(signature),
    };

    redis.set_running(false);
    let refused = request(&mut bob_conn, accept).await;
    redis.set_running(true);
    assert_error(&refused, ErrorCode::Unavailable);
    let listed = request(&mut alice_conn, |request_id| ClientMessage::Offers { request_id }).await;
    let ServerMessage::Offers { offers, .. } = listed else {
        panic!("{listed:?}")
    };
    assert!(
        offers.iter().any(|o| o.offer_id == offer.offer_id),
        "the offer is open again after an accept that was not durable: {offers:?}"
    );

    let accepted = request(&mut bob_conn, accept).await;
    assert!(matches!(accepted, ServerMessage::Accepted { .. }), "{accepted:?}");
    assert_eq!(
        wait_commit(&mut bob_conn, offer.offer_id).await.1,
        Outcome::Applied
    );
    offer_closed_accepted(&mut alice_conn).await;
    gw.shutdown().await;
}

/// An offer whose swap's `expires_at` the chain passed while it was open (its `ttl_ms` has not
/// run out): `accept` is refused with `expired`, as `submit` refuses an expired transaction,
/// before the chain sees the swap, and the offer closes as `expired` for maker and taker.
#[tokio::test]
async fn an_accept_after_the_swap_expired_is_refused_and_closes_the_offer() {
    let redis = RedisServer::start();
    let mut gw = TestGateway::start(&redis, |_| {}).await;
    let Traders {
        alice,
        bob,
        mut studio1,
        mut alice_conn,
        mut bob_conn,
    } = traders(&mut gw).await;
    let head = request(&mut studio1, |request_id| ClientMessage::Head { request_id }).await;
    let ServerMessage::Head { height, .. } = head else {
        panic!("{head:?}")
    };
    // A swap that may apply up to two blocks from now, in an offer open for a minute.
    let expires_at = height + 2;
    let usual_expiry = std::mem::replace(&mut gw.world.expires_at, expires_at);
    let offer_tx = gold_for_item(&mut gw.world, &alice, &bob.public(), 7, 40);
    gw.world.expires_at = usual_expiry;
    let offer = open_offer(&mut alice_conn, offer_tx, 60_000).await;
    // Blocks go by until the head reaches the swap's last height.
    for index in 0..expires_at - height {
        let tx = gw
            .world
            .register(T1, &key("filler", index).public(), Custody::Custodial);
        assert_eq!(commit(&mut studio1, &tx).await.1, Outcome::Applied);
    }
    gw.wait_height(expires_at).await;

    let signature = bob.sign(hoard_types::tx::TX_SIGNING_DOMAIN, &offer.tx.payload);
    let accept = |request_id| ClientMessage::Accept {
        request_id,
        offer_id: offer.offer_id,
        signature: Some(signature),
    };
    let refused = request(&mut bob_conn, accept).await;
    assert_error(&refused, ErrorCode::Expired);
    for conn in [&mut bob_conn, &mut alice_conn] {
        let closed = conn
            .recv_until(|m| matches!(m, ServerMessage::OfferClosed { .. }))
            .await;
        assert_eq!(
            closed,
            ServerMessage::OfferClosed {
                offer_id: offer.offer_id,
                reason: hoard_types::wire::OfferCloseReason::Expired,
            }
        );
    }
    let listed = request(&mut alice_conn, |request_id| ClientMessage::Offers { request_id }).await;
    assert!(
        matches!(listed, ServerMessage::Offers { ref offers, .. } if offers.is_empty()),
        "{listed:?}"
    );
    assert_error(&request(&mut bob_conn, accept).await, ErrorCode::NotFound);
    // The swap never went to the chain.
    let status = request(&mut bob_conn, |request_id| ClientMessage::EventStatus {
        request_id,
        event_id: offer.offer_id,
    })
    .await;
    assert!(
        matches!(
            status,
            ServerMessage::EventStatus {
                state: EventState::Unknown,
                ..
            }
        ),
        "{status:?}"
    );
    gw.shutdown().await;
}

/// Backpressure on the real cluster: with two of four replicas down nothing commits (2f+1 = 3),
/// accepted events stay in flight up to `pending_max`, the next gets `busy`; once the replicas
/// are back, every accepted event commits once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_pbft_cluster_turns_into_busy_and_everything_commits_once_it_is_back() {
    let store = TestStore::redis();
    let mut gw = TestGateway::start_on_cluster(&store, |c| c.events.pending_max = 3).await;
    let mut studio1 = studio(&gw, T1).await;
    let first = gw.world.register(T1, &key("q", 0).public(), Custody::Custodial);
    assert_eq!(commit(&mut studio1, &first).await.1, Outcome::Applied);
    {
        let (cluster, _) = gw.cluster.as_mut().expect("on a cluster");
        cluster.stop(2).await;
        cluster.stop(3).await;
    }
    let (accepted, late) = fill_until_busy(&mut gw, &mut studio1, "r", 3).await;
    {
        let (cluster, _) = gw.cluster.as_mut().expect("on a cluster");
        cluster.restart(2);
        cluster.restart(3);
    }
    for tx in &accepted {
        assert_eq!(
            wait_commit(&mut studio1, event_id_of(tx)).await.1,
            Outcome::Applied
        );
    }
    assert_eq!(commit(&mut studio1, &late).await.1, Outcome::Applied);
    // Once each: resubmitting an accepted event answers its one outcome.
    assert_eq!(commit(&mut studio1, &accepted[0]).await.1, Outcome::Applied);
    gw.shutdown().await;
}

#[tokio::test]
async fn players_trade_through_offers_as_one_atomic_swap() {
    let redis = RedisServer::start();
    let mut gw = TestGateway::start(&redis, |_| {}).await;
    let alice = key("alice", 0);
    let bob = key("bob", 0);
    let carol = key("carol", 0);
    let mut studio1 = studio(&gw, T1).await;
    let setup = vec![
        gw.world.register(T1, &alice.public(), Custody::SelfCustody),
        gw.world.register(T1, &bob.public(), Custody::SelfCustody),
        gw.world.register(T1, &carol.public(), Custody::Custodial),
        gw.world.define_currency(T1, "GOLD", 1_000_000),
        gw.world.define_class(T1, "sword", false, 100),
        gw.world.mint_currency(T1, &alice.public(), "GOLD", 100),
        gw.world.mint_unique(T1, &bob.public(), "sword", 7),
        gw.world.mint_unique(T1, &carol.public(), "sword", 8),
    ];
    for tx in &setup {
        assert_eq!(commit(&mut studio1, tx).await.1, Outcome::Applied);
    }
    let mut alice_conn = player(&gw, T1, &alice).await;
    let mut bob_conn = player(&gw, T1, &bob).await;
    let swap = |world: &mut hoard_ledger::testing::World,
                taker: &hoard_types::PublicKey,
                item: u64,
                gold: u128| { gold_for_item(world, &alice, taker, item, gold) };

    // Offer, then accept with the taker's signature.
    let offer_tx = swap(&mut gw.world, &bob.public(), 7, 50);
    let offer = open_offer(&mut alice_conn, offer_tx.clone(), 60_000).await;
    let received = bob_conn
        .recv_until(|m| matches!(m, ServerMessage::OfferReceived { .. }))
        .await;
    assert!(
        matches!(received, ServerMessage::OfferReceived { offer: ref o } if o.offer_id == offer.offer_id)
    );
    let signature = bob.sign(hoard_types::tx::TX_SIGNING_DOMAIN, &offer.tx.payload);
    let bad = request(&mut bob_conn, |request_id| ClientMessage::Accept {
        request_id,
        offer_id: offer.offer_id,
        signature: Some(alice.sign(hoard_types::tx::TX_SIGNING_DOMAIN, &offer.tx.payload)),
    })
    .await;
    assert_error(&bad, ErrorCode::BadSignature);
    let stranger = request(&mut alice_conn, |request_id| ClientMessage::Accept {
        request_id,
        offer_id: offer.offer_id,
        signature: Some(signature),
    })
    .await;
    assert_error(&stranger, ErrorCode::Forbidden);
    let accepted = request(&mut bob_conn, |request_id| ClientMessage::Accept {
        request_id,
        offer_id: offer.offer_id,
        signature: Some(signature),
    })
    .await;
    assert!(matches!(accepted, ServerMessage::Accepted { .. }), "{accepted:?}");
    assert_eq!(
        wait_commit(&mut bob_conn, offer.offer_id).await.1,
        Outcome::Applied
    );
    offer_closed_accepted(&mut alice_conn).await;
    let inventory = request(&mut alice_conn, |request_id| ClientMessage::Inventory {
        request_id,
        account: alice.public(),
    })
    .await;
    assert!(
        matches!(inventory, ServerMessage::Inventory { ref items, .. } if items.len() == 1 && items[0].0 == hoard_types::ItemId(7))
    );
    assert_eq!(balance(&mut studio1, bob.public(), "GOLD").await, 50);
    let item = request(&mut bob_conn, |request_id| ClientMessage::Item {
        request_id,
        item: hoard_types::ItemId(7),
    })
    .await;
    let ServerMessage::Item { history, .. } = item else {
        panic!()
    };
    assert_eq!(history.len(), 2, "minted, then swapped: {history:?}");

    // A custodial taker: the gateway signs with the studio key.
    let mut carol_conn = player(&gw, T1, &carol).await;
    let offer_tx = swap(&mut gw.world, &carol.public(), 8, 10);
    let offer = open_offer(&mut alice_conn, offer_tx, 60_000).await;
    let accepted = request(&mut carol_conn, |request_id| ClientMessage::Accept {
        request_id,
        offer_id: offer.offer_id,
        signature: None,
    })
    .await;
    assert!(matches!(accepted, ServerMessage::Accepted { .. }), "{accepted:?}");
    assert_eq!(
        wait_commit(&mut carol_conn, offer.offer_id).await.1,
        Outcome::Applied
    );

    // Cancel and expiry.
    let offer_tx = swap(&mut gw.world, &bob.public(), 7, 1);
    let offer = open_offer(&mut alice_conn, offer_tx, 60_000).await;
    let request_id = alice_conn.request_id();
    alice_conn
        .send(&ClientMessage::Cancel {
            request_id,
            offer_id: offer.offer_id,
        })
        .await;
    let closed = alice_conn
        .recv_until(
            |m| matches!(m, ServerMessage::OfferClosed { offer_id, .. } if *offer_id == offer.offer_id),
        )
        .await;
    assert!(matches!(
        closed,
        ServerMessage::OfferClosed {
            reason: hoard_types::wire::OfferCloseReason::Cancelled,
            ..
        }
    ));
    let offer_tx = swap(&mut gw.world, &bob.public(), 7, 2);
    let short = open_offer(&mut alice_conn, offer_tx, 50).await;
    let closed = bob_conn
        .recv_until(
            |m| matches!(m, ServerMessage::OfferClosed { offer_id, .. } if *offer_id == short.offer_id),
        )
        .await;
    assert!(matches!(
        closed,
        ServerMessage::OfferClosed {
            reason: hoard_types::wire::OfferCloseReason::Expired,
            ..
        }
    ));
    let listed = request(&mut bob_conn, |request_id| ClientMessage::Offers { request_id }).await;
    assert!(
        matches!(listed, ServerMessage::Offers { ref offers, .. } if offers.is_empty()),
        "{listed:?}"
    );
    let gone = request(&mut bob_conn, |request_id| ClientMessage::Accept {
        request_id,
        offer_id: offer.offer_id,
        signature: None,
    })
    .await;
    assert_error(&gone, ErrorCode::NotFound);
    drop(WsClient::connect(&gw.url()).await);
    gw.shutdown().await;
}

/// A tenant whose deduplication window is full: the ledger refuses its new event with
/// `window_full` and does not remember it; the gateway keeps it in flight and resubmits it
/// (the stream entry stays pending and is claimed again), so the client hears `committed`
/// once older events expired, never `rejected`.
#[tokio::test]
async fn a_full_deduplication_window_delays_an_event_and_never_rejects_it() {
    let store = TestStore::redis();
    let mut world = hoard_ledger::testing::World::new(2);
    world.window_cap = Some(3);
    let chain = hoard_server::LocalChain::new(&world.genesis());
    let config = hoard_server::testing::test_config(&store, &world);
    let mut gw = TestGateway::start_on(chain, world, config).await;
    let alice = key("alice", 0);
    let mut studio1 = studio(&gw, T1).await;
    gw.world.expires_at = 4;
    let fill = vec![
        gw.world.register(T1, &alice.public(), Custody::Custodial),
        gw.world.define_currency(T1, "GOLD", 1_000_000),
        gw.world.mint_currency(T1, &alice.public(), "GOLD", 500),
    ];
    for tx in &fill {
        assert_eq!(commit(&mut studio1, tx).await.1, Outcome::Applied);
    }
    gw.world.expires_at = 1_000;
    let held = gw.world.mint_currency(T1, &alice.public(), "GOLD", 7);
    let (height, outcome) = commit(&mut studio1, &held).await;
    assert_eq!(outcome, Outcome::Applied);
    assert!(height > 4, "applied at {height}, before the window had room");
    assert_eq!(balance(&mut studio1, alice.public(), "GOLD").await, 507);
    let metrics = http_get(gw.gateway().http_addr(), "/metrics").await;
    assert!(counter_value(&metrics, "hoard_gateway_events_window_full_total") >= 1);
    gw.shutdown().await;
}

/// What the lost-entry sweep (`Events::forget_lost`) asks a real Redis: an appended entry is
/// in the stream; an acknowledged one (XACK + XDEL) and an id never written are not.
#[tokio::test]
async fn the_stream_says_which_entries_it_still_holds() {
    let redis = RedisServer::start();
    let mut config = hoard_server::config::GatewayConfig::default();
    config.redis.url = redis.url();
    let store = hoard_server::store::Store::open(&config).unwrap();
    store.ensure_group().await.unwrap();
    let ids = store
        .append(&[b"one".as_slice(), b"two".as_slice()])
        .await
        .unwrap();
    store.ack(&ids[1..]).await.unwrap();
    let asked = vec![ids[0].clone(), ids[1].clone(), "1-0".to_string()];
    assert_eq!(store.present(&asked).await.unwrap(), vec![true, false, false]);
}

/// Redis loses an accepted event's stream entry without losing the gateway's marker (AOF
/// `everysec`: the last second before a crash; here an XDEL behind the gateway's back while the
/// chain is paused). The gateway's sweep forgets the event (`event_status`: unknown), the
/// client's resubmission is appended again, and once the chain moves the event applies once.
#[tokio::test]
async fn an_event_whose_stream_entry_redis_lost_is_forgotten_then_resubmitted_and_applied_once() {
    let store = TestStore::redis();
    let mut gw = TestGateway::start(&store, |c| c.events.claim_idle_ms = 500).await;
    let mut studio1 = studio(&gw, T1).await;
    let alice = key("alice", 0);
    let setup = [
        gw.world.define_currency(T1, "GOLD", 1_000_000),
        gw.world.register(T1, &alice.public(), Custody::Custodial),
    ];
    for tx in &setup {
        assert_eq!(commit(&mut studio1, tx).await.1, Outcome::Applied);
    }
    gw.chain().set_paused(true);
    let mint = gw.world.mint_currency(T1, &alice.public(), "GOLD", 7);
    let event_id = event_id_of(&mint);
    assert!(matches!(
        submit(&mut studio1, &mint).await,
        ServerMessage::Accepted { .. }
    ));
    // Redis loses the entry (and its pending record).
    let redis = store.redis_server().expect("a real Redis");
    let mut connection = redis.connection();
    let stream = gw.gateway().shared().config.redis.stream.clone();
    let group = gw.gateway().shared().config.redis.group.clone();
    let entries: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(&stream)
        .arg("-")
        .arg("+")
        .query(&mut connection)
        .unwrap();
    assert_eq!(entries.ids.len(), 1, "the accepted event is in the stream");
    let id = entries.ids[0].id.clone();
    let _: () = redis::cmd("XACK")
        .arg(&stream)
        .arg(&group)
        .arg(&id)
        .query(&mut connection)
        .unwrap();
    let _: () = redis::cmd("XDEL")
        .arg(&stream)
        .arg(&id)
        .query(&mut connection)
        .unwrap();
    // Within a sweep interval plus claim_idle_ms, the event reads `unknown`.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let answer = request(&mut studio1, |request_id| ClientMessage::EventStatus {
            request_id,
            event_id,
        })
        .await;
        match answer {
            ServerMessage::EventStatus {
                state: EventState::Unknown,
                ..
            } => break,
            ServerMessage::EventStatus {
                state: EventState::Pending,
                ..
            } => assert!(
                std::time::Instant::now() < deadline,
                "the lost event still reads pending"
            ),
            other => panic!("{other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The client resubmits (the SDK does so for every accepted event that reads `unknown`).
    assert!(matches!(
        submit(&mut studio1, &mint).await,
        ServerMessage::Accepted { .. }
    ));
    gw.chain().set_paused(false);
    assert_eq!(wait_commit(&mut studio1, event_id).await.1, Outcome::Applied);
    assert_eq!(balance(&mut studio1, alice.public(), "GOLD").await, 7);
    gw.shutdown().await;
}

/// A swap: `maker` gives `gold` GOLD for `taker`'s unique item `item`, signed by the maker.
/// Two self-custody players of tenant 1 connected, alice with 100 GOLD and bob with sword 7, and
/// the studio's connection: the parties of an offer.
struct Traders {
    alice: Keypair,
    bob: Keypair,
    studio1: WsClient,
    alice_conn: WsClient,
    bob_conn: WsClient,
}

async fn traders(gw: &mut TestGateway) -> Traders {
    let alice = key("alice", 0);
    let bob = key("bob", 0);
    let mut studio1 = studio(gw, T1).await;
    for tx in [
        gw.world.register(T1, &alice.public(), Custody::SelfCustody),
        gw.world.register(T1, &bob.public(), Custody::SelfCustody),
        gw.world.define_currency(T1, "GOLD", 1_000),
        gw.world.define_class(T1, "sword", false, 10),
        gw.world.mint_currency(T1, &alice.public(), "GOLD", 100),
        gw.world.mint_unique(T1, &bob.public(), "sword", 7),
    ] {
        assert_eq!(commit(&mut studio1, &tx).await.1, Outcome::Applied);
    }
    let alice_conn = player(gw, T1, &alice).await;
    let bob_conn = player(gw, T1, &bob).await;
    Traders {
        alice,
        bob,
        studio1,
        alice_conn,
        bob_conn,
    }
}

fn gold_for_item(
    world: &mut hoard_ledger::testing::World,
    maker: &hoard_types::Keypair,
    taker: &hoard_types::PublicKey,
    item: u64,
    gold: u128,
) -> hoard_types::Transaction {
    let body = TxBody::Swap {
        left: hoard_types::SwapSide {
            account: maker.public(),
            gives: vec![hoard_types::Asset::Currency {
                currency: hoard_types::CurrencyId::new("GOLD"),
                amount: hoard_types::Amount(gold),
            }],
        },
        right: hoard_types::SwapSide {
            account: *taker,
            gives: vec![hoard_types::Asset::Item {
                item: hoard_types::ItemId(item),
            }],
        },
    };
    world.tx(T1, body, &[maker])
}

/// Waits for an `offer_closed {reason: accepted}` push.
async fn offer_closed_accepted(client: &mut WsClient) {
    client
        .recv_until(|m| {
            matches!(
                m,
                ServerMessage::OfferClosed {
                    reason: hoard_types::wire::OfferCloseReason::Accepted,
                    ..
                }
            )
        })
        .await;
}

/// Submits `pending_max` registrations (accepted, none can commit), then one more, which must get
/// `busy` with a retry hint. Returns the accepted transactions and the refused one.
async fn fill_until_busy(
    gw: &mut TestGateway,
    studio: &mut WsClient,
    label: &str,
    pending_max: u64,
) -> (Vec<hoard_types::Transaction>, hoard_types::Transaction) {
    let mut accepted = Vec::new();
    for index in 0..pending_max {
        let tx = gw
            .world
            .register(T1, &key(label, index).public(), Custody::Custodial);
        let answer = submit(studio, &tx).await;
        assert!(matches!(answer, ServerMessage::Accepted { .. }), "{answer:?}");
        accepted.push(tx);
    }
    let refused = gw
        .world
        .register(T1, &key(label, 999).public(), Custody::Custodial);
    match submit(studio, &refused).await {
        ServerMessage::Error {
            code: ErrorCode::Busy,
            retry_after_ms: Some(ms),
            ..
        } => assert!(ms > 0),
        other => panic!("expected busy, got {other:?}"),
    }
    (accepted, refused)
}

/// Sends `offer {tx, ttl_ms}` and returns the opened offer.
async fn open_offer(
    maker: &mut WsClient,
    tx: hoard_types::Transaction,
    ttl_ms: u64,
) -> hoard_types::wire::OfferInfo {
    let opened = request(maker, |request_id| ClientMessage::Offer {
        request_id,
        tx,
        ttl_ms,
    })
    .await;
    let ServerMessage::OfferOpened { offer, .. } = opened else {
        panic!("{opened:?}")
    };
    offer
}
