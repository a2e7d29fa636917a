//! userfaultfd plumbing with the error paths that bite:
//! - `UFFDIO_COPY`/`UFFDIO_ZEROPAGE` fail with `EAGAIN` while the address space is
//!   changing (a non-cooperative event such as `UFFD_EVENT_REMOVE` is pending): retry.
//! - they fail with `EEXIST` when the page is already there (another handler, or a
//!   prefetch, installed it first): the faulting thread may still be waiting, so
//!   wake it with `UFFDIO_WAKE`.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use userfaultfd::{Error as UError, Uffd, UffdBuilder};

/// Page size handled.
pub const PAGE: usize = 4096;

/// userfaultfd failures.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// Creating the userfaultfd failed.
    #[error(
        "cannot create a userfaultfd (needs root or /dev/userfaultfd access, or vm.unprivileged_userfaultfd=1)"
    )]
    Create(#[source] UError),
    /// Registering the arena failed.
    #[error("cannot register guest memory with userfaultfd")]
    Register(#[source] UError),
    /// Installing a page failed.
    #[error("cannot install the page at {addr:#x}")]
    Install {
        /// Host address.
        addr: usize,
        /// Why.
        #[source]
        source: UError,
    },
}

/// What an install did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Installed {
    /// The page was installed and its waiters woken.
    New,
    /// The page was already present; its waiters were woken.
    AlreadyPresent,
}

/// Counters of the retry paths.
#[derive(Debug, Default)]
pub struct RetryCounters {
    /// `EAGAIN` retries.
    pub eagain: AtomicU64,
    /// `EEXIST` outcomes.
    pub eexist: AtomicU64,
}

/// Creates a userfaultfd that catches kernel-mode faults too (KVM's accesses to
/// guest memory come from the kernel), non-blocking so several threads can poll it.
pub fn create(remove_events: bool) -> Result<Uffd, UffdError> {
    let mut b = UffdBuilder::new();
    b.close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(false);
    // Write-protect faults on anonymous memory: the eviction protocol's lock.
    // The faulting thread's id: the prefetcher tells vCPUs' streams apart.
    let mut features =
        userfaultfd::FeatureFlags::PAGEFAULT_FLAG_WP | userfaultfd::FeatureFlags::THREAD_ID;
    if remove_events {
        features |= userfaultfd::FeatureFlags::EVENT_REMOVE;
    }
    b.require_features(features);
    b.create().map_err(UffdError::Create)
}

fn is(e: &UError, errno: i32) -> bool {
    match e {
        UError::CopyFailed(n) | UError::ZeropageFailed(n) => *n as i32 == errno,
        UError::PartiallyCopied(_) => errno == libc::EAGAIN,
        _ => false,
    }
}

/// Runs one install operation over `[addr, addr + len)` until every page is
/// there: a partial copy (`EAGAIN` with progress) continues after the pages done;
/// `EAGAIN` without progress is retried; a page already present (`EEXIST`) has
/// its waiters woken and is skipped. `op(offset)` installs from `offset` to the end.
fn install(
    uffd: &Uffd,
    addr: usize,
    len: usize,
    counters: &RetryCounters,
    mut op: impl FnMut(usize) -> Result<usize, UError>,
) -> Result<Installed, UffdError> {
    let mut off = 0;
    let mut outcome = Installed::New;
    while off < len {
        match op(off) {
            Ok(n) if n > 0 && n <= len - off => off += n,
            Ok(_) => {
                counters.eagain.fetch_add(1, Relaxed);
                std::thread::yield_now();
            }
            // (The crate reports a plain EAGAIN as a "partial copy" of the
            // negative error code: only a count within the range is progress.)
            Err(UError::PartiallyCopied(n)) if n > 0 && n <= len - off => off += n,
            Err(e) if is(&e, libc::EAGAIN) => {
                counters.eagain.fetch_add(1, Relaxed);
                std::thread::yield_now();
            }
            Err(e) if is(&e, libc::EEXIST) => {
                counters.eexist.fetch_add(1, Relaxed);
                let at = addr + off;
                uffd.wake(at as *mut _, PAGE)
                    .map_err(|source| UffdError::Install { addr: at, source })?;
                outcome = Installed::AlreadyPresent;
                off += PAGE;
            }
            Err(source) => {
                return Err(UffdError::Install {
                    addr: addr + off,
                    source,
                });
            }
        }
    }
    Ok(outcome)
}

