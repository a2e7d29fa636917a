//! Replicas: reading a page from whichever copy still answers, declaring
//! failed nodes dead, and making new copies until every page has
//! `--replicas` live ones again (see docs/vmm.md, "Replication").
//!
//! A page's replica set ([`super::placement::Placement::set_of`]) names only
//! nodes that acknowledged its current version: a write-back replaces the
//! whole set with the nodes that acknowledged the new version, and a copy
//! adds a node only after it acknowledged the copy. So a page is never read
//! from a node that missed one of its writes, and the seal check (version
//! and digest) would refuse such a copy anyway.
//!
//! New copies are made of pages nobody else can touch:
//! - an *absent* page is claimed (`ABSENT -> FETCHING`, as a drain does), read
//!   from a live copy, checked, written to the new nodes and re-pointed;
//! - a *resident* page short of copies is evicted: eviction writes back every
//!   victim that [`needs copies`](super::placement::Placement::needs_copies),
//!   clean or not, to a full set of nodes.

use super::placement::Node;
use super::replicas::Replicas;
use super::uffd::PAGE;
use super::{ABSENT, FETCHING, PathError, RESIDENT, Shared, evict};
use fabric::ClientError;
use std::sync::Arc;
use std::sync::atomic::Ordering::*;
use std::time::{Duration, Instant};

impl Shared {
    /// Declares node `i` failed for `why` (an error naming it). If that
    /// leaves some page with no live copy and no local one, the VM stops,
    /// naming the failed nodes and how many pages were lost.
    pub(crate) fn node_failed(&self, i: usize, why: &PathError) {
        if !self.nodes.mark_dead(i, &fabric::client::error_chain(why)) {
            return;
        }
        self.stats.node_failures.fetch_add(1, Relaxed);
        let lost = self.lost_pages();
        if lost > 0 {
            self.fail(self.lost(lost));
        }
    }

    /// Pages whose every copy is on failed nodes and that are not resident.
    pub(crate) fn lost_pages(&self) -> u64 {
        let nodes = self.nodes.nodes();
        (0..self.pages)
            .filter(|&p| {
                let set = self.nodes.set_of(p as u64);
                !set.is_empty()
                    && set.iter().all(|i| nodes[i].is_dead())
                    && matches!(self.state[p].load(Acquire), ABSENT | FETCHING)
            })
            .count() as u64
    }

    /// The error that stops a VM that lost `pages` pages.
    pub(crate) fn lost(&self, pages: u64) -> PathError {
        PathError::Lost {
            pages,
            nodes: self.nodes.dead_nodes(),
        }
    }
}

/// Reads page `p` into `out` from a live copy and checks it (decrypting it
/// with encryption): the primary first, then the others. A copy that fails
/// (no answer, an error, a bad page) gets its node declared dead and the next
/// is tried, so the guest sees latency, not an error, while any copy lives.
pub(crate) fn read_any(s: &Shared, p: usize, out: &mut [u8]) -> Result<(), PathError> {
    loop {
        let live = s.nodes.live(s.nodes.set_of(p as u64));
        let Some(i) = live.primary() else {
            return Err(s.lost(s.lost_pages().max(1)));
        };
        let node = s.nodes.node(i);
        match read_checked(s, &node, p, out) {
            Ok(()) => return Ok(()),
            Err(e) => s.node_failed(i, &e),
        }
        if s.stopped() {
            return Err(PathError::Stopped);
        }
    }
}

/// Reads page `p` from `node` and opens its seal.
fn read_checked(s: &Shared, node: &Node, p: usize, out: &mut [u8]) -> Result<(), PathError> {
    let present = node
        .client
        .read_page(p as u64, out)
        .map_err(|source| PathError::Fetch {
            addr: node.addr.clone(),
            source,
        })?;
    s.seals
        .open(p, present, out)
        .map_err(|source| PathError::Seal {
            addr: node.addr.clone(),
            source,
        })
}

/// What happened to a batch of claimed pages.
#[derive(Default)]
pub(crate) struct Copied {
    /// New copies acknowledged.
    pub copies: usize,
    /// Pages taken off the dropped node.
    pub moved: usize,
    /// Pages that were read but found no node to take a new copy.
    pub short: usize,
}

