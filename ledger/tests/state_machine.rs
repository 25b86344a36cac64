//! The asset state machine, rule by rule, through real signed transactions.

use hoard_ledger::block::{list_root, receipt_leaf, transaction_leaf};
use hoard_ledger::testing::{key, World};
use hoard_ledger::{Block, Ledger, RecordedOutcome, StateKey};
use hoard_types::{
    Amount, Asset, ClassId, CurrencyId, Custody, Grant, Hash, ItemId, ItemKind, Keypair, Outcome, Receipt,
    Rejection, Settlement, SwapSide, TenantId, Transaction, TxBody,
};

const A: TenantId = TenantId(1);
const B: TenantId = TenantId(2);

struct Chain {
    world: World,
    ledger: Ledger,
    time: u64,
}

impl Chain {
    fn new() -> Chain {
        Chain::with_world(World::new(2))
    }

    fn with_world(world: World) -> Chain {
        let ledger = Ledger::new(&world.genesis());
        Chain {
            world,
            ledger,
            time: 0,
        }
    }

    fn block(&mut self, transactions: Vec<Transaction>) -> Vec<Receipt> {
        for tx in &transactions {
            tx.verify_signatures().expect("tests sign correctly");
        }
        self.time += 1000;
        let (_, receipts) = self.ledger.execute(self.time, transactions);
        self.ledger
            .check_invariants()
            .expect("invariants hold after every block");
        receipts
    }

    fn one(&mut self, tx: Transaction) -> Outcome {
        let receipts = self.block(vec![tx]);
        assert!(!receipts[0].duplicate);
        receipts[0].outcome.clone()
    }

    /// Tenant A with GOLD, a unique `sword` class, a stackable `arrow` class, and two players:
    /// alice (self-custody) and bob (custodial).
    fn with_players() -> (Chain, Keypair, Keypair) {
        Chain::with_players_in(World::new(2))
    }

    fn with_players_in(world: World) -> (Chain, Keypair, Keypair) {
        let mut chain = Chain::with_world(world);
        let alice = key("alice", 0);
        let bob = key("bob", 0);
        let w = &mut chain.world;
        let setup = vec![
            w.define_currency(A, "GOLD", 1_000_000),
            w.define_class(A, "sword", false, 10),
            w.define_class(A, "arrow", true, 1_000),
            w.register(A, &alice.public(), Custody::SelfCustody),
            w.register(A, &bob.public(), Custody::Custodial),
            w.mint_currency(A, &alice.public(), "GOLD", 500),
            w.mint_unique(A, &bob.public(), "sword", 1),
            w.mint_stack(A, &alice.public(), "arrow", 2, 50),
        ];
        for receipt in chain.block(setup) {
            assert_eq!(receipt.outcome, Outcome::Applied, "{receipt:?}");
        }
        (chain, alice, bob)
    }
}

fn gold(amount: u128) -> Asset {
    Asset::Currency {
        currency: CurrencyId::new("GOLD"),
        amount: Amount(amount),
    }
}

fn rejected(reason: Rejection) -> Outcome {
    Outcome::Rejected { reason }
}

#[test]
fn currency_mint_transfer_burn_and_their_rejections() {
    let (mut chain, alice, bob) = Chain::with_players();
    let gold_id = CurrencyId::new("GOLD");
    let w = &mut chain.world;
    let tx = w.transfer(A, &alice, &alice.public(), &bob.public(), "GOLD", 200);
    assert_eq!(chain.one(tx), Outcome::Applied);
    assert_eq!(chain.ledger.balance(A, &gold_id, &alice.public()), Amount(300));
    assert_eq!(chain.ledger.balance(A, &gold_id, &bob.public()), Amount(200));

    let tx = chain
        .world
        .transfer(A, &alice, &alice.public(), &bob.public(), "GOLD", 301);
    assert_eq!(chain.one(tx), rejected(Rejection::InsufficientFunds));
    let tx = chain
        .world
        .transfer(A, &alice, &alice.public(), &bob.public(), "SILVER", 1);
    assert_eq!(chain.one(tx), rejected(Rejection::UnknownCurrency));
    let tx = chain
        .world
        .transfer(A, &alice, &alice.public(), &alice.public(), "GOLD", 1);
    assert_eq!(chain.one(tx), rejected(Rejection::SelfTransfer));
    let tx = chain
        .world
        .transfer(A, &alice, &alice.public(), &bob.public(), "GOLD", 0);
    assert_eq!(chain.one(tx), rejected(Rejection::InvalidAmount));
    let stranger = key("stranger", 0);
    let tx = chain
        .world
        .transfer(A, &alice, &alice.public(), &stranger.public(), "GOLD", 1);
    assert_eq!(chain.one(tx), rejected(Rejection::UnknownAccount));

    let tx = chain.world.mint_currency(A, &alice.public(), "GOLD", 1_000_000);
    assert_eq!(chain.one(tx), rejected(Rejection::SupplyExceeded));

    let tx = chain.world.tx(
        A,
        TxBody::Burn {
            from: alice.public(),
            assets: vec![gold(100)],
        },
        &[&alice],
    );
    assert_eq!(chain.one(tx), Outcome::Applied);
    let info = chain.ledger.currency(A, &gold_id).unwrap();
    assert_eq!((info.minted, info.burned), (Amount(500), Amount(100)));
    assert_eq!(
        chain.ledger.balances(A, &alice.public()),
        vec![(gold_id, Amount(200))]
    );
}

