//! VMM threads writing guest RAM directly (as the Linux loader and virtio devices
//! do) while the ExCache evicts: no write may be lost, and a write that lands on
//! a page under eviction must be held (a userfaultfd write-protect fault) until the
//! batch ends, then land.
//! Needs /dev/kvm (for the dirty-logged memslot) and a memnode process.

use splitvisor_tests::{Daemon, sibling_bin};
use std::sync::Arc;
use vmm::excache::placement::Placement;
use vmm::excache::{CacheConfig, EvictPolicy, ExCache};
use vmm::memory::GuestRam;

const VMM: &str = env!("CARGO_BIN_EXE_vmm");
const PAGES: usize = 4096;
const HOT: usize = 4;

fn word(p: usize, i: usize, pass: u64) -> u64 {
    ((p as u64) << 20 | i as u64) ^ pass.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

#[test]
fn kvm_host_writes_survive_eviction_and_wait_for_batches() {
    let node = Daemon::memnode(&sibling_bin(VMM, "memnode"), &[]);
    let kvm = kvm_ioctls::Kvm::new().expect("these tests need read/write access to /dev/kvm");
    let vm = Arc::new(kvm.create_vm().unwrap());
    let ram = GuestRam::linux((PAGES * 4096) as u64).unwrap();
    ram.register_linux(&vm, true).unwrap();
    let nodes = Placement::connect(
        std::slice::from_ref(&node.addr),
        &fabric::ClientConfig {
            vm_id: 77,
            ..Default::default()
        },
        PAGES,
        1,
    )
    .unwrap();
    let cache = ExCache::start(
        ram.arena.clone(),
        CacheConfig {
            budget_pages: 64,
            policy: EvictPolicy::Clock,
            prefetch: 16,
            prefetcher: Default::default(),
            handlers: 2,
            remove_events: false,
            host_writes: true,
            dirty_log: true,
            rebalance: 0,
            encrypt_pages: false,
            rereplicate_rate: vmm::excache::default_rereplicate_rate(),
        },
        nodes,
        vm,
    )
    .unwrap();
    let base = ram.arena_host;
    for pass in 1..=3u64 {
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Thread 2 rewrites pages [0, HOT) in a tight loop while threads 0 and 1
        // stream over the rest: the hot pages age to the head of the queue and are
        // evicted while being written.
        let hammer = {
            let done = done.clone();
            std::thread::spawn(move || {
                let mut rounds = 0;
                while rounds < 4 || !done.load(std::sync::atomic::Ordering::SeqCst) {
                    for p in 0..HOT {
                        for i in 0..512 {
                            let a = (base + p * 4096 + i * 8) as *mut u64;
                            // SAFETY: inside the arena mapping; only this thread
                            // writes pages below HOT.
                            unsafe { a.write_volatile(word(p, i, pass)) };
                        }
                    }
                    rounds += 1;
                }
            })
        };
        let threads: Vec<_> = (0..2)
            .map(|t| {
                std::thread::spawn(move || {
                    for p in (HOT + t..PAGES).step_by(2) {
                        for i in 0..512 {
                            let a = (base + p * 4096 + i * 8) as *mut u64;
                            // SAFETY: inside the arena mapping, which lives until the
                            // end of the test; pages are disjoint between threads.
                            unsafe { a.write_volatile(word(p, i, pass)) };
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        hammer.join().unwrap();
        for p in 0..PAGES {
            for i in (0..512).step_by(61) {
                let a = (base + p * 4096 + i * 8) as *const u64;
                // SAFETY: as above.
                let v = unsafe { a.read_volatile() };
                assert_eq!(v, word(p, i, pass), "pass {pass}, page {p}, word {i}");
            }
        }
    }
    let s = cache.snapshot();
    assert!(s.evict_dirty > 0 && s.faults_remote > 0, "{s:?}");
    println!(
        "dirty evictions {}, remote faults {}, host writes held on evicting pages {}",
        s.evict_dirty, s.faults_remote, s.faults_wp
    );
    assert!(
        s.faults_wp > 0,
        "no host write ever met a page under eviction: the write-protect path was not exercised"
    );
    cache.shutdown();
}
