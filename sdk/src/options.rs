//! Connecting: credentials, the consuming options builder, the reconnect policy (backoff) and the
//! observable connection state.

use std::time::Duration;

use hoard_types::wire::{SessionToken, EVENTS_IN_FLIGHT_PER_CONNECTION_MAX, WS_PATH};
use hoard_types::{Keypair, TenantId};

use crate::error::{Error, Result};

/// Who the client authenticates as.
#[derive(Clone, Debug)]
pub enum Credentials {
    /// A studio backend: the tenant and its studio key. The key answers the gateway's challenge
    /// and signs the studio's transactions.
    Studio {
        /// The studio's tenant.
        tenant: TenantId,
        /// The tenant's studio key.
        key: Keypair,
    },
    /// A player: a session token its studio issued ([`crate::keys::issue_session_token`]), and, for
    /// a self-custody account, the player's key (it signs the player's transfers and trades).
    Player {
        /// The studio-signed session token.
        token: SessionToken,
        /// The player's own key (self-custody), if any.
        key: Option<Keypair>,
    },
}

impl Credentials {
    /// Studio credentials.
    pub fn studio(tenant: TenantId, key: Keypair) -> Credentials {
        Credentials::Studio { tenant, key }
    }

    /// A player with only a session token (custodial account: the studio signs for it).
    pub fn player(token: SessionToken) -> Credentials {
        Credentials::Player { token, key: None }
    }

    /// A self-custody player: a session token and the player's own key.
    pub fn player_with_key(token: SessionToken, key: Keypair) -> Credentials {
        Credentials::Player {
            token,
            key: Some(key),
        }
    }

    /// The tenant these credentials are for.
    pub fn tenant(&self) -> TenantId {
        match self {
            Credentials::Studio { tenant, .. } => *tenant,
            Credentials::Player { token, .. } => token.tenant,
        }
    }

    /// The key this client signs transactions with, if any.
    pub fn signing_key(&self) -> Option<&Keypair> {
        match self {
            Credentials::Studio { key, .. } => Some(key),
            Credentials::Player { key, .. } => key.as_ref(),
        }
    }
}

/// The connection's state, observable with [`crate::Client::state`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionState {
    /// Connected and authenticated.
    Connected,
    /// The connection broke; a reconnect is scheduled.
    Disconnected,
    /// Trying to connect again (`attempt` counts from 1).
    Reconnecting {
        /// The attempt's number, from 1.
        attempt: u32,
    },
    /// Closed for good (by [`crate::Client::close`] once it stopped waiting for its clicks, by
    /// dropping the last handle, by credentials refused at a reconnect, or by the reconnect
    /// policy giving up). Every operation still outstanding then has failed.
    Closed,
}

/// How the client reconnects: capped exponential backoff with full jitter.
///
/// Attempt `n` (counting from 1) waits a uniformly random time in `[delay/2, delay]` where
/// `delay = min(max_delay, initial_delay * 2^(n-1))`. The first attempt after a connection that
/// had been up waits `initial_delay` at most. `max_attempts: None` retries forever; when the
/// attempts run out the client closes and every outstanding operation fails with
/// [`Error::Closed`]. A refused authentication (bad key, expired session token) is never retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReconnectPolicy {
    /// The first delay.
    pub initial_delay: Duration,
    /// The cap.
    pub max_delay: Duration,
    /// Give up after this many consecutive failed attempts (None: never).
    pub max_attempts: Option<u32>,
}

impl Default for ReconnectPolicy {
    fn default() -> ReconnectPolicy {
        ReconnectPolicy {
            initial_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(5),
            max_attempts: None,
        }
    }
}

impl ReconnectPolicy {
    /// The delay before attempt `attempt` (from 1), given a uniform random `unit` in `[0, 1)`.
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let exponent = attempt.saturating_sub(1).min(30);
        let uncapped = self.initial_delay.saturating_mul(1u32 << exponent);
        let delay = uncapped.min(self.max_delay);
        let half = delay / 2;
        half + half.mul_f64(unit.clamp(0.0, 1.0))
    }
}

/// How clicks that were sent but not acknowledged when a connection broke are treated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClickDelivery {
    /// Drop them (the gateway may or may not have counted them): clicks are never counted twice.
    /// Clicks not yet sent are always sent after the reconnect. Likewise, clicks a strict-mode
    /// gateway refuses with `unavailable` (which it keeps and may still count) are dropped, and
    /// the `flush_clicks` waiting on them fails with that refusal; clicks refused with `busy` or
    /// `rate_limited` (which the gateway did not keep) are sent again. The default, matching the
    /// gateway's default (at-most-once) mode.
    AtMostOnce,
    /// Send them again on the new connection, and after an `unavailable` refusal: clicks are
    /// never lost, but may be counted twice. For gateways in strict mode.
    AtLeastOnce,
}

