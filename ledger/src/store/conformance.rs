//! One test body per behaviour, run against every engine (sled, redb, mem).

use std::panic::{catch_unwind, AssertUnwindSafe};

use super::*;

/// A store directory (or shared memory disk) that can be opened again after the store was dropped.
struct Fixture {
    engine: Engine,
    dir: tempfile::TempDir,
    config: StoreConfig,
    mem: MemStore,
}

impl Fixture {
    fn new(engine: Engine, config: StoreConfig) -> Fixture {
        Fixture {
            engine,
            dir: tempfile::tempdir().unwrap(),
            config,
            mem: MemStore::new(config),
        }
    }

    fn open(&self) -> Box<dyn Store> {
        match self.engine {
            Engine::Mem => Box::new(self.mem.clone()),
            engine => engine.open(self.dir.path(), self.config).unwrap(),
        }
    }
}

fn block_content(height: u64) -> Vec<u8> {
    let length = (height as usize * 37) % 500 + 1;
    (0..length)
        .map(|index| (height as usize * 31 + index) as u8)
        .collect()
}

fn append_range(store: &mut dyn Store, heights: std::ops::RangeInclusive<u64>) {
    for height in heights {
        store.append_block(height, &block_content(height)).unwrap();
    }
}

fn append_and_read(engine: Engine) {
    let fixture = Fixture::new(engine, StoreConfig::default());
    let mut store = fixture.open();
    assert_eq!(store.last_height().unwrap(), 0);
    assert_eq!(store.block(1).unwrap(), None);
    assert!(store.blocks(1, 10, usize::MAX).unwrap().is_empty());
    append_range(store.as_mut(), 1..=10);
    store
        .append_blocks(
            &(11..=20)
                .map(|height| (height, block_content(height)))
                .collect::<Vec<_>>(),
        )
        .unwrap();
    store.append_blocks(&[]).unwrap();
    assert_eq!(store.last_height().unwrap(), 20);
    for height in 1..=20 {
        assert_eq!(store.block(height).unwrap(), Some(block_content(height)));
    }
    assert_eq!(store.block(21).unwrap(), None);
    assert_eq!(store.block(0).unwrap(), None);

    let run = store.blocks(5, 4, usize::MAX).unwrap();
    assert_eq!(
        run,
        (5..=8)
            .map(|height| (height, block_content(height)))
            .collect::<Vec<_>>()
    );
    assert_eq!(store.blocks(18, 100, usize::MAX).unwrap().len(), 3);
    assert!(store.blocks(5, 0, usize::MAX).unwrap().is_empty());
    // The byte budget stops the run, but the first block always comes back.
    assert_eq!(store.blocks(5, 100, 0).unwrap().len(), 1);
    let budget = block_content(5).len() + block_content(6).len();
    assert_eq!(store.blocks(5, 100, budget).unwrap().len(), 2);
    assert_eq!(
        store
            .blocks(5, 100, budget + block_content(7).len() - 1)
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        store.durability().sync.max(Survives::ProcessKill),
        store.durability().sync
    );
    store.sync().unwrap();
}

fn append_out_of_order_panics(engine: Engine) {
    let fixture = Fixture::new(engine, StoreConfig::default());
    let mut store = fixture.open();
    append_range(store.as_mut(), 1..=3);
    for bad in [0, 3, 5] {
        let result = catch_unwind(AssertUnwindSafe(|| store.append_block(bad, b"x")));
        assert!(result.is_err(), "append_block({bad}) after 3 must panic");
    }
    let batch = vec![(4, b"a".to_vec()), (6, b"b".to_vec())];
    assert!(catch_unwind(AssertUnwindSafe(|| store.append_blocks(&batch))).is_err());
    assert_eq!(store.last_height().unwrap(), 3);
}

fn limits_are_typed_errors(engine: Engine) {
    let fixture = Fixture::new(engine, StoreConfig::default());
    let mut store = fixture.open();
    let big_key = vec![0u8; RECORD_KEY_BYTES_MAX + 1];
    assert!(matches!(
        store.put_record(&big_key, b"v"),
        Err(StoreError::TooLarge {
            what: "record key",
            ..
        })
    ));
    let big_block = vec![0u8; BLOCK_BYTES_MAX + 1];
    assert!(matches!(
        store.append_block(1, &big_block),
        Err(StoreError::TooLarge { what: "block", .. })
    ));
    assert_eq!(store.last_height().unwrap(), 0);
}

