//! Bad input and other tenants' data, through real WebSocket connections: every attempt gets a
//! typed error or the right close code, and the gateway keeps serving everyone else.

mod common;

use common::*;
use hoard_ledger::testing::key;
use hoard_server::testing::{RedisServer, TestGateway, WsClient};
use hoard_types::wire::{self, close_code, Click, ClientMessage, ErrorCode, ServerMessage, SessionToken};
use hoard_types::{Custody, Outcome, TenantId};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

async fn assert_alive(client: &mut WsClient) {
    let pong = request(client, |request_id| ClientMessage::Ping { request_id }).await;
    assert!(matches!(pong, ServerMessage::Pong { .. }), "{pong:?}");
}

fn closed_with(frame: Option<tokio_tungstenite::tungstenite::protocol::CloseFrame>, code: u16) {
    let frame = frame.expect("a close frame");
    assert_eq!(u16::from(frame.code), code, "{frame:?}");
}

#[tokio::test]
async fn bad_input_gets_typed_errors_and_the_right_close_codes() {
    let redis = RedisServer::start();
    let mut gw = TestGateway::start(&redis, |c| c.limits.connection_messages_per_second = 40).await;
    let mut bystander = studio(&gw, T1).await;

    // Before authentication.
    let mut anonymous = WsClient::connect(&gw.url()).await;
    let answer = request(&mut anonymous, |request_id| ClientMessage::Head { request_id }).await;
    assert_error(&answer, ErrorCode::Unauthenticated);

    let mut client = studio(&gw, T1).await;
    // Not MessagePack at all.
    client.send_raw(vec![0xc1, 0xff, 0x00]).await;
    assert_error(&client.recv().await, ErrorCode::Malformed);
    // Well-formed, unknown name: the request id is recovered.
    #[derive(serde::Serialize)]
    struct Body {
        request_id: u64,
    }
    let mut unknown = std::collections::BTreeMap::new();
    unknown.insert("teleport", Body { request_id: 77 });
    client.send_raw(wire::encode(&unknown)).await;
    let answer = client.recv().await;
    assert!(
        matches!(
            answer,
            ServerMessage::Error {
                request_id: 77,
                code: ErrorCode::UnknownMessage,
                ..
            }
        ),
        "{answer:?}"
    );
    // Missing field.
    let mut missing = std::collections::BTreeMap::new();
    missing.insert("balances", Body { request_id: 78 });
    client.send_raw(wire::encode(&missing)).await;
    let answer = client.recv().await;
    assert!(
        matches!(
            answer,
            ServerMessage::Error {
                request_id: 78,
                code: ErrorCode::Malformed,
                ..
            }
        ),
        "{answer:?}"
    );
    // Bytes after the message: one frame holds exactly one MessagePack value.
    let mut trailing = wire::encode(&ClientMessage::Ping { request_id: 79 });
    trailing.push(0xc0);
    client.send_raw(trailing).await;
    let answer = client.recv().await;
    assert!(
        matches!(
            answer,
            ServerMessage::Error {
                request_id: 79,
                code: ErrorCode::Malformed,
                ..
            }
        ),
        "{answer:?}"
    );
    // A body as an array that does not decode, `{"balances": [80, <31-byte bin>]}`: the request
    // id is recovered from its first element.
    let mut short_key = vec![0x81, 0xa8];
    short_key.extend_from_slice(b"balances");
    short_key.extend_from_slice(&[0x92, 80, 0xc4, 31]);
    short_key.extend_from_slice(&[1; 31]);
    client.send_raw(short_key).await;
    let answer = client.recv().await;
    assert!(
        matches!(
            answer,
            ServerMessage::Error {
                request_id: 80,
                code: ErrorCode::Malformed,
                ..
            }
        ),
        "{answer:?}"
    );
    // Too many clicks in one message.
    let many = vec![Click(key("p", 0).public(), "gold".into(), 1); wire::CLICKS_PER_FRAME_MAX + 1];
    client
        .send(&ClientMessage::Clicks {
            request_id: 5,
            clicks: many,
        })
        .await;
    assert_error(&client.recv().await, ErrorCode::TooLarge);
    // A bad transaction signature.
    let mut tx = gw.world.register(T1, &key("p", 1).public(), Custody::Custodial);
    tx.signatures[0].signature.0[3] ^= 0x10;
    assert_error(&submit(&mut client, &tx).await, ErrorCode::BadSignature);
    // An expired transaction and one for another chain.
    let mut payload = gw
        .world
        .register(T1, &key("p", 2).public(), Custody::Custodial)
        .decode_payload()
        .unwrap();
    let studio_key = gw.studio(T1).clone();
    payload.expires_at = 0;
    assert_error(
        &submit(&mut client, &payload.sign(&[&studio_key])).await,
        ErrorCode::Expired,
    );
    payload.expires_at = 100;
    payload.chain_id = 999;
    assert_error(
        &submit(&mut client, &payload.sign(&[&studio_key])).await,
        ErrorCode::Invalid,
    );
    // Garbage payload bytes inside a well-formed message.
    let junk = hoard_types::Transaction {
        payload: vec![1, 2, 3],
        signatures: vec![],
    };
    assert_error(&submit(&mut client, &junk).await, ErrorCode::Malformed);
    // A second authentication.
    let again = client.auth_studio(T1, gw.studio(T1)).await;
    assert_error(&again, ErrorCode::AlreadyAuthenticated);
    // Still serving this connection after all that.
    assert_alive(&mut client).await;

    // A flood: the connection's bucket (40/s) runs dry, typed and with a retry hint.
    for request_id in 1000..1100u64 {
        client.send(&ClientMessage::Ping { request_id }).await;
    }
    let mut limited = 0;
    for _ in 0..100 {
        if let ServerMessage::Error {
            code: ErrorCode::RateLimited,
            retry_after_ms,
            ..
        } = client.recv().await
        {
            assert!(retry_after_ms.is_some_and(|ms| ms > 0));
            limited += 1;
        }
    }
    assert!(limited >= 50, "only {limited} of 100 rate limited");
    // The same before authentication: pings do not escape the connection's bucket.
    let mut anonymous_flood = WsClient::connect(&gw.url()).await;
    for request_id in 1..=100u64 {
        anonymous_flood.send(&ClientMessage::Ping { request_id }).await;
    }
    let mut limited = 0;
    for _ in 0..100 {
        if let ServerMessage::Error {
            code: ErrorCode::RateLimited,
            ..
        } = anonymous_flood.recv().await
        {
            limited += 1;
        }
    }
    assert!(
        limited >= 50,
        "only {limited} of 100 unauthenticated pings rate limited"
    );

    // A clicks message counting more than a second's worth of the connection's click bucket
    // (1,000,000 by default) could never pass: too_large, not rate_limited for ever.
    let mut clicker = studio(&gw, T1).await;
    let whale = key("p", 5).public();
    let request_id = clicker.request_id();
    let answer = clicker
        .request(ClientMessage::Clicks {
            request_id,
            clicks: vec![
                wire::Click(whale, "gold".into(), wire::CLICK_COUNT_MAX),
                wire::Click(whale, "gold".into(), wire::CLICK_COUNT_MAX),
            ],
        })
        .await;
    assert_error(&answer, ErrorCode::TooLarge);
    assert_alive(&mut clicker).await;

    // Frames over the limit: 1009.
    let mut big = studio(&gw, T1).await;
    big.send_raw(vec![0x90; wire::FRAME_BYTES_MAX + 1]).await;
    closed_with(big.closed().await, close_code::MESSAGE_TOO_BIG);
    // Text frames: 1003.
    let mut text = studio(&gw, T1).await;
    text.send_message(Message::Text("{\"ping\":{}}".into()))
        .await
        .unwrap();
    closed_with(text.closed().await, close_code::UNSUPPORTED_DATA);
    // A text frame whose payload is not UTF-8 (sent as a raw frame: `Message::Text` holds only
    // UTF-8) is a text frame too: `malformed`, then 1003.
    let mut not_utf8 = studio(&gw, T1).await;
    not_utf8
        .send_message(Message::Frame(Frame::message(
            vec![b'{', 0xff, 0xfe, b'}'],
            OpCode::Data(Data::Text),
            true,
        )))
        .await
        .unwrap();
    let answer = not_utf8.recv().await;
    assert!(
        matches!(
            answer,
            ServerMessage::Error {
                request_id: 0,
                code: ErrorCode::Malformed,
                ..
            }
        ),
        "{answer:?}"
    );
    closed_with(not_utf8.closed().await, close_code::UNSUPPORTED_DATA);
    // An expired token: typed error, then 1008.
    let mut late = WsClient::connect(&gw.url()).await;
    let token = SessionToken::issue(gw.studio(T1), T1, key("p", 3).public(), 1_000);
    assert_error(&late.auth_player(token).await, ErrorCode::ExpiredToken);
    closed_with(late.closed().await, close_code::POLICY_VIOLATION);
    // Too many protocol errors: 1008.
    let mut noisy = studio(&gw, T1).await;
    for _ in 0..wire::PROTOCOL_ERRORS_PER_CONNECTION_MAX {
        noisy.send_raw(vec![0xc1]).await;
    }
    closed_with(noisy.closed().await, close_code::POLICY_VIOLATION);
    // Wrong path: refused at the handshake.
    let wrong = gw.url().replace("/v1", "/v2");
    assert!(tokio_tungstenite::connect_async(wrong).await.is_err());

    // The gateway kept serving everyone else.
    assert_alive(&mut bystander).await;
    let tx = gw.world.register(T1, &key("p", 4).public(), Custody::Custodial);
    assert_eq!(commit(&mut bystander, &tx).await.1, Outcome::Applied);
    gw.shutdown().await;
}

