//! A Linux guest's exits: port I/O and MMIO go to the device buses; a device
//! access (or a system event) that powers the guest off or resets it ends the
//! run. The run loop itself is [`crate::vcpu::Vcpu`]'s.

use crate::devices::{Action, Bus};
use crate::vcpu::{GuestExits, Step, VcpuError};
use kvm_ioctls::VcpuFd;
use std::sync::{Arc, Mutex};

/// How the guest ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestExit {
    /// It powered off (ACPI S5).
    PowerOff,
    /// It asked for a reset (reboot); the VMM does not restart it.
    Reset,
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
    /// Records how the guest ended, if a device access ended it.
    fn act(&self, a: Action) -> Step {
        let e = match a {
            Action::None => return Step::Continue,
            Action::PowerOff => GuestExit::PowerOff,
            Action::Reset => GuestExit::Reset,
        };
        self.exit.lock().unwrap().get_or_insert(e);
        Step::StopVm
    }
}

/// A Linux vCPU's exits, routed to the [`Machine`].
pub(crate) struct LinuxExits {
    vcpu: usize,
    machine: Arc<Machine>,
}

impl LinuxExits {
    /// vCPU `vcpu`'s, over `machine`.
    pub(crate) fn new(vcpu: usize, machine: Arc<Machine>) -> Self {
        LinuxExits { vcpu, machine }
    }
}

impl GuestExits for LinuxExits {
    type Outcome = ();

    fn io_in(&mut self, port: u16, data: &mut [u8]) -> Result<Step, VcpuError> {
        self.machine.pio.read(port.into(), data);
        Ok(Step::Continue)
    }

    fn io_out(&mut self, port: u16, data: &[u8]) -> Result<Step, VcpuError> {
        Ok(self.machine.act(self.machine.pio.write(port.into(), data)))
    }

    fn mmio_read(&mut self, addr: u64, data: &mut [u8]) -> Result<Step, VcpuError> {
        self.machine.mmio.read(addr, data);
        Ok(Step::Continue)
    }

    fn mmio_write(&mut self, addr: u64, data: &[u8]) -> Result<Step, VcpuError> {
        Ok(self.machine.act(self.machine.mmio.write(addr, data)))
    }

    fn system_event(&mut self, kind: u32) -> Result<Step, VcpuError> {
        Ok(self
            .machine
            .act(if kind == kvm_bindings::KVM_SYSTEM_EVENT_RESET {
                Action::Reset
            } else {
                Action::PowerOff
            }))
    }

    fn halt(&mut self) -> Result<Step, VcpuError> {
        // With the in-kernel irqchip HLT stays in KVM; seeing it means the vCPU
        // halted for good.
        Ok(Step::Exit)
    }

    fn other(&mut self, what: String) -> Result<Step, VcpuError> {
        crate::warn_limited!("vCPU {}: unhandled exit {what}", self.vcpu);
        Ok(Step::Continue)
    }

    fn outcome(&mut self, _: &VcpuFd) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_system_event_ends_the_vm_once() {
        let m = Arc::new(Machine {
            pio: Bus::default(),
            mmio: Bus::default(),
            exit: Mutex::new(None),
            io: Mutex::new(None),
        });
        let mut v = LinuxExits::new(0, m.clone());
        assert_eq!(v.io_out(0x80, &[1]).unwrap(), Step::Continue);
        assert_eq!(v.other("Debug".into()).unwrap(), Step::Continue);
        assert_eq!(
            v.system_event(kvm_bindings::KVM_SYSTEM_EVENT_RESET)
                .unwrap(),
            Step::StopVm
        );
        // The first end is the guest's.
        assert_eq!(
            v.system_event(kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN)
                .unwrap(),
            Step::StopVm
        );
        assert_eq!(*m.exit.lock().unwrap(), Some(GuestExit::Reset));
        assert_eq!(v.halt().unwrap(), Step::Exit);
    }
}