#[test]
fn who_signs_depends_on_custody() {
    let (mut chain, alice, bob) = Chain::with_players();
    let studio = chain.world.studio(A).clone();
    // A custodial account's assets move only with the studio's signature…
    let tx = chain.world.tx(
        A,
        TxBody::Transfer {
            from: bob.public(),
            to: alice.public(),
            assets: vec![Asset::Item { item: ItemId(1) }],
        },
        &[&bob],
    );
    assert_eq!(chain.one(tx), rejected(Rejection::MissingSignature));
    let tx = chain
        .world
        .transfer(A, &studio, &bob.public(), &alice.public(), "GOLD", 1);
    assert_eq!(
        chain.one(tx),
        rejected(Rejection::InsufficientFunds),
        "studio may sign for bob"
    );
    // …and a self-custodied one's only with the player's.
    let tx = chain
        .world
        .transfer(A, &studio, &alice.public(), &bob.public(), "GOLD", 1);
    assert_eq!(chain.one(tx), rejected(Rejection::MissingSignature));
    // Players cannot mint; an extra signature is refused too.
    let tx = chain.world.tx(
        A,
        TxBody::Mint {
            to: alice.public(),
            grant: Grant::Currency {
                currency: CurrencyId::new("GOLD"),
                amount: Amount(1),
            },
        },
        &[&alice],
    );
    assert_eq!(chain.one(tx), rejected(Rejection::MissingSignature));
    let tx = chain.world.tx(
        A,
        TxBody::Mint {
            to: alice.public(),
            grant: Grant::Currency {
                currency: CurrencyId::new("GOLD"),
                amount: Amount(1),
            },
        },
        &[&studio, &alice],
    );
    assert_eq!(chain.one(tx), rejected(Rejection::Unauthorized));
}

#[test]
fn items_unique_and_stacks_split_merge_burn() {
    let (mut chain, alice, bob) = Chain::with_players();
    let studio = chain.world.studio(A).clone();
    // The studio moves bob's (custodial) sword to alice.
    let tx = chain.world.tx(
        A,
        TxBody::Transfer {
            from: bob.public(),
            to: alice.public(),
            assets: vec![Asset::Item { item: ItemId(1) }],
        },
        &[&studio],
    );
    assert_eq!(chain.one(tx), Outcome::Applied);
    assert_eq!(chain.ledger.item(A, ItemId(1)).unwrap().owner, alice.public());
    let tx = chain.world.tx(
        A,
        TxBody::Transfer {
            from: bob.public(),
            to: alice.public(),
            assets: vec![Asset::Item { item: ItemId(1) }],
        },
        &[&studio],
    );
    assert_eq!(chain.one(tx), rejected(Rejection::NotOwner));
    let tx = chain.world.mint_unique(A, &bob.public(), "sword", 1);
    assert_eq!(chain.one(tx), rejected(Rejection::ItemExists));
    let tx = chain.world.mint_stack(A, &bob.public(), "sword", 9, 3);
    assert_eq!(chain.one(tx), rejected(Rejection::NotStackable));
    let tx = chain.world.mint_unique(A, &bob.public(), "shield", 9);
    assert_eq!(chain.one(tx), rejected(Rejection::UnknownClass));

    // Split 50 arrows into 20 + 30, then merge back.
    let split = |chain: &mut Chain, quantity: u128, new_item: u64| {
        let tx = chain.world.tx(
            A,
            TxBody::Split {
                owner: alice.public(),
                item: ItemId(2),
                quantity: Amount(quantity),
                new_item: ItemId(new_item),
            },
            &[&alice],
        );
        chain.one(tx)
    };
    assert_eq!(
        split(&mut chain, 50, 3),
        rejected(Rejection::InsufficientQuantity)
    );
    assert_eq!(split(&mut chain, 20, 1), rejected(Rejection::ItemExists));
    assert_eq!(split(&mut chain, 20, 3), Outcome::Applied);
    assert_eq!(
        chain.ledger.item(A, ItemId(3)).unwrap().kind,
        ItemKind::Stack { quantity: Amount(20) }
    );
    assert_eq!(
        chain.ledger.item(A, ItemId(2)).unwrap().kind,
        ItemKind::Stack { quantity: Amount(30) }
    );
    assert_eq!(chain.ledger.inventory(A, &alice.public()).len(), 3);
    let merge = |chain: &mut Chain, into: u64, from: u64| {
        let tx = chain.world.tx(
            A,
            TxBody::Merge {
                owner: alice.public(),
                into: ItemId(into),
                from: ItemId(from),
            },
            &[&alice],
        );
        chain.one(tx)
    };
    assert_eq!(merge(&mut chain, 2, 1), rejected(Rejection::NotStackable));
    assert_eq!(merge(&mut chain, 2, 3), Outcome::Applied);
    assert_eq!(
        chain.ledger.item(A, ItemId(2)).unwrap().kind,
        ItemKind::Stack { quantity: Amount(50) }
    );
    assert!(chain.ledger.item(A, ItemId(3)).is_none());

    let tx = chain.world.tx(
        A,
        TxBody::Burn {
            from: alice.public(),
            assets: vec![Asset::Item { item: ItemId(2) }],
        },
        &[&alice],
    );
    assert_eq!(chain.one(tx), Outcome::Applied);
    let arrows = chain.ledger.class(A, &ClassId::new("arrow")).unwrap();
    assert_eq!((arrows.minted, arrows.burned), (Amount(50), Amount(50)));
}

#[test]
fn a_swap_applies_whole_or_not_at_all() {
    let (mut chain, alice, bob) = Chain::with_players();
    let studio = chain.world.studio(A).clone();
    let swap = |alice_gives: u128, bob_item: u64| TxBody::Swap {
        left: SwapSide {
            account: alice.public(),
            gives: vec![gold(alice_gives)],
        },
        right: SwapSide {
            account: bob.public(),
            gives: vec![Asset::Item {
                item: ItemId(bob_item),
            }],
        },
    };
    // Bob's side fails (no such item): alice keeps her gold, bob his sword.
    let tx = chain.world.tx(A, swap(100, 99), &[&alice, &studio]);
    assert_eq!(chain.one(tx), rejected(Rejection::UnknownItem));
    assert_eq!(
        chain.ledger.balance(A, &CurrencyId::new("GOLD"), &alice.public()),
        Amount(500)
    );
    // Alice's side fails: same.
    let tx = chain.world.tx(A, swap(501, 1), &[&alice, &studio]);
    assert_eq!(chain.one(tx), rejected(Rejection::InsufficientFunds));
    assert_eq!(chain.ledger.item(A, ItemId(1)).unwrap().owner, bob.public());
    // Only one party signed.
    let tx = chain.world.tx(A, swap(100, 1), &[&alice]);
    assert_eq!(chain.one(tx), rejected(Rejection::MissingSignature));
    // Both sign: both sides move.
    let tx = chain.world.tx(A, swap(100, 1), &[&studio, &alice]);
    assert_eq!(chain.one(tx), Outcome::Applied);
    assert_eq!(chain.ledger.item(A, ItemId(1)).unwrap().owner, alice.public());
    assert_eq!(
        chain.ledger.balance(A, &CurrencyId::new("GOLD"), &bob.public()),
        Amount(100)
    );
}

