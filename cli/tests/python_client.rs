//! A client in another language, written from `docs/PROTOCOL.md` alone (`clients/python/`),
//! against `hoard dev`: 4 replica processes, a real redis-server (and again with the embedded
//! store), the gateway. Every step asserts what the document says; a failure means the gateway and its
//! document disagree. Needs `/usr/bin/python3` with the Debian packages python3-msgpack,
//! python3-websockets and python3-nacl (`scripts/test` installs them).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod support;
use support::Background;

/// `hoard dev` prints its endpoints and credential well within this (4 replicas, Redis, gateway).
const DEV_START_TIMEOUT: Duration = Duration::from_secs(90);
/// The conformance script's own overall bound is 240 s; this one only stops a hung interpreter.
const CONFORMANCE_TIMEOUT: Duration = Duration::from_secs(300);
const PYTHON: &str = "/usr/bin/python3";

/// `hoard dev`, stopped (SIGINT, as Ctrl-C) on drop.
struct Dev {
    _process: Background,
    url: String,
    tenant: u64,
    studio_seed: String,
}

impl Dev {
    /// `store`: `redis` or `embedded` (`hoard dev --store`).
    fn start(data: &Path, store: &str) -> Dev {
        // Port 0: the gateway binds what the kernel gives and prints it (a port chosen here
        // could be taken by one of its replicas, or another test, before the gateway binds it).
        let any = "127.0.0.1:0";
        let args: Vec<&OsStr> = [
            "dev",
            "--store",
            store,
            "--listen",
            any,
            "--metrics",
            any,
            "--data-dir",
        ]
        .into_iter()
        .map(OsStr::new)
        .chain([data.as_os_str()])
        .collect();
        let mut process = Background::start(&args, "INT");
        let (mut url, mut tenant, mut studio_seed) = (String::new(), 0, String::new());
        let printed = process.read_until(DEV_START_TIMEOUT, |line| {
            let value = |label: &str| line.split_once(label).map(|(_, rest)| rest.trim().to_string());
            if let Some(value) = value("websocket:") {
                url = value;
            } else if let Some(value) = value("tenant:") {
                tenant = value.parse().expect("a tenant number");
            } else if let Some(value) = value("studio seed:") {
                studio_seed = value;
            }
            !url.is_empty() && tenant != 0 && !studio_seed.is_empty()
        });
        assert!(
            url.starts_with("ws://127.0.0.1:") && url.ends_with("/v1"),
            "{printed}"
        );
        Dev {
            _process: process,
            url,
            tenant,
            studio_seed,
        }
    }
}

fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../clients/python")
}

/// Runs `conformance.py` against `dev`; returns its exit status and output.
fn conformance(dev: &Dev) -> (bool, String) {
    let mut child = Command::new(PYTHON)
        .arg(clients_dir().join("conformance.py"))
        .arg("--url")
        .arg(&dev.url)
        .arg("--tenant")
        .arg(dev.tenant.to_string())
        .arg("--studio-seed")
        .arg(&dev.studio_seed)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{PYTHON} must be installed (scripts/test installs it): {e}"));
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait for python") {
            let output = child.wait_with_output().expect("python output");
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            return (status.success(), text);
        }
        if started.elapsed() > CONFORMANCE_TIMEOUT {
            let _ = child.kill();
            let output = child.wait_with_output().expect("python output");
            panic!(
                "conformance.py hung for {CONFORMANCE_TIMEOUT:?}:\n{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_client_written_from_the_protocol_document_alone_passes_every_step() {
    passes_every_step_on("redis");
}

/// The same document holds for the embedded store (`hoard dev --store embedded`, the demo's
/// fallback without redis-server).
#[test]
fn the_same_client_passes_every_step_with_the_embedded_store() {
    passes_every_step_on("embedded");
}

fn passes_every_step_on(store: &str) {
    let probe = Command::new(PYTHON)
        .args(["-c", "import msgpack, websockets, nacl"])
        .output();
    assert!(
        probe.as_ref().is_ok_and(|o| o.status.success()),
        "{PYTHON} with python3-msgpack, python3-websockets and python3-nacl is needed \
         (scripts/test installs them): {probe:?}"
    );
    let scratch = tempfile::tempdir().expect("scratch dir");
    let dev = Dev::start(&scratch.path().join("dev"), store);
    let (ok, output) = conformance(&dev);
    let last = output.lines().last().unwrap_or_default().to_string();
    assert!(ok, "conformance.py failed:\n{output}");
    assert!(
        last.starts_with("steps=") && last.ends_with("failures=0"),
        "{output}"
    );
    let steps: u64 = last
        .trim_start_matches("steps=")
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(steps >= 50, "only {steps} steps ran:\n{output}");
}
