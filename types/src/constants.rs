//! Limits shared by every crate, with their units in their names. Each one bounds something
//! that a client could otherwise grow without end.

/// Largest encoded transaction payload (the signed bytes).
pub const TX_PAYLOAD_BYTES_MAX: usize = 64 * 1024;
/// Most signatures on one transaction (a swap needs two; a few spare for future kinds).
pub const TX_SIGNATURES_MAX: usize = 4;
/// Most entries in one batched settlement.
pub const SETTLEMENT_ENTRIES_MAX: usize = 4096;
/// Most assets one side of a swap, a transfer or a burn may carry.
pub const ASSETS_PER_SIDE_MAX: usize = 32;
/// Longest currency symbol.
pub const CURRENCY_SYMBOL_BYTES_MAX: usize = 16;
/// Longest item class name.
pub const CLASS_ID_BYTES_MAX: usize = 32;
/// Longest tenant name.
pub const TENANT_NAME_BYTES_MAX: usize = 64;
/// How far ahead of the current height a transaction may expire. This is the deduplication
/// window: an event's id is remembered until its expiry height passes, and an event whose
/// expiry height has passed is rejected, so no event can ever apply twice.
pub const EXPIRY_HORIZON_BLOCKS_MAX: u64 = 100_000;
/// Most events the deduplication window holds for one tenant, unless the genesis file sets
/// another cap (`window_events_per_tenant_max`). The window otherwise holds every event of the
/// last `EXPIRY_HORIZON_BLOCKS_MAX` blocks, which is no bound on memory under a sustained load
/// (100,000 events/s fill it with millions of events a minute). When a tenant's window is full,
/// an authorised event is rejected with `window_full` and not remembered: the same event can be
/// submitted again once older events expired. About 100 bytes of replica memory per event.
pub const DEDUP_WINDOW_EVENTS_PER_TENANT_MAX: u64 = 4_000_000;
/// Most transactions in one block.
pub const BLOCK_TRANSACTIONS_MAX: usize = 16_384;

const _: () = assert!(SETTLEMENT_ENTRIES_MAX * 60 <= TX_PAYLOAD_BYTES_MAX * 4);
const _: () = assert!(TX_SIGNATURES_MAX >= 2, "a swap carries two signatures");
