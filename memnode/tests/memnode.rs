//! `memnode` as a separate process, driven by the fabric client over loopback.

mod common;

use common::{Node, pattern};
use fabric::proto::{self, ErrorCode, MAGIC, Message, PAGE_SIZE, PROTOCOL_VERSION, Role};
use fabric::{ClientConfig, ClientError, PageClient};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

#[test]
fn pages_of_many_vms_round_trip() {
    let node = Node::start(&["--capacity", "64M"]);
    let vms = [1u64, 2, 0xffff_ffff_ffff];
    let pages_per_vm = 1000u64;
    for &vm in &vms {
        let c = node.client(vm);
        // Batched writes of 50, then a few single writes over them (version 1).
        for base in (0..pages_per_vm).step_by(50) {
            let data: Vec<Vec<u8>> = (base..base + 50).map(|g| pattern(vm, g, 0)).collect();
            let batch: Vec<(u64, &[u8])> =
                (base..base + 50).zip(data.iter().map(|d| &d[..])).collect();
            c.write_pages(&batch).unwrap();
        }
        for g in (0..pages_per_vm).step_by(97) {
            c.write_pages(&[(g, &pattern(vm, g, 1))]).unwrap();
        }
    }
    for &vm in &vms {
        let c = node.client(vm);
        let mut buf = vec![0u8; PAGE_SIZE];
        for g in 0..pages_per_vm {
            assert!(
                c.read_page(g, &mut buf).unwrap(),
                "vm {vm} page {g} missing"
            );
            let version = if g % 97 == 0 { 1 } else { 0 };
            assert!(buf == pattern(vm, g, version), "vm {vm} page {g} differs");
        }
        // Batched reads, with never-written pages in the middle.
        let gpns: Vec<u64> = vec![3, pages_per_vm + 5, 4, pages_per_vm + 6];
        let mut out = vec![0xeeu8; 4 * PAGE_SIZE];
        let presence = c.read_pages(&gpns, &mut out).unwrap();
        assert_eq!(presence.0, 0b0101);
        assert!(out[..PAGE_SIZE] == pattern(vm, 3, 0)[..]);
        assert!(out[PAGE_SIZE..2 * PAGE_SIZE].iter().all(|&b| b == 0));
        let s = c.stats().unwrap();
        assert_eq!(s.vm_pages, pages_per_vm);
        assert_eq!(s.node_pages, pages_per_vm * vms.len() as u64);
        assert_eq!(s.node_vms, vms.len() as u64);
    }
    // Freed pages read as zeros and release capacity.
    let c = node.client(1);
    assert_eq!(c.free_pages(&[0, 1, pages_per_vm + 100]).unwrap(), 2);
    let mut buf = vec![1u8; PAGE_SIZE];
    assert!(!c.read_page(0, &mut buf).unwrap());
    assert!(buf.iter().all(|&b| b == 0));
    assert_eq!(c.stats().unwrap().vm_pages, pages_per_vm - 2);
}

#[test]
fn capacity_is_enforced_with_a_clear_error() {
    // 64 pages of capacity.
    let node = Node::start(&["--capacity", "256K"]);
    let c = node.client(1);
    assert_eq!(c.node().capacity_pages, 64);
    for g in 0..64 {
        c.write_pages(&[(g, &pattern(1, g, 0))]).unwrap();
    }
    let err = c.write_pages(&[(64, &pattern(1, 64, 0))]).unwrap_err();
    match &err {
        ClientError::Remote {
            code: ErrorCode::OutOfCapacity,
            message,
            ..
        } => {
            assert!(message.contains("out of capacity"), "{message}");
        }
        other => panic!("expected out of capacity, got {other:?}"),
    }
    assert!(err.to_string().contains(&node.addr), "{err}");
    // A batch that does not fit stores nothing; the connection goes on.
    let other = node.client(2);
    let p = pattern(2, 0, 0);
    assert!(other.write_pages(&[(0, &p), (1, &p)]).is_err());
    let mut buf = vec![0u8; PAGE_SIZE];
    assert!(!other.read_page(0, &mut buf).unwrap());
    // Overwrites and zero pages need no room; frees make room.
    c.write_pages(&[(5, &pattern(1, 5, 9))]).unwrap();
    c.write_pages(&[(6, &[0u8; PAGE_SIZE])]).unwrap();
    c.write_pages(&[(64, &pattern(1, 64, 0))]).unwrap();
    assert!(c.read_page(64, &mut buf).unwrap());
    assert!(buf == pattern(1, 64, 0));
    assert!(c.stats().unwrap().node_errors >= 2);
}

