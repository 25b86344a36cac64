//! The PBFT replica: a pure, deterministic state machine.
//!
//! Inputs: [`Replica::on_message`], [`Replica::on_request`], [`Replica::on_timer`] (time enters
//! only through [`Replica::set_now`]). Outputs: a list of [`Output`]s the driver performs in
//! order. Every handler drops stale messages first, then verifies signatures, then applies.
//!
//! Safety rules (Castro & Liskov, "Practical Byzantine Fault Tolerance", OSDI 1999, and the
//! signature variant of the view change) appear in the code as named local variables.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use hoard_types::crypto::Hash;
use tracing::{debug, info, warn};

use crate::app::{App, Snapshot};
use crate::constants::{
    BATCHES_PER_SLOT_MAX, CATCHUP_BATCHES_MAX, COMMIT_VIEWS_PER_REPLICA_MAX, FORWARD_PER_TICK_MAX,
    VIEWS_AHEAD_MAX, VIEW_CHANGE_BACKOFF_SHIFT_MAX,
};
use crate::error::{Error, Result};
use crate::executed::ExecutedRequests;
use crate::message::{
    Batch, CheckpointCert, Message, MessageKind, PreparedCert, ReplicaId, Request, SignedMessage, Verifier,
};
use crate::types::{Committed, Config, DurableState, Output, Record, Stats, Timer};

/// One sequence number's consensus state.
#[derive(Clone, Debug, Default)]
struct Slot {
    /// The view the per-view fields below belong to.
    view: u64,
    /// The primary's pre-prepare in `view`, and its batch digest.
    pre_prepare: Option<(SignedMessage, Hash)>,
    /// Prepares in `view` from backups, by signer.
    prepares: BTreeMap<ReplicaId, (Hash, SignedMessage)>,
    my_prepare: Option<(Hash, SignedMessage)>,
    my_commit: Option<(Hash, SignedMessage)>,
    /// Candidate batches (from pre-prepares of any view and catch-up proofs).
    batches: Vec<SlotBatch>,
    /// Our highest-view prepared certificate (view, digest, cert): carried into view changes.
    prepared: Option<(u64, Hash, PreparedCert)>,
    /// Commit votes by (signer, view).
    commits: BTreeMap<(ReplicaId, u64), (Hash, SignedMessage)>,
    /// Set once 2f+1 commits of one view agree and the batch is known: (view, batch).
    committed: Option<(u64, SlotBatch)>,
}

/// A batch with its digest and its requests' digests (hashed once, when it arrives).
#[derive(Clone, Debug)]
struct SlotBatch {
    digest: Hash,
    batch: Arc<Batch>,
    request_digests: Arc<Vec<Hash>>,
    /// A `Record::Batch` for it was output (it is on disk before any record naming it).
    persisted: bool,
}

impl SlotBatch {
    /// Hashes the batch's requests once; the batch digest comes from those digests.
    fn new(batch: Arc<Batch>) -> SlotBatch {
        let request_digests = batch.request_digests();
        SlotBatch {
            digest: Batch::digest_of(batch.timestamp_ms, &request_digests),
            batch,
            request_digests: Arc::new(request_digests),
            persisted: false,
        }
    }
}

impl Slot {
    fn batch(&self, digest: &Hash) -> Option<Arc<Batch>> {
        self.batches
            .iter()
            .find(|b| b.digest == *digest)
            .map(|b| b.batch.clone())
    }

    fn add_batch(&mut self, entry: SlotBatch) {
        if let Some(existing) = self.batches.iter_mut().find(|b| b.digest == entry.digest) {
            existing.persisted |= entry.persisted;
            return;
        }
        if self.batches.len() >= BATCHES_PER_SLOT_MAX {
            self.batches.remove(0);
        }
        self.batches.push(entry);
    }

    /// Outputs `Record::Batch` for the batch with `digest` unless it was output already.
    fn persist_batch(&mut self, seq: u64, digest: Hash, out: &mut Vec<Output>) {
        if let Some(entry) = self.batches.iter_mut().find(|b| b.digest == digest) {
            if !entry.persisted {
                entry.persisted = true;
                out.push(Output::Persist(Record::Batch {
                    seq,
                    digest,
                    batch: entry.batch.clone(),
                }));
            }
        }
    }

    /// What a commit proof for this executed slot carries: the batch and the commits of one
    /// view for it. The committed certificate when we hold one; otherwise (the slot was
    /// executed from our block log after a restart, or its commits arrived after we executed)
    /// the batch with the most commits of one view we hold for it. A lagging peer may hold
    /// the other commits and lack only the batch: a new view re-proposes prepared slots by
    /// digest, and the primary re-sends pre-prepares only to backups whose prepare it lacks.
    /// The peer checks every commit and commits only on 2f+1 of one view for the digest.
    fn catch_up_proof(&self) -> Option<(Hash, Arc<Batch>, Vec<SignedMessage>)> {
        let (view, digest, batch) = match &self.committed {
            Some((view, entry)) => (*view, entry.digest, entry.batch.clone()),
            None => {
                let mut counts: BTreeMap<(u64, Hash), usize> = BTreeMap::new();
                for ((_, view), (digest, _)) in &self.commits {
                    if self.batch(digest).is_some() {
                        *counts.entry((*view, *digest)).or_default() += 1;
                    }
                }
                let ((view, digest), _) = counts
                    .into_iter()
                    .max_by_key(|((view, _), count)| (*count, *view))?;
                (view, digest, self.batch(&digest)?)
            }
        };
        let commits: Vec<SignedMessage> = self
            .commits
            .iter()
            .filter(|((_, v), (d, _))| *v == view && *d == digest)
            .map(|(_, (_, m))| m.clone())
            .collect();
        Some((digest, batch, commits))
    }

    /// Forget what belongs to an older view (prepared certificates and commits stay).
    fn enter_view(&mut self, view: u64) {
        if self.view < view {
            self.view = view;
            self.pre_prepare = None;
            self.prepares.clear();
            self.my_prepare = None;
            self.my_commit = None;
        }
    }
}

/// Our checkpoint and the votes for one checkpoint sequence number.
#[derive(Clone, Debug, Default)]
struct CheckpointSlot {
    /// Our digest and snapshot at this seq, once executed.
    own: Option<(Hash, Snapshot, SignedMessage)>,
    votes: BTreeMap<ReplicaId, (Hash, SignedMessage)>,
}

/// A validated view-change message.
#[derive(Clone, Debug)]
struct ViewChangeInfo {
    msg: SignedMessage,
    stable: Option<CheckpointCert>,
    /// (seq, view, digest) of each prepared certificate (certificates carry digests, never
    /// batches: a view change stays small however large the batches in the window are).
    prepared: Vec<(u64, u64, Hash)>,
    certs: Vec<PreparedCert>,
}

impl ViewChangeInfo {
    /// Every signature inside: the message's own, its checkpoint and prepared certificates.
    fn signatures<'a>(&'a self, all: &mut Vec<&'a SignedMessage>) {
        all.push(&self.msg);
        if let Some(cert) = &self.stable {
            all.extend(cert.votes.iter());
        }
        for cert in &self.certs {
            all.push(&cert.pre_prepare);
            all.extend(cert.prepares.iter());
        }
    }
}

/// One slot of a new view as a replica enters it.
struct NewViewEntry {
    seq: u64,
    pre_prepare: SignedMessage,
    digest: Hash,
    /// `None`: we do not hold the batch (yet).
    batch: Option<SlotBatch>,
}

/// The pre-prepares a new view must contain.
struct NewViewPlan {
    min_cert: Option<CheckpointCert>,
    max_seq: u64,
    /// (seq, batch digest): a carried-over batch, or the null batch.
    entries: Vec<(u64, Hash)>,
}

#[derive(Clone, Debug)]
struct Transfer {
    cert: CheckpointCert,
    peer: ReplicaId,
    attempts: u32,
}

/// A PBFT replica over the app `A`.
pub struct Replica<A: App> {
    config: Config,
    verifier: Verifier,
    n: usize,
    f: usize,
    app: A,
    now_ms: u64,
    view: u64,
    in_view_change: bool,
    view_change_attempts: u32,
    /// h: the last stable checkpoint.
    low: u64,
    last_executed: u64,
    stable: Option<CheckpointCert>,
    /// The newest stable checkpoint we hold a snapshot of (what we serve to others).
    stable_snapshot: Option<(CheckpointCert, Snapshot)>,
    slots: BTreeMap<u64, Slot>,
    checkpoints: BTreeMap<u64, CheckpointSlot>,
    /// Primary: the last sequence number assigned in this view.
    next_seq: u64,
    last_timestamp_ms: u64,
    pending: BTreeMap<Hash, Request>,
    /// Sum of `size_bytes` of `pending` (bounded by `Config::pending_bytes_max`).
    pending_bytes: usize,
    pending_order: VecDeque<Hash>,
    /// Pending requests already in a pre-prepare of this view.
    proposed: BTreeSet<Hash>,
    /// Recently executed requests and their replies, to answer retransmissions.
    executed_recent: ExecutedRequests,
    batch_timer_armed: bool,
    view_change_timer_armed: bool,
    view_changes: BTreeMap<u64, BTreeMap<ReplicaId, ViewChangeInfo>>,
    own_view_change: Option<SignedMessage>,
    new_view: Option<SignedMessage>,
    transfer: Option<Transfer>,
    transfer_target: Option<CheckpointCert>,
    /// False after a failed restore or a digest mismatch: nothing executes until a transfer.
    app_valid: bool,
    served_ms: Vec<u64>,
    snapshot_served_ms: Vec<u64>,
    executed_at_last_tick: u64,
    /// The last executed seq each peer reported in its status.
    peer_executed: Vec<u64>,
    /// Replicas that suspect the primary of the current view, and our own suspicion.
    suspects: BTreeSet<ReplicaId>,
    own_suspect: Option<SignedMessage>,
    stats: Stats,
}

