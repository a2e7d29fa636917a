//! The ideal fabric: a memory node inside the calling process, standing for a
//! perfect interconnect.
//!
//! A [`PageClient`](super::PageClient) made with
//! [`PageClient::ideal`](super::PageClient::ideal) keeps its pages here: a write
//! copies the pages in, a read copies them out. There is no network, no protocol
//! encoding, no node process and no thread hand-off, so a page moves at the cost of
//! one `memcpy`, the least any fabric can cost. Its use is as a baseline: run the
//! same VM over a memory node and over the ideal fabric, and the difference is what
//! the fabric costs; what remains is the VMM's (and the kernel's) own cost of
//! faulting, installing and evicting pages. With a link model, each request is
//! delayed as on a link (latency, plus serialisation of the frames a real link
//! would carry), so an interconnect can be emulated without paying for a real
//! transport's CPU time.
//!
//! The store is one private anonymous mapping of `capacity` pages, reserved
//! without swap accounting (`MAP_NORESERVE`) and touched only where pages are
//! written, so its memory use is the pages it holds; freed pages are returned
//! with `MADV_DONTNEED`.

use crate::proto::{PAGE_SIZE, StatsReply};
use std::ptr::NonNull;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Lock stripes: accesses to one page are serialised by stripe `gpn % STRIPES`.
const STRIPES: usize = 256;

