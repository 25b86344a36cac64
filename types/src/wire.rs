//! The gateway wire protocol, version 1 (`/v1`): every message a game client, a game server or a
//! studio backend exchanges with the gateway. One place, shared by the gateway (hoard-server) and
//! the SDK (hoard-sdk); `docs/PROTOCOL.md` describes the same thing byte by byte for other languages.
//!
//! Framing: a WebSocket connection to `ws://host:port/v1`; every message is one binary frame
//! holding one MessagePack value. Messages are externally tagged enums: a map with one key, the
//! snake_case message name, whose value is a map of the fields (`{"ping": {"request_id": 7}}`).
//! The gateway always sends structs as maps with field names ([`encode`]); it also accepts structs
//! as arrays in field order. Requests carry a `request_id: u64` that the answer echoes; pushes
//! (`committed`, `rejected`, `activity`, `offer_received`, `offer_closed`, `clicks_ack`) carry none.
//!
//! Authentication is the first request: a studio answers the `hello` challenge with its studio
//! key ([`auth_signed_bytes`]); a player presents a [`SessionToken`] its studio signed.

use serde::{Deserialize, Serialize};

use crate::asset::{Amount, CurrencyId, Custody, EventId, Item, ItemId, TenantId};
use crate::crypto::{Hash, Keypair, PublicKey, Signature};
use crate::outcome::{Outcome, Rejection};
use crate::tx::{Transaction, TxBody};

/// The protocol version this module describes; `hello` carries it.
pub const PROTOCOL_VERSION: u32 = 1;
/// The WebSocket path of this version.
pub const WS_PATH: &str = "/v1";
/// Largest WebSocket message (and frame) the gateway accepts; larger closes with 1009.
pub const FRAME_BYTES_MAX: usize = 256 * 1024;
/// Most entries in one `clicks` message.
pub const CLICKS_PER_FRAME_MAX: usize = 2048;
/// Largest `count` of one click entry.
pub const CLICK_COUNT_MAX: u32 = 1_000_000;
/// Longest counter name: 1 to 32 bytes of `a-z`, `0-9`, `_`, `-`.
pub const COUNTER_NAME_BYTES_MAX: usize = 32;
/// Most asset events one connection may have accepted but not yet committed or rejected.
pub const EVENTS_IN_FLIGHT_PER_CONNECTION_MAX: usize = 1024;
/// Most live subscriptions on one connection.
pub const SUBSCRIPTIONS_PER_CONNECTION_MAX: usize = 16;
/// Most open offers one player may have made (as maker) at a time.
pub const OPEN_OFFERS_PER_PLAYER_MAX: usize = 16;
/// Longest lifetime of an offer.
pub const OFFER_TTL_MS_MAX: u64 = 24 * 3600 * 1000;
/// Most entries in a `leaderboard` answer.
pub const LEADERBOARD_ENTRIES_MAX: usize = 100;
/// Most entries of an item's recent history the gateway keeps and returns.
pub const ITEM_HISTORY_ENTRIES_MAX: usize = 32;
/// Longest lifetime of a session token (from now to its expiry).
pub const SESSION_TOKEN_TTL_MS_MAX: u64 = 7 * 24 * 3600 * 1000;
/// How long a connection may stay unauthenticated before it is closed with 1008.
pub const AUTH_TIMEOUT_MS: u64 = 10_000;
/// Protocol errors (malformed, unknown, invalid) a connection may make before it is closed with 1008.
pub const PROTOCOL_ERRORS_PER_CONNECTION_MAX: u32 = 64;
/// Bytes of the `hello` challenge.
pub const CHALLENGE_BYTES: usize = 32;

/// Domain of the studio's authentication signature.
pub const AUTH_DOMAIN: &[u8] = b"hoard/auth/v1\0";
/// Domain of a session token's signature.
pub const SESSION_DOMAIN: &[u8] = b"hoard/session/v1\0";

/// Largest encoding of one click entry: array header 1 + public key 34 + counter 1+32 + count 5.
pub const CLICK_BYTES_MAX: usize = 1 + 34 + 1 + COUNTER_NAME_BYTES_MAX + 5;
const _: () = assert!(CLICKS_PER_FRAME_MAX * CLICK_BYTES_MAX + 64 <= FRAME_BYTES_MAX);
const _: () = assert!(crate::constants::TX_PAYLOAD_BYTES_MAX * 2 <= FRAME_BYTES_MAX);

/// WebSocket close codes the gateway uses.
pub mod close_code {
    /// Normal closure (the client asked).
    pub const NORMAL: u16 = 1000;
    /// The gateway is shutting down; reconnect (to another gateway).
    pub const GOING_AWAY: u16 = 1001;
    /// The peer broke the WebSocket protocol.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text frame: the protocol is binary only.
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// Authentication failed or timed out, or too many protocol errors. Do not retry blindly.
    pub const POLICY_VIOLATION: u16 = 1008;
    /// A message larger than [`super::FRAME_BYTES_MAX`].
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// The gateway failed internally.
    pub const INTERNAL_ERROR: u16 = 1011;
    /// Connection limit reached, or the client reads its pushes too slowly. Retry later.
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// One click entry: `[player, counter, count]` (a MessagePack array, also when structs are maps).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Click(pub PublicKey, pub CounterName, pub u32);

/// A click's counter name as it arrived (a MessagePack str). Names of up to
/// [`COUNTER_NAME_BYTES_MAX`] bytes (every valid one) are held inline, so decoding a `clicks`
/// frame of 2048 entries allocates nothing per entry; a longer name is kept on the heap so that
/// the gateway can still refuse it as an invalid name (rather than as an undecodable frame).
/// Whether a name is valid is [`counter_name_is_valid`]'s business, not this type's.
#[derive(Clone)]
pub struct CounterName(NameRepr);

#[derive(Clone)]
enum NameRepr {
    Inline {
        len: u8,
        bytes: [u8; COUNTER_NAME_BYTES_MAX],
    },
    Heap(Box<str>),
}

impl CounterName {
    pub fn new(name: &str) -> CounterName {
        if name.len() <= COUNTER_NAME_BYTES_MAX {
            let mut bytes = [0u8; COUNTER_NAME_BYTES_MAX];
            bytes[..name.len()].copy_from_slice(name.as_bytes());
            CounterName(NameRepr::Inline {
                len: name.len() as u8,
                bytes,
            })
        } else {
            CounterName(NameRepr::Heap(name.into()))
        }
    }

