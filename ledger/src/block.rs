//! Blocks: a header committing to the parent, the transactions, their outcomes and the state.

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::merkle::{compress_pair, compress_pair_x2, domain_state, tagged_sha256_x2};

use hoard_types::{Hash, Receipt, Transaction};

/// A block's header. Its hash names the block; the next block's `parent` is that hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockHeader {
    pub height: u64,
    pub parent: Hash,
    /// From the PBFT primary's proposal; informational (nothing in the state depends on it).
    pub timestamp_ms: u64,
    /// Merkle root over the transactions' ids, in block order.
    pub tx_root: Hash,
    /// Merkle root over the receipts, in block order.
    pub outcome_root: Hash,
    /// The state root after the block (see `merkle`).
    pub state_root: Hash,
}

impl BlockHeader {
    pub fn hash(&self) -> Hash {
        Hash::of(&rmp_serde::to_vec(self).expect("header serialises"))
    }
}

/// A block: its header and its transactions. Receipts are not stored: executing the block
/// reproduces them, and `outcome_root` proves they are the same everywhere.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    pub header: BlockHeader,
    pub transactions: Vec<Transaction>,
}

impl Block {
    pub fn encode(&self) -> Vec<u8> {
        rmp_serde::to_vec(self).expect("block serialises")
    }

    pub fn decode(bytes: &[u8]) -> crate::Result<Block> {
        rmp_serde::from_slice(bytes).map_err(|e| crate::LedgerError::Decode(e.to_string()))
    }
}

const TAG_LIST_LEAF: u8 = 0x10;
/// The first block of every list node hash, zero-padded to 64 bytes.
const LIST_NODE_DOMAIN: &[u8] = b"hoard/list/node/v1";

/// The leaf a list root commits to for `bytes`: `SHA-256(0x10 || bytes)`.
pub fn list_leaf(bytes: &[u8]) -> Hash {
    Hash::of_parts(&[&[TAG_LIST_LEAF], bytes])
}

/// A list node: one SHA-256 compression of `left || right` from the chaining state after the
/// block `"hoard/list/node/v1"` zero-padded to 64 bytes (as the state tree's nodes, with their
/// own domain; see `merkle`).
pub fn list_node(left: &Hash, right: &Hash) -> Hash {
    compress_pair(list_node_state(), left, right)
}

fn list_node_state() -> &'static [u32; 8] {
    static STATE: OnceLock<[u32; 8]> = OnceLock::new();
    STATE.get_or_init(|| domain_state(LIST_NODE_DOMAIN))
}

/// A binary Merkle root over list leaves (made by [`list_leaf`]) and nodes (made by
/// [`list_node`]); an odd node is carried up unchanged, the empty list has the zero root.
pub fn list_root(leaves: impl Iterator<Item = Hash>) -> Hash {
    let mut level: Vec<Hash> = leaves.collect();
    if level.is_empty() {
        return Hash::ZERO;
    }
    while level.len() > 1 {
        // Two nodes at a time (`compress_pair_x2`), from four hashes of this level.
        let mut next = Vec::with_capacity(level.len().div_ceil(2));
        let mut fours = level.chunks_exact(4);
        for four in &mut fours {
            let (left, right) =
                compress_pair_x2(list_node_state(), (&four[0], &four[1]), (&four[2], &four[3]));
            next.push(left);
            next.push(right);
        }
        next.extend(fours.remainder().chunks(2).map(|pair| match pair {
            [left, right] => list_node(left, right),
            [single] => *single,
            _ => unreachable!(),
        }));
        level = next;
    }
    level[0]
}

/// A transaction's leaf under `tx_root`: over its payload (what was signed).
pub fn transaction_leaf(transaction: &Transaction) -> Hash {
    list_leaf(&transaction.payload)
}

/// [`list_leaf`] of two byte strings at once (`sha256x2`), for short ones; one after the other
/// otherwise.
pub fn list_leaf_x2(a: &[u8], b: &[u8]) -> (Hash, Hash) {
    tagged_sha256_x2(TAG_LIST_LEAF, a, b).unwrap_or_else(|| (list_leaf(a), list_leaf(b)))
}

