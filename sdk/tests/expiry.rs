//! Expiry heights: an event's default expiry counts from the chain head the client read, never
//! from a head it has not read yet.

mod common;

use common::{define_gem, fast_options, register_players, Stack};
use hoard_sdk::{Amount, Grant, Outcome};

/// A small margin, so that a chain a few blocks high is already past it.
const MARGIN: u64 = 3;

// A current-thread runtime: the connection task spawned by `connect` has not run yet when the
// first mint is signed, so only what `connect` itself recorded is known then.
#[tokio::test(flavor = "current_thread")]
async fn the_first_event_after_connect_expires_after_the_head_the_connection_read() {
    let stack = Stack::start().await;
    let studio = stack.studio_at(&stack.url()).await;
    let gem = define_gem(&studio).await;
    let player = register_players(&studio, 1).await[0];
    // One commit per block: move the chain well past the margin.
    while studio.head().await.unwrap().height <= 2 * MARGIN {
        register_players(&studio, 1).await;
    }

    let fresh = fast_options()
        .expiry_margin_blocks(MARGIN)
        .connect(&stack.url(), stack.studio_credentials())
        .await
        .unwrap();
    assert!(
        fresh.known_head() > 2 * MARGIN,
        "the head read when connecting is known at once: {}",
        fresh.known_head()
    );
    let grant = Grant::Currency {
        currency: gem.clone(),
        amount: Amount(7),
    };
    let committed = fresh
        .mint(player, grant)
        .await
        .unwrap()
        .committed()
        .await
        .expect("signed with an expiry past the head: it commits, not expires");
    assert_eq!(committed.outcome, Outcome::Applied);
    assert_eq!(fresh.balances(player).await.unwrap().of(&gem), Amount(7));
}
