//! The ledger benchmark binary (`hoard-ledger-bench`) at a tiny size, every phase: it runs to
//! the end, its own checks pass (pipelined and serial apply agree on the state root, every
//! signed and every flooding transfer applies once), and its JSON holds the fields BENCHMARKS.md
//! and the issue name, each a measured, positive figure. Not a performance test: nothing here
//! depends on how fast the machine is.

use std::process::Command;

#[test]
fn every_phase_runs_and_writes_its_figures() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("ledger.json");
    let output = Command::new(env!("CARGO_BIN_EXE_hoard-ledger-bench"))
        .args(["--events", "2000", "--signed-events", "400", "--players", "300"])
        .args([
            "--block-size",
            "500",
            "--apply-rounds",
            "1",
            "--flood-blocks",
            "2",
        ])
        .args(["--phases", "s,p,a,b,c,h", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let results: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    for field in [
        "apply_events_per_second",
        "apply_serial_events_per_second",
        "durable_events_per_second",
        "durable_redb_events_per_second",
        "durable_pipelined_events_per_second",
        "durable_pipelined_redb_events_per_second",
        "signed_events_per_second",
        "batch_verify_ceiling_per_second",
        "signed_to_ceiling_ratio",
        "sha256_compressions_per_second",
        "decode_direct_ns",
        "snapshot_bytes",
        "flood_events_per_second",
        "flood_baseline_events_per_second",
    ] {
        let value = results[field]
            .as_f64()
            .unwrap_or_else(|| panic!("{field} missing: {results}"));
        assert!(value > 0.0, "{field} = {value}");
    }
    assert_eq!(results["events"], 2000);
    assert_eq!(
        results["apply_rounds_events_per_second"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert!(
        stdout.contains("(h) 1000 transfers whose event ids share one Fx hash"),
        "{stdout}"
    );
}
