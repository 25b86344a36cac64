//! The asset state machine: tenants, accounts, currencies, item classes, items, and the
//! deduplication window of event ids.
//!
//! [`Ledger::execute`] applies one block's transactions in order and returns the block (header
//! filled in) and one [`Receipt`] per transaction. It is pure and deterministic: no I/O, no
//! clock, no randomness, no hash-map iteration in anything hashed or applied (the Merkle tree
//! orders by key hash; snapshots sort). Two ledgers fed the same blocks report the same roots.
//! [`Ledger::execute_pipelined`] and [`Ledger::apply_blocks`] (a replay) give the same blocks
//! with each block's commitment computed on the second core while the next block applies.
//!
//! Rules, in the order they are checked for each transaction:
//! 1. the payload decodes and respects the limits, else `malformed`;
//! 2. it is for this chain, else `wrong_chain`;
//! 3. its `(tenant, event_id)` was seen inside the window: the original outcome is returned,
//!    marked duplicate, and nothing changes;
//! 4. it has not expired (`expires_at >= height`) and does not reach past the window
//!    (`expires_at <= height + EXPIRY_HORIZON_BLOCKS_MAX`);
//! 5. the tenant exists, and the signers are exactly the authorities the body needs; when they
//!    are not, the rejection goes on to step 6 if a member of the tenant (its studio key or an
//!    account registered with it) signed, and is returned unremembered otherwise;
//! 6. the tenant's deduplication window has room (fewer than the genesis cap,
//!    [`Genesis::window_cap`], events remembered), else `window_full`;
//! 7. the body applies whole or not at all.
//!
//! Rejections at steps 1-4, at step 5 without a member's signature, and at step 6 are not
//! remembered: the sender had no authority to claim the event id (so a forged or broken
//! submission cannot block the real one), or the window is full (the same event may come back).
//! Every other outcome, applied or rejected, is remembered until `expires_at` passes:
//! resubmitting returns it. (A member could claim any of its tenant's event ids anyway, with an
//! authorised event that step 7 rejects; nothing signed outside a tenant reaches its window.)
//! (A full window is a tenant's own back-pressure: its events wait for older ones to expire, and
//! one tenant's load never fills another's window.)
//!
//! The state root commits to every tenant, account, currency, class, non-zero balance and item
//! as one Merkle leaf each, and to the deduplication window through one leaf per tenant and
//! expiry height ([`StateKey::Window`]): a running SHA-256 over the records of the events
//! remembered with that expiry, in the order they were remembered (see [`window_digest`]). An
//! event costs its window a few bytes of hashing instead of a leaf of its own, and a snapshot
//! (which lists the events in window order) is still checked against the state root whole.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use hoard_types::constants::{
    ASSETS_PER_SIDE_MAX, BLOCK_TRANSACTIONS_MAX, EXPIRY_HORIZON_BLOCKS_MAX, SETTLEMENT_ENTRIES_MAX,
    TENANT_NAME_BYTES_MAX,
};
use hoard_types::{
    Amount, Asset, ClassId, CurrencyId, Custody, EventId, Grant, Hash, Item, ItemId, ItemKind, Outcome,
    PublicKey, Receipt, Rejection, Settlement, SwapSide, TenantId, Transaction, TxBody, TxPayload,
};

use crate::block::{
    list_root, receipt_leaf, receipt_leaf_x2, transaction_leaf, transaction_leaf_x2, Block, BlockHeader,
};
use crate::error::{LedgerError, Result};
use crate::genesis::Genesis;
use crate::merkle::{leaf_hash, leaf_hash_x2, MerkleTree, Proof};
use crate::prefetch::{prefetch_entry, prefetch_slice, PrefetchMap, StateHasher};

/// The state's other maps, with the same hash as [`PrefetchMap`] (see [`StateHasher`]).
type StateMap<K, V> = std::collections::HashMap<K, V, StateHasher>;
type StateSet<K> = std::collections::HashSet<K, StateHasher>;

/// Below this many transactions a block is decoded and hashed on one thread.
const PARALLEL_TRANSACTIONS_MIN: usize = 512;
/// How many transactions (or settlement entries) ahead the apply loop starts loading the state
/// entries one reads ([`Ledger::prefetch_transaction`], [`Ledger::prefetch_grant`]). Measured
/// with `hoard-ledger-bench --phases a` (BENCHMARKS.md): 4 and 16 gained little, 128 less than 48.
const PREFETCH_AHEAD: usize = 48;
/// Below this many payload bytes a block's roots are hashed on the applying thread, not beside it
/// on the pool's: handing a job to the pool wakes a worker, which then spins in `sched_yield`
/// before it sleeps again, and for a small block that costs more than the hashing it moves
/// (measured: replicas at 100 events/s in blocks of a few transactions spent about a fifth of
/// their CPU in those spins). 64 KiB is about 300 transfers or two settlements of 500 entries.
const PARALLEL_BLOCK_BYTES_MIN: usize = 64 * 1024;

/// `rayon::join(a, b)` when `parallel`, else `(a(), b())` on this thread. `b` learns whether it
/// runs beside `a`, on another thread at the same time (rayon's `migrated`; never when not
/// `parallel`). Either way the results are the same (nothing here depends on which thread ran
/// what).
fn join_if<A, B, RA, RB>(parallel: bool, a: A, b: B) -> (RA, RB)
where
    A: FnOnce() -> RA + Send,
    B: FnOnce(bool) -> RB + Send,
    RA: Send,
    RB: Send,
{
    if parallel {
        rayon::join_context(|_| a(), |context| b(context.migrated()))
    } else {
        (a(), b(false))
    }
}

/// Stores `true` when dropped: on a scope's end, also by unwinding.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// A block applied to the state, its commitment not yet computed: what [`commit`] needs,
/// captured when the apply ended ([`Ledger::apply`]).
struct Applied {
    height: u64,
    timestamp_ms: u64,
    transactions: Vec<Transaction>,
    /// Freed beside the commitment, on every core, as they were allocated.
    payloads: Vec<OnceLock<Option<TxPayload>>>,
    /// Whether the block was large enough to be applied on two cores (so is its commitment).
    parallel: bool,
    tx_root: Hash,
    receipts: Vec<Receipt>,
    /// The leaves of the first receipts, hashed beside the apply.
    receipt_leaves: Vec<Hash>,
    changed: Changes,
}

/// The state entries a block changed, as its commitment takes them ([`Ledger::take_changes`]).
struct Changes {
    /// Key hash and leaf hash (`None`: removed) of each.
    leaves: Vec<(Hash, Option<Hash>)>,
}

impl Changes {
    /// Hashes the changes into `tree` and returns its new root.
    fn commit(self, tree: &mut MerkleTree) -> Hash {
        tree.set_many(self.leaves);
        tree.root()
    }
}

/// Appends to `leaves` one leaf per changed balance: its key hash, and its leaf hash (`None`
/// when it reached zero).
fn balance_leaves(leaves: &mut Vec<(Hash, Option<Hash>)>, balances: &[DirtyBalance]) {
    // Two at a time ([`leaf_hash_x2`]) where both have an amount.
    let leaves_of = |pair: &[DirtyBalance]| {
        let amount = |b: &DirtyBalance| b.amount.0.to_be_bytes();
        match pair {
            [a, b] if !a.amount.is_zero() && !b.amount.is_zero() => {
                let (leaf_a, leaf_b) = leaf_hash_x2((&a.key_hash, &amount(a)), (&b.key_hash, &amount(b)));
                [Some((a.key_hash, Some(leaf_a))), Some((b.key_hash, Some(leaf_b)))]
            }
            _ => {
                let mut leaves = [None, None];
                for (out, b) in leaves.iter_mut().zip(pair) {
                    let leaf = (!b.amount.is_zero()).then(|| leaf_hash(&b.key_hash, &amount(b)));
                    *out = Some((b.key_hash, leaf));
                }
                leaves
            }
        }
    };
    // One entry per balance, written in place.
    let start = leaves.len();
    leaves.resize(start + balances.len(), (Hash::ZERO, None));
    let fill = |(out, pair): (&mut [(Hash, Option<Hash>)], &[DirtyBalance])| {
        for (out, leaf) in out.iter_mut().zip(leaves_of(pair).into_iter().flatten()) {
            *out = leaf;
        }
    };
    if balances.len() >= PARALLEL_TRANSACTIONS_MIN {
        leaves[start..]
            .par_chunks_mut(2)
            .zip(balances.par_chunks(2))
            .with_min_len(256)
            .for_each(fill);
    } else {
        leaves[start..]
            .chunks_mut(2)
            .zip(balances.chunks(2))
            .for_each(fill);
    }
}

/// Checks a block header computed here against the one it was given.
fn agree(ours: &BlockHeader, theirs: &BlockHeader) -> Result<()> {
    let checks = [
        ("parent", ours.parent, theirs.parent),
        ("tx_root", ours.tx_root, theirs.tx_root),
        ("outcome_root", ours.outcome_root, theirs.outcome_root),
        ("state_root", ours.state_root, theirs.state_root),
    ];
    for (what, ours_hash, theirs_hash) in checks {
        if ours_hash != theirs_hash {
            return Err(LedgerError::Diverged {
                height: theirs.height,
                what,
                ours: ours_hash,
                theirs: theirs_hash,
            });
        }
    }
    Ok(())
}

/// Completes an applied block on `tree` (the state tree after the block before it, whose header
/// is `parent`): its state root and its outcomes' root, side by side, then its header.
fn commit(tree: &mut MerkleTree, parent: &BlockHeader, applied: Applied) -> (Block, Vec<Receipt>) {
    let Applied {
        height,
        timestamp_ms,
        transactions,
        payloads,
        parallel,
        tx_root,
        receipts,
        mut receipt_leaves,
        changed,
    } = applied;
    assert_eq!(height, parent.height + 1, "blocks are committed in order");
    let (state_root, outcome_root) = join_if(
        parallel,
        || changed.commit(tree),
        |_| {
            receipt_leaves.extend(leaves(
                &receipts[receipt_leaves.len()..],
                receipt_leaf,
                receipt_leaf_x2,
            ));
            let root = list_root(receipt_leaves.into_iter());
            if parallel {
                // Freed on every core, as they were allocated.
                payloads.into_par_iter().for_each(drop);
            }
            root
        },
    );
    let header = BlockHeader {
        height,
        parent: parent.hash(),
        timestamp_ms,
        tx_root,
        outcome_root,
        state_root,
    };
    (Block { header, transactions }, receipts)
}

/// Largest number of decimals a currency may declare (u128 holds 38 decimal digits).
pub const CURRENCY_DECIMALS_MAX: u8 = 36;

/// A tenant (studio).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantInfo {
    pub name: String,
    pub studio_key: PublicKey,
}

/// A currency's definition and supply counters. Invariant: `minted == sum(balances) + burned`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CurrencyInfo {
    pub decimals: u8,
    /// Caps `minted` (everything ever issued), so that burning never makes room for more.
    pub max_supply: Amount,
    pub minted: Amount,
    pub burned: Amount,
}

/// An item class's definition and supply counters, in units (a unique item is one unit, a stack
/// its quantity). Invariant: `minted == sum(units of its items) + burned`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassInfo {
    pub stackable: bool,
    pub max_supply: Amount,
    pub metadata_hash: Hash,
    pub minted: Amount,
    pub burned: Amount,
}

/// What the deduplication window remembers of an event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    pub height: u64,
    pub expires_at: u64,
    pub outcome: RecordedOutcome,
}

/// An outcome as the deduplication window keeps it. A settlement whose entries all applied,
/// the usual case, is kept as its entry count: one `None` per entry made a 500-entry
/// settlement's record 600 bytes instead of about 100, in memory and in every snapshot.
/// The variants have one-letter names in snapshots: the name is encoded with every record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecordedOutcome {
    /// Any outcome, as it was.
    #[serde(rename = "o")]
    Outcome(Outcome),
    /// `Outcome::Settled` with this many entries, every one applied.
    #[serde(rename = "s")]
    SettledAll { entries: u32 },
}

impl RecordedOutcome {
    pub fn new(outcome: Outcome) -> RecordedOutcome {
        match outcome {
            Outcome::Settled { entries } if entries.iter().all(Option::is_none) => {
                RecordedOutcome::SettledAll {
                    entries: u32::try_from(entries.len()).expect("settlements are bounded"),
                }
            }
            outcome => RecordedOutcome::Outcome(outcome),
        }
    }

