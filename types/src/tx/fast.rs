//! A direct decoder for the payloads a ledger applies by the million: transfers, burns, mints
//! and settlements, in the exact form Hoard's own encoder (and any MessagePack encoder writing
//! the shortest forms) produces.
//!
//! It reads the bytes in one pass, with no serde visitors and no allocation but the payload's
//! own vectors and strings. Anything it does not recognise, it leaves: [`payload`] returns
//! `None` and [`super::Transaction::decode_payload`] decodes with rmp-serde, whose verdict is
//! then the answer. So the one rule this module must keep is: when it returns a payload,
//! rmp-serde returns the same payload for the same bytes (`decodes_as_serde_does` and the
//! property tests in `tx.rs` check it on every body kind and on mutated and truncated bytes).

use compact_str::CompactString;

use crate::asset::{Amount, Asset, ClassId, CurrencyId, EventId, Grant, ItemId, TenantId};
use crate::crypto::{Hash, PublicKey};
use crate::tx::{Settlement, TxBody, TxPayload};

/// A cursor over MessagePack bytes; every read returns `None` on anything unexpected.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn byte(&mut self) -> Option<u8> {
        let (&first, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(first)
    }

    fn marker(&mut self, expected: u8) -> Option<()> {
        (self.byte()? == expected).then_some(())
    }

    /// An unsigned integer in any of MessagePack's unsigned forms.
    fn uint(&mut self) -> Option<u64> {
        Some(match self.byte()? {
            small @ 0x00..=0x7f => u64::from(small),
            0xcc => u64::from(self.byte()?),
            0xcd => u64::from(u16::from_be_bytes(self.take(2)?.try_into().ok()?)),
            0xce => u64::from(u32::from_be_bytes(self.take(4)?.try_into().ok()?)),
            0xcf => u64::from_be_bytes(self.take(8)?.try_into().ok()?),
            _ => return None,
        })
    }

    /// A bin of exactly `N` bytes in its one-byte-length form (`c4`).
    fn bin<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.marker(0xc4)?;
        if usize::from(self.byte()?) != N {
            return None;
        }
        self.take(N)?.try_into().ok()
    }

    /// The bytes of a string of at most 255 bytes (`fixstr` or `str8`), not checked as UTF-8.
    fn str_bytes(&mut self) -> Option<&'a [u8]> {
        let length = match self.byte()? {
            fix @ 0xa0..=0xbf => usize::from(fix & 0x1f),
            0xd9 => usize::from(self.byte()?),
            _ => return None,
        };
        self.take(length)
    }

    /// A string of at most 255 bytes (`fixstr` or `str8`), as UTF-8.
    fn str(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.str_bytes()?).ok()
    }

    /// The length of an array of at most 15 elements (`fixarray`).
    fn fixarray(&mut self) -> Option<usize> {
        match self.byte()? {
            fix @ 0x90..=0x9f => Some(usize::from(fix & 0x0f)),
            _ => None,
        }
    }

    /// The length of an array of at most 65535 elements (`fixarray` or `array16`).
    fn array(&mut self) -> Option<usize> {
        match self.0.first()? {
            0xdc => {
                self.byte()?;
                Some(usize::from(u16::from_be_bytes(self.take(2)?.try_into().ok()?)))
            }
            _ => self.fixarray(),
        }
    }

    /// A one-entry map's key: an enum's variant name, as bytes. Callers compare it with the
    /// ASCII names they know, so bytes that are not UTF-8 match none and go to rmp-serde, which
    /// rejects them: no UTF-8 check is needed here.
    fn variant(&mut self) -> Option<&'a [u8]> {
        self.marker(0x81)?;
        self.str_bytes()
    }

    fn key(&mut self) -> Option<PublicKey> {
        self.bin::<32>().map(PublicKey)
    }

    fn amount(&mut self) -> Option<Amount> {
        self.bin::<16>().map(|bytes| Amount(u128::from_be_bytes(bytes)))
    }

    /// The fields of a currency asset or grant: `[currency, amount]`.
    fn currency_amount(&mut self) -> Option<(CurrencyId, Amount)> {
        self.marker(0x92)?;
        let currency = CurrencyId(CompactString::new(self.str()?));
        Some((currency, self.amount()?))
    }

    fn asset(&mut self) -> Option<Asset> {
        match self.variant()? {
            b"currency" => {
                let (currency, amount) = self.currency_amount()?;
                Some(Asset::Currency { currency, amount })
            }
            b"item" => {
                self.marker(0x91)?;
                Some(Asset::Item {
                    item: ItemId(self.uint()?),
                })
            }
            _ => None,
        }
    }

    fn assets(&mut self) -> Option<Vec<Asset>> {
        let count = self.array()?;
        // Each asset takes at least 4 bytes: no length claims more than the input holds.
        if count > self.0.len() / 4 {
            return None;
        }
        let mut assets = Vec::with_capacity(count);
        for _ in 0..count {
            assets.push(self.asset()?);
        }
        Some(assets)
    }

    fn grant(&mut self) -> Option<Grant> {
        match self.variant()? {
            b"currency" => {
                let (currency, amount) = self.currency_amount()?;
                Some(Grant::Currency { currency, amount })
            }
            b"unique" => {
                self.marker(0x93)?;
                let class = ClassId(self.str()?.to_owned());
                let item = ItemId(self.uint()?);
                let attributes_hash = Hash(self.bin::<32>()?);
                Some(Grant::Unique {
                    class,
                    item,
                    attributes_hash,
                })
            }
            b"stack" => {
                self.marker(0x93)?;
                let class = ClassId(self.str()?.to_owned());
                let item = ItemId(self.uint()?);
                let quantity = self.amount()?;
                Some(Grant::Stack {
                    class,
                    item,
                    quantity,
                })
            }
            _ => None,
        }
    }

    fn body(&mut self) -> Option<TxBody> {
        match self.variant()? {
            b"transfer" => {
                self.marker(0x93)?;
                let from = self.key()?;
                let to = self.key()?;
                let assets = self.assets()?;
                Some(TxBody::Transfer { from, to, assets })
            }
            b"burn" => {
                self.marker(0x92)?;
                let from = self.key()?;
                let assets = self.assets()?;
                Some(TxBody::Burn { from, assets })
            }
            b"mint" => {
                self.marker(0x92)?;
                let to = self.key()?;
                let grant = self.grant()?;
                Some(TxBody::Mint { to, grant })
            }
            b"settle" => {
                self.marker(0x91)?;
                let count = self.array()?;
                // Each entry takes at least 40 bytes (a key and a grant).
                if count > self.0.len() / 40 {
                    return None;
                }
                let mut entries = Vec::with_capacity(count);
                for _ in 0..count {
                    self.marker(0x92)?;
                    let to = self.key()?;
                    let grant = self.grant()?;
                    entries.push(Settlement { to, grant });
                }
                Some(TxBody::Settle { entries })
            }
            _ => None,
        }
    }
}

