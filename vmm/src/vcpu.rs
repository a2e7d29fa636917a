//! The vCPU run loop, one for every guest kind: run the guest, handle the
//! exits every guest has the same way (a write to a page under eviction, a
//! crash, an interrupted `KVM_RUN`, pause and stop), and hand the others to the
//! guest kind's [`GuestExits`].
//!
//! A write to a page under eviction surfaces as `EFAULT` (or a memory-fault
//! exit) and is retried once the eviction batch ends; 100 000 of them in a row
//! with no other exit in between mean a real bad access.

use crate::control::RunControl;
use crate::excache::ExCache;
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::sync::atomic::Ordering::SeqCst;

/// Memory faults in a row, with no other exit in between, after which a vCPU
/// gives up.
pub const MAX_FAULTS_IN_A_ROW: u32 = 100_000;

/// What KVM counted for a vCPU: what a guest paid in exits, beside the cache's
/// own figures (each page the guest first touches after it is installed costs
/// an exit unless KVM mapped it along with a neighbour).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct KvmCounters {
    /// Guest exits to KVM.
    pub exits: u64,
    /// Guest page faults KVM handled.
    pub page_faults: u64,
    /// Of those, the ones that mapped a page.
    pub page_faults_fixed: u64,
}

impl KvmCounters {
    /// Reads a vCPU's counters (`KVM_GET_STATS_FD`); None, with a debug log
    /// line, if the kernel does not provide them.
    pub fn read(vcpu: &VcpuFd) -> Option<Self> {
        match crate::kvm_stats::read(vcpu) {
            Ok(m) => {
                let get = |k: &str| m.get(k).copied().unwrap_or(0);
                Some(KvmCounters {
                    exits: get("exits"),
                    page_faults: get("pf_taken"),
                    page_faults_fixed: get("pf_fixed"),
                })
            }
            Err(e) => {
                log::debug!("no KVM statistics: {}", fabric::client::error_chain(&e));
                None
            }
        }
    }
}

/// vCPU failures.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// `KVM_RUN` failed.
    #[error("vCPU {vcpu}: KVM_RUN failed")]
    Run {
        /// The vCPU.
        vcpu: usize,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The guest triple-faulted.
    #[error("vCPU {vcpu}: the guest crashed (triple fault) at rip {rip:#x}")]
    TripleFault {
        /// The vCPU.
        vcpu: usize,
        /// Its instruction pointer.
        rip: u64,
    },
    /// KVM could not run the guest (an internal error or a failed entry).
    #[error("vCPU {vcpu}: the guest crashed (KVM internal error or failed entry) at rip {rip:#x}")]
    Crash {
        /// The vCPU.
        vcpu: usize,
        /// Its instruction pointer.
        rip: u64,
    },
    /// A memory access keeps faulting with no eviction to wait for.
    #[error("vCPU {vcpu}: unexpected exit: memory access keeps failing (EFAULT)")]
    FaultsPersist {
        /// The vCPU.
        vcpu: usize,
    },
    /// The guest did something its kind does not allow.
    #[error("vCPU {vcpu}: unexpected exit: {what}")]
    Unexpected {
        /// The vCPU.
        vcpu: usize,
        /// What.
        what: String,
    },
    /// Reading the vCPU's mailbox failed.
    #[error("vCPU {vcpu}: cannot read its mailbox")]
    Mailbox {
        /// The vCPU.
        vcpu: usize,
        /// Why.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// What a guest kind made of an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Run the vCPU again.
    Continue,
    /// This vCPU is done: its guest exited or halted for good.
    Exit,
    /// The guest ended the VM (power-off, reset): every vCPU stops.
    StopVm,
}

/// The exits one guest kind handles itself, for one vCPU. Those of the
/// [`Vcpu`] loop (faults, crashes, `EINTR`) never reach it.
pub trait GuestExits: Send {
    /// What the vCPU reports when its guest exited.
    type Outcome: Send + 'static;
    /// A port read.
    fn io_in(&mut self, port: u16, data: &mut [u8]) -> Result<Step, VcpuError>;
    /// A port write.
    fn io_out(&mut self, port: u16, data: &[u8]) -> Result<Step, VcpuError>;
    /// An MMIO read.
    fn mmio_read(&mut self, addr: u64, data: &mut [u8]) -> Result<Step, VcpuError>;
    /// An MMIO write.
    fn mmio_write(&mut self, addr: u64, data: &[u8]) -> Result<Step, VcpuError>;
    /// `KVM_EXIT_SYSTEM_EVENT` of this type.
    fn system_event(&mut self, kind: u32) -> Result<Step, VcpuError>;
    /// `HLT` reached the VMM.
    fn halt(&mut self) -> Result<Step, VcpuError>;
    /// Any other exit, described.
    fn other(&mut self, what: String) -> Result<Step, VcpuError>;
    /// The outcome once the loop returns [`VcpuEnd::Exited`].
    fn outcome(&mut self, vcpu: &VcpuFd) -> Self::Outcome;
}

/// Where a vCPU is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuState {
    /// Set up, not run yet.
    Created,
    /// In its run loop.
    Running,
    /// Parked until the VM resumes.
    Paused,
    /// Its loop has returned.
    Exited,
}

