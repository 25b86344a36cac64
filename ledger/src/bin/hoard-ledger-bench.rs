//! `hoard-ledger-bench`: how fast the asset state machine applies, persists and verifies events.
//!
//! ```text
//! cargo run --release -p hoard-ledger --bin hoard-ledger-bench -- --json ledger-bench.json
//! ```
//!
//! Prints events/s for (a) apply including each block's state root (pipelined, as a replica
//! replays its block log: each block's commitment beside the next block's apply; and one block
//! after the other, as consensus executes), (b) apply plus a durable
//! block commit (sled and redb side by side): one block after the other, and pipelined (a
//! writer thread appends and syncs block N while block N+1 applies, as a replica can), (c)
//! player-signed transfers including signature verification (a verifier thread batch-verifies
//! block N+1 while block N applies), next to (d) the raw ed25519 batch-verification rate
//! measured in the same run with the same parallelism, the ceiling for (c). Two microbenchmarks
//! go with them: (s) SHA-256 compressions one at a time and two interleaved, and (p) decoding a
//! transfer's payload with rmp-serde and with `Transaction::decode_payload`.
//!
//! `--phases a` runs only (a) (for instruction counts under callgrind; see BENCHMARKS.md).
//! Phase `h` (not run by default) applies transfers whose event ids were chosen to share one
//! hash under Fx, against transfers with ordinary ids: a hash-flooding attack on the
//! deduplication index, which the ledger's seeded hash (`StateHasher`) defeats.

use std::path::PathBuf;
use std::sync::mpsc::sync_channel;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::Serialize;

use hoard_ledger::sha256x2;
use hoard_ledger::store::{Engine, StoreConfig};
use hoard_ledger::testing::{key, World};
use hoard_ledger::Ledger;
use hoard_types::crypto::{verify_batch, SignedMessage};
use hoard_types::tx::verify_transactions;
use hoard_types::{Custody, EventId, Keypair, Outcome, TenantId, Transaction};

