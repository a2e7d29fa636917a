//! The page store: 4 KiB pages keyed by (VM id, guest page number).
//!
//! Layout, chosen for low overhead per stored page:
//! - 64 shards, each behind its own mutex, picked by a hash of the key, so that
//!   connections rarely contend;
//! - in each shard, a `hashbrown` map from key to a `u32` slot (24 bytes per entry
//!   plus one control byte, at the table's load factor), and a slab of page slots
//!   carved from 64 KiB chunks, with a free list of slots released by frees;
//! - pages never written are not stored at all, and a write of an all-zero page
//!   frees the slot instead of storing zeros (a page reads back as zeros either way).
//!
//! Capacity counts stored pages across all VMs; a per-VM quota, if set, counts
//! each VM's own. A write batch reserves room for its
//! new pages before it stores any, so a batch that does not fit fails whole. (One
//! race remains: if another connection of the same VM frees one of the batch's
//! pages between the count and the store, that page needs room the count did not
//! reserve; if none is left, the batch fails with `OutOfCapacity` after storing its
//! earlier pages. The VMM treats a failed write-back as fatal, so no data is
//! silently lost, and only the VM's own concurrent frees can cause it.)

use fabric::proto::PAGE_SIZE;
use hashbrown::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::regions::{Regions, Registrar};
pub use crate::vms::{VmStats, VmTable};

const SHARDS: usize = 64;
const CHUNK_PAGES: usize = 16;

/// Why a store operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The write needs more pages than the node has free.
    #[error("out of capacity: {needed} new pages requested, {used} of {capacity} pages in use")]
    OutOfCapacity {
        /// New pages the write needed.
        needed: u64,
        /// Pages in use.
        used: u64,
        /// The node's capacity in pages.
        capacity: u64,
    },
    /// The write would take the VM past its quota on this node.
    #[error(
        "vm {vm:#x} is at its quota on this node: {needed} new pages requested, {pages} of its {quota} pages in use (memnode --vm-quota)"
    )]
    OverQuota {
        /// The VM.
        vm: u64,
        /// New pages the write needed.
        needed: u64,
        /// The VM's pages on the node.
        pages: u64,
        /// Its quota in pages.
        quota: u64,
    },
    /// The node (or this VM) is at its limit of region chunks, the pinned
    /// memory behind one-sided reads.
    #[error(
        "vm {vm:#x}: no room for another 2 MiB region chunk ({vm_chunks} of this VM's, {chunks} on the node; limit {max}, from --capacity and --vm-quota)"
    )]
    ChunksFull {
        /// The VM.
        vm: u64,
        /// Its chunks.
        vm_chunks: u64,
        /// The node's chunks.
        chunks: u64,
        /// The limit reached.
        max: u64,
    },
    /// A new region chunk could not be registered for remote reads.
    #[error("cannot register chunk {chunk} of vm {vm:#x} for RDMA: {reason}")]
    Register {
        /// The VM.
        vm: u64,
        /// The chunk.
        chunk: u64,
        /// Why.
        reason: String,
    },
    /// The write's data is not a whole number of pages matching its page list.
    #[error("write of {pages} pages carries {bytes} bytes")]
    BadWrite {
        /// Pages listed.
        pages: usize,
        /// Bytes carried.
        bytes: usize,
    },
}

struct Slab {
    chunks: Vec<Box<[u8]>>,
    free: Vec<u32>,
    handed_out: u32,
}

impl Slab {
    fn alloc(&mut self) -> u32 {
        if let Some(i) = self.free.pop() {
            return i;
        }
        if self.handed_out as usize == self.chunks.len() * CHUNK_PAGES {
            self.chunks
                .push(vec![0u8; CHUNK_PAGES * PAGE_SIZE].into_boxed_slice());
        }
        self.handed_out += 1;
        self.handed_out - 1
    }

    fn page(&self, i: u32) -> &[u8] {
        let (c, o) = (i as usize / CHUNK_PAGES, i as usize % CHUNK_PAGES);
        &self.chunks[c][o * PAGE_SIZE..(o + 1) * PAGE_SIZE]
    }

    fn page_mut(&mut self, i: u32) -> &mut [u8] {
        let (c, o) = (i as usize / CHUNK_PAGES, i as usize % CHUNK_PAGES);
        &mut self.chunks[c][o * PAGE_SIZE..(o + 1) * PAGE_SIZE]
    }
}