#[test]
fn settlement_reports_each_entry() {
    let (mut chain, alice, bob) = Chain::with_players();
    let stranger = key("stranger", 0);
    let entries = vec![
        Settlement {
            to: alice.public(),
            grant: Grant::Currency {
                currency: CurrencyId::new("GOLD"),
                amount: Amount(5),
            },
        },
        Settlement {
            to: stranger.public(),
            grant: Grant::Currency {
                currency: CurrencyId::new("GOLD"),
                amount: Amount(5),
            },
        },
        Settlement {
            to: bob.public(),
            grant: Grant::Currency {
                currency: CurrencyId::new("GEMS"),
                amount: Amount(5),
            },
        },
        Settlement {
            to: bob.public(),
            grant: Grant::Currency {
                currency: CurrencyId::new("GOLD"),
                amount: Amount(7),
            },
        },
    ];
    let tx = chain.world.studio_tx(A, TxBody::Settle { entries });
    assert_eq!(
        chain.one(tx),
        Outcome::Settled {
            entries: vec![
                None,
                Some(Rejection::UnknownAccount),
                Some(Rejection::UnknownCurrency),
                None
            ]
        }
    );
    assert_eq!(
        chain.ledger.balance(A, &CurrencyId::new("GOLD"), &bob.public()),
        Amount(7)
    );
}

/// The window keeps a settlement whose entries all applied as its entry count
/// (`RecordedOutcome::SettledAll`), yet a duplicate gets the whole outcome back, from the
/// ledger and from one restored from its snapshot, and both agree on the state root.
#[test]
fn a_settled_outcome_is_remembered_compactly_and_returned_whole() {
    let (mut chain, alice, bob) = Chain::with_players();
    let grant = |to: &Keypair, currency: &str| Settlement {
        to: to.public(),
        grant: Grant::Currency {
            currency: CurrencyId::new(currency),
            amount: Amount(1),
        },
    };
    let all = chain.world.studio_tx(
        A,
        TxBody::Settle {
            entries: vec![grant(&alice, "GOLD"), grant(&bob, "GOLD")],
        },
    );
    let mixed = chain.world.studio_tx(
        A,
        TxBody::Settle {
            entries: vec![grant(&alice, "GOLD"), grant(&bob, "GEMS")],
        },
    );
    let first = chain.block(vec![all.clone(), mixed.clone()]);
    let all_outcome = Outcome::Settled {
        entries: vec![None, None],
    };
    let mixed_outcome = Outcome::Settled {
        entries: vec![None, Some(Rejection::UnknownCurrency)],
    };
    assert_eq!(first[0].outcome, all_outcome);
    assert_eq!(first[1].outcome, mixed_outcome);
    assert_eq!(
        RecordedOutcome::new(all_outcome.clone()),
        RecordedOutcome::SettledAll { entries: 2 }
    );
    assert_eq!(RecordedOutcome::new(all_outcome.clone()).outcome(), all_outcome);
    assert_eq!(
        RecordedOutcome::new(mixed_outcome.clone()),
        RecordedOutcome::Outcome(mixed_outcome.clone())
    );
    let restored = Ledger::restore(&chain.ledger.snapshot(), Some(chain.ledger.head().hash())).unwrap();
    assert_eq!(restored.state_root(), chain.ledger.state_root());
    for (receipt, outcome) in first.iter().zip([&all_outcome, &mixed_outcome]) {
        for ledger in [&chain.ledger, &restored] {
            assert_eq!(
                ledger.event(A, &receipt.event_id),
                Some((receipt.height, outcome.clone()))
            );
        }
    }
    let again = chain.block(vec![all, mixed]);
    assert!(again.iter().all(|r| r.duplicate));
    assert_eq!(again[0].outcome, all_outcome);
    assert_eq!(again[1].outcome, mixed_outcome);
}

/// A snapshot view shares the windows' records with the ledger instead of copying them: events
/// remembered after the view was taken, in the same window and in a new one, stay out of it.
#[test]
fn a_snapshot_view_is_not_changed_by_later_events() {
    let (mut chain, alice, bob) = Chain::with_players();
    let tx = chain
        .world
        .transfer(A, &alice, &alice.public(), &bob.public(), "GOLD", 1);
    chain.block(vec![tx]);
    let view = chain.ledger.snapshot_view();
    let bytes = chain.ledger.snapshot();
    let head = chain.ledger.head().hash();
    let same_window = chain
        .world
        .transfer(A, &alice, &alice.public(), &bob.public(), "GOLD", 2);
    chain.block(vec![same_window]);
    chain.world.expires_at += 1;
    let new_window = chain
        .world
        .transfer(A, &alice, &alice.public(), &bob.public(), "GOLD", 3);
    chain.block(vec![new_window]);
    assert_eq!(view.encode(), bytes);
    let restored = Ledger::restore(&bytes, Some(head)).unwrap();
    assert_eq!(restored.events_remembered() + 2, chain.ledger.events_remembered());
}

/// The window is bounded in events per tenant, not only in blocks: a full window refuses new
/// events of that tenant (not remembered, so the same event applies later), never another's.
#[test]
fn a_full_deduplication_window_holds_back_only_its_tenant_until_older_events_expire() {
    let mut world = World::new(2);
    world.window_cap = Some(11); // the 8 setup events, then 3 more
    let (mut chain, alice, bob) = Chain::with_players_in(world);
    chain.world.expires_at = 4;
    let fill: Vec<_> = (0..3)
        .map(|_| {
            chain
                .world
                .transfer(A, &alice, &alice.public(), &bob.public(), "GOLD", 1)
        })
        .collect();
    assert!(chain.block(fill).iter().all(|r| r.outcome == Outcome::Applied));
    chain.world.expires_at = 20;
    let held = chain
        .world
        .transfer(A, &alice, &alice.public(), &bob.public(), "GOLD", 5);
    let event_id = held.decode_payload().unwrap().event_id;
    assert_eq!(chain.one(held.clone()), rejected(Rejection::WindowFull));
    assert!(
        chain.ledger.event(A, &event_id).is_none(),
        "a full window's refusal is not remembered"
    );
    // A snapshot carries the cap and the counts.
    let restored = Ledger::restore(&chain.ledger.snapshot(), None).expect("restores");
    let mut again = Ledger::restore(&restored.snapshot(), None).expect("restores");
    let (_, receipts) = again.execute(chain.time + 1, vec![held.clone()]);
    assert_eq!(receipts[0].outcome, rejected(Rejection::WindowFull));
    // Another tenant's window is its own.
    let other = chain.world.define_currency(B, "GEMS", 100);
    assert_eq!(chain.one(other), Outcome::Applied);
    // Once the three expire, the same event applies, once.
    while chain.ledger.height() <= 4 {
        chain.block(vec![]);
    }
    assert_eq!(chain.one(held.clone()), Outcome::Applied);
    assert!(chain.block(vec![held])[0].duplicate);
    assert_eq!(
        chain.ledger.balance(A, &CurrencyId::new("GOLD"), &bob.public()),
        Amount(8)
    );
}

