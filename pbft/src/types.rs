//! Configuration, timers, outputs, durable records and counters of a replica.

use std::collections::BTreeMap;
use std::sync::Arc;

use hoard_types::crypto::{Hash, Keypair, PublicKey};
use serde::{Deserialize, Serialize};

use crate::app::Snapshot;
use crate::constants::BATCHES_PER_SLOT_MAX;
use crate::constants::{CATCHUP_BYTES_MAX, MESSAGE_BYTES_MAX, PENDING_BYTES_MAX, REPLICAS_MAX, REPLICAS_MIN};
use crate::error::{Error, Result};
use crate::message::{Batch, CheckpointCert, MessageKind, PreparedCert, ReplicaId, SignedMessage};

/// A replica's configuration. All durations are milliseconds; the driver owns the clock.
#[derive(Clone, Debug)]
pub struct Config {
    /// This replica's index into `keys`.
    pub id: ReplicaId,
    /// Every replica's public key, by id; n = keys.len() = 3f + 1.
    pub keys: Vec<PublicKey>,
    /// This replica's signing key (its public key must be `keys[id]`).
    pub keypair: Keypair,
    /// K: a checkpoint every K sequence numbers.
    pub checkpoint_interval: u64,
    /// L: sequence numbers accepted are in (h, h + L], h the last stable checkpoint.
    pub window: u64,
    /// Most requests per pre-prepare.
    pub batch_size_max: usize,
    /// Most request bytes per pre-prepare.
    pub batch_bytes_max: usize,
    /// Largest request payload.
    pub request_bytes_max: usize,
    /// Most requests waiting to be ordered and executed (primary pool / backup pending set).
    pub pending_requests_max: usize,
    /// Most bytes (`Request::size_bytes`) of those requests: a count alone let 4,096 requests
    /// of up to 4 MiB each hold gigabytes in a replica that fell behind.
    pub pending_bytes_max: usize,
    /// Largest encoded message accepted.
    pub message_bytes_max: usize,
    /// The primary proposes a partial batch after this long.
    pub batch_timeout_ms: u64,
    /// A backup with a pending request not executed within this long starts a view change;
    /// doubled after each view change that does not complete.
    pub view_change_timeout_ms: u64,
    /// Cap of the view-change timeout's backoff.
    pub view_change_timeout_max_ms: u64,
    /// Period of status messages (retransmission, catch-up, state-transfer discovery).
    pub status_interval_ms: u64,
    /// How long to wait for a snapshot before asking another replica.
    pub state_transfer_timeout_ms: u64,
    /// Most batch bytes of the commit proofs in one catch-up answer to a peer (the first
    /// batch always goes, so that any batch can be caught up on).
    pub catchup_bytes_max: usize,
}

impl Config {
    /// A configuration with the default limits and timeouts.
    pub fn new(id: ReplicaId, keys: Vec<PublicKey>, keypair: Keypair) -> Config {
        Config {
            id,
            keys,
            keypair,
            checkpoint_interval: 64,
            window: 128,
            batch_size_max: 64,
            batch_bytes_max: 4 * 1024 * 1024,
            request_bytes_max: 4 * 1024 * 1024,
            pending_requests_max: 4096,
            pending_bytes_max: PENDING_BYTES_MAX,
            message_bytes_max: 64 * 1024 * 1024,
            batch_timeout_ms: 5,
            view_change_timeout_ms: 2_000,
            view_change_timeout_max_ms: 60_000,
            status_interval_ms: 200,
            state_transfer_timeout_ms: 2_000,
            catchup_bytes_max: CATCHUP_BYTES_MAX,
        }
    }

    /// Number of replicas.
    pub fn n(&self) -> usize {
        self.keys.len()
    }

    /// Faults tolerated: n = 3f + 1.
    pub fn f(&self) -> usize {
        (self.keys.len() - 1) / 3
    }

