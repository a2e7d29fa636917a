//! PCI: configuration mechanism #1 (ports 0xcf8/0xcfc), one bus (bus 0) with a
//! host bridge at 00:00.0, and memory BARs routed to their devices.
//!
//! BARs are assigned by the VMM inside the MMIO window the DSDT's `PCI0` declares
//! ([`crate::linux::layout`]); the guest may move them, and sizing (writing all
//! ones) works as on hardware.

use super::{Action, BusDevice, le_read, le_write};
use std::sync::{Arc, Mutex};

/// Bytes of configuration space per function.
pub const CONFIG_SIZE: usize = 256;
const BAR0: usize = 0x10;
const COMMAND: usize = 0x04;
const CMD_MEMORY: u32 = 1 << 1;
/// Offset of the first capability this module's devices use.
pub const CAP_START: usize = 0x40;

/// A function's configuration space, with per-bit write masks.
pub struct ConfigSpace {
    data: [u8; CONFIG_SIZE],
    writable: [u8; CONFIG_SIZE],
    bar_size: [u32; 6],
}

impl ConfigSpace {
    /// A type-0 header with the given ids and class (`class << 8 | prog_if`).
    pub fn new(vendor: u16, device: u16, class: u32, revision: u8, subsys: (u16, u16)) -> Self {
        let mut c = ConfigSpace {
            data: [0; CONFIG_SIZE],
            writable: [0; CONFIG_SIZE],
            bar_size: [0; 6],
        };
        c.set16(0x00, vendor);
        c.set16(0x02, device);
        c.set32(0x08, (class << 8) | u32::from(revision));
        c.set16(0x2c, subsys.0);
        c.set16(0x2e, subsys.1);
        // Command: I/O, memory, bus master, INTx disable are writable.
        c.writable[COMMAND] = 0x07;
        c.writable[COMMAND + 1] = 0x04;
        c.writable[0x3c] = 0xff; // interrupt line
        c
    }

    /// Reads `n` bytes at `off` (bytes past the end read as zero).
    pub fn read(&self, off: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.data.get(off + i).copied().unwrap_or(0);
        }
    }

    /// Writes through the write masks.
    pub fn write(&mut self, off: usize, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            if let Some(old) = self.data.get_mut(off + i) {
                let m = self.writable[off + i];
                *old = (*old & !m) | (b & m);
            }
        }
    }

    /// Sets a byte directly (device-side).
    pub fn set8(&mut self, off: usize, v: u8) {
        self.data[off] = v;
    }
    /// Sets a 16-bit field.
    pub fn set16(&mut self, off: usize, v: u16) {
        self.data[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }
    /// Sets a 32-bit field.
    pub fn set32(&mut self, off: usize, v: u32) {
        self.data[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }
    /// Reads a 16-bit field.
    pub fn get16(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.data[off], self.data[off + 1]])
    }
    /// Reads a 32-bit field.
    pub fn get32(&self, off: usize) -> u32 {
        u32::from_le_bytes(self.data[off..off + 4].try_into().unwrap())
    }
    /// Marks bytes writable by the guest with a mask.
    pub fn set_writable(&mut self, off: usize, mask: &[u8]) {
        self.writable[off..off + mask.len()].copy_from_slice(mask);
    }

    /// Declares BAR `i` as a 32-bit non-prefetchable memory BAR of `size` bytes
    /// (a power of two, at least 16) at `addr`.
    pub fn set_mem_bar(&mut self, i: usize, addr: u32, size: u32) {
        assert!(size.is_power_of_two() && size >= 16 && addr % size == 0);
        self.bar_size[i] = size;
        self.set32(BAR0 + 4 * i, addr);
        self.set_writable(BAR0 + 4 * i, &(!(size - 1)).to_le_bytes());
    }

    /// The current address of memory BAR `i` if memory decoding is on.
    pub fn bar(&self, i: usize) -> Option<(u64, u64)> {
        let size = self.bar_size[i];
        if size == 0 || self.get16(COMMAND) as u32 & CMD_MEMORY == 0 {
            return None;
        }
        Some((u64::from(self.get32(BAR0 + 4 * i) & !0xf), u64::from(size)))
    }

    /// Adds a capability at `off` with `body` (after the id and next bytes),
    /// linking it into the capability list.
    pub fn add_capability(&mut self, off: usize, id: u8, body: &[u8]) {
        self.data[off] = id;
        self.data[off + 1] = 0;
        self.data[off + 2..off + 2 + body.len()].copy_from_slice(body);
        // Status: capability list present.
        self.data[0x06] |= 1 << 4;
        if self.data[0x34] == 0 {
            self.data[0x34] = off as u8;
        } else {
            let mut p = self.data[0x34] as usize;
            while self.data[p + 1] != 0 {
                p = self.data[p + 1] as usize;
            }
            self.data[p + 1] = off as u8;
        }
    }
}

/// A PCI function on bus 0.
pub trait PciDevice: Send {
    /// Its configuration space.
    fn config(&self) -> &ConfigSpace;
    /// Its configuration space, mutable.
    fn config_mut(&mut self) -> &mut ConfigSpace;
    /// Called after the guest wrote configuration space at `off`.
    fn config_written(&mut self, _off: usize) {}
    /// A read from BAR `bar` at `offset`.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// A write to BAR `bar` at `offset`.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) -> Action;
}

