//! Victim order: which resident page the evictor takes next.
//!
//! A userfaultfd VMM sees a page when it faults in and never again while it is
//! resident (no accessed bits are read: reading them would mean walking the
//! guest's or KVM's page tables). What it does see is a page faulting back in
//! soon after it was evicted. The policies use only that:
//!
//! - **FIFO**: fault order.
//! - **CLOCK**: fault order with one second chance for a page referenced since
//!   the hand last passed: faulted in (every page once) or, with `--dirty-log`,
//!   written.
//! - **2Q** (Johnson and Shasha, VLDB'94, "simplified 2Q"): a page faulted in
//!   for the first time goes to a FIFO *probation* queue (A1in). Pages evicted
//!   from probation are remembered, page numbers only, in a *ghost* list
//!   (A1out). A page that faults in while remembered has been used twice within
//!   a short time: it goes to the *protected* queue (Am, a CLOCK ring). The
//!   evictor takes from probation while it holds more than a quarter of the
//!   budget (`Kin`), else from protected; the ghost list remembers half a
//!   budget of pages (`Kout`), the paper's recommended sizes.
//!
//! A scan (each page touched once) only ever passes through probation, so it
//! cannot push a hot working set out of protected: that is the scan
//! resistance. Pages that came in with a prefetch window (a scan the
//! prefetcher follows) are not remembered when evicted from probation, so
//! that a scan does not flush the ghost list either.
//!
//! 2Q was chosen over CLOCK-Pro and ARC because its promotion
//! signal is exactly a re-fault, all that is seen here; ARC adapts its split by
//! hits on resident pages and CLOCK-Pro moves pages between hot and cold by
//! their reference bits, neither of which a userfaultfd VMM observes.
//!
//! The queues hold page numbers, lazily: a page that stopped being resident
//! (evicted by a drain, a repair or another evictor) stays queued until the
//! evictor meets it and skips it.

use super::EvictPolicy;
use std::collections::VecDeque;

/// The evictor's queues (under `Shared::queue`'s lock).
pub(crate) struct Victims {
    policy: EvictPolicy,
    /// Every resident page in fault order (FIFO, CLOCK); 2Q's probation (A1in).
    probation: VecDeque<u32>,
    /// 2Q: pages promoted by a re-fault while remembered (Am).
    protected: VecDeque<u32>,
    /// 2Q: pages evicted from probation, oldest first, each with its ticket.
    ghosts: VecDeque<(u32, u32)>,
    /// 2Q: per page, the ticket of its live ghost entry (0: none). An entry
    /// whose ticket is no longer its page's is stale (the page came back).
    ghost_ticket: Box<[u32]>,
    /// 2Q: per page, whether it came in with a prefetch window rather than on
    /// a fault of its own. Evicted from probation, such a page is not
    /// remembered: a scan fetched ahead does not fill the ghost list and push
    /// out the pages a workload faults on again.
    came_ahead: Box<[bool]>,
    next_ticket: u32,
    /// 2Q's `Kin`: probation's share of the budget.
    kin: usize,
    /// 2Q's `Kout`: ghost entries kept.
    kout: usize,
}

/// The queue a candidate came from, for [`Victims::evicted`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Queue {
    Probation,
    Protected,
}

impl Victims {
    pub(crate) fn new(policy: EvictPolicy, pages: usize, budget: usize) -> Self {
        let two_q = policy == EvictPolicy::TwoQ;
        Victims {
            policy,
            probation: VecDeque::with_capacity(budget + 1),
            protected: VecDeque::new(),
            ghosts: VecDeque::new(),
            ghost_ticket: vec![0; if two_q { pages } else { 0 }].into_boxed_slice(),
            came_ahead: vec![false; if two_q { pages } else { 0 }].into_boxed_slice(),
            next_ticket: 1,
            kin: (budget / 4).max(1),
            kout: (budget / 2).max(1),
        }
    }

    /// Pages queued, stale entries included (bounds a scan for victims).
    pub(crate) fn len(&self) -> usize {
        self.probation.len() + self.protected.len()
    }

