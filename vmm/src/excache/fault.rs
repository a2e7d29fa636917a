//! Fault handler threads: each polls the userfaultfd, takes one event at a time and
//! resolves it; several threads give several fetches in flight on the shared
//! (pipelined) memory node connections.
//!
//! A fault on a stream with a trend ([`trend`]: a stride, ascending or
//! descending) is served as the first page of a *window*: the faulting page and
//! the next pages along the stride are claimed together, every remote read of the window is submitted before any is awaited
//! (one round trip for all), never-written pages are installed while the reads
//! are in flight, and pages are installed in runs (one `UFFDIO_COPY` per run of
//! consecutive pages). A never-written page faulted by a write, or prefetched
//! for a writing stream, is installed as a private zeroed page rather than the
//! shared zero page: the guest's write then needs no copy-on-write fault, and
//! KVM can map such pages several at a time (see [`uffd::zero_pages`]).
//!
//! **Prefetch accuracy and coverage.** A prefetched page is flagged *ahead*
//! until the guest's stream reaches it: the stream's next fault (on its
//! read-ahead mark, or one stride past what was fetched) shows that the guest
//! went through the pages between its previous position and this fault, which
//! are then counted *used*. A flagged page evicted first is counted *wasted*;
//! one still flagged is *unreached* (the pages of a stream's last window, or
//! fetched past a stream's end, until they are evicted). Accuracy is the share
//! used of the pages fetched ahead from memory nodes whose fate is known (used
//! or wasted); coverage the share of remote page accesses served by
//! prefetching rather than by a fault. (A
//! userfaultfd VMM sees faults, not accesses; inferring use from a stream's
//! progress is what Linux's read-ahead does with its marked page.)

