//! `hoard`: the one command of a Hoard deployment.
//!
//! - `hoard keygen`: make an ed25519 key file.
//! - `hoard cluster init`: write a local n-replica cluster (genesis, cluster file, keys, node files).
//! - `hoard node --config node.toml`: run one PBFT replica.
//! - `hoard gateway --config gateway.toml`: run the WebSocket gateway.
//! - `hoard demo`: the whole stack with simulated players, checked at the end ([`demo`]).
//! - `hoard dev`: the whole stack without players, serving until Ctrl-C ([`dev`]).

mod demo;
mod dev;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::sync::watch;

use hoard_ledger::cluster::{local_client_key_file, save_key, write_local_cluster, NodeConfig};
use hoard_ledger::{Genesis, GenesisTenant};
use hoard_types::{Keypair, TenantId};

/// mimalloc for a replica (`node`), the system's allocator for the rest: ARCHITECTURE.md, "Memory".
#[global_allocator]
static ALLOCATOR: hoard_ledger::alloc::RoleAllocator = hoard_ledger::alloc::RoleAllocator;

#[derive(Parser)]
#[command(
    name = "hoard",
    version,
    about = "Hoard: game asset ownership on a PBFT sidechain, clicks in Redis"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make an ed25519 key: writes the secret seed (hex) to a file, prints the public key.
    Keygen {
        /// Where to write the secret key (mode 0600).
        #[arg(long)]
        out: PathBuf,
    },
    /// Local clusters.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Run one replica of the sidechain.
    Node {
        /// The node file (id, cluster file, key file, data directory).
        #[arg(long, env = "HOARD_NODE_CONFIG")]
        config: PathBuf,
        /// Serve Prometheus metrics here (default: the address the cluster file lists, if any).
        #[arg(long, env = "HOARD_NODE_METRICS")]
        metrics: Option<SocketAddr>,
    },
    /// Run the WebSocket gateway.
    Gateway {
        /// The gateway's TOML configuration (environment variables override it).
        #[arg(long, env = "HOARD_GATEWAY_CONFIG")]
        config: PathBuf,
    },
    /// Start 4 replicas, Redis (or the embedded store without it) and the gateway, drive simulated
    /// players, check the replicas agree.
    Demo(demo::DemoArgs),
    /// Start 4 replicas, Redis (or the embedded store without it) and the gateway and serve until
    /// Ctrl-C.
    Dev(dev::DevArgs),
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Write everything a local cluster needs into a directory: a genesis with one tenant, the
    /// cluster file, and for each replica a key and a node file (`replica-<id>.toml`).
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// Replicas: 3f+1 (4, 7, 10, ...).
        #[arg(long, default_value_t = 4)]
        replicas: usize,
        /// Replica i listens on base_port + i, and serves metrics on base_port + 100 + i.
        #[arg(long, default_value_t = 7100)]
        base_port: u16,
        #[arg(long, default_value_t = 1)]
        chain_id: u64,
    },
    /// Add a gateway: make its client key and list it under the cluster file's [[clients]]
    /// (the file is written again whole; restart every replica with it).
    AddClient {
        /// The cluster file to add the client to.
        #[arg(long)]
        cluster: PathBuf,
        /// The client id (unique among the cluster's clients; the gateway's chain.client_id).
        #[arg(long)]
        id: u64,
        /// Where to write the client's secret key (mode 0600; the gateway's chain.client_key).
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // demo and dev print their own progress; their components log warnings only by default.
    let default_filter = match cli.command {
        Command::Demo(_) | Command::Dev(_) => "warn",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Keygen { out } => {
            let key = Keypair::generate();
            save_key(&out, &key)?;
            println!("{}", key.public().to_hex());
            Ok(())
        }
        Command::Cluster {
            command:
                ClusterCommand::Init {
                    dir,
                    replicas,
                    base_port,
                    chain_id,
                },
        } => cluster_init(&dir, replicas, base_port, chain_id),
        Command::Cluster {
            command: ClusterCommand::AddClient { cluster, id, out },
        } => cluster_add_client(&cluster, id, &out),
        Command::Node { config, metrics } => runtime()?.block_on(node(config, metrics)),
        Command::Gateway { config } => runtime()?.block_on(gateway(config)),
        Command::Demo(args) => exit_with(runtime()?.block_on(demo::run(args))),
        Command::Dev(args) => exit_with(runtime()?.block_on(dev::run(args))),
    }
}

