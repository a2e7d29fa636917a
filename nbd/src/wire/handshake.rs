//! Handshake messages: the greeting, option requests and replies, and their data.

use super::{
    CLISERV_MAGIC, EXPORT_NAME_PADDING, EXPORT_NAME_REPLY_LEN, GREETING_LEN, IHAVEOPT, NBD_MAGIC,
    OPTION_HEADER_LEN, OPTION_REPLY_HEADER_LEN, OPTION_REPLY_MAGIC, Opt, Rep, TransmissionFlags,
    WireError, be16, be32, be64, check_string, info_type, need,
};
/// The server's greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn encode_greeting(flags: u16) -> [u8; GREETING_LEN] {
    let mut b = [0u8; GREETING_LEN];
    b[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&flags.to_be_bytes());
    b
}

/// Decodes the server's greeting; returns its handshake flags.
pub fn decode_greeting(b: &[u8]) -> Result<u16, WireError> {
    need("greeting", b, 16)?;
    if be64(b) != NBD_MAGIC {
        return Err(WireError::BadMagic {
            what: "greeting",
            found: be64(b),
        });
    }
    match be64(&b[8..]) {
        IHAVEOPT => {}
        CLISERV_MAGIC => return Err(WireError::Oldstyle),
        other => {
            return Err(WireError::BadMagic {
                what: "newstyle greeting",
                found: other,
            });
        }
    }
    need("greeting", b, GREETING_LEN)?;
    Ok(be16(&b[16..]))
}

/// An option request header; `len` bytes of option data follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option.
    pub option: Opt,
    /// Bytes of option data that follow.
    pub len: u32,
}

impl OptionHeader {
    /// The 16 header bytes.
    pub fn encode(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut b = [0u8; OPTION_HEADER_LEN];
        b[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.0.to_be_bytes());
        b[12..].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    /// Decodes a header, checking its magic.
    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        need("option header", b, OPTION_HEADER_LEN)?;
        if be64(b) != IHAVEOPT {
            return Err(WireError::BadMagic {
                what: "option",
                found: be64(b),
            });
        }
        Ok(OptionHeader {
            option: Opt(be32(&b[8..])),
            len: be32(&b[12..]),
        })
    }
}

/// Appends an option request (header and data) to `out`.
pub fn encode_option(out: &mut Vec<u8>, option: Opt, data: &[u8]) {
    out.extend_from_slice(
        &OptionHeader {
            option,
            len: data.len() as u32,
        }
        .encode(),
    );
    out.extend_from_slice(data);
}

/// An option reply header; `len` bytes of reply data follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option this answers.
    pub option: Opt,
    /// The reply type.
    pub reply: Rep,
    /// Bytes of reply data that follow.
    pub len: u32,
}

impl OptionReplyHeader {
    /// The 20 header bytes.
    pub fn encode(&self) -> [u8; OPTION_REPLY_HEADER_LEN] {
        let mut b = [0u8; OPTION_REPLY_HEADER_LEN];
        b[..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.0.to_be_bytes());
        b[12..16].copy_from_slice(&self.reply.0.to_be_bytes());
        b[16..].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    /// Decodes a header, checking its magic.
    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        need("option reply header", b, OPTION_REPLY_HEADER_LEN)?;
        if be64(b) != OPTION_REPLY_MAGIC {
            return Err(WireError::BadMagic {
                what: "option reply",
                found: be64(b),
            });
        }
        Ok(OptionReplyHeader {
            option: Opt(be32(&b[8..])),
            reply: Rep(be32(&b[12..])),
            len: be32(&b[16..]),
        })
    }
}

