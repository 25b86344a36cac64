//! A small clicker game server on Hoard: players click, their `gold` clicks are settled into the
//! on-chain GOLD currency, and each player buys a sword from the shop with 2 GOLD (an atomic swap).
//!
//! ```text
//! cargo run -p hoard-sdk --example clicker -- --url ws://127.0.0.1:8080 --tenant 1 --studio-seed <64 hex>
//! ```
//! (`--studio-key <file>` reads the seed from a key file instead; `HOARD_STUDIO_SEED` works too.)
//! The gateway must have a conversion rule for the `gold` counter into `GOLD` (100 points per unit
//! in the demo configuration).

use std::time::Duration;

use anyhow::{bail, Context};
use hoard_sdk::{
    keys, Amount, Asset, ClassId, Client, Credentials, CurrencyId, Custody, Error, EventId, Grant, Hash,
    ItemId, Keypair, PublicKey, Rejection, SubmitOptions, SwapSide, TenantId, TxBody,
};

/// Points the demo rule converts into one GOLD.
pub const POINTS_PER_GOLD: u32 = 100;
/// What a sword costs.
pub const SWORD_PRICE: u128 = 2;

/// What a run did, for the caller (and the test) to check.
#[derive(Debug)]
pub struct ClickerReport {
    pub players: Vec<PublicKey>,
    /// GOLD left per player after buying.
    pub gold_left: Vec<u128>,
    /// The sword each player bought.
    pub swords: Vec<ItemId>,
    pub leaderboard: Vec<(PublicKey, u64)>,
}

/// Treats "already exists" as success, so the example can run twice against one chain.
fn exists_is_fine(result: hoard_sdk::Result<hoard_sdk::Committed>) -> anyhow::Result<()> {
    match result {
        Ok(_) => Ok(()),
        Err(error)
            if matches!(
                error.rejection(),
                Some(Rejection::CurrencyExists | Rejection::ClassExists | Rejection::AccountExists)
            ) =>
        {
            Ok(())
        }
        Err(error) => Err(error.into()),
    }
}

/// Waits until `account` holds at least `amount` of `currency`.
async fn wait_balance(
    client: &Client,
    account: PublicKey,
    currency: &CurrencyId,
    amount: u128,
    patience: Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        if client.balances(account).await?.of(currency).0 >= amount {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{account:?} did not reach {amount} {currency} in time");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The game server: `players` players each click `clicks_each` times, earn GOLD by settlement and
/// buy a sword.
pub async fn run(
    url: &str,
    tenant: TenantId,
    studio_key: Keypair,
    players: usize,
    clicks_each: u32,
) -> anyhow::Result<ClickerReport> {
    let client = Client::connect(url, Credentials::studio(tenant, studio_key)).await?;
    let gold = CurrencyId::new("GOLD");
    let sword = ClassId::new("sword");

    // The game's economy (idempotent across runs).
    let currency = client
        .define_currency(gold.clone(), 0, Amount(u128::from(u64::MAX)))
        .await?;
    let class = client
        .define_item_class(sword.clone(), false, Amount(1_000_000), Hash::of(b"a sword"))
        .await?;
    exists_is_fine(currency.committed().await)?;
    exists_is_fine(class.committed().await)?;

    // A shop and the players: custodial accounts, the studio signs for them.
    let shop = keys::generate().public();
    let player_keys: Vec<PublicKey> = (0..players).map(|_| keys::generate().public()).collect();
    let mut registrations = vec![client.register_account(shop, Custody::Custodial).await?];
    for player in &player_keys {
        registrations.push(client.register_account(*player, Custody::Custodial).await?);
    }
    for registration in registrations {
        registration.committed().await?;
    }

    // Players click: each call is cheap; the SDK packs clicks into frames.
    for _ in 0..clicks_each {
        for player in &player_keys {
            loop {
                match client.click(player, "gold", 1) {
                    Ok(()) => break,
                    Err(Error::ClicksBackpressure) => tokio::time::sleep(Duration::from_millis(5)).await,
                    Err(error) => return Err(error.into()),
                }
            }
        }
    }
    client.flush_clicks().await?;

    // Settlement turns click points into GOLD on the chain, exactly once per window. An ack means
    // the gateway absorbed the clicks; they reach Redis within its flush interval, so settle until
    // every player's GOLD shows up (a window that finds nothing new settles nothing).
    for player in &player_keys {
        let counted = tokio::time::Instant::now() + Duration::from_secs(10);
        while client.counter("gold", Some(*player)).await?.player_total < Some(u64::from(clicks_each)) {
            if tokio::time::Instant::now() > counted {
                bail!("the clicks of {player:?} were not counted in time");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let earned = u128::from(clicks_each / POINTS_PER_GOLD);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let window = client.settle_clicks().await.context("settling clicks")?;
        println!(
            "settlement window {}: {} entries in {} events",
            window.window,
            window.entries,
            window.event_ids.len()
        );
        let mut done = true;
        for player in &player_keys {
            done &= wait_balance(&client, *player, &gold, earned, Duration::from_secs(2))
                .await
                .is_ok();
        }
        if done {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the players did not earn their GOLD in time");
        }
    }

    // The shop stocks one sword per player, then each purchase is one atomic swap (both accounts
    // are custodial, so the studio's signature covers both sides). The order's event id is derived
    // from the order, so a retried purchase can never charge twice.
    let mut swords = Vec::new();
    let mut stock = Vec::new();
    for _ in &player_keys {
        let item = ItemId(rand::random::<u64>() >> 1);
        swords.push(item);
        stock.push(
            client
                .mint(
                    shop,
                    Grant::Unique {
                        class: sword.clone(),
                        item,
                        attributes_hash: Hash::of(&item.0.to_be_bytes()),
                    },
                )
                .await?,
        );
    }
    for minted in stock {
        minted.committed().await?;
    }
    let mut purchases = Vec::new();
    for (player, item) in player_keys.iter().zip(&swords) {
        let order = EventId::derive(&[b"clicker/order/v1", player.as_bytes(), &item.0.to_be_bytes()]);
        let body = TxBody::Swap {
            left: SwapSide {
                account: *player,
                gives: vec![Asset::Currency {
                    currency: gold.clone(),
                    amount: Amount(SWORD_PRICE),
                }],
            },
            right: SwapSide {
                account: shop,
                gives: vec![Asset::Item { item: *item }],
            },
        };
        purchases.push(
            client
                .submit_with(body, SubmitOptions::new().event_id(order))
                .await?,
        );
    }
    for purchase in purchases {
        let committed = purchase.committed().await?;
        println!("sword bought at height {}", committed.height);
    }

    let mut gold_left = Vec::new();
    for player in &player_keys {
        gold_left.push(client.balances(*player).await?.of(&gold).0);
    }
    let leaderboard = client.leaderboard("gold", 10).await?;
    client.close().await?;
    Ok(ClickerReport {
        players: player_keys,
        gold_left,
        swords,
        leaderboard,
    })
}

/// `--url`, `--tenant`, `--studio-seed` / `--studio-key` / `HOARD_STUDIO_SEED`.
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
    let report = run(&url, tenant, key, 5, 250).await?;
    for ((player, gold), sword) in report.players.iter().zip(&report.gold_left).zip(&report.swords) {
        println!("player {player}: sword {sword}, {gold} GOLD left");
    }
    println!("leaderboard: {:?}", report.leaderboard);
    Ok(())
}
