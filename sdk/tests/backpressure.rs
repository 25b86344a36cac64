//! Bounded memory: the in-flight limit makes submitters wait for a permit; the click buffer
//! refuses clicks when full instead of growing.

mod common;

use std::time::Duration;

use tokio::time::Instant;

use common::{define_gem, fast_options, Proxy, Stack};
use hoard_sdk::{Amount, CurrencyId, Custody, Error, Keypair};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submits_wait_for_a_permit_when_the_in_flight_limit_is_reached() {
    // A gateway without a batcher accepts events but never sends them to the chain.
    let stack = Stack::start_with(|config| config.events.batcher = false).await;
    let studio = fast_options()
        .max_in_flight_events(4)
        .connect(&stack.url(), stack.studio_credentials())
        .await
        .unwrap();
    assert_eq!(studio.available_event_permits(), 4);
    let player = Keypair::generate().public();
    let mut handles = Vec::new();
    for _ in 0..4 {
        let mut handle = studio.register_account(player, Custody::Custodial).await.unwrap();
        handle.accepted().await.unwrap();
        handles.push(handle);
    }
    assert_eq!(studio.available_event_permits(), 0);
    // The fifth waits: no unbounded queue.
    let fifth = studio.define_currency(CurrencyId::new("GEM"), 0, Amount(10));
    tokio::pin!(fifth);
    assert!(tokio::time::timeout(Duration::from_millis(500), &mut fifth)
        .await
        .is_err());

    // A second gateway with a batcher, on the same chain and Redis, claims the pending events
    // and commits them: the permits come back and the fifth submit proceeds.
    let chain = stack.gateway.chain().clone();
    let mut config = stack.gateway.config.clone();
    config.events.batcher = true;
    let world = hoard_ledger::testing::World::new(2);
    let backend: std::sync::Arc<dyn hoard_server::Chain> = std::sync::Arc::new(chain);
    let second = hoard_server::Gateway::start(config, backend, &world.genesis())
        .await
        .unwrap();
    let fifth = tokio::time::timeout(Duration::from_secs(30), fifth)
        .await
        .expect("a permit came back")
        .unwrap();
    let results = futures::future::join_all(handles.into_iter().map(|handle| handle.committed())).await;
    // The same account registered four times: one applies, three are rejected, all resolve.
    let applied = results.iter().filter(|result| result.is_ok()).count();
    assert_eq!(applied, 1, "{results:?}");
    assert!(results
        .iter()
        .filter_map(|r| r.as_ref().err())
        .all(|e| e.rejection().is_some()));
    fifth.committed().await.unwrap();
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clicks_are_refused_not_queued_without_bound_while_the_gateway_is_unreachable() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let stack = Stack::start().await;
    let proxy = Proxy::start(stack.ws_addr()).await;
    let studio = fast_options()
        .click_frames_buffered_max(2)
        .connect(&proxy.url(), stack.studio_credentials())
        .await
        .unwrap();
    let player = Keypair::generate().public();
    proxy.set_refusing(true);
    proxy.cut();
    let mut state = studio.state();
    state
        .wait_for(|state| *state != hoard_sdk::ConnectionState::Connected)
        .await
        .unwrap();
    let mut accepted = 0usize;
    let error = loop {
        match studio.click(&player, "gold", 1) {
            Ok(()) => accepted += 1,
            Err(error) => break error,
        }
        assert!(
            accepted <= 3 * hoard_types::wire::CLICKS_PER_FRAME_MAX,
            "the buffer is bounded"
        );
    };
    assert_eq!(error, Error::ClicksBackpressure);
    assert!(error.is_retryable());
    assert_eq!(accepted, 2 * hoard_types::wire::CLICKS_PER_FRAME_MAX);

    // Once the gateway is reachable again, the buffered clicks are delivered and counted.
    proxy.set_refusing(false);
    state
        .wait_for(|state| *state == hoard_sdk::ConnectionState::Connected)
        .await
        .unwrap();
    studio.flush_clicks().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let totals = studio.counter("gold", Some(player)).await.unwrap();
        if totals.player_total == Some(accepted as u64) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "clicks counted: {totals:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_thousands_of_events_all_commit() {
    // More commands and pushes than the connection task handles per turn: none may be lost.
    let stack = Stack::start().await;
    let studio = stack.studio_at(&stack.url()).await;
    let gem = define_gem(&studio).await;
    let player = Keypair::generate().public();
    studio
        .register_account(player, Custody::Custodial)
        .await
        .unwrap()
        .committed()
        .await
        .unwrap();
    const GRANTS: u128 = 3_000;
    const SUBMITTERS: u128 = 10;
    // Many submitters at once, so that commands queue up faster than one turn takes them.
    let submitters: Vec<_> = (0..SUBMITTERS)
        .map(|_| {
            let studio = studio.clone();
            let gem = gem.clone();
            tokio::spawn(async move {
                let mut handles = Vec::new();
                for _ in 0..GRANTS / SUBMITTERS {
                    let grant = hoard_sdk::Grant::Currency {
                        currency: gem.clone(),
                        amount: Amount(1),
                    };
                    handles.push(studio.mint(player, grant).await.unwrap());
                }
                handles
            })
        })
        .collect();
    let mut handles = Vec::new();
    for submitter in submitters {
        handles.extend(submitter.await.unwrap());
    }
    let results = tokio::time::timeout(
        Duration::from_secs(60),
        futures::future::join_all(handles.into_iter().map(|handle| handle.committed())),
    )
    .await
    .expect("all resolve");
    assert!(results.iter().all(|result| result.is_ok()));
    assert_eq!(studio.balances(player).await.unwrap().of(&gem), Amount(GRANTS));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_gateway_is_retried_after_the_delay_it_asks_for() {
    // Longer than the backlog below takes to clear, so that a resend before it would be accepted.
    const RETRY_AFTER: Duration = Duration::from_secs(4);
    // A gateway that holds at most 3 uncommitted events and commits nothing answers `busy`.
    let stack = Stack::start_with(|config| {
        config.events.batcher = false;
        config.events.pending_max = 3;
        config.events.busy_retry_after_ms = RETRY_AFTER.as_millis() as u64;
    })
    .await;
    let studio = stack.studio_at(&stack.url()).await;
    let mut handles = Vec::new();
    for _ in 0..3 {
        let mut handle = studio
            .register_account(Keypair::generate().public(), Custody::Custodial)
            .await
            .unwrap();
        handle.accepted().await.unwrap();
        handles.push(handle);
    }
    // The gateway is full: these two are refused with `busy`, after `refused_from`.
    let refused_from = Instant::now();
    let mut refused = Vec::new();
    for _ in 0..2 {
        refused.push(
            studio
                .register_account(Keypair::generate().public(), Custody::Custodial)
                .await
                .unwrap(),
        );
    }

    // A gateway with a batcher commits the backlog, which makes room well before the delay asked
    // for ends...
    let mut config = stack.gateway.config.clone();
    config.events.batcher = true;
    let world = hoard_ledger::testing::World::new(2);
    let backend: std::sync::Arc<dyn hoard_server::Chain> = std::sync::Arc::new(stack.gateway.chain().clone());
    let second = hoard_server::Gateway::start(config, backend, &world.genesis())
        .await
        .unwrap();
    let results = tokio::time::timeout(
        Duration::from_secs(30),
        futures::future::join_all(handles.into_iter().map(|handle| handle.committed())),
    )
    .await
    .expect("the backlog commits");
    assert!(results.iter().all(|result| result.is_ok()), "{results:?}");
    let room_after = refused_from.elapsed();
    assert!(
        room_after + Duration::from_millis(500) < RETRY_AFTER,
        "the backlog took {room_after:?}: too long to tell an early resend"
    );

    // ...yet the refused events are not sent again before it: they are accepted only after it,
    // then commit (retried, not failed).
    for handle in &mut refused {
        tokio::time::timeout(Duration::from_secs(30), handle.accepted())
            .await
            .expect("the retried event is accepted")
            .unwrap();
        let accepted_after = refused_from.elapsed();
        assert!(
            accepted_after >= RETRY_AFTER,
            "resent after {accepted_after:?}, before the {RETRY_AFTER:?} the gateway asked for"
        );
    }
    let results = tokio::time::timeout(
        Duration::from_secs(30),
        futures::future::join_all(refused.into_iter().map(|handle| handle.committed())),
    )
    .await
    .expect("every event resolves");
    assert!(results.iter().all(|result| result.is_ok()), "{results:?}");
    second.shutdown().await;
}
