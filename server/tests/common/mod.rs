//! Helpers shared by the gateway's integration tests (on top of `hoard_server::testing`).
#![allow(dead_code)]

use hoard_server::testing::{response_id, TestGateway, WsClient};
use hoard_types::wire::{ClientMessage, ErrorCode, ServerMessage};
use hoard_types::{Amount, CurrencyId, EventId, Keypair, Outcome, PublicKey, TenantId, Transaction};

pub const T1: TenantId = TenantId(1);
pub const T2: TenantId = TenantId(2);

pub async fn studio(gateway: &TestGateway, tenant: TenantId) -> WsClient {
    let mut client = WsClient::connect(&gateway.url()).await;
    let answer = client.auth_studio(tenant, gateway.studio(tenant)).await;
    assert!(
        matches!(answer, ServerMessage::Authenticated { .. }),
        "{answer:?}"
    );
    client
}

pub async fn player(gateway: &TestGateway, tenant: TenantId, key: &Keypair) -> WsClient {
    let mut client = WsClient::connect(&gateway.url()).await;
    let answer = client.auth_player(gateway.token(tenant, key)).await;
    assert!(
        matches!(answer, ServerMessage::Authenticated { .. }),
        "{answer:?}"
    );
    client
}

pub fn event_id_of(tx: &Transaction) -> EventId {
    tx.decode_payload().expect("payload").event_id
}

/// Submits and returns the first answer (accepted or error).
pub async fn submit(client: &mut WsClient, tx: &Transaction) -> ServerMessage {
    let request_id = client.request_id();
    client
        .request(ClientMessage::Submit {
            request_id,
            tx: tx.clone(),
        })
        .await
}

/// Submits, expects `accepted`, then waits for the commit push; returns (height, outcome).
pub async fn commit(client: &mut WsClient, tx: &Transaction) -> (u64, Outcome) {
    let event_id = event_id_of(tx);
    let answer = submit(client, tx).await;
    assert!(
        matches!(answer, ServerMessage::Accepted { event_id: e, .. } if e == event_id),
        "expected accepted, got {answer:?}"
    );
    wait_commit(client, event_id).await
}

pub async fn wait_commit(client: &mut WsClient, event_id: EventId) -> (u64, Outcome) {
    let message = client
        .recv_until(|m| match m {
            ServerMessage::Committed { event_id: e, .. } | ServerMessage::Rejected { event_id: e, .. } => {
                *e == event_id
            }
            _ => false,
        })
        .await;
    match message {
        ServerMessage::Committed { height, outcome, .. } => (height, outcome),
        ServerMessage::Rejected { height, reason, .. } => (height, Outcome::Rejected { reason }),
        _ => unreachable!(),
    }
}

/// Asserts that `message` is an error with `code`.
pub fn assert_error(message: &ServerMessage, code: ErrorCode) {
    match message {
        ServerMessage::Error { code: got, .. } => assert_eq!(*got, code, "{message:?}"),
        other => panic!("expected error {code:?}, got {other:?}"),
    }
}

pub async fn request(client: &mut WsClient, make: impl FnOnce(u64) -> ClientMessage) -> ServerMessage {
    let request_id = client.request_id();
    let message = make(request_id);
    let answer = client.request(message).await;
    assert_eq!(response_id(&answer), Some(request_id));
    answer
}

pub async fn balance(client: &mut WsClient, account: PublicKey, currency: &str) -> u128 {
    match request(client, |request_id| ClientMessage::Balances {
        request_id,
        account,
    })
    .await
    {
        ServerMessage::Balances { balances, .. } => balances
            .iter()
            .find(|(c, _)| *c == CurrencyId::new(currency))
            .map(|(_, Amount(a))| *a)
            .unwrap_or(0),
        other => panic!("expected balances, got {other:?}"),
    }
}

/// The whole response to `GET path` on the gateway's HTTP listener.
pub async fn http_get(address: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

/// The value of an unlabelled counter in a `/metrics` page (0 when absent).
pub fn counter_value(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find(|line| line.split(' ').next() == Some(name))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse::<f64>().ok())
        .map(|value| value as u64)
        .unwrap_or(0)
}
