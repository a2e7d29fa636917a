//! # vmm: the processor monitor
//!
//! A KVM virtual machine monitor whose guest RAM is a small local cache (LegoOS's
//! ExCache) over remote memory nodes. The path of a guest memory access that
//! misses, in a few hops:
//!
//! 1. [`vcpu::Vcpu::run`]: a vCPU thread is in `KVM_RUN`; the guest touches a page that is
//!    not resident; KVM's access to the backing memory raises a userfaultfd fault;
//! 2. [`excache::fault`]: a handler thread reads the event and fetches the page from
//!    its memory node ([`excache::placement`], a `fabric::PageClient` round trip), or
//!    installs a zero page for a page never written back;
//! 3. [`excache::evict`]: the evictor keeps the resident set within `--local-cache`,
//!    writing dirty pages back to their node without ever losing a guest write.
//!
//! [`builder`] assembles a VM from a [`config::VmConfig`] ([`memory`], the
//! cache, the guest kind's part: the guest shim running a [`workload`] on every
//! vCPU, [`guest::shim`], or a stock Linux kernel, [`linux`]) and runs it.

pub mod abi_io;
pub mod api;
pub mod arch;
pub mod builder;
pub mod config;
pub mod control;
pub mod devices;
pub mod error;
pub mod event_loop;
pub mod excache;
pub mod guest;
pub mod kvm_stats;
pub mod linux;
pub mod memory;
mod serde_str;
pub mod vcpu;
mod vcpu_threads;
pub mod workload;

/// Logs a warning from this call site at most once a second (the rest are
/// counted and the count reported with the next line that passes): the one
/// mechanism for every log line a guest or a peer can trigger
/// ([`fabric::ratelimit`]).
#[macro_export]
macro_rules! warn_limited {
    ($($t:tt)*) => {{
        static LIMIT: fabric::ratelimit::RateLimiter = fabric::ratelimit::RateLimiter::new(1);
        fabric::warn_limited!(LIMIT, $($t)*);
    }};
}
