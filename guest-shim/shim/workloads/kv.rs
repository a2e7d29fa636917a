//! A Memcached-like key-value store.
//!
//! `K` keys (a power of two) live in an open-addressing hash index (twice as many
//! slots as keys, linear probing; a slot holds the key and where its value is) and
//! a slab area of four size classes (64, 256, 1024 and 4096-byte values, for 50,
//! 30, 15 and 5% of the keys), each key's value in a fixed slot of its class, as a
//! Memcached item is. A value holds its key, its version and words derived from
//! both; a shadow table holds each key's current version. After loading every key,
//! `ops` operations follow, `get_pct`% GETs and the rest SETs (which write the
//! next version), over keys drawn from a Zipf distribution (hot keys scattered
//! over the index and slabs). Every GET checks the whole value against the shadow
//! version, and its TSC latency goes into a log-linear histogram (12.5% buckets)
//! for the median and 99th percentile. With `scan`, half of the arena is a cold
//! area that a sequential scan reads a page of every 8 operations, verifying it.
//! At the end every value is checked once more, giving the checksum.

use super::{arena, corrupt, halves, vget};
use crate::abi::{VcpuConfig, WorkloadResult};
use crate::math::Zipf;
use crate::{Rng, mix, pat, rdtsc};

/// Words per value, per size class.
const CLASS_WORDS: [usize; 4] = [8, 32, 128, 512];
/// Bytes of index, shadow and average value per key, for sizing.
const BYTES_PER_KEY: usize = 32 + 4 + 467;
/// Histogram buckets: eight per power of two.
const BUCKETS: usize = 512;

fn class(seed: u64, id: u64) -> usize {
    match pat(seed ^ 0x434c_4153, id) % 100 {
        0..50 => 0,
        50..80 => 1,
        80..95 => 2,
        _ => 3,
    }
}

fn key(seed: u64, id: u64) -> u64 {
    pat(seed ^ 0x004b_4559, id) | 1
}

/// Value word `j` (past the two header words) of `key` at `version`.
fn value_word(key: u64, version: u32, j: usize) -> u64 {
    pat(key.wrapping_add(version as u64), j as u64)
}

fn bucket(x: u64) -> usize {
    if x < 8 {
        return x as usize;
    }
    let m = 63 - x.leading_zeros() as usize;
    8 * (m - 2) + ((x >> (m - 3)) & 7) as usize
}

/// The middle of bucket `i`'s range.
fn bucket_mid(i: usize) -> u64 {
    if i < 8 {
        return i as u64;
    }
    let (m, sub) = (i / 8 + 2, i % 8);
    ((8 + sub as u64) << (m - 3)) + ((1u64 << (m - 3)) >> 1)
}

fn percentile(h: &[u32; BUCKETS], n: u64, p: u64) -> u64 {
    let want = (n * p).div_ceil(100).max(1);
    let mut seen = 0u64;
    for (i, &c) in h.iter().enumerate() {
        seen += c as u64;
        if seen >= want {
            return bucket_mid(i);
        }
    }
    0
}

