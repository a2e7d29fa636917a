//! Where a disk's blocks live: the [`BlockBackend`] interface the virtio-blk
//! device submits requests to, and [`FileBackend`], a disk in a local file.
//!
//! The interface is asynchronous: [`BlockBackend::submit`] starts a request and
//! returns; finished requests are collected with [`BlockBackend::completions`],
//! and a backend whose requests finish later (a storage node over NBD) makes its
//! [`BlockBackend::completion_fd`] readable when some have, so the device's event
//! loop learns of them as an event. A local file completes each request within
//! `submit` (plain `pread`/`pwrite`, as Firecracker's synchronous engine does).

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::RawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Bytes in a sector.
pub const SECTOR: u64 = 512;

/// What a [`BlockOp`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// Read `buf.len()` bytes at `offset` into `buf`.
    Read,
    /// Write `buf` at `offset`.
    Write,
    /// Make every completed write durable.
    Flush,
}

/// One request handed to a [`BlockBackend`].
#[derive(Debug)]
pub struct BlockOp {
    /// What to do.
    pub kind: OpKind,
    /// Byte offset (reads and writes).
    pub offset: u64,
    /// The data: filled by a read, the payload of a write, empty for a flush.
    pub buf: Vec<u8>,
    /// The outcome, set when the op completes.
    pub result: io::Result<()>,
}

impl BlockOp {
    /// A new op, not run yet.
    pub fn new(kind: OpKind, offset: u64, buf: Vec<u8>) -> Self {
        BlockOp {
            kind,
            offset,
            buf,
            result: Ok(()),
        }
    }
}

/// Where a disk's blocks live.
pub trait BlockBackend: Send {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Read-only?
    fn read_only(&self) -> bool;
    /// A short name for logs and the device id.
    fn name(&self) -> String;
    /// Starts `op`, tagged `tag`; it comes back, with its `result` set, from
    /// [`BlockBackend::completions`]. Ops may run concurrently and complete in
    /// any order (virtio-blk promises no order), but a flush covers every write
    /// submitted before it.
    fn submit(&mut self, tag: u64, op: BlockOp);
    /// Moves the ops that finished since the last call to `out`.
    fn completions(&mut self, out: &mut Vec<(u64, BlockOp)>);
    /// A descriptor that is readable while completions wait to be collected, for
    /// a backend whose ops finish after `submit` returns; `None` if every op
    /// finishes within `submit`.
    fn completion_fd(&self) -> Option<RawFd> {
        None
    }

    /// Runs `ops` to completion, all submitted at once (for tools and tests; the
    /// device uses `submit` and `completions`).
    fn run_batch(&mut self, ops: &mut [BlockOp]) {
        for (i, op) in ops.iter_mut().enumerate() {
            let taken = std::mem::replace(op, BlockOp::new(op.kind, op.offset, Vec::new()));
            self.submit(i as u64, taken);
        }
        let mut left = ops.len();
        let mut done = Vec::new();
        while left > 0 {
            self.completions(&mut done);
            for (tag, op) in done.drain(..) {
                ops[tag as usize] = op;
                left -= 1;
            }
            if left > 0 {
                match self.completion_fd() {
                    Some(fd) => wait_readable(fd),
                    None => std::thread::yield_now(),
                }
            }
        }
    }

    /// Reads `buf.len()` bytes at `offset` (one op, to completion).
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut ops = [BlockOp::new(OpKind::Read, offset, vec![0; buf.len()])];
        self.run_batch(&mut ops);
        let [op] = ops;
        op.result?;
        buf.copy_from_slice(&op.buf);
        Ok(())
    }

    /// Writes `buf` at `offset` (one op, to completion).
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut ops = [BlockOp::new(OpKind::Write, offset, buf.to_vec())];
        self.run_batch(&mut ops);
        let [op] = ops;
        op.result
    }

    /// Makes completed writes durable (one op, to completion).
    fn flush(&mut self) -> io::Result<()> {
        let mut ops = [BlockOp::new(OpKind::Flush, 0, Vec::new())];
        self.run_batch(&mut ops);
        let [op] = ops;
        op.result
    }
}

/// Waits up to a second for `fd` to be readable.
fn wait_readable(fd: RawFd) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll(2) on one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut p, 1, 1000) };
}

/// Disk setup failures.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The file cannot be opened.
    #[error("cannot open disk image {path}")]
    Open {
        /// The path.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Its size is not a multiple of 512 bytes, or zero.
    #[error("disk image {path} is {size} bytes: not a positive multiple of 512")]
    Size {
        /// The path.
        path: String,
        /// Its size.
        size: u64,
    },
}

/// A disk in a local file.
pub struct FileBackend {
    file: File,
    size: u64,
    read_only: bool,
    path: String,
    done: VecDeque<(u64, BlockOp)>,
}

impl FileBackend {
    /// Opens `path` (read-write unless `read_only`).
    pub fn open(path: &Path, read_only: bool) -> Result<Self, DiskError> {
        let p = path.display().to_string();
        let open_err = |source| DiskError::Open {
            path: p.clone(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(open_err)?;
        let size = file.metadata().map_err(open_err)?.len();
        if size == 0 || size % SECTOR != 0 {
            return Err(DiskError::Size { path: p, size });
        }
        Ok(FileBackend {
            file,
            size,
            read_only,
            path: p,
            done: VecDeque::new(),
        })
    }
}

impl BlockBackend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn name(&self) -> String {
        self.path.clone()
    }
    fn submit(&mut self, tag: u64, mut op: BlockOp) {
        op.result = match op.kind {
            OpKind::Read => self.file.read_exact_at(&mut op.buf, op.offset),
            OpKind::Write => self.file.write_all_at(&op.buf, op.offset),
            OpKind::Flush => self.file.sync_data(),
        };
        self.done.push_back((tag, op));
    }
    fn completions(&mut self, out: &mut Vec<(u64, BlockOp)>) {
        out.extend(self.done.drain(..));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_disk_round_trips_and_refuses_odd_sizes() {
        let dir = std::env::temp_dir().join(format!("splitvisor-block-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("d.img");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        let mut d = FileBackend::open(&p, false).unwrap();
        d.write_at(&[7u8; 512], 512).unwrap();
        d.flush().unwrap();
        let mut b = [0u8; 1024];
        d.read_at(&mut b, 0).unwrap();
        assert_eq!(&b[..512], &[0u8; 512]);
        assert_eq!(&b[512..], &[7u8; 512]);
        assert!(d.read_at(&mut b, 4096).is_err(), "past the end");
        std::fs::write(&p, vec![0u8; 1000]).unwrap();
        let e = FileBackend::open(&p, false).err().unwrap().to_string();
        assert!(e.contains("not a positive multiple of 512"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
