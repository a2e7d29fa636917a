//! Loading a Linux kernel and initrd, and the zero page that describes the
//! machine to it (x86 boot protocol, 64-bit entry): command line, e820 map,
//! initrd location, RSDP address.

use super::layout::*;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{Cmdline, KernelLoader, bzimage::BzImage, elf::Elf, load_cmdline};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// 64-bit entry offset from the protected-mode start of a bzImage.
const BZIMAGE_64BIT_ENTRY: u64 = 0x200;

/// Boot failures, each naming the file or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A file cannot be read.
    #[error("cannot read {what} {path}")]
    Read {
        /// kernel or initrd.
        what: &'static str,
        /// Its path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kernel is neither a bzImage nor an x86-64 ELF.
    #[error("{path} is not a Linux kernel (neither a bzImage nor an x86-64 ELF vmlinux)")]
    NotAKernel {
        /// Its path.
        path: String,
    },
    /// The kernel could not be loaded.
    #[error("cannot load kernel {path}")]
    Load {
        /// Its path.
        path: String,
        /// Why.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The initrd does not fit.
    #[error(
        "initrd {path} ({size} bytes) does not fit in guest RAM above the kernel (at most {room} bytes free below {limit:#x}); raise --mem or use a smaller initrd"
    )]
    InitrdTooBig {
        /// Its path.
        path: String,
        /// Its size.
        size: u64,
        /// The room there is.
        room: u64,
        /// The highest address the kernel accepts.
        limit: u64,
    },
    /// The command line is invalid or too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// Writing guest memory failed.
    #[error("cannot write the boot data into guest memory")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

/// Where things were loaded.
#[derive(Debug, Clone, Copy)]
pub struct Loaded {
    /// Kernel entry point (64-bit).
    pub entry: u64,
    /// End of the kernel image.
    pub kernel_end: u64,
}

/// Checks that `path` is readable and looks like a kernel (an ELF or a bzImage
/// with the "HdrS" boot header), without loading it.
pub fn probe_kernel(path: &Path) -> Result<(), BootError> {
    let p = path.display().to_string();
    let mut f = File::open(path).map_err(|source| BootError::Read {
        what: "kernel",
        path: p.clone(),
        source,
    })?;
    let mut head = vec![0u8; 0x206];
    let n = f.read(&mut head).map_err(|source| BootError::Read {
        what: "kernel",
        path: p.clone(),
        source,
    })?;
    let elf = n >= 4 && head[..4] == *b"\x7fELF";
    let bz = n >= 0x206
        && u32::from_le_bytes(head[0x202..0x206].try_into().unwrap()) == KERNEL_HDR_MAGIC;
    if elf || bz {
        Ok(())
    } else {
        Err(BootError::NotAKernel { path: p })
    }
}

/// Loads the kernel at `path`: a bzImage or an ELF vmlinux.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &Path,
) -> Result<(Loaded, Option<setup_header>), BootError> {
    let p = path.display().to_string();
    let read_err = |source| BootError::Read {
        what: "kernel",
        path: p.clone(),
        source,
    };
    let mut f = File::open(path).map_err(read_err)?;
    let mut magic = [0u8; 4];
    f.read_exact(&mut magic)
        .map_err(|_| BootError::NotAKernel { path: p.clone() })?;
    f.seek(SeekFrom::Start(0)).map_err(read_err)?;
    if magic == *b"\x7fELF" {
        let r =
            Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))).map_err(|source| {
                BootError::Load {
                    path: p.clone(),
                    source,
                }
            })?;
        return Ok((
            Loaded {
                entry: r.kernel_load.0,
                kernel_end: r.kernel_end,
            },
            None,
        ));
    }
    // bzImage: "HdrS" at 0x202.
    let mut hdr = [0u8; 4];
    f.seek(SeekFrom::Start(0x202)).map_err(read_err)?;
    if f.read_exact(&mut hdr).is_err() || u32::from_le_bytes(hdr) != KERNEL_HDR_MAGIC {
        return Err(BootError::NotAKernel { path: p });
    }
    f.seek(SeekFrom::Start(0)).map_err(read_err)?;
    let r =
        BzImage::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))).map_err(|source| {
            BootError::Load {
                path: p.clone(),
                source,
            }
        })?;
    Ok((
        Loaded {
            entry: r.kernel_load.0 + BZIMAGE_64BIT_ENTRY,
            kernel_end: r.kernel_end,
        },
        r.setup_header,
    ))
}

/// Loads the initrd at the top of RAM (below the kernel's limit); returns
/// (address, size).
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    ram_end: u64,
    kernel_end: u64,
    addr_max: u64,
) -> Result<(u64, u64), BootError> {
    let p = path.display().to_string();
    let read_err = |source| BootError::Read {
        what: "initrd",
        path: p.clone(),
        source,
    };
    let mut f = File::open(path).map_err(read_err)?;
    let size = f.metadata().map_err(read_err)?.len();
    let limit = ram_end.min(addr_max.saturating_add(1));
    let lowest = kernel_end.next_multiple_of(4096);
    let room = limit.saturating_sub(lowest);
    if size > room {
        return Err(BootError::InitrdTooBig {
            path: p,
            size,
            room,
            limit,
        });
    }
    let addr = (limit - size) & !0xfff;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(BootError::Memory)?;
    Ok((addr, size))
}

/// Writes the command line and the zero page.
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    header: Option<setup_header>,
    cmdline: &str,
    initrd: Option<(u64, u64)>,
    ram_end: u64,
    rsdp: u64,
) -> Result<(), BootError> {
    let mut cl = Cmdline::new(CMDLINE_MAX).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cl.insert_str(cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cl)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;

    let mut bp = boot_params::default();
    if let Some(h) = header {
        bp.hdr = h;
    }
    bp.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    bp.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    bp.hdr.header = KERNEL_HDR_MAGIC;
    bp.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    bp.hdr.cmdline_size = (cmdline.len() + 1) as u32;
    if bp.hdr.kernel_alignment == 0 {
        bp.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    if let Some((addr, size)) = initrd {
        bp.hdr.ramdisk_image = addr as u32;
        bp.hdr.ramdisk_size = size as u32;
    }
    bp.acpi_rsdp_addr = rsdp;
    let e820 = [
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
        (HIMEM_START, ram_end - HIMEM_START, E820_RAM),
    ];
    for (i, &(addr, size, type_)) in e820.iter().enumerate() {
        bp.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: type_,
        };
    }
    bp.e820_entries = e820.len() as u8;
    // SAFETY: boot_params is a plain-old-data, repr(C, packed) struct generated
    // from the kernel's header; viewing it as bytes is sound.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            (&bp as *const boot_params).cast::<u8>(),
            std::mem::size_of::<boot_params>(),
        )
    };
    mem.write_slice(bytes, GuestAddress(ZERO_PAGE))
        .map_err(BootError::Memory)
}

/// The highest initrd address a kernel accepts (`initrd_addr_max`), or the
/// protocol's default.
pub fn initrd_addr_max(header: Option<&setup_header>) -> u64 {
    match header.map(|h| h.initrd_addr_max) {
        Some(m) if m != 0 => u64::from(m),
        _ => 0x37ff_ffff,
    }
}
