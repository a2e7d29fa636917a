//! The guest shim program: runs one verified memory workload at CPL3 and reports to
//! the VMM. Built by `../build.rs`; see `../src/abi.rs` for the ABI.
#![no_std]
#![no_main]
#![allow(clippy::missing_safety_doc)]

#[path = "../src/abi.rs"]
#[allow(dead_code)]
mod abi;
mod math;
mod workloads;

use abi::*;
use core::fmt::Write;
use core::ptr::{read_volatile, write_volatile};

/// The vCPU's mailbox (config, result, log buffer).
struct Mailbox(*mut u8);

impl Mailbox {
    fn config(&self) -> &mut VcpuConfig {
        // SAFETY: the VMM places a VcpuConfig at the mailbox start; the mailbox is
        // this vCPU's alone and lives for the whole run.
        unsafe { &mut *(self.0 as *mut VcpuConfig) }
    }

    fn call(&self, nr: u32) {
        // SAFETY: the doorbell page is mapped in our page tables with no memory
        // behind it: the write exits to the VMM, which handles it before resuming us.
        unsafe { write_volatile(DOORBELL_ADDR as *mut u32, nr) };
    }

    fn log(&self, args: core::fmt::Arguments<'_>) {
        let mut w = LogWriter { mb: self, len: 0 };
        let _ = w.write_fmt(args);
        self.config().log_len = w.len as u32;
        self.call(CALL_LOG);
    }

    fn exit(&self, code: u32) -> ! {
        self.config().exit_code = code;
        loop {
            self.call(CALL_EXIT);
        }
    }
}

struct LogWriter<'a> {
    mb: &'a Mailbox,
    len: usize,
}

impl Write for LogWriter<'_> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for &b in s.as_bytes() {
            if self.len as u64 >= LOG_SIZE {
                break;
            }
            // SAFETY: within the mailbox's log buffer (bounded by LOG_SIZE above).
            unsafe { *self.mb.0.add(LOG_OFFSET as usize + self.len) = b };
            self.len += 1;
        }
        Ok(())
    }
}

static mut MAILBOX: *mut u8 = core::ptr::null_mut();

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    // SAFETY: MAILBOX is set once at entry, before anything can panic.
    let mb = Mailbox(unsafe { MAILBOX });
    mb.log(format_args!("guest-shim panicked: {info}"));
    mb.exit(101)
}

#[unsafe(no_mangle)]
#[unsafe(link_section = ".text._start")]
pub extern "C" fn _start(_vcpu: u64, mailbox: u64) -> ! {
    // SAFETY: single write at entry, before any other use.
    unsafe { MAILBOX = mailbox as *mut u8 };
    let mb = Mailbox(mailbox as *mut u8);
    let cfg = *mb.config();
    if cfg.magic != CONFIG_MAGIC {
        mb.log(format_args!("guest-shim: no configuration in the mailbox"));
        mb.exit(2);
    }
    let t0 = rdtsc();
    let mut r = match cfg.workload {
        WL_SEQ => seq(&cfg),
        WL_RAND => rand(&cfg),
        WL_CHASE => chase(&cfg),
        WL_HASH => hash(&cfg),
        WL_GRAPH => workloads::graph::run(&cfg),
        WL_KV => workloads::kv::run(&cfg),
        WL_SORT => workloads::sort::run(&cfg),
        WL_STREAM => workloads::stream::run(&cfg),
        WL_STRIDE => workloads::stride::run(&cfg),
        other => {
            mb.log(format_args!("guest-shim: unknown workload {other}"));
            mb.exit(2);
        }
    };
    r.workload = cfg.workload;
    r.cycles = rdtsc() - t0;
    r.failed = (r.mismatches != 0) as u32 | r.failed;
    // SAFETY: the result slot lies within this vCPU's mailbox.
    unsafe { write_volatile(mailbox.wrapping_add(RESULT_OFFSET) as *mut WorkloadResult, r) };
    mb.call(CALL_RESULT);
    mb.exit(r.failed)
}

fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no memory effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// splitmix64: the value word `i` should hold under `seed`.
fn pat(seed: u64, i: u64) -> u64 {
    let mut z = seed ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// xorshift64* PRNG.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(pat(seed, 0x5eed) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        ((self.next() as u128 * n as u128) >> 64) as u64
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn word(base: u64, i: u64) -> *mut u64 {
    (base + i * 8) as *mut u64
}

fn rd(base: u64, i: u64) -> u64 {
    // SAFETY: callers index within [base, base + size), the arena the VMM gave this
    // vCPU; it is identity-mapped and user-accessible.
    unsafe { read_volatile(word(base, i)) }
}

fn wr(base: u64, i: u64, v: u64) {
    // SAFETY: as in `rd`.
    unsafe { write_volatile(word(base, i), v) }
}

fn mix(ck: u64, v: u64) -> u64 {
    (ck ^ v).rotate_left(7).wrapping_add(0x9e37_79b9)
}

/// Sequential: write every word, then read every word back and verify.
fn seq(c: &VcpuConfig) -> WorkloadResult {
    let words = c.size / 8;
    for i in 0..words {
        wr(c.base, i, pat(c.seed, i));
    }
    let (mut mism, mut ck) = (0, 0);
    for i in 0..words {
        let v = rd(c.base, i);
        mism += (v != pat(c.seed, i)) as u64;
        ck = mix(ck, v);
    }
    WorkloadResult { mismatches: mism, checksum: ck, ops: 2 * words, bytes: 2 * c.size, ..Default::default() }
}

/// Random: pages carry a version (one byte each, in a table at the arena's start);
/// random operations either check a random word of a page against its version or
/// rewrite the whole page with the next version; finally every page is verified.
fn rand(c: &VcpuConfig) -> WorkloadResult {
    const WPP: u64 = 512; // words per page
    let pages = c.size / 4096;
    let vpages = pages.div_ceil(4096);
    if pages <= vpages {
        return WorkloadResult { failed: 1, ..Default::default() };
    }
    let data = c.base + vpages * 4096;
    let dpages = pages - vpages;
    let ver = |p: u64| -> u64 {
        // SAFETY: the version table holds one byte per data page.
        unsafe { read_volatile((c.base + p) as *const u8) as u64 }
    };
    let set_ver = |p: u64, v: u64| {
        // SAFETY: as above.
        unsafe { write_volatile((c.base + p) as *mut u8, v as u8) }
    };
    let fill = |p: u64, v: u64| {
        for w in 0..WPP {
            wr(data, p * WPP + w, pat(c.seed ^ v, p * WPP + w));
        }
    };
    for p in 0..dpages {
        set_ver(p, 0);
        fill(p, 0);
    }
    let mut rng = Rng::new(c.seed);
    let mut mism = 0;
    let ops = if c.ops == 0 { dpages * 4 } else { c.ops };
    for _ in 0..ops {
        let r = rng.next();
        let p = ((r as u128 * dpages as u128) >> 64) as u64;
        if r & 1 == 0 {
            let w = (r >> 1) % WPP;
            mism += (rd(data, p * WPP + w) != pat(c.seed ^ ver(p), p * WPP + w)) as u64;
        } else {
            let v = (ver(p) + 1) & 0xff;
            set_ver(p, v);
            fill(p, v);
        }
    }
    let mut ck = 0;
    for p in 0..dpages {
        let v = ver(p);
        for w in 0..WPP {
            let x = rd(data, p * WPP + w);
            mism += (x != pat(c.seed ^ v, p * WPP + w)) as u64;
            ck = mix(ck, x);
        }
    }
    WorkloadResult { mismatches: mism, checksum: ck, ops, bytes: c.size, ..Default::default() }
}

/// Pointer chase over 64-byte slots linked in one random cycle (Sattolo's shuffle).
/// Following the cycle for as many steps as it has slots must return to the start.
fn chase(c: &VcpuConfig) -> WorkloadResult {
    const SLOT: u64 = 8; // words per slot
    let n = c.size / 64;
    if n < 2 {
        return WorkloadResult { failed: 1, ..Default::default() };
    }
    for i in 0..n {
        wr(c.base, i * SLOT, i);
    }
    let mut rng = Rng::new(c.seed);
    for i in (1..n).rev() {
        let j = rng.below(i);
        let (a, b) = (rd(c.base, i * SLOT), rd(c.base, j * SLOT));
        wr(c.base, i * SLOT, b);
        wr(c.base, j * SLOT, a);
    }
    let steps = if c.ops == 0 { n } else { c.ops };
    let (mut cur, mut ck, mut bad) = (0u64, 0u64, 0u64);
    for _ in 0..steps {
        cur = rd(c.base, cur * SLOT);
        if cur >= n {
            bad += 1;
            break;
        }
        ck = mix(ck, cur);
    }
    // A single cycle through all n slots returns to 0 after exactly n steps.
    if steps % n == 0 && cur != 0 {
        bad += 1;
    }
    WorkloadResult { mismatches: bad, checksum: ck, ops: steps, bytes: c.size, ..Default::default() }
}

/// Hash table (open addressing, linear probing) of (key, value) pairs: insert `ops`
/// keys drawn uniformly or from a Zipf distribution (so keys repeat, as in real
/// programs), then probe the same key stream (every key must be found with its
/// value) and a fresh stream (found keys must have their value).
fn hash(c: &VcpuConfig) -> WorkloadResult {
    let mut slots = 1u64;
    while slots * 2 * 16 <= c.size {
        slots *= 2;
    }
    let universe = (slots * 2).min(1 << 22);
    let ops = if c.ops == 0 { slots / 2 } else { c.ops.min(slots / 2) };
    let zipf = if c.zipf != 0 { Some(math::Zipf::new(universe, c.zipf_theta_milli as f64 / 1000.0)) } else { None };
    let draw = |rng: &mut Rng| -> u64 {
        let rank = match &zipf {
            Some(z) => z.sample(rng.unit()),
            None => rng.below(universe) + 1,
        };
        pat(c.seed ^ 0x4b45_5953, rank) | 1 // scatter popular ranks; never 0 (empty)
    };
    for s in 0..slots * 2 {
        wr(c.base, s, 0);
    }
    let mask = slots - 1;
    let find = |key: u64| -> (u64, bool) {
        let mut s = key & mask;
        loop {
            let k = rd(c.base, s * 2);
            if k == key || k == 0 {
                return (s, k == key);
            }
            s = (s + 1) & mask;
        }
    };
    let mut rng = Rng::new(c.seed);
    for _ in 0..ops {
        let key = draw(&mut rng);
        let (s, found) = find(key);
        if !found {
            wr(c.base, s * 2, key);
            wr(c.base, s * 2 + 1, pat(c.seed, key));
        }
    }
    let (mut mism, mut ck) = (0u64, 0u64);
    let mut rng = Rng::new(c.seed);
    for _ in 0..ops {
        let key = draw(&mut rng);
        let (s, found) = find(key);
        let v = rd(c.base, s * 2 + 1);
        mism += (!found || v != pat(c.seed, key)) as u64;
        ck = mix(ck, v);
    }
    let mut rng = Rng::new(c.seed ^ 0xf00d);
    for _ in 0..ops {
        let key = draw(&mut rng);
        let (s, found) = find(key);
        if found {
            let v = rd(c.base, s * 2 + 1);
            mism += (v != pat(c.seed, key)) as u64;
            ck = mix(ck, v);
        }
    }
    WorkloadResult { mismatches: mism, checksum: ck, ops: 3 * ops, bytes: slots * 16, ..Default::default() }
}

// The compiler emits calls to these; without libc, the shim provides them.

#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees n bytes are valid at both, not overlapping.
    unsafe {
        core::arch::asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _, options(nostack, preserves_flags));
    }
    dst
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize + n) {
        // SAFETY: forward copy is safe when dst is before src or disjoint.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: backward byte copy within the caller-guaranteed ranges.
    unsafe {
        core::arch::asm!("std", "rep movsb", "cld",
            inout("rcx") n => _, inout("rdi") dst.add(n - 1) => _, inout("rsi") src.add(n - 1) => _, options(nostack));
    }
    dst
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees n writable bytes at dst.
    unsafe {
        core::arch::asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8, options(nostack, preserves_flags));
    }
    dst
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: the caller guarantees n readable bytes at both.
        let (x, y) = unsafe { (read_volatile(a.add(i)), read_volatile(b.add(i))) };
        if x != y {
            return x as i32 - y as i32;
        }
    }
    0
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: forwarded with the same contract.
    unsafe { memcmp(a, b, n) }
}

/// The precompiled `core` references the unwinder's personality routine; with
/// `panic=abort` nothing ever unwinds, so it is never called.
#[unsafe(no_mangle)]
pub extern "C" fn rust_eh_personality() {}
