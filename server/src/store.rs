//! The click store and the accepted-event stream behind one narrow interface, [`Store`], with two
//! backends:
//! - [`Store::Redis`] (the default; durable and shared by every gateway of a deployment): a
//!   reconnecting connection, MULTI/EXEC pipelines and Lua scripts. Every key it uses is built
//!   here (one place, so that the layout in `docs/PROTOCOL.md` is this file's).
//! - [`Store::Embedded`]: [`EmbeddedStore`], the same semantics in this process's memory,
//!   bounded and **not durable** (a gateway crash loses clicks and accepted events not yet
//!   committed; the SDK's resend restores those events). For `hoard demo` / `hoard dev` on a
//!   machine without redis-server, and for tests; one gateway only.
//!
//! Callers (the click flusher and reads, the event writer, batcher and acker, settlement, the
//! readiness probe) call the operations here, never Redis directly.
//!
//! Redis keys carry the tenant in a hash tag (`hoard:{7}:...`) so that one tenant's keys live on
//! one Redis Cluster slot (settlement's scripts touch several of them at once).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::streams::{StreamAutoClaimOptions, StreamAutoClaimReply, StreamReadOptions, StreamReadReply};
use redis::AsyncCommands;
use tokio::sync::Mutex;

use hoard_types::{PublicKey, TenantId};

use crate::config::{GatewayConfig, StoreBackend};
use crate::constants::{CLICK_FLUSH_COMMANDS_MAX, COUNTERS_PER_TENANT_MAX};
pub use crate::embedded::EmbeddedStore;

/// What the embedded backend means for its user, in one sentence (the demo prints it).
pub const EMBEDDED_NOTICE: &str = "the embedded in-memory click store (NOT durable: a gateway crash loses \
     clicks and accepted events not yet committed; the SDK's resend restores events)";

/// Stream entry field holding the MessagePack of the `Transaction`.
pub const FIELD_TX: &str = "tx";

/// Keys in one click flush part ([`Store::add_clicks`]): 4 Redis commands per key at most.
pub const CLICK_PART_KEYS_MAX: usize = CLICK_FLUSH_COMMANDS_MAX / 4;

/// How long Redis remembers a gateway run's last applied click flush part
/// (`hoard:clicks:flushed:<run>`; refreshed by every flush).
pub const CLICK_RUN_TTL_SECONDS: u64 = 86_400;

/// One click total to add: (tenant, counter, player) and the count.
pub type ClickKey = (TenantId, Arc<str>, PublicKey);

/// A failed store operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The embedded store reached one of its bounds (the caller answers `busy` / retries).
    #[error("embedded store full: {0}")]
    Full(&'static str),
    #[error("bad stream entry id {0:?}")]
    BadStreamId(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// One entry of the event stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamEntry {
    /// The stream id (`<ms>-<seq>`).
    pub id: String,
    /// The entry's `tx` field (None: missing, an entry some other writer made).
    pub tx: Option<Vec<u8>>,
}

/// What [`StreamReader::claim`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Claimed {
    /// Where the next claim scan starts (`0-0`: the scan went round).
    pub next_cursor: String,
    pub entries: Vec<StreamEntry>,
}

/// What [`Store::settle_cut`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SettleCut {
    /// The open window (cut by this call or before).
    pub window: u64,
    /// True if this call cut it.
    pub cut: bool,
}

/// The gateway's store (see the module docs).
pub enum Store {
    Redis(Box<RedisStore>),
    Embedded(Arc<EmbeddedStore>),
}

impl Store {
    /// The backend the configuration names (Redis is connected lazily, at the first operation).
    pub fn open(config: &GatewayConfig) -> StoreResult<Store> {
        Ok(match config.store {
            StoreBackend::Redis => Store::Redis(Box::new(RedisStore {
                handle: RedisHandle::new(
                    &config.redis.url,
                    Duration::from_millis(config.redis.connect_timeout_ms),
                    Duration::from_millis(config.redis.command_timeout_ms),
                )?,
                flush_script: redis::Script::new(FLUSH_SCRIPT),
                stream: config.redis.stream.clone(),
                group: config.redis.group.clone(),
            })),
            StoreBackend::Embedded => Store::Embedded(Arc::new(EmbeddedStore::new())),
        })
    }

    /// False for the embedded backend (a crash loses what it holds).
    pub fn is_durable(&self) -> bool {
        matches!(self, Store::Redis(_))
    }

    /// Readiness: Redis answers PING (the embedded store always does).
    pub async fn ping(&self) -> StoreResult<()> {
        match self {
            Store::Redis(redis) => redis.checked(redis.ping().await).await,
            Store::Embedded(_) => Ok(()),
        }
    }

