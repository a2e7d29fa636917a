//! Host-thread accesses to guest RAM during eviction.
//!
//! vCPU writes to a page under eviction fail with `EFAULT` in `KVM_RUN` (see
//! [`super::evict`]). VMM threads that touch guest RAM directly — the kernel and
//! initrd loader, virtio devices reading descriptors and copying buffers — would
//! instead get `SIGSEGV` from the write protection of step 1 of the eviction
//! protocol. This module installs a `SIGSEGV` handler that recognises such a fault
//! (the address lies in a registered arena whose page is `EVICTING`), waits until
//! the batch has finished with that page, and returns: the faulting instruction is
//! retried, now against an absent page, which userfaultfd fetches back (with the
//! data written back during the eviction). Any other `SIGSEGV` goes to the handler
//! that was installed before (Rust's stack-overflow handler, or the default).
//!
//! Host writes do not appear in the KVM dirty log, so a cache whose arena is
//! written by host threads checks every victim's content fingerprint
//! ([`super::CacheConfig::host_writes`]) instead of trusting the log.

use super::{EVICTING, Shared};
use std::sync::Mutex;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering::*};

/// Most caches guarded at once in one process.
const SLOTS: usize = 8;

struct Slot {
    base: AtomicUsize,
    len: AtomicUsize,
    shared: AtomicPtr<Shared>,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    base: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    shared: AtomicPtr::new(std::ptr::null_mut()),
};
static SLOTS_TABLE: [Slot; SLOTS] = [EMPTY; SLOTS];
static INSTALL: Mutex<bool> = Mutex::new(false);
/// Host accesses that waited for an eviction batch (process-wide).
static HOST_WAITS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static mut PREVIOUS: std::mem::MaybeUninit<libc::sigaction> = std::mem::MaybeUninit::uninit();

/// Guard registration failures.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// Too many caches in one process.
    #[error("more than {SLOTS} guest memory arenas in one process")]
    Full,
    /// sigaction failed.
    #[error("cannot install the SIGSEGV handler for guest memory")]
    Sigaction(#[source] std::io::Error),
}

/// A registered arena; unregistered on drop.
pub(crate) struct Registration(usize);

impl Drop for Registration {
    fn drop(&mut self) {
        let s = &SLOTS_TABLE[self.0];
        s.len.store(0, SeqCst);
        s.base.store(0, SeqCst);
        s.shared.store(std::ptr::null_mut(), SeqCst);
    }
}

/// Registers the arena of `shared`. `shared` must outlive the returned
/// registration (the cache keeps both and drops the registration first).
pub(crate) fn register(shared: &Shared) -> Result<Registration, GuardError> {
    let mut installed = INSTALL.lock().unwrap();
    if !*installed {
        install()?;
        *installed = true;
    }
    for (i, s) in SLOTS_TABLE.iter().enumerate() {
        if s.shared
            .compare_exchange(
                std::ptr::null_mut(),
                shared as *const Shared as *mut Shared,
                SeqCst,
                SeqCst,
            )
            .is_ok()
        {
            s.base.store(shared.host_base, SeqCst);
            s.len.store(shared.pages * super::uffd::PAGE, SeqCst);
            return Ok(Registration(i));
        }
    }
    Err(GuardError::Full)
}

fn install() -> Result<(), GuardError> {
    // SAFETY: a zeroed sigaction is a valid starting value; we fill in the handler,
    // flags and an empty mask. PREVIOUS is written only here, once, under INSTALL,
    // before the new handler can run, and read only by the handler afterwards.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_segv as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_NODEFER;
        libc::sigemptyset(&mut sa.sa_mask);
        let prev = (&raw mut PREVIOUS).cast::<libc::sigaction>();
        if libc::sigaction(libc::SIGSEGV, &sa, prev) != 0 {
            return Err(GuardError::Sigaction(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// How many host accesses to guest RAM have waited for an eviction batch in
/// this process.
pub fn host_waits() -> u64 {
    HOST_WAITS.load(Relaxed)
}

/// Finds the page state of `addr` if it lies in a registered arena.
fn state_of(addr: usize) -> Option<&'static std::sync::atomic::AtomicU8> {
    for s in &SLOTS_TABLE {
        let base = s.base.load(SeqCst);
        let len = s.len.load(SeqCst);
        if len != 0 && addr >= base && addr < base + len {
            let shared = s.shared.load(SeqCst);
            if shared.is_null() {
                return None;
            }
            // SAFETY: a registered Shared outlives its registration (see
            // `register`), and the slot is cleared before it is dropped.
            let shared: &'static Shared = unsafe { &*shared };
            return Some(&shared.state[(addr - base) / super::uffd::PAGE]);
        }
    }
    None
}

extern "C" fn on_segv(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    if let Some(state) = state_of(addr) {
        HOST_WAITS.fetch_add(1, Relaxed);
        // Only atomics and nanosleep here: async-signal-safe. The arena is never
        // write-protected except by an eviction batch, so a fault in it means the
        // page is (or was, a moment ago) being evicted: wait, then retry.
        let mut spins = 0u32;
        while state.load(Acquire) == EVICTING {
            spins += 1;
            if spins > 64 {
                let ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 50_000,
                };
                // SAFETY: nanosleep with a valid timespec is async-signal-safe.
                unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
            } else {
                std::hint::spin_loop();
            }
        }
        return;
    }
    // Not ours: hand over to the previous handler.
    // SAFETY: PREVIOUS was initialised by `install` before this handler could run.
    let prev = unsafe { (&raw const PREVIOUS).cast::<libc::sigaction>().read() };
    if prev.sa_sigaction == libc::SIG_DFL || prev.sa_sigaction == libc::SIG_IGN {
        // SAFETY: restoring the default action and re-raising is the standard way
        // to die of the original signal.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
            libc::raise(sig);
        }
    } else if prev.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the previous handler was installed with SA_SIGINFO, so it has
        // this signature.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(prev.sa_sigaction) };
        f(sig, info, ctx);
    } else {
        // SAFETY: a plain handler takes only the signal number.
        let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(prev.sa_sigaction) };
        f(sig);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_outside_any_arena_are_not_claimed() {
        assert!(state_of(0x1000).is_none());
    }
}
