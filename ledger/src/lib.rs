//! The Hoard sidechain's ledger: the asset state machine every replica runs, its Merkle
//! commitment, blocks, and storage.
//!
//! Layout:
//! - [`state`]: the deterministic asset state machine ([`Ledger`]): tenants, accounts,
//!   currencies, item classes, items, swaps, settlements, the deduplication window. Pure: no
//!   I/O, clock or randomness.
//! - [`prefetch`]: loading the state's scattered memory ahead of use (hints only).
//! - [`merkle`]: the incremental bucketed Merkle tree behind the state root, and proofs.
//! - [`block`]: block headers, blocks, list roots over transactions and receipts.
//! - [`genesis`]: the genesis file (chain id, operator key, initial tenants).
//! - [`error`]: operating errors (business rejections are `hoard_types::Outcome`s, not errors).

pub mod alloc;
pub mod app;
pub mod block;
pub mod client;
pub mod cluster;
pub mod error;
pub mod genesis;
pub mod merkle;
pub mod net;
pub mod node;
pub mod prefetch;
pub mod sha256x2;
pub mod sim;
pub mod state;
pub mod store;
pub mod testing;

pub use block::{Block, BlockHeader};
pub use error::{LedgerError, Result};
pub use genesis::{Genesis, GenesisTenant};
pub use state::{ClassInfo, CurrencyInfo, Ledger, RecordedOutcome, SnapshotView, StateKey, TenantInfo};