    /// Sets this gateway's marker key (`consumer`'s) if it is missing and refreshes its expiry,
    /// in one round trip. `Ok(false)`: it was missing, so Redis lost what it held since the
    /// marker was set (it restarted without persistence). The embedded store cannot lose its data
    /// without this process: always `Ok(true)`.
    pub async fn check_marker(&self, consumer: &str) -> StoreResult<bool> {
        match self {
            Store::Redis(redis) => redis.checked(redis.check_marker(consumer).await).await,
            Store::Embedded(_) => Ok(true),
        }
    }

    // ----- clicks -----

    /// Adds one flush part of click totals: per key the player's counter total, its leaderboard
    /// score and its unsettled points, and per (tenant, counter) the counter total. At most
    /// [`CLICK_PART_KEYS_MAX`] keys (the caller splits larger flushes). The part applies whole or
    /// not at all, and only once: it is applied only if `seq` is greater than the last sequence
    /// number applied for `run` (the gateway run's id), which it then records, atomically (Redis:
    /// one `EVALSHA` of [`FLUSH_SCRIPT`], one round trip). `Ok(false)`: already applied (a retry
    /// of a part whose reply was lost). Parts of one run must be applied in sequence order.
    pub async fn add_clicks(&self, run: &str, seq: u64, part: &[(ClickKey, u64)]) -> StoreResult<bool> {
        debug_assert!(part.len() <= CLICK_PART_KEYS_MAX);
        match self {
            Store::Redis(redis) => redis.checked(redis.add_clicks(run, seq, part).await).await,
            Store::Embedded(embedded) => embedded.add_clicks_once(run, seq, part),
        }
    }

    /// The total of a counter over all players.
    pub async fn counter_total(&self, tenant: TenantId, counter: &str) -> StoreResult<u64> {
        match self {
            Store::Redis(redis) => redis.checked(redis.counter_total(tenant, counter).await).await,
            Store::Embedded(embedded) => Ok(embedded.counter_total(tenant, counter)),
        }
    }

    /// One player's total of a counter.
    pub async fn player_total(
        &self,
        tenant: TenantId,
        counter: &str,
        player: &PublicKey,
    ) -> StoreResult<u64> {
        match self {
            Store::Redis(redis) => {
                redis
                    .checked(redis.player_total(tenant, counter, player).await)
                    .await
            }
            Store::Embedded(embedded) => Ok(embedded.player_total(tenant, counter, player)),
        }
    }

    /// Every counter total of one player, by counter name (zero totals left out; at most
    /// [`COUNTERS_PER_TENANT_MAX`] counters, the first by name).
    pub async fn player_totals(
        &self,
        tenant: TenantId,
        player: &PublicKey,
    ) -> StoreResult<Vec<(String, u64)>> {
        match self {
            Store::Redis(redis) => redis.checked(redis.player_totals(tenant, player).await).await,
            Store::Embedded(embedded) => Ok(embedded.player_totals(tenant, player)),
        }
    }

    /// The top `limit` (1 or more) players of a counter, highest first; equal scores in
    /// descending order of the player's hex (Redis's ZREVRANGE order).
    pub async fn leaderboard(
        &self,
        tenant: TenantId,
        counter: &str,
        limit: usize,
    ) -> StoreResult<Vec<(PublicKey, u64)>> {
        let limit = limit.max(1);
        match self {
            Store::Redis(redis) => {
                redis
                    .checked(redis.leaderboard(tenant, counter, limit).await)
                    .await
            }
            Store::Embedded(embedded) => Ok(embedded.leaderboard(tenant, counter, limit)),
        }
    }

    /// Points not yet settled on a counter, per player hex (for operators and tests).
    pub async fn unsettled(&self, tenant: TenantId, counter: &str) -> StoreResult<HashMap<String, u64>> {
        match self {
            Store::Redis(redis) => redis.checked(redis.unsettled(tenant, counter).await).await,
            Store::Embedded(embedded) => Ok(embedded.unsettled(tenant, counter)),
        }
    }

    // ----- settlement windows (see `settlement`: cut, plan, advance) -----

    /// The tenant's current settlement window: the open one, or (after an advance) the lowest
    /// number the next one may get. None before the first cut (or after Redis lost it).
    pub async fn settle_window(&self, tenant: TenantId) -> StoreResult<Option<u64>> {
        match self {
            Store::Redis(redis) => redis.checked(redis.settle_window(tenant).await).await,
            Store::Embedded(embedded) => Ok(embedded.settle_window(tenant)),
        }
    }

