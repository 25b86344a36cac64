//! Click packing: `Client::click` appends one click, already encoded as MessagePack, to the open
//! batch under a short synchronous lock (no allocation per click, no await). A batch is sealed
//! when it holds a frame's worth of clicks; the connection task sends sealed batches at once and
//! the open batch every flush interval, each as one `clicks` frame whose header it writes then
//! (the sequence number is only known at send time).
//!
//! Memory is bounded: sealed plus sent-but-unacknowledged batches are at most
//! `click_frames_buffered_max`; beyond it `click` fails with `Error::ClicksBackpressure`.

use std::collections::VecDeque;

use hoard_types::wire::{counter_name_is_valid, CLICKS_PER_FRAME_MAX, CLICK_BYTES_MAX, CLICK_COUNT_MAX};
use hoard_types::PublicKey;

use crate::error::{Error, Result};

/// A batch of encoded click entries (the body of a `clicks` array).
#[derive(Debug)]
pub(crate) struct ClickBatch {
    pub(crate) body: Vec<u8>,
    /// Entries (`click` calls) in the batch.
    pub(crate) count: usize,
    /// Clicks in the batch: the sum of the entries' counts.
    pub(crate) clicks: u64,
}

/// The clicks waiting to be sent.
#[derive(Debug)]
pub(crate) struct ClickBuffer {
    open: ClickBatch,
    sealed: VecDeque<ClickBatch>,
    /// Buffers of acknowledged batches, for reuse (no allocation per frame in steady state).
    spare: Vec<Vec<u8>>,
    /// Batches sent and not yet acknowledged (the connection task keeps their bodies).
    pub(crate) unacked_batches: usize,
    frames_max: usize,
    clicks_per_frame: usize,
}

impl ClickBuffer {
    pub(crate) fn new(frames_max: usize, clicks_per_frame: usize) -> ClickBuffer {
        let clicks_per_frame = clicks_per_frame.clamp(1, CLICKS_PER_FRAME_MAX);
        ClickBuffer {
            open: ClickBatch {
                body: Vec::new(),
                count: 0,
                clicks: 0,
            },
            sealed: VecDeque::new(),
            spare: Vec::new(),
            unacked_batches: 0,
            frames_max,
            clicks_per_frame,
        }
    }

    /// Lowers the batch size to what the gateway announced.
    pub(crate) fn set_clicks_per_frame(&mut self, clicks_per_frame: usize) {
        self.clicks_per_frame = clicks_per_frame.clamp(1, CLICKS_PER_FRAME_MAX);
    }

    /// Appends one click. Returns true when the sender should be woken: a batch was sealed (send
    /// it now) or a batch was started (start its flush timer).
    pub(crate) fn push(&mut self, player: &PublicKey, counter: &str, count: u32) -> Result<bool> {
        if !counter_name_is_valid(counter) {
            return Err(Error::InvalidArgument(
                "a counter name is 1 to 32 bytes of a-z, 0-9, '_' and '-'",
            ));
        }
        if count == 0 || count > CLICK_COUNT_MAX {
            return Err(Error::InvalidArgument("a click count is 1 to 1000000"));
        }
        if self.open.count == 0 && self.sealed.len() + self.unacked_batches >= self.frames_max {
            return Err(Error::ClicksBackpressure);
        }
        if self.open.count == 0 && self.open.body.capacity() == 0 {
            if let Some(spare) = self.spare.pop() {
                self.open.body = spare;
            }
        }
        encode_click(&mut self.open.body, player, counter, count);
        self.open.count += 1;
        self.open.clicks += u64::from(count);
        if self.open.count >= self.clicks_per_frame {
            self.seal();
            return Ok(true);
        }
        // The first click of a batch starts the flush timer.
        Ok(self.open.count == 1)
    }

    /// Keeps an acknowledged batch's buffer for reuse (at most a frame budget's worth).
    pub(crate) fn recycle(&mut self, mut body: Vec<u8>) {
        if self.spare.len() < self.frames_max && body.capacity() <= self.clicks_per_frame * CLICK_BYTES_MAX {
            body.clear();
            self.spare.push(body);
        }
    }

