//! Property tests of the asset state machine's invariants: conservation of supply, no negative
//! balance, atomic swaps, determinism, and first-outcome deduplication.

use proptest::prelude::*;

use hoard_ledger::testing::{key, World};
use hoard_ledger::Ledger;
use hoard_types::{
    Amount, Asset, CurrencyId, Custody, Grant, ItemId, Keypair, Outcome, Settlement, SwapSide, TenantId,
    Transaction, TxBody,
};

const T: TenantId = TenantId(1);
const PLAYERS: usize = 4;

/// An abstract operation over a small universe, so that collisions (same item, same player,
/// overdrafts) happen often.
#[derive(Clone, Debug)]
enum Op {
    MintGold {
        to: usize,
        amount: u128,
    },
    MintSword {
        to: usize,
        item: u64,
    },
    MintArrows {
        to: usize,
        item: u64,
        quantity: u128,
    },
    Transfer {
        from: usize,
        to: usize,
        amount: u128,
        item: Option<u64>,
    },
    Burn {
        from: usize,
        amount: u128,
    },
    Split {
        owner: usize,
        item: u64,
        quantity: u128,
        new_item: u64,
    },
    Merge {
        owner: usize,
        into: u64,
        from: u64,
    },
    Swap {
        left: usize,
        right: usize,
        gold: u128,
        item: u64,
    },
    Settle {
        to: Vec<(usize, u128)>,
    },
    /// Resubmit an earlier transaction (by index into what was sent so far).
    Replay {
        index: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let player = 0..PLAYERS;
    let item = 1u64..8;
    prop_oneof![
        (player.clone(), 1u128..300).prop_map(|(to, amount)| Op::MintGold { to, amount }),
        (player.clone(), item.clone()).prop_map(|(to, item)| Op::MintSword { to, item }),
        (player.clone(), item.clone(), 1u128..40).prop_map(|(to, item, quantity)| Op::MintArrows {
            to,
            item,
            quantity
        }),
        (
            player.clone(),
            player.clone(),
            0u128..200,
            prop::option::of(item.clone())
        )
            .prop_map(|(from, to, amount, item)| Op::Transfer {
                from,
                to,
                amount,
                item
            }),
        (player.clone(), 1u128..100).prop_map(|(from, amount)| Op::Burn { from, amount }),
        (player.clone(), item.clone(), 1u128..30, item.clone()).prop_map(
            |(owner, item, quantity, new_item)| Op::Split {
                owner,
                item,
                quantity,
                new_item
            }
        ),
        (player.clone(), item.clone(), item.clone()).prop_map(|(owner, into, from)| Op::Merge {
            owner,
            into,
            from
        }),
        (player.clone(), player.clone(), 1u128..200, item.clone()).prop_map(|(left, right, gold, item)| {
            Op::Swap {
                left,
                right,
                gold,
                item,
            }
        }),
        prop::collection::vec((player.clone(), 1u128..50), 1..5).prop_map(|to| Op::Settle { to }),
        (0usize..1000).prop_map(|index| Op::Replay { index }),
    ]
}

struct Harness {
    world: World,
    players: Vec<Keypair>,
    sent: Vec<Transaction>,
}

impl Harness {
    fn new() -> (Harness, Vec<Transaction>) {
        let mut world = World::new(1);
        // Half the players are custodial, so both signing paths are exercised.
        let players: Vec<Keypair> = (0..PLAYERS as u64).map(|i| key("player", i)).collect();
        let mut setup = vec![
            world.define_currency(T, "GOLD", 5_000),
            world.define_class(T, "sword", false, 5),
            world.define_class(T, "arrow", true, 200),
        ];
        for (i, player) in players.iter().enumerate() {
            let custody = if i % 2 == 0 {
                Custody::SelfCustody
            } else {
                Custody::Custodial
            };
            setup.push(world.register(T, &player.public(), custody));
        }
        (
            Harness {
                world,
                players,
                sent: Vec::new(),
            },
            setup,
        )
    }

    fn signer(&self, player: usize) -> Keypair {
        if player.is_multiple_of(2) {
            self.players[player].clone()
        } else {
            self.world.studio(T).clone()
        }
    }

    fn gold(amount: u128) -> Asset {
        Asset::Currency {
            currency: CurrencyId::new("GOLD"),
            amount: Amount(amount),
        }
    }

