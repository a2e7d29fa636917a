//! PageRank and BFS over a synthetic power-law graph, as GAPBS runs them.
//!
//! The graph: `V = 2^scale` vertices (the largest that fits the arena) and
//! `E = degree × V` directed edges drawn by the R-MAT generator (Graph500's
//! a, b, c = 0.57, 0.19, 0.19), vertex ids scrambled by a bijection so that hubs
//! are spread over memory. It is built in CSR form (offsets, targets) from an edge
//! list partitioned by source (see `run`), so that the build never scatters writes
//! over more than 1/256 of the graph at a time.
//!
//! PageRank (push, damping 0.85) runs `iters` iterations in 40-bit fixed point.
//! Every division rounds down, so the ranks' sum never exceeds 1 and loses less
//! than `E + 2V + 2` units per iteration: the check is that the sum lies within
//! `iters` such losses of 1, and that every rank is at least the teleport share.
//! BFS runs from the vertex of highest out-degree; the check is that the source
//! has depth 0, every successor of a reached vertex is reached with a depth at most
//! one more, and every other reached vertex has a predecessor one level up.

use super::{arena, corrupt, halves, vget};
use crate::abi::{VcpuConfig, WorkloadResult};
use crate::{Rng, mix, rdtsc};

/// 1.0 in the ranks' fixed point.
const ONE: u64 = 1 << 40;
/// A vertex the BFS has not reached.
const UNSEEN: u32 = 0x7fff_ffff;
/// Verification's mark on a depth: "has a predecessor one level up".
const HAS_PARENT: u32 = 0x8000_0000;
/// Buckets of sources the build partitions the edge list into.
const BUCKETS: usize = 256;

/// The R-MAT edge stream for a seed.
struct Rmat {
    rng: Rng,
    scale: u32,
    mul: u64,
    add: u64,
}

impl Rmat {
    fn new(seed: u64, scale: u32) -> Self {
        let mut rng = Rng::new(seed ^ 0x0047_5241_5048);
        let mul = rng.next() | 1;
        let add = rng.next();
        Rmat {
            rng,
            scale,
            mul,
            add,
        }
    }

    fn scramble(&self, v: u64) -> u32 {
        (v.wrapping_mul(self.mul).wrapping_add(self.add) & ((1u64 << self.scale) - 1)) as u32
    }

    fn edge(&mut self) -> (u32, u32) {
        let (mut u, mut v) = (0u64, 0u64);
        let mut bits = 0u64;
        for level in 0..self.scale {
            if level % 4 == 0 {
                bits = self.rng.next();
            }
            let r = bits & 0xffff;
            bits >>= 16;
            // Quadrants a | b / c | d with probabilities 0.57, 0.19, 0.19, 0.05.
            let (du, dv) = match r {
                0..37356 => (0, 0),
                37356..49807 => (0, 1),
                49807..62259 => (1, 0),
                _ => (1, 1),
            };
            u = u << 1 | du;
            v = v << 1 | dv;
        }
        (self.scramble(u), self.scramble(v))
    }
}

