//! vCPU threads: run the guest, route each exit. The shim's only exits are port
//! writes to the hypercall port; a write to a page under eviction surfaces as
//! `EFAULT` (or a memory-fault exit) and is retried once the eviction batch ends.

use crate::control::RunControl;
use crate::excache::ExCache;
use guest_shim::abi::{
    CALL_EXIT, CALL_LOG, CALL_RESULT, DOORBELL_ADDR, HYPERCALL_PORT, LOG_OFFSET, LOG_SIZE,
    MAILBOX_BASE, MAILBOX_SIZE, RESULT_OFFSET, WorkloadResult,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::sync::atomic::Ordering::SeqCst;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// How a vCPU ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuOutcome {
    /// The shim's exit code.
    pub exit_code: u32,
    /// The workload's result, if it reported one.
    pub result: Option<WorkloadResult>,
    /// KVM's counters for this vCPU at its exit (None if the kernel has none).
    pub kvm: Option<KvmCounters>,
}

/// What KVM counted for a vCPU: what a guest paid in exits, beside the cache's
/// own figures (each page the guest first touches after it is installed costs
/// an exit unless KVM mapped it along with a neighbour).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct KvmCounters {
    /// Guest exits to KVM.
    pub exits: u64,
    /// Guest page faults KVM handled.
    pub page_faults: u64,
    /// Of those, the ones that mapped a page.
    pub page_faults_fixed: u64,
}

impl KvmCounters {
    /// Reads a vCPU's counters (`KVM_GET_STATS_FD`); None, with a debug log
    /// line, if the kernel does not provide them.
    pub fn read(vcpu: &VcpuFd) -> Option<Self> {
        match crate::kvm_stats::read(vcpu) {
            Ok(m) => {
                let get = |k: &str| m.get(k).copied().unwrap_or(0);
                Some(KvmCounters {
                    exits: get("exits"),
                    page_faults: get("pf_taken"),
                    page_faults_fixed: get("pf_fixed"),
                })
            }
            Err(e) => {
                log::debug!("no KVM statistics: {}", fabric::client::error_chain(&e));
                None
            }
        }
    }
}

/// vCPU failures.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// `KVM_RUN` failed.
    #[error("vCPU {vcpu}: KVM_RUN failed")]
    Run {
        /// The vCPU.
        vcpu: usize,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The guest triple-faulted.
    #[error("vCPU {vcpu}: the guest crashed (triple fault) at rip {rip:#x}")]
    TripleFault {
        /// The vCPU.
        vcpu: usize,
        /// Its instruction pointer.
        rip: u64,
    },
    /// The guest did something the shim ABI does not allow.
    #[error("vCPU {vcpu}: unexpected exit: {what}")]
    Unexpected {
        /// The vCPU.
        vcpu: usize,
        /// What.
        what: String,
    },
    /// Reading the vCPU's mailbox failed.
    #[error("vCPU {vcpu}: cannot read its mailbox")]
    Mailbox {
        /// The vCPU.
        vcpu: usize,
        /// Why.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The VM was stopped.
    #[error("vCPU {0} stopped")]
    Stopped(usize),
}

/// Runs vCPU `idx` until the shim exits, the VM stops, or an error.
pub fn run(
    idx: usize,
    vcpu: &mut VcpuFd,
    mem: &GuestMemoryMmap,
    cache: &ExCache,
    control: &RunControl,
) -> Result<VcpuOutcome, VcpuError> {
    let mbox = MAILBOX_BASE + idx as u64 * MAILBOX_SIZE;
    let mut result = None;
    let mut efaults_in_a_row = 0u32;
    loop {
        control.wait_if_paused();
        if control.stop.load(SeqCst) {
            return Err(VcpuError::Stopped(idx));
        }
        let exit = vcpu.run();
        if !matches!(exit, Ok(VcpuExit::MemoryFault { .. }))
            && !matches!(&exit, Err(e) if e.errno() == libc::EFAULT)
        {
            efaults_in_a_row = 0;
        }
        match exit {
            Ok(VcpuExit::IoOut(HYPERCALL_PORT, data))
            | Ok(VcpuExit::MmioWrite(DOORBELL_ADDR, data)) => {
                let mut nr = [0u8; 4];
                let n = data.len().min(4);
                nr[..n].copy_from_slice(&data[..n]);
                let cfg = crate::abi_io::read_config(mem, GuestAddress(mbox))
                    .map_err(|source| VcpuError::Mailbox { vcpu: idx, source })?;
                match u32::from_le_bytes(nr) {
                    CALL_LOG => {
                        let len = (cfg.log_len as u64).min(LOG_SIZE) as usize;
                        let mut buf = vec![0u8; len];
                        mem.read_slice(&mut buf, GuestAddress(mbox + LOG_OFFSET))
                            .map_err(|source| VcpuError::Mailbox { vcpu: idx, source })?;
                        log::info!("guest vCPU {idx}: {}", String::from_utf8_lossy(&buf));
                    }
                    CALL_RESULT => {
                        result = Some(
                            crate::abi_io::read_result(mem, GuestAddress(mbox + RESULT_OFFSET))
                                .map_err(|source| VcpuError::Mailbox { vcpu: idx, source })?,
                        );
                    }
                    CALL_EXIT => {
                        return Ok(VcpuOutcome {
                            exit_code: cfg.exit_code,
                            result,
                            kvm: KvmCounters::read(vcpu),
                        });
                    }
                    other => {
                        return Err(VcpuError::Unexpected {
                            vcpu: idx,
                            what: format!("unknown hypercall {other}"),
                        });
                    }
                }
            }
            Ok(VcpuExit::MemoryFault { .. }) => efault(idx, cache, &mut efaults_in_a_row)?,
            Err(e) if e.errno() == libc::EFAULT => efault(idx, cache, &mut efaults_in_a_row)?,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(source) => return Err(VcpuError::Run { vcpu: idx, source }),
            Ok(VcpuExit::Shutdown) => {
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                return Err(VcpuError::TripleFault { vcpu: idx, rip });
            }
            Ok(VcpuExit::Hlt) => {
                return Ok(VcpuOutcome {
                    exit_code: 0,
                    result,
                    kvm: KvmCounters::read(vcpu),
                });
            }
            Ok(other) => {
                return Err(VcpuError::Unexpected {
                    vcpu: idx,
                    what: format!("{other:?}"),
                });
            }
        }
    }
}

/// A write hit a page under eviction: wait for the batch, then retry. Persistent
/// faults with no eviction to wait for mean a real bad access.
fn efault(idx: usize, cache: &ExCache, in_a_row: &mut u32) -> Result<(), VcpuError> {
    *in_a_row += 1;
    if *in_a_row > 100_000 {
        return Err(VcpuError::Unexpected {
            vcpu: idx,
            what: "memory access keeps failing (EFAULT)".into(),
        });
    }
    cache.vcpu_write_blocked();
    Ok(())
}
