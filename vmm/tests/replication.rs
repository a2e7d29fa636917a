//! Guest memory that survives memory-node failures (`--replicas`): nodes
//! killed (`kill -9`), stopped (SIGSTOP) or restarted at random moments while
//! a 2-vCPU guest rewrites every page of a working set far larger than its
//! cache many times; every page is verified at the end, and the stats must
//! show every page back at its full number of live copies.
//!
//! `SPLITVISOR_REPLICA_SEEDS=a,b,..` replaces the seeds the kill test runs
//! with (each run prints its seed and schedule).

use splitvisor_tests::{Daemon, sibling_bin};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const VMM: &str = env!("CARGO_BIN_EXE_vmm");

fn memnode() -> Daemon {
    Daemon::memnode(&sibling_bin(VMM, "memnode"), &["--capacity", "1G"])
}

/// A memory node listening on `addr` (a restart at a known address).
fn memnode_at(addr: &str) -> Daemon {
    Daemon::start(
        Command::new(sibling_bin(VMM, "memnode"))
            .args(["--listen", addr, "--capacity", "1G"])
            .env("RUST_LOG", "warn"),
        "memnode listening on ",
    )
}

/// A VM run: the process, its API socket and its `--stats-json` file.
struct Vm {
    child: Child,
    sock: PathBuf,
    stats: PathBuf,
    what: String,
}

