//! `hoard node`: one replica as a process. The tokio driver around the pure consensus core.
//!
//! One task owns the [`hoard_pbft::Replica`], the [`LedgerApp`] inside it and the store. It
//! takes inputs from one bounded inbox (peer messages, client requests, subscriptions) and from
//! its timers, feeds them to the core, and performs the outputs with group commit: it drains
//! what is queued, runs it all through the core, writes every `Persist` record and committed
//! block, syncs the store once, and only then lets the messages go out. So what this replica
//! signed is on disk before the signature leaves it, for the cost of one sync per round, not
//! per message.
//!
//! On start it recovers: the latest snapshot, the blocks after it replayed from the log (each
//! checked against its header's roots), and the consensus records folded into a
//! [`DurableState`]; a replica that is still behind its peers then catches up by PBFT's own
//! catch-up and state transfer.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_util::codec::FramedRead;

use hoard_pbft::{
    CheckpointCert, Config, DurableState, MessageKind, Output, Record, Replica, ReplicaId, Request,
    SignedMessage, Snapshot, Timer,
};

use crate::app::LedgerApp;
use crate::block::Block;
use crate::cluster::NodeConfig;
use crate::error::{LedgerError, Result};
use crate::net::{self, NetMessage};
use crate::state::Ledger;
use crate::store::{Engine, Store, StoreConfig};

/// Inputs waiting for the driver before senders are slowed down.
pub const INBOX_INPUTS_MAX: usize = 16_384;
/// Bytes (of the frames they came in) the inputs waiting for the driver may hold: the input
/// count alone allows gigabytes when requests are megabytes. A frame that finds no room waits,
/// which slows its sender's connection (TCP back-pressure) until the driver catches up.
pub const INBOX_BYTES_MAX: usize = 256 * 1024 * 1024;
/// Inputs the driver takes in one round before it persists and sends.
pub const ROUND_INPUTS_MAX: usize = 1_024;
/// Blocks sent to one subscriber per round while it catches up from the log.
pub const SUBSCRIBER_CATCHUP_BLOCKS_PER_ROUND: u64 = 64;
/// Client (gateway) connections one replica serves.
pub const CLIENTS_MAX: usize = 64;
/// Connections accepted and not yet through their hello (each for at most
/// [`net::HELLO_TIMEOUT`]): callers that never say who they are hold these, never the slots of
/// replicas and clients.
pub const HANDSHAKES_MAX: usize = 64;

/// The driver's inbox, bounded in inputs ([`INBOX_INPUTS_MAX`]) and in bytes ([`INBOX_BYTES_MAX`]).
#[derive(Clone)]
struct Inbox {
    inputs: mpsc::Sender<Charged>,
    /// One permit per KiB.
    room: Arc<tokio::sync::Semaphore>,
    bytes_max: usize,
}

/// An input and the room it takes in the inbox until the driver's round that takes it ends.
struct Charged {
    input: Input,
    _room: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Inbox {
    fn new(bytes_max: usize) -> (Inbox, mpsc::Receiver<Charged>) {
        let (inputs, receiver) = mpsc::channel(INBOX_INPUTS_MAX);
        let room = Arc::new(tokio::sync::Semaphore::new(bytes_max / 1024));
        (
            Inbox {
                inputs,
                room,
                bytes_max,
            },
            receiver,
        )
    }

    /// Queues `input`, which arrived in `bytes` bytes; waits for room. Err when the driver is gone.
    async fn send(&self, input: Input, bytes: usize) -> std::result::Result<(), ()> {
        let room = if bytes == 0 {
            None
        } else {
            let kib = bytes.div_ceil(1024).min(self.bytes_max / 1024) as u32;
            Some(self.room.clone().acquire_many_owned(kib).await.map_err(|_| ())?)
        };
        self.inputs
            .send(Charged { input, _room: room })
            .await
            .map_err(|_| ())
    }
}

enum Input {
    Peer {
        from: ReplicaId,
        message: SignedMessage,
    },
    Request(Request),
    /// Client `client` said hello on connection number `connection` (numbers are unique in
    /// this process): its replies and blocks go to `frames` from now on.
    ClientConnected {
        client: u64,
        connection: u64,
        frames: net::PeerQueue,
    },
    /// Connection number `connection` of `client` ended: forgotten unless a newer one replaced
    /// it meanwhile.
    ClientGone {
        client: u64,
        connection: u64,
    },
    Subscribe {
        client: u64,
        from_height: u64,
    },
}

/// What a running node reports (for tests and the demo).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeStatus {
    pub height: u64,
    pub view: u64,
    pub state_root: hoard_types::Hash,
    pub stable_checkpoint: u64,
}

