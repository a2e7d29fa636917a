//! The memory node's handling of a connection's frames: the first byte picks
//! whether the handshake runs on the input or a VMM's or admin's session is
//! already open; the rest is the peer's byte stream.
#![no_main]

use fabric::proto::Role;
use libfuzzer_sys::fuzz_target;
use memnode::server::fuzzing::{Start, serve_bytes};

fuzz_target!(|data: &[u8]| {
    let Some((&pick, stream)) = data.split_first() else {
        return;
    };
    let start = match pick % 3 {
        0 => Start::Hello,
        1 => Start::Session(Role::Vmm),
        _ => Start::Session(Role::Admin),
    };
    // Eight pages: a VM's quota (four) and the node's capacity are reachable.
    serve_bytes(start, 8, stream);
});
