//! Certificates for TLS tests, made fresh by each test with rcgen: a CA, a server
//! certificate for `localhost` and `127.0.0.1`, a client certificate, and a second
//! CA that issued neither (for "wrong CA" cases).
//!
//! The files carry the names QEMU's `tls-creds-x509` object looks for in its
//! `dir=` (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`, `client-cert.pem`,
//! `client-key.pem`), so one directory serves `storagenode`, `vmm`, `qemu-io`,
//! `qemu-img` and `qemu-nbd` alike.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use std::path::{Path, PathBuf};

/// A directory of PEM files; removed when dropped.
pub struct TlsFiles {
    /// The directory (QEMU's `tls-creds-x509,dir=`).
    pub dir: PathBuf,
    /// A second directory holding only `ca-cert.pem` of another CA.
    pub other_ca_dir: PathBuf,
}

impl TlsFiles {
    /// Makes a CA, a server and a client certificate in a fresh directory named by
    /// `tag` and this process.
    pub fn new(tag: &str) -> TlsFiles {
        let dir = std::env::temp_dir().join(format!("splitvisor-tls-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let other_ca_dir = dir.join("other");
        std::fs::create_dir_all(&other_ca_dir).unwrap();
        let (ca, ca_key) = make_ca("Splitvisor test CA");
        std::fs::write(dir.join("ca-cert.pem"), ca.pem()).unwrap();
        let leaf = |name: &str, purpose: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().unwrap();
            let mut p =
                CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                    .unwrap();
            p.distinguished_name.push(DnType::CommonName, name);
            p.extended_key_usages = vec![purpose];
            let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (cert, key) = leaf("storagenode", ExtendedKeyUsagePurpose::ServerAuth);
        std::fs::write(dir.join("server-cert.pem"), cert).unwrap();
        write_key(&dir.join("server-key.pem"), &key);
        let (cert, key) = leaf("vmm", ExtendedKeyUsagePurpose::ClientAuth);
        std::fs::write(dir.join("client-cert.pem"), cert).unwrap();
        write_key(&dir.join("client-key.pem"), &key);
        let (other, _) = make_ca("Some other CA");
        std::fs::write(other_ca_dir.join("ca-cert.pem"), other.pem()).unwrap();
        TlsFiles { dir, other_ca_dir }
    }

    /// The CA certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca-cert.pem")
    }
    /// The server's certificate.
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server-cert.pem")
    }
    /// The server's key.
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server-key.pem")
    }
    /// The client's certificate.
    pub fn client_cert(&self) -> PathBuf {
        self.dir.join("client-cert.pem")
    }
    /// The client's key.
    pub fn client_key(&self) -> PathBuf {
        self.dir.join("client-key.pem")
    }
    /// The other CA's certificate (issued none of the above).
    pub fn other_ca(&self) -> PathBuf {
        self.other_ca_dir.join("ca-cert.pem")
    }
}

impl Drop for TlsFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn make_ca(name: &str) -> (rcgen::Certificate, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = p.self_signed(&key).unwrap();
    (cert, key)
}

/// Keys are written mode 0600, as a user would keep them.
fn write_key(path: &Path, pem: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(pem.as_bytes()).unwrap();
}
