//! A virtio-pci device's interrupts: the MSI-X table and pending bits, the ISR
//! status byte and which vector each queue uses. Shared by the transport (the
//! guest programs it from a vCPU) and the device's event-loop side, which
//! raises a queue's interrupt when it puts requests on the used ring.
//!
//! A message goes to KVM as an MSI (`KVM_SIGNAL_MSI`) through an [`MsiSink`];
//! there is no INTx, as on devices the Linux `virtio_pci` driver sets up with
//! MSI-X.

use super::{le_read, le_write};
use kvm_bindings::kvm_msi;
use kvm_ioctls::VmFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering::SeqCst};

/// Vectors in the MSI-X table.
pub const MSIX_VECTORS: usize = 16;
/// "No vector" in the queue and config vector registers.
pub const NO_VECTOR: u16 = 0xffff;

/// Where MSI messages go: KVM, or a recorder in tests.
pub trait MsiSink: Send + Sync {
    /// Delivers one message.
    fn send(&self, msi: kvm_msi) -> Result<(), kvm_ioctls::Error>;
}

impl MsiSink for VmFd {
    fn send(&self, msi: kvm_msi) -> Result<(), kvm_ioctls::Error> {
        self.signal_msi(msi).map(|_| ())
    }
}

#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
struct MsixEntry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    ctrl: u32,
}

#[derive(Debug)]
struct State {
    table: [MsixEntry; MSIX_VECTORS],
    pending: u64,
    enabled: bool,
    fn_masked: bool,
    queue_vectors: Vec<u16>,
    config_vector: u16,
}

/// The interrupt state of one virtio-pci device.
pub struct VirtioInterrupt {
    sink: std::sync::Arc<dyn MsiSink>,
    state: Mutex<State>,
    isr: AtomicU8,
}

static MSI_FAILED: fabric::ratelimit::RateLimiter = fabric::ratelimit::RateLimiter::new(1);

impl VirtioInterrupt {
    /// A device with `queues` queues, delivering through `sink`.
    pub fn new(sink: std::sync::Arc<dyn MsiSink>, queues: usize) -> Self {
        VirtioInterrupt {
            sink,
            state: Mutex::new(State {
                table: [MsixEntry::default(); MSIX_VECTORS],
                pending: 0,
                enabled: false,
                fn_masked: false,
                queue_vectors: vec![NO_VECTOR; queues],
                config_vector: NO_VECTOR,
            }),
            isr: AtomicU8::new(0),
        }
    }

    /// Queue `q` has new used buffers: sets the ISR's queue bit and raises the
    /// queue's vector (held as pending while masked).
    pub fn queue_used(&self, q: usize) {
        self.isr.fetch_or(1, SeqCst);
        let mut s = self.state.lock().unwrap();
        if let Some(&v) = s.queue_vectors.get(q)
            && v != NO_VECTOR
        {
            self.signal(&mut s, v);
        }
    }

    /// Reads and clears the ISR status byte.
    pub fn take_isr(&self) -> u8 {
        self.isr.swap(0, SeqCst)
    }

    /// Queue `q`'s vector.
    pub fn queue_vector(&self, q: usize) -> u16 {
        let s = self.state.lock().unwrap();
        s.queue_vectors.get(q).copied().unwrap_or(NO_VECTOR)
    }

    /// Sets queue `q`'s vector.
    pub fn set_queue_vector(&self, q: usize, v: u16) {
        if let Some(x) = self.state.lock().unwrap().queue_vectors.get_mut(q) {
            *x = v;
        }
    }

    /// The configuration-change vector.
    pub fn config_vector(&self) -> u16 {
        self.state.lock().unwrap().config_vector
    }

    /// Sets the configuration-change vector.
    pub fn set_config_vector(&self, v: u16) {
        self.state.lock().unwrap().config_vector = v;
    }

    /// The MSI-X capability's enable and function-mask bits changed.
    pub fn set_control(&self, enabled: bool, fn_masked: bool) {
        let mut s = self.state.lock().unwrap();
        s.enabled = enabled;
        s.fn_masked = fn_masked;
        self.deliver_pending(&mut s);
    }

