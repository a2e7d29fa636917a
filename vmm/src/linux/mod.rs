//! # Booting stock Linux
//!
//! `vmm run --kernel` builds a PC-like machine a distro kernel boots on without
//! changes: RAM from 0 ([`layout`]) entirely behind the ExCache, the kernel and
//! initrd loaded by linux-loader ([`boot`]), the 64-bit boot protocol
//! ([`cpu`]), ACPI tables for SMP, PCI and power-off ([`acpi`]), the in-kernel
//! IOAPIC/LAPICs and PIT, an 8250 console, and virtio-blk disks over PCI
//! ([`crate::devices`]). This module holds the Linux-specific steps of
//! [`crate::builder`]; the vCPUs' exits are [`vcpu`]'s.

pub mod acpi;
pub mod boot;
pub mod cpu;
pub mod devices;
pub mod layout;
pub mod vcpu;

pub use crate::config::{Console, DiskSpec, LinuxConfig};
use crate::devices::nbd_disk::NbdBackend;
pub use crate::devices::nbd_disk::{NbdUrl, NbdUrlError};
use crate::devices::virtio_blk::{BlockBackend, FileBackend};
use crate::error::VmError;
pub(crate) use crate::error::kvm_call;
use kvm_bindings::{CpuId, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{VcpuFd, VmFd};
use std::sync::Arc;
pub use vcpu::GuestExit;
use vm_memory::GuestMemoryMmap;

/// True when /dev/kvm is this machine's software nested KVM (kvm_pvm), on which
/// guest kernel mode is emulated instruction by instruction.
pub fn software_kvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// Opens the disks, in `l.disks` order (a storage node's before KVM is touched).
pub(crate) fn open_disks(l: &LinuxConfig) -> Result<Vec<Box<dyn BlockBackend>>, VmError> {
    l.disks
        .iter()
        .map(|d| -> Result<Box<dyn BlockBackend>, VmError> {
            Ok(match d {
                DiskSpec::File { path, read_only } => {
                    Box::new(FileBackend::open(path, *read_only)?)
                }
                DiskSpec::Nbd { url, read_only } => {
                    Box::new(NbdBackend::connect(url, *read_only).map_err(|source| {
                        VmError::NbdDisk {
                            url: url.to_string(),
                            source,
                        }
                    })?)
                }
            })
        })
        .collect()
}

/// The VM-wide parts of a PC: the TSS address, the in-kernel irqchip and PIT.
pub(crate) fn setup_vm(vm: &VmFd) -> Result<(), VmError> {
    vm.set_tss_address(0xfffb_d000)
        .map_err(kvm_call("set TSS address"))?;
    vm.create_irq_chip()
        .map_err(kvm_call("create the in-kernel irqchip"))?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(kvm_call("create the in-kernel PIT"))
}

/// Writes the kernel, initrd, CPU and ACPI tables and the zero page into
/// `mem` (`mem_bytes` of guest RAM, through the cache); returns the kernel's
/// 64-bit entry point.
pub(crate) fn load(
    mem: &GuestMemoryMmap,
    l: &LinuxConfig,
    mem_bytes: u64,
    vcpus: usize,
) -> Result<u64, VmError> {
    let (loaded, header) = boot::load_kernel(mem, &l.kernel)?;
    let initrd = match &l.initrd {
        Some(p) => Some(boot::load_initrd(
            mem,
            p,
            mem_bytes,
            loaded.kernel_end,
            boot::initrd_addr_max(header.as_ref()),
        )?),
        None => None,
    };
    cpu::write_tables(mem).map_err(VmError::Setup)?;
    let rsdp = acpi::write_tables(mem, vcpus).map_err(VmError::Setup)?;
    boot::write_boot_params(mem, header, &l.cmdline, initrd, mem_bytes, rsdp)?;
    Ok(loaded.entry)
}

/// Builds the devices over `disks` (in `l.disks` order).
pub(crate) fn machine(
    l: &LinuxConfig,
    disks: Vec<Box<dyn BlockBackend>>,
    vm: &Arc<VmFd>,
    mem: &GuestMemoryMmap,
) -> Result<Arc<vcpu::Machine>, VmError> {
    Ok(Arc::new(devices::build(l, disks, vm, mem)?))
}

/// Sets up vCPU `i` of `vcpus` for the 64-bit boot protocol at `entry`.
pub(crate) fn setup_vcpu(
    v: &VcpuFd,
    i: usize,
    vcpus: usize,
    cpuid: &CpuId,
    entry: u64,
) -> Result<(), VmError> {
    Ok(cpu::setup(v, i, vcpus, cpuid, entry)?)
}