    /// The outcome it stands for.
    pub fn outcome(&self) -> Outcome {
        match self {
            RecordedOutcome::Outcome(outcome) => outcome.clone(),
            RecordedOutcome::SettledAll { entries } => Outcome::Settled {
                entries: vec![None; *entries as usize],
            },
        }
    }
}

/// The domain a window digest starts with.
const WINDOW_DOMAIN: &[u8] = b"hoard/window/v1\0";

/// One event as its window keeps it.
#[derive(Clone, Debug)]
struct WindowRecord {
    event: EventId,
    height: u64,
    outcome: RecordedOutcome,
}

/// The events of one tenant remembered with one expiry height, in the order they were
/// remembered, and the running hash of their records.
///
/// The records are shared with the snapshot views taken since ([`Ledger::snapshot_view`]), so
/// that a checkpoint takes a reference per window instead of copying every record inside the
/// consensus step (5 ms at 100,000 records, on every replica at once, and growing with the
/// window up to its cap of millions). They are kept in chunks ([`WindowRecords`]): a window
/// that gets another event while a view still holds it copies its last chunk only; windows are
/// keyed by expiry height, so that is the few windows still being filled.
#[derive(Clone, Debug)]
struct Window {
    records: WindowRecords,
    hasher: Sha256,
    /// The height of the last block that listed this window in [`Ledger::dirty`]: a block lists
    /// it once, not once per event.
    dirty_at: u64,
}

impl Window {
    fn new(tenant: TenantId, expires_at: u64) -> Window {
        let mut hasher = Sha256::new();
        hasher.update(WINDOW_DOMAIN);
        hasher.update(tenant.0.to_be_bytes());
        hasher.update(expires_at.to_be_bytes());
        Window {
            records: WindowRecords::default(),
            hasher,
            dirty_at: 0,
        }
    }

    /// Adds an event to the running hash only: the record's bytes gathered first, then hashed
    /// in one call (each call to the hasher has a fixed cost, and a record is a few dozen
    /// bytes); an outcome too long for the buffer is streamed into the hasher instead.
    fn absorb(&mut self, event: &EventId, height: u64, outcome: &Outcome) {
        const HEAD: usize = 16 + 8;
        let mut record = [0u8; 128];
        record[..16].copy_from_slice(&event.0);
        record[16..HEAD].copy_from_slice(&height.to_be_bytes());
        // The commonest outcome by far is written as its bytes, no serializer.
        if let Outcome::Applied = outcome {
            let length = HEAD + Outcome::APPLIED_MSGPACK.len();
            record[HEAD..length].copy_from_slice(Outcome::APPLIED_MSGPACK);
            self.hasher.update(&record[..length]);
            return;
        }
        let mut rest = std::io::Cursor::new(&mut record[HEAD..]);
        if rmp_serde::encode::write(&mut rest, outcome).is_ok() {
            let length = HEAD + rest.position() as usize;
            self.hasher.update(&record[..length]);
        } else {
            self.hasher.update(&record[..HEAD]);
            rmp_serde::encode::write(&mut HashWriter(&mut self.hasher), outcome).expect("outcomes serialise");
        }
    }

    /// Remembers an event; returns its index in the window.
    fn push(&mut self, event: EventId, height: u64, outcome: Outcome) -> u32 {
        self.absorb(&event, height, &outcome);
        let index = self.records.push(WindowRecord {
            event,
            height,
            outcome: RecordedOutcome::new(outcome),
        });
        u32::try_from(index).expect("a window holds fewer than 2^32 events")
    }

    fn digest(&self) -> Hash {
        Hash(self.hasher.clone().finalize().into())
    }
}

/// Records per chunk of a window's records (the first chunk grows up to it as a `Vec` does).
const WINDOW_CHUNK_RECORDS: usize = 4096;

/// A window's records, in the order remembered, as chunks of [`WINDOW_CHUNK_RECORDS`], each
/// shared with the snapshot views that hold it. A window never reallocates (and so never
/// copies) more than a chunk: a window of a million events (a tenant whose clients all chose
/// one expiry height) grows without ever copying its records to a larger block, and a snapshot
/// view taken while it fills costs its next event a copy of one chunk, not of the window.
/// The first chunk grows as a `Vec` does, so that the many small windows stay small.
#[derive(Clone, Debug, Default)]
struct WindowRecords(Arc<Vec<Arc<Vec<WindowRecord>>>>);

impl WindowRecords {
    /// Appends a record; returns its index.
    fn push(&mut self, record: WindowRecord) -> usize {
        let chunks = Arc::make_mut(&mut self.0);
        let full = chunks
            .last()
            .is_none_or(|last| last.len() == WINDOW_CHUNK_RECORDS);
        if full {
            let capacity = if chunks.is_empty() {
                0
            } else {
                WINDOW_CHUNK_RECORDS
            };
            chunks.push(Arc::new(Vec::with_capacity(capacity)));
        }
        let before = (chunks.len() - 1) * WINDOW_CHUNK_RECORDS;
        let last = Arc::make_mut(chunks.last_mut().expect("a chunk to push to"));
        debug_assert!(last.len() < WINDOW_CHUNK_RECORDS);
        last.push(record);
        before + last.len() - 1
    }

    fn get(&self, index: usize) -> Option<&WindowRecord> {
        self.0
            .get(index / WINDOW_CHUNK_RECORDS)?
            .get(index % WINDOW_CHUNK_RECORDS)
    }

    fn len(&self) -> usize {
        self.0
            .last()
            .map_or(0, |last| (self.0.len() - 1) * WINDOW_CHUNK_RECORDS + last.len())
    }

    fn iter(&self) -> impl Iterator<Item = &WindowRecord> {
        self.0.iter().flat_map(|chunk| chunk.iter())
    }
}

/// The digest a [`StateKey::Window`] entry holds: SHA-256 over
/// `"hoard/window/v1\0" || tenant (8 bytes, big-endian) || expires_at (8 bytes, big-endian)`,
/// then, for each event remembered with that tenant and expiry height, in the order remembered,
/// `event_id (16 bytes) || height (8 bytes, big-endian) || outcome (MessagePack)`.
pub fn window_digest<'a>(
    tenant: TenantId,
    expires_at: u64,
    records: impl IntoIterator<Item = (&'a EventId, u64, &'a Outcome)>,
) -> Hash {
    let mut window = Window::new(tenant, expires_at);
    for (event, height, outcome) in records {
        window.absorb(event, height, outcome);
    }
    window.digest()
}

/// Feeds MessagePack straight into a hasher (no intermediate buffer).
struct HashWriter<'a>(&'a mut Sha256);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.update(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A key of the committed state. Its byte form ([`StateKey::encode`]) is what the Merkle tree
/// hashes, so a client can ask for and check a proof of any one entry.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StateKey {
    Tenant(TenantId),
    Account(TenantId, PublicKey),
    Currency(TenantId, CurrencyId),
    Class(TenantId, ClassId),
    Balance(TenantId, CurrencyId, PublicKey),
    Item(TenantId, ItemId),
    /// The deduplication window of one tenant and expiry height: its value is the
    /// [`window_digest`] of the events remembered until that height (kind 7, one leaf per
    /// event, is no longer used).
    Window(TenantId, u64),
}

impl StateKey {
    /// `kind (1 byte) || tenant (8 bytes, big-endian) || fields`, strings prefixed by their length.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        self.as_ref().write(&mut |bytes| out.extend_from_slice(bytes));
        out
    }

    fn as_ref(&self) -> KeyRef<'_> {
        match self {
            StateKey::Tenant(t) => KeyRef::Tenant(*t),
            StateKey::Account(t, a) => KeyRef::Account(*t, a),
            StateKey::Currency(t, c) => KeyRef::Currency(*t, &c.0),
            StateKey::Class(t, c) => KeyRef::Class(*t, &c.0),
            StateKey::Balance(t, c, a) => KeyRef::Balance(*t, &c.0, a),
            StateKey::Item(t, i) => KeyRef::Item(*t, *i),
            StateKey::Window(t, e) => KeyRef::Window(*t, *e),
        }
    }
}

/// A borrowed [`StateKey`]: the one place its byte form is written.
enum KeyRef<'a> {
    Tenant(TenantId),
    Account(TenantId, &'a PublicKey),
    Currency(TenantId, &'a str),
    Class(TenantId, &'a str),
    Balance(TenantId, &'a str, &'a PublicKey),
    Item(TenantId, ItemId),
    Window(TenantId, u64),
}

impl KeyRef<'_> {
    fn write(&self, out: &mut impl FnMut(&[u8])) {
        let (kind, tenant) = match self {
            KeyRef::Tenant(t) => (1u8, t),
            KeyRef::Account(t, _) => (2, t),
            KeyRef::Currency(t, _) => (3, t),
            KeyRef::Class(t, _) => (4, t),
            KeyRef::Balance(t, _, _) => (5, t),
            KeyRef::Item(t, _) => (6, t),
            KeyRef::Window(t, _) => (8, t),
        };
        out(&[kind]);
        out(&tenant.0.to_be_bytes());
        let string = |out: &mut dyn FnMut(&[u8]), s: &str| {
            out(&[s.len() as u8]);
            out(s.as_bytes());
        };
        match self {
            KeyRef::Tenant(_) => {}
            KeyRef::Account(_, account) => out(&account.0),
            KeyRef::Currency(_, currency) => string(out, currency),
            KeyRef::Class(_, class) => string(out, class),
            KeyRef::Balance(_, currency, account) => {
                string(out, currency);
                out(&account.0);
            }
            KeyRef::Item(_, item) => out(&item.0.to_be_bytes()),
            KeyRef::Window(_, expires_at) => out(&expires_at.to_be_bytes()),
        }
    }

    /// `SHA-256(encoding)`: the same as `merkle::key_hash(&key.encode())`, without the buffer.
    fn hash(&self) -> Hash {
        let mut hasher = Sha256::new();
        self.write(&mut |bytes| hasher.update(bytes));
        Hash(hasher.finalize().into())
    }
}

/// Internal, cheaper form of [`StateKey`] for dirty tracking (currencies by slot number).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Dirty {
    Tenant(TenantId),
    Account(TenantId, PublicKey),
    Currency(u32),
    Class(TenantId, u32),
    Balance(u32, PublicKey),
    Item(TenantId, ItemId),
    Window(TenantId, u64),
}

/// A balance, with what its commitment needs: the hash of its state key, computed once when
/// the balance appears, and where the block that last changed it keeps its dirty copy.
#[derive(Clone, Debug)]
struct Balance {
    amount: Amount,
    key_hash: Hash,
    /// A balance is listed in [`Ledger::dirty_balances`] at most once per block: when this is
    /// below the height being applied.
    dirty_at: u64,
    /// Its position in [`Ledger::dirty_balances`] while `dirty_at` is the height being applied.
    dirty_index: u32,
}

/// A balance changed by the block being applied, with its latest amount: the block's
/// commitment hashes these without looking the balances up again.
#[derive(Clone, Debug)]
struct DirtyBalance {
    key: (u32, PublicKey),
    key_hash: Hash,
    amount: Amount,
}

impl Balance {
    /// Records this balance's new amount in `dirty`, where the block at `height` lists it once.
    fn mark_dirty(&mut self, height: u64, key: (u32, PublicKey), dirty: &mut Vec<DirtyBalance>) {
        if self.dirty_at < height {
            self.dirty_at = height;
            self.dirty_index = u32::try_from(dirty.len()).expect("a block changes fewer than 2^32 balances");
            dirty.push(DirtyBalance {
                key,
                key_hash: self.key_hash,
                amount: self.amount,
            });
        } else {
            let entry = &mut dirty[self.dirty_index as usize];
            debug_assert_eq!(entry.key, key, "a dirty balance's index points at its entry");
            entry.amount = self.amount;
        }
    }
}

#[derive(Clone, Debug)]
struct CurrencyState {
    tenant: TenantId,
    id: CurrencyId,
    info: CurrencyInfo,
}