use super::readahead::Mark;
use super::trend::Trend;
use super::uffd::{self, Installed, PAGE};
use super::{ABSENT, EVICTING, FETCHING, PathError, RESIDENT, Shared, fingerprint, repair};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::*;
use std::time::Instant;
use userfaultfd::{Event, FaultKind, ReadWrite};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// `Shared::ahead`: the page was not prefetched, or the guest's stream
/// reached it, or it was evicted.
pub(crate) const NOT_AHEAD: u8 = 0;
/// `Shared::ahead`: a never-written page installed ahead of its stream.
const AHEAD_ZERO: u8 = 1;
/// `Shared::ahead`: a page fetched from a memory node ahead of its stream.
pub(crate) const AHEAD_REMOTE: u8 = 2;

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
            Event::Pagefault {
                addr,
                rw,
                thread_id,
                ..
            } => {
                let p = (addr as usize - s.host_base()) / PAGE;
                if p >= s.pages {
                    s.fail(PathError::OutsideGuestMemory(p));
                    return;
                }
                let write = rw == ReadWrite::Write;
                let t0 = Instant::now();
                // A stream's trend: the faults of one vCPU's stream are spread
                // over all handler threads, and the detector is shared.
                let trend = match s.marks.take(p) {
                    Some(m) => Err(m),
                    None if s.cfg.prefetch > 0 => {
                        Ok(s.trends
                            .fault(thread_id.as_raw(), p as u64, prefetch_window(s)))
                    }
                    None => Ok(None),
                };
                let r = match trend {
                    Err(m) => mark_fault(s, m, write, &mut buf),
                    Ok(Some(t)) => stream_fault(s, p, t, write, &mut buf),
                    Ok(None) => handle(s, p, write, &mut buf),
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
    s.ahead[p].store(NOT_AHEAD, Relaxed);
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
    // A page flagged ahead came with a window (the faulted page of a window
    // and a mark are not flagged).
    let ahead = |q: usize| s.ahead[q].load(Relaxed) != NOT_AHEAD;
    let promoted = s
        .queue
        .lock()
        .unwrap()
        .installed(pages.iter().map(|&q| (q, ahead(q))));
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
    s.cfg
        .prefetch
        .min(super::MAX_PREFETCH)
        .min(s.budget / 8 / streams)
        .max(1)
}

/// Page `p + k * stride`, if it is in the arena.
fn step(s: &Shared, p: usize, stride: i64, k: usize) -> Option<usize> {
    let q = (p as i64).checked_add(stride.checked_mul(k as i64)?)?;
    (0..s.pages as i64).contains(&q).then_some(q as usize)
}

/// Pages `first`, `first + stride`, ..., `count` of them or up to the arena's end.
fn along(s: &Shared, first: usize, stride: i64, count: usize) -> impl Iterator<Item = usize> {
    (0..count).map_while(move |k| step(s, first, stride, k))
}

/// The guest's stream along `stride` went from page `from` to page `p`: the
/// pages fetched ahead of it between the two were used on the way. (A walk
/// over the pages between, not over the flagged ones: pages already resident
/// when their window was fetched are not flagged. At most [`CREDIT_STEPS`]
/// strides: windows are smaller than that.)
fn credit_used(s: &Shared, from: usize, p: usize, stride: i64) {
    let between = |q: &usize| (from < *q && *q < p) || (p < *q && *q < from);
    let used = along(s, p, -stride, CREDIT_STEPS)
        .skip(1)
        .take_while(between)
        .filter(|&q| s.ahead[q].swap(NOT_AHEAD, Relaxed) == AHEAD_REMOTE)
        .count();
    s.stats.prefetch_used.fetch_add(used as u64, Relaxed);
}

/// Whether the guest, faulting on `p` one or more strides past its stream's
/// last page `last`, went through the pages between (all resident: it did
/// not fault on them) rather than jumped over the stream's window to `p`.
/// False for a fault off the stride, or too far to check.
fn went_through(s: &Shared, last: usize, p: usize, stride: i64) -> bool {
    let d = p as i64 - last as i64;
    if stride == 0 || d.signum() != stride.signum() || d % stride != 0 {
        return false;
    }
    let k = (d / stride) as usize;
    k <= CREDIT_STEPS
        && along(s, last, stride, k)
            .skip(1)
            .all(|q| s.state[q].load(Acquire) != ABSENT)
}

/// Most strides [`credit_used`] walks back: two of the largest windows.
const CREDIT_STEPS: usize = 2 * super::MAX_PREFETCH + 2;

/// A stream's window being fetched: its stride, its size in pages, the page
/// the guest's stream is at (whose fault fetches it) and the stream's last
/// page before this window (the detector finds the stream by it).
#[derive(Debug, Clone, Copy)]
struct Stream {
    stride: i64,
    window: usize,
    at: usize,
    end: usize,
}

/// Serves a fault on `p` on a stream with a trend: `p` itself (if no one else
/// is installing it), the window after it along the stride, and the next
/// window with its first page kept as a read-ahead mark ([`readahead`]).
fn stream_fault(
    s: &Shared,
    p: usize,
    t: Trend,
    write: bool,
    buf: &mut [u8],
) -> Result<(), PathError> {
    s.marks.expire(s);
    let w = t.window;
    if went_through(s, t.last as usize, p, t.stride) {
        credit_used(s, t.from as usize, p, t.stride);
    }
    let pages = along(s, p, t.stride, 2 * w + 1);
    let mark = step(s, p, t.stride, w + 1);
    let stream = Stream {
        stride: t.stride,
        window: w,
        at: p,
        end: p,
    };
    window(s, pages, true, mark, stream, write, buf)
}

/// Serves the guest's fault on a read-ahead mark: installs the page, which was
/// fetched with its window, then fetches the next window of the stream (twice
/// as large, up to the limit: the guest used the last one), whose first page
/// becomes the next mark.
fn mark_fault(s: &Shared, m: Mark, write: bool, buf: &mut [u8]) -> Result<(), PathError> {
    install(s, m.page, m.data.as_deref(), write)?;
    s.stats.readahead_hits.fetch_add(1, Relaxed);
    if m.data.is_some() {
        s.stats.prefetch_used.fetch_add(1, Relaxed);
    }
    credit_used(s, m.from, m.page, m.stride);
    let w = (2 * m.window).min(prefetch_window(s)).max(1);
    if let Some(first) = step(s, m.stream_end, m.stride, 1) {
        let pages = along(s, first, m.stride, w);
        let stream = Stream {
            stride: m.stride,
            window: w,
            at: m.page,
            end: m.stream_end,
        };
        window(s, pages, false, Some(first), stream, write, buf)?;
    }
    Ok(())
}

/// Fetches and installs the absent ones of `pages` (a stream's window, in the
/// stream's order) while frames are free. With `demand`, the first page is the
/// faulted page: it is claimed even if that means waiting for a frame, and it
/// travels alone and first. Page `mark`, if claimed, is kept as a read-ahead
/// mark for the stream's next window instead of installed.
///
/// The stream's detector learns how far the window reaches as soon as its
/// pages are claimed, before they are fetched: the faulted page is installed
/// first and the guest goes on, and its next faults, on pages of the window
/// still in flight, must be seen as such (not as steps of the stream).
fn window(
    s: &Shared,
    mut pages: impl Iterator<Item = usize>,
    demand: bool,
    mark: Option<usize>,
    stream: Stream,
    write: bool,
    buf: &mut [u8],
) -> Result<(), PathError> {
    let t0 = Instant::now();
    let Some(first) = pages.next() else {
        return Ok(());
    };
    let demand = demand && claim_faulted(s, first);
    if demand && !s.reserve_frame() {
        return Ok(());
    }
    let mut taken: Vec<usize> = Vec::with_capacity(2 * stream.window + 1);
    if demand {
        taken.push(first);
    }
    for q in std::iter::once(first).filter(|_| !demand).chain(pages) {
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
    if let Some(last) = last {
        s.trends.advance(
            stream.end as u64,
            stream.at as u64,
            last as u64,
            stream.window,
        );
    }
    // Ascending (the faulted page kept first), so that a descending stream's
    // pages are installed in runs too.
    taken[usize::from(demand)..].sort_unstable();
    let mark = mark.filter(|m| taken.contains(m));
    let (remote, zero): (Vec<usize>, Vec<usize>) =
        taken.iter().partition(|&&q| s.remote[q].load(Acquire));
    // Flagged before they are installed: one evicted at once counts as wasted.
    let flag = |pages: &[usize], how: u8| {
        for &q in pages {
            let ahead = if (demand && q == first) || Some(q) == mark {
                NOT_AHEAD
            } else {
                how
            };
            s.ahead[q].store(ahead, Relaxed);
        }
    };
    flag(&remote, AHEAD_REMOTE);
    flag(&zero, AHEAD_ZERO);
    // Decided now: once installed, the page may be evicted (and its `remote`
    // flag set) before this function returns.
    let demand_remote = demand && remote.first() == Some(&first);
    // The rest count as prefetched now, with their flags: a stream's next
    // fault may count them used before this window is installed.
    let extra_remote = remote.len() - usize::from(demand_remote);
    let extra_zero = zero.len() - usize::from(demand && !demand_remote);
    s.stats
        .prefetch_remote
        .fetch_add(extra_remote as u64, Relaxed);
    s.stats.prefetch_zero.fetch_add(extra_zero as u64, Relaxed);
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
                stride: stream.stride,
                window: stream.window,
                from: stream.at,
            },
        );
    }
    // The faulted page counts as a fault.
    if demand && !demand_remote {
        s.stats.faults_zero.fetch_add(1, Relaxed);
    }
    Ok(())
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
