//! `hoard-loadtest`: simulated players against a running stack or one it starts, and the
//! benchmarks against ceilings (`bench`). See the crate's lib.rs for the layout.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde_json::json;

use hoard_loadtest::bench::{self, ClickLoad};
use hoard_loadtest::players::{PlayersConfig, PlayersReport, Simulation};
use hoard_loadtest::stack::{self, Stack, StackOptions};
use hoard_loadtest::stats::median;
use hoard_types::{Keypair, TenantId};

#[derive(Parser)]
#[command(name = "hoard-loadtest", about = "Simulated players and benchmarks for Hoard")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone, Debug)]
struct PlayerArgs {
    /// Simulated players.
    #[arg(long, default_value_t = 1_000)]
    players: usize,
    /// Of which this many connect one connection each (session tokens).
    #[arg(long, default_value_t = 50)]
    direct_players: usize,
    /// Players per game-server connection.
    #[arg(long, default_value_t = 1_000)]
    players_per_game_server: usize,
    /// Clicks per second per player.
    #[arg(long, default_value_t = 10.0)]
    clicks_per_second: f64,
    /// Asset events per click.
    #[arg(long, default_value_t = 0.01)]
    asset_event_share: f64,
    /// Share of asset events that are player-to-player trades.
    #[arg(long, default_value_t = 0.2)]
    trade_share: f64,
    /// Seconds of load.
    #[arg(long, default_value_t = 20)]
    duration: u64,
}

