//! hoard-loadtest: simulated players at game rates, and benchmarks against ceilings measured in
//! the same run.
//!
//! Layout:
//! - [`players`]: the player simulator (game-server connections carrying many players, and one
//!   connection per player), open loop, through the SDK. `hoard demo` uses it too.
//! - [`stack`]: starts the whole stack (4 replica processes, a private redis-server, the gateway
//!   in-process on [`hoard_server::chain::ClusterChain`]) and checks it at the end (state roots, invariants).
//! - [`bench`]: the benchmarks of `hoard-loadtest bench`: the WebSocket ceiling, the gateway
//!   absorbing clicks, the chain alone, the full path.
//! - [`stats`]: HDR latency histograms, rates, errors by reason (pure, unit-tested).
//! - [`sys`]: RSS from /proc, RLIMIT_NOFILE, scraping Prometheus `/metrics`.
//!
//! Invariants: every sender is open loop (what is due is computed from the clock and latencies
//! count from the intended send time); no figure is printed that this run did not measure.

pub mod bench;
pub mod players;
pub mod stack;
pub mod stats;
pub mod sys;
