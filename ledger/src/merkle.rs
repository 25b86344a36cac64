//! The state commitment: a bucketed binary Merkle tree over SHA-256, updated incrementally.
//!
//! Shape. Every state entry is a leaf `(key_hash, leaf_hash)` where `key_hash = SHA-256(key)`
//! and `leaf_hash = SHA-256(0x00 || key_hash || value)`. The top `depth` bits of `key_hash` pick
//! one of `2^depth` buckets; a bucket's hash is `SHA-256(0x01 || leaf_hash…)` over its leaves in
//! `key_hash` order (the zero hash when empty). A dense binary tree sits over the buckets: a
//! node is one application of the SHA-256 compression function to the 64-byte block
//! `left || right`, from the chaining state SHA-256 reaches after its first block
//! `"hoard/merkle/node/v1"` zero-padded to 64 bytes (no length padding: every node input has
//! the same length), its 8 state words written big-endian; the zero hash when both children
//! are zero. One compression per node instead of two. The root is
//! `SHA-256(0x03 || depth || leaf_count || top_node)`.
//!
//! Cost. A block pays for the leaves it changed, the buckets they fall in and the paths above
//! those buckets, each hashed once per block however often it changed (work in proportion to
//! what changed, not to the size of the state). When a root is taken and the average bucket
//! holds more than [`BUCKET_LEAVES_TARGET`] leaves, the tree deepens (a full rebuild, amortised
//! like a hash table's doubling) to the smallest depth at which it does not; it never shrinks,
//! so its shape is a pure function of the history of the state, identical on every replica.
//!
//! Proofs. [`MerkleTree::prove`] returns the key's bucket and the `depth` sibling hashes above
//! it: enough to prove that a key holds a value, or that it is absent.

use std::sync::OnceLock;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use hoard_types::crypto::Hash;

use crate::prefetch::{prefetch, prefetch_slice};
use crate::sha256x2;

/// The tree deepens when the average bucket holds more leaves than this.
pub const BUCKET_LEAVES_TARGET: usize = 4;
/// Depth of a new, empty tree.
pub const DEPTH_MIN: u8 = 4;
/// Deepest tree: 2^26 buckets, which at the target fill is about 268 million leaves.
pub const DEPTH_MAX: u8 = 26;
/// The smallest share of a level's nodes one thread hashes (even, so that pairs stay whole).
const NODES_PER_TASK: usize = 512;
/// Below this many dirty buckets, hashing stays on one thread (rayon's overhead would dominate).
const PARALLEL_DIRTY_MIN: usize = 2048;

const TAG_LEAF: u8 = 0x00;
const TAG_BUCKET: u8 = 0x01;
const TAG_ROOT: u8 = 0x03;
/// The first block of every node hash, zero-padded to 64 bytes.
const NODE_DOMAIN: &[u8] = b"hoard/merkle/node/v1";
/// SHA-256's initial chaining state (FIPS 180-4, 5.3.3).
const SHA256_INITIAL_STATE: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

/// The hash of a state key.
pub fn key_hash(key: &[u8]) -> Hash {
    Hash::of(key)
}

/// The hash of a leaf: binds the key to its value.
pub fn leaf_hash(key_hash: &Hash, value: &[u8]) -> Hash {
    match leaf_block(key_hash, value) {
        Some((mut block, length)) => sha256_in_place(&mut block, length),
        None => Hash::of_parts(&[&[TAG_LEAF], &key_hash.0, value]),
    }
}

/// [`leaf_hash`] of two leaves at once ([`sha256x2`]) when each fits one block, as balances do.
pub fn leaf_hash_x2(a: (&Hash, &[u8]), b: (&Hash, &[u8])) -> (Hash, Hash) {
    match (leaf_block(a.0, a.1), leaf_block(b.0, b.1)) {
        (Some((mut block_a, length_a)), Some((mut block_b, length_b))) => {
            sha256_in_place_x2(&mut block_a, length_a, &mut block_b, length_b)
        }
        _ => (leaf_hash(a.0, a.1), leaf_hash(b.0, b.1)),
    }
}

/// A leaf's input and its length in one block, when it fits with SHA-256's padding.
fn leaf_block(key_hash: &Hash, value: &[u8]) -> Option<([u8; 64], usize)> {
    /// Longest value whose leaf input, SHA-256's padding byte and 8-byte length fit one
    /// 64-byte block (a balance's 16 bytes do).
    const ONE_BLOCK_VALUE_MAX: usize = 64 - 1 - 32 - 1 - 8;
    if value.len() > ONE_BLOCK_VALUE_MAX {
        return None;
    }
    let length = 1 + 32 + value.len();
    let mut block = [0u8; 64];
    block[0] = TAG_LEAF;
    block[1..33].copy_from_slice(&key_hash.0);
    block[33..length].copy_from_slice(value);
    Some((block, length))
}

/// Bytes an input of `length` bytes takes once SHA-256 has padded it: the input, the byte
/// 0x80, zeros, and the 8-byte length, to a multiple of 64.
const fn padded_len(length: usize) -> usize {
    (length + 9).div_ceil(64) * 64
}

/// Pads `buffer[..length]` in place as SHA-256 does (`buffer` holds at least
/// [`padded_len`]`(length)` bytes) and returns the padded input's blocks.
fn pad(buffer: &mut [u8], length: usize) -> &[[u8; 64]] {
    let padded = &mut buffer[..padded_len(length)];
    let end = padded.len();
    padded[length] = 0x80;
    padded[length + 1..end - 8].fill(0);
    padded[end - 8..].copy_from_slice(&(8 * length as u64).to_be_bytes());
    padded.as_chunks::<64>().0
}