/// The ledger: the whole asset state of every tenant, and its Merkle commitment.
#[derive(Clone, Debug)]
pub struct Ledger {
    chain_id: u64,
    operator: PublicKey,
    head: BlockHeader,
    /// The height of the block being applied; between blocks, of the last one applied (ahead of
    /// `head` while a pipelined block's commitment is still being computed).
    applying: u64,
    tenants: BTreeMap<TenantId, TenantInfo>,
    studio_keys: StateMap<PublicKey, TenantId>,
    accounts: PrefetchMap<(TenantId, PublicKey), Custody>,
    /// Currencies by slot (slots are handed out in definition order, the same on every replica).
    currencies: Vec<CurrencyState>,
    currency_slots: Slots<CurrencyId>,
    classes: Vec<(TenantId, ClassId, ClassInfo)>,
    class_slots: Slots<ClassId>,
    /// Non-zero balances between blocks. Inside a block a balance that reaches zero stays
    /// (at zero) until the block's commitment, which removes it.
    balances: PrefetchMap<(u32, PublicKey), Balance>,
    /// Balances changed by the block being applied, each once (see [`Balance::dirty_at`]),
    /// with their latest amounts.
    dirty_balances: Vec<DirtyBalance>,
    items: StateMap<(TenantId, ItemId), Item>,
    inventory: BTreeSet<(TenantId, PublicKey, ItemId)>,
    /// Where each remembered event's record is: its window's expiry height and its index there.
    events: PrefetchMap<(TenantId, EventId), (u64, u32)>,
    /// The deduplication window by `(expires_at, tenant)`: what expires first comes first.
    windows: BTreeMap<(u64, TenantId), Window>,
    /// Events each tenant's window holds (the sum of its windows' lengths).
    window_counts: StateMap<TenantId, u64>,
    /// The genesis cap on `window_counts` (step 6).
    window_cap: u64,
    tree: MerkleTree,
    dirty: StateSet<Dirty>,
}

type Check<T = ()> = std::result::Result<T, Rejection>;

/// The assets a transfer or burn moves, if that is what `payload` is.
fn moved_assets(payload: &TxPayload) -> &[Asset] {
    match &payload.body {
        TxBody::Transfer { assets, .. } | TxBody::Burn { assets, .. } => assets,
        _ => &[],
    }
}

/// Starts loading a transaction's asset list, currency symbols included (they are held inline),
/// the first step before [`Ledger::prefetch_transaction`].
fn prefetch_assets(payload: &TxPayload) {
    prefetch_slice(moved_assets(payload));
}

impl Ledger {
    /// The state at height 0: the genesis tenants, nothing else.
    pub fn new(genesis: &Genesis) -> Ledger {
        let mut ledger = Ledger::empty(
            genesis.chain_id,
            genesis.operator,
            genesis.window_cap(),
            BlockHeader {
                height: 0,
                parent: genesis.hash(),
                timestamp_ms: 0,
                tx_root: Hash::ZERO,
                outcome_root: Hash::ZERO,
                state_root: Hash::ZERO,
            },
        );
        for tenant in &genesis.tenants {
            ledger.insert_tenant(
                tenant.id,
                TenantInfo {
                    name: tenant.name.clone(),
                    studio_key: tenant.studio_key,
                },
            );
        }
        let changes = ledger.take_changes();
        ledger.head.state_root = changes.commit(&mut ledger.tree);
        ledger
    }

    /// No tenants, no anything, at `head`.
    fn empty(chain_id: u64, operator: PublicKey, window_cap: u64, head: BlockHeader) -> Ledger {
        Ledger {
            chain_id,
            window_counts: StateMap::default(),
            window_cap,
            operator,
            applying: head.height,
            head,
            tenants: BTreeMap::new(),
            studio_keys: StateMap::default(),
            accounts: PrefetchMap::default(),
            currencies: Vec::new(),
            currency_slots: Slots::default(),
            classes: Vec::new(),
            class_slots: Slots::default(),
            balances: PrefetchMap::default(),
            dirty_balances: Vec::new(),
            items: StateMap::default(),
            inventory: BTreeSet::new(),
            events: PrefetchMap::default(),
            windows: BTreeMap::new(),
            tree: MerkleTree::new(),
            dirty: StateSet::default(),
        }
    }

    pub fn chain_id(&self) -> u64 {
        self.chain_id
    }

    pub fn height(&self) -> u64 {
        self.head.height
    }

    /// The header of the last block applied (the genesis header at height 0).
    pub fn head(&self) -> &BlockHeader {
        &self.head
    }

    pub fn state_root(&self) -> Hash {
        self.head.state_root
    }

    /// Applies the next block's transactions and returns the block, its header filled in, with
    /// one receipt per transaction. Signatures must have been verified cryptographically before
    /// (consensus does it before ordering); who must sign is checked here.
    pub fn execute(&mut self, timestamp_ms: u64, transactions: Vec<Transaction>) -> (Block, Vec<Receipt>) {
        let applied = self.apply(self.head.height + 1, timestamp_ms, transactions, || ());
        let (block, receipts) = commit(&mut self.tree, &self.head, applied);
        self.head = block.header.clone();
        (block, receipts)
    }

    /// Executes blocks one after the other, with the same blocks and receipts as
    /// [`Ledger::execute`] on each in turn, but each block's commitment (its state root and its
    /// outcomes' root) is computed on the second core while the next block applies: a block's
    /// state root is a function of the state after it, captured when its apply ends, so it does
    /// not wait for the next apply, nor the next apply for it. `each` gets every block with its
    /// receipts, in order, as soon as its commitment is done (the last one when `blocks` ends).
    ///
    /// On an error from `each` the blocks after the one it refused are not executed, except the
    /// one already applied beside that one's commitment: the ledger then stands after that
    /// block, whole (its head, state and state root agree).
    pub fn execute_pipelined<E>(
        &mut self,
        blocks: impl IntoIterator<Item = (u64, Vec<Transaction>)>,
        mut each: impl FnMut(Block, Vec<Receipt>) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        let mut pending: Option<Applied> = None;
        let mut outcome = Ok(());
        for (timestamp_ms, transactions) in blocks {
            let height = pending.as_ref().map_or(self.head.height, |p| p.height) + 1;
            let previous = pending.take();
            // The tree is the commitment's alone while the apply changes the rest.
            let mut tree = std::mem::take(&mut self.tree);
            let parent = &self.head.clone();
            let mut completed = None;
            let applied = self.apply(height, timestamp_ms, transactions, || {
                completed = previous.map(|previous| commit(&mut tree, parent, previous));
            });
            self.tree = tree;
            pending = Some(applied);
            if let Some((block, receipts)) = completed {
                self.head = block.header.clone();
                outcome = each(block, receipts);
                if outcome.is_err() {
                    break;
                }
            }
        }
        if let Some(last) = pending {
            let (block, receipts) = commit(&mut self.tree, &self.head, last);
            self.head = block.header.clone();
            if outcome.is_ok() {
                outcome = each(block, receipts);
            }
        }
        outcome
    }

    /// Applies `transactions` as the block at `height` (the one after the last applied) and
    /// captures what its commitment needs ([`commit`]). `beside` runs on the second core once the
    /// payloads are decoded (after the apply for a small block).
    fn apply(
        &mut self,
        height: u64,
        timestamp_ms: u64,
        transactions: Vec<Transaction>,
        beside: impl FnOnce() + Send,
    ) -> Applied {
        assert_eq!(height, self.applying + 1, "blocks apply in order");
        self.applying = height;
        self.expire_events(height);
        // Past the block limit a transaction is not applied (a faulty proposer's oversized
        // block is refused entry by entry, deterministically, instead of crashing replicas).
        let decode = |index: usize| {
            if index < BLOCK_TRANSACTIONS_MAX {
                transactions[index].decode_payload().ok()
            } else {
                None
            }
        };
        // Each payload is decoded once, by whichever thread needs it first: for a large block
        // the second core decodes ahead of the apply, and the apply decodes itself whatever it
        // reaches first.
        let payloads: Vec<OnceLock<Option<TxPayload>>> =
            transactions.iter().map(|_| OnceLock::new()).collect();
        let payload = |index: usize| payloads[index].get_or_init(|| decode(index)).as_ref();
        // What the prefetches read ahead: only payloads already decoded (a hint needs no more).
        let decoded = |index: usize| {
            payloads
                .get(index)
                .and_then(OnceLock::get)
                .and_then(Option::as_ref)
        };
        let parallel = transactions.len() >= PARALLEL_TRANSACTIONS_MIN
            || transactions.iter().map(|tx| tx.payload.len()).sum::<usize>() >= PARALLEL_BLOCK_BYTES_MIN;
        // Each receipt is published as the apply makes it. The transactions' root and the
        // receipts' leaves (which do not depend on the state) are hashed by whichever core is
        // free first: the second, once done with the payloads (and `beside`), hashing the
        // receipts as they appear, in time it would otherwise spend waiting for the apply; or
        // the apply's, once the apply ends, when `beside` keeps the second core longer.
        let published: Vec<OnceLock<Receipt>> = transactions.iter().map(|_| OnceLock::new()).collect();
        let applied = AtomicBool::new(false);
        let lists_claimed = AtomicBool::new(false);
        // `wait`: whether to wait for receipts not yet published, until the apply ends; what is
        // left is hashed beside the state commitment.
        let hash_lists = |wait: bool| {
            if lists_claimed.swap(true, Ordering::AcqRel) {
                return None;
            }
            let tx_root = list_root(leaves(&transactions, transaction_leaf, transaction_leaf_x2).into_iter());
            let mut receipt_leaves = Vec::with_capacity(transactions.len());
            // Receipt `index` once published; `None` once there is none to wait for.
            let receipt = |index: usize| loop {
                if let Some(receipt) = published[index].get() {
                    return Some(receipt);
                }
                if !wait || (applied.load(Ordering::Acquire) && published[index].get().is_none()) {
                    return None;
                }
                std::thread::yield_now();
            };
            // Two at a time; a receipt whose pair is not hashed here is left with the rest.
            for first in (0..published.len()).step_by(2) {
                let Some(a) = receipt(first) else { break };
                if first + 1 == published.len() {
                    receipt_leaves.push(receipt_leaf(a));
                    break;
                }
                let Some(b) = receipt(first + 1) else { break };
                let (a, b) = receipt_leaf_x2(a, b);
                receipt_leaves.extend([a, b]);
            }
            Some((tx_root, receipt_leaves))
        };
        let ((changed, lists_a), lists_b) = join_if(
            parallel,
            || {
                {
                    // Set when the apply ends, also by unwinding: the receipts' hasher stops then.
                    let _applied = SetOnDrop(&applied);
                    for (index, tx) in transactions.iter().enumerate() {
                        // What the steps below read first, one step further ahead: the decoded
                        // payload's slot (written by the second core) and the transaction
                        // itself (its signers' place).
                        if let Some(slot) = payloads.get(index + 3 * PREFETCH_AHEAD) {
                            prefetch_slice(std::slice::from_ref(slot));
                        }
                        if let Some(ahead) = transactions.get(index + 2 * PREFETCH_AHEAD) {
                            prefetch_slice(std::slice::from_ref(ahead));
                        }
                        // In two steps, as the second reads what the first loaded: the
                        // transaction's asset list, then the state.
                        if let Some(ahead) = decoded(index + 2 * PREFETCH_AHEAD) {
                            prefetch_assets(ahead);
                        }
                        if let Some(ahead) = decoded(index + PREFETCH_AHEAD) {
                            self.prefetch_transaction(ahead);
                        }
                        // Its signers, which step 5 reads: a separate allocation, which
                        // nothing else reads before the apply.
                        if let Some(ahead) = transactions.get(index + PREFETCH_AHEAD) {
                            prefetch_slice(&ahead.signatures);
                        }
                        let receipt = self.apply_transaction(height, tx, payload(index));
                        assert!(
                            published[index].set(receipt).is_ok(),
                            "one receipt per transaction"
                        );
                    }
                }
                let changed = self.take_changes();
                (changed, hash_lists(false))
            },
            |beside_the_apply| {
                if parallel {
                    (0..transactions.len()).for_each(|index| {
                        payload(index);
                    });
                }
                beside();
                // Waiting only on another thread than the apply's: on the same one, this runs
                // after the apply, or inside it (where rayon may run a queued job while the apply
                // waits on one of its own), and waiting for receipts there would never end.
                hash_lists(beside_the_apply)
            },
        );
        let (tx_root, receipt_leaves) = lists_a.or(lists_b).expect("one side hashed the lists");
        let receipts: Vec<Receipt> = published
            .into_iter()
            .map(|slot| slot.into_inner().expect("the apply published every receipt"))
            .collect();
        Applied {
            height,
            timestamp_ms,
            transactions,
            payloads,
            parallel,
            tx_root,
            receipts,
            receipt_leaves,
            changed,
        }
    }

