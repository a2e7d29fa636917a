//! The fixed frame header and the opcodes.

use super::{
    DecodeError, HEADER_LEN, MAGIC, MAX_AUTH_LEN, MAX_BATCH, MAX_ERROR_MESSAGE, PAGE_SIZE,
    PROTOCOL_VERSION,
};

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    /// Handshake request.
    Hello = 1,
    /// Handshake accepted.
    HelloOk = 2,
    /// Read a batch of pages.
    ReadPages = 3,
    /// Pages read.
    ReadPagesOk = 4,
    /// Write a batch of pages.
    WritePages = 5,
    /// Pages written.
    WritePagesOk = 6,
    /// Free a batch of pages.
    FreePages = 7,
    /// Pages freed.
    FreePagesOk = 8,
    /// Ask for statistics.
    Stats = 9,
    /// Statistics.
    StatsOk = 10,
    /// Liveness probe.
    Ping = 11,
    /// Liveness reply.
    Pong = 12,
    /// A request failed.
    Error = 13,
    /// The node's answer to an authenticated hello: its nonce and proof.
    Challenge = 14,
    /// The client's proof of the cluster key.
    Proof = 15,
    /// Connect an RDMA queue pair for one-sided page reads (`rdma://` nodes).
    RdmaConnect = 16,
    /// The node's queue pair, connected.
    RdmaConnectOk = 17,
    /// Where a chunk of the VM's page region lies in the node's registered memory.
    MapRegion = 18,
    /// A chunk's remote address and key (or that it has none yet).
    MapRegionOk = 19,
}

impl Opcode {
    /// The opcode for a wire value.
    pub fn from_wire(v: u8) -> Result<Self, DecodeError> {
        Ok(match v {
            1 => Opcode::Hello,
            2 => Opcode::HelloOk,
            3 => Opcode::ReadPages,
            4 => Opcode::ReadPagesOk,
            5 => Opcode::WritePages,
            6 => Opcode::WritePagesOk,
            7 => Opcode::FreePages,
            8 => Opcode::FreePagesOk,
            9 => Opcode::Stats,
            10 => Opcode::StatsOk,
            11 => Opcode::Ping,
            12 => Opcode::Pong,
            13 => Opcode::Error,
            14 => Opcode::Challenge,
            15 => Opcode::Proof,
            16 => Opcode::RdmaConnect,
            17 => Opcode::RdmaConnectOk,
            18 => Opcode::MapRegion,
            19 => Opcode::MapRegionOk,
            v => return Err(DecodeError::UnknownOpcode(v)),
        })
    }

    /// The largest payload a frame with this opcode may declare.
    pub fn max_payload(self) -> usize {
        match self {
            Opcode::Hello => 16 + MAX_AUTH_LEN,
            Opcode::HelloOk => 32,
            Opcode::ReadPages | Opcode::FreePages => 8 + 8 * MAX_BATCH,
            Opcode::ReadPagesOk => 8 + MAX_BATCH + MAX_BATCH * PAGE_SIZE,
            Opcode::WritePages => 8 + MAX_BATCH * (8 + PAGE_SIZE),
            Opcode::WritePagesOk | Opcode::FreePagesOk => 8,
            Opcode::Stats => 0,
            // Room for fields that later versions append.
            Opcode::StatsOk => 8 + 8 * 64,
            Opcode::Ping | Opcode::Pong => 8,
            Opcode::Error => 8 + MAX_ERROR_MESSAGE,
            Opcode::Challenge => 64,
            Opcode::Proof => super::message::PROOF_PAYLOAD,
            Opcode::RdmaConnect => super::message::ENDPOINT_PAYLOAD,
            Opcode::RdmaConnectOk => super::message::ENDPOINT_PAYLOAD + 8,
            Opcode::MapRegion => 8,
            Opcode::MapRegionOk => 32,
        }
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// What the frame carries.
    pub opcode: Opcode,
    /// Reserved flags (0 in version 1).
    pub flags: u8,
    /// The request id; a reply carries its request's id.
    pub request_id: u64,
    /// Bytes of payload after the header.
    pub payload_len: usize,
}

impl FrameHeader {
    /// Decodes and validates a header from the first [`HEADER_LEN`] bytes of `buf`.
    ///
    /// Checks the magic, the version, the opcode and the payload length limit, so a
    /// caller may size its read from `payload_len` without trusting the peer.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        if buf.len() < HEADER_LEN {
            return Err(DecodeError::Truncated {
                what: "frame header",
                need: HEADER_LEN,
                have: buf.len(),
            });
        }
        let magic = u32::from_le_bytes(buf[0..4].try_into().unwrap());
        if magic != MAGIC {
            return Err(DecodeError::BadMagic { found: magic });
        }
        let version = u16::from_le_bytes(buf[4..6].try_into().unwrap());
        if version != PROTOCOL_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                found: version,
                supported: PROTOCOL_VERSION,
            });
        }
        let opcode = Opcode::from_wire(buf[6])?;
        let flags = buf[7];
        if flags != 0 {
            return Err(DecodeError::invalid(
                "flags",
                format!("{flags:#x} set, none defined"),
            ));
        }
        let request_id = u64::from_le_bytes(buf[8..16].try_into().unwrap());
        let payload_len = u32::from_le_bytes(buf[16..20].try_into().unwrap()) as usize;
        if payload_len > opcode.max_payload() {
            return Err(DecodeError::Oversized {
                opcode,
                len: payload_len,
                max: opcode.max_payload(),
            });
        }
        if buf[20..24] != [0; 4] {
            return Err(DecodeError::invalid(
                "header",
                "reserved bytes are not zero",
            ));
        }
        Ok(FrameHeader {
            opcode,
            flags,
            request_id,
            payload_len,
        })
    }

    /// Appends the encoded header to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        debug_assert!(self.payload_len <= self.opcode.max_payload());
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        out.push(self.opcode as u8);
        out.push(self.flags);
        out.extend_from_slice(&self.request_id.to_le_bytes());
        out.extend_from_slice(&(self.payload_len as u32).to_le_bytes());
        out.extend_from_slice(&[0; 4]);
    }
}
