//! The node's I/O worker pool: requests that may block (flushes, FUA writes,
//! trims, write-zeroes, large or uncached reads and writes) run here, several at a
//! time, so that a slow `fdatasync` on one request does not hold up the others.
//! A worker does the system call and sends the reply itself (one `writev` of header
//! and data under the connection's writer lock), so a request crosses at most one
//! thread hand-off.

use super::conn::ConnShared;
use fabric::warn_limited;
use nbd_proto::wire::Errno;
use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// One request for a worker.
pub(crate) struct Job {
    /// The connection to reply on.
    pub conn: Arc<ConnShared>,
    /// The request's handle.
    pub handle: u64,
    /// What to do.
    pub kind: JobKind,
}

/// The operation of a [`Job`].
pub(crate) enum JobKind {
    /// Read `len` bytes at `offset` into `buf` (at least `len` long) and send them.
    Read {
        offset: u64,
        len: usize,
        buf: Vec<u8>,
    },
    /// Write `buf[..len]` at `offset`.
    Write {
        offset: u64,
        len: usize,
        buf: Vec<u8>,
        fua: bool,
    },
    /// `fdatasync` the volume.
    Flush,
    /// Punch a hole.
    Trim { offset: u64, len: u64, fua: bool },
    /// Zero a range.
    WriteZeroes {
        offset: u64,
        len: u64,
        no_hole: bool,
        fua: bool,
    },
}

impl JobKind {
    /// Payload bytes this job holds in memory (for the per-connection bound).
    pub fn buffered_bytes(&self) -> usize {
        match self {
            JobKind::Read { len, .. } | JobKind::Write { len, .. } => *len,
            _ => 0,
        }
    }
}

struct Queue {
    jobs: VecDeque<Job>,
    idle: usize,
    stop: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    work: Condvar,
}

/// A fixed set of worker threads shared by every connection of the node.
pub(crate) struct Pool {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Pool {
    /// Starts `threads` workers.
    pub fn start(threads: usize) -> std::io::Result<Pool> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                idle: 0,
                stop: false,
            }),
            work: Condvar::new(),
        });
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let s = shared.clone();
            handles.push(
                std::thread::Builder::new()
                    .name(format!("io-{i}"))
                    .spawn(move || worker(&s))?,
            );
        }
        Ok(Pool {
            shared,
            threads: Mutex::new(handles),
        })
    }

    /// Queues a job; an idle worker picks it up.
    pub fn submit(&self, job: Job) {
        let mut q = self.shared.queue.lock().unwrap();
        q.jobs.push_back(job);
        // Waking a condition variable costs a futex call even with nobody waiting:
        // only wake when a worker sleeps.
        if q.idle > 0 {
            self.shared.work.notify_one();
        }
    }

    /// Runs the queued jobs to the end, then stops and joins the workers.
    pub fn stop(&self) {
        self.shared.queue.lock().unwrap().stop = true;
        self.shared.work.notify_all();
        for t in self.threads.lock().unwrap().drain(..) {
            let _ = t.join();
        }
    }
}

fn worker(s: &Shared) {
    loop {
        let job = {
            let mut q = s.queue.lock().unwrap();
            loop {
                if let Some(j) = q.jobs.pop_front() {
                    break j;
                }
                if q.stop {
                    return;
                }
                q.idle += 1;
                q = s.work.wait(q).unwrap();
                q.idle -= 1;
            }
        };
        run(job);
    }
}

/// Executes one job and sends its reply.
pub(crate) fn run(job: Job) {
    let Job { conn, handle, kind } = job;
    let bytes = kind.buffered_bytes();
    let v = &conn.volume;
    let stats = &conn.stats;
    let (result, buf, reply_len) = match kind {
        JobKind::Read {
            offset,
            len,
            mut buf,
        } => {
            let r = v.read_at(&mut buf[..len], offset);
            if r.is_ok() {
                stats.read_bytes.fetch_add(len as u64, Relaxed);
            }
            (r, Some(buf), len)
        }
        JobKind::Write {
            offset,
            len,
            buf,
            fua,
        } => {
            let r = v.write_at(&buf[..len], offset, fua);
            if r.is_ok() {
                stats.written_bytes.fetch_add(len as u64, Relaxed);
            }
            (r, Some(buf), 0)
        }
        JobKind::Flush => {
            stats.flushes.fetch_add(1, Relaxed);
            (v.flush(), None, 0)
        }
        JobKind::Trim { offset, len, fua } => (v.trim(offset, len, fua), None, 0),
        JobKind::WriteZeroes {
            offset,
            len,
            no_hole,
            fua,
        } => (v.write_zeroes(offset, len, no_hole, fua), None, 0),
    };
    match result {
        Ok(()) => {
            let data = buf.as_deref().map_or(&[][..], |b| &b[..reply_len]);
            conn.send_reply(handle, 0, data);
        }
        Err(e) => {
            stats.errors.fetch_add(1, Relaxed);
            warn_limited!(
                super::IO_ERRORS,
                "volume {:?}: I/O error for {}: {e}",
                v.name(),
                conn.peer
            );
            conn.send_reply(handle, Errno::from_io(&e).0, &[]);
        }
    }
    if let Some(b) = buf {
        conn.give_buf(b);
    }
    conn.job_done(bytes);
}