    fn seal(&mut self) {
        if self.open.count > 0 {
            let batch = std::mem::replace(
                &mut self.open,
                ClickBatch {
                    body: Vec::new(),
                    count: 0,
                    clicks: 0,
                },
            );
            self.sealed.push_back(batch);
        }
    }

    /// Takes every batch to send now (sealed ones, and the open one if `include_open`).
    pub(crate) fn take(&mut self, include_open: bool, into: &mut Vec<ClickBatch>) {
        if include_open {
            self.seal();
        }
        into.extend(self.sealed.drain(..));
    }

    /// Puts batches back at the front, in order (unacknowledged ones after a reconnect, or one the
    /// gateway refused for now).
    pub(crate) fn requeue_front(&mut self, batches: Vec<ClickBatch>) {
        for batch in batches.into_iter().rev() {
            self.sealed.push_front(batch);
        }
    }

    /// The clicks waiting to be sent (the sum of their counts).
    pub(crate) fn clicks(&self) -> u64 {
        self.open.clicks + self.sealed.iter().map(|batch| batch.clicks).sum::<u64>()
    }

    /// Whether any click waits to be sent.
    pub(crate) fn is_empty(&self) -> bool {
        self.open.count == 0 && self.sealed.is_empty()
    }
}

/// Appends `[player (bin 32), counter (str), count (uint)]`.
pub(crate) fn encode_click(out: &mut Vec<u8>, player: &PublicKey, counter: &str, count: u32) {
    out.push(0x93);
    out.extend_from_slice(&[0xc4, 32]);
    out.extend_from_slice(player.as_bytes());
    let length = counter.len();
    if length < 32 {
        out.push(0xa0 | length as u8);
    } else {
        out.extend_from_slice(&[0xd9, length as u8]);
    }
    out.extend_from_slice(counter.as_bytes());
    write_uint(out, u64::from(count));
}

/// Appends a MessagePack unsigned integer in its shortest form.
pub(crate) fn write_uint(out: &mut Vec<u8>, value: u64) {
    if value < 128 {
        out.push(value as u8);
    } else if value <= u64::from(u8::MAX) {
        out.extend_from_slice(&[0xcc, value as u8]);
    } else if value <= u64::from(u16::MAX) {
        out.push(0xcd);
        out.extend_from_slice(&(value as u16).to_be_bytes());
    } else if value <= u64::from(u32::MAX) {
        out.push(0xce);
        out.extend_from_slice(&(value as u32).to_be_bytes());
    } else {
        out.push(0xcf);
        out.extend_from_slice(&value.to_be_bytes());
    }
}

/// The whole `{"clicks": {"request_id": sequence, "clicks": [...]}}` frame for a batch.
pub(crate) fn clicks_frame(sequence: u64, batch: &ClickBatch) -> Vec<u8> {
    let mut frame = Vec::with_capacity(batch.body.len() + 48);
    frame.push(0x81);
    frame.push(0xa6);
    frame.extend_from_slice(b"clicks");
    frame.push(0x82);
    frame.push(0xaa);
    frame.extend_from_slice(b"request_id");
    write_uint(&mut frame, sequence);
    frame.push(0xa6);
    frame.extend_from_slice(b"clicks");
    frame.push(0xdc);
    frame.extend_from_slice(&(batch.count as u16).to_be_bytes());
    frame.extend_from_slice(&batch.body);
    frame
}

const _: () = assert!(
    CLICKS_PER_FRAME_MAX <= u16::MAX as usize,
    "the clicks array header is 16 bits"
);

#[cfg(test)]
mod tests {
    use super::*;
    use hoard_types::wire::{decode_client, encode, Click, ClientMessage};

