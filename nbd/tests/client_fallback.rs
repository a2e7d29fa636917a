//! The client against minimal in-process servers that lack `NBD_OPT_GO` (or fixed
//! newstyle altogether), and against servers that misbehave.

use nbd_proto::client::{ClientConfig, ClientError, NbdClient};
use nbd_proto::wire::{
    self, Cmd, OPTION_HEADER_LEN, Opt, OptionHeader, REQUEST_LEN, Rep, Request, SimpleReply,
    TransmissionFlags, client_flags, handshake_flags,
};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

/// Serves one connection on a background thread with `f`; returns the address.
fn serve_once(f: impl FnOnce(TcpStream) + Send + 'static) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        f(s);
    });
    addr
}

fn read_option(s: &mut TcpStream) -> (Opt, Vec<u8>) {
    let mut h = [0u8; OPTION_HEADER_LEN];
    s.read_exact(&mut h).unwrap();
    let h = OptionHeader::decode(&h).unwrap();
    let mut d = vec![0u8; h.len as usize];
    s.read_exact(&mut d).unwrap();
    (h.option, d)
}

/// After the handshake: answers reads with `0x42` bytes until the client leaves.
fn transmission(mut s: TcpStream) {
    loop {
        let mut h = [0u8; REQUEST_LEN];
        if s.read_exact(&mut h).is_err() {
            return;
        }
        let r = Request::decode(&h).unwrap();
        if r.cmd == Cmd::DISC {
            return;
        }
        let mut out = SimpleReply {
            error: 0,
            handle: r.handle,
        }
        .encode()
        .to_vec();
        if r.cmd == Cmd::READ {
            out.extend(std::iter::repeat_n(0x42u8, r.len as usize));
        }
        s.write_all(&out).unwrap();
    }
}

const FLAGS: u16 = TransmissionFlags::HAS_FLAGS | TransmissionFlags::SEND_FLUSH;

#[test]
fn falls_back_to_export_name_when_go_is_unsupported() {
    let addr = serve_once(|mut s| {
        s.write_all(&wire::encode_greeting(handshake_flags::FIXED_NEWSTYLE))
            .unwrap();
        let mut cf = [0u8; 4];
        s.read_exact(&mut cf).unwrap();
        assert_eq!(u32::from_be_bytes(cf), client_flags::FIXED_NEWSTYLE);
        let (opt, _) = read_option(&mut s);
        assert_eq!(opt, Opt::GO);
        let mut out = Vec::new();
        wire::encode_option_reply(&mut out, Opt::GO, Rep::ERR_UNSUP, b"");
        s.write_all(&out).unwrap();
        let (opt, name) = read_option(&mut s);
        assert_eq!((opt, &name[..]), (Opt::EXPORT_NAME, &b"old"[..]));
        let mut out = Vec::new();
        wire::encode_export_name_reply(&mut out, 1 << 20, TransmissionFlags(FLAGS), false);
        s.write_all(&out).unwrap();
        transmission(s);
    });
    let c = NbdClient::connect(&addr, "old").unwrap();
    assert!(!c.info().used_go);
    assert_eq!(c.size(), 1 << 20);
    let mut b = [0u8; 100];
    c.read_at(10, &mut b).unwrap();
    assert_eq!(b, [0x42u8; 100]);
    c.flush().unwrap();
    // Not advertised: refused before sending.
    assert!(matches!(
        c.trim(0, 4096),
        Err(ClientError::Unsupported { .. })
    ));
    assert!(matches!(
        c.write_at(0, &[1], true),
        Err(ClientError::Unsupported { .. })
    ));
}

#[test]
fn plain_newstyle_server_gets_export_name_directly() {
    let addr = serve_once(|mut s| {
        s.write_all(&wire::encode_greeting(0)).unwrap();
        let mut cf = [0u8; 4];
        s.read_exact(&mut cf).unwrap();
        assert_eq!(u32::from_be_bytes(cf), 0);
        let (opt, _) = read_option(&mut s);
        assert_eq!(opt, Opt::EXPORT_NAME);
        let mut out = Vec::new();
        wire::encode_export_name_reply(&mut out, 4096, TransmissionFlags(FLAGS), false);
        s.write_all(&out).unwrap();
        transmission(s);
    });
    let c = NbdClient::connect(&addr, "x").unwrap();
    assert_eq!(c.size(), 4096);
}

#[test]
fn export_name_refusal_is_unknown_export() {
    let addr = serve_once(|mut s| {
        s.write_all(&wire::encode_greeting(0)).unwrap();
        let mut cf = [0u8; 4];
        s.read_exact(&mut cf).unwrap();
        read_option(&mut s);
        // Closes without an answer, as the protocol requires.
    });
    let e = NbdClient::connect(&addr, "x").unwrap_err();
    assert!(matches!(e, ClientError::UnknownExport { .. }), "{e:?}");
}

#[test]
fn misbehaving_servers_give_typed_errors() {
    // Not an NBD server at all.
    let addr = serve_once(|mut s| {
        s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").unwrap();
        std::thread::sleep(Duration::from_millis(200));
    });
    let e = NbdClient::connect(&addr, "x").unwrap_err();
    assert!(matches!(e, ClientError::Protocol { .. }), "{e:?}");
    assert!(e.to_string().contains(&addr));

    // A reply for a handle never sent kills the connection, failing the request.
    let addr = serve_once(|mut s| {
        s.write_all(&wire::encode_greeting(handshake_flags::FIXED_NEWSTYLE))
            .unwrap();
        let mut cf = [0u8; 4];
        s.read_exact(&mut cf).unwrap();
        read_option(&mut s);
        let mut out = Vec::new();
        let mut d = Vec::new();
        wire::Info::Export {
            size: 1 << 20,
            flags: TransmissionFlags(FLAGS),
        }
        .encode(&mut d);
        wire::encode_option_reply(&mut out, Opt::GO, Rep::INFO, &d);
        wire::encode_option_reply(&mut out, Opt::GO, Rep::ACK, &[]);
        s.write_all(&out).unwrap();
        let mut h = [0u8; REQUEST_LEN];
        s.read_exact(&mut h).unwrap();
        s.write_all(
            &SimpleReply {
                error: 0,
                handle: 0xdead_beef,
            }
            .encode(),
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(200));
    });
    let c = NbdClient::connect(&addr, "x").unwrap();
    let e = c.flush().unwrap_err();
    assert!(matches!(e, ClientError::Unexpected { .. }), "{e:?}");

    // A server that accepts but never greets: the handshake times out.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let e = NbdClient::connect_with(
        &addr,
        "x",
        &ClientConfig {
            handshake_timeout: Duration::from_millis(300),
            ..ClientConfig::default()
        },
    )
    .unwrap_err();
    assert!(matches!(e, ClientError::Io { .. }), "{e:?}");
    drop(l);

    // Nobody listening.
    let e = NbdClient::connect(&addr, "x").unwrap_err();
    assert!(matches!(e, ClientError::Connect { .. }), "{e:?}");
    assert!(e.to_string().contains(&addr));
}
