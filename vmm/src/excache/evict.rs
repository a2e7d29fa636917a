//! The evictor: keeps free frames available by discarding resident pages, writing
//! dirty ones back to their memory node first.
//!
//! ## The protocol that loses no write
//!
//! For a batch of victims (each moved `RESIDENT -> EVICTING`, so no handler
//! re-installs them meanwhile):
//! 1. Write-protect the victims with userfaultfd (`UFFDIO_WRITEPROTECT`). KVM's MMU
//!    notifier drops its writable mappings at once; from here any write to a victim
//!    (a guest write through KVM's page-table walk, KVM's own emulated accesses, a
//!    device model in a VMM thread) blocks in the kernel on the userfaultfd until
//!    step 5. Reads go on. (mprotect was used first: KVM turns the `EFAULT` of its
//!    *software* accesses, e.g. the emulator setting an accessed bit, into a guest
//!    fault instead of returning it, which crashed Linux guests; a userfaultfd
//!    write-protect fault just waits.)
//! 2. Decide which victims are dirty: their content is compared with the
//!    fingerprint recorded when they were installed (see "Dirty pages" below).
//!    With `--dirty-log`, `KVM_GET_DIRTY_LOG` is read first (every write that
//!    happened before step 1 is in it) and only logged victims are compared.
//! 3. Dirty victims are copied to their memory node (`WritePages`, batched and
//!    pipelined) and the node's acknowledgement awaited; they are then marked as
//!    having remote data. Clean victims need nothing: their node (or the zero page)
//!    already holds their content.
//! 4. `MADV_DONTNEED` discards the victims; the next access faults to userfaultfd.
//! 5. The write protection is lifted (without a wake-up), the victims become
//!    `ABSENT`, then every writer held on them is woken, and the batch ends, waking
//!    handlers waiting for it. A write that was held since step 1 now faults the
//!    page back in (userfaultfd MISSING), with the data written back in step 3.
//!
//! A batch that fails leaves its victims `EVICTING` (the evictor threads stop
//! the VM on the error); the gap pages it held are released.
//!
//! No write can fall between the dirtiness check and the discard, because writes
//! are impossible from step 1 to step 5. A fault handler that finds a page
//! `EVICTING` waits for the batch too.
//!
//! Steps 1, 4 and 5 work on address ranges: runs of consecutive victims, and
//! across short gaps of absent pages that the batch holds meanwhile (see
//! [`super::spans`]), so that the victims of a strided scan cost a few system calls
//! and TLB shoot-downs per batch rather than three per page.
//!
//! ## Dirty pages
//!
//! A victim is dirty when its content differs from what its node (or the zero
//! page) holds. The fault handler records a 128-bit fingerprint (XXH3) of each
//! page's content as it installs it; at eviction a victim whose content, read
//! while write-protected, still has that fingerprint is dropped as clean, and any
//! other is written back. A page installed as zeros is checked by a scan that
//! stops at its first non-zero word. This is exact up to a fingerprint collision
//! between a page's installed and current content (about 2^-128 for unrelated
//! data; a guest that crafted one could only lose its own write).
//!
//! Why content and not the KVM dirty log by default: the log over-reports (KVM
//! maps a page writable on a guest *read* when the host page is writable, as
//! every page installed with `UFFDIO_COPY` is, and logs it dirty then), so the
//! content check is needed anyway; and a dirty-logged memslot stops KVM from
//! mapping neighbouring resident pages on a fault. On this machine's shadow-paging
//! KVM that costs a guest exit for every page touched after it is installed:
//! the sequential benchmark at 25% cache took 131 874 exits with the log and
//! 21 707 without (`vmm run` prints KVM's exit count). `--dirty-log` keeps the
//! log for CLOCK, which then also counts a page written since the hand last
//! passed as referenced.

use super::spans::Spans;
use super::uffd::PAGE;
use super::{
    ABSENT, DIRTY_SLOT, EVICTING, EvictPolicy, PathError, RESIDENT, Shared, fingerprint, repair,
};

use std::sync::atomic::Ordering::*;

/// Smallest usable budget, in pages.
pub const MIN_BUDGET: usize = 16;
/// Most pages evicted per batch.
const BATCH: usize = 256;

