//! End-to-end: the `vmm` binary runs guest-shim workloads on this machine's
//! /dev/kvm with guest RAM backed by `memnode` processes over loopback.
//! Every test here needs /dev/kvm (names start with `kvm_`) and fails with a clear
//! message where it is missing.

use splitvisor_tests::{Daemon, require_kvm, sibling_bin, wait_for_exit};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const VMM: &str = env!("CARGO_BIN_EXE_vmm");

fn memnode(extra: &[&str]) -> Daemon {
    Daemon::memnode(&sibling_bin(VMM, "memnode"), extra)
}

type Run = splitvisor_tests::VmmRun;

/// Runs `vmm run ARGS --stats-json F`, with a deadline.
fn vmm_run(args: &[&str], deadline: Duration) -> Run {
    splitvisor_tests::vmm_run(VMM, args, deadline)
}

/// Starts `vmm ARGS` with a workload long enough to still run after 1.5 s.
fn start_long_run(args: &[&str]) -> Child {
    let mut child = Command::new(VMM)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the workload should still be running"
    );
    child
}

fn stat(r: &Run, key: &str) -> u64 {
    r.json["stats"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("no stats.{key} in {}", r.json))
}

fn assert_ok(r: &Run) {
    assert!(
        r.ok,
        "vmm failed\nstdout:\n{}\nstderr:\n{}",
        r.stdout, r.stderr
    );
    assert_eq!(r.json["ok"], true, "{}", r.json);
    for v in r.json["results"].as_array().expect("results") {
        assert_eq!(v["mismatches"], 0, "{v}");
    }
}

const MIN: Duration = Duration::from_secs(120);

#[test]
fn kvm_seq_workload_zero_fills_fetches_evicts_and_writes_back() {
    require_kvm();
    let node = memnode(&["--capacity", "256M"]);
    // 32 MiB of data through a 2 MiB cache: the write pass evicts dirty pages, the
    // read pass fetches them back and must see every byte as written. Dirty pages
    // are found by content (the default) or from the KVM dirty log.
    for dirty_log in [false, true] {
        let mut args = vec![
            "--workload",
            "seq:size=32M",
            "--mem",
            "64M",
            "--local-cache",
            "2M",
            "--memnode",
            &node.addr,
        ];
        if dirty_log {
            args.push("--dirty-log");
        }
        let r = vmm_run(&args, MIN);
        assert_ok(&r);
        assert_eq!(r.json["dirty_log"], dirty_log);
        assert!(
            stat(&r, "faults_zero") + stat(&r, "prefetch_zero") >= 8192,
            "{}",
            r.json
        );
        assert!(
            stat(&r, "faults_remote") + stat(&r, "prefetch_remote") >= 7000,
            "{}",
            r.json
        );
        assert!(stat(&r, "evict_dirty") >= 7000, "{}", r.json);
        // Pages fetched back and only read are dropped without a write-back.
        assert!(stat(&r, "evict_clean") >= 7000, "{}", r.json);
        assert_eq!(stat(&r, "writeback_bytes"), stat(&r, "evict_dirty") * 4096);
        assert!(stat(&r, "resident_pages") <= 512, "{}", r.json);
        assert!(r.json["stats"]["fetch_p50_us"].as_f64().unwrap() > 0.0);
        // KVM's own counters are reported: the guest exited at least once per
        // 2 MiB it touched.
        let exits = r.json["results"][0]["kvm"]["exits"].as_u64().unwrap_or(0);
        assert!(exits >= 32, "{}", r.json);
        assert!(r.stdout.contains("KVM exits"), "{}", r.stdout);
        // The stream ran on read-ahead: the guest met the marks left at the
        // start of each window (64 pages here: an eighth of the cache).
        assert!(stat(&r, "readahead_hits") >= 64, "{}", r.json);
    }
}

