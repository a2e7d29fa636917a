//! # vmm: the processor monitor
//!
//! Not built yet (issue "vmm: KVM guests whose RAM is a small local cache"). This
//! crate will hold the KVM-based virtual machine monitor: vCPU threads, guest RAM
//! registered as KVM memslots of which only a small budget is resident (LegoOS's
//! ExCache), userfaultfd-driven fetches of non-resident pages from memory nodes
//! through `fabric::PageClient`, eviction with dirty write-back, and the devices a
//! stock Linux guest needs. Nothing here works yet, and nothing pretends to.