/// Runs one replica until `shutdown` turns true. Binds the replica's address from the cluster
/// file; `ready` (if given) receives the bound address once listening.
pub async fn run(
    config: NodeConfig,
    mut shutdown: watch::Receiver<bool>,
    status: Option<watch::Sender<NodeStatus>>,
) -> Result<()> {
    let id = config.id;
    let mut store = config
        .engine
        .open(
            &config.data_dir,
            StoreConfig {
                block_retention_blocks: config.block_retention_blocks,
                block_retention_bytes: config.block_retention_bytes,
                cache_bytes: config.cache_bytes,
                ..StoreConfig::default()
            },
        )
        .map_err(storage)?;
    let Recovered {
        replica,
        recovered,
        slot_keys,
        snapshot_height,
        snapshot_bytes,
        replayed_bytes,
    } = recover(&config, store.as_mut())?;
    tracing::info!(
        replica = id,
        height = replica.last_executed(),
        view = replica.view(),
        recovered,
        "replica starting"
    );

    let listener = TcpListener::bind(config.address())
        .await
        .map_err(|e| LedgerError::Config(format!("bind {}: {e}", config.address())))?;
    let (inbox_tx, inbox) = Inbox::new(INBOX_BYTES_MAX);
    tokio::spawn(accept_loop(
        listener,
        inbox_tx.clone(),
        id,
        config.cluster.keys.clone(),
        config.cluster.client_keys.clone(),
        shutdown.clone(),
    ));

    let (encoded_tx, mut encoded) = mpsc::channel(SNAPSHOT_JOBS_MAX + 1);
    let mut peers: HashMap<ReplicaId, net::PeerQueue> = HashMap::new();
    for info in &config.cluster.replicas {
        if info.id != id {
            peers.insert(info.id, net::spawn_peer(info.address, id, config.keypair.clone()));
        }
    }
    let mut driver = Driver {
        id,
        replica,
        store,
        peers,
        clients: HashMap::new(),
        subscribers: HashMap::new(),
        timers: [None; 4],
        status,
        slot_keys,
        garbage: std::collections::VecDeque::new(),
        snapshots: SnapshotEncoder::start(id, encoded_tx),
        stable_persisted: 0,
        snapshot_persisted: snapshot_height,
        snapshot_bytes,
        log_bytes_since_snapshot: replayed_bytes,
        metrics: ReplicaMetrics::register(id),
    };
    let outputs = driver.replica.start();
    driver.perform(outputs)?;
    driver.publish_status();
    let mut inbox = inbox;
    loop {
        let deadline = driver.next_deadline();
        tokio::select! {
            biased;
            _ = shutdown.changed() => {
                if *shutdown.borrow() { break; }
            }
            input = inbox.recv() => {
                let Some(input) = input else { break };
                let mut charged = vec![input];
                while charged.len() < ROUND_INPUTS_MAX {
                    match inbox.try_recv() {
                        Ok(input) => charged.push(input),
                        Err(_) => break,
                    }
                }
                driver.metrics.inbox_depth.set(inbox.len() as f64);
                // The room is given back once the round has taken the inputs.
                let (inputs, room): (Vec<Input>, Vec<_>) =
                    charged.into_iter().map(|c| (c.input, c._room)).unzip();
                driver.round(inputs)?;
                drop(room);
            }
            Some((cert, snapshot)) = encoded.recv() => {
                driver.write_stable(cert, Some(&snapshot))?;
            }
            _ = sleep_until(deadline) => {
                driver.fire_timers()?;
            }
        }
        // The select is biased towards the inbox, which a loaded replica never empties: take
        // encoded snapshots after every round too, or they would wait until the load stops
        // (and the encoder, its queue full, would leave every checkpoint to the round).
        while let Ok((cert, snapshot)) = encoded.try_recv() {
            driver.write_stable(cert, Some(&snapshot))?;
        }
    }
    // Snapshots still being encoded are written before the last sync: the encoder finishes its
    // queue and exits, which closes the channel.
    driver.snapshots.stop_taking_jobs();
    while let Some((cert, snapshot)) = encoded.recv().await {
        driver.write_stable(cert, Some(&snapshot))?;
    }
    driver.snapshots.join();
    driver.store.sync().map_err(storage)?;
    tracing::info!(
        replica = id,
        height = driver.replica.last_executed(),
        "replica stopped"
    );
    Ok(())
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

fn storage(error: impl std::fmt::Display) -> LedgerError {
    LedgerError::Storage(error.to_string())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Runs a blocking call with `block_in_place` on a multi-threaded runtime (plainly elsewhere:
/// a current-thread runtime cannot hand its tasks over).
fn off_the_runtime<T>(call: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(call)
        }
        _ => call(),
    }
}

/// A round (inputs through the replica, then persist, sync and send) that takes this long is
/// logged: the replica's task does not yield meanwhile.
const SLOW_ROUND: Duration = Duration::from_millis(200);

/// Garbage slot records deleted per round (more when [`GARBAGE_KEYS_MAX`] would be passed).
const GARBAGE_DELETES_PER_ROUND: usize = 8;
/// Most garbage slot record keys held: past it, a round deletes the excess at once.
const GARBAGE_KEYS_MAX: usize = 8192;

/// Prefix of the per-slot record keys (then the big-endian seq).
const SLOT_KEY_PREFIX: &[u8] = b"pbft/slot/";

/// Record keys: one per slot and phase, one per slot and batch digest, one per view-change
/// kind, one for the stable checkpoint.
fn record_key(record: &Record) -> Vec<u8> {
    let slot = |seq: u64, phase: u8| {
        let mut key = SLOT_KEY_PREFIX.to_vec();
        key.extend_from_slice(&seq.to_be_bytes());
        key.push(phase);
        key
    };
    match record {
        Record::Batch { seq, digest, .. } => {
            let mut key = slot(*seq, 3);
            key.extend_from_slice(&digest.0);
            key
        }
        Record::PrePrepare { seq, .. } => slot(*seq, 0),
        Record::Prepare { seq, .. } => slot(*seq, 1),
        Record::Commit { seq, .. } => slot(*seq, 2),
        Record::ViewChange { .. } => b"pbft/view/change".to_vec(),
        Record::NewView { .. } => b"pbft/view/new".to_vec(),
        Record::StableCheckpoint { .. } => b"pbft/stable".to_vec(),
    }
}

/// Rebuilds a stopped replica's ledger from its data directory (the latest snapshot and the
/// blocks after it, each checked against its header), to compare replicas after a run. The
/// engine is the one whose store the directory holds.
pub fn inspect(data_dir: &std::path::Path, genesis: &crate::genesis::Genesis) -> Result<Ledger> {
    let engine = Engine::detect(data_dir)
        .ok_or_else(|| LedgerError::Storage(format!("no store in {}", data_dir.display())))?;
    let store = engine.open(data_dir, StoreConfig::default()).map_err(storage)?;
    rebuild_ledger(genesis, store.as_ref(), None).map(|rebuilt| rebuilt.ledger)
}

/// A ledger rebuilt from a store.
struct Rebuilt {
    ledger: Ledger,
    /// The replayed blocks, the latest ones (bounded like [`LedgerApp`]'s recent blocks), with
    /// their encoded sizes.
    blocks: std::collections::VecDeque<(Block, usize)>,
    /// The latest snapshot's height and size in bytes (0 and 0: none).
    snapshot_height: u64,
    snapshot_bytes: u64,
    /// Bytes of the blocks replayed after that snapshot.
    replayed_bytes: u64,
    /// The snapshot at the height asked for, when the store has it or the replay passed it.
    captured: Option<Snapshot>,
}

/// The latest snapshot plus the blocks after it. `capture`: a height whose snapshot the caller
/// needs (the stable checkpoint's): read from the store when kept there, else taken from the
/// ledger when the replay passes it (a stable checkpoint's snapshot is not always written, see
/// [`snapshot_due`]).
fn rebuild_ledger(
    genesis: &crate::genesis::Genesis,
    store: &dyn Store,
    capture: Option<u64>,
) -> Result<Rebuilt> {
    let snapshot = store.latest_snapshot().map_err(storage)?;
    let (snapshot_height, snapshot_bytes) = snapshot
        .as_ref()
        .map_or((0, 0), |(height, bytes)| (*height, bytes.len() as u64));
    let mut ledger = match &snapshot {
        Some((height, bytes)) => {
            let ledger = Ledger::restore(bytes, None)?;
            if ledger.height() != *height || ledger.chain_id() != genesis.chain_id {
                return Err(LedgerError::Snapshot(format!(
                    "snapshot at {height} is not this chain's"
                )));
            }
            ledger
        }
        None => Ledger::new(genesis),
    };
    let mut captured = match capture {
        Some(height) if height == snapshot_height => snapshot.map(|(_, bytes)| Snapshot::ready(bytes)),
        Some(height) if height < snapshot_height => {
            store.snapshot_at(height).map_err(storage)?.map(Snapshot::ready)
        }
        _ => None,
    };
    let last = store.last_height().map_err(storage)?;
    let mut blocks = std::collections::VecDeque::new();
    let mut held = 0usize;
    let mut replayed_bytes = 0u64;
    // Pipelined ([`Ledger::apply_blocks`]): each block's commitment beside the next one's
    // apply. In two runs when the capture height falls inside, as its snapshot is taken there.
    let stops = match capture {
        Some(height) if height > ledger.height() && height < last => vec![height, last],
        _ => vec![last],
    };
    for stop in stops {
        // The encoded size of each block read and not yet handed back, in order.
        let sizes = std::cell::RefCell::new(std::collections::VecDeque::new());
        let mut read_error = None;
        let reads = (ledger.height() + 1..=stop).map_while(|height| {
            let read = store.block(height).map_err(storage).and_then(|bytes| {
                let bytes = bytes.ok_or_else(|| {
                    LedgerError::Storage(format!("block {height} missing from the log (last is {last})"))
                })?;
                let block = Block::decode(&bytes)?;
                sizes.borrow_mut().push_back(bytes.len());
                Ok(block)
            });
            read.map_err(|error| read_error = Some(error)).ok()
        });
        ledger.apply_blocks(reads, |block, _receipts| {
            let size = sizes
                .borrow_mut()
                .pop_front()
                .expect("a size for every block read");
            replayed_bytes += size as u64;
            blocks.push_back((block, size));
            held += size;
            while blocks.len() > crate::app::RECENT_BLOCKS_MAX
                || (held > crate::app::RECENT_BLOCKS_BYTES_MAX && blocks.len() > 1)
            {
                let (_, dropped) = blocks.pop_front().expect("not empty");
                held -= dropped;
            }
            Ok(())
        })?;
        if let Some(error) = read_error {
            return Err(error);
        }
        if capture == Some(ledger.height()) && captured.is_none() {
            let view = ledger.snapshot_view();
            captured = Some(Snapshot::deferred(move || view.encode()));
        }
    }
    Ok(Rebuilt {
        ledger,
        blocks,
        snapshot_height,
        snapshot_bytes,
        replayed_bytes,
        captured,
    })
}

/// Rebuilds the replica from the store: consensus records, snapshot, replayed blocks.
fn recover(config: &NodeConfig, store: &mut dyn Store) -> Result<Recovered> {
    let mut durable = DurableState::default();
    let records = store.records(b"pbft/").map_err(storage)?;
    let mut decoded: Vec<Record> = Vec::with_capacity(records.len());
    let mut slot_keys = std::collections::BTreeSet::new();
    for (key, value) in records {
        if key.starts_with(SLOT_KEY_PREFIX) {
            slot_keys.insert(key.clone());
        }
        let record: Record = rmp_serde::from_slice(&value)
            .map_err(|e| LedgerError::Storage(format!("record {}: {e}", String::from_utf8_lossy(&key))))?;
        decoded.push(record);
    }
    // Stable checkpoint first (it prunes slots), then view changes by view, then slots.
    let order = |record: &Record| match record {
        Record::StableCheckpoint { .. } => (0, 0),
        Record::ViewChange { view, .. } => (1, 2 * view),
        Record::NewView { view, .. } => (1, 2 * view + 1),
        _ => (2, 0),
    };
    decoded.sort_by_key(order);
    let has_records = !decoded.is_empty();
    for record in decoded {
        durable.apply(record);
    }
    let stable = durable.stable.as_ref().map(|cert| cert.seq);
    let Rebuilt {
        ledger,
        blocks: app_blocks,
        snapshot_height,
        snapshot_bytes,
        replayed_bytes,
        captured,
    } = rebuild_ledger(&config.cluster.genesis, store, stable)?;
    let recovered = has_records || ledger.height() > 0;
    // The stable checkpoint's record holds no snapshot: it comes from the snapshot table or
    // from the replay, or state transfers from this replica would get an empty snapshot until
    // its next stable checkpoint.
    if let Some(seq) = stable {
        let snapshot = captured.ok_or_else(|| {
            LedgerError::Storage(format!(
                "stable checkpoint {seq} has no snapshot in the store and is not in the log"
            ))
        })?;
        durable.stable_snapshot = Some(snapshot);
    }
    let mut app = LedgerApp::new(ledger);
    for (block, bytes) in app_blocks {
        app.remember_block(Arc::new(block), bytes);
    }
    let replica_config = pbft_config(config);
    let replica = if recovered {
        Replica::recover(replica_config, app, durable)
    } else {
        Replica::new(replica_config, app)
    }
    .map_err(|e| LedgerError::Config(e.to_string()))?;
    Ok(Recovered {
        replica,
        recovered,
        slot_keys,
        snapshot_height,
        snapshot_bytes,
        replayed_bytes,
    })
}

/// A replica rebuilt from its store, and what its driver needs to know of the store.
struct Recovered {
    replica: Replica<LedgerApp>,
    /// Whether the store held anything (else the replica starts fresh).
    recovered: bool,
    /// Keys of the slot records on disk.
    slot_keys: std::collections::BTreeSet<Vec<u8>>,
    /// The latest snapshot's height in the store (0: none) and its size.
    snapshot_height: u64,
    snapshot_bytes: u64,
    /// Bytes of the blocks in the log after that snapshot.
    replayed_bytes: u64,
}

/// The consensus configuration for this node.
pub fn pbft_config(config: &NodeConfig) -> Config {
    let mut pbft = Config::new(config.id, config.cluster.keys.clone(), config.keypair.clone());
    pbft.checkpoint_interval = config.consensus.checkpoint_interval;
    pbft.window = config.consensus.window;
    pbft.batch_size_max = config.consensus.batch_size_max;
    pbft.batch_timeout_ms = config.consensus.batch_timeout_ms;
    pbft.view_change_timeout_ms = config.consensus.view_change_timeout_ms;
    pbft.request_bytes_max = crate::app::REQUEST_BYTES_MAX;
    pbft.batch_bytes_max = pbft.batch_bytes_max.max(crate::app::REQUEST_BYTES_MAX);
    pbft
}

struct Subscriber {
    next_height: u64,
}

struct Driver {
    id: ReplicaId,
    replica: Replica<LedgerApp>,
    store: Box<dyn Store>,
    peers: HashMap<ReplicaId, net::PeerQueue>,
    /// Per client, its newest connection's number and queue.
    clients: HashMap<u64, (u64, net::PeerQueue)>,
    subscribers: HashMap<u64, Subscriber>,
    timers: [Option<Instant>; 4],
    status: Option<watch::Sender<NodeStatus>>,
    /// Keys of the slot records on disk above the last stable checkpoint.
    slot_keys: std::collections::BTreeSet<Vec<u8>>,
    /// Keys of slot records at or below the last stable checkpoint, deleted a few per round
    /// ([`GARBAGE_DELETES_PER_ROUND`]) after the round's messages went out: all of one
    /// checkpoint at once (192 records, a third of them batch files) held a replica for 7 to 45
    /// ms. A crash leaves the rest on disk, where recovery ignores them (the stable checkpoint
    /// prunes the slots below it) and the next stable checkpoint deletes them.
    garbage: std::collections::VecDeque<Vec<u8>>,
    /// Encodes stable checkpoints' snapshots off the round; see [`Driver::persist`].
    snapshots: SnapshotEncoder,
    /// The newest stable checkpoint written (snapshot and record).
    stable_persisted: u64,
    /// The height of the newest snapshot in the store (0: none). Snapshots only move forward.
    snapshot_persisted: u64,
    /// The size of that snapshot, and the bytes of blocks appended to the log since it was
    /// written: together they say when the next one is due ([`snapshot_due`]).
    snapshot_bytes: u64,
    log_bytes_since_snapshot: u64,
    /// The replica's metric handles.
    metrics: ReplicaMetrics,
}

/// How often the process's resident memory is read for `process_resident_memory_bytes` (a read
/// of `/proc/self/status`; the other status metrics are published every round).
const RESIDENT_MEMORY_READ_INTERVAL: Duration = Duration::from_secs(1);

/// What the driver hands to the store, for `hoard_replica_store_written_bytes_total{kind}`.
#[derive(Clone, Copy)]
enum Written {
    Record,
    Block,
    Snapshot,
}

impl Written {
    fn as_str(self) -> &'static str {
        match self {
            Written::Record => "record",
            Written::Block => "block",
            Written::Snapshot => "snapshot",
        }
    }
}

