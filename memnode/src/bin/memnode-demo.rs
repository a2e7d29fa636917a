//! `memnode-demo`: the main job until the VMM lands. Starts a memory node as a
//! separate process (or uses `--memnode ADDR`), writes a guest-sized range of pages
//! through the fabric client, reads every page back and verifies it, and reports
//! latency, throughput and the node's statistics.

use clap::Parser;
use fabric::proto::PAGE_SIZE;
use fabric::{ClientConfig, LinkModel, PageClient};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// Writes pages to a memory node, reads them back, verifies them, reports figures.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Use this running memory node instead of starting one.
    #[arg(long, value_name = "ADDR")]
    memnode: Option<String>,
    /// Memory to move, e.g. 64M.
    #[arg(long, default_value = "64M", value_parser = fabric::units::parse_size)]
    size: u64,
    /// VM id to act as.
    #[arg(long, default_value_t = 1)]
    vm: u64,
    /// Emulated link, e.g. latency=2us,bw=100Gbit.
    #[arg(long, default_value = "off")]
    link: LinkModel,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("memnode-demo: error: {e}");
            ExitCode::FAILURE
        }
    }
}

struct Spawned(Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_node() -> Result<(Spawned, String), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let path = exe.with_file_name("memnode");
    if !path.exists() {
        return Err(format!(
            "{} not found; build it with `cargo build --release --workspace`",
            path.display()
        ));
    }
    let mut child = Command::new(&path)
        .args(["--listen", "127.0.0.1:0", "--capacity", "4G"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", path.display()))?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped stdout"))
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let node = Spawned(child);
    let addr = line
        .trim()
        .strip_prefix("memnode listening on ")
        .ok_or_else(|| format!("memnode did not start (said {line:?})"))?
        .to_string();
    Ok((node, addr))
}

fn pattern(vm: u64, gpn: u64, page: &mut [u8]) {
    let mut x = (vm << 40) ^ gpn.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 1;
    for w in page.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
}

fn run(args: Args) -> Result<(), String> {
    let (node, addr) = match &args.memnode {
        Some(a) => (None, a.clone()),
        None => {
            let (n, a) = spawn_node()?;
            (Some(n), a)
        }
    };
    let pages = (args.size / PAGE_SIZE as u64).max(1);
    println!(
        "memory node {addr} ({}), vm {}, {pages} pages ({} MiB), link model {}",
        if node.is_some() {
            "started by the demo"
        } else {
            "given"
        },
        args.vm,
        (pages * PAGE_SIZE as u64) >> 20,
        args.link
    );
    let c = PageClient::connect(
        &addr,
        &ClientConfig {
            vm_id: args.vm,
            link_model: args.link,
            ..Default::default()
        },
    )
    .map_err(|e| fabric::client::error_chain(&e))?;
    let err = |e: fabric::ClientError| fabric::client::error_chain(&e);

    // Write in batches of 64 pages, 8 batches in flight.
    let batch = c.node().max_batch as u64;
    let mut bufs = vec![vec![0u8; batch as usize * PAGE_SIZE]; 8];
    let t = Instant::now();
    let mut base = 0;
    while base < pages {
        let mut pending = Vec::new();
        for buf in bufs.iter_mut() {
            if base >= pages {
                break;
            }
            let n = batch.min(pages - base);
            for (i, page) in buf.chunks_exact_mut(PAGE_SIZE).take(n as usize).enumerate() {
                pattern(args.vm, base + i as u64, page);
            }
            let list: Vec<(u64, &[u8])> = buf
                .chunks_exact(PAGE_SIZE)
                .take(n as usize)
                .enumerate()
                .map(|(i, p)| (base + i as u64, p))
                .collect();
            pending.push(c.submit_write(&list).map_err(err)?);
            base += n;
        }
        for p in pending {
            p.wait().map_err(err)?;
        }
    }
    let wt = t.elapsed();
    println!(
        "wrote   {pages} pages in {:.2} s ({:.0} MiB/s, batches of {batch}, 8 in flight)",
        wt.as_secs_f64(),
        mib_per_s(pages, wt)
    );

    // Read back one page at a time (the fault path), timing each.
    let mut lat = Vec::with_capacity(pages as usize);
    let (mut got, mut want) = (vec![0u8; PAGE_SIZE], vec![0u8; PAGE_SIZE]);
    let t = Instant::now();
    for g in 0..pages {
        let t1 = Instant::now();
        let present = c.read_page(g, &mut got).map_err(err)?;
        lat.push(t1.elapsed());
        pattern(args.vm, g, &mut want);
        if !present || got != want {
            return Err(format!("page {g} read back wrong (present: {present})"));
        }
    }
    let rt = t.elapsed();
    lat.sort();
    println!(
        "read    {pages} pages one at a time in {:.2} s, every byte verified: round trip p50 {:.1} us, p99 {:.1} us",
        rt.as_secs_f64(),
        us(lat[lat.len() / 2]),
        us(lat[lat.len() * 99 / 100])
    );

    // Read back again with 16 single-page reads in flight (prefetch-style).
    let t = Instant::now();
    let mut q = VecDeque::new();
    let mut next = 0u64;
    let mut checked = 0u64;
    while checked < pages {
        while q.len() < 16 && next < pages {
            q.push_back((next, c.submit_read(&[next]).map_err(err)?));
            next += 1;
        }
        let (g, p) = q.pop_front().expect("a read is in flight");
        p.wait(&mut got).map_err(err)?;
        pattern(args.vm, g, &mut want);
        if got != want {
            return Err(format!("page {g} read back wrong (pipelined)"));
        }
        checked += 1;
    }
    let pt = t.elapsed();
    println!(
        "read    {pages} pages with 16 in flight in {:.2} s, every byte verified: {:.0} pages/s ({:.1}x one at a time)",
        pt.as_secs_f64(),
        pages as f64 / pt.as_secs_f64(),
        rt.as_secs_f64() / pt.as_secs_f64()
    );
    let s = c.stats().map_err(err)?;
    println!(
        "node    {} pages stored for this VM, {} reads ({} of never-written pages), {} writes; node holds {} of {} pages, {} bytes of overhead per page",
        s.vm_pages,
        s.vm_reads,
        s.vm_zero_reads,
        s.vm_writes,
        s.node_pages,
        s.node_capacity_pages,
        s.node_overhead_bytes / s.node_pages.max(1)
    );
    if s.vm_pages != pages {
        return Err(format!(
            "node reports {} pages for this VM, wrote {pages}",
            s.vm_pages
        ));
    }
    if node.is_none() {
        free_all(&c, pages).map_err(err)?;
    }
    drop(node);
    println!("ok");
    Ok(())
}

fn us(d: Duration) -> f64 {
    d.as_nanos() as f64 / 1000.0
}

fn mib_per_s(pages: u64, d: Duration) -> f64 {
    (pages * PAGE_SIZE as u64) as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

/// Frees the demo's pages on a node it did not start, leaving it as it was.
fn free_all(c: &PageClient, pages: u64) -> Result<(), fabric::ClientError> {
    let batch = c.node().max_batch as u64;
    for start in (0..pages).step_by(batch as usize) {
        let list: Vec<u64> = (start..(start + batch).min(pages)).collect();
        c.free_pages(&list)?;
    }
    Ok(())
}
