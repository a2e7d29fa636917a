//! Request slots and the reader role of the pipelined client.
//!
//! A slot holds one request in flight: its expected reply, and once the reply has
//! arrived, its contents. The request id is the slot index (low 32 bits) and the
//! slot's generation (high 32 bits), so a late or forged reply for a recycled slot
//! is detected.
//!
//! The reader role: whoever holds `reader` reads the socket and delivers replies.
//! A waiter first registers in `parked`, then tries to take `reader`; if it fails it
//! sleeps on its slot until its reply is delivered or it is *kicked*. A reader that
//! leaves (its own reply has come) kicks one parked waiter whose reply is still
//! outstanding. Registering before trying the lock closes the race in which the
//! reader leaves between a waiter's failed attempt and its sleep.

use crate::link_model::Shaper;
use crate::proto::{
    self, ErrorCode, FrameHeader, MAX_FRAME, Message, Opcode, PAGE_SIZE, StatsReply,
};
use crate::transport::{Link, TransportError};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use super::Presence;

/// Identifies a request in flight.
pub(crate) struct Ticket {
    index: u32,
    generation: u32,
}

impl Ticket {
    pub(crate) fn request_id(&self) -> u64 {
        (u64::from(self.generation) << 32) | u64::from(self.index)
    }
}

/// What a reply carried, apart from page data.
#[derive(Debug, Default)]
pub(crate) enum Reply {
    /// Nothing yet (or already taken).
    #[default]
    None,
    /// Pages: see [`Completed::copy_pages`].
    Pages,
    /// A count (pages written or freed) or a pong's nonce.
    Count(u64),
    /// Statistics.
    Stats(StatsReply),
    /// The node's queue pair and its region chunk size (`RdmaConnectOk`).
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    RdmaConnected(crate::proto::RdmaEndpoint, u32),
    /// A region chunk's place (`MapRegionOk`): chunk, address, length, key.
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    Region(u64, u64, u64, u32),
    /// The node's error reply.
    Error(ErrorCode, String),
}

impl Reply {
    pub(crate) fn take(&mut self) -> Reply {
        std::mem::take(self)
    }
}

/// A delivered reply.
#[derive(Debug, Default)]
pub(crate) struct Completed {
    pub(crate) reply: Reply,
    /// When the link model lets the caller see the reply.
    pub(crate) visible_at: Option<Instant>,
    present: u64,
    count: usize,
    /// The present pages, back to back, as they came on the wire.
    data: Vec<u8>,
    send_delay: Duration,
}

impl Completed {
    /// Copies the pages into `out` in request order, zero-filling absent ones.
    pub(crate) fn copy_pages(&mut self, out: &mut [u8]) -> Presence {
        let mut src = self.data.chunks_exact(PAGE_SIZE);
        for (i, dst) in out.chunks_exact_mut(PAGE_SIZE).enumerate().take(self.count) {
            if self.present & (1 << i) != 0 {
                dst.copy_from_slice(src.next().expect("validated on receipt"));
            } else {
                dst.fill(0);
            }
        }
        Presence(self.present)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Free,
    Waiting,
    Done,
}

struct SlotState {
    generation: u32,
    phase: Phase,
    expect: Opcode,
    kicked: bool,
    /// A thread sleeps on the slot's condvar. Notifying costs a system call even
    /// when nobody waits, so deliveries notify only when this is set.
    sleeping: bool,
    /// Reply bytes counted in `unreceived` for this request.
    reply_bytes: usize,
    /// A thread is inside `wait` for this slot (only such a thread can act on a kick).
    in_wait: bool,
    completed: Completed,
}

struct Slot {
    st: Mutex<SlotState>,
    cv: Condvar,
}

struct RecvBuf {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

/// Reply bytes to expect for a request (an upper bound).
fn reply_bytes(expect: Opcode, count: usize) -> usize {
    match expect {
        Opcode::ReadPagesOk => proto::HEADER_LEN + 8 + count * (1 + PAGE_SIZE),
        _ => proto::HEADER_LEN + 64,
    }
}

/// The guard a finished wait returns: the slot, with its reply delivered.
pub(crate) struct Delivered<'a>(MutexGuard<'a, SlotState>);

impl std::ops::Deref for Delivered<'_> {
    type Target = Completed;
    fn deref(&self) -> &Completed {
        &self.0.completed
    }
}

