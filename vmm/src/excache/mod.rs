//! # The ExCache: guest RAM as a small local cache over memory nodes
//!
//! LegoOS gives each processor a small local memory (ExCache) in front of remote
//! memory components. Here the arena of guest RAM is registered with userfaultfd
//! (MISSING mode); at most `budget` of its pages are resident at once.
//!
//! The page-fault path, vCPU to memory node:
//! 1. the guest touches a non-resident page; KVM's access to the backing memory
//!    raises a userfaultfd event ([`fault`]);
//! 2. a handler thread takes the page (`ABSENT -> FETCHING`), waits for a free frame
//!    if the budget is used up, and either fetches the page from its memory node
//!    ([`placement`], one `fabric` round trip) and installs it with `UFFDIO_COPY`,
//!    or, if the page was never written back, installs a zero page without any
//!    network traffic ([`uffd`]); the vCPU resumes;
//! 3. on a fault stream with a trend (a stride, either way; [`trend`]) it
//!    prefetches the next pages along it, pipelined, one window ahead.
//!
//! The evictor ([`evict`]) keeps free frames available; its protocol (write-protect,
//! read the dirty log, write back, discard) guarantees that no guest write is lost.

pub mod drain;
pub mod error;
pub mod evict;
pub mod fault;
pub mod fingerprint;
pub mod node;
pub mod placement;
pub mod readahead;
pub mod repair;
pub mod replicas;
pub mod seal;
mod spans;
pub mod stats;
mod trend;
pub mod uffd;
mod victims;

use crate::memory::ARENA_SLOT;
pub use error::PathError;
use kvm_ioctls::VmFd;
use placement::Placement;
use stats::{CacheStats, StatsSnapshot, load};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering::*};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;
pub use trend::Prefetcher;
use uffd::{PAGE, RetryCounters, UffdError};
use userfaultfd::Uffd;
use vm_memory::MmapRegion;
use vmm_sys_util::eventfd::EventFd;

/// Page states.
pub(crate) const ABSENT: u8 = 0;
pub(crate) const FETCHING: u8 = 1;
pub(crate) const RESIDENT: u8 = 2;
pub(crate) const EVICTING: u8 = 3;

/// How victims are chosen.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
pub enum EvictPolicy {
    /// Second chance: a page referenced since the hand last passed is spared once.
    /// References are pages faulted in and pages the KVM dirty log shows written.
    Clock,
    /// First in, first out.
    Fifo,
    /// Scan-resistant 2Q: first faults go through a FIFO probation queue; a
    /// page faulting in again soon after its eviction is promoted to a
    /// protected CLOCK ring ([`victims`]).
    #[value(name = "2q")]
    #[serde(rename = "2q")]
    TwoQ,
}

/// The largest prefetch window, in pages.
pub const MAX_PREFETCH: usize = 1024;

/// Cache options.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CacheConfig {
    /// Most resident pages.
    pub budget_pages: usize,
    /// Victim selection.
    pub policy: EvictPolicy,
    /// Most pages to prefetch along a fault stream's trend (0: off; at most
    /// [`MAX_PREFETCH`] are used).
    pub prefetch: usize,
    /// How fault streams are detected.
    #[serde(default)]
    pub prefetcher: Prefetcher,
    /// Fault handler threads.
    pub handlers: usize,
    /// Ask for `UFFD_EVENT_REMOVE` on our own discards (diagnostics; costs a
    /// context switch per discard).
    pub remove_events: bool,
    /// VMM threads (loaders, devices) write guest RAM directly: check every
    /// victim's content, since the KVM dirty log only sees guest writes.
    pub host_writes: bool,
    /// Log guest writes with KVM's dirty log: CLOCK then counts a page written
    /// since the hand last passed as referenced, and only logged pages are
    /// content-checked at eviction. Off, every victim's content is checked
    /// against its fingerprint (see [`evict`], "Dirty pages").
    pub dirty_log: bool,
    /// Move pages towards an even spread over the nodes at up to this many
    /// pages a second (0: off).
    pub rebalance: u64,
    /// Encrypt pages before they leave the VMM (AES-256-GCM, see [`seal`]);
    /// their integrity is checked either way.
    #[serde(default)]
    pub encrypt_pages: bool,
    /// Most new copies a second that the background makes of pages short of
    /// copies after a node failed ([`repair`]).
    #[serde(default = "default_rereplicate_rate")]
    pub rereplicate_rate: u64,
}

