//! The guest-shim kind: the freestanding CPL3 test guest. Loading its ELF and
//! page tables, each vCPU's mailbox and user-mode registers, and its exits: a
//! hypercall is a port write to [`HYPERCALL_PORT`] (or an MMIO write to
//! [`DOORBELL_ADDR`]) naming a log line, a result or the exit.

use crate::config::{ShimConfig, ShimImage, VmConfig, shim_share};
use crate::error::{VmError, kvm_call};
use crate::memory::GuestRam;
use crate::vcpu::{GuestExits, KvmCounters, Step, VcpuError};
use guest_shim::abi::{
    ARENA_BASE, CALL_EXIT, CALL_LOG, CALL_RESULT, CONFIG_MAGIC, DOORBELL_ADDR, HYPERCALL_PORT,
    LOG_OFFSET, LOG_SIZE, MAILBOX_BASE, MAILBOX_SIZE, RESULT_OFFSET, STACK_SIZE, STACKS_BASE,
    VcpuConfig, WorkloadResult,
};
use kvm_bindings::CpuId;
use kvm_ioctls::VcpuFd;
use linux_loader::loader::{KernelLoader, elf::Elf};
use std::borrow::Cow;
use std::io::Cursor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// How a shim vCPU ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuOutcome {
    /// The shim's exit code.
    pub exit_code: u32,
    /// The workload's result, if it reported one.
    pub result: Option<WorkloadResult>,
    /// KVM's counters for this vCPU at its exit (None if the kernel has none).
    pub kvm: Option<KvmCounters>,
    /// The vCPU's TSC frequency in kHz, if KVM reports it (turns the result's
    /// cycles into time).
    pub tsc_khz: Option<u32>,
}

/// The shim ELF's bytes (read from its file if it has one).
pub(crate) fn image(s: &ShimConfig) -> Result<Cow<'_, [u8]>, crate::config::ConfigError> {
    Ok(match &s.image {
        ShimImage::Builtin => Cow::Borrowed(guest_shim::SHIM_ELF),
        ShimImage::Elf(b) => Cow::Borrowed(b),
        ShimImage::Path(p) => {
            Cow::Owned(
                std::fs::read(p).map_err(|source| crate::config::ConfigError::ShimRead {
                    path: p.clone(),
                    source,
                })?,
            )
        }
    })
}

/// Loads the shim ELF and its page tables into the boot region; returns the
/// entry point.
pub(crate) fn load(ram: &GuestRam, elf: &[u8], mem: u64) -> Result<u64, VmError> {
    let loaded = Elf::load(&ram.boot, None, &mut Cursor::new(elf), None).map_err(VmError::Shim)?;
    if loaded.kernel_end > STACKS_BASE {
        return Err(VmError::ShimTooLarge {
            end: loaded.kernel_end,
            limit: STACKS_BASE,
        });
    }
    crate::arch::write_tables(&ram.boot, ARENA_BASE + mem).map_err(VmError::Setup)?;
    Ok(loaded.kernel_load.0)
}

/// Sets up shim vCPU `i`: its mailbox (the workload's settings), CPUID, and
/// user-mode registers starting at `entry` on its own stack.
pub(crate) fn setup_vcpu(
    vcpu: &VcpuFd,
    i: usize,
    cfg: &VmConfig,
    shim: &ShimConfig,
    ram: &GuestRam,
    cpuid: &CpuId,
    entry: u64,
) -> Result<(), VmError> {
    let w = &shim.workload;
    let share = shim_share(cfg.mem, cfg.vcpus);
    let vc = VcpuConfig {
        magic: CONFIG_MAGIC,
        vcpu: i as u32,
        vcpus: cfg.vcpus as u32,
        workload: w.id,
        zipf: u32::from(w.zipf),
        base: ARENA_BASE + i as u64 * share,
        size: if w.size == 0 { share } else { w.size },
        ops: w.ops,
        seed: w.seed.wrapping_add(i as u64 * 0x1000_0001),
        zipf_theta_milli: w.theta_milli,
        corrupt: u32::from(w.corrupt),
        iters: w.iters,
        degree: w.degree,
        get_pct: w.get_pct,
        scan: u32::from(w.scan),
        stride: w.stride,
        streams: w.streams,
        ..Default::default()
    };
    let mbox = mailbox(i);
    crate::abi_io::write_config(&ram.boot, GuestAddress(mbox), vc).map_err(VmError::Setup)?;
    vcpu.set_cpuid2(cpuid).map_err(kvm_call("set CPUID"))?;
    let sregs = vcpu.get_sregs().map_err(kvm_call("get sregs"))?;
    vcpu.set_sregs(&crate::arch::user_mode_sregs(sregs))
        .map_err(kvm_call("set sregs"))?;
    let stack_top = STACKS_BASE + (i as u64 + 1) * STACK_SIZE;
    vcpu.set_regs(&crate::arch::user_mode_regs(
        entry, stack_top, i as u64, mbox,
    ))
    .map_err(kvm_call("set registers"))
}

fn mailbox(i: usize) -> u64 {
    MAILBOX_BASE + i as u64 * MAILBOX_SIZE
}

/// A shim vCPU's exits: hypercalls only. An unknown hypercall or any other
/// exit is an error; `HLT` ends the vCPU with exit code 0.
pub(crate) struct ShimExits {
    vcpu: usize,
    mbox: u64,
    mem: GuestMemoryMmap,
    result: Option<WorkloadResult>,
    exit_code: u32,
}

impl ShimExits {
    /// vCPU `vcpu`'s, reading its mailbox in `mem`.
    pub(crate) fn new(vcpu: usize, mem: GuestMemoryMmap) -> Self {
        ShimExits {
            vcpu,
            mbox: mailbox(vcpu),
            mem,
            result: None,
            exit_code: 0,
        }
    }

