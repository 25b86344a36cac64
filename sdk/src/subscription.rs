//! [`Subscription`]: a `Stream` of committed activity that survives reconnects (it resumes from the
//! last height it delivered, removing duplicates) and unsubscribes when dropped.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::Stream;
use hoard_types::EventId;
use tokio::sync::mpsc;

use crate::error::{Error, Result};
use crate::model::Activity;

/// What the connection task and the stream share: why the stream ended, if not normally.
#[derive(Debug, Default)]
pub(crate) struct SubscriptionEnd {
    pub(crate) error: Mutex<Option<Error>>,
}

/// A live subscription. Yields `Ok(activity)` in commit order, without gaps or duplicates across
/// reconnects; ends with one `Err` if it cannot go on: its consumer lagged by more than the
/// subscription buffer ([`Error::Lagged`]), the gateway refused the resume for good, or the client
/// closed, was dropped or gave up reconnecting ([`Error::Closed`], or the error that closed it).
/// A resume refused for now (`busy`, `rate_limited`, `unavailable`, `shutting_down`) is retried
/// after the delay the gateway asks for, so it does not end the stream.
///
/// The "no gaps" guarantee holds only as far as the gateway's replay retention: it replays the
/// last 2048 committed events of the tenant. A resume (after a reconnect) from a height older
/// than that is refused with `not_found`, and the stream ends with
/// [`Error::Server`]`{ code: not_found, .. }`: subscribe again without `from_height` and read the
/// current state (`balances`, `inventory`) to continue.
#[derive(Debug)]
pub struct Subscription {
    pub(crate) local_id: u64,
    pub(crate) receiver: mpsc::Receiver<Activity>,
    pub(crate) end: Arc<SubscriptionEnd>,
    pub(crate) unsubscribe: mpsc::UnboundedSender<u64>,
    pub(crate) finished: bool,
}

impl Stream for Subscription {
    type Item = Result<Activity>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.finished {
            return Poll::Ready(None);
        }
        match self.receiver.poll_recv(cx) {
            Poll::Ready(Some(activity)) => Poll::Ready(Some(Ok(activity))),
            Poll::Ready(None) => {
                self.finished = true;
                let error = self.end.error.lock().expect("subscription end lock").take();
                Poll::Ready(error.map(Err))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        // Bounded in practice: at most one message per live subscription.
        let _ = self.unsubscribe.send(self.local_id);
    }
}

/// Drops activity already delivered: anything below the last height seen, and event ids already
/// seen at that height (a resume restarts at the last height, inclusive).
#[derive(Debug, Default)]
pub(crate) struct Dedup {
    last_height: Option<u64>,
    seen_at_last_height: Vec<EventId>,
}

impl Dedup {
    pub(crate) fn is_new(&self, height: u64, event_id: &EventId) -> bool {
        match self.last_height {
            None => true,
            Some(last) => height > last || (height == last && !self.seen_at_last_height.contains(event_id)),
        }
    }

    pub(crate) fn record(&mut self, height: u64, event_id: EventId) {
        if self.last_height != Some(height) {
            self.last_height = Some(height);
            self.seen_at_last_height.clear();
        }
        self.seen_at_last_height.push(event_id);
    }

    pub(crate) fn last_height(&self) -> Option<u64> {
        self.last_height
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resume_delivers_neither_gaps_nor_duplicates() {
        let mut dedup = Dedup::default();
        let id = EventId::from_u128;
        for (height, event) in [(5, 1), (5, 2), (6, 3)] {
            assert!(dedup.is_new(height, &id(event)));
            dedup.record(height, id(event));
        }
        // The resume replays height 6 (inclusive) and later.
        assert!(!dedup.is_new(6, &id(3)));
        assert!(dedup.is_new(6, &id(4)));
        dedup.record(6, id(4));
        assert!(!dedup.is_new(5, &id(9)));
        assert!(dedup.is_new(7, &id(3)));
        assert_eq!(dedup.last_height(), Some(6));
    }
}
