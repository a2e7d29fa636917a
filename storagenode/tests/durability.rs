//! Durability: acknowledged FUA writes and flushed writes survive `kill -9` of the
//! node, and the node makes exactly the durable system calls it documents before
//! it replies (checked with `strace`).

mod common;

use common::{Node, TempDir, pattern, require_tool, signal, storagenode_bin};
use nbd_proto::client::{NbdClient, Request};
use splitvisor_tests::Daemon;
use std::process::Command;

const MIB: u64 = 1 << 20;

#[test]
fn fua_and_flushed_writes_survive_kill_9_and_restart() {
    let dir = TempDir::new("kill9");
    let node = Node::start(dir.path(), &["--create", "d:16M"]);
    let c = node.client("d");
    // FUA writes, pipelined, no flush: each is durable when acknowledged.
    let (tx, rx) = std::sync::mpsc::channel();
    for i in 0..64u64 {
        let tx = tx.clone();
        c.submit(
            Request::Write {
                offset: i * 8192,
                data: pattern(i, 8192),
                fua: true,
            },
            move |d| tx.send(d.result).unwrap(),
        )
        .unwrap();
    }
    for _ in 0..64 {
        rx.recv().unwrap().unwrap();
    }
    // Plain writes (both paths: small inline, large through the pool), then FLUSH.
    c.write_at(MIB, &pattern(1000, 4096), false).unwrap();
    c.write_at(2 * MIB, &pattern(1001, 3 * MIB as usize), false)
        .unwrap();
    c.write_zeroes(8 * MIB, MIB, true).unwrap();
    c.flush().unwrap();
    // Killed right after the acknowledgements.
    signal(node.pid(), libc::SIGKILL);
    let status = node.stop(libc::SIGKILL);
    assert!(!status.success());
    drop(c);

    // A new node on the same directory (keeping the volume) serves the data.
    let node = Node::start(dir.path(), &["--create", "d:16M"]);
    let c = node.client("d");
    for i in 0..64u64 {
        let mut b = vec![0u8; 8192];
        c.read_at(i * 8192, &mut b).unwrap();
        assert!(b == pattern(i, 8192), "FUA write {i} lost");
    }
    let mut b = vec![0u8; 4096];
    c.read_at(MIB, &mut b).unwrap();
    assert!(b == pattern(1000, 4096));
    let mut b = vec![0u8; 3 * MIB as usize];
    c.read_at(2 * MIB, &mut b).unwrap();
    assert!(b == pattern(1001, 3 * MIB as usize));
    let mut b = vec![1u8; MIB as usize];
    c.read_at(8 * MIB, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0));
}

/// The pid of a child of `parent`.
fn child_of(parent: u32) -> Option<u32> {
    for e in std::fs::read_dir("/proc").ok()? {
        let name = e.ok()?.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may contain spaces, so parse after ')'.
        let after = &stat[stat.rfind(')')? + 2..];
        let ppid: u32 = after.split(' ').nth(1)?.parse().ok()?;
        if ppid == parent {
            return Some(pid);
        }
    }
    None
}

/// Kills the traced node if the test fails half-way (killing strace alone would
/// leave it running, detached).
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        signal(self.0, libc::SIGKILL);
    }
}

#[test]
fn fua_and_flush_are_synced_before_the_reply() {
    let strace = require_tool("strace", "strace");
    let dir = TempDir::new("strace-vol");
    let trace_dir = TempDir::new("strace-log");
    let trace = trace_dir.path().join("trace");
    let mut d = Daemon::start(
        Command::new(strace)
            .args([
                "-f",
                "-qq",
                "-e",
                "trace=pwritev2,pwrite64,fdatasync,writev",
                "-o",
            ])
            .arg(&trace)
            .arg(storagenode_bin())
            .args(["--listen", "127.0.0.1:0", "--dir"])
            .arg(dir.path())
            .args(["--create", "d:1M"])
            .env("RUST_LOG", "warn"),
        "storagenode listening on ",
    );
    let node_pid = child_of(d.child.id()).expect("storagenode under strace");
    let _guard = KillOnDrop(node_pid);
    let c = NbdClient::connect(&d.addr, "d").unwrap();
    c.write_at(8192, &pattern(1, 4096), true).unwrap();
    c.write_at(16384, &pattern(2, 4096), false).unwrap();
    c.flush().unwrap();
    drop(c);
    signal(node_pid, libc::SIGTERM);
    let status = d.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let text = std::fs::read_to_string(&trace).unwrap();
    let lines: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(tid, rest)| (tid, rest.trim_start()))
        .collect();
    // The thread that made a durable call sends a reply after it.
    let replied_after = |pred: &dyn Fn(&str) -> bool| {
        lines.iter().enumerate().any(|(i, (tid, call))| {
            pred(call)
                && lines[i + 1..]
                    .iter()
                    .any(|(t, c)| t == tid && c.starts_with("writev("))
        })
    };
    assert!(
        replied_after(&|c| c.starts_with("pwritev2(") && c.contains(", 8192, RWF_DSYNC) = 4096")),
        "no pwritev2(RWF_DSYNC) followed by a reply for the FUA write:\n{text}"
    );
    assert!(
        replied_after(&|c| c.starts_with("fdatasync(") && c.ends_with("= 0")),
        "no fdatasync followed by a reply for the flush:\n{text}"
    );
    // The plain write was not synced on its own.
    assert!(
        lines
            .iter()
            .any(|(_, c)| c.starts_with("pwrite64(") && c.contains("16384) = 4096")),
        "{text}"
    );
}
