//! Shared by the storage node's integration tests: temporary directories, starting
//! `storagenode` and `qemu-nbd` as separate processes, a raw NBD connection for
//! malformed traffic, and the request suite run against both servers.
#![allow(dead_code)]

pub mod raw;

use nbd_proto::client::{ClientConfig, ClientError, NbdClient, Request};
use splitvisor_tests::Daemon;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A directory under the target directory's test area, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh, empty directory named after `tag`.
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "storagenode-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The path of `tool`, or a panic naming the Debian package that provides it.
pub fn require_tool(tool: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("`{tool}` is not installed; this test needs it: apt-get install {package}")
        })
}

/// The storagenode binary of this build.
pub fn storagenode_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_storagenode"))
}

/// A `storagenode` process on a free loopback port, killed when dropped.
pub struct Node {
    /// The process and its address.
    pub daemon: Daemon,
}

impl Node {
    /// Starts `storagenode --listen 127.0.0.1:0 --dir DIR EXTRA...`.
    pub fn start(dir: &Path, extra: &[&str]) -> Node {
        Node {
            daemon: Daemon::storagenode(storagenode_bin(), dir, extra),
        }
    }

    /// The node's address.
    pub fn addr(&self) -> &str {
        &self.daemon.addr
    }

    /// A client for `export` with default settings.
    pub fn client(&self, export: &str) -> NbdClient {
        NbdClient::connect(self.addr(), export)
            .unwrap_or_else(|e| panic!("connect to {export}: {}", chain(&e)))
    }

    /// Sends `sig` and waits for the exit status.
    pub fn stop(self, sig: i32) -> std::process::ExitStatus {
        self.daemon.stop(sig)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.daemon.child.id()
    }
}

/// A `qemu-nbd` process serving one file on a free loopback port, killed when
/// dropped.
pub struct QemuNbd {
    /// The process.
    pub child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
}

impl QemuNbd {
    /// Serves `file` as export `name` (raw, writeback cache, discards honoured,
    /// up to 16 clients) plus `extra` arguments; returns once it accepts connections.
    pub fn start(file: &Path, name: &str, extra: &[&str]) -> QemuNbd {
        Self::start_with(file, name, extra, &ClientConfig::default())
    }

    /// As [`QemuNbd::start`], checking readiness with a client of `config` (with
    /// TLS for a `--tls-creds` server).
    pub fn start_with(file: &Path, name: &str, extra: &[&str], config: &ClientConfig) -> QemuNbd {
        let bin = require_tool("qemu-nbd", "qemu-utils");
        for _attempt in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut child = Command::new(&bin)
                .args(["-f", "raw", "-x", name, "-b", "127.0.0.1", "-p"])
                .arg(port.to_string())
                .args(["-t", "--shared=16", "--discard=unmap", "--cache=writeback"])
                .args(extra)
                .arg(file)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .expect("start qemu-nbd");
            let addr = format!("127.0.0.1:{port}");
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // the port was taken: try another
                }
                // A full handshake (a bare connect makes qemu-nbd log an error).
                if NbdClient::connect_with(&addr, name, config).is_ok() {
                    return QemuNbd { child, addr };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("qemu-nbd did not start");
    }

