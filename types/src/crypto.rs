//! Keys, signatures and hashes: ed25519 for authority, SHA-256 for commitments.
//!
//! Every signature Hoard checks is made over `domain || payload`, where the domain names
//! what is being signed (a transaction, a session token, a consensus message), so that a
//! signature made for one purpose can never be replayed as another.

use std::fmt;

use ed25519_dalek::Signer;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// A 32-byte SHA-256 digest. Ordered as its bytes are (lexicographically).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Hash(#[serde(with = "serde_bytes_array32")] pub [u8; 32]);

impl Ord for Hash {
    /// The bytes' lexicographic order, compared as four big-endian words: inline, without the
    /// call to `memcmp` the derived order makes (the state tree sorts and searches hashes by
    /// the million).
    fn cmp(&self, other: &Hash) -> std::cmp::Ordering {
        let word =
            |hash: &Hash, i: usize| u64::from_be_bytes(hash.0[8 * i..8 * i + 8].try_into().expect("8 bytes"));
        (0..4)
            .map(|i| word(self, i).cmp(&word(other, i)))
            .find(|order| order.is_ne())
            .unwrap_or(std::cmp::Ordering::Equal)
    }
}

impl PartialOrd for Hash {
    fn partial_cmp(&self, other: &Hash) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Hash {
    pub const ZERO: Hash = Hash([0; 32]);

    /// SHA-256 of `data`.
    pub fn of(data: &[u8]) -> Hash {
        Hash(Sha256::digest(data).into())
    }

    /// SHA-256 over several parts, without concatenating them first.
    pub fn of_parts(parts: &[&[u8]]) -> Hash {
        let mut hasher = Sha256::new();
        for part in parts {
            hasher.update(part);
        }
        Hash(hasher.finalize().into())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", &self.to_hex()[..12])
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// An ed25519 public key. Accounts, studios, the operator and replicas are all named by one.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PublicKey(#[serde(with = "serde_bytes_array32")] pub [u8; 32]);

impl PublicKey {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex digits (surrounding whitespace ignored), straight into the key's bytes: the
    /// gateway parses one per player of every settlement window it reads back from Redis.
    pub fn from_hex(text: &str) -> Result<PublicKey> {
        let mut key = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut key).map_err(|e| match e {
            hex::FromHexError::InvalidStringLength => Error::Malformed("public key is not 32 bytes"),
            _ => Error::Malformed("public key is not hex"),
        })?;
        Ok(PublicKey(key))
    }

    /// Checks `signature` over `domain || message`. Uses strict verification (no malleable
    /// signatures, no small-order keys), so that one message has one valid signature per key.
    pub fn verify(&self, domain: &[u8], message: &[u8], signature: &Signature) -> Result<()> {
        let key = ed25519_dalek::VerifyingKey::from_bytes(&self.0).map_err(|_| Error::BadSignature)?;
        let signature = ed25519_dalek::Signature::from_bytes(&signature.0);
        let mut signed = Vec::with_capacity(domain.len() + message.len());
        signed.extend_from_slice(domain);
        signed.extend_from_slice(message);
        key.verify_strict(&signed, &signature)
            .map_err(|_| Error::BadSignature)
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pk:{}", &self.to_hex()[..12])
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// An ed25519 signature.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Signature(#[serde(with = "serde_bytes_array64")] pub [u8; 64]);

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sig:{}", &hex::encode(self.0)[..12])
    }
}

/// An ed25519 signing key. Its `Debug` never prints the secret.
#[derive(Clone)]
pub struct Keypair {
    signing: ed25519_dalek::SigningKey,
}

impl Keypair {
    /// A fresh key from the operating system's randomness.
    pub fn generate() -> Keypair {
        let mut seed = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
        Keypair::from_seed(seed)
    }

    /// A key from a 32-byte seed (deterministic: tests and the simulator use it).
    pub fn from_seed(seed: [u8; 32]) -> Keypair {
        Keypair {
            signing: ed25519_dalek::SigningKey::from_bytes(&seed),
        }
    }

    pub fn seed(&self) -> [u8; 32] {
        self.signing.to_bytes()
    }

    pub fn seed_hex(&self) -> String {
        hex::encode(self.seed())
    }

    pub fn from_seed_hex(text: &str) -> Result<Keypair> {
        let bytes = hex::decode(text.trim()).map_err(|_| Error::Malformed("secret key is not hex"))?;
        let seed: [u8; 32] = bytes
            .try_into()
            .map_err(|_| Error::Malformed("secret key is not 32 bytes"))?;
        Ok(Keypair::from_seed(seed))
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.signing.verifying_key().to_bytes())
    }

    /// Signs `domain || message`.
    pub fn sign(&self, domain: &[u8], message: &[u8]) -> Signature {
        let mut signed = Vec::with_capacity(domain.len() + message.len());
        signed.extend_from_slice(domain);
        signed.extend_from_slice(message);
        Signature(self.signing.sign(&signed).to_bytes())
    }
}

impl fmt::Debug for Keypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Keypair({:?})", self.public())
    }
}

