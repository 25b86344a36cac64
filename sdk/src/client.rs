//! [`Client`]: the cheap, cloneable handle games use. Every method builds (and, for asset events,
//! signs) its message in the caller's task, then hands it to the connection task.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use hoard_types::tx::TX_SIGNING_DOMAIN;
use hoard_types::wire::{encode, ClientMessage, OfferInfo, ServerMessage, SessionToken, OFFER_TTL_MS_MAX};
use hoard_types::{
    Amount, Asset, ClassId, CurrencyId, Custody, EventId, Grant, Hash, ItemId, Keypair, PublicKey,
    Settlement, SwapSide, Transaction, TxBody, TxPayload,
};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::connection::{self, Command, Core, EventKind, Request, Submission, SubscribeCommand, Task};
use crate::error::{Error, Result};
use crate::event::EventHandle;
use crate::model::{
    Balances, CounterTotals, EventStatus, Head, Inventory, ItemInfo, OfferUpdate, Session, SettlementWindow,
};
use crate::options::{normalize_url, ClientOptions, ConnectionState, Credentials};
use crate::subscription::{Subscription, SubscriptionEnd};

/// A connection to a Hoard gateway, as a studio or as a player.
///
/// `Clone` is cheap (an `Arc`); every clone drives the same background connection task, which
/// reconnects by itself (see [`crate::ReconnectPolicy`]). The task stops on [`Client::close`]
/// (which first delivers the clicks held), or when the last clone is dropped and every event in
/// flight has resolved (clicks held then are lost: see [`Client::close`]).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    core: Arc<Core>,
    commands: mpsc::Sender<Command>,
    unsubscribes: mpsc::UnboundedSender<u64>,
    next_subscription: AtomicU64,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("url", &self.inner.core.url)
            .field("session", &self.inner.core.session.get())
            .finish()
    }
}

/// Options of one asset event: its id, who signs it, its expiry height.
#[derive(Clone, Debug, Default)]
pub struct SubmitOptions {
    event_id: Option<EventId>,
    signers: Vec<Keypair>,
    expires_at: Option<u64>,
}

impl SubmitOptions {
    /// Defaults: a random event id, signed by the client's own key, expiring the configured
    /// margin after the chain head.
    pub fn new() -> SubmitOptions {
        SubmitOptions::default()
    }

    /// Use this event id (for example one derived from your own order id, so that a retry after
    /// a crash of your game server cannot grant twice).
    pub fn event_id(mut self, event_id: EventId) -> SubmitOptions {
        self.event_id = Some(event_id);
        self
    }

    /// Sign with this key instead of the client's (call several times for several signers), for
    /// example a self-custody player's key on a studio connection.
    pub fn signer(mut self, key: Keypair) -> SubmitOptions {
        self.signers.push(key);
        self
    }

    /// Use this expiry height.
    pub fn expires_at(mut self, height: u64) -> SubmitOptions {
        self.expires_at = Some(height);
        self
    }
}

/// A known head older than this is read again before an event's expiry height is computed from it.
const HEAD_STALE_AFTER: Duration = Duration::from_secs(10);

fn unexpected(answer: ServerMessage) -> Error {
    Error::Protocol(format!("unexpected answer: {answer:?}"))
}

impl Client {
    /// Connects with default options. `url` is `ws://host:port` (the `/v1` path is added),
    /// `wss://...`, or `host:port`. Returns once authenticated; after that the client reconnects
    /// by itself.
    ///
    /// ```no_run
    /// # async fn run() -> hoard_sdk::Result<()> {
    /// use hoard_sdk::{keys, Client, Credentials, TenantId};
    /// let studio_key = keys::load("studio.key")?;
    /// let client = Client::connect("ws://127.0.0.1:8080", Credentials::studio(TenantId(1), studio_key)).await?;
    /// println!("chain head: {}", client.head().await?.height);
    /// # Ok(()) }
    /// ```
    pub async fn connect(url: &str, credentials: Credentials) -> Result<Client> {
        Client::connect_with(url, credentials, ClientOptions::default()).await
    }