    /// The name's bytes (no UTF-8 check).
    #[inline]
    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            NameRepr::Inline { len, bytes } => &bytes[..*len as usize],
            NameRepr::Heap(name) => name.as_bytes(),
        }
    }

    #[inline]
    pub fn as_str(&self) -> &str {
        match &self.0 {
            // Copied from a `&str` whole, so valid UTF-8 (ASCII for any valid name).
            NameRepr::Inline { len, bytes } => {
                std::str::from_utf8(&bytes[..*len as usize]).expect("copied from a str")
            }
            NameRepr::Heap(name) => name,
        }
    }
}

impl std::ops::Deref for CounterName {
    type Target = str;

    #[inline]
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl From<&str> for CounterName {
    fn from(name: &str) -> CounterName {
        CounterName::new(name)
    }
}

impl From<String> for CounterName {
    fn from(name: String) -> CounterName {
        CounterName::new(&name)
    }
}

impl PartialEq for CounterName {
    /// Compares bytes (two inline names: one fixed-size array comparison, no UTF-8 check): the
    /// gateway compares each click's name with the one before.
    #[inline]
    fn eq(&self, other: &CounterName) -> bool {
        match (&self.0, &other.0) {
            (NameRepr::Inline { len: a, bytes: x }, NameRepr::Inline { len: b, bytes: y }) => {
                a == b && x == y
            }
            _ => self.as_bytes() == other.as_bytes(),
        }
    }
}

impl Eq for CounterName {}

impl PartialEq<str> for CounterName {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for CounterName {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl std::hash::Hash for CounterName {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // As `str` hashes, so that a map keyed by names may be looked up either way.
        state.write(self.as_bytes());
        state.write_u8(0xff);
    }
}

impl std::fmt::Debug for CounterName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for CounterName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for CounterName {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for CounterName {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<CounterName, D::Error> {
        struct Visitor;

        impl serde::de::Visitor<'_> for Visitor {
            type Value = CounterName;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a counter name")
            }

            fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<CounterName, E> {
                Ok(CounterName::new(name))
            }

            // Like `String`: UTF-8 bytes (a MessagePack bin) are taken as the name.
            fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<CounterName, E> {
                std::str::from_utf8(bytes)
                    .map(CounterName::new)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Bytes(bytes), &self))
            }
        }

        deserializer.deserialize_str(Visitor)
    }
}

/// Is `name` a valid counter name?
pub fn counter_name_is_valid(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= COUNTER_NAME_BYTES_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// What a connection is, once authenticated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The studio's backend: acts for any player of its tenant.
    Studio,
    /// One player: clicks, reads its own holdings, trades its own assets.
    Player,
}

/// A player's session token, signed by the studio key (offline, by the SDK, or by the gateway on
/// `issue_token`). Signature over `SESSION_DOMAIN || tenant (u64 BE) || player (32) || expires (u64 BE)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionToken {
    pub tenant: TenantId,
    pub player: PublicKey,
    /// Unix time in milliseconds after which the token is refused.
    pub expires_unix_ms: u64,
    pub signature: Signature,
}

/// Why a session token is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the session token has expired")]
    Expired,
    #[error("the session token's lifetime is longer than allowed")]
    TooLong,
    #[error("the session token's signature does not verify")]
    BadSignature,
}

impl SessionToken {
    /// The 48 bytes the studio signs (after [`SESSION_DOMAIN`]).
    pub fn signed_bytes(tenant: TenantId, player: &PublicKey, expires_unix_ms: u64) -> [u8; 48] {
        let mut bytes = [0u8; 48];
        bytes[..8].copy_from_slice(&tenant.0.to_be_bytes());
        bytes[8..40].copy_from_slice(player.as_bytes());
        bytes[40..].copy_from_slice(&expires_unix_ms.to_be_bytes());
        bytes
    }

    /// Signs a token with the studio key.
    pub fn issue(
        studio: &Keypair,
        tenant: TenantId,
        player: PublicKey,
        expires_unix_ms: u64,
    ) -> SessionToken {
        let signature = studio.sign(
            SESSION_DOMAIN,
            &Self::signed_bytes(tenant, &player, expires_unix_ms),
        );
        SessionToken {
            tenant,
            player,
            expires_unix_ms,
            signature,
        }
    }

    /// Checks the token against the tenant's studio key at time `now_unix_ms`.
    pub fn verify(&self, studio_key: &PublicKey, now_unix_ms: u64) -> Result<(), TokenError> {
        if now_unix_ms >= self.expires_unix_ms {
            return Err(TokenError::Expired);
        }
        if self.expires_unix_ms - now_unix_ms > SESSION_TOKEN_TTL_MS_MAX {
            return Err(TokenError::TooLong);
        }
        let bytes = Self::signed_bytes(self.tenant, &self.player, self.expires_unix_ms);
        studio_key
            .verify(SESSION_DOMAIN, &bytes, &self.signature)
            .map_err(|_| TokenError::BadSignature)
    }
}

/// The 40 bytes a studio signs (after [`AUTH_DOMAIN`]) to authenticate: `challenge || tenant (u64 BE)`.
pub fn auth_signed_bytes(challenge: &[u8; CHALLENGE_BYTES], tenant: TenantId) -> [u8; 40] {
    let mut bytes = [0u8; 40];
    bytes[..32].copy_from_slice(challenge);
    bytes[32..].copy_from_slice(&tenant.0.to_be_bytes());
    bytes
}

/// The studio's answer to a `hello` challenge.
pub fn sign_auth(studio: &Keypair, challenge: &[u8; CHALLENGE_BYTES], tenant: TenantId) -> Signature {
    studio.sign(AUTH_DOMAIN, &auth_signed_bytes(challenge, tenant))
}

/// The 32-byte challenge, as a MessagePack bin.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge(#[serde(with = "crate::crypto::serde_bytes_array32")] pub [u8; CHALLENGE_BYTES]);

/// Limits the gateway enforces, announced in `hello`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub frame_bytes_max: u32,
    pub clicks_per_frame_max: u32,
    pub events_in_flight_max: u32,
    pub subscriptions_max: u32,
    pub open_offers_max: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            frame_bytes_max: FRAME_BYTES_MAX as u32,
            clicks_per_frame_max: CLICKS_PER_FRAME_MAX as u32,
            events_in_flight_max: EVENTS_IN_FLIGHT_PER_CONNECTION_MAX as u32,
            subscriptions_max: SUBSCRIPTIONS_PER_CONNECTION_MAX as u32,
            open_offers_max: OPEN_OFFERS_PER_PLAYER_MAX as u32,
        }
    }
}

