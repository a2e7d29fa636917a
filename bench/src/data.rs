//! The figures' inputs, read from the benchmarks' JSON in a results directory.

use serde_json::Value;
use std::path::{Path, PathBuf};

/// The results files, by what writes them.
pub const FABRIC_JSON: &str = "fabric_rtt.json";
/// `cargo bench -p vmm --bench remote_memory`.
pub const MEMORY_JSON: &str = "remote_memory.json";
/// `cargo bench -p storagenode --bench nbd`.
pub const STORAGE_JSON: &str = "storagenode.json";
/// The suite's own attach/detach run.
pub const TIMELINE_JSON: &str = "timeline.json";

/// Why a figure's input could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not JSON.
    #[error("{path} is not JSON")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A value the figure needs is missing or of the wrong type.
    #[error("{file} has no {what}")]
    Missing {
        /// The file's name.
        file: &'static str,
        /// What was looked for.
        what: String,
    },
}

/// A named series of (x, y) points.
#[derive(Debug, Clone, PartialEq)]
pub struct Curve {
    /// The legend's text.
    pub label: String,
    /// The points, in drawing order.
    pub points: Vec<(f64, f64)>,
}

/// Reads and parses `dir/file`.
pub fn load(dir: &Path, file: &str) -> Result<Value, DataError> {
    let path = dir.join(file);
    let text = std::fs::read_to_string(&path).map_err(|source| DataError::Read {
        path: path.clone(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| DataError::Parse { path, source })
}

/// The cache shares of the slowdown runs, as labelled in the JSON, with their
/// values in percent.
pub const SHARES: [(&str, f64); 4] = [
    ("100%", 100.0),
    ("50%", 50.0),
    ("25%", 25.0),
    ("12.5%", 12.5),
];

/// Figure 1's input: per workload, one slowdown curve per fabric (x: cache
/// share in percent, y: slowdown against all-local).
#[derive(Debug, Clone, PartialEq)]
pub struct Slowdowns {
    /// (workload, its curves), in the JSON's order.
    pub workloads: Vec<(String, Vec<Curve>)>,
}

/// The fabrics and workloads in the order the figure shows them; others follow
/// in the JSON's order.
const FABRIC_ORDER: [&str; 4] = ["memnode_tcp", "ideal", "rdma_like", "cxl_like"];
const WORKLOAD_ORDER: [&str; 5] = ["seq", "rand", "chase", "hash_zipf", "hash_uniform"];

/// `keys` sorted by their place in `order`, unknown ones last.
fn ordered<'a>(keys: impl Iterator<Item = &'a String>, order: &[&str]) -> Vec<&'a String> {
    let mut v: Vec<&String> = keys.collect();
    v.sort_by_key(|k| order.iter().position(|o| o == k).unwrap_or(order.len()));
    v
}

/// Reads [`Slowdowns`] from remote_memory.json's `slowdown_by_fabric`.
pub fn slowdowns(memory: &Value) -> Result<Slowdowns, DataError> {
    let missing = |what: &str| DataError::Missing {
        file: MEMORY_JSON,
        what: what.to_string(),
    };
    let fabrics = memory["slowdown_by_fabric"]
        .as_object()
        .ok_or_else(|| missing("slowdown_by_fabric"))?;
    let mut workloads: Vec<(String, Vec<Curve>)> = Vec::new();
    for key in ordered(fabrics.keys(), &FABRIC_ORDER) {
        let f = &fabrics[key];
        let label = f["label"].as_str().unwrap_or(key).to_string();
        let rows = f["workloads"]
            .as_object()
            .ok_or_else(|| missing(&format!("slowdown_by_fabric.{key}.workloads")))?;
        for w in ordered(rows.keys(), &WORKLOAD_ORDER) {
            let row = &rows[w];
            let points = SHARES
                .iter()
                .filter_map(|(k, pct)| Some((*pct, row[*k]["slowdown"].as_f64()?)))
                .collect();
            let curve = Curve {
                label: label.clone(),
                points,
            };
            match workloads.iter_mut().find(|(n, _)| n == w) {
                Some((_, curves)) => curves.push(curve),
                None => workloads.push((w.clone(), vec![curve])),
            }
        }
    }
    if workloads.is_empty() {
        return Err(missing("workloads in slowdown_by_fabric"));
    }
    Ok(Slowdowns { workloads })
}

/// The share up to which the VMM's fault latency CDF is drawn.
const CDF_SHOWN: f64 = 0.999;

/// Figure 2's input: latency distributions (x: µs, y: share at or below) and
/// the floors marked on them.
#[derive(Debug, Clone, PartialEq)]
pub struct Latencies {
    /// The distributions.
    pub curves: Vec<Curve>,
    /// (label, µs) of each vertical marker.
    pub floors: Vec<(String, f64)>,
}

