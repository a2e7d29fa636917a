//! Progress lines: one when a step starts, with an estimate of the time left in
//! the whole suite, and one when it ends.

use std::time::Duration;

/// How much estimated work must be done before the pace so far scales the
/// estimate of the rest.
pub const PACE_AFTER: Duration = Duration::from_secs(20);

/// Tracks the suite's steps against their estimated durations.
#[derive(Debug)]
pub struct Progress {
    /// Each step's estimated duration, in order.
    estimates: Vec<Duration>,
    /// What the steps done so far took.
    taken: Vec<Duration>,
}

impl Progress {
    /// A suite of steps with these estimated durations.
    pub fn new(estimates: Vec<Duration>) -> Progress {
        Progress {
            estimates,
            taken: Vec::new(),
        }
    }

    /// The time left from the start of the next step on: the remaining
    /// estimates, scaled by how the steps done so far compared with theirs
    /// (between half and three times, so one odd step does not swing it;
    /// not before [`PACE_AFTER`] of estimated work is done, so a short step
    /// that took no time, a build with nothing to build, does not halve it).
    pub fn time_left(&self) -> Duration {
        let done = self.taken.len();
        let left: Duration = self.estimates.iter().skip(done).sum();
        let (est, took): (Duration, Duration) = (
            self.estimates.iter().take(done).sum(),
            self.taken.iter().sum(),
        );
        let pace = if est < PACE_AFTER {
            1.0
        } else {
            (took.as_secs_f64() / est.as_secs_f64()).clamp(0.5, 3.0)
        };
        left.mul_f64(pace)
    }

    /// Records that the current step took `took`.
    pub fn step_done(&mut self, took: Duration) {
        self.taken.push(took);
    }

    /// The line printed as step `index` (from 0) starts.
    pub fn start_line(&self, index: usize, name: &str, what: &str) -> String {
        format!(
            "[{}/{}] {name}: {what} (about {} left)",
            index + 1,
            self.estimates.len(),
            human(self.time_left())
        )
    }
}

/// `75 s` as `1m15s`; under a minute as seconds.
pub fn human(d: Duration) -> String {
    let s = d.as_secs_f64().round() as u64;
    if s < 60 {
        format!("{s}s")
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn time_left_is_the_remaining_estimates_scaled_by_the_pace_so_far() {
        let mut p = Progress::new(vec![secs(20), secs(20), secs(30)]);
        assert_eq!(p.time_left(), secs(70));
        // The first step took twice its estimate: the rest will too.
        p.step_done(secs(40));
        assert_eq!(p.time_left(), secs(100));
        // The pace is bounded.
        let mut q = Progress::new(vec![secs(20), secs(10)]);
        q.step_done(secs(100));
        assert_eq!(q.time_left(), secs(30));
        // A short step is not enough to judge the pace by.
        let mut r = Progress::new(vec![secs(5), secs(100)]);
        r.step_done(Duration::ZERO);
        assert_eq!(r.time_left(), secs(100));
        assert!(
            p.start_line(1, "fabric", "cargo bench")
                .starts_with("[2/3] fabric: cargo bench (about 1m40s left)")
        );
    }

    #[test]
    fn durations_read_as_minutes_and_seconds() {
        assert_eq!(human(secs(59)), "59s");
        assert_eq!(human(secs(75)), "1m15s");
        assert_eq!(human(secs(600)), "10m00s");
    }
}
