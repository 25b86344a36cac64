//! Wire format: requests, batches, consensus messages, certificates, signing and verification.
//!
//! Every message travels as a [`SignedMessage`]: the signer's id, the MessagePack encoding of
//! a [`Message`], and an ed25519 signature over `SIGNING_DOMAIN || payload`. Keeping the exact
//! signed bytes lets certificates (lists of signed messages) be forwarded and re-verified by
//! anyone, with batch verification.

use std::sync::Arc;

use hoard_types::crypto::{Hash, Keypair, PublicKey, Signature};
use serde::{Deserialize, Serialize};

use crate::constants::SIGNING_DOMAIN;
use crate::error::{Error, Result};

/// A replica's index in the configuration, `0..n`.
pub type ReplicaId = u32;

/// A client request: opaque bytes (for Hoard, a batch of signed transactions from the gateway).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Who sent it (the gateway's id for the client); replies are addressed to it.
    pub client: u64,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

impl Request {
    /// SHA-256 over the client id and the payload: the request's identity.
    pub fn digest(&self) -> Hash {
        Hash::of_parts(&[b"hoard/pbft/request\0", &self.client.to_le_bytes(), &self.payload])
    }

    /// Bytes this request counts for in batch limits.
    pub fn size_bytes(&self) -> usize {
        self.payload.len() + 8
    }
}

/// What the primary orders at one sequence number: a timestamp and requests. A null batch
/// (a gap filled by a view change) has no requests and timestamp 0.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Batch {
    pub timestamp_ms: u64,
    pub requests: Vec<Request>,
}

impl Batch {
    /// The null batch.
    pub fn null() -> Batch {
        Batch::default()
    }

    /// SHA-256 over the timestamp and the request digests.
    pub fn digest(&self) -> Hash {
        Batch::digest_of(self.timestamp_ms, &self.request_digests())
    }

    /// Each request's digest, in order.
    pub fn request_digests(&self) -> Vec<Hash> {
        self.requests.iter().map(Request::digest).collect()
    }

    /// The digest of a batch with this timestamp and these request digests (what
    /// [`Batch::digest`] computes, without hashing the payloads again).
    pub fn digest_of(timestamp_ms: u64, request_digests: &[Hash]) -> Hash {
        let timestamp = timestamp_ms.to_le_bytes();
        let count = (request_digests.len() as u64).to_le_bytes();
        let mut slices: Vec<&[u8]> = Vec::with_capacity(3 + request_digests.len());
        slices.extend([b"hoard/pbft/batch\0".as_slice(), &timestamp, &count]);
        slices.extend(request_digests.iter().map(|d| d.0.as_slice()));
        Hash::of_parts(&slices)
    }

    pub fn size_bytes(&self) -> usize {
        self.requests.iter().map(Request::size_bytes).sum::<usize>() + 8
    }
}

/// A prepared certificate: the primary's pre-prepare and 2f matching prepares from distinct
/// backups. Proves that no other batch can be prepared at the same (view, seq).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreparedCert {
    pub pre_prepare: SignedMessage,
    pub prepares: Vec<SignedMessage>,
}

/// A checkpoint certificate: 2f+1 matching signed checkpoints; the state digest at `seq` is
/// `digest`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointCert {
    pub seq: u64,
    pub digest: Hash,
    pub votes: Vec<SignedMessage>,
}

