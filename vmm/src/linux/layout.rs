//! Guest physical memory layout of a Linux VM.
//!
//! ```text
//! 0x0000_0500  GDT                 0x0000_7000  zero page (boot_params)
//! 0x0000_9000  PML4, PDPT, 4 PDs   (identity map of the first 4 GiB, 2 MiB pages)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  reserved: EBDA, BIOS area; ACPI tables at 0x000e_0000
//! 0x0010_0000  kernel (bzImage protected-mode part, or ELF vmlinux)
//!   ...        RAM; the initrd at its top (below 3 GiB)
//! 0xc000_0000  PCI MMIO window (device BARs)
//! 0xfec0_0000  IOAPIC              0xfee0_0000  local APICs
//! ```
//!
//! RAM is one range from 0 to `--mem` (at most [`MAX_RAM`]), all of it managed by
//! the ExCache: the loader's writes and the guest's accesses alike go through
//! the local cache.

/// GDT.
pub const GDT_ADDR: u64 = 0x500;
/// IDT (empty).
pub const IDT_ADDR: u64 = 0x520;
/// boot_params.
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Page tables.
pub const PML4_ADDR: u64 = 0x9000;
/// PDPT.
pub const PDPT_ADDR: u64 = 0xa000;
/// First of 4 page directories.
pub const PD_ADDR: u64 = 0xb000;
/// Command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Most command line bytes.
pub const CMDLINE_MAX: usize = 4096;
/// End of low usable RAM.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables (RSDP first).
pub const ACPI_ADDR: u64 = 0xe0000;
/// Where high memory (and the kernel) starts.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole.
pub const MMIO_START: u64 = 0xc000_0000;
/// PCI BAR window.
pub const PCI_MMIO_START: u64 = MMIO_START;
/// End (exclusive) of the PCI BAR window.
pub const PCI_MMIO_END: u64 = 0xfec0_0000;
/// IOAPIC.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Local APIC.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// Largest RAM this layout places below the MMIO hole.
pub const MAX_RAM: u64 = MMIO_START;
