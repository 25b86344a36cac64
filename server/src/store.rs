//! Redis access: a reconnecting handle over a multiplexed connection, and every key the gateway
//! uses (one place, so that the layout in `docs/PROTOCOL.md` is this file's).
//!
//! Keys carry the tenant in a hash tag (`hoard:{7}:...`) so that one tenant's keys live on one
//! Redis Cluster slot (settlement's scripts touch several of them at once).

use redis::aio::MultiplexedConnection;
use tokio::sync::Mutex;

use hoard_types::TenantId;

/// A Redis connection that is re-established after a failure.
pub struct RedisHandle {
    client: redis::Client,
    connection: Mutex<Option<MultiplexedConnection>>,
}

impl RedisHandle {
    pub fn new(url: &str) -> redis::RedisResult<RedisHandle> {
        Ok(RedisHandle {
            client: redis::Client::open(url)?,
            connection: Mutex::new(None),
        })
    }

    /// A connection (cheap clone of the shared multiplexed one), connecting if needed.
    pub async fn get(&self) -> redis::RedisResult<MultiplexedConnection> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref() {
            return Ok(connection.clone());
        }
        let connection = self.client.get_multiplexed_async_connection().await?;
        *slot = Some(connection.clone());
        Ok(connection)
    }

    /// A fresh connection of its own (for blocking commands like XREADGROUP BLOCK).
    pub async fn dedicated(&self) -> redis::RedisResult<MultiplexedConnection> {
        self.client.get_multiplexed_async_connection().await
    }

    /// Forgets the shared connection after an I/O failure so that the next `get` reconnects.
    pub async fn reset_if_broken(&self, error: &redis::RedisError) {
        if error.is_io_error() || error.is_connection_dropped() || error.is_timeout() {
            *self.connection.lock().await = None;
        }
    }
}

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

/// The next settlement window number of a tenant.
pub fn settle_window_key(tenant: TenantId) -> String {
    format!("hoard:{{{}}}:settle:window", tenant.0)
}

/// Key prefix of one settlement window's snapshot and plan.
pub fn settle_prefix(tenant: TenantId, window: u64) -> String {
    format!("hoard:{{{}}}:settle:{window}", tenant.0)
}
