//! NBD benchmark: `cargo bench -p storagenode --bench nbd`.
//!
//! Our pipelined client against a separate `storagenode` process and against
//! `qemu-nbd` (Debian package qemu-utils), each serving a file of the same size and
//! contents on the same file system, side by side in one run:
//!
//! - 4 KiB random reads and random writes at queue depth 1 and 16: IOPS and
//!   latency p50/p99 (submit to completion, as the caller sees it);
//! - 1 MiB sequential reads and writes at queue depth 4: throughput.
//!
//! A third process, `storagenode --no-fast-path` (every request through the worker
//! pool), shows what the connection thread's fast path is worth.
//!
//! The files are written in full first, so reads come from the page cache on both
//! servers and the figures compare the servers, not the disk. Rounds alternate
//! between the servers so that machine noise hits both alike. Writes JSON to
//! `$SPLITVISOR_BENCH_OUT` (default `target/bench/storagenode.json`) and prints a
//! table; `SPLITVISOR_BENCH_QUICK=1` makes a short smoke run.

use nbd_proto::client::{ClientConfig, NbdClient, Request};
use serde_json::{Value, json};
use splitvisor_tests::Daemon;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

#[derive(Clone, Copy)]
struct Workload {
    name: &'static str,
    read: bool,
    random: bool,
    block: usize,
    depth: usize,
}

const WORKLOADS: [Workload; 6] = [
    Workload {
        name: "randread_4k_qd1",
        read: true,
        random: true,
        block: 4 * KIB,
        depth: 1,
    },
    Workload {
        name: "randread_4k_qd16",
        read: true,
        random: true,
        block: 4 * KIB,
        depth: 16,
    },
    Workload {
        name: "randwrite_4k_qd1",
        read: false,
        random: true,
        block: 4 * KIB,
        depth: 1,
    },
    Workload {
        name: "randwrite_4k_qd16",
        read: false,
        random: true,
        block: 4 * KIB,
        depth: 16,
    },
    Workload {
        name: "seqread_1m_qd4",
        read: true,
        random: false,
        block: MIB,
        depth: 4,
    },
    Workload {
        name: "seqwrite_1m_qd4",
        read: false,
        random: false,
        block: MIB,
        depth: 4,
    },
];

/// What one server did on one workload, summed over rounds.
#[derive(Default)]
struct Tally {
    ops: u64,
    bytes: u64,
    time: Duration,
    latencies: Vec<Duration>,
}