#[test]
fn kvm_many_streams_share_read_ahead_and_lose_nothing() {
    require_kvm();
    let node = memnode(&["--capacity", "256M"]);
    // Twelve vCPUs, each a sequential stream over its own 8 MiB, through a 4 MiB
    // cache: more streams than read-ahead marks are kept, so marks are dropped
    // (their pages go back to absent and are fetched again on demand), and the
    // streams share the read-ahead room instead of evicting each other's
    // prefetched pages before use. Every vCPU verifies every byte.
    let r = vmm_run(
        &[
            "--workload",
            "seq:size=8M",
            "--vcpus",
            "12",
            "--mem",
            "128M",
            "--local-cache",
            "4M",
            "--memnode",
            &node.addr,
        ],
        MIN,
    );
    assert_ok(&r);
    assert_eq!(r.stdout.matches("seq verified").count(), 12, "{}", r.stdout);
    assert!(stat(&r, "readahead_dropped") > 0, "{}", r.json);
    assert!(stat(&r, "readahead_hits") > 0, "{}", r.json);
    // The read pass needs each of the 24 576 written pages back about once;
    // read-ahead that evicted its own pages before use would fetch far more. A
    // page can also be read while still local (before or during its eviction,
    // when it is write-protected but readable), so up to a cache's worth of
    // pages (1024) may need no fetch: a CI run measured 24 489.
    let fetched = stat(&r, "faults_remote") + stat(&r, "prefetch_remote");
    assert!(
        (24576 - 1024..24576 * 3 / 2).contains(&fetched),
        "{}",
        r.json
    );
}

#[test]
fn kvm_two_vcpus_two_memnodes_random_workload() {
    require_kvm();
    let (a, b) = (
        memnode(&["--capacity", "256M"]),
        memnode(&["--capacity", "256M"]),
    );
    let r = vmm_run(
        &[
            "--workload",
            "rand:size=8M",
            "--mem",
            "32M",
            "--local-cache",
            "1M",
            "--vcpus",
            "2",
            "--memnode",
            &a.addr,
            "--memnode",
            &b.addr,
        ],
        MIN,
    );
    assert_ok(&r);
    assert_eq!(r.json["results"].as_array().unwrap().len(), 2);
    let nodes = r.json["stats"]["node_pages"].as_array().unwrap();
    assert_eq!(nodes.len(), 2);
    for n in nodes {
        assert!(
            n[1].as_u64().unwrap() > 100,
            "pages striped over both nodes: {nodes:?}"
        );
    }
    assert!(stat(&r, "faults_remote") > 1000);
}

/// The ideal (in-process) fabric is a node like any other: pages stripe over it
/// and a real memory node, every write reads back, and the workload's checksum
/// is the one it has over memory nodes alone. With a link model, its fetches
/// take at least the modelled latency.
#[test]
fn kvm_ideal_fabric_stripes_with_a_memnode_and_models_the_link() {
    require_kvm();
    // As large as the ideal node (which holds the guest's RAM), so that new
    // stripes go to both.
    let node = memnode(&["--capacity", "32M"]);
    let args = |nodes: &[&str]| {
        let mut a: Vec<String> = [
            "--workload",
            "rand:size=8M",
            "--mem",
            "32M",
            "--local-cache",
            "1M",
            "--prefetch",
            "0",
        ]
        .map(String::from)
        .to_vec();
        for n in nodes {
            a.extend(["--memnode".to_string(), n.to_string()]);
        }
        a
    };
    let run = |a: Vec<String>| vmm_run(&a.iter().map(String::as_str).collect::<Vec<_>>(), MIN);
    let mixed = run(args(&["ideal", &node.addr]));
    assert_ok(&mixed);
    let nodes = mixed.json["stats"]["node_pages"].as_array().unwrap();
    assert_eq!(nodes.len(), 2, "{nodes:?}");
    assert_eq!(nodes[0][0], "ideal");
    for n in nodes {
        assert!(
            n[1].as_u64().unwrap() > 100,
            "pages on both nodes: {nodes:?}"
        );
    }
    assert!(stat(&mixed, "faults_remote") > 1000);
    let real = run(args(&[&node.addr]));
    assert_ok(&real);
    let checksum = |r: &Run| r.json["results"][0]["checksum"].as_u64().unwrap();
    assert_eq!(checksum(&mixed), checksum(&real));

    let mut slow = args(&["ideal"]);
    slow.extend(["--link".to_string(), "latency=300us".to_string()]);
    let slow = run(slow);
    assert_ok(&slow);
    let p50 = slow.json["stats"]["fetch_p50_us"].as_f64().unwrap();
    assert!(p50 >= 300.0, "a fetch over a 300 us link took {p50} us");
}

