//! Exactly-once asset events across lost connections, against a real gateway and redis-server.

mod common;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{count_disconnects, define_gem, register_players, Proxy, Stack};
use hoard_sdk::{Amount, CurrencyId, EventState, Grant, Outcome, PublicKey};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_grant_commits_exactly_once_when_connections_are_cut_mid_stream() {
    let stack = Stack::start().await;
    let proxy = Proxy::start(stack.ws_addr()).await;
    let studio = stack.studio_at(&proxy.url()).await;
    let disconnects = count_disconnects(&studio);
    let gem = define_gem(&studio).await;
    let players = register_players(&studio, 8).await;

    const GRANTS: usize = 400;
    const CUT_EVERY: usize = 60;
    let mut handles = Vec::with_capacity(GRANTS);
    let mut expected: HashMap<PublicKey, u128> = HashMap::new();
    for index in 0..GRANTS {
        let player = players[index % players.len()];
        let amount = 1 + (index as u128 % 3);
        *expected.entry(player).or_default() += amount;
        let grant = Grant::Currency {
            currency: gem.clone(),
            amount: Amount(amount),
        };
        handles.push(studio.mint(player, grant).await.expect("submitted"));
        if index % CUT_EVERY == CUT_EVERY - 1 {
            // Cut once the stream flows again (this event accepted), with events in every state:
            // unsent, sent, accepted, committed but not yet reported.
            handles
                .last_mut()
                .expect("just pushed")
                .accepted()
                .await
                .expect("accepted");
            proxy.cut();
        }
    }
    let event_ids: Vec<_> = handles.iter().map(|handle| handle.event_id()).collect();
    let committed = tokio::time::timeout(
        Duration::from_secs(60),
        futures::future::join_all(handles.into_iter().map(|handle| handle.committed())),
    )
    .await
    .expect("every committed() resolves");
    for result in &committed {
        let committed = result.as_ref().expect("every grant commits");
        assert_eq!(committed.outcome, Outcome::Applied);
    }
    assert!(
        studio.reconnect_count() >= (GRANTS / CUT_EVERY) as u64,
        "the connection was cut and re-established {} times",
        studio.reconnect_count()
    );
    assert!(
        disconnects.load(Ordering::Relaxed) >= 1,
        "the state showed the disconnection"
    );

    // Exactly once: each balance is the sum of its grants, read on a fresh, direct connection.
    let reader = stack.studio_at(&stack.url()).await;
    for (player, amount) in &expected {
        let balances = reader.balances(*player).await.unwrap();
        assert_eq!(balances.of(&gem), Amount(*amount), "balance of {player:?}");
    }
    for event_id in event_ids.iter().step_by(37) {
        let status = reader.event_status(*event_id).await.unwrap();
        assert_eq!(status.state, EventState::Committed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_submitted_while_disconnected_are_sent_after_the_reconnect() {
    let stack = Stack::start().await;
    let proxy = Proxy::start(stack.ws_addr()).await;
    let studio = stack.studio_at(&proxy.url()).await;
    let players = register_players(&studio, 2).await;
    let mut state = studio.state();

    proxy.set_refusing(true);
    proxy.cut();
    state
        .wait_for(|state| *state != hoard_sdk::ConnectionState::Connected)
        .await
        .unwrap();
    let gem = CurrencyId::new("GEM");
    let define = studio
        .define_currency(gem.clone(), 0, Amount(1_000))
        .await
        .unwrap();
    let mut mint = studio
        .mint(
            players[0],
            Grant::Currency {
                currency: gem.clone(),
                amount: Amount(7),
            },
        )
        .await
        .unwrap();
    // Nothing can be accepted while the gateway is unreachable.
    assert!(tokio::time::timeout(Duration::from_millis(300), mint.accepted())
        .await
        .is_err());
    proxy.set_refusing(false);
    mint.accepted().await.unwrap();
    define.committed().await.unwrap();
    let committed = mint.committed().await.unwrap();
    assert!(committed.height > 0);
    assert_eq!(studio.balances(players[0]).await.unwrap().of(&gem), Amount(7));
    assert_eq!(*studio.state().borrow(), hoard_sdk::ConnectionState::Connected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_survive_a_gateway_crash_and_restart_on_the_same_address() {
    let mut stack = Stack::start().await;
    let address = stack.ws_addr();
    let studio = stack.studio_at(&stack.url()).await;
    let gem = define_gem(&studio).await;
    let players = register_players(&studio, 4).await;

    let mut handles = Vec::new();
    for index in 0..100 {
        let grant = Grant::Currency {
            currency: gem.clone(),
            amount: Amount(1),
        };
        handles.push(studio.mint(players[index % 4], grant).await.unwrap());
    }
    // Crash the gateway (no drain), then start another one on the same port, chain and Redis.
    let chain = stack.gateway.chain().clone();
    let mut config = stack.gateway.config.clone();
    config.listen = address;
    stack.gateway.gateway.take().expect("running").abort();
    let gateway = loop {
        let world = hoard_ledger::testing::World::new(2);
        let backend: std::sync::Arc<dyn hoard_server::Chain> = std::sync::Arc::new(chain.clone());
        match hoard_server::Gateway::start(config.clone(), backend, &world.genesis()).await {
            Ok(gateway) => break gateway,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let results = tokio::time::timeout(
        Duration::from_secs(60),
        futures::future::join_all(handles.into_iter().map(|handle| handle.committed())),
    )
    .await
    .expect("every committed() resolves");
    assert!(results.iter().all(|result| result.is_ok()), "{results:?}");
    for player in &players {
        assert_eq!(studio.balances(*player).await.unwrap().of(&gem), Amount(25));
    }
    gateway.shutdown().await;
}
