//! What a shim vCPU's result says beyond ops and checksum: the workload's own
//! figures (throughput, STREAM bandwidth, key-value GET latency percentiles, graph
//! and sort phase times), from its TSC cycles. Cycles become time with the vCPU's
//! TSC frequency as KVM reports it; without one, figures stay in cycles and say so.

use super::Workload;
use crate::guest::shim::VcpuOutcome;
use guest_shim::abi::{
    PHASE_ADD, PHASE_COPY, PHASE_SCALE, PHASE_TRIAD, WL_GRAPH, WL_KV, WL_SORT, WL_STREAM,
    WL_STRIDE, WorkloadResult,
};
use serde_json::{Value, json};

/// One vCPU's workload figures: a phrase for its result line and JSON keys.
#[derive(Debug, Clone, PartialEq)]
pub struct Figures {
    /// E.g. `0.412 s, 2.43 Mops/s; GET p50 180 ns, p99 41 us`; empty if nothing to add.
    pub text: String,
    /// `--stats-json` keys (always at least `cycles`, `phases_cycles`, `aux`).
    pub json: Value,
}

/// Cycles as a duration, in the unit that reads best.
fn time(cycles: u64, khz: u32) -> String {
    let ns = cycles as f64 * 1e6 / khz as f64;
    if ns < 1e3 {
        format!("{ns:.0} ns")
    } else if ns < 1e6 {
        format!("{:.1} us", ns / 1e3)
    } else if ns < 1e9 {
        format!("{:.1} ms", ns / 1e6)
    } else {
        format!("{:.3} s", ns / 1e9)
    }
}

fn ns(cycles: u64, khz: u32) -> u64 {
    (cycles as u128 * 1_000_000 / khz as u128) as u64
}

/// Megabytes per second for `bytes` moved in `cycles`.
fn mb_s(bytes: u64, cycles: u64, khz: u32) -> f64 {
    if cycles == 0 {
        return 0.0;
    }
    bytes as f64 / (cycles as f64 / (khz as f64 * 1e3)) / 1e6
}

/// The figures of result `r` of workload `w`.
pub fn figures(w: &Workload, r: &WorkloadResult, tsc_khz: Option<u32>) -> Figures {
    let mut json = json!({
        "cycles": r.cycles, "phases_cycles": r.phases, "aux": r.aux, "tsc_khz": tsc_khz,
    });
    let mut parts = Vec::new();
    let Some(khz) = tsc_khz else {
        // No TSC frequency: cycles only.
        if w.id == WL_KV {
            parts.push(format!(
                "GET p50 {} cycles, p99 {} cycles (no TSC frequency: cycles)",
                r.lat_p50, r.lat_p99
            ));
            json["lat_p50_cycles"] = json!(r.lat_p50);
            json["lat_p99_cycles"] = json!(r.lat_p99);
        } else if w.id >= WL_GRAPH {
            parts.push(format!("{} cycles (no TSC frequency: cycles)", r.cycles));
        }
        return Figures {
            text: parts.join("; "),
            json,
        };
    };
    let secs = r.cycles as f64 / (khz as f64 * 1e3);
    json["seconds"] = json!(secs);
    if w.id < WL_GRAPH {
        return Figures {
            text: String::new(),
            json,
        };
    }
    let ops_s = if secs > 0.0 { r.ops as f64 / secs } else { 0.0 };
    json["ops_per_s"] = json!(ops_s);
    parts.push(format!(
        "{}, {:.3} Mops/s",
        time(r.cycles, khz),
        ops_s / 1e6
    ));
    match w.id {
        WL_STREAM => {
            // aux: bytes moved by all four kernels = iters × 10 × (one array).
            let array = r.bytes / 3;
            let iters = if array == 0 { 0 } else { r.aux / (10 * array) };
            let per = |k: usize, arrays: u64| mb_s(iters * arrays * array, r.phases[k], khz);
            let (copy, scale, add, triad) = (
                per(PHASE_COPY, 2),
                per(PHASE_SCALE, 2),
                per(PHASE_ADD, 3),
                per(PHASE_TRIAD, 3),
            );
            parts.push(format!(
                "copy {copy:.0} MB/s, scale {scale:.0} MB/s, add {add:.0} MB/s, triad {triad:.0} MB/s"
            ));
            json["mb_per_s"] = json!({"copy": copy, "scale": scale, "add": add, "triad": triad});
        }
        WL_KV => {
            parts.push(format!(
                "{} GETs, p50 {}, p99 {}",
                r.aux,
                time(r.lat_p50, khz),
                time(r.lat_p99, khz)
            ));
            json["lat_p50_cycles"] = json!(r.lat_p50);
            json["lat_p99_cycles"] = json!(r.lat_p99);
            json["lat_p50_ns"] = json!(ns(r.lat_p50, khz));
            json["lat_p99_ns"] = json!(ns(r.lat_p99, khz));
        }
        WL_GRAPH => parts.push(format!(
            "BFS reached {} vertices; build {}, PageRank {}, BFS {}, verify {}",
            r.aux,
            time(r.phases[0], khz),
            time(r.phases[1], khz),
            time(r.phases[2], khz),
            time(r.phases[3], khz)
        )),
        WL_SORT => {
            let bw = mb_s(r.aux, r.phases[1], khz);
            parts.push(format!(
                "sort {} ({bw:.0} MB/s moved), verify {}",
                time(r.phases[1], khz),
                time(r.phases[2], khz)
            ));
            json["sort_mb_per_s"] = json!(bw);
        }
        WL_STRIDE => parts.push(format!(
            "{} positions: write pass {}, verify pass {}",
            r.aux,
            time(r.phases[0], khz),
            time(r.phases[1], khz)
        )),
        _ => {}
    }
    Figures {
        text: parts.join("; "),
        json,
    }
}

