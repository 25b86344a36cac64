//! `hoard-chain-bench`: committed asset events per second through a PBFT cluster on loopback.
//!
//! ```text
//! cargo run --release -p hoard-ledger --bin hoard-chain-bench -- --replicas 4 --json chain.json
//! cargo build --release --bin hoard && \
//!   cargo run --release -p hoard-ledger --bin hoard-chain-bench -- --replicas 4 --processes
//! ```
//!
//! The load is open loop: requests leave on a fixed schedule whatever the replies do, and each
//! latency runs from a request's scheduled time to the moment f+1 replicas reported it
//! committed, so a slow cluster cannot hide behind a slow client. Each request is a batch of
//! studio-signed settlements (click rewards), many entries each: the high-volume path of a game.
//! The rate doubles until the cluster no longer keeps up; the highest sustained rate is
//! reported, then latency at half of it, then the stall across a view change (the primary is
//! stopped under load at half rate; the longest gap between two commits is the stall).
//!
//! `--soak-seconds N` adds a long run (at `--soak-rate`, default half the sustained rate) before
//! the view change, in back-to-back intervals of `--soak-interval-seconds`, each reporting its
//! committed rate, latency and the replicas' resident memory (each `hoard node` process with
//! `--processes`, else this whole process), to show no decay and bounded memory.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use hoard_ledger::client::ChainClient;
use hoard_ledger::testing::{key, LocalCluster, World};
use hoard_types::{Amount, CurrencyId, Custody, Grant, Keypair, Settlement, TenantId, Transaction, TxBody};

/// mimalloc, not the system allocator: ARCHITECTURE.md, "Memory".
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "Committed events/s and commit latency of a PBFT cluster on loopback, open loop")]
struct Args {
    #[arg(long, default_value_t = 4)]
    replicas: usize,
    /// Run the replicas as `hoard node` processes (the `hoard` binary must sit beside this one).
    #[arg(long)]
    processes: bool,
    /// Settlement entries (events) per transaction.
    #[arg(long, default_value_t = 500)]
    entries_per_transaction: usize,
    /// Transactions per consensus request.
    #[arg(long, default_value_t = 8)]
    transactions_per_request: usize,
    /// Seconds per rate step.
    #[arg(long, default_value_t = 4)]
    step_seconds: u64,
    /// First offered rate, events/s; doubles each step.
    #[arg(long, default_value_t = 25_000)]
    start_rate: u64,
    #[arg(long, default_value_t = 1_600_000)]
    max_rate: u64,
    /// Players the settlements pay.
    #[arg(long, default_value_t = 10_000)]
    players: usize,
    #[arg(long)]
    json: Option<PathBuf>,
    /// Length of the soak run, seconds (0: none).
    #[arg(long, default_value_t = 0)]
    soak_seconds: u64,
    /// Offered rate of the soak run, events/s (default: half the highest sustained rate).
    #[arg(long)]
    soak_rate: Option<u64>,
    /// Seconds per reported interval of the soak run.
    #[arg(long, default_value_t = 10)]
    soak_interval_seconds: u64,
    /// Each transaction expires this many blocks above the highest commit the client has seen
    /// (the SDK's default margin). The replicas remember every event until it expires, so this
    /// sets the size of their deduplication window once a run is longer than the margin.
    #[arg(long, default_value_t = 10_000)]
    expiry_blocks: u64,
}

#[derive(Serialize, Clone, Debug)]
struct SoakInterval {
    end_seconds: f64,
    offered_events_per_second: f64,
    committed_events_per_second: f64,
    commit_latency_p50_ms: f64,
    commit_latency_p99_ms: f64,
    /// Resident memory per replica process (one entry, the whole process, when in-process).
    resident_memory_bytes: Vec<u64>,
}

#[derive(Serialize, Clone, Debug)]
struct Step {
    offered_events_per_second: f64,
    committed_events_per_second: f64,
    commit_latency_p50_ms: f64,
    commit_latency_p99_ms: f64,
    sustained: bool,
}

#[derive(Serialize)]
struct Results {
    replicas: usize,
    processes: bool,
    events_per_request: usize,
    steps: Vec<Step>,
    committed_events_per_second: f64,
    half_rate_events_per_second: f64,
    commit_latency_p50_ms: f64,
    commit_latency_p99_ms: f64,
    soak: Vec<SoakInterval>,
    view_change_stall_ms: f64,
}

