//! PBFT (Castro & Liskov) for Hoard's sidechain: a pure, deterministic replica state machine
//! and a seeded deterministic simulator that drives it.
//!
//! Layout:
//! - [`replica`]: [`Replica`], the protocol core. Inputs are messages, client requests and
//!   timer expiries; outputs are a list of [`Output`]s (send, broadcast, persist, timers,
//!   committed batches, replies) for the driver to perform in order. No I/O, clock, threads
//!   or randomness: time enters as a number ([`Replica::set_now`]).
//! - [`message`]: the wire format ([`Message`], [`SignedMessage`]), requests, batches and
//!   certificates; ed25519 signing in the `hoard/pbft/v1` domain and batch verification.
//! - [`types`]: [`Config`], [`Timer`], [`Output`], durable [`Record`]s folded into a
//!   [`DurableState`] for recovery, and [`Stats`] counters for the runtime's metrics.
//! - [`app`]: the [`App`] trait the ledger implements, and [`TestApp`] for tests.
//! - [`sim`]: the deterministic simulator (network, disk, clock, faults, workload), generic
//!   over the app; `src/bin/pbft-sim.rs` runs it with [`TestApp`].
//! - [`executed`]: recently executed requests and their replies, for client retransmissions.
//! - [`constants`]: limits, with units in their names. [`error`]: the one error enum.
//!
//! See `pbft/README.md` for the protocol choices (view-change variant, state transfer,
//! what is persisted when).

pub mod app;
pub mod constants;
pub mod error;
pub mod executed;
pub mod message;
pub mod replica;
pub mod sim;
pub mod types;

pub use app::{App, AppError, Executed, Snapshot, TestApp};
pub use error::{Error, Result};
pub use message::{
    Batch, CheckpointCert, Message, MessageKind, PreparedCert, ReplicaId, Request, SignedMessage,
};
pub use replica::Replica;
pub use types::{Committed, Config, DurableSlot, DurableState, Output, Record, Stats, Timer};
