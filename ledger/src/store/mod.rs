//! The ledger's durable storage, behind one narrow trait: [`Store`].
//!
//! Layout:
//! - this file: the [`Store`] trait, [`StoreConfig`], [`Durability`], [`StoreError`], the store's limits.
//! - `frame`: the checksummed frame every stored value is wrapped in (checked right before a write and
//!   right after a read).
//! - [`redb_store`]: [`RedbStore`], redb 4 (one file, three tables): a replica's default engine.
//! - [`sled_store`]: [`SledStore`], sled 0.34 (one `sled::Db`, three trees), selectable per replica
//!   (`engine = "sled"` in the node file). redb is the default because of figures: in the 4-process
//!   chain benchmark sled's background work put 50-600 ms stalls into the commit latency's tail
//!   that redb did not (BENCHMARKS.md, "The store engine"), and redb's sync survives power loss.
//!   [`Engine::open`] refuses a directory that holds the other engine's store.
//! - [`mem`]: [`MemStore`], in memory for the simulator, with [`MemStore::crash`] dropping unsynced writes.
//! - [`bench`](mod@bench): durable append throughput of any engine, for the ledger benchmark.
//! - [`testkit`]: deterministic block, snapshot and record content for the crash test.
//!
//! # What is stored
//!
//! - The append-only block log: block `h` (h = PBFT sequence number, contiguous from 1) as opaque bytes
//!   the caller encoded. One storage write per block, whatever the number of events in it.
//! - State snapshots taken at checkpoints; the latest two are kept. A restart loads the latest snapshot and
//!   replays the blocks after it.
//! - Consensus records (view number, the replica's own signed messages), opaque values keyed by bytes.
//!
//! Every value is stored as a frame `version (1) | kind (1) | checksum (8) | payload`, where the checksum
//! is the first 8 bytes of SHA-256 over a domain, the kind, the key and the payload. A value read under
//! the wrong key, a torn value or a flipped bit is a [`StoreError::Corrupt`], never a wrong value.
//!
//! # What a returned write survives (strace on this machine, 2026-11-24)
//!
//! [`Store::durability`] returns this per engine. `ProcessKill` = the process is killed (kill -9, panic,
//! OOM) but the kernel keeps running; `PowerLoss` = the machine loses power or the kernel crashes.
//! Observed with `strace -f -e trace=fsync,fdatasync,sync_file_range,msync,pwrite64,write` on
//! `hoard-store-crash-child` appending 3 blocks, each followed by `sync()`:
//!
//! - **sled 0.34.7** (`SledStore`): a write that returned sits in sled's in-memory log buffer (nothing
//!   reached the kernel); sled's background flusher writes it within `flush_every_ms` (500 ms default),
//!   so a kill -9 can lose the writes of the last ~0.5 s, but never half a write. `sync()` =
//!   `Db::flush()`, which was seen doing exactly one `pwrite64` + one
//!   `sync_file_range(fd, off, len, SYNC_FILE_RANGE_WAIT_BEFORE|SYNC_FILE_RANGE_WRITE|SYNC_FILE_RANGE_WAIT_AFTER)`
//!   on the `db` file per block, and no `fsync`/`fdatasync`. `fsync` on `db` came only at open, from
//!   sled's flusher thread (once per `flush_every_ms` at most) and at drop. `sync_file_range` starts and
//!   waits for the write-back of those pages but neither writes the file's metadata (the size of a
//!   growing file) nor flushes the device's cache: a synced write survives a killed process, and power
//!   loss only once the flusher's next `fsync` ran (about 0.5 s later). Values over ~128 KiB (sled's
//!   blob threshold: 512 KiB segments / 4) go to files under `sled/blobs/` written with plain `write(2)`
//!   at insert time and never synced by sled at all (strace: `write(4, ..., 290902)`, no sync on fd 4):
//!   they survive a killed process (the page cache has them) and nothing stronger, even after the
//!   flusher's `fsync` of `db`. → `Durability { write: Nothing, sync: ProcessKill }`.
//! - **redb 4.6** (`RedbStore`): each write is one redb transaction. With
//!   [`StoreConfig::sync_each_write`] it commits with `redb::Durability::Immediate`: strace showed one
//!   `fdatasync` per commit (two for the very first commit of a file), after the page writes and the
//!   320-byte header write. Without it, writes commit with `redb::Durability::None` (atomic, not
//!   durable) and `sync()` commits an empty `Immediate` transaction: again one `fdatasync` per block. A
//!   returned `Immediate` commit survives power loss if the disk honours flushes.
//!   → `{ write: PowerLoss, sync: PowerLoss }` or `{ write: Nothing, sync: PowerLoss }`.
//! - **MemStore**: nothing survives a real crash; [`MemStore::crash`] simulates one and keeps exactly
//!   what was synced. → `{ write: Nothing, sync: ProcessKill }` (in the simulator's sense).
//!
//! Engine files are created atomically (built under `<name>.creating`, then renamed), so a process
//! killed while creating a store leaves nothing half-made (redb otherwise fails with "magic number
//! mismatch"). `SledStore::open` also works around two sled 0.34.7 crash behaviours found by the crash
//! test (see `open_sled` in `sled_store.rs`): a leftover `snap.*.generating` file made sled refuse to open.
//!
//! In every engine each single call (`append_block`, `append_blocks`, `put_snapshot`, `put_record`,
//! `delete_record`) is atomic: after a crash it is either entirely there or entirely absent, and the
//! engines keep write order (a write present after a crash implies every earlier write of the same store
//! is present), which `tests/store_crash.rs` checks for sled and redb with SIGKILL.