#[test]
fn an_event_applies_once_and_its_outcome_is_remembered_until_expiry() {
    let (mut chain, alice, bob) = Chain::with_players();
    chain.world.expires_at = 6;
    let tx = chain
        .world
        .transfer(A, &alice, &alice.public(), &bob.public(), "GOLD", 10);
    let receipts = chain.block(vec![tx.clone(), tx.clone()]);
    assert_eq!(receipts[0].outcome, Outcome::Applied);
    assert!(receipts[1].duplicate && receipts[1].height == receipts[0].height);
    let again = chain.block(vec![tx.clone()]);
    assert!(again[0].duplicate);
    assert_eq!(again[0].outcome, Outcome::Applied);
    assert_eq!(
        chain.ledger.balance(A, &CurrencyId::new("GOLD"), &bob.public()),
        Amount(10)
    );
    // A rejected event is remembered too: its first outcome is the answer.
    let poor = chain
        .world
        .transfer(A, &alice, &alice.public(), &bob.public(), "GOLD", 10_000);
    assert_eq!(chain.one(poor.clone()), rejected(Rejection::InsufficientFunds));
    let receipt = &chain.block(vec![poor])[0];
    assert!(receipt.duplicate);
    // Past its expiry height, the event is forgotten and refused: it can never apply twice.
    while chain.ledger.height() < 6 {
        chain.block(vec![]);
    }
    assert_eq!(
        chain.ledger.event(A, &receipts[0].event_id).map(|(h, _)| h),
        Some(receipts[0].height)
    );
    chain.block(vec![]);
    assert!(chain.ledger.event(A, &receipts[0].event_id).is_none());
    assert_eq!(chain.block(vec![tx])[0].outcome, rejected(Rejection::Expired));
    assert_eq!(
        chain.ledger.balance(A, &CurrencyId::new("GOLD"), &bob.public()),
        Amount(10)
    );
    // Too far ahead is refused too.
    chain.world.expires_at =
        chain.ledger.height() + 1 + hoard_types::constants::EXPIRY_HORIZON_BLOCKS_MAX + 1;
    let far = chain
        .world
        .transfer(A, &alice, &alice.public(), &bob.public(), "GOLD", 1);
    assert_eq!(chain.one(far), rejected(Rejection::ExpiryTooFar));
}

#[test]
fn replays_on_another_chain_and_forged_event_ids_do_nothing() {
    let (mut chain, alice, bob) = Chain::with_players();
    let mut other = World::new(2);
    other.chain_id = 99;
    let tx = other.transfer(A, &alice, &alice.public(), &bob.public(), "GOLD", 10);
    assert_eq!(chain.one(tx), rejected(Rejection::WrongChain));
    // Someone without authority submits the victim's event id first: the refusal is not
    // remembered, so the real event still applies.
    let event = chain.world.next_event_id();
    let body = TxBody::Transfer {
        from: alice.public(),
        to: bob.public(),
        assets: vec![gold(10)],
    };
    let mallory = key("mallory", 0);
    let forged = chain.world.tx_with_id(A, event, body.clone(), &[&mallory]);
    assert_eq!(chain.one(forged), rejected(Rejection::MissingSignature));
    let real = chain.world.tx_with_id(A, event, body, &[&alice]);
    assert_eq!(chain.one(real), Outcome::Applied);
}

/// An authorisation failure signed by a member of the tenant (its studio, or one of its
/// accounts) is final like any other outcome: remembered, so that resubmitting the same event
/// once it would pass returns the first rejection and changes nothing.
#[test]
fn a_members_authorisation_failure_is_remembered_and_final() {
    let (mut chain, alice, bob) = Chain::with_players();
    let studio = chain.world.studio(A).clone();
    let carol = key("carol", 0);
    // The studio burns from an account not registered yet: no one can sign for it.
    let event = chain.world.next_event_id();
    let burn = TxBody::Burn {
        from: carol.public(),
        assets: vec![gold(5)],
    };
    let early = chain.world.tx_with_id(A, event, burn.clone(), &[&studio]);
    assert_eq!(chain.one(early.clone()), rejected(Rejection::UnknownAccount));
    let setup = vec![
        chain.world.register(A, &carol.public(), Custody::Custodial),
        chain.world.mint_currency(A, &carol.public(), "GOLD", 5),
    ];
    assert!(chain.block(setup).iter().all(|r| r.outcome == Outcome::Applied));
    let again = chain.block(vec![early]);
    assert!(again[0].duplicate);
    assert_eq!(again[0].outcome, rejected(Rejection::UnknownAccount));
    assert_eq!(
        chain
            .ledger
            .balance(A, &CurrencyId("GOLD".into()), &carol.public()),
        Amount(5)
    );
    assert!(chain.ledger.event(A, &event).is_some());
    // A custodial player signs its own transfer: the studio must. Remembered too.
    let event = chain.world.next_event_id();
    let body = TxBody::Transfer {
        from: bob.public(),
        to: alice.public(),
        assets: vec![gold(1)],
    };
    let tx = chain.world.tx_with_id(A, event, body, &[&bob]);
    assert_eq!(chain.one(tx.clone()), rejected(Rejection::MissingSignature));
    let again = chain.block(vec![tx]);
    assert!(again[0].duplicate);
    // Someone outside the tenant gets the same kind of refusal, not remembered (the test
    // above: the real event still applies).
    let event = chain.world.next_event_id();
    let body = TxBody::Transfer {
        from: alice.public(),
        to: bob.public(),
        assets: vec![gold(1)],
    };
    let stranger = key("stranger", 0);
    let forged = chain.world.tx_with_id(A, event, body, &[&stranger]);
    assert_eq!(chain.one(forged), rejected(Rejection::MissingSignature));
    assert!(chain.ledger.event(A, &event).is_none());
}

