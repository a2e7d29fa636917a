//! Starting `memnode` as a separate process for integration tests.
#![allow(dead_code)]

use fabric::{ClientConfig, PageClient};
use splitvisor_tests::Daemon;

/// A `memnode` process on a free loopback port, killed when dropped.
pub struct Node(Daemon);

impl std::ops::Deref for Node {
    type Target = Daemon;
    fn deref(&self) -> &Daemon {
        &self.0
    }
}

impl Node {
    /// Starts `memnode --listen 127.0.0.1:0` with `extra` arguments and waits for
    /// its `memnode listening on ADDR` line.
    pub fn start(extra: &[&str]) -> Node {
        Node(Daemon::memnode(
            std::path::Path::new(env!("CARGO_BIN_EXE_memnode")),
            extra,
        ))
    }

    /// A client for `vm`, acting for it with this test process's VM secret
    /// ([`vm_secret`]), so that every client of one VM id is the same VMM.
    pub fn client(&self, vm: u64) -> PageClient {
        PageClient::connect(
            &self.addr,
            &ClientConfig {
                vm_id: vm,
                vm_secret: Some(vm_secret().clone()),
                ..ClientConfig::default()
            },
        )
        .expect("connect to memnode")
    }

    /// Sends `sig` and waits for the exit status.
    pub fn stop(self, sig: i32) -> std::process::ExitStatus {
        self.0.stop(sig)
    }
}

/// This test process's VM secret: the nodes bind each VM id to the first VMM
/// identity that uses it, and the tests' clients all act as one VMM.
pub fn vm_secret() -> &'static fabric::auth::Key {
    static SECRET: std::sync::OnceLock<fabric::auth::Key> = std::sync::OnceLock::new();
    SECRET.get_or_init(|| fabric::auth::Key::generate().unwrap())
}

/// A page whose every byte depends on (vm, gpn, version), so misplaced or stale
/// pages are detected (the behaviour checks' pattern).
pub use memnode::client_checks::pattern;
