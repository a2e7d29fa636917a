//! A virtio-blk backend on a remote storage node: `--disk nbd://HOST:PORT/EXPORT`,
//! or `nbds://...` over TLS ([`NbdUrl`]).
//!
//! Speaks NBD through [`nbd_proto::client::NbdClient`], so the node can be
//! our `storagenode` or any NBD server (`qemu-nbd`, `nbdkit`). Every request the
//! device submits goes out at once, pipelined on one connection (split into
//! pieces of at most 1 MiB); the client's reader thread hands each answer back
//! over a channel and makes [`BlockBackend::completion_fd`] readable, and the
//! device's event loop collects the finished requests from there. A flush goes
//! out only after every write submitted before it has been acknowledged, so it
//! covers them (NBD's flush covers completed writes).
//!
//! ## A failing node
//!
//! Requests that fail (the node died, closed the connection, did not answer within
//! [`IO_TIMEOUT`], or answered with an error) complete with an error, which the
//! guest sees as `VIRTIO_BLK_S_IOERR`; nothing hangs. The failure is logged with the
//! node's address. After a connection failure the backend reconnects on the next
//! request, with exponential backoff (from [`BACKOFF_MIN`] to [`BACKOFF_MAX`]):
//! within the backoff period requests fail at once instead of each waiting for a
//! connect timeout. A reconnected export must have the same size.
//!
//! A reconnect runs on a thread of its own (owned by the backend and joined),
//! never on the event loop: the loop serves every other device meanwhile.
//! Requests submitted while it runs wait for its outcome (they are bounded by
//! the device's in-flight limit), then go out in order, or fail if the node
//! is still unreachable. The thread's result wakes the loop through the same
//! eventfd as completions.

use super::block::{BlockBackend, BlockOp, OpKind};
pub use super::nbd_url::{NbdTls, NbdUrl, NbdUrlError};
use fabric::client::error_chain;
use nbd_proto::client::{ClientConfig, ClientError, Completion, NbdClient, Request};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::EventFd;

/// With requests outstanding, a node silent for this long is declared dead.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// First wait before reconnecting after a failure.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait between reconnect attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Largest piece a guest request is split into (a virtio-blk request is at most
/// 4 MiB; servers accept up to their advertised maximum, often 32 MiB).
const MAX_PIECE: usize = 1 << 20;

/// A disk on an NBD server.
pub struct NbdBackend {
    url: NbdUrl,
    config: ClientConfig,
    client: Option<NbdClient>,
    size: u64,
    read_only: bool,
    piece: usize,
    backoff: Duration,
    next_try: Instant,
    /// Pieces' completions, sent from the client's reader thread.
    tx: mpsc::Sender<(u64, usize, Completion)>,
    rx: mpsc::Receiver<(u64, usize, Completion)>,
    /// Written with each completion sent: the event loop's wake-up.
    ready: Arc<EventFd>,
    /// Ops with pieces outstanding, by tag.
    pending: HashMap<u64, Pending>,
    /// Ops finished, to hand out.
    finished: Vec<(u64, BlockOp)>,
    /// Sequence numbers of the writes in flight.
    writes: BTreeSet<u64>,
    next_write: u64,
    /// Flushes waiting for the writes before them: (tag, first later write).
    held: VecDeque<(u64, u64)>,
    /// A reconnect under way on its own thread, and its outcome.
    connecting: Option<Reconnect>,
    /// Ops submitted while reconnecting, in order.
    waiting: Vec<(u64, BlockOp)>,
    /// Requests that failed (for logs and tests).
    pub failures: u64,
    /// Successful reconnects.
    pub reconnects: u64,
}

/// A connection attempt on its own thread.
struct Reconnect {
    thread: std::thread::JoinHandle<()>,
    result: mpsc::Receiver<Result<NbdClient, ClientError>>,
}

/// An op whose pieces are with the node.
struct Pending {
    op: BlockOp,
    pieces: usize,
    error: Option<ClientError>,
    write_seq: Option<u64>,
}

