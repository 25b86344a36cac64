//! `hoard demo`: the whole stack on this machine with simulated players, in one command.
//!
//! Starts a 4-replica PBFT cluster (4 `hoard node` child processes), a private redis-server (or,
//! when none is installed or `--store embedded` asks, the gateway's embedded in-memory store, said
//! on screen as the non-durable fallback) and the gateway (in this process), drives simulated
//! players through the SDK (the same simulator as
//! `hoard-loadtest`), prints one progress line per second and a summary, then stops everything
//! and checks that every replica holds the same state root as the others and as the gateway's
//! follower, and that supply is conserved. Exit status 0 only if those checks pass.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hoard_loadtest::players::{PlayersConfig, PlayersReport, Simulation};
use hoard_loadtest::stack::{find_redis_server, shutdown_signal, Stack, StackOptions, StackStore};
use hoard_loadtest::sys;

/// Options of `hoard demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Seconds of simulated play.
    #[arg(long, default_value_t = 20)]
    pub duration: u64,
    /// Simulated players.
    #[arg(long, default_value_t = 200)]
    pub players: usize,
    /// Of which this many connect one connection each (default: a tenth, at most 100).
    #[arg(long)]
    pub direct_players: Option<usize>,
    /// Clicks per second per player.
    #[arg(long, default_value_t = 10.0)]
    pub clicks_per_second: f64,
    /// Asset events per click.
    #[arg(long, default_value_t = 0.01)]
    pub asset_event_share: f64,
    /// Where replica data, cluster files and Redis files go (default: a temporary directory,
    /// removed at the end).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Keep serving after the load (for clients and dashboards) until Ctrl-C.
    #[arg(long)]
    pub serve: bool,
    /// Write the simulator's report as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Where the gateway keeps clicks and accepted events: a private redis-server (`redis`), the
    /// embedded in-memory store (`embedded`, not durable), or redis-server when installed, else
    /// the embedded store (`auto`).
    #[arg(long, value_enum, default_value_t = StoreArg::Auto)]
    pub store: StoreArg,
}

/// `--store` of `hoard demo` and `hoard dev`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreArg {
    Auto,
    Redis,
    Embedded,
}

/// Resolves `--store` (looking for redis-server) and says on screen when the embedded,
/// non-durable store is used, and why. Returns the store the stack must start.
pub fn choose_store(arg: StoreArg) -> anyhow::Result<StackStore> {
    let choice = match arg {
        StoreArg::Auto => StackStore::Auto,
        StoreArg::Redis => StackStore::Redis,
        StoreArg::Embedded => StackStore::Embedded,
    };
    Ok(match choice.resolve(find_redis_server())? {
        Some(_) => StackStore::Redis,
        None => {
            let why = if arg == StoreArg::Embedded {
                "--store embedded"
            } else {
                "redis-server not found"
            };
            println!("{why}: using {}", hoard_server::store::EMBEDDED_NOTICE);
            StackStore::Embedded
        }
    })
}

/// What the stack runs besides the replicas and the gateway, for the first line.
pub fn store_words(store: StackStore) -> &'static str {
    match store {
        StackStore::Embedded => "the gateway (embedded click store)",
        _ => "redis-server and the gateway",
    }
}

