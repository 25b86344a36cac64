//! Transactions: what a studio, a player or the operator asks the ledger to do.
//!
//! A [`Transaction`] carries its payload as the exact MessagePack bytes that were signed, so
//! that a client in any language signs what it sent, with no canonical re-encoding to agree on.
//! Signatures are over `TX_SIGNING_DOMAIN || payload`. The payload names the chain, the
//! tenant, the event id and an expiry height: a captured signature is useless on another
//! chain, for another tenant, after its expiry, or a second time (the event id is deduplicated
//! until the expiry height passes).

mod fast;

use serde::{Deserialize, Serialize};

use crate::asset::Amount;
use crate::asset::{Asset, ClassId, CurrencyId, Custody, EventId, Grant, ItemId, TenantId};
use crate::constants::{TX_PAYLOAD_BYTES_MAX, TX_SIGNATURES_MAX};
use crate::crypto::{Hash, Keypair, PublicKey, Signature};
use crate::error::{Error, Result};

/// The domain every transaction signature is made in.
pub const TX_SIGNING_DOMAIN: &[u8] = b"hoard/tx/v1\0";

/// The signed part of a transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxPayload {
    /// The chain this transaction is for (from the genesis file).
    pub chain_id: u64,
    pub tenant: TenantId,
    pub event_id: EventId,
    /// The last height at which this transaction may be applied.
    pub expires_at: u64,
    pub body: TxBody,
}

/// What the transaction does, and so who must sign it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TxBody {
    /// Operator: create a tenant with its studio key.
    RegisterTenant { name: String, studio_key: PublicKey },
    /// Studio: open an account for a player key, self-custodied or custodial.
    RegisterAccount { account: PublicKey, custody: Custody },
    /// Studio: define a currency.
    DefineCurrency {
        currency: CurrencyId,
        decimals: u8,
        max_supply: Amount,
    },
    /// Studio: define an item class.
    DefineItemClass {
        class: ClassId,
        stackable: bool,
        max_supply: Amount,
        metadata_hash: Hash,
    },
    /// Studio: create new units or items for an account.
    Mint { to: PublicKey, grant: Grant },
    /// Owner (or studio, for custodial accounts): give assets to another account.
    Transfer {
        from: PublicKey,
        to: PublicKey,
        assets: Vec<Asset>,
    },
    /// Owner (or studio, for custodial accounts): destroy assets.
    Burn { from: PublicKey, assets: Vec<Asset> },
    /// Owner: take `quantity` off stack `item` into a new stack `new_item`.
    Split {
        owner: PublicKey,
        item: ItemId,
        quantity: Amount,
        new_item: ItemId,
    },
    /// Owner: pour stack `from` into stack `into` (same class); `from` is gone afterwards.
    Merge {
        owner: PublicKey,
        into: ItemId,
        from: ItemId,
    },
    /// Both parties: an atomic exchange; applies whole or not at all.
    Swap { left: SwapSide, right: SwapSide },
    /// Studio: many grants under one signature, each applied and reported on its own.
    Settle { entries: Vec<Settlement> },
}

/// One side of a swap: who gives what.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwapSide {
    pub account: PublicKey,
    pub gives: Vec<Asset>,
}

/// One entry of a batched settlement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settlement {
    pub to: PublicKey,
    pub grant: Grant,
}

/// One signature on a transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxSignature {
    pub signer: PublicKey,
    pub signature: Signature,
}

/// A transaction as it travels and is stored: payload bytes plus signatures.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transaction {
    /// MessagePack of [`TxPayload`], exactly as signed.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    pub signatures: Vec<TxSignature>,
}

impl TxPayload {
    /// Encodes the payload (structs as MessagePack arrays, the compact form).
    pub fn encode(&self) -> Vec<u8> {
        rmp_serde::to_vec(self).expect("payload encoding cannot fail")
    }

    /// Encodes and signs with each key, in order.
    pub fn sign(&self, keys: &[&Keypair]) -> Transaction {
        let payload = self.encode();
        let signatures = keys
            .iter()
            .map(|key| TxSignature {
                signer: key.public(),
                signature: key.sign(TX_SIGNING_DOMAIN, &payload),
            })
            .collect();
        Transaction { payload, signatures }
    }
}

