//! The gateway's configuration: a TOML file, then environment overrides, then defaults good
//! enough for a demo (no file at all: a local Redis, an in-process chain with one demo tenant).
//!
//! Environment overrides: `HOARD_GATEWAY_LISTEN`, `HOARD_GATEWAY_HTTP_LISTEN`,
//! `HOARD_GATEWAY_STORE` (`redis` or `embedded`), `HOARD_GATEWAY_REDIS_URL`,
//! `HOARD_GATEWAY_FLUSH_INTERVAL_MS`, `HOARD_GATEWAY_FLUSH_INTERVAL_MAX_MS`,
//! `HOARD_GATEWAY_FLUSH_BUSY_PERCENT`, `HOARD_GATEWAY_STRICT_CLICKS`,
//! `HOARD_GATEWAY_GENESIS`, `HOARD_GATEWAY_CLUSTER` (selects the `cluster` backend),
//! `HOARD_GATEWAY_CLIENT_ID`, `HOARD_GATEWAY_CLIENT_KEY` (its client key file),
//! `HOARD_GATEWAY_INSTANCE`, and per tenant listed in the file's `[[tenants]]`
//! `HOARD_GATEWAY_TENANT_<id>_STUDIO_SEED` (the studio key's 32-byte seed in hex). A
//! `HOARD_GATEWAY_TENANT_...` variable that names no listed tenant, or no such setting, is refused
//! ([`GatewayConfig::load`]), not ignored.
//!
//! A file that lists no `[[tenants]]` has none: the demo tenant, whose studio seed is public, is
//! the default of no file at all (`hoard demo`, `hoard dev`), never of a file that left it out.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use hoard_ledger::{Genesis, GenesisTenant};
use hoard_types::{CurrencyId, Keypair, TenantId};

use crate::error::{Result, ServerError};

/// Seed of the demo tenant's studio key. PUBLIC: for demos and tests only.
pub const DEMO_STUDIO_SEED: [u8; 32] = [0x5d; 32];
/// Seed of the demo chain's operator key. PUBLIC: for demos and tests only.
pub const DEMO_OPERATOR_SEED: [u8; 32] = [0x0e; 32];
/// The demo chain's id.
pub const DEMO_CHAIN_ID: u64 = 1;

/// Everything the gateway needs.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// WebSocket listen address (`/v1`).
    pub listen: SocketAddr,
    /// HTTP listen address for `/metrics`, `/healthz`, `/readyz`.
    pub http_listen: SocketAddr,
    /// This gateway's name in the Redis consumer group (empty: random per start). Give each
    /// gateway of a cluster a stable name so that a restarted one finds its own pending entries.
    pub instance: String,
    /// Most simultaneous WebSocket connections.
    pub connections_max: usize,
    /// How long graceful shutdown waits for accepted events to commit.
    pub drain_timeout_ms: u64,
    /// Where click totals and the accepted-event stream live (see [`StoreBackend`]).
    pub store: StoreBackend,
    pub redis: RedisConfig,
    pub clicks: ClicksConfig,
    pub events: EventsConfig,
    pub limits: RateLimits,
    pub chain: ChainConfig,
    /// Per-tenant settings (studio key for settlement and tokens, conversion rules). None when
    /// a file lists none (the field's own default, not the demo tenant of [`Default`]).
    #[serde(default)]
    pub tenants: Vec<TenantConfig>,
}

/// The gateway's click store and event stream (`crate::store::Store`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// Redis at `redis.url`: durable (as durable as the Redis configuration), shared by every
    /// gateway of a deployment. The default, and the one for production.
    #[default]
    Redis,
    /// This process's memory: NOT durable (a gateway crash loses clicks and accepted events not
    /// yet committed; the SDK's resend restores events), one gateway only. For demos and
    /// development without a redis-server.
    Embedded,
}

impl std::str::FromStr for StoreBackend {
    type Err = ServerError;

