//! Durable append throughput of a store, for the ledger benchmark (sled vs redb side by side).
//!
//! Each append is one block followed by [`Store::sync`], the pattern a replica uses when a block must be
//! durable before it acknowledges it.

use std::path::Path;
use std::time::{Duration, Instant};

use super::{Engine, Result, Store, StoreConfig};

/// Largest benchmark block, in bytes.
pub const BENCH_BLOCK_BYTES_MAX: usize = super::BLOCK_BYTES_MAX;

/// The result of one [`durable_appends`] run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AppendThroughput {
    /// Blocks appended, each made durable before the next.
    pub appends: u64,
    /// Bytes per block.
    pub block_bytes: usize,
    /// Wall time of the whole run.
    pub elapsed: Duration,
    /// `appends / elapsed`.
    pub appends_per_second: f64,
    /// `appends * block_bytes / elapsed`.
    pub bytes_per_second: f64,
}

/// Appends `count` blocks of `block_bytes` pseudo-random bytes after `store.last_height()`, calling
/// `sync` after each one, and measures the rate.
pub fn durable_appends(store: &mut dyn Store, block_bytes: usize, count: u64) -> Result<AppendThroughput> {
    assert!(
        block_bytes <= BENCH_BLOCK_BYTES_MAX,
        "durable_appends: block of {block_bytes} bytes"
    );
    let mut block = incompressible_bytes(block_bytes);
    let first = store.last_height()? + 1;
    let start = Instant::now();
    for height in first..first + count {
        // Differ from block to block so that no engine can deduplicate.
        let stamp = height.to_le_bytes();
        let stamped = stamp.len().min(block.len());
        block[..stamped].copy_from_slice(&stamp[..stamped]);
        store.append_block(height, &block)?;
        store.sync()?;
    }
    let elapsed = start.elapsed();
    let seconds = elapsed.as_secs_f64().max(f64::MIN_POSITIVE);
    Ok(AppendThroughput {
        appends: count,
        block_bytes,
        elapsed,
        appends_per_second: count as f64 / seconds,
        bytes_per_second: (count as f64 * block_bytes as f64) / seconds,
    })
}

/// Runs [`durable_appends`] on a fresh store of each engine, each in its own new directory under
/// `parent` (removed afterwards), with the default configuration.
pub fn compare_engines(
    parent: &Path,
    engines: &[Engine],
    block_bytes: usize,
    count: u64,
) -> Result<Vec<(Engine, AppendThroughput)>> {
    let mut results = Vec::with_capacity(engines.len());
    for engine in engines {
        let dir = tempfile::Builder::new()
            .prefix(engine.name())
            .tempdir_in(parent)?;
        let mut store = engine.open(dir.path(), StoreConfig::default())?;
        let throughput = durable_appends(store.as_mut(), block_bytes, count)?;
        tracing::info!(
            engine = engine.name(),
            block_bytes,
            count,
            appends_per_second = throughput.appends_per_second,
            "durable append throughput"
        );
        results.push((*engine, throughput));
    }
    Ok(results)
}

/// `length` bytes from a fixed xorshift stream (deterministic, not compressible).
fn incompressible_bytes(length: usize) -> Vec<u8> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    (0..length)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durable_appends_counts_and_stores_every_block() {
        let mut store = super::super::MemStore::new(StoreConfig::default());
        let result = durable_appends(&mut store, 1000, 20).unwrap();
        assert_eq!(result.appends, 20);
        assert!(result.appends_per_second > 0.0);
        assert_eq!(store.last_height().unwrap(), 20);
        assert_eq!(store.block(20).unwrap().unwrap().len(), 1000);
        let dir = tempfile::tempdir().unwrap();
        let results = compare_engines(dir.path(), &[Engine::Sled, Engine::Redb], 100, 5).unwrap();
        assert_eq!(results.len(), 2);
        assert!(results.iter().all(|(_, throughput)| throughput.appends == 5));
    }
}
