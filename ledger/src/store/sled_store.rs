//! [`SledStore`]: the production engine, one `sled::Db` with three trees (`blocks`, `snapshots`,
//! `records`). Keys of blocks and snapshots are big-endian heights; every value is a checksummed frame.
//!
//! Atomicity: one block or record is one `insert`, a batch of blocks or a snapshot with its evictions is
//! one `apply_batch` on one tree; sled recovers a prefix of its log after a crash, so a write present
//! after a crash implies every earlier write is present. `sync` = `Db::flush` (see the module
//! documentation of `store` for what that survives).

use std::path::Path;

use super::frame::{self, Kind};
use super::{
    check_append_batch, check_record, check_size, prune_limit, BlockSizes, Durability, Result, Store,
    StoreConfig, Survives, BLOCK_BYTES_MAX, SNAPSHOTS_KEPT_COUNT, SNAPSHOT_BYTES_MAX,
};

/// The sled database's directory inside the store's directory.
pub const SLED_DIR_NAME: &str = "sled";
const TREE_NAMES: [&str; 3] = ["blocks", "snapshots", "records"];

/// The ledger store on sled 0.34.
pub struct SledStore {
    db: sled::Db,
    blocks: sled::Tree,
    snapshots: sled::Tree,
    records: sled::Tree,
    config: StoreConfig,
    /// Stored size of each block, for the byte retention, and the last block's height.
    sizes: BlockSizes,
    /// Heights of the kept snapshots, ascending (at most [`SNAPSHOTS_KEPT_COUNT`]).
    snapshot_heights: Vec<u64>,
}

impl SledStore {
    /// Opens (or creates, atomically) the store in directory `dir` (sled's files in `dir/sled`).
    pub fn open(dir: &Path, config: StoreConfig) -> Result<SledStore> {
        let path = dir.join(SLED_DIR_NAME);
        super::create_atomically(&path, |creating| {
            let db = open_sled(creating, config.cache_bytes)?;
            for tree in TREE_NAMES {
                db.open_tree(tree)?;
            }
            db.flush()?;
            Ok(())
        })?;
        let db = open_sled(&path, config.cache_bytes)?;
        let [blocks, snapshots, records] = TREE_NAMES.map(|name| db.open_tree(name));
        let (blocks, snapshots, records) = (blocks?, snapshots?, records?);
        let mut sizes = BlockSizes::default();
        for entry in blocks.iter() {
            let (key, stored) = entry?;
            sizes.push(frame::key_height("block", &key)?, stored.len());
        }
        let mut snapshot_heights = Vec::with_capacity(SNAPSHOTS_KEPT_COUNT + 1);
        for key in snapshots.iter().keys() {
            snapshot_heights.push(frame::key_height("snapshot", &key?)?);
        }
        let store = SledStore {
            db,
            blocks,
            snapshots,
            records,
            config,
            sizes,
            snapshot_heights,
        };
        tracing::debug!(dir = %dir.display(), last_height = store.last_height()?, "sled store opened");
        Ok(store)
    }

    /// The underlying database, for tests that corrupt it on purpose.
    #[cfg(test)]
    pub(crate) fn raw_blocks(&self) -> &sled::Tree {
        &self.blocks
    }

    fn after_write(&mut self) -> Result<()> {
        if self.config.sync_each_write {
            self.db.flush()?;
        }
        Ok(())
    }
}

/// How long [`open_sled`] waits for a lock still held by a dropped `sled::Db` of this process.
const SLED_LOCK_WAIT_MS_MAX: u64 = 5_000;
const SLED_LOCK_RETRY_MS: u64 = 5;

/// Opens sled at `path`, working around two sled 0.34.7 behaviours seen in the crash test:
/// - Dropping a `sled::Db` returns before sled's background threads let go of the file lock, so an
///   immediate reopen in the same process fails with "could not acquire lock": retry for a while.
/// - Sled writes a snapshot of its page table at every open, as `snap.<lsn>.generating`, then fsyncs
///   and renames it to `snap.<lsn>`; but it picks the latest `snap.*` file including `.generating`
///   ones, so a process killed while writing one leaves a store that fails to open with "Read
///   corrupted data at file offset None" (sled issue #1527). A `.generating` file is never the
///   authoritative snapshot (the previous `snap.<lsn>` is removed only after the rename), so on that
///   error, once sled held the lock, remove them and open again.
fn open_sled(path: &Path, cache_bytes: u64) -> Result<sled::Db> {
    let started = std::time::Instant::now();
    let mut repaired = false;
    loop {
        match sled::Config::new().path(path).cache_capacity(cache_bytes).open() {
            Ok(db) => return Ok(db),
            Err(sled::Error::Io(error))
                if error.to_string().contains("could not acquire lock")
                    && started.elapsed() < std::time::Duration::from_millis(SLED_LOCK_WAIT_MS_MAX) =>
            {
                std::thread::sleep(std::time::Duration::from_millis(SLED_LOCK_RETRY_MS));
            }
            Err(error @ sled::Error::Corruption { .. }) if !repaired => {
                repaired = true;
                let removed = remove_unfinished_snapshots(path)?;
                if removed == 0 {
                    return Err(error.into());
                }
                tracing::warn!(path = %path.display(), removed, "removed sled's unfinished snapshot files");
            }
            Err(error) => return Err(error.into()),
        }
    }
}

/// Removes sled's `snap.*.generating` files in `path`; returns how many.
fn remove_unfinished_snapshots(path: &Path) -> Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            std::fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    if removed > 0 {
        std::fs::File::open(path)?.sync_all()?;
    }
    Ok(removed)
}

