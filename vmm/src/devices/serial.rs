//! The 8250 UART at I/O port 0x3f8 (COM1, IRQ 4), from vm-superio: the guest
//! console (`console=ttyS0`). Output goes to stdout or a file; the interrupt is an
//! eventfd wired to the in-kernel IOAPIC with an irqfd.

use super::{Action, BusDevice};
use std::io::Write;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// I/O port base of COM1.
pub const COM1_PORT: u64 = 0x3f8;
/// Its interrupt line.
pub const COM1_IRQ: u32 = 4;

/// Raises the serial interrupt by writing the eventfd KVM listens on.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

/// The console UART.
pub struct Uart(Serial<IrqTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>);

impl Uart {
    /// A UART writing to `out`, interrupting through `irq`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        Uart(Serial::new(IrqTrigger(irq), out))
    }
}

impl BusDevice for Uart {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.0.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Action {
        if let (Some(&b), Ok(off)) = (data.first(), u8::try_from(offset))
            && let Err(e) = self.0.write(off, b)
        {
            crate::warn_limited!("serial console write failed: {e:?}");
        }
        Action::None
    }
}
