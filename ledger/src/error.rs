//! The ledger's operating errors. Business outcomes (insufficient funds, not owner, …) are not
//! errors: they are [`hoard_types::Outcome`] values returned per transaction.

/// What can go wrong operating the ledger (as opposed to a transaction being rejected).
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("block {height} does not follow the head (expected height {expected})")]
    OutOfOrder { height: u64, expected: u64 },
    #[error("block {height} diverged: {what} is {ours} here, the block says {theirs}")]
    Diverged {
        height: u64,
        what: &'static str,
        ours: hoard_types::Hash,
        theirs: hoard_types::Hash,
    },
    #[error("snapshot: {0}")]
    Snapshot(String),
    #[error("decode: {0}")]
    Decode(String),
    #[error("storage: {0}")]
    Storage(String),
}

pub type Result<T, E = LedgerError> = std::result::Result<T, E>;