impl<A: App> Replica<A> {
    /// A replica starting from genesis (`app` at seq 0). Call [`Replica::start`] next.
    pub fn new(config: Config, app: A) -> Result<Replica<A>> {
        config.validate()?;
        let n = config.n();
        let f = config.f();
        let last_executed = app.last_executed();
        Ok(Replica {
            verifier: Verifier::new(&config.keys),
            n,
            f,
            app,
            now_ms: 0,
            view: 0,
            in_view_change: false,
            view_change_attempts: 0,
            low: 0,
            last_executed,
            stable: None,
            stable_snapshot: None,
            slots: BTreeMap::new(),
            checkpoints: BTreeMap::new(),
            next_seq: last_executed,
            last_timestamp_ms: 0,
            pending: BTreeMap::new(),
            pending_bytes: 0,
            pending_order: VecDeque::new(),
            proposed: BTreeSet::new(),
            executed_recent: ExecutedRequests::default(),
            batch_timer_armed: false,
            view_change_timer_armed: false,
            view_changes: BTreeMap::new(),
            own_view_change: None,
            new_view: None,
            transfer: None,
            transfer_target: None,
            app_valid: true,
            served_ms: vec![0; n],
            snapshot_served_ms: vec![0; n],
            executed_at_last_tick: last_executed,
            peer_executed: vec![0; n],
            suspects: BTreeSet::new(),
            own_suspect: None,
            stats: Stats::default(),
            config,
        })
    }

    /// A replica restarting from its disk. `app` was restored from its latest snapshot and
    /// replayed from the block log by the driver; `durable` is what the Persist records left.
    /// Call [`Replica::start`] next.
    pub fn recover(config: Config, app: A, durable: DurableState) -> Result<Replica<A>> {
        let mut replica = Replica::new(config, app)?;
        replica.view = durable.view;
        replica.in_view_change = durable.in_view_change;
        if let (Some(cert), Some(snapshot)) = (durable.stable.clone(), durable.stable_snapshot.clone()) {
            if replica.app.last_executed() < cert.seq {
                let digest = replica
                    .app
                    .restore(snapshot.bytes())
                    .map_err(|e| Error::App(e.to_string()))?;
                if digest != cert.digest.0 || replica.app.last_executed() != cert.seq {
                    return Err(Error::App(
                        "the durable snapshot does not match its certificate".into(),
                    ));
                }
            }
            replica.low = cert.seq;
            let cert_for_snapshot = cert.clone();
            replica.stable = Some(cert);
            replica.stable_snapshot = Some((cert_for_snapshot, snapshot));
        }
        replica.last_executed = replica.app.last_executed();
        replica.next_seq = replica.last_executed.max(replica.low);
        let me = replica.config.id;
        let view = replica.view;
        if let Some(msg) = durable.new_view.clone() {
            if let Ok(Message::NewView {
                view: nv_view,
                pre_prepares,
                ..
            }) = replica.decode(&msg)
            {
                if nv_view == view {
                    let null = Batch::null().digest();
                    for pp in pre_prepares {
                        if let Ok(Message::PrePrepare { seq, digest, .. }) = replica.decode(&pp) {
                            if seq > replica.low {
                                let slot = replica.slots.entry(seq).or_default();
                                slot.enter_view(view);
                                if digest == null {
                                    slot.add_batch(SlotBatch::new(Arc::new(Batch::null())));
                                }
                                slot.pre_prepare = Some((pp.without_batch(), digest));
                            }
                            replica.next_seq = replica.next_seq.max(seq);
                        }
                    }
                    replica.new_view = Some(msg);
                }
            }
        }
        for (seq, durable_slot) in durable.slots {
            if seq <= replica.low {
                continue;
            }
            let slot = replica.slots.entry(seq).or_default();
            slot.enter_view(view);
            // The batches first: the pre-prepares in the records below get theirs back.
            for (_, batch) in durable_slot.batches {
                slot.add_batch(SlotBatch {
                    persisted: true,
                    ..SlotBatch::new(batch)
                });
            }
            // A slot a new view gave us by digest may have no batch on disk: what we signed
            // is restored by digest all the same (a prepared certificate is never forgotten),
            // and the batch comes from a peer before we execute.
            let attach = |slot: &Slot, pp: SignedMessage, digest: Hash| -> SignedMessage {
                match slot.batch(&digest) {
                    Some(batch) => pp.with_batch(batch),
                    None => pp.without_batch(),
                }
            };
            if let Some((pp_view, msg)) = durable_slot.pre_prepare {
                if pp_view == view {
                    if let Ok(Message::PrePrepare { digest, .. }) = Message::decode(&msg.payload, usize::MAX)
                    {
                        slot.pre_prepare = Some((attach(slot, msg, digest), digest));
                        replica.next_seq = replica.next_seq.max(seq);
                    }
                }
            }
            if let Some((p_view, digest, pp, prepare)) = durable_slot.prepare {
                if p_view == view {
                    slot.pre_prepare = Some((attach(slot, pp, digest), digest));
                    slot.prepares.insert(me, (digest, prepare.clone()));
                    slot.my_prepare = Some((digest, prepare));
                }
            }
            if let Some((c_view, digest, mut cert, commit)) = durable_slot.commit {
                cert.pre_prepare = cert.pre_prepare.without_batch();
                if c_view == view {
                    slot.pre_prepare = Some((attach(slot, cert.pre_prepare.clone(), digest), digest));
                    for prepare in &cert.prepares {
                        slot.prepares.insert(prepare.signer, (digest, prepare.clone()));
                    }
                    slot.my_commit = Some((digest, commit.clone()));
                }
                slot.prepared = Some((c_view, digest, cert));
                slot.commits.insert((me, c_view), (digest, commit));
            }
            if let Some((pp, digest)) = slot.pre_prepare.take() {
                slot.pre_prepare = Some((attach(slot, pp, digest), digest));
            }
        }
        if replica.in_view_change {
            replica.own_view_change = durable.view_change.filter(|vc| {
                matches!(Message::decode(&vc.payload, usize::MAX), Ok(Message::ViewChange { new_view, .. }) if new_view == view)
            });
        }
        replica.refresh_stats();
        Ok(replica)
    }

    /// Arms the periodic timers and re-sends what a restarted replica had in flight.
    pub fn start(&mut self) -> Vec<Output> {
        let mut out = Vec::new();
        out.push(Output::SetTimer {
            timer: Timer::Status,
            after_ms: self.config.status_interval_ms,
        });
        if self.in_view_change {
            match self.own_view_change.clone() {
                Some(msg) => {
                    self.store_own_view_change(msg.clone());
                    self.broadcast(&mut out, MessageKind::ViewChange, msg);
                    self.arm_view_change_timer(&mut out);
                    self.try_new_view(&mut out);
                }
                None => {
                    let view = self.view;
                    self.in_view_change = false;
                    self.start_view_change(view.max(1), &mut out);
                }
            }
        }
        self.try_execute(&mut out);
        self.refresh_stats();
        out
    }

    /// The driver's clock, in milliseconds. Call before each input.
    pub fn set_now(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
    }

    pub fn id(&self) -> ReplicaId {
        self.config.id
    }

    pub fn view(&self) -> u64 {
        self.view
    }

    pub fn in_view_change(&self) -> bool {
        self.in_view_change
    }

    /// The stable checkpoint we serve to replicas that fetch state, with its snapshot.
    pub fn stable_snapshot(&self) -> Option<(&CheckpointCert, &Snapshot)> {
        self.stable_snapshot
            .as_ref()
            .map(|(cert, snapshot)| (cert, snapshot))
    }

    pub fn is_primary(&self) -> bool {
        self.primary(self.view) == self.config.id
    }

    pub fn primary_of(&self, view: u64) -> ReplicaId {
        self.primary(view)
    }

    pub fn last_executed(&self) -> u64 {
        self.last_executed
    }

    pub fn stable_checkpoint(&self) -> u64 {
        self.low
    }

