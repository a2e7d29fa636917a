//! Assembling and running a guest-shim VM: memory, the ExCache over the memory
//! nodes, the shim image, vCPUs; then waiting for the vCPUs or a fatal error.

use crate::arch;
use crate::excache::placement::Placement;
use crate::excache::stats::StatsSnapshot;
use crate::excache::{BudgetError, CacheConfig, CacheError, ExCache, PathError};
use crate::memory::{GuestRam, MemoryError};
use crate::vcpu::{self, VcpuError, VcpuOutcome};
use crate::workload::Workload;
use fabric::{ClientConfig, ClientError, LinkModel};
use guest_shim::abi::{
    ARENA_BASE, CONFIG_MAGIC, MAILBOX_BASE, MAILBOX_SIZE, MAX_MAPPED, MAX_VCPUS, STACK_SIZE,
    STACKS_BASE, VcpuConfig,
};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::Kvm;
use linux_loader::loader::{KernelLoader, elf::Elf};
use std::io::Cursor;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::Duration;
use vm_memory::GuestAddress;

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Guest RAM (the arena) in bytes.
    pub mem: u64,
    /// vCPUs.
    pub vcpus: usize,
    /// The local cache.
    pub cache: CacheConfig,
    /// Memory node addresses.
    pub memnodes: Vec<String>,
    /// The shim ELF.
    pub shim: Vec<u8>,
    /// The workload.
    pub workload: Workload,
    /// Address-space id on the memory nodes.
    pub vm_id: u64,
    /// Emulated link to the memory nodes.
    pub link: LinkModel,
    /// Serve the control API on this Unix socket.
    pub api_sock: Option<std::path::PathBuf>,
    /// Start with the vCPUs paused (resumed through the API).
    pub start_paused: bool,
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// Each vCPU's outcome.
    pub vcpus: Vec<VcpuOutcome>,
    /// Cache statistics at the end.
    pub stats: StatsSnapshot,
    /// Wall time from the first vCPU start to the last exit.
    pub elapsed: Duration,
}

