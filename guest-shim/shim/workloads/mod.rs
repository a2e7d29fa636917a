//! The far-memory application workloads: each runs on this vCPU's part of the
//! arena only (so a multi-vCPU run partitions the data by vCPU), is deterministic
//! from its seed and size, and verifies what it computed.

pub mod graph;
pub mod kv;
pub mod sort;
pub mod stream;
pub mod stride;

use crate::abi::VcpuConfig;
use core::ptr::{read_volatile, write_volatile};

/// This vCPU's part of the arena, as words.
pub fn arena(c: &VcpuConfig) -> &'static mut [u64] {
    // SAFETY: [base, base + size) is this vCPU's share of guest RAM: identity-mapped,
    // user-accessible, page-aligned, and used by nothing else (the VMM gives each
    // vCPU a disjoint share, and the caller is this vCPU's only workload).
    unsafe { core::slice::from_raw_parts_mut(c.base as *mut u64, (c.size / 8) as usize) }
}

/// The words of `s` as twice as many 32-bit words.
pub fn halves(s: &mut [u64]) -> &mut [u32] {
    // SAFETY: the same memory, exclusively borrowed for the result's lifetime; u32
    // has weaker alignment than u64 and every bit pattern is valid for both.
    unsafe { core::slice::from_raw_parts_mut(s.as_mut_ptr() as *mut u32, s.len() * 2) }
}

/// Reads `s[i]` from memory (never from a value the compiler remembers), for
/// verification passes.
pub fn vget<T: Copy>(s: &[T], i: usize) -> T {
    // SAFETY: a reference to an element of a live slice is valid for reads.
    unsafe { read_volatile(&s[i]) }
}

/// Test hook ([`VcpuConfig::corrupt`]): flips one bit of `s[i]` behind the
/// workload's back.
pub fn corrupt<T: Copy + core::ops::BitXor<Output = T> + From<u8>>(
    c: &VcpuConfig,
    s: &mut [T],
    i: usize,
) {
    if c.corrupt != 0 && i < s.len() {
        let p = &mut s[i] as *mut T;
        // SAFETY: p comes from an exclusive reference to a live element.
        unsafe { write_volatile(p, read_volatile(p) ^ T::from(1u8)) };
    }
}