#[test]
fn kvm_chase_and_hash_workloads_verify_under_eviction() {
    require_kvm();
    let node = memnode(&["--capacity", "256M"]);
    for w in [
        "chase:size=1M",
        "hash:size=1M,dist=zipf,theta=0.99,ops=4000",
        "hash:size=1M,dist=uniform,ops=4000",
    ] {
        let r = vmm_run(
            &[
                "--workload",
                w,
                "--mem",
                "1M",
                "--local-cache",
                "512K",
                "--memnode",
                &node.addr,
            ],
            MIN,
        );
        assert_ok(&r);
        assert!(stat(&r, "evict_dirty") > 0, "{w}: {}", r.json);
    }
}

#[test]
fn kvm_checksums_match_an_all_local_run_and_fifo_and_2q_agree() {
    require_kvm();
    let node = memnode(&["--capacity", "256M"]);
    let checksum = |r: &Run| r.json["results"][0]["checksum"].as_u64().unwrap();
    for w in ["rand:size=4M,seed=9", "chase:size=2M,seed=3"] {
        let local = vmm_run(
            &[
                "--workload",
                w,
                "--mem",
                "4M",
                "--local-cache",
                "4M",
                "--memnode",
                &node.addr,
            ],
            MIN,
        );
        assert_ok(&local);
        assert_eq!(
            stat(&local, "evict_dirty") + stat(&local, "evict_clean"),
            0,
            "all-local run evicted"
        );
        // The same run at a 256 KiB cache, with `extra` options.
        let small = |extra: &[&str]| {
            let mut args = vec!["--workload", w, "--mem", "4M", "--local-cache", "256K"];
            args.extend(extra);
            args.extend(["--memnode", node.addr.as_str()]);
            vmm_run(&args, MIN)
        };
        let clock = small(&[]);
        let fifo = small(&["--evict", "fifo"]);
        let clock_log = small(&["--dirty-log"]);
        // 2Q, with the dirty log feeding its protected ring's reference bits.
        let two_q = small(&["--evict", "2q", "--dirty-log"]);
        assert_ok(&clock);
        assert_ok(&fifo);
        assert_ok(&clock_log);
        assert_ok(&two_q);
        assert_eq!(checksum(&two_q), checksum(&local), "{w}: 2q run differs");
        assert_eq!(
            checksum(&clock_log),
            checksum(&local),
            "{w}: run with the dirty log differs"
        );
        assert_eq!(
            checksum(&clock),
            checksum(&local),
            "{w}: remote run differs from the all-local run"
        );
        assert_eq!(checksum(&fifo), checksum(&local), "{w}: fifo run differs");
    }
}

#[test]
fn kvm_unreachable_memnode_at_start_is_one_clear_error() {
    require_kvm();
    // Bind and drop to find a port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let r = vmm_run(
        &["--memnode", &addr, "--mem", "8M", "--local-cache", "1M"],
        MIN,
    );
    assert!(!r.ok);
    let lines: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.starts_with("vmm: error:"))
        .collect();
    assert_eq!(lines.len(), 1, "stderr: {}", r.stderr);
    assert!(
        lines[0].contains(&addr) && lines[0].contains("unreachable"),
        "{}",
        lines[0]
    );
}

