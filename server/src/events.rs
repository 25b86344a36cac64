//! The durable path of asset events: accepted → the store's stream → batcher → chain → committed.
//! The stream operations are [`Store`]'s (Redis: XADD, XREADGROUP, XAUTOCLAIM, XACK + XDEL; the
//! embedded store mirrors them).
//!
//! - [`Events::submit`] registers an event in the in-flight tracker and queues it for the stream
//!   writer (bounded; full → `busy`). The writer appends many events per round trip and only then
//!   answers `accepted`.
//! - The batcher reads the stream through a consumer group (XREADGROUP), claims entries that stayed
//!   pending too long (XAUTOCLAIM: a crashed gateway's, or ones the chain lost), skips events the
//!   committed ledger already knows, and submits the rest in batches.
//! - The follower calls [`Events::on_receipt`] for every committed transaction: the entry is
//!   acknowledged and deleted, and `committed`/`rejected` goes to the connections that submitted it.
//!
//! Exactly once: an event is in the stream until its receipt is seen; resubmitting it is always
//! safe because the ledger deduplicates event ids (a duplicate's receipt carries the original
//! outcome).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio::sync::{mpsc, oneshot};

use hoard_types::wire::{ErrorCode, ServerMessage};
use hoard_types::{EventId, Hash, Outcome, Receipt, Rejection, TenantId, Transaction};

use crate::chain::Chain;
use crate::config::GatewayConfig;
use crate::constants::{
    ACK_QUEUE_MAX, LOST_SWEEP_EVENTS_MAX, STREAM_WRITER_PIPELINE_MAX, STREAM_WRITER_QUEUE_MAX, XACK_IDS_MAX,
};
use crate::hub::{ConnId, Hub};
use crate::metrics as m;
use crate::store::{Store, StreamEntry, StreamReader};
use crate::view::ChainView;

/// Who wants to hear that an event was accepted.
pub enum Origin {
    /// A connection's request; `durable` (an `accept`'s) hears once the event is durable, or
    /// that it will not be.
    Connection {
        conn: ConnId,
        request_id: u64,
        durable: Option<oneshot::Sender<Result<(), ErrorCode>>>,
    },
    /// An internal caller (settlement) that waits for durability.
    Internal(oneshot::Sender<Result<(), ErrorCode>>),
}

/// What [`Events::submit`] did.
pub enum Submitted {
    /// Queued for the stream; `accepted` follows when it is durable.
    Queued,
    /// The same event is already in flight (durable): `accepted` now, `committed` later.
    AlreadyInFlight,
    /// The event already committed: `accepted`, then the original outcome at once.
    AlreadyCommitted { height: u64, outcome: Outcome },
}

/// Why a submission was refused before the stream.
pub struct Refused {
    pub code: ErrorCode,
    pub message: String,
    pub retry_after_ms: Option<u64>,
}

struct InFlight {
    tx_id: Hash,
    /// Stream entries holding this event (several after resubmissions).
    stream_ids: Vec<String>,
    /// Connections to notify on commit.
    conns: Vec<ConnId>,
    /// Connections waiting for `accepted` (the write is not durable yet).
    waiting: Vec<(ConnId, u64)>,
    durable: bool,
    accepted_at: Option<Instant>,
    /// When this gateway began tracking the event (accepted here, or claimed).
    tracked_at: Instant,
    /// The receipt, when the event committed before the writer saw its append's answer: the
    /// writer delivers it right after `accepted`, so that no connection hears `committed`
    /// before `accepted` (the batcher can read an entry, and the chain commit it, while the
    /// writer task still waits to run).
    early_receipt: Option<(Receipt, &'static str)>,
}

pub(crate) struct WriteRequest {
    key: (TenantId, EventId),
    bytes: Vec<u8>,
    kind: &'static str,
    origin: Origin,
}

/// The event pipeline's shared state.
pub struct Events {
    consumer: String,
    pending_max: usize,
    busy_retry_after_ms: u64,
    tracker: DashMap<(TenantId, EventId), InFlight>,
    writer: mpsc::Sender<WriteRequest>,
    acks: mpsc::Sender<String>,
    hub: Arc<Hub>,
    view: Arc<ChainView>,
}

/// The receiving ends of the pipeline's queues, consumed by its tasks.
pub struct EventQueues {
    pub(crate) writer: mpsc::Receiver<WriteRequest>,
    pub acks: mpsc::Receiver<String>,
}

impl Events {
    pub fn new(
        config: &GatewayConfig,
        consumer: String,
        hub: Arc<Hub>,
        view: Arc<ChainView>,
    ) -> (Arc<Events>, EventQueues) {
        let (writer, writer_rx) = mpsc::channel(STREAM_WRITER_QUEUE_MAX);
        let (acks, acks_rx) = mpsc::channel(ACK_QUEUE_MAX);
        let events = Arc::new(Events {
            consumer,
            pending_max: config.events.pending_max,
            busy_retry_after_ms: config.events.busy_retry_after_ms,
            tracker: DashMap::new(),
            writer,
            acks,
            hub,
            view,
        });
        (
            events,
            EventQueues {
                writer: writer_rx,
                acks: acks_rx,
            },
        )
    }