/// The handles of the metrics the driver sets every round or block, registered once: a
/// `metrics::gauge!` with labels builds its key and looks it up in the registry on every call,
/// and with the `/proc` read of the resident memory [`Driver::publish_status`] alone was about 6%
/// of a replica's CPU at 100 events/s, where rounds are many and small (perf, `hoard dev` with
/// `hoard-loadtest run --players 1000`).
struct ReplicaMetrics {
    inbox_depth: metrics::Gauge,
    committed_transactions: metrics::Counter,
    batch_transactions: metrics::Histogram,
    commit_latency: metrics::Histogram,
    frames_dropped_to_client: metrics::Counter,
    frames_dropped_to_replica: metrics::Counter,
    store_sync: metrics::Histogram,
    /// By [`Written`].
    written_bytes: [metrics::Counter; 3],
    height: metrics::Gauge,
    view: metrics::Gauge,
    stable_checkpoint: metrics::Gauge,
    log_slots: metrics::Gauge,
    pending_requests: metrics::Gauge,
    view_changes: metrics::Counter,
    state_transfers: metrics::Counter,
    messages_invalid: metrics::Counter,
    replies_resent: metrics::Counter,
    requests_dropped: metrics::Counter,
    /// By [`MessageKind::index`].
    messages_received: Vec<metrics::Counter>,
    messages_sent: Vec<metrics::Counter>,
    resident_memory: metrics::Gauge,
    resident_memory_read_at: Option<Instant>,
}