    /// Queues pages just made resident. Returns how many of them 2Q promoted
    /// (they faulted in while remembered). Each page comes with whether it
    /// was fetched ahead (by a prefetch window, not its own fault).
    pub(crate) fn installed(&mut self, pages: impl IntoIterator<Item = (usize, bool)>) -> u64 {
        let mut promoted = 0;
        for (p, ahead) in pages {
            if self.policy == EvictPolicy::TwoQ {
                self.came_ahead[p] = ahead;
                if self.ghost_ticket[p] != 0 {
                    self.ghost_ticket[p] = 0;
                    self.protected.push_back(p as u32);
                    promoted += 1;
                    continue;
                }
            }
            self.probation.push_back(p as u32);
        }
        promoted
    }

    /// The next candidate and its queue: 2Q takes from probation while it is
    /// over `Kin` (or protected is empty), else from protected; either way the
    /// other queue when the chosen one is empty.
    pub(crate) fn next(&mut self) -> Option<(usize, Queue)> {
        let first = if self.policy != EvictPolicy::TwoQ
            || self.probation.len() > self.kin
            || self.protected.is_empty()
        {
            Queue::Probation
        } else {
            Queue::Protected
        };
        let second = match first {
            Queue::Probation => Queue::Protected,
            Queue::Protected => Queue::Probation,
        };
        [first, second].into_iter().find_map(|from| {
            let q = match from {
                Queue::Probation => &mut self.probation,
                Queue::Protected => &mut self.protected,
            };
            q.pop_front().map(|p| (p as usize, from))
        })
    }

    /// Whether a candidate from `from` with its reference bit set is spared
    /// once (put back at the tail): CLOCK everywhere, 2Q in protected only
    /// (probation is FIFO: a reference there proves nothing beyond the fault).
    pub(crate) fn second_chance(&self, from: Queue) -> bool {
        match self.policy {
            EvictPolicy::Clock => true,
            EvictPolicy::Fifo => false,
            EvictPolicy::TwoQ => from == Queue::Protected,
        }
    }

    /// Puts a spared candidate back at the tail of its queue.
    pub(crate) fn spare(&mut self, p: usize, from: Queue) {
        match from {
            Queue::Probation => self.probation.push_back(p as u32),
            Queue::Protected => self.protected.push_back(p as u32),
        }
    }

    /// A candidate taken as a victim: 2Q remembers those from probation.
    pub(crate) fn evicted(&mut self, p: usize, from: Queue) {
        if self.policy != EvictPolicy::TwoQ || from != Queue::Probation || self.came_ahead[p] {
            return;
        }
        while self.ghosts.len() >= self.kout {
            let Some((q, t)) = self.ghosts.pop_front() else {
                break;
            };
            if self.ghost_ticket[q as usize] == t {
                self.ghost_ticket[q as usize] = 0;
            }
        }
        let t = self.next_ticket;
        self.next_ticket = self.next_ticket.checked_add(1).unwrap_or(1);
        self.ghost_ticket[p] = t;
        self.ghosts.push_back((p as u32, t));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Simulates a cache of `budget` pages under `policy` over `accesses`
    /// (every resident page counts as referenced once, as when faulted in);
    /// returns the hits.
    fn simulate(policy: EvictPolicy, budget: usize, pages: usize, accesses: &[usize]) -> usize {
        let mut v = Victims::new(policy, pages, budget);
        let mut resident = vec![false; pages];
        let mut referenced = vec![false; pages];
        let mut count = 0;
        let mut hits = 0;
        for &p in accesses {
            if resident[p] {
                hits += 1;
                continue;
            }
            if count == budget {
                loop {
                    let (q, from) = v.next().expect("a resident page to evict");
                    if !resident[q] {
                        continue;
                    }
                    if v.second_chance(from) && std::mem::take(&mut referenced[q]) {
                        v.spare(q, from);
                        continue;
                    }
                    resident[q] = false;
                    count -= 1;
                    v.evicted(q, from);
                    break;
                }
            }
            resident[p] = true;
            referenced[p] = true;
            count += 1;
            v.installed([(p, false)]);
        }
        hits
    }

    /// A hot set of 40 pages touched over and over, with a scan over 10 000
    /// cold pages mixed in (one scan page per hot access); a 64-page cache.
    fn hot_set_and_scan() -> Vec<usize> {
        let mut a = Vec::new();
        let mut scan = 1000;
        let mut x = 12345u64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            a.push((x % 40) as usize);
            a.push(scan);
            scan = 1000 + (scan - 1000 + 1) % 10_000;
        }
        a
    }

