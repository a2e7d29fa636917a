use super::*;
use splitvisor_tests::tls::TlsFiles;
use std::net::TcpListener;

/// Serves one TLS connection that echoes what it reads; returns the handshake's
/// outcome and the bytes echoed.
fn echo_server(listener: TcpListener, tls: ServerTls) -> std::thread::JoinHandle<io::Result<u64>> {
    std::thread::spawn(move || {
        let (mut tcp, _) = listener.accept()?;
        tcp.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
        let mut conn = tls.session();
        handshake(&mut conn, &mut tcp)?;
        let (relay, stream) = Relay::start(conn, tcp)?;
        let mut n = 0u64;
        let mut buf = vec![0u8; 8192];
        loop {
            let got = (&stream).read(&mut buf)?;
            if got == 0 {
                break;
            }
            (&stream).write_all(&buf[..got])?;
            n += got as u64;
        }
        stream.shutdown(Shutdown::Both)?;
        drop(relay);
        Ok(n)
    })
}

fn client(addr: &str, tls: &ClientTls) -> io::Result<(Relay, Stream)> {
    let mut tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let mut conn = tls.session(addr).map_err(io::Error::other)?;
    handshake(&mut conn, &mut tcp)?;
    Relay::start(conn, tcp)
}

#[test]
fn relay_carries_a_megabyte_both_ways_and_ends_cleanly() {
    let f = TlsFiles::new("relay-echo");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = echo_server(
        listener,
        ServerTls::load(&f.server_cert(), &f.server_key(), None).unwrap(),
    );
    let (relay, stream) = client(&addr, &ClientTls::load(&f.ca(), None).unwrap()).unwrap();
    let data: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let writer = {
        let (s, d) = (stream.try_clone().unwrap(), data.clone());
        std::thread::spawn(move || {
            (&s).write_all(&d).unwrap();
            s.shutdown(Shutdown::Write).unwrap();
        })
    };
    let mut back = Vec::new();
    (&stream).read_to_end(&mut back).unwrap();
    writer.join().unwrap();
    assert!(
        back == data,
        "the echo differs from what was sent: {} bytes back of {}",
        back.len(),
        data.len()
    );
    assert_eq!(server.join().unwrap().unwrap(), data.len() as u64);
    drop(stream);
    drop(relay);
}

#[test]
fn a_server_certificate_from_another_ca_is_refused_with_the_reason() {
    let f = TlsFiles::new("relay-wrong-ca");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = echo_server(
        listener,
        ServerTls::load(&f.server_cert(), &f.server_key(), None).unwrap(),
    );
    let err = client(&addr, &ClientTls::load(&f.other_ca(), None).unwrap()).unwrap_err();
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    assert!(server.join().unwrap().is_err());
}

#[test]
fn mutual_tls_takes_a_client_certificate_and_refuses_a_client_without_one() {
    let f = TlsFiles::new("relay-mtls");
    let tls = ServerTls::load(&f.server_cert(), &f.server_key(), Some(&f.ca())).unwrap();
    assert!(tls.verifies_clients());
    // With a certificate: served.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = echo_server(listener, tls.clone());
    let with_id = ClientTls::load(&f.ca(), Some((&f.client_cert(), &f.client_key()))).unwrap();
    let (relay, stream) = client(&addr, &with_id).unwrap();
    (&stream).write_all(b"hello").unwrap();
    let mut b = [0u8; 5];
    (&stream).read_exact(&mut b).unwrap();
    assert_eq!(&b, b"hello");
    stream.shutdown(Shutdown::Both).unwrap();
    drop((relay, stream));
    assert_eq!(server.join().unwrap().unwrap(), 5);
    // Without: the server's handshake fails naming the missing certificate.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = echo_server(listener, tls);
    if let Ok((relay, stream)) = client(&addr, &ClientTls::load(&f.ca(), None).unwrap()) {
        // TLS 1.3: the client learns of the refusal at its first read.
        let _ = (&stream).write_all(b"x");
        let mut b = [0u8; 1];
        assert!(matches!((&stream).read(&mut b), Ok(0) | Err(_)));
        drop((relay, stream));
    }
    let err = server.join().unwrap().unwrap_err();
    assert!(
        err.to_string().contains("peer sent no certificates"),
        "{err}"
    );
}

#[test]
fn bad_files_are_named() {
    let f = TlsFiles::new("relay-bad-files");
    let missing = f.dir.join("nope.pem");
    let e = ServerTls::load(&missing, &f.server_key(), None).unwrap_err();
    assert!(e.to_string().contains("nope.pem"), "{e}");
    // A certificate where the key should be.
    let e = ServerTls::load(&f.server_cert(), &f.server_cert(), None).unwrap_err();
    assert!(e.to_string().contains("server-cert.pem"), "{e}");
    // The client's key with the server's certificate.
    let e = ServerTls::load(&f.server_cert(), &f.client_key(), None).unwrap_err();
    assert!(e.to_string().contains("does not go with"), "{e}");
    let e = ClientTls::load(&f.server_key(), None).unwrap_err();
    assert!(e.to_string().contains("server-key.pem"), "{e}");
}

#[test]
fn host_of_strips_the_port_and_brackets() {
    assert_eq!(host_of("127.0.0.1:7100"), "127.0.0.1");
    assert_eq!(host_of("[::1]:7100"), "::1");
    assert_eq!(host_of("storage.example:1"), "storage.example");
}