/// SHA-256 of `buffer[..length]`, padded in place ([`pad`]): the same hash as the sha2 crate's,
/// without its buffering of the input, for the short inputs the tree hashes by the million.
fn sha256_in_place(buffer: &mut [u8], length: usize) -> Hash {
    let mut state = SHA256_INITIAL_STATE;
    for block in pad(buffer, length) {
        sha256x2::compress(&mut state, block);
    }
    state_hash(&state)
}

/// [`sha256_in_place`] of two inputs at once ([`sha256x2`]).
fn sha256_in_place_x2(a: &mut [u8], length_a: usize, b: &mut [u8], length_b: usize) -> (Hash, Hash) {
    let (mut state_a, mut state_b) = (SHA256_INITIAL_STATE, SHA256_INITIAL_STATE);
    sha256x2::compress_x2(&mut state_a, pad(a, length_a), &mut state_b, pad(b, length_b));
    (state_hash(&state_a), state_hash(&state_b))
}

/// `(SHA-256(tag || a), SHA-256(tag || b))`, the two at once ([`sha256x2`]), when each input
/// fits [`TAGGED_INLINE_BYTES`] once padded (`None` otherwise): short messages hashed by the
/// thousand, such as a block's transactions and receipts.
pub(crate) fn tagged_sha256_x2(tag: u8, a: &[u8], b: &[u8]) -> Option<(Hash, Hash)> {
    let longest = padded_len(1 + a.len().max(b.len()));
    if longest <= TAGGED_SHORT_BYTES {
        Some(tagged_sha256_x2_in::<TAGGED_SHORT_BYTES>(tag, a, b))
    } else if longest <= TAGGED_INLINE_BYTES {
        Some(tagged_sha256_x2_in::<TAGGED_INLINE_BYTES>(tag, a, b))
    } else {
        None
    }
}

/// [`tagged_sha256_x2`] in buffers of `N` bytes, which hold both inputs padded.
fn tagged_sha256_x2_in<const N: usize>(tag: u8, a: &[u8], b: &[u8]) -> (Hash, Hash) {
    let (length_a, length_b) = (1 + a.len(), 1 + b.len());
    let mut buffer_a = [0u8; N];
    let mut buffer_b = [0u8; N];
    buffer_a[0] = tag;
    buffer_a[1..length_a].copy_from_slice(a);
    buffer_b[0] = tag;
    buffer_b[1..length_b].copy_from_slice(b);
    sha256_in_place_x2(&mut buffer_a, length_a, &mut buffer_b, length_b)
}

/// The longest padded input [`tagged_sha256_x2`] lays out on the stack.
const TAGGED_INLINE_BYTES: usize = 384;
/// Inputs up to this padded length (a transfer's payload of about 140 bytes) get buffers of this
/// size: zeroing two buffers of the larger size for each pair cost more than the interleaving
/// gained (BENCHMARKS.md, seventeenth session).
const TAGGED_SHORT_BYTES: usize = 192;

fn bucket_hash(leaves: &[(Hash, Hash)]) -> Hash {
    if leaves.is_empty() {
        return Hash::ZERO;
    }
    with_bucket_input(leaves, sha256_in_place)
}

/// [`bucket_hash`] of two buckets at once ([`sha256x2`]).
fn bucket_hash_x2(a: &[(Hash, Hash)], b: &[(Hash, Hash)]) -> (Hash, Hash) {
    if a.is_empty() || b.is_empty() {
        return (bucket_hash(a), bucket_hash(b));
    }
    with_bucket_input(a, |input_a, length_a| {
        with_bucket_input(b, |input_b, length_b| {
            sha256_in_place_x2(input_a, length_a, input_b, length_b)
        })
    })
}

/// Calls `hash` with a buffer holding a non-empty bucket's input, `0x01 || leaf_hash…`, and its
/// length, with room to pad it in place: one contiguous input, so that SHA-256 runs its blocks in
/// one go instead of buffering 32 bytes at a time.
fn with_bucket_input<R>(leaves: &[(Hash, Hash)], hash: impl FnOnce(&mut [u8], usize) -> R) -> R {
    /// Buckets up to this many leaves are laid out on the stack (twice the target fill).
    const INLINE: usize = 2 * BUCKET_LEAVES_TARGET;
    debug_assert!(!leaves.is_empty(), "an empty bucket's hash is the zero hash");
    let length = 1 + 32 * leaves.len();
    let fill = |buffer: &mut [u8]| {
        buffer[0] = TAG_BUCKET;
        for (slot, (_, leaf)) in buffer[1..length].chunks_exact_mut(32).zip(leaves) {
            slot.copy_from_slice(&leaf.0);
        }
    };
    if leaves.len() <= INLINE {
        let mut buffer = [0u8; padded_len(1 + 32 * INLINE)];
        fill(&mut buffer);
        hash(&mut buffer, length)
    } else {
        let mut buffer = vec![0u8; padded_len(length)];
        fill(&mut buffer);
        hash(&mut buffer, length)
    }
}

/// The SHA-256 chaining state after one block, `domain` zero-padded to 64 bytes.
pub(crate) fn domain_state(domain: &[u8]) -> [u32; 8] {
    let mut block = [0u8; 64];
    block[..domain.len()].copy_from_slice(domain);
    let mut state = SHA256_INITIAL_STATE;
    sha256x2::compress(&mut state, &block);
    state
}

