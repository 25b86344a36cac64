//! The client side of the replicas (the gateway uses it): submit requests, follow blocks.
//!
//! - [`ChainClient::submit`] sends a request (a batch of signed transactions) to the replica
//!   it believes is the primary, and takes the result as committed when f+1 replicas report the
//!   same sequence number and reply (at least one of them is honest). When no such quorum
//!   arrives within the retransmission timeout, it sends the request to every replica (backups
//!   forward it to the primary and start their view-change timers), doubling the timeout each
//!   time up to a cap. The first timeout follows the commit latency this client observes
//!   ([`RETRANSMIT_LATENCY_FACTOR`] times its moving average, between [`RETRANSMIT_AFTER_MIN`]
//!   and [`RETRANSMIT_AFTER`]), so a dead primary is noticed in a few commit times, not seconds.
//! - [`ChainClient::blocks`] streams committed blocks in height order from a given height; a
//!   block is delivered once f+1 replicas sent the same bytes for its height.
//!
//! Connections reconnect on their own; on reconnect the block subscription resumes from the
//! next height not yet delivered. Everything is bounded: requests in flight, blocks buffered
//! ahead of delivery.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::codec::Framed;

use hoard_pbft::{ReplicaId, Request};
use hoard_types::{Hash, Receipt, Transaction};

use crate::app::{decode_reply, encode_request, REQUEST_BYTES_MAX, REQUEST_TRANSACTIONS_MAX};
use crate::block::Block;
use crate::cluster::Cluster;
use crate::net::{self, NetMessage, DIAL_BACKOFF_MAX, DIAL_BACKOFF_MIN, PEER_QUEUE_FRAMES_MAX};

/// Requests waiting for their quorum of replies at once.
pub const REQUESTS_IN_FLIGHT_MAX: usize = 1024;
/// Request bytes waiting for their quorum of replies at once. With the count alone, 1,024
/// requests of 320 KB were in flight in the 100,000 events/s soak, and when the cluster fell
/// behind each retransmission round sent all of them to every replica (over 1 GB), which kept
/// it behind. A submission beyond this waits (in the caller, not in the replicas).
pub const REQUEST_BYTES_IN_FLIGHT_MAX: usize = 64 * 1024 * 1024;
/// Most requests retransmitted per [`RETRANSMIT_TICK`] (the oldest first): a stalled cluster
/// gets its backlog back at a bounded rate instead of all at once.
pub const RETRANSMIT_PER_TICK_MAX: usize = 8;
/// Heights buffered ahead of the next one to deliver.
pub const BLOCKS_AHEAD_MAX: u64 = 4096;
/// Committed blocks waiting for the consumer.
pub const BLOCK_QUEUE_MAX: usize = 1024;
/// First retransmission timeout before any commit was observed, and its upper bound.
pub const RETRANSMIT_AFTER: Duration = Duration::from_millis(1_000);
/// Lower bound of the first retransmission timeout.
pub const RETRANSMIT_AFTER_MIN: Duration = Duration::from_millis(200);
/// The first retransmission timeout is this many times the moving average of commit latency.
pub const RETRANSMIT_LATENCY_FACTOR: u32 = 2;
/// How often pending requests are checked for retransmission.
pub const RETRANSMIT_TICK: Duration = Duration::from_millis(25);
/// Largest retransmission timeout.
pub const RETRANSMIT_AFTER_MAX: Duration = Duration::from_secs(8);

/// How much a [`ChainClient`] keeps in flight; a submission beyond either waits.
#[derive(Clone, Copy, Debug)]
pub struct ClientLimits {
    pub requests_in_flight_max: usize,
    pub bytes_in_flight_max: usize,
}

impl Default for ClientLimits {
    fn default() -> ClientLimits {
        ClientLimits {
            requests_in_flight_max: REQUESTS_IN_FLIGHT_MAX,
            bytes_in_flight_max: REQUEST_BYTES_IN_FLIGHT_MAX,
        }
    }
}

