//! `fabric-check`: runs the fabric client's behaviour checks
//! ([`memnode::client_checks`]) against a running memory node, then measures
//! page reads: single-page latency (p50, p99) and pipelined throughput. The
//! nested host's rdma scenario runs it against one node over TCP
//! (`HOST:PORT`) and over RDMA (`rdma://HOST:PORT`), side by side; on a real
//! RDMA network the same two commands measure the real fabric.
//!
//! Prints one line:
//!
//! ```text
//! FABRIC-CHECK addr=<addr> checks=ok read_p50_us=<us> read_p99_us=<us> pipelined_pages_s=<n> batch_pages_s=<n> one_sided_pages=<n>
//! ```

use clap::Parser;
use fabric::proto::PAGE_SIZE;
use fabric::{ClientConfig, PageClient};
use std::collections::VecDeque;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Checks a memory node through the fabric client and measures page reads.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The node: HOST:PORT, or rdma://HOST:PORT.
    #[arg(long)]
    addr: String,
    /// The cluster key file, if the node has one.
    #[arg(long, value_name = "FILE")]
    auth_key: Option<std::path::PathBuf>,
    /// The first VM id to use (the checks use a few above it).
    #[arg(long, default_value_t = 0x5000)]
    vm_base: u64,
    /// Single-page reads timed for the latency percentiles.
    #[arg(long, default_value_t = 2000)]
    reads: usize,
    /// How long each throughput measurement runs, in seconds.
    #[arg(long, default_value_t = 2.0)]
    secs: f64,
    /// Skip the behaviour checks (measure only).
    #[arg(long)]
    no_checks: bool,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    match run(Args::parse()) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fabric-check: error: {}", fabric::client::error_chain(&*e));
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<String, Box<dyn std::error::Error>> {
    let config = ClientConfig {
        auth_key: match &args.auth_key {
            Some(p) => Some(fabric::auth::Key::load(p)?),
            None => None,
        },
        ..ClientConfig::default()
    };
    let connect = |vm: u64| {
        PageClient::connect(
            &args.addr,
            &ClientConfig {
                vm_id: vm,
                ..config.clone()
            },
        )
    };
    if !args.no_checks {
        memnode::client_checks::all(&connect, args.vm_base);
    }
    let c = connect(args.vm_base + 100)?;
    let pages = 1024u64;
    for base in (0..pages).step_by(64) {
        let data: Vec<Vec<u8>> = (base..base + 64)
            .map(|g| memnode::client_checks::pattern(1, g, 0))
            .collect();
        let batch: Vec<(u64, &[u8])> = (base..base + 64).zip(data.iter().map(|d| &d[..])).collect();
        c.write_pages(&batch)?;
    }
    // Latency: one page at a time, spread over the pages.
    let mut buf = vec![0u8; 64 * PAGE_SIZE];
    let mut lat: Vec<f64> = Vec::with_capacity(args.reads);
    for i in 0..args.reads as u64 {
        let g = (i * 337) % pages;
        let t = Instant::now();
        c.read_page(g, &mut buf[..PAGE_SIZE])?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    // Throughput: single-page reads with 32 in flight (as concurrent faults
    // and prefetches are), and 64-page batches with 4 in flight.
    let window = Duration::from_secs_f64(args.secs.max(0.1));
    let pipelined = |batch: u64, depth: usize| -> Result<f64, fabric::ClientError> {
        let started = Instant::now();
        let mut q = VecDeque::new();
        let (mut next, mut done) = (0u64, 0u64);
        let mut out = vec![0u8; batch as usize * PAGE_SIZE];
        while started.elapsed() < window || !q.is_empty() {
            while q.len() < depth && started.elapsed() < window {
                let gpns: Vec<u64> = (0..batch).map(|k| (next + k) % pages).collect();
                next = (next + batch * 7) % pages;
                q.push_back(c.submit_read(&gpns)?);
            }
            if let Some(p) = q.pop_front() {
                p.wait(&mut out)?;
                done += batch;
            }
        }
        Ok(done as f64 / started.elapsed().as_secs_f64())
    };
    let single = pipelined(1, 32)?;
    let batched = pipelined(64, 4)?;
    Ok(format!(
        "FABRIC-CHECK addr={} checks={} read_p50_us={:.1} read_p99_us={:.1} pipelined_pages_s={:.0} batch_pages_s={:.0} one_sided_pages={}",
        args.addr,
        if args.no_checks { "skipped" } else { "ok" },
        pct(0.5),
        pct(0.99),
        single,
        batched,
        c.one_sided_pages().unwrap_or(0)
    ))
}
