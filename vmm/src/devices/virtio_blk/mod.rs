//! virtio-blk: a block device backed by a [`BlockBackend`]: a local file
//! ([`FileBackend`]) or a remote storage node over NBD
//! ([`super::nbd_disk::NbdBackend`]).
//!
//! The device is served on its VM's I/O event loop ([`crate::event_loop`]), never
//! on a vCPU: a queue notification (an ioeventfd, see [`super::virtio_pci`])
//! makes the loop take every request the guest has made available, check each
//! ([`request`]: nothing moves before a request is found sound), and submit the
//! valid ones to the backend; the backend's completions come back as another
//! event, and each request is completed (data and status written, used ring
//! updated, MSI-X vector raised) only after the backend reported its outcome, so
//! the guest never sees a write completed before the storage node acknowledged
//! it.
//!
//! ## Bounded guest input
//!
//! A guest decides what it puts in its queue; what the VMM allocates for it is
//! bounded: at most [`MAX_INFLIGHT_BYTES`] of request data (plus one request of
//! at most [`request::MAX_REQUEST`] when nothing else is in flight) and at most
//! [`MAX_INFLIGHT_REQUESTS`] requests are with the backend at once; requests
//! beyond that wait, as descriptors only (the queue holds at most 256), until
//! earlier ones complete. Data is copied once between guest memory and the
//! backend's buffer (a storage node's request takes its buffer whole).

#[doc(hidden)]
pub mod fuzzing;
pub mod request;

use super::virtio_irq::VirtioInterrupt;
use super::virtio_pci::{F_VERSION_1, VirtioDevice};
pub use crate::devices::block::{BlockBackend, BlockOp, DiskError, FileBackend, OpKind};
use event_manager::{EventOps, Events, MutEventSubscriber};
use request::{Disk, ID_BYTES, Kind, Request, S_IOERR, S_OK};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;
const QUEUE_SIZE: u16 = 256;
/// Most request data with the backend at once (bytes).
pub const MAX_INFLIGHT_BYTES: usize = 16 << 20;
/// Most requests with the backend at once.
pub const MAX_INFLIGHT_REQUESTS: usize = 64;

static GUEST_ERRORS: fabric::ratelimit::RateLimiter = fabric::ratelimit::RateLimiter::new(2);
static IO_ERRORS: fabric::ratelimit::RateLimiter = fabric::ratelimit::RateLimiter::new(1);

/// The queue while the driver has the device running.
struct Active {
    queue: Queue,
    mem: GuestMemoryMmap,
    irq: Arc<VirtioInterrupt>,
}

/// A request with the backend.
struct InFlight {
    req: Request,
    /// The activation it belongs to: a completion after a reset is dropped.
    generation: u64,
}

/// The virtio-blk device.
pub struct VirtioBlk {
    backend: Box<dyn BlockBackend>,
    queue_evt: [EventFd; 1],
    active: Option<Active>,
    generation: u64,
    waiting: VecDeque<Request>,
    in_flight: HashMap<u64, InFlight>,
    in_flight_bytes: usize,
    next_tag: u64,
    done: Vec<(u64, BlockOp)>,
    /// Requests completed with an error status, and malformed chains.
    pub errors: Arc<AtomicU64>,
    /// The most bytes ever with the backend at once (for tests of the bound).
    pub peak_in_flight_bytes: usize,
}