/// Every consensus message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// A client request forwarded by a backup to the primary.
    Request(Request),
    /// A client request forwarded by a backup to the primary: only its digest is signed; the
    /// request travels beside the signed bytes as a batch of one ([`SignedMessage::batch`]),
    /// so that forwarding a request of megabytes costs one signature over 32 bytes (ed25519
    /// hashes what it signs twice). Replicas forward requests this way; `Request` is still
    /// accepted.
    ForwardedRequest {
        digest: Hash,
    },
    /// The primary assigns the batch with digest `digest` to `seq` in `view`. Only the digest is
    /// signed; the batch travels beside the signed bytes ([`SignedMessage::batch`]).
    PrePrepare {
        view: u64,
        seq: u64,
        digest: Hash,
    },
    Prepare {
        view: u64,
        seq: u64,
        digest: Hash,
    },
    Commit {
        view: u64,
        seq: u64,
        digest: Hash,
    },
    /// State digest after executing `seq` (a multiple of the checkpoint interval).
    Checkpoint {
        seq: u64,
        digest: Hash,
    },
    /// Vote to move to `new_view`, with the sender's stable checkpoint and its prepared
    /// certificates above it.
    ViewChange {
        new_view: u64,
        stable: Option<CheckpointCert>,
        prepared: Vec<PreparedCert>,
    },
    /// The new primary's proof (2f+1 view changes) and its pre-prepares for the carried-over
    /// and null sequence numbers.
    NewView {
        view: u64,
        view_changes: Vec<SignedMessage>,
        pre_prepares: Vec<SignedMessage>,
    },
    /// Periodic status: drives retransmission, catch-up and state transfer.
    Status {
        view: u64,
        in_view_change: bool,
        last_executed: u64,
        stable_seq: u64,
    },
    /// Catch-up: the digest of a committed batch and commit votes for it (2f+1 of them make a
    /// commit certificate). The batch travels beside the signed bytes
    /// ([`SignedMessage::batch`]), as with a pre-prepare: the sender signs 32 bytes, not the
    /// batch.
    CommitProof {
        seq: u64,
        digest: Hash,
        commits: Vec<SignedMessage>,
    },
    /// The sender's stable checkpoint certificate (answer to a status that is too far behind).
    StableCert {
        cert: CheckpointCert,
    },
    /// Ask for the snapshot of a stable checkpoint at or above `seq`.
    FetchSnapshot {
        seq: u64,
    },
    /// A stable checkpoint's certificate and its snapshot.
    Snapshot {
        cert: CheckpointCert,
        #[serde(with = "serde_bytes")]
        snapshot: Vec<u8>,
    },
    /// A backup's timer expired in `view`: f+1 of these (at least one correct replica) start
    /// the view change, so one replica's timeout alone never takes it out of the view.
    Suspect {
        view: u64,
    },
}

/// The kinds of [`Message`], for counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MessageKind {
    Request,
    PrePrepare,
    Prepare,
    Commit,
    Checkpoint,
    ViewChange,
    NewView,
    Status,
    CommitProof,
    StableCert,
    FetchSnapshot,
    Snapshot,
    Suspect,
}

impl MessageKind {
    pub const COUNT: usize = 13;
    pub const ALL: [MessageKind; MessageKind::COUNT] = [
        MessageKind::Request,
        MessageKind::PrePrepare,
        MessageKind::Prepare,
        MessageKind::Commit,
        MessageKind::Checkpoint,
        MessageKind::ViewChange,
        MessageKind::NewView,
        MessageKind::Status,
        MessageKind::CommitProof,
        MessageKind::StableCert,
        MessageKind::FetchSnapshot,
        MessageKind::Snapshot,
        MessageKind::Suspect,
    ];

    /// A stable snake_case name (a metric label value).
    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::Request => "request",
            MessageKind::PrePrepare => "pre_prepare",
            MessageKind::Prepare => "prepare",
            MessageKind::Commit => "commit",
            MessageKind::Checkpoint => "checkpoint",
            MessageKind::ViewChange => "view_change",
            MessageKind::NewView => "new_view",
            MessageKind::Status => "status",
            MessageKind::CommitProof => "commit_proof",
            MessageKind::StableCert => "stable_cert",
            MessageKind::FetchSnapshot => "fetch_snapshot",
            MessageKind::Snapshot => "snapshot",
            MessageKind::Suspect => "suspect",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

impl Message {
    pub fn kind(&self) -> MessageKind {
        match self {
            Message::Request(_) | Message::ForwardedRequest { .. } => MessageKind::Request,
            Message::PrePrepare { .. } => MessageKind::PrePrepare,
            Message::Prepare { .. } => MessageKind::Prepare,
            Message::Commit { .. } => MessageKind::Commit,
            Message::Checkpoint { .. } => MessageKind::Checkpoint,
            Message::ViewChange { .. } => MessageKind::ViewChange,
            Message::NewView { .. } => MessageKind::NewView,
            Message::Status { .. } => MessageKind::Status,
            Message::CommitProof { .. } => MessageKind::CommitProof,
            Message::StableCert { .. } => MessageKind::StableCert,
            Message::FetchSnapshot { .. } => MessageKind::FetchSnapshot,
            Message::Snapshot { .. } => MessageKind::Snapshot,
            Message::Suspect { .. } => MessageKind::Suspect,
        }
    }

    /// Decodes a payload, refusing anything over `limit` bytes.
    pub fn decode(bytes: &[u8], limit: usize) -> Result<Message> {
        if bytes.len() > limit {
            return Err(Error::TooLarge {
                size: bytes.len(),
                limit,
            });
        }
        rmp_serde::from_slice(bytes).map_err(|e| Error::Malformed(e.to_string()))
    }

