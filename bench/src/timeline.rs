//! The attach/detach run: a VM over one memory node (a guest-shim `rand`
//! workload on /dev/kvm), a second node attached mid-run and the first then
//! detached (drained onto the second), with pages per node sampled from the
//! VMM's control API (`GET /memnodes`) every 50 ms. Writes `timeline.json`:
//! `samples` (`t_s`, and per node `label`, `addr`, `state`, `pages`),
//! `events` (`t_s`, `what`) and the VM's own `--stats-json`.

use crate::run::{self, RunError};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Why the attach/detach run failed.
#[derive(Debug, thiserror::Error)]
pub enum TimelineError {
    /// A process could not be started, or failed.
    #[error(transparent)]
    Run(#[from] RunError),
    /// A memory node did not announce its address.
    #[error("memory node {bin} did not announce its address (first line: {line:?})")]
    Announce {
        /// Its binary.
        bin: PathBuf,
        /// What it printed first.
        line: String,
    },
    /// The control API could not be reached.
    #[error("the VM's control API failed")]
    Api(#[source] vmm::api::client::ClientError),
    /// The control API refused a request.
    #[error("{what}: the API answered {code}: {body}")]
    Refused {
        /// The request.
        what: String,
        /// The HTTP status.
        code: u16,
        /// The answer.
        body: Value,
    },
    /// The run did not reach a step in time (the VM ended or stalled first).
    #[error("the run did not reach `{0}` in time (its log is in logs/timeline-vmm.log)")]
    Stalled(&'static str),
    /// The results could not be written.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A child process killed and waited for when dropped (on an error path; a
/// run's success path waits for its VM itself).
struct Owned(Child);

impl Drop for Owned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The run's shape.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Guest RAM and the workload's size, MiB.
    pub mem_mib: u64,
    /// The local cache, MiB.
    pub cache_mib: u64,
    /// The workload's operations after its fill.
    pub ops: u64,
    /// Attach the second node once the first holds this share of the guest's
    /// pages (during the workload's fill, so new pages land on both).
    pub attach_share: f64,
    /// The longest the whole run may take.
    pub deadline: Duration,
}

impl Shape {
    /// The quick run (about ten seconds) or the full one.
    pub fn new(quick: bool) -> Shape {
        if quick {
            Shape {
                mem_mib: 128,
                cache_mib: 4,
                ops: 20_000,
                attach_share: 0.3,
                deadline: Duration::from_secs(120),
            }
        } else {
            Shape {
                mem_mib: 512,
                cache_mib: 16,
                ops: 60_000,
                attach_share: 0.3,
                deadline: Duration::from_secs(600),
            }
        }
    }

    /// The guest's pages.
    fn pages(&self) -> f64 {
        (self.mem_mib << 20) as f64 / 4096.0
    }
}

/// The sampling interval, ms.
const SAMPLE_MS: u64 = 50;

/// How long to wait for each step's condition before taking the step anyway.
const STEP_PATIENCE_S: f64 = 15.0;

/// Starts `memnode` from `bin_dir`, its stderr to `log`; returns it and its address.
fn memnode(bin_dir: &Path, log: &Path) -> Result<(Owned, String), TimelineError> {
    let bin = bin_dir.join("memnode");
    let mut cmd = Command::new(&bin);
    cmd.args(["--listen", "127.0.0.1:0", "--capacity", "2G"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(run::log_file(log)?);
    let mut child = cmd.spawn().map_err(|source| RunError::Spawn {
        cmd: run::describe(&cmd),
        source,
    })?;
    let stdout = child.stdout.take();
    let node = Owned(child);
    let mut line = String::new();
    if let Some(out) = stdout {
        let _ = BufReader::new(out).read_line(&mut line);
    }
    match line.trim().strip_prefix("memnode listening on ") {
        Some(addr) => Ok((node, addr.to_string())),
        None => Err(TimelineError::Announce { bin, line }),
    }
}

fn api(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<Value, TimelineError> {
    let (code, v) =
        vmm::api::request_with_body(sock, method, path, body).map_err(TimelineError::Api)?;
    if (200..300).contains(&code) {
        Ok(v)
    } else {
        Err(TimelineError::Refused {
            what: format!("{method} {path}"),
            code,
            body: v,
        })
    }
}

/// Where the run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    OneNode,
    Attached,
    Draining,
    Detached,
}

/// Runs the attach/detach VM with binaries from `bin_dir`, writes
/// `dir/timeline.json` (and logs under `dir/logs/`); returns the JSON's path.
pub fn run(dir: &Path, bin_dir: &Path, shape: Shape) -> Result<PathBuf, TimelineError> {
    let logs = dir.join("logs");
    let (_a, a) = memnode(bin_dir, &logs.join("timeline-memnode-a.log"))?;
    let (_b, b) = memnode(bin_dir, &logs.join("timeline-memnode-b.log"))?;
    let sock = std::env::temp_dir().join(format!("splitvisor-bench-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let vm_stats = dir.join("timeline_vm_stats.json");
    let vm_log = logs.join("timeline-vmm.log");
    let out = run::log_file(&vm_log)?;
    let err = out.try_clone().map_err(|source| RunError::Log {
        path: vm_log.clone(),
        source,
    })?;
    let mem = format!("{}M", shape.mem_mib);
    let mut cmd = Command::new(bin_dir.join("vmm"));
    cmd.arg("run")
        .args(["--workload", &format!("rand:size={mem},ops={}", shape.ops)])
        .args([
            "--mem",
            &mem,
            "--local-cache",
            &format!("{}M", shape.cache_mib),
        ])
        .args(["--memnode", &a, "--api-sock"])
        .arg(&sock)
        .arg("--stats-json")
        .arg(&vm_stats)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    let line = run::describe(&cmd);
    let mut vm = Owned(cmd.spawn().map_err(|source| RunError::Spawn {
        cmd: line.clone(),
        source,
    })?);
    let t0 = Instant::now();
    while !sock.exists() {
        if t0.elapsed() > Duration::from_secs(30) || vm.0.try_wait().ok().flatten().is_some() {
            return Err(TimelineError::Stalled("the API socket"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let label = |addr: &str| {
        if addr == a {
            format!("memory node A {a} (detached mid-run)")
        } else {
            format!("memory node B {b} (attached mid-run)")
        }
    };
    let (mut samples, mut events) = (Vec::new(), Vec::new());
    let mut phase = Phase::OneNode;
    let mut attached_at = 0.0;
    let status = loop {
        if let Some(s) = vm.0.try_wait().map_err(|source| RunError::Wait {
            cmd: line.clone(),
            source,
        })? {
            break s;
        }
        if t0.elapsed() > shape.deadline {
            return Err(TimelineError::Stalled("the end of the workload"));
        }
        let t = t0.elapsed().as_secs_f64();
        // The VM may end between the check above and this request.
        let Ok(list) = api(&sock, "GET", "/memnodes", None) else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        let nodes: Vec<Value> = list
            .as_array()
            .into_iter()
            .flatten()
            .map(|n| {
                let addr = n["addr"].as_str().unwrap_or("?");
                json!({"label": label(addr), "addr": addr, "state": n["state"], "pages": n["pages"]})
            })
            .collect();
        let of_a = nodes.iter().rev().find(|n| n["addr"] == a.as_str());
        let pages_a = of_a.and_then(|n| n["pages"].as_f64()).unwrap_or(0.0);
        let state_a = of_a
            .and_then(|n| n["state"].as_str())
            .unwrap_or("?")
            .to_string();
        let pages_all: f64 = nodes.iter().filter_map(|n| n["pages"].as_f64()).sum();
        samples.push(json!({"t_s": t, "nodes": nodes}));
        let now = || t0.elapsed().as_secs_f64();
        match phase {
            // During the fill: new pages then go to both nodes.
            Phase::OneNode
                if pages_a >= shape.attach_share * shape.pages() || t >= STEP_PATIENCE_S =>
            {
                api(&sock, "PUT", "/memnodes", Some(&json!({"addr": b})))?;
                events.push(json!({"t_s": now(), "what": "node B attached"}));
                attached_at = t;
                phase = Phase::Attached;
            }
            // Once the fill is done: node A's pages move to node B.
            Phase::Attached
                if (pages_all >= 0.97 * shape.pages() && t >= attached_at + 0.5)
                    || t >= attached_at + STEP_PATIENCE_S =>
            {
                api(&sock, "DELETE", &format!("/memnodes/{a}"), None)?;
                events.push(json!({"t_s": now(), "what": "node A: detach started"}));
                phase = Phase::Draining;
            }
            Phase::Draining if state_a == "detached" => {
                events.push(json!({"t_s": t, "what": "node A detached (drained)"}));
                phase = Phase::Detached;
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(SAMPLE_MS));
    };
    run::check_status(line, status, &vm_log)?;
    let _ = std::fs::remove_file(&sock);
    if phase != Phase::Detached {
        return Err(TimelineError::Stalled(match phase {
            Phase::OneNode => "the attach",
            Phase::Attached => "the detach",
            _ => "the end of the drain",
        }));
    }
    let stats: Value = std::fs::read_to_string(&vm_stats)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    let out = json!({
        "benchmark": "timeline",
        "command": "splitvisor-bench all (the attach/detach step)",
        "workload": format!("rand:size={mem},ops={}", shape.ops),
        "mem": mem,
        "local_cache": format!("{}M", shape.cache_mib),
        "node_a": a,
        "node_b": b,
        "sample_interval_s": SAMPLE_MS as f64 / 1000.0,
        "samples": samples,
        "events": events,
        "vm_stats": stats,
    });
    let path = dir.join(crate::data::TIMELINE_JSON);
    let text = serde_json::to_string_pretty(&out).unwrap_or_default();
    std::fs::write(&path, text).map_err(|source| TimelineError::Write {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}
