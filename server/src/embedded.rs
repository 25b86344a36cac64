//! The embedded store: what the gateway keeps in Redis, held in this process's memory with the
//! same semantics, for a gateway without a redis-server (`store = "embedded"`; `hoard demo` and
//! `hoard dev` choose it when no redis-server binary is installed).
//!
//! **Not durable**: a gateway crash loses the click totals and accepted events not yet committed
//! (the SDK resends its uncommitted events after reconnecting, so those come back; committed
//! events are on the chain). One gateway only: nothing is shared between processes.
//!
//! What it mirrors, operation by operation (see `store::RedisStore` for the Redis side):
//! - clicks: per (tenant, counter) a hash of player totals with its sorted set (leaderboard,
//!   ZREVRANGE order: score, then player, both descending), the unsettled points, and the
//!   tenant's counter totals; one flush part applies whole (one lock);
//! - settlement windows: the cut, plan and advance scripts, each atomic under the same lock;
//! - the event stream: ids `<ms>-<seq>` as XADD `*` makes them, one consumer group with its last
//!   delivered id and pending entries (consumer, delivery time, delivery count); XREADGROUP `>`
//!   with BLOCK, XAUTOCLAIM (cursor, idle time, COUNT with Redis's ten attempts per entry, deleted
//!   entries dropped from the pending list), XACK and XDEL.
//!
//! Bounded ([`EmbeddedBounds`], defaults in `constants`): distinct click keys, stream entries and
//! bytes, settled windows kept per tenant. Over a bound an operation fails with
//! [`StoreError::Full`] and changes nothing (clicks stay buffered, then `busy`; events get
//! `unavailable`).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use hoard_types::{PublicKey, TenantId};

use crate::constants::{
    COUNTERS_PER_TENANT_MAX, EMBEDDED_CLICK_KEYS_MAX, EMBEDDED_SETTLED_WINDOWS_KEPT,
    EMBEDDED_STREAM_BYTES_MAX, EMBEDDED_STREAM_ENTRIES_MAX,
};
/// Gateway runs whose last applied click flush the embedded store remembers.
pub const CLICK_RUNS_MAX: usize = 16;

use crate::store::{Claimed, ClickKey, SettleCut, StoreError, StoreResult, StreamEntry};

/// The bounds of an embedded store (defaults: the `EMBEDDED_*` constants).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EmbeddedBounds {
    pub click_keys_max: usize,
    pub stream_entries_max: usize,
    pub stream_bytes_max: usize,
    pub settled_windows_kept: usize,
}

impl Default for EmbeddedBounds {
    fn default() -> EmbeddedBounds {
        EmbeddedBounds {
            click_keys_max: EMBEDDED_CLICK_KEYS_MAX,
            stream_entries_max: EMBEDDED_STREAM_ENTRIES_MAX,
            stream_bytes_max: EMBEDDED_STREAM_BYTES_MAX,
            settled_windows_kept: EMBEDDED_SETTLED_WINDOWS_KEPT,
        }
    }
}

/// The embedded store (see the module docs).
pub struct EmbeddedStore {
    bounds: EmbeddedBounds,
    clicks: Mutex<Clicks>,
    stream: Mutex<Stream>,
    /// Woken on every append (blocked readers wait on it).
    appended: Notify,
}

#[derive(Default)]
struct Clicks {
    tenants: HashMap<TenantId, Tenant>,
    /// (gateway run, last applied flush sequence number), oldest first.
    runs: VecDeque<(String, u64)>,
    /// Distinct (tenant, counter, player) totals held.
    keys: usize,
}

#[derive(Default)]
struct Tenant {
    counters: HashMap<String, Counter>,
    /// Counter totals, by name.
    totals: BTreeMap<String, u64>,
    unsettled: HashMap<String, HashMap<PublicKey, u64>>,
    /// The current settlement window (None: none cut yet).
    window: Option<u64>,
    windows: BTreeMap<u64, Window>,
}

#[derive(Default)]
struct Counter {
    players: HashMap<PublicKey, u64>,
    /// (score, player): iterated backwards it is ZREVRANGE's order.
    board: BTreeSet<(u64, PublicKey)>,
}

#[derive(Default)]
struct Window {
    cut: bool,
    snapshot: HashMap<String, HashMap<PublicKey, u64>>,
    plan: Option<Vec<u8>>,
}

/// A stream entry id: (milliseconds, sequence), ordered as Redis orders them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
struct Id(u64, u64);