fn reopen_after_drop(engine: Engine) {
    let fixture = Fixture::new(engine, StoreConfig::default());
    {
        let mut store = fixture.open();
        append_range(store.as_mut(), 1..=50);
        store.put_snapshot(40, b"snapshot 40").unwrap();
        store.put_record(b"view", b"7").unwrap();
        store.sync().unwrap();
    }
    let mut store = fixture.open();
    assert_eq!(store.last_height().unwrap(), 50);
    for height in 1..=50 {
        assert_eq!(store.block(height).unwrap(), Some(block_content(height)));
    }
    assert_eq!(
        store.latest_snapshot().unwrap(),
        Some((40, b"snapshot 40".to_vec()))
    );
    assert_eq!(
        store.records(b"").unwrap(),
        vec![(b"view".to_vec(), b"7".to_vec())]
    );
    append_range(store.as_mut(), 51..=52);
    assert_eq!(store.last_height().unwrap(), 52);
}

fn snapshots_keep_the_latest_two(engine: Engine) {
    let fixture = Fixture::new(
        engine,
        StoreConfig {
            block_retention_blocks: u64::MAX,
            ..Default::default()
        },
    );
    let mut store = fixture.open();
    assert_eq!(store.latest_snapshot().unwrap(), None);
    append_range(store.as_mut(), 1..=30);
    store.put_snapshot(10, b"s10").unwrap();
    store.put_snapshot(20, b"s20").unwrap();
    assert_eq!(store.latest_snapshot().unwrap(), Some((20, b"s20".to_vec())));
    assert_eq!(store.snapshot_at(10).unwrap(), Some(b"s10".to_vec()));
    store.put_snapshot(30, b"s30").unwrap();
    assert_eq!(store.snapshot_at(10).unwrap(), None);
    assert_eq!(store.snapshot_at(20).unwrap(), Some(b"s20".to_vec()));
    assert_eq!(store.latest_snapshot().unwrap(), Some((30, b"s30".to_vec())));
    // Same height replaces, keeps the one before.
    store.put_snapshot(30, b"s30 again").unwrap();
    assert_eq!(
        store.latest_snapshot().unwrap(),
        Some((30, b"s30 again".to_vec()))
    );
    assert_eq!(store.snapshot_at(20).unwrap(), Some(b"s20".to_vec()));
    assert!(catch_unwind(AssertUnwindSafe(|| store.put_snapshot(25, b"older"))).is_err());
    // Retention is unbounded here: no block was dropped.
    assert_eq!(store.blocks(1, 100, usize::MAX).unwrap().len(), 30);
}

fn snapshot_installed_above_the_log(engine: Engine) {
    let fixture = Fixture::new(
        engine,
        StoreConfig {
            block_retention_blocks: 0,
            ..Default::default()
        },
    );
    let mut store = fixture.open();
    append_range(store.as_mut(), 1..=5);
    store.put_snapshot(100, b"from a peer").unwrap();
    assert_eq!(store.last_height().unwrap(), 100);
    // Retention 0 and the snapshot covers them: the old blocks go.
    assert_eq!(store.block(5).unwrap(), None);
    store.sync().unwrap();
    drop(store);
    // The heights a store keeps in memory are read back at open: here from the snapshot alone.
    let mut store = fixture.open();
    assert_eq!(store.last_height().unwrap(), 100);
    store.append_block(101, b"next").unwrap();
    assert_eq!(store.last_height().unwrap(), 101);
    assert_eq!(
        store.blocks(101, 10, usize::MAX).unwrap(),
        vec![(101, b"next".to_vec())]
    );
    store.sync().unwrap();
    drop(store);
    let store = fixture.open();
    assert_eq!(store.last_height().unwrap(), 101);
}

fn prune_respects_snapshots_and_retention(engine: Engine) {
    let fixture = Fixture::new(
        engine,
        StoreConfig {
            block_retention_blocks: 15,
            ..Default::default()
        },
    );
    let mut store = fixture.open();
    append_range(store.as_mut(), 1..=40);
    // No snapshot: nothing may go.
    store.prune_blocks_below(40).unwrap();
    assert_eq!(store.block(1).unwrap(), Some(block_content(1)));
    // One snapshot at 20 (auto-prune after it): blocks through min(20, 40 - 15) = 20 go.
    store.put_snapshot(20, b"s20").unwrap();
    assert_eq!(store.block(20).unwrap(), None);
    assert_eq!(store.block(21).unwrap(), Some(block_content(21)));
    append_range(store.as_mut(), 41..=60);
    // Snapshot at 50: the oldest kept snapshot is 20, so nothing above 20 goes.
    store.put_snapshot(50, b"s50").unwrap();
    assert_eq!(store.block(21).unwrap(), Some(block_content(21)));
    // Snapshot at 55 evicts 20; the oldest is 50, retention keeps 60 - 15 = 45 and up.
    store.put_snapshot(55, b"s55").unwrap();
    assert_eq!(store.block(45).unwrap(), None);
    assert_eq!(store.block(46).unwrap(), Some(block_content(46)));
    // An explicit prune below the limit drops less.
    append_range(store.as_mut(), 61..=100);
    store.prune_blocks_below(47).unwrap();
    assert_eq!(store.block(47).unwrap(), None);
    assert_eq!(store.blocks(48, 1000, usize::MAX).unwrap().len(), 53);
    assert_eq!(store.last_height().unwrap(), 100);
    drop(store);
    let store = fixture.open();
    assert_eq!(store.block(47).unwrap(), None);
    assert_eq!(store.blocks(48, 1000, usize::MAX).unwrap().len(), 53);
}

