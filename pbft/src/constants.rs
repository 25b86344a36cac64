//! Every limit of the consensus core, with its unit in its name. Each bounds something a peer
//! or a client could otherwise grow without end.

/// Largest encoded message accepted from the network (a view change carries up to `L`
/// prepared certificates with their batches). Configurable per deployment up to this.
pub const MESSAGE_BYTES_MAX: usize = 256 * 1024 * 1024;
/// Largest number of replicas (n = 3f + 1).
pub const REPLICAS_MAX: usize = 64;
/// Fewest replicas: one fault tolerated.
pub const REPLICAS_MIN: usize = 4;
/// How many views ahead of our own we keep view-change messages for.
pub const VIEWS_AHEAD_MAX: u64 = 64;
/// Most commit votes kept per replica per sequence number (one per view, newest views kept).
pub const COMMIT_VIEWS_PER_REPLICA_MAX: usize = 2;
/// Most distinct batches kept per sequence number (candidates from several views).
pub const BATCHES_PER_SLOT_MAX: usize = 4;
/// Most committed batches sent to a peer in one catch-up answer.
pub const CATCHUP_BATCHES_MAX: u64 = 32;
/// Default of `Config::catchup_bytes_max`: most batch bytes in one catch-up answer. Without a
/// byte bound, 32 batches of up to 4 MiB each, signed and encoded for every lagging peer at every
/// status tick, made a cluster that fell behind under overload grow by gigabytes.
pub const CATCHUP_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Default of `Config::pending_bytes_max`: request bytes waiting to be ordered per replica.
pub const PENDING_BYTES_MAX: usize = 128 * 1024 * 1024;
/// Most executed requests remembered, with their replies, to answer client retransmissions
/// (see `executed`).
pub const EXECUTED_REMEMBERED_MAX: usize = 65_536;
/// Most reply bytes remembered for client retransmissions. The chain bench's requests (8
/// settlements of 500 entries) have replies of 4,313 bytes: at 200,000 events/s (50 requests/s)
/// this holds about 78 s of replies, ten times the client's longest retransmission interval (8 s).
pub const REPLIES_REMEMBERED_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Most pending requests a backup forwards to the primary per status tick.
pub const FORWARD_PER_TICK_MAX: usize = 16;
/// Exponent cap of the view-change timeout's exponential backoff.
pub const VIEW_CHANGE_BACKOFF_SHIFT_MAX: u32 = 10;
/// The signing domain of every consensus message.
pub const SIGNING_DOMAIN: &[u8] = b"hoard/pbft/v1\0";

const _: () = assert!(REPLICAS_MIN == 3 + 1);
const _: () = assert!(REPLICAS_MAX <= u32::MAX as usize);
const _: () = assert!(
    COMMIT_VIEWS_PER_REPLICA_MAX >= 2,
    "a vote from an old view and the current one"
);