/// A random workload over the memory node at `addr` (with `extra` options)
/// that runs far longer than any test, started as [`start_long_run`] does.
fn start_rand_over(addr: &str, extra: &[&str]) -> Child {
    let mut args = vec![
        "run",
        "--workload",
        "rand:size=16M,ops=50000000",
        "--mem",
        "16M",
        "--local-cache",
        "1M",
        "--memnode",
        addr,
    ];
    args.extend_from_slice(extra);
    start_long_run(&args)
}

#[test]
fn kvm_memnode_dying_mid_run_stops_the_vm_with_an_error_naming_it() {
    require_kvm();
    let node = memnode(&["--capacity", "256M"]);
    let addr = node.addr.clone();
    let child = start_rand_over(&addr, &[]);
    drop(node); // kills the memory node
    let out = wait_for_exit(
        child,
        Duration::from_secs(30),
        "vmm hung after its memory node died",
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("vmm: error:") && err.contains(&addr),
        "stderr: {err}"
    );
}

#[test]
fn kvm_a_stopped_memnode_fails_the_vm_within_the_node_timeout() {
    require_kvm();
    let node = memnode(&["--capacity", "256M"]);
    let addr = node.addr.clone();
    let child = start_rand_over(&addr, &["--node-timeout", "500ms"]);
    // SIGSTOP: the node's sockets stay open, it just never answers.
    node.freeze();
    let stopped = std::time::Instant::now();
    let out = wait_for_exit(
        child,
        Duration::from_secs(30),
        "vmm hung on a stopped memory node",
    );
    let took = stopped.elapsed();
    node.thaw();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("vmm: error:") && err.contains(&addr) && err.contains("no reply within"),
        "stderr: {err}"
    );
    assert!(
        took < Duration::from_secs(10),
        "the VM took {took:?} to give up on a node with a 500 ms timeout"
    );
}

#[test]
fn kvm_bad_input_gets_one_clear_error_line() {
    require_kvm();
    let node = memnode(&["--capacity", "16M"]);
    let junk = std::env::temp_dir().join(format!("not-an-elf-{}", std::process::id()));
    std::fs::write(&junk, b"#!/bin/sh\necho this is not a guest\n").unwrap();
    let missing = PathBuf::from("/nonexistent/guest-shim");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--shim".into(), missing.display().to_string()],
            "cannot read guest shim /nonexistent/guest-shim",
        ),
        (
            vec!["--shim".into(), junk.display().to_string()],
            "not a loadable x86-64 ELF",
        ),
        (
            vec![
                "--local-cache".into(),
                "64M".into(),
                "--mem".into(),
                "8M".into(),
            ],
            "larger than --mem",
        ),
        (
            vec!["--local-cache".into(), "0".into()],
            "--local-cache must be at least",
        ),
        (
            vec!["--workload".into(), "bubblesort".into()],
            "unknown workload `bubblesort`",
        ),
        (
            vec![
                "--workload".into(),
                "seq:size=1G".into(),
                "--mem".into(),
                "8M".into(),
                "--local-cache".into(),
                "1M".into(),
            ],
            "exceeds each vCPU's share",
        ),
        (vec!["--vcpus".into(), "0".into()], "--vcpus must be 1 to"),
        (vec!["--mem".into(), "lots".into()], "lots"),
        (
            vec!["--prefetcher".into(), "bogus".into()],
            "invalid value 'bogus' for '--prefetcher",
        ),
        // Paused with no way to resume.
        (vec!["--paused".into()], "--api-sock"),
        // An RDMA node: without the transport (or, built with it, without a
        // device here), the node is named and so is what is missing.
        (
            vec!["--memnode".into(), format!("rdma://{}", node.addr)],
            if cfg!(feature = "rdma") {
                "no RDMA device"
            } else {
                "no RDMA transport (build with `--features rdma`)"
            },
        ),
    ];
    for (extra, want) in cases {
        let mut args: Vec<String> = vec!["--memnode".into(), node.addr.clone()];
        args.extend(extra.iter().cloned());
        let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let r = vmm_run(&refs, MIN);
        assert!(!r.ok, "{extra:?} succeeded");
        assert!(
            r.stderr.contains(want),
            "{extra:?}: stderr was:\n{}",
            r.stderr
        );
        assert!(
            !r.stderr.contains("panicked"),
            "{extra:?} panicked:\n{}",
            r.stderr
        );
    }
    let _ = std::fs::remove_file(junk);
}