fn main() {
    let quick = std::env::var("SPLITVISOR_BENCH_QUICK").is_ok();
    let qemu_nbd = which("qemu-nbd").unwrap_or_else(|| {
        panic!("qemu-nbd is not installed; this benchmark needs it: apt-get install qemu-utils")
    });
    let rounds = if quick { 1 } else { 5 };
    let per_round = Duration::from_millis(if quick { 150 } else { 1000 });
    let file_size: u64 = if quick { 32 << 20 } else { 256 << 20 };

    let target = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate is in the workspace")
        .join("target/bench");
    let work = target.join(format!("nbd-data-{}", std::process::id()));
    let sn_dir = work.join("storagenode");
    let qemu_file = work.join("qemu").join("disk0.raw");
    std::fs::create_dir_all(&sn_dir).unwrap();
    std::fs::create_dir_all(qemu_file.parent().unwrap()).unwrap();
    for f in [sn_dir.join("disk0"), qemu_file.clone()] {
        fill(&f, file_size);
    }

    let pool_dir = work.join("storagenode-pool");
    std::fs::create_dir_all(&pool_dir).unwrap();
    fill(&pool_dir.join("disk0"), file_size);
    let storagenode = Path::new(env!("CARGO_BIN_EXE_storagenode"));
    let sn = Daemon::storagenode(storagenode, &sn_dir, &[]);
    let qemu = start_qemu_nbd(&qemu_nbd, &qemu_file);
    let pool = Daemon::storagenode(storagenode, &pool_dir, &["--no-fast-path"]);
    let config = ClientConfig {
        max_in_flight: 64,
        ..ClientConfig::default()
    };
    let clients = [
        (
            "storagenode",
            NbdClient::connect_with(&sn.addr, "disk0", &config).unwrap(),
        ),
        (
            "qemu_nbd",
            NbdClient::connect_with(&qemu.addr, "disk0", &config).unwrap(),
        ),
        (
            "storagenode_no_fast_path",
            NbdClient::connect_with(&pool.addr, "disk0", &config).unwrap(),
        ),
    ];
    for (_, c) in &clients {
        assert_eq!(c.size(), file_size);
    }
    // Warm-up: a pass of each workload on each server.
    for w in WORKLOADS {
        for (_, c) in &clients {
            run(
                c,
                w,
                Duration::from_millis(100),
                file_size,
                &mut Tally::default(),
                1,
            );
        }
    }
    let mut tallies: Vec<[Tally; 3]> = WORKLOADS.iter().map(|_| Default::default()).collect();
    for round in 0..rounds {
        for (wi, w) in WORKLOADS.iter().enumerate() {
            // Rotate which server goes first.
            for k in 0..3 {
                let s = (k + round + wi) % 3;
                run(
                    &clients[s].1,
                    *w,
                    per_round,
                    file_size,
                    &mut tallies[wi][s],
                    (round * 16 + wi * 2 + s) as u64 + 7,
                );
            }
        }
    }
    drop(clients);
    drop(sn);
    drop(qemu);
    drop(pool);
    let _ = std::fs::remove_dir_all(&work);

    let mut results = serde_json::Map::new();
    let mut all_pass = true;
    println!(
        "\n{:<18} {:>37} {:>37} {:>33} {:>37}",
        "workload",
        "storagenode",
        "qemu-nbd",
        "storagenode / qemu-nbd",
        "storagenode --no-fast-path"
    );
    for (w, t) in WORKLOADS.iter().zip(tallies.iter_mut()) {
        let a = summarize(w, &mut t[0]);
        let b = summarize(w, &mut t[1]);
        let p = summarize(w, &mut t[2]);
        let (ratio, pass, line) = if w.block == 4 * KIB {
            let iops = a["iops"].as_f64().unwrap() / b["iops"].as_f64().unwrap();
            let p50 = a["p50_us"].as_f64().unwrap() / b["p50_us"].as_f64().unwrap();
            let p99 = a["p99_us"].as_f64().unwrap() / b["p99_us"].as_f64().unwrap();
            (
                json!({"iops": round2(iops), "p50": round2(p50), "p99": round2(p99)}),
                iops >= 1.0 && p50 <= 1.0 && p99 <= 1.0,
                format!("iops {iops:.2}x p50 {p50:.2}x p99 {p99:.2}x"),
            )
        } else {
            let mbs = a["mib_per_s"].as_f64().unwrap() / b["mib_per_s"].as_f64().unwrap();
            (
                json!({"mib_per_s": round2(mbs)}),
                mbs >= 1.0,
                format!("MiB/s {mbs:.2}x"),
            )
        };
        all_pass &= pass;
        println!(
            "{:<18} {:>37} {:>37} {:>33} {:>37}",
            w.name,
            describe(w, &a),
            describe(w, &b),
            line,
            describe(w, &p)
        );
        results.insert(
            w.name.into(),
            json!({
                "storagenode": a,
                "qemu_nbd": b,
                "ratio_storagenode_over_qemu_nbd": ratio,
                "storagenode_at_least_as_fast": pass,
                "storagenode_no_fast_path": p,
            }),
        );
    }
    let out = json!({
        "benchmark": "storagenode_nbd",
        "command": "cargo bench -p storagenode --bench nbd",
        "quick": quick,
        "rounds": rounds,
        "seconds_per_round_per_workload": per_round.as_secs_f64(),
        "file_bytes": file_size,
        "client": "nbd_proto::client::NbdClient (max_in_flight 64), one connection per server",
        "storagenode": "storagenode (default: fast path on, 8 I/O threads); storagenode_no_fast_path: --no-fast-path",
        "qemu_nbd": "qemu-nbd -f raw -t --shared=8 --cache=writeback (aio=threads)",
        "results": results,
        "targets": {"storagenode_at_least_as_fast_on_every_figure": all_pass},
    });
    let path = std::env::var("SPLITVISOR_BENCH_OUT").unwrap_or_else(|_| {
        std::fs::create_dir_all(&target).unwrap();
        target
            .join("storagenode.json")
            .to_string_lossy()
            .into_owned()
    });
    if let Some(dir) = Path::new(&path).parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(&path, serde_json::to_string_pretty(&out).unwrap()).unwrap();
    println!("\nwrote {path}");
}

