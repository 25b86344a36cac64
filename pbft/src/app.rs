//! The replicated state machine interface ([`App`]) and a small test app ([`TestApp`]).

use std::sync::{Arc, Mutex, OnceLock};

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

/// The app state at one executed sequence number, as [`App::restore`] takes it: either its
/// bytes, or a consistent copy of the state that encodes them on first use.
///
/// A checkpoint takes a snapshot inside the consensus step; encoding the whole state there
/// would hold up the round (tens of milliseconds at a few MB). A deferred snapshot copies what
/// it needs (cheap) and leaves the encoding to whoever needs the bytes first: the driver's
/// background writer that persists it, or [`Replica`](crate::Replica) serving a state transfer.
/// Either way the bytes are a pure function of the state, encoded once; determinism holds.
#[derive(Clone)]
pub struct Snapshot(Arc<SnapshotInner>);

type Encoder = Box<dyn FnOnce() -> Vec<u8> + Send>;

struct SnapshotInner {
    bytes: OnceLock<Vec<u8>>,
    encode: Mutex<Option<Encoder>>,
}

impl Snapshot {
    /// A snapshot whose bytes are known.
    pub fn ready(bytes: Vec<u8>) -> Snapshot {
        Snapshot(Arc::new(SnapshotInner {
            bytes: OnceLock::from(bytes),
            encode: Mutex::new(None),
        }))
    }

    /// A snapshot encoded by `encode` when its bytes are first needed (on any thread).
    pub fn deferred(encode: impl FnOnce() -> Vec<u8> + Send + 'static) -> Snapshot {
        Snapshot(Arc::new(SnapshotInner {
            bytes: OnceLock::new(),
            encode: Mutex::new(Some(Box::new(encode))),
        }))
    }

    /// The bytes; the first call encodes (a concurrent caller waits for it).
    pub fn bytes(&self) -> &[u8] {
        self.0.bytes.get_or_init(|| {
            let encode = self
                .0
                .encode
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .take()
                .expect("a snapshot without bytes has its encoder");
            encode()
        })
    }

    /// Whether the bytes have been encoded yet.
    pub fn is_encoded(&self) -> bool {
        self.0.bytes.get().is_some()
    }
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.bytes.get() {
            Some(bytes) => write!(f, "Snapshot({} bytes)", bytes.len()),
            None => write!(f, "Snapshot(deferred)"),
        }
    }
}

impl PartialEq for Snapshot {
    fn eq(&self, other: &Snapshot) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.bytes() == other.bytes()
    }
}

impl Eq for Snapshot {}

impl Serialize for Snapshot {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.bytes())
    }
}

impl<'de> Deserialize<'de> for Snapshot {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Snapshot, D::Error> {
        let bytes = serde_bytes::ByteBuf::deserialize(deserializer)?;
        Ok(Snapshot::ready(bytes.into_vec()))
    }
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
    /// Full state at the last executed seq. Called inside the consensus step: an app with a
    /// large state returns a [`Snapshot::deferred`] copy and leaves the encoding for later.
    fn snapshot(&self) -> Snapshot;
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

    fn snapshot(&self) -> Snapshot {
        Snapshot::ready(rmp_serde::to_vec(self).expect("the test app encodes"))
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
    fn a_deferred_snapshot_encodes_once_on_first_use_and_round_trips() {
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = calls.clone();
        let snapshot = Snapshot::deferred(move || {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            vec![7; 1000]
        });
        assert!(!snapshot.is_encoded());
        assert_eq!(format!("{snapshot:?}"), "Snapshot(deferred)");
        let copy = snapshot.clone();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let copy = copy.clone();
                std::thread::spawn(move || copy.bytes().len())
            })
            .collect();
        for thread in threads {
            assert_eq!(thread.join().unwrap(), 1000);
        }
        assert_eq!(snapshot.bytes(), &[7; 1000][..]);
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1, "encoded once");
        let encoded = rmp_serde::to_vec(&snapshot).unwrap();
        let decoded: Snapshot = rmp_serde::from_slice(&encoded).unwrap();
        assert_eq!(decoded, snapshot);
        assert_eq!(Snapshot::ready(vec![1]), Snapshot::deferred(|| vec![1]));
        assert_ne!(Snapshot::ready(vec![1]), Snapshot::ready(vec![2]));
    }

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
        assert_eq!(other.restore(snapshot.bytes()).unwrap(), app.digest());
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