/// A message from a client to the gateway.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientMessage {
    /// Authenticate as the studio of `tenant`: `signature` = [`sign_auth`] over the `hello` challenge.
    AuthStudio {
        request_id: u64,
        tenant: TenantId,
        signature: Signature,
    },
    /// Authenticate as a player with a studio-signed token.
    AuthPlayer { request_id: u64, token: SessionToken },
    /// Liveness check; answered with `pong`.
    Ping { request_id: u64 },
    /// Clicks. `request_id` doubles as the click sequence number: strictly increasing over the
    /// `clicks` messages of a connection; `clicks_ack { up_to }` acknowledges every `clicks` with
    /// `request_id <= up_to` cumulatively. A player may only click for itself.
    Clicks { request_id: u64, clicks: Vec<Click> },
    /// Submit a signed transaction (an asset event). Answered with `accepted` once it is durable,
    /// then pushed `committed` or `rejected`.
    Submit { request_id: u64, tx: Transaction },
    /// Studio: have the gateway sign a session token for `player`, valid `ttl_ms` from now.
    IssueToken {
        request_id: u64,
        player: PublicKey,
        ttl_ms: u64,
    },
    /// Studio: settle the accumulated click points of the tenant now (conversion rules in the
    /// gateway's config). Answered with `settlement`.
    Settle { request_id: u64 },
    /// Offer a trade: `tx` is a `swap` whose `left` side is the maker (the offerer) and whose
    /// `right` side is the taker, signed by the maker (no signature when the maker's account is
    /// custodial: the gateway signs with the studio key). Open for `ttl_ms`.
    Offer {
        request_id: u64,
        tx: Transaction,
        ttl_ms: u64,
    },
    /// Accept an offer made to you: `signature` is the taker's signature over the offer's
    /// payload (`None` for a custodial taker: the gateway signs with the studio key).
    Accept {
        request_id: u64,
        offer_id: EventId,
        signature: Option<Signature>,
    },
    /// Cancel (maker) or decline (taker) an open offer.
    Cancel { request_id: u64, offer_id: EventId },
    /// List the open offers you make or receive (studio: all of the tenant's, bounded).
    Offers { request_id: u64 },
    /// The committed chain head.
    Head { request_id: u64 },
    /// An account's currency balances (players: only their own).
    Balances { request_id: u64, account: PublicKey },
    /// An account's items (players: only their own).
    Inventory { request_id: u64, account: PublicKey },
    /// An item, its owner and its recent history.
    Item { request_id: u64, item: ItemId },
    /// Where an event is: unknown, pending (accepted, not committed) or committed.
    EventStatus { request_id: u64, event_id: EventId },
    /// A counter's total over all players, and one player's total if `player` is given
    /// (players: only their own).
    Counter {
        request_id: u64,
        counter: String,
        player: Option<PublicKey>,
    },
    /// Every counter total of one player (players: only their own).
    PlayerTotals { request_id: u64, player: PublicKey },
    /// The top `limit` players of a counter (studio only; `limit` <= [`LEADERBOARD_ENTRIES_MAX`]).
    Leaderboard {
        request_id: u64,
        counter: String,
        limit: u32,
    },
    /// Subscribe to committed activity of one account (players: only their own) or, with
    /// `account: None`, of the whole tenant (studio only).
    ///
    /// `from_height` (optional, may be absent): first push, in commit order, every committed
    /// activity of the subscription at heights `>= from_height` (the SDK uses it to resume after a
    /// reconnect without gaps; it removes duplicates of the last height it saw itself), then live
    /// activity. None: live activity only, from now on. A `from_height` older than the history the
    /// gateway keeps is answered with `error {code: "not_found"}`.
    Subscribe {
        request_id: u64,
        account: Option<PublicKey>,
        #[serde(default)]
        from_height: Option<u64>,
    },
    /// Cancel a subscription.
    Unsubscribe { request_id: u64, subscription_id: u64 },
}

/// The names of every [`ClientMessage`] variant, as they appear on the wire.
pub const CLIENT_MESSAGE_NAMES: &[&str] = &[
    "auth_studio",
    "auth_player",
    "ping",
    "clicks",
    "submit",
    "issue_token",
    "settle",
    "offer",
    "accept",
    "cancel",
    "offers",
    "head",
    "balances",
    "inventory",
    "item",
    "event_status",
    "counter",
    "player_totals",
    "leaderboard",
    "subscribe",
    "unsubscribe",
];

impl ClientMessage {
    /// The request's id (for `clicks`, its sequence number).
    pub fn request_id(&self) -> u64 {
        match self {
            ClientMessage::AuthStudio { request_id, .. }
            | ClientMessage::AuthPlayer { request_id, .. }
            | ClientMessage::Ping { request_id }
            | ClientMessage::Clicks { request_id, .. }
            | ClientMessage::Submit { request_id, .. }
            | ClientMessage::IssueToken { request_id, .. }
            | ClientMessage::Settle { request_id }
            | ClientMessage::Offer { request_id, .. }
            | ClientMessage::Accept { request_id, .. }
            | ClientMessage::Cancel { request_id, .. }
            | ClientMessage::Offers { request_id }
            | ClientMessage::Head { request_id }
            | ClientMessage::Balances { request_id, .. }
            | ClientMessage::Inventory { request_id, .. }
            | ClientMessage::Item { request_id, .. }
            | ClientMessage::EventStatus { request_id, .. }
            | ClientMessage::Counter { request_id, .. }
            | ClientMessage::PlayerTotals { request_id, .. }
            | ClientMessage::Leaderboard { request_id, .. }
            | ClientMessage::Subscribe { request_id, .. }
            | ClientMessage::Unsubscribe { request_id, .. } => *request_id,
        }
    }

    /// The message's wire name.
    pub fn name(&self) -> &'static str {
        match self {
            ClientMessage::AuthStudio { .. } => "auth_studio",
            ClientMessage::AuthPlayer { .. } => "auth_player",
            ClientMessage::Ping { .. } => "ping",
            ClientMessage::Clicks { .. } => "clicks",
            ClientMessage::Submit { .. } => "submit",
            ClientMessage::IssueToken { .. } => "issue_token",
            ClientMessage::Settle { .. } => "settle",
            ClientMessage::Offer { .. } => "offer",
            ClientMessage::Accept { .. } => "accept",
            ClientMessage::Cancel { .. } => "cancel",
            ClientMessage::Offers { .. } => "offers",
            ClientMessage::Head { .. } => "head",
            ClientMessage::Balances { .. } => "balances",
            ClientMessage::Inventory { .. } => "inventory",
            ClientMessage::Item { .. } => "item",
            ClientMessage::EventStatus { .. } => "event_status",
            ClientMessage::Counter { .. } => "counter",
            ClientMessage::PlayerTotals { .. } => "player_totals",
            ClientMessage::Leaderboard { .. } => "leaderboard",
            ClientMessage::Subscribe { .. } => "subscribe",
            ClientMessage::Unsubscribe { .. } => "unsubscribe",
        }
    }
}