/// Gives claimed pages (each `FETCHING`) a full set of live copies, none on
/// `drop` if given (a node being drained, or left by the rebalancer): each is
/// read from a live copy, checked, and written to new nodes (`prefer` first),
/// then re-pointed; a copy on `drop` is freed once it is no longer in the
/// set. Nodes that fail meanwhile are declared dead; their pages are tried
/// again on a later pass. Does not release the pages.
pub(crate) fn copy_claimed(
    s: &Shared,
    pages: &[usize],
    drop: Option<usize>,
    prefer: Option<usize>,
) -> Copied {
    let n = s.nodes.replicas();
    let nodes = s.nodes.nodes();
    let mut freed: Vec<Vec<u64>> = vec![Vec::new(); nodes.len()];
    let mut done = Copied::default();
    // (page, its set, the live members it keeps, copies to make)
    let mut work: Vec<(usize, Replicas, Replicas, usize)> = Vec::new();
    for &p in pages {
        let set = s.nodes.set_of(p as u64);
        let live = s.nodes.live(set);
        if live.is_empty() || drop.is_some_and(|d| !set.contains(d)) {
            // Lost (the VM stops on it), or no longer on the dropped node.
            continue;
        }
        let keep = drop.map_or(live, |d| live.without(d));
        if keep.len() >= n {
            if let Some(d) = drop {
                // Enough copies elsewhere: only the one on `d` goes.
                s.nodes.set_replicas(p as u64, keep);
                freed[d].push(p as u64);
                done.moved += 1;
            }
            continue;
        }
        work.push((p, set, keep, n - keep.len()));
    }
    if work.is_empty() {
        evict::free_moved(s, &nodes, &freed);
        return done;
    }
    // Read each page from its primary live copy, checked (a bad copy must
    // not be spread).
    let mut buf = vec![0u8; work.len() * PAGE];
    let mut ok = vec![true; work.len()];
    let mut by_source: Vec<(usize, Vec<usize>)> = Vec::new();
    for (k, (_, set, _, _)) in work.iter().enumerate() {
        let src = s.nodes.live(*set).primary().expect("a live copy");
        match by_source.iter_mut().find(|(i, _)| *i == src) {
            Some((_, ks)) => ks.push(k),
            None => by_source.push((src, vec![k])),
        }
    }
    for (src, ks) in &by_source {
        let node = s.nodes.node(*src);
        let fail = |source| PathError::Fetch {
            addr: node.addr.clone(),
            source,
        };
        // Every batch is submitted before any is awaited: one round trip for
        // the lot.
        let chunks: Vec<&[usize]> = ks.chunks(node.client.node().max_batch).collect();
        let mut pending = Vec::with_capacity(chunks.len());
        for chunk in &chunks {
            let gpns: Vec<u64> = chunk.iter().map(|&k| work[k].0 as u64).collect();
            pending.push(node.client.submit_read(&gpns));
        }
        for (chunk, read) in chunks.into_iter().zip(pending) {
            let mut out = vec![0u8; chunk.len() * PAGE];
            let present = match read.and_then(|r| r.wait(&mut out)) {
                Ok(present) => present,
                Err(e) => {
                    s.node_failed(*src, &fail(e));
                    chunk.iter().for_each(|&k| ok[k] = false);
                    continue;
                }
            };
            for (j, &k) in chunk.iter().enumerate() {
                let data = &out[j * PAGE..(j + 1) * PAGE];
                let mut check = data.to_vec();
                if let Err(source) = s.seals.open(work[k].0, present.is_present(j), &mut check) {
                    s.node_failed(
                        *src,
                        &PathError::Seal {
                            addr: node.addr.clone(),
                            source,
                        },
                    );
                    ok[k] = false;
                    continue;
                }
                buf[k * PAGE..(k + 1) * PAGE].copy_from_slice(data);
            }
        }
    }
    // New nodes for each page, reserved until re-pointed (a drain waits for
    // them; see `placement::Reservations`).
    let mut reserved = s.nodes.reservations();
    let targets: Vec<Vec<usize>> = work
        .iter()
        .zip(&ok)
        .map(|((_, set, _, need), &ok)| {
            if ok {
                reserved.extra(*set, *need, prefer)
            } else {
                Vec::new()
            }
        })
        .collect();
    let nodes = s.nodes.nodes();
    freed.resize(nodes.len(), Vec::new());
    let mut per_node: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
    for (k, t) in targets.iter().enumerate() {
        for &i in t {
            per_node[i].push(k);
        }
    }
    let written = write_all(
        s,
        &nodes,
        &per_node,
        work.len(),
        |_| usize::MAX,
        |k| work[k].0 as u64,
        |k| &buf[k * PAGE..(k + 1) * PAGE],
    );
    for (i, _, e) in &written.refused {
        nodes[*i].mark_full(e);
    }
    let acked = written.acked;
    for (k, (p, set, keep, _)) in work.iter().enumerate() {
        let new: Replicas = keep.iter().chain(acked[k].iter()).collect();
        if acked[k].is_empty() {
            // No new copy: nothing changes (a later pass tries again).
            if ok[k] {
                done.short += 1;
            }
            continue;
        }
        s.nodes.set_replicas(*p as u64, new);
        done.copies += acked[k].len();
        if let Some(d) = drop
            && set.contains(d)
            && !new.contains(d)
        {
            freed[d].push(*p as u64);
            done.moved += 1;
        }
    }
    std::mem::drop(reserved);
    evict::free_moved(s, &nodes, &freed);
    s.stats.rereplicated.fetch_add(done.copies as u64, Relaxed);
    done
}

/// What [`write_all`] got back.
pub(crate) struct Written {
    /// Per page, the nodes that acknowledged it.
    pub acked: Vec<Replicas>,
    /// Writes a node refused for lack of room: (node, the pages, its answer).
    pub refused: Vec<(usize, Vec<usize>, ClientError)>,
}

