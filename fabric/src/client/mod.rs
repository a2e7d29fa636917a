//! The pipelined page client: how a VMM (or a tool) talks to a memory node.
//!
//! One [`PageClient`] owns one connection and is shared by many threads (it is
//! `Clone`, `Send` and `Sync`). Each request takes a *slot* whose index and generation
//! form the request id; replies may come back in any order.
//!
//! There is no receiver thread. A caller waiting for its reply becomes the *reader*
//! if nobody else is: it reads frames off the socket and hands each reply to its
//! slot, until its own arrives; then it passes the reader role to a parked waiter.
//! With one request outstanding this costs exactly one round trip and no thread
//! hand-off (the caller reads its own reply); with many, the replies of several
//! threads are read by one `read` system call and delivered by one reader
//! ("leader/follower"). [`PageClient::submit_read`] lets one thread keep many
//! requests in flight (prefetch), and [`PageClient::read_page`] is the blocking call
//! a fault handler makes.

pub mod ideal;
mod pending;
mod rdma;
mod slots;

pub use pending::{PendingRead, PendingWrite};
pub use rdma::RDMA_SCHEME;

use crate::link_model::{LinkModel, Shaper, wait_until};
use crate::proto::{
    self, ErrorCode, HEADER_LEN, MAX_BATCH, Message, Opcode, PAGE_SIZE, PROTOCOL_VERSION, Role,
    StatsReply,
};
use crate::transport::tcp::TcpLink;
use crate::transport::{Link, TransportError};
use ideal::{IdealError, IdealStore};
use slots::{Reply, SlotTable};
use std::io::IoSlice;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Failures of client calls. Each names the node it concerns.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting failed.
    #[error("cannot reach node {addr}")]
    Connect {
        /// The node.
        addr: String,
        /// Why.
        #[source]
        source: TransportError,
    },
    /// The node refused or botched the handshake.
    #[error("handshake with node {addr} failed: {reason}")]
    Handshake {
        /// The node.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The node answered the request with an error.
    #[error("node {addr} refused the request: {code}: {message}")]
    Remote {
        /// The node.
        addr: String,
        /// The error code.
        code: ErrorCode,
        /// The node's message.
        message: String,
    },
    /// The connection failed; this and every later request on it fail.
    #[error("connection to node {addr} lost: {reason}")]
    ConnectionLost {
        /// The node.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The call's arguments break the protocol's limits.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// An ideal (in-process) node could not be made or refused a request.
    #[error("ideal memory node {addr}")]
    Ideal {
        /// The node's name.
        addr: String,
        /// What was wrong.
        #[source]
        source: IdealError,
    },
}

/// Connection options.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The address space (VM) the connection acts on.
    pub vm_id: u64,
    /// The role announced in the handshake.
    pub role: Role,
    /// The cluster key: with one, the connection is authenticated both ways
    /// ([`crate::auth`]) and a node that cannot prove the key is refused.
    pub auth_key: Option<crate::auth::Key>,
    /// The VM's secret (see [`crate::auth`]): a VMM connection proves with it
    /// that it acts for `vm_id`, and a node binds the VM to it. The default is
    /// a fresh random one, shared by the clients made from this config.
    pub vm_secret: Option<crate::auth::Key>,
    /// The emulated link (off by default).
    pub link_model: LinkModel,
    /// Most requests in flight at once; further submits wait for a free slot.
    pub max_in_flight: usize,
    /// How long connecting may take.
    pub connect_timeout: Duration,
    /// How long a request may wait for its reply before the connection is declared dead.
    pub reply_timeout: Duration,
    /// The local RDMA device for `rdma://` nodes (`None`: the first with an
    /// active port).
    pub rdma_device: Option<String>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            vm_id: 0,
            role: Role::Vmm,
            auth_key: None,
            vm_secret: Some(
                crate::auth::Key::generate().expect("the system random number generator works"),
            ),
            link_model: LinkModel::default(),
            max_in_flight: 256,
            connect_timeout: Duration::from_secs(5),
            reply_timeout: Duration::from_secs(10),
            rdma_device: None,
        }
    }
}