    /// Connects with options (also reachable as [`ClientOptions::connect`]).
    pub async fn connect_with(url: &str, credentials: Credentials, options: ClientOptions) -> Result<Client> {
        let url = normalize_url(url)?;
        let core = Arc::new(Core::new(options, credentials, url));
        let opened = connection::open(&core).await?;
        let _ = core.session.set(opened.session.clone());
        // Recorded here, not only by the task: a submit right after `connect` (before the task
        // first runs, as on a current-thread runtime) must compute its expiry from this head.
        core.head_read(opened.head);
        core.state.send_replace(ConnectionState::Connected);
        let (commands, receiver) = mpsc::channel(connection::COMMAND_CHANNEL_CAPACITY);
        let (unsubscribes, unsubscribe_receiver) = mpsc::unbounded_channel();
        tokio::spawn(Task::new(core.clone(), receiver, unsubscribe_receiver).run(opened));
        Ok(Client {
            inner: Arc::new(Inner {
                core,
                commands,
                unsubscribes,
                next_subscription: AtomicU64::new(1),
            }),
        })
    }

    /// Who this client is (from the first authentication).
    pub fn session(&self) -> &Session {
        self.inner
            .core
            .session
            .get()
            .expect("set before the client exists")
    }

    /// The connection state, as a `watch` receiver (`changed().await` to follow it).
    pub fn state(&self) -> watch::Receiver<ConnectionState> {
        self.inner.core.state.subscribe()
    }

    /// The chain head height this client knows. It is read when the client connects and at each
    /// reconnect, by [`Client::head`], and every `head_refresh_interval` (default 1 s, see
    /// [`ClientOptions::head_refresh_interval`]) only while asset events are in flight; each
    /// `committed` or `rejected` push this client receives raises it. An idle client's value can
    /// therefore lag the chain: a submit or offer reads the head again first when it was last
    /// read more than 10 s ago.
    pub fn known_head(&self) -> u64 {
        self.inner.core.head.load(Ordering::Relaxed)
    }

    /// How many times the client reconnected since it was created.
    pub fn reconnect_count(&self) -> u64 {
        self.inner.core.reconnects.load(Ordering::Relaxed)
    }

    /// Asset event permits available now (the in-flight limit minus events in flight).
    pub fn available_event_permits(&self) -> usize {
        self.inner.core.permits.available_permits()
    }

    /// Closes the client, first delivering the clicks it holds.
    ///
    /// From the call on, `click` and new requests, submissions and subscriptions fail with
    /// [`Error::Closed`] (a `flush_clicks` still waits for its clicks), and every buffered click
    /// is sent at once. The connection then stays up, and reconnects if it breaks, until every
    /// click the client held when `close` was called (buffered, or sent and not yet acknowledged)
    /// has been acknowledged by the gateway or dropped (a frame the gateway refused, or one sent
    /// before a connection loss under
    /// [`ClickDelivery::AtMostOnce`](crate::ClickDelivery::AtMostOnce)), or until
    /// [`ClientOptions::close_flush_timeout`] (default 5 s) has passed. Answers arriving meanwhile
    /// resolve their operations as usual. Then the connection closes and the operations still
    /// outstanding fail with [`Error::Closed`]: an asset event still in flight may have applied,
    /// or may still apply until its expiry height (an accepted event still reaches the chain;
    /// follow it with `event_status` from another client).
    ///
    /// Returns `Ok(())` if every click held was acknowledged (or there was none), otherwise
    /// [`Error::ClicksUnacknowledged`] with the number of clicks that were not: those never sent
    /// were not counted, those sent may or may not have been. The client is closed either way.
    /// It returns about `close_flush_timeout` after the call at the latest, plus at most 1 s to
    /// hand the close frame over. Concurrent calls (from clones) wait for the same close and get
    /// the same answer; a call after the client closed gets it at once. For a client that closed
    /// by itself (credentials refused at a reconnect, reconnect attempts exhausted), the answer
    /// counts the clicks it still held when it did (under `AtMostOnce`, clicks sent before the
    /// connection broke were dropped then, and are not counted).
    ///
    /// Dropping the last handle (the last clone) instead cannot wait: the connection closes as
    /// soon as no asset event is in flight (at once if none is; clicks keep being sent and
    /// acknowledged until then), and the clicks still held then are lost without a report (those
    /// buffered are never sent; those sent and not acknowledged may or may not have been
    /// counted). Call `close` (or [`Client::flush_clicks`]) before dropping it to deliver them.
    pub async fn close(&self) -> Result<()> {
        let (reply, done) = oneshot::channel();
        if self.inner.commands.send(Command::Close(reply)).await.is_ok() {
            if let Ok(result) = done.await {
                return result;
            }
        }
        // The task had stopped already.
        self.inner.core.close_result()
    }

