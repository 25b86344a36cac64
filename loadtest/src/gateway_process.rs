//! The gateway as a child process of the load generator (`<program> gateway --config <json>
//! --cluster <cluster.toml>`), so that its resident memory, CPU time and open files are its own
//! and not mixed with the simulated clients'. [`crate::stack::Stack`] starts it when
//! [`crate::stack::StackOptions::gateway_process`] is set; [`run`] is the child's side.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use hoard_ledger::cluster::Cluster;
use hoard_server::chain::ClusterChain;
use hoard_server::config::GatewayConfig;
use hoard_server::Chain;

use crate::stack::ChildProcess;

/// How long the gateway child gets to answer on its metrics port.
pub const GATEWAY_START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long [`GatewayProcess::drain`] waits for events in flight to reach the chain.
pub const GATEWAY_DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// A running gateway child process.
pub struct GatewayProcess {
    pub process: ChildProcess,
    /// The WebSocket listener.
    pub ws: SocketAddr,
    /// The HTTP listener (`/metrics`).
    pub http: SocketAddr,
}

impl GatewayProcess {
    /// Writes `config` (with fixed free ports where it asks for port 0) to `dir/gateway.json`,
    /// starts `program gateway`, and waits until its `/metrics` answers.
    pub async fn start(
        program: &Path,
        dir: &Path,
        cluster: &Path,
        config: &GatewayConfig,
        logs: bool,
    ) -> anyhow::Result<GatewayProcess> {
        // A port picked free can be taken by another process before the gateway binds it
        // (the gateway then exits at start): again on fresh ports, when the caller left the
        // choice to us.
        let fixed = config.listen.port() != 0 && config.http_listen.port() != 0;
        let mut attempt = 1;
        loop {
            match GatewayProcess::start_once(program, dir, cluster, config, logs).await {
                Err(error) if !fixed && attempt < 3 => {
                    tracing::warn!(%error, attempt, "the gateway did not start: again on fresh ports");
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn start_once(
        program: &Path,
        dir: &Path,
        cluster: &Path,
        config: &GatewayConfig,
        logs: bool,
    ) -> anyhow::Result<GatewayProcess> {
        let mut config = config.clone();
        for address in [&mut config.listen, &mut config.http_listen] {
            if address.port() == 0 {
                address.set_port(hoard_ledger::testing::free_port());
            }
        }
        let path = dir.join("gateway.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&config)?)?;
        let mut command = Command::new(program);
        command
            .arg("gateway")
            .arg("--config")
            .arg(&path)
            .arg("--cluster")
            .arg(cluster)
            .env(
                "RUST_LOG",
                std::env::var("HOARD_GATEWAY_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(if logs { Stdio::inherit() } else { Stdio::null() })
            .stderr(Stdio::inherit());
        let mut process = ChildProcess::spawn("gateway", command)?;
        let deadline = Instant::now() + GATEWAY_START_TIMEOUT;
        loop {
            if crate::sys::scrape(config.http_listen).await.is_ok()
                && tokio::net::TcpStream::connect(config.listen).await.is_ok()
            {
                break;
            }
            if !process.running() {
                bail!("the gateway process exited at start (see its log above)");
            }
            if Instant::now() > deadline {
                bail!("the gateway process did not start in {GATEWAY_START_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        if !process.running() {
            bail!("the gateway process exited at start (see its log above)");
        }
        Ok(GatewayProcess {
            process,
            ws: config.listen,
            http: config.http_listen,
        })
    }

    /// `ws://127.0.0.1:port/v1`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}{}", self.ws, hoard_types::wire::WS_PATH)
    }

    /// The gateway follower's height (`hoard_gateway_chain_height`; 0 if unreadable).
    pub async fn chain_height(&self) -> u64 {
        crate::sys::scrape(self.http)
            .await
            .ok()
            .and_then(|s| crate::sys::max(&s, "hoard_gateway_chain_height"))
            .unwrap_or(0.0) as u64
    }

    /// Waits until no event is in flight (`hoard_gateway_events_in_flight` is 0, at most
    /// [`GATEWAY_DRAIN_TIMEOUT`]); returns the follower's height then.
    pub async fn drain(&self) -> u64 {
        let deadline = Instant::now() + GATEWAY_DRAIN_TIMEOUT;
        while Instant::now() < deadline {
            let in_flight = crate::sys::scrape(self.http)
                .await
                .ok()
                .map(|s| crate::sys::sum(&s, "hoard_gateway_events_in_flight"))
                .unwrap_or(0.0);
            if in_flight <= 0.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.chain_height().await
    }
}

/// The child's side: runs the gateway of `config` (JSON of [`GatewayConfig`]) on the cluster of
/// `cluster` until SIGTERM or Ctrl-C, then drains and stops.
pub async fn run(config: &Path, cluster: &Path) -> anyhow::Result<()> {
    crate::sys::raise_open_files_limit(1 << 20);
    let bytes = std::fs::read(config).with_context(|| format!("reading {}", config.display()))?;
    let config: GatewayConfig = serde_json::from_slice(&bytes).context("gateway configuration")?;
    let cluster = Cluster::load(cluster).with_context(|| format!("loading {}", cluster.display()))?;
    let chain: Arc<dyn Chain> = Arc::new(ClusterChain::connect_configured(&cluster, &config.chain)?);
    hoard_server::run_with_chain(
        config,
        chain,
        cluster.genesis.clone(),
        crate::stack::shutdown_signal(),
    )
    .await?;
    Ok(())
}
