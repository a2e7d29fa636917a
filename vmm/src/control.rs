//! Run control shared by the vCPU threads and the API: pause/resume and kicking
//! vCPUs out of `KVM_RUN`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Pause state and the vCPU threads to kick.
#[derive(Default)]
pub struct RunControl {
    paused: Mutex<bool>,
    cv: Condvar,
    parked: AtomicUsize,
    threads: Mutex<Vec<libc::pthread_t>>,
    /// Set when the run must end; vCPUs return at their next exit.
    pub stop: AtomicBool,
}

impl RunControl {
    /// Registers a vCPU thread for kicks.
    pub fn add_thread(&self, t: libc::pthread_t) {
        self.threads.lock().unwrap().push(t);
    }

    /// Interrupts every registered vCPU thread's `KVM_RUN` (a no-op signal).
    pub fn kick_all(&self) {
        for &t in self.threads.lock().unwrap().iter() {
            // SAFETY: pthread_kill of a thread of this process with a signal whose
            // handler is a no-op. A thread that has exited is never signalled: the
            // VM joins its vCPU threads only after the API and the kicker stop.
            unsafe { libc::pthread_kill(t, vmm_sys_util::signal::SIGRTMIN()) };
        }
    }

    /// Pauses (true) or resumes (false) the vCPUs.
    pub fn set_paused(&self, paused: bool) {
        *self.paused.lock().unwrap() = paused;
        self.cv.notify_all();
        if paused {
            self.kick_all();
        }
    }

    /// True if a pause is requested.
    pub fn is_paused(&self) -> bool {
        *self.paused.lock().unwrap()
    }

    /// vCPUs currently parked by a pause.
    pub fn parked(&self) -> usize {
        self.parked.load(SeqCst)
    }

    /// Called by a vCPU before entering the guest: blocks while paused.
    pub fn wait_if_paused(&self) {
        let mut p = self.paused.lock().unwrap();
        if !*p {
            return;
        }
        self.parked.fetch_add(1, SeqCst);
        while *p && !self.stop.load(SeqCst) {
            p = self
                .cv
                .wait_timeout(p, Duration::from_millis(50))
                .unwrap()
                .0;
        }
        self.parked.fetch_sub(1, SeqCst);
    }
}