    /// The follower's path: applies a block executed elsewhere, and checks that every root
    /// agrees. On [`LedgerError::Diverged`] this ledger must be thrown away and rebuilt.
    pub fn apply_block(&mut self, block: &Block) -> Result<Vec<Receipt>> {
        let expected = self.head.height + 1;
        if block.header.height != expected {
            return Err(LedgerError::OutOfOrder {
                height: block.header.height,
                expected,
            });
        }
        let (ours, receipts) = self.execute(block.header.timestamp_ms, block.transactions.clone());
        agree(&ours.header, &block.header)?;
        Ok(receipts)
    }

    /// The follower's path for a run of blocks (a replay): [`Ledger::apply_block`] on each in
    /// turn, pipelined as [`Ledger::execute_pipelined`] is. `each` gets every block, its roots
    /// checked, with its receipts, in order. Stops at the first block that is out of order or
    /// disagrees, or that `each` refuses; the ledger then stands after that block or the one
    /// after it, whole (its head, state and state root agree), and after
    /// [`LedgerError::Diverged`] must be thrown away and rebuilt.
    pub fn apply_blocks(
        &mut self,
        blocks: impl IntoIterator<Item = Block>,
        mut each: impl FnMut(Block, Vec<Receipt>) -> Result<()>,
    ) -> Result<()> {
        // The headers of the blocks being executed (at most two: one applying, one committing).
        let headers = std::cell::RefCell::new(std::collections::VecDeque::new());
        let mut out_of_order = None;
        let mut next = self.head.height + 1;
        let inputs = blocks.into_iter().map_while(|block| {
            if block.header.height != next {
                out_of_order = Some(LedgerError::OutOfOrder {
                    height: block.header.height,
                    expected: next,
                });
                return None;
            }
            next += 1;
            let Block { header, transactions } = block;
            let timestamp_ms = header.timestamp_ms;
            headers.borrow_mut().push_back(header);
            Some((timestamp_ms, transactions))
        });
        self.execute_pipelined(inputs, |ours, receipts| {
            let theirs = headers
                .borrow_mut()
                .pop_front()
                .expect("a header for every block executed");
            agree(&ours.header, &theirs)?;
            each(ours, receipts)
        })?;
        out_of_order.map_or(Ok(()), Err)
    }

    // ----- one transaction -----

    /// Starts loading the entries a transaction's application reads first: its event's place
    /// in the deduplication index; for a transfer or a burn the giving account and the balances
    /// it moves; for a mint what its grant reads. A hint: it changes nothing.
    fn prefetch_transaction(&self, payload: &TxPayload) {
        let tenant = payload.tenant;
        prefetch_entry(&self.events, &(tenant, payload.event_id));
        // Each currency's slot looked up once for both accounts.
        let balances = |accounts: &[&PublicKey], assets: &[Asset]| {
            for asset in assets {
                if let Asset::Currency { currency, .. } = asset {
                    if let Some(slot) = self.currency_slots.get(tenant, currency) {
                        for account in accounts {
                            prefetch_entry(&self.balances, &(slot, **account));
                        }
                    }
                }
            }
        };
        match &payload.body {
            TxBody::Transfer { from, to, assets } => {
                prefetch_entry(&self.accounts, &(tenant, *from));
                balances(&[from, to], assets);
            }
            TxBody::Burn { from, assets } => {
                prefetch_entry(&self.accounts, &(tenant, *from));
                balances(&[from], assets);
            }
            TxBody::Mint { to, grant } => self.prefetch_grant(tenant, to, grant),
            _ => {}
        }
    }

    /// Starts loading what a grant to `to` reads: for currency, the balance it credits (which
    /// usually spares the accounts lookup), else the account.
    fn prefetch_grant(&self, tenant: TenantId, to: &PublicKey, grant: &Grant) {
        match grant {
            Grant::Currency { currency, .. } => {
                if let Some(slot) = self.currency_slots.get(tenant, currency) {
                    prefetch_entry(&self.balances, &(slot, *to));
                }
            }
            _ => prefetch_entry(&self.accounts, &(tenant, *to)),
        }
    }

    fn apply_transaction(&mut self, height: u64, tx: &Transaction, payload: Option<&TxPayload>) -> Receipt {
        let Some(payload) = payload else {
            return Receipt {
                tenant: TenantId(0),
                event_id: EventId([0; 16]),
                height,
                outcome: Outcome::rejected(Rejection::Malformed),
                duplicate: false,
            };
        };
        let receipt = |outcome: Outcome, at: u64, duplicate: bool| Receipt {
            tenant: payload.tenant,
            event_id: payload.event_id,
            height: at,
            outcome,
            duplicate,
        };
        if payload.chain_id != self.chain_id {
            return receipt(Outcome::rejected(Rejection::WrongChain), height, false);
        }
        if let Some(seen) = self.record(payload.tenant, &payload.event_id) {
            return receipt(seen.outcome.outcome(), seen.height, true);
        }
        if payload.expires_at < height {
            return receipt(Outcome::rejected(Rejection::Expired), height, false);
        }
        if payload.expires_at > height + EXPIRY_HORIZON_BLOCKS_MAX {
            return receipt(Outcome::rejected(Rejection::ExpiryTooFar), height, false);
        }
        let authorized = self.authorize(payload, tx);
        if let Err(reason) = authorized {
            if !self.signed_by_member(payload.tenant, tx) {
                return receipt(Outcome::rejected(reason), height, false);
            }
        }
        if self.window_counts.get(&payload.tenant).copied().unwrap_or(0) >= self.window_cap {
            return receipt(Outcome::rejected(Rejection::WindowFull), height, false);
        }
        let outcome = match authorized.and_then(|()| self.apply_body(payload.tenant, &payload.body)) {
            Ok(outcome) => outcome,
            Err(reason) => Outcome::rejected(reason),
        };
        self.remember_event(
            payload.tenant,
            payload.event_id,
            height,
            payload.expires_at,
            outcome.clone(),
        );
        receipt(outcome, height, false)
    }

    /// Step 5: the tenant exists and the signers are exactly the authorities the body needs.
    fn authorize(&self, payload: &TxPayload, tx: &Transaction) -> Check {
        let tenant = payload.tenant;
        let mut required = Required::default();
        if let TxBody::RegisterTenant { .. } = payload.body {
            required.push(self.operator);
        } else {
            let studio = self
                .tenants
                .get(&tenant)
                .ok_or(Rejection::UnknownTenant)?
                .studio_key;
            match &payload.body {
                TxBody::RegisterTenant { .. } => unreachable!(),
                TxBody::RegisterAccount { .. }
                | TxBody::DefineCurrency { .. }
                | TxBody::DefineItemClass { .. }
                | TxBody::Mint { .. }
                | TxBody::Settle { .. } => required.push(studio),
                TxBody::Transfer { from, .. } | TxBody::Burn { from, .. } => {
                    required.push(self.authority(tenant, studio, from)?)
                }
                TxBody::Split { owner, .. } | TxBody::Merge { owner, .. } => {
                    required.push(self.authority(tenant, studio, owner)?)
                }
                TxBody::Swap { left, right } => {
                    required.push(self.authority(tenant, studio, &left.account)?);
                    let other = self.authority(tenant, studio, &right.account)?;
                    if !required.contains(&other) {
                        required.push(other);
                    }
                }
            }
        }
        let required = required.keys();
        let signers = &tx.signatures;
        let signed = |key: &PublicKey| signers.iter().any(|entry| entry.signer == *key);
        let distinct = signers.iter().enumerate().all(|(index, entry)| {
            signers[..index]
                .iter()
                .all(|earlier| earlier.signer != entry.signer)
        });
        let exact = distinct && signers.len() == required.len() && required.iter().all(signed);
        if exact {
            return Ok(());
        }
        let foreign = signers.iter().any(|entry| {
            self.studio_keys
                .get(&entry.signer)
                .is_some_and(|owner| *owner != tenant)
        });
        if foreign {
            return Err(Rejection::WrongTenant);
        }
        if required.iter().all(signed) {
            Err(Rejection::Unauthorized)
        } else {
            Err(Rejection::MissingSignature)
        }
    }

    /// Whether a member of `tenant` signed `tx`: its studio key, or an account registered with
    /// it. A member can claim any of the tenant's event ids anyway (an authorised event that
    /// step 7 rejects is remembered), so its authorisation failures are remembered too, and
    /// final; no one else's are, so that nothing signed outside a tenant writes to its window.
    fn signed_by_member(&self, tenant: TenantId, tx: &Transaction) -> bool {
        let Some(info) = self.tenants.get(&tenant) else {
            return false;
        };
        tx.signatures.iter().any(|entry| {
            entry.signer == info.studio_key || self.accounts.contains_key(&(tenant, entry.signer))
        })
    }

    /// Who signs for `account`: the account itself, or the studio for a custodial account.
    fn authority(&self, tenant: TenantId, studio: PublicKey, account: &PublicKey) -> Check<PublicKey> {
        match self.accounts.get(&(tenant, *account)) {
            Some(Custody::SelfCustody) => Ok(*account),
            Some(Custody::Custodial) => Ok(studio),
            None => Err(Rejection::UnknownAccount),
        }
    }

    /// Step 6. Every branch validates everything before it changes anything.
    fn apply_body(&mut self, tenant: TenantId, body: &TxBody) -> Check<Outcome> {
        match body {
            TxBody::RegisterTenant { name, studio_key } => {
                if self.tenants.contains_key(&tenant) || self.studio_keys.contains_key(studio_key) {
                    return Err(Rejection::TenantExists);
                }
                if name.is_empty() || name.len() > TENANT_NAME_BYTES_MAX || tenant.0 == 0 {
                    return Err(Rejection::Malformed);
                }
                self.insert_tenant(
                    tenant,
                    TenantInfo {
                        name: name.clone(),
                        studio_key: *studio_key,
                    },
                );
            }
            TxBody::RegisterAccount { account, custody } => {
                if self.accounts.contains_key(&(tenant, *account)) {
                    return Err(Rejection::AccountExists);
                }
                if self.studio_keys.contains_key(account) || *account == self.operator {
                    return Err(Rejection::Unauthorized);
                }
                self.accounts.insert((tenant, *account), *custody);
                self.dirty.insert(Dirty::Account(tenant, *account));
            }
            TxBody::DefineCurrency {
                currency,
                decimals,
                max_supply,
            } => {
                if !currency.is_valid() || *decimals > CURRENCY_DECIMALS_MAX {
                    return Err(Rejection::Malformed);
                }
                if max_supply.is_zero() {
                    return Err(Rejection::InvalidAmount);
                }
                if self.currency_slots.get(tenant, currency).is_some() {
                    return Err(Rejection::CurrencyExists);
                }
                let slot = self.currencies.len() as u32;
                self.currencies.push(CurrencyState {
                    tenant,
                    id: currency.clone(),
                    info: CurrencyInfo {
                        decimals: *decimals,
                        max_supply: *max_supply,
                        minted: Amount::ZERO,
                        burned: Amount::ZERO,
                    },
                });
                self.currency_slots.insert(tenant, currency.clone(), slot);
                self.dirty.insert(Dirty::Currency(slot));
            }
            TxBody::DefineItemClass {
                class,
                stackable,
                max_supply,
                metadata_hash,
            } => {
                if !class.is_valid() {
                    return Err(Rejection::Malformed);
                }
                if max_supply.is_zero() {
                    return Err(Rejection::InvalidAmount);
                }
                if self.class_slots.get(tenant, class).is_some() {
                    return Err(Rejection::ClassExists);
                }
                let slot = self.classes.len() as u32;
                self.classes.push((
                    tenant,
                    class.clone(),
                    ClassInfo {
                        stackable: *stackable,
                        max_supply: *max_supply,
                        metadata_hash: *metadata_hash,
                        minted: Amount::ZERO,
                        burned: Amount::ZERO,
                    },
                ));
                self.class_slots.insert(tenant, class.clone(), slot);
                self.dirty.insert(Dirty::Class(tenant, slot));
            }
            TxBody::Mint { to, grant } => {
                self.apply_grant(tenant, to, grant)?;
            }
            TxBody::Settle { entries } => return self.apply_settlement(tenant, entries),
            TxBody::Transfer { from, to, assets } => {
                if from == to {
                    return Err(Rejection::SelfTransfer);
                }
                match assets.as_slice() {
                    [Asset::Currency { currency, amount }] => {
                        self.transfer_currency(tenant, from, to, currency, *amount)?
                    }
                    assets => self.transfer_assets(tenant, from, to, assets)?,
                }
            }
            TxBody::Burn { from, assets } => {
                self.check_gives(tenant, from, assets, false)?;
                self.burn_assets(tenant, from, assets);
            }
            TxBody::Split {
                owner,
                item,
                quantity,
                new_item,
            } => {
                let (class, held) = self.owned_stack(tenant, owner, *item)?;
                if quantity.is_zero() {
                    return Err(Rejection::InvalidAmount);
                }
                if *quantity >= held {
                    return Err(Rejection::InsufficientQuantity);
                }
                if self.items.contains_key(&(tenant, *new_item)) {
                    return Err(Rejection::ItemExists);
                }
                let rest = held.checked_sub(*quantity).expect("checked above");
                self.set_stack_quantity(tenant, *item, rest);
                self.put_item(
                    tenant,
                    *new_item,
                    Item {
                        class,
                        owner: *owner,
                        kind: ItemKind::Stack { quantity: *quantity },
                    },
                );
            }
            TxBody::Merge { owner, into, from } => {
                if into == from {
                    return Err(Rejection::InvalidAmount);
                }
                let (into_class, into_quantity) = self.owned_stack(tenant, owner, *into)?;
                let (from_class, from_quantity) = self.owned_stack(tenant, owner, *from)?;
                if into_class != from_class {
                    return Err(Rejection::ClassMismatch);
                }
                // Both stacks count towards the class supply, which fits in u128.
                let total = into_quantity
                    .checked_add(from_quantity)
                    .expect("bounded by supply");
                self.remove_item(tenant, *from);
                self.set_stack_quantity(tenant, *into, total);
            }
            TxBody::Swap { left, right } => self.apply_swap(tenant, left, right)?,
        }
        Ok(Outcome::Applied)
    }

