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
//! - [`idle`]: memory per idle player connection on the gateway (`hoard-loadtest idle`).
//! - [`growth`]: rows of how cost grows with players, replicas and batch size
//!   (`hoard-loadtest grow`), and the one-connection-per-player ladder (`hoard-loadtest ladder`).
//! - [`gateway_process`]: the gateway as a child process (its memory and CPU its own).
//! - [`stats`]: HDR latency histograms, rates, line fits, ladder verdicts, errors by reason
//!   (pure, unit-tested).
//! - [`sys`]: RSS and CPU time from /proc, RLIMIT_NOFILE, scraping Prometheus `/metrics`.
//!
//! Invariants: every sender is open loop (what is due is computed from the clock and latencies
//! count from the intended send time); no figure is printed that this run did not measure.

pub mod bench;
pub mod gateway_process;
pub mod growth;
pub mod idle;
pub mod players;
pub mod stack;
pub mod stats;
pub mod sys;
