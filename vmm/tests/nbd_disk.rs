//! The virtio-blk NBD backend (`--disk nbd://HOST:PORT/EXPORT`) against real
//! storage nodes in separate processes: our `storagenode` and `qemu-nbd`, with the
//! same checks. A guest's virtio-blk requests end up in `run_batch`; booting a
//! Linux guest on a remote disk is tested in the nested test host
//! (`tests/nested/run --scenario nbd-disk`).

use splitvisor_tests::tls::TlsFiles;
use splitvisor_tests::{Daemon, sibling_bin};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vmm::devices::nbd_disk::{NbdBackend, NbdUrl};
use vmm::devices::virtio_blk::{BlockBackend, BlockOp, OpKind};

const VMM: &str = env!("CARGO_BIN_EXE_vmm");
const MIB: usize = 1 << 20;

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmm-nbd-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes (sizes from 512 bytes to 4 MiB, so requests are split into pieces), a
/// flush in the middle of the batch, then reads everything back in one batch.
fn round_trip(d: &mut dyn BlockBackend, seed: u64) {
    let sizes = [512, 4096, 8192, 65536, MIB, 4 * MIB, 4096, 3 * 4096];
    let mut at = 0u64;
    let mut ops = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        ops.push(BlockOp::new(OpKind::Write, at, pattern(seed + i as u64, n)));
        if i == 3 {
            ops.push(BlockOp::new(OpKind::Flush, 0, Vec::new()));
        }
        at += n as u64 + 512;
    }
    ops.push(BlockOp::new(OpKind::Flush, 0, Vec::new()));
    d.run_batch(&mut ops);
    for op in &ops {
        assert!(op.result.is_ok(), "{:?}: {:?}", op.kind, op.result);
    }
    let mut reads: Vec<BlockOp> = ops
        .iter()
        .filter(|o| o.kind == OpKind::Write)
        .map(|o| BlockOp::new(OpKind::Read, o.offset, vec![0; o.buf.len()]))
        .collect();
    d.run_batch(&mut reads);
    for (r, w) in reads
        .iter()
        .zip(ops.iter().filter(|o| o.kind == OpKind::Write))
    {
        assert!(r.result.is_ok(), "{:?}", r.result);
        assert!(r.buf == w.buf, "data at {} differs", r.offset);
    }
    // Many small requests in one batch (all in flight together).
    let mut small: Vec<BlockOp> = (0..256u64)
        .map(|i| BlockOp::new(OpKind::Write, 16 * MIB as u64 + i * 4096, pattern(i, 4096)))
        .collect();
    d.run_batch(&mut small);
    assert!(small.iter().all(|o| o.result.is_ok()));
    let mut back = vec![0u8; 256 * 4096];
    d.read_at(&mut back, 16 * MIB as u64).unwrap();
    for i in 0..256usize {
        assert!(back[i * 4096..(i + 1) * 4096] == pattern(i as u64, 4096)[..]);
    }
}

fn storagenode(dir: &Path) -> Daemon {
    Daemon::storagenode(
        &sibling_bin(VMM, "storagenode"),
        dir,
        &["--create", "disk0:64M"],
    )
}

#[test]
fn nbd_backend_round_trip_against_storagenode() {
    let dir = tmpdir("sn");
    let node = storagenode(&dir);
    let url: NbdUrl = format!("nbd://{}/disk0", node.addr).parse().unwrap();
    let mut d = NbdBackend::connect(&url, false).unwrap();
    assert_eq!(d.size(), 64 << 20);
    assert!(!d.read_only());
    round_trip(&mut d, 1);
    // Read-only open: writes are refused before they reach the node.
    let ro = NbdBackend::connect(&url, true).unwrap();
    assert!(ro.read_only());
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
}

struct QemuNbd(Child, String);
impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qemu_nbd(file: &Path, export: &str) -> QemuNbd {
    qemu_nbd_with(file, export, &[], |addr| format!("nbd://{addr}/{export}"))
}