impl Transaction {
    /// Decodes the payload, enforcing the size limits first.
    pub fn decode_payload(&self) -> Result<TxPayload> {
        if self.payload.len() > TX_PAYLOAD_BYTES_MAX {
            return Err(Error::TooLarge {
                what: "transaction payload",
                size: self.payload.len(),
                limit: TX_PAYLOAD_BYTES_MAX,
            });
        }
        if self.signatures.len() > TX_SIGNATURES_MAX {
            return Err(Error::Malformed("too many signatures"));
        }
        // The commonest bodies in their usual form are read directly (a ledger decodes every
        // transaction of every block); rmp-serde decides the rest.
        match fast::payload(&self.payload) {
            Some(payload) => Ok(payload),
            None => rmp_serde::from_slice(&self.payload).map_err(|e| Error::Decode(e.to_string())),
        }
    }

    /// The transaction's id: the hash of its payload (signatures excluded, so that re-signing
    /// does not make a different transaction).
    pub fn id(&self) -> Hash {
        Hash::of(&self.payload)
    }

    /// Checks every signature cryptographically (not whether the signers are the right ones:
    /// that depends on the state, and the state machine decides it).
    pub fn verify_signatures(&self) -> Result<()> {
        if self.signatures.is_empty() {
            return Err(Error::BadSignature);
        }
        for entry in &self.signatures {
            entry
                .signer
                .verify(TX_SIGNING_DOMAIN, &self.payload, &entry.signature)?;
        }
        Ok(())
    }

    /// The bytes each signature covers.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(TX_SIGNING_DOMAIN.len() + self.payload.len());
        bytes.extend_from_slice(TX_SIGNING_DOMAIN);
        bytes.extend_from_slice(&self.payload);
        bytes
    }

    /// The signers, in order.
    pub fn signers(&self) -> impl Iterator<Item = &PublicKey> {
        self.signatures.iter().map(|entry| &entry.signer)
    }
}

/// Checks the signatures of many transactions with ed25519 batch verification, in chunks.
/// Returns, for each transaction, whether all its signatures are valid. A chunk that fails as a
/// batch is checked one by one, so one bad signature costs its chunk, not the whole batch.
pub fn verify_transactions(transactions: &[Transaction]) -> Vec<bool> {
    const CHUNK: usize = 64;
    let mut valid = vec![true; transactions.len()];
    for (chunk_index, chunk) in transactions.chunks(CHUNK).enumerate() {
        let signed: Vec<Vec<u8>> = chunk.iter().map(Transaction::signed_bytes).collect();
        let mut items = Vec::with_capacity(chunk.len() * 2);
        let mut empty = false;
        for (tx, bytes) in chunk.iter().zip(&signed) {
            empty |= tx.signatures.is_empty() || tx.signatures.len() > TX_SIGNATURES_MAX;
            for entry in &tx.signatures {
                items.push(crate::crypto::SignedMessage {
                    key: &entry.signer,
                    message: bytes,
                    signature: &entry.signature,
                });
            }
        }
        if !empty && crate::crypto::verify_batch(&items).is_ok() {
            continue;
        }
        for (offset, tx) in chunk.iter().enumerate() {
            valid[chunk_index * CHUNK + offset] =
                tx.signatures.len() <= TX_SIGNATURES_MAX && tx.verify_signatures().is_ok();
        }
    }
    valid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload() -> TxPayload {
        TxPayload {
            chain_id: 1,
            tenant: TenantId(7),
            event_id: EventId::from_u128(42),
            expires_at: 100,
            body: TxBody::Transfer {
                from: Keypair::from_seed([1; 32]).public(),
                to: Keypair::from_seed([2; 32]).public(),
                assets: vec![Asset::Currency {
                    currency: CurrencyId::new("GOLD"),
                    amount: Amount(5),
                }],
            },
        }
    }

    #[test]
    fn signed_transactions_verify_and_tampering_is_caught() {
        let key = Keypair::from_seed([1; 32]);
        let tx = payload().sign(&[&key]);
        tx.verify_signatures().unwrap();
        assert_eq!(tx.decode_payload().unwrap(), payload());
        let mut tampered = tx.clone();
        let last = tampered.payload.len() - 1;
        tampered.payload[last] ^= 1;
        assert!(tampered.verify_signatures().is_err());
        assert_eq!(
            verify_transactions(&[tx.clone(), tampered, tx]),
            vec![true, false, true]
        );
    }

    #[test]
    fn oversized_payload_is_refused_before_decoding() {
        let tx = Transaction {
            payload: vec![0; TX_PAYLOAD_BYTES_MAX + 1],
            signatures: vec![],
        };
        assert!(matches!(tx.decode_payload(), Err(Error::TooLarge { .. })));
    }

    #[test]
    fn a_transaction_without_signatures_does_not_verify() {
        let tx = Transaction {
            payload: payload().encode(),
            signatures: vec![],
        };
        assert!(tx.verify_signatures().is_err());
        assert_eq!(verify_transactions(&[tx]), vec![false]);
    }
}