    /// A transfer's checks and changes (after the sender and receiver were found distinct).
    fn transfer_assets(
        &mut self,
        tenant: TenantId,
        from: &PublicKey,
        to: &PublicKey,
        assets: &[Asset],
    ) -> Check {
        let known = assets.iter().any(|asset| match asset {
            Asset::Currency { currency, .. } => self.holds_currency(tenant, currency, to),
            Asset::Item { .. } => false,
        });
        if !known {
            self.require_account(tenant, to)?;
        }
        self.check_gives(tenant, from, assets, false)?;
        self.move_assets(tenant, from, to, assets);
        Ok(())
    }

    /// [`Ledger::transfer_assets`] for the commonest transfer, of one currency: the same checks
    /// in the same order, with the same verdicts and changes, but the currency's slot looked up
    /// once instead of three times and, when both accounts hold the currency, both balances in
    /// one call (a transfer's apply is mostly hash lookups). `transfer_currency_is_transfer_assets`
    /// checks the two agree.
    fn transfer_currency(
        &mut self,
        tenant: TenantId,
        from: &PublicKey,
        to: &PublicKey,
        currency: &CurrencyId,
        amount: Amount,
    ) -> Check {
        let slot = self.currency_slots.get(tenant, currency);
        let height = self.applying;
        // The commonest case first: both accounts hold the currency and the giver enough of it.
        // Then every check below passes (an account holding a balance is registered), and both
        // balances are found in one call instead of three lookups.
        if let Some(slot) = slot {
            if let Some([giver, taker]) = self.balances.get_many_mut([&(slot, *from), &(slot, *to)]) {
                if !amount.is_zero() && giver.amount >= amount {
                    giver.amount = giver.amount.checked_sub(amount).expect("checked above");
                    giver.mark_dirty(height, (slot, *from), &mut self.dirty_balances);
                    taker.amount = taker
                        .amount
                        .checked_add(amount)
                        .expect("balances are bounded by max_supply");
                    taker.mark_dirty(height, (slot, *to), &mut self.dirty_balances);
                    return Ok(());
                }
            }
        }
        // An account holding a balance is registered ([`Ledger::holds_currency`]).
        if !slot.is_some_and(|slot| self.balances.contains_key(&(slot, *to))) {
            self.require_account(tenant, to)?;
        }
        let Some(slot) = slot else {
            self.require_account(tenant, from)?;
            return Err(Rejection::UnknownCurrency);
        };
        let giver = self
            .balances
            .get_mut(&(slot, *from))
            .filter(|balance| !amount.is_zero() && balance.amount >= amount);
        let Some(giver) = giver else {
            // In `check_gives`'s order: the giver's account, then the amount.
            self.require_account(tenant, from)?;
            return Err(if amount.is_zero() {
                Rejection::InvalidAmount
            } else {
                Rejection::InsufficientFunds
            });
        };
        giver.amount = giver.amount.checked_sub(amount).expect("checked above");
        giver.mark_dirty(height, (slot, *from), &mut self.dirty_balances);
        self.credit(slot, to, amount);
        Ok(())
    }

    fn apply_settlement(&mut self, tenant: TenantId, entries: &[Settlement]) -> Check<Outcome> {
        if entries.is_empty() || entries.len() > SETTLEMENT_ENTRIES_MAX {
            return Err(Rejection::Malformed);
        }
        let results = entries
            .iter()
            .enumerate()
            .map(|(index, entry)| {
                if let Some(ahead) = entries.get(index + PREFETCH_AHEAD) {
                    self.prefetch_grant(tenant, &ahead.to, &ahead.grant);
                }
                self.apply_grant(tenant, &entry.to, &entry.grant).err()
            })
            .collect();
        Ok(Outcome::Settled { entries: results })
    }

    fn apply_swap(&mut self, tenant: TenantId, left: &SwapSide, right: &SwapSide) -> Check {
        if left.account == right.account {
            return Err(Rejection::SelfTransfer);
        }
        if left.gives.is_empty() && right.gives.is_empty() {
            return Err(Rejection::Malformed);
        }
        // Both sides are checked against the state before either moves: all or nothing.
        self.check_gives(tenant, &left.account, &left.gives, true)?;
        self.check_gives(tenant, &right.account, &right.gives, true)?;
        self.move_assets(tenant, &left.account, &right.account, &left.gives);
        self.move_assets(tenant, &right.account, &left.account, &right.gives);
        Ok(())
    }

    fn apply_grant(&mut self, tenant: TenantId, to: &PublicKey, grant: &Grant) -> Check {
        let known = match grant {
            Grant::Currency { currency, .. } => self.holds_currency(tenant, currency, to),
            _ => false,
        };
        if !known {
            self.require_account(tenant, to)?;
        }
        match grant {
            Grant::Currency { currency, amount } => {
                let slot = self.currency_slot(tenant, currency)?;
                if amount.is_zero() {
                    return Err(Rejection::InvalidAmount);
                }
                let info = &mut self.currencies[slot as usize].info;
                let minted = info
                    .minted
                    .checked_add(*amount)
                    .ok_or(Rejection::SupplyExceeded)?;
                if minted > info.max_supply {
                    return Err(Rejection::SupplyExceeded);
                }
                info.minted = minted;
                self.dirty.insert(Dirty::Currency(slot));
                self.credit(slot, to, *amount);
            }
            Grant::Unique {
                class,
                item,
                attributes_hash,
            } => {
                let slot = self.class_slot(tenant, class)?;
                if self.classes[slot as usize].2.stackable {
                    return Err(Rejection::NotStackable);
                }
                if self.items.contains_key(&(tenant, *item)) {
                    return Err(Rejection::ItemExists);
                }
                self.add_class_minted(tenant, slot, Amount(1))?;
                self.put_item(
                    tenant,
                    *item,
                    Item {
                        class: class.clone(),
                        owner: *to,
                        kind: ItemKind::Unique {
                            attributes_hash: *attributes_hash,
                        },
                    },
                );
            }
            Grant::Stack {
                class,
                item,
                quantity,
            } => {
                let slot = self.class_slot(tenant, class)?;
                if !self.classes[slot as usize].2.stackable {
                    return Err(Rejection::NotStackable);
                }
                if quantity.is_zero() {
                    return Err(Rejection::InvalidAmount);
                }
                if self.items.contains_key(&(tenant, *item)) {
                    return Err(Rejection::ItemExists);
                }
                self.add_class_minted(tenant, slot, *quantity)?;
                self.put_item(
                    tenant,
                    *item,
                    Item {
                        class: class.clone(),
                        owner: *to,
                        kind: ItemKind::Stack { quantity: *quantity },
                    },
                );
            }
        }
        Ok(())
    }

    /// Checks that `from` exists and can give every asset in `assets` (each at most once).
    fn check_gives(&self, tenant: TenantId, from: &PublicKey, assets: &[Asset], allow_empty: bool) -> Check {
        self.require_account(tenant, from)?;
        if (assets.is_empty() && !allow_empty) || assets.len() > ASSETS_PER_SIDE_MAX {
            return Err(Rejection::Malformed);
        }
        for (index, asset) in assets.iter().enumerate() {
            if assets[..index].iter().any(|earlier| same_asset(earlier, asset)) {
                return Err(Rejection::InvalidAmount);
            }
            match asset {
                Asset::Currency { currency, amount } => {
                    let slot = self.currency_slot(tenant, currency)?;
                    if amount.is_zero() {
                        return Err(Rejection::InvalidAmount);
                    }
                    if self.balance_of(slot, from) < *amount {
                        return Err(Rejection::InsufficientFunds);
                    }
                }
                Asset::Item { item } => {
                    let held = self.items.get(&(tenant, *item)).ok_or(Rejection::UnknownItem)?;
                    if held.owner != *from {
                        return Err(Rejection::NotOwner);
                    }
                }
            }
        }
        Ok(())
    }

    fn move_assets(&mut self, tenant: TenantId, from: &PublicKey, to: &PublicKey, assets: &[Asset]) {
        for asset in assets {
            match asset {
                Asset::Currency { currency, amount } => {
                    let slot = self
                        .currency_slots
                        .get(tenant, currency)
                        .expect("checked currency");
                    self.debit(slot, from, *amount);
                    self.credit(slot, to, *amount);
                }
                Asset::Item { item } => {
                    let mut moved = self.items[&(tenant, *item)].clone();
                    assert_eq!(moved.owner, *from, "checked by check_gives");
                    moved.owner = *to;
                    self.put_item(tenant, *item, moved);
                }
            }
        }
    }

    fn burn_assets(&mut self, tenant: TenantId, from: &PublicKey, assets: &[Asset]) {
        for asset in assets {
            match asset {
                Asset::Currency { currency, amount } => {
                    let slot = self
                        .currency_slots
                        .get(tenant, currency)
                        .expect("checked currency");
                    self.debit(slot, from, *amount);
                    let info = &mut self.currencies[slot as usize].info;
                    info.burned = info.burned.checked_add(*amount).expect("burned <= minted");
                    self.dirty.insert(Dirty::Currency(slot));
                }
                Asset::Item { item } => {
                    let gone = self.remove_item(tenant, *item);
                    let slot = self
                        .class_slots
                        .get(tenant, &gone.class)
                        .expect("items have classes");
                    let info = &mut self.classes[slot as usize].2;
                    info.burned = info.burned.checked_add(gone.units()).expect("burned <= minted");
                    self.dirty.insert(Dirty::Class(tenant, slot));
                }
            }
        }
    }

    // ----- primitive state changes: each marks what it touched as dirty -----

    fn insert_tenant(&mut self, tenant: TenantId, info: TenantInfo) {
        self.studio_keys.insert(info.studio_key, tenant);
        self.tenants.insert(tenant, info);
        self.dirty.insert(Dirty::Tenant(tenant));
    }

    fn credit(&mut self, slot: u32, account: &PublicKey, amount: Amount) {
        let height = self.applying;
        let currency = &self.currencies[slot as usize];
        let balance = self.balances.entry((slot, *account)).or_insert_with(|| Balance {
            amount: Amount::ZERO,
            key_hash: KeyRef::Balance(currency.tenant, &currency.id.0, account).hash(),
            dirty_at: 0,
            dirty_index: 0,
        });
        balance.amount = balance
            .amount
            .checked_add(amount)
            .expect("balances are bounded by max_supply");
        balance.mark_dirty(height, (slot, *account), &mut self.dirty_balances);
    }

    /// Leaves a balance that reaches zero in place until the block's commitment.
    fn debit(&mut self, slot: u32, account: &PublicKey, amount: Amount) {
        let height = self.applying;
        let balance = self
            .balances
            .get_mut(&(slot, *account))
            .expect("debit of a checked balance");
        balance.amount = balance
            .amount
            .checked_sub(amount)
            .expect("debit of a checked balance");
        balance.mark_dirty(height, (slot, *account), &mut self.dirty_balances);
    }

