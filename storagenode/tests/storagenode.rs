//! `storagenode` as a separate process, driven by our NBD client and by raw
//! protocol traffic over loopback.

mod common;

use common::raw::Raw;
use common::{Node, TempDir, chain, connect_with_timeout, exercise, freeze, pattern, signal};
use nbd_proto::client::{ClientError, NbdClient, Request};
use nbd_proto::wire::{
    Cmd, Errno, InfoRequest, Opt, Rep, TransmissionFlags, cmd_flags, decode_rep_server, info_type,
};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

#[test]
fn request_suite_on_both_paths() {
    let dir = TempDir::new("suite");
    // The default (fast path on the connection thread) and every request through
    // the worker pool.
    for extra in [&[][..], &["--no-fast-path"][..]] {
        let mut args = vec!["--create", "disk0:64M"];
        args.extend_from_slice(extra);
        let node = Node::start(dir.path(), &args);
        let c = node.client("disk0");
        let info = c.info().clone();
        assert!(info.used_go);
        assert_eq!(info.size, 64 * MIB);
        let f = info.flags;
        for flag in [
            TransmissionFlags::HAS_FLAGS,
            TransmissionFlags::SEND_FLUSH,
            TransmissionFlags::SEND_FUA,
            TransmissionFlags::SEND_TRIM,
            TransmissionFlags::SEND_WRITE_ZEROES,
            TransmissionFlags::CAN_MULTI_CONN,
        ] {
            assert!(f.has(flag), "{f:?} lacks {flag:#x}");
        }
        assert!(!f.has(TransmissionFlags::READ_ONLY));
        assert_eq!((info.min_block, info.max_block), (1, 32 << 20));
        exercise(&c);
        drop(c);
        assert!(node.stop(libc::SIGTERM).success());
    }
    // The volume is a sparse file of the export's size.
    let meta = std::fs::metadata(dir.path().join("disk0")).unwrap();
    assert_eq!(meta.len(), 64 * MIB);
}

#[test]
fn many_clients_at_once_share_the_volume() {
    let dir = TempDir::new("clients");
    let node = Node::start(dir.path(), &["--create", "shared:64M"]);
    let addr = node.addr().to_string();
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let addr = &addr;
            s.spawn(move || {
                let c = NbdClient::connect(addr, "shared").unwrap();
                let base = t * 8 * MIB;
                let (tx, rx) = std::sync::mpsc::channel();
                for round in 0..4u64 {
                    for i in 0..64u64 {
                        let tx = tx.clone();
                        c.submit(
                            Request::Write {
                                offset: base + i * 16384,
                                data: pattern(t << 32 | round << 16 | i, 16384),
                                fua: false,
                            },
                            move |d| tx.send(d.result).unwrap(),
                        )
                        .unwrap();
                    }
                    for _ in 0..64 {
                        rx.recv().unwrap().unwrap();
                    }
                    for i in 0..64u64 {
                        let mut back = vec![0u8; 16384];
                        c.read_at(base + i * 16384, &mut back).unwrap();
                        assert!(back == pattern(t << 32 | round << 16 | i, 16384));
                    }
                }
                c.flush().unwrap();
            });
        }
    });
    // One client's acknowledged writes are visible to another connection at once
    // (one shared file; CAN_MULTI_CONN).
    let a = node.client("shared");
    let b = node.client("shared");
    a.write_at(60 * MIB, &pattern(7, 65536), true).unwrap();
    let mut back = vec![0u8; 65536];
    b.read_at(60 * MIB, &mut back).unwrap();
    assert!(back == pattern(7, 65536));
}

