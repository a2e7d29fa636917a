//! Why a VM could not be built or did not run to its end: [`VmError`], shared
//! by the builder ([`crate::builder`]) and the vCPU threads.

use crate::api::ApiError;
use crate::config::ConfigError;
use crate::devices::OverlapError;
use crate::devices::virtio_blk::DiskError;
use crate::excache::{CacheError, PathError};
use crate::linux::boot::BootError;
use crate::linux::cpu::CpuError;
use crate::memory::MemoryError;
use crate::vcpu::VcpuError;
use fabric::ClientError;
use std::path::PathBuf;
use std::sync::Arc;

/// Build and run failures.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The configuration was refused.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// /dev/kvm could not be used.
    #[error("cannot use /dev/kvm (does this machine have KVM, and may this user open it?)")]
    Kvm(#[source] kvm_ioctls::Error),
    /// A KVM call failed.
    #[error("KVM {what} failed")]
    KvmCall {
        /// Which call.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// A memory node is unreachable.
    #[error("memory node unreachable")]
    Memnode(#[source] ClientError),
    /// The cache could not start.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// The shim image is not a loadable ELF.
    #[error("the guest shim is not a loadable x86-64 ELF")]
    Shim(#[source] linux_loader::loader::Error),
    /// The shim image overlaps the vCPU stacks.
    #[error("the guest shim image ends at {end:#x}, past its {limit:#x} limit")]
    ShimTooLarge {
        /// Where the image ends.
        end: u64,
        /// Where it must end by.
        limit: u64,
    },
    /// Writing guest setup data failed.
    #[error("cannot write guest setup data")]
    Setup(#[source] vm_memory::GuestMemoryError),
    /// Loading the Linux kernel or initrd, or writing its boot data, failed.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Setting up a Linux vCPU failed.
    #[error(transparent)]
    Cpu(#[from] CpuError),
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
    /// The console file cannot be created.
    #[error("cannot create console file {}", .path.display())]
    ConsoleFile {
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// Two devices claim the same addresses.
    #[error(transparent)]
    Devices(#[from] OverlapError),
    /// The Linux guest's devices cannot be set up.
    #[error(transparent)]
    Device(#[from] crate::linux::devices::DeviceError),
    /// The vCPU kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler")]
    KickHandler(#[source] vmm_sys_util::errno::Error),
    /// A vCPU thread could not be started.
    #[error("cannot start a vCPU thread")]
    VcpuThread(#[source] std::io::Error),
    /// The control API could not be served.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// A vCPU failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The run stopped on a fatal error of the cache (a memory node failed).
    #[error(transparent)]
    Fatal(Arc<PathError>),
    /// A vCPU thread panicked (a bug in the VMM); the VM was stopped.
    #[error("vCPU {vcpu} panicked: {message}; the VM was stopped")]
    VcpuPanicked {
        /// Which vCPU.
        vcpu: usize,
        /// The panic's message.
        message: String,
    },
    /// Every vCPU of a Linux guest halted, and none powered it off.
    #[error("every vCPU halted without powering off")]
    HaltedWithoutPowerOff,
    /// The run was interrupted (SIGINT/SIGTERM).
    #[error("interrupted; the VM was stopped")]
    Interrupted,
}

/// Maps a failed KVM call to [`VmError::KvmCall`] naming it.
pub(crate) fn kvm_call(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::KvmCall { what, source }
}