    fn add_class_minted(&mut self, tenant: TenantId, slot: u32, units: Amount) -> Check {
        let info = &mut self.classes[slot as usize].2;
        let minted = info.minted.checked_add(units).ok_or(Rejection::SupplyExceeded)?;
        if minted > info.max_supply {
            return Err(Rejection::SupplyExceeded);
        }
        info.minted = minted;
        self.dirty.insert(Dirty::Class(tenant, slot));
        Ok(())
    }

    fn put_item(&mut self, tenant: TenantId, id: ItemId, item: Item) {
        if let Some(previous) = self.items.get(&(tenant, id)) {
            self.inventory.remove(&(tenant, previous.owner, id));
        }
        self.inventory.insert((tenant, item.owner, id));
        self.items.insert((tenant, id), item);
        self.dirty.insert(Dirty::Item(tenant, id));
    }

    fn remove_item(&mut self, tenant: TenantId, id: ItemId) -> Item {
        let item = self
            .items
            .remove(&(tenant, id))
            .expect("removal of a checked item");
        self.inventory.remove(&(tenant, item.owner, id));
        self.dirty.insert(Dirty::Item(tenant, id));
        item
    }

    fn set_stack_quantity(&mut self, tenant: TenantId, id: ItemId, quantity: Amount) {
        let item = self.items.get_mut(&(tenant, id)).expect("checked stack");
        item.kind = ItemKind::Stack { quantity };
        self.dirty.insert(Dirty::Item(tenant, id));
    }

    fn remember_event(
        &mut self,
        tenant: TenantId,
        event: EventId,
        height: u64,
        expires_at: u64,
        outcome: Outcome,
    ) {
        let window = self
            .windows
            .entry((expires_at, tenant))
            .or_insert_with(|| Window::new(tenant, expires_at));
        let index = window.push(event, height, outcome);
        if window.dirty_at < height {
            window.dirty_at = height;
            self.dirty.insert(Dirty::Window(tenant, expires_at));
        }
        *self.window_counts.entry(tenant).or_default() += 1;
        self.events.insert((tenant, event), (expires_at, index));
    }

    /// Forgets events whose expiry height is below `height`: they can no longer be submitted
    /// (step 4 rejects them), so remembering them is no longer needed. Their windows leave the
    /// state whole.
    fn expire_events(&mut self, height: u64) {
        while let Some(entry) = self.windows.first_entry() {
            let (expires_at, tenant) = *entry.key();
            if expires_at >= height {
                break;
            }
            let records = entry.remove().records;
            let count = self
                .window_counts
                .get_mut(&tenant)
                .expect("a tenant with windows");
            *count -= records.len() as u64;
            if *count == 0 {
                self.window_counts.remove(&tenant);
            }
            for record in records.iter() {
                self.events.remove(&(tenant, record.event));
            }
            self.dirty.insert(Dirty::Window(tenant, expires_at));
        }
    }

    // ----- lookups -----

    fn require_account(&self, tenant: TenantId, account: &PublicKey) -> Check {
        if self.accounts.contains_key(&(tenant, *account)) {
            Ok(())
        } else {
            Err(Rejection::UnknownAccount)
        }
    }

    /// Whether `account` holds a balance of `tenant`'s `currency`. Then it is a registered
    /// account of `tenant` (balances are only credited to registered accounts and accounts are
    /// never removed; [`Ledger::check_invariants`] checks it), so the accounts lookup, a cache
    /// miss per settlement entry or transfer, can be skipped; and the balance is in cache for
    /// the credit that follows. A `false` says nothing: the caller then looks the account up.
    fn holds_currency(&self, tenant: TenantId, currency: &CurrencyId, account: &PublicKey) -> bool {
        self.currency_slots
            .get(tenant, currency)
            .is_some_and(|slot| self.balances.contains_key(&(slot, *account)))
    }

    fn currency_slot(&self, tenant: TenantId, currency: &CurrencyId) -> Check<u32> {
        self.currency_slots
            .get(tenant, currency)
            .ok_or(Rejection::UnknownCurrency)
    }

    fn class_slot(&self, tenant: TenantId, class: &ClassId) -> Check<u32> {
        self.class_slots.get(tenant, class).ok_or(Rejection::UnknownClass)
    }

    fn balance_of(&self, slot: u32, account: &PublicKey) -> Amount {
        self.balances
            .get(&(slot, *account))
            .map(|b| b.amount)
            .unwrap_or_default()
    }

    fn owned_stack(&self, tenant: TenantId, owner: &PublicKey, id: ItemId) -> Check<(ClassId, Amount)> {
        let item = self.items.get(&(tenant, id)).ok_or(Rejection::UnknownItem)?;
        if item.owner != *owner {
            return Err(Rejection::NotOwner);
        }
        match item.kind {
            ItemKind::Stack { quantity } => Ok((item.class.clone(), quantity)),
            ItemKind::Unique { .. } => Err(Rejection::NotStackable),
        }
    }

    // ----- the commitment -----

    fn key_ref<'a>(&'a self, dirty: &'a Dirty) -> KeyRef<'a> {
        match dirty {
            Dirty::Tenant(t) => KeyRef::Tenant(*t),
            Dirty::Account(t, a) => KeyRef::Account(*t, a),
            Dirty::Currency(slot) => {
                let c = &self.currencies[*slot as usize];
                KeyRef::Currency(c.tenant, &c.id.0)
            }
            Dirty::Class(t, slot) => KeyRef::Class(*t, &self.classes[*slot as usize].1 .0),
            Dirty::Balance(slot, a) => {
                let c = &self.currencies[*slot as usize];
                KeyRef::Balance(c.tenant, &c.id.0, a)
            }
            Dirty::Item(t, i) => KeyRef::Item(*t, *i),
            Dirty::Window(t, e) => KeyRef::Window(*t, *e),
        }
    }

    /// An entry's key hash and leaf hash (`None` when absent), without intermediate buffers
    /// for the frequent kinds.
    fn leaf(&self, dirty: &Dirty) -> (Hash, Option<Hash>) {
        if let Dirty::Balance(slot, a) = dirty {
            if let Some(balance) = self.balances.get(&(*slot, *a)) {
                let leaf = (!balance.amount.is_zero())
                    .then(|| leaf_hash(&balance.key_hash, &balance.amount.0.to_be_bytes()));
                return (balance.key_hash, leaf);
            }
        }
        let key = self.key_ref(dirty).hash();
        let leaf = match dirty {
            Dirty::Balance(..) => None,
            Dirty::Window(t, e) => self
                .windows
                .get(&(*e, *t))
                .map(|w| leaf_hash(&key, &w.digest().0)),
            _ => self.value_bytes(dirty).map(|value| leaf_hash(&key, &value)),
        };
        (key, leaf)
    }

    /// The committed value of an entry, in the byte form its leaf hashes; `None` when absent.
    fn value_bytes(&self, dirty: &Dirty) -> Option<Vec<u8>> {
        let encode = |value: &dyn erased::Encode| Some(value.encode());
        match dirty {
            Dirty::Tenant(t) => self.tenants.get(t).and_then(|v| encode(v)),
            Dirty::Account(t, a) => self.accounts.get(&(*t, *a)).and_then(|v| encode(v)),
            Dirty::Currency(slot) => encode(&self.currencies[*slot as usize].info),
            Dirty::Class(_, slot) => encode(&self.classes[*slot as usize].2),
            Dirty::Balance(slot, a) => self
                .balances
                .get(&(*slot, *a))
                .filter(|b| !b.amount.is_zero())
                .map(|b| b.amount.0.to_be_bytes().to_vec()),
            Dirty::Item(t, i) => self.items.get(&(*t, *i)).and_then(|v| encode(v)),
            Dirty::Window(t, e) => self.windows.get(&(*e, *t)).map(|w| w.digest().0.to_vec()),
        }
    }

    /// What the block just applied changed, for its commitment: the leaves of the entries other
    /// than balances, hashed now (they are read from the state, which the next block changes),
    /// and the balances with their amounts after the block (recorded as they changed, so not
    /// read again). Balances that reached zero leave the state here, with the block.
    fn take_changes(&mut self) -> Changes {
        let dirty: Vec<Dirty> = self.dirty.drain().collect();
        let this = &*self;
        let leaf = |d: &Dirty| this.leaf(d);
        let mut leaves: Vec<(Hash, Option<Hash>)> = if dirty.len() >= PARALLEL_TRANSACTIONS_MIN {
            dirty.par_iter().map(leaf).collect()
        } else {
            dirty.iter().map(leaf).collect()
        };
        let balances = std::mem::take(&mut self.dirty_balances);
        balance_leaves(&mut leaves, &balances);
        for balance in &balances {
            if balance.amount.is_zero() {
                self.balances.remove(&balance.key);
            }
        }
        self.dirty_balances = balances;
        self.dirty_balances.clear();
        Changes { leaves }
    }

    // ----- reads (committed state only: between blocks nothing is uncommitted) -----

    pub fn tenant(&self, tenant: TenantId) -> Option<&TenantInfo> {
        self.tenants.get(&tenant)
    }

    /// The tenant whose studio key this is, if any.
    pub fn tenant_of_studio(&self, key: &PublicKey) -> Option<TenantId> {
        self.studio_keys.get(key).copied()
    }

    pub fn account(&self, tenant: TenantId, account: &PublicKey) -> Option<Custody> {
        self.accounts.get(&(tenant, *account)).copied()
    }

    pub fn currency(&self, tenant: TenantId, currency: &CurrencyId) -> Option<&CurrencyInfo> {
        let slot = self.currency_slot(tenant, currency).ok()?;
        Some(&self.currencies[slot as usize].info)
    }

    /// The tenant's currencies, in definition order.
    pub fn currencies(&self, tenant: TenantId) -> Vec<(CurrencyId, CurrencyInfo)> {
        self.currencies
            .iter()
            .filter(|c| c.tenant == tenant)
            .map(|c| (c.id.clone(), c.info.clone()))
            .collect()
    }

    pub fn class(&self, tenant: TenantId, class: &ClassId) -> Option<&ClassInfo> {
        let slot = self.class_slot(tenant, class).ok()?;
        Some(&self.classes[slot as usize].2)
    }

    /// The tenant's item classes, in definition order.
    pub fn classes(&self, tenant: TenantId) -> Vec<(ClassId, ClassInfo)> {
        self.classes
            .iter()
            .filter(|c| c.0 == tenant)
            .map(|c| (c.1.clone(), c.2.clone()))
            .collect()
    }

    pub fn balance(&self, tenant: TenantId, currency: &CurrencyId, account: &PublicKey) -> Amount {
        self.currency_slot(tenant, currency)
            .map(|slot| self.balance_of(slot, account))
            .unwrap_or_default()
    }

    /// Every non-zero balance of `account`, in currency definition order.
    pub fn balances(&self, tenant: TenantId, account: &PublicKey) -> Vec<(CurrencyId, Amount)> {
        self.currencies
            .iter()
            .enumerate()
            .filter(|(_, c)| c.tenant == tenant)
            .filter_map(|(slot, c)| {
                let amount = self.balance_of(slot as u32, account);
                (!amount.is_zero()).then(|| (c.id.clone(), amount))
            })
            .collect()
    }

    /// The items `account` owns, by id.
    pub fn inventory(&self, tenant: TenantId, account: &PublicKey) -> Vec<(ItemId, Item)> {
        let low = (tenant, *account, ItemId(0));
        let high = (tenant, *account, ItemId(u64::MAX));
        self.inventory
            .range(low..=high)
            .map(|(_, _, id)| (*id, self.items[&(tenant, *id)].clone()))
            .collect()
    }

    pub fn item(&self, tenant: TenantId, item: ItemId) -> Option<&Item> {
        self.items.get(&(tenant, item))
    }

    /// The height and outcome of an event, while it is inside the deduplication window.
    pub fn event(&self, tenant: TenantId, event: &EventId) -> Option<(u64, Outcome)> {
        self.record(tenant, event)
            .map(|record| (record.height, record.outcome.outcome()))
    }

