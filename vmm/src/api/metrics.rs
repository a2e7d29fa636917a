//! The VMM's statistics in the Prometheus text format (`GET /metrics` on the
//! API socket, and on `--metrics ADDR`), named `splitvisor_vmm_*` with the
//! conventions of [`fabric::prometheus`]. Rendered on the control loop from
//! the cache's live counters, so a scrape costs no guest time.

use super::VmInfo;
use crate::control::RunControl;
use crate::excache::ExCache;
use crate::excache::placement::NodeState;
use fabric::prometheus::{Exposition, Kind};
use std::time::Duration;

/// Upper bounds of the fetch latency buckets, in seconds: from the fabric's
/// floor (a few µs over RDMA, tens over TCP) to timeouts.
const FETCH_BUCKETS_S: [f64; 14] = [
    5e-6, 10e-6, 20e-6, 50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 50e-3, 0.2, 1.0,
];

/// Renders the VM's metrics.
pub fn render(cache: &ExCache, control: &RunControl, info: &VmInfo, uptime: Duration) -> String {
    let s = cache.snapshot();
    let n = |v: u64| v as f64;
    let mut e = Exposition::new("vmm");
    e.family(
        "info",
        Kind::Gauge,
        "The VM: its id and workload (value 1).",
    )
    .sample(
        "info",
        &[
            ("vm", &format!("{:#x}", info.id)),
            ("workload", &info.workload),
        ],
        1.0,
    )
    .single("vcpus", Kind::Gauge, "vCPUs.", n(info.vcpus as u64))
    .single(
        "guest_memory_bytes",
        Kind::Gauge,
        "Guest RAM.",
        n(info.mem_bytes),
    )
    .single(
        "uptime_seconds",
        Kind::Gauge,
        "Time since the VM started.",
        uptime.as_secs_f64(),
    )
    .single(
        "paused",
        Kind::Gauge,
        "1 while the vCPUs are paused (PUT /vm/pause), else 0.",
        f64::from(u8::from(control.is_paused())),
    )
    .single(
        "vcpus_parked",
        Kind::Gauge,
        "vCPUs parked by a pause.",
        n(control.parked() as u64),
    )
    .single(
        "resident_pages",
        Kind::Gauge,
        "Guest pages in the local cache.",
        n(s.resident_pages),
    )
    .single(
        "cache_budget_pages",
        Kind::Gauge,
        "The local cache's budget.",
        n(s.budget_pages),
    );
    e.family(
        "faults_total",
        Kind::Counter,
        "Guest page faults, by how they were served.",
    );
    for (kind, v) in [
        ("zero", s.faults_zero),
        ("remote", s.faults_remote),
        ("spurious", s.faults_spurious),
        ("write_protect", s.faults_wp),
        ("readahead_mark", s.readahead_hits),
    ] {
        e.sample("faults_total", &[("kind", kind)], n(v));
    }
    e.family(
        "prefetched_pages_total",
        Kind::Counter,
        "Pages installed ahead of the guest, by source.",
    );
    for (source, v) in [("remote", s.prefetch_remote), ("zero", s.prefetch_zero)] {
        e.sample("prefetched_pages_total", &[("source", source)], n(v));
    }
    e.single(
        "readahead_dropped_pages_total",
        Kind::Counter,
        "Read-ahead pages dropped before the guest reached them.",
        n(s.readahead_dropped),
    )
    .single(
        "prefetch_used_pages_total",
        Kind::Counter,
        "Remotely prefetched pages the guest's fault stream reached.",
        n(s.prefetch_used),
    )
    .single(
        "prefetch_wasted_pages_total",
        Kind::Counter,
        "Remotely prefetched pages evicted before the guest's fault stream reached them.",
        n(s.prefetch_wasted),
    )
    .single(
        "prefetch_unreached_pages",
        Kind::Gauge,
        "Remotely prefetched pages resident that the guest's fault stream has not gone past yet.",
        n(s.prefetch_unreached),
    )
    .single(
        "prefetch_accuracy_ratio",
        Kind::Gauge,
        "Of the remotely prefetched pages used or evicted, the share used (1 before any).",
        s.prefetch_accuracy(),
    )
    .single(
        "prefetch_coverage_ratio",
        Kind::Gauge,
        "Share of the remote pages the guest needed that were prefetched before it faulted.",
        s.prefetch_coverage(),
    );
    e.family(
        "evictions_total",
        Kind::Counter,
        "Pages evicted from the local cache, by kind.",
    );
    for (kind, v) in [("clean", s.evict_clean), ("dirty", s.evict_dirty)] {
        e.sample("evictions_total", &[("kind", kind)], n(v));
    }
    e.single(
        "promoted_pages_total",
        Kind::Counter,
        "Pages --evict 2q promoted to its protected queue (a fault soon after their eviction).",
        n(s.evict_promoted),
    )
    .single(
        "writeback_bytes_total",
        Kind::Counter,
        "Bytes written back to memory nodes.",
        n(s.writeback_bytes),
    )
    .single(
        "vcpu_eviction_waits_total",
        Kind::Counter,
        "Times a vCPU waited on a page under eviction.",
        n(s.vcpu_eviction_waits),
    )
    .single(
        "pages_refused_total",
        Kind::Counter,
        "Fetched pages that failed their integrity check.",
        n(s.pages_refused),
    )
    .single(
        "seal_checks_total",
        Kind::Counter,
        "Fetched pages whose integrity seal was checked (and decrypted with --encrypt-pages).",
        n(s.seal_checks),
    )
    .single(
        "seal_check_seconds_total",
        Kind::Counter,
        "Time spent checking (and decrypting) fetched pages.",
        s.seal_check_mean_us * s.seal_checks as f64 / 1e6,
    )
    .single(
        "rebalanced_pages_total",
        Kind::Counter,
        "Pages moved between nodes by --rebalance.",
        n(s.rebalanced),
    )
    .single(
        "replicas",
        Kind::Gauge,
        "Copies each page should have (--replicas).",
        n(s.replicas),
    )
    .single(
        "pages_below_replicas",
        Kind::Gauge,
        "Pages with fewer live copies than --replicas (a node holding one failed).",
        n(s.pages_below_replicas),
    )
    .single(
        "pages_without_copy",
        Kind::Gauge,
        "Pages whose every copy was on failed nodes.",
        n(s.pages_without_copy),
    )
    .single(
        "rereplicated_pages_total",
        Kind::Counter,
        "New copies made in the background of pages that lost one.",
        n(s.rereplicated),
    )
    .single(
        "node_failures_total",
        Kind::Counter,
        "Memory nodes declared failed (no answer within --node-timeout, a lost connection, an error reply, a bad page).",
        n(s.node_failures),
    );
    let bounds_ns: Vec<u64> = FETCH_BUCKETS_S.iter().map(|b| (b * 1e9) as u64).collect();
    let (below, count, sum_ns) = cache.fetch_latency(&bounds_ns);
    let buckets: Vec<(f64, u64)> = FETCH_BUCKETS_S.iter().copied().zip(below).collect();
    e.histogram(
        "fetch_latency_seconds",
        "Remote fetch service time, from the fault to the installed page.",
        &buckets,
        sum_ns / 1e9,
        count,
    );
    // A node attached again at an address (after it failed or left) is
    // shown as it is now.
    let all = cache.node_list();
    let nodes: Vec<_> = all
        .iter()
        .enumerate()
        .filter(|(k, n)| !all[k + 1..].iter().any(|m| m.addr == n.addr))
        .map(|(_, n)| n)
        .collect();
    e.family(
        "node_pages",
        Kind::Gauge,
        "This VM's pages on each memory node.",
    );
    for node in &nodes {
        e.sample("node_pages", &[("node", &node.addr)], n(node.pages));
    }
    e.family(
        "node_state",
        Kind::Gauge,
        "Each memory node's state: 1 for the state it is in, 0 for the others.",
    );
    for node in &nodes {
        for (name, state) in [
            ("active", NodeState::Active),
            ("draining", NodeState::Draining),
            ("detached", NodeState::Detached),
            ("dead", NodeState::Dead),
        ] {
            e.sample(
                "node_state",
                &[("node", &node.addr), ("state", name)],
                f64::from(u8::from(node.state == state)),
            );
        }
    }
    e.family(
        "node_full",
        Kind::Gauge,
        "1 while a memory node takes no more of this VM's pages (full, or the VM at its quota there).",
    );
    for node in &nodes {
        e.sample(
            "node_full",
            &[("node", &node.addr)],
            f64::from(u8::from(node.full)),
        );
    }
    e.finish()
}
