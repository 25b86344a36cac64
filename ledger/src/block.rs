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

/// The leaf a list root commits to for `bytes`: `SHA-256(0x10 || bytes)`.
pub fn list_leaf(bytes: &[u8]) -> Hash {
    Hash::of_parts(&[&[TAG_LIST_LEAF], bytes])
}

/// A binary Merkle root over list leaves (made by [`list_leaf`]); a node is
/// `SHA-256(0x11 || left || right)`, an odd node is carried up unchanged, the empty list has
/// the zero root.
pub fn list_root(leaves: impl Iterator<Item = Hash>) -> Hash {
    let mut level: Vec<Hash> = leaves.collect();
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

/// A transaction's leaf under `tx_root`: over its payload (what was signed).
pub fn transaction_leaf(transaction: &Transaction) -> Hash {
    list_leaf(&transaction.payload)
}

/// A receipt's leaf under `outcome_root`: over its MessagePack encoding.
pub fn receipt_leaf(receipt: &Receipt) -> Hash {
    list_leaf(&rmp_serde::to_vec(receipt).expect("receipt serialises"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_root_depends_on_order_and_content() {
        let a = list_leaf(b"a");
        let b = list_leaf(b"b");
        let c = list_leaf(b"c");
        assert_eq!(list_root([].into_iter()), Hash::ZERO);
        assert_ne!(list_root([a, b, c].into_iter()), list_root([b, a, c].into_iter()));
        assert_ne!(list_root([a, b].into_iter()), list_root([a, b, c].into_iter()));
        assert_eq!(list_root([a, b, c].into_iter()), list_root([a, b, c].into_iter()));
    }
}
