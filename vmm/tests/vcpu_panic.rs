//! A vCPU thread that panics (a VMM bug) stops the VM: `vmm` exits non-zero
//! within a second, naming the vCPU, instead of waiting forever for it.
//! The panic comes from the test hook `SPLITVISOR_TEST_PANIC_VCPU`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const VMM: &str = env!("CARGO_BIN_EXE_vmm");

#[test]
fn kvm_a_panicking_vcpu_stops_the_vm_with_an_error_naming_it() {
    // vCPU 0 runs a workload that would take minutes; vCPU 1 panics at start.
    let mut child = Command::new(VMM)
        .args([
            "run",
            "--workload",
            "rand:size=16M,ops=1000000000",
            "--mem",
            "32M",
            "--local-cache",
            "8M",
            "--vcpus",
            "2",
            "--memnode",
            "ideal",
        ])
        .env("SPLITVISOR_TEST_PANIC_VCPU", "1")
        .env("RUST_LOG", "warn")
        // The second is the VMM's; symbolizing a backtrace (CI sets
        // RUST_BACKTRACE) can take seconds on a loaded machine.
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut panicked_at = None;
    let mut stderr = String::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        if panicked_at.is_none() && line.contains("panicked") {
            panicked_at = Some(Instant::now());
        }
        stderr.push_str(&line);
        stderr.push('\n');
    }
    // stderr closes when vmm exits.
    let status = child.wait().unwrap();
    let after = panicked_at
        .unwrap_or_else(|| panic!("no panic reported:\n{stderr}"))
        .elapsed();
    assert!(!status.success(), "vmm exited 0:\n{stderr}");
    assert!(
        stderr.contains("vCPU 1 panicked") && stderr.contains("vmm: error:"),
        "the error should name vCPU 1:\n{stderr}"
    );
    assert!(
        after < Duration::from_secs(1),
        "vmm took {after:?} to exit after the panic:\n{stderr}"
    );
}