    fn mailbox_err(&self) -> impl FnOnce(vm_memory::GuestMemoryError) -> VcpuError {
        let vcpu = self.vcpu;
        move |source| VcpuError::Mailbox { vcpu, source }
    }

    fn unexpected(&self, what: String) -> Result<Step, VcpuError> {
        Err(VcpuError::Unexpected {
            vcpu: self.vcpu,
            what,
        })
    }

    fn hypercall(&mut self, data: &[u8]) -> Result<Step, VcpuError> {
        let mut nr = [0u8; 4];
        let n = data.len().min(4);
        nr[..n].copy_from_slice(&data[..n]);
        let cfg = crate::abi_io::read_config(&self.mem, GuestAddress(self.mbox))
            .map_err(self.mailbox_err())?;
        match u32::from_le_bytes(nr) {
            CALL_LOG => {
                let len = (cfg.log_len as u64).min(LOG_SIZE) as usize;
                let mut buf = vec![0u8; len];
                self.mem
                    .read_slice(&mut buf, GuestAddress(self.mbox + LOG_OFFSET))
                    .map_err(self.mailbox_err())?;
                // The guest decides how often it logs: at most 20 lines a
                // second pass (the count of the rest goes with the next one).
                static GUEST_LOG: fabric::ratelimit::RateLimiter =
                    fabric::ratelimit::RateLimiter::new(20);
                if let Some(suppressed) = GUEST_LOG.check() {
                    let more = if suppressed > 0 {
                        format!(" ({suppressed} guest log lines suppressed)")
                    } else {
                        String::new()
                    };
                    log::info!(
                        "guest vCPU {}: {}{more}",
                        self.vcpu,
                        String::from_utf8_lossy(&buf)
                    );
                }
                Ok(Step::Continue)
            }
            CALL_RESULT => {
                let at = GuestAddress(self.mbox + RESULT_OFFSET);
                let r = crate::abi_io::read_result(&self.mem, at).map_err(self.mailbox_err())?;
                self.result = Some(r);
                Ok(Step::Continue)
            }
            CALL_EXIT => {
                self.exit_code = cfg.exit_code;
                Ok(Step::Exit)
            }
            other => self.unexpected(format!("unknown hypercall {other}")),
        }
    }
}

impl GuestExits for ShimExits {
    type Outcome = VcpuOutcome;

    fn io_in(&mut self, port: u16, _: &mut [u8]) -> Result<Step, VcpuError> {
        self.unexpected(format!("IoIn({port:#x})"))
    }

    fn io_out(&mut self, port: u16, data: &[u8]) -> Result<Step, VcpuError> {
        if port == HYPERCALL_PORT {
            return self.hypercall(data);
        }
        self.unexpected(format!("IoOut({port:#x}, {data:?})"))
    }

    fn mmio_read(&mut self, addr: u64, _: &mut [u8]) -> Result<Step, VcpuError> {
        self.unexpected(format!("MmioRead({addr:#x})"))
    }

    fn mmio_write(&mut self, addr: u64, data: &[u8]) -> Result<Step, VcpuError> {
        if addr == DOORBELL_ADDR {
            return self.hypercall(data);
        }
        self.unexpected(format!("MmioWrite({addr:#x}, {data:?})"))
    }

    fn system_event(&mut self, kind: u32) -> Result<Step, VcpuError> {
        self.unexpected(format!("SystemEvent({kind})"))
    }

    fn halt(&mut self) -> Result<Step, VcpuError> {
        self.exit_code = 0;
        Ok(Step::Exit)
    }

    fn other(&mut self, what: String) -> Result<Step, VcpuError> {
        self.unexpected(what)
    }

    fn outcome(&mut self, vcpu: &VcpuFd) -> VcpuOutcome {
        VcpuOutcome {
            exit_code: self.exit_code,
            result: self.result.take(),
            kvm: KvmCounters::read(vcpu),
            tsc_khz: vcpu.get_tsc_khz().ok().filter(|&k| k > 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Memory holding vCPU 1's mailbox, its exit code set to `code`.
    fn mailbox_mem(code: u32) -> GuestMemoryMmap {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let c = VcpuConfig {
            exit_code: code,
            ..Default::default()
        };
        crate::abi_io::write_config(&mem, GuestAddress(mailbox(1)), c).unwrap();
        mem
    }

    #[test]
    fn hypercalls_log_exit_and_refuse_unknowns() {
        let mut s = ShimExits::new(1, mailbox_mem(7));
        let call = |nr: u32| nr.to_le_bytes();
        assert_eq!(
            s.io_out(HYPERCALL_PORT, &call(CALL_LOG)).unwrap(),
            Step::Continue
        );
        assert_eq!(
            s.mmio_write(DOORBELL_ADDR, &call(CALL_EXIT)).unwrap(),
            Step::Exit
        );
        assert_eq!(s.exit_code, 7);
        let e = s.io_out(HYPERCALL_PORT, &call(99)).unwrap_err();
        assert!(e.to_string().contains("unknown hypercall 99"), "{e}");
        assert!(matches!(
            s.io_out(0x80, &[0]),
            Err(VcpuError::Unexpected { vcpu: 1, .. })
        ));
        assert!(s.system_event(0).is_err());
    }

    #[test]
    fn a_halt_exits_with_code_zero() {
        let mut s = ShimExits::new(1, mailbox_mem(7));
        s.mmio_write(DOORBELL_ADDR, &CALL_EXIT.to_le_bytes())
            .unwrap();
        assert_eq!(s.halt().unwrap(), Step::Exit);
        assert_eq!(s.exit_code, 0);
    }
}
