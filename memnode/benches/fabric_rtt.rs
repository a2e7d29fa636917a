//! Fabric benchmark: `cargo bench -p memnode --bench fabric_rtt`.
//!
//! Measures, in one run and side by side:
//! - the floor: a minimal raw-socket echo (16-byte request, 4 KiB reply) between this
//!   process and a separate echo process, over loopback TCP;
//! - the fabric single-page read round trip against a separate `memnode` process;
//! - pipelined page-read throughput with 1, 4 and 16 requests in flight (one thread),
//!   and with 4 threads sharing one connection;
//! - the memory node's memory overhead per stored page (RSS growth beyond the data,
//!   and the store's own accounting);
//! - the link model's effect (`latency=2us,bw=100Gbit`) on the single-page round trip;
//! - the distributions of the raw and fabric round trips (`*_cdf_us`, for plots).
//!
//! Raw and fabric round trips are sampled in alternating rounds so that machine
//! noise hits both alike. Writes JSON to `$SPLITVISOR_BENCH_OUT` (default
//! `target/bench/fabric_rtt.json`) and prints a table.

use fabric::proto::PAGE_SIZE;
use fabric::{ClientConfig, PageClient};
use serde_json::json;
use splitvisor_tests::Daemon;
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

const ROLE_ENV: &str = "SPLITVISOR_BENCH_ROLE";

fn main() {
    if std::env::var(ROLE_ENV).as_deref() == Ok("echo") {
        echo_server();
    }
    let quick = std::env::var("SPLITVISOR_BENCH_QUICK").is_ok();
    // Two placements, each with fresh processes: every process on CPU 0 (no
    // cross-CPU wake-ups; each side's CPU time adds to the round trip, so this is
    // the strict comparison), and free scheduling over all CPUs (client and node on
    // different CPUs, as on separate machines; this machine's cross-CPU wake-ups make
    // it noisier).
    let pinned = suite(true, quick);
    let spread = suite(false, quick);
    let out = json!({
        "benchmark": "fabric_rtt",
        "command": "cargo bench -p memnode --bench fabric_rtt",
        "pinned_to_one_cpu": pinned,
        "free_scheduling": spread,
    });
    let path = std::env::var("SPLITVISOR_BENCH_OUT").unwrap_or_else(|_| {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("fabric_rtt.json").to_string_lossy().into_owned()
    });
    if let Some(dir) = std::path::Path::new(&path).parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(&path, serde_json::to_string_pretty(&out).unwrap()).unwrap();
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
    println!("wrote {path}");
}

