//! The child process of the store crash test (`ledger/tests/store_crash.rs`); not for production use.
//!
//! `hoard-store-crash-child <sled|redb> <dir> <sync|each> <retention-blocks> <max-height>` opens the
//! store in `<dir>`, continues the block log from its last height with the deterministic content of
//! `hoard_ledger::store::testkit`, and after every write and sync prints `durable <height>` on stdout.
//! At every multiple of `CRASH_SNAPSHOT_EVERY_BLOCKS` it also puts the snapshot, the record `view`
//! (the snapshot height, big-endian) and the record `msg/<height>`, and deletes `msg/<height - 30>`.
//! `sync` syncs after each step; `each` opens the store with `sync_each_write`. The parent kills it
//! with SIGKILL at a random moment; it stops by itself at `<max-height>`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};
use hoard_ledger::store::testkit::{
    block_content, next_random, record_content, record_key, snapshot_content, CRASH_SNAPSHOT_EVERY_BLOCKS,
};
use hoard_ledger::store::{Engine, Store, StoreConfig};

fn main() -> anyhow::Result<()> {
    let arguments: Vec<String> = std::env::args().collect();
    if arguments.len() != 6 {
        bail!("usage: hoard-store-crash-child <sled|redb|mem> <dir> <sync|each> <retention> <max-height>");
    }
    let engine = Engine::parse(&arguments[1]).context("engine")?;
    let dir = PathBuf::from(&arguments[2]);
    let sync_each_write = match arguments[3].as_str() {
        "sync" => false,
        "each" => true,
        other => bail!("mode {other}"),
    };
    let block_retention_blocks: u64 = arguments[4].parse().context("retention")?;
    let max_height: u64 = arguments[5].parse().context("max height")?;
    let mut store = engine.open(
        &dir,
        StoreConfig {
            block_retention_blocks,
            // "Keep every block" (u64::MAX) keeps them whatever their bytes too.
            block_retention_bytes: if block_retention_blocks == u64::MAX {
                u64::MAX
            } else {
                StoreConfig::default().block_retention_bytes
            },
            sync_each_write,
            ..StoreConfig::default()
        },
    )?;
    let mut stdout = std::io::stdout().lock();
    let mut height = store.last_height()?;
    let mut random = height.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1;
    writeln!(stdout, "start {height}")?;
    stdout.flush()?;
    // A crash may have hit between a block at a multiple and its snapshot, or between the snapshot and
    // its records: catch up first (idempotent).
    if !snapshot_if_due(store.as_mut(), height)? {
        if let Some((latest, _)) = store.latest_snapshot()? {
            put_records(store.as_mut(), latest)?;
        }
    }
    while height < max_height {
        let count = if next_random(&mut random).is_multiple_of(4) {
            1 + next_random(&mut random) % 4
        } else {
            1
        };
        let count = count.min(max_height - height);
        if count == 1 {
            store.append_block(height + 1, &block_content(height + 1))?;
        } else {
            let blocks: Vec<(u64, Vec<u8>)> = (height + 1..=height + count)
                .map(|next| (next, block_content(next)))
                .collect();
            store.append_blocks(&blocks)?;
        }
        height += count;
        snapshot_if_due(store.as_mut(), height)?;
        store.sync()?;
        writeln!(stdout, "durable {height}")?;
        stdout.flush()?;
    }
    Ok(())
}

/// Puts the snapshot and records of the latest multiple of the snapshot interval at or below `height`,
/// if not done yet. Returns whether it did.
fn snapshot_if_due(store: &mut dyn Store, height: u64) -> anyhow::Result<bool> {
    let due = height / CRASH_SNAPSHOT_EVERY_BLOCKS * CRASH_SNAPSHOT_EVERY_BLOCKS;
    let latest = store.latest_snapshot()?.map_or(0, |(at, _)| at);
    if due == 0 || due <= latest {
        return Ok(false);
    }
    store.put_snapshot(due, &snapshot_content(due))?;
    put_records(store, due)?;
    Ok(true)
}

/// The records written after the snapshot at `due`, in this order.
fn put_records(store: &mut dyn Store, due: u64) -> anyhow::Result<()> {
    store.put_record(b"view", &due.to_be_bytes())?;
    store.put_record(&record_key(due), &record_content(due))?;
    if let Some(old) = due.checked_sub(3 * CRASH_SNAPSHOT_EVERY_BLOCKS) {
        store.delete_record(&record_key(old))?;
    }
    Ok(())
}