/// Writes `size` bytes of non-zero data to `path` (so nothing is a hole).
fn fill(path: &Path, size: u64) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8 | 1).collect();
    for _ in 0..size / MIB as u64 {
        f.write_all(&chunk).unwrap();
    }
    f.sync_all().unwrap();
}

/// Keeps `w.depth` requests in flight for `time`; adds to `t`.
fn run(c: &NbdClient, w: Workload, time: Duration, size: u64, t: &mut Tally, seed: u64) {
    let blocks = size / w.block as u64;
    let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next_seq = 0u64;
    let mut next = move || {
        if w.random {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % blocks) * w.block as u64
        } else {
            let o = next_seq;
            next_seq = (next_seq + 1) % blocks;
            o * w.block as u64
        }
    };
    let (tx, rx) = mpsc::channel::<(Duration, Vec<u8>)>();
    let mut bufs: Vec<Vec<u8>> = (0..w.depth).map(|_| vec![0x5au8; w.block]).collect();
    let mut outstanding = 0;
    let start = Instant::now();
    loop {
        while outstanding < w.depth && start.elapsed() < time {
            let buf = bufs.pop().expect("a free buffer");
            let offset = next();
            let req = if w.read {
                Request::Read { offset, buf }
            } else {
                Request::Write {
                    offset,
                    data: buf,
                    fua: false,
                }
            };
            let tx = tx.clone();
            let t0 = Instant::now();
            c.submit(req, move |d| {
                let lat = t0.elapsed();
                if let Err(e) = d.result {
                    panic!("request failed: {e}");
                }
                let _ = tx.send((lat, d.buf));
            })
            .unwrap();
            outstanding += 1;
        }
        if outstanding == 0 {
            break;
        }
        let (lat, buf) = rx.recv().unwrap();
        outstanding -= 1;
        t.latencies.push(lat);
        t.ops += 1;
        t.bytes += w.block as u64;
        bufs.push(buf);
    }
    t.time += start.elapsed();
}

fn summarize(w: &Workload, t: &mut Tally) -> Value {
    t.latencies.sort();
    let pct = |p: usize| {
        let l = &t.latencies;
        l[(l.len() * p / 100).min(l.len() - 1)].as_nanos() as f64 / 1000.0
    };
    let secs = t.time.as_secs_f64();
    json!({
        "ops": t.ops,
        "iops": (t.ops as f64 / secs).round(),
        "mib_per_s": round2(t.bytes as f64 / MIB as f64 / secs),
        "p50_us": round2(pct(50)),
        "p99_us": round2(pct(99)),
        "depth": w.depth,
        "block_bytes": w.block,
    })
}

fn describe(w: &Workload, v: &Value) -> String {
    if w.block == 4 * KIB {
        format!(
            "{:>7} IOPS p50 {:>6.1} p99 {:>6.1} us",
            v["iops"].as_f64().unwrap(),
            v["p50_us"].as_f64().unwrap(),
            v["p99_us"].as_f64().unwrap()
        )
    } else {
        format!("{:>8.1} MiB/s", v["mib_per_s"].as_f64().unwrap())
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Starts qemu-nbd serving `file` as export `disk0` on a free port.
fn start_qemu_nbd(bin: &Path, file: &Path) -> Daemon {
    for _ in 0..5 {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = Command::new(bin)
            .args(["-f", "raw", "-x", "disk0", "-b", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .args(["-t", "--shared=8", "--cache=writeback"])
            .arg(file)
            .stdout(Stdio::null())
            .spawn()
            .expect("start qemu-nbd");
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            if NbdClient::connect(&addr, "disk0").is_ok() {
                return Daemon { child, addr };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("qemu-nbd did not start");
}
