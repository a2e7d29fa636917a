//! The RDMA transport (cargo feature `rdma`): one-sided page reads over a
//! reliable-connected queue pair.
//!
//! A client of an `rdma://HOST:PORT` node first opens the usual TCP
//! connection and authenticates on it (`Hello`, `Challenge`, `Proof`). Over
//! that connection it then sends its queue pair's endpoint (`RdmaConnect`);
//! the node creates a queue pair for it in the protection domain of the
//! connection's VM, connects it, and answers with its own endpoint
//! (`RdmaConnectOk`). From then on:
//!
//! - **page reads are one-sided**: the client asks once per chunk of the VM's
//!   page region where it lies (`MapRegion`, two-sided), caches the answer,
//!   and reads pages with RDMA READs straight from the node's memory: no node
//!   CPU, no request message ([`RdmaReader`]);
//! - writes (write-back), frees, statistics and pings stay two-sided
//!   messages on the TCP connection: they change the node's state, and a
//!   write must be acknowledged after the node stored it.
//!
//! Completions are collected by one thread per reader, which blocks on the
//! completion channel (no spinning) and wakes the waiting fault handlers.
//! Every wait has a deadline: a lost completion, a queue pair in the error
//! state or a node that died fails the read with an error naming the node,
//! and the reader refuses every later read, so the caller takes the same
//! node-failure path as on a lost TCP connection.

pub mod verbs;

use crate::proto::{PAGE_SIZE, RdmaEndpoint};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use verbs::{Completion, Cq, Device, Mapping, Mr, Pd, Qp, QpCaps, ReadWr};

/// Failures of the RDMA transport.
#[derive(Debug, thiserror::Error)]
pub enum RdmaError {
    /// No (suitable) RDMA device.
    #[error("no RDMA device{}: seen {seen}", wanted.as_ref().map(|w| format!(" named {w}")).unwrap_or_default())]
    NoDevice {
        /// The device asked for, if one was.
        wanted: Option<String>,
        /// What was found instead.
        seen: String,
    },
    /// The device's port is not active.
    #[error("RDMA device {device}: port 1 is not active (state {state})")]
    PortDown {
        /// The device.
        device: String,
        /// The port state (ibv_port_state).
        state: u32,
    },
    /// The port has no usable GID (no IP address on its network device?).
    #[error("RDMA device {device} has no GID: give its network device an IP address")]
    NoGid {
        /// The device.
        device: String,
    },
    /// The node did not take our queue pair (the `RdmaConnect` exchange).
    #[error("the node refused the queue pair exchange")]
    Exchange(#[source] Box<crate::client::ClientError>),
    /// The completion thread could not be started.
    #[error("cannot start the completion thread")]
    Thread(#[source] std::io::Error),
    /// The link failed earlier (a completion error, a timeout, a closed
    /// connection); every read fails with the first cause.
    #[error("the RDMA link to {peer} failed: {reason}")]
    Failed {
        /// The node.
        peer: String,
        /// The first failure.
        reason: String,
    },
    /// A verb failed.
    #[error("{verb} failed")]
    Verb {
        /// The verb.
        verb: &'static str,
        /// The errno it returned.
        #[source]
        source: std::io::Error,
    },
}

/// How long a waiter polls the completion queue itself before it sleeps.
const SPIN: Duration = Duration::from_micros(30);

/// How a reader is set up.
#[derive(Debug, Clone)]
pub struct ReaderConfig {
    /// The local device (`None`: the first with an active port).
    pub device: Option<String>,
    /// Reads in flight at once (each up to `MAX_BATCH` pages of bounce
    /// buffer, registered and pinned for the reader's life).
    pub slots: usize,
    /// How long a read may wait for its completions.
    pub timeout: Duration,
}

/// One chunk of a VM's page region on the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteChunk {
    /// The chunk's address in the node's registration.
    pub addr: u64,
    /// Its remote key.
    pub rkey: u32,
}

struct SlotState {
    generation: u32,
    outstanding: u32,
    error: Option<String>,
}

struct Slot {
    st: Mutex<SlotState>,
    cv: Condvar,
}

/// What the completion thread shares with the readers.
struct Shared {
    cq: Arc<Cq>,
    /// Held while polling the completion queue (the thread and spinning
    /// waiters poll it; one at a time).
    poll_lock: Mutex<()>,
    slots: Box<[Slot]>,
    failed: Mutex<Option<String>>,
    stop: AtomicBool,
    peer: String,
}

impl Shared {
    fn fail(&self, why: String) {
        let mut f = self.failed.lock().unwrap();
        if f.is_none() {
            log::warn!("RDMA link to {}: {why}", self.peer);
            *f = Some(why.clone());
        }
        drop(f);
        for s in self.slots.iter() {
            let mut st = s.st.lock().unwrap();
            if st.outstanding > 0 && st.error.is_none() {
                st.error = Some(why.clone());
            }
            s.cv.notify_all();
        }
    }

