//! [`EventHandle`]: the caller's view of one asset event in flight.

use hoard_types::EventId;
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::model::Committed;

/// One asset event submitted through the client. The event goes on (and is retried across
/// reconnects) whether or not the handle is kept; dropping it only stops you from learning the
/// outcome here (use [`crate::Client::event_status`] later).
#[derive(Debug)]
pub struct EventHandle {
    event_id: EventId,
    accepted: Option<oneshot::Receiver<Result<()>>>,
    accepted_result: Option<Result<()>>,
    committed: oneshot::Receiver<Result<Committed>>,
}

impl EventHandle {
    pub(crate) fn new(
        event_id: EventId,
        accepted: oneshot::Receiver<Result<()>>,
        committed: oneshot::Receiver<Result<Committed>>,
    ) -> EventHandle {
        EventHandle {
            event_id,
            accepted: Some(accepted),
            accepted_result: None,
            committed,
        }
    }

    /// The event's id (deduplicated by the ledger: it takes effect at most once).
    pub fn event_id(&self) -> EventId {
        self.event_id
    }

    /// Resolves once the gateway has stored the event durably: from then on it reaches the chain
    /// exactly once, even if the gateway crashes. Errors: final refusals (bad signature,
    /// forbidden, ...), [`Error::Expired`], [`Error::OutcomeUnknown`], [`Error::Closed`],
    /// [`Error::AuthRefused`] (credentials refused at a reconnect). The last two do not mean that
    /// no gateway received the event: it may have applied, or may still apply until its expiry
    /// height.
    ///
    /// Cancel-safe: it may be raced against a timeout and called again.
    pub async fn accepted(&mut self) -> Result<()> {
        if let Some(receiver) = self.accepted.as_mut() {
            let result = receiver.await.unwrap_or(Err(Error::Closed));
            self.accepted = None;
            self.accepted_result = Some(result);
        }
        self.accepted_result.clone().unwrap_or(Err(Error::Closed))
    }

    /// Resolves when the event committed: the height and the outcome, or [`Error::Rejected`] with
    /// the ledger's reason, or [`Error::Expired`] if it never applied and never can. Survives
    /// reconnects. If the expiry height passed before the outcome could be learnt after the
    /// event reached a gateway, [`Error::OutcomeUnknown`]: it may have applied (check the chain
    /// state before doing it again). [`Error::Closed`] if the client closed first, or
    /// [`Error::AuthRefused`] if it closed because a reconnect's authentication was refused: the
    /// event may have applied, or may still apply until its expiry height.
    pub async fn committed(self) -> Result<Committed> {
        self.committed.await.unwrap_or(Err(Error::Closed))
    }
}
