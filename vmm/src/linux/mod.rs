//! # Booting stock Linux
//!
//! `vmm run --kernel` builds a PC-like machine a distro kernel boots on without
//! changes: RAM from 0 ([`layout`]) entirely behind the ExCache, the kernel and
//! initrd loaded by linux-loader ([`boot`]), the 64-bit boot protocol
//! ([`cpu`]), ACPI tables for SMP, PCI and power-off ([`acpi`]), the in-kernel
//! IOAPIC/LAPICs and PIT, an 8250 console, and virtio-blk disks over PCI
//! ([`crate::devices`]).

pub mod acpi;
pub mod boot;
pub mod cpu;
pub mod devices;
pub mod layout;
pub mod vcpu;

use crate::devices::OverlapError;
use crate::devices::nbd_disk::NbdBackend;
pub use crate::devices::nbd_disk::{NbdUrl, NbdUrlError};
use crate::devices::virtio_blk::{BlockBackend, DiskError, FileBackend};
use crate::excache::placement::Placement;
use crate::excache::stats::StatsSnapshot;
use crate::excache::{CacheConfig, ExCache};
use crate::memory::GuestRam;
use crate::vm::VmError;
use fabric::{ClientConfig, LinkModel};
use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::Kvm;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;
pub use vcpu::GuestExit;

/// Where the serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Console {
    /// This process's stdout.
    Stdio,
    /// A file (created or truncated).
    File(PathBuf),
}

impl std::str::FromStr for Console {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stdio" => Ok(Console::Stdio),
            "" => Err("--console needs stdio or a file path".into()),
            p => Ok(Console::File(PathBuf::from(p))),
        }
    }
}

/// A `--disk` option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSpec {
    /// A local image file (`file:PATH[,ro]`).
    File {
        /// Its path.
        path: PathBuf,
        /// Read-only.
        read_only: bool,
    },
    /// An export of a storage node (`nbd://HOST:PORT/EXPORT[,ro]`).
    Nbd {
        /// Where.
        url: NbdUrl,
        /// Read-only.
        read_only: bool,
    },
}

impl std::str::FromStr for DiskSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (body, read_only) = match s.strip_suffix(",ro") {
            Some(b) => (b, true),
            None => (s, false),
        };
        if let Some(p) = body.strip_prefix("file:") {
            if p.is_empty() {
                return Err("--disk file: needs a path".into());
            }
            return Ok(DiskSpec::File {
                path: p.into(),
                read_only,
            });
        }
        if body.starts_with("nbd://") {
            return Ok(DiskSpec::Nbd {
                url: body.parse().map_err(|e: NbdUrlError| e.to_string())?,
                read_only,
            });
        }
        if body.contains("://") {
            return Err(format!(
                "unsupported disk {s:?}: use file:PATH[,ro] or nbd://HOST:PORT/EXPORT[,ro]"
            ));
        }
        Ok(DiskSpec::File {
            path: body.into(),
            read_only,
        })
    }
}

/// A Linux VM.
#[derive(Debug, Clone)]
pub struct LinuxConfig {
    /// Guest RAM in bytes.
    pub mem: u64,
    /// vCPUs.
    pub vcpus: usize,
    /// The local cache.
    pub cache: CacheConfig,
    /// Memory node addresses.
    pub memnodes: Vec<String>,
    /// Address-space id on the memory nodes.
    pub vm_id: u64,
    /// Emulated link to the memory nodes.
    pub link: LinkModel,
    /// Control API socket.
    pub api_sock: Option<PathBuf>,
    /// Start with the vCPUs paused (resumed through the API).
    pub start_paused: bool,
    /// bzImage or ELF vmlinux.
    pub kernel: PathBuf,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Serial console destination.
    pub console: Console,
    /// Disks, in PCI slot order.
    pub disks: Vec<DiskSpec>,
    /// Boot even on a software KVM (where guest kernel mode is emulated).
    pub allow_software_kvm: bool,
}

/// What a Linux run produced.
#[derive(Debug, Clone)]
pub struct LinuxReport {
    /// How the guest ended.
    pub exit: GuestExit,
    /// Cache statistics at the end.
    pub stats: StatsSnapshot,
    /// Wall time of the run.
    pub elapsed: Duration,
}

/// True when /dev/kvm is this machine's software nested KVM (kvm_pvm), on which
/// guest kernel mode is emulated instruction by instruction.
pub fn software_kvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

