//! The background connection task: one per client, owning the WebSocket and every table of
//! outstanding work. Client handles talk to it over a bounded command channel; a reader task
//! decodes incoming frames and forwards them over a bounded channel.
//!
//! Reliability lives here:
//! - every asset event stays in `events` (with its encoded, signed frame) until it committed, was
//!   rejected, expired or was refused for good; after a reconnect each one is sent again with the
//!   same bytes (the ledger deduplicates by event id, so it takes effect once);
//! - accepted events not committed after `status_poll_after`, and events whose fate is unclear
//!   (an `expired` refusal, an accept after a reconnect) are checked with `event_status`;
//! - an event past its expiry whose status is `unknown` resolves with `Expired` only if no
//!   gateway can have taken it (never accepted, and every send refused); otherwise with
//!   `OutcomeUnknown`, as the ledger forgets event ids after their expiry;
//! - `busy`, `rate_limited` and `unavailable` refusals are retried after `retry_after_ms`;
//! - subscriptions are re-established with `from_height` = the last height delivered, and
//!   duplicates of that height are dropped;
//! - replayable requests (reads) are sent again; the others fail with `ConnectionLost`;
//! - `close` refuses new work, sends every buffered click and keeps serving (reconnecting if need
//!   be) until every click it holds is acknowledged or dropped, or `close_flush_timeout` passes;
//!   then it reports the clicks left unacknowledged.
//!
//! Nothing here blocks on a lock across an await: the only shared lock is the click buffer's,
//! taken briefly and synchronously.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use hoard_types::wire::{
    decode_server, encode, sign_auth, ClientMessage, ErrorCode, EventState, Limits, OfferCloseReason,
    ServerMessage, PROTOCOL_VERSION,
};
use hoard_types::{EventId, Outcome, PublicKey};
use tokio::net::TcpStream;
use tokio::sync::{broadcast, mpsc, oneshot, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tracing::{debug, info, warn};

use crate::clicks::{clicks_frame, ClickBatch, ClickBuffer};
use crate::error::{Error, Result};
use crate::model::{Activity, Committed, OfferUpdate, Session};
use crate::options::{ClickDelivery, ClientOptions, ConnectionState, Credentials};
use crate::subscription::{Dedup, SubscriptionEnd};

/// Capacity of the command channel from client handles to the task.
pub(crate) const COMMAND_CHANNEL_CAPACITY: usize = 1024;
/// Capacity of the channel of decoded frames from the reader task.
const INCOMING_CHANNEL_CAPACITY: usize = 1024;
/// Most messages handled before the task writes what they produced.
const MESSAGES_PER_TURN_MAX: usize = 256;
/// How often timers (timeouts, delayed resends, status polls, head refresh) are checked.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_millis(25);
/// Least time between two `event_status` checks of one event.
const STATUS_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Most `event_status` checks sent per housekeeping turn.
const STATUS_POLLS_PER_TURN_MAX: usize = 64;
/// Wait before resending after a retryable refusal without `retry_after_ms`.
const RETRY_AFTER_DEFAULT: Duration = Duration::from_millis(100);
/// Longest wait honoured from a `retry_after_ms`.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(30);
/// Largest incoming message the client accepts.
const INCOMING_MESSAGE_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Capacity of the offer-update broadcast.
pub(crate) const OFFER_UPDATES_CAPACITY: usize = 256;
/// The close's wait for clicks when `close_flush_timeout` is too large to add to an `Instant`.
const CLOSE_FLUSH_TIMEOUT_MAX: Duration = Duration::from_secs(365 * 24 * 3600);
/// Longest wait to hand the close frame to a gateway that does not read.
const CLOSE_FRAME_TIMEOUT: Duration = Duration::from_secs(1);
/// `Core::head_read_at_ms` before the head was first read.
const HEAD_NEVER_READ: u64 = u64::MAX;

type WsStream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What client handles and the task share.
pub(crate) struct Core {
    pub(crate) options: ClientOptions,
    pub(crate) credentials: Credentials,
    pub(crate) url: String,
    pub(crate) clicks: Mutex<ClickBuffer>,
    pub(crate) click_notify: Notify,
    pub(crate) permits: Arc<Semaphore>,
    pub(crate) state: watch::Sender<ConnectionState>,
    pub(crate) session: OnceLock<Session>,
    pub(crate) head: AtomicU64,
    /// Set when a close begins (or the task stops): `click` is refused from then on. Written and,
    /// by `click`, read under the click buffer's lock, so that every click is either counted by
    /// the close or refused.
    pub(crate) closed: AtomicBool,
    /// Clicks not acknowledged when the task stopped (set once, then).
    pub(crate) unacknowledged_at_close: OnceLock<u64>,
    /// Successful reconnects so far.
    pub(crate) reconnects: AtomicU64,
    /// Created on the first `offer_updates()` (most clients never ask: no buffer for them).
    pub(crate) offer_updates: OnceLock<broadcast::Sender<OfferUpdate>>,
    /// When the head was last read from the gateway (milliseconds since `epoch`);
    /// [`HEAD_NEVER_READ`] until the first read.
    head_read_at_ms: AtomicU64,
    epoch: std::time::Instant,
    next_request_id: AtomicU64,
}

impl Core {
    pub(crate) fn new(options: ClientOptions, credentials: Credentials, url: String) -> Core {
        let clicks = ClickBuffer::new(
            options.click_frames_buffered_max,
            hoard_types::wire::CLICKS_PER_FRAME_MAX,
        );
        let permits = Arc::new(Semaphore::new(options.max_in_flight_events));
        Core {
            options,
            credentials,
            url,
            clicks: Mutex::new(clicks),
            click_notify: Notify::new(),
            permits,
            state: watch::channel(ConnectionState::Disconnected).0,
            session: OnceLock::new(),
            head: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            unacknowledged_at_close: OnceLock::new(),
            reconnects: AtomicU64::new(0),
            offer_updates: OnceLock::new(),
            head_read_at_ms: AtomicU64::new(HEAD_NEVER_READ),
            epoch: std::time::Instant::now(),
            next_request_id: AtomicU64::new(1),
        }
    }

    /// Records a head read from the gateway.
    pub(crate) fn head_read(&self, height: u64) {
        self.head.fetch_max(height, Ordering::Relaxed);
        self.head_read_at_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// How long ago the head was last read from the gateway ([`Duration::MAX`] if it never was:
    /// the initial head of 0 is a placeholder, never a height to compute an expiry from).
    pub(crate) fn head_age(&self) -> Duration {
        let read_at = self.head_read_at_ms.load(Ordering::Relaxed);
        if read_at == HEAD_NEVER_READ {
            return Duration::MAX;
        }
        let now = self.epoch.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(read_at))
    }

    /// The offer-update broadcast, created on first use.
    pub(crate) fn offer_updates(&self) -> &broadcast::Sender<OfferUpdate> {
        self.offer_updates
            .get_or_init(|| broadcast::channel(OFFER_UPDATES_CAPACITY).0)
    }

    pub(crate) fn next_request_id(&self) -> u64 {
        self.next_request_id.fetch_add(1, Ordering::Relaxed)
    }

    /// What `close` answers once the task has stopped: `ClicksUnacknowledged` if it stopped with
    /// clicks not acknowledged.
    pub(crate) fn close_result(&self) -> Result<()> {
        match self.unacknowledged_at_close.get() {
            Some(&clicks) if clicks > 0 => Err(Error::ClicksUnacknowledged { clicks }),
            _ => Ok(()),
        }
    }
}

/// A request from a client handle to the task.
/// Large variants are boxed: the channel allocates its first block of slots up front, and a
/// client per simulated player must stay small.
pub(crate) enum Command {
    Request(Box<Request>),
    Submit(Box<Submission>),
    Subscribe(Box<SubscribeCommand>),
    FlushClicks(oneshot::Sender<Result<()>>),
    Close(oneshot::Sender<Result<()>>),
}

/// A read or control request; answered by the message carrying its request id.
pub(crate) struct Request {
    pub(crate) request_id: u64,
    pub(crate) frame: Bytes,
    /// Whether it may be sent again after a reconnect (reads, idempotent requests).
    pub(crate) replay: bool,
    /// For `cancel`: the answer is `offer_closed` for this offer.
    pub(crate) offer_id: Option<EventId>,
    pub(crate) reply: oneshot::Sender<Result<ServerMessage>>,
}

/// How an event reaches the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EventKind {
    /// A signed transaction in a `submit`.
    Submit,
    /// An `accept` of an offer: the gateway builds and submits the swap.
    Accept,
}

/// An asset event handed to the task.
pub(crate) struct Submission {
    pub(crate) event_id: EventId,
    pub(crate) request_id: u64,
    pub(crate) frame: Bytes,
    pub(crate) kind: EventKind,
    pub(crate) expires_at: u64,
    pub(crate) permit: OwnedSemaphorePermit,
    pub(crate) accepted: oneshot::Sender<Result<()>>,
    pub(crate) committed: oneshot::Sender<Result<Committed>>,
}

pub(crate) struct SubscribeCommand {
    pub(crate) local_id: u64,
    pub(crate) account: Option<PublicKey>,
    pub(crate) from_height: Option<u64>,
    pub(crate) sender: mpsc::Sender<Activity>,
    pub(crate) end: Arc<SubscriptionEnd>,
    pub(crate) reply: oneshot::Sender<Result<()>>,
}

/// What a request id in flight stands for.
enum Pending {
    External(ExternalRequest),
    Head,
    EventStatus(EventId),
    Event(EventId),
    Subscribe(u64),
    Unsubscribe,
}

struct ExternalRequest {
    frame: Bytes,
    replay: bool,
    offer_id: Option<EventId>,
    deadline: Instant,
    sent: bool,
    resend_at: Option<Instant>,
    reply: oneshot::Sender<Result<ServerMessage>>,
}

struct EventEntry {
    request_id: u64,
    frame: Bytes,
    kind: EventKind,
    expires_at: u64,
    accepted: Option<oneshot::Sender<Result<()>>>,
    committed: Option<oneshot::Sender<Result<Committed>>>,
    _permit: OwnedSemaphorePermit,
    /// Sent on the current connection (and not refused since).
    sent: bool,
    /// Accepted on the current connection at this time.
    accepted_at: Option<Instant>,
    ever_accepted: bool,
    /// A gateway may have taken it: it was accepted, or it was sent and the connection broke
    /// before any answer. Once set, an expiry can no longer prove that it never applied (the
    /// ledger forgets event ids after their expiry), so it resolves with `OutcomeUnknown`.
    maybe_applied: bool,
    resend_at: Option<Instant>,
    needs_status: bool,
    status_in_flight: bool,
    last_status_query: Option<Instant>,
    /// The gateway said `expired`.
    expired_refusal: bool,
    /// The gateway said `not_found` to an accept.
    accept_refused: bool,
}

/// A `flush_clicks` waiting for the acknowledgement of every clicks frame up to `sequence`.
struct ClickWaiter {
    sequence: u64,
    /// Failed with `Timeout` when no answer settled it by then (`request_timeout`).
    deadline: Instant,
    reply: oneshot::Sender<Result<()>>,
}

/// A close in progress: waiting for the clicks held when it began to be acknowledged.
struct Closing {
    /// Every `close` waiting for the end.
    replies: Vec<oneshot::Sender<Result<()>>>,
    /// When the close stops waiting (`close_flush_timeout` after it began).
    deadline: Instant,
    /// Clicks held when the close began (buffered, or sent and not acknowledged).
    clicks: u64,
    /// Of those, acknowledged since.
    acknowledged: u64,
}