/// What the node told about itself in the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// The address connected to.
    pub addr: String,
    /// The node's role.
    pub role: Role,
    /// The node's capacity in pages.
    pub capacity_pages: u64,
    /// Most pages per batch the node accepts.
    pub max_batch: usize,
    /// The node process's instance (drawn at random when it started): the
    /// same address with another instance is a new, empty node.
    pub instance: u64,
}

/// Which pages of a batch were present on the node: bit `i` set for the `i`-th page
/// of the request. Absent pages were never written and read as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Presence(pub u64);

impl Presence {
    /// True if the `i`-th page had data.
    pub fn is_present(&self, i: usize) -> bool {
        i < 64 && self.0 & (1 << i) != 0
    }
}

/// A connection to one node, shareable across threads.
#[derive(Clone)]
pub struct PageClient {
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    /// A node across a link.
    Remote(Arc<Inner>),
    /// An in-process store ([`ideal`]).
    Ideal(Arc<Ideal>),
}

struct Ideal {
    node: NodeInfo,
    store: IdealStore,
    shaper: Option<Shaper>,
}

impl Ideal {
    /// When a request of `sent` bytes answered with `reply` bytes would be seen
    /// on the modelled link (`None` without a model).
    fn visible_at(&self, sent: usize, reply: usize) -> Option<Instant> {
        self.shaper
            .as_ref()
            .map(|s| s.on_recv(reply, s.on_send(sent)))
    }

    fn check(&self, gpns: impl IntoIterator<Item = u64>) -> Result<(), ClientError> {
        self.store.check(gpns).map_err(|source| ClientError::Ideal {
            addr: self.node.addr.clone(),
            source,
        })
    }
}

/// Is `addr` the name of an ideal (in-process) node: `ideal` or `ideal:TAG`?
pub fn is_ideal_addr(addr: &str) -> bool {
    addr == "ideal" || addr.starts_with("ideal:")
}

struct Inner {
    link: Box<dyn Link>,
    node: NodeInfo,
    /// Serialises frames onto the link; holds the header scratch buffer.
    send: Mutex<Vec<u8>>,
    slots: SlotTable,
    shaper: Option<Shaper>,
    /// One-sided reads, on an `rdma://` node (set once, after the handshake).
    #[cfg(feature = "rdma")]
    rdma: std::sync::OnceLock<crate::transport::rdma::RdmaReader>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.link.shutdown();
    }
}

impl PageClient {
    /// Connects to `addr` and performs the handshake: over TCP to
    /// `HOST:PORT`, or to `rdma://HOST:PORT` (TCP for the handshake and
    /// two-sided messages, one-sided RDMA READs for pages; needs the `rdma`
    /// feature).
    pub fn connect(addr: &str, config: &ClientConfig) -> Result<Self, ClientError> {
        if addr.starts_with(RDMA_SCHEME) {
            return rdma::connect(addr, config);
        }
        let link = TcpLink::connect(addr, config.connect_timeout).map_err(|source| {
            ClientError::Connect {
                addr: addr.to_string(),
                source,
            }
        })?;
        Self::over_link(Box::new(link), config)
    }

    /// Performs the handshake on an established link and returns the client.
    pub fn over_link(link: Box<dyn Link>, config: &ClientConfig) -> Result<Self, ClientError> {
        let addr = link.peer().to_string();
        Self::over_link_named(link, config, &addr)
    }