/// Runs the demo; Ok(true) when the end checks passed.
pub async fn run(args: DemoArgs) -> anyhow::Result<bool> {
    let store = choose_store(args.store)?;
    println!("hoard demo: starting 4 replicas, {} ...", store_words(store));
    let mut options = StackOptions::new(std::env::current_exe()?);
    options.store = store;
    options.data_dir = args.data_dir.clone();
    let stack = Stack::start(options).await?;
    print_endpoints(&stack);

    let mut config = PlayersConfig::new(stack.ws_url(), stack.tenant, stack.studio.clone());
    config.players = args.players.max(1);
    config.direct_players = args
        .direct_players
        .unwrap_or((config.players / 10).min(100))
        .min(config.players);
    config.players_per_game_server = 1_000;
    config.clicks_per_second = args.clicks_per_second;
    config.asset_event_share = args.asset_event_share;
    config.duration = Duration::from_secs(args.duration);
    println!(
        "simulating {} players ({} through game-server connections, {} connected one by one) at {} clicks/s each, {}% asset events, for {} s",
        config.players,
        config.players - config.direct_players,
        config.direct_players,
        config.clicks_per_second,
        config.asset_event_share * 100.0,
        args.duration
    );
    let simulation = tokio::select! {
        started = Simulation::start(config) => started,
        _ = shutdown_signal() => {
            println!("interrupted: stopping everything");
            stack.abort().await;
            return Ok(false);
        }
    };
    let simulation = match simulation {
        Ok(simulation) => simulation,
        Err(error) => {
            stack.abort().await;
            return Err(error.context("starting the simulated players"));
        }
    };
    let mut interrupted = false;
    let report = {
        let live = simulation.live().clone();
        let progress = progress_lines(&stack, live, simulation.started());
        let deadline = simulation.started() + Duration::from_secs(args.duration);
        tokio::select! {
            _ = progress => {}
            _ = tokio::time::sleep_until(deadline.into()) => {}
            _ = shutdown_signal() => interrupted = true,
        }
        simulation.finish().await
    };
    print_summary(&report, &stack);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
        println!("report written to {}", path.display());
    }
    if interrupted {
        println!("interrupted: stopping everything");
        stack.abort().await;
        return Ok(false);
    }
    if args.serve {
        println!("serving until Ctrl-C (the stack keeps running; connect with the URLs above)");
        shutdown_signal().await;
    }
    println!("stopping: draining the gateway, stopping replicas, rebuilding each replica's state ...");
    let check = stack.finish().await?;
    for line in &check.lines {
        println!("{line}");
    }
    if check.ok() {
        println!("demo: OK");
    } else {
        println!("demo: FAILED");
    }
    Ok(check.ok())
}

/// Prints where everything listens.
pub fn print_endpoints(stack: &Stack) {
    println!("  data directory:   {}", stack.dir.display());
    println!("  websocket:        {}", stack.ws_url());
    println!("  gateway metrics:  http://{}/metrics", stack.gateway_metrics());
    for replica in &stack.replicas {
        println!(
            "  replica {} metrics: http://{}/metrics (consensus on {})",
            replica.id, replica.metrics, replica.address
        );
    }
    match &stack.redis {
        Some(redis) => println!("  redis:            {}", redis.url()),
        None => println!("  click store:      embedded in the gateway (in memory, NOT durable)"),
    }
}

/// One line per second until the caller stops polling this future.
async fn progress_lines(
    stack: &Stack,
    live: std::sync::Arc<hoard_loadtest::players::Live>,
    started: Instant,
) {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    let mut last = Instant::now();
    let mut clicks_before = 0;
    let mut events_before = 0;
    loop {
        ticker.tick().await;
        let now = Instant::now();
        let elapsed = now - last;
        last = now;
        let clicks = live.clicks_acked.load(Ordering::Relaxed);
        let events = live.events_committed.load(Ordering::Relaxed);
        let (p50, p99, commits) = live.take_interval();
        let mut view = 0.0f64;
        for replica in &stack.replicas {
            if let Ok(samples) = sys::scrape(replica.metrics).await {
                view = view.max(sys::max(&samples, "hoard_replica_view").unwrap_or(0.0));
            }
        }
        let latency = if commits > 0 {
            format!("commit p50 {p50:.1} ms p99 {p99:.1} ms")
        } else {
            "commit -".to_string()
        };
        println!(
            "[{:>4.0}s] clicks/s {:>9.0} | asset events committed/s {:>6.0} | height {:>6} | view {} | {}",
            started.elapsed().as_secs_f64(),
            hoard_loadtest::stats::rate_between(clicks_before, clicks, elapsed),
            hoard_loadtest::stats::rate_between(events_before, events, elapsed),
            stack.height(),
            view,
            latency
        );
        clicks_before = clicks;
        events_before = events;
    }
}

/// The summary after the load.
pub fn print_summary(report: &PlayersReport, stack: &Stack) {
    println!("summary:");
    report.print();
    let (gateway, replicas) = stack.memory();
    println!(
        "  memory (RSS): gateway+simulator {:.0} MiB, replicas {:?} MiB",
        gateway as f64 / 1048576.0,
        replicas
            .iter()
            .map(|r| (*r as f64 / 1048576.0).round() as u64)
            .collect::<Vec<_>>()
    );
}