/// Nothing signed for tenant A reaches tenant B, for every transaction kind: studio A signing a
/// transaction in B's namespace is refused as `wrong_tenant`, and transactions in A's namespace
/// naming B's accounts or items find nothing. B's state root entries are untouched.
#[test]
fn tenants_are_isolated_for_every_transaction_kind() {
    let (mut chain, alice, _bob) = Chain::with_players();
    let carol = key("carol", 0);
    let w = &mut chain.world;
    let setup = vec![
        w.define_currency(B, "GOLD", 1_000),
        w.define_class(B, "sword", false, 10),
        w.define_class(B, "arrow", true, 100),
        w.register(B, &carol.public(), Custody::Custodial),
        w.mint_currency(B, &carol.public(), "GOLD", 100),
        w.mint_unique(B, &carol.public(), "sword", 1),
        w.mint_stack(B, &carol.public(), "arrow", 2, 10),
    ];
    assert!(chain.block(setup).iter().all(|r| r.outcome == Outcome::Applied));
    let snapshot_b = |ledger: &Ledger| {
        (
            ledger.balances(B, &carol.public()),
            ledger.inventory(B, &carol.public()),
            ledger.currencies(B),
            ledger.classes(B),
            ledger.account(B, &alice.public()),
        )
    };
    let before = snapshot_b(&chain.ledger);
    let studio_a = chain.world.studio(A).clone();
    let item = |id: u64| Asset::Item { item: ItemId(id) };
    let bodies = vec![
        TxBody::RegisterAccount {
            account: alice.public(),
            custody: Custody::Custodial,
        },
        TxBody::DefineCurrency {
            currency: CurrencyId::new("GEMS"),
            decimals: 0,
            max_supply: Amount(5),
        },
        TxBody::DefineItemClass {
            class: ClassId::new("axe"),
            stackable: false,
            max_supply: Amount(5),
            metadata_hash: Hash::ZERO,
        },
        TxBody::Mint {
            to: carol.public(),
            grant: Grant::Currency {
                currency: CurrencyId::new("GOLD"),
                amount: Amount(1),
            },
        },
        TxBody::Transfer {
            from: carol.public(),
            to: alice.public(),
            assets: vec![gold(1)],
        },
        TxBody::Burn {
            from: carol.public(),
            assets: vec![item(1)],
        },
        TxBody::Split {
            owner: carol.public(),
            item: ItemId(2),
            quantity: Amount(1),
            new_item: ItemId(3),
        },
        TxBody::Merge {
            owner: carol.public(),
            into: ItemId(2),
            from: ItemId(2),
        },
        TxBody::Swap {
            left: SwapSide {
                account: carol.public(),
                gives: vec![item(1)],
            },
            right: SwapSide {
                account: alice.public(),
                gives: vec![gold(1)],
            },
        },
        TxBody::Settle {
            entries: vec![Settlement {
                to: carol.public(),
                grant: Grant::Currency {
                    currency: CurrencyId::new("GOLD"),
                    amount: Amount(1),
                },
            }],
        },
        TxBody::RegisterTenant {
            name: "takeover".into(),
            studio_key: studio_a.public(),
        },
    ];
    for body in bodies {
        let name = format!("{body:?}");
        // Signed by studio A (and alice where a player signs), aimed at tenant B.
        let tx = chain.world.tx(B, body.clone(), &[&studio_a]);
        let outcome = chain.one(tx);
        assert!(
            matches!(
                outcome,
                Outcome::Rejected {
                    reason: Rejection::WrongTenant
                        | Rejection::UnknownAccount
                        | Rejection::MissingSignature
                        | Rejection::TenantExists
                }
            ),
            "{name}: {outcome:?}"
        );
        // In A's own namespace the same body cannot name B's things.
        let tx = chain.world.tx(A, body, &[&studio_a]);
        let outcome = chain.one(tx);
        assert!(
            !matches!(
                outcome,
                Outcome::Rejected {
                    reason: Rejection::WrongTenant
                }
            ),
            "{name}"
        );
        assert_eq!(snapshot_b(&chain.ledger), before, "{name} touched tenant B");
    }
    let tx = chain.world.tx(
        B,
        TxBody::Mint {
            to: carol.public(),
            grant: Grant::Currency {
                currency: CurrencyId::new("GOLD"),
                amount: Amount(1),
            },
        },
        &[&studio_a],
    );
    assert_eq!(chain.one(tx), rejected(Rejection::WrongTenant));
}

#[test]
fn the_operator_registers_tenants() {
    let mut chain = Chain::new();
    let studio = key("studio", 3);
    let body = TxBody::RegisterTenant {
        name: "third".into(),
        studio_key: studio.public(),
    };
    let studio_a = chain.world.studio(A).clone();
    let tx = chain.world.tx(TenantId(3), body.clone(), &[&studio_a]);
    assert_eq!(chain.one(tx), rejected(Rejection::WrongTenant));
    let tx = chain.world.tx(TenantId(3), body.clone(), &[&studio]);
    assert_eq!(chain.one(tx), rejected(Rejection::MissingSignature));
    let operator = chain.world.operator.clone();
    let tx = chain.world.tx(TenantId(3), body.clone(), &[&operator]);
    assert_eq!(chain.one(tx), Outcome::Applied);
    assert_eq!(
        chain.ledger.tenant(TenantId(3)).unwrap().studio_key,
        studio.public()
    );
    let tx = chain.world.tx(TenantId(3), body, &[&operator]);
    assert_eq!(chain.one(tx), rejected(Rejection::TenantExists));
}