impl ReplicaMetrics {
    fn register(id: ReplicaId) -> ReplicaMetrics {
        let label = id.to_string();
        let by_kind = |name: &'static str| {
            MessageKind::ALL
                .iter()
                .map(|kind| metrics::counter!(name, "replica" => label.clone(), "kind" => kind.as_str()))
                .collect()
        };
        let written = |kind: Written| metrics::counter!("hoard_replica_store_written_bytes_total", "replica" => label.clone(), "kind" => kind.as_str());
        ReplicaMetrics {
            inbox_depth: metrics::gauge!("hoard_replica_inbox_depth", "replica" => label.clone()),
            committed_transactions: metrics::counter!("hoard_replica_committed_transactions_total", "replica" => label.clone()),
            batch_transactions: metrics::histogram!("hoard_replica_batch_transactions", "replica" => label.clone()),
            commit_latency: metrics::histogram!("hoard_replica_commit_latency_seconds", "replica" => label.clone()),
            frames_dropped_to_client: metrics::counter!("hoard_replica_frames_dropped_total", "replica" => label.clone(), "to" => "client"),
            frames_dropped_to_replica: metrics::counter!("hoard_replica_frames_dropped_total", "replica" => label.clone(), "to" => "replica"),
            store_sync: metrics::histogram!("hoard_replica_store_sync_seconds", "replica" => label.clone()),
            written_bytes: [Written::Record, Written::Block, Written::Snapshot].map(written),
            height: metrics::gauge!("hoard_replica_height", "replica" => label.clone()),
            view: metrics::gauge!("hoard_replica_view", "replica" => label.clone()),
            stable_checkpoint: metrics::gauge!("hoard_replica_stable_checkpoint", "replica" => label.clone()),
            log_slots: metrics::gauge!("hoard_replica_log_slots", "replica" => label.clone()),
            pending_requests: metrics::gauge!("hoard_replica_pending_requests", "replica" => label.clone()),
            view_changes: metrics::counter!("hoard_replica_view_changes_total", "replica" => label.clone()),
            state_transfers: metrics::counter!("hoard_replica_state_transfers_total", "replica" => label.clone()),
            messages_invalid: metrics::counter!("hoard_replica_messages_invalid_total", "replica" => label.clone()),
            replies_resent: metrics::counter!("hoard_replica_replies_resent_total", "replica" => label.clone()),
            requests_dropped: metrics::counter!("hoard_replica_requests_dropped_total", "replica" => label.clone()),
            messages_received: by_kind("hoard_replica_messages_received_total"),
            messages_sent: by_kind("hoard_replica_messages_sent_total"),
            resident_memory: metrics::gauge!("process_resident_memory_bytes"),
            resident_memory_read_at: None,
        }
    }

    fn publish(&mut self, stats: &hoard_pbft::Stats) {
        let now = Instant::now();
        if self
            .resident_memory_read_at
            .is_none_or(|at| now.duration_since(at) >= RESIDENT_MEMORY_READ_INTERVAL)
        {
            self.resident_memory_read_at = Some(now);
            if let Some(bytes) = resident_memory_bytes() {
                self.resident_memory.set(bytes as f64);
            }
        }
        self.height.set(stats.last_executed as f64);
        self.view.set(stats.view as f64);
        self.stable_checkpoint.set(stats.stable_checkpoint_seq as f64);
        self.log_slots.set(stats.log_slots as f64);
        self.pending_requests.set(stats.pending_requests as f64);
        self.view_changes.absolute(stats.view_changes_total);
        self.state_transfers
            .absolute(stats.state_transfers_completed_total);
        self.messages_invalid.absolute(stats.messages_invalid_total);
        self.replies_resent.absolute(stats.replies_resent_total);
        self.requests_dropped.absolute(stats.requests_dropped_total);
        for kind in MessageKind::ALL {
            self.messages_received[kind.index()].absolute(stats.messages_received_total[kind.index()]);
            self.messages_sent[kind.index()].absolute(stats.messages_sent_total[kind.index()]);
        }
    }
}

/// Whether a stable checkpoint's snapshot is written to the store, or only its record.
///
/// A snapshot is the whole state, and a loaded replica reaches a stable checkpoint every second
/// or two: writing each one made the store's writes grow with the state (a 14 MB snapshot every
/// 1.5 s per replica after a minute at 200,000 events/s), and encoding each one on all four
/// replicas at the same height took the machine's cores at once, which every request in flight
/// then waited for. So after the first stable checkpoint (which always writes one), a snapshot
/// is written once the log has grown by at least [`SNAPSHOT_LOG_BYTES_MIN`] and by the size of
/// the last snapshot: snapshot bytes written stay at most the block bytes written (plus one
/// snapshot), and a restart replays at most that many bytes of blocks (64 MiB is a few seconds
/// of replay). A checkpoint whose block is not in the log (reached by state transfer) always
/// writes its snapshot: the replay could not rebuild it. Otherwise recovery rebuilds the stable
/// checkpoint's snapshot by replaying the log from the newest snapshot through the checkpoint
/// ([`rebuild_ledger`]).
fn snapshot_due(snapshot_persisted: u64, snapshot_bytes: u64, log_bytes_since_snapshot: u64) -> bool {
    snapshot_persisted == 0 || log_bytes_since_snapshot >= snapshot_bytes.max(SNAPSHOT_LOG_BYTES_MIN)
}

/// Bytes of blocks appended since the newest stored snapshot before the next one is written
/// (unless the snapshot is larger); see [`snapshot_due`].
pub const SNAPSHOT_LOG_BYTES_MIN: u64 = 64 * 1024 * 1024;

/// Stable checkpoints waiting for their snapshot's encoding, at most; one more makes the round
/// encode it itself (backpressure instead of an unbounded queue of state copies).
const SNAPSHOT_JOBS_MAX: usize = 1;

/// A thread that encodes deferred checkpoint snapshots ([`hoard_pbft::Snapshot::deferred`]),
/// at a lower CPU priority than the replica, and hands them back to the round for writing.
/// Sorting and encoding a few MB of state took 12-86 ms inside the consensus step, once per
/// checkpoint per replica, which every request in flight then waited for.
struct SnapshotEncoder {
    jobs: Option<std::sync::mpsc::SyncSender<(CheckpointCert, Snapshot)>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SnapshotEncoder {
    fn start(replica: ReplicaId, done: mpsc::Sender<(CheckpointCert, Snapshot)>) -> SnapshotEncoder {
        let (jobs, queue) = std::sync::mpsc::sync_channel::<(CheckpointCert, Snapshot)>(SNAPSHOT_JOBS_MAX);
        let thread = std::thread::Builder::new()
            .name(format!("snapshot-{replica}"))
            .spawn(move || {
                #[cfg(target_os = "linux")]
                // SAFETY: setpriority(2) on this thread's own id; failure only leaves the priority.
                unsafe {
                    libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10);
                }
                for (cert, snapshot) in queue {
                    let started = Instant::now();
                    let bytes = snapshot.bytes().len();
                    metrics::histogram!("hoard_replica_snapshot_encode_seconds", "replica" => replica.to_string())
                        .record(started.elapsed().as_secs_f64());
                    tracing::debug!(replica, seq = cert.seq, bytes, "snapshot encoded");
                    if done.blocking_send((cert, snapshot)).is_err() {
                        return;
                    }
                }
            })
            .expect("spawn the snapshot encoder thread");
        SnapshotEncoder {
            jobs: Some(jobs),
            thread: Some(thread),
        }
    }

    /// Queues `snapshot` for encoding; gives it back when the queue is full.
    fn submit(&self, cert: CheckpointCert, snapshot: Snapshot) -> Option<(CheckpointCert, Snapshot)> {
        let jobs = self.jobs.as_ref()?;
        match jobs.try_send((cert, snapshot)) {
            Ok(()) => None,
            Err(
                std::sync::mpsc::TrySendError::Full(job) | std::sync::mpsc::TrySendError::Disconnected(job),
            ) => Some(job),
        }
    }

