//! The ceiling server as a child process (`hoard-loadtest ceiling`), the layout `bench` uses when
//! the gateway runs as a child process: it must count what the driver sends, like the in-process
//! ceiling.

use std::path::Path;
use std::time::Duration;

use hoard_loadtest::bench::{ceiling_once, ClickLoad};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ceiling_child_process_counts_what_the_driver_sends() {
    let load = ClickLoad {
        connections: 2,
        clicks_per_frame: 64,
        players: 100,
        warmup: Duration::from_millis(200),
        duration: Duration::from_millis(500),
    };
    let figure = ceiling_once(&load, Some(Path::new(env!("CARGO_BIN_EXE_hoard-loadtest"))))
        .await
        .expect("ceiling run");
    assert!(figure.client.clicks_sent > 0);
    assert!(figure.server_clicks_per_second > 0.0, "{figure:?}");
    // The server cannot have decoded more clicks in the window than the driver sent in all.
    // The window's ends are stamped after each read of the child's count returns, so a read
    // that is slower at the start than at the end (milliseconds on a loaded 2-core machine;
    // one CI run measured 3% over with a 1% margin) shortens the window the rate divides by:
    // the margin covers 50 ms of that jitter in the 500 ms window.
    let window = figure.server_clicks_per_second * 0.5;
    assert!(window <= figure.client.clicks_sent as f64 * 1.10, "{figure:?}");
}
