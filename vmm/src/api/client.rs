//! A minimal HTTP/1.1 client over the API's Unix socket, for the CLI
//! subcommands (`vmm stats`, `vmm attach-memnode`, `vmm detach-memnode`).

use std::io::Read;
use std::path::Path;

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
