//! Message payloads: decoding (borrowing from the receive buffer, no allocation)
//! and encoding (appending to a reusable buffer).

use super::{
    DecodeError, ErrorCode, FrameHeader, HEADER_LEN, MAX_AUTH_LEN, MAX_BATCH, MAX_ERROR_MESSAGE,
    Opcode, PAGE_SIZE, PROTOCOL_VERSION,
};

/// The role a peer announces in its `Hello`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Role {
    /// A processor monitor (the VMM) reading and writing its guest's pages.
    Vmm = 1,
    /// A memory node.
    MemNode = 2,
    /// A storage node.
    StorageNode = 3,
    /// An administrative tool: may ask for statistics and ping, not move pages.
    Admin = 4,
}

impl Role {
    fn from_wire(v: u8) -> Result<Self, DecodeError> {
        Ok(match v {
            1 => Role::Vmm,
            2 => Role::MemNode,
            3 => Role::StorageNode,
            4 => Role::Admin,
            v => return Err(DecodeError::invalid("role", format!("unknown role {v}"))),
        })
    }
}

/// A list of guest page numbers, borrowed from a frame (8 bytes each, little-endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpnList<'a> {
    raw: &'a [u8],
}

impl<'a> GpnList<'a> {
    /// Number of page numbers.
    pub fn len(&self) -> usize {
        self.raw.len() / 8
    }

    /// True when the list is empty (never for a decoded request).
    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    /// The `i`-th page number.
    pub fn get(&self, i: usize) -> u64 {
        u64::from_le_bytes(self.raw[i * 8..i * 8 + 8].try_into().unwrap())
    }

    /// Iterates over the page numbers.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = u64> + Clone + 'a {
        self.raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
    }
}

/// Statistics a memory node reports: for the connection's VM and for the node.
///
/// On the wire: a field count (u32), 4 reserved bytes, then that many u64 fields in
/// the order below. A decoder reads the fields it knows and ignores the rest, so later
/// versions can append fields.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsReply {
    /// Pages stored for this connection's VM.
    pub vm_pages: u64,
    /// Page reads served to this VM.
    pub vm_reads: u64,
    /// Of those, reads of pages never written (answered as zero pages).
    pub vm_zero_reads: u64,
    /// Page writes accepted from this VM.
    pub vm_writes: u64,
    /// Pages freed by this VM.
    pub vm_frees: u64,
    /// Pages stored on the node, all VMs.
    pub node_pages: u64,
    /// The node's capacity in pages.
    pub node_capacity_pages: u64,
    /// VMs with pages on the node.
    pub node_vms: u64,
    /// Open connections.
    pub node_connections: u64,
    /// Requests answered with an error, all connections.
    pub node_errors: u64,
    /// Bytes of bookkeeping the store spends beyond the page data itself.
    pub node_overhead_bytes: u64,
    /// Most pages this connection's VM may store on the node (`memnode
    /// --vm-quota`); 0 when there is no per-VM quota.
    pub vm_quota_pages: u64,
}

impl StatsReply {
    const FIELDS: usize = 12;

    /// Pages this connection's VM may still store on the node: the node's free
    /// pages, bounded by what is left of the VM's quota.
    pub fn vm_room(&self) -> u64 {
        let free = self.node_capacity_pages.saturating_sub(self.node_pages);
        match self.vm_quota_pages {
            0 => free,
            q => free.min(q.saturating_sub(self.vm_pages)),
        }
    }

    fn to_array(self) -> [u64; Self::FIELDS] {
        [
            self.vm_pages,
            self.vm_reads,
            self.vm_zero_reads,
            self.vm_writes,
            self.vm_frees,
            self.node_pages,
            self.node_capacity_pages,
            self.node_vms,
            self.node_connections,
            self.node_errors,
            self.node_overhead_bytes,
            self.vm_quota_pages,
        ]
    }