/// Reads frames off a raw socket until it closes; returns the error replies.
fn errors_until_closed(s: &mut TcpStream) -> Vec<(ErrorCode, String)> {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)
        .expect("the node closes the connection");
    let mut errors = Vec::new();
    let mut at = 0;
    while let Ok(Some((_, msg, used))) = proto::decode_frame(&buf[at..]) {
        if let Message::Error { code, message } = msg {
            errors.push((code, message.to_string()));
        }
        at += used;
    }
    errors
}

fn raw_hello(vm: u64) -> Vec<u8> {
    let mut b = Vec::new();
    Message::hello(Role::Vmm, vm, &[1; 32]).encode(1, &mut b);
    b
}

/// A raw connection through the whole handshake (hello, the node's challenge,
/// this side's proof, `HelloOk`) as a VMM of `vm`.
fn raw_session(addr: &str, vm: u64) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let nc = [1u8; 32];
    s.write_all(&raw_hello(vm)).unwrap();
    let mut buf = vec![0u8; 256];
    let mut have = 0;
    let mut next_frame = |s: &mut TcpStream| -> Vec<u8> {
        loop {
            if let Ok(Some((_, _, n))) = proto::decode_frame(&buf[..have]) {
                let f = buf[..n].to_vec();
                buf.copy_within(n..have, 0);
                have -= n;
                return f;
            }
            let n = s.read(&mut buf[have..]).unwrap();
            assert!(n > 0, "closed during the handshake");
            have += n;
        }
    };
    let frame = next_frame(&mut s);
    let Ok(Some((_, Message::Challenge { nonce, .. }, _))) = proto::decode_frame(&frame) else {
        panic!("expected a challenge");
    };
    let binding = fabric::auth::hello_binding(Role::Vmm as u8, PROTOCOL_VERSION, vm);
    let id = common::vm_secret().vm_identity(vm);
    let (key, sig) = (id.public(), id.sign(&binding, &nc, nonce));
    let mut out = Vec::new();
    Message::Proof {
        proof: None,
        vm: Some((&key, &sig)),
    }
    .encode(2, &mut out);
    s.write_all(&out).unwrap();
    let frame = next_frame(&mut s);
    assert!(
        matches!(
            proto::decode_frame(&frame),
            Ok(Some((_, Message::HelloOk { .. }, _)))
        ),
        "expected HelloOk"
    );
    s
}