/// Restricts this thread (and the processes and threads it creates) to CPU 0, or
/// lets it run on every CPU.
fn set_affinity(pin: bool) {
    // SAFETY: cpu_set_t is plain data that CPU_ZERO/CPU_SET write within its
    // bounds; sched_setaffinity(0, ..) only reads it, for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        let cpus = if pin { 1 } else { libc::CPU_SETSIZE as usize };
        for cpu in 0..cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn suite(pin: bool, quick: bool) -> serde_json::Value {
    set_affinity(pin);
    let rounds = if quick { 2 } else { 6 };
    let per_round = if quick { 1000 } else { 4000 };
    let tput_time = Duration::from_millis(if quick { 300 } else { 1500 });
    let stored_pages: u64 = if quick { 8192 } else { 65536 };

    let echo = Daemon::start(
        Command::new(std::env::current_exe().unwrap()).env(ROLE_ENV, "echo"),
        "echo listening on ",
    );
    let node = Daemon::memnode(
        std::path::Path::new(env!("CARGO_BIN_EXE_memnode")),
        &["--capacity", "2G"],
    );
    let rss_empty = rss_bytes(node.child.id());
    // Store pages with distinct contents. (Both clients act for VM 1 with one
    // config, hence one VM secret: the node binds the VM to it.)
    let config = ClientConfig {
        vm_id: 1,
        ..Default::default()
    };
    let client = PageClient::connect(&node.addr, &config).unwrap();
    let pages: Vec<Vec<u8>> = (0..64u64).map(|i| vec![(i as u8) | 1; PAGE_SIZE]).collect();
    for base in (0..stored_pages).step_by(64) {
        let batch: Vec<(u64, &[u8])> = (0..64)
            .map(|i| (base + i, &pages[i as usize][..]))
            .collect();
        client.write_pages(&batch).unwrap();
    }
    let rss_full = rss_bytes(node.child.id());
    let stats = client.stats().unwrap();
    let data_bytes = stored_pages * PAGE_SIZE as u64;
    let rss_overhead = (rss_full.saturating_sub(rss_empty)).saturating_sub(data_bytes) as f64
        / stored_pages as f64;
    let store_overhead = stats.node_overhead_bytes as f64 / stored_pages as f64;

    // Round trips, alternating raw and fabric rounds.
    let mut raw = TcpStream::connect(&echo.addr).unwrap();
    raw.set_nodelay(true).unwrap();
    let modelled = PageClient::connect(
        &node.addr,
        &ClientConfig {
            link_model: "latency=2us,bw=100Gbit".parse().unwrap(),
            ..config.clone()
        },
    )
    .unwrap();
    let (mut raw_s, mut fab_s, mut mod_s) = (Vec::new(), Vec::new(), Vec::new());
    let mut buf = vec![0u8; PAGE_SIZE];
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next_gpn = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % stored_pages
    };
    // Warm-up.
    for _ in 0..500 {
        raw_rtt(&mut raw, &mut buf);
        client.read_page(next_gpn(), &mut buf).unwrap();
    }
    for _ in 0..rounds {
        for _ in 0..per_round {
            let t = Instant::now();
            raw_rtt(&mut raw, &mut buf);
            raw_s.push(t.elapsed());
        }
        for _ in 0..per_round {
            let g = next_gpn();
            let t = Instant::now();
            assert!(client.read_page(g, &mut buf).unwrap());
            fab_s.push(t.elapsed());
            assert_eq!(buf[0], (g % 64) as u8 | 1, "page {g} content");
        }
        for _ in 0..per_round / 4 {
            let t = Instant::now();
            modelled.read_page(next_gpn(), &mut buf).unwrap();
            mod_s.push(t.elapsed());
        }
    }
    // Per-round p50 ratios: robust against the machine changing pace mid-run.
    let mut round_ratios: Vec<f64> = (0..rounds)
        .map(|r| {
            let w = r * per_round..(r + 1) * per_round;
            let (mut a, mut b) = (raw_s[w.clone()].to_vec(), fab_s[w].to_vec());
            ratio(percentiles(&mut b).0, percentiles(&mut a).0)
        })
        .collect();
    round_ratios.sort_by(f64::total_cmp);
    let raw_p = percentiles(&mut raw_s);
    let fab_p = percentiles(&mut fab_s);
    let mod_p = percentiles(&mut mod_s);

    // Pipelined throughput on one connection from one thread.
    let mut tput = Vec::new();
    for depth in [1usize, 4, 16] {
        let rate = pipelined(&client, depth, tput_time, stored_pages);
        tput.push((depth, rate));
    }
    let shared_rate = threaded(&client, 4, tput_time, stored_pages);
    let base_rate = tput[0].1;

    drop(echo);
    drop(node);
    json!({
        "samples_per_kind": raw_s.len(),
        "raw_tcp_echo_4k_rtt_us": {"p50": us(raw_p.0), "p99": us(raw_p.1)},
        "fabric_page_read_rtt_us": {"p50": us(fab_p.0), "p99": us(fab_p.1)},
        "raw_tcp_echo_4k_rtt_cdf_us": cdf_points(&raw_s),
        "fabric_page_read_rtt_cdf_us": cdf_points(&fab_s),
        "fabric_p50_over_raw_p50": ratio(fab_p.0, raw_p.0),
        "fabric_p99_over_raw_p99": ratio(fab_p.1, raw_p.1),
        "fabric_over_raw_p50_per_round": round_ratios,
        "link_model_2us_100gbit_page_read_rtt_us": {"p50": us(mod_p.0), "p99": us(mod_p.1)},
        "pipelined_pages_per_sec": tput.iter().map(|(d, r)| (format!("depth_{d}"), json!(r.round()))).collect::<serde_json::Map<_, _>>(),
        "pipelined_speedup_vs_depth_1": tput.iter().map(|(d, r)| (format!("depth_{d}"), json!(round2(r / base_rate)))).collect::<serde_json::Map<_, _>>(),
        "four_threads_one_connection_pages_per_sec": shared_rate.round(),
        "memnode_stored_pages": stored_pages,
        "memnode_rss_overhead_bytes_per_page": round2(rss_overhead),
        "memnode_store_overhead_bytes_per_page": round2(store_overhead),
        "targets": {
            "p50_within_1_2x_of_raw": ratio(fab_p.0, raw_p.0) <= 1.2,
            "depth_16_at_least_4x_depth_1": tput[2].1 / base_rate >= 4.0,
        }
    })
}

