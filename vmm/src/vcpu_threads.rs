//! A run's vCPU threads: starting them (paused or not) with the control API
//! beside them, and waiting for the run to end. What a vCPU thread runs is the
//! caller's ([`crate::builder`] runs a [`crate::vcpu::Vcpu`] on each).

use crate::api::{self, ApiServer, VmInfo};
use crate::control::RunControl;
use crate::error::VmError;
use crate::excache::ExCache;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The running vCPU threads, their run control and the API server.
pub(crate) struct VcpuThreads<T> {
    /// Pause, resume, stop and kicks.
    pub(crate) control: Arc<RunControl>,
    running: Arc<AtomicUsize>,
    /// One per vCPU, in vCPU order.
    pub(crate) threads: Vec<JoinHandle<T>>,
    api: Option<ApiServer>,
    /// When the first vCPU thread started.
    started: Instant,
    /// When the last vCPU thread to return so far returned.
    last_exit: Arc<Mutex<Option<Instant>>>,
    /// The first vCPU thread that panicked, and its message.
    panicked: Arc<Mutex<Option<(usize, String)>>>,
}

/// Test hook: `SPLITVISOR_TEST_PANIC_VCPU=N` makes vCPU thread N panic 200 ms
/// after it starts, while the others run their guest (for the test that a
/// panicking vCPU stops the VM with an error).
const PANIC_HOOK_ENV: &str = "SPLITVISOR_TEST_PANIC_VCPU";

/// Marks vCPU `.1`'s thread returned ([`RunControl::thread_returned`]) when
/// dropped: before the thread ends, on every path out of it, unwinding included.
struct Unkickable<'a>(&'a RunControl, usize);

impl Drop for Unkickable<'_> {
    fn drop(&mut self) {
        self.0.thread_returned(self.1);
    }
}

/// The text of a panic's payload.
pub(crate) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// Starts one thread per vCPU (`vcpu-N`) running `body(N, vcpu, control)`,
/// paused if asked, then the control API if a socket is given.
pub(crate) fn start<V, T, F>(
    vcpus: Vec<V>,
    start_paused: bool,
    cache: &Arc<ExCache>,
    api_on: Option<(&api::Endpoints, VmInfo)>,
    body: F,
) -> Result<VcpuThreads<T>, VmError>
where
    V: Send + 'static,
    T: Send + 'static,
    F: Fn(usize, V, &RunControl) -> T + Clone + Send + 'static,
{
    // A no-op signal handler lets us interrupt KVM_RUN to stop a vCPU.
    vmm_sys_util::signal::register_signal_handler(vmm_sys_util::signal::SIGRTMIN(), kick_handler)
        .map_err(VmError::KickHandler)?;
    let control = Arc::new(RunControl::default());
    control.set_paused(start_paused);
    let running = Arc::new(AtomicUsize::new(vcpus.len()));
    let started = Instant::now();
    let last_exit = Arc::new(Mutex::new(None::<Instant>));
    let panicked = Arc::new(Mutex::new(None::<(usize, String)>));
    let panic_hook: Option<usize> = std::env::var(PANIC_HOOK_ENV)
        .ok()
        .and_then(|v| v.parse().ok());
    let mut threads = Vec::with_capacity(vcpus.len());
    for (i, vcpu) in vcpus.into_iter().enumerate() {
        let (ctl, running, body) = (control.clone(), running.clone(), body.clone());
        let (cache, last_exit, panicked) = (cache.clone(), last_exit.clone(), panicked.clone());
        let t = std::thread::Builder::new()
            .name(format!("vcpu-{i}"))
            .spawn(move || {
                let unkickable = Unkickable(&ctl, i);
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    if panic_hook == Some(i) {
                        std::thread::sleep(Duration::from_millis(200));
                        panic!("test hook {PANIC_HOOK_ENV}={i}");
                    }
                    body(i, vcpu, &ctl)
                }));
                if let Err(p) = &r {
                    // Recorded before this thread counts as returned, so the
                    // waiter sees it; the other vCPUs are stopped.
                    panicked
                        .lock()
                        .unwrap()
                        .get_or_insert((i, panic_message(p.as_ref())));
                    ctl.stop.store(true, SeqCst);
                    ctl.kick_all();
                }
                // No kick reaches this thread from here on: the waiter may join
                // it as soon as it counts as returned.
                drop(unkickable);
                let now = Instant::now();
                let mut last = last_exit.lock().unwrap();
                *last = Some(last.map_or(now, |t: Instant| t.max(now)));
                drop(last);
                if running.fetch_sub(1, SeqCst) == 1 {
                    cache.wake_waiters();
                }
                match r {
                    Ok(r) => r,
                    Err(p) => std::panic::resume_unwind(p),
                }
            })
            .map_err(|e| {
                // The threads already started must not wait for a resume.
                control.stop.store(true, SeqCst);
                control.set_paused(false);
                control.kick_all();
                VmError::VcpuThread(e)
            })?;
        control.add_thread(i, t.as_pthread_t());
        threads.push(t);
    }
    let api = match api_on {
        Some((at, info)) => Some(
            api::serve(at, info, cache.clone(), control.clone()).map_err(|e| {
                control.stop.store(true, SeqCst);
                control.kick_all();
                VmError::Api(e)
            })?,
        ),
        None => None,
    };
    Ok(VcpuThreads {
        control,
        running,
        threads,
        api,
        started,
        last_exit,
        panicked,
    })
}

impl<T> VcpuThreads<T> {
    /// Waits until every vCPU thread has returned. A stop (a vCPU failed, or
    /// `interrupt` was set) lifts any pause and kicks the vCPUs until they return.
    /// A cache failure ends the wait with [`VmError::Fatal`] at once: vCPUs may be
    /// stuck in a fault that can never be served, so they are kicked, not joined.
    /// A vCPU thread that panicked stops the others; once they have returned the
    /// wait ends with [`VmError::VcpuPanicked`].
    pub(crate) fn wait(&self, cache: &ExCache, interrupt: &AtomicBool) -> Result<(), VmError> {
        self.wait_vcpus(cache, interrupt)?;
        if let Some((vcpu, message)) = self.panicked.lock().unwrap().clone() {
            return Err(VmError::VcpuPanicked { vcpu, message });
        }
        Ok(())
    }

    fn wait_vcpus(&self, cache: &ExCache, interrupt: &AtomicBool) -> Result<(), VmError> {
        let control = &self.control;
        while self.running.load(SeqCst) > 0 {
            if interrupt.load(SeqCst) {
                control.stop.store(true, SeqCst);
            }
            if control.stop.load(SeqCst) {
                // Kick until they notice (a kick can land just before KVM_RUN).
                control.set_paused(false);
                control.kick_all();
                if let Some(why) = cache.fatal() {
                    return Err(VmError::Fatal(why));
                }
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            if let Some(why) = cache.wait_fatal_or(|| {
                self.running.load(SeqCst) == 0
                    || control.stop.load(SeqCst)
                    || interrupt.load(SeqCst)
            }) {
                control.stop.store(true, SeqCst);
                control.kick_all();
                return Err(VmError::Fatal(why));
            }
        }
        Ok(())
    }

    /// The run's time: from the first vCPU's start to the last one's return (to
    /// now while one still runs).
    pub(crate) fn elapsed(&self) -> Duration {
        self.last_exit
            .lock()
            .unwrap()
            .unwrap_or_else(Instant::now)
            .duration_since(self.started)
    }

    /// Stops serving the control API.
    pub(crate) fn close_api(&mut self) {
        self.api = None;
    }
}
