//! The client side of the fixed-newstyle handshake: `NBD_OPT_GO` asking for block
//! sizes, falling back to `NBD_OPT_EXPORT_NAME` for servers that do not know `GO`
//! (or do not speak fixed newstyle at all). With TLS configured, `NBD_OPT_STARTTLS`
//! comes first and everything after it goes through the TLS relay.

use super::{ClientError, ExportInfo};
use crate::stream::Stream;
use crate::tls::{self, ClientTls, Relay};
use crate::wire::{
    self, EXPORT_NAME_PADDING, EXPORT_NAME_REPLY_LEN, GREETING_LEN, Info, InfoRequest, MAX_PAYLOAD,
    OPTION_REPLY_HEADER_LEN, Opt, OptionReplyHeader, Rep, TransmissionFlags, client_flags,
    handshake_flags, info_type,
};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;

/// Option replies larger than this are not plausible.
const MAX_OPTION_REPLY: u32 = 64 << 10;

struct Hs<'a> {
    /// The TCP connection until TLS starts, then the relay's end.
    stream: Stream,
    addr: &'a str,
}

impl Hs<'_> {
    fn io(&self, e: io::Error) -> ClientError {
        ClientError::Io {
            addr: self.addr.into(),
            during: "handshake",
            source: Arc::new(e),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<(), ClientError> {
        self.stream.read_exact(buf).map_err(|e| self.io(e))
    }

    fn write(&mut self, buf: &[u8]) -> Result<(), ClientError> {
        self.stream.write_all(buf).map_err(|e| self.io(e))
    }

    fn tls(&self, e: io::Error) -> ClientError {
        ClientError::Tls {
            addr: self.addr.into(),
            source: Arc::new(e),
        }
    }

    /// Reads one reply to `option`: its type and its data (at most
    /// `MAX_OPTION_REPLY` bytes); a reply to another option is unexpected.
    fn option_reply(&mut self, option: Opt) -> Result<(Rep, Vec<u8>), ClientError> {
        let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
        self.read(&mut h)?;
        let h = OptionReplyHeader::decode(&h).map_err(|e| self.wire(e))?;
        if h.option != option {
            return Err(
                self.unexpected(format!("reply to {} while waiting for {option}", h.option))
            );
        }
        if h.len > MAX_OPTION_REPLY {
            return Err(self.unexpected(format!("{} reply of {} bytes", h.reply, h.len)));
        }
        let mut data = vec![0u8; h.len as usize];
        self.read(&mut data)?;
        Ok((h.reply, data))
    }

    fn unexpected(&self, what: String) -> ClientError {
        ClientError::Unexpected {
            addr: self.addr.into(),
            what,
        }
    }

    fn wire(&self, e: wire::WireError) -> ClientError {
        ClientError::Protocol {
            addr: self.addr.into(),
            source: e,
        }
    }
}

/// Runs the handshake for `export` (with `tls`: after `NBD_OPT_STARTTLS`); returns
/// the export and the stream in transmission, with its TLS relay if any.
pub(super) fn negotiate(
    tcp: TcpStream,
    addr: &str,
    export: &str,
    tls: Option<&ClientTls>,
) -> Result<(ExportInfo, Stream, Option<Relay>), ClientError> {
    let mut hs = Hs {
        stream: Stream::Tcp(tcp.try_clone().map_err(|e| ClientError::Io {
            addr: addr.into(),
            during: "handshake",
            source: Arc::new(e),
        })?),
        addr,
    };
    let mut g = [0u8; GREETING_LEN];
    hs.read(&mut g)?;
    let flags = wire::decode_greeting(&g).map_err(|e| hs.wire(e))?;
    let fixed = flags & handshake_flags::FIXED_NEWSTYLE != 0;
    let no_zeroes = flags & handshake_flags::NO_ZEROES != 0;
    let mut cflags = 0;
    if fixed {
        cflags |= client_flags::FIXED_NEWSTYLE;
    }
    if no_zeroes {
        cflags |= client_flags::NO_ZEROES;
    }
    hs.write(&u32::to_be_bytes(cflags))?;
    let relay = match tls {
        Some(tls) if fixed => Some(starttls(&mut hs, tcp, tls)?),
        Some(_) => {
            return Err(hs.tls(io::Error::other(
                "the server does not speak fixed newstyle, so it cannot do NBD_OPT_STARTTLS",
            )));
        }
        None => None,
    };
    if fixed {
        if let Some(info) = go(&mut hs, export)? {
            return Ok((info, hs.stream, relay));
        }
    }
    let info = export_name(&mut hs, export, no_zeroes)?;
    Ok((info, hs.stream, relay))
}

/// `NBD_OPT_STARTTLS`, then the TLS handshake on `tcp`; `hs` then talks through
/// the relay.
fn starttls(hs: &mut Hs<'_>, mut tcp: TcpStream, tls: &ClientTls) -> Result<Relay, ClientError> {
    let mut out = Vec::new();
    wire::encode_option(&mut out, Opt::STARTTLS, &[]);
    hs.write(&out)?;
    let (reply, data) = hs.option_reply(Opt::STARTTLS)?;
    match reply {
        Rep::ACK if data.is_empty() => {}
        r if r.is_error() => {
            return Err(ClientError::Refused {
                addr: hs.addr.into(),
                option: Opt::STARTTLS,
                reply: r,
                message: String::from_utf8_lossy(&data).into_owned(),
            });
        }
        r => return Err(hs.unexpected(format!("{r} in reply to NBD_OPT_STARTTLS"))),
    }
    let mut session = tls.session(hs.addr).map_err(|e| ClientError::Invalid {
        addr: hs.addr.into(),
        reason: e.to_string(),
    })?;
    tls::handshake(&mut session, &mut tcp).map_err(|e| hs.tls(e))?;
    let (relay, stream) = Relay::start(session, tcp).map_err(|e| hs.tls(e))?;
    hs.stream = stream;
    Ok(relay)
}

/// `NBD_OPT_GO`; `None` if the server does not support it.
fn go(hs: &mut Hs<'_>, export: &str) -> Result<Option<ExportInfo>, ClientError> {
    let mut data = Vec::new();
    InfoRequest {
        name: export,
        requests: vec![info_type::BLOCK_SIZE],
    }
    .encode(&mut data);
    let mut out = Vec::new();
    wire::encode_option(&mut out, Opt::GO, &data);
    hs.write(&out)?;
    let mut export_info = None;
    let mut sizes = None;
    loop {
        let (reply, data) = hs.option_reply(Opt::GO)?;
        let message = || String::from_utf8_lossy(&data).into_owned();
        match reply {
            Rep::INFO => match Info::decode(&data).map_err(|e| hs.wire(e))? {
                Info::Export { size, flags } => export_info = Some((size, flags)),
                Info::BlockSize {
                    min,
                    preferred,
                    max,
                } => sizes = Some((min, preferred, max)),
                _ => {}
            },
            Rep::ACK => {
                let Some((size, flags)) = export_info else {
                    return Err(
                        hs.unexpected("NBD_OPT_GO succeeded without NBD_INFO_EXPORT".into())
                    );
                };
                return finish(hs, export, size, flags, sizes, true).map(Some);
            }
            Rep::ERR_UNSUP => return Ok(None),
            Rep::ERR_UNKNOWN => {
                return Err(ClientError::UnknownExport {
                    addr: hs.addr.into(),
                    export: export.into(),
                    message: message(),
                });
            }
            r if r.is_error() => {
                return Err(ClientError::Refused {
                    addr: hs.addr.into(),
                    option: Opt::GO,
                    reply: r,
                    message: message(),
                });
            }
            r => return Err(hs.unexpected(format!("{r} in reply to NBD_OPT_GO"))),
        }
    }
}

/// `NBD_OPT_EXPORT_NAME`: the server closes the connection if it has no such export.
fn export_name(hs: &mut Hs<'_>, export: &str, no_zeroes: bool) -> Result<ExportInfo, ClientError> {
    let mut out = Vec::new();
    wire::encode_option(&mut out, Opt::EXPORT_NAME, export.as_bytes());
    hs.write(&out)?;
    let mut r = [0u8; EXPORT_NAME_REPLY_LEN + EXPORT_NAME_PADDING];
    let n = if no_zeroes {
        EXPORT_NAME_REPLY_LEN
    } else {
        r.len()
    };
    match hs.stream.read_exact(&mut r[..n]) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Err(ClientError::UnknownExport {
                addr: hs.addr.into(),
                export: export.into(),
                message: "the server closed the connection after NBD_OPT_EXPORT_NAME".into(),
            });
        }
        Err(e) => return Err(hs.io(e)),
    }
    let (size, flags) = wire::decode_export_name_reply(&r).map_err(|e| hs.wire(e))?;
    finish(hs, export, size, flags, None, false)
}

fn finish(
    hs: &Hs<'_>,
    export: &str,
    size: u64,
    flags: TransmissionFlags,
    sizes: Option<(u32, u32, u32)>,
    used_go: bool,
) -> Result<ExportInfo, ClientError> {
    let flags = if flags.has(TransmissionFlags::HAS_FLAGS) {
        flags
    } else {
        TransmissionFlags(0)
    };
    let (min, preferred, max) = sizes.unwrap_or((1, 4096, MAX_PAYLOAD));
    if !min.is_power_of_two() || min > 1 << 16 || max < min || !preferred.is_power_of_two() {
        return Err(hs.unexpected(format!(
            "invalid block sizes: minimum {min}, preferred {preferred}, maximum {max}"
        )));
    }
    Ok(ExportInfo {
        name: export.into(),
        size,
        flags,
        min_block: min,
        preferred_block: preferred,
        max_block: max,
        used_go,
    })
}
