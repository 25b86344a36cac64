//! [`RedbStore`]: the ledger store on redb 4, one file (`ledger.redb`) with three tables (`blocks`,
//! `snapshots`, `records`), for comparison with sled.
//!
//! Every write is one redb write transaction (atomic by redb's copy-on-write commit). With
//! [`StoreConfig::sync_each_write`] it commits with `redb::Durability::Immediate` (fdatasync); otherwise
//! with `redb::Durability::None` and [`Store::sync`] commits an empty `Immediate` transaction, which makes
//! every earlier non-durable commit durable.

use std::path::Path;

use redb::{ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use super::frame::{self, Kind};
use super::{
    check_append_batch, check_record, check_size, prune_limit, BlockSizes, Durability, Result, Store,
    StoreConfig, StoreError, Survives, BLOCK_BYTES_MAX, SNAPSHOTS_KEPT_COUNT, SNAPSHOT_BYTES_MAX,
};

const BLOCKS: TableDefinition<u64, &[u8]> = TableDefinition::new("blocks");
const SNAPSHOTS: TableDefinition<u64, &[u8]> = TableDefinition::new("snapshots");
const RECORDS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("records");

/// The database file's name inside the store's directory.
pub const REDB_FILE_NAME: &str = "ledger.redb";

macro_rules! from_redb_errors {
    ($($error:ty),* $(,)?) => {
        $(impl From<$error> for StoreError {
            fn from(error: $error) -> Self {
                StoreError::Redb(error.into())
            }
        })*
    };
}

from_redb_errors!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError,
);

/// The ledger store on redb 4.
pub struct RedbStore {
    db: redb::Database,
    config: StoreConfig,
    /// A non-durable commit happened since the last durable one.
    unsynced: bool,
    /// Stored size of each block, for the byte retention, and the last block's height.
    sizes: BlockSizes,
    /// Heights of the kept snapshots, ascending (at most [`SNAPSHOTS_KEPT_COUNT`]).
    snapshot_heights: Vec<u64>,
}

impl RedbStore {
    /// Opens (or creates, atomically) the store in directory `dir` (file `ledger.redb`).
    pub fn open(dir: &Path, config: StoreConfig) -> Result<RedbStore> {
        let path = dir.join(REDB_FILE_NAME);
        // redb's own cache default is 1 GiB: bound it like sled's.
        let builder = || {
            let mut builder = redb::Builder::new();
            builder.set_cache_size(usize::try_from(config.cache_bytes).unwrap_or(usize::MAX));
            builder
        };
        super::create_atomically(&path, |creating| {
            let db = builder().create(creating)?;
            let mut store = RedbStore {
                db,
                config,
                unsynced: false,
                sizes: BlockSizes::default(),
                snapshot_heights: Vec::new(),
            };
            // Create the tables so that read transactions always find them.
            store.write(true, |transaction| {
                transaction.open_table(BLOCKS)?;
                transaction.open_table(SNAPSHOTS)?;
                transaction.open_table(RECORDS)?;
                Ok(())
            })
        })?;
        let db = builder().open(&path)?;
        let mut sizes = BlockSizes::default();
        let mut snapshot_heights = Vec::with_capacity(SNAPSHOTS_KEPT_COUNT + 1);
        {
            let transaction = db.begin_read()?;
            for entry in transaction.open_table(BLOCKS)?.iter()? {
                let (height, stored) = entry?;
                sizes.push(height.value(), stored.value().len());
            }
            for entry in transaction.open_table(SNAPSHOTS)?.iter()? {
                snapshot_heights.push(entry?.0.value());
            }
        }
        let store = RedbStore {
            db,
            config,
            unsynced: false,
            sizes,
            snapshot_heights,
        };
        tracing::debug!(dir = %dir.display(), last_height = store.last_height()?, "redb store opened");
        Ok(store)
    }

    /// Runs `body` in one write transaction and commits it, durably if `durable` or the configuration
    /// says so. An error from `body` aborts the transaction.
    fn write<T>(&mut self, durable: bool, body: impl FnOnce(&WriteTransaction) -> Result<T>) -> Result<T> {
        let durable = durable || self.config.sync_each_write;
        let mut transaction = self.db.begin_write()?;
        if !durable {
            transaction.set_durability(redb::Durability::None)?;
        }
        let value = body(&transaction)?;
        transaction.commit()?;
        self.unsynced = !durable;
        Ok(value)
    }

    /// Writes a raw value under block `height`, bypassing the frame: for corruption tests.
    #[cfg(test)]
    pub(crate) fn raw_put_block(&mut self, height: u64, stored: &[u8]) -> Result<()> {
        self.write(true, |transaction| {
            transaction.open_table(BLOCKS)?.insert(height, stored)?;
            Ok(())
        })
    }
}

/// Inserts `blocks`; their stored sizes.
fn insert_blocks(transaction: &WriteTransaction, blocks: &[(u64, &[u8])]) -> Result<Vec<(u64, usize)>> {
    let mut table = transaction.open_table(BLOCKS)?;
    let mut lens = Vec::with_capacity(blocks.len());
    for (height, block) in blocks {
        let stored = frame::encode(Kind::Block, &frame::height_key(*height), block);
        table.insert(*height, stored.as_slice())?;
        lens.push((*height, stored.len()));
    }
    Ok(lens)
}