/// Exit status 1 when the stack's end checks failed.
fn exit_with(result: anyhow::Result<bool>) -> anyhow::Result<()> {
    if !result? {
        std::process::exit(1);
    }
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

fn cluster_init(dir: &std::path::Path, replicas: usize, base_port: u16, chain_id: u64) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let operator = Keypair::generate();
    let studio = Keypair::generate();
    save_key(&dir.join("operator.key"), &operator)?;
    save_key(&dir.join("studio-1.key"), &studio)?;
    let genesis = Genesis {
        chain_id,
        operator: operator.public(),
        tenants: vec![GenesisTenant {
            id: TenantId(1),
            name: "studio-1".into(),
            studio_key: studio.public(),
        }],
        window_events_per_tenant_max: None,
    };
    let keys: Vec<Keypair> = (0..replicas).map(|_| Keypair::generate()).collect();
    let addresses: Vec<(SocketAddr, Option<SocketAddr>)> = (0..replicas as u16)
        .map(|i| {
            (
                SocketAddr::from(([127, 0, 0, 1], base_port + i)),
                Some(SocketAddr::from(([127, 0, 0, 1], base_port + 100 + i))),
            )
        })
        .collect();
    // One gateway (client 1); list more under [[clients]] for more gateways.
    write_local_cluster(dir, &genesis, &addresses, &keys, &[Keypair::generate()])?;
    let gateway_file = dir.join("gateway.toml");
    write_gateway_file(
        &gateway_file,
        &dir.join("cluster.toml"),
        &dir.join(local_client_key_file(1)),
        &studio,
    )?;
    println!("wrote a {replicas}-replica cluster to {}", dir.display());
    for i in 0..replicas {
        println!(
            "  hoard node --config {}",
            dir.join(format!("replica-{i}.toml")).display()
        );
    }
    println!(
        "  hoard gateway --config {}   (needs redis-server on 127.0.0.1:6379)",
        gateway_file.display()
    );
    println!("studio key (tenant 1): {}", dir.join("studio-1.key").display());
    Ok(())
}

fn cluster_add_client(cluster: &std::path::Path, id: u64, out: &std::path::Path) -> anyhow::Result<()> {
    anyhow::ensure!(
        !out.exists(),
        "{} exists: not overwriting a key file",
        out.display()
    );
    let key = Keypair::generate();
    save_key(out, &key)?;
    if let Err(error) = hoard_ledger::cluster::add_client(cluster, id, &key.public()) {
        let _ = std::fs::remove_file(out);
        return Err(error.into());
    }
    println!(
        "listed client {id} in {}; its key is in {}",
        cluster.display(),
        out.display()
    );
    println!("  restart every replica with this cluster file (they read it at start);");
    println!(
        "  the gateway's [chain]: client_id = {id}, client_key = {:?}",
        out.display().to_string()
    );
    Ok(())
}

/// A gateway file for a local cluster: the cluster backend as client 1 with its key file,
/// Redis on its default port, and tenant 1's studio key (which it signs settlements with), so
/// it is written owner-only.
fn write_gateway_file(
    path: &std::path::Path,
    cluster: &std::path::Path,
    client_key: &std::path::Path,
    studio: &Keypair,
) -> anyhow::Result<()> {
    use std::io::Write;
    let cluster = std::fs::canonicalize(cluster)?;
    let client_key = std::fs::canonicalize(client_key)?;
    let text = format!(
        "# A gateway for this cluster (hoard cluster init). Every other key has its default: see\n\
         # server/config/gateway.toml. This file holds tenant 1's studio key seed: keep it private.\n\
         listen = \"127.0.0.1:8080\"\n\
         http_listen = \"127.0.0.1:9100\"\n\
         instance = \"gateway-a\"\n\
         store = \"redis\"\n\
         \n\
         [redis]\n\
         url = \"redis://127.0.0.1:6379\"\n\
         \n\
         [chain]\n\
         backend = \"cluster\"\n\
         cluster = {cluster}\n\
         client_id = 1\n\
         client_key = {client_key}\n\
         \n\
         [[tenants]]\n\
         id = 1\n\
         studio_seed_hex = \"{seed}\"\n",
        cluster = toml::Value::String(cluster.display().to_string()),
        client_key = toml::Value::String(client_key.display().to_string()),
        seed = studio.seed_hex(),
    );
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(text.as_bytes())?;
    Ok(())
}

