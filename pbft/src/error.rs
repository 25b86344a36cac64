//! The one error type of the consensus core.
//!
//! Errors from handling a message are sorted by what they mean: `Stale` is normal (debug log),
//! `Byzantine`-class errors (bad signature, malformed, equivocation, invalid certificate) say a
//! peer misbehaved (warn + metric), `App` says the state machine failed.

/// What went wrong handling an input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(&'static str),
    #[error("message too large: {size} bytes, the limit is {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("unknown replica {0}")]
    UnknownReplica(u32),
    #[error("bad signature from replica {0}")]
    BadSignature(u32),
    #[error("stale or out-of-window message: {0}")]
    Stale(&'static str),
    #[error("invalid certificate: {0}")]
    InvalidCertificate(&'static str),
    #[error("protocol violation by replica {replica}: {what}")]
    Violation { replica: u32, what: &'static str },
    #[error("request rejected: {0}")]
    Request(&'static str),
    #[error("state machine: {0}")]
    App(String),
}

impl Error {
    /// Whether the error is ordinary (a late, duplicate or out-of-window message) rather than
    /// a sign of a faulty peer.
    pub fn is_stale(&self) -> bool {
        matches!(self, Error::Stale(_))
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
