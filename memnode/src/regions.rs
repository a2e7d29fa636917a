//! The region layout of the page store, for nodes that serve one-sided reads
//! (`memnode --rdma`).
//!
//! Each VM has a *region* indexed by page number, as LegoOS's vRegions are:
//! page `g` of VM `v` lives at a fixed offset of chunk `g / CHUNK_PAGES` of
//! `v`'s region, so a client that knows where a chunk lies (`MapRegion`)
//! computes a page's remote address and reads it with one RDMA READ, with no
//! work on this node. A chunk is 2 MiB (512 pages) of zero-filled memory,
//! made and registered (pinned) when the VM first stores a page in it, and
//! kept until the VM leaves the node (no pages and no connections): a
//! client may hold its address for as long as its connection lives.
//!
//! - Pages never written cost nothing as long as their whole chunk holds no
//!   page; inside a chunk that exists they read as zeros.
//! - A freed page, or one overwritten with zeros, is zeroed in place, so a
//!   one-sided read of it returns zeros, as the two-sided read says.
//! - Capacity and quotas count stored (nonzero) pages, as in the hashed
//!   layout; the memory pinned is the chunks' (2 MiB per 512-page stretch a
//!   VM has touched), and it is bounded too: the node makes at most
//!   `--capacity` worth of chunks, and one VM at most `--vm-quota` worth, so
//!   a VM writing one page per stretch cannot pin more than it may store.
//!   A write that would need a chunk past those limits is refused as out of
//!   capacity.
//!
//! A write overwrites a page in place while a one-sided read of it could be
//! under way. A VMM never reads a page while it writes it back (the page is
//! `EVICTING`; a fault on it waits), and every page fetched is checked
//! against its seal (`vmm`'s `excache::seal`), so a torn read would be
//! refused, never used.

use crate::store::StoreError;
use fabric::proto::PAGE_SIZE;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Pages per chunk of a VM's region.
pub const CHUNK_PAGES: u64 = 512;
const CHUNK_BYTES: usize = CHUNK_PAGES as usize * PAGE_SIZE;
const SHARDS: usize = 64;

/// A chunk's registration for remote reads: the key, and a handle that
/// deregisters it when dropped.
pub struct Registration {
    /// The remote key.
    pub rkey: u32,
    /// Dropped to deregister.
    pub handle: Box<dyn Send + Sync>,
}

/// Why a chunk could not be registered (the device's own error).
pub type RegisterError = Box<dyn std::error::Error + Send + Sync>;

/// Registers chunks for remote reads (the RDMA device, or a test double).
pub trait Registrar: Send + Sync {
    /// Registers `len` bytes at `mem`, a new chunk of `vm`, for remote reads
    /// by `vm`'s queue pairs only.
    ///
    /// # Safety
    ///
    /// `mem..mem + len` must stay mapped until the returned registration is
    /// dropped.
    unsafe fn register(
        &self,
        vm: u64,
        mem: *mut u8,
        len: usize,
    ) -> Result<Registration, RegisterError>;
    /// `vm` left the node: its chunks are gone, its resources may go.
    fn forget(&self, vm: u64);
}

/// A chunk's memory: `CHUNK_BYTES`, zero-filled, aligned to 2 MiB (so a page
/// never straddles two of the kernel's pages, and huge pages can back it).
struct ChunkMem(std::ptr::NonNull<u8>);

// SAFETY: plain owned memory; the chunk's shard lock orders its writers.
unsafe impl Send for ChunkMem {}

const CHUNK_LAYOUT: std::alloc::Layout =
    match std::alloc::Layout::from_size_align(CHUNK_BYTES, CHUNK_BYTES) {
        Ok(l) => l,
        Err(_) => panic!("a chunk's layout is valid"),
    };

impl ChunkMem {
    fn new() -> Option<Self> {
        // SAFETY: the layout has a nonzero size.
        let p = unsafe { std::alloc::alloc_zeroed(CHUNK_LAYOUT) };
        std::ptr::NonNull::new(p).map(ChunkMem)
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `CHUNK_BYTES` bytes allocated in `new`, initialised (zeroed).
        unsafe { std::slice::from_raw_parts(self.0.as_ptr(), CHUNK_BYTES) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`; `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_ptr(), CHUNK_BYTES) }
    }
}

impl Drop for ChunkMem {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.0.as_ptr(), CHUNK_LAYOUT) };
    }
}

struct Chunk {
    // Dropped before `mem`: deregistered while still mapped.
    reg: Registration,
    mem: ChunkMem,
    present: [u64; CHUNK_PAGES as usize / 64],
}

