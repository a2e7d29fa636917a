//! The memory node's network service: one thread per connection, each running the
//! fabric protocol against the shared [`PageStore`].
//!
//! A connection reads as many bytes as the socket has (up to two maximal frames),
//! handles every complete request in them, and sends all replies with one write, so
//! a client with many requests in flight is served with few system calls. A
//! protocol violation gets an `Error` reply naming it, then the connection is
//! closed; other connections are unaffected.

use crate::store::{PageStore, StoreError, VmStats};
pub use fabric::acceptor::ShutdownHandle;
use fabric::acceptor::{Acceptor, Connections};
use fabric::auth::{self, Key};
use fabric::proto::{
    self, DecodeError, ErrorCode, FrameHeader, MAX_BATCH, MAX_FRAME, Message, PAGE_SIZE,
    PROTOCOL_VERSION, ReadReplyBuilder, Role, StatsReply,
};
use fabric::ratelimit::RateLimiter;
use fabric::transport::tcp::TcpLink;
use fabric::transport::{Link, TransportError};
use fabric::warn_limited;
use std::io::IoSlice;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

#[doc(hidden)]
pub mod fuzzing;

static PEER_ERRORS: RateLimiter = RateLimiter::new(10);

/// Replies are sent once this many bytes are pending, even mid-batch.
const FLUSH_AT: usize = 1 << 20;

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
    /// The capacity is too small to hold a page.
    #[error("capacity of {0} bytes holds no 4 KiB page")]
    TooSmall(u64),
    /// The node's instance number could not be drawn.
    #[error("cannot draw the node's instance number")]
    Instance(#[source] fabric::auth::KeyError),
    /// `--rdma` in a build without the RDMA transport.
    #[error(
        "--rdma: this memnode was built without the RDMA transport (build with `--features rdma`)"
    )]
    NoRdma,
    /// The RDMA device could not be opened.
    #[cfg(feature = "rdma")]
    #[error("--rdma: cannot serve one-sided reads")]
    Rdma(#[source] fabric::transport::rdma::RdmaError),
}

/// The node's RDMA side: an open device (none can exist without the feature).
#[cfg(feature = "rdma")]
type RdmaService = Arc<crate::rdma::RdmaNode>;
/// The node's RDMA side: an open device (none can exist without the feature).
#[cfg(not(feature = "rdma"))]
#[derive(Clone)]
enum RdmaService {}

/// What a node without `--rdma` answers to RDMA requests.
const NO_RDMA: &str = "this node serves no RDMA (start it with --rdma DEV)";

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: String,
    /// Capacity in bytes (rounded down to whole pages).
    pub capacity_bytes: u64,
    /// Most connections at once; more are refused with an error reply.
    pub max_connections: usize,
    /// How long a new connection may take to send its `Hello`.
    pub handshake_timeout: Duration,
    /// How long sending a reply may block (a client that stopped reading) before
    /// the connection is closed.
    pub send_timeout: Duration,
    /// The cluster key: with one, every connection must prove it (and gets the
    /// node's proof), see [`fabric::auth`]; without, any client is served.
    pub auth_key: Option<Key>,
    /// Most bytes any one VM may store here (`None`: only the capacity bounds it).
    pub vm_quota_bytes: Option<u64>,
    /// Serve one-sided reads through this RDMA device (`auto`: the first
    /// active one); the store then uses the region layout ([`crate::regions`]).
    pub rdma_device: Option<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:7000".into(),
            capacity_bytes: 8 << 30,
            max_connections: 1024,
            handshake_timeout: Duration::from_secs(10),
            send_timeout: Duration::from_secs(30),
            auth_key: None,
            vm_quota_bytes: None,
            rdma_device: None,
        }
    }
}

/// Node-wide counters and the open connections.
pub struct NodeState {
    /// Requests answered with an error.
    pub errors: AtomicU64,
    conns: Arc<Connections>,
    /// Drawn at random when the node starts and sent in every `HelloOk`: a
    /// VMM that sees another instance at a known address knows the node
    /// restarted empty.
    pub instance: u64,
}

