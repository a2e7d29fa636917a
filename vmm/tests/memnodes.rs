//! Memory nodes joining and leaving a running VM (guest-shim workload on this
//! machine's /dev/kvm, memnode processes on loopback), through the control API
//! and the `vmm attach-memnode` / `detach-memnode` commands.

use splitvisor_tests::{Daemon, sibling_bin};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const VMM: &str = env!("CARGO_BIN_EXE_vmm");

fn memnode() -> Daemon {
    Daemon::memnode(&sibling_bin(VMM, "memnode"), &["--capacity", "2G"])
}

fn sock_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("vmm-memnodes-{}-{tag}.sock", std::process::id()))
}

fn api(sock: &Path, method: &str, path: &str) -> (u16, serde_json::Value) {
    vmm::api::request(sock, method, path).unwrap()
}

fn node<'a>(list: &'a serde_json::Value, addr: &str) -> &'a serde_json::Value {
    list.as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|n| n["addr"] == addr)
        .unwrap_or_else(|| panic!("{addr} not in {list}"))
}

fn cli(args: &[&str]) -> (bool, String) {
    let out = Command::new(VMM).args(args).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn wait_until(what: &str, deadline: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts `vmm run ARGS --api-sock SOCK` (stdout and stderr piped, `RUST_LOG` =
/// `log`) and waits for its API socket.
fn start_vm(tag: &str, args: &[&str], log: &str) -> (std::process::Child, PathBuf) {
    let sock = sock_path(tag);
    let _ = std::fs::remove_file(&sock);
    let child = Command::new(VMM)
        .arg("run")
        .args(args)
        .arg("--api-sock")
        .arg(&sock)
        .env("RUST_LOG", log)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the API socket", Duration::from_secs(30), || sock.exists());
    (child, sock)
}

#[test]
fn kvm_attach_then_detach_mid_run_keeps_every_page() {
    let (a, b) = (memnode(), memnode());
    let vm_id = 0x5eed_0000_0000_0000u64 | u64::from(std::process::id());
    let (mut child, sock) = start_vm(
        "main",
        &[
            "--workload",
            "rand:size=256M,ops=120000",
            "--mem",
            "256M",
            "--local-cache",
            "8M",
            "--memnode",
            &a.addr,
            "--vm-id",
            &vm_id.to_string(),
        ],
        "info",
    );
    let sock_s = sock.to_str().unwrap();
    // Hold the guest while the second node joins, so most pages are new after it.
    assert_eq!(api(&sock, "PUT", "/vm/pause").0, 200);
    let (ok, out) = cli(&["attach-memnode", "--api-sock", sock_s, &b.addr]);
    assert!(ok, "{out}");
    assert_eq!(api(&sock, "PUT", "/vm/resume").0, 200);
    wait_until("pages on both nodes", Duration::from_secs(60), || {
        let (_, l) = api(&sock, "GET", "/memnodes");
        node(&l, &a.addr)["pages"].as_u64().unwrap() > 0
            && node(&l, &b.addr)["pages"].as_u64().unwrap() > 1000
    });
    assert!(
        child.try_wait().unwrap().is_none(),
        "the workload should still be running"
    );

    // Detach the first node while the guest runs.
    let (ok, out) = cli(&["detach-memnode", "--api-sock", sock_s, &a.addr]);
    assert!(ok, "{out}");
    assert!(out.contains("detached"), "{out}");
    let (_, l) = api(&sock, "GET", "/memnodes");
    assert_eq!(node(&l, &a.addr)["state"], "detached", "{l}");
    assert_eq!(node(&l, &a.addr)["pages"], 0, "{l}");
    // Ask the first node itself: none of this VM's pages are left on it.
    let direct = fabric::PageClient::connect(
        &a.addr,
        &fabric::ClientConfig {
            vm_id,
            role: fabric::proto::Role::Admin,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(direct.stats().unwrap().vm_pages, 0);
    assert!(
        child.try_wait().unwrap().is_none(),
        "the drain should finish while the guest runs"
    );

    // The workload verifies every page at its end.
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "the run did not end"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        status.success() && stdout.contains("rand verified"),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn kvm_bad_attach_and_detach_requests_change_nothing() {
    let (a, b) = (memnode(), memnode());
    let (mut child, sock) = start_vm(
        "bad",
        &[
            "--workload",
            "rand:size=64M,ops=100000000",
            "--mem",
            "64M",
            "--local-cache",
            "8M",
            "--memnode",
            &a.addr,
        ],
        "warn",
    );
    let sock_s = sock.to_str().unwrap();
    let expect_err = |args: &[&str], needle: &str| {
        let (ok, out) = cli(args);
        assert!(!ok && out.contains(needle), "{args:?}: {out}");
        assert_eq!(
            out.lines().filter(|l| l.contains("error")).count(),
            1,
            "{out}"
        );
    };
    expect_err(
        &["attach-memnode", "--api-sock", sock_s, "127.0.0.1:1"],
        "cannot attach memory node 127.0.0.1:1",
    );
    expect_err(
        &["attach-memnode", "--api-sock", sock_s, &a.addr],
        "already attached",
    );
    expect_err(
        &["detach-memnode", "--api-sock", sock_s, "127.0.0.1:9"],
        "no memory node 127.0.0.1:9",
    );
    expect_err(
        &["detach-memnode", "--api-sock", sock_s, &a.addr],
        "is the last one",
    );
    let (code, v) = vmm::api::request_with_body(
        &sock,
        "PUT",
        "/memnodes",
        Some(&serde_json::json!({"address": 1})),
    )
    .unwrap();
    assert_eq!(code, 400, "{v}");
    // Nothing changed: one active node.
    let (_, l) = api(&sock, "GET", "/memnodes");
    assert_eq!(l.as_array().unwrap().len(), 1, "{l}");
    assert_eq!(node(&l, &a.addr)["state"], "active");
    // A good attach still works after the bad ones; then the node is a duplicate.
    let (ok, out) = cli(&["attach-memnode", "--api-sock", sock_s, &b.addr]);
    assert!(ok, "{out}");
    expect_err(
        &["attach-memnode", "--api-sock", sock_s, &b.addr],
        "already attached",
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// Stores `pages` non-zero pages for another VM on the node at `addr`.
fn fill(addr: &str, pages: u64) -> fabric::PageClient {
    let c = fabric::PageClient::connect(
        addr,
        &fabric::ClientConfig {
            vm_id: 999,
            ..Default::default()
        },
    )
    .unwrap();
    let data = vec![0xa5u8; 4096];
    for start in (0..pages).step_by(64) {
        let batch: Vec<(u64, &[u8])> = (start..(start + 64).min(pages))
            .map(|g| (g, &data[..]))
            .collect();
        c.write_pages(&batch).unwrap();
    }
    c
}

#[test]
fn kvm_a_full_node_sends_pages_elsewhere_and_all_full_is_a_clear_error() {
    let memnode_cap =
        |cap: &str| Daemon::memnode(&sibling_bin(VMM, "memnode"), &["--capacity", cap]);
    // Two 16 MiB nodes for 24 MiB of guest data: placement spreads it evenly by
    // the free room the nodes reported at connect. Another VM then takes half of
    // the first node behind our back, so it answers "out of capacity" and the
    // rest of our pages must go to the second node. The two nodes' room is then
    // exactly what the guest writes: the first node's last pages must be used
    // too, by batches cut to the room it reports after refusing a full one.
    let (a, b) = (memnode_cap("16M"), memnode_cap("16M"));
    let (child, sock) = start_vm(
        "full",
        &[
            "--workload",
            "seq:size=24M",
            "--mem",
            "24M",
            "--local-cache",
            "2M",
            "--memnode",
            &a.addr,
            "--memnode",
            &b.addr,
            "--paused",
        ],
        "warn",
    );
    // The guest has not run yet: nothing of ours is on the nodes.
    assert_eq!(api(&sock, "GET", "/vm").1["state"], "paused");
    let _other = fill(&a.addr, 2048);
    assert_eq!(api(&sock, "PUT", "/vm/resume").0, 200);
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success() && stdout.contains("seq verified"),
        "{stdout}\n{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "memory node {} takes no more of this VM's pages",
            a.addr
        )) && stderr.contains("out of capacity"),
        "{stderr}"
    );
    // Every page the other VM left room for on the first node is ours.
    assert!(
        stdout.contains(&format!("{}=2048", a.addr))
            && stdout.contains(&format!("{}=4096", b.addr)),
        "{stdout}"
    );

    // Both nodes too small: a clear error, not a silent failure.
    let (c, d) = (memnode_cap("1M"), memnode_cap("1M"));
    let out = Command::new(VMM)
        .args([
            "run",
            "--workload",
            "seq:size=32M",
            "--mem",
            "32M",
            "--local-cache",
            "4M",
            "--memnode",
            &c.addr,
            "--memnode",
            &d.addr,
        ])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("every memory node is full"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn kvm_rebalance_spreads_existing_pages_to_a_new_node() {
    let (a, b) = (memnode(), memnode());
    let (child, sock) = start_vm(
        "rebalance",
        &[
            "--workload",
            "rand:size=64M,ops=150000",
            "--mem",
            "64M",
            "--local-cache",
            "4M",
            "--memnode",
            &a.addr,
            "--rebalance",
            "50000",
        ],
        "warn",
    );
    let sock_s = sock.to_str().unwrap();
    // Every page placed on the first node, then the second joins.
    wait_until(
        "the fill on the first node",
        Duration::from_secs(120),
        || {
            let (_, l) = api(&sock, "GET", "/memnodes");
            node(&l, &a.addr)["pages"].as_u64().unwrap() > 12_000
        },
    );
    let (ok, out) = cli(&["attach-memnode", "--api-sock", sock_s, &b.addr]);
    assert!(ok, "{out}");
    wait_until(
        "rebalanced pages on the new node",
        Duration::from_secs(120),
        || {
            let (_, s) = api(&sock, "GET", "/stats");
            let (_, l) = api(&sock, "GET", "/memnodes");
            s["rebalanced"].as_u64().unwrap_or(0) > 2000
                && node(&l, &b.addr)["pages"].as_u64().unwrap() > 2000
        },
    );
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("rand verified"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
