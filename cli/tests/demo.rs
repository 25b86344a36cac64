//! `hoard demo` end to end: 4 replica processes, a real redis-server, the gateway, simulated
//! players through the SDK; the demo must exit 0 and print its end checks (every replica's
//! state root equal, supply conserved).

use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn demo_runs_and_the_replicas_agree() {
    let started = Instant::now();
    let data = tempfile::tempdir().expect("temp dir");
    let output = Command::new(env!("CARGO_BIN_EXE_hoard"))
        .args(["demo", "--duration", "8", "--players", "50"])
        .arg("--data-dir")
        .arg(data.path().join("demo"))
        .output()
        .expect("hoard demo runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "hoard demo failed ({:?})\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    for expected in [
        "end check: all 4 replicas hold state root",
        "(the gateway's follower agrees)",
        "end check: supply conserved",
        "demo: OK",
    ] {
        assert!(stdout.contains(expected), "missing `{expected}` in:\n{stdout}");
    }
    // Load really flowed: progress lines, clicks acknowledged and asset events committed.
    assert!(stdout.contains("clicks/s"), "{stdout}");
    let summary = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("asset events:"))
        .expect("a summary line for asset events");
    let committed: u64 = summary
        .split(", ")
        .find(|part| part.contains(" committed ("))
        .and_then(|part| part.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(committed > 0, "no asset event committed: {summary}");
    // The data directory given was kept, with every replica's store.
    for id in 0..4 {
        assert!(data.path().join(format!("demo/cluster/replica-{id}")).is_dir());
    }
    assert!(
        started.elapsed() < Duration::from_secs(90),
        "the demo took {:?}",
        started.elapsed()
    );
}
