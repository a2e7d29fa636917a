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
    let mut features = userfaultfd::FeatureFlags::PAGEFAULT_FLAG_WP;
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

fn install(
    uffd: &Uffd,
    addr: usize,
    counters: &RetryCounters,
    mut op: impl FnMut() -> Result<usize, UError>,
) -> Result<Installed, UffdError> {
    loop {
        match op() {
            Ok(_) => return Ok(Installed::New),
            Err(e) if is(&e, libc::EAGAIN) => {
                counters.eagain.fetch_add(1, Relaxed);
                std::thread::yield_now();
            }
            Err(e) if is(&e, libc::EEXIST) => {
                counters.eexist.fetch_add(1, Relaxed);
                uffd.wake(addr as *mut _, PAGE)
                    .map_err(|source| UffdError::Install { addr, source })?;
                return Ok(Installed::AlreadyPresent);
            }
            Err(source) => return Err(UffdError::Install { addr, source }),
        }
    }
}

/// Installs `data` (4 KiB) at `addr` and wakes the threads waiting for it.
pub fn copy_page(
    uffd: &Uffd,
    addr: usize,
    data: &[u8],
    counters: &RetryCounters,
) -> Result<Installed, UffdError> {
    assert_eq!(data.len(), PAGE);
    install(uffd, addr, counters, || {
        // SAFETY: `addr` is a page of a range registered with this userfaultfd (the
        // caller's contract) and `data` holds PAGE readable bytes.
        unsafe { uffd.copy(data.as_ptr() as *const _, addr as *mut _, PAGE, true) }
    })
}

/// Installs a zero page at `addr` and wakes the threads waiting for it.
pub fn zero_page(
    uffd: &Uffd,
    addr: usize,
    counters: &RetryCounters,
) -> Result<Installed, UffdError> {
    install(uffd, addr, counters, || {
        // SAFETY: `addr` is a page of a range registered with this userfaultfd.
        unsafe { uffd.zeropage(addr as *mut _, PAGE, true) }
    })
}

#[cfg(test)]
mod tests {
    //! The retry paths, on real userfaultfd-registered memory (no KVM needed).
    use super::*;
    use userfaultfd::Event;

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
