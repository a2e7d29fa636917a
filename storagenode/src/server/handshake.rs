//! The server side of the fixed-newstyle handshake (option haggling).
//!
//! Supported: `NBD_OPT_EXPORT_NAME`, `NBD_OPT_GO`, `NBD_OPT_INFO`, `NBD_OPT_LIST`,
//! `NBD_OPT_ABORT`, and `NBD_OPT_STARTTLS` when the node has a certificate. Every
//! other option, `NBD_OPT_STRUCTURED_REPLY` included, is answered with
//! `NBD_REP_ERR_UNSUP`, after which a client goes on with simple replies. An
//! unknown export is `NBD_REP_ERR_UNKNOWN` for `GO`/`INFO`; for `EXPORT_NAME`,
//! which cannot carry an error, the connection is closed. The whole handshake,
//! the TLS handshake included, has one deadline.
//!
//! **TLS.** A node with a certificate serves only TLS clients (NBD's "TLS-only"
//! mode, doc/proto.md): before `NBD_OPT_STARTTLS`, every option but `STARTTLS` and
//! `ABORT` is answered `NBD_REP_ERR_TLS_REQD` (and `EXPORT_NAME` closes the
//! connection), so no export name, list or size leaks in plaintext. After the
//! acknowledgement both sides run the TLS handshake (rustls, [`nbd_proto::tls`]);
//! the options that follow and the transmission phase go through the TLS relay's
//! [`Stream`]. A second `STARTTLS` is `NBD_REP_ERR_INVALID`; `STARTTLS` on a node
//! without a certificate is `NBD_REP_ERR_UNSUP`.

use crate::volume::{Volume, VolumeDir};
use nbd_proto::stream::Stream;
use nbd_proto::tls::{self, Relay, ServerTls};
use nbd_proto::wire::{
    self, EXPORT_NAME_PADDING, Info, InfoRequest, MAX_PAYLOAD, OPTION_HEADER_LEN, Opt,
    OptionHeader, Rep, WireError, client_flags, handshake_flags, info_type,
};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Instant;

/// Option data larger than this ends the connection (a valid option is far smaller:
/// `GO` with a 4096-byte name and every information type is about 4 KiB).
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// The block sizes advertised: any alignment, 4 KiB preferred, 32 MiB payloads.
pub const BLOCK_SIZES: Info = Info::BlockSize {
    min: 1,
    preferred: 4096,
    max: MAX_PAYLOAD,
};

/// How the handshake ended without an error.
pub(crate) enum Negotiated {
    /// Transmission on this volume, over this stream (plaintext TCP, or the TLS
    /// relay's end, the relay then being given too).
    Go {
        /// The export.
        volume: Arc<Volume>,
        /// Where requests arrive and replies go.
        stream: Stream,
        /// The TLS relay carrying `stream`, if TLS was negotiated.
        relay: Option<Relay>,
    },
    /// The client aborted (`NBD_OPT_ABORT`) or closed the connection.
    Closed,
}

