//! Settlement: turns accumulated click points into on-chain currency in batched, studio-signed
//! `settle` transactions, exactly once per settlement window.
//!
//! Window `W` of a tenant:
//! 1. cut: atomically opens window `W` and moves every ruled counter's unsettled points into its
//!    snapshot, only the first time; a flag marks the cut, and a retry or another gateway gets
//!    the same `W` ([`Store::settle_cut`]). `W` is chosen at the cut, from the clock in
//!    microseconds (and above the previous window), so that no number is ever cut twice, even
//!    after the store lost or rolled back its counter: the chain answers a committed event id
//!    with its old outcome, so a number cut again would make that cut's points vanish;
//! 2. plan: from the snapshot, `units = points / points_per_unit` for each registered player; the
//!    plan (the signed transactions) is stored only if none is, and only then the remainders (and
//!    unregistered players' points) go back to unsettled, atomically ([`Store::settle_store_plan`]);
//! 3. submit: the plan's transactions go down the event pipeline (durable before we go on); their
//!    event ids are `EventId::derive(["hoard/settle/v1", tenant, W, chunk])`;
//! 4. advance: the current window becomes `W + 1` (compare-and-set, [`Store::settle_advance`]),
//!    the least number the next cut may take.
//!
//! With Redis each step is one Lua script (`store.rs`); the embedded store does the same under
//! one lock.
//!
//! A crash or a concurrent gateway at any step redoes the same window from the same snapshot and
//! plan: the same bytes with the same event ids, which the ledger applies once.
//!
//! If the store loses its data (Redis restarted without persistence, the embedded store with its
//! gateway), the unsettled points and an open window's snapshot are lost with it; what is clicked
//! afterwards is settled in new windows. If Redis comes back with older data (a snapshot, or AOF
//! `everysec` missing its last second), a window the older data shows cut is redone as above; a
//! window cut only after it is forgotten, and the points it took that the older data still
//! holds as unsettled are settled again in a new window (the store cannot know the chain
//! settled them): a rollback may re-grant, it never makes later points vanish. Neither is
//! silent: a gateway that finds the counter behind what it advanced it to reports it
//! ([`Marks`]).

use std::sync::Arc;

use hoard_types::constants::{EXPIRY_HORIZON_BLOCKS_MAX, SETTLEMENT_ENTRIES_MAX, TX_PAYLOAD_BYTES_MAX};
use hoard_types::wire::ErrorCode;
use hoard_types::{
    Amount, CurrencyId, EventId, Grant, Keypair, PublicKey, Settlement, TenantId, Transaction, TxBody,
    TxPayload,
};

use crate::config::ConversionRule;
use crate::events::{Events, Origin, Refused};
use crate::metrics as m;
use crate::store::{Store, StoreError};
use crate::view::ChainView;

/// What one settlement did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    pub window: u64,
    pub event_ids: Vec<EventId>,
    pub entries: u32,
}

/// Why a settlement failed (retrying redoes the same window).
#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{message}")]
    Refused {
        code: ErrorCode,
        message: String,
        retry_after_ms: Option<u64>,
    },
}

impl From<Refused> for SettleError {
    fn from(refused: Refused) -> SettleError {
        SettleError::Refused {
            code: refused.code,
            message: refused.message,
            retry_after_ms: refused.retry_after_ms,
        }
    }
}

/// The event id of chunk `chunk` of window `window`.
pub fn settlement_event_id(tenant: TenantId, window: u64, chunk: u32) -> EventId {
    EventId::derive(&[
        b"hoard/settle/v1",
        &tenant.0.to_be_bytes(),
        &window.to_be_bytes(),
        &chunk.to_be_bytes(),
    ])
}

/// Room in a settlement's payload for everything but its entries (chain id, tenant, event id,
/// expiry, the body's tag and the entries' array header: under 100 bytes encoded).
const SETTLEMENT_PAYLOAD_OVERHEAD_BYTES: usize = 256;

