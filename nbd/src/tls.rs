//! TLS for NBD (`NBD_OPT_STARTTLS`), with rustls, for both ends.
//!
//! NBD upgrades a connection in the middle of its handshake: the client sends
//! `NBD_OPT_STARTTLS`, the server acknowledges it in plaintext, and from the next
//! byte on both run TLS; the rest of the option haggling and the whole
//! transmission phase are encrypted. (doc/proto.md of the NBD project, "TLS
//! support".)
//!
//! Here the two ends' configurations are loaded from PEM files
//! ([`ServerTls::load`], [`ClientTls::load`]), [`handshake`] runs the TLS handshake
//! on the TCP connection, and a [`Relay`] then carries the connection: two threads
//! that decrypt what arrives on TCP into one end of a Unix socket pair and encrypt
//! what is written to it onto TCP. The NBD code keeps the other end as its
//! [`Stream`], so the handshake's remaining options, the server's request loop and
//! the client's reader and writers work on TLS exactly as on plain TCP, with
//! blocking reads, clones and `shutdown`. The cost is one extra copy through the
//! socket pair per direction, next to the encryption itself.
//!
//! Only TLS 1.2 and 1.3 with rustls's safe defaults (ring's primitives) are
//! offered. Keys are read from files only and are never logged.

use crate::stream::Stream;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Why a TLS configuration could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("cannot read the {what} from {}", path.display())]
    Pem {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: pem::Error,
    },
    /// A PEM file holds none of what it should.
    #[error("{} holds no {what} (expected PEM)", path.display())]
    Empty {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// rustls refused a certificate, a key or their combination.
    #[error("{what}")]
    Rustls {
        /// What was being set up.
        what: String,
        /// Why.
        #[source]
        source: rustls::Error,
    },
    /// The client-certificate verifier could not be built from the CA file.
    #[error("cannot verify client certificates with the CAs of {}", path.display())]
    Verifier {
        /// The CA file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    /// The name to check the server's certificate against is not a DNS name or
    /// an IP address.
    #[error("{0:?} is not a server name a certificate can be checked against")]
    ServerName(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |source| TlsError::Pem {
        what,
        path: path.into(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem)?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.into(),
        });
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| match source {
        pem::Error::NoItemsFound => TlsError::Empty {
            what: "private key",
            path: path.into(),
        },
        source => TlsError::Pem {
            what: "private key",
            path: path.into(),
            source,
        },
    })
}

fn roots(path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs("CA certificates", path)? {
        roots.add(c).map_err(|source| TlsError::Rustls {
            what: format!("a CA certificate in {} is not usable", path.display()),
            source,
        })?;
    }
    Ok(roots)
}

fn rustls_err(what: &str) -> impl FnOnce(rustls::Error) -> TlsError + '_ {
    move |source| TlsError::Rustls {
        what: what.into(),
        source,
    }
}

/// rustls refused `key_file`'s key for `cert`'s certificate.
fn key_mismatch<'a>(
    cert: &'a Path,
    key_file: &'a Path,
) -> impl FnOnce(rustls::Error) -> TlsError + 'a {
    move |source| TlsError::Rustls {
        what: format!(
            "the key in {} does not go with the certificate in {}",
            key_file.display(),
            cert.display()
        ),
        source,
    }
}

/// A server's TLS settings: its certificate chain and key, and optionally the CAs
/// whose client certificates it requires.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<rustls::ServerConfig>,
    verifies_clients: bool,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("verifies_clients", &self.verifies_clients)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Loads the certificate chain (`cert`, PEM, the server's first) and its
    /// private key (`key`, PEM: PKCS#8, PKCS#1 or SEC1). With `client_ca`, clients
    /// must present a certificate issued by one of its CAs.
    pub fn load(cert: &Path, key_file: &Path, client_ca: Option<&Path>) -> Result<Self, TlsError> {
        let chain = certs("certificate", cert)?;
        let key = key(key_file)?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(rustls_err("no TLS protocol version available"))?;
        let builder = match client_ca {
            Some(ca) => {
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots(ca)?),
                    provider(),
                )
                .build()
                .map_err(|source| TlsError::Verifier {
                    path: ca.into(),
                    source,
                })?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder
            .with_single_cert(chain, key)
            .map_err(key_mismatch(cert, key_file))?;
        Ok(ServerTls {
            config: Arc::new(config),
            verifies_clients: client_ca.is_some(),
        })
    }

    /// Whether clients must present a certificate.
    pub fn verifies_clients(&self) -> bool {
        self.verifies_clients
    }

    /// A new server-side TLS session.
    pub fn session(&self) -> rustls::Connection {
        // Creating a server session fails only for configurations `load` refuses.
        rustls::ServerConnection::new(self.config.clone())
            .expect("a loaded server configuration makes sessions")
            .into()
    }
}

