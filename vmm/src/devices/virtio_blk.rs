//! virtio-blk: a block device backed by a [`BlockBackend`] (a local file today;
//! a remote storage node through the same trait).
//!
//! Every request is validated before any byte moves: the header must be readable
//! and complete, the status byte writable, data lengths multiples of 512, and the
//! sector range inside the disk; a bad request completes with `VIRTIO_BLK_S_IOERR`
//! (or `UNSUPP`) instead of touching the backend.

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
    buf: Vec<u8>,
    /// Requests completed with an error (for the stats).
    pub errors: u64,
}

impl VirtioBlk {
    /// A device over `backend`.
    pub fn new(backend: Box<dyn BlockBackend>) -> Self {
        VirtioBlk {
            backend,
            buf: Vec::new(),
            errors: 0,
        }
    }

    /// Executes one request; returns (status, bytes written to the guest).
    fn execute(
        &mut self,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> Result<u32, &'static str> {
        let mut reader = chain
            .clone()
            .reader(mem)
            .map_err(|_| "bad readable descriptors")?;
        let mut writer = chain.writer(mem).map_err(|_| "bad writable descriptors")?;
        let wlen = writer.available_bytes();
        if wlen == 0 {
            return Err("no writable status byte");
        }
        let mut status_w = writer
            .split_at(wlen - 1)
            .map_err(|_| "bad status descriptor")?;
        let mut hdr = [0u8; 16];
        let status = if reader.read_exact(&mut hdr).is_err() {
            S_IOERR
        } else {
            let ty = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
            let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap());
            self.request(ty, sector, &mut reader, &mut writer)
        };
        if status != S_OK {
            self.errors += 1;
        }
        status_w
            .write_all(&[status])
            .map_err(|_| "cannot write status")?;
        Ok((writer.bytes_written() + 1) as u32)
    }

    fn request(
        &mut self,
        ty: u32,
        sector: u64,
        reader: &mut virtio_queue::Reader<'_, ()>,
        writer: &mut virtio_queue::Writer<'_, ()>,
    ) -> u8 {
        let range_ok = |len: usize, size: u64| {
            len % SECTOR as usize == 0
                && len <= MAX_REQUEST
                && sector
                    .checked_mul(SECTOR)
                    .and_then(|o| o.checked_add(len as u64))
                    .is_some_and(|end| end <= size)
        };
        let size = self.backend.size();
        match ty {
            T_IN => {
                let len = writer.available_bytes();
                if !range_ok(len, size) {
                    crate::warn_once!(
                        "guest read out of range or oversized: sector {sector}, {len} bytes"
                    );
                    return S_IOERR;
                }
                self.buf.resize(len, 0);
                if let Err(e) = self.backend.read_at(&mut self.buf, sector * SECTOR) {
                    log::error!("disk {}: read failed: {e}", self.backend.name());
                    return S_IOERR;
                }
                if writer.write_all(&self.buf).is_err() {
                    return S_IOERR;
                }
                S_OK
            }
            T_OUT => {
                if self.backend.read_only() {
                    return S_IOERR;
                }
                let len = reader.available_bytes();
                if !range_ok(len, size) {
                    crate::warn_once!(
                        "guest write out of range or oversized: sector {sector}, {len} bytes"
                    );
                    return S_IOERR;
                }
                self.buf.resize(len, 0);
                if reader.read_exact(&mut self.buf).is_err() {
                    return S_IOERR;
                }
                if let Err(e) = self.backend.write_at(&self.buf, sector * SECTOR) {
                    log::error!("disk {}: write failed: {e}", self.backend.name());
                    return S_IOERR;
                }
                S_OK
            }
            T_FLUSH => match self.backend.flush() {
                Ok(()) => S_OK,
                Err(e) => {
                    log::error!("disk {}: flush failed: {e}", self.backend.name());
                    S_IOERR
                }
            },
            T_GET_ID => {
                let mut id = [0u8; 20];
                let name = self.backend.name();
                let b = name.as_bytes();
                let n = b.len().min(20);
                id[..n].copy_from_slice(&b[b.len() - n..]);
                let n = writer.available_bytes().min(20);
                if writer.write_all(&id[..n]).is_err() {
                    return S_IOERR;
                }
                S_OK
            }
            _ => S_UNSUPP,
        }
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
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let len = match self.execute(chain, mem) {
                Ok(n) => n,
                Err(why) => {
                    crate::warn_once!("dropping a malformed virtio-blk request: {why}");
                    self.errors += 1;
                    0
                }
            };
            if let Err(e) = queue.add_used(mem, head, len) {
                crate::warn_once!("cannot complete a virtio-blk request: {e}");
            }
            used = true;
        }
        used
    }
}