    pub fn app(&self) -> &A {
        &self.app
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Log entries held (bounded by about 2L).
    pub fn log_len(&self) -> usize {
        self.slots.len()
    }

    /// Memory-bound check: slots, checkpoints, pending and view-change entries within limits.
    pub fn memory_bounded(&self) -> bool {
        let window = self.config.window as usize;
        let checkpoint_slots = window / self.config.checkpoint_interval as usize + 2;
        self.slots.len() <= 2 * window + 1
            && self.checkpoints.len() <= 2 * checkpoint_slots
            && self.pending.len() <= self.config.pending_requests_max
            && self.pending_bytes <= self.config.pending_bytes_max
            && self.pending_order.len() <= 2 * self.config.pending_requests_max + 1
            && self.executed_recent.bounded()
            && self.view_changes.values().map(BTreeMap::len).sum::<usize>() <= self.n
    }

    /// One line per slot above the stable checkpoint, for failure reports: batches held,
    /// pre-prepare, prepares, commits by view, prepared and committed.
    pub fn describe_slots(&self) -> String {
        let mut lines = Vec::new();
        for (seq, slot) in &self.slots {
            if *seq <= self.low {
                continue;
            }
            let mut commits: BTreeMap<u64, usize> = BTreeMap::new();
            for (_, view) in slot.commits.keys() {
                *commits.entry(*view).or_default() += 1;
            }
            lines.push(format!(
                "seq={seq} view={} batches={} pp={} prepares={} commits={commits:?} prepared={:?} committed={:?}",
                slot.view,
                slot.batches.len(),
                slot.pre_prepare.as_ref().map_or("none", |(m, _)| if m.batch.is_some() { "with-batch" } else { "digest-only" }),
                slot.prepares.len(),
                slot.prepared.as_ref().map(|(v, ..)| *v),
                slot.committed.as_ref().map(|(v, _)| *v),
            ));
        }
        lines.join("\n")
    }

    /// Counters for the runtime to export.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// A message from replica `from` (the transport's sender; the signer may differ when a
    /// message is forwarded). Errors are counted in [`Stats`] and logged.
    pub fn on_message(&mut self, from: ReplicaId, msg: SignedMessage) -> Vec<Output> {
        let mut out = Vec::new();
        if let Err(error) = self.handle_message(from, msg, &mut out) {
            self.note_error(from, &error);
        }
        self.refresh_stats();
        out
    }

    /// Like [`Replica::on_message`], from the bytes on the wire.
    pub fn on_bytes(&mut self, from: ReplicaId, bytes: &[u8]) -> Vec<Output> {
        match SignedMessage::from_bytes(bytes, self.config.message_bytes_max) {
            Ok(msg) => self.on_message(from, msg),
            Err(error) => {
                self.note_error(from, &error);
                Vec::new()
            }
        }
    }

    /// Like [`Replica::on_message`] but returns the error instead of counting it.
    pub fn try_on_message(&mut self, from: ReplicaId, msg: SignedMessage) -> Result<Vec<Output>> {
        let mut out = Vec::new();
        let result = self.handle_message(from, msg, &mut out);
        self.refresh_stats();
        result.map(|()| out)
    }

    /// A client request (from the gateway).
    pub fn on_request(&mut self, request: Request) -> Vec<Output> {
        let mut out = Vec::new();
        if let Err(error) = self.handle_request(request, true, &mut out) {
            debug!(replica = self.config.id, %error, "request dropped");
        }
        self.refresh_stats();
        out
    }

    /// A timer the replica set has fired.
    pub fn on_timer(&mut self, timer: Timer) -> Vec<Output> {
        let mut out = Vec::new();
        match timer {
            Timer::Batch => {
                self.batch_timer_armed = false;
                self.maybe_propose(true, &mut out);
            }
            Timer::ViewChange => {
                self.view_change_timer_armed = false;
                // f+1 peers executed past us: we are behind, not the primary; catch up first.
                let ahead = self
                    .peer_executed
                    .iter()
                    .filter(|e| **e > self.last_executed)
                    .count();
                let behind = ahead > self.f;
                let suspect_primary = !self.pending.is_empty() && !self.is_primary();
                if self.in_view_change {
                    // The new view did not come in time: try the next one.
                    let next = self.view + 1;
                    self.start_view_change(next, &mut out);
                } else if suspect_primary && behind {
                    self.arm_view_change_timer(&mut out);
                } else if suspect_primary {
                    self.suspect(&mut out);
                }
            }
            Timer::Status => self.on_status_tick(&mut out),
            Timer::StateTransfer => self.on_transfer_timeout(&mut out),
        }
        self.refresh_stats();
        out
    }

    // ----------------------------------------------------------------------------------------
    // Helpers

    fn primary(&self, view: u64) -> ReplicaId {
        (view % self.n as u64) as ReplicaId
    }

    fn quorum(&self) -> usize {
        2 * self.f + 1
    }

    fn decode(&self, msg: &SignedMessage) -> Result<Message> {
        msg.message(self.config.message_bytes_max)
    }

    fn sign(&self, message: &Message) -> SignedMessage {
        message.sign(self.config.id, &self.config.keypair)
    }

    fn broadcast(&mut self, out: &mut Vec<Output>, kind: MessageKind, msg: SignedMessage) {
        self.stats.messages_sent_total[kind.index()] += 1;
        out.push(Output::Broadcast { msg });
    }

    fn send(&mut self, out: &mut Vec<Output>, kind: MessageKind, to: ReplicaId, msg: SignedMessage) {
        if to == self.config.id {
            return;
        }
        self.stats.messages_sent_total[kind.index()] += 1;
        out.push(Output::Send { to, msg });
    }

    fn in_window(&self, seq: u64) -> bool {
        seq > self.low && seq <= self.low + self.config.window
    }

    fn view_change_timeout_ms(&self) -> u64 {
        let shift = self.view_change_attempts.min(VIEW_CHANGE_BACKOFF_SHIFT_MAX);
        self.config
            .view_change_timeout_ms
            .saturating_mul(1 << shift)
            .min(self.config.view_change_timeout_max_ms)
    }

    fn arm_view_change_timer(&mut self, out: &mut Vec<Output>) {
        self.view_change_timer_armed = true;
        out.push(Output::SetTimer {
            timer: Timer::ViewChange,
            after_ms: self.view_change_timeout_ms(),
        });
    }

    fn cancel_view_change_timer(&mut self, out: &mut Vec<Output>) {
        if self.view_change_timer_armed {
            self.view_change_timer_armed = false;
            out.push(Output::CancelTimer {
                timer: Timer::ViewChange,
            });
        }
    }

    fn note_error(&mut self, from: ReplicaId, error: &Error) {
        if error.is_stale() {
            self.stats.messages_stale_total += 1;
            debug!(replica = self.config.id, from, %error, "stale message dropped");
        } else {
            self.stats.messages_invalid_total += 1;
            warn!(replica = self.config.id, from, %error, "invalid message rejected");
        }
    }

    fn refresh_stats(&mut self) {
        self.stats.view = self.view;
        self.stats.in_view_change = self.in_view_change;
        self.stats.last_executed = self.last_executed;
        self.stats.stable_checkpoint_seq = self.low;
        self.stats.log_slots = self.slots.len();
        self.stats.pending_requests = self.pending.len();
    }

    fn check_batch_shape(&self, batch: &Batch) -> Result<()> {
        if batch.requests.len() > self.config.batch_size_max {
            return Err(Error::Malformed("batch has too many requests".into()));
        }
        if batch.size_bytes() > self.config.batch_bytes_max + 8 {
            return Err(Error::Malformed("batch too large".into()));
        }
        if batch
            .requests
            .iter()
            .any(|r| r.payload.len() > self.config.request_bytes_max)
        {
            return Err(Error::Malformed("request too large".into()));
        }
        Ok(())
    }

    /// A pre-prepare's (view, seq) and the batch beside it, checked against the signed digest
    /// and the batch limits (the signature is not verified here).
    fn parse_pre_prepare(&self, pp: &SignedMessage) -> Result<(u64, u64, SlotBatch)> {
        let Message::PrePrepare { view, seq, digest } = self.decode(pp)? else {
            return Err(Error::Malformed("not a pre-prepare".into()));
        };
        let Some(batch) = pp.batch.clone() else {
            return Err(Error::Malformed("pre-prepare without its batch".into()));
        };
        self.check_batch_shape(&batch)?;
        let entry = SlotBatch::new(batch);
        if entry.digest != digest {
            return Err(Error::Malformed(
                "the batch beside a pre-prepare has another digest".into(),
            ));
        }
        Ok((view, seq, entry))
    }

    // ----------------------------------------------------------------------------------------
    // Requests

    fn handle_request(&mut self, request: Request, from_client: bool, out: &mut Vec<Output>) -> Result<()> {
        if request.payload.len() > self.config.request_bytes_max
            || request.size_bytes() > self.config.batch_bytes_max
        {
            return Err(Error::Request("payload too large"));
        }
        let digest = request.digest();
        if let Some(executed) = self.executed_recent.get(&digest) {
            // Its reply may not have reached the client (the request came by forwarding
            // before the client connected here, or the client's queue was full): answer again.
            if !from_client {
                return Err(Error::Stale("forwarded request already executed"));
            }
            out.push(Output::Reply {
                client: request.client,
                seq: executed.seq,
                request_digest: digest,
                reply: executed.reply.clone(),
            });
            self.stats.replies_resent_total += 1;
            return Ok(());
        }
        let is_primary = self.is_primary() && !self.in_view_change;
        if self.pending.contains_key(&digest) {
            if from_client && !is_primary {
                // A client retransmission: the primary may not have it.
                let primary = self.primary(self.view);
                self.forward(out, primary, request);
            }
            return Ok(());
        }
        if !from_client && !is_primary {
            return Err(Error::Stale("forwarded request and not the primary"));
        }
        if self.pending.len() >= self.config.pending_requests_max {
            self.stats.requests_dropped_total += 1;
            return Err(Error::Request("pending requests full"));
        }
        if self.pending_bytes + request.size_bytes() > self.config.pending_bytes_max {
            self.stats.requests_dropped_total += 1;
            return Err(Error::Request("pending request bytes full"));
        }
        if self.app.check_requests(std::slice::from_ref(&request)) != [true] {
            self.stats.requests_dropped_total += 1;
            return Err(Error::Request("request failed the app's check"));
        }
        self.pending_bytes += request.size_bytes();
        self.pending.insert(digest, request.clone());
        self.pending_order.push_back(digest);
        if is_primary {
            self.maybe_propose(false, out);
        } else {
            let primary = self.primary(self.view);
            self.forward(out, primary, request);
            if !self.view_change_timer_armed && !self.in_view_change {
                self.arm_view_change_timer(out);
            }
        }
        Ok(())
    }

    fn remove_pending(&mut self, digest: &Hash) {
        if let Some(request) = self.pending.remove(digest) {
            self.pending_bytes -= request.size_bytes();
        }
    }

    /// Sends `request` to `to` as a [`Message::ForwardedRequest`] (its digest signed, the
    /// request beside).
    fn forward(&mut self, out: &mut Vec<Output>, to: ReplicaId, request: Request) {
        let digest = request.digest();
        let batch = Arc::new(Batch {
            timestamp_ms: 0,
            requests: vec![request],
        });
        let msg = self.sign(&Message::ForwardedRequest { digest }).with_batch(batch);
        self.send(out, MessageKind::Request, to, msg);
    }

    fn compact_pending_order(&mut self) {
        while let Some(front) = self.pending_order.front() {
            if self.pending.contains_key(front) {
                break;
            }
            self.pending_order.pop_front();
        }
        if self.pending_order.len() > 2 * self.config.pending_requests_max {
            let pending = &self.pending;
            self.pending_order.retain(|d| pending.contains_key(d));
        }
    }

    /// Primary: order pending requests while the window allows.
    fn maybe_propose(&mut self, force: bool, out: &mut Vec<Output>) {
        if !self.is_primary() || self.in_view_change {
            return;
        }
        self.compact_pending_order();
        loop {
            if self.next_seq + 1 > self.low + self.config.window {
                return;
            }
            let mut chosen = Vec::new();
            let mut bytes = 0usize;
            let mut full = false;
            for digest in &self.pending_order {
                if self.proposed.contains(digest) || chosen.contains(digest) {
                    continue;
                }
                let Some(request) = self.pending.get(digest) else {
                    continue;
                };
                if chosen.len() >= self.config.batch_size_max
                    || bytes + request.size_bytes() > self.config.batch_bytes_max
                {
                    full = true;
                    break;
                }
                bytes += request.size_bytes();
                chosen.push(*digest);
            }
            if chosen.is_empty() {
                return;
            }
            full |= chosen.len() >= self.config.batch_size_max;
            if !full && !force {
                if !self.batch_timer_armed {
                    self.batch_timer_armed = true;
                    out.push(Output::SetTimer {
                        timer: Timer::Batch,
                        after_ms: self.config.batch_timeout_ms,
                    });
                }
                return;
            }
            // Every pending request passed the app's check when it arrived (`handle_request`,
            // the only way in), and the check is stateless: not run again.
            let valid: Vec<Request> = chosen
                .iter()
                .map(|digest| self.pending.get(digest).cloned().expect("chosen from pending"))
                .collect();
            self.proposed.extend(chosen.iter().copied());
            let valid_digests = chosen;
            self.last_timestamp_ms = self.last_timestamp_ms.max(self.now_ms);
            let batch = Arc::new(Batch {
                timestamp_ms: self.last_timestamp_ms,
                requests: valid,
            });
            let seq = self.next_seq + 1;
            self.next_seq = seq;
            let view = self.view;
            let digest = Batch::digest_of(batch.timestamp_ms, &valid_digests);
            let msg = self
                .sign(&Message::PrePrepare { view, seq, digest })
                .with_batch(batch.clone());
            let slot = self.slots.entry(seq).or_default();
            slot.enter_view(view);
            slot.add_batch(SlotBatch {
                digest,
                batch,
                request_digests: Arc::new(valid_digests),
                persisted: false,
            });
            slot.persist_batch(seq, digest, out);
            slot.pre_prepare = Some((msg.clone(), digest));
            out.push(Output::Persist(Record::PrePrepare {
                view,
                seq,
                msg: msg.without_batch(),
            }));
            self.broadcast(out, MessageKind::PrePrepare, msg);
            self.check_prepared(seq, out);
        }
    }

    // ----------------------------------------------------------------------------------------
    // Messages

    fn handle_message(
        &mut self,
        from: ReplicaId,
        signed: SignedMessage,
        out: &mut Vec<Output>,
    ) -> Result<()> {
        if signed.signer as usize >= self.n {
            return Err(Error::UnknownReplica(signed.signer));
        }
        if (from as usize) >= self.n {
            return Err(Error::UnknownReplica(from));
        }
        if signed.signer == self.config.id {
            return Err(Error::Stale("our own message"));
        }
        let message = self.decode(&signed)?;
        self.stats.messages_received_total[message.kind().index()] += 1;
        match message {
            Message::Request(request) => {
                self.verifier.verify(&signed)?;
                self.handle_request(request, false, out)
            }
            Message::ForwardedRequest { digest } => {
                self.verifier.verify(&signed)?;
                let request = match signed.batch.as_deref() {
                    Some(Batch {
                        timestamp_ms: 0,
                        requests,
                    }) if requests.len() == 1 => requests[0].clone(),
                    _ => {
                        return Err(Error::Malformed(
                            "a forwarded request without one request beside it".into(),
                        ))
                    }
                };
                if request.digest() != digest {
                    return Err(Error::Malformed(
                        "the request beside a forwarded request has another digest".into(),
                    ));
                }
                self.handle_request(request, false, out)
            }
            Message::PrePrepare { view, seq, digest } => self.on_pre_prepare(signed, view, seq, digest, out),
            Message::Prepare { view, seq, digest } => self.on_prepare(signed, view, seq, digest, out),
            Message::Commit { view, seq, digest } => self.on_commit(signed, view, seq, digest, out),
            Message::Checkpoint { seq, digest } => self.on_checkpoint(signed, seq, digest, out),
            Message::ViewChange { new_view, .. } => self.on_view_change(signed, new_view, out),
            Message::NewView {
                view,
                view_changes,
                pre_prepares,
            } => self.on_new_view(signed, view, view_changes, pre_prepares, out),
            Message::Status {
                view,
                in_view_change,
                last_executed,
                stable_seq,
            } => self.on_status(signed, view, in_view_change, last_executed, stable_seq, out),
            Message::CommitProof { seq, digest, commits } => {
                self.on_commit_proof(signed, seq, digest, commits, out)
            }
            Message::StableCert { cert } => {
                if cert.seq <= self.low && self.app_valid {
                    return Err(Error::Stale("stable certificate not above ours"));
                }
                self.verifier.verify(&signed)?;
                self.verify_checkpoint_cert(&cert)?;
                self.adopt_stable_cert(cert, out);
                Ok(())
            }
            Message::FetchSnapshot { seq } => self.on_fetch_snapshot(signed, seq, out),
            Message::Snapshot { cert, snapshot } => self.on_snapshot(signed, cert, snapshot, out),
            Message::Suspect { view } => {
                if view != self.view || self.in_view_change {
                    return Err(Error::Stale("suspicion not for our current view"));
                }
                if self.suspects.contains(&signed.signer) {
                    return Err(Error::Stale("duplicate suspicion"));
                }
                self.verifier.verify(&signed)?;
                self.suspects.insert(signed.signer);
                self.check_suspects(out);
                Ok(())
            }
        }
    }

    fn on_pre_prepare(
        &mut self,
        signed: SignedMessage,
        view: u64,
        seq: u64,
        digest: Hash,
        out: &mut Vec<Output>,
    ) -> Result<()> {
        // Stale first.
        if view != self.view || self.in_view_change {
            return Err(Error::Stale("pre-prepare not for our current view"));
        }
        if !self.in_window(seq) {
            return Err(Error::Stale("pre-prepare outside the watermarks"));
        }
        if signed.signer != self.primary(view) {
            return Err(Error::Violation {
                replica: signed.signer,
                what: "pre-prepare from a backup",
            });
        }
        if let Some((_, existing)) = self.slots.get(&seq).and_then(|s| {
            if s.view == view {
                s.pre_prepare.as_ref()
            } else {
                None
            }
        }) {
            if *existing == digest {
                let missing = self.slots.get(&seq).is_some_and(|s| s.batch(&digest).is_none());
                if missing && signed.batch.is_some() {
                    // The batch of a slot a new view gave us by digest: checked against the
                    // digest we accepted, so no signature is needed.
                    let (_, _, entry) = self.parse_pre_prepare(&signed)?;
                    let slot = self.slots.get_mut(&seq).expect("slot exists");
                    if let Some((pre_prepare, _)) = slot.pre_prepare.as_mut() {
                        *pre_prepare = pre_prepare.clone().with_batch(entry.batch.clone());
                    }
                    slot.add_batch(entry);
                    if slot.my_prepare.is_some() {
                        slot.persist_batch(seq, digest, out);
                    }
                    self.check_committed(seq, out);
                    return Ok(());
                }
                return Err(Error::Stale("duplicate pre-prepare"));
            }
            // Verify before accusing: a forged second pre-prepare proves nothing.
            self.verifier.verify(&signed)?;
            return Err(Error::Violation {
                replica: signed.signer,
                what: "two pre-prepares for one (view, seq)",
            });
        }
        // Then verify.
        self.verifier.verify(&signed)?;
        let (_, _, entry) = self.parse_pre_prepare(&signed)?;
        let unknown: Vec<Request> = entry
            .batch
            .requests
            .iter()
            .zip(entry.request_digests.iter())
            .filter(|(_, d)| !self.pending.contains_key(d))
            .map(|(r, _)| r.clone())
            .collect();
        if !unknown.is_empty() && self.app.check_requests(&unknown).iter().any(|ok| !ok) {
            return Err(Error::Violation {
                replica: signed.signer,
                what: "pre-prepare with an invalid request",
            });
        }
        // Then apply.
        let slot = self.slots.entry(seq).or_default();
        slot.enter_view(view);
        slot.add_batch(entry);
        slot.pre_prepare = Some((signed, digest));
        self.send_prepare(seq, out);
        self.check_prepared(seq, out);
        Ok(())
    }

    /// Backup: prepare the accepted pre-prepare of `seq` in the current view.
    fn send_prepare(&mut self, seq: u64, out: &mut Vec<Output>) {
        if self.is_primary() {
            return;
        }
        let view = self.view;
        let me = self.config.id;
        let Some(slot) = self.slots.get(&seq) else { return };
        let Some((pre_prepare, digest)) = slot.pre_prepare.clone() else {
            return;
        };
        if let Some((sent, _)) = &slot.my_prepare {
            // Safety rule: never sign two different prepares for one (view, seq).
            let safety_rule_one_prepare_per_view_seq = *sent == digest;
            if !safety_rule_one_prepare_per_view_seq {
                warn!(replica = me, seq, view, "refusing to prepare a second batch");
            }
            return;
        }
        let prepare = self.sign(&Message::Prepare { view, seq, digest });
        let slot = self.slots.get_mut(&seq).expect("slot exists");
        slot.my_prepare = Some((digest, prepare.clone()));
        slot.prepares.insert(me, (digest, prepare.clone()));
        slot.persist_batch(seq, digest, out);
        out.push(Output::Persist(Record::Prepare {
            view,
            seq,
            digest,
            pre_prepare: pre_prepare.without_batch(),
            prepare: prepare.clone(),
        }));
        self.broadcast(out, MessageKind::Prepare, prepare);
    }

    fn on_prepare(
        &mut self,
        signed: SignedMessage,
        view: u64,
        seq: u64,
        digest: Hash,
        out: &mut Vec<Output>,
    ) -> Result<()> {
        if view != self.view || self.in_view_change {
            return Err(Error::Stale("prepare not for our current view"));
        }
        if !self.in_window(seq) {
            return Err(Error::Stale("prepare outside the watermarks"));
        }
        if signed.signer == self.primary(view) {
            return Err(Error::Violation {
                replica: signed.signer,
                what: "prepare from the primary",
            });
        }
        if let Some(slot) = self.slots.get(&seq) {
            if slot.view == view && slot.prepares.contains_key(&signed.signer) {
                return Err(Error::Stale("duplicate prepare"));
            }
        }
        self.verifier.verify(&signed)?;
        let slot = self.slots.entry(seq).or_default();
        slot.enter_view(view);
        slot.prepares.insert(signed.signer, (digest, signed));
        self.check_prepared(seq, out);
        Ok(())
    }

    /// prepared(m, v, n, i): a pre-prepare and 2f matching prepares from distinct backups.
    fn check_prepared(&mut self, seq: u64, out: &mut Vec<Output>) {
        let view = self.view;
        let needed = 2 * self.f;
        let Some(slot) = self.slots.get(&seq) else { return };
        if slot.view != view || slot.my_commit.is_some() {
            return;
        }
        let Some((pre_prepare, digest)) = slot.pre_prepare.clone() else {
            return;
        };
        let matching: Vec<SignedMessage> = slot
            .prepares
            .values()
            .filter(|(d, _)| *d == digest)
            .map(|(_, m)| m.clone())
            .take(needed)
            .collect();
        let prepared = matching.len() >= needed;
        if !prepared {
            return;
        }
        let cert = PreparedCert {
            pre_prepare,
            prepares: matching,
        };
        let commit = self.sign(&Message::Commit { view, seq, digest });
        let me = self.config.id;
        let cert = PreparedCert {
            pre_prepare: cert.pre_prepare.without_batch(),
            prepares: cert.prepares,
        };
        let slot = self.slots.get_mut(&seq).expect("slot exists");
        slot.prepared = Some((view, digest, cert.clone()));
        slot.my_commit = Some((digest, commit.clone()));
        slot.commits.insert((me, view), (digest, commit.clone()));
        slot.persist_batch(seq, digest, out);
        out.push(Output::Persist(Record::Commit {
            view,
            seq,
            digest,
            cert,
            commit: commit.clone(),
        }));
        self.broadcast(out, MessageKind::Commit, commit);
        self.check_committed(seq, out);
    }

    fn on_commit(
        &mut self,
        signed: SignedMessage,
        view: u64,
        seq: u64,
        digest: Hash,
        out: &mut Vec<Output>,
    ) -> Result<()> {
        if seq <= self.last_executed || !self.in_window(seq) {
            return Err(Error::Stale("commit for an executed or out-of-window seq"));
        }
        if view > self.view + VIEWS_AHEAD_MAX {
            return Err(Error::Stale("commit too far ahead in views"));
        }
        if let Some(slot) = self.slots.get(&seq) {
            if slot.committed.is_some() || slot.commits.contains_key(&(signed.signer, view)) {
                return Err(Error::Stale("duplicate commit"));
            }
        }
        self.verifier.verify(&signed)?;
        self.insert_commit(seq, view, digest, signed);
        self.check_committed(seq, out);
        Ok(())
    }

    fn insert_commit(&mut self, seq: u64, view: u64, digest: Hash, signed: SignedMessage) {
        let signer = signed.signer;
        let slot = self.slots.entry(seq).or_default();
        slot.commits.insert((signer, view), (digest, signed));
        let views: Vec<u64> = slot
            .commits
            .range((signer, 0)..=(signer, u64::MAX))
            .map(|((_, v), _)| *v)
            .collect();
        if views.len() > COMMIT_VIEWS_PER_REPLICA_MAX {
            slot.commits.remove(&(signer, views[0]));
        }
    }

    /// committed-local: 2f+1 matching commits of one view, and the batch with that digest.
    fn check_committed(&mut self, seq: u64, out: &mut Vec<Output>) {
        let quorum = self.quorum();
        let Some(slot) = self.slots.get_mut(&seq) else {
            return;
        };
        if slot.committed.is_some() {
            return;
        }
        let mut counts: BTreeMap<(u64, Hash), usize> = BTreeMap::new();
        for ((_, view), (digest, _)) in &slot.commits {
            *counts.entry((*view, *digest)).or_default() += 1;
        }
        let certified = counts
            .into_iter()
            .find(|(_, count)| *count >= quorum)
            .map(|(key, _)| key);
        let Some((view, digest)) = certified else { return };
        let Some(entry) = slot.batches.iter().find(|b| b.digest == digest).cloned() else {
            return;
        };
        slot.committed = Some((view, entry));
        self.try_execute(out);
    }

    /// Executes committed batches in order.
    fn try_execute(&mut self, out: &mut Vec<Output>) {
        if !self.app_valid {
            return;
        }
        let mut progressed = false;
        loop {
            let seq = self.last_executed + 1;
            let Some((view, entry)) = self.slots.get(&seq).and_then(|s| s.committed.clone()) else {
                break;
            };
            let SlotBatch {
                digest: batch_digest,
                batch,
                request_digests,
                ..
            } = entry;
            let executed = self.app.execute(seq, batch.timestamp_ms, &batch.requests);
            assert_eq!(
                self.app.last_executed(),
                seq,
                "the app executes each seq once, in order"
            );
            assert_eq!(
                executed.replies.len(),
                batch.requests.len(),
                "one reply per request"
            );
            self.last_executed = seq;
            progressed = true;
            self.stats.batches_executed_total += 1;
            self.stats.requests_executed_total += batch.requests.len() as u64;
            if batch.timestamp_ms != 0 {
                self.last_timestamp_ms = self.last_timestamp_ms.max(batch.timestamp_ms);
            }
            let mut replies = Vec::with_capacity(batch.requests.len());
            for ((request, reply), request_digest) in batch
                .requests
                .iter()
                .zip(&executed.replies)
                .zip(request_digests.iter().copied())
            {
                self.remove_pending(&request_digest);
                self.proposed.remove(&request_digest);
                self.executed_recent.insert(request_digest, seq, reply);
                replies.push(Output::Reply {
                    client: request.client,
                    seq,
                    request_digest,
                    reply: reply.clone(),
                });
            }
            // The block first (the driver appends it to its log), then the client replies.
            out.push(Output::Committed(Committed {
                seq,
                view,
                timestamp_ms: batch.timestamp_ms,
                batch: batch.clone(),
                replies: executed.replies,
                digest: executed.digest,
                batch_digest,
            }));
            out.append(&mut replies);
            if seq.is_multiple_of(self.config.checkpoint_interval) {
                self.take_checkpoint(seq, Hash(executed.digest), out);
            }
        }
        if progressed {
            self.view_change_attempts = 0;
            self.compact_pending_order();
            if !self.in_view_change {
                let waiting = !self.pending.is_empty() && !self.is_primary();
                if waiting {
                    self.arm_view_change_timer(out);
                } else {
                    self.cancel_view_change_timer(out);
                }
            }
            self.maybe_propose(false, out);
        }
    }

    // ----------------------------------------------------------------------------------------
    // Checkpoints and garbage collection

    fn take_checkpoint(&mut self, seq: u64, digest: Hash, out: &mut Vec<Output>) {
        let snapshot = self.app.snapshot();
        let msg = self.sign(&Message::Checkpoint { seq, digest });
        let me = self.config.id;
        let entry = self.checkpoints.entry(seq).or_default();
        entry.own = Some((digest, snapshot, msg.clone()));
        entry.votes.insert(me, (digest, msg.clone()));
        self.broadcast(out, MessageKind::Checkpoint, msg);
        self.check_stable(seq, out);
    }

    fn on_checkpoint(
        &mut self,
        signed: SignedMessage,
        seq: u64,
        digest: Hash,
        out: &mut Vec<Output>,
    ) -> Result<()> {
        if seq <= self.low || seq > self.low + 2 * self.config.window {
            return Err(Error::Stale("checkpoint outside the window"));
        }
        if !seq.is_multiple_of(self.config.checkpoint_interval) {
            return Err(Error::Violation {
                replica: signed.signer,
                what: "checkpoint at a non-checkpoint seq",
            });
        }
        if self
            .checkpoints
            .get(&seq)
            .is_some_and(|c| c.votes.contains_key(&signed.signer))
        {
            return Err(Error::Stale("duplicate checkpoint"));
        }
        self.verifier.verify(&signed)?;
        self.checkpoints
            .entry(seq)
            .or_default()
            .votes
            .insert(signed.signer, (digest, signed));
        self.check_stable(seq, out);
        Ok(())
    }

    fn check_stable(&mut self, seq: u64, out: &mut Vec<Output>) {
        let quorum = self.quorum();
        let Some(entry) = self.checkpoints.get(&seq) else {
            return;
        };
        let mut counts: BTreeMap<Hash, usize> = BTreeMap::new();
        for (digest, _) in entry.votes.values() {
            *counts.entry(*digest).or_default() += 1;
        }
        let Some((digest, _)) = counts.into_iter().find(|(_, c)| *c >= quorum) else {
            return;
        };
        let votes: Vec<SignedMessage> = entry
            .votes
            .values()
            .filter(|(d, _)| *d == digest)
            .map(|(_, m)| m.clone())
            .take(quorum)
            .collect();
        let cert = CheckpointCert { seq, digest, votes };
        self.adopt_stable_cert(cert, out);
    }

    /// A (verified) checkpoint certificate: make it stable if our state matches, or fetch the
    /// state if we are behind or diverged.
    fn adopt_stable_cert(&mut self, cert: CheckpointCert, out: &mut Vec<Output>) {
        if cert.seq <= self.low && self.app_valid {
            return;
        }
        if cert.seq > self.last_executed || !self.app_valid {
            if self.transfer_target.as_ref().is_none_or(|t| t.seq < cert.seq) {
                self.transfer_target = Some(cert.clone());
            }
            // Far behind (outside the window), or told by a peer: fetch now; otherwise let
            // catch-up try first and fetch when the status tick sees no progress.
            if cert.seq >= self.last_executed + self.config.window || !self.app_valid {
                self.start_transfer(cert, out);
            }
            return;
        }
        let own = self.checkpoints.get(&cert.seq).and_then(|c| c.own.clone());
        let Some((own_digest, snapshot, _)) = own else {
            // Executed, but our checkpoint is gone (we restarted since): we cannot compare,
            // but 2f+1 replicas vouch for it; advance the low watermark without a snapshot.
            self.advance_low(cert);
            return;
        };
        if own_digest != cert.digest {
            warn!(
                replica = self.config.id,
                seq = cert.seq,
                "our state diverged from a stable checkpoint"
            );
            self.app_valid = false;
            self.transfer_target = Some(cert.clone());
            self.start_transfer(cert, out);
            return;
        }
        self.make_stable(cert, snapshot, out);
    }

    fn make_stable(&mut self, cert: CheckpointCert, snapshot: Snapshot, out: &mut Vec<Output>) {
        let seq = cert.seq;
        let digest = cert.digest;
        self.stable_snapshot = Some((cert.clone(), snapshot.clone()));
        out.push(Output::Persist(Record::StableCheckpoint {
            cert: cert.clone(),
            snapshot,
        }));
        out.push(Output::StableCheckpoint { seq, digest });
        self.advance_low(cert);
        self.maybe_propose(false, out);
    }

    /// Moves the low watermark to a stable checkpoint and garbage-collects below it.
    fn advance_low(&mut self, cert: CheckpointCert) {
        let seq = cert.seq;
        if seq <= self.low {
            return;
        }
        self.low = seq;
        self.stable = Some(cert);
        self.slots = self.slots.split_off(&(seq + 1));
        self.checkpoints = self.checkpoints.split_off(&(seq + 1));
        if self.transfer_target.as_ref().is_some_and(|t| t.seq <= seq) {
            self.transfer_target = None;
        }
        self.next_seq = self.next_seq.max(seq);
    }

    // ----------------------------------------------------------------------------------------
    // View changes

    /// Our timer expired: tell the others we suspect the primary; keep working in the view.
    fn suspect(&mut self, out: &mut Vec<Output>) {
        if self.own_suspect.is_none() {
            info!(
                replica = self.config.id,
                view = self.view,
                pending = self.pending.len(),
                last_executed = self.last_executed,
                "suspecting the primary: nothing executed within the view-change timeout"
            );
            let msg = self.sign(&Message::Suspect { view: self.view });
            self.own_suspect = Some(msg.clone());
            self.suspects.insert(self.config.id);
            self.broadcast(out, MessageKind::Suspect, msg);
        }
        self.arm_view_change_timer(out);
        self.check_suspects(out);
    }

    /// f+1 suspicions: at least one correct replica timed out; change view.
    fn check_suspects(&mut self, out: &mut Vec<Output>) {
        if !self.in_view_change && self.suspects.len() > self.f {
            let next = self.view + 1;
            self.start_view_change(next, out);
        }
    }

    fn start_view_change(&mut self, new_view: u64, out: &mut Vec<Output>) {
        if new_view < self.view || (new_view == self.view && self.in_view_change) {
            return;
        }
        info!(
            replica = self.config.id,
            from_view = self.view,
            new_view,
            last_executed = self.last_executed,
            "view change"
        );
        self.view = new_view;
        self.in_view_change = true;
        self.suspects.clear();
        self.own_suspect = None;
        self.view_change_attempts = self.view_change_attempts.saturating_add(1);
        self.stats.view_changes_total += 1;
        self.new_view = None;
        self.proposed.clear();
        if self.batch_timer_armed {
            self.batch_timer_armed = false;
            out.push(Output::CancelTimer { timer: Timer::Batch });
        }
        let prepared: Vec<PreparedCert> = self
            .slots
            .range(self.low + 1..)
            .filter_map(|(_, slot)| slot.prepared.as_ref().map(|(_, _, cert)| cert.clone()))
            .collect();
        let msg = self.sign(&Message::ViewChange {
            new_view,
            stable: self.stable.clone(),
            prepared,
        });
        out.push(Output::Persist(Record::ViewChange {
            view: new_view,
            msg: msg.clone(),
        }));
        self.own_view_change = Some(msg.clone());
        self.store_own_view_change(msg.clone());
        self.broadcast(out, MessageKind::ViewChange, msg);
        self.arm_view_change_timer(out);
        self.view_changes.retain(|v, _| *v >= new_view);
        self.try_new_view(out);
    }

    fn store_own_view_change(&mut self, msg: SignedMessage) {
        if let Ok(info) = self.parse_view_change(&msg) {
            let view = self.view;
            self.view_changes
                .entry(view)
                .or_default()
                .insert(self.config.id, info);
        }
    }

    /// Structural checks of a view change; returns the messages whose signatures to verify.
    fn parse_view_change(&self, msg: &SignedMessage) -> Result<ViewChangeInfo> {
        let Message::ViewChange {
            new_view: _,
            stable,
            prepared,
        } = self.decode(msg)?
        else {
            return Err(Error::Malformed("not a view change".into()));
        };
        let stable_seq = stable.as_ref().map_or(0, |c| c.seq);
        if prepared.len() as u64 > self.config.window {
            return Err(Error::Malformed("too many prepared certificates".into()));
        }
        let mut seen = BTreeSet::new();
        let mut parsed = Vec::with_capacity(prepared.len());
        for cert in &prepared {
            let (seq, view, digest) = self.parse_prepared_cert(cert)?;
            if seq <= stable_seq || seq > stable_seq + self.config.window || !seen.insert(seq) {
                return Err(Error::InvalidCertificate(
                    "prepared certificate outside the window or repeated",
                ));
            }
            parsed.push((seq, view, digest));
        }
        if let Some(cert) = &stable {
            self.parse_checkpoint_cert(cert)?;
        }
        Ok(ViewChangeInfo {
            msg: msg.clone(),
            stable,
            prepared: parsed,
            certs: prepared,
        })
    }

    fn parse_prepared_cert(&self, cert: &PreparedCert) -> Result<(u64, u64, Hash)> {
        let Ok(Message::PrePrepare { view, seq, digest }) = self.decode(&cert.pre_prepare) else {
            return Err(Error::InvalidCertificate(
                "prepared certificate without a pre-prepare",
            ));
        };
        if cert.pre_prepare.signer != self.primary(view) {
            return Err(Error::InvalidCertificate(
                "pre-prepare not from that view's primary",
            ));
        }
        if cert.prepares.len() < 2 * self.f || cert.prepares.len() > self.n {
            return Err(Error::InvalidCertificate("wrong number of prepares"));
        }
        let mut signers = BTreeSet::new();
        for prepare in &cert.prepares {
            let Message::Prepare {
                view: v,
                seq: s,
                digest: d,
            } = self.decode(prepare)?
            else {
                return Err(Error::InvalidCertificate("not a prepare"));
            };
            let matching = v == view && s == seq && d == digest;
            if !matching || prepare.signer == self.primary(view) || !signers.insert(prepare.signer) {
                return Err(Error::InvalidCertificate("prepare does not match or repeats"));
            }
        }
        Ok((seq, view, digest))
    }

    fn parse_checkpoint_cert(&self, cert: &CheckpointCert) -> Result<()> {
        if cert.seq == 0 || !cert.seq.is_multiple_of(self.config.checkpoint_interval) {
            return Err(Error::InvalidCertificate("checkpoint at a non-checkpoint seq"));
        }
        if cert.votes.len() < self.quorum() || cert.votes.len() > self.n {
            return Err(Error::InvalidCertificate("wrong number of checkpoint votes"));
        }
        let mut signers = BTreeSet::new();
        for vote in &cert.votes {
            let Message::Checkpoint { seq, digest } = self.decode(vote)? else {
                return Err(Error::InvalidCertificate("not a checkpoint"));
            };
            if seq != cert.seq || digest != cert.digest || !signers.insert(vote.signer) {
                return Err(Error::InvalidCertificate(
                    "checkpoint vote does not match or repeats",
                ));
            }
        }
        Ok(())
    }

    fn verify_checkpoint_cert(&self, cert: &CheckpointCert) -> Result<()> {
        self.parse_checkpoint_cert(cert)?;
        let votes: Vec<&SignedMessage> = cert.votes.iter().collect();
        self.verifier
            .verify_all(&votes)
            .map_err(|_| Error::InvalidCertificate("bad checkpoint signature"))
    }

    fn on_view_change(&mut self, signed: SignedMessage, new_view: u64, out: &mut Vec<Output>) -> Result<()> {
        let joinable = new_view > self.view || (new_view == self.view && self.in_view_change);
        if !joinable {
            return Err(Error::Stale("view change for an old view"));
        }
        if new_view > self.view + VIEWS_AHEAD_MAX {
            return Err(Error::Stale("view change too far ahead"));
        }
        // One view change per signer is kept, its newest: memory stays at n view changes.
        let signer = signed.signer;
        let newest = self
            .view_changes
            .iter()
            .filter(|(_, senders)| senders.contains_key(&signer))
            .map(|(view, _)| *view)
            .max();
        if newest.is_some_and(|v| v >= new_view) {
            return Err(Error::Stale("duplicate or older view change"));
        }
        let info = self.parse_view_change(&signed)?;
        let mut all: Vec<&SignedMessage> = Vec::new();
        info.signatures(&mut all);
        self.verifier.verify_all(&all)?;
        for senders in self.view_changes.values_mut() {
            senders.remove(&signer);
        }
        self.view_changes.retain(|_, senders| !senders.is_empty());
        self.view_changes
            .entry(new_view)
            .or_default()
            .insert(signed.signer, info);
        // Liveness rule: f+1 view changes for views above ours mean at least one correct
        // replica timed out; join the smallest such view.
        let mut above: BTreeMap<ReplicaId, u64> = BTreeMap::new();
        for (view, senders) in self.view_changes.range(self.view + 1..) {
            for sender in senders.keys() {
                above.entry(*sender).or_insert(*view);
            }
        }
        above.remove(&self.config.id);
        if above.len() > self.f {
            let smallest = *above.values().min().expect("not empty");
            self.start_view_change(smallest, out);
        }
        // A view change for a later view is a suspicion of ours: its sender gave up on this
        // view. Without this, a replica whose new-view timer ran out while the others were
        // installing that new view (it cannot accept a new view older than its own) escalates
        // alone, and the other two of a 3-replica quorum wait for it for ever: one suspect
        // each side, f + 1 nowhere.
        if !self.in_view_change && new_view > self.view && signer != self.config.id {
            self.suspects.insert(signer);
            self.check_suspects(out);
        }
        self.try_new_view(out);
        Ok(())
    }

    /// Computes the new view's pre-prepares from 2f+1 view changes: min-s is the highest
    /// stable checkpoint among them, and each seq above it gets the batch of the
    /// highest-view prepared certificate, or a null batch.
    fn plan_new_view(&self, infos: &[&ViewChangeInfo]) -> NewViewPlan {
        let min_cert = infos
            .iter()
            .filter_map(|i| i.stable.as_ref())
            .max_by_key(|c| c.seq)
            .cloned();
        let min_seq = min_cert.as_ref().map_or(0, |c| c.seq);
        let mut best: BTreeMap<u64, (u64, Hash)> = BTreeMap::new();
        for info in infos {
            for (seq, view, digest) in &info.prepared {
                if *seq <= min_seq {
                    continue;
                }
                let better = best.get(seq).is_none_or(|(v, _)| *view > *v);
                if better {
                    best.insert(*seq, (*view, *digest));
                }
            }
        }
        let max_seq = best.keys().next_back().copied().unwrap_or(min_seq).max(min_seq);
        let null = Batch::null().digest();
        let entries = (min_seq + 1..=max_seq)
            .map(|seq| (seq, best.get(&seq).map_or(null, |(_, d)| *d)))
            .collect();
        NewViewPlan {
            min_cert,
            max_seq,
            entries,
        }
    }

    /// New primary: with 2f+1 view changes for our view, send the new view.
    fn try_new_view(&mut self, out: &mut Vec<Output>) {
        let view = self.view;
        if !self.in_view_change || self.primary(view) != self.config.id || self.new_view.is_some() {
            return;
        }
        let Some(senders) = self.view_changes.get(&view) else {
            return;
        };
        if senders.len() < self.quorum() || !senders.contains_key(&self.config.id) {
            return;
        }
        let mut chosen: Vec<&ViewChangeInfo> = vec![&senders[&self.config.id]];
        chosen.extend(
            senders
                .iter()
                .filter(|(id, _)| **id != self.config.id)
                .map(|(_, i)| i),
        );
        chosen.truncate(self.quorum());
        let plan = self.plan_new_view(&chosen);
        let view_changes: Vec<SignedMessage> = chosen.iter().map(|i| i.msg.clone()).collect();
        // Digests only: 2f+1 replicas prepared each carried batch, so at least f+1 correct ones
        // hold it. A replica without it prepares and commits on the digest and gets the batch
        // beside a re-sent pre-prepare (`on_status_tick`) or in a commit proof (`on_status`).
        let pre_prepares: Vec<SignedMessage> = plan
            .entries
            .iter()
            .map(|(seq, digest)| {
                self.sign(&Message::PrePrepare {
                    view,
                    seq: *seq,
                    digest: *digest,
                })
            })
            .collect();
        let msg = self.sign(&Message::NewView {
            view,
            view_changes,
            pre_prepares: pre_prepares.clone(),
        });
        out.push(Output::Persist(Record::NewView {
            view,
            msg: msg.clone(),
        }));
        self.broadcast(out, MessageKind::NewView, msg.clone());
        let entries = self.new_view_entries(&plan.entries, pre_prepares);
        self.enter_new_view(view, msg, plan.min_cert, plan.max_seq, entries, out);
    }

    fn on_new_view(
        &mut self,
        signed: SignedMessage,
        view: u64,
        view_changes: Vec<SignedMessage>,
        pre_prepares: Vec<SignedMessage>,
        out: &mut Vec<Output>,
    ) -> Result<()> {
        let joinable = view > self.view || (view == self.view && self.in_view_change);
        if !joinable {
            return Err(Error::Stale("new view for an old view"));
        }
        if view > self.view + VIEWS_AHEAD_MAX {
            return Err(Error::Stale("new view too far ahead"));
        }
        if signed.signer != self.primary(view) {
            return Err(Error::Violation {
                replica: signed.signer,
                what: "new view not from its primary",
            });
        }
        if view_changes.len() < self.quorum() || view_changes.len() > self.n {
            return Err(Error::InvalidCertificate("new view needs 2f+1 view changes"));
        }
        if pre_prepares.len() as u64 > self.config.window {
            return Err(Error::InvalidCertificate("new view has too many pre-prepares"));
        }
        let mut infos = Vec::with_capacity(view_changes.len());
        let mut signers = BTreeSet::new();
        for vc in &view_changes {
            let Message::ViewChange { new_view, .. } = self.decode(vc)? else {
                return Err(Error::InvalidCertificate("not a view change"));
            };
            if new_view != view || !signers.insert(vc.signer) {
                return Err(Error::InvalidCertificate(
                    "view change for another view, or repeated",
                ));
            }
            infos.push(self.parse_view_change(vc)?);
        }
        let info_refs: Vec<&ViewChangeInfo> = infos.iter().collect();
        let plan = self.plan_new_view(&info_refs);
        if plan.entries.len() != pre_prepares.len() {
            return Err(Error::Violation {
                replica: signed.signer,
                what: "new view pre-prepares differ from O",
            });
        }
        for ((seq, digest), pp) in plan.entries.iter().zip(&pre_prepares) {
            let Ok(Message::PrePrepare {
                view: v,
                seq: s,
                digest: d,
            }) = self.decode(pp)
            else {
                return Err(Error::InvalidCertificate("not a pre-prepare"));
            };
            let safety_rule_new_view_matches_o =
                v == view && s == *seq && d == *digest && pp.signer == signed.signer;
            if !safety_rule_new_view_matches_o {
                return Err(Error::Violation {
                    replica: signed.signer,
                    what: "new view pre-prepares differ from O",
                });
            }
        }
        // Verify every signature at once: the new view, its view changes and their
        // certificates, and the pre-prepares.
        let mut all: Vec<&SignedMessage> = vec![&signed];
        for info in &infos {
            info.signatures(&mut all);
        }
        all.extend(pre_prepares.iter());
        self.verifier.verify_all(&all)?;
        out.push(Output::Persist(Record::NewView {
            view,
            msg: signed.clone(),
        }));
        let pre_prepares = pre_prepares.into_iter().map(|pp| pp.without_batch()).collect();
        let entries = self.new_view_entries(&plan.entries, pre_prepares);
        self.enter_new_view(view, signed, plan.min_cert, plan.max_seq, entries, out);
        Ok(())
    }

    fn enter_new_view(
        &mut self,
        view: u64,
        msg: SignedMessage,
        min_cert: Option<CheckpointCert>,
        max_seq: u64,
        entries: Vec<NewViewEntry>,
        out: &mut Vec<Output>,
    ) {
        info!(
            replica = self.config.id,
            view,
            max_seq,
            carried = entries.len(),
            "new view installed"
        );
        self.view = view;
        self.in_view_change = false;
        self.own_view_change = None;
        self.suspects.clear();
        self.own_suspect = None;
        self.new_view = Some(msg);
        self.stats.new_views_total += 1;
        self.proposed.clear();
        self.view_changes.retain(|v, _| *v > view);
        for slot in self.slots.values_mut() {
            slot.enter_view(view);
        }
        if let Some(cert) = min_cert {
            self.adopt_stable_cert(cert, out);
        }
        for NewViewEntry {
            seq,
            pre_prepare,
            digest,
            batch,
        } in entries
        {
            if seq <= self.low {
                continue;
            }
            let slot = self.slots.entry(seq).or_default();
            slot.enter_view(view);
            let pre_prepare = match batch {
                Some(entry) => {
                    for request in entry.request_digests.iter() {
                        if self.pending.contains_key(request) {
                            self.proposed.insert(*request);
                        }
                    }
                    let pre_prepare = pre_prepare.with_batch(entry.batch.clone());
                    slot.add_batch(entry);
                    pre_prepare
                }
                // Prepared by 2f+1 replicas in an earlier view but not here: we prepare and
                // commit on the digest; the batch comes beside a re-sent pre-prepare or in a
                // commit proof before we execute.
                None => pre_prepare,
            };
            slot.pre_prepare = Some((pre_prepare, digest));
            self.send_prepare(seq, out);
            self.check_prepared(seq, out);
        }
        self.cancel_view_change_timer(out);
        if self.is_primary() {
            self.next_seq = max_seq.max(self.low);
            self.maybe_propose(false, out);
        } else if !self.pending.is_empty() {
            self.forward_pending(self.pending.len(), out);
            self.arm_view_change_timer(out);
        }
        self.check_all_committed(out);
    }

    /// The new view's slots: each pre-prepare (without its batch) with the batch if we hold
    /// one with that digest (the null batch always).
    fn new_view_entries(
        &self,
        planned: &[(u64, Hash)],
        pre_prepares: Vec<SignedMessage>,
    ) -> Vec<NewViewEntry> {
        let null = Batch::null().digest();
        planned
            .iter()
            .zip(pre_prepares)
            .map(|((seq, digest), pre_prepare)| {
                let batch = if *digest == null {
                    Some(SlotBatch::new(Arc::new(Batch::null())))
                } else {
                    self.slots
                        .get(seq)
                        .and_then(|slot| slot.batches.iter().find(|b| b.digest == *digest).cloned())
                };
                NewViewEntry {
                    seq: *seq,
                    pre_prepare,
                    digest: *digest,
                    batch,
                }
            })
            .collect()
    }

    fn check_all_committed(&mut self, out: &mut Vec<Output>) {
        let seqs: Vec<u64> = self.slots.keys().copied().collect();
        for seq in seqs {
            self.check_committed(seq, out);
        }
    }

    fn forward_pending(&mut self, limit: usize, out: &mut Vec<Output>) {
        let primary = self.primary(self.view);
        if primary == self.config.id {
            return;
        }
        let requests: Vec<Request> = self
            .pending_order
            .iter()
            .filter_map(|d| self.pending.get(d))
            .take(limit.min(FORWARD_PER_TICK_MAX))
            .cloned()
            .collect();
        for request in requests {
            self.forward(out, primary, request);
        }
    }

    // ----------------------------------------------------------------------------------------
    // Status, retransmission, catch-up

    fn on_status_tick(&mut self, out: &mut Vec<Output>) {
        out.push(Output::SetTimer {
            timer: Timer::Status,
            after_ms: self.config.status_interval_ms,
        });
        let status = self.sign(&Message::Status {
            view: self.view,
            in_view_change: self.in_view_change,
            last_executed: self.last_executed,
            stable_seq: self.low,
        });
        self.broadcast(out, MessageKind::Status, status);
        if self.in_view_change {
            if let Some(vc) = self.own_view_change.clone() {
                self.broadcast(out, MessageKind::ViewChange, vc);
            }
        } else {
            // Retransmit our messages for sequence numbers not yet committed here.
            let view = self.view;
            let is_primary = self.is_primary();
            let mut resend = Vec::new();
            let me = self.config.id;
            let mut to_backups = Vec::new();
            for slot in self.slots.values() {
                if slot.view != view || slot.committed.is_some() {
                    continue;
                }
                if is_primary {
                    // Only to backups whose prepare we lack: under load most have it, and
                    // re-sending every batch in flight each tick would double the traffic.
                    if let Some((pp, _)) = slot.pre_prepare.as_ref().filter(|(pp, _)| pp.batch.is_some()) {
                        for backup in (0..self.n as ReplicaId).filter(|r| *r != me) {
                            if !slot.prepares.contains_key(&backup) {
                                to_backups.push((backup, pp.clone()));
                            }
                        }
                    }
                }
                if let Some((_, prepare)) = &slot.my_prepare {
                    resend.push((MessageKind::Prepare, prepare.clone()));
                }
                if let Some((_, commit)) = &slot.my_commit {
                    resend.push((MessageKind::Commit, commit.clone()));
                }
            }
            if let Some(suspect) = self.own_suspect.clone() {
                resend.push((MessageKind::Suspect, suspect));
            }
            for (kind, msg) in resend {
                self.broadcast(out, kind, msg);
            }
            for (backup, pp) in to_backups {
                self.send(out, MessageKind::PrePrepare, backup, pp);
            }
            self.forward_pending(FORWARD_PER_TICK_MAX, out);
        }
        // Our checkpoint votes that are not stable yet.
        let votes: Vec<SignedMessage> = self
            .checkpoints
            .values()
            .filter_map(|c| c.own.as_ref().map(|(_, _, m)| m.clone()))
            .collect();
        for vote in votes {
            self.broadcast(out, MessageKind::Checkpoint, vote);
        }
        // No progress since the last tick and a stable checkpoint above us: fetch the state.
        let stalled = self.last_executed == self.executed_at_last_tick;
        if let Some(target) = self.transfer_target.clone() {
            if target.seq > self.last_executed && stalled && self.transfer.is_none() {
                self.start_transfer(target, out);
            }
        }
        self.executed_at_last_tick = self.last_executed;
        self.try_execute(out);
    }

    fn on_status(
        &mut self,
        signed: SignedMessage,
        view: u64,
        in_view_change: bool,
        last_executed: u64,
        stable_seq: u64,
        out: &mut Vec<Output>,
    ) -> Result<()> {
        let peer = signed.signer;
        let served = self.served_ms[peer as usize];
        if served != 0 && self.now_ms < served + self.config.status_interval_ms / 2 {
            return Err(Error::Stale("status answered recently"));
        }
        self.verifier.verify(&signed)?;
        self.peer_executed[peer as usize] = last_executed;
        let mut answered = false;
        // A peer behind our view: the new view that started ours lets it join.
        let behind_view = view < self.view || (view == self.view && in_view_change);
        if behind_view && !self.in_view_change {
            if let Some(nv) = self.new_view.clone() {
                self.send(out, MessageKind::NewView, peer, nv);
                answered = true;
            }
        }
        // A peer behind in execution: commit proofs from our log, or our stable certificate.
        if stable_seq < self.low && last_executed >= self.low {
            // It executed past our stable checkpoint but missed the votes: our certificate
            // lets it garbage-collect and move its window.
            if let Some(cert) = self.stable.clone() {
                let msg = self.sign(&Message::StableCert { cert });
                self.send(out, MessageKind::StableCert, peer, msg);
                answered = true;
            }
        }
        if last_executed < self.last_executed && self.app_valid {
            if last_executed < self.low {
                if let Some(cert) = self.stable.clone() {
                    let msg = self.sign(&Message::StableCert { cert });
                    self.send(out, MessageKind::StableCert, peer, msg);
                    answered = true;
                }
            } else {
                let end = self.last_executed.min(last_executed + CATCHUP_BATCHES_MAX);
                let mut bytes = 0;
                for seq in last_executed + 1..=end {
                    if bytes >= self.config.catchup_bytes_max {
                        break;
                    }
                    let Some((digest, batch, commits)) = self.slots.get(&seq).and_then(Slot::catch_up_proof)
                    else {
                        continue;
                    };
                    bytes += batch.size_bytes();
                    let msg = self
                        .sign(&Message::CommitProof { seq, digest, commits })
                        .with_batch(batch);
                    self.send(out, MessageKind::CommitProof, peer, msg);
                    answered = true;
                }
            }
        }
        if answered {
            self.served_ms[peer as usize] = self.now_ms.max(1);
        }
        Ok(())
    }

    fn on_commit_proof(
        &mut self,
        signed: SignedMessage,
        seq: u64,
        signed_digest: Hash,
        commits: Vec<SignedMessage>,
        out: &mut Vec<Output>,
    ) -> Result<()> {
        if seq <= self.last_executed || !self.in_window(seq) {
            return Err(Error::Stale("commit proof for an executed or out-of-window seq"));
        }
        let Some(batch) = signed.batch.clone() else {
            return Err(Error::Malformed(
                "a commit proof without its batch beside it".into(),
            ));
        };
        if self.slots.get(&seq).is_some_and(|s| s.committed.is_some()) {
            return Err(Error::Stale("already committed"));
        }
        if commits.is_empty() || commits.len() > self.n {
            return Err(Error::Malformed(
                "commit proof with a wrong number of commits".into(),
            ));
        }
        self.check_batch_shape(&batch)?;
        let entry = SlotBatch::new(batch);
        let digest = entry.digest;
        if digest != signed_digest {
            return Err(Error::Malformed(
                "the batch beside a commit proof has another digest".into(),
            ));
        }
        let mut parsed = Vec::with_capacity(commits.len());
        let mut signers = BTreeSet::new();
        for commit in &commits {
            let Message::Commit {
                view,
                seq: s,
                digest: d,
            } = self.decode(commit)?
            else {
                return Err(Error::InvalidCertificate("not a commit"));
            };
            if s != seq || d != digest || !signers.insert(commit.signer) || commit.signer as usize >= self.n {
                return Err(Error::InvalidCertificate("commit does not match the batch"));
            }
            if view > self.view + VIEWS_AHEAD_MAX {
                return Err(Error::Stale("commit too far ahead in views"));
            }
            parsed.push(view);
        }
        let mut all: Vec<&SignedMessage> = vec![&signed];
        all.extend(commits.iter());
        self.verifier.verify_all(&all)?;
        self.slots.entry(seq).or_default().add_batch(entry);
        for (commit, view) in commits.into_iter().zip(parsed) {
            self.insert_commit(seq, view, digest, commit);
        }
        self.check_committed(seq, out);
        Ok(())
    }

    // ----------------------------------------------------------------------------------------
    // State transfer

    fn start_transfer(&mut self, cert: CheckpointCert, out: &mut Vec<Output>) {
        if let Some(transfer) = &self.transfer {
            if transfer.cert.seq >= cert.seq {
                return;
            }
        }
        let peer = cert
            .votes
            .iter()
            .map(|v| v.signer)
            .find(|s| *s != self.config.id)
            .unwrap_or(0);
        self.stats.state_transfers_started_total += 1;
        let seq = cert.seq;
        self.transfer = Some(Transfer {
            cert,
            peer,
            attempts: 0,
        });
        let msg = self.sign(&Message::FetchSnapshot { seq });
        self.send(out, MessageKind::FetchSnapshot, peer, msg);
        out.push(Output::SetTimer {
            timer: Timer::StateTransfer,
            after_ms: self.config.state_transfer_timeout_ms,
        });
    }

    fn on_transfer_timeout(&mut self, out: &mut Vec<Output>) {
        let Some(transfer) = self.transfer.as_mut() else {
            return;
        };
        transfer.attempts += 1;
        let n = self.n as u32;
        let mut peer = (transfer.peer + 1) % n;
        if peer == self.config.id {
            peer = (peer + 1) % n;
        }
        transfer.peer = peer;
        let seq = transfer.cert.seq;
        let msg = self.sign(&Message::FetchSnapshot { seq });
        self.send(out, MessageKind::FetchSnapshot, peer, msg);
        out.push(Output::SetTimer {
            timer: Timer::StateTransfer,
            after_ms: self.config.state_transfer_timeout_ms,
        });
    }

    fn on_fetch_snapshot(&mut self, signed: SignedMessage, seq: u64, out: &mut Vec<Output>) -> Result<()> {
        let peer = signed.signer;
        let Some((cert, snapshot)) = self.stable_snapshot.clone() else {
            return Err(Error::Stale("no stable snapshot to serve"));
        };
        if cert.seq < seq {
            return Err(Error::Stale("our stable checkpoint is older than asked"));
        }
        let served = self.snapshot_served_ms[peer as usize];
        if served != 0 && self.now_ms < served + self.config.state_transfer_timeout_ms / 2 {
            return Err(Error::Stale("snapshot served recently"));
        }
        self.verifier.verify(&signed)?;
        self.snapshot_served_ms[peer as usize] = self.now_ms.max(1);
        let msg = self.sign(&Message::Snapshot {
            cert,
            snapshot: snapshot.bytes().to_vec(),
        });
        self.send(out, MessageKind::Snapshot, peer, msg);
        Ok(())
    }

    fn on_snapshot(
        &mut self,
        signed: SignedMessage,
        cert: CheckpointCert,
        snapshot: Vec<u8>,
        out: &mut Vec<Output>,
    ) -> Result<()> {
        if self.app_valid && cert.seq <= self.last_executed {
            return Err(Error::Stale("snapshot not ahead of our state"));
        }
        if self.transfer.is_none() && self.app_valid {
            return Err(Error::Stale("no transfer in progress"));
        }
        if cert.seq < self.low {
            return Err(Error::Stale("snapshot below our stable checkpoint"));
        }
        self.verifier.verify(&signed)?;
        self.verify_checkpoint_cert(&cert)?;
        let restored = self.app.restore(&snapshot);
        let seq = cert.seq;
        let matches =
            matches!(&restored, Ok(digest) if *digest == cert.digest.0) && self.app.last_executed() == seq;
        if !matches {
            self.app_valid = false;
            return Err(Error::Violation {
                replica: signed.signer,
                what: "snapshot does not match its certificate",
            });
        }
        self.app_valid = true;
        self.last_executed = seq;
        self.executed_at_last_tick = seq;
        self.transfer = None;
        self.stats.state_transfers_completed_total += 1;
        out.push(Output::CancelTimer {
            timer: Timer::StateTransfer,
        });
        // Requests we held may have executed inside the snapshot; clients retransmit.
        self.pending.clear();
        self.pending_bytes = 0;
        self.pending_order.clear();
        self.proposed.clear();
        self.cancel_view_change_timer(out);
        let snapshot = Snapshot::ready(snapshot);
        out.push(Output::StateTransferred {
            seq,
            snapshot: snapshot.clone(),
        });
        if seq > self.low {
            self.make_stable(cert, snapshot, out);
        }
        self.slots = self.slots.split_off(&(seq + 1));
        self.checkpoints = self.checkpoints.split_off(&(seq + 1));
        self.try_execute(out);
        Ok(())
    }
}
