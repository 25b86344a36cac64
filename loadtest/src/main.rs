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
use hoard_loadtest::stats::{median, LadderLimits};
use hoard_types::{Keypair, TenantId};

/// mimalloc for a replica (`node`), the system's allocator for the rest: ARCHITECTURE.md, "Memory".
#[global_allocator]
static ALLOCATOR: hoard_ledger::alloc::RoleAllocator = hoard_ledger::alloc::RoleAllocator;

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
        #[command(flatten)]
        stack: StackArgs,
    },
    /// Memory per idle player connection on the gateway (run as a child process), at each count.
    Idle {
        /// Connection counts (each on a fresh gateway).
        #[arg(long, value_delimiter = ',', default_values_t = vec![10_000usize, 50_000])]
        connections: Vec<usize>,
        /// When a count exceeds the open-files hard limit, do not measure the largest count that
        /// fits instead.
        #[arg(long)]
        no_fallback: bool,
        /// A running gateway (`ws://host:port/v1`) instead of a stack started here; needs
        /// --metrics and --gateway-pid (it must run on this machine).
        #[arg(long, requires_all = ["metrics", "gateway_pid"])]
        url: Option<String>,
        /// The running gateway's HTTP address (host:port of `/metrics`).
        #[arg(long)]
        metrics: Option<std::net::SocketAddr>,
        /// The running gateway's process id (its RSS is read from /proc).
        #[arg(long)]
        gateway_pid: Option<u32>,
        /// The tenant (with --url).
        #[arg(long, default_value_t = 1)]
        tenant: u64,
        /// The studio key's seed in hex (with --url; default: the public demo key).
        #[arg(long, env = "HOARD_STUDIO_SEED")]
        studio_seed: Option<String>,
        /// Merge the results into this JSON file (other keys are kept).
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// One connection per player: a ladder of player counts until a limit is exceeded.
    Ladder {
        /// Player counts, in order; stops at the first step not sustained.
        #[arg(long, value_delimiter = ',', default_values_t = vec![250usize, 500, 1_000, 2_000, 4_000, 8_000])]
        players: Vec<usize>,
        /// Seconds of each step.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[command(flatten)]
        limits: LimitArgs,
        #[command(flatten)]
        stack: StackArgs,
        /// Merge the results into this JSON file (other keys are kept).
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Growth tables: one simulator run per (replicas, batch size, players), one stack per
    /// (replicas, batch size).
    Grow {
        /// Replica counts (3f+1).
        #[arg(long, value_delimiter = ',', default_values_t = vec![4usize, 7])]
        replicas: Vec<usize>,
        /// Gateway batch sizes (`events.batch_max`: transactions per chain request).
        #[arg(long, value_delimiter = ',', default_values_t = vec![2_048usize])]
        batch_max: Vec<usize>,
        /// Player counts.
        #[arg(long, value_delimiter = ',', default_values_t = vec![1_000usize, 2_000, 4_000])]
        players: Vec<usize>,
        /// Of the players, this many connect one connection each.
        #[arg(long, default_value_t = 100)]
        direct_players: usize,
        /// Seconds of each run.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[command(flatten)]
        limits: LimitArgs,
        /// Merge the results into this JSON file (other keys are kept).
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Run one replica (the stack starts replicas through this).
    #[command(hide = true)]
    Node {
        #[arg(long)]
        config: PathBuf,
    },
    /// Run the ceiling server of `bench` (which starts it as a child process through this).
    #[command(hide = true)]
    Ceiling {
        /// The WebSocket listener.
        #[arg(long)]
        ws: std::net::SocketAddr,
        /// The `/metrics` listener (the decoded clicks counter).
        #[arg(long)]
        http: std::net::SocketAddr,
    },
    /// Run the gateway (the stack starts a child-process gateway through this).
    #[command(hide = true)]
    Gateway {
        /// The gateway configuration as JSON.
        #[arg(long)]
        config: PathBuf,
        /// The cluster file.
        #[arg(long)]
        cluster: PathBuf,
    },
}

/// The stack a benchmark starts.
#[derive(clap::Args, Clone, Debug)]
struct StackArgs {
    /// Replicas (3f+1).
    #[arg(long, default_value_t = 4)]
    replicas: usize,
    /// The gateway batcher's transactions per chain request (default: the gateway's default).
    #[arg(long)]
    batch_max: Option<usize>,
    /// Run the gateway in this process instead of as a child process (its CPU and memory are
    /// then mixed with the load generator's).
    #[arg(long)]
    gateway_in_process: bool,
}

impl StackArgs {
    fn options(&self) -> anyhow::Result<StackOptions> {
        let mut options = StackOptions::new(std::env::current_exe()?);
        options.replicas = self.replicas;
        options.events_batch_max = self.batch_max;
        options.gateway_process = !self.gateway_in_process;
        Ok(options)
    }
}

/// What a ladder step must stay under.
#[derive(clap::Args, Clone, Debug)]
struct LimitArgs {
    /// Largest p99 click acknowledgement (from the intended send time), ms.
    #[arg(long, default_value_t = 100.0)]
    click_ack_p99_ms: f64,
    /// Largest p99 accept-to-commit, ms.
    #[arg(long, default_value_t = 100.0)]
    commit_p99_ms: f64,
    /// Errors allowed per step (the ledger's rejections of transfers do not count).
    #[arg(long, default_value_t = 0)]
    errors_max: u64,
}

impl LimitArgs {
    fn limits(&self) -> LadderLimits {
        LadderLimits {
            click_ack_p99_ms: self.click_ack_p99_ms,
            accept_to_commit_p99_ms: self.commit_p99_ms,
            errors_max: self.errors_max,
        }
    }
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
        Command::Ceiling { ws, http } => runtime.block_on(bench::run_ceiling_process(ws, http)),
        Command::Gateway { config, cluster } => {
            runtime.block_on(hoard_loadtest::gateway_process::run(&config, &cluster))
        }
        Command::Idle {
            connections,
            no_fallback,
            url,
            metrics,
            gateway_pid,
            tenant,
            studio_seed,
            json,
        } => runtime.block_on(idle(IdleArgs {
            connections,
            no_fallback,
            external: url.map(|url| (url, metrics.expect("required"), gateway_pid.expect("required"))),
            tenant: TenantId(tenant),
            studio_seed,
            json,
        })),
        Command::Ladder {
            players,
            seconds,
            limits,
            stack,
            json,
        } => runtime.block_on(ladder(players, seconds, limits.limits(), stack, json)),
        Command::Grow {
            replicas,
            batch_max,
            players,
            direct_players,
            seconds,
            limits,
            json,
        } => runtime.block_on(grow(
            replicas,
            batch_max,
            players,
            direct_players,
            seconds,
            limits.limits(),
            json,
        )),
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
            stack,
        } => runtime.block_on(bench(BenchArgs {
            stack,
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
    stack: StackArgs,
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
    let options = args.stack.options()?;
    println!(
        "starting the stack ({} replicas, redis-server, gateway {}) ...",
        options.replicas,
        if options.gateway_process {
            "as a child process"
        } else {
            "in this process"
        }
    );
    out["replicas"] = json!(options.replicas);
    out["gateway_process"] = json!(options.gateway_process);
    // The ceiling stands in the gateway's layout: a child process when the gateway is one.
    let ceiling_program = options.gateway_process.then(|| options.node_program.clone());
    out["ceiling_process"] = json!(ceiling_program.is_some());
    out["batch_max"] = json!(options.events_batch_max);
    let stack = Stack::start(options).await?;
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
    // (ceiling, gateway) clicks per CPU-second, when both servers run as child processes.
    let mut per_cpu = Vec::new();
    for round in 1..=args.rounds {
        let ceiling = bench::ceiling_once(&load, ceiling_program.as_deref()).await?;
        println!(
            "[round {round}] (1) ceiling: {:.0} clicks/s decoded ({:.0} frames/s){}",
            ceiling.server_clicks_per_second,
            ceiling.server_clicks_per_second / load.clicks_per_frame as f64,
            cpu_note(&ceiling)
        );
        let gateway = bench::gateway_once(
            &stack.ws_url(),
            stack.gateway_metrics(),
            stack.tenant,
            &stack.studio,
            &load,
            bench::GatewayPids {
                gateway: stack.gateway_process.as_ref().and_then(|g| g.process.pid()),
                redis: stack.redis.as_ref().and_then(|r| r.process.pid()),
            },
        )
        .await?;
        println!(
            "[round {round}] (2) gateway: {:.0} clicks/s absorbed, {:.6} Redis round trips per click{}",
            gateway.server_clicks_per_second,
            gateway.redis_round_trips_per_click.unwrap_or(f64::NAN),
            cpu_note(&gateway)
        );
        if let (Some(c), Some(g)) = (ceiling.clicks_per_cpu_second(), gateway.clicks_per_cpu_second()) {
            per_cpu.push((c, g));
        }
        ceilings.push(ceiling.server_clicks_per_second);
        gateways.push(gateway.server_clicks_per_second);
        if let Some(t) = gateway.redis_round_trips_per_click {
            trips.push(t);
        }
        runs.push(json!({"ceiling": ceiling, "gateway": gateway}));
    }
    let (ceiling, gateway, ratio) = medians_and_ratio(&ceilings, &gateways);
    println!(
        "(1) ceiling median {ceiling:.0} clicks/s; (2) gateway median {gateway:.0} clicks/s; ratio (2)/(1) = {ratio:.3}"
    );
    out["click_runs"] = json!(runs);
    out["ceiling_messages_per_second"] = json!(ceiling);
    out["gateway_clicks_per_second"] = json!(gateway);
    out["gateway_to_ceiling_ratio"] = json!(ratio);
    out["redis_round_trips_per_click"] = json!(median(&trips));
    if !per_cpu.is_empty() {
        let (ceilings, gateways): (Vec<f64>, Vec<f64>) = per_cpu.into_iter().unzip();
        let (ceiling, gateway, ratio) = medians_and_ratio(&ceilings, &gateways);
        println!(
            "per CPU-second (gateway with redis-server): ceiling median {ceiling:.0}, gateway median {gateway:.0} clicks; ratio {ratio:.3}"
        );
        out["ceiling_clicks_per_cpu_second"] = json!(ceiling);
        out["gateway_clicks_per_cpu_second"] = json!(gateway);
        out["gateway_to_ceiling_ratio_per_cpu"] = json!(ratio);
    }

    // (3) the chain alone.
    let cluster = hoard_ledger::cluster::Cluster::load(&stack.dir.join("cluster/cluster.toml"))?;
    let bench_key = hoard_ledger::cluster::load_key(
        &stack
            .dir
            .join("cluster")
            .join(hoard_ledger::cluster::local_client_key_file(stack::BENCH_CLIENT)),
    )?;
    let chain = bench::chain_once(
        &cluster,
        bench_key,
        &stack.studio,
        stack.tenant,
        stack.chain_height().await,
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
    println!(
        "memory (RSS): {} {gateway_rss} B, replicas {replica_rss:?} B",
        if stack.gateway_process.is_some() {
            "gateway"
        } else {
            "gateway+load generator"
        }
    );
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

/// Writes `values` into the JSON object in `path` (created if missing; other keys kept).
fn merge_json(
    path: &std::path::Path,
    values: serde_json::Map<String, serde_json::Value>,
) -> anyhow::Result<()> {
    let mut object = match std::fs::read(path) {
        Ok(bytes) => match serde_json::from_slice::<serde_json::Value>(&bytes) {
            Ok(serde_json::Value::Object(object)) => object,
            _ => anyhow::bail!("{} exists and is not a JSON object", path.display()),
        },
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => serde_json::Map::new(),
        Err(error) => return Err(error.into()),
    };
    object.extend(values);
    std::fs::write(
        path,
        serde_json::to_string_pretty(&serde_json::Value::Object(object))?,
    )?;
    println!("wrote {}", path.display());
    Ok(())
}

fn command_line() -> String {
    std::env::args().collect::<Vec<_>>().join(" ")
}

struct IdleArgs {
    connections: Vec<usize>,
    no_fallback: bool,
    /// (ws url, metrics address, gateway pid) of a running gateway.
    external: Option<(String, std::net::SocketAddr, u32)>,
    tenant: TenantId,
    studio_seed: Option<String>,
    json: Option<PathBuf>,
}

async fn idle(args: IdleArgs) -> anyhow::Result<()> {
    use hoard_loadtest::idle;
    let soft = hoard_loadtest::sys::raise_open_files_limit(1 << 20);
    let (_, hard) = hoard_loadtest::sys::open_files_limits();
    println!("open files: soft limit raised to {soft} (hard limit {hard})");
    let mut out = serde_json::Map::new();
    out.insert("idle_connection_command".into(), json!(command_line()));
    out.insert("idle_connection_target_bytes".into(), json!(8 * 1024));
    out.insert("idle_connection_files_hard_limit".into(), json!(hard));
    let mut counts = args.connections.clone();
    let mut skipped = serde_json::Map::new();
    let mut fallback = None;
    for n in &args.connections {
        if let Some(reason) = idle::fd_shortfall(*n, hard) {
            println!("CANNOT MEASURE {n} CONNECTIONS: {reason}");
            skipped.insert(n.to_string(), json!(reason));
            out.insert(format!("idle_connection_bytes_{n}"), serde_json::Value::Null);
            counts.retain(|c| c != n);
            let max = idle::fd_feasible_max(hard);
            if !args.no_fallback && max > 0 && !args.connections.contains(&max) {
                fallback = Some(max);
            }
        }
    }
    if let Some(max) = fallback {
        println!("measuring the largest count the limit allows instead: {max}");
        counts.push(max);
        out.insert("idle_connection_fallback_connections".into(), json!(max));
    }
    let studio = match &args.studio_seed {
        Some(seed) => Keypair::from_seed_hex(seed).context("--studio-seed")?,
        None => Keypair::from_seed(hoard_server::config::DEMO_STUDIO_SEED),
    };
    let mut figures = Vec::new();
    for n in counts {
        let figure = match &args.external {
            Some((url, metrics, pid)) => idle::measure(url, *metrics, *pid, args.tenant, &studio, n).await?,
            None => {
                let mut options = StackOptions::new(std::env::current_exe()?);
                options.gateway_process = true;
                let stack = Stack::start(options).await?;
                let pid = stack.gateway_pid().context("gateway pid")?;
                println!("{n} idle connections to a fresh gateway (pid {pid}) ...");
                let figure = idle::measure(
                    &stack.ws_url(),
                    stack.gateway_metrics(),
                    pid,
                    stack.tenant,
                    &stack.studio,
                    n,
                )
                .await;
                stack.abort().await;
                figure?
            }
        };
        println!(
            "  {} connections ({} open at the end, gateway counts {}, {} closed while idle, {} source addresses, {:.1} s to open): \
             gateway RSS {} -> {} bytes: {:.0} bytes per connection (slope over the steps: {:.0}); target 8192",
            figure.connections,
            figure.established,
            figure.gateway_connections_open,
            figure.closed_while_idle,
            figure.source_addresses,
            figure.seconds_to_establish,
            figure.rss_before_bytes,
            figure.rss_after_bytes,
            figure.bytes_per_connection,
            figure.marginal_bytes_per_connection.unwrap_or(f64::NAN)
        );
        out.insert(
            format!("idle_connection_bytes_{n}"),
            json!(figure.bytes_per_connection),
        );
        out.insert(
            format!("idle_connection_marginal_bytes_{n}"),
            json!(figure.marginal_bytes_per_connection),
        );
        figures.push(figure);
    }
    out.insert(
        "idle_connection_skipped".into(),
        serde_json::Value::Object(skipped),
    );
    out.insert("idle_connections".into(), serde_json::to_value(&figures)?);
    if let Some(path) = &args.json {
        merge_json(path, out)?;
    }
    Ok(())
}

async fn ladder(
    players: Vec<usize>,
    seconds: u64,
    limits: LadderLimits,
    stack_args: StackArgs,
    json: Option<PathBuf>,
) -> anyhow::Result<()> {
    hoard_loadtest::sys::raise_open_files_limit(1 << 20);
    let options = stack_args.options()?;
    let batch_max = options.events_batch_max.unwrap_or(2048);
    let stack = Stack::start(options).await?;
    println!(
        "one connection per player, {seconds} s per step; sustained while click ack p99 <= {} ms, accept-to-commit p99 <= {} ms, errors <= {}",
        limits.click_ack_p99_ms, limits.accept_to_commit_p99_ms, limits.errors_max
    );
    let mut steps = Vec::new();
    let mut sustained = 0usize;
    let mut failure = serde_json::Value::Null;
    for n in players {
        let row = hoard_loadtest::growth::run_once(&stack, batch_max, n, n, seconds, &limits).await?;
        hoard_loadtest::growth::print_row(&row);
        let verdict = row.not_sustained.clone();
        steps.push(row);
        match verdict {
            None => sustained = n,
            Some(reason) => {
                failure = json!({"players": n, "reason": reason});
                break;
            }
        }
    }
    println!("one connection per player: {sustained} players sustained ({failure})");
    let check = stack.finish().await?;
    for line in &check.lines {
        println!("{line}");
    }
    let mut out = serde_json::Map::new();
    out.insert("per_player_connections_command".into(), json!(command_line()));
    out.insert(
        "per_player_connections_players_sustained".into(),
        json!(sustained),
    );
    out.insert("per_player_connections_first_failure".into(), failure);
    out.insert(
        "per_player_connections_limits".into(),
        serde_json::to_value(limits)?,
    );
    out.insert(
        "per_player_connections_steps".into(),
        serde_json::to_value(&steps)?,
    );
    out.insert("per_player_connections_end_check_ok".into(), json!(check.ok()));
    if let Some(path) = &json {
        merge_json(path, out)?;
    }
    Ok(())
}

async fn grow(
    replicas: Vec<usize>,
    batch_max: Vec<usize>,
    players: Vec<usize>,
    direct_players: usize,
    seconds: u64,
    limits: LadderLimits,
    json: Option<PathBuf>,
) -> anyhow::Result<()> {
    hoard_loadtest::sys::raise_open_files_limit(1 << 20);
    let mut rows = Vec::new();
    let mut checks_ok = true;
    for r in &replicas {
        for b in &batch_max {
            let mut options = StackOptions::new(std::env::current_exe()?);
            options.replicas = *r;
            options.events_batch_max = Some(*b);
            options.gateway_process = true;
            println!("stack: {r} replicas, batch size {b}");
            let stack = Stack::start(options).await?;
            for n in &players {
                let row = hoard_loadtest::growth::run_once(&stack, *b, *n, direct_players, seconds, &limits)
                    .await?;
                hoard_loadtest::growth::print_row(&row);
                rows.push(row);
            }
            let check = stack.finish().await?;
            for line in &check.lines {
                println!("{line}");
            }
            checks_ok &= check.ok();
        }
    }
    let mut out = serde_json::Map::new();
    out.insert("growth_command".into(), json!(command_line()));
    out.insert("growth_rows".into(), serde_json::to_value(&rows)?);
    out.insert("growth_end_checks_ok".into(), json!(checks_ok));
    if let Some(path) = &json {
        merge_json(path, out)?;
    }
    Ok(())
}

/// ", N cores[, redis M cores]" for a click figure whose server ran as a child process.
fn cpu_note(figure: &bench::ClickFigure) -> String {
    match (figure.server_cpu_cores, figure.store_cpu_cores) {
        (Some(server), Some(store)) => format!(" ({server:.2} cores, redis-server {store:.2})"),
        (Some(server), None) => format!(" ({server:.2} cores)"),
        _ => String::new(),
    }
}

/// The medians of the ceiling and gateway figures and the ratio of the gateway's to the
/// ceiling's (0 without a ceiling).
fn medians_and_ratio(ceilings: &[f64], gateways: &[f64]) -> (f64, f64, f64) {
    let ceiling = median(ceilings).unwrap_or(0.0);
    let gateway = median(gateways).unwrap_or(0.0);
    let ratio = if ceiling > 0.0 { gateway / ceiling } else { 0.0 };
    (ceiling, gateway, ratio)
}
