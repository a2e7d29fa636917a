//! `storagenode`: the storage node daemon.

use clap::Parser;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use storagenode::volume::{self, Created};
use storagenode::{Server, ServerConfig, VolumeDir};

/// Serves block volumes (sparse files in --dir) over the NBD protocol.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:7100")]
    listen: String,
    /// Directory of volumes: each regular file is an export of the same name.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// Create volume NAME of SIZE bytes (e.g. disk0:64M) as a sparse file, or keep
    /// it if it exists with that size. Repeatable.
    #[arg(long, value_name = "NAME:SIZE", value_parser = parse_create)]
    create: Vec<(String, u64)>,
    /// Serve volume NAME read-only. Repeatable.
    #[arg(long, value_name = "NAME")]
    read_only: Vec<String>,
    /// Threads for blocking I/O (flushes, FUA writes, uncached reads...), shared by
    /// all connections.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=1024))]
    io_threads: u16,
    /// Most connections at once.
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    /// Seconds a new connection may take to finish the NBD handshake.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    handshake_timeout: u64,
    /// Send every request through the I/O threads (no fast path on the connection
    /// thread); for measurements.
    #[arg(long)]
    no_fast_path: bool,
    /// Serve Prometheus metrics over HTTP on this address, at /metrics.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// Require TLS (NBD_OPT_STARTTLS) with this certificate chain (PEM, the
    /// node's certificate first); plaintext clients are refused.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM file; never give a key on the command
    /// line).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Also require client certificates issued by a CA in this file (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_ca: Option<PathBuf>,
}

fn parse_create(s: &str) -> Result<(String, u64), String> {
    let (name, size) = s
        .rsplit_once(':')
        .ok_or_else(|| "expected NAME:SIZE, e.g. disk0:64M".to_string())?;
    volume::validate_name(name).map_err(|e| format!("volume name {name:?} {e}"))?;
    let bytes = fabric::units::parse_size(size).map_err(|e| e.to_string())?;
    if bytes == 0 || bytes % volume::SIZE_ALIGN != 0 {
        return Err(format!(
            "size {size} is not a positive multiple of {} bytes",
            volume::SIZE_ALIGN
        ));
    }
    Ok((name.to_string(), bytes))
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if !e.use_stderr() => {
            // --help, --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line: clap's first paragraph, without its usage block.
            let rendered = e.render().to_string();
            let first: Vec<&str> = rendered
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            let first = first.join(" ");
            let first = first.strip_prefix("error: ").unwrap_or(&first);
            eprintln!("storagenode: error: {first} (see --help)");
            return ExitCode::from(2);
        }
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("storagenode: error: {}", fabric::client::error_chain(&*e));
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let volumes = VolumeDir::open(&args.dir, &args.read_only)?;
    for (name, size) in &args.create {
        match volumes.create(name, *size)? {
            Created::New => log::info!("created volume {name:?} ({size} bytes)"),
            Created::Kept => log::debug!("volume {name:?} exists with {size} bytes"),
        }
    }
    for name in &args.read_only {
        volumes.lookup(name)?;
    }
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(nbd_proto::tls::ServerTls::load(
            cert,
            key,
            args.tls_ca.as_deref(),
        )?),
        _ => None,
    };
    if let Some(t) = &tls {
        log::info!(
            "TLS required{}",
            if t.verifies_clients() {
                ", with client certificates"
            } else {
                ""
            }
        );
    }
    let server = Server::bind(
        ServerConfig {
            listen: args.listen,
            io_threads: args.io_threads as usize,
            max_connections: args.max_connections.max(1),
            handshake_timeout: Duration::from_secs(args.handshake_timeout),
            inline_io: !args.no_fast_path,
            tls,
            ..ServerConfig::default()
        },
        volumes,
    )?;
    // Served until the node stops (dropped at the end of `run`).
    let _metrics = match &args.metrics {
        Some(addr) => {
            let m = storagenode::metrics::serve(
                addr,
                storagenode::metrics::Sources {
                    stats: server.stats().clone(),
                    connections: server.connections(),
                    volumes: server.volumes().clone(),
                },
            )?;
            log::info!("metrics on http://{}/metrics", m.addr());
            Some(m)
        }
        None => None,
    };
    server.shutdown_handle().on_termination_signals()?;
    let names = server.volumes().list()?;
    log::info!(
        "serving {} volumes from {}: {}",
        names.len(),
        server.volumes().path().display(),
        names.join(", ")
    );
    println!("storagenode listening on {}", server.local_addr());
    std::io::stdout().flush()?;
    server.run();
    let s = server.stats();
    log::info!(
        "stopped: {} connections, {} requests ({} on the fast path), {} MiB read, {} MiB written, {} flushes, {} error replies, {} protocol violations",
        server.accepted(),
        s.requests.load(Relaxed),
        s.fast_path.load(Relaxed),
        s.read_bytes.load(Relaxed) >> 20,
        s.written_bytes.load(Relaxed) >> 20,
        s.flushes.load(Relaxed),
        s.errors.load(Relaxed),
        s.protocol_errors.load(Relaxed),
    );
    Ok(())
}
