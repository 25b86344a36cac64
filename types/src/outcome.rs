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
    /// `Outcome::Applied` in MessagePack as rmp-serde writes it (a unit variant is its name,
    /// `applied`, as a fixstr): written directly where outcomes are hashed by the million.
    pub const APPLIED_MSGPACK: &'static [u8] = b"\xa7applied";

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

impl Receipt {
    /// Longest encoding [`Receipt::encode_applied`] writes: the array's header, the tenant as a
    /// 64-bit integer, the event id as a 16-byte bin, the height as a 64-bit integer, the
    /// outcome, the flag.
    pub const APPLIED_ENCODED_MAX: usize = 1 + 9 + 18 + 9 + Outcome::APPLIED_MSGPACK.len() + 1;

    /// The receipt's MessagePack, the same bytes as rmp-serde's (a 5-element array), written
    /// without the serializer when its outcome is `Applied`, by far the commonest; returns its
    /// length, or `None` for any other outcome (encode those with rmp-serde).
    pub fn encode_applied(&self, out: &mut [u8; Receipt::APPLIED_ENCODED_MAX]) -> Option<usize> {
        if self.outcome != Outcome::Applied {
            return None;
        }
        out[0] = 0x95;
        let mut at = write_uint(out, 1, self.tenant.0);
        out[at] = 0xc4;
        out[at + 1] = 16;
        out[at + 2..at + 18].copy_from_slice(&self.event_id.0);
        at = write_uint(out, at + 18, self.height);
        out[at..at + Outcome::APPLIED_MSGPACK.len()].copy_from_slice(Outcome::APPLIED_MSGPACK);
        at += Outcome::APPLIED_MSGPACK.len();
        out[at] = if self.duplicate { 0xc3 } else { 0xc2 };
        Some(at + 1)
    }
}

/// Writes `value` at `out[at..]` as MessagePack's shortest unsigned integer (rmp's choice);
/// returns the position after it.
fn write_uint(out: &mut [u8], at: usize, value: u64) -> usize {
    let bytes = value.to_be_bytes();
    let (marker, width) = match value {
        0..=0x7f => {
            out[at] = value as u8;
            return at + 1;
        }
        0x80..=0xff => (0xcc, 1),
        0x100..=0xffff => (0xcd, 2),
        0x1_0000..=0xffff_ffff => (0xce, 4),
        _ => (0xcf, 8),
    };
    out[at] = marker;
    out[at + 1..at + 1 + width].copy_from_slice(&bytes[8 - width..]);
    at + 1 + width
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn applied_is_encoded_as_rmp_serde_encodes_it() {
        assert_eq!(
            rmp_serde::to_vec(&Outcome::Applied).unwrap(),
            Outcome::APPLIED_MSGPACK
        );
    }

    /// Integers on both sides of every MessagePack width, and the flag both ways.
    #[test]
    fn an_applied_receipt_is_encoded_as_rmp_serde_encodes_it_at_every_width() {
        let edges = [
            0,
            1,
            0x7f,
            0x80,
            0xff,
            0x100,
            0xffff,
            0x1_0000,
            0xffff_ffff,
            0x1_0000_0000,
            u64::MAX,
        ];
        for tenant in edges {
            for height in edges {
                for duplicate in [false, true] {
                    let receipt = Receipt {
                        tenant: TenantId(tenant),
                        event_id: EventId::from_u128(u128::from(tenant) << 64 | u128::from(height)),
                        height,
                        outcome: Outcome::Applied,
                        duplicate,
                    };
                    let mut out = [0; Receipt::APPLIED_ENCODED_MAX];
                    let length = receipt.encode_applied(&mut out).expect("applied");
                    assert_eq!(
                        &out[..length],
                        rmp_serde::to_vec(&receipt).unwrap(),
                        "{receipt:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn other_outcomes_are_left_to_the_serializer() {
        let mut receipt = Receipt {
            tenant: TenantId(1),
            event_id: EventId::from_u128(2),
            height: 3,
            outcome: Outcome::rejected(Rejection::Expired),
            duplicate: false,
        };
        let mut out = [0; Receipt::APPLIED_ENCODED_MAX];
        assert_eq!(receipt.encode_applied(&mut out), None);
        receipt.outcome = Outcome::Settled { entries: vec![None] };
        assert_eq!(receipt.encode_applied(&mut out), None);
    }

    proptest! {
        #[test]
        fn any_applied_receipt_is_encoded_as_rmp_serde_encodes_it(
            tenant: u64, event: u128, height: u64, duplicate: bool,
        ) {
            let receipt = Receipt {
                tenant: TenantId(tenant),
                event_id: EventId::from_u128(event),
                height,
                outcome: Outcome::Applied,
                duplicate,
            };
            let mut out = [0; Receipt::APPLIED_ENCODED_MAX];
            let length = receipt.encode_applied(&mut out).expect("applied");
            prop_assert_eq!(&out[..length], &rmp_serde::to_vec(&receipt).unwrap()[..]);
        }
    }
}