pub fn run(cfg: &VcpuConfig) -> WorkloadResult {
    let words = arena(cfg);
    let degree = if cfg.degree == 0 {
        16
    } else {
        cfg.degree as usize
    };
    // Per vertex: offset, rank, next rank (words), depth and queue slot (a word
    // of halves), `degree` targets (halves) and `degree` edges of the edge list.
    let words_for = |scale: u32| 1 + (1usize << scale) * (4 + degree.div_ceil(2) + degree);
    let mut scale = 8;
    if words_for(scale) > words.len() {
        return WorkloadResult {
            failed: 1,
            ..Default::default()
        };
    }
    while words_for(scale + 1) <= words.len() {
        scale += 1;
    }
    let v_n = 1usize << scale;
    let e_n = v_n * degree;
    let (off, rest) = words.split_at_mut(v_n + 1);
    let (rank, rest) = rest.split_at_mut(v_n);
    let (next, rest) = rest.split_at_mut(v_n);
    let (dq, rest) = rest.split_at_mut(v_n);
    let (depth, queue) = halves(dq).split_at_mut(v_n);
    let (targets, rest) = rest.split_at_mut(e_n.div_ceil(2));
    let targets = &mut halves(targets)[..e_n];
    let edges = &mut rest[..e_n];

    // Build, with no scattered writes over more than 1/256 of the graph: count
    // the edges per bucket of 1/256 of the sources, write the edge list bucket by
    // bucket (256 sequential streams), then per bucket count out-degrees, prefix-sum
    // them into offsets and place its targets.
    let t0 = rdtsc();
    let bshift = scale - 8;
    let mut bstart = [0usize; BUCKETS + 1];
    let mut g = Rmat::new(cfg.seed, scale);
    for _ in 0..e_n {
        let (u, _) = g.edge();
        bstart[(u >> bshift) as usize + 1] += 1;
    }
    for b in 0..BUCKETS {
        bstart[b + 1] += bstart[b];
    }
    let mut cur = [0usize; BUCKETS];
    cur.copy_from_slice(&bstart[..BUCKETS]);
    let mut g = Rmat::new(cfg.seed, scale);
    for _ in 0..e_n {
        let (u, v) = g.edge();
        let b = (u >> bshift) as usize;
        edges[cur[b]] = (u as u64) << 32 | v as u64;
        cur[b] += 1;
    }
    off.fill(0);
    for b in 0..BUCKETS {
        let bucket = &edges[bstart[b]..bstart[b + 1]];
        for &e in bucket {
            off[(e >> 32) as usize + 1] += 1;
        }
        let (lo, hi) = (b << bshift, (b + 1) << bshift);
        for u in lo..hi {
            off[u + 1] += off[u];
        }
        next[lo..hi].copy_from_slice(&off[lo..hi]);
        for &e in bucket {
            let u = (e >> 32) as usize;
            targets[next[u] as usize] = e as u32;
            next[u] += 1;
        }
    }
    let (mut bad, mut src, mut best) = ((vget(off, v_n) != e_n as u64) as u64, 0usize, 0u64);
    for u in 0..v_n {
        let end = vget(off, u + 1);
        bad += (vget(next, u) != end) as u64;
        if end - vget(off, u) > best {
            (src, best) = (u, end - vget(off, u));
        }
    }

    // PageRank.
    let t1 = rdtsc();
    let iters = if cfg.iters == 0 { 5 } else { cfg.iters as u64 };
    rank.fill(ONE / v_n as u64);
    for _ in 0..iters {
        next.fill(0);
        let mut dangling = 0u64;
        for u in 0..v_n {
            let (a, b) = (off[u] as usize, off[u + 1] as usize);
            if a == b {
                dangling += rank[u];
                continue;
            }
            let share = rank[u] / (b - a) as u64;
            for &t in &targets[a..b] {
                next[t as usize] += share;
            }
        }
        let base = (ONE * 15 / 100 + dangling * 85 / 100) / v_n as u64;
        for (r, n) in rank.iter_mut().zip(next.iter()) {
            *r = base + *n * 85 / 100;
        }
    }

    // BFS.
    let t2 = rdtsc();
    depth.fill(UNSEEN);
    depth[src] = 0;
    queue[0] = src as u32;
    let (mut head, mut tail) = (0usize, 1usize);
    while head < tail {
        let u = queue[head] as usize;
        head += 1;
        for &t in &targets[off[u] as usize..off[u + 1] as usize] {
            if depth[t as usize] == UNSEEN {
                depth[t as usize] = depth[u] + 1;
                queue[tail] = t;
                tail += 1;
            }
        }
    }
    corrupt(cfg, depth, src);

    // Verify.
    let t3 = rdtsc();
    let (mut sum, floor) = (0u64, ONE * 15 / 100 / v_n as u64);
    let mut ck = 0u64;
    for u in 0..v_n {
        let r = vget(rank, u);
        bad += (r < floor || r > ONE) as u64;
        sum = sum.wrapping_add(r);
        ck = mix(ck, r);
    }
    let loss = iters * (e_n as u64 + 2 * v_n as u64 + 2);
    bad += (sum > ONE || sum < ONE - loss) as u64;
    bad += (vget(depth, src) != 0) as u64;
    for u in 0..v_n {
        let du = vget(depth, u) & !HAS_PARENT;
        if du == UNSEEN {
            continue;
        }
        for e in vget(off, u) as usize..vget(off, u + 1) as usize {
            let t = vget(targets, e) as usize;
            if t >= v_n {
                bad += 1;
                continue;
            }
            let dt = vget(depth, t);
            let d = dt & !HAS_PARENT;
            bad += (d == UNSEEN || d > du + 1) as u64;
            if d == du + 1 {
                depth[t] = dt | HAS_PARENT;
            }
        }
    }
    let mut reached = 0u64;
    for v in 0..v_n {
        let dv = vget(depth, v);
        let d = dv & !HAS_PARENT;
        if d != UNSEEN {
            reached += 1;
            bad += (v != src && dv & HAS_PARENT == 0) as u64;
        }
        ck = mix(ck, d as u64);
    }
    let t4 = rdtsc();
    WorkloadResult {
        mismatches: bad,
        checksum: ck,
        ops: (iters + 1) * e_n as u64,
        bytes: 8 * words_for(scale) as u64,
        phases: [t1 - t0, t2 - t1, t3 - t2, t4 - t3],
        aux: reached,
        ..Default::default()
    }
}
