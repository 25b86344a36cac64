//! The gateway's limits through real WebSocket connections and a real Redis: the connection
//! limit (1013 at the handshake), per-tenant token buckets shared by a tenant's connections,
//! and a Redis outage (typed `unavailable`, no hang; service resumes when Redis is back).

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use hoard_ledger::testing::key;
use hoard_server::testing::{RedisServer, TestGateway, WsClient};
use hoard_types::wire::{close_code, Click, ClientMessage, ErrorCode, EventState, ServerMessage};
use hoard_types::{Custody, Outcome};
use tokio_tungstenite::tungstenite::Message;

async fn ping(client: &mut WsClient) -> ServerMessage {
    request(client, |request_id| ClientMessage::Ping { request_id }).await
}

/// Opens a WebSocket and returns its first frame: `Ok(hello)` or `Err(close code)`.
async fn first_frame(url: &str) -> Result<ServerMessage, Option<u16>> {
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("the handshake completes");
    let frame = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("a frame in time");
    match frame {
        Some(Ok(Message::Binary(bytes))) => Ok(hoard_types::wire::decode_server(&bytes).unwrap()),
        Some(Ok(Message::Close(frame))) => Err(frame.map(|f| u16::from(f.code))),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn at_the_connection_limit_a_new_connection_is_closed_with_1013() {
    let redis = RedisServer::start();
    let gw = TestGateway::start(&redis, |c| c.connections_max = 2).await;
    let mut first = studio(&gw, T1).await;
    // An unauthenticated connection holds a slot too.
    let second = WsClient::connect(&gw.url()).await;
    // The third: the handshake completes, then close 1013 (try again later), no hello.
    assert_eq!(
        first_frame(&gw.url()).await.unwrap_err(),
        Some(close_code::TRY_AGAIN_LATER)
    );
    assert!(matches!(ping(&mut first).await, ServerMessage::Pong { .. }));
    // A slot frees when a connection ends: a new connection gets its hello.
    drop(second);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match first_frame(&gw.url()).await {
            Ok(hello) => {
                assert!(matches!(hello, ServerMessage::Hello { .. }), "{hello:?}");
                break;
            }
            Err(code) => assert_eq!(code, Some(close_code::TRY_AGAIN_LATER)),
        }
        assert!(Instant::now() < deadline, "the freed slot was never reused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.shutdown().await;
}

/// Sends every message, then reads as many answers: (answered, refused as the tenant's rate limit).
async fn burst(client: &mut WsClient, messages: Vec<ClientMessage>) -> (usize, usize) {
    let count = messages.len();
    for message in &messages {
        client.send(message).await;
    }
    let (mut answered, mut limited) = (0, 0);
    while answered + limited < count {
        match client.recv().await {
            ServerMessage::Pong { .. } | ServerMessage::ClicksAck { .. } => answered += 1,
            ServerMessage::Error {
                code: ErrorCode::RateLimited,
                message,
                retry_after_ms,
                ..
            } => {
                assert_eq!(
                    message, "tenant rate limit",
                    "the per-connection bucket is far away"
                );
                assert!(retry_after_ms.is_some_and(|ms| ms > 0));
                limited += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    (answered, limited)
}

#[tokio::test]
async fn a_tenants_connections_share_its_rate_limit_and_other_tenants_are_unaffected() {
    const MESSAGES_PER_SECOND: u64 = 60;
    const CLICKS_PER_SECOND: u64 = 1_000;
    let redis = RedisServer::start();
    let gw = TestGateway::start(&redis, |c| {
        c.limits.tenant_messages_per_second = MESSAGES_PER_SECOND as u32;
        c.limits.tenant_clicks_per_second = CLICKS_PER_SECOND as u32;
        c.limits.connection_messages_per_second = 100_000;
        c.limits.connection_clicks_per_second = 100_000;
    })
    .await;
    let mut one = studio(&gw, T1).await;
    let mut two = studio(&gw, T1).await;
    let mut other = studio(&gw, T2).await;
    let player = key("p", 0).public();
    let clicks = |seq: u64| ClientMessage::Clicks {
        request_id: seq,
        clicks: vec![Click(player, "gold".into(), 900)],
    };

    // Clicks: 900 on one connection, then 900 on the other connection of the same tenant: the
    // tenant's 1000/s bucket has at most 100 + the refill left. Tenant 2's bucket is untouched.
    let started = Instant::now();
    assert_eq!(burst(&mut one, vec![clicks(1)]).await, (1, 0));
    let second = burst(&mut two, vec![clicks(1)]).await;
    if started.elapsed() < Duration::from_millis(700) {
        assert_eq!(
            second,
            (0, 1),
            "the second connection draws on the same tenant bucket"
        );
    }
    assert_eq!(burst(&mut other, vec![clicks(1)]).await, (1, 0));

    // Messages: 2 x 60 pings over two connections of tenant 1, interleaved, against one bucket
    // of 60/s (3 tokens went to the clicks above).
    let started = Instant::now();
    let pings = |base: u64| {
        (0..MESSAGES_PER_SECOND)
            .map(|i| ClientMessage::Ping { request_id: base + i })
            .collect::<Vec<_>>()
    };
    let (sent_one, sent_two) = tokio::join!(burst(&mut one, pings(1_000)), burst(&mut two, pings(2_000)));
    let elapsed = started.elapsed().as_secs_f64();
    let answered = sent_one.0 + sent_two.0;
    let limited = sent_one.1 + sent_two.1;
    let allowed = MESSAGES_PER_SECOND as f64 * (1.0 + elapsed) + 1.0;
    assert!(
        (answered as f64) <= allowed,
        "{answered} answered in {elapsed:.3} s: the two connections shared one bucket (at most {allowed:.0})"
    );
    assert!(limited > 0, "the tenant's bucket ran dry");
    assert!(
        answered >= MESSAGES_PER_SECOND as usize - 4,
        "the burst was there: {answered}"
    );
    // Tenant 2 still has its own full bucket.
    let (answered, limited) = burst(&mut other, pings(3_000)[..50].to_vec()).await;
    assert_eq!((answered, limited), (50, 0), "another tenant is unaffected");
    gw.shutdown().await;
}

#[tokio::test]
async fn a_redis_outage_gives_typed_errors_and_service_resumes_without_a_restart() {
    let mut redis = RedisServer::start();
    let mut gw = TestGateway::start(&redis, |_| {}).await;
    let (alice, mut studio1) = alice_with_gold(&mut gw).await;
    let http = gw.gateway().http_addr();

    redis.kill();
    // An event cannot be made durable: `unavailable` with a retry hint, promptly.
    let mint = gw.world.mint_currency(T1, &alice.public(), "GOLD", 5);
    let answer = tokio::time::timeout(Duration::from_secs(5), submit(&mut studio1, &mint))
        .await
        .expect("an answer, not a hang");
    assert!(
        matches!(
            answer,
            ServerMessage::Error {
                code: ErrorCode::Unavailable,
                retry_after_ms: Some(_),
                ..
            }
        ),
        "{answer:?}"
    );
    // Counter reads come from Redis: `unavailable`.
    let read = tokio::time::timeout(
        Duration::from_secs(5),
        request(&mut studio1, |request_id| ClientMessage::Counter {
            request_id,
            counter: "gold".into(),
            player: None,
        }),
    )
    .await
    .expect("an answer, not a hang");
    assert_error(&read, ErrorCode::Unavailable);
    // Clicks (default mode) are absorbed in memory and acknowledged.
    studio1
        .send(&ClientMessage::Clicks {
            request_id: 1,
            clicks: vec![Click(alice.public(), "gold".into(), 7)],
        })
        .await;
    let ack = studio1
        .recv_until(|m| matches!(m, ServerMessage::ClicksAck { .. } | ServerMessage::Error { .. }))
        .await;
    assert_eq!(ack, ServerMessage::ClicksAck { up_to: 1 });
    let deadline = Instant::now() + Duration::from_secs(5);
    while !http_get(http, "/readyz").await.starts_with("HTTP/1.1 503") {
        assert!(
            Instant::now() < deadline,
            "/readyz still says ready with Redis down"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The connection itself is fine.
    assert!(matches!(ping(&mut studio1).await, ServerMessage::Pong { .. }));

    // Redis is back (empty: it had no persistence). The same gateway serves again.
    redis.restart_empty();
    let (height, outcome) = commit_eventually(&mut studio1, &mint).await;
    assert_eq!(outcome, Outcome::Applied);
    assert!(height > 0);
    let another = gw.world.mint_currency(T1, &alice.public(), "GOLD", 1);
    assert_eq!(
        commit_eventually(&mut studio1, &another).await.1,
        Outcome::Applied
    );
    assert_eq!(balance(&mut studio1, alice.public(), "GOLD").await, 6);
    // The clicks absorbed during the outage were flushed once Redis was back (exactly once: a
    // flush that failed to connect applied nothing).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let total = request(&mut studio1, |request_id| ClientMessage::Counter {
            request_id,
            counter: "gold".into(),
            player: Some(alice.public()),
        })
        .await;
        if let ServerMessage::Counter { player_total, .. } = &total {
            if *player_total == Some(7) {
                break;
            }
            assert!(player_total.unwrap_or(0) < 7, "counted twice: {total:?}");
        }
        assert!(
            Instant::now() < deadline,
            "the outage's clicks never reached Redis: {total:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !http_get(http, "/readyz").await.starts_with("HTTP/1.1 200") {
        assert!(Instant::now() < deadline, "/readyz never recovered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn a_redis_that_stops_answering_gives_unavailable_not_a_hang_and_service_resumes() {
    let redis = RedisServer::start();
    let mut gw = TestGateway::start(&redis, |config| config.redis.command_timeout_ms = 300).await;
    let (alice, mut studio1) = alice_with_gold(&mut gw).await;
    assert!(matches!(
        read_gold_total(&mut studio1).await,
        ServerMessage::Counter { .. }
    ));

    // SIGSTOP: the TCP connections stay open and nothing answers. Without a response timeout
    // the read below would wait forever (the harness gives up after 10 s).
    redis.set_running(false);
    let started = Instant::now();
    let answer = read_gold_total(&mut studio1).await;
    assert_error(&answer, ErrorCode::Unavailable);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let mint = gw.world.mint_currency(T1, &alice.public(), "GOLD", 5);
    assert!(matches!(
        submit(&mut studio1, &mint).await,
        ServerMessage::Error {
            code: ErrorCode::Unavailable,
            ..
        }
    ));
    assert!(matches!(ping(&mut studio1).await, ServerMessage::Pong { .. }));

    // SIGCONT: the gateway reconnects and serves, and the event commits once.
    redis.set_running(true);
    assert_eq!(commit_eventually(&mut studio1, &mint).await.1, Outcome::Applied);
    assert_eq!(balance(&mut studio1, alice.public(), "GOLD").await, 5);
    assert!(matches!(
        read_gold_total(&mut studio1).await,
        ServerMessage::Counter { .. }
    ));
    gw.shutdown().await;
}

/// A studio connection of tenant 1 and alice registered there, with GOLD defined.
async fn alice_with_gold(gw: &mut TestGateway) -> (hoard_types::Keypair, WsClient) {
    let alice = key("alice", 0);
    let mut studio1 = studio(gw, T1).await;
    for tx in [
        gw.world.register(T1, &alice.public(), Custody::Custodial),
        gw.world.define_currency(T1, "GOLD", 1_000_000),
    ] {
        assert_eq!(commit(&mut studio1, &tx).await.1, Outcome::Applied);
    }
    (alice, studio1)
}

async fn read_gold_total(client: &mut WsClient) -> ServerMessage {
    request(client, |request_id| ClientMessage::Counter {
        request_id,
        counter: "gold".into(),
        player: None,
    })
    .await
}

/// What the SDK does for an event: submit until `accepted`, then ask `event_status` until it is
/// committed, submitting again whenever the gateway does not know it (`unavailable` refusals
/// while Redis is down; `unknown` after Redis lost the stream and the gateway forgot its events).
async fn commit_eventually(client: &mut WsClient, tx: &hoard_types::Transaction) -> (u64, Outcome) {
    let event_id = event_id_of(tx);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < deadline, "the event never committed");
        match submit(client, tx).await {
            ServerMessage::Accepted { .. } => {}
            ServerMessage::Error {
                code: ErrorCode::Unavailable,
                ..
            } => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            other => panic!("unexpected {other:?}"),
        }
        loop {
            assert!(Instant::now() < deadline, "the event never committed");
            tokio::time::sleep(Duration::from_millis(100)).await;
            match request(client, |request_id| ClientMessage::EventStatus {
                request_id,
                event_id,
            })
            .await
            {
                ServerMessage::EventStatus {
                    state: EventState::Committed,
                    height: Some(height),
                    outcome: Some(outcome),
                    ..
                } => return (height, outcome),
                ServerMessage::EventStatus {
                    state: EventState::Pending,
                    ..
                } => {}
                ServerMessage::EventStatus {
                    state: EventState::Unknown,
                    ..
                } => break,
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_does_not_read_is_closed_with_1013_and_the_rest_are_served() {
    use futures::SinkExt;
    let redis = RedisServer::start();
    let mut gw = TestGateway::start(&redis, |c| c.limits.connection_messages_per_second = 100_000).await;
    let http = gw.gateway().http_addr();
    let slow_metric = "hoard_gateway_slow_consumers_total";
    let slow_before = counter_value(&http_get(http, "/metrics").await, slow_metric);

    // The slow subscriber: a small socket receive buffer, subscribed to the whole tenant, and
    // then it reads nothing.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(gw.gateway().ws_addr()).await.unwrap();
    let (mut slow, _) = tokio_tungstenite::client_async(gw.url(), stream).await.unwrap();
    let next = async |ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>| loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("in time")
        {
            Some(Ok(Message::Binary(bytes))) => break Ok(hoard_types::wire::decode_server(&bytes).unwrap()),
            Some(Ok(Message::Close(frame))) => break Err(frame.map(|f| u16::from(f.code))),
            Some(Ok(_)) => continue,
            other => panic!("unexpected {other:?}"),
        }
    };
    let ServerMessage::Hello { challenge, .. } = next(&mut slow).await.unwrap() else {
        panic!("no hello")
    };
    let send = |message: &ClientMessage| Message::Binary(hoard_types::wire::encode(message).into());
    let signature = hoard_types::wire::sign_auth(gw.studio(T1), &challenge.0, T1);
    slow.send(send(&ClientMessage::AuthStudio {
        request_id: 1,
        tenant: T1,
        signature,
    }))
    .await
    .unwrap();
    assert!(matches!(
        next(&mut slow).await,
        Ok(ServerMessage::Authenticated { .. })
    ));
    slow.send(send(&ClientMessage::Subscribe {
        request_id: 2,
        account: None,
        from_height: None,
    }))
    .await
    .unwrap();
    assert!(matches!(
        next(&mut slow).await,
        Ok(ServerMessage::Subscribed { .. })
    ));

    // A producer commits events in rounds until the gateway gives up on the subscriber (its
    // socket buffers, then its outgoing queue of 4096 pushes, fill up).
    let alice = key("alice", 0);
    let mut producer = studio(&gw, T1).await;
    for tx in [
        gw.world.register(T1, &alice.public(), Custody::Custodial),
        gw.world.define_currency(T1, "GOLD", u128::MAX),
    ] {
        assert_eq!(commit(&mut producer, &tx).await.1, Outcome::Applied);
    }
    // The bound only stops a broken gateway from looping forever: how many rounds it takes
    // depends on how far the kernel grows the loopback socket's send buffer (up to a few MB of
    // pushes beside the queue). It took 41 rounds of 500 in three runs on 2026-11-29, just past
    // the earlier bound of 40, which then failed a CI run.
    let mut rounds = 0;
    loop {
        rounds += 1;
        assert!(rounds <= 200, "the subscriber was never closed");
        let txs: Vec<_> = (0..500)
            .map(|_| gw.world.mint_currency(T1, &alice.public(), "GOLD", 1))
            .collect();
        for tx in &txs {
            let request_id = producer.request_id();
            producer
                .send(&ClientMessage::Submit {
                    request_id,
                    tx: tx.clone(),
                })
                .await;
        }
        let mut committed = 0;
        while committed < txs.len() {
            match producer.recv().await {
                ServerMessage::Committed { .. } => committed += 1,
                ServerMessage::Accepted { .. } => {}
                other => panic!("the producer got {other:?}"),
            }
        }
        if counter_value(&http_get(http, "/metrics").await, slow_metric) > slow_before {
            break;
        }
    }
    // The subscriber reads again: what was in flight, then the close frame with 1013.
    let deadline = Instant::now() + Duration::from_secs(20);
    let code = loop {
        assert!(Instant::now() < deadline, "no close frame");
        match next(&mut slow).await {
            Ok(_) => continue,
            Err(code) => break code,
        }
    };
    assert_eq!(code, Some(close_code::TRY_AGAIN_LATER));
    // Everyone else is still served.
    let tx = gw.world.mint_currency(T1, &alice.public(), "GOLD", 1);
    assert_eq!(commit(&mut producer, &tx).await.1, Outcome::Applied);
    gw.shutdown().await;
}

#[tokio::test]
async fn strict_clicks_get_unavailable_while_redis_is_down_and_are_acked_again_when_it_is_back() {
    let mut redis = RedisServer::start();
    let gw = TestGateway::start(&redis, |c| {
        c.clicks.strict = true;
        c.clicks.flush_interval_ms = 50;
    })
    .await;
    let alice = key("alice", 0);
    let mut studio1 = studio(&gw, T1).await;
    let gold = |seq: u64, n: u32| ClientMessage::Clicks {
        request_id: seq,
        clicks: vec![Click(alice.public(), "gold".into(), n)],
    };
    let answer =
        |m: &ServerMessage| matches!(m, ServerMessage::ClicksAck { .. } | ServerMessage::Error { .. });
    studio1.send(&gold(1, 5)).await;
    assert_eq!(
        studio1.recv_until(answer).await,
        ServerMessage::ClicksAck { up_to: 1 }
    );

    redis.kill();
    studio1.send(&gold(2, 7)).await;
    let refused = tokio::time::timeout(Duration::from_secs(5), studio1.recv_until(answer))
        .await
        .expect("an answer, not a hang");
    assert!(
        matches!(
            refused,
            ServerMessage::Error {
                request_id: 2,
                code: ErrorCode::Unavailable,
                retry_after_ms: Some(_),
                ..
            }
        ),
        "{refused:?}"
    );
    // Not acked while Redis stays down, whatever the number of flushes.
    studio1.send(&gold(3, 11)).await;
    let refused = tokio::time::timeout(Duration::from_secs(5), studio1.recv_until(answer))
        .await
        .expect("an answer, not a hang");
    assert_error(&refused, ErrorCode::Unavailable);

    // Redis is back (empty). New clicks are acked once written; the refused ones were kept in
    // the gateway and are written too (which is why a client resending them may count twice).
    redis.restart_empty();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seq = 4;
    loop {
        studio1.send(&gold(seq, 1)).await;
        match studio1.recv_until(answer).await {
            ServerMessage::ClicksAck { up_to } => {
                assert_eq!(up_to, seq);
                break;
            }
            other => assert_error(&other, ErrorCode::Unavailable),
        }
        assert!(
            Instant::now() < deadline,
            "strict clicks never acked after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        seq += 1;
    }
    let total: u64 = redis::Commands::hget(
        &mut redis.connection(),
        hoard_server::store::counter_key(T1, "gold"),
        alice.public().to_hex(),
    )
    .unwrap();
    // 7 + 11 kept from the outage, plus 1 per message sent after the restart.
    assert_eq!(total, 7 + 11 + (seq - 3));
    gw.shutdown().await;
}