    /// Sets the current window (an operator redoing a window: always safe, a window whose cut
    /// flag is still kept is redone from its plan; one whose cut flag is gone is not cut again,
    /// the next cut numbers a new window).
    pub async fn set_settle_window(&self, tenant: TenantId, window: u64) -> StoreResult<()> {
        match self {
            Store::Redis(redis) => redis.checked(redis.set_settle_window(tenant, window).await).await,
            Store::Embedded(embedded) => {
                embedded.set_settle_window(tenant, window);
                Ok(())
            }
        }
    }

    /// Cut: opens the tenant's settlement window, atomically. If the current window is cut
    /// already (a retry, or another gateway settling it), that window, unchanged. Otherwise a
    /// new window numbered `max(current, clock)` (the clock in microseconds since the Unix
    /// epoch: Redis's `TIME`, or this process's clock for the embedded store) becomes current,
    /// each counter's unsettled points move into its snapshot, and its cut flag is set.
    ///
    /// Why the number is taken at the cut and from the clock: a window's event ids are derived
    /// from its number, and the chain answers a committed event id with its old outcome, so a
    /// number cut twice would make the second cut's points vanish. The store can lose its
    /// counter (Redis restarted without persistence, the embedded store with its process) or
    /// go back to an older one (Redis restored from a snapshot, or AOF `everysec` losing its
    /// last second: the restored current window may have been cut and committed after it).
    /// Numbering at the cut makes every number cut at most once whatever the store forgot:
    /// - each window is numbered at least the clock reading of its cut, and more only when the
    ///   counter is ahead of the clock, which needs more than one cut per microsecond (a cut
    ///   follows the previous window's plan, durable submission and advance: never that fast);
    ///   so every window cut before a loss is at most the clock reading of its cut, and a cut
    ///   after the loss, being later, reads a higher clock;
    /// - while the counter is kept, numbers only increase (`max`), whatever the clock does.
    ///
    /// The clock stepping backwards matters only together with such a loss: if the clock at the
    /// first cut after the loss reads no more than a window cut before it, that number can be
    /// cut again and its points vanish, until the clock passes the last number used. (Windows
    /// are about a settle interval apart, so this takes a step back larger than the time since
    /// the last cut before the loss.) Redis's clock is one clock for every gateway sharing it.
    ///
    /// An uncut current window has nothing to redo (no snapshot, no plan), so giving the next
    /// cut a new number keeps retries idempotent: they find the window cut and reuse it, its
    /// snapshot, plan and event ids.
    pub async fn settle_cut(&self, tenant: TenantId, counters: &[&str]) -> StoreResult<SettleCut> {
        match self {
            Store::Redis(redis) => redis.checked(redis.settle_cut(tenant, counters).await).await,
            Store::Embedded(embedded) => Ok(embedded.settle_cut(tenant, counters)),
        }
    }

    /// A window's snapshot of one counter, per player hex.
    pub async fn settle_snapshot(
        &self,
        tenant: TenantId,
        window: u64,
        counter: &str,
    ) -> StoreResult<Vec<(String, u64)>> {
        match self {
            Store::Redis(redis) => {
                redis
                    .checked(redis.settle_snapshot(tenant, window, counter).await)
                    .await
            }
            Store::Embedded(embedded) => Ok(embedded.settle_snapshot(tenant, window, counter)),
        }
    }

    /// A window's stored plan, if any.
    pub async fn settle_plan(&self, tenant: TenantId, window: u64) -> StoreResult<Option<Vec<u8>>> {
        match self {
            Store::Redis(redis) => redis.checked(redis.settle_plan(tenant, window).await).await,
            Store::Embedded(embedded) => Ok(embedded.settle_plan(tenant, window)),
        }
    }

    /// Stores `plan` as the window's plan unless one is stored; only if it was stored, adds the
    /// carries `(counter, player hex, points)` back to unsettled (atomically with storing).
    /// Returns the window's plan (this one or the earlier one).
    pub async fn settle_store_plan(
        &self,
        tenant: TenantId,
        window: u64,
        plan: &[u8],
        carries: &[(String, String, u64)],
    ) -> StoreResult<Vec<u8>> {
        match self {
            Store::Redis(redis) => {
                redis
                    .checked(redis.settle_store_plan(tenant, window, plan, carries).await)
                    .await
            }
            Store::Embedded(embedded) => Ok(embedded.settle_store_plan(tenant, window, plan, carries)),
        }
    }

