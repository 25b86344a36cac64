//! [`MemStore`]: the ledger store in memory, for the simulator and tests.
//!
//! It models a disk with a write cache: every write lands in the "current" state at once and in the
//! "durable" state at the next [`Store::sync`] (or at once with [`StoreConfig::sync_each_write`]).
//! [`MemStore::crash`] throws the current state away and goes back to the durable one, as a power cut
//! would. Clones share one disk, so a simulator keeps a clone, drops the replica that owned the store,
//! crashes the disk and hands a clone to the restarted replica. Values are stored as the same
//! checksummed frames as on disk, so [`MemStore::corrupt_block`] exercises the real detection path.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::frame::{self, Kind};
use super::{
    check_append_batch, check_record, check_size, prune_limit, BlockSizes, Durability, Result, Store,
    StoreConfig, Survives, BLOCK_BYTES_MAX, SNAPSHOTS_KEPT_COUNT, SNAPSHOT_BYTES_MAX,
};

type Frame = Arc<[u8]>;

#[derive(Clone, Default)]
struct State {
    blocks: BTreeMap<u64, Frame>,
    snapshots: BTreeMap<u64, Frame>,
    records: BTreeMap<Vec<u8>, Frame>,
}

/// One atomic write, kept until it is synced.
enum Operation {
    PutBlocks(Vec<(u64, Frame)>),
    PutSnapshot {
        height: u64,
        stored: Frame,
        evicted: Vec<u64>,
    },
    RemoveBlocksThrough(u64),
    PutRecord(Vec<u8>, Frame),
    DeleteRecord(Vec<u8>),
}

impl State {
    fn apply(&mut self, operation: &Operation) {
        match operation {
            Operation::PutBlocks(blocks) => {
                for (height, stored) in blocks {
                    self.blocks.insert(*height, stored.clone());
                }
            }
            Operation::PutSnapshot {
                height,
                stored,
                evicted,
            } => {
                self.snapshots.insert(*height, stored.clone());
                for old in evicted {
                    self.snapshots.remove(old);
                }
            }
            Operation::RemoveBlocksThrough(limit) => {
                self.blocks = self.blocks.split_off(&limit.saturating_add(1));
            }
            Operation::PutRecord(key, stored) => {
                self.records.insert(key.clone(), stored.clone());
            }
            Operation::DeleteRecord(key) => {
                self.records.remove(key);
            }
        }
    }

    fn last_height(&self) -> u64 {
        let last_block = self.blocks.keys().next_back().copied().unwrap_or(0);
        let last_snapshot = self.snapshots.keys().next_back().copied().unwrap_or(0);
        last_block.max(last_snapshot)
    }
}

#[derive(Default)]
struct Disk {
    current: State,
    durable: State,
    unsynced: Vec<Operation>,
}

/// The ledger store in memory; clones share one simulated disk.
#[derive(Clone)]
pub struct MemStore {
    disk: Arc<Mutex<Disk>>,
    config: StoreConfig,
}

impl MemStore {
    /// An empty store.
    pub fn new(config: StoreConfig) -> MemStore {
        MemStore {
            disk: Arc::new(Mutex::new(Disk::default())),
            config,
        }
    }

    /// Simulates a crash of the machine: every write not yet synced is lost. Affects every clone.
    pub fn crash(&self) {
        let mut disk = self.lock();
        let lost = disk.unsynced.len();
        disk.current = disk.durable.clone();
        disk.unsynced.clear();
        tracing::debug!(lost, "mem store crashed");
    }

    /// Simulates a bit flip in block `height`, both in the current and the durable state.
    /// Returns false if there is no such block.
    pub fn corrupt_block(&self, height: u64) -> bool {
        let mut disk = self.lock();
        let mut found = false;
        let Disk { current, durable, .. } = &mut *disk;
        for state in [current, durable] {
            if let Some(stored) = state.blocks.get_mut(&height) {
                let mut bytes = stored.to_vec();
                let last = bytes.len() - 1;
                bytes[last] ^= 0x01;
                *stored = bytes.into();
                found = true;
            }
        }
        found
    }

    fn lock(&self) -> MutexGuard<'_, Disk> {
        self.disk.lock().expect("mem store mutex poisoned by a panic")
    }

    fn write(&self, operation: Operation) {
        let mut disk = self.lock();
        disk.current.apply(&operation);
        if self.config.sync_each_write {
            disk.durable.apply(&operation);
        } else {
            disk.unsynced.push(operation);
        }
    }
}

impl Store for MemStore {
    fn append_block(&mut self, height: u64, block: &[u8]) -> Result<()> {
        let last = self.last_height()?;
        assert_eq!(height, last + 1, "append_block: block {height} after {last}");
        check_size("block", block.len(), BLOCK_BYTES_MAX)?;
        let stored = frame::encode(Kind::Block, &frame::height_key(height), block);
        self.write(Operation::PutBlocks(vec![(height, stored.into())]));
        Ok(())
    }