/// The default `rereplicate_rate`: 25 600 pages (100 MiB) a second.
pub fn default_rereplicate_rate() -> u64 {
    25_600
}

impl CacheConfig {
    /// Checks the budget against `mem` bytes of guest RAM; the error names the
    /// command-line options.
    pub fn check_budget(&self, mem: u64) -> Result<(), BudgetError> {
        let pages = mem / PAGE as u64;
        if self.budget_pages < evict::MIN_BUDGET {
            return Err(BudgetError::TooSmall {
                min: evict::MIN_BUDGET,
                got: self.budget_pages,
            });
        }
        if self.budget_pages as u64 > pages {
            return Err(BudgetError::LargerThanMem {
                budget: self.budget_pages,
                mem: pages,
            });
        }
        Ok(())
    }
}

/// Why `--local-cache` was refused ([`CacheConfig::check_budget`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BudgetError {
    /// Below the smallest usable budget.
    #[error("--local-cache must be at least 64K ({min} pages), got {got} pages")]
    TooSmall {
        /// The smallest budget, in pages.
        min: usize,
        /// The budget asked for, in pages.
        got: usize,
    },
    /// More than the guest RAM.
    #[error("--local-cache ({budget} pages) is larger than --mem ({mem} pages)")]
    LargerThanMem {
        /// The budget asked for, in pages.
        budget: usize,
        /// The guest RAM, in pages.
        mem: u64,
    },
}

