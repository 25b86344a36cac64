//! Blocks: a header committing to the parent, the transactions, their outcomes and the state.

use serde::{Deserialize, Serialize};

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
const TAG_LIST_NODE: u8 = 0x11;

/// A binary Merkle root over a list (an odd node is carried up unchanged; the empty list has
/// the zero root).
pub fn list_root(leaves: impl Iterator<Item = Hash>) -> Hash {
    let mut level: Vec<Hash> = leaves
        .map(|leaf| Hash::of_parts(&[&[TAG_LIST_LEAF], &leaf.0]))
        .collect();
    if level.is_empty() {
        return Hash::ZERO;
    }
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|pair| match pair {
                [left, right] => Hash::of_parts(&[&[TAG_LIST_NODE], &left.0, &right.0]),
                [single] => *single,
                _ => unreachable!(),
            })
            .collect();
    }
    level[0]
}

/// The hash of a receipt, as `outcome_root` commits to it.
pub fn receipt_hash(receipt: &Receipt) -> Hash {
    Hash::of(&rmp_serde::to_vec(receipt).expect("receipt serialises"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_root_depends_on_order_and_content() {
        let a = Hash::of(b"a");
        let b = Hash::of(b"b");
        let c = Hash::of(b"c");
        assert_eq!(list_root([].into_iter()), Hash::ZERO);
        assert_ne!(list_root([a, b, c].into_iter()), list_root([b, a, c].into_iter()));
        assert_ne!(list_root([a, b].into_iter()), list_root([a, b, c].into_iter()));
        assert_eq!(list_root([a, b, c].into_iter()), list_root([a, b, c].into_iter()));
    }
}
