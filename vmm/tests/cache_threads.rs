//! The ExCache joins every thread it starts:
//! - dropping it (as an error return right after `ExCache::start` does) stops
//!   and joins its fault handlers, evictors and rebalancer;
//! - `shutdown` joins the drain thread of a detach still under way (its `done`
//!   has returned when `shutdown` does);
//! - a drain whose `done` drops the last share of the cache joins the other
//!   threads and not itself.
//!
//! The threads are found by name in `/proc/self/task`, so the scenarios run one
//! after another in a single test. Needs /dev/kvm and memnode processes.

use splitvisor_tests::{Daemon, sibling_bin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::{Duration, Instant};
use vmm::excache::placement::Placement;
use vmm::excache::{CacheConfig, EvictPolicy, ExCache};
use vmm::memory::GuestRam;

const VMM: &str = env!("CARGO_BIN_EXE_vmm");
const PAGES: usize = 4096;

/// Names of this process's cache threads now running.
fn cache_threads() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .filter(|n| {
            n.starts_with("fault-")
                || n.starts_with("evictor-")
                || n == "rebalance"
                || n == "drain"
                || n == "repair"
        })
        .collect();
    names.sort();
    names
}

/// Waits until the cache threads running include `names` (a thread names
/// itself once it runs).
fn wait_for_threads(names: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = cache_threads();
        if names.iter().all(|n| now.iter().any(|m| m == n)) {
            return;
        }
        assert!(Instant::now() < deadline, "expected {names:?}, got {now:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits briefly for joined threads to leave `/proc` (a joined thread's entry
/// can outlive the join by a moment); a thread still running stays listed.
fn no_cache_threads_soon(what: &str) {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let left = cache_threads();
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: cache threads still running: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A VM `vm_id` with an arena of [`PAGES`] pages, a cache of `budget` pages
/// over `nodes` (1 ms each way to them) and every page written once by this
/// thread, so that most of them live on the nodes.
fn cache_over(vm_id: u64, nodes: &[&Daemon], budget: usize, rebalance: u64) -> (GuestRam, ExCache) {
    let kvm = kvm_ioctls::Kvm::new().expect("these tests need read/write access to /dev/kvm");
    let vm = Arc::new(kvm.create_vm().unwrap());
    let ram = GuestRam::linux((PAGES * 4096) as u64).unwrap();
    ram.register_linux(&vm, false).unwrap();
    let addrs: Vec<String> = nodes.iter().map(|n| n.addr.clone()).collect();
    let placement = Placement::connect(
        &addrs,
        &fabric::ClientConfig {
            vm_id,
            link_model: fabric::LinkModel {
                latency: Duration::from_millis(1),
                bandwidth_bps: None,
            },
            ..Default::default()
        },
        PAGES,
        1,
    )
    .unwrap();
    let cache = ExCache::start(
        ram.arena.clone(),
        CacheConfig {
            budget_pages: budget,
            policy: EvictPolicy::Clock,
            prefetch: 0,
            prefetcher: Default::default(),
            handlers: 2,
            remove_events: false,
            host_writes: true,
            dirty_log: false,
            rebalance,
            encrypt_pages: false,
            rereplicate_rate: vmm::excache::default_rereplicate_rate(),
        },
        placement,
        vm,
    )
    .unwrap();
    for p in 0..PAGES {
        let a = (ram.arena_host + p * 4096) as *mut u64;
        // SAFETY: inside the arena mapping, which `ram` and the cache keep
        // mapped; only this thread touches it.
        unsafe { a.write_volatile(p as u64 + 1) };
    }
    (ram, cache)
}

#[test]
fn kvm_cache_threads_are_joined() {
    let memnode = sibling_bin(VMM, "memnode");
    let (a, b) = (
        Daemon::memnode(&memnode, &[]),
        Daemon::memnode(&memnode, &[]),
    );
    assert_eq!(cache_threads(), Vec::<String>::new(), "before any cache");

    // 1. Dropped without `shutdown`, as by an error return after `start`.
    let (ram, cache) = cache_over(81, &[&a], 64, 1000);
    wait_for_threads(&["evictor-0", "evictor-1", "fault-0", "fault-1", "rebalance"]);
    drop(cache);
    no_cache_threads_soon("after dropping the cache");
    drop(ram);

    // 2. `shutdown` during a detach: the drain is joined, its `done` has
    // returned (it takes its time, so an unjoined one would still be in it).
    let (ram, cache) = cache_over(82, &[&a, &b], 256, 0);
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    cache
        .detach_node(&b.addr, move |_outcome| {
            std::thread::sleep(Duration::from_millis(300));
            d.store(true, SeqCst);
        })
        .unwrap();
    wait_for_threads(&["drain"]);
    cache.shutdown();
    assert!(
        done.load(SeqCst),
        "shutdown returned before the drain thread finished"
    );
    no_cache_threads_soon("after shutdown");
    drop(ram);

    // 3. A drain's `done` holds the last share of the cache: the drop runs on
    // the drain thread, which joins the others and not itself.
    let (ram, cache) = cache_over(83, &[&a, &b], 256, 0);
    let cache = Arc::new(cache);
    let done = Arc::new(AtomicBool::new(false));
    let (d, last) = (done.clone(), cache.clone());
    cache
        .detach_node(&b.addr, move |_outcome| {
            drop(last);
            d.store(true, SeqCst);
        })
        .unwrap();
    drop(cache);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done.load(SeqCst) {
        assert!(Instant::now() < deadline, "the drain never finished");
        std::thread::sleep(Duration::from_millis(10));
    }
    no_cache_threads_soon("after the drain dropped the cache");
    drop(ram);
}
