//! `hoard dev`: the same stack as `hoard demo` (4 replica processes, a private redis-server or,
//! without one, the gateway's embedded in-memory store, the gateway) without simulated players,
//! serving until Ctrl-C. Prints the WebSocket URL, the metrics URLs and a studio credential to
//! connect with.

use std::net::SocketAddr;
use std::path::PathBuf;

use hoard_loadtest::stack::{shutdown_signal, Stack, StackOptions};

/// Options of `hoard dev`.
#[derive(clap::Args, Debug)]
pub struct DevArgs {
    /// Where replica data, cluster files and Redis files go (default: a temporary directory,
    /// removed at the end).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The gateway's WebSocket address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// The gateway's metrics address.
    #[arg(long, default_value = "127.0.0.1:9100")]
    pub metrics: SocketAddr,
    /// Settle click points into GOLD this often (milliseconds; 0: only on request).
    #[arg(long, default_value_t = 1_000)]
    pub settle_interval_ms: u64,
    /// Where the gateway keeps clicks and accepted events: a private redis-server (`redis`), the
    /// embedded in-memory store (`embedded`, not durable), or redis-server when installed, else
    /// the embedded store (`auto`).
    #[arg(long, value_enum, default_value_t = crate::demo::StoreArg::Auto)]
    pub store: crate::demo::StoreArg,
}

pub async fn run(args: DevArgs) -> anyhow::Result<bool> {
    let store = crate::demo::choose_store(args.store)?;
    println!(
        "hoard dev: starting 4 replicas, {} ...",
        crate::demo::store_words(store)
    );
    let mut options = StackOptions::new(std::env::current_exe()?);
    options.store = store;
    options.data_dir = args.data_dir;
    options.gateway_listen = args.listen;
    options.gateway_http_listen = args.metrics;
    options.settle_interval_ms = args.settle_interval_ms;
    let stack = Stack::start(options).await?;
    crate::demo::print_endpoints(&stack);
    println!("studio credential (the public demo key: local use only):");
    println!("  tenant:      {}", stack.tenant.0);
    println!("  studio seed: {}", stack.studio.seed_hex());
    println!("  studio key:  {}", stack.studio.public().to_hex());
    println!(
        "  e.g. Client::connect(\"{}\", Credentials::studio(TenantId({}), Keypair::from_seed_hex(\"<seed>\")?))",
        stack.ws_url(),
        stack.tenant.0
    );
    println!("conversion rule: 100 points on counter `gold` settle into 1 GOLD (define GOLD first)");
    println!("serving until Ctrl-C");
    shutdown_signal().await;
    println!("stopping ...");
    let check = stack.finish().await?;
    for line in &check.lines {
        println!("{line}");
    }
    Ok(check.ok())
}