impl Store for SledStore {
    fn append_block(&mut self, height: u64, block: &[u8]) -> Result<()> {
        let last = self.last_height()?;
        assert_eq!(height, last + 1, "append_block: block {height} after {last}");
        check_size("block", block.len(), BLOCK_BYTES_MAX)?;
        let key = frame::height_key(height);
        let stored = frame::encode(Kind::Block, &key, block);
        let len = stored.len();
        self.blocks.insert(key, stored)?;
        self.sizes.push(height, len);
        self.after_write()
    }

    fn append_blocks(&mut self, blocks: &[(u64, Vec<u8>)]) -> Result<()> {
        check_append_batch(self.last_height()?, blocks)?;
        let mut batch = sled::Batch::default();
        let mut lens = Vec::with_capacity(blocks.len());
        for (height, block) in blocks {
            let key = frame::height_key(*height);
            let stored = frame::encode(Kind::Block, &key, block);
            lens.push((*height, stored.len()));
            batch.insert(&key[..], stored);
        }
        self.blocks.apply_batch(batch)?;
        for (height, len) in lens {
            self.sizes.push(height, len);
        }
        self.after_write()
    }

    fn block(&self, height: u64) -> Result<Option<Vec<u8>>> {
        let key = frame::height_key(height);
        match self.blocks.get(key)? {
            Some(stored) => Ok(Some(frame::decode(Kind::Block, &key, &stored, height)?.to_vec())),
            None => Ok(None),
        }
    }

    fn blocks(&self, from: u64, max_count: usize, max_bytes: usize) -> Result<Vec<(u64, Vec<u8>)>> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for entry in self.blocks.range(frame::height_key(from)..) {
            if out.len() >= max_count {
                break;
            }
            let (key, stored) = entry?;
            let height = frame::key_height("block", &key)?;
            if height != from + out.len() as u64 {
                break;
            }
            let payload = frame::decode(Kind::Block, &key, &stored, height)?;
            if !out.is_empty() && bytes + payload.len() > max_bytes {
                break;
            }
            bytes += payload.len();
            out.push((height, payload.to_vec()));
        }
        Ok(out)
    }

    fn last_height(&self) -> Result<u64> {
        Ok(self.sizes.last_height(&self.snapshot_heights))
    }

    fn put_snapshot(&mut self, height: u64, snapshot: &[u8]) -> Result<()> {
        assert!(height >= 1, "put_snapshot: height 0");
        check_size("snapshot", snapshot.len(), SNAPSHOT_BYTES_MAX)?;
        let mut heights = self.snapshot_heights.clone();
        let latest = heights.last().copied().unwrap_or(0);
        assert!(
            height >= latest,
            "put_snapshot: snapshot {height} below the latest {latest}"
        );
        let key = frame::height_key(height);
        let mut batch = sled::Batch::default();
        batch.insert(&key[..], frame::encode(Kind::Snapshot, &key, snapshot));
        if height != latest {
            heights.push(height);
        }
        let evicted = heights.len().saturating_sub(SNAPSHOTS_KEPT_COUNT);
        for old in &heights[..evicted] {
            batch.remove(&frame::height_key(*old)[..]);
        }
        self.snapshots.apply_batch(batch)?;
        heights.drain(..evicted);
        self.snapshot_heights = heights;
        self.after_write()?;
        self.prune_blocks_below(u64::MAX)
    }

    fn latest_snapshot(&self) -> Result<Option<(u64, Vec<u8>)>> {
        match self.snapshots.last()? {
            Some((key, stored)) => {
                let height = frame::key_height("snapshot", &key)?;
                Ok(Some((
                    height,
                    frame::decode(Kind::Snapshot, &key, &stored, height)?.to_vec(),
                )))
            }
            None => Ok(None),
        }
    }

    fn snapshot_at(&self, height: u64) -> Result<Option<Vec<u8>>> {
        let key = frame::height_key(height);
        match self.snapshots.get(key)? {
            Some(stored) => Ok(Some(
                frame::decode(Kind::Snapshot, &key, &stored, height)?.to_vec(),
            )),
            None => Ok(None),
        }
    }

    fn prune_blocks_below(&mut self, height: u64) -> Result<()> {
        let oldest_snapshot = self.snapshot_heights.first().copied();
        let limit = prune_limit(
            height,
            self.last_height()?,
            oldest_snapshot,
            self.config.block_retention_blocks,
            self.sizes.over_budget(self.config.block_retention_bytes),
        );
        if limit == 0 {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        let mut count = 0u64;
        for key in self.blocks.range(..=frame::height_key(limit)).keys() {
            batch.remove(key?);
            count += 1;
        }
        if count == 0 {
            return Ok(());
        }
        self.blocks.apply_batch(batch)?;
        self.sizes.pruned_through(limit);
        tracing::debug!(
            limit,
            count,
            retained_bytes = self.sizes.bytes(),
            "sled store pruned blocks"
        );
        self.after_write()
    }

    fn put_record(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        check_record(key, Some(value))?;
        self.records
            .insert(key, frame::encode(Kind::Record, key, value))?;
        self.after_write()
    }

    fn delete_record(&mut self, key: &[u8]) -> Result<()> {
        check_record(key, None)?;
        self.records.remove(key)?;
        self.after_write()
    }

    fn records(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        for entry in self.records.scan_prefix(prefix) {
            let (key, stored) = entry?;
            out.push((
                key.to_vec(),
                frame::decode(Kind::Record, &key, &stored, 0)?.to_vec(),
            ));
        }
        Ok(out)
    }

    fn sync(&mut self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }

    fn durability(&self) -> Durability {
        let write = if self.config.sync_each_write {
            Survives::ProcessKill
        } else {
            Survives::Nothing
        };
        Durability {
            write,
            sync: Survives::ProcessKill,
        }
    }
}