    async fn send(&self, command: Command) -> Result<()> {
        self.inner.commands.send(command).await.map_err(|_| Error::Closed)
    }

    async fn request(
        &self,
        replay: bool,
        offer_id: Option<EventId>,
        build: impl FnOnce(u64) -> ClientMessage,
    ) -> Result<ServerMessage> {
        let request_id = self.inner.core.next_request_id();
        let frame = Bytes::from(encode(&build(request_id)));
        let (reply, answer) = oneshot::channel();
        self.send(Command::Request(Box::new(Request {
            request_id,
            frame,
            replay,
            offer_id,
            reply,
        })))
        .await?;
        answer.await.map_err(|_| Error::Closed)?
    }

    // ----- clicks -----

    /// Records `count` clicks of `player` on `counter`. Cheap and non-blocking: the click is packed
    /// with others into one frame, sent when full or every flush interval. Fails only on invalid
    /// arguments, a full click buffer ([`Error::ClicksBackpressure`], retryable) or a closed client
    /// ([`Error::Closed`], also from the moment [`Client::close`] is called).
    /// A player connection may only click for itself.
    pub fn click(&self, player: &PublicKey, counter: &str, count: u32) -> Result<()> {
        let sealed = {
            let mut buffer = self.inner.core.clicks.lock().expect("click buffer lock");
            // Under the lock: a click is either counted by a close that begins or refused.
            if self.inner.core.closed.load(Ordering::Acquire) {
                return Err(Error::Closed);
            }
            buffer.push(player, counter, count)?
        };
        if sealed {
            self.inner.core.click_notify.notify_one();
        }
        Ok(())
    }

    /// Sends every buffered click now and waits until the gateway acknowledged them. Fails with
    /// [`Error::ConnectionLost`] (retryable) if the connection breaks first; with
    /// [`ClickDelivery::AtMostOnce`](crate::ClickDelivery) the unacknowledged clicks are then
    /// dropped, not resent. Fails with [`Error::Server`] if the gateway refused one of the frames
    /// it waits for: `forbidden` (a player clicking for another player) or `invalid` are final
    /// and that frame's clicks are dropped; `busy` or `rate_limited` are retryable and the clicks
    /// stay buffered and are sent again after the delay asked for (also the answer while clicks
    /// are paused by such a refusal). Fails with [`Error::Timeout`] without an answer within the
    /// request timeout.
    pub async fn flush_clicks(&self) -> Result<()> {
        let (reply, done) = oneshot::channel();
        self.send(Command::FlushClicks(reply)).await?;
        done.await.map_err(|_| Error::Closed)?
    }

    /// A counter's total, and one player's total if `player` is given.
    pub async fn counter(&self, counter: &str, player: Option<PublicKey>) -> Result<CounterTotals> {
        let counter = counter.to_owned();
        match self
            .request(true, None, |request_id| ClientMessage::Counter {
                request_id,
                counter,
                player,
            })
            .await?
        {
            ServerMessage::Counter {
                counter,
                total,
                player_total,
                ..
            } => Ok(CounterTotals {
                counter,
                total,
                player_total,
            }),
            other => Err(unexpected(other)),
        }
    }

    /// Every counter total of one player.
    pub async fn player_totals(&self, player: PublicKey) -> Result<Vec<(String, u64)>> {
        match self
            .request(true, None, |request_id| ClientMessage::PlayerTotals {
                request_id,
                player,
            })
            .await?
        {
            ServerMessage::PlayerTotals { totals, .. } => Ok(totals),
            other => Err(unexpected(other)),
        }
    }