impl Id {
    fn parse(text: &str) -> StoreResult<Id> {
        let bad = || StoreError::BadStreamId(text.to_string());
        let (ms, seq) = text.split_once('-').ok_or_else(bad)?;
        Ok(Id(
            ms.parse().map_err(|_| bad())?,
            seq.parse().map_err(|_| bad())?,
        ))
    }

    fn render(self) -> String {
        format!("{}-{}", self.0, self.1)
    }
}

#[derive(Default)]
struct Stream {
    entries: BTreeMap<Id, Vec<u8>>,
    bytes: usize,
    last_id: Id,
    /// The consumer group: the last id delivered with `>` and the pending entries list.
    last_delivered: Id,
    pending: BTreeMap<Id, Pending>,
}

struct Pending {
    consumer: Arc<str>,
    delivered_at: Instant,
    deliveries: u64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves consistent data: each operation checks before it
    // changes anything.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Microseconds since the Unix epoch (settlement window numbers).
fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Default for EmbeddedStore {
    fn default() -> EmbeddedStore {
        EmbeddedStore::new()
    }
}

impl EmbeddedStore {
    /// An empty store whose stream has its consumer group.
    pub fn new() -> EmbeddedStore {
        EmbeddedStore::with_bounds(EmbeddedBounds::default())
    }

    pub fn with_bounds(bounds: EmbeddedBounds) -> EmbeddedStore {
        EmbeddedStore {
            bounds,
            clicks: Mutex::new(Clicks::default()),
            stream: Mutex::new(Stream::default()),
            appended: Notify::new(),
        }
    }

    // ----- clicks -----

    /// One flush part, whole or not at all.
    /// [`crate::store::Store::add_clicks`]: applies `part` only if `seq` is greater than the last
    /// sequence number applied for `run`, and records it, atomically. `Ok(false)`: already
    /// applied. Remembers the newest [`CLICK_RUNS_MAX`] runs.
    pub fn add_clicks_once(&self, run: &str, seq: u64, part: &[(ClickKey, u64)]) -> StoreResult<bool> {
        let mut clicks = lock(&self.clicks);
        if let Some(last) = clicks.runs.iter().find(|(r, _)| r == run).map(|(_, s)| *s) {
            if seq <= last {
                return Ok(false);
            }
        }
        Self::add_clicks_locked(&mut clicks, self.bounds.click_keys_max, part)?;
        clicks.runs.retain(|(r, _)| r != run);
        if clicks.runs.len() >= CLICK_RUNS_MAX {
            clicks.runs.pop_front();
        }
        clicks.runs.push_back((run.to_string(), seq));
        Ok(true)
    }

    /// Adds click totals (no run/sequence check; see [`EmbeddedStore::add_clicks_once`]).
    pub fn add_clicks(&self, part: &[(ClickKey, u64)]) -> StoreResult<()> {
        let mut clicks = lock(&self.clicks);
        Self::add_clicks_locked(&mut clicks, self.bounds.click_keys_max, part)
    }

    fn add_clicks_locked(
        clicks: &mut Clicks,
        click_keys_max: usize,
        part: &[(ClickKey, u64)],
    ) -> StoreResult<()> {
        let new_keys = part
            .iter()
            .filter(|((tenant, counter, player), _)| {
                clicks
                    .tenants
                    .get(tenant)
                    .and_then(|t| t.counters.get(&**counter))
                    .is_none_or(|c| !c.players.contains_key(player))
            })
            .count();
        if clicks.keys + new_keys > click_keys_max {
            return Err(StoreError::Full("click totals"));
        }
        for ((tenant, counter, player), count) in part {
            let state = clicks.tenants.entry(*tenant).or_default();
            let totals = state.counters.entry(counter.to_string()).or_default();
            let score = totals.players.entry(*player).or_insert(0);
            let before = *score;
            *score = before.saturating_add(*count);
            let after = *score;
            totals.board.remove(&(before, *player));
            totals.board.insert((after, *player));
            let unsettled = state.unsettled.entry(counter.to_string()).or_default();
            let points = unsettled.entry(*player).or_insert(0);
            *points = points.saturating_add(*count);
            let total = state.totals.entry(counter.to_string()).or_insert(0);
            *total = total.saturating_add(*count);
        }
        clicks.keys += new_keys;
        Ok(())
    }

    pub fn counter_total(&self, tenant: TenantId, counter: &str) -> u64 {
        let clicks = lock(&self.clicks);
        clicks
            .tenants
            .get(&tenant)
            .and_then(|t| t.totals.get(counter).copied())
            .unwrap_or(0)
    }

