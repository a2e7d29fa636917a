//! The storage node's network service: accepts connections, runs the NBD handshake
//! (module `handshake`) and then the transmission phase (module `conn`) of each on
//! its own thread, with blocking I/O done by a node-wide worker pool (module `pool`).
//!
//! A peer that breaks the protocol (bad magic, garbage, an implausible option) is
//! disconnected; a request that is merely wrong (out of range, too large, a write
//! to a read-only export) gets an error reply and the connection goes on. Either
//! way the node and its other connections are unaffected, and the log lines a peer
//! can trigger are rate-limited.

pub(crate) mod conn;
#[doc(hidden)]
pub mod fuzzing;
pub(crate) mod handshake;
pub(crate) mod pool;

use crate::volume::VolumeDir;
use conn::ConnLimits;
use fabric::acceptor::Acceptor;
pub use fabric::acceptor::ShutdownHandle;
use fabric::ratelimit::RateLimiter;
use fabric::warn_limited;
use handshake::Negotiated;
use pool::Pool;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Warnings a peer can trigger.
pub(crate) static PEER_ERRORS: RateLimiter = RateLimiter::new(10);
/// Warnings about failing volume I/O.
pub(crate) static IO_ERRORS: RateLimiter = RateLimiter::new(10);
/// Informational lines about connections.
static CONN_LOG: RateLimiter = RateLimiter::new(20);

/// How long connections get to finish their requests at shutdown before they are
/// closed hard.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Server failures.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The worker threads could not be started.
    #[error("cannot start the I/O threads")]
    Threads(#[source] std::io::Error),
}

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: String,
    /// Worker threads for blocking I/O, shared by all connections.
    pub io_threads: usize,
    /// Most connections at once; more are closed at once.
    pub max_connections: usize,
    /// How long a new connection may take to finish the handshake.
    pub handshake_timeout: Duration,
    /// How long sending may block (a client that stopped reading) before the
    /// connection is closed.
    pub send_timeout: Duration,
    /// Serve cached reads and small writes on the connection's thread (the fast
    /// path); `false` sends every request through the worker pool.
    pub inline_io: bool,
    /// Requests of one connection queued for or running in the pool at once.
    pub max_in_flight: usize,
    /// TLS: when set, clients must upgrade with `NBD_OPT_STARTTLS` before any
    /// other option.
    pub tls: Option<nbd_proto::tls::ServerTls>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:7100".into(),
            io_threads: 8,
            max_connections: 1024,
            handshake_timeout: Duration::from_secs(10),
            send_timeout: Duration::from_secs(30),
            inline_io: true,
            max_in_flight: 256,
            tls: None,
        }
    }
}

/// Node-wide counters.
#[derive(Debug, Default)]
pub struct NodeStats {
    /// Connections that reached transmission.
    pub sessions: AtomicU64,
    /// Requests received.
    pub requests: AtomicU64,
    /// Requests served on the fast path.
    pub fast_path: AtomicU64,
    /// Bytes read from volumes.
    pub read_bytes: AtomicU64,
    /// Bytes written to volumes.
    pub written_bytes: AtomicU64,
    /// Flush requests.
    pub flushes: AtomicU64,
    /// Requests answered with an error.
    pub errors: AtomicU64,
    /// Connections closed for breaking the protocol.
    pub protocol_errors: AtomicU64,
}

/// A bound storage node.
pub struct Server {
    acceptor: Acceptor,
    volumes: Arc<VolumeDir>,
    stats: Arc<NodeStats>,
    pool: Arc<Pool>,
    config: ServerConfig,
}

impl Server {
    /// Binds the listen address and starts the worker pool.
    pub fn bind(config: ServerConfig, volumes: VolumeDir) -> Result<Self, ServerError> {
        // A shutdown closes the read side only: each connection's request loop
        // ends at its next `recv`, and the replies still due are sent first.
        let acceptor = Acceptor::bind(&config.listen, config.max_connections, Shutdown::Read)
            .map_err(|source| ServerError::Bind {
                addr: config.listen.clone(),
                source,
            })?;
        let pool = Pool::start(config.io_threads).map_err(ServerError::Threads)?;
        Ok(Server {
            acceptor,
            volumes: Arc::new(volumes),
            stats: Arc::new(NodeStats::default()),
            pool: Arc::new(pool),
            config,
        })
    }

