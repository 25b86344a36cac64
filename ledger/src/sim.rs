//! The real ledger under PBFT's deterministic simulator: the app factory and a workload of real
//! signed transactions, shared by the `hoard-sim` binary and the test suite.
//!
//! Every request is a batch of transactions of one simulated client, all derived from the
//! seeded RNG: (re)definitions of the currency and item class, player registrations, mints,
//! transfers, a swap and a settlement. Redefinitions and re-registrations are refused
//! (`currency_exists`, `account_exists`), which is deliberate: requests may be lost, delayed or
//! reordered by the simulated network, so every request carries what it needs, and the
//! refusals exercise the state machine's rejection paths on every replica alike.

use std::sync::Arc;

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use hoard_pbft::sim::SimOptions;
use hoard_pbft::{ReplicaId, Request};
use hoard_types::{
    Amount, Asset, ClassId, CurrencyId, Custody, EventId, Grant, Hash, ItemId, Keypair, Settlement, SwapSide,
    TenantId, Transaction, TxBody, TxPayload,
};

use crate::app::{encode_request, LedgerApp};
use crate::state::Ledger;
use crate::testing::{key, World};

/// Players the simulated workload moves assets between.
pub const SIM_PLAYERS: u64 = 6;
const T: TenantId = TenantId(1);

/// The world every simulated replica starts from.
pub fn sim_world() -> World {
    let mut world = World::new(1);
    world.expires_at = 1_000;
    world
}

/// A fresh ledger app at genesis (the simulator calls this per replica and per restart).
pub fn make_app(_replica: ReplicaId) -> LedgerApp {
    LedgerApp::new(Ledger::new(&sim_world().genesis()))
}

/// Simulator options with the ledger's supply invariant checked after every step.
pub fn options(replay_binary: &str) -> SimOptions<LedgerApp> {
    let options = SimOptions::<LedgerApp> {
        invariant: Some(Arc::new(|app: &LedgerApp| app.ledger().check_invariants())),
        replay_command: format!("{replay_binary} --seed {{seed}} --replicas {{replicas}}"),
        ..SimOptions::default()
    };
    options
}

/// One client request: 3 to 8 real transactions, signed as the ledger requires.
pub fn make_request(rng: &mut ChaCha8Rng, client: u64, nonce: u64) -> Request {
    let world = sim_world();
    let studio = world.studio(T).clone();
    let player = |i: u64| key("sim-player", i);
    let mut index = 0u64;
    let mut next_event = || {
        index += 1;
        EventId::derive(&[
            b"sim",
            &client.to_be_bytes(),
            &nonce.to_be_bytes(),
            &index.to_be_bytes(),
        ])
    };
    let sign = |event_id: EventId, body: TxBody, signers: &[&Keypair]| -> Transaction {
        TxPayload {
            chain_id: world.chain_id,
            tenant: T,
            event_id,
            expires_at: world.expires_at,
            body,
        }
        .sign(signers)
    };
    // Even players hold their own keys; odd ones are custodial (the studio signs).
    let authority = |i: u64| {
        if i.is_multiple_of(2) {
            player(i)
        } else {
            studio.clone()
        }
    };
    let gold = |amount: u128| Asset::Currency {
        currency: CurrencyId::new("GOLD"),
        amount: Amount(amount),
    };
    let mut transactions = vec![
        sign(
            next_event(),
            TxBody::DefineCurrency {
                currency: CurrencyId::new("GOLD"),
                decimals: 0,
                max_supply: Amount(1_000_000),
            },
            &[&studio],
        ),
        sign(
            next_event(),
            TxBody::DefineItemClass {
                class: ClassId::new("sword"),
                stackable: false,
                max_supply: Amount(10_000),
                metadata_hash: Hash::ZERO,
            },
            &[&studio],
        ),
    ];
    let a = rng.gen_range(0..SIM_PLAYERS);
    let b = (a + rng.gen_range(1..SIM_PLAYERS)) % SIM_PLAYERS;
    for p in [a, b] {
        let custody = if p.is_multiple_of(2) {
            Custody::SelfCustody
        } else {
            Custody::Custodial
        };
        transactions.push(sign(
            next_event(),
            TxBody::RegisterAccount {
                account: player(p).public(),
                custody,
            },
            &[&studio],
        ));
    }
    let item = ItemId(client << 32 | nonce);
    for _ in 0..rng.gen_range(1..=4) {
        let body = match rng.gen_range(0..5) {
            0 => TxBody::Mint {
                to: player(a).public(),
                grant: Grant::Currency {
                    currency: CurrencyId::new("GOLD"),
                    amount: Amount(rng.gen_range(1..500)),
                },
            },
            1 => TxBody::Mint {
                to: player(b).public(),
                grant: Grant::Unique {
                    class: ClassId::new("sword"),
                    item,
                    attributes_hash: Hash::ZERO,
                },
            },
            2 => TxBody::Transfer {
                from: player(a).public(),
                to: player(b).public(),
                assets: vec![gold(rng.gen_range(1..300))],
            },
            3 => TxBody::Swap {
                left: SwapSide {
                    account: player(a).public(),
                    gives: vec![gold(rng.gen_range(1..100))],
                },
                right: SwapSide {
                    account: player(b).public(),
                    gives: vec![Asset::Item { item }],
                },
            },
            _ => TxBody::Settle {
                entries: (0..SIM_PLAYERS)
                    .map(|p| Settlement {
                        to: player(p).public(),
                        grant: Grant::Currency {
                            currency: CurrencyId::new("GOLD"),
                            amount: Amount(rng.gen_range(1..20)),
                        },
                    })
                    .collect(),
            },
        };
        let (left, right) = (authority(a), authority(b));
        let transaction = match &body {
            TxBody::Mint { .. } | TxBody::Settle { .. } => sign(next_event(), body, &[&studio]),
            TxBody::Swap { .. } if left.public() != right.public() => {
                sign(next_event(), body, &[&left, &right])
            }
            _ => sign(next_event(), body, &[&left]),
        };
        transactions.push(transaction);
    }
    Request {
        client,
        payload: encode_request(&transactions),
    }
}