impl NodeState {
    /// Open connections.
    pub fn connections(&self) -> u64 {
        self.conns.open()
    }

    /// Connections accepted since start.
    pub fn accepted(&self) -> u64 {
        self.conns.accepted()
    }
}

/// A bound memory node server.
pub struct Server {
    acceptor: Acceptor,
    store: Arc<PageStore>,
    state: Arc<NodeState>,
    config: ServerConfig,
    rdma: Option<RdmaService>,
}

impl Server {
    /// Binds the listen address and creates an empty store.
    pub fn bind(config: ServerConfig) -> Result<Self, ServerError> {
        let capacity_pages = config.capacity_bytes / PAGE_SIZE as u64;
        if capacity_pages == 0 {
            return Err(ServerError::TooSmall(config.capacity_bytes));
        }
        // A shutdown closes connections at once: a memory node's replies are
        // only useful to a VMM that is still running.
        let acceptor = Acceptor::bind(&config.listen, config.max_connections, Shutdown::Both)
            .map_err(|source| ServerError::Bind {
                addr: config.listen.clone(),
                source,
            })?;
        let state = Arc::new(NodeState {
            errors: AtomicU64::new(0),
            conns: acceptor.connections().clone(),
            instance: u64::from_le_bytes(fabric::auth::random().map_err(ServerError::Instance)?),
        });
        let quota = config.vm_quota_bytes.map(|b| b / PAGE_SIZE as u64);
        let (store, rdma) = match &config.rdma_device {
            None => (PageStore::with_vm_quota(capacity_pages, quota), None),
            #[cfg(feature = "rdma")]
            Some(dev) => {
                let node = crate::rdma::RdmaNode::open(dev).map_err(ServerError::Rdma)?;
                let store = PageStore::with_regions(capacity_pages, quota, Box::new(node.clone()));
                (store, Some(node))
            }
            #[cfg(not(feature = "rdma"))]
            Some(_) => return Err(ServerError::NoRdma),
        };
        Ok(Server {
            acceptor,
            store: Arc::new(store),
            state,
            config,
            rdma,
        })
    }

    /// The bound address (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.acceptor.local_addr()
    }

    /// The page store.
    pub fn store(&self) -> &Arc<PageStore> {
        &self.store
    }

    /// The node-wide counters.
    pub fn state(&self) -> &Arc<NodeState> {
        &self.state
    }

    /// A handle that stops the server.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.acceptor.shutdown_handle()
    }

    /// Accepts and serves connections until shut down; returns once every
    /// connection thread has finished.
    pub fn run(&self) {
        let (store, state, config) = (self.store.clone(), self.state.clone(), &self.config);
        let (handshake_timeout, send_timeout) = (config.handshake_timeout, config.send_timeout);
        let key = Arc::new(config.auth_key.clone());
        let rdma = self.rdma.clone();
        let serve = move |stream: TcpStream, peer: SocketAddr| {
            Connection {
                store: store.clone(),
                state: state.clone(),
                handshake_timeout,
                send_timeout,
                key: key.clone(),
                pending: None,
                session: None,
                rdma: rdma.clone(),
                #[cfg(feature = "rdma")]
                qp: None,
            }
            .serve(stream, peer)
        };
        let threads = self.acceptor.run(serve, |stream, peer| {
            self.state.errors.fetch_add(1, Relaxed);
            warn_limited!(
                PEER_ERRORS,
                "{peer}: refused, {} connections open",
                self.config.max_connections
            );
            refuse(stream, ErrorCode::BadRequest, "too many connections");
        });
        self.acceptor.finish(threads, None);
    }

    /// The node's statistics, with the VM part for `vm`.
    pub fn stats(&self, vm: Option<u64>) -> StatsReply {
        stats_reply(
            &self.store,
            &self.state,
            vm.and_then(|v| self.store.vms().get(v)).as_deref(),
        )
    }
}

fn refuse(stream: TcpStream, code: ErrorCode, message: &str) {
    let mut out = Vec::new();
    Message::Error { code, message }.encode(0, &mut out);
    if let Ok(link) = TcpLink::from_stream(stream, String::new()) {
        let _ = link.send_vectored(&mut [IoSlice::new(&out)]);
        link.shutdown();
    }
}