    /// Stops taking jobs: the thread encodes the ones queued, then exits (closing its channel).
    fn stop_taking_jobs(&mut self) {
        self.jobs = None;
    }

    /// Waits for the thread (after [`SnapshotEncoder::stop_taking_jobs`] and draining its channel).
    fn join(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn timer_index(timer: Timer) -> usize {
    match timer {
        Timer::Batch => 0,
        Timer::ViewChange => 1,
        Timer::Status => 2,
        Timer::StateTransfer => 3,
    }
}

const TIMERS: [Timer; 4] = [
    Timer::Batch,
    Timer::ViewChange,
    Timer::Status,
    Timer::StateTransfer,
];

impl Driver {
    fn next_deadline(&self) -> Option<Instant> {
        self.timers.iter().flatten().min().copied()
    }

    fn round(&mut self, inputs: Vec<Input>) -> Result<()> {
        let started = Instant::now();
        let count = inputs.len();
        let mut outputs = Vec::new();
        for input in inputs {
            self.replica.set_now(now_ms());
            match input {
                Input::Peer { from, message } => outputs.extend(self.replica.on_message(from, message)),
                Input::Request(request) => outputs.extend(self.replica.on_request(request)),
                Input::ClientConnected {
                    client,
                    connection,
                    frames,
                } => {
                    // A client has one connection, its newest: it redials when its connection
                    // fails, and the one it left may not have ended here yet.
                    self.clients.insert(client, (connection, frames));
                }
                Input::ClientGone { client, connection } => {
                    if self
                        .clients
                        .get(&client)
                        .is_some_and(|(newest, _)| *newest == connection)
                    {
                        self.clients.remove(&client);
                        self.subscribers.remove(&client);
                    }
                }
                Input::Subscribe { client, from_height } => {
                    self.subscribers.insert(
                        client,
                        Subscriber {
                            next_height: from_height.max(1),
                        },
                    );
                }
            }
        }
        let stepped = started.elapsed();
        let produced = outputs.len();
        self.perform(outputs)?;
        self.pump_subscribers()?;
        self.publish_status();
        let elapsed = started.elapsed();
        if elapsed >= SLOW_ROUND {
            tracing::warn!(
                replica = self.id,
                inputs = count,
                outputs = produced,
                consensus_ms = stepped.as_millis() as u64,
                total_ms = elapsed.as_millis() as u64,
                "slow round"
            );
        }
        Ok(())
    }

    fn fire_timers(&mut self) -> Result<()> {
        let now = Instant::now();
        let mut outputs = Vec::new();
        for timer in TIMERS {
            let index = timer_index(timer);
            if self.timers[index].is_some_and(|at| at <= now) {
                self.timers[index] = None;
                self.replica.set_now(now_ms());
                outputs.extend(self.replica.on_timer(timer));
            }
        }
        self.perform(outputs)?;
        self.pump_subscribers()?;
        self.publish_status();
        Ok(())
    }

    /// Group commit: persist everything, sync once, then send.
    fn perform(&mut self, outputs: Vec<Output>) -> Result<()> {
        let mut sends: Vec<(Option<ReplicaId>, SignedMessage)> = Vec::new();
        let mut wrote = false;
        for output in outputs {
            match output {
                Output::Send { to, msg } => sends.push((Some(to), msg)),
                Output::Broadcast { msg } => sends.push((None, msg)),
                Output::SetTimer { timer, after_ms } => {
                    self.timers[timer_index(timer)] = Some(Instant::now() + Duration::from_millis(after_ms));
                }
                Output::CancelTimer { timer } => self.timers[timer_index(timer)] = None,
                Output::Persist(record) => {
                    wrote = true;
                    self.persist(record)?;
                }
                Output::Committed(committed) => {
                    let app = self.replica.app();
                    let block = app
                        .take_executed(committed.seq)
                        .or_else(|| app.recent_block(committed.seq))
                        .ok_or_else(|| {
                            LedgerError::Storage(format!(
                                "block {} was executed but is not in memory",
                                committed.seq
                            ))
                        })?;
                    if self.store.last_height().map_err(storage)? < committed.seq {
                        let bytes = block.encode();
                        self.store.append_block(committed.seq, &bytes).map_err(storage)?;
                        self.count_written(Written::Block, bytes.len());
                        self.log_bytes_since_snapshot += bytes.len() as u64;
                        wrote = true;
                    }
                    let transactions = block.transactions.len() as f64;
                    self.metrics
                        .committed_transactions
                        .increment(block.transactions.len() as u64);
                    self.metrics.batch_transactions.record(transactions);
                    if committed.timestamp_ms > 0 {
                        let latency = now_ms().saturating_sub(committed.timestamp_ms) as f64 / 1000.0;
                        self.metrics.commit_latency.record(latency);
                    }
                }
                Output::Reply {
                    client,
                    seq,
                    request_digest,
                    reply,
                } => {
                    let frame = NetMessage::Reply {
                        replica: self.id,
                        view: self.replica.view(),
                        seq,
                        request_digest,
                        reply,
                    }
                    .encode();
                    if let Some((_, queue)) = self.clients.get(&client) {
                        if !queue.try_send(frame) {
                            self.metrics.frames_dropped_to_client.increment(1);
                        }
                    }
                }
                Output::StableCheckpoint { seq, .. } => {
                    tracing::debug!(replica = self.id, seq, "stable checkpoint");
                }
                Output::StateTransferred { seq, snapshot } => {
                    tracing::info!(replica = self.id, seq, "state transferred");
                    // The block log restarts after `seq`: the snapshot received is its base.
                    if self.store.last_height().map_err(storage)? < seq {
                        self.put_snapshot(seq, &snapshot)?;
                        wrote = true;
                    }
                }
            }
        }
        if wrote {
            // The sync waits for the disk (hundreds of ms when writeback is behind): on a
            // multi-threaded runtime, hand this worker's other tasks (peers' connections, other
            // replicas in one process, clients) to another thread meanwhile.
            let store = &mut self.store;
            let started = Instant::now();
            off_the_runtime(move || store.sync()).map_err(storage)?;
            self.metrics.store_sync.record(started.elapsed().as_secs_f64());
        }
        for (to, msg) in sends {
            let frame = NetMessage::Consensus(msg.to_bytes()).encode();
            match to {
                Some(to) => self.send_to_peer(to, frame),
                None => {
                    let targets: Vec<ReplicaId> = self.peers.keys().copied().collect();
                    for to in targets {
                        self.send_to_peer(to, frame.clone());
                    }
                }
            }
        }
        self.collect_garbage()
    }

    /// Deletes a few garbage slot records (see [`Driver::garbage`]); they are synced with a
    /// later round's writes.
    fn collect_garbage(&mut self) -> Result<()> {
        let count = GARBAGE_DELETES_PER_ROUND.max(self.garbage.len().saturating_sub(GARBAGE_KEYS_MAX));
        for key in self.garbage.drain(..count.min(self.garbage.len())) {
            self.store.delete_record(&key).map_err(storage)?;
        }
        Ok(())
    }

    fn send_to_peer(&self, to: ReplicaId, frame: Bytes) {
        if let Some(queue) = self.peers.get(&to) {
            if !queue.try_send(frame) {
                self.metrics.frames_dropped_to_replica.increment(1);
            }
        }
    }

    /// Writes one record. A stable checkpoint whose snapshot is still deferred goes to the
    /// encoder thread and is written when it comes back ([`Driver::write_stable`]): until then
    /// the previous stable checkpoint stays the durable one, and the slot records above it stay
    /// on disk, so a crash in between recovers from the older snapshot and the blocks after it.
    fn persist(&mut self, record: Record) -> Result<()> {
        let key = record_key(&record);
        if let Record::StableCheckpoint { cert, snapshot } = record {
            let in_log = self.store.last_height().map_err(storage)? >= cert.seq;
            if in_log
                && !snapshot_due(
                    self.snapshot_persisted,
                    self.snapshot_bytes,
                    self.log_bytes_since_snapshot,
                )
            {
                // The snapshot stays deferred in the replica, encoded only if a peer fetches it.
                return self.write_stable(cert, None);
            }
            if !snapshot.is_encoded() {
                match self.snapshots.submit(cert, snapshot) {
                    None => return Ok(()),
                    Some((cert, snapshot)) => return self.write_stable(cert, Some(&snapshot)),
                }
            }
            return self.write_stable(cert, Some(&snapshot));
        }
        let value = rmp_serde::to_vec(&record).expect("records encode");
        if key.starts_with(SLOT_KEY_PREFIX) {
            self.slot_keys.insert(key.clone());
        }
        self.put_record(&key, &value)
    }

    fn put_record(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        self.store.put_record(key, value).map_err(storage)?;
        self.count_written(Written::Record, value.len());
        Ok(())
    }

    /// Counts bytes handed to the store by kind (`record`, `block`, `snapshot`): what this
    /// replica writes, before the engine's own pages and journal.
    fn count_written(&self, kind: Written, bytes: usize) {
        self.metrics.written_bytes[kind as usize].increment(bytes as u64);
    }

    /// Stores the snapshot taken at `seq`, newer than any in the store (asserted by the store).
    fn put_snapshot(&mut self, seq: u64, snapshot: &Snapshot) -> Result<()> {
        let bytes = snapshot.bytes();
        self.store.put_snapshot(seq, bytes).map_err(storage)?;
        self.count_written(Written::Snapshot, bytes.len());
        self.snapshot_persisted = seq;
        self.snapshot_bytes = bytes.len() as u64;
        // Blocks after `seq` appended while the snapshot was being encoded are not counted: the
        // next snapshot comes a little later, never sooner.
        self.log_bytes_since_snapshot = 0;
        Ok(())
    }

    /// Writes a stable checkpoint: its snapshot when given (see [`snapshot_due`]), then the
    /// record naming it (without the snapshot); the slot records at or below it become garbage. Synced with the next round's
    /// writes. A checkpoint older than a stable checkpoint or a snapshot already written (an
    /// encoding that finished after a state transfer stored a newer snapshot) is dropped: its
    /// record would name a snapshot the store no longer keeps as its base, and the newer
    /// checkpoint's record follows.
    fn write_stable(&mut self, cert: CheckpointCert, snapshot: Option<&Snapshot>) -> Result<()> {
        let seq = cert.seq;
        if seq <= self.stable_persisted || seq < self.snapshot_persisted {
            return Ok(());
        }
        // A state transfer to `seq` wrote this snapshot already.
        if let Some(snapshot) = snapshot.filter(|_| seq > self.snapshot_persisted) {
            self.put_snapshot(seq, snapshot)?;
        }
        // Slots at or below a stable checkpoint are garbage: deleted over the next rounds.
        let mut above = SLOT_KEY_PREFIX.to_vec();
        above.extend_from_slice(&(seq + 1).to_be_bytes());
        let kept = self.slot_keys.split_off(&above);
        self.garbage.extend(std::mem::replace(&mut self.slot_keys, kept));
        // The snapshot lives in the snapshot table; the record keeps the certificate only.
        let light = Record::StableCheckpoint {
            cert,
            snapshot: Snapshot::ready(Vec::new()),
        };
        let value = rmp_serde::to_vec(&light).expect("records encode");
        self.put_record(&record_key(&light), &value)?;
        self.stable_persisted = seq;
        Ok(())
    }

    /// Sends each subscriber the blocks it has not had yet: from memory when recent, from the
    /// log otherwise, a bounded number per round, never more than its queue takes.
    fn pump_subscribers(&mut self) -> Result<()> {
        let head = self.replica.last_executed();
        let clients: Vec<u64> = self.subscribers.keys().copied().collect();
        for client in clients {
            let Some(queue) = self.clients.get(&client).map(|(_, queue)| queue.clone()) else {
                continue;
            };
            let subscriber = self.subscribers.get_mut(&client).expect("listed");
            let mut sent = 0;
            while subscriber.next_height <= head && sent < SUBSCRIBER_CATCHUP_BLOCKS_PER_ROUND {
                let height = subscriber.next_height;
                let bytes = match self.replica.app().recent_block(height) {
                    Some(block) => block.encode(),
                    None => match self.store.block(height).map_err(storage)? {
                        Some(bytes) => bytes,
                        // Pruned or never had it (state transfer): skip to what we have.
                        None => {
                            subscriber.next_height = height + 1;
                            continue;
                        }
                    },
                };
                let frame = NetMessage::Block {
                    replica: self.id,
                    height,
                    block: bytes,
                }
                .encode();
                if !queue.try_send(frame) {
                    break;
                }
                subscriber.next_height += 1;
                sent += 1;
            }
            if subscriber.next_height <= head {
                // Come back soon even if nothing else happens.
                let at = Instant::now() + Duration::from_millis(5);
                let status = timer_index(Timer::Status);
                self.timers[status] = Some(self.timers[status].map_or(at, |t| t.min(at)));
            }
        }
        Ok(())
    }

    fn publish_status(&mut self) {
        let stats = self.replica.stats();
        self.metrics.publish(stats);
        if let Some(status) = &self.status {
            let ledger = self.replica.app().ledger();
            status.send_replace(NodeStatus {
                height: ledger.height(),
                view: stats.view,
                state_root: ledger.state_root(),
                stable_checkpoint: stats.stable_checkpoint_seq,
            });
        }
    }
}

/// Why the accepting side closed a connection it accepted (`hoard_replica_connections_refused_total`'s
/// `reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refused {
    /// No room: [`HANDSHAKES_MAX`] or [`CLIENTS_MAX`] reached.
    TooMany,
    /// No hello within [`net::HELLO_TIMEOUT`].
    HelloTimeout,
    /// A first frame that is not a hello, larger than [`net::HELLO_BYTES_MAX`], or a replica's
    /// or client's hello with an unknown id or a signature that does not verify.
    BadHello,
}

impl Refused {
    fn as_str(self) -> &'static str {
        match self {
            Refused::TooMany => "too_many",
            Refused::HelloTimeout => "hello_timeout",
            Refused::BadHello => "bad_hello",
        }
    }
}