/// Splits a window's entries into settlement transactions that each fit: at most
/// [`SETTLEMENT_ENTRIES_MAX`] entries and a payload of at most [`TX_PAYLOAD_BYTES_MAX`] bytes
/// (an entry is about 70 bytes, so a payload holds about 900, not 4,096: chunking by count
/// alone made payloads of 280 KB that every gateway refused, and the window's stored plan
/// then failed on every retry).
fn settlement_chunks(entries: &[Settlement]) -> Vec<&[Settlement]> {
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut bytes = SETTLEMENT_PAYLOAD_OVERHEAD_BYTES;
    for (i, entry) in entries.iter().enumerate() {
        let size = rmp_serde::to_vec(entry).expect("a settlement encodes").len();
        if i > start && (i - start == SETTLEMENT_ENTRIES_MAX || bytes + size > TX_PAYLOAD_BYTES_MAX) {
            chunks.push(&entries[start..i]);
            start = i;
            bytes = SETTLEMENT_PAYLOAD_OVERHEAD_BYTES;
        }
        bytes += size;
    }
    if start < entries.len() {
        chunks.push(&entries[start..]);
    }
    chunks
}

/// The window counter value this gateway last advanced each tenant to. The counter never goes
/// down in normal operation (every gateway only advances it), so finding it below this mark (or
/// gone) means the store lost or rolled back its data: settlement then goes on (see the module
/// docs for what that may re-grant or lose), but never silently: it is logged as an error and
/// counted in `hoard_gateway_settlement_store_regressions_total`.
#[derive(Default)]
pub struct Marks(dashmap::DashMap<TenantId, u64>);

impl Marks {
    /// Checks the counter `current` against the mark; true if it went back.
    fn regressed(&self, tenant: TenantId, current: Option<u64>) -> bool {
        let Some(mark) = self.0.get(&tenant).map(|m| *m) else {
            return false;
        };
        if current.is_some_and(|current| current >= mark) {
            return false;
        }
        metrics::counter!(m::SETTLEMENT_STORE_REGRESSIONS_TOTAL).increment(1);
        tracing::error!(
            tenant = tenant.0,
            mark,
            current,
            "the click store's settlement window went back (Redis lost or rolled back its data): \
             click points it shows unsettled may have been settled already, and points clicked \
             in the lost interval are gone"
        );
        true
    }

    fn advanced(&self, tenant: TenantId, to: u64) {
        let mut mark = self.0.entry(tenant).or_insert(to);
        *mark = (*mark).max(to);
    }
}