    fn from_fields(f: &[u64]) -> Self {
        let g = |i: usize| f.get(i).copied().unwrap_or(0);
        StatsReply {
            vm_pages: g(0),
            vm_reads: g(1),
            vm_zero_reads: g(2),
            vm_writes: g(3),
            vm_frees: g(4),
            node_pages: g(5),
            node_capacity_pages: g(6),
            node_vms: g(7),
            node_connections: g(8),
            node_errors: g(9),
            node_overhead_bytes: g(10),
            vm_quota_pages: g(11),
        }
    }
}

/// One side of an RDMA reliable connection, exchanged over the authenticated
/// TCP connection (`RdmaConnect` / `RdmaConnectOk`). On the wire (32 bytes):
/// queue pair number u32, first packet sequence number u32, LID u16, 0 u16,
/// 0 u32, GID (16 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RdmaEndpoint {
    /// The queue pair number.
    pub qpn: u32,
    /// The first packet sequence number the peer sends with (24 bits).
    pub psn: u32,
    /// The port's LID (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// The port's GID (RoCE: an IPv6 or IPv4-mapped address).
    pub gid: [u8; 16],
}

impl RdmaEndpoint {
    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.qpn.to_le_bytes());
        out.extend_from_slice(&self.psn.to_le_bytes());
        out.extend_from_slice(&self.lid.to_le_bytes());
        out.extend_from_slice(&[0; 6]);
        out.extend_from_slice(&self.gid);
    }

    fn get(p: &[u8]) -> Result<Self, DecodeError> {
        if p[10..16].iter().any(|&b| b != 0) {
            return Err(DecodeError::invalid(
                "rdma endpoint",
                "reserved bytes are not zero",
            ));
        }
        let qpn = u32_at(p, 0);
        if qpn >= 1 << 24 {
            return Err(DecodeError::invalid(
                "rdma endpoint",
                format!("queue pair number {qpn:#x} has more than 24 bits"),
            ));
        }
        let psn = u32_at(p, 4);
        if psn >= 1 << 24 {
            return Err(DecodeError::invalid(
                "rdma endpoint",
                format!("packet sequence number {psn:#x} has more than 24 bits"),
            ));
        }
        Ok(RdmaEndpoint {
            qpn,
            psn,
            lid: u16_at(p, 8),
            gid: p[16..32].try_into().expect("16 bytes"),
        })
    }
}

/// Bytes in an encoded [`RdmaEndpoint`].
pub(crate) const ENDPOINT_PAYLOAD: usize = 32;