/// What a connection may take: its handshake slot until its hello, then a client's slot, or
/// its replica's place; and what refusals count.
struct Slots {
    me: ReplicaId,
    keys: Vec<hoard_types::PublicKey>,
    /// The clients' keys, by client id (the cluster file's `[[clients]]`).
    client_keys: std::collections::BTreeMap<u64, hoard_types::PublicKey>,
    /// The number of the last client connection (see [`Input::ClientConnected`]).
    client_connections: std::sync::atomic::AtomicU64,
    handshakes: Arc<tokio::sync::Semaphore>,
    clients: Arc<tokio::sync::Semaphore>,
    /// Per peer, the number of its newest authenticated connection: a peer has one connection,
    /// its newest (it redials when its connection fails, and the one it left may not have
    /// noticed yet: a half-open connection after a network fault), so each new one closes the
    /// one before.
    peers: Vec<watch::Sender<u64>>,
}

impl Slots {
    fn refused(&self, reason: Refused) {
        metrics::counter!(
            "hoard_replica_connections_refused_total",
            "replica" => self.me.to_string(),
            "reason" => reason.as_str()
        )
        .increment(1);
    }
}

async fn accept_loop(
    listener: TcpListener,
    inbox: Inbox,
    me: ReplicaId,
    keys: Vec<hoard_types::PublicKey>,
    client_keys: std::collections::BTreeMap<u64, hoard_types::PublicKey>,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Slots {
        me,
        peers: keys.iter().map(|_| watch::Sender::new(0)).collect(),
        keys,
        client_keys,
        client_connections: std::sync::atomic::AtomicU64::new(0),
        handshakes: Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_MAX)),
        clients: Arc::new(tokio::sync::Semaphore::new(CLIENTS_MAX)),
    });
    for reason in [Refused::TooMany, Refused::HelloTimeout, Refused::BadHello] {
        // Every series from the start, at zero, so that rate() sees the first refusal.
        metrics::counter!("hoard_replica_connections_refused_total", "replica" => me.to_string(), "reason" => reason.as_str()).absolute(0);
    }
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => return,
        };
        let (stream, address) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors, typically: wait instead of spinning on the error.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(handshake) = slots.handshakes.clone().try_acquire_owned() else {
            tracing::warn!(%address, "connection refused: too many connections saying nothing yet");
            slots.refused(Refused::TooMany);
            continue;
        };
        let inbox = inbox.clone();
        let slots = slots.clone();
        tokio::spawn(async move {
            if let Err((reason, error)) = serve_connection(stream, inbox, &slots, handshake).await {
                if let Some(reason) = reason {
                    slots.refused(reason);
                    tracing::info!(%address, reason = reason.as_str(), %error, "connection refused");
                } else {
                    tracing::debug!(%address, %error, "connection closed");
                }
            }
        });
    }
}