pub mod bench;
mod frame;
pub mod mem;
pub mod redb_store;
pub mod sled_store;
pub mod testkit;

#[cfg(test)]
mod conformance;

use std::path::Path;

pub use mem::MemStore;
pub use redb_store::RedbStore;
pub use sled_store::SledStore;

/// Largest block the store accepts, in bytes (10,000 events of a few hundred bytes fit many times).
pub const BLOCK_BYTES_MAX: usize = 64 << 20;
/// Largest snapshot the store accepts, in bytes.
pub const SNAPSHOT_BYTES_MAX: usize = 1 << 30;
/// Largest consensus record key, in bytes.
pub const RECORD_KEY_BYTES_MAX: usize = 1024;
/// Largest consensus record value, in bytes (a view-change message with its certificates).
pub const RECORD_VALUE_BYTES_MAX: usize = hoard_pbft::constants::MESSAGE_BYTES_MAX + (4 << 20);

// A record holds one signed consensus message (a view change with its prepared certificates can
// be as large as any message a replica accepts), plus its framing.
const _: () = assert!(RECORD_VALUE_BYTES_MAX > hoard_pbft::constants::MESSAGE_BYTES_MAX);
/// Most blocks in one [`Store::append_blocks`] call.
pub const APPEND_BATCH_BLOCKS_MAX: usize = 4096;
/// Snapshots kept: the latest and the one before it (a fallback if the latest cannot be used).
pub const SNAPSHOTS_KEPT_COUNT: usize = 2;
/// Default number of most recent blocks kept even when a snapshot covers them.
pub const BLOCK_RETENTION_BLOCKS_DEFAULT: u64 = 10_000;
/// Default of [`StoreConfig::block_retention_bytes`].
pub const BLOCK_RETENTION_BYTES_DEFAULT: u64 = 256 * 1024 * 1024;

const _: () = assert!(BLOCK_BYTES_MAX <= SNAPSHOT_BYTES_MAX);
const _: () = assert!(SNAPSHOTS_KEPT_COUNT >= 1);

/// The store's result type.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Every way a store operation can fail.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A stored value failed its checksum, its frame header, or sits under the wrong key.
    /// `height` is the block or snapshot height (0 for a consensus record).
    #[error("corrupt {what} at height {height}")]
    Corrupt { what: &'static str, height: u64 },
    /// A value larger than the store's limit.
    #[error("{what} too large: {bytes} bytes, limit {limit}")]
    TooLarge {
        what: &'static str,
        bytes: usize,
        limit: usize,
    },
    /// sled failed.
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    /// redb failed.
    #[error("redb: {0}")]
    Redb(#[from] redb::Error),
    /// The file system failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The directory holds another engine's store: opening it with this engine would start an
    /// empty store beside the real one (a replica would forget what it signed).
    #[error("the directory holds a {found} store, not {wanted}")]
    OtherEngine {
        found: &'static str,
        wanted: &'static str,
    },
}

/// How bad a failure a write survives. Ordered from weakest to strongest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Survives {
    /// Lost if the process dies now.
    Nothing,
    /// Survives the process being killed (kill -9, panic); may be lost on power loss or a kernel crash.
    /// For [`MemStore`]: survives [`MemStore::crash`].
    ProcessKill,
    /// Survives power loss, provided the disk honours cache flushes (fdatasync).
    PowerLoss,
}