#[test]
fn read_only_export_refuses_writes() {
    let dir = TempDir::new("ro");
    let node = Node::start(
        dir.path(),
        &[
            "--create",
            "ro:1M",
            "--create",
            "rw:1M",
            "--read-only",
            "ro",
        ],
    );
    node.client("rw").write_at(0, &[5u8; 4096], true).unwrap();
    let c = node.client("ro");
    assert!(c.info().read_only());
    assert!(!c.info().flags.has(TransmissionFlags::SEND_TRIM));
    let e = c.write_at(0, &[1u8; 4096], false).unwrap_err();
    assert!(matches!(e, ClientError::ReadOnly { .. }), "{e:?}");
    let mut buf = vec![1u8; 4096];
    c.read_at(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    c.flush().unwrap();

    // A client that writes anyway gets EPERM, and the connection goes on.
    let (mut r, size, flags) = Raw::go(node.addr(), "ro");
    assert_eq!(size, MIB);
    assert!(flags & TransmissionFlags::READ_ONLY != 0);
    r.request(Cmd::WRITE, 0, 1, 0, 4096, &[9u8; 4096]);
    assert_eq!(r.reply().error, Errno::EPERM.0);
    r.request(Cmd::TRIM, 0, 2, 0, 4096, &[]);
    assert_eq!(r.reply().error, Errno::EPERM.0);
    r.request(Cmd::WRITE_ZEROES, 0, 3, 0, 4096, &[]);
    assert_eq!(r.reply().error, Errno::EPERM.0);
    r.request(Cmd::READ, 0, 4, 0, 4096, &[]);
    let rep = r.reply();
    assert_eq!((rep.error, rep.handle), (0, 4));
    assert!(r.data(4096).iter().all(|&b| b == 0));
}

#[test]
fn unknown_exports_and_option_haggling() {
    let dir = TempDir::new("opts");
    let node = Node::start(dir.path(), &["--create", "b:1M", "--create", "a:2M"]);
    std::fs::create_dir(dir.path().join("not-a-volume")).unwrap();
    // Our client: a typed error naming the server.
    for name in [
        "nope",
        "../etc/passwd",
        "",
        ".storagenode.lock",
        "not-a-volume",
    ] {
        match NbdClient::connect(node.addr(), name) {
            Err(e @ ClientError::UnknownExport { .. }) => {
                assert!(e.to_string().contains(node.addr()), "{e}");
            }
            other => panic!("{name:?}: expected UnknownExport, got {other:?}"),
        }
    }
    // NBD_OPT_EXPORT_NAME for an unknown export: the server closes the connection.
    let mut r = Raw::connect(node.addr());
    r.option(Opt::EXPORT_NAME, b"nope");
    assert!(r.closed_by_server());

    // LIST, INFO, refused options, then GO on the same connection.
    let mut r = Raw::connect(node.addr());
    r.option(Opt::LIST, &[]);
    let mut names = Vec::new();
    loop {
        let (h, d) = r.option_reply();
        assert_eq!(h.option, Opt::LIST);
        match h.reply {
            Rep::SERVER => names.push(decode_rep_server(&d).unwrap().to_string()),
            Rep::ACK => break,
            other => panic!("{other}"),
        }
    }
    assert_eq!(names, ["a", "b"]);
    r.option(Opt::LIST, b"junk");
    assert_eq!(r.option_reply().0.reply, Rep::ERR_INVALID);
    for opt in [
        Opt::STRUCTURED_REPLY,
        Opt::STARTTLS,
        Opt::SET_META_CONTEXT,
        Opt(999),
    ] {
        r.option(opt, &[]);
        let (h, msg) = r.option_reply();
        assert_eq!((h.option, h.reply), (opt, Rep::ERR_UNSUP));
        assert!(!msg.is_empty());
    }
    let mut d = Vec::new();
    InfoRequest {
        name: "a",
        requests: vec![info_type::NAME, info_type::BLOCK_SIZE],
    }
    .encode(&mut d);
    r.option(Opt::INFO, &d);
    let mut infos = Vec::new();
    loop {
        let (h, d) = r.option_reply();
        if h.reply == Rep::ACK {
            break;
        }
        assert_eq!(h.reply, Rep::INFO);
        infos.push(nbd_proto::wire::Info::decode(&d).unwrap());
    }
    assert!(infos.contains(&nbd_proto::wire::Info::Name("a".into())));
    assert!(infos.iter().any(|i| matches!(
        i,
        nbd_proto::wire::Info::Export { size, .. } if *size == 2 * MIB
    )));
    r.option(Opt::INFO, &[0, 0, 0, 50, 0]);
    assert_eq!(r.option_reply().0.reply, Rep::ERR_INVALID);
    let mut d = Vec::new();
    InfoRequest {
        name: "zzz",
        requests: vec![],
    }
    .encode(&mut d);
    r.option(Opt::GO, &d);
    let (h, msg) = r.option_reply();
    assert_eq!(h.reply, Rep::ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&msg).contains("zzz"));
    // EXPORT_NAME (with NO_ZEROES negotiated: 10 bytes) enters transmission.
    r.option(Opt::EXPORT_NAME, b"b");
    let size_flags = r.data(10);
    assert_eq!(u64::from_be_bytes(size_flags[..8].try_into().unwrap()), MIB);
    r.request(Cmd::READ, 0, 77, 0, 512, &[]);
    assert_eq!(r.reply().handle, 77);
    r.data(512);
    r.request(Cmd::DISC, 0, 78, 0, 0, &[]);
    assert!(r.closed_by_server());

    // ABORT is acknowledged, then the connection ends.
    let mut r = Raw::connect(node.addr());
    r.option(Opt::ABORT, &[]);
    assert_eq!(r.option_reply().0.reply, Rep::ACK);
    assert!(r.closed_by_server());
}