/// `[[x, y], ...]` as points.
fn pairs(v: &Value) -> Option<Vec<(f64, f64)>> {
    v.as_array()?
        .iter()
        .map(|p| Some((p[0].as_f64()?, p[1].as_f64()?)))
        .collect()
}

/// Reads [`Latencies`]: the VMM's remote fault service time (remote_memory.json)
/// and, from fabric_rtt.json's free-scheduling run, the fabric page read and the
/// raw TCP echo round trips; the raw round trip's p50 is the floor marked, with
/// the remote fault floor (local fault + fabric round trip) beside it.
pub fn latencies(memory: &Value, fabric: &Value) -> Result<Latencies, DataError> {
    let vmm = &memory["vmm_remote_fault_service_us"];
    let cdf = pairs(&vmm["cdf"]).ok_or(DataError::Missing {
        file: MEMORY_JSON,
        what: "vmm_remote_fault_service_us.cdf".into(),
    })?;
    let faults = vmm["faults"].as_u64().unwrap_or(0);
    // The rising part up to 99.9%: one fault in thousands can take a
    // thousand times longer, and would squeeze the rest into a corner.
    let cut = cdf
        .iter()
        .position(|p| p.1 >= CDF_SHOWN)
        .map_or(cdf.len(), |i| i + 1);
    let first_nonzero = cdf.iter().position(|p| p.1 > 0.0).unwrap_or(0);
    let slowest = cdf.iter().find(|p| p.1 >= 1.0).map_or(0.0, |p| p.0);
    let mut curves = vec![Curve {
        label: format!(
            "VMM remote fault, fault to installed page ({faults} faults; to 99.9%, all within {})",
            if slowest >= 1000.0 {
                format!("{:.0} ms", slowest / 1000.0)
            } else {
                format!("{slowest:.0} µs")
            }
        ),
        points: cdf[first_nonzero.saturating_sub(1)..cut].to_vec(),
    }];
    let free = &fabric["free_scheduling"];
    let f_missing = |what: &str| DataError::Missing {
        file: FABRIC_JSON,
        what: format!("free_scheduling.{what}"),
    };
    for (key, label) in [
        (
            "fabric_page_read_rtt_cdf_us",
            "fabric page read round trip (fabric_rtt)",
        ),
        (
            "raw_tcp_echo_4k_rtt_cdf_us",
            "raw TCP echo, 4 KiB reply (fabric_rtt)",
        ),
    ] {
        curves.push(Curve {
            label: label.into(),
            points: pairs(&free[key]).ok_or_else(|| f_missing(key))?,
        });
    }
    let raw_p50 = free["raw_tcp_echo_4k_rtt_us"]["p50"]
        .as_f64()
        .ok_or_else(|| f_missing("raw_tcp_echo_4k_rtt_us.p50"))?;
    let mut floors = vec![(
        format!("raw round-trip floor p50 {raw_p50:.1} µs (fabric_rtt)"),
        raw_p50,
    )];
    if let Some(f) = memory["floor_us"]["p50"].as_f64() {
        floors.push((
            format!("remote fault floor p50 {f:.1} µs (local uffd fault + fabric RTT)"),
            f,
        ));
    }
    Ok(Latencies { curves, floors })
}

/// One server's figures on one workload.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerFigures {
    /// The server.
    pub server: String,
    /// Operations a second.
    pub iops: f64,
    /// MiB a second.
    pub mib_per_s: f64,
    /// Latency p50, µs.
    pub p50_us: f64,
    /// Latency p99, µs.
    pub p99_us: f64,
}

/// Figure 3's input: per workload, each server's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct Storage {
    /// (workload, block bytes, the servers' figures), in the bench's order.
    pub workloads: Vec<(String, u64, Vec<ServerFigures>)>,
}

/// The servers of the storage bench, with their legend text.
pub const SERVERS: [(&str, &str); 3] = [
    ("storagenode", "storagenode"),
    ("qemu_nbd", "qemu-nbd"),
    ("storagenode_no_fast_path", "storagenode --no-fast-path"),
];

/// Reads [`Storage`] from storagenode.json's `results`.
pub fn storage(v: &Value) -> Result<Storage, DataError> {
    let missing = |what: String| DataError::Missing {
        file: STORAGE_JSON,
        what,
    };
    let results = v["results"]
        .as_object()
        .ok_or_else(|| missing("results".into()))?;
    let mut workloads = Vec::new();
    for (name, r) in results {
        let mut servers = Vec::new();
        let mut block = 0;
        for (key, label) in SERVERS {
            let s = &r[key];
            let num = |k: &str| {
                s[k].as_f64()
                    .ok_or_else(|| missing(format!("results.{name}.{key}.{k}")))
            };
            block = s["block_bytes"].as_u64().unwrap_or(block);
            servers.push(ServerFigures {
                server: label.into(),
                iops: num("iops")?,
                mib_per_s: num("mib_per_s")?,
                p50_us: num("p50_us")?,
                p99_us: num("p99_us")?,
            });
        }
        workloads.push((name.clone(), block, servers));
    }
    Ok(Storage { workloads })
}