/// `bytes` in KiB, rounded up, at least 1 (the unit of the in-flight byte budget).
fn kib(bytes: usize) -> u32 {
    u32::try_from(bytes.div_ceil(1024).max(1)).unwrap_or(u32::MAX)
}

/// Why a submission failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the chain client is shut down")]
    Closed,
    #[error("a reply from the replicas did not decode")]
    BadReply,
    #[error("the request is {bytes} bytes or {transactions} transactions, over the replicas' limits (split it with app::split_into_requests)")]
    TooLarge { bytes: usize, transactions: usize },
}

/// The result of a request, agreed by f+1 replicas.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Committed {
    /// The block height (= PBFT sequence number) the request's transactions are in.
    pub height: u64,
    /// One receipt per transaction, in order.
    pub receipts: Vec<Receipt>,
}

/// A block agreed by f+1 replicas.
#[derive(Clone, Debug)]
pub struct CertifiedBlock {
    pub block: Arc<Block>,
}

struct Pending {
    /// Submission order (this client's counter): a later request committing first means this
    /// one was probably lost.
    order: u64,
    payload: Arc<Vec<u8>>,
    replies: HashMap<ReplicaId, (u64, Vec<u8>)>,
    waiter: Option<oneshot::Sender<(u64, Vec<u8>)>>,
    sent_at: Instant,
    next_retransmit: Instant,
    timeout: Duration,
    /// Sent to the primary, whose connection was then lost: resent to every replica at the
    /// retransmitter's next tick, whatever its timer.
    orphaned: bool,
}

struct BlockTally {
    next_height: u64,
    /// Per height: the bytes each replica sent.
    votes: BTreeMap<u64, HashMap<ReplicaId, Arc<Vec<u8>>>>,
    sink: Option<mpsc::Sender<CertifiedBlock>>,
}

struct Shared {
    client: u64,
    /// Signs each connection's hello (the cluster file lists its public key for `client`).
    key: hoard_types::Keypair,
    f: usize,
    n: usize,
    pending: Mutex<HashMap<Hash, Pending>>,
    blocks: Mutex<BlockTally>,
    primary: Mutex<ReplicaId>,
    /// Moving average of the commit latency, microseconds (0: nothing observed yet).
    latency_average_us: std::sync::atomic::AtomicU64,
    queues: Vec<mpsc::Sender<Bytes>>,
    in_flight: Arc<Semaphore>,
    /// Permits are KiB of request payload (see [`ClientLimits::bytes_in_flight_max`]).
    in_flight_kib: Arc<Semaphore>,
    in_flight_kib_max: u32,
    next_order: std::sync::atomic::AtomicU64,
    progress: Mutex<Progress>,
    /// Whether each replica's connection is up (after its hello).
    connected: Vec<std::sync::atomic::AtomicBool>,
}

/// What the retransmitter needs to tell a lost request from a queued one.
#[derive(Default)]
struct Progress {
    /// When a request of ours last committed.
    last_commit: Option<Instant>,
    /// The highest submission order that committed.
    newest_committed: u64,
}

/// Removes a submission's pending entry however `submit` ends, cancellation included (a
/// leaked entry would be retransmitted for ever).
struct PendingGuard<'a> {
    shared: &'a Shared,
    digest: Hash,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut pending) = self.shared.pending.lock() {
            pending.remove(&self.digest);
        }
    }
}

/// A cheap-to-clone handle to the replicas.
#[derive(Clone)]
pub struct ChainClient {
    shared: Arc<Shared>,
}

impl ChainClient {
    /// Connects to every replica of `cluster` as client `client` (a number unique among the
    /// cluster's clients: replies are addressed by it), proving it on each connection with
    /// `key`, whose public key the cluster file lists for `client` under `[[clients]]`
    /// ([`Cluster::check_client`]; a replica refuses any other hello).
    pub fn connect(cluster: &Cluster, client: u64, key: hoard_types::Keypair) -> ChainClient {
        ChainClient::connect_with(cluster, client, key, ClientLimits::default())
    }

