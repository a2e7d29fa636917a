//! Fault handler threads: each polls the userfaultfd, takes one event at a time and
//! resolves it; several threads give several fetches in flight on the shared
//! (pipelined) memory node connections.
//!
//! A fault that continues a sequential stream is served as the first page of a
//! *window*: the faulting page and the `prefetch` pages after it are claimed
//! together, every remote read of the window is submitted before any is awaited
//! (one round trip for all), never-written pages are installed while the reads
//! are in flight, and pages are installed in runs (one `UFFDIO_COPY` per run of
//! consecutive pages). A never-written page faulted by a write, or prefetched
//! for a writing stream, is installed as a private zeroed page rather than the
//! shared zero page: the guest's write then needs no copy-on-write fault, and
//! KVM can map such pages several at a time (see [`uffd::zero_pages`]).

use super::readahead::Mark;
use super::uffd::{self, Installed, PAGE};
use super::{ABSENT, EVICTING, FETCHING, PathError, RESIDENT, Shared, fingerprint, repair};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::*;
use std::time::Instant;
use userfaultfd::{Event, FaultKind, ReadWrite};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// Recent stream heads for sequential detection (several vCPUs, several streams).
const STREAMS: usize = 8;

/// The last page of each recent fault stream, shared by all handlers.
pub(crate) struct Streams(std::sync::Mutex<([u64; STREAMS], usize)>);

impl Streams {
    pub(crate) fn new() -> Self {
        Streams(std::sync::Mutex::new(([u64::MAX; STREAMS], 0)))
    }

    /// Records a fault on `p`; true if it continues a stream (`p - 1` was its end).
    pub(crate) fn continues(&self, p: u64) -> bool {
        let mut g = self.0.lock().unwrap();
        let (heads, next) = &mut *g;
        if let Some(h) = heads.iter_mut().find(|h| **h != u64::MAX && **h + 1 == p) {
            *h = p;
            return true;
        }
        heads[*next] = p;
        *next = (*next + 1) % STREAMS;
        false
    }

    /// The stream now ending at `p` has been prefetched up to `last`.
    pub(crate) fn advance(&self, p: u64, last: u64) {
        let mut g = self.0.lock().unwrap();
        if let Some(h) = g.0.iter_mut().find(|h| **h == p) {
            *h = last;
        }
    }
}

/// Epoll tokens.
const UFFD: u64 = 0;
const STOP: u64 = 1;

/// An epoll set with the userfaultfd (exclusive wake-ups) and the stop eventfd.
fn exclusive_waiter(s: &Shared) -> std::io::Result<Epoll> {
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        s.uffd.as_raw_fd(),
        EpollEvent::new(EventSet::IN | EventSet::EXCLUSIVE, UFFD),
    )?;
    epoll.ctl(
        ControlOperation::Add,
        s.stop_fd.as_raw_fd(),
        EpollEvent::new(EventSet::IN, STOP),
    )?;
    Ok(epoll)
}