    fn deliver(&self, c: Completion) {
        let (index, generation) = ((c.wr_id >> 32) as usize, c.wr_id as u32);
        let Some(slot) = self.slots.get(index) else {
            return self.fail(format!(
                "a completion for unknown work request {:#x}",
                c.wr_id
            ));
        };
        let mut st = slot.st.lock().unwrap();
        if st.generation != generation || st.outstanding == 0 {
            drop(st);
            return self.fail(format!(
                "a stray completion for work request {:#x}",
                c.wr_id
            ));
        }
        st.outstanding -= 1;
        if let Some((status, name)) = c.error {
            let why = format!("an RDMA READ failed: {name} (status {status})");
            st.error.get_or_insert(why.clone());
            drop(st);
            slot.cv.notify_all();
            return self.fail(why);
        }
        if st.outstanding == 0 {
            slot.cv.notify_all();
        }
    }

    /// Polls the completion queue once and delivers what is there; returns
    /// how many completions that was (0 if another thread is polling).
    fn poll_once(&self, got: &mut Vec<Completion>, block: bool) -> Result<usize, RdmaError> {
        let _g = if block {
            self.poll_lock.lock().unwrap()
        } else {
            match self.poll_lock.try_lock() {
                Ok(g) => g,
                Err(_) => return Ok(0),
            }
        };
        got.clear();
        self.cq.poll(got, 256)?;
        let n = got.len();
        for c in got.drain(..) {
            self.deliver(c);
        }
        Ok(n)
    }

    /// The completion thread: blocks on the channel, delivers completions.
    fn run(&self) {
        let mut got = Vec::with_capacity(256);
        while !self.stop.load(Acquire) {
            let n = match self.poll_once(&mut got, true) {
                Ok(n) => n,
                Err(e) => {
                    self.fail(crate::client::error_chain(&e));
                    return;
                }
            };
            if n == 0
                && let Err(e) = self.cq.wait(Duration::from_millis(50))
            {
                self.fail(crate::client::error_chain(&e));
                return;
            }
        }
    }
}

/// One-sided page reads from one node: a queue pair connected to the node's,
/// a registered bounce buffer, and the completion thread.
pub struct RdmaReader {
    // Field order is drop order: the thread is joined first (in `Drop`), the
    // queue pair goes before the registration it reads into, the
    // registration before the memory.
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    qp: Qp,
    post: Mutex<()>,
    bounce_mr: Mr,
    bounce: Mapping,
    free: Mutex<Vec<usize>>,
    fallbacks: AtomicU64,
    chunk_pages: u64,
    chunks: Mutex<ChunkMap>,
    timeout: Duration,
    pages_read: AtomicU64,
}

/// Chunk number to place, as a sorted vector (a VM has few chunks: one per
/// 2 MiB of its memory).
#[derive(Default)]
struct ChunkMap(Vec<(u64, RemoteChunk)>);

impl ChunkMap {
    fn get(&self, chunk: u64) -> Option<RemoteChunk> {
        self.0
            .binary_search_by_key(&chunk, |e| e.0)
            .ok()
            .map(|i| self.0[i].1)
    }