impl Chunk {
    fn page(&self, i: usize) -> &[u8] {
        &self.mem.bytes()[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]
    }

    fn page_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.mem.bytes_mut()[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]
    }

    fn has(&self, i: usize) -> bool {
        self.present[i / 64] & (1 << (i % 64)) != 0
    }

    fn set(&mut self, i: usize, on: bool) {
        if on {
            self.present[i / 64] |= 1 << (i % 64);
        } else {
            self.present[i / 64] &= !(1 << (i % 64));
        }
    }
}

/// Chunks by (VM, chunk number).
type Shard = Mutex<HashMap<(u64, u64), Chunk>>;

/// Every VM's region, in shards by (VM, chunk).
pub struct Regions {
    shards: Box<[Shard]>,
    registrar: Box<dyn Registrar>,
    chunks: AtomicU64,
    /// Most chunks on the node (its capacity in chunks: pinned memory is
    /// bounded by `--capacity`), and for one VM (its quota, if any).
    max_chunks: u64,
    vm_max_chunks: u64,
    vm_chunks: Mutex<HashMap<u64, u64>>,
}

fn shard_of(vm: u64, chunk: u64) -> usize {
    let h = (chunk ^ vm.wrapping_mul(0x9e37_79b9_7f4a_7c15)).wrapping_mul(0xff51_afd7_ed55_8ccd);
    (h >> 58) as usize % SHARDS
}

fn split(gpn: u64) -> (u64, usize) {
    (gpn / CHUNK_PAGES, (gpn % CHUNK_PAGES) as usize)
}

impl Regions {
    /// Empty regions, registering chunks with `registrar`, pinning at most
    /// `capacity_pages` (and `vm_quota_pages` for one VM) in whole chunks.
    pub fn new(
        registrar: Box<dyn Registrar>,
        capacity_pages: u64,
        vm_quota_pages: Option<u64>,
    ) -> Self {
        Regions {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            registrar,
            chunks: AtomicU64::new(0),
            max_chunks: capacity_pages.div_ceil(CHUNK_PAGES).max(1),
            vm_max_chunks: vm_quota_pages.map_or(u64::MAX, |q| q.div_ceil(CHUNK_PAGES).max(1)),
            vm_chunks: Mutex::new(HashMap::new()),
        }
    }

    /// Counts a new chunk of `vm` against the limits.
    fn charge_chunk(&self, vm: u64) -> Result<(), StoreError> {
        let mut per_vm = self.vm_chunks.lock().unwrap();
        let mine = per_vm.entry(vm).or_default();
        let all = self.chunks.load(Relaxed);
        if all >= self.max_chunks || *mine >= self.vm_max_chunks {
            return Err(StoreError::ChunksFull {
                vm,
                vm_chunks: *mine,
                chunks: all,
                max: if *mine >= self.vm_max_chunks {
                    self.vm_max_chunks
                } else {
                    self.max_chunks
                },
            });
        }
        *mine += 1;
        self.chunks.fetch_add(1, Relaxed);
        Ok(())
    }

    fn uncharge_chunks(&self, vm: u64, n: u64) {
        if n == 0 {
            return;
        }
        let mut per_vm = self.vm_chunks.lock().unwrap();
        if let Some(c) = per_vm.get_mut(&vm) {
            *c = c.saturating_sub(n);
            if *c == 0 {
                per_vm.remove(&vm);
            }
        }
        self.chunks.fetch_sub(n, Relaxed);
    }

    /// Chunks made, all VMs (each `CHUNK_PAGES` pages, pinned).
    pub fn chunks(&self) -> u64 {
        self.chunks.load(Relaxed)
    }

    /// Where chunk `chunk` of `vm` lies: (address, length, remote key), or
    /// `None` if the VM never stored a page in it.
    pub fn place(&self, vm: u64, chunk: u64) -> Option<(u64, u64, u32)> {
        let shard = self.shards[shard_of(vm, chunk)].lock().unwrap();
        shard
            .get(&(vm, chunk))
            .map(|c| (c.mem.0.as_ptr() as u64, CHUNK_BYTES as u64, c.reg.rkey))
    }

    /// Whether `vm`'s page `gpn` is stored.
    pub fn contains(&self, vm: u64, gpn: u64) -> bool {
        let (chunk, i) = split(gpn);
        let shard = self.shards[shard_of(vm, chunk)].lock().unwrap();
        shard.get(&(vm, chunk)).is_some_and(|c| c.has(i))
    }