fn validate(cfg: &LinuxConfig) -> Result<(), VmError> {
    let c = |m: String| Err(VmError::Config(m));
    if cfg.mem % 4096 != 0 || cfg.mem < (64 << 20) {
        return c(format!(
            "--mem for a Linux guest must be a multiple of 4 KiB and at least 64M (got {})",
            cfg.mem
        ));
    }
    if cfg.mem > layout::MAX_RAM {
        return c(format!(
            "--mem of {} bytes is more than the {} GiB a Linux guest can have below the PCI hole in this version",
            cfg.mem,
            layout::MAX_RAM >> 30
        ));
    }
    cfg.cache.check_budget(cfg.mem)?;
    if cfg.vcpus == 0 || cfg.vcpus > 254 {
        return c(format!("--vcpus must be 1 to 254, got {}", cfg.vcpus));
    }
    if cfg.memnodes.is_empty() {
        return c("at least one --memnode is needed".into());
    }
    if cfg.cmdline.len() >= layout::CMDLINE_MAX {
        return c(format!(
            "--cmdline is {} bytes; at most {} fit",
            cfg.cmdline.len(),
            layout::CMDLINE_MAX - 1
        ));
    }
    // Files next: a missing kernel, a file that is not one, or an initrd that
    // cannot fit are named before anything else is set up.
    boot::probe_kernel(&cfg.kernel)
        .map_err(|e| VmError::Config(fabric::client::error_chain(&e)))?;
    if let Some(p) = &cfg.initrd {
        let size = std::fs::metadata(p)
            .map_err(|e| VmError::Config(format!("cannot read initrd {}: {e}", p.display())))?
            .len();
        if size + layout::HIMEM_START + (16 << 20) > cfg.mem {
            return c(format!(
                "initrd {} ({size} bytes) does not fit in --mem {} bytes next to the kernel",
                p.display(),
                cfg.mem
            ));
        }
    }
    for d in &cfg.disks {
        match d {
            DiskSpec::File { path, read_only } => drop(FileBackend::open(path, *read_only)?),
            // Reached in `run`, before KVM is touched (the address is checked by
            // the parser).
            DiskSpec::Nbd { .. } => {}
        }
    }
    if software_kvm() && !cfg.allow_software_kvm {
        return c("/dev/kvm here is a software nested KVM (kvm_pvm): guest kernel mode would be emulated instruction by instruction and a stock kernel would not finish booting; boot Linux in the nested test host (tests/nested/run) or on a machine with VT-x/AMD-V, or pass --allow-software-kvm to try anyway".into());
    }
    Ok(())
}

fn kvm_call(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::KvmCall { what, source }
}

impl From<DiskError> for VmError {
    fn from(e: DiskError) -> Self {
        VmError::Config(fabric::client::error_chain(&e))
    }
}

impl From<OverlapError> for VmError {
    fn from(e: OverlapError) -> Self {
        VmError::Config(e.to_string())
    }
}