fn stats_reply(store: &PageStore, state: &NodeState, vm: Option<&VmStats>) -> StatsReply {
    let mut r = StatsReply {
        node_pages: store.used_pages(),
        node_capacity_pages: store.capacity_pages(),
        node_vms: store.vms().with_pages(),
        vm_quota_pages: store.vm_quota_pages().unwrap_or(0),
        node_connections: state.connections(),
        node_errors: state.errors.load(Relaxed),
        node_overhead_bytes: store.overhead_bytes(),
        ..StatsReply::default()
    };
    if let Some(v) = vm {
        r.vm_pages = v.pages.load(Relaxed);
        r.vm_reads = v.reads.load(Relaxed);
        r.vm_zero_reads = v.zero_reads.load(Relaxed);
        r.vm_writes = v.writes.load(Relaxed);
        r.vm_frees = v.frees.load(Relaxed);
    }
    r
}

/// The handshake's outcome.
struct Session {
    vm_id: u64,
    role: Role,
    stats: Arc<VmStats>,
}

/// Why a connection ends after its current reply.
enum Close {
    /// The peer broke the protocol: reply with this error, then close.
    Violation(ErrorCode, String),
}

/// A hello answered with a challenge, waiting for the client's proof.
struct Pending {
    role: Role,
    vm_id: u64,
    nc: [u8; auth::NONCE_LEN],
    ns: [u8; auth::NONCE_LEN],
}

struct Connection {
    store: Arc<PageStore>,
    state: Arc<NodeState>,
    handshake_timeout: Duration,
    send_timeout: Duration,
    key: Arc<Option<Key>>,
    pending: Option<Pending>,
    session: Option<Session>,
    rdma: Option<RdmaService>,
    /// The connection's queue pair, once the client asked for one.
    #[cfg(feature = "rdma")]
    qp: Option<fabric::transport::rdma::verbs::Qp>,
}

