//! The fabric wire protocol, version 1.
//!
//! Every message travels in one frame: a fixed 24-byte header followed by a payload.
//! All integers are little-endian.
//!
//! ```text
//! offset size field
//!  0     4    magic        0x46565053 ("SPVF" on the wire)
//!  4     2    version      PROTOCOL_VERSION
//!  6     1    opcode       see [`Opcode`]
//!  7     1    flags        0 (reserved)
//!  8     8    request id   chosen by the requester, echoed in the reply
//! 16     4    payload len  bytes after the header, at most the opcode's limit
//! 20     4    reserved     0
//! ```
//!
//! Request ids let many requests be in flight on one connection and replies arrive
//! in any order. A connection starts with `Hello` -> `HelloOk`, which fixes the
//! protocol version, the peer's role and the address space (VM id) the connection
//! acts on. Payload layouts are documented on each [`Message`] variant.
//!
//! Decoding never trusts a length: the header's payload length is checked against
//! the opcode's maximum before anything is read or allocated, and every count inside
//! a payload is checked against the payload's actual size.

mod error;
mod header;
mod message;

pub use error::{DecodeError, ErrorCode};
pub use header::{FrameHeader, Opcode};
pub(crate) use message::encode_read_pages;
pub use message::{
    GpnList, Message, RdmaEndpoint, ReadReplyBuilder, Role, StatsReply, decode_frame,
    encode_write_pages_head,
};

/// Frame magic, the bytes `SPVF` read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"SPVF");
/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 3;
/// Size of a guest page, the unit the memory protocol moves.
pub const PAGE_SIZE: usize = 4096;
/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 24;
/// Most pages one read, write or free frame may carry.
pub const MAX_BATCH: usize = 64;
/// Longest authentication proof a `Hello` may carry.
pub const MAX_AUTH_LEN: usize = 1024;
/// Longest message an `Error` reply may carry.
pub const MAX_ERROR_MESSAGE: usize = 1024;
/// Largest payload of any frame: a full write batch.
pub const MAX_PAYLOAD: usize = 8 + MAX_BATCH * (8 + PAGE_SIZE);
/// Largest frame, header included.
pub const MAX_FRAME: usize = HEADER_LEN + MAX_PAYLOAD;
