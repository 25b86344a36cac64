//! The gateway's committed view of the chain: its own `hoard_ledger::Ledger`, fed by following
//! committed blocks (`Ledger::apply_block` re-executes each one and checks every root), plus a
//! bounded recent history per item. Reads are answered from here; the follower also hands each
//! receipt to the event pipeline (commit notifications, XACK) and to subscriptions, in commit order.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};

use futures::StreamExt;

use hoard_ledger::{Genesis, Ledger};
use hoard_types::wire::{ItemEvent, ItemEventKind, ITEM_HISTORY_ENTRIES_MAX};
use hoard_types::{Asset, Grant, ItemId, Outcome, PublicKey, Rejection, TenantId, TxBody, TxPayload};

use crate::chain::Chain;
use crate::constants::ITEM_HISTORIES_MAX;
use crate::events::Events;
use crate::hub::Hub;
use crate::metrics::{self as m, Health};

/// The committed state as this gateway knows it.
pub struct ChainView {
    ledger: RwLock<Ledger>,
    history: Mutex<ItemHistory>,
    height: tokio::sync::watch::Sender<u64>,
}

#[derive(Default)]
struct ItemHistory {
    entries: HashMap<(TenantId, ItemId), VecDeque<ItemEvent>>,
    /// First-seen order, for evicting the oldest item when over [`ITEM_HISTORIES_MAX`].
    order: VecDeque<(TenantId, ItemId)>,
}

impl ChainView {
    pub fn new(genesis: &Genesis) -> ChainView {
        ChainView {
            ledger: RwLock::new(Ledger::new(genesis)),
            history: Mutex::new(ItemHistory::default()),
            height: tokio::sync::watch::channel(0).0,
        }
    }

    /// Runs `read` on the committed ledger.
    pub fn read<T>(&self, read: impl FnOnce(&Ledger) -> T) -> T {
        read(&self.ledger.read().expect("ledger lock"))
    }

    pub fn height(&self) -> u64 {
        *self.height.borrow()
    }

    /// A receiver that changes whenever a block is applied.
    pub fn watch_height(&self) -> tokio::sync::watch::Receiver<u64> {
        self.height.subscribe()
    }

    /// The recent history of an item, oldest first.
    pub fn item_history(&self, tenant: TenantId, item: ItemId) -> Vec<ItemEvent> {
        let history = self.history.lock().expect("history lock");
        history
            .entries
            .get(&(tenant, item))
            .map(|h| h.iter().cloned().collect())
            .unwrap_or_default()
    }

    fn record(&self, tenant: TenantId, item: ItemId, event: ItemEvent) {
        let mut history = self.history.lock().expect("history lock");
        let key = (tenant, item);
        if !history.entries.contains_key(&key) {
            history.order.push_back(key);
            while history.order.len() > ITEM_HISTORIES_MAX {
                if let Some(old) = history.order.pop_front() {
                    history.entries.remove(&old);
                }
            }
        }
        let entries = history.entries.entry(key).or_default();
        entries.push_back(event);
        while entries.len() > ITEM_HISTORY_ENTRIES_MAX {
            entries.pop_front();
        }
    }
}

/// The accounts a transaction touches (for account subscriptions).
pub fn touched_accounts(body: &TxBody) -> Vec<PublicKey> {
    match body {
        TxBody::RegisterTenant { .. } | TxBody::DefineCurrency { .. } | TxBody::DefineItemClass { .. } => {
            vec![]
        }
        TxBody::RegisterAccount { account, .. } => vec![*account],
        TxBody::Mint { to, .. } => vec![*to],
        TxBody::Transfer { from, to, .. } => vec![*from, *to],
        TxBody::Burn { from, .. } => vec![*from],
        TxBody::Split { owner, .. } | TxBody::Merge { owner, .. } => vec![*owner],
        TxBody::Swap { left, right } => vec![left.account, right.account],
        TxBody::Settle { entries } => entries.iter().map(|e| e.to).collect(),
    }
}

/// The transaction kind, as a metric label.
pub fn kind_of(body: &TxBody) -> &'static str {
    match body {
        TxBody::RegisterTenant { .. } => "register_tenant",
        TxBody::RegisterAccount { .. } => "register_account",
        TxBody::DefineCurrency { .. } => "define_currency",
        TxBody::DefineItemClass { .. } => "define_item_class",
        TxBody::Mint { .. } => "mint",
        TxBody::Transfer { .. } => "transfer",
        TxBody::Burn { .. } => "burn",
        TxBody::Split { .. } => "split",
        TxBody::Merge { .. } => "merge",
        TxBody::Swap { .. } => "swap",
        TxBody::Settle { .. } => "settle",
    }
}