/// `qemu-nbd` with `extra` arguments, ready once a backend on `url(addr)` connects.
fn qemu_nbd_with(
    file: &Path,
    export: &str,
    extra: &[&str],
    url: impl Fn(&str) -> String,
) -> QemuNbd {
    let bin = ["/usr/bin/qemu-nbd", "/usr/local/bin/qemu-nbd"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or_else(|| {
            panic!("qemu-nbd not found: install it with 'apt-get install qemu-utils'")
        });
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(bin)
        .args(["-f", "raw", "-x", export, "-b", "127.0.0.1", "-p"])
        .arg(port.to_string())
        .args(["-t", "--shared=8", "--cache=writeback"])
        .args(extra)
        .arg(file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("start qemu-nbd");
    let addr = format!("127.0.0.1:{port}");
    let q = QemuNbd(child, addr.clone());
    let url: NbdUrl = url(&addr).parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while NbdBackend::connect(&url, false).is_err() {
        assert!(
            Instant::now() < deadline,
            "qemu-nbd did not start on {addr}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    q
}

#[test]
fn nbd_backend_round_trip_against_qemu_nbd() {
    let dir = tmpdir("qemu");
    let file = dir.join("disk.img");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let q = qemu_nbd(&file, "disk0");
    let url: NbdUrl = format!("nbd://{}/disk0", q.1).parse().unwrap();
    let mut d = NbdBackend::connect(&url, false).unwrap();
    assert_eq!(d.size(), 64 << 20);
    round_trip(&mut d, 7);
    drop(d);
    drop(q);
    // What qemu-nbd acknowledged is in the file.
    let data = std::fs::read(&file).unwrap();
    assert!(data[..512] == pattern(7, 512)[..]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn nbds_backend_round_trip_over_tls_against_storagenode_and_qemu_nbd() {
    let f = TlsFiles::new("vmm-nbds");
    let ca = f.ca().display().to_string();
    // storagenode, TLS only.
    let dir = tmpdir("sn-tls");
    let (cert, key) = (f.server_cert(), f.server_key());
    let node = Daemon::storagenode(
        &sibling_bin(VMM, "storagenode"),
        &dir,
        &[
            "--create",
            "disk0:64M",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let url: NbdUrl = format!("nbds://{}/disk0,ca={ca}", node.addr)
        .parse()
        .unwrap();
    let mut d = NbdBackend::connect(&url, false).unwrap();
    assert_eq!(d.size(), 64 << 20);
    round_trip(&mut d, 11);
    // Plaintext is refused with NBD's reply, naming the node.
    let plain: NbdUrl = format!("nbd://{}/disk0", node.addr).parse().unwrap();
    let e = fabric::client::error_chain(&NbdBackend::connect(&plain, false).err().unwrap());
    assert!(
        e.contains("NBD_REP_ERR_TLS_REQD") && e.contains(&node.addr),
        "{e}"
    );
    // A CA that did not issue the node's certificate: refused, with the reason.
    let other = f.other_ca().display().to_string();
    let wrong: NbdUrl = format!("nbds://{}/disk0,ca={other}", node.addr)
        .parse()
        .unwrap();
    let e = fabric::client::error_chain(&NbdBackend::connect(&wrong, false).err().unwrap());
    assert!(e.contains("TLS") && e.contains("UnknownIssuer"), "{e}");
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);

    // qemu-nbd with --tls-creds.
    let dir = tmpdir("qemu-tls");
    let file = dir.join("disk.img");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let object = format!(
        "tls-creds-x509,id=tls0,endpoint=server,dir={},verify-peer=off",
        f.dir.display()
    );
    let q = qemu_nbd_with(
        &file,
        "disk0",
        &["--object", &object, "--tls-creds", "tls0"],
        |addr| format!("nbds://{addr}/disk0,ca={ca}"),
    );
    let url: NbdUrl = format!("nbds://{}/disk0,ca={ca}", q.1).parse().unwrap();
    let mut d = NbdBackend::connect(&url, false).unwrap();
    round_trip(&mut d, 13);
    drop(d);
    drop(q);
    let data = std::fs::read(&file).unwrap();
    assert!(data[..512] == pattern(13, 512)[..]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_dying_storage_node_fails_requests_and_the_backend_reconnects() {
    let dir = tmpdir("dead");
    let bin = sibling_bin(VMM, "storagenode");
    let node = Daemon::storagenode(&bin, &dir, &["--create", "disk0:64M"]);
    let addr = node.addr.clone();
    let url: NbdUrl = format!("nbd://{addr}/disk0").parse().unwrap();
    let mut d = NbdBackend::connect(&url, false).unwrap();
    d.write_at(&pattern(3, 8192), 4096).unwrap();
    d.flush().unwrap();
    let _ = node.stop(libc::SIGKILL);

    // Every request of the batch fails, quickly, naming the node.
    let t = Instant::now();
    let mut ops: Vec<BlockOp> = (0..8u64)
        .map(|i| BlockOp::new(OpKind::Read, i * 4096, vec![0; 4096]))
        .collect();
    d.run_batch(&mut ops);
    for op in &ops {
        let e = op.result.as_ref().unwrap_err().to_string();
        assert!(e.contains(&addr), "error does not name the node: {e}");
    }
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(d.failures >= 8);

    // The node comes back on the same address: after the backoff the backend
    // reconnects and the flushed data is there.
    let node = Command::new(&bin)
        .args(["--listen", &addr, "--dir"])
        .arg(&dir)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _node = Kill(node);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut back = vec![0u8; 8192];
    loop {
        match d.read_at(&mut back, 4096) {
            Ok(()) => break,
            Err(e) => {
                assert!(Instant::now() < deadline, "no reconnect: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    assert!(back == pattern(3, 8192));
    assert_eq!(d.reconnects, 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_nbd_disks_are_one_clear_error() {
    // Unreachable node: one error line naming it, before anything boots.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let node = Daemon::memnode(&sibling_bin(VMM, "memnode"), &[]);
    let kernel = std::env::temp_dir().join(format!("vmm-nbd-bz-{}", std::process::id()));
    let mut b = vec![0u8; 0x1000];
    b[0x202..0x206].copy_from_slice(b"HdrS");
    std::fs::write(&kernel, b).unwrap();
    for (disk, want) in [
        (
            format!("nbd://127.0.0.1:{port}/disk0"),
            format!("127.0.0.1:{port}"),
        ),
        ("nbd://nohostport/x".to_string(), "HOST:PORT".to_string()),
    ] {
        let out = Command::new(VMM)
            .args(["run", "--memnode", &node.addr, "--allow-software-kvm"])
            .args(["--mem", "128M", "--local-cache", "16M", "--kernel"])
            .arg(&kernel)
            .args(["--disk", &disk])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(!stderr.contains("panicked"), "{stderr}");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
        assert_eq!(errors.len(), 1, "{stderr}");
        assert!(errors[0].contains(&want), "{stderr}");
    }
    let _ = std::fs::remove_file(&kernel);
}