/// Installs `data` (a whole number of pages) at `addr` with one `UFFDIO_COPY`
/// where possible, and wakes the threads waiting for those pages. If some were
/// already present, the rest are installed and `AlreadyPresent` is returned.
///
/// # Safety
///
/// `[addr, addr + data.len())` must be whole pages inside a range registered
/// with `uffd`, mapped until this returns. The kernel writes `data` there (into
/// the pages not present), bypassing Rust: the caller vouches that the address
/// is that memory and nothing else (an unmapped range whose addresses were
/// reused would be written instead).
pub unsafe fn copy_pages(
    uffd: &Uffd,
    addr: usize,
    data: &[u8],
    counters: &RetryCounters,
) -> Result<Installed, UffdError> {
    assert!(!data.is_empty() && data.len() % PAGE == 0);
    install(uffd, addr, data.len(), counters, |off| {
        // SAFETY: `[addr, addr + data.len())` are pages of a range registered with
        // this userfaultfd and mapped (this function's contract), and `data`
        // holds that many readable bytes.
        unsafe {
            uffd.copy(
                data.as_ptr().add(off) as *const _,
                (addr + off) as *mut _,
                data.len() - off,
                true,
            )
        }
    })
}

/// Zeros copied from for private zero pages.
static ZEROS: [u8; 64 * PAGE] = [0; 64 * PAGE];

/// Installs `n` pages of zeros at `addr` and wakes the threads waiting for them.
///
/// `private: false` maps the shared zero page (`UFFDIO_ZEROPAGE`): no memory is
/// used until the page is written, but the first write then takes a second,
/// copy-on-write fault. `private: true` installs private zeroed pages
/// (`UFFDIO_COPY` from zeros), writable at once: the right choice for a page
/// about to be written, and the only kind KVM maps several at a time.
///
/// # Safety
///
/// As for [`copy_pages`]: `[addr, addr + n pages)` must be whole pages inside a
/// range registered with `uffd`, mapped until this returns.
pub unsafe fn zero_pages(
    uffd: &Uffd,
    addr: usize,
    n: usize,
    private: bool,
    counters: &RetryCounters,
) -> Result<Installed, UffdError> {
    let mut outcome = Installed::New;
    if private {
        for first in (0..n).step_by(64) {
            let k = (n - first).min(64);
            // SAFETY: pages `first..first + k` of `[addr, addr + n pages)`, which
            // are registered and mapped (this function's contract).
            let installed =
                unsafe { copy_pages(uffd, addr + first * PAGE, &ZEROS[..k * PAGE], counters) }?;
            if installed == Installed::AlreadyPresent {
                outcome = Installed::AlreadyPresent;
            }
        }
        return Ok(outcome);
    }
    install(uffd, addr, n * PAGE, counters, |off| {
        // SAFETY: `[addr, addr + n pages)` are pages of a range registered with
        // this userfaultfd and mapped (this function's contract).
        unsafe { uffd.zeropage((addr + off) as *mut _, n * PAGE - off, true) }
    })
}

#[cfg(test)]
mod tests {
    //! The retry paths, on real userfaultfd-registered memory (no KVM needed).
    use super::*;
    use userfaultfd::Event;

    fn copy_page(
        uffd: &Uffd,
        addr: usize,
        data: &[u8],
        counters: &RetryCounters,
    ) -> Result<Installed, UffdError> {
        assert_eq!(data.len(), PAGE);
        // SAFETY: the tests pass a page of a live `Region` registered with `uffd`.
        unsafe { copy_pages(uffd, addr, data, counters) }
    }

    fn zero_page(
        uffd: &Uffd,
        addr: usize,
        counters: &RetryCounters,
    ) -> Result<Installed, UffdError> {
        // SAFETY: the tests pass a page of a live `Region` registered with `uffd`.
        unsafe { zero_pages(uffd, addr, 1, false, counters) }
    }

    struct Region(usize, usize);
    impl Region {
        fn new(pages: usize) -> Self {
            // SAFETY: a fresh private anonymous mapping, unmapped on drop.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    pages * PAGE,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            Region(p as usize, pages * PAGE)
        }
    }
    impl Drop for Region {
        fn drop(&mut self) {
            // SAFETY: unmapping the mapping made in `new`.
            unsafe { libc::munmap(self.0 as *mut _, self.1) };
        }
    }

    fn uffd_over(r: &Region, remove_events: bool) -> Uffd {
        let u = create(remove_events).expect("userfaultfd (these tests run as root)");
        u.register(r.0 as *mut _, r.1).unwrap();
        u
    }

    #[test]
    fn eexist_wakes_and_reports_already_present() {
        let r = Region::new(2);
        let u = uffd_over(&r, false);
        let c = RetryCounters::default();
        let page = vec![7u8; PAGE];
        assert_eq!(copy_page(&u, r.0, &page, &c).unwrap(), Installed::New);
        assert_eq!(
            copy_page(&u, r.0, &page, &c).unwrap(),
            Installed::AlreadyPresent
        );
        assert_eq!(zero_page(&u, r.0, &c).unwrap(), Installed::AlreadyPresent);
        assert_eq!(c.eexist.load(Relaxed), 2);
        // SAFETY: the page is installed and the mapping live.
        assert_eq!(unsafe { *(r.0 as *const u8) }, 7);
    }

