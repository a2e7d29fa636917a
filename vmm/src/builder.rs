//! The one path that assembles a VM, whatever its guest: check the
//! [`VmConfig`], open /dev/kvm, create the VM and its memory, connect the
//! memory nodes and start the ExCache over them, set up the guest kind's part
//! (the shim's image and mailboxes, [`crate::guest::shim`]; Linux's kernel,
//! tables and devices, [`crate::linux`]) and the vCPUs: a [`Vmm`], which
//! [`Vmm::run`] runs to its end.

use crate::api::VmInfo;
use crate::config::{GuestConfig, VmConfig};
use crate::error::{VmError, kvm_call};
use crate::excache::ExCache;
use crate::excache::placement::Placement;
use crate::excache::stats::StatsSnapshot;
use crate::guest::shim::{self, ShimExits, VcpuOutcome};
use crate::linux::{self, GuestExit, vcpu::LinuxExits, vcpu::Machine};
use crate::memory::GuestRam;
use crate::vcpu::{GuestExits, Vcpu, VcpuEnd};
use fabric::ClientConfig;
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Kvm, VmFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::Duration;

/// What a run produced.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// How the guest ended.
    pub outcome: GuestOutcome,
    /// Cache statistics at the end.
    pub stats: StatsSnapshot,
    /// Wall time from the first vCPU start to the last exit.
    pub elapsed: Duration,
    /// The remote fetch service time's distribution at the end: (µs, share
    /// of fetches that took at most that long) at the bounds of
    /// [`fetch_cdf_bounds_us`], flat stretches cut to their ends (empty when
    /// there was no remote fetch).
    pub fetch_cdf: Vec<(f64, f64)>,
}

/// The bounds (µs) at which [`RunReport::fetch_cdf`] is sampled: 20 a decade,
/// from 1 µs to 1 s.
pub fn fetch_cdf_bounds_us() -> Vec<f64> {
    (0..=120).map(|i| 10f64.powf(f64::from(i) / 20.0)).collect()
}

/// The share of fetches at or below each bound of `bounds_us`, from the
/// cache's histogram; of a run of bounds with the same share only its ends
/// are kept (the flat parts below the fastest fetch and above the slowest).
fn fetch_cdf(cache: &ExCache, bounds_us: &[f64]) -> Vec<(f64, f64)> {
    let bounds_ns: Vec<u64> = bounds_us.iter().map(|b| (b * 1000.0) as u64).collect();
    let (below, count, _) = cache.fetch_latency(&bounds_ns);
    if count == 0 {
        return Vec::new();
    }
    let all: Vec<(f64, f64)> = bounds_us
        .iter()
        .zip(below)
        .map(|(&b, n)| (b, n as f64 / count as f64))
        .collect();
    flat_runs_to_ends(&all)
}

/// `points` less each point whose y equals both its neighbours'.
fn flat_runs_to_ends(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    (0..points.len())
        .filter(|&i| {
            let same = |j: Option<usize>| {
                j.and_then(|j| points.get(j))
                    .is_some_and(|p| p.1 == points[i].1)
            };
            !(same(i.checked_sub(1)) && same(Some(i + 1)))
        })
        .map(|i| points[i])
        .collect()
}

/// How the guest ended, by guest kind.
#[derive(Debug, Clone)]
pub enum GuestOutcome {
    /// Each shim vCPU that exited (in vCPU order; a vCPU stopped before its
    /// exit has none).
    Shim(Vec<VcpuOutcome>),
    /// How Linux ended.
    Linux(GuestExit),
}

/// The vCPUs, by guest kind.
enum Vcpus {
    Shim(Vec<Vcpu<ShimExits>>),
    Linux(Vec<Vcpu<LinuxExits>>, Arc<Machine>),
}

/// The vCPUs' run: how each ended, in vCPU order, and the run's time.
struct Ended<T> {
    ends: Vec<VcpuEnd<T>>,
    elapsed: Duration,
}

/// A built VM: its vCPUs, cache, KVM VM and memory, ready to run.
pub struct Vmm {
    // Fields drop in declaration order: the vCPUs and devices, then the cache
    // (whose threads are joined when it drops), then the VM, then guest RAM,
    // which KVM's memslots point into.
    vcpus: Option<Vcpus>,
    cache: Arc<ExCache>,
    vm: Arc<VmFd>,
    ram: GuestRam,
    info: VmInfo,
    api: crate::api::Endpoints,
    start_paused: bool,
}

