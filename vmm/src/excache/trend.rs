//! Trend detection for prefetching, after Leap (Al Maruf and Chowdhury, ATC'20).
//!
//! Faults are grouped by the thread that faulted (a vCPU: userfaultfd reports
//! its id), and each thread's faults into up to [`STREAMS`] *streams*, so that
//! scans interleaved on one vCPU (STREAM's three arrays, a merge of runs) are
//! told apart. A fault joins the stream whose trend predicts it exactly, or
//! else the stream whose last page is nearest (within [`NEAR`] pages), or it
//! starts a stream in place of the one seen least recently.
//!
//! A stream remembers its last [`HISTORY`] page deltas. Its *trend* is the
//! majority delta (Boyer–Moore vote) of its last 2, then 4, then 8 deltas: the
//! smallest window that has a majority, as Leap does, so that a stream that
//! changes direction is followed after two faults while one stray fault in a
//! long stride does not break it. A stream whose only delta is +1 or -1 already
//! has a trend: that is sequential read-ahead, as before Leap.
//!
//! The prefetch window along a trend starts at [`FIRST_WINDOW`] pages, doubles
//! each time the guest reaches the end of what was fetched (the trend predicted
//! its fault, or it reached the read-ahead mark) and halves when a fault breaks
//! the trend, up to the `max_window` the cache allows.
//!
//! [`Prefetcher::Sequential`] keeps the behaviour before this module: only +1
//! streams, with the full window at once.

use std::sync::Mutex;

/// How fault streams are detected for prefetching.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Prefetcher {
    /// Leap's majority trend per stream: strides either way, interleaved
    /// streams per vCPU, a window that grows on hits and shrinks on misses.
    #[default]
    Leap,
    /// Ascending runs of consecutive pages only, with the full window at once
    /// (the read-ahead before Leap).
    #[value(name = "seq")]
    #[serde(rename = "seq")]
    Sequential,
}

/// Deltas remembered per stream: the vote's largest window.
pub(crate) const HISTORY: usize = 8;
/// Streams told apart per thread.
pub(crate) const STREAMS: usize = 4;
/// Threads tracked (vCPUs, and the VMM's own threads that touch guest memory).
const THREADS: usize = 64;
/// A fault at most this many pages from a stream's last page may continue it;
/// larger strides are not detected.
pub(crate) const NEAR: u64 = 512;
/// The first window along a newly found trend, in pages.
pub(crate) const FIRST_WINDOW: usize = 8;

/// Boyer–Moore majority vote: the value held by more than half of `xs` (two
/// passes over the iterator, no allocation).
pub(crate) fn majority<I>(xs: I) -> Option<i64>
where
    I: IntoIterator<Item = i64>,
    I::IntoIter: Clone,
{
    let xs = xs.into_iter();
    let (mut cand, mut count) = (0i64, 0usize);
    for x in xs.clone() {
        if count == 0 {
            (cand, count) = (x, 1);
        } else if x == cand {
            count += 1;
        } else {
            count -= 1;
        }
    }
    let (mut n, mut votes) = (0usize, 0usize);
    for x in xs {
        n += 1;
        votes += usize::from(x == cand);
    }
    (count > 0 && 2 * votes > n).then_some(cand)
}

