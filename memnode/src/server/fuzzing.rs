//! A connection's request handling without a socket, for the fuzz targets in
//! `fuzz/` (see docs/fuzzing.md). Not part of the node's interface.

use super::{Close, Connection, NodeState, PageStore};
use fabric::acceptor::Connections;
use fabric::proto::{self, Role};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

/// Where the connection starts.
#[derive(Debug, Clone, Copy)]
pub enum Start {
    /// Before the hello (the handshake runs on the input).
    Hello,
    /// After a handshake as this role for VM 1.
    Session(Role),
}

/// Feeds `input` to a fresh connection on a node of `capacity_pages` (each VM
/// may use half) as the peer's byte stream, the way the connection thread
/// does: every complete frame is decoded and handled until one breaks the
/// protocol. Returns the replies' bytes.
pub fn serve_bytes(start: Start, capacity_pages: u64, input: &[u8]) -> Vec<u8> {
    let store = Arc::new(PageStore::with_vm_quota(
        capacity_pages,
        Some(capacity_pages / 2),
    ));
    let state = Arc::new(NodeState {
        errors: AtomicU64::new(0),
        conns: Arc::new(Connections::default()),
        instance: 1,
    });
    let mut conn = Connection {
        store,
        state,
        handshake_timeout: Duration::from_secs(1),
        send_timeout: Duration::from_secs(1),
        key: Arc::new(None),
        pending: None,
        session: None,
        rdma: None,
        #[cfg(feature = "rdma")]
        qp: None,
    };
    let mut out = Vec::new();
    if let Start::Session(role) = start {
        if conn
            .open_session(0, role, 1, None, &mut out, "fuzz")
            .is_err()
        {
            return out;
        }
    }
    let mut buf = input;
    loop {
        let (h, msg, used) = match proto::decode_frame(buf) {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(e) => {
                let rid = super::request_id_of(buf);
                proto::Message::Error {
                    code: proto::ErrorCode::Malformed,
                    message: &e.to_string(),
                }
                .encode(rid, &mut out);
                break;
            }
        };
        buf = &buf[used..];
        if let Err(Close::Violation(code, message)) = conn.handle(&h, msg, &mut out, "fuzz") {
            proto::Message::Error {
                code,
                message: &message,
            }
            .encode(h.request_id, &mut out);
            break;
        }
    }
    out
}