/// One signature to check in a batch: `(key, domain || message, signature)`.
pub struct SignedMessage<'a> {
    pub key: &'a PublicKey,
    pub message: &'a [u8],
    pub signature: &'a Signature,
}

/// Distinct keys [`verify_batch`] remembers within one call: a batch of a studio's transactions
/// names one key many times, and decompressing a key costs about a fifth of a verification.
const BATCH_KEYS_REMEMBERED: usize = 8;

/// Checks many signatures at once with ed25519 batch verification (about 2.5x the rate of
/// one-by-one verification on this kind of machine). The `message`s must already include
/// their domain. On failure the caller falls back to checking one by one to find the culprit.
/// One item is checked alone ([`verify_one`], strict): a batch of one costs more than that.
pub fn verify_batch(items: &[SignedMessage<'_>]) -> Result<()> {
    match items {
        [] => return Ok(()),
        [item] => return verify_one(item),
        _ => {}
    }
    let mut keys = Vec::with_capacity(items.len());
    let mut signatures = Vec::with_capacity(items.len());
    let mut messages: Vec<&[u8]> = Vec::with_capacity(items.len());
    let mut remembered: Vec<(&PublicKey, ed25519_dalek::VerifyingKey)> = Vec::new();
    for item in items {
        let key = match remembered.iter().find(|(bytes, _)| *bytes == item.key) {
            Some((_, key)) => *key,
            None => {
                let key =
                    ed25519_dalek::VerifyingKey::from_bytes(&item.key.0).map_err(|_| Error::BadSignature)?;
                if remembered.len() < BATCH_KEYS_REMEMBERED {
                    remembered.push((item.key, key));
                }
                key
            }
        };
        keys.push(key);
        signatures.push(ed25519_dalek::Signature::from_bytes(&item.signature.0));
        messages.push(item.message);
    }
    ed25519_dalek::verify_batch(&messages, &signatures, &keys).map_err(|_| Error::BadSignature)
}

/// Checks one signature over a message that already includes its domain.
pub fn verify_one(item: &SignedMessage<'_>) -> Result<()> {
    item.key.verify(&[], item.message, item.signature)
}

macro_rules! bytes_array {
    ($module:ident, $n:expr) => {
        pub mod $module {
            use serde::{Deserializer, Serializer};

            pub fn serialize<S: Serializer>(value: &[u8; $n], serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_bytes(value)
            }

            /// Copies the bytes straight into the array (no allocation: keys and hashes are in
            /// every message, and a `clicks` frame carries up to 2048 keys). Accepts a byte string
            /// (MessagePack bin, what Hoard writes) or an array of integers.
            pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<[u8; $n], D::Error> {
                struct Visitor;

                impl<'de> serde::de::Visitor<'de> for Visitor {
                    type Value = [u8; $n];

                    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                        f.write_str(concat!(stringify!($n), " bytes"))
                    }

                    fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<[u8; $n], E> {
                        bytes
                            .try_into()
                            .map_err(|_| E::invalid_length(bytes.len(), &self))
                    }

                    fn visit_seq<A: serde::de::SeqAccess<'de>>(
                        self,
                        mut seq: A,
                    ) -> Result<[u8; $n], A::Error> {
                        let mut out = [0u8; $n];
                        for (i, byte) in out.iter_mut().enumerate() {
                            *byte = seq
                                .next_element()?
                                .ok_or_else(|| serde::de::Error::invalid_length(i, &self))?;
                        }
                        if seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                            return Err(serde::de::Error::invalid_length($n + 1, &self));
                        }
                        Ok(out)
                    }
                }

                deserializer.deserialize_bytes(Visitor)
            }
        }
    };
}

