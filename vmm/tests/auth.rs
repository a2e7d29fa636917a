//! `vmm run` over authenticated memory nodes (guest-shim workload on this
//! machine's /dev/kvm, memnode processes on loopback): the right key runs and
//! verifies; no key or another key is refused, naming the node; the memory node
//! `vmm` starts for a run gets its key over a pipe, never in its command line.
//! A VM id belongs to the VMM that holds its secret: another authenticated VMM
//! claiming it is refused. A VM at a node's quota goes to other nodes, and stops
//! with an error naming the quota when none is left.

use fabric::auth::Key;
use splitvisor_tests::{Daemon, sibling_bin};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const VMM: &str = env!("CARGO_BIN_EXE_vmm");

fn key_file(tag: &str, key: &Key) -> PathBuf {
    splitvisor_tests::secret_file(&format!("vmm-auth-{tag}"), &key.to_hex())
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

/// Pages VM `vm` has on the node at `addr`, asked as an admin tool (which needs
/// the cluster key, not the VM's secret).
fn vm_pages(addr: &str, vm: u64, key: &Key) -> u64 {
    fabric::PageClient::connect(
        addr,
        &fabric::ClientConfig {
            vm_id: vm,
            role: fabric::proto::Role::Admin,
            auth_key: Some(key.clone()),
            ..Default::default()
        },
    )
    .unwrap()
    .stats()
    .unwrap()
    .vm_pages
}

#[test]
fn kvm_a_vm_id_belongs_to_the_vmm_holding_its_secret() {
    let key = Key::generate().unwrap();
    let path = key_file("owner", &key);
    let secret = key_file("owner-vm", &Key::generate().unwrap());
    let p = path.to_str().unwrap();
    let node = Daemon::memnode(
        &sibling_bin(VMM, "memnode"),
        &["--capacity", "1G", "--auth-key", p],
    );
    let args = |workload: &'static str| {
        vec![
            "run".to_string(),
            "--workload".into(),
            workload.into(),
            "--mem".into(),
            "64M".into(),
            "--local-cache".into(),
            "4M".into(),
            "--memnode".into(),
            node.addr.clone(),
            "--auth-key".into(),
            p.into(),
            "--vm-id".into(),
            "77".into(),
        ]
    };
    // The owner starts paused: connected to the node (so the id is bound),
    // its guest waiting until the API resumes it.
    let sock = path.with_file_name("owner.sock");
    let owner = Command::new(VMM)
        .args(args("rand:size=16M,ops=200000"))
        .arg("--vm-secret")
        .arg(&secret)
        .arg("--paused")
        .arg("--api-sock")
        .arg(&sock)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !matches!(vmm::api::request(&sock, "GET", "/vm"), Ok((200, ref v)) if v["state"] == "paused")
    {
        assert!(Instant::now() < deadline, "the owner never came up paused");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Same cluster key, same VM id, its own (fresh) secret: refused.
    let intruder: Vec<String> = args("seq:size=8M");
    let intruder: Vec<&str> = intruder.iter().map(String::as_str).collect();
    let (ok, out) = run(&intruder);
    assert!(!ok, "{out}");
    assert!(
        out.contains(&node.addr) && out.contains("bound on this node to another VMM"),
        "{out}"
    );
    // The owner runs on undisturbed, its pages on the node.
    let (code, _) = vmm::api::request(&sock, "PUT", "/vm/resume").unwrap();
    assert!((200..300).contains(&code), "resume: {code}");
    while vm_pages(&node.addr, 77, &key) == 0 {
        assert!(Instant::now() < deadline, "the VM never wrote pages out");
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = owner.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("rand verified"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for p in [&path, &secret] {
        let _ = std::fs::remove_dir_all(p.parent().unwrap());
    }
}

#[test]
fn kvm_a_node_quota_sends_pages_elsewhere_and_is_named_when_nothing_is_left() {
    let key = Key::generate().unwrap();
    let path = key_file("quota", &key);
    let p = path.to_str().unwrap();
    let memnode = sibling_bin(VMM, "memnode");
    let capped = Daemon::memnode(
        &memnode,
        &["--capacity", "1G", "--vm-quota", "8M", "--auth-key", p],
    );
    let base = [
        "run",
        "--workload",
        "seq:size=32M",
        "--mem",
        "64M",
        "--local-cache",
        "4M",
        "--auth-key",
        p,
        "--memnode",
        &capped.addr,
    ];
    // 32 MiB of written pages do not fit in an 8 MiB quota.
    let (ok, out) = run(&base);
    assert!(!ok, "{out}");
    assert!(
        out.contains("every memory node is full")
            && out.contains(&capped.addr)
            && out.contains("--vm-quota"),
        "{out}"
    );
    // With a second node the pages beyond the quota go there.
    let spare = Daemon::memnode(&memnode, &["--capacity", "1G", "--auth-key", p]);
    let (ok, out) = run(&[&base[..], &["--memnode", &spare.addr]].concat());
    assert!(ok && out.contains("seq verified"), "{out}");
    let on_capped: u64 = out
        .split(&format!("{}=", capped.addr))
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no page count for the capped node: {out}"));
    assert!(
        on_capped <= 2048,
        "{on_capped} pages over an 8 MiB quota: {out}"
    );
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}
