//! End-to-end page integrity and confidentiality: the VMM trusts no memory
//! node.
//!
//! For every page it writes out, the cache keeps a *version* (how many times
//! the page was written out) and a 16-byte *seal* of exactly what the node was
//! sent, in its own memory (20 bytes per 4 KiB guest page, 0.5%). Every page
//! fetched back is checked against them before the guest sees it, so a page a
//! node returns altered, stale (an older version), swapped with another page,
//! or lost (reported never written) is caught; the fetch fails with
//! [`SealError`] naming the page, and the VM stops on it (no silent
//! corruption).
//!
//! - Integrity only (default): the seal is BLAKE3 of (page number, version,
//!   bytes), truncated to 128 bits; the data goes out as is. The digest needs no
//!   key: it never leaves the VMM.
//! - `--encrypt-pages`: pages go out sealed with AES-256-GCM (RustCrypto) under a
//!   per-VM key made at start that never leaves the VMM, with the nonce (page
//!   number, version): the version grows with every write-out of the page, so a
//!   nonce is never used twice for two different contents. Nodes store and serve
//!   ciphertext only; the GCM tag is the seal.
//!
//! Who may touch a page's version and seal: whoever owns the page's remote copy
//! (the evictor of an `EVICTING` page writes it out and records the new seal
//! once the node acknowledged it; a fault handler holding the page `FETCHING`
//! checks it). Moving a page between nodes moves its bytes unchanged, so its
//! seal stays valid.

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::*};

/// Bytes in a page.
const PAGE: usize = 4096;

/// Why a fetched page was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The node's bytes do not match what was written out.
    #[error(
        "page {page}: the memory node returned data that is not what was written (altered, stale or another page's)"
    )]
    Mismatch {
        /// The page.
        page: u64,
    },
    /// The node reported a page it was given as never written.
    #[error("page {page}: the memory node lost it (it says the page was never written)")]
    Lost {
        /// The page.
        page: u64,
    },
    /// A page was written out more than 2^32 - 1 times (its nonces would repeat).
    #[error("page {page} was written out 2^32 - 1 times; its encryption nonces are used up")]
    Exhausted {
        /// The page.
        page: u64,
    },
}

/// A page's new version and seal, recorded once the node acknowledged it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sealed {
    version: u32,
    seal: [u8; 16],
}

enum Mode {
    /// No check at all: only for measuring what the check costs
    /// ([`NO_INTEGRITY_ENV`]).
    Off,
    Digest,
    Aead(Box<Aes256Gcm>),
}

/// Measurement hook: `SPLITVISOR_BENCH_NO_INTEGRITY=1` turns the integrity check
/// off (without `--encrypt-pages`), so the benchmark can show what it costs.
/// Never set it otherwise: pages are then taken from nodes unchecked.
pub const NO_INTEGRITY_ENV: &str = "SPLITVISOR_BENCH_NO_INTEGRITY";

/// The versions and seals of a guest's pages.
pub struct Seals {
    mode: Mode,
    version: Box<[AtomicU32]>,
    seal: Box<[[AtomicU64; 2]]>,
    /// Fetched pages refused.
    pub refused: AtomicU64,
    /// Fetched pages checked (and decrypted), and the time that took in all
    /// (ns): what the check adds to the fault path, measured where it runs.
    pub checks: AtomicU64,
    /// See `checks`.
    pub check_ns: AtomicU64,
}

impl std::fmt::Debug for Seals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Seals")
            .field("encrypt", &self.encrypts())
            .field("pages", &self.version.len())
            .finish()
    }
}

fn nonce(gpn: u64, version: u32) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&gpn.to_le_bytes());
    n[8..].copy_from_slice(&version.to_le_bytes());
    n
}