/// Run failures.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The configuration is inconsistent.
    #[error("{0}")]
    Config(String),
    /// `--local-cache` does not fit the guest RAM.
    #[error(transparent)]
    Budget(#[from] BudgetError),
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
    /// Writing guest setup data failed.
    #[error("cannot write guest setup data")]
    Setup(#[source] vm_memory::GuestMemoryError),
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
    /// The run was interrupted (SIGINT/SIGTERM).
    #[error("interrupted; the VM was stopped")]
    Interrupted,
}

fn validate(cfg: &VmConfig) -> Result<u64, VmError> {
    let c = |m: String| Err(VmError::Config(m));
    if cfg.mem == 0 || cfg.mem % 4096 != 0 {
        return c(format!(
            "--mem must be a positive multiple of 4 KiB (got {})",
            cfg.mem
        ));
    }
    if ARENA_BASE + cfg.mem > MAX_MAPPED {
        return c(format!(
            "--mem of {} bytes exceeds the {} GiB the guest shim maps",
            cfg.mem,
            MAX_MAPPED >> 30
        ));
    }
    cfg.cache.check_budget(cfg.mem)?;
    if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS as usize {
        return c(format!(
            "--vcpus must be 1 to {MAX_VCPUS}, got {}",
            cfg.vcpus
        ));
    }
    if cfg.memnodes.is_empty() {
        return c("at least one --memnode is needed".into());
    }
    let share = (cfg.mem / cfg.vcpus as u64) & !4095;
    if cfg.workload.size > share {
        return c(format!(
            "workload size {} exceeds each vCPU's share of guest RAM ({share} bytes of --mem {} over {} vCPUs)",
            cfg.workload.size, cfg.mem, cfg.vcpus
        ));
    }
    if cfg.workload.size % 4096 != 0 {
        return c(format!(
            "workload size must be a multiple of 4 KiB, got {}",
            cfg.workload.size
        ));
    }
    Ok(share)
}

/// Builds the VM, runs the workload on every vCPU and returns the report. Setting
/// `interrupt` (from a signal handler thread) stops the vCPUs and ends the run
/// with [`VmError::Interrupted`].
pub fn run(cfg: &VmConfig, interrupt: &AtomicBool) -> Result<RunReport, VmError> {
    let share = validate(cfg)?;
    // Declared before the VM, so dropped after it (locals drop in reverse
    // order of declaration) and after the cache, whose threads are joined when
    // it drops: KVM's memslots point into guest RAM.
    let ram: GuestRam;
    let kvm = Kvm::new().map_err(VmError::Kvm)?;
    let vm = Arc::new(kvm.create_vm().map_err(|source| VmError::KvmCall {
        what: "create VM",
        source,
    })?);
    ram = GuestRam::new(cfg.mem)?;
    ram.register(&vm, cfg.cache.dirty_log)?;

    let loaded =
        Elf::load(&ram.boot, None, &mut Cursor::new(&cfg.shim), None).map_err(VmError::Shim)?;
    if loaded.kernel_end > STACKS_BASE {
        return Err(VmError::Config(format!(
            "the guest shim image ends at {:#x}, past its {STACKS_BASE:#x} limit",
            loaded.kernel_end
        )));
    }
    let entry = loaded.kernel_load.0;
    arch::write_tables(&ram.boot, ARENA_BASE + cfg.mem).map_err(VmError::Setup)?;

    let client_cfg = ClientConfig {
        vm_id: cfg.vm_id,
        link_model: cfg.link,
        ..ClientConfig::default()
    };
    let nodes = Placement::connect(&cfg.memnodes, &client_cfg, (cfg.mem / 4096) as usize)
        .map_err(VmError::Memnode)?;
    let cache = ExCache::start(ram.arena.clone(), cfg.cache.clone(), nodes, vm.clone())?;

    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|source| VmError::KvmCall {
            what: "get supported CPUID",
            source,
        })?;
    let mut vcpus = Vec::new();
    for i in 0..cfg.vcpus {
        let w = &cfg.workload;
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
            ..Default::default()
        };
        let mbox = MAILBOX_BASE + i as u64 * MAILBOX_SIZE;
        crate::abi_io::write_config(&ram.boot, GuestAddress(mbox), vc).map_err(VmError::Setup)?;
        let vcpu = vm
            .create_vcpu(i as u64)
            .map_err(|source| VmError::KvmCall {
                what: "create vCPU",
                source,
            })?;
        vcpu.set_cpuid2(&cpuid).map_err(|source| VmError::KvmCall {
            what: "set CPUID",
            source,
        })?;
        let sregs = vcpu.get_sregs().map_err(|source| VmError::KvmCall {
            what: "get sregs",
            source,
        })?;
        vcpu.set_sregs(&arch::user_mode_sregs(sregs))
            .map_err(|source| VmError::KvmCall {
                what: "set sregs",
                source,
            })?;
        let stack_top = STACKS_BASE + (i as u64 + 1) * STACK_SIZE;
        vcpu.set_regs(&arch::user_mode_regs(entry, stack_top, i as u64, mbox))
            .map_err(|source| VmError::KvmCall {
                what: "set registers",
                source,
            })?;
        vcpus.push(vcpu);
    }

    let cache = Arc::new(cache);
    let mem = Arc::new(ram.mem.clone());
    let info = crate::api::VmInfo {
        id: cfg.vm_id,
        vcpus: cfg.vcpus,
        mem_bytes: cfg.mem,
        local_cache_bytes: cfg.cache.budget_pages as u64 * 4096,
        workload: cfg.workload.name.clone(),
    };
    let vcpu_cache = cache.clone();
    let mut run = crate::vcpu_threads::start(
        vcpus,
        cfg.start_paused,
        &cache,
        cfg.api_sock.as_deref().map(|p| (p, info)),
        move |i, mut vcpu, ctl| {
            let r = vcpu::run(i, &mut vcpu, &mem, &vcpu_cache, ctl);
            if r.is_err() {
                ctl.stop.store(true, SeqCst);
            }
            r
        },
    )?;
    run.wait(&cache, interrupt)?;
    if interrupt.load(SeqCst) {
        return Err(VmError::Interrupted);
    }
    run.close_api();
    let elapsed = run.elapsed();
    let mut outcomes = Vec::new();
    let mut first_err = None;
    for t in run.threads {
        match t.join() {
            Ok(Ok(o)) => outcomes.push(o),
            Ok(Err(VcpuError::Stopped(_))) => {}
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(_) => return Err(VmError::Config("a vCPU thread panicked".into())),
        }
    }
    if let Some(e) = first_err {
        return Err(e.into());
    }
    let stats = cache.snapshot();
    if let Ok(c) = Arc::try_unwrap(cache) {
        c.shutdown();
    }
    Ok(RunReport {
        vcpus: outcomes,
        stats,
        elapsed,
    })
}