/// One SHA-256 compression of the block `left || right` from `state`, the resulting 8 words
/// written big-endian: a two-to-one hash for fixed-shape trees (every input has the same
/// length, so no length padding is needed).
pub(crate) fn compress_pair(state: &[u32; 8], left: &Hash, right: &Hash) -> Hash {
    let mut state = *state;
    sha256x2::compress(&mut state, &pair_block(left, right));
    state_hash(&state)
}

/// [`compress_pair`] of two pairs at once ([`sha256x2`]): `(a, b)`.
pub(crate) fn compress_pair_x2(state: &[u32; 8], a: (&Hash, &Hash), b: (&Hash, &Hash)) -> (Hash, Hash) {
    let (mut state_a, mut state_b) = (*state, *state);
    sha256x2::compress_x2(
        &mut state_a,
        &[pair_block(a.0, a.1)],
        &mut state_b,
        &[pair_block(b.0, b.1)],
    );
    (state_hash(&state_a), state_hash(&state_b))
}

/// The 64-byte block `left || right`.
fn pair_block(left: &Hash, right: &Hash) -> [u8; 64] {
    let mut block = [0u8; 64];
    block[..32].copy_from_slice(&left.0);
    block[32..].copy_from_slice(&right.0);
    block
}

/// A SHA-256 chaining state as a hash: its 8 words big-endian.
fn state_hash(state: &[u32; 8]) -> Hash {
    let mut out = [0u8; 32];
    for (bytes, word) in out.chunks_exact_mut(4).zip(state) {
        bytes.copy_from_slice(&word.to_be_bytes());
    }
    Hash(out)
}

/// The chaining state after the node domain block.
fn node_state() -> &'static [u32; 8] {
    static STATE: OnceLock<[u32; 8]> = OnceLock::new();
    STATE.get_or_init(|| domain_state(NODE_DOMAIN))
}

fn node_hash(left: &Hash, right: &Hash) -> Hash {
    if left == &Hash::ZERO && right == &Hash::ZERO {
        return Hash::ZERO;
    }
    compress_pair(node_state(), left, right)
}

/// The nodes `level` (heap indices) from their children in `nodes`, into `out`, two at a time.
fn hash_nodes(nodes: &[Hash], level: &[usize], out: &mut [Hash]) {
    let children = |node: usize| (&nodes[2 * node], &nodes[2 * node + 1]);
    let zero = |(left, right): (&Hash, &Hash)| left == &Hash::ZERO && right == &Hash::ZERO;
    for (at, (pair, out)) in level.chunks(2).zip(out.chunks_mut(2)).enumerate() {
        for &ahead in level.iter().skip(2 * at + PREFETCH_LEAVES_AHEAD).take(2) {
            prefetch(&nodes[2 * ahead]);
        }
        match (pair, out) {
            ([a, b], [out_a, out_b]) => {
                let (a, b) = (children(*a), children(*b));
                let (hash_a, hash_b) = compress_pair_x2(node_state(), a, b);
                *out_a = if zero(a) { Hash::ZERO } else { hash_a };
                *out_b = if zero(b) { Hash::ZERO } else { hash_b };
            }
            ([a], [out_a]) => *out_a = node_hash(&nodes[2 * a], &nodes[2 * a + 1]),
            _ => unreachable!("`out` is as long as `level`"),
        }
    }
}

fn root_hash(depth: u8, leaf_count: u64, top: &Hash) -> Hash {
    Hash::of_parts(&[&[TAG_ROOT, depth], &leaf_count.to_be_bytes(), &top.0])
}

fn bucket_index(key_hash: &Hash, depth: u8) -> usize {
    let prefix = u64::from_be_bytes(key_hash.0[..8].try_into().expect("8 bytes"));
    (prefix >> (64 - u32::from(depth))) as usize
}

/// The incremental Merkle tree. It stores hashes only; the state keeps the values.
#[derive(Clone, Debug)]
pub struct MerkleTree {
    depth: u8,
    leaf_count: u64,
    /// `2^depth` buckets, each sorted by key hash.
    buckets: Vec<Vec<(Hash, Hash)>>,
    /// Heap layout: node 1 is the top, node `2^depth + b` is bucket `b`.
    nodes: Vec<Hash>,
    /// Buckets changed since the last [`MerkleTree::root`].
    dirty: Vec<u32>,
    dirty_mark: Vec<bool>,
    /// Buckets whose node [`MerkleTree::set_many`] has already hashed (while the bucket was in
    /// cache), the nodes above them not yet.
    hashed: Vec<u32>,
    root: Hash,
}

impl Default for MerkleTree {
    fn default() -> Self {
        MerkleTree::with_depth(DEPTH_MIN)
    }
}

impl MerkleTree {
    pub fn new() -> MerkleTree {
        MerkleTree::default()
    }

    fn with_depth(depth: u8) -> MerkleTree {
        assert!((DEPTH_MIN..=DEPTH_MAX).contains(&depth));
        let buckets = 1usize << depth;
        let mut tree = MerkleTree {
            depth,
            leaf_count: 0,
            buckets: vec![Vec::new(); buckets],
            nodes: vec![Hash::ZERO; buckets * 2],
            dirty: Vec::new(),
            dirty_mark: vec![false; buckets],
            hashed: Vec::new(),
            root: Hash::ZERO,
        };
        tree.root = root_hash(depth, 0, &Hash::ZERO);
        tree
    }

