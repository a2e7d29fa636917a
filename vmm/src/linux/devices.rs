//! The devices of a Linux guest: the serial console, the power and reset
//! registers, and the PCI bus with a virtio-blk device per disk, on the port I/O
//! and MMIO buses the vCPUs' exits are routed to ([`vcpu::Machine`]).

use super::{Console, LinuxConfig, kvm_call, layout, vcpu};
use crate::devices::Bus;
use crate::devices::pci::{CONFIG_ADDRESS_PORT, PciConfigIo, PciMmio, PciRoot};
use crate::devices::power::{
    I8042, I8042_CMD_PORT, RESET_PORT, ResetReg, SLEEP_CONTROL_PORT, SleepRegs,
};
use crate::devices::serial::{COM1_IRQ, COM1_PORT, Uart};
use crate::devices::virtio_blk::{BlockBackend, VirtioBlk};
use crate::devices::virtio_pci::{BAR_SIZE, VirtioPci};
use crate::error::VmError;
use kvm_ioctls::VmFd;
use std::sync::{Arc, Mutex};
use vm_memory::GuestMemoryMmap;

/// Builds the devices over `disks` (in `cfg.disks` order).
pub(super) fn build(
    cfg: &LinuxConfig,
    disks: Vec<Box<dyn BlockBackend>>,
    vm: &Arc<VmFd>,
    mem: &GuestMemoryMmap,
) -> Result<vcpu::Machine, VmError> {
    let out: Box<dyn std::io::Write + Send> = match &cfg.console {
        Console::Stdio => Box::new(std::io::stdout()),
        Console::File(p) => {
            Box::new(
                std::fs::File::create(p).map_err(|source| VmError::ConsoleFile {
                    path: p.clone(),
                    source,
                })?,
            )
        }
    };
    let serial_irq =
        vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
    vm.register_irqfd(&serial_irq, COM1_IRQ)
        .map_err(kvm_call("register the serial irqfd"))?;
    let mut pio = Bus::default();
    pio.insert(
        COM1_PORT,
        8,
        Arc::new(Mutex::new(Uart::new(serial_irq, out))),
    )?;
    pio.insert(SLEEP_CONTROL_PORT, 2, Arc::new(Mutex::new(SleepRegs)))?;
    pio.insert(RESET_PORT, 1, Arc::new(Mutex::new(ResetReg)))?;
    pio.insert(I8042_CMD_PORT, 1, Arc::new(Mutex::new(I8042)))?;
    let root = Arc::new(Mutex::new(PciRoot::new()));
    for (i, d) in disks.into_iter().enumerate() {
        log::info!(
            "disk {i}: {} ({} MiB{})",
            cfg.disks[i].describe(),
            d.size() >> 20,
            if d.read_only() { ", read-only" } else { "" }
        );
        let bar = layout::PCI_MMIO_START as u32 + i as u32 * BAR_SIZE;
        let dev = VirtioPci::new(Box::new(VirtioBlk::new(d)), bar, vm.clone(), mem.clone());
        root.lock().unwrap().add(Box::new(dev));
    }
    pio.insert(
        CONFIG_ADDRESS_PORT,
        8,
        Arc::new(Mutex::new(PciConfigIo(root.clone()))),
    )?;
    let mut mmio = Bus::default();
    mmio.insert(
        layout::PCI_MMIO_START,
        layout::PCI_MMIO_END - layout::PCI_MMIO_START,
        Arc::new(Mutex::new(PciMmio(root, layout::PCI_MMIO_START))),
    )?;
    Ok(vcpu::Machine {
        pio,
        mmio,
        exit: Mutex::new(None),
    })
}
