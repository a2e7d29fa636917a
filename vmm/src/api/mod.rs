//! The control API: HTTP/1.1 with JSON bodies over a Unix socket (`--api-sock`),
//! in the style of Firecracker and Cloud Hypervisor. The socket is created with
//! owner-only permissions.
//!
//! | method and path | does |
//! |---|---|
//! | `GET /vm` | VM info and state (`running` or `paused`) |
//! | `GET /stats` | the cache statistics (the `--stats-json` `stats` object) |
//! | `GET /memnodes` | memory nodes: state, this VM's pages on each, capacity |
//! | `GET /events` | what happened to the memory nodes (attached, failed, drained), with times |
//! | `PUT /memnodes` `{"addr": "HOST:PORT"}` | attach a memory node (`POST` too) |
//! | `DELETE /memnodes/HOST:PORT` | detach it: 202, then drained in the background |
//! | `PUT /vm/pause`, `PUT /vm/resume` | pause or resume the vCPUs |
//! | `GET /api/openapi` | the API's OpenAPI 3 document (docs/openapi.yaml) |
//! | `GET /metrics` | Prometheus text format ([`metrics`]; also on `--metrics ADDR` over TCP) |
//!
//! Errors are JSON `{"error": "..."}` with 400 (malformed request), 404 (unknown
//! path or node), 405 (wrong method) or 409 (the request conflicts with the
//! node's state: attached twice, the last node, no room to drain it). A detach
//! that fails while draining leaves the node active and its error in
//! `GET /memnodes` (`detach_error`).
//!
//! ## How a request is served
//!
//! The `api` thread reads each HTTP request (its body bounded to 4 KiB), turns
//! it into an [`Action`] (or answers a malformed one at once) and sends the
//! action, with the request to answer, to the VMM's control loop
//! ([`actions`], an event-manager loop on the `vmm-control` thread). The loop
//! answers quick actions itself; an action that may block (attaching a node
//! connects to it over TCP) runs on a worker thread the loop owns and joins, so a
//! slow attach never delays `GET /stats`, a pause, or another attach.

pub mod actions;
pub mod client;
#[doc(hidden)]
pub mod fuzzing;
pub mod metrics;
pub mod watch;

pub use actions::Action;
pub use client::{request, request_text, request_with_body};

use crate::control::RunControl;
use crate::event_loop::{EventLoop, EventLoopBuilder, EventLoopError};
use crate::excache::ExCache;
use serde_json::json;
use std::io::Read;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, mpsc};
use vmm_sys_util::eventfd::EventFd;