    #[test]
    fn two_q_keeps_a_hot_set_through_a_scan_where_clock_and_fifo_lose_it() {
        let a = hot_set_and_scan();
        let two_q = simulate(EvictPolicy::TwoQ, 64, 11_000, &a);
        let clock = simulate(EvictPolicy::Clock, 64, 11_000, &a);
        let fifo = simulate(EvictPolicy::Fifo, 64, 11_000, &a);
        eprintln!("hits of 40 000 accesses: 2Q {two_q}, CLOCK {clock}, FIFO {fifo}");
        // Every access to the hot set could hit: 20 000 of 40 000.
        assert!(two_q > 19_000, "2Q hits {two_q}");
        assert!(
            two_q as f64 > 1.5 * clock as f64,
            "2Q {two_q}, CLOCK {clock}"
        );
        assert!(two_q as f64 > 1.5 * fifo as f64, "2Q {two_q}, FIFO {fifo}");
    }

    #[test]
    fn two_q_is_no_worse_than_fifo_on_a_loop_and_equal_without_reuse() {
        // A loop over 100 pages in a 64-page cache: FIFO and CLOCK get no hit.
        let a: Vec<usize> = (0..50).flat_map(|_| 0..100).collect();
        let fifo = simulate(EvictPolicy::Fifo, 64, 100, &a);
        let two_q = simulate(EvictPolicy::TwoQ, 64, 100, &a);
        assert!(two_q >= fifo, "2Q {two_q}, FIFO {fifo}");
        // A pure scan: no policy can hit.
        let scan: Vec<usize> = (0..5000).collect();
        for policy in [EvictPolicy::TwoQ, EvictPolicy::Clock, EvictPolicy::Fifo] {
            assert_eq!(simulate(policy, 64, 5000, &scan), 0);
        }
    }

    #[test]
    fn ghosts_are_bounded_and_a_stale_entry_does_not_drop_a_newer_one() {
        let mut v = Victims::new(EvictPolicy::TwoQ, 1000, 16);
        assert_eq!(v.kout, 8);
        for p in 0..100 {
            v.installed([(p, false)]);
        }
        for _ in 0..100 {
            let (p, from) = v.next().unwrap();
            assert_eq!(from, Queue::Probation);
            v.evicted(p, from);
        }
        assert!(v.ghosts.len() <= 8);
        // 92..100 are remembered, older ones not.
        assert_eq!(v.installed([(99, false), (50, false)]), 1);
        assert_eq!(v.protected.iter().copied().collect::<Vec<_>>(), [99]);
        // 99 comes back (its entry goes stale), is evicted again from
        // probation later: the stale entry's trim must not forget it.
        v.ghost_ticket[99] = 0;
        v.evicted(99, Queue::Probation);
        for p in 200..207 {
            v.evicted(p, Queue::Probation);
        }
        assert_ne!(v.ghost_ticket[99], 0, "99's newer entry is still live");
    }

    #[test]
    fn two_q_does_not_remember_pages_that_came_with_a_prefetch_window() {
        let mut v = Victims::new(EvictPolicy::TwoQ, 100, 8);
        // Page 1 faulted in, pages 2 and 3 fetched ahead; all evicted.
        v.installed([(1, false), (2, true), (3, true)]);
        for _ in 0..3 {
            let (p, from) = v.next().unwrap();
            v.evicted(p, from);
        }
        // Back again: only the page that had faulted is promoted.
        assert_eq!(v.installed([(2, false), (3, false)]), 0);
        assert_eq!(v.installed([(1, false)]), 1);
        // A page that faulted in after coming ahead once is remembered again.
        for _ in 0..3 {
            let (p, from) = v.next().unwrap();
            v.evicted(p, from);
        }
        assert_eq!(v.installed([(2, false), (3, false)]), 2);
    }

    #[test]
    fn fifo_and_clock_use_one_queue_in_fault_order() {
        for policy in [EvictPolicy::Fifo, EvictPolicy::Clock] {
            let mut v = Victims::new(policy, 10, 4);
            assert_eq!(v.installed([(3, false), (1, false), (2, false)]), 0);
            assert_eq!(v.next(), Some((3, Queue::Probation)));
            v.evicted(3, Queue::Probation);
            assert_eq!(v.installed([(3, false)]), 0, "no promotion outside 2Q");
            assert_eq!(v.next(), Some((1, Queue::Probation)));
        }
    }
}