/// Evict when fewer frames than this are free.
pub(crate) fn low_watermark(budget: usize) -> usize {
    (budget / 16).clamp(2, BATCH)
}

/// Evictor threads. Each evicts whole batches; two let one batch's write-back
/// wait on the network while the other protects, checks or discards (measured
/// on the sequential benchmark at 25% cache: 0.63 s against 0.68 s with one).
pub(crate) const EVICTORS: usize = 2;

pub(crate) fn evictor_loop(s: &Shared) {
    loop {
        {
            let mut r = s.resident.lock().unwrap();
            while !s.stopped() && !s.wants_eviction(*r) {
                r = s.evict_wake.wait(r).unwrap();
            }
        }
        if s.stopped() {
            return;
        }
        if let Err(e) = evict_batch(s) {
            s.fail(e);
            return;
        }
    }
}

fn merge_dirty_log(s: &Shared, dirty: &mut [u64]) -> Result<(), PathError> {
    let log =
        s.vm.get_dirty_log(DIRTY_SLOT, s.pages * PAGE)
            .map_err(PathError::DirtyLog)?;
    for (w, (d, l)) in dirty.iter_mut().zip(log).enumerate() {
        *d |= l;
        // A write since the last read of the log is a reference, for CLOCK.
        let mut bits = l;
        while bits != 0 {
            let p = w * 64 + bits.trailing_zeros() as usize;
            s.referenced[p].store(true, Relaxed);
            bits &= bits - 1;
        }
    }
    Ok(())
}

fn is_dirty(dirty: &[u64], p: usize) -> bool {
    dirty[p / 64] & (1 << (p % 64)) != 0
}

fn clear_dirty(dirty: &mut [u64], p: usize) {
    dirty[p / 64] &= !(1 << (p % 64));
}

/// Picks up to BATCH victims and moves them to EVICTING.
fn select(s: &Shared) -> Vec<usize> {
    let want = (s.budget / 8).clamp(1, BATCH);
    let mut victims = Vec::with_capacity(want);
    let mut q = s.queue.lock().unwrap();
    let mut budget_scan = 2 * q.len() + 1;
    while victims.len() < want && budget_scan > 0 {
        budget_scan -= 1;
        let Some((p, from)) = q.next() else { break };
        if s.state[p].load(Acquire) != RESIDENT {
            continue; // stale entry
        }
        if q.second_chance(from) && s.referenced[p].swap(false, Relaxed) {
            q.spare(p, from);
            continue;
        }
        if s.state[p]
            .compare_exchange(RESIDENT, EVICTING, AcqRel, Acquire)
            .is_ok()
        {
            if s.ahead[p].swap(super::fault::NOT_AHEAD, Relaxed) == super::fault::AHEAD_REMOTE {
                s.stats.prefetch_wasted.fetch_add(1, Relaxed);
            }
            q.evicted(p, from);
            victims.push(p);
        }
    }
    victims.sort_unstable();
    victims
}

fn evict_batch(s: &Shared) -> Result<(), PathError> {
    if s.cfg.policy != EvictPolicy::Fifo && s.cfg.dirty_log {
        merge_dirty_log(s, &mut s.dirty.lock().unwrap())?;
    }
    let victims = select(s);
    if victims.is_empty() {
        // Every resident page is being installed; let the handlers finish.
        std::thread::yield_now();
        return Ok(());
    }
    evict_now(s, &victims)
}

/// Evicts those of `pages` that are still resident (each claimed
/// `RESIDENT -> EVICTING` first; the others are left alone), in batches.
pub(crate) fn evict_resident(s: &Shared, pages: &[usize]) -> Result<(), PathError> {
    for chunk in pages.chunks(BATCH) {
        let victims: Vec<usize> = chunk
            .iter()
            .copied()
            .filter(|&p| {
                s.state[p]
                    .compare_exchange(RESIDENT, EVICTING, AcqRel, Acquire)
                    .is_ok()
            })
            .collect();
        if !victims.is_empty() {
            evict_now(s, &victims)?;
        }
    }
    Ok(())
}

/// Evicts `victims` (each already moved to `EVICTING`), sorted or not.
pub(crate) fn evict_now(s: &Shared, victims: &[usize]) -> Result<(), PathError> {
    let mut victims = victims.to_vec();
    victims.sort_unstable();
    *s.evicting.lock().unwrap() += 1;
    let result = evict_victims(s, &victims);
    *s.evicting.lock().unwrap() -= 1;
    s.evicting_cv.notify_all();
    result
}

