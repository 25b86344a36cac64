//! The typed values the client returns: the session, read answers, event results, activity and
//! offer updates. Plain data, no behaviour beyond small accessors.

use hoard_types::wire::{EventState, ItemEvent, OfferCloseReason, OfferInfo, Role};
use hoard_types::{
    Amount, CurrencyId, Custody, EventId, Hash, Item, ItemId, Outcome, PublicKey, Rejection, TenantId, TxBody,
};

/// Who this client is, as the gateway confirmed on the first connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    /// The chain the gateway serves (every transaction names it).
    pub chain_id: u64,
    /// The tenant the client acts in.
    pub tenant: TenantId,
    /// Studio or player.
    pub role: Role,
    /// The player's account (players only).
    pub account: Option<PublicKey>,
    /// The player's custody, if the account was registered when the client connected.
    pub custody: Option<Custody>,
}

/// An asset event that committed and took effect (`committed().await`). A ledger rejection is
/// [`crate::Error::Rejected`] instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Committed {
    /// The event's id.
    pub event_id: EventId,
    /// The height of the block in which the event first took effect.
    pub height: u64,
    /// `Applied`, or `Settled` with one result per settlement entry.
    pub outcome: Outcome,
}

impl Committed {
    /// For a settlement: the rejection of each entry (`None` = applied). Empty otherwise.
    pub fn settlement_entries(&self) -> &[Option<Rejection>] {
        match &self.outcome {
            Outcome::Settled { entries } => entries,
            _ => &[],
        }
    }
}

/// One committed event pushed to a subscription.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Activity {
    /// A block height.
    pub height: u64,
    /// The event's id.
    pub event_id: EventId,
    /// What the event did.
    pub body: TxBody,
    /// How it went (`Applied`, `Settled` per entry, or `Rejected`).
    pub outcome: Outcome,
}

/// The committed chain head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    /// The chain's id.
    pub chain_id: u64,
    /// A block height.
    pub height: u64,
    /// The head block's hash.
    pub block_hash: Hash,
    /// The Merkle root of the state after the head block.
    pub state_root: Hash,
    /// The head block's timestamp (Unix milliseconds, from its proposer).
    pub timestamp_ms: u64,
}

/// An account's currency balances at `height`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Balances {
    /// The account read.
    pub account: PublicKey,
    /// A block height.
    pub height: u64,
    /// None when the account is not registered.
    pub custody: Option<Custody>,
    /// Every non-zero balance.
    pub balances: Vec<(CurrencyId, Amount)>,
}

impl Balances {
    /// The balance of one currency (zero if absent).
    pub fn of(&self, currency: &CurrencyId) -> Amount {
        self.balances
            .iter()
            .find(|(id, _)| id == currency)
            .map(|(_, amount)| *amount)
            .unwrap_or(Amount::ZERO)
    }
}

/// An account's items at `height`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inventory {
    /// The account read.
    pub account: PublicKey,
    /// A block height.
    pub height: u64,
    /// Every item the account owns.
    pub items: Vec<(ItemId, Item)>,
}

/// An item, its owner and its recent history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ItemInfo {
    /// The item asked for.
    pub item_id: ItemId,
    /// A block height.
    pub height: u64,
    /// None if the item does not exist (never minted, or burned).
    pub item: Option<Item>,
    /// Newest last, at most 32 entries.
    pub history: Vec<ItemEvent>,
}

/// Where an event is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventStatus {
    /// The event's id.
    pub event_id: EventId,
    /// `Unknown`, `Pending` (accepted, not committed) or `Committed`.
    pub state: EventState,
    /// The commit height, once committed.
    pub height: Option<u64>,
    /// The outcome, once committed.
    pub outcome: Option<Outcome>,
}

/// A click counter's totals.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CounterTotals {
    /// The counter's name.
    pub counter: String,
    /// Over all players.
    pub total: u64,
    /// The asked player's total, if a player was given.
    pub player_total: Option<u64>,
}

/// A settlement window the gateway cut on `settle_clicks`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SettlementWindow {
    /// The settlement window's number.
    pub window: u64,
    /// The `settle` events submitted (none when nothing was due). Follow them with
    /// [`crate::Client::event_status`] or a subscription.
    pub event_ids: Vec<EventId>,
    /// Settlement entries (players credited) in the window.
    pub entries: u32,
}

/// Something that happened to an offer made to or by this player.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OfferUpdate {
    /// An offer was made to this player.
    Received(OfferInfo),
    /// An offer closed (accepted, cancelled or expired).
    Closed {
        /// The offer (its swap's event id).
        offer_id: EventId,
        /// Accepted, cancelled or expired.
        reason: OfferCloseReason,
    },
}
