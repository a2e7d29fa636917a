//! STREAM (McCalpin) over three arrays a, b, c of 64-bit integers, repeated
//! `iters` times: copy c = a; scale b = 3c; add c = a + b; triad a = b + 3c (all
//! wrapping). Each kernel's cycles are reported (the VMM turns them into
//! bandwidth); afterwards every element of all three arrays is checked against the
//! same recurrence computed per element from its initial value.

use super::{arena, corrupt, vget};
use crate::abi::{PHASE_ADD, PHASE_COPY, PHASE_SCALE, PHASE_TRIAD, VcpuConfig, WorkloadResult};
use crate::{mix, pat, rdtsc};

const SCALAR: u64 = 3;

/// What (a, b, c) hold after `iters` rounds, from a's initial value.
fn expected(a0: u64, iters: u32) -> (u64, u64, u64) {
    let (mut a, mut b, mut c) = (a0, 0u64, 0u64);
    for _ in 0..iters {
        c = a;
        b = SCALAR.wrapping_mul(c);
        c = a.wrapping_add(b);
        a = b.wrapping_add(SCALAR.wrapping_mul(c));
    }
    (a, b, c)
}

pub fn run(cfg: &VcpuConfig) -> WorkloadResult {
    let words = arena(cfg);
    // Three page-aligned arrays of n words each.
    let n = (words.len() / 3) & !511;
    if n == 0 {
        return WorkloadResult {
            failed: 1,
            ..Default::default()
        };
    }
    let iters = if cfg.iters == 0 { 2 } else { cfg.iters };
    let (a, rest) = words.split_at_mut(n);
    let (b, rest) = rest.split_at_mut(n);
    let c = &mut rest[..n];
    for i in 0..n {
        a[i] = pat(cfg.seed, i as u64);
        b[i] = 0;
        c[i] = 0;
    }
    let mut phases = [0u64; 4];
    let mut timed = |k: usize, f: &mut dyn FnMut()| {
        let t = rdtsc();
        f();
        phases[k] += rdtsc() - t;
    };
    for _ in 0..iters {
        timed(PHASE_COPY, &mut || c.copy_from_slice(a));
        timed(PHASE_SCALE, &mut || {
            for (b, c) in b.iter_mut().zip(c.iter()) {
                *b = SCALAR.wrapping_mul(*c);
            }
        });
        timed(PHASE_ADD, &mut || {
            for ((c, a), b) in c.iter_mut().zip(a.iter()).zip(b.iter()) {
                *c = a.wrapping_add(*b);
            }
        });
        timed(PHASE_TRIAD, &mut || {
            for ((a, b), c) in a.iter_mut().zip(b.iter()).zip(c.iter()) {
                *a = b.wrapping_add(SCALAR.wrapping_mul(*c));
            }
        });
    }
    corrupt(cfg, b, n / 2);
    let (mut mism, mut ck) = (0u64, 0u64);
    for i in 0..n {
        let (ea, eb, ec) = expected(pat(cfg.seed, i as u64), iters);
        let (x, y, z) = (vget(a, i), vget(b, i), vget(c, i));
        mism += (x != ea) as u64 + (y != eb) as u64 + (z != ec) as u64;
        ck = mix(mix(mix(ck, x), y), z);
    }
    let n8 = n as u64 * 8;
    WorkloadResult {
        mismatches: mism,
        checksum: ck,
        ops: 4 * iters as u64 * n as u64,
        bytes: 3 * n8,
        phases,
        aux: iters as u64 * (2 + 2 + 3 + 3) * n8,
        ..Default::default()
    }
}