/// A connection's end: `Some(reason)` when it was refused before it was served.
type Closed = (Option<Refused>, String);

async fn serve_connection(
    stream: TcpStream,
    inbox: Inbox,
    slots: &Slots,
    handshake: tokio::sync::OwnedSemaphorePermit,
) -> std::result::Result<(), Closed> {
    use futures::SinkExt;
    let served = |error: String| (None, error);
    let refused = |reason: Refused| move |error: String| (Some(reason), error);
    net::tune(&stream);
    let (read, write) = stream.into_split();
    let mut sink = tokio_util::codec::FramedWrite::new(write, net::codec());
    let nonce = hoard_types::Hash(rand::random());
    sink.send(NetMessage::Challenge { nonce }.encode())
        .await
        .map_err(|e| served(e.to_string()))?;
    // Until the hello, a frame is at most a hello's size.
    let mut frames = FramedRead::new(
        read,
        tokio_util::codec::LengthDelimitedCodec::builder()
            .max_frame_length(net::HELLO_BYTES_MAX)
            .new_codec(),
    );
    let hello = tokio::time::timeout(net::HELLO_TIMEOUT, frames.next())
        .await
        .map_err(|_| (Some(Refused::HelloTimeout), "no hello in time".to_string()))?
        .ok_or_else(|| served("closed before hello".into()))?
        .map_err(|e| refused(Refused::BadHello)(e.to_string()))?;
    frames.decoder_mut().set_max_frame_length(net::FRAME_BYTES_MAX);
    let hello = NetMessage::decode(&hello).map_err(refused(Refused::BadHello))?;
    drop(handshake);
    match hello {
        NetMessage::HelloReplica { id, signature } => {
            let key = slots
                .keys
                .get(id as usize)
                .filter(|_| id != slots.me)
                .ok_or_else(|| refused(Refused::BadHello)(format!("unknown replica {id}")))?;
            key.verify(
                net::HELLO_DOMAIN,
                &net::hello_signed_bytes(&nonce, id),
                &signature,
            )
            .map_err(|e| refused(Refused::BadHello)(format!("replica {id}'s hello: {e}")))?;
            let newest = &slots.peers[id as usize];
            let mut replaced = newest.subscribe();
            let mut mine = 0;
            newest.send_modify(|number| {
                *number += 1;
                mine = *number;
            });
            replaced.mark_unchanged();
            if *replaced.borrow() != mine {
                return Err(served(format!("replica {id} connected again")));
            }
            loop {
                let frame = tokio::select! {
                    frame = frames.next() => frame,
                    _ = replaced.changed() => {
                        if *replaced.borrow_and_update() == mine {
                            continue;
                        }
                        return Err(served(format!("replica {id} connected again")));
                    }
                };
                let Some(frame) = frame else { break };
                let frame = frame.map_err(|e| served(e.to_string()))?;
                match NetMessage::decode(&frame).map_err(served)? {
                    NetMessage::Consensus(bytes) => {
                        let message =
                            SignedMessage::from_bytes(&bytes, hoard_pbft::constants::MESSAGE_BYTES_MAX)
                                .map_err(|e| served(e.to_string()))?;
                        if inbox
                            .send(Input::Peer { from: id, message }, frame.len())
                            .await
                            .is_err()
                        {
                            return Ok(());
                        }
                    }
                    other => return Err(served(format!("replica {id} sent {other:?}"))),
                }
            }
            Ok(())
        }
        NetMessage::HelloClient { client, signature } => {
            let key = slots
                .client_keys
                .get(&client)
                .ok_or_else(|| refused(Refused::BadHello)(format!("unknown client {client}")))?;
            key.verify(
                net::HELLO_CLIENT_DOMAIN,
                &net::client_hello_signed_bytes(&nonce, client),
                &signature,
            )
            .map_err(|e| refused(Refused::BadHello)(format!("client {client}'s hello: {e}")))?;
            let _slot = slots
                .clients
                .clone()
                .try_acquire_owned()
                .map_err(|_| refused(Refused::TooMany)(format!("{CLIENTS_MAX} clients connected")))?;
            let connection = slots
                .client_connections
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1;
            let (queue, mut outgoing) = net::peer_queue();
            if inbox
                .send(
                    Input::ClientConnected {
                        client,
                        connection,
                        frames: queue,
                    },
                    0,
                )
                .await
                .is_err()
            {
                return Ok(());
            }
            let writer = tokio::spawn(async move {
                while let Some(frame) = outgoing.recv().await {
                    if sink.feed(frame).await.is_err() {
                        return;
                    }
                    while let Ok(frame) = outgoing.try_recv() {
                        if sink.feed(frame).await.is_err() {
                            return;
                        }
                    }
                    if SinkExt::<Bytes>::flush(&mut sink).await.is_err() {
                        return;
                    }
                }
            });
            let result = async {
                while let Some(frame) = frames.next().await {
                    let frame = frame.map_err(|e| served(e.to_string()))?;
                    let input = match NetMessage::decode(&frame).map_err(served)? {
                        NetMessage::Request(mut request) => {
                            request.client = client;
                            Input::Request(request)
                        }
                        NetMessage::Subscribe { from_height } => Input::Subscribe { client, from_height },
                        other => return Err(served(format!("client {client} sent {other:?}"))),
                    };
                    if inbox.send(input, frame.len()).await.is_err() {
                        break;
                    }
                }
                Ok(())
            }
            .await;
            let _ = inbox.send(Input::ClientGone { client, connection }, 0).await;
            writer.abort();
            result
        }
        other => Err(refused(Refused::BadHello)(format!(
            "expected a hello, got {other:?}"
        ))),
    }
}

/// This process's resident memory, from `/proc/self/status` (Linux; `None` elsewhere).
pub fn resident_memory_bytes() -> Option<u64> {
    resident_memory_bytes_of("self")
}

/// VmRSS of process `pid` ("self" for this one), bytes (Linux).
pub fn resident_memory_bytes_of(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kilobytes: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kilobytes * 1024)
}

/// Installs the Prometheus exporter for this process on `address`.
pub fn install_metrics(address: SocketAddr) -> Result<()> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(address)
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
            &[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ],
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full("hoard_replica_batch_transactions".into()),
                &[1.0, 10.0, 100.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 16384.0],
            )
        })
        .and_then(|b| b.install())
        .map_err(|e| LedgerError::Config(format!("metrics on {address}: {e}")))?;
    describe_metrics();
    Ok(())
}