/// Builds the VM `cfg` describes and runs it to its end. Setting `interrupt`
/// (from a signal handler thread) stops the vCPUs and ends the run with
/// [`VmError::Interrupted`].
pub fn run(cfg: &VmConfig, interrupt: &AtomicBool) -> Result<RunReport, VmError> {
    build(cfg)?.run(interrupt)
}

/// Checks `cfg` and builds its VM, vCPUs set up but not started.
pub fn build(cfg: &VmConfig) -> Result<Vmm, VmError> {
    cfg.validate()?;
    // What can fail without KVM or the memory nodes goes first: the shim image
    // is read, the disks are opened.
    let shim_image = match &cfg.guest {
        GuestConfig::Shim(s) => Some(shim::image(s)?),
        GuestConfig::Linux(_) => None,
    };
    let disks = match &cfg.guest {
        GuestConfig::Linux(l) => linux::open_disks(l)?,
        GuestConfig::Shim(_) => Vec::new(),
    };

    let kvm = Kvm::new().map_err(VmError::Kvm)?;
    let vm = Arc::new(kvm.create_vm().map_err(kvm_call("create VM"))?);
    let ram = match &cfg.guest {
        GuestConfig::Shim(_) => {
            let ram = GuestRam::new(cfg.mem)?;
            ram.register(&vm, cfg.cache.dirty_log)?;
            ram
        }
        GuestConfig::Linux(_) => {
            linux::setup_vm(&vm)?;
            let ram = GuestRam::linux(cfg.mem)?;
            ram.register_linux(&vm, cfg.cache.dirty_log)?;
            ram
        }
    };
    // The shim's image goes into the boot region, outside the cache: a bad
    // image is refused before the memory nodes are reached.
    let shim_entry = match &shim_image {
        Some(elf) => Some(shim::load(&ram, elf, cfg.mem)?),
        None => None,
    };

    // Without a given secret, the default is a fresh one for this run.
    let defaults = ClientConfig::default();
    let client_cfg = ClientConfig {
        vm_id: cfg.vm_id,
        link_model: cfg.link,
        auth_key: cfg.auth_key.clone(),
        vm_secret: cfg.vm_secret.clone().or(defaults.vm_secret.clone()),
        reply_timeout: cfg.node_timeout,
        ..defaults
    };
    let nodes = Placement::connect(
        &cfg.memnodes,
        &client_cfg,
        (cfg.mem / 4096) as usize,
        cfg.replicas,
    )
    .map_err(VmError::Memnode)?;
    let mut cache_cfg = cfg.cache.clone();
    // Linux's RAM is all behind the cache, and the VMM writes it (the loader,
    // the devices).
    cache_cfg.host_writes |= matches!(cfg.guest, GuestConfig::Linux(_));
    let cache = Arc::new(ExCache::start(
        ram.arena.clone(),
        cache_cfg,
        nodes,
        vm.clone(),
    )?);

    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_call("get supported CPUID"))?;
    let create = |i: usize| vm.create_vcpu(i as u64).map_err(kvm_call("create vCPU"));
    let vcpus = match &cfg.guest {
        GuestConfig::Shim(s) => {
            let entry = shim_entry.expect("the shim is loaded");
            let mut vcpus = Vec::with_capacity(cfg.vcpus);
            for i in 0..cfg.vcpus {
                let fd = create(i)?;
                shim::setup_vcpu(&fd, i, cfg, s, &ram, &cpuid, entry)?;
                vcpus.push(Vcpu::new(i, fd, ShimExits::new(i, ram.mem.clone())));
            }
            Vcpus::Shim(vcpus)
        }
        GuestConfig::Linux(l) => {
            // Kernel, initrd, tables, zero page: written through the cache.
            let entry = linux::load(&ram.mem, l, cfg.mem, cfg.vcpus)?;
            let machine = linux::machine(l, disks, &vm, &ram.mem)?;
            let mut vcpus = Vec::with_capacity(cfg.vcpus);
            for i in 0..cfg.vcpus {
                let fd = create(i)?;
                linux::setup_vcpu(&fd, i, cfg.vcpus, &cpuid, entry)?;
                vcpus.push(Vcpu::new(i, fd, LinuxExits::new(i, machine.clone())));
            }
            Vcpus::Linux(vcpus, machine)
        }
    };
    Ok(Vmm {
        vcpus: Some(vcpus),
        cache,
        vm,
        ram,
        info: VmInfo {
            id: cfg.vm_id,
            vcpus: cfg.vcpus,
            mem_bytes: cfg.mem,
            local_cache_bytes: cfg.cache.budget_pages as u64 * 4096,
            workload: cfg.workload_name(),
        },
        api: crate::api::Endpoints {
            sock: cfg.api_sock.clone(),
            metrics: cfg.metrics.clone(),
        },
        start_paused: cfg.start_paused,
    })
}