/// API failures.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket path is taken.
    #[error(
        "cannot serve the API on {0}: the path exists (another vmm, or a stale socket to remove)"
    )]
    Exists(PathBuf),
    /// The socket could not be created.
    #[error("cannot serve the API on {path}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The action channel's eventfd could not be created.
    #[error("cannot create the API's eventfd")]
    EventFd(#[source] std::io::Error),
    /// The control loop could not start.
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
    /// The HTTP thread could not start.
    #[error("cannot start the API thread")]
    Spawn(#[source] std::io::Error),
    /// The metrics address is not a loopback address (or cannot be parsed).
    #[error(
        "--metrics {0}: give a loopback address (127.0.0.1:PORT, [::1]:PORT) or just a port; metrics are served to this host only"
    )]
    MetricsNotLoopback(String),
    /// The metrics listener could not be bound.
    #[error("cannot serve metrics on {addr}")]
    MetricsBind {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Where the API is served.
#[derive(Debug, Clone, Default)]
pub struct Endpoints {
    /// The control API's Unix socket (`--api-sock`).
    pub sock: Option<PathBuf>,
    /// A TCP listener for `GET /metrics` only (`--metrics ADDR`), on loopback.
    pub metrics: Option<String>,
}

impl Endpoints {
    /// Whether anything is to be served.
    pub fn any(&self) -> bool {
        self.sock.is_some() || self.metrics.is_some()
    }
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

/// A running API server; stops when dropped (the HTTP thread, then the control
/// loop and the workers it owns, are joined).
pub struct ApiServer {
    /// The HTTP listeners and their threads.
    listeners: Vec<(Arc<tiny_http::Server>, std::thread::JoinHandle<()>)>,
    control_loop: Option<EventLoop>,
    path: Option<PathBuf>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        for (server, _) in &self.listeners {
            server.unblock();
        }
        for (_, t) in self.listeners.drain(..) {
            let _ = t.join();
        }
        drop(self.control_loop.take());
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Binds the endpoints (the socket owner-only, the metrics listener on
/// loopback) and serves the API: HTTP on one thread per listener, actions on
/// the `vmm-control` loop.
pub fn serve(
    at: &Endpoints,
    info: VmInfo,
    cache: Arc<ExCache>,
    control: Arc<RunControl>,
) -> Result<ApiServer, ApiError> {
    if let Some(path) = &at.sock
        && path.exists()
    {
        return Err(ApiError::Exists(path.to_path_buf()));
    }
    let metrics_at = at.metrics.as_deref().map(loopback_addr).transpose()?;
    let (tx, rx) = mpsc::channel();
    let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(ApiError::EventFd)?;
    let handler = actions::Handler::new(
        info,
        cache,
        control,
        rx,
        wake.try_clone().map_err(ApiError::EventFd)?,
    );
    let mut lb = EventLoopBuilder::new("vmm-control")?;
    lb.add(Arc::new(Mutex::new(handler)));
    let mut api = ApiServer {
        listeners: Vec::new(),
        control_loop: Some(lb.start()?),
        path: None,
    };
    if let Some(path) = &at.sock {
        // Created under umask 077, so the socket is never accessible to others.
        // SAFETY: umask(2) only changes this process's file-creation mask.
        let old = unsafe { libc::umask(0o077) };
        let listener = listening_at(path);
        // SAFETY: as above, restoring the previous mask.
        unsafe { libc::umask(old) };
        let server = listener
            .map_err(Into::into)
            .and_then(|l| tiny_http::Server::from_listener(l, None))
            .map_err(|source| ApiError::Bind {
                path: path.to_path_buf(),
                source,
            })?;
        api.path = Some(path.to_path_buf());
        api.listen(server, "api", tx.clone(), &wake, route)?;
    }
    if let Some(addr) = metrics_at {
        let server = tiny_http::Server::http(addr).map_err(|source| ApiError::MetricsBind {
            addr: addr.to_string(),
            source,
        })?;
        if let Some(a) = server.server_addr().to_ip() {
            log::info!("metrics on http://{a}/metrics");
        }
        api.listen(server, "api-metrics", tx, &wake, route_metrics_only)?;
    }
    Ok(api)
}

type Router = fn(&tiny_http::Method, &str, &[u8]) -> Result<Action, (u16, serde_json::Value)>;

impl ApiServer {
    /// Serves `server` on thread `name`: each request becomes an action on the
    /// control loop (or is answered at once if malformed).
    fn listen(
        &mut self,
        server: tiny_http::Server,
        name: &str,
        tx: mpsc::Sender<(Action, tiny_http::Request)>,
        wake: &EventFd,
        route: Router,
    ) -> Result<(), ApiError> {
        let server = Arc::new(server);
        let (s, wake) = (server.clone(), wake.try_clone().map_err(ApiError::EventFd)?);
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                for mut req in s.incoming_requests() {
                    let mut body = Vec::new();
                    let read = req
                        .as_reader()
                        .take(MAX_BODY as u64 + 1)
                        .read_to_end(&mut body);
                    let action = if read.is_err() || body.len() > MAX_BODY {
                        Err(error(
                            400,
                            &format!("request body unreadable or over {MAX_BODY} bytes"),
                        ))
                    } else {
                        route(req.method(), req.url(), &body)
                    };
                    match action {
                        Ok(a) => {
                            if tx.send((a, req)).is_err() || wake.write(1).is_err() {
                                // The loop has stopped: the VM is ending.
                                break;
                            }
                        }
                        Err((code, v)) => respond(req, code, &v),
                    }
                }
            })
            .map_err(ApiError::Spawn)?;
        self.listeners.push((server, thread));
        Ok(())
    }
}

/// `ADDR` for `--metrics`: a loopback socket address, or a bare port (on
/// 127.0.0.1).
pub(crate) fn loopback_addr(given: &str) -> Result<std::net::SocketAddr, ApiError> {
    let addr = match given.parse::<u16>() {
        Ok(port) => std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Err(_) => given
            .parse::<std::net::SocketAddr>()
            .map_err(|_| ApiError::MetricsNotLoopback(given.into()))?,
    };
    if !addr.ip().is_loopback() {
        return Err(ApiError::MetricsNotLoopback(given.into()));
    }
    Ok(addr)
}

/// A Unix socket listening at `path`, which appears there only once it
/// listens: bound at a temporary name beside it, then renamed. (Bound at
/// `path` itself, a client polling for the file could connect between
/// `bind` and `listen` and be refused.)
fn listening_at(path: &std::path::Path) -> std::io::Result<std::os::unix::net::UnixListener> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let listener = std::os::unix::net::UnixListener::bind(&tmp)?;
    // Never over an existing file (as `bind` at `path` would refuse it).
    let cstr = |p: &std::path::Path| {
        std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
    };
    let (from, to) = (cstr(&tmp)?, cstr(path)?);
    // SAFETY: two NUL-terminated paths that live across the call.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}

/// The metrics listener serves `GET /metrics` and nothing else.
fn route_metrics_only(
    method: &tiny_http::Method,
    url: &str,
    body: &[u8],
) -> Result<Action, (u16, serde_json::Value)> {
    match url.split('?').next() {
        Some("/metrics") => route(method, "/metrics", body),
        _ => Err(error(404, "this listener serves GET /metrics only")),
    }
}

/// The API's OpenAPI document.
pub const OPENAPI: &str = include_str!("../../../docs/openapi.yaml");

/// Sends a text reply of `content_type`.
pub(crate) fn respond_text(req: tiny_http::Request, content_type: &str, body: String) {
    let header = tiny_http::Header::from_bytes(&b"Content-Type"[..], content_type.as_bytes())
        .expect("static header");
    let _ = req.respond(tiny_http::Response::from_string(body).with_header(header));
}

/// Sends a JSON reply.
pub(crate) fn respond(req: tiny_http::Request, code: u16, body: &serde_json::Value) {
    let header = tiny_http::Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..])
        .expect("static header");
    let _ = req.respond(
        tiny_http::Response::from_string(body.to_string() + "\n")
            .with_status_code(code)
            .with_header(header),
    );
}