/// Figure 4's input: pages per memory node over time, and the attach and
/// detach events.
#[derive(Debug, Clone, PartialEq)]
pub struct Timeline {
    /// One curve per node (x: seconds since the VM started, y: pages).
    pub nodes: Vec<Curve>,
    /// (seconds, what happened).
    pub events: Vec<(f64, String)>,
}

/// Reads [`Timeline`] from timeline.json (see [`crate::timeline`]).
pub fn timeline(v: &Value) -> Result<Timeline, DataError> {
    let missing = |what: &str| DataError::Missing {
        file: TIMELINE_JSON,
        what: what.into(),
    };
    let samples = v["samples"].as_array().ok_or_else(|| missing("samples"))?;
    let mut nodes: Vec<Curve> = Vec::new();
    for s in samples {
        let t = s["t_s"].as_f64().ok_or_else(|| missing("samples[].t_s"))?;
        for n in s["nodes"].as_array().into_iter().flatten() {
            let (Some(addr), Some(pages)) = (n["label"].as_str(), n["pages"].as_f64()) else {
                return Err(missing("samples[].nodes[].label/pages"));
            };
            match nodes.iter_mut().find(|c| c.label == addr) {
                Some(c) => c.points.push((t, pages)),
                None => nodes.push(Curve {
                    label: addr.into(),
                    points: vec![(t, pages)],
                }),
            }
        }
    }
    let events = v["events"]
        .as_array()
        .ok_or_else(|| missing("events"))?
        .iter()
        .filter_map(|e| Some((e["t_s"].as_f64()?, e["what"].as_str()?.to_string())))
        .collect();
    Ok(Timeline { nodes, events })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn slowdowns_group_the_fabrics_by_workload() {
        let v = json!({"slowdown_by_fabric": {
            "memnode_tcp": {"label": "tcp", "workloads": {
                "seq": {"100%": {"slowdown": 1.0}, "50%": {"slowdown": 2.0}, "25%": {"slowdown": 3.0}, "12.5%": {"slowdown": 4.0}},
                "rand": {"100%": {"slowdown": 1.0}, "25%": {"slowdown": 9.0}}}},
            "ideal": {"label": "ideal", "workloads": {"seq": {"100%": {"slowdown": 1.0}}}}}});
        let s = slowdowns(&v).unwrap();
        assert_eq!(s.workloads.len(), 2);
        // seq before rand, the memory node before the ideal fabric.
        let (name, seq) = &s.workloads[0];
        assert_eq!(name, "seq");
        assert_eq!(seq.len(), 2);
        assert_eq!(seq[0].label, "tcp");
        assert_eq!(seq[0].points[3], (12.5, 4.0));
        assert!(slowdowns(&json!({})).is_err());
    }

    #[test]
    fn latencies_keep_the_rising_part_and_mark_both_floors() {
        let memory = json!({"vmm_remote_fault_service_us": {"faults": 10, "cdf": [[1.0, 0.0], [2.0, 0.0], [3.0, 0.5], [4.0, 1.0], [5.0, 1.0]]},
                            "floor_us": {"p50": 20.0}});
        let fabric = json!({"free_scheduling": {
            "raw_tcp_echo_4k_rtt_us": {"p50": 15.0},
            "raw_tcp_echo_4k_rtt_cdf_us": [[14.0, 0.5], [16.0, 1.0]],
            "fabric_page_read_rtt_cdf_us": [[17.0, 0.5], [19.0, 1.0]]}});
        let l = latencies(&memory, &fabric).unwrap();
        assert_eq!(l.curves[0].points, vec![(2.0, 0.0), (3.0, 0.5), (4.0, 1.0)]);
        assert!(
            l.curves[0].label.contains("all within 4 µs"),
            "{}",
            l.curves[0].label
        );
        assert_eq!(l.curves.len(), 3);
        assert_eq!(l.floors.len(), 2);
        assert_eq!(l.floors[0].1, 15.0);
        let e = latencies(&memory, &json!({})).unwrap_err().to_string();
        assert!(e.contains("fabric_rtt.json has no free_scheduling."), "{e}");
    }

    #[test]
    fn the_timeline_has_a_curve_per_node_and_its_events() {
        let v = json!({"samples": [
            {"t_s": 0.0, "nodes": [{"label": "A", "pages": 1}]},
            {"t_s": 0.5, "nodes": [{"label": "A", "pages": 5}, {"label": "B", "pages": 2}]}],
            "events": [{"t_s": 0.4, "what": "attach B"}]});
        let t = timeline(&v).unwrap();
        assert_eq!(t.nodes.len(), 2);
        assert_eq!(t.nodes[0].points, vec![(0.0, 1.0), (0.5, 5.0)]);
        assert_eq!(t.events, vec![(0.4, "attach B".to_string())]);
    }
}
