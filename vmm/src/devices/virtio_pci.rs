//! The virtio 1.x PCI transport ("modern" virtio-pci) with MSI-X, as stock Linux
//! kernels drive it (`virtio_pci`): vendor capabilities point at the common,
//! notify, ISR and device-specific configuration structures, all in BAR 0,
//! together with the MSI-X table and pending-bit array.
//!
//! BAR 0 layout: common config at 0x0000, ISR at 0x1000, device config at
//! 0x2000, notifications at 0x3000 (4 bytes per queue), MSI-X table at 0x4000,
//! PBA at 0x5000.
//!
//! The transport runs on the vCPU that touches a register and answers at once;
//! it never serves a queue. When the driver sets `DRIVER_OK` the device is
//! activated with the queues the driver set up, and each queue's notification
//! register becomes an ioeventfd (`KVM_IOEVENTFD` at the BAR's current address,
//! moved with the BAR): a notification then never leaves KVM as an exit, it
//! makes the device's eventfd readable and the device serves the queue on its
//! event loop ([`crate::event_loop`]), raising the queue's MSI-X vector
//! ([`super::virtio_irq`]) when it has used buffers. A notification that does
//! reach the transport as an MMIO exit (before activation, or with no KVM to
//! register with) is forwarded to the same eventfd.

use super::pci::{CAP_START, ConfigSpace, PciDevice};
use super::virtio_irq::{MSIX_VECTORS, NO_VECTOR, VirtioInterrupt};
use super::{Action, le_read, le_write};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use std::sync::{Arc, Mutex};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Size of BAR 0.
pub const BAR_SIZE: u32 = 0x8000;
const COMMON: u64 = 0x0000;
const ISR: u64 = 0x1000;
const DEVICE_CFG: u64 = 0x2000;
const NOTIFY: u64 = 0x3000;
const NOTIFY_MULT: u32 = 4;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x5000;

/// `VIRTIO_F_VERSION_1`.
pub const F_VERSION_1: u64 = 1 << 32;

const STATUS_DRIVER_OK: u8 = 4;
const STATUS_NEEDS_RESET: u8 = 0x40;
const STATUS_FAILED: u8 = 0x80;

static GUEST_ERRORS: fabric::ratelimit::RateLimiter = fabric::ratelimit::RateLimiter::new(2);

/// What a virtio device implements; the transport does the rest.
pub trait VirtioDevice: Send {
    /// Virtio device type (2: block).
    fn device_type(&self) -> u16;
    /// PCI class code (`class << 8 | subclass`, then prog-if).
    fn pci_class(&self) -> u32;
    /// Feature bits offered.
    fn features(&self) -> u64;
    /// Largest size of each queue.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads device-specific configuration.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// One eventfd per queue, written when the driver notifies that queue.
    fn queue_events(&self) -> &[EventFd];
    /// The driver set `DRIVER_OK`: serve `queues` (set up and checked valid)
    /// from now on, raising interrupts through `irq`.
    fn activate(&mut self, queues: Vec<Queue>, mem: GuestMemoryMmap, irq: Arc<VirtioInterrupt>);
    /// The driver reset the device: stop serving the queues.
    fn reset(&mut self);
}

/// A virtio device on PCI.
pub struct VirtioPci {
    config: ConfigSpace,
    msix_cap: usize,
    dev: Arc<Mutex<dyn VirtioDevice>>,
    features: u64,
    device_type: u16,
    irq: Arc<VirtioInterrupt>,
    /// Registers ioeventfds; `None` in tests without KVM.
    vm: Option<Arc<VmFd>>,
    mem: GuestMemoryMmap,
    notify: Vec<EventFd>,
    /// The BAR address the ioeventfds are registered at.
    ioevents_at: Option<u64>,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_generation: u8,
    queue_select: u16,
    queues: Vec<Queue>,
    active: bool,
}

fn virtio_cap(cfg_type: u8, offset: u64, length: u32, extra: Option<u32>) -> Vec<u8> {
    // cap_len, cfg_type, bar, id, padding[2], offset, length (+ notify multiplier)
    let len = if extra.is_some() { 20u8 } else { 16 };
    let mut b = vec![len, cfg_type, 0, 0, 0, 0];
    b.extend_from_slice(&(offset as u32).to_le_bytes());
    b.extend_from_slice(&length.to_le_bytes());
    if let Some(e) = extra {
        b.extend_from_slice(&e.to_le_bytes());
    }
    b
}