/// The host bridge at 00:00.0 (Linux checks for one before trusting mechanism #1).
pub struct HostBridge(ConfigSpace);

impl Default for HostBridge {
    fn default() -> Self {
        // Intel 440FX host bridge ids, class 06 00 00.
        HostBridge(ConfigSpace::new(0x8086, 0x1237, 0x06_00_00, 2, (0, 0)))
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &ConfigSpace {
        &self.0
    }
    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.0
    }
    fn bar_read(&mut self, _: usize, _: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _: usize, _: u64, _: &[u8]) -> Action {
        Action::None
    }
}

/// Bus 0: slot `i` holds `devices[i]`.
pub struct PciRoot {
    address: u32,
    devices: Vec<Box<dyn PciDevice>>,
}

impl PciRoot {
    /// A bus with only the host bridge.
    pub fn new() -> Self {
        PciRoot {
            address: 0,
            devices: vec![Box::new(HostBridge::default())],
        }
    }

    /// Adds a device in the next slot; returns the slot.
    pub fn add(&mut self, dev: Box<dyn PciDevice>) -> usize {
        self.devices.push(dev);
        self.devices.len() - 1
    }

    fn selected(&mut self) -> Option<(&mut Box<dyn PciDevice>, usize)> {
        let a = self.address;
        if a & 0x8000_0000 == 0 {
            return None;
        }
        let (bus, slot, func) = ((a >> 16) & 0xff, (a >> 11) & 0x1f, (a >> 8) & 7);
        if bus != 0 || func != 0 {
            return None;
        }
        let reg = (a & 0xfc) as usize;
        self.devices.get_mut(slot as usize).map(|d| (d, reg))
    }

    fn config_read(&mut self, offset: u64, data: &mut [u8]) {
        if offset < 4 {
            let mut v = [0u8; 4];
            le_write(&mut v, u64::from(self.address));
            let o = offset as usize;
            let n = data.len().min(4 - o);
            data[..n].copy_from_slice(&v[o..o + n]);
            return;
        }
        match self.selected() {
            Some((d, reg)) => d.config().read(reg + (offset as usize - 4), data),
            None => data.fill(0xff),
        }
    }

    fn config_write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.len() == 4 {
            self.address = le_read(data) as u32;
            return;
        }
        if offset < 4 {
            return;
        }
        if let Some((d, reg)) = self.selected() {
            let off = reg + (offset as usize - 4);
            d.config_mut().write(off, data);
            d.config_written(off);
        }
    }

    fn mmio(&mut self, addr: u64, len: usize) -> Option<(&mut Box<dyn PciDevice>, usize, u64)> {
        for d in self.devices.iter_mut() {
            for bar in 0..6 {
                if let Some((base, size)) = d.config().bar(bar)
                    && addr >= base
                    && addr + len as u64 <= base + size
                {
                    return Some((d, bar, addr - base));
                }
            }
        }
        None
    }
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

/// The configuration ports (0xcf8..0xd00) of a shared [`PciRoot`].
pub struct PciConfigIo(pub Arc<Mutex<PciRoot>>);
/// I/O port of the configuration address register.
pub const CONFIG_ADDRESS_PORT: u64 = 0xcf8;

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.0.lock().unwrap().config_read(offset, data)
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Action {
        self.0.lock().unwrap().config_write(offset, data);
        Action::None
    }
}

/// The MMIO window of a shared [`PciRoot`], starting at `.1`.
pub struct PciMmio(pub Arc<Mutex<PciRoot>>, pub u64);

impl BusDevice for PciMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut root = self.0.lock().unwrap();
        match root.mmio(self.1 + offset, data.len()) {
            Some((d, bar, off)) => d.bar_read(bar, off, data),
            None => data.fill(0xff),
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Action {
        let mut root = self.0.lock().unwrap();
        match root.mmio(self.1 + offset, data.len()) {
            Some((d, bar, off)) => d.bar_write(bar, off, data),
            None => Action::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg_read32(io: &mut PciConfigIo, slot: u32, reg: u32) -> u32 {
        io.write(0, &(0x8000_0000u32 | (slot << 11) | reg).to_le_bytes());
        let mut d = [0u8; 4];
        io.read(4, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn host_bridge_is_found_and_empty_slots_read_ones() {
        let mut io = PciConfigIo(Arc::new(Mutex::new(PciRoot::new())));
        assert_eq!(cfg_read32(&mut io, 0, 0), 0x1237_8086);
        assert_eq!(cfg_read32(&mut io, 0, 8) >> 8, 0x06_00_00);
        assert_eq!(cfg_read32(&mut io, 5, 0), 0xffff_ffff);
    }

    #[test]
    fn bar_sizing_reads_back_the_size_mask() {
        let mut c = ConfigSpace::new(1, 2, 0, 0, (0, 0));
        c.set_mem_bar(0, 0xc000_0000, 0x8000);
        c.write(0x10, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(c.get32(0x10), 0xffff_8000);
        c.write(0x10, &0xc001_0000u32.to_le_bytes());
        assert_eq!(c.bar(0), None, "memory decoding is off");
        c.write(0x04, &[0x02, 0]);
        assert_eq!(c.bar(0), Some((0xc001_0000, 0x8000)));
    }
}
