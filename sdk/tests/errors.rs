//! Errors are typed: a game can match on kinds and ledger rejections, and knows what to retry.

mod common;

use std::time::Duration;

use common::{fast_options, Stack, TENANT};
use hoard_sdk::{
    keys, Amount, Asset, Client, ClientOptions, Credentials, CurrencyId, Custody, Error, ErrorCode,
    ErrorKind, Grant, Keypair, ReconnectPolicy, Rejection,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_rejections_are_typed_and_final() {
    let stack = Stack::start().await;
    let studio = stack.studio_at(&stack.url()).await;

    // A wrong studio key: refused credentials, final.
    let error = Client::connect(&stack.url(), Credentials::studio(TENANT, Keypair::generate()))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Auth, "{error}");
    assert!(!error.is_retryable());

    // An expired session token: refused too.
    let player_key = Keypair::generate();
    let expired = hoard_sdk::SessionToken::issue(&stack.studio_key(), TENANT, player_key.public(), 1);
    let error = Client::connect(&stack.url(), Credentials::player(expired))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Auth, "{error}");

    // Ledger rejections carry the reason.
    let nobody = Keypair::generate().public();
    let gem = CurrencyId::new("GEM");
    let error = studio
        .mint(
            nobody,
            Grant::Currency {
                currency: gem.clone(),
                amount: Amount(1),
            },
        )
        .await
        .unwrap()
        .committed()
        .await
        .unwrap_err();
    assert!(
        matches!(
            error.kind(),
            ErrorKind::Rejected(Rejection::UnknownAccount | Rejection::UnknownCurrency)
        ),
        "{error}"
    );
    assert!(!error.is_retryable());

    studio
        .define_currency(gem.clone(), 0, Amount(100))
        .await
        .unwrap()
        .committed()
        .await
        .unwrap();
    let (alice, bob) = (Keypair::generate().public(), Keypair::generate().public());
    for account in [alice, bob] {
        studio
            .register_account(account, Custody::Custodial)
            .await
            .unwrap()
            .committed()
            .await
            .unwrap();
    }
    let error = studio
        .transfer(
            alice,
            bob,
            vec![Asset::Currency {
                currency: gem.clone(),
                amount: Amount(5),
            }],
        )
        .await
        .unwrap()
        .committed()
        .await
        .unwrap_err();
    match error {
        Error::Rejected { reason, height, .. } => {
            assert_eq!(reason, Rejection::InsufficientFunds);
            assert!(height > 0);
        }
        other => panic!("expected a rejection, got {other}"),
    }
    let error = studio
        .define_currency(gem.clone(), 0, Amount(100))
        .await
        .unwrap()
        .committed()
        .await
        .unwrap_err();
    assert_eq!(error.rejection(), Some(Rejection::CurrencyExists));

    // A player may not read the leaderboard: a gateway refusal with its code, final.
    let token = keys::issue_session_token(
        &stack.studio_key(),
        TENANT,
        player_key.public(),
        Duration::from_secs(60),
    )
    .unwrap();
    let player = Client::connect(&stack.url(), Credentials::player(token))
        .await
        .unwrap();
    let error = player.leaderboard("gold", 10).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Server(ErrorCode::Forbidden), "{error}");
    assert!(!error.is_retryable());
    // A player clicking for someone else: the gateway refuses the frame (its clicks are dropped)
    // and the flush waiting for it fails with that refusal, within the request timeout, while
    // its own clicks count.
    player.click(&alice, "gold", 1).unwrap();
    let error = tokio::time::timeout(Duration::from_secs(10), player.flush_clicks())
        .await
        .expect("the flush resolves")
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Server(ErrorCode::Forbidden), "{error}");
    assert!(!error.is_retryable());
    player.click(&player_key.public(), "gold", 3).unwrap();
    tokio::time::timeout(Duration::from_secs(10), player.flush_clicks())
        .await
        .expect("the flush resolves")
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let alices = studio.counter("gold", Some(alice)).await.unwrap();
        assert_eq!(
            alices.player_total.unwrap_or(0),
            0,
            "the refused click was dropped"
        );
        let own = studio.counter("gold", Some(player_key.public())).await.unwrap();
        if own.player_total == Some(3) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "own clicks counted: {own:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Nor may it read another account.
    let error = player.balances(alice).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Server(ErrorCode::Forbidden));
    // A custodial player holds no key: it cannot sign a transfer itself.
    let error = player
        .transfer(player_key.public(), bob, vec![])
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::MissingKey);

    // Bad arguments never reach the wire.
    assert_eq!(
        studio.click(&alice, "Not Valid", 1).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        studio
            .define_currency(CurrencyId::new("gem"), 0, Amount(1))
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidArgument
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_failures_are_retryable_and_urls_are_checked() {
    let port = hoard_server::testing::free_port();
    let error = ClientOptions::new()
        .connect_timeout(Duration::from_secs(2))
        .connect(
            &format!("ws://127.0.0.1:{port}"),
            Credentials::studio(TENANT, Keypair::generate()),
        )
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Connection, "{error}");
    assert!(error.is_retryable());
    let error = Client::connect(
        "http://127.0.0.1:1",
        Credentials::studio(TENANT, Keypair::generate()),
    )
    .await
    .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::InvalidArgument);
    let error = Client::connect(
        "wss://127.0.0.1:1",
        Credentials::studio(TENANT, Keypair::generate()),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(error, Error::TlsUnsupported | Error::Connection(_)),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_gives_up_reconnecting_fails_outstanding_work_with_closed() {
    let stack = Stack::start().await;
    let proxy = common::Proxy::start(stack.ws_addr()).await;
    // Three attempts of at least 100 ms each: the submit below lands well before the client
    // gives up.
    let studio = fast_options()
        .reconnect(ReconnectPolicy {
            initial_delay: Duration::from_millis(200),
            max_delay: Duration::from_millis(400),
            max_attempts: Some(3),
        })
        .connect(&proxy.url(), stack.studio_credentials())
        .await
        .unwrap();
    proxy.cut_and_refuse(&studio).await;
    // Submitted after the cut, so never sent: it can only fail, with Closed, once the client
    // gives up.
    let mut handle = studio
        .register_account(Keypair::generate().public(), Custody::Custodial)
        .await
        .unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        studio
            .state()
            .wait_for(|state| *state == hoard_sdk::ConnectionState::Closed),
    )
    .await
    .expect("the client closes")
    .unwrap();
    assert_eq!(handle.accepted().await, Err(Error::Closed));
    assert_eq!(handle.committed().await, Err(Error::Closed));
    assert_eq!(studio.head().await.unwrap_err(), Error::Closed);
    assert_eq!(
        studio
            .click(&Keypair::generate().public(), "gold", 1)
            .unwrap_err(),
        Error::Closed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_refused_at_a_reconnect_close_the_client_and_fail_outstanding_work_with_auth_refused() {
    let stack = Stack::start().await;
    let proxy = common::Proxy::start(stack.ws_addr()).await;
    // A self-custody player whose session token expires soon after it connects: the connection
    // stays authenticated, but a reconnect after the expiry is refused.
    let player_key = Keypair::generate();
    let ttl = Duration::from_millis(1500);
    let issued = tokio::time::Instant::now();
    let token = keys::issue_session_token(&stack.studio_key(), TENANT, player_key.public(), ttl).unwrap();
    let player = fast_options()
        .connect(
            &proxy.url(),
            Credentials::player_with_key(token, player_key.clone()),
        )
        .await
        .unwrap();
    proxy.cut_and_refuse(&player).await;
    // Submitted while disconnected (never sent), and a click held.
    let mut handle = player
        .transfer(player_key.public(), Keypair::generate().public(), Vec::new())
        .await
        .unwrap();
    player.click(&player_key.public(), "gold", 2).unwrap();
    tokio::time::sleep_until(issued + ttl + Duration::from_millis(200)).await;
    proxy.set_refusing(false);
    tokio::time::timeout(
        Duration::from_secs(10),
        player
            .state()
            .wait_for(|state| *state == hoard_sdk::ConnectionState::Closed),
    )
    .await
    .expect("the refused reconnect closes the client")
    .unwrap();
    let error = handle.accepted().await.unwrap_err();
    assert!(
        matches!(
            error,
            Error::AuthRefused {
                code: ErrorCode::ExpiredToken,
                ..
            }
        ),
        "{error}"
    );
    assert_eq!(error.kind(), ErrorKind::Auth);
    assert_eq!(handle.committed().await.unwrap_err(), error);
    assert_eq!(
        player.balances(player_key.public()).await.unwrap_err(),
        Error::Closed
    );
    assert_eq!(
        player.click(&player_key.public(), "gold", 1).unwrap_err(),
        Error::Closed
    );
    // The click it held was dropped with it: `close` reports it.
    assert_eq!(
        player.close().await,
        Err(Error::ClicksUnacknowledged { clicks: 2 })
    );
}