/// Blocks are bounded in bytes too: a few big blocks must not keep the log (and sled's memory)
/// growing while the count retention is far away.
fn byte_retention_bounds_the_log(engine: Engine) {
    let stored = 1000 + super::frame::FRAME_HEADER_BYTES as u64;
    let fixture = Fixture::new(
        engine,
        StoreConfig {
            block_retention_blocks: u64::MAX,
            block_retention_bytes: 10 * stored,
            ..Default::default()
        },
    );
    let mut store = fixture.open();
    for height in 1..=40 {
        store.append_block(height, &[height as u8; 1000]).unwrap();
    }
    // No snapshot covers them: all stay, whatever their bytes.
    store.prune_blocks_below(u64::MAX).unwrap();
    assert!(store.block(1).unwrap().is_some());
    // A snapshot at 35 covers 1..=35; the newest 10 blocks (31..=40) fit the budget.
    store.put_snapshot(35, b"s35").unwrap();
    assert_eq!(store.block(30).unwrap(), None);
    assert_eq!(store.blocks(31, 100, usize::MAX).unwrap().len(), 10);
    drop(store);
    // The sizes are read again on open.
    let mut store = fixture.open();
    for height in 41..=45 {
        store.append_block(height, &[height as u8; 1000]).unwrap();
    }
    store.put_snapshot(45, b"s45").unwrap();
    // The oldest kept snapshot (35) still needs nothing below 36; the budget lets 31..=35 go.
    assert_eq!(store.block(35).unwrap(), None);
    assert_eq!(store.blocks(36, 100, usize::MAX).unwrap().len(), 10);
    // The newest block stays even when it alone is over the budget.
    let big = vec![7u8; 20 * 1000];
    store.append_block(46, &big).unwrap();
    store.put_snapshot(46, b"s46").unwrap();
    store.put_snapshot(46, b"s46").unwrap();
    assert_eq!(store.block(46).unwrap(), Some(big));
}

fn records_prefix_scan(engine: Engine) {
    let fixture = Fixture::new(engine, StoreConfig::default());
    let mut store = fixture.open();
    store.put_record(b"view", b"3").unwrap();
    store.put_record(b"msg/prepare/0002", b"p2").unwrap();
    store.put_record(b"msg/prepare/0001", b"p1").unwrap();
    store.put_record(b"msg/commit/0001", b"c1").unwrap();
    store.put_record(b"msh", b"not a msg").unwrap();
    store.put_record(&[0xff, 0xff], b"high").unwrap();
    store.put_record(b"", b"empty key").unwrap();
    let prepares = store.records(b"msg/prepare/").unwrap();
    assert_eq!(
        prepares,
        vec![
            (b"msg/prepare/0001".to_vec(), b"p1".to_vec()),
            (b"msg/prepare/0002".to_vec(), b"p2".to_vec())
        ]
    );
    assert_eq!(store.records(b"msg/").unwrap().len(), 3);
    assert_eq!(
        store.records(&[0xff]).unwrap(),
        vec![(vec![0xff, 0xff], b"high".to_vec())]
    );
    assert_eq!(store.records(b"").unwrap().len(), 7);
    assert!(store.records(b"nothing").unwrap().is_empty());
    store.put_record(b"view", b"4").unwrap();
    store.delete_record(b"msg/prepare/0001").unwrap();
    store.delete_record(b"absent").unwrap();
    assert_eq!(
        store.records(b"view").unwrap(),
        vec![(b"view".to_vec(), b"4".to_vec())]
    );
    assert_eq!(store.records(b"msg/prepare/").unwrap().len(), 1);
}

