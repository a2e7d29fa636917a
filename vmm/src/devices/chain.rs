//! Guest memory as a descriptor chain lays it out: a list of regions
//! (address, length), already checked to lie inside guest memory, that data is
//! copied into or out of in order.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// Copies from `regions` into `buf` until either ends; returns bytes copied.
pub fn read_regions<M: GuestMemoryBackend>(
    mem: &M,
    regions: &[(GuestAddress, usize)],
    buf: &mut [u8],
) -> usize {
    let mut at = 0;
    for &(a, l) in regions {
        let n = l.min(buf.len() - at);
        if n == 0 || mem.read_slice(&mut buf[at..at + n], a).is_err() {
            break;
        }
        at += n;
    }
    at
}

/// Copies `buf` into `regions` until either ends; false if guest memory refused.
pub fn write_regions<M: GuestMemoryBackend>(
    mem: &M,
    regions: &[(GuestAddress, usize)],
    buf: &[u8],
) -> bool {
    let mut at = 0;
    for &(a, l) in regions {
        let n = l.min(buf.len() - at);
        if n == 0 {
            break;
        }
        if mem.write_slice(&buf[at..at + n], a).is_err() {
            return false;
        }
        at += n;
    }
    true
}