    fn record(&self, tenant: TenantId, event: &EventId) -> Option<&WindowRecord> {
        let (expires_at, index) = *self.events.get(&(tenant, *event))?;
        let window = self
            .windows
            .get(&(expires_at, tenant))
            .expect("an event's window exists");
        Some(
            window
                .records
                .get(index as usize)
                .expect("an event's record exists"),
        )
    }

    /// Whether the deduplication window holds this event.
    pub fn has_event(&self, tenant: TenantId, event: &EventId) -> bool {
        self.events.contains_key(&(tenant, *event))
    }

    /// How many entries the state commitment holds (every tenant, account, currency, class,
    /// non-zero balance and item, and one window per tenant and expiry height with events).
    pub fn state_entries(&self) -> u64 {
        self.tree.leaf_count()
    }

    /// How many events the deduplication window holds now.
    pub fn events_remembered(&self) -> usize {
        self.events.len()
    }

    /// A proof of one entry against [`Ledger::state_root`]: the entry's committed value bytes
    /// (`None` when absent) and the Merkle proof. Check with `proof.verify(&root, &key.encode(), value)`.
    pub fn prove(&self, key: &StateKey) -> (Option<Vec<u8>>, Proof) {
        let dirty = self.to_dirty(key);
        let value = dirty.and_then(|d| self.value_bytes(&d));
        (value, self.tree.prove(&key.as_ref().hash()))
    }

    fn to_dirty(&self, key: &StateKey) -> Option<Dirty> {
        Some(match key {
            StateKey::Tenant(t) => Dirty::Tenant(*t),
            StateKey::Account(t, a) => Dirty::Account(*t, *a),
            StateKey::Currency(t, c) => Dirty::Currency(self.currency_slot(*t, c).ok()?),
            StateKey::Class(t, c) => Dirty::Class(*t, self.class_slot(*t, c).ok()?),
            StateKey::Balance(t, c, a) => Dirty::Balance(self.currency_slot(*t, c).ok()?, *a),
            StateKey::Item(t, i) => Dirty::Item(*t, *i),
            StateKey::Window(t, e) => Dirty::Window(*t, *e),
        })
    }

    /// Checks the conservation laws over the whole state (O(state); for tests and the simulator):
    /// for every currency and class, `minted == held + burned`, and `minted <= max_supply`.
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        let mut held = vec![0u128; self.currencies.len()];
        for ((slot, account), balance) in &self.balances {
            let amount = &balance.amount;
            if amount.is_zero() {
                return Err("a zero balance is stored".into());
            }
            // `holds_currency` relies on this.
            let tenant = self.currencies[*slot as usize].tenant;
            if !self.accounts.contains_key(&(tenant, *account)) {
                return Err(format!(
                    "a balance of an account not registered with tenant {tenant:?}"
                ));
            }
            held[*slot as usize] += amount.0;
        }
        for (slot, currency) in self.currencies.iter().enumerate() {
            let info = &currency.info;
            if info.minted.0 != held[slot] + info.burned.0 || info.minted > info.max_supply {
                return Err(format!(
                    "supply of {} broken: {info:?}, held {}",
                    currency.id, held[slot]
                ));
            }
        }
        let mut units = vec![0u128; self.classes.len()];
        for ((tenant, _), item) in &self.items {
            units[self
                .class_slots
                .get(*tenant, &item.class)
                .expect("items have classes") as usize] += item.units().0;
        }
        for (slot, (_, class, info)) in self.classes.iter().enumerate() {
            if info.minted.0 != units[slot] + info.burned.0 || info.minted > info.max_supply {
                return Err(format!(
                    "supply of class {class} broken: {info:?}, held {}",
                    units[slot]
                ));
            }
        }
        if self.inventory.len() != self.items.len() {
            return Err("inventory index out of step with items".into());
        }
        let mut counts: StateMap<TenantId, u64> = StateMap::default();
        for ((_, tenant), window) in &self.windows {
            *counts.entry(*tenant).or_default() += window.records.len() as u64;
        }
        if counts != self.window_counts || counts.values().sum::<u64>() != self.events.len() as u64 {
            return Err("window counts out of step with the windows".into());
        }
        if counts.values().any(|count| *count > self.window_cap) {
            return Err(format!("a tenant's window holds over {} events", self.window_cap));
        }
        Ok(())
    }
}

/// The keys a transaction must be signed by: at most two (a swap's parties), kept inline.
struct Required {
    keys: [PublicKey; 2],
    len: usize,
}

impl Default for Required {
    fn default() -> Self {
        Required {
            keys: [PublicKey([0; 32]); 2],
            len: 0,
        }
    }
}

impl Required {
    fn push(&mut self, key: PublicKey) {
        self.keys[self.len] = key;
        self.len += 1;
    }

    fn contains(&self, key: &PublicKey) -> bool {
        self.keys().contains(key)
    }

    fn keys(&self) -> &[PublicKey] {
        &self.keys[..self.len]
    }
}

/// Slot numbers by tenant and name, looked up without cloning the name.
#[derive(Clone, Debug)]
struct Slots<K>(StateMap<TenantId, StateMap<K, u32>>);

impl<K> Default for Slots<K> {
    fn default() -> Self {
        Slots(StateMap::default())
    }
}

impl<K: std::hash::Hash + Eq> Slots<K> {
    fn get(&self, tenant: TenantId, name: &K) -> Option<u32> {
        self.0.get(&tenant)?.get(name).copied()
    }

    fn insert(&mut self, tenant: TenantId, name: K, slot: u32) {
        self.0.entry(tenant).or_default().insert(name, slot);
    }
}

/// List-root leaves, two at a time (`leaf_x2`; the last alone when they are odd), hashed on
/// every core when there are many.
fn leaves<T: Sync>(items: &[T], leaf: fn(&T) -> Hash, leaf_x2: fn(&T, &T) -> (Hash, Hash)) -> Vec<Hash> {
    let mut out = vec![Hash::ZERO; items.len()];
    let pair = |(out, pair): (&mut [Hash], &[T])| match pair {
        [a, b] => (out[0], out[1]) = leaf_x2(a, b),
        [last] => out[0] = leaf(last),
        _ => unreachable!("chunks of two"),
    };
    if items.len() >= PARALLEL_TRANSACTIONS_MIN {
        out.par_chunks_mut(2)
            .zip(items.par_chunks(2))
            .with_min_len(64)
            .for_each(pair);
    } else {
        out.chunks_mut(2).zip(items.chunks(2)).for_each(pair);
    }
    out
}

fn same_asset(a: &Asset, b: &Asset) -> bool {
    match (a, b) {
        (Asset::Currency { currency: x, .. }, Asset::Currency { currency: y, .. }) => x == y,
        (Asset::Item { item: x }, Asset::Item { item: y }) => x == y,
        _ => false,
    }
}

/// Value encodings for leaves: MessagePack, structs as arrays (deterministic).
mod erased {
    pub trait Encode {
        fn encode(&self) -> Vec<u8>;
    }

    impl<T: serde::Serialize> Encode for T {
        fn encode(&self) -> Vec<u8> {
            rmp_serde::to_vec(self).expect("state values serialise")
        }
    }
}

// ----- snapshots -----

/// The whole state at one height, sorted, so that equal states give equal bytes.
#[derive(Serialize, Deserialize)]
struct Snapshot {
    chain_id: u64,
    operator: PublicKey,
    head: BlockHeader,
    tree_depth: u8,
    tenants: Vec<(TenantId, TenantInfo)>,
    accounts: Vec<(TenantId, PublicKey, Custody)>,
    /// In slot order.
    currencies: Vec<(TenantId, CurrencyId, CurrencyInfo)>,
    /// In slot order.
    classes: Vec<(TenantId, ClassId, ClassInfo)>,
    balances: Vec<(u32, PublicKey, Amount)>,
    items: Vec<(TenantId, ItemId, Item)>,
    /// In window order: by expiry height, then tenant, then the order remembered.
    events: Vec<(TenantId, EventId, EventRecord)>,
    /// The genesis cap on a tenant's window (absent in snapshots older than the cap).
    #[serde(default = "default_window_cap")]
    window_cap: u64,
}

/// The state copied by [`Ledger::snapshot_view`], not yet encoded: everything but the event
/// records, and the windows' records (shared, not copied) in window order.
pub struct SnapshotView(Snapshot, Vec<(TenantId, u64, WindowRecords)>);

impl SnapshotView {
    /// The [`Ledger::snapshot`] bytes: entries sorted by key, events in window order, then
    /// MessagePack.
    pub fn encode(self) -> Vec<u8> {
        let SnapshotView(mut snapshot, windows) = self;
        snapshot.events = windows
            .iter()
            .flat_map(|(tenant, expires_at, records)| {
                records.iter().map(move |record| {
                    (
                        *tenant,
                        record.event,
                        EventRecord {
                            height: record.height,
                            expires_at: *expires_at,
                            outcome: record.outcome.clone(),
                        },
                    )
                })
            })
            .collect();
        let snapshot = &mut snapshot;
        snapshot.accounts.sort_unstable_by_key(|(t, a, _)| (*t, *a));
        snapshot.balances.sort_unstable_by_key(|(s, a, _)| (*s, *a));
        snapshot.items.sort_unstable_by_key(|(t, i, _)| (*t, *i));
        rmp_serde::to_vec(snapshot).expect("snapshot serialises")
    }
}

fn default_window_cap() -> u64 {
    hoard_types::constants::DEDUP_WINDOW_EVENTS_PER_TENANT_MAX
}

impl Ledger {
    /// The whole state, as bytes that [`Ledger::restore`] verifies against the state root.
    pub fn snapshot(&self) -> Vec<u8> {
        self.snapshot_view().encode()
    }

    /// A copy of the whole state, taken between blocks, that [`SnapshotView::encode`] turns
    /// into [`Ledger::snapshot`] bytes later, on any thread. Taking it copies the entries
    /// (unsorted); sorting and encoding, the larger part, are left to `encode`.
    pub fn snapshot_view(&self) -> SnapshotView {
        assert!(
            self.dirty.is_empty() && self.dirty_balances.is_empty(),
            "snapshots are taken between blocks"
        );
        let accounts: Vec<_> = self.accounts.iter().map(|((t, a), c)| (*t, *a, *c)).collect();
        let balances: Vec<_> = self
            .balances
            .iter()
            .map(|((s, a), b)| (*s, *a, b.amount))
            .collect();
        let items: Vec<_> = self
            .items
            .iter()
            .map(|((t, i), item)| (*t, *i, item.clone()))
            .collect();
        // The windows' records are shared, not copied (see [`Window`]).
        let windows: Vec<(TenantId, u64, WindowRecords)> = self
            .windows
            .iter()
            .map(|((expires_at, tenant), window)| (*tenant, *expires_at, window.records.clone()))
            .collect();
        let events = Vec::new();
        SnapshotView(
            Snapshot {
                chain_id: self.chain_id,
                operator: self.operator,
                head: self.head.clone(),
                tree_depth: self.tree.depth(),
                tenants: self.tenants.iter().map(|(t, i)| (*t, i.clone())).collect(),
                accounts,
                currencies: self
                    .currencies
                    .iter()
                    .map(|c| (c.tenant, c.id.clone(), c.info.clone()))
                    .collect(),
                classes: self.classes.clone(),
                balances,
                items,
                events,
                window_cap: self.window_cap,
            },
            windows,
        )
    }