/// Device setup failures.
#[derive(Debug, thiserror::Error)]
#[error("cannot create a virtio-blk queue eventfd")]
pub struct BlkError(#[source] std::io::Error);

impl VirtioBlk {
    /// A device over `backend`.
    pub fn new(backend: Box<dyn BlockBackend>) -> Result<Self, BlkError> {
        Ok(VirtioBlk {
            backend,
            queue_evt: [EventFd::new(libc::EFD_NONBLOCK).map_err(BlkError)?],
            active: None,
            generation: 0,
            waiting: VecDeque::new(),
            in_flight: HashMap::new(),
            in_flight_bytes: 0,
            next_tag: 0,
            done: Vec::new(),
            errors: Arc::default(),
            peak_in_flight_bytes: 0,
        })
    }

    fn disk(&self) -> Disk {
        Disk {
            size: self.backend.size(),
            read_only: self.backend.read_only(),
        }
    }

    /// Takes every available request: answers the ones that need no backend,
    /// queues the rest for [`VirtioBlk::submit_waiting`]. True if any was
    /// completed.
    fn take_requests(&mut self) -> bool {
        let disk = self.disk();
        let Some(a) = &mut self.active else {
            return false;
        };
        let mut used = false;
        let mem = a.mem.clone();
        while let Some(chain) = a.queue.pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            match request::parse(head, chain, &mem, disk) {
                Ok((req, why)) => {
                    if let Some(why) = why {
                        fabric::warn_limited!(GUEST_ERRORS, "refusing a virtio-blk request: {why}");
                    }
                    match req.kind {
                        Kind::Done(_) | Kind::GetId => {
                            let len = answer(&mem, &req, &self.backend.name(), &self.errors);
                            add_used(&mut a.queue, &mem, head, len);
                            used = true;
                        }
                        _ => self.waiting.push_back(req),
                    }
                }
                Err(why) => {
                    fabric::warn_limited!(
                        GUEST_ERRORS,
                        "dropping a malformed virtio-blk request: {why}"
                    );
                    self.errors.fetch_add(1, Relaxed);
                    add_used(&mut a.queue, &mem, head, 0);
                    used = true;
                }
            }
        }
        used
    }

    /// Hands waiting requests to the backend while the in-flight bounds allow.
    fn submit_waiting(&mut self) {
        let Some(a) = &self.active else { return };
        let mem = a.mem.clone();
        while let Some(r) = self.waiting.front() {
            let busy = !self.in_flight.is_empty();
            if busy
                && (self.in_flight_bytes + r.len > MAX_INFLIGHT_BYTES
                    || self.in_flight.len() >= MAX_INFLIGHT_REQUESTS)
            {
                break;
            }
            let req = self.waiting.pop_front().expect("a front element");
            let op = match req.kind {
                Kind::Read => BlockOp::new(OpKind::Read, req.offset, vec![0; req.len]),
                Kind::Write => {
                    let mut buf = vec![0; req.len];
                    if request::read_regions(&mem, &req.data, &mut buf) < req.len {
                        fabric::warn_limited!(
                            GUEST_ERRORS,
                            "cannot read a virtio-blk write's data from guest memory"
                        );
                    }
                    BlockOp::new(OpKind::Write, req.offset, buf)
                }
                _ => BlockOp::new(OpKind::Flush, 0, Vec::new()),
            };
            let tag = self.next_tag;
            self.next_tag += 1;
            self.in_flight_bytes += req.len;
            self.peak_in_flight_bytes = self.peak_in_flight_bytes.max(self.in_flight_bytes);
            self.in_flight.insert(
                tag,
                InFlight {
                    req,
                    generation: self.generation,
                },
            );
            self.backend.submit(tag, op);
        }
    }

    /// Completes the requests the backend finished; true if any was completed.
    fn complete(&mut self) -> bool {
        let mut done = std::mem::take(&mut self.done);
        self.backend.completions(&mut done);
        let mut used = false;
        for (tag, op) in done.drain(..) {
            let Some(f) = self.in_flight.remove(&tag) else {
                continue;
            };
            self.in_flight_bytes -= f.req.len;
            let Some(a) = &mut self.active else { continue };
            if f.generation != self.generation {
                continue;
            }
            let status = match &op.result {
                Ok(()) if op.kind == OpKind::Read => {
                    if request::write_regions(&a.mem, &f.req.data, &op.buf) {
                        S_OK
                    } else {
                        S_IOERR
                    }
                }
                Ok(()) => S_OK,
                Err(e) => {
                    fabric::warn_limited!(
                        IO_ERRORS,
                        "disk {}: {:?} at {} ({} bytes) failed: {e}",
                        self.backend.name(),
                        op.kind,
                        op.offset,
                        f.req.len
                    );
                    S_IOERR
                }
            };
            if status != S_OK {
                self.errors.fetch_add(1, Relaxed);
            }
            if a.mem.write_slice(&[status], f.req.status).is_err() {
                fabric::warn_limited!(GUEST_ERRORS, "cannot write a virtio-blk status byte");
            }
            let len = if f.req.kind == Kind::Read && status == S_OK {
                f.req.len as u32 + 1
            } else {
                1
            };
            add_used(&mut a.queue, &a.mem, f.req.head, len);
            used = true;
        }
        self.done = done;
        used
    }

    /// Serves the queue: new requests, completions, and the waiting requests
    /// they make room for; interrupts the driver if anything was used.
    fn serve(&mut self) {
        let mut used = self.take_requests();
        loop {
            self.submit_waiting();
            let more = self.complete();
            used |= more;
            if !more {
                break;
            }
        }
        if used
            && let Some(a) = &mut self.active
            && a.queue.needs_notification(&a.mem).unwrap_or(true)
        {
            a.irq.queue_used(0);
        }
    }
}

