//! # guest-shim: a minimal freestanding guest
//!
//! Not built yet (issue "vmm: KVM guests whose RAM is a small local cache"). This
//! crate will become a `no_std`, `panic=abort` x86-64 ELF that the VMM loads: it
//! enters long mode, drops to CPL3 (which runs natively on the software nested KVM
//! of our machines) and runs memory workloads whose results it reports to the VMM
//! through a small port-I/O ABI. Nothing here works yet, and nothing pretends to.
#![no_std]
