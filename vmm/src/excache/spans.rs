//! A batch of victims as address ranges, for the evictor's write-protect,
//! discard and unprotect steps ([`super::evict`]).
//!
//! Each of those steps costs a system call per range, and a write-protect or
//! discard that changed mappings costs a TLB shoot-down across the CPUs (on
//! this machine's shadow-paging KVM the largest cost of an eviction). The
//! victims of a strided scan are not consecutive: one page in three for a
//! stride of three. So a range bridges gaps of up to [`MAX_GAP`] pages between
//! victims when every page of the gap is absent and is *held* for the batch
//! (`ABSENT -> FETCHING`, as a drain or repair claims a page). Nothing installs
//! a held page, so the steps find no mapping there and change nothing (an
//! absent page has no page-table entry; without `UFFD_FEATURE_WP_UNPOPULATED`
//! a write-protect leaves empty entries of anonymous memory alone).
//!
//! A thread that faults on a held page waits, as on any page being fetched,
//! until [`Spans::finish`] returns the page to `ABSENT` and wakes every waiter
//! in the ranges. The order matters: the evictor lifts the protection *while*
//! every page of its ranges is still its own (victims `EVICTING`, gap pages
//! held), so it cannot lift another batch's protection of a page that came
//! and went in a gap meanwhile; it wakes only after the pages are `ABSENT`, so
//! a woken thread's fault finds them claimable. Dropping a `Spans` that was
//! not finished (an error) releases its held pages and wakes their waiters.

use super::uffd::PAGE;
use super::{ABSENT, FETCHING, PathError, Shared};
use std::sync::atomic::Ordering::*;

/// Longest run of absent pages bridged between two victims.
pub(crate) const MAX_GAP: usize = 15;

/// The ranges of a batch, and the gap pages it holds.
pub(crate) struct Spans<'a> {
    s: &'a Shared,
    /// (first page, pages) of each range.
    ranges: Vec<(usize, usize)>,
    /// The gap pages held (until [`Spans::finish`]).
    held: Vec<usize>,
}

impl<'a> Spans<'a> {
    /// Ranges over `victims` (sorted, each `EVICTING`).
    pub(crate) fn new(s: &'a Shared, victims: &[usize]) -> Self {
        let mut spans = Spans {
            s,
            ranges: Vec::new(),
            held: Vec::new(),
        };
        let Some((&first, rest)) = victims.split_first() else {
            return spans;
        };
        let (mut start, mut end) = (first, first + 1);
        for &v in rest {
            if v > end && !(v - end <= MAX_GAP && spans.hold(end, v)) {
                spans.ranges.push((start, end - start));
                start = v;
            }
            end = v + 1;
        }
        spans.ranges.push((start, end - start));
        spans
    }

    /// Holds every page of `from..to` (all absent), or none of them.
    fn hold(&mut self, from: usize, to: usize) -> bool {
        let s = self.s;
        if !(from..to).all(|q| s.state[q].load(Acquire) == ABSENT) {
            return false;
        }
        for q in from..to {
            if s.state[q]
                .compare_exchange(ABSENT, FETCHING, AcqRel, Acquire)
                .is_err()
            {
                // Claimed by a handler, a drain or a repair since the check
                // (rare): the pages held before it are released, with one
                // wake-up for a thread that faulted on one of them meanwhile.
                if q > from {
                    let kept = self.held.len() - (q - from);
                    for &p in &self.held[kept..] {
                        s.state[p].store(ABSENT, Release);
                    }
                    self.held.truncate(kept);
                    let _ = s.uffd.wake(s.addr(from) as *mut _, (q - from) * PAGE);
                }
                return false;
            }
            self.held.push(q);
        }
        true
    }

    /// Calls `f(first_page, pages)` for each range.
    pub(crate) fn each(
        &self,
        mut f: impl FnMut(usize, usize) -> Result<(), PathError>,
    ) -> Result<(), PathError> {
        self.ranges.iter().try_for_each(|&(p, n)| f(p, n))
    }

    /// Write-protects every range: from here every write to a victim blocks
    /// in the kernel on the userfaultfd.
    pub(crate) fn protect(&self) -> Result<(), PathError> {
        self.each(|p, n| {
            self.s
                .uffd
                .write_protect(self.s.addr(p) as *mut _, n * PAGE)
                .map_err(PathError::WriteProtect)
        })
    }

    /// Lifts the protection of every range without waking anyone (see
    /// [`Spans::finish`]).
    pub(crate) fn unprotect(&self) -> Result<(), PathError> {
        self.each(|p, n| {
            self.s
                .uffd
                .remove_write_protection(self.s.addr(p) as *mut _, n * PAGE, false)
                .map_err(PathError::WriteProtect)
        })
    }

    /// Returns the held pages to `ABSENT`, then wakes every thread waiting
    /// in the ranges (writers held by the protection, faults on held pages).
    /// The caller has settled the victims' states first.
    pub(crate) fn finish(&mut self) {
        for &q in &self.held {
            self.s.state[q].store(ABSENT, Release);
        }
        self.held.clear();
        for &(p, n) in &self.ranges {
            let _ = self.s.uffd.wake(self.s.addr(p) as *mut _, n * PAGE);
        }
        self.ranges.clear();
    }
}

impl Drop for Spans<'_> {
    fn drop(&mut self) {
        if !self.held.is_empty() {
            self.finish();
        }
    }
}
