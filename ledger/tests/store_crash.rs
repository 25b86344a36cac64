//! Crash test of the ledger store: a child process (`hoard-store-crash-child`) appends blocks,
//! snapshots and records, syncing and printing `durable <h>` after each step; this test kills it with
//! SIGKILL at a random moment, reopens the store and checks that nothing half-written, reordered or
//! reported durable is missing. Each directory is crashed several times in a row, so recovery of an
//! already recovered store is exercised too.
//!
//! Reproduce a failure with `HOARD_CRASH_SEED=<seed printed by the failing run>`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hoard_ledger::store::testkit::{
    block_content, next_random, record_content, record_key, snapshot_content, CRASH_SNAPSHOT_EVERY_BLOCKS,
};
use hoard_ledger::store::{Engine, StoreConfig};

/// Directories per engine; each is crashed `CRASHES_PER_DIR` times.
const DIRS_PER_ENGINE: u64 = 8;
const CRASHES_PER_DIR: u64 = 5;
/// How long the child may take to open the store.
const CHILD_OPEN_WAIT: Duration = Duration::from_secs(10);
/// The child is killed this long after it opened the store, at most.
const KILL_AFTER_MS_MAX: u64 = 150;
/// The first kill of each directory comes this long after the spawn, at most.
const CREATION_KILL_AFTER_MS_MAX: u64 = 12;
/// The child stops by itself at this height (never reached in practice).
const CHILD_HEIGHT_MAX: u64 = 1_000_000;
/// Retention used by the pruning half of the directories.
const PRUNING_RETENTION_BLOCKS: u64 = 25;

const _: () = assert!(DIRS_PER_ENGINE * CRASHES_PER_DIR >= 30);

struct Mode {
    sync_each_write: bool,
    block_retention_blocks: u64,
}

fn mode_of(dir_index: u64) -> Mode {
    // Even directories: sync after each step, keep every block (contiguous from 1).
    // Odd directories: sync_each_write, prune to a short retention.
    if dir_index.is_multiple_of(2) {
        Mode {
            sync_each_write: false,
            block_retention_blocks: u64::MAX,
        }
    } else {
        Mode {
            sync_each_write: true,
            block_retention_blocks: PRUNING_RETENTION_BLOCKS,
        }
    }
}

fn seed() -> u64 {
    match std::env::var("HOARD_CRASH_SEED") {
        Ok(text) => text.parse().expect("HOARD_CRASH_SEED"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    }
}

/// Runs the child once until SIGKILL; returns the highest height it reported durable (0 if none) and
/// the height it started from.
/// `kill_after` counts from the spawn if `from_spawn`, else from the moment the child opened the store.
fn run_child_and_kill(
    engine: Engine,
    dir: &Path,
    mode: &Mode,
    kill_after: Duration,
    from_spawn: bool,
) -> (u64, u64) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hoard-store-crash-child"))
        .arg(engine.name())
        .arg(dir)
        .arg(if mode.sync_each_write { "each" } else { "sync" })
        .arg(mode.block_retention_blocks.to_string())
        .arg(CHILD_HEIGHT_MAX.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn hoard-store-crash-child");
    let stdout = child.stdout.take().unwrap();
    let durable = Arc::new(AtomicU64::new(0));
    let started = Arc::new(AtomicU64::new(u64::MAX));
    let (opened_sender, opened) = std::sync::mpsc::channel();
    let reader = {
        let (durable, started) = (durable.clone(), started.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(height) = line.strip_prefix("durable ") {
                    durable.store(height.parse().unwrap(), Ordering::SeqCst);
                } else if let Some(height) = line.strip_prefix("start ") {
                    started.store(height.parse().unwrap(), Ordering::SeqCst);
                    let _ = opened_sender.send(());
                }
            }
        })
    };
    if !from_spawn {
        opened
            .recv_timeout(CHILD_OPEN_WAIT)
            .expect("the child did not open the store in time");
    }
    std::thread::sleep(kill_after);
    // SIGKILL; an error means the child already exited, which it must not have done.
    child.kill().expect("SIGKILL the child");
    let status = child.wait().unwrap();
    reader.join().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "the child exited before the kill: {status:?}"
    );
    (durable.load(Ordering::SeqCst), started.load(Ordering::SeqCst))
}

