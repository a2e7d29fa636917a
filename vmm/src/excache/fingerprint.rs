//! A 128-bit content fingerprint of a page, used to tell a page that was only read
//! from one that was written (see [`super::evict`], "Clean pages").

/// Fingerprint of a page of zeros (what a never-written page holds).
pub fn zero_page() -> [u64; 2] {
    static ZERO: std::sync::OnceLock<[u64; 2]> = std::sync::OnceLock::new();
    *ZERO.get_or_init(|| page(&[0u8; 4096]))
}

/// The page's XXH3 128-bit hash, as two 64-bit lanes. XXH3 (the `xxhash-rust`
/// crate) works on independent lanes with SIMD, about ten times faster than a
/// word-at-a-time multiply chain: a 4 KiB page costs a fraction of a
/// microsecond, which matters because every page installed from a memory node and
/// every logged-dirty victim is hashed once.
pub fn page(data: &[u8]) -> [u64; 2] {
    let h = xxhash_rust::xxh3::xxh3_128(data);
    [h as u64, (h >> 64) as u64]
}

/// True if the page still holds the content whose fingerprint is `installed`.
/// A page installed as zeros is checked by scanning for a non-zero word, which
/// stops at the first one: a page the guest wrote is told apart in nanoseconds.
pub fn unchanged(data: &[u8], installed: [u64; 2]) -> bool {
    if installed == zero_page() {
        is_zero(data)
    } else {
        page(data) == installed
    }
}

/// True if every byte is zero.
pub fn is_zero(data: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: any byte pattern is a valid u128; align_to only reinterprets the
        // aligned middle of the slice.
        unsafe { data.align_to::<u128>() }
    };
    head.iter().all(|&b| b == 0)
        && tail.iter().all(|&b| b == 0)
        && words
            .chunks(4)
            .all(|c| c.iter().fold(0, |a, &w| a | w) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_single_word_change_changes_the_fingerprint() {
        let base = vec![0x5au8; 4096];
        let h = page(&base);
        for i in (0..4096).step_by(8) {
            let mut d = base.clone();
            d[i] ^= 1;
            assert_ne!(page(&d), h, "word {}", i / 8);
        }
        // Swapping two words is a change too (positions are mixed in).
        let mut d = base.clone();
        d[0] = 1;
        let mut e = base.clone();
        e[8] = 1;
        assert_ne!(page(&d), page(&e));
        assert_eq!(zero_page(), page(&[0u8; 4096]));
    }

    #[test]
    fn unchanged_tells_written_pages_from_installed_ones() {
        let zero = vec![0u8; 4096];
        assert!(unchanged(&zero, zero_page()));
        for i in [0, 1, 7, 8, 2047, 4088, 4095] {
            let mut d = zero.clone();
            d[i] = 0x80;
            assert!(!is_zero(&d), "byte {i}");
            assert!(!unchanged(&d, zero_page()), "byte {i}");
            assert!(unchanged(&d, page(&d)), "byte {i}");
            let mut e = d.clone();
            e[i] = 0;
            assert!(!unchanged(&e, page(&d)), "byte {i}");
        }
        // Unaligned slices are scanned whole.
        let buf = vec![0u8; 4097];
        assert!(is_zero(&buf[1..]));
        let mut buf2 = buf.clone();
        buf2[4096] = 1;
        assert!(!is_zero(&buf2[1..]));
    }
}
