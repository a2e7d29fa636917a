//! The storage node over TLS (`NBD_OPT_STARTTLS`, `--tls-cert`/`--tls-key`/
//! `--tls-ca`), with certificates made by each test: our client, QEMU's clients
//! (`qemu-io`, `qemu-img` with a `tls-creds-x509` object) against `storagenode`,
//! and our client against `qemu-nbd --tls-creds`. A TLS node refuses plaintext
//! clients with NBD's error reply and serves others on.

mod common;

use common::raw::Raw;
use common::{Node, QemuNbd, TempDir, chain, exercise, require_tool};
use nbd_proto::client::{ClientConfig, ClientError, NbdClient};
use nbd_proto::tls::ClientTls;
use nbd_proto::wire::{Opt, Rep, decode_rep_server};
use splitvisor_tests::tls::TlsFiles;
use std::path::Path;
use std::process::Command;

const MIB: u64 = 1 << 20;

fn tls_node(dir: &Path, f: &TlsFiles, client_ca: bool, extra: &[&str]) -> Node {
    let (cert, key, ca) = (f.server_cert(), f.server_key(), f.ca());
    let mut args = vec![
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
    if client_ca {
        args.extend(["--tls-ca", ca.to_str().unwrap()]);
    }
    args.extend(extra);
    Node::start(dir, &args)
}

fn tls_config(tls: ClientTls) -> ClientConfig {
    ClientConfig {
        tls: Some(tls),
        ..ClientConfig::default()
    }
}

fn connect(addr: &str, export: &str, config: &ClientConfig) -> Result<NbdClient, ClientError> {
    NbdClient::connect_with(addr, export, config)
}

/// `qemu-io` with a TLS client object over `dir`: the NBD block driver's options.
fn qemu_io_tls(addr: &str, export: &str, dir: &Path, cmds: &[&str]) -> std::process::Output {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let mut c = Command::new(require_tool("qemu-io", "qemu-utils"));
    c.arg("--object").arg(format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        dir.display()
    ));
    c.arg("--image-opts").arg(format!(
        "driver=nbd,server.type=inet,server.host={host},server.port={port},export={export},tls-creds=tls0"
    ));
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.output().unwrap()
}

fn ok(out: &std::process::Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stdout.contains("failed") && !stderr.contains("failed"),
        "{what}: {:?}\n{stdout}\n{stderr}",
        out.status
    );
    stdout
}

/// Misused STARTTLS, raw: with data, and a second time inside TLS. Each gets
/// `NBD_REP_ERR_INVALID` with a message, and the haggling goes on.
#[test]
fn starttls_with_data_or_twice_is_invalid_and_the_connection_goes_on() {
    let f = TlsFiles::new("sn-raw");
    let dir = TempDir::new("tls-raw");
    let node = tls_node(dir.path(), &f, false, &["--create", "disk0:64M"]);
    let tls = ClientTls::load(&f.ca(), None).unwrap();
    let mut r = Raw::connect(node.addr());
    // STARTTLS carrying data: refused, and the connection is still plaintext,
    // so other options still need TLS.
    r.option(Opt::STARTTLS, b"junk");
    let (h, msg) = r.option_reply();
    assert_eq!((h.option, h.reply), (Opt::STARTTLS, Rep::ERR_INVALID));
    assert!(String::from_utf8_lossy(&msg).contains("no data"));
    r.option(Opt::LIST, &[]);
    assert_eq!(r.option_reply().0.reply, Rep::ERR_TLS_REQD);
    // Now properly; then a second STARTTLS inside TLS.
    r.starttls(&tls, node.addr());
    r.option(Opt::STARTTLS, &[]);
    let (h, msg) = r.option_reply();
    assert_eq!((h.option, h.reply), (Opt::STARTTLS, Rep::ERR_INVALID));
    assert!(String::from_utf8_lossy(&msg).contains("already"));
    // The TLS session goes on: LIST names the export, ABORT ends it.
    r.option(Opt::LIST, &[]);
    let (h, d) = r.option_reply();
    assert_eq!(h.reply, Rep::SERVER);
    assert_eq!(decode_rep_server(&d).unwrap(), "disk0");
    assert_eq!(r.option_reply().0.reply, Rep::ACK);
    r.option(Opt::ABORT, &[]);
    assert_eq!(r.option_reply().0.reply, Rep::ACK);
    assert!(r.closed_by_server());
    // The node serves others on.
    let c = connect(node.addr(), "disk0", &tls_config(tls)).unwrap();
    exercise(&c);
}

