//! Clicks: summed in memory per (tenant, counter, player) and written to the store once per
//! flush interval (never one round trip per click) by [`Store::add_clicks`]: with Redis, per key
//! `HINCRBY counter_key player n`, `ZINCRBY leaderboard_key n player`,
//! `HINCRBY unsettled_key player n`, and per (tenant, counter) `HINCRBY totals_key counter sum`,
//! all in one Lua script (one `EVALSHA` round trip per flush part) so that a part applies whole
//! or not at all, and at most once: each part carries (this run's id, its sequence number) and a
//! part whose reply was lost is retried with the same number, which the store skips.
//!
//! Flush generations make strict acknowledgement possible: a click absorbed while
//! [`Clicks::generation`] was `g` is in the store once [`Clicks::flushed`] reaches `g + 1`; if
//! [`Clicks::failed`] reaches `g + 1` first, the flush that should have written it failed (strict
//! connections answer `unavailable`; the click stays buffered for a later flush).

use std::collections::{HashSet, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;

use hoard_ledger::prefetch::prefetch;
use hoard_types::wire::{Click, CounterName, ErrorCode, CLICKS_PER_FRAME_MAX, CLICK_COUNT_MAX};

use hoard_types::{PublicKey, TenantId};

use crate::config::ClicksConfig;
use crate::constants::{CLICK_KEYS_PENDING_MAX, COUNTERS_PER_TENANT_MAX};
use crate::metrics as m;
use crate::store::{ClickKey as Key, Store, StoreResult, CLICK_PART_KEYS_MAX};

/// One flush part: its sequence number in this run and its click totals.
type Part = (u64, Vec<(Key, u64)>);

/// A click total in [`Pending::drain`]'s merge: the key's hash, the key, the count.
type Entry = (u64, Key, u64);

/// A table shrinks after a drain when it has over this many times the slots its keys needed (and
/// over [`TABLE_SLOTS_MIN`]): a connection whose players left does not keep their room.
const TABLE_SHRINK_RATIO: usize = 4;
/// The fewest slots of a table that holds anything (a player's own connection needs a few: one
/// key per counter it clicks).
const TABLE_SLOTS_MIN: usize = 8;
/// How many clicks ahead [`Pending::add`] prefetches the slot a click will probe first, so that
/// the cache misses of a message's clicks overlap instead of following each other.
const PREFETCH_AHEAD: usize = 16;

/// One (counter, player) total of a [`ClickTable`]. `count == 0` marks an empty slot (a click
/// counts at least 1).
#[derive(Clone, Copy)]
struct Slot {
    player: PublicKey,
    /// The address of the counter's interned name.
    counter: usize,
    count: u64,
}

const EMPTY: Slot = Slot {
    player: PublicKey([0; 32]),
    counter: 0,
    count: 0,
};

/// The interned name's address: what a table keys a counter by.
fn address(name: &Arc<str>) -> usize {
    Arc::as_ptr(name).cast::<u8>() as usize
}

/// One connection's click totals since the last flush, summed per (counter, player); the
/// connection's tenant is the table's.
///
/// Each connection sums into its own table: its players are the ones it carries (a game server's,
/// or one player's), so the table stays small and in the cache of the thread serving the
/// connection, and its lock is only ever contended by the flusher's drain. A key that two
/// connections click is merged when the tables are drained.
pub struct ClickTable {
    tenant: TenantId,
    counts: Mutex<Counts>,
}

/// An open-addressing table with linear probing: a power of two of slots (or none), at most half
/// of them full, so that a probe usually ends at its first slot, which `add` prefetches.
#[derive(Default)]
struct Counts {
    slots: Vec<Slot>,
    /// Full slots.
    len: usize,
    /// The interned names of the counters in `slots`, ordered by address.
    names: Vec<Arc<str>>,
}

/// The clicks absorbed since the last flush: every connection's [`ClickTable`]. Counter names are
/// interned ([`Clicks::intern`]): a name is one `Arc<str>` per tenant for the life of the
/// gateway, so keys hash and compare the name by its address.
struct Pending {
    hasher: foldhash::fast::RandomState,
    /// The tables of live connections (at most one per connection: the gateway's connection
    /// limit bounds them). A closing connection retires its table ([`Pending::retire`]).
    tables: Mutex<Vec<Arc<ClickTable>>>,
    /// The totals of retired tables, until the next drain.
    orphans: Mutex<Merged>,
    /// Keys in all tables and in `orphans` (the bound [`CLICK_KEYS_PENDING_MAX`] is checked
    /// against it).
    keys: AtomicUsize,
}

/// Totals merged from tables, one entry per (tenant, counter, player).
type Merged = hashbrown::HashTable<Entry>;

impl Pending {
    fn new() -> Pending {
        Pending {
            hasher: foldhash::fast::RandomState::default(),
            tables: Mutex::default(),
            orphans: Mutex::default(),
            keys: AtomicUsize::new(0),
        }
    }

    /// A player key's hash: the part of a table key's hash that [`Clicks::check`] computes while
    /// it reads the message.
    fn player_hash(&self, player: &PublicKey) -> u64 {
        // Fixed-size words hash faster than a byte slice (no length, no tail handling).
        let word = |at: usize| u64::from_le_bytes(player.0[at..at + 8].try_into().expect("8 bytes"));
        // A tuple: an array would hash as a slice (a length, then the words as bytes).
        self.hasher.hash_one((word(0), word(8), word(16), word(24)))
    }

    /// A (counter, player) key's hash in a table, from the player's hash and the counter's
    /// interned name address (mixed by a folded multiply, so every bit of it counts).
    fn key_hash(player_hash: u64, counter: usize) -> u64 {
        let product = u128::from(counter as u64) * 0x9e37_79b9_7f4a_7c15;
        player_hash ^ (product as u64) ^ ((product >> 64) as u64)
    }

    fn hash(&self, counter: usize, player: &PublicKey) -> u64 {
        Self::key_hash(self.player_hash(player), counter)
    }

    /// A new table for `tenant`'s clicks, drained by every [`Pending::drain`] from now on.
    fn table(&self, tenant: TenantId) -> Arc<ClickTable> {
        let table = Arc::new(ClickTable {
            tenant,
            counts: Mutex::default(),
        });
        self.tables.lock().expect("click tables lock").push(table.clone());
        table
    }

    /// Adds a checked message to `table`; `names[i]` is the interned counter name of its run `i`.
    fn add(&self, table: &ClickTable, checked: Checked, names: Vec<Arc<str>>) {
        let Checked {
            clicks,
            runs,
            mut hashes,
            ..
        } = checked;
        debug_assert_eq!(runs.len(), names.len());
        let mut counts = table.counts.lock().expect("click table lock");
        let Counts {
            slots,
            len,
            names: held_names,
        } = &mut *counts;
        // At most half full after this message.
        let needed = ((*len + clicks.len()) * 2)
            .next_power_of_two()
            .max(TABLE_SLOTS_MIN);
        if slots.len() < needed {
            let old = std::mem::replace(slots, vec![EMPTY; needed]);
            for slot in old.into_iter().filter(|slot| slot.count != 0) {
                let mask = slots.len() - 1;
                let mut at = self.hash(slot.counter, &slot.player) as usize & mask;
                while slots[at].count != 0 {
                    at = (at + 1) & mask;
                }
                slots[at] = slot;
            }
        }
        let mask = slots.len() - 1;
        // Each run's counter into the players' hashes (a pass over the hashes alone), then the
        // probes, each prefetched a few clicks ahead.
        // `spans`: (first click, end, counter address) of each run.
        let mut spans = Vec::with_capacity(runs.len());
        for (run, name) in names.into_iter().enumerate() {
            let counter = address(&name);
            if let Err(at) = held_names.binary_search_by_key(&counter, address) {
                held_names.insert(at, name);
            }
            let (start, end) = (runs[run], runs.get(run + 1).copied().unwrap_or(clicks.len()));
            for hash in &mut hashes[start..end] {
                *hash = Self::key_hash(*hash, counter);
            }
            spans.push((start, end, counter));
        }
        let mut new_keys = 0;
        for (start, end, counter) in spans {
            for (index, Click(player, _, count)) in clicks.iter().enumerate().take(end).skip(start) {
                debug_assert!(*count >= 1, "`check` refuses a count of 0, the empty slot's mark");
                if let Some(ahead) = hashes.get(index + PREFETCH_AHEAD) {
                    prefetch(&slots[*ahead as usize & mask]);
                }
                let mut at = hashes[index] as usize & mask;
                loop {
                    let slot = &mut slots[at];
                    if slot.count == 0 {
                        *slot = Slot {
                            player: *player,
                            counter,
                            count: u64::from(*count),
                        };
                        new_keys += 1;
                        break;
                    }
                    if slot.counter == counter && slot.player == *player {
                        slot.count += u64::from(*count);
                        break;
                    }
                    at = (at + 1) & mask;
                }
            }
        }
        *len += new_keys;
        // Counted under the table's lock, as `drain` uncounts: the count never goes below the
        // keys present.
        self.keys.fetch_add(new_keys, Ordering::SeqCst);
    }

    /// Moves everything `table` holds into `merged`; returns the keys that were in the table
    /// and the keys that merging added to `merged` (fewer when a key was in both).
    fn empty_into(&self, table: &ClickTable, merged: &mut Merged) -> (usize, usize) {
        let mut counts = table.counts.lock().expect("click table lock");
        let Counts { slots, len, names } = &mut *counts;
        let tenant = table.tenant;
        let mut added = 0;
        for slot in slots.iter_mut().filter(|slot| slot.count != 0) {
            let Slot {
                player,
                counter,
                count,
            } = std::mem::replace(slot, EMPTY);
            let name = match names.binary_search_by_key(&counter, address) {
                Ok(at) => &names[at],
                Err(_) => unreachable!("a table holds the name of every counter in its slots"),
            };
            let hash = self.hasher.hash_one((tenant.0, self.hash(counter, &player)));
            let same = |(_, (t, n, p), _): &Entry| *t == tenant && Arc::ptr_eq(n, name) && *p == player;
            match merged.entry(hash, same, |(h, _, _)| *h) {
                hashbrown::hash_table::Entry::Occupied(mut entry) => entry.get_mut().2 += count,
                hashbrown::hash_table::Entry::Vacant(entry) => {
                    entry.insert((hash, (tenant, name.clone(), player), count));
                    added += 1;
                }
            }
        }
        let held = std::mem::take(len);
        names.clear();
        if slots.len() > TABLE_SLOTS_MIN.max(held * 2 * TABLE_SHRINK_RATIO) {
            *slots = Vec::new();
        }
        (held, added)
    }

    /// Takes every pending total out, one entry per key.
    fn drain(&self) -> Vec<(Key, u64)> {
        let mut tables = self.tables.lock().expect("click tables lock");
        let mut merged = std::mem::take(&mut *self.orphans.lock().expect("click orphans lock"));
        merged.reserve(self.keys.load(Ordering::SeqCst), |(h, _, _)| *h);
        let mut removed = merged.len();
        tables.retain(|table| {
            // A table nobody else holds was dropped without being retired: nothing can add to it
            // any more (under this lock no one can take a new reference), so it goes once
            // emptied. Asked before emptying: a table still held can be added to, then dropped,
            // right after it is emptied, and is then emptied again by the next drain.
            let dropped = Arc::strong_count(table) == 1;
            removed += self.empty_into(table, &mut merged).0;
            !dropped
        });
        self.keys.fetch_sub(removed, Ordering::SeqCst);
        merged.into_iter().map(|(_, key, count)| (key, count)).collect()
    }

    /// Forgets `table` (its connection is closing); what it holds waits in `orphans` for the
    /// next drain, so that the tables kept are those of live connections, whatever the flushes do.
    fn retire(&self, table: &Arc<ClickTable>) {
        let mut tables = self.tables.lock().expect("click tables lock");
        let Some(at) = tables.iter().position(|t| Arc::ptr_eq(t, table)) else {
            return;
        };
        tables.swap_remove(at);
        let mut orphans = self.orphans.lock().expect("click orphans lock");
        let (held, added) = self.empty_into(table, &mut orphans);
        // Counted under the locks, as `drain` uncounts: never below the keys present.
        self.keys.fetch_sub(held - added, Ordering::SeqCst);
    }

    fn len(&self) -> usize {
        self.keys.load(Ordering::SeqCst)
    }
}

/// The click aggregator.
pub struct Clicks {
    pending: Pending,
    /// Interned counter names per tenant (bounded by [`COUNTERS_PER_TENANT_MAX`]).
    counters: DashMap<TenantId, HashSet<Arc<str>>>,
    generation: AtomicU64,
    flushed: tokio::sync::watch::Sender<u64>,
    /// The generation of the last flush that failed (0: none yet).
    failed: tokio::sync::watch::Sender<u64>,
    store: Arc<Store>,
    /// This gateway run's id (random): the store remembers the last flush part applied per run.
    run: String,
    /// The last flush sequence number given to a part.
    next_seq: AtomicU64,
    /// Flush parts not known to be applied, oldest first (the lock also serializes flushes).
    unapplied: tokio::sync::Mutex<VecDeque<Part>>,
}

/// A `clicks` message that passed [`Clicks::check`], ready for [`Clicks::absorb`].
pub struct Checked<'a> {
    clicks: &'a [Click],
    /// The clicks' counts, summed.
    pub total: u64,
    /// The first click of each run of clicks naming one counter.
    runs: Vec<usize>,
    /// Each click's player hash ([`Pending::player_hash`]).
    hashes: Vec<u64>,
}

