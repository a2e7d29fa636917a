//! virtio-blk: a block device backed by a [`BlockBackend`]: a local file
//! ([`FileBackend`]) or a remote storage node over NBD
//! ([`super::nbd_disk::NbdBackend`]).
//!
//! Every request is validated before any byte moves: the header must be readable
//! and complete, the status byte writable, data lengths multiples of 512, and the
//! sector range inside the disk; a bad request completes with `VIRTIO_BLK_S_IOERR`
//! (or `UNSUPP`) instead of touching the backend.
//!
//! A queue notification takes every request the guest has made available, checks
//! them, and hands the valid ones to the backend as one batch
//! ([`BlockBackend::run_batch`]); a remote backend keeps the whole batch in flight
//! at once. Each request is completed (status written, used ring updated) only
//! after the backend reported its outcome, so the guest never sees a write
//! completed before the storage node acknowledged it.

use super::virtio_pci::{F_VERSION_1, VirtioDevice};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

const SECTOR: u64 = 512;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;
/// Largest single request accepted (bytes).
const MAX_REQUEST: usize = 4 << 20;
const QUEUE_SIZE: u16 = 256;

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

/// One request of a batch handed to [`BlockBackend::run_batch`].
#[derive(Debug)]
pub struct BlockOp {
    /// What to do.
    pub kind: OpKind,
    /// Byte offset (reads and writes).
    pub offset: u64,
    /// The data: filled by a read, the payload of a write, empty for a flush.
    pub buf: Vec<u8>,
    /// The outcome, set by `run_batch`.
    pub result: std::io::Result<()>,
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
    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
    /// Writes `buf` at `offset`.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()>;
    /// Makes completed writes durable.
    fn flush(&mut self) -> std::io::Result<()>;
    /// Read-only?
    fn read_only(&self) -> bool;
    /// A short name for logs and the device id.
    fn name(&self) -> String;
    /// Runs a batch of requests and sets each one's `result`. Requests may run
    /// concurrently and complete in any order (virtio-blk promises no order), but
    /// a flush covers every write that comes before it in the batch. The default
    /// runs them one after the other.
    fn run_batch(&mut self, ops: &mut [BlockOp]) {
        for op in ops {
            op.result = match op.kind {
                OpKind::Read => self.read_at(&mut op.buf, op.offset),
                OpKind::Write => self.write_at(&op.buf, op.offset),
                OpKind::Flush => self.flush(),
            };
        }
    }
}

/// A disk in a local file.
pub struct FileBackend {
    file: File,
    size: u64,
    read_only: bool,
    path: String,
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
        source: std::io::Error,
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

impl FileBackend {
    /// Opens `path` (read-write unless `read_only`).
    pub fn open(path: &Path, read_only: bool) -> Result<Self, DiskError> {
        let p = path.display().to_string();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| DiskError::Open {
                path: p.clone(),
                source,
            })?;
        let size = file
            .metadata()
            .map_err(|source| DiskError::Open {
                path: p.clone(),
                source,
            })?
            .len();
        if size == 0 || size % SECTOR != 0 {
            return Err(DiskError::Size { path: p, size });
        }
        Ok(FileBackend {
            file,
            size,
            read_only,
            path: p,
        })
    }
}

impl BlockBackend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.sync_data()
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn name(&self) -> String {
        self.path.clone()
    }
}

/// The virtio-blk device.
pub struct VirtioBlk {
    backend: Box<dyn BlockBackend>,
    /// Requests completed with an error (for the stats).
    pub errors: u64,
}

/// A request taken from the queue, checked, waiting for its outcome.
struct Pending<'a> {
    head: u16,
    /// The data part of the writable descriptors (a read's destination).
    writer: virtio_queue::Writer<'a, ()>,
    /// The status byte.
    status: virtio_queue::Writer<'a, ()>,
    /// `Ok(index into the batch)`, or the status to report without the backend.
    op: Result<usize, u8>,
    /// Bytes a GET_ID request writes (answered here, not by the backend).
    id: Option<[u8; 20]>,
}

impl VirtioBlk {
    /// A device over `backend`.
    pub fn new(backend: Box<dyn BlockBackend>) -> Self {
        VirtioBlk { backend, errors: 0 }
    }