/// Answers a request that needs no backend (refused, or GET_ID); returns the
/// used length.
fn answer(mem: &GuestMemoryMmap, req: &Request, name: &str, errors: &AtomicU64) -> u32 {
    let (mut status, mut len) = match req.kind {
        Kind::Done(s) => (s, 0),
        _ => (S_OK, 0),
    };
    if req.kind == Kind::GetId {
        let mut id = [0u8; ID_BYTES];
        let b = name.as_bytes();
        let n = b.len().min(ID_BYTES);
        id[..n].copy_from_slice(&b[b.len() - n..]);
        if request::write_regions(mem, &req.data, &id[..req.len]) {
            len = req.len as u32;
        } else {
            status = S_IOERR;
        }
    }
    if status != S_OK {
        errors.fetch_add(1, Relaxed);
    }
    if mem.write_slice(&[status], req.status).is_err() {
        fabric::warn_limited!(GUEST_ERRORS, "cannot write a virtio-blk status byte");
    }
    len + 1
}

fn add_used(queue: &mut Queue, mem: &GuestMemoryMmap, head: u16, len: u32) {
    if let Err(e) = queue.add_used(mem, head, len) {
        fabric::warn_limited!(GUEST_ERRORS, "cannot complete a virtio-blk request: {e}");
    }
}

impl VirtioDevice for VirtioBlk {
    fn device_type(&self) -> u16 {
        2
    }

    fn pci_class(&self) -> u32 {
        0x01_80_00 // mass storage, other
    }

    fn features(&self) -> u64 {
        let ro = if self.backend.read_only() { F_RO } else { 0 };
        F_VERSION_1 | F_FLUSH | ro
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // capacity (sectors) at 0; everything else zero.
        let mut cfg = [0u8; 0x40];
        cfg[0..8].copy_from_slice(&(self.backend.size() / request::SECTOR_BYTES).to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evt
    }

    fn activate(
        &mut self,
        mut queues: Vec<Queue>,
        mem: GuestMemoryMmap,
        irq: Arc<VirtioInterrupt>,
    ) {
        if let Some(queue) = queues.drain(..).next() {
            self.active = Some(Active { queue, mem, irq });
            // Requests made available before activation.
            self.serve();
        }
    }

    fn reset(&mut self) {
        self.active = None;
        self.waiting.clear();
        // Requests still with the backend complete into nothing.
        self.generation += 1;
    }
}

impl MutEventSubscriber for VirtioBlk {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == std::os::fd::AsRawFd::as_raw_fd(&self.queue_evt[0]) {
            let _ = self.queue_evt[0].read();
        }
        self.serve();
    }

    fn init(&mut self, ops: &mut EventOps) {
        let mut fds = vec![std::os::fd::AsRawFd::as_raw_fd(&self.queue_evt[0])];
        fds.extend(self.backend.completion_fd());
        for fd in fds {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("disk {}: cannot watch an eventfd: {e}", self.backend.name());
            }
        }
    }
}

#[cfg(test)]
mod tests;