/// Transport setup failures.
#[derive(Debug, thiserror::Error)]
#[error("cannot duplicate a virtio queue's notification eventfd")]
pub struct TransportError(#[source] std::io::Error);

impl VirtioPci {
    /// Wraps `dev`, with BAR 0 at `bar_addr`; `vm` registers the queues'
    /// ioeventfds and receives the MSI-X messages (through `irq`).
    pub fn new(
        dev: Arc<Mutex<dyn VirtioDevice>>,
        bar_addr: u32,
        vm: Option<Arc<VmFd>>,
        irq: Arc<VirtioInterrupt>,
        mem: GuestMemoryMmap,
    ) -> Result<Self, TransportError> {
        let d = dev.lock().unwrap();
        let id = d.device_type();
        let mut config = ConfigSpace::new(0x1af4, 0x1040 + id, d.pci_class(), 1, (0x1af4, 0x40));
        config.set_mem_bar(0, bar_addr, BAR_SIZE);
        let nq = d.queue_max_sizes().len();
        let mut off = CAP_START;
        for (t, o, l, e) in [
            (1u8, COMMON, 0x38u32, None),
            (2, NOTIFY, NOTIFY_MULT * nq as u32, Some(NOTIFY_MULT)),
            (3, ISR, 1, None),
            (4, DEVICE_CFG, 0x100, None),
        ] {
            let body = virtio_cap(t, o, l, e);
            config.add_capability(off, 0x09, &body);
            off += 2 + body.len();
            off = off.next_multiple_of(4);
        }
        // MSI-X: message control (table size - 1), table and PBA in BAR 0.
        let msix_cap = off;
        let mut body = Vec::new();
        body.extend_from_slice(&((MSIX_VECTORS as u16) - 1).to_le_bytes());
        body.extend_from_slice(&(MSIX_TABLE as u32).to_le_bytes());
        body.extend_from_slice(&(MSIX_PBA as u32).to_le_bytes());
        config.add_capability(msix_cap, 0x11, &body);
        // Enable and function-mask bits of message control are writable.
        config.set_writable(msix_cap + 2, &[0x00, 0xc0]);
        let queues = d
            .queue_max_sizes()
            .iter()
            .map(|&s| Queue::new(s).expect("queue sizes are powers of two"))
            .collect();
        let notify = d
            .queue_events()
            .iter()
            .map(|e| e.try_clone())
            .collect::<Result<Vec<_>, _>>()
            .map_err(TransportError)?;
        let (features, device_type) = (d.features(), id);
        drop(d);
        Ok(VirtioPci {
            config,
            msix_cap,
            features,
            device_type,
            irq,
            vm,
            mem,
            notify,
            ioevents_at: None,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            queues,
            active: false,
            dev,
        })
    }

    fn msix_control(&self) -> (bool, bool) {
        let c = self.config.get16(self.msix_cap + 2);
        (c & 0x8000 != 0, c & 0x4000 != 0)
    }

    /// Registers the queues' ioeventfds at the BAR's current address (and
    /// unregisters them from the old one) while the device is active.
    fn sync_ioevents(&mut self) {
        let Some(vm) = self.vm.clone() else { return };
        let want = if self.active {
            self.config.bar(0).map(|(base, _)| base)
        } else {
            None
        };
        if want == self.ioevents_at {
            return;
        }
        if let Some(old) = self.ioevents_at.take() {
            for (q, e) in self.notify.iter().enumerate() {
                let a = IoEventAddress::Mmio(old + NOTIFY + q as u64 * u64::from(NOTIFY_MULT));
                if let Err(err) = vm.unregister_ioevent(e, &a, NoDatamatch) {
                    log::warn!("cannot unregister a virtio queue's ioeventfd: {err}");
                }
            }
        }
        if let Some(base) = want {
            for (q, e) in self.notify.iter().enumerate() {
                let a = IoEventAddress::Mmio(base + NOTIFY + q as u64 * u64::from(NOTIFY_MULT));
                if let Err(err) = vm.register_ioevent(e, &a, NoDatamatch) {
                    // Notifications still arrive, as MMIO exits.
                    log::warn!("cannot register a virtio queue's ioeventfd: {err}");
                }
            }
            self.ioevents_at = Some(base);
        }
    }

    fn activate(&mut self) {
        let valid = self
            .queues
            .iter()
            .all(|q| !q.ready() || q.is_valid(&self.mem));
        let queues: Option<Vec<Queue>> = self
            .queues
            .iter()
            .map(|q| Queue::try_from(q.state()).ok())
            .collect();
        let (true, Some(queues)) = (valid, queues) else {
            fabric::warn_limited!(
                GUEST_ERRORS,
                "the guest set up a virtio queue of device type {} that is not valid; the device needs a reset",
                self.device_type
            );
            self.status |= STATUS_NEEDS_RESET;
            return;
        };
        self.dev
            .lock()
            .unwrap()
            .activate(queues, self.mem.clone(), self.irq.clone());
        self.active = true;
        self.sync_ioevents();
    }

    fn reset(&mut self) {
        if self.active {
            self.dev.lock().unwrap().reset();
            self.active = false;
            self.sync_ioevents();
        }
        self.driver_features = 0;
        self.status = 0;
        self.queue_select = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.irq.reset();
    }

    /// The selected queue, while the driver may still set it up.
    fn queue(&mut self) -> Option<&mut Queue> {
        if self.active {
            return None;
        }
        self.queues.get_mut(self.queue_select as usize)
    }

    fn common_read(&mut self, off: u64, data: &mut [u8]) {
        let features = self.features;
        let qs = self.queue_select as usize;
        let q = self.queues.get(qs);
        let v: u64 = match off {
            0x00 => self.device_feature_select.into(),
            0x04 => match self.device_feature_select {
                0 => features & 0xffff_ffff,
                1 => features >> 32,
                _ => 0,
            },
            0x08 => self.driver_feature_select.into(),
            0x0c => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            0x10 => self.irq.config_vector().into(),
            0x12 => self.queues.len() as u64,
            0x14 => self.status.into(),
            0x15 => self.config_generation.into(),
            0x16 => self.queue_select.into(),
            0x18 => q.map_or(0, |q| q.size()).into(),
            0x1a => {
                if q.is_some() {
                    self.irq.queue_vector(qs).into()
                } else {
                    NO_VECTOR.into()
                }
            }
            0x1c => q.is_some_and(|q| q.ready()).into(),
            0x1e => qs as u64, // queue_notify_off
            0x20 => q.map_or(0, |q| q.desc_table()),
            0x24 => q.map_or(0, |q| q.desc_table() >> 32),
            0x28 => q.map_or(0, |q| q.avail_ring()),
            0x2c => q.map_or(0, |q| q.avail_ring() >> 32),
            0x30 => q.map_or(0, |q| q.used_ring()),
            0x34 => q.map_or(0, |q| q.used_ring() >> 32),
            _ => 0,
        };
        le_write(data, v);
    }

    fn common_write(&mut self, off: u64, data: &[u8]) {
        let v = le_read(data);
        let lo = Some(v as u32);
        match off {
            0x00 => self.device_feature_select = v as u32,
            0x08 => self.driver_feature_select = v as u32,
            0x0c => {
                let offered = self.features;
                match self.driver_feature_select {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | (v & offered & 0xffff_ffff)
                    }
                    1 => {
                        self.driver_features = (self.driver_features & 0xffff_ffff)
                            | ((v << 32) & offered & !0xffff_ffff)
                    }
                    _ => {}
                }
            }
            0x10 => self.irq.set_config_vector(v as u16),
            0x14 => self.write_status(v as u8),
            0x16 => self.queue_select = v as u16,
            0x18 => {
                if let Some(q) = self.queue() {
                    q.set_size(v as u16);
                }
            }
            // (`set_queue_vector` ignores a queue that does not exist.)
            0x1a => self
                .irq
                .set_queue_vector(self.queue_select as usize, v as u16),
            0x1c => {
                if let Some(q) = self.queue() {
                    q.set_ready(v == 1);
                }
            }
            0x20 => self
                .queue()
                .map_or((), |q| q.set_desc_table_address(lo, None)),
            0x24 => self
                .queue()
                .map_or((), |q| q.set_desc_table_address(None, lo)),
            0x28 => self
                .queue()
                .map_or((), |q| q.set_avail_ring_address(lo, None)),
            0x2c => self
                .queue()
                .map_or((), |q| q.set_avail_ring_address(None, lo)),
            0x30 => self
                .queue()
                .map_or((), |q| q.set_used_ring_address(lo, None)),
            0x34 => self
                .queue()
                .map_or((), |q| q.set_used_ring_address(None, lo)),
            _ => {}
        }
    }

    fn write_status(&mut self, v: u8) {
        if v == 0 {
            self.reset();
            return;
        }
        let was_ok = self.status & STATUS_DRIVER_OK != 0;
        self.status = v | (self.status & STATUS_NEEDS_RESET);
        if self.status & STATUS_FAILED != 0 {
            fabric::warn_limited!(
                GUEST_ERRORS,
                "the guest driver marked virtio device {} as failed",
                self.device_type
            );
        } else if !was_ok && self.status & STATUS_DRIVER_OK != 0 {
            self.activate();
        }
    }

    /// A notification that arrived as an MMIO exit: handed to the device's
    /// eventfd, as an ioeventfd would have.
    fn notify(&self, index: usize) {
        if let Some(e) = self.notify.get(index)
            && let Err(err) = e.write(1)
        {
            fabric::warn_limited!(GUEST_ERRORS, "cannot signal a virtio queue: {err}");
        }
    }
}