    /// Checks one request and, if it needs the backend, appends its op to `ops`.
    fn parse<'a>(
        &self,
        chain: virtio_queue::DescriptorChain<&'a GuestMemoryMmap>,
        mem: &'a GuestMemoryMmap,
        ops: &mut Vec<BlockOp>,
    ) -> Result<Pending<'a>, &'static str> {
        let head = chain.head_index();
        let mut reader = chain
            .clone()
            .reader(mem)
            .map_err(|_| "bad readable descriptors")?;
        let mut writer = chain.writer(mem).map_err(|_| "bad writable descriptors")?;
        let wlen = writer.available_bytes();
        if wlen == 0 {
            return Err("no writable status byte");
        }
        let status = writer
            .split_at(wlen - 1)
            .map_err(|_| "bad status descriptor")?;
        let mut p = Pending {
            head,
            writer,
            status,
            op: Err(S_IOERR),
            id: None,
        };
        let mut hdr = [0u8; 16];
        if reader.read_exact(&mut hdr).is_err() {
            return Ok(p);
        }
        let ty = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
        let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap());
        let size = self.backend.size();
        let range_ok = |len: usize| {
            len % SECTOR as usize == 0
                && len <= MAX_REQUEST
                && sector
                    .checked_mul(SECTOR)
                    .and_then(|o| o.checked_add(len as u64))
                    .is_some_and(|end| end <= size)
        };
        let offset = sector.wrapping_mul(SECTOR);
        p.op = match ty {
            T_IN => {
                let len = p.writer.available_bytes();
                if !range_ok(len) {
                    crate::warn_once!(
                        "guest read out of range or oversized: sector {sector}, {len} bytes"
                    );
                    return Ok(p);
                }
                ops.push(BlockOp::new(OpKind::Read, offset, vec![0; len]));
                Ok(ops.len() - 1)
            }
            T_OUT => {
                if self.backend.read_only() {
                    return Ok(p);
                }
                let len = reader.available_bytes();
                if !range_ok(len) {
                    crate::warn_once!(
                        "guest write out of range or oversized: sector {sector}, {len} bytes"
                    );
                    return Ok(p);
                }
                let mut buf = vec![0; len];
                if reader.read_exact(&mut buf).is_err() {
                    return Ok(p);
                }
                ops.push(BlockOp::new(OpKind::Write, offset, buf));
                Ok(ops.len() - 1)
            }
            T_FLUSH => {
                ops.push(BlockOp::new(OpKind::Flush, 0, Vec::new()));
                Ok(ops.len() - 1)
            }
            T_GET_ID => {
                let mut id = [0u8; 20];
                let name = self.backend.name();
                let b = name.as_bytes();
                let n = b.len().min(20);
                id[..n].copy_from_slice(&b[b.len() - n..]);
                p.id = Some(id);
                Err(S_OK)
            }
            _ => Err(S_UNSUPP),
        };
        Ok(p)
    }

    /// Writes a finished request's data and status; returns the used length.
    fn finish(&mut self, mut p: Pending<'_>, ops: &mut [BlockOp]) -> u32 {
        let mut status = match p.op {
            Err(s) => s,
            Ok(i) => {
                let op = &mut ops[i];
                match (&op.result, op.kind) {
                    (Ok(()), OpKind::Read) if p.writer.write_all(&op.buf).is_err() => S_IOERR,
                    (Ok(()), _) => S_OK,
                    (Err(e), kind) => {
                        log::error!(
                            "disk {}: {kind:?} at {} ({} bytes) failed: {e}",
                            self.backend.name(),
                            op.offset,
                            op.buf.len()
                        );
                        S_IOERR
                    }
                }
            }
        };
        if let Some(id) = p.id {
            let n = p.writer.available_bytes().min(20);
            if p.writer.write_all(&id[..n]).is_err() {
                status = S_IOERR;
            }
        }
        if status != S_OK {
            self.errors += 1;
        }
        if p.status.write_all(&[status]).is_err() {
            crate::warn_once!("cannot write a virtio-blk status byte");
        }
        (p.writer.bytes_written() + 1) as u32
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
        cfg[0..8].copy_from_slice(&(self.backend.size() / SECTOR).to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn process_queue(&mut self, _index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut pending = Vec::new();
        let mut malformed = Vec::new();
        let mut ops = Vec::new();
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            match self.parse(chain, mem, &mut ops) {
                Ok(p) => pending.push(p),
                Err(why) => {
                    crate::warn_once!("dropping a malformed virtio-blk request: {why}");
                    self.errors += 1;
                    malformed.push(head);
                }
            }
        }
        if pending.is_empty() && malformed.is_empty() {
            return false;
        }
        if !ops.is_empty() {
            self.backend.run_batch(&mut ops);
        }
        let mut done: Vec<(u16, u32)> = malformed.into_iter().map(|h| (h, 0)).collect();
        for p in pending {
            let head = p.head;
            let len = self.finish(p, &mut ops);
            done.push((head, len));
        }
        for (head, len) in done {
            if let Err(e) = queue.add_used(mem, head, len) {
                crate::warn_once!("cannot complete a virtio-blk request: {e}");
            }
        }
        true
    }
}
