//! Reading and writing the shim ABI's structures in guest memory.

use guest_shim::abi::{VcpuConfig, WorkloadResult};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct Config(VcpuConfig);
// SAFETY: VcpuConfig is repr(C), made of integers only, with explicit padding, so
// every byte pattern is a valid value.
unsafe impl ByteValued for Config {}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct Result_(WorkloadResult);
// SAFETY: WorkloadResult is repr(C) and made of integers only, without padding.
unsafe impl ByteValued for Result_ {}

/// Reads a vCPU configuration.
pub fn read_config(
    mem: &GuestMemoryMmap,
    at: GuestAddress,
) -> Result<VcpuConfig, GuestMemoryError> {
    mem.read_obj::<Config>(at).map(|c| c.0)
}

/// Writes a vCPU configuration.
pub fn write_config(
    mem: &GuestMemoryMmap,
    at: GuestAddress,
    c: VcpuConfig,
) -> Result<(), GuestMemoryError> {
    mem.write_obj(Config(c), at)
}

/// Reads a workload result.
pub fn read_result(
    mem: &GuestMemoryMmap,
    at: GuestAddress,
) -> Result<WorkloadResult, GuestMemoryError> {
    mem.read_obj::<Result_>(at).map(|r| r.0)
}