    /// Advance: the current window becomes `window + 1` if it is `window` (compare-and-set).
    /// True if this call advanced it; then the window's snapshot is dropped and its plan and cut
    /// flag age out.
    pub async fn settle_advance(
        &self,
        tenant: TenantId,
        window: u64,
        counters: &[&str],
    ) -> StoreResult<bool> {
        match self {
            Store::Redis(redis) => {
                redis
                    .checked(redis.settle_advance(tenant, window, counters).await)
                    .await
            }
            Store::Embedded(embedded) => Ok(embedded.settle_advance(tenant, window)),
        }
    }

    // ----- the accepted-event stream -----

    /// Creates the consumer group (from the stream's start, so nothing written before is missed).
    pub async fn ensure_group(&self) -> StoreResult<()> {
        match self {
            Store::Redis(redis) => redis.checked(redis.ensure_group().await).await,
            Store::Embedded(_) => Ok(()),
        }
    }

    /// Appends one entry per transaction (MessagePack bytes); their ids, in order. All or
    /// nothing from the caller's view: on an error none counts as durable.
    pub async fn append(&self, transactions: &[&[u8]]) -> StoreResult<Vec<String>> {
        match self {
            Store::Redis(redis) => redis.checked(redis.append(transactions).await).await,
            Store::Embedded(embedded) => embedded.append(transactions),
        }
    }

    /// Whether each entry is still in the stream (Redis: one `XRANGE id id` each, pipelined).
    pub async fn present(&self, ids: &[String]) -> StoreResult<Vec<bool>> {
        match self {
            Store::Redis(redis) => redis.checked(redis.present(ids).await).await,
            Store::Embedded(embedded) => embedded.present(ids),
        }
    }

    /// Acknowledges entries for the group and deletes them from the stream.
    pub async fn ack(&self, ids: &[String]) -> StoreResult<()> {
        match self {
            Store::Redis(redis) => redis.checked(redis.ack(ids).await).await,
            Store::Embedded(embedded) => embedded.ack(ids),
        }
    }

    /// A reader of the stream for one consumer (Redis: its own connection, for blocking reads of
    /// at most `block`).
    pub async fn reader(&self, block: Duration) -> StoreResult<StreamReader> {
        match self {
            Store::Redis(redis) => {
                let connection = redis.handle.dedicated(block).await?;
                Ok(StreamReader::Redis {
                    connection,
                    stream: redis.stream.clone(),
                    group: redis.group.clone(),
                })
            }
            Store::Embedded(embedded) => Ok(StreamReader::Embedded(embedded.clone())),
        }
    }
}

/// Reads the stream through the consumer group. After an error, get a new one.
pub enum StreamReader {
    Redis {
        connection: MultiplexedConnection,
        stream: String,
        group: String,
    },
    Embedded(Arc<EmbeddedStore>),
}

impl StreamReader {
    /// XAUTOCLAIM: from `cursor` on, takes over for `consumer` up to `count` pending entries
    /// idle for at least `min_idle_ms` (a dead gateway's, or ones the chain lost).
    pub async fn claim(
        &mut self,
        consumer: &str,
        min_idle_ms: u64,
        cursor: &str,
        count: usize,
    ) -> StoreResult<Claimed> {
        match self {
            StreamReader::Redis {
                connection,
                stream,
                group,
            } => {
                let reply: StreamAutoClaimReply = connection
                    .xautoclaim_options(
                        stream.as_str(),
                        group.as_str(),
                        consumer,
                        min_idle_ms,
                        cursor,
                        StreamAutoClaimOptions::default().count(count),
                    )
                    .await?;
                Ok(Claimed {
                    next_cursor: reply.next_stream_id,
                    entries: reply.claimed.into_iter().map(entry_of).collect(),
                })
            }
            StreamReader::Embedded(embedded) => embedded.claim(consumer, min_idle_ms, cursor, count),
        }
    }

    /// XREADGROUP `>`: up to `count` entries never delivered to the group, now pending for
    /// `consumer`; waits up to `block_ms` for one (0: until one comes). Cancel-safe.
    pub async fn read(
        &mut self,
        consumer: &str,
        count: usize,
        block_ms: u64,
    ) -> StoreResult<Vec<StreamEntry>> {
        match self {
            StreamReader::Redis {
                connection,
                stream,
                group,
            } => {
                let options = StreamReadOptions::default()
                    .group(group.as_str(), consumer)
                    .count(count)
                    .block(block_ms as usize);
                let reply: Option<StreamReadReply> = connection
                    .xread_options(&[stream.as_str()], &[">"], &options)
                    .await?;
                Ok(reply
                    .into_iter()
                    .flat_map(|r| r.keys)
                    .flat_map(|k| k.ids)
                    .map(entry_of)
                    .collect())
            }
            StreamReader::Embedded(embedded) => Ok(embedded.read(consumer, count, block_ms).await),
        }
    }
}