impl Store for RedbStore {
    fn append_block(&mut self, height: u64, block: &[u8]) -> Result<()> {
        let last = self.last_height()?;
        assert_eq!(height, last + 1, "append_block: block {height} after {last}");
        check_size("block", block.len(), BLOCK_BYTES_MAX)?;
        let lens = self.write(false, |transaction| {
            insert_blocks(transaction, &[(height, block)])
        })?;
        lens.into_iter()
            .for_each(|(height, len)| self.sizes.push(height, len));
        Ok(())
    }

    fn append_blocks(&mut self, blocks: &[(u64, Vec<u8>)]) -> Result<()> {
        check_append_batch(self.last_height()?, blocks)?;
        let borrowed: Vec<(u64, &[u8])> = blocks
            .iter()
            .map(|(height, block)| (*height, &block[..]))
            .collect();
        let lens = self.write(false, |transaction| insert_blocks(transaction, &borrowed))?;
        lens.into_iter()
            .for_each(|(height, len)| self.sizes.push(height, len));
        Ok(())
    }

    fn block(&self, height: u64) -> Result<Option<Vec<u8>>> {
        let transaction = self.db.begin_read()?;
        let table = transaction.open_table(BLOCKS)?;
        let Some(stored) = table.get(height)? else {
            return Ok(None);
        };
        Ok(Some(
            frame::decode(Kind::Block, &frame::height_key(height), stored.value(), height)?.to_vec(),
        ))
    }

    fn blocks(&self, from: u64, max_count: usize, max_bytes: usize) -> Result<Vec<(u64, Vec<u8>)>> {
        let transaction = self.db.begin_read()?;
        let table = transaction.open_table(BLOCKS)?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for entry in table.range(from..)? {
            if out.len() >= max_count {
                break;
            }
            let (key, stored) = entry?;
            let height = key.value();
            if height != from + out.len() as u64 {
                break;
            }
            let payload = frame::decode(Kind::Block, &frame::height_key(height), stored.value(), height)?;
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
        if height != latest {
            heights.push(height);
        }
        let evicted = heights.len().saturating_sub(SNAPSHOTS_KEPT_COUNT);
        let stored = frame::encode(Kind::Snapshot, &frame::height_key(height), snapshot);
        self.write(false, |transaction| {
            let mut table = transaction.open_table(SNAPSHOTS)?;
            table.insert(height, stored.as_slice())?;
            for old in &heights[..evicted] {
                table.remove(*old)?;
            }
            Ok(())
        })?;
        heights.drain(..evicted);
        self.snapshot_heights = heights;
        self.prune_blocks_below(u64::MAX)
    }

    fn latest_snapshot(&self) -> Result<Option<(u64, Vec<u8>)>> {
        let transaction = self.db.begin_read()?;
        let table = transaction.open_table(SNAPSHOTS)?;
        let Some((key, stored)) = table.last()? else {
            return Ok(None);
        };
        let height = key.value();
        let payload = frame::decode(Kind::Snapshot, &frame::height_key(height), stored.value(), height)?;
        Ok(Some((height, payload.to_vec())))
    }

    fn snapshot_at(&self, height: u64) -> Result<Option<Vec<u8>>> {
        let transaction = self.db.begin_read()?;
        let table = transaction.open_table(SNAPSHOTS)?;
        let Some(stored) = table.get(height)? else {
            return Ok(None);
        };
        Ok(Some(
            frame::decode(Kind::Snapshot, &frame::height_key(height), stored.value(), height)?.to_vec(),
        ))
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
        {
            let transaction = self.db.begin_read()?;
            let first = transaction
                .open_table(BLOCKS)?
                .first()?
                .map(|(key, _)| key.value());
            match first {
                Some(first) if first <= limit => {}
                _ => return Ok(()),
            }
        }
        self.write(false, |transaction| {
            transaction
                .open_table(BLOCKS)?
                .retain_in(..=limit, |_, _| false)?;
            Ok(())
        })?;
        self.sizes.pruned_through(limit);
        tracing::debug!(
            limit,
            retained_bytes = self.sizes.bytes(),
            "redb store pruned blocks"
        );
        Ok(())
    }

    fn put_record(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        check_record(key, Some(value))?;
        let stored = frame::encode(Kind::Record, key, value);
        self.write(false, |transaction| {
            transaction.open_table(RECORDS)?.insert(key, stored.as_slice())?;
            Ok(())
        })
    }

    fn delete_record(&mut self, key: &[u8]) -> Result<()> {
        check_record(key, None)?;
        self.write(false, |transaction| {
            transaction.open_table(RECORDS)?.remove(key)?;
            Ok(())
        })
    }

    fn records(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let transaction = self.db.begin_read()?;
        let table = transaction.open_table(RECORDS)?;
        let mut out = Vec::new();
        for entry in table.range(prefix..)? {
            let (key, stored) = entry?;
            let key = key.value();
            if !key.starts_with(prefix) {
                break;
            }
            out.push((
                key.to_vec(),
                frame::decode(Kind::Record, key, stored.value(), 0)?.to_vec(),
            ));
        }
        Ok(out)
    }

    fn sync(&mut self) -> Result<()> {
        if self.unsynced {
            self.write(true, |_| Ok(()))?;
        }
        Ok(())
    }

    fn durability(&self) -> Durability {
        let write = if self.config.sync_each_write {
            Survives::PowerLoss
        } else {
            Survives::Nothing
        };
        Durability {
            write,
            sync: Survives::PowerLoss,
        }
    }
}