    /// The bound address (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.acceptor.local_addr()
    }

    /// The volumes served.
    pub fn volumes(&self) -> &Arc<VolumeDir> {
        &self.volumes
    }

    /// The node's counters.
    pub fn stats(&self) -> &Arc<NodeStats> {
        &self.stats
    }

    /// The open connections and the count of accepted ones.
    pub fn connections(&self) -> Arc<fabric::acceptor::Connections> {
        self.acceptor.connections().clone()
    }

    /// Connections accepted since start (refused ones included).
    pub fn accepted(&self) -> u64 {
        self.acceptor.connections().accepted()
    }

    /// A handle that stops the server: no new connections; each open one ends
    /// once its outstanding requests are answered, and [`Server::run`] returns.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.acceptor.shutdown_handle()
    }

    /// Accepts and serves connections until shut down; returns once every
    /// connection has ended, the workers have stopped and the volumes are synced.
    pub fn run(&self) {
        let ctx = ConnContext {
            volumes: self.volumes.clone(),
            stats: self.stats.clone(),
            pool: self.pool.clone(),
            config: self.config.clone(),
        };
        let threads = self.acceptor.run(
            move |stream, peer| ctx.clone().serve(stream, peer),
            |_, peer| {
                warn_limited!(
                    PEER_ERRORS,
                    "{peer}: refused, {} connections open",
                    self.config.max_connections
                );
            },
        );
        let stuck = self.acceptor.finish(threads, Some(SHUTDOWN_GRACE));
        if stuck > 0 {
            log::warn!("closed {stuck} connections that did not finish in {SHUTDOWN_GRACE:?}");
        }
        self.pool.stop();
        let synced = self.volumes.sync_all();
        log::debug!("synced {synced} volumes");
    }
}

#[derive(Clone)]
struct ConnContext {
    volumes: Arc<VolumeDir>,
    stats: Arc<NodeStats>,
    pool: Arc<Pool>,
    config: ServerConfig,
}

impl ConnContext {
    fn serve(self, stream: TcpStream, peer: SocketAddr) {
        log::debug!("{peer}: connected");
        let _ = stream.set_nodelay(true);
        let _ = stream.set_write_timeout(Some(self.config.send_timeout));
        let deadline = Instant::now() + self.config.handshake_timeout;
        let tls = self.config.tls.as_ref();
        let (volume, conn_stream, relay) =
            match handshake::negotiate(&stream, &self.volumes, deadline, tls) {
                Ok(Negotiated::Go {
                    volume,
                    stream,
                    relay,
                }) => (volume, stream, relay),
                Ok(Negotiated::Closed) => {
                    log::debug!("{peer}: left during the handshake");
                    return;
                }
                Err(e) if e.is_disconnect() => {
                    log::debug!("{peer}: {}", fabric::client::error_chain(&e));
                    return;
                }
                Err(e) => {
                    self.stats.protocol_errors.fetch_add(1, Relaxed);
                    warn_limited!(
                        PEER_ERRORS,
                        "{peer}: {}; closing the connection",
                        fabric::client::error_chain(&e)
                    );
                    let _ = stream.shutdown(Shutdown::Both);
                    return;
                }
            };
        if conn_stream.set_read_timeout(None).is_err() {
            return;
        }
        self.stats.sessions.fetch_add(1, Relaxed);
        if let Some(suppressed) = CONN_LOG.check() {
            log::info!(
                "{peer}: serving {:?} ({} bytes{}{}){}",
                volume.name(),
                volume.size(),
                if volume.read_only() {
                    ", read-only"
                } else {
                    ""
                },
                if relay.is_some() { ", TLS" } else { "" },
                if suppressed > 0 {
                    format!(" ({suppressed} similar messages suppressed)")
                } else {
                    String::new()
                }
            );
        }
        let limits = ConnLimits {
            inline_io: self.config.inline_io,
            max_jobs: self.config.max_in_flight.max(1),
            max_job_bytes: 64 << 20,
        };
        let served = conn::serve(
            conn_stream,
            peer,
            volume,
            self.stats.clone(),
            &self.pool,
            limits,
        );
        if let Err(e) = served {
            log::warn!("{peer}: {e}");
        }
        // The relay sends what is left, says goodbye and joins its threads.
        drop(relay);
    }
}
