//! The ledger as PBFT's replicated state machine ([`hoard_pbft::App`]).
//!
//! A consensus request is a batch of signed transactions from one client (a gateway): the
//! MessagePack of `Vec<Transaction>` ([`encode_request`]). Before ordering, every replica checks
//! every signature of a request with ed25519 batch verification ([`LedgerApp::check_requests`]);
//! a request with one bad signature is refused whole (a gateway checks each transaction before
//! it batches them, so only a faulty gateway sends one). Executing the batch at sequence number
//! `seq` produces block `seq`: block heights and PBFT sequence numbers are the same numbers. The
//! app digest is the hash of the head block's header, which commits to the state root and,
//! through the parent hashes, to every block before it.

use std::collections::VecDeque;
use std::sync::Arc;

use rayon::prelude::*;

use hoard_pbft::{App, AppError, Executed, Request, Snapshot};
use hoard_types::tx::verify_transactions;
use hoard_types::{Receipt, Transaction};

use crate::block::Block;
use crate::state::Ledger;

/// Most transactions one consensus request may carry.
pub const REQUEST_TRANSACTIONS_MAX: usize = 4096;
/// Largest encoded consensus request (the replicas' `request_bytes_max`).
pub const REQUEST_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Most recent blocks the app keeps in memory for subscribers near the head.
pub const RECENT_BLOCKS_MAX: usize = 1024;
/// Most bytes (of the requests that made them) the recent blocks may hold; the newest is always
/// kept. With 4,000-event requests a block is about 1.5 MB, and 1,024 of them made a replica grow
/// by about 5 MiB/s for minutes in the chain benchmark's soak run.
pub const RECENT_BLOCKS_BYTES_MAX: usize = 32 * 1024 * 1024;
/// Most executed blocks waiting for the driver to take them (it takes them every round; a bound
/// in case nothing does, as in the simulator).
pub const EXECUTED_UNTAKEN_MAX: usize = 4096;

const _: () = assert!(REQUEST_TRANSACTIONS_MAX <= hoard_types::constants::BLOCK_TRANSACTIONS_MAX);

/// The MessagePack of a request's transactions.
pub fn encode_request(transactions: &[Transaction]) -> Vec<u8> {
    rmp_serde::to_vec(transactions).expect("transactions serialise")
}

/// Splits transactions into requests that respect [`REQUEST_TRANSACTIONS_MAX`] and
/// [`REQUEST_BYTES_MAX`], keeping their order.
pub fn split_into_requests(transactions: Vec<Transaction>) -> Vec<Vec<Transaction>> {
    // Per transaction: its payload and signatures, plus MessagePack framing.
    let size = |tx: &Transaction| tx.payload.len() + tx.signatures.len() * 110 + 16;
    let mut requests = Vec::new();
    let mut current = Vec::new();
    let mut bytes = 16;
    for tx in transactions {
        let tx_bytes = size(&tx);
        if !current.is_empty()
            && (current.len() == REQUEST_TRANSACTIONS_MAX || bytes + tx_bytes > REQUEST_BYTES_MAX)
        {
            requests.push(std::mem::take(&mut current));
            bytes = 16;
        }
        bytes += tx_bytes;
        current.push(tx);
    }
    if !current.is_empty() {
        requests.push(current);
    }
    requests
}

/// Decodes a request; `None` when it does not decode or carries too many transactions.
pub fn decode_request(payload: &[u8]) -> Option<Vec<Transaction>> {
    let transactions: Vec<Transaction> = rmp_serde::from_slice(payload).ok()?;
    (transactions.len() <= REQUEST_TRANSACTIONS_MAX).then_some(transactions)
}

/// A reply: the receipts of the request's transactions, in order.
pub fn decode_reply(reply: &[u8]) -> Option<Vec<Receipt>> {
    rmp_serde::from_slice(reply).ok()
}

/// The ledger wrapped for consensus, with the most recent blocks kept for the driver.
pub struct LedgerApp {
    ledger: Ledger,
    /// Recent blocks with their approximate sizes, oldest first, bounded by count and bytes.
    recent: VecDeque<(Arc<Block>, usize)>,
    recent_bytes: usize,
    /// Executed blocks the driver has not taken yet to persist (the consensus core hands the
    /// app only `&self` between steps, hence the lock).
    executed: std::sync::Mutex<VecDeque<Arc<Block>>>,
}

impl LedgerApp {
    pub fn new(ledger: Ledger) -> LedgerApp {
        LedgerApp {
            ledger,
            recent: VecDeque::new(),
            recent_bytes: 0,
            executed: std::sync::Mutex::new(VecDeque::new()),
        }
    }