    /// Calls `f` with the page's data if it is stored; returns whether it was.
    pub fn read(&self, vm: u64, gpn: u64, f: impl FnOnce(&[u8])) -> bool {
        let (chunk, i) = split(gpn);
        let shard = self.shards[shard_of(vm, chunk)].lock().unwrap();
        match shard.get(&(vm, chunk)) {
            Some(c) if c.has(i) => {
                f(c.page(i));
                true
            }
            _ => false,
        }
    }

    /// Stores one page that is not all zeros, making and registering its
    /// chunk if the VM has none there yet; `reserve` is called if the page
    /// is new.
    pub fn store(
        &self,
        vm: u64,
        gpn: u64,
        page: &[u8],
        reserve: impl FnOnce() -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let (chunk, i) = split(gpn);
        let mut shard = self.shards[shard_of(vm, chunk)].lock().unwrap();
        let c = match shard.entry((vm, chunk)) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(v) => {
                self.charge_chunk(vm)?;
                let made = ChunkMem::new()
                    .ok_or_else(|| RegisterError::from("cannot allocate 2 MiB"))
                    .and_then(|mem| {
                        // SAFETY: `mem` moves into the chunk with the
                        // registration, which is dropped first (field
                        // order): it stays allocated while registered.
                        unsafe { self.registrar.register(vm, mem.0.as_ptr(), CHUNK_BYTES) }
                            .map(|reg| (reg, mem))
                    });
                let (reg, mem) = match made {
                    Ok(m) => m,
                    Err(reason) => {
                        self.uncharge_chunks(vm, 1);
                        return Err(StoreError::Register {
                            vm,
                            chunk,
                            reason: fabric::client::error_chain(&*reason),
                        });
                    }
                };
                v.insert(Chunk {
                    reg,
                    mem,
                    present: [0; CHUNK_PAGES as usize / 64],
                })
            }
        };
        if !c.has(i) {
            reserve()?;
            c.set(i, true);
        }
        c.page_mut(i).copy_from_slice(page);
        Ok(())
    }

    /// Frees a page (zeroed in place); returns whether it was stored.
    pub fn free(&self, vm: u64, gpn: u64) -> bool {
        let (chunk, i) = split(gpn);
        let mut shard = self.shards[shard_of(vm, chunk)].lock().unwrap();
        match shard.get_mut(&(vm, chunk)) {
            Some(c) if c.has(i) => {
                c.page_mut(i).fill(0);
                c.set(i, false);
                true
            }
            _ => false,
        }
    }

    /// `vm` left the node (no pages, no connections): its chunks go.
    pub fn forget(&self, vm: u64) {
        let mut dropped = 0;
        for s in self.shards.iter() {
            let mut s = s.lock().unwrap();
            let before = s.len();
            s.retain(|(v, _), _| *v != vm);
            dropped += before - s.len();
        }
        self.uncharge_chunks(vm, dropped as u64);
        self.registrar.forget(vm);
    }

    /// Bytes beyond the stored pages: chunk room holding no page, and tables.
    pub fn overhead_bytes(&self, used_pages: u64) -> u64 {
        let tables: u64 = self
            .shards
            .iter()
            .map(|s| (s.lock().unwrap().capacity() * 96) as u64)
            .sum();
        (self.chunks() * CHUNK_BYTES as u64).saturating_sub(used_pages * PAGE_SIZE as u64) + tables
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::PageStore;
    use std::sync::Arc;

    /// Registers nothing; counts chunks per VM.
    #[derive(Default)]
    struct Counting(Arc<Mutex<Vec<(u64, u64)>>>);

    impl Registrar for Counting {
        unsafe fn register(
            &self,
            vm: u64,
            mem: *mut u8,
            _len: usize,
        ) -> Result<Registration, RegisterError> {
            self.0.lock().unwrap().push((vm, mem as u64));
            Ok(Registration {
                rkey: vm as u32,
                handle: Box::new(()),
            })
        }

        fn forget(&self, vm: u64) {
            self.0.lock().unwrap().retain(|(v, _)| *v != vm);
        }
    }

    fn page(b: u8) -> Vec<u8> {
        vec![b; PAGE_SIZE]
    }

    /// What a one-sided reader sees: the bytes at the page's computed address.
    fn remote_read(s: &PageStore, vm: u64, gpn: u64) -> Option<Vec<u8>> {
        let (addr, len, _) = s.regions().unwrap().place(vm, gpn / CHUNK_PAGES)?;
        assert_eq!(len, CHUNK_BYTES as u64);
        let at = addr + (gpn % CHUNK_PAGES) * PAGE_SIZE as u64;
        // SAFETY: `at` lies in a live chunk of the store, which no one
        // writes during the test's read.
        Some(unsafe { std::slice::from_raw_parts(at as *const u8, PAGE_SIZE) }.to_vec())
    }

    #[test]
    fn a_page_lies_at_an_address_computed_from_its_number() {
        let reg = Counting::default();
        let seen = reg.0.clone();
        let s = PageStore::with_regions(4000, None, Box::new(reg));
        let st = s.vms().open(1, None).unwrap();
        let other = s.vms().open(2, None).unwrap();
        let gpns = [0u64, 1, 511, 512, 100_000];
        let data: Vec<u8> = gpns.iter().flat_map(|&g| page(g as u8 | 1)).collect();
        s.write(&st, 1, gpns.into_iter(), &data).unwrap();
        s.write(&other, 2, [1u64].into_iter(), &page(0xee)).unwrap();
        for g in gpns {
            assert_eq!(
                remote_read(&s, 1, g).unwrap(),
                page(g as u8 | 1),
                "page {g}"
            );
        }
        assert_eq!(remote_read(&s, 2, 1).unwrap(), page(0xee));
        // Three chunks for VM 1 (0, 1, 195), one for VM 2; a never-written
        // page in a chunk reads as zeros, one in no chunk has no place.
        assert_eq!(seen.lock().unwrap().len(), 4);
        assert_eq!(remote_read(&s, 1, 7).unwrap(), page(0));
        assert!(remote_read(&s, 1, 5000).is_none());
        assert_eq!(s.used_pages(), 6);
        // Zero writes and frees zero the page in place.
        s.write(&st, 1, [1u64].into_iter(), &page(0)).unwrap();
        assert_eq!(s.free(&st, 1, [511u64, 7].into_iter()), 1);
        assert_eq!(remote_read(&s, 1, 1).unwrap(), page(0));
        assert_eq!(remote_read(&s, 1, 511).unwrap(), page(0));
        assert!(!s.read(&st, 1, 511, |_| {}));
        assert_eq!(s.used_pages(), 4);
        assert_eq!(st.pages.load(Relaxed), 3);
        // The two-sided read agrees.
        let mut got = Vec::new();
        assert!(s.read(&st, 1, 100_000, |p| got.extend_from_slice(p)));
        assert_eq!(got, page(100_000u64 as u8 | 1));
    }

    #[test]
    fn pinned_chunks_are_bounded_by_capacity_and_quota() {
        // 1024 pages of capacity: two chunks on the node, one per VM (quota 512).
        let s = PageStore::with_regions(1024, Some(512), Box::new(Counting::default()));
        let a = s.vms().open(1, None).unwrap();
        let b = s.vms().open(2, None).unwrap();
        s.write(&a, 1, [0u64].into_iter(), &page(1)).unwrap();
        let e = s.write(&a, 1, [600u64].into_iter(), &page(1)).unwrap_err();
        assert!(
            matches!(
                e,
                StoreError::ChunksFull {
                    vm: 1,
                    vm_chunks: 1,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("--vm-quota"), "{e}");
        s.write(&b, 2, [600u64].into_iter(), &page(2)).unwrap();
        assert!(matches!(
            s.write(&b, 2, [5000u64].into_iter(), &page(2)),
            Err(StoreError::ChunksFull { vm: 2, .. })
        ));
        // A refused write stored nothing and counted nothing.
        assert_eq!((s.used_pages(), a.pages.load(Relaxed)), (2, 1));
        assert_eq!(s.regions().unwrap().chunks(), 2);
    }

    #[test]
    fn capacity_counts_pages_and_a_vm_that_leaves_frees_its_chunks() {
        let reg = Counting::default();
        let seen = reg.0.clone();
        let s = PageStore::with_regions(2, None, Box::new(reg));
        let st = s.vms().open(1, None).unwrap();
        s.write(&st, 1, [3u64, 4].into_iter(), &[page(1), page(2)].concat())
            .unwrap();
        assert!(matches!(
            s.write(&st, 1, [5u64].into_iter(), &page(3)),
            Err(StoreError::OutOfCapacity { .. })
        ));
        s.write(&st, 1, [4u64].into_iter(), &page(9)).unwrap();
        assert_eq!(s.free(&st, 1, [3u64, 4].into_iter()), 2);
        assert_eq!(s.used_pages(), 0);
        assert_eq!(s.regions().unwrap().chunks(), 1, "kept while connected");
        s.close_session(1, st);
        assert_eq!(s.regions().unwrap().chunks(), 0);
        assert!(seen.lock().unwrap().is_empty());
    }
}
