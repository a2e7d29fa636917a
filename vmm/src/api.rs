//! The control API: HTTP/1.1 with JSON bodies over a Unix socket (`--api-sock`),
//! in the style of Firecracker and Cloud Hypervisor. The socket is created with
//! owner-only permissions.
//!
//! | method and path | does |
//! |---|---|
//! | `GET /vm` | VM info and state (`running` or `paused`) |
//! | `GET /stats` | the cache statistics (the `--stats-json` `stats` object) |
//! | `GET /memnodes` | memory nodes and the pages each holds for this VM |
//! | `PUT /vm/pause`, `PUT /vm/resume` | pause or resume the vCPUs |
//!
//! Errors are JSON `{"error": "..."}` with 400 (malformed request), 404 (unknown
//! path) or 405 (wrong method). Attaching and detaching memory nodes at run time
//! is not implemented yet (issue 6); those paths answer 404 like any unknown path.

use crate::control::RunControl;
use crate::excache::ExCache;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// API failures.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket could not be created.
    #[error("cannot serve the API on {path}: {reason}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Static facts about the VM, reported by `GET /vm`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VmInfo {
    /// Address-space id on the memory nodes.
    pub id: u64,
    /// vCPUs.
    pub vcpus: usize,
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// Local cache budget in bytes.
    pub local_cache_bytes: u64,
    /// The workload.
    pub workload: String,
}

/// A running API server; stops when dropped.
pub struct ApiServer {
    server: Arc<tiny_http::Server>,
    thread: Option<std::thread::JoinHandle<()>>,
    path: PathBuf,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds `path` (owner-only) and serves the API from a thread.
pub fn serve(
    path: &Path,
    info: VmInfo,
    cache: Arc<ExCache>,
    control: Arc<RunControl>,
) -> Result<ApiServer, ApiError> {
    let bind_err = |reason: String| ApiError::Bind {
        path: path.to_path_buf(),
        reason,
    };
    if path.exists() {
        return Err(bind_err(
            "the path exists (another vmm, or a stale socket to remove)".into(),
        ));
    }
    // Created under umask 077, so the socket is never accessible to others.
    // SAFETY: umask(2) only changes this process's file-creation mask.
    let old = unsafe { libc::umask(0o077) };
    let server = tiny_http::Server::http_unix(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let server = Arc::new(server.map_err(|e| bind_err(e.to_string()))?);
    let s = server.clone();
    let started = Instant::now();
    let thread = std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            for req in s.incoming_requests() {
                let (code, body) = route(req.method(), req.url(), &info, &cache, &control, started);
                let header =
                    tiny_http::Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..])
                        .expect("static header");
                let _ = req.respond(
                    tiny_http::Response::from_string(body.to_string() + "\n")
                        .with_status_code(code)
                        .with_header(header),
                );
            }
        })
        .map_err(|e| bind_err(e.to_string()))?;
    Ok(ApiServer {
        server,
        thread: Some(thread),
        path: path.to_path_buf(),
    })
}

fn error(code: u16, msg: &str) -> (u16, serde_json::Value) {
    (code, json!({ "error": msg }))
}

fn route(
    method: &tiny_http::Method,
    url: &str,
    info: &VmInfo,
    cache: &ExCache,
    control: &RunControl,
    started: Instant,
) -> (u16, serde_json::Value) {
    use tiny_http::Method::{Get, Put};
    if !url.starts_with('/') || url.len() > 256 || url.contains("..") {
        return error(400, "malformed request path");
    }
    let path = url.split('?').next().unwrap_or("");
    match (method, path) {
        (Get, "/vm") => {
            let state = if control.is_paused() {
                "paused"
            } else {
                "running"
            };
            (
                200,
                json!({ "info": info, "state": state, "vcpus_parked": control.parked(), "uptime_s": started.elapsed().as_secs_f64() }),
            )
        }
        (Get, "/stats") => (
            200,
            serde_json::to_value(cache.snapshot()).unwrap_or_default(),
        ),
        (Get, "/memnodes") => {
            let nodes: Vec<_> = cache
                .snapshot()
                .node_pages
                .into_iter()
                .map(|(addr, pages)| json!({"addr": addr, "pages": pages}))
                .collect();
            (200, json!(nodes))
        }
        (Put, "/vm/pause") => {
            control.set_paused(true);
            (200, json!({"state": "paused"}))
        }
        (Put, "/vm/resume") => {
            control.set_paused(false);
            (200, json!({"state": "running"}))
        }
        (_, "/vm" | "/stats" | "/memnodes" | "/vm/pause" | "/vm/resume") => {
            error(405, &format!("{method} is not allowed on {path}"))
        }
        _ => error(404, &format!("no such resource: {path}")),
    }
}

/// A minimal HTTP/1.1 client over the Unix socket, for the CLI subcommands.
pub fn request(sock: &Path, method: &str, path: &str) -> Result<(u16, serde_json::Value), String> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock)
        .map_err(|e| format!("cannot connect to {}: {e}", sock.display()))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: vmm\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .map_err(|e| format!("reading the reply: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or("malformed reply from the API")?;
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or("malformed status line from the API")?;
    let v = serde_json::from_str(body.trim())
        .map_err(|e| format!("malformed JSON from the API: {e}"))?;
    Ok((code, v))
}