fn sync_each_write_durability(engine: Engine) {
    let fixture = Fixture::new(
        engine,
        StoreConfig {
            sync_each_write: true,
            ..Default::default()
        },
    );
    let mut store = fixture.open();
    assert_eq!(store.durability().write, store.durability().sync);
    append_range(store.as_mut(), 1..=3);
    store.put_record(b"k", b"v").unwrap();
    drop(store);
    let store = fixture.open();
    assert_eq!(store.last_height().unwrap(), 3);
}

macro_rules! for_each_engine {
    ($($test:ident),* $(,)?) => {
        mod sled_engine {
            $(#[test] fn $test() { super::$test(super::Engine::Sled) })*
        }
        mod redb_engine {
            $(#[test] fn $test() { super::$test(super::Engine::Redb) })*
        }
        mod mem_engine {
            $(#[test] fn $test() { super::$test(super::Engine::Mem) })*
        }
    };
}

for_each_engine!(
    append_and_read,
    append_out_of_order_panics,
    limits_are_typed_errors,
    reopen_after_drop,
    snapshots_keep_the_latest_two,
    snapshot_installed_above_the_log,
    prune_respects_snapshots_and_retention,
    byte_retention_bounds_the_log,
    records_prefix_scan,
    sync_each_write_durability,
);

// Engine-specific: corruption through each engine's raw write path, and the simulated crash.

fn assert_corrupt_block(result: Result<Option<Vec<u8>>>, height: u64) {
    match result {
        Err(StoreError::Corrupt {
            what: "block",
            height: got,
        }) => assert_eq!(got, height),
        other => panic!("expected a corrupt block {height}, got {other:?}"),
    }
}

#[test]
fn sled_corruption_is_detected() {
    let fixture = Fixture::new(Engine::Sled, StoreConfig::default());
    let store = SledStore::open(fixture.dir.path(), StoreConfig::default()).unwrap();
    let mut boxed: Box<dyn Store> = Box::new(store);
    append_range(boxed.as_mut(), 1..=6);
    drop(boxed);
    let store = SledStore::open(fixture.dir.path(), StoreConfig::default()).unwrap();
    let raw = store.raw_blocks();
    // A flipped payload bit.
    let mut stored = raw.get(frame::height_key(3)).unwrap().unwrap().to_vec();
    *stored.last_mut().unwrap() ^= 0x80;
    raw.insert(frame::height_key(3), stored).unwrap();
    assert_corrupt_block(store.block(3), 3);
    assert!(matches!(
        store.blocks(1, 10, usize::MAX),
        Err(StoreError::Corrupt { height: 3, .. })
    ));
    // A valid frame under the wrong height.
    let five = raw.get(frame::height_key(5)).unwrap().unwrap();
    raw.insert(frame::height_key(6), five).unwrap();
    assert_corrupt_block(store.block(6), 6);
    // A truncated frame.
    raw.insert(frame::height_key(4), &b"\x01\x01abc"[..]).unwrap();
    assert_corrupt_block(store.block(4), 4);
    assert_eq!(store.block(5).unwrap(), Some(block_content(5)));
}

#[test]
fn redb_corruption_is_detected() {
    let fixture = Fixture::new(Engine::Redb, StoreConfig::default());
    let mut store = RedbStore::open(fixture.dir.path(), StoreConfig::default()).unwrap();
    append_range(&mut store, 1..=6);
    let mut stored = frame::encode(frame::Kind::Block, &frame::height_key(3), &block_content(3));
    stored[frame::FRAME_HEADER_BYTES] ^= 0x04;
    store.raw_put_block(3, &stored).unwrap();
    assert_corrupt_block(store.block(3), 3);
    let five = frame::encode(frame::Kind::Block, &frame::height_key(5), &block_content(5));
    store.raw_put_block(6, &five).unwrap();
    assert_corrupt_block(store.block(6), 6);
    assert!(matches!(
        store.blocks(4, 10, usize::MAX),
        Err(StoreError::Corrupt { height: 6, .. })
    ));
}

/// Flips one byte of a block's payload inside redb's file: redb does not checksum its pages itself
/// (since 2.0), so only the store's frame checksum stands between the flip and a wrong value.
#[test]
fn redb_flipped_byte_in_the_file_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let marker: Vec<u8> = b"HOARD-MARKER-".iter().copied().cycle().take(600).collect();
    {
        let mut store = RedbStore::open(dir.path(), StoreConfig::default()).unwrap();
        store.append_block(1, &marker).unwrap();
        store.sync().unwrap();
    }
    let path = dir.path().join(redb_store::REDB_FILE_NAME);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes
        .windows(marker.len())
        .position(|window| window == marker)
        .expect("block in the file");
    bytes[at + 300] ^= 0x01;
    std::fs::write(&path, bytes).unwrap();
    let store = RedbStore::open(dir.path(), StoreConfig::default()).unwrap();
    assert_corrupt_block(store.block(1), 1);
}

#[test]
fn mem_corruption_is_detected_and_survives_crash() {
    let mut store = MemStore::new(StoreConfig::default());
    append_range(&mut store, 1..=3);
    store.sync().unwrap();
    assert!(store.corrupt_block(2));
    assert!(!store.corrupt_block(9));
    store.crash();
    assert_corrupt_block(store.block(2), 2);
    assert_eq!(store.block(3).unwrap(), Some(block_content(3)));
}

#[test]
fn mem_crash_drops_exactly_the_unsynced_writes() {
    let mut store = MemStore::new(StoreConfig {
        block_retention_blocks: 0,
        ..Default::default()
    });
    let disk = store.clone();
    append_range(&mut store, 1..=10);
    store.put_record(b"view", b"1").unwrap();
    store.put_snapshot(5, b"s5").unwrap();
    store.sync().unwrap();
    append_range(&mut store, 11..=12);
    store.put_record(b"view", b"2").unwrap();
    store.put_snapshot(12, b"s12").unwrap();
    store.delete_record(b"view").unwrap();
    assert_eq!(store.block(5).unwrap(), None, "pruned by the snapshot at 12");
    drop(store);
    disk.crash();
    let mut store = disk.clone();
    assert_eq!(store.last_height().unwrap(), 10);
    assert_eq!(store.latest_snapshot().unwrap(), Some((5, b"s5".to_vec())));
    assert_eq!(
        store.records(b"").unwrap(),
        vec![(b"view".to_vec(), b"1".to_vec())]
    );
    assert_eq!(
        store.block(5).unwrap(),
        None,
        "pruned by the synced snapshot at 5"
    );
    assert_eq!(store.block(6).unwrap(), Some(block_content(6)));
    append_range(&mut store, 11..=11);
    store.sync().unwrap();
    disk.crash();
    assert_eq!(store.last_height().unwrap(), 11);
}

/// sled 0.34.7 picks a leftover `snap.*.generating` file (a process killed while sled wrote its
/// snapshot at open) as its snapshot and refuses to open; `SledStore::open` removes it and retries.
#[test]
fn sled_opens_despite_an_unfinished_snapshot_file() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut store = SledStore::open(dir.path(), StoreConfig::default()).unwrap();
        append_range(&mut store, 1..=5);
        store.sync().unwrap();
    }
    let sled_dir = dir.path().join(sled_store::SLED_DIR_NAME);
    std::fs::write(sled_dir.join("snap.FFFFFFFFFFFFFFF0.generating"), b"").unwrap();
    // Reopens at once, while the dropped store's threads may still hold sled's lock.
    let store = SledStore::open(dir.path(), StoreConfig::default()).unwrap();
    assert_eq!(store.last_height().unwrap(), 5);
    assert_eq!(store.block(5).unwrap(), Some(block_content(5)));
    drop(store);
    let store = SledStore::open(dir.path(), StoreConfig::default()).unwrap();
    assert_eq!(store.last_height().unwrap(), 5);
}