    /// This gateway's name in the consumer group.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// Redis lost its data (it restarted without persistence, see `watch_redis` in `lib.rs`):
    /// the stream entries of events already durable may be gone with it. Forgets those whose
    /// entries the stream no longer holds (and those whose entry ids are not known), so that
    /// `event_status` answers `unknown` and a resubmission appends them again (the SDK resends
    /// every event it has not seen committed); the ledger's deduplication keeps each event once
    /// whichever copy commits. Events appended to the restarted Redis before the loss was
    /// noticed keep their entries, so they stay tracked and their commit is still pushed; events
    /// still waiting for their append stay too. If the stream cannot be read, every durable
    /// event is forgotten (the safe side: resubmissions are deduplicated). Returns how many
    /// were forgotten.
    pub async fn forget_durable(&self, store: &Store) -> usize {
        let mut unknown_ids = Vec::new();
        let mut candidates = Vec::new();
        for entry in self.tracker.iter().filter(|e| e.durable) {
            if entry.stream_ids.is_empty() {
                unknown_ids.push(*entry.key());
            } else {
                candidates.push((*entry.key(), entry.stream_ids.clone()));
            }
        }
        let mut conns = Vec::new();
        let mut forgotten = 0;
        for key in unknown_ids {
            if let Some((_, mut entry)) = self
                .tracker
                .remove_if(&key, |_, e| e.durable && e.stream_ids.is_empty())
            {
                forgotten += 1;
                conns.append(&mut entry.conns);
            }
        }
        for chunk in candidates.chunks(LOST_SWEEP_EVENTS_MAX) {
            match self.absent(store, chunk).await {
                Ok(absent) => {
                    for (key, ids) in absent {
                        if let Some((_, mut entry)) =
                            self.tracker.remove_if(&key, |_, e| &e.stream_ids == ids)
                        {
                            forgotten += 1;
                            conns.append(&mut entry.conns);
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "the stream cannot be read: forgetting every durable event");
                    for (key, ids) in chunk {
                        if let Some((_, mut entry)) = self.tracker.remove_if(key, |_, e| &e.stream_ids == ids)
                        {
                            forgotten += 1;
                            conns.append(&mut entry.conns);
                        }
                    }
                }
            }
        }
        self.release(conns);
        metrics::gauge!(m::EVENTS_IN_FLIGHT).set(self.tracker.len() as f64);
        forgotten
    }

    /// Of `candidates` (event, its stream entry ids), those whose entries are all gone from the
    /// stream and which the ledger has not committed.
    async fn absent<'a>(
        &self,
        store: &Store,
        candidates: &'a [((TenantId, EventId), Vec<String>)],
    ) -> Result<Vec<((TenantId, EventId), &'a Vec<String>)>, crate::store::StoreError> {
        let ids: Vec<String> = candidates
            .iter()
            .flat_map(|(_, ids)| ids.iter().cloned())
            .collect();
        let mut present = store.present(&ids).await?.into_iter();
        let mut absent = Vec::new();
        for (key, ids) in candidates {
            // All of this event's answers are consumed (not `any`, which would stop early and
            // misalign the next event's).
            let any = present.by_ref().take(ids.len()).fold(false, |any, p| any | p);
            if !any && !self.view.read(|l| l.has_event(key.0, &key.1)) {
                absent.push((*key, ids));
            }
        }
        Ok(absent)
    }