    pub fn encode(&self) -> Vec<u8> {
        rmp_serde::to_vec(self).expect("a message always encodes")
    }

    /// Signs this message as `signer`.
    pub fn sign(&self, signer: ReplicaId, keypair: &Keypair) -> SignedMessage {
        let payload = self.encode();
        let signature = keypair.sign(SIGNING_DOMAIN, &payload);
        SignedMessage {
            signer,
            payload: Arc::new(payload),
            signature,
            batch: None,
        }
    }
}

/// A message as it travels: who signed it, the exact signed bytes, and the signature; a
/// pre-prepare also carries the batch it names, beside the signed bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedMessage {
    pub signer: ReplicaId,
    #[serde(with = "arc_bytes")]
    pub payload: Arc<Vec<u8>>,
    pub signature: Signature,
    /// A pre-prepare's or commit proof's batch, or a forwarded request as a batch of one. Not
    /// signed: whoever
    /// uses it checks that its digest is the signed one. `None` on every other message, and on
    /// pre-prepares inside durable records (the batch is persisted once per slot,
    /// [`crate::Record::Batch`]).
    #[serde(default)]
    pub batch: Option<Arc<Batch>>,
}

pub(crate) mod arc_bytes {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Arc<Vec<u8>>, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(value)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Arc<Vec<u8>>, D::Error> {
        let bytes: serde_bytes::ByteBuf = Deserialize::deserialize(deserializer)?;
        Ok(Arc::new(bytes.into_vec()))
    }
}

impl SignedMessage {
    /// This message with `batch` beside it.
    pub fn with_batch(mut self, batch: Arc<Batch>) -> SignedMessage {
        self.batch = Some(batch);
        self
    }

    /// This message without the batch beside it (what durable records keep).
    pub fn without_batch(&self) -> SignedMessage {
        SignedMessage {
            signer: self.signer,
            payload: self.payload.clone(),
            signature: self.signature,
            batch: None,
        }
    }

    /// The bytes for the network.
    pub fn to_bytes(&self) -> Vec<u8> {
        rmp_serde::to_vec(self).expect("a signed message always encodes")
    }

    /// Parses bytes from the network, refusing anything over `limit` bytes. Does not verify.
    pub fn from_bytes(bytes: &[u8], limit: usize) -> Result<SignedMessage> {
        if bytes.len() > limit {
            return Err(Error::TooLarge {
                size: bytes.len(),
                limit,
            });
        }
        rmp_serde::from_slice(bytes).map_err(|e| Error::Malformed(e.to_string()))
    }

    /// Decodes the payload (does not verify the signature).
    pub fn message(&self, limit: usize) -> Result<Message> {
        Message::decode(&self.payload, limit)
    }

    /// Checks the signature against the signer's key in `keys`.
    pub fn verify(&self, keys: &[PublicKey]) -> Result<()> {
        let key = keys
            .get(self.signer as usize)
            .ok_or(Error::UnknownReplica(self.signer))?;
        key.verify(SIGNING_DOMAIN, &self.payload, &self.signature)
            .map_err(|_| Error::BadSignature(self.signer))
    }
}

/// The replicas' verifying keys, decompressed once (decompression is about a third of the
/// cost of a verification).
#[derive(Clone, Debug)]
pub struct Verifier {
    keys: Vec<Option<ed25519_dalek::VerifyingKey>>,
}

impl Verifier {
    pub fn new(keys: &[PublicKey]) -> Verifier {
        Verifier {
            keys: keys
                .iter()
                .map(|k| ed25519_dalek::VerifyingKey::from_bytes(&k.0).ok())
                .collect(),
        }
    }

    fn key(&self, signer: ReplicaId) -> Result<&ed25519_dalek::VerifyingKey> {
        match self.keys.get(signer as usize) {
            None => Err(Error::UnknownReplica(signer)),
            Some(None) => Err(Error::BadSignature(signer)),
            Some(Some(key)) => Ok(key),
        }
    }

    /// Checks one message's signature (strict: no malleable signatures).
    pub fn verify(&self, message: &SignedMessage) -> Result<()> {
        let key = self.key(message.signer)?;
        let mut signed = Vec::with_capacity(SIGNING_DOMAIN.len() + message.payload.len());
        signed.extend_from_slice(SIGNING_DOMAIN);
        signed.extend_from_slice(&message.payload);
        let signature = ed25519_dalek::Signature::from_bytes(&message.signature.0);
        key.verify_strict(&signed, &signature)
            .map_err(|_| Error::BadSignature(message.signer))
    }

