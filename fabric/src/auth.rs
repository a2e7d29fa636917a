//! Authentication of fabric connections with a cluster key.
//!
//! Every memory node and VMM of a cluster hold the same 32-byte key
//! (`--auth-key FILE`). A connection proves it both ways with a mutual
//! challenge-response over fresh nonces (HMAC-SHA-256 from RustCrypto, no
//! home-made primitives):
//!
//! 1. client -> node: `Hello`, whose `auth` field is the client's nonce `Nc`
//!    (32 random bytes);
//! 2. node -> client: `Challenge { Ns, HMAC(K, "splitvisor-node-v1" | hello | Nc | Ns) }`:
//!    the node's nonce and its proof of the key;
//! 3. the client checks that proof (a node without the key cannot make it, so
//!    no fake node can feed a VMM pages), then sends
//!    `Proof { HMAC(K, "splitvisor-client-v1" | hello | Nc | Ns) }`;
//! 4. the node checks it and answers `HelloOk`, or `Error(authentication
//!    failed)` and closes.
//!
//! `hello` is the role, protocol version and VM id the client announced, so a
//! proof is bound to them. Both nonces are fresh per connection, so a recorded
//! handshake replayed to a node fails (the node's nonce differs), and one
//! replayed to a client fails too. The two proofs have different labels, so
//! one side's proof is never valid as the other's. Comparisons are constant
//! time (`hmac`'s `verify_slice`). The key never appears in `Debug` output.
//!
//! # Per-VM isolation
//!
//! The cluster key admits a peer to the cluster; it does not say which VM the
//! peer may act for. For that every VMM also holds a per-VM secret (random per
//! run, or `vmm run --vm-secret FILE` so that a later VMM can take the VM over).
//! From it and the VM id the VMM derives an Ed25519 signing key
//! ([`Key::vm_identity`]); in every VMM handshake it sends the public key and a
//! signature over the same transcript as the proofs (hello, `Nc`, `Ns`, under
//! its own label). The node binds a VM id to the first public key that proves
//! itself and refuses every later session for that id whose key differs. The
//! node only ever sees public keys and signatures, so neither it nor anyone on
//! the network (another tenant holding the cluster key included) learns
//! anything that lets them act for the VM, and a recorded session replays as
//! badly as the cluster proof does.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::path::Path;

/// Bytes in a key, a nonce and a proof.
pub const KEY_LEN: usize = 32;
/// Bytes in a nonce.
pub const NONCE_LEN: usize = 32;
/// Bytes in a proof.
pub const PROOF_LEN: usize = 32;

/// Why a key (cluster key or per-VM secret) could not be loaded or made.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file cannot be read.
    #[error("cannot read the key file {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is neither 32 raw bytes nor 64 hex digits.
    #[error(
        "the key file {path} must hold 32 random bytes, raw or as 64 hex digits (make one with `vmm keygen FILE`, or `head -c 32 /dev/urandom > FILE`)"
    )]
    Format {
        /// The file.
        path: String,
    },
    /// The file can be read by other users.
    #[error("the key file {path} is readable by other users (mode {mode:o}); chmod 600 it")]
    Permissions {
        /// The file.
        path: String,
        /// Its mode.
        mode: u32,
    },
    /// The system's random number generator failed.
    #[error("the system random number generator failed: {0}")]
    Random(getrandom::Error),
    /// The key file cannot be written.
    #[error("cannot write the key file {path}")]
    Write {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A 32-byte secret: a cluster key, or a VMM's per-VM secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Key([u8; KEY_LEN]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

/// `n` random bytes.
pub fn random<const N: usize>() -> Result<[u8; N], KeyError> {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b).map_err(KeyError::Random)?;
    Ok(b)
}

impl Key {
    /// A fresh random key.
    pub fn generate() -> Result<Key, KeyError> {
        random().map(Key)
    }

    /// A key from its bytes (32 raw bytes, or 64 hex digits with optional
    /// surrounding whitespace).
    pub fn from_bytes(b: &[u8]) -> Option<Key> {
        if b.len() == KEY_LEN {
            return Some(Key(b.try_into().ok()?));
        }
        let text = std::str::from_utf8(b).ok()?.trim();
        if text.len() != 2 * KEY_LEN {
            return None;
        }
        let mut k = [0u8; KEY_LEN];
        for (i, byte) in k.iter_mut().enumerate() {
            *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Key(k))
    }

