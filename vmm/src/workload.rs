//! `--workload NAME[:k=v,...]`: which guest-shim workload to run, and its settings.

use fabric::units::parse_size;
use guest_shim::abi::{WL_CHASE, WL_HASH, WL_RAND, WL_SEQ};
use std::str::FromStr;

/// A parsed workload request.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Workload {
    /// Workload name: seq, rand, chase or hash.
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
    /// Zipf exponent × 1000.
    pub theta_milli: u32,
}

/// Why a workload string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkloadError {
    /// Unknown workload name.
    #[error("unknown workload `{0}` (expected seq, rand, chase or hash)")]
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
        expected: &'static str,
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

impl FromStr for Workload {
    type Err = WorkloadError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, params) = s.split_once(':').unwrap_or((s, ""));
        let id = match name {
            "seq" => WL_SEQ,
            "rand" => WL_RAND,
            "chase" => WL_CHASE,
            "hash" => WL_HASH,
            other => return Err(WorkloadError::UnknownName(other.to_string())),
        };
        let mut w = Workload {
            name: name.to_string(),
            id,
            size: 0,
            ops: 0,
            seed: 1,
            zipf: false,
            theta_milli: 990,
        };
        for kv in params.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| WorkloadError::NotKeyValue(kv.to_string()))?;
            let bad = || WorkloadError::BadValue {
                key: k.to_string(),
                value: v.to_string(),
            };
            match k {
                "size" => w.size = parse_size(v).map_err(|_| bad())?,
                "ops" => w.ops = v.parse().map_err(|_| bad())?,
                "seed" => w.seed = v.parse().map_err(|_| bad())?,
                "dist" if id == WL_HASH => {
                    w.zipf = match v {
                        "uniform" => false,
                        "zipf" => true,
                        _ => return Err(bad()),
                    }
                }
                "theta" if id == WL_HASH => {
                    let t: f64 = v.parse().map_err(|_| bad())?;
                    if !(0.0..1.0).contains(&t) {
                        return Err(bad());
                    }
                    w.theta_milli = (t * 1000.0).round() as u32;
                }
                _ => {
                    return Err(WorkloadError::UnknownKey {
                        name: name.to_string(),
                        key: k.to_string(),
                        expected: if id == WL_HASH {
                            "size, ops, seed, dist, theta"
                        } else {
                            "size, ops, seed"
                        },
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
            "sort".parse::<Workload>(),
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
}