/// One shim vCPU's outcome, as `vmm run` reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct VcpuReport {
    /// It reported a result that verified, and exited with code 0.
    pub ok: bool,
    /// Its line: `vCPU i: NAME verified: ..., checksum ..., N mismatches, ...`.
    pub line: String,
    /// Its entry in `--stats-json`'s `results`.
    pub json: Value,
}

/// The report on vCPU `i` that ran `workload` and ended as `o`.
pub fn vcpu(workload: &Workload, i: usize, o: &VcpuOutcome) -> VcpuReport {
    let Some(r) = &o.result else {
        return VcpuReport {
            ok: false,
            line: format!(
                "vCPU {i}: exited with code {} without reporting a result",
                o.exit_code
            ),
            json: json!({"vcpu": i, "ok": false, "exit_code": o.exit_code, "kvm": o.kvm}),
        };
    };
    let ok = r.failed == 0 && o.exit_code == 0;
    let f = figures(workload, r, o.tsc_khz);
    let line = format!(
        "vCPU {i}: {} {}: {} ops over {} MiB, checksum {:#018x}, {} mismatches, exit code {}{}{}",
        workload.name,
        if ok { "verified" } else { "FAILED" },
        r.ops,
        r.bytes >> 20,
        r.checksum,
        r.mismatches,
        o.exit_code,
        if f.text.is_empty() { "" } else { "; " },
        f.text
    );
    let mut json = json!({
        "vcpu": i, "ok": ok, "ops": r.ops, "bytes": r.bytes, "checksum": r.checksum,
        "mismatches": r.mismatches, "exit_code": o.exit_code, "kvm": o.kvm,
    });
    if let (Some(j), Value::Object(extra)) = (json.as_object_mut(), f.json) {
        j.extend(extra);
    }
    VcpuReport { ok, line, json }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_latency_is_in_ns_with_a_tsc_frequency_and_in_cycles_without() {
        let w: Workload = "kv".parse().unwrap();
        let r = WorkloadResult {
            ops: 1000,
            cycles: 2_000_000,
            lat_p50: 200,
            lat_p99: 20_000,
            aux: 900,
            ..Default::default()
        };
        let f = figures(&w, &r, Some(2_000_000));
        assert!(f.text.contains("p50 100 ns, p99 10.0 us"), "{}", f.text);
        assert_eq!(f.json["lat_p99_ns"], 10_000);
        let f = figures(&w, &r, None);
        assert!(f.text.contains("p50 200 cycles"), "{}", f.text);
        assert!(f.text.contains("no TSC frequency"), "{}", f.text);
        assert!(f.json.get("lat_p50_ns").is_none());
    }

    #[test]
    fn a_mismatch_or_a_missing_result_is_not_ok() {
        let w: Workload = "sort".parse().unwrap();
        let mut o = VcpuOutcome {
            exit_code: 0,
            result: Some(WorkloadResult {
                mismatches: 1,
                failed: 1,
                ..Default::default()
            }),
            kvm: None,
            tsc_khz: None,
        };
        let v = vcpu(&w, 0, &o);
        assert!(!v.ok && v.line.contains("sort FAILED"), "{}", v.line);
        assert_eq!(v.json["mismatches"], 1);
        o.result = None;
        assert!(!vcpu(&w, 0, &o).ok);
        o.result = Some(WorkloadResult::default());
        let v = vcpu(&w, 0, &o);
        assert!(v.ok && v.line.contains("sort verified"), "{}", v.line);
    }

    #[test]
    fn stream_bandwidth_per_kernel() {
        let w: Workload = "stream".parse().unwrap();
        // One array of 1 MB, one repetition, each kernel 1 ms at 1 GHz.
        let r = WorkloadResult {
            ops: 1,
            cycles: 4_000_000,
            bytes: 3_000_000,
            aux: 10_000_000,
            phases: [1_000_000; 4],
            ..Default::default()
        };
        let f = figures(&w, &r, Some(1_000_000));
        assert!(
            f.text
                .contains("copy 2000 MB/s, scale 2000 MB/s, add 3000 MB/s, triad 3000 MB/s"),
            "{}",
            f.text
        );
    }
}