    /// Rebuilds a tree from all its leaves (a snapshot's), at the depth the snapshot recorded.
    pub fn from_leaves(depth: u8, leaves: impl IntoIterator<Item = (Hash, Hash)>) -> MerkleTree {
        let mut tree = MerkleTree::with_depth(depth);
        for (key, leaf) in leaves {
            tree.set(key, Some(leaf));
        }
        tree.root();
        tree
    }

    pub fn depth(&self) -> u8 {
        self.depth
    }

    pub fn leaf_count(&self) -> u64 {
        self.leaf_count
    }

    /// Sets (`Some`) or removes (`None`) the leaf for `key_hash`. The root is recomputed lazily.
    pub fn set(&mut self, key_hash: Hash, leaf: Option<Hash>) {
        let index = bucket_index(&key_hash, self.depth);
        let (changed, added) = set_in_bucket(&mut self.buckets[index], &key_hash, leaf);
        self.leaf_count = self
            .leaf_count
            .checked_add_signed(added)
            .expect("leaf count in range");
        if changed && !self.dirty_mark[index] {
            self.dirty_mark[index] = true;
            self.dirty.push(index as u32);
        }
    }

    /// Sets or removes many leaves at once, with the same result as calling [`MerkleTree::set`]
    /// for each in turn (for a key given twice, the later entry wins). The leaves are sorted by
    /// bucket, so that buckets are visited in memory order, and the bucket range is split
    /// between cores: each bucket is touched by exactly one of them, and what changed is
    /// gathered in bucket order, so the result does not depend on the number of threads. Changed
    /// buckets are hashed soon after their update, two at a time (each with the one changed before
    /// it); [`MerkleTree::root`] hashes the rest.
    pub fn set_many(&mut self, leaves: Vec<(Hash, Option<Hash>)>) {
        // Stable, so that of two entries for one key the later stays later.
        let leaves = sorted_by_bucket(&leaves, self.depth);
        let mut changed = Vec::new();
        let added = set_sorted(&mut self.buckets, 0, self.depth, &leaves, &mut changed);
        self.leaf_count = self
            .leaf_count
            .checked_add_signed(added)
            .expect("leaf count stays in range");
        let base = 1usize << self.depth;
        for (index, hash) in changed {
            self.nodes[base + index as usize] = hash;
            self.hashed.push(index);
        }
    }

    /// The root over everything set so far; hashes only what changed since the last call.
    pub fn root(&mut self) -> Hash {
        let mut depth = self.depth;
        while self.leaf_count > (BUCKET_LEAVES_TARGET << depth) as u64 && depth < DEPTH_MAX {
            depth += 1;
        }
        if depth > self.depth {
            self.grow(depth);
        }
        if self.dirty.is_empty() && self.hashed.is_empty() {
            return self.root;
        }
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable();
        for &index in &dirty {
            self.dirty_mark[index as usize] = false;
        }
        let base = 1usize << self.depth;
        let buckets = &self.buckets;
        let hashed: Vec<(usize, Hash)> = if dirty.len() >= PARALLEL_DIRTY_MIN {
            dirty
                .par_iter()
                .map(|&b| (base + b as usize, bucket_hash(&buckets[b as usize])))
                .collect()
        } else {
            dirty
                .iter()
                .map(|&b| (base + b as usize, bucket_hash(&buckets[b as usize])))
                .collect()
        };
        for (node, hash) in &hashed {
            self.nodes[*node] = *hash;
        }
        // Walk up level by level; `level` holds the sorted, distinct dirty node indices.
        let mut level: Vec<usize> = hashed.into_iter().map(|(node, _)| node / 2).collect();
        level.extend(self.hashed.drain(..).map(|b| (base + b as usize) / 2));
        level.sort_unstable();
        level.dedup();
        while !level.is_empty() {
            let nodes = &self.nodes;
            let mut computed = vec![Hash::ZERO; level.len()];
            if level.len() >= PARALLEL_DIRTY_MIN {
                computed
                    .par_chunks_mut(NODES_PER_TASK)
                    .zip(level.par_chunks(NODES_PER_TASK))
                    .for_each(|(out, level)| hash_nodes(nodes, level, out));
            } else {
                hash_nodes(nodes, &level, &mut computed);
            }
            for (&node, hash) in level.iter().zip(computed) {
                self.nodes[node] = hash;
            }
            if level[0] == 1 {
                break;
            }
            for node in level.iter_mut() {
                *node /= 2;
            }
            level.dedup();
        }
        dirty.clear();
        self.dirty = dirty;
        self.root = root_hash(self.depth, self.leaf_count, &self.nodes[1]);
        self.root
    }

    /// Deepens the tree to `depth`: every bucket splits in `2^(depth - self.depth)`.
    fn grow(&mut self, depth: u8) {
        let leaves: Vec<(Hash, Hash)> = std::mem::take(&mut self.buckets).into_iter().flatten().collect();
        let mut grown = MerkleTree::with_depth(depth);
        let base = 1usize << grown.depth;
        for (key, leaf) in leaves {
            // Leaves arrive in key order, so each bucket is built already sorted.
            grown.buckets[bucket_index(&key, grown.depth)].push((key, leaf));
            grown.leaf_count += 1;
        }
        let hashes: Vec<Hash> = grown
            .buckets
            .par_iter()
            .map(|bucket| bucket_hash(bucket))
            .collect();
        grown.nodes[base..].copy_from_slice(&hashes);
        for node in (1..base).rev() {
            grown.nodes[node] = node_hash(&grown.nodes[2 * node], &grown.nodes[2 * node + 1]);
        }
        grown.root = root_hash(grown.depth, grown.leaf_count, &grown.nodes[1]);
        *self = grown;
    }