pub(crate) fn handler_loop(s: &Shared) {
    let mut buf = vec![0u8; PAGE * (2 * s.cfg.prefetch + 1).max(fabric::proto::MAX_BATCH)];
    // Each handler waits in its own epoll set, the userfaultfd added with
    // EPOLLEXCLUSIVE: a fault event wakes one idle handler, not all of them
    // (with poll(2) every idle handler woke, and all but one found nothing).
    let epoll = match exclusive_waiter(s) {
        Ok(e) => e,
        Err(e) => {
            s.fail(PathError::WaitSetup(e));
            return;
        }
    };
    let mut ready = [EpollEvent::default(); 2];
    while !s.stopped() {
        let n = match epoll.wait(1000, &mut ready) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                s.fail(PathError::Wait(e));
                return;
            }
        };
        if n == 0 || ready[..n].iter().any(|e| e.data() == STOP) {
            continue;
        }
        let event = match s.uffd.read_event() {
            Ok(Some(e)) => e,
            Ok(None) => continue, // another handler took it
            Err(e) => {
                s.fail(PathError::ReadEvent(e));
                return;
            }
        };
        match event {
            Event::Pagefault {
                kind: FaultKind::WriteProtected,
                addr,
                ..
            } => {
                // A write held on a page under eviction: the evictor lifts the
                // protection and wakes it when the batch ends. One seen after
                // that is stale; wake it in case.
                s.stats.faults_wp.fetch_add(1, Relaxed);
                let p = (addr as usize - s.host_base()) / PAGE;
                if p < s.pages && s.state[p].load(Acquire) != EVICTING {
                    let _ = s.uffd.wake(s.addr(p) as *mut _, PAGE);
                }
            }
            Event::Pagefault { addr, rw, .. } => {
                let p = (addr as usize - s.host_base()) / PAGE;
                if p >= s.pages {
                    s.fail(PathError::OutsideGuestMemory(p));
                    return;
                }
                let write = rw == ReadWrite::Write;
                let t0 = Instant::now();
                // Sequential stream: the fault continues one seen by any handler
                // (the faults of one stream are spread over all handler threads).
                let r = if let Some(m) = s.marks.take(p) {
                    mark_fault(s, m, write, &mut buf)
                } else if s.cfg.prefetch > 0 && s.streams.continues(p as u64) {
                    stream_fault(s, p, write, &mut buf)
                        .map(|last| s.streams.advance(p as u64, last as u64))
                } else {
                    handle(s, p, write, &mut buf)
                };
                s.stats
                    .fault_max_ns
                    .fetch_max(t0.elapsed().as_nanos() as u64, Relaxed);
                if let Err(e) = r {
                    s.fail(e);
                    return;
                }
            }
            Event::Remove { .. } => {
                s.stats.remove_events.fetch_add(1, Relaxed);
            }
            _ => {}
        }
    }
}

/// Claims the faulting page `p` (`ABSENT -> FETCHING`). False if there is nothing
/// to install: it is resident (its waiter is woken), another handler installs it
/// (that install wakes every waiter), or the cache is stopping.
fn claim_faulted(s: &Shared, p: usize) -> bool {
    loop {
        match s.state[p].load(Acquire) {
            RESIDENT => {
                // Already installed (a race between handlers, or a prefetch): the
                // faulting thread may still sleep, so wake it.
                s.stats.faults_spurious.fetch_add(1, Relaxed);
                let _ = s.uffd.wake(s.addr(p) as *mut _, PAGE);
                return false;
            }
            FETCHING => {
                s.stats.faults_spurious.fetch_add(1, Relaxed);
                return false;
            }
            EVICTING => s.wait_for_evictions(),
            _ => {
                if s.state[p]
                    .compare_exchange(ABSENT, FETCHING, AcqRel, Acquire)
                    .is_ok()
                {
                    return true;
                }
            }
        }
        if s.stopped() {
            return false;
        }
    }
}

/// Resolves a fault on page `p` alone.
fn handle(s: &Shared, p: usize, write: bool, buf: &mut [u8]) -> Result<(), PathError> {
    if !claim_faulted(s, p) || !s.reserve_frame() {
        return Ok(());
    }
    let t0 = Instant::now();
    if s.remote[p].load(Acquire) {
        let page = &mut buf[..PAGE];
        if s.nodes.set_of(p as u64).is_empty() {
            return Err(PathError::NoNode(p));
        }
        repair::read_any(s, p, page)?;
        install(s, p, Some(page), write)?;
        s.stats.faults_remote.fetch_add(1, Relaxed);
        record_fetch(s, t0);
    } else {
        install(s, p, None, write)?;
        s.stats.faults_zero.fetch_add(1, Relaxed);
    }
    Ok(())
}

