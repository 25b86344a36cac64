//! The replicated state machine interface ([`App`]) and a small test app ([`TestApp`]).

use hoard_types::crypto::Hash;
use serde::{Deserialize, Serialize};

use crate::message::Request;

/// What executing one batch produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Executed {
    /// One reply per request, in order.
    pub replies: Vec<Vec<u8>>,
    /// The app digest after execution.
    pub digest: [u8; 32],
}

/// An error of the state machine (a snapshot that does not decode, for instance).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("app: {0}")]
pub struct AppError(pub String);

/// The replicated deterministic state machine (the ledger implements it).
pub trait App {
    /// Stateless pre-ordering check of client requests (e.g. signature batch verification).
    /// One bool per request.
    fn check_requests(&self, requests: &[Request]) -> Vec<bool>;
    /// Execute the batch ordered at sequence number `seq` (every seq is executed exactly once,
    /// in order; a null batch from a view change is an empty slice with timestamp 0).
    /// `timestamp_ms` comes from the primary's proposal. Returns one reply per request and
    /// the app digest after execution.
    fn execute(&mut self, seq: u64, timestamp_ms: u64, requests: &[Request]) -> Executed;
    fn digest(&self) -> [u8; 32];
    /// Full state at the last executed seq.
    fn snapshot(&self) -> Vec<u8>;
    /// The inverse of `snapshot`; returns the digest of the restored state.
    fn restore(&mut self, snapshot: &[u8]) -> Result<[u8; 32], AppError>;
    fn last_executed(&self) -> u64;
}

/// A test app: a hash chain over executed requests and a counter. Requests whose payload
/// starts with `0xFF` fail `check_requests`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestApp {
    pub last_executed: u64,
    pub chain: [u8; 32],
    /// Requests executed.
    pub requests_total: u64,
    /// Sum of the first payload byte of executed requests (a "supply" to check).
    pub supply: u64,
    /// Sum of the first byte of each executed request, per the replies (must equal `supply`).
    pub replied_supply: u64,
    pub last_timestamp_ms: u64,
}

impl TestApp {
    pub fn new() -> TestApp {
        TestApp::default()
    }

    /// The invariant the simulator checks: what was added equals what was replied.
    pub fn invariant(&self) -> Result<(), String> {
        if self.supply != self.replied_supply {
            return Err(format!(
                "supply {} != replied {}",
                self.supply, self.replied_supply
            ));
        }
        Ok(())
    }
}

impl App for TestApp {
    fn check_requests(&self, requests: &[Request]) -> Vec<bool> {
        requests
            .iter()
            .map(|r| r.payload.first() != Some(&0xFF))
            .collect()
    }

    fn execute(&mut self, seq: u64, timestamp_ms: u64, requests: &[Request]) -> Executed {
        assert_eq!(seq, self.last_executed + 1, "batches execute in order, each once");
        let mut replies = Vec::with_capacity(requests.len());
        for request in requests {
            let digest = request.digest();
            self.chain = Hash::of_parts(&[&self.chain, &seq.to_le_bytes(), &digest.0]).0;
            self.requests_total += 1;
            let amount = u64::from(request.payload.first().copied().unwrap_or(0));
            self.supply += amount;
            self.replied_supply += amount;
            let mut reply = self.requests_total.to_le_bytes().to_vec();
            reply.extend_from_slice(&self.chain[..8]);
            replies.push(reply);
        }
        if timestamp_ms != 0 {
            self.last_timestamp_ms = self.last_timestamp_ms.max(timestamp_ms);
        }
        self.last_executed = seq;
        Executed {
            replies,
            digest: self.digest(),
        }
    }

    fn digest(&self) -> [u8; 32] {
        Hash::of_parts(&[
            &self.chain,
            &self.last_executed.to_le_bytes(),
            &self.requests_total.to_le_bytes(),
            &self.supply.to_le_bytes(),
        ])
        .0
    }

    fn snapshot(&self) -> Vec<u8> {
        rmp_serde::to_vec(self).expect("the test app encodes")
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<[u8; 32], AppError> {
        let restored: TestApp = rmp_serde::from_slice(snapshot).map_err(|e| AppError(e.to_string()))?;
        *self = restored;
        Ok(self.digest())
    }

    fn last_executed(&self) -> u64 {
        self.last_executed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_restores_the_same_digest() {
        let mut app = TestApp::new();
        app.execute(
            1,
            5,
            &[Request {
                client: 1,
                payload: vec![3, 4],
            }],
        );
        app.execute(2, 0, &[]);
        let snapshot = app.snapshot();
        let mut other = TestApp::new();
        assert_eq!(other.restore(&snapshot).unwrap(), app.digest());
        assert_eq!(other.last_executed(), 2);
        assert!(other.restore(&[0xc1]).is_err());
        assert_eq!(
            app.check_requests(&[Request {
                client: 1,
                payload: vec![0xFF]
            }]),
            vec![false]
        );
    }
}