    /// All leaves in key order (for snapshots).
    pub fn leaves(&self) -> impl Iterator<Item = &(Hash, Hash)> {
        self.buckets.iter().flatten()
    }

    /// A proof for `key_hash`, against the current root. Call [`MerkleTree::root`] first.
    pub fn prove(&self, key_hash: &Hash) -> Proof {
        assert!(
            self.dirty.is_empty() && self.hashed.is_empty(),
            "prove() needs an up-to-date root"
        );
        let index = bucket_index(key_hash, self.depth);
        let mut siblings = Vec::with_capacity(self.depth as usize);
        let mut node = (1usize << self.depth) + index;
        while node > 1 {
            siblings.push(self.nodes[node ^ 1]);
            node /= 2;
        }
        Proof {
            depth: self.depth,
            leaf_count: self.leaf_count,
            bucket: self.buckets[index].clone(),
            siblings,
        }
    }
}

/// `leaves` in the order of their buckets, and within a bucket in their given order (a stable
/// sort by bucket index: of two entries for one key the later stays later). Sorted as 8-byte
/// words, each a bucket index (below 2^[`DEPTH_MAX`]) and the entry's position, instead of
/// moving the 65-byte entries around; the order of keys inside a bucket does not matter here,
/// since each entry finds its own place in its bucket. The sort is a least-significant-digit
/// radix sort on the bucket index, a byte per pass (two passes at depth 15, four at
/// [`DEPTH_MAX`]): each pass is stable, and the words start in position order, so the result
/// is the stable sort, in a few linear passes instead of a comparison sort's many.
fn sorted_by_bucket(leaves: &[(Hash, Option<Hash>)], depth: u8) -> Vec<(Hash, Option<Hash>)> {
    assert!(u32::try_from(leaves.len()).is_ok(), "positions fit 32 bits");
    let mut order: Vec<u64> = leaves
        .iter()
        .enumerate()
        .map(|(position, (key, _))| ((bucket_index(key, depth) as u64) << 32) | position as u64)
        .collect();
    let mut scratch = vec![0u64; order.len()];
    for shift in (0..u32::from(depth)).step_by(8) {
        let digit = |word: u64| ((word >> (32 + shift)) & 0xff) as usize;
        // Where each digit's words start in this pass's output.
        let mut starts = [0usize; 256];
        for &word in &order {
            starts[digit(word)] += 1;
        }
        let mut sum = 0;
        for start in &mut starts {
            let count = *start;
            *start = sum;
            sum += count;
        }
        for &word in &order {
            let at = &mut starts[digit(word)];
            scratch[*at] = word;
            *at += 1;
        }
        std::mem::swap(&mut order, &mut scratch);
    }
    order
        .into_iter()
        .map(|word| leaves[word as u32 as usize])
        .collect()
}

/// Applies `leaves` (sorted by bucket, all falling in `buckets`, the buckets numbered from
/// `first`) to their buckets; appends the number and new hash of each bucket that changed, in
/// order, to `changed`, and returns how many leaves were added (negative: removed).
fn set_sorted(
    buckets: &mut [Vec<(Hash, Hash)>],
    first: usize,
    depth: u8,
    leaves: &[(Hash, Option<Hash>)],
    changed: &mut Vec<(u32, Hash)>,
) -> i64 {
    if leaves.len() >= PARALLEL_DIRTY_MIN && buckets.len() >= 2 {
        let middle = buckets.len() / 2;
        let split = leaves.partition_point(|(key, _)| bucket_index(key, depth) < first + middle);
        let (low, high) = buckets.split_at_mut(middle);
        let mut changed_high = Vec::new();
        let (added_low, added_high) = rayon::join(
            || set_sorted(low, first, depth, &leaves[..split], changed),
            || set_sorted(high, first + middle, depth, &leaves[split..], &mut changed_high),
        );
        changed.append(&mut changed_high);
        return added_low + added_high;
    }
    let mut added = 0;
    let same_bucket = |a: &(Hash, _), b: &(Hash, _)| bucket_index(&a.0, depth) == bucket_index(&b.0, depth);
    let mut at = 0;
    // A changed bucket waiting for another to be hashed with.
    let mut pending: Option<usize> = None;
    for group in leaves.chunk_by(same_bucket) {
        // The buckets a block changes are scattered over memory, and a bucket's search touches
        // one cache line per leaf it compares: start loading the buckets of the leaves ahead,
        // so that their misses overlap this one's work instead of following it.
        if let Some((key, _)) = leaves.get(at + 2 * PREFETCH_LEAVES_AHEAD) {
            prefetch(&buckets[bucket_index(key, depth) - first]);
        }
        if let Some((key, _)) = leaves.get(at + PREFETCH_LEAVES_AHEAD) {
            prefetch_slice(&buckets[bucket_index(key, depth) - first]);
        }
        at += group.len();
        let index = bucket_index(&group[0].0, depth);
        let bucket = &mut buckets[index - first];
        let mut modified = false;
        for (key_hash, leaf) in group {
            let (changed, delta) = set_in_bucket(bucket, key_hash, *leaf);
            modified |= changed;
            added += delta;
        }
        if modified {
            // Hashed two at a time: this bucket with the one changed before it, both still
            // in cache.
            match pending.take() {
                None => pending = Some(index),
                Some(previous) => {
                    let (hash_previous, hash) =
                        bucket_hash_x2(&buckets[previous - first], &buckets[index - first]);
                    changed.push((previous as u32, hash_previous));
                    changed.push((index as u32, hash));
                }
            }
        }
    }
    if let Some(previous) = pending {
        changed.push((previous as u32, bucket_hash(&buckets[previous - first])));
    }
    added
}

