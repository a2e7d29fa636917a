//! `memnode`: the memory node daemon.

use clap::Parser;
use memnode::{Server, ServerConfig};
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

/// Serves 4 KiB pages for many VMs over the Splitvisor fabric.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:7000")]
    listen: String,
    /// Most memory to store, e.g. 8G, 512M.
    #[arg(long, default_value = "8G", value_parser = fabric::units::parse_size)]
    capacity: u64,
    /// Most memory any one VM may store here, e.g. 1G (default: only
    /// --capacity bounds it), so that one VM cannot fill a node others use.
    #[arg(long, value_name = "SIZE", value_parser = fabric::units::parse_size)]
    vm_quota: Option<u64>,
    /// Serve Prometheus metrics over HTTP on this address, at /metrics.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// Most connections at once.
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    /// Seconds a new connection may take to send its hello.
    #[arg(long, default_value_t = 10)]
    handshake_timeout: u64,
    /// The cluster key (32 random bytes, raw or hex; mode 600): every
    /// connection must prove it, and this node proves it to them. `-` reads it
    /// from standard input. Make one with `vmm keygen FILE`.
    #[arg(long, value_name = "FILE")]
    auth_key: Option<std::path::PathBuf>,
    /// Serve one-sided page reads over RDMA through this device (e.g. rxe0;
    /// `auto`: the first with an active port). VMMs then reach the node as
    /// `rdma://HOST:PORT`, on the same --listen address; plain TCP clients
    /// are served as before. Pages are kept in per-VM regions of 2 MiB
    /// chunks, registered (pinned) as the VM first writes into them.
    #[arg(long, value_name = "DEV")]
    rdma: Option<String>,
    /// Serve without a key on an address other hosts can reach (anyone who can
    /// connect can then read and write every VM's pages here).
    #[arg(long)]
    insecure: bool,
}

/// Why the node refuses to start.
#[derive(Debug, thiserror::Error)]
enum StartError {
    /// A reachable address without a key.
    #[error(
        "--listen {0} is reachable from other hosts and no --auth-key is given: anyone could read and write the VMs' pages; give --auth-key FILE (make one with `vmm keygen FILE`), listen on 127.0.0.1, or pass --insecure"
    )]
    Unauthenticated(String),
}

/// False if some address `listen` resolves to is not a loopback address (one
/// that does not resolve is left to fail binding, with its own error).
fn loopback_only(listen: &str) -> bool {
    use std::net::ToSocketAddrs;
    match listen.to_socket_addrs() {
        Ok(addrs) => addrs.into_iter().all(|a| a.ip().is_loopback()),
        Err(_) => true,
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("memnode: error: {}", fabric::client::error_chain(&*e));
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let auth_key = match &args.auth_key {
        Some(p) => Some(fabric::auth::Key::load(p)?),
        None if args.insecure || loopback_only(&args.listen) => None,
        None => return Err(StartError::Unauthenticated(args.listen.clone()).into()),
    };
    if auth_key.is_none() {
        if loopback_only(&args.listen) {
            log::info!("no --auth-key: any local client is served");
        } else {
            log::warn!("--insecure: no --auth-key, any client that can connect is served");
        }
    }
    let server = Server::bind(ServerConfig {
        auth_key,
        listen: args.listen,
        capacity_bytes: args.capacity,
        max_connections: args.max_connections.max(1),
        handshake_timeout: Duration::from_secs(args.handshake_timeout.max(1)),
        send_timeout: Duration::from_secs(30),
        vm_quota_bytes: args.vm_quota,
        rdma_device: args.rdma,
    })?;
    // Served until the node stops (dropped at the end of `run`).
    let _metrics = match &args.metrics {
        Some(m) => {
            let metrics =
                memnode::metrics::serve(m, server.store().clone(), server.state().clone())?;
            log::info!("metrics on http://{}/metrics", metrics.addr());
            Some(metrics)
        }
        None => None,
    };
    server.shutdown_handle().on_termination_signals()?;
    log::info!(
        "capacity {} pages ({} MiB)",
        server.store().capacity_pages(),
        (server.store().capacity_pages() * 4096) >> 20
    );
    println!("memnode listening on {}", server.local_addr());
    std::io::stdout().flush()?;
    server.run();
    let s = server.stats(None);
    log::info!(
        "stopped: {} pages stored for {} VMs, {} connections served, {} errors",
        s.node_pages,
        s.node_vms,
        server.state().accepted(),
        s.node_errors
    );
    Ok(())
}