/// Installs page `p` alone, with `data` or (`None`) as a never-written page, and
/// marks it resident.
fn install(s: &Shared, p: usize, data: Option<&[u8]>, write: bool) -> Result<(), PathError> {
    let installed = match data {
        Some(data) => {
            s.set_installed_hash(p, fingerprint::page(data));
            // SAFETY: `p < s.pages` (a faulted page, checked against `s.pages`
            // in `handler_loop`, or a mark, taken in a window below `s.pages`),
            // so its page is in the arena: registered with `s.uffd` by
            // `ExCache::start` and kept mapped by `s`. `data` is one page.
            unsafe { uffd::copy_pages(&s.uffd, s.addr(p), data, &s.retries) }
        }
        None => {
            s.set_installed_hash(p, fingerprint::zero_page());
            // SAFETY: as above, page `p` of the arena.
            unsafe { uffd::zero_pages(&s.uffd, s.addr(p), 1, write, &s.retries) }
        }
    };
    report(installed)?;
    mark_resident(s, &[p]);
    Ok(())
}

fn sealed_failed(addr: &str, source: super::seal::SealError) -> PathError {
    PathError::Seal {
        addr: addr.to_string(),
        source,
    }
}

fn fetch_failed(addr: &str, source: fabric::ClientError) -> PathError {
    PathError::Fetch {
        addr: addr.to_string(),
        source,
    }
}

fn report(installed: Result<Installed, uffd::UffdError>) -> Result<(), PathError> {
    match installed.map_err(PathError::Install)? {
        Installed::New => {}
        Installed::AlreadyPresent => log::debug!("a page was already present"),
    }
    Ok(())
}

fn record_fetch(s: &Shared, t0: Instant) {
    let _ = s
        .stats
        .fetch_ns
        .lock()
        .unwrap()
        .record(t0.elapsed().as_nanos() as u64);
}

/// Marks installed pages resident and queues them for eviction.
fn mark_resident(s: &Shared, pages: &[usize]) {
    for &q in pages {
        s.referenced[q].store(true, Relaxed);
        s.state[q].store(RESIDENT, Release);
    }
    let promoted = s.queue.lock().unwrap().installed(pages.iter().copied());
    if promoted > 0 {
        s.stats.evict_promoted.fetch_add(promoted, Relaxed);
    }
}

/// Pages in a read-ahead window: `--prefetch`, but with the streams that have
/// read-ahead under way sharing an eighth of the cache, so that streams in a
/// small cache do not push out the pages a workload reuses, or each other's
/// pages before they are used (a stream holds up to two windows ahead of the
/// guest). Zero when prefetching is off.
pub(crate) fn prefetch_window(s: &Shared) -> usize {
    if s.cfg.prefetch == 0 {
        return 0;
    }
    let streams = s.marks.len().max(1);
    s.cfg.prefetch.min(s.budget / 8 / streams).max(1)
}

/// Serves a fault on `p` that continues a sequential stream: `p` itself (if no
/// one else is installing it), the window after it, and the next window with its
/// first page kept as a read-ahead mark ([`readahead`]). Returns the last page
/// covered.
fn stream_fault(s: &Shared, p: usize, write: bool, buf: &mut [u8]) -> Result<usize, PathError> {
    s.marks.expire(s);
    let w = prefetch_window(s);
    let end = (p + 1 + 2 * w).min(s.pages);
    let last = window(s, p, end, true, Some(p + 1 + w), write, buf)?;
    Ok(last.unwrap_or(p))
}

/// Serves the guest's fault on a read-ahead mark: installs the page, which was
/// fetched with its window, then fetches the next window of the stream, whose
/// first page becomes the next mark.
fn mark_fault(s: &Shared, m: Mark, write: bool, buf: &mut [u8]) -> Result<(), PathError> {
    install(s, m.page, m.data.as_deref(), write)?;
    s.stats.readahead_hits.fetch_add(1, Relaxed);
    let first = m.stream_end + 1;
    if first < s.pages {
        let end = (first + prefetch_window(s)).min(s.pages);
        if let Some(last) = window(s, first, end, false, Some(first), write, buf)? {
            s.streams.advance(m.stream_end as u64, last as u64);
        }
    }
    Ok(())
}

