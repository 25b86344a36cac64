//! Trades between custodial players (the gateway signs for them with the studio key), listing,
//! cancelling, and what accepting a closed offer gives.

mod common;

use std::time::Duration;

use common::{fast_options, Stack, TENANT};
use futures::StreamExt;
use hoard_sdk::{
    keys, Amount, Asset, ClassId, Client, Credentials, CurrencyId, Custody, Error, Grant, Hash, ItemId,
    Keypair, OfferCloseReason, OfferUpdate, PublicKey,
};

async fn player(stack: &Stack, key: &Keypair) -> Client {
    let token = keys::issue_session_token(
        &stack.studio_key(),
        TENANT,
        key.public(),
        Duration::from_secs(600),
    )
    .unwrap();
    // A custodial player holds no key: the gateway signs its side with the studio key.
    fast_options()
        .connect(&stack.url(), Credentials::player(token))
        .await
        .unwrap()
}

async fn setup(studio: &Client, alice: PublicKey, bob: PublicKey) -> (CurrencyId, ItemId) {
    let gold = CurrencyId::new("GOLD");
    let defined = [
        studio
            .define_currency(gold.clone(), 0, Amount(1_000_000))
            .await
            .unwrap(),
        studio
            .define_item_class(ClassId::new("sword"), false, Amount(100), Hash::of(b"sword"))
            .await
            .unwrap(),
        studio.register_account(alice, Custody::Custodial).await.unwrap(),
        studio.register_account(bob, Custody::Custodial).await.unwrap(),
    ];
    for handle in defined {
        handle.committed().await.unwrap();
    }
    let sword = ItemId(7);
    let granted = [
        studio
            .mint(
                alice,
                Grant::Unique {
                    class: ClassId::new("sword"),
                    item: sword,
                    attributes_hash: Hash::ZERO,
                },
            )
            .await
            .unwrap(),
        studio
            .mint(
                bob,
                Grant::Currency {
                    currency: gold.clone(),
                    amount: Amount(10),
                },
            )
            .await
            .unwrap(),
    ];
    for handle in granted {
        handle.committed().await.unwrap();
    }
    (gold, sword)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custodial_players_trade_list_cancel_and_cannot_accept_a_closed_offer() {
    let stack = Stack::start().await;
    let studio = stack.studio_at(&stack.url()).await;
    let (alice_key, bob_key) = (Keypair::generate(), Keypair::generate());
    let (alice, bob) = (alice_key.public(), bob_key.public());
    let (gold, sword) = setup(&studio, alice, bob).await;
    let alice_client = player(&stack, &alice_key).await;
    let bob_client = player(&stack, &bob_key).await;
    let mut alice_updates = Box::pin(alice_client.offer_updates());

    let give = vec![Asset::Item { item: sword }];
    let want = vec![Asset::Currency {
        currency: gold.clone(),
        amount: Amount(4),
    }];

    // An offer Alice cancels: both see it close; accepting it afterwards is a typed error.
    let first = alice_client
        .offer(bob, give.clone(), want.clone(), Duration::from_secs(60))
        .await
        .unwrap();
    let listed = bob_client.offers().await.unwrap();
    assert!(listed.iter().any(|offer| offer.offer_id == first.offer_id));
    alice_client.cancel(first.offer_id).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(update) = alice_updates.next().await {
            if let OfferUpdate::Closed { offer_id, reason } = update {
                if offer_id == first.offer_id {
                    return reason;
                }
            }
        }
        panic!("updates ended")
    })
    .await
    .unwrap();
    assert_eq!(closed, OfferCloseReason::Cancelled);
    let error = bob_client
        .accept(&first)
        .await
        .unwrap()
        .committed()
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            Error::Server {
                code: hoard_sdk::ErrorCode::NotFound,
                ..
            } | Error::OfferClosed { .. }
        ),
        "{error:?}"
    );
    assert!(!error.is_retryable());

    // A second offer Bob accepts: the swap applies whole.
    let second = alice_client
        .offer(bob, give, want, Duration::from_secs(60))
        .await
        .unwrap();
    let mut accepted = bob_client.accept(&second).await.unwrap();
    accepted.accepted().await.unwrap();
    let committed = accepted.committed().await.unwrap();
    assert_eq!(committed.event_id, second.offer_id);
    assert_eq!(studio.item(sword).await.unwrap().item.unwrap().owner, bob);
    assert_eq!(studio.balances(alice).await.unwrap().of(&gold), Amount(4));
    assert_eq!(bob_client.balances(bob).await.unwrap().of(&gold), Amount(6));
    assert!(bob_client.offers().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_does_not_read_ends_with_lagged_instead_of_growing() {
    let stack = Stack::start().await;
    let studio = fast_options()
        .subscription_buffer(4)
        .connect(&stack.url(), stack.studio_credentials())
        .await
        .unwrap();
    let mut activity = studio.subscribe(None).await.unwrap();
    let mut handles = Vec::new();
    for _ in 0..20 {
        handles.push(
            studio
                .register_account(Keypair::generate().public(), Custody::Custodial)
                .await
                .unwrap(),
        );
    }
    for handle in handles {
        handle.committed().await.unwrap();
    }
    let mut delivered = 0;
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(5), activity.next())
            .await
            .unwrap()
        {
            Some(Ok(_)) => delivered += 1,
            Some(Err(error)) => break error,
            None => panic!("ended without an error"),
        }
    };
    assert_eq!(delivered, 4);
    assert!(matches!(end, Error::Lagged { last_height: Some(_) }), "{end:?}");
    assert!(activity.next().await.is_none());
}
