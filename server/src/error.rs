//! The gateway's operating errors. Protocol errors sent to clients are `hoard_types::wire::ErrorCode`s;
//! business outcomes of events are `hoard_types::Outcome`s. These are failures of the gateway itself.

/// What can go wrong running the gateway.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
    #[error("chain: {0}")]
    Chain(#[from] crate::chain::ChainError),
    #[error("ledger: {0}")]
    Ledger(#[from] hoard_ledger::LedgerError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("metrics: {0}")]
    Metrics(String),
}

pub type Result<T, E = ServerError> = std::result::Result<T, E>;
