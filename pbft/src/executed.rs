//! Recently executed requests and their replies, so that a client's retransmission of a
//! request that already executed is answered with the reply it produced instead of being
//! ordered again or dropped.
//!
//! A reply can fail to reach its client for reasons the protocol does not see: the request
//! reached this replica by forwarding before the client connected to it, the client's queue
//! was full, the connection dropped. The client then retransmits to every replica; each answers
//! from here, and f+1 matching replies complete the request (PBFT's "last reply" table, kept per
//! request rather than per client because a client has many requests in flight).
//!
//! Bounded by count ([`EXECUTED_REMEMBERED_MAX`]) and by reply bytes
//! ([`REPLIES_REMEMBERED_BYTES_MAX`]); the oldest entry goes first. A request no longer
//! remembered is ordered again if a client retransmits it: the app must answer a re-executed
//! request as it answered the first execution (the ledger does, by event id, within its
//! deduplication window).

use std::collections::{BTreeMap, VecDeque};

use hoard_types::crypto::Hash;

use crate::constants::{EXECUTED_REMEMBERED_MAX, REPLIES_REMEMBERED_BYTES_MAX};

/// What a retransmission of an executed request is answered with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecutedReply {
    pub seq: u64,
    pub reply: Vec<u8>,
}

/// Executed requests by digest, oldest first, bounded in count and reply bytes.
#[derive(Debug, Default)]
pub struct ExecutedRequests {
    by_digest: BTreeMap<Hash, ExecutedReply>,
    order: VecDeque<Hash>,
    reply_bytes: usize,
}

impl ExecutedRequests {
    /// Remembers that the request `digest` executed at `seq` with `reply`. A request executes
    /// once; if it is already remembered the first entry stays.
    pub fn insert(&mut self, digest: Hash, seq: u64, reply: &[u8]) {
        if self.by_digest.contains_key(&digest) {
            return;
        }
        self.reply_bytes += reply.len();
        self.by_digest.insert(
            digest,
            ExecutedReply {
                seq,
                reply: reply.to_vec(),
            },
        );
        self.order.push_back(digest);
        while self.order.len() > EXECUTED_REMEMBERED_MAX || self.reply_bytes > REPLIES_REMEMBERED_BYTES_MAX {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            let removed = self
                .by_digest
                .remove(&oldest)
                .expect("order and map hold the same digests");
            self.reply_bytes -= removed.reply.len();
        }
        debug_assert_eq!(self.order.len(), self.by_digest.len());
    }

    /// The reply of request `digest` if it executed recently.
    pub fn get(&self, digest: &Hash) -> Option<&ExecutedReply> {
        self.by_digest.get(digest)
    }

    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }

    /// Reply bytes held.
    pub fn reply_bytes(&self) -> usize {
        self.reply_bytes
    }

    /// Within both bounds.
    pub fn bounded(&self) -> bool {
        self.len() <= EXECUTED_REMEMBERED_MAX
            && self.reply_bytes <= REPLIES_REMEMBERED_BYTES_MAX
            && self.order.len() == self.by_digest.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(i: u64) -> Hash {
        Hash::of_parts(&[&i.to_le_bytes()])
    }

    #[test]
    fn replies_are_remembered_and_the_oldest_go_first_by_count() {
        let mut executed = ExecutedRequests::default();
        let total = EXECUTED_REMEMBERED_MAX as u64 + 10;
        for i in 0..total {
            executed.insert(digest(i), i + 1, &[i as u8]);
        }
        assert_eq!(executed.len(), EXECUTED_REMEMBERED_MAX);
        assert!(executed.bounded());
        assert!(executed.get(&digest(9)).is_none(), "the oldest were forgotten");
        let newest = executed
            .get(&digest(total - 1))
            .expect("the newest is remembered");
        assert_eq!(newest.seq, total);
        assert_eq!(newest.reply, vec![(total - 1) as u8]);
        // A second insert of a remembered request keeps the first entry.
        executed.insert(digest(total - 1), 999, b"other");
        assert_eq!(executed.get(&digest(total - 1)).unwrap().seq, total);
    }

    #[test]
    fn reply_bytes_are_bounded() {
        let mut executed = ExecutedRequests::default();
        let reply = vec![7u8; 1024 * 1024];
        let fits = REPLIES_REMEMBERED_BYTES_MAX / reply.len();
        for i in 0..fits as u64 + 3 {
            executed.insert(digest(i), i + 1, &reply);
        }
        assert!(executed.bounded());
        assert_eq!(executed.len(), fits);
        assert_eq!(executed.reply_bytes(), fits * reply.len());
        assert!(executed.get(&digest(0)).is_none());
        assert!(executed.get(&digest(fits as u64 + 2)).is_some());
    }
}
