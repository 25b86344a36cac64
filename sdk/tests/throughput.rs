//! Rough throughput of the SDK's hot paths against a real gateway (ignored by default: it prints
//! figures rather than asserting them). `cargo test -p hoard-sdk --release --test throughput -- --ignored --nocapture`

mod common;

use std::time::{Duration, Instant};

use common::{define_gem, Stack};
use hoard_sdk::{Amount, Custody, Grant, Keypair};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn clicks_and_grants_per_second() {
    let stack = Stack::start().await;
    let studio = stack.studio_at(&stack.url()).await;
    let players: Vec<_> = (0..10_000).map(|_| Keypair::generate().public()).collect();

    const CLICKS: usize = 2_000_000;
    let started = Instant::now();
    let mut refused = 0u64;
    for index in 0..CLICKS {
        while studio.click(&players[index % players.len()], "gold", 1).is_err() {
            refused += 1;
            tokio::task::yield_now().await;
        }
    }
    studio.flush_clicks().await.unwrap();
    let elapsed = started.elapsed();
    println!(
        "clicks: {CLICKS} in {elapsed:?} = {:.0}/s acknowledged ({refused} backpressure retries)",
        CLICKS as f64 / elapsed.as_secs_f64()
    );

    let gem = define_gem(&studio).await;
    let player = players[0];
    studio
        .register_account(player, Custody::Custodial)
        .await
        .unwrap()
        .committed()
        .await
        .unwrap();
    const GRANTS: usize = 20_000;
    let started = Instant::now();
    let mut handles = Vec::with_capacity(GRANTS);
    for _ in 0..GRANTS {
        let grant = Grant::Currency {
            currency: gem.clone(),
            amount: Amount(1),
        };
        handles.push(studio.mint(player, grant).await.unwrap());
    }
    let mut failed = 0;
    for handle in handles {
        if let Err(error) = handle.committed().await {
            if failed == 0 {
                eprintln!(
                    "first failure: {error:?} state {:?} reconnects {}",
                    *studio.state().borrow(),
                    studio.reconnect_count()
                );
            }
            failed += 1;
        }
    }
    assert_eq!(failed, 0, "failed");
    let elapsed = started.elapsed();
    println!(
        "grants: {GRANTS} committed in {elapsed:?} = {:.0}/s (one studio connection, 1024 in flight)",
        GRANTS as f64 / elapsed.as_secs_f64()
    );
    assert!(elapsed < Duration::from_secs(600));
}