    /// A read of the MSI-X table at `off`.
    pub fn table_read(&self, off: u64, data: &mut [u8]) {
        let s = self.state.lock().unwrap();
        let e = s
            .table
            .get((off / 16) as usize)
            .copied()
            .unwrap_or_default();
        let v = match off % 16 {
            0 => u64::from(e.addr_lo) | (u64::from(e.addr_hi) << 32),
            4 => e.addr_hi.into(),
            8 => u64::from(e.data) | (u64::from(e.ctrl) << 32),
            12 => e.ctrl.into(),
            _ => 0,
        };
        le_write(data, v);
    }

    /// A write to the MSI-X table at `off` (unmasking delivers what is pending).
    pub fn table_write(&self, off: u64, data: &[u8]) {
        let mut s = self.state.lock().unwrap();
        let v = le_read(data);
        if let Some(e) = s.table.get_mut((off / 16) as usize) {
            match (off % 16, data.len()) {
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
        self.deliver_pending(&mut s);
    }

    /// A read of the pending-bit array at `off`.
    pub fn pba_read(&self, off: u64, data: &mut [u8]) {
        let pending = self.state.lock().unwrap().pending;
        le_write(data, pending.checked_shr((off * 8) as u32).unwrap_or(0));
    }

    /// The driver reset the device: vectors and ISR go back to their defaults
    /// (the MSI-X table belongs to PCI and stays).
    pub fn reset(&self) {
        let mut s = self.state.lock().unwrap();
        s.queue_vectors.fill(NO_VECTOR);
        s.config_vector = NO_VECTOR;
        self.isr.store(0, SeqCst);
    }

    fn signal(&self, s: &mut State, vector: u16) {
        let v = vector as usize;
        if !s.enabled || v >= MSIX_VECTORS {
            // No INTx: without MSI-X there is no interrupt to raise.
            return;
        }
        let e = s.table[v];
        if s.fn_masked || e.ctrl & 1 != 0 {
            s.pending |= 1 << v;
            return;
        }
        let msi = kvm_msi {
            address_lo: e.addr_lo,
            address_hi: e.addr_hi,
            data: e.data,
            ..Default::default()
        };
        if let Err(err) = self.sink.send(msi) {
            fabric::warn_limited!(MSI_FAILED, "KVM_SIGNAL_MSI failed: {err}");
        }
    }

    fn deliver_pending(&self, s: &mut State) {
        if !s.enabled || s.fn_masked {
            return;
        }
        for v in 0..MSIX_VECTORS {
            if s.pending & (1 << v) != 0 && s.table[v].ctrl & 1 == 0 {
                s.pending &= !(1 << v);
                self.signal(s, v as u16);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Arc;

    /// Records every message.
    #[derive(Default)]
    pub(crate) struct Recorder(pub Mutex<Vec<u32>>);

    impl MsiSink for Recorder {
        fn send(&self, msi: kvm_msi) -> Result<(), kvm_ioctls::Error> {
            self.0.lock().unwrap().push(msi.data);
            Ok(())
        }
    }

    #[test]
    fn masked_vectors_are_held_pending_until_unmasked() {
        let rec = Arc::new(Recorder::default());
        let irq = VirtioInterrupt::new(rec.clone(), 1);
        irq.table_write(16, &0xfee0_0000u32.to_le_bytes());
        irq.table_write(24, &0x41u32.to_le_bytes());
        irq.table_write(28, &1u32.to_le_bytes()); // masked
        irq.set_queue_vector(0, 1);
        irq.queue_used(0);
        assert!(rec.0.lock().unwrap().is_empty(), "MSI-X is not enabled");
        irq.set_control(true, false);
        irq.queue_used(0);
        assert!(rec.0.lock().unwrap().is_empty(), "the vector is masked");
        let mut pba = [0u8; 8];
        irq.pba_read(0, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 1 << 1);
        irq.table_write(28, &0u32.to_le_bytes());
        assert_eq!(*rec.0.lock().unwrap(), vec![0x41]);
        assert_eq!(irq.take_isr(), 1);
        assert_eq!(irq.take_isr(), 0);
    }
}
