//! What end-to-end page integrity and encryption cost:
//! `cargo bench -p vmm --bench page_security`.
//!
//! In one run, on this machine's /dev/kvm with a `memnode` process on loopback,
//! three modes side by side, rounds interleaved (these machines are noisy):
//! no check at all (`SPLITVISOR_BENCH_NO_INTEGRITY=1`, measurement only), the
//! default integrity check, and `--encrypt-pages`. For each: the remote fault
//! service time (p50/p99, random accesses, prefetch off) and the run time of a
//! sequential and a random workload with 25% of their working set cached; each
//! figure is the median of the rounds, and each mode's ratio to no check.
//! Targets (issue 17): integrity ≤ 1.05x and encryption ≤ 1.15x on fault p50.
//!
//! One fault's p50 moves by tens of percent between runs on these machines, far
//! more than the check's few percent, so the ratio across runs cannot show the
//! targets. The VMM therefore also times the check where it runs (the mean per
//! fetched page, `seal_check_mean_us`): within one run, the fault p50 against
//! the same p50 without that time is the check's share, free of run-to-run
//! noise. Both ratios are reported; the targets are judged on the in-run one.
//!
//! Writes `$SPLITVISOR_BENCH_OUT` (default `target/bench/page_security.json`).

use serde_json::json;
use splitvisor_tests::{Daemon, sibling_bin};
use std::process::Command;

const VMM: &str = env!("CARGO_BIN_EXE_vmm");

#[derive(Clone, Copy)]
enum Mode {
    Off,
    Integrity,
    Encrypt,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Off => "no_check",
            Mode::Integrity => "integrity",
            Mode::Encrypt => "encrypt_pages",
        }
    }
}

fn vmm(
    node: &str,
    mode: Mode,
    workload: &str,
    mem: u64,
    cache: u64,
    prefetch: usize,
) -> serde_json::Value {
    let json = std::env::temp_dir().join(format!("vmm-sec-bench-{}.json", std::process::id()));
    let mut cmd = Command::new(VMM);
    cmd.args(["run", "--workload", workload, "--memnode", node])
        .args([
            "--mem",
            &mem.to_string(),
            "--local-cache",
            &cache.to_string(),
        ])
        .args(["--prefetch", &prefetch.to_string()])
        .arg("--stats-json")
        .arg(&json)
        .env("RUST_LOG", "error");
    match mode {
        Mode::Off => {
            cmd.env("SPLITVISOR_BENCH_NO_INTEGRITY", "1");
        }
        Mode::Integrity => {}
        Mode::Encrypt => {
            cmd.arg("--encrypt-pages");
        }
    }
    let out = cmd.output().expect("run vmm");
    assert!(
        out.status.success(),
        "vmm {workload} ({}) failed: {}",
        mode.name(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(json);
    v
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::var("SPLITVISOR_BENCH_QUICK").is_ok();
    let node = Daemon::memnode(&sibling_bin(VMM, "memnode"), &["--capacity", "4G"]);
    let rounds = if quick { 1 } else { 5 };
    let (fault_mb, seq_mb, rand_mb) = if quick {
        (8u64, 16u64, 4u64)
    } else {
        (32, 128, 16)
    };
    let modes = [Mode::Off, Mode::Integrity, Mode::Encrypt];
    // Per mode: fault p50s, fault p99s, seq times, rand times, and the fault
    // p50 over the same p50 less the check's mean time, in the same run.
    let mut m: Vec<[Vec<f64>; 5]> = modes.iter().map(|_| Default::default()).collect();
    for round in 0..rounds {
        for (k, &mode) in modes.iter().enumerate() {
            let f = vmm(
                &node.addr,
                mode,
                &format!("rand:size={fault_mb}M"),
                fault_mb << 20,
                (fault_mb << 20) / 8,
                0,
            );
            let p50 = f["stats"]["fetch_p50_us"].as_f64().unwrap();
            let check = f["stats"]["seal_check_mean_us"].as_f64().unwrap_or(0.0);
            m[k][0].push(p50);
            m[k][1].push(f["stats"]["fetch_p99_us"].as_f64().unwrap());
            m[k][4].push(p50 / (p50 - check).max(1e-3));
            let s = vmm(
                &node.addr,
                mode,
                &format!("seq:size={seq_mb}M"),
                seq_mb << 20,
                (seq_mb << 20) / 4,
                256,
            );
            m[k][2].push(s["elapsed_s"].as_f64().unwrap());
            let r = vmm(
                &node.addr,
                mode,
                &format!("rand:size={rand_mb}M"),
                rand_mb << 20,
                (rand_mb << 20) / 4,
                256,
            );
            m[k][3].push(r["elapsed_s"].as_f64().unwrap());
            eprintln!("round {round} {}: done", mode.name());
        }
    }
    let med: Vec<[f64; 5]> = m.into_iter().map(|v| v.map(median)).collect();
    let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
    let mut results = serde_json::Map::new();
    for (k, mode) in modes.iter().enumerate() {
        let ratio = |i: usize| r3(med[k][i] / med[0][i]);
        results.insert(
            mode.name().into(),
            json!({
                "remote_fault_us": {"p50": med[k][0], "p99": med[k][1]},
                "seq_25pct_s": r3(med[k][2]),
                "rand_25pct_s": r3(med[k][3]),
                "ratio_to_no_check": {"fault_p50": ratio(0), "fault_p99": ratio(1), "seq_25pct": ratio(2), "rand_25pct": ratio(3)},
                "fault_p50_in_run_ratio": r3(med[k][4]),
            }),
        );
    }
    let fault_ratio = |k: usize| med[k][4];
    let out = json!({
        "benchmark": "page_security",
        "command": "cargo bench -p vmm --bench page_security",
        "rounds": rounds,
        "workloads": {"fault": format!("rand:size={fault_mb}M, 1/8 cached, prefetch off"),
                      "seq": format!("seq:size={seq_mb}M, 25% cached"),
                      "rand": format!("rand:size={rand_mb}M, 25% cached")},
        "modes": results,
        "targets": {
            "judged_on": "fault_p50_in_run_ratio",
            "integrity_fault_p50_at_most_1_05x": fault_ratio(1) <= 1.05,
            "encryption_fault_p50_at_most_1_15x": fault_ratio(2) <= 1.15,
        }
    });
    let path = splitvisor_tests::write_bench_output(
        "page_security",
        &serde_json::to_string_pretty(&out).unwrap(),
    );
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
    println!("wrote {}", path.display());
}
