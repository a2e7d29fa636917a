//! Starting `memnode` as a separate process for integration tests.
#![allow(dead_code)]

use fabric::{ClientConfig, PageClient};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// A `memnode` process on a free loopback port, killed when dropped.
pub struct Node {
    pub child: Child,
    pub addr: String,
}

impl Node {
    /// Starts `memnode --listen 127.0.0.1:0` with `extra` arguments and waits for
    /// its `memnode listening on ADDR` line.
    pub fn start(extra: &[&str]) -> Node {
        let mut child = Command::new(env!("CARGO_BIN_EXE_memnode"))
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .spawn()
            .expect("spawn memnode");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("read memnode's first line");
        let addr = line
            .trim()
            .strip_prefix("memnode listening on ")
            .unwrap_or_else(|| panic!("unexpected first line from memnode: {line:?}"))
            .to_string();
        Node { child, addr }
    }

    /// A client for `vm`.
    pub fn client(&self, vm: u64) -> PageClient {
        PageClient::connect(
            &self.addr,
            &ClientConfig {
                vm_id: vm,
                ..ClientConfig::default()
            },
        )
        .expect("connect to memnode")
    }

    /// Sends `sig` and waits for the exit status.
    pub fn stop(mut self, sig: i32) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
        self.child.wait().expect("wait for memnode")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A page whose every byte depends on (vm, gpn, version), so misplaced or stale
/// pages are detected.
pub fn pattern(vm: u64, gpn: u64, version: u64) -> Vec<u8> {
    let mut x = vm.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ gpn.wrapping_mul(0xbf58_476d_1ce4_e5b9)
        ^ version.wrapping_add(1);
    (0..4096 / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}
