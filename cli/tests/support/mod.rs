//! What the process-level tests share: a `hoard` command run in the background, its output read
//! line by line, and stopped on drop (also when an assertion fails).

// Each test crate that includes this module uses a part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a stopped process may take to exit before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `hoard` subcommand (`demo --serve`, `dev`): stdout read on a thread, stderr
/// inherited. On drop it gets `stop_signal` (it then stops its replicas and redis-server), and
/// SIGKILL if it has not exited within 30 s.
pub struct Background {
    child: Child,
    lines: Option<mpsc::Receiver<String>>,
    stop_signal: &'static str,
}

impl Background {
    /// Starts `hoard` with `args` (and `RUST_LOG=warn`).
    pub fn start(args: &[&std::ffi::OsStr], stop_signal: &'static str) -> Background {
        let mut child = Command::new(env!("CARGO_BIN_EXE_hoard"))
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start hoard");
        let stdout = child.stdout.take().expect("stdout");
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Background {
            child,
            lines: Some(lines),
            stop_signal,
        }
    }

    /// Hands each printed line to `line` until it returns true; returns everything printed up
    /// to then. Panics with that output when `timeout` passes first. Later output is drained
    /// (so that the process never blocks on a full pipe).
    pub fn read_until(&mut self, timeout: Duration, mut line: impl FnMut(&str) -> bool) -> String {
        let lines = self.lines.take().expect("read_until is called once");
        let deadline = Instant::now() + timeout;
        let mut printed = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let next = lines.recv_timeout(left).unwrap_or_else(|_| {
                panic!("hoard did not print what was expected in {timeout:?}:\n{printed}")
            });
            printed.push_str(&next);
            printed.push('\n');
            if line(&next) {
                break;
            }
        }
        std::thread::spawn(move || while lines.recv().is_ok() {});
        printed
    }

    /// Panics if the process has exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("hoard exited early: {status}");
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(format!("-{}", self.stop_signal))
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