/// How far ahead (in leaves) [`set_sorted`] starts loading buckets: their vectors' headers
/// twice as far, their leaves this far.
const PREFETCH_LEAVES_AHEAD: usize = 8;

/// Sets or removes one leaf of a sorted bucket; returns whether the bucket changed and how
/// many leaves were added (-1, 0 or 1).
fn set_in_bucket(bucket: &mut Vec<(Hash, Hash)>, key_hash: &Hash, leaf: Option<Hash>) -> (bool, i64) {
    let position = bucket.binary_search_by(|(key, _)| key.cmp(key_hash));
    match (position, leaf) {
        (Ok(at), Some(leaf)) => {
            let changed = bucket[at].1 != leaf;
            bucket[at].1 = leaf;
            (changed, 0)
        }
        (Err(at), Some(leaf)) => {
            bucket.insert(at, (*key_hash, leaf));
            (true, 1)
        }
        (Ok(at), None) => {
            bucket.remove(at);
            (true, -1)
        }
        (Err(_), None) => (false, 0),
    }
}

/// A proof that a key holds a value (or is absent) under a state root.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proof {
    pub depth: u8,
    pub leaf_count: u64,
    /// The whole bucket the key falls in: `(key_hash, leaf_hash)` in key order.
    pub bucket: Vec<(Hash, Hash)>,
    /// Sibling hashes from the bucket up to the top node.
    pub siblings: Vec<Hash>,
}