fn digest(gpn: u64, version: u32, data: &[u8]) -> [u8; 16] {
    let mut h = blake3::Hasher::new();
    // The page first, so that it starts on a chunk boundary and its four 1 KiB
    // chunks are hashed side by side (SIMD); the page number and version after.
    h.update(data);
    h.update(&gpn.to_le_bytes());
    h.update(&version.to_le_bytes());
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize().as_bytes()[..16]);
    out
}

impl Seals {
    /// Seals for `pages` pages; with `encrypt`, under a fresh random key.
    pub fn new(pages: usize, encrypt: bool) -> Result<Self, fabric::auth::KeyError> {
        let mode = if encrypt {
            let key: [u8; 32] = fabric::auth::random()?;
            Mode::Aead(Box::new(Aes256Gcm::new(&key.into())))
        } else if std::env::var(NO_INTEGRITY_ENV).is_ok_and(|v| v == "1") {
            log::warn!("{NO_INTEGRITY_ENV}=1: pages fetched from memory nodes are NOT checked");
            Mode::Off
        } else {
            Mode::Digest
        };
        Ok(Seals {
            mode,
            version: (0..pages).map(|_| AtomicU32::new(0)).collect(),
            seal: (0..pages)
                .map(|_| [AtomicU64::new(0), AtomicU64::new(0)])
                .collect(),
            refused: AtomicU64::new(0),
            checks: AtomicU64::new(0),
            check_ns: AtomicU64::new(0),
        })
    }

    /// True if pages go out encrypted.
    pub fn encrypts(&self) -> bool {
        matches!(self.mode, Mode::Aead(_))
    }

    /// Seals page `p`'s `data` for its next write-out. With encryption, `data`
    /// is encrypted in place (send it, not the guest's page); without, it is left
    /// as is. Record the result with [`Seals::commit`] once a node acknowledged
    /// the write.
    pub fn seal(&self, p: usize, data: &mut [u8]) -> Result<Sealed, SealError> {
        let version = self.version[p]
            .load(Acquire)
            .checked_add(1)
            .ok_or(SealError::Exhausted { page: p as u64 })?;
        let seal = match &self.mode {
            Mode::Off => [0; 16],
            Mode::Digest => digest(p as u64, version, data),
            Mode::Aead(c) => {
                let n = nonce(p as u64, version);
                let tag = c
                    .encrypt_in_place_detached(Nonce::from_slice(&n), b"", data)
                    .expect("a page is far below AES-GCM's length limit");
                tag.into()
            }
        };
        Ok(Sealed { version, seal })
    }

    /// Seals page `p` as it is in `data` without changing it (integrity only:
    /// the write-out may send the guest's page itself).
    pub fn seal_plain(&self, p: usize, data: &[u8]) -> Result<Sealed, SealError> {
        debug_assert!(!self.encrypts());
        let version = self.version[p]
            .load(Acquire)
            .checked_add(1)
            .ok_or(SealError::Exhausted { page: p as u64 })?;
        let seal = match self.mode {
            Mode::Off => [0; 16],
            _ => digest(p as u64, version, data),
        };
        Ok(Sealed { version, seal })
    }

    /// Records page `p`'s new version and seal (a node acknowledged it).
    pub fn commit(&self, p: usize, s: Sealed) {
        self.seal[p][0].store(u64::from_le_bytes(s.seal[..8].try_into().unwrap()), Relaxed);
        self.seal[p][1].store(u64::from_le_bytes(s.seal[8..].try_into().unwrap()), Relaxed);
        self.version[p].store(s.version, Release);
    }

