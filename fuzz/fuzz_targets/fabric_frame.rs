//! Fabric frame decoding: any byte string a peer sends.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = data;
    while let Ok(Some((_h, msg, used))) = fabric::proto::decode_frame(buf) {
        let mut out = Vec::new();
        msg.encode(0, &mut out);
        buf = &buf[used..];
    }
});