    /// Rebuilds a ledger from [`Ledger::snapshot`] bytes and checks them: the recomputed state
    /// root must equal the one in the snapshot's head, and the head's hash must be `expected`
    /// when given (state transfer passes the hash a quorum certified).
    pub fn restore(bytes: &[u8], expected_head: Option<Hash>) -> Result<Ledger> {
        let snapshot: Snapshot =
            rmp_serde::from_slice(bytes).map_err(|e| LedgerError::Snapshot(e.to_string()))?;
        if let Some(expected) = expected_head {
            if snapshot.head.hash() != expected {
                return Err(LedgerError::Snapshot(
                    "head hash does not match the certified one".into(),
                ));
            }
        }
        if !(crate::merkle::DEPTH_MIN..=crate::merkle::DEPTH_MAX).contains(&snapshot.tree_depth) {
            return Err(LedgerError::Snapshot("tree depth out of range".into()));
        }
        let mut ledger = Ledger::empty(
            snapshot.chain_id,
            snapshot.operator,
            snapshot.window_cap,
            snapshot.head,
        );
        let mut dirty = Vec::new();
        for (tenant, info) in snapshot.tenants {
            ledger.studio_keys.insert(info.studio_key, tenant);
            ledger.tenants.insert(tenant, info);
            dirty.push(Dirty::Tenant(tenant));
        }
        for (tenant, account, custody) in snapshot.accounts {
            ledger.accounts.insert((tenant, account), custody);
            dirty.push(Dirty::Account(tenant, account));
        }
        for (tenant, id, info) in snapshot.currencies {
            let slot = ledger.currencies.len() as u32;
            ledger.currency_slots.insert(tenant, id.clone(), slot);
            ledger.currencies.push(CurrencyState { tenant, id, info });
            dirty.push(Dirty::Currency(slot));
        }
        for (tenant, id, info) in snapshot.classes {
            let slot = ledger.classes.len() as u32;
            ledger.class_slots.insert(tenant, id.clone(), slot);
            ledger.classes.push((tenant, id, info));
            dirty.push(Dirty::Class(tenant, slot));
        }
        if snapshot
            .balances
            .iter()
            .any(|(slot, _, amount)| *slot as usize >= ledger.currencies.len() || amount.is_zero())
        {
            return Err(LedgerError::Snapshot(
                "balance of an unknown currency, or zero".into(),
            ));
        }
        let currencies = &ledger.currencies;
        let balances: Vec<_> = snapshot
            .balances
            .into_par_iter()
            .map(|(slot, account, amount)| {
                let currency = &currencies[slot as usize];
                let key_hash = KeyRef::Balance(currency.tenant, &currency.id.0, &account).hash();
                (slot, account, amount, key_hash)
            })
            .collect();
        for (slot, account, amount, key_hash) in balances {
            let balance = Balance {
                amount,
                key_hash,
                dirty_at: 0,
                dirty_index: 0,
            };
            ledger.balances.insert((slot, account), balance);
            dirty.push(Dirty::Balance(slot, account));
        }
        for (tenant, id, item) in snapshot.items {
            if ledger.class_slots.get(tenant, &item.class).is_none() {
                return Err(LedgerError::Snapshot("item of an unknown class".into()));
            }
            ledger.inventory.insert((tenant, item.owner, id));
            ledger.items.insert((tenant, id), item);
            dirty.push(Dirty::Item(tenant, id));
        }
        for (tenant, event, record) in snapshot.events {
            let window = (record.expires_at, tenant);
            if ledger
                .windows
                .last_key_value()
                .is_some_and(|(last, _)| *last > window)
            {
                return Err(LedgerError::Snapshot("events out of window order".into()));
            }
            if !ledger.windows.contains_key(&window) {
                dirty.push(Dirty::Window(tenant, record.expires_at));
            }
            let index = ledger
                .windows
                .entry(window)
                .or_insert_with(|| Window::new(tenant, record.expires_at))
                .push(event, record.height, record.outcome.outcome());
            *ledger.window_counts.entry(tenant).or_default() += 1;
            if ledger
                .events
                .insert((tenant, event), (record.expires_at, index))
                .is_some()
            {
                return Err(LedgerError::Snapshot("an event is remembered twice".into()));
            }
        }
        let this = &ledger;
        let mut leaves: Vec<(Hash, Hash)> = dirty
            .par_iter()
            .map(|d| {
                let (key, leaf) = this.leaf(d);
                (key, leaf.expect("restored entries exist"))
            })
            .collect();
        leaves.par_sort_unstable_by_key(|(key, _)| *key);
        ledger.tree = MerkleTree::from_leaves(snapshot.tree_depth, leaves);
        let root = ledger.tree.root();
        if root != ledger.head.state_root {
            return Err(LedgerError::Snapshot(format!(
                "recomputed state root {root} differs from the head's {}",
                ledger.head.state_root
            )));
        }
        ledger.check_invariants().map_err(LedgerError::Snapshot)?;
        Ok(ledger)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::testing::{key, World};
    use hoard_types::Keypair;

    const T: TenantId = TenantId(1);
    const OTHER: TenantId = TenantId(2);

    /// Tenant 1 with GOLD and GEM and accounts 0-3 (1 custodial, 3 never registered), tenant 2
    /// with its own GOLD and account 4; `held[i]` GOLD and GEM minted to account `i` (0-2), then
    /// `spent[i]` GOLD moved from account `i` to account 2 in a later block, so that some
    /// balances are gone to zero. The ledger is then inside the next block.
    fn ledger(held: [(u128, u128); 3], spent: [u128; 2]) -> (Ledger, Vec<PublicKey>) {
        let mut world = World::new(2);
        let players: Vec<Keypair> = (0..5).map(|i| key("player", i)).collect();
        let keys: Vec<PublicKey> = players.iter().map(Keypair::public).collect();
        let mut setup = vec![
            world.define_currency(T, "GOLD", u128::MAX),
            world.define_currency(T, "GEM", u128::MAX),
            world.define_currency(OTHER, "GOLD", u128::MAX),
            world.register(OTHER, &keys[4], Custody::SelfCustody),
            world.mint_currency(OTHER, &keys[4], "GOLD", 9),
        ];
        for (i, &(gold, gem)) in held.iter().enumerate() {
            let custody = if i == 1 {
                Custody::Custodial
            } else {
                Custody::SelfCustody
            };
            setup.push(world.register(T, &keys[i], custody));
            for (symbol, amount) in [("GOLD", gold), ("GEM", gem)] {
                if amount > 0 {
                    setup.push(world.mint_currency(T, &keys[i], symbol, amount));
                }
            }
        }
        let mut ledger = Ledger::new(&world.genesis());
        let (_, receipts) = ledger.execute(0, setup);
        assert!(receipts.iter().all(|r| r.outcome.is_applied()));
        let spends: Vec<Transaction> = (0..2)
            .filter(|&i| spent[i] > 0)
            .map(|i| {
                let signer = if i == 1 { world.studio(T) } else { &players[i] };
                let signer = signer.clone();
                world.transfer(T, &signer, &keys[i], &keys[2], "GOLD", spent[i])
            })
            .collect();
        ledger.execute(0, spends);
        ledger.applying += 1;
        (ledger, keys)
    }

    /// A transfer's verdict, every balance after it, and the changes the commitment takes.
    type After = (Check, Vec<((u32, PublicKey), u128)>, Vec<(Hash, Option<Hash>)>);

    /// What a transfer left.
    fn after(mut ledger: Ledger, verdict: Check) -> After {
        let mut balances: Vec<_> = ledger.balances.iter().map(|(k, b)| (*k, b.amount.0)).collect();
        balances.sort();
        let mut leaves = ledger.take_changes().leaves;
        leaves.sort();
        (verdict, balances, leaves)
    }

    #[test]
    fn event_ids_that_flood_fx_spread_under_the_state_hash() {
        use std::hash::BuildHasher;
        let ids = crate::testing::fx_colliding_event_ids(2_000);
        assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), ids.len());
        // The attack is real: under Fx, as the ledger hashed before, all share one value.
        let fx: BTreeSet<u64> = ids
            .iter()
            .map(|id| rustc_hash::FxBuildHasher.hash_one((T, *id)))
            .collect();
        assert_eq!(fx.len(), 1);
        // The ledger's index spreads them: distinct hashes, and distinct buckets of a table of
        // 2^14 for nearly all (random placement leaves about 6% sharing one).
        let ledger = Ledger::new(&World::new(1).genesis());
        let ours: Vec<u64> = ids
            .iter()
            .map(|id| ledger.events.hasher().hash_one((T, *id)))
            .collect();
        assert_eq!(ours.iter().collect::<BTreeSet<_>>().len(), ids.len());
        let buckets: BTreeSet<u64> = ours.iter().map(|h| h & ((1 << 14) - 1)).collect();
        assert!(buckets.len() > ids.len() * 9 / 10, "{} buckets", buckets.len());
        // And another ledger (another replica) is keyed differently.
        let twin = Ledger::new(&World::new(1).genesis());
        assert_ne!(
            twin.events.hasher().hash_one((T, ids[0])),
            ledger.events.hasher().hash_one((T, ids[0]))
        );
    }

    #[test]
    fn window_records_grow_in_chunks_and_share_all_but_the_last() {
        let record = |n: usize| WindowRecord {
            event: EventId::from_u128(n as u128),
            height: n as u64,
            outcome: RecordedOutcome::new(Outcome::Applied),
        };
        let mut records = WindowRecords::default();
        assert_eq!((records.len(), records.get(0).is_none()), (0, true));
        let count = 2 * WINDOW_CHUNK_RECORDS + 3;
        let mut view = None;
        for n in 0..count {
            assert_eq!(records.push(record(n)), n);
            if n == WINDOW_CHUNK_RECORDS + 10 {
                view = Some(records.clone());
            }
        }
        assert_eq!(records.len(), count);
        assert_eq!(records.0.len(), 3);
        assert!(records.0.iter().all(|chunk| chunk.len() <= WINDOW_CHUNK_RECORDS));
        for n in [0, WINDOW_CHUNK_RECORDS - 1, WINDOW_CHUNK_RECORDS, count - 1] {
            assert_eq!(records.get(n).map(|r| r.height), Some(n as u64));
        }
        assert!(records.get(count).is_none());
        let heights: Vec<u64> = records.iter().map(|r| r.height).collect();
        assert_eq!(heights, (0..count as u64).collect::<Vec<_>>());
        // The view taken mid-way still holds what it held; the full first chunk is shared with
        // it, the chunk then being filled was copied.
        let view = view.unwrap();
        assert_eq!(view.len(), WINDOW_CHUNK_RECORDS + 11);
        assert_eq!(
            view.iter().last().map(|r| r.height),
            Some(WINDOW_CHUNK_RECORDS as u64 + 10)
        );
        assert!(Arc::ptr_eq(&view.0[0], &records.0[0]));
        assert!(!Arc::ptr_eq(&view.0[1], &records.0[1]));
    }

    #[test]
    fn window_digest_is_sha256_of_its_records() {
        let settled = |entries: usize| Outcome::Settled {
            entries: (0..entries)
                .map(|i| (i % 3 == 0).then_some(Rejection::InsufficientFunds))
                .collect(),
        };
        // Short outcomes are hashed from the stack buffer, long ones streamed.
        let outcomes = [
            Outcome::Applied,
            Outcome::rejected(Rejection::UnknownAccount),
            settled(3),
            settled(500),
        ];
        let records: Vec<(EventId, u64, Outcome)> = outcomes
            .into_iter()
            .enumerate()
            .map(|(i, outcome)| (EventId::from_u128(i as u128 + 1), 10 + i as u64, outcome))
            .collect();
        assert!(rmp_serde::to_vec(&records[3].2).unwrap().len() > 128);
        let mut expected = Sha256::new();
        expected.update(WINDOW_DOMAIN);
        expected.update(7u64.to_be_bytes());
        expected.update(99u64.to_be_bytes());
        for (event, height, outcome) in &records {
            expected.update(event.0);
            expected.update(height.to_be_bytes());
            expected.update(rmp_serde::to_vec(outcome).unwrap());
        }
        let digest = window_digest(TenantId(7), 99, records.iter().map(|(e, h, o)| (e, *h, o)));
        assert_eq!(digest.0, <[u8; 32]>::from(expected.finalize()));
    }

    proptest! {
        #[test]
        fn transfer_currency_is_transfer_assets(
            held in prop::array::uniform3((0u128..4, 0u128..3)),
            spent in prop::array::uniform2(0u128..3),
            from in 0usize..5,
            to in 0usize..5,
            currency in prop::sample::select(vec!["GOLD", "GEM", "NONE"]),
            amount in 0u128..5,
            twice in any::<bool>(),
        ) {
            let spent = [spent[0].min(held[0].0), spent[1].min(held[1].0)];
            let (ledger, keys) = ledger(held, spent);
            let currency = CurrencyId::new(currency);
            let (from, to) = (keys[from], keys[to]);
            prop_assume!(from != to);
            let (mut fast, mut general) = (ledger.clone(), ledger);
            let asset = [Asset::Currency { currency: currency.clone(), amount: Amount(amount) }];
            // Twice in one block: the second sees the first's balances, zeros included.
            let run = |f: &mut dyn FnMut() -> Check| if twice { f().and_then(|()| f()) } else { f() };
            let verdict = run(&mut || fast.transfer_currency(T, &from, &to, &currency, Amount(amount)));
            let fast_after = after(fast, verdict);
            let verdict = run(&mut || general.transfer_assets(T, &from, &to, &asset));
            prop_assert_eq!(fast_after, after(general, verdict));
        }
    }
}
