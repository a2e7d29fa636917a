//! vCPU threads of a Linux guest: run, and route port I/O and MMIO exits to the
//! device buses. A device access that powers the guest off or resets it ends the
//! run; a write to a page under eviction (`EFAULT`) waits for the batch.

use crate::control::RunControl;
use crate::devices::{Action, Bus};
use crate::excache::ExCache;
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::sync::Mutex;
use std::sync::atomic::Ordering::SeqCst;

/// How the guest ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestExit {
    /// It powered off (ACPI S5).
    PowerOff,
    /// It asked for a reset (reboot); the VMM does not restart it.
    Reset,
}

/// Why a vCPU stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum LinuxVcpuError {
    /// KVM_RUN failed.
    #[error("vCPU {vcpu}: KVM_RUN failed")]
    Run {
        /// The vCPU.
        vcpu: usize,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The guest triple-faulted (or KVM reported an internal error).
    #[error("vCPU {vcpu}: the guest crashed ({what}) at rip {rip:#x}")]
    Crash {
        /// The vCPU.
        vcpu: usize,
        /// What KVM said.
        what: String,
        /// Instruction pointer.
        rip: u64,
    },
}

/// Shared between vCPU threads: the devices and how the guest ended.
pub struct Machine {
    /// Port I/O devices.
    pub pio: Bus,
    /// MMIO devices.
    pub mmio: Bus,
    /// Set once by the vCPU that saw the guest end.
    pub exit: Mutex<Option<GuestExit>>,
    /// The devices' I/O event loop; taken (stopped and joined) once the vCPUs
    /// have returned, before the cache stops serving guest memory.
    pub io: Mutex<Option<crate::event_loop::EventLoop>>,
}

impl Machine {
    fn act(&self, a: Action, control: &RunControl) {
        let e = match a {
            Action::None => return,
            Action::PowerOff => GuestExit::PowerOff,
            Action::Reset => GuestExit::Reset,
        };
        self.exit.lock().unwrap().get_or_insert(e);
        control.stop.store(true, SeqCst);
        control.kick_all();
    }
}

/// Runs vCPU `idx` until the guest ends, the VM stops, or an error.
pub fn run(
    idx: usize,
    vcpu: &mut VcpuFd,
    m: &Machine,
    cache: &ExCache,
    control: &RunControl,
) -> Result<(), LinuxVcpuError> {
    loop {
        control.wait_if_paused();
        if control.stop.load(SeqCst) {
            return Ok(());
        }
        match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                m.pio.read(port.into(), data);
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                let a = m.pio.write(port.into(), data);
                m.act(a, control);
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                m.mmio.read(addr, data);
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                let a = m.mmio.write(addr, data);
                m.act(a, control);
            }
            Ok(VcpuExit::Hlt) => {
                // With the in-kernel irqchip HLT stays in KVM; seeing it means the
                // vCPU halted for good.
                return Ok(());
            }
            Ok(VcpuExit::Shutdown) => {
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                return Err(LinuxVcpuError::Crash {
                    vcpu: idx,
                    what: "triple fault".into(),
                    rip,
                });
            }
            Ok(VcpuExit::SystemEvent(t, _)) => {
                let a = if t == kvm_bindings::KVM_SYSTEM_EVENT_RESET {
                    Action::Reset
                } else {
                    Action::PowerOff
                };
                m.act(a, control);
            }
            Ok(VcpuExit::MemoryFault { .. }) => cache.vcpu_write_blocked(),
            Ok(VcpuExit::InternalError) | Ok(VcpuExit::FailEntry(..)) => {
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                return Err(LinuxVcpuError::Crash {
                    vcpu: idx,
                    what: "KVM internal error or failed entry".into(),
                    rip,
                });
            }
            Ok(other) => {
                crate::warn_limited!("vCPU {idx}: unhandled exit {other:?}");
            }
            Err(e) if e.errno() == libc::EFAULT => cache.vcpu_write_blocked(),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(source) => return Err(LinuxVcpuError::Run { vcpu: idx, source }),
        }
    }
}