    /// Checks the relations between the settings.
    pub fn validate(&self) -> Result<()> {
        let n = self.keys.len();
        if !(REPLICAS_MIN..=REPLICAS_MAX).contains(&n) {
            return Err(Error::Config("replicas must be between 4 and 64"));
        }
        if (self.id as usize) >= n {
            return Err(Error::Config("id is not an index into keys"));
        }
        if self.keys[self.id as usize] != self.keypair.public() {
            return Err(Error::Config("keypair does not match keys[id]"));
        }
        if self.checkpoint_interval == 0 || self.window < self.checkpoint_interval {
            return Err(Error::Config("need 0 < checkpoint_interval <= window"));
        }
        if !self.window.is_multiple_of(self.checkpoint_interval) {
            return Err(Error::Config("window must be a multiple of checkpoint_interval"));
        }
        if self.batch_size_max == 0 || self.pending_requests_max < self.batch_size_max {
            return Err(Error::Config("need 0 < batch_size_max <= pending_requests_max"));
        }
        if self.pending_bytes_max < self.batch_bytes_max {
            return Err(Error::Config("pending_bytes_max must hold a full batch"));
        }
        if self.request_bytes_max > self.batch_bytes_max {
            return Err(Error::Config("a request must fit in a batch"));
        }
        if self.message_bytes_max > MESSAGE_BYTES_MAX || self.message_bytes_max < self.batch_bytes_max + 4096
        {
            return Err(Error::Config(
                "message_bytes_max must hold a batch and stay under the hard cap",
            ));
        }
        if self.view_change_timeout_max_ms < self.view_change_timeout_ms {
            return Err(Error::Config(
                "view_change_timeout_max_ms below view_change_timeout_ms",
            ));
        }
        if self.batch_timeout_ms == 0
            || self.view_change_timeout_ms == 0
            || self.status_interval_ms == 0
            || self.state_transfer_timeout_ms == 0
        {
            return Err(Error::Config("timeouts must be positive"));
        }
        Ok(())
    }
}

/// The timers a replica asks for. At most one of each kind is pending: `SetTimer` replaces it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Timer {
    /// Primary: propose a partial batch.
    Batch,
    /// Backup: a request waits too long, or a new view does not arrive.
    ViewChange,
    /// Periodic status and retransmission.
    Status,
    /// A snapshot fetch is overdue.
    StateTransfer,
}

/// A batch this replica executed: the driver appends it to the block log and answers clients.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Committed {
    pub seq: u64,
    pub view: u64,
    pub timestamp_ms: u64,
    /// The executed batch (its requests, in order).
    pub batch: Arc<Batch>,
    pub replies: Vec<Vec<u8>>,
    /// App digest after execution.
    pub digest: [u8; 32],
    /// Digest of the ordered batch.
    pub batch_digest: Hash,
}

/// What the driver must do, in order.
#[derive(Clone, Debug)]
pub enum Output {
    Send {
        to: ReplicaId,
        msg: SignedMessage,
    },
    Broadcast {
        msg: SignedMessage,
    },
    /// (Re)arm the timer of this kind.
    SetTimer {
        timer: Timer,
        after_ms: u64,
    },
    CancelTimer {
        timer: Timer,
    },
    /// Make durable before performing any later output of the same list.
    Persist(Record),
    Committed(Committed),
    Reply {
        client: u64,
        seq: u64,
        request_digest: Hash,
        reply: Vec<u8>,
    },
    /// A checkpoint became stable (its snapshot is in the preceding `Persist` record).
    StableCheckpoint {
        seq: u64,
        digest: Hash,
    },
    /// The app was replaced by `snapshot`, taken at `seq` and verified against 2f+1 checkpoint
    /// signatures (the block log restarts after `seq`). The bytes are the ones received, so the
    /// host can store them without encoding its new state again.
    StateTransferred {
        seq: u64,
        snapshot: Snapshot,
    },
}

/// What a replica makes durable. Fold records into a [`DurableState`] with
/// [`DurableState::apply`] (or store them and fold on recovery).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    /// A batch this replica accepted at `seq` (with digest `digest`): written once per slot and
    /// batch, before the first record below that names it. The pre-prepares inside the slot
    /// records carry no batch; recovery puts it back from here.
    Batch {
        seq: u64,
        digest: Hash,
        batch: Arc<Batch>,
    },
    /// Our pre-prepare as primary.
    PrePrepare { view: u64, seq: u64, msg: SignedMessage },
    /// Our prepare, with the pre-prepare it accepts.
    Prepare {
        view: u64,
        seq: u64,
        digest: Hash,
        pre_prepare: SignedMessage,
        prepare: SignedMessage,
    },
    /// We prepared (the certificate) and our commit.
    Commit {
        view: u64,
        seq: u64,
        digest: Hash,
        cert: PreparedCert,
        commit: SignedMessage,
    },
    /// We moved to `view` and voted for it.
    ViewChange { view: u64, msg: SignedMessage },
    /// We entered `view` by this new-view message (ours as primary, or accepted).
    NewView { view: u64, msg: SignedMessage },
    /// A checkpoint became stable; its snapshot (the app state at `cert.seq`).
    StableCheckpoint {
        cert: CheckpointCert,
        snapshot: Snapshot,
    },
}