fn evict_victims(s: &Shared, victims: &[usize]) -> Result<(), PathError> {
    let mut spans = Spans::new(s, victims);
    // 1. No more writes. 2 and 3: write out the dirty victims. (On an error
    // the victims stay `EVICTING`, as before spans; dropping `spans` releases
    // the gap pages it held.)
    spans.protect()?;
    let written = write_out(s, victims)?;
    // 4. Discard.
    spans.each(|p, n| {
        // SAFETY: discarding pages of the arena mapping: victims, whose content is
        // safe on the memory node (dirty) or reproducible (clean), and held gap
        // pages, which are absent (nothing to discard).
        let r = unsafe { libc::madvise(s.addr(p) as *mut _, n * PAGE, libc::MADV_DONTNEED) };
        if r != 0 {
            return Err(PathError::Discard(std::io::Error::last_os_error()));
        }
        Ok(())
    })?;
    // 5. Writable again, while every page of the spans is still this batch's
    // (no other batch can have protected one); then absent, and only then
    // every writer held and every thread that faulted on a held page woken.
    spans.unprotect()?;
    for &p in victims {
        s.state[p].store(ABSENT, Release);
    }
    spans.finish();
    s.stats.evict_dirty.fetch_add(written as u64, Relaxed);
    s.stats
        .evict_clean
        .fetch_add((victims.len() - written) as u64, Relaxed);
    s.stats
        .writeback_bytes
        .fetch_add((written * PAGE) as u64, Relaxed);
    s.release_frames(victims.len());
    Ok(())
}

/// Steps 2 and 3 for write-protected victims: finds the dirty ones (and the
/// clean ones short of copies) and writes them to their nodes. Returns how
/// many were written.
fn write_out(s: &Shared, victims: &[usize]) -> Result<usize, PathError> {
    // 2. Every earlier write is in the dirty log. (Another evictor may read the
    // log first: it merges into the same bitmap, and only a victim's own evictor
    // clears its bit.)
    let logged: Vec<usize> = if !s.cfg.dirty_log {
        Vec::new()
    } else {
        let mut dirty = s.dirty.lock().unwrap();
        merge_dirty_log(s, &mut dirty)?;
        victims
            .iter()
            .copied()
            .filter(|&p| {
                let d = is_dirty(&dirty, p);
                clear_dirty(&mut dirty, p);
                d
            })
            .collect()
    };
    // 3. Write back the dirty ones, per node, pipelined. Host threads' writes are
    // not in the dirty log: with them, every victim's content is checked.
    let candidates: &[usize] = if s.cfg.host_writes || !s.cfg.dirty_log {
        victims
    } else {
        &logged
    };
    let mut to_write: Vec<usize> = Vec::with_capacity(victims.len());
    for &p in candidates {
        // SAFETY: p is a resident victim, mapped and write-protected since step 1.
        let data = unsafe { std::slice::from_raw_parts(s.addr(p) as *const u8, PAGE) };
        let installed = [
            s.installed_hash[p][0].load(Relaxed),
            s.installed_hash[p][1].load(Relaxed),
        ];
        if !fingerprint::unchanged(data, installed) {
            to_write.push(p);
        }
    }
    // A clean victim short of copies (a node holding one failed) is written
    // too: this copy may be the last, and it gives the page a full set again.
    let before = to_write.len();
    for &p in victims {
        if s.nodes.needs_copies(p as u64) && to_write[..before].binary_search(&p).is_err() {
            to_write.push(p);
        }
    }
    to_write.sort_unstable();
    write_back(s, &to_write)?;
    for &p in &to_write {
        s.remote[p].store(true, Release);
    }
    Ok(to_write.len())
}