    #[test]
    fn runs_install_around_a_page_already_present() {
        let r = Region::new(8);
        let u = uffd_over(&r, false);
        let c = RetryCounters::default();
        copy_page(&u, r.0 + 3 * PAGE, &vec![9u8; PAGE], &c).unwrap();
        let data: Vec<u8> = (0..8 * PAGE).map(|i| (i / PAGE) as u8 + 1).collect();
        // SAFETY: the 8 pages of `r`, live and registered with `u`.
        let installed = unsafe { copy_pages(&u, r.0, &data, &c) }.unwrap();
        assert_eq!(installed, Installed::AlreadyPresent);
        assert_eq!(c.eexist.load(Relaxed), 1);
        for p in 0..8 {
            // SAFETY: every page of the mapping is installed now.
            let b = unsafe { *((r.0 + p * PAGE + 100) as *const u8) };
            assert_eq!(b, if p == 3 { 9 } else { p as u8 + 1 }, "page {p}");
        }
        // Zero runs, private and shared, also skip present pages.
        let z = Region::new(130);
        let uz = uffd_over(&z, false);
        copy_page(&uz, z.0 + 70 * PAGE, &vec![5u8; PAGE], &c).unwrap();
        // SAFETY: pages 0..100 of `z` (130 pages, live, registered with `uz`).
        let installed = unsafe { zero_pages(&uz, z.0, 100, true, &c) }.unwrap();
        assert_eq!(installed, Installed::AlreadyPresent);
        // SAFETY: pages 100..130 of `z`.
        let installed = unsafe { zero_pages(&uz, z.0 + 100 * PAGE, 30, false, &c) }.unwrap();
        assert_eq!(installed, Installed::New);
        for p in 0..130 {
            // SAFETY: pages 0..130 are installed.
            let b = unsafe { *((z.0 + p * PAGE + 8) as *const u8) };
            assert_eq!(b, if p == 70 { 5 } else { 0 }, "page {p}");
        }
        // A private zero page is writable without a copy-on-write fault; writing
        // it must not disturb its neighbours.
        // SAFETY: page 1 is installed and the mapping writable.
        unsafe { *((z.0 + PAGE) as *mut u8) = 1 };
        // SAFETY: as above.
        assert_eq!(unsafe { *((z.0 + 2 * PAGE) as *const u8) }, 0);
    }

    #[test]
    fn a_faulting_thread_is_woken_by_the_install() {
        let r = Region::new(1);
        let u = uffd_over(&r, false);
        let addr = r.0;
        let t = std::thread::spawn(move || {
            // SAFETY: reading a mapped page; the fault is served by the test thread.
            unsafe { std::ptr::read_volatile(addr as *const u8) }
        });
        let ev = loop {
            match u.read_event().unwrap() {
                Some(e) => break e,
                None => std::thread::sleep(std::time::Duration::from_millis(1)),
            }
        };
        assert!(matches!(ev, Event::Pagefault { addr: a, .. } if a as usize == addr));
        copy_page(&u, addr, &vec![42u8; PAGE], &RetryCounters::default()).unwrap();
        assert_eq!(t.join().unwrap(), 42);
    }

    #[test]
    fn remove_events_and_eagain_while_one_is_pending() {
        let r = Region::new(2);
        let u = uffd_over(&r, true);
        let c = RetryCounters::default();
        copy_page(&u, r.0, &vec![1u8; PAGE], &c).unwrap();
        // Our own MADV_DONTNEED raises UFFD_EVENT_REMOVE and blocks until it is read.
        let (start, len) = (r.0, PAGE);
        let t = std::thread::spawn(move || {
            // SAFETY: discarding a page of the live mapping.
            unsafe { libc::madvise(start as *mut _, len, libc::MADV_DONTNEED) }
        });
        // While the event is pending, installs fail with EAGAIN; `copy_page` retries,
        // so read the event from another thread to let the retry succeed.
        std::thread::sleep(std::time::Duration::from_millis(50));
        let u2 = &u;
        std::thread::scope(|s| {
            let reader = s.spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(50));
                loop {
                    match u2.read_event().unwrap() {
                        Some(Event::Remove { start: s0, .. }) => return Some(s0 as usize),
                        Some(_) => return None,
                        None => std::thread::sleep(std::time::Duration::from_millis(1)),
                    }
                }
            });
            copy_page(&u, r.0 + PAGE, &vec![2u8; PAGE], &c).unwrap();
            let removed = reader.join().unwrap();
            assert_eq!(
                removed,
                Some(start),
                "expected a remove event for our discard"
            );
        });
        assert_eq!(t.join().unwrap(), 0);
        assert!(
            c.eagain.load(Relaxed) > 0,
            "no EAGAIN seen while a remove event was pending"
        );
        // The discarded page faults again (a fresh MISSING fault), the other is intact.
        // SAFETY: reading the installed page.
        assert_eq!(unsafe { *((r.0 + PAGE) as *const u8) }, 2);
    }
}
