//! The transmission phase of one connection.
//!
//! One reader thread per connection reads requests into a buffer (one `recv` often
//! brings many) and handles each:
//!
//! - **Fast path, on the reader thread:** reads of up to [`INLINE_MAX`] bytes whose
//!   data is in the page cache (`preadv2(RWF_NOWAIT)` succeeds) and writes of up to
//!   [`INLINE_MAX`] bytes without FUA (`pwrite` straight from the receive buffer).
//!   Their replies are batched and sent with one `write` once the receive buffer
//!   holds no further complete request, so 16 pipelined 4 KiB reads cost about one
//!   `recv` and one `send`.
//! - **Everything else goes to the node's worker [`Pool`]:** flushes, FUA writes,
//!   trims, write-zeroes, uncached or large reads and large writes. Workers reply
//!   directly, out of order.
//!
//! Requests in the pool are bounded per connection (count and buffered bytes); the
//! reader stops reading while the bound is reached, which pushes back on the client
//! through TCP. Replies are serialised by the writer lock, one reply (or one batch)
//! per `writev`.
//!
//! Ordering: NBD lets a server complete requests in any order. A `FLUSH` runs
//! `fdatasync` after it was received, so it covers every write that had completed
//! (been replied to) before; fast-path writes complete before the next request is
//! even parsed.

use super::pool::{Job, JobKind, Pool};
use super::{NodeStats, PEER_ERRORS};
use crate::volume::Volume;
use fabric::warn_limited;
use nbd_proto::stream::Stream;
use nbd_proto::wire::{
    Cmd, Errno, MAX_PAYLOAD, REQUEST_LEN, Request, SIMPLE_REPLY_LEN, SimpleReply, cmd_flags,
};
use nbd_proto::write_all_vectored;
use std::io::{self, IoSlice, Read};
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};

/// Largest read or write served on the reader thread.
pub const INLINE_MAX: usize = 64 << 10;
/// Receive buffer: room for an inline write with its header, several times over.
const INBUF: usize = 256 << 10;
/// Batched replies are sent once this many bytes are pending.
const OUT_FLUSH_AT: usize = 256 << 10;
/// Oversized write payloads up to this size are read and discarded (the connection
/// goes on); larger ones end the connection after the error reply.
const SKIP_LIMIT: u64 = 2 * MAX_PAYLOAD as u64;
/// Recycled payload buffers kept per connection, and the largest kept.
const FREE_BUFS: usize = 16;
const FREE_BUF_MAX: usize = 1 << 20;

/// Per-connection limits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnLimits {
    /// Use the fast path.
    pub inline_io: bool,
    /// Requests in the pool at once.
    pub max_jobs: usize,
    /// Payload bytes held by requests in the pool at once.
    pub max_job_bytes: usize,
}

#[derive(Default)]
struct InFlight {
    jobs: usize,
    bytes: usize,
    reader_waiting: bool,
}

/// What the reader thread and the workers share about one connection.
pub(crate) struct ConnShared {
    /// The export.
    pub volume: Arc<Volume>,
    /// The client.
    pub peer: SocketAddr,
    /// Node-wide counters.
    pub stats: Arc<NodeStats>,
    writer: Mutex<Stream>,
    broken: AtomicBool,
    in_flight: Mutex<InFlight>,
    room: Condvar,
    bufs: Mutex<Vec<Vec<u8>>>,
}

impl ConnShared {
    /// Sends a simple reply (header plus `data`) with one `writev`. On failure the
    /// connection is shut down (the reader then stops) and `false` returned.
    pub fn send_reply(&self, handle: u64, error: u32, data: &[u8]) -> bool {
        let hdr = SimpleReply { error, handle }.encode();
        self.send(&mut [IoSlice::new(&hdr), IoSlice::new(data)])
    }

    fn send(&self, bufs: &mut [IoSlice<'_>]) -> bool {
        let mut w = self.writer.lock().unwrap();
        if self.broken.load(Relaxed) {
            return false;
        }
        match write_all_vectored(&mut *w, bufs) {
            Ok(()) => true,
            Err(e) => {
                self.broken.store(true, Relaxed);
                log::debug!("{}: cannot send a reply: {e}; closing", self.peer);
                let _ = w.shutdown(Shutdown::Both);
                false
            }
        }
    }

    /// A buffer of at least `len` bytes, recycled when possible (not zeroed: every
    /// user overwrites the bytes it uses).
    pub fn take_buf(&self, len: usize) -> Vec<u8> {
        let mut b = self.bufs.lock().unwrap().pop().unwrap_or_default();
        if b.len() < len {
            b.resize(len, 0);
        }
        b
    }

    /// Returns a buffer for reuse.
    pub fn give_buf(&self, b: Vec<u8>) {
        if b.capacity() <= FREE_BUF_MAX {
            let mut bufs = self.bufs.lock().unwrap();
            if bufs.len() < FREE_BUFS {
                bufs.push(b);
            }
        }
    }

    /// Called by a worker when a job of `bytes` payload has been answered.
    pub fn job_done(&self, bytes: usize) {
        let mut f = self.in_flight.lock().unwrap();
        f.jobs -= 1;
        f.bytes -= bytes;
        if f.reader_waiting {
            self.room.notify_one();
        }
    }
}

/// Replies produced on the reader thread, sent in one batch.
struct OutBuf {
    buf: Vec<u8>,
    len: usize,
}

impl OutBuf {
    /// The next `n` bytes of the batch (grown without zeroing bytes that the
    /// buffer already had).
    fn reserve(&mut self, n: usize) -> &mut [u8] {
        if self.buf.len() < self.len + n {
            self.buf.resize(self.len + n, 0);
        }
        let s = &mut self.buf[self.len..self.len + n];
        self.len += n;
        s
    }