impl Connection {
    fn serve(mut self, stream: TcpStream, peer: SocketAddr) {
        let link = match TcpLink::from_stream(stream, peer.to_string()) {
            Ok(l) => l,
            Err(e) => {
                log::warn!("{peer}: {}", fabric::client::error_chain(&e));
                return;
            }
        };
        let _ = link.set_recv_timeout(Some(self.handshake_timeout));
        let _ = link.set_send_timeout(Some(self.send_timeout));
        // The whole handshake has one deadline, however the bytes trickle in.
        let handshake_deadline = std::time::Instant::now() + self.handshake_timeout;
        log::debug!("{peer}: connected");
        let mut inbuf = vec![0u8; 2 * MAX_FRAME].into_boxed_slice();
        let (mut start, mut end) = (0usize, 0usize);
        let mut out: Vec<u8> = Vec::with_capacity(FLUSH_AT + MAX_FRAME);
        loop {
            if start > 0 && inbuf.len() - end < MAX_FRAME {
                inbuf.copy_within(start..end, 0);
                end -= start;
                start = 0;
            }
            if self.session.is_none() {
                let left = handshake_deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return self.handshake_timed_out(&link, &mut out);
                }
                let _ = link.set_recv_timeout(Some(left));
            }
            let n = match link.recv(&mut inbuf[end..]) {
                Ok(0) => break,
                Ok(n) => n,
                Err(TransportError::TimedOut { .. }) => {
                    return self.handshake_timed_out(&link, &mut out);
                }
                Err(e) => {
                    if !self.state.conns.shutting_down() {
                        log::debug!("{peer}: {}", fabric::client::error_chain(&e));
                    }
                    break;
                }
            };
            end += n;
            loop {
                let (rid, result) = match proto::decode_frame(&inbuf[start..end]) {
                    Ok(None) => break,
                    Ok(Some((h, msg, used))) => {
                        start += used;
                        let opened = self.session.is_none();
                        let result = self.handle(&h, msg, &mut out, link.peer());
                        if opened && self.session.is_some() {
                            let _ = link.set_recv_timeout(None);
                        }
                        (h.request_id, result)
                    }
                    Err(e) => (
                        request_id_of(&inbuf[start..end]),
                        Err(Close::Violation(ErrorCode::Malformed, e.to_string())),
                    ),
                };
                if let Err(Close::Violation(code, message)) = result {
                    self.fail(&link, &mut out, rid, code, message);
                    return;
                }
                if out.len() >= FLUSH_AT && !self.flush(&link, &mut out) {
                    return;
                }
            }
            if start == end {
                start = 0;
                end = 0;
            }
            if !out.is_empty() && !self.flush(&link, &mut out) {
                return;
            }
        }
        log::debug!("{peer}: closed");
    }

    fn handshake_timed_out(&self, link: &TcpLink, out: &mut Vec<u8>) {
        self.fail(
            link,
            out,
            0,
            ErrorCode::HandshakeRequired,
            "no hello within the handshake timeout".into(),
        );
    }

    fn flush(&self, link: &TcpLink, out: &mut Vec<u8>) -> bool {
        let ok = link.send_vectored(&mut [IoSlice::new(out)]).is_ok();
        out.clear();
        ok
    }

    /// Sends what is pending plus an error reply, then closes.
    fn fail(&self, link: &TcpLink, out: &mut Vec<u8>, rid: u64, code: ErrorCode, message: String) {
        self.state.errors.fetch_add(1, Relaxed);
        warn_limited!(
            PEER_ERRORS,
            "{}: {code}: {message}; closing the connection",
            link.peer()
        );
        Message::Error {
            code,
            message: &message,
        }
        .encode(rid, out);
        self.flush(link, out);
        link.shutdown();
    }

    fn refuse(&self, rid: u64, out: &mut Vec<u8>, code: ErrorCode, message: &str) {
        self.state.errors.fetch_add(1, Relaxed);
        Message::Error { code, message }.encode(rid, out);
    }

    fn handle(
        &mut self,
        h: &FrameHeader,
        msg: Message<'_>,
        out: &mut Vec<u8>,
        peer: &str,
    ) -> Result<(), Close> {
        let rid = h.request_id;
        let Some(session) = &self.session else {
            return self.handshake(rid, msg, out, peer);
        };
        let (vm, stats) = (session.vm_id, session.stats.clone());
        let moves_pages = matches!(
            msg,
            Message::ReadPages { .. }
                | Message::WritePages { .. }
                | Message::FreePages { .. }
                | Message::RdmaConnect { .. }
                | Message::MapRegion { .. }
        );
        if moves_pages && session.role != Role::Vmm {
            self.refuse(
                rid,
                out,
                ErrorCode::BadRequest,
                "this connection's role may not move pages",
            );
            return Ok(());
        }
        match msg {
            Message::ReadPages { gpns } => {
                let mut reply = ReadReplyBuilder::begin(out, rid, gpns.len());
                for gpn in gpns.iter() {
                    let present = self
                        .store
                        .read(&stats, vm, gpn, |page| reply.present(out, page));
                    if !present {
                        reply.zero();
                    }
                }
                reply.finish(out);
            }
            Message::WritePages { gpns, data } => {
                match self.store.write(&stats, vm, gpns.iter(), data) {
                    Ok(()) => Message::WritePagesOk {
                        count: gpns.len() as u32,
                    }
                    .encode(rid, out),
                    Err(
                        e @ (StoreError::OutOfCapacity { .. }
                        | StoreError::OverQuota { .. }
                        | StoreError::ChunksFull { .. }
                        | StoreError::Register { .. }),
                    ) => {
                        warn_limited!(PEER_ERRORS, "{peer}: vm {vm}: {e}");
                        self.refuse(rid, out, ErrorCode::OutOfCapacity, &e.to_string());
                    }
                    Err(e) => self.refuse(rid, out, ErrorCode::BadRequest, &e.to_string()),
                }
            }
            Message::FreePages { gpns } => {
                let count = self.store.free(&stats, vm, gpns.iter());
                Message::FreePagesOk { count }.encode(rid, out);
            }
            Message::Stats => Message::StatsOk(stats_reply(&self.store, &self.state, Some(&stats)))
                .encode(rid, out),
            Message::Ping { nonce } => Message::Pong { nonce }.encode(rid, out),
            Message::RdmaConnect { endpoint } => self.rdma_connect(rid, vm, &endpoint, out),
            Message::MapRegion { chunk } => match self.store.regions() {
                None => self.refuse(rid, out, ErrorCode::BadRequest, NO_RDMA),
                Some(r) => {
                    let (addr, len, rkey) = r.place(vm, chunk).unwrap_or_default();
                    Message::MapRegionOk {
                        chunk,
                        addr,
                        len,
                        rkey,
                    }
                    .encode(rid, out);
                }
            },
            Message::Hello { .. } => {
                return Err(Close::Violation(
                    ErrorCode::HandshakeRequired,
                    "second hello on one connection".into(),
                ));
            }
            other => {
                return Err(Close::Violation(
                    ErrorCode::BadRequest,
                    format!("{:?} is a reply, not a request", other.opcode()),
                ));
            }
        }
        Ok(())
    }

    /// `RdmaConnect`: a queue pair for this connection, in its VM's
    /// protection domain, connected to the client's.
    #[cfg(feature = "rdma")]
    fn rdma_connect(
        &mut self,
        rid: u64,
        vm: u64,
        peer: &fabric::proto::RdmaEndpoint,
        out: &mut Vec<u8>,
    ) {
        let Some(node) = &self.rdma else {
            return self.refuse(rid, out, ErrorCode::BadRequest, NO_RDMA);
        };
        if self.qp.is_some() {
            return self.refuse(
                rid,
                out,
                ErrorCode::BadRequest,
                "this connection has its queue pair already",
            );
        }
        match node.accept(vm, peer) {
            Ok((qp, endpoint)) => {
                log::info!(
                    "vm {vm:#x}: queue pair {} connected to the client's {} on {}",
                    endpoint.qpn,
                    peer.qpn,
                    node.device()
                );
                self.qp = Some(qp);
                Message::RdmaConnectOk {
                    endpoint,
                    chunk_pages: crate::regions::CHUNK_PAGES as u32,
                }
                .encode(rid, out);
            }
            Err(e) => {
                let why = fabric::client::error_chain(&e);
                warn_limited!(
                    PEER_ERRORS,
                    "vm {vm:#x}: cannot connect a queue pair: {why}"
                );
                self.refuse(rid, out, ErrorCode::Internal, &why);
            }
        }
    }

    /// `RdmaConnect` in a build without the RDMA transport.
    #[cfg(not(feature = "rdma"))]
    fn rdma_connect(
        &mut self,
        rid: u64,
        _vm: u64,
        _peer: &fabric::proto::RdmaEndpoint,
        out: &mut Vec<u8>,
    ) {
        if let Some(never) = &self.rdma {
            match *never {}
        }
        self.refuse(rid, out, ErrorCode::BadRequest, NO_RDMA);
    }

    fn handshake(
        &mut self,
        rid: u64,
        msg: Message<'_>,
        out: &mut Vec<u8>,
        peer: &str,
    ) -> Result<(), Close> {
        if let Some(p) = self.pending.take() {
            let Message::Proof { proof, vm } = msg else {
                return Err(Close::Violation(
                    ErrorCode::HandshakeRequired,
                    format!("expected the client's proof, got {:?}", msg.opcode()),
                ));
            };
            let binding = auth::hello_binding(p.role as u8, PROTOCOL_VERSION, p.vm_id);
            if let Some(key) = &*self.key {
                let Some(proof) = proof else {
                    return Err(Close::Violation(
                        ErrorCode::AuthFailed,
                        "this node requires authentication: the client must hold the cluster key (--auth-key)"
                            .into(),
                    ));
                };
                if !key.verify_client(&binding, &p.nc, &p.ns, proof) {
                    return Err(Close::Violation(
                        ErrorCode::AuthFailed,
                        "the client could not prove the cluster key".into(),
                    ));
                }
            }
            // A VMM proves which VM it acts for; an admin tool acts for none.
            let owner = match (p.role, vm) {
                (Role::Vmm, None) => {
                    return Err(Close::Violation(
                        ErrorCode::AuthFailed,
                        "a VMM must prove its VM's identity (a VM key and signature)".into(),
                    ));
                }
                (Role::Vmm, Some((vm_key, sig))) => {
                    if !auth::verify_vm(vm_key, &binding, &p.nc, &p.ns, sig) {
                        return Err(Close::Violation(
                            ErrorCode::AuthFailed,
                            "the VM signature does not verify".into(),
                        ));
                    }
                    Some(*vm_key)
                }
                _ => None,
            };
            return self.open_session(rid, p.role, p.vm_id, owner.as_ref(), out, peer);
        }
        let Message::Hello {
            role,
            version,
            vm_id,
            auth,
        } = msg
        else {
            return Err(Close::Violation(
                ErrorCode::HandshakeRequired,
                format!("expected hello, got {:?}", msg.opcode()),
            ));
        };
        if version != PROTOCOL_VERSION {
            return Err(Close::Violation(
                ErrorCode::UnsupportedVersion,
                format!("version {version} requested, this node speaks {PROTOCOL_VERSION}"),
            ));
        }
        if !matches!(role, Role::Vmm | Role::Admin) {
            return Err(Close::Violation(
                ErrorCode::BadRequest,
                format!("role {role:?} cannot use a memory node"),
            ));
        }
        let Ok(nc) = <[u8; auth::NONCE_LEN]>::try_from(auth) else {
            return Err(Close::Violation(
                ErrorCode::AuthFailed,
                format!(
                    "the hello must carry a {}-byte nonce, not {} bytes",
                    auth::NONCE_LEN,
                    auth.len()
                ),
            ));
        };
        let ns: [u8; auth::NONCE_LEN] = auth::random().map_err(|e| {
            Close::Violation(ErrorCode::Internal, format!("cannot make a nonce: {e}"))
        })?;
        // Without a cluster key the node proves nothing (zeros), and a client
        // holding a key refuses it.
        let binding = auth::hello_binding(role as u8, version, vm_id);
        let proof = (*self.key).as_ref().map_or([0; auth::PROOF_LEN], |key| {
            key.node_proof(&binding, &nc, &ns)
        });
        Message::Challenge {
            nonce: &ns,
            proof: &proof,
        }
        .encode(rid, out);
        self.pending = Some(Pending {
            role,
            vm_id,
            nc,
            ns,
        });
        Ok(())
    }

    /// The handshake succeeded: the connection acts on `vm_id` from now on,
    /// if the VM is not bound to another VMM.
    fn open_session(
        &mut self,
        rid: u64,
        role: Role,
        vm_id: u64,
        owner: Option<&auth::VmPublicKey>,
        out: &mut Vec<u8>,
        peer: &str,
    ) -> Result<(), Close> {
        let stats = self
            .store
            .vms()
            .open(vm_id, owner)
            .map_err(|e| Close::Violation(ErrorCode::AuthFailed, e.to_string()))?;
        log::info!("{peer}: hello from a {role:?} for vm {vm_id:#x}");
        self.session = Some(Session { vm_id, role, stats });
        let capacity_pages = self.store.capacity_pages();
        Message::HelloOk {
            role: Role::MemNode,
            version: PROTOCOL_VERSION,
            page_size: PAGE_SIZE as u32,
            max_batch: MAX_BATCH as u32,
            capacity_pages: self
                .store
                .vm_quota_pages()
                .map_or(capacity_pages, |q| q.min(capacity_pages)),
            instance: self.state.instance,
        }
        .encode(rid, out);
        Ok(())
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if let Some(sess) = self.session.take() {
            self.store.close_session(sess.vm_id, sess.stats);
        }
    }
}

/// The request id of a frame whose header is at least partly readable, else 0.
fn request_id_of(buf: &[u8]) -> u64 {
    match FrameHeader::decode(buf) {
        Ok(h) => h.request_id,
        Err(DecodeError::Truncated { .. } | DecodeError::BadMagic { .. }) => 0,
        Err(_) if buf.len() >= 16 => u64::from_le_bytes(buf[8..16].try_into().unwrap()),
        Err(_) => 0,
    }
}
