//! Why a VM could not be built or did not run to its end: [`VmError`], shared
//! by the builder ([`crate::builder`]) and the vCPU threads.

use crate::api::ApiError;
use crate::config::ConfigError;
use crate::excache::{CacheError, PathError};
use crate::linux::LinuxError;
use crate::memory::MemoryError;
use crate::vcpu::VcpuError;
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
    /// A memory node is unreachable, named twice or wrongly.
    #[error(transparent)]
    Memnode(crate::excache::placement::PlacementError),
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
    /// A Linux guest could not be set up.
    #[error(transparent)]
    Linux(#[from] LinuxError),
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
