//! Fault handler threads: each polls the userfaultfd, takes one event at a time and
//! resolves it; several threads give several fetches in flight on the shared
//! (pipelined) memory node connections.

use super::uffd::{self, Installed, PAGE};
use super::{ABSENT, EVICTING, FETCHING, RESIDENT, Shared, fingerprint};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::*;
use std::time::Instant;
use userfaultfd::{Event, FaultKind};

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

pub(crate) fn handler_loop(s: &Shared) {
    let mut buf = vec![0u8; PAGE * s.cfg.prefetch.max(fabric::proto::MAX_BATCH)];
    let mut fds = [
        libc::pollfd {
            fd: s.uffd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: s.stop_fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    while !s.stopped() {
        // SAFETY: polling two fds we own, with a correctly sized array.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
        if n <= 0 || fds[1].revents != 0 {
            continue;
        }
        let event = match s.uffd.read_event() {
            Ok(Some(e)) => e,
            Ok(None) => continue, // another handler took it
            Err(e) => {
                s.fail(format!("reading userfaultfd events failed: {e}"));
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
                let p = (addr as usize - s.host_base) / PAGE;
                if p < s.pages && s.state[p].load(Acquire) != EVICTING {
                    let _ = s.uffd.wake(s.addr(p) as *mut _, PAGE);
                }
            }
            Event::Pagefault { addr, .. } => {
                let p = (addr as usize - s.host_base) / PAGE;
                if let Err(e) = handle(s, p, &mut buf) {
                    s.fail(e);
                    return;
                }
                // Sequential stream: the fault continues one seen by any handler
                // (the faults of one stream are spread over all handler threads).
                if s.cfg.prefetch > 0 && s.streams.continues(p as u64) {
                    match prefetch(s, p, &mut buf) {
                        Ok(last) => s.streams.advance(p as u64, last as u64),
                        Err(e) => {
                            s.fail(e);
                            return;
                        }
                    }
                }
            }
            Event::Remove { .. } => {
                s.stats.remove_events.fetch_add(1, Relaxed);
            }
            _ => {}
        }
    }
}

/// Resolves a fault on page `p`.
fn handle(s: &Shared, p: usize, buf: &mut [u8]) -> Result<(), String> {
    if p >= s.pages {
        return Err(format!("fault outside guest memory (page {p})"));
    }
    loop {
        match s.state[p].load(Acquire) {
            RESIDENT => {
                // Already installed (a race between handlers, or a prefetch): the
                // faulting thread may still sleep, so wake it.
                s.stats.faults_spurious.fetch_add(1, Relaxed);
                let _ = s.uffd.wake(s.addr(p) as *mut _, PAGE);
                return Ok(());
            }
            // Another handler installs it and its UFFDIO_COPY wakes every waiter.
            FETCHING => {
                s.stats.faults_spurious.fetch_add(1, Relaxed);
                return Ok(());
            }
            EVICTING => s.wait_for_evictions(),
            _ => {
                if s.state[p]
                    .compare_exchange(ABSENT, FETCHING, AcqRel, Acquire)
                    .is_ok()
                {
                    break;
                }
            }
        }
        if s.stopped() {
            return Ok(());
        }
    }
    if !s.reserve_frame() {
        return Ok(());
    }
    let t0 = Instant::now();
    let remote = s.remote[p].load(Acquire);
    install(s, p, remote, &mut buf[..PAGE])?;
    if remote {
        s.stats.faults_remote.fetch_add(1, Relaxed);
        let _ = s
            .stats
            .fetch_ns
            .lock()
            .unwrap()
            .record(t0.elapsed().as_nanos() as u64);
    } else {
        s.stats.faults_zero.fetch_add(1, Relaxed);
    }
    Ok(())
}

/// Fetches (or zero-fills) page `p`, installs it and marks it resident.
fn install(s: &Shared, p: usize, remote: bool, page: &mut [u8]) -> Result<(), String> {
    let addr = s.addr(p);
    let installed = if remote {
        let Some(i) = s.nodes.node_of(p as u64) else {
            return Err(format!("page {p} has remote data but no memory node"));
        };
        let node = s.nodes.node(i);
        match node.client.read_page(p as u64, page) {
            Ok(_) => {
                s.set_installed_hash(p, fingerprint::page(page));
                uffd::copy_page(&s.uffd, addr, page, &s.retries)
            }
            Err(e) => {
                return Err(format!(
                    "memory node {} failed: {}",
                    node.addr,
                    fabric::client::error_chain(&e)
                ));
            }
        }
    } else {
        s.set_installed_hash(p, fingerprint::zero_page());
        uffd::zero_page(&s.uffd, addr, &s.retries)
    };
    match installed.map_err(|e| fabric::client::error_chain(&e))? {
        Installed::New => {}
        Installed::AlreadyPresent => log::debug!("page {p} was already present"),
    }
    s.referenced[p].store(true, Relaxed);
    s.state[p].store(RESIDENT, Release);
    s.queue.lock().unwrap().push_back(p as u32);
    Ok(())
}

/// Installs up to `prefetch` pages after `p` that are absent, while frames are free.
/// Remote pages of one node are fetched with one pipelined batch. Returns the last
/// page covered.
fn prefetch(s: &Shared, p: usize, buf: &mut [u8]) -> Result<usize, String> {
    let end = (p + 1 + s.cfg.prefetch).min(s.pages);
    let mut taken: Vec<usize> = Vec::with_capacity(s.cfg.prefetch);
    for q in p + 1..end {
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
    // Zero pages first (no network), then remote pages in per-node batches.
    let mut remote: Vec<usize> = Vec::new();
    for &q in &taken {
        if s.remote[q].load(Acquire) {
            remote.push(q);
        } else {
            install(s, q, false, &mut buf[..PAGE])?;
            s.stats.prefetch_zero.fetch_add(1, Relaxed);
        }
    }
    // Per-node runs of up to a batch each, all submitted before any is awaited,
    // so a long window costs about one round trip, not one per batch.
    let mut runs: Vec<(usize, usize, usize)> = Vec::new(); // (node, from, to)
    let mut i = 0;
    let node_of = |q: usize| s.nodes.node_of(q as u64).unwrap_or(usize::MAX);
    let nodes = s.nodes.nodes();
    while i < remote.len() {
        let node_i = node_of(remote[i]);
        let Some(node) = nodes.get(node_i) else {
            return Err(format!(
                "page {} has remote data but no memory node",
                remote[i]
            ));
        };
        let max = node.client.node().max_batch;
        let mut j = i;
        while j < remote.len() && j - i < max && node_of(remote[j]) == node_i {
            j += 1;
        }
        runs.push((node_i, i, j));
        i = j;
    }
    let node_err = |n: usize, e: fabric::ClientError| {
        format!(
            "memory node {} failed: {}",
            nodes[n].addr,
            fabric::client::error_chain(&e)
        )
    };
    let mut pending = Vec::with_capacity(runs.len());
    for &(n, from, to) in &runs {
        let gpns: Vec<u64> = remote[from..to].iter().map(|&q| q as u64).collect();
        pending.push(
            nodes[n]
                .client
                .submit_read(&gpns)
                .map_err(|e| node_err(n, e))?,
        );
    }
    for ((n, from, to), read) in runs.into_iter().zip(pending) {
        let out = &mut buf[from * PAGE..to * PAGE];
        read.wait(out).map_err(|e| node_err(n, e))?;
        for (k, &q) in remote[from..to].iter().enumerate() {
            let data = &out[k * PAGE..(k + 1) * PAGE];
            s.set_installed_hash(q, fingerprint::page(data));
            uffd::copy_page(&s.uffd, s.addr(q), data, &s.retries)
                .map_err(|e| fabric::client::error_chain(&e))?;
            s.referenced[q].store(true, Relaxed);
            s.state[q].store(RESIDENT, Release);
            s.queue.lock().unwrap().push_back(q as u32);
        }
        s.stats
            .prefetch_remote
            .fetch_add((to - from) as u64, Relaxed);
    }
    Ok(taken.last().copied().unwrap_or(p))
}