/// Our signed messages for one sequence number, newest view.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DurableSlot {
    /// The batches named by the records below, by digest.
    pub batches: Vec<(Hash, Arc<Batch>)>,
    pub pre_prepare: Option<(u64, SignedMessage)>,
    pub prepare: Option<(u64, Hash, SignedMessage, SignedMessage)>,
    pub commit: Option<(u64, Hash, PreparedCert, SignedMessage)>,
}

/// What the Persist records left on disk: bounded (slots above the stable checkpoint only).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DurableState {
    pub view: u64,
    pub in_view_change: bool,
    /// Our view-change message for `view`, if we are changing views.
    pub view_change: Option<SignedMessage>,
    /// The new-view message that started `view`.
    pub new_view: Option<SignedMessage>,
    pub stable: Option<CheckpointCert>,
    pub stable_snapshot: Option<Snapshot>,
    pub slots: BTreeMap<u64, DurableSlot>,
}

impl DurableState {
    /// The stable checkpoint's sequence number (0 at genesis).
    pub fn stable_seq(&self) -> u64 {
        self.stable.as_ref().map_or(0, |c| c.seq)
    }

    /// Folds one record in. Idempotent; older information never overwrites newer.
    pub fn apply(&mut self, record: Record) {
        let stable_seq = self.stable_seq();
        match record {
            Record::Batch { seq, digest, batch } => {
                if seq > stable_seq {
                    let slot = self.slots.entry(seq).or_default();
                    if !slot.batches.iter().any(|(d, _)| *d == digest) {
                        if slot.batches.len() >= BATCHES_PER_SLOT_MAX {
                            slot.batches.remove(0);
                        }
                        slot.batches.push((digest, batch));
                    }
                }
            }
            Record::PrePrepare { view, seq, msg } => {
                if seq > stable_seq {
                    let slot = self.slots.entry(seq).or_default();
                    if slot.pre_prepare.as_ref().is_none_or(|(v, _)| *v <= view) {
                        slot.pre_prepare = Some((view, msg));
                    }
                }
            }
            Record::Prepare {
                view,
                seq,
                digest,
                pre_prepare,
                prepare,
            } => {
                if seq > stable_seq {
                    let slot = self.slots.entry(seq).or_default();
                    if slot.prepare.as_ref().is_none_or(|(v, ..)| *v <= view) {
                        slot.prepare = Some((view, digest, pre_prepare, prepare));
                    }
                }
            }
            Record::Commit {
                view,
                seq,
                digest,
                cert,
                commit,
            } => {
                if seq > stable_seq {
                    let slot = self.slots.entry(seq).or_default();
                    if slot.commit.as_ref().is_none_or(|(v, ..)| *v <= view) {
                        slot.commit = Some((view, digest, cert, commit));
                    }
                }
            }
            Record::ViewChange { view, msg } => {
                if view >= self.view {
                    self.view = view;
                    self.in_view_change = true;
                    self.view_change = Some(msg);
                    self.new_view = None;
                }
            }
            Record::NewView { view, msg } => {
                if view > self.view || (view == self.view && self.in_view_change) {
                    self.view = view;
                    self.in_view_change = false;
                    self.view_change = None;
                    self.new_view = Some(msg);
                }
            }
            Record::StableCheckpoint { cert, snapshot } => {
                if cert.seq > stable_seq {
                    let seq = cert.seq;
                    self.stable = Some(cert);
                    self.stable_snapshot = Some(snapshot);
                    self.slots.retain(|s, _| *s > seq);
                }
            }
        }
    }
}