    pub fn player_total(&self, tenant: TenantId, counter: &str, player: &PublicKey) -> u64 {
        let clicks = lock(&self.clicks);
        clicks
            .tenants
            .get(&tenant)
            .and_then(|t| t.counters.get(counter))
            .and_then(|c| c.players.get(player).copied())
            .unwrap_or(0)
    }

    pub fn player_totals(&self, tenant: TenantId, player: &PublicKey) -> Vec<(String, u64)> {
        let clicks = lock(&self.clicks);
        let Some(state) = clicks.tenants.get(&tenant) else {
            return Vec::new();
        };
        state
            .totals
            .keys()
            .take(COUNTERS_PER_TENANT_MAX)
            .filter_map(|counter| {
                let total = state.counters.get(counter)?.players.get(player).copied()?;
                (total > 0).then(|| (counter.clone(), total))
            })
            .collect()
    }

    pub fn leaderboard(&self, tenant: TenantId, counter: &str, limit: usize) -> Vec<(PublicKey, u64)> {
        let clicks = lock(&self.clicks);
        clicks
            .tenants
            .get(&tenant)
            .and_then(|t| t.counters.get(counter))
            .map(|c| {
                c.board
                    .iter()
                    .rev()
                    .take(limit)
                    .map(|(score, player)| (*player, *score))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn unsettled(&self, tenant: TenantId, counter: &str) -> HashMap<String, u64> {
        let clicks = lock(&self.clicks);
        clicks
            .tenants
            .get(&tenant)
            .and_then(|t| t.unsettled.get(counter))
            .map(|points| points.iter().map(|(p, n)| (p.to_hex(), *n)).collect())
            .unwrap_or_default()
    }

    // ----- settlement windows: the semantics of the Redis scripts -----

    pub fn settle_window(&self, tenant: TenantId) -> Option<u64> {
        let clicks = lock(&self.clicks);
        clicks.tenants.get(&tenant).and_then(|t| t.window)
    }

    pub fn set_settle_window(&self, tenant: TenantId, window: u64) {
        let mut clicks = lock(&self.clicks);
        clicks.tenants.entry(tenant).or_default().window = Some(window);
    }

    /// The cut script (see `Store::settle_cut`), on this process's clock: this store is lost
    /// with its process, and a restarted gateway's first cut reads a later clock than every cut
    /// of the process before it.
    pub fn settle_cut(&self, tenant: TenantId, counters: &[&str]) -> SettleCut {
        self.settle_cut_at(tenant, counters, now_us())
    }

    /// [`EmbeddedStore::settle_cut`] with the clock reading `now_us` (microseconds).
    fn settle_cut_at(&self, tenant: TenantId, counters: &[&str], now_us: u64) -> SettleCut {
        let mut clicks = lock(&self.clicks);
        let state = clicks.tenants.entry(tenant).or_default();
        if let Some(window) = state.window {
            if state.windows.get(&window).is_some_and(|w| w.cut) {
                return SettleCut { window, cut: false };
            }
        }
        let window = state.window.map_or(now_us, |current| current.max(now_us));
        state.window = Some(window);
        let mut moved = Vec::new();
        for counter in counters {
            if let Some(points) = state.unsettled.remove(*counter) {
                if !points.is_empty() {
                    moved.push((counter.to_string(), points));
                }
            }
        }
        let entry = state.windows.entry(window).or_default();
        for (counter, points) in moved {
            entry.snapshot.insert(counter, points);
        }
        entry.cut = true;
        SettleCut { window, cut: true }
    }

    pub fn settle_snapshot(&self, tenant: TenantId, window: u64, counter: &str) -> Vec<(String, u64)> {
        let clicks = lock(&self.clicks);
        clicks
            .tenants
            .get(&tenant)
            .and_then(|t| t.windows.get(&window))
            .and_then(|w| w.snapshot.get(counter))
            .map(|points| points.iter().map(|(p, n)| (p.to_hex(), *n)).collect())
            .unwrap_or_default()
    }

    pub fn settle_plan(&self, tenant: TenantId, window: u64) -> Option<Vec<u8>> {
        let clicks = lock(&self.clicks);
        clicks
            .tenants
            .get(&tenant)
            .and_then(|t| t.windows.get(&window))
            .and_then(|w| w.plan.clone())
    }

    /// The plan script (SETNX the plan; only if first, add the carries back to unsettled), then
    /// the stored plan.
    pub fn settle_store_plan(
        &self,
        tenant: TenantId,
        window: u64,
        plan: &[u8],
        carries: &[(String, String, u64)],
    ) -> Vec<u8> {
        let mut clicks = lock(&self.clicks);
        let state = clicks.tenants.entry(tenant).or_default();
        let entry = state.windows.entry(window).or_default();
        if let Some(stored) = &entry.plan {
            return stored.clone();
        }
        entry.plan = Some(plan.to_vec());
        for (counter, player, points) in carries {
            // Snapshots hold only keys this store wrote, so every carried player parses.
            if let Ok(player) = PublicKey::from_hex(player) {
                let unsettled = state.unsettled.entry(counter.clone()).or_default();
                let total = unsettled.entry(player).or_insert(0);
                *total = total.saturating_add(*points);
            }
        }
        plan.to_vec()
    }

    /// The advance script (compare-and-set `window` → `window + 1`); on success the window's
    /// snapshot is dropped and only the newest [`EMBEDDED_SETTLED_WINDOWS_KEPT`] windows keep
    /// their plan and cut flag (Redis lets them expire after a day).
    pub fn settle_advance(&self, tenant: TenantId, window: u64) -> bool {
        let mut clicks = lock(&self.clicks);
        let state = clicks.tenants.entry(tenant).or_default();
        if state.window != Some(window) {
            return false;
        }
        state.window = Some(window + 1);
        if let Some(entry) = state.windows.get_mut(&window) {
            entry.snapshot.clear();
        }
        while state.windows.len() > self.bounds.settled_windows_kept {
            state.windows.pop_first();
        }
        true
    }

    // ----- the event stream -----

    /// XADD `*` for each transaction, all or none (none when a bound would be passed).
    pub fn append(&self, transactions: &[&[u8]]) -> StoreResult<Vec<String>> {
        let mut stream = lock(&self.stream);
        let bytes: usize = transactions.iter().map(|t| t.len()).sum();
        if stream.entries.len() + transactions.len() > self.bounds.stream_entries_max {
            return Err(StoreError::Full("event stream entries"));
        }
        if stream.bytes + bytes > self.bounds.stream_bytes_max {
            return Err(StoreError::Full("event stream bytes"));
        }
        let mut ids = Vec::with_capacity(transactions.len());
        for tx in transactions {
            let ms = now_ms();
            let id = if ms > stream.last_id.0 {
                Id(ms, 0)
            } else {
                Id(stream.last_id.0, stream.last_id.1 + 1)
            };
            stream.last_id = id;
            stream.entries.insert(id, tx.to_vec());
            ids.push(id.render());
        }
        stream.bytes += bytes;
        drop(stream);
        self.appended.notify_waiters();
        Ok(ids)
    }

    /// Whether each entry is still in the stream (XRANGE `id id`).
    pub fn present(&self, ids: &[String]) -> StoreResult<Vec<bool>> {
        let ids = ids
            .iter()
            .map(|id| Id::parse(id))
            .collect::<StoreResult<Vec<Id>>>()?;
        let stream = lock(&self.stream);
        Ok(ids.iter().map(|id| stream.entries.contains_key(id)).collect())
    }

    /// XACK then XDEL.
    pub fn ack(&self, ids: &[String]) -> StoreResult<()> {
        let ids = ids
            .iter()
            .map(|id| Id::parse(id))
            .collect::<StoreResult<Vec<Id>>>()?;
        let mut stream = lock(&self.stream);
        for id in ids {
            stream.pending.remove(&id);
            if let Some(bytes) = stream.entries.remove(&id) {
                stream.bytes -= bytes.len();
            }
        }
        Ok(())
    }

    /// XREADGROUP `>` COUNT `count` BLOCK `block_ms` (0: until an entry comes).
    pub async fn read(&self, consumer: &str, count: usize, block_ms: u64) -> Vec<StreamEntry> {
        let deadline = Instant::now() + Duration::from_millis(block_ms);
        let consumer: Arc<str> = Arc::from(consumer);
        loop {
            let appended = self.appended.notified();
            tokio::pin!(appended);
            // Registered before looking, so an append between the look and the wait wakes us.
            appended.as_mut().enable();
            let delivered = self.deliver_new(&consumer, count);
            if !delivered.is_empty() {
                return delivered;
            }
            if block_ms == 0 {
                appended.await;
            } else if tokio::time::timeout_at(deadline, appended).await.is_err() {
                return Vec::new();
            }
        }
    }

    fn deliver_new(&self, consumer: &Arc<str>, count: usize) -> Vec<StreamEntry> {
        let mut stream = lock(&self.stream);
        let now = Instant::now();
        let start = stream.last_delivered;
        let delivered: Vec<(Id, Vec<u8>)> = stream
            .entries
            .range((std::ops::Bound::Excluded(start), std::ops::Bound::Unbounded))
            .take(count)
            .map(|(id, tx)| (*id, tx.clone()))
            .collect();
        if let Some((last, _)) = delivered.last() {
            stream.last_delivered = *last;
        }
        for (id, _) in &delivered {
            stream.pending.insert(
                *id,
                Pending {
                    consumer: consumer.clone(),
                    delivered_at: now,
                    deliveries: 1,
                },
            );
        }
        delivered
            .into_iter()
            .map(|(id, tx)| StreamEntry {
                id: id.render(),
                tx: Some(tx),
            })
            .collect()
    }

    /// XAUTOCLAIM `consumer` `min_idle_ms` `cursor` COUNT `count`: scans the pending entries
    /// from `cursor` (at most ten per `count`), takes over those idle at least `min_idle_ms`
    /// (delivery time reset, delivery count + 1), drops pending ids whose entry was deleted.
    pub fn claim(
        &self,
        consumer: &str,
        min_idle_ms: u64,
        cursor: &str,
        count: usize,
    ) -> StoreResult<Claimed> {
        let start = Id::parse(cursor)?;
        let consumer: Arc<str> = Arc::from(consumer);
        let min_idle = Duration::from_millis(min_idle_ms);
        let now = Instant::now();
        let mut guard = lock(&self.stream);
        let stream = &mut *guard;
        let mut attempts = count.saturating_mul(10);
        let mut claimed = Vec::new();
        let mut deleted = Vec::new();
        let mut next_cursor = Id(0, 0);
        for (id, pending) in stream.pending.range_mut(start..) {
            if attempts == 0 || claimed.len() >= count {
                next_cursor = *id;
                break;
            }
            attempts -= 1;
            let Some(tx) = stream.entries.get(id) else {
                deleted.push(*id);
                continue;
            };
            if now.saturating_duration_since(pending.delivered_at) < min_idle {
                continue;
            }
            pending.consumer = consumer.clone();
            pending.delivered_at = now;
            pending.deliveries += 1;
            claimed.push(StreamEntry {
                id: id.render(),
                tx: Some(tx.clone()),
            });
        }
        for id in deleted {
            stream.pending.remove(&id);
        }
        Ok(Claimed {
            next_cursor: next_cursor.render(),
            entries: claimed,
        })
    }

    /// Entries in the stream and pending entries of the group (for tests and operators).
    pub fn stream_len(&self) -> (usize, usize) {
        let stream = lock(&self.stream);
        (stream.entries.len(), stream.pending.len())
    }

    /// A pending entry's (consumer, delivery count) (XPENDING's detail, for tests).
    pub fn pending_of(&self, id: &str) -> Option<(String, u64)> {
        let id = Id::parse(id).ok()?;
        let stream = lock(&self.stream);
        stream
            .pending
            .get(&id)
            .map(|p| (p.consumer.to_string(), p.deliveries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn txs(n: usize) -> Vec<Vec<u8>> {
        (0..n).map(|i| vec![i as u8; 3]).collect()
    }

    fn append(store: &EmbeddedStore, n: usize) -> Vec<String> {
        let txs = txs(n);
        let refs: Vec<&[u8]> = txs.iter().map(|t| t.as_slice()).collect();
        store.append(&refs).unwrap()
    }

    #[test]
    fn ids_increase_and_parse_back() {
        let store = EmbeddedStore::new();
        let ids = append(&store, 50);
        let parsed: Vec<Id> = ids.iter().map(|id| Id::parse(id).unwrap()).collect();
        assert!(parsed.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
        assert_eq!(parsed[0].render(), ids[0]);
        assert!(Id::parse("12").is_err() && Id::parse("a-1").is_err());
    }

    #[tokio::test]
    async fn the_group_delivers_each_new_entry_once_and_tracks_it_until_acked() {
        let store = EmbeddedStore::new();
        let ids = append(&store, 5);
        let first = store.read("a", 3, 1).await;
        assert_eq!(first.iter().map(|e| e.id.clone()).collect::<Vec<_>>(), ids[..3]);
        assert_eq!(first[0].tx, Some(vec![0, 0, 0]));
        // `>` never delivers an entry twice, to any consumer.
        let second = store.read("b", 10, 1).await;
        assert_eq!(second.iter().map(|e| e.id.clone()).collect::<Vec<_>>(), ids[3..]);
        assert!(store.read("a", 10, 1).await.is_empty());
        assert_eq!(store.stream_len(), (5, 5));
        assert_eq!(store.pending_of(&ids[4]), Some(("b".into(), 1)));
        store.ack(&ids[..2]).unwrap();
        assert_eq!(store.stream_len(), (3, 3));
        assert_eq!(store.pending_of(&ids[0]), None);
        assert!(store.ack(&["nonsense".to_string()]).is_err());
    }

    #[tokio::test]
    async fn a_blocked_read_wakes_on_append_and_times_out_without() {
        let store = Arc::new(EmbeddedStore::new());
        let reader = {
            let store = store.clone();
            tokio::spawn(async move { store.read("a", 10, 0).await })
        };
        tokio::task::yield_now().await;
        let ids = append(&store, 2);
        let got = tokio::time::timeout(Duration::from_secs(10), reader)
            .await
            .expect("the blocked read woke")
            .unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].id, ids[1]);
        // Nothing new: the read returns empty after its block time.
        assert!(store.read("a", 10, 20).await.is_empty());
    }

    #[tokio::test]
    async fn claim_takes_only_idle_entries_and_walks_the_pending_list_with_a_cursor() {
        let store = EmbeddedStore::new();
        let ids = append(&store, 25);
        assert_eq!(store.read("dead", 25, 1).await.len(), 25);
        // Nothing is idle for an hour.
        let none = store.claim("live", 3_600_000, "0-0", 100).unwrap();
        assert_eq!(
            none,
            Claimed {
                next_cursor: "0-0".into(),
                entries: vec![]
            }
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        // COUNT 10: the first ten, and a cursor at the eleventh.
        let first = store.claim("live", 10, "0-0", 10).unwrap();
        assert_eq!(first.entries.len(), 10);
        assert_eq!(first.entries[0].id, ids[0]);
        assert_eq!(first.next_cursor, ids[10]);
        assert_eq!(store.pending_of(&ids[0]), Some(("live".into(), 2)));
        // Claiming reset their idle time: they are not claimed again at once.
        let rest = store.claim("live", 10, "0-0", 100).unwrap();
        assert_eq!(rest.entries.len(), 15);
        assert_eq!(rest.entries[0].id, ids[10]);
        assert_eq!(rest.next_cursor, "0-0");
        // Acked entries leave the pending list; deleted-but-pending ones are dropped by a claim.
        store.ack(&ids[..20]).unwrap();
        {
            let mut stream = lock(&store.stream);
            let id = Id::parse(&ids[20]).unwrap();
            let bytes = stream.entries.remove(&id).unwrap();
            stream.bytes -= bytes.len();
        }
        let after = store.claim("other", 0, "0-0", 100).unwrap();
        assert_eq!(
            after.entries.iter().map(|e| e.id.clone()).collect::<Vec<_>>(),
            ids[21..]
        );
        assert_eq!(store.stream_len(), (4, 4));
        assert_eq!(store.pending_of(&ids[20]), None);
    }

    #[tokio::test]
    async fn claim_gives_up_after_ten_attempts_per_count() {
        let store = EmbeddedStore::new();
        let ids = append(&store, 30);
        assert_eq!(store.read("a", 30, 1).await.len(), 30);
        // Nothing idle: COUNT 2 scans 20 entries and returns a cursor at the 21st.
        let scan = store.claim("b", 3_600_000, "0-0", 2).unwrap();
        assert!(scan.entries.is_empty());
        assert_eq!(scan.next_cursor, ids[20]);
        let scan = store.claim("b", 3_600_000, &scan.next_cursor, 2).unwrap();
        assert_eq!(scan.next_cursor, "0-0");
    }

    fn small() -> EmbeddedStore {
        EmbeddedStore::with_bounds(EmbeddedBounds {
            click_keys_max: 3,
            stream_entries_max: 4,
            stream_bytes_max: 10,
            settled_windows_kept: 2,
        })
    }

    #[test]
    fn appends_stop_at_the_bounds_and_change_nothing() {
        let store = small();
        append(&store, 3);
        assert!(matches!(store.append(&[b"a", b"b"]), Err(StoreError::Full(_))));
        assert!(matches!(store.append(&[b"abcd"]), Err(StoreError::Full(_))));
        assert_eq!(store.stream_len(), (3, 0));
        store.append(&[b"a"]).unwrap();
    }

    #[test]
    fn click_keys_stop_at_the_bound_and_a_refused_part_changes_nothing() {
        let store = small();
        store
            .add_clicks(&clicks(&[(1, "gold", 1), (2, "gold", 1)]))
            .unwrap();
        let refused = store.add_clicks(&clicks(&[(1, "gold", 1), (3, "gold", 1), (4, "gold", 1)]));
        assert!(matches!(refused, Err(StoreError::Full(_))));
        assert_eq!(store.counter_total(TenantId(1), "gold"), 2);
        // Existing keys still count up; one more new key fits.
        store
            .add_clicks(&clicks(&[(1, "gold", 1), (3, "gold", 1)]))
            .unwrap();
        assert_eq!(store.counter_total(TenantId(1), "gold"), 4);
    }

    #[test]
    fn only_the_newest_settled_windows_are_kept() {
        let store = small();
        let t = TenantId(1);
        for i in 1..=4u8 {
            let cut = store.settle_cut_at(t, &["gold"], u64::from(i) * 1_000);
            assert!(cut.cut);
            store.settle_store_plan(t, cut.window, &[i], &[]);
            assert!(store.settle_advance(t, cut.window));
        }
        assert_eq!(store.settle_plan(t, 1_000), None);
        assert_eq!(store.settle_plan(t, 4_000), Some(vec![4]));
    }

    fn key(n: u8) -> PublicKey {
        PublicKey([n; 32])
    }

    fn clicks(entries: &[(u8, &str, u64)]) -> Vec<(ClickKey, u64)> {
        entries
            .iter()
            .map(|(p, c, n)| ((TenantId(1), Arc::from(*c), key(*p)), *n))
            .collect()
    }

    #[test]
    fn a_flush_part_applies_once_per_run_and_sequence_number() {
        let store = EmbeddedStore::new();
        let part = clicks(&[(1, "gold", 5), (2, "gold", 3)]);
        assert!(store.add_clicks_once("run-a", 1, &part).unwrap());
        // The same part again (a retry after a lost reply), or an older one: skipped.
        assert!(!store.add_clicks_once("run-a", 1, &part).unwrap());
        assert_eq!(store.counter_total(TenantId(1), "gold"), 8);
        assert!(store.add_clicks_once("run-a", 2, &part).unwrap());
        assert!(!store.add_clicks_once("run-a", 1, &part).unwrap());
        assert!(!store.add_clicks_once("run-a", 2, &part).unwrap());
        assert_eq!(store.counter_total(TenantId(1), "gold"), 16);
        assert_eq!(store.player_total(TenantId(1), "gold", &key(1)), 10);
        // Another run has its own numbers.
        assert!(store.add_clicks_once("run-b", 1, &part).unwrap());
        assert_eq!(store.counter_total(TenantId(1), "gold"), 24);
        // A refused part (store full) records nothing: its retry applies.
        let small = small();
        let four = clicks(&[(1, "gold", 1), (2, "gold", 1), (3, "gold", 1), (4, "gold", 1)]);
        assert!(matches!(
            small.add_clicks_once("run-a", 1, &four),
            Err(StoreError::Full(_))
        ));
        assert!(small.add_clicks_once("run-a", 1, &four[..3]).unwrap());
        assert_eq!(small.counter_total(TenantId(1), "gold"), 3);
    }

    #[test]
    fn only_the_newest_runs_are_remembered() {
        let store = EmbeddedStore::new();
        let part = clicks(&[(1, "gold", 1)]);
        for run in 0..=CLICK_RUNS_MAX {
            assert!(store.add_clicks_once(&format!("run-{run}"), 7, &part).unwrap());
        }
        assert_eq!(lock(&store.clicks).runs.len(), CLICK_RUNS_MAX);
        // The newest is still known, the oldest was forgotten.
        let newest = format!("run-{CLICK_RUNS_MAX}");
        assert!(!store.add_clicks_once(&newest, 7, &part).unwrap());
        assert!(store.add_clicks_once("run-0", 7, &part).unwrap());
    }

    #[test]
    fn clicks_sum_into_totals_leaderboards_and_unsettled() {
        let store = EmbeddedStore::new();
        store
            .add_clicks(&clicks(&[
                (1, "gold", 5),
                (2, "gold", 9),
                (3, "gold", 5),
                (1, "wood", 2),
            ]))
            .unwrap();
        store.add_clicks(&clicks(&[(1, "gold", 4)])).unwrap();
        assert_eq!(store.counter_total(TenantId(1), "gold"), 23);
        assert_eq!(store.counter_total(TenantId(2), "gold"), 0);
        assert_eq!(store.player_total(TenantId(1), "gold", &key(1)), 9);
        assert_eq!(
            store.player_totals(TenantId(1), &key(1)),
            vec![("gold".to_string(), 9), ("wood".to_string(), 2)]
        );
        // Score descending, then player descending (ZREVRANGE).
        assert_eq!(
            store.leaderboard(TenantId(1), "gold", 3),
            vec![(key(2), 9), (key(1), 9), (key(3), 5)]
        );
        assert_eq!(
            store.unsettled(TenantId(1), "gold").get(&key(1).to_hex()),
            Some(&9)
        );
    }

    #[test]
    fn a_settlement_window_is_cut_planned_and_advanced_once() {
        let store = EmbeddedStore::new();
        let t = TenantId(1);
        store
            .add_clicks(&clicks(&[(1, "gold", 250), (2, "gold", 40)]))
            .unwrap();
        assert_eq!(store.settle_window(t), None);
        let w = 1_000;
        let cut = SettleCut { window: w, cut: true };
        assert_eq!(store.settle_cut_at(t, &["gold", "wood"], w), cut);
        assert_eq!(store.settle_window(t), Some(w));
        // Clicks after the cut go to unsettled, not into the window; a retry (even later) finds
        // the window cut.
        store.add_clicks(&clicks(&[(1, "gold", 7)])).unwrap();
        let again = SettleCut {
            window: w,
            cut: false,
        };
        assert_eq!(store.settle_cut_at(t, &["gold"], w + 500), again);
        let mut snapshot = store.settle_snapshot(t, w, "gold");
        snapshot.sort();
        assert_eq!(snapshot, vec![(key(1).to_hex(), 250), (key(2).to_hex(), 40)]);
        assert_eq!(store.settle_plan(t, w), None);
        let carries = vec![("gold".to_string(), key(1).to_hex(), 50)];
        assert_eq!(store.settle_store_plan(t, w, b"first", &carries), b"first");
        // A second planner gets the first plan and adds no carries.
        assert_eq!(store.settle_store_plan(t, w, b"second", &carries), b"first");
        assert_eq!(store.unsettled(t, "gold").get(&key(1).to_hex()), Some(&57));
        assert!(!store.settle_advance(t, w + 1));
        assert!(store.settle_advance(t, w));
        assert!(!store.settle_advance(t, w));
        assert_eq!(store.settle_window(t), Some(w + 1));
        assert!(store.settle_snapshot(t, w, "gold").is_empty());
        // Redoing the window finds its cut flag and plan.
        store.set_settle_window(t, w);
        assert_eq!(store.settle_cut_at(t, &["gold"], w + 900), again);
        assert_eq!(store.settle_plan(t, w), Some(b"first".to_vec()));
    }

    #[test]
    fn a_cut_numbers_its_window_from_the_clock_and_never_below_the_counter() {
        let store = EmbeddedStore::new();
        let t = TenantId(1);
        let cut = |window| SettleCut { window, cut: true };
        // The first window: the clock.
        assert_eq!(store.settle_cut_at(t, &["gold"], 5_000), cut(5_000));
        assert!(store.settle_advance(t, 5_000));
        // After an advance the next window is the clock if it is ahead of the counter ...
        assert_eq!(store.settle_cut_at(t, &["gold"], 9_000), cut(9_000));
        assert!(store.settle_advance(t, 9_000));
        // ... and the counter if the clock is behind it (stepped back, or two cuts in a
        // microsecond): numbers only increase while the counter is kept.
        assert_eq!(store.settle_cut_at(t, &["gold"], 2_000), cut(9_001));
        assert!(store.settle_advance(t, 9_001));
        // A current window whose cut flag is gone (an operator set an old window that was
        // dropped) is not cut again: the cut numbers a new window.
        store.set_settle_window(t, 7);
        assert_eq!(store.settle_cut_at(t, &["gold"], 12_000), cut(12_000));
        // A store that lost everything (a restarted gateway) starts from the clock, above
        // every window the clock numbered before.
        let restarted = EmbeddedStore::new();
        assert_eq!(restarted.settle_cut_at(t, &["gold"], 13_000), cut(13_000));
        // The wall clock: microseconds since the epoch (not milliseconds, not small numbers).
        let real = EmbeddedStore::new().settle_cut(t, &["gold"]).window;
        assert!(real > 1_600_000_000_000_000 && real < 1 << 53, "{real}");
    }
}
