//! A raw NBD connection built from `nbd_proto::wire`, for sending what a
//! well-behaved client never would.

use nbd_proto::stream::Stream;
use nbd_proto::tls::{self, ClientTls, Relay};
use nbd_proto::wire::{
    self, Cmd, GREETING_LEN, Info, InfoRequest, OPTION_REPLY_HEADER_LEN, Opt, OptionReplyHeader,
    Rep, Request, SIMPLE_REPLY_LEN, SimpleReply, client_flags, handshake_flags,
};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// A raw connection: plaintext, or TLS after [`Raw::starttls`].
pub struct Raw {
    /// The socket, or the plaintext end of the TLS relay.
    pub s: Stream,
    /// The TLS relay's threads, once TLS runs (joined when dropped).
    relay: Option<Relay>,
}

impl Raw {
    /// Connects and reads the greeting (without answering it).
    pub fn greet(addr: &str) -> Raw {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = Raw {
            s: Stream::Tcp(s),
            relay: None,
        };
        let mut g = [0u8; GREETING_LEN];
        r.s.read_exact(&mut g).unwrap();
        let flags = wire::decode_greeting(&g).unwrap();
        assert_eq!(
            flags,
            handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES
        );
        r
    }

    /// Connects and answers the greeting with fixed newstyle and no zeroes.
    pub fn connect(addr: &str) -> Raw {
        let mut r = Raw::greet(addr);
        r.send(&(client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES).to_be_bytes());
        r
    }

    /// Connects and enters transmission on `export` with `NBD_OPT_GO`; returns the
    /// connection, the size and the transmission flags.
    pub fn go(addr: &str, export: &str) -> (Raw, u64, u16) {
        let mut r = Raw::connect(addr);
        let mut d = Vec::new();
        InfoRequest {
            name: export,
            requests: vec![],
        }
        .encode(&mut d);
        r.option(Opt::GO, &d);
        let mut export_info = None;
        loop {
            let (h, data) = r.option_reply();
            match h.reply {
                Rep::INFO => {
                    if let Info::Export { size, flags } = Info::decode(&data).unwrap() {
                        export_info = Some((size, flags.0));
                    }
                }
                Rep::ACK => break,
                other => panic!("GO {export}: {other}: {}", String::from_utf8_lossy(&data)),
            }
        }
        let (size, flags) = export_info.expect("NBD_INFO_EXPORT");
        (r, size, flags)
    }

    /// `NBD_OPT_STARTTLS`, which must be acknowledged, then the TLS handshake
    /// with `tls` naming `addr`; everything after it is encrypted.
    pub fn starttls(&mut self, tls: &ClientTls, addr: &str) {
        self.option(Opt::STARTTLS, &[]);
        let (h, d) = self.option_reply();
        assert_eq!(
            (h.option, h.reply),
            (Opt::STARTTLS, Rep::ACK),
            "STARTTLS: {}",
            String::from_utf8_lossy(&d)
        );
        let Stream::Tcp(tcp) = &self.s else {
            panic!("STARTTLS on a connection that already runs TLS");
        };
        let mut tcp = tcp.try_clone().unwrap();
        let mut session = tls.session(addr).unwrap();
        tls::handshake(&mut session, &mut tcp).unwrap();
        let (relay, stream) = Relay::start(session, tcp).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        self.s = stream;
        self.relay = Some(relay);
    }

    /// Sends raw bytes.
    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    /// Sends an option.
    pub fn option(&mut self, opt: Opt, data: &[u8]) {
        let mut v = Vec::new();
        wire::encode_option(&mut v, opt, data);
        self.send(&v);
    }

    /// Reads one option reply.
    pub fn option_reply(&mut self) -> (OptionReplyHeader, Vec<u8>) {
        let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
        self.s.read_exact(&mut h).unwrap();
        let h = OptionReplyHeader::decode(&h).unwrap();
        let mut d = vec![0u8; h.len as usize];
        self.s.read_exact(&mut d).unwrap();
        (h, d)
    }

    /// Sends a request header and `payload`.
    pub fn request(
        &mut self,
        cmd: Cmd,
        flags: u16,
        handle: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        let mut v = Request {
            flags,
            cmd,
            handle,
            offset,
            len,
        }
        .encode()
        .to_vec();
        v.extend_from_slice(payload);
        self.send(&v);
    }

    /// Reads one simple reply header.
    pub fn reply(&mut self) -> SimpleReply {
        let mut h = [0u8; SIMPLE_REPLY_LEN];
        self.s.read_exact(&mut h).unwrap();
        SimpleReply::decode(&h).unwrap()
    }

    /// Reads `n` bytes of reply data.
    pub fn data(&mut self, n: usize) -> Vec<u8> {
        let mut d = vec![0u8; n];
        self.s.read_exact(&mut d).unwrap();
        d
    }

    /// Whether the server has closed the connection (reads end of stream or a reset
    /// within the read timeout).
    pub fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 64];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}