/// A typed error code. On the wire: the snake_case name as a string.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame is not valid MessagePack, or a field is missing or of the wrong type.
    Malformed,
    /// A well-formed message whose name the gateway does not know.
    UnknownMessage,
    /// The frame or a part of it (clicks, transaction payload) is over its limit.
    TooLarge,
    /// A field has a value the protocol does not allow (bad counter name, zero count, ttl too long,
    /// wrong chain id, clicks sequence number not increasing).
    Invalid,
    /// The request needs authentication first.
    Unauthenticated,
    /// The connection is already authenticated.
    AlreadyAuthenticated,
    /// The connection's role may not do this (a player acting for another player, a player
    /// defining a currency).
    Forbidden,
    /// The request names another tenant than the connection's.
    WrongTenant,
    /// A signature does not verify (authentication, transaction, offer, accept).
    BadSignature,
    /// The session token has expired (or lives longer than allowed).
    ExpiredToken,
    /// The transaction's expiry height has passed.
    Expired,
    /// The event id is already in flight with a different transaction.
    Replay,
    /// A rate limit (connection or tenant) was hit; `retry_after_ms` says when to retry.
    RateLimited,
    /// The gateway is saturated (the chain is behind); retry after `retry_after_ms`.
    Busy,
    /// No such offer, subscription, counter or tenant configuration.
    NotFound,
    /// A dependency (Redis, the chain) is unreachable; retry later.
    Unavailable,
    /// The gateway is shutting down.
    ShuttingDown,
    /// A bug or an unexpected failure in the gateway.
    Internal,
}

impl ErrorCode {
    /// The code's wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Malformed => "malformed",
            ErrorCode::UnknownMessage => "unknown_message",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Invalid => "invalid",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::AlreadyAuthenticated => "already_authenticated",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::WrongTenant => "wrong_tenant",
            ErrorCode::BadSignature => "bad_signature",
            ErrorCode::ExpiredToken => "expired_token",
            ErrorCode::Expired => "expired",
            ErrorCode::Replay => "replay",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Busy => "busy",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Internal => "internal",
        }
    }

    /// Whether retrying the same request later can succeed.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::RateLimited | ErrorCode::Busy | ErrorCode::Unavailable | ErrorCode::ShuttingDown
        )
    }
}

/// How an event is doing, as `event_status` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventState {
    /// Not known to this gateway (never seen, or outside the ledger's deduplication window).
    Unknown,
    /// Held in flight by this gateway, not yet committed: from the moment it takes the event (a
    /// `submit`, an `accept`'s swap, a settlement), so before the stream append is durable and
    /// possibly before `accepted`; or since it claimed the event from the stream. Not necessarily
    /// durable: an append that fails answers the submit with `unavailable`, and the event is
    /// `Unknown` again.
    Pending,
    /// Committed in a block (applied or rejected: see `outcome`).
    Committed,
}

/// Why an offer closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OfferCloseReason {
    /// Accepted: the swap was submitted as event `offer_id` (watch for `committed`/`rejected`).
    Accepted,
    /// Cancelled by the maker or declined by the taker.
    Cancelled,
    /// Its time ran out.
    Expired,
}

/// An open offer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfferInfo {
    /// The swap's event id.
    pub offer_id: EventId,
    pub maker: PublicKey,
    pub taker: PublicKey,
    /// The swap transaction, signed by the maker; the taker signs `tx.payload`.
    pub tx: Transaction,
    pub expires_unix_ms: u64,
}

/// What happened to an item in one committed event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemEventKind {
    Minted,
    Transferred,
    Burned,
    Split,
    Merged,
    Swapped,
    Settled,
}

/// One entry of an item's recent history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemEvent {
    pub height: u64,
    pub event_id: EventId,
    pub kind: ItemEventKind,
    /// The owner before (none for a mint).
    pub from: Option<PublicKey>,
    /// The owner after (none for a burn or a merge that consumed the item).
    pub to: Option<PublicKey>,
}

/// A message from the gateway to a client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerMessage {
    /// First message on every connection.
    Hello {
        protocol_version: u32,
        chain_id: u64,
        challenge: Challenge,
        limits: Limits,
    },
    /// Authentication succeeded. `account` and `custody` are the player's (none for a studio;
    /// `custody` none when the account is not registered on the chain yet).
    Authenticated {
        request_id: u64,
        tenant: TenantId,
        role: Role,
        account: Option<PublicKey>,
        custody: Option<Custody>,
    },
    Pong {
        request_id: u64,
        server_unix_ms: u64,
    },
    /// Every `clicks` with `request_id <= up_to` is absorbed (in strict mode: written to Redis).
    ClicksAck {
        up_to: u64,
    },
    /// The event is durable in the gateway's stream and will reach the chain exactly once.
    Accepted {
        request_id: u64,
        event_id: EventId,
    },
    /// Push: the event committed at `height` (the height at which it first took effect).
    /// `outcome` is `applied` or `settled` (per-entry results).
    Committed {
        event_id: EventId,
        height: u64,
        outcome: Outcome,
    },
    /// Push: the event committed at `height` as a ledger rejection; nothing changed.
    Rejected {
        event_id: EventId,
        height: u64,
        reason: Rejection,
    },
    /// A request failed. `request_id` is 0 when the request could not be decoded that far.
    Error {
        request_id: u64,
        code: ErrorCode,
        message: String,
        retry_after_ms: Option<u64>,
    },
    Token {
        request_id: u64,
        token: SessionToken,
    },
    /// A settlement window was cut: `event_ids` are the `settle` events submitted (several when
    /// there are more entries than one transaction holds; none when nothing was due).
    Settlement {
        request_id: u64,
        window: u64,
        event_ids: Vec<EventId>,
        entries: u32,
    },
    OfferOpened {
        request_id: u64,
        offer: OfferInfo,
    },
    /// Push to the taker (if connected): an offer was made to you.
    OfferReceived {
        offer: OfferInfo,
    },
    /// Push to maker and taker (if connected), and the answer to `cancel`/`accept`.
    OfferClosed {
        offer_id: EventId,
        reason: OfferCloseReason,
    },
    Offers {
        request_id: u64,
        offers: Vec<OfferInfo>,
    },
    Head {
        request_id: u64,
        chain_id: u64,
        height: u64,
        block_hash: Hash,
        state_root: Hash,
        timestamp_ms: u64,
    },
    Balances {
        request_id: u64,
        account: PublicKey,
        height: u64,
        custody: Option<Custody>,
        balances: Vec<(CurrencyId, Amount)>,
    },
    Inventory {
        request_id: u64,
        account: PublicKey,
        height: u64,
        items: Vec<(ItemId, Item)>,
    },
    Item {
        request_id: u64,
        item_id: ItemId,
        height: u64,
        item: Option<Item>,
        history: Vec<ItemEvent>,
    },
    EventStatus {
        request_id: u64,
        event_id: EventId,
        state: EventState,
        height: Option<u64>,
        outcome: Option<Outcome>,
    },
    Counter {
        request_id: u64,
        counter: String,
        total: u64,
        player_total: Option<u64>,
    },
    PlayerTotals {
        request_id: u64,
        player: PublicKey,
        totals: Vec<(String, u64)>,
    },
    Leaderboard {
        request_id: u64,
        counter: String,
        entries: Vec<(PublicKey, u64)>,
    },
    Subscribed {
        request_id: u64,
        subscription_id: u64,
    },
    Unsubscribed {
        request_id: u64,
        subscription_id: u64,
    },
    /// Push: a committed event that touches the subscription's account (or tenant), in commit order.
    Activity {
        subscription_id: u64,
        height: u64,
        event_id: EventId,
        body: TxBody,
        outcome: Outcome,
    },
}