/// A decoded message, borrowing bulk data from the frame it came in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    /// Opens a connection. Payload: role u8, 0 u8, version u16, auth length u16, 0 u16,
    /// VM id u64, auth proof bytes.
    Hello {
        /// The sender's role.
        role: Role,
        /// The protocol version the sender speaks.
        version: u16,
        /// The address space (VM) this connection acts on.
        vm_id: u64,
        /// An authentication proof (empty until authentication is configured).
        auth: &'a [u8],
    },
    /// Accepts a connection. Payload: role u8, 0 u8, version u16, page size u32,
    /// max batch u32, 0 u32, capacity in pages u64, instance u64.
    HelloOk {
        /// The node's role.
        role: Role,
        /// The protocol version the connection uses.
        version: u16,
        /// The page size the node stores.
        page_size: u32,
        /// Most pages per batch the node accepts.
        max_batch: u32,
        /// The node's capacity in pages.
        capacity_pages: u64,
        /// A random number the node drew when it started: a node that comes
        /// back at the same address with another instance is a new, empty
        /// node.
        instance: u64,
    },
    /// The node's half of an authenticated handshake (see [`crate::auth`]).
    /// Payload: nonce (32 bytes), proof (32 bytes).
    Challenge {
        /// The node's fresh nonce.
        nonce: &'a [u8; 32],
        /// The node's proof of the cluster key.
        proof: &'a [u8; 32],
    },
    /// The client's half of the handshake. Payload: flags u8 (bit 0: cluster
    /// proof present, bit 1: VM proof present), 0 × 7, the cluster proof (32
    /// bytes), the VM's public key (32 bytes), the VM's signature (64 bytes);
    /// absent parts are zeros.
    Proof {
        /// The client's proof of the cluster key, if it holds one.
        proof: Option<&'a [u8; 32]>,
        /// The VM's public key and its signature of the handshake (a VMM's
        /// proof that it acts for the VM; see [`crate::auth`]).
        vm: Option<(&'a [u8; 32], &'a [u8; 64])>,
    },
    /// Reads pages. Payload: count u32, 0 u32, count page numbers u64.
    ReadPages {
        /// The pages, 1 to [`MAX_BATCH`].
        gpns: GpnList<'a>,
    },
    /// Pages read, in request order. Payload: count u32, 0 u32, count presence bytes
    /// (1: data follows, 0: never written, reads as zeros), then 4096 bytes for each
    /// present page.
    ReadPagesOk {
        /// One byte per requested page: 1 present, 0 zero page.
        present: &'a [u8],
        /// The present pages' data, back to back.
        data: &'a [u8],
    },
    /// Writes pages. Payload: count u32, 0 u32, count page numbers u64, count pages.
    WritePages {
        /// The pages, 1 to [`MAX_BATCH`].
        gpns: GpnList<'a>,
        /// Their contents, back to back.
        data: &'a [u8],
    },
    /// Pages written. Payload: count u32, 0 u32.
    WritePagesOk {
        /// Pages written.
        count: u32,
    },
    /// Frees pages (they read as zeros afterwards). Payload as `ReadPages`.
    FreePages {
        /// The pages, 1 to [`MAX_BATCH`].
        gpns: GpnList<'a>,
    },
    /// Pages freed. Payload: count u32 of pages that were stored, 0 u32.
    FreePagesOk {
        /// Pages that were stored and are now freed.
        count: u32,
    },
    /// Asks for statistics. Empty payload.
    Stats,
    /// Statistics, see [`StatsReply`].
    StatsOk(StatsReply),
    /// Liveness probe. Payload: nonce u64.
    Ping {
        /// Echoed in the `Pong`.
        nonce: u64,
    },
    /// Liveness reply. Payload: nonce u64.
    Pong {
        /// The `Ping`'s nonce.
        nonce: u64,
    },
    /// Asks a node serving RDMA to connect a reliable queue pair to the
    /// client's, in the connection's VM's protection domain. Payload: the
    /// client's [`RdmaEndpoint`].
    RdmaConnect {
        /// The client's queue pair.
        endpoint: RdmaEndpoint,
    },
    /// The node's queue pair, ready to answer RDMA READs. Payload: the node's
    /// [`RdmaEndpoint`], pages per region chunk u32, 0 u32.
    RdmaConnectOk {
        /// The node's queue pair.
        endpoint: RdmaEndpoint,
        /// Pages in each chunk of the VM's region (a power of two).
        chunk_pages: u32,
    },
    /// Asks where chunk `chunk` (pages `chunk * chunk_pages ..`) of the
    /// connection's VM lies in the node's registered memory. Payload: chunk u64.
    MapRegion {
        /// The chunk number.
        chunk: u64,
    },
    /// A chunk's place: page `g` of the chunk is at `addr + (g % chunk_pages) *
    /// 4096` under `rkey`. `len` 0: the VM never stored a page in the chunk
    /// (its pages read as zeros). Payload: chunk u64, addr u64, len u64, rkey
    /// u32, 0 u32.
    MapRegionOk {
        /// The chunk number asked for.
        chunk: u64,
        /// Its address in the node's registration.
        addr: u64,
        /// Its length in bytes (0: no such chunk yet).
        len: u64,
        /// The RDMA remote key.
        rkey: u32,
    },
    /// A request failed. Payload: code u16, 0 u16, message length u32, UTF-8 message.
    Error {
        /// What kind of failure.
        code: ErrorCode,
        /// A human-readable explanation.
        message: &'a str,
    },
}