struct SubscriptionEntry {
    account: Option<PublicKey>,
    from_height: Option<u64>,
    sender: mpsc::Sender<Activity>,
    end: Arc<SubscriptionEnd>,
    server_id: Option<u64>,
    dedup: Dedup,
    reply: Option<oneshot::Sender<Result<()>>>,
    /// A resume was refused temporarily (`busy`, `rate_limited`, ...): send it again then.
    resubscribe_at: Option<Instant>,
}

impl SubscriptionEntry {
    fn resume_height(&self) -> Option<u64> {
        self.dedup.last_height().or(self.from_height)
    }
}

/// One open, authenticated connection.
pub(crate) struct Connection {
    sink: SplitSink<WsStream, Message>,
    incoming: mpsc::Receiver<Incoming>,
    reader: JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

enum Incoming {
    Message(Box<ServerMessage>),
    Closed(String),
}

/// The result of a successful connection attempt.
pub(crate) struct Opened {
    pub(crate) connection: Connection,
    pub(crate) session: Session,
    pub(crate) head: u64,
    pub(crate) limits: Limits,
}

fn map_ws_error(error: tungstenite::Error, url: &str) -> Error {
    match error {
        tungstenite::Error::Url(tungstenite::error::UrlError::TlsFeatureNotEnabled) => Error::TlsUnsupported,
        tungstenite::Error::Url(_) => Error::InvalidUrl {
            url: url.to_owned(),
            reason: "not a usable WebSocket URL",
        },
        other => Error::Connection(other.to_string()),
    }
}

async fn next_message(stream: &mut SplitStream<WsStream>) -> Result<ServerMessage> {
    loop {
        match stream.next().await {
            Some(Ok(Message::Binary(bytes))) => {
                return decode_server(&bytes).map_err(|error| Error::Protocol(error.to_string()))
            }
            Some(Ok(Message::Close(frame))) => {
                return Err(Error::Connection(match frame {
                    Some(frame) => format!(
                        "closed by the gateway: {} {}",
                        u16::from(frame.code),
                        frame.reason
                    ),
                    None => "closed by the gateway".to_owned(),
                }))
            }
            Some(Ok(Message::Text(_))) => return Err(Error::Protocol("a text frame".to_owned())),
            Some(Ok(_)) => continue,
            Some(Err(error)) => return Err(Error::Connection(error.to_string())),
            None => return Err(Error::Connection("the connection ended".to_owned())),
        }
    }
}

/// Connects, reads `hello`, authenticates and reads the chain head. Bounded by `connect_timeout`.
pub(crate) async fn open(core: &Core) -> Result<Opened> {
    let timeout = core.options.connect_timeout;
    match tokio::time::timeout(timeout, open_unbounded(core)).await {
        Ok(result) => result,
        Err(_) => Err(Error::Timeout(timeout)),
    }
}

async fn open_unbounded(core: &Core) -> Result<Opened> {
    let config = WebSocketConfig::default()
        .read_buffer_size(core.options.read_buffer_bytes)
        .max_message_size(Some(INCOMING_MESSAGE_BYTES_MAX))
        .max_frame_size(Some(INCOMING_MESSAGE_BYTES_MAX));
    let (socket, _response) =
        tokio_tungstenite::connect_async_with_config(core.url.as_str(), Some(config), true)
            .await
            .map_err(|error| map_ws_error(error, &core.url))?;
    let (mut sink, mut stream) = socket.split();
    let ServerMessage::Hello {
        protocol_version,
        chain_id,
        challenge,
        limits,
    } = next_message(&mut stream).await?
    else {
        return Err(Error::Protocol("the first message is not hello".to_owned()));
    };
    if protocol_version != PROTOCOL_VERSION {
        return Err(Error::Protocol(format!(
            "the gateway speaks protocol {protocol_version}, this SDK {PROTOCOL_VERSION}"
        )));
    }
    let auth_id = core.next_request_id();
    let auth = match &core.credentials {
        Credentials::Studio { tenant, key } => ClientMessage::AuthStudio {
            request_id: auth_id,
            tenant: *tenant,
            signature: sign_auth(key, &challenge.0, *tenant),
        },
        Credentials::Player { token, .. } => ClientMessage::AuthPlayer {
            request_id: auth_id,
            token: token.clone(),
        },
    };
    let send = |message: &ClientMessage| Message::Binary(Bytes::from(encode(message)));
    sink.send(send(&auth))
        .await
        .map_err(|error| Error::Connection(error.to_string()))?;
    let session = match next_message(&mut stream).await? {
        ServerMessage::Authenticated {
            tenant,
            role,
            account,
            custody,
            ..
        } => Session {
            chain_id,
            tenant,
            role,
            account,
            custody,
        },
        ServerMessage::Error { code, message, .. } if !code.is_retryable() => {
            return Err(Error::AuthRefused { code, message })
        }
        ServerMessage::Error {
            code,
            message,
            retry_after_ms,
            ..
        } => return Err(Error::server(code, message, retry_after_ms)),
        other => return Err(Error::Protocol(format!("expected authenticated, got {other:?}"))),
    };
    let head_id = core.next_request_id();
    sink.send(send(&ClientMessage::Head { request_id: head_id }))
        .await
        .map_err(|error| Error::Connection(error.to_string()))?;
    let head = loop {
        match next_message(&mut stream).await? {
            ServerMessage::Head {
                request_id, height, ..
            } if request_id == head_id => break height,
            ServerMessage::Error {
                request_id,
                code,
                message,
                retry_after_ms,
            } if request_id == head_id => return Err(Error::server(code, message, retry_after_ms)),
            other => debug!(?other, "message before the head answer"),
        }
    };
    let (sender, incoming) = mpsc::channel(INCOMING_CHANNEL_CAPACITY);
    let reader = tokio::spawn(read_loop(stream, sender));
    Ok(Opened {
        connection: Connection {
            sink,
            incoming,
            reader,
        },
        session,
        head,
        limits,
    })
}

/// Decodes frames off the socket (in its own task, so decoding runs beside the main loop).
async fn read_loop(mut stream: SplitStream<WsStream>, sender: mpsc::Sender<Incoming>) {
    loop {
        let incoming = match stream.next().await {
            Some(Ok(Message::Binary(bytes))) => match decode_server(&bytes) {
                Ok(message) => Incoming::Message(Box::new(message)),
                Err(error) => {
                    warn!(%error, "undecodable message from the gateway, skipped");
                    continue;
                }
            },
            Some(Ok(Message::Close(frame))) => Incoming::Closed(match frame {
                Some(frame) => format!(
                    "closed by the gateway: {} {}",
                    u16::from(frame.code),
                    frame.reason
                ),
                None => "closed by the gateway".to_owned(),
            }),
            Some(Ok(_)) => continue,
            Some(Err(error)) => Incoming::Closed(error.to_string()),
            None => Incoming::Closed("the connection ended".to_owned()),
        };
        let last = matches!(incoming, Incoming::Closed(_));
        if sender.send(incoming).await.is_err() || last {
            return;
        }
    }
}

/// Why the connected phase ended.
enum End {
    Closed,
    Broken(String),
}

/// The background task.
pub(crate) struct Task {
    core: Arc<Core>,
    commands: mpsc::Receiver<Command>,
    commands_closed: bool,
    unsubscribes: mpsc::UnboundedReceiver<u64>,
    pending: HashMap<u64, Pending>,
    events: HashMap<EventId, EventEntry>,
    subscriptions: HashMap<u64, SubscriptionEntry>,
    server_subscriptions: HashMap<u64, u64>,
    offer_waiters: HashMap<EventId, u64>,
    clicks_unacked: VecDeque<(u64, ClickBatch)>,
    click_waiters: Vec<ClickWaiter>,
    clicks_paused_until: Option<Instant>,
    click_scratch: Vec<ClickBatch>,
    click_scratch_bodies: Vec<Vec<u8>>,
    outbox: Vec<Message>,
    connected: bool,
    closing: Option<Closing>,
    last_head_refresh: Instant,
    limits_applied: bool,
}

impl Task {
    pub(crate) fn new(
        core: Arc<Core>,
        commands: mpsc::Receiver<Command>,
        unsubscribes: mpsc::UnboundedReceiver<u64>,
    ) -> Task {
        Task {
            core,
            commands,
            commands_closed: false,
            unsubscribes,
            pending: HashMap::new(),
            events: HashMap::new(),
            subscriptions: HashMap::new(),
            server_subscriptions: HashMap::new(),
            offer_waiters: HashMap::new(),
            clicks_unacked: VecDeque::new(),
            click_waiters: Vec::new(),
            clicks_paused_until: None,
            click_scratch: Vec::new(),
            click_scratch_bodies: Vec::new(),
            outbox: Vec::new(),
            connected: false,
            closing: None,
            last_head_refresh: Instant::now(),
            limits_applied: false,
        }
    }

    /// Runs until the client is closed or gives up reconnecting.
    pub(crate) async fn run(mut self, first: Opened) {
        let mut opened = Some(first);
        let mut attempt = 0u32;
        loop {
            if let Some(Opened {
                connection,
                head,
                limits,
                session,
            }) = opened.take()
            {
                attempt = 0;
                if let Some(first) = self.core.session.get() {
                    if first.chain_id != session.chain_id {
                        warn!(
                            first = first.chain_id,
                            now = session.chain_id,
                            "the gateway now serves another chain"
                        );
                    }
                }
                self.on_connected(head, &limits);
                match self.serve(connection).await {
                    End::Closed => break,
                    End::Broken(reason) => {
                        info!(%reason, "connection to the gateway lost; reconnecting");
                        self.on_disconnected();
                    }
                }
            }
            if self.should_exit() {
                break;
            }
            attempt = attempt.saturating_add(1);
            let policy = self.core.options.reconnect;
            if policy.max_attempts.is_some_and(|max| attempt > max) {
                warn!(attempts = attempt - 1, "giving up reconnecting");
                break;
            }
            self.core
                .state
                .send_replace(ConnectionState::Reconnecting { attempt });
            let delay = policy.delay(attempt, rand::random::<f64>());
            match self.wait_offline(delay).await {
                None => break,
                Some(Ok(next)) => {
                    self.core.reconnects.fetch_add(1, Ordering::Relaxed);
                    opened = Some(next);
                }
                Some(Err(error)) if matches!(error, Error::AuthRefused { .. }) => {
                    warn!(%error, "the gateway refused the credentials; closing");
                    self.shutdown(error);
                    return;
                }
                Some(Err(error)) => debug!(%error, attempt, "reconnect attempt failed"),
            }
        }
        self.shutdown(Error::Closed);
    }

    /// Whether the task stops now: on a close, once no click it waits for is left (each was
    /// acknowledged or dropped) or its deadline passed; without one, once every handle is dropped
    /// and no event is in flight (clicks are not waited for then: those held are lost).
    fn should_exit(&self) -> bool {
        match &self.closing {
            Some(closing) => !self.holds_clicks() || Instant::now() >= closing.deadline,
            None => self.commands_closed && self.events.is_empty(),
        }
    }

    /// Whether a click is buffered or waits for its acknowledgement.
    fn holds_clicks(&self) -> bool {
        !self.clicks_unacked.is_empty() || !self.core.clicks.lock().expect("click buffer lock").is_empty()
    }