#[test]
fn bad_requests_get_errors_and_the_connection_goes_on() {
    let dir = TempDir::new("badreq");
    let node = Node::start(dir.path(), &["--create", "d:4M"]);
    let (mut r, size, _) = Raw::go(node.addr(), "d");
    assert_eq!(size, 4 * MIB);
    let expect = |r: &mut Raw, handle: u64, errno: Errno| {
        let rep = r.reply();
        assert_eq!(
            (rep.handle, Errno(rep.error)),
            (handle, errno),
            "reply to request {handle}"
        );
    };
    // Out of range.
    r.request(Cmd::READ, 0, 1, 4 * MIB - 512, 1024, &[]);
    expect(&mut r, 1, Errno::EINVAL);
    r.request(Cmd::READ, 0, 2, u64::MAX - 10, 512, &[]);
    expect(&mut r, 2, Errno::EINVAL);
    r.request(Cmd::WRITE, 0, 3, 4 * MIB, 4096, &[1u8; 4096]);
    expect(&mut r, 3, Errno::ENOSPC);
    r.request(Cmd::TRIM, 0, 4, 4 * MIB - 4096, 8192, &[]);
    expect(&mut r, 4, Errno::EINVAL);
    r.request(Cmd::WRITE_ZEROES, 0, 5, 5 * MIB, 1, &[]);
    expect(&mut r, 5, Errno::EINVAL);
    // Oversized (more than 32 MiB): a read is refused; a write's payload is
    // skipped and the connection goes on.
    r.request(Cmd::READ, 0, 6, 0, (32 << 20) + 1, &[]);
    expect(&mut r, 6, Errno::EINVAL);
    let big = vec![0x5au8; (33 << 20) as usize];
    r.request(Cmd::WRITE, 0, 7, 0, big.len() as u32, &big);
    expect(&mut r, 7, Errno::EINVAL);
    // Flags not valid for the command, unknown commands, a flush with a range.
    r.request(Cmd::READ, cmd_flags::DF, 8, 0, 512, &[]);
    expect(&mut r, 8, Errno::EINVAL);
    r.request(Cmd::WRITE, cmd_flags::NO_HOLE, 9, 0, 512, &[0u8; 512]);
    expect(&mut r, 9, Errno::EINVAL);
    r.request(Cmd(42), 0, 10, 0, 0, &[]);
    expect(&mut r, 10, Errno::EINVAL);
    r.request(Cmd::BLOCK_STATUS, 0, 11, 0, 512, &[]);
    expect(&mut r, 11, Errno::EINVAL);
    r.request(Cmd::FLUSH, 0, 12, 0, 512, &[]);
    expect(&mut r, 12, Errno::EINVAL);
    // Still serving, and nothing was written by the refused requests.
    r.request(Cmd::WRITE, cmd_flags::FUA, 13, 4096, 4, b"abcd");
    expect(&mut r, 13, Errno(0));
    r.request(Cmd::READ, 0, 14, 0, 8192, &[]);
    expect(&mut r, 14, Errno(0));
    let d = r.data(8192);
    assert!(d[..4096].iter().all(|&b| b == 0));
    assert_eq!(&d[4096..4100], b"abcd");
    // Zero-length requests succeed without effect.
    r.request(Cmd::READ, 0, 15, 0, 0, &[]);
    expect(&mut r, 15, Errno(0));

    // A write whose payload is too large to skip: error reply, then disconnect.
    r.request(Cmd::WRITE, 0, 16, 0, 1 << 30, &[]);
    expect(&mut r, 16, Errno::EINVAL);
    assert!(r.closed_by_server());
    // Garbage in the transmission phase (bad request magic): disconnect.
    let (mut r, _, _) = Raw::go(node.addr(), "d");
    r.send(&[0xffu8; 28]);
    assert!(r.closed_by_server());
    // The node is fine.
    let c = node.client("d");
    let mut b = [0u8; 4];
    c.read_at(4096, &mut b).unwrap();
    assert_eq!(&b, b"abcd");
}

#[test]
fn garbage_handshakes_are_dropped_and_good_clients_go_on() {
    let dir = TempDir::new("garbage");
    let node = Node::start(
        dir.path(),
        &["--create", "d:1M", "--handshake-timeout", "1"],
    );
    // An HTTP request instead of client flags and options.
    let mut r = Raw::greet(node.addr());
    r.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(r.closed_by_server());
    // Good client flags, then an option with a bad magic.
    let mut r = Raw::connect(node.addr());
    r.send(&[0u8; 16]);
    assert!(r.closed_by_server());
    // Unknown client flags.
    let mut r = Raw::greet(node.addr());
    r.send(&0x80u32.to_be_bytes());
    assert!(r.closed_by_server());
    // An implausibly long option.
    let mut r = Raw::connect(node.addr());
    let mut h = Vec::new();
    nbd_proto::wire::encode_option(&mut h, Opt::GO, &[]);
    h[12..16].copy_from_slice(&(1u32 << 30).to_be_bytes());
    r.send(&h);
    assert!(r.closed_by_server());
    // A client that never finishes its handshake is cut off at the deadline, while
    // another client is served meanwhile.
    let t = Instant::now();
    let mut slow = Raw::greet(node.addr());
    let c = node.client("d");
    c.write_at(0, &[3u8; 512], false).unwrap();
    assert!(slow.closed_by_server());
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    let mut b = [0u8; 512];
    c.read_at(0, &mut b).unwrap();
    assert_eq!(b, [3u8; 512]);
}

