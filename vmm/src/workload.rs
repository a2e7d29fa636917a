//! `--workload NAME[:k=v,...]`: which guest-shim workload to run, and its settings.

pub mod report;

use fabric::units::parse_size;
use guest_shim::abi::{
    WL_CHASE, WL_GRAPH, WL_HASH, WL_KV, WL_RAND, WL_SEQ, WL_SORT, WL_STREAM, WL_STRIDE,
};
use std::str::FromStr;

/// The workloads: name, ABI id, and the keys each accepts beyond `size`, `ops`,
/// `seed` and `corrupt`.
const WORKLOADS: &[(&str, u32, &str)] = &[
    ("seq", WL_SEQ, ""),
    ("rand", WL_RAND, ""),
    ("chase", WL_CHASE, ""),
    ("hash", WL_HASH, "dist, theta"),
    ("graph", WL_GRAPH, "iters, degree"),
    ("kv", WL_KV, "get, theta, scan"),
    ("sort", WL_SORT, ""),
    ("stream", WL_STREAM, "iters"),
    ("stride", WL_STRIDE, "stride, streams"),
];

/// A parsed workload request.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Workload {
    /// Workload name: seq, rand, chase, hash, graph, kv, sort, stream or stride.
    pub name: String,
    /// ABI workload id.
    pub id: u32,
    /// Bytes per vCPU (0: the vCPU's whole share of guest RAM).
    pub size: u64,
    /// Operations (0: the workload's default).
    pub ops: u64,
    /// PRNG seed.
    pub seed: u64,
    /// Hash workload: Zipf-distributed keys.
    pub zipf: bool,
    /// Zipf exponent × 1000 (hash and kv).
    pub theta_milli: u32,
    /// Graph: PageRank iterations; stream: repetitions (0: the default).
    #[serde(default)]
    pub iters: u32,
    /// Graph: edges per vertex (0: the default, 16).
    #[serde(default)]
    pub degree: u32,
    /// Key-value store: GETs per 100 operations.
    #[serde(default = "default_get_pct")]
    pub get_pct: u32,
    /// Key-value store: a sequential scan over a cold area alongside.
    #[serde(default)]
    pub scan: bool,
    /// Stride: bytes between accesses, negative for descending (0: one page).
    #[serde(default)]
    pub stride: i64,
    /// Stride: interleaved streams (0: one).
    #[serde(default)]
    pub streams: u32,
    /// Test only: the workload corrupts one word of its data before verifying.
    #[serde(default)]
    pub corrupt: bool,
}

fn default_get_pct() -> u32 {
    90
}

/// Why a workload string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkloadError {
    /// Unknown workload name.
    #[error(
        "unknown workload `{0}` (expected seq, rand, chase, hash, graph, kv, sort, stream or stride)"
    )]
    UnknownName(String),
    /// A parameter is not `key=value`.
    #[error("workload parameter `{0}` is not key=value")]
    NotKeyValue(String),
    /// Unknown parameter.
    #[error("unknown workload parameter `{key}` for {name} (expected {expected})")]
    UnknownKey {
        /// The workload.
        name: String,
        /// The key.
        key: String,
        /// Accepted keys.
        expected: String,
    },
    /// A value did not parse.
    #[error("bad value `{value}` for workload parameter `{key}`")]
    BadValue {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
}

/// A stride: bytes (`64`, `4K`) or pages (`2p`), optionally negative; a nonzero
/// multiple of 8 bytes.
fn parse_stride(v: &str) -> Option<i64> {
    let (neg, mag) = match v.strip_prefix('-') {
        Some(m) => (true, m),
        None => (false, v),
    };
    let bytes = match mag.strip_suffix('p') {
        Some(pages) => pages.parse::<u64>().ok()?.checked_mul(4096)?,
        None => parse_size(mag).ok()?,
    };
    if bytes == 0 || bytes % 8 != 0 {
        return None;
    }
    let b = i64::try_from(bytes).ok()?;
    Some(if neg { -b } else { b })
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "true" | "yes" => Some(true),
        "0" | "false" | "no" => Some(false),
        _ => None,
    }
}

