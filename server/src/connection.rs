//! One WebSocket connection: handshake, `hello`, authentication, then requests. Layers:
//! frames (tungstenite, size-limited) → messages (`wire::decode_client`, typed errors) →
//! handlers (this file) → the shared services (clicks, events, view, offers, hub).
//!
//! The task owns the socket. Other tasks reach it through its bounded outgoing queue (pushes,
//! deferred answers); a full queue closes the connection with 1013. Incoming frames that are
//! already buffered are handled together and their answers written with one flush.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};

use hoard_types::constants::{EXPIRY_HORIZON_BLOCKS_MAX, TX_PAYLOAD_BYTES_MAX, TX_SIGNATURES_MAX};
use hoard_types::tx::TX_SIGNING_DOMAIN;
use hoard_types::wire::{
    self, close_code, Challenge, ClientMessage, ErrorCode, EventState, Limits, OfferCloseReason, OfferInfo,
    Role, ServerMessage, SessionToken, TokenError, AUTH_DOMAIN, AUTH_TIMEOUT_MS,
    EVENTS_IN_FLIGHT_PER_CONNECTION_MAX, FRAME_BYTES_MAX, LEADERBOARD_ENTRIES_MAX, OFFER_TTL_MS_MAX,
    PROTOCOL_ERRORS_PER_CONNECTION_MAX, SESSION_TOKEN_TTL_MS_MAX, SUBSCRIPTIONS_PER_CONNECTION_MAX,
};
use hoard_types::{Custody, PublicKey, TenantId, Transaction, TxBody, TxPayload, TxSignature};

use crate::constants::{CONNECTION_OUTBOUND_QUEUE_MAX, CONNECTION_WRITES_PER_FLUSH_MAX};
use crate::events::{commit_message, Origin, Submitted};
use crate::hub::{ConnHandle, ConnId};
use crate::metrics as m;
use crate::ratelimit::TokenBucket;
use crate::Shared;

/// Frames handled before answers are flushed.
const FRAMES_PER_FLUSH_MAX: usize = 32;

type Sink = futures::stream::SplitSink<tokio_tungstenite::WebSocketStream<TcpStream>, Message>;

/// The WebSocket settings: frames and messages capped at [`FRAME_BYTES_MAX`]; a 2 KiB socket
/// read buffer instead of tungstenite's 128 KiB, which it zero-fills to its full size on the
/// first read, so that every idle connection kept 128 KiB resident (measured with
/// `hoard-loadtest idle` at 10,000 connections: 148 KB per idle connection before, 16.8 KB with
/// 4 KiB, 7.6 KB with 2 KiB and the boxed outbound queue and frame future). Larger frames are
/// still read whole (the buffer grows to the frame), in reads of at most this size.
pub fn websocket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(FRAME_BYTES_MAX))
        .max_frame_size(Some(FRAME_BYTES_MAX))
        .read_buffer_size(WS_READ_BUFFER_BYTES)
}

/// The socket read buffer of each connection (see [`websocket_config`]).
pub const WS_READ_BUFFER_BYTES: usize = 2 * 1024;

