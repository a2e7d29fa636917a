//! The virtio 1.x PCI transport ("modern" virtio-pci) with MSI-X, as stock Linux
//! kernels drive it (`virtio_pci`): vendor capabilities point at the common,
//! notify, ISR and device-specific configuration structures, all in BAR 0,
//! together with the MSI-X table and pending-bit array.
//!
//! BAR 0 layout: common config at 0x0000, ISR at 0x1000, device config at
//! 0x2000, notifications at 0x3000 (4 bytes per queue), MSI-X table at 0x4000,
//! PBA at 0x5000.
//!
//! Queue notifications are handled in the notifying vCPU thread: the device
//! processes the queue and the transport raises the queue's MSI-X vector with
//! `KVM_SIGNAL_MSI`.

use super::pci::{CAP_START, ConfigSpace, PciDevice};
use super::{Action, le_read, le_write};
use kvm_bindings::kvm_msi;
use kvm_ioctls::VmFd;
use std::sync::Arc;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

/// Size of BAR 0.
pub const BAR_SIZE: u32 = 0x8000;
const COMMON: u64 = 0x0000;
const ISR: u64 = 0x1000;
const DEVICE_CFG: u64 = 0x2000;
const NOTIFY: u64 = 0x3000;
const NOTIFY_MULT: u32 = 4;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x5000;
const MSIX_VECTORS: usize = 16;
const NO_VECTOR: u16 = 0xffff;

/// `VIRTIO_F_VERSION_1`.
pub const F_VERSION_1: u64 = 1 << 32;

const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FAILED: u8 = 0x80;

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
    /// Handles available buffers of queue `index`; returns true if it put any on
    /// the used ring (the driver is then interrupted).
    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool;
    /// The driver reset the device.
    fn reset(&mut self) {}
}

#[derive(Default, Clone, Copy)]
struct MsixEntry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    ctrl: u32,
}

/// A virtio device on PCI.
pub struct VirtioPci {
    config: ConfigSpace,
    msix_cap: usize,
    dev: Box<dyn VirtioDevice>,
    vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_generation: u8,
    queue_select: u16,
    msix_config: u16,
    queues: Vec<Queue>,
    queue_vectors: Vec<u16>,
    msix: [MsixEntry; MSIX_VECTORS],
    pending: u64,
    isr: u8,
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

impl VirtioPci {
    /// Wraps `dev`, with BAR 0 at `bar_addr`.
    pub fn new(
        dev: Box<dyn VirtioDevice>,
        bar_addr: u32,
        vm: Arc<VmFd>,
        mem: GuestMemoryMmap,
    ) -> Self {
        let id = dev.device_type();
        let mut config = ConfigSpace::new(0x1af4, 0x1040 + id, dev.pci_class(), 1, (0x1af4, 0x40));
        config.set_mem_bar(0, bar_addr, BAR_SIZE);
        let nq = dev.queue_max_sizes().len();
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
        let queues = dev
            .queue_max_sizes()
            .iter()
            .map(|&s| Queue::new(s).expect("queue sizes are powers of two"))
            .collect();
        VirtioPci {
            config,
            msix_cap,
            vm,
            mem,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            msix_config: NO_VECTOR,
            queue_vectors: vec![NO_VECTOR; nq],
            queues,
            msix: [MsixEntry::default(); MSIX_VECTORS],
            pending: 0,
            isr: 0,
            dev,
        }
    }

    fn msix_control(&self) -> (bool, bool) {
        let c = self.config.get16(self.msix_cap + 2);
        (c & 0x8000 != 0, c & 0x4000 != 0)
    }

    fn signal(&mut self, vector: u16) {
        let v = vector as usize;
        let (enabled, fn_masked) = self.msix_control();
        if !enabled || v >= MSIX_VECTORS {
            // No INTx: without MSI-X there is no interrupt to raise.
            self.isr |= 1;
            return;
        }
        let e = self.msix[v];
        if fn_masked || e.ctrl & 1 != 0 {
            self.pending |= 1 << v;
            return;
        }
        let msi = kvm_msi {
            address_lo: e.addr_lo,
            address_hi: e.addr_hi,
            data: e.data,
            ..Default::default()
        };
        if let Err(err) = self.vm.signal_msi(msi) {
            crate::warn_once!("KVM_SIGNAL_MSI failed: {err}");
        }
    }

    fn deliver_pending(&mut self) {
        let (enabled, fn_masked) = self.msix_control();
        if !enabled || fn_masked {
            return;
        }
        for v in 0..MSIX_VECTORS {
            if self.pending & (1 << v) != 0 && self.msix[v].ctrl & 1 == 0 {
                self.pending &= !(1 << v);
                self.signal(v as u16);
            }
        }
    }

