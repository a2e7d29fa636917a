//! End-to-end: the far-memory application workloads (graph, kv, sort, stream,
//! stride) run verified by the `vmm` binary on this machine's /dev/kvm over a real
//! `memnode`, on 1 and 2 vCPUs, with all of guest RAM (8 MiB) cached and with a
//! quarter of it; both runs must report the same checksum per vCPU (the all-local run is the
//! reference). And a workload told to corrupt its own data must fail verification,
//! making `vmm` exit non-zero. Every test here needs /dev/kvm (names start with
//! `kvm_`) and fails with a clear message where it is missing.

use splitvisor_tests::{Daemon, require_kvm, sibling_bin};
use std::time::Duration;

const VMM: &str = env!("CARGO_BIN_EXE_vmm");
const DEADLINE: Duration = Duration::from_secs(120);

type Run = splitvisor_tests::VmmRun;

/// Runs `vmm run --workload W --vcpus N --mem 8M --local-cache CACHE` over `node`.
fn vmm_run(node: &Daemon, workload: &str, vcpus: usize, cache: &str) -> Run {
    vmm_run_with(node, workload, vcpus, cache, &[])
}

/// [`vmm_run`] with `extra` arguments.
fn vmm_run_with(node: &Daemon, workload: &str, vcpus: usize, cache: &str, extra: &[&str]) -> Run {
    let vcpus = vcpus.to_string();
    let mut args = vec![
        "--workload",
        workload,
        "--vcpus",
        &vcpus,
        "--mem",
        "8M",
        "--local-cache",
        cache,
        "--memnode",
        &node.addr,
        // These tests check results, not failure detection: on a loaded machine
        // (a debug-built memnode sharing two cores with builds) a reply can take
        // longer than the default 500 ms without the node being dead.
        "--node-timeout",
        "10s",
    ];
    args.extend(extra);
    splitvisor_tests::vmm_run(VMM, &args, DEADLINE)
}

/// The per-vCPU checksums of a run that must have verified.
fn verified_checksums(r: &Run, what: &str) -> Vec<u64> {
    assert!(
        r.ok && r.json["ok"] == true,
        "{what}: vmm failed\nstdout:\n{}\nstderr:\n{}",
        r.stdout,
        r.stderr
    );
    r.json["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|v| {
            assert_eq!(v["mismatches"], 0, "{what}: {v}");
            v["checksum"].as_u64().expect("checksum")
        })
        .collect()
}

/// Runs `workload` on 1 and 2 vCPUs, with all 8 MiB and with 2 MiB cached of 8 MiB
/// of guest RAM: every run verifies, and the small cache changes no checksum.
/// Returns the runs' results (the 1-vCPU small-cache run's first).
fn same_checksums_at_every_cache_size(workload: &str) -> Vec<serde_json::Value> {
    require_kvm();
    let node = Daemon::memnode(&sibling_bin(VMM, "memnode"), &["--capacity", "64M"]);
    let mut results = Vec::new();
    for vcpus in [1, 2] {
        let small = vmm_run(&node, workload, vcpus, "2M");
        let what = format!("{workload} on {vcpus} vCPU(s)");
        let small_ck = verified_checksums(&small, &format!("{what}, 2 MiB cache"));
        let full = vmm_run(&node, workload, vcpus, "8M");
        let full_ck = verified_checksums(&full, &format!("{what}, 8 MiB cache"));
        assert_eq!(small_ck.len(), vcpus, "{}", small.json);
        assert_eq!(
            small_ck, full_ck,
            "{what}: the small cache changed the result\nsmall:\n{}\nall local:\n{}",
            small.stdout, full.stdout
        );
        assert!(
            small.json["stats"]["faults_remote"].as_u64().unwrap_or(0) > 0,
            "{what}: nothing came back from the node with a 2 MiB cache: {}",
            small.json
        );
        results.extend(small.json["results"].as_array().unwrap().iter().cloned());
    }
    results
}

#[test]
fn kvm_graph_pagerank_and_bfs_verify_at_every_cache_size() {
    let r = same_checksums_at_every_cache_size("graph:iters=3,degree=8,seed=5");
    // A power-law graph's BFS from its largest hub reaches many vertices.
    assert!(r[0]["aux"].as_u64().unwrap() > 1000, "{}", r[0]);
}