/// How long `close` waits for clicks to be acknowledged by default.
pub const CLOSE_FLUSH_TIMEOUT_DEFAULT: Duration = Duration::from_secs(5);

/// Most click frames the client buffers (sealed but not sent, plus sent but not acknowledged).
pub const CLICK_FRAMES_BUFFERED_MAX_DEFAULT: usize = 64;

/// The consuming options builder for [`crate::Client`].
///
/// ```no_run
/// # async fn run() -> hoard_sdk::Result<()> {
/// use std::time::Duration;
/// use hoard_sdk::{ClientOptions, Credentials, Keypair, TenantId};
/// let client = ClientOptions::new()
///     .request_timeout(Duration::from_secs(5))
///     .max_in_flight_events(256)
///     .click_flush_interval(Duration::from_millis(10))
///     .connect("ws://127.0.0.1:8080", Credentials::studio(TenantId(1), Keypair::generate()))
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct ClientOptions {
    pub(crate) connect_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) close_flush_timeout: Duration,
    pub(crate) reconnect: ReconnectPolicy,
    pub(crate) max_in_flight_events: usize,
    pub(crate) click_flush_interval: Duration,
    pub(crate) click_frames_buffered_max: usize,
    pub(crate) click_delivery: ClickDelivery,
    pub(crate) expiry_margin_blocks: u64,
    pub(crate) head_refresh_interval: Duration,
    pub(crate) status_poll_after: Duration,
    pub(crate) subscription_buffer: usize,
    pub(crate) read_buffer_bytes: usize,
}

impl Default for ClientOptions {
    fn default() -> ClientOptions {
        ClientOptions {
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            close_flush_timeout: CLOSE_FLUSH_TIMEOUT_DEFAULT,
            reconnect: ReconnectPolicy::default(),
            max_in_flight_events: EVENTS_IN_FLIGHT_PER_CONNECTION_MAX,
            click_flush_interval: Duration::from_millis(10),
            click_frames_buffered_max: CLICK_FRAMES_BUFFERED_MAX_DEFAULT,
            click_delivery: ClickDelivery::AtMostOnce,
            expiry_margin_blocks: 10_000,
            head_refresh_interval: Duration::from_secs(1),
            status_poll_after: Duration::from_secs(5),
            subscription_buffer: 4096,
            read_buffer_bytes: 32 * 1024,
        }
    }
}

impl ClientOptions {
    /// The defaults.
    pub fn new() -> ClientOptions {
        ClientOptions::default()
    }

