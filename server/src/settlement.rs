//! Settlement: turns accumulated click points into on-chain currency in batched, studio-signed
//! `settle` transactions, exactly once per settlement window.
//!
//! Window `W` of a tenant (the number in `settle_window_key`):
//! 1. cut: one script atomically renames every ruled counter's unsettled hash into window `W`'s
//!    snapshot (only the first time; a flag marks the cut);
//! 2. plan: from the snapshot, `units = points / points_per_unit` for each registered player; one
//!    script stores the plan (the signed transactions) with SETNX and, only if it was first, adds
//!    the remainders (and unregistered players' points) back to unsettled;
//! 3. submit: the plan's transactions go down the event pipeline (durable before we go on); their
//!    event ids are `EventId::derive(["hoard/settle/v1", tenant, W, chunk])`;
//! 4. advance: `W` becomes `W + 1` (compare-and-set).
//!
//! A crash or a concurrent gateway at any step redoes the same window from the same snapshot and
//! plan: the same bytes with the same event ids, which the ledger applies once.

use std::sync::Arc;

use hoard_types::constants::{EXPIRY_HORIZON_BLOCKS_MAX, SETTLEMENT_ENTRIES_MAX};
use hoard_types::wire::ErrorCode;
use hoard_types::{
    Amount, CurrencyId, EventId, Grant, Keypair, PublicKey, Settlement, TenantId, Transaction, TxBody,
    TxPayload,
};

use crate::config::ConversionRule;
use crate::events::{Events, Origin, Refused};
use crate::metrics as m;
use crate::store::{self, RedisHandle};
use crate::view::ChainView;

const CUT_SCRIPT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
for i = 2, #KEYS, 2 do
  if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('RENAME', KEYS[i], KEYS[i + 1]) end
end
redis.call('SET', KEYS[1], '1')
return 1
";

const PLAN_SCRIPT: &str = r"
if redis.call('SETNX', KEYS[1], ARGV[1]) == 0 then return 0 end
for i = 2, #KEYS do
  redis.call('HINCRBY', KEYS[i], ARGV[2 * i - 2], ARGV[2 * i - 1])
end
return 1
";

const ADVANCE_SCRIPT: &str = r"
local w = redis.call('GET', KEYS[1])
if (w == false and ARGV[1] == '1') or w == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  return 1
end
return 0
";

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
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
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

/// Settles one window of `tenant`.
pub async fn settle(
    redis: &RedisHandle,
    events: &Arc<Events>,
    view: &ChainView,
    chain_id: u64,
    tenant: TenantId,
    studio: &Keypair,
    rules: &[ConversionRule],
) -> Result<Settled, SettleError> {
    let mut connection = redis.get().await?;
    let window_key = store::settle_window_key(tenant);
    let window: u64 = redis::cmd("GET")
        .arg(&window_key)
        .query_async::<Option<u64>>(&mut connection)
        .await?
        .unwrap_or(1);
    let prefix = store::settle_prefix(tenant, window);
    let snapshot_key = |counter: &str| format!("{prefix}:c:{counter}");

    // 1. Cut.
    let cut_script = redis::Script::new(CUT_SCRIPT);
    let mut cut = cut_script.prepare_invoke();
    cut.key(format!("{prefix}:cut"));
    for rule in rules {
        cut.key(store::unsettled_key(tenant, &rule.counter))
            .key(snapshot_key(&rule.counter));
    }
    cut.invoke_async::<i64>(&mut connection).await?;

    // 2. Plan (once).
    let plan_key = format!("{prefix}:plan");
    let existing: Option<Vec<u8>> = redis::cmd("GET")
        .arg(&plan_key)
        .query_async(&mut connection)
        .await?;
    let plan_bytes = match existing {
        Some(bytes) => bytes,
        None => {
            let mut entries: Vec<Settlement> = Vec::new();
            let mut carries: Vec<(String, String, u64)> = Vec::new();
            for rule in rules {
                let mut points: Vec<(String, u64)> = redis::cmd("HGETALL")
                    .arg(snapshot_key(&rule.counter))
                    .query_async(&mut connection)
                    .await?;
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
                        carries.push((store::unsettled_key(tenant, &rule.counter), player_hex, remainder));
                    }
                }
            }
            let expires_at = view.height() + EXPIRY_HORIZON_BLOCKS_MAX;
            let transactions: Vec<Transaction> = entries
                .chunks(SETTLEMENT_ENTRIES_MAX)
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
            let plan_script = redis::Script::new(PLAN_SCRIPT);
            let mut plan = plan_script.prepare_invoke();
            plan.key(&plan_key).arg(bytes.as_slice());
            for (key, field, amount) in &carries {
                plan.key(key).arg(field).arg(*amount);
            }
            plan.invoke_async::<i64>(&mut connection).await?;
            redis::cmd("GET")
                .arg(&plan_key)
                .query_async::<Vec<u8>>(&mut connection)
                .await?
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

    // 4. Advance, and let the window's keys age out.
    let advanced: i64 = redis::Script::new(ADVANCE_SCRIPT)
        .key(&window_key)
        .arg(window)
        .arg(window + 1)
        .invoke_async(&mut connection)
        .await?;
    if advanced == 1 {
        metrics::counter!(m::SETTLEMENTS_TOTAL).increment(1);
        metrics::counter!(m::SETTLEMENT_ENTRIES_TOTAL).increment(u64::from(entries));
        let mut pipe = redis::pipe();
        for rule in rules {
            pipe.del(snapshot_key(&rule.counter)).ignore();
        }
        pipe.expire(&plan_key, 86_400).ignore();
        pipe.expire(format!("{prefix}:cut"), 86_400).ignore();
        pipe.query_async::<()>(&mut connection).await?;
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
    fn settlement_event_ids_differ_by_tenant_window_and_chunk() {
        let a = settlement_event_id(TenantId(1), 1, 0);
        assert_eq!(a, settlement_event_id(TenantId(1), 1, 0));
        assert_ne!(a, settlement_event_id(TenantId(2), 1, 0));
        assert_ne!(a, settlement_event_id(TenantId(1), 2, 0));
        assert_ne!(a, settlement_event_id(TenantId(1), 1, 1));
    }
}