    /// Waits `delay`, then tries to connect, while still taking commands (queued until connected).
    async fn wait_offline(&mut self, delay: Duration) -> Option<Result<Opened>> {
        let core = self.core.clone();
        let attempt = async move {
            tokio::time::sleep(delay).await;
            open(&core).await
        };
        tokio::pin!(attempt);
        let mut housekeeping = tokio::time::interval(HOUSEKEEPING_INTERVAL);
        housekeeping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                result = &mut attempt => return Some(result),
                command = self.commands.recv(), if !self.commands_closed => match command {
                    Some(command) => self.on_command(command),
                    None => self.commands_closed = true,
                },
                Some(local_id) = self.unsubscribes.recv() => self.on_unsubscribe(local_id),
                _ = housekeeping.tick() => self.housekeeping(),
            }
            self.outbox.clear();
            if self.should_exit() {
                return None;
            }
        }
    }

    async fn serve(&mut self, mut connection: Connection) -> End {
        // Timers run only while there is something to time: an idle client (a player connection
        // among 100000) costs no wake-ups.
        let click_timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(click_timer);
        let mut click_timer_armed = false;
        let mut housekeeping = tokio::time::interval(HOUSEKEEPING_INTERVAL);
        housekeeping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            if !click_timer_armed && self.has_open_clicks() {
                click_timer
                    .as_mut()
                    .reset(Instant::now() + self.core.options.click_flush_interval);
                click_timer_armed = true;
            }
            if !self.outbox.is_empty() {
                if let Err(reason) = self.write(&mut connection).await {
                    return End::Broken(reason);
                }
            }
            if self.should_exit() {
                let close = connection.sink.send(Message::Close(Some(CloseFrame {
                    code: CloseCode::Normal,
                    reason: "client closed".into(),
                })));
                let _ = tokio::time::timeout(CLOSE_FRAME_TIMEOUT, close).await;
                return End::Closed;
            }
            tokio::select! {
                biased;
                incoming = connection.incoming.recv() => {
                    let mut next = incoming;
                    let mut handled = 0;
                    loop {
                        match next.take() {
                            Some(Incoming::Message(message)) => self.on_message(*message),
                            Some(Incoming::Closed(reason)) => return End::Broken(reason),
                            None => return End::Broken("the reader stopped".to_owned()),
                        }
                        handled += 1;
                        if handled >= MESSAGES_PER_TURN_MAX {
                            break;
                        }
                        match connection.incoming.try_recv() {
                            Ok(incoming) => next = Some(incoming),
                            Err(_) => break,
                        }
                    }
                }
                command = self.commands.recv(), if !self.commands_closed => {
                    let mut next = command;
                    let mut handled = 0;
                    loop {
                        match next.take() {
                            Some(command) => self.on_command(command),
                            None => {
                                self.commands_closed = true;
                                break;
                            }
                        }
                        handled += 1;
                        if handled >= MESSAGES_PER_TURN_MAX {
                            break;
                        }
                        match self.commands.try_recv() {
                            Ok(command) => next = Some(command),
                            Err(_) => break,
                        }
                    }
                }
                Some(local_id) = self.unsubscribes.recv() => self.on_unsubscribe(local_id),
                _ = self.core.click_notify.notified() => self.send_clicks(false),
                _ = &mut click_timer, if click_timer_armed => {
                    click_timer_armed = false;
                    self.send_clicks(true);
                }
                _ = housekeeping.tick(), if self.has_timed_work() => self.housekeeping(),
            }
        }
    }

    /// Whether a click waits in the open batch (or a refused batch waits for its retry).
    fn has_open_clicks(&self) -> bool {
        !self.core.clicks.lock().expect("click buffer lock").is_empty()
    }

    /// Whether anything needs the housekeeping timer: requests with deadlines, events in flight,
    /// paused clicks, click flushes waiting for their acknowledgement, delayed resumes, a close's
    /// deadline.
    fn has_timed_work(&self) -> bool {
        self.closing.is_some()
            || !self.pending.is_empty()
            || !self.events.is_empty()
            || self.clicks_paused_until.is_some()
            || !self.click_waiters.is_empty()
            || self
                .subscriptions
                .values()
                .any(|entry| entry.resubscribe_at.is_some())
    }

    async fn write(&mut self, connection: &mut Connection) -> std::result::Result<(), String> {
        let mut timeout = self.core.options.request_timeout;
        if let Some(closing) = &self.closing {
            // A close is bounded by its deadline, writes included.
            timeout = timeout.min(closing.deadline.saturating_duration_since(Instant::now()));
        }
        let outbox = &mut self.outbox;
        let sink = &mut connection.sink;
        let written = tokio::time::timeout(timeout, async move {
            for message in outbox.drain(..) {
                sink.feed(message).await?;
            }
            sink.flush().await
        })
        .await;
        match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err(format!("writing to the gateway took more than {timeout:?}")),
        }
    }

    fn push(&mut self, frame: &Bytes) {
        self.outbox.push(Message::Binary(frame.clone()));
    }

    fn push_message(&mut self, message: &ClientMessage) {
        self.outbox.push(Message::Binary(Bytes::from(encode(message))));
    }

    // ----- connection lifecycle -----

    fn on_connected(&mut self, head: u64, limits: &Limits) {
        self.connected = true;
        self.core.head_read(head);
        self.last_head_refresh = Instant::now();
        self.clicks_paused_until = None;
        self.core
            .clicks
            .lock()
            .expect("click buffer lock")
            .set_clicks_per_frame(limits.clicks_per_frame_max as usize);
        if !self.limits_applied {
            self.limits_applied = true;
            let announced = limits.events_in_flight_max as usize;
            if announced < self.core.options.max_in_flight_events {
                self.core
                    .permits
                    .forget_permits(self.core.options.max_in_flight_events - announced);
            }
        }
        // Subscriptions first, resuming where each left off.
        let subscriptions: Vec<(u64, Option<PublicKey>, Option<u64>)> = self
            .subscriptions
            .iter_mut()
            .map(|(local_id, entry)| {
                entry.resubscribe_at = None;
                (*local_id, entry.account, entry.resume_height())
            })
            .collect();
        for (local_id, account, from_height) in subscriptions {
            self.send_subscribe(local_id, account, from_height);
        }
        // Then every event not known to be committed, in submission order, with its original bytes.
        let mut events: Vec<(u64, EventId)> = self
            .events
            .iter()
            .map(|(event_id, entry)| (entry.request_id, *event_id))
            .collect();
        events.sort_unstable();
        for (_, event_id) in events {
            let entry = self.events.get_mut(&event_id).expect("listed above");
            if entry.kind == EventKind::Accept && entry.ever_accepted {
                // The swap is the gateway's to resubmit: follow it by its status.
                entry.needs_status = true;
            } else {
                entry.resend_at = None;
                self.send_event(event_id);
            }
        }
        // Then requests made while disconnected and replayable reads.
        let mut requests: Vec<u64> = self
            .pending
            .iter()
            .filter_map(|(request_id, pending)| match pending {
                Pending::External(request) if !request.sent => Some(*request_id),
                _ => None,
            })
            .collect();
        requests.sort_unstable();
        for request_id in requests {
            self.send_external(request_id);
        }
        self.send_clicks(true);
        self.core.state.send_replace(ConnectionState::Connected);
    }

    /// The connection broke: answers to what was sent on it will never come. Keeps only the
    /// external requests sent again after the reconnect (replayable ones, and those not sent yet);
    /// a non-replayable one that was sent fails with `ConnectionLost`. Every internal entry is
    /// dropped, as nobody waits on it: events are sent again (re-registering their request ids),
    /// subscriptions are re-established under new request ids (a caller of `subscribe` keeps
    /// waiting on its `SubscriptionEntry`, bounded by its own timeout), and head reads, status
    /// checks and unsubscribes belong to the old connection (the `status_in_flight` flags are
    /// cleared below, so status checks are sent again).
    fn on_disconnected(&mut self) {
        self.connected = false;
        self.core.state.send_replace(ConnectionState::Disconnected);
        let request_ids: Vec<u64> = self.pending.keys().copied().collect();
        for request_id in request_ids {
            match self.pending.remove(&request_id) {
                Some(Pending::External(mut request)) => {
                    if request.sent && !request.replay {
                        if let Some(offer_id) = request.offer_id {
                            self.offer_waiters.remove(&offer_id);
                        }
                        let _ = request.reply.send(Err(Error::ConnectionLost));
                    } else {
                        request.sent = false;
                        self.pending.insert(request_id, Pending::External(request));
                    }
                }
                Some(Pending::Head)
                | Some(Pending::EventStatus(_))
                | Some(Pending::Event(_))
                | Some(Pending::Subscribe(_))
                | Some(Pending::Unsubscribe)
                | None => {}
            }
        }
        for entry in self.events.values_mut() {
            // Sent and neither refused nor answered: the gateway may have taken it.
            entry.maybe_applied |= entry.sent;
            entry.sent = false;
            entry.accepted_at = None;
            entry.status_in_flight = false;
        }
        self.server_subscriptions.clear();
        for entry in self.subscriptions.values_mut() {
            entry.server_id = None;
        }
        let unacked: Vec<ClickBatch> = self.clicks_unacked.drain(..).map(|(_, batch)| batch).collect();
        {
            let mut buffer = self.core.clicks.lock().expect("click buffer lock");
            buffer.unacked_batches -= unacked.len();
            if self.core.options.click_delivery == ClickDelivery::AtLeastOnce {
                buffer.requeue_front(unacked);
            }
        }
        for waiter in self.click_waiters.drain(..) {
            let _ = waiter.reply.send(Err(Error::ConnectionLost));
        }
    }

    /// Refuses every click from now on (`Client::click` fails with `Closed`) and counts the clicks
    /// held: buffered, or sent and not acknowledged.
    fn stop_clicks(&self) -> u64 {
        let buffered = {
            let buffer = self.core.clicks.lock().expect("click buffer lock");
            self.core.closed.store(true, Ordering::Release);
            buffer.clicks()
        };
        buffered
            + self
                .clicks_unacked
                .iter()
                .map(|(_, batch)| batch.clicks)
                .sum::<u64>()
    }

    /// Fails everything outstanding, marks the client closed (`ConnectionState::Closed` last, once
    /// every operation has failed and the command channel is closed) and answers the `close`
    /// calls with the clicks left unacknowledged: of those held when the close began, or, when
    /// the task stops without one (refused credentials, reconnects given up, every handle
    /// dropped), of those held now. Clicks held are dropped.
    fn shutdown(&mut self, error: Error) {
        self.connected = false;
        let closing = self.closing.take();
        let unacknowledged = match &closing {
            Some(closing) => closing.clicks.saturating_sub(closing.acknowledged),
            None => self.stop_clicks(),
        };
        // Before the command channel closes: a `close` that finds it closed reads it.
        let _ = self.core.unacknowledged_at_close.set(unacknowledged);
        let event_ids: Vec<EventId> = self.events.keys().copied().collect();
        for event_id in event_ids {
            self.resolve(event_id, Err(error.clone()));
        }
        for (_, pending) in self.pending.drain() {
            if let Pending::External(request) = pending {
                let _ = request.reply.send(Err(error.clone()));
            }
        }
        for (_, entry) in self.subscriptions.drain() {
            if let Some(reply) = entry.reply {
                let _ = reply.send(Err(error.clone()));
            } else {
                // The stream ends with this error (`Closed` included) once it drained its buffer.
                entry
                    .end
                    .error
                    .lock()
                    .expect("subscription end lock")
                    .get_or_insert_with(|| error.clone());
            }
        }
        for waiter in self.click_waiters.drain(..) {
            let _ = waiter.reply.send(Err(error.clone()));
        }
        self.commands.close();
        while let Ok(command) = self.commands.try_recv() {
            self.refuse(command, &error);
        }
        // Last: whoever sees `Closed` finds every operation failed, and later ones fail with
        // `Error::Closed`.
        self.core.state.send_replace(ConnectionState::Closed);
        let result = self.core.close_result();
        for reply in closing.into_iter().flat_map(|closing| closing.replies) {
            let _ = reply.send(result.clone());
        }
    }

    fn refuse(&mut self, command: Command, error: &Error) {
        match command {
            Command::Request(request) => {
                let _ = request.reply.send(Err(error.clone()));
            }
            Command::Submit(submission) => {
                let _ = submission.accepted.send(Err(error.clone()));
                let _ = submission.committed.send(Err(error.clone()));
            }
            Command::Subscribe(subscribe) => {
                let _ = subscribe.reply.send(Err(error.clone()));
            }
            Command::FlushClicks(reply) => {
                let _ = reply.send(Err(error.clone()));
            }
            Command::Close(reply) => {
                let _ = reply.send(self.core.close_result());
            }
        }
    }

    // ----- commands -----

    fn on_command(&mut self, command: Command) {
        let closing = self.closing.is_some();
        match command {
            Command::Close(reply) => self.on_close(reply),
            Command::FlushClicks(reply) => self.on_flush_clicks(reply),
            // A close refuses new work; what is outstanding is served until the task stops.
            command if closing => self.refuse(command, &Error::Closed),
            Command::Request(request) => {
                if let Some(offer_id) = request.offer_id {
                    self.offer_waiters.insert(offer_id, request.request_id);
                }
                let request_id = request.request_id;
                self.pending.insert(
                    request_id,
                    Pending::External(ExternalRequest {
                        frame: request.frame,
                        replay: request.replay,
                        offer_id: request.offer_id,
                        deadline: Instant::now() + self.core.options.request_timeout,
                        sent: false,
                        resend_at: None,
                        reply: request.reply,
                    }),
                );
                if self.connected {
                    self.send_external(request_id);
                }
            }
            Command::Submit(submission) => {
                if self.events.contains_key(&submission.event_id) {
                    let error = Error::InvalidArgument("this event id is already in flight on this client");
                    let _ = submission.accepted.send(Err(error.clone()));
                    let _ = submission.committed.send(Err(error));
                    return;
                }
                let event_id = submission.event_id;
                self.events.insert(
                    event_id,
                    EventEntry {
                        request_id: submission.request_id,
                        frame: submission.frame,
                        kind: submission.kind,
                        expires_at: submission.expires_at,
                        accepted: Some(submission.accepted),
                        committed: Some(submission.committed),
                        _permit: submission.permit,
                        sent: false,
                        accepted_at: None,
                        ever_accepted: false,
                        maybe_applied: false,
                        resend_at: None,
                        needs_status: false,
                        status_in_flight: false,
                        last_status_query: None,
                        expired_refusal: false,
                        accept_refused: false,
                    },
                );
                if self.connected {
                    self.send_event(event_id);
                }
            }
            Command::Subscribe(subscribe) => {
                let local_id = subscribe.local_id;
                self.subscriptions.insert(
                    local_id,
                    SubscriptionEntry {
                        account: subscribe.account,
                        from_height: subscribe.from_height,
                        sender: subscribe.sender,
                        end: subscribe.end,
                        server_id: None,
                        dedup: Dedup::default(),
                        reply: Some(subscribe.reply),
                        resubscribe_at: None,
                    },
                );
                if self.connected {
                    self.send_subscribe(local_id, subscribe.account, subscribe.from_height);
                }
            }
        }
    }

    fn on_flush_clicks(&mut self, reply: oneshot::Sender<Result<()>>) {
        if !self.connected {
            let _ = reply.send(Err(Error::ConnectionLost));
            return;
        }
        self.send_clicks(true);
        // Connected, clicks left unsent only while paused after a temporary refusal: waiting for
        // the frames in flight would report those as delivered.
        if !self.core.clicks.lock().expect("click buffer lock").is_empty() {
            let retry_after_ms = self
                .clicks_paused_until
                .map(|until| until.saturating_duration_since(Instant::now()).as_millis() as u64);
            let _ = reply.send(Err(Error::server(
                ErrorCode::Busy,
                "clicks are paused after a refusal".into(),
                retry_after_ms,
            )));
            return;
        }
        match self.clicks_unacked.back() {
            Some((sequence, _)) => self.click_waiters.push(ClickWaiter {
                sequence: *sequence,
                deadline: Instant::now() + self.core.options.request_timeout,
                reply,
            }),
            None => {
                let _ = reply.send(Ok(()));
            }
        }
    }

    /// Begins a close (or joins the one in progress): no click is taken from now on, every
    /// buffered one is sent (or, while disconnected or paused, as soon as possible), and the task
    /// stops once none is left or `close_flush_timeout` passed (`should_exit`).
    fn on_close(&mut self, reply: oneshot::Sender<Result<()>>) {
        if let Some(closing) = self.closing.as_mut() {
            closing.replies.push(reply);
            return;
        }
        let clicks = self.stop_clicks();
        let now = Instant::now();
        let deadline = now
            .checked_add(self.core.options.close_flush_timeout)
            .unwrap_or(now + CLOSE_FLUSH_TIMEOUT_MAX);
        self.closing = Some(Closing {
            replies: vec![reply],
            deadline,
            clicks,
            acknowledged: 0,
        });
        self.send_clicks(true);
    }

    fn send_external(&mut self, request_id: u64) {
        let Some(Pending::External(request)) = self.pending.get_mut(&request_id) else {
            return;
        };
        request.sent = true;
        request.resend_at = None;
        let frame = request.frame.clone();
        self.outbox.push(Message::Binary(frame));
    }

    fn send_event(&mut self, event_id: EventId) {
        let Some(entry) = self.events.get_mut(&event_id) else {
            return;
        };
        entry.sent = true;
        entry.resend_at = None;
        let request_id = entry.request_id;
        let frame = entry.frame.clone();
        self.pending.insert(request_id, Pending::Event(event_id));
        self.push(&frame);
    }

    fn send_subscribe(&mut self, local_id: u64, account: Option<PublicKey>, from_height: Option<u64>) {
        let request_id = self.core.next_request_id();
        self.pending.insert(request_id, Pending::Subscribe(local_id));
        self.push_message(&ClientMessage::Subscribe {
            request_id,
            account,
            from_height,
        });
    }

    fn on_unsubscribe(&mut self, local_id: u64) {
        if let Some(entry) = self.subscriptions.remove(&local_id) {
            if let Some(server_id) = entry.server_id {
                self.server_subscriptions.remove(&server_id);
                if self.connected {
                    let request_id = self.core.next_request_id();
                    self.pending.insert(request_id, Pending::Unsubscribe);
                    self.push_message(&ClientMessage::Unsubscribe {
                        request_id,
                        subscription_id: server_id,
                    });
                }
            }
        }
    }

    // ----- clicks -----

    fn send_clicks(&mut self, include_open: bool) {
        if !self.connected {
            return;
        }
        if let Some(until) = self.clicks_paused_until {
            if Instant::now() < until {
                return;
            }
            self.clicks_paused_until = None;
            // The refused batch went back to the front: send everything waiting.
            return self.send_clicks(true);
        }
        {
            let mut buffer = self.core.clicks.lock().expect("click buffer lock");
            buffer.take(include_open, &mut self.click_scratch);
            buffer.unacked_batches += self.click_scratch.len();
        }
        let batches = std::mem::take(&mut self.click_scratch);
        if !batches.is_empty() {
            debug!(frames = batches.len(), "sending clicks");
        }
        for batch in batches {
            let sequence = self.core.next_request_id();
            self.outbox
                .push(Message::Binary(Bytes::from(clicks_frame(sequence, &batch))));
            self.clicks_unacked.push_back((sequence, batch));
        }
    }

    fn on_clicks_ack(&mut self, up_to: u64) {
        let mut acknowledged = 0;
        let mut clicks = 0;
        while self
            .clicks_unacked
            .front()
            .is_some_and(|(sequence, _)| *sequence <= up_to)
        {
            acknowledged += 1;
            let (_, batch) = self.clicks_unacked.pop_front().expect("checked above");
            clicks += batch.clicks;
            self.click_scratch_bodies.push(batch.body);
        }
        if let Some(closing) = self.closing.as_mut() {
            closing.acknowledged += clicks;
        }
        if acknowledged > 0 {
            let mut buffer = self.core.clicks.lock().expect("click buffer lock");
            buffer.unacked_batches -= acknowledged;
            for body in self.click_scratch_bodies.drain(..) {
                buffer.recycle(body);
            }
        }
        self.settle_click_waiters(|sequence| sequence <= up_to, || Ok(()));
    }

    /// Answers (and forgets) the click waiters whose sequence `settles` selects.
    fn settle_click_waiters(&mut self, settles: impl Fn(u64) -> bool, result: impl Fn() -> Result<()>) {
        let mut index = 0;
        while index < self.click_waiters.len() {
            if settles(self.click_waiters[index].sequence) {
                let waiter = self.click_waiters.swap_remove(index);
                let _ = waiter.reply.send(result());
            } else {
                index += 1;
            }
        }
    }

    /// A `clicks` frame was refused: retry it later if the refusal is temporary, else drop it.
    /// Either way every `flush_clicks` whose frames include it fails with the refusal (a later
    /// cumulative ack must not report those clicks as delivered): with a temporary refusal the
    /// clicks stay buffered and are sent again, so the error is retryable.
    ///
    /// Except `unavailable` (a strict-mode gateway whose Redis flush failed): the gateway keeps
    /// those clicks and writes them later, so resending them may count them twice. They are
    /// resent only under [`ClickDelivery::AtLeastOnce`]; under [`ClickDelivery::AtMostOnce`]
    /// they are dropped here (the gateway may still count them, once), and the flushes waiting
    /// on them fail with the refusal all the same.
    fn on_clicks_error(
        &mut self,
        position: usize,
        code: ErrorCode,
        message: String,
        retry_after_ms: Option<u64>,
        retry: Duration,
    ) {
        let (sequence, batch) = self.clicks_unacked.remove(position).expect("position is valid");
        {
            let mut buffer = self.core.clicks.lock().expect("click buffer lock");
            buffer.unacked_batches -= 1;
            let kept_by_gateway = code == ErrorCode::Unavailable;
            let resend = code.is_retryable()
                && (!kept_by_gateway || self.core.options.click_delivery == ClickDelivery::AtLeastOnce);
            if code.is_retryable() {
                self.clicks_paused_until = Some(Instant::now() + retry);
            }
            if resend {
                buffer.requeue_front(vec![batch]);
            } else if kept_by_gateway {
                debug!(
                    sequence,
                    clicks = batch.count,
                    "clicks refused as unavailable: the gateway keeps them; not resent (at most once)"
                );
                buffer.recycle(batch.body);
            } else {
                warn!(
                    sequence,
                    ?code,
                    message,
                    clicks = batch.count,
                    "the gateway refused a clicks frame"
                );
            }
        }
        let error = Error::server(code, message, retry_after_ms);
        self.settle_click_waiters(|waiting_for| waiting_for >= sequence, || Err(error.clone()));
    }

    // ----- incoming -----

    fn on_message(&mut self, message: ServerMessage) {
        match message {
            ServerMessage::ClicksAck { up_to } => self.on_clicks_ack(up_to),
            ServerMessage::Accepted { request_id, event_id } => {
                if matches!(self.pending.get(&request_id), Some(Pending::Event(id)) if *id == event_id) {
                    self.pending.remove(&request_id);
                }
                self.mark_accepted(event_id);
            }
            ServerMessage::Committed {
                event_id,
                height,
                outcome,
            } => {
                self.core.head.fetch_max(height, Ordering::Relaxed);
                let result = match outcome {
                    Outcome::Rejected { reason } => Err(Error::Rejected {
                        event_id,
                        height,
                        reason,
                    }),
                    outcome => Ok(Committed {
                        event_id,
                        height,
                        outcome,
                    }),
                };
                self.resolve(event_id, result);
            }
            ServerMessage::Rejected {
                event_id,
                height,
                reason,
            } => {
                self.core.head.fetch_max(height, Ordering::Relaxed);
                self.resolve(
                    event_id,
                    Err(Error::Rejected {
                        event_id,
                        height,
                        reason,
                    }),
                );
            }
            ServerMessage::Error {
                request_id,
                code,
                message,
                retry_after_ms,
            } => self.on_error(request_id, code, message, retry_after_ms),
            ServerMessage::OfferReceived { offer } => {
                if let Some(updates) = self.core.offer_updates.get() {
                    let _ = updates.send(OfferUpdate::Received(offer));
                }
            }
            ServerMessage::OfferClosed { offer_id, reason } => {
                if let Some(updates) = self.core.offer_updates.get() {
                    let _ = updates.send(OfferUpdate::Closed { offer_id, reason });
                }
                if let Some(request_id) = self.offer_waiters.remove(&offer_id) {
                    if let Some(Pending::External(request)) = self.pending.remove(&request_id) {
                        let _ = request
                            .reply
                            .send(Ok(ServerMessage::OfferClosed { offer_id, reason }));
                    }
                }
                let refused = self.events.get(&offer_id).is_some_and(|entry| {
                    entry.kind == EventKind::Accept
                        && !entry.ever_accepted
                        && reason != OfferCloseReason::Accepted
                });
                if refused {
                    self.resolve(offer_id, Err(Error::OfferClosed { offer_id, reason }));
                }
            }
            ServerMessage::Activity {
                subscription_id,
                height,
                event_id,
                body,
                outcome,
            } => self.on_activity(
                subscription_id,
                Activity {
                    height,
                    event_id,
                    body,
                    outcome,
                },
            ),
            ServerMessage::Hello { .. } | ServerMessage::Authenticated { .. } => {
                debug!("unexpected hello/authenticated on an open connection")
            }
            answer => {
                let Some(request_id) = answer_request_id(&answer) else {
                    return;
                };
                match self.pending.remove(&request_id) {
                    Some(Pending::External(request)) => {
                        if let Some(offer_id) = request.offer_id {
                            self.offer_waiters.remove(&offer_id);
                        }
                        let _ = request.reply.send(Ok(answer));
                    }
                    Some(Pending::Head) => {
                        if let ServerMessage::Head { height, .. } = answer {
                            self.core.head_read(height);
                        }
                    }
                    Some(Pending::EventStatus(event_id)) => {
                        if let ServerMessage::EventStatus {
                            state,
                            height,
                            outcome,
                            ..
                        } = answer
                        {
                            self.on_event_status(event_id, state, height, outcome);
                        }
                    }
                    Some(Pending::Subscribe(local_id)) => {
                        if let ServerMessage::Subscribed { subscription_id, .. } = answer {
                            self.on_subscribed(local_id, subscription_id);
                        }
                    }
                    Some(Pending::Event(_)) | Some(Pending::Unsubscribe) | None => {
                        debug!(request_id, "an answer nobody waits for")
                    }
                }
            }
        }
    }

    fn on_error(&mut self, request_id: u64, code: ErrorCode, message: String, retry_after_ms: Option<u64>) {
        let retry = retry_after_ms
            .map(Duration::from_millis)
            .unwrap_or(RETRY_AFTER_DEFAULT)
            .min(RETRY_AFTER_MAX);
        if request_id == 0 {
            warn!(
                ?code,
                message, "the gateway reported an error without a request id"
            );
            return;
        }
        if let Some(position) = self
            .clicks_unacked
            .iter()
            .position(|(sequence, _)| *sequence == request_id)
        {
            self.on_clicks_error(position, code, message, retry_after_ms, retry);
            return;
        }
        let now = Instant::now();
        match self.pending.remove(&request_id) {
            Some(Pending::External(mut request)) => {
                let temporary = matches!(
                    code,
                    ErrorCode::Busy | ErrorCode::RateLimited | ErrorCode::Unavailable
                );
                if temporary && request.replay && now + retry < request.deadline {
                    request.sent = false;
                    request.resend_at = Some(now + retry);
                    self.pending.insert(request_id, Pending::External(request));
                } else {
                    if let Some(offer_id) = request.offer_id {
                        self.offer_waiters.remove(&offer_id);
                    }
                    let _ = request
                        .reply
                        .send(Err(Error::server(code, message, retry_after_ms)));
                }
            }
            Some(Pending::Event(event_id)) => {
                self.on_event_error(event_id, code, message, retry_after_ms, retry)
            }
            Some(Pending::EventStatus(event_id)) => {
                if let Some(entry) = self.events.get_mut(&event_id) {
                    entry.status_in_flight = false;
                }
            }
            Some(Pending::Subscribe(local_id)) => {
                // A resume refused temporarily is sent again later (or after the reconnect that
                // follows `shutting_down`); only a final refusal ends the subscription.
                if let Some(entry) = self.subscriptions.get_mut(&local_id) {
                    if entry.reply.is_none() && code.is_retryable() {
                        debug!(
                            ?code,
                            ?retry,
                            "a subscription's resume was refused for now; retrying"
                        );
                        entry.resubscribe_at = Some(now + retry);
                        return;
                    }
                }
                if let Some(entry) = self.subscriptions.remove(&local_id) {
                    let error = Error::server(code, message, retry_after_ms);
                    match entry.reply {
                        Some(reply) => {
                            let _ = reply.send(Err(error));
                        }
                        None => {
                            warn!(%error, "the gateway refused to resume a subscription");
                            *entry.end.error.lock().expect("subscription end lock") = Some(error);
                        }
                    }
                }
            }
            Some(Pending::Head) | Some(Pending::Unsubscribe) | None => {
                debug!(request_id, ?code, message, "error answer");
            }
        }
    }

    fn on_event_error(
        &mut self,
        event_id: EventId,
        code: ErrorCode,
        message: String,
        retry_after_ms: Option<u64>,
        retry: Duration,
    ) {
        let Some(entry) = self.events.get_mut(&event_id) else {
            return;
        };
        entry.sent = false;
        match code {
            ErrorCode::Busy | ErrorCode::RateLimited | ErrorCode::Unavailable => {
                entry.resend_at = Some(Instant::now() + retry);
            }
            // Sent again after the reconnect that follows.
            ErrorCode::ShuttingDown => {}
            ErrorCode::Expired => {
                entry.expired_refusal = true;
                entry.needs_status = true;
            }
            ErrorCode::NotFound if entry.kind == EventKind::Accept => {
                entry.accept_refused = true;
                entry.needs_status = true;
            }
            _ => self.resolve(event_id, Err(Error::server(code, message, retry_after_ms))),
        }
    }

    fn mark_accepted(&mut self, event_id: EventId) {
        if let Some(entry) = self.events.get_mut(&event_id) {
            entry.ever_accepted = true;
            entry.maybe_applied = true;
            if entry.accepted_at.is_none() {
                entry.accepted_at = Some(Instant::now());
            }
            if let Some(accepted) = entry.accepted.take() {
                let _ = accepted.send(Ok(()));
            }
        }
    }

    fn on_event_status(
        &mut self,
        event_id: EventId,
        state: EventState,
        height: Option<u64>,
        outcome: Option<Outcome>,
    ) {
        let head = self.core.head.load(Ordering::Relaxed);
        let Some(entry) = self.events.get_mut(&event_id) else {
            return;
        };
        entry.status_in_flight = false;
        entry.last_status_query = Some(Instant::now());
        match state {
            EventState::Committed => {
                let height = height.unwrap_or(0);
                let result = match outcome.unwrap_or(Outcome::Applied) {
                    Outcome::Rejected { reason } => Err(Error::Rejected {
                        event_id,
                        height,
                        reason,
                    }),
                    outcome => Ok(Committed {
                        event_id,
                        height,
                        outcome,
                    }),
                };
                self.resolve(event_id, result);
            }
            EventState::Pending => {
                entry.needs_status = false;
                self.mark_accepted(event_id);
            }
            EventState::Unknown => {
                if entry.expired_refusal || head > entry.expires_at {
                    // The ledger forgets an event id after its expiry: `unknown` proves that it
                    // never applied only if no gateway can have taken it.
                    let error = if entry.maybe_applied {
                        Error::OutcomeUnknown { event_id }
                    } else {
                        Error::Expired { event_id }
                    };
                    self.resolve(event_id, Err(error));
                } else if entry.accept_refused {
                    self.resolve(
                        event_id,
                        Err(Error::server(
                            ErrorCode::NotFound,
                            "the offer is gone".into(),
                            None,
                        )),
                    );
                } else if entry.kind == EventKind::Accept && entry.ever_accepted {
                    // Accepted as a swap earlier but unknown now: keep watching until expiry.
                } else if self.connected {
                    entry.needs_status = false;
                    self.send_event(event_id);
                }
            }
        }
    }

    fn resolve(&mut self, event_id: EventId, result: Result<Committed>) {
        let Some(mut entry) = self.events.remove(&event_id) else {
            return;
        };
        // Its submit may still wait for an answer (a push can overtake it): forget it.
        if matches!(self.pending.get(&entry.request_id), Some(Pending::Event(id)) if *id == event_id) {
            self.pending.remove(&entry.request_id);
        }
        if let Some(accepted) = entry.accepted.take() {
            let accepted_result = match &result {
                Ok(_) | Err(Error::Rejected { .. }) => Ok(()),
                Err(error) => Err(error.clone()),
            };
            let _ = accepted.send(accepted_result);
        }
        if let Some(committed) = entry.committed.take() {
            let _ = committed.send(result);
        }
        // The permit goes back with the entry.
    }

    fn on_subscribed(&mut self, local_id: u64, server_id: u64) {
        let Some(entry) = self.subscriptions.get_mut(&local_id) else {
            // Dropped while subscribing: cancel it at the gateway.
            let request_id = self.core.next_request_id();
            self.pending.insert(request_id, Pending::Unsubscribe);
            self.push_message(&ClientMessage::Unsubscribe {
                request_id,
                subscription_id: server_id,
            });
            return;
        };
        entry.server_id = Some(server_id);
        if let Some(reply) = entry.reply.take() {
            let _ = reply.send(Ok(()));
        }
        self.server_subscriptions.insert(server_id, local_id);
    }

    fn on_activity(&mut self, server_id: u64, activity: Activity) {
        let Some(&local_id) = self.server_subscriptions.get(&server_id) else {
            return;
        };
        let Some(entry) = self.subscriptions.get_mut(&local_id) else {
            return;
        };
        if !entry.dedup.is_new(activity.height, &activity.event_id) {
            return;
        }
        let (height, event_id) = (activity.height, activity.event_id);
        match entry.sender.try_send(activity) {
            Ok(()) => entry.dedup.record(height, event_id),
            Err(mpsc::error::TrySendError::Full(_)) => {
                let last_height = entry.dedup.last_height();
                *entry.end.error.lock().expect("subscription end lock") = Some(Error::Lagged { last_height });
                warn!(?last_height, "a subscription's consumer lagged; ending it");
                self.on_unsubscribe(local_id);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => self.on_unsubscribe(local_id),
        }
    }

    // ----- timers -----

    fn housekeeping(&mut self) {
        let now = Instant::now();
        // Request deadlines (also while disconnected).
        let timeout = self.core.options.request_timeout;
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter_map(|(request_id, pending)| match pending {
                Pending::External(request) if request.deadline <= now => Some(*request_id),
                _ => None,
            })
            .collect();
        for request_id in expired {
            if let Some(Pending::External(request)) = self.pending.remove(&request_id) {
                if let Some(offer_id) = request.offer_id {
                    self.offer_waiters.remove(&offer_id);
                }
                let _ = request.reply.send(Err(Error::Timeout(timeout)));
            }
        }
        // Click flushes: an acknowledgement the gateway never sends must not leave one waiting.
        let mut index = 0;
        while index < self.click_waiters.len() {
            if self.click_waiters[index].deadline <= now {
                let waiter = self.click_waiters.swap_remove(index);
                let _ = waiter.reply.send(Err(Error::Timeout(timeout)));
            } else {
                index += 1;
            }
        }
        if !self.connected {
            return;
        }
        // Delayed resends of requests.
        let due: Vec<u64> = self
            .pending
            .iter()
            .filter_map(|(request_id, pending)| match pending {
                Pending::External(request)
                    if !request.sent && request.resend_at.is_some_and(|at| at <= now) =>
                {
                    Some(*request_id)
                }
                _ => None,
            })
            .collect();
        for request_id in due {
            self.send_external(request_id);
        }
        // Resumes refused for now.
        let resumes: Vec<(u64, Option<PublicKey>, Option<u64>)> = self
            .subscriptions
            .iter_mut()
            .filter(|(_, entry)| entry.resubscribe_at.is_some_and(|at| at <= now))
            .map(|(local_id, entry)| {
                entry.resubscribe_at = None;
                (*local_id, entry.account, entry.resume_height())
            })
            .collect();
        for (local_id, account, from_height) in resumes {
            self.send_subscribe(local_id, account, from_height);
        }
        // The chain head, for expiry heights.
        if !self.events.is_empty()
            && now.duration_since(self.last_head_refresh) >= self.core.options.head_refresh_interval
        {
            self.last_head_refresh = now;
            let request_id = self.core.next_request_id();
            self.pending.insert(request_id, Pending::Head);
            self.push_message(&ClientMessage::Head { request_id });
        }
        // Events: delayed resends and status checks.
        let poll_after = self.core.options.status_poll_after;
        let mut resend = Vec::new();
        let mut poll = Vec::new();
        for (event_id, entry) in &self.events {
            if !entry.sent && !entry.needs_status && entry.resend_at.is_some_and(|at| at <= now) {
                resend.push(*event_id);
            }
            let stale = entry
                .accepted_at
                .is_some_and(|at| now.duration_since(at) >= poll_after);
            let rested = match entry.last_status_query {
                Some(at) => now.duration_since(at) >= STATUS_POLL_INTERVAL,
                None => true,
            };
            if (entry.needs_status || stale)
                && !entry.status_in_flight
                && rested
                && poll.len() < STATUS_POLLS_PER_TURN_MAX
            {
                poll.push(*event_id);
            }
        }
        for event_id in resend {
            self.send_event(event_id);
        }
        for event_id in poll {
            let request_id = self.core.next_request_id();
            if let Some(entry) = self.events.get_mut(&event_id) {
                entry.status_in_flight = true;
                entry.last_status_query = Some(now);
            }
            self.pending.insert(request_id, Pending::EventStatus(event_id));
            self.push_message(&ClientMessage::EventStatus { request_id, event_id });
        }
        self.send_clicks(false);
    }
}