#[tokio::test]
async fn no_connection_reaches_another_tenants_data() {
    let redis = RedisServer::start();
    let gw = TestGateway::start(&redis, |_| {}).await;
    no_connection_reaches_another_tenants_data_with(gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_connection_reaches_another_tenants_data_through_the_pbft_cluster() {
    let redis = RedisServer::start();
    let gw = TestGateway::start_on_cluster(&redis, |_| {}).await;
    no_connection_reaches_another_tenants_data_with(gw).await;
}

async fn no_connection_reaches_another_tenants_data_with(mut gw: TestGateway) {
    let alice = key("alice", 0);
    let eve = key("eve", 0);
    let mut studio1 = studio(&gw, T1).await;
    let mut studio2 = studio(&gw, T2).await;
    let setup = [
        gw.world.register(T1, &alice.public(), Custody::SelfCustody),
        gw.world.define_currency(T1, "GOLD", 1_000),
        gw.world.mint_currency(T1, &alice.public(), "GOLD", 100),
    ];
    for tx in &setup {
        assert_eq!(commit(&mut studio1, tx).await.1, Outcome::Applied);
    }
    assert_eq!(
        commit(
            &mut studio2,
            &gw.world.register(T2, &eve.public(), Custody::SelfCustody)
        )
        .await
        .1,
        Outcome::Applied
    );

    // Studio 2 submits a transaction for tenant 1 (even one signed by tenant 1's studio).
    let foreign = gw.world.mint_currency(T1, &eve.public(), "GOLD", 5);
    assert_error(&submit(&mut studio2, &foreign).await, ErrorCode::WrongTenant);
    // Studio 2's reads are scoped to tenant 2: alice has nothing there, tenant 1's events are unknown.
    assert_eq!(balance(&mut studio2, alice.public(), "GOLD").await, 0);
    let status = request(&mut studio2, |request_id| ClientMessage::EventStatus {
        request_id,
        event_id: event_id_of(&setup[2]),
    })
    .await;
    assert!(
        matches!(
            status,
            ServerMessage::EventStatus {
                state: wire::EventState::Unknown,
                ..
            }
        ),
        "{status:?}"
    );
    // Clicks are per tenant.
    studio1
        .send(&ClientMessage::Clicks {
            request_id: 1,
            clicks: vec![Click(alice.public(), "gold".into(), 9)],
        })
        .await;
    studio1
        .recv_until(|m| matches!(m, ServerMessage::ClicksAck { .. }))
        .await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let total = request(&mut studio2, |request_id| ClientMessage::Counter {
        request_id,
        counter: "gold".into(),
        player: Some(alice.public()),
    })
    .await;
    assert!(
        matches!(
            total,
            ServerMessage::Counter {
                total: 0,
                player_total: Some(0),
                ..
            }
        ),
        "{total:?}"
    );

    // Authenticating for tenant 2 with tenant 1's key: bad signature, 1008.
    let mut impostor = WsClient::connect(&gw.url()).await;
    assert_error(
        &impostor.auth_studio(T2, gw.studio(T1)).await,
        ErrorCode::BadSignature,
    );
    closed_with(impostor.closed().await, close_code::POLICY_VIOLATION);
    // A token claiming tenant 2 but signed by tenant 1's studio.
    let mut forged = WsClient::connect(&gw.url()).await;
    let mut token = SessionToken::issue(gw.studio(T1), T1, eve.public(), u64::MAX / 2);
    token.tenant = T2;
    token.expires_unix_ms = now_ms() + 60_000;
    assert_error(&forged.auth_player(token).await, ErrorCode::BadSignature);
    closed_with(forged.closed().await, close_code::POLICY_VIOLATION);
    // An unknown tenant.
    let mut nowhere = WsClient::connect(&gw.url()).await;
    assert_error(
        &nowhere.auth_studio(TenantId(99), gw.studio(T1)).await,
        ErrorCode::NotFound,
    );
    closed_with(nowhere.closed().await, close_code::POLICY_VIOLATION);

    // Eve (tenant 2) cannot read or move alice's (tenant 1) assets.
    let mut eve_conn = player(&gw, T2, &eve).await;
    let read = request(&mut eve_conn, |request_id| ClientMessage::Balances {
        request_id,
        account: alice.public(),
    })
    .await;
    assert_error(&read, ErrorCode::Forbidden);
    let steal = gw
        .world
        .transfer(T1, &alice, &alice.public(), &eve.public(), "GOLD", 10);
    assert_error(&submit(&mut eve_conn, &steal).await, ErrorCode::WrongTenant);
    let sub = request(&mut eve_conn, |request_id| ClientMessage::Subscribe {
        request_id,
        account: Some(alice.public()),
        from_height: None,
    })
    .await;
    assert_error(&sub, ErrorCode::Forbidden);
    let sub = request(&mut eve_conn, |request_id| ClientMessage::Subscribe {
        request_id,
        account: None,
        from_height: None,
    })
    .await;
    assert_error(&sub, ErrorCode::Forbidden);
    // Nothing moved.
    assert_eq!(balance(&mut studio1, alice.public(), "GOLD").await, 100);
    gw.shutdown().await;
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test]
async fn health_readiness_and_metrics_are_served() {
    let redis = RedisServer::start();
    let gw = TestGateway::start(&redis, |_| {}).await;
    let mut client = studio(&gw, T1).await;
    client
        .send(&ClientMessage::Clicks {
            request_id: 1,
            clicks: vec![Click(key("a", 0).public(), "gold".into(), 3)],
        })
        .await;
    client
        .recv_until(|m| matches!(m, ServerMessage::ClicksAck { .. }))
        .await;
    let address = gw.gateway().http_addr();
    assert!(http_get(address, "/healthz").await.starts_with("HTTP/1.1 200"));
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while !http_get(address, "/readyz").await.starts_with("HTTP/1.1 200") {
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let metrics = http_get(address, "/metrics").await;
    for name in [
        "hoard_gateway_connections_open",
        "hoard_gateway_clicks_received_total",
        "hoard_gateway_click_flush_duration_seconds",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    assert!(http_get(address, "/nope").await.starts_with("HTTP/1.1 404"));
    gw.shutdown().await;
}

/// A WebSocket protocol violation (a frame with a reserved opcode, written on a raw socket after
/// the handshake) closes the connection with 1002; the gateway keeps serving others.
#[tokio::test]
async fn a_websocket_protocol_violation_closes_with_1002() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let redis = RedisServer::start();
    let gw = TestGateway::start(&redis, |_| {}).await;
    let mut socket = tokio::net::TcpStream::connect(gw.gateway().ws_addr())
        .await
        .unwrap();
    socket
        .write_all(
            b"GET /v1 HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .unwrap();
    // The handshake answer first (bytes after the request would be refused as junk).
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    let head_end = loop {
        let read = tokio::time::timeout(std::time::Duration::from_secs(10), socket.read(&mut buffer))
            .await
            .expect("a handshake answer in time")
            .unwrap();
        assert!(
            read > 0,
            "closed before answering: {:?}",
            String::from_utf8_lossy(&received)
        );
        received.extend_from_slice(&buffer[..read]);
        if let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
    };
    assert!(
        received.starts_with(b"HTTP/1.1 101"),
        "{:?}",
        String::from_utf8_lossy(&received[..head_end])
    );
    // FIN + reserved opcode 0x3, masked, empty payload.
    socket.write_all(&[0x83, 0x80, 1, 2, 3, 4]).await.unwrap();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        socket.read_to_end(&mut received),
    )
    .await
    .expect("the gateway closes the socket")
    .unwrap();
    // Server frames are unmasked: walk them to the close frame and read its code.
    let mut at = head_end;
    let mut close_code = None;
    while at + 2 <= received.len() {
        let opcode = received[at] & 0x0f;
        let (len, header) = match received[at + 1] & 0x7f {
            126 => (
                u16::from_be_bytes([received[at + 2], received[at + 3]]) as usize,
                4,
            ),
            127 => (
                u64::from_be_bytes(received[at + 2..at + 10].try_into().unwrap()) as usize,
                10,
            ),
            len => (len as usize, 2),
        };
        let payload = &received[at + header..(at + header + len).min(received.len())];
        if opcode == 0x8 {
            close_code = Some(u16::from_be_bytes([payload[0], payload[1]]));
            break;
        }
        at += header + len;
    }
    assert_eq!(close_code, Some(close_code::PROTOCOL_ERROR));
    let mut bystander = studio(&gw, T1).await;
    assert_alive(&mut bystander).await;
    gw.shutdown().await;
}