/// Why a frame could not be decoded into a message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame of {size} bytes is over the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("unknown message `{name}`")]
    UnknownMessage { name: String, request_id: u64 },
    #[error("malformed message: {reason}")]
    Malformed { reason: String, request_id: u64 },
}

impl DecodeError {
    /// The error code to answer with.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::TooLarge { .. } => ErrorCode::TooLarge,
            DecodeError::UnknownMessage { .. } => ErrorCode::UnknownMessage,
            DecodeError::Malformed { .. } => ErrorCode::Malformed,
        }
    }

    /// The request id, when it could be recovered (else 0).
    pub fn request_id(&self) -> u64 {
        match self {
            DecodeError::TooLarge { .. } => 0,
            DecodeError::UnknownMessage { request_id, .. } | DecodeError::Malformed { request_id, .. } => {
                *request_id
            }
        }
    }
}

/// Encodes a message as the gateway sends it (structs as maps with field names).
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    rmp_serde::to_vec_named(message).expect("wire messages always encode")
}

/// Decodes a client message, classifying failures (unknown name vs malformed) and recovering the
/// request id where possible so that the error answer can echo it.
pub fn decode_client(frame: &[u8]) -> Result<ClientMessage, DecodeError> {
    if frame.len() > FRAME_BYTES_MAX {
        return Err(DecodeError::TooLarge {
            size: frame.len(),
            limit: FRAME_BYTES_MAX,
        });
    }
    // A frame holds exactly one MessagePack value. The message is decoded from the slice, as
    // `rmp_serde::from_slice` does (strings and binaries borrowed, not copied: a `clicks` frame
    // decodes without allocating per entry), which stops at the message's end without looking
    // further; then the same deserializer reads on. Only the end of the frame (no marker left to
    // read) means nothing follows; anything else there, a whole value or a broken one, is bytes
    // after the message.
    let mut deserializer = rmp_serde::Deserializer::from_read_ref(frame);
    match ClientMessage::deserialize(&mut deserializer) {
        Ok(message) => match serde::de::IgnoredAny::deserialize(&mut deserializer) {
            Err(rmp_serde::decode::Error::InvalidMarkerRead(end))
                if end.kind() == std::io::ErrorKind::UnexpectedEof =>
            {
                Ok(message)
            }
            _ => Err(DecodeError::Malformed {
                reason: "bytes after the message (a frame holds exactly one MessagePack value)".into(),
                request_id: message.request_id(),
            }),
        },
        Err(error) => Err(classify(frame, error.to_string(), CLIENT_MESSAGE_NAMES)),
    }
}

/// Decodes a server message (the SDK's side).
pub fn decode_server(frame: &[u8]) -> Result<ServerMessage, DecodeError> {
    rmp_serde::from_slice::<ServerMessage>(frame).map_err(|error| DecodeError::Malformed {
        reason: error.to_string(),
        request_id: 0,
    })
}

/// Only the request id of a message body, for error answers: the `request_id` entry of a map
/// body (the first, if repeated), or the first element of an array body (structs as arrays list
/// their fields in order, and `request_id` comes first in every request). The other entries and
/// elements are skipped whatever they hold, so a body that fails to decode as its message still
/// yields its id. `None` for a map without the key or an empty array; an error (the answer then
/// carries 0) when that value is not a u64 or the body is neither a map nor an array.
struct RequestIdOnly(Option<u64>);

impl<'de> Deserialize<'de> for RequestIdOnly {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};

        /// A map key: whether it is `request_id` (as a str, or a bin holding its UTF-8).
        struct IsRequestId(bool);

        impl<'de> Deserialize<'de> for IsRequestId {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct KeyVisitor;
                impl Visitor<'_> for KeyVisitor {
                    type Value = IsRequestId;
                    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                        f.write_str("a field name")
                    }
                    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<IsRequestId, E> {
                        Ok(IsRequestId(key == "request_id"))
                    }
                    fn visit_bytes<E: serde::de::Error>(self, key: &[u8]) -> Result<IsRequestId, E> {
                        Ok(IsRequestId(key == b"request_id"))
                    }
                    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<IsRequestId, E> {
                        Ok(IsRequestId(false))
                    }
                    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<IsRequestId, E> {
                        Ok(IsRequestId(false))
                    }
                }
                deserializer.deserialize_identifier(KeyVisitor)
            }
        }

        struct BodyVisitor;

        impl<'de> Visitor<'de> for BodyVisitor {
            type Value = RequestIdOnly;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a message body (map or array)")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RequestIdOnly, A::Error> {
                let mut request_id = None;
                while let Some(IsRequestId(is_request_id)) = map.next_key()? {
                    if is_request_id && request_id.is_none() {
                        request_id = Some(map.next_value::<u64>()?);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(RequestIdOnly(request_id))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RequestIdOnly, A::Error> {
                let request_id = seq.next_element::<u64>()?;
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(RequestIdOnly(request_id))
            }
        }

        deserializer.deserialize_any(BodyVisitor)
    }
}