fn entry_of(entry: redis::streams::StreamId) -> StreamEntry {
    StreamEntry {
        tx: entry.get(FIELD_TX),
        id: entry.id,
    }
}

// ----- the Redis backend -----

/// A Redis connection that is re-established after a failure.
/// Every connection has a connect and a response timeout: a Redis that stops answering turns
/// into `unavailable` answers and a reconnect, never into a request that hangs.
pub struct RedisHandle {
    client: redis::Client,
    connection: Mutex<Option<MultiplexedConnection>>,
    connect_timeout: Duration,
    command_timeout: Duration,
}

impl RedisHandle {
    pub fn new(
        url: &str,
        connect_timeout: Duration,
        command_timeout: Duration,
    ) -> redis::RedisResult<RedisHandle> {
        Ok(RedisHandle {
            client: redis::Client::open(url)?,
            connection: Mutex::new(None),
            connect_timeout,
            command_timeout,
        })
    }

    async fn connect(&self, response_timeout: Duration) -> redis::RedisResult<MultiplexedConnection> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(self.connect_timeout)
            .set_response_timeout(response_timeout);
        self.client
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }

    /// A connection (cheap clone of the shared multiplexed one), connecting if needed.
    pub async fn get(&self) -> redis::RedisResult<MultiplexedConnection> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref() {
            return Ok(connection.clone());
        }
        let connection = self.connect(self.command_timeout).await?;
        *slot = Some(connection.clone());
        Ok(connection)
    }

    /// A fresh connection of its own for blocking commands (XREADGROUP BLOCK up to `block`):
    /// its response timeout is the command timeout plus `block`.
    pub async fn dedicated(&self, block: Duration) -> redis::RedisResult<MultiplexedConnection> {
        self.connect(self.command_timeout + block).await
    }

    /// Forgets the shared connection after an I/O failure so that the next `get` reconnects.
    pub async fn reset_if_broken(&self, error: &redis::RedisError) {
        if error.is_io_error() || error.is_connection_dropped() || error.is_timeout() {
            *self.connection.lock().await = None;
        }
    }
}

/// The Redis backend: the handle and the stream's names.
pub struct RedisStore {
    pub handle: RedisHandle,
    /// [`FLUSH_SCRIPT`], hashed once.
    flush_script: redis::Script,
    stream: String,
    group: String,
}

/// One click flush part, applied once per (run, sequence number). KEYS[1] = the run's key;
/// ARGV[1] = sequence number, ARGV[2] = the run key's TTL, ARGV[3] = g, the (tenant, counter)
/// groups. Then per group: KEYS counter, leaderboard, unsettled, totals and ARGV counter name, the
/// group's sum, m (its players), then m times player, count. Each key is declared once per group,
/// not once per player: Redis parses two strings per click key instead of five.
/// Returns 1 if applied, 0 if already applied.
pub const FLUSH_SCRIPT: &str = r"
local seq = tonumber(ARGV[1])
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
if seq <= last then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
local k = 2
local a = 4
for _ = 1, tonumber(ARGV[3]) do
  local counter, leaderboard, unsettled = KEYS[k], KEYS[k + 1], KEYS[k + 2]
  redis.call('HINCRBY', KEYS[k + 3], ARGV[a], ARGV[a + 1])
  local first = a + 3
  local m = tonumber(ARGV[a + 2])
  for j = first, first + 2 * (m - 1), 2 do
    local player, count = ARGV[j], ARGV[j + 1]
    redis.call('HINCRBY', counter, player, count)
    redis.call('ZINCRBY', leaderboard, count, player)
    redis.call('HINCRBY', unsettled, player, count)
  end
  k = k + 4
  a = first + 2 * m
end
return 1
";

