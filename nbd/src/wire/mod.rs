//! The NBD wire format, shared by the server (`storagenode::server`) and the client
//! ([`crate::client`]): magic numbers, flags, option and command codes, and the
//! fixed-layout messages of the fixed-newstyle handshake and the transmission phase
//! with simple replies, as specified in the NBD protocol document
//! (`doc/proto.md` of github.com/NetworkBlockDevice/nbd).
//!
//! Everything on the wire is big-endian. Decoders take a byte slice, check its
//! length and magic before trusting anything, and return a [`WireError`] naming
//! what was wrong; encoders append to a `Vec<u8>` or return a fixed-size array.
//! Structured replies and extended headers are not implemented: the server refuses
//! `NBD_OPT_STRUCTURED_REPLY`, which the protocol allows, and the client never asks.

use std::fmt;

mod handshake;
#[cfg(test)]
mod tests;

pub use handshake::{
    Info, InfoRequest, OptionHeader, OptionReplyHeader, decode_export_name_reply, decode_greeting,
    decode_rep_server, encode_export_name_reply, encode_greeting, encode_option,
    encode_option_reply, encode_rep_server,
};

/// `NBDMAGIC`: the first 8 bytes a server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle greeting's second magic, and every option's magic.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The oldstyle greeting's second magic (`cliserv_magic`); not supported.
pub const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk (never negotiated here).
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Bytes of the server's greeting: magic, `IHAVEOPT`, 16-bit handshake flags.
pub const GREETING_LEN: usize = 18;
/// Bytes of an option request header: `IHAVEOPT`, option, data length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Bytes of an option reply header: magic, option, reply type, data length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Bytes of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Bytes of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Bytes of the reply to `NBD_OPT_EXPORT_NAME` before the optional zero padding.
pub const EXPORT_NAME_REPLY_LEN: usize = 10;
/// The zero padding after that reply unless `NO_ZEROES` was negotiated.
pub const EXPORT_NAME_PADDING: usize = 124;

/// The longest string (export name, message) the protocol allows.
pub const MAX_STRING: usize = 4096;
/// The largest read or write payload either side accepts: the protocol's 32 MiB
/// interoperability limit, which the server also advertises as its maximum block size.
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// Handshake flags (server, 16 bits).
pub mod handshake_flags {
    /// The server speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// The server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags (32 bits, the client's answer to the greeting).
pub mod client_flags {
    /// The client speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    /// The client wants no zero padding after `NBD_OPT_EXPORT_NAME`.
    pub const NO_ZEROES: u32 = 1 << 1;
    /// Every flag defined.
    pub const KNOWN: u32 = FIXED_NEWSTYLE | NO_ZEROES;
}

/// Transmission flags: what an export supports (16 bits).
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct TransmissionFlags(pub u16);

impl TransmissionFlags {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// The export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_CMD_FLUSH` is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_FUA` is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// The medium is rotational (a hint).
    pub const ROTATIONAL: u16 = 1 << 4;
    /// `NBD_CMD_TRIM` is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_CMD_WRITE_ZEROES` is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_CMD_FLAG_DF` is supported (structured replies only).
    pub const SEND_DF: u16 = 1 << 7;
    /// Flush and FUA take effect across every connection to the export.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `NBD_CMD_RESIZE` is supported.
    pub const SEND_RESIZE: u16 = 1 << 9;
    /// `NBD_CMD_CACHE` is supported.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// `NBD_CMD_FLAG_FAST_ZERO` is supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;

    const NAMES: [&'static str; 12] = [
        "HAS_FLAGS",
        "READ_ONLY",
        "SEND_FLUSH",
        "SEND_FUA",
        "ROTATIONAL",
        "SEND_TRIM",
        "SEND_WRITE_ZEROES",
        "SEND_DF",
        "CAN_MULTI_CONN",
        "SEND_RESIZE",
        "SEND_CACHE",
        "SEND_FAST_ZERO",
    ];