#[test]
fn kvm_kv_store_verifies_every_get_at_every_cache_size() {
    let r = same_checksums_at_every_cache_size("kv:ops=5000,get=90,theta=0.9,scan=1");
    let gets = r[0]["aux"].as_u64().unwrap();
    assert!((4_300..4_700).contains(&gets), "{}", r[0]);
    assert!(r[0]["lat_p50_cycles"].as_u64().unwrap() > 0, "{}", r[0]);
    assert!(
        r[0]["lat_p99_cycles"].as_u64() >= r[0]["lat_p50_cycles"].as_u64(),
        "{}",
        r[0]
    );
}

/// Issue 21's eviction target: on `kv` with Zipf GETs and a concurrent scan
/// of a cold area, `--evict 2q` keeps the hot keys' pages while the scan goes
/// through, where CLOCK lets the scan push them out: 2Q faults less, and its
/// promotions are counted. Both runs verify with the same checksum.
#[test]
fn kvm_2q_keeps_the_kv_hot_set_through_a_scan_better_than_clock() {
    require_kvm();
    let node = Daemon::memnode(&sibling_bin(VMM, "memnode"), &["--capacity", "64M"]);
    let w = "kv:ops=40000,get=90,theta=0.99,scan=1,seed=9";
    let faults = |r: &Run| {
        r.json["stats"]["faults_remote"].as_u64().unwrap()
            + r.json["stats"]["faults_zero"].as_u64().unwrap()
    };
    let clock = vmm_run_with(&node, w, 1, "2M", &["--evict", "clock"]);
    let clock_ck = verified_checksums(&clock, "kv, CLOCK");
    let two_q = vmm_run_with(&node, w, 1, "2M", &["--evict", "2q"]);
    let two_q_ck = verified_checksums(&two_q, "kv, 2Q");
    assert_eq!(clock_ck, two_q_ck, "the policy changed the result");
    // The scan reads a page of its 4 MiB cold area every 8 operations: 5 000
    // pages, each a fault under any policy (the area is twice the cache). The
    // rest are the store's own faults, which the policy decides.
    let scan = 40_000 / 8;
    let (fc, f2) = (faults(&clock), faults(&two_q));
    let (oc, o2) = (fc.saturating_sub(scan), f2.saturating_sub(scan));
    eprintln!(
        "kv with a scan, 2 MiB of 8 MiB cached: faults CLOCK {fc}, 2Q {f2}; besides the scan's {scan}: CLOCK {oc}, 2Q {o2}"
    );
    assert!(
        o2 * 3 < oc * 2,
        "2Q should fault at most 2/3 as often as CLOCK besides the scan: 2Q {o2}, CLOCK {oc}\n{}\n{}",
        two_q.json["stats"],
        clock.json["stats"]
    );
    assert!(two_q.json["stats"]["evict_promoted"].as_u64().unwrap() > 0);
    assert_eq!(clock.json["stats"]["evict_promoted"].as_u64(), Some(0));
}

#[test]
fn kvm_sort_verifies_at_every_cache_size() {
    let r = same_checksums_at_every_cache_size("sort:size=4M,seed=3");
    // vCPU 0 sorts the same 4 MiB with the same seed whether alone or not.
    assert_eq!(r[0]["checksum"], r[1]["checksum"], "{r:?}");
}

#[test]
fn kvm_stream_verifies_at_every_cache_size() {
    same_checksums_at_every_cache_size("stream:iters=2");
}

#[test]
fn kvm_stride_verifies_at_every_cache_size() {
    same_checksums_at_every_cache_size("stride:stride=-3p,streams=3");
    same_checksums_at_every_cache_size("stride:stride=264,streams=2");
}