/// What a store's writes survive: see the module documentation for the measured facts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Durability {
    /// What a write survives as soon as the write call returned, without [`Store::sync`].
    pub write: Survives,
    /// What every write made before a [`Store::sync`] survives once `sync` returned.
    pub sync: Survives,
}

/// Options common to every engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    /// Most recent blocks kept even when a snapshot covers them (history for peers that lag).
    /// Older covered blocks are dropped when a snapshot is put or on [`Store::prune_blocks_below`].
    /// `u64::MAX` keeps every block.
    pub block_retention_blocks: u64,
    /// Most bytes (as stored) of blocks kept below the newest snapshot, whatever
    /// `block_retention_blocks` says: blocks vary from bytes to megabytes, so a count alone bounds
    /// neither the disk nor, with sled (whose memory grows with its data), the replica's memory.
    /// Blocks the oldest kept snapshot needs for replay are always kept.
    pub block_retention_bytes: u64,
    /// Make every write durable before it returns (one sync per write) instead of at [`Store::sync`].
    pub sync_each_write: bool,
    /// The engine's page cache, bytes (sled's and redb's own defaults are 1 GiB, which a replica
    /// filled in minutes under load: the soak run saw each replica grow towards it).
    pub cache_bytes: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            block_retention_blocks: BLOCK_RETENTION_BLOCKS_DEFAULT,
            block_retention_bytes: BLOCK_RETENTION_BYTES_DEFAULT,
            sync_each_write: false,
            cache_bytes: CACHE_BYTES_DEFAULT,
        }
    }
}

/// Default of [`StoreConfig::cache_bytes`].
pub const CACHE_BYTES_DEFAULT: u64 = 64 * 1024 * 1024;

/// The ledger's durable storage: a block log, the latest snapshots, consensus records.
///
/// Heights start at 1; height 0 means "nothing". All reads see every write made before them through
/// the same store, synced or not.
pub trait Store: Send {
    /// Appends block `height`, which must be `last_height() + 1` (asserted: anything else is a bug in
    /// the caller). Atomic: after kill -9 at any moment the store reopens with or without this block,
    /// never half of it. Durable per [`Store::durability`]: once a later `sync()` returned, or at once
    /// with [`StoreConfig::sync_each_write`].
    fn append_block(&mut self, height: u64, block: &[u8]) -> Result<()>;

    /// Appends consecutive blocks (the first must be `last_height() + 1`) as one atomic batch with at
    /// most one sync. At most [`APPEND_BATCH_BLOCKS_MAX`] blocks.
    fn append_blocks(&mut self, blocks: &[(u64, Vec<u8>)]) -> Result<()>;

    /// Block `height`, or `None` if it was never appended or was pruned.
    fn block(&self, height: u64) -> Result<Option<Vec<u8>>>;

    /// The run of consecutive blocks starting exactly at `from`: at most `max_count` blocks and at most
    /// `max_bytes` bytes of block content, except that the first block is returned whatever its size
    /// (so a caller always makes progress). Empty if block `from` is absent or `max_count` is 0.
    fn blocks(&self, from: u64, max_count: usize, max_bytes: usize) -> Result<Vec<(u64, Vec<u8>)>>;

    /// The height the store covers: the highest block, or the latest snapshot's height if higher
    /// (a snapshot installed from a peer). 0 when empty.
    fn last_height(&self) -> Result<u64>;

    /// Stores the state snapshot taken after block `height` (atomic, like a block) and keeps only the
    /// latest [`SNAPSHOTS_KEPT_COUNT`]. `height` must not be below the latest snapshot's (asserted);
    /// equal replaces it. It may be above `last_height()` (a snapshot installed from a peer): the next
    /// block is then `height + 1`. Then drops the blocks the retention lets go (see `prune_blocks_below`).
    fn put_snapshot(&mut self, height: u64, snapshot: &[u8]) -> Result<()>;