const T: TenantId = TenantId(1);

/// The replica processes, killed when the bench ends, also by an error.
struct Children(Vec<std::process::Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

struct Workload {
    world: World,
    players: Vec<Keypair>,
    entries: usize,
    per_request: usize,
    next: u64,
    /// The highest committed height seen, and the expiry margin above it.
    head: u64,
    expiry_blocks: u64,
}

impl Workload {
    fn request(&mut self) -> Vec<Transaction> {
        self.world.expires_at = self.head + self.expiry_blocks;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.next);
        (0..self.per_request)
            .map(|_| {
                self.next += 1;
                let entries = (0..self.entries)
                    .map(|_| Settlement {
                        to: self.players[rng.gen_range(0..self.players.len())].public(),
                        grant: Grant::Currency {
                            currency: CurrencyId::new("GOLD"),
                            amount: Amount(1),
                        },
                    })
                    .collect();
                self.world.studio_tx(T, TxBody::Settle { entries })
            })
            .collect()
    }
}

struct Run {
    latencies: Histogram<u64>,
    committed_events: u64,
    commit_times: Vec<Instant>,
    /// The highest height a request committed at.
    height: u64,
}

/// Offers `rate` events/s for `seconds`, then waits for the stragglers (up to 10 s).
async fn run_at(
    client: &ChainClient,
    workload: &Arc<Mutex<Workload>>,
    rate: u64,
    seconds: u64,
    during: Option<(Duration, Box<dyn FnOnce() + Send>)>,
) -> (Run, f64) {
    let events_per_request = {
        let w = workload.lock().unwrap();
        (w.entries * w.per_request) as u64
    };
    let requests = (rate * seconds / events_per_request).max(1);
    let interval = Duration::from_secs_f64(seconds as f64 / requests as f64);
    // Sign ahead so signing does not steal the schedule's time.
    let prepared: Vec<Vec<Transaction>> = {
        let mut w = workload.lock().unwrap();
        (0..requests).map(|_| w.request()).collect()
    };
    let run = Arc::new(Mutex::new(Run {
        latencies: Histogram::new_with_bounds(1, 120_000_000, 3).unwrap(),
        committed_events: 0,
        commit_times: Vec::new(),
        height: 0,
    }));
    let start = Instant::now();
    let mut handles = Vec::with_capacity(requests as usize);
    let mut during = during;
    let mut behind_max = Duration::ZERO;
    for (i, transactions) in prepared.into_iter().enumerate() {
        let scheduled = start + interval * i as u32;
        let now = Instant::now();
        if scheduled > now {
            tokio::time::sleep_until(scheduled.into()).await;
        } else {
            behind_max = behind_max.max(now - scheduled);
        }
        if let Some((at, _)) = &during {
            if start.elapsed() >= *at {
                let (_, action) = during.take().unwrap();
                action();
            }
        }
        let client = client.clone();
        let run = run.clone();
        handles.push(tokio::spawn(async move {
            if let Ok(committed) = client.submit(&transactions).await {
                let done = Instant::now();
                let mut run = run.lock().unwrap();
                run.height = run.height.max(committed.height);
                let micros = done.saturating_duration_since(scheduled).as_micros() as u64;
                run.latencies.record(micros.max(1)).ok();
                run.committed_events += committed
                    .receipts
                    .iter()
                    .map(|r| match &r.outcome {
                        hoard_types::Outcome::Settled { entries } => {
                            entries.iter().filter(|e| e.is_none()).count() as u64
                        }
                        _ => 0,
                    })
                    .sum::<u64>();
                run.commit_times.push(done);
            }
        }));
    }
    if behind_max > Duration::from_millis(100) {
        eprintln!(
            "  WARNING: the client fell {behind_max:?} behind its schedule: the offered rate was not kept"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for mut handle in handles {
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, &mut handle).await.is_err() {
            // Not committed in time: counted as lost (the task lets go of the results).
            handle.abort();
            let _ = handle.await;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let run = Arc::try_unwrap(run)
        .ok()
        .expect("all tasks done or dropped")
        .into_inner()
        .unwrap();
    let mut w = workload.lock().unwrap();
    w.head = w.head.max(run.height);
    (run, elapsed)
}

fn ms(micros: u64) -> f64 {
    (micros as f64 / 1000.0 * 100.0).round() / 100.0
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let dir = tempfile::tempdir()?;
    let mut world = World::new(1);
    let genesis = world.genesis();
    let mut children = Children(Vec::new());
    let mut local = None;
    let cluster = if args.processes {
        let keys: Vec<Keypair> = (0..args.replicas as u64).map(|i| key("replica", i)).collect();
        let addresses: Vec<_> = (0..args.replicas)
            .map(|_| {
                (
                    std::net::SocketAddr::from(([127, 0, 0, 1], hoard_ledger::testing::free_port())),
                    None,
                )
            })
            .collect();
        let clients = [hoard_ledger::testing::client_key(1)];
        let cluster =
            hoard_ledger::cluster::write_local_cluster(dir.path(), &genesis, &addresses, &keys, &clients)?;
        let hoard = std::env::current_exe()?.with_file_name("hoard");
        anyhow::ensure!(
            hoard.exists(),
            "{} not found: cargo build --release --bin hoard",
            hoard.display()
        );
        for id in 0..args.replicas {
            children.0.push(
                std::process::Command::new(&hoard)
                    .args(["node", "--config"])
                    .arg(dir.path().join(format!("replica-{id}.toml")))
                    .env(
                        "RUST_LOG",
                        std::env::var("HOARD_REPLICA_LOG").unwrap_or_else(|_| "warn".into()),
                    )
                    .spawn()?,
            );
        }
        cluster
    } else {
        let started = LocalCluster::start(dir.path(), &genesis, args.replicas);
        let cluster = started.cluster.clone();
        local = Some(started);
        cluster
    };
    let client = ChainClient::connect(&cluster, 1, hoard_ledger::testing::client_key(1));
    let players: Vec<Keypair> = (0..args.players as u64).map(|i| key("player", i)).collect();
    let mut setup = vec![world.define_currency(T, "GOLD", u128::MAX)];
    setup.extend(
        players
            .iter()
            .map(|p| world.register(T, &p.public(), Custody::Custodial)),
    );
    let mut head = 0;
    for chunk in setup.chunks(2000) {
        head = tokio::time::timeout(Duration::from_secs(60), client.submit(chunk))
            .await??
            .height;
    }
    let events_per_request = args.entries_per_transaction * args.transactions_per_request;
    let workload = Arc::new(Mutex::new(Workload {
        world,
        players,
        entries: args.entries_per_transaction,
        per_request: args.transactions_per_request,
        next: 1,
        head,
        expiry_blocks: args.expiry_blocks,
    }));
    println!(
        "{} replicas ({}), {} events per request ({} settlements of {} entries)",
        args.replicas,
        if args.processes {
            "processes"
        } else {
            "in one process"
        },
        events_per_request,
        args.transactions_per_request,
        args.entries_per_transaction
    );

    let mut steps = Vec::new();
    let mut best: Option<Step> = None;
    let mut rate = args.start_rate;
    while rate <= args.max_rate {
        let (run, elapsed) = run_at(&client, &workload, rate, args.step_seconds, None).await;
        let offered = rate as f64;
        let committed = run.committed_events as f64 / elapsed;
        let step = Step {
            offered_events_per_second: offered,
            committed_events_per_second: committed.round(),
            commit_latency_p50_ms: ms(run.latencies.value_at_quantile(0.5)),
            commit_latency_p99_ms: ms(run.latencies.value_at_quantile(0.99)),
            sustained: committed >= 0.9 * offered * args.step_seconds as f64 / elapsed
                && run.latencies.value_at_quantile(0.99) < 1_000_000,
        };
        println!(
            "  offered {:>9.0} ev/s  committed {:>9.0} ev/s  p50 {:>8.1} ms  p99 {:>8.1} ms  {}",
            offered,
            step.committed_events_per_second,
            step.commit_latency_p50_ms,
            step.commit_latency_p99_ms,
            if step.sustained {
                "sustained"
            } else {
                "NOT sustained"
            }
        );
        steps.push(step.clone());
        if !step.sustained {
            break;
        }
        best = Some(step);
        rate *= 2;
    }
    let best = best.ok_or_else(|| anyhow::anyhow!("not even the start rate was sustained"))?;
    let half = (best.offered_events_per_second / 2.0) as u64;
    let (run, elapsed) = run_at(&client, &workload, half, args.step_seconds * 2, None).await;
    let half_committed = run.committed_events as f64 / elapsed;
    let p50 = ms(run.latencies.value_at_quantile(0.5));
    let p99 = ms(run.latencies.value_at_quantile(0.99));
    println!("half rate {half} ev/s: committed {half_committed:.0} ev/s, p50 {p50} ms, p99 {p99} ms");

    let mut soak = Vec::new();
    if args.soak_seconds > 0 {
        let rate = args.soak_rate.unwrap_or(half);
        let interval = args.soak_interval_seconds.max(1);
        println!(
            "soak: {rate} ev/s for {} s in {interval} s intervals",
            args.soak_seconds
        );
        let started = std::time::Instant::now();
        while started.elapsed().as_secs() < args.soak_seconds {
            let (run, elapsed) = run_at(&client, &workload, rate, interval, None).await;
            let resident_memory_bytes: Vec<u64> = if args.processes {
                children
                    .0
                    .iter()
                    .map(|c| hoard_ledger::node::resident_memory_bytes_of(&c.id().to_string()).unwrap_or(0))
                    .collect()
            } else {
                vec![hoard_ledger::node::resident_memory_bytes().unwrap_or(0)]
            };
            let entry = SoakInterval {
                end_seconds: (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
                offered_events_per_second: rate as f64,
                committed_events_per_second: (run.committed_events as f64 / elapsed).round(),
                commit_latency_p50_ms: ms(run.latencies.value_at_quantile(0.5)),
                commit_latency_p99_ms: ms(run.latencies.value_at_quantile(0.99)),
                resident_memory_bytes,
            };
            println!(
                "  t={:>6.1}s committed {:>9.0} ev/s  p50 {:>8.1} ms  p99 {:>8.1} ms  rss MiB {:?}",
                entry.end_seconds,
                entry.committed_events_per_second,
                entry.commit_latency_p50_ms,
                entry.commit_latency_p99_ms,
                entry
                    .resident_memory_bytes
                    .iter()
                    .map(|b| b / (1024 * 1024))
                    .collect::<Vec<_>>()
            );
            soak.push(entry);
        }
    }

    // The primary (whichever replica it is by now: overload may have changed the view) stops
    // a second into a half-rate run.
    let stop_primary: Box<dyn FnOnce() + Send> = if args.processes {
        let pids: Vec<i32> = children.0.iter().map(|c| c.id() as i32).collect();
        let client = client.clone();
        Box::new(move || {
            let primary = client.primary() as usize;
            println!("stopping the primary, replica {primary}");
            unsafe {
                libc::kill(pids[primary], libc::SIGKILL);
            }
        })
    } else {
        let (tx, rx) = tokio::sync::oneshot::channel::<usize>();
        let mut cluster = local.take().expect("in-process cluster");
        tokio::spawn(async move {
            let Ok(primary) = rx.await else { return };
            cluster.stop(primary).await;
            // Keep the rest running until the process ends.
            std::mem::forget(cluster);
        });
        let client = client.clone();
        Box::new(move || {
            let primary = client.primary() as usize;
            println!("stopping the primary, replica {primary}");
            let _ = tx.send(primary);
        })
    };
    let (run, _) = run_at(
        &client,
        &workload,
        half,
        args.step_seconds * 2,
        Some((Duration::from_secs(1), stop_primary)),
    )
    .await;
    let mut times = run.commit_times.clone();
    times.sort();
    let stall = times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
    let stall_ms = (stall.as_secs_f64() * 1000.0).round();
    println!("view change: longest gap between commits {stall_ms} ms");

    drop(children);
    let results = Results {
        replicas: args.replicas,
        processes: args.processes,
        events_per_request,
        steps,
        committed_events_per_second: best.committed_events_per_second,
        half_rate_events_per_second: half_committed.round(),
        commit_latency_p50_ms: p50,
        commit_latency_p99_ms: p99,
        soak,
        view_change_stall_ms: stall_ms,
    };
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&results)?)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