/// Cache failures.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// userfaultfd setup.
    #[error(transparent)]
    Uffd(#[from] UffdError),
    /// A thread could not be started.
    #[error("cannot start a cache thread")]
    Thread(#[source] std::io::Error),
    /// An eventfd could not be made.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// The page encryption key could not be made.
    #[error("cannot make the page encryption key")]
    Key(#[source] fabric::auth::KeyError),
}

/// Shared between handler threads, the evictor and vCPU threads.
pub(crate) struct Shared {
    /// Pages in the arena (`arena.size() / PAGE`).
    pub(crate) pages: usize,
    pub(crate) state: Box<[AtomicU8]>,
    /// The page has data on its memory node (it was written back at least once).
    pub(crate) remote: Box<[AtomicBool]>,
    /// CLOCK reference bits.
    pub(crate) referenced: Box<[AtomicBool]>,
    /// The page was prefetched and the guest's stream has not reached it yet
    /// (prefetch accuracy, see [`fault`]).
    pub(crate) ahead: Box<[AtomicU8]>,
    /// Content fingerprint of each page as installed (two 64-bit lanes), see
    /// [`evict`] ("Clean pages").
    pub(crate) installed_hash: Box<[[AtomicU64; 2]]>,
    pub(crate) budget: usize,
    pub(crate) cfg: CacheConfig,
    /// Resident pages (including frames reserved for pages being installed).
    pub(crate) resident: Mutex<usize>,
    pub(crate) frames_cv: Condvar,
    /// Resident pages in the order the eviction policy takes them ([`victims`]).
    pub(crate) queue: Mutex<victims::Victims>,
    pub(crate) evict_wake: Condvar,
    /// Eviction batches in progress (vCPUs and handlers wait for them).
    pub(crate) evicting: Mutex<u64>,
    pub(crate) evicting_cv: Condvar,
    pub(crate) uffd: Uffd,
    pub(crate) retries: RetryCounters,
    pub(crate) stop: AtomicBool,
    pub(crate) stop_fd: EventFd,
    pub(crate) nodes: Placement,
    /// Versions and seals of the pages written out ([`seal`]).
    pub(crate) seals: seal::Seals,
    pub(crate) vm: Arc<VmFd>,
    pub(crate) stats: CacheStats,
    /// Pages the KVM dirty log reported and that have not been evicted since
    /// (shared by the evictor threads).
    pub(crate) dirty: Mutex<Vec<u64>>,
    /// Fault streams and their trends, for prefetching.
    pub(crate) trends: trend::Trends,
    /// Read-ahead marks of the streams.
    pub(crate) marks: readahead::Marks,
    /// The first fatal error (a memory node failed); the VM stops on it.
    pub(crate) fatal: Mutex<Option<Arc<PathError>>>,
    pub(crate) fatal_cv: Condvar,
    /// The arena's mapping. Every thread that touches the arena through this
    /// cache holds the `Shared`, so the arena cannot be unmapped while one
    /// runs. Last, so dropped last: after `uffd` (unregistered first) and after
    /// this share of the VM.
    arena: Arc<MmapRegion>,
}

impl Shared {
    /// Host address of the arena's first byte.
    pub(crate) fn host_base(&self) -> usize {
        self.arena.as_ptr() as usize
    }

    /// Host address of page `p` of the arena. For `p < self.pages` it lies in
    /// the arena mapping, which `self` keeps mapped (see `arena`), and in the
    /// range registered with `self.uffd`.
    pub(crate) fn addr(&self, p: usize) -> usize {
        self.host_base() + p * PAGE
    }

    /// Asks every cache thread to stop: sets `stop`, signals `stop_fd` (the
    /// fault handlers' epoll) and wakes every condition variable wait. The
    /// waits on `frames_cv` and `evict_wake` check `stop` under `resident`, so
    /// they are notified under it too: a thread between its check and its wait
    /// cannot miss the wake-up.
    fn request_stop(&self) {
        self.stop.store(true, SeqCst);
        let _ = self.stop_fd.write(1);
        {
            let _r = self.resident.lock().unwrap_or_else(PoisonError::into_inner);
            self.frames_cv.notify_all();
            self.evict_wake.notify_all();
        }
        let _e = self.evicting.lock().unwrap_or_else(PoisonError::into_inner);
        self.evicting_cv.notify_all();
    }

    /// Records a fatal error (the first one is kept, and logged with its
    /// causes) and wakes everyone who waits on the cache.
    pub(crate) fn fail(&self, why: PathError) {
        let mut f = self.fatal.lock().unwrap();
        if f.is_none() {
            log::error!("{}", fabric::client::error_chain(&why));
            *f = Some(Arc::new(why));
        }
        self.fatal_cv.notify_all();
        drop(f);
        self.stop.store(true, SeqCst);
        let _ = self.stop_fd.write(1);
        self.frames_cv.notify_all();
        self.evict_wake.notify_all();
        self.evicting_cv.notify_all();
    }

    /// Records the fingerprint of page `p`'s content as installed.
    pub(crate) fn set_installed_hash(&self, p: usize, h: [u64; 2]) {
        self.installed_hash[p][0].store(h[0], Relaxed);
        self.installed_hash[p][1].store(h[1], Relaxed);
    }

    pub(crate) fn stopped(&self) -> bool {
        self.stop.load(SeqCst)
    }

    /// Takes a frame, waiting for the evictor if the budget is used up.
    /// Returns false if the cache is stopping.
    pub(crate) fn reserve_frame(&self) -> bool {
        let mut r = self.resident.lock().unwrap();
        loop {
            if self.stopped() {
                return false;
            }
            if *r < self.budget {
                *r += 1;
                if self.wants_eviction(*r) {
                    self.evict_wake.notify_one();
                }
                return true;
            }
            self.evict_wake.notify_one();
            r = self.frames_cv.wait(r).unwrap();
        }
    }

    /// True when the evictor should free frames: fewer are free than the low
    /// watermark (kept for demand faults) plus what read-ahead takes at once
    /// (two windows), so that prefetching finds frames free instead of being cut
    /// short. Never when the whole arena fits in the budget (an all-local run).
    pub(crate) fn wants_eviction(&self, resident: usize) -> bool {
        self.budget < self.pages
            && self.budget - resident.min(self.budget)
                < evict::low_watermark(self.budget) + 2 * fault::prefetch_window(self)
    }

    /// Takes a frame only if one is free now without dipping below the watermark.
    pub(crate) fn try_reserve_frame(&self) -> bool {
        let mut r = self.resident.lock().unwrap();
        let limit = if self.budget >= self.pages {
            self.budget
        } else {
            self.budget
                .saturating_sub(evict::low_watermark(self.budget))
        };
        if *r < limit {
            *r += 1;
            true
        } else {
            false
        }
    }

    pub(crate) fn release_frames(&self, n: usize) {
        let mut r = self.resident.lock().unwrap();
        *r -= n;
        self.frames_cv.notify_all();
    }

    /// Sleeps for `d`, or less if the cache stops meanwhile.
    pub(crate) fn sleep_unless_stopped(&self, d: Duration) {
        let end = std::time::Instant::now() + d;
        while !self.stopped() {
            let Some(left) = end.checked_duration_since(std::time::Instant::now()) else {
                return;
            };
            std::thread::sleep(left.min(Duration::from_millis(20)));
        }
    }

    /// Waits (briefly) until no eviction batch is in progress.
    pub(crate) fn wait_for_evictions(&self) {
        let mut e = self.evicting.lock().unwrap();
        while *e > 0 && !self.stopped() {
            e = self
                .evicting_cv
                .wait_timeout(e, Duration::from_millis(10))
                .unwrap()
                .0;
        }
    }
}

/// The running cache: its threads and shared state.
///
/// It joins every thread it started: [`ExCache::shutdown`] does, and so does
/// dropping it (an error return after [`ExCache::start`], a run that ends
/// another way), which stops them first. The threads hold the shared state,
/// which owns a share of the arena's mapping, so the arena stays mapped until
/// the last of them has returned.
pub struct ExCache {
    pub(crate) shared: Arc<Shared>,
    /// The fault handlers, the evictors and the rebalancer.
    threads: Vec<JoinHandle<()>>,
    /// Drain threads of detaches ([`ExCache::detach_node`]); finished ones are
    /// reaped when the next one starts.
    drains: Mutex<Vec<JoinHandle<()>>>,
}

impl ExCache {
    /// Registers the arena (`arena`, a whole number of 4 KiB pages) with
    /// userfaultfd and starts the fault handlers and the evictor. The cache
    /// keeps `arena` mapped until its threads have returned.
    pub fn start(
        arena: Arc<MmapRegion>,
        cfg: CacheConfig,
        nodes: Placement,
        vm: Arc<VmFd>,
    ) -> Result<Self, CacheError> {
        let pages = arena.size() / PAGE;
        let uffd = uffd::create(cfg.remove_events)?;
        // MISSING faults bring pages in; write-protect faults hold writers to a
        // page under eviction (see [`evict`]).
        uffd.register_with_mode(
            arena.as_ptr().cast(),
            pages * PAGE,
            userfaultfd::RegisterMode::MISSING | userfaultfd::RegisterMode::WRITE_PROTECT,
        )
        .map_err(|e| CacheError::Uffd(UffdError::Register(e)))?;
        let shared = Arc::new(Shared {
            pages,
            state: (0..pages).map(|_| AtomicU8::new(ABSENT)).collect(),
            remote: (0..pages).map(|_| AtomicBool::new(false)).collect(),
            referenced: (0..pages).map(|_| AtomicBool::new(false)).collect(),
            ahead: (0..pages)
                .map(|_| AtomicU8::new(fault::NOT_AHEAD))
                .collect(),
            installed_hash: (0..pages)
                .map(|_| [AtomicU64::new(0), AtomicU64::new(0)])
                .collect(),
            budget: cfg.budget_pages.max(evict::MIN_BUDGET),
            cfg: cfg.clone(),
            resident: Mutex::new(0),
            frames_cv: Condvar::new(),
            queue: Mutex::new(victims::Victims::new(
                cfg.policy,
                pages,
                cfg.budget_pages.max(evict::MIN_BUDGET),
            )),
            evict_wake: Condvar::new(),
            evicting: Mutex::new(0),
            evicting_cv: Condvar::new(),
            uffd,
            retries: RetryCounters::default(),
            stop: AtomicBool::new(false),
            stop_fd: EventFd::new(libc::EFD_NONBLOCK).map_err(CacheError::EventFd)?,
            nodes,
            seals: seal::Seals::new(pages, cfg.encrypt_pages).map_err(CacheError::Key)?,
            vm,
            stats: CacheStats::new(),
            trends: trend::Trends::new(cfg.prefetcher),
            marks: readahead::Marks::new(),
            dirty: Mutex::new(vec![0u64; pages.div_ceil(64)]),
            fatal: Mutex::new(None),
            fatal_cv: Condvar::new(),
            arena,
        });
        // Built before its threads start: if one cannot start, dropping the
        // cache stops and joins those already started.
        let mut cache = ExCache {
            shared,
            threads: Vec::new(),
            drains: Mutex::new(Vec::new()),
        };
        let mut spawn = |name: String, f: fn(&Shared)| {
            let s = cache.shared.clone();
            let t = std::thread::Builder::new()
                .name(name)
                .spawn(move || f(&s))
                .map_err(CacheError::Thread)?;
            cache.threads.push(t);
            Ok::<(), CacheError>(())
        };
        for i in 0..cfg.handlers.max(1) {
            spawn(format!("fault-{i}"), fault::handler_loop)?;
        }
        for i in 0..evict::EVICTORS {
            spawn(format!("evictor-{i}"), evict::evictor_loop)?;
        }
        spawn("repair".into(), |s| {
            repair::repair_loop(s, s.cfg.rereplicate_rate)
        })?;
        if cfg.rebalance > 0 {
            spawn("rebalance".into(), |s| {
                drain::rebalance_loop(s, s.cfg.rebalance)
            })?;
        }
        Ok(cache)
    }

    /// The first fatal error, if any.
    pub fn fatal(&self) -> Option<Arc<PathError>> {
        self.shared.fatal.lock().unwrap().clone()
    }

    /// Called by a vCPU whose write hit a page under eviction: waits for the batch.
    pub fn vcpu_write_blocked(&self) {
        self.shared.stats.vcpu_eviction_waits.fetch_add(1, Relaxed);
        self.shared.wait_for_evictions();
    }

    /// Waits until a fatal error occurs or `done` returns true (polled every 20 ms).
    pub fn wait_fatal_or(&self, done: impl Fn() -> bool) -> Option<Arc<PathError>> {
        let mut f = self.shared.fatal.lock().unwrap();
        loop {
            if let Some(e) = f.as_ref() {
                return Some(e.clone());
            }
            if done() {
                return None;
            }
            f = self
                .shared
                .fatal_cv
                .wait_timeout(f, Duration::from_millis(20))
                .unwrap()
                .0;
        }
    }

    /// Wakes [`ExCache::wait_fatal_or`] to check its condition now.
    pub fn wake_waiters(&self) {
        let _f = self.shared.fatal.lock().unwrap();
        self.shared.fatal_cv.notify_all();
    }

    /// The statistics now.
    pub fn snapshot(&self) -> StatsSnapshot {
        let s = &self.shared;
        let st = &s.stats;
        let (below, without, placed) = s.nodes.below_replicas();
        // A scan of every page: before any lock the fault path takes.
        let unreached = s
            .ahead
            .iter()
            .filter(|a| a.load(Relaxed) == fault::AHEAD_REMOTE)
            .count() as u64;
        let resident = *s.resident.lock().unwrap() as u64;
        let h = st.fetch_ns.lock().unwrap();
        StatsSnapshot {
            resident_pages: resident,
            budget_pages: s.budget as u64,
            faults_zero: load(&st.faults_zero),
            faults_remote: load(&st.faults_remote),
            faults_spurious: load(&st.faults_spurious),
            prefetch_remote: load(&st.prefetch_remote),
            prefetch_zero: load(&st.prefetch_zero),
            readahead_hits: load(&st.readahead_hits),
            readahead_dropped: load(&st.readahead_dropped),
            evict_clean: load(&st.evict_clean),
            evict_dirty: load(&st.evict_dirty),
            evict_promoted: load(&st.evict_promoted),
            prefetch_used: load(&st.prefetch_used),
            prefetch_wasted: load(&st.prefetch_wasted),
            prefetch_unreached: unreached,
            writeback_bytes: load(&st.writeback_bytes),
            vcpu_eviction_waits: load(&st.vcpu_eviction_waits),
            uffd_eagain: load(&s.retries.eagain),
            uffd_eexist: load(&s.retries.eexist),
            remove_events: load(&st.remove_events),
            rebalanced: load(&st.rebalanced),
            replicas: s.nodes.replicas() as u64,
            pages_below_replicas: below,
            pages_without_copy: without,
            rereplicated: load(&st.rereplicated),
            rereplicate_rate: s.cfg.rereplicate_rate,
            node_failures: load(&st.node_failures),
            pages_placed: placed,
            pages_read_one_sided: s
                .nodes
                .nodes()
                .iter()
                .filter_map(|n| n.client.one_sided_pages())
                .sum(),
            fault_max_us: load(&st.fault_max_ns) as f64 / 1000.0,
            pages_refused: load(&s.seals.refused),
            faults_wp: load(&st.faults_wp),
            seal_checks: load(&s.seals.checks),
            seal_check_mean_us: match load(&s.seals.checks) {
                0 => 0.0,
                n => load(&s.seals.check_ns) as f64 / n as f64 / 1000.0,
            },
            fetch_count: h.len(),
            fetch_p50_us: h.value_at_quantile(0.5) as f64 / 1000.0,
            fetch_p99_us: h.value_at_quantile(0.99) as f64 / 1000.0,
            node_pages: s
                .nodes
                .nodes()
                .iter()
                .filter(|n| n.state() != placement::NodeState::Detached)
                .map(|n| (n.addr.clone(), n.pages.load(Relaxed)))
                .collect(),
        }
    }

    /// The remote fetch latency as a histogram: for each upper bound (ns, in
    /// increasing order) the fetches that took at most that long, then the
    /// count and the sum of all (ns; from the histogram's recorded values, so
    /// within its 0.1% precision).
    pub fn fetch_latency(&self, bounds_ns: &[u64]) -> (Vec<u64>, u64, f64) {
        let h = self.shared.stats.fetch_ns.lock().unwrap();
        let below = bounds_ns
            .iter()
            .map(|&b| h.count_between(0, b.max(1)))
            .collect();
        (below, h.len(), h.mean() * h.len() as f64)
    }

    /// What happened to the memory nodes (attached, failed, drained), oldest
    /// first.
    pub fn node_events(&self) -> Vec<placement::NodeEvent> {
        self.shared.nodes.events()
    }

    /// Attaches the memory node `addr` names (`ADDR[,zone=NAME]`): new pages
    /// (and new copies) may be placed on it.
    pub fn attach_node(&self, addr: &str) -> Result<(), placement::PlacementError> {
        self.shared.nodes.attach(addr).map(|_| ())
    }

    /// Starts detaching the memory node at `addr`: checks there is room
    /// elsewhere, then drains it in the background while the guest runs.
    /// `done` is called with the outcome, on the drain thread (which
    /// [`ExCache::shutdown`] and dropping the cache join).
    pub fn detach_node(
        &self,
        addr: &str,
        done: impl FnOnce(Result<(), PathError>) + Send + 'static,
    ) -> Result<(), placement::PlacementError> {
        let i = self.shared.nodes.begin_detach(addr)?;
        let s = self.shared.clone();
        let addr = addr.to_string();
        let drain = std::thread::Builder::new()
            .name("drain".into())
            .spawn(move || {
                let t0 = std::time::Instant::now();
                let r = drain::drain(&s, i);
                match &r {
                    Ok(()) => {
                        s.nodes.finish_detach(i);
                        log::info!(
                            "memory node {addr} detached after a {:.1} s drain",
                            t0.elapsed().as_secs_f64()
                        );
                    }
                    Err(e) => {
                        s.nodes.abort_detach(i);
                        log::error!(
                            "detaching memory node {addr} failed: {}",
                            fabric::client::error_chain(e)
                        );
                    }
                }
                done(r);
            })
            .map_err(|_| {
                self.shared.nodes.abort_detach(i);
                placement::PlacementError::Draining(addr_for_err(&self.shared, i))
            })?;
        let mut drains = self.drains.lock().unwrap_or_else(PoisonError::into_inner);
        let (finished, running): (Vec<_>, Vec<_>) = std::mem::take(&mut *drains)
            .into_iter()
            .partition(|t| t.is_finished());
        *drains = running;
        drains.push(drain);
        drop(drains);
        for t in finished {
            let _ = t.join();
        }
        Ok(())
    }

    /// The memory nodes with their state and this VM's pages on each.
    pub fn node_list(&self) -> Vec<NodeView> {
        self.shared
            .nodes
            .nodes()
            .iter()
            .map(|n| NodeView {
                addr: n.addr.clone(),
                state: n.state(),
                pages: n.pages.load(Relaxed),
                full: n.is_full(),
                capacity_pages: n.capacity_pages(),
                zone: n.zone.clone(),
                instance: format!("{:016x}", n.client.node().instance),
                transport: match n.client.one_sided_pages() {
                    Some(_) => "rdma",
                    None if fabric::client::is_ideal_addr(&n.addr) => "ideal",
                    None => "tcp",
                },
                one_sided_pages: n.client.one_sided_pages(),
                failure: n.failure().map(|(_, why)| why),
                failed_at: n.failure().map(|(t, _)| {
                    t.duration_since(std::time::UNIX_EPOCH)
                        .map_or(0.0, |d| d.as_secs_f64())
                }),
            })
            .collect()
    }

    /// Stops and joins the threads (drains included), then frees this VM's
    /// pages on its memory nodes.
    pub fn shutdown(mut self) {
        self.stop_and_join();
        let s = self.shared.clone();
        if s.fatal.lock().unwrap().is_some() {
            return;
        }
        for (i, node) in s.nodes.nodes().iter().enumerate() {
            if matches!(
                node.state(),
                placement::NodeState::Detached | placement::NodeState::Dead
            ) {
                continue;
            }
            let gpns = s.nodes.pages_on(i);
            for chunk in gpns.chunks(node.client.node().max_batch) {
                if let Err(e) = node.client.free_pages(chunk) {
                    log::warn!(
                        "freeing pages on {}: {}",
                        node.addr,
                        fabric::client::error_chain(&e)
                    );
                    break;
                }
            }
        }
    }
}

impl ExCache {
    /// Stops every thread this cache started and joins it. Joins each thread
    /// once (the handles are taken), so a second call (the `Drop` after
    /// [`ExCache::shutdown`]) only repeats the stop request. A thread never
    /// joins itself: should a drain's `done` drop the last share of the cache,
    /// its own handle is let go (the thread is returning).
    fn stop_and_join(&mut self) {
        self.shared.request_stop();
        let drains = std::mem::take(
            self.drains
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner),
        );
        let me = std::thread::current().id();
        for t in self.threads.drain(..).chain(drains) {
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
    }
}

impl Drop for ExCache {
    /// Stops and joins the cache's threads (as `shutdown` does first);
    /// unlike [`ExCache::shutdown`], leaves the VM's pages on the nodes.
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Calls `f(i, j)` for each maximal run `pages[i..j]` of consecutive page
/// numbers (`pages` sorted); stops at the first error.
pub(crate) fn consecutive_runs<E>(
    pages: &[usize],
    mut f: impl FnMut(usize, usize) -> Result<(), E>,
) -> Result<(), E> {
    let mut i = 0;
    while i < pages.len() {
        let mut j = i + 1;
        while j < pages.len() && pages[j] == pages[j - 1] + 1 {
            j += 1;
        }
        f(i, j)?;
        i = j;
    }
    Ok(())
}

fn addr_for_err(s: &Shared, i: usize) -> String {
    s.nodes.node(i).addr.clone()
}

/// A memory node as the control API shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeView {
    /// Its address.
    pub addr: String,
    /// Active, draining or detached.
    pub state: placement::NodeState,
    /// This VM's pages on it.
    pub pages: u64,
    /// It answered "out of capacity".
    pub full: bool,
    /// Its capacity in pages (all VMs), as last reported.
    pub capacity_pages: u64,
    /// Its failure domain.
    pub zone: Option<String>,
    /// The node process's instance number (hex): another one at the same
    /// address is a restarted, empty node.
    pub instance: String,
    /// How pages reach it: `tcp`, `rdma` (one-sided reads) or `ideal`.
    pub transport: &'static str,
    /// Pages read from it with one-sided RDMA READs (RDMA nodes only).
    pub one_sided_pages: Option<u64>,
    /// Why it was declared failed.
    pub failure: Option<String>,
    /// When (seconds since the Unix epoch).
    pub failed_at: Option<f64>,
}

/// The dirty log slot this cache reads.
pub(crate) const DIRTY_SLOT: u32 = ARENA_SLOT;
