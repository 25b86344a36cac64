//! Loading memory ahead of use: the ledger's apply and Merkle tree, and the gateway's click
//! tables. A block's work is scattered over a state far larger than the caches: every transfer
//! reads entries of several hash maps, and every changed balance a bucket of the Merkle tree,
//! each a cache miss. Taken one after the other, those misses are most of the apply's time;
//! announced some items ahead, they overlap. A prefetch is a hint: it changes no result, only
//! when memory arrives.

use std::hash::{BuildHasher, Hash};

/// The hash of every map of the ledger's state: foldhash (as fast as Fx on these keys), keyed
/// from the operating system's randomness, per process and per map. Keys are chosen by
/// clients (event ids by any player who signs a transfer, item ids by studios), and with a hash
/// anyone can compute (Fx, or any fixed seed) a client can choose thousands that share one hash
/// value ([`crate::testing::fx_colliding_event_ids`]), which turns each insert and lookup in
/// that map into a scan of all of them, on every replica at once (hash flooding;
/// `hoard-ledger-bench --phases h` measures it). The seed is the state machine's one random
/// input, and it changes no result: nothing the ledger computes depends on a map's order
/// (snapshots sort their entries; the Merkle tree sorts its leaves by key hash). Two ledgers
/// hash with different seeds, so every test that compares two replicas' roots and snapshots
/// (`invariants_hold_and_replicas_agree`) checks that too.
#[derive(Clone, Debug)]
pub struct StateHasher(foldhash::fast::SeedableRandomState);

impl Default for StateHasher {
    fn default() -> StateHasher {
        static SHARED: std::sync::OnceLock<&'static foldhash::SharedSeed> = std::sync::OnceLock::new();
        let shared = SHARED.get_or_init(|| Box::leak(Box::new(foldhash::SharedSeed::from_u64(os_random()))));
        StateHasher(foldhash::fast::SeedableRandomState::with_seed(
            os_random(),
            shared,
        ))
    }
}

impl BuildHasher for StateHasher {
    type Hasher = foldhash::fast::FoldHasher<'static>;

    #[inline(always)]
    fn build_hasher(&self) -> Self::Hasher {
        self.0.build_hasher()
    }
}

/// 64 bits no one outside the process can predict: std's `RandomState` is keyed from the
/// operating system's randomness (and each one made differs from the last).
fn os_random() -> u64 {
    std::collections::hash_map::RandomState::new().hash_one(0u64)
}

/// A hash map whose entries can be prefetched ([`prefetch_entry`]): hashbrown's, with the
/// ledger's [`StateHasher`].
pub type PrefetchMap<K, V> = hashbrown_raw::HashMap<K, V, StateHasher>;

/// Asks the CPU to start loading the cache line holding `address`. Any address will do: a
/// prefetch never faults and reads nothing into the program. The target feature it needs (SSE)
/// is part of every x86_64 CPU; elsewhere it does nothing.
#[inline(always)]
pub fn prefetch_address(address: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `_mm_prefetch` only hints the cache; it neither dereferences the pointer for the
    // program nor faults on an invalid address.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(address.cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = address;
}

/// [`prefetch_address`] for the first cache line of `value`.
#[inline(always)]
pub fn prefetch<T>(value: &T) {
    prefetch_address((value as *const T).cast::<u8>());
}

/// [`prefetch_address`] for every cache line of `items`.
#[inline(always)]
pub fn prefetch_slice<T>(items: &[T]) {
    prefetch_bytes(items.as_ptr().cast::<u8>(), std::mem::size_of_val(items));
}

/// [`prefetch_address`] for every cache line of the `bytes` bytes from `start`.
#[inline(always)]
fn prefetch_bytes(start: *const u8, bytes: usize) {
    const LINE: usize = 64;
    let mut offset = 0;
    while offset < bytes {
        prefetch_address(start.wrapping_add(offset));
        offset += LINE;
    }
    if bytes > 0 {
        prefetch_address(start.wrapping_add(bytes - 1));
    }
}

/// How many entries from its home position [`prefetch_entry`] loads: a key sits at its home
/// position only when that was free, otherwise usually in one of the next few.
const ENTRIES_FROM_HOME: usize = 3;

/// Starts loading what a lookup of `key` in `map` reads: the group of control bytes at the
/// key's home position and the entries from there on (where the key usually is). hashbrown's
/// layout: entry `i` lies at `data_end - (i + 1)`, the control bytes from `data_end` on, and a
/// lookup starts at position `hash & (buckets - 1)`, probing the positions after it.
#[inline(always)]
pub fn prefetch_entry<K: Hash, V>(map: &PrefetchMap<K, V>, key: &K) {
    let table = map.raw_table();
    let position = (map.hasher().hash_one(key) as usize) & (table.buckets() - 1);
    let end = table.data_end().as_ptr();
    prefetch_address(end.cast::<u8>().wrapping_add(position));
    // Entries `position + ENTRIES_FROM_HOME - 1` down to `position`, lowest address first.
    prefetch_bytes(
        end.wrapping_sub(position + ENTRIES_FROM_HOME).cast::<u8>(),
        ENTRIES_FROM_HOME * std::mem::size_of::<(K, V)>(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetching_changes_no_entry_and_accepts_any_map() {
        let mut map: PrefetchMap<u64, u64> = PrefetchMap::default();
        prefetch_entry(&map, &7);
        for key in 0..10_000u64 {
            map.insert(key, key * 3);
            prefetch_entry(&map, &(key + 1));
        }
        prefetch_slice::<u64>(&[]);
        prefetch_slice(&[1u8; 200]);
        assert!((0..10_000u64).all(|key| map.get(&key) == Some(&(key * 3))));
    }
}