fn raw_rtt(s: &mut TcpStream, buf: &mut [u8]) {
    s.write_all(&[7u8; 16]).unwrap();
    s.read_exact(buf).unwrap();
}

/// Keeps `depth` single-page reads in flight for `time`; returns pages per second.
fn pipelined(c: &PageClient, depth: usize, time: Duration, pages: u64) -> f64 {
    let mut q: VecDeque<_> = VecDeque::with_capacity(depth);
    let mut buf = vec![0u8; PAGE_SIZE];
    let (mut done, mut g) = (0u64, 0u64);
    let t = Instant::now();
    while t.elapsed() < time {
        while q.len() < depth {
            q.push_back(c.submit_read(&[g % pages]).unwrap());
            g += 7;
        }
        q.pop_front().unwrap().wait(&mut buf).unwrap();
        done += 1;
    }
    for p in q.drain(..) {
        p.wait(&mut buf).unwrap();
        done += 1;
    }
    done as f64 / t.elapsed().as_secs_f64()
}

/// `threads` threads each reading one page at a time on one shared connection.
fn threaded(c: &PageClient, threads: u64, time: Duration, pages: u64) -> f64 {
    let t = Instant::now();
    let total: u64 = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|i| {
                let c = c.clone();
                s.spawn(move || {
                    let mut buf = vec![0u8; PAGE_SIZE];
                    let mut n = 0u64;
                    while t.elapsed() < time {
                        c.read_page((i * 1000 + n) % pages, &mut buf).unwrap();
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).sum()
    });
    total as f64 / t.elapsed().as_secs_f64()
}

fn percentiles(v: &mut [Duration]) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[v.len() * 99 / 100])
}

/// The distribution of sorted samples `v` as `[µs, share at or below]` at 200
/// evenly spaced shares.
fn cdf_points(v: &[Duration]) -> Vec<[f64; 2]> {
    (1..=200)
        .map(|i| {
            let q = f64::from(i) / 200.0;
            let k = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
            [us(v[k]), q]
        })
        .collect()
}

fn us(d: Duration) -> f64 {
    round2(d.as_nanos() as f64 / 1000.0)
}

fn ratio(a: Duration, b: Duration) -> f64 {
    round2(a.as_nanos() as f64 / b.as_nanos() as f64)
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn rss_bytes(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kb * 1024
}

/// The floor's server: reads 16-byte requests, answers each with 4 KiB.
fn echo_server() -> ! {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    println!("echo listening on {}", l.local_addr().unwrap());
    std::io::stdout().flush().unwrap();
    for s in l.incoming() {
        let mut s = s.unwrap();
        s.set_nodelay(true).unwrap();
        std::thread::spawn(move || {
            let mut req = [0u8; 16];
            let reply = [0x5au8; PAGE_SIZE];
            while s.read_exact(&mut req).is_ok() {
                if s.write_all(&reply).is_err() {
                    break;
                }
            }
        });
    }
    std::process::exit(0)
}
