//! A log rate limiter for messages that a peer or a guest can trigger at will
//! (malformed frames, refused requests): at most N a second pass, the rest are
//! counted and the count is reported with the next one that passes.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{SystemTime, UNIX_EPOCH};

/// Lets at most `per_sec` events a second through.
#[derive(Debug)]
pub struct RateLimiter {
    per_sec: u64,
    /// Second (since the epoch) of the current window, and events seen in it.
    window: AtomicU64,
    count: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimiter {
    /// A limiter passing `per_sec` events a second.
    pub const fn new(per_sec: u64) -> Self {
        RateLimiter {
            per_sec,
            window: AtomicU64::new(0),
            count: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` if this event may be logged, `n` being how many were suppressed
    /// since the last one that passed; `None` if it must be dropped.
    pub fn check(&self) -> Option<u64> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if self.window.swap(now, Relaxed) != now {
            self.count.store(0, Relaxed);
        }
        if self.count.fetch_add(1, Relaxed) < self.per_sec {
            Some(self.suppressed.swap(0, Relaxed))
        } else {
            self.suppressed.fetch_add(1, Relaxed);
            None
        }
    }
}

/// Logs a warning through `$limiter` (a `RateLimiter`), noting suppressed messages.
#[macro_export]
macro_rules! warn_limited {
    ($limiter:expr, $($arg:tt)+) => {
        if let Some(suppressed) = $limiter.check() {
            if suppressed > 0 {
                log::warn!("{} ({} similar messages suppressed)", format_args!($($arg)+), suppressed);
            } else {
                log::warn!($($arg)+);
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_per_second() {
        let r = RateLimiter::new(3);
        let passed = (0..100).filter(|_| r.check().is_some()).count();
        // All 100 checks may straddle a second boundary: then up to 6 pass.
        assert!((3..=6).contains(&passed), "{passed}");
    }
}