    /// The latest snapshot and its height.
    fn latest_snapshot(&self) -> Result<Option<(u64, Vec<u8>)>>;

    /// The snapshot taken at `height`, if still kept.
    fn snapshot_at(&self, height: u64) -> Result<Option<Vec<u8>>>;

    /// Drops the blocks at or below `height`, but never a block above the oldest kept snapshot (both kept
    /// snapshots stay replayable) nor one of the last [`StoreConfig::block_retention_blocks`] blocks.
    fn prune_blocks_below(&mut self, height: u64) -> Result<()>;

    /// Stores a consensus record (atomic; replaces any value under `key`).
    fn put_record(&mut self, key: &[u8], value: &[u8]) -> Result<()>;

    /// Deletes a consensus record (no error if absent).
    fn delete_record(&mut self, key: &[u8]) -> Result<()>;

    /// Every record whose key starts with `prefix`, in key order.
    fn records(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>>;

    /// Makes everything written so far durable, to the level [`Durability::sync`] says.
    fn sync(&mut self) -> Result<()>;

    /// What a returned write and a returned sync survive with this engine and configuration.
    fn durability(&self) -> Durability;
}

/// The storage engines, for configuration files and command lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// [`SledStore`].
    Sled,
    /// [`RedbStore`].
    Redb,
    /// [`MemStore`] (the directory is ignored).
    Mem,
}

impl Engine {
    /// The engine's lower-case name, as [`Engine::parse`] accepts it.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Sled => "sled",
            Engine::Redb => "redb",
            Engine::Mem => "mem",
        }
    }

    /// Parses `sled`, `redb` or `mem`.
    pub fn parse(text: &str) -> Option<Engine> {
        match text {
            "sled" => Some(Engine::Sled),
            "redb" => Some(Engine::Redb),
            "mem" => Some(Engine::Mem),
            _ => None,
        }
    }

    /// The engine whose store directory `dir` holds (by the files each engine creates), if any.
    pub fn detect(dir: &Path) -> Option<Engine> {
        if dir.join(sled_store::SLED_DIR_NAME).exists() {
            Some(Engine::Sled)
        } else if dir.join(redb_store::REDB_FILE_NAME).exists() {
            Some(Engine::Redb)
        } else {
            None
        }
    }

    /// Opens (or creates) a store of this engine in directory `dir`.
    /// Refuses a directory that holds another engine's store ([`StoreError::OtherEngine`]).
    pub fn open(self, dir: &Path, config: StoreConfig) -> Result<Box<dyn Store>> {
        if let Some(found) = Engine::detect(dir).filter(|found| *found != self && self != Engine::Mem) {
            return Err(StoreError::OtherEngine {
                found: found.name(),
                wanted: self.name(),
            });
        }
        Ok(match self {
            Engine::Sled => Box::new(SledStore::open(dir, config)?),
            Engine::Redb => Box::new(RedbStore::open(dir, config)?),
            Engine::Mem => Box::new(MemStore::new(config)),
        })
    }
}

/// Creates an engine's files atomically: if `path` (a file or directory inside the store's directory)
/// does not exist, `create` builds it at `path` + `.creating` (removing a leftover of an earlier
/// attempt), then it is renamed into place and the parent directory synced. A process killed during
/// creation thus leaves either nothing or a complete, initialised store, never a half-written header
/// (redb refuses to open a file killed before its header was written: "magic number mismatch").
fn create_atomically(path: &Path, create: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if path.exists() {
        return Ok(());
    }
    let parent = path.parent().expect("store path has a parent");
    std::fs::create_dir_all(parent)?;
    let mut creating = path.as_os_str().to_owned();
    creating.push(".creating");
    let creating = std::path::PathBuf::from(creating);
    if creating.is_dir() {
        std::fs::remove_dir_all(&creating)?;
    } else if creating.exists() {
        std::fs::remove_file(&creating)?;
    }
    create(&creating)?;
    std::fs::rename(&creating, path)?;
    std::fs::File::open(parent)?.sync_all()?;
    tracing::info!(path = %path.display(), "store created");
    Ok(())
}