/// How a vCPU's run ended, short of an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuEnd<T> {
    /// Its guest exited (or halted for good) with this outcome.
    Exited(T),
    /// The VM was stopped first.
    Stopped,
}

/// One vCPU: its KVM handle, the guest kind's exit handling, and its state.
pub struct Vcpu<G> {
    index: usize,
    fd: VcpuFd,
    guest: G,
    state: VcpuState,
    faults_in_a_row: u32,
}

impl<G: GuestExits> Vcpu<G> {
    /// vCPU `index`, set up, handling exits with `guest`.
    pub fn new(index: usize, fd: VcpuFd, guest: G) -> Self {
        Vcpu {
            index,
            fd,
            guest,
            state: VcpuState::Created,
            faults_in_a_row: 0,
        }
    }

    /// Its state.
    pub fn state(&self) -> VcpuState {
        self.state
    }

    /// Runs the vCPU until its guest exits, the VM stops, or an error; an error
    /// or a guest ending the VM stops the other vCPUs too.
    pub fn run(
        &mut self,
        cache: &ExCache,
        control: &RunControl,
    ) -> Result<VcpuEnd<G::Outcome>, VcpuError> {
        debug_assert_eq!(self.state, VcpuState::Created, "a vCPU runs once");
        self.state = VcpuState::Running;
        let r = self.run_loop(cache, control);
        self.state = VcpuState::Exited;
        if r.is_err() {
            stop_all(control);
        }
        r
    }

    fn run_loop(
        &mut self,
        cache: &ExCache,
        control: &RunControl,
    ) -> Result<VcpuEnd<G::Outcome>, VcpuError> {
        let idx = self.index;
        loop {
            // One lock when not paused, as `wait_if_paused` alone would take.
            if control.is_paused() {
                self.state = VcpuState::Paused;
                control.wait_if_paused();
                self.state = VcpuState::Running;
            }
            if control.stop.load(SeqCst) {
                return Ok(VcpuEnd::Stopped);
            }
            let exit = self.fd.run();
            let fault = match &exit {
                Ok(VcpuExit::MemoryFault { .. }) => true,
                Err(e) => e.errno() == libc::EFAULT,
                Ok(_) => false,
            };
            if !fault {
                self.faults_in_a_row = 0;
            }
            let g = &mut self.guest;
            let step = match exit {
                Ok(VcpuExit::IoIn(port, data)) => g.io_in(port, data)?,
                Ok(VcpuExit::IoOut(port, data)) => g.io_out(port, data)?,
                Ok(VcpuExit::MmioRead(addr, data)) => g.mmio_read(addr, data)?,
                Ok(VcpuExit::MmioWrite(addr, data)) => g.mmio_write(addr, data)?,
                Ok(VcpuExit::SystemEvent(kind, _)) => g.system_event(kind)?,
                Ok(VcpuExit::Hlt) => g.halt()?,
                Ok(VcpuExit::Shutdown) => {
                    return Err(VcpuError::TripleFault {
                        vcpu: idx,
                        rip: self.rip(),
                    });
                }
                Ok(VcpuExit::InternalError) | Ok(VcpuExit::FailEntry(..)) => {
                    return Err(VcpuError::Crash {
                        vcpu: idx,
                        rip: self.rip(),
                    });
                }
                _ if fault => {
                    self.faults_in_a_row += 1;
                    if self.faults_in_a_row > MAX_FAULTS_IN_A_ROW {
                        return Err(VcpuError::FaultsPersist { vcpu: idx });
                    }
                    cache.vcpu_write_blocked();
                    Step::Continue
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Step::Continue,
                Err(source) => return Err(VcpuError::Run { vcpu: idx, source }),
                Ok(other) => g.other(format!("{other:?}"))?,
            };
            match step {
                Step::Continue => {}
                Step::Exit => return Ok(VcpuEnd::Exited(self.guest.outcome(&self.fd))),
                Step::StopVm => stop_all(control),
            }
        }
    }

    fn rip(&self) -> u64 {
        self.fd.get_regs().map(|r| r.rip).unwrap_or(0)
    }
}

/// Stops every vCPU: they return at their next exit; kicks bring that exit.
fn stop_all(control: &RunControl) {
    control.stop.store(true, SeqCst);
    control.kick_all();
}
