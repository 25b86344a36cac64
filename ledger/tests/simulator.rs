//! The real consensus with the real asset state machine under the seeded simulator: 200 seeds
//! with 4 replicas and 50 with 7, faults and Byzantine replicas on. Each seed checks safety
//! after every step (no two honest replicas commit different blocks at one height, every
//! committed request was submitted, supply is conserved) and liveness once faults heal.
//! A failure prints the `hoard-sim` command that replays it.

use hoard_ledger::sim::{make_app, make_request, options};
use hoard_pbft::sim::{print_failure, run_seed};

fn run(first_seed: u64, seeds: u64, replicas: usize) {
    let options = options("cargo run --release -p hoard-ledger --bin hoard-sim --");
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).min(4) as u64;
    let failures: Vec<String> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|worker| {
                let options = &options;
                scope.spawn(move || {
                    let mut failed = Vec::new();
                    for seed in (first_seed..first_seed + seeds).filter(|s| s % threads == worker) {
                        let report = run_seed(seed, replicas, make_app, make_request, options);
                        if !report.ok() {
                            print_failure(&report, options);
                            failed.push(format!("seed {seed}: {:?}", report.failure));
                        }
                    }
                    failed
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("simulator thread"))
            .collect()
    });
    println!("seeds={seeds} failures={}", failures.len());
    assert!(
        failures.is_empty(),
        "{} of {seeds} seeds failed with {replicas} replicas: {failures:#?}",
        failures.len()
    );
}

#[test]
fn two_hundred_seeds_with_four_replicas() {
    run(0, 200, 4);
}

#[test]
fn fifty_seeds_with_seven_replicas() {
    run(10_000, 50, 7);
}