/// Writes `pages` to their target nodes, every copy at once (see
/// [`super::placement`] and [`repair::write_all`]), and records which nodes
/// now hold each. A page counts as written once at least one node
/// acknowledged it: its set becomes exactly the nodes that did (a node that
/// missed the write is never read for it), and a page left short of copies
/// is repaired later. A page no node took is tried again elsewhere; a node
/// that is full is skipped for another. Old copies no longer in a page's set
/// are freed.
pub(crate) fn write_back(s: &Shared, pages: &[usize]) -> Result<(), PathError> {
    let mut todo: Vec<usize> = pages.to_vec();
    // A node's room as it reported after refusing a batch (a batch that does not
    // fit fails whole): later batches to it are cut to that size, so that a
    // nearly full node's last pages are used before it counts as full.
    let mut room: Vec<Option<usize>> = Vec::new();
    let guest_page = |p: usize| -> &[u8] {
        // SAFETY: p is a resident victim: mapped, readable, and not written
        // while write-protected; the slice lives until the acks below.
        unsafe { std::slice::from_raw_parts(s.addr(p) as *const u8, PAGE) }
    };
    for _attempt in 0..=super::placement::MAX_NODES {
        if todo.is_empty() {
            return Ok(());
        }
        // Each write counts as in flight on its node until its page is re-pointed
        // (a drain waits for it; see `placement::Reservations`).
        let mut reserved = s.nodes.reservations();
        let Some(a) = reserved.assign(&todo) else {
            return Err(PathError::AllFull {
                reasons: s.nodes.full_reasons(),
            });
        };
        room.resize(a.nodes.len(), None);
        // Each page is sealed once for this write-out (see `seal`); every
        // copy gets the same bytes: with encryption its ciphertext, else the
        // guest's page itself.
        let mut seals = Vec::with_capacity(todo.len());
        let mut cipher = Vec::new();
        if s.seals.encrypts() {
            cipher = vec![0u8; todo.len() * PAGE];
            for (k, &p) in todo.iter().enumerate() {
                let out = &mut cipher[k * PAGE..(k + 1) * PAGE];
                out.copy_from_slice(guest_page(p));
                seals.push(s.seals.seal(p, out).map_err(PathError::Sealing)?);
            }
        } else {
            for &p in &todo {
                seals.push(
                    s.seals
                        .seal_plain(p, guest_page(p))
                        .map_err(PathError::Sealing)?,
                );
            }
        }
        let written = repair::write_all(
            s,
            &a.nodes,
            &a.per_node,
            todo.len(),
            |i| room[i].unwrap_or(usize::MAX),
            |k| todo[k] as u64,
            |k| {
                if s.seals.encrypts() {
                    &cipher[k * PAGE..(k + 1) * PAGE]
                } else {
                    guest_page(todo[k])
                }
            },
        );
        for (i, _, e) in &written.refused {
            let node = &a.nodes[*i];
            match node.refresh() {
                Ok(()) if node.free_pages() > 0 && room[*i] != Some(1) => {
                    room[*i] = Some(node.free_pages() as usize);
                }
                _ => node.mark_full(e),
            }
        }
        let mut moved: Vec<Vec<u64>> = vec![Vec::new(); a.nodes.len()];
        let mut again = Vec::new();
        for (k, &p) in todo.iter().enumerate() {
            let acked = written.acked[k];
            if acked.is_empty() {
                again.push(p);
                continue;
            }
            // What the nodes now hold is what fetches are checked against
            // from here on.
            s.seals.commit(p, seals[k]);
            let old = s.nodes.set_replicas(p as u64, acked);
            for i in old.iter().filter(|&i| !acked.contains(i)) {
                if !a.nodes[i].is_dead() {
                    moved[i].push(p as u64);
                }
            }
            if acked.len() < a.sets[k].len() {
                s.nodes.want_repair();
            }
        }
        drop(reserved);
        free_moved(s, &a.nodes, &moved);
        todo = again;
    }
    Err(PathError::Unplaceable)
}

/// Frees pages that moved off their old nodes (best effort: a failure there
/// leaves garbage on a node that is leaving, never loses data).
pub(crate) fn free_moved(
    _s: &Shared,
    nodes: &[std::sync::Arc<super::placement::Node>],
    moved: &[Vec<u64>],
) {
    for (i, gpns) in moved.iter().enumerate() {
        for chunk in gpns.chunks(nodes[i].client.node().max_batch.max(1)) {
            if let Err(e) = nodes[i].client.free_pages(chunk) {
                log::warn!(
                    "freeing moved pages on {}: {}",
                    nodes[i].addr,
                    fabric::client::error_chain(&e)
                );
                break;
            }
        }
    }
}
