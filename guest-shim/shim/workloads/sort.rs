//! Sorts `size / 16` random 64-bit keys (the other half of the arena is the
//! scratch buffer) with an LSD radix sort: eight passes of 8-bit digits, each a
//! histogram read, then a scatter into 256 output streams. Verification: the
//! result is in order, and its multiset checksums (wrapping sum of the keys, and
//! the sum and xor of a mix of each key) are those of the keys generated.

use super::{arena, corrupt, vget};
use crate::abi::{VcpuConfig, WorkloadResult};
use crate::{mix, pat, rdtsc};

/// Multiset fingerprint: order-independent, changed by any lost, duplicated or
/// altered key.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
struct Multiset {
    sum: u64,
    mixed_sum: u64,
    mixed_xor: u64,
}

impl Multiset {
    fn add(&mut self, k: u64) {
        let m = pat(0x5052_4f42, k);
        self.sum = self.sum.wrapping_add(k);
        self.mixed_sum = self.mixed_sum.wrapping_add(m);
        self.mixed_xor ^= m;
    }
}

/// One stable counting pass on the digit at `shift`.
fn radix_pass(src: &[u64], dst: &mut [u64], shift: u32) {
    let mut at = [0usize; 256];
    for &k in src {
        at[((k >> shift) & 0xff) as usize] += 1;
    }
    let mut sum = 0;
    for a in at.iter_mut() {
        let n = *a;
        *a = sum;
        sum += n;
    }
    for &k in src {
        let d = ((k >> shift) & 0xff) as usize;
        dst[at[d]] = k;
        at[d] += 1;
    }
}

pub fn run(cfg: &VcpuConfig) -> WorkloadResult {
    let words = arena(cfg);
    let n = words.len() / 2;
    if n < 2 {
        return WorkloadResult { failed: 1, ..Default::default() };
    }
    let (keys, tmp) = words.split_at_mut(n);
    let tmp = &mut tmp[..n];
    let t0 = rdtsc();
    let mut before = Multiset::default();
    for (i, k) in keys.iter_mut().enumerate() {
        *k = pat(cfg.seed, i as u64);
        before.add(*k);
    }
    let t1 = rdtsc();
    for pass in 0..8 {
        if pass % 2 == 0 {
            radix_pass(keys, tmp, pass * 8);
        } else {
            radix_pass(tmp, keys, pass * 8);
        }
    }
    let t2 = rdtsc();
    corrupt(cfg, keys, n / 2);
    let (mut after, mut unsorted, mut ck, mut prev) = (Multiset::default(), 0u64, 0u64, 0u64);
    for i in 0..n {
        let k = vget(keys, i);
        unsorted += (k < prev) as u64;
        prev = k;
        after.add(k);
        ck = mix(ck, k);
    }
    let t3 = rdtsc();
    let n8 = n as u64 * 8;
    WorkloadResult {
        mismatches: unsorted + (after != before) as u64,
        checksum: ck,
        ops: n as u64,
        bytes: 2 * n8,
        phases: [t1 - t0, t2 - t1, t3 - t2, 0],
        // Each pass reads the keys twice and writes them once.
        aux: 8 * 3 * n8,
        ..Default::default()
    }
}
