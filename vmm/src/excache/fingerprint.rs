//! A 128-bit content fingerprint of a page, used to tell a page that was only read
//! from one that was written (see [`super::evict`], "Clean pages").

/// Fingerprint of a page of zeros (what a never-written page holds).
pub fn zero_page() -> [u64; 2] {
    static ZERO: std::sync::OnceLock<[u64; 2]> = std::sync::OnceLock::new();
    *ZERO.get_or_init(|| page(&[0u8; 4096]))
}

/// Two independent multiply-rotate lanes over the page's 64-bit words.
pub fn page(data: &[u8]) -> [u64; 2] {
    let (mut a, mut b) = (0x9e37_79b9_7f4a_7c15u64, 0xc2b2_ae3d_27d4_eb4fu64);
    for (i, w) in data.chunks_exact(8).enumerate() {
        let w = u64::from_le_bytes(w.try_into().expect("8-byte chunk")) ^ i as u64;
        a = (a ^ w).wrapping_mul(0xff51_afd7_ed55_8ccd).rotate_left(31);
        b = b
            .wrapping_add(w)
            .wrapping_mul(0xc4ce_b9fe_1a85_ec53)
            .rotate_left(29)
            ^ (b >> 17);
    }
    [a ^ (a >> 33), b ^ (b >> 31)]
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
}