#[test]
fn snapshots_restore_and_are_verified() {
    let (mut chain, alice, bob) = Chain::with_players();
    let tx = chain
        .world
        .transfer(A, &alice, &alice.public(), &bob.public(), "GOLD", 10);
    chain.block(vec![tx]);
    let bytes = chain.ledger.snapshot();
    let restored = Ledger::restore(&bytes, Some(chain.ledger.head().hash())).unwrap();
    assert_eq!(restored.state_root(), chain.ledger.state_root());
    assert_eq!(restored.snapshot(), bytes);
    // The same blocks on both give the same roots.
    let mut twin = restored;
    let tx = chain
        .world
        .transfer(A, &alice, &alice.public(), &bob.public(), "GOLD", 1);
    let (block, _) = chain.ledger.execute(99_000, vec![tx]);
    twin.apply_block(&block).unwrap();
    assert_eq!(twin.state_root(), chain.ledger.state_root());
    // A snapshot with a changed balance fails the root check; a wrong certified head too.
    assert!(Ledger::restore(&bytes, Some(Hash::of(b"other"))).is_err());
    let mut tampered = bytes.clone();
    let needle = Amount(490).0.to_be_bytes();
    let at = tampered
        .windows(16)
        .position(|w| w == needle)
        .expect("alice's balance is in the snapshot");
    tampered[at + 15] = 0xff;
    assert!(Ledger::restore(&tampered, None).is_err());
}

#[test]
fn a_follower_detects_a_block_that_lies_about_its_state_root() {
    let (mut chain, alice, bob) = Chain::with_players();
    let mut follower = Ledger::restore(&chain.ledger.snapshot(), None).unwrap();
    let tx = chain
        .world
        .transfer(A, &alice, &alice.public(), &bob.public(), "GOLD", 1);
    let (mut block, _) = chain.ledger.execute(5, vec![tx]);
    block.header.state_root = Hash::of(b"lie");
    assert!(follower.apply_block(&block).is_err());
}

#[test]
fn holdings_are_provable_against_the_state_root() {
    let (chain, alice, _bob) = Chain::with_players();
    let root = chain.ledger.state_root();
    let key = StateKey::Balance(A, CurrencyId::new("GOLD"), alice.public());
    let (value, proof) = chain.ledger.prove(&key);
    let value = value.expect("alice holds gold");
    assert_eq!(value, Amount(500).0.to_be_bytes());
    assert!(proof.verify(&root, &key.encode(), Some(&value)));
    assert!(!proof.verify(&root, &key.encode(), Some(&Amount(501).0.to_be_bytes())));
    let key = StateKey::Item(A, ItemId(1));
    let (value, proof) = chain.ledger.prove(&key);
    assert!(proof.verify(&root, &key.encode(), value.as_deref()));
    let absent = StateKey::Item(B, ItemId(1));
    let (value, proof) = chain.ledger.prove(&absent);
    assert!(value.is_none() && proof.verify(&root, &absent.encode(), None));
}

/// A balance that reaches zero leaves the state with its block, also when it is credited again
/// in the same block; the incremental root always equals the one recomputed from a snapshot.
#[test]
fn balances_emptied_inside_a_block_leave_the_state() {
    let (mut chain, alice, bob) = Chain::with_players();
    let studio = chain.world.studio(A).clone();
    let gold_id = CurrencyId::new("GOLD");
    let alice_gold = StateKey::Balance(A, gold_id.clone(), alice.public());
    let check_root = |chain: &Chain| {
        let restored = Ledger::restore(&chain.ledger.snapshot(), None).unwrap();
        assert_eq!(restored.state_root(), chain.ledger.state_root());
    };
    // Emptied, then credited again, in one block.
    let w = &mut chain.world;
    let emptied = w.transfer(A, &alice, &alice.public(), &bob.public(), "GOLD", 500);
    let refilled = w.transfer(A, &studio, &bob.public(), &alice.public(), "GOLD", 200);
    let too_much = w.transfer(A, &alice, &alice.public(), &bob.public(), "GOLD", 201);
    let receipts = chain.block(vec![emptied, refilled, too_much]);
    let outcomes: Vec<_> = receipts.into_iter().map(|r| r.outcome).collect();
    assert_eq!(
        outcomes,
        [
            Outcome::Applied,
            Outcome::Applied,
            rejected(Rejection::InsufficientFunds)
        ]
    );
    assert_eq!(chain.ledger.balance(A, &gold_id, &alice.public()), Amount(200));
    check_root(&chain);
    // Emptied for good: absent from the state, provably.
    let tx = chain
        .world
        .transfer(A, &alice, &alice.public(), &bob.public(), "GOLD", 200);
    assert_eq!(chain.one(tx), Outcome::Applied);
    assert!(chain.ledger.balances(A, &alice.public()).is_empty());
    let (value, proof) = chain.ledger.prove(&alice_gold);
    assert!(value.is_none());
    assert!(proof.verify(&chain.ledger.state_root(), &alice_gold.encode(), None));
    check_root(&chain);
    // Emptied and refilled by one block from an empty balance.
    let w = &mut chain.world;
    let refilled = w.transfer(A, &studio, &bob.public(), &alice.public(), "GOLD", 10);
    let emptied = w.transfer(A, &alice, &alice.public(), &bob.public(), "GOLD", 10);
    let receipts = chain.block(vec![refilled, emptied]);
    assert!(receipts.iter().all(|r| r.outcome == Outcome::Applied));
    assert!(chain.ledger.balances(A, &alice.public()).is_empty());
    check_root(&chain);
}

