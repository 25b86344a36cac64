//! A deterministic world of keys and transaction builders, shared by the ledger's tests, its
//! property tests, the benchmark and the simulator (one harness, not four).

use hoard_types::{
    Amount, Asset, ClassId, CurrencyId, Custody, EventId, Grant, Hash, ItemId, Keypair, PublicKey, TenantId,
    Transaction, TxBody, TxPayload,
};

use crate::genesis::{Genesis, GenesisTenant};

/// Keys derived from small seeds, a genesis naming them, and a counter for event ids.
pub struct World {
    pub chain_id: u64,
    pub operator: Keypair,
    /// `(tenant, studio key)` for each genesis tenant.
    pub studios: Vec<(TenantId, Keypair)>,
    /// The expiry height put into every transaction built here.
    pub expires_at: u64,
    next_event: u128,
}

/// A key from a label (tests name their players: `key("alice", 0)`).
pub fn key(label: &str, index: u64) -> Keypair {
    Keypair::from_seed(Hash::of_parts(&[label.as_bytes(), &index.to_be_bytes()]).0)
}

impl World {
    /// A world with `tenants` studios, tenant ids 1..=tenants.
    pub fn new(tenants: u64) -> World {
        World {
            chain_id: 7,
            operator: key("operator", 0),
            studios: (1..=tenants).map(|t| (TenantId(t), key("studio", t))).collect(),
            expires_at: 50_000,
            next_event: 1,
        }
    }

    pub fn genesis(&self) -> Genesis {
        Genesis {
            chain_id: self.chain_id,
            operator: self.operator.public(),
            tenants: self
                .studios
                .iter()
                .map(|(id, key)| GenesisTenant {
                    id: *id,
                    name: format!("studio-{id}"),
                    studio_key: key.public(),
                })
                .collect(),
        }
    }

    pub fn studio(&self, tenant: TenantId) -> &Keypair {
        &self
            .studios
            .iter()
            .find(|(id, _)| *id == tenant)
            .expect("a genesis tenant")
            .1
    }

    pub fn next_event_id(&mut self) -> EventId {
        self.next_event += 1;
        EventId::from_u128(self.next_event)
    }

    /// A transaction with a fresh event id, signed by `signers`.
    pub fn tx(&mut self, tenant: TenantId, body: TxBody, signers: &[&Keypair]) -> Transaction {
        let event_id = self.next_event_id();
        self.tx_with_id(tenant, event_id, body, signers)
    }

    pub fn tx_with_id(
        &self,
        tenant: TenantId,
        event_id: EventId,
        body: TxBody,
        signers: &[&Keypair],
    ) -> Transaction {
        TxPayload {
            chain_id: self.chain_id,
            tenant,
            event_id,
            expires_at: self.expires_at,
            body,
        }
        .sign(signers)
    }

    /// Studio-signed transaction for `tenant`.
    pub fn studio_tx(&mut self, tenant: TenantId, body: TxBody) -> Transaction {
        let studio = self.studio(tenant).clone();
        self.tx(tenant, body, &[&studio])
    }

    pub fn register(&mut self, tenant: TenantId, account: &PublicKey, custody: Custody) -> Transaction {
        self.studio_tx(
            tenant,
            TxBody::RegisterAccount {
                account: *account,
                custody,
            },
        )
    }

    pub fn define_currency(&mut self, tenant: TenantId, symbol: &str, max_supply: u128) -> Transaction {
        self.studio_tx(
            tenant,
            TxBody::DefineCurrency {
                currency: CurrencyId::new(symbol),
                decimals: 2,
                max_supply: Amount(max_supply),
            },
        )
    }

    pub fn define_class(
        &mut self,
        tenant: TenantId,
        class: &str,
        stackable: bool,
        max_supply: u128,
    ) -> Transaction {
        self.studio_tx(
            tenant,
            TxBody::DefineItemClass {
                class: ClassId::new(class),
                stackable,
                max_supply: Amount(max_supply),
                metadata_hash: Hash::of(class.as_bytes()),
            },
        )
    }

    pub fn mint_currency(
        &mut self,
        tenant: TenantId,
        to: &PublicKey,
        symbol: &str,
        amount: u128,
    ) -> Transaction {
        self.studio_tx(
            tenant,
            TxBody::Mint {
                to: *to,
                grant: Grant::Currency {
                    currency: CurrencyId::new(symbol),
                    amount: Amount(amount),
                },
            },
        )
    }

    pub fn mint_unique(&mut self, tenant: TenantId, to: &PublicKey, class: &str, item: u64) -> Transaction {
        self.studio_tx(
            tenant,
            TxBody::Mint {
                to: *to,
                grant: Grant::Unique {
                    class: ClassId::new(class),
                    item: ItemId(item),
                    attributes_hash: Hash::ZERO,
                },
            },
        )
    }

    pub fn mint_stack(
        &mut self,
        tenant: TenantId,
        to: &PublicKey,
        class: &str,
        item: u64,
        quantity: u128,
    ) -> Transaction {
        self.studio_tx(
            tenant,
            TxBody::Mint {
                to: *to,
                grant: Grant::Stack {
                    class: ClassId::new(class),
                    item: ItemId(item),
                    quantity: Amount(quantity),
                },
            },
        )
    }

    /// A currency transfer signed by `signer` (the owner, or the studio for custodial accounts).
    pub fn transfer(
        &mut self,
        tenant: TenantId,
        signer: &Keypair,
        from: &PublicKey,
        to: &PublicKey,
        symbol: &str,
        amount: u128,
    ) -> Transaction {
        self.tx(
            tenant,
            TxBody::Transfer {
                from: *from,
                to: *to,
                assets: vec![Asset::Currency {
                    currency: CurrencyId::new(symbol),
                    amount: Amount(amount),
                }],
            },
            &[signer],
        )
    }
}
