//! Moving pages between memory nodes while the guest runs: draining a node that
//! is being detached.
//!
//! A page is moved only while nobody else can touch its remote copy:
//! - an *absent* page is claimed (`ABSENT -> FETCHING`, so a guest fault on it
//!   waits, as for any page being installed), read from its node, written to its
//!   new node, re-pointed, freed on the old node, and released (`-> ABSENT`, with a
//!   `UFFDIO_WAKE` for any vCPU that faulted meanwhile: it faults again and is
//!   served from the new node);
//! - a *resident* page whose remote copy is on the draining node is evicted by
//!   the normal protocol ([`super::evict`]): a dirty one is written to a node that
//!   takes pages (never the draining one), a clean one becomes absent and is moved
//!   as above on the next pass.
//!
//! Passes repeat until the node holds none of this VM's pages.

use super::{ABSENT, FETCHING, PathError, RESIDENT, Shared, evict, repair};
use std::sync::atomic::Ordering::*;
use std::time::Duration;

/// Moves `pages` (claimed: each `FETCHING`) off node `from`, to `to` if it
/// still takes pages, else wherever placement sends them, keeping each
/// page's other copies ([`repair::copy_claimed`]). Releases them all, moved
/// or not, before returning; returns how many moved. An error if some page
/// found no node with room.
///
/// The pages were picked from a snapshot of the page map and claimed one by one
/// after it: a page may have been faulted in, rewritten and evicted to another
/// node in between, its old copy on `from` freed (read as zeros) or stale. Only
/// the pages still on `from` once claimed are moved; while claimed, nobody else
/// can re-point a page, so that check stays true until the move is done.
fn move_claimed(
    s: &Shared,
    from: usize,
    pages: &[usize],
    to: Option<usize>,
) -> Result<usize, PathError> {
    let done = repair::copy_claimed(s, pages, Some(from), to);
    repair::release(s, pages);
    if done.short > 0 {
        return Err(PathError::NoRoomToMove);
    }
    Ok(done.moved)
}

/// Empties node `from` of this VM's pages. Returns when it holds none.
pub(crate) fn drain(s: &Shared, from: usize) -> Result<(), PathError> {
    let batch = 64;
    loop {
        if s.stopped() {
            return Err(PathError::Stopped);
        }
        // Marks hold pages claimed: return those of this node, so they can move.
        if s.nodes.node(from).is_dead() {
            return Err(PathError::DrainedNodeFailed(
                s.nodes.node(from).addr.clone(),
            ));
        }
        s.marks.drop_where(s, |p| {
            s.remote[p].load(Acquire) && s.nodes.set_of(p as u64).contains(from)
        });
        let on_node = s.nodes.pages_on(from);
        if on_node.is_empty() {
            // A write chosen for this node before it started draining may still
            // be in flight: wait for it, then look again (its page is then on
            // the node, and the next pass moves it).
            let node = s.nodes.node(from);
            while node.writes_in_flight() > 0 && !s.stopped() {
                std::thread::sleep(Duration::from_millis(1));
            }
            if s.nodes.pages_on(from).is_empty() {
                return Ok(());
            }
            continue;
        }
        let mut claimed = Vec::with_capacity(batch);
        let mut resident = Vec::new();
        for p in on_node {
            let p = p as usize;
            match s.state[p].load(Acquire) {
                ABSENT
                    if s.state[p]
                        .compare_exchange(ABSENT, FETCHING, AcqRel, Acquire)
                        .is_ok() =>
                {
                    claimed.push(p);
                    if claimed.len() == batch {
                        move_claimed(s, from, &claimed, None)?;
                        claimed.clear();
                    }
                }
                RESIDENT => resident.push(p),
                _ => {}
            }
        }
        if !claimed.is_empty() {
            move_claimed(s, from, &claimed, None)?;
        }
        // Resident pages whose remote copy is here: evict them (the normal protocol).
        evict::evict_resident(s, &resident)?;
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Background rebalancing (`--rebalance RATE`): moves at most `rate` pages a
/// second from the active node holding most of this VM's pages to the one
/// holding fewest, while they differ by more than two stripes. Only absent
/// pages move (claimed as in a drain); the guest runs on.
pub(crate) fn rebalance_loop(s: &Shared, rate: u64) {
    let tick = Duration::from_millis(100);
    let per_tick = (rate / 10).max(1) as usize;
    while !s.stopped() {
        std::thread::sleep(tick);
        let nodes = s.nodes.nodes();
        let active: Vec<(usize, u64)> = nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.state() == super::placement::NodeState::Active && !n.is_full())
            .map(|(i, n)| (i, n.pages.load(Relaxed)))
            .collect();
        let (Some(&(hi, most)), Some(&(lo, least))) = (
            active.iter().max_by_key(|x| x.1),
            active.iter().min_by_key(|x| x.1),
        ) else {
            continue;
        };
        if hi == lo || most - least <= 2 * super::placement::STRIPE_PAGES {
            continue;
        }
        let want = per_tick.min(((most - least) / 2) as usize);
        let mut claimed = Vec::with_capacity(want);
        for p in s.nodes.pages_on(hi) {
            let p = p as usize;
            if s.state[p]
                .compare_exchange(ABSENT, FETCHING, AcqRel, Acquire)
                .is_ok()
            {
                claimed.push(p);
                if claimed.len() == want {
                    break;
                }
            }
        }
        if claimed.is_empty() {
            continue;
        }
        let mut chunks = claimed.chunks(64);
        for chunk in chunks.by_ref() {
            match move_claimed(s, hi, chunk, Some(lo)) {
                Ok(n) => {
                    s.stats.rebalanced.fetch_add(n as u64, Relaxed);
                }
                Err(e) => {
                    log::warn!("rebalancing: {}", fabric::client::error_chain(&e));
                    break;
                }
            }
        }
        // After a failure, the pages not tried are still claimed: give them back.
        for chunk in chunks {
            repair::release(s, chunk);
        }
    }
}