fn need(what: &'static str, buf: &[u8], n: usize) -> Result<(), DecodeError> {
    if buf.len() < n {
        Err(DecodeError::Truncated {
            what,
            need: n,
            have: buf.len(),
        })
    } else {
        Ok(())
    }
}

/// Bytes in a `Proof` payload.
pub(crate) const PROOF_PAYLOAD: usize = 8 + 32 + 32 + 64;

fn exact(what: &'static str, buf: &[u8], n: usize) -> Result<(), DecodeError> {
    need(what, buf, n)?;
    if buf.len() > n {
        return Err(DecodeError::invalid(
            what,
            format!("{} trailing bytes", buf.len() - n),
        ));
    }
    Ok(())
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Reads a batch count from the first 4 bytes and checks it is 1..=MAX_BATCH.
fn batch_count(what: &'static str, p: &[u8]) -> Result<usize, DecodeError> {
    need(what, p, 8)?;
    let count = u32_at(p, 0) as usize;
    if count == 0 || count > MAX_BATCH {
        return Err(DecodeError::invalid(
            "page count",
            format!("{count} (must be 1 to {MAX_BATCH})"),
        ));
    }
    Ok(count)
}

fn decode_gpns<'a>(what: &'static str, p: &'a [u8]) -> Result<GpnList<'a>, DecodeError> {
    let count = batch_count(what, p)?;
    exact(what, p, 8 + 8 * count)?;
    Ok(GpnList { raw: &p[8..] })
}

impl<'a> Message<'a> {
    /// The opcode that carries this message.
    pub fn opcode(&self) -> Opcode {
        match self {
            Message::Hello { .. } => Opcode::Hello,
            Message::HelloOk { .. } => Opcode::HelloOk,
            Message::ReadPages { .. } => Opcode::ReadPages,
            Message::ReadPagesOk { .. } => Opcode::ReadPagesOk,
            Message::WritePages { .. } => Opcode::WritePages,
            Message::WritePagesOk { .. } => Opcode::WritePagesOk,
            Message::FreePages { .. } => Opcode::FreePages,
            Message::FreePagesOk { .. } => Opcode::FreePagesOk,
            Message::Stats => Opcode::Stats,
            Message::StatsOk(_) => Opcode::StatsOk,
            Message::Ping { .. } => Opcode::Ping,
            Message::Pong { .. } => Opcode::Pong,
            Message::Error { .. } => Opcode::Error,
            Message::Challenge { .. } => Opcode::Challenge,
            Message::Proof { .. } => Opcode::Proof,
            Message::RdmaConnect { .. } => Opcode::RdmaConnect,
            Message::RdmaConnectOk { .. } => Opcode::RdmaConnectOk,
            Message::MapRegion { .. } => Opcode::MapRegion,
            Message::MapRegionOk { .. } => Opcode::MapRegionOk,
        }
    }

    /// Decodes the payload of a frame whose header was already decoded.
    /// `payload` must be exactly `header.payload_len` bytes.
    pub fn decode(header: &FrameHeader, payload: &'a [u8]) -> Result<Self, DecodeError> {
        if payload.len() != header.payload_len {
            return Err(DecodeError::Truncated {
                what: "payload",
                need: header.payload_len,
                have: payload.len(),
            });
        }
        let p = payload;
        Ok(match header.opcode {
            Opcode::Hello => {
                need("hello", p, 16)?;
                let auth_len = u16_at(p, 4) as usize;
                if auth_len > MAX_AUTH_LEN {
                    return Err(DecodeError::invalid(
                        "auth length",
                        format!("{auth_len} (limit {MAX_AUTH_LEN})"),
                    ));
                }
                exact("hello", p, 16 + auth_len)?;
                Message::Hello {
                    role: Role::from_wire(p[0])?,
                    version: u16_at(p, 2),
                    vm_id: u64_at(p, 8),
                    auth: &p[16..],
                }
            }
            Opcode::HelloOk => {
                exact("hello reply", p, 32)?;
                Message::HelloOk {
                    role: Role::from_wire(p[0])?,
                    version: u16_at(p, 2),
                    page_size: u32_at(p, 4),
                    max_batch: u32_at(p, 8),
                    capacity_pages: u64_at(p, 16),
                    instance: u64_at(p, 24),
                }
            }
            Opcode::Challenge => {
                exact("challenge", p, 64)?;
                Message::Challenge {
                    nonce: p[..32].try_into().expect("32 bytes"),
                    proof: p[32..].try_into().expect("32 bytes"),
                }
            }
            Opcode::Proof => {
                exact("proof", p, PROOF_PAYLOAD)?;
                let flags = p[0];
                if flags & !3 != 0 || p[1..8].iter().any(|&b| b != 0) {
                    return Err(DecodeError::invalid(
                        "proof flags",
                        format!("{:02x?} (only bits 0 and 1 are defined)", &p[..8]),
                    ));
                }
                Message::Proof {
                    proof: (flags & 1 != 0).then(|| p[8..40].try_into().expect("32 bytes")),
                    vm: (flags & 2 != 0).then(|| {
                        (
                            p[40..72].try_into().expect("32 bytes"),
                            p[72..136].try_into().expect("64 bytes"),
                        )
                    }),
                }
            }
            Opcode::ReadPages => Message::ReadPages {
                gpns: decode_gpns("read request", p)?,
            },
            Opcode::FreePages => Message::FreePages {
                gpns: decode_gpns("free request", p)?,
            },
            Opcode::ReadPagesOk => {
                let count = batch_count("read reply", p)?;
                need("read reply", p, 8 + count)?;
                let present = &p[8..8 + count];
                let mut n_present = 0;
                for &b in present {
                    match b {
                        0 => {}
                        1 => n_present += 1,
                        b => {
                            return Err(DecodeError::invalid(
                                "presence byte",
                                format!("{b} (must be 0 or 1)"),
                            ));
                        }
                    }
                }
                exact("read reply", p, 8 + count + n_present * PAGE_SIZE)?;
                Message::ReadPagesOk {
                    present,
                    data: &p[8 + count..],
                }
            }
            Opcode::WritePages => {
                let count = batch_count("write request", p)?;
                exact("write request", p, 8 + count * (8 + PAGE_SIZE))?;
                Message::WritePages {
                    gpns: GpnList {
                        raw: &p[8..8 + 8 * count],
                    },
                    data: &p[8 + 8 * count..],
                }
            }
            Opcode::WritePagesOk => {
                exact("write reply", p, 8)?;
                Message::WritePagesOk {
                    count: u32_at(p, 0),
                }
            }
            Opcode::FreePagesOk => {
                exact("free reply", p, 8)?;
                Message::FreePagesOk {
                    count: u32_at(p, 0),
                }
            }
            Opcode::Stats => {
                exact("stats request", p, 0)?;
                Message::Stats
            }
            Opcode::StatsOk => {
                need("stats reply", p, 8)?;
                let n = u32_at(p, 0) as usize;
                if n > 64 {
                    return Err(DecodeError::invalid("stats field count", n.to_string()));
                }
                exact("stats reply", p, 8 + 8 * n)?;
                let mut fields = [0u64; 64];
                for (i, f) in fields.iter_mut().enumerate().take(n) {
                    *f = u64_at(p, 8 + 8 * i);
                }
                Message::StatsOk(StatsReply::from_fields(&fields[..n]))
            }
            Opcode::Ping => {
                exact("ping", p, 8)?;
                Message::Ping {
                    nonce: u64_at(p, 0),
                }
            }
            Opcode::Pong => {
                exact("pong", p, 8)?;
                Message::Pong {
                    nonce: u64_at(p, 0),
                }
            }
            Opcode::RdmaConnect => {
                exact("rdma connect", p, ENDPOINT_PAYLOAD)?;
                Message::RdmaConnect {
                    endpoint: RdmaEndpoint::get(p)?,
                }
            }
            Opcode::RdmaConnectOk => {
                exact("rdma connect reply", p, ENDPOINT_PAYLOAD + 8)?;
                let chunk_pages = u32_at(p, ENDPOINT_PAYLOAD);
                if !chunk_pages.is_power_of_two() || u32_at(p, ENDPOINT_PAYLOAD + 4) != 0 {
                    return Err(DecodeError::invalid(
                        "rdma connect reply",
                        format!("{chunk_pages} pages per chunk (must be a power of two)"),
                    ));
                }
                Message::RdmaConnectOk {
                    endpoint: RdmaEndpoint::get(p)?,
                    chunk_pages,
                }
            }
            Opcode::MapRegion => {
                exact("map region", p, 8)?;
                Message::MapRegion {
                    chunk: u64_at(p, 0),
                }
            }
            Opcode::MapRegionOk => {
                exact("map region reply", p, 32)?;
                if u32_at(p, 28) != 0 {
                    return Err(DecodeError::invalid(
                        "map region reply",
                        "reserved bytes are not zero",
                    ));
                }
                Message::MapRegionOk {
                    chunk: u64_at(p, 0),
                    addr: u64_at(p, 8),
                    len: u64_at(p, 16),
                    rkey: u32_at(p, 24),
                }
            }
            Opcode::Error => {
                need("error reply", p, 8)?;
                let len = u32_at(p, 4) as usize;
                if len > MAX_ERROR_MESSAGE {
                    return Err(DecodeError::invalid(
                        "error message length",
                        format!("{len} (limit {MAX_ERROR_MESSAGE})"),
                    ));
                }
                exact("error reply", p, 8 + len)?;
                let message = std::str::from_utf8(&p[8..])
                    .map_err(|e| DecodeError::invalid("error message", e.to_string()))?;
                Message::Error {
                    code: ErrorCode::from_wire(u16_at(p, 0)),
                    message,
                }
            }
        })
    }

    /// Appends the whole frame (header and payload) carrying this message to `out`.
    ///
    /// Panics if the message breaks the protocol's limits (a batch over [`MAX_BATCH`],
    /// data of the wrong length): those are bugs in the caller, never peer input.
    pub fn encode(&self, request_id: u64, out: &mut Vec<u8>) {
        let start = out.len();
        FrameHeader {
            opcode: self.opcode(),
            flags: 0,
            request_id,
            payload_len: 0,
        }
        .encode(out);
        let body = out.len();
        match self {
            Message::Hello {
                role,
                version,
                vm_id,
                auth,
            } => {
                assert!(auth.len() <= MAX_AUTH_LEN, "auth proof too long");
                out.extend_from_slice(&[*role as u8, 0]);
                out.extend_from_slice(&version.to_le_bytes());
                out.extend_from_slice(&(auth.len() as u16).to_le_bytes());
                out.extend_from_slice(&[0; 2]);
                out.extend_from_slice(&vm_id.to_le_bytes());
                out.extend_from_slice(auth);
            }
            Message::HelloOk {
                role,
                version,
                page_size,
                max_batch,
                capacity_pages,
                instance,
            } => {
                out.extend_from_slice(&[*role as u8, 0]);
                out.extend_from_slice(&version.to_le_bytes());
                out.extend_from_slice(&page_size.to_le_bytes());
                out.extend_from_slice(&max_batch.to_le_bytes());
                out.extend_from_slice(&[0; 4]);
                out.extend_from_slice(&capacity_pages.to_le_bytes());
                out.extend_from_slice(&instance.to_le_bytes());
            }
            Message::Challenge { nonce, proof } => {
                out.extend_from_slice(&nonce[..]);
                out.extend_from_slice(&proof[..]);
            }
            Message::Proof { proof, vm } => {
                let flags = u8::from(proof.is_some()) | (u8::from(vm.is_some()) << 1);
                out.extend_from_slice(&[flags, 0, 0, 0, 0, 0, 0, 0]);
                out.extend_from_slice(proof.map_or(&[0u8; 32][..], |p| &p[..]));
                match vm {
                    Some((key, sig)) => {
                        out.extend_from_slice(&key[..]);
                        out.extend_from_slice(&sig[..]);
                    }
                    None => out.extend_from_slice(&[0u8; 96]),
                }
            }
            Message::ReadPages { gpns } | Message::FreePages { gpns } => {
                put_count(out, gpns.len());
                out.extend_from_slice(gpns.raw);
            }
            Message::ReadPagesOk { present, data } => {
                put_count(out, present.len());
                out.extend_from_slice(present);
                let n = present.iter().filter(|&&b| b == 1).count();
                assert_eq!(data.len(), n * PAGE_SIZE, "read reply data length");
                out.extend_from_slice(data);
            }
            Message::WritePages { gpns, data } => {
                assert_eq!(data.len(), gpns.len() * PAGE_SIZE, "write data length");
                put_count(out, gpns.len());
                out.extend_from_slice(gpns.raw);
                out.extend_from_slice(data);
            }
            Message::WritePagesOk { count } | Message::FreePagesOk { count } => {
                out.extend_from_slice(&count.to_le_bytes());
                out.extend_from_slice(&[0; 4]);
            }
            Message::Stats => {}
            Message::StatsOk(s) => {
                out.extend_from_slice(&(StatsReply::FIELDS as u32).to_le_bytes());
                out.extend_from_slice(&[0; 4]);
                for f in s.to_array() {
                    out.extend_from_slice(&f.to_le_bytes());
                }
            }
            Message::Ping { nonce } | Message::Pong { nonce } => {
                out.extend_from_slice(&nonce.to_le_bytes());
            }
            Message::RdmaConnect { endpoint } => endpoint.put(out),
            Message::RdmaConnectOk {
                endpoint,
                chunk_pages,
            } => {
                endpoint.put(out);
                out.extend_from_slice(&chunk_pages.to_le_bytes());
                out.extend_from_slice(&[0; 4]);
            }
            Message::MapRegion { chunk } => out.extend_from_slice(&chunk.to_le_bytes()),
            Message::MapRegionOk {
                chunk,
                addr,
                len,
                rkey,
            } => {
                for v in [chunk, addr, len] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
                out.extend_from_slice(&rkey.to_le_bytes());
                out.extend_from_slice(&[0; 4]);
            }
            Message::Error { code, message } => {
                let msg = truncate_utf8(message, MAX_ERROR_MESSAGE);
                out.extend_from_slice(&code.to_wire().to_le_bytes());
                out.extend_from_slice(&[0; 2]);
                out.extend_from_slice(&(msg.len() as u32).to_le_bytes());
                out.extend_from_slice(msg.as_bytes());
            }
        }
        let len = out.len() - body;
        patch_len(out, start, len);
    }

    /// Builds a `Hello` for this build's protocol version.
    pub fn hello(role: Role, vm_id: u64, auth: &'a [u8]) -> Self {
        Message::Hello {
            role,
            version: PROTOCOL_VERSION,
            vm_id,
            auth,
        }
    }

    /// Builds a page-number list message from raw little-endian bytes; for tests and tools.
    pub fn gpn_list(raw: &'a [u8]) -> GpnList<'a> {
        assert!(raw.len() % 8 == 0 && raw.len() / 8 <= MAX_BATCH);
        GpnList { raw }
    }
}

fn put_count(out: &mut Vec<u8>, count: usize) {
    assert!(count > 0 && count <= MAX_BATCH, "batch of {count} pages");
    out.extend_from_slice(&(count as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
}

fn patch_len(out: &mut [u8], frame_start: usize, payload_len: usize) {
    out[frame_start + 16..frame_start + 20].copy_from_slice(&(payload_len as u32).to_le_bytes());
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Appends the header and page-number list of a `WritePages` frame whose page data
/// (`gpns.len()` pages) the caller sends right after it, e.g. as further `IoSlice`s of
/// one vectored write. This is how the client writes pages without copying them.
pub fn encode_write_pages_head(request_id: u64, gpns: &[u64], out: &mut Vec<u8>) {
    let start = out.len();
    FrameHeader {
        opcode: Opcode::WritePages,
        flags: 0,
        request_id,
        payload_len: 0,
    }
    .encode(out);
    put_count(out, gpns.len());
    for g in gpns {
        out.extend_from_slice(&g.to_le_bytes());
    }
    patch_len(out, start, 8 + gpns.len() * (8 + PAGE_SIZE));
}

/// Appends a `ReadPages` frame for `gpns` to `out`.
pub(crate) fn encode_read_pages(request_id: u64, gpns: &[u64], out: &mut Vec<u8>) {
    let start = out.len();
    FrameHeader {
        opcode: Opcode::ReadPages,
        flags: 0,
        request_id,
        payload_len: 0,
    }
    .encode(out);
    put_count(out, gpns.len());
    for g in gpns {
        out.extend_from_slice(&g.to_le_bytes());
    }
    patch_len(out, start, 8 + gpns.len() * 8);
}

/// Builds a `ReadPagesOk` frame in place: the server appends each page as it looks
/// it up, without knowing in advance which pages are present.
pub struct ReadReplyBuilder {
    frame_start: usize,
    count: usize,
    next: usize,
}

impl ReadReplyBuilder {
    /// Starts a reply to `count` pages at the end of `out`.
    pub fn begin(out: &mut Vec<u8>, request_id: u64, count: usize) -> Self {
        let frame_start = out.len();
        FrameHeader {
            opcode: Opcode::ReadPagesOk,
            flags: 0,
            request_id,
            payload_len: 0,
        }
        .encode(out);
        put_count(out, count);
        out.resize(out.len() + count, 0);
        ReadReplyBuilder {
            frame_start,
            count,
            next: 0,
        }
    }

    /// Marks the next page present and appends its data (4096 bytes).
    pub fn present(&mut self, out: &mut Vec<u8>, page: &[u8]) {
        assert!(self.next < self.count);
        assert_eq!(page.len(), PAGE_SIZE, "page data length");
        out[self.frame_start + HEADER_LEN + 8 + self.next] = 1;
        self.next += 1;
        out.extend_from_slice(page);
    }

    /// Marks the next page as never written (reads as zeros).
    pub fn zero(&mut self) {
        assert!(self.next < self.count);
        self.next += 1;
    }

    /// Finishes the frame; every page must have been marked.
    pub fn finish(self, out: &mut [u8]) {
        assert_eq!(self.next, self.count, "read reply not complete");
        let len = out.len() - self.frame_start - HEADER_LEN;
        patch_len(out, self.frame_start, len);
    }
}

/// Decodes the first frame in `buf`, if it is complete.
///
/// Returns `Ok(None)` when more bytes are needed, or the header, the message and the
/// number of bytes the frame occupies. An invalid header is reported as soon as its
/// 24 bytes are in, without waiting for the payload it announces.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(FrameHeader, Message<'_>, usize)>, DecodeError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let header = FrameHeader::decode(buf)?;
    let total = HEADER_LEN + header.payload_len;
    if buf.len() < total {
        return Ok(None);
    }
    let msg = Message::decode(&header, &buf[HEADER_LEN..total])?;
    Ok(Some((header, msg, total)))
}

#[cfg(test)]
mod tests;