#[test]
fn our_client_over_tls_runs_the_request_suite_and_plaintext_is_refused() {
    let f = TlsFiles::new("sn-ours");
    let dir = TempDir::new("tls-ours");
    let node = tls_node(dir.path(), &f, false, &["--create", "disk0:64M"]);
    let tls = tls_config(ClientTls::load(&f.ca(), None).unwrap());
    let c = connect(node.addr(), "disk0", &tls).unwrap();
    assert!(c.is_tls());
    exercise(&c);
    // A plaintext client: NBD_REP_ERR_TLS_REQD, naming the fix.
    let e = connect(node.addr(), "disk0", &ClientConfig::default()).unwrap_err();
    match &e {
        ClientError::Refused { reply, message, .. } => {
            assert_eq!(*reply, Rep::ERR_TLS_REQD, "{}", chain(&e));
            assert!(message.contains("NBD_OPT_STARTTLS"), "{message}");
        }
        _ => panic!("plaintext client: {}", chain(&e)),
    }
    // A client trusting another CA: the handshake fails with the reason.
    let other = tls_config(ClientTls::load(&f.other_ca(), None).unwrap());
    let e = connect(node.addr(), "disk0", &other).unwrap_err();
    assert!(matches!(e, ClientError::Tls { .. }), "{}", chain(&e));
    assert!(chain(&e).contains("UnknownIssuer"), "{}", chain(&e));
    // The open session and new ones go on.
    c.write_at(0, &[0x5a; 4096], false).unwrap();
    let c2 = connect(node.addr(), "disk0", &tls).unwrap();
    let mut b = vec![0u8; 4096];
    c2.read_at(0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0x5a));
    // A plaintext client of a node without TLS asking for TLS gets an error, not
    // plaintext.
    let plain_dir = TempDir::new("tls-plain");
    let plain = Node::start(plain_dir.path(), &["--create", "d:1M"]);
    let e = connect(plain.addr(), "d", &tls).unwrap_err();
    assert!(
        matches!(&e, ClientError::Refused { reply, .. } if *reply == Rep::ERR_UNSUP),
        "{}",
        chain(&e)
    );
}