/// Writes page `k` (page number `gpn(k)`, content `data(k)`, `k < pages`) to
/// every node `i` with `k` in `per_node[i]`, in batches of at most `batch(i)`,
/// all submitted before any is awaited: a write to N nodes costs one round
/// trip, not N. A node that fails otherwise than for lack of room is declared
/// dead.
pub(crate) fn write_all<'d>(
    s: &Shared,
    nodes: &[Arc<Node>],
    per_node: &[Vec<usize>],
    pages: usize,
    batch: impl Fn(usize) -> usize,
    gpn: impl Fn(usize) -> u64,
    data: impl Fn(usize) -> &'d [u8],
) -> Written {
    let mut out = Written {
        acked: vec![Replicas::EMPTY; pages],
        refused: Vec::new(),
    };
    let failed = |i: usize, source| {
        s.node_failed(
            i,
            &PathError::WriteBack {
                addr: nodes[i].addr.clone(),
                source,
            },
        )
    };
    let mut pending = Vec::new();
    for (i, ks) in per_node.iter().enumerate() {
        if ks.is_empty() || nodes[i].is_dead() {
            continue;
        }
        for chunk in ks.chunks(batch(i).clamp(1, nodes[i].client.node().max_batch)) {
            let pages: Vec<(u64, &[u8])> = chunk.iter().map(|&k| (gpn(k), data(k))).collect();
            match nodes[i].client.submit_write(&pages) {
                Ok(w) => pending.push((i, chunk, w)),
                Err(e) => {
                    failed(i, e);
                    break;
                }
            }
        }
    }
    for (i, chunk, w) in pending {
        match w.wait() {
            Ok(()) => {
                for &k in chunk {
                    out.acked[k] = out.acked[k].with(i);
                }
            }
            Err(e) if super::placement::is_out_of_capacity(&e) => {
                out.refused.push((i, chunk.to_vec(), e));
            }
            Err(e) => failed(i, e),
        }
    }
    out
}

/// Background repair: while some page has fewer live copies than it should
/// and a node has room for another, makes copies at most `rate` pages a
/// second. Absent pages are copied from a live copy; resident ones are
/// evicted (eviction writes them to a full set). Sleeps while nothing is
/// short.
pub(crate) fn repair_loop(s: &Shared, rate: u64) {
    let tick = Duration::from_millis(100);
    let per_tick = (rate / 10).max(1) as usize;
    let mut done_gen = s.nodes.repair_gen();
    let mut cursor = 0usize;
    while !s.stopped() {
        let t0 = Instant::now();
        let generation = s.nodes.repair_gen();
        if generation != done_gen {
            let (claimed, resident, busy, wrapped) = pick(s, &mut cursor, per_tick);
            // Up to 16 batches per call, each call one round trip of reads
            // and one of writes.
            for chunk in claimed.chunks(1024) {
                copy_claimed(s, chunk, None, None);
                release(s, chunk);
            }
            if let Err(e) = evict::evict_resident(s, &resident) {
                s.fail(e);
                return;
            }
            // A whole pass that found nothing to do, with no page busy:
            // every page has its copies (or no node has room for more).
            if wrapped && claimed.is_empty() && resident.is_empty() && !busy {
                done_gen = generation;
            }
        }
        if let Some(rest) = tick.checked_sub(t0.elapsed()) {
            s.sleep_unless_stopped(rest);
        }
    }
}

/// Up to `want` pages short of copies, from `cursor` on: the absent ones
/// claimed, the resident ones listed. Also tells whether a page short of
/// copies was busy (being installed or evicted), and whether the scan went
/// through every page.
fn pick(s: &Shared, cursor: &mut usize, want: usize) -> (Vec<usize>, Vec<usize>, bool, bool) {
    let (mut claimed, mut resident, mut busy) = (Vec::new(), Vec::new(), false);
    for _ in 0..s.pages {
        let p = *cursor;
        *cursor = (*cursor + 1) % s.pages;
        if s.nodes.needs_copies(p as u64) {
            match s.state[p].load(Acquire) {
                // No live copy and none here: lost (the VM stops on it).
                ABSENT if s.nodes.live(s.nodes.set_of(p as u64)).is_empty() => {}
                ABSENT
                    if s.state[p]
                        .compare_exchange(ABSENT, FETCHING, AcqRel, Acquire)
                        .is_ok() =>
                {
                    claimed.push(p);
                }
                RESIDENT => resident.push(p),
                _ => busy = true,
            }
            if claimed.len() + resident.len() >= want {
                return (claimed, resident, busy, false);
            }
        }
    }
    (claimed, resident, busy, true)
}

/// Returns claimed pages to `ABSENT` and wakes any vCPU that faulted on them
/// meanwhile (it faults again and is served from the page's copies).
pub(crate) fn release(s: &Shared, pages: &[usize]) {
    for &p in pages {
        s.state[p].store(ABSENT, Release);
        let _ = s.uffd.wake(s.addr(p) as *mut _, PAGE);
    }
}