pub(crate) fn error(code: u16, msg: &str) -> (u16, serde_json::Value) {
    (code, json!({ "error": msg }))
}

const MAX_BODY: usize = 4096;

/// The action a request asks for, or the error reply to a malformed one.
fn route(
    method: &tiny_http::Method,
    url: &str,
    body: &[u8],
) -> Result<Action, (u16, serde_json::Value)> {
    use tiny_http::Method::{Delete, Get, Post, Put};
    if !url.starts_with('/') || url.len() > 256 || url.contains("..") {
        return Err(error(400, "malformed request path"));
    }
    let path = url.split('?').next().unwrap_or("");
    if let Some(addr) = path.strip_prefix("/memnodes/") {
        return match method {
            Delete if !addr.is_empty() => Ok(Action::Detach(addr.to_string())),
            Delete => Err(error(400, "DELETE /memnodes/HOST:PORT needs an address")),
            _ => Err(error(405, &format!("{method} is not allowed on {path}"))),
        };
    }
    match (method, path) {
        (Get, "/vm") => Ok(Action::Info),
        (Get, "/stats") => Ok(Action::Stats),
        (Get, "/memnodes") => Ok(Action::Nodes),
        (Get, "/events") => Ok(Action::Events),
        (Get, "/metrics") => Ok(Action::Metrics),
        (Get, "/api/openapi") => Ok(Action::OpenApi),
        (Put | Post, "/memnodes") => attach_body(body).map(Action::Attach),
        (Put, "/vm/pause") => Ok(Action::Pause),
        (Put, "/vm/resume") => Ok(Action::Resume),
        (
            _,
            "/vm" | "/stats" | "/memnodes" | "/events" | "/vm/pause" | "/vm/resume" | "/metrics"
            | "/api/openapi",
        ) => Err(error(405, &format!("{method} is not allowed on {path}"))),
        _ => Err(error(404, &format!("no such resource: {path}"))),
    }
}

/// The node address of an attach request's body.
fn attach_body(body: &[u8]) -> Result<String, (u16, serde_json::Value)> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        error(
            400,
            &format!("the body must be JSON like {{\"addr\": \"HOST:PORT\"}}: {e}"),
        )
    })?;
    match v.get("addr").and_then(|a| a.as_str()) {
        Some(addr) => Ok(addr.to_string()),
        None => Err(error(400, "missing \"addr\" (a string HOST:PORT)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tiny_http::Method;

    #[test]
    fn requests_become_actions_and_bad_ones_are_named() {
        assert_eq!(route(&Method::Get, "/stats", b""), Ok(Action::Stats));
        assert_eq!(
            route(&Method::Put, "/memnodes", br#"{"addr":"h:1"}"#),
            Ok(Action::Attach("h:1".into()))
        );
        assert_eq!(
            route(&Method::Delete, "/memnodes/h:1", b""),
            Ok(Action::Detach("h:1".into()))
        );
        let code = |m, u: &str, b: &[u8]| route(&m, u, b).unwrap_err().0;
        assert_eq!(code(Method::Put, "/memnodes", b"{"), 400);
        assert_eq!(code(Method::Put, "/memnodes", b"{}"), 400);
        assert_eq!(code(Method::Get, "/nothing", b""), 404);
        assert_eq!(code(Method::Delete, "/stats", b""), 405);
        assert_eq!(code(Method::Get, "/../etc", b""), 400);
        assert_eq!(route(&Method::Get, "/metrics", b""), Ok(Action::Metrics));
        assert_eq!(code(Method::Post, "/metrics", b""), 405);
        assert_eq!(
            route_metrics_only(&Method::Get, "/metrics?x", b""),
            Ok(Action::Metrics)
        );
        assert_eq!(
            route_metrics_only(&Method::Get, "/stats", b"")
                .unwrap_err()
                .0,
            404
        );
    }

    #[test]
    fn metrics_are_served_on_loopback_only() {
        assert_eq!(loopback_addr("9100").unwrap().to_string(), "127.0.0.1:9100");
        assert!(loopback_addr("[::1]:9100").is_ok());
        for bad in ["0.0.0.0:9100", "10.0.0.1:9100", "localhost:9100", "x"] {
            let e = loopback_addr(bad).unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("loopback"), "{e}");
        }
    }
}