impl Proof {
    /// Checks that under `root`, `key` holds `value` (`Some`) or is absent (`None`).
    pub fn verify(&self, root: &Hash, key: &[u8], value: Option<&[u8]>) -> bool {
        if self.siblings.len() != self.depth as usize || !(DEPTH_MIN..=DEPTH_MAX).contains(&self.depth) {
            return false;
        }
        let key = key_hash(key);
        let index = bucket_index(&key, self.depth);
        if !self.bucket.windows(2).all(|pair| pair[0].0 < pair[1].0)
            || !self
                .bucket
                .iter()
                .all(|(other, _)| bucket_index(other, self.depth) == index)
        {
            return false;
        }
        let found = self
            .bucket
            .iter()
            .find(|(other, _)| other == &key)
            .map(|(_, leaf)| *leaf);
        let holds = match (found, value) {
            (Some(leaf), Some(value)) => leaf == leaf_hash(&key, value),
            (None, None) => true,
            _ => false,
        };
        if !holds {
            return false;
        }
        let mut hash = bucket_hash(&self.bucket);
        let mut node = (1usize << self.depth) + index;
        for sibling in &self.siblings {
            hash = if node.is_multiple_of(2) {
                node_hash(&hash, sibling)
            } else {
                node_hash(sibling, &hash)
            };
            node /= 2;
        }
        &root_hash(self.depth, self.leaf_count, &hash) == root
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use sha2::digest::generic_array::GenericArray;
    use sha2::{Digest, Sha256};
    use std::collections::BTreeMap;

    fn kv(i: u64, v: u64) -> (Hash, Hash) {
        let key = key_hash(&i.to_be_bytes());
        (key, leaf_hash(&key, &v.to_be_bytes()))
    }

    /// A leaf short enough for one block is padded by hand: the result must be SHA-256's, for
    /// every value length on both sides of the one-block limit.
    #[test]
    fn leaf_hash_is_sha256_of_tag_key_and_value() {
        let key = key_hash(b"balance key");
        for length in 0..=64 {
            let value: Vec<u8> = (0..length as u8).map(|b| b.wrapping_mul(37)).collect();
            let mut input = vec![TAG_LEAF];
            input.extend_from_slice(&key.0);
            input.extend_from_slice(&value);
            let expected: [u8; 32] = Sha256::digest(&input).into();
            assert_eq!(leaf_hash(&key, &value), Hash(expected), "value of {length} bytes");
        }
    }

    /// Padding in place gives SHA-256 for every length, across the block boundaries (55, 56
    /// and 64 bytes and their multiples), whatever the buffer held past the input.
    #[test]
    fn sha256_in_place_is_sha256() {
        for length in 0..=300 {
            let input: Vec<u8> = (0..length).map(|i| (i * 31 + 7) as u8).collect();
            let mut buffer = vec![0xa5u8; padded_len(length) + 17];
            buffer[..length].copy_from_slice(&input);
            let expected: [u8; 32] = Sha256::digest(&input).into();
            assert_eq!(
                sha256_in_place(&mut buffer, length),
                Hash(expected),
                "{length} bytes"
            );
        }
    }

    /// A bucket hashes as SHA-256 of its tag and its leaf hashes, on the stack and on the heap.
    #[test]
    fn bucket_hash_is_sha256_of_tag_and_leaves() {
        assert_eq!(bucket_hash(&[]), Hash::ZERO);
        for count in 1..=3 * BUCKET_LEAVES_TARGET {
            let leaves: Vec<(Hash, Hash)> = (0..count as u64).map(|i| kv(i, i * 3)).collect();
            let mut input = vec![TAG_BUCKET];
            for (_, leaf) in &leaves {
                input.extend_from_slice(&leaf.0);
            }
            let expected: [u8; 32] = Sha256::digest(&input).into();
            assert_eq!(bucket_hash(&leaves), Hash(expected), "{count} leaves");
        }
    }

    /// Two buckets, two leaves or two nodes hashed at once hash as each alone: buckets of every
    /// size up to three times the target (empty, on the stack, on the heap) against each other,
    /// leaves with values of every length up to 64 bytes (one block or more), and nodes with zero
    /// children on either side.
    #[test]
    fn two_at_once_hash_as_each_alone() {
        let bucket =
            |count: u64| -> Vec<(Hash, Hash)> { (0..count).map(|i| kv(i + 100 * count, i)).collect() };
        for count_a in 0..=3 * BUCKET_LEAVES_TARGET as u64 {
            for count_b in 0..=3 * BUCKET_LEAVES_TARGET as u64 {
                let (a, b) = (bucket(count_a), bucket(count_b));
                assert_eq!(
                    bucket_hash_x2(&a, &b),
                    (bucket_hash(&a), bucket_hash(&b)),
                    "buckets of {count_a} and {count_b}"
                );
            }
        }
        let value = [7u8; 64];
        for length_a in 0..=64 {
            for length_b in [0, 16, 22, 23, length_a] {
                let (key_a, key_b) = (Hash::of(&[length_a as u8]), Hash::of(b"b"));
                assert_eq!(
                    leaf_hash_x2((&key_a, &value[..length_a]), (&key_b, &value[..length_b])),
                    (
                        leaf_hash(&key_a, &value[..length_a]),
                        leaf_hash(&key_b, &value[..length_b])
                    ),
                    "values of {length_a} and {length_b} bytes"
                );
            }
        }
        let nodes = [
            Hash::ZERO,
            Hash::ZERO,
            Hash::of(b"x"),
            Hash::ZERO,
            Hash::ZERO,
            Hash::of(b"y"),
            Hash::of(b"z"),
            Hash::of(b"w"),
        ];
        // Nodes 4 to 7 have children 8 to 15: both zero, the right zero, the left zero, neither.
        let mut padded = vec![Hash::of(b"unused"); 8];
        padded.extend_from_slice(&nodes);
        for level in [&[4usize, 5, 6, 7][..], &[4, 5, 6], &[5, 7], &[4]] {
            let mut out = vec![Hash::of(b"stale"); level.len()];
            hash_nodes(&padded, level, &mut out);
            let alone: Vec<Hash> = level
                .iter()
                .map(|&n| node_hash(&padded[2 * n], &padded[2 * n + 1]))
                .collect();
            assert_eq!(out, alone, "level {level:?}");
        }
        assert_eq!(node_hash(&Hash::ZERO, &Hash::ZERO), Hash::ZERO);
    }

    /// The node construction is SHA-256 without its final length block: hashing the domain
    /// block and `left || right` and then the standard padding block reaches the same state
    /// that `node_hash` stops at, one compression earlier.
    #[test]
    fn node_hash_is_the_sha256_chaining_state() {
        let left = Hash::of(b"left");
        let right = Hash::of(b"right");
        let mut block = [0u8; 64];
        block[..NODE_DOMAIN.len()].copy_from_slice(NODE_DOMAIN);
        let mut state = SHA256_INITIAL_STATE;
        sha2::compress256(&mut state, std::slice::from_ref(GenericArray::from_slice(&block)));
        block[..32].copy_from_slice(&left.0);
        block[32..].copy_from_slice(&right.0);
        sha2::compress256(&mut state, std::slice::from_ref(GenericArray::from_slice(&block)));
        let node = node_hash(&left, &right);
        let words: Vec<u32> = node
            .0
            .chunks_exact(4)
            .map(|b| u32::from_be_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(words, state);
        // Finishing the same input as standard SHA-256 (one more block: 0x80, zeros, the
        // length 1024 bits) must agree with the sha2 crate, which checks the initial state.
        let mut padding = [0u8; 64];
        padding[0] = 0x80;
        padding[56..].copy_from_slice(&1024u64.to_be_bytes());
        sha2::compress256(
            &mut state,
            std::slice::from_ref(GenericArray::from_slice(&padding)),
        );
        let mut full = [0u8; 32];
        for (bytes, word) in full.chunks_exact_mut(4).zip(state) {
            bytes.copy_from_slice(&word.to_be_bytes());
        }
        let mut domain = [0u8; 64];
        domain[..NODE_DOMAIN.len()].copy_from_slice(NODE_DOMAIN);
        assert_eq!(Hash(full), Hash::of_parts(&[&domain, &left.0, &right.0]));
        assert_ne!(node_hash(&left, &right), node_hash(&right, &left));
        assert_eq!(node_hash(&Hash::ZERO, &Hash::ZERO), Hash::ZERO);
    }

    /// A bucket hashes as `SHA-256(0x01 || leaf_hash…)`, however many leaves it holds.
    #[test]
    fn bucket_hash_is_sha256_of_its_leaves() {
        for len in [1u64, 2, 8, 9, 40] {
            let leaves: Vec<(Hash, Hash)> = (0..len).map(|i| kv(i, i)).collect();
            let mut input = vec![TAG_BUCKET];
            for (_, leaf) in &leaves {
                input.extend_from_slice(&leaf.0);
            }
            assert_eq!(bucket_hash(&leaves), Hash::of(&input), "{len} leaves");
        }
        assert_eq!(bucket_hash(&[]), Hash::ZERO);
    }

    #[test]
    fn empty_trees_agree() {
        assert_eq!(MerkleTree::new().root(), MerkleTree::new().root());
    }

    #[test]
    fn growth_keeps_every_leaf_and_proofs_verify() {
        let mut tree = MerkleTree::new();
        for i in 0..5_000u64 {
            let (key, leaf) = kv(i, i * 3);
            tree.set(key, Some(leaf));
            if i % 777 == 0 {
                tree.root();
            }
        }
        let root = tree.root();
        assert!(tree.depth() > DEPTH_MIN, "5000 leaves must have grown the tree");
        assert_eq!(tree.leaf_count(), 5_000);
        for i in [0u64, 1, 999, 4_999] {
            let proof = tree.prove(&key_hash(&i.to_be_bytes()));
            assert!(proof.verify(&root, &i.to_be_bytes(), Some(&(i * 3).to_be_bytes())));
            assert!(!proof.verify(&root, &i.to_be_bytes(), Some(&(i * 3 + 1).to_be_bytes())));
            assert!(!proof.verify(&root, &i.to_be_bytes(), None));
        }
        let absent = 1_000_000u64.to_be_bytes();
        let proof = tree.prove(&key_hash(&absent));
        assert!(proof.verify(&root, &absent, None));
        assert!(!proof.verify(&root, &absent, Some(b"x")));
        let rebuilt = MerkleTree::from_leaves(tree.depth(), tree.leaves().copied());
        assert_eq!(rebuilt.clone().root(), root);
    }

    /// Batches large enough to be split between cores agree with one `set` after another,
    /// inserts, updates and removals alike.
    #[test]
    fn large_batches_agree_with_single_sets() {
        let mut single = MerkleTree::new();
        let mut batched = MerkleTree::new();
        for round in 0..3u64 {
            let batch: Vec<(Hash, Option<Hash>)> = (0..12_000u64)
                .map(|i| {
                    let (key, leaf) = kv(i * (round + 1) % 15_000, i + round);
                    (key, (i % 5 != round).then_some(leaf))
                })
                .collect();
            for (key, leaf) in &batch {
                single.set(*key, *leaf);
            }
            batched.set_many(batch);
            // Single sets after a batch, before the root, into buckets the batch hashed.
            for i in 0..50u64 {
                let (key, leaf) = kv(i * 7, round);
                single.set(key, Some(leaf));
                batched.set(key, Some(leaf));
            }
            assert_eq!(batched.root(), single.root());
            assert_eq!(batched.leaf_count(), single.leaf_count());
        }
    }

    /// The radix sort is the stable sort by bucket index, at shallow and deep trees (one to four
    /// passes), for keys that share their bucket (and their first 8 bytes) and for keys given
    /// more than once, in batches from empty to thousands.
    #[test]
    fn word_sort_is_the_stable_sort_by_bucket() {
        for depth in [DEPTH_MIN, 15, DEPTH_MAX] {
            for size in [0usize, 1, 2, 7, 300, 3 * PARALLEL_DIRTY_MIN] {
                let leaves: Vec<(Hash, Option<Hash>)> = (0..size as u64)
                    .map(|i| {
                        let mut key = Hash::of(&(i % 97).to_be_bytes());
                        // Every third key shares its first 8 bytes with one of 5 others, and
                        // differs from them only further on, in an order unrelated to `i`.
                        if i % 3 == 0 {
                            key.0[..8].copy_from_slice(&[0x42; 8]);
                            key.0[31] = (i % 5) as u8;
                        }
                        (key, (i % 4 != 0).then(|| Hash::of(&i.to_le_bytes())))
                    })
                    .collect();
                let mut expected = leaves.clone();
                expected.sort_by_key(|(key, _)| bucket_index(key, depth));
                assert_eq!(
                    sorted_by_bucket(&leaves, depth),
                    expected,
                    "{size} leaves at depth {depth}"
                );
            }
        }
    }

    proptest! {
        /// The root depends only on the final set of leaves (and the depth history), not on
        /// the order of updates or on when roots were taken in between.
        #[test]
        fn root_is_a_function_of_the_contents(ops in prop::collection::vec((0u64..300, prop::option::of(0u64..5)), 1..400),
                                              checkpoints in prop::collection::vec(any::<bool>(), 400)) {
            let mut incremental = MerkleTree::new();
            let mut model = BTreeMap::new();
            for (step, (key, value)) in ops.iter().enumerate() {
                let (k, leaf) = kv(*key, value.unwrap_or(0));
                incremental.set(k, value.map(|_| leaf));
                match value { Some(v) => { model.insert(*key, *v); } None => { model.remove(key); } }
                if checkpoints[step] { incremental.root(); }
            }
            let root = incremental.root();
            let mut fresh = MerkleTree::with_depth(incremental.depth());
            for (key, value) in &model {
                let (k, leaf) = kv(*key, *value);
                fresh.set(k, Some(leaf));
            }
            prop_assert_eq!(fresh.root(), root);
            prop_assert_eq!(incremental.leaf_count(), model.len() as u64);
            // The same updates in batches (keys repeat inside a batch: the later one wins).
            let mut batched = MerkleTree::new();
            let mut batch = Vec::new();
            for (step, (key, value)) in ops.iter().enumerate() {
                let (k, leaf) = kv(*key, value.unwrap_or(0));
                batch.push((k, value.map(|_| leaf)));
                if checkpoints[step] {
                    batched.set_many(std::mem::take(&mut batch));
                    batched.root();
                }
            }
            batched.set_many(batch);
            prop_assert_eq!(batched.root(), root);
        }
    }
}