#[test]
fn garbage_gets_an_error_and_a_disconnect_and_others_go_on() {
    let node = Node::start(&["--capacity", "16M"]);
    let good = node.client(7);
    good.write_pages(&[(1, &pattern(7, 1, 0))]).unwrap();

    // (what, whether the bytes follow a completed handshake, the bytes, the
    // error expected)
    let cases: Vec<(&str, bool, Vec<u8>, ErrorCode)> = vec![
        (
            "http request",
            false,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            ErrorCode::Malformed,
        ),
        (
            "random bytes",
            false,
            (0..200u32).map(|i| (i * 7919 % 251) as u8).collect(),
            ErrorCode::Malformed,
        ),
        (
            "oversized length",
            true,
            {
                let mut h = Vec::new();
                let mut f = Vec::new();
                f.extend_from_slice(&MAGIC.to_le_bytes());
                f.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
                f.extend_from_slice(&[5, 0]);
                f.extend_from_slice(&2u64.to_le_bytes());
                f.extend_from_slice(&u32::MAX.to_le_bytes());
                f.extend_from_slice(&[0; 4]);
                h.extend_from_slice(&f);
                h
            },
            ErrorCode::Malformed,
        ),
        (
            "unknown version",
            false,
            {
                let mut h = raw_hello(1);
                h[4] = 77;
                h
            },
            ErrorCode::Malformed,
        ),
        (
            "request before hello",
            false,
            {
                let mut b = Vec::new();
                Message::Stats.encode(1, &mut b);
                b
            },
            ErrorCode::HandshakeRequired,
        ),
        (
            "second hello",
            true,
            raw_hello(1),
            ErrorCode::HandshakeRequired,
        ),
        (
            "reply sent as request",
            true,
            {
                let mut b = Vec::new();
                Message::Pong { nonce: 1 }.encode(2, &mut b);
                b
            },
            ErrorCode::BadRequest,
        ),
        (
            "hello without a nonce",
            false,
            {
                let mut b = Vec::new();
                Message::hello(Role::Vmm, 1, b"").encode(1, &mut b);
                b
            },
            ErrorCode::AuthFailed,
        ),
        (
            "memnode role",
            false,
            {
                let mut b = Vec::new();
                Message::hello(Role::MemNode, 1, &[1; 32]).encode(1, &mut b);
                b
            },
            ErrorCode::BadRequest,
        ),
    ];
    for (name, after_handshake, bytes, want) in cases {
        let mut s = if after_handshake {
            raw_session(&node.addr, 1)
        } else {
            TcpStream::connect(&node.addr).unwrap()
        };
        s.write_all(&bytes).unwrap();
        let errors = errors_until_closed(&mut s);
        assert!(
            errors.iter().any(|(code, _)| *code == want),
            "{name}: expected a {want:?} error reply, got {errors:?}"
        );
        // The established client is unaffected, and new ones connect.
        let mut buf = vec![0u8; PAGE_SIZE];
        assert!(good.read_page(1, &mut buf).unwrap(), "{name}");
        assert!(buf == pattern(7, 1, 0));
        node.client(8).ping().unwrap();
    }
    // A truncated frame followed by a close leaves the node serving.
    let mut s = TcpStream::connect(&node.addr).unwrap();
    s.write_all(&raw_hello(1)[..10]).unwrap();
    drop(s);
    good.ping().unwrap();
    assert!(good.stats().unwrap().node_errors >= 8);
}

#[test]
fn silent_connections_time_out_and_connection_limit_holds() {
    let node = Node::start(&[
        "--capacity",
        "1M",
        "--handshake-timeout",
        "1",
        "--max-connections",
        "2",
    ]);
    let mut silent = TcpStream::connect(&node.addr).unwrap();
    let t = Instant::now();
    let errors = errors_until_closed(&mut silent);
    assert!(t.elapsed() >= Duration::from_millis(900));
    assert_eq!(
        errors.first().map(|e| e.0),
        Some(ErrorCode::HandshakeRequired)
    );
    // The node counts the silent connection until its thread has ended,
    // which on a loaded machine can be a moment after the close reached us.
    let connect = |vm: u64| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let config = ClientConfig {
                vm_id: vm,
                vm_secret: Some(common::vm_secret().clone()),
                ..ClientConfig::default()
            };
            match PageClient::connect(&node.addr, &config) {
                Ok(c) => return c,
                Err(e)
                    if e.to_string().contains("too many connections")
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("connect for vm {vm}: {e}"),
            }
        }
    };
    let a = connect(1);
    let _b = connect(2);
    let err = PageClient::connect(&node.addr, &ClientConfig::default())
        .err()
        .expect("third connection refused");
    assert!(err.to_string().contains("too many connections"), "{err}");
    a.ping().unwrap();
}