struct Shard {
    map: HashMap<(u64, u64), u32>,
    slab: Slab,
}

/// A node's pages, for all VMs. Shared by all connections.
pub struct PageStore {
    shards: Box<[Mutex<Shard>]>,
    capacity_pages: u64,
    vm_quota_pages: Option<u64>,
    used: AtomicU64,
    vms: VmTable,
    /// The region layout (`memnode --rdma`): pages at addresses computed
    /// from their numbers, for one-sided reads; else the hashed layout.
    regions: Option<Regions>,
}

fn shard_of(vm: u64, gpn: u64) -> usize {
    let h = (gpn ^ vm.wrapping_mul(0x9e37_79b9_7f4a_7c15)).wrapping_mul(0xff51_afd7_ed55_8ccd);
    (h >> 58) as usize % SHARDS
}

fn is_zero(page: &[u8]) -> bool {
    let (pre, words, post) = {
        // SAFETY: u64 has no invalid bit patterns; align_to returns correctly
        // aligned, in-bounds middle slice and the unaligned remainders.
        unsafe { page.align_to::<u64>() }
    };
    pre.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && post.iter().all(|&b| b == 0)
}

impl PageStore {
    /// An empty store holding at most `capacity_pages` pages.
    pub fn new(capacity_pages: u64) -> Self {
        Self::with_vm_quota(capacity_pages, None)
    }

    /// An empty store holding at most `capacity_pages` pages, and at most
    /// `vm_quota_pages` for any one VM.
    pub fn with_vm_quota(capacity_pages: u64, vm_quota_pages: Option<u64>) -> Self {
        Self::build(capacity_pages, vm_quota_pages, None)
    }

    /// An empty store in the region layout ([`crate::regions`]), whose
    /// chunks `registrar` registers for one-sided reads.
    pub fn with_regions(
        capacity_pages: u64,
        vm_quota_pages: Option<u64>,
        registrar: Box<dyn Registrar>,
    ) -> Self {
        Self::build(
            capacity_pages,
            vm_quota_pages,
            Some(Regions::new(registrar, capacity_pages, vm_quota_pages)),
        )
    }

