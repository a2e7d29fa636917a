//! The control API's request routing: the input is `METHOD URL\0BODY` (the
//! URL as tiny_http hands it over, so UTF-8); the first byte's low bit picks
//! the metrics listener instead of the API's.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let (head, body) = match rest.iter().position(|&b| b == 0) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let Ok(head) = std::str::from_utf8(head) else {
        return;
    };
    let (method, url) = head.split_once(' ').unwrap_or((head, ""));
    let _ = vmm::api::fuzzing::route(method, url, body, pick & 1 == 1);
});