/// A refused `clicks` message.
pub struct ClickError {
    pub code: ErrorCode,
    pub message: String,
}

impl Clicks {
    pub fn new(store: Arc<Store>) -> Clicks {
        Clicks {
            pending: Pending::new(),
            counters: DashMap::new(),
            generation: AtomicU64::new(0),
            flushed: tokio::sync::watch::channel(0).0,
            failed: tokio::sync::watch::channel(0).0,
            store,
            run: format!("{:032x}", rand::random::<u128>()),
            next_seq: AtomicU64::new(0),
            unapplied: tokio::sync::Mutex::new(VecDeque::new()),
        }
    }

    /// The current flush generation (see the module docs).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// The last generation written to the store.
    pub fn flushed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.flushed.subscribe()
    }

    /// The generation of the last failed flush: a click absorbed while [`Clicks::generation`] was
    /// below it was not written by that flush (it stays buffered and is written by a later one).
    pub fn failed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.failed.subscribe()
    }

    fn intern(&self, tenant: TenantId, counter: &str) -> Result<Arc<str>, ClickError> {
        if let Some(set) = self.counters.get(&tenant) {
            if let Some(name) = set.get(counter) {
                return Ok(name.clone());
            }
        }
        let mut set = self.counters.entry(tenant).or_default();
        if let Some(name) = set.get(counter) {
            return Ok(name.clone());
        }
        if set.len() >= COUNTERS_PER_TENANT_MAX {
            return Err(ClickError {
                code: ErrorCode::Invalid,
                message: format!("a tenant may have at most {COUNTERS_PER_TENANT_MAX} counters"),
            });
        }
        let name: Arc<str> = Arc::from(counter);
        set.insert(name.clone());
        Ok(name)
    }

    /// Checks a whole `clicks` message; `player` restricts it to one player (player connections).
    /// The one pass over the message also hashes each click's player and finds the runs of
    /// clicks naming one counter, for [`Clicks::absorb`].
    pub fn check<'a>(
        &self,
        clicks: &'a [Click],
        player: Option<&PublicKey>,
    ) -> Result<Checked<'a>, ClickError> {
        if clicks.is_empty() {
            return Err(ClickError {
                code: ErrorCode::Invalid,
                message: "no clicks".into(),
            });
        }
        if clicks.len() > CLICKS_PER_FRAME_MAX {
            return Err(ClickError {
                code: ErrorCode::TooLarge,
                message: format!(
                    "{} clicks, at most {CLICKS_PER_FRAME_MAX} per message",
                    clicks.len()
                ),
            });
        }
        let mut total = 0u64;
        let mut runs = Vec::with_capacity(1);
        let mut hashes = Vec::with_capacity(clicks.len());
        // Clicks of one message usually name the same counter: a name equal to the previous
        // click's was checked already.
        let mut last: Option<&CounterName> = None;
        for (index, Click(who, counter, count)) in clicks.iter().enumerate() {
            if let Some(player) = player {
                if who != player {
                    return Err(ClickError {
                        code: ErrorCode::Forbidden,
                        message: "a player may only click for itself".into(),
                    });
                }
            }
            if last != Some(counter) {
                if !hoard_types::wire::counter_name_is_valid(counter) {
                    return Err(ClickError {
                        code: ErrorCode::Invalid,
                        message: format!("bad counter name {counter:?}"),
                    });
                }
                runs.push(index);
                last = Some(counter);
            }
            if *count == 0 || *count > CLICK_COUNT_MAX {
                return Err(ClickError {
                    code: ErrorCode::Invalid,
                    message: format!("count must be 1..={CLICK_COUNT_MAX}"),
                });
            }
            total += u64::from(*count);
            hashes.push(self.pending.player_hash(who));
        }
        Ok(Checked {
            clicks,
            total,
            runs,
            hashes,
        })
    }

    /// A table for one connection's clicks, of `tenant` ([`Clicks::absorb`] into it).
    pub fn table(&self, tenant: TenantId) -> Arc<ClickTable> {
        self.pending.table(tenant)
    }

    /// Gives up a connection's table when the connection ends: its clicks are kept for the next
    /// flush, the table itself is forgotten.
    pub fn retire(&self, table: &Arc<ClickTable>) {
        self.pending.retire(table);
    }

    /// Adds a checked message to `table`. Refuses (`busy`) when too many keys are buffered (the
    /// store is not keeping up), and refuses the whole message, adding nothing, when one of its
    /// counters would be one too many for the tenant.
    pub fn absorb(&self, table: &ClickTable, checked: Checked) -> Result<(), ClickError> {
        if self.pending.len() >= CLICK_KEYS_PENDING_MAX {
            metrics::counter!(m::BUSY_TOTAL, "reason" => "clicks_pending").increment(1);
            return Err(ClickError {
                code: ErrorCode::Busy,
                message: "click buffer full: the click store is behind".into(),
            });
        }
        let names = checked
            .runs
            .iter()
            .map(|&start| self.intern(table.tenant, &checked.clicks[start].1))
            .collect::<Result<Vec<_>, _>>()?;
        self.pending.add(table, checked, names);
        Ok(())
    }

    /// Writes everything buffered to the store, in parts of at most [`CLICK_PART_KEYS_MAX`] keys,
    /// each with the next flush sequence number of this run. A part that failed (including one
    /// whose reply was lost after the store applied it) is kept with its sequence number and sent
    /// again, in order, before anything new: the store skips a part it already applied, so no
    /// click is counted twice. Nothing new is drained while failed parts are outstanding (the
    /// buffer's bound then refuses clicks with `busy`); once they are written, the same flush
    /// drains and writes the buffer.
    pub async fn flush(&self) -> StoreResult<()> {
        let mut unapplied = self.unapplied.lock().await;
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        // First the parts of failed flushes, in order; then what is buffered now.
        self.write_parts(&mut unapplied, generation).await?;
        let drained = self.pending.drain();
        metrics::gauge!(m::CLICK_KEYS_PENDING).set(self.pending.len() as f64);
        let mut drained = drained.into_iter().peekable();
        while drained.peek().is_some() {
            let part: Vec<(Key, u64)> = drained.by_ref().take(CLICK_PART_KEYS_MAX).collect();
            let seq = self.next_seq.fetch_add(1, Ordering::SeqCst) + 1;
            unapplied.push_back((seq, part));
        }
        self.write_parts(&mut unapplied, generation).await?;
        self.flushed.send_replace(generation);
        Ok(())
    }

    /// Writes `unapplied` front to back, removing each part once the store has it; stops at the
    /// first failure (recorded as a failure of flush `generation`).
    async fn write_parts(&self, unapplied: &mut VecDeque<Part>, generation: u64) -> StoreResult<()> {
        while let Some((seq, part)) = unapplied.front() {
            let started = Instant::now();
            let result = self.store.add_clicks(&self.run, *seq, part).await;
            metrics::histogram!(m::CLICK_FLUSH_DURATION_SECONDS).record(started.elapsed().as_secs_f64());
            match result {
                Ok(applied) => {
                    if !applied {
                        tracing::info!(seq, "click flush part already applied (its reply was lost)");
                    }
                    let clicks: u64 = part.iter().map(|(_, n)| n).sum();
                    metrics::counter!(m::CLICKS_FLUSHED_TOTAL).increment(clicks);
                    unapplied.pop_front();
                }
                Err(error) => {
                    metrics::counter!(m::CLICK_FLUSH_FAILURES_TOTAL).increment(1);
                    self.failed.send_replace(generation);
                    return Err(error);
                }
            }
        }
        Ok(())
    }

    /// Keys buffered in memory plus keys of flush parts not yet applied.
    pub async fn keys_unwritten(&self) -> usize {
        self.pending.len()
            + self
                .unapplied
                .lock()
                .await
                .iter()
                .map(|(_, part)| part.len())
                .sum::<usize>()
    }

    /// Flushes until `shutdown`, then once more: each flush starts [`ClicksConfig::flush_delay`]
    /// after the start of the one before, for the time that one took.
    pub async fn run_flusher(
        self: Arc<Clicks>,
        config: ClicksConfig,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        // The first flush one interval after start.
        let first = config.flush_delay(Duration::ZERO);
        let mut next = tokio::time::Instant::now() + first;
        metrics::gauge!(m::CLICK_FLUSH_INTERVAL_SECONDS).set(first.as_secs_f64());
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = crate::stopped(&mut shutdown) => break,
            }
            let started = tokio::time::Instant::now();
            if let Err(error) = self.flush().await {
                tracing::warn!(%error, "click flush failed; retrying next interval");
            }
            let delay = config.flush_delay(started.elapsed());
            metrics::gauge!(m::CLICK_FLUSH_INTERVAL_SECONDS).set(delay.as_secs_f64());
            next = started + delay;
        }
        for _ in 0..3 {
            match self.flush().await {
                Ok(()) => return,
                Err(error) => tracing::warn!(%error, "final click flush failed"),
            }
        }
        let keys = self.keys_unwritten().await;
        tracing::error!(keys, "clicks lost at shutdown: the store is unavailable");
    }

    // ----- reads (from the store: what has been flushed) -----

    pub async fn counter_total(&self, tenant: TenantId, counter: &str) -> StoreResult<u64> {
        self.store.counter_total(tenant, counter).await
    }

    pub async fn player_total(
        &self,
        tenant: TenantId,
        counter: &str,
        player: &PublicKey,
    ) -> StoreResult<u64> {
        self.store.player_total(tenant, counter, player).await
    }

    /// Every counter total of one player (counters with a zero total are left out).
    pub async fn player_totals(
        &self,
        tenant: TenantId,
        player: &PublicKey,
    ) -> StoreResult<Vec<(String, u64)>> {
        self.store.player_totals(tenant, player).await
    }

    /// The top `limit` players of a counter, highest first.
    pub async fn leaderboard(
        &self,
        tenant: TenantId,
        counter: &str,
        limit: usize,
    ) -> StoreResult<Vec<(PublicKey, u64)>> {
        self.store.leaderboard(tenant, counter, limit).await
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn clicks() -> Clicks {
        Clicks::new(Arc::new(Store::Embedded(Arc::new(
            crate::store::EmbeddedStore::new(),
        ))))
    }

    /// A deterministic message generator (xorshift): `n` clicks over `players` players and the
    /// counters `names`, with runs of one counter and mixed ones.
    fn message(seed: &mut u64, n: usize, players: u16, names: &[&str]) -> Vec<Click> {
        let mut next = || {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            *seed
        };
        (0..n)
            .map(|_| {
                let index = (next() % u64::from(players)) as u16;
                let mut player = PublicKey([0xa5; 32]);
                player.0[..2].copy_from_slice(&index.to_le_bytes());
                let name = names[(next() % names.len() as u64) as usize];
                Click(player, name.into(), (next() % 9 + 1) as u32)
            })
            .collect()
    }

    type Totals = BTreeMap<(u64, String, [u8; 32]), u64>;

    fn add_to(totals: &mut Totals, tenant: TenantId, clicks: &[Click]) {
        for Click(player, counter, count) in clicks {
            *totals
                .entry((tenant.0, counter.to_string(), player.0))
                .or_default() += u64::from(*count);
        }
    }

    /// Checks and absorbs `batch` into `table`, as a connection does.
    fn absorb(clicks: &Clicks, table: &ClickTable, batch: &[Click]) {
        let checked = clicks
            .check(batch, None)
            .unwrap_or_else(|e| panic!("{}", e.message));
        clicks
            .absorb(table, checked)
            .unwrap_or_else(|e| panic!("{}", e.message));
    }

    fn drain_into(clicks: &Clicks, totals: &mut Totals) {
        for ((tenant, counter, player), count) in clicks.pending.drain() {
            *totals
                .entry((tenant.0, counter.to_string(), player.0))
                .or_default() += count;
        }
    }

    #[test]
    fn totals_drained_equal_the_clicks_absorbed_by_concurrent_connections() {
        let clicks = clicks();
        let mut drained = Totals::new();
        let absorbed = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..3u64)
                .map(|worker| {
                    let clicks = &clicks;
                    scope.spawn(move || {
                        let mut seed = 0x9e37_79b9_7f4a_7c15 ^ (worker + 1);
                        let mut absorbed = Totals::new();
                        // A connection of each tenant; the last worker's are dropped (their
                        // connections closed) halfway, and new ones opened: nothing they held
                        // is lost.
                        let mut tables = [clicks.table(TenantId(1)), clicks.table(TenantId(2))];
                        for round in 0..300 {
                            let tenant = TenantId(round % 2 + 1);
                            let batch =
                                message(&mut seed, 1 + round as usize % 700, 200, &["gold", "xp", "gems"]);
                            absorb(clicks, &tables[round as usize % 2], &batch);
                            add_to(&mut absorbed, tenant, &batch);
                            if worker == 2 && round == 150 {
                                // Connections closing: retired, or (worker 1) dropped unretired.
                                for table in &tables {
                                    clicks.retire(table);
                                }
                                tables = [clicks.table(TenantId(1)), clicks.table(TenantId(2))];
                            }
                            if worker == 1 && round == 200 {
                                tables = [clicks.table(TenantId(1)), clicks.table(TenantId(2))];
                            }
                        }
                        absorbed
                    })
                })
                .collect();
            // Drain while the workers absorb, as the flusher does.
            while !workers.iter().all(|w| w.is_finished()) {
                drain_into(&clicks, &mut drained);
            }
            let mut absorbed = Totals::new();
            for worker in workers {
                for (key, count) in worker.join().expect("worker") {
                    *absorbed.entry(key).or_default() += count;
                }
            }
            absorbed
        });
        drain_into(&clicks, &mut drained);
        assert_eq!(drained, absorbed);
        assert_eq!(clicks.pending.len(), 0, "the key count follows the drains");
        let tables = clicks.pending.tables.lock().expect("lock").len();
        assert_eq!(
            tables, 0,
            "the tables of closed connections are forgotten once drained"
        );
    }

    #[test]
    fn one_key_per_tenant_counter_and_player_and_counter_names_are_interned_once() {
        let clicks = clicks();
        // Two connections' tables (one per tenant, as connections are) and a third connection
        // of tenant 1 clicking the same keys: drained, they are merged.
        let (one, two, three) = (
            clicks.table(TenantId(1)),
            clicks.table(TenantId(2)),
            clicks.table(TenantId(1)),
        );
        let alice = PublicKey([1; 32]);
        let batch = vec![
            Click(alice, "gold".into(), 1),
            Click(alice, "xp".into(), 2),
            Click(alice, "gold".into(), 3),
            Click(alice, "gold".into(), 4),
        ];
        absorb(&clicks, &one, &batch);
        absorb(&clicks, &two, &batch);
        assert_eq!(clicks.pending.len(), 4, "(tenant, counter) pairs for one player");
        absorb(&clicks, &three, &batch[1..2]);
        assert_eq!(clicks.pending.len(), 5, "one more key in the third table");
        let mut drained = clicks.pending.drain();
        assert_eq!(clicks.pending.len(), 0);
        drained.sort_by(|a, b| (a.0 .0, &*a.0 .1).cmp(&(b.0 .0, &*b.0 .1)));
        let got: Vec<(u64, &str, u64)> = drained.iter().map(|((t, c, _), n)| (t.0, &**c, *n)).collect();
        assert_eq!(got, [(1, "gold", 8), (1, "xp", 4), (2, "gold", 8), (2, "xp", 2)]);
        // Interned: the name of a tenant's counter is one allocation, shared by its keys.
        absorb(&clicks, &one, &batch[..1]);
        let again = clicks.pending.drain();
        let first = drained
            .iter()
            .find(|((t, c, _), _)| t.0 == 1 && &**c == "gold")
            .expect("gold");
        assert!(Arc::ptr_eq(&again[0].0 .1, &first.0 .1));
    }

    #[test]
    fn a_retired_table_is_forgotten_and_its_clicks_wait_for_the_next_drain() {
        let clicks = clicks();
        let (one, two) = (clicks.table(TenantId(3)), clicks.table(TenantId(3)));
        let mut seed = 3;
        let batch = message(&mut seed, 300, 50, &["gold", "xp"]);
        let mut absorbed = Totals::new();
        for table in [&one, &two] {
            absorb(&clicks, table, &batch);
            add_to(&mut absorbed, TenantId(3), &batch);
        }
        let distinct = clicks.pending.len() / 2;
        let registered = || clicks.pending.tables.lock().expect("lock").len();
        clicks.retire(&one);
        assert_eq!((registered(), clicks.pending.len()), (1, 2 * distinct));
        // The second table's keys merge with the first's, waiting in the orphans.
        clicks.retire(&two);
        assert_eq!((registered(), clicks.pending.len()), (0, distinct));
        clicks.retire(&two); // again: nothing
        assert_eq!(clicks.pending.len(), distinct);
        let mut drained = Totals::new();
        drain_into(&clicks, &mut drained);
        assert_eq!(drained, absorbed);
        assert_eq!(clicks.pending.len(), 0);
    }

    #[test]
    fn a_table_grows_with_its_keys_and_shrinks_after_a_drain_that_held_few() {
        let clicks = clicks();
        let table = clicks.table(TenantId(7));
        let mut seed = 7;
        let mut absorbed = Totals::new();
        // Many distinct keys (4,000 players on two counters) in messages of 1,000 clicks: the
        // table grows several times, and runs of equal keys collide in the probes.
        for _ in 0..20 {
            let batch = message(&mut seed, 1_000, 4_000, &["gold", "xp"]);
            absorb(&clicks, &table, &batch);
            add_to(&mut absorbed, TenantId(7), &batch);
        }
        let slots = |table: &ClickTable| table.counts.lock().expect("lock").slots.len();
        let keys = clicks.pending.len();
        assert!(
            slots(&table) >= 2 * keys,
            "at most half full: {} slots for {keys} keys",
            slots(&table)
        );
        let mut drained = Totals::new();
        drain_into(&clicks, &mut drained);
        assert_eq!(drained, absorbed);
        // The next drain holds one key: the room of thousands is given back.
        let one = vec![Click(PublicKey([3; 32]), "gold".into(), 5)];
        absorb(&clicks, &table, &one);
        drained.clear();
        drain_into(&clicks, &mut drained);
        assert_eq!(drained.into_values().collect::<Vec<_>>(), [5]);
        assert!(slots(&table) <= TABLE_SLOTS_MIN, "{} slots kept", slots(&table));
        assert_eq!(clicks.pending.len(), 0);
    }

    #[test]
    fn a_bad_counter_name_is_refused_after_a_run_of_good_ones() {
        let alice = PublicKey([1; 32]);
        let mut batch = vec![Click(alice, "gold".into(), 1); 3];
        batch.push(Click(alice, "bad name".into(), 1));
        let Err(error) = clicks().check(&batch, None) else {
            panic!("a bad counter name was accepted")
        };
        assert_eq!(error.code, ErrorCode::Invalid);
        assert!(error.message.contains("bad name"), "{}", error.message);
    }
}