/// Checks the limits shared by every engine before anything is written.
fn check_size(what: &'static str, bytes: usize, limit: usize) -> Result<()> {
    if bytes > limit {
        return Err(StoreError::TooLarge { what, bytes, limit });
    }
    Ok(())
}

/// Checks an `append_blocks` batch: bounded, non-empty blocks consecutive from `last + 1`.
fn check_append_batch(last: u64, blocks: &[(u64, Vec<u8>)]) -> Result<()> {
    assert!(
        blocks.len() <= APPEND_BATCH_BLOCKS_MAX,
        "append_blocks: {} blocks",
        blocks.len()
    );
    for (index, (height, block)) in blocks.iter().enumerate() {
        let expected = last + 1 + index as u64;
        assert_eq!(
            *height, expected,
            "append_blocks: block {height} where {expected} was expected"
        );
        check_size("block", block.len(), BLOCK_BYTES_MAX)?;
    }
    Ok(())
}

/// The highest height `prune_blocks_below(height)` may drop, given the kept snapshots' heights:
/// a block goes when either retention lets it go (it is older than the last `retention` blocks,
/// or at or below `over_bytes`, see [`BlockSizes::over_budget`]) and the oldest kept snapshot
/// covers it.
fn prune_limit(
    height: u64,
    last_height: u64,
    oldest_snapshot: Option<u64>,
    retention: u64,
    over_bytes: u64,
) -> u64 {
    let Some(oldest_snapshot) = oldest_snapshot else {
        return 0;
    };
    height
        .min(oldest_snapshot)
        .min(last_height.saturating_sub(retention).max(over_bytes))
}

/// The stored size of every block in a store, oldest first: what the byte retention counts; and the
/// highest block height ever appended.
///
/// Stores keep this (and their snapshots' heights) in memory, updated after each write commits, so
/// that [`Store::last_height`] reads no storage: asking a redb or sled table for its last entry
/// reads that entry's value as well, and the last snapshot is the whole state (on redb, a `pread`
/// of every snapshot byte per call: a quarter of a replica's CPU at 2,000 events/s, measured).
#[derive(Debug, Default)]
pub(crate) struct BlockSizes {
    sizes: std::collections::VecDeque<(u64, u64)>,
    bytes: u64,
    last: u64,
}

impl BlockSizes {
    pub(crate) fn push(&mut self, height: u64, len: usize) {
        debug_assert!(self.sizes.back().is_none_or(|(last, _)| *last < height));
        debug_assert!(height > self.last);
        self.sizes.push_back((height, len as u64));
        self.bytes += len as u64;
        self.last = height;
    }

    /// [`Store::last_height`] of a store with these blocks and snapshots at `snapshot_heights`
    /// (ascending): the highest of the highest block pushed (pruning does not lower it; 0 before
    /// any) and the latest snapshot.
    pub(crate) fn last_height(&self, snapshot_heights: &[u64]) -> u64 {
        self.last.max(snapshot_heights.last().copied().unwrap_or(0))
    }

    /// Forgets the blocks at or below `limit` (they were pruned).
    pub(crate) fn pruned_through(&mut self, limit: u64) {
        while let Some(&(height, len)) = self.sizes.front() {
            if height > limit {
                break;
            }
            self.sizes.pop_front();
            self.bytes -= len;
        }
    }

    /// The highest height that must go for the blocks above it to fit in `budget` bytes (the
    /// newest block always fits); 0 when everything fits.
    pub(crate) fn over_budget(&self, budget: u64) -> u64 {
        if self.bytes <= budget {
            return 0;
        }
        let mut kept = 0u64;
        for (index, (height, len)) in self.sizes.iter().rev().enumerate() {
            kept += len;
            if kept > budget && index > 0 {
                return *height;
            }
        }
        0
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// A record key's limits.
fn check_record(key: &[u8], value: Option<&[u8]>) -> Result<()> {
    check_size("record key", key.len(), RECORD_KEY_BYTES_MAX)?;
    if let Some(value) = value {
        check_size("record value", value.len(), RECORD_VALUE_BYTES_MAX)?;
    }
    Ok(())
}