    /// [`ChainClient::connect`] with other in-flight limits.
    pub fn connect_with(
        cluster: &Cluster,
        client: u64,
        key: hoard_types::Keypair,
        limits: ClientLimits,
    ) -> ChainClient {
        let n = cluster.n();
        let mut queues = Vec::with_capacity(n);
        let mut receivers = Vec::with_capacity(n);
        for _ in 0..n {
            let (tx, rx) = mpsc::channel(PEER_QUEUE_FRAMES_MAX);
            queues.push(tx);
            receivers.push(rx);
        }
        let shared = Arc::new(Shared {
            client,
            key,
            f: cluster.f(),
            n,
            pending: Mutex::new(HashMap::new()),
            blocks: Mutex::new(BlockTally {
                next_height: 1,
                votes: BTreeMap::new(),
                sink: None,
            }),
            primary: Mutex::new(0),
            latency_average_us: std::sync::atomic::AtomicU64::new(0),
            queues,
            in_flight: Arc::new(Semaphore::new(limits.requests_in_flight_max)),
            in_flight_kib: Arc::new(Semaphore::new(kib(limits.bytes_in_flight_max) as usize)),
            in_flight_kib_max: kib(limits.bytes_in_flight_max),
            next_order: std::sync::atomic::AtomicU64::new(0),
            progress: Mutex::new(Progress::default()),
            connected: cluster
                .replicas
                .iter()
                .map(|_| std::sync::atomic::AtomicBool::new(false))
                .collect(),
        });
        for (info, rx) in cluster.replicas.iter().zip(receivers) {
            tokio::spawn(connection(Arc::downgrade(&shared), info.id, info.address, rx));
        }
        tokio::spawn(retransmitter(Arc::downgrade(&shared)));
        ChainClient { shared }
    }

    /// Orders `transactions` as one request and waits until f+1 replicas agree on its result.
    /// Waits for room when [`REQUESTS_IN_FLIGHT_MAX`] requests or
    /// [`REQUEST_BYTES_IN_FLIGHT_MAX`] bytes are in flight (see [`ClientLimits`]).
    pub async fn submit(&self, transactions: &[Transaction]) -> Result<Committed, ClientError> {
        let payload = Arc::new(encode_request(transactions));
        if payload.len() > REQUEST_BYTES_MAX || transactions.len() > REQUEST_TRANSACTIONS_MAX {
            return Err(ClientError::TooLarge {
                bytes: payload.len(),
                transactions: transactions.len(),
            });
        }
        let permit = self
            .shared
            .in_flight
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ClientError::Closed)?;
        // Never more than the whole budget, so that any request the replicas take can go.
        let want = kib(payload.len()).min(self.shared.in_flight_kib_max);
        let bytes_permit = self
            .shared
            .in_flight_kib
            .clone()
            .acquire_many_owned(want)
            .await
            .map_err(|_| ClientError::Closed)?;
        let request = Request {
            client: self.shared.client,
            payload: payload.to_vec(),
        };
        let digest = request.digest();
        let (tx, rx) = oneshot::channel();
        let order = self
            .shared
            .next_order
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let _guard = PendingGuard {
            shared: &self.shared,
            digest,
        };
        {
            let timeout = self.shared.first_retransmit();
            let now = Instant::now();
            let mut pending = self.shared.pending.lock().expect("pending lock");
            pending.insert(
                digest,
                Pending {
                    order,
                    payload: payload.clone(),
                    replies: HashMap::new(),
                    waiter: Some(tx),
                    sent_at: now,
                    next_retransmit: now + timeout,
                    timeout,
                    orphaned: false,
                },
            );
        }
        // To the primary; to every replica while we have no connection to it (it crashed or
        // is cut off: the backups then forward the request and time the primary out).
        let primary = *self.shared.primary.lock().expect("primary lock");
        let to = self.shared.connected[primary as usize]
            .load(std::sync::atomic::Ordering::Relaxed)
            .then_some(primary);
        self.shared.send(to, NetMessage::Request(request).encode());
        let result = rx.await;
        drop(_guard);
        drop(bytes_permit);
        drop(permit);
        let (height, reply) = result.map_err(|_| ClientError::Closed)?;
        let receipts = decode_reply(&reply).ok_or(ClientError::BadReply)?;
        Ok(Committed { height, receipts })
    }

    /// Requests and request bytes waiting for their replies now.
    pub fn in_flight(&self) -> (usize, usize) {
        let pending = self.shared.pending.lock().expect("pending lock");
        (
            pending.len(),
            pending.values().map(|entry| entry.payload.len()).sum(),
        )
    }

    /// Committed blocks from `from_height` on, in order, each agreed by f+1 replicas. One
    /// stream per client: a new call replaces the previous one.
    pub fn blocks(&self, from_height: u64) -> mpsc::Receiver<CertifiedBlock> {
        let (tx, rx) = mpsc::channel(BLOCK_QUEUE_MAX);
        {
            let mut tally = self.shared.blocks.lock().expect("blocks lock");
            tally.next_height = from_height.max(1);
            tally.votes.clear();
            tally.sink = Some(tx);
        }
        self.shared.send(
            None,
            NetMessage::Subscribe {
                from_height: from_height.max(1),
            }
            .encode(),
        );
        rx
    }

    /// The replica this client takes for the primary (from the view of the latest reply).
    pub fn primary(&self) -> ReplicaId {
        *self.shared.primary.lock().expect("primary lock")
    }

    /// The number of replicas.
    pub fn replicas(&self) -> usize {
        self.shared.n
    }

    /// The replicas this client has a live connection to now.
    pub fn connected_replicas(&self) -> usize {
        self.shared
            .connected
            .iter()
            .filter(|connected| connected.load(std::sync::atomic::Ordering::Relaxed))
            .count()
    }
}