    /// The block executed at `height`, for the driver to persist: each executed block once, in
    /// order (older ones nobody took are dropped).
    pub fn take_executed(&self, height: u64) -> Option<Arc<Block>> {
        let mut executed = self.executed.lock().expect("executed lock");
        while let Some(block) = executed.pop_front() {
            if block.header.height == height {
                return Some(block);
            }
            if block.header.height > height {
                executed.push_front(block);
                return None;
            }
        }
        None
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Block `height`, if it is among the most recent ones executed here.
    pub fn recent_block(&self, height: u64) -> Option<Arc<Block>> {
        let first = self.recent.front()?.0.header.height;
        let index = height.checked_sub(first)? as usize;
        self.recent.get(index).map(|(block, _)| block.clone())
    }

    /// Keeps `block` (`bytes` long encoded) among the recent ones (recovery hands in replayed
    /// blocks).
    pub fn remember_block(&mut self, block: Arc<Block>, bytes: usize) {
        self.remember(block, bytes);
    }

    fn remember(&mut self, block: Arc<Block>, bytes: usize) {
        self.recent.push_back((block, bytes));
        self.recent_bytes += bytes;
        while self.recent.len() > RECENT_BLOCKS_MAX
            || (self.recent_bytes > RECENT_BLOCKS_BYTES_MAX && self.recent.len() > 1)
        {
            let (_, dropped) = self.recent.pop_front().expect("not empty");
            self.recent_bytes -= dropped;
        }
    }
}

impl App for LedgerApp {
    fn check_requests(&self, requests: &[Request]) -> Vec<bool> {
        let check = |request: &Request| match decode_request(&request.payload) {
            Some(transactions) => verify_transactions(&transactions).into_iter().all(|valid| valid),
            None => false,
        };
        // One request is checked on this thread: the pool would run it on one worker anyway,
        // after waking it (see `state::PARALLEL_BLOCK_BYTES_MIN` for what that costs).
        if requests.len() < 2 {
            requests.iter().map(check).collect()
        } else {
            requests.par_iter().map(check).collect()
        }
    }

    fn execute(&mut self, seq: u64, timestamp_ms: u64, requests: &[Request]) -> Executed {
        assert_eq!(
            seq,
            self.ledger.height() + 1,
            "PBFT executes every sequence number once, in order"
        );
        let decoded: Vec<Vec<Transaction>> = requests
            .iter()
            .map(|r| decode_request(&r.payload).unwrap_or_default())
            .collect();
        let counts: Vec<usize> = decoded.iter().map(Vec::len).collect();
        let transactions: Vec<Transaction> = decoded.into_iter().flatten().collect();
        let (block, receipts) = self.ledger.execute(timestamp_ms, transactions);
        let mut receipts = receipts.into_iter();
        let replies = counts
            .into_iter()
            .map(|count| {
                let mine: Vec<Receipt> = receipts.by_ref().take(count).collect();
                rmp_serde::to_vec(&mine).expect("receipts serialise")
            })
            .collect();
        let digest = block.header.hash().0;
        let bytes = requests.iter().map(|r| r.payload.len()).sum::<usize>() + 256;
        let block = Arc::new(block);
        {
            let mut executed = self.executed.lock().expect("executed lock");
            if executed.len() == EXECUTED_UNTAKEN_MAX {
                executed.pop_front();
            }
            executed.push_back(block.clone());
        }
        self.remember(block, bytes);
        Executed { replies, digest }
    }

    fn digest(&self) -> [u8; 32] {
        self.ledger.head().hash().0
    }

    fn snapshot(&self) -> Snapshot {
        // Inside the consensus step: copy now, sort and encode when the bytes are needed
        // (the node's snapshot writer thread, or a state transfer).
        let view = self.ledger.snapshot_view();
        Snapshot::deferred(move || view.encode())
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<[u8; 32], AppError> {
        let ledger = Ledger::restore(snapshot, None).map_err(|e| AppError(e.to_string()))?;
        self.ledger = ledger;
        self.recent.clear();
        self.recent_bytes = 0;
        self.executed.lock().expect("executed lock").clear();
        Ok(self.digest())
    }

    fn last_executed(&self) -> u64 {
        self.ledger.height()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{key, World};
    use hoard_types::TenantId;

    #[test]
    fn requests_are_split_under_both_limits_in_order() {
        let mut world = World::new(1);
        let alice = key("alice", 0);
        let transactions: Vec<Transaction> = (0..REQUEST_TRANSACTIONS_MAX + 10)
            .map(|_| world.mint_currency(TenantId(1), &alice.public(), "GOLD", 1))
            .collect();
        let requests = split_into_requests(transactions.clone());
        assert_eq!(requests.len(), 2);
        assert!(requests
            .iter()
            .all(|r| encode_request(r).len() <= REQUEST_BYTES_MAX));
        assert_eq!(requests.concat(), transactions);
        let big = Transaction {
            payload: vec![7; 60 * 1024],
            signatures: vec![],
        };
        let requests = split_into_requests(vec![big; 200]);
        assert!(requests.len() >= 3);
        assert!(requests
            .iter()
            .all(|r| encode_request(r).len() <= REQUEST_BYTES_MAX));
    }
}
