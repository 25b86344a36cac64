//! Decoders never panic on bytes from the network, and a replica rejects them with a typed
//! error.

use hoard_pbft::{Config, Message, Replica, SignedMessage, TestApp};
use hoard_types::crypto::{Keypair, PublicKey};
use proptest::prelude::*;

fn replica() -> Replica<TestApp> {
    let pairs: Vec<Keypair> = (0..4u8).map(|i| Keypair::from_seed([i + 1; 32])).collect();
    let keys: Vec<PublicKey> = pairs.iter().map(Keypair::public).collect();
    Replica::new(Config::new(1, keys, pairs[1].clone()), TestApp::new()).unwrap()
}

proptest! {
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = SignedMessage::from_bytes(&bytes, 1 << 20);
        let _ = Message::decode(&bytes, 1 << 20);
        let mut replica = replica();
        let outputs = replica.on_bytes(2, &bytes);
        prop_assert!(outputs.is_empty());
    }

    #[test]
    fn mutated_messages_are_rejected(flip in 0usize..200, bit in 0u8..8) {
        let pairs: Vec<Keypair> = (0..4u8).map(|i| Keypair::from_seed([i + 1; 32])).collect();
        let msg = Message::Status { view: 0, in_view_change: false, last_executed: 3, stable_seq: 0 }.sign(2, &pairs[2]);
        let mut bytes = msg.to_bytes();
        let index = flip % bytes.len();
        bytes[index] ^= 1 << bit;
        let mut replica = replica();
        let before = replica.stats().messages_invalid_total + replica.stats().messages_stale_total;
        let _ = replica.on_bytes(2, &bytes);
        let after = replica.stats().messages_invalid_total + replica.stats().messages_stale_total;
        // Either rejected, or (a flip in an ignored position) a still-valid message.
        if let Ok(decoded) = SignedMessage::from_bytes(&bytes, 1 << 20) {
            if decoded != msg {
                prop_assert!(after > before);
            }
        } else {
            prop_assert!(after > before);
        }
    }
}
