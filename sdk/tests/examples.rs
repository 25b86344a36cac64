//! The examples run against a real gateway and redis-server: their logic is compiled here as
//! modules and called with the test stack's URL and studio key.

mod common;

#[path = "../examples/clicker.rs"]
#[allow(dead_code)]
mod clicker;
#[path = "../examples/trading.rs"]
#[allow(dead_code)]
mod trading;

use common::{Stack, TENANT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clicker_game_earns_gold_by_settlement_and_buys_swords() {
    let stack = Stack::start().await;
    let report = clicker::run(&stack.url(), TENANT, stack.studio_key(), 5, 250)
        .await
        .unwrap();
    assert_eq!(report.players.len(), 5);
    // 250 clicks = 2 GOLD (100 points each, remainder kept), minus the sword's price.
    assert!(
        report
            .gold_left
            .iter()
            .all(|gold| *gold == 2 - clicker::SWORD_PRICE),
        "{report:?}"
    );
    let reader = hoard_sdk::Client::connect(&stack.url(), stack.studio_credentials())
        .await
        .unwrap();
    for (player, sword) in report.players.iter().zip(&report.swords) {
        let item = reader.item(*sword).await.unwrap();
        assert_eq!(item.item.map(|item| item.owner), Some(*player));
    }
    assert!(
        report.leaderboard.iter().any(|(_, score)| *score == 250),
        "{:?}",
        report.leaderboard
    );
    // Arguments as the binary takes them.
    let args: Vec<String> = [
        "--url",
        "ws://h:1",
        "--tenant",
        "2",
        "--studio-seed",
        &"07".repeat(32),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (url, tenant, _) = clicker::parse_args(&args).unwrap();
    assert_eq!((url.as_str(), tenant), ("ws://h:1", hoard_sdk::TenantId(2)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_players_swap_a_sword_for_gold() {
    let stack = Stack::start().await;
    let report = trading::run(&stack.url(), TENANT, stack.studio_key())
        .await
        .unwrap();
    assert_eq!(report.sword_owner, Some(report.bob));
    assert_eq!(report.alice_gold, trading::PRICE);
    assert_eq!(report.bob_gold, 0);
}