impl std::ops::DerefMut for Delivered<'_> {
    fn deref_mut(&mut self) -> &mut Completed {
        &mut self.0.completed
    }
}

pub(crate) struct SlotTable {
    slots: Box<[Slot]>,
    /// Free slot indices, and how many threads wait for one.
    free: Mutex<(Vec<u32>, usize)>,
    free_cv: Condvar,
    failed_flag: AtomicBool,
    failed: Mutex<Option<String>>,
    reader: Mutex<RecvBuf>,
    /// Waiters that may take over the reader role: (slot index, generation).
    parked: Mutex<VecDeque<(u32, u32)>>,
    /// Reply bytes expected for requests whose replies have not been received yet:
    /// bounded so that unread replies never fill the socket buffers (which would
    /// block the node's writes and, with nobody reading, our sends).
    unreceived: AtomicUsize,
}

/// Most reply bytes outstanding on the socket before new requests wait.
const UNRECEIVED_BUDGET: usize = 1 << 20;

impl SlotTable {
    pub(crate) fn new(n: usize) -> Self {
        let slots = (0..n)
            .map(|_| Slot {
                st: Mutex::new(SlotState {
                    generation: 0,
                    phase: Phase::Free,
                    expect: Opcode::Pong,
                    kicked: false,
                    sleeping: false,
                    reply_bytes: 0,
                    in_wait: false,
                    completed: Completed::default(),
                }),
                cv: Condvar::new(),
            })
            .collect();
        SlotTable {
            slots,
            free: Mutex::new(((0..n as u32).rev().collect(), 0)),
            free_cv: Condvar::new(),
            failed_flag: AtomicBool::new(false),
            failed: Mutex::new(None),
            reader: Mutex::new(RecvBuf {
                buf: vec![0u8; 2 * MAX_FRAME].into_boxed_slice(),
                start: 0,
                end: 0,
            }),
            parked: Mutex::new(VecDeque::with_capacity(n)),
            unreceived: AtomicUsize::new(0),
        }
    }

