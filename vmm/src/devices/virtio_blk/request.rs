//! One virtio-blk request, taken apart and checked before any byte moves.
//!
//! A request is a descriptor chain: device-readable descriptors (the 16-byte
//! header `type, reserved, sector`, then a write's data) followed by
//! device-writable ones (a read's destination, then the status byte). Every
//! descriptor must lie inside guest memory and have a length; readable ones must
//! come before writable ones; the chain must end (a loop, or a chain longer than
//! the queue, is cut off by the queue's iterator and refused here); the last
//! writable byte is the status. A chain without a usable status byte cannot be
//! answered and is [`Malformed`] (returned with used length 0). Anything else
//! wrong gets a status the spec allows ([`Refused`]): `IOERR`, or `UNSUPP` for
//! an unknown request type. Data lengths must be multiples of 512, at most
//! [`MAX_REQUEST`], and inside the disk.

use super::super::block::SECTOR;
/// Bytes in a sector.
pub const SECTOR_BYTES: u64 = SECTOR;
pub use crate::devices::chain::{read_regions, write_regions};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{GuestAddress, GuestMemoryBackend};

/// Largest data part of one request (bytes).
pub const MAX_REQUEST: usize = 4 << 20;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
/// Status: done.
pub const S_OK: u8 = 0;
/// Status: failed.
pub const S_IOERR: u8 = 1;
/// Status: request type not supported.
pub const S_UNSUPP: u8 = 2;
/// Bytes of the GET_ID answer.
pub const ID_BYTES: usize = 20;

/// What a checked request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Read `len` bytes at `offset` into the data regions.
    Read,
    /// Write the data regions' `len` bytes at `offset`.
    Write,
    /// Make completed writes durable.
    Flush,
    /// Write the device id into the data regions.
    GetId,
    /// Answer with this status at once, without the backend.
    Done(u8),
}

/// A request taken from the queue and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Its descriptor chain's head (for the used ring).
    pub head: u16,
    /// What it asks.
    pub kind: Kind,
    /// Byte offset on the disk.
    pub offset: u64,
    /// Data bytes (the sum of `data`'s lengths).
    pub len: usize,
    /// Guest memory of the data part, in order.
    pub data: Vec<(GuestAddress, usize)>,
    /// The status byte.
    pub status: GuestAddress,
}

/// A chain that cannot be answered at all (no status byte to write).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// No descriptors.
    #[error("an empty descriptor chain")]
    Empty,
    /// The last descriptor is not device-writable.
    #[error("the last descriptor (the status byte) is read-only")]
    ReadOnlyStatus,
    /// The status descriptor is empty or outside guest memory.
    #[error("the status descriptor ({addr:#x}+{len}) is empty or outside guest memory")]
    BadStatus {
        /// Its address.
        addr: u64,
        /// Its length.
        len: u32,
    },
}

/// Why a request was answered with an error status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The chain loops or is longer than the queue.
    #[error("the descriptor chain does not end (a loop, or longer than the queue)")]
    Unterminated,
    /// A descriptor lies (partly) outside guest memory.
    #[error("descriptor {addr:#x}+{len} is outside guest memory")]
    OutsideMemory {
        /// Its address.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// A zero-length descriptor.
    #[error("a zero-length descriptor")]
    ZeroLength,
    /// A device-readable descriptor after a device-writable one.
    #[error("a device-readable descriptor after a device-writable one")]
    Order,
    /// Less than the 16-byte header.
    #[error("the request header is {0} bytes, not 16")]
    ShortHeader(usize),
    /// The data part is not a multiple of 512, too large, or past the disk's end.
    #[error(
        "{what} of {len} bytes at sector {sector}: not whole sectors, over {MAX_REQUEST} bytes, or past the end of the disk"
    )]
    Range {
        /// Read or write.
        what: &'static str,
        /// The sector.
        sector: u64,
        /// The data length.
        len: usize,
    },
    /// A write to a read-only disk.
    #[error("a write to a read-only disk")]
    ReadOnly,
    /// An unknown request type.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
}

/// The disk a request is checked against.
#[derive(Debug, Clone, Copy)]
pub struct Disk {
    /// Size in bytes.
    pub size: u64,
    /// Read-only.
    pub read_only: bool,
}