impl FromStr for Workload {
    type Err = WorkloadError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, params) = s.split_once(':').unwrap_or((s, ""));
        let &(_, id, extra) = WORKLOADS
            .iter()
            .find(|(n, _, _)| *n == name)
            .ok_or_else(|| WorkloadError::UnknownName(name.to_string()))?;
        let mut w = Workload {
            name: name.to_string(),
            id,
            size: 0,
            ops: 0,
            seed: 1,
            zipf: id == WL_KV,
            theta_milli: 990,
            iters: 0,
            degree: 0,
            get_pct: default_get_pct(),
            scan: false,
            stride: 0,
            streams: 0,
            corrupt: false,
        };
        for kv in params.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| WorkloadError::NotKeyValue(kv.to_string()))?;
            let bad = || WorkloadError::BadValue {
                key: k.to_string(),
                value: v.to_string(),
            };
            let ours = extra.split(", ").any(|e| e == k);
            match k {
                "size" => w.size = parse_size(v).map_err(|_| bad())?,
                "ops" => w.ops = v.parse().map_err(|_| bad())?,
                "seed" => w.seed = v.parse().map_err(|_| bad())?,
                "corrupt" => w.corrupt = parse_bool(v).ok_or_else(bad)?,
                "dist" if ours => {
                    w.zipf = match v {
                        "uniform" => false,
                        "zipf" => true,
                        _ => return Err(bad()),
                    }
                }
                "theta" if ours => {
                    let t: f64 = v.parse().map_err(|_| bad())?;
                    if !(0.0..1.0).contains(&t) {
                        return Err(bad());
                    }
                    w.theta_milli = (t * 1000.0).round() as u32;
                }
                "iters" if ours => {
                    w.iters = v.parse().ok().filter(|&n| n > 0).ok_or_else(bad)?;
                }
                "degree" if ours => {
                    w.degree = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=1024).contains(n))
                        .ok_or_else(bad)?;
                }
                "get" if ours => {
                    w.get_pct = v.parse().ok().filter(|&n| n <= 100).ok_or_else(bad)?;
                }
                "scan" if ours => w.scan = parse_bool(v).ok_or_else(bad)?,
                "stride" if ours => w.stride = parse_stride(v).ok_or_else(bad)?,
                "streams" if ours => {
                    w.streams = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=4096).contains(n))
                        .ok_or_else(bad)?;
                }
                _ => {
                    let mut expected = String::from("size, ops, seed, corrupt");
                    if !extra.is_empty() {
                        expected = format!("size, ops, seed, {extra}, corrupt");
                    }
                    return Err(WorkloadError::UnknownKey {
                        name: name.to_string(),
                        key: k.to_string(),
                        expected,
                    });
                }
            }
        }
        Ok(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        let w: Workload = "seq:size=1G".parse().unwrap();
        assert_eq!((w.id, w.size), (WL_SEQ, 1 << 30));
        let w: Workload = "hash:dist=zipf,theta=0.9,ops=1000,seed=7".parse().unwrap();
        assert!(w.zipf && w.theta_milli == 900 && w.ops == 1000 && w.seed == 7);
        assert_eq!("rand".parse::<Workload>().unwrap().id, WL_RAND);
        assert!(matches!(
            "qsort".parse::<Workload>(),
            Err(WorkloadError::UnknownName(_))
        ));
        assert!(matches!(
            "seq:size".parse::<Workload>(),
            Err(WorkloadError::NotKeyValue(_))
        ));
        assert!(matches!(
            "seq:dist=zipf".parse::<Workload>(),
            Err(WorkloadError::UnknownKey { .. })
        ));
        assert!(matches!(
            "seq:size=lots".parse::<Workload>(),
            Err(WorkloadError::BadValue { .. })
        ));
        assert!(matches!(
            "hash:theta=1.5".parse::<Workload>(),
            Err(WorkloadError::BadValue { .. })
        ));
    }

    #[test]
    fn parses_the_application_workloads() {
        let w: Workload = "graph:size=8M,iters=3,degree=8".parse().unwrap();
        assert_eq!((w.id, w.iters, w.degree), (WL_GRAPH, 3, 8));
        let w: Workload = "kv:get=50,theta=0.8,scan=1".parse().unwrap();
        assert_eq!(
            (w.id, w.get_pct, w.theta_milli, w.scan),
            (WL_KV, 50, 800, true)
        );
        assert_eq!("kv".parse::<Workload>().unwrap().get_pct, 90);
        assert_eq!("sort:size=4M".parse::<Workload>().unwrap().id, WL_SORT);
        assert_eq!("stream:iters=2".parse::<Workload>().unwrap().iters, 2);
        let w: Workload = "stride:stride=-2p,streams=4".parse().unwrap();
        assert_eq!((w.id, w.stride, w.streams), (WL_STRIDE, -8192, 4));
        assert_eq!("stride:stride=64".parse::<Workload>().unwrap().stride, 64);
        assert_eq!(
            "stride:stride=-4K".parse::<Workload>().unwrap().stride,
            -4096
        );
        assert!("sort:corrupt=1".parse::<Workload>().unwrap().corrupt);
        for bad in [
            "stride:stride=12",
            "stride:stride=0",
            "kv:get=101",
            "graph:iters=0",
        ] {
            assert!(
                matches!(bad.parse::<Workload>(), Err(WorkloadError::BadValue { .. })),
                "{bad}"
            );
        }
        let e = "sort:iters=2".parse::<Workload>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown workload parameter `iters` for sort (expected size, ops, seed, corrupt)"
        );
        let e = "kv:stride=8".parse::<Workload>().unwrap_err();
        assert!(
            e.to_string()
                .ends_with("(expected size, ops, seed, get, theta, scan, corrupt)"),
            "{e}"
        );
    }
}