    /// Checks page `p` as a node returned it (`present`: the node had data; else
    /// `data` is zeros) and, with encryption, decrypts it in place. A page never
    /// written out must come back absent.
    pub fn open(&self, p: usize, present: bool, data: &mut [u8]) -> Result<(), SealError> {
        let page = p as u64;
        if let Mode::Off = self.mode {
            return Ok(());
        }
        let version = self.version[p].load(Acquire);
        let refuse = |e| {
            self.refused.fetch_add(1, Relaxed);
            Err(e)
        };
        if version == 0 {
            return if present {
                refuse(SealError::Mismatch { page })
            } else {
                Ok(())
            };
        }
        // A node stores no all-zero page (writing one frees its slot): an
        // absent page is checked as zeros, and if that is not what was written,
        // the node lost it.
        if !present {
            data.fill(0);
        }
        let started = std::time::Instant::now();
        let mut want = [0u8; 16];
        want[..8].copy_from_slice(&self.seal[p][0].load(Relaxed).to_le_bytes());
        want[8..].copy_from_slice(&self.seal[p][1].load(Relaxed).to_le_bytes());
        let ok = match &self.mode {
            Mode::Off => true,
            Mode::Digest => digest(page, version, data) == want,
            Mode::Aead(c) => c
                .decrypt_in_place_detached(
                    Nonce::from_slice(&nonce(page, version)),
                    b"",
                    data,
                    Tag::from_slice(&want),
                )
                .is_ok(),
        };
        self.checks.fetch_add(1, Relaxed);
        self.check_ns
            .fetch_add(started.elapsed().as_nanos() as u64, Relaxed);
        match (ok, present) {
            (true, _) => Ok(()),
            (false, true) => refuse(SealError::Mismatch { page }),
            (false, false) => refuse(SealError::Lost { page }),
        }
    }
}

const _: () = assert!(PAGE == 4096);

#[cfg(test)]
mod tests {
    use super::*;

    fn page(fill: u8) -> Vec<u8> {
        (0..PAGE).map(|i| fill ^ (i as u8)).collect()
    }

    #[test]
    fn tampering_staleness_swaps_and_losses_are_caught_in_both_modes() {
        for encrypt in [false, true] {
            let s = Seals::new(4, encrypt).unwrap();
            // Never written: only an absent page is accepted.
            let mut z = vec![0u8; PAGE];
            assert!(s.open(0, false, &mut z).is_ok());
            assert!(s.open(0, true, &mut page(1)).is_err());
            // Version 1 of page 0, and of page 1.
            let mut v1 = page(1);
            let sealed = s.seal(0, &mut v1).unwrap();
            assert_eq!(
                v1 != page(1),
                encrypt,
                "stored bytes are ciphertext iff encrypting"
            );
            s.commit(0, sealed);
            let mut other = page(9);
            s.commit(1, s.seal(1, &mut other).unwrap());
            let mut back = v1.clone();
            s.open(0, true, &mut back).unwrap();
            assert_eq!(back, page(1));
            // Version 2 of page 0.
            let mut v2 = page(2);
            s.commit(0, s.seal(0, &mut v2).unwrap());
            // Stale: version 1 served again.
            assert_eq!(
                s.open(0, true, &mut v1.clone()),
                Err(SealError::Mismatch { page: 0 })
            );
            // Swapped: page 1's bytes for page 0.
            assert!(s.open(0, true, &mut other.clone()).is_err());
            // Altered: one bit flipped.
            let mut flipped = v2.clone();
            flipped[100] ^= 1;
            assert!(s.open(0, true, &mut flipped).is_err());
            // Lost.
            assert_eq!(s.open(0, false, &mut z), Err(SealError::Lost { page: 0 }));
            // The real thing.
            s.open(0, true, &mut v2).unwrap();
            assert_eq!(v2, page(2));
            assert_eq!(s.refused.load(Relaxed), 5);
            // A page written as zeros: a node stores none and reports it
            // absent, which is right in integrity mode (in encrypt mode its
            // ciphertext is not zeros, and absent means lost).
            let mut zeros = vec![0u8; PAGE];
            s.commit(2, s.seal(2, &mut zeros).unwrap());
            let mut got = vec![0xffu8; PAGE];
            assert_eq!(s.open(2, false, &mut got).is_ok(), !encrypt);
            if !encrypt {
                assert_eq!(got, vec![0u8; PAGE]);
            }
        }
    }
}