    /// Gives back the in-flight slots of forgotten events' connections.
    fn release(&self, conns: Vec<ConnId>) {
        for conn in conns {
            if let Some(handle) = self.hub.get(conn) {
                handle.in_flight.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Forgets in-flight events whose stream entries are all gone although the ledger has not
    /// committed them: Redis lost them without losing this gateway's marker (with AOF
    /// `everysec`, the last second of writes before a crash), so nothing would ever submit them
    /// and `event_status` would say `pending` for ever. Forgotten, they read `unknown`, and the
    /// SDK resubmits them (appended again; the ledger keeps each event once). Looks at events
    /// tracked for at least `older_than` (an entry is deleted only after its event committed, and
    /// a committed event leaves the tracker first), at most [`LOST_SWEEP_EVENTS_MAX`] per call.
    /// Returns how many were forgotten.
    pub async fn forget_lost(&self, store: &Store, older_than: Duration) -> usize {
        let candidates: Vec<((TenantId, EventId), Vec<String>)> = self
            .tracker
            .iter()
            .filter(|e| e.durable && !e.stream_ids.is_empty() && e.tracked_at.elapsed() >= older_than)
            .take(LOST_SWEEP_EVENTS_MAX)
            .map(|e| (*e.key(), e.stream_ids.clone()))
            .collect();
        if candidates.is_empty() {
            return 0;
        }
        let absent = match self.absent(store, &candidates).await {
            Ok(absent) => absent,
            Err(error) => {
                tracing::debug!(%error, "lost-entry sweep skipped");
                return 0;
            }
        };
        let mut conns = Vec::new();
        let mut forgotten = 0;
        for (key, ids) in absent {
            // Unless a resubmission appended it again meanwhile.
            if let Some((_, mut entry)) = self.tracker.remove_if(&key, |_, e| &e.stream_ids == ids) {
                forgotten += 1;
                conns.append(&mut entry.conns);
            }
        }
        self.release(conns);
        if forgotten > 0 {
            metrics::counter!(m::EVENTS_LOST_TOTAL).increment(forgotten as u64);
            metrics::gauge!(m::EVENTS_IN_FLIGHT).set(self.tracker.len() as f64);
            tracing::warn!(
                forgotten,
                "events in flight whose stream entries Redis lost were forgotten; their resubmissions are appended again"
            );
        }
        forgotten
    }

    /// Events in flight (accepted or claimed, not committed).
    pub fn in_flight(&self) -> usize {
        self.tracker.len()
    }

    /// Status of an event in flight: Some(durable).
    pub fn status(&self, tenant: TenantId, event_id: &EventId) -> Option<bool> {
        self.tracker.get(&(tenant, *event_id)).map(|e| e.durable)
    }

    fn busy(&self, reason: &'static str, message: &str) -> Refused {
        metrics::counter!(m::BUSY_TOTAL, "reason" => reason).increment(1);
        Refused {
            code: ErrorCode::Busy,
            message: message.into(),
            retry_after_ms: Some(self.busy_retry_after_ms),
        }
    }

    /// Submits a validated transaction (the caller checked decoding, tenant, permission and
    /// signatures). `conn` is the connection to notify of the commit, if any.
    pub fn submit(
        &self,
        tenant: TenantId,
        event_id: EventId,
        tx: &Transaction,
        kind: &'static str,
        origin: Origin,
    ) -> Result<Submitted, Refused> {
        let key = (tenant, event_id);
        if let Some((height, outcome)) = self.view.read(|l| l.event(tenant, &event_id)) {
            if let Origin::Internal(reply)
            | Origin::Connection {
                durable: Some(reply), ..
            } = origin
            {
                let _ = reply.send(Ok(()));
            }
            return Ok(Submitted::AlreadyCommitted { height, outcome });
        }
        let tx_id = tx.id();
        let conn = match &origin {
            Origin::Connection { conn, .. } => Some(*conn),
            Origin::Internal(_) => None,
        };
        if let Some(mut entry) = self.tracker.get_mut(&key) {
            if entry.tx_id != tx_id {
                return Err(Refused {
                    code: ErrorCode::Replay,
                    message: "this event id is in flight with a different transaction".into(),
                    retry_after_ms: None,
                });
            }
            if let Some(conn) = conn {
                if !entry.conns.contains(&conn) {
                    entry.conns.push(conn);
                    self.count_in_flight(conn);
                }
            }
            return match origin {
                // (A `durable` listener here hears nothing: it is dropped, which it takes for
                // "not durable".)
                Origin::Connection { conn, request_id, .. } if !entry.durable => {
                    entry.waiting.push((conn, request_id));
                    Ok(Submitted::Queued)
                }
                Origin::Internal(reply)
                | Origin::Connection {
                    durable: Some(reply), ..
                } => {
                    let _ = reply.send(Ok(()));
                    Ok(Submitted::AlreadyInFlight)
                }
                Origin::Connection { .. } => Ok(Submitted::AlreadyInFlight),
            };
        }
        if self.tracker.len() >= self.pending_max {
            return Err(self.busy("events_pending", "the chain is behind: too many events in flight"));
        }
        self.tracker.insert(
            key,
            InFlight {
                tx_id,
                stream_ids: Vec::new(),
                conns: conn.into_iter().collect(),
                waiting: Vec::new(),
                durable: false,
                accepted_at: Some(Instant::now()),
                tracked_at: Instant::now(),
                early_receipt: None,
            },
        );
        if let Some(conn) = conn {
            self.count_in_flight(conn);
        }
        let bytes = rmp_serde::to_vec(tx).expect("transactions encode");
        match self.writer.try_send(WriteRequest {
            key,
            bytes,
            kind,
            origin,
        }) {
            Ok(()) => {
                metrics::gauge!(m::EVENTS_IN_FLIGHT).set(self.tracker.len() as f64);
                metrics::gauge!(m::STREAM_WRITER_QUEUE_DEPTH)
                    .set((self.writer.max_capacity() - self.writer.capacity()) as f64);
                Ok(Submitted::Queued)
            }
            Err(_) => {
                self.tracker.remove(&key);
                if let Some(handle) = conn.and_then(|c| self.hub.get(c)) {
                    handle.in_flight.fetch_sub(1, Ordering::Relaxed);
                }
                Err(self.busy("writer_queue", "the event stream writer is saturated"))
            }
        }
    }

    fn count_in_flight(&self, conn: ConnId) {
        if let Some(handle) = self.hub.get(conn) {
            handle.in_flight.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Called by the follower for every committed transaction, in commit order.
    pub fn on_receipt(&self, receipt: &Receipt, kind: &'static str) {
        tracing::debug!(height = receipt.height, duplicate = receipt.duplicate, "receipt");
        if receipt.outcome == Outcome::rejected(Rejection::WindowFull) {
            // Not final: the ledger did not remember the event. It stays in flight and its
            // stream entry pending, so the batcher claims it again after `claim_idle_ms` and
            // resubmits it; the submitter hears of it only when it really commits.
            metrics::counter!(m::EVENTS_WINDOW_FULL_TOTAL).increment(1);
            return;
        }
        let in_flight = match self.tracker.entry((receipt.tenant, receipt.event_id)) {
            dashmap::mapref::entry::Entry::Vacant(_) => return,
            dashmap::mapref::entry::Entry::Occupied(mut entry) => {
                if !entry.get().durable {
                    // `accepted` has not been pushed yet: the writer delivers this after it.
                    entry.get_mut().early_receipt = Some((receipt.clone(), kind));
                    return;
                }
                entry.remove()
            }
        };
        self.deliver(in_flight, receipt, kind);
    }

    /// Delivers a commit to everyone waiting on `in_flight` (removed from the tracker).
    fn deliver(&self, in_flight: InFlight, receipt: &Receipt, kind: &'static str) {
        metrics::gauge!(m::EVENTS_IN_FLIGHT).set(self.tracker.len() as f64);
        let outcome_label = match &receipt.outcome {
            Outcome::Applied => "applied",
            Outcome::Settled { .. } => "settled",
            Outcome::Rejected { .. } => "rejected",
        };
        if !receipt.duplicate {
            metrics::counter!(m::EVENTS_COMMITTED_TOTAL, "kind" => kind, "outcome" => outcome_label)
                .increment(1);
            if let Outcome::Rejected { reason } = &receipt.outcome {
                metrics::counter!(m::REJECTIONS_TOTAL, "reason" => rejection_label(*reason)).increment(1);
            }
        }
        if let Some(at) = in_flight.accepted_at {
            metrics::histogram!(m::COMMIT_LATENCY_SECONDS).record(at.elapsed().as_secs_f64());
        }
        for id in in_flight.stream_ids {
            // A full ack queue only delays the ack: the entry is reclaimed, resubmitted, and
            // its duplicate receipt acks it.
            let _ = self.acks.try_send(id);
        }
        let message = commit_message(receipt.event_id, receipt.height, &receipt.outcome);
        for (conn, request_id) in in_flight.waiting {
            self.hub.push(
                conn,
                ServerMessage::Accepted {
                    request_id,
                    event_id: receipt.event_id,
                },
            );
        }
        for conn in in_flight.conns {
            if let Some(handle) = self.hub.get(conn) {
                handle.in_flight.fetch_sub(1, Ordering::Relaxed);
                crate::hub::push_to(&handle, message.clone());
            }
        }
    }

    /// The stream writer's answer for one submission: the id of its stream entry, or `None`
    /// when the append failed. `accepted` (or `unavailable`) to whoever waits, then a commit
    /// that arrived early.
    pub(crate) fn written(&self, request: WriteRequest, stream_id: Option<String>) {
        let (tenant, event_id) = request.key;
        let ok = stream_id.is_some();
        // The `accepted` pushes go out while the entry's lock is held, so that a receipt
        // handled at the same time pushes `committed` after them (see `early_receipt`).
        let mut entry = self.tracker.get_mut(&request.key);
        let committed = entry.as_ref().is_some_and(|e| e.early_receipt.is_some());
        if ok || committed {
            metrics::counter!(m::EVENTS_ACCEPTED_TOTAL, "kind" => request.kind).increment(1);
            let early = entry.as_mut().and_then(|entry| {
                if !entry.durable && entry.accepted_at.is_some() {
                    // The commit latency counts from `accepted` (durable), not from the request.
                    entry.accepted_at = Some(Instant::now());
                }
                entry.durable = true;
                if let Some(id) = stream_id {
                    if !entry.stream_ids.contains(&id) {
                        entry.stream_ids.push(id);
                    }
                }
                for (conn, request_id) in std::mem::take(&mut entry.waiting) {
                    self.hub
                        .push(conn, ServerMessage::Accepted { request_id, event_id });
                }
                entry.early_receipt.take()
            });
            match request.origin {
                Origin::Connection {
                    conn,
                    request_id,
                    durable,
                } => {
                    self.hub
                        .push(conn, ServerMessage::Accepted { request_id, event_id });
                    if let Some(durable) = durable {
                        let _ = durable.send(Ok(()));
                    }
                }
                Origin::Internal(reply) => {
                    let _ = reply.send(Ok(()));
                }
            }
            drop(entry);
            if let Some((receipt, kind)) = early {
                if let Some((_, in_flight)) = self.tracker.remove(&request.key) {
                    self.deliver(in_flight, &receipt, kind);
                }
            }
        } else {
            drop(entry);
            let removed = self.tracker.remove(&(tenant, event_id));
            let error = |request_id| ServerMessage::Error {
                request_id,
                code: ErrorCode::Unavailable,
                message: "the event stream is unavailable; retry".into(),
                retry_after_ms: Some(self.busy_retry_after_ms),
            };
            if let Some((_, entry)) = removed {
                for (conn, request_id) in entry.waiting {
                    self.hub.push(conn, error(request_id));
                }
                for conn in entry.conns {
                    if let Some(handle) = self.hub.get(conn) {
                        handle.in_flight.fetch_sub(1, Ordering::Relaxed);
                    }
                }
            }
            match request.origin {
                Origin::Connection {
                    conn,
                    request_id,
                    durable,
                } => {
                    self.hub.push(conn, error(request_id));
                    if let Some(durable) = durable {
                        let _ = durable.send(Err(ErrorCode::Unavailable));
                    }
                }
                Origin::Internal(reply) => {
                    let _ = reply.send(Err(ErrorCode::Unavailable));
                }
            }
        }
    }
}

/// `committed` or `rejected`, as the protocol pushes it.
pub fn commit_message(event_id: EventId, height: u64, outcome: &Outcome) -> ServerMessage {
    match outcome {
        Outcome::Rejected { reason } => ServerMessage::Rejected {
            event_id,
            height,
            reason: *reason,
        },
        outcome => ServerMessage::Committed {
            event_id,
            height,
            outcome: outcome.clone(),
        },
    }
}

/// A rejection's wire name (bounded: one per enum variant).
pub fn rejection_label(reason: hoard_types::Rejection) -> &'static str {
    use hoard_types::Rejection as R;
    match reason {
        R::Malformed => "malformed",
        R::WrongChain => "wrong_chain",
        R::BadSignature => "bad_signature",
        R::MissingSignature => "missing_signature",
        R::WrongTenant => "wrong_tenant",
        R::Unauthorized => "unauthorized",
        R::Expired => "expired",
        R::ExpiryTooFar => "expiry_too_far",
        R::UnknownTenant => "unknown_tenant",
        R::TenantExists => "tenant_exists",
        R::UnknownAccount => "unknown_account",
        R::AccountExists => "account_exists",
        R::UnknownCurrency => "unknown_currency",
        R::CurrencyExists => "currency_exists",
        R::UnknownClass => "unknown_class",
        R::ClassExists => "class_exists",
        R::UnknownItem => "unknown_item",
        R::ItemExists => "item_exists",
        R::NotOwner => "not_owner",
        R::InsufficientFunds => "insufficient_funds",
        R::InsufficientQuantity => "insufficient_quantity",
        R::SupplyExceeded => "supply_exceeded",
        R::NotStackable => "not_stackable",
        R::ClassMismatch => "class_mismatch",
        R::InvalidAmount => "invalid_amount",
        R::SelfTransfer => "self_transfer",
        R::WindowFull => "window_full",
    }
}

/// The stream writer: appends queued submissions, many per round trip, then answers `accepted`.
pub(crate) async fn run_writer(
    events: Arc<Events>,
    store: Arc<Store>,
    mut writer: mpsc::Receiver<WriteRequest>,
) {
    let mut requests = Vec::with_capacity(STREAM_WRITER_PIPELINE_MAX);
    loop {
        requests.clear();
        if writer.recv_many(&mut requests, STREAM_WRITER_PIPELINE_MAX).await == 0 {
            return;
        }
        // What the writer faces: the requests in hand and those still queued behind them.
        metrics::gauge!(m::STREAM_WRITER_QUEUE_DEPTH).set((requests.len() + writer.len()) as f64);
        let started = Instant::now();
        let transactions: Vec<&[u8]> = requests.iter().map(|r| r.bytes.as_slice()).collect();
        let result = store.append(&transactions).await;
        tracing::debug!(events = transactions.len(), ids = ?result.as_ref().ok(), "appended to the event stream");
        drop(transactions);
        metrics::histogram!(m::STREAM_WRITE_DURATION_SECONDS).record(started.elapsed().as_secs_f64());
        if let Err(error) = &result {
            tracing::warn!(%error, "appending to the event stream failed");
        }
        let mut ids = result.ok().map(Vec::into_iter);
        for request in requests.drain(..) {
            // One id per appended transaction, in order; none when the append failed.
            let id = ids.as_mut().map(|ids| ids.next().expect("an id per transaction"));
            events.written(request, id);
        }
    }
}

/// Acknowledges (XACK) and deletes (XDEL) committed entries, many per round trip.
pub async fn run_acker(store: Arc<Store>, mut acks: mpsc::Receiver<String>) {
    let mut ids = Vec::with_capacity(XACK_IDS_MAX);
    loop {
        ids.clear();
        if acks.recv_many(&mut ids, XACK_IDS_MAX).await == 0 {
            return;
        }
        if let Err(error) = store.ack(&ids).await {
            // Unacked entries are reclaimed later; their duplicate receipts ack them then.
            tracing::warn!(%error, "XACK failed");
        }
    }
}

/// Settings of the batcher.
pub struct BatcherSettings {
    pub batch_max: usize,
    pub wait_ms: u64,
    pub claim_idle_ms: u64,
}

/// The batcher: reads the stream (new entries and long-pending ones) and submits batches.
pub async fn run_batcher(
    events: Arc<Events>,
    store: Arc<Store>,
    chain: Arc<dyn Chain>,
    settings: BatcherSettings,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut reader: Option<StreamReader> = None;
    let mut last_claim = Instant::now();
    let mut claim_cursor = "0-0".to_string();
    while !*stop.borrow() {
        if reader.is_none() {
            match store.reader(Duration::from_millis(settings.wait_ms)).await {
                Ok(r) => reader = Some(r),
                Err(error) => {
                    tracing::warn!(%error, "batcher cannot reach the event stream");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
        }
        let stream = reader.as_mut().expect("connected");
        let mut entries: Vec<StreamEntry> = Vec::new();
        // Reclaim entries idle for too long (a dead gateway's, or ones the chain lost).
        if last_claim.elapsed() >= Duration::from_millis(settings.claim_idle_ms / 2 + 1) {
            last_claim = Instant::now();
            let claimed = stream
                .claim(
                    &events.consumer,
                    settings.claim_idle_ms,
                    &claim_cursor,
                    settings.batch_max,
                )
                .await;
            match claimed {
                Ok(claimed) => {
                    claim_cursor = claimed.next_cursor;
                    if !claimed.entries.is_empty() {
                        metrics::counter!(m::EVENTS_CLAIMED_TOTAL).increment(claimed.entries.len() as u64);
                        tracing::info!(entries = claimed.entries.len(), "claimed idle stream entries");
                    }
                    entries.extend(claimed.entries);
                }
                Err(error) => {
                    tracing::warn!(%error, "XAUTOCLAIM failed");
                    reader = None;
                    continue;
                }
            }
        }
        if entries.is_empty() {
            let read = tokio::select! {
                read = stream.read(&events.consumer, settings.batch_max, settings.wait_ms) => read,
                _ = stop.changed() => continue,
            };
            match read {
                Ok(read) => entries.extend(read),
                Err(error) => {
                    tracing::warn!(%error, "XREADGROUP failed");
                    reader = None;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        }
        if entries.is_empty() {
            continue;
        }
        tracing::debug!(entries = entries.len(), "batcher read stream entries");
        let mut batch = Vec::with_capacity(entries.len());
        for entry in entries {
            let decoded = entry
                .tx
                .as_deref()
                .and_then(|b| rmp_serde::from_slice::<Transaction>(b).ok())
                .and_then(|tx| tx.decode_payload().ok().map(|p| (tx, p)));
            let Some((tx, payload)) = decoded else {
                tracing::error!(id = %entry.id, "undecodable stream entry dropped");
                let _ = events.acks.try_send(entry.id);
                continue;
            };
            let key = (payload.tenant, payload.event_id);
            if events
                .view
                .read(|l| l.has_event(payload.tenant, &payload.event_id))
            {
                // Already committed (a crash between commit and XACK): nothing to resubmit.
                let _ = events.acks.try_send(entry.id.clone());
                if let Some(receipt) = events.view.read(|l| {
                    l.event(payload.tenant, &payload.event_id)
                        .map(|(height, outcome)| Receipt {
                            tenant: payload.tenant,
                            event_id: payload.event_id,
                            height,
                            outcome,
                            duplicate: true,
                        })
                }) {
                    events.on_receipt(&receipt, crate::view::kind_of(&payload.body));
                }
                continue;
            }
            let mut in_flight = events.tracker.entry(key).or_insert_with(|| InFlight {
                tx_id: tx.id(),
                stream_ids: Vec::new(),
                conns: Vec::new(),
                waiting: Vec::new(),
                durable: true,
                accepted_at: None,
                tracked_at: Instant::now(),
                early_receipt: None,
            });
            if !in_flight.stream_ids.contains(&entry.id) {
                in_flight.stream_ids.push(entry.id.clone());
            }
            drop(in_flight);
            batch.push(tx);
        }
        metrics::gauge!(m::EVENTS_IN_FLIGHT).set(events.tracker.len() as f64);
        if batch.is_empty() {
            continue;
        }
        metrics::histogram!(m::BATCH_SIZE_TRANSACTIONS).record(batch.len() as f64);
        let submitted = tokio::select! {
            submitted = chain.submit(batch) => submitted,
            _ = crate::stopped(&mut stop) => break,
        };
        tracing::debug!(ok = submitted.is_ok(), "batch submitted to the chain");
        if let Err(error) = submitted {
            // The entries stay pending and are reclaimed after claim_idle_ms.
            metrics::counter!(m::BATCH_SUBMIT_FAILURES_TOTAL).increment(1);
            tracing::warn!(%error, "chain did not take a batch");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize};

    use hoard_ledger::testing::{key, World};
    use hoard_types::{Custody, TenantId};
    use tokio::sync::Notify;

    use super::*;
    use crate::hub::ConnHandle;

    /// Events with one registered connection; the connection's outgoing queue.
    fn pipeline(world: &World) -> (Arc<Events>, EventQueues, mpsc::Receiver<Box<ServerMessage>>) {
        let hub = Arc::new(Hub::default());
        let view = Arc::new(ChainView::new(&world.genesis()));
        let (events, queues) = Events::new(&GatewayConfig::default(), "test".into(), hub.clone(), view);
        let (outbound, outbound_rx) = mpsc::channel(16);
        hub.register(
            1,
            ConnHandle {
                tenant: TenantId(1),
                player: None,
                outbound,
                slow: Arc::new(AtomicBool::new(false)),
                slow_notify: Arc::new(Notify::new()),
                in_flight: Arc::new(AtomicUsize::new(0)),
            },
        );
        (events, queues, outbound_rx)
    }

    fn drain(outbound: &mut mpsc::Receiver<Box<ServerMessage>>) -> Vec<ServerMessage> {
        std::iter::from_fn(|| outbound.try_recv().ok().map(|m| *m)).collect()
    }

    /// One event submitted by connection 1 with `request_id`, taken off the writer's queue (the
    /// append is "in progress": the test decides how it ends with [`Events::written`]).
    struct Submission {
        events: Arc<Events>,
        queues: EventQueues,
        outbound: mpsc::Receiver<Box<ServerMessage>>,
        event_id: EventId,
        request: WriteRequest,
    }

    fn submit(player: &str, request_id: u64) -> Submission {
        let mut world = World::new(1);
        let tx = world.register(TenantId(1), &key(player, 0).public(), Custody::Custodial);
        let event_id = tx.decode_payload().expect("decodes").event_id;
        let (events, mut queues, outbound) = pipeline(&world);
        let origin = Origin::Connection {
            conn: 1,
            request_id,
            durable: None,
        };
        assert!(matches!(
            events.submit(TenantId(1), event_id, &tx, "register_account", origin),
            Ok(Submitted::Queued)
        ));
        let request = queues.writer.try_recv().expect("queued for the writer");
        Submission {
            events,
            queues,
            outbound,
            event_id,
            request,
        }
    }

    fn receipt(event_id: EventId, height: u64, outcome: Outcome) -> Receipt {
        Receipt {
            tenant: TenantId(1),
            event_id,
            height,
            outcome,
            duplicate: false,
        }
    }

    /// The chain can commit an event (the batcher read it from the stream) before the stream
    /// writer has handled its append's answer; the submitter must still hear `accepted` first.
    #[test]
    fn a_commit_before_the_append_answer_is_pushed_after_accepted() {
        let Submission {
            events,
            mut queues,
            mut outbound,
            event_id,
            request,
        } = submit("alice", 9);
        events.on_receipt(&receipt(event_id, 3, Outcome::Applied), "register_account");
        assert!(
            drain(&mut outbound).is_empty(),
            "committed pushed before accepted"
        );
        assert_eq!(events.in_flight(), 1);
        events.written(request, Some("7-0".into()));
        let pushed = drain(&mut outbound);
        assert!(
            matches!(
                pushed.as_slice(),
                [
                    ServerMessage::Accepted { request_id: 9, .. },
                    ServerMessage::Committed { height: 3, .. }
                ]
            ),
            "{pushed:?}"
        );
        assert_eq!(events.in_flight(), 0);
        assert_eq!(
            queues.acks.try_recv().ok().as_deref(),
            Some("7-0"),
            "the entry the writer appended is acknowledged"
        );
    }

    /// An append whose answer was lost (a timeout) but whose event committed is `accepted`,
    /// not `unavailable`.
    #[test]
    fn a_failed_append_whose_event_committed_answers_accepted_and_committed() {
        let Submission {
            events,
            mut outbound,
            event_id,
            request,
            ..
        } = submit("bob", 4);
        events.on_receipt(&receipt(event_id, 2, Outcome::Applied), "register_account");
        events.written(request, None);
        let pushed = drain(&mut outbound);
        assert!(
            matches!(
                pushed.as_slice(),
                [
                    ServerMessage::Accepted { request_id: 4, .. },
                    ServerMessage::Committed { .. }
                ]
            ),
            "{pushed:?}"
        );
    }

    /// `window_full` is not final: the event stays in flight, nothing is pushed or acked, and
    /// the later real commit reaches the submitter.
    #[test]
    fn a_window_full_receipt_keeps_the_event_in_flight() {
        let Submission {
            events,
            mut outbound,
            event_id,
            request,
            ..
        } = submit("carol", 5);
        events.written(request, Some("5-0".into()));
        assert!(matches!(
            drain(&mut outbound).as_slice(),
            [ServerMessage::Accepted { .. }]
        ));
        let full = receipt(event_id, 2, Outcome::rejected(Rejection::WindowFull));
        events.on_receipt(&full, "register_account");
        assert!(drain(&mut outbound).is_empty());
        assert_eq!(
            events.status(TenantId(1), &event_id),
            Some(true),
            "still in flight"
        );
        events.on_receipt(&receipt(event_id, 5, Outcome::Applied), "register_account");
        assert!(matches!(
            drain(&mut outbound).as_slice(),
            [ServerMessage::Committed { height: 5, .. }]
        ));
        assert_eq!(events.in_flight(), 0);
    }

    /// Submits `txs` as connection 1's requests 0, 1, ...; each is queued for the writer.
    fn submit_all(events: &Events, txs: &[Transaction]) -> Vec<EventId> {
        txs.iter()
            .enumerate()
            .map(|(request_id, tx)| {
                let event_id = tx.decode_payload().expect("decodes").event_id;
                let origin = Origin::Connection {
                    conn: 1,
                    request_id: request_id as u64,
                    durable: None,
                };
                assert!(matches!(
                    events.submit(TenantId(1), event_id, tx, "register_account", origin),
                    Ok(Submitted::Queued)
                ));
                event_id
            })
            .collect()
    }

    /// Redis lost an event's stream entry without losing the gateway's marker (the last second
    /// of AOF `everysec`): nothing would submit the event again and it would stay `pending` for
    /// ever. The sweep forgets it (`event_status`: unknown, so the SDK resubmits); an event whose
    /// entry is still there stays, and nothing younger than the age given is looked at.
    #[tokio::test]
    async fn an_event_whose_stream_entry_was_lost_is_forgotten() {
        let store = Store::Embedded(Arc::new(crate::embedded::EmbeddedStore::new()));
        let mut world = World::new(1);
        let txs = [
            world.register(TenantId(1), &key("erin", 0).public(), Custody::Custodial),
            world.register(TenantId(1), &key("frank", 0).public(), Custody::Custodial),
        ];
        let (events, mut queues, mut outbound) = pipeline(&world);
        let ids = submit_all(&events, &txs);
        let kept = queues.writer.try_recv().expect("queued");
        let lost = queues.writer.try_recv().expect("queued");
        // The first entry is in the stream; the second one's id names nothing (lost).
        let appended = store.append(&[kept.bytes.as_slice()]).await.expect("append");
        events.written(kept, appended.into_iter().next());
        events.written(lost, Some("1-0".into()));
        assert_eq!(drain(&mut outbound).len(), 2, "both accepted");
        assert_eq!(events.forget_lost(&store, Duration::from_secs(3600)).await, 0);
        assert_eq!(events.forget_lost(&store, Duration::ZERO).await, 1);
        assert_eq!(events.status(TenantId(1), &ids[0]), Some(true), "still in flight");
        assert_eq!(events.status(TenantId(1), &ids[1]), None, "forgotten: unknown");
        assert_eq!(events.forget_lost(&store, Duration::ZERO).await, 0);
    }

    /// After Redis lost its data, only the events whose entries the (restarted) stream does not
    /// hold are forgotten: one appended to it before the loss was noticed stays in flight (its
    /// commit is still pushed), as does one whose append has not been answered yet.
    #[tokio::test]
    async fn after_a_data_loss_only_events_missing_from_the_stream_are_forgotten() {
        let store = Store::Embedded(Arc::new(crate::embedded::EmbeddedStore::new()));
        let mut world = World::new(1);
        let txs = [
            world.register(TenantId(1), &key("gina", 0).public(), Custody::Custodial),
            world.register(TenantId(1), &key("hank", 0).public(), Custody::Custodial),
            world.register(TenantId(1), &key("ivy", 0).public(), Custody::Custodial),
        ];
        let (events, mut queues, mut outbound) = pipeline(&world);
        let ids = submit_all(&events, &txs);
        let before_loss = queues.writer.try_recv().expect("queued");
        let after_loss = queues.writer.try_recv().expect("queued");
        let _unanswered = queues.writer.try_recv().expect("queued");
        // The first entry went down with the old Redis; the second is in the restarted one.
        events.written(before_loss, Some("1-0".into()));
        let appended = store
            .append(&[after_loss.bytes.as_slice()])
            .await
            .expect("append");
        events.written(after_loss, appended.into_iter().next());
        assert_eq!(drain(&mut outbound).len(), 2, "two accepted");
        assert_eq!(events.forget_durable(&store).await, 1);
        assert_eq!(events.status(TenantId(1), &ids[0]), None, "forgotten: unknown");
        assert_eq!(
            events.status(TenantId(1), &ids[1]),
            Some(true),
            "in the stream: still tracked"
        );
        assert_eq!(
            events.status(TenantId(1), &ids[2]),
            Some(false),
            "not yet durable: still tracked"
        );
    }
}
