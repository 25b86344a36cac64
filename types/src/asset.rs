//! The asset vocabulary: tenants, currencies, item classes, items and amounts.

use std::fmt;

use compact_str::CompactString;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::constants::{CLASS_ID_BYTES_MAX, CURRENCY_SYMBOL_BYTES_MAX};
use crate::crypto::Hash;

/// A tenant: one studio (one game). Every state key is namespaced by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TenantId(pub u64);

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A client-chosen id, unique per tenant, that makes an asset event happen at most once.
/// On the wire: a 16-byte MessagePack bin.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EventId(#[serde(with = "crate::crypto::serde_bytes_array16")] pub [u8; 16]);

impl EventId {
    pub fn random() -> EventId {
        let mut bytes = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut bytes);
        EventId(bytes)
    }

    /// A deterministic id derived from a name (settlement windows use this, so that
    /// settling the same window twice is the same event).
    pub fn derive(parts: &[&[u8]]) -> EventId {
        let hash = Hash::of_parts(parts);
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&hash.0[..16]);
        EventId(bytes)
    }

    pub fn from_u128(value: u128) -> EventId {
        EventId(value.to_be_bytes())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ev:{}", self.to_hex())
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// An unsigned integer quantity of currency or of stacked items. No floating point anywhere:
/// `decimals` on a currency only tells clients where to put the point.
/// On the wire: a 16-byte big-endian MessagePack bin (u128 has no native MessagePack type).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Amount(pub u128);

impl Amount {
    pub const ZERO: Amount = Amount(0);

    pub fn checked_add(self, other: Amount) -> Option<Amount> {
        self.0.checked_add(other.0).map(Amount)
    }

    pub fn checked_sub(self, other: Amount) -> Option<Amount> {
        self.0.checked_sub(other.0).map(Amount)
    }

    pub fn is_zero(self) -> bool {
        self.0 == 0
    }
}

impl From<u128> for Amount {
    fn from(value: u128) -> Amount {
        Amount(value)
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl Serialize for Amount {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0.to_be_bytes())
    }
}

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Amount, D::Error> {
        let bytes: serde_bytes::ByteBuf = Deserialize::deserialize(deserializer)?;
        let array: [u8; 16] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| serde::de::Error::invalid_length(bytes.len(), &"16 bytes"))?;
        Ok(Amount(u128::from_be_bytes(array)))
    }
}

/// A currency's symbol, its id within a tenant: 1 to 16 bytes of `A-Z`, `0-9` and `_`.
/// Serialized as a string. Held inline up to 24 bytes (every valid symbol), so a decoded
/// transfer allocates nothing for it; a longer, invalid one (the ledger rejects it) on the heap.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CurrencyId(pub CompactString);

/// An item class's name, its id within a tenant: 1 to 32 bytes of `a-z`, `0-9`, `_` and `-`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ClassId(pub String);

impl CurrencyId {
    pub fn new(symbol: &str) -> CurrencyId {
        CurrencyId(CompactString::new(symbol))
    }

    pub fn is_valid(&self) -> bool {
        !self.0.is_empty()
            && self.0.len() <= CURRENCY_SYMBOL_BYTES_MAX
            && self
                .0
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
    }
}

impl ClassId {
    pub fn new(name: &str) -> ClassId {
        ClassId(name.to_owned())
    }

    pub fn is_valid(&self) -> bool {
        !self.0.is_empty()
            && self.0.len() <= CLASS_ID_BYTES_MAX
            && self
                .0
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    }
}

impl fmt::Debug for CurrencyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for CurrencyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ClassId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for ClassId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An item's id, chosen by whoever creates it (a mint or a split), unique within a tenant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ItemId(pub u64);

impl fmt::Display for ItemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Who signs for an account.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Custody {
    /// The player holds the key and signs their own transfers, burns and trades.
    SelfCustody,
    /// The studio signs for the account (players who never see a key).
    Custodial,
}

/// Something an account can give: an amount of a currency, or a whole item (unique or stack).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Asset {
    Currency { currency: CurrencyId, amount: Amount },
    Item { item: ItemId },
}

/// What a mint creates.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Grant {
    /// New units of a currency.
    Currency { currency: CurrencyId, amount: Amount },
    /// One unique item of a non-stackable class.
    Unique {
        class: ClassId,
        item: ItemId,
        attributes_hash: Hash,
    },
    /// A new stack of a stackable class (50 arrows).
    Stack {
        class: ClassId,
        item: ItemId,
        quantity: Amount,
    },
}

/// An item as the state holds it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Item {
    pub class: ClassId,
    pub owner: crate::crypto::PublicKey,
    pub kind: ItemKind,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemKind {
    Unique { attributes_hash: Hash },
    Stack { quantity: Amount },
}

impl Item {
    /// How many units of its class this item is: 1 for a unique item, the quantity for a stack.
    pub fn units(&self) -> Amount {
        match self.kind {
            ItemKind::Unique { .. } => Amount(1),
            ItemKind::Stack { quantity } => quantity,
        }
    }
}