/// Reopens the store and checks it against what the child wrote; returns the last height.
fn verify(engine: Engine, dir: &Path, mode: &Mode, durable: u64, label: &str) -> u64 {
    let config = StoreConfig {
        block_retention_blocks: mode.block_retention_blocks,
        block_retention_bytes: if mode.block_retention_blocks == u64::MAX {
            u64::MAX
        } else {
            StoreConfig::default().block_retention_bytes
        },
        sync_each_write: mode.sync_each_write,
        ..StoreConfig::default()
    };
    let store = engine
        .open(dir, config)
        .unwrap_or_else(|error| panic!("{label}: reopen failed: {error}"));
    let last = store.last_height().unwrap();
    assert!(
        last >= durable,
        "{label}: last height {last} below the reported durable {durable}"
    );
    let every = CRASH_SNAPSHOT_EVERY_BLOCKS;
    let durable_due = durable / every * every;

    // Snapshots: the latest one and the one before it, byte for byte.
    let latest = store.latest_snapshot().unwrap();
    let snapshot = latest.as_ref().map_or(0, |(at, _)| *at);
    if let Some((at, content)) = &latest {
        assert_eq!(at % every, 0, "{label}: snapshot at {at}");
        assert!(*at <= last, "{label}: snapshot {at} above the last block {last}");
        assert!(
            *content == snapshot_content(*at),
            "{label}: snapshot {at} content differs"
        );
    }
    assert!(
        snapshot >= durable_due,
        "{label}: snapshot {snapshot} below durable {durable}"
    );
    let oldest_snapshot = if snapshot > every {
        let previous = store.snapshot_at(snapshot - every).unwrap();
        assert!(
            previous == Some(snapshot_content(snapshot - every)),
            "{label}: the snapshot before {snapshot} is missing or differs"
        );
        snapshot - every
    } else {
        snapshot
    };

    // Blocks: contiguous from the first kept one to the last, each exactly as written.
    let first = if mode.block_retention_blocks == u64::MAX {
        1
    } else {
        let mut first = last + 1;
        while first > 1 && store.block(first - 1).unwrap().is_some() {
            first -= 1;
        }
        first
    };
    assert!(
        first == 1 || first - 1 <= oldest_snapshot,
        "{label}: blocks below {first} pruned but the oldest snapshot is {oldest_snapshot}"
    );
    assert!(
        first <= last || last == snapshot,
        "{label}: no block at the last height {last}"
    );
    let mut next = first;
    while next <= last {
        let run = store.blocks(next, 64, 8 << 20).unwrap();
        assert!(
            !run.is_empty(),
            "{label}: block {next} missing (blocks {first}..={last} expected)"
        );
        for (height, content) in run {
            assert_eq!(height, next);
            assert!(
                content == block_content(height),
                "{label}: block {height} content differs"
            );
            next += 1;
        }
    }
    assert_eq!(next, last + 1, "{label}: blocks beyond the last height");

    // Records: written in order after each snapshot (view, msg/<s>, delete msg/<s - 30>).
    let view = match store.records(b"view").unwrap().as_slice() {
        [] => 0,
        [(key, value)] if key == b"view" => u64::from_be_bytes(value.as_slice().try_into().unwrap()),
        other => panic!("{label}: unexpected view records {other:?}"),
    };
    assert!(
        view == snapshot || view + every == snapshot,
        "{label}: view {view} with snapshot {snapshot}"
    );
    assert!(
        view >= durable_due,
        "{label}: view {view} below durable {durable}"
    );
    let messages = store.records(b"msg/").unwrap();
    let mut present = Vec::new();
    for (key, value) in &messages {
        let at = u64::from_be_bytes(key[4..].try_into().unwrap());
        assert_eq!(*key, record_key(at));
        assert!(*value == record_content(at), "{label}: record msg/{at} differs");
        assert!(
            at + 3 * every >= view && at <= view,
            "{label}: record msg/{at} with view {view}"
        );
        present.push(at);
    }
    for required in [view.saturating_sub(2 * every), view.saturating_sub(every)] {
        if required > 0 {
            assert!(
                present.contains(&required),
                "{label}: record msg/{required} missing (view {view})"
            );
        }
    }
    last
}

fn crash_test(engine: Engine) {
    let seed = seed();
    eprintln!("store crash test {}: HOARD_CRASH_SEED={seed}", engine.name());
    let mut random = seed | 1;
    let started = Instant::now();
    let mut kills_while_writing = 0;
    let mut heights = Vec::new();
    for dir_index in 0..DIRS_PER_ENGINE {
        let dir = tempfile::tempdir().unwrap();
        let mode = mode_of(dir_index);
        let mut durable_max = 0;
        let mut last = 0;
        for crash in 0..CRASHES_PER_DIR {
            // The first kill of a directory lands early, often while the store is being created.
            let window_ms = if crash == 0 {
                CREATION_KILL_AFTER_MS_MAX
            } else {
                KILL_AFTER_MS_MAX
            };
            let kill_after = Duration::from_millis(next_random(&mut random) % window_ms + 1);
            let (durable, start) = run_child_and_kill(engine, dir.path(), &mode, kill_after, crash == 0);
            if start != u64::MAX {
                assert_eq!(
                    start, last,
                    "the child started from {start}, the store had {last}"
                );
            }
            if durable > start && start != u64::MAX {
                kills_while_writing += 1;
            }
            durable_max = durable_max.max(durable);
            let label = format!(
                "{} seed {seed} dir {dir_index} crash {crash} (killed after {kill_after:?})",
                engine.name()
            );
            last = verify(engine, dir.path(), &mode, durable_max, &label);
        }
        heights.push(last);
    }
    eprintln!(
        "store crash test {}: {} kills, {kills_while_writing} after writes were reported durable, final heights \
         {heights:?}, {:?}",
        engine.name(),
        DIRS_PER_ENGINE * CRASHES_PER_DIR,
        started.elapsed()
    );
    assert!(
        kills_while_writing >= DIRS_PER_ENGINE * CRASHES_PER_DIR / 2,
        "most kills must land after the child wrote something"
    );
}

#[test]
fn sled_survives_sigkill_at_any_moment() {
    crash_test(Engine::Sled);
}

#[test]
fn redb_survives_sigkill_at_any_moment() {
    crash_test(Engine::Redb);
}
