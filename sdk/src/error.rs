//! The SDK's errors: one enum with structured fields, a small `Copy` [`ErrorKind`] to match on, and
//! [`Error::is_retryable`] telling whether trying the same thing again later can help.
//!
//! Ledger rejections (insufficient funds, not owner, ...) arrive as [`Error::Rejected`] carrying a
//! [`Rejection`], so a game can `match` on the reason. They are final: the event committed as a
//! rejection and will never apply.

use std::time::Duration;

use hoard_types::wire::{ErrorCode, OfferCloseReason};
use hoard_types::{EventId, Rejection};

/// The SDK's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong when talking to Hoard.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The URL is not a `ws://` or `wss://` URL (or a `host:port`).
    #[error("invalid gateway url `{url}`: {reason}")]
    InvalidUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A `wss://` URL, but this build has no TLS support (terminate TLS in front of the client, or
    /// build tokio-tungstenite with a TLS feature).
    #[error("wss:// needs TLS support, which this build does not include")]
    TlsUnsupported,
    /// An argument is out of range (counter name, click count, limits); nothing was sent.
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
    /// The operation must be signed by a key this client does not hold.
    #[error("no signing key: {0}")]
    MissingKey(&'static str),
    /// The gateway could not be reached, or the connection broke. Retryable.
    #[error("connection failed: {0}")]
    Connection(String),
    /// The connection broke while this request (which cannot be replayed safely) was outstanding:
    /// its effect is unknown. Retryable after checking (for example `offers()` after `offer`).
    #[error("the connection was lost while the request was outstanding")]
    ConnectionLost,
    /// No answer within the request timeout. Retryable.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The gateway refused the credentials (bad signature, expired token, unknown tenant). Final.
    ///
    /// From [`Client::connect`](crate::Client::connect), nothing was sent. At a reconnect (a
    /// session token that expired since the client connected, a tenant or key no longer
    /// configured) the refusal closes the client: everything outstanding then fails with this
    /// error (later calls with [`Error::Closed`]), and clicks still held are dropped (see
    /// [`Client::close`](crate::Client::close)).
    ///
    /// For an asset event still in flight, this says nothing about the event, exactly as with
    /// [`Error::Closed`]: the client holds it until it knows its outcome, so an event that reached
    /// a gateway before the refusal (its `accepted()` resolved, or it was sent and the connection
    /// broke before an answer) may have applied, or may still apply until its expiry height (an
    /// accepted event still reaches the chain). Only an event no gateway ever received is certain
    /// never to apply, and the error does not tell the two apart (an `accepted()` that fails with
    /// this error does not mean that no gateway received the event). It is not reported as
    /// [`Error::OutcomeUnknown`], which promises that the event can no longer apply. Follow it
    /// with `event_status` from a client that can authenticate (the studio's) before doing it
    /// again under a new event id.
    #[error("authentication refused ({code:?}): {message}")]
    AuthRefused {
        /// The gateway's error code.
        code: ErrorCode,
        /// The gateway's explanation (for humans).
        message: String,
    },
    /// The gateway refused a request with an error code.
    #[error("the gateway refused the request ({code:?}): {message}")]
    Server {
        /// The gateway's error code.
        code: ErrorCode,
        /// The gateway's explanation (for humans).
        message: String,
        /// How long the gateway asked to wait before retrying.
        retry_after: Option<Duration>,
    },
    /// The ledger committed the event as a rejection at `height`: nothing changed. Final.
    #[error("event {event_id} was rejected at height {height}: {reason}")]
    Rejected {
        /// The event.
        event_id: EventId,
        /// The height at which it committed.
        height: u64,
        /// Why the ledger refused it.
        reason: Rejection,
    },
    /// The event's expiry height passed before this client ever handed it to a gateway (or every
    /// gateway that got it refused it): it never applied and never will. Final; doing it again
    /// under a new event id is safe.
    #[error("event {event_id} expired before it committed")]
    Expired {
        /// The event.
        event_id: EventId,
    },
    /// The event reached a gateway (it may have been accepted, or its answer was lost with the
    /// connection), but its expiry height passed before this client learnt its outcome, and the
    /// ledger forgets event ids after their expiry (`event_status` then answers `unknown` even
    /// for an event that committed). It **may or may not have applied**; it will not apply in the
    /// future. Final: before doing the same thing again under a new event id, check the chain
    /// state (balances, inventory, the item's or account's history, a subscription from an
    /// earlier height), or it may happen twice.
    #[error("the outcome of event {event_id} is unknown: it may have applied; it expired before its outcome was learnt")]
    OutcomeUnknown {
        /// The event.
        event_id: EventId,
    },
    /// The offer closed (cancelled, declined or expired) before it was accepted.
    #[error("offer {offer_id} closed: {reason:?}")]
    OfferClosed {
        /// The offer.
        offer_id: EventId,
        /// Why it closed.
        reason: OfferCloseReason,
    },
    /// The client was closed (by [`Client::close`](crate::Client::close), by dropping its last
    /// handle, by giving up reconnecting, or after credentials refused at a reconnect, which fail
    /// what was outstanding then with [`Error::AuthRefused`]); nothing more can be sent. Final.
    ///
    /// For an asset event still in flight, this says nothing about the event: if it was sent
    /// before the client closed, it may have applied, or may still apply until its expiry height
    /// (an accepted event still reaches the chain). Follow it with `event_status` from another
    /// client before doing it again under a new event id.
    #[error("the client is closed")]
    Closed,
    /// From [`Client::close`](crate::Client::close): the client closed, but `clicks` clicks (the
    /// sum of the `count`s of their `click` calls) were not acknowledged by the gateway. They
    /// were still buffered, or sent and not acknowledged, when the close timeout
    /// ([`ClientOptions::close_flush_timeout`](crate::ClientOptions::close_flush_timeout)) ran
    /// out, or they were dropped on the way (a connection lost under
    /// [`ClickDelivery::AtMostOnce`](crate::ClickDelivery::AtMostOnce), a frame the gateway
    /// refused); or the client had closed by itself (credentials refused at a reconnect,
    /// reconnect attempts exhausted) still holding them. Those never sent were not counted; those
    /// sent may or may not have been. The client is closed all the same. Final.
    #[error("the client closed with {clicks} clicks not acknowledged")]
    ClicksUnacknowledged {
        /// How many clicks were not acknowledged.
        clicks: u64,
    },
    /// The click buffer is full (the gateway is not acknowledging fast enough, or the connection is
    /// down). The click was not recorded. Retryable.
    #[error("the click buffer is full")]
    ClicksBackpressure,
    /// A subscription's consumer fell too far behind; the stream ended. Subscribe again with
    /// `from_height` = the last height you processed to continue without a gap.
    #[error("the subscription's consumer fell behind; last height delivered: {last_height:?}")]
    Lagged {
        /// The last height delivered (events of that height may be partly delivered).
        last_height: Option<u64>,
    },
    /// The gateway answered something the protocol does not allow here.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// Reading or writing a key file failed.
    #[error("key file: {0}")]
    Io(String),
}

/// What kind of failure an [`Error`] is: small and `Copy`, for `match`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A bad URL, argument or missing TLS support: fix the call.
    InvalidArgument,
    /// A key needed to sign is missing.
    MissingKey,
    /// The network: cannot connect, or the connection broke.
    Connection,
    /// No answer in time.
    Timeout,
    /// Credentials refused, at connect or at a reconnect (which closes the client). For an asset
    /// event in flight then, it says nothing about the event, as [`ErrorKind::Closed`]: if it
    /// reached a gateway it may have applied, or may still apply until its expiry height.
    Auth,
    /// The gateway refused the request with this code.
    Server(ErrorCode),
    /// The ledger rejected the event for this reason.
    Rejected(Rejection),
    /// The event can never apply: its expiry height passed (it never applied).
    Expired,
    /// The event may or may not have applied; its expiry height passed, so it will not apply
    /// later. Check the chain state before doing it again.
    OutcomeUnknown,
    /// The offer is closed.
    OfferClosed,
    /// The client is closed. For an asset event in flight then, it says nothing about the event:
    /// if it reached a gateway it may have applied, or may still apply until its expiry height.
    Closed,
    /// The client closed with clicks the gateway had not acknowledged.
    ClicksUnacknowledged,
    /// A bounded buffer is full.
    Backpressure,
    /// A subscription fell behind.
    Lagged,
    /// The gateway broke the protocol.
    Protocol,
    /// File I/O (key files).
    Io,
}