    /// Whether every bit of `flag` is set.
    pub fn has(self, flag: u16) -> bool {
        self.0 & flag == flag
    }
}

impl fmt::Debug for TransmissionFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for bit in 0..16 {
            if self.0 & (1 << bit) == 0 {
                continue;
            }
            if !first {
                f.write_str("|")?;
            }
            first = false;
            match Self::NAMES.get(bit) {
                Some(n) => f.write_str(n)?,
                None => write!(f, "BIT{bit}")?,
            }
        }
        if first {
            f.write_str("0")?;
        }
        Ok(())
    }
}

macro_rules! code_type {
    ($(#[$m:meta])* $name:ident($ty:ty) { $($(#[$cm:meta])* $c:ident = $v:expr => $s:literal,)* }) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $name(pub $ty);

        impl $name {
            $($(#[$cm])* pub const $c: $name = $name($v);)*

            /// The protocol's name for this value, if it has one.
            pub fn name(self) -> Option<&'static str> {
                match self.0 {
                    $(v if v == $v => Some($s),)*
                    _ => None,
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self.name() {
                    Some(n) => f.write_str(n),
                    None => write!(f, "{}({})", stringify!($name), self.0),
                }
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }
    };
}

code_type! {
    /// A handshake option (`NBD_OPT_*`).
    Opt(u32) {
        /// Choose an export and enter transmission; cannot report errors.
        EXPORT_NAME = 1 => "NBD_OPT_EXPORT_NAME",
        /// End the handshake without transmission.
        ABORT = 2 => "NBD_OPT_ABORT",
        /// List the exports.
        LIST = 3 => "NBD_OPT_LIST",
        /// Withdrawn.
        PEEK_EXPORT = 4 => "NBD_OPT_PEEK_EXPORT",
        /// Upgrade to TLS.
        STARTTLS = 5 => "NBD_OPT_STARTTLS",
        /// Describe an export.
        INFO = 6 => "NBD_OPT_INFO",
        /// Describe an export and enter transmission.
        GO = 7 => "NBD_OPT_GO",
        /// Use structured replies.
        STRUCTURED_REPLY = 8 => "NBD_OPT_STRUCTURED_REPLY",
        /// List metadata contexts.
        LIST_META_CONTEXT = 9 => "NBD_OPT_LIST_META_CONTEXT",
        /// Select metadata contexts.
        SET_META_CONTEXT = 10 => "NBD_OPT_SET_META_CONTEXT",
        /// Use 64-bit extended headers.
        EXTENDED_HEADERS = 11 => "NBD_OPT_EXTENDED_HEADERS",
    }
}

code_type! {
    /// An option reply type (`NBD_REP_*`); errors have bit 31 set.
    Rep(u32) {
        /// The option succeeded (or a list ended).
        ACK = 1 => "NBD_REP_ACK",
        /// One export of a list.
        SERVER = 2 => "NBD_REP_SERVER",
        /// One piece of information about an export.
        INFO = 3 => "NBD_REP_INFO",
        /// One metadata context.
        META_CONTEXT = 4 => "NBD_REP_META_CONTEXT",
        /// Unknown option.
        ERR_UNSUP = (1 << 31) + 1 => "NBD_REP_ERR_UNSUP",
        /// Forbidden by policy.
        ERR_POLICY = (1 << 31) + 2 => "NBD_REP_ERR_POLICY",
        /// Malformed option.
        ERR_INVALID = (1 << 31) + 3 => "NBD_REP_ERR_INVALID",
        /// Not supported on this platform.
        ERR_PLATFORM = (1 << 31) + 4 => "NBD_REP_ERR_PLATFORM",
        /// TLS required.
        ERR_TLS_REQD = (1 << 31) + 5 => "NBD_REP_ERR_TLS_REQD",
        /// No such export.
        ERR_UNKNOWN = (1 << 31) + 6 => "NBD_REP_ERR_UNKNOWN",
        /// The server is shutting down.
        ERR_SHUTDOWN = (1 << 31) + 7 => "NBD_REP_ERR_SHUTDOWN",
        /// The client must ask for block sizes.
        ERR_BLOCK_SIZE_REQD = (1 << 31) + 8 => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        /// Request or reply too large.
        ERR_TOO_BIG = (1 << 31) + 9 => "NBD_REP_ERR_TOO_BIG",
        /// Extended headers required.
        ERR_EXT_HEADER_REQD = (1 << 31) + 10 => "NBD_REP_ERR_EXT_HEADER_REQD",
    }
}

impl Rep {
    /// Whether this is an error reply (bit 31).
    pub fn is_error(self) -> bool {
        self.0 & (1 << 31) != 0
    }
}

code_type! {
    /// A transmission command (`NBD_CMD_*`).
    Cmd(u16) {
        /// Read `length` bytes at `offset`.
        READ = 0 => "NBD_CMD_READ",
        /// Write the payload at `offset`.
        WRITE = 1 => "NBD_CMD_WRITE",
        /// Disconnect after the outstanding requests.
        DISC = 2 => "NBD_CMD_DISC",
        /// Make completed writes durable.
        FLUSH = 3 => "NBD_CMD_FLUSH",
        /// Discard a range (a hint).
        TRIM = 4 => "NBD_CMD_TRIM",
        /// Prefetch a range.
        CACHE = 5 => "NBD_CMD_CACHE",
        /// Zero a range.
        WRITE_ZEROES = 6 => "NBD_CMD_WRITE_ZEROES",
        /// Query metadata (structured replies only).
        BLOCK_STATUS = 7 => "NBD_CMD_BLOCK_STATUS",
        /// Resize the export.
        RESIZE = 8 => "NBD_CMD_RESIZE",
    }
}

/// Command flags (16 bits).
pub mod cmd_flags {
    /// Force unit access: reply only once the command's writes are durable.
    pub const FUA: u16 = 1 << 0;
    /// `WRITE_ZEROES`: leave the range allocated (no hole).
    pub const NO_HOLE: u16 = 1 << 1;
    /// `READ`: one content chunk (structured replies only).
    pub const DF: u16 = 1 << 2;
    /// `BLOCK_STATUS`: one extent.
    pub const REQ_ONE: u16 = 1 << 3;
    /// `WRITE_ZEROES`: fail rather than be slow.
    pub const FAST_ZERO: u16 = 1 << 4;
}

code_type! {
    /// An error value in a reply (`NBD_E*`, numbered like Linux errno).
    Errno(u32) {
        /// Operation not permitted (a write to a read-only export).
        EPERM = 1 => "EPERM",
        /// Input/output error.
        EIO = 5 => "EIO",
        /// Cannot allocate memory.
        ENOMEM = 12 => "ENOMEM",
        /// Invalid argument (bad range, flag or command).
        EINVAL = 22 => "EINVAL",
        /// No space left (or a write beyond the end of the export).
        ENOSPC = 28 => "ENOSPC",
        /// Value too large.
        EOVERFLOW = 75 => "EOVERFLOW",
        /// Not supported.
        ENOTSUP = 95 => "ENOTSUP",
        /// The server is shutting down.
        ESHUTDOWN = 108 => "ESHUTDOWN",
    }
}

impl Errno {
    /// The NBD error for a failed system call, as the protocol asks: `EDQUOT` and
    /// `EFBIG` become `ENOSPC`, permission errors `EPERM`, anything unlisted `EIO`.
    pub fn from_io(e: &std::io::Error) -> Errno {
        match e.raw_os_error() {
            Some(libc::EPERM | libc::EACCES | libc::EROFS) => Errno::EPERM,
            Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => Errno::ENOSPC,
            Some(libc::EINVAL) => Errno::EINVAL,
            Some(libc::ENOMEM) => Errno::ENOMEM,
            Some(libc::EOVERFLOW) => Errno::EOVERFLOW,
            Some(libc::EOPNOTSUPP) => Errno::ENOTSUP,
            _ => Errno::EIO,
        }
    }
}

/// Information types of `NBD_REP_INFO` (`NBD_INFO_*`).
pub mod info_type {
    /// Size and transmission flags (mandatory).
    pub const EXPORT: u16 = 0;
    /// Canonical name.
    pub const NAME: u16 = 1;
    /// Human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// Block size constraints.
    pub const BLOCK_SIZE: u16 = 3;
}

/// A message that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Fewer bytes than the message needs.
    #[error("{what} needs {need} bytes, got {have}")]
    Truncated {
        /// The message.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes given.
        have: usize,
    },
    /// A magic number is wrong: the peer does not speak NBD (or lost sync).
    #[error("bad {what} magic {found:#x}")]
    BadMagic {
        /// Which magic.
        what: &'static str,
        /// What was there.
        found: u64,
    },
    /// The server offered the oldstyle handshake, which is not supported.
    #[error("the server speaks the oldstyle handshake, which is not supported")]
    Oldstyle,
    /// A structured reply arrived although none was negotiated.
    #[error("structured reply received, but structured replies were not negotiated")]
    UnexpectedStructuredReply,
    /// A length field disagrees with the data around it.
    #[error("{what}: {detail}")]
    BadLength {
        /// The message.
        what: &'static str,
        /// What disagrees.
        detail: String,
    },
    /// A string is longer than the protocol's 4096 bytes.
    #[error("{what} is {len} bytes, more than {MAX_STRING}")]
    StringTooLong {
        /// The string.
        what: &'static str,
        /// Its length.
        len: usize,
    },
    /// A string is not UTF-8 or contains NUL.
    #[error("{what} is not a valid NBD string (UTF-8 without NUL)")]
    BadString {
        /// The string.
        what: &'static str,
    },
}

fn need(what: &'static str, buf: &[u8], n: usize) -> Result<(), WireError> {
    if buf.len() < n {
        return Err(WireError::Truncated {
            what,
            need: n,
            have: buf.len(),
        });
    }
    Ok(())
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

/// Checks that `bytes` is a protocol string: at most 4096 bytes of UTF-8, no NUL.
pub fn check_string<'a>(what: &'static str, bytes: &'a [u8]) -> Result<&'a str, WireError> {
    if bytes.len() > MAX_STRING {
        return Err(WireError::StringTooLong {
            what,
            len: bytes.len(),
        });
    }
    match std::str::from_utf8(bytes) {
        Ok(s) if !s.contains('\0') => Ok(s),
        _ => Err(WireError::BadString { what }),
    }
}

/// A transmission request header (a `WRITE`'s payload follows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags ([`cmd_flags`]).
    pub flags: u16,
    /// The command.
    pub cmd: Cmd,
    /// The client's handle (cookie), echoed in the reply.
    pub handle: u64,
    /// Byte offset in the export.
    pub offset: u64,
    /// Byte length.
    pub len: u32,
}

impl Request {
    /// The 28 header bytes.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.cmd.0.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    /// Decodes a header, checking its magic.
    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        need("request", b, REQUEST_LEN)?;
        let magic = be32(b);
        if magic != REQUEST_MAGIC {
            return Err(WireError::BadMagic {
                what: "request",
                found: magic as u64,
            });
        }
        Ok(Request {
            flags: be16(&b[4..]),
            cmd: Cmd(be16(&b[6..])),
            handle: be64(&b[8..]),
            offset: be64(&b[16..]),
            len: be32(&b[24..]),
        })
    }
}

/// A simple reply header (a successful `READ`'s data follows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    /// 0 for success, else an [`Errno`] value.
    pub error: u32,
    /// The request's handle.
    pub handle: u64,
}

impl SimpleReply {
    /// The 16 header bytes.
    pub fn encode(&self) -> [u8; SIMPLE_REPLY_LEN] {
        let mut b = [0u8; SIMPLE_REPLY_LEN];
        b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.error.to_be_bytes());
        b[8..].copy_from_slice(&self.handle.to_be_bytes());
        b
    }

    /// Decodes a header, checking its magic.
    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        need("reply", b, SIMPLE_REPLY_LEN)?;
        match be32(b) {
            SIMPLE_REPLY_MAGIC => Ok(SimpleReply {
                error: be32(&b[4..]),
                handle: be64(&b[8..]),
            }),
            STRUCTURED_REPLY_MAGIC => Err(WireError::UnexpectedStructuredReply),
            other => Err(WireError::BadMagic {
                what: "reply",
                found: other as u64,
            }),
        }
    }
}
