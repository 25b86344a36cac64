//! Deterministic content for the store's crash test (`tests/store_crash.rs` and the
//! `hoard-store-crash-child` binary): what the child writes at each height, so that the parent can
//! check every byte after a SIGKILL.

/// The child takes a snapshot at every multiple of this height.
pub const CRASH_SNAPSHOT_EVERY_BLOCKS: u64 = 10;
/// Largest block the child writes, in bytes (above sled's ~128 KiB blob threshold).
pub const CRASH_BLOCK_BYTES_MAX: usize = 300 << 10;

/// A xorshift64 step (deterministic, not cryptographic).
pub fn next_random(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn bytes(tag: u64, height: u64, length: usize) -> Vec<u8> {
    let mut state = (height ^ tag).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(length + 8);
    while out.len() < length {
        out.extend_from_slice(&next_random(&mut state).to_le_bytes());
    }
    out.truncate(length);
    out
}

/// Block `height`: 1 byte to 4 KiB most of the time, up to [`CRASH_BLOCK_BYTES_MAX`] one time in five.
pub fn block_content(height: u64) -> Vec<u8> {
    let mut state = height.wrapping_mul(0xD6E8_FEB8_6659_FD93) | 1;
    let roll = next_random(&mut state);
    let limit = if roll.is_multiple_of(5) {
        CRASH_BLOCK_BYTES_MAX
    } else {
        4096
    };
    let length = 1 + (next_random(&mut state) % limit as u64) as usize;
    bytes(0xB10C, height, length)
}

/// The snapshot taken at `height`.
pub fn snapshot_content(height: u64) -> Vec<u8> {
    bytes(0x5A95, height, 20_000 + (height as usize % 7) * 1000)
}

/// The consensus record `msg/<height>` written with the snapshot at `height`.
pub fn record_content(height: u64) -> Vec<u8> {
    bytes(0x4EC0, height, 100 + height as usize % 50)
}

/// The key of the consensus record written with the snapshot at `height`.
pub fn record_key(height: u64) -> Vec<u8> {
    let mut key = b"msg/".to_vec();
    key.extend_from_slice(&height.to_be_bytes());
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_is_deterministic_and_differs_by_height() {
        assert_eq!(block_content(7), block_content(7));
        assert_ne!(block_content(7), block_content(8));
        let lengths: Vec<usize> = (1..200).map(|height| block_content(height).len()).collect();
        assert!(lengths
            .iter()
            .all(|length| (1..=CRASH_BLOCK_BYTES_MAX).contains(length)));
        assert!(
            lengths.iter().any(|length| *length > 128 << 10),
            "some blocks exceed sled's blob threshold"
        );
        assert_eq!(snapshot_content(10), snapshot_content(10));
        assert_ne!(record_content(10), record_content(20));
    }
}