    fn build(&mut self, op: &Op) -> Transaction {
        let p = |i: usize| self.players[i].public();
        let tx = match op.clone() {
            Op::MintGold { to, amount } => self.world.mint_currency(T, &p(to), "GOLD", amount),
            Op::MintSword { to, item } => self.world.mint_unique(T, &p(to), "sword", item),
            Op::MintArrows { to, item, quantity } => {
                self.world.mint_stack(T, &p(to), "arrow", item, quantity)
            }
            Op::Transfer {
                from,
                to,
                amount,
                item,
            } => {
                let mut assets = vec![Self::gold(amount)];
                assets.extend(item.map(|item| Asset::Item { item: ItemId(item) }));
                let signer = self.signer(from);
                self.world.tx(
                    T,
                    TxBody::Transfer {
                        from: p(from),
                        to: p(to),
                        assets,
                    },
                    &[&signer],
                )
            }
            Op::Burn { from, amount } => {
                let signer = self.signer(from);
                self.world.tx(
                    T,
                    TxBody::Burn {
                        from: p(from),
                        assets: vec![Self::gold(amount)],
                    },
                    &[&signer],
                )
            }
            Op::Split {
                owner,
                item,
                quantity,
                new_item,
            } => {
                let signer = self.signer(owner);
                let body = TxBody::Split {
                    owner: p(owner),
                    item: ItemId(item),
                    quantity: Amount(quantity),
                    new_item: ItemId(new_item),
                };
                self.world.tx(T, body, &[&signer])
            }
            Op::Merge { owner, into, from } => {
                let signer = self.signer(owner);
                self.world.tx(
                    T,
                    TxBody::Merge {
                        owner: p(owner),
                        into: ItemId(into),
                        from: ItemId(from),
                    },
                    &[&signer],
                )
            }
            Op::Swap {
                left,
                right,
                gold,
                item,
            } => {
                let (a, b) = (self.signer(left), self.signer(right));
                let signers: Vec<&Keypair> = if a.public() == b.public() {
                    vec![&a]
                } else {
                    vec![&a, &b]
                };
                let body = TxBody::Swap {
                    left: SwapSide {
                        account: p(left),
                        gives: vec![Self::gold(gold)],
                    },
                    right: SwapSide {
                        account: p(right),
                        gives: vec![Asset::Item { item: ItemId(item) }],
                    },
                };
                self.world.tx(T, body, &signers)
            }
            Op::Settle { to } => {
                let entries = to
                    .into_iter()
                    .map(|(to, amount)| Settlement {
                        to: p(to),
                        grant: Grant::Currency {
                            currency: CurrencyId::new("GOLD"),
                            amount: Amount(amount),
                        },
                    })
                    .collect();
                self.world.studio_tx(T, TxBody::Settle { entries })
            }
            Op::Replay { index } => {
                if self.sent.is_empty() {
                    return self.world.mint_currency(T, &p(0), "GOLD", 1);
                }
                self.sent[index % self.sent.len()].clone()
            }
        };
        self.sent.push(tx.clone());
        tx
    }
}

/// What an account holds, summarised (balances and owned items).
type Holdings = Vec<(Vec<(CurrencyId, Amount)>, Vec<ItemId>)>;

fn holdings(ledger: &Ledger, players: &[Keypair]) -> Holdings {
    players
        .iter()
        .map(|p| {
            let items = ledger
                .inventory(T, &p.public())
                .into_iter()
                .map(|(id, _)| id)
                .collect();
            (ledger.balances(T, &p.public()), items)
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn invariants_hold_and_replicas_agree(ops in prop::collection::vec(op(), 1..120), block_size in 1usize..12) {
        let (mut harness, setup) = Harness::new();
        let genesis = harness.world.genesis();
        // Two replicas: their maps hash with different random keys (`StateHasher`), so their
        // agreement below also shows that no root, receipt or snapshot depends on a map's order.
        let mut ledger = Ledger::new(&genesis);
        let mut twin = Ledger::new(&genesis);
        let (block, _) = ledger.execute(1, setup);
        twin.apply_block(&block).unwrap();
        let mut replayer = twin.clone();
        let mut executed = Vec::new();
        let mut first_outcome = std::collections::HashMap::new();
        let transactions: Vec<Transaction> = ops.iter().map(|op| harness.build(op)).collect();
        for (n, chunk) in transactions.chunks(block_size).enumerate() {
            let before = holdings(&ledger, &harness.players);
            let (block, receipts) = ledger.execute(n as u64 + 2, chunk.to_vec());
            // Supply is conserved and nothing is negative (u128 + the checked laws).
            prop_assert!(ledger.check_invariants().is_ok(), "{:?}", ledger.check_invariants());
            // Another replica fed the same block computes the same roots.
            prop_assert_eq!(twin.apply_block(&block).unwrap(), receipts.clone());
            prop_assert_eq!(twin.state_root(), ledger.state_root());
            executed.push((block, receipts.clone()));
            for (tx, receipt) in chunk.iter().zip(&receipts) {
                // Deduplication returns the first outcome, at the first height.
                let first = first_outcome.entry(receipt.event_id).or_insert((receipt.height, receipt.outcome.clone()));
                if receipt.duplicate {
                    prop_assert_eq!(&(receipt.height, receipt.outcome.clone()), &*first);
                }
                // A swap applies whole or not at all: a rejected swap alone in its block leaves holdings as they were.
                if chunk.len() == 1 && !receipt.outcome.is_applied() {
                    prop_assert_eq!(&holdings(&ledger, &harness.players), &before, "{:?}", tx);
                }
                if let Outcome::Settled { entries } = &receipt.outcome {
                    prop_assert!(entries.iter().all(Option::is_none), "all settlement entries name real players");
                }
            }
        }
        // A replica replaying the blocks pipelined (each block's commitment beside the next
        // one's apply) agrees with every root and ends in the same state.
        let mut replayed = Vec::new();
        replayer
            .apply_blocks(executed.iter().map(|(block, _)| block.clone()), |block, receipts| {
                replayed.push((block, receipts));
                Ok(())
            })
            .unwrap();
        prop_assert!(replayed == executed);
        prop_assert_eq!(replayer.snapshot(), ledger.snapshot());
        // A snapshot restores to the same root.
        let restored = Ledger::restore(&ledger.snapshot(), Some(ledger.head().hash())).unwrap();
        prop_assert_eq!(restored.state_root(), ledger.state_root());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    /// A block large enough to be decoded and hashed on several cores: a settlement credits
    /// 600 accounts, the random operations among the few players follow, and then 300 of the
    /// 600 give their gold back (their balances reach zero and leave the state). The
    /// incremental root must be the one a rebuild from the whole state computes, and a follower
    /// must agree.
    #[test]
    fn a_large_block_commits_the_root_a_rebuild_computes(ops in prop::collection::vec(op(), 100..300)) {
        let (mut harness, mut setup) = Harness::new();
        let extra: Vec<Keypair> = (0..600u64).map(|i| key("extra", i)).collect();
        for account in &extra {
            setup.push(harness.world.register(T, &account.public(), Custody::Custodial));
        }
        let genesis = harness.world.genesis();
        // Two replicas: their maps hash with different random keys (`StateHasher`), so their
        // agreement below also shows that no root, receipt or snapshot depends on a map's order.
        let mut ledger = Ledger::new(&genesis);
        let mut twin = Ledger::new(&genesis);
        let (block, _) = ledger.execute(1, setup);
        twin.apply_block(&block).unwrap();
        let studio = harness.world.studio(T).clone();
        let entries = extra
            .iter()
            .map(|account| Settlement { to: account.public(), grant: Grant::Currency { currency: CurrencyId::new("GOLD"), amount: Amount(1) } })
            .collect();
        let mut transactions = vec![harness.world.tx(T, TxBody::Settle { entries }, &[&studio])];
        transactions.extend(ops.iter().map(|op| harness.build(op)));
        let back = harness.players[0].public();
        for account in &extra[..300] {
            transactions.push(harness.world.transfer(T, &studio, &account.public(), &back, "GOLD", 1));
        }
        let (block, receipts) = ledger.execute(2, transactions);
        prop_assert!(receipts[receipts.len() - 300..].iter().all(|r| r.outcome.is_applied()));
        prop_assert!(ledger.check_invariants().is_ok(), "{:?}", ledger.check_invariants());
        prop_assert_eq!(twin.apply_block(&block).unwrap(), receipts);
        prop_assert_eq!(twin.state_root(), ledger.state_root());
        let restored = Ledger::restore(&ledger.snapshot(), Some(ledger.head().hash())).unwrap();
        prop_assert_eq!(restored.state_root(), ledger.state_root());
    }
}
