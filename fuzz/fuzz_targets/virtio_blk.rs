//! The virtio-blk request path: rings, descriptors, headers and buffers all
//! come from the input (see `vmm::devices::virtio_blk::fuzzing::run_queue`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmm::devices::virtio_blk::fuzzing::run_queue(data);
});