/// The deduplication window is committed to by one entry per tenant and expiry height, whose
/// value is the running digest of its events' records: provable, and gone once it expires.
#[test]
fn the_deduplication_window_is_committed_and_provable() {
    let mut chain = Chain::new();
    let alice = key("alice", 0);
    let bob = key("bob", 0);
    chain.world.expires_at = 3;
    let w = &mut chain.world;
    let setup = vec![
        w.define_currency(A, "GOLD", 1_000),
        w.register(A, &alice.public(), Custody::SelfCustody),
        w.register(A, &bob.public(), Custody::SelfCustody),
        w.mint_currency(A, &alice.public(), "GOLD", 100),
    ];
    let mut remembered = chain.block(setup);
    let transfer = chain
        .world
        .transfer(A, &alice, &alice.public(), &bob.public(), "GOLD", 500);
    let second = chain.block(vec![transfer.clone(), transfer]);
    assert_eq!(second[0].outcome, rejected(Rejection::InsufficientFunds));
    assert!(second[1].duplicate, "a duplicate is not remembered again");
    remembered.push(second[0].clone());

    let window = StateKey::Window(A, 3);
    let digest = hoard_ledger::state::window_digest(
        A,
        3,
        remembered.iter().map(|r| (&r.event_id, r.height, &r.outcome)),
    );
    let root = chain.ledger.state_root();
    let (value, proof) = chain.ledger.prove(&window);
    assert_eq!(value.as_deref(), Some(&digest.0[..]));
    assert!(proof.verify(&root, &window.encode(), Some(&digest.0)));
    let mut other = remembered.clone();
    other.swap(0, 1);
    let reordered =
        hoard_ledger::state::window_digest(A, 3, other.iter().map(|r| (&r.event_id, r.height, &r.outcome)));
    assert!(!proof.verify(&root, &window.encode(), Some(&reordered.0)));

    // Height 3 is the last the events may apply at; at height 4 the window leaves the state.
    chain.block(vec![]);
    assert!(chain.ledger.prove(&window).0.is_some());
    let entries = chain.ledger.state_entries();
    chain.block(vec![]);
    let (value, proof) = chain.ledger.prove(&window);
    assert!(value.is_none() && proof.verify(&chain.ledger.state_root(), &window.encode(), None));
    assert_eq!(chain.ledger.state_entries(), entries - 1);
    assert_eq!(chain.ledger.events_remembered(), 0);
}

/// A block large enough to be decoded on the second core while it applies: its transactions
/// still apply in block order (the first 500 one-gold transfers drain alice, the rest are refused
/// for want of funds), undecodable ones are refused as malformed where they stand, and a
/// follower agrees on every root.
#[test]
fn a_large_block_applies_in_order_around_undecodable_transactions() {
    let (mut chain, alice, bob) = Chain::with_players();
    let follower_start = chain.ledger.clone();
    let garbage = |i: usize| i % 50 == 7;
    let transactions: Vec<Transaction> = (0..800)
        .map(|i| {
            if garbage(i) {
                Transaction {
                    payload: vec![0xc1, i as u8],
                    signatures: vec![],
                }
            } else {
                chain
                    .world
                    .transfer(A, &alice, &alice.public(), &bob.public(), "GOLD", 1)
            }
        })
        .collect();
    let (block, receipts) = chain.ledger.execute(5_000, transactions);
    chain.ledger.check_invariants().expect("invariants hold");
    let mut valid = 0;
    for (i, receipt) in receipts.iter().enumerate() {
        if garbage(i) {
            assert_eq!(receipt.outcome, rejected(Rejection::Malformed), "transaction {i}");
        } else {
            valid += 1;
            let expected = if valid <= 500 {
                Outcome::Applied
            } else {
                rejected(Rejection::InsufficientFunds)
            };
            assert_eq!(receipt.outcome, expected, "transaction {i}");
        }
    }
    assert_eq!(valid, 784);
    let gold = CurrencyId::new("GOLD");
    assert_eq!(chain.ledger.balance(A, &gold, &alice.public()), Amount::ZERO);
    assert_eq!(chain.ledger.balance(A, &gold, &bob.public()), Amount(500));
    // The roots are those of the block's lists, whichever core hashed which leaf.
    assert_eq!(
        block.header.tx_root,
        list_root(block.transactions.iter().map(transaction_leaf))
    );
    assert_eq!(
        block.header.outcome_root,
        list_root(receipts.iter().map(receipt_leaf))
    );
    let mut follower = follower_start;
    assert_eq!(
        follower.apply_block(&block).expect("the follower agrees"),
        receipts
    );
    assert_eq!(follower.state_root(), chain.ledger.state_root());
}

/// A large block gives the same block, receipts and state on a pool of 1, 2 or 4 threads: with
/// one, the receipts' hasher runs on the apply's thread and must not wait for the apply; with
/// more, it follows the apply from another thread, or does not get to.
#[test]
fn a_large_block_is_the_same_on_any_number_of_threads() {
    let (mut chain, alice, bob) = Chain::with_players();
    let studio = chain.world.studio(A).clone();
    let transactions: Vec<Transaction> = (0..2_000)
        .map(|i| {
            // Bob is custodial: the studio signs for him.
            let (signer, from, to) = if i % 3 == 0 {
                (&studio, &bob, &alice)
            } else {
                (&alice, &alice, &bob)
            };
            chain
                .world
                .transfer(A, signer, &from.public(), &to.public(), "GOLD", 1 + i % 7)
        })
        .collect();
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("a pool");
        let mut ledger = chain.ledger.clone();
        let (block, receipts) = pool.install(|| ledger.execute(5_000, transactions.clone()));
        ledger.check_invariants().expect("invariants hold");
        assert_eq!(
            block.header.outcome_root,
            list_root(receipts.iter().map(receipt_leaf)),
            "{threads} threads"
        );
        (block, receipts, ledger.state_root())
    };
    let one = run(1);
    assert!(one.1.iter().any(|r| r.outcome == Outcome::Applied));
    assert!(one
        .1
        .iter()
        .any(|r| r.outcome == rejected(Rejection::InsufficientFunds)));
    for threads in [2, 4] {
        for _ in 0..3 {
            assert!(run(threads) == one, "{threads} threads");
        }
    }
}

/// A run of blocks for the pipelined tests, from `chain`'s state: large ones (decoded and hashed
/// on two cores) and small ones; transfers both ways (some refused for want of funds, bob's
/// balance reaching zero and leaving the state), arrows minted, undecodable transactions, a
/// resubmitted event, and events that expire two blocks on (their windows leave the state
/// mid-run).
fn varied_blocks(chain: &mut Chain, alice: &Keypair, bob: &Keypair) -> Vec<(u64, Vec<Transaction>)> {
    let studio = chain.world.studio(A).clone();
    let height = chain.ledger.height();
    let sizes = [600, 1, 0, 900, 3, 700, 40, 2];
    let mut blocks: Vec<(u64, Vec<Transaction>)> = Vec::new();
    for (n, size) in sizes.into_iter().enumerate() {
        let n = n as u64;
        chain.world.expires_at = if n.is_multiple_of(2) {
            height + n + 3
        } else {
            50_000
        };
        let mut transactions: Vec<Transaction> = (0..size as u64)
            .map(|i| match i % 5 {
                0 => chain.world.transfer(
                    A,
                    &studio,
                    &bob.public(),
                    &alice.public(),
                    "GOLD",
                    1 + u128::from(i % 3),
                ),
                1 | 2 => chain
                    .world
                    .transfer(A, alice, &alice.public(), &bob.public(), "GOLD", 1),
                3 => chain
                    .world
                    .mint_stack(A, &alice.public(), "arrow", 1_000 * (n + 1) + i, 1),
                _ => Transaction {
                    payload: vec![0xc1, i as u8],
                    signatures: vec![],
                },
            })
            .collect();
        if n == 3 {
            transactions.push(blocks[1].1[0].clone());
        }
        blocks.push((1_000 * (n + 1), transactions));
    }
    chain.world.expires_at = 50_000;
    blocks
}

