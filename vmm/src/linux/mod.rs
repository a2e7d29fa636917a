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
pub mod config;
pub mod cpu;
pub mod devices;
pub mod layout;
pub mod vcpu;

use crate::devices::nbd_disk::NbdBackend;
pub use crate::devices::nbd_disk::{NbdTls, NbdUrl, NbdUrlError};
use crate::devices::virtio_blk::DiskError;
use crate::devices::virtio_blk::{BlockBackend, FileBackend};
use boot::BootError;
pub use config::{Console, DiskSpec, LinuxConfig};
use cpu::CpuError;
use devices::DeviceError;
use kvm_bindings::{CpuId, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{VcpuFd, VmFd};
use std::sync::Arc;
pub use vcpu::GuestExit;
use vm_memory::GuestMemoryMmap;

/// Why a Linux guest could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LinuxError {
    /// A KVM call failed.
    #[error("KVM {what} failed")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Writing the CPU or ACPI tables into guest memory failed.
    #[error("cannot write the guest's CPU and ACPI tables")]
    Tables(#[source] vm_memory::GuestMemoryError),
    /// Loading the kernel or initrd, or writing the boot parameters, failed.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Setting up a vCPU failed.
    #[error(transparent)]
    Cpu(#[from] CpuError),
    /// The devices could not be set up.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// A disk image cannot be used.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// A storage node disk cannot be reached.
    #[error("disk {url}")]
    NbdDisk {
        /// The disk's address.
        url: String,
        /// Why.
        #[source]
        source: nbd_proto::client::ClientError,
    },
}

fn kvm_call(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> LinuxError {
    move |source| LinuxError::Kvm { what, source }
}

/// True when /dev/kvm is this machine's software nested KVM (kvm_pvm), on which
/// guest kernel mode is emulated instruction by instruction.
pub fn software_kvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// Opens the disks, in `l.disks` order (a storage node's before KVM is touched).
pub(crate) fn open_disks(l: &LinuxConfig) -> Result<Vec<Box<dyn BlockBackend>>, LinuxError> {
    l.disks
        .iter()
        .map(|d| -> Result<Box<dyn BlockBackend>, LinuxError> {
            Ok(match d {
                DiskSpec::File { path, read_only } => {
                    Box::new(FileBackend::open(path, *read_only)?)
                }
                DiskSpec::Nbd { url, read_only } => {
                    Box::new(NbdBackend::connect(url, *read_only).map_err(|source| {
                        LinuxError::NbdDisk {
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
pub(crate) fn setup_vm(vm: &VmFd) -> Result<(), LinuxError> {
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
) -> Result<u64, LinuxError> {
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
    cpu::write_tables(mem).map_err(LinuxError::Tables)?;
    let rsdp = acpi::write_tables(mem, vcpus).map_err(LinuxError::Tables)?;
    boot::write_boot_params(mem, header, &l.cmdline, initrd, mem_bytes, rsdp)?;
    Ok(loaded.entry)
}

/// Builds the devices over `disks` (in `l.disks` order).
pub(crate) fn machine(
    l: &LinuxConfig,
    disks: Vec<Box<dyn BlockBackend>>,
    vm: &Arc<VmFd>,
    mem: &GuestMemoryMmap,
) -> Result<Arc<vcpu::Machine>, LinuxError> {
    Ok(Arc::new(devices::build(l, disks, vm, mem)?))
}

/// Sets up vCPU `i` of `vcpus` for the 64-bit boot protocol at `entry`.
pub(crate) fn setup_vcpu(
    v: &VcpuFd,
    i: usize,
    vcpus: usize,
    cpuid: &CpuId,
    entry: u64,
) -> Result<(), LinuxError> {
    Ok(cpu::setup(v, i, vcpus, cpuid, entry)?)
}