fn classify(frame: &[u8], reason: String, known: &[&str]) -> DecodeError {
    use std::collections::BTreeMap;
    // A map of one entry, `{name: body}`: recover the name and, if possible, the request id.
    let Ok(outer) = rmp_serde::from_slice::<BTreeMap<String, serde::de::IgnoredAny>>(frame) else {
        return DecodeError::Malformed {
            reason,
            request_id: 0,
        };
    };
    let request_id = rmp_serde::from_slice::<BTreeMap<String, RequestIdOnly>>(frame)
        .ok()
        .and_then(|map| map.into_values().next())
        .and_then(|RequestIdOnly(request_id)| request_id)
        .unwrap_or(0);
    match outer.keys().next() {
        Some(name) if outer.len() == 1 && !known.contains(&name.as_str()) => DecodeError::UnknownMessage {
            name: name.chars().take(64).collect(),
            request_id,
        },
        _ => DecodeError::Malformed { reason, request_id },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::asset::{Asset, Grant};
    use crate::tx::TxPayload;

    fn key(seed: u8) -> Keypair {
        Keypair::from_seed([seed; 32])
    }

    #[test]
    fn a_counter_name_is_a_msgpack_str_of_any_length_and_compares_as_one() {
        for name in ["gold", "", "a-32-byte-name_0123456789abcdefg", &"x".repeat(200)] {
            let counter = CounterName::from(name);
            assert_eq!(counter.as_str(), name);
            assert_eq!(counter, *name);
            // Encoded exactly as a `String` would be, and decoded from one.
            let bytes = rmp_serde::to_vec(&counter).unwrap();
            assert_eq!(bytes, rmp_serde::to_vec(name).unwrap());
            let back: CounterName = rmp_serde::from_slice(&bytes).unwrap();
            assert_eq!(back, counter);
            // A bin of UTF-8 bytes is taken too, as for `String`.
            let bin = rmp_serde::to_vec(&serde_bytes::Bytes::new(name.as_bytes())).unwrap();
            assert_eq!(rmp_serde::from_slice::<CounterName>(&bin).unwrap(), counter);
        }
        assert!(counter_name_is_valid(&CounterName::from(
            "a-32-byte-name_0123456789abcdefg"
        )));
        assert!(!counter_name_is_valid(&CounterName::from("x".repeat(33))));
        let not_utf8 = rmp_serde::to_vec(&serde_bytes::Bytes::new(&[0xff, 0xfe])).unwrap();
        assert!(rmp_serde::from_slice::<CounterName>(&not_utf8).is_err());
        assert!(rmp_serde::from_slice::<CounterName>(&rmp_serde::to_vec(&7u32).unwrap()).is_err());
    }

    fn every_client_message() -> Vec<ClientMessage> {
        let p = key(1).public();
        let tx = TxPayload {
            chain_id: 1,
            tenant: TenantId(1),
            event_id: EventId::from_u128(1),
            expires_at: 10,
            body: TxBody::Mint {
                to: p,
                grant: Grant::Currency {
                    currency: CurrencyId::new("GOLD"),
                    amount: Amount(5),
                },
            },
        }
        .sign(&[&key(2)]);
        let token = SessionToken::issue(&key(2), TenantId(1), p, 1000);
        vec![
            ClientMessage::AuthStudio {
                request_id: 1,
                tenant: TenantId(1),
                signature: token.signature,
            },
            ClientMessage::AuthPlayer { request_id: 1, token },
            ClientMessage::Ping { request_id: 1 },
            ClientMessage::Clicks {
                request_id: 1,
                clicks: vec![Click(p, "gold".into(), 3)],
            },
            ClientMessage::Submit {
                request_id: 1,
                tx: tx.clone(),
            },
            ClientMessage::IssueToken {
                request_id: 1,
                player: p,
                ttl_ms: 5,
            },
            ClientMessage::Settle { request_id: 1 },
            ClientMessage::Offer {
                request_id: 1,
                tx,
                ttl_ms: 5,
            },
            ClientMessage::Accept {
                request_id: 1,
                offer_id: EventId::from_u128(3),
                signature: None,
            },
            ClientMessage::Cancel {
                request_id: 1,
                offer_id: EventId::from_u128(3),
            },
            ClientMessage::Offers { request_id: 1 },
            ClientMessage::Head { request_id: 1 },
            ClientMessage::Balances {
                request_id: 1,
                account: p,
            },
            ClientMessage::Inventory {
                request_id: 1,
                account: p,
            },
            ClientMessage::Item {
                request_id: 1,
                item: ItemId(4),
            },
            ClientMessage::EventStatus {
                request_id: 1,
                event_id: EventId::from_u128(3),
            },
            ClientMessage::Counter {
                request_id: 1,
                counter: "gold".into(),
                player: Some(p),
            },
            ClientMessage::PlayerTotals {
                request_id: 1,
                player: p,
            },
            ClientMessage::Leaderboard {
                request_id: 1,
                counter: "gold".into(),
                limit: 10,
            },
            ClientMessage::Subscribe {
                request_id: 1,
                account: None,
                from_height: Some(5),
            },
            ClientMessage::Unsubscribe {
                request_id: 1,
                subscription_id: 2,
            },
        ]
    }

    #[test]
    fn every_client_message_round_trips_and_is_named() {
        let messages = every_client_message();
        assert_eq!(messages.len(), CLIENT_MESSAGE_NAMES.len());
        for message in messages {
            let bytes = encode(&message);
            assert_eq!(decode_client(&bytes).unwrap(), message);
            // Arrays in field order are accepted too.
            let compact = rmp_serde::to_vec(&message).unwrap();
            assert_eq!(decode_client(&compact).unwrap(), message);
            assert!(CLIENT_MESSAGE_NAMES.contains(&message.name()));
            assert_eq!(message.request_id(), 1);
            // The wire name is the map key.
            let outer: std::collections::BTreeMap<String, serde::de::IgnoredAny> =
                rmp_serde::from_slice(&bytes).unwrap();
            assert_eq!(outer.keys().next().unwrap(), message.name());
        }
    }

    #[test]
    fn worked_example_bytes_are_stable() {
        // {"ping": {"request_id": 7}}  (documented in docs/PROTOCOL.md)
        let bytes = encode(&ClientMessage::Ping { request_id: 7 });
        assert_eq!(hex::encode(&bytes), "81a470696e6781aa726571756573745f696407");
        let clicks = ClientMessage::Clicks {
            request_id: 1,
            clicks: vec![Click(PublicKey([0xab; 32]), "gold".into(), 3)],
        };
        let bytes = encode(&clicks);
        assert_eq!(
            hex::encode(&bytes),
            concat!(
                "81a6636c69636b73",
                "82aa726571756573745f696401",
                "a6636c69636b73",
                "91",
                "93c420abababababababababababababababababababababababababababababababab",
                "a4676f6c64",
                "03"
            )
        );
        let error = ServerMessage::Error {
            request_id: 7,
            code: ErrorCode::Busy,
            message: "x".into(),
            retry_after_ms: Some(50),
        };
        assert_eq!(
            hex::encode(encode(&error)),
            concat!(
                "81a56572726f72",
                "84aa726571756573745f696407",
                "a4636f6465a462757379",
                "a76d657373616765a178",
                "ae72657472795f61667465725f6d7332"
            )
        );
    }

    #[test]
    fn documented_payload_example_is_exact() {
        let payload = TxPayload {
            chain_id: 1,
            tenant: TenantId(1),
            event_id: EventId([0x11; 16]),
            expires_at: 1000,
            body: TxBody::Mint {
                to: PublicKey([0x22; 32]),
                grant: Grant::Currency {
                    currency: CurrencyId::new("GOLD"),
                    amount: Amount(5),
                },
            },
        };
        let expected = format!(
            "950101c410{}cd03e881a46d696e7492c420{}81a863757272656e637992a4474f4c44c410{}",
            "11".repeat(16),
            "22".repeat(32),
            "00".repeat(15) + "05"
        );
        assert_eq!(hex::encode(payload.encode()), expected);
        assert_eq!(
            hex::encode(crate::tx::TX_SIGNING_DOMAIN),
            "686f6172642f74782f763100"
        );
    }

    #[test]
    fn unknown_and_malformed_are_told_apart_and_request_ids_recovered() {
        #[derive(Serialize)]
        struct Body {
            request_id: u64,
        }
        let mut map = std::collections::BTreeMap::new();
        map.insert("teleport", Body { request_id: 9 });
        let unknown = encode(&map);
        let error = decode_client(&unknown).unwrap_err();
        assert_eq!(error.code(), ErrorCode::UnknownMessage);
        assert_eq!(error.request_id(), 9);

        let mut map = std::collections::BTreeMap::new();
        map.insert("balances", Body { request_id: 11 });
        let missing_field = encode(&map);
        let error = decode_client(&missing_field).unwrap_err();
        assert_eq!(error.code(), ErrorCode::Malformed);
        assert_eq!(error.request_id(), 11);

        assert_eq!(decode_client(&[0xc1]).unwrap_err().code(), ErrorCode::Malformed);
        assert_eq!(decode_client(&[]).unwrap_err().code(), ErrorCode::Malformed);
        let huge = vec![0u8; FRAME_BYTES_MAX + 1];
        assert_eq!(decode_client(&huge).unwrap_err().code(), ErrorCode::TooLarge);
    }

    /// A frame holds exactly one MessagePack value: bytes after the message (junk, or a second
    /// message) make the frame `malformed`, answered with the message's request id.
    #[test]
    fn bytes_after_the_message_are_malformed_and_keep_the_request_id() {
        let ping = encode(&ClientMessage::Ping { request_id: 7 });
        assert_eq!(decode_client(&ping), Ok(ClientMessage::Ping { request_id: 7 }));
        let head = encode(&ClientMessage::Head { request_id: 8 });
        let compact = rmp_serde::to_vec(&ClientMessage::Ping { request_id: 9 }).unwrap();
        for (frame, request_id) in [
            ([ping.as_slice(), &[0x00]].concat(), 7),
            ([ping.as_slice(), &[0xc1, 0xff]].concat(), 7),
            ([ping.as_slice(), &head].concat(), 7),
            ([compact.as_slice(), &[0xc0]].concat(), 9),
        ] {
            let error = decode_client(&frame).unwrap_err();
            assert_eq!(error.code(), ErrorCode::Malformed, "{error}");
            assert_eq!(error.request_id(), request_id, "{error}");
            assert!(error.to_string().contains("after the message"), "{error}");
        }
    }

    /// A body that does not decode as its message still yields its request id, from a map (by
    /// key, wherever it sits) or from an array (its first element), whatever the rest holds.
    #[test]
    fn request_ids_are_recovered_from_map_and_array_bodies() {
        fn frame<T: Serialize>(name: &str, body: T) -> Vec<u8> {
            let mut map = std::collections::BTreeMap::new();
            map.insert(name, body);
            rmp_serde::to_vec(&map).unwrap()
        }
        fn bin(bytes: &[u8]) -> &serde_bytes::Bytes {
            serde_bytes::Bytes::new(bytes)
        }
        #[derive(Serialize)]
        struct AccountFirst<'a> {
            account: &'a serde_bytes::Bytes,
            request_id: u64,
        }
        let cases: Vec<(Vec<u8>, ErrorCode, u64)> = vec![
            // Arrays: a 31-byte key, a missing field, one element too many, an unknown name.
            (
                frame("balances", (11u64, bin(&[1; 31]))),
                ErrorCode::Malformed,
                11,
            ),
            (frame("balances", (12u64,)), ErrorCode::Malformed, 12),
            (frame("ping", (13u64, 1u8)), ErrorCode::Malformed, 13),
            (
                frame("balances", (14u64, bin(&[1; 32]), "x", [1u8, 2])),
                ErrorCode::Malformed,
                14,
            ),
            (
                frame("teleport", (15u64, 1u8, "x")),
                ErrorCode::UnknownMessage,
                15,
            ),
            // Maps: the bad field before the request id.
            (
                encode(&std::collections::BTreeMap::from([(
                    "balances",
                    AccountFirst {
                        account: bin(&[1; 31]),
                        request_id: 16,
                    },
                )])),
                ErrorCode::Malformed,
                16,
            ),
            // Nothing to recover: an array whose first element is not a u64, an empty array,
            // a map without the key, a body that is neither.
            (frame("balances", ("x", 17u64)), ErrorCode::Malformed, 0),
            (frame("ping", ()), ErrorCode::Malformed, 0),
            (
                encode(&std::collections::BTreeMap::from([(
                    "ping",
                    std::collections::BTreeMap::from([("id", 18u64)]),
                )])),
                ErrorCode::Malformed,
                0,
            ),
            (frame("ping", 19u64), ErrorCode::Malformed, 0),
        ];
        for (frame, code, request_id) in cases {
            let error = decode_client(&frame).unwrap_err();
            assert_eq!(
                (error.code(), error.request_id()),
                (code, request_id),
                "{} -> {error}",
                hex::encode(&frame)
            );
        }
    }

    /// A frame nested far deeper than any message (here 200,000 levels, inside the frame
    /// limit) is refused as malformed; decoding it must not exhaust the stack of the thread
    /// that reads the connection (2 MiB, a tokio worker's default).
    #[test]
    fn deeply_nested_frames_are_malformed_and_do_not_exhaust_the_stack() {
        const LEVELS: usize = 200_000;
        let mut arrays = vec![0x81, 0xa6];
        arrays.extend_from_slice(b"submit");
        arrays.extend(std::iter::repeat_n(0x91, LEVELS));
        arrays.push(0xc0);
        let mut maps = vec![0x81, 0xa4];
        maps.extend_from_slice(b"ping");
        for _ in 0..LEVELS / 3 {
            maps.extend_from_slice(&[0x81, 0xa1, b'a']);
        }
        maps.push(0xc0);
        let mut unknown = vec![0x81, 0xa8];
        unknown.extend_from_slice(b"teleport");
        unknown.extend(std::iter::repeat_n(0x91, LEVELS));
        unknown.push(0xc0);
        for frame in [arrays, maps, unknown] {
            assert!(frame.len() <= FRAME_BYTES_MAX);
            let code = std::thread::Builder::new()
                .stack_size(2 << 20)
                .spawn(move || decode_client(&frame).map(|_| ()).map_err(|e| e.code()))
                .unwrap()
                .join()
                .expect("decoding a deep frame does not overflow the stack");
            assert!(
                matches!(code, Err(ErrorCode::Malformed | ErrorCode::UnknownMessage)),
                "{code:?}"
            );
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Any bytes at all decode to a message or to one of the typed decode errors.
        #[test]
        fn arbitrary_bytes_never_panic_the_decoder(frame in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            if let Err(error) = decode_client(&frame) {
                proptest::prop_assert!(matches!(error.code(), ErrorCode::Malformed | ErrorCode::UnknownMessage));
            }
        }

        /// Valid frames damaged by a flipped byte, a cut, or an inserted byte: never a panic,
        /// a typed error or a message that itself round-trips, and the request id of an
        /// undamaged header is still recovered for the error answer.
        #[test]
        fn damaged_frames_get_typed_errors(
            which in 0usize..64,
            position in 0usize..4096,
            byte in proptest::prelude::any::<u8>(),
            damage in 0u8..3,
        ) {
            let messages = every_client_message();
            let mut frame = encode(&messages[which % messages.len()]);
            let at = position % frame.len();
            match damage {
                0 => frame[at] ^= byte | 1,
                1 => frame.truncate(at),
                _ => frame.insert(at, byte),
            }
            match decode_client(&frame) {
                Ok(message) => {
                    proptest::prop_assert_eq!(decode_client(&encode(&message)), Ok(message));
                }
                Err(error) => {
                    proptest::prop_assert!(matches!(error.code(), ErrorCode::Malformed | ErrorCode::UnknownMessage));
                }
            }
        }
    }

    #[test]
    fn session_tokens_verify_expire_and_bind_their_fields() {
        let studio = key(3);
        let token = SessionToken::issue(&studio, TenantId(5), key(4).public(), 10_000);
        token.verify(&studio.public(), 9_999).unwrap();
        assert_eq!(token.verify(&studio.public(), 10_000), Err(TokenError::Expired));
        assert_eq!(token.verify(&key(9).public(), 1), Err(TokenError::BadSignature));
        let mut other_tenant = token.clone();
        other_tenant.tenant = TenantId(6);
        assert_eq!(
            other_tenant.verify(&studio.public(), 1),
            Err(TokenError::BadSignature)
        );
        let long = SessionToken::issue(
            &studio,
            TenantId(5),
            key(4).public(),
            SESSION_TOKEN_TTL_MS_MAX + 10,
        );
        assert_eq!(long.verify(&studio.public(), 1), Err(TokenError::TooLong));
    }

    #[test]
    fn studio_auth_signature_binds_challenge_and_tenant() {
        let studio = key(3);
        let challenge = [7u8; 32];
        let signature = sign_auth(&studio, &challenge, TenantId(5));
        let ok = |tenant| {
            studio
                .public()
                .verify(AUTH_DOMAIN, &auth_signed_bytes(&challenge, tenant), &signature)
        };
        ok(TenantId(5)).unwrap();
        assert!(ok(TenantId(6)).is_err());
    }

    #[test]
    fn subscribe_without_from_height_still_decodes() {
        #[derive(Serialize)]
        struct OldSubscribe {
            request_id: u64,
            account: Option<PublicKey>,
        }
        let mut map = std::collections::BTreeMap::new();
        map.insert(
            "subscribe",
            OldSubscribe {
                request_id: 4,
                account: None,
            },
        );
        assert_eq!(
            decode_client(&encode(&map)).unwrap(),
            ClientMessage::Subscribe {
                request_id: 4,
                account: None,
                from_height: None
            }
        );
        // As an array in field order, the trailing optional field may be left out too.
        let mut map = std::collections::BTreeMap::new();
        map.insert("subscribe", (4u64, Option::<PublicKey>::None));
        assert_eq!(
            decode_client(&rmp_serde::to_vec(&map).unwrap()).unwrap(),
            ClientMessage::Subscribe {
                request_id: 4,
                account: None,
                from_height: None
            }
        );
    }

    #[test]
    fn counter_names() {
        assert!(counter_name_is_valid("gold"));
        assert!(counter_name_is_valid("boss-kills_2"));
        assert!(!counter_name_is_valid(""));
        assert!(!counter_name_is_valid("Gold"));
        assert!(!counter_name_is_valid(&"a".repeat(COUNTER_NAME_BYTES_MAX + 1)));
    }

    #[test]
    fn server_messages_round_trip() {
        let messages = vec![
            ServerMessage::Committed {
                event_id: EventId::from_u128(1),
                height: 3,
                outcome: Outcome::Applied,
            },
            ServerMessage::Rejected {
                event_id: EventId::from_u128(1),
                height: 3,
                reason: Rejection::InsufficientFunds,
            },
            ServerMessage::ClicksAck { up_to: 9 },
            ServerMessage::Activity {
                subscription_id: 1,
                height: 2,
                event_id: EventId::from_u128(1),
                body: TxBody::Burn {
                    from: key(1).public(),
                    assets: vec![Asset::Item { item: ItemId(3) }],
                },
                outcome: Outcome::Settled {
                    entries: vec![None, Some(Rejection::UnknownAccount)],
                },
            },
        ];
        for message in messages {
            assert_eq!(decode_server(&encode(&message)).unwrap(), message);
        }
    }
}
