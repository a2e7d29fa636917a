//! Fixed-stride scans for prefetchers: the arena is split into `streams` equal
//! regions, and one pass visits position k of every region before position k + 1
//! of any, each region from its start upwards (positive stride) or from its end
//! downwards (negative), `|stride|` bytes apart. The first pass writes a pattern
//! word at every position, the second reads each back in the same order and
//! verifies it.

use super::{arena, corrupt, vget};
use crate::abi::{VcpuConfig, WorkloadResult};
use crate::{mix, pat, rdtsc};

pub fn run(cfg: &VcpuConfig) -> WorkloadResult {
    let words = arena(cfg);
    let stride = if cfg.stride == 0 { 4096 } else { cfg.stride };
    let step = (stride.unsigned_abs() / 8) as usize;
    let streams = cfg.streams.max(1) as usize;
    // Each region whole pages.
    let len = (words.len() / streams) & !511;
    if stride.unsigned_abs() % 8 != 0 || len == 0 || step > len {
        return WorkloadResult {
            failed: 1,
            ..Default::default()
        };
    }
    let count = len.div_ceil(step);
    let pos = |s: usize, k: usize| -> usize {
        if stride > 0 {
            s * len + k * step
        } else {
            s * len + len - 1 - k * step
        }
    };
    let t0 = rdtsc();
    for k in 0..count {
        for s in 0..streams {
            let i = pos(s, k);
            words[i] = pat(cfg.seed, i as u64);
        }
    }
    let t1 = rdtsc();
    corrupt(cfg, words, pos(0, 0));
    let (mut mism, mut ck) = (0u64, 0u64);
    for k in 0..count {
        for s in 0..streams {
            let i = pos(s, k);
            let v = vget(words, i);
            mism += (v != pat(cfg.seed, i as u64)) as u64;
            ck = mix(ck, v);
        }
    }
    let t2 = rdtsc();
    let visits = (count * streams) as u64;
    WorkloadResult {
        mismatches: mism,
        checksum: ck,
        ops: 2 * visits,
        bytes: (streams * len * 8) as u64,
        phases: [t1 - t0, t2 - t1, 0, 0],
        aux: visits,
        ..Default::default()
    }
}