    fn build(capacity_pages: u64, vm_quota_pages: Option<u64>, regions: Option<Regions>) -> Self {
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    map: HashMap::new(),
                    slab: Slab {
                        chunks: Vec::new(),
                        free: Vec::new(),
                        handed_out: 0,
                    },
                })
            })
            .collect();
        PageStore {
            shards,
            capacity_pages,
            vm_quota_pages,
            used: AtomicU64::new(0),
            vms: VmTable::default(),
            regions,
        }
    }

    /// The region layout, if the store uses it.
    pub fn regions(&self) -> Option<&Regions> {
        self.regions.as_ref()
    }

    /// Ends a session of `vm` ([`VmTable::close`]); a VM that leaves the
    /// node gives its region chunks back.
    pub fn close_session(&self, vm: u64, stats: std::sync::Arc<VmStats>) {
        // Under the table's lock: a new session of the VM cannot open (and
        // make chunks or a queue pair) between the VM's leaving and its
        // chunks going.
        self.vms.close_with(vm, stats, || {
            if let Some(r) = &self.regions {
                r.forget(vm);
            }
        });
    }

    fn stored(&self, vm: u64, gpn: u64) -> bool {
        match &self.regions {
            Some(r) => r.contains(vm, gpn),
            None => self.shards[shard_of(vm, gpn)]
                .lock()
                .unwrap()
                .map
                .contains_key(&(vm, gpn)),
        }
    }

    /// The capacity in pages.
    pub fn capacity_pages(&self) -> u64 {
        self.capacity_pages
    }

    /// Pages stored, all VMs.
    pub fn used_pages(&self) -> u64 {
        self.used.load(Relaxed)
    }

    /// The per-VM quota in pages, if any.
    pub fn vm_quota_pages(&self) -> Option<u64> {
        self.vm_quota_pages
    }

    /// The node's VMs.
    pub fn vms(&self) -> &VmTable {
        &self.vms
    }

    /// Calls `f` with the page's data if it is stored; returns whether it was.
    pub fn read(&self, stats: &VmStats, vm: u64, gpn: u64, f: impl FnOnce(&[u8])) -> bool {
        if let Some(r) = &self.regions {
            stats.reads.fetch_add(1, Relaxed);
            let found = r.read(vm, gpn, f);
            if found {
                stats.bytes_out.fetch_add(PAGE_SIZE as u64, Relaxed);
            } else {
                stats.zero_reads.fetch_add(1, Relaxed);
            }
            return found;
        }
        let shard = self.shards[shard_of(vm, gpn)].lock().unwrap();
        stats.reads.fetch_add(1, Relaxed);
        match shard.map.get(&(vm, gpn)) {
            Some(&slot) => {
                f(shard.slab.page(slot));
                stats.bytes_out.fetch_add(PAGE_SIZE as u64, Relaxed);
                true
            }
            None => {
                stats.zero_reads.fetch_add(1, Relaxed);
                false
            }
        }
    }

    /// Stores a batch of pages (`data` holds them back to back). All-zero pages are
    /// not stored (a stored copy is freed). Fails whole if the new pages do not fit.
    pub fn write(
        &self,
        stats: &VmStats,
        vm: u64,
        gpns: impl ExactSizeIterator<Item = u64> + Clone,
        data: &[u8],
    ) -> Result<(), StoreError> {
        let n = gpns.len();
        if data.len() != n * PAGE_SIZE {
            return Err(StoreError::BadWrite {
                pages: n,
                bytes: data.len(),
            });
        }
        let pages = || gpns.clone().zip(data.chunks_exact(PAGE_SIZE));
        // Reserve room for the pages that would be new: each distinct page number
        // whose last write in the batch is not all zeros and that is not stored yet.
        let mut last: Vec<(u64, bool)> = Vec::with_capacity(n);
        for (g, p) in pages() {
            match last.iter_mut().find(|(x, _)| *x == g) {
                Some(e) => e.1 = !is_zero(p),
                None => last.push((g, !is_zero(p))),
            }
        }
        let needed = last
            .iter()
            .filter(|(g, nonzero)| *nonzero && !self.stored(vm, *g))
            .count() as u64;
        self.reserve(stats, vm, needed)?;
        let mut reserved = needed;
        let mut result = Ok(());
        for (gpn, page) in pages() {
            if let Some(r) = &self.regions {
                let stored = if is_zero(page) {
                    if r.free(vm, gpn) {
                        self.used.fetch_sub(1, Relaxed);
                        stats.pages.fetch_sub(1, Relaxed);
                    }
                    Ok(())
                } else {
                    r.store(vm, gpn, page, || {
                        // As below: a page stored when counted may have been
                        // freed since.
                        if reserved == 0 {
                            self.reserve(stats, vm, 1)?;
                            reserved += 1;
                        }
                        reserved -= 1;
                        Ok(())
                    })
                };
                if let Err(e) = stored {
                    result = Err(e);
                    break;
                }
                stats.writes.fetch_add(1, Relaxed);
                stats.bytes_in.fetch_add(PAGE_SIZE as u64, Relaxed);
                continue;
            }
            let mut shard = self.shards[shard_of(vm, gpn)].lock().unwrap();
            let shard = &mut *shard;
            if is_zero(page) {
                if let Some(slot) = shard.map.remove(&(vm, gpn)) {
                    shard.slab.free.push(slot);
                    self.used.fetch_sub(1, Relaxed);
                    stats.pages.fetch_sub(1, Relaxed);
                }
            } else if let Some(&slot) = shard.map.get(&(vm, gpn)) {
                shard.slab.page_mut(slot).copy_from_slice(page);
            } else {
                // A concurrent free of the same page may have made this one new
                // although it was stored when counted: reserve it then.
                if reserved == 0 {
                    if let Err(e) = self.reserve(stats, vm, 1) {
                        result = Err(e);
                        break;
                    }
                    reserved += 1;
                }
                reserved -= 1;
                let slot = shard.slab.alloc();
                shard.slab.page_mut(slot).copy_from_slice(page);
                shard.map.insert((vm, gpn), slot);
            }
            stats.writes.fetch_add(1, Relaxed);
            stats.bytes_in.fetch_add(PAGE_SIZE as u64, Relaxed);
        }
        self.used.fetch_sub(reserved, Relaxed);
        stats.pages.fetch_sub(reserved, Relaxed);
        result
    }

    /// Reserves room for `n` new pages of `vm`: within its quota (counted in
    /// its `pages`) and within the node's capacity (counted in `used`).
    fn reserve(&self, stats: &VmStats, vm: u64, n: u64) -> Result<(), StoreError> {
        if n == 0 {
            return Ok(());
        }
        let quota = self.vm_quota_pages.unwrap_or(u64::MAX);
        stats
            .pages
            .fetch_update(Relaxed, Relaxed, |p| {
                (p.saturating_add(n) <= quota).then_some(p + n)
            })
            .map_err(|pages| {
                stats.quota_refusals.fetch_add(1, Relaxed);
                StoreError::OverQuota {
                    vm,
                    needed: n,
                    pages,
                    quota,
                }
            })?;
        self.used
            .fetch_update(Relaxed, Relaxed, |u| {
                (u + n <= self.capacity_pages).then_some(u + n)
            })
            .map(|_| ())
            .map_err(|used| {
                stats.pages.fetch_sub(n, Relaxed);
                StoreError::OutOfCapacity {
                    needed: n,
                    used,
                    capacity: self.capacity_pages,
                }
            })
    }

    /// Frees pages; returns how many were stored.
    pub fn free(&self, stats: &VmStats, vm: u64, gpns: impl Iterator<Item = u64>) -> u32 {
        let mut freed = 0;
        for gpn in gpns {
            if let Some(r) = &self.regions {
                if r.free(vm, gpn) {
                    self.used.fetch_sub(1, Relaxed);
                    stats.pages.fetch_sub(1, Relaxed);
                    freed += 1;
                }
                continue;
            }
            let mut shard = self.shards[shard_of(vm, gpn)].lock().unwrap();
            if let Some(slot) = shard.map.remove(&(vm, gpn)) {
                shard.slab.free.push(slot);
                self.used.fetch_sub(1, Relaxed);
                stats.pages.fetch_sub(1, Relaxed);
                freed += 1;
            }
        }
        stats.frees.fetch_add(u64::from(freed), Relaxed);
        freed
    }

    /// Bytes the store holds beyond the page data itself: map tables, slab slack
    /// (chunk space not holding a live page) and free lists.
    pub fn overhead_bytes(&self) -> u64 {
        if let Some(r) = &self.regions {
            return r.overhead_bytes(self.used_pages());
        }
        let entry = std::mem::size_of::<((u64, u64), u32)>() + 1;
        let mut bytes = 0u64;
        for s in self.shards.iter() {
            let s = s.lock().unwrap();
            let live = s.map.len();
            bytes += (s.map.capacity() * entry) as u64;
            bytes += ((s.slab.chunks.len() * CHUNK_PAGES - live) * PAGE_SIZE) as u64;
            bytes += (s.slab.free.capacity() * 4 + s.slab.chunks.capacity() * 16) as u64;
        }
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(b: u8) -> Vec<u8> {
        vec![b; PAGE_SIZE]
    }

    #[test]
    fn write_read_free() {
        let s = PageStore::new(100);
        let st = s.vms().open(1, None).unwrap();
        assert!(!s.read(&st, 1, 5, |_| panic!("never written")));
        s.write(&st, 1, [5u64, 6].into_iter(), &[page(1), page(2)].concat())
            .unwrap();
        let mut got = Vec::new();
        assert!(s.read(&st, 1, 6, |p| got.extend_from_slice(p)));
        assert_eq!(got, page(2));
        // Another VM's page 6 is a different page.
        let other = s.vms().open(2, None).unwrap();
        assert!(!s.read(&other, 2, 6, |_| {}));
        assert_eq!(s.used_pages(), 2);
        assert_eq!(s.free(&st, 1, [6u64, 7].into_iter()), 1);
        assert!(!s.read(&st, 1, 6, |_| {}));
        assert_eq!(s.used_pages(), 1);
        assert_eq!(st.pages.load(Relaxed), 1);
    }

    #[test]
    fn zero_pages_are_not_stored() {
        let s = PageStore::new(10);
        let st = s.vms().open(1, None).unwrap();
        s.write(&st, 1, [1u64].into_iter(), &page(0)).unwrap();
        assert_eq!(s.used_pages(), 0);
        s.write(&st, 1, [1u64].into_iter(), &page(9)).unwrap();
        assert_eq!(s.used_pages(), 1);
        // Overwriting with zeros frees the slot; the page still reads as zeros.
        s.write(&st, 1, [1u64].into_iter(), &page(0)).unwrap();
        assert_eq!(s.used_pages(), 0);
        assert!(!s.read(&st, 1, 1, |_| {}));
    }

    #[test]
    fn a_vm_quota_bounds_one_vm_and_leaves_room_for_others() {
        let s = PageStore::with_vm_quota(10, Some(2));
        let (a, b) = (
            s.vms().open(1, None).unwrap(),
            s.vms().open(2, None).unwrap(),
        );
        s.write(&a, 1, [0u64, 1].into_iter(), &[page(1), page(1)].concat())
            .unwrap();
        let e = s.write(&a, 1, [2u64].into_iter(), &page(1)).unwrap_err();
        assert_eq!(
            e,
            StoreError::OverQuota {
                vm: 1,
                needed: 1,
                pages: 2,
                quota: 2
            }
        );
        assert!(e.to_string().contains("--vm-quota"), "{e}");
        assert_eq!(a.quota_refusals.load(Relaxed), 1);
        // Overwrites and another VM's pages still fit; a free makes room.
        s.write(&a, 1, [1u64].into_iter(), &page(2)).unwrap();
        s.write(&b, 2, [0u64, 1].into_iter(), &[page(3), page(3)].concat())
            .unwrap();
        assert_eq!(s.free(&a, 1, [0u64].into_iter()), 1);
        s.write(&a, 1, [2u64].into_iter(), &page(1)).unwrap();
        assert_eq!((a.pages.load(Relaxed), s.used_pages()), (2, 4));
    }

    #[test]
    fn capacity_is_enforced_whole_batch() {
        let s = PageStore::new(3);
        let st = s.vms().open(1, None).unwrap();
        s.write(&st, 1, [0u64, 1].into_iter(), &[page(1), page(1)].concat())
            .unwrap();
        // Two new pages do not fit in the one free page: nothing is stored.
        let e = s
            .write(&st, 1, [2u64, 3].into_iter(), &[page(2), page(2)].concat())
            .unwrap_err();
        assert_eq!(
            e,
            StoreError::OutOfCapacity {
                needed: 2,
                used: 2,
                capacity: 3
            }
        );
        assert!(!s.read(&st, 1, 2, |_| {}));
        // Overwrites need no new room even when full.
        s.write(&st, 1, [2u64].into_iter(), &page(3)).unwrap();
        s.write(
            &st,
            1,
            [0u64, 1, 2].into_iter(),
            &[page(4), page(4), page(4)].concat(),
        )
        .unwrap();
        assert_eq!(s.used_pages(), 3);
        assert!(s.write(&st, 1, [9u64].into_iter(), &page(1)).is_err());
        // Freeing makes room again, and slots are reused.
        s.free(&st, 1, [0u64].into_iter());
        s.write(&st, 1, [9u64].into_iter(), &page(1)).unwrap();
    }

    #[test]
    fn a_page_repeated_in_a_batch_needs_room_once() {
        let s = PageStore::new(1);
        let st = s.vms().open(1, None).unwrap();
        s.write(
            &st,
            1,
            [7u64, 7, 7].into_iter(),
            &[page(1), page(2), page(3)].concat(),
        )
        .unwrap();
        let mut got = Vec::new();
        assert!(s.read(&st, 1, 7, |p| got.extend_from_slice(p)));
        assert_eq!(got, page(3), "the last write of the batch wins");
        assert_eq!(s.used_pages(), 1);
    }

    #[test]
    fn bad_write_lengths_are_refused() {
        let s = PageStore::new(3);
        let st = s.vms().open(1, None).unwrap();
        assert!(matches!(
            s.write(&st, 1, [0u64, 1].into_iter(), &page(1)),
            Err(StoreError::BadWrite { pages: 2, .. })
        ));
    }

    #[test]
    fn overhead_per_page_is_small() {
        let n = 20_000u64;
        let s = PageStore::new(n);
        let st = s.vms().open(1, None).unwrap();
        for g in 0..n {
            s.write(&st, 1, [g].into_iter(), &page(1 + (g % 200) as u8))
                .unwrap();
        }
        let per_page = s.overhead_bytes() / n;
        assert!(per_page < 200, "{per_page} bytes of overhead per page");
    }
}