    /// The top `limit` (1 to 100) players of a counter, highest first (studio only).
    pub async fn leaderboard(&self, counter: &str, limit: u32) -> Result<Vec<(PublicKey, u64)>> {
        let counter = counter.to_owned();
        match self
            .request(true, None, |request_id| ClientMessage::Leaderboard {
                request_id,
                counter,
                limit,
            })
            .await?
        {
            ServerMessage::Leaderboard { entries, .. } => Ok(entries),
            other => Err(unexpected(other)),
        }
    }

    /// Studio: have the gateway settle the tenant's click points now (its conversion rules turn
    /// points into on-chain grants).
    pub async fn settle_clicks(&self) -> Result<SettlementWindow> {
        match self
            .request(false, None, |request_id| ClientMessage::Settle { request_id })
            .await?
        {
            ServerMessage::Settlement {
                window,
                event_ids,
                entries,
                ..
            } => Ok(SettlementWindow {
                window,
                event_ids,
                entries,
            }),
            other => Err(unexpected(other)),
        }
    }

    /// Studio: have the gateway sign a session token (needs the gateway to hold the studio key;
    /// [`crate::keys::issue_session_token`] does it offline).
    pub async fn issue_token(&self, player: PublicKey, ttl: Duration) -> Result<SessionToken> {
        let ttl_ms = ttl.as_millis() as u64;
        match self
            .request(true, None, |request_id| ClientMessage::IssueToken {
                request_id,
                player,
                ttl_ms,
            })
            .await?
        {
            ServerMessage::Token { token, .. } => Ok(token),
            other => Err(unexpected(other)),
        }
    }

    // ----- reads -----

    /// The committed chain head (also refreshes [`Client::known_head`]).
    pub async fn head(&self) -> Result<Head> {
        match self
            .request(true, None, |request_id| ClientMessage::Head { request_id })
            .await?
        {
            ServerMessage::Head {
                chain_id,
                height,
                block_hash,
                state_root,
                timestamp_ms,
                ..
            } => {
                self.inner.core.head_read(height);
                Ok(Head {
                    chain_id,
                    height,
                    block_hash,
                    state_root,
                    timestamp_ms,
                })
            }
            other => Err(unexpected(other)),
        }
    }

    /// An account's balances.
    pub async fn balances(&self, account: PublicKey) -> Result<Balances> {
        match self
            .request(true, None, |request_id| ClientMessage::Balances {
                request_id,
                account,
            })
            .await?
        {
            ServerMessage::Balances {
                account,
                height,
                custody,
                balances,
                ..
            } => Ok(Balances {
                account,
                height,
                custody,
                balances,
            }),
            other => Err(unexpected(other)),
        }
    }

    /// An account's items.
    pub async fn inventory(&self, account: PublicKey) -> Result<Inventory> {
        match self
            .request(true, None, |request_id| ClientMessage::Inventory {
                request_id,
                account,
            })
            .await?
        {
            ServerMessage::Inventory {
                account,
                height,
                items,
                ..
            } => Ok(Inventory {
                account,
                height,
                items,
            }),
            other => Err(unexpected(other)),
        }
    }

    /// An item, its owner and its recent history.
    pub async fn item(&self, item: ItemId) -> Result<ItemInfo> {
        match self
            .request(true, None, |request_id| ClientMessage::Item { request_id, item })
            .await?
        {
            ServerMessage::Item {
                item_id,
                height,
                item,
                history,
                ..
            } => Ok(ItemInfo {
                item_id,
                height,
                item,
                history,
            }),
            other => Err(unexpected(other)),
        }
    }

    /// Where an event is: unknown, pending or committed (with its outcome).
    pub async fn event_status(&self, event_id: EventId) -> Result<EventStatus> {
        match self
            .request(true, None, |request_id| ClientMessage::EventStatus {
                request_id,
                event_id,
            })
            .await?
        {
            ServerMessage::EventStatus {
                event_id,
                state,
                height,
                outcome,
                ..
            } => Ok(EventStatus {
                event_id,
                state,
                height,
                outcome,
            }),
            other => Err(unexpected(other)),
        }
    }

    // ----- asset events -----

    /// Submits a transaction body, signed with the client's key (see [`Client::submit_with`]).
    pub async fn submit(&self, body: TxBody) -> Result<EventHandle> {
        self.submit_with(body, SubmitOptions::default()).await
    }

