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
        // fuzz/run names a fresh directory on tmpfs (FLUSH syncs the volume)
        // and removes it afterwards.
        let dir = std::env::var_os("SPLITVISOR_FUZZ_NBD_DIR").map_or_else(
            || std::env::temp_dir().join(format!("splitvisor-fuzz-nbd-{}", std::process::id())),
            std::path::PathBuf::from,
        );
        Harness::new(&dir).expect("the fuzz volume directory")
    });
    h.serve_client_bytes(data).expect("loopback TCP");
});