    fn reply(&mut self, handle: u64, error: u32) {
        self.reserve(SIMPLE_REPLY_LEN)
            .copy_from_slice(&SimpleReply { error, handle }.encode());
    }
}

/// Why the request loop ended.
enum End {
    /// The client sent `NBD_CMD_DISC` or closed its side.
    Client,
    /// The connection broke or the client broke the protocol (already logged).
    Failed,
}

/// Serves the transmission phase on `stream` until the client disconnects; returns
/// once every request it sent has been answered (or the connection broke).
pub(crate) fn serve(
    stream: Stream,
    peer: SocketAddr,
    volume: Arc<Volume>,
    stats: Arc<NodeStats>,
    pool: &Pool,
    limits: ConnLimits,
) -> io::Result<()> {
    let shared = Arc::new(ConnShared {
        volume,
        peer,
        stats,
        writer: Mutex::new(stream.try_clone()?),
        broken: AtomicBool::new(false),
        in_flight: Mutex::new(InFlight::default()),
        room: Condvar::new(),
        bufs: Mutex::new(Vec::new()),
    });
    let mut t = Transmission {
        stream,
        shared,
        pool,
        limits,
        inbuf: vec![0u8; INBUF],
        start: 0,
        end: 0,
        out: OutBuf {
            buf: Vec::with_capacity(OUT_FLUSH_AT + INLINE_MAX + 64),
            len: 0,
        },
    };
    let end = t.run();
    t.flush_out();
    // Every request received is answered before the connection closes.
    {
        let mut f = t.shared.in_flight.lock().unwrap();
        while f.jobs > 0 {
            f.reader_waiting = true;
            f = t.shared.room.wait(f).unwrap();
        }
    }
    if let End::Client = end {
        log::debug!("{peer}: disconnected");
    }
    let _ = t.stream.shutdown(Shutdown::Both);
    Ok(())
}

struct Transmission<'a> {
    stream: Stream,
    shared: Arc<ConnShared>,
    pool: &'a Pool,
    limits: ConnLimits,
    inbuf: Vec<u8>,
    start: usize,
    end: usize,
    out: OutBuf,
}

