//! Statistics in the Prometheus text exposition format, served over HTTP at
//! `/metrics` when `memnode --metrics ADDR` is given.
//!
//! The text is written with [`fabric::prometheus`] (the names and conventions
//! every Splitvisor component shares); tiny_http carries the HTTP (see
//! docs/dependencies.md).

use crate::server::NodeState;
use crate::store::PageStore;
use fabric::prometheus::{Exposition, Kind, MetricsServer, ServeError};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

/// Renders every counter of the node in the Prometheus text format
/// (`splitvisor_memnode_*`, see [`fabric::prometheus`]).
pub fn render(store: &PageStore, state: &NodeState) -> String {
    let mut e = Exposition::new("memnode");
    let n = |v: u64| v as f64;
    e.single(
        "capacity_pages",
        Kind::Gauge,
        "Capacity in 4 KiB pages.",
        n(store.capacity_pages()),
    )
    .single(
        "stored_pages",
        Kind::Gauge,
        "Pages stored, all VMs.",
        n(store.used_pages()),
    )
    .single(
        "overhead_bytes",
        Kind::Gauge,
        "Bookkeeping bytes beyond the page data.",
        n(store.overhead_bytes()),
    )
    .single(
        "vm_quota_pages",
        Kind::Gauge,
        "Most pages one VM may store here (--vm-quota); 0 when unlimited.",
        n(store.vm_quota_pages().unwrap_or(0)),
    )
    .single(
        "open_connections",
        Kind::Gauge,
        "Open connections.",
        n(state.connections()),
    )
    .single(
        "connections_accepted_total",
        Kind::Counter,
        "Connections accepted.",
        n(state.accepted()),
    )
    .single(
        "errors_total",
        Kind::Counter,
        "Requests answered with an error.",
        n(state.errors.load(Relaxed)),
    );
    let vms = store.vms().snapshot();
    type Field = fn(&crate::vms::VmStats) -> &std::sync::atomic::AtomicU64;
    let per_vm: [(&str, Kind, &str, Field); 8] = [
        (
            "vm_stored_pages",
            Kind::Gauge,
            "Pages stored, per VM.",
            |v| &v.pages,
        ),
        (
            "vm_page_reads_total",
            Kind::Counter,
            "Page reads served, per VM.",
            |v| &v.reads,
        ),
        (
            "vm_zero_page_reads_total",
            Kind::Counter,
            "Reads of never-written pages, per VM.",
            |v| &v.zero_reads,
        ),
        (
            "vm_page_writes_total",
            Kind::Counter,
            "Page writes stored, per VM.",
            |v| &v.writes,
        ),
        (
            "vm_page_frees_total",
            Kind::Counter,
            "Pages freed, per VM.",
            |v| &v.frees,
        ),
        (
            "vm_received_bytes_total",
            Kind::Counter,
            "Page bytes received, per VM.",
            |v| &v.bytes_in,
        ),
        (
            "vm_sent_bytes_total",
            Kind::Counter,
            "Page bytes sent, per VM.",
            |v| &v.bytes_out,
        ),
        (
            "vm_quota_refusals_total",
            Kind::Counter,
            "Writes refused because the VM was at its quota (--vm-quota), per VM.",
            |v| &v.quota_refusals,
        ),
    ];
    for (name, kind, help, field) in per_vm {
        e.family(name, kind, help);
        for (id, v) in &vms {
            e.sample(name, &[("vm", &id.to_string())], n(field(v).load(Relaxed)));
        }
    }
    e.finish()
}

/// Serves `/metrics` on `addr` until the returned server is dropped.
pub fn serve(
    addr: &str,
    store: Arc<PageStore>,
    state: Arc<NodeState>,
) -> Result<MetricsServer, ServeError> {
    MetricsServer::serve(addr, move || render(&store, &state))
}
