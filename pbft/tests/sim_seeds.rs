//! The simulator over many seeds: 200 for n = 4 (in two halves, to run in parallel) and 50
//! for n = 7, with the test app and its invariant.

use std::sync::Arc;

use hoard_pbft::sim::{run_seeds, test_request, SimOptions};
use hoard_pbft::TestApp;

fn options() -> SimOptions<TestApp> {
    SimOptions {
        invariant: Some(Arc::new(|app: &TestApp| app.invariant())),
        ..SimOptions::default()
    }
}

fn check(first_seed: u64, count: u64, replicas: usize) {
    let reports = run_seeds(
        first_seed,
        count,
        replicas,
        |_| TestApp::new(),
        test_request,
        &options(),
    );
    let failures: Vec<u64> = reports.iter().filter(|r| !r.ok()).map(|r| r.seed).collect();
    assert!(failures.is_empty(), "failing seeds: {failures:?}");
    // The runs were meaningful: work was done and faults did happen.
    let executed: u64 = reports.iter().map(|r| r.requests_executed).sum();
    let answered: u64 = reports.iter().map(|r| r.requests_answered).sum();
    assert_eq!(
        answered, executed,
        "every executed request answered at its client"
    );
    let view_changes: u64 = reports.iter().map(|r| r.view_changes).sum();
    let transfers: u64 = reports.iter().map(|r| r.state_transfers).sum();
    let crashes: u64 = reports.iter().map(|r| r.crashes).sum();
    assert!(executed >= count * 20, "{executed} requests executed");
    assert!(
        view_changes > 0 && transfers > 0 && crashes > 0,
        "{view_changes} {transfers} {crashes}"
    );
}

#[test]
fn seeds_n4_first_half() {
    check(0, 100, 4);
}

#[test]
fn seeds_n4_second_half() {
    check(100, 100, 4);
}

#[test]
fn seeds_n7() {
    check(0, 50, 7);
}

#[test]
fn seeds_without_faults_execute_everything() {
    let options = SimOptions {
        faults: false,
        ..options()
    };
    let reports = run_seeds(0, 5, 4, |_| TestApp::new(), test_request, &options);
    for report in reports {
        assert!(report.ok());
        assert_eq!(report.requests_executed, report.requests_submitted);
        assert_eq!(report.requests_answered, report.requests_submitted);
        assert_eq!(report.view_changes, 0);
    }
}
