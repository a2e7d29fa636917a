//! A minimal HTTP/1.1 client over the API's Unix socket, for the CLI
//! subcommands (`vmm stats`, `vmm attach-memnode`, `vmm detach-memnode`).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Why a request to the API failed (its answer, error codes included, is not a
/// failure here).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket cannot be reached.
    #[error("cannot connect to {}", .path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Sending or reading failed.
    #[error("talking to the API")]
    Io(#[source] std::io::Error),
    /// The reply is not HTTP with a status line.
    #[error("malformed reply from the API")]
    Malformed,
    /// The reply's body is not JSON.
    #[error("malformed JSON from the API")]
    Json(#[source] serde_json::Error),
}

/// Sends `method path` and returns the status code and JSON body.
pub fn request(
    sock: &Path,
    method: &str,
    path: &str,
) -> Result<(u16, serde_json::Value), ClientError> {
    request_with_body(sock, method, path, None)
}

/// Like [`request`], with an optional JSON body.
pub fn request_with_body(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<(u16, serde_json::Value), ClientError> {
    let (code, text) = request_text(sock, method, path, body)?;
    let v = serde_json::from_str(text.trim()).map_err(ClientError::Json)?;
    Ok((code, v))
}

/// Sends `method path` (with an optional JSON body) and returns the status
/// code and the body as text (`GET /metrics` answers in Prometheus's format).
pub fn request_text(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<(u16, String), ClientError> {
    let mut s =
        std::os::unix::net::UnixStream::connect(sock).map_err(|source| ClientError::Connect {
            path: sock.to_path_buf(),
            source,
        })?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: vmm\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(ClientError::Io)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(ClientError::Io)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or(ClientError::Malformed)?;
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or(ClientError::Malformed)?;
    Ok((code, body.to_string()))
}