/// The request id an answer carries, if it is an answer.
fn answer_request_id(message: &ServerMessage) -> Option<u64> {
    match message {
        ServerMessage::Authenticated { request_id, .. }
        | ServerMessage::Pong { request_id, .. }
        | ServerMessage::Accepted { request_id, .. }
        | ServerMessage::Error { request_id, .. }
        | ServerMessage::Token { request_id, .. }
        | ServerMessage::Settlement { request_id, .. }
        | ServerMessage::OfferOpened { request_id, .. }
        | ServerMessage::Offers { request_id, .. }
        | ServerMessage::Head { request_id, .. }
        | ServerMessage::Balances { request_id, .. }
        | ServerMessage::Inventory { request_id, .. }
        | ServerMessage::Item { request_id, .. }
        | ServerMessage::EventStatus { request_id, .. }
        | ServerMessage::Counter { request_id, .. }
        | ServerMessage::PlayerTotals { request_id, .. }
        | ServerMessage::Leaderboard { request_id, .. }
        | ServerMessage::Subscribed { request_id, .. }
        | ServerMessage::Unsubscribed { request_id, .. } => Some(*request_id),
        ServerMessage::Hello { .. }
        | ServerMessage::ClicksAck { .. }
        | ServerMessage::Committed { .. }
        | ServerMessage::Rejected { .. }
        | ServerMessage::OfferReceived { .. }
        | ServerMessage::OfferClosed { .. }
        | ServerMessage::Activity { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hoard_types::{Keypair, TenantId};
    use tokio::sync::oneshot::error::TryRecvError;

    /// A task with no connection behind it (its command senders are returned to keep it open).
    fn task(options: ClientOptions) -> (Task, mpsc::Sender<Command>, mpsc::UnboundedSender<u64>) {
        let credentials = Credentials::studio(TenantId(1), Keypair::generate());
        let core = Arc::new(Core::new(options, credentials, "ws://127.0.0.1:1/v1".to_owned()));
        let (commands, receiver) = mpsc::channel(8);
        let (unsubscribes, unsubscribe_receiver) = mpsc::unbounded_channel();
        (
            Task::new(core, receiver, unsubscribe_receiver),
            commands,
            unsubscribes,
        )
    }

    fn request(task: &mut Task, replay: bool) -> oneshot::Receiver<Result<ServerMessage>> {
        let (reply, answer) = oneshot::channel();
        let request_id = task.core.next_request_id();
        task.on_command(Command::Request(Box::new(Request {
            request_id,
            frame: Bytes::from_static(b"request"),
            replay,
            offer_id: None,
            reply,
        })));
        answer
    }

    fn subscribe(
        task: &mut Task,
        local_id: u64,
    ) -> (oneshot::Receiver<Result<()>>, mpsc::Receiver<Activity>) {
        let (sender, activities) = mpsc::channel(4);
        let (reply, answer) = oneshot::channel();
        task.on_command(Command::Subscribe(Box::new(SubscribeCommand {
            local_id,
            account: None,
            from_height: Some(1),
            sender,
            end: Arc::new(SubscriptionEnd::default()),
            reply,
        })));
        (answer, activities)
    }

    fn subscribe_with_end(
        task: &mut Task,
        local_id: u64,
    ) -> (Arc<SubscriptionEnd>, mpsc::Receiver<Activity>) {
        let (sender, activities) = mpsc::channel(4);
        let (reply, _) = oneshot::channel();
        let end = Arc::new(SubscriptionEnd::default());
        task.on_command(Command::Subscribe(Box::new(SubscribeCommand {
            local_id,
            account: None,
            from_height: Some(1),
            sender,
            end: end.clone(),
            reply,
        })));
        (end, activities)
    }

    fn submit(task: &mut Task) -> (EventId, oneshot::Receiver<Result<Committed>>) {
        let (event_id, _accepted, committed) = submit_tracked(task);
        (event_id, committed)
    }

    /// Submits an event; returns its id and both of its receivers.
    #[allow(clippy::type_complexity)]
    fn submit_tracked(
        task: &mut Task,
    ) -> (
        EventId,
        oneshot::Receiver<Result<()>>,
        oneshot::Receiver<Result<Committed>>,
    ) {
        let event_id = EventId::random();
        let (accepted, accepted_receiver) = oneshot::channel();
        let (committed, committed_receiver) = oneshot::channel();
        let permit = task.core.permits.clone().try_acquire_owned().expect("a permit");
        task.on_command(Command::Submit(Box::new(Submission {
            event_id,
            request_id: task.core.next_request_id(),
            frame: Bytes::from_static(b"submit"),
            kind: EventKind::Submit,
            expires_at: 100,
            permit,
            accepted,
            committed,
        })));
        (event_id, accepted_receiver, committed_receiver)
    }

    fn flush(task: &mut Task) -> oneshot::Receiver<Result<()>> {
        let (reply, done) = oneshot::channel();
        task.on_command(Command::FlushClicks(reply));
        done
    }

    fn click(task: &Task) {
        clicks(task, 1);
    }

    /// Records one click entry of `count` clicks.
    fn clicks(task: &Task, count: u32) {
        task.core
            .clicks
            .lock()
            .expect("click buffer lock")
            .push(&Keypair::generate().public(), "gold", count)
            .expect("room for a click");
    }

    fn close(task: &mut Task) -> oneshot::Receiver<Result<()>> {
        let (reply, done) = oneshot::channel();
        task.on_command(Command::Close(reply));
        done
    }

    /// The sequence of the last clicks frame sent.
    fn last_clicks_frame(task: &Task) -> u64 {
        task.clicks_unacked.back().expect("a clicks frame was sent").0
    }

    /// Answers an `event_status` check of `event_id` with `state` (no height, no outcome).
    fn status(task: &mut Task, event_id: EventId, state: EventState) {
        let request_id = task.core.next_request_id();
        task.pending.insert(request_id, Pending::EventStatus(event_id));
        task.on_message(ServerMessage::EventStatus {
            request_id,
            event_id,
            state,
            height: None,
            outcome: None,
        });
    }

    /// The request id of the pending subscribe of `local_id`.
    fn subscribe_request(task: &Task, local_id: u64) -> u64 {
        let ids: Vec<u64> = task
            .pending
            .iter()
            .filter_map(|(request_id, pending)| {
                matches!(pending, Pending::Subscribe(id) if *id == local_id).then_some(*request_id)
            })
            .collect();
        assert_eq!(ids.len(), 1, "one subscribe in flight");
        ids[0]
    }

    fn count(task: &Task, which: impl Fn(&Pending) -> bool) -> usize {
        task.pending.values().filter(|pending| which(pending)).count()
    }

    #[test]
    fn the_head_counts_as_never_read_until_it_is() {
        let (task, _commands, _unsubscribes) = task(ClientOptions::new());
        assert_eq!(task.core.head_age(), Duration::MAX);
        task.core.head_read(0);
        assert!(task.core.head_age() < Duration::from_secs(10));
    }

    #[test]
    fn a_disconnect_keeps_only_what_is_sent_again() {
        let (mut task, _commands, _unsubscribes) = task(ClientOptions::new());
        task.on_connected(5, &Limits::default());
        let mut read = request(&mut task, true);
        let mut offer = request(&mut task, false);
        let (mut subscribed, _activities) = subscribe(&mut task, 1);
        let (event_id, mut committed) = submit(&mut task);
        // What the task asks for itself: a head refresh, a status check, an unsubscribe.
        let head_id = task.core.next_request_id();
        task.pending.insert(head_id, Pending::Head);
        let status_id = task.core.next_request_id();
        task.pending.insert(status_id, Pending::EventStatus(event_id));
        task.events.get_mut(&event_id).expect("tracked").status_in_flight = true;
        let unsubscribe_id = task.core.next_request_id();
        task.pending.insert(unsubscribe_id, Pending::Unsubscribe);
        click(&task);
        let mut flushed = flush(&mut task);
        assert_eq!(task.pending.len(), 7);
        task.outbox.clear();

        task.on_disconnected();
        // The non-replayable request and the flush fail; the read waits to be sent again.
        assert_eq!(offer.try_recv().expect("answered"), Err(Error::ConnectionLost));
        assert_eq!(flushed.try_recv().expect("answered"), Err(Error::ConnectionLost));
        assert_eq!(read.try_recv(), Err(TryRecvError::Empty));
        assert_eq!(task.pending.len(), 1, "only the replayable read is left");
        assert_eq!(
            count(
                &task,
                |p| matches!(p, Pending::External(r) if !r.sent && r.replay)
            ),
            1
        );
        // The subscription and the event are kept (outside the table), not failed.
        assert_eq!(subscribed.try_recv(), Err(TryRecvError::Empty));
        assert_eq!(committed.try_recv(), Err(TryRecvError::Empty));
        let entry = &task.events[&event_id];
        assert!(!entry.sent && !entry.status_in_flight);

        // The reconnect sends again exactly what was kept: the read, the subscription, the event.
        task.on_connected(6, &Limits::default());
        assert_eq!(task.pending.len(), 3);
        assert_eq!(count(&task, |p| matches!(p, Pending::External(r) if r.sent)), 1);
        assert_eq!(count(&task, |p| matches!(p, Pending::Subscribe(1))), 1);
        assert_eq!(
            count(&task, |p| matches!(p, Pending::Event(id) if *id == event_id)),
            1
        );
        assert_eq!(task.outbox.len(), 3);
    }

    #[test]
    fn internal_requests_lost_with_the_connection_leave_no_timed_work() {
        let (mut task, _commands, _unsubscribes) = task(ClientOptions::new());
        task.on_connected(5, &Limits::default());
        for pending in [
            Pending::Head,
            Pending::EventStatus(EventId::random()),
            Pending::Event(EventId::random()),
            Pending::Subscribe(9),
            Pending::Unsubscribe,
        ] {
            let request_id = task.core.next_request_id();
            task.pending.insert(request_id, pending);
        }
        assert!(task.has_timed_work());
        task.on_disconnected();
        assert!(task.pending.is_empty());
        assert!(
            !task.has_timed_work(),
            "no answer can come: the housekeeping tick must stop"
        );
    }

    #[test]
    fn a_final_click_refusal_fails_the_flushes_waiting_for_it() {
        let (mut task, _commands, _unsubscribes) = task(ClientOptions::new());
        task.on_connected(5, &Limits::default());
        click(&task);
        let mut first = flush(&mut task);
        let refused = task.clicks_unacked.back().expect("sent").0;
        click(&task);
        let mut second = flush(&mut task);
        let later = task.clicks_unacked.back().expect("sent").0;
        assert!(later > refused);

        task.on_error(refused, ErrorCode::Forbidden, "not yours".into(), None);
        for done in [&mut first, &mut second] {
            let error = done.try_recv().expect("answered").unwrap_err();
            assert_eq!(error.kind(), crate::ErrorKind::Server(ErrorCode::Forbidden));
            assert!(!error.is_retryable());
        }
        assert!(task.click_waiters.is_empty());
        // The later frame's ack settles nothing more, and the refused clicks are not resent.
        task.on_message(ServerMessage::ClicksAck { up_to: later });
        assert!(task.clicks_unacked.is_empty());
        assert!(task.core.clicks.lock().expect("click buffer lock").is_empty());
        assert_eq!(
            task.core
                .clicks
                .lock()
                .expect("click buffer lock")
                .unacked_batches,
            0
        );
    }

    #[test]
    fn a_temporary_click_refusal_fails_the_flush_retryably_and_keeps_the_clicks() {
        let (mut task, _commands, _unsubscribes) = task(ClientOptions::new());
        task.on_connected(5, &Limits::default());
        click(&task);
        let mut done = flush(&mut task);
        let refused = task.clicks_unacked.back().expect("sent").0;
        task.on_error(refused, ErrorCode::Busy, "later".into(), Some(10_000));
        let error = done.try_recv().expect("answered").unwrap_err();
        assert_eq!(error.kind(), crate::ErrorKind::Server(ErrorCode::Busy));
        assert_eq!(error.retry_after(), Some(Duration::from_secs(10)));
        assert!(!task.core.clicks.lock().expect("click buffer lock").is_empty());
        // While paused, a flush cannot be honest about the held-back clicks: it fails at once.
        let error = flush(&mut task).try_recv().expect("answered").unwrap_err();
        assert_eq!(error.kind(), crate::ErrorKind::Server(ErrorCode::Busy));
        assert!(error
            .retry_after()
            .is_some_and(|after| after > Duration::from_secs(5)));
    }

    #[test]
    fn a_flush_without_an_ack_times_out() {
        let timeout = Duration::from_millis(20);
        let (mut task, _commands, _unsubscribes) = task(ClientOptions::new().request_timeout(timeout));
        task.on_connected(5, &Limits::default());
        click(&task);
        let mut done = flush(&mut task);
        assert!(task.has_timed_work());
        task.housekeeping();
        assert_eq!(done.try_recv(), Err(TryRecvError::Empty));
        std::thread::sleep(timeout + Duration::from_millis(10));
        task.housekeeping();
        assert_eq!(done.try_recv().expect("answered"), Err(Error::Timeout(timeout)));
        assert!(task.click_waiters.is_empty());
    }

    #[test]
    fn an_event_sent_before_a_disconnect_is_of_unknown_outcome_after_its_expiry() {
        let (mut task, _commands, _unsubscribes) = task(ClientOptions::new());
        task.on_connected(5, &Limits::default());
        let (event_id, mut committed) = submit(&mut task);
        // Sent, then the connection broke before any answer: the gateway may have taken it, and
        // its `committed` push may be what was lost.
        task.on_disconnected();
        // Back after the expiry (100): the resend is refused `expired`, the status is `unknown`.
        task.on_connected(120, &Limits::default());
        let request_id = task.events[&event_id].request_id;
        task.on_error(request_id, ErrorCode::Expired, "expired".into(), None);
        assert_eq!(
            committed.try_recv(),
            Err(TryRecvError::Empty),
            "the status decides"
        );
        task.housekeeping();
        assert_eq!(
            count(
                &task,
                |p| matches!(p, Pending::EventStatus(id) if *id == event_id)
            ),
            1,
            "the status is checked"
        );
        status(&mut task, event_id, EventState::Unknown);
        let error = committed.try_recv().expect("resolved").unwrap_err();
        assert_eq!(error, Error::OutcomeUnknown { event_id });
        assert_eq!(error.kind(), crate::ErrorKind::OutcomeUnknown);
        assert!(!error.is_retryable());
    }

    #[test]
    fn an_accepted_event_is_of_unknown_outcome_after_its_expiry() {
        let (mut task, _commands, _unsubscribes) = task(ClientOptions::new());
        task.on_connected(5, &Limits::default());
        let (event_id, mut committed) = submit(&mut task);
        let request_id = task.events[&event_id].request_id;
        task.on_message(ServerMessage::Accepted { request_id, event_id });
        task.core.head_read(150);
        status(&mut task, event_id, EventState::Unknown);
        assert_eq!(
            committed.try_recv().expect("resolved"),
            Err(Error::OutcomeUnknown { event_id })
        );
    }

    #[test]
    fn an_event_no_gateway_took_is_expired_after_its_expiry() {
        let (mut task, _commands, _unsubscribes) = task(ClientOptions::new());
        task.on_connected(5, &Limits::default());
        let (event_id, mut committed) = submit(&mut task);
        // Refused for now, then the connection broke: no gateway took it.
        let request_id = task.events[&event_id].request_id;
        task.on_error(request_id, ErrorCode::Busy, "later".into(), Some(10_000));
        task.on_disconnected();
        task.on_connected(120, &Limits::default());
        task.on_error(request_id, ErrorCode::Expired, "expired".into(), None);
        status(&mut task, event_id, EventState::Unknown);
        assert_eq!(
            committed.try_recv().expect("resolved"),
            Err(Error::Expired { event_id })
        );
    }

    #[test]
    fn an_event_of_unknown_fate_that_committed_is_reported_committed() {
        let (mut task, _commands, _unsubscribes) = task(ClientOptions::new());
        task.on_connected(5, &Limits::default());
        let (event_id, mut committed) = submit(&mut task);
        task.on_disconnected();
        task.on_connected(100, &Limits::default());
        let request_id = task.events[&event_id].request_id;
        task.on_error(request_id, ErrorCode::Expired, "expired".into(), None);
        let status_id = task.core.next_request_id();
        task.pending.insert(status_id, Pending::EventStatus(event_id));
        task.on_message(ServerMessage::EventStatus {
            request_id: status_id,
            event_id,
            state: EventState::Committed,
            height: Some(40),
            outcome: Some(Outcome::Applied),
        });
        let committed = committed.try_recv().expect("resolved").expect("committed");
        assert_eq!((committed.height, committed.outcome), (40, Outcome::Applied));
    }

    /// Sends one click frame and refuses it with `unavailable`; returns the flush's answer.
    fn refuse_clicks_unavailable(task: &mut Task) -> Result<()> {
        task.on_connected(5, &Limits::default());
        click(task);
        let mut done = flush(task);
        let refused = task.clicks_unacked.back().expect("sent").0;
        task.on_error(refused, ErrorCode::Unavailable, "redis".into(), Some(0));
        done.try_recv().expect("answered")
    }

    #[test]
    fn clicks_refused_unavailable_are_dropped_at_most_once() {
        let (mut task, _commands, _unsubscribes) =
            task(ClientOptions::new().click_delivery(ClickDelivery::AtMostOnce));
        let error = refuse_clicks_unavailable(&mut task).unwrap_err();
        assert_eq!(error.kind(), crate::ErrorKind::Server(ErrorCode::Unavailable));
        // The gateway kept them: sending them again could count them twice.
        let buffer = task.core.clicks.lock().expect("click buffer lock");
        assert!(buffer.is_empty(), "not queued to be sent again");
        assert_eq!(buffer.unacked_batches, 0);
        drop(buffer);
        assert!(task.clicks_unacked.is_empty());
        task.outbox.clear();
        task.housekeeping();
        assert!(task.clicks_unacked.is_empty(), "nothing resent");
    }

    #[test]
    fn clicks_refused_unavailable_are_resent_at_least_once() {
        let (mut task, _commands, _unsubscribes) =
            task(ClientOptions::new().click_delivery(ClickDelivery::AtLeastOnce));
        let error = refuse_clicks_unavailable(&mut task).unwrap_err();
        assert_eq!(error.kind(), crate::ErrorKind::Server(ErrorCode::Unavailable));
        assert!(!task.core.clicks.lock().expect("click buffer lock").is_empty());
        task.housekeeping();
        assert_eq!(task.clicks_unacked.len(), 1, "sent again after the pause");
    }

    #[test]
    fn a_resume_refused_for_now_is_retried_and_only_a_final_refusal_ends_it() {
        let (mut task, _commands, _unsubscribes) = task(ClientOptions::new());
        task.on_connected(5, &Limits::default());
        let (end, _activities) = subscribe_with_end(&mut task, 1);
        let request_id = subscribe_request(&task, 1);
        task.on_message(ServerMessage::Subscribed {
            request_id,
            subscription_id: 77,
        });
        task.on_disconnected();
        task.on_connected(6, &Limits::default());
        for code in [ErrorCode::Busy, ErrorCode::RateLimited, ErrorCode::Unavailable] {
            let request_id = subscribe_request(&task, 1);
            task.on_error(request_id, code, "later".into(), Some(0));
            assert!(task.subscriptions.contains_key(&1), "{code:?} does not end it");
            assert!(end.error.lock().expect("subscription end lock").is_none());
            assert!(task.has_timed_work());
            task.housekeeping();
        }
        // The retention passed: a final refusal ends it with the error.
        let request_id = subscribe_request(&task, 1);
        task.on_error(request_id, ErrorCode::NotFound, "too old".into(), None);
        assert!(!task.subscriptions.contains_key(&1));
        let error = end.error.lock().expect("subscription end lock").clone();
        assert_eq!(
            error.map(|error| error.kind()),
            Some(crate::ErrorKind::Server(ErrorCode::NotFound))
        );
    }

    #[test]
    fn a_close_sends_the_buffered_clicks_and_waits_for_their_acknowledgement() {
        let (mut task, _commands, _unsubscribes) = task(ClientOptions::new());
        task.on_connected(5, &Limits::default());
        clicks(&task, 2);
        clicks(&task, 3);
        assert!(task.clicks_unacked.is_empty(), "still in the open batch");
        let mut closed = close(&mut task);
        assert!(
            task.core.closed.load(Ordering::Acquire),
            "clicks are refused from the close on"
        );
        assert_eq!(
            task.clicks_unacked.len(),
            1,
            "the buffered clicks are sent at once"
        );
        assert!(!task.should_exit(), "the close waits for their acknowledgement");
        assert!(task.has_timed_work(), "the close's deadline is watched");
        task.housekeeping();
        assert!(!task.should_exit());
        task.on_message(ServerMessage::ClicksAck {
            up_to: last_clicks_frame(&task),
        });
        assert!(
            task.should_exit(),
            "every click acknowledged: the connection closes"
        );
        assert_eq!(
            closed.try_recv(),
            Err(TryRecvError::Empty),
            "answered once closed"
        );
        task.shutdown(Error::Closed);
        assert_eq!(closed.try_recv().expect("answered"), Ok(()));
        assert_eq!(task.core.close_result(), Ok(()));
    }

    #[test]
    fn a_close_that_times_out_reports_the_clicks_not_acknowledged() {
        let timeout = Duration::from_millis(30);
        let (mut task, _commands, _unsubscribes) = task(ClientOptions::new().close_flush_timeout(timeout));
        task.on_connected(5, &Limits::default());
        clicks(&task, 3);
        task.send_clicks(true);
        let first = last_clicks_frame(&task);
        clicks(&task, 4);
        clicks(&task, 5);
        let mut closed = close(&mut task);
        assert_eq!(task.clicks_unacked.len(), 2);
        // The first frame (3 clicks) is acknowledged, the second (9) never is.
        task.on_message(ServerMessage::ClicksAck { up_to: first });
        task.housekeeping();
        assert!(!task.should_exit(), "the deadline has not passed");
        std::thread::sleep(timeout + Duration::from_millis(10));
        task.housekeeping();
        assert!(
            task.should_exit(),
            "the deadline passed: the connection closes anyway"
        );
        task.shutdown(Error::Closed);
        let expected = Err(Error::ClicksUnacknowledged { clicks: 9 });
        assert_eq!(closed.try_recv().expect("answered"), expected);
        // A later close (whose command finds the task gone) gets the same answer.
        assert_eq!(task.core.close_result(), expected);
    }

    #[test]
    fn a_close_while_disconnected_delivers_the_clicks_after_the_reconnect() {
        let (mut task, _commands, _unsubscribes) = task(ClientOptions::new());
        task.on_connected(5, &Limits::default());
        task.on_disconnected();
        clicks(&task, 2);
        let mut closed = close(&mut task);
        assert!(
            task.clicks_unacked.is_empty(),
            "nothing can be sent while disconnected"
        );
        assert!(!task.should_exit(), "the close waits for a reconnect");
        task.on_connected(6, &Limits::default());
        assert_eq!(task.clicks_unacked.len(), 1, "sent after the reconnect");
        task.on_message(ServerMessage::ClicksAck {
            up_to: last_clicks_frame(&task),
        });
        assert!(task.should_exit());
        task.shutdown(Error::Closed);
        assert_eq!(closed.try_recv().expect("answered"), Ok(()));
    }

    #[test]
    fn clicks_dropped_during_a_close_are_reported_not_waited_for() {
        // At most once: the frame sent before the connection broke is dropped, not resent.
        let (mut at_most_once, _commands, _unsubscribes) = task(ClientOptions::new());
        at_most_once.on_connected(5, &Limits::default());
        clicks(&at_most_once, 2);
        let mut closed = close(&mut at_most_once);
        at_most_once.on_disconnected();
        assert!(at_most_once.should_exit(), "no click is left to deliver");
        at_most_once.shutdown(Error::Closed);
        assert_eq!(
            closed.try_recv().expect("answered"),
            Err(Error::ClicksUnacknowledged { clicks: 2 })
        );
        // At least once: it is sent again after the reconnect, and the close waits for it.
        let (mut at_least_once, _commands, _unsubscribes) =
            task(ClientOptions::new().click_delivery(ClickDelivery::AtLeastOnce));
        at_least_once.on_connected(5, &Limits::default());
        clicks(&at_least_once, 2);
        let mut closed = close(&mut at_least_once);
        at_least_once.on_disconnected();
        assert!(!at_least_once.should_exit(), "the clicks wait to be sent again");
        at_least_once.on_connected(6, &Limits::default());
        at_least_once.on_message(ServerMessage::ClicksAck {
            up_to: last_clicks_frame(&at_least_once),
        });
        assert!(at_least_once.should_exit());
        at_least_once.shutdown(Error::Closed);
        assert_eq!(closed.try_recv().expect("answered"), Ok(()));
        // A frame the gateway refuses for good is dropped and reported too.
        let (mut refusing, _commands, _unsubscribes) = task(ClientOptions::new());
        refusing.on_connected(5, &Limits::default());
        clicks(&refusing, 4);
        let mut closed = close(&mut refusing);
        let refused = last_clicks_frame(&refusing);
        refusing.on_error(refused, ErrorCode::Forbidden, "not yours".into(), None);
        assert!(refusing.should_exit());
        refusing.shutdown(Error::Closed);
        assert_eq!(
            closed.try_recv().expect("answered"),
            Err(Error::ClicksUnacknowledged { clicks: 4 })
        );
    }

    #[test]
    fn a_close_refuses_new_work_serves_what_is_outstanding_and_answers_every_close() {
        let (mut task, _commands, _unsubscribes) = task(ClientOptions::new());
        task.on_connected(5, &Limits::default());
        let mut outstanding = request(&mut task, true);
        click(&task);
        let mut first = close(&mut task);
        let mut second = close(&mut task);
        assert!(task
            .closing
            .as_ref()
            .is_some_and(|closing| closing.replies.len() == 2));
        // New work is refused at once.
        let mut late = request(&mut task, true);
        assert_eq!(late.try_recv().expect("answered"), Err(Error::Closed));
        let (_, mut committed) = submit(&mut task);
        assert_eq!(committed.try_recv().expect("answered"), Err(Error::Closed));
        assert!(task.events.is_empty());
        let (mut subscribed, _activities) = subscribe(&mut task, 1);
        assert_eq!(subscribed.try_recv().expect("answered"), Err(Error::Closed));
        // A flush waits for the same acknowledgement.
        let mut flushed = flush(&mut task);
        // What was outstanding is still answered.
        let request_id = match task
            .pending
            .iter()
            .find(|(_, p)| matches!(p, Pending::External(_)))
        {
            Some((request_id, _)) => *request_id,
            None => panic!("the outstanding request is kept"),
        };
        task.on_message(ServerMessage::Pong {
            request_id,
            server_unix_ms: 1,
        });
        assert!(outstanding.try_recv().expect("answered").is_ok());
        task.on_message(ServerMessage::ClicksAck {
            up_to: last_clicks_frame(&task),
        });
        assert_eq!(flushed.try_recv().expect("answered"), Ok(()));
        assert!(task.should_exit());
        task.shutdown(Error::Closed);
        assert_eq!(first.try_recv().expect("answered"), Ok(()));
        assert_eq!(second.try_recv().expect("answered"), Ok(()));
    }

    #[test]
    fn a_task_that_stops_by_itself_reports_the_clicks_it_held() {
        let (mut task, _commands, _unsubscribes) = task(ClientOptions::new());
        task.on_connected(5, &Limits::default());
        clicks(&task, 5);
        task.on_disconnected();
        task.shutdown(Error::AuthRefused {
            code: ErrorCode::ExpiredToken,
            message: "expired".into(),
        });
        assert!(task.core.closed.load(Ordering::Acquire));
        assert_eq!(
            task.core.close_result(),
            Err(Error::ClicksUnacknowledged { clicks: 5 })
        );
    }

    #[test]
    fn credentials_refused_at_a_reconnect_fail_every_event_in_flight_with_auth_refused() {
        let (mut task, _commands, _unsubscribes) = task(ClientOptions::new());
        task.on_connected(5, &Limits::default());
        // Accepted: it reached a gateway and still reaches the chain.
        let (accepted_id, mut accepted_accepted, mut accepted_committed) = submit_tracked(&mut task);
        let request_id = task.events[&accepted_id].request_id;
        task.on_message(ServerMessage::Accepted {
            request_id,
            event_id: accepted_id,
        });
        assert_eq!(accepted_accepted.try_recv().expect("answered"), Ok(()));
        // Sent, then the connection broke before any answer: a gateway may have taken it.
        let (sent_id, sent_accepted, sent_committed) = submit_tracked(&mut task);
        task.on_disconnected();
        assert!(task.events[&accepted_id].maybe_applied && task.events[&sent_id].maybe_applied);
        // Submitted while disconnected: no gateway ever received it.
        let (unsent_id, unsent_accepted, unsent_committed) = submit_tracked(&mut task);
        assert!(!task.events[&unsent_id].maybe_applied);
        // The reconnect's authentication is refused (`run` hands the error to `shutdown`).
        let refused = Error::AuthRefused {
            code: ErrorCode::ExpiredToken,
            message: "expired".into(),
        };
        task.shutdown(refused.clone());
        assert!(task.events.is_empty());
        // Whether or not the event reached a gateway: `AuthRefused`, as `Closed`, says nothing
        // about it. Not `OutcomeUnknown`, which promises that it can no longer apply, nor
        // `Expired`, which promises that it never applied.
        for (mut accepted, mut committed) in [
            (sent_accepted, sent_committed),
            (unsent_accepted, unsent_committed),
        ] {
            assert_eq!(accepted.try_recv().expect("answered"), Err(refused.clone()));
            assert_eq!(committed.try_recv().expect("answered"), Err(refused.clone()));
        }
        assert_eq!(
            accepted_committed.try_recv().expect("answered"),
            Err(refused.clone())
        );
        assert_eq!(refused.kind(), crate::ErrorKind::Auth);
        assert!(!refused.is_retryable());
    }

    #[test]
    fn closing_ends_a_subscription_with_closed() {
        use futures::FutureExt;
        let (mut task, _commands, unsubscribes) = task(ClientOptions::new());
        task.on_connected(5, &Limits::default());
        let (end, receiver) = subscribe_with_end(&mut task, 1);
        let request_id = subscribe_request(&task, 1);
        task.on_message(ServerMessage::Subscribed {
            request_id,
            subscription_id: 77,
        });
        let mut subscription = crate::subscription::Subscription {
            local_id: 1,
            receiver,
            end,
            unsubscribe: unsubscribes,
            finished: false,
        };
        task.shutdown(Error::Closed);
        assert_eq!(
            subscription.next().now_or_never(),
            Some(Some(Err(Error::Closed))),
            "one final error"
        );
        assert_eq!(subscription.next().now_or_never(), Some(None));
    }
}