pub fn run(cfg: &VcpuConfig) -> WorkloadResult {
    let words = arena(cfg);
    let seed = cfg.seed;
    let (cold, words) = words.split_at_mut(if cfg.scan != 0 {
        (words.len() / 2) & !511
    } else {
        0
    });
    // The most keys (a power of two) whose index, shadow and values fit.
    let mut k = 1usize;
    while (k * 2) * BYTES_PER_KEY <= words.len() * 8 {
        k *= 2;
    }
    let counts = loop {
        let mut counts = [0usize; 4];
        for id in 0..k {
            counts[class(seed, id as u64)] += 1;
        }
        let slab: usize = counts.iter().zip(CLASS_WORDS).map(|(n, w)| n * w).sum();
        if 4 * k + k / 2 + slab <= words.len() || k < 2 {
            break counts;
        }
        k /= 2;
    };
    if k < 2 {
        return WorkloadResult {
            failed: 1,
            ..Default::default()
        };
    }
    let (index, rest) = words.split_at_mut(4 * k);
    let (shadow, slab) = rest.split_at_mut(k / 2);
    let shadow = halves(shadow);
    let mask = 2 * k - 1;
    let mut class_at = [0usize; 4];
    for c in 1..4 {
        class_at[c] = class_at[c - 1] + counts[c - 1] * CLASS_WORDS[c - 1];
    }

    // Load: every key at version 0; the cold area's pattern.
    let t0 = rdtsc();
    index.fill(0);
    for id in 0..k as u64 {
        let (key, c) = (key(seed, id), class(seed, id));
        let at = class_at[c];
        class_at[c] += CLASS_WORDS[c];
        let mut s = key as usize & mask;
        while index[2 * s] != 0 {
            s = (s + 1) & mask;
        }
        index[2 * s] = key;
        index[2 * s + 1] = id << 32 | at as u64;
        shadow[id as usize] = 0;
        slab[at] = key;
        slab[at + 1] = 0;
        for j in 2..CLASS_WORDS[c] {
            slab[at + j] = value_word(key, 0, j);
        }
    }
    for (i, w) in cold.iter_mut().enumerate() {
        *w = pat(seed ^ 0x434f_4c44, i as u64);
    }

    // Looks `id` up; checks and mixes its whole value; returns (bad, mix).
    let get = |index: &[u64], slab: &[u64], shadow: &[u32], id: u64| -> (u64, u64) {
        let key = key(seed, id);
        let mut s = key as usize & mask;
        loop {
            let k = vget(index, 2 * s);
            if k == key {
                break;
            }
            if k == 0 {
                return (1, 0);
            }
            s = (s + 1) & mask;
        }
        let loc = vget(index, 2 * s + 1);
        let at = (loc & 0xffff_ffff) as usize;
        let ver = vget(shadow, id as usize);
        let mut bad = (loc >> 32 != id) as u64;
        bad += (vget(slab, at) != key) as u64 + (vget(slab, at + 1) != ver as u64) as u64;
        let mut m = 0;
        for j in 2..CLASS_WORDS[class(seed, id)] {
            let v = vget(slab, at + j);
            bad += (v != value_word(key, ver, j)) as u64;
            m = mix(m, v);
        }
        (bad, m)
    };

    // Operations.
    let t1 = rdtsc();
    let zipf = Zipf::new(k as u64, cfg.zipf_theta_milli as f64 / 1000.0);
    let mut rng = Rng::new(seed);
    let (scramble_mul, scramble_add) = (rng.next() | 1, rng.next());
    let ops = if cfg.ops == 0 { 4 * k as u64 } else { cfg.ops };
    let mut hist = [0u32; BUCKETS];
    let (mut bad, mut gets, mut ck, mut cursor) = (0u64, 0u64, 0u64, 0usize);
    for op in 0..ops {
        let rank = zipf.sample(rng.unit()) - 1;
        let id = rank.wrapping_mul(scramble_mul).wrapping_add(scramble_add) & (k as u64 - 1);
        if rng.below(100) < cfg.get_pct as u64 {
            let t = rdtsc();
            let (b, m) = get(index, slab, shadow, id);
            hist[bucket(rdtsc() - t).min(BUCKETS - 1)] += 1;
            bad += b;
            ck = mix(ck, m);
            gets += 1;
        } else {
            let (key, ver) = (key(seed, id), shadow[id as usize].wrapping_add(1));
            let mut s = key as usize & mask;
            while index[2 * s] != key && index[2 * s] != 0 {
                s = (s + 1) & mask;
            }
            let loc = index[2 * s + 1];
            let at = (loc & 0xffff_ffff) as usize;
            if index[2 * s] != key || loc >> 32 != id {
                // The index lost the key: a failure, not a write to a stranger's value.
                bad += 1;
            } else {
                slab[at + 1] = ver as u64;
                for j in 2..CLASS_WORDS[class(seed, id)] {
                    slab[at + j] = value_word(key, ver, j);
                }
                shadow[id as usize] = ver;
            }
        }
        if !cold.is_empty() && op % 8 == 7 {
            for i in cursor..cursor + 512 {
                bad += (vget(cold, i) != pat(seed ^ 0x434f_4c44, i as u64)) as u64;
            }
            cursor = (cursor + 512) % cold.len();
        }
    }
    corrupt(cfg, slab, 2);

    // Every value once more.
    let t2 = rdtsc();
    for id in 0..k as u64 {
        let (b, m) = get(index, slab, shadow, id);
        bad += b;
        ck = mix(ck, m);
    }
    let t3 = rdtsc();
    WorkloadResult {
        mismatches: bad,
        checksum: ck,
        ops,
        bytes: cfg.size,
        lat_p50: percentile(&hist, gets, 50),
        lat_p99: percentile(&hist, gets, 99),
        phases: [t1 - t0, t2 - t1, t3 - t2, 0],
        aux: gets,
        ..Default::default()
    }
}