    fn from_str(text: &str) -> Result<StoreBackend> {
        match text {
            "redis" => Ok(StoreBackend::Redis),
            "embedded" => Ok(StoreBackend::Embedded),
            other => Err(ServerError::Config(format!(
                "store `{other}`: use `redis` or `embedded`"
            ))),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    pub url: String,
    /// The durable stream of accepted asset events (one per gateway cluster).
    pub stream: String,
    /// The consumer group the gateways' batchers share.
    pub group: String,
    /// A connection attempt that takes longer fails (the operation answers `unavailable`).
    pub connect_timeout_ms: u64,
    /// A command whose reply takes longer fails and its connection is replaced: a Redis that
    /// stops answering (hung, or a network that drops packets) never hangs a client's request.
    /// Blocking stream reads get `events.batch_wait_ms` on top.
    pub command_timeout_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClicksConfig {
    /// The shortest time between two flushes of buffered clicks to Redis (one script call per
    /// flush part). The interval grows past it when flushes take long, so that they keep Redis
    /// busy at most `flush_busy_percent` of the time (see [`ClicksConfig::flush_delay`]).
    pub flush_interval_ms: u64,
    /// The longest time between two flushes: what a gateway crash can lose in default mode,
    /// how long a strict ack can wait, how stale counter reads may be.
    pub flush_interval_max_ms: u64,
    /// The share of time (percent) click flushes may keep Redis busy.
    pub flush_busy_percent: u32,
    /// Acknowledge clicks only after the flush that holds them succeeded.
    pub strict: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventsConfig {
    /// Most transactions the batcher sends to the chain at once.
    pub batch_max: usize,
    /// How long XREADGROUP blocks waiting for entries.
    pub batch_wait_ms: u64,
    /// Accepted-but-uncommitted events the gateway allows before answering `busy`.
    pub pending_max: usize,
    /// A stream entry pending this long (its gateway died, or the chain lost it) is claimed and
    /// resubmitted by any gateway.
    pub claim_idle_ms: u64,
    /// Run the batcher (a gateway that only accepts, for tests and special deployments: false).
    pub batcher: bool,
    /// `retry_after_ms` in `busy` answers.
    pub busy_retry_after_ms: u64,
}

/// Token buckets: `*_per_second` is the refill rate, the burst is one second's worth.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimits {
    pub connection_messages_per_second: u32,
    pub connection_clicks_per_second: u32,
    pub tenant_messages_per_second: u32,
    pub tenant_clicks_per_second: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChainConfig {
    /// `local`: an in-process single ledger (no consensus; for development, demos and tests).
    /// `cluster`: the PBFT replicas named in `cluster` (their genesis is used).
    pub backend: String,
    /// The genesis file (TOML), for `local`. None: the demo genesis (one tenant, [`DEMO_STUDIO_SEED`]).
    pub genesis: Option<PathBuf>,
    /// The cluster file, for `cluster`.
    pub cluster: Option<PathBuf>,
    /// This gateway's client id towards the replicas (unique per gateway), listed with its
    /// public key under the cluster file's `[[clients]]`.
    pub client_id: u64,
    /// The file of this gateway's client key (an ed25519 seed, 64 hex digits, like a replica's
    /// key file), for `cluster`: each connection's hello to a replica is signed with it.
    pub client_key: Option<PathBuf>,
}

/// One tenant's gateway-side settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub id: u64,
    /// The studio key's seed (hex). Needed for `settle`, `issue_token` and custodial trades;
    /// prefer the environment variable `HOARD_GATEWAY_TENANT_<id>_STUDIO_SEED`.
    #[serde(default)]
    pub studio_seed_hex: Option<String>,
    /// Settle automatically this often (0: only on the studio's `settle`).
    #[serde(default)]
    pub settle_interval_ms: u64,
    /// Conversion rules from click counters to currencies.
    #[serde(default)]
    pub rules: Vec<ConversionRule>,
}

/// "Every `points_per_unit` points on `counter` mint 1 unit of `currency`" (units in the
/// currency's smallest denomination).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConversionRule {
    pub counter: String,
    pub currency: String,
    pub points_per_unit: u64,
}

impl Default for GatewayConfig {
    fn default() -> GatewayConfig {
        GatewayConfig {
            listen: "127.0.0.1:8080".parse().expect("literal"),
            http_listen: "127.0.0.1:9100".parse().expect("literal"),
            instance: String::new(),
            connections_max: 10_000,
            drain_timeout_ms: 5_000,
            store: StoreBackend::Redis,
            redis: RedisConfig::default(),
            clicks: ClicksConfig::default(),
            events: EventsConfig::default(),
            limits: RateLimits::default(),
            chain: ChainConfig::default(),
            tenants: vec![TenantConfig {
                id: 1,
                studio_seed_hex: Some(hex::encode(DEMO_STUDIO_SEED)),
                settle_interval_ms: 0,
                rules: vec![ConversionRule {
                    counter: "gold".into(),
                    currency: "GOLD".into(),
                    points_per_unit: 100,
                }],
            }],
        }
    }
}

impl Default for RedisConfig {
    fn default() -> RedisConfig {
        RedisConfig {
            url: "redis://127.0.0.1:6379".into(),
            stream: "hoard:events".into(),
            group: "hoard-gateways".into(),
            connect_timeout_ms: 1_000,
            command_timeout_ms: 5_000,
        }
    }
}

impl Default for ClicksConfig {
    fn default() -> ClicksConfig {
        ClicksConfig {
            flush_interval_ms: 20,
            flush_interval_max_ms: 1_000,
            flush_busy_percent: 20,
            strict: false,
        }
    }
}

impl ClicksConfig {
    /// The wait from the start of a flush that took `spent` to the start of the next: long
    /// enough that flushes keep Redis busy at most `flush_busy_percent` of the time, within
    /// `flush_interval_ms..=flush_interval_max_ms`. A flush costs Redis about four operations
    /// per (tenant, counter, player) key it writes, whatever the clicks per key: at 10 clicks/s
    /// per player a 20 ms interval sums nothing (each key is one click), so many players need a
    /// longer interval, which sums more clicks per key.
    pub fn flush_delay(&self, spent: Duration) -> Duration {
        let paced_ms = (spent.as_micros() as u64)
            .saturating_mul(100)
            .div_ceil(u64::from(self.flush_busy_percent.max(1)) * 1_000);
        Duration::from_millis(paced_ms.clamp(self.flush_interval_ms, self.flush_interval_max_ms))
    }
}

impl Default for EventsConfig {
    fn default() -> EventsConfig {
        EventsConfig {
            batch_max: 2048,
            batch_wait_ms: 5,
            pending_max: 50_000,
            claim_idle_ms: 10_000,
            batcher: true,
            busy_retry_after_ms: 100,
        }
    }
}

impl Default for RateLimits {
    fn default() -> RateLimits {
        RateLimits {
            connection_messages_per_second: 5_000,
            connection_clicks_per_second: 1_000_000,
            tenant_messages_per_second: 200_000,
            tenant_clicks_per_second: 10_000_000,
        }
    }
}

impl Default for ChainConfig {
    fn default() -> ChainConfig {
        ChainConfig {
            backend: "local".into(),
            genesis: None,
            cluster: None,
            client_id: 1,
            client_key: None,
        }
    }
}

impl GatewayConfig {
    /// Reads a TOML file and applies the environment overrides.
    pub fn load(path: &Path) -> Result<GatewayConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ServerError::Config(format!("cannot read {}: {e}", path.display())))?;
        let mut config = GatewayConfig::from_toml(&text)?;
        config.apply_env(|name| std::env::var(name).ok())?;
        let names: Vec<String> = std::env::vars_os()
            .filter_map(|(name, _)| name.into_string().ok())
            .collect();
        config.check_tenant_env(names.iter().map(String::as_str))?;
        Ok(config)
    }