/// [`transaction_leaf`] of two transactions at once.
pub fn transaction_leaf_x2(a: &Transaction, b: &Transaction) -> (Hash, Hash) {
    list_leaf_x2(&a.payload, &b.payload)
}

/// [`receipt_leaf`] of two receipts at once, when their encodings are short, as most are (a
/// settlement's lists the outcome of every entry); one after the other otherwise.
pub fn receipt_leaf_x2(a: &Receipt, b: &Receipt) -> (Hash, Hash) {
    /// Room for a receipt whose outcome is a word or two: its leaf is one SHA-256 block.
    const SHORT: usize = 64;
    const _: () = assert!(Receipt::APPLIED_ENCODED_MAX <= SHORT);
    /// MessagePack of `receipt` in `buffer`, if it fits: an applied one's written directly
    /// (the same bytes), any other by rmp-serde.
    fn encode<'b>(receipt: &Receipt, buffer: &'b mut [u8; SHORT]) -> Option<&'b [u8]> {
        let applied: &mut [u8; Receipt::APPLIED_ENCODED_MAX] = (&mut buffer[..Receipt::APPLIED_ENCODED_MAX])
            .try_into()
            .expect("fits");
        if let Some(length) = receipt.encode_applied(applied) {
            return Some(&buffer[..length]);
        }
        let mut rest = &mut buffer[..];
        rmp_serde::encode::write(&mut rest, receipt).ok()?;
        let written = SHORT - rest.len();
        Some(&buffer[..written])
    }
    let (mut buffer_a, mut buffer_b) = ([0u8; SHORT], [0u8; SHORT]);
    match (encode(a, &mut buffer_a), encode(b, &mut buffer_b)) {
        (Some(a), Some(b)) => list_leaf_x2(a, b),
        _ => (receipt_leaf(a), receipt_leaf(b)),
    }
}