#[derive(Subcommand)]
enum Command {
    /// Simulate players (against --url, or a stack started here).
    Run {
        #[command(flatten)]
        players: PlayerArgs,
        /// A running gateway (`ws://host:port/v1`); without it a stack is started here.
        #[arg(long)]
        url: Option<String>,
        /// The tenant (with --url).
        #[arg(long, default_value_t = 1)]
        tenant: u64,
        /// The studio key's seed in hex (with --url; default: the public demo key).
        #[arg(long, env = "HOARD_STUDIO_SEED")]
        studio_seed: Option<String>,
        /// Write the report as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The benchmarks against ceilings, in one run.
    Bench {
        /// Write the results as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Rounds of the ceiling and gateway click runs (medians are reported).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Seconds of each click run (after 1 s of warmup).
        #[arg(long, default_value_t = 5)]
        click_seconds: u64,
        /// WebSocket connections of the click runs.
        #[arg(long, default_value_t = 16)]
        connections: usize,
        /// Clicks per frame.
        #[arg(long, default_value_t = 512)]
        clicks_per_frame: usize,
        /// Settlement transactions of 512 entries for the chain benchmark.
        #[arg(long, default_value_t = 200)]
        chain_settlements: usize,
        /// Individually signed transfers for the chain benchmark.
        #[arg(long, default_value_t = 20_000)]
        chain_transfers: usize,
        /// Players of the full path (0: skip it).
        #[arg(long, default_value_t = 20_000)]
        full_path_players: usize,
        /// Seconds of the full path.
        #[arg(long, default_value_t = 20)]
        full_path_seconds: u64,
    },
    /// Run one replica (the stack starts replicas through this).
    #[command(hide = true)]
    Node {
        #[arg(long)]
        config: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command {
        Command::Node { config } => runtime.block_on(stack::run_node(&config, None)),
        Command::Run {
            players,
            url,
            tenant,
            studio_seed,
            json,
        } => runtime.block_on(run(players, url, TenantId(tenant), studio_seed, json)),
        Command::Bench {
            json,
            rounds,
            click_seconds,
            connections,
            clicks_per_frame,
            chain_settlements,
            chain_transfers,
            full_path_players,
            full_path_seconds,
        } => runtime.block_on(bench(BenchArgs {
            json,
            rounds,
            click_seconds,
            connections,
            clicks_per_frame,
            chain_settlements,
            chain_transfers,
            full_path_players,
            full_path_seconds,
        })),
    }
}

fn players_config(args: &PlayerArgs, url: String, tenant: TenantId, studio: Keypair) -> PlayersConfig {
    let mut config = PlayersConfig::new(url, tenant, studio);
    config.players = args.players;
    config.direct_players = args.direct_players.min(args.players);
    config.players_per_game_server = args.players_per_game_server;
    config.clicks_per_second = args.clicks_per_second;
    config.asset_event_share = args.asset_event_share;
    config.trade_share = args.trade_share;
    config.duration = Duration::from_secs(args.duration);
    config
}

async fn run(
    args: PlayerArgs,
    url: Option<String>,
    tenant: TenantId,
    studio_seed: Option<String>,
    json: Option<PathBuf>,
) -> anyhow::Result<()> {
    hoard_loadtest::sys::raise_open_files_limit(1 << 20);
    let studio = match studio_seed {
        Some(seed) => Keypair::from_seed_hex(&seed).context("--studio-seed")?,
        None => Keypair::from_seed(hoard_server::config::DEMO_STUDIO_SEED),
    };
    let (stack, url) = match url {
        Some(url) => (None, url),
        None => {
            let stack = Stack::start(StackOptions::new(std::env::current_exe()?)).await?;
            let url = stack.ws_url();
            eprintln!("started a stack: {url}");
            (Some(stack), url)
        }
    };
    let config = players_config(&args, url, tenant, studio);
    let simulation = Simulation::start(config).await?;
    let report = simulation.run_for(stack::shutdown_signal()).await;
    let memory = stack.as_ref().map(|s| s.memory());
    print_report(&report);
    let mut value = serde_json::to_value(&report)?;
    if let Some((gateway, replicas)) = memory {
        println!("memory (RSS): gateway+simulator {gateway} B, replicas {replicas:?} B");
        value["gateway_rss_bytes"] = json!(gateway);
        value["replica_rss_bytes"] = json!(replicas);
    }
    if let Some(stack) = stack {
        let check = stack.finish().await?;
        for line in &check.lines {
            println!("{line}");
        }
        value["end_check_ok"] = json!(check.ok());
    }
    if let Some(path) = json {
        std::fs::write(&path, serde_json::to_string_pretty(&value)?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn print_report(report: &PlayersReport) {
    report.print();
}

struct BenchArgs {
    json: Option<PathBuf>,
    rounds: usize,
    click_seconds: u64,
    connections: usize,
    clicks_per_frame: usize,
    chain_settlements: usize,
    chain_transfers: usize,
    full_path_players: usize,
    full_path_seconds: u64,
}

async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    hoard_loadtest::sys::raise_open_files_limit(1 << 20);
    let command_line: Vec<String> = std::env::args().collect();
    let mut out = json!({
        "command": command_line.join(" "),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
    });
    println!("starting the stack (4 replicas, redis-server, gateway) ...");
    let stack = Stack::start(StackOptions::new(std::env::current_exe()?)).await?;
    let load = ClickLoad {
        connections: args.connections,
        clicks_per_frame: args.clicks_per_frame,
        players: 10_000,
        warmup: Duration::from_secs(1),
        duration: Duration::from_secs(args.click_seconds),
    };
    out["click_load"] = serde_json::to_value(&load)?;

    // (1) and (2), alternating.
    let mut ceilings = Vec::new();
    let mut gateways = Vec::new();
    let mut trips = Vec::new();
    let mut runs = Vec::new();
    for round in 1..=args.rounds {
        let ceiling = bench::ceiling_once(&load).await?;
        println!(
            "[round {round}] (1) ceiling: {:.0} clicks/s decoded ({:.0} frames/s)",
            ceiling.server_clicks_per_second,
            ceiling.server_clicks_per_second / load.clicks_per_frame as f64
        );
        let gateway = bench::gateway_once(
            &stack.ws_url(),
            stack.gateway_metrics(),
            stack.tenant,
            &stack.studio,
            &load,
        )
        .await?;
        println!(
            "[round {round}] (2) gateway: {:.0} clicks/s absorbed, {:.6} Redis round trips per click",
            gateway.server_clicks_per_second,
            gateway.redis_round_trips_per_click.unwrap_or(f64::NAN)
        );
        ceilings.push(ceiling.server_clicks_per_second);
        gateways.push(gateway.server_clicks_per_second);
        if let Some(t) = gateway.redis_round_trips_per_click {
            trips.push(t);
        }
        runs.push(json!({"ceiling": ceiling, "gateway": gateway}));
    }
    let ceiling = median(&ceilings).unwrap_or(0.0);
    let gateway = median(&gateways).unwrap_or(0.0);
    let ratio = if ceiling > 0.0 { gateway / ceiling } else { 0.0 };
    println!(
        "(1) ceiling median {ceiling:.0} clicks/s; (2) gateway median {gateway:.0} clicks/s; ratio (2)/(1) = {ratio:.3}"
    );
    out["click_runs"] = json!(runs);
    out["ceiling_messages_per_second"] = json!(ceiling);
    out["gateway_clicks_per_second"] = json!(gateway);
    out["gateway_to_ceiling_ratio"] = json!(ratio);
    out["redis_round_trips_per_click"] = json!(median(&trips));

    // (3) the chain alone.
    let cluster = hoard_ledger::cluster::Cluster::load(&stack.dir.join("cluster/cluster.toml"))?;
    let chain = bench::chain_once(
        &cluster,
        &stack.studio,
        stack.tenant,
        stack.height(),
        args.chain_settlements,
        args.chain_transfers,
    )
    .await?;
    println!(
        "(3) chain: {:.0} settlement entries/s ({} entries in {:.2} s); {:.0} signed transfers/s ({} applied, {} rejected, {:.2} s); request p50 {:.1} ms p99 {:.1} ms",
        chain.settlement_entries_per_second,
        chain.settlement_entries_applied,
        chain.settlement_seconds,
        chain.transfers_per_second,
        chain.transfers_applied,
        chain.transfers_rejected,
        chain.transfers_seconds,
        chain.request_p50_ms,
        chain.request_p99_ms
    );
    if !chain.rejections.0.is_empty() {
        println!("    chain rejections: {:?}", chain.rejections.0);
    }
    out["chain_events_per_second"] = json!(chain.settlement_entries_per_second);
    out["chain_transfers_per_second"] = json!(chain.transfers_per_second);
    out["chain"] = serde_json::to_value(&chain)?;

    // (4) the full path.
    if args.full_path_players > 0 {
        let player_args = PlayerArgs {
            players: args.full_path_players,
            direct_players: 100.min(args.full_path_players),
            players_per_game_server: 1_000,
            clicks_per_second: 10.0,
            asset_event_share: 0.01,
            trade_share: 0.1,
            duration: args.full_path_seconds,
        };
        let config = players_config(&player_args, stack.ws_url(), stack.tenant, stack.studio.clone());
        println!(
            "(4) full path: {} players at 10 clicks/s, 1% asset events, {} s (setup registers every account first) ...",
            args.full_path_players, args.full_path_seconds
        );
        let simulation = Simulation::start(config).await?;
        let report = simulation.run_for(std::future::pending()).await;
        print_report(&report);
        out["full_path_players"] = json!(args.full_path_players);
        out["full_path_accept_to_commit_p99_ms"] = json!(report.accept_to_commit.p99_ms);
        out["full_path_clicks_per_second"] = json!(report.clicks_per_second);
        out["full_path_schedule_kept"] = json!(report.schedule_kept);
        out["full_path"] = serde_json::to_value(&report)?;
    }
    let (gateway_rss, replica_rss) = stack.memory();
    out["gateway_rss_bytes"] = json!(gateway_rss);
    out["replica_rss_bytes"] = json!(replica_rss);
    println!("memory (RSS): gateway+load generator {gateway_rss} B, replicas {replica_rss:?} B");
    let check = stack.finish().await?;
    for line in &check.lines {
        println!("{line}");
    }
    out["end_check_ok"] = json!(check.ok());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&out)?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