    /// Refuses a `HOARD_GATEWAY_TENANT_...` variable among `names` that [`Self::apply_env`] does
    /// not apply: one for a tenant the configuration does not list, or for a setting that does
    /// not exist. Ignored, it would leave the studio key the operator meant to set unset.
    pub fn check_tenant_env<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Result<()> {
        for name in names {
            let Some(rest) = name.strip_prefix("HOARD_GATEWAY_TENANT_") else {
                continue;
            };
            let listed = rest
                .strip_suffix("_STUDIO_SEED")
                .and_then(|id| id.parse::<u64>().ok())
                .is_some_and(|id| self.tenants.iter().any(|tenant| tenant.id == id));
            if !listed {
                return Err(ServerError::Config(format!(
                    "{name}: not applied: only HOARD_GATEWAY_TENANT_<id>_STUDIO_SEED is read, for a \
                     tenant the configuration lists in [[tenants]] (listed: {:?})",
                    self.tenants.iter().map(|tenant| tenant.id).collect::<Vec<_>>()
                )));
            }
        }
        Ok(())
    }

    pub fn from_toml(text: &str) -> Result<GatewayConfig> {
        let config: GatewayConfig = toml::from_str(text).map_err(|e| ServerError::Config(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Applies overrides from `lookup` (the process environment in production).
    pub fn apply_env(&mut self, lookup: impl Fn(&str) -> Option<String>) -> Result<()> {
        let parse_err = |name: &str, e: &dyn std::fmt::Display| ServerError::Config(format!("{name}: {e}"));
        if let Some(v) = lookup("HOARD_GATEWAY_LISTEN") {
            self.listen = v.parse().map_err(|e| parse_err("HOARD_GATEWAY_LISTEN", &e))?;
        }
        if let Some(v) = lookup("HOARD_GATEWAY_HTTP_LISTEN") {
            self.http_listen = v
                .parse()
                .map_err(|e| parse_err("HOARD_GATEWAY_HTTP_LISTEN", &e))?;
        }
        if let Some(v) = lookup("HOARD_GATEWAY_STORE") {
            self.store = v.parse()?;
        }
        if let Some(v) = lookup("HOARD_GATEWAY_REDIS_URL") {
            self.redis.url = v;
        }
        if let Some(v) = lookup("HOARD_GATEWAY_FLUSH_INTERVAL_MS") {
            self.clicks.flush_interval_ms = v
                .parse()
                .map_err(|e| parse_err("HOARD_GATEWAY_FLUSH_INTERVAL_MS", &e))?;
        }
        if let Some(v) = lookup("HOARD_GATEWAY_FLUSH_INTERVAL_MAX_MS") {
            self.clicks.flush_interval_max_ms = v
                .parse()
                .map_err(|e| parse_err("HOARD_GATEWAY_FLUSH_INTERVAL_MAX_MS", &e))?;
        }
        if let Some(v) = lookup("HOARD_GATEWAY_FLUSH_BUSY_PERCENT") {
            self.clicks.flush_busy_percent = v
                .parse()
                .map_err(|e| parse_err("HOARD_GATEWAY_FLUSH_BUSY_PERCENT", &e))?;
        }
        if let Some(v) = lookup("HOARD_GATEWAY_STRICT_CLICKS") {
            self.clicks.strict = matches!(v.as_str(), "1" | "true" | "yes");
        }
        if let Some(v) = lookup("HOARD_GATEWAY_GENESIS") {
            self.chain.genesis = Some(PathBuf::from(v));
        }
        if let Some(v) = lookup("HOARD_GATEWAY_CLUSTER") {
            self.chain.backend = "cluster".into();
            self.chain.cluster = Some(PathBuf::from(v));
        }
        if let Some(v) = lookup("HOARD_GATEWAY_CLIENT_ID") {
            self.chain.client_id = v.parse().map_err(|e| parse_err("HOARD_GATEWAY_CLIENT_ID", &e))?;
        }
        if let Some(v) = lookup("HOARD_GATEWAY_CLIENT_KEY") {
            self.chain.client_key = Some(PathBuf::from(v));
        }
        if let Some(v) = lookup("HOARD_GATEWAY_INSTANCE") {
            self.instance = v;
        }
        for tenant in &mut self.tenants {
            if let Some(v) = lookup(&format!("HOARD_GATEWAY_TENANT_{}_STUDIO_SEED", tenant.id)) {
                tenant.studio_seed_hex = Some(v);
            }
        }
        self.validate()
    }

    /// Checks ranges and that keys and rules parse.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(ServerError::Config(what));
        if self.clicks.flush_interval_ms == 0 || self.clicks.flush_interval_ms > 1_000 {
            return bad("clicks.flush_interval_ms must be 1..=1000".into());
        }
        if self.clicks.flush_interval_max_ms < self.clicks.flush_interval_ms
            || self.clicks.flush_interval_max_ms > 10_000
        {
            return bad("clicks.flush_interval_max_ms must be flush_interval_ms..=10000".into());
        }
        if self.clicks.flush_busy_percent == 0 || self.clicks.flush_busy_percent > 100 {
            return bad("clicks.flush_busy_percent must be 1..=100".into());
        }
        if self.events.batch_max == 0
            || self.events.batch_max > hoard_types::constants::BLOCK_TRANSACTIONS_MAX
        {
            return bad("events.batch_max must be 1..=BLOCK_TRANSACTIONS_MAX".into());
        }
        if self.events.pending_max == 0 || self.connections_max == 0 {
            return bad("events.pending_max and connections_max must be positive".into());
        }
        match (self.chain.backend.as_str(), &self.chain.cluster) {
            ("local", _) => {}
            ("cluster", Some(_)) if self.chain.client_key.is_some() => {}
            ("cluster", None) => {
                return bad("chain.backend `cluster` needs chain.cluster (the cluster file)".into())
            }
            ("cluster", Some(_)) => {
                return bad(
                    "chain.backend `cluster` needs chain.client_key (this gateway's client key file, \
                     listed in the cluster file's [[clients]])"
                        .into(),
                )
            }
            (other, _) => return bad(format!("chain.backend `{other}`: use `local` or `cluster`")),
        }
        for tenant in &self.tenants {
            tenant.studio_key()?;
            for rule in &tenant.rules {
                if !hoard_types::wire::counter_name_is_valid(&rule.counter)
                    || !CurrencyId::new(&rule.currency).is_valid()
                    || rule.points_per_unit == 0
                {
                    return bad(format!("tenant {}: bad conversion rule {rule:?}", tenant.id));
                }
            }
        }
        Ok(())
    }

    /// The genesis: from the file, or the demo genesis.
    pub fn genesis(&self) -> Result<Genesis> {
        match &self.chain.genesis {
            Some(path) => Ok(Genesis::load(path)?),
            None => Ok(demo_genesis()),
        }
    }

    pub fn tenant(&self, id: TenantId) -> Option<&TenantConfig> {
        self.tenants.iter().find(|t| t.id == id.0)
    }
}

impl TenantConfig {
    /// The studio signing key, if configured.
    pub fn studio_key(&self) -> Result<Option<Keypair>> {
        match &self.studio_seed_hex {
            None => Ok(None),
            Some(hex) => Keypair::from_seed_hex(hex)
                .map(Some)
                .map_err(|e| ServerError::Config(format!("tenant {}: studio seed: {e}", self.id))),
        }
    }
}

/// The demo chain: one tenant (id 1, "demo") whose studio key is [`DEMO_STUDIO_SEED`].
pub fn demo_genesis() -> Genesis {
    Genesis {
        chain_id: DEMO_CHAIN_ID,
        operator: Keypair::from_seed(DEMO_OPERATOR_SEED).public(),
        tenants: vec![GenesisTenant {
            id: TenantId(1),
            name: "demo".into(),
            studio_key: Keypair::from_seed(DEMO_STUDIO_SEED).public(),
        }],
        window_events_per_tenant_max: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_the_example_files_parse() {
        GatewayConfig::default().validate().unwrap();
        let text = include_str!("../config/gateway.toml");
        let config = GatewayConfig::from_toml(text).unwrap();
        assert_eq!(config.tenants[0].rules[0].points_per_unit, 100);
        assert!(config.clicks.flush_interval_ms <= 50);
        assert_eq!(config.store, StoreBackend::Redis);
    }

    #[test]
    fn environment_overrides_win() {
        let mut config = GatewayConfig::default();
        config
            .apply_env(|name| match name {
                "HOARD_GATEWAY_REDIS_URL" => Some("redis://10.0.0.1:7000".into()),
                "HOARD_GATEWAY_STRICT_CLICKS" => Some("true".into()),
                "HOARD_GATEWAY_TENANT_1_STUDIO_SEED" => Some(hex::encode([9u8; 32])),
                _ => None,
            })
            .unwrap();
        assert_eq!(config.redis.url, "redis://10.0.0.1:7000");
        assert!(config.clicks.strict);
        assert_eq!(
            config.tenants[0].studio_key().unwrap().unwrap().public(),
            Keypair::from_seed([9; 32]).public()
        );
        assert!(config
            .apply_env(|n| (n == "HOARD_GATEWAY_FLUSH_INTERVAL_MS").then(|| "0".into()))
            .is_err());
    }

    #[test]
    fn the_cluster_backend_needs_a_client_key_and_takes_both_from_the_environment() {
        let mut config = GatewayConfig::default();
        let cluster_without_key = |name: &str| match name {
            "HOARD_GATEWAY_CLUSTER" => Some("/etc/hoard/cluster.toml".to_string()),
            _ => None,
        };
        match config.apply_env(cluster_without_key) {
            Err(ServerError::Config(message)) => assert!(message.contains("chain.client_key"), "{message}"),
            other => panic!("a cluster backend without a client key: {other:?}"),
        }
        config
            .apply_env(|name| match name {
                "HOARD_GATEWAY_CLUSTER" => Some("/etc/hoard/cluster.toml".into()),
                "HOARD_GATEWAY_CLIENT_ID" => Some("7".into()),
                "HOARD_GATEWAY_CLIENT_KEY" => Some("/etc/hoard/client-7.key".into()),
                _ => None,
            })
            .unwrap();
        assert_eq!(config.chain.backend, "cluster");
        assert_eq!(config.chain.client_id, 7);
        assert_eq!(
            config.chain.client_key.as_deref(),
            Some(Path::new("/etc/hoard/client-7.key"))
        );
        assert!(config
            .apply_env(|n| (n == "HOARD_GATEWAY_CLIENT_ID").then(|| "seven".into()))
            .is_err());
    }

    #[test]
    fn the_flush_interval_grows_with_the_time_flushes_take_within_its_bounds() {
        let clicks = ClicksConfig {
            flush_interval_ms: 20,
            flush_interval_max_ms: 1_000,
            flush_busy_percent: 20,
            strict: false,
        };
        let ms = Duration::from_millis;
        assert_eq!(clicks.flush_delay(ms(0)), ms(20));
        assert_eq!(clicks.flush_delay(ms(4)), ms(20));
        assert_eq!(clicks.flush_delay(Duration::from_micros(4_001)), ms(21));
        assert_eq!(clicks.flush_delay(ms(30)), ms(150));
        assert_eq!(clicks.flush_delay(ms(200)), ms(1_000));
        assert_eq!(clicks.flush_delay(Duration::MAX), ms(1_000));
        let mut config = GatewayConfig::default();
        config
            .apply_env(|name| match name {
                "HOARD_GATEWAY_FLUSH_INTERVAL_MAX_MS" => Some("250".into()),
                "HOARD_GATEWAY_FLUSH_BUSY_PERCENT" => Some("50".into()),
                _ => None,
            })
            .unwrap();
        assert_eq!(config.clicks.flush_delay(ms(100)), ms(200));
        assert_eq!(config.clicks.flush_delay(ms(200)), ms(250));
        let mut config = GatewayConfig::default();
        assert!(config
            .apply_env(|n| (n == "HOARD_GATEWAY_FLUSH_INTERVAL_MAX_MS").then(|| "10".into()))
            .is_err());
        for bad in ["0", "101"] {
            let mut config = GatewayConfig::default();
            assert!(config
                .apply_env(|n| (n == "HOARD_GATEWAY_FLUSH_BUSY_PERCENT").then(|| bad.into()))
                .is_err());
        }
    }

    #[test]
    fn the_store_is_redis_unless_embedded_is_chosen() {
        assert_eq!(GatewayConfig::default().store, StoreBackend::Redis);
        let config = GatewayConfig::from_toml("store = \"embedded\"\n").unwrap();
        assert_eq!(config.store, StoreBackend::Embedded);
        assert!(GatewayConfig::from_toml("store = \"memory\"\n").is_err());
        let mut config = GatewayConfig::default();
        config
            .apply_env(|n| (n == "HOARD_GATEWAY_STORE").then(|| "embedded".into()))
            .unwrap();
        assert_eq!(config.store, StoreBackend::Embedded);
        assert!(config
            .apply_env(|n| (n == "HOARD_GATEWAY_STORE").then(|| "memory".into()))
            .is_err());
        // The configuration a stack writes for a gateway process round-trips.
        let text = toml::to_string(&config).unwrap();
        assert_eq!(
            GatewayConfig::from_toml(&text).unwrap().store,
            StoreBackend::Embedded
        );
    }

    #[test]
    fn a_file_without_tenants_has_none_not_the_public_demo_tenant() {
        let config = GatewayConfig::from_toml("listen = \"127.0.0.1:1\"\n").unwrap();
        assert!(config.tenants.is_empty(), "{:?}", config.tenants);
        // No file at all is the demo: its tenant, with the public seed.
        assert_eq!(GatewayConfig::default().tenants[0].id, 1);
    }

    #[test]
    fn a_tenant_variable_that_would_not_apply_is_refused() {
        let config = GatewayConfig::default();
        config
            .check_tenant_env([
                "HOARD_GATEWAY_TENANT_1_STUDIO_SEED",
                "HOARD_GATEWAY_LISTEN",
                "PATH",
            ])
            .unwrap();
        for name in [
            "HOARD_GATEWAY_TENANT_2_STUDIO_SEED",
            "HOARD_GATEWAY_TENANT_1_SEED",
            "HOARD_GATEWAY_TENANT_one_STUDIO_SEED",
        ] {
            match config.check_tenant_env([name]) {
                Err(ServerError::Config(message)) => assert!(message.contains(name), "{message}"),
                other => panic!("{name}: {other:?}"),
            }
        }
        let none = GatewayConfig::from_toml("").unwrap();
        assert!(none
            .check_tenant_env(["HOARD_GATEWAY_TENANT_1_STUDIO_SEED"])
            .is_err());
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(GatewayConfig::from_toml("listen = \"127.0.0.1:1\"\nflush = 3\n").is_err());
    }
}