    /// Builds, signs and submits a transaction. Waits for an in-flight permit first
    /// (backpressure: at most `max_in_flight_events` events are outstanding). The returned handle
    /// resolves `accepted()` when the gateway stored the event durably and `committed()` when it
    /// committed; both survive reconnects, and the event takes effect exactly once.
    ///
    /// ```no_run
    /// # async fn run(client: hoard_sdk::Client, player: hoard_sdk::PublicKey) -> hoard_sdk::Result<()> {
    /// use hoard_sdk::{Amount, CurrencyId, Grant, TxBody};
    /// let grant = Grant::Currency { currency: CurrencyId::new("GOLD"), amount: Amount(10) };
    /// let mut event = client.submit(TxBody::Mint { to: player, grant }).await?;
    /// event.accepted().await?;
    /// let committed = event.committed().await?;
    /// println!("granted at height {}", committed.height);
    /// # Ok(()) }
    /// ```
    pub async fn submit_with(&self, body: TxBody, options: SubmitOptions) -> Result<EventHandle> {
        let permit = self
            .inner
            .core
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::Closed)?;
        if options.expires_at.is_none() && self.inner.core.head_age() > HEAD_STALE_AFTER {
            // Idle for a while: the known head may be far behind, and the expiry with it.
            self.head().await?;
        }
        let session = self.session();
        let event_id = options.event_id.unwrap_or_else(EventId::random);
        let expires_at = options
            .expires_at
            .unwrap_or_else(|| self.known_head() + self.inner.core.options.expiry_margin_blocks);
        let payload = TxPayload {
            chain_id: session.chain_id,
            tenant: session.tenant,
            event_id,
            expires_at,
            body,
        };
        let tx = if options.signers.is_empty() {
            let key = self
                .inner
                .core
                .credentials
                .signing_key()
                .ok_or(Error::MissingKey("this client holds no key to sign with"))?;
            payload.sign(&[key])
        } else {
            let keys: Vec<&Keypair> = options.signers.iter().collect();
            payload.sign(&keys)
        };
        if tx.payload.len() > hoard_types::constants::TX_PAYLOAD_BYTES_MAX {
            return Err(Error::InvalidArgument("the transaction payload is over 64 KiB"));
        }
        let request_id = self.inner.core.next_request_id();
        let frame = Bytes::from(encode(&ClientMessage::Submit { request_id, tx }));
        self.track(event_id, request_id, frame, EventKind::Submit, expires_at, permit)
            .await
    }

    async fn track(
        &self,
        event_id: EventId,
        request_id: u64,
        frame: Bytes,
        kind: EventKind,
        expires_at: u64,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<EventHandle> {
        let (accepted_sender, accepted) = oneshot::channel();
        let (committed_sender, committed) = oneshot::channel();
        self.send(Command::Submit(Box::new(Submission {
            event_id,
            request_id,
            frame,
            kind,
            expires_at,
            permit,
            accepted: accepted_sender,
            committed: committed_sender,
        })))
        .await?;
        Ok(EventHandle::new(event_id, accepted, committed))
    }

    /// Studio: define a currency.
    pub async fn define_currency(
        &self,
        currency: CurrencyId,
        decimals: u8,
        max_supply: Amount,
    ) -> Result<EventHandle> {
        if !currency.is_valid() {
            return Err(Error::InvalidArgument(
                "a currency id is 1 to 16 bytes of A-Z, 0-9, '_'",
            ));
        }
        self.submit(TxBody::DefineCurrency {
            currency,
            decimals,
            max_supply,
        })
        .await
    }

    /// Studio: define an item class.
    pub async fn define_item_class(
        &self,
        class: ClassId,
        stackable: bool,
        max_supply: Amount,
        metadata_hash: Hash,
    ) -> Result<EventHandle> {
        if !class.is_valid() {
            return Err(Error::InvalidArgument(
                "a class id is 1 to 32 bytes of a-z, 0-9, '_', '-'",
            ));
        }
        self.submit(TxBody::DefineItemClass {
            class,
            stackable,
            max_supply,
            metadata_hash,
        })
        .await
    }

    /// Studio: open an account for a player key.
    pub async fn register_account(&self, account: PublicKey, custody: Custody) -> Result<EventHandle> {
        self.submit(TxBody::RegisterAccount { account, custody }).await
    }

    /// Studio: mint currency or an item to an account.
    pub async fn mint(&self, to: PublicKey, grant: Grant) -> Result<EventHandle> {
        self.submit(TxBody::Mint { to, grant }).await
    }

    /// Move assets between accounts (signed by the client's key: the studio for custodial
    /// accounts, the player for its own self-custody account).
    pub async fn transfer(&self, from: PublicKey, to: PublicKey, assets: Vec<Asset>) -> Result<EventHandle> {
        self.submit(TxBody::Transfer { from, to, assets }).await
    }

    /// Destroy assets.
    pub async fn burn(&self, from: PublicKey, assets: Vec<Asset>) -> Result<EventHandle> {
        self.submit(TxBody::Burn { from, assets }).await
    }

    /// Take `quantity` off a stack into a new stack `new_item`.
    pub async fn split(
        &self,
        owner: PublicKey,
        item: ItemId,
        quantity: Amount,
        new_item: ItemId,
    ) -> Result<EventHandle> {
        self.submit(TxBody::Split {
            owner,
            item,
            quantity,
            new_item,
        })
        .await
    }

    /// Pour stack `from` into stack `into`.
    pub async fn merge(&self, owner: PublicKey, into: ItemId, from: ItemId) -> Result<EventHandle> {
        self.submit(TxBody::Merge { owner, into, from }).await
    }

    /// Studio: many grants in one signed transaction (at most 4096), each applied and reported on
    /// its own ([`crate::Committed::settlement_entries`]).
    pub async fn settle(&self, entries: Vec<Settlement>) -> Result<EventHandle> {
        if entries.is_empty() || entries.len() > hoard_types::constants::SETTLEMENT_ENTRIES_MAX {
            return Err(Error::InvalidArgument("a settlement holds 1 to 4096 entries"));
        }
        self.submit(TxBody::Settle { entries }).await
    }

    // ----- trades -----

    /// Player: offer `taker` a swap: this player gives `gives`, the taker gives `wants`. Signed
    /// with the player's key (unsigned if this client holds none: a custodial account, for which
    /// the gateway signs). Open for `ttl` (at most 24 h).
    ///
    /// Not replayed after a connection loss ([`Error::ConnectionLost`]): check [`Client::offers`].
    pub async fn offer(
        &self,
        taker: PublicKey,
        gives: Vec<Asset>,
        wants: Vec<Asset>,
        ttl: Duration,
    ) -> Result<OfferInfo> {
        let session = self.session();
        let maker = session
            .account
            .ok_or(Error::InvalidArgument("only a player connection makes offers"))?;
        let ttl_ms = ttl.as_millis() as u64;
        if ttl_ms == 0 || ttl_ms > OFFER_TTL_MS_MAX {
            return Err(Error::InvalidArgument("an offer lives 1 ms to 24 h"));
        }
        if self.inner.core.head_age() > HEAD_STALE_AFTER {
            self.head().await?;
        }
        let payload = TxPayload {
            chain_id: session.chain_id,
            tenant: session.tenant,
            event_id: EventId::random(),
            expires_at: self.known_head() + self.inner.core.options.expiry_margin_blocks,
            body: TxBody::Swap {
                left: SwapSide {
                    account: maker,
                    gives,
                },
                right: SwapSide {
                    account: taker,
                    gives: wants,
                },
            },
        };
        let tx = match self.inner.core.credentials.signing_key() {
            Some(key) => payload.sign(&[key]),
            None => Transaction {
                payload: payload.encode(),
                signatures: Vec::new(),
            },
        };
        match self
            .request(false, None, |request_id| ClientMessage::Offer {
                request_id,
                tx,
                ttl_ms,
            })
            .await?
        {
            ServerMessage::OfferOpened { offer, .. } => Ok(offer),
            other => Err(unexpected(other)),
        }
    }

    /// Player: accept an offer made to you. Signs the offer's swap with the player's key (none for
    /// a custodial account). The handle follows the swap (event id = offer id) to its commit,
    /// across reconnects.
    pub async fn accept(&self, offer: &OfferInfo) -> Result<EventHandle> {
        let payload = offer
            .tx
            .decode_payload()
            .map_err(|_| Error::Protocol("the offer's transaction does not decode".to_owned()))?;
        if payload.event_id != offer.offer_id {
            return Err(Error::Protocol(
                "the offer's id is not its swap's event id".to_owned(),
            ));
        }
        let permit = self
            .inner
            .core
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::Closed)?;
        let signature = self
            .inner
            .core
            .credentials
            .signing_key()
            .map(|key| key.sign(TX_SIGNING_DOMAIN, &offer.tx.payload));
        let request_id = self.inner.core.next_request_id();
        let frame = Bytes::from(encode(&ClientMessage::Accept {
            request_id,
            offer_id: offer.offer_id,
            signature,
        }));
        self.track(
            offer.offer_id,
            request_id,
            frame,
            EventKind::Accept,
            payload.expires_at,
            permit,
        )
        .await
    }

    /// Player: cancel your offer, or decline one made to you.
    pub async fn cancel(&self, offer_id: EventId) -> Result<()> {
        match self
            .request(true, Some(offer_id), |request_id| ClientMessage::Cancel {
                request_id,
                offer_id,
            })
            .await?
        {
            ServerMessage::OfferClosed { .. } => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// The open offers you make or receive (studio: the tenant's).
    pub async fn offers(&self) -> Result<Vec<OfferInfo>> {
        match self
            .request(true, None, |request_id| ClientMessage::Offers { request_id })
            .await?
        {
            ServerMessage::Offers { offers, .. } => Ok(offers),
            other => Err(unexpected(other)),
        }
    }

    /// Offers made to this player and offers closing, as they happen (a bounded broadcast: a
    /// consumer more than 256 updates behind skips the oldest).
    pub fn offer_updates(&self) -> impl Stream<Item = OfferUpdate> + Send + 'static {
        let receiver = self.inner.core.offer_updates().subscribe();
        futures::stream::unfold(receiver, |mut receiver| async move {
            loop {
                match receiver.recv().await {
                    Ok(update) => return Some((update, receiver)),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
    }

    // ----- subscriptions -----

    /// Subscribes to committed activity of `account` (`None`: the whole tenant, studio only),
    /// from the next block on. The stream survives reconnects without gaps or duplicates and
    /// unsubscribes when dropped.
    ///
    /// ```no_run
    /// # async fn run(client: hoard_sdk::Client, player: hoard_sdk::PublicKey) -> hoard_sdk::Result<()> {
    /// use futures::StreamExt;
    /// let mut activity = client.subscribe(Some(player)).await?;
    /// while let Some(event) = activity.next().await {
    ///     let event = event?;
    ///     println!("height {}: {:?}", event.height, event.body);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn subscribe(&self, account: Option<PublicKey>) -> Result<Subscription> {
        let from = self.head().await?.height + 1;
        self.subscribe_from(account, from).await
    }

    /// Subscribes starting at `from_height` (inclusive): committed activity the gateway still
    /// keeps is pushed first, then live activity.
    pub async fn subscribe_from(&self, account: Option<PublicKey>, from_height: u64) -> Result<Subscription> {
        let local_id = self.inner.next_subscription.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = mpsc::channel(self.inner.core.options.subscription_buffer);
        let end = Arc::new(SubscriptionEnd::default());
        let (reply, answer) = oneshot::channel();
        // Built before sending so that a failure below unsubscribes through Drop.
        let subscription = Subscription {
            local_id,
            receiver,
            end: end.clone(),
            unsubscribe: self.inner.unsubscribes.clone(),
            finished: false,
        };
        self.send(Command::Subscribe(Box::new(SubscribeCommand {
            local_id,
            account,
            from_height: Some(from_height),
            sender,
            end,
            reply,
        })))
        .await?;
        let timeout = self.inner.core.options.request_timeout;
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(Ok(()))) => Ok(subscription),
            Ok(Ok(Err(error))) => Err(error),
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => Err(Error::Timeout(timeout)),
        }
    }
}
