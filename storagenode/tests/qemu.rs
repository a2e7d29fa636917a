//! Interoperability with QEMU's NBD implementation (Debian package qemu-utils):
//! `qemu-io` and `qemu-img` as clients of `storagenode`, and our client against
//! `qemu-nbd` as the server.

mod common;

use common::{
    Node, QemuNbd, TempDir, chain, connect_with_timeout, exercise, pattern, require_tool, signal,
};
use nbd_proto::client::{ClientError, NbdClient, Request};
use nbd_proto::wire::TransmissionFlags;
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// Runs `qemu-io -f raw URL -c CMD...` (`-r`: read-only); returns stdout, failing
/// on any error.
fn qemu_io(url: &str, read_only: bool, cmds: &[&str]) -> String {
    let bin = require_tool("qemu-io", "qemu-utils");
    let mut c = Command::new(bin);
    if read_only {
        c.arg("-r");
    }
    c.args(["-f", "raw", url]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = c.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success() && !stdout.contains("failed") && !stderr.contains("failed"),
        "qemu-io {cmds:?}: {:?}\n{stdout}\n{stderr}",
        out.status
    );
    stdout
}

fn url(node: &Node, export: &str) -> String {
    let port = node.addr().rsplit_once(':').unwrap().1;
    format!("nbd://127.0.0.1:{port}/{export}")
}

#[test]
fn qemu_io_and_qemu_img_against_storagenode() {
    let dir = TempDir::new("qemu-io");
    let node = Node::start(
        dir.path(),
        &[
            "--create",
            "disk0:64M",
            "--create",
            "img:4M",
            "--create",
            "ro:1M",
            "--read-only",
            "ro",
        ],
    );
    let u = url(&node, "disk0");
    // Write a pattern, flush, read it back (qemu-io verifies the pattern).
    qemu_io(
        &u,
        false,
        &[
            "write -P 0xab 0 1M",
            "flush",
            "read -P 0xab 0 1M",
            // FUA write, write-zeroes with and without unmapping, discard.
            "write -f -P 0x11 1M 64k",
            "read -P 0x11 1M 64k",
            "write -P 0x22 2M 1M",
            "write -z 2M 512k",
            "write -z -u 2560k 256k",
            "read -P 0 2M 768k",
            "read -P 0x22 2816k 256k",
            "discard 4M 1M",
            // Several requests in flight.
            "aio_write -P 1 8M 64k",
            "aio_write -P 2 9M 64k",
            "aio_write -P 3 10M 1M",
            "aio_flush",
            "aio_read -P 1 8M 64k",
            "aio_read -P 3 10M 1M",
            "aio_flush",
        ],
    );
    // A second client sees the first one's data.
    qemu_io(&u, true, &["read -P 0xab 0 1M", "read -P 2 9M 64k"]);
    // And so does ours.
    let c = node.client("disk0");
    let mut b = vec![0u8; 65536];
    c.read_at(MIB, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0x11));

    // Read-only export: reads work; QEMU will not open it for writing.
    let ro = url(&node, "ro");
    qemu_io(&ro, true, &["read -P 0 0 4k"]);
    let out = Command::new(require_tool("qemu-io", "qemu-utils"))
        .args(["-f", "raw", &ro, "-c", "write -P 1 0 4k"])
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success()
            && (all.contains("Permission denied") || all.contains("Operation not permitted")),
        "write to a read-only export: {all}"
    );

    // qemu-img info, and a convert round trip through the export.
    let info = Command::new(require_tool("qemu-img", "qemu-utils"))
        .args(["info", &url(&node, "img")])
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(
        info.contains("virtual size: 4 MiB (4194304 bytes)"),
        "{info}"
    );
    let work = TempDir::new("qemu-img");
    let src = work.path().join("src.raw");
    let mut data = pattern(9, 4 * MIB as usize);
    data[MIB as usize..2 * MIB as usize].fill(0); // a zero run for write-zeroes
    std::fs::write(&src, &data).unwrap();
    let status = Command::new(require_tool("qemu-img", "qemu-utils"))
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(url(&node, "img"))
        .status()
        .unwrap();
    assert!(status.success());
    let back = work.path().join("back.raw");
    let status = Command::new(require_tool("qemu-img", "qemu-utils"))
        .args(["convert", "-f", "raw", "-O", "raw", &url(&node, "img")])
        .arg(&back)
        .status()
        .unwrap();
    assert!(status.success());
    assert!(
        std::fs::read(&back).unwrap() == data,
        "qemu-img convert round trip differs"
    );
    // The volume file itself holds the same bytes.
    assert!(std::fs::read(dir.path().join("img")).unwrap() == data);
}

