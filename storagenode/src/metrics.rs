//! The storage node's counters in the Prometheus text format
//! (`splitvisor_storagenode_*`, see [`fabric::prometheus`]), served at
//! `/metrics` when `storagenode --metrics ADDR` is given.

use crate::server::NodeStats;
use crate::volume::VolumeDir;
use fabric::acceptor::Connections;
use fabric::prometheus::{Exposition, Kind, MetricsServer, ServeError};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

/// What the metrics are read from.
#[derive(Clone)]
pub struct Sources {
    /// The node's counters.
    pub stats: Arc<NodeStats>,
    /// Its connections.
    pub connections: Arc<Connections>,
    /// Its volumes.
    pub volumes: Arc<VolumeDir>,
}

/// Renders the node's counters.
pub fn render(src: &Sources) -> String {
    let s = &src.stats;
    let n = |v: u64| v as f64;
    let mut e = Exposition::new("storagenode");
    e.single(
        "volumes",
        Kind::Gauge,
        "Volumes (exports) in the node's directory.",
        n(src.volumes.list().map_or(0, |l| l.len()) as u64),
    )
    .single(
        "open_connections",
        Kind::Gauge,
        "Open connections.",
        n(src.connections.open()),
    )
    .single(
        "connections_accepted_total",
        Kind::Counter,
        "Connections accepted (refused ones included).",
        n(src.connections.accepted()),
    )
    .single(
        "sessions_total",
        Kind::Counter,
        "Connections that reached NBD transmission.",
        n(s.sessions.load(Relaxed)),
    );
    let requests = s.requests.load(Relaxed);
    let fast = s.fast_path.load(Relaxed);
    e.family(
        "requests_total",
        Kind::Counter,
        "NBD requests received, by where they were served (on the connection's thread, or by the I/O threads).",
    )
    .sample("requests_total", &[("path", "fast")], n(fast))
    .sample(
        "requests_total",
        &[("path", "pool")],
        n(requests.saturating_sub(fast)),
    )
    .single(
        "read_bytes_total",
        Kind::Counter,
        "Bytes read from volumes.",
        n(s.read_bytes.load(Relaxed)),
    )
    .single(
        "written_bytes_total",
        Kind::Counter,
        "Bytes written to volumes.",
        n(s.written_bytes.load(Relaxed)),
    )
    .single(
        "flushes_total",
        Kind::Counter,
        "Flush requests.",
        n(s.flushes.load(Relaxed)),
    )
    .single(
        "errors_total",
        Kind::Counter,
        "Requests answered with an error.",
        n(s.errors.load(Relaxed)),
    )
    .single(
        "protocol_errors_total",
        Kind::Counter,
        "Connections closed for breaking the protocol.",
        n(s.protocol_errors.load(Relaxed)),
    );
    e.finish()
}

/// Serves `/metrics` on `addr` until the returned server is dropped.
pub fn serve(addr: &str, src: Sources) -> Result<MetricsServer, ServeError> {
    MetricsServer::serve(addr, move || render(&src))
}
