//! Decode errors and the error codes carried by `Error` replies.

/// Why a frame could not be decoded. Every variant is a protocol violation by the peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The frame does not start with the protocol magic.
    #[error("bad magic {found:#010x} (not a Splitvisor fabric frame)")]
    BadMagic {
        /// The four bytes found, as a little-endian u32.
        found: u32,
    },
    /// The peer speaks a protocol version this build does not.
    #[error("unsupported protocol version {found} (this build speaks {supported})")]
    UnsupportedVersion {
        /// Version in the frame.
        found: u16,
        /// Version this build speaks.
        supported: u16,
    },
    /// The opcode is not one this version defines.
    #[error("unknown opcode {0}")]
    UnknownOpcode(u8),
    /// The payload length exceeds what the opcode allows.
    #[error("payload of {len} bytes is too large for {opcode:?} (limit {max})")]
    Oversized {
        /// The opcode.
        opcode: super::Opcode,
        /// Declared payload length.
        len: usize,
        /// The opcode's limit.
        max: usize,
    },
    /// Fewer bytes than the structure needs.
    #[error("truncated {what}: need {need} bytes, have {have}")]
    Truncated {
        /// What was being decoded.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// A field has a value the protocol does not allow.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

impl DecodeError {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        DecodeError::Invalid {
            field,
            reason: reason.into(),
        }
    }
}

/// The error code carried in an `Error` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The request frame was malformed; the connection is closed after this reply.
    Malformed,
    /// The peer asked for a protocol version this node does not speak.
    UnsupportedVersion,
    /// A request arrived before a successful `Hello`, or a second `Hello` arrived.
    HandshakeRequired,
    /// The authentication proof was refused.
    AuthFailed,
    /// The node has no room for the pages of a write.
    OutOfCapacity,
    /// The request is well-formed but not valid here (for example a role that cannot use it).
    BadRequest,
    /// The node is shutting down.
    ShuttingDown,
    /// The node failed internally.
    Internal,
    /// A code this build does not know (sent by a newer peer).
    Other(u16),
}

impl ErrorCode {
    /// The code's wire value.
    pub fn to_wire(self) -> u16 {
        match self {
            ErrorCode::Malformed => 1,
            ErrorCode::UnsupportedVersion => 2,
            ErrorCode::HandshakeRequired => 3,
            ErrorCode::AuthFailed => 4,
            ErrorCode::OutOfCapacity => 5,
            ErrorCode::BadRequest => 6,
            ErrorCode::ShuttingDown => 7,
            ErrorCode::Internal => 8,
            ErrorCode::Other(v) => v,
        }
    }

    /// The code for a wire value; unknown values become [`ErrorCode::Other`].
    pub fn from_wire(v: u16) -> Self {
        match v {
            1 => ErrorCode::Malformed,
            2 => ErrorCode::UnsupportedVersion,
            3 => ErrorCode::HandshakeRequired,
            4 => ErrorCode::AuthFailed,
            5 => ErrorCode::OutOfCapacity,
            6 => ErrorCode::BadRequest,
            7 => ErrorCode::ShuttingDown,
            8 => ErrorCode::Internal,
            v => ErrorCode::Other(v),
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            ErrorCode::Malformed => "malformed request",
            ErrorCode::UnsupportedVersion => "unsupported version",
            ErrorCode::HandshakeRequired => "handshake required",
            ErrorCode::AuthFailed => "authentication failed",
            ErrorCode::OutOfCapacity => "out of capacity",
            ErrorCode::BadRequest => "bad request",
            ErrorCode::ShuttingDown => "shutting down",
            ErrorCode::Internal => "internal error",
            ErrorCode::Other(v) => return write!(f, "error code {v}"),
        };
        f.write_str(name)
    }
}