/// The cut ([`Store::settle_cut`] says why the number comes from the clock). KEYS[1] = the window
/// counter, KEYS[2..] = each counter's unsettled hash; ARGV[1] = the tenant's settlement key
/// prefix (`hoard:{7}:settle:`), ARGV[2..] = the counter names (same order). The window's own
/// keys (`<prefix><W>:cut`, `<prefix><W>:c:<counter>`) depend on the number chosen here, so the
/// script builds them: they carry the tenant's hash tag like its declared keys, so they are on
/// the same Redis Cluster slot. `TIME` before writes needs effects replication (the default
/// since Redis 5, the only mode since 7). Returns {window, 1 if cut now, 0 if it was cut}.
/// Numbers are kept as decimal strings; the clock's (about 1.7e15) is exact in Lua's doubles.
const CUT_SCRIPT: &str = r"
local w = redis.call('GET', KEYS[1])
if w and redis.call('EXISTS', ARGV[1] .. w .. ':cut') == 1 then return {w, 0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local current = w and tonumber(w)
if not current or current < now then w = string.format('%.0f', now) end
redis.call('SET', KEYS[1], w)
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('RENAME', KEYS[i], ARGV[1] .. w .. ':c:' .. ARGV[i])
  end
end
redis.call('SET', ARGV[1] .. w .. ':cut', '1')
return {w, 1}
";

const PLAN_SCRIPT: &str = r"
if redis.call('SETNX', KEYS[1], ARGV[1]) == 0 then return 0 end
for i = 2, #KEYS do
  redis.call('HINCRBY', KEYS[i], ARGV[2 * i - 2], ARGV[2 * i - 1])
end
return 1
";

/// The advance: compare-and-set of the window counter (a counter lost since the cut is left
/// missing: the next cut numbers a new window from the clock).
const ADVANCE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  return 1
end
return 0
";

/// How long a settled window's plan and cut flag stay in Redis.
const SETTLED_WINDOW_TTL_SECONDS: i64 = 86_400;

impl RedisStore {
    /// Forgets a broken connection so that the next operation reconnects.
    async fn checked<T>(&self, result: redis::RedisResult<T>) -> StoreResult<T> {
        if let Err(error) = &result {
            self.handle.reset_if_broken(error).await;
        }
        Ok(result?)
    }

    async fn check_marker(&self, consumer: &str) -> redis::RedisResult<bool> {
        let key = marker_key(consumer);
        let mut connection = self.handle.get().await?;
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(&key)
            .arg(1)
            .arg("NX")
            .arg("EX")
            .arg(MARKER_TTL_SECONDS);
        pipe.expire(&key, MARKER_TTL_SECONDS as i64).ignore();
        let (set,): (Option<String>,) = pipe.query_async(&mut connection).await?;
        Ok(set.is_none())
    }

    async fn ping(&self) -> redis::RedisResult<()> {
        let mut connection = self.handle.get().await?;
        redis::cmd("PING").query_async::<String>(&mut connection).await?;
        Ok(())
    }

    async fn add_clicks(&self, run: &str, seq: u64, part: &[(ClickKey, u64)]) -> redis::RedisResult<bool> {
        let mut connection = self.handle.get().await?;
        let mut groups: BTreeMap<(TenantId, &str), Vec<(&PublicKey, u64)>> = BTreeMap::new();
        for ((tenant, counter, player), count) in part {
            groups
                .entry((*tenant, counter))
                .or_default()
                .push((player, *count));
        }
        let mut invocation = self.flush_script.key(click_run_key(run));
        invocation.arg(seq).arg(CLICK_RUN_TTL_SECONDS).arg(groups.len());
        for ((tenant, counter), players) in groups {
            let sum: u64 = players.iter().map(|(_, count)| count).sum();
            invocation
                .key(counter_key(tenant, counter))
                .key(leaderboard_key(tenant, counter))
                .key(unsettled_key(tenant, counter))
                .key(totals_key(tenant))
                .arg(counter)
                .arg(sum)
                .arg(players.len());
            let mut hex = [0u8; 64];
            for (player, count) in players {
                hex::encode_to_slice(player.0, &mut hex).expect("32 bytes are 64 hex digits");
                invocation.arg(&hex[..]).arg(count);
            }
        }
        // EVALSHA; on NOSCRIPT (first use, or Redis restarted) redis-rs loads it and retries.
        let applied: i64 = invocation.invoke_async(&mut connection).await?;
        Ok(applied == 1)
    }

    async fn counter_total(&self, tenant: TenantId, counter: &str) -> redis::RedisResult<u64> {
        let mut connection = self.handle.get().await?;
        let total: Option<u64> = connection.hget(totals_key(tenant), counter).await?;
        Ok(total.unwrap_or(0))
    }

    async fn player_total(
        &self,
        tenant: TenantId,
        counter: &str,
        player: &PublicKey,
    ) -> redis::RedisResult<u64> {
        let mut connection = self.handle.get().await?;
        let total: Option<u64> = connection
            .hget(counter_key(tenant, counter), player.to_hex())
            .await?;
        Ok(total.unwrap_or(0))
    }

    async fn player_totals(
        &self,
        tenant: TenantId,
        player: &PublicKey,
    ) -> redis::RedisResult<Vec<(String, u64)>> {
        let mut connection = self.handle.get().await?;
        let mut counters: Vec<String> = connection.hkeys(totals_key(tenant)).await?;
        counters.sort();
        counters.truncate(COUNTERS_PER_TENANT_MAX);
        let mut pipe = redis::pipe();
        for counter in &counters {
            pipe.hget(counter_key(tenant, counter), player.to_hex());
        }
        let values: Vec<Option<u64>> = pipe.query_async(&mut connection).await?;
        Ok(counters
            .into_iter()
            .zip(values)
            .filter_map(|(counter, value)| value.filter(|v| *v > 0).map(|v| (counter, v)))
            .collect())
    }

    async fn leaderboard(
        &self,
        tenant: TenantId,
        counter: &str,
        limit: usize,
    ) -> redis::RedisResult<Vec<(PublicKey, u64)>> {
        let mut connection = self.handle.get().await?;
        let entries: Vec<(String, f64)> = connection
            .zrevrange_withscores(leaderboard_key(tenant, counter), 0, limit as isize - 1)
            .await?;
        Ok(entries
            .into_iter()
            .filter_map(|(player, score)| PublicKey::from_hex(&player).ok().map(|p| (p, score as u64)))
            .collect())
    }

    async fn unsettled(&self, tenant: TenantId, counter: &str) -> redis::RedisResult<HashMap<String, u64>> {
        let mut connection = self.handle.get().await?;
        connection.hgetall(unsettled_key(tenant, counter)).await
    }

    async fn settle_window(&self, tenant: TenantId) -> redis::RedisResult<Option<u64>> {
        let mut connection = self.handle.get().await?;
        connection.get(settle_window_key(tenant)).await
    }

    async fn set_settle_window(&self, tenant: TenantId, window: u64) -> redis::RedisResult<()> {
        let mut connection = self.handle.get().await?;
        connection.set(settle_window_key(tenant), window).await
    }

    async fn settle_cut(&self, tenant: TenantId, counters: &[&str]) -> redis::RedisResult<SettleCut> {
        let mut connection = self.handle.get().await?;
        let script = redis::Script::new(CUT_SCRIPT);
        let mut cut = script.prepare_invoke();
        cut.key(settle_window_key(tenant)).arg(settle_key_base(tenant));
        for counter in counters {
            cut.key(unsettled_key(tenant, counter)).arg(*counter);
        }
        let (window, now): (u64, i64) = cut.invoke_async(&mut connection).await?;
        Ok(SettleCut {
            window,
            cut: now == 1,
        })
    }

    async fn settle_snapshot(
        &self,
        tenant: TenantId,
        window: u64,
        counter: &str,
    ) -> redis::RedisResult<Vec<(String, u64)>> {
        let mut connection = self.handle.get().await?;
        redis::cmd("HGETALL")
            .arg(snapshot_key(&settle_prefix(tenant, window), counter))
            .query_async(&mut connection)
            .await
    }

    async fn settle_plan(&self, tenant: TenantId, window: u64) -> redis::RedisResult<Option<Vec<u8>>> {
        let mut connection = self.handle.get().await?;
        redis::cmd("GET")
            .arg(plan_key(&settle_prefix(tenant, window)))
            .query_async(&mut connection)
            .await
    }

    async fn settle_store_plan(
        &self,
        tenant: TenantId,
        window: u64,
        plan: &[u8],
        carries: &[(String, String, u64)],
    ) -> redis::RedisResult<Vec<u8>> {
        let mut connection = self.handle.get().await?;
        let plan_key = plan_key(&settle_prefix(tenant, window));
        let script = redis::Script::new(PLAN_SCRIPT);
        let mut invocation = script.prepare_invoke();
        invocation.key(&plan_key).arg(plan);
        for (counter, player, points) in carries {
            invocation
                .key(unsettled_key(tenant, counter))
                .arg(player)
                .arg(*points);
        }
        invocation.invoke_async::<i64>(&mut connection).await?;
        redis::cmd("GET")
            .arg(&plan_key)
            .query_async::<Vec<u8>>(&mut connection)
            .await
    }

    async fn settle_advance(
        &self,
        tenant: TenantId,
        window: u64,
        counters: &[&str],
    ) -> redis::RedisResult<bool> {
        let mut connection = self.handle.get().await?;
        let advanced: i64 = redis::Script::new(ADVANCE_SCRIPT)
            .key(settle_window_key(tenant))
            .arg(window)
            .arg(window + 1)
            .invoke_async(&mut connection)
            .await?;
        if advanced != 1 {
            return Ok(false);
        }
        let prefix = settle_prefix(tenant, window);
        let mut pipe = redis::pipe();
        for counter in counters {
            pipe.del(snapshot_key(&prefix, counter)).ignore();
        }
        pipe.expire(plan_key(&prefix), SETTLED_WINDOW_TTL_SECONDS)
            .ignore();
        pipe.expire(format!("{prefix}:cut"), SETTLED_WINDOW_TTL_SECONDS)
            .ignore();
        pipe.query_async::<()>(&mut connection).await?;
        Ok(true)
    }

    async fn ensure_group(&self) -> redis::RedisResult<()> {
        let mut connection = self.handle.get().await?;
        let created: redis::RedisResult<()> = connection
            .xgroup_create_mkstream(&self.stream, &self.group, "0")
            .await;
        match created {
            Err(error) if error.code() == Some("BUSYGROUP") => Ok(()),
            other => other,
        }
    }

    async fn append(&self, transactions: &[&[u8]]) -> redis::RedisResult<Vec<String>> {
        let mut connection = self.handle.get().await?;
        let mut pipe = redis::pipe();
        for bytes in transactions {
            pipe.xadd(&self.stream, "*", &[(FIELD_TX, *bytes)]);
        }
        pipe.query_async(&mut connection).await
    }

    async fn present(&self, ids: &[String]) -> redis::RedisResult<Vec<bool>> {
        let mut connection = self.handle.get().await?;
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.xrange_count(&self.stream, id, id, 1);
        }
        let replies: Vec<redis::streams::StreamRangeReply> = pipe.query_async(&mut connection).await?;
        Ok(replies.iter().map(|reply| !reply.ids.is_empty()).collect())
    }

    async fn ack(&self, ids: &[String]) -> redis::RedisResult<()> {
        let mut connection = self.handle.get().await?;
        let mut pipe = redis::pipe();
        pipe.xack(&self.stream, &self.group, ids).ignore();
        pipe.xdel(&self.stream, ids).ignore();
        pipe.query_async(&mut connection).await
    }
}