/// A raw 64 MiB file served by qemu-nbd.
fn qemu_server(tag: &str, extra: &[&str]) -> (TempDir, QemuNbd) {
    let dir = TempDir::new(tag);
    let file = dir.path().join("disk.raw");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    let q = QemuNbd::start(&file, "disk0", extra);
    (dir, q)
}

#[test]
fn our_client_against_qemu_nbd() {
    let (dir, q) = qemu_server("qemu-nbd", &[]);
    let c = q.client("disk0");
    let info = c.info().clone();
    assert!(info.used_go, "{info:?}");
    assert_eq!(info.size, 64 * MIB);
    assert!(info.flags.has(TransmissionFlags::SEND_FLUSH));
    exercise(&c);
    // Several clients at once.
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let addr = q.addr.clone();
            s.spawn(move || {
                let c = NbdClient::connect(&addr, "disk0").unwrap();
                let data = pattern(77 + t, 256 << 10);
                c.write_at(t * MIB, &data, false).unwrap();
                c.flush().unwrap();
                let mut b = vec![0u8; data.len()];
                c.read_at(t * MIB, &mut b).unwrap();
                assert!(b == data);
            });
        }
    });
    drop(c);
    drop(q);
    // qemu-nbd wrote through to the file.
    let f = std::fs::read(dir.path().join("disk.raw")).unwrap();
    assert!(f[..256 << 10] == pattern(77, 256 << 10)[..]);

    // Unknown export: a typed error naming the server.
    let (_dir, q) = qemu_server("qemu-nbd-unknown", &[]);
    match NbdClient::connect(&q.addr, "nope") {
        Err(e @ ClientError::UnknownExport { .. }) => assert!(e.to_string().contains(&q.addr)),
        other => panic!("expected UnknownExport, got {other:?}"),
    }
}

#[test]
fn our_client_against_read_only_qemu_nbd() {
    let (_dir, q) = qemu_server("qemu-nbd-ro", &["-r"]);
    let c = q.client("disk0");
    assert!(c.info().read_only());
    let e = c.write_at(0, &[1u8; 512], false).unwrap_err();
    assert!(matches!(e, ClientError::ReadOnly { .. }), "{e:?}");
    let mut b = vec![1u8; 4096];
    c.read_at(0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0));
}

#[test]
fn qemu_nbd_dying_fails_every_pending_request() {
    let (_dir, mut q) = qemu_server("qemu-nbd-dead", &[]);
    let c = connect_with_timeout(&q.addr, "disk0", Duration::from_secs(5));
    let (tx, rx) = std::sync::mpsc::channel();
    let mut submitted = 0;
    for i in 0..100u64 {
        let tx = tx.clone();
        let req = Request::Write {
            offset: (i % 64) * MIB,
            data: vec![3u8; MIB as usize],
            fua: true,
        };
        match c.submit(req, move |d| tx.send(d.result).unwrap()) {
            Ok(_) => submitted += 1,
            Err(e) => {
                // Once the death is noticed, submits fail at once.
                assert!(e.to_string().contains(&q.addr), "{}", chain(&e));
                break;
            }
        }
        if i == 20 {
            signal(q.child.id(), libc::SIGKILL);
        }
    }
    let t = Instant::now();
    let mut failed = 0;
    for _ in 0..submitted {
        if let Err(e) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("every request completes")
        {
            assert!(e.to_string().contains(&q.addr), "{}", chain(&e));
            failed += 1;
        }
    }
    assert!(failed > 0);
    assert!(t.elapsed() < Duration::from_secs(8));
    let _ = q.child.wait();
}
