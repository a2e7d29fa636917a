//! The storage node's connection path: the input is a client's whole byte
//! stream (client flags, options, then transmission requests), served by the
//! real handshake and transmission code over loopback TCP.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use storagenode::server::fuzzing::Harness;

static HARNESS: OnceLock<Harness> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let h = HARNESS.get_or_init(|| {
        // tmpfs when there is one: FLUSH syncs the volume.
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            std::path::PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("splitvisor-fuzz-nbd-{}", std::process::id()));
        Harness::new(&dir).expect("the fuzz volume directory")
    });
    h.serve_client_bytes(data).expect("loopback TCP");
});