/// Help text for every replica metric (Prometheus shows it; promtool checks it).
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(
        "process_resident_memory_bytes",
        Unit::Bytes,
        "Resident memory of this process."
    );
    describe_gauge!(
        "hoard_replica_height",
        "Height of the last block this replica executed."
    );
    describe_gauge!("hoard_replica_view", "The PBFT view this replica is in.");
    describe_gauge!(
        "hoard_replica_stable_checkpoint",
        "Sequence number of the last stable checkpoint."
    );
    describe_gauge!(
        "hoard_replica_log_slots",
        "Consensus log slots held in memory (bounded by the window)."
    );
    describe_gauge!(
        "hoard_replica_pending_requests",
        "Client requests waiting to be ordered."
    );
    describe_gauge!(
        "hoard_replica_inbox_depth",
        "Inputs waiting for the replica's driver."
    );
    describe_counter!(
        "hoard_replica_view_changes_total",
        "View changes this replica started."
    );
    describe_histogram!(
        "hoard_replica_snapshot_encode_seconds",
        Unit::Seconds,
        "Time to sort and encode one stable checkpoint's snapshot on the encoder thread."
    );
    describe_histogram!(
        "hoard_replica_store_sync_seconds",
        Unit::Seconds,
        "Time of each round's store sync, the durability barrier before this replica's messages leave."
    );
    describe_counter!(
        "hoard_replica_store_written_bytes_total",
        Unit::Bytes,
        "Bytes handed to the store, by kind (record, block, snapshot), before the engine's own overhead."
    );
    describe_counter!(
        "hoard_replica_state_transfers_total",
        "State transfers this replica completed."
    );
    describe_counter!(
        "hoard_replica_replies_resent_total",
        "Client retransmissions of executed requests answered with the reply remembered."
    );
    describe_counter!(
        "hoard_replica_requests_dropped_total",
        "Client requests the consensus core did not take: its pending requests full (count or \
         bytes), or the request failed the ledger's check."
    );
    describe_counter!(
        "hoard_replica_messages_invalid_total",
        "Consensus messages rejected as invalid."
    );
    describe_counter!(
        "hoard_replica_connections_refused_total",
        "Connections accepted and closed before being served, by reason: too_many (no slot), \
         hello_timeout (no hello in time), bad_hello (not a hello, too large, or a replica or \
         client hello that names an unknown id or does not verify)."
    );
    describe_counter!(
        "hoard_replica_messages_received_total",
        "Consensus messages received, by kind."
    );
    describe_counter!(
        "hoard_replica_messages_sent_total",
        "Consensus messages sent, by kind."
    );
    describe_counter!(
        "hoard_replica_committed_transactions_total",
        "Transactions in committed blocks."
    );
    describe_counter!(
        "hoard_replica_frames_dropped_total",
        "Frames dropped because a peer's or client's queue was full."
    );
    describe_histogram!(
        "hoard_replica_batch_transactions",
        "Transactions per committed block."
    );
    describe_histogram!(
        "hoard_replica_commit_latency_seconds",
        Unit::Seconds,
        "Time from the primary's proposal to this replica's commit."
    );
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Stable checkpoints' snapshots are encoded on the encoder thread and written with their
    /// record; a replica recovered from that disk serves the snapshot itself (not the empty
    /// placeholder its record holds) to replicas that fetch state.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_recovered_replica_serves_its_stable_checkpoint_snapshot_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let interval = crate::cluster::ConsensusTuning::default().checkpoint_interval;
        // One stable checkpoint: the first always writes its snapshot.
        crate::testing::commit_one_per_slot(dir.path(), interval + 8).await;

        let config = NodeConfig::load(&dir.path().join("replica-0.toml")).unwrap();
        let mut store = config
            .engine
            .open(&config.data_dir, StoreConfig::default())
            .unwrap();
        let (snapshot_height, bytes) = store.latest_snapshot().unwrap().expect("a snapshot was written");
        assert_eq!(snapshot_height % interval, 0);
        assert!(snapshot_height >= interval, "snapshot at {snapshot_height}");
        let restored = Ledger::restore(&bytes, None).unwrap();
        assert_eq!(restored.height(), snapshot_height);
        let recovered = recover(&config, store.as_mut()).unwrap();
        assert!(recovered.recovered);
        assert_eq!(recovered.snapshot_height, snapshot_height);
        let (cert, snapshot) = recovered.replica.stable_snapshot().expect("a stable checkpoint");
        assert_eq!(cert.seq, snapshot_height, "the record names the latest snapshot");
        assert_eq!(snapshot.bytes(), &bytes[..], "served from the snapshot table");
        assert_eq!(restored.head().hash().0, cert.digest.0);
    }

    /// After the first, stable checkpoints write their record but no snapshot until the log
    /// outgrew [`SNAPSHOT_LOG_BYTES_MIN`] ([`snapshot_due`]), and recovery rebuilds the stable
    /// checkpoint's snapshot by replaying the log from the newest snapshot: the same bytes the
    /// checkpoint's quorum certified.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stable_checkpoint_without_a_snapshot_in_the_store_is_rebuilt_by_replay() {
        let dir = tempfile::tempdir().unwrap();
        let interval = crate::cluster::ConsensusTuning::default().checkpoint_interval;
        crate::testing::commit_one_per_slot(dir.path(), 3 * interval + 8).await;

        let config = NodeConfig::load(&dir.path().join("replica-0.toml")).unwrap();
        let mut store = config
            .engine
            .open(&config.data_dir, StoreConfig::default())
            .unwrap();
        let (snapshot_height, snapshot) = store.latest_snapshot().unwrap().expect("a first snapshot");
        let recovered = recover(&config, store.as_mut()).unwrap();
        let (cert, rebuilt) = recovered.replica.stable_snapshot().expect("a stable checkpoint");
        assert!(
            cert.seq > snapshot_height,
            "the stable checkpoint {} wrote a snapshot although the log since the one at {snapshot_height} ({} bytes) is small",
            cert.seq,
            snapshot.len()
        );
        assert!(recovered.replayed_bytes > 0 && recovered.replayed_bytes < SNAPSHOT_LOG_BYTES_MIN);
        assert_eq!(recovered.snapshot_bytes, snapshot.len() as u64);
        let restored = Ledger::restore(rebuilt.bytes(), Some(hoard_types::Hash(cert.digest.0))).unwrap();
        assert_eq!(restored.height(), cert.seq);
    }

    #[test]
    fn a_snapshot_is_due_first_and_then_once_the_log_outgrew_the_last_one_and_the_minimum() {
        assert!(snapshot_due(0, 0, 0), "the first stable checkpoint writes one");
        let min = SNAPSHOT_LOG_BYTES_MIN;
        assert!(!snapshot_due(64, 1_000_000, min - 1));
        assert!(snapshot_due(64, 1_000_000, min));
        assert!(!snapshot_due(64, 2 * min, 2 * min - 1));
        assert!(snapshot_due(64, 2 * min, 2 * min));
    }

    /// The inbox is bounded in bytes: a frame that finds no room waits until the driver's round
    /// that took earlier inputs ends, then goes in.
    #[tokio::test]
    async fn the_inbox_makes_a_sender_wait_for_room_in_bytes() {
        let (inbox, mut receiver) = Inbox::new(4 * 1024);
        let gone = |client| Input::ClientGone {
            client,
            connection: 0,
        };
        inbox.send(gone(1), 3 * 1024).await.unwrap();
        let waiting = tokio::spawn({
            let inbox = inbox.clone();
            async move { inbox.send(gone(2), 3 * 1024).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiting.is_finished(),
            "a second 3 KiB frame fit in a 4 KiB inbox"
        );
        // Inputs without a frame of their own (connections coming and going) never wait.
        inbox.send(gone(3), 0).await.unwrap();
        let first = receiver.recv().await.unwrap();
        assert!(matches!(first.input, Input::ClientGone { client: 1, .. }));
        assert!(matches!(
            receiver.recv().await.unwrap().input,
            Input::ClientGone { client: 3, .. }
        ));
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("room came back")
            .unwrap()
            .unwrap();
        assert!(matches!(
            receiver.recv().await.unwrap().input,
            Input::ClientGone { client: 2, .. }
        ));
    }
}
