//! A replica's process runs on mimalloc, chosen by its role (ledger/src/alloc.rs): checked on the
//! real `hoard` binary.

use std::process::Command;

#[test]
fn hoard_node_runs_on_mimalloc() {
    let output = Command::new(env!("CARGO_BIN_EXE_hoard"))
        .args(["node", "--config", "/nonexistent/hoard-node.toml"])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env_remove("HOARD_NODE_CONFIG")
        .output()
        .expect("hoard runs");
    assert!(!output.status.success(), "a missing node file is an error");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let line = stderr
        .lines()
        .find(|line| line.contains("replica starting"))
        .unwrap_or_else(|| panic!("no start line in: {stderr}"));
    assert!(line.contains("mimalloc"), "{line}");
}