#[test]
fn mem_sync_each_write_survives_crash() {
    let mut store = MemStore::new(StoreConfig {
        sync_each_write: true,
        ..Default::default()
    });
    append_range(&mut store, 1..=3);
    store.put_record(b"view", b"9").unwrap();
    store.crash();
    assert_eq!(store.last_height().unwrap(), 3);
    assert_eq!(store.records(b"view").unwrap().len(), 1);
}

/// A directory holding one engine's store is refused by the other (which would otherwise start
/// an empty store beside it), and `Engine::detect` names the engine that wrote it.
#[test]
fn a_store_directory_is_opened_only_by_the_engine_that_wrote_it() {
    for (written, other) in [(Engine::Sled, Engine::Redb), (Engine::Redb, Engine::Sled)] {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Engine::detect(dir.path()), None);
        {
            let mut store = written.open(dir.path(), StoreConfig::default()).unwrap();
            append_range(store.as_mut(), 1..=2);
            store.sync().unwrap();
        }
        assert_eq!(Engine::detect(dir.path()), Some(written));
        match other.open(dir.path(), StoreConfig::default()) {
            Err(StoreError::OtherEngine { found, wanted }) => {
                assert_eq!((found, wanted), (written.name(), other.name()));
            }
            Err(error) => panic!("{} opening a {} store: {error}", other.name(), written.name()),
            Ok(_) => panic!("{} opened a {} store", other.name(), written.name()),
        }
        let store = written.open(dir.path(), StoreConfig::default()).unwrap();
        assert_eq!(store.last_height().unwrap(), 2);
    }
}
