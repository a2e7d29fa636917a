//! What two copies of every page cost, and how a VM rides out a node's death:
//! `cargo bench -p vmm --bench replication`.
//!
//! In one run, on this machine's /dev/kvm with three `memnode` processes on
//! loopback:
//! - `--replicas 2` next to `--replicas 1` on the same nodes, rounds
//!   interleaved: the sequential and random workloads at 25% cache (run time;
//!   target ≤ 1.15x for seq) and the remote fault service time (random
//!   accesses, prefetch off; target p50 within 1.1x);
//! - the memory the copies take on the nodes: copies per page placed
//!   (exactly 2 with two replicas);
//! - the guest's longest stall on a fault when a node is killed (`kill -9`)
//!   and when it is stopped (SIGSTOP, the node timeout's case), against the
//!   node timeout plus one round trip;
//! - re-replication throughput after a kill, at the default rate limit and
//!   with the limit lifted.
//!
//! Writes `$SPLITVISOR_BENCH_OUT` (default `target/bench/replication.json`).

use serde_json::json;
use splitvisor_tests::{Daemon, sibling_bin};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const VMM: &str = env!("CARGO_BIN_EXE_vmm");

fn memnode() -> Daemon {
    Daemon::memnode(&sibling_bin(VMM, "memnode"), &["--capacity", "4G"])
}

fn args(nodes: &[&str], replicas: usize, workload: &str, mem: u64, cache: u64) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "run".into(),
        "--workload".into(),
        workload.into(),
        "--mem".into(),
        mem.to_string(),
        "--local-cache".into(),
        cache.to_string(),
        "--replicas".into(),
        replicas.to_string(),
    ];
    for n in nodes {
        a.extend(["--memnode".into(), n.to_string()]);
    }
    a
}