impl Shared {
    /// The connection to `replica` ended. If it is the primary (crashed, restarted, or cut off),
    /// what we sent it may be lost with it: every pending request goes to all replicas at the
    /// retransmitter's next tick instead of after its timer, so that the backups forward them
    /// and start timing the primary out at once. (A primary that stops answering without
    /// closing its connection is found by the timers alone.)
    fn on_connection_lost(&self, replica: ReplicaId) {
        self.connected[replica as usize].store(false, std::sync::atomic::Ordering::Relaxed);
        if *self.primary.lock().expect("primary lock") != replica {
            return;
        }
        let mut pending = self.pending.lock().expect("pending lock");
        for entry in pending.values_mut() {
            entry.orphaned = true;
        }
    }

    /// The first retransmission timeout: a multiple of the observed commit latency, bounded.
    fn first_retransmit(&self) -> Duration {
        let average = self.latency_average_us.load(std::sync::atomic::Ordering::Relaxed);
        if average == 0 {
            return RETRANSMIT_AFTER;
        }
        (Duration::from_micros(average) * RETRANSMIT_LATENCY_FACTOR)
            .clamp(RETRANSMIT_AFTER_MIN, RETRANSMIT_AFTER)
    }

    /// Folds one commit latency into the moving average (weight 1/8).
    fn observe_latency(&self, latency: Duration) {
        use std::sync::atomic::Ordering;
        let sample = (latency.as_micros() as u64).max(1);
        let _ = self
            .latency_average_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |average| {
                Some(if average == 0 {
                    sample
                } else {
                    (average * 7 + sample) / 8
                })
            });
    }

    fn send(&self, to: Option<ReplicaId>, frame: Bytes) {
        match to {
            Some(to) => {
                let _ = self.queues[to as usize].try_send(frame);
            }
            None => {
                for queue in &self.queues {
                    let _ = queue.try_send(frame.clone());
                }
            }
        }
    }

    fn on_frame(&self, from: ReplicaId, message: NetMessage) {
        match message {
            NetMessage::Reply {
                replica,
                view,
                seq,
                request_digest,
                reply,
            } => {
                if replica != from {
                    return;
                }
                *self.primary.lock().expect("primary lock") = (view % self.n as u64) as ReplicaId;
                let mut pending = self.pending.lock().expect("pending lock");
                let Some(entry) = pending.get_mut(&request_digest) else {
                    return;
                };
                entry.replies.insert(from, (seq, reply.clone()));
                let matching = entry
                    .replies
                    .values()
                    .filter(|(s, r)| *s == seq && *r == reply)
                    .count();
                if matching > self.f {
                    if let Some(waiter) = entry.waiter.take() {
                        self.observe_latency(entry.sent_at.elapsed());
                        let mut progress = self.progress.lock().expect("progress lock");
                        progress.last_commit = Some(Instant::now());
                        progress.newest_committed = progress.newest_committed.max(entry.order);
                        drop(progress);
                        let _ = waiter.send((seq, reply));
                    }
                }
            }
            NetMessage::Block {
                replica,
                height,
                block,
            } => {
                if replica != from {
                    return;
                }
                self.on_block(from, height, Arc::new(block));
            }
            other => tracing::debug!(replica = from, ?other, "unexpected frame from a replica"),
        }
    }

    fn on_block(&self, from: ReplicaId, height: u64, bytes: Arc<Vec<u8>>) {
        let mut tally = self.blocks.lock().expect("blocks lock");
        if height < tally.next_height || height >= tally.next_height + BLOCKS_AHEAD_MAX {
            return;
        }
        tally.votes.entry(height).or_default().insert(from, bytes);
        // Deliver every height that now has f+1 identical copies, in order.
        loop {
            let next = tally.next_height;
            let Some(votes) = tally.votes.get(&next) else {
                break;
            };
            let mut counts: HashMap<&[u8], usize> = HashMap::new();
            for bytes in votes.values() {
                *counts.entry(bytes.as_slice()).or_default() += 1;
            }
            let Some((agreed, _)) = counts.into_iter().find(|(_, count)| *count > self.f) else {
                break;
            };
            let Ok(block) = Block::decode(agreed) else {
                tracing::error!(
                    height = next,
                    "f+1 replicas agree on a block that does not decode"
                );
                break;
            };
            if block.header.height != next {
                break;
            }
            let Some(sink) = tally.sink.clone() else { break };
            match sink.try_send(CertifiedBlock {
                block: Arc::new(block),
            }) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    // The consumer is behind: forget this height's votes and ask again later.
                    tally.votes.remove(&next);
                    drop(tally);
                    self.send(None, NetMessage::Subscribe { from_height: next }.encode());
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    tally.sink = None;
                    return;
                }
            }
            tally.votes.remove(&next);
            tally.next_height += 1;
        }
    }
}

