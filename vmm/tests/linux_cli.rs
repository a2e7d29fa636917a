//! `vmm run --kernel` bad input, on this machine: each case gives one clear error
//! line naming what was wrong and a non-zero exit, and nothing panics. Booting a
//! stock kernel for real is tested in the nested test host (tests/nested/run).

use splitvisor_tests::{Daemon, sibling_bin};
use std::process::Command;

const VMM: &str = env!("CARGO_BIN_EXE_vmm");

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("vmm-linux-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

/// A file that passes the bzImage header check (not bootable). Each call
/// writes a new file: the tests run in parallel threads of one process.
fn fake_bzimage() -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let p = tmp(&format!("bzImage-{n}"));
    let mut b = vec![0u8; 0x1000];
    b[0x202..0x206].copy_from_slice(b"HdrS");
    std::fs::write(&p, b).unwrap();
    p
}

fn run_err(args: &[&str]) -> String {
    let node = Daemon::memnode(&sibling_bin(VMM, "memnode"), &[]);
    let out = Command::new(VMM)
        .args(["run", "--memnode", &node.addr])
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "{args:?} should fail; stderr:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "one error line expected:\n{stderr}");
    errors[0].to_string()
}

#[test]
fn missing_kernel_is_named() {
    let e = run_err(&["--kernel", "/nonexistent/vmlinuz"]);
    assert!(e.contains("cannot read kernel /nonexistent/vmlinuz"), "{e}");
}

#[test]
fn a_file_that_is_not_a_kernel_is_refused() {
    let p = tmp("not-a-kernel");
    std::fs::write(&p, b"hello, I am text\n").unwrap();
    let e = run_err(&["--kernel", p.to_str().unwrap()]);
    assert!(e.contains("is not a Linux kernel"), "{e}");
}

#[test]
fn an_initrd_larger_than_ram_is_refused() {
    let k = fake_bzimage();
    let i = tmp("big-initrd");
    let f = std::fs::File::create(&i).unwrap();
    f.set_len(200 << 20).unwrap();
    let e = run_err(&[
        "--kernel",
        k.to_str().unwrap(),
        "--initrd",
        i.to_str().unwrap(),
        "--mem",
        "128M",
        "--local-cache",
        "16M",
    ]);
    assert!(
        e.contains("does not fit") && e.contains("big-initrd"),
        "{e}"
    );
}

#[test]
fn malformed_options_are_refused() {
    let k = fake_bzimage();
    let k = k.to_str().unwrap();
    let e = run_err(&["--kernel", k, "--disk", "iscsi://127.0.0.1:1/x"]);
    assert!(e.contains("unsupported disk"), "{e}");
    let e = run_err(&["--kernel", k, "--disk", "nbd://no-port/x"]);
    assert!(e.contains("HOST:PORT"), "{e}");
    let e = run_err(&["--kernel", k, "--disk", "nbds://127.0.0.1:1/x"]);
    assert!(e.contains("needs ca=FILE"), "{e}");
    // The CA file is read before any connection is tried, and named.
    let e = run_err(&[
        "--kernel",
        k,
        "--disk",
        "nbds://127.0.0.1:1/x,ca=/nonexistent/ca.pem",
    ]);
    assert!(e.contains("/nonexistent/ca.pem"), "{e}");
    let e = run_err(&["--kernel", k, "--disk", "file:/nonexistent/disk.img"]);
    assert!(e.contains("/nonexistent/disk.img"), "{e}");
    let e = run_err(&["--kernel", k, "--mem", "1X"]);
    assert!(e.contains("--mem"), "{e}");
    let e = run_err(&["--kernel", k, "--mem", "8G", "--local-cache", "16M"]);
    assert!(e.contains("PCI hole"), "{e}");
    let e = run_err(&["--kernel", k, "--workload", "seq"]);
    assert!(e.contains("cannot be used with"), "{e}");
}

#[test]
fn a_software_kvm_is_detected_with_a_pointer_to_the_nested_host() {
    if !vmm::linux::software_kvm() {
        println!("gate: /dev/kvm is hardware KVM here; this check is for kvm_pvm machines");
        return;
    }
    let k = fake_bzimage();
    let e = run_err(&["--kernel", k.to_str().unwrap()]);
    assert!(
        e.contains("software nested KVM")
            && e.contains("tests/nested/run")
            && e.contains("--allow-software-kvm"),
        "{e}"
    );
}