/// Boots the kernel and runs until the guest powers off or resets, the user
/// interrupts, or a fatal error.
pub fn run(cfg: &LinuxConfig, interrupt: &AtomicBool) -> Result<LinuxReport, VmError> {
    validate(cfg)?;
    // Fail on unreadable files before touching KVM or the memory nodes.
    for (what, p) in
        std::iter::once(("kernel", &cfg.kernel)).chain(cfg.initrd.iter().map(|p| ("initrd", p)))
    {
        std::fs::metadata(p)
            .map_err(|e| VmError::Config(format!("cannot read {what} {}: {e}", p.display())))?;
    }
    let disks = cfg
        .disks
        .iter()
        .map(|d| -> Result<Box<dyn BlockBackend>, VmError> {
            Ok(match d {
                DiskSpec::File { path, read_only } => {
                    Box::new(FileBackend::open(path, *read_only)?)
                }
                DiskSpec::Nbd { url, read_only } => {
                    Box::new(NbdBackend::connect(url, *read_only).map_err(|e| {
                        VmError::Config(format!("disk {url}: {}", fabric::client::error_chain(&e)))
                    })?)
                }
            })
        })
        .collect::<Result<Vec<_>, _>>()?;

    // Declared before the VM, so dropped after it (locals drop in reverse
    // order of declaration) and after the cache, whose threads are joined when
    // it drops: KVM's memslots point into guest RAM.
    let ram: GuestRam;
    let kvm = Kvm::new().map_err(VmError::Kvm)?;
    let vm = Arc::new(kvm.create_vm().map_err(kvm_call("create VM"))?);
    vm.set_tss_address(0xfffb_d000)
        .map_err(kvm_call("set TSS address"))?;
    vm.create_irq_chip()
        .map_err(kvm_call("create the in-kernel irqchip"))?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(kvm_call("create the in-kernel PIT"))?;

    ram = GuestRam::linux(cfg.mem)?;
    ram.register_linux(&vm, cfg.cache.dirty_log)?;
    let client_cfg = ClientConfig {
        vm_id: cfg.vm_id,
        link_model: cfg.link,
        ..ClientConfig::default()
    };
    let nodes = Placement::connect(&cfg.memnodes, &client_cfg, (cfg.mem / 4096) as usize)
        .map_err(VmError::Memnode)?;
    let mut cache_cfg = cfg.cache.clone();
    cache_cfg.host_writes = true;
    let cache = ExCache::start(ram.arena.clone(), cache_cfg, nodes, vm.clone())?;
    let mem = ram.mem.clone();

    // Kernel, initrd, tables, zero page: written through the cache.
    let (loaded, header) = boot::load_kernel(&mem, &cfg.kernel).map_err(setup_err_chain)?;
    let initrd = match &cfg.initrd {
        Some(p) => Some(
            boot::load_initrd(
                &mem,
                p,
                cfg.mem,
                loaded.kernel_end,
                boot::initrd_addr_max(header.as_ref()),
            )
            .map_err(setup_err_chain)?,
        ),
        None => None,
    };
    cpu::write_tables(&mem).map_err(VmError::Setup)?;
    let rsdp = acpi::write_tables(&mem, cfg.vcpus).map_err(VmError::Setup)?;
    boot::write_boot_params(&mem, header, &cfg.cmdline, initrd, cfg.mem, rsdp)
        .map_err(setup_err_chain)?;

    let machine = Arc::new(devices::build(cfg, disks, &vm, &mem).map_err(setup_err_chain)?);

    // vCPUs.
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_call("get supported CPUID"))?;
    let mut vcpus = Vec::new();
    for i in 0..cfg.vcpus {
        let v = vm.create_vcpu(i as u64).map_err(kvm_call("create vCPU"))?;
        cpu::setup(&v, i, cfg.vcpus, &cpuid, loaded.entry).map_err(setup_err_chain)?;
        vcpus.push(v);
    }
    let cache = Arc::new(cache);
    let errors: Arc<Mutex<Option<vcpu::LinuxVcpuError>>> = Arc::new(Mutex::new(None));
    let info = crate::api::VmInfo {
        id: cfg.vm_id,
        vcpus: cfg.vcpus,
        mem_bytes: cfg.mem,
        local_cache_bytes: cfg.cache.budget_pages as u64 * 4096,
        workload: format!("linux {}", cfg.kernel.display()),
    };
    let (vcpu_cache, m, errs) = (cache.clone(), machine.clone(), errors.clone());
    let mut run = crate::vcpu_threads::start(
        vcpus,
        cfg.start_paused,
        &cache,
        cfg.api_sock.as_deref().map(|p| (p, info)),
        move |i, mut v, ctl| {
            if let Err(e) = vcpu::run(i, &mut v, &m, &vcpu_cache, ctl) {
                errs.lock().unwrap().get_or_insert(e);
                ctl.stop.store(true, SeqCst);
                ctl.kick_all();
            }
        },
    )?;
    // Wait for the guest to end, a vCPU to fail, the user, or the cache.
    run.wait(&cache, interrupt)?;
    // The API goes first: it holds the cache. (No kick reaches a vCPU thread
    // once it has returned: it leaves the run control first.)
    run.close_api();
    let elapsed = run.elapsed();
    for t in std::mem::take(&mut run.threads) {
        let _ = t.join();
    }
    // No device touches guest memory once the cache stops serving it.
    drop(machine.io.lock().unwrap().take());
    if let Some(e) = errors.lock().unwrap().take() {
        return Err(VmError::Config(fabric::client::error_chain(&e)));
    }
    let exit = machine.exit.lock().unwrap().clone();
    let exit = match exit {
        Some(e) => e,
        None if interrupt.load(SeqCst) => return Err(VmError::Interrupted),
        None => {
            return Err(VmError::Config(
                "every vCPU halted without powering off".into(),
            ));
        }
    };
    let stats = cache.snapshot();
    if let Ok(c) = Arc::try_unwrap(cache) {
        c.shutdown();
    }
    Ok(LinuxReport {
        exit,
        stats,
        elapsed,
    })
}

fn setup_err_chain(e: impl std::error::Error) -> VmError {
    VmError::Config(fabric::client::error_chain(&e))
}

impl DiskSpec {
    /// For logs.
    pub fn describe(&self) -> String {
        match self {
            DiskSpec::File { path, .. } => format!("file {}", path.display()),
            DiskSpec::Nbd { url, .. } => format!("storage node {url}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_and_console_options_parse() {
        assert_eq!(
            "file:/a/b.img,ro".parse::<DiskSpec>().unwrap(),
            DiskSpec::File {
                path: "/a/b.img".into(),
                read_only: true
            }
        );
        assert!("file:".parse::<DiskSpec>().is_err());
        assert_eq!(
            "nbd://h:1/x,ro".parse::<DiskSpec>().unwrap(),
            DiskSpec::Nbd {
                url: "nbd://h:1/x".parse().unwrap(),
                read_only: true
            }
        );
        assert!("nbd://h/x".parse::<DiskSpec>().is_err());
        assert!(
            "iscsi://h:1/x"
                .parse::<DiskSpec>()
                .unwrap_err()
                .contains("unsupported")
        );
        assert_eq!("stdio".parse::<Console>().unwrap(), Console::Stdio);
    }
}