    /// Loads a key file, which must not be readable by group or others; `-`
    /// reads it from standard input (how `vmm` hands a started node its key,
    /// never through argv).
    pub fn load(path: &Path) -> Result<Key, KeyError> {
        let name = path.display().to_string();
        let read_err = |source| KeyError::Read {
            path: name.clone(),
            source,
        };
        let bytes = if path == Path::new("-") {
            let mut b = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin().lock().take(256), &mut b)
                .map_err(read_err)?;
            b
        } else {
            use std::os::unix::fs::PermissionsExt;
            let meta = std::fs::metadata(path).map_err(read_err)?;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(KeyError::Permissions { path: name, mode });
            }
            let mut b = Vec::new();
            std::io::Read::read_to_end(
                &mut std::fs::File::open(path).map_err(read_err)?.take(256),
                &mut b,
            )
            .map_err(read_err)?;
            b
        };
        Key::from_bytes(&bytes).ok_or(KeyError::Format { path: name })
    }

    /// The key as 64 hex digits (to write a key file or hand it to a child).
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Writes a new key file (mode 0600; an existing file is not replaced).
    pub fn write_new(&self, path: &Path) -> Result<(), KeyError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let write_err = |source| KeyError::Write {
            path: path.display().to_string(),
            source,
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(write_err)?;
        writeln!(f, "{}", self.to_hex()).map_err(write_err)
    }

    fn mac(&self, label: &[u8], hello: &[u8], nc: &[u8], ns: &[u8]) -> Hmac<Sha256> {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key");
        for part in [label, hello, nc, ns] {
            m.update(&(part.len() as u32).to_le_bytes());
            m.update(part);
        }
        m
    }

    /// The node's proof for a handshake.
    pub fn node_proof(&self, hello: &[u8], nc: &[u8], ns: &[u8]) -> [u8; PROOF_LEN] {
        self.mac(NODE_LABEL, hello, nc, ns)
            .finalize()
            .into_bytes()
            .into()
    }

    /// The client's proof for a handshake.
    pub fn client_proof(&self, hello: &[u8], nc: &[u8], ns: &[u8]) -> [u8; PROOF_LEN] {
        self.mac(CLIENT_LABEL, hello, nc, ns)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Checks a node's proof (constant time).
    pub fn verify_node(&self, hello: &[u8], nc: &[u8], ns: &[u8], proof: &[u8]) -> bool {
        self.mac(NODE_LABEL, hello, nc, ns)
            .verify_slice(proof)
            .is_ok()
    }

    /// Checks a client's proof (constant time).
    pub fn verify_client(&self, hello: &[u8], nc: &[u8], ns: &[u8], proof: &[u8]) -> bool {
        self.mac(CLIENT_LABEL, hello, nc, ns)
            .verify_slice(proof)
            .is_ok()
    }
}

/// A VM's public identity on the nodes: an Ed25519 public key.
pub type VmPublicKey = [u8; VM_KEY_LEN];
/// Bytes in a VM's public key.
pub const VM_KEY_LEN: usize = 32;
/// Bytes in a VM's handshake signature.
pub const VM_SIG_LEN: usize = 64;

/// A VMM's signing identity for one VM (see the module docs).
pub struct VmIdentity(ed25519_dalek::SigningKey);

impl std::fmt::Debug for VmIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VmIdentity({:02x?})", self.public())
    }
}

impl Key {
    /// The signing identity this per-VM secret gives VM `vm_id`: an Ed25519
    /// key whose seed is `HMAC-SHA-256(secret, label | vm_id)`, so one secret
    /// file gives each VM id its own identity.
    pub fn vm_identity(&self, vm_id: u64) -> VmIdentity {
        let seed: [u8; 32] = self
            .mac(VM_SEED_LABEL, &vm_id.to_le_bytes(), &[], &[])
            .finalize()
            .into_bytes()
            .into();
        VmIdentity(ed25519_dalek::SigningKey::from_bytes(&seed))
    }
}

impl VmIdentity {
    /// The public key a node binds the VM to.
    pub fn public(&self) -> VmPublicKey {
        self.0.verifying_key().to_bytes()
    }

    /// Signs a handshake's transcript.
    pub fn sign(&self, hello: &[u8], nc: &[u8], ns: &[u8]) -> [u8; VM_SIG_LEN] {
        use ed25519_dalek::Signer;
        self.0.sign(&vm_transcript(hello, nc, ns)).to_bytes()
    }
}

/// Checks a VM's handshake signature (strict verification: no malleable or
/// small-order keys).
pub fn verify_vm(key: &VmPublicKey, hello: &[u8], nc: &[u8], ns: &[u8], sig: &[u8]) -> bool {
    let Ok(vk) = ed25519_dalek::VerifyingKey::from_bytes(key) else {
        return false;
    };
    let Ok(sig) = ed25519_dalek::Signature::from_slice(sig) else {
        return false;
    };
    vk.verify_strict(&vm_transcript(hello, nc, ns), &sig)
        .is_ok()
}

