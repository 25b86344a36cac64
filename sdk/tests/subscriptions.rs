//! Subscriptions resume after lost connections without gaps or duplicates (real gateway, real
//! redis-server, a proxy cutting the subscriber's connection).

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{define_gem, Proxy, Stack};
use futures::StreamExt;
use hoard_sdk::{Amount, Custody, EventId, Grant, Keypair, TxBody};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_subscription_resumes_without_gaps_or_duplicates() {
    let stack = Stack::start().await;
    let proxy = Proxy::start(stack.ws_addr()).await;
    // The writer talks to the gateway directly; only the subscriber's connection is cut.
    let writer = stack.studio_at(&stack.url()).await;
    let subscriber = stack.studio_at(&proxy.url()).await;
    let gem = define_gem(&writer).await;
    let player = Keypair::generate().public();
    writer
        .register_account(player, Custody::Custodial)
        .await
        .unwrap()
        .committed()
        .await
        .unwrap();

    let mut activity = subscriber.subscribe(None).await.unwrap();
    const GRANTS: usize = 300;
    let mut expected = Vec::with_capacity(GRANTS);
    let mut handles = Vec::new();
    for index in 0..GRANTS {
        let grant = Grant::Currency {
            currency: gem.clone(),
            amount: Amount(1),
        };
        let mut handle = writer.mint(player, grant).await.unwrap();
        expected.push(handle.event_id());
        if index % 50 == 25 {
            // Cut the subscriber while activity flows: this grant is in, later ones are not yet.
            handle.accepted().await.unwrap();
            let reconnects = subscriber.reconnect_count();
            proxy.cut();
            // Grants already submitted commit while the subscriber is away; the next cut waits
            // for its return.
            while subscriber.reconnect_count() == reconnects {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        handles.push(handle);
    }
    for handle in handles {
        handle.committed().await.unwrap();
    }

    let expected_set: HashSet<EventId> = expected.iter().copied().collect();
    let mut seen = HashSet::new();
    let mut last_height = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen.len() < GRANTS {
        let next = tokio::time::timeout_at(deadline, activity.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {GRANTS} activities arrived", seen.len()))
            .expect("the stream goes on")
            .expect("no error");
        assert!(next.height >= last_height, "commit order");
        last_height = next.height;
        assert!(seen.insert(next.event_id), "duplicate {:?}", next.event_id);
        assert!(
            expected_set.contains(&next.event_id),
            "an activity nobody submitted"
        );
        assert!(matches!(next.body, TxBody::Mint { to, .. } if to == player));
    }
    assert!(
        subscriber.reconnect_count() >= 5,
        "reconnects: {}",
        subscriber.reconnect_count()
    );
    // Nothing more than the grants arrives.
    assert!(tokio::time::timeout(Duration::from_millis(300), activity.next())
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_subscription_sees_only_its_account_and_can_replay_history() {
    let stack = Stack::start().await;
    let studio = stack.studio_at(&stack.url()).await;
    let gem = define_gem(&studio).await;
    let alice = Keypair::generate().public();
    let bob = Keypair::generate().public();
    let start = studio.head().await.unwrap().height + 1;
    for account in [alice, bob] {
        studio
            .register_account(account, Custody::Custodial)
            .await
            .unwrap()
            .committed()
            .await
            .unwrap();
    }
    let grant = Grant::Currency {
        currency: gem.clone(),
        amount: Amount(3),
    };
    let to_bob = studio
        .mint(bob, grant.clone())
        .await
        .unwrap()
        .committed()
        .await
        .unwrap();
    let to_alice = studio
        .mint(alice, grant)
        .await
        .unwrap()
        .committed()
        .await
        .unwrap();

    // From a past height: the history first (alice's registration, then her grant), nothing of bob's.
    let mut activity = studio.subscribe_from(Some(alice), start).await.unwrap();
    let first = activity.next().await.unwrap().unwrap();
    assert!(matches!(first.body, TxBody::RegisterAccount { account, .. } if account == alice));
    let second = activity.next().await.unwrap().unwrap();
    assert_eq!(second.event_id, to_alice.event_id);
    assert_ne!(second.event_id, to_bob.event_id);
    drop(activity);
}