    /// Verifies many signed messages at once (ed25519 batch verification); on failure finds
    /// the first bad one so the error names the culprit.
    pub fn verify_all(&self, messages: &[&SignedMessage]) -> Result<()> {
        if messages.len() <= 1 {
            return messages.first().map_or(Ok(()), |m| self.verify(m));
        }
        let mut keys = Vec::with_capacity(messages.len());
        let mut signatures = Vec::with_capacity(messages.len());
        let mut signed: Vec<Vec<u8>> = Vec::with_capacity(messages.len());
        for message in messages {
            keys.push(*self.key(message.signer)?);
            signatures.push(ed25519_dalek::Signature::from_bytes(&message.signature.0));
            let mut bytes = Vec::with_capacity(SIGNING_DOMAIN.len() + message.payload.len());
            bytes.extend_from_slice(SIGNING_DOMAIN);
            bytes.extend_from_slice(&message.payload);
            signed.push(bytes);
        }
        let slices: Vec<&[u8]> = signed.iter().map(Vec::as_slice).collect();
        if ed25519_dalek::verify_batch(&slices, &signatures, &keys).is_ok() {
            return Ok(());
        }
        for message in messages {
            self.verify(message)?;
        }
        Err(Error::BadSignature(messages[0].signer))
    }
}

/// Verifies many signed messages at once against `keys` (see [`Verifier::verify_all`]).
pub fn verify_all(messages: &[&SignedMessage], keys: &[PublicKey]) -> Result<()> {
    Verifier::new(keys).verify_all(messages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_message_round_trips_and_verifies() {
        let keys: Vec<Keypair> = (0..4u8).map(|i| Keypair::from_seed([i + 1; 32])).collect();
        let publics: Vec<PublicKey> = keys.iter().map(Keypair::public).collect();
        let message = Message::Prepare {
            view: 3,
            seq: 9,
            digest: Hash::of(b"x"),
        };
        let signed = message.sign(2, &keys[2]);
        let bytes = signed.to_bytes();
        let back = SignedMessage::from_bytes(&bytes, 1 << 20).unwrap();
        back.verify(&publics).unwrap();
        assert_eq!(back.message(1 << 20).unwrap(), message);
        let mut forged = back.clone();
        forged.signer = 1;
        assert_eq!(forged.verify(&publics), Err(Error::BadSignature(1)));
        forged.signer = 9;
        assert_eq!(forged.verify(&publics), Err(Error::UnknownReplica(9)));
        assert!(matches!(
            SignedMessage::from_bytes(&bytes, 10),
            Err(Error::TooLarge { .. })
        ));
    }

    #[test]
    fn batch_verification_names_the_bad_signer() {
        let keys: Vec<Keypair> = (0..4u8).map(|i| Keypair::from_seed([i + 1; 32])).collect();
        let publics: Vec<PublicKey> = keys.iter().map(Keypair::public).collect();
        let mut messages: Vec<SignedMessage> = (0..4u32)
            .map(|i| {
                Message::Commit {
                    view: 0,
                    seq: 1,
                    digest: Hash::ZERO,
                }
                .sign(i, &keys[i as usize])
            })
            .collect();
        verify_all(&messages.iter().collect::<Vec<_>>(), &publics).unwrap();
        messages[2].signature.0[5] ^= 1;
        assert_eq!(
            verify_all(&messages.iter().collect::<Vec<_>>(), &publics),
            Err(Error::BadSignature(2))
        );
    }

    #[test]
    fn garbage_is_rejected_without_panic() {
        for bytes in [
            vec![],
            vec![0xc1],
            vec![0x93, 0x01, 0xc4, 0xff],
            vec![0xdd, 0xff, 0xff, 0xff, 0xff],
        ] {
            assert!(SignedMessage::from_bytes(&bytes, 1 << 20).is_err());
            assert!(Message::decode(&bytes, 1 << 20).is_err());
        }
    }

    #[test]
    fn batch_digest_binds_timestamp_and_requests() {
        let a = Batch {
            timestamp_ms: 1,
            requests: vec![Request {
                client: 1,
                payload: vec![1],
            }],
        };
        let mut b = a.clone();
        b.timestamp_ms = 2;
        assert_ne!(a.digest(), b.digest());
        let mut c = a.clone();
        c.requests[0].client = 2;
        assert_ne!(a.digest(), c.digest());
        assert_ne!(Batch::null().digest(), a.digest());
    }
}
