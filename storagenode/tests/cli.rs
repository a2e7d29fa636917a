//! The `storagenode` command line: bad invocations fail with one clear line.

mod common;

use common::{Node, TempDir, storagenode_bin};
use std::process::Command;

/// Runs `storagenode ARGS` to completion; returns (exit code, stderr).
fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(storagenode_bin())
        .args(args)
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert!(
        out.stdout.is_empty(),
        "{args:?} printed to stdout: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    (
        out.status.code().expect("exited"),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Asserts one stderr line naming `needle`, and a failing exit code.
fn fails_with(args: &[&str], code: i32, needle: &str) {
    let (c, err) = run(args);
    assert_eq!(c, code, "{args:?}: {err}");
    assert_eq!(err.lines().count(), 1, "{args:?}: not one line: {err:?}");
    assert!(err.starts_with("storagenode: error: "), "{args:?}: {err:?}");
    assert!(err.contains(needle), "{args:?}: {err:?} lacks {needle:?}");
}

#[test]
fn usage_errors_are_one_line() {
    let dir = TempDir::new("cli-usage");
    let d = dir.path().to_str().unwrap();
    fails_with(&[], 2, "--dir");
    fails_with(&["--dir", d, "--bogus"], 2, "--bogus");
    fails_with(&["--dir", d, "--create", "disk0"], 2, "NAME:SIZE");
    fails_with(&["--dir", d, "--create", "..x:1M"], 2, "'..'");
    fails_with(&["--dir", d, "--create", "a/b:1M"], 2, "'/'");
    fails_with(&["--dir", d, "--create", "x:1000"], 2, "multiple of 512");
    fails_with(&["--dir", d, "--create", "x:0"], 2, "multiple of 512");
    fails_with(&["--dir", d, "--create", "x:12Q"], 2, "unknown unit");
    fails_with(&["--dir", d, "--io-threads", "0"], 2, "--io-threads");
    let (code, out) = {
        let o = Command::new(storagenode_bin())
            .arg("--help")
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        )
    };
    assert_eq!(code, Some(0));
    assert!(out.contains("--read-only"));
}

#[test]
fn runtime_errors_are_one_line() {
    let dir = TempDir::new("cli-runtime");
    let d = dir.path().to_str().unwrap();
    std::fs::write(dir.path().join("two"), vec![0u8; 2 << 20]).unwrap();
    fails_with(
        &["--dir", d, "--create", "two:1M"],
        1,
        "exists with 2097152 bytes",
    );
    fails_with(
        &["--dir", d, "--read-only", "missing"],
        1,
        "no volume named \"missing\"",
    );
    fails_with(
        &["--dir", d, "--read-only", "../up"],
        1,
        "invalid volume name",
    );
    fails_with(
        &["--dir", d, "--listen", "127.0.0.1:notaport"],
        1,
        "cannot listen on",
    );
    let file = dir.path().join("two");
    fails_with(
        &["--dir", file.to_str().unwrap()],
        1,
        "cannot use volume directory",
    );
    // A second node on a directory in use.
    let node = Node::start(dir.path(), &[]);
    fails_with(&["--dir", d], 1, "in use by another storagenode");
    // A volume that exists with the size asked for is kept.
    assert!(node.stop(libc::SIGTERM).success());
    let node = Node::start(dir.path(), &["--create", "two:2M"]);
    assert_eq!(node.client("two").size(), 2 << 20);
}