impl NbdBackend {
    /// Connects to the export; an unreachable node or unknown export is an error
    /// naming it. `read_only` opens the disk read-only even if the export is not.
    pub fn connect(url: &NbdUrl, read_only: bool) -> Result<Self, ClientError> {
        let tls = match &url.tls {
            Some(t) => Some(t.load().map_err(|e| ClientError::Tls {
                addr: url.addr.clone(),
                source: Arc::new(io::Error::other(e)),
            })?),
            None => None,
        };
        let config = ClientConfig {
            io_timeout: Some(IO_TIMEOUT),
            connect_timeout: Duration::from_secs(3),
            tls,
            ..ClientConfig::default()
        };
        let client = NbdClient::connect_with(&url.addr, &url.export, &config)?;
        let info = client.info().clone();
        let piece = match info.max_block {
            0 => MAX_PIECE,
            m => (m as usize).min(MAX_PIECE),
        };
        let ready = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| ClientError::Io {
            addr: url.addr.clone(),
            during: "creating the completion eventfd",
            source: Arc::new(e),
        })?;
        let (tx, rx) = mpsc::channel();
        Ok(NbdBackend {
            url: url.clone(),
            config,
            size: info.size,
            read_only: read_only || info.read_only(),
            piece: piece.max(512),
            client: Some(client),
            backoff: BACKOFF_MIN,
            next_try: Instant::now(),
            tx,
            rx,
            ready: Arc::new(ready),
            pending: HashMap::new(),
            finished: Vec::new(),
            writes: BTreeSet::new(),
            next_write: 0,
            held: VecDeque::new(),
            connecting: None,
            waiting: Vec::new(),
            failures: 0,
            reconnects: 0,
        })
    }

    /// Starts a reconnect on its own thread if the connection is lost and the
    /// backoff has passed; `Err` if the node counts as down until then.
    fn reconnect(&mut self) -> io::Result<()> {
        if self.connecting.is_some() {
            return Ok(());
        }
        let now = Instant::now();
        if now < self.next_try {
            return Err(io::Error::other(format!(
                "storage node {} is down (next reconnect attempt in {:?})",
                self.url.addr,
                self.next_try - now
            )));
        }
        let (tx, result) = mpsc::channel();
        let (url, config, ready) = (self.url.clone(), self.config.clone(), self.ready.clone());
        let thread = std::thread::Builder::new()
            .name("vmm-nbd-connect".into())
            .spawn(move || {
                let _ = tx.send(NbdClient::connect_with(&url.addr, &url.export, &config));
                let _ = ready.write(1);
            })
            .map_err(|e| io::Error::other(format!("cannot start a reconnect thread: {e}")))?;
        self.connecting = Some(Reconnect { thread, result });
        Ok(())
    }

    /// Takes a finished reconnect's outcome: the waiting ops go out on the new
    /// connection, or fail if there is none.
    fn reconnected(&mut self) {
        let Some(r) = &self.connecting else {
            return;
        };
        let outcome = match r.result.try_recv() {
            Ok(o) => o,
            Err(mpsc::TryRecvError::Empty) => return,
            Err(mpsc::TryRecvError::Disconnected) => Err(ClientError::Io {
                addr: self.url.addr.clone(),
                during: "reconnecting",
                source: Arc::new(io::Error::other(
                    "the reconnect thread ended without a result",
                )),
            }),
        };
        let r = self.connecting.take().expect("checked above");
        let _ = r.thread.join();
        let failure = match outcome {
            Ok(c) if c.size() != self.size => {
                self.retry_later();
                format!(
                    "storage node {}: export {:?} is now {} bytes, was {}: not using it",
                    self.url.addr,
                    self.url.export,
                    c.size(),
                    self.size
                )
            }
            Ok(c) => {
                log::warn!("disk {}: reconnected to the storage node", self.url);
                self.reconnects += 1;
                self.backoff = BACKOFF_MIN;
                self.client = Some(c);
                // In order, through `submit`, so a flush still waits for the
                // writes before it.
                for (tag, op) in std::mem::take(&mut self.waiting) {
                    self.submit(tag, op);
                }
                return;
            }
            Err(e) => {
                self.retry_later();
                fabric::warn_limited!(
                    RECONNECTS,
                    "disk {}: reconnect failed: {}; next attempt in {:?}",
                    self.url,
                    error_chain(&e),
                    self.backoff
                );
                error_chain(&e)
            }
        };
        for (tag, mut op) in std::mem::take(&mut self.waiting) {
            self.failures += 1;
            op.result = Err(io::Error::other(failure.clone()));
            self.finished.push((tag, op));
        }
    }

    fn retry_later(&mut self) {
        self.next_try = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }

    /// Notes a failed request; a lost connection is dropped (reconnect later)
    /// and logged once, naming the node.
    fn failed(&mut self, e: &ClientError) {
        self.failures += 1;
        let lost = !matches!(
            e,
            ClientError::Request { .. }
                | ClientError::Invalid { .. }
                | ClientError::ReadOnly { .. }
        );
        if lost && self.client.take().is_some() {
            log::error!(
                "disk {}: storage node {} failed: {}; its requests complete with I/O errors, reconnecting with backoff",
                self.url,
                self.url.addr,
                error_chain(e)
            );
            self.retry_later();
        }
    }

    /// Sends `op`'s pieces to the node (or holds it while reconnecting).
    fn start(&mut self, tag: u64, mut op: BlockOp) {
        let client = match &self.client {
            Some(c) => c.clone(),
            None => {
                match self.reconnect() {
                    Ok(()) => self.waiting.push((tag, op)),
                    Err(e) => {
                        self.failures += 1;
                        op.result = Err(e);
                        self.finished.push((tag, op));
                    }
                }
                return;
            }
        };
        let write_seq = (op.kind == OpKind::Write).then(|| {
            self.next_write += 1;
            self.writes.insert(self.next_write);
            self.next_write
        });
        let len = op.buf.len();
        let whole = len <= self.piece;
        let pieces: Vec<(usize, usize)> = match op.kind {
            OpKind::Flush => vec![(0, 0)],
            _ => (0..len.max(1))
                .step_by(self.piece)
                .map(|at| (at, self.piece.min(len - at)))
                .collect(),
        };
        let mut p = Pending {
            op,
            pieces: 0,
            error: None,
            write_seq,
        };
        for (at, n) in pieces {
            let offset = p.op.offset + at as u64;
            let req = match p.op.kind {
                OpKind::Read => Request::Read {
                    offset,
                    buf: if whole {
                        std::mem::take(&mut p.op.buf)
                    } else {
                        vec![0; n]
                    },
                },
                OpKind::Write => Request::Write {
                    offset,
                    data: if whole {
                        std::mem::take(&mut p.op.buf)
                    } else {
                        p.op.buf[at..at + n].to_vec()
                    },
                    fua: false,
                },
                OpKind::Flush => Request::Flush,
            };
            let (tx, ready) = (self.tx.clone(), self.ready.clone());
            match client.submit(req, move |c| {
                let _ = tx.send((tag, at, c));
                let _ = ready.write(1);
            }) {
                Ok(_) => p.pieces += 1,
                Err(e) => {
                    p.error.get_or_insert(e);
                }
            }
        }
        if p.pieces == 0 {
            self.finish(tag, p);
        } else {
            self.pending.insert(tag, p);
        }
    }

    fn finish(&mut self, tag: u64, mut p: Pending) {
        if let Some(seq) = p.write_seq {
            self.writes.remove(&seq);
        }
        p.op.result = match p.error.take() {
            None => Ok(()),
            Some(e) => {
                self.failed(&e);
                Err(io::Error::other(error_chain(&e)))
            }
        };
        self.finished.push((tag, p.op));
    }

    /// Starts the flushes whose earlier writes have all completed.
    fn release_flushes(&mut self) {
        while let Some(&(tag, barrier)) = self.held.front() {
            if self.writes.first().is_some_and(|&w| w < barrier) {
                break;
            }
            self.held.pop_front();
            self.start(tag, BlockOp::new(OpKind::Flush, 0, Vec::new()));
        }
    }
}

