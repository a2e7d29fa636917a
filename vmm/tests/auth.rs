//! `vmm run` over authenticated memory nodes (guest-shim workload on this
//! machine's /dev/kvm, memnode processes on loopback): the right key runs and
//! verifies; no key or another key is refused, naming the node; the memory node
//! `vmm` starts for a run gets its key over a pipe, never in its command line.

use fabric::auth::Key;
use splitvisor_tests::{Daemon, sibling_bin};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const VMM: &str = env!("CARGO_BIN_EXE_vmm");

fn key_file(tag: &str, key: &Key) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmm-auth-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("cluster.key");
    key.write_new(&p).unwrap();
    p
}

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(VMM).args(args).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn kvm_the_cluster_key_is_needed_both_ways() {
    let key = Key::generate().unwrap();
    let path = key_file("run", &key);
    let p = path.to_str().unwrap();
    let node = Daemon::memnode(
        &sibling_bin(VMM, "memnode"),
        &["--capacity", "1G", "--auth-key", p],
    );
    let base = [
        "run",
        "--workload",
        "rand:size=16M,ops=20000",
        "--mem",
        "64M",
        "--local-cache",
        "4M",
        "--memnode",
        &node.addr,
    ];
    let (ok, out) = run(&[&base[..], &["--auth-key", p]].concat());
    assert!(ok, "{out}");
    assert!(out.contains("rand verified"), "{out}");
    let (ok, out) = run(&base);
    assert!(!ok);
    assert!(
        out.contains(&node.addr) && out.contains("requires authentication"),
        "{out}"
    );
    let other = key_file("other", &Key::generate().unwrap());
    let (ok, out) = run(&[&base[..], &["--auth-key", other.to_str().unwrap()]].concat());
    assert!(!ok);
    assert!(out.contains("could not prove the cluster key"), "{out}");
    // `vmm keygen` writes a usable key and never replaces one.
    let made = path.with_file_name("made.key");
    let (ok, out) = run(&["keygen", made.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(Key::load(&made).is_ok());
    let (ok, _) = run(&["keygen", made.to_str().unwrap()]);
    assert!(!ok, "keygen replaced a key");
    for p in [&path, &other] {
        let _ = std::fs::remove_dir_all(p.parent().unwrap());
    }
}

#[test]
fn kvm_the_node_started_for_a_run_gets_its_key_outside_argv() {
    let key = Key::generate().unwrap();
    let path = key_file("auto", &key);
    let vmm = Command::new(VMM)
        .args([
            "run",
            "--workload",
            "seq:size=32M",
            "--mem",
            "64M",
            "--local-cache",
            "4M",
            "--auth-key",
            path.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Find the memnode it started, and read its command line.
    let deadline = Instant::now() + Duration::from_secs(30);
    let cmdline = loop {
        let child = std::fs::read_dir("/proc").unwrap().flatten().find_map(|e| {
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let ppid: u32 = stat
                .rsplit(')')
                .next()?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            (ppid == vmm.id()).then(|| std::fs::read(e.path().join("cmdline")).ok())?
        });
        if let Some(c) = child.filter(|c| !c.is_empty()) {
            break String::from_utf8_lossy(&c).replace('\0', " ");
        }
        assert!(Instant::now() < deadline, "no memnode child of vmm");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(
        cmdline.contains("memnode") && cmdline.contains("--auth-key -"),
        "{cmdline}"
    );
    assert!(
        !cmdline.contains(&key.to_hex()),
        "the key is in argv: {cmdline}"
    );
    let out = vmm.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("seq verified"));
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}