#[test]
fn qemu_io_and_qemu_img_over_tls_against_storagenode() {
    let f = TlsFiles::new("sn-qemu");
    let dir = TempDir::new("tls-qemu");
    let node = tls_node(dir.path(), &f, false, &["--create", "disk0:8M"]);
    ok(
        &qemu_io_tls(
            node.addr(),
            "disk0",
            &f.dir,
            &[
                "write -P 0xab 0 1M",
                "write -f -P 0x11 1M 64k",
                "flush",
                "read -P 0xab 0 1M",
                "read -P 0x11 1M 64k",
                "aio_write -P 7 4M 64k",
                "aio_write -P 8 5M 64k",
                "aio_flush",
                "read -P 7 4M 64k",
            ],
        ),
        "qemu-io over TLS",
    );
    // qemu-img reads the whole export over TLS: what qemu-io wrote is there.
    let out_file = dir.path().join("copy.raw");
    let (host, port) = node.addr().rsplit_once(':').unwrap();
    let out = Command::new(require_tool("qemu-img", "qemu-utils"))
        .arg("convert")
        .arg("--object")
        .arg(format!("tls-creds-x509,id=tls0,endpoint=client,dir={}", f.dir.display()))
        .arg("--image-opts")
        .arg(format!(
            "driver=nbd,server.type=inet,server.host={host},server.port={port},export=disk0,tls-creds=tls0"
        ))
        .args(["-O", "raw"])
        .arg(&out_file)
        .output()
        .unwrap();
    ok(&out, "qemu-img convert over TLS");
    let copy = std::fs::read(&out_file).unwrap();
    assert_eq!(copy.len() as u64, 8 * MIB);
    assert!(copy[..MIB as usize].iter().all(|&b| b == 0xab));
    assert!(
        copy[MIB as usize..MIB as usize + 65536]
            .iter()
            .all(|&b| b == 0x11)
    );
    assert!(
        copy[4 * MIB as usize..4 * MIB as usize + 65536]
            .iter()
            .all(|&b| b == 7)
    );
    // Plaintext qemu-io is refused, and the node serves TLS clients on.
    let out = Command::new(require_tool("qemu-io", "qemu-utils"))
        .args(["-f", "raw"])
        .arg(format!("nbd://{}/disk0", node.addr()))
        .args(["-c", "read 0 4k"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "plaintext qemu-io was served: {stderr}"
    );
    assert!(stderr.contains("TLS"), "plaintext qemu-io: {stderr}");
    ok(
        &qemu_io_tls(node.addr(), "disk0", &f.dir, &["read -P 0xab 0 4k"]),
        "qemu-io over TLS after a refused plaintext client",
    );
}

#[test]
fn client_certificates_are_required_with_tls_ca() {
    let f = TlsFiles::new("sn-mtls");
    let dir = TempDir::new("tls-mtls");
    let node = tls_node(dir.path(), &f, true, &["--create", "disk0:4M"]);
    // qemu-io presents client-cert.pem from its dir.
    ok(
        &qemu_io_tls(
            node.addr(),
            "disk0",
            &f.dir,
            &["write -P 3 0 64k", "read -P 3 0 64k"],
        ),
        "qemu-io with a client certificate",
    );
    let with_id =
        tls_config(ClientTls::load(&f.ca(), Some((&f.client_cert(), &f.client_key()))).unwrap());
    let c = connect(node.addr(), "disk0", &with_id).unwrap();
    let mut b = vec![0u8; 65536];
    c.read_at(0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 3));
    // Without a certificate: no session.
    let without = tls_config(ClientTls::load(&f.ca(), None).unwrap());
    let e = connect(node.addr(), "disk0", &without).unwrap_err();
    assert!(
        matches!(e, ClientError::Tls { .. } | ClientError::Io { .. }),
        "{}",
        chain(&e)
    );
    // The node is unharmed.
    c.write_at(0, &[4; 4096], true).unwrap();
}

#[test]
fn our_client_over_tls_against_qemu_nbd() {
    let f = TlsFiles::new("qemu-nbd");
    let dir = TempDir::new("tls-qemu-nbd");
    let file = dir.path().join("img.raw");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    let tls = tls_config(ClientTls::load(&f.ca(), None).unwrap());
    let object = format!(
        "tls-creds-x509,id=tls0,endpoint=server,dir={},verify-peer=off",
        f.dir.display()
    );
    let q = QemuNbd::start_with(
        &file,
        "img",
        &["--object", &object, "--tls-creds", "tls0"],
        &tls,
    );
    let c = connect(&q.addr, "img", &tls).unwrap();
    assert!(c.is_tls());
    exercise(&c);
    // qemu-nbd refuses our plaintext client too.
    let e = connect(&q.addr, "img", &ClientConfig::default()).unwrap_err();
    assert!(
        matches!(&e, ClientError::Refused { reply, .. } if *reply == Rep::ERR_TLS_REQD),
        "{}",
        chain(&e)
    );
}