/// What to prefetch after a fault: pages `p + stride`, `p + 2 * stride`, ...
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Trend {
    /// Pages between consecutive accesses (negative: descending).
    pub(crate) stride: i64,
    /// Pages to fetch along it.
    pub(crate) window: usize,
    /// Where the stream was before this fault (its last fault, or the
    /// read-ahead mark it last reached): the pages fetched ahead of it between
    /// there and this fault were passed on the way, if the guest went
    /// through the pages between the stream's last page and this fault.
    pub(crate) from: u64,
    /// The stream's last page before this fault: its last fault, or the
    /// last page fetched along its trend.
    pub(crate) last: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Stream {
    live: bool,
    /// The stream's last fault.
    pos: u64,
    /// The stream's last page: its last fault or, once prefetched, the last
    /// page fetched along its trend.
    last: u64,
    /// The last deltas, the newest at `(n - 1) % HISTORY`.
    deltas: [i64; HISTORY],
    /// Deltas recorded so far.
    n: usize,
    window: usize,
    /// The detector's clock when this stream last faulted.
    seen: u64,
}

impl Stream {
    fn start(p: u64, now: u64) -> Stream {
        Stream {
            live: true,
            pos: p,
            last: p,
            window: FIRST_WINDOW,
            seen: now,
            ..Stream::default()
        }
    }

    /// The last `w` deltas, oldest first.
    fn recent(&self, w: usize) -> impl Iterator<Item = i64> + Clone + '_ {
        (self.n - w..self.n).map(|i| self.deltas[i % HISTORY])
    }

    fn trend(&self, policy: Prefetcher) -> Option<i64> {
        if self.n == 0 {
            return None;
        }
        let newest = self.deltas[(self.n - 1) % HISTORY];
        match policy {
            Prefetcher::Sequential => (newest == 1).then_some(1),
            Prefetcher::Leap => {
                if self.n == 1 {
                    return (newest.abs() == 1).then_some(newest);
                }
                [2, 4, 8]
                    .into_iter()
                    .filter(|&w| w <= self.n.min(HISTORY))
                    .find_map(|w| majority(self.recent(w)))
                    .filter(|&d| d != 0)
            }
        }
    }

    /// `p` was fetched ahead of this stream (after its last fault, up to its
    /// last page): a fault there is on a page still in flight, or evicted
    /// before the guest reached it, not a step of the stream.
    fn fetched(&self, p: u64) -> bool {
        (self.pos < p && p <= self.last) || (self.last <= p && p < self.pos)
    }

    fn predicts(&self, p: u64, policy: Prefetcher) -> bool {
        self.trend(policy)
            .is_some_and(|d| self.last.checked_add_signed(d) == Some(p))
    }
}

/// One thread's streams.
#[derive(Debug, Clone, Default)]
pub(crate) struct Detector {
    streams: [Stream; STREAMS],
    clock: u64,
}

impl Detector {
    /// Records a fault on page `p`; returns the trend to prefetch along, if
    /// the fault's stream has one.
    pub(crate) fn fault(&mut self, p: u64, policy: Prefetcher, max_window: usize) -> Option<Trend> {
        self.clock += 1;
        let now = self.clock;
        let live = |st: &&Stream| st.live;
        if self.streams.iter().any(|st| st.live && st.fetched(p)) {
            return None;
        }
        let found = self
            .streams
            .iter()
            .position(|st| st.live && st.predicts(p, policy))
            .or_else(|| {
                self.streams
                    .iter()
                    .enumerate()
                    .filter(|(_, st)| live(st) && st.last.abs_diff(p) <= NEAR)
                    .min_by_key(|(_, st)| st.last.abs_diff(p))
                    .map(|(i, _)| i)
            });
        let Some(i) = found else {
            let oldest = (0..STREAMS)
                .min_by_key(|&i| (self.streams[i].live, self.streams[i].seen))
                .unwrap_or(0);
            self.streams[oldest] = Stream::start(p, now);
            return None;
        };
        let st = &mut self.streams[i];
        st.seen = now;
        let had = st.trend(policy);
        let predicted = st.predicts(p, policy);
        let mut delta = p.wrapping_sub(st.last) as i64;
        if let Some(d) = had.filter(|&d| delta.signum() == d.signum() && delta % d == 0) {
            // Whole strides past what was fetched (pages on the way were
            // resident, or a window was cut short): the guest went along the
            // trend. Recording the jump itself would teach the detector the
            // spacing of its own windows as a stride.
            delta = d;
        }
        if delta == 0 {
            // The same page again (evicted, or a spurious fault): no movement.
            return None;
        }
        st.deltas[st.n % HISTORY] = delta;
        st.n += 1;
        let (from, last) = (st.pos, st.last);
        st.pos = p;
        st.last = p;
        let stride = st.trend(policy)?;
        st.window = match (policy, had) {
            (Prefetcher::Sequential, _) => max_window,
            (Prefetcher::Leap, Some(_)) if predicted => st.window * 2,
            (Prefetcher::Leap, Some(_)) => st.window / 2,
            (Prefetcher::Leap, None) => FIRST_WINDOW,
        }
        .clamp(1, max_window.max(1));
        Some(Trend {
            stride,
            window: st.window,
            from,
            last,
        })
    }

    /// The stream whose last page is `from`, with the guest now at page `at`,
    /// was fetched up to `to` with windows of `window` pages: its next fault
    /// is expected one stride after `to`. False if no stream ends at `from`.
    pub(crate) fn advance(&mut self, from: u64, at: u64, to: u64, window: usize) -> bool {
        // A stream carried on by its marks is in use: not the one to replace.
        self.clock += 1;
        let now = self.clock;
        match self
            .streams
            .iter_mut()
            .find(|st| st.live && st.last == from)
        {
            Some(st) => {
                st.pos = at;
                st.last = to;
                st.window = window.max(1);
                st.seen = now;
                true
            }
            None => false,
        }
    }
}

