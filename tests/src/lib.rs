//! # splitvisor-tests: helpers for end-to-end tests
//!
//! Tests that start the workspace's daemons as separate processes (`memnode`,
//! `storagenode`) and drive them with the `vmm` binary or a client live next to their
//! crates (e.g. `vmm/tests/`); this crate holds what they share. The nested test
//! host harness will live under `tests/nested/` (issue "vmm boots stock Linux").

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

/// A daemon process that announces its address on its first stdout line; killed
/// when dropped.
pub struct Daemon {
    /// The process.
    pub child: Child,
    /// The address it announced.
    pub addr: String,
}

impl Daemon {
    /// Starts `cmd` and waits for its first line, `PREFIX ADDR`.
    pub fn start(cmd: &mut Command, prefix: &str) -> Daemon {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped stdout"))
            .read_line(&mut line)
            .expect("read the daemon's first line");
        let addr = line
            .trim()
            .strip_prefix(prefix)
            .unwrap_or_else(|| panic!("unexpected first line from {cmd:?}: {line:?}"))
            .to_string();
        Daemon { child, addr }
    }

    /// Starts `memnode --listen 127.0.0.1:0` from `bin` with `extra` arguments.
    pub fn memnode(bin: &Path, extra: &[&str]) -> Daemon {
        Daemon::start(
            Command::new(bin)
                .args(["--listen", "127.0.0.1:0"])
                .args(extra)
                .env(
                    "RUST_LOG",
                    std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
                ),
            "memnode listening on ",
        )
    }

    /// Starts `storagenode --listen 127.0.0.1:0 --dir DIR` from `bin` with `extra`
    /// arguments (e.g. `--create disk0:64M`) and waits for its
    /// `storagenode listening on ADDR` line.
    pub fn storagenode(bin: &Path, dir: &Path, extra: &[&str]) -> Daemon {
        Daemon::start(
            Command::new(bin)
                .args(["--listen", "127.0.0.1:0", "--dir"])
                .arg(dir)
                .args(extra)
                .env(
                    "RUST_LOG",
                    std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
                ),
            "storagenode listening on ",
        )
    }

    /// Sends `sig` and waits for the exit status.
    pub fn stop(mut self, sig: i32) -> ExitStatus {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
        self.child.wait().expect("wait for the daemon")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The path of workspace binary `name`, found beside `sibling` (another binary of
/// the same build, e.g. `env!("CARGO_BIN_EXE_vmm")`). Fails loudly if it is not built.
pub fn sibling_bin(sibling: &str, name: &str) -> PathBuf {
    let p = Path::new(sibling).with_file_name(name);
    assert!(
        p.exists(),
        "{} is not built; run the tests with `cargo test --workspace` (or `cargo build --workspace` first)",
        p.display()
    );
    p
}

/// Writes a benchmark's JSON `text` to `$SPLITVISOR_BENCH_OUT`, or else to
/// `target/bench/NAME.json` of the workspace; returns the path written.
pub fn write_bench_output(name: &str, text: &str) -> PathBuf {
    let path = std::env::var_os("SPLITVISOR_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target/bench")
                .join(format!("{name}.json"))
        });
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).expect("create the benchmark output directory");
    }
    std::fs::write(&path, text).expect("write the benchmark output");
    path
}

/// Writes a secret (a cluster key or a VM secret, as hex) to a new file of mode
/// 0600 in a fresh directory of its own, named by `tag` and this process; the
/// caller removes the directory when done.
pub fn secret_file(tag: &str, hex: &str) -> PathBuf {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = std::env::temp_dir().join(format!("splitvisor-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("secret.key");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&p)
        .unwrap();
    writeln!(f, "{hex}").unwrap();
    p
}