/// mimalloc, not the system allocator: ARCHITECTURE.md, "Memory".
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    about = "Benchmark the ledger: apply, durable commit, signed transfers, against ed25519 batch verification"
)]
struct Args {
    /// Events for (a) and (b).
    #[arg(long, default_value_t = 1_000_000)]
    events: usize,
    /// Events for (c), the signed path, and for the verification ceiling.
    #[arg(long, default_value_t = 200_000)]
    signed_events: usize,
    /// Events per block: by default the largest of the issue's range (1,000 to 10,000). The
    /// targets are peak rates, and at its peak a chain's blocks are as full as the proposer makes
    /// them; BENCHMARKS.md gives 1,000 and 5,000 beside it.
    #[arg(long, default_value_t = 10_000)]
    block_size: usize,
    /// Player accounts the transfers move gold between.
    #[arg(long, default_value_t = 100_000)]
    players: usize,
    /// Rounds of (a), each on a fresh ledger; (a) reports their median.
    #[arg(long, default_value_t = 3)]
    apply_rounds: usize,
    /// Which figures to measure: any of `s`, `p`, `a`, `b`, `c` (c includes its ceiling d), and
    /// `h` (hash flooding, not by default).
    #[arg(long, default_value = "s,p,a,b,c", value_delimiter = ',')]
    phases: Vec<String>,
    /// Blocks of (h)'s flooding transfers (each `--block-size`; at most 184,320 events in all).
    #[arg(long, default_value_t = 5)]
    flood_blocks: usize,
    /// Write the results here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Serialize)]
struct Results {
    events: usize,
    signed_events: usize,
    block_size: usize,
    players: usize,
    threads: usize,
    /// The median of the rounds below.
    apply_events_per_second: f64,
    /// Every round of (a), in the order run.
    apply_rounds_events_per_second: Vec<f64>,
    /// (a) with blocks executed one after the other, each commitment before the next apply (the
    /// path consensus takes), and its rounds.
    apply_serial_events_per_second: f64,
    apply_serial_rounds_events_per_second: Vec<f64>,
    durable_events_per_second: f64,
    durable_engine: &'static str,
    durable_redb_events_per_second: f64,
    durable_pipelined_events_per_second: f64,
    durable_pipelined_redb_events_per_second: f64,
    signed_events_per_second: f64,
    batch_verify_ceiling_per_second: f64,
    signed_to_ceiling_ratio: f64,
    state_entries: u64,
    /// (s) SHA-256 compressions per second on one thread, one at a time and two interleaved
    /// (`sha256x2`), medians of 5.
    sha256_compressions_per_second: f64,
    sha256_x2_compressions_per_second: f64,
    /// (p) nanoseconds to decode one of (a)'s transfer payloads: rmp-serde, and
    /// `Transaction::decode_payload` (which reads common bodies directly), medians of 5.
    decode_serde_ns: f64,
    decode_direct_ns: f64,
    /// The final state of (a) as a checkpoint snapshot: its size, the copy the consensus round
    /// takes, and the sort + encode left to the encoder thread (milliseconds, medians of 3).
    snapshot_bytes: u64,
    snapshot_copy_ms: f64,
    snapshot_encode_ms: f64,
    /// (h) events/s of transfers whose event ids share one Fx hash, and of the same number with
    /// ordinary ids (medians of 3; 0 when not run).
    flood_events_per_second: f64,
    flood_baseline_events_per_second: f64,
}

const T: TenantId = TenantId(1);

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.block_size >= 1 && args.block_size <= hoard_types::constants::BLOCK_TRANSACTIONS_MAX
    );
    let threads = rayon::current_num_threads();
    let phase = |name: &str| args.phases.iter().any(|p| p == name);
    let (mut sha_one, mut sha_two) = (0.0, 0.0);
    if phase("s") {
        (sha_one, sha_two) = sha256_rates();
        println!(
            "(s) SHA-256 compressions, one thread: one at a time {sha_one:.0}/s, two interleaved \
             {sha_two:.0}/s ({:.2}x; medians of 5)",
            sha_two / sha_one
        );
    }
    let signed_events = if phase("c") { args.signed_events } else { 0 };
    eprintln!(
        "setup: {} players, {} + {signed_events} transfers signed by their players (threads: {threads})",
        args.players, args.events
    );
    let mut world = World::new(1);
    world.expires_at = 90_000;
    let players: Vec<Keypair> = (0..args.players as u64)
        .into_par_iter()
        .map(|i| key("player", i))
        .collect();
    let mut setup = vec![world.define_currency(T, "GOLD", u128::MAX)];
    for player in &players {
        setup.push(world.register(T, &player.public(), Custody::SelfCustody));
        setup.push(world.mint_currency(T, &player.public(), "GOLD", 1_000_000_000));
    }
    // `count` transfers between random players, with the event ids `event` gives.
    let transfers = |world: &World, count: usize, seed: u64, event: &(dyn Fn(usize) -> EventId + Sync)| {
        (0..count)
            .into_par_iter()
            .map(|i| {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ (i as u64) << 1);
                let from = rng.gen_range(0..players.len());
                let mut to = rng.gen_range(0..players.len() - 1);
                if to >= from {
                    to += 1;
                }
                let body = hoard_types::TxBody::Transfer {
                    from: players[from].public(),
                    to: players[to].public(),
                    assets: vec![hoard_types::Asset::Currency {
                        currency: hoard_types::CurrencyId::new("GOLD"),
                        amount: hoard_types::Amount(1 + (i % 7) as u128),
                    }],
                };
                world.tx_with_id(T, event(i), body, &[&players[from]])
            })
            .collect::<Vec<Transaction>>()
    };
    let numbered = |seed: u64| move |i: usize| EventId::from_u128(((seed << 40) + i as u64) as u128);
    let started = Instant::now();
    let unsigned_path = transfers(&world, args.events, 1, &numbered(1));
    let signed_path = if phase("c") {
        transfers(&world, args.signed_events, 2, &numbered(2))
    } else {
        Vec::new()
    };
    eprintln!(
        "setup: signed {} transactions in {:.1?}",
        args.events + signed_events,
        started.elapsed()
    );

    let (mut decode_serde_ns, mut decode_direct_ns) = (0.0, 0.0);
    if phase("p") {
        (decode_serde_ns, decode_direct_ns) =
            decode_costs(&unsigned_path[..unsigned_path.len().min(200_000)]);
        println!(
            "(p) payload decoding: rmp-serde {decode_serde_ns:.0} ns, decode_payload {decode_direct_ns:.0} ns \
             ({:.2}x; medians of 5)",
            decode_serde_ns / decode_direct_ns
        );
    }

    let genesis = world.genesis();
    let fresh_with_blocks = || {
        let mut ledger = Ledger::new(&genesis);
        let blocks: Vec<_> = setup
            .chunks(args.block_size)
            .map(|chunk| ledger.execute(0, chunk.to_vec()).0)
            .collect();
        (ledger, blocks)
    };
    let fresh = || fresh_with_blocks().0;

    let blocks: Vec<Vec<Transaction>> = unsigned_path.chunks(args.block_size).map(<[_]>::to_vec).collect();
    let mut apply = 0.0;
    let mut apply_rounds = Vec::new();
    let (mut apply_serial, mut apply_serial_rounds) = (0.0, Vec::new());
    let mut state_entries = 0;
    let (mut snapshot_bytes, mut snapshot_copy_ms, mut snapshot_encode_ms) = (0, 0.0, 0.0);
    if phase("a") {
        // (a) apply, with each block's state root: rounds on fresh ledgers, the median kept.
        // Each round runs both paths, in alternating order: blocks executed one after the other
        // (`execute`, as consensus does), and pipelined, each block's commitment beside the next
        // block's apply, as a replica's replay of its block log does (`apply_blocks`, which checks
        // every block's roots against the blocks executed once here, untimed).
        let executed: Vec<hoard_ledger::Block> = {
            let mut ledger = fresh();
            blocks
                .iter()
                .enumerate()
                .map(|(n, transactions)| ledger.execute(n as u64, transactions.clone()).0)
                .collect()
        };
        let mut last = None;
        let mut pipelined_first = false;
        for round in 1..=args.apply_rounds {
            let mut roots = Vec::new();
            for pipelined in [pipelined_first, !pipelined_first] {
                let mut ledger = fresh();
                let run = blocks.clone();
                let replay = executed.clone();
                let path = if pipelined { "pipelined" } else { "serial" };
                // A profiler attaches on this line (scripts/flamegraph): what follows is (a) alone.
                eprintln!("(a) round {round}: applying {} events {path}", args.events);
                let started = Instant::now();
                if pipelined {
                    ledger.apply_blocks(replay, |_, receipts| {
                        debug_assert!(receipts.iter().all(|r| r.outcome.is_applied()));
                        Ok(())
                    })?;
                } else {
                    for (n, transactions) in run.into_iter().enumerate() {
                        let (_, receipts) = ledger.execute(n as u64, transactions);
                        debug_assert!(receipts.iter().all(|r| r.outcome.is_applied()));
                    }
                }
                let seconds = started.elapsed().as_secs_f64();
                let rate = args.events as f64 / seconds;
                if pipelined {
                    apply_rounds.push(rate);
                } else {
                    apply_serial_rounds.push(rate);
                }
                eprintln!("(a) round {round}: {rate:.0} events/s ({seconds:.2} s) {path}");
                ledger.check_invariants().map_err(anyhow::Error::msg)?;
                roots.push(ledger.state_root());
                last = Some(ledger);
            }
            anyhow::ensure!(roots[0] == roots[1], "pipelined and serial apply disagree");
            pipelined_first = !pipelined_first;
        }
        let ledger = last.context("--apply-rounds must be at least 1")?;
        apply = median(&apply_rounds);
        apply_serial = median(&apply_serial_rounds);
        state_entries = ledger.state_entries();
        let list = |rounds: &[f64]| {
            rounds
                .iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "(a) apply + state root:        {apply:>12.0} events/s  pipelined (median of {} round(s) of {} events: {})",
            apply_rounds.len(),
            args.events,
            list(&apply_rounds)
        );
        println!(
            "    one block after another:   {apply_serial:>12.0} events/s  ({})",
            list(&apply_serial_rounds)
        );
        // A checkpoint's cost to the consensus round: the state copy it takes now
        // (`snapshot_view`), against the sorting and encoding left to the encoder thread, which
        // the round paid before as well. Median of 3.
        let mut copies = Vec::new();
        let mut encodes = Vec::new();
        for _ in 0..3 {
            let started = Instant::now();
            let view = ledger.snapshot_view();
            copies.push(started.elapsed().as_secs_f64() * 1e3);
            let started = Instant::now();
            snapshot_bytes = view.encode().len() as u64;
            encodes.push(started.elapsed().as_secs_f64() * 1e3);
        }
        copies.sort_by(f64::total_cmp);
        encodes.sort_by(f64::total_cmp);
        (snapshot_copy_ms, snapshot_encode_ms) = (copies[1], encodes[1]);
        println!(
            "    checkpoint of this state ({snapshot_bytes} bytes): copy in the round {snapshot_copy_ms:.1} ms, \
             sort + encode on the encoder thread {snapshot_encode_ms:.1} ms (medians of 3)"
        );
    }

    // (b) apply and a durable commit of every block, on each engine.
    let mut durable = [0.0; 2];
    let mut pipelined = [0.0; 2];
    let engines = if phase("b") {
        vec![Engine::Sled, Engine::Redb]
    } else {
        Vec::new()
    };
    for (index, engine) in engines.into_iter().enumerate() {
        let dir = tempfile::tempdir()?;
        let mut store = engine
            .open(dir.path(), StoreConfig::default())
            .context("open store")?;
        let (mut ledger, setup_blocks) = fresh_with_blocks();
        for block in &setup_blocks {
            store.append_block(block.header.height, &block.encode())?;
        }
        store.sync()?;
        let run = blocks.clone();
        let started = Instant::now();
        for (n, transactions) in run.into_iter().enumerate() {
            let (block, _) = ledger.execute(n as u64, transactions);
            store.append_block(block.header.height, &block.encode())?;
            store.sync()?;
        }
        let seconds = started.elapsed().as_secs_f64();
        let rate = args.events as f64 / seconds;
        let survives = store.durability().sync;
        println!(
            "(b) apply + durable {:<5} commit: {rate:>10.0} events/s  (one append + sync per block; sync survives {survives:?})",
            engine.name(),
        );
        durable[index] = rate;

        // The same, pipelined: a writer thread appends and syncs block N (each block is
        // durable before the next is handed over) while block N+1 applies.
        let dir = tempfile::tempdir()?;
        let mut store = engine
            .open(dir.path(), StoreConfig::default())
            .context("open store")?;
        let (mut ledger, setup_blocks) = fresh_with_blocks();
        for block in &setup_blocks {
            store.append_block(block.header.height, &block.encode())?;
        }
        store.sync()?;
        let run = blocks.clone();
        let started = Instant::now();
        std::thread::scope(|scope| -> anyhow::Result<()> {
            let (sender, receiver) = sync_channel::<hoard_ledger::Block>(1);
            let writer = scope.spawn(move || -> anyhow::Result<()> {
                for block in receiver {
                    store.append_block(block.header.height, &block.encode())?;
                    store.sync()?;
                }
                Ok(())
            });
            for (n, transactions) in run.into_iter().enumerate() {
                let (block, _) = ledger.execute(n as u64, transactions);
                if sender.send(block).is_err() {
                    break;
                }
            }
            drop(sender);
            writer.join().expect("writer thread")
        })?;
        let rate = args.events as f64 / started.elapsed().as_secs_f64();
        println!(
            "(b) pipelined, durable {:<5}:  {rate:>10.0} events/s  (block N appended + synced while N+1 applies)",
            engine.name(),
        );
        pipelined[index] = rate;
    }

    // (h) hash flooding: blocks of transfers whose event ids share one hash under Fx (the
    // ledger's hash before it was keyed at random), against as many with ordinary ids; each
    // run on a fresh ledger, one block after the other, alternated, medians of 3.
    let (mut flood, mut flood_baseline) = (0.0, 0.0);
    if phase("h") {
        let count = args.flood_blocks * args.block_size;
        let crafted = hoard_ledger::testing::fx_colliding_event_ids(count);
        let runs = [
            transfers(&world, count, 3, &numbered(3)),
            transfers(&world, count, 3, &|i| crafted[i]),
        ]
        .map(|run| run.chunks(args.block_size).map(<[_]>::to_vec).collect::<Vec<_>>());
        let mut rates = [Vec::new(), Vec::new()];
        for _ in 0..3 {
            for (index, run) in runs.iter().enumerate() {
                let mut ledger = fresh();
                let run = run.clone();
                let started = Instant::now();
                for (n, transactions) in run.into_iter().enumerate() {
                    let (_, receipts) = ledger.execute(n as u64, transactions);
                    anyhow::ensure!(
                        receipts.iter().all(|r| r.outcome.is_applied() && !r.duplicate),
                        "every flooding transfer applies once"
                    );
                }
                rates[index].push(count as f64 / started.elapsed().as_secs_f64());
            }
        }
        (flood_baseline, flood) = (median(&rates[0]), median(&rates[1]));
        println!(
            "(h) {count} transfers whose event ids share one Fx hash: {flood:.0} events/s; \
             with ordinary ids: {flood_baseline:.0} events/s ({:.2}x; medians of 3)",
            flood / flood_baseline
        );
    }

    let mut results = Results {
        events: args.events,
        signed_events: 0,
        block_size: args.block_size,
        players: args.players,
        threads,
        apply_events_per_second: apply.round(),
        apply_rounds_events_per_second: apply_rounds.iter().map(|r| r.round()).collect(),
        apply_serial_events_per_second: apply_serial.round(),
        apply_serial_rounds_events_per_second: apply_serial_rounds.iter().map(|r| r.round()).collect(),
        durable_events_per_second: durable[0].round(),
        durable_engine: "sled",
        durable_redb_events_per_second: durable[1].round(),
        durable_pipelined_events_per_second: pipelined[0].round(),
        durable_pipelined_redb_events_per_second: pipelined[1].round(),
        signed_events_per_second: 0.0,
        batch_verify_ceiling_per_second: 0.0,
        signed_to_ceiling_ratio: 0.0,
        state_entries,
        sha256_compressions_per_second: sha_one.round(),
        sha256_x2_compressions_per_second: sha_two.round(),
        decode_serde_ns: decode_serde_ns.round(),
        decode_direct_ns: decode_direct_ns.round(),
        snapshot_bytes,
        snapshot_copy_ms: (snapshot_copy_ms * 10.0).round() / 10.0,
        snapshot_encode_ms: (snapshot_encode_ms * 10.0).round() / 10.0,
        flood_events_per_second: flood.round(),
        flood_baseline_events_per_second: flood_baseline.round(),
    };
    if !phase("c") {
        return write_results(&args, results);
    }

    // (d) the ceiling: raw batch verification of the same signatures, same chunking, all cores.
    let signed_bytes: Vec<Vec<u8>> = signed_path.par_iter().map(Transaction::signed_bytes).collect();
    let started = Instant::now();
    signed_path
        .par_chunks(64)
        .zip(signed_bytes.par_chunks(64))
        .for_each(|(txs, bytes)| {
            let items: Vec<SignedMessage<'_>> = txs
                .iter()
                .zip(bytes)
                .map(|(tx, message)| SignedMessage {
                    key: &tx.signatures[0].signer,
                    message,
                    signature: &tx.signatures[0].signature,
                })
                .collect();
            verify_batch(&items).expect("valid signatures");
        });
    let ceiling = args.signed_events as f64 / started.elapsed().as_secs_f64();

    // (c) signed transfers: a verifier thread batch-verifies every signature of block N+1
    // while block N applies (the state machine itself stays single-threaded in its order).
    let mut ledger = fresh();
    let mut applied = 0;
    let started = Instant::now();
    std::thread::scope(|scope| {
        let (sender, receiver) = sync_channel::<Vec<Transaction>>(1);
        let block_size = args.block_size;
        let signed_path = &signed_path;
        scope.spawn(move || {
            for transactions in signed_path.chunks(block_size) {
                let valid: Vec<bool> = transactions
                    .par_chunks(256)
                    .flat_map_iter(verify_transactions)
                    .collect();
                assert!(valid.iter().all(|v| *v), "every signature verifies");
                if sender.send(transactions.to_vec()).is_err() {
                    break;
                }
            }
        });
        for (n, transactions) in receiver.into_iter().enumerate() {
            let (_, receipts) = ledger.execute(n as u64, transactions);
            applied += receipts
                .iter()
                .filter(|r| r.outcome == Outcome::Applied && !r.duplicate)
                .count();
        }
    });
    anyhow::ensure!(applied == args.signed_events, "every signed transfer applied");
    let signed = args.signed_events as f64 / started.elapsed().as_secs_f64();
    println!("(c) verify + apply:            {signed:>12.0} events/s");
    println!("(d) ed25519 batch verify:      {ceiling:>12.0} signatures/s (ceiling for c)");
    println!("    (c)/(d) = {:.2}", signed / ceiling);

    results.signed_events = args.signed_events;
    results.signed_events_per_second = signed.round();
    results.batch_verify_ceiling_per_second = ceiling.round();
    results.signed_to_ceiling_ratio = (signed / ceiling * 100.0).round() / 100.0;
    write_results(&args, results)
}

