//! Two players swap a sword for gold through an offer: the studio sets them up, Alice (holding
//! the sword) offers it to Bob for 5 GOLD, Bob sees the offer arrive and accepts it; the swap
//! applies whole or not at all. Both players hold their own keys (self-custody): the SDK signs
//! their sides.
//!
//! ```text
//! cargo run -p hoard-sdk --example trading -- --url ws://127.0.0.1:8080 --tenant 1 --studio-seed <64 hex>
//! ```

use std::time::Duration;

use anyhow::{bail, Context};
use futures::StreamExt;
use hoard_sdk::{
    keys, Amount, Asset, ClassId, Client, Credentials, CurrencyId, Custody, Grant, Hash, ItemId, Keypair,
    OfferUpdate, PublicKey, Rejection, TenantId,
};

/// What the trade did.
#[derive(Debug)]
pub struct TradeReport {
    pub alice: PublicKey,
    pub bob: PublicKey,
    pub sword: ItemId,
    pub sword_owner: Option<PublicKey>,
    pub alice_gold: u128,
    pub bob_gold: u128,
    pub height: u64,
}

pub const PRICE: u128 = 5;

fn exists_is_fine(result: hoard_sdk::Result<hoard_sdk::Committed>) -> anyhow::Result<()> {
    match result {
        Ok(_) => Ok(()),
        Err(error)
            if matches!(
                error.rejection(),
                Some(Rejection::CurrencyExists | Rejection::ClassExists)
            ) =>
        {
            Ok(())
        }
        Err(error) => Err(error.into()),
    }
}

pub async fn run(url: &str, tenant: TenantId, studio_key: Keypair) -> anyhow::Result<TradeReport> {
    let studio = Client::connect(url, Credentials::studio(tenant, studio_key.clone())).await?;
    let gold = CurrencyId::new("GOLD");
    let sword_class = ClassId::new("sword");
    let currency = studio
        .define_currency(gold.clone(), 0, Amount(u128::from(u64::MAX)))
        .await?;
    let class = studio
        .define_item_class(
            sword_class.clone(),
            false,
            Amount(1_000_000),
            Hash::of(b"a sword"),
        )
        .await?;
    exists_is_fine(currency.committed().await)?;
    exists_is_fine(class.committed().await)?;

    // Two self-custody players, a sword for Alice and gold for Bob.
    let (alice_key, bob_key) = (keys::generate(), keys::generate());
    let (alice, bob) = (alice_key.public(), bob_key.public());
    let registered = [
        studio.register_account(alice, Custody::SelfCustody).await?,
        studio.register_account(bob, Custody::SelfCustody).await?,
    ];
    for registration in registered {
        registration.committed().await?;
    }
    let sword = ItemId(rand::random::<u64>() >> 1);
    let granted = [
        studio
            .mint(
                alice,
                Grant::Unique {
                    class: sword_class,
                    item: sword,
                    attributes_hash: Hash::of(b"sharp"),
                },
            )
            .await?,
        studio
            .mint(
                bob,
                Grant::Currency {
                    currency: gold.clone(),
                    amount: Amount(PRICE),
                },
            )
            .await?,
    ];
    for grant in granted {
        grant.committed().await?;
    }

    // The players connect with session tokens the studio signed offline, and their own keys.
    let ttl = Duration::from_secs(600);
    let alice_client = Client::connect(
        url,
        Credentials::player_with_key(
            keys::issue_session_token(&studio_key, tenant, alice, ttl)?,
            alice_key,
        ),
    )
    .await?;
    let bob_client = Client::connect(
        url,
        Credentials::player_with_key(keys::issue_session_token(&studio_key, tenant, bob, ttl)?, bob_key),
    )
    .await?;
    let mut bob_updates = Box::pin(bob_client.offer_updates());

    // Alice offers the sword for 5 GOLD; Bob sees it arrive and accepts.
    let offer = alice_client
        .offer(
            bob,
            vec![Asset::Item { item: sword }],
            vec![Asset::Currency {
                currency: gold.clone(),
                amount: Amount(PRICE),
            }],
            Duration::from_secs(60),
        )
        .await?;
    println!("alice offered {sword} to bob (offer {})", offer.offer_id);
    let received = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(update) = bob_updates.next().await {
            if let OfferUpdate::Received(received) = update {
                if received.offer_id == offer.offer_id {
                    return Some(received);
                }
            }
        }
        None
    })
    .await;
    let received = match received {
        Ok(Some(received)) => received,
        // Not connected when it was made? The list has it.
        _ => bob_client
            .offers()
            .await?
            .into_iter()
            .find(|open| open.offer_id == offer.offer_id)
            .context("bob does not see the offer")?,
    };
    let swap = bob_client.accept(&received).await?.committed().await?;
    println!("the swap committed at height {}", swap.height);

    let item = studio.item(sword).await?;
    let report = TradeReport {
        alice,
        bob,
        sword,
        sword_owner: item.item.map(|item| item.owner),
        alice_gold: studio.balances(alice).await?.of(&gold).0,
        bob_gold: studio.balances(bob).await?.of(&gold).0,
        height: swap.height,
    };
    if report.sword_owner != Some(bob) {
        bail!("the sword did not reach bob: {report:?}");
    }
    Ok(report)
}

pub fn parse_args(args: &[String]) -> anyhow::Result<(String, TenantId, Keypair)> {
    let mut url = "ws://127.0.0.1:8080".to_owned();
    let mut tenant = TenantId(1);
    let mut key = std::env::var("HOARD_STUDIO_SEED")
        .ok()
        .map(|seed| Keypair::from_seed_hex(&seed));
    let mut iter = args.iter();
    while let Some(flag) = iter.next() {
        let mut value = || {
            iter.next()
                .cloned()
                .with_context(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--url" => url = value()?,
            "--tenant" => tenant = TenantId(value()?.parse()?),
            "--studio-seed" => key = Some(Keypair::from_seed_hex(&value()?)),
            "--studio-key" => key = Some(Ok(keys::load(value()?)?)),
            other => bail!("unknown argument {other}"),
        }
    }
    let key = key.context("give the studio key: --studio-seed <hex> or --studio-key <file>")??;
    Ok((url, tenant, key))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (url, tenant, key) = parse_args(&args)?;
    let report = run(&url, tenant, key).await?;
    println!(
        "bob owns sword {}; alice has {} GOLD, bob {} GOLD (height {})",
        report.sword, report.alice_gold, report.bob_gold, report.height
    );
    Ok(())
}
