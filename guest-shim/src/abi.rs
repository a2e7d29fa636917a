//! The guest-shim ABI: how the VMM and the shim talk. Shared verbatim by both sides
//! (the shim includes this file), so it depends on nothing.
//!
//! Guest physical layout (the *boot region*, always resident, not part of the
//! remote-memory cache):
//!
//! | GPA | what |
//! |---|---|
//! | `GDT_ADDR` | the GDT: null, kernel code/data, user code/data |
//! | `PML4_ADDR` .. | identity-mapping page tables (2 MiB pages, user-accessible) |
//! | `MAILBOX_BASE` + i × `MAILBOX_SIZE` | vCPU i's mailbox: [`VcpuConfig`] at 0, [`WorkloadResult`] at `RESULT_OFFSET`, a log buffer at `LOG_OFFSET` |
//! | `SHIM_LOAD_ADDR` .. `STACKS_BASE` | the shim's ELF image |
//! | `STACKS_BASE` + (i + 1) × `STACK_SIZE` | vCPU i's initial stack pointer |
//! | `DOORBELL_ADDR` | the hypercall doorbell: a page with no memory behind it |
//! | `ARENA_BASE` .. | guest RAM proper: the remote-backed arena the workloads use |
//!
//! The VMM starts each vCPU directly in 64-bit user mode (CPL3) at the ELF entry,
//! with `rdi` = vCPU index and `rsi` = the vCPU's mailbox address. The shim calls
//! the VMM by writing a 32-bit call number to [`DOORBELL_ADDR`]: no memslot backs
//! that page, so the write is an MMIO exit. (A port write to [`HYPERCALL_PORT`] is
//! accepted too, but the software nested KVM of our machines does not honour IOPL
//! for natively running user code, so `out` at CPL3 faults there.) Arguments are in
//! the mailbox. Exits cost tens of microseconds on a nested KVM, so the shim makes
//! a handful per run, never one per page.

/// GPA of the doorbell page: a 32-bit write of a call number is a hypercall.
pub const DOORBELL_ADDR: u64 = ARENA_BASE - 0x1000;
/// Port accepted for call numbers as well (see the module doc).
pub const HYPERCALL_PORT: u16 = 0x510;
/// Call: the mailbox's log buffer holds `VcpuConfig::log_len` bytes of UTF-8 to print.
pub const CALL_LOG: u32 = 1;
/// Call: the mailbox's [`WorkloadResult`] is filled in.
pub const CALL_RESULT: u32 = 2;
/// Call: this vCPU is done; `VcpuConfig::exit_code` holds its exit code.
pub const CALL_EXIT: u32 = 3;

/// GPA of the GDT.
pub const GDT_ADDR: u64 = 0x1000;
/// GPA of the top-level page table.
pub const PML4_ADDR: u64 = 0x2000;
/// GPA of the page-directory-pointer table.
pub const PDPT_ADDR: u64 = 0x3000;
/// GPA of the first page directory (one per GiB follows).
pub const PD_ADDR: u64 = 0x4000;
/// Most guest physical memory the page tables map (64 page directories).
pub const MAX_MAPPED: u64 = 64 << 30;
/// GPA of vCPU 0's mailbox.
pub const MAILBOX_BASE: u64 = 0x80000;
/// Bytes per mailbox.
pub const MAILBOX_SIZE: u64 = 0x1000;
/// Most vCPUs.
pub const MAX_VCPUS: u32 = 64;
/// Offset of the [`WorkloadResult`] in a mailbox.
pub const RESULT_OFFSET: u64 = 0x200;
/// Offset of the log buffer in a mailbox.
pub const LOG_OFFSET: u64 = 0x400;
/// Size of the log buffer.
pub const LOG_SIZE: u64 = MAILBOX_SIZE - LOG_OFFSET;
/// Where the shim's ELF is linked.
pub const SHIM_LOAD_ADDR: u64 = 0x100000;
/// GPA of the stacks.
pub const STACKS_BASE: u64 = 0x200000;
/// Stack bytes per vCPU.
pub const STACK_SIZE: u64 = 0x7000;
/// GPA where guest RAM (the remote-backed arena) starts; below is the boot region.
pub const ARENA_BASE: u64 = 0x400000;

/// Magic in [`VcpuConfig::magic`], so the shim can tell it was configured.
pub const CONFIG_MAGIC: u64 = 0x5350_4c49_5456_4953; // "SPLITVIS"