    #[test]
    fn hand_encoded_frames_decode_as_the_protocol_says() {
        let mut buffer = ClickBuffer::new(4, 3);
        let players: Vec<PublicKey> = (0..5u8).map(|i| PublicKey([i; 32])).collect();
        let counters = ["gold", "a", &"x".repeat(32), "boss-kills_2", "gold"];
        let counts = [1, 127, 128, 70_000, CLICK_COUNT_MAX];
        let mut sealed = 0;
        for i in 0..5 {
            sealed += buffer.push(&players[i], counters[i], counts[i]).unwrap() as usize;
        }
        assert_eq!(sealed, 3, "started batches and a sealed one wake the sender");
        let mut batches = Vec::new();
        buffer.take(true, &mut batches);
        assert!(buffer.is_empty());
        assert_eq!(batches.len(), 2);
        let mut decoded = Vec::new();
        for (sequence, batch) in [(300u64, &batches[0]), (u64::MAX, &batches[1])] {
            let frame = clicks_frame(sequence, batch);
            match decode_client(&frame).unwrap() {
                ClientMessage::Clicks { request_id, clicks } => {
                    assert_eq!(request_id, sequence);
                    decoded.extend(clicks);
                }
                other => panic!("decoded as {other:?}"),
            }
        }
        let expected: Vec<Click> = (0..5)
            .map(|i| Click(players[i], counters[i].into(), counts[i]))
            .collect();
        assert_eq!(decoded, expected);
        // The single-entry frame is byte-identical to the documented worked example's layout
        // except for the array header width.
        let reference = encode(&ClientMessage::Clicks {
            request_id: 1,
            clicks: vec![Click(PublicKey([0xab; 32]), "gold".into(), 3)],
        });
        let mut one = ClickBuffer::new(1, 10);
        one.push(&PublicKey([0xab; 32]), "gold", 3).unwrap();
        let mut batches = Vec::new();
        one.take(true, &mut batches);
        let ours = clicks_frame(1, &batches[0]);
        assert_eq!(ours.len(), reference.len() + 2);
        assert_eq!(decode_client(&ours).unwrap(), decode_client(&reference).unwrap());
    }

    #[test]
    fn invalid_clicks_are_refused_and_the_buffer_is_bounded() {
        let mut buffer = ClickBuffer::new(2, 1);
        let player = PublicKey([1; 32]);
        assert_eq!(
            buffer.push(&player, "Gold", 1).unwrap_err().kind(),
            crate::ErrorKind::InvalidArgument
        );
        assert!(buffer.push(&player, "gold", 0).is_err());
        assert!(buffer.push(&player, "gold", CLICK_COUNT_MAX + 1).is_err());
        assert!(buffer.push(&player, "gold", 1).unwrap());
        assert!(buffer.push(&player, "gold", 1).unwrap());
        assert_eq!(
            buffer.push(&player, "gold", 1).unwrap_err(),
            Error::ClicksBackpressure
        );
        let mut two = ClickBuffer::new(4, 3);
        assert!(
            two.push(&player, "gold", 1).unwrap(),
            "the first click starts the timer"
        );
        assert!(!two.push(&player, "gold", 1).unwrap());
        assert!(two.push(&player, "gold", 1).unwrap(), "the full batch is sealed");
        let mut batches = Vec::new();
        buffer.take(false, &mut batches);
        buffer.unacked_batches = 2;
        assert_eq!(
            buffer.push(&player, "gold", 1).unwrap_err(),
            Error::ClicksBackpressure
        );
        buffer.unacked_batches = 1;
        assert!(buffer.push(&player, "gold", 1).is_ok());
    }

    #[test]
    fn the_buffer_counts_its_clicks_by_their_counts() {
        let mut buffer = ClickBuffer::new(4, 2);
        let player = PublicKey([1; 32]);
        assert_eq!(buffer.clicks(), 0);
        buffer.push(&player, "gold", 5).unwrap();
        buffer.push(&player, "gold", 1).unwrap();
        buffer.push(&player, "gems", 10).unwrap();
        assert_eq!(buffer.clicks(), 16, "a sealed batch and the open one");
        let mut batches = Vec::new();
        buffer.take(true, &mut batches);
        assert_eq!(buffer.clicks(), 0);
        let counted: Vec<(usize, u64)> = batches.iter().map(|batch| (batch.count, batch.clicks)).collect();
        assert_eq!(counted, [(2, 6), (1, 10)]);
    }
}