    /// As [`PageClient::over_link`], naming the node `addr` in errors.
    fn over_link_named(
        link: Box<dyn Link>,
        config: &ClientConfig,
        addr: &str,
    ) -> Result<Self, ClientError> {
        let addr = addr.to_string();
        let handshake_err = |reason: String| ClientError::Handshake {
            addr: addr.clone(),
            reason,
        };
        link.set_recv_timeout(Some(config.reply_timeout))
            .and_then(|()| link.set_send_timeout(Some(config.reply_timeout)))
            .map_err(|e| handshake_err(error_chain(&e)))?;
        // The hello carries this side's nonce; the node answers with its own
        // (see `crate::auth`).
        let nc: [u8; crate::auth::NONCE_LEN] =
            crate::auth::random().map_err(|e| handshake_err(e.to_string()))?;
        let binding = crate::auth::hello_binding(config.role as u8, PROTOCOL_VERSION, config.vm_id);
        // A VMM proves that it acts for its VM; an admin tool needs no VM.
        let identity = match (config.role, &config.vm_secret) {
            (Role::Vmm, Some(secret)) => Some(secret.vm_identity(config.vm_id)),
            (Role::Vmm, None) => {
                return Err(handshake_err(
                    "a VMM connection needs its VM's secret (ClientConfig::vm_secret)".into(),
                ));
            }
            _ => None,
        };
        let mut buf = Vec::with_capacity(256);
        Message::hello(config.role, config.vm_id, &nc).encode(0, &mut buf);
        link.send_vectored(&mut [IoSlice::new(&buf)])
            .map_err(|e| handshake_err(error_chain(&e)))?;
        // Read frame by frame, byte-accurately, before pipelining starts.
        let mut frame = vec![0u8; HEADER_LEN + Opcode::Error.max_payload()];
        let mut have = 0;
        let mut challenged = false;
        let node = loop {
            let mut consumed = 0;
            match proto::decode_frame(&frame[..have]) {
                Ok(Some((_, Message::Challenge { nonce, proof }, n))) => {
                    if challenged {
                        return Err(handshake_err("a second challenge".into()));
                    }
                    if let Some(key) = &config.auth_key
                        && !key.verify_node(&binding, &nc, nonce, proof)
                    {
                        return Err(handshake_err(
                            "authentication failed: the node could not prove the cluster key (not a node of this cluster, another key, or a node without --auth-key)".into(),
                        ));
                    }
                    challenged = true;
                    let mine = config
                        .auth_key
                        .as_ref()
                        .map(|key| key.client_proof(&binding, &nc, nonce));
                    let vm = identity
                        .as_ref()
                        .map(|id| (id.public(), id.sign(&binding, &nc, nonce)));
                    buf.clear();
                    Message::Proof {
                        proof: mine.as_ref(),
                        vm: vm.as_ref().map(|(k, s)| (k, s)),
                    }
                    .encode(0, &mut buf);
                    link.send_vectored(&mut [IoSlice::new(&buf)])
                        .map_err(|e| handshake_err(error_chain(&e)))?;
                    consumed = n;
                }
                Ok(Some((
                    _,
                    Message::HelloOk {
                        role,
                        version,
                        page_size,
                        max_batch,
                        capacity_pages,
                        instance,
                    },
                    _,
                ))) => {
                    if !challenged {
                        return Err(handshake_err(
                            "the node accepted the connection without a challenge; refusing it"
                                .into(),
                        ));
                    }
                    if version != PROTOCOL_VERSION || page_size as usize != PAGE_SIZE {
                        return Err(handshake_err(format!(
                            "node speaks version {version} with {page_size}-byte pages; this build needs version {PROTOCOL_VERSION} with {PAGE_SIZE}-byte pages"
                        )));
                    }
                    break NodeInfo {
                        addr: addr.clone(),
                        role,
                        capacity_pages,
                        max_batch: (max_batch as usize).clamp(1, MAX_BATCH),
                        instance,
                    };
                }
                Ok(Some((_, Message::Error { code, message }, _))) => {
                    return Err(handshake_err(format!("{code}: {message}")));
                }
                Ok(Some((h, _, _))) => {
                    return Err(handshake_err(format!("unexpected {:?} reply", h.opcode)));
                }
                Ok(None) => {}
                Err(e) => return Err(handshake_err(format!("bad reply: {e}"))),
            }
            if consumed > 0 {
                frame.copy_within(consumed..have, 0);
                have -= consumed;
                continue;
            }
            if have == frame.len() {
                return Err(handshake_err("reply too long".into()));
            }
            match link.recv(&mut frame[have..]) {
                Ok(0) => return Err(handshake_err("node closed the connection".into())),
                Ok(n) => have += n,
                Err(e) => return Err(handshake_err(error_chain(&e))),
            }
        };
        Ok(PageClient {
            backend: Backend::Remote(Arc::new(Inner {
                node,
                send: Mutex::new(Vec::with_capacity(HEADER_LEN + 8 + 8 * MAX_BATCH)),
                slots: SlotTable::new(config.max_in_flight.max(1)),
                shaper: Shaper::new(config.link_model),
                link,
                #[cfg(feature = "rdma")]
                rdma: std::sync::OnceLock::new(),
            })),
        })
    }