/// Starts `vmm run` with a 2-vCPU `rand` guest (32 MiB per vCPU, each page
/// rewritten about `rewrites` times, 4 MiB of cache) over `nodes`, with
/// `replicas` copies per page and `extra` options.
fn start(
    tag: &str,
    seed: u64,
    nodes: &[&Daemon],
    replicas: usize,
    rewrites: u64,
    extra: &[&str],
) -> Vm {
    let dir = std::env::temp_dir();
    let sock = dir.join(format!("vmm-repl-{}-{tag}.sock", std::process::id()));
    let stats = dir.join(format!("vmm-repl-{}-{tag}.json", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let size_mb = 32u64;
    // Half the operations write: each page gets about `rewrites` versions.
    let ops = size_mb * 256 * 2 * rewrites;
    let mut cmd = Command::new(VMM);
    cmd.arg("run")
        .args([
            "--workload",
            &format!("rand:size={size_mb}M,seed={seed},ops={ops}"),
        ])
        .args(["--mem", "64M", "--vcpus", "2", "--local-cache", "4M"])
        .args(["--replicas", &replicas.to_string()])
        .arg("--api-sock")
        .arg(&sock)
        .arg("--stats-json")
        .arg(&stats)
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for n in nodes {
        cmd.args(["--memnode", &n.addr]);
    }
    let mut child = cmd.spawn().unwrap();
    let t0 = Instant::now();
    while !sock.exists() {
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "{tag}: vmm exited early:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{tag}: no API socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Vm {
        child,
        sock,
        stats,
        what: format!("{tag} (seed {seed}, --replicas {replicas})"),
    }
}

impl Vm {
    fn get(&self, path: &str) -> serde_json::Value {
        vmm::api::request(&self.sock, "GET", path)
            .map(|(_, v)| v)
            .unwrap_or_default()
    }

    /// Waits until the stats show `failures` failed nodes and every page at
    /// its full number of live copies (re-replication done), while the guest
    /// runs on.
    fn wait_repaired(&mut self, failures: u64) {
        let t0 = Instant::now();
        loop {
            let s = self.get("/stats");
            if s["node_failures"] == failures && s["pages_below_replicas"] == 0 {
                return;
            }
            if let Some(st) = self.child.try_wait().unwrap() {
                let out = std::mem::replace(&mut self.child, Command::new("true").spawn().unwrap())
                    .wait_with_output()
                    .unwrap();
                panic!(
                    "{}: the VM ended ({st}) before re-replication was seen done; last stats {s}\nstdout:\n{}\nstderr:\n{}",
                    self.what,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "{}: no full redundancy after 60 s: {s}",
                self.what
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the end; asserts that both vCPUs verified every page and
    /// the VM exited 0. Returns the final stats.
    fn expect_verified(self) -> serde_json::Value {
        let out = wait(self.child, &self.what);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let verified = stdout
            .lines()
            .filter(|l| l.contains(" verified: ") && l.contains(" 0 mismatches"))
            .count();
        assert!(
            out.status.success() && verified == 2,
            "{}: lost guest data or failed ({verified} of 2 vCPUs verified, {})\nstdout:\n{stdout}\nstderr:\n{stderr}",
            self.what,
            out.status
        );
        let text = std::fs::read_to_string(&self.stats).unwrap();
        let _ = std::fs::remove_file(&self.stats);
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["stats"].clone()
    }
}

fn wait(child: Child, what: &str) -> Output {
    splitvisor_tests::wait_for_exit(
        child,
        Duration::from_secs(300),
        &format!("{what}: the VM did not end"),
    )
}

/// A moment a while into the run, from the seed: 300 to 2300 ms.
fn random_moment(seed: u64) -> Duration {
    Duration::from_millis(300 + (seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40) % 2000)
}

fn seeds(default: &[u64]) -> Vec<u64> {
    std::env::var("SPLITVISOR_REPLICA_SEEDS")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

/// Issue 16, test 1: three nodes, two copies, one node killed with -9 at a
/// random moment: the guest verifies, the VMM exits 0, and at the end every
/// page has two live copies.
#[test]
fn kvm_a_killed_node_loses_no_write_and_redundancy_comes_back() {
    for seed in seeds(&[3, 17]) {
        let nodes = [memnode(), memnode(), memnode()];
        let mut vm = start("kill", seed, &nodes.iter().collect::<Vec<_>>(), 2, 8, &[]);
        let victim = (seed % 3) as usize;
        let at = random_moment(seed);
        eprintln!("{}: kill -9 node {victim} at {at:?}", vm.what);
        std::thread::sleep(at);
        nodes[victim].signal(libc::SIGKILL);
        vm.wait_repaired(1);
        let list = vm.get("/memnodes");
        let dead = &list[victim];
        assert_eq!(dead["state"], "dead", "{list}");
        assert!(
            dead["failure"]
                .as_str()
                .unwrap()
                .contains(&nodes[victim].addr),
            "{list}"
        );
        let stats = vm.expect_verified();
        assert_eq!(stats["node_failures"], 1, "{stats}");
        assert_eq!(stats["pages_below_replicas"], 0, "{stats}");
        assert_eq!(stats["pages_without_copy"], 0, "{stats}");
        assert!(stats["rereplicated"].as_u64().unwrap() > 0, "{stats}");
    }
}

/// Test 2: the node is stopped instead (its sockets stay open, it never
/// answers): the guest runs on after the node timeout; once continued, the
/// node is not used again.
#[test]
fn kvm_a_stopped_node_is_declared_dead_and_never_used_again() {
    let nodes = [memnode(), memnode(), memnode()];
    let mut vm = start(
        "stop",
        5,
        &nodes.iter().collect::<Vec<_>>(),
        2,
        8,
        &["--node-timeout", "300ms"],
    );
    std::thread::sleep(random_moment(5));
    nodes[1].freeze();
    vm.wait_repaired(1);
    nodes[1].thaw();
    let held = vm_pages_on(&nodes[1].addr, &vm);
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        vm_pages_on(&nodes[1].addr, &vm) <= held,
        "{}: the continued node took pages again",
        vm.what
    );
    let list = vm.get("/memnodes");
    assert_eq!(list[1]["state"], "dead", "{list}");
    assert!(
        list[1]["failure"]
            .as_str()
            .unwrap()
            .contains("no reply within"),
        "{list}"
    );
    let stats = vm.expect_verified();
    assert_eq!(stats["pages_below_replicas"], 0, "{stats}");
}

/// This VM's pages on the node at `addr`, asked of the node itself.
fn vm_pages_on(addr: &str, vm: &Vm) -> u64 {
    let id = vm.get("/vm")["info"]["id"]
        .as_u64()
        .expect("info.id in GET /vm");
    let c = fabric::PageClient::connect(
        addr,
        &fabric::ClientConfig {
            vm_id: id,
            role: fabric::proto::Role::Admin,
            ..Default::default()
        },
    )
    .unwrap();
    c.stats().unwrap().vm_pages
}

/// Test 3: two nodes killed one after the other, with time to re-replicate
/// between (4 nodes, two copies); and three copies with two nodes killed at
/// once.
#[test]
fn kvm_sequential_and_simultaneous_node_deaths_lose_no_write() {
    let nodes = [memnode(), memnode(), memnode(), memnode()];
    let mut vm = start("seq-kills", 9, &nodes.iter().collect::<Vec<_>>(), 2, 8, &[]);
    std::thread::sleep(random_moment(9));
    nodes[0].signal(libc::SIGKILL);
    vm.wait_repaired(1);
    nodes[2].signal(libc::SIGKILL);
    vm.wait_repaired(2);
    let stats = vm.expect_verified();
    assert_eq!(stats["pages_below_replicas"], 0, "{stats}");

    let nodes = [memnode(), memnode(), memnode(), memnode()];
    let vm = start(
        "two-at-once",
        13,
        &nodes.iter().collect::<Vec<_>>(),
        3,
        8,
        &[],
    );
    std::thread::sleep(random_moment(13));
    nodes[1].signal(libc::SIGKILL);
    nodes[3].signal(libc::SIGKILL);
    let stats = vm.expect_verified();
    assert_eq!(stats["node_failures"], 2, "{stats}");
    assert_eq!(stats["pages_without_copy"], 0, "{stats}");
}

/// Test 4: a killed node restarted at the same address is a new, empty
/// node: attached again, it receives copies, and when the other holder of
/// its pages dies they are read from what it got after the restart.
#[test]
fn kvm_a_restarted_node_is_attached_as_new_and_serves_only_new_copies() {
    let (a, b, c) = (memnode(), memnode(), memnode());
    let mut vm = start("restart", 21, &[&a, &b, &c], 2, 10, &[]);
    std::thread::sleep(random_moment(21));
    let addr = c.addr.clone();
    c.signal(libc::SIGKILL);
    drop(c);
    vm.wait_repaired(1);
    let c2 = memnode_at(&addr);
    let sock = vm.sock.to_str().unwrap().to_string();
    let out = Command::new(VMM)
        .args(["attach-memnode", "--api-sock", &sock, &addr])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events = vm.get("/events");
    assert!(
        events.as_array().unwrap().iter().any(
            |e| e["event"] == "attached" && e["detail"].as_str().unwrap().contains("restarted")
        ),
        "{events}"
    );
    // Lose the first node: the pages it held get their second copy on the
    // restarted node (the only one with room outside their sets), and are
    // read from b or from what the new node got since it was attached.
    std::thread::sleep(Duration::from_millis(500));
    a.signal(libc::SIGKILL);
    vm.wait_repaired(2);
    assert!(
        vm_pages_on(&addr, &vm) > 0,
        "the restarted node got no copies"
    );
    let list = vm.get("/memnodes");
    assert_eq!(list[3]["state"], "active", "{list}");
    assert_eq!(list[2]["state"], "dead", "{list}");
    let stats = vm.expect_verified();
    assert_eq!(stats["pages_below_replicas"], 0, "{stats}");
    drop(c2);
}

/// Test 5: every copy of some pages lost (two of three nodes killed at once
/// with two copies): the VM stops with one error naming the failed nodes and
/// how many pages were lost; nothing hangs.
#[test]
fn kvm_losing_every_copy_stops_the_vm_naming_nodes_and_count() {
    let nodes = [memnode(), memnode(), memnode()];
    let vm = start(
        "all-lost",
        31,
        &nodes.iter().collect::<Vec<_>>(),
        2,
        50,
        &[],
    );
    std::thread::sleep(Duration::from_millis(1500));
    nodes[0].signal(libc::SIGKILL);
    nodes[2].signal(libc::SIGKILL);
    let out = wait(vm.child, &vm.what);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("vmm: error:"))
        .collect();
    assert_eq!(lines.len(), 1, "{err}");
    let line = lines[0];
    assert!(
        line.contains("guest pages lost")
            && line.contains(&nodes[0].addr)
            && line.contains(&nodes[2].addr),
        "{line}"
    );
    let count: u64 = line
        .split("vmm: error: ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no page count in {line}"));
    assert!(count > 0, "{line}");
}