impl Vmm {
    /// Starts the vCPUs (paused if configured) and the control API, waits for
    /// the guest to end, a vCPU to fail, the cache to fail or `interrupt`, and
    /// shuts the VM down.
    pub fn run(mut self, interrupt: &AtomicBool) -> Result<RunReport, VmError> {
        let (outcome, elapsed) = match self.vcpus.take().expect("a VM runs once") {
            Vcpus::Shim(vcpus) => {
                let Ended { ends, elapsed } = self.run_vcpus(vcpus, interrupt)?;
                if interrupt.load(SeqCst) {
                    return Err(VmError::Interrupted);
                }
                let outcomes = ends
                    .into_iter()
                    .filter_map(|e| match e {
                        VcpuEnd::Exited(o) => Some(o),
                        VcpuEnd::Stopped => None,
                    })
                    .collect();
                (GuestOutcome::Shim(outcomes), elapsed)
            }
            Vcpus::Linux(vcpus, machine) => {
                let ended = self.run_vcpus(vcpus, interrupt);
                // No device touches guest memory once the cache stops serving
                // it: the I/O loop stops (and is joined) first.
                drop(machine.io.lock().unwrap().take());
                let Ended { elapsed, .. } = ended?;
                let exit = machine.exit.lock().unwrap().clone();
                match exit {
                    Some(e) => (GuestOutcome::Linux(e), elapsed),
                    None if interrupt.load(SeqCst) => return Err(VmError::Interrupted),
                    None => return Err(VmError::HaltedWithoutPowerOff),
                }
            }
        };
        let stats = self.cache.snapshot();
        let fetch_cdf = fetch_cdf(&self.cache, &fetch_cdf_bounds_us());
        self.shutdown();
        Ok(RunReport {
            outcome,
            stats,
            elapsed,
            fetch_cdf,
        })
    }

    /// Runs `vcpus` on their threads until each has returned; the first vCPU
    /// error, if any, is the run's.
    fn run_vcpus<G: GuestExits + 'static>(
        &self,
        vcpus: Vec<Vcpu<G>>,
        interrupt: &AtomicBool,
    ) -> Result<Ended<G::Outcome>, VmError> {
        let cache = self.cache.clone();
        let mut run = crate::vcpu_threads::start(
            vcpus,
            self.start_paused,
            &self.cache,
            self.api.any().then(|| (&self.api, self.info.clone())),
            move |_, mut vcpu: Vcpu<G>, ctl| vcpu.run(&cache, ctl),
        )?;
        // Wait for the guest to end, a vCPU to fail, the user, or the cache.
        run.wait(&self.cache, interrupt)?;
        // The API goes first: it holds the cache. (No kick reaches a vCPU
        // thread once it has returned: it leaves the run control first.)
        run.close_api();
        let elapsed = run.elapsed();
        let mut ends = Vec::new();
        let mut first_err = None;
        for (i, t) in std::mem::take(&mut run.threads).into_iter().enumerate() {
            match t.join() {
                Ok(Ok(end)) => ends.push(end),
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(p) => {
                    return Err(VmError::VcpuPanicked {
                        vcpu: i,
                        message: crate::vcpu_threads::panic_message(p.as_ref()),
                    });
                }
            }
        }
        match first_err {
            Some(e) => Err(e.into()),
            None => Ok(Ended { ends, elapsed }),
        }
    }

    /// Stops the cache (freeing the VM's pages on the memory nodes if nothing
    /// else holds it), then closes the VM, then unmaps guest RAM.
    fn shutdown(self) {
        let Vmm { cache, vm, ram, .. } = self;
        if let Ok(c) = Arc::try_unwrap(cache) {
            c.shutdown();
        }
        drop(vm);
        drop(ram);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cdf_keeps_only_the_ends_of_its_flat_stretches() {
        let p = |x: f64, y: f64| (x, y);
        let cdf = [
            p(1., 0.),
            p(2., 0.),
            p(3., 0.),
            p(4., 0.5),
            p(5., 1.),
            p(6., 1.),
            p(7., 1.),
        ];
        assert_eq!(
            flat_runs_to_ends(&cdf),
            vec![p(1., 0.), p(3., 0.), p(4., 0.5), p(5., 1.), p(7., 1.)]
        );
        assert!(flat_runs_to_ends(&[]).is_empty());
        let bounds = fetch_cdf_bounds_us();
        assert_eq!(bounds.len(), 121);
        assert!((bounds[20] - 10.0).abs() < 1e-9 && (bounds[120] - 1e6).abs() < 1e-3);
    }
}