/// Fetches and installs the absent pages of `[first, end)` while frames are free,
/// as one window. With `demand`, `first` is the faulted page: it is claimed even
/// if that means waiting for a frame, and it travels alone and first. Page
/// `mark`, if claimed, is kept as a read-ahead mark instead of installed.
/// Returns the last page claimed.
fn window(
    s: &Shared,
    first: usize,
    end: usize,
    demand: bool,
    mark: Option<usize>,
    write: bool,
    buf: &mut [u8],
) -> Result<Option<usize>, PathError> {
    let t0 = Instant::now();
    let demand = demand && claim_faulted(s, first);
    if demand && !s.reserve_frame() {
        return Ok(None);
    }
    let mut taken: Vec<usize> = Vec::with_capacity(end.saturating_sub(first));
    if demand {
        taken.push(first);
    }
    for q in first + usize::from(demand)..end {
        if s.state[q].load(Acquire) != ABSENT {
            continue;
        }
        if !s.try_reserve_frame() {
            break;
        }
        if s.state[q]
            .compare_exchange(ABSENT, FETCHING, AcqRel, Acquire)
            .is_err()
        {
            s.release_frames(1);
            continue;
        }
        taken.push(q);
    }
    let last = taken.last().copied();
    let mark = mark.filter(|m| taken.contains(m));
    let (remote, zero): (Vec<usize>, Vec<usize>) =
        taken.iter().partition(|&&q| s.remote[q].load(Acquire));
    // Decided now: once installed, the page may be evicted (and its `remote`
    // flag set) before this function returns.
    let demand_remote = demand && remote.first() == Some(&first);
    // Remote pages: per-node runs of up to a batch each, all submitted before any
    // is awaited, so the whole window costs about one round trip.
    let nodes = s.nodes.nodes();
    // Each page is read from its primary live copy (a set changes only under
    // its page's claim, which this window holds).
    let node_of = |q: usize| {
        s.nodes
            .set_of(q as u64)
            .filter(|i| !nodes[i].is_dead())
            .primary()
            .unwrap_or(usize::MAX)
    };
    let mut runs: Vec<(usize, usize, usize)> = Vec::new(); // (node, from, to)
    let mut i = 0;
    while i < remote.len() {
        let node_i = node_of(remote[i]);
        let Some(node) = nodes.get(node_i) else {
            if s.nodes.set_of(remote[i] as u64).is_empty() {
                return Err(PathError::NoNode(remote[i]));
            }
            return Err(s.lost(s.lost_pages().max(1)));
        };
        // The faulted page travels alone, first: its small reply comes back
        // (and the vCPU resumes) before the window's bulk arrives.
        let max = if i == 0 && demand_remote {
            1
        } else {
            node.client.node().max_batch
        };
        let mut j = i;
        while j < remote.len() && j - i < max && node_of(remote[j]) == node_i {
            j += 1;
        }
        runs.push((node_i, i, j));
        i = j;
    }
    let mut pending = Vec::with_capacity(runs.len());
    for &(n, from, to) in &runs {
        let gpns: Vec<u64> = remote[from..to].iter().map(|&q| q as u64).collect();
        pending.push(
            nodes[n]
                .client
                .submit_read(&gpns)
                .map_err(|e| fetch_failed(&nodes[n].addr, e)),
        );
    }
    let mut staged = None;
    // Never-written pages meanwhile: no network.
    super::consecutive_runs(&zero, |i, j| {
        except_mark(&zero, i, j, mark, |i, j| {
            for &q in &zero[i..j] {
                s.set_installed_hash(q, fingerprint::zero_page());
            }
            // SAFETY: `zero[i..j]` are consecutive pages of the window, all
            // below `end <= s.pages`: pages of the arena, registered with
            // `s.uffd` by `ExCache::start` and kept mapped by `s`.
            report(unsafe {
                uffd::zero_pages(&s.uffd, s.addr(zero[i]), j - i, write, &s.retries)
            })?;
            mark_resident(s, &zero[i..j]);
            Ok(())
        })
    })?;
    if mark.is_some_and(|m| zero.contains(&m)) {
        staged = mark.map(|page| (page, None));
    }
    for ((n, from, to), read) in runs.into_iter().zip(pending) {
        let out = &mut buf[from * PAGE..to * PAGE];
        let pages = &remote[from..to];
        // Every page is checked (and decrypted) before anything is installed.
        // A node that fails or returns a bad page is declared dead, and the
        // pages are read from their other copies.
        match read.and_then(|r| r.wait(out).map_err(|e| fetch_failed(&nodes[n].addr, e))) {
            Ok(present) => {
                for (k, &q) in pages.iter().enumerate() {
                    let page = &mut out[k * PAGE..(k + 1) * PAGE];
                    if let Err(source) = s.seals.open(q, present.is_present(k), page) {
                        s.node_failed(n, &sealed_failed(&nodes[n].addr, source));
                        repair::read_any(s, q, page)?;
                    }
                }
            }
            Err(e) => {
                s.node_failed(n, &e);
                for (k, &q) in pages.iter().enumerate() {
                    repair::read_any(s, q, &mut out[k * PAGE..(k + 1) * PAGE])?;
                }
            }
        }
        for (k, &q) in pages.iter().enumerate() {
            if Some(q) == mark {
                staged = Some((q, Some(out[k * PAGE..(k + 1) * PAGE].into())));
            } else {
                s.set_installed_hash(q, fingerprint::page(&out[k * PAGE..(k + 1) * PAGE]));
            }
        }
        super::consecutive_runs(pages, |i, j| {
            except_mark(pages, i, j, mark, |i, j| {
                // SAFETY: `pages[i..j]` are consecutive pages of the window, all
                // below `end <= s.pages`: pages of the arena, registered with
                // `s.uffd` by `ExCache::start` and kept mapped by `s`; the data
                // is `j - i` pages.
                report(unsafe {
                    uffd::copy_pages(
                        &s.uffd,
                        s.addr(pages[i]),
                        &out[i * PAGE..j * PAGE],
                        &s.retries,
                    )
                })?;
                mark_resident(s, &pages[i..j]);
                Ok(())
            })
        })?;
        if demand_remote && from == 0 {
            s.stats.faults_remote.fetch_add(1, Relaxed);
            record_fetch(s, t0);
        }
    }
    if let (Some((page, data)), Some(stream_end)) = (staged, last) {
        s.marks.stage(
            s,
            Mark {
                page,
                data,
                stream_end,
            },
        );
    }
    // The faulted page counts as a fault, the rest as prefetches.
    if demand && !demand_remote {
        s.stats.faults_zero.fetch_add(1, Relaxed);
    }
    let extra_remote = remote.len() - usize::from(demand_remote);
    let extra_zero = zero.len() - usize::from(demand && !demand_remote);
    s.stats
        .prefetch_remote
        .fetch_add(extra_remote as u64, Relaxed);
    s.stats.prefetch_zero.fetch_add(extra_zero as u64, Relaxed);
    Ok(last)
}

/// Calls `f` on the parts of the run `pages[i..j]` that are not page `mark`.
fn except_mark(
    pages: &[usize],
    i: usize,
    j: usize,
    mark: Option<usize>,
    mut f: impl FnMut(usize, usize) -> Result<(), PathError>,
) -> Result<(), PathError> {
    match mark.and_then(|m| pages[i..j].iter().position(|&q| q == m)) {
        Some(k) => {
            if k > 0 {
                f(i, i + k)?;
            }
            if i + k + 1 < j {
                f(i + k + 1, j)?;
            }
            Ok(())
        }
        None => f(i, j),
    }
}