impl Transmission<'_> {
    fn run(&mut self) -> End {
        loop {
            match self.fill(REQUEST_LEN) {
                Ok(true) => {}
                Ok(false) => return End::Client,
                Err(e) => {
                    log::debug!("{}: receive failed: {e}", self.shared.peer);
                    return End::Failed;
                }
            }
            let req = match Request::decode(&self.inbuf[self.start..self.end]) {
                Ok(r) => r,
                Err(e) => {
                    self.shared.stats.protocol_errors.fetch_add(1, Relaxed);
                    warn_limited!(
                        PEER_ERRORS,
                        "{}: {e}; closing the connection",
                        self.shared.peer
                    );
                    return End::Failed;
                }
            };
            self.start += REQUEST_LEN;
            self.shared.stats.requests.fetch_add(1, Relaxed);
            match self.handle(req) {
                Ok(None) => {}
                Ok(Some(end)) => return end,
                Err(e) => {
                    log::debug!("{}: {e}", self.shared.peer);
                    return End::Failed;
                }
            }
            if self.out.len >= OUT_FLUSH_AT && !self.flush_out() {
                return End::Failed;
            }
        }
    }

    /// Handles one request whose header has been consumed. `Some` ends the loop.
    fn handle(&mut self, req: Request) -> io::Result<Option<End>> {
        let fua = req.flags & cmd_flags::FUA != 0;
        let allowed = match req.cmd {
            Cmd::WRITE_ZEROES => cmd_flags::FUA | cmd_flags::NO_HOLE,
            _ => cmd_flags::FUA,
        };
        let bad_flags = req.flags & !allowed != 0;
        let len = req.len as u64;
        let ro = self.shared.volume.read_only();
        let in_range = self.shared.volume.in_range(req.offset, len);
        match req.cmd {
            Cmd::DISC => return Ok(Some(End::Client)),
            Cmd::READ => {
                if req.len > MAX_PAYLOAD {
                    self.refuse(&req, Errno::EINVAL, "read larger than 32 MiB");
                } else if bad_flags {
                    self.refuse(&req, Errno::EINVAL, "unsupported flags");
                } else if !in_range {
                    self.refuse(&req, Errno::EINVAL, "read beyond the end of the export");
                } else {
                    self.read(&req);
                }
            }
            Cmd::WRITE => {
                if req.len > MAX_PAYLOAD {
                    self.refuse(&req, Errno::EINVAL, "write larger than 32 MiB");
                    if len > SKIP_LIMIT {
                        self.flush_out();
                        warn_limited!(
                            PEER_ERRORS,
                            "{}: write payload of {len} bytes is too large to skip; closing",
                            self.shared.peer
                        );
                        return Ok(Some(End::Failed));
                    }
                    return self.skip(req.len as usize);
                }
                let why = if bad_flags {
                    Some((Errno::EINVAL, "unsupported flags"))
                } else if ro {
                    Some((Errno::EPERM, "write to a read-only export"))
                } else if !in_range {
                    Some((Errno::ENOSPC, "write beyond the end of the export"))
                } else {
                    None
                };
                if let Some((errno, what)) = why {
                    self.refuse(&req, errno, what);
                    return self.skip(req.len as usize);
                }
                return self.write(&req, fua);
            }
            Cmd::FLUSH => {
                if bad_flags || req.offset != 0 || req.len != 0 {
                    self.refuse(&req, Errno::EINVAL, "flush with flags, offset or length");
                } else if ro {
                    // Nothing was written through this node: nothing to sync.
                    self.out.reply(req.handle, 0);
                } else {
                    self.dispatch(req.handle, JobKind::Flush)?;
                }
            }
            Cmd::TRIM | Cmd::WRITE_ZEROES => {
                if bad_flags {
                    self.refuse(&req, Errno::EINVAL, "unsupported flags");
                } else if ro {
                    self.refuse(&req, Errno::EPERM, "trim or zero on a read-only export");
                } else if !in_range {
                    self.refuse(&req, Errno::EINVAL, "range beyond the end of the export");
                } else if len == 0 {
                    self.out.reply(req.handle, 0);
                } else {
                    let kind = if req.cmd == Cmd::TRIM {
                        JobKind::Trim {
                            offset: req.offset,
                            len,
                            fua,
                        }
                    } else {
                        JobKind::WriteZeroes {
                            offset: req.offset,
                            len,
                            no_hole: req.flags & cmd_flags::NO_HOLE != 0,
                            fua,
                        }
                    };
                    self.dispatch(req.handle, kind)?;
                }
            }
            _ => self.refuse(&req, Errno::EINVAL, "unsupported command"),
        }
        Ok(None)
    }

    /// Answers a request with an error (batched like other fast-path replies).
    fn refuse(&mut self, req: &Request, errno: Errno, why: &str) {
        self.shared.stats.errors.fetch_add(1, Relaxed);
        warn_limited!(
            PEER_ERRORS,
            "{}: {} offset {} length {} refused with {errno}: {why}",
            self.shared.peer,
            req.cmd,
            req.offset,
            req.len
        );
        self.out.reply(req.handle, errno.0);
    }

    fn read(&mut self, req: &Request) {
        let len = req.len as usize;
        if len == 0 {
            self.out.reply(req.handle, 0);
            return;
        }
        if self.limits.inline_io && len <= INLINE_MAX {
            let mark = self.out.len;
            self.out.reply(req.handle, 0);
            let data = self.out.reserve(len);
            if self.shared.volume.try_read_cached(data, req.offset) {
                self.shared.stats.read_bytes.fetch_add(len as u64, Relaxed);
                self.shared.stats.fast_path.fetch_add(1, Relaxed);
                return;
            }
            self.out.len = mark;
        }
        let kind = JobKind::Read {
            offset: req.offset,
            len,
            buf: Vec::new(),
        };
        // The buffer is taken once there is room, so the bound holds memory too.
        let _ = self.dispatch_with_buf(req.handle, kind, len, |_, _| Ok(()));
    }

    fn write(&mut self, req: &Request, fua: bool) -> io::Result<Option<End>> {
        let len = req.len as usize;
        if len == 0 {
            self.out.reply(req.handle, 0);
            return Ok(None);
        }
        if self.limits.inline_io && !fua && len <= INLINE_MAX {
            if !self.fill(len)? {
                return Ok(Some(End::Client));
            }
            let data = &self.inbuf[self.start..self.start + len];
            let r = self.shared.volume.write_at(data, req.offset, false);
            self.start += len;
            match r {
                Ok(()) => {
                    self.shared
                        .stats
                        .written_bytes
                        .fetch_add(len as u64, Relaxed);
                    self.shared.stats.fast_path.fetch_add(1, Relaxed);
                    self.out.reply(req.handle, 0);
                }
                Err(e) => {
                    self.shared.stats.errors.fetch_add(1, Relaxed);
                    warn_limited!(
                        super::IO_ERRORS,
                        "volume {:?}: write failed: {e}",
                        self.shared.volume.name()
                    );
                    self.out.reply(req.handle, Errno::from_io(&e).0);
                }
            }
            return Ok(None);
        }
        let kind = JobKind::Write {
            offset: req.offset,
            len,
            buf: Vec::new(),
            fua,
        };
        let complete = self.dispatch_with_buf(req.handle, kind, len, |t, buf| {
            // Payload: what is buffered, then the rest straight from the socket.
            let have = (t.end - t.start).min(len);
            buf[..have].copy_from_slice(&t.inbuf[t.start..t.start + have]);
            t.start += have;
            if have < len {
                t.flush_out();
                t.stream.read_exact(&mut buf[have..len])?;
            }
            Ok(())
        });
        match complete {
            Ok(()) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(Some(End::Client)),
            Err(e) => Err(e),
        }
    }

    /// Queues a job without a payload buffer.
    fn dispatch(&mut self, handle: u64, kind: JobKind) -> io::Result<()> {
        self.dispatch_with_buf(handle, kind, 0, |_, _| Ok(()))
    }

    /// Waits for room in the connection's bound, gives `kind` a buffer of `len`
    /// bytes (filled by `fill`), and queues it. If `fill` fails the job is dropped.
    fn dispatch_with_buf(
        &mut self,
        handle: u64,
        mut kind: JobKind,
        len: usize,
        fill: impl FnOnce(&mut Self, &mut [u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        self.wait_for_room(len);
        let buf = match &mut kind {
            JobKind::Read { buf, .. } | JobKind::Write { buf, .. } => Some(buf),
            _ => None,
        };
        if let Some(buf) = buf {
            *buf = self.shared.take_buf(len);
            if let Err(e) = fill(self, &mut buf[..len]) {
                self.shared.job_done(len);
                return Err(e);
            }
        }
        self.pool.submit(Job {
            conn: self.shared.clone(),
            handle,
            kind,
        });
        Ok(())
    }

    /// Blocks while the connection has too much in the pool; then counts one more
    /// job of `bytes`.
    fn wait_for_room(&mut self, bytes: usize) {
        let limits = self.limits;
        let fits = |f: &InFlight| {
            f.jobs == 0 || (f.jobs < limits.max_jobs && f.bytes + bytes <= limits.max_job_bytes)
        };
        let mut f = self.shared.in_flight.lock().unwrap();
        if !fits(&f) {
            drop(f);
            self.flush_out();
            f = self.shared.in_flight.lock().unwrap();
            while !fits(&f) {
                f.reader_waiting = true;
                f = self.shared.room.wait(f).unwrap();
            }
            f.reader_waiting = false;
        }
        f.jobs += 1;
        f.bytes += bytes;
    }

    /// Sends the batched replies. `false` if the connection broke.
    fn flush_out(&mut self) -> bool {
        if self.out.len == 0 {
            return true;
        }
        let n = self.out.len;
        self.out.len = 0;
        let ok = self.shared.send(&mut [IoSlice::new(&self.out.buf[..n])]);
        if self.out.buf.len() > 4 * OUT_FLUSH_AT {
            self.out.buf.truncate(OUT_FLUSH_AT);
            self.out.buf.shrink_to(OUT_FLUSH_AT + INLINE_MAX + 64);
        }
        ok
    }

    /// Makes at least `n` (at most the buffer's size) unconsumed bytes available,
    /// sending batched replies before any `recv` that may block. `false` on a clean
    /// end of stream at a request boundary.
    fn fill(&mut self, n: usize) -> io::Result<bool> {
        debug_assert!(n <= self.inbuf.len());
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        while self.end - self.start < n {
            if self.start + n > self.inbuf.len() {
                self.inbuf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if !self.flush_out() {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            match self.stream.read(&mut self.inbuf[self.end..]) {
                Ok(0) if self.start == self.end => return Ok(false),
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(k) => self.end += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Reads and discards a payload of `n` bytes.
    fn skip(&mut self, mut n: usize) -> io::Result<Option<End>> {
        let have = (self.end - self.start).min(n);
        self.start += have;
        n -= have;
        while n > 0 {
            self.flush_out();
            let want = n.min(self.inbuf.len());
            match self.stream.read(&mut self.inbuf[..want]) {
                Ok(0) => return Ok(Some(End::Client)),
                Ok(k) => n -= k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        Ok(None)
    }
}