/// Why a handshake failed (all end the connection).
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    /// The deadline passed.
    #[error("handshake not finished within the deadline")]
    TimedOut,
    /// The socket failed.
    #[error("connection failed during the handshake")]
    Io(#[source] io::Error),
    /// The client sent something that is not NBD.
    #[error("malformed handshake")]
    Wire(#[from] WireError),
    /// Client flags this server does not know.
    #[error("unknown client flags {0:#x}")]
    ClientFlags(u32),
    /// An option too large to be plausible.
    #[error("{option} carries {len} bytes, more than {MAX_OPTION_LEN}")]
    TooLong {
        /// The option.
        option: Opt,
        /// Its data length.
        len: u32,
    },
    /// The TLS handshake failed (a refused certificate, a client that is not
    /// speaking TLS).
    #[error("TLS handshake failed")]
    Tls(#[source] io::Error),
    /// `NBD_OPT_EXPORT_NAME` before `NBD_OPT_STARTTLS` on a TLS-only node.
    #[error("NBD_OPT_EXPORT_NAME in plaintext refused: this node requires TLS")]
    TlsRequired,
    /// `NBD_OPT_EXPORT_NAME` named an export that cannot be served.
    #[error("NBD_OPT_EXPORT_NAME for {name:?} refused: {reason}")]
    ExportName {
        /// The name asked for.
        name: String,
        /// Why.
        reason: String,
    },
}

impl HandshakeError {
    /// Whether the client simply went away (not worth a warning).
    pub fn is_disconnect(&self) -> bool {
        matches!(self, HandshakeError::Io(e) if matches!(
            e.kind(),
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
        ))
    }
}

struct Haggle<'a> {
    tcp: &'a TcpStream,
    /// The TCP connection until TLS starts, then the relay's end.
    stream: Stream,
    relay: Option<Relay>,
    tls: Option<&'a ServerTls>,
    deadline: Instant,
    dir: &'a VolumeDir,
    no_zeroes: bool,
    out: Vec<u8>,
}

/// Runs the handshake on `tcp` until transmission starts or the client leaves.
/// With `tls`, the client must upgrade with `NBD_OPT_STARTTLS` first.
pub(crate) fn negotiate(
    tcp: &TcpStream,
    dir: &VolumeDir,
    deadline: Instant,
    tls: Option<&ServerTls>,
) -> Result<Negotiated, HandshakeError> {
    let mut h = Haggle {
        tcp,
        stream: Stream::Tcp(tcp.try_clone().map_err(HandshakeError::Io)?),
        relay: None,
        tls,
        deadline,
        dir,
        no_zeroes: false,
        out: Vec::with_capacity(256),
    };
    h.write(&wire::encode_greeting(
        handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES,
    ))?;
    let mut cf = [0u8; 4];
    if !h.read_exact(&mut cf)? {
        return Ok(Negotiated::Closed);
    }
    let cflags = u32::from_be_bytes(cf);
    if cflags & !client_flags::KNOWN != 0 {
        return Err(HandshakeError::ClientFlags(cflags));
    }
    h.no_zeroes = cflags & client_flags::NO_ZEROES != 0;
    let mut data = Vec::new();
    loop {
        let mut hdr = [0u8; OPTION_HEADER_LEN];
        if !h.read_exact(&mut hdr)? {
            return Ok(Negotiated::Closed);
        }
        let OptionHeader { option, len } = OptionHeader::decode(&hdr)?;
        if len > MAX_OPTION_LEN {
            return Err(HandshakeError::TooLong { option, len });
        }
        data.resize(len as usize, 0);
        if !h.read_exact(&mut data)? {
            return Ok(Negotiated::Closed);
        }
        if let Some(done) = h.option(option, &data)? {
            return Ok(done);
        }
    }
}

impl Haggle<'_> {
    /// Handles one option; `Some` ends the handshake.
    fn option(&mut self, option: Opt, data: &[u8]) -> Result<Option<Negotiated>, HandshakeError> {
        let plaintext_on_tls_node = self.tls.is_some() && self.relay.is_none();
        match option {
            Opt::STARTTLS => return self.starttls(data),
            Opt::EXPORT_NAME if plaintext_on_tls_node => return Err(HandshakeError::TlsRequired),
            Opt::ABORT => {}
            _ if plaintext_on_tls_node => {
                return self.error(
                    option,
                    Rep::ERR_TLS_REQD,
                    "this storage node requires TLS: send NBD_OPT_STARTTLS first",
                );
            }
            _ => {}
        }
        match option {
            Opt::EXPORT_NAME => {
                let name = String::from_utf8_lossy(data).into_owned();
                let volume = wire::check_string("export name", data)
                    .map_err(|e| e.to_string())
                    .and_then(|n| {
                        self.dir
                            .lookup(n)
                            .map_err(|e| fabric::client::error_chain(&e))
                    })
                    .map_err(|reason| HandshakeError::ExportName {
                        name: name.clone(),
                        reason,
                    })?;
                self.out.clear();
                wire::encode_export_name_reply(
                    &mut self.out,
                    volume.size(),
                    volume.flags(),
                    self.no_zeroes,
                );
                debug_assert!(self.no_zeroes || self.out.len() == 10 + EXPORT_NAME_PADDING);
                self.flush()?;
                Ok(Some(self.go(volume)?))
            }
            Opt::ABORT => {
                // The client may already be gone; either way the session ends.
                let _ = self.reply(option, Rep::ACK, &[]);
                Ok(Some(Negotiated::Closed))
            }
            Opt::LIST => {
                if !data.is_empty() {
                    return self.error(option, Rep::ERR_INVALID, "NBD_OPT_LIST takes no data");
                }
                match self.dir.list() {
                    Ok(names) => {
                        self.out.clear();
                        let mut d = Vec::new();
                        for n in &names {
                            d.clear();
                            wire::encode_rep_server(&mut d, n);
                            wire::encode_option_reply(&mut self.out, option, Rep::SERVER, &d);
                        }
                        wire::encode_option_reply(&mut self.out, option, Rep::ACK, &[]);
                        self.flush()?;
                        Ok(None)
                    }
                    Err(e) => self.error(
                        option,
                        Rep::ERR_PLATFORM,
                        &format!("cannot list volumes: {e}"),
                    ),
                }
            }
            Opt::INFO | Opt::GO => {
                let req = match InfoRequest::decode(data) {
                    Ok(r) => r,
                    Err(e) => return self.error(option, Rep::ERR_INVALID, &e.to_string()),
                };
                let volume = match self.dir.lookup(req.name) {
                    Ok(v) => v,
                    Err(e) => {
                        return self.error(
                            option,
                            Rep::ERR_UNKNOWN,
                            &fabric::client::error_chain(&e),
                        );
                    }
                };
                self.out.clear();
                let mut infos = vec![
                    Info::Export {
                        size: volume.size(),
                        flags: volume.flags(),
                    },
                    BLOCK_SIZES,
                ];
                if req.requests.contains(&info_type::NAME) {
                    infos.push(Info::Name(volume.name().to_string()));
                }
                if req.requests.contains(&info_type::DESCRIPTION) {
                    infos.push(Info::Description(format!(
                        "storagenode volume{}",
                        if volume.read_only() {
                            " (read-only)"
                        } else {
                            ""
                        }
                    )));
                }
                let mut d = Vec::new();
                for info in &infos {
                    d.clear();
                    info.encode(&mut d);
                    wire::encode_option_reply(&mut self.out, option, Rep::INFO, &d);
                }
                wire::encode_option_reply(&mut self.out, option, Rep::ACK, &[]);
                self.flush()?;
                if option == Opt::GO {
                    return Ok(Some(self.go(volume)?));
                }
                Ok(None)
            }
            _ => self.error(
                option,
                Rep::ERR_UNSUP,
                &format!("{option} is not supported by storagenode"),
            ),
        }
    }

    /// Transmission starts on the current stream.
    fn go(&mut self, volume: Arc<Volume>) -> Result<Negotiated, HandshakeError> {
        let stream = self.stream.try_clone().map_err(HandshakeError::Io)?;
        Ok(Negotiated::Go {
            volume,
            stream,
            relay: self.relay.take(),
        })
    }

    /// `NBD_OPT_STARTTLS`: acknowledged in plaintext, then the TLS handshake; the
    /// haggling goes on over the relay.
    fn starttls(&mut self, data: &[u8]) -> Result<Option<Negotiated>, HandshakeError> {
        let option = Opt::STARTTLS;
        let Some(tls) = self.tls else {
            return self.error(
                option,
                Rep::ERR_UNSUP,
                "this storage node has no TLS certificate (storagenode --tls-cert)",
            );
        };
        if self.relay.is_some() {
            return self.error(option, Rep::ERR_INVALID, "TLS is already running");
        }
        if !data.is_empty() {
            return self.error(option, Rep::ERR_INVALID, "NBD_OPT_STARTTLS takes no data");
        }
        self.reply(option, Rep::ACK, &[])?;
        let mut tcp = self.tcp.try_clone().map_err(HandshakeError::Io)?;
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HandshakeError::TimedOut);
        }
        tcp.set_read_timeout(Some(left))
            .map_err(HandshakeError::Io)?;
        let mut session = tls.session();
        tls::handshake(&mut session, &mut tcp).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => HandshakeError::TimedOut,
            _ => HandshakeError::Tls(e),
        })?;
        let (relay, stream) = Relay::start(session, tcp).map_err(HandshakeError::Io)?;
        self.stream = stream;
        self.relay = Some(relay);
        Ok(None)
    }

    fn error(
        &mut self,
        option: Opt,
        rep: Rep,
        message: &str,
    ) -> Result<Option<Negotiated>, HandshakeError> {
        log::debug!("{}: {option}: {rep}: {message}", peer(self.tcp));
        let m = &message.as_bytes()[..message.len().min(wire::MAX_STRING)];
        self.reply(option, rep, m)?;
        Ok(None)
    }

    fn reply(&mut self, option: Opt, rep: Rep, data: &[u8]) -> Result<(), HandshakeError> {
        self.out.clear();
        wire::encode_option_reply(&mut self.out, option, rep, data);
        self.flush()
    }

    fn flush(&mut self) -> Result<(), HandshakeError> {
        let out = std::mem::take(&mut self.out);
        let r = self.write(&out);
        self.out = out;
        r
    }

    fn write(&mut self, b: &[u8]) -> Result<(), HandshakeError> {
        self.stream.write_all(b).map_err(HandshakeError::Io)
    }

    /// Reads exactly `buf.len()` bytes by the deadline. `false`: the client closed
    /// the connection before sending anything of it.
    fn read_exact(&mut self, buf: &mut [u8]) -> Result<bool, HandshakeError> {
        let s = &mut self.stream;
        let mut done = 0;
        while done < buf.len() {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(HandshakeError::TimedOut);
            }
            s.set_read_timeout(Some(left)).map_err(HandshakeError::Io)?;
            match s.read(&mut buf[done..]) {
                Ok(0) if done == 0 => return Ok(false),
                Ok(0) => return Err(HandshakeError::Io(io::ErrorKind::UnexpectedEof.into())),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(HandshakeError::TimedOut);
                }
                Err(e) => return Err(HandshakeError::Io(e)),
            }
        }
        Ok(true)
    }
}

fn peer(s: &TcpStream) -> String {
    s.peer_addr().map_or_else(|_| "?".into(), |a| a.to_string())
}