impl Drop for VirtioPci {
    fn drop(&mut self) {
        self.active = false;
        self.sync_ioevents();
    }
}

impl PciDevice for VirtioPci {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }

    fn config_written(&mut self, off: usize) {
        if (self.msix_cap..self.msix_cap + 4).contains(&off) {
            let (enabled, masked) = self.msix_control();
            self.irq.set_control(enabled, masked);
        }
        // The BAR moved, or memory decoding was switched.
        self.sync_ioevents();
    }

    fn bar_read(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
        match offset {
            o if o < ISR => self.common_read(o - COMMON, data),
            o if o == ISR => le_write(data, self.irq.take_isr().into()),
            o if (DEVICE_CFG..NOTIFY).contains(&o) => {
                self.dev.lock().unwrap().read_config(o - DEVICE_CFG, data)
            }
            o if (MSIX_TABLE..MSIX_PBA).contains(&o) => self.irq.table_read(o - MSIX_TABLE, data),
            o if (MSIX_PBA..MSIX_PBA + 8).contains(&o) => self.irq.pba_read(o - MSIX_PBA, data),
            _ => data.fill(0),
        }
    }

    fn bar_write(&mut self, _bar: usize, offset: u64, data: &[u8]) -> Action {
        match offset {
            o if o < ISR => self.common_write(o - COMMON, data),
            o if (NOTIFY..MSIX_TABLE).contains(&o) => {
                self.notify(((o - NOTIFY) / u64::from(NOTIFY_MULT)) as usize)
            }
            o if (MSIX_TABLE..MSIX_PBA).contains(&o) => self.irq.table_write(o - MSIX_TABLE, data),
            _ => {}
        }
        Action::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::block::FileBackend;
    use crate::devices::virtio_blk::VirtioBlk;
    use crate::devices::virtio_irq::tests::Recorder;
    use vm_memory::GuestAddress;

    fn w32(t: &mut VirtioPci, off: u64, v: u32) {
        t.bar_write(0, off, &v.to_le_bytes());
    }

    fn r32(t: &mut VirtioPci, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.bar_read(0, off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn the_driver_sets_up_a_queue_and_notifications_reach_the_device_eventfd() {
        let dir = std::env::temp_dir().join(format!("splitvisor-vpci-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("d.img");
        std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
        let blk = VirtioBlk::new(Box::new(FileBackend::open(&img, false).unwrap())).unwrap();
        let dev: Arc<Mutex<VirtioBlk>> = Arc::new(Mutex::new(blk));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let irq = Arc::new(VirtioInterrupt::new(Arc::new(Recorder::default()), 1));
        let mut t = VirtioPci::new(dev.clone(), 0xc000_0000, None, irq, mem).unwrap();
        // Device features: VERSION_1 in the high word.
        w32(&mut t, 0x00, 1);
        assert_eq!(r32(&mut t, 0x04), 1);
        // Queue 0: 256 entries, rings in guest memory.
        w32(&mut t, 0x16, 0);
        assert_eq!(r32(&mut t, 0x18) & 0xffff, 256);
        w32(&mut t, 0x20, 0x1000);
        w32(&mut t, 0x28, 0x2000);
        w32(&mut t, 0x30, 0x3000);
        w32(&mut t, 0x1c, 1);
        assert_eq!(r32(&mut t, 0x20), 0x1000);
        // A notification before DRIVER_OK is recorded too (the device ignores
        // it until it is active).
        let evt = dev.lock().unwrap().queue_events()[0].try_clone().unwrap();
        w32(&mut t, NOTIFY, 0);
        assert_eq!(evt.read().unwrap(), 1);
        t.bar_write(0, 0x14, &[1 | 2 | 8 | STATUS_DRIVER_OK]);
        assert!(t.active);
        // Queue addresses are fixed once the device runs.
        w32(&mut t, 0x20, 0x5000);
        assert_eq!(r32(&mut t, 0x20), 0x1000);
        w32(&mut t, NOTIFY, 0);
        assert_eq!(evt.read().unwrap(), 1);
        // A reset stops the device and clears the queue.
        t.bar_write(0, 0x14, &[0]);
        assert!(!t.active);
        assert_eq!(r32(&mut t, 0x20), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