/// Runs `vmm ARGS --stats-json` to the end; returns its JSON.
fn run(mut a: Vec<String>) -> serde_json::Value {
    let json = std::env::temp_dir().join(format!("vmm-repl-bench-{}.json", std::process::id()));
    a.extend(["--stats-json".into(), json.display().to_string()]);
    let out = Command::new(VMM)
        .args(&a)
        .env("RUST_LOG", "error")
        .output()
        .expect("run vmm");
    assert!(
        out.status.success(),
        "vmm {a:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(json);
    v
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// A VM started in the background with an API socket.
fn start(mut a: Vec<String>, tag: &str) -> (Child, std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir();
    let sock = dir.join(format!("vmm-repl-bench-{}-{tag}.sock", std::process::id()));
    let json = dir.join(format!("vmm-repl-bench-{}-{tag}.json", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    a.extend([
        "--api-sock".into(),
        sock.display().to_string(),
        "--stats-json".into(),
        json.display().to_string(),
    ]);
    let child = Command::new(VMM)
        .args(&a)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vmm");
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(t0.elapsed() < Duration::from_secs(30), "no API socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    (child, sock, json)
}

fn stats(sock: &std::path::Path) -> serde_json::Value {
    vmm::api::request(sock, "GET", "/stats")
        .map(|(_, v)| v)
        .unwrap_or_default()
}

fn finish(child: Child, json: &std::path::Path) -> serde_json::Value {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "vmm failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    let _ = std::fs::remove_file(json);
    v
}

/// A node killed (`stop = false`) or stopped mid-run: the longest fault
/// stall, and re-replication's pages per second from the first sign of
/// missing copies to none left.
fn failure_run(quick: bool, stop: bool, rate: Option<u64>) -> serde_json::Value {
    let nodes = [memnode(), memnode(), memnode()];
    let addrs: Vec<&str> = nodes.iter().map(|n| n.addr.as_str()).collect();
    let mb: u64 = if quick { 16 } else { 64 };
    let ops = mb * 256 * 40;
    let mut a = args(
        &addrs,
        2,
        &format!("rand:size={mb}M,ops={ops}"),
        mb << 20,
        (mb << 20) / 4,
    );
    if let Some(r) = rate {
        a.extend(["--rereplicate-rate".into(), r.to_string()]);
    }
    let (child, sock, json) = start(a, if stop { "stop" } else { "kill" });
    // Let the guest write its working set out once.
    let t0 = Instant::now();
    while stats(&sock)["pages_placed"].as_u64().unwrap_or(0) < mb * 256 * 9 / 10 {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the guest never wrote its pages out"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    if stop {
        nodes[1].freeze();
    } else {
        nodes[1].signal(libc::SIGKILL);
    }
    let killed = Instant::now();
    // From the failure's detection to full redundancy.
    let mut first: Option<(Instant, u64)> = None;
    let mut done = None;
    while done.is_none() && killed.elapsed() < Duration::from_secs(120) {
        let s = stats(&sock);
        let (below, copies) = (
            s["pages_below_replicas"].as_u64().unwrap_or(0),
            s["rereplicated"].as_u64().unwrap_or(0),
        );
        if s["node_failures"] == 1 {
            match first {
                None => first = Some((Instant::now(), copies)),
                Some((t, c)) if below == 0 => done = Some((t.elapsed(), copies - c, below)),
                _ => {}
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let end = finish(child, &json);
    if stop {
        nodes[1].thaw();
    }
    let (secs, copies) = done.map_or((f64::NAN, 0), |(d, c, _)| (d.as_secs_f64(), c));
    let s = &end["stats"];
    json!({
        "failure": if stop { "SIGSTOP" } else { "kill -9" },
        "rate_limit_pages_s": s["rereplicate_rate"],
        "longest_fault_stall_ms": r3(s["fault_max_us"].as_f64().unwrap_or(0.0) / 1000.0),
        "detected_after_ms": first.map(|(t, _)| r3((t - killed).as_secs_f64() * 1000.0)),
        "rereplication_s": r3(secs),
        "rereplicated_pages": copies,
        "rereplication_pages_s": if secs > 0.0 { (copies as f64 / secs).round() } else { 0.0 },
        "pages_below_replicas_at_end": s["pages_below_replicas"],
        "fetch_p50_us": s["fetch_p50_us"],
    })
}

fn main() {
    let quick = std::env::var("SPLITVISOR_BENCH_QUICK").is_ok();
    let nodes = [memnode(), memnode(), memnode()];
    let addrs: Vec<&str> = nodes.iter().map(|n| n.addr.as_str()).collect();
    let rounds = if quick { 1 } else { 5 };
    let (fault_mb, seq_mb, rand_mb) = if quick {
        (8u64, 16u64, 4u64)
    } else {
        (32, 128, 16)
    };
    // Per replica count: seq times, rand times, fault p50s, fault p99s,
    // copies per placed page.
    let mut m: [[Vec<f64>; 5]; 2] = Default::default();
    for round in 0..rounds {
        for (k, replicas) in [1usize, 2].into_iter().enumerate() {
            let s = run(args(
                &addrs,
                replicas,
                &format!("seq:size={seq_mb}M"),
                seq_mb << 20,
                (seq_mb << 20) / 4,
            ));
            m[k][0].push(s["elapsed_s"].as_f64().unwrap());
            let st = &s["stats"];
            let copies: u64 = st["node_pages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p[1].as_u64().unwrap())
                .sum();
            m[k][4].push(copies as f64 / st["pages_placed"].as_u64().unwrap().max(1) as f64);
            let r = run(args(
                &addrs,
                replicas,
                &format!("rand:size={rand_mb}M"),
                rand_mb << 20,
                (rand_mb << 20) / 4,
            ));
            m[k][1].push(r["elapsed_s"].as_f64().unwrap());
            let mut fa = args(
                &addrs,
                replicas,
                &format!("rand:size={fault_mb}M"),
                fault_mb << 20,
                (fault_mb << 20) / 8,
            );
            fa.extend(["--prefetch".into(), "0".into()]);
            let f = run(fa);
            m[k][2].push(f["stats"]["fetch_p50_us"].as_f64().unwrap());
            m[k][3].push(f["stats"]["fetch_p99_us"].as_f64().unwrap());
            eprintln!("round {round}: --replicas {replicas} done");
        }
    }
    let med: Vec<[f64; 5]> = m.into_iter().map(|v| v.map(median)).collect();
    let ratio = |i: usize| r3(med[1][i] / med[0][i]);
    let mode = |k: usize| {
        json!({
            "seq_25pct_s": r3(med[k][0]),
            "rand_25pct_s": r3(med[k][1]),
            "remote_fault_us": {"p50": med[k][2], "p99": med[k][3]},
            "copies_per_placed_page": r3(med[k][4]),
        })
    };
    eprintln!("failure runs");
    let kill = failure_run(quick, false, None);
    let stop = failure_run(quick, true, None);
    let unlimited = failure_run(quick, false, Some(10_000_000));
    // The default node timeout, plus one round trip (the fault p50 is a
    // round trip and an install).
    let timeout_ms = vmm::config::default_node_timeout().as_secs_f64() * 1000.0;
    let bound_ms = timeout_ms + med[1][2] / 1000.0;
    let stall = |v: &serde_json::Value| v["longest_fault_stall_ms"].as_f64().unwrap_or(f64::MAX);
    let out = json!({
        "benchmark": "replication",
        "command": "cargo bench -p vmm --bench replication",
        "rounds": rounds,
        "nodes": 3,
        "workloads": {"seq": format!("seq:size={seq_mb}M, 25% cached"),
                      "rand": format!("rand:size={rand_mb}M, 25% cached"),
                      "fault": format!("rand:size={fault_mb}M, 1/8 cached, prefetch off")},
        "replicas_1": mode(0),
        "replicas_2": mode(1),
        "ratio_2_to_1": {"seq_25pct": ratio(0), "rand_25pct": ratio(1), "fault_p50": ratio(2), "fault_p99": ratio(3)},
        "node_killed": kill,
        "node_stopped": stop,
        "node_killed_no_rate_limit": unlimited,
        "stall_bound_ms": r3(bound_ms),
        "targets": {
            "seq_at_most_1_15x": ratio(0) <= 1.15,
            "fault_p50_within_1_1x": ratio(2) <= 1.1,
            "exactly_2_copies_per_page": (med[1][4] - 2.0).abs() < 1e-9,
            "stall_below_node_timeout_plus_rtt": stall(&kill) < bound_ms && stall(&stop) < bound_ms,
        }
    });
    let text = serde_json::to_string_pretty(&out).unwrap();
    let path = splitvisor_tests::write_bench_output("replication", &text);
    println!("{text}");
    println!("wrote {}", path.display());
}