#[test]
fn concurrent_clients_and_threads_sharing_one_connection() {
    let node = Node::start(&["--capacity", "128M"]);
    let threads: Vec<_> = (0..6u64)
        .map(|vm| {
            let addr = node.addr.clone();
            std::thread::spawn(move || {
                let c = PageClient::connect(
                    &addr,
                    &ClientConfig {
                        vm_id: vm,
                        ..Default::default()
                    },
                )
                .unwrap();
                for g in 0..300 {
                    c.write_pages(&[(g, &pattern(vm, g, 0))]).unwrap();
                }
                let mut buf = vec![0u8; PAGE_SIZE];
                for g in 0..300 {
                    assert!(c.read_page(g, &mut buf).unwrap());
                    assert!(buf == pattern(vm, g, 0), "vm {vm} page {g}");
                }
            })
        })
        .collect();
    // Meanwhile, four threads pipeline on one shared connection of VM 100.
    let shared = node.client(100);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let c = shared.clone();
            s.spawn(move || {
                for i in 0..250u64 {
                    let g = t * 1000 + i;
                    c.write_pages(&[(g, &pattern(100, g, 0))]).unwrap();
                    // Keep several reads in flight from this thread.
                    let pend: Vec<_> = (0..4)
                        .map(|k| c.submit_read(&[t * 1000 + i.saturating_sub(k)]).unwrap())
                        .collect();
                    for (k, p) in pend.into_iter().enumerate() {
                        let mut buf = vec![0u8; PAGE_SIZE];
                        assert!(p.wait(&mut buf).unwrap().is_present(0));
                        let g = t * 1000 + i.saturating_sub(k as u64);
                        assert!(buf == pattern(100, g, 0), "shared page {g}");
                    }
                }
            });
        }
    });
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(shared.stats().unwrap().node_pages, 6 * 300 + 4 * 250);
}

#[test]
fn dead_and_unreachable_nodes_give_errors_naming_them() {
    let node = Node::start(&["--capacity", "1M"]);
    let c = node.client(1);
    c.ping().unwrap();
    let addr = node.addr.clone();
    drop(node); // kills the process
    let mut buf = vec![0u8; PAGE_SIZE];
    let err = c.read_page(0, &mut buf).unwrap_err();
    assert!(matches!(err, ClientError::ConnectionLost { .. }), "{err:?}");
    assert!(err.to_string().contains(&addr), "{err}");
    // Later calls fail fast with the same cause.
    assert!(c.ping().is_err());
    let err = PageClient::connect(&addr, &ClientConfig::default())
        .err()
        .expect("nobody listens");
    assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains(&addr), "{err}");
}

#[test]
fn link_model_adds_latency_both_ways() {
    let node = Node::start(&["--capacity", "1M"]);
    let slow = PageClient::connect(
        &node.addr,
        &ClientConfig {
            link_model: "latency=2ms,bw=1Gbit".parse().unwrap(),
            ..ClientConfig::default()
        },
    )
    .unwrap();
    let rtt = slow.ping().unwrap();
    assert!(
        rtt >= Duration::from_millis(4),
        "ping took {rtt:?} on a 2 ms link"
    );
    // A page read also pays serialisation: 4 KiB at 1 Gbit is ~33 us (the
    // page is stored first, so that the reply carries it).
    slow.write_pages(&[(0, &pattern(0, 0, 0))]).unwrap();
    let t = Instant::now();
    let mut buf = vec![0u8; PAGE_SIZE];
    assert!(slow.read_page(0, &mut buf).unwrap());
    assert!(t.elapsed() >= Duration::from_micros(4033));
    // Requests in flight overlap their latency instead of queueing behind it.
    let t = Instant::now();
    let pend: Vec<_> = (0..8).map(|g| slow.submit_read(&[g]).unwrap()).collect();
    for p in pend {
        p.wait(&mut buf).unwrap();
    }
    assert!(
        t.elapsed() < Duration::from_millis(4 * 8),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn sigterm_and_sigint_stop_cleanly() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let node = Node::start(&["--capacity", "1M"]);
        let c = node.client(1);
        c.write_pages(&[(0, &pattern(1, 0, 0))]).unwrap();
        let status = node.stop(sig);
        assert!(
            status.success(),
            "memnode exited with {status} on signal {sig}"
        );
        assert!(c.ping().is_err(), "connections are closed on shutdown");
    }
}

