//! The device's request path over a queue whose rings and buffers are a fuzz
//! input, for the fuzz targets in `fuzz/` (see docs/fuzzing.md). Not part of
//! the VMM's interface.

use super::{BlockBackend, BlockOp, VirtioBlk};
use crate::devices::virtio_irq::{MsiSink, VirtioInterrupt};
use crate::devices::virtio_pci::VirtioDevice;
use kvm_bindings::kvm_msi;
use std::io;
use std::sync::Arc;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest memory: the input is copied to its start.
pub const MEM: usize = 64 << 10;
/// The descriptor table's, available ring's and used ring's addresses.
pub const RINGS: (u64, u64, u64) = (0, 0x1000, 0x2000);
/// The disk's size.
pub const DISK: usize = 64 << 10;

/// A disk in memory that completes every op at once (failing them when told).
struct MemDisk {
    data: Vec<u8>,
    read_only: bool,
    fail: bool,
    done: Vec<(u64, BlockOp)>,
}

impl BlockBackend for MemDisk {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn name(&self) -> String {
        "fuzz-disk".into()
    }
    fn submit(&mut self, tag: u64, mut op: BlockOp) {
        let at = op.offset as usize;
        let range = at..at + op.buf.len();
        // The device checked the range; a request past the end is a device bug,
        // which the slice index turns into the panic the fuzzer reports.
        match op.kind {
            _ if self.fail => op.result = Err(io::Error::other("injected")),
            super::OpKind::Read => op.buf.copy_from_slice(&self.data[range]),
            super::OpKind::Write => self.data[range].copy_from_slice(&op.buf),
            super::OpKind::Flush => {}
        }
        self.done.push((tag, op));
    }
    fn completions(&mut self, out: &mut Vec<(u64, BlockOp)>) {
        out.append(&mut self.done);
    }
}

struct NoMsi;

impl MsiSink for NoMsi {
    fn send(&self, _: kvm_msi) -> Result<(), kvm_ioctls::Error> {
        Ok(())
    }
}

/// Runs the device on one queue: `input[0]` picks the queue size (1 <<
/// (`input[0]` % 9)), `input[1]` bit 0 a read-only disk and bit 1 a backend
/// whose ops all fail; the rest is guest memory from address 0 (rings at
/// [`RINGS`]). The device takes every available request, as on a queue
/// notification. Returns the guest memory afterwards (`None`: no valid
/// queue).
pub fn run_queue(input: &[u8]) -> Option<GuestMemoryMmap> {
    let (&size, &flags) = (input.first()?, input.get(1)?);
    let image = &input[2..input.len().min(MEM + 2)];
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).expect("guest memory");
    mem.write_slice(image, GuestAddress(0)).expect("in memory");
    let disk = MemDisk {
        data: vec![0; DISK],
        read_only: flags & 1 != 0,
        fail: flags & 2 != 0,
        done: Vec::new(),
    };
    let mut blk = VirtioBlk::new(Box::new(disk)).expect("an eventfd");
    let mut q = Queue::new(256).expect("a queue");
    q.set_size(1 << (size % 9));
    let (desc, avail, used) = RINGS;
    q.set_desc_table_address(Some(desc as u32), Some(0));
    q.set_avail_ring_address(Some(avail as u32), Some(0));
    q.set_used_ring_address(Some(used as u32), Some(0));
    q.set_ready(true);
    // As the transport does: a queue that is not valid is not activated.
    if !q.is_valid(&mem) {
        return None;
    }
    let irq = Arc::new(VirtioInterrupt::new(Arc::new(NoMsi), 1));
    blk.activate(vec![q], mem.clone(), irq);
    // A second notification with nothing new.
    blk.serve();
    Some(mem)
}