    /// Forgets `bytes` of outstanding replies (saturating: `fail` resets the count).
    fn unreceived_sub(&self, bytes: usize) {
        let _ = self
            .unreceived
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(bytes))
            });
    }

    pub(crate) fn failure(&self) -> Option<String> {
        if !self.failed_flag.load(Ordering::Acquire) {
            return None;
        }
        self.failed.lock().unwrap().clone()
    }

    /// Marks the connection dead and wakes every waiter.
    pub(crate) fn fail(&self, reason: String) {
        {
            let mut f = self.failed.lock().unwrap();
            if f.is_none() {
                *f = Some(reason);
            }
        }
        self.failed_flag.store(true, Ordering::Release);
        self.unreceived.store(0, Ordering::Release);
        for s in self.slots.iter() {
            let _g = s.st.lock().unwrap();
            s.cv.notify_all();
        }
        let _g = self.free.lock().unwrap();
        self.free_cv.notify_all();
    }

    /// Takes a free slot for a request expecting `expect` with `count` pages. If too
    /// many reply bytes are outstanding, first reads replies off the link (taking the
    /// reader role) so the node can keep writing.
    pub(crate) fn acquire(
        &self,
        expect: Opcode,
        count: usize,
        link: &dyn Link,
        shaper: Option<&Shaper>,
    ) -> Result<Ticket, String> {
        let bytes = reply_bytes(expect, count);
        loop {
            if let Some(r) = self.failure() {
                return Err(r);
            }
            let admitted = self
                .unreceived
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                    (u == 0 || u + bytes <= UNRECEIVED_BUDGET).then_some(u + bytes)
                });
            if admitted.is_ok() {
                break;
            }
            match self.reader.try_lock() {
                Ok(mut rb) => {
                    if let Err(reason) = self.read_some(&mut rb, link, shaper) {
                        drop(rb);
                        self.fail(reason);
                        link.shutdown();
                    }
                }
                Err(_) => std::thread::sleep(Duration::from_micros(20)),
            }
        }
        let index = {
            let mut free = self.free.lock().unwrap();
            loop {
                if let Some(r) = self.failure() {
                    self.unreceived_sub(bytes);
                    return Err(r);
                }
                if let Some(i) = free.0.pop() {
                    break i;
                }
                free.1 += 1;
                free = self.free_cv.wait(free).unwrap();
                free.1 -= 1;
            }
        };
        let mut st = self.slots[index as usize].st.lock().unwrap();
        st.phase = Phase::Waiting;
        st.reply_bytes = bytes;
        st.expect = expect;
        st.kicked = false;
        let c = &mut st.completed;
        c.reply = Reply::None;
        c.visible_at = None;
        c.present = 0;
        c.count = count;
        c.send_delay = Duration::ZERO;
        Ok(Ticket {
            index,
            generation: st.generation,
        })
    }

    pub(crate) fn set_send_delay(&self, t: &Ticket, d: Duration) {
        self.slots[t.index as usize]
            .st
            .lock()
            .unwrap()
            .completed
            .send_delay = d;
    }

    /// Returns a slot to the free list; its generation moves on.
    pub(crate) fn release(&self, t: Ticket) {
        {
            let mut st = self.slots[t.index as usize].st.lock().unwrap();
            debug_assert_eq!(st.generation, t.generation);
            st.phase = Phase::Free;
            st.generation = st.generation.wrapping_add(1);
        }
        let mut free = self.free.lock().unwrap();
        free.0.push(t.index);
        if free.1 > 0 {
            self.free_cv.notify_one();
        }
    }

    /// Waits until `t`'s reply is delivered, reading the link while nobody else does.
    pub(crate) fn wait(
        &self,
        t: &Ticket,
        link: &dyn Link,
        shaper: Option<&Shaper>,
    ) -> Result<Delivered<'_>, String> {
        let slot = &self.slots[t.index as usize];
        loop {
            {
                let mut st = slot.st.lock().unwrap();
                if st.phase == Phase::Done {
                    st.in_wait = false;
                    return Ok(Delivered(st));
                }
                if let Some(r) = self.failure() {
                    st.in_wait = false;
                    return Err(r);
                }
                st.kicked = false;
                st.in_wait = true;
            }
            self.parked
                .lock()
                .unwrap()
                .push_back((t.index, t.generation));
            match self.reader.try_lock() {
                Ok(mut rb) => {
                    self.unpark(t.index);
                    let res = loop {
                        if slot.st.lock().unwrap().phase == Phase::Done {
                            break Ok(());
                        }
                        if let Err(e) = self.read_some(&mut rb, link, shaper) {
                            break Err(e);
                        }
                    };
                    drop(rb);
                    if let Err(reason) = res {
                        log::warn!("node {}: {reason}", link.peer());
                        self.fail(reason);
                        link.shutdown();
                    }
                    self.kick_one();
                }
                Err(TryLockError::WouldBlock) => {
                    let mut st = slot.st.lock().unwrap();
                    while st.phase != Phase::Done
                        && !st.kicked
                        && !self.failed_flag.load(Ordering::Acquire)
                    {
                        st.sleeping = true;
                        st = slot.cv.wait(st).unwrap();
                        st.sleeping = false;
                    }
                    drop(st);
                    self.unpark(t.index);
                }
                Err(TryLockError::Poisoned(_)) => {
                    self.unpark(t.index);
                    self.fail("a reader thread panicked".into());
                }
            }
        }
    }

    fn unpark(&self, index: u32) {
        let mut p = self.parked.lock().unwrap();
        if let Some(pos) = p.iter().position(|&(i, _)| i == index) {
            p.remove(pos);
        }
    }

    /// Hands the reader role to one parked waiter whose reply is still outstanding.
    fn kick_one(&self) {
        loop {
            let Some((i, generation)) = self.parked.lock().unwrap().pop_front() else {
                return;
            };
            let slot = &self.slots[i as usize];
            let mut st = slot.st.lock().unwrap();
            // Only the very request that parked, with its thread still in `wait`, can
            // take the role; a recycled slot's new request may have no waiter.
            if st.phase == Phase::Waiting && st.generation == generation && st.in_wait {
                st.kicked = true;
                if st.sleeping {
                    slot.cv.notify_all();
                }
                return;
            }
        }
    }

    /// One `recv` from the link, then delivery of every complete frame it completed.
    fn read_some(
        &self,
        rb: &mut RecvBuf,
        link: &dyn Link,
        shaper: Option<&Shaper>,
    ) -> Result<(), String> {
        if rb.start > 0 && rb.buf.len() - rb.end < MAX_FRAME {
            rb.buf.copy_within(rb.start..rb.end, 0);
            rb.end -= rb.start;
            rb.start = 0;
        }
        let end = rb.end;
        let n = match link.recv(&mut rb.buf[end..]) {
            Ok(0) => return Err("the node closed the connection".into()),
            Ok(n) => n,
            Err(TransportError::TimedOut { after, .. }) => {
                return Err(format!("no reply within {after:?}"));
            }
            Err(e) => return Err(super::error_chain(&e)),
        };
        rb.end += n;
        loop {
            match proto::decode_frame(&rb.buf[rb.start..rb.end]) {
                Ok(Some((h, msg, used))) => {
                    self.deliver(&h, msg, used, shaper)?;
                    rb.start += used;
                }
                Ok(None) => break,
                Err(e) => return Err(format!("malformed reply: {e}")),
            }
        }
        if rb.start == rb.end {
            rb.start = 0;
            rb.end = 0;
        }
        Ok(())
    }

    fn deliver(
        &self,
        h: &FrameHeader,
        msg: Message<'_>,
        frame_len: usize,
        shaper: Option<&Shaper>,
    ) -> Result<(), String> {
        let index = (h.request_id & 0xffff_ffff) as usize;
        let generation = (h.request_id >> 32) as u32;
        let unknown = || {
            format!(
                "reply {:?} for unknown request id {:#x}",
                h.opcode, h.request_id
            )
        };
        let slot = self.slots.get(index).ok_or_else(unknown)?;
        let mut st = slot.st.lock().unwrap();
        if st.phase != Phase::Waiting || st.generation != generation {
            return Err(unknown());
        }
        let expect = st.expect;
        self.unreceived_sub(st.reply_bytes);
        st.reply_bytes = 0;
        let c = &mut st.completed;
        c.reply = match msg {
            Message::Error { code, message } => Reply::Error(code, message.to_string()),
            m if m.opcode() != expect => {
                return Err(format!(
                    "got {:?} in reply to a request expecting {expect:?}",
                    m.opcode()
                ));
            }
            Message::ReadPagesOk { present, data } => {
                if present.len() != c.count {
                    return Err(format!(
                        "read reply has {} pages, asked for {}",
                        present.len(),
                        c.count
                    ));
                }
                c.present = present
                    .iter()
                    .enumerate()
                    .fold(0u64, |m, (i, &p)| m | (u64::from(p) << i));
                c.data.clear();
                c.data.extend_from_slice(data);
                Reply::Pages
            }
            Message::WritePagesOk { count } => {
                if count as usize != c.count {
                    return Err(format!("node stored {count} pages, sent {}", c.count));
                }
                Reply::Count(count.into())
            }
            Message::FreePagesOk { count } => Reply::Count(count.into()),
            Message::StatsOk(s) => Reply::Stats(s),
            Message::Pong { nonce } => Reply::Count(nonce),
            Message::RdmaConnectOk {
                endpoint,
                chunk_pages,
            } => Reply::RdmaConnected(endpoint, chunk_pages),
            Message::MapRegionOk {
                chunk,
                addr,
                len,
                rkey,
            } => Reply::Region(chunk, addr, len, rkey),
            m => return Err(format!("unexpected {:?} from the node", m.opcode())),
        };
        c.visible_at = shaper.map(|s| s.on_recv(frame_len, c.send_delay));
        st.phase = Phase::Done;
        if st.sleeping {
            slot.cv.notify_all();
        }
        Ok(())
    }
}
