//! The cache's counters and the fetch latency histogram.

use hdrhistogram::Histogram;
use serde::Serialize;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Live counters, updated by fault handlers and the evictor.
#[derive(Debug)]
pub struct CacheStats {
    /// Faults served with a zero page (never written back).
    pub faults_zero: AtomicU64,
    /// Faults served by fetching from a memory node.
    pub faults_remote: AtomicU64,
    /// Fault events for pages already present or being installed.
    pub faults_spurious: AtomicU64,
    /// Pages fetched ahead of a fault stream.
    pub prefetch_remote: AtomicU64,
    /// Zero pages installed ahead of a fault stream.
    pub prefetch_zero: AtomicU64,
    /// Pages fetched ahead that the guest's stream reached (see `fault`).
    pub prefetch_used: AtomicU64,
    /// Pages fetched ahead and evicted before the guest's stream reached them.
    pub prefetch_wasted: AtomicU64,
    /// Faults on read-ahead marks: served from the page fetched with its
    /// window, each starting the fetch of the next window.
    pub readahead_hits: AtomicU64,
    /// Read-ahead marks dropped before the guest reached them (each was counted
    /// as prefetched when fetched; the page is fetched again if the guest needs it).
    pub readahead_dropped: AtomicU64,
    /// Clean pages dropped.
    pub evict_clean: AtomicU64,
    /// Dirty pages written back, then dropped.
    pub evict_dirty: AtomicU64,
    /// Pages `--evict 2q` promoted: they faulted in again while remembered
    /// from their eviction out of probation.
    pub evict_promoted: AtomicU64,
    /// Bytes written back.
    pub writeback_bytes: AtomicU64,
    /// Times a vCPU wrote to a page under eviction and waited.
    pub vcpu_eviction_waits: AtomicU64,
    /// `UFFD_EVENT_REMOVE` events seen.
    pub remove_events: AtomicU64,
    /// Pages moved between nodes by `--rebalance`.
    pub rebalanced: AtomicU64,
    /// New copies made of pages short of copies (`--replicas`).
    pub rereplicated: AtomicU64,
    /// Memory nodes declared failed.
    pub node_failures: AtomicU64,
    /// The longest a fault event took to resolve, frame waits and failovers
    /// included (ns): the guest's longest stall on a fault.
    pub fault_max_ns: AtomicU64,
    /// Writes held on a page under eviction (userfaultfd write-protect faults),
    /// from the guest or from VMM threads.
    pub faults_wp: AtomicU64,
    /// Remote fetch service time, from the fault event to the installed page, in ns.
    pub fetch_ns: Mutex<Histogram<u64>>,
}

impl CacheStats {
    pub(crate) fn new() -> Self {
        CacheStats {
            faults_zero: AtomicU64::new(0),
            faults_remote: AtomicU64::new(0),
            faults_spurious: AtomicU64::new(0),
            prefetch_remote: AtomicU64::new(0),
            prefetch_zero: AtomicU64::new(0),
            prefetch_used: AtomicU64::new(0),
            prefetch_wasted: AtomicU64::new(0),
            readahead_hits: AtomicU64::new(0),
            readahead_dropped: AtomicU64::new(0),
            evict_clean: AtomicU64::new(0),
            evict_dirty: AtomicU64::new(0),
            evict_promoted: AtomicU64::new(0),
            writeback_bytes: AtomicU64::new(0),
            vcpu_eviction_waits: AtomicU64::new(0),
            remove_events: AtomicU64::new(0),
            rebalanced: AtomicU64::new(0),
            rereplicated: AtomicU64::new(0),
            node_failures: AtomicU64::new(0),
            fault_max_ns: AtomicU64::new(0),
            faults_wp: AtomicU64::new(0),
            fetch_ns: Mutex::new(
                Histogram::new_with_bounds(100, 60_000_000_000, 3).expect("valid histogram bounds"),
            ),
        }
    }
}