/// Takes the chain headed by `head` apart (`descs` is its descriptors as the
/// queue's iterator yields them) and checks it. `Ok` with [`Kind::Done`] and the
/// reason when it must be refused.
pub fn parse<M: GuestMemoryBackend>(
    head: u16,
    descs: impl IntoIterator<Item = Descriptor>,
    mem: &M,
    disk: Disk,
) -> Result<(Request, Option<Refused>), Malformed> {
    let descs: Vec<Descriptor> = descs.into_iter().collect();
    let last = descs.last().ok_or(Malformed::Empty)?;
    if !last.is_write_only() {
        return Err(Malformed::ReadOnlyStatus);
    }
    let (saddr, slen) = (last.addr().0, last.len());
    // The last byte of a descriptor that may end past 2^64 (the guest picks
    // both): checked, or it would wrap to an address the guest never named.
    let status = u64::from(slen)
        .checked_sub(1)
        .and_then(|n| saddr.checked_add(n))
        .map(GuestAddress)
        .filter(|&a| mem.check_range(a, 1))
        .ok_or(Malformed::BadStatus {
            addr: saddr,
            len: slen,
        })?;
    let mut req = Request {
        head,
        kind: Kind::Done(S_IOERR),
        offset: 0,
        len: 0,
        data: Vec::new(),
        status,
    };
    match check(&descs, mem, disk, &mut req) {
        Ok(()) => Ok((req, None)),
        Err(why) => {
            req.kind = Kind::Done(if matches!(why, Refused::Unsupported(_)) {
                S_UNSUPP
            } else {
                S_IOERR
            });
            req.data.clear();
            req.len = 0;
            Ok((req, Some(why)))
        }
    }
}

fn check<M: GuestMemoryBackend>(
    descs: &[Descriptor],
    mem: &M,
    disk: Disk,
    req: &mut Request,
) -> Result<(), Refused> {
    // The iterator stops a loop after as many descriptors as the queue has; the
    // last one then still points on.
    if descs.last().is_some_and(|d| d.has_next()) {
        return Err(Refused::Unterminated);
    }
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    for d in descs {
        let (addr, len) = (d.addr().0, d.len());
        if len == 0 {
            return Err(Refused::ZeroLength);
        }
        if !mem.check_range(d.addr(), len as usize) {
            return Err(Refused::OutsideMemory { addr, len });
        }
        if d.is_write_only() {
            writable.push((d.addr(), len as usize));
        } else if !writable.is_empty() {
            return Err(Refused::Order);
        } else {
            readable.push((d.addr(), len as usize));
        }
    }
    // The status byte is the last writable byte.
    if let Some(l) = writable.last_mut() {
        l.1 -= 1;
        if l.1 == 0 {
            writable.pop();
        }
    }
    let mut hdr = [0u8; 16];
    let got = read_regions(mem, &readable, &mut hdr);
    if got < 16 {
        return Err(Refused::ShortHeader(got));
    }
    let ty = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
    let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap());
    let after_header = skip(&readable, 16);
    let range = |what: &'static str, len: usize| {
        let ok = len % SECTOR as usize == 0
            && len <= MAX_REQUEST
            && sector
                .checked_mul(SECTOR)
                .and_then(|o| o.checked_add(len as u64))
                .is_some_and(|end| end <= disk.size);
        if ok {
            Ok(())
        } else {
            Err(Refused::Range { what, sector, len })
        }
    };
    req.offset = sector.wrapping_mul(SECTOR);
    match ty {
        T_IN => {
            let len = total(&writable);
            range("read", len)?;
            req.kind = Kind::Read;
            req.len = len;
            req.data = writable;
        }
        T_OUT => {
            if disk.read_only {
                return Err(Refused::ReadOnly);
            }
            let len = total(&after_header);
            range("write", len)?;
            req.kind = Kind::Write;
            req.len = len;
            req.data = after_header;
        }
        T_FLUSH => req.kind = Kind::Flush,
        T_GET_ID => {
            req.kind = Kind::GetId;
            req.data = writable;
            req.len = total(&req.data).min(ID_BYTES);
        }
        other => return Err(Refused::Unsupported(other)),
    }
    Ok(())
}

fn total(regions: &[(GuestAddress, usize)]) -> usize {
    regions.iter().map(|r| r.1).sum()
}

/// The regions after their first `n` bytes.
fn skip(regions: &[(GuestAddress, usize)], mut n: usize) -> Vec<(GuestAddress, usize)> {
    let mut out = Vec::new();
    for &(a, l) in regions {
        if n >= l {
            n -= l;
            continue;
        }
        out.push((GuestAddress(a.0 + n as u64), l - n));
        n = 0;
    }
    out
}
