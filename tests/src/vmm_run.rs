//! One `vmm run` as the end-to-end tests and benchmarks drive it: the binary
//! with `--stats-json`, a deadline, and what it printed and wrote.

use crate::wait_for_exit;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// What one `vmm run` printed and its `--stats-json`.
pub struct VmmRun {
    /// It exited 0.
    pub ok: bool,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
    /// The `--stats-json` file, parsed (`Null` if it wrote none).
    pub json: serde_json::Value,
}

/// Runs `VMM run ARGS --stats-json FILE` with `RUST_LOG=warn`; past `deadline`
/// it is killed and the caller fails with its output.
pub fn vmm_run(vmm: &str, args: &[&str], deadline: Duration) -> VmmRun {
    static N: AtomicU64 = AtomicU64::new(0);
    let json_path = std::env::temp_dir().join(format!(
        "vmm-run-{}-{}.json",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let child = Command::new(vmm)
        .arg("run")
        .args(args)
        .arg("--stats-json")
        .arg(&json_path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vmm");
    let out = wait_for_exit(child, deadline, &format!("vmm run {args:?} did not finish"));
    let json = std::fs::read_to_string(&json_path)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(serde_json::Value::Null);
    let _ = std::fs::remove_file(&json_path);
    VmmRun {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        json,
    }
}