static RECONNECTS: fabric::ratelimit::RateLimiter = fabric::ratelimit::RateLimiter::new(1);

impl Drop for NbdBackend {
    fn drop(&mut self) {
        // Whoever starts a thread joins it: a reconnect ends within the
        // connect timeout.
        if let Some(r) = self.connecting.take() {
            let _ = r.thread.join();
        }
    }
}

impl BlockBackend for NbdBackend {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn name(&self) -> String {
        self.url.to_string()
    }
    /// A flush goes out once every write submitted before it was acknowledged
    /// (NBD's flush covers completed writes); everything else goes out at once.
    fn submit(&mut self, tag: u64, op: BlockOp) {
        if op.kind == OpKind::Flush && (!self.writes.is_empty() || !self.held.is_empty()) {
            self.held.push_back((tag, self.next_write + 1));
            return;
        }
        self.start(tag, op);
    }
    fn completions(&mut self, out: &mut Vec<(u64, BlockOp)>) {
        let _ = self.ready.read();
        self.reconnected();
        while let Ok((tag, at, c)) = self.rx.try_recv() {
            let Some(p) = self.pending.get_mut(&tag) else {
                continue;
            };
            // A request of one piece took the op's buffer whole: it comes back
            // (a read's data, a write's payload).
            let whole = p.op.buf.is_empty();
            match c.result {
                Ok(()) if p.op.kind == OpKind::Read && !whole => {
                    p.op.buf[at..at + c.buf.len()].copy_from_slice(&c.buf);
                }
                Ok(()) => {}
                Err(e) => {
                    p.error.get_or_insert(e);
                }
            }
            if whole {
                p.op.buf = c.buf;
            }
            p.pieces -= 1;
            if p.pieces == 0 {
                let p = self.pending.remove(&tag).expect("present");
                self.finish(tag, p);
            }
        }
        self.release_flushes();
        out.append(&mut self.finished);
    }
    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.ready.as_raw_fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_bad_ones_are_named() {
        let u: NbdUrl = "nbd://127.0.0.1:7100/disk0".parse().unwrap();
        assert_eq!(u.addr, "127.0.0.1:7100");
        assert_eq!(u.export, "disk0");
        assert_eq!(u.to_string(), "nbd://127.0.0.1:7100/disk0");
        let d: NbdUrl = "nbd://host:10809".parse().unwrap();
        assert_eq!(d.export, "");
        for bad in [
            "nbd://",
            "nbd://host/x",
            "nbd://:1/x",
            "nbd://h:0/x",
            "http://h:1/x",
        ] {
            let e = bad.parse::<NbdUrl>().unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }
}
