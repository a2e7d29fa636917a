//! The link model: extra latency and a bandwidth cap per connection, so that a fast
//! real link (loopback, a datacenter network) can emulate a slower interconnect.
//!
//! Written as `latency=2us,bw=100Gbit` (either part optional; `off` or an empty
//! string disables the model, the default).
//!
//! How it is applied: the client never delays a send (pipelining stays intact); it
//! delays when a reply becomes *visible* to the caller. For a request of `q` bytes
//! and a reply of `r` bytes on a link of latency `L` and bandwidth `B`, the reply is
//! visible no earlier than: request serialisation (queued behind earlier requests on
//! the same link, `q/B`) + `L` + the real service time + reply serialisation (queued
//! behind earlier replies, `r/B`) + `L`. The node sees requests at real speed; what
//! the guest observes is the modelled link.

use crate::units::{UnitError, parse_bandwidth, parse_duration};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Parameters of an emulated link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkModel {
    /// One-way latency added in each direction.
    pub latency: Duration,
    /// Bandwidth cap in bits per second, each direction; `None` for no cap.
    pub bandwidth_bps: Option<u64>,
}

/// Why a link model string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkModelError {
    /// A part is not `key=value`.
    #[error("`{0}` is not key=value (expected e.g. latency=2us,bw=100Gbit)")]
    NotKeyValue(String),
    /// A key other than `latency` or `bw`.
    #[error("unknown link model key `{0}` (expected latency or bw)")]
    UnknownKey(String),
    /// A value did not parse.
    #[error("bad value for `{key}`")]
    BadValue {
        /// The key.
        key: String,
        /// Why.
        #[source]
        source: UnitError,
    },
}

impl LinkModel {
    /// True when the model changes nothing.
    pub fn is_off(&self) -> bool {
        self.latency.is_zero() && self.bandwidth_bps.is_none()
    }

    /// Time to put `bytes` on the wire at the capped bandwidth.
    pub fn serialisation(&self, bytes: usize) -> Duration {
        match self.bandwidth_bps {
            Some(bps) => {
                Duration::from_nanos((bytes as u128 * 8 * 1_000_000_000 / bps as u128) as u64)
            }
            None => Duration::ZERO,
        }
    }
}

impl FromStr for LinkModel {
    type Err = LinkModelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut m = LinkModel::default();
        let s = s.trim();
        if s.is_empty() || s == "off" {
            return Ok(m);
        }
        for part in s.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| LinkModelError::NotKeyValue(part.to_string()))?;
            let bad = |source| LinkModelError::BadValue {
                key: k.to_string(),
                source,
            };
            match k.trim() {
                "latency" | "lat" => m.latency = parse_duration(v).map_err(bad)?,
                "bw" | "bandwidth" => m.bandwidth_bps = Some(parse_bandwidth(v).map_err(bad)?),
                other => return Err(LinkModelError::UnknownKey(other.to_string())),
            }
        }
        Ok(m)
    }
}

impl std::fmt::Display for LinkModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_off() {
            return f.write_str("off");
        }
        write!(f, "latency={}ns", self.latency.as_nanos())?;
        if let Some(bps) = self.bandwidth_bps {
            write!(f, ",bw={bps}bit")?;
        }
        Ok(())
    }
}

/// The per-connection state of a model: when each direction's wire is next free.
#[derive(Debug)]
pub(crate) struct Shaper {
    model: LinkModel,
    tx_free: Mutex<Instant>,
    rx_free: Mutex<Instant>,
}

impl Shaper {
    pub(crate) fn new(model: LinkModel) -> Option<Self> {
        if model.is_off() {
            return None;
        }
        let now = Instant::now();
        Some(Shaper {
            model,
            tx_free: Mutex::new(now),
            rx_free: Mutex::new(now),
        })
    }

    /// Accounts a request of `bytes` sent now; returns the delay its arrival at the
    /// node would have had on the modelled link (queueing + serialisation + latency).
    pub(crate) fn on_send(&self, bytes: usize) -> Duration {
        let now = Instant::now();
        let mut free = self.tx_free.lock().unwrap();
        let start = (*free).max(now);
        *free = start + self.model.serialisation(bytes);
        *free - now + self.model.latency
    }

    /// Accounts a reply of `bytes` received now for a request whose send delay was
    /// `send_delay`; returns when the reply becomes visible to the caller.
    pub(crate) fn on_recv(&self, bytes: usize, send_delay: Duration) -> Instant {
        let now = Instant::now();
        let mut free = self.rx_free.lock().unwrap();
        let start = (*free).max(now);
        *free = start + self.model.serialisation(bytes);
        *free + self.model.latency + send_delay
    }
}

/// Waits until `deadline`: sleeps for the bulk, spins for the last stretch (sleep
/// granularity is far coarser than the microsecond latencies being modelled).
pub(crate) fn wait_until(deadline: Instant) {
    const SPIN: Duration = Duration::from_micros(200);
    loop {
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        let left = deadline - now;
        if left > SPIN {
            std::thread::sleep(left - SPIN);
        } else {
            std::hint::spin_loop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_models() {
        let m: LinkModel = "latency=2us,bw=100Gbit".parse().unwrap();
        assert_eq!(m.latency, Duration::from_micros(2));
        assert_eq!(m.bandwidth_bps, Some(100_000_000_000));
        assert!("off".parse::<LinkModel>().unwrap().is_off());
        assert!("".parse::<LinkModel>().unwrap().is_off());
        let m: LinkModel = "bw=1Gbit".parse().unwrap();
        assert_eq!(m.latency, Duration::ZERO);
        assert_eq!(m.serialisation(4096 + 24), Duration::from_nanos(32_960));
        assert!(matches!(
            "latency".parse::<LinkModel>(),
            Err(LinkModelError::NotKeyValue(_))
        ));
        assert!(matches!(
            "jitter=1us".parse::<LinkModel>(),
            Err(LinkModelError::UnknownKey(_))
        ));
        assert!(matches!(
            "latency=fast".parse::<LinkModel>(),
            Err(LinkModelError::BadValue { .. })
        ));
        assert_eq!(m.to_string().parse::<LinkModel>().unwrap(), m);
    }

    #[test]
    fn bandwidth_queues_back_to_back_transfers() {
        let m: LinkModel = "latency=10us,bw=1Gbit".parse().unwrap();
        let s = Shaper::new(m).unwrap();
        let t0 = Instant::now();
        // Two 125 KB replies received at once: 1 ms each on a 1 Gbit wire, so the
        // second becomes visible about 1 ms after the first.
        let a = s.on_recv(125_000, Duration::ZERO);
        let b = s.on_recv(125_000, Duration::ZERO);
        assert!(a >= t0 + Duration::from_micros(1010));
        assert!(b >= a + Duration::from_micros(990), "{:?}", b - a);
        let d = s.on_send(125_000);
        assert!(d >= Duration::from_micros(1000));
    }
}