/// Settles one window of `tenant`.
#[allow(clippy::too_many_arguments)]
pub async fn settle(
    store: &Store,
    events: &Arc<Events>,
    view: &ChainView,
    marks: &Marks,
    chain_id: u64,
    tenant: TenantId,
    studio: &Keypair,
    rules: &[ConversionRule],
) -> Result<Settled, SettleError> {
    let counters: Vec<&str> = rules.iter().map(|rule| rule.counter.as_str()).collect();
    marks.regressed(tenant, store.settle_window(tenant).await?);

    // 1. Cut (and number the window).
    let window = store.settle_cut(tenant, &counters).await?.window;

    // 2. Plan (once).
    let plan_bytes = match store.settle_plan(tenant, window).await? {
        Some(bytes) => bytes,
        None => {
            let mut entries: Vec<Settlement> = Vec::new();
            let mut carries: Vec<(String, String, u64)> = Vec::new();
            for rule in rules {
                let mut points = store.settle_snapshot(tenant, window, &rule.counter).await?;
                points.sort();
                for (player_hex, points) in points {
                    let player = PublicKey::from_hex(&player_hex).ok();
                    let registered = player.is_some_and(|p| view.read(|l| l.account(tenant, &p).is_some()));
                    let units = if registered {
                        points / rule.points_per_unit
                    } else {
                        0
                    };
                    let remainder = points - units * rule.points_per_unit;
                    if units > 0 {
                        entries.push(Settlement {
                            to: player.expect("registered implies parsed"),
                            grant: Grant::Currency {
                                currency: CurrencyId::new(&rule.currency),
                                amount: Amount(u128::from(units)),
                            },
                        });
                    }
                    if remainder > 0 {
                        carries.push((rule.counter.clone(), player_hex, remainder));
                    }
                }
            }
            let expires_at = view.height() + EXPIRY_HORIZON_BLOCKS_MAX;
            let transactions: Vec<Transaction> = settlement_chunks(&entries)
                .into_iter()
                .enumerate()
                .map(|(chunk, entries)| {
                    TxPayload {
                        chain_id,
                        tenant,
                        event_id: settlement_event_id(tenant, window, chunk as u32),
                        expires_at,
                        body: TxBody::Settle {
                            entries: entries.to_vec(),
                        },
                    }
                    .sign(&[studio])
                })
                .collect();
            let bytes = rmp_serde::to_vec(&transactions).expect("transactions encode");
            store.settle_store_plan(tenant, window, &bytes, &carries).await?
        }
    };
    let transactions: Vec<Transaction> =
        rmp_serde::from_slice(&plan_bytes).map_err(|e| SettleError::Refused {
            code: ErrorCode::Internal,
            message: format!("settlement plan unreadable: {e}"),
            retry_after_ms: None,
        })?;

    // 3. Submit, durably.
    let mut event_ids = Vec::with_capacity(transactions.len());
    let mut entries = 0u32;
    for tx in &transactions {
        let payload = tx.decode_payload().map_err(|e| SettleError::Refused {
            code: ErrorCode::Internal,
            message: e.to_string(),
            retry_after_ms: None,
        })?;
        if let TxBody::Settle { entries: e } = &payload.body {
            entries += e.len() as u32;
        }
        let (reply, durable) = tokio::sync::oneshot::channel();
        events.submit(tenant, payload.event_id, tx, "settle", Origin::Internal(reply))?;
        match durable.await {
            Ok(Ok(())) => {}
            Ok(Err(code)) => {
                return Err(SettleError::Refused {
                    code,
                    message: "settlement not durable".into(),
                    retry_after_ms: Some(100),
                })
            }
            Err(_) => {
                return Err(SettleError::Refused {
                    code: ErrorCode::ShuttingDown,
                    message: "the gateway is stopping".into(),
                    retry_after_ms: None,
                })
            }
        }
        event_ids.push(payload.event_id);
    }

    // 4. Advance (the window's snapshot goes, its plan ages out).
    let advanced = store.settle_advance(tenant, window, &counters).await?;
    marks.advanced(tenant, window + 1);
    if advanced {
        metrics::counter!(m::SETTLEMENTS_TOTAL).increment(1);
        metrics::counter!(m::SETTLEMENT_ENTRIES_TOTAL).increment(u64::from(entries));
    }
    Ok(Settled {
        window,
        event_ids,
        entries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settlement_chunks_fit_a_transaction_payload_and_keep_every_entry_in_order() {
        let studio = Keypair::from_seed([4; 32]);
        // The largest entries a rule can make: a 16-byte symbol and a u128 amount.
        let entries: Vec<Settlement> = (0..10_000u32)
            .map(|i| Settlement {
                to: Keypair::from_seed([(i % 251) as u8; 32]).public(),
                grant: Grant::Currency {
                    currency: CurrencyId::new("GOLDGOLDGOLDGOLD"),
                    amount: Amount(u128::MAX - u128::from(i)),
                },
            })
            .collect();
        let chunks = settlement_chunks(&entries);
        assert!(
            chunks.len() > 10_000 / SETTLEMENT_ENTRIES_MAX + 1,
            "{} chunks",
            chunks.len()
        );
        assert_eq!(chunks.concat(), entries);
        for (chunk, entries) in chunks.iter().enumerate() {
            assert!(!entries.is_empty() && entries.len() <= SETTLEMENT_ENTRIES_MAX);
            let tx = TxPayload {
                chain_id: u64::MAX,
                tenant: TenantId(u64::MAX),
                event_id: settlement_event_id(TenantId(u64::MAX), u64::MAX, chunk as u32),
                expires_at: u64::MAX,
                body: TxBody::Settle {
                    entries: entries.to_vec(),
                },
            }
            .sign(&[&studio]);
            let payload = tx.decode_payload().expect("within the payload limit");
            assert!(
                tx.payload.len() <= TX_PAYLOAD_BYTES_MAX,
                "{} bytes",
                tx.payload.len()
            );
            assert_eq!(
                payload.event_id,
                settlement_event_id(TenantId(u64::MAX), u64::MAX, chunk as u32)
            );
        }
        // A few entries make one transaction.
        assert!(settlement_chunks(&entries[..10]).len() == 1);
        assert!(settlement_chunks(&[]).is_empty());
    }

    #[test]
    fn settlement_event_ids_differ_by_tenant_window_and_chunk() {
        let a = settlement_event_id(TenantId(1), 1, 0);
        assert_eq!(a, settlement_event_id(TenantId(1), 1, 0));
        assert_ne!(a, settlement_event_id(TenantId(2), 1, 0));
        assert_ne!(a, settlement_event_id(TenantId(1), 2, 0));
        assert_ne!(a, settlement_event_id(TenantId(1), 1, 1));
    }
}