/// Only `/v1` is served.
#[allow(clippy::result_large_err)]
fn check_path(request: &Request, response: Response) -> Result<Response, ErrorResponse> {
    if request.uri().path() == wire::WS_PATH {
        Ok(response)
    } else {
        let mut refusal = ErrorResponse::new(Some("unknown path; use /v1".into()));
        *refusal.status_mut() = tungstenite::http::StatusCode::NOT_FOUND;
        Err(refusal)
    }
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What a handler wants the loop to do next.
enum Flow {
    Continue,
    Close(u16, &'static str),
}

struct Auth {
    tenant: TenantId,
    role: Role,
    /// The player, for player connections.
    player: Option<PublicKey>,
}

struct Connection {
    id: ConnId,
    shared: Arc<Shared>,
    challenge: [u8; 32],
    auth: Option<Auth>,
    handle: ConnHandle,
    replies: Vec<ServerMessage>,
    protocol_errors: u32,
    last_click_seq: Option<u64>,
    /// Non-strict: the newest absorbed `clicks` not acked yet.
    click_ack: Option<u64>,
    /// This connection's click totals (from its first `clicks`; drained by the flusher).
    click_table: Option<Arc<crate::clicks::ClickTable>>,
    /// Strict: (sequence, flush generation that must complete).
    strict_acks: VecDeque<(u64, u64)>,
    messages: TokenBucket,
    clicks: TokenBucket,
    subscriptions: HashSet<u64>,
}

impl Drop for Connection {
    /// However the connection ends (closed, failed, or its task aborted), its click table is
    /// retired: its clicks wait for the next flush, and the table is forgotten.
    fn drop(&mut self) {
        if let Some(table) = self.click_table.take() {
            self.shared.clicks.retire(&table);
        }
    }
}

/// Serves one accepted TCP connection until it closes. `refuse` answers the handshake and closes
/// at once with 1013 (connection limit).
pub async fn serve(shared: Arc<Shared>, stream: TcpStream, refuse: bool) {
    let _ = stream.set_nodelay(true);
    let handshake =
        tokio_tungstenite::accept_hdr_async_with_config(stream, check_path, Some(websocket_config()));
    let ws = match tokio::time::timeout(Duration::from_millis(AUTH_TIMEOUT_MS), handshake).await {
        Ok(Ok(ws)) => ws,
        _ => return,
    };
    let (mut sink, mut source) = ws.split();
    if refuse {
        metrics::counter!(m::CONNECTIONS_REFUSED_TOTAL).increment(1);
        let _ = close(&mut sink, close_code::TRY_AGAIN_LATER, "connection limit reached").await;
        return;
    }
    metrics::gauge!(m::CONNECTIONS_OPEN).increment(1.0);
    let (outbound, mut outbound_rx) = mpsc::channel(CONNECTION_OUTBOUND_QUEUE_MAX);
    let challenge: [u8; 32] = rand::random();
    let limits = &shared.config.limits;
    let mut connection = Connection {
        id: shared.hub.next_conn_id(),
        challenge,
        auth: None,
        handle: ConnHandle {
            tenant: TenantId(0),
            player: None,
            outbound,
            slow: Arc::new(AtomicBool::new(false)),
            slow_notify: Arc::new(Notify::new()),
            in_flight: Arc::new(AtomicUsize::new(0)),
        },
        replies: Vec::new(),
        protocol_errors: 0,
        last_click_seq: None,
        click_ack: None,
        click_table: None,
        strict_acks: VecDeque::new(),
        messages: TokenBucket::new(limits.connection_messages_per_second),
        clicks: TokenBucket::new(limits.connection_clicks_per_second),
        subscriptions: HashSet::new(),
        shared: shared.clone(),
    };
    let hello = ServerMessage::Hello {
        protocol_version: wire::PROTOCOL_VERSION,
        chain_id: shared.chain_id,
        challenge: Challenge(challenge),
        limits: Limits::default(),
    };
    let flow = if write(&mut sink, &hello).await.is_err() || sink.flush().await.is_err() {
        Flow::Close(close_code::INTERNAL_ERROR, "write failed")
    } else {
        connection.run(&mut sink, &mut source, &mut outbound_rx).await
    };
    if let Flow::Close(code, reason) = flow {
        if code != close_code::NORMAL {
            metrics::counter!(m::CLOSES_TOTAL, "code" => code.to_string()).increment(1);
        }
        let _ = close(&mut sink, code, reason).await;
    }
    shared.hub.unregister(connection.id);
    metrics::gauge!(m::CONNECTIONS_OPEN).decrement(1.0);
}

async fn write(sink: &mut Sink, message: &ServerMessage) -> Result<(), tungstenite::Error> {
    sink.feed(Message::Binary(wire::encode(message).into())).await
}

/// Writes and flushes `replies` (draining it).
async fn write_all(sink: &mut Sink, replies: &mut Vec<ServerMessage>) -> Result<(), tungstenite::Error> {
    for reply in replies.drain(..) {
        write(sink, &reply).await?;
    }
    sink.flush().await
}

async fn close(sink: &mut Sink, code: u16, reason: &'static str) -> Result<(), tungstenite::Error> {
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    };
    tokio::time::timeout(Duration::from_secs(1), sink.send(Message::Close(Some(frame))))
        .await
        .unwrap_or(Ok(()))
}

impl Connection {
    async fn run(
        &mut self,
        sink: &mut Sink,
        source: &mut futures::stream::SplitStream<tokio_tungstenite::WebSocketStream<TcpStream>>,
        outbound: &mut mpsc::Receiver<Box<ServerMessage>>,
    ) -> Flow {
        let mut shutdown = self.shared.stop_connections.clone();
        let mut flushed = self.shared.clicks.flushed();
        let mut failed = self.shared.clicks.failed();
        failed.mark_unchanged();
        let auth_deadline = tokio::time::Instant::now() + Duration::from_millis(AUTH_TIMEOUT_MS);
        let slow = self.handle.slow_notify.clone();
        loop {
            let flow = tokio::select! {
                biased;
                _ = crate::stopped(&mut shutdown) => {
                    // The drain is over: what is queued for this client (commit pushes, acks)
                    // is written before the close.
                    while let Ok(message) = outbound.try_recv() {
                        self.replies.push(*message);
                    }
                    Flow::Close(close_code::GOING_AWAY, "gateway shutting down")
                }
                _ = slow.notified() => {
                    metrics::counter!(m::SLOW_CONSUMERS_TOTAL).increment(1);
                    return Flow::Close(close_code::TRY_AGAIN_LATER, "client reads too slowly");
                }
                _ = tokio::time::sleep_until(auth_deadline), if self.auth.is_none() => {
                    self.error(0, ErrorCode::Unauthenticated, "authentication timed out", None);
                    Flow::Close(close_code::POLICY_VIOLATION, "authentication timed out")
                }
                Some(message) = outbound.recv() => {
                    self.replies.push(*message);
                    while self.replies.len() < CONNECTION_WRITES_PER_FLUSH_MAX {
                        match outbound.try_recv() {
                            Ok(message) => self.replies.push(*message),
                            Err(_) => break,
                        }
                    }
                    Flow::Continue
                }
                changed = flushed.changed(), if !self.strict_acks.is_empty() => {
                    if changed.is_ok() {
                        let done = *flushed.borrow_and_update();
                        self.ack_strict_clicks_flushed(done);
                    }
                    Flow::Continue
                }
                changed = failed.changed(), if !self.strict_acks.is_empty() => {
                    if changed.is_ok() {
                        // Strict clicks the failed flush should have written: not acked.
                        let failed_generation = *failed.borrow_and_update();
                        // A later flush may have succeeded already: ack what it wrote first.
                        let done = *flushed.borrow();
                        self.ack_strict_clicks_flushed(done);
                        while let Some((seq, needed)) = self.strict_acks.front().copied() {
                            if needed > failed_generation { break; }
                            self.strict_acks.pop_front();
                            self.error(
                                seq,
                                ErrorCode::Unavailable,
                                "the click store is unavailable: these clicks are not acked (they may \
                                 still be written when it is back; resending may count them twice)",
                                Some(self.shared.config.clicks.flush_interval_ms.max(500)),
                            );
                        }
                    }
                    Flow::Continue
                }
                frame = source.next() => {
                    // Boxed, so that the idle connection's task does not hold the state of a
                    // frame's handling inline (4,352 bytes of future instead of 2,176).
                    let mut flow = Box::pin(self.on_frame(frame)).await;
                    let mut handled = 1;
                    while matches!(flow, Flow::Continue) && handled < FRAMES_PER_FLUSH_MAX {
                        match source.next().now_or_never() {
                            Some(frame) => flow = Box::pin(self.on_frame(frame)).await,
                            None => break,
                        }
                        handled += 1;
                    }
                    if let Some(up_to) = self.click_ack.take() {
                        self.replies.push(ServerMessage::ClicksAck { up_to });
                    }
                    flow
                }
            };
            // A client that does not read blocks these writes; its queue then fills and marks
            // it slow, which must still close it (1013) instead of waiting on it for ever.
            let written = tokio::select! {
                biased;
                _ = slow.notified() => {
                    metrics::counter!(m::SLOW_CONSUMERS_TOTAL).increment(1);
                    return Flow::Close(close_code::TRY_AGAIN_LATER, "client reads too slowly");
                }
                written = write_all(sink, &mut self.replies) => written,
            };
            if written.is_err() {
                return Flow::Close(close_code::INTERNAL_ERROR, "write failed");
            }
            if let Flow::Close(..) = flow {
                return flow;
            }
        }
    }

    fn error(
        &mut self,
        request_id: u64,
        code: ErrorCode,
        message: impl Into<String>,
        retry_after_ms: Option<u64>,
    ) {
        metrics::counter!(m::ERRORS_TOTAL, "code" => code.as_str()).increment(1);
        self.replies.push(ServerMessage::Error {
            request_id,
            code,
            message: message.into(),
            retry_after_ms,
        });
    }

    /// A protocol error: counted; too many close the connection.
    /// Acks (one `clicks_ack`, the highest) the strict clicks messages that flushes up to
    /// generation `done` wrote.
    fn ack_strict_clicks_flushed(&mut self, done: u64) {
        let mut up_to = None;
        while let Some((seq, needed)) = self.strict_acks.front().copied() {
            if done < needed {
                break;
            }
            up_to = Some(seq);
            self.strict_acks.pop_front();
        }
        if let Some(up_to) = up_to {
            self.replies.push(ServerMessage::ClicksAck { up_to });
        }
    }

    fn protocol_error(&mut self, request_id: u64, code: ErrorCode, message: impl Into<String>) -> Flow {
        self.error(request_id, code, message, None);
        self.protocol_errors += 1;
        if self.protocol_errors >= PROTOCOL_ERRORS_PER_CONNECTION_MAX {
            Flow::Close(close_code::POLICY_VIOLATION, "too many protocol errors")
        } else {
            Flow::Continue
        }
    }

    async fn on_frame(&mut self, frame: Option<Result<Message, tungstenite::Error>>) -> Flow {
        match frame {
            None => Flow::Close(close_code::NORMAL, ""),
            Some(Ok(Message::Binary(bytes))) => self.on_message(&bytes).await,
            // A text frame whose payload is not UTF-8 is still a text frame (tungstenite
            // reports it as an error instead of a message): the same answer and close code.
            Some(Ok(Message::Text(_))) | Some(Err(tungstenite::Error::Utf8(_))) => {
                self.error(
                    0,
                    ErrorCode::Malformed,
                    "text frames are not part of the protocol",
                    None,
                );
                Flow::Close(close_code::UNSUPPORTED_DATA, "binary frames only")
            }
            Some(Ok(Message::Close(_))) => Flow::Close(close_code::NORMAL, ""),
            Some(Ok(_)) => Flow::Continue, // ping/pong: tungstenite answers pings itself
            Some(Err(tungstenite::Error::Capacity(_))) => {
                self.error(
                    0,
                    ErrorCode::TooLarge,
                    format!("frame over {FRAME_BYTES_MAX} bytes"),
                    None,
                );
                Flow::Close(close_code::MESSAGE_TOO_BIG, "message too big")
            }
            Some(Err(tungstenite::Error::Protocol(_))) => {
                Flow::Close(close_code::PROTOCOL_ERROR, "protocol error")
            }
            Some(Err(_)) => Flow::Close(close_code::NORMAL, ""),
        }
    }

    async fn on_message(&mut self, bytes: &[u8]) -> Flow {
        let message = match wire::decode_client(bytes) {
            Ok(message) => message,
            Err(error) => return self.protocol_error(error.request_id(), error.code(), error.to_string()),
        };
        metrics::counter!(m::MESSAGES_RECEIVED_TOTAL, "kind" => message.name()).increment(1);
        let request_id = message.request_id();
        // The connection's bucket counts every message, before authentication too (a flood of
        // pings while unauthenticated is limited like any other).
        if let Err(wait) = self.messages.take(1) {
            return self.rate_limited(request_id, "connection", wait);
        }
        let Some(auth) = self.auth.as_ref() else {
            return match message {
                ClientMessage::AuthStudio {
                    request_id,
                    tenant,
                    signature,
                } => self.auth_studio(request_id, tenant, &signature),
                ClientMessage::AuthPlayer { request_id, token } => self.auth_player(request_id, &token),
                ClientMessage::Ping { request_id } => {
                    self.replies.push(ServerMessage::Pong {
                        request_id,
                        server_unix_ms: now_unix_ms(),
                    });
                    Flow::Continue
                }
                _ => self.protocol_error(request_id, ErrorCode::Unauthenticated, "authenticate first"),
            };
        };
        let tenant = auth.tenant;
        // A draining gateway takes nothing new to write, but keeps the connection open for the
        // pushes of what it already accepted (see `Gateway::shutdown`).
        if self.shared.health.shutting_down.load(Ordering::Relaxed)
            && matches!(
                message,
                ClientMessage::Clicks { .. }
                    | ClientMessage::Submit { .. }
                    | ClientMessage::Offer { .. }
                    | ClientMessage::Accept { .. }
                    | ClientMessage::Settle { .. }
            )
        {
            self.error(
                request_id,
                ErrorCode::ShuttingDown,
                "the gateway is draining before it stops: send this to another gateway",
                None,
            );
            return Flow::Continue;
        }
        // The tenant's bucket: one token per message of any of its connections.
        if let Err(wait) = self.shared.tenant_messages.take(tenant, 1) {
            return self.rate_limited(request_id, "tenant", wait);
        }
        self.handle(message).await
    }

    fn rate_limited(&mut self, request_id: u64, scope: &'static str, wait_ms: u64) -> Flow {
        metrics::counter!(m::RATE_LIMITED_TOTAL, "scope" => scope).increment(1);
        self.error(
            request_id,
            ErrorCode::RateLimited,
            format!("{scope} rate limit"),
            Some(wait_ms),
        );
        Flow::Continue
    }

    fn auth_studio(&mut self, request_id: u64, tenant: TenantId, signature: &hoard_types::Signature) -> Flow {
        let Some(studio_key) = self.shared.view.read(|l| l.tenant(tenant).map(|t| t.studio_key)) else {
            self.error(request_id, ErrorCode::NotFound, "no such tenant", None);
            return Flow::Close(close_code::POLICY_VIOLATION, "authentication failed");
        };
        let signed = wire::auth_signed_bytes(&self.challenge, tenant);
        if studio_key.verify(AUTH_DOMAIN, &signed, signature).is_err() {
            self.error(
                request_id,
                ErrorCode::BadSignature,
                "the studio signature does not verify",
                None,
            );
            return Flow::Close(close_code::POLICY_VIOLATION, "authentication failed");
        }
        self.authenticated(
            request_id,
            Auth {
                tenant,
                role: Role::Studio,
                player: None,
            },
            None,
        );
        Flow::Continue
    }

    fn auth_player(&mut self, request_id: u64, token: &SessionToken) -> Flow {
        let tenant = token.tenant;
        let Some(studio_key) = self.shared.view.read(|l| l.tenant(tenant).map(|t| t.studio_key)) else {
            self.error(request_id, ErrorCode::NotFound, "no such tenant", None);
            return Flow::Close(close_code::POLICY_VIOLATION, "authentication failed");
        };
        match token.verify(&studio_key, now_unix_ms()) {
            Ok(()) => {}
            Err(TokenError::Expired | TokenError::TooLong) => {
                self.error(
                    request_id,
                    ErrorCode::ExpiredToken,
                    "the session token has expired or lives too long",
                    None,
                );
                return Flow::Close(close_code::POLICY_VIOLATION, "authentication failed");
            }
            Err(TokenError::BadSignature) => {
                self.error(
                    request_id,
                    ErrorCode::BadSignature,
                    "the session token's signature does not verify",
                    None,
                );
                return Flow::Close(close_code::POLICY_VIOLATION, "authentication failed");
            }
        }
        let custody = self.shared.view.read(|l| l.account(tenant, &token.player));
        self.authenticated(
            request_id,
            Auth {
                tenant,
                role: Role::Player,
                player: Some(token.player),
            },
            custody,
        );
        Flow::Continue
    }

    fn authenticated(&mut self, request_id: u64, auth: Auth, custody: Option<Custody>) {
        let role = match auth.role {
            Role::Studio => "studio",
            Role::Player => "player",
        };
        metrics::counter!(m::CONNECTIONS_TOTAL, "role" => role).increment(1);
        self.handle.tenant = auth.tenant;
        self.handle.player = auth.player;
        self.shared.hub.register(self.id, self.handle.clone());
        self.replies.push(ServerMessage::Authenticated {
            request_id,
            tenant: auth.tenant,
            role: auth.role,
            account: auth.player,
            custody,
        });
        self.auth = Some(auth);
    }

    fn forbidden(&mut self, request_id: u64, message: &str) -> Flow {
        self.error(request_id, ErrorCode::Forbidden, message, None);
        Flow::Continue
    }

    /// For reads about `account`: players may only read themselves.
    fn may_read(&self, account: &PublicKey) -> bool {
        let auth = self.auth.as_ref().expect("authenticated");
        auth.role == Role::Studio || auth.player.as_ref() == Some(account)
    }

    async fn handle(&mut self, message: ClientMessage) -> Flow {
        let auth = self.auth.as_ref().expect("authenticated");
        let (tenant, role, player) = (auth.tenant, auth.role, auth.player);
        let shared = self.shared.clone();
        match message {
            ClientMessage::AuthStudio { request_id, .. } | ClientMessage::AuthPlayer { request_id, .. } => {
                self.error(
                    request_id,
                    ErrorCode::AlreadyAuthenticated,
                    "already authenticated",
                    None,
                );
                Flow::Continue
            }
            ClientMessage::Ping { request_id } => {
                self.replies.push(ServerMessage::Pong {
                    request_id,
                    server_unix_ms: now_unix_ms(),
                });
                Flow::Continue
            }
            ClientMessage::Clicks { request_id, clicks } => {
                self.on_clicks(tenant, player, request_id, &clicks)
            }
            ClientMessage::Submit { request_id, tx } => self.on_submit(tenant, role, player, request_id, tx),
            ClientMessage::IssueToken {
                request_id,
                player: for_player,
                ttl_ms,
            } => {
                if role != Role::Studio {
                    return self.forbidden(request_id, "only the studio issues tokens");
                }
                if ttl_ms == 0 || ttl_ms > SESSION_TOKEN_TTL_MS_MAX {
                    return self.protocol_error(request_id, ErrorCode::Invalid, "ttl_ms out of range");
                }
                let Some(studio) = shared.studio_keys.get(&tenant) else {
                    return self.forbidden(
                        request_id,
                        "this gateway does not hold the studio key; sign tokens offline",
                    );
                };
                let token = SessionToken::issue(studio, tenant, for_player, now_unix_ms() + ttl_ms);
                self.replies.push(ServerMessage::Token { request_id, token });
                Flow::Continue
            }
            ClientMessage::Settle { request_id } => {
                if role != Role::Studio {
                    return self.forbidden(request_id, "only the studio settles");
                }
                let Some(studio) = shared.studio_keys.get(&tenant).cloned() else {
                    return self.forbidden(request_id, "this gateway does not hold the studio key");
                };
                let rules = shared
                    .config
                    .tenant(tenant)
                    .map(|t| t.rules.clone())
                    .unwrap_or_default();
                if rules.is_empty() {
                    self.error(
                        request_id,
                        ErrorCode::NotFound,
                        "no conversion rules for this tenant",
                        None,
                    );
                    return Flow::Continue;
                }
                let conn = self.id;
                tokio::spawn(async move {
                    let answer = match crate::settlement::settle(
                        &shared.store,
                        &shared.events,
                        &shared.view,
                        &shared.settle_marks,
                        shared.chain_id,
                        tenant,
                        &studio,
                        &rules,
                    )
                    .await
                    {
                        Ok(settled) => ServerMessage::Settlement {
                            request_id,
                            window: settled.window,
                            event_ids: settled.event_ids,
                            entries: settled.entries,
                        },
                        Err(crate::settlement::SettleError::Refused {
                            code,
                            message,
                            retry_after_ms,
                        }) => ServerMessage::Error {
                            request_id,
                            code,
                            message,
                            retry_after_ms,
                        },
                        Err(error) => ServerMessage::Error {
                            request_id,
                            code: ErrorCode::Unavailable,
                            message: error.to_string(),
                            retry_after_ms: Some(500),
                        },
                    };
                    shared.hub.push(conn, answer);
                });
                Flow::Continue
            }
            ClientMessage::Offer {
                request_id,
                tx,
                ttl_ms,
            } => self.on_offer(tenant, player, request_id, tx, ttl_ms),
            ClientMessage::Accept {
                request_id,
                offer_id,
                signature,
            } => self.on_accept(tenant, player, request_id, offer_id, signature),
            ClientMessage::Cancel { request_id, offer_id } => {
                let Some(offer) = shared.offers.get(tenant, &offer_id) else {
                    self.error(request_id, ErrorCode::NotFound, "no such open offer", None);
                    return Flow::Continue;
                };
                let party = player.is_some_and(|p| p == offer.maker || p == offer.taker);
                if !party {
                    return self.forbidden(request_id, "only the maker or the taker may cancel");
                }
                if shared.offers.remove(tenant, &offer_id).is_some() {
                    self.close_offer(tenant, &offer, OfferCloseReason::Cancelled);
                }
                Flow::Continue
            }
            ClientMessage::Offers { request_id } => {
                let offers = shared.offers.list(tenant, player.as_ref());
                self.replies.push(ServerMessage::Offers { request_id, offers });
                Flow::Continue
            }
            ClientMessage::Head { request_id } => {
                let reply = shared.view.read(|l| {
                    let head = l.head();
                    ServerMessage::Head {
                        request_id,
                        chain_id: l.chain_id(),
                        height: head.height,
                        block_hash: head.hash(),
                        state_root: head.state_root,
                        timestamp_ms: head.timestamp_ms,
                    }
                });
                self.replies.push(reply);
                Flow::Continue
            }
            ClientMessage::Balances { request_id, account } => {
                if !self.may_read(&account) {
                    return self.forbidden(request_id, "a player may only read its own balances");
                }
                let reply = shared.view.read(|l| ServerMessage::Balances {
                    request_id,
                    account,
                    height: l.height(),
                    custody: l.account(tenant, &account),
                    balances: l.balances(tenant, &account),
                });
                self.replies.push(reply);
                Flow::Continue
            }
            ClientMessage::Inventory { request_id, account } => {
                if !self.may_read(&account) {
                    return self.forbidden(request_id, "a player may only read its own inventory");
                }
                let reply = shared.view.read(|l| ServerMessage::Inventory {
                    request_id,
                    account,
                    height: l.height(),
                    items: l.inventory(tenant, &account),
                });
                self.replies.push(reply);
                Flow::Continue
            }
            ClientMessage::Item { request_id, item } => {
                let (height, found) = shared.view.read(|l| (l.height(), l.item(tenant, item).cloned()));
                let history = shared.view.item_history(tenant, item);
                self.replies.push(ServerMessage::Item {
                    request_id,
                    item_id: item,
                    height,
                    item: found,
                    history,
                });
                Flow::Continue
            }
            ClientMessage::EventStatus { request_id, event_id } => {
                let committed = shared.view.read(|l| l.event(tenant, &event_id));
                let reply = match committed {
                    Some((height, outcome)) => ServerMessage::EventStatus {
                        request_id,
                        event_id,
                        state: EventState::Committed,
                        height: Some(height),
                        outcome: Some(outcome),
                    },
                    None => ServerMessage::EventStatus {
                        request_id,
                        event_id,
                        state: if shared.events.status(tenant, &event_id).is_some() {
                            EventState::Pending
                        } else {
                            EventState::Unknown
                        },
                        height: None,
                        outcome: None,
                    },
                };
                self.replies.push(reply);
                Flow::Continue
            }
            ClientMessage::Counter {
                request_id,
                counter,
                player: of,
            } => {
                if !wire::counter_name_is_valid(&counter) {
                    return self.protocol_error(request_id, ErrorCode::Invalid, "bad counter name");
                }
                if role == Role::Player && of.is_none_or_not(player.as_ref()) {
                    return self.forbidden(request_id, "a player may only read its own totals");
                }
                let result = async {
                    let total = shared.clicks.counter_total(tenant, &counter).await?;
                    let player_total = match &of {
                        Some(p) => Some(shared.clicks.player_total(tenant, &counter, p).await?),
                        None => None,
                    };
                    Ok::<_, crate::store::StoreError>((total, player_total))
                }
                .await;
                match result {
                    Ok((total, player_total)) => self.replies.push(ServerMessage::Counter {
                        request_id,
                        counter,
                        total,
                        player_total,
                    }),
                    Err(error) => self.unavailable(request_id, &error).await,
                }
                Flow::Continue
            }
            ClientMessage::PlayerTotals {
                request_id,
                player: of,
            } => {
                if !self.may_read(&of) {
                    return self.forbidden(request_id, "a player may only read its own totals");
                }
                match shared.clicks.player_totals(tenant, &of).await {
                    Ok(totals) => self.replies.push(ServerMessage::PlayerTotals {
                        request_id,
                        player: of,
                        totals,
                    }),
                    Err(error) => self.unavailable(request_id, &error).await,
                }
                Flow::Continue
            }
            ClientMessage::Leaderboard {
                request_id,
                counter,
                limit,
            } => {
                if role != Role::Studio {
                    return self.forbidden(request_id, "leaderboards are for the studio");
                }
                if !wire::counter_name_is_valid(&counter)
                    || limit == 0
                    || limit as usize > LEADERBOARD_ENTRIES_MAX
                {
                    return self.protocol_error(request_id, ErrorCode::Invalid, "bad counter name or limit");
                }
                match shared.clicks.leaderboard(tenant, &counter, limit as usize).await {
                    Ok(entries) => self.replies.push(ServerMessage::Leaderboard {
                        request_id,
                        counter,
                        entries,
                    }),
                    Err(error) => self.unavailable(request_id, &error).await,
                }
                Flow::Continue
            }
            ClientMessage::Subscribe {
                request_id,
                account,
                from_height,
            } => {
                let allowed = match (&account, role) {
                    (None, Role::Studio) => true,
                    (Some(account), _) => self.may_read(account),
                    (None, Role::Player) => false,
                };
                if !allowed {
                    return self.forbidden(request_id, "a player may only subscribe to its own account");
                }
                if self.subscriptions.len() >= SUBSCRIPTIONS_PER_CONNECTION_MAX {
                    return self.protocol_error(request_id, ErrorCode::Invalid, "too many subscriptions");
                }
                // `subscribed` is written in this turn of the loop; replayed activity goes through
                // the outgoing queue, so it always comes after.
                match shared.hub.subscribe(self.id, tenant, account, from_height) {
                    Ok(subscription_id) => {
                        self.subscriptions.insert(subscription_id);
                        self.replies.push(ServerMessage::Subscribed {
                            request_id,
                            subscription_id,
                        });
                    }
                    Err(crate::hub::SubscribeError::TooOld { oldest }) => self.error(
                        request_id,
                        ErrorCode::NotFound,
                        format!("activity before height {oldest} is no longer kept"),
                        None,
                    ),
                }
                Flow::Continue
            }
            ClientMessage::Unsubscribe {
                request_id,
                subscription_id,
            } => {
                if self.subscriptions.remove(&subscription_id)
                    && shared.hub.unsubscribe(self.id, tenant, subscription_id)
                {
                    self.replies.push(ServerMessage::Unsubscribed {
                        request_id,
                        subscription_id,
                    });
                } else {
                    self.error(request_id, ErrorCode::NotFound, "no such subscription", None);
                }
                Flow::Continue
            }
        }
    }

    async fn unavailable(&mut self, request_id: u64, error: &crate::store::StoreError) {
        self.error(request_id, ErrorCode::Unavailable, error.to_string(), Some(500));
    }

    fn on_clicks(
        &mut self,
        tenant: TenantId,
        player: Option<PublicKey>,
        request_id: u64,
        clicks: &[wire::Click],
    ) -> Flow {
        if self.last_click_seq.is_some_and(|last| request_id <= last) {
            return self.protocol_error(request_id, ErrorCode::Invalid, "clicks request_id must increase");
        }
        let checked = match self.shared.clicks.check(clicks, player.as_ref()) {
            Ok(checked) => checked,
            Err(error) if error.code == ErrorCode::Forbidden => {
                return self.forbidden(request_id, &error.message)
            }
            Err(error) => return self.protocol_error(request_id, error.code, error.message),
        };
        let total = checked.total;
        // A bucket holds at most one second's worth: a message counting more clicks than that
        // could never pass, so it is refused as too large instead of `rate_limited` for ever.
        let limits = &self.shared.config.limits;
        let most = limits
            .connection_clicks_per_second
            .min(limits.tenant_clicks_per_second);
        if total > u64::from(most) {
            return self.protocol_error(
                request_id,
                ErrorCode::TooLarge,
                format!("{total} clicks in one message: more than the {most} per second this connection may send; split it"),
            );
        }
        if let Err(wait) = self.clicks.take(total) {
            return self.rate_limited(request_id, "connection", wait);
        }
        if let Err(wait) = self.shared.tenant_clicks.take(tenant, total) {
            return self.rate_limited(request_id, "tenant", wait);
        }
        let table = self
            .click_table
            .get_or_insert_with(|| self.shared.clicks.table(tenant));
        if let Err(error) = self.shared.clicks.absorb(table, checked) {
            if error.code != ErrorCode::Busy {
                // One counter name too many for the tenant: `invalid`, a protocol error.
                return self.protocol_error(request_id, error.code, error.message);
            }
            let retry = Some(self.shared.config.clicks.flush_interval_ms);
            self.error(request_id, error.code, error.message, retry);
            return Flow::Continue;
        }
        metrics::counter!(m::CLICKS_RECEIVED_TOTAL).increment(total);
        self.last_click_seq = Some(request_id);
        if self.shared.config.clicks.strict {
            self.strict_acks
                .push_back((request_id, self.shared.clicks.generation() + 1));
        } else {
            self.click_ack = Some(request_id);
        }
        Flow::Continue
    }

    /// Checks a transaction's envelope: size, decoding, chain, tenant, expiry. Signatures and
    /// permission are checked by the callers.
    fn check_envelope(
        &mut self,
        tenant: TenantId,
        request_id: u64,
        tx: &Transaction,
    ) -> Result<TxPayload, Flow> {
        if tx.payload.len() > TX_PAYLOAD_BYTES_MAX || tx.signatures.len() > TX_SIGNATURES_MAX {
            return Err(self.protocol_error(
                request_id,
                ErrorCode::TooLarge,
                "payload or signatures over the limit",
            ));
        }
        let payload = match tx.decode_payload() {
            Ok(payload) => payload,
            Err(error) => {
                return Err(self.protocol_error(request_id, ErrorCode::Malformed, error.to_string()))
            }
        };
        if payload.chain_id != self.shared.chain_id {
            return Err(self.protocol_error(request_id, ErrorCode::Invalid, "wrong chain id"));
        }
        if payload.tenant != tenant {
            self.error(
                request_id,
                ErrorCode::WrongTenant,
                "the transaction is for another tenant",
                None,
            );
            return Err(Flow::Continue);
        }
        let head = self.shared.view.height();
        if expired_at(payload.expires_at, head) {
            self.error(request_id, ErrorCode::Expired, "expires_at has passed", None);
            return Err(Flow::Continue);
        }
        if payload.expires_at > head + 1 + EXPIRY_HORIZON_BLOCKS_MAX {
            return Err(self.protocol_error(
                request_id,
                ErrorCode::Invalid,
                "expires_at beyond the deduplication window",
            ));
        }
        Ok(payload)
    }

    fn signatures_valid(tx: &Transaction) -> bool {
        !tx.signatures.is_empty() && hoard_types::tx::verify_transactions(std::slice::from_ref(tx))[0]
    }

    fn on_submit(
        &mut self,
        tenant: TenantId,
        role: Role,
        player: Option<PublicKey>,
        request_id: u64,
        tx: Transaction,
    ) -> Flow {
        let payload = match self.check_envelope(tenant, request_id, &tx) {
            Ok(payload) => payload,
            Err(flow) => return flow,
        };
        match role {
            Role::Studio => {
                if matches!(payload.body, TxBody::RegisterTenant { .. }) {
                    return self.forbidden(request_id, "tenants are registered by the operator");
                }
            }
            Role::Player => {
                let me = player.expect("players have an account");
                let own = match &payload.body {
                    TxBody::Transfer { from, .. } | TxBody::Burn { from, .. } => *from == me,
                    TxBody::Split { owner, .. } | TxBody::Merge { owner, .. } => *owner == me,
                    _ => false,
                };
                if !own {
                    return self.forbidden(
                        request_id,
                        "a player may submit only transfers, burns, splits and merges of its own assets (trades: offer/accept)",
                    );
                }
                if tx.signatures.len() != 1 || tx.signatures[0].signer != me {
                    return self.forbidden(
                        request_id,
                        "a player's transaction must be signed by the player alone",
                    );
                }
            }
        }
        if !Self::signatures_valid(&tx) {
            self.error(
                request_id,
                ErrorCode::BadSignature,
                "a transaction signature does not verify",
                None,
            );
            return Flow::Continue;
        }
        self.submit(tenant, request_id, &tx, &payload)
    }

    fn submit(&mut self, tenant: TenantId, request_id: u64, tx: &Transaction, payload: &TxPayload) -> Flow {
        self.submit_then(tenant, request_id, tx, payload, None);
        Flow::Continue
    }

    /// Submits; `durable` (if given) hears `Ok` once the event is durable (at once when it is
    /// already), an error or a drop otherwise. Returns whether the event is durable already
    /// (`Some(true)`), queued (`Some(false)`), or refused (`None`; the error answer is queued).
    fn submit_then(
        &mut self,
        tenant: TenantId,
        request_id: u64,
        tx: &Transaction,
        payload: &TxPayload,
        durable: Option<oneshot::Sender<Result<(), ErrorCode>>>,
    ) -> Option<bool> {
        if self.handle.in_flight.load(Ordering::Relaxed) >= EVENTS_IN_FLIGHT_PER_CONNECTION_MAX {
            metrics::counter!(m::BUSY_TOTAL, "reason" => "connection_in_flight").increment(1);
            let retry = self.shared.config.events.busy_retry_after_ms;
            self.error(
                request_id,
                ErrorCode::Busy,
                "too many events in flight on this connection",
                Some(retry),
            );
            return None;
        }
        let kind = crate::view::kind_of(&payload.body);
        let origin = Origin::Connection {
            conn: self.id,
            request_id,
            durable,
        };
        match self
            .shared
            .events
            .submit(tenant, payload.event_id, tx, kind, origin)
        {
            Ok(Submitted::Queued) => Some(false),
            Ok(Submitted::AlreadyInFlight) => {
                self.replies.push(ServerMessage::Accepted {
                    request_id,
                    event_id: payload.event_id,
                });
                Some(true)
            }
            Ok(Submitted::AlreadyCommitted { height, outcome }) => {
                self.replies.push(ServerMessage::Accepted {
                    request_id,
                    event_id: payload.event_id,
                });
                self.replies
                    .push(commit_message(payload.event_id, height, &outcome));
                Some(true)
            }
            Err(refused) => {
                self.error(request_id, refused.code, refused.message, refused.retry_after_ms);
                None
            }
        }
    }

    fn on_offer(
        &mut self,
        tenant: TenantId,
        player: Option<PublicKey>,
        request_id: u64,
        mut tx: Transaction,
        ttl_ms: u64,
    ) -> Flow {
        let Some(me) = player else {
            return self.forbidden(request_id, "offers are made by players");
        };
        if ttl_ms == 0 || ttl_ms > OFFER_TTL_MS_MAX {
            return self.protocol_error(request_id, ErrorCode::Invalid, "ttl_ms out of range");
        }
        let payload = match self.check_envelope(tenant, request_id, &tx) {
            Ok(payload) => payload,
            Err(flow) => return flow,
        };
        let TxBody::Swap { left, right } = &payload.body else {
            return self.protocol_error(request_id, ErrorCode::Invalid, "an offer is a swap transaction");
        };
        if left.account != me {
            return self.forbidden(request_id, "the maker must be the swap's left side");
        }
        if right.account == me {
            return self.protocol_error(
                request_id,
                ErrorCode::Invalid,
                "a player cannot trade with itself",
            );
        }
        match self.shared.view.read(|l| l.account(tenant, &me)) {
            None => {
                self.error(
                    request_id,
                    ErrorCode::NotFound,
                    "the maker's account is not registered",
                    None,
                );
                return Flow::Continue;
            }
            Some(Custody::SelfCustody) => {
                if tx.signatures.len() != 1 || tx.signatures[0].signer != me {
                    return self.forbidden(request_id, "the offer must carry the maker's signature alone");
                }
                if !Self::signatures_valid(&tx) {
                    self.error(
                        request_id,
                        ErrorCode::BadSignature,
                        "the maker's signature does not verify",
                        None,
                    );
                    return Flow::Continue;
                }
            }
            Some(Custody::Custodial) => {
                let Some(studio) = self.shared.studio_keys.get(&tenant) else {
                    return self.forbidden(request_id, "custodial trades need the studio key at the gateway");
                };
                tx.signatures = vec![TxSignature {
                    signer: studio.public(),
                    signature: studio.sign(TX_SIGNING_DOMAIN, &tx.payload),
                }];
            }
        }
        if self
            .shared
            .view
            .read(|l| l.event(tenant, &payload.event_id).is_some())
        {
            self.error(
                request_id,
                ErrorCode::Replay,
                "this event id was already used",
                None,
            );
            return Flow::Continue;
        }
        let offer = OfferInfo {
            offer_id: payload.event_id,
            maker: me,
            taker: right.account,
            tx,
            expires_unix_ms: now_unix_ms() + ttl_ms,
        };
        match self.shared.offers.open(tenant, offer.clone()) {
            Ok(()) => {}
            Err(crate::offers::OpenError::TooMany) => {
                metrics::counter!(m::BUSY_TOTAL, "reason" => "offers").increment(1);
                self.error(request_id, ErrorCode::Busy, "too many open offers", Some(1_000));
                return Flow::Continue;
            }
            Err(crate::offers::OpenError::Exists) => {
                self.error(
                    request_id,
                    ErrorCode::Replay,
                    "an open offer already has this id",
                    None,
                );
                return Flow::Continue;
            }
        }
        self.shared.hub.push_player(
            tenant,
            &offer.taker,
            &ServerMessage::OfferReceived { offer: offer.clone() },
        );
        self.replies
            .push(ServerMessage::OfferOpened { request_id, offer });
        Flow::Continue
    }

    fn on_accept(
        &mut self,
        tenant: TenantId,
        player: Option<PublicKey>,
        request_id: u64,
        offer_id: hoard_types::EventId,
        signature: Option<hoard_types::Signature>,
    ) -> Flow {
        let Some(me) = player else {
            return self.forbidden(request_id, "offers are accepted by players");
        };
        let Some(offer) = self.shared.offers.get(tenant, &offer_id) else {
            self.error(request_id, ErrorCode::NotFound, "no such open offer", None);
            return Flow::Continue;
        };
        if offer.taker != me {
            return self.forbidden(request_id, "only the taker may accept");
        }
        let Ok(payload) = offer.tx.decode_payload() else {
            return self.protocol_error(request_id, ErrorCode::Malformed, "offer payload");
        };
        // The swap's `expires_at` was checked when the offer opened; blocks committed since may
        // have passed it. Such a swap can never apply: refuse it as `submit` would, and close the
        // offer for both parties (the sweeper closes only offers whose `ttl_ms` ran out).
        if expired_at(payload.expires_at, self.shared.view.height()) {
            self.error(
                request_id,
                ErrorCode::Expired,
                "the swap's expires_at has passed",
                None,
            );
            if let Some(offer) = self.shared.offers.remove(tenant, &offer_id) {
                tracing::debug!(tenant = tenant.0, offer_id = %offer_id, "offer closed: its swap expired");
                self.close_offer(tenant, &offer, OfferCloseReason::Expired);
            }
            return Flow::Continue;
        }
        let mut tx = offer.tx.clone();
        match self.shared.view.read(|l| l.account(tenant, &me)) {
            None => {
                self.error(
                    request_id,
                    ErrorCode::NotFound,
                    "the taker's account is not registered",
                    None,
                );
                return Flow::Continue;
            }
            Some(Custody::SelfCustody) => {
                let Some(signature) = signature else {
                    return self.protocol_error(
                        request_id,
                        ErrorCode::Invalid,
                        "a self-custody taker must sign",
                    );
                };
                if me.verify(TX_SIGNING_DOMAIN, &tx.payload, &signature).is_err() {
                    self.error(
                        request_id,
                        ErrorCode::BadSignature,
                        "the taker's signature does not verify",
                        None,
                    );
                    return Flow::Continue;
                }
                tx.signatures.push(TxSignature {
                    signer: me,
                    signature,
                });
            }
            Some(Custody::Custodial) => {
                let Some(studio) = self.shared.studio_keys.get(&tenant) else {
                    return self.forbidden(request_id, "custodial trades need the studio key at the gateway");
                };
                if !tx.signatures.iter().any(|s| s.signer == studio.public()) {
                    tx.signatures.push(TxSignature {
                        signer: studio.public(),
                        signature: studio.sign(TX_SIGNING_DOMAIN, &tx.payload),
                    });
                }
            }
        }
        if self.shared.offers.remove(tenant, &offer_id).is_none() {
            self.error(request_id, ErrorCode::NotFound, "the offer just closed", None);
            return Flow::Continue;
        }
        // The offer is out of the book (no second accept), but closed as `accepted` only once
        // the swap is durable: if the stream write fails, the offer opens again for another try.
        let (durable, durable_rx) = oneshot::channel();
        match self.submit_then(tenant, request_id, &tx, &payload, Some(durable)) {
            None => {
                let _ = self.shared.offers.open(tenant, offer);
            }
            Some(true) => self.close_offer(tenant, &offer, OfferCloseReason::Accepted),
            Some(false) => {
                let shared = self.shared.clone();
                tokio::spawn(async move {
                    if let Ok(Ok(())) = durable_rx.await {
                        close_offer_everywhere(&shared, tenant, &offer, OfferCloseReason::Accepted);
                    } else {
                        let _ = shared.offers.open(tenant, offer);
                    }
                });
            }
        }
        Flow::Continue
    }

    fn close_offer(&mut self, tenant: TenantId, offer: &OfferInfo, reason: OfferCloseReason) {
        close_offer_everywhere(&self.shared, tenant, offer, reason);
    }
}

/// Whether a transaction whose last height is `expires_at` has expired at committed height
/// `head`: the earliest block that could still take it is `head + 1`. The gateway's one rule for
/// `expired` (`submit` and `offer` through `check_envelope`, and `accept`).
fn expired_at(expires_at: u64, head: u64) -> bool {
    expires_at <= head
}

/// Tells maker and taker (every connection of each) that an offer closed.
pub fn close_offer_everywhere(
    shared: &Shared,
    tenant: TenantId,
    offer: &OfferInfo,
    reason: OfferCloseReason,
) {
    let label = match reason {
        OfferCloseReason::Accepted => "accepted",
        OfferCloseReason::Cancelled => "cancelled",
        OfferCloseReason::Expired => "expired",
    };
    metrics::counter!(m::OFFERS_CLOSED_TOTAL, "reason" => label).increment(1);
    let message = ServerMessage::OfferClosed {
        offer_id: offer.offer_id,
        reason,
    };
    shared.hub.push_player(tenant, &offer.maker, &message);
    shared.hub.push_player(tenant, &offer.taker, &message);
}

/// `Option<&T>` helper: true when `self` is None or differs from `other`.
trait NoneOrNot<T> {
    fn is_none_or_not(&self, other: Option<&T>) -> bool;
}

impl<T: PartialEq> NoneOrNot<T> for Option<T> {
    fn is_none_or_not(&self, other: Option<&T>) -> bool {
        match self {
            None => true,
            Some(value) => Some(value) != other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transaction_expires_once_the_head_reaches_its_expires_at() {
        assert!(!expired_at(11, 10), "may still apply in block 11");
        assert!(expired_at(10, 10), "block 10 is committed: the next is 11");
        assert!(expired_at(0, 0));
        assert!(expired_at(9, 10));
    }
}