    fn insert(&mut self, chunk: u64, place: RemoteChunk) {
        match self.0.binary_search_by_key(&chunk, |e| e.0) {
            Ok(i) => self.0[i].1 = place,
            Err(i) => self.0.insert(i, (chunk, place)),
        }
    }
}

/// A read in flight on a reader slot.
#[must_use = "a posted read holds a bounce slot until finished"]
pub struct PostedRead {
    slot: usize,
    /// Bit `k`: page `k` was read from the node (else it is in no chunk and
    /// reads as zeros).
    read: u64,
    count: usize,
}

impl PostedRead {
    /// Pages the read fetches from the node.
    pub fn pages(&self) -> usize {
        self.read.count_ones() as usize
    }
}

impl RdmaReader {
    /// Sets up this side: opens the device, makes the queue pair and the
    /// bounce buffer. `exchange` sends this side's endpoint to the node (over
    /// the authenticated TCP connection) and returns the node's endpoint and
    /// its chunk size in pages.
    pub fn connect(
        peer: &str,
        config: &ReaderConfig,
        exchange: impl FnOnce(RdmaEndpoint) -> Result<(RdmaEndpoint, u32), crate::client::ClientError>,
    ) -> Result<Self, RdmaError> {
        let device = Device::open(config.device.as_deref())?;
        let pd = Pd::new(&device)?;
        let slots = config.slots.clamp(1, 256);
        let batch = crate::proto::MAX_BATCH;
        let wrs = (slots * batch) as u32;
        let cq = Cq::new(&device, wrs as i32 + 16)?;
        let qp = Qp::new(
            &pd,
            &cq,
            QpCaps {
                send_wr: wrs,
                rd_atomic: 16,
            },
            false,
        )?;
        let bounce = Mapping::new(slots * batch * PAGE_SIZE)?;
        // SAFETY: `bounce` is owned by the reader and outlives the MR (field order).
        let bounce_mr = unsafe { Mr::register(&pd, bounce.as_ptr(), bounce.len(), false) }?;
        let (node, chunk_pages) =
            exchange(qp.endpoint()).map_err(|e| RdmaError::Exchange(Box::new(e)))?;
        // The ACK timeout per try (4.096 µs × 2^exp) so that 7 tries fit in
        // the read timeout.
        let per_try_us = (config.timeout.as_micros() / 8).max(1) as f64 / 4.096;
        let exp = (per_try_us.log2().floor() as i64).clamp(8, 20) as u8;
        qp.connect(&node, exp, 7)?;
        let shared = Arc::new(Shared {
            cq,
            slots: (0..slots)
                .map(|_| Slot {
                    st: Mutex::new(SlotState {
                        generation: 0,
                        outstanding: 0,
                        error: None,
                    }),
                    cv: Condvar::new(),
                })
                .collect(),
            poll_lock: Mutex::new(()),
            failed: Mutex::new(None),
            stop: AtomicBool::new(false),
            peer: peer.to_string(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("rdma-cq".into())
            .spawn(move || s.run())
            .map_err(RdmaError::Thread)?;
        log::info!(
            "RDMA link to {peer} over {} (qp {} -> {}): one-sided reads, {chunk_pages}-page chunks",
            device.name(),
            qp.endpoint().qpn,
            node.qpn
        );
        Ok(RdmaReader {
            shared,
            thread: Some(thread),
            qp,
            post: Mutex::new(()),
            bounce_mr,
            bounce,
            free: Mutex::new((0..slots).rev().collect()),
            fallbacks: AtomicU64::new(0),
            chunk_pages: u64::from(chunk_pages),
            chunks: Mutex::new(Default::default()),
            timeout: config.timeout,
            pages_read: AtomicU64::new(0),
        })
    }

    /// Why the reader failed, if it has.
    pub fn failure(&self) -> Option<String> {
        self.shared.failed.lock().unwrap().clone()
    }

    /// The reader's failure as an error, if it has failed.
    fn failed(&self) -> Result<(), RdmaError> {
        match self.failure() {
            Some(reason) => Err(self.failed_with(reason)),
            None => Ok(()),
        }
    }

    fn failed_with(&self, reason: String) -> RdmaError {
        RdmaError::Failed {
            peer: self.shared.peer.clone(),
            reason,
        }
    }

    /// Pages per chunk of the node's regions.
    pub fn chunk_pages(&self) -> u64 {
        self.chunk_pages
    }

    /// The chunk of page `gpn`.
    pub fn chunk_of(&self, gpn: u64) -> u64 {
        gpn / self.chunk_pages
    }

    /// The cached place of `chunk`, if known.
    pub fn chunk(&self, chunk: u64) -> Option<RemoteChunk> {
        self.chunks.lock().unwrap().get(chunk)
    }

    /// Remembers where `chunk` lies (a chunk never moves while the
    /// connection lives).
    pub fn learn(&self, chunk: u64, place: RemoteChunk) {
        self.chunks.lock().unwrap().insert(chunk, place);
    }

    /// Reads that found every bounce slot taken and went two-sided.
    pub fn fallbacks(&self) -> u64 {
        self.fallbacks.load(Relaxed)
    }

    /// Pages read with RDMA READs so far.
    pub fn pages_read(&self) -> u64 {
        self.pages_read.load(Relaxed)
    }

    /// Posts reads of `gpns` (at most `MAX_BATCH`): one RDMA READ per run of
    /// consecutive pages in one known chunk; pages whose chunk `place` gives
    /// none are not read (zeros). `Ok(None)`: every bounce slot is taken by
    /// a read not yet waited for (the caller reads two-sided instead: a
    /// caller that submits many reads before it waits never blocks here).
    pub fn post(
        &self,
        gpns: &[u64],
        place: impl Fn(u64) -> Option<RemoteChunk>,
    ) -> Result<Option<PostedRead>, RdmaError> {
        self.failed()?;
        assert!(gpns.len() <= crate::proto::MAX_BATCH);
        let Some(slot) = self.free.lock().unwrap().pop() else {
            self.fallbacks.fetch_add(1, Relaxed);
            return Ok(None);
        };
        let base = self.bounce.as_ptr() as usize + slot * crate::proto::MAX_BATCH * PAGE_SIZE;
        // One READ per run; one rkey per post, so runs are grouped by chunk.
        let mut runs: Vec<(RemoteChunk, ReadWr)> = Vec::new();
        let mut read = 0u64;
        let mut last: Option<(u64, RemoteChunk)> = None;
        for (k, &gpn) in gpns.iter().enumerate() {
            let chunk = self.chunk_of(gpn);
            let Some(c) = place(chunk) else {
                last = None;
                continue;
            };
            read |= 1 << k;
            let remote = c.addr + (gpn % self.chunk_pages) * PAGE_SIZE as u64;
            match (last, runs.last_mut()) {
                (Some((prev, pc)), Some((_, run))) if prev + 1 == gpn && pc == c => {
                    run.len += PAGE_SIZE as u32;
                }
                _ => runs.push((
                    c,
                    ReadWr {
                        wr_id: 0,
                        local: (base + k * PAGE_SIZE) as *mut u8,
                        len: PAGE_SIZE as u32,
                        remote,
                    },
                )),
            }
            last = Some((gpn, c));
        }
        let shared = &self.shared;
        let generation = {
            let mut st = shared.slots[slot].st.lock().unwrap();
            st.generation = st.generation.wrapping_add(1);
            st.outstanding = runs.len() as u32;
            st.error = None;
            st.generation
        };
        // The completion thread may have failed the reader between the check
        // above and the slot's accounting (its `fail` skipped this slot):
        // post nothing then, and keep the slot out of use.
        self.failed()?;
        let wr_id = ((slot as u64) << 32) | u64::from(generation);
        let _g = self.post.lock().unwrap();
        let mut i = 0;
        while i < runs.len() {
            let rkey = runs[i].0.rkey;
            let j = i + runs[i..].iter().take_while(|r| r.0.rkey == rkey).count();
            let wrs: Vec<ReadWr> = runs[i..j].iter().map(|r| ReadWr { wr_id, ..r.1 }).collect();
            // SAFETY: each local range lies in this slot of the bounce buffer
            // (registered as `bounce_mr`), which no one else uses until the
            // slot's completions are in (`finish`).
            if let Err(e) = unsafe { self.qp.post_reads(&wrs, self.bounce_mr.lkey(), rkey) } {
                // Work requests already posted may still complete: the slot
                // is not reused (the reader is failed from now on).
                shared.fail(crate::client::error_chain(&e));
                return Err(e);
            }
            i = j;
        }
        self.pages_read
            .fetch_add(u64::from(read.count_ones()), Relaxed);
        Ok(Some(PostedRead {
            slot,
            read,
            count: gpns.len(),
        }))
    }

    /// Waits for a posted read and copies its pages into `out` (`count` ×
    /// 4096 bytes); returns a presence mask: bit `k` set if page `k` holds
    /// data (a page that is all zeros reads as absent, as a node stores no
    /// zero pages).
    pub fn finish(&self, r: PostedRead, out: &mut [u8]) -> Result<u64, RdmaError> {
        let slot = &self.shared.slots[r.slot];
        // A READ on a fast fabric completes in microseconds: poll for it here
        // for a while before sleeping on the completion thread's wake-up (two
        // context switches).
        let spin_until = Instant::now() + SPIN;
        let mut got = Vec::new();
        loop {
            {
                let st = slot.st.lock().unwrap();
                if st.error.is_some() || st.outstanding == 0 {
                    break;
                }
            }
            if Instant::now() >= spin_until {
                break;
            }
            if let Err(e) = self.shared.poll_once(&mut got, false) {
                self.shared.fail(crate::client::error_chain(&e));
            }
            std::hint::spin_loop();
        }
        let deadline = Instant::now() + self.timeout;
        let mut st = slot.st.lock().unwrap();
        let outcome = loop {
            if let Some(e) = &st.error {
                break Err(e.clone());
            }
            if st.outstanding == 0 {
                break Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Err(format!(
                    "RDMA READ not completed within {:?} ({} work requests outstanding)",
                    self.timeout, st.outstanding
                ));
            }
            st = slot.cv.wait_timeout(st, left).unwrap().0;
        };
        drop(st);
        if let Err(why) = outcome {
            // The device may still write into the slot: it is never reused
            // (the reader is failed; every later read fails at once).
            self.shared.fail(why.clone());
            return Err(self.failed_with(why));
        }
        let base = self.bounce.as_ptr() as usize + r.slot * crate::proto::MAX_BATCH * PAGE_SIZE;
        let mut present = 0u64;
        for (k, page) in out.chunks_exact_mut(PAGE_SIZE).take(r.count).enumerate() {
            if r.read & (1 << k) == 0 {
                page.fill(0);
                continue;
            }
            // SAFETY: the page lies in this slot of the bounce buffer, whose
            // reads have all completed; nobody else touches the slot until it
            // is released below.
            let src = unsafe {
                std::slice::from_raw_parts((base + k * PAGE_SIZE) as *const u8, PAGE_SIZE)
            };
            page.copy_from_slice(src);
            if src.iter().any(|&b| b != 0) {
                present |= 1 << k;
            }
        }
        self.free.lock().unwrap().push(r.slot);
        Ok(present)
    }

    /// Fails the reader (the TCP connection was lost): every read fails.
    pub fn fail(&self, why: String) {
        self.shared.fail(why);
    }
}

impl Drop for RdmaReader {
    fn drop(&mut self) {
        self.shared.stop.store(true, Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
