//! Open trade offers between players, in memory: made (maker-signed swap), listed, cancelled,
//! expired, or accepted (the taker's signature completes the swap, which then goes down the
//! event pipeline as one atomic transaction). Bounded per maker and in total. A gateway restart
//! drops open offers; nothing signed by both parties is lost.

use std::collections::HashMap;
use std::sync::Mutex;

use hoard_types::wire::{OfferInfo, OPEN_OFFERS_PER_PLAYER_MAX};
use hoard_types::{EventId, PublicKey, TenantId};

use crate::constants::{OFFERS_LISTED_MAX, OFFERS_OPEN_MAX};

/// Why an offer could not be opened.
#[derive(Debug, PartialEq, Eq)]
pub enum OpenError {
    /// The maker has too many open offers, or the gateway does.
    TooMany,
    /// An open offer already has this id.
    Exists,
}

#[derive(Default)]
struct Book {
    offers: HashMap<(TenantId, EventId), OfferInfo>,
    per_maker: HashMap<(TenantId, PublicKey), usize>,
}

/// The offer book.
#[derive(Default)]
pub struct Offers {
    book: Mutex<Book>,
}

impl Offers {
    pub fn open(&self, tenant: TenantId, offer: OfferInfo) -> Result<(), OpenError> {
        let mut book = self.book.lock().expect("offers lock");
        if book.offers.contains_key(&(tenant, offer.offer_id)) {
            return Err(OpenError::Exists);
        }
        let count = book.per_maker.get(&(tenant, offer.maker)).copied().unwrap_or(0);
        if count >= OPEN_OFFERS_PER_PLAYER_MAX || book.offers.len() >= OFFERS_OPEN_MAX {
            return Err(OpenError::TooMany);
        }
        book.per_maker.insert((tenant, offer.maker), count + 1);
        book.offers.insert((tenant, offer.offer_id), offer);
        metrics::gauge!(crate::metrics::OFFERS_OPEN).set(book.offers.len() as f64);
        Ok(())
    }

    pub fn get(&self, tenant: TenantId, offer_id: &EventId) -> Option<OfferInfo> {
        self.book
            .lock()
            .expect("offers lock")
            .offers
            .get(&(tenant, *offer_id))
            .cloned()
    }

    /// Removes an offer (accepted, cancelled or expired).
    pub fn remove(&self, tenant: TenantId, offer_id: &EventId) -> Option<OfferInfo> {
        let mut book = self.book.lock().expect("offers lock");
        let offer = book.offers.remove(&(tenant, *offer_id))?;
        if let Some(count) = book.per_maker.get_mut(&(tenant, offer.maker)) {
            *count -= 1;
            if *count == 0 {
                book.per_maker.remove(&(tenant, offer.maker));
            }
        }
        metrics::gauge!(crate::metrics::OFFERS_OPEN).set(book.offers.len() as f64);
        Some(offer)
    }

    /// Offers of a tenant where `player` is maker or taker (`None`: all of the tenant's), bounded.
    pub fn list(&self, tenant: TenantId, player: Option<&PublicKey>) -> Vec<OfferInfo> {
        let book = self.book.lock().expect("offers lock");
        let mut offers: Vec<OfferInfo> = book
            .offers
            .iter()
            .filter(|((t, _), o)| {
                *t == tenant
                    && match player {
                        None => true,
                        Some(p) => o.maker == *p || o.taker == *p,
                    }
            })
            .map(|(_, o)| o.clone())
            .collect();
        offers.sort_by_key(|o| (o.expires_unix_ms, o.offer_id));
        offers.truncate(OFFERS_LISTED_MAX);
        offers
    }

    /// Removes and returns every offer expired at `now_unix_ms`.
    pub fn expire(&self, now_unix_ms: u64) -> Vec<(TenantId, OfferInfo)> {
        let expired: Vec<(TenantId, EventId)> = {
            let book = self.book.lock().expect("offers lock");
            book.offers
                .iter()
                .filter(|(_, o)| o.expires_unix_ms <= now_unix_ms)
                .map(|(key, _)| *key)
                .collect()
        };
        expired
            .into_iter()
            .filter_map(|(tenant, id)| self.remove(tenant, &id).map(|o| (tenant, o)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hoard_types::{Keypair, Transaction};

    fn offer(id: u128, maker: u8, expires: u64) -> OfferInfo {
        OfferInfo {
            offer_id: EventId::from_u128(id),
            maker: Keypair::from_seed([maker; 32]).public(),
            taker: Keypair::from_seed([99; 32]).public(),
            tx: Transaction {
                payload: vec![],
                signatures: vec![],
            },
            expires_unix_ms: expires,
        }
    }

    #[test]
    fn offers_are_bounded_per_maker_and_expire() {
        let offers = Offers::default();
        let t = TenantId(1);
        for i in 0..OPEN_OFFERS_PER_PLAYER_MAX as u128 {
            offers.open(t, offer(i, 1, 100 + i as u64)).unwrap();
        }
        assert_eq!(offers.open(t, offer(1000, 1, 5)), Err(OpenError::TooMany));
        assert_eq!(offers.open(t, offer(0, 2, 5)), Err(OpenError::Exists));
        offers.open(t, offer(1001, 2, 5)).unwrap();
        assert_eq!(offers.open(TenantId(2), offer(1000, 1, 5)), Ok(()));
        let expired = offers.expire(101);
        assert_eq!(
            expired.len(),
            4,
            "ids 0 and 1 of maker 1, maker 2's, and tenant 2's"
        );
        offers.open(t, offer(1000, 1, 500)).unwrap();
        let maker = Keypair::from_seed([1; 32]).public();
        assert_eq!(offers.list(t, Some(&maker)).len(), OPEN_OFFERS_PER_PLAYER_MAX - 1);
        assert!(offers.list(TenantId(3), None).is_empty());
    }
}