    fn append_blocks(&mut self, blocks: &[(u64, Vec<u8>)]) -> Result<()> {
        check_append_batch(self.last_height()?, blocks)?;
        let stored = blocks
            .iter()
            .map(|(height, block)| {
                (
                    *height,
                    frame::encode(Kind::Block, &frame::height_key(*height), block).into(),
                )
            })
            .collect();
        self.write(Operation::PutBlocks(stored));
        Ok(())
    }

    fn block(&self, height: u64) -> Result<Option<Vec<u8>>> {
        let disk = self.lock();
        let Some(stored) = disk.current.blocks.get(&height) else {
            return Ok(None);
        };
        Ok(Some(
            frame::decode(Kind::Block, &frame::height_key(height), stored, height)?.to_vec(),
        ))
    }

    fn blocks(&self, from: u64, max_count: usize, max_bytes: usize) -> Result<Vec<(u64, Vec<u8>)>> {
        let disk = self.lock();
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for (height, stored) in disk.current.blocks.range(from..) {
            if out.len() >= max_count || *height != from + out.len() as u64 {
                break;
            }
            let payload = frame::decode(Kind::Block, &frame::height_key(*height), stored, *height)?;
            if !out.is_empty() && bytes + payload.len() > max_bytes {
                break;
            }
            bytes += payload.len();
            out.push((*height, payload.to_vec()));
        }
        Ok(out)
    }

    fn last_height(&self) -> Result<u64> {
        Ok(self.lock().current.last_height())
    }

    fn put_snapshot(&mut self, height: u64, snapshot: &[u8]) -> Result<()> {
        assert!(height >= 1, "put_snapshot: height 0");
        check_size("snapshot", snapshot.len(), SNAPSHOT_BYTES_MAX)?;
        let mut heights: Vec<u64> = self.lock().current.snapshots.keys().copied().collect();
        let latest = heights.last().copied().unwrap_or(0);
        assert!(
            height >= latest,
            "put_snapshot: snapshot {height} below the latest {latest}"
        );
        if height != latest {
            heights.push(height);
        }
        let evicted = heights[..heights.len().saturating_sub(SNAPSHOTS_KEPT_COUNT)].to_vec();
        let stored = frame::encode(Kind::Snapshot, &frame::height_key(height), snapshot).into();
        self.write(Operation::PutSnapshot {
            height,
            stored,
            evicted,
        });
        self.prune_blocks_below(u64::MAX)
    }

    fn latest_snapshot(&self) -> Result<Option<(u64, Vec<u8>)>> {
        let disk = self.lock();
        let Some((height, stored)) = disk.current.snapshots.iter().next_back() else {
            return Ok(None);
        };
        let payload = frame::decode(Kind::Snapshot, &frame::height_key(*height), stored, *height)?;
        Ok(Some((*height, payload.to_vec())))
    }

    fn snapshot_at(&self, height: u64) -> Result<Option<Vec<u8>>> {
        let disk = self.lock();
        let Some(stored) = disk.current.snapshots.get(&height) else {
            return Ok(None);
        };
        Ok(Some(
            frame::decode(Kind::Snapshot, &frame::height_key(height), stored, height)?.to_vec(),
        ))
    }

    fn prune_blocks_below(&mut self, height: u64) -> Result<()> {
        let (last, oldest_snapshot, first_block, sizes) = {
            let disk = self.lock();
            let state = &disk.current;
            let mut sizes = BlockSizes::default();
            for (height, stored) in &state.blocks {
                sizes.push(*height, stored.len());
            }
            (
                state.last_height(),
                state.snapshots.keys().next().copied(),
                state.blocks.keys().next().copied(),
                sizes,
            )
        };
        let limit = prune_limit(
            height,
            last,
            oldest_snapshot,
            self.config.block_retention_blocks,
            sizes.over_budget(self.config.block_retention_bytes),
        );
        if matches!(first_block, Some(first) if first <= limit) {
            self.write(Operation::RemoveBlocksThrough(limit));
        }
        Ok(())
    }

    fn put_record(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        check_record(key, Some(value))?;
        self.write(Operation::PutRecord(
            key.to_vec(),
            frame::encode(Kind::Record, key, value).into(),
        ));
        Ok(())
    }

    fn delete_record(&mut self, key: &[u8]) -> Result<()> {
        check_record(key, None)?;
        self.write(Operation::DeleteRecord(key.to_vec()));
        Ok(())
    }

    fn records(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let disk = self.lock();
        let mut out = Vec::new();
        for (key, stored) in disk.current.records.range(prefix.to_vec()..) {
            if !key.starts_with(prefix) {
                break;
            }
            out.push((key.clone(), frame::decode(Kind::Record, key, stored, 0)?.to_vec()));
        }
        Ok(out)
    }

    fn sync(&mut self) -> Result<()> {
        let mut disk = self.lock();
        let Disk {
            durable, unsynced, ..
        } = &mut *disk;
        for operation in unsynced.drain(..) {
            durable.apply(&operation);
        }
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
