//! A pipelined NBD client, for the VMM's virtio-blk backend and for tools.
//!
//! [`NbdClient::connect`] opens a TCP connection, negotiates an export with
//! `NBD_OPT_GO` (falling back to `NBD_OPT_EXPORT_NAME`) and returns a client that
//! any number of threads can share (it is `Clone`). Requests flow like this:
//!
//! 1. [`NbdClient::submit`] checks the request against what the server advertised
//!    (range, block sizes, read-only, supported commands), takes a slot in the table
//!    of requests in flight (blocking while `max_in_flight` are outstanding), and
//!    sends the request header and any write payload with one `writev`.
//! 2. A reader thread reads replies, matches each to its slot by handle, reads a
//!    read's data straight into the request's buffer, and runs the request's
//!    completion callback with the buffer handed back.
//! 3. If the connection fails (the server died, closed it, broke the protocol, or
//!    did not answer within `io_timeout` while requests were outstanding), every
//!    outstanding request completes with the error, which names the server, and
//!    every later submit fails with it at once.
//!
//! The blocking helpers ([`NbdClient::read_at`], [`NbdClient::write_at`],
//! [`NbdClient::flush`], [`NbdClient::trim`], [`NbdClient::write_zeroes`]) are
//! built on `submit`; they split large ranges into requests the server accepts and
//! keep them all in flight at once.
//!
//! ```no_run
//! use nbd_proto::client::{NbdClient, Request};
//! let c = NbdClient::connect("127.0.0.1:7100", "disk0")?;
//! c.write_at(0, &[0xab; 4096], false)?;
//! c.flush()?;
//! let (tx, rx) = std::sync::mpsc::channel();
//! for i in 0..16u64 {
//!     let tx = tx.clone();
//!     c.submit(Request::Read { offset: i * 4096, buf: vec![0; 4096] }, move |done| {
//!         let _ = tx.send(done);
//!     })?;
//! }
//! for done in rx.iter().take(16) {
//!     done.result?;
//! }
//! # Ok::<(), nbd_proto::client::ClientError>(())
//! ```

mod error;
mod handshake;
mod reader;
mod slots;

pub use error::ClientError;

use crate::stream::Stream;
use crate::tls::Relay;
use crate::wire::{Cmd, MAX_PAYLOAD, Request as WireRequest, TransmissionFlags, cmd_flags};
use crate::write_all_vectored;
use slots::{Ready, Slots, State};
use std::io::{self, IoSlice, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Condvar, Mutex, OnceLock, mpsc};
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant};

/// Connection settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Limit for the TCP connect (per address tried).
    pub connect_timeout: Duration,
    /// Limit for each read during the handshake.
    pub handshake_timeout: Duration,
    /// With requests outstanding, the connection is declared dead after this long
    /// without a byte from the server (`None`: wait forever). Also bounds sends.
    pub io_timeout: Option<Duration>,
    /// Requests in flight at once; `submit` blocks beyond that.
    pub max_in_flight: usize,
    /// Upgrade the connection with `NBD_OPT_STARTTLS` before anything else and
    /// check the server's certificate; a server that does not offer TLS is an
    /// error, never a silent fallback to plaintext.
    pub tls: Option<crate::tls::ClientTls>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            io_timeout: Some(Duration::from_secs(60)),
            max_in_flight: 128,
            tls: None,
        }
    }
}

/// What the server told us about the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// The export's name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: TransmissionFlags,
    /// Offsets and lengths must be multiples of this.
    pub min_block: u32,
    /// Requests of this size and alignment are efficient.
    pub preferred_block: u32,
    /// Largest read or write payload.
    pub max_block: u32,
    /// Negotiated with `NBD_OPT_GO` (else `NBD_OPT_EXPORT_NAME`).
    pub used_go: bool,
}

impl ExportInfo {
    /// Whether the export refuses writes.
    pub fn read_only(&self) -> bool {
        self.flags.has(TransmissionFlags::READ_ONLY)
    }
}

