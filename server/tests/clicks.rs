//! Clicks into a real Redis (and the embedded store), reads back, strict acknowledgement, and
//! settlement exactly once.

mod common;

use std::time::Duration;

use common::*;
use hoard_ledger::testing::key;
use hoard_server::store;
use hoard_server::testing::{RedisServer, TestGateway, TestStore};
use hoard_types::wire::{Click, ClientMessage, ErrorCode, ServerMessage};
use hoard_types::{Custody, Outcome};
use redis::Commands;

async fn click(client: &mut hoard_server::testing::WsClient, seq: u64, clicks: Vec<Click>) -> ServerMessage {
    client
        .send(&ClientMessage::Clicks {
            request_id: seq,
            clicks,
        })
        .await;
    client
        .recv_until(|m| matches!(m, ServerMessage::ClicksAck { .. } | ServerMessage::Error { .. }))
        .await
}

#[tokio::test]
async fn clicks_are_counted_in_redis_and_settled_exactly_once() {
    clicks_are_counted_and_settled_exactly_once(TestStore::redis()).await;
}

#[tokio::test]
async fn clicks_are_counted_in_the_embedded_store_and_settled_exactly_once() {
    clicks_are_counted_and_settled_exactly_once(TestStore::embedded()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clicks_are_counted_and_settled_exactly_once_through_the_pbft_cluster() {
    let store = TestStore::redis();
    let gw = TestGateway::start_on_cluster(&store, |_| {}).await;
    clicks_are_counted_and_settled_exactly_once_with(&store, gw).await;
}

async fn clicks_are_counted_and_settled_exactly_once(store: TestStore) {
    let gw = TestGateway::start(&store, |_| {}).await;
    clicks_are_counted_and_settled_exactly_once_with(&store, gw).await;
}

async fn clicks_are_counted_and_settled_exactly_once_with(store: &TestStore, mut gw: TestGateway) {
    let (alice, bob, carol) = (key("alice", 0), key("bob", 0), key("carol", 0));
    let mut studio1 = studio(&gw, T1).await;
    let gold = |p: &hoard_types::Keypair, n| Click(p.public(), "gold".into(), n);

    let ack = click(
        &mut studio1,
        10,
        vec![
            gold(&alice, 200),
            gold(&bob, 40),
            gold(&carol, 130),
            gold(&alice, 50),
        ],
    )
    .await;
    assert_eq!(ack, ServerMessage::ClicksAck { up_to: 10 });
    // Sequence numbers must increase.
    assert_error(
        &click(&mut studio1, 10, vec![gold(&alice, 1)]).await,
        ErrorCode::Invalid,
    );
    // Bad values refuse the whole message.
    assert_error(
        &click(&mut studio1, 11, vec![gold(&alice, 1), gold(&bob, 0)]).await,
        ErrorCode::Invalid,
    );
    assert_error(
        &click(
            &mut studio1,
            12,
            vec![Click(alice.public(), "Bad Name".into(), 1)],
        )
        .await,
        ErrorCode::Invalid,
    );
    tokio::time::sleep(Duration::from_millis(100)).await;

    if let Some(redis) = store.redis_server() {
        let alice_total: u64 = redis
            .connection()
            .hget(store::counter_key(T1, "gold"), alice.public().to_hex())
            .unwrap();
        assert_eq!(alice_total, 250);
    }
    assert_eq!(
        gw.store()
            .player_total(T1, "gold", &alice.public())
            .await
            .unwrap(),
        250
    );
    let total = request(&mut studio1, |request_id| ClientMessage::Counter {
        request_id,
        counter: "gold".into(),
        player: Some(carol.public()),
    })
    .await;
    assert_eq!(
        total,
        ServerMessage::Counter {
            request_id: total_id(&total),
            counter: "gold".into(),
            total: 420,
            player_total: Some(130)
        }
    );
    let board = request(&mut studio1, |request_id| ClientMessage::Leaderboard {
        request_id,
        counter: "gold".into(),
        limit: 2,
    })
    .await;
    let ServerMessage::Leaderboard { entries, .. } = board else {
        panic!("{board:?}")
    };
    assert_eq!(entries, vec![(alice.public(), 250), (carol.public(), 130)]);

    // Players click only for themselves and read only their own totals.
    let mut bob_conn = player(&gw, T1, &bob).await;
    assert_eq!(
        click(&mut bob_conn, 1, vec![gold(&bob, 5)]).await,
        ServerMessage::ClicksAck { up_to: 1 }
    );
    assert_error(
        &click(&mut bob_conn, 2, vec![gold(&alice, 5)]).await,
        ErrorCode::Forbidden,
    );
    let theirs = request(&mut bob_conn, |request_id| ClientMessage::PlayerTotals {
        request_id,
        player: alice.public(),
    })
    .await;
    assert_error(&theirs, ErrorCode::Forbidden);
    let board = request(&mut bob_conn, |request_id| ClientMessage::Leaderboard {
        request_id,
        counter: "gold".into(),
        limit: 2,
    })
    .await;
    assert_error(&board, ErrorCode::Forbidden);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mine = request(&mut bob_conn, |request_id| ClientMessage::PlayerTotals {
        request_id,
        player: bob.public(),
    })
    .await;
    assert!(
        matches!(mine, ServerMessage::PlayerTotals { ref totals, .. } if totals == &vec![("gold".to_string(), 45)]),
        "{mine:?}"
    );

    // Settlement: alice and carol are registered, bob is not (his points wait).
    for tx in [
        gw.world.register(T1, &alice.public(), Custody::Custodial),
        gw.world.register(T1, &carol.public(), Custody::SelfCustody),
        gw.world.define_currency(T1, "GOLD", 1_000_000),
    ] {
        assert_eq!(commit(&mut studio1, &tx).await.1, Outcome::Applied);
    }
    let (window, event_ids, entries) = settle(&mut studio1).await;
    assert_eq!((entries, event_ids.len()), (2, 1));
    // Windows are numbered from the clock, in microseconds.
    assert!(window > 1_600_000_000_000_000, "window {window}");
    wait_event(&gw, event_ids[0]).await;
    assert_eq!(balance(&mut studio1, alice.public(), "GOLD").await, 2);
    assert_eq!(balance(&mut studio1, carol.public(), "GOLD").await, 1);
    let unsettled = gw.store().unsettled(T1, "gold").await.unwrap();
    assert_eq!(unsettled.get(&alice.public().to_hex()), Some(&50));
    assert_eq!(unsettled.get(&carol.public().to_hex()), Some(&30));
    assert_eq!(unsettled.get(&bob.public().to_hex()), Some(&45));

    let first = window;

    // Nothing due: an empty window, numbered above the first.
    let (second, _, entries) = settle(&mut studio1).await;
    assert_eq!(entries, 0);
    assert!(second > first, "{first} then {second}");

    // Settling the first window again (a crash before the window advanced) changes nothing.
    gw.store().set_settle_window(T1, first).await.unwrap();
    let again = request(&mut studio1, |request_id| ClientMessage::Settle { request_id }).await;
    let ServerMessage::Settlement {
        window: again_window,
        event_ids: again_ids,
        ..
    } = again
    else {
        panic!("{again:?}")
    };
    assert_eq!((again_window, again_ids), (first, event_ids));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(balance(&mut studio1, alice.public(), "GOLD").await, 2);
    assert_eq!(balance(&mut studio1, carol.public(), "GOLD").await, 1);

    // The carried remainder counts toward the next window.
    assert_eq!(
        click(&mut studio1, 20, vec![gold(&alice, 50)]).await,
        ServerMessage::ClicksAck { up_to: 20 }
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (third, event_ids, entries) = settle(&mut studio1).await;
    assert_eq!(entries, 1);
    // The redo advanced the counter to `first + 1`, below `second`: the cut's clock takes the
    // window past both (before, this test had to skip the used number by hand).
    assert!(third > second, "{second} then {third}");
    wait_event(&gw, event_ids[0]).await;
    assert_eq!(balance(&mut studio1, alice.public(), "GOLD").await, 3);

    // Players may not settle.
    let denied = request(&mut bob_conn, |request_id| ClientMessage::Settle { request_id }).await;
    assert_error(&denied, ErrorCode::Forbidden);
    gw.shutdown().await;
}

fn total_id(message: &ServerMessage) -> u64 {
    hoard_server::testing::response_id(message).unwrap()
}

async fn wait_event(gw: &TestGateway, event_id: hoard_types::EventId) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while gw
        .gateway()
        .shared()
        .view
        .read(|l| l.event(T1, &event_id).is_none())
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "settlement did not commit"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn strict_mode_acks_only_what_redis_holds_and_shutdown_flushes() {
    let redis = RedisServer::start();
    let gw = TestGateway::start(&redis, |c| {
        c.clicks.strict = true;
        c.clicks.flush_interval_ms = 200;
    })
    .await;
    let alice = key("alice", 0);
    let mut studio1 = studio(&gw, T1).await;
    let mut connection = redis.connection();
    for seq in 1..=3u64 {
        let ack = click(&mut studio1, seq, vec![Click(alice.public(), "gold".into(), 7)]).await;
        assert_eq!(ack, ServerMessage::ClicksAck { up_to: seq });
        // Acked means written.
        let total: u64 = connection
            .hget(store::counter_key(T1, "gold"), alice.public().to_hex())
            .unwrap();
        assert_eq!(total, 7 * seq);
    }
    drop(studio1);

    // Non-strict, long interval: clicks still in memory at shutdown reach Redis. On a loaded
    // machine the periodic flush may come first (the interval is at most 1 s): then the run
    // proves nothing about shutdown, so it is tried again on a fresh gateway.
    let mut attempt = 0;
    let (gw2, mut studio2) = loop {
        attempt += 1;
        let started = std::time::Instant::now();
        let gw2 = TestGateway::start(&redis, |c| c.clicks.flush_interval_ms = 1_000).await;
        let mut studio2 = studio(&gw2, T1).await;
        assert_eq!(
            click(&mut studio2, 1, vec![Click(alice.public(), "gem".into(), 9)]).await,
            ServerMessage::ClicksAck { up_to: 1 }
        );
        let before: Option<u64> = connection
            .hget(store::counter_key(T1, "gem"), alice.public().to_hex())
            .unwrap();
        if before.is_none() {
            break (gw2, studio2);
        }
        assert!(
            started.elapsed() >= std::time::Duration::from_millis(900) && attempt < 5,
            "clicks reached Redis before the flush interval: {before:?}"
        );
        gw2.shutdown().await;
        let _: () = connection
            .hdel(store::counter_key(T1, "gem"), alice.public().to_hex())
            .unwrap();
    };
    let shutdown = tokio::spawn(gw2.shutdown());
    let close = studio2.closed().await.expect("a close frame");
    assert_eq!(u16::from(close.code), hoard_types::wire::close_code::GOING_AWAY);
    shutdown.await.unwrap();
    let after: u64 = connection
        .hget(store::counter_key(T1, "gem"), alice.public().to_hex())
        .unwrap();
    assert_eq!(after, 9);
    gw.shutdown().await;
}

/// A TCP proxy in front of Redis that, once armed, forwards requests and replies but drops the
/// connection instead of returning the first integer reply (the flush script's answer: Redis has
/// applied it, the gateway never learns it). Counts the `EVALSHA` requests it forwards.
struct LossyProxy {
    port: u16,
    armed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
    evalsha: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl LossyProxy {
    async fn start(upstream: u16) -> LossyProxy {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let armed = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicU64::new(0));
        let evalsha = Arc::new(AtomicU64::new(0));
        let (a, d, e) = (armed.clone(), dropped.clone(), evalsha.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let server = tokio::net::TcpStream::connect(("127.0.0.1", upstream))
                    .await
                    .unwrap();
                let (mut client_rx, mut client_tx) = client.into_split();
                let (mut server_rx, mut server_tx) = server.into_split();
                let e = e.clone();
                let up = tokio::spawn(async move {
                    let mut buf = vec![0u8; 1 << 16];
                    loop {
                        let n = match client_rx.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        let count = buf[..n]
                            .windows(7)
                            .filter(|w| w.eq_ignore_ascii_case(b"EVALSHA"))
                            .count();
                        e.fetch_add(count as u64, Ordering::SeqCst);
                        if server_tx.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
                let (a, d) = (a.clone(), d.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 1 << 16];
                    loop {
                        let n = match server_rx.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if buf[0] == b':' && a.swap(false, Ordering::SeqCst) {
                            d.fetch_add(1, Ordering::SeqCst);
                            break; // the reply is lost: drop both sides
                        }
                        if client_tx.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    up.abort();
                });
            }
        });
        LossyProxy {
            port,
            armed,
            dropped,
            evalsha,
            task,
        }
    }
}

impl Drop for LossyProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn a_flush_whose_reply_is_lost_is_retried_and_counted_once() {
    use std::sync::atomic::Ordering;
    let redis = RedisServer::start();
    let proxy = LossyProxy::start(redis.port()).await;
    let mut config = hoard_server::config::GatewayConfig::default();
    config.redis.url = format!("redis://127.0.0.1:{}/", proxy.port);
    let store = std::sync::Arc::new(store::Store::open(&config).unwrap());
    let clicks = hoard_server::clicks::Clicks::new(store.clone());
    let table = clicks.table(T1);
    let (alice, bob) = (key("alice", 0), key("bob", 0));
    let mut sent = [0u64; 2];
    // Flush parts sent to Redis (each flush here writes one part per batch it holds).
    let mut parts_sent = 0u64;
    for round in 0..6u32 {
        let batch = vec![
            Click(alice.public(), "gold".into(), 3 + round),
            Click(bob.public(), "gold".into(), 10 * (round + 1)),
        ];
        sent[0] += u64::from(3 + round);
        sent[1] += u64::from(10 * (round + 1));
        let checked = clicks
            .check(&batch, None)
            .unwrap_or_else(|e| panic!("{}", e.message));
        clicks
            .absorb(&table, checked)
            .unwrap_or_else(|e| panic!("{}", e.message));
        // Rounds 1 and 4: Redis applies the flush, its reply is lost, the flush fails.
        if round == 1 || round == 4 {
            proxy.armed.store(true, Ordering::SeqCst);
            assert!(clicks.flush().await.is_err(), "the reply was dropped");
            parts_sent += 1;
            assert!(!proxy.armed.load(Ordering::SeqCst));
            // More clicks come while the failed part waits for its retry: the next flush
            // sends the failed part again (skipped by Redis), then these.
            let more = [Click(alice.public(), "gold".into(), 1)];
            let checked = clicks
                .check(&more, None)
                .unwrap_or_else(|e| panic!("{}", e.message));
            clicks
                .absorb(&table, checked)
                .unwrap_or_else(|e| panic!("{}", e.message));
            sent[0] += 1;
            parts_sent += 1;
        }
        clicks.flush().await.unwrap();
        parts_sent += 1;
    }
    assert_eq!(proxy.dropped.load(Ordering::SeqCst), 2);
    let mut connection = redis.connection();
    for (who, want) in [(&alice, sent[0]), (&bob, sent[1])] {
        let total: u64 = connection
            .hget(store::counter_key(T1, "gold"), who.public().to_hex())
            .unwrap();
        assert_eq!(total, want);
        let unsettled: u64 = connection
            .hget(store::unsettled_key(T1, "gold"), who.public().to_hex())
            .unwrap();
        assert_eq!(unsettled, want);
        let score: f64 = connection
            .zscore(store::leaderboard_key(T1, "gold"), who.public().to_hex())
            .unwrap();
        assert_eq!(score, want as f64);
    }
    let total: u64 = connection.hget(store::totals_key(T1), "gold").unwrap();
    assert_eq!(total, sent[0] + sent[1]);
    // One round trip per flush part: one EVALSHA per part, plus the very first one, which
    // found the script not loaded yet (NOSCRIPT, then SCRIPT LOAD and EVALSHA again; the
    // script stays loaded in Redis across reconnections).
    assert_eq!(proxy.evalsha.load(Ordering::SeqCst), parts_sent + 1);
}

/// About 900 currency entries fit a 64 KiB settlement payload: a window paying 1,200 players is
/// settled in two transactions (before, one of 4,096 entries went over the limit and the window
/// answered `internal` on every retry).
#[tokio::test]
async fn a_window_paying_more_players_than_one_settlement_holds_is_settled_in_several() {
    let store = TestStore::redis();
    let mut gw = TestGateway::start(&store, |_| {}).await;
    let mut studio1 = studio(&gw, T1).await;
    let currency = gw.world.define_currency(T1, "GOLD", 1_000_000_000);
    assert_eq!(commit(&mut studio1, &currency).await.1, Outcome::Applied);
    let players: Vec<hoard_types::Keypair> = (0..1_200).map(|i| key("payee", i)).collect();
    // Registered in waves below the per-connection in-flight limit.
    for wave in players.chunks(400) {
        let mut waiting = std::collections::HashSet::new();
        for player in wave {
            let tx = gw.world.register(T1, &player.public(), Custody::Custodial);
            waiting.insert(event_id_of(&tx));
            let request_id = studio1.request_id();
            studio1.send(&ClientMessage::Submit { request_id, tx }).await;
        }
        while !waiting.is_empty() {
            match studio1.recv().await {
                ServerMessage::Committed {
                    event_id, outcome, ..
                } => {
                    assert_eq!(outcome, Outcome::Applied);
                    waiting.remove(&event_id);
                }
                ServerMessage::Accepted { .. } => {}
                other => panic!("{other:?}"),
            }
        }
    }
    let clicks: Vec<Click> = players
        .iter()
        .map(|p| Click(p.public(), "gold".into(), 250))
        .collect();
    assert_eq!(
        click(&mut studio1, 1, clicks).await,
        ServerMessage::ClicksAck { up_to: 1 }
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, event_ids, entries) = settle(&mut studio1).await;
    assert_eq!(entries, 1_200);
    assert!(event_ids.len() >= 2, "{} transactions", event_ids.len());
    for event_id in &event_ids {
        wait_event(&gw, *event_id).await;
    }
    for player in [&players[0], &players[599], &players[1_199]] {
        assert_eq!(balance(&mut studio1, player.public(), "GOLD").await, 2);
    }
}

/// One `settle` request: (window, event ids, entries).
async fn settle(client: &mut hoard_server::testing::WsClient) -> (u64, Vec<hoard_types::EventId>, u32) {
    let settled = request(client, |request_id| ClientMessage::Settle { request_id }).await;
    let ServerMessage::Settlement {
        window,
        event_ids,
        entries,
        ..
    } = settled
    else {
        panic!("{settled:?}")
    };
    (window, event_ids, entries)
}

/// Clicks `points` gold for `player` and waits until the store holds them as unsettled.
async fn click_gold(
    gw: &TestGateway,
    client: &mut hoard_server::testing::WsClient,
    seq: u64,
    player: &hoard_types::Keypair,
    points: u32,
) {
    let before = unsettled_gold(gw, player).await;
    assert_eq!(
        click(client, seq, vec![Click(player.public(), "gold".into(), points)]).await,
        ServerMessage::ClicksAck { up_to: seq }
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while unsettled_gold(gw, player).await != before + u64::from(points) {
        assert!(tokio::time::Instant::now() < deadline, "clicks not flushed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn unsettled_gold(gw: &TestGateway, player: &hoard_types::Keypair) -> u64 {
    let unsettled = gw.store().unsettled(T1, "gold").await.unwrap();
    unsettled.get(&player.public().to_hex()).copied().unwrap_or(0)
}

/// Registers alice on T1 and defines GOLD; settles 250 of her points (window `first`, 2 GOLD)
/// and then an empty window (`second`). Returns (alice, first, second).
async fn settle_two_windows(
    gw: &mut TestGateway,
    studio1: &mut hoard_server::testing::WsClient,
) -> (hoard_types::Keypair, u64, u64) {
    let alice = key("alice", 0);
    for tx in [
        gw.world.register(T1, &alice.public(), Custody::Custodial),
        gw.world.define_currency(T1, "GOLD", 1_000_000),
    ] {
        assert_eq!(commit(studio1, &tx).await.1, Outcome::Applied);
    }
    click_gold(gw, studio1, 1, &alice, 250).await;
    let (first, event_ids, entries) = settle(studio1).await;
    assert_eq!((entries, event_ids.len()), (1, 1));
    wait_event(gw, event_ids[0]).await;
    assert_eq!(balance(studio1, alice.public(), "GOLD").await, 2);
    let (second, event_ids, entries) = settle(studio1).await;
    assert_eq!((entries, event_ids.len()), (0, 0));
    assert!(second > first, "{first} then {second}");
    (alice, first, second)
}

/// After Redis loses everything (a restart without persistence: here FLUSHALL), the window
/// counter is gone. Settlement must not start again at a window the chain already committed:
/// its event ids would be answered with the old outcome and the new points would vanish.
#[tokio::test]
async fn settlement_windows_never_repeat_after_redis_loses_its_data() {
    let store = TestStore::redis();
    let mut gw = TestGateway::start(&store, |_| {}).await;
    let mut studio1 = studio(&gw, T1).await;
    let (alice, first, second) = settle_two_windows(&mut gw, &mut studio1).await;
    assert_eq!(regressions(&gw).await, 0, "normal settlements raise no alarm");

    let _: () = redis::cmd("FLUSHALL")
        .query(&mut store.redis_server().unwrap().connection())
        .unwrap();
    click_gold(&gw, &mut studio1, 2, &alice, 300).await;
    let (window, event_ids, entries) = settle(&mut studio1).await;
    assert_eq!(regressions(&gw).await, 1, "the loss is reported, not silent");
    assert!(
        window != first && window != second,
        "window {window} reused ({first}, {second} were settled before the loss)"
    );
    assert_eq!((entries, event_ids.len()), (1, 1));
    wait_event(&gw, event_ids[0]).await;
    assert_eq!(
        balance(&mut studio1, alice.public(), "GOLD").await,
        2 + 3,
        "the points clicked after the loss were minted"
    );
    gw.shutdown().await;
}

/// The embedded store is lost with its gateway: a restarted gateway must not reuse windows.
#[tokio::test]
async fn settlement_windows_never_repeat_after_an_embedded_gateway_restarts() {
    let store = TestStore::embedded();
    let mut gw = TestGateway::start(&store, |_| {}).await;
    let mut studio1 = studio(&gw, T1).await;
    let (alice, first, second) = settle_two_windows(&mut gw, &mut studio1).await;

    drop(studio1);
    let chain = gw.chain().clone();
    let world = std::mem::replace(&mut gw.world, hoard_ledger::testing::World::new(2));
    let config = gw.config.clone();
    gw.shutdown().await;
    let gw = TestGateway::start_on(chain, world, config).await;
    let mut studio1 = studio(&gw, T1).await;
    // The restarted gateway has caught up with the chain (alice's 2 GOLD).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while balance(&mut studio1, alice.public(), "GOLD").await != 2 {
        assert!(tokio::time::Instant::now() < deadline, "view not caught up");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    click_gold(&gw, &mut studio1, 1, &alice, 300).await;
    let (window, event_ids, entries) = settle(&mut studio1).await;
    assert!(
        window != first && window != second,
        "window {window} reused ({first}, {second} were settled before the restart)"
    );
    assert_eq!((entries, event_ids.len()), (1, 1));
    wait_event(&gw, event_ids[0]).await;
    assert_eq!(balance(&mut studio1, alice.public(), "GOLD").await, 2 + 3);
    gw.shutdown().await;
}

/// Every key of a Redis with its remaining time to live (DUMP/PTTL), and the restore
/// (FLUSHALL, then RESTORE each): a Redis restarted from an older snapshot or AOF.
fn dump_all(redis: &RedisServer) -> Vec<(String, i64, Vec<u8>)> {
    let mut connection = redis.connection();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut connection).unwrap();
    keys.into_iter()
        .map(|key| {
            let ttl: i64 = redis::cmd("PTTL").arg(&key).query(&mut connection).unwrap();
            let bytes: Vec<u8> = redis::cmd("DUMP").arg(&key).query(&mut connection).unwrap();
            (key, ttl.max(0), bytes)
        })
        .collect()
}

fn restore_all(redis: &RedisServer, dump: &[(String, i64, Vec<u8>)]) {
    let mut connection = redis.connection();
    let _: () = redis::cmd("FLUSHALL").query(&mut connection).unwrap();
    for (key, ttl, bytes) in dump {
        let _: () = redis::cmd("RESTORE")
            .arg(key)
            .arg(*ttl)
            .arg(bytes)
            .query(&mut connection)
            .unwrap();
    }
}

/// Redis comes back from a snapshot taken before a window was cut (AOF `everysec` loses up to a
/// second): the restored counter names a window that was cut and committed after the snapshot.
/// Cutting it again would answer the new points with that window's old outcome. A window is
/// numbered when it is cut, so the next cut gets a new number instead.
#[tokio::test]
async fn settlement_windows_never_repeat_after_redis_restores_an_older_snapshot() {
    let store = TestStore::redis();
    let redis = store.redis_server().unwrap();
    let mut gw = TestGateway::start(&store, |_| {}).await;
    let mut studio1 = studio(&gw, T1).await;
    let (alice, first, second) = settle_two_windows(&mut gw, &mut studio1).await;

    click_gold(&gw, &mut studio1, 2, &alice, 300).await;
    let snapshot = dump_all(redis);
    let (third, event_ids, entries) = settle(&mut studio1).await;
    assert_eq!((entries, event_ids.len()), (1, 1));
    wait_event(&gw, event_ids[0]).await;
    assert_eq!(balance(&mut studio1, alice.public(), "GOLD").await, 2 + 3);

    assert_eq!(regressions(&gw).await, 0, "normal settlements raise no alarm");
    restore_all(redis, &snapshot);
    assert_eq!(unsettled_gold(&gw, &alice).await, 50 + 300);
    click_gold(&gw, &mut studio1, 3, &alice, 400).await;
    let (window, event_ids, entries) = settle(&mut studio1).await;
    assert!(
        ![first, second, third].contains(&window),
        "window {window} reused ({first}, {second}, {third} were cut before)"
    );
    assert_eq!((entries, event_ids.len()), (1, 1));
    wait_event(&gw, event_ids[0]).await;
    assert_eq!(regressions(&gw).await, 1, "the rollback is reported, not silent");
    // The 400 new points are minted. The 350 points the snapshot held as unsettled were settled
    // after it (in `third`); Redis cannot know that, so they are settled again: a Redis that
    // goes back in time re-grants what it forgot was settled rather than losing new points.
    assert_eq!(balance(&mut studio1, alice.public(), "GOLD").await, 2 + 3 + 7);
    gw.shutdown().await;
}

/// `hoard_gateway_settlement_store_regressions_total` on the gateway's `/metrics`.
async fn regressions(gw: &TestGateway) -> u64 {
    let metrics = http_get(gw.gateway().http_addr(), "/metrics").await;
    counter_value(&metrics, "hoard_gateway_settlement_store_regressions_total")
}

#[tokio::test]
async fn a_counter_name_one_past_the_tenants_limit_refuses_its_whole_message() {
    let store = TestStore::embedded();
    let gw = TestGateway::start(&store, |_| {}).await;
    let mut studio1 = studio(&gw, T1).await;
    let alice = key("alice", 0);
    let named = |i: usize| Click(alice.public(), format!("c{i}").as_str().into(), 1);
    // The tenant's first COUNTERS_PER_TENANT_MAX (1024) names, in one message.
    let ack = click(&mut studio1, 1, (0..1024).map(named).collect()).await;
    assert_eq!(ack, ServerMessage::ClicksAck { up_to: 1 });
    // One more name, after a click on a known one: refused whole, `invalid`.
    let refused = click(&mut studio1, 2, vec![named(0), named(1024)]).await;
    assert_error(&refused, ErrorCode::Invalid);
    // Known names still pass, and nothing of the refused message was counted.
    let ack = click(&mut studio1, 3, vec![named(0)]).await;
    assert_eq!(ack, ServerMessage::ClicksAck { up_to: 3 });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let total = |counter: &'static str| {
        let store = gw.store();
        let player = alice.public();
        async move { store.player_total(T1, counter, &player).await.unwrap() }
    };
    assert_eq!(total("c0").await, 2);
    assert_eq!(total("c1023").await, 1);
    assert_eq!(total("c1024").await, 0);
}

#[tokio::test]
async fn a_flush_part_of_two_tenants_and_two_counters_lands_on_every_key_once_in_redis() {
    a_flush_part_of_two_tenants_and_two_counters_lands_on_every_key_once(TestStore::redis()).await;
}

#[tokio::test]
async fn a_flush_part_of_two_tenants_and_two_counters_lands_on_every_key_once_in_the_embedded_store() {
    a_flush_part_of_two_tenants_and_two_counters_lands_on_every_key_once(TestStore::embedded()).await;
}

/// One flush part, its keys interleaved across tenants and counters (Redis takes each (tenant,
/// counter) group's keys once): every per-player total, counter total, leaderboard and unsettled
/// hash gets exactly its clicks, and the same part again (a retried flush) changes nothing.
async fn a_flush_part_of_two_tenants_and_two_counters_lands_on_every_key_once(test_store: TestStore) {
    let config = hoard_server::testing::test_config(&test_store, &hoard_ledger::testing::World::new(2));
    let store = store::Store::open(&config).unwrap();
    let (alice, bob, carol) = (
        key("alice", 0).public(),
        key("bob", 0).public(),
        key("carol", 0).public(),
    );
    let name = |counter: &str| -> std::sync::Arc<str> { counter.into() };
    let part: Vec<(store::ClickKey, u64)> = vec![
        ((T1, name("gold"), alice), 5),
        ((T1, name("gems"), alice), 7),
        ((T1, name("gold"), bob), 3),
        ((T2, name("gold"), alice), 11),
        ((T2, name("gems"), carol), 13),
        ((T1, name("gold"), carol), 2),
    ];
    let check = |store: store::Store, alice_gold: u64| async move {
        let totals = [
            (T1, "gold", 5 + 3 + 2 + (alice_gold - 5)),
            (T1, "gems", 7),
            (T2, "gold", 11),
            (T2, "gems", 13),
        ];
        for (tenant, counter, total) in totals {
            assert_eq!(
                store.counter_total(tenant, counter).await.unwrap(),
                total,
                "{tenant:?} {counter}"
            );
        }
        let players = [
            (T1, "gold", alice, alice_gold),
            (T1, "gold", bob, 3),
            (T1, "gold", carol, 2),
            (T1, "gems", alice, 7),
            (T1, "gems", bob, 0),
            (T2, "gold", alice, 11),
            (T2, "gold", carol, 0),
            (T2, "gems", carol, 13),
        ];
        for (tenant, counter, player, total) in players {
            assert_eq!(
                store.player_total(tenant, counter, &player).await.unwrap(),
                total,
                "{tenant:?} {counter}"
            );
        }
        assert_eq!(
            store.leaderboard(T1, "gold", 10).await.unwrap(),
            vec![(alice, alice_gold), (bob, 3), (carol, 2)]
        );
        assert_eq!(
            store.leaderboard(T2, "gems", 10).await.unwrap(),
            vec![(carol, 13)]
        );
        let unsettled = store.unsettled(T1, "gold").await.unwrap();
        let expected: std::collections::HashMap<String, u64> = [
            (alice.to_hex(), alice_gold),
            (bob.to_hex(), 3),
            (carol.to_hex(), 2),
        ]
        .into();
        assert_eq!(unsettled, expected);
        store
    };
    assert!(store.add_clicks("run-a", 1, &part).await.unwrap());
    let store = check(store, 5).await;
    assert!(
        !store.add_clicks("run-a", 1, &part).await.unwrap(),
        "a retried part is applied once"
    );
    let store = check(store, 5).await;
    assert!(store.add_clicks("run-a", 2, &part[..1]).await.unwrap());
    check(store, 10).await;
}