    /// An ideal memory node of `capacity_pages` pages in this process, named
    /// `addr` ([`ideal`]): no network and no node process; the config's link
    /// model, if any, delays its replies as a link would.
    pub fn ideal(
        addr: &str,
        capacity_pages: u64,
        config: &ClientConfig,
    ) -> Result<Self, ClientError> {
        let store = IdealStore::new(capacity_pages).map_err(|source| ClientError::Ideal {
            addr: addr.to_string(),
            source,
        })?;
        Ok(PageClient {
            backend: Backend::Ideal(Arc::new(Ideal {
                node: NodeInfo {
                    addr: addr.to_string(),
                    role: Role::MemNode,
                    capacity_pages: store.capacity(),
                    max_batch: MAX_BATCH,
                    instance: u64::from_le_bytes(crate::auth::random().map_err(|e| {
                        ClientError::Ideal {
                            addr: addr.to_string(),
                            source: IdealError::Random(e),
                        }
                    })?),
                },
                store,
                shaper: Shaper::new(config.link_model),
            })),
        })
    }

    /// The node across a link; `None` for an ideal node.
    fn remote(&self) -> Option<&Inner> {
        match &self.backend {
            Backend::Remote(r) => Some(r),
            Backend::Ideal(_) => None,
        }
    }

    /// What the node said about itself.
    pub fn node(&self) -> &NodeInfo {
        match &self.backend {
            Backend::Remote(r) => &r.node,
            Backend::Ideal(i) => &i.node,
        }
    }

    /// The node's address.
    pub fn addr(&self) -> &str {
        &self.node().addr
    }

    /// Why the connection failed, if it has.
    pub fn failure(&self) -> Option<String> {
        self.remote()
            .and_then(|r| r.slots.failure().or_else(|| rdma::failure(r)))
    }

    /// Pages read with one-sided RDMA READs so far (`None`: not an RDMA node).
    pub fn one_sided_pages(&self) -> Option<u64> {
        self.remote().and_then(rdma::pages_read)
    }

    /// Reads one page into `buf` (4096 bytes): one round trip. Returns whether the
    /// node had data; a page never written is returned as zeros.
    pub fn read_page(&self, gpn: u64, buf: &mut [u8]) -> Result<bool, ClientError> {
        let p = self.submit_read(&[gpn])?;
        Ok(p.wait(buf)?.is_present(0))
    }

    /// Reads a batch of pages into `out` (`gpns.len()` × 4096 bytes), one round trip.
    pub fn read_pages(&self, gpns: &[u64], out: &mut [u8]) -> Result<Presence, ClientError> {
        self.submit_read(gpns)?.wait(out)
    }