/// Why an ideal store could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum IdealError {
    /// A store must hold at least one page.
    #[error("an ideal memory node needs a capacity of at least one page")]
    ZeroCapacity,
    /// Reserving the address space failed.
    #[error("cannot reserve {bytes} bytes of address space for an ideal memory node")]
    Reserve {
        /// The size asked for.
        bytes: usize,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The store's instance number could not be drawn.
    #[error("cannot draw the ideal node's instance number")]
    Random(#[source] crate::auth::KeyError),
    /// A page number beyond the store.
    #[error("page {gpn} is beyond the ideal memory node's {capacity} pages")]
    OutOfRange {
        /// The page asked for.
        gpn: u64,
        /// The store's capacity in pages.
        capacity: u64,
    },
}

/// An in-process page store.
pub(crate) struct IdealStore {
    base: NonNull<u8>,
    capacity: u64,
    /// One bit per page: it holds data.
    present: Box<[AtomicU64]>,
    locks: Box<[Mutex<()>]>,
    stored: AtomicU64,
    reads: AtomicU64,
    zero_reads: AtomicU64,
    writes: AtomicU64,
    frees: AtomicU64,
}

// SAFETY: the mapping behind `base` is owned by the store for its whole life and
// is only accessed through `&self` methods that serialise the accesses to each
// page with that page's stripe lock, so sharing and sending the store between
// threads cannot race on its bytes.
unsafe impl Send for IdealStore {}
// SAFETY: as for `Send` above.
unsafe impl Sync for IdealStore {}

impl IdealStore {
    /// Reserves a store of `capacity` pages.
    pub(crate) fn new(capacity: u64) -> Result<Self, IdealError> {
        if capacity == 0 {
            return Err(IdealError::ZeroCapacity);
        }
        let bytes = usize::try_from(capacity)
            .ok()
            .and_then(|c| c.checked_mul(PAGE_SIZE))
            .ok_or(IdealError::Reserve {
                bytes: usize::MAX,
                source: std::io::Error::from_raw_os_error(libc::ENOMEM),
            })?;
        // SAFETY: a new private anonymous mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(IdealError::Reserve {
                bytes,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(IdealStore {
            base: NonNull::new(p.cast()).expect("mmap returned a null mapping"),
            capacity,
            present: (0..capacity.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            locks: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            stored: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            zero_reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            frees: AtomicU64::new(0),
        })
    }

    /// The store's capacity in pages.
    pub(crate) fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Checks that every page of a request is in the store.
    pub(crate) fn check(&self, gpns: impl IntoIterator<Item = u64>) -> Result<(), IdealError> {
        match gpns.into_iter().find(|&g| g >= self.capacity) {
            Some(gpn) => Err(IdealError::OutOfRange {
                gpn,
                capacity: self.capacity,
            }),
            None => Ok(()),
        }
    }

    fn page_ptr(&self, gpn: u64) -> *mut u8 {
        assert!(gpn < self.capacity, "page {gpn} outside the ideal store");
        // SAFETY: `gpn < capacity`, so the offset is inside the mapping.
        unsafe { self.base.as_ptr().add(gpn as usize * PAGE_SIZE) }
    }

    fn bit(&self, gpn: u64) -> (&AtomicU64, u64) {
        (&self.present[(gpn / 64) as usize], 1 << (gpn % 64))
    }

    /// Stores `data` (one page) as page `gpn` (checked in range by the caller).
    pub(crate) fn write(&self, gpn: u64, data: &[u8]) {
        assert_eq!(data.len(), PAGE_SIZE);
        let dst = self.page_ptr(gpn);
        let _g = self.locks[gpn as usize % STRIPES].lock().unwrap();
        // SAFETY: `dst` is one page inside the mapping (checked by `page_ptr`), the
        // source is a whole page (asserted above) that cannot overlap the
        // store's private mapping, and the stripe lock held excludes every other
        // access to this page.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, PAGE_SIZE) };
        let (word, mask) = self.bit(gpn);
        if word.fetch_or(mask, Relaxed) & mask == 0 {
            self.stored.fetch_add(1, Relaxed);
        }
        self.writes.fetch_add(1, Relaxed);
    }

    /// Copies page `gpn` into `out` (one page); a page never written reads as
    /// zeros. Returns whether it held data.
    pub(crate) fn read(&self, gpn: u64, out: &mut [u8]) -> bool {
        assert_eq!(out.len(), PAGE_SIZE);
        let src = self.page_ptr(gpn);
        let _g = self.locks[gpn as usize % STRIPES].lock().unwrap();
        let (word, mask) = self.bit(gpn);
        self.reads.fetch_add(1, Relaxed);
        if word.load(Relaxed) & mask == 0 {
            self.zero_reads.fetch_add(1, Relaxed);
            out.fill(0);
            return false;
        }
        // SAFETY: `src` is one page inside the mapping, `out` is a whole page
        // (asserted above) borrowed mutably so it cannot overlap the store, and the
        // stripe lock excludes concurrent writes to this page.
        unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), PAGE_SIZE) };
        true
    }

    /// Forgets page `gpn` and returns its memory; true if it held data.
    pub(crate) fn free(&self, gpn: u64) -> bool {
        let p = self.page_ptr(gpn);
        let _g = self.locks[gpn as usize % STRIPES].lock().unwrap();
        let (word, mask) = self.bit(gpn);
        if word.fetch_and(!mask, Relaxed) & mask == 0 {
            return false;
        }
        // SAFETY: one whole page of the store's own mapping, not borrowed by
        // anyone (the stripe lock is held); it reads as zeros afterwards.
        unsafe { libc::madvise(p.cast(), PAGE_SIZE, libc::MADV_DONTNEED) };
        self.stored.fetch_sub(1, Relaxed);
        self.frees.fetch_add(1, Relaxed);
        true
    }

    /// The counters, in the shape a memory node reports them.
    pub(crate) fn stats(&self) -> StatsReply {
        let stored = self.stored.load(Relaxed);
        StatsReply {
            vm_pages: stored,
            vm_reads: self.reads.load(Relaxed),
            vm_zero_reads: self.zero_reads.load(Relaxed),
            vm_writes: self.writes.load(Relaxed),
            vm_frees: self.frees.load(Relaxed),
            node_pages: stored,
            node_capacity_pages: self.capacity,
            node_vms: u64::from(stored > 0),
            node_connections: 1,
            node_errors: 0,
            node_overhead_bytes: (self.present.len() * 8
                + self.locks.len() * std::mem::size_of::<Mutex<()>>())
                as u64,
            vm_quota_pages: 0,
        }
    }
}

