//! Runs the PBFT simulator with the test app.
//!
//! `pbft-sim --seeds N --replicas 4 [--seed S] [--verbose] [--no-faults] [--no-byzantine]`
//! runs seeds S..S+N (S defaults to 0), prints one line per failing seed with its replay
//! command, and finishes with `seeds=N failures=F`. Exit codes: 0 all passed, 1 a correctness
//! failure (safety, forged request, invariant, memory), 3 a liveness failure, 4 a recovery
//! failure, 2 bad arguments.

use std::process::ExitCode;
use std::sync::Arc;

use hoard_pbft::sim::{run_seed, run_seeds, test_request, FailureKind, SeedReport, SimOptions};
use hoard_pbft::TestApp;

fn main() -> ExitCode {
    let mut seeds: Option<u64> = None;
    let mut seed: u64 = 0;
    let mut replicas: usize = 4;
    let mut options: SimOptions<TestApp> = SimOptions::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| -> u64 {
            args.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
                eprintln!("{name} needs a number");
                std::process::exit(2)
            })
        };
        match arg.as_str() {
            "--seeds" => seeds = Some(value("--seeds")),
            "--seed" => seed = value("--seed"),
            "--replicas" => replicas = value("--replicas") as usize,
            "--fault-ms" => options.fault_phase_ms = value("--fault-ms"),
            "--checkpoint-interval" => options.checkpoint_interval = value("--checkpoint-interval"),
            "--window" => options.window = value("--window"),
            "--batch-size" => options.batch_size_max = value("--batch-size") as usize,
            "--verbose" | "-v" => options.verbose = true,
            "--no-faults" => options.faults = false,
            "--no-byzantine" => options.byzantine = false,
            "--help" | "-h" => {
                println!(
                    "pbft-sim --seeds N --replicas 4 [--seed S] [--fault-ms MS] [--checkpoint-interval K] \
                     [--window L] [--batch-size B] [--verbose] [--no-faults] [--no-byzantine]"
                );
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("unknown argument {other}");
                return ExitCode::from(2);
            }
        }
    }
    options.invariant = Some(Arc::new(|app: &TestApp| app.invariant()));
    let reports: Vec<SeedReport> = match seeds {
        None => {
            let report = run_seed(seed, replicas, |_| TestApp::new(), test_request, &options);
            hoard_pbft::sim::print_failure(&report, &options);
            println!("{report}");
            println!("seeds=1 failures={}", usize::from(!report.ok()));
            vec![report]
        }
        Some(count) => run_seeds(seed, count, replicas, |_| TestApp::new(), test_request, &options),
    };
    let kinds: Vec<&FailureKind> = reports
        .iter()
        .filter_map(|r| r.failure.as_ref().map(|(k, _)| k))
        .collect();
    if kinds.iter().any(|k| {
        matches!(
            k,
            FailureKind::Safety | FailureKind::Forged | FailureKind::Invariant | FailureKind::Memory
        )
    }) {
        ExitCode::from(1)
    } else if kinds.contains(&&FailureKind::Liveness) {
        ExitCode::from(3)
    } else if kinds.contains(&&FailureKind::Recovery) {
        ExitCode::from(4)
    } else {
        ExitCode::SUCCESS
    }
}
