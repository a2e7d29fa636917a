//! Statistics in the Prometheus text exposition format, served over HTTP at
//! `/metrics` when `memnode --metrics ADDR` is given.
//!
//! The format is a few lines of text, so it is written here directly; tiny_http
//! carries the HTTP (see docs/dependencies.md).

use crate::server::NodeState;
use crate::store::PageStore;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

/// Metrics endpoint failures.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The metrics address could not be bound.
    #[error("cannot serve metrics on {addr}: {reason}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
}

/// Renders every counter of the node in the Prometheus text format.
pub fn render(store: &PageStore, state: &NodeState) -> String {
    let mut s = String::with_capacity(4096);
    let mut metric =
        |name: &str, kind: &str, help: &str, values: &mut dyn Iterator<Item = (String, u64)>| {
            let _ = writeln!(
                s,
                "# HELP memnode_{name} {help}\n# TYPE memnode_{name} {kind}"
            );
            for (labels, v) in values {
                let _ = writeln!(s, "memnode_{name}{labels} {v}");
            }
        };
    let one = |v: u64| std::iter::once((String::new(), v));
    metric(
        "capacity_pages",
        "gauge",
        "Capacity in 4 KiB pages.",
        &mut one(store.capacity_pages()),
    );
    metric(
        "pages_stored_total",
        "gauge",
        "Pages stored, all VMs.",
        &mut one(store.used_pages()),
    );
    metric(
        "overhead_bytes",
        "gauge",
        "Bookkeeping bytes beyond the page data.",
        &mut one(store.overhead_bytes()),
    );
    metric(
        "connections",
        "gauge",
        "Open connections.",
        &mut one(state.connections()),
    );
    metric(
        "connections_accepted_total",
        "counter",
        "Connections accepted.",
        &mut one(state.accepted()),
    );
    metric(
        "errors_total",
        "counter",
        "Requests answered with an error.",
        &mut one(state.errors.load(Relaxed)),
    );
    let vms = store.vms().snapshot();
    type Field = fn(&crate::vms::VmStats) -> &std::sync::atomic::AtomicU64;
    let per_vm: [(&str, &str, &str, Field); 8] = [
        ("pages_stored", "gauge", "Pages stored, per VM.", |v| {
            &v.pages
        }),
        (
            "page_reads_total",
            "counter",
            "Page reads served, per VM.",
            |v| &v.reads,
        ),
        (
            "zero_page_reads_total",
            "counter",
            "Reads of never-written pages, per VM.",
            |v| &v.zero_reads,
        ),
        (
            "page_writes_total",
            "counter",
            "Page writes stored, per VM.",
            |v| &v.writes,
        ),
        ("page_frees_total", "counter", "Pages freed, per VM.", |v| {
            &v.frees
        }),
        (
            "bytes_received_total",
            "counter",
            "Page bytes received, per VM.",
            |v| &v.bytes_in,
        ),
        (
            "bytes_sent_total",
            "counter",
            "Page bytes sent, per VM.",
            |v| &v.bytes_out,
        ),
        (
            "quota_refusals_total",
            "counter",
            "Writes refused because the VM was at its quota (--vm-quota), per VM.",
            |v| &v.quota_refusals,
        ),
    ];
    for (name, kind, help, field) in per_vm {
        metric(
            name,
            kind,
            help,
            &mut vms
                .iter()
                .map(|(id, v)| (format!("{{vm=\"{id}\"}}"), field(v).load(Relaxed))),
        );
    }
    s
}

/// Serves `/metrics` on `addr` from a background thread until the process exits.
pub fn serve(
    addr: &str,
    store: Arc<PageStore>,
    state: Arc<NodeState>,
) -> Result<std::net::SocketAddr, MetricsError> {
    let server = tiny_http::Server::http(addr).map_err(|e| MetricsError::Bind {
        addr: addr.to_string(),
        reason: e.to_string(),
    })?;
    let bound = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| MetricsError::Bind {
            addr: addr.to_string(),
            reason: "not an IP address".into(),
        })?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for req in server.incoming_requests() {
                let resp = if req.url() == "/metrics" && *req.method() == tiny_http::Method::Get {
                    let header = tiny_http::Header::from_bytes(
                        &b"Content-Type"[..],
                        &b"text/plain; version=0.0.4"[..],
                    )
                    .expect("static header is valid");
                    tiny_http::Response::from_string(render(&store, &state)).with_header(header)
                } else {
                    tiny_http::Response::from_string("not found; try /metrics\n")
                        .with_status_code(404)
                };
                let _ = req.respond(resp);
            }
        })
        .map_err(|e| MetricsError::Bind {
            addr: addr.to_string(),
            reason: e.to_string(),
        })?;
    Ok(bound)
}