    /// A client for `export`.
    pub fn client(&self, export: &str) -> NbdClient {
        NbdClient::connect(&self.addr, export)
            .unwrap_or_else(|e| panic!("connect to qemu-nbd: {}", chain(&e)))
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Deterministic bytes for (`seed`, `len`): misplaced or stale data shows.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// An error with its causes, for messages.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

// Each test binary uses some of these.
#[allow(unused_imports)]
pub use splitvisor_tests::freeze;

/// Sends `sig` to process `pid` (one of this test's children); a process
/// already gone is not an error (a guard may kill one that exited).
pub fn signal(pid: u32, sig: i32) {
    if let Err(e) = splitvisor_tests::send_signal(pid, sig) {
        assert_eq!(
            e.raw_os_error(),
            Some(libc::ESRCH),
            "kill({pid}, {sig}): {e}"
        );
    }
}

/// A client with a short I/O timeout, for dead-server tests.
pub fn connect_with_timeout(addr: &str, export: &str, timeout: Duration) -> NbdClient {
    NbdClient::connect_with(
        addr,
        export,
        &ClientConfig {
            io_timeout: Some(timeout),
            ..ClientConfig::default()
        },
    )
    .unwrap()
}

const MIB: u64 = 1 << 20;

/// The request suite run against every server: writes, reads, FUA, flush, trim,
/// write-zeroes, large chunked transfers and hundreds of requests in flight, each
/// verified. The export must be at least 64 MiB and writable.
pub fn exercise(c: &NbdClient) {
    let info = c.info().clone();
    assert!(info.size >= 64 * MIB, "{info:?}");
    assert!(!info.read_only(), "{info:?}");

    // Plain and FUA writes, read back.
    let a = pattern(1, MIB as usize);
    c.write_at(0, &a, false).unwrap();
    let mut back = vec![0u8; MIB as usize];
    c.read_at(0, &mut back).unwrap();
    assert!(back == a, "1 MiB written at 0 reads back differently");
    let b = pattern(2, 8192);
    c.write_at(MIB + 4096, &b, true).unwrap();
    c.flush().unwrap();
    let mut back = vec![0u8; 8192];
    c.read_at(MIB + 4096, &mut back).unwrap();
    assert!(back == b);

    // Write-zeroes, with and without NO_HOLE, over data.
    c.write_at(2 * MIB, &pattern(3, 2 * MIB as usize), false)
        .unwrap();
    c.write_zeroes(2 * MIB, MIB, false).unwrap();
    c.write_zeroes(3 * MIB, MIB - 4096, true).unwrap();
    let mut back = vec![1u8; 2 * MIB as usize];
    c.read_at(2 * MIB, &mut back).unwrap();
    let tail = pattern(3, 2 * MIB as usize);
    assert!(back[..(2 * MIB - 4096) as usize].iter().all(|&x| x == 0));
    assert!(back[(2 * MIB - 4096) as usize..] == tail[(2 * MIB - 4096) as usize..]);

    // Trim succeeds; the range is then undefined until rewritten.
    c.trim(4 * MIB, MIB).unwrap();
    c.write_at(4 * MIB, &pattern(4, 4096), false).unwrap();
    let mut back = vec![0u8; 4096];
    c.read_at(4 * MIB, &mut back).unwrap();
    assert!(back == pattern(4, 4096));

    // A transfer larger than one request (32 MiB), split and pipelined.
    let big = pattern(5, 40 * MIB as usize);
    c.write_at(8 * MIB, &big, false).unwrap();
    let mut back = vec![0u8; big.len()];
    c.read_at(8 * MIB, &mut back).unwrap();
    assert!(back == big, "40 MiB transfer differs");
    drop((big, back));

    // Hundreds of requests in flight: 512 writes of 4 KiB (every 8th FUA), then
    // reads of all of them interleaved with rewrites of other blocks.
    let base = 50 * MIB;
    let (tx, rx) = std::sync::mpsc::channel();
    for i in 0..512u64 {
        let tx = tx.clone();
        c.submit(
            Request::Write {
                offset: base + i * 4096,
                data: pattern(100 + i, 4096),
                fua: i % 8 == 0,
            },
            move |done| tx.send((i, done)).unwrap(),
        )
        .unwrap();
    }
    for _ in 0..512 {
        let (i, done) = rx.recv().unwrap();
        done.result
            .unwrap_or_else(|e| panic!("write {i}: {}", chain(&e)));
        assert_eq!(
            done.buf,
            pattern(100 + i, 4096),
            "write {i} buffer handed back"
        );
    }
    for i in 0..512u64 {
        let tx = tx.clone();
        let req = if i % 2 == 0 {
            Request::Read {
                offset: base + i * 4096,
                buf: vec![0u8; 4096],
            }
        } else {
            Request::Write {
                offset: base + i * 4096,
                data: pattern(1000 + i, 4096),
                fua: false,
            }
        };
        c.submit(req, move |done| tx.send((i, done)).unwrap())
            .unwrap();
    }
    for _ in 0..512 {
        let (i, done) = rx.recv().unwrap();
        done.result.unwrap();
        if i % 2 == 0 {
            assert!(done.buf == pattern(100 + i, 4096), "read {i} differs");
        }
    }
    c.flush().unwrap();
    for i in (1..512u64).step_by(2) {
        let mut back = vec![0u8; 4096];
        c.read_at(base + i * 4096, &mut back).unwrap();
        assert!(back == pattern(1000 + i, 4096), "rewrite {i} differs");
    }
    assert_eq!(c.in_flight(), 0);

    // Requests the export cannot take are refused before they are sent.
    let mut one = [0u8; 1];
    assert!(matches!(
        c.read_at(info.size, &mut one),
        Err(ClientError::Invalid { .. })
    ));
    assert!(matches!(
        c.call(Request::Read {
            offset: 0,
            buf: Vec::new()
        })
        .result,
        Err(ClientError::Invalid { .. })
    ));
    assert!(matches!(
        c.call(Request::Read {
            offset: 0,
            buf: vec![0; 33 << 20]
        })
        .result,
        Err(ClientError::Invalid { .. })
    ));
    // The connection is still good.
    let mut back = vec![0u8; 4096];
    c.read_at(0, &mut back).unwrap();
    assert!(back[..] == a[..4096]);
}