/// Counters and gauges the runtime exports (no metrics crate here).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub view: u64,
    pub in_view_change: bool,
    pub view_changes_total: u64,
    pub new_views_total: u64,
    pub last_executed: u64,
    pub stable_checkpoint_seq: u64,
    pub batches_executed_total: u64,
    pub requests_executed_total: u64,
    pub state_transfers_started_total: u64,
    pub state_transfers_completed_total: u64,
    pub requests_dropped_total: u64,
    /// Client retransmissions of executed requests answered with their remembered reply.
    pub replies_resent_total: u64,
    /// Messages received, by [`MessageKind::index`].
    pub messages_received_total: [u64; MessageKind::COUNT],
    /// Messages sent or broadcast (one per output), by kind.
    pub messages_sent_total: [u64; MessageKind::COUNT],
    /// Late, duplicate or out-of-window messages dropped.
    pub messages_stale_total: u64,
    /// Messages rejected as invalid (bad signature, malformed, protocol violation).
    pub messages_invalid_total: u64,
    pub log_slots: usize,
    pub pending_requests: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;

    fn keys(n: u8) -> (Vec<Keypair>, Vec<PublicKey>) {
        let pairs: Vec<Keypair> = (0..n).map(|i| Keypair::from_seed([i + 1; 32])).collect();
        let publics = pairs.iter().map(Keypair::public).collect();
        (pairs, publics)
    }

    #[test]
    fn config_validation_catches_bad_settings() {
        let (pairs, publics) = keys(4);
        let config = Config::new(1, publics.clone(), pairs[1].clone());
        config.validate().unwrap();
        assert_eq!((config.n(), config.f()), (4, 1));
        let wrong_key = Config::new(1, publics.clone(), pairs[2].clone());
        assert!(wrong_key.validate().is_err());
        let mut window = config.clone();
        window.window = 100;
        assert!(window.validate().is_err(), "window must be a multiple of K");
        let (pairs3, publics3) = keys(3);
        assert!(
            Config::new(0, publics3, pairs3[0].clone()).validate().is_err(),
            "n >= 4"
        );
        let mut backoff = config;
        backoff.view_change_timeout_max_ms = 1;
        assert!(backoff.validate().is_err());
    }

    #[test]
    fn durable_state_keeps_the_newest_and_drops_below_the_stable_checkpoint() {
        let (pairs, _) = keys(4);
        let pp = |view: u64, seq: u64| {
            Message::PrePrepare {
                view,
                seq,
                digest: crate::message::Batch::null().digest(),
            }
            .sign(0, &pairs[0])
        };
        let mut state = DurableState::default();
        state.apply(Record::PrePrepare {
            view: 1,
            seq: 5,
            msg: pp(1, 5),
        });
        state.apply(Record::PrePrepare {
            view: 0,
            seq: 5,
            msg: pp(0, 5),
        });
        assert_eq!(
            state.slots[&5].pre_prepare.as_ref().unwrap().0,
            1,
            "an older view never overwrites"
        );
        state.apply(Record::PrePrepare {
            view: 1,
            seq: 9,
            msg: pp(1, 9),
        });
        let vc = Message::ViewChange {
            new_view: 2,
            stable: None,
            prepared: vec![],
        }
        .sign(0, &pairs[0]);
        state.apply(Record::ViewChange {
            view: 2,
            msg: vc.clone(),
        });
        assert!(state.in_view_change && state.view == 2);
        let nv = Message::NewView {
            view: 2,
            view_changes: vec![],
            pre_prepares: vec![],
        }
        .sign(2, &pairs[2]);
        state.apply(Record::NewView { view: 2, msg: nv });
        assert!(!state.in_view_change && state.view_change.is_none());
        state.apply(Record::ViewChange { view: 1, msg: vc });
        assert_eq!(state.view, 2, "views never go back");
        let cert = crate::message::CheckpointCert {
            seq: 8,
            digest: Hash::ZERO,
            votes: vec![],
        };
        state.apply(Record::StableCheckpoint {
            cert,
            snapshot: Snapshot::ready(vec![1, 2, 3]),
        });
        assert_eq!(state.stable_seq(), 8);
        assert!(!state.slots.contains_key(&5) && state.slots.contains_key(&9));
        state.apply(Record::PrePrepare {
            view: 2,
            seq: 7,
            msg: pp(2, 7),
        });
        assert!(
            !state.slots.contains_key(&7),
            "nothing below the stable checkpoint is kept"
        );
        let bytes = rmp_serde::to_vec(&state).unwrap();
        let back: DurableState = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(back, state);
    }
}