/// `--prefetcher leap` finds strided and descending streams, interleaved on
/// one vCPU, that `seq` does not: on `stride` at a quarter cached it takes at
/// most half the remote faults (8 MiB gives each stream only a few hundred
/// steps, so the detector's start counts; at 64 MiB it took 7-24x fewer), with the same checksums, and its
/// accuracy and coverage are reported.
#[test]
fn kvm_the_leap_prefetcher_follows_strides_that_seq_misses() {
    require_kvm();
    let node = Daemon::memnode(&sibling_bin(VMM, "memnode"), &["--capacity", "64M"]);
    for (w, vcpus) in [
        ("stride:stride=-3p,streams=3", 1),
        ("stride:stride=2p,streams=2", 2),
    ] {
        let run = |p: &str| vmm_run_with(&node, w, vcpus, "2M", &["--prefetcher", p]);
        let (seq, leap) = (run("seq"), run("leap"));
        let what = format!("{w} on {vcpus} vCPU(s)");
        assert_eq!(
            verified_checksums(&seq, &format!("{what}, seq")),
            verified_checksums(&leap, &format!("{what}, leap"))
        );
        let faults = |r: &Run| r.json["stats"]["faults_remote"].as_u64().unwrap();
        assert!(
            2 * faults(&leap) <= faults(&seq),
            "{what}: {} remote faults with leap, {} with seq\n{}",
            faults(&leap),
            faults(&seq),
            leap.json["stats"]
        );
        let st = &leap.json["stats"];
        let (used, fetched) = (
            st["prefetch_used"].as_u64().unwrap(),
            st["prefetch_remote"].as_u64().unwrap(),
        );
        assert!(used > 0 && used <= fetched, "{what}: {st}");
        assert!(leap.stdout.contains("accuracy"), "{}", leap.stdout);
    }
}

/// On a long strided scan either way, the Leap prefetcher is more than 90%
/// accurate (of the pages it fetched from the memory node that were used or
/// evicted, the share used), over 85% even counting every page not reached
/// by the end as missed (the stream's last window, passed after its last
/// fault), hardly any page is evicted unused, and every page of the stream is
/// fetched once.
#[test]
fn kvm_the_leap_prefetcher_is_over_90_percent_accurate_on_strides() {
    require_kvm();
    let node = Daemon::memnode(&sibling_bin(VMM, "memnode"), &["--capacity", "64M"]);
    for (w, stride) in [
        ("stride:stride=-3p,streams=1", 3),
        ("stride:stride=2p,streams=1", 2),
    ] {
        let args = [
            "--workload",
            w,
            "--mem",
            "32M",
            "--local-cache",
            "8M",
            "--memnode",
            &node.addr,
            "--node-timeout",
            "10s",
            "--prefetcher",
            "leap",
        ];
        let r = splitvisor_tests::vmm_run(VMM, &args, DEADLINE);
        verified_checksums(&r, w);
        let st = &r.json["stats"];
        let n = |k: &str| st[k].as_u64().unwrap_or_else(|| panic!("{k} in {st}"));
        let (used, fetched) = (n("prefetch_used"), n("prefetch_remote"));
        let known = fetched.saturating_sub(n("prefetch_unreached"));
        let accuracy = used as f64 / known.max(1) as f64;
        assert!(accuracy > 0.9, "{w}: accuracy {accuracy:.3}\n{st}");
        let reached = used as f64 / fetched.max(1) as f64;
        assert!(
            reached > 0.85,
            "{w}: {reached:.3} of the pages reached\n{st}"
        );
        assert!(
            r.stdout.contains("not reached yet: accuracy"),
            "{}",
            r.stdout
        );
        assert!(
            n("prefetch_wasted") * 100 <= n("prefetch_remote"),
            "{w}: {st}"
        );
        // The stream's pages (every |stride|-th of 32 MiB), each fetched once
        // (a read-ahead mark dropped unreached is fetched again).
        let pages: u64 = 8192u64.div_ceil(stride);
        let fetched = n("faults_remote") + n("prefetch_remote");
        assert!(
            fetched >= pages && fetched <= pages + 1 + n("readahead_dropped"),
            "{w}: {fetched} pages fetched for {pages}\n{st}"
        );
    }
}

#[test]
fn kvm_a_corrupted_result_fails_verification_and_the_exit_status() {
    require_kvm();
    let node = Daemon::memnode(&sibling_bin(VMM, "memnode"), &["--capacity", "64M"]);
    for w in ["graph", "kv", "sort", "stream", "stride"] {
        let w = format!("{w}:size=2M,corrupt=1");
        let r = vmm_run(&node, &w, 1, "8M");
        assert!(
            !r.ok && r.json["ok"] == false,
            "{w}: a corrupted run passed\nstdout:\n{}\nstderr:\n{}",
            r.stdout,
            r.stderr
        );
        assert!(r.stdout.contains("FAILED"), "{w}: {}", r.stdout);
        assert!(
            r.stderr.contains("failed verification"),
            "{w}: {}",
            r.stderr
        );
        assert!(
            r.json["results"][0]["mismatches"].as_u64() > Some(0),
            "{w}: {}",
            r.json
        );
    }
}