// ----- the Redis key layout -----

/// Per-player totals of one counter: hash, field = player hex.
pub fn counter_key(tenant: TenantId, counter: &str) -> String {
    format!("hoard:{{{}}}:c:{counter}", tenant.0)
}

/// Leaderboard of one counter: sorted set, member = player hex.
pub fn leaderboard_key(tenant: TenantId, counter: &str) -> String {
    format!("hoard:{{{}}}:lb:{counter}", tenant.0)
}

/// Totals of every counter of a tenant: hash, field = counter.
pub fn totals_key(tenant: TenantId) -> String {
    format!("hoard:{{{}}}:totals", tenant.0)
}

/// Points not yet settled: hash, field = player hex.
pub fn unsettled_key(tenant: TenantId, counter: &str) -> String {
    format!("hoard:{{{}}}:unsettled:{counter}", tenant.0)
}

/// A tenant's current settlement window number (see [`Store::settle_cut`]).
pub fn settle_window_key(tenant: TenantId) -> String {
    format!("hoard:{{{}}}:settle:window", tenant.0)
}

/// What every settlement window key of a tenant starts with ([`CUT_SCRIPT`] appends the window).
fn settle_key_base(tenant: TenantId) -> String {
    format!("hoard:{{{}}}:settle:", tenant.0)
}

/// Key prefix of one settlement window's snapshot, plan and cut flag.
pub fn settle_prefix(tenant: TenantId, window: u64) -> String {
    format!("{}{window}", settle_key_base(tenant))
}

/// A window's snapshot of one counter: hash, field = player hex.
fn snapshot_key(prefix: &str, counter: &str) -> String {
    format!("{prefix}:c:{counter}")
}

/// A window's plan: the MessagePack of its signed transactions.
fn plan_key(prefix: &str) -> String {
    format!("{prefix}:plan")
}

/// Seconds a gateway's marker key outlives its last check (every 500 ms while it runs).
pub const MARKER_TTL_SECONDS: u64 = 86_400;

/// A gateway's marker: set at start, checked every 500 ms; gone means Redis lost its data.
pub fn marker_key(consumer: &str) -> String {
    format!("hoard:gateway:{consumer}:marker")
}

/// The last click flush part a gateway run applied (string, the sequence number; with a TTL).
pub fn click_run_key(run: &str) -> String {
    format!("hoard:clicks:flushed:{run}")
}