async fn node(config: PathBuf, metrics: Option<SocketAddr>) -> anyhow::Result<()> {
    tracing::info!(allocator = hoard_ledger::alloc::name(), "replica starting");
    let config = NodeConfig::load(&config).with_context(|| format!("loading {}", config.display()))?;
    if let Some(address) = metrics.or(config.metrics_address()) {
        hoard_ledger::node::install_metrics(address)?;
        tracing::info!(%address, "metrics on /metrics");
    }
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop.send(true);
    });
    hoard_ledger::node::run(config, stopped, None).await?;
    Ok(())
}

async fn gateway(config: PathBuf) -> anyhow::Result<()> {
    let config = hoard_server::config::GatewayConfig::load(&config)
        .with_context(|| format!("loading {}", config.display()))?;
    hoard_server::run(config, shutdown_signal()).await?;
    Ok(())
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `hoard cluster init` writes a gateway file that loads, runs the cluster backend on the
    /// cluster file it wrote, and holds the studio key of the genesis tenant.
    #[test]
    fn cluster_add_client_lists_a_second_gateway_and_refuses_its_id_twice() {
        let dir = tempfile::tempdir().unwrap();
        cluster_init(dir.path(), 4, 47_100, 9).unwrap();
        let cluster_file = dir.path().join("cluster.toml");
        let out = dir.path().join("client-2.key");
        cluster_add_client(&cluster_file, 2, &out).unwrap();
        let key = hoard_ledger::cluster::load_key(&out).unwrap();
        let cluster = hoard_ledger::cluster::Cluster::load(&cluster_file).unwrap();
        cluster.check_client(2, &key).unwrap();
        assert_eq!(
            cluster.clients.len(),
            2,
            "client 1 (cluster init's gateway) is kept"
        );
        // The same id again: refused, and no key file is left for it.
        let again = dir.path().join("again.key");
        assert!(cluster_add_client(&cluster_file, 2, &again).is_err());
        assert!(!again.exists());
        // An existing key file is not overwritten.
        assert!(cluster_add_client(&cluster_file, 3, &out).is_err());
        assert_eq!(
            hoard_ledger::cluster::load_key(&out).unwrap().public(),
            key.public()
        );
    }

    #[test]
    fn cluster_init_writes_a_gateway_file_for_the_cluster() {
        let dir = tempfile::tempdir().unwrap();
        cluster_init(dir.path(), 4, 47_000, 9).unwrap();
        let config = hoard_server::config::GatewayConfig::load(&dir.path().join("gateway.toml")).unwrap();
        assert_eq!(config.chain.backend, "cluster");
        let cluster_file = config.chain.cluster.clone().expect("a cluster file");
        let cluster = hoard_ledger::cluster::Cluster::load(&cluster_file).unwrap();
        assert_eq!(cluster.genesis.chain_id, 9);
        let studio = config.tenants[0].studio_key().unwrap().expect("a studio key");
        assert_eq!(config.tenants[0].id, 1);
        assert_eq!(studio.public(), cluster.genesis.tenants[0].studio_key);
        // The gateway's client key is the one the cluster file lists for its client id.
        let client_key = config.chain.client_key.clone().expect("a client key file");
        let key = hoard_ledger::cluster::load_key(&client_key).unwrap();
        cluster.check_client(config.chain.client_id, &key).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for secret in [dir.path().join("gateway.toml"), client_key] {
                let mode = std::fs::metadata(&secret).unwrap().permissions().mode();
                assert_eq!(mode & 0o077, 0, "{} holds a secret: owner only", secret.display());
            }
        }
    }
}