/// A point-in-time copy of the statistics, as printed and written by `--stats-json`.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct StatsSnapshot {
    /// Pages resident now.
    pub resident_pages: u64,
    /// The budget in pages.
    pub budget_pages: u64,
    /// Zero-fill faults.
    pub faults_zero: u64,
    /// Remote-fetch faults.
    pub faults_remote: u64,
    /// Spurious fault events.
    pub faults_spurious: u64,
    /// Prefetched pages (remote).
    pub prefetch_remote: u64,
    /// Prefetched zero pages.
    pub prefetch_zero: u64,
    /// Remotely prefetched pages the guest's stream reached.
    #[serde(default)]
    pub prefetch_used: u64,
    /// Remotely prefetched pages evicted before the guest's stream reached them.
    #[serde(default)]
    pub prefetch_wasted: u64,
    /// Remotely prefetched pages resident that the guest's stream has not
    /// gone past (yet): neither used nor wasted so far.
    #[serde(default)]
    pub prefetch_unreached: u64,
    /// Faults on read-ahead marks.
    #[serde(default)]
    pub readahead_hits: u64,
    /// Read-ahead marks dropped unreached.
    #[serde(default)]
    pub readahead_dropped: u64,
    /// Clean evictions.
    pub evict_clean: u64,
    /// Dirty evictions.
    pub evict_dirty: u64,
    /// Pages promoted by 2Q (a re-fault soon after eviction).
    #[serde(default)]
    pub evict_promoted: u64,
    /// Bytes written back.
    pub writeback_bytes: u64,
    /// vCPU waits on pages under eviction.
    pub vcpu_eviction_waits: u64,
    /// `UFFDIO_COPY`/`ZEROPAGE` retries after `EAGAIN`.
    pub uffd_eagain: u64,
    /// Installs that found the page present (`EEXIST`).
    pub uffd_eexist: u64,
    /// Remove events.
    pub remove_events: u64,
    /// Pages moved between nodes by `--rebalance`.
    #[serde(default)]
    pub rebalanced: u64,
    /// Copies each page should have (`--replicas`).
    #[serde(default)]
    pub replicas: u64,
    /// Pages with data on the nodes but fewer live copies than `replicas`.
    #[serde(default)]
    pub pages_below_replicas: u64,
    /// Pages whose every copy is on failed nodes (lost unless resident).
    #[serde(default)]
    pub pages_without_copy: u64,
    /// New copies made of pages short of copies (re-replication and repair
    /// on eviction are counted apart: this is the background's work).
    #[serde(default)]
    pub rereplicated: u64,
    /// The background re-replication's limit, pages per second.
    #[serde(default)]
    pub rereplicate_rate: u64,
    /// Memory nodes declared failed.
    #[serde(default)]
    pub node_failures: u64,
    /// Pages with data on the memory nodes (each counted once).
    #[serde(default)]
    pub pages_placed: u64,
    /// Pages fetched with one-sided RDMA READs (`rdma://` nodes), no node
    /// CPU involved.
    #[serde(default)]
    pub pages_read_one_sided: u64,
    /// The longest a fault took to resolve, frame waits and failovers
    /// included, µs: the guest's longest stall on a fault.
    #[serde(default)]
    pub fault_max_us: f64,
    /// Fetched pages that failed their integrity check (altered, stale,
    /// swapped or lost by a node; see `excache::seal`).
    #[serde(default)]
    pub pages_refused: u64,
    /// Writes held on a page under eviction.
    #[serde(default)]
    pub faults_wp: u64,
    /// Fetched pages whose seal was checked.
    #[serde(default)]
    pub seal_checks: u64,
    /// The mean time one check (and decryption) took, µs.
    #[serde(default)]
    pub seal_check_mean_us: f64,
    /// Remote fetches measured.
    pub fetch_count: u64,
    /// Fetch service time p50, µs.
    pub fetch_p50_us: f64,
    /// Fetch service time p99, µs.
    pub fetch_p99_us: f64,
    /// Pages held per memory node: (address, pages).
    pub node_pages: Vec<(String, u64)>,
}

impl StatsSnapshot {
    /// Prefetch accuracy: of the remotely prefetched pages whose fate is
    /// known (the guest's stream went past them, or they were evicted first),
    /// the share used; pages still resident and not reached are left out. 1
    /// before any is known.
    pub fn prefetch_accuracy(&self) -> f64 {
        let known = self.prefetch_remote.saturating_sub(self.prefetch_unreached);
        if known == 0 {
            1.0
        } else {
            self.prefetch_used.min(known) as f64 / known as f64
        }
    }

    /// Prefetch coverage: the share of the remote pages the guest needed that
    /// prefetching fetched before the guest faulted on them.
    pub fn prefetch_coverage(&self) -> f64 {
        let needed = self.prefetch_used + self.faults_remote;
        if needed == 0 {
            0.0
        } else {
            self.prefetch_used as f64 / needed as f64
        }
    }

    /// One human-readable paragraph.
    pub fn summary(&self) -> String {
        format!(
            "resident {}/{} pages; faults: {} zero-fill, {} remote ({} spurious); prefetched {} remote + {} zero ({} read-ahead mark faults, {} marks dropped; {} used, {} wasted, {} not reached yet: accuracy {:.1}%, coverage {:.1}%); \
evictions: {} clean, {} dirty ({} MiB written back), {} promoted; remote fetch p50 {:.1} us, p99 {:.1} us over {} fetches; \
writes held on evicting pages {} (+{} EFAULT waits); uffd EAGAIN {}, EEXIST {}; replicas {}: {} pages below, {} copies made, {} node failures; pages per node: {}",
            self.resident_pages,
            self.budget_pages,
            self.faults_zero,
            self.faults_remote,
            self.faults_spurious,
            self.prefetch_remote,
            self.prefetch_zero,
            self.readahead_hits,
            self.readahead_dropped,
            self.prefetch_used,
            self.prefetch_wasted,
            self.prefetch_unreached,
            100.0 * self.prefetch_accuracy(),
            100.0 * self.prefetch_coverage(),
            self.evict_clean,
            self.evict_dirty,
            self.writeback_bytes >> 20,
            self.evict_promoted,
            self.fetch_p50_us,
            self.fetch_p99_us,
            self.fetch_count,
            self.faults_wp,
            self.vcpu_eviction_waits,
            self.uffd_eagain,
            self.uffd_eexist,
            self.replicas,
            self.pages_below_replicas,
            self.rereplicated,
            self.node_failures,
            self.node_pages
                .iter()
                .map(|(a, n)| format!("{a}={n}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

pub(crate) fn load(a: &AtomicU64) -> u64 {
    a.load(Relaxed)
}