    fn reset(&mut self) {
        self.dev.reset();
        self.driver_features = 0;
        self.status = 0;
        self.queue_select = 0;
        self.msix_config = NO_VECTOR;
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_vectors.fill(NO_VECTOR);
        self.isr = 0;
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    fn common_read(&mut self, off: u64, data: &mut [u8]) {
        let features = self.dev.features();
        let qs = self.queue_select as usize;
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
            0x10 => self.msix_config.into(),
            0x12 => self.queues.len() as u64,
            0x14 => self.status.into(),
            0x15 => self.config_generation.into(),
            0x16 => self.queue_select.into(),
            0x18 => self.queues.get(qs).map_or(0, |q| q.size()).into(),
            0x1a => self
                .queue_vectors
                .get(qs)
                .copied()
                .unwrap_or(NO_VECTOR)
                .into(),
            0x1c => self.queues.get(qs).is_some_and(|q| q.ready()).into(),
            0x1e => qs as u64, // queue_notify_off
            0x20 => self.queues.get(qs).map_or(0, |q| q.desc_table()),
            0x24 => self.queues.get(qs).map_or(0, |q| q.desc_table() >> 32),
            0x28 => self.queues.get(qs).map_or(0, |q| q.avail_ring()),
            0x2c => self.queues.get(qs).map_or(0, |q| q.avail_ring() >> 32),
            0x30 => self.queues.get(qs).map_or(0, |q| q.used_ring()),
            0x34 => self.queues.get(qs).map_or(0, |q| q.used_ring() >> 32),
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
                let offered = self.dev.features();
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
            0x10 => self.msix_config = v as u16,
            0x14 => {
                if v == 0 {
                    self.reset();
                } else {
                    self.status = v as u8;
                    if self.status & STATUS_FAILED != 0 {
                        log::warn!(
                            "the guest driver marked virtio device {} as failed",
                            self.dev.device_type()
                        );
                    }
                }
            }
            0x16 => self.queue_select = v as u16,
            0x18 => {
                if let Some(q) = self.queue() {
                    q.set_size(v as u16);
                }
            }
            0x1a => {
                if let Some(x) = self.queue_vectors.get_mut(self.queue_select as usize) {
                    *x = v as u16;
                }
            }
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

    fn notify(&mut self, index: usize) {
        if self.status & STATUS_DRIVER_OK == 0 || self.status & STATUS_FAILED != 0 {
            return;
        }
        let Some(q) = self.queues.get_mut(index) else {
            return;
        };
        if !q.ready() || !q.is_valid(&self.mem) {
            crate::warn_once!("the guest notified a virtio queue that is not set up validly");
            return;
        }
        if self.dev.process_queue(index, q, &self.mem) {
            let needs = q.needs_notification(&self.mem).unwrap_or(true);
            if needs {
                self.isr |= 1;
                let vector = self.queue_vectors[index];
                if vector != NO_VECTOR {
                    self.signal(vector);
                }
            }
        }
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
            self.deliver_pending();
        }
    }

    fn bar_read(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
        match offset {
            o if o < ISR => self.common_read(o - COMMON, data),
            o if o == ISR => {
                le_write(data, self.isr.into());
                self.isr = 0;
            }
            o if (DEVICE_CFG..NOTIFY).contains(&o) => self.dev.read_config(o - DEVICE_CFG, data),
            o if (MSIX_TABLE..MSIX_PBA).contains(&o) => {
                let i = ((o - MSIX_TABLE) / 16) as usize;
                let e = self.msix.get(i).copied().unwrap_or_default();
                let v = match (o - MSIX_TABLE) % 16 {
                    0 => u64::from(e.addr_lo) | (u64::from(e.addr_hi) << 32),
                    4 => e.addr_hi.into(),
                    8 => u64::from(e.data) | (u64::from(e.ctrl) << 32),
                    12 => e.ctrl.into(),
                    _ => 0,
                };
                le_write(data, v);
            }
            o if (MSIX_PBA..MSIX_PBA + 8).contains(&o) => {
                le_write(data, self.pending >> ((o - MSIX_PBA) * 8))
            }
            _ => data.fill(0),
        }
    }

    fn bar_write(&mut self, _bar: usize, offset: u64, data: &[u8]) -> Action {
        match offset {
            o if o < ISR => self.common_write(o - COMMON, data),
            o if (NOTIFY..MSIX_TABLE).contains(&o) => {
                self.notify(((o - NOTIFY) / u64::from(NOTIFY_MULT)) as usize)
            }
            o if (MSIX_TABLE..MSIX_PBA).contains(&o) => {
                let i = ((o - MSIX_TABLE) / 16) as usize;
                let v = le_read(data);
                if let Some(e) = self.msix.get_mut(i) {
                    match ((o - MSIX_TABLE) % 16, data.len()) {
                        (0, 8) => {
                            e.addr_lo = v as u32;
                            e.addr_hi = (v >> 32) as u32;
                        }
                        (0, _) => e.addr_lo = v as u32,
                        (4, _) => e.addr_hi = v as u32,
                        (8, 8) => {
                            e.data = v as u32;
                            e.ctrl = (v >> 32) as u32;
                        }
                        (8, _) => e.data = v as u32,
                        (12, _) => e.ctrl = v as u32,
                        _ => {}
                    }
                }
                self.deliver_pending();
            }
            _ => {}
        }
        Action::None
    }
}