/// One request.
#[derive(Debug)]
pub enum Request {
    /// Read `buf.len()` bytes at `offset` into `buf`.
    Read {
        /// Byte offset.
        offset: u64,
        /// Receives the data; handed back in the [`Completion`].
        buf: Vec<u8>,
    },
    /// Write `data` at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// The payload; handed back in the [`Completion`] for reuse.
        data: Vec<u8>,
        /// Complete only once durable (`NBD_CMD_FLAG_FUA`).
        fua: bool,
    },
    /// Make every completed write durable.
    Flush,
    /// Discard a range (a hint; its contents are undefined until rewritten).
    Trim {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u32,
        /// Complete only once durable.
        fua: bool,
    },
    /// Zero a range.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u32,
        /// Keep the range allocated (`NBD_CMD_FLAG_NO_HOLE`).
        no_hole: bool,
        /// Complete only once durable.
        fua: bool,
    },
}

/// Identifies a submitted request (its NBD handle).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Handle(pub u64);

/// A finished request.
#[derive(Debug)]
pub struct Completion {
    /// The request.
    pub handle: Handle,
    /// Its outcome.
    pub result: Result<(), ClientError>,
    /// The request's buffer: a read's data (valid if `result` is `Ok`), a write's
    /// payload, or empty.
    pub buf: Vec<u8>,
}

struct Shared {
    addr: String,
    info: ExportInfo,
    config: ClientConfig,
    writer: Mutex<Stream>,
    slots: Mutex<Slots>,
    room: Condvar,
    reader_id: OnceLock<ThreadId>,
}

struct Inner {
    shared: Arc<Shared>,
    socket: Stream,
    reader: Mutex<Option<JoinHandle<()>>>,
    /// The TLS relay under `socket`, if TLS was negotiated (dropped after the
    /// reader is joined: it sends what is left and joins its threads).
    _relay: Option<Relay>,
}

/// A connection to one export of an NBD server; cheap to clone and share.
#[derive(Clone)]
pub struct NbdClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient")
            .field("addr", &self.inner.shared.addr)
            .field("export", &self.inner.shared.info)
            .finish()
    }
}

impl NbdClient {
    /// Connects to `addr` (`HOST:PORT`) and opens `export` with default settings.
    pub fn connect(addr: &str, export: &str) -> Result<NbdClient, ClientError> {
        Self::connect_with(addr, export, &ClientConfig::default())
    }

    /// Connects to `addr` and opens `export`.
    pub fn connect_with(
        addr: &str,
        export: &str,
        config: &ClientConfig,
    ) -> Result<NbdClient, ClientError> {
        if export.len() > crate::wire::MAX_STRING {
            return Err(ClientError::Invalid {
                addr: addr.into(),
                reason: format!("export name of {} bytes", export.len()),
            });
        }
        let stream = connect_tcp(addr, config.connect_timeout)?;
        let io_err = |e: io::Error| ClientError::Io {
            addr: addr.into(),
            during: "handshake",
            source: Arc::new(e),
        };
        stream.set_nodelay(true).map_err(io_err)?;
        stream
            .set_read_timeout(Some(config.handshake_timeout))
            .map_err(io_err)?;
        stream
            .set_write_timeout(Some(config.handshake_timeout))
            .map_err(io_err)?;
        let (info, stream, relay) =
            handshake::negotiate(stream, addr, export, config.tls.as_ref())?;
        stream.set_read_timeout(config.io_timeout).map_err(io_err)?;
        stream
            .set_write_timeout(config.io_timeout)
            .map_err(io_err)?;
        let shared = Arc::new(Shared {
            addr: addr.into(),
            info,
            config: ClientConfig {
                max_in_flight: config.max_in_flight.max(1),
                ..config.clone()
            },
            writer: Mutex::new(stream.try_clone().map_err(io_err)?),
            slots: Mutex::new(Slots::new()),
            room: Condvar::new(),
            reader_id: OnceLock::new(),
        });
        let reader_stream = stream.try_clone().map_err(io_err)?;
        let s = shared.clone();
        let reader = std::thread::Builder::new()
            .name("nbd-reader".into())
            .spawn(move || reader::reader_loop(&s, reader_stream))
            .map_err(io_err)?;
        let _ = shared.reader_id.set(reader.thread().id());
        Ok(NbdClient {
            inner: Arc::new(Inner {
                shared,
                socket: stream,
                reader: Mutex::new(Some(reader)),
                _relay: relay,
            }),
        })
    }

    /// Whether the connection runs over TLS.
    pub fn is_tls(&self) -> bool {
        self.inner.socket.is_tls()
    }