/// The payload `bytes` encode, when they are one of the forms this module reads, and nothing
/// follows it; otherwise `None` (rmp-serde decides).
pub(super) fn payload(bytes: &[u8]) -> Option<TxPayload> {
    let mut reader = Reader(bytes);
    reader.marker(0x95)?;
    let chain_id = reader.uint()?;
    let tenant = TenantId(reader.uint()?);
    let event_id = EventId(reader.bin::<16>()?);
    let expires_at = reader.uint()?;
    let body = reader.body()?;
    reader.0.is_empty().then_some(TxPayload {
        chain_id,
        tenant,
        event_id,
        expires_at,
        body,
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::asset::Custody;
    use crate::tx::SwapSide;

    fn serde(bytes: &[u8]) -> Option<TxPayload> {
        rmp_serde::from_slice(bytes).ok()
    }

    fn key(seed: u8) -> PublicKey {
        PublicKey([seed; 32])
    }

    fn gold(amount: u128) -> Asset {
        Asset::Currency {
            currency: CurrencyId::new("GOLD"),
            amount: Amount(amount),
        }
    }

    fn with(body: TxBody) -> TxPayload {
        TxPayload {
            chain_id: 1,
            tenant: TenantId(7),
            event_id: EventId::from_u128(42),
            expires_at: 100,
            body,
        }
    }

    #[test]
    fn reads_each_body_it_knows_as_serde_does() {
        let settle = |entries: usize| TxBody::Settle {
            entries: (0..entries)
                .map(|i| Settlement {
                    to: key(i as u8),
                    grant: Grant::Currency {
                        currency: CurrencyId::new("GEM"),
                        amount: Amount(i as u128),
                    },
                })
                .collect(),
        };
        let bodies = [
            TxBody::Transfer {
                from: key(1),
                to: key(2),
                assets: vec![gold(5), Asset::Item { item: ItemId(9) }, gold(u128::MAX)],
            },
            TxBody::Transfer {
                from: key(1),
                to: key(2),
                assets: (0..20).map(|i| Asset::Item { item: ItemId(1 << i) }).collect(),
            },
            TxBody::Burn {
                from: key(1),
                assets: vec![],
            },
            TxBody::Mint {
                to: key(3),
                grant: Grant::Unique {
                    class: ClassId("sword".into()),
                    item: ItemId(u64::MAX),
                    attributes_hash: Hash([4; 32]),
                },
            },
            TxBody::Mint {
                to: key(3),
                grant: Grant::Stack {
                    class: ClassId("a".repeat(32)),
                    item: ItemId(300),
                    quantity: Amount(50),
                },
            },
            settle(0),
            settle(3),
            settle(900),
        ];
        for body in bodies {
            let payload = with(body);
            let bytes = payload.encode();
            assert_eq!(super::payload(&bytes).as_ref(), Some(&payload), "{payload:?}");
            assert_eq!(serde(&bytes).as_ref(), Some(&payload));
        }
    }

    #[test]
    fn leaves_other_bodies_and_forms_to_serde() {
        let others = [
            TxBody::RegisterAccount {
                account: key(1),
                custody: Custody::Custodial,
            },
            TxBody::Merge {
                owner: key(1),
                into: ItemId(1),
                from: ItemId(2),
            },
            TxBody::Swap {
                left: SwapSide {
                    account: key(1),
                    gives: vec![gold(1)],
                },
                right: SwapSide {
                    account: key(2),
                    gives: vec![],
                },
            },
        ];
        for body in others {
            let bytes = with(body).encode();
            assert_eq!(super::payload(&bytes), None);
            assert!(serde(&bytes).is_some());
        }
        // Trailing bytes, a struct written as a map, a variant by index: serde's to judge.
        let transfer = with(TxBody::Transfer {
            from: key(1),
            to: key(2),
            assets: vec![gold(5)],
        });
        let mut trailing = transfer.encode();
        trailing.push(0xc0);
        assert_eq!(super::payload(&trailing), None);
        let named = rmp_serde::to_vec_named(&transfer).unwrap();
        assert_eq!(super::payload(&named), None);
        assert_eq!(serde(&named), Some(transfer));
    }

    #[test]
    fn variant_names_are_matched_as_bytes() {
        let transfer = with(TxBody::Transfer {
            from: key(1),
            to: key(2),
            assets: vec![gold(5)],
        });
        let bytes = transfer.encode();
        // Each variant name this decoder knows, replaced by bytes of the same length that are
        // not UTF-8 (0xff never is), and by a different ASCII name: none is read here, and
        // serde rejects both.
        for name in [&b"transfer"[..], b"currency"] {
            let at = bytes
                .windows(name.len())
                .position(|window| window == name)
                .expect("the name is in the payload");
            for replacement in [vec![0xff; name.len()], b"x".repeat(name.len())] {
                let mut changed = bytes.clone();
                changed[at..at + name.len()].copy_from_slice(&replacement);
                assert_eq!(super::payload(&changed), None);
                assert_eq!(serde(&changed), None);
            }
        }
        assert_eq!(super::payload(&bytes), Some(transfer));
    }

    #[test]
    fn longer_integer_forms_read_the_same() {
        let payload = with(TxBody::Burn {
            from: key(1),
            assets: vec![Asset::Item { item: ItemId(5) }],
        });
        let short = payload.encode();
        // chain_id 1 (`01`) written as u8, u16, u32, u64.
        for form in [
            &[0xcc, 1][..],
            &[0xcd, 0, 1],
            &[0xce, 0, 0, 0, 1],
            &[0xcf, 0, 0, 0, 0, 0, 0, 0, 1],
        ] {
            let mut bytes = vec![0x95];
            bytes.extend_from_slice(form);
            bytes.extend_from_slice(&short[2..]);
            assert_eq!(super::payload(&bytes).as_ref(), Some(&payload));
            assert_eq!(serde(&bytes).as_ref(), Some(&payload));
        }
    }

    fn amount() -> impl Strategy<Value = Amount> {
        prop_oneof![(0u128..300).prop_map(Amount), any::<u128>().prop_map(Amount)]
    }

    fn name() -> impl Strategy<Value = String> {
        // Valid or not: the decoder reads any UTF-8 string; the ledger judges names.
        prop_oneof!["[A-Z0-9_]{0,17}", ".{0,40}"]
    }

    fn asset() -> impl Strategy<Value = Asset> {
        prop_oneof![
            (name(), amount()).prop_map(|(c, amount)| Asset::Currency {
                currency: CurrencyId(c.into()),
                amount
            }),
            any::<u64>().prop_map(|i| Asset::Item { item: ItemId(i) }),
        ]
    }

    fn grant() -> impl Strategy<Value = Grant> {
        prop_oneof![
            (name(), amount()).prop_map(|(c, amount)| Grant::Currency {
                currency: CurrencyId(c.into()),
                amount
            }),
            (name(), any::<u64>(), any::<[u8; 32]>()).prop_map(|(c, i, h)| Grant::Unique {
                class: ClassId(c),
                item: ItemId(i),
                attributes_hash: Hash(h),
            }),
            (name(), any::<u64>(), amount()).prop_map(|(c, i, quantity)| Grant::Stack {
                class: ClassId(c),
                item: ItemId(i),
                quantity,
            }),
        ]
    }

    fn body() -> impl Strategy<Value = TxBody> {
        let key = || any::<[u8; 32]>().prop_map(PublicKey);
        prop_oneof![
            (key(), key(), prop::collection::vec(asset(), 0..20))
                .prop_map(|(from, to, assets)| TxBody::Transfer { from, to, assets }),
            (key(), prop::collection::vec(asset(), 0..4))
                .prop_map(|(from, assets)| TxBody::Burn { from, assets }),
            (key(), grant()).prop_map(|(to, grant)| TxBody::Mint { to, grant }),
            prop::collection::vec(
                (key(), grant()).prop_map(|(to, grant)| Settlement { to, grant }),
                0..20
            )
            .prop_map(|entries| TxBody::Settle { entries }),
        ]
    }

    fn payload() -> impl Strategy<Value = TxPayload> {
        let int = || prop_oneof![0u64..200, any::<u64>()];
        (int(), int(), any::<u128>(), int(), body()).prop_map(
            |(chain_id, tenant, event, expires_at, body)| TxPayload {
                chain_id,
                tenant: TenantId(tenant),
                event_id: EventId::from_u128(event),
                expires_at,
                body,
            },
        )
    }

    proptest! {
        #[test]
        fn every_payload_it_knows_reads_as_encoded(payload in payload()) {
            let bytes = payload.encode();
            prop_assert_eq!(super::payload(&bytes), Some(payload));
        }

        /// The rule of this module: whatever it reads, serde reads the same, however the bytes
        /// were damaged.
        #[test]
        fn what_it_reads_serde_reads_the_same(
            payload in payload(),
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..4),
        ) {
            let mut bytes = payload.encode();
            for (at, byte, kind) in edits {
                let at = at.index(bytes.len() + 1);
                match kind {
                    0 if at < bytes.len() => bytes[at] = byte,
                    1 => bytes.insert(at, byte),
                    2 if at < bytes.len() => { bytes.remove(at); }
                    _ => bytes.truncate(at),
                }
            }
            if let Some(read) = super::payload(&bytes) {
                prop_assert_eq!(serde(&bytes), Some(read));
            }
        }
    }
}