#[test]
fn kvm_sigterm_stops_the_vm_cleanly() {
    require_kvm();
    // No --memnode: vmm starts its own node, which must go away with it.
    let child = start_long_run(&[
        "run",
        "--workload",
        "rand:size=16M,ops=50000000",
        "--mem",
        "16M",
        "--local-cache",
        "1M",
    ]);
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = wait_for_exit(
        child,
        Duration::from_secs(20),
        "vmm did not stop on SIGTERM",
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("interrupted"), "stderr: {err}");
}

#[test]
fn kvm_control_api_reports_pauses_and_resumes() {
    use std::os::unix::fs::PermissionsExt;
    require_kvm();
    let node = memnode(&["--capacity", "64M"]);
    let sock = std::env::temp_dir().join(format!("vmm-api-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let mut child = Command::new(VMM)
        .args([
            "run",
            "--workload",
            "rand:size=8M,ops=50000000",
            "--mem",
            "8M",
            "--local-cache",
            "1M",
            "--memnode",
            &node.addr,
        ])
        .arg("--api-sock")
        .arg(&sock)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !sock.exists() {
        assert!(t.elapsed() < Duration::from_secs(20), "no API socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "socket is accessible to others: {mode:o}");
    let get = |path: &str| vmm::api::request(&sock, "GET", path).unwrap();
    let (code, vm) = get("/vm");
    assert_eq!(code, 200);
    assert_eq!(vm["state"], "running");
    assert_eq!(vm["info"]["mem_bytes"], 8 << 20);
    // Pause: the counters stop moving; resume: they move again.
    assert_eq!(vmm::api::request(&sock, "PUT", "/vm/pause").unwrap().0, 200);
    std::thread::sleep(Duration::from_millis(300));
    let (_, vm) = get("/vm");
    assert_eq!(
        (vm["state"].as_str(), vm["vcpus_parked"].as_u64()),
        (Some("paused"), Some(1))
    );
    let faults = |v: &serde_json::Value| {
        v["faults_remote"].as_u64().unwrap() + v["faults_zero"].as_u64().unwrap()
    };
    let a = faults(&get("/stats").1);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(faults(&get("/stats").1), a, "faults while paused");
    assert_eq!(
        vmm::api::request(&sock, "PUT", "/vm/resume").unwrap().0,
        200
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(faults(&get("/stats").1) > a, "no progress after resume");
    let (code, nodes) = get("/memnodes");
    assert_eq!(code, 200);
    assert_eq!(nodes[0]["addr"], node.addr.as_str());
    // Bad requests get errors with messages, and the VM goes on.
    let (code, e) = vmm::api::request(&sock, "POST", "/vm").unwrap();
    assert_eq!(code, 405, "{e}");
    let (code, e) = get("/no/such/thing");
    assert_eq!(code, 404);
    assert!(e["error"].as_str().unwrap().contains("/no/such/thing"));
    let (code, _) = get("/../etc/passwd");
    assert_eq!(code, 400);
    let out = Command::new(VMM)
        .args(["stats", "--api-sock"])
        .arg(&sock)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("resident"));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert!(!sock.exists(), "the API socket is removed at exit");
}
