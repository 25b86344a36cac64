//! Errors of the shared types: decoding and signature checks.

/// What can go wrong when decoding or checking Hoard's shared types.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("malformed: {0}")]
    Malformed(&'static str),
    #[error("bad signature")]
    BadSignature,
    #[error("too large: {what} is {size} bytes, the limit is {limit}")]
    TooLarge {
        what: &'static str,
        size: usize,
        limit: usize,
    },
    #[error("decode: {0}")]
    Decode(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
