//! The control API: HTTP/1.1 with JSON bodies over a Unix socket (`--api-sock`),
//! in the style of Firecracker and Cloud Hypervisor. The socket is created with
//! owner-only permissions.
//!
//! | method and path | does |
//! |---|---|
//! | `GET /vm` | VM info and state (`running` or `paused`) |
//! | `GET /stats` | the cache statistics (the `--stats-json` `stats` object) |
//! | `GET /memnodes` | memory nodes: state, this VM's pages on each, capacity |
//! | `PUT /memnodes` `{"addr": "HOST:PORT"}` | attach a memory node (`POST` too) |
//! | `DELETE /memnodes/HOST:PORT` | detach it: 202, then drained in the background |
//! | `PUT /vm/pause`, `PUT /vm/resume` | pause or resume the vCPUs |
//!
//! Errors are JSON `{"error": "..."}` with 400 (malformed request), 404 (unknown
//! path or node), 405 (wrong method) or 409 (the request conflicts with the
//! node's state: attached twice, the last node, no room to drain it). A detach
//! that fails while draining leaves the node active and its error in
//! `GET /memnodes` (`detach_error`).

use crate::control::RunControl;
use crate::excache::ExCache;
use serde_json::json;
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Outcomes of background detaches, by node address.
type DetachErrors = Arc<Mutex<HashMap<String, String>>>;

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
    let detach_errors = DetachErrors::default();
    let thread = std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            for mut req in s.incoming_requests() {
                let mut body = Vec::new();
                let read = req
                    .as_reader()
                    .take(MAX_BODY as u64 + 1)
                    .read_to_end(&mut body);
                let ctx = Ctx {
                    info: &info,
                    cache: &cache,
                    control: &control,
                    started,
                    detach_errors: &detach_errors,
                };
                let (code, body) = if read.is_err() || body.len() > MAX_BODY {
                    error(
                        400,
                        &format!("request body unreadable or over {MAX_BODY} bytes"),
                    )
                } else {
                    route(req.method(), req.url(), &body, &ctx)
                };
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

const MAX_BODY: usize = 4096;

struct Ctx<'a> {
    info: &'a VmInfo,
    cache: &'a Arc<ExCache>,
    control: &'a RunControl,
    started: Instant,
    detach_errors: &'a DetachErrors,
}

fn placement_error(e: &crate::excache::placement::PlacementError) -> (u16, serde_json::Value) {
    use crate::excache::placement::PlacementError as P;
    let code = match e {
        P::Connect { .. } => 400,
        P::Unknown(_) => 404,
        _ => 409,
    };
    error(code, &fabric::client::error_chain(e))
}

fn attach(body: &[u8], ctx: &Ctx) -> (u16, serde_json::Value) {
    let v: serde_json::Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return error(
                400,
                &format!("the body must be JSON like {{\"addr\": \"HOST:PORT\"}}: {e}"),
            );
        }
    };
    let Some(addr) = v.get("addr").and_then(|a| a.as_str()) else {
        return error(400, "missing \"addr\" (a string HOST:PORT)");
    };
    match ctx.cache.attach_node(addr) {
        Ok(()) => {
            ctx.detach_errors.lock().unwrap().remove(addr);
            (200, json!({"addr": addr, "state": "active"}))
        }
        Err(e) => placement_error(&e),
    }
}

fn detach(addr: &str, ctx: &Ctx) -> (u16, serde_json::Value) {
    let errors = ctx.detach_errors.clone();
    let key = addr.to_string();
    errors.lock().unwrap().remove(addr);
    match ctx.cache.detach_node(addr, move |r| {
        if let Err(e) = r {
            let why = fabric::client::error_chain(&e);
            errors.lock().unwrap().insert(key, why);
        }
    }) {
        Ok(()) => (202, json!({"addr": addr, "state": "draining"})),
        Err(e) => placement_error(&e),
    }
}

fn route(
    method: &tiny_http::Method,
    url: &str,
    body: &[u8],
    ctx: &Ctx,
) -> (u16, serde_json::Value) {
    use tiny_http::Method::{Delete, Get, Post, Put};
    let (info, cache, control, started) = (ctx.info, ctx.cache, ctx.control, ctx.started);
    if !url.starts_with('/') || url.len() > 256 || url.contains("..") {
        return error(400, "malformed request path");
    }
    let path = url.split('?').next().unwrap_or("");
    if let Some(addr) = path.strip_prefix("/memnodes/") {
        return match method {
            Delete if !addr.is_empty() => detach(addr, ctx),
            Delete => error(400, "DELETE /memnodes/HOST:PORT needs an address"),
            _ => error(405, &format!("{method} is not allowed on {path}")),
        };
    }
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
            let errors = ctx.detach_errors.lock().unwrap();
            let nodes: Vec<_> = cache
                .node_list()
                .into_iter()
                .map(|n| {
                    let mut v = serde_json::to_value(&n).unwrap_or_default();
                    if let Some(e) = errors.get(&n.addr) {
                        v["detach_error"] = json!(e);
                    }
                    v
                })
                .collect();
            (200, json!(nodes))
        }
        (Put | Post, "/memnodes") => attach(body, ctx),
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
    request_with_body(sock, method, path, None)
}

/// Like [`request`], with an optional JSON body.
pub fn request_with_body(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<(u16, serde_json::Value), String> {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(sock)
        .map_err(|e| format!("cannot connect to {}: {e}", sock.display()))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: vmm\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
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
