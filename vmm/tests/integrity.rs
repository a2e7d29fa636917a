//! End-to-end page integrity and encryption against real memory node
//! processes (guest-shim workloads on this machine's /dev/kvm). Another client
//! of the node (as a co-tenant or a compromised node could) rewrites the VM's
//! stored pages: flipped bytes and replayed older versions are caught when the
//! VM fetches them, and the VM stops with an error naming the node, instead of
//! computing on bad data. With `--encrypt-pages` the node stores ciphertext.

use fabric::{ClientConfig, PageClient};
use splitvisor_tests::{Daemon, sibling_bin};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const VMM: &str = env!("CARGO_BIN_EXE_vmm");

fn memnode() -> Daemon {
    Daemon::memnode(&sibling_bin(VMM, "memnode"), &["--capacity", "1G"])
}

/// The VMs' secret, shared with the test's peer: the node binds a VM id to its
/// VMM's secret, and the peer here plays a holder of it gone rogue (or a node
/// that alters pages itself).
fn vm_secret() -> &'static (fabric::auth::Key, std::path::PathBuf) {
    static SECRET: std::sync::OnceLock<(fabric::auth::Key, std::path::PathBuf)> =
        std::sync::OnceLock::new();
    SECRET.get_or_init(|| {
        let key = fabric::auth::Key::generate().unwrap();
        let path = splitvisor_tests::secret_file("integrity-vm", &key.to_hex());
        (key, path)
    })
}

/// A client acting on VM `vm`'s address space on `addr`.
fn peer(addr: &str, vm: u64) -> PageClient {
    PageClient::connect(
        addr,
        &ClientConfig {
            vm_id: vm,
            vm_secret: Some(vm_secret().0.clone()),
            ..ClientConfig::default()
        },
    )
    .expect("connect to memnode")
}