/// The detectors of the threads that fault, shared by the fault handlers.
pub(crate) struct Trends {
    policy: Prefetcher,
    threads: Mutex<Vec<(i32, Detector)>>,
}

impl Trends {
    pub(crate) fn new(policy: Prefetcher) -> Self {
        Trends {
            policy,
            threads: Mutex::new(Vec::new()),
        }
    }

    /// Records thread `tid`'s fault on page `p` (see [`Detector::fault`]).
    pub(crate) fn fault(&self, tid: i32, p: u64, max_window: usize) -> Option<Trend> {
        let mut g = self.threads.lock().unwrap();
        let i = match g.iter().position(|(t, _)| *t == tid) {
            Some(i) => i,
            None => {
                if g.len() >= THREADS {
                    g.remove(0);
                }
                g.push((tid, Detector::default()));
                g.len() - 1
            }
        };
        g[i].1.fault(p, self.policy, max_window)
    }

    /// See [`Detector::advance`]; the stream may belong to any thread.
    pub(crate) fn advance(&self, from: u64, at: u64, to: u64, window: usize) {
        let mut g = self.threads.lock().unwrap();
        for (_, d) in g.iter_mut() {
            if d.advance(from, at, to, window) {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 256;

    /// Feeds `faults` to a detector; returns the trend after each.
    fn run(d: &mut Detector, faults: &[u64]) -> Vec<Option<Trend>> {
        faults
            .iter()
            .map(|&p| d.fault(p, Prefetcher::Leap, MAX))
            .collect()
    }

    fn strides(out: &[Option<Trend>]) -> Vec<Option<i64>> {
        out.iter().map(|t| t.map(|t| t.stride)).collect()
    }

    #[test]
    fn majority_vote() {
        assert_eq!(majority([3, 3, 5, 3]), Some(3));
        assert_eq!(majority([3, 5, 3, 5]), None);
        assert_eq!(majority([7]), Some(7));
        assert_eq!(majority([1, 2, 3, 4, 4, 4, 4, 4]), Some(4));
        assert_eq!(majority([5, 4, 4]), Some(4));
        assert_eq!(majority([]), None);
    }

    #[test]
    fn a_stride_is_found_after_two_equal_deltas() {
        let mut d = Detector::default();
        let out = run(&mut d, &[1000, 1003, 1006, 1009]);
        assert_eq!(strides(&out), [None, None, Some(3), Some(3)]);
    }

    #[test]
    fn a_negative_stride_is_found() {
        let mut d = Detector::default();
        let out = run(&mut d, &[5000, 4995, 4990, 4985, 4980]);
        assert_eq!(strides(&out)[2..], [Some(-5), Some(-5), Some(-5)]);
    }

    #[test]
    fn sequential_streams_are_found_at_the_second_fault_either_way() {
        let mut d = Detector::default();
        assert_eq!(strides(&run(&mut d, &[10, 11])), [None, Some(1)]);
        let mut d = Detector::default();
        assert_eq!(strides(&run(&mut d, &[10, 9])), [None, Some(-1)]);
    }

    #[test]
    fn interleaved_streams_are_told_apart() {
        // Three regions far apart, visited round-robin, one ascending by 2,
        // one descending by 3, one ascending by 1.
        let mut d = Detector::default();
        let mut faults = Vec::new();
        for k in 0..20u64 {
            faults.extend([10_000 + 2 * k, 50_000 - 3 * k, 90_000 + k]);
        }
        let out = strides(&run(&mut d, &faults));
        for (k, chunk) in out.chunks(3).enumerate().skip(2) {
            assert_eq!(chunk, [Some(2), Some(-3), Some(1)], "round {k}");
        }
    }

    #[test]
    fn random_faults_have_no_trend() {
        let mut d = Detector::default();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut found = 0;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            found += usize::from(d.fault(x % (1 << 20), Prefetcher::Leap, MAX).is_some());
        }
        assert!(found < 50, "{found} trends in random faults");
    }

    #[test]
    fn one_stray_fault_does_not_break_a_long_stride() {
        let mut d = Detector::default();
        let mut faults: Vec<u64> = (0..9).map(|k| 100 + 4 * k).collect();
        // A stray fault near the stream, then the stride goes on.
        faults.extend([500, 136, 140]);
        let out = strides(&run(&mut d, &faults));
        assert_eq!(out[8], Some(4));
        assert_eq!(out[9..], [Some(4), Some(4), Some(4)]);
    }

    #[test]
    fn a_change_of_direction_is_followed() {
        let mut d = Detector::default();
        let faults: Vec<u64> = (0..8)
            .map(|k| 1000 + 2 * k)
            .chain((1..6).map(|k| 1014 - 3 * k))
            .collect();
        let out = strides(&run(&mut d, &faults));
        assert_eq!(out[7], Some(2));
        assert_eq!(out.last().copied().flatten(), Some(-3));
    }

    #[test]
    fn the_window_grows_on_predicted_faults_and_shrinks_when_the_trend_breaks() {
        let mut d = Detector::default();
        let mut w = Vec::new();
        for k in 0..8u64 {
            w.push(
                d.fault(200 + 2 * k, Prefetcher::Leap, MAX)
                    .map(|t| t.window),
            );
        }
        assert_eq!(w[2], Some(FIRST_WINDOW));
        assert_eq!(w[3], Some(2 * FIRST_WINDOW));
        assert_eq!(w[7], Some(MAX), "{w:?}");
        // A fault off the trend (but near): the window halves.
        let t = d.fault(230, Prefetcher::Leap, MAX).unwrap();
        assert_eq!((t.stride, t.window), (2, MAX / 2));
    }

    #[test]
    fn a_prefetched_stream_continues_after_its_window() {
        let mut d = Detector::default();
        run(&mut d, &[300, 303, 306]);
        // Pages up to 306 + 3 * 16 were fetched: the next fault is one stride on.
        assert!(d.advance(306, 306, 354, 16));
        let t = d.fault(357, Prefetcher::Leap, MAX).unwrap();
        assert_eq!((t.stride, t.window), (3, 32));
    }

    #[test]
    fn a_fault_on_a_page_fetched_ahead_is_not_a_step() {
        let mut d = Detector::default();
        run(&mut d, &[300, 301]);
        assert!(d.advance(301, 301, 320, 8));
        // The guest reaches pages still in flight: served alone.
        assert_eq!(strides(&run(&mut d, &[302, 303, 310])), [None, None, None]);
        // Its read-ahead mark at 311 fetched on to 340: faults before the mark
        // are steps again, after it they are in flight.
        assert!(d.advance(320, 311, 340, 16));
        assert_eq!(strides(&run(&mut d, &[315, 330])), [None, None]);
        assert!(!d.streams.iter().any(|st| st.fetched(305)));
        // One past what was fetched: the stream goes on, its window grown.
        let t = d.fault(341, Prefetcher::Leap, MAX).unwrap();
        assert_eq!((t.stride, t.window), (1, 32));
    }

    #[test]
    fn jumps_of_whole_strides_keep_the_stride() {
        let mut d = Detector::default();
        run(&mut d, &[1000, 1001]);
        for k in 1..10u64 {
            // Each window of 64 pages used up, the next fault 65 pages on.
            let t = d.fault(1001 + 65 * k, Prefetcher::Leap, MAX).unwrap();
            assert_eq!(t.stride, 1, "after {k} windows");
        }
    }

    #[test]
    fn sequential_policy_sees_only_ascending_runs_with_the_full_window() {
        let mut d = Detector::default();
        let out: Vec<_> = [10u64, 11, 12, 1000, 997, 994, 991]
            .iter()
            .map(|&p| d.fault(p, Prefetcher::Sequential, MAX))
            .collect();
        assert_eq!(
            out[1].map(|t| (t.stride, t.window, t.from)),
            Some((1, MAX, 10))
        );
        assert!(out[3..].iter().all(Option::is_none), "{out:?}");
    }

    #[test]
    fn threads_have_their_own_streams() {
        let t = Trends::new(Prefetcher::Leap);
        // Two vCPUs scanning the same area with different strides.
        let mut last = (None, None);
        for k in 0..6u64 {
            last.0 = t.fault(1, 4000 + 2 * k, MAX);
            last.1 = t.fault(2, 4001 + 5 * k, MAX);
        }
        assert_eq!(last.0.map(|t| t.stride), Some(2));
        assert_eq!(last.1.map(|t| t.stride), Some(5));
    }
}
