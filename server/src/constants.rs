//! The gateway's own limits (the protocol's limits live in `hoard_types::wire`), with units in
//! their names. Every queue the gateway has is bounded by one of these.

use hoard_types::wire::EVENTS_IN_FLIGHT_PER_CONNECTION_MAX;

/// Messages a connection's outgoing queue holds (pushes and deferred answers). A full queue means
/// the client reads too slowly: the connection is closed with 1013.
pub const CONNECTION_OUTBOUND_QUEUE_MAX: usize = 4096;
/// Outgoing messages written before one flush of the socket.
pub const CONNECTION_WRITES_PER_FLUSH_MAX: usize = 64;
/// Submissions waiting for the stream writer (XADD). Full: `busy`.
pub const STREAM_WRITER_QUEUE_MAX: usize = 8192;
/// Submissions written to Redis in one pipeline.
pub const STREAM_WRITER_PIPELINE_MAX: usize = 512;
/// Committed-event notifications waiting for XACK.
pub const ACK_QUEUE_MAX: usize = 65_536;
/// Stream entries acknowledged in one XACK.
pub const XACK_IDS_MAX: usize = 1024;
/// In-flight events one lost-entry sweep looks at (`Events::forget_lost`; one pipelined XRANGE
/// per stream entry).
pub const LOST_SWEEP_EVENTS_MAX: usize = 4096;
/// How often the gateway looks for in-flight events whose stream entries Redis lost.
pub const LOST_SWEEP_INTERVAL_MS: u64 = 5_000;
/// Distinct (tenant, counter, player) keys buffered in memory between flushes. Over it: `busy`.
pub const CLICK_KEYS_PENDING_MAX: usize = 2_000_000;
/// Distinct counters per tenant.
pub const COUNTERS_PER_TENANT_MAX: usize = 1024;
const _: () = assert!(COUNTERS_PER_TENANT_MAX <= u16::MAX as usize);
/// Redis commands in one click flush part (a flush of more keys is split into parts). A part is
/// one Lua script, which Redis runs atomically, serving nothing else meanwhile: 4,096 commands
/// (1,024 keys) take it about 5 ms alone and 10-15 ms beside a busy gateway (ZINCRBY ~2-8 us,
/// HINCRBY ~1-2 us per call, from `INFO commandstats`). Parts of 15,000 keys held Redis for
/// 150-300 ms at a time, and the event stream's appends (`accepted`) waited behind them.
pub const CLICK_FLUSH_COMMANDS_MAX: usize = 4_096;
/// Open offers in the whole gateway.
pub const OFFERS_OPEN_MAX: usize = 1_000_000;
/// Offers listed in one `offers` answer.
pub const OFFERS_LISTED_MAX: usize = 256;
/// Items whose recent history the gateway keeps (oldest-touched dropped first).
pub const ITEM_HISTORIES_MAX: usize = 1_000_000;
/// Blocks the in-process chain keeps for followers that start late.
pub const LOCAL_CHAIN_BLOCKS_RETAINED_MAX: usize = 100_000;
/// Committed events per tenant kept for `subscribe.from_height` replays. Below the outgoing queue
/// capacity, so that a full replay fits in an idle connection's queue.
pub const ACTIVITY_LOG_EVENTS_PER_TENANT_MAX: usize = 2048;
/// Bytes of an HTTP request head on the health/metrics port.
pub const HTTP_REQUEST_BYTES_MAX: usize = 8 * 1024;

const _: () = assert!(EVENTS_IN_FLIGHT_PER_CONNECTION_MAX < CONNECTION_OUTBOUND_QUEUE_MAX);
const _: () = assert!(STREAM_WRITER_PIPELINE_MAX <= STREAM_WRITER_QUEUE_MAX);
const _: () = assert!(CLICK_FLUSH_COMMANDS_MAX >= 4 * 1024);
const _: () = assert!(ACTIVITY_LOG_EVENTS_PER_TENANT_MAX < CONNECTION_OUTBOUND_QUEUE_MAX);

/// Distinct (tenant, counter, player) totals the embedded store holds (`store = "embedded"`).
/// Over it a click flush fails and clicks stay buffered (then `busy`).
pub const EMBEDDED_CLICK_KEYS_MAX: usize = 2_000_000;
/// Entries the embedded store's event stream holds (accepted, not yet acknowledged).
pub const EMBEDDED_STREAM_ENTRIES_MAX: usize = 1_000_000;
/// Bytes of transactions the embedded store's event stream holds.
pub const EMBEDDED_STREAM_BYTES_MAX: usize = 512 * 1024 * 1024;
/// Settled windows per tenant whose plan and cut flag the embedded store keeps (Redis lets
/// them expire after a day).
pub const EMBEDDED_SETTLED_WINDOWS_KEPT: usize = 64;
