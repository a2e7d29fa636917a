//! The devices of a Linux guest: the serial console, the power and reset
//! registers, and the PCI bus with a virtio-blk device per disk, on the port I/O
//! and MMIO buses the vCPUs' exits are routed to ([`vcpu::Machine`]).

use super::{Console, LinuxConfig, layout, vcpu};
use crate::devices::Bus;
use crate::devices::OverlapError;
use crate::devices::pci::{CONFIG_ADDRESS_PORT, PciConfigIo, PciMmio, PciRoot};
use crate::devices::power::{
    I8042, I8042_CMD_PORT, RESET_PORT, ResetReg, SLEEP_CONTROL_PORT, SleepRegs,
};
use crate::devices::serial::{COM1_IRQ, COM1_PORT, Uart};
use crate::devices::virtio_blk::{BlkError, BlockBackend, VirtioBlk};
use crate::devices::virtio_irq::VirtioInterrupt;
use crate::devices::virtio_net::tap::Tap;
use crate::devices::virtio_net::{NetError, VirtioNet, format_mac};
use crate::devices::virtio_pci::{BAR_SIZE, TransportError, VirtioPci};
use crate::event_loop::{EventLoopBuilder, EventLoopError};
use kvm_ioctls::VmFd;
use std::sync::{Arc, Mutex};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Device setup failures.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The console file cannot be created.
    #[error("cannot create console file {path}")]
    Console {
        /// The path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An eventfd cannot be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// KVM refused the serial console's irqfd.
    #[error("cannot register the serial console's irqfd")]
    Irqfd(#[source] kvm_ioctls::Error),
    /// Two devices claim the same addresses.
    #[error(transparent)]
    Overlap(#[from] OverlapError),
    /// A virtio-blk device cannot be set up.
    #[error(transparent)]
    Blk(#[from] BlkError),
    /// A virtio transport cannot be set up.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A network device cannot be set up.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The I/O event loop cannot start.
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
}

/// Builds the devices over `disks` (in `cfg.disks` order), with the I/O event
/// loop that serves the virtio devices (owned by the returned machine).
pub(super) fn build(
    cfg: &LinuxConfig,
    disks: Vec<Box<dyn BlockBackend>>,
    vm: &Arc<VmFd>,
    mem: &GuestMemoryMmap,
) -> Result<vcpu::Machine, DeviceError> {
    let out: Box<dyn std::io::Write + Send> = match &cfg.console {
        Console::Stdio => Box::new(std::io::stdout()),
        Console::File(p) => {
            Box::new(
                std::fs::File::create(p).map_err(|source| DeviceError::Console {
                    path: p.display().to_string(),
                    source,
                })?,
            )
        }
    };
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
    vm.register_irqfd(&serial_irq, COM1_IRQ)
        .map_err(DeviceError::Irqfd)?;
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
    let mut io = EventLoopBuilder::new("vmm-io")?;
    for (i, d) in disks.into_iter().enumerate() {
        log::info!(
            "disk {i}: {} ({} MiB{})",
            cfg.disks[i].describe(),
            d.size() >> 20,
            if d.read_only() { ", read-only" } else { "" }
        );
        let bar = layout::PCI_MMIO_START as u32 + i as u32 * BAR_SIZE;
        let blk = Arc::new(Mutex::new(VirtioBlk::new(d)?));
        io.add(blk.clone());
        let irq = Arc::new(VirtioInterrupt::new(vm.clone(), 1));
        let dev = VirtioPci::new(blk, bar, Some(vm.clone()), irq, mem.clone())?;
        root.lock().unwrap().add(Box::new(dev));
    }
    let slots = cfg.disks.len();
    for (i, n) in cfg.nets.iter().enumerate() {
        let tap = Tap::open(&n.tap).map_err(NetError::from)?;
        let mac = n
            .mac
            .unwrap_or([0x52, 0x54, 0, 0x12, 0x34, 0x56u8.wrapping_add(i as u8)]);
        log::info!("net {i}: tap {} (guest MAC {})", n.tap, format_mac(&mac));
        let bar = layout::PCI_MMIO_START as u32 + (slots + i) as u32 * BAR_SIZE;
        let net = Arc::new(Mutex::new(VirtioNet::new(tap, mac)?));
        io.add(net.clone());
        let irq = Arc::new(VirtioInterrupt::new(vm.clone(), 2));
        let dev = VirtioPci::new(net, bar, Some(vm.clone()), irq, mem.clone())?;
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
        io: Mutex::new(Some(io.start()?)),
    })
}
