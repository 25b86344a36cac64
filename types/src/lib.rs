//! Hoard's shared vocabulary, used by the ledger, the gateway and the SDK.
//!
//! Layout:
//! - [`crypto`]: ed25519 keys and signatures, SHA-256 hashes, batch verification.
//! - [`asset`]: tenants, currencies, item classes, items, amounts, event ids.
//! - [`tx`]: transactions, their signed payload and bodies.
//! - [`outcome`]: outcomes and typed rejection reasons.
//! - [`constants`]: every shared limit.
//! - [`wire`]: the gateway protocol v1 (messages, limits, session tokens, close codes).
//!
//! This crate is an API boundary: the SDK depends on it and on nothing of the ledger's.

pub mod asset;
pub mod constants;
pub mod crypto;
pub mod error;
pub mod outcome;
pub mod tx;
pub mod wire;

pub use asset::{
    Amount, Asset, ClassId, CurrencyId, Custody, EventId, Grant, Item, ItemId, ItemKind, TenantId,
};
pub use crypto::{Hash, Keypair, PublicKey, Signature};
pub use error::{Error, Result};
pub use outcome::{Outcome, Receipt, Rejection};
pub use tx::{Settlement, SwapSide, Transaction, TxBody, TxPayload, TxSignature};