impl Error {
    /// The error's kind, to `match` on.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidUrl { .. } | Error::TlsUnsupported | Error::InvalidArgument(_) => {
                ErrorKind::InvalidArgument
            }
            Error::MissingKey(_) => ErrorKind::MissingKey,
            Error::Connection(_) | Error::ConnectionLost => ErrorKind::Connection,
            Error::Timeout(_) => ErrorKind::Timeout,
            Error::AuthRefused { .. } => ErrorKind::Auth,
            Error::Server { code, .. } => ErrorKind::Server(*code),
            Error::Rejected { reason, .. } => ErrorKind::Rejected(*reason),
            Error::Expired { .. } => ErrorKind::Expired,
            Error::OutcomeUnknown { .. } => ErrorKind::OutcomeUnknown,
            Error::OfferClosed { .. } => ErrorKind::OfferClosed,
            Error::Closed => ErrorKind::Closed,
            Error::ClicksUnacknowledged { .. } => ErrorKind::ClicksUnacknowledged,
            Error::ClicksBackpressure => ErrorKind::Backpressure,
            Error::Lagged { .. } => ErrorKind::Lagged,
            Error::Protocol(_) => ErrorKind::Protocol,
            Error::Io(_) => ErrorKind::Io,
        }
    }

    /// Whether doing the same thing again later can succeed (network trouble, timeouts, a busy or
    /// rate-limiting gateway, a full buffer). Ledger rejections, bad arguments, refused
    /// credentials, expired events, events of unknown outcome and a closed client (clicks left
    /// unacknowledged by `close` included) are final.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Connection(_) | Error::ConnectionLost | Error::Timeout(_) | Error::ClicksBackpressure => {
                true
            }
            Error::Server { code, .. } => code.is_retryable(),
            _ => false,
        }
    }

    /// The ledger's rejection reason, if this is a rejection.
    pub fn rejection(&self) -> Option<Rejection> {
        match self {
            Error::Rejected { reason, .. } => Some(*reason),
            _ => None,
        }
    }

    /// How long the gateway asked to wait before retrying, if it said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Server { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    pub(crate) fn server(code: ErrorCode, message: String, retry_after_ms: Option<u64>) -> Error {
        Error::Server {
            code,
            message,
            retry_after: retry_after_ms.map(Duration::from_millis),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_and_final_errors_are_told_apart() {
        assert!(Error::Connection("reset".into()).is_retryable());
        assert!(Error::Timeout(Duration::from_secs(1)).is_retryable());
        assert!(Error::server(ErrorCode::Busy, "x".into(), Some(5)).is_retryable());
        assert!(!Error::server(ErrorCode::Forbidden, "x".into(), None).is_retryable());
        let rejected = Error::Rejected {
            event_id: EventId::from_u128(1),
            height: 3,
            reason: Rejection::InsufficientFunds,
        };
        assert!(!rejected.is_retryable());
        assert_eq!(rejected.kind(), ErrorKind::Rejected(Rejection::InsufficientFunds));
        assert_eq!(rejected.rejection(), Some(Rejection::InsufficientFunds));
        assert_eq!(
            Error::server(ErrorCode::Busy, "x".into(), Some(5)).retry_after(),
            Some(Duration::from_millis(5))
        );
        assert!(!Error::Closed.is_retryable());
        let unknown = Error::OutcomeUnknown {
            event_id: EventId::from_u128(2),
        };
        assert!(!unknown.is_retryable());
        assert_eq!(unknown.kind(), ErrorKind::OutcomeUnknown);
        assert_eq!(Error::TlsUnsupported.kind(), ErrorKind::InvalidArgument);
        let unacknowledged = Error::ClicksUnacknowledged { clicks: 3 };
        assert!(!unacknowledged.is_retryable());
        assert_eq!(unacknowledged.kind(), ErrorKind::ClicksUnacknowledged);
        assert_eq!(
            unacknowledged.to_string(),
            "the client closed with 3 clicks not acknowledged"
        );
        let refused = Error::AuthRefused {
            code: ErrorCode::ExpiredToken,
            message: "expired".into(),
        };
        assert!(!refused.is_retryable());
        assert_eq!(refused.kind(), ErrorKind::Auth);
    }
}