/// What an applied transaction did to items: (item, kind, from, to).
fn item_changes(
    body: &TxBody,
    outcome: &Outcome,
) -> Vec<(ItemId, ItemEventKind, Option<PublicKey>, Option<PublicKey>)> {
    let items = |assets: &[Asset]| -> Vec<ItemId> {
        assets
            .iter()
            .filter_map(|a| match a {
                Asset::Item { item } => Some(*item),
                Asset::Currency { .. } => None,
            })
            .collect()
    };
    let granted = |grant: &Grant| match grant {
        Grant::Unique { item, .. } | Grant::Stack { item, .. } => Some(*item),
        Grant::Currency { .. } => None,
    };
    match body {
        TxBody::Mint { to, grant } => granted(grant)
            .map(|i| vec![(i, ItemEventKind::Minted, None, Some(*to))])
            .unwrap_or_default(),
        TxBody::Settle { entries } => {
            let results = match outcome {
                Outcome::Settled { entries } => entries.clone(),
                _ => vec![None; entries.len()],
            };
            entries
                .iter()
                .zip(results)
                .filter(|(_, result)| result.is_none())
                .filter_map(|(e, _)| granted(&e.grant).map(|i| (i, ItemEventKind::Settled, None, Some(e.to))))
                .collect()
        }
        TxBody::Transfer { from, to, assets } => items(assets)
            .into_iter()
            .map(|i| (i, ItemEventKind::Transferred, Some(*from), Some(*to)))
            .collect(),
        TxBody::Burn { from, assets } => items(assets)
            .into_iter()
            .map(|i| (i, ItemEventKind::Burned, Some(*from), None))
            .collect(),
        TxBody::Split {
            owner,
            item,
            new_item,
            ..
        } => vec![
            (*item, ItemEventKind::Split, Some(*owner), Some(*owner)),
            (*new_item, ItemEventKind::Split, None, Some(*owner)),
        ],
        TxBody::Merge { owner, into, from } => vec![
            (*from, ItemEventKind::Merged, Some(*owner), None),
            (*into, ItemEventKind::Merged, Some(*owner), Some(*owner)),
        ],
        TxBody::Swap { left, right } => {
            let mut changes: Vec<_> = items(&left.gives)
                .into_iter()
                .map(|i| (i, ItemEventKind::Swapped, Some(left.account), Some(right.account)))
                .collect();
            changes.extend(
                items(&right.gives)
                    .into_iter()
                    .map(|i| (i, ItemEventKind::Swapped, Some(right.account), Some(left.account))),
            );
            changes
        }
        _ => vec![],
    }
}

/// Follows the chain from the view's height, applies each block, and dispatches its receipts.
/// Returns when the chain stream ends or diverges (the gateway then stops being ready).
pub async fn follow(
    view: Arc<ChainView>,
    chain: Arc<dyn Chain>,
    events: Arc<Events>,
    hub: Arc<Hub>,
    health: Arc<Health>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let from = view.height() + 1;
    let mut blocks = chain.follow(from);
    health.chain_ok.store(true, Ordering::Relaxed);
    loop {
        let next = tokio::select! {
            next = blocks.next() => next,
            _ = crate::stopped(&mut shutdown) => break,
        };
        let block = match next {
            Some(Ok(block)) => block,
            Some(Err(error)) => {
                tracing::error!(%error, "chain follower stopped");
                break;
            }
            None => break,
        };
        let receipts = {
            let mut ledger = view.ledger.write().expect("ledger lock");
            match ledger.apply_block(&block) {
                Ok(receipts) => receipts,
                Err(error) => {
                    tracing::error!(%error, "the gateway's ledger copy diverged from the chain");
                    break;
                }
            }
        };
        let height = block.header.height;
        let mut economy_tenants = std::collections::BTreeSet::new();
        for (tx, receipt) in block.transactions.iter().zip(&receipts) {
            let Ok(payload) = tx.decode_payload() else {
                continue;
            };
            let TxPayload {
                tenant,
                event_id,
                body,
                ..
            } = payload;
            let kind = kind_of(&body);
            if !receipt.duplicate && receipt.outcome.is_applied() {
                view.read(|ledger| m::record_applied(ledger, tenant, kind, &body));
                economy_tenants.insert(tenant);
                for (item, event_kind, from, to) in item_changes(&body, &receipt.outcome) {
                    view.record(
                        tenant,
                        item,
                        ItemEvent {
                            height,
                            event_id,
                            kind: event_kind,
                            from,
                            to,
                        },
                    );
                }
            }
            events.on_receipt(receipt, kind);
            // `window_full` is not final (the gateway resubmits the event): nothing to publish.
            if !receipt.duplicate && receipt.outcome != Outcome::rejected(Rejection::WindowFull) {
                let touched = touched_accounts(&body);
                hub.publish(tenant, height, event_id, &body, &receipt.outcome, touched);
            }
        }
        view.read(|ledger| economy_tenants.iter().for_each(|t| m::record_supply(ledger, *t)));
        view.height.send_replace(height);
        metrics::gauge!(m::CHAIN_HEIGHT).set(height as f64);
    }
    health.chain_ok.store(false, Ordering::Relaxed);
}
