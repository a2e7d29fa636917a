//! Emulated devices of a Linux guest and the buses that route vCPU exits to them.
//!
//! A port I/O or MMIO exit in a vCPU thread goes to [`Bus::read`] / [`Bus::write`],
//! which finds the device whose range holds the address. Devices:
//! [`serial`] (8250 UART at 0x3f8, IRQ 4), [`power`] (ACPI sleep and reset
//! registers: guest power-off and reboot end the run), [`pci`] (configuration
//! mechanism #1 on 0xcf8, a host bridge, and the PCI devices' BARs), and
//! [`virtio_pci`] devices such as [`virtio_blk`] (on a local file or, through
//! [`nbd_disk`], on a remote storage node).

pub mod block;
pub mod chain;
pub mod nbd_disk;
pub mod nbd_url;
pub mod pci;
pub mod power;
pub mod serial;
pub mod virtio_blk;
pub mod virtio_irq;
pub mod virtio_net;
pub mod virtio_pci;

use std::sync::{Arc, Mutex};

/// What a device access asks of the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing beyond the access itself.
    None,
    /// The guest powered off.
    PowerOff,
    /// The guest asked for a reset (reboot).
    Reset,
}

/// A device on a bus. `offset` is relative to the start of its range.
pub trait BusDevice: Send {
    /// A read of `data.len()` bytes.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A write.
    fn write(&mut self, offset: u64, data: &[u8]) -> Action;
}

/// A shared device.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// An address space of devices (one for port I/O, one for MMIO).
#[derive(Default, Clone)]
pub struct Bus {
    ranges: Vec<(u64, u64, SharedDevice)>,
}

/// Bus setup failures.
#[derive(Debug, thiserror::Error)]
#[error("device range {base:#x}+{len:#x} overlaps another device")]
pub struct OverlapError {
    /// Start of the range.
    pub base: u64,
    /// Its length.
    pub len: u64,
}

impl Bus {
    /// Adds `dev` at `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, dev: SharedDevice) -> Result<(), OverlapError> {
        if self
            .ranges
            .iter()
            .any(|(b, l, _)| base < b + l && *b < base + len)
        {
            return Err(OverlapError { base, len });
        }
        self.ranges.push((base, len, dev));
        self.ranges.sort_by_key(|r| r.0);
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        let i = self.ranges.partition_point(|r| r.0 <= addr);
        let (b, l, d) = self.ranges.get(i.checked_sub(1)?)?;
        (addr < b + l).then_some((addr - b, d))
    }

    /// Routes a read; unclaimed addresses read as all ones, like an empty bus.
    /// Returns false if no device claimed it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((off, d)) => {
                d.lock().unwrap().read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Routes a write; unclaimed writes are dropped.
    pub fn write(&self, addr: u64, data: &[u8]) -> Action {
        match self.find(addr) {
            Some((off, d)) => d.lock().unwrap().write(off, data),
            None => Action::None,
        }
    }
}

/// Reads a little-endian value of up to 8 bytes.
pub(crate) fn le_read(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

/// Writes the low `data.len()` bytes of `v`, little-endian.
pub(crate) fn le_write(data: &mut [u8], v: u64) {
    let b = v.to_le_bytes();
    let n = data.len().min(8);
    data[..n].copy_from_slice(&b[..n]);
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(u64);
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            le_write(data, self.0 + offset);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) -> Action {
            self.0 = le_read(data);
            Action::None
        }
    }

    #[test]
    fn routes_by_range_and_rejects_overlaps() {
        let mut bus = Bus::default();
        bus.insert(0x100, 8, Arc::new(Mutex::new(Reg(0)))).unwrap();
        bus.insert(0x200, 8, Arc::new(Mutex::new(Reg(0x50))))
            .unwrap();
        assert!(bus.insert(0x104, 8, Arc::new(Mutex::new(Reg(0)))).is_err());
        let mut b = [0u8; 1];
        assert!(bus.read(0x203, &mut b));
        assert_eq!(b[0], 0x53);
        assert!(!bus.read(0x108, &mut b));
        assert_eq!(b[0], 0xff);
        bus.write(0x100, &[7]);
        bus.read(0x100, &mut b);
        assert_eq!(b[0], 7);
    }
}