impl Drop for IdealStore {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, with its length; nothing borrows it
        // once the store is being dropped.
        unsafe {
            libc::munmap(
                self.base.as_ptr().cast(),
                self.capacity as usize * PAGE_SIZE,
            )
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_round_trip_free_and_stay_in_range() {
        let s = IdealStore::new(100).unwrap();
        let mut out = vec![1u8; PAGE_SIZE];
        assert!(!s.read(7, &mut out), "a page never written is absent");
        assert!(out.iter().all(|&b| b == 0), "and reads as zeros");
        let page: Vec<u8> = (0..PAGE_SIZE).map(|i| (i % 251) as u8).collect();
        s.write(7, &page);
        s.write(99, &page);
        assert!(s.read(7, &mut out));
        assert_eq!(out, page);
        assert_eq!(s.stats().node_pages, 2);
        assert!(s.free(7));
        assert!(!s.free(7), "freeing twice frees nothing");
        assert!(!s.read(7, &mut out));
        assert!(out.iter().all(|&b| b == 0), "a freed page reads as zeros");
        let st = s.stats();
        assert_eq!((st.node_pages, st.vm_frees, st.vm_writes), (1, 1, 2));
        assert!(matches!(
            s.check([5, 100]),
            Err(IdealError::OutOfRange {
                gpn: 100,
                capacity: 100
            })
        ));
        assert!(s.check([0, 99]).is_ok());
        assert!(matches!(IdealStore::new(0), Err(IdealError::ZeroCapacity)));
    }

    #[test]
    fn a_client_of_an_ideal_node_moves_pages_names_bad_ones_and_models_the_link() {
        use crate::client::{ClientConfig, ClientError, PageClient, error_chain};
        let c = PageClient::ideal("ideal:t", 64, &ClientConfig::default()).unwrap();
        assert_eq!(c.node().capacity_pages, 64);
        let a = vec![0xa5u8; PAGE_SIZE];
        let b = vec![0x5au8; PAGE_SIZE];
        c.write_pages(&[(3, &a), (4, &b)]).unwrap();
        let mut out = vec![0u8; 3 * PAGE_SIZE];
        let present = c.read_pages(&[4, 3, 5], &mut out).unwrap();
        assert_eq!(present.0, 0b011, "pages 4 and 3 present, 5 never written");
        assert_eq!(&out[..PAGE_SIZE], &b[..]);
        assert_eq!(&out[PAGE_SIZE..2 * PAGE_SIZE], &a[..]);
        assert!(out[2 * PAGE_SIZE..].iter().all(|&x| x == 0));
        assert_eq!(c.free_pages(&[3, 5]).unwrap(), 1);
        assert_eq!(c.stats().unwrap().vm_pages, 1);
        let e = c.write_pages(&[(64, &a)]).unwrap_err();
        assert!(matches!(e, ClientError::Ideal { .. }), "{e:?}");
        let msg = error_chain(&e);
        assert!(msg.contains("ideal:t") && msg.contains("page 64"), "{msg}");
        let mut wrong = vec![0u8; PAGE_SIZE];
        assert!(
            c.read_pages(&[1, 2], &mut wrong).is_err(),
            "a short buffer is refused"
        );

        let config = ClientConfig {
            link_model: "latency=2ms".parse().unwrap(),
            ..ClientConfig::default()
        };
        let slow = PageClient::ideal("ideal", 8, &config).unwrap();
        let t = std::time::Instant::now();
        slow.read_page(1, &mut wrong).unwrap();
        assert!(
            t.elapsed() >= std::time::Duration::from_millis(4),
            "a read crosses a 2 ms link twice: {:?}",
            t.elapsed()
        );
    }
}
