//! # splitvisor-tests: helpers for end-to-end tests
//!
//! Tests that start the workspace's daemons as separate processes (`memnode`,
//! `storagenode`) and drive them with the `vmm` binary or a client live next to their
//! crates (e.g. `vmm/tests/`); this crate holds what they share. The nested test
//! host harness will live under `tests/nested/` (issue "vmm boots stock Linux").

pub mod tls;
mod vmm_run;

pub use vmm_run::{VmmRun, vmm_run};

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};

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

    /// Stops the daemon with SIGSTOP and returns once every one of its threads
    /// is stopped (see [`freeze`]).
    pub fn freeze(&self) {
        freeze(self.child.id());
    }

    /// Lets a frozen daemon go on (SIGCONT).
    pub fn thaw(&self) {
        self.signal(libc::SIGCONT);
    }

    /// Sends `sig` to the daemon, which must still be there.
    pub fn signal(&self, sig: i32) {
        let pid = self.child.id();
        send_signal(pid, sig).unwrap_or_else(|e| panic!("kill({pid}, {sig}): {e}"));
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

/// Sends `sig` to process `pid` (one of this test's children). An error is
/// `ESRCH` when the process is gone (already reaped).
pub fn send_signal(pid: u32, sig: i32) -> std::io::Result<()> {
    // SAFETY: kill(2) on a child process the test started; no memory is involved.
    let rc = unsafe { libc::kill(pid as i32, sig) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Sends SIGSTOP to `pid` and waits until each of its threads is stopped
/// (state `T` in `/proc/PID/task/*/stat`). kill(2) returns before that: the
/// group stop starts when one thread dequeues the signal, and until then the
/// others run on, so a test that sends a request right after kill(2) could
/// still get its answer.
pub fn freeze(pid: u32) {
    send_signal(pid, libc::SIGSTOP).unwrap_or_else(|e| panic!("SIGSTOP to {pid}: {e}"));
    let t = std::time::Instant::now();
    let tasks = PathBuf::from(format!("/proc/{pid}/task"));
    loop {
        let running: Vec<String> = std::fs::read_dir(&tasks)
            .unwrap_or_else(|e| panic!("{}: {e}", tasks.display()))
            .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("stat")).ok())
            .filter(|stat| {
                // The state follows the command name's closing parenthesis.
                let state = stat.rsplit_once(')').map(|(_, r)| r.trim_start());
                !matches!(state.and_then(|r| r.chars().next()), Some('T' | 't'))
            })
            .collect();
        if running.is_empty() {
            return;
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(10),
            "process {pid} not stopped 10 s after SIGSTOP: {running:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Fails loudly unless this process may open `/dev/kvm` read-write (the
/// tests that boot VMs need it; their names start with `kvm_`).
pub fn require_kvm() {
    assert!(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok(),
        "these tests need read/write access to /dev/kvm"
    );
}

/// Waits for `child` to exit; past `deadline` kills it and fails with `what`
/// and its output.
pub fn wait_for_exit(mut child: Child, deadline: std::time::Duration, what: &str) -> Output {
    let t = std::time::Instant::now();
    while child.try_wait().expect("wait for a child").is_none() {
        if t.elapsed() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("collect a child's output");
            panic!(
                "{what} (after {deadline:?})\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().expect("collect a child's output")
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

/// `GET path` over HTTP/1.0 from `addr` (HOST:PORT); returns the status code
/// and the body.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)
        .unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"));
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP reply from {addr}: {text}"));
    (code, body.to_string())
}

/// Checks a metrics exposition with Prometheus's own linter, `promtool check
/// metrics` (Debian's `prometheus` package, which `.ci/run` installs): the
/// text must parse, and names, types and help must follow Prometheus's
/// conventions. Fails loudly if promtool is missing.
pub fn promtool_check(text: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("promtool is needed to check the metrics (apt-get install prometheus): {e}")
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics refused the exposition:\n{}{}\n---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A loopback address (`127.0.0.1:PORT`) whose port was free a moment ago, for
/// a daemon's `--metrics` listener.
pub fn free_loopback_addr() -> String {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    probe.local_addr().unwrap().to_string()
}