/// A receipt's leaf under `outcome_root`: over its MessagePack encoding, the same bytes as
/// `list_leaf(&rmp_serde::to_vec(receipt))` (an applied receipt's written directly, any other
/// streamed into the hash).
pub fn receipt_leaf(receipt: &Receipt) -> Hash {
    let mut applied = [0u8; Receipt::APPLIED_ENCODED_MAX];
    if let Some(length) = receipt.encode_applied(&mut applied) {
        return list_leaf(&applied[..length]);
    }
    struct Writer(Sha256);
    impl std::io::Write for Writer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.update(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut writer = Writer(Sha256::new());
    writer.0.update([TAG_LIST_LEAF]);
    rmp_serde::encode::write(&mut writer, receipt).expect("receipt serialises");
    Hash(writer.0.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipt_leaf_hashes_the_receipt_encoding() {
        let receipt = Receipt {
            tenant: hoard_types::TenantId(3),
            event_id: hoard_types::EventId::from_u128(9),
            height: 12,
            outcome: hoard_types::Outcome::Applied,
            duplicate: false,
        };
        assert_eq!(
            receipt_leaf(&receipt),
            list_leaf(&rmp_serde::to_vec(&receipt).unwrap())
        );
    }

    /// Two leaves at once are the two one at a time: for every pair of lengths on both sides of
    /// each SHA-256 block boundary and of the inline limits (past the last it falls back).
    #[test]
    fn two_leaves_at_once_are_each_alone() {
        let bytes = |length: usize, seed: u8| -> Vec<u8> {
            (0..length).map(|i| (i as u8).wrapping_mul(29) ^ seed).collect()
        };
        let lengths: Vec<usize> = (0..=130)
            .chain([183, 184, 190, 191, 247, 248, 300, 373, 374, 375, 376, 600])
            .collect();
        for &a in &lengths {
            for &b in [0, 1, 54, 55, 56, 63, 64, 119, 120, 374, 375, 1000].iter() {
                let (x, y) = (bytes(a, 1), bytes(b, 2));
                assert_eq!(
                    list_leaf_x2(&x, &y),
                    (list_leaf(&x), list_leaf(&y)),
                    "{a} and {b} bytes"
                );
            }
        }
    }

    /// Two receipts' leaves at once are each alone's, short and long (a settlement's outcome of
    /// 400 entries does not fit the short buffer).
    #[test]
    fn two_receipt_leaves_at_once_are_each_alone() {
        let receipt = |entries: usize, height: u64| Receipt {
            tenant: hoard_types::TenantId(3),
            event_id: hoard_types::EventId::from_u128(u128::from(height) * 7),
            height,
            outcome: if entries == 0 {
                hoard_types::Outcome::Applied
            } else {
                hoard_types::Outcome::Settled {
                    entries: vec![Some(hoard_types::Rejection::UnknownAccount); entries],
                }
            },
            duplicate: height.is_multiple_of(2),
        };
        for (a, b) in [(0, 0), (0, 1), (1, 0), (3, 400), (400, 0), (400, 400)] {
            let (x, y) = (receipt(a, 11), receipt(b, 1 << 40));
            assert_eq!(
                receipt_leaf_x2(&x, &y),
                (receipt_leaf(&x), receipt_leaf(&y)),
                "{a} and {b} entries"
            );
        }
    }

    /// The root of every length up to 40 is the plain pairwise one: each level's nodes from
    /// adjacent pairs, an odd last hash carried up as it is.
    #[test]
    fn list_root_is_the_pairwise_root_at_every_length() {
        fn pairwise(level: Vec<Hash>) -> Hash {
            if level.len() == 1 {
                return level[0];
            }
            let next = level
                .chunks(2)
                .map(|pair| {
                    if pair.len() == 2 {
                        list_node(&pair[0], &pair[1])
                    } else {
                        pair[0]
                    }
                })
                .collect();
            pairwise(next)
        }
        for length in 1..=40u32 {
            let leaves: Vec<Hash> = (0..length).map(|i| list_leaf(&i.to_be_bytes())).collect();
            assert_eq!(
                list_root(leaves.clone().into_iter()),
                pairwise(leaves),
                "{length} leaves"
            );
        }
    }

    #[test]
    fn list_root_depends_on_order_and_content() {
        let a = list_leaf(b"a");
        let b = list_leaf(b"b");
        let c = list_leaf(b"c");
        assert_eq!(list_root([].into_iter()), Hash::ZERO);
        assert_ne!(list_root([a, b, c].into_iter()), list_root([b, a, c].into_iter()));
        assert_ne!(list_root([a, b].into_iter()), list_root([a, b, c].into_iter()));
        assert_eq!(list_root([a, b, c].into_iter()), list_root([a, b, c].into_iter()));
        assert_eq!(
            list_root([a, b, c].into_iter()),
            list_node(&list_node(&a, &b), &c)
        );
        assert_ne!(list_node(&a, &b), list_node(&b, &a));
    }

    /// A list node is SHA-256 of the domain block and `left || right`, stopped before the
    /// final length block (the test beside `merkle::node_hash` checks that construction
    /// against the sha2 crate); it differs from a state-tree node over the same pair.
    #[test]
    fn list_nodes_are_one_compression_in_their_own_domain() {
        let left = list_leaf(b"left");
        let right = list_leaf(b"right");
        let mut domain = [0u8; 64];
        domain[..LIST_NODE_DOMAIN.len()].copy_from_slice(LIST_NODE_DOMAIN);
        let mut padding = [0u8; 64];
        padding[0] = 0x80;
        padding[56..].copy_from_slice(&1024u64.to_be_bytes());
        let node = list_node(&left, &right);
        let mut words = [0u32; 8];
        for (word, bytes) in words.iter_mut().zip(node.0.chunks_exact(4)) {
            *word = u32::from_be_bytes(bytes.try_into().unwrap());
        }
        sha2::compress256(
            &mut words,
            std::slice::from_ref(sha2::digest::generic_array::GenericArray::from_slice(&padding)),
        );
        let full: Vec<u8> = words.iter().flat_map(|w| w.to_be_bytes()).collect();
        assert_eq!(full, Hash::of_parts(&[&domain, &left.0, &right.0]).0);
        assert_ne!(
            node,
            crate::merkle::compress_pair(&domain_state(b"hoard/merkle/node/v1"), &left, &right)
        );
    }
}