#[test]
fn metrics_endpoint_serves_prometheus_text() {
    let maddr = splitvisor_tests::free_loopback_addr();
    let node = Node::start(&["--capacity", "1M", "--metrics", &maddr]);
    let c = node.client(42);
    c.write_pages(&[(3, &pattern(42, 3, 0)), (4, &pattern(42, 4, 0))])
        .unwrap();
    let mut buf = vec![0u8; PAGE_SIZE];
    c.read_page(3, &mut buf).unwrap();
    c.read_page(99, &mut buf).unwrap();
    let (code, body) = splitvisor_tests::http_get(&maddr, "/metrics");
    assert_eq!(code, 200, "{body}");
    splitvisor_tests::promtool_check(&body);
    for line in [
        "splitvisor_memnode_vm_stored_pages{vm=\"42\"} 2",
        "splitvisor_memnode_vm_page_reads_total{vm=\"42\"} 2",
        "splitvisor_memnode_vm_zero_page_reads_total{vm=\"42\"} 1",
        "splitvisor_memnode_vm_page_writes_total{vm=\"42\"} 2",
        "splitvisor_memnode_capacity_pages 256",
        "# TYPE splitvisor_memnode_errors_total counter",
    ] {
        assert!(
            body.lines().any(|l| l == line),
            "missing `{line}` in:\n{body}"
        );
    }
}

#[test]
fn bad_command_lines_fail_with_one_clear_line() {
    for (args, want) in [
        (vec!["--capacity", "lots"], "lots"),
        (vec!["--capacity", "1K"], "holds no 4 KiB page"),
        (
            vec!["--listen", "256.0.0.1:1"],
            "cannot listen on 256.0.0.1:1",
        ),
        (
            vec!["--rdma", "rxe0"],
            if cfg!(feature = "rdma") {
                "no RDMA device named rxe0"
            } else {
                "built without the RDMA transport"
            },
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_memnode"))
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: stderr was {err}");
    }
}

#[test]
fn a_thread_that_submits_far_ahead_of_its_waits_does_not_deadlock() {
    // 100 full-batch reads (26 MiB of replies, far beyond the socket buffers) are
    // submitted before any is waited for, then writes: the client must read replies
    // itself while submitting, or the node blocks writing and we block sending.
    let node = Node::start(&["--capacity", "64M"]);
    let c = node.client(1);
    let gpns: Vec<u64> = (0..64).collect();
    let pending: Vec<_> = (0..100).map(|_| c.submit_read(&gpns).unwrap()).collect();
    let page = pattern(1, 5, 0);
    for g in 0..20 {
        c.write_pages(&[(g, &page)]).unwrap();
    }
    let mut out = vec![0u8; 64 * PAGE_SIZE];
    for p in pending {
        p.wait(&mut out).unwrap();
    }
    assert!(c.read_page(3, &mut out[..PAGE_SIZE]).unwrap());
}

#[test]
fn the_client_behaviour_checks_pass_over_tcp() {
    // The same checks run over RDMA in the nested host (fabric-check in its
    // rdma scenario, tests/nested/README.md).
    let node = Node::start(&["--capacity", "64M"]);
    memnode::client_checks::all(
        &|vm| {
            PageClient::connect(
                &node.addr,
                &ClientConfig {
                    vm_id: vm,
                    vm_secret: Some(common::vm_secret().clone()),
                    ..ClientConfig::default()
                },
            )
        },
        0x100,
    );
}

#[test]
fn fabric_check_measures_a_node_and_prints_one_line() {
    let node = Node::start(&["--capacity", "64M"]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fabric-check"))
        .args(["--addr", &node.addr, "--reads", "200", "--secs", "0.2"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with("FABRIC-CHECK "))
        .expect(&stdout);
    let field = |k: &str| -> f64 {
        line.split(' ')
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("{k} missing: {line}"))
            .parse()
            .unwrap()
    };
    assert!(line.contains(" checks=ok "), "{line}");
    assert!(
        field("read_p50_us") > 0.0 && field("read_p99_us") >= field("read_p50_us"),
        "{line}"
    );
    assert!(
        field("pipelined_pages_s") > 0.0 && field("batch_pages_s") > 0.0,
        "{line}"
    );
    assert_eq!(
        field("one_sided_pages"),
        0.0,
        "TCP reads nothing one-sided: {line}"
    );
    // Without the RDMA transport, an rdma:// node is refused with a clear error.
    if !cfg!(feature = "rdma") {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_fabric-check"))
            .args(["--addr", &format!("rdma://{}", node.addr), "--no-checks"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains("no RDMA transport (build with `--features rdma`)"),
            "{err}"
        );
    }
}
