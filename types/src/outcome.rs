//! What happened to a transaction: applied, or rejected for a typed reason.
//!
//! Business outcomes are values, not errors: the state machine returns an [`Outcome`] for
//! every transaction in a block, and clients match on [`Rejection`].

use serde::{Deserialize, Serialize};

use crate::asset::{EventId, TenantId};

/// Why a transaction (or one settlement entry) was not applied. On the wire: the snake_case
/// variant name as a MessagePack string (`"insufficient_funds"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum Rejection {
    #[error("the payload could not be decoded or breaks a limit")]
    Malformed,
    #[error("the transaction is for another chain")]
    WrongChain,
    #[error("a signature does not verify")]
    BadSignature,
    #[error("a required signature is missing, or an extra one is present")]
    MissingSignature,
    #[error("the signer belongs to another tenant")]
    WrongTenant,
    #[error("the signer may not do this")]
    Unauthorized,
    #[error("the expiry height has passed")]
    Expired,
    #[error("the expiry height is further ahead than the deduplication window")]
    ExpiryTooFar,
    #[error("no such tenant")]
    UnknownTenant,
    #[error("the tenant already exists")]
    TenantExists,
    #[error("no such account in this tenant")]
    UnknownAccount,
    #[error("the account already exists")]
    AccountExists,
    #[error("no such currency in this tenant")]
    UnknownCurrency,
    #[error("the currency already exists")]
    CurrencyExists,
    #[error("no such item class in this tenant")]
    UnknownClass,
    #[error("the item class already exists")]
    ClassExists,
    #[error("no such item in this tenant")]
    UnknownItem,
    #[error("an item with this id already exists")]
    ItemExists,
    #[error("the account does not own this item")]
    NotOwner,
    #[error("the balance is too low")]
    InsufficientFunds,
    #[error("the stack holds fewer units than asked for")]
    InsufficientQuantity,
    #[error("the mint would exceed the maximum supply")]
    SupplyExceeded,
    #[error("the class is not stackable, or a stack was used where a unique item is needed")]
    NotStackable,
    #[error("the items are of different classes")]
    ClassMismatch,
    #[error("an amount is zero, or an item appears twice")]
    InvalidAmount,
    #[error("an account cannot trade with or transfer to itself")]
    SelfTransfer,
    /// Not remembered: the same event may be submitted again once older events expired.
    #[error("the tenant's deduplication window is full; retry the same event later")]
    WindowFull,
}

/// The result of one transaction.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Applied whole.
    Applied,
    /// A batched settlement: each entry's result, in entry order (`None` = applied).
    Settled { entries: Vec<Option<Rejection>> },
    /// Not applied; nothing changed.
    Rejected { reason: Rejection },
}

impl Outcome {
    pub fn rejected(reason: Rejection) -> Outcome {
        Outcome::Rejected { reason }
    }

    pub fn is_applied(&self) -> bool {
        !matches!(self, Outcome::Rejected { .. })
    }
}

/// What a block says about one of its transactions.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Receipt {
    pub tenant: TenantId,
    pub event_id: EventId,
    /// The height at which the event first took effect (earlier than the block's own height
    /// when this transaction was a duplicate).
    pub height: u64,
    pub outcome: Outcome,
    /// True when the event had been seen before; the outcome is the original one.
    pub duplicate: bool,
}
