//! `hoard-sim`: the real consensus and the real asset state machine under the seeded simulator.
//!
//! ```text
//! cargo run --release -p hoard-ledger --bin hoard-sim -- --seeds 200 --replicas 4
//! cargo run --release -p hoard-ledger --bin hoard-sim -- --seed 17 --replicas 7 --verbose
//! ```
//!
//! Prints one line per failing seed with the command that replays it, and `seeds=N failures=F`
//! last. Exit status 0 only when no seed failed.

use std::process::ExitCode;

use clap::Parser;

use hoard_ledger::sim::{make_app, make_request, options};
use hoard_pbft::sim::{print_failure, run_seed, run_seeds};

#[derive(Parser)]
#[command(about = "Run PBFT with the Hoard ledger under a seeded simulated network, disk and clock")]
struct Args {
    /// Run this many seeds, starting at --seed.
    #[arg(long)]
    seeds: Option<u64>,
    /// The (first) seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Replicas: 3f+1.
    #[arg(long, default_value_t = 4)]
    replicas: usize,
    /// Simulated length of the fault phase, in milliseconds.
    #[arg(long)]
    fault_ms: Option<u64>,
    /// No network faults, crashes or old disks.
    #[arg(long)]
    no_faults: bool,
    /// No Byzantine replicas.
    #[arg(long)]
    no_byzantine: bool,
    /// One line per notable event.
    #[arg(long, short)]
    verbose: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut options = options("cargo run --release -p hoard-ledger --bin hoard-sim --");
    options.faults = !args.no_faults;
    options.byzantine = !args.no_byzantine;
    options.verbose = args.verbose;
    if let Some(ms) = args.fault_ms {
        options.fault_phase_ms = ms;
    }
    let failures = match args.seeds {
        None => {
            let report = run_seed(args.seed, args.replicas, make_app, make_request, &options);
            print_failure(&report, &options);
            println!("{report}");
            println!("seeds=1 failures={}", usize::from(!report.ok()));
            usize::from(!report.ok())
        }
        Some(count) => run_seeds(args.seed, count, args.replicas, make_app, make_request, &options)
            .iter()
            .filter(|r| !r.ok())
            .count(),
    };
    if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