/// A client's TLS settings: the CAs it trusts for the server's certificate, an
/// optional certificate of its own, and the name the server's certificate must
/// carry (default: the host it connects to).
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
    /// The name checked against the server's certificate, instead of the host
    /// part of the address connected to.
    pub server_name: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Trusts the CAs in `ca` (PEM); `identity` is a certificate chain and key
    /// (PEM files) to present when the server asks for one.
    pub fn load(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<Self, TlsError> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(rustls_err("no TLS protocol version available"))?
            .with_root_certificates(roots(ca)?);
        let config = match identity {
            Some((cert, key_file)) => builder
                .with_client_auth_cert(certs("certificate", cert)?, key(key_file)?)
                .map_err(key_mismatch(cert, key_file))?,
            None => builder.with_no_client_auth(),
        };
        Ok(ClientTls {
            config: Arc::new(config),
            server_name: None,
        })
    }

    /// A new client-side TLS session for the server at `addr` (`HOST:PORT`).
    pub fn session(&self, addr: &str) -> Result<rustls::Connection, TlsError> {
        let name = match &self.server_name {
            Some(n) => n.clone(),
            None => host_of(addr).to_string(),
        };
        let server = ServerName::try_from(name.clone()).map_err(|_| TlsError::ServerName(name))?;
        let conn = rustls::ClientConnection::new(self.config.clone(), server)
            .map_err(rustls_err("cannot start a TLS session"))?;
        Ok(conn.into())
    }
}

/// The host part of `HOST:PORT` (`[v6]:PORT` too).
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// Runs the TLS handshake of `conn` over `tcp` (whose timeouts bound it). A
/// refused certificate or a peer that is not speaking TLS is an `InvalidData`
/// error carrying rustls's reason.
pub fn handshake(conn: &mut rustls::Connection, tcp: &mut TcpStream) -> io::Result<()> {
    while conn.is_handshaking() {
        conn.complete_io(tcp)?;
    }
    while conn.wants_write() {
        conn.write_tls(tcp)?;
    }
    Ok(())
}

/// What a relay's two threads share.
struct Shared {
    conn: Mutex<rustls::Connection>,
    /// Held while TLS records go out, taken with `conn` held so that records leave
    /// in the order rustls made them.
    tcp_out: Mutex<TcpStream>,
}

/// Two threads carrying an established TLS session between its TCP connection
/// and the plaintext end of a Unix socket pair.
///
/// Dropping the relay ends the session gracefully: what the NBD code wrote is
/// still encrypted and sent, then `close_notify`, then the TCP connection is
/// closed and both threads are joined. The send is bounded by the TCP
/// connection's write timeout (30 s if none was set).
pub struct Relay {
    tcp: TcpStream,
    inner_end: UnixStream,
    inbound: Option<JoinHandle<()>>,
    outbound: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").field("tcp", &self.tcp).finish()
    }
}