    /// Sends a read request and returns without waiting for the reply.
    pub fn submit_read(&self, gpns: &[u64]) -> Result<PendingRead<'_>, ClientError> {
        check_batch(gpns.len(), self.node().max_batch)?;
        let inner = match &self.backend {
            Backend::Remote(r) => r,
            Backend::Ideal(i) => {
                i.check(gpns.iter().copied())?;
                let n = gpns.len();
                let at = i.visible_at(HEADER_LEN + 8 * n, HEADER_LEN + 8 + n * PAGE_SIZE);
                return Ok(PendingRead {
                    client: self,
                    ticket: None,
                    count: n,
                    ideal: Some((gpns.to_vec(), at)),
                    rdma: None,
                });
            }
        };
        #[cfg(feature = "rdma")]
        if let Some(reader) = inner.rdma.get()
            && let Some(p) = rdma::submit_read(self, inner, reader, gpns)?
        {
            return Ok(p);
        }
        let ticket = self.submit(
            inner,
            Opcode::ReadPagesOk,
            gpns.len(),
            |rid, buf| {
                proto::encode_read_pages(rid, gpns, buf);
                0
            },
            &[],
        )?;
        Ok(PendingRead {
            client: self,
            ticket: Some(ticket),
            count: gpns.len(),
            ideal: None,
            rdma: None,
        })
    }

    /// Writes pages (each a 4096-byte slice), one round trip; returns once the node
    /// has stored them.
    pub fn write_pages(&self, pages: &[(u64, &[u8])]) -> Result<(), ClientError> {
        self.submit_write(pages)?.wait()
    }

    /// Sends a write request and returns without waiting for the acknowledgement.
    pub fn submit_write(&self, pages: &[(u64, &[u8])]) -> Result<PendingWrite<'_>, ClientError> {
        check_batch(pages.len(), self.node().max_batch)?;
        let mut gpns = [0u64; MAX_BATCH];
        let mut data: [&[u8]; MAX_BATCH] = [&[]; MAX_BATCH];
        for (i, (gpn, page)) in pages.iter().enumerate() {
            if page.len() != PAGE_SIZE {
                return Err(ClientError::InvalidRequest(format!(
                    "page {gpn} is {} bytes, not {PAGE_SIZE}",
                    page.len()
                )));
            }
            gpns[i] = *gpn;
            data[i] = page;
        }
        let n = pages.len();
        let inner = match &self.backend {
            Backend::Remote(r) => r,
            Backend::Ideal(i) => {
                i.check(gpns[..n].iter().copied())?;
                for (gpn, page) in pages {
                    i.store.write(*gpn, page);
                }
                return Ok(PendingWrite {
                    client: self,
                    ticket: None,
                    ideal_ack: i.visible_at(HEADER_LEN + n * (8 + PAGE_SIZE), HEADER_LEN + 8),
                });
            }
        };
        let ticket = self.submit(
            inner,
            Opcode::WritePagesOk,
            n,
            |rid, buf| {
                proto::encode_write_pages_head(rid, &gpns[..n], buf);
                n * PAGE_SIZE
            },
            &data[..n],
        )?;
        Ok(PendingWrite {
            client: self,
            ticket: Some(ticket),
            ideal_ack: None,
        })
    }

    /// Frees pages on the node (they read as zeros afterwards); returns how many were stored.
    pub fn free_pages(&self, gpns: &[u64]) -> Result<u32, ClientError> {
        check_batch(gpns.len(), self.node().max_batch)?;
        let inner = match &self.backend {
            Backend::Remote(r) => r,
            Backend::Ideal(i) => {
                i.check(gpns.iter().copied())?;
                let freed = gpns.iter().filter(|&&g| i.store.free(g)).count();
                if let Some(at) = i.visible_at(HEADER_LEN + 8 * gpns.len(), HEADER_LEN + 8) {
                    wait_until(at);
                }
                return Ok(freed as u32);
            }
        };
        let raw: Vec<u8> = gpns.iter().flat_map(|g| g.to_le_bytes()).collect();
        let msg = Message::FreePages {
            gpns: Message::gpn_list(&raw),
        };
        match self.call(inner, &msg, Opcode::FreePagesOk)? {
            Reply::Count(n) => Ok(n as u32),
            other => Err(self.unexpected(other)),
        }
    }

    /// Asks the node for its statistics.
    pub fn stats(&self) -> Result<StatsReply, ClientError> {
        let inner = match &self.backend {
            Backend::Remote(r) => r,
            Backend::Ideal(i) => return Ok(i.store.stats()),
        };
        match self.call(inner, &Message::Stats, Opcode::StatsOk)? {
            Reply::Stats(s) => Ok(s),
            other => Err(self.unexpected(other)),
        }
    }

    /// Round-trips a ping; returns the time it took.
    pub fn ping(&self) -> Result<Duration, ClientError> {
        let t = Instant::now();
        let inner = match &self.backend {
            Backend::Remote(r) => r,
            Backend::Ideal(i) => {
                if let Some(at) = i.visible_at(HEADER_LEN + 8, HEADER_LEN + 8) {
                    wait_until(at);
                }
                return Ok(t.elapsed());
            }
        };
        let nonce = t.elapsed().as_nanos() as u64 ^ 0x5a5a_5a5a;
        match self.call(inner, &Message::Ping { nonce }, Opcode::Pong)? {
            Reply::Count(n) if n == nonce => Ok(t.elapsed()),
            Reply::Count(n) => Err(ClientError::ConnectionLost {
                addr: self.addr().to_string(),
                reason: format!("pong carried nonce {n}, expected {nonce}"),
            }),
            other => Err(self.unexpected(other)),
        }
    }

    /// Closes the connection; pending and later requests fail. (An ideal node
    /// has no connection: its pages live as long as its last client.)
    pub fn close(&self) {
        if let Some(r) = self.remote() {
            r.slots.fail("closed by the client".into());
            r.link.shutdown();
            // One-sided reads in flight fail at once, not at their deadline.
            #[cfg(feature = "rdma")]
            if let Some(reader) = r.rdma.get() {
                reader.fail("closed by the client".into());
            }
        }
    }

    fn unexpected(&self, r: Reply) -> ClientError {
        ClientError::ConnectionLost {
            addr: self.addr().to_string(),
            reason: format!("unexpected reply {r:?}"),
        }
    }

    /// Sends a small request encoded by `Message::encode` and waits for its reply.
    fn call(&self, inner: &Inner, msg: &Message<'_>, expect: Opcode) -> Result<Reply, ClientError> {
        let t = self.submit(
            inner,
            expect,
            0,
            |rid, buf| {
                msg.encode(rid, buf);
                0
            },
            &[],
        )?;
        self.finish(inner, t, |done| done.reply.take())
    }

    /// Takes a slot, encodes the frame head with `encode` (which returns how many bulk
    /// bytes follow in `bulk`), and sends head and bulk in one vectored write.
    fn submit(
        &self,
        inner: &Inner,
        expect: Opcode,
        count: usize,
        encode: impl FnOnce(u64, &mut Vec<u8>) -> usize,
        bulk: &[&[u8]],
    ) -> Result<slots::Ticket, ClientError> {
        let ticket = inner
            .slots
            .acquire(expect, count, &*inner.link, inner.shaper.as_ref())
            .map_err(|r| self.lost(r))?;
        let mut head = inner.send.lock().unwrap();
        head.clear();
        let bulk_len = encode(ticket.request_id(), &mut head);
        debug_assert_eq!(bulk_len, bulk.iter().map(|b| b.len()).sum::<usize>());
        if let Some(s) = &inner.shaper {
            inner
                .slots
                .set_send_delay(&ticket, s.on_send(head.len() + bulk_len));
        }
        let mut iov = [IoSlice::new(&[]); MAX_BATCH + 1];
        iov[0] = IoSlice::new(&head);
        for (i, b) in bulk.iter().enumerate() {
            iov[i + 1] = IoSlice::new(b);
        }
        let sent = inner.link.send_vectored(&mut iov[..bulk.len() + 1]);
        drop(head);
        if let Err(e) = sent {
            let reason = error_chain(&e);
            log::warn!("node {}: send failed: {reason}", self.addr());
            inner.slots.fail(reason.clone());
            inner.link.shutdown();
            inner.slots.release(ticket);
            return Err(self.lost(reason));
        }
        Ok(ticket)
    }

    /// Waits for `ticket`'s reply, hands it to `take`, and releases the slot.
    fn finish<T>(
        &self,
        inner: &Inner,
        ticket: slots::Ticket,
        take: impl FnOnce(&mut slots::Delivered<'_>) -> T,
    ) -> Result<T, ClientError> {
        let result = inner
            .slots
            .wait(&ticket, &*inner.link, inner.shaper.as_ref());
        let mut visible_at = None;
        let out = match result {
            Ok(mut done) => {
                visible_at = done.visible_at;
                let out = match done.reply {
                    Reply::Error(code, ref message) => Err(ClientError::Remote {
                        addr: self.addr().to_string(),
                        code,
                        message: message.clone(),
                    }),
                    _ => Ok(take(&mut done)),
                };
                drop(done); // never hold the slot while modelling the link's delay
                out
            }
            Err(reason) => Err(self.lost(reason)),
        };
        if let Some(at) = visible_at {
            wait_until(at);
        }
        inner.slots.release(ticket);
        out
    }

    fn lost(&self, reason: String) -> ClientError {
        ClientError::ConnectionLost {
            addr: self.addr().to_string(),
            reason,
        }
    }
}

fn check_batch(n: usize, max: usize) -> Result<(), ClientError> {
    if n == 0 || n > max {
        return Err(ClientError::InvalidRequest(format!(
            "batch of {n} pages (must be 1 to {max})"
        )));
    }
    Ok(())
}

/// Formats an error with its sources: `outer: inner: innermost`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