async fn retransmitter(shared: std::sync::Weak<Shared>) {
    let mut tick = tokio::time::interval(RETRANSMIT_TICK);
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else { return };
        let now = Instant::now();
        let (last_commit, newest_committed) = {
            let progress = shared.progress.lock().expect("progress lock");
            (progress.last_commit, progress.newest_committed)
        };
        let mut resend = Vec::new();
        {
            let mut pending = shared.pending.lock().expect("pending lock");
            let mut due: Vec<(u64, Hash)> = pending
                .iter()
                .filter(|(_, entry)| {
                    entry.waiter.is_some() && (entry.next_retransmit <= now || entry.orphaned)
                })
                .map(|(digest, entry)| (entry.order, *digest))
                .collect();
            due.sort_unstable();
            for (_, digest) in due {
                if resend.len() == RETRANSMIT_PER_TICK_MAX {
                    break; // the rest stay due: the next ticks take them, oldest first
                }
                let entry = pending.get_mut(&digest).expect("listed above");
                // A request still queued behind others is not lost: while our requests keep
                // committing, only one that a later request overtook is sent again. Under
                // overload this keeps retransmissions (each one to every replica, which makes
                // the backups forward it and arm their view-change timers) from multiplying
                // the load that caused the delay.
                let stalled = last_commit.is_none_or(|at| now.duration_since(at) >= entry.timeout);
                let overtaken = newest_committed > entry.order;
                // Cleared whichever reason sends it now (else it would be due again next tick).
                let orphaned = std::mem::take(&mut entry.orphaned);
                if stalled || overtaken || orphaned {
                    entry.timeout = (entry.timeout * 2).min(RETRANSMIT_AFTER_MAX);
                    entry.next_retransmit = now + entry.timeout;
                    resend.push(entry.payload.clone());
                }
            }
        }
        for payload in resend {
            let request = Request {
                client: shared.client,
                payload: payload.to_vec(),
            };
            shared.send(None, NetMessage::Request(request).encode());
        }
    }
}

