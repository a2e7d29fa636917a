//! Sorts `size / 16` random 64-bit keys (the other half of the arena is the
//! scratch buffer) with an LSD radix sort: one read for every pass's histogram,
//! then eleven passes of 6-bit digits, each a scatter into 64 output streams. Verification: the
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

/// Bits per digit: 64 buckets, so a pass writes 64 sequential streams (a page of
/// each resident is 256 KiB: a small cache keeps them).
const BITS: u32 = 6;
const RADIX: usize = 1 << BITS;
const PASSES: usize = 64usize.div_ceil(BITS as usize);

/// One stable counting pass on the digit at `shift`, from its histogram.
fn radix_pass(src: &[u64], dst: &mut [u64], shift: u32, hist: &[usize; RADIX]) {
    let mut at = [0usize; RADIX];
    for d in 1..RADIX {
        at[d] = at[d - 1] + hist[d - 1];
    }
    for &k in src {
        let d = ((k >> shift) as usize) & (RADIX - 1);
        dst[at[d]] = k;
        at[d] += 1;
    }
}

pub fn run(cfg: &VcpuConfig) -> WorkloadResult {
    let words = arena(cfg);
    let n = words.len() / 2;
    if n < 2 {
        return WorkloadResult {
            failed: 1,
            ..Default::default()
        };
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
    // Every pass's histogram in one read.
    let mut hist = [[0usize; RADIX]; PASSES];
    for &k in keys.iter() {
        for (p, h) in hist.iter_mut().enumerate() {
            h[((k >> (p as u32 * BITS)) as usize) & (RADIX - 1)] += 1;
        }
    }
    for (p, h) in hist.iter().enumerate() {
        let shift = p as u32 * BITS;
        if p % 2 == 0 {
            radix_pass(keys, tmp, shift, h);
        } else {
            radix_pass(tmp, keys, shift, h);
        }
    }
    // An odd number of passes leaves the result in the scratch half.
    let sorted = if PASSES % 2 == 1 { tmp } else { keys };
    let t2 = rdtsc();
    corrupt(cfg, sorted, n / 2);
    let (mut after, mut unsorted, mut ck, mut prev) = (Multiset::default(), 0u64, 0u64, 0u64);
    for i in 0..n {
        let k = vget(sorted, i);
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
        // One read for the histograms, then each pass reads and writes the keys once.
        aux: (1 + 2 * PASSES as u64) * n8,
        ..Default::default()
    }
}