fn start_vm(node: &str, vm: u64, workload: &str, extra: &[&str]) -> Child {
    Command::new(VMM)
        .args([
            "run",
            "--workload",
            workload,
            "--mem",
            "64M",
            "--local-cache",
            "4M",
            "--vm-id",
            &vm.to_string(),
            "--memnode",
            node,
            "--vm-secret",
        ])
        .arg(&vm_secret().1)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until the VM has at least `n` pages on the node.
fn wait_pages(c: &PageClient, n: u64) {
    let t = Instant::now();
    while c.stats().unwrap().vm_pages < n {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the VM never wrote {n} pages out"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Reads every page of the first 16 MiB the node holds for the VM.
fn snapshot(c: &PageClient) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    let gpns: Vec<u64> = (0..4096).collect();
    for chunk in gpns.chunks(64) {
        let mut buf = vec![0u8; chunk.len() * 4096];
        let present = c.read_pages(chunk, &mut buf).unwrap();
        for (k, &g) in chunk.iter().enumerate() {
            if present.0 & (1 << k) != 0 {
                out.push((g, buf[k * 4096..(k + 1) * 4096].to_vec()));
            }
        }
    }
    out
}

fn finish(vm: Child) -> (bool, String) {
    let out = vm.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn kvm_a_flipped_byte_is_caught_and_stops_the_vm() {
    let node = memnode();
    let vm = start_vm(&node.addr, 901, "rand:size=16M,ops=3000000", &[]);
    let c = peer(&node.addr, 901);
    wait_pages(&c, 512);
    // Flip one byte in every page the node holds for the VM.
    for (g, mut data) in snapshot(&c) {
        data[g as usize % 4096] ^= 0x40;
        c.write_pages(&[(g, &data)]).unwrap();
    }
    let (ok, out) = finish(vm);
    assert!(!ok, "the VM ran on over tampered pages:\n{out}");
    assert!(
        out.contains(&format!("memory node {} returned a bad page", node.addr))
            && out.contains("not what was written"),
        "{out}"
    );
}

#[test]
fn kvm_a_replayed_older_version_is_caught() {
    let node = memnode();
    let vm = start_vm(
        &node.addr,
        902,
        "rand:size=16M,ops=3000000",
        &["--encrypt-pages"],
    );
    let c = peer(&node.addr, 902);
    wait_pages(&c, 512);
    let old = snapshot(&c);
    // Wait until the workload has written newer versions of some of those
    // pages, then put their old versions back (each one a page the node once
    // really held).
    let t = Instant::now();
    let stale: Vec<(u64, Vec<u8>)> = loop {
        let now: std::collections::HashMap<u64, Vec<u8>> = snapshot(&c).into_iter().collect();
        let changed: Vec<(u64, Vec<u8>)> = old
            .iter()
            .filter(|(g, d)| now.get(g).is_some_and(|n| n != d))
            .cloned()
            .collect();
        if changed.len() >= 64 {
            break changed;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the workload rewrote only {} pages",
            changed.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    for (g, data) in &stale {
        c.write_pages(&[(*g, data)]).unwrap();
    }
    let (ok, out) = finish(vm);
    assert!(
        !ok,
        "the VM ran on over {} replayed pages:\n{out}",
        stale.len()
    );
    assert!(out.contains("returned a bad page"), "{out}");
}

#[test]
fn kvm_encrypted_pages_run_verified_and_the_node_holds_ciphertext() {
    // The same deterministic workload, plain and encrypted, each on its own
    // node: page 0 (the first written out) is stored as written, and as
    // something else.
    let plain_node = memnode();
    let sealed_node = memnode();
    let first_page = |node: &str, vm: u64, extra: &[&str]| {
        let child = start_vm(node, vm, "seq:size=48M", extra);
        let c = peer(node, vm);
        let t = Instant::now();
        let page = loop {
            let mut buf = vec![0u8; 4096];
            if c.read_page(0, &mut buf).unwrap() {
                break buf;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "page 0 never written out"
            );
            std::thread::sleep(Duration::from_millis(2));
        };
        let (ok, out) = finish(child);
        assert!(ok, "{out}");
        assert!(out.contains("seq verified"), "{out}");
        page
    };
    let plain = first_page(&plain_node.addr, 903, &[]);
    let sealed = first_page(&sealed_node.addr, 904, &["--encrypt-pages"]);
    assert_ne!(plain, sealed, "the node holds the guest's data");
    let same = plain.iter().zip(&sealed).filter(|(a, b)| a == b).count();
    assert!(same < 64, "{same} of 4096 bytes equal the plaintext");
}

#[test]
fn kvm_every_workload_runs_verified_with_encrypted_pages() {
    let node = memnode();
    // Each working set twice the cache or more: pages go out and come back.
    // (Sizes kept small: CI runs this in the debug build, where AES-GCM is
    // unoptimized.)
    for (w, cache) in [
        ("seq:size=8M", "2M"),
        ("rand:size=8M,ops=40000", "2M"),
        ("chase:size=512K", "256K"),
        ("hash:size=512K,ops=2000", "256K"),
    ] {
        let out = Command::new(VMM)
            .args([
                "run",
                "--workload",
                w,
                "--mem",
                "64M",
                "--local-cache",
                cache,
            ])
            .args(["--memnode", &node.addr, "--encrypt-pages", "--stats-json"])
            .arg(std::env::temp_dir().join(format!("integrity-{}.json", std::process::id())))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{w}: {text}");
        assert!(
            text.contains("verified") && !text.contains("FAILED"),
            "{w}: {text}"
        );
        assert!(
            !text.contains(" 0 remote"),
            "{w}: nothing came back from the node: {text}"
        );
    }
}

/// With two copies of every page, a node that returns bad pages is declared
/// dead and the pages are read from the other copy: the VM runs on and
/// verifies, and the log names the node and why.
#[test]
fn kvm_with_two_copies_a_tampered_node_is_dropped_and_the_vm_runs_on() {
    let (a, b) = (memnode(), memnode());
    let vm = start_vm(
        &a.addr,
        905,
        "rand:size=16M,ops=400000",
        &["--memnode", &b.addr, "--replicas", "2"],
    );
    let c = peer(&a.addr, 905);
    wait_pages(&c, 512);
    for (g, mut data) in snapshot(&c) {
        data[g as usize % 4096] ^= 0x40;
        c.write_pages(&[(g, &data)]).unwrap();
    }
    let (ok, out) = finish(vm);
    assert!(ok && out.contains("rand verified"), "{out}");
    assert!(
        out.contains(&format!(
            "memory node {} failed and is no longer used by this VM: memory node {} returned a bad page",
            a.addr, a.addr
        )),
        "{out}"
    );
}