bytes_array!(serde_bytes_array32, 32);
bytes_array!(serde_bytes_array64, 64);
bytes_array!(serde_bytes_array16, 16);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_and_verify_with_domain_separation() {
        let key = Keypair::from_seed([7; 32]);
        let signature = key.sign(b"hoard/a", b"hello");
        key.public().verify(b"hoard/a", b"hello", &signature).unwrap();
        assert_eq!(
            key.public().verify(b"hoard/b", b"hello", &signature),
            Err(Error::BadSignature)
        );
        assert_eq!(
            key.public().verify(b"hoard/a", b"hellO", &signature),
            Err(Error::BadSignature)
        );
    }

    #[test]
    fn hashes_order_as_their_bytes() {
        let hashes: Vec<Hash> = (0..64u8).map(|i| Hash::of(&[i])).collect();
        for a in &hashes {
            for b in &hashes {
                assert_eq!(a.cmp(b), a.0.cmp(&b.0), "{a} against {b}");
            }
        }
        // Pairs that first differ at each byte, either way round.
        for at in 0..32 {
            let low = Hash([7; 32]);
            let mut high = low;
            high.0[at] = 8;
            high.0[at + 1..].fill(0);
            assert_eq!(low.cmp(&high), std::cmp::Ordering::Less, "byte {at}");
            assert_eq!(high.cmp(&low), std::cmp::Ordering::Greater, "byte {at}");
            assert_eq!(low.partial_cmp(&high), Some(std::cmp::Ordering::Less));
        }
        assert_eq!(Hash([5; 32]).cmp(&Hash([5; 32])), std::cmp::Ordering::Equal);
    }

    #[test]
    fn public_keys_parse_from_64_hex_digits_and_nothing_else() {
        let key = Keypair::from_seed([9; 32]).public();
        let text = key.to_hex();
        assert_eq!(PublicKey::from_hex(&text), Ok(key));
        assert_eq!(
            PublicKey::from_hex(&format!(" {}\n", text.to_uppercase())),
            Ok(key)
        );
        let not_hex = Err(Error::Malformed("public key is not hex"));
        let not_32 = Err(Error::Malformed("public key is not 32 bytes"));
        assert_eq!(PublicKey::from_hex(&text[..63]), not_hex);
        assert_eq!(PublicKey::from_hex(&format!("{}zz", &text[..62])), not_hex);
        assert_eq!(PublicKey::from_hex(&text[..62]), not_32);
        assert_eq!(PublicKey::from_hex(&format!("{text}00")), not_32);
        assert_eq!(PublicKey::from_hex(""), not_32);
    }

    /// [`verify_batch`] over the items `range` of parallel lists of keys, messages and signatures.
    fn verify_items(
        publics: &[PublicKey],
        messages: &[Vec<u8>],
        signatures: &[Signature],
        range: std::ops::Range<usize>,
    ) -> Result<()> {
        let items: Vec<SignedMessage<'_>> = range
            .map(|i| SignedMessage {
                key: &publics[i],
                message: &messages[i],
                signature: &signatures[i],
            })
            .collect();
        verify_batch(&items)
    }

    #[test]
    fn batch_verification_finds_a_bad_signature() {
        let keys: Vec<Keypair> = (0..8u8).map(|i| Keypair::from_seed([i; 32])).collect();
        let publics: Vec<PublicKey> = keys.iter().map(Keypair::public).collect();
        let messages: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i; 40]).collect();
        let mut signatures: Vec<Signature> =
            keys.iter().zip(&messages).map(|(k, m)| k.sign(&[], m)).collect();
        let batch = |signatures: &[Signature]| verify_items(&publics, &messages, signatures, 0..8);
        batch(&signatures).unwrap();
        signatures[3].0[0] ^= 1;
        assert_eq!(batch(&signatures), Err(Error::BadSignature));
    }

    #[test]
    fn batches_with_repeated_keys_and_batches_of_one_verify_exactly() {
        // 12 distinct keys over 30 items: more keys than a batch remembers, each used again.
        let keys: Vec<Keypair> = (0..12u8).map(|i| Keypair::from_seed([i + 40; 32])).collect();
        let publics: Vec<PublicKey> = (0..30).map(|i| keys[i % 12].public()).collect();
        let messages: Vec<Vec<u8>> = (0..30u8).map(|i| vec![i; 24]).collect();
        let mut signatures: Vec<Signature> = (0..30).map(|i| keys[i % 12].sign(&[], &messages[i])).collect();
        let items = |signatures: &[Signature], range: std::ops::Range<usize>| {
            verify_items(&publics, &messages, signatures, range)
        };
        items(&signatures, 0..30).unwrap();
        items(&signatures, 7..8).unwrap();
        // Two signatures of one key (items 13 and 25), swapped between its messages: refused.
        signatures.swap(13, 25);
        assert_eq!(items(&signatures, 0..30), Err(Error::BadSignature));
        signatures.swap(13, 25);
        signatures[29].0[5] ^= 1;
        assert_eq!(items(&signatures, 0..30), Err(Error::BadSignature));
        assert_eq!(items(&signatures, 29..30), Err(Error::BadSignature));
        items(&signatures, 0..29).unwrap();
    }

    #[test]
    fn keys_round_trip_through_hex_and_msgpack() {
        let key = Keypair::generate();
        let again = Keypair::from_seed_hex(&key.seed_hex()).unwrap();
        assert_eq!(key.public(), again.public());
        let bytes = rmp_serde::to_vec(&key.public()).unwrap();
        assert_eq!(bytes.len(), 34, "a public key is a 32-byte msgpack bin");
        let back: PublicKey = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(back, key.public());
    }

    #[test]
    fn fixed_size_byte_fields_take_exactly_their_length_as_bin_or_array() {
        let key = Keypair::from_seed([3; 32]).public();
        // An array of 32 integers (what a client's generic encoder may write) decodes the same.
        let as_array = rmp_serde::to_vec(&key.0.to_vec()).unwrap();
        assert_eq!(rmp_serde::from_slice::<PublicKey>(&as_array).unwrap(), key);
        for len in [0usize, 31, 33] {
            let bin = rmp_serde::to_vec(&serde_bytes::Bytes::new(&vec![7u8; len])).unwrap();
            let error = rmp_serde::from_slice::<PublicKey>(&bin).unwrap_err().to_string();
            assert!(error.contains("32 bytes"), "{len} bytes: {error}");
            let array = rmp_serde::to_vec(&vec![7u8; len]).unwrap();
            assert!(
                rmp_serde::from_slice::<PublicKey>(&array).is_err(),
                "{len} integers"
            );
        }
        let signature = Keypair::from_seed([3; 32]).sign(b"test", b"x");
        let bytes = rmp_serde::to_vec(&signature).unwrap();
        assert_eq!(rmp_serde::from_slice::<Signature>(&bytes).unwrap(), signature);
        assert!(rmp_serde::from_slice::<Signature>(&rmp_serde::to_vec(&key).unwrap()).is_err());
    }
}