/// Blocks executed pipelined (each block's commitment beside the next one's apply) are the
/// blocks executed one at a time: the same headers, receipts and final state, on a pool of 1, 2
/// or 4 threads; and a follower replaying them pipelined agrees with every root.
#[test]
fn pipelined_blocks_are_those_executed_one_at_a_time() {
    let (mut chain, alice, bob) = Chain::with_players();
    let blocks = varied_blocks(&mut chain, &alice, &bob);
    let start = chain.ledger.clone();
    let pool = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("a pool")
    };
    let mut ledger = start.clone();
    let serial: Vec<(Block, Vec<Receipt>)> = pool(2).install(|| {
        blocks
            .iter()
            .map(|(time, transactions)| ledger.execute(*time, transactions.clone()))
            .collect()
    });
    ledger.check_invariants().expect("invariants hold");
    let receipts: Vec<&Receipt> = serial.iter().flat_map(|(_, r)| r).collect();
    for outcome in [
        Outcome::Applied,
        rejected(Rejection::InsufficientFunds),
        rejected(Rejection::Malformed),
    ] {
        assert!(receipts.iter().any(|r| r.outcome == outcome), "{outcome:?}");
    }
    assert!(receipts.iter().any(|r| r.duplicate));
    for threads in [1, 2, 4] {
        for _ in 0..2 {
            let mut pipelined = start.clone();
            let mut out = Vec::new();
            pool(threads)
                .install(|| {
                    pipelined.execute_pipelined(blocks.clone(), |block, receipts| {
                        out.push((block, receipts));
                        Ok::<(), ()>(())
                    })
                })
                .expect("no refusal");
            pipelined.check_invariants().expect("invariants hold");
            assert!(out == serial, "{threads} threads");
            assert_eq!(pipelined.head(), ledger.head());
            assert_eq!(pipelined.snapshot(), ledger.snapshot(), "{threads} threads");
        }
    }
    let mut follower = start.clone();
    let mut replayed = Vec::new();
    follower
        .apply_blocks(
            serial.iter().map(|(block, _)| block.clone()),
            |block, receipts| {
                replayed.push((block, receipts));
                Ok(())
            },
        )
        .expect("the follower agrees");
    assert!(replayed == serial);
    assert_eq!(follower.snapshot(), ledger.snapshot());
}

/// When the consumer of pipelined blocks refuses one, the blocks after it are not executed,
/// except the one already applied beside its commitment: the ledger stands after that one,
/// whole, as a ledger that executed those blocks one at a time.
#[test]
fn a_refused_pipelined_block_leaves_the_ledger_whole() {
    let (mut chain, alice, bob) = Chain::with_players();
    let blocks = varied_blocks(&mut chain, &alice, &bob);
    let start = chain.ledger.clone();
    let mut serial = start.clone();
    for (time, transactions) in &blocks[..3] {
        serial.execute(*time, transactions.clone());
    }
    let mut ledger = start.clone();
    let mut seen = 0;
    let refused = ledger.execute_pipelined(blocks.clone(), |block, _| {
        seen += 1;
        if seen == 2 {
            Err(block.header.height)
        } else {
            Ok(())
        }
    });
    assert_eq!(refused, Err(start.height() + 2));
    assert_eq!(ledger.height(), start.height() + 3);
    ledger.check_invariants().expect("invariants hold");
    assert_eq!(ledger.head(), serial.head());
    assert_eq!(ledger.snapshot(), serial.snapshot());
    // And it goes on from there.
    let (time, transactions) = &blocks[3];
    assert!(ledger.execute(*time, transactions.clone()) == serial.execute(*time, transactions.clone()));
}

/// A pipelined replay stops at a block whose roots disagree (the ledger then stands after it or
/// the one after it, and must be thrown away) and at a block out of order, with the error that
/// names it; every block before it was handed over, checked.
#[test]
fn a_pipelined_replay_stops_at_a_diverging_or_missing_block() {
    let (mut chain, alice, bob) = Chain::with_players();
    let blocks = varied_blocks(&mut chain, &alice, &bob);
    let start = chain.ledger.clone();
    let mut leader = start.clone();
    let executed: Vec<Block> = blocks
        .into_iter()
        .map(|(time, transactions)| leader.execute(time, transactions).0)
        .collect();
    let replay = |blocks: Vec<Block>| {
        let mut follower = start.clone();
        let mut heights = Vec::new();
        let result = follower.apply_blocks(blocks, |block, _| {
            heights.push(block.header.height);
            Ok(())
        });
        (result, heights)
    };
    let first = start.height() + 1;
    let mut tampered = executed.clone();
    tampered[4].header.state_root = Hash([7; 32]);
    let (result, heights) = replay(tampered);
    match result {
        Err(hoard_ledger::LedgerError::Diverged { height, what, .. }) => {
            assert_eq!((height, what), (first + 4, "state_root"));
        }
        other => panic!("expected a divergence, got {other:?}"),
    }
    assert_eq!(heights, (first..first + 4).collect::<Vec<_>>());
    let mut gap = executed.clone();
    gap.remove(5);
    let (result, heights) = replay(gap);
    match result {
        Err(hoard_ledger::LedgerError::OutOfOrder { height, expected }) => {
            assert_eq!((height, expected), (first + 6, first + 5));
        }
        other => panic!("expected a block out of order, got {other:?}"),
    }
    assert_eq!(heights, (first..first + 5).collect::<Vec<_>>());
}
