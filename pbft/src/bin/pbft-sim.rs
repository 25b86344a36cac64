//! Runs the PBFT simulator with the test app.
//!
//! `pbft-sim --seeds N --replicas 4 [--seed S] [--verbose] [--no-faults] [--no-byzantine]`
//! runs seeds S..S+N (S defaults to 0), prints one line per failing seed with its replay
//! command, and finishes with `seeds=N failures=F`. Exit code 0 if all passed, 1 otherwise.

use std::process::ExitCode;
use std::sync::Arc;

use hoard_pbft::sim::{run_seed, run_seeds, test_request, SimOptions};
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
            "--verbose" | "-v" => options.verbose = true,
            "--no-faults" => options.faults = false,
            "--no-byzantine" => options.byzantine = false,
            "--help" | "-h" => {
                println!("pbft-sim --seeds N --replicas 4 [--seed S] [--fault-ms MS] [--verbose] [--no-faults] [--no-byzantine]");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("unknown argument {other}");
                return ExitCode::from(2);
            }
        }
    }
    options.invariant = Some(Arc::new(|app: &TestApp| app.invariant()));
    let failures = match seeds {
        None => {
            let report = run_seed(seed, replicas, |_| TestApp::new(), test_request, &options);
            hoard_pbft::sim::print_failure(&report, &options);
            println!(
                "seed={} {} executed_seq={} requests={}/{} view_changes={} state_transfers={} crashes={} \
                 messages={} simulated_ms={} events={}\n  params: {}",
                report.seed,
                if report.ok() { "ok" } else { "FAILED" },
                report.executed_seq,
                report.requests_executed,
                report.requests_submitted,
                report.view_changes,
                report.state_transfers,
                report.crashes,
                report.messages_delivered,
                report.simulated_ms,
                report.events,
                report.params
            );
            println!("seeds=1 failures={}", usize::from(!report.ok()));
            usize::from(!report.ok())
        }
        Some(count) => run_seeds(seed, count, replicas, |_| TestApp::new(), test_request, &options)
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