/// Workload: write a pattern over `size` bytes, then read it back and verify.
pub const WL_SEQ: u32 = 1;
/// Workload: random page reads and rewrites over `size` bytes, then a full verify.
pub const WL_RAND: u32 = 2;
/// Workload: a pointer chase over a random cyclic permutation of `size` bytes.
pub const WL_CHASE: u32 = 3;
/// Workload: hash-table build and probe with uniform or Zipf-distributed keys.
pub const WL_HASH: u32 = 4;
/// Workload: PageRank iterations and a BFS over a synthetic R-MAT graph in CSR form.
pub const WL_GRAPH: u32 = 5;
/// Workload: a Memcached-like key-value store (hash index, slab of mixed-size
/// values) under a GET/SET mix over Zipf-distributed keys.
pub const WL_KV: u32 = 6;
/// Workload: an LSD radix sort of 64-bit keys, checked sorted with its multiset kept.
pub const WL_SORT: u32 = 7;
/// Workload: STREAM copy, scale, add and triad over three arrays.
pub const WL_STREAM: u32 = 8;
/// Workload: fixed-stride scans (ascending or descending), several streams interleaved.
pub const WL_STRIDE: u32 = 9;

/// Index in [`WorkloadResult::phases`]: STREAM's copy, scale, add and triad.
pub const PHASE_COPY: usize = 0;
/// See [`PHASE_COPY`].
pub const PHASE_SCALE: usize = 1;
/// See [`PHASE_COPY`].
pub const PHASE_ADD: usize = 2;
/// See [`PHASE_COPY`].
pub const PHASE_TRIAD: usize = 3;

/// Per-vCPU configuration, written by the VMM at the start of the mailbox.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct VcpuConfig {
    /// [`CONFIG_MAGIC`].
    pub magic: u64,
    /// This vCPU's index.
    pub vcpu: u32,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// One of the `WL_*` constants.
    pub workload: u32,
    /// Hash workload: 1 for Zipf-distributed keys, 0 for uniform.
    pub zipf: u32,
    /// GPA of this vCPU's part of the arena.
    pub base: u64,
    /// Bytes of the arena this vCPU's workload covers.
    pub size: u64,
    /// Operations (random and hash workloads; chase steps).
    pub ops: u64,
    /// PRNG seed.
    pub seed: u64,
    /// Zipf exponent × 1000 (e.g. 990 for 0.99).
    pub zipf_theta_milli: u32,
    /// Bytes of log text in the log buffer (set by the shim for `CALL_LOG`).
    pub log_len: u32,
    /// Exit code (set by the shim for `CALL_EXIT`).
    pub exit_code: u32,
    /// Test only: 1 makes a workload corrupt one word of its data before it
    /// verifies, to show that the verification catches it.
    pub corrupt: u32,
    /// Graph: PageRank iterations; stream: repetitions of the four kernels.
    pub iters: u32,
    /// Graph: average out-degree (edges per vertex).
    pub degree: u32,
    /// Key-value store: percentage of operations that are GETs (the rest SET).
    pub get_pct: u32,
    /// Key-value store: 1 adds a sequential scan over a cold area, interleaved
    /// with the GETs and SETs.
    pub scan: u32,
    /// Stride: bytes between consecutive accesses of a stream (negative: descending).
    pub stride: i64,
    /// Stride: interleaved streams.
    pub streams: u32,
    /// Reserved.
    pub _pad2: u32,
}

/// A workload's outcome, written by the shim at `RESULT_OFFSET` of its mailbox.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkloadResult {
    /// The workload (`WL_*`).
    pub workload: u32,
    /// 0 if every check passed.
    pub failed: u32,
    /// Words that did not read back as written.
    pub mismatches: u64,
    /// A checksum over the data, deterministic for a given configuration.
    pub checksum: u64,
    /// Operations performed.
    pub ops: u64,
    /// Bytes touched.
    pub bytes: u64,
    /// TSC cycles the workload took.
    pub cycles: u64,
    /// Key-value store: median GET latency, in TSC cycles.
    pub lat_p50: u64,
    /// Key-value store: 99th-percentile GET latency, in TSC cycles.
    pub lat_p99: u64,
    /// TSC cycles per phase: stream `PHASE_*`; graph build, PageRank, BFS, verify;
    /// kv load, operations; sort key generation, sort, verify.
    pub phases: [u64; 4],
    /// A workload-specific count: graph vertices the BFS reached; kv GETs; sort
    /// and stream bytes moved by the timed phases.
    pub aux: u64,
}