#[test]
fn a_dead_server_fails_every_pending_request() {
    let dir = TempDir::new("dead");
    let node = Node::start(dir.path(), &["--create", "d:64M"]);
    let c = NbdClient::connect(node.addr(), "d").unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Keep up to 128 requests in flight from another thread while the server dies.
    let submitter = {
        let c = c.clone();
        let done = done.clone();
        std::thread::spawn(move || {
            let mut submitted = 0u64;
            let mut refused = None;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let tx = tx.clone();
                let req = Request::Write {
                    offset: (submitted % 1024) * 65536,
                    data: vec![1u8; 65536],
                    fua: submitted % 3 == 0,
                };
                match c.submit(req, move |d| tx.send(d.result).unwrap()) {
                    Ok(_) => submitted += 1,
                    Err(e) => {
                        refused = Some(e);
                        break;
                    }
                }
            }
            (submitted, refused)
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    signal(node.pid(), libc::SIGKILL);
    let t = Instant::now();
    let (submitted, refused) = {
        std::thread::sleep(Duration::from_millis(200));
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        submitter.join().unwrap()
    };
    let mut failed = 0;
    for _ in 0..submitted {
        match rx
            .recv_timeout(Duration::from_secs(10))
            .expect("every request completes")
        {
            Ok(()) => {}
            Err(e) => {
                assert!(
                    matches!(e, ClientError::Disconnected { .. }),
                    "{}",
                    chain(&e)
                );
                assert!(e.to_string().contains(node.addr()));
                failed += 1;
            }
        }
    }
    assert!(failed > 0, "no request was pending when the server died");
    assert!(t.elapsed() < Duration::from_secs(5));
    let refused = refused.expect("submits fail once the connection is dead");
    assert!(
        matches!(refused, ClientError::Disconnected { .. }),
        "{refused:?}"
    );
    let e = c.flush().unwrap_err();
    assert!(matches!(e, ClientError::Disconnected { .. }), "{e:?}");
    assert_eq!(c.in_flight(), 0);
    drop(node);

    // A server that stops answering (SIGSTOP) trips the I/O timeout.
    let node = Node::start(dir.path(), &[]);
    let c = connect_with_timeout(node.addr(), "d", Duration::from_millis(500));
    c.write_at(0, &[1u8; 4096], false).unwrap();
    freeze(node.pid());
    let t = Instant::now();
    let e = c.flush().unwrap_err();
    assert!(matches!(e, ClientError::TimedOut { .. }), "{}", chain(&e));
    assert!(t.elapsed() < Duration::from_secs(3));
    signal(node.pid(), libc::SIGCONT);
}

#[test]
fn sigterm_and_sigint_stop_cleanly() {
    let dir = TempDir::new("stop");
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let node = Node::start(dir.path(), &["--create", "d:1M"]);
        let c = node.client("d");
        c.write_at(0, &[7u8; 4096], false).unwrap();
        let idle = Raw::greet(node.addr());
        let status = node.stop(sig);
        assert!(status.success(), "signal {sig}: {status:?}");
        assert!(c.flush().is_err());
        drop(idle);
    }
}

#[test]
fn metrics_count_the_traffic_and_pass_promtool() {
    let dir = TempDir::new("metrics");
    let maddr = splitvisor_tests::free_loopback_addr();
    let node = Node::start(dir.path(), &["--create", "disk0:64M", "--metrics", &maddr]);
    let c = node.client("disk0");
    c.write_at(0, &pattern(7, 65536), false).unwrap();
    c.flush().unwrap();
    let mut back = vec![0u8; 4096];
    c.read_at(0, &mut back).unwrap();
    let (code, text) = splitvisor_tests::http_get(&maddr, "/metrics");
    assert_eq!(code, 200, "{text}");
    splitvisor_tests::promtool_check(&text);
    for line in [
        "splitvisor_storagenode_volumes 1",
        "splitvisor_storagenode_written_bytes_total 65536",
        "splitvisor_storagenode_read_bytes_total 4096",
        "splitvisor_storagenode_flushes_total 1",
        "splitvisor_storagenode_open_connections 1",
        "splitvisor_storagenode_sessions_total 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in:\n{text}"
        );
    }
    assert_eq!(splitvisor_tests::http_get(&maddr, "/other").0, 404);
}