    /// The export's size, flags and block sizes.
    pub fn info(&self) -> &ExportInfo {
        &self.inner.shared.info
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.shared.info.size
    }

    /// The server's address as given to `connect`.
    pub fn addr(&self) -> &str {
        &self.inner.shared.addr
    }

    /// Requests submitted and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.inner.shared.slots.lock().unwrap().in_flight
    }

    /// Submits `req`; `on_done` runs exactly once with its [`Completion`], on the
    /// client's reader thread (or on this thread if the connection fails while the
    /// request is being sent). It must not block for long: it holds up every other
    /// completion. Blocks while `max_in_flight` requests are outstanding (except on
    /// the reader thread, so a callback may submit).
    ///
    /// `Err` (and no callback) if the request is invalid for this export or the
    /// connection is already dead.
    pub fn submit<F>(&self, req: Request, on_done: F) -> Result<Handle, ClientError>
    where
        F: FnOnce(Completion) + Send + 'static,
    {
        let s = &*self.inner.shared;
        let (header, payload) = s.check(&req)?;
        let mut slots = s.slots.lock().unwrap();
        let on_reader = s.reader_id.get() == Some(&std::thread::current().id());
        loop {
            if let Some(e) = &slots.dead {
                return Err(e.clone());
            }
            if slots.closing {
                return Err(ClientError::Closed {
                    addr: s.addr.clone(),
                });
            }
            if slots.in_flight < s.config.max_in_flight || on_reader {
                break;
            }
            slots.waiters += 1;
            slots = s.room.wait(slots).unwrap();
            slots.waiters -= 1;
        }
        let cb: slots::Callback = Box::new(on_done);
        let cmd = header.cmd;
        let (state, data) = match req {
            Request::Read { buf, .. } => (State::Waiting { cb, cmd, buf }, None),
            Request::Write { data, .. } => (State::Sending { cb }, Some(data)),
            _ => (
                State::Waiting {
                    cb,
                    cmd,
                    buf: Vec::new(),
                },
                None,
            ),
        };
        let handle = slots.insert(state);
        drop(slots);
        let hdr = WireRequest {
            handle: handle.0,
            ..header
        }
        .encode();
        let sent = {
            let mut w = s.writer.lock().unwrap();
            let body = data.as_deref().map_or(&[][..], |d| &d[..payload]);
            write_all_vectored(&mut *w, &mut [IoSlice::new(&hdr), IoSlice::new(body)])
        };
        if let Err(e) = sent {
            s.fail(ClientError::Disconnected {
                addr: s.addr.clone(),
                source: Arc::new(e),
            });
            let _ = self.inner.socket.shutdown(Shutdown::Both);
        }
        if let Some(data) = data {
            let ready = s.slots.lock().unwrap().sent(handle, data);
            deliver(s, ready.into_iter());
        }
        Ok(handle)
    }

    /// Submits `req` and waits for its completion.
    pub fn call(&self, req: Request) -> Completion {
        let (tx, rx) = mpsc::sync_channel(1);
        match self.submit(req, move |c| {
            let _ = tx.send(c);
        }) {
            Ok(_) => rx.recv().expect("every request completes"),
            Err(e) => Completion {
                handle: Handle(0),
                result: Err(e),
                buf: Vec::new(),
            },
        }
    }

    /// Reads `buf.len()` bytes at `offset`, as many requests in flight at once as
    /// the range needs.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ClientError> {
        let chunk = self.inner.shared.max_chunk();
        let reqs = split(offset, buf.len() as u64, chunk).map(|(off, len)| Request::Read {
            offset: off,
            buf: vec![0u8; len as usize],
        });
        self.run_all(reqs, |i, data| {
            let at = i * chunk as usize;
            buf[at..at + data.len()].copy_from_slice(data);
        })
    }

    /// Writes `data` at `offset` (with FUA: durable when this returns).
    pub fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ClientError> {
        let chunk = self.inner.shared.max_chunk();
        let reqs = split(offset, data.len() as u64, chunk).map(|(off, len)| {
            let at = (off - offset) as usize;
            Request::Write {
                offset: off,
                data: data[at..at + len as usize].to_vec(),
                fua,
            }
        });
        self.run_all(reqs, |_, _| {})
    }

    /// Makes every write completed so far durable on the server.
    pub fn flush(&self) -> Result<(), ClientError> {
        self.call(Request::Flush).result
    }

    /// Discards `len` bytes at `offset`.
    pub fn trim(&self, offset: u64, len: u64) -> Result<(), ClientError> {
        let chunk = self.inner.shared.range_chunk();
        let reqs = split(offset, len, chunk).map(|(offset, len)| Request::Trim {
            offset,
            len: len as u32,
            fua: false,
        });
        self.run_all(reqs, |_, _| {})
    }

    /// Zeroes `len` bytes at `offset` (with `no_hole`, keeping them allocated).
    pub fn write_zeroes(&self, offset: u64, len: u64, no_hole: bool) -> Result<(), ClientError> {
        let chunk = self.inner.shared.range_chunk();
        let reqs = split(offset, len, chunk).map(|(offset, len)| Request::WriteZeroes {
            offset,
            len: len as u32,
            no_hole,
            fua: false,
        });
        self.run_all(reqs, |_, _| {})
    }

    /// Submits every request, waits for all, hands each successful completion's
    /// buffer to `each` with the request's index; returns the first error.
    fn run_all(
        &self,
        reqs: impl Iterator<Item = Request>,
        mut each: impl FnMut(usize, &[u8]),
    ) -> Result<(), ClientError> {
        let (tx, rx) = mpsc::channel();
        let mut submitted = 0;
        let mut first_err = None;
        for (i, req) in reqs.enumerate() {
            let tx = tx.clone();
            match self.submit(req, move |c| {
                let _ = tx.send((i, c));
            }) {
                Ok(_) => submitted += 1,
                Err(e) => {
                    first_err = Some(e);
                    break;
                }
            }
        }
        drop(tx);
        for (i, c) in rx.iter().take(submitted) {
            match c.result {
                Ok(()) => each(i, &c.buf),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// `(offset, len)` pieces of at most `chunk` bytes covering `offset..offset + len`.
fn split(offset: u64, len: u64, chunk: u64) -> impl Iterator<Item = (u64, u64)> {
    (0..len.div_ceil(chunk)).map(move |i| {
        let at = i * chunk;
        (offset + at, chunk.min(len - at))
    })
}

fn connect_tcp(addr: &str, timeout: Duration) -> Result<TcpStream, ClientError> {
    let err = |e: io::Error| ClientError::Connect {
        addr: addr.into(),
        source: Arc::new(e),
    };
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the address resolves to nothing");
    for a in addr.to_socket_addrs().map_err(err)? {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(err(last))
}

impl Shared {
    /// Largest read/write piece: the server's maximum, at most 32 MiB, in whole
    /// minimum blocks.
    fn max_chunk(&self) -> u64 {
        let max = self.info.max_block.min(MAX_PAYLOAD) as u64;
        let min = self.info.min_block as u64;
        (max / min * min).max(min)
    }

    /// Largest trim/zero piece: 1 GiB in whole minimum blocks.
    fn range_chunk(&self) -> u64 {
        let min = self.info.min_block as u64;
        (1u64 << 30) / min * min
    }

    fn invalid(&self, reason: String) -> ClientError {
        ClientError::Invalid {
            addr: self.addr.clone(),
            reason,
        }
    }

    fn unsupported(&self, what: &'static str) -> ClientError {
        ClientError::Unsupported {
            addr: self.addr.clone(),
            what,
        }
    }

    /// Checks `req` against the export; returns its header (handle unset) and
    /// payload length.
    fn check(&self, req: &Request) -> Result<(WireRequest, usize), ClientError> {
        let info = &self.info;
        let (cmd, offset, len, fua, no_hole) = match req {
            Request::Read { offset, buf } => (Cmd::READ, *offset, buf.len() as u64, false, false),
            Request::Write { offset, data, fua } => {
                (Cmd::WRITE, *offset, data.len() as u64, *fua, false)
            }
            Request::Flush => (Cmd::FLUSH, 0, 0, false, false),
            Request::Trim { offset, len, fua } => (Cmd::TRIM, *offset, *len as u64, *fua, false),
            Request::WriteZeroes {
                offset,
                len,
                no_hole,
                fua,
            } => (Cmd::WRITE_ZEROES, *offset, *len as u64, *fua, *no_hole),
        };
        let flags = info.flags;
        let needed = match cmd {
            Cmd::FLUSH => Some((TransmissionFlags::SEND_FLUSH, "NBD_CMD_FLUSH")),
            Cmd::TRIM => Some((TransmissionFlags::SEND_TRIM, "NBD_CMD_TRIM")),
            Cmd::WRITE_ZEROES => {
                Some((TransmissionFlags::SEND_WRITE_ZEROES, "NBD_CMD_WRITE_ZEROES"))
            }
            _ => None,
        };
        if matches!(cmd, Cmd::WRITE | Cmd::TRIM | Cmd::WRITE_ZEROES) && info.read_only() {
            return Err(ClientError::ReadOnly {
                addr: self.addr.clone(),
                export: info.name.clone(),
            });
        }
        if let Some((flag, what)) = needed {
            if !flags.has(flag) {
                return Err(self.unsupported(what));
            }
        }
        if fua && !flags.has(TransmissionFlags::SEND_FUA) {
            return Err(self.unsupported("NBD_CMD_FLAG_FUA"));
        }
        if cmd != Cmd::FLUSH {
            if len == 0 {
                return Err(self.invalid(format!("{cmd} of zero bytes")));
            }
            if offset.checked_add(len).is_none_or(|e| e > info.size) {
                return Err(self.invalid(format!(
                    "{cmd} of {len} bytes at {offset} goes beyond the export's {} bytes",
                    info.size
                )));
            }
            let min = info.min_block as u64;
            if offset % min != 0 || len % min != 0 {
                return Err(self.invalid(format!(
                    "{cmd} of {len} bytes at {offset} is not aligned to the minimum block size {min}"
                )));
            }
            if matches!(cmd, Cmd::READ | Cmd::WRITE) && len > info.max_block.min(MAX_PAYLOAD) as u64
            {
                return Err(self.invalid(format!(
                    "{cmd} of {len} bytes exceeds the maximum of {}",
                    info.max_block.min(MAX_PAYLOAD)
                )));
            }
        }
        let mut f = 0;
        if fua {
            f |= cmd_flags::FUA;
        }
        if no_hole {
            f |= cmd_flags::NO_HOLE;
        }
        let payload = if cmd == Cmd::WRITE { len as usize } else { 0 };
        Ok((
            WireRequest {
                flags: f,
                cmd,
                handle: 0,
                offset,
                len: len as u32,
            },
            payload,
        ))
    }

    /// Fails every outstanding request with `err` (the first error sticks).
    fn fail(&self, err: ClientError) {
        let ready = {
            let mut slots = self.slots.lock().unwrap();
            let r = slots.fail_all(&err);
            if slots.waiters > 0 {
                self.room.notify_all();
            }
            r
        };
        deliver(self, ready.into_iter());
    }
}

/// Runs completion callbacks (outside the lock); wakes submitters waiting for room.
fn deliver(s: &Shared, ready: impl Iterator<Item = Ready>) {
    for (cb, c) in ready {
        cb(c);
    }
    let slots = s.slots.lock().unwrap();
    if slots.waiters > 0 && slots.in_flight < s.config.max_in_flight {
        s.room.notify_all();
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let s = &*self.shared;
        let wait = s.config.io_timeout.unwrap_or(Duration::from_secs(30));
        let deadline = Instant::now() + wait;
        let alive = {
            let mut slots = s.slots.lock().unwrap();
            slots.closing = true;
            while slots.in_flight > 0 && slots.dead.is_none() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                slots.waiters += 1;
                slots = s.room.wait_timeout(slots, left).unwrap().0;
                slots.waiters -= 1;
            }
            slots.dead.is_none()
        };
        if alive {
            let disc = WireRequest {
                flags: 0,
                cmd: Cmd::DISC,
                handle: 0,
                offset: 0,
                len: 0,
            }
            .encode();
            let _ = s.writer.lock().unwrap().write_all(&disc);
        }
        let _ = self.socket.shutdown(Shutdown::Both);
        let on_reader = s.reader_id.get() == Some(&std::thread::current().id());
        if let Some(t) = self.reader.lock().unwrap().take() {
            if !on_reader {
                let _ = t.join();
            }
        }
    }
}