/// (s): SHA-256 compressions per second on this thread, one at a time and two interleaved
/// (`sha256x2`), over 2^18 blocks each: what hashing the tree's nodes two at a time can gain.
fn sha256_rates() -> (f64, f64) {
    let blocks: Vec<[u8; 64]> = (0..1usize << 18)
        .map(|i| std::array::from_fn(|j| (i * 31 + j * 7) as u8))
        .collect();
    let (mut one, mut two) = (Vec::new(), Vec::new());
    let mut sink = 0u32;
    for _ in 0..5 {
        let started = Instant::now();
        for block in &blocks {
            let mut state = [1u32; 8];
            sha256x2::compress(&mut state, block);
            sink ^= state[0];
        }
        one.push(blocks.len() as f64 / started.elapsed().as_secs_f64());
        let started = Instant::now();
        for pair in blocks.chunks_exact(2) {
            let (mut a, mut b) = ([1u32; 8], [2u32; 8]);
            sha256x2::compress_x2(&mut a, &pair[..1], &mut b, &pair[1..]);
            sink ^= a[0] ^ b[0];
        }
        two.push(blocks.len() as f64 / started.elapsed().as_secs_f64());
    }
    std::hint::black_box(sink);
    (median(&one), median(&two))
}

/// (p): nanoseconds per payload of `transactions` decoded with rmp-serde and with
/// `decode_payload`, alternated five times, each payload dropped as the ledger drops it.
fn decode_costs(transactions: &[Transaction]) -> (f64, f64) {
    let (mut serde, mut direct) = (Vec::new(), Vec::new());
    let per_payload = |started: Instant| started.elapsed().as_nanos() as f64 / transactions.len() as f64;
    for _ in 0..5 {
        let started = Instant::now();
        for tx in transactions {
            let payload: hoard_types::TxPayload = rmp_serde::from_slice(&tx.payload).expect("decodes");
            std::hint::black_box(payload);
        }
        serde.push(per_payload(started));
        let started = Instant::now();
        for tx in transactions {
            std::hint::black_box(tx.decode_payload().expect("decodes"));
        }
        direct.push(per_payload(started));
    }
    (median(&serde), median(&direct))
}

/// The median of `rates` (the upper one of an even count).
fn median(rates: &[f64]) -> f64 {
    let mut sorted = rates.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

fn write_results(args: &Args, results: Results) -> anyhow::Result<()> {
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&results)?)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
