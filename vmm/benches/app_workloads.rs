//! The far-memory application workloads (issue 21) at shrinking cache shares,
//! with the eviction policies side by side, in one run.
//!
//! For each workload (graph, kv, kv with a concurrent scan, sort, stream,
//! stride) and each fabric (a `memnode` process over loopback TCP, and the
//! ideal in-process fabric): the run time all-local (100% of its working set
//! cached) and at 50%, 25% and 12.5%, under `--evict clock` (today's default)
//! and `--evict 2q` (scan-resistant); each point's slowdown is against the
//! all-local run of the same policy. Faults are reported beside the times,
//! and for `kv_scan` the store's own faults (all faults less the scan's one
//! per page it reads), whose ratio CLOCK / 2Q is the hit-rate gain the policy
//! buys.
//!
//! `cargo bench -p vmm --bench app_workloads`; `SPLITVISOR_BENCH_QUICK=1`
//! runs a small subset (CI checks that it runs, not its figures). Output:
//! `target/bench/app_workloads.json`.

use serde_json::json;
use splitvisor_tests::{Daemon, sibling_bin, vmm_run};
use std::time::Duration;

const VMM: &str = env!("CARGO_BIN_EXE_vmm");

/// Cache shares of the working set.
const FRACTIONS: [(&str, f64); 4] = [("100%", 1.0), ("50%", 0.5), ("25%", 0.25), ("12.5%", 0.125)];
const POLICIES: [&str; 2] = ["clock", "2q"];

/// A workload: its name, its `--workload` spec, the guest RAM (its working
/// set) and, for `kv_scan`, the pages its scan reads (one fault each).
struct Workload {
    name: &'static str,
    spec: String,
    mem: u64,
    scan_pages: u64,
}

fn main() {
    let quick = std::env::var("SPLITVISOR_BENCH_QUICK").is_ok();
    let node = Daemon::memnode(&sibling_bin(VMM, "memnode"), &["--capacity", "4G"]);
    let mb = if quick { 8 } else { 32 };
    let kv_ops: u64 = if quick { 40_000 } else { 131_072 };
    let mut workloads = vec![Workload {
        name: "kv_scan",
        spec: format!("kv:ops={kv_ops},get=90,theta=0.99,scan=1,seed=9"),
        mem: mb << 20,
        scan_pages: kv_ops / 8,
    }];
    if !quick {
        for (name, spec) in [
            ("graph", "graph:iters=3,degree=8,seed=5".to_string()),
            ("kv", format!("kv:ops={kv_ops},get=90,theta=0.99,seed=9")),
            ("sort", "sort:seed=3".to_string()),
            ("stream", "stream:iters=2".to_string()),
            ("stride", "stride:stride=-3p,streams=3".to_string()),
        ] {
            workloads.push(Workload {
                name,
                spec,
                mem: mb << 20,
                scan_pages: 0,
            });
        }
    }
    let fabrics: &[(&str, &str)] = if quick {
        &[("memnode_tcp", node.addr.as_str())]
    } else {
        &[("memnode_tcp", node.addr.as_str()), ("ideal", "ideal")]
    };
    let fractions: &[(&str, f64)] = if quick {
        &[FRACTIONS[0], FRACTIONS[2]]
    } else {
        &FRACTIONS
    };

    let mut table = Vec::new();
    let mut by_fabric = serde_json::Map::new();
    let mut kv_scan_gain = serde_json::Map::new();
    for (fabric, memnode) in fabrics {
        let mut rows = serde_json::Map::new();
        for w in &workloads {
            let mut row = serde_json::Map::new();
            for policy in POLICIES {
                let mut points = serde_json::Map::new();
                let mut base = 0.0;
                for (label, frac) in fractions {
                    let cache = ((w.mem as f64 * frac) as u64).max(1 << 20) & !4095;
                    let r = vmm(memnode, &w.spec, w.mem, cache, policy);
                    let t = r["elapsed_s"].as_f64().unwrap();
                    if *frac == 1.0 {
                        base = t;
                    }
                    let st = &r["stats"];
                    let faults = st["faults_remote"].as_u64().unwrap_or(0)
                        + st["faults_zero"].as_u64().unwrap_or(0);
                    let own = faults.saturating_sub(w.scan_pages);
                    points.insert(
                        (*label).into(),
                        json!({"elapsed_s": round3(t), "slowdown": round3(t / base),
                               "faults": faults, "faults_besides_scan": own,
                               "prefetch_remote": st["prefetch_remote"],
                               "evict_promoted": st["evict_promoted"]}),
                    );
                    table.push(format!(
                        "{fabric:>11} {:>8} {policy:>5} {label:>6}: {t:8.3} s  x{:.2}  faults {faults}{}",
                        w.name,
                        t / base,
                        if w.scan_pages > 0 {
                            format!(" ({own} besides the scan's {})", w.scan_pages)
                        } else {
                            String::new()
                        }
                    ));
                }
                row.insert(policy.into(), serde_json::Value::Object(points));
            }
            if w.scan_pages > 0 {
                // The store's own faults under CLOCK over 2Q, per cache share.
                let gain: serde_json::Map<_, _> = fractions
                    .iter()
                    .skip(1)
                    .map(|(label, _)| {
                        let own = |p: &str| row[p][*label]["faults_besides_scan"].as_u64().unwrap();
                        let g = own("clock") as f64 / own("2q").max(1) as f64;
                        ((*label).to_string(), json!(round3(g)))
                    })
                    .collect();
                kv_scan_gain.insert((*fabric).into(), serde_json::Value::Object(gain));
            }
            rows.insert(w.name.into(), serde_json::Value::Object(row));
        }
        by_fabric.insert((*fabric).into(), serde_json::Value::Object(rows));
    }
    let gain_25 = kv_scan_gain["memnode_tcp"]["25%"].as_f64().unwrap();
    let out = json!({
        "benchmark": "app_workloads",
        "command": "cargo bench -p vmm --bench app_workloads",
        "working_set_mib": mb,
        "policies": POLICIES,
        "by_fabric": by_fabric,
        "kv_scan_store_faults_clock_over_2q": kv_scan_gain,
        "targets": {
            "kv_scan_2q_at_least_1_5x_fewer_store_faults_at_25pct": gain_25 >= 1.5,
        },
        "not_measured_yet": "--prefetcher leap (issue 21): every run here uses the default --prefetcher seq",
    });
    let text = serde_json::to_string_pretty(&out).unwrap();
    let path = splitvisor_tests::write_bench_output("app_workloads", &text);
    println!("{text}");
    for l in table {
        println!("{l}");
    }
    println!("wrote {}", path.display());
}

/// Runs `vmm run` over `memnode` and returns its `--stats-json`.
fn vmm(memnode: &str, workload: &str, mem: u64, cache: u64, policy: &str) -> serde_json::Value {
    let (mem, cache) = (mem.to_string(), cache.to_string());
    let args = [
        "--workload",
        workload,
        "--memnode",
        memnode,
        "--mem",
        &mem,
        "--local-cache",
        &cache,
        "--evict",
        policy,
    ];
    let r = vmm_run(VMM, &args, Duration::from_secs(1800));
    assert!(r.ok, "vmm {args:?} failed: {}", r.stderr);
    r.json
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