/// The bound on sending at close when the TCP connection has none.
const CLOSE_SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl Relay {
    /// Starts relaying `conn` (handshake done) over `tcp`; returns the relay and
    /// the plaintext stream for the NBD code. `tcp`'s read timeout is cleared:
    /// the owner bounds its reads on the returned stream instead.
    pub fn start(conn: rustls::Connection, tcp: TcpStream) -> io::Result<(Relay, Stream)> {
        let (outer, inner) = UnixStream::pair()?;
        tcp.set_read_timeout(None)?;
        if tcp.write_timeout()?.is_none() {
            tcp.set_write_timeout(Some(CLOSE_SEND_TIMEOUT))?;
        }
        let shared = Arc::new(Shared {
            conn: Mutex::new(conn),
            tcp_out: Mutex::new(tcp.try_clone()?),
        });
        let mut relay = Relay {
            tcp: tcp.try_clone()?,
            inner_end: inner.try_clone()?,
            inbound: None,
            outbound: None,
        };
        let (s, t, u) = (shared.clone(), tcp.try_clone()?, inner.try_clone()?);
        relay.inbound = Some(
            std::thread::Builder::new()
                .name("tls-in".into())
                .spawn(move || inbound(&s, t, u))?,
        );
        relay.outbound = Some(
            std::thread::Builder::new()
                .name("tls-out".into())
                .spawn(move || outbound(&shared, tcp, inner))?,
        );
        Ok((relay, Stream::Tls(outer)))
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // The outbound thread sends what is queued, then sees the end.
        let _ = self.inner_end.shutdown(Shutdown::Read);
        if let Some(t) = self.outbound.take() {
            let _ = t.join();
        }
        let _ = self.tcp.shutdown(Shutdown::Both);
        let _ = self.inner_end.shutdown(Shutdown::Both);
        if let Some(t) = self.inbound.take() {
            let _ = t.join();
        }
    }
}

/// Sends the records `conn` has ready, in order; called with `conn` locked.
fn send_records(
    shared: &Shared,
    conn: std::sync::MutexGuard<'_, rustls::Connection>,
) -> io::Result<()> {
    let mut conn = conn;
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out)?;
    }
    if out.is_empty() {
        return Ok(());
    }
    let mut tcp = shared.tcp_out.lock().unwrap();
    drop(conn);
    tcp.write_all(&out)
}

/// TCP to plaintext: decrypts and passes on until the peer closes, breaks TLS or
/// the connection fails; then ends the plaintext side's input.
fn inbound(shared: &Shared, mut tcp: TcpStream, mut plain: UnixStream) {
    let mut buf = vec![0u8; 64 << 10];
    let mut clear = Vec::new();
    // Application data that arrived with the end of the handshake.
    let mut closed = drain(shared, &mut clear);
    loop {
        if !clear.is_empty() && plain.write_all(&clear).is_err() {
            break;
        }
        clear.clear();
        if closed {
            break;
        }
        let n = match tcp.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::debug!("TLS relay: connection failed: {e}");
                break;
            }
        };
        let mut conn = shared.conn.lock().unwrap();
        let mut rd = &buf[..n];
        let mut failed = None;
        while !rd.is_empty() && failed.is_none() {
            if let Err(e) = conn.read_tls(&mut rd) {
                failed = Some(e.to_string());
                break;
            }
            match conn.process_new_packets() {
                Ok(state) => {
                    closed |= state.peer_has_closed();
                    let _ = conn.reader().read_to_end(&mut clear);
                }
                Err(e) => failed = Some(e.to_string()),
            }
        }
        // Alerts, key updates: whatever rustls has to say goes out now.
        let sent = send_records(shared, conn);
        if let Some(e) = failed {
            log::debug!("TLS relay: the peer broke TLS: {e}");
            let _ = tcp.shutdown(Shutdown::Both);
            let _ = plain.write_all(&clear);
            break;
        }
        if sent.is_err() {
            closed = true;
        }
    }
    let _ = plain.shutdown(Shutdown::Write);
}

/// Plaintext the session already holds; `true` if the peer has closed.
fn drain(shared: &Shared, clear: &mut Vec<u8>) -> bool {
    let mut conn = shared.conn.lock().unwrap();
    let closed = conn
        .process_new_packets()
        .map_or(true, |s| s.peer_has_closed());
    let _ = conn.reader().read_to_end(clear);
    closed
}

/// Plaintext to TCP: encrypts what the NBD code writes until it closes its end,
/// then says goodbye (`close_notify`) and ends the TCP connection's output.
fn outbound(shared: &Shared, tcp: TcpStream, mut plain: UnixStream) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match plain.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let mut conn = shared.conn.lock().unwrap();
        if conn.writer().write_all(&buf[..n]).is_err() || send_records(shared, conn).is_err() {
            // The connection is gone: the NBD code sees its writes fail.
            let _ = plain.shutdown(Shutdown::Both);
            let _ = tcp.shutdown(Shutdown::Both);
            return;
        }
    }
    let mut conn = shared.conn.lock().unwrap();
    conn.send_close_notify();
    let _ = send_records(shared, conn);
    let _ = tcp.shutdown(Shutdown::Write);
}

#[cfg(test)]
mod tests;