/// One replica connection: dial with backoff, hello, resubscribe, then pump both ways.
async fn connection(
    shared: std::sync::Weak<Shared>,
    replica: ReplicaId,
    address: SocketAddr,
    mut outgoing: mpsc::Receiver<Bytes>,
) {
    let mut backoff = DIAL_BACKOFF_MIN;
    loop {
        let Some((client, key)) = shared.upgrade().map(|s| (s.client, s.key.clone())) else {
            return;
        };
        let stream = match TcpStream::connect(address).await {
            Ok(stream) => stream,
            Err(_) => {
                while outgoing.try_recv().is_ok() {}
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(DIAL_BACKOFF_MAX);
                continue;
            }
        };
        net::tune(&stream);
        let mut framed = Framed::new(stream, net::codec());
        let nonce = match net::read_challenge(&mut framed).await {
            Ok(nonce) => nonce,
            Err(error) => {
                // No slot for us, or not a replica: back off as if the dial had failed.
                tracing::debug!(replica, %address, %error, "no challenge; redialling");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(DIAL_BACKOFF_MAX);
                continue;
            }
        };
        let signature = key.sign(
            net::HELLO_CLIENT_DOMAIN,
            &net::client_hello_signed_bytes(&nonce, client),
        );
        if framed
            .send(NetMessage::HelloClient { client, signature }.encode())
            .await
            .is_err()
        {
            continue;
        }
        // Resume the block stream where delivery stands.
        let resume = shared.upgrade().and_then(|s| {
            let tally = s.blocks.lock().expect("blocks lock");
            tally.sink.as_ref().map(|_| tally.next_height)
        });
        if let Some(from_height) = resume {
            if framed
                .send(NetMessage::Subscribe { from_height }.encode())
                .await
                .is_err()
            {
                continue;
            }
        }
        let (mut sink, mut stream) = framed.split();
        if let Some(shared) = shared.upgrade() {
            shared.connected[replica as usize].store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let opened = Instant::now();
        loop {
            tokio::select! {
                frame = outgoing.recv() => {
                    let Some(frame) = frame else { return };
                    if sink.send(frame).await.is_err() { break; }
                }
                frame = stream.next() => {
                    let Some(Ok(frame)) = frame else { break };
                    let Some(shared) = shared.upgrade() else { return };
                    match NetMessage::decode(&frame) {
                        Ok(message) => shared.on_frame(replica, message),
                        Err(error) => tracing::warn!(replica, %error, "undecodable frame from a replica"),
                    }
                }
            }
        }
        if let Some(shared) = shared.upgrade() {
            shared.on_connection_lost(replica);
        }
        if opened.elapsed() >= DIAL_BACKOFF_MAX {
            tracing::debug!(replica, %address, "replica connection lost; redialling");
            backoff = DIAL_BACKOFF_MIN;
        } else {
            // Closed right after the hello: most likely refused (a client id or key the
            // replica's cluster file does not list), so redial with backoff, not in a loop.
            tracing::warn!(
                replica,
                %address,
                client,
                "replica closed the connection after the hello (is this client id listed with this \
                 key in that replica's cluster file?); redialling"
            );
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(DIAL_BACKOFF_MAX);
        }
    }
}
