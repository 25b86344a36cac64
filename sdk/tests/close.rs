//! `close` delivers the clicks the client holds, through a reconnect if need be, and reports those
//! it could not, against a real gateway and redis-server.

mod common;

use std::time::Duration;

use common::{fast_options, Proxy, Stack};
use hoard_sdk::{Client, ConnectionState, Error, Keypair, PublicKey};
use tokio::time::Instant;

/// Clicks are sent only when `close` (or a flush) sends them: the timer never fires in a test.
const NEVER: Duration = Duration::from_secs(3600);

/// Waits until the gateway counted `expected` `gold` clicks of `player` (the gateway writes them
/// to Redis within its flush interval after acknowledging them).
async fn wait_counted(reader: &Client, player: PublicKey, expected: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let total = reader.counter("gold", Some(player)).await.unwrap().player_total;
        if total == Some(expected) {
            return;
        }
        assert!(total.unwrap_or(0) < expected, "counted more than sent: {total:?}");
        assert!(
            Instant::now() < deadline,
            "{expected} clicks counted in time: {total:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_delivers_the_clicks_still_buffered() {
    let stack = Stack::start().await;
    let studio = fast_options()
        .click_flush_interval(NEVER)
        .connect(&stack.url(), stack.studio_credentials())
        .await
        .unwrap();
    let player = Keypair::generate().public();
    for _ in 0..10 {
        studio.click(&player, "gold", 1).unwrap();
    }
    studio.click(&player, "gold", 5).unwrap();
    tokio::time::timeout(Duration::from_secs(10), studio.close())
        .await
        .expect("close returns")
        .expect("every click acknowledged");
    assert_eq!(*studio.state().borrow(), ConnectionState::Closed);
    assert_eq!(studio.click(&player, "gold", 1).unwrap_err(), Error::Closed);
    let reader = stack.studio_at(&stack.url()).await;
    wait_counted(&reader, player, 15).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_waits_for_a_reconnect_to_deliver_clicks_buffered_while_disconnected() {
    let stack = Stack::start().await;
    let proxy = Proxy::start(stack.ws_addr()).await;
    let studio = fast_options()
        .click_flush_interval(NEVER)
        .connect(&proxy.url(), stack.studio_credentials())
        .await
        .unwrap();
    proxy.cut_and_refuse(&studio).await;
    let player = Keypair::generate().public();
    studio.click(&player, "gold", 7).unwrap();
    let (closed, ()) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(10), studio.close()),
        async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            proxy.set_refusing(false);
        }
    );
    closed
        .expect("close returns")
        .expect("delivered after the reconnect");
    assert!(studio.reconnect_count() >= 1);
    let reader = stack.studio_at(&stack.url()).await;
    wait_counted(&reader, player, 7).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_reports_the_clicks_it_could_not_deliver_and_closes_anyway() {
    let stack = Stack::start().await;
    let proxy = Proxy::start(stack.ws_addr()).await;
    let timeout = Duration::from_millis(300);
    let studio = fast_options()
        .close_flush_timeout(timeout)
        .connect(&proxy.url(), stack.studio_credentials())
        .await
        .unwrap();
    proxy.cut_and_refuse(&studio).await;
    let player = Keypair::generate().public();
    studio.click(&player, "gold", 3).unwrap();
    studio.click(&player, "gold", 4).unwrap();
    let started = Instant::now();
    let error = tokio::time::timeout(Duration::from_secs(10), studio.close())
        .await
        .expect("close returns, bounded by its timeout")
        .unwrap_err();
    assert_eq!(error, Error::ClicksUnacknowledged { clicks: 7 });
    assert_eq!(error.kind(), hoard_sdk::ErrorKind::ClicksUnacknowledged);
    assert!(!error.is_retryable());
    assert!(started.elapsed() >= timeout, "it waited for a reconnect first");
    assert_eq!(*studio.state().borrow(), ConnectionState::Closed);
    assert_eq!(studio.head().await.unwrap_err(), Error::Closed);
    assert_eq!(studio.click(&player, "gold", 1).unwrap_err(), Error::Closed);
    // Closing again gives the same answer, at once.
    let again = tokio::time::timeout(Duration::from_secs(1), studio.close())
        .await
        .expect("at once");
    assert_eq!(again, Err(Error::ClicksUnacknowledged { clicks: 7 }));
    // Nothing was counted: the clicks never reached the gateway.
    let reader = stack.studio_at(&stack.url()).await;
    assert_eq!(
        reader
            .counter("gold", Some(player))
            .await
            .unwrap()
            .player_total
            .unwrap_or(0),
        0
    );
}
