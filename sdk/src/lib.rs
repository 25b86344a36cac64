//! # hoard-sdk: the Rust client for Hoard
//!
//! Embed it in a game server (as the studio) or a game client (as a player) to record clicks,
//! grant and move on-chain assets exactly once, trade between players and follow activity live,
//! without handling lost connections, retries or duplicates yourself.
//!
//! ## A game server in a few lines
//!
//! ```no_run
//! use hoard_sdk::{keys, Amount, Client, Credentials, CurrencyId, Custody, Grant, TenantId};
//!
//! # async fn run() -> hoard_sdk::Result<()> {
//! let studio_key = keys::load("studio.key")?;
//! let client = Client::connect("ws://127.0.0.1:8080", Credentials::studio(TenantId(1), studio_key.clone())).await?;
//!
//! // A new player: an account on the chain (custodial: the studio signs for it).
//! let player = keys::generate().public();
//! client.register_account(player, Custody::Custodial).await?.committed().await?;
//!
//! // Clicks: cheap, batched, non-blocking.
//! client.click(&player, "gold", 1)?;
//!
//! // Loot: exactly once, even across reconnects.
//! let grant = Grant::Currency { currency: CurrencyId::new("GOLD"), amount: Amount(10) };
//! let committed = client.mint(player, grant).await?.committed().await?;
//! println!("granted at height {}", committed.height);
//!
//! // A player's view, with a session token the studio signs offline.
//! let token = keys::issue_session_token(&studio_key, TenantId(1), player, std::time::Duration::from_secs(3600))?;
//! let player_client = Client::connect("ws://127.0.0.1:8080", Credentials::player(token)).await?;
//! println!("{:?}", player_client.balances(player).await?.balances);
//!
//! // Done: the buffered clicks are delivered first (an error counts those that could not be).
//! client.close().await?;
//! # Ok(()) }
//! ```
//!
//! ## Guarantees
//!
//! - **Exactly once.** Every asset event carries an `event_id` (random unless you give one with
//!   [`SubmitOptions::event_id`]); the ledger applies an id at most once. The client keeps each
//!   event's signed bytes until it is known committed and sends them again after a reconnect, so
//!   each `committed().await` resolves and each event takes effect once. One limit: the ledger
//!   forgets an event id once its expiry height passes, so an event sent but whose outcome the
//!   client could not learn before then (a long disconnect) resolves with
//!   [`Error::OutcomeUnknown`]: it may have applied. Check the chain state before doing it again
//!   under a new id. [`Error::Expired`] is reserved for events that certainly never applied.
//! - **Reconnects** use capped exponential backoff with jitter ([`ReconnectPolicy`]), then
//!   re-authenticate, re-subscribe and resend. [`Client::state`] shows the state.
//! - **Bounded memory.** At most `max_in_flight_events` events are outstanding: further submits
//!   wait for a permit. Clicks are bounded by `click_frames_buffered_max` frames. A `busy` gateway
//!   is retried after the delay it asks for.
//! - **Closing.** [`Client::close`] sends the clicks still buffered and waits until the gateway
//!   acknowledged every click the client held (reconnecting if need be, for at most
//!   [`ClientOptions::close_flush_timeout`], 5 s by default), then closes; it reports clicks that
//!   were not acknowledged with [`Error::ClicksUnacknowledged`]. Dropping the last handle instead
//!   cannot wait: the connection closes once no asset event is in flight, and the clicks still
//!   held then are lost, unreported. An asset event still in flight when the client closes fails
//!   with [`Error::Closed`] (or [`Error::AuthRefused`] when a reconnect's authentication was
//!   refused), which says nothing about it: if it reached a gateway it may have applied, or may
//!   still apply until its expiry height.
//! - **Subscriptions** resume from the last height delivered, without gaps or duplicates (a
//!   resume the gateway can no longer replay, older than its last 2048 events, ends the stream
//!   with an error instead).
//! - **Errors** are typed: [`Error::kind`] gives a `Copy` [`ErrorKind`], [`Error::is_retryable`]
//!   says whether trying again can help, and ledger rejections carry a [`Rejection`].
//!
//! ## Examples
//!
//! `examples/clicker.rs` (players click, earn GOLD by settlement, buy a sword in an atomic swap) and
//! `examples/trading.rs` (two self-custody players swap a sword for gold through an offer). Start a
//! local stack with `hoard dev`, which prints a studio seed, then:
//!
//! ```text
//! cargo run -p hoard-sdk --example clicker -- --url ws://127.0.0.1:8080 --studio-seed <seed>
//! cargo run -p hoard-sdk --example trading -- --url ws://127.0.0.1:8080 --studio-seed <seed>
//! ```
//!
//! ## Sizing
//!
//! An idle client costs no timers (the click flush timer and the housekeeping tick run only while
//! there is work) and about the size of its socket read buffer
//! ([`ClientOptions::read_buffer_bytes`], 32 KiB by default), so one process can hold many
//! player connections; a game server is better served by one studio connection carrying many
//! players' clicks and events.
//!
//! ## Layout
//! - [`client`]: [`Client`], the handle with every operation; [`SubmitOptions`].
//! - `connection`: the background task (socket, outstanding work, reconnects, retries).
//! - [`options`]: [`Credentials`], [`ClientOptions`], [`ReconnectPolicy`], [`ConnectionState`].
//! - [`event`]: [`EventHandle`] (`accepted()`, `committed()`).
//! - [`subscription`]: [`Subscription`], a `Stream` of [`Activity`].
//! - `clicks`: click packing into frames.
//! - [`keys`]: key files and session tokens.
//! - [`model`]: the typed answers.
//! - [`error`]: [`Error`], [`ErrorKind`].
//!
//! The SDK depends only on `hoard-types` (the wire protocol and transactions), never on the
//! ledger's or the gateway's internals.

#![warn(missing_docs)]

mod clicks;
pub mod client;
mod connection;
pub mod error;
pub mod event;
pub mod keys;
pub mod model;
pub mod options;
pub mod subscription;

pub use client::{Client, SubmitOptions};
pub use error::{Error, ErrorKind, Result};
pub use event::EventHandle;
pub use model::{
    Activity, Balances, Committed, CounterTotals, EventStatus, Head, Inventory, ItemInfo, OfferUpdate,
    Session, SettlementWindow,
};
pub use options::{ClickDelivery, ClientOptions, ConnectionState, Credentials, ReconnectPolicy};
pub use subscription::Subscription;

pub use hoard_types::wire::{ErrorCode, EventState, OfferCloseReason, OfferInfo, Role, SessionToken};
pub use hoard_types::{
    Amount, Asset, ClassId, CurrencyId, Custody, EventId, Grant, Hash, Item, ItemId, ItemKind, Keypair,
    Outcome, PublicKey, Rejection, Settlement, SwapSide, TenantId, Transaction, TxBody,
};
