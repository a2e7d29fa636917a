//! Run control shared by the vCPU threads and the API: pause/resume and kicking
//! vCPUs out of `KVM_RUN`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// A vCPU thread, as kicks see it.
#[derive(Debug, Clone, Copy, Default)]
enum Kickable {
    /// Not registered yet.
    #[default]
    NotYet,
    /// Running: kicks reach it.
    Live(libc::pthread_t),
    /// It has returned (or is returning): kicks never reach it again.
    Returned,
}

/// Pause state and the vCPU threads to kick.
#[derive(Default)]
pub struct RunControl {
    paused: Mutex<bool>,
    cv: Condvar,
    parked: AtomicUsize,
    /// By vCPU index.
    threads: Mutex<Vec<Kickable>>,
    /// Set when the run must end; vCPUs return at their next exit.
    pub stop: AtomicBool,
}

impl RunControl {
    /// Registers vCPU `vcpu`'s thread `t` for kicks, unless it has already
    /// returned ([`RunControl::thread_returned`]): a thread registered by its
    /// spawner may run to its end before it is registered.
    pub fn add_thread(&self, vcpu: usize, t: libc::pthread_t) {
        let mut threads = self.threads.lock().unwrap();
        if threads.len() <= vcpu {
            threads.resize(vcpu + 1, Kickable::NotYet);
        }
        if let Kickable::NotYet = threads[vcpu] {
            threads[vcpu] = Kickable::Live(t);
        }
    }

    /// Called by vCPU `vcpu`'s thread before it returns: no kick reaches it
    /// from then on (so none can reach it once it is joined or detached).
    pub fn thread_returned(&self, vcpu: usize) {
        let mut threads = self.threads.lock().unwrap();
        if threads.len() <= vcpu {
            threads.resize(vcpu + 1, Kickable::NotYet);
        }
        threads[vcpu] = Kickable::Returned;
    }

    /// Interrupts every live vCPU thread's `KVM_RUN` (a no-op signal).
    pub fn kick_all(&self) {
        let threads = self.threads.lock().unwrap();
        for k in threads.iter() {
            if let Kickable::Live(t) = *k {
                // SAFETY: pthread_kill of a thread of this process with a signal
                // whose handler is a no-op. The thread is running: it marks itself
                // returned under this lock, which is held here, before it returns,
                // so it has not exited, let alone been joined or detached.
                unsafe { libc::pthread_kill(t, vmm_sys_util::signal::SIGRTMIN()) };
            }
        }
    }

    /// vCPU threads kicks reach now.
    #[cfg(test)]
    fn live_threads(&self) -> usize {
        let threads = self.threads.lock().unwrap();
        threads
            .iter()
            .filter(|k| matches!(k, Kickable::Live(_)))
            .count()
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::thread::JoinHandleExt;
    use std::sync::Arc;

    extern "C" fn no_op(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

    #[test]
    fn kicks_reach_live_vcpu_threads_only() {
        vmm_sys_util::signal::register_signal_handler(vmm_sys_util::signal::SIGRTMIN(), no_op)
            .unwrap();
        let ctl = Arc::new(RunControl::default());
        // A live thread is kicked out of a long sleep, as out of KVM_RUN.
        let c = ctl.clone();
        let t = std::thread::spawn(move || {
            let long = libc::timespec {
                tv_sec: 30,
                tv_nsec: 0,
            };
            // SAFETY: nanosleep with a valid request and no remainder pointer.
            let r = unsafe { libc::nanosleep(&long, std::ptr::null_mut()) };
            let err = std::io::Error::last_os_error().raw_os_error();
            c.thread_returned(0);
            (r, err)
        });
        ctl.add_thread(0, t.as_pthread_t());
        assert_eq!(ctl.live_threads(), 1);
        while !t.is_finished() {
            ctl.kick_all();
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(t.join().unwrap(), (-1, Some(libc::EINTR)));
        // Returned and joined: no kick can reach it.
        assert_eq!(ctl.live_threads(), 0);
        ctl.kick_all();
        // A thread that returns before its spawner registers it is never
        // registered.
        let c = ctl.clone();
        let t = std::thread::spawn(move || c.thread_returned(1));
        while !t.is_finished() {
            std::thread::yield_now();
        }
        ctl.add_thread(1, t.as_pthread_t());
        assert_eq!(ctl.live_threads(), 0);
        t.join().unwrap();
    }
}