fn vm_transcript(hello: &[u8], nc: &[u8], ns: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(64 + hello.len() + nc.len() + ns.len());
    for part in [VM_SIG_LABEL, hello, nc, ns] {
        t.extend_from_slice(&(part.len() as u32).to_le_bytes());
        t.extend_from_slice(part);
    }
    t
}

const VM_SEED_LABEL: &[u8] = b"splitvisor-vm-seed-v1";
const VM_SIG_LABEL: &[u8] = b"splitvisor-vm-v1";
const NODE_LABEL: &[u8] = b"splitvisor-node-v1";
const CLIENT_LABEL: &[u8] = b"splitvisor-client-v1";

/// What a proof is bound to besides the nonces: the hello's role, version and
/// VM id.
pub fn hello_binding(role: u8, version: u16, vm_id: u64) -> [u8; 11] {
    let mut b = [0u8; 11];
    b[0] = role;
    b[1..3].copy_from_slice(&version.to_le_bytes());
    b[3..11].copy_from_slice(&vm_id.to_le_bytes());
    b
}

use std::io::Read as _;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_bind_the_key_the_nonces_and_the_side() {
        let k = Key::generate().unwrap();
        let other = Key::generate().unwrap();
        let h = hello_binding(1, 1, 42);
        let (nc, ns) = ([1u8; 32], [2u8; 32]);
        let p = k.client_proof(&h, &nc, &ns);
        assert!(k.verify_client(&h, &nc, &ns, &p));
        assert!(!other.verify_client(&h, &nc, &ns, &p), "another key");
        assert!(
            !k.verify_client(&h, &nc, &[3u8; 32], &p),
            "another node nonce"
        );
        assert!(
            !k.verify_client(&hello_binding(1, 1, 43), &nc, &ns, &p),
            "another VM id"
        );
        assert!(
            !k.verify_node(&h, &nc, &ns, &p),
            "a client proof is no node proof"
        );
        assert!(k.verify_node(&h, &nc, &ns, &k.node_proof(&h, &nc, &ns)));
        assert_eq!(format!("{k:?}"), "Key(<redacted>)");
    }

    #[test]
    fn vm_signatures_bind_the_secret_the_vm_and_the_nonces() {
        let secret = Key::generate().unwrap();
        let id = secret.vm_identity(42);
        assert_eq!(
            id.public(),
            secret.vm_identity(42).public(),
            "deterministic"
        );
        assert_ne!(id.public(), secret.vm_identity(43).public(), "per VM id");
        assert_ne!(
            id.public(),
            Key::generate().unwrap().vm_identity(42).public(),
            "per secret"
        );
        let h = hello_binding(1, 1, 42);
        let (nc, ns) = ([1u8; 32], [2u8; 32]);
        let sig = id.sign(&h, &nc, &ns);
        assert!(verify_vm(&id.public(), &h, &nc, &ns, &sig));
        assert!(
            !verify_vm(&id.public(), &h, &nc, &[3u8; 32], &sig),
            "replayed"
        );
        assert!(
            !verify_vm(&id.public(), &hello_binding(1, 1, 7), &nc, &ns, &sig),
            "another VM id"
        );
        let other = secret.vm_identity(43);
        assert!(
            !verify_vm(&other.public(), &h, &nc, &ns, &sig),
            "another key"
        );
        assert!(!verify_vm(&[0u8; 32], &h, &nc, &ns, &sig), "a bad key");
        assert!(!format!("{id:?}").contains(&secret.to_hex()[..8]));
    }

    #[test]
    fn keys_load_raw_or_hex_and_refuse_anything_else() {
        let k = Key::generate().unwrap();
        assert_eq!(Key::from_bytes(k.to_hex().as_bytes()), Some(k.clone()));
        assert_eq!(
            Key::from_bytes(format!("{}\n", k.to_hex()).as_bytes()),
            Some(k.clone())
        );
        assert_eq!(Key::from_bytes(&k.0), Some(k.clone()));
        assert_eq!(Key::from_bytes(b"short"), None);
        assert_eq!(Key::from_bytes(&[b'z'; 64]), None);
        let dir = std::env::temp_dir().join(format!("splitvisor-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("key");
        let _ = std::fs::remove_file(&p);
        k.write_new(&p).unwrap();
        assert_eq!(Key::load(&p).unwrap(), k);
        assert!(k.write_new(&p).is_err(), "an existing key is not replaced");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(Key::load(&p), Err(KeyError::Permissions { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
