//! The frame every stored value is wrapped in: `version (1) | kind (1) | checksum (8) | payload`.
//!
//! The checksum is the first 8 bytes of SHA-256 over a domain, the kind, the key and the payload, so a
//! value under the wrong key (a block copied to another height) fails as surely as a flipped bit.

use hoard_types::crypto::Hash;

use super::{Result, StoreError};

/// Frame format version.
const FRAME_VERSION: u8 = 1;
/// Checksum bytes in a frame.
const CHECKSUM_BYTES: usize = 8;
/// Bytes before the payload.
pub(crate) const FRAME_HEADER_BYTES: usize = 2 + CHECKSUM_BYTES;
/// Domain separating store checksums from every other SHA-256 in Hoard.
const CHECKSUM_DOMAIN: &[u8] = b"hoard-store-frame-v1";

/// What a frame holds; part of the checksum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Block = 1,
    Snapshot = 2,
    Record = 3,
}

impl Kind {
    fn what(self) -> &'static str {
        match self {
            Kind::Block => "block",
            Kind::Snapshot => "snapshot",
            Kind::Record => "record",
        }
    }
}

fn checksum(kind: Kind, key: &[u8], payload: &[u8]) -> [u8; CHECKSUM_BYTES] {
    let key_length = (key.len() as u32).to_be_bytes();
    let hash = Hash::of_parts(&[CHECKSUM_DOMAIN, &[kind as u8], &key_length, key, payload]);
    let mut out = [0; CHECKSUM_BYTES];
    out.copy_from_slice(&hash.as_bytes()[..CHECKSUM_BYTES]);
    out
}

/// The frame to write for `payload` under `key`.
pub(crate) fn encode(kind: Kind, key: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(FRAME_HEADER_BYTES + payload.len());
    frame.push(FRAME_VERSION);
    frame.push(kind as u8);
    frame.extend_from_slice(&checksum(kind, key, payload));
    frame.extend_from_slice(payload);
    // Checked right before the write: the header is what we mean and the payload is intact.
    assert_eq!(frame.len(), FRAME_HEADER_BYTES + payload.len());
    assert_eq!(&frame[FRAME_HEADER_BYTES..], payload);
    frame
}

/// The payload of a frame read back under `key`, after checking its header and checksum.
/// `height` only labels the error.
pub(crate) fn decode<'a>(kind: Kind, key: &[u8], frame: &'a [u8], height: u64) -> Result<&'a [u8]> {
    let corrupt = || StoreError::Corrupt {
        what: kind.what(),
        height,
    };
    if frame.len() < FRAME_HEADER_BYTES || frame[0] != FRAME_VERSION || frame[1] != kind as u8 {
        return Err(corrupt());
    }
    let payload = &frame[FRAME_HEADER_BYTES..];
    if frame[2..FRAME_HEADER_BYTES] != checksum(kind, key, payload) {
        return Err(corrupt());
    }
    Ok(payload)
}

/// The key of block or snapshot `height`: big-endian, so key order is height order.
pub(crate) fn height_key(height: u64) -> [u8; 8] {
    height.to_be_bytes()
}

/// The height of a block or snapshot key read back.
pub(crate) fn key_height(what: &'static str, key: &[u8]) -> Result<u64> {
    let bytes: [u8; 8] = key
        .try_into()
        .map_err(|_| StoreError::Corrupt { what, height: 0 })?;
    Ok(u64::from_be_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_single_byte_flip_is_detected() {
        let frame = encode(Kind::Block, &height_key(7), b"hello block");
        assert_eq!(
            decode(Kind::Block, &height_key(7), &frame, 7).unwrap(),
            b"hello block"
        );
        for index in 0..frame.len() {
            let mut bad = frame.clone();
            bad[index] ^= 0x01;
            assert!(matches!(
                decode(Kind::Block, &height_key(7), &bad, 7),
                Err(StoreError::Corrupt {
                    what: "block",
                    height: 7
                })
            ));
        }
    }

    #[test]
    fn wrong_key_kind_or_truncation_is_detected() {
        let frame = encode(Kind::Block, &height_key(7), b"payload");
        assert!(decode(Kind::Block, &height_key(8), &frame, 8).is_err());
        assert!(decode(Kind::Snapshot, &height_key(7), &frame, 7).is_err());
        assert!(decode(Kind::Block, &height_key(7), &frame[..frame.len() - 1], 7).is_err());
        assert!(decode(Kind::Block, &height_key(7), &frame[..3], 7).is_err());
        assert!(decode(Kind::Block, &height_key(7), &[], 7).is_err());
    }
}
