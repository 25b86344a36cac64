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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;

use hoard_types::wire::{Click, ErrorCode, CLICKS_PER_FRAME_MAX, CLICK_COUNT_MAX};
use hoard_types::{PublicKey, TenantId};

use crate::constants::{CLICK_KEYS_PENDING_MAX, COUNTERS_PER_TENANT_MAX};
use crate::metrics as m;
use crate::store::{ClickKey as Key, Store, StoreResult, CLICK_PART_KEYS_MAX};

/// One flush part: its sequence number in this run and its click totals.
type Part = (u64, Vec<(Key, u64)>);

/// The click aggregator.
pub struct Clicks {
    pending: DashMap<Key, u64>,
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

/// A refused `clicks` message.
pub struct ClickError {
    pub code: ErrorCode,
    pub message: String,
}

impl Clicks {
    pub fn new(store: Arc<Store>) -> Clicks {
        Clicks {
            pending: DashMap::new(),
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
    pub fn validate(clicks: &[Click], player: Option<&PublicKey>) -> Result<u64, ClickError> {
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
        for Click(who, counter, count) in clicks {
            if let Some(player) = player {
                if who != player {
                    return Err(ClickError {
                        code: ErrorCode::Forbidden,
                        message: "a player may only click for itself".into(),
                    });
                }
            }
            if !hoard_types::wire::counter_name_is_valid(counter) {
                return Err(ClickError {
                    code: ErrorCode::Invalid,
                    message: format!("bad counter name {counter:?}"),
                });
            }
            if *count == 0 || *count > CLICK_COUNT_MAX {
                return Err(ClickError {
                    code: ErrorCode::Invalid,
                    message: format!("count must be 1..={CLICK_COUNT_MAX}"),
                });
            }
            total += u64::from(*count);
        }
        Ok(total)
    }

    /// Adds validated clicks to the buffer. Refuses (`busy`) when too many keys are buffered
    /// (the store is not keeping up).
    pub fn absorb(&self, tenant: TenantId, clicks: &[Click]) -> Result<(), ClickError> {
        if self.pending.len() >= CLICK_KEYS_PENDING_MAX {
            metrics::counter!(m::BUSY_TOTAL, "reason" => "clicks_pending").increment(1);
            return Err(ClickError {
                code: ErrorCode::Busy,
                message: "click buffer full: the click store is behind".into(),
            });
        }
        for Click(player, counter, count) in clicks {
            let counter = self.intern(tenant, counter)?;
            *self.pending.entry((tenant, counter, *player)).or_insert(0) += u64::from(*count);
        }
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
        let mut drained: Vec<(Key, u64)> = Vec::new();
        self.pending.retain(|key, count| {
            drained.push((key.clone(), *count));
            false
        });
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

    /// Flushes every `interval` until `shutdown`, then once more.
    pub async fn run_flusher(
        self: Arc<Clicks>,
        interval: Duration,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        // The first flush one interval after start (`interval` would tick at once, and a task
        // that starts late would then flush the first clicks early).
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = crate::stopped(&mut shutdown) => break,
            }
            if let Err(error) = self.flush().await {
                tracing::warn!(%error, "click flush failed; retrying next interval");
            }
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