/// Appends an option reply (header and data) to `out`.
pub fn encode_option_reply(out: &mut Vec<u8>, option: Opt, reply: Rep, data: &[u8]) {
    out.extend_from_slice(
        &OptionReplyHeader {
            option,
            reply,
            len: data.len() as u32,
        }
        .encode(),
    );
    out.extend_from_slice(data);
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`: an export name and the
/// information types asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    /// The export's name (empty: the default export).
    pub name: &'a str,
    /// The `NBD_INFO_*` types asked for.
    pub requests: Vec<u16>,
}

impl<'a> InfoRequest<'a> {
    /// Appends the option data.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.name.len() as u32).to_be_bytes());
        out.extend_from_slice(self.name.as_bytes());
        out.extend_from_slice(&(self.requests.len() as u16).to_be_bytes());
        for r in &self.requests {
            out.extend_from_slice(&r.to_be_bytes());
        }
    }

    /// Decodes the option data; every length must agree with `data.len()`.
    pub fn decode(data: &'a [u8]) -> Result<Self, WireError> {
        const WHAT: &str = "NBD_OPT_INFO/GO data";
        need(WHAT, data, 6)?;
        let name_len = be32(data) as usize;
        if name_len > data.len() - 6 {
            return Err(WireError::BadLength {
                what: WHAT,
                detail: format!(
                    "name length {name_len} exceeds the option's {} bytes",
                    data.len()
                ),
            });
        }
        let name = check_string("export name", &data[4..4 + name_len])?;
        let rest = &data[4 + name_len..];
        let n = be16(rest) as usize;
        if rest.len() - 2 != 2 * n {
            return Err(WireError::BadLength {
                what: WHAT,
                detail: format!(
                    "{n} information requests need {} bytes, {} left",
                    2 * n,
                    rest.len() - 2
                ),
            });
        }
        let requests = rest[2..].chunks_exact(2).map(be16).collect();
        Ok(InfoRequest { name, requests })
    }
}

/// One `NBD_REP_INFO` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    /// `NBD_INFO_EXPORT`: size and flags.
    Export {
        /// Bytes.
        size: u64,
        /// Transmission flags.
        flags: TransmissionFlags,
    },
    /// `NBD_INFO_NAME`.
    Name(String),
    /// `NBD_INFO_DESCRIPTION`.
    Description(String),
    /// `NBD_INFO_BLOCK_SIZE`.
    BlockSize {
        /// Minimum block size (alignment of offsets and lengths).
        min: u32,
        /// Preferred block size.
        preferred: u32,
        /// Largest request payload.
        max: u32,
    },
    /// A type this implementation does not know (to be ignored).
    Unknown(u16),
}

impl Info {
    /// Appends the reply data (type and payload).
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Info::Export { size, flags } => {
                out.extend_from_slice(&info_type::EXPORT.to_be_bytes());
                out.extend_from_slice(&size.to_be_bytes());
                out.extend_from_slice(&flags.0.to_be_bytes());
            }
            Info::Name(s) | Info::Description(s) => {
                let t = if matches!(self, Info::Name(_)) {
                    info_type::NAME
                } else {
                    info_type::DESCRIPTION
                };
                out.extend_from_slice(&t.to_be_bytes());
                out.extend_from_slice(s.as_bytes());
            }
            Info::BlockSize {
                min,
                preferred,
                max,
            } => {
                out.extend_from_slice(&info_type::BLOCK_SIZE.to_be_bytes());
                out.extend_from_slice(&min.to_be_bytes());
                out.extend_from_slice(&preferred.to_be_bytes());
                out.extend_from_slice(&max.to_be_bytes());
            }
            Info::Unknown(t) => out.extend_from_slice(&t.to_be_bytes()),
        }
    }

    /// Decodes reply data, checking each known type's exact length.
    pub fn decode(data: &[u8]) -> Result<Self, WireError> {
        need("NBD_REP_INFO", data, 2)?;
        let exact = |what: &'static str, n: usize| {
            if data.len() != n {
                Err(WireError::BadLength {
                    what,
                    detail: format!("must be {n} bytes, is {}", data.len()),
                })
            } else {
                Ok(())
            }
        };
        Ok(match be16(data) {
            info_type::EXPORT => {
                exact("NBD_INFO_EXPORT", 12)?;
                Info::Export {
                    size: be64(&data[2..]),
                    flags: TransmissionFlags(be16(&data[10..])),
                }
            }
            info_type::NAME => Info::Name(check_string("NBD_INFO_NAME", &data[2..])?.to_string()),
            info_type::DESCRIPTION => {
                Info::Description(check_string("NBD_INFO_DESCRIPTION", &data[2..])?.to_string())
            }
            info_type::BLOCK_SIZE => {
                exact("NBD_INFO_BLOCK_SIZE", 14)?;
                Info::BlockSize {
                    min: be32(&data[2..]),
                    preferred: be32(&data[6..]),
                    max: be32(&data[10..]),
                }
            }
            t => Info::Unknown(t),
        })
    }
}

/// Appends the data of an `NBD_REP_SERVER` reply (one export of a list).
pub fn encode_rep_server(out: &mut Vec<u8>, name: &str) {
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
}

/// Decodes the data of an `NBD_REP_SERVER` reply; returns the export name.
pub fn decode_rep_server(data: &[u8]) -> Result<&str, WireError> {
    need("NBD_REP_SERVER", data, 4)?;
    let n = be32(data) as usize;
    if n > data.len() - 4 {
        return Err(WireError::BadLength {
            what: "NBD_REP_SERVER",
            detail: format!("name length {n} exceeds {} bytes", data.len() - 4),
        });
    }
    check_string("export name", &data[4..4 + n])
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size and flags, then 124 zero bytes unless
/// `no_zeroes` was negotiated.
pub fn encode_export_name_reply(
    out: &mut Vec<u8>,
    size: u64,
    flags: TransmissionFlags,
    no_zeroes: bool,
) {
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.0.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; EXPORT_NAME_PADDING]);
    }
}

/// Decodes the first 10 bytes of the reply to `NBD_OPT_EXPORT_NAME`.
pub fn decode_export_name_reply(b: &[u8]) -> Result<(u64, TransmissionFlags), WireError> {
    need("NBD_OPT_EXPORT_NAME reply", b, EXPORT_NAME_REPLY_LEN)?;
    Ok((be64(b), TransmissionFlags(be16(&b[8..]))))
}
