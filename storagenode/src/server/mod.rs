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
pub(crate) mod handshake;
pub(crate) mod pool;

use crate::volume::VolumeDir;
use conn::ConnLimits;
use fabric::ratelimit::RateLimiter;
use fabric::warn_limited;
use handshake::Negotiated;
use pool::Pool;
use std::collections::HashMap;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
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
        }
    }
}

/// Node-wide counters.
#[derive(Debug, Default)]
pub struct NodeStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
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

#[derive(Default)]
struct NodeState {
    shutting_down: AtomicBool,
    conns: Mutex<HashMap<u64, TcpStream>>,
    next_conn: AtomicU64,
}

/// A bound storage node.
pub struct Server {
    listener: TcpListener,
    volumes: Arc<VolumeDir>,
    state: Arc<NodeState>,
    stats: Arc<NodeStats>,
    pool: Arc<Pool>,
    config: ServerConfig,
}

/// Stops a running server from another thread (the signal thread, a test).
#[derive(Clone)]
pub struct ShutdownHandle {
    state: Arc<NodeState>,
    listener_fd: i32,
}

impl ShutdownHandle {
    /// Stops accepting and ends every connection once its outstanding requests are
    /// answered; [`Server::run`] then returns.
    pub fn shutdown(&self) {
        if self.state.shutting_down.swap(true, Relaxed) {
            return;
        }
        // SAFETY: shutdown(2) on the listener's fd, which `Server` keeps open until
        // it is dropped; on Linux it makes the blocked accept(2) return.
        unsafe {
            libc::shutdown(self.listener_fd, libc::SHUT_RDWR);
        }
        // Closing the read side ends each request loop at its next `recv`; the
        // replies still due are sent before the connection closes.
        for s in self.state.conns.lock().unwrap().values() {
            let _ = s.shutdown(Shutdown::Read);
        }
    }
}

impl Server {
    /// Binds the listen address and starts the worker pool.
    pub fn bind(config: ServerConfig, volumes: VolumeDir) -> Result<Self, ServerError> {
        let listener = TcpListener::bind(&config.listen).map_err(|source| ServerError::Bind {
            addr: config.listen.clone(),
            source,
        })?;
        let pool = Pool::start(config.io_threads).map_err(ServerError::Threads)?;
        Ok(Server {
            listener,
            volumes: Arc::new(volumes),
            state: Arc::new(NodeState::default()),
            stats: Arc::new(NodeStats::default()),
            pool: Arc::new(pool),
            config,
        })
    }

    /// The bound address (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// The volumes served.
    pub fn volumes(&self) -> &Arc<VolumeDir> {
        &self.volumes
    }

    /// The node's counters.
    pub fn stats(&self) -> &Arc<NodeStats> {
        &self.stats
    }

    /// A handle that stops the server.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            state: self.state.clone(),
            listener_fd: self.listener.as_raw_fd(),
        }
    }

    /// Accepts and serves connections until shut down; returns once every
    /// connection has ended, the workers have stopped and the volumes are synced.
    pub fn run(&self) {
        let mut threads: Vec<std::thread::JoinHandle<()>> = Vec::new();
        loop {
            let (stream, peer) = match self.listener.accept() {
                Ok(x) => x,
                Err(e) => {
                    if self.state.shutting_down.load(Relaxed) {
                        break;
                    }
                    log::warn!("accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            if self.state.shutting_down.load(Relaxed) {
                break;
            }
            threads.retain(|t| !t.is_finished());
            self.stats.accepted.fetch_add(1, Relaxed);
            let id = self.state.next_conn.fetch_add(1, Relaxed);
            {
                let mut conns = self.state.conns.lock().unwrap();
                if conns.len() >= self.config.max_connections {
                    drop(conns);
                    warn_limited!(
                        PEER_ERRORS,
                        "{peer}: refused, {} connections open",
                        self.config.max_connections
                    );
                    continue;
                }
                match stream.try_clone() {
                    Ok(s) => {
                        conns.insert(id, s);
                    }
                    Err(e) => {
                        log::warn!("{peer}: cannot register connection: {e}");
                        continue;
                    }
                }
            }
            let ctx = ConnContext {
                volumes: self.volumes.clone(),
                stats: self.stats.clone(),
                pool: self.pool.clone(),
                config: self.config.clone(),
            };
            let state = self.state.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("conn-{peer}"))
                .spawn(move || {
                    ctx.serve(stream, peer);
                    state.conns.lock().unwrap().remove(&id);
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    log::error!("{peer}: cannot start a connection thread: {e}");
                    self.state.conns.lock().unwrap().remove(&id);
                }
            }
        }
        // Connections registered after the handle's sweep get the same treatment.
        for s in self.state.conns.lock().unwrap().values() {
            let _ = s.shutdown(Shutdown::Read);
        }
        let grace_end = Instant::now() + SHUTDOWN_GRACE;
        while threads.iter().any(|t| !t.is_finished()) && Instant::now() < grace_end {
            std::thread::sleep(Duration::from_millis(5));
        }
        let stuck = self.state.conns.lock().unwrap().len();
        if stuck > 0 {
            log::warn!("closing {stuck} connections that did not finish in {SHUTDOWN_GRACE:?}");
            for s in self.state.conns.lock().unwrap().values() {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        for t in threads {
            let _ = t.join();
        }
        self.pool.stop();
        let synced = self.volumes.sync_all();
        log::debug!("synced {synced} volumes");
    }
}

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
        let volume = match handshake::negotiate(&stream, &self.volumes, deadline) {
            Ok(Negotiated::Go(v)) => v,
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
        if stream.set_read_timeout(None).is_err() {
            return;
        }
        self.stats.sessions.fetch_add(1, Relaxed);
        if let Some(suppressed) = CONN_LOG.check() {
            log::info!(
                "{peer}: serving {:?} ({} bytes{}){}",
                volume.name(),
                volume.size(),
                if volume.read_only() {
                    ", read-only"
                } else {
                    ""
                },
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
        if let Err(e) = conn::serve(stream, peer, volume, self.stats.clone(), &self.pool, limits) {
            log::warn!("{peer}: {e}");
        }
    }
}