    /// Time allowed for one connection attempt (TCP, WebSocket handshake, hello, authentication).
    /// Default 10 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> ClientOptions {
        self.connect_timeout = timeout;
        self
    }

    /// Time a read or control request may wait for its answer, reconnects included (asset events
    /// have no timeout: they resolve when they commit or expire). Default 30 s.
    pub fn request_timeout(mut self, timeout: Duration) -> ClientOptions {
        self.request_timeout = timeout;
        self
    }

    /// How long [`crate::Client::close`] waits for the clicks it holds (buffered, or sent and not
    /// yet acknowledged) to be acknowledged, reconnects included, before it closes anyway and
    /// reports those left with [`Error::ClicksUnacknowledged`]. `Duration::ZERO` does not wait
    /// (buffered clicks are still sent if connected, but reported unacknowledged). Default 5 s.
    pub fn close_flush_timeout(mut self, timeout: Duration) -> ClientOptions {
        self.close_flush_timeout = timeout;
        self
    }

    /// The reconnect policy. Default: 50 ms doubling up to 5 s, forever.
    pub fn reconnect(mut self, policy: ReconnectPolicy) -> ClientOptions {
        self.reconnect = policy;
        self
    }

    /// Most asset events submitted but not yet committed or rejected. A submit beyond it waits for
    /// a permit (backpressure). Default and maximum 1024 (the gateway's per-connection limit; a
    /// lower limit announced by the gateway wins).
    pub fn max_in_flight_events(mut self, events: usize) -> ClientOptions {
        self.max_in_flight_events = events.clamp(1, EVENTS_IN_FLIGHT_PER_CONNECTION_MAX);
        self
    }

    /// How often buffered clicks are sent (a full frame is sent at once). Default 10 ms.
    pub fn click_flush_interval(mut self, interval: Duration) -> ClientOptions {
        self.click_flush_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// Most click frames buffered (unsent plus unacknowledged); beyond it `click` fails with
    /// [`Error::ClicksBackpressure`]. Default 64 (up to 131072 clicks).
    pub fn click_frames_buffered_max(mut self, frames: usize) -> ClientOptions {
        self.click_frames_buffered_max = frames.max(1);
        self
    }

    /// What to do with unacknowledged clicks after a reconnect. Default [`ClickDelivery::AtMostOnce`].
    pub fn click_delivery(mut self, delivery: ClickDelivery) -> ClientOptions {
        self.click_delivery = delivery;
        self
    }

    /// Transactions expire this many blocks after the chain head the client knows (at most the
    /// protocol's window of 100000). A retry after a long outage can still apply until then.
    /// Default 10000.
    pub fn expiry_margin_blocks(mut self, blocks: u64) -> ClientOptions {
        self.expiry_margin_blocks = blocks.clamp(1, hoard_types::constants::EXPIRY_HORIZON_BLOCKS_MAX - 1);
        self
    }

    /// How often the client reads the chain head again while asset events are in flight (an idle
    /// client does not; see [`crate::Client::known_head`]). Default 1 s.
    pub fn head_refresh_interval(mut self, interval: Duration) -> ClientOptions {
        self.head_refresh_interval = interval.max(Duration::from_millis(10));
        self
    }

    /// An accepted event not committed after this long is also checked with `event_status`
    /// (every second), in case its `committed` push was lost. Default 5 s.
    pub fn status_poll_after(mut self, after: Duration) -> ClientOptions {
        self.status_poll_after = after;
        self
    }

    /// Activities buffered per subscription before its consumer counts as lagging. Default 4096.
    pub fn subscription_buffer(mut self, activities: usize) -> ClientOptions {
        self.subscription_buffer = activities.max(1);
        self
    }

    /// The socket read buffer (allocated per connection). Default 32 KiB; a process simulating
    /// many thousands of player connections can lower it to a few KiB.
    pub fn read_buffer_bytes(mut self, bytes: usize) -> ClientOptions {
        self.read_buffer_bytes = bytes.max(1024);
        self
    }

    /// Connects with these options (see [`crate::Client::connect`]).
    pub async fn connect(self, url: &str, credentials: Credentials) -> Result<crate::Client> {
        crate::Client::connect_with(url, credentials, self).await
    }
}

/// Normalises a gateway address: `ws://` or `wss://` URLs (the `/v1` path is added when the path is
/// empty), or a bare `host:port` (taken as `ws://host:port/v1`).
pub fn normalize_url(url: &str) -> Result<String> {
    let url = url.trim();
    let invalid = |reason| Error::InvalidUrl {
        url: url.to_owned(),
        reason,
    };
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (scheme.to_ascii_lowercase(), rest),
        None => ("ws".to_owned(), url),
    };
    if scheme != "ws" && scheme != "wss" {
        return Err(invalid("the scheme must be ws:// or wss://"));
    }
    let (authority, path) = match rest.find('/') {
        Some(index) => (&rest[..index], &rest[index..]),
        None => (rest, ""),
    };
    if authority.is_empty() {
        return Err(invalid("no host"));
    }
    let path = if path.is_empty() || path == "/" {
        WS_PATH
    } else {
        path
    };
    Ok(format!("{scheme}://{authority}{path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_normalised() {
        assert_eq!(
            normalize_url("ws://127.0.0.1:8080").unwrap(),
            "ws://127.0.0.1:8080/v1"
        );
        assert_eq!(normalize_url("ws://h:1/").unwrap(), "ws://h:1/v1");
        assert_eq!(normalize_url("wss://h.example/v1").unwrap(), "wss://h.example/v1");
        assert_eq!(normalize_url("localhost:9").unwrap(), "ws://localhost:9/v1");
        assert_eq!(normalize_url("WS://h:1/custom").unwrap(), "ws://h:1/custom");
        assert!(normalize_url("http://h:1").is_err());
        assert!(normalize_url("ws:///v1").is_err());
    }

    #[test]
    fn backoff_doubles_is_capped_and_jittered() {
        let policy = ReconnectPolicy {
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            max_attempts: None,
        };
        assert_eq!(policy.delay(1, 0.999_999).as_millis(), 99);
        assert_eq!(policy.delay(1, 0.0), Duration::from_millis(50));
        assert_eq!(policy.delay(2, 0.0), Duration::from_millis(100));
        assert_eq!(policy.delay(3, 0.0), Duration::from_millis(200));
        assert_eq!(policy.delay(10, 0.0), Duration::from_millis(500));
        assert!(policy.delay(10, 0.99) <= Duration::from_secs(1));
        assert!(policy.delay(u32::MAX, 0.5) <= Duration::from_secs(1));
    }
}
