//! What a VM is made of: one [`VmConfig`] for every guest kind, built by the
//! command line (and, serialized, by anything else that starts VMs), checked by
//! [`VmConfig::validate`] before anything is set up.

use crate::excache::{BudgetError, CacheConfig};
pub use crate::linux::config::{
    Console, ConsoleError, DiskSpec, DiskSpecError, LinuxConfig, LinuxConfigError, MAX_PCI_DEVICES,
    NetSpec,
};
use crate::workload::Workload;
use fabric::LinkModel;
use guest_shim::abi::{ARENA_BASE, MAX_MAPPED, MAX_VCPUS};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Most vCPUs a Linux guest can have (its ACPI tables name APIC ids below 255).
pub const LINUX_MAX_VCPUS: usize = 254;

/// Everything a VM needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmConfig {
    /// Guest RAM in bytes (for the shim: its arena).
    pub mem: u64,
    /// vCPUs.
    pub vcpus: usize,
    /// The local cache.
    pub cache: CacheConfig,
    /// Memory nodes, each `ADDR[,zone=NAME]`.
    pub memnodes: Vec<String>,
    /// Copies of each page on distinct memory nodes (`--replicas`).
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// Address-space id on the memory nodes.
    pub vm_id: u64,
    /// Emulated link to the memory nodes.
    #[serde(with = "crate::serde_str::as_string")]
    pub link: LinkModel,
    /// How long a memory node may leave a request unanswered before it
    /// counts as failed (a stopped or partitioned node must not hang the
    /// guest).
    #[serde(default = "default_node_timeout")]
    pub node_timeout: std::time::Duration,
    /// Serve the control API on this Unix socket.
    pub api_sock: Option<PathBuf>,
    /// Serve Prometheus metrics over TCP on this loopback address (or port).
    #[serde(default)]
    pub metrics: Option<String>,
    /// Start with the vCPUs paused (resumed through the API).
    pub start_paused: bool,
    /// What runs in the VM.
    pub guest: GuestConfig,
    /// The cluster key the memory nodes are reached with (never serialized:
    /// a key is given as a file, `--auth-key`).
    #[serde(skip)]
    pub auth_key: Option<fabric::auth::Key>,
    /// The VM's secret, which the memory nodes bind this VM id to (never
    /// serialized: given as a file, `--vm-secret`). `None`: a fresh one for
    /// this run.
    #[serde(skip)]
    pub vm_secret: Option<fabric::auth::Key>,
}

/// The default `node_timeout`: a memory node answers in microseconds to
/// milliseconds, so half a second without an answer is a failure, and a
/// stopped or partitioned node costs the guest at most that.
pub fn default_node_timeout() -> std::time::Duration {
    std::time::Duration::from_millis(500)
}

/// The default `replicas`: one copy (a node's failure loses its pages).
pub fn default_replicas() -> usize {
    1
}

/// The guest kinds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuestConfig {
    /// The freestanding guest shim running a workload on every vCPU.
    Shim(ShimConfig),
    /// A stock Linux kernel.
    Linux(LinuxConfig),
}

/// A guest-shim VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShimConfig {
    /// The shim ELF.
    pub image: ShimImage,
    /// The workload every vCPU runs.
    pub workload: Workload,
}

/// Where the shim ELF comes from.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShimImage {
    /// The one built into this binary.
    Builtin,
    /// A file, read when the VM is built.
    Path(PathBuf),
    /// These bytes.
    Elf(Vec<u8>),
}

/// Why a configuration was refused; each names the option at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Shim guest RAM that is zero or not whole pages.
    #[error("--mem must be a positive multiple of 4 KiB (got {0})")]
    Mem(u64),
    /// More shim guest RAM than the shim maps.
    #[error("--mem of {mem} bytes exceeds the {} GiB the guest shim maps", .max >> 30)]
    ShimMemTooLarge {
        /// Asked.
        mem: u64,
        /// The most the shim maps, in bytes.
        max: u64,
    },
    /// `--local-cache` does not fit the guest RAM.
    #[error(transparent)]
    Budget(#[from] BudgetError),
    /// Too few or too many vCPUs.
    #[error("--vcpus must be 1 to {max}, got {got}")]
    Vcpus {
        /// The most this guest kind can have.
        max: usize,
        /// Asked.
        got: usize,
    },
    /// No memory node.
    #[error("at least one --memnode is needed")]
    NoMemnode,
    /// A `--memnode` value is malformed.
    #[error(transparent)]
    Memnode(#[from] crate::excache::replicas::NodeSpecError),
    /// `--replicas` out of range or above the nodes given.
    #[error(
        "--replicas must be 1 to {max} and at most the number of --memnode ({nodes}), got {got}"
    )]
    Replicas {
        /// The most copies.
        max: usize,
        /// Nodes given.
        nodes: usize,
        /// Asked.
        got: usize,
    },
    /// The workload does not fit a vCPU's share of guest RAM.
    #[error(
        "workload size {size} exceeds each vCPU's share of guest RAM ({share} bytes of --mem {mem} over {vcpus} vCPUs)"
    )]
    WorkloadTooLarge {
        /// Its size.
        size: u64,
        /// Each vCPU's share.
        share: u64,
        /// Guest RAM.
        mem: u64,
        /// vCPUs.
        vcpus: usize,
    },
    /// The workload is not whole pages.
    #[error("workload size must be a multiple of 4 KiB, got {0}")]
    WorkloadNotPages(u64),
    /// The `--shim` file cannot be read.
    #[error("cannot read guest shim {}", .path.display())]
    ShimRead {
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A Linux guest's options.
    #[error(transparent)]
    Linux(#[from] LinuxConfigError),
    /// The metrics address is not on loopback.
    #[error(transparent)]
    Metrics(#[from] crate::api::ApiError),
}

/// Each vCPU's share of a shim guest's arena: `mem` over `vcpus`, in whole pages.
pub fn shim_share(mem: u64, vcpus: usize) -> u64 {
    (mem / vcpus.max(1) as u64) & !4095
}

impl VmConfig {
    /// Checks the configuration: sizes, counts, and (for Linux) that the
    /// kernel, initrd and disk files are there and fit, before anything is set
    /// up.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(m) = &self.metrics {
            crate::api::loopback_addr(m)?;
        }
        match &self.guest {
            GuestConfig::Shim(s) => self.validate_shim(s),
            GuestConfig::Linux(l) => self.validate_linux(l),
        }
    }

    fn validate_shim(&self, s: &ShimConfig) -> Result<(), ConfigError> {
        if self.mem == 0 || self.mem % 4096 != 0 {
            return Err(ConfigError::Mem(self.mem));
        }
        if ARENA_BASE + self.mem > MAX_MAPPED {
            return Err(ConfigError::ShimMemTooLarge {
                mem: self.mem,
                max: MAX_MAPPED,
            });
        }
        self.cache.check_budget(self.mem)?;
        self.check_vcpus(MAX_VCPUS as usize)?;
        self.check_memnodes()?;
        let share = shim_share(self.mem, self.vcpus);
        let size = s.workload.size;
        if size > share {
            return Err(ConfigError::WorkloadTooLarge {
                size,
                share,
                mem: self.mem,
                vcpus: self.vcpus,
            });
        }
        if size % 4096 != 0 {
            return Err(ConfigError::WorkloadNotPages(size));
        }
        Ok(())
    }

    fn validate_linux(&self, l: &LinuxConfig) -> Result<(), ConfigError> {
        LinuxConfig::check_mem(self.mem)?;
        self.cache.check_budget(self.mem)?;
        self.check_vcpus(LINUX_MAX_VCPUS)?;
        self.check_memnodes()?;
        l.check_files(self.mem)?;
        Ok(())
    }

    fn check_vcpus(&self, max: usize) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > max {
            return Err(ConfigError::Vcpus {
                max,
                got: self.vcpus,
            });
        }
        Ok(())
    }

    fn check_memnodes(&self) -> Result<(), ConfigError> {
        if self.memnodes.is_empty() {
            return Err(ConfigError::NoMemnode);
        }
        for m in &self.memnodes {
            m.parse::<crate::excache::replicas::NodeSpec>()?;
        }
        let max = crate::excache::replicas::MAX_REPLICAS;
        if self.replicas == 0 || self.replicas > max || self.replicas > self.memnodes.len() {
            return Err(ConfigError::Replicas {
                max,
                nodes: self.memnodes.len(),
                got: self.replicas,
            });
        }
        Ok(())
    }

    /// What `GET /vm` reports as the workload.
    pub fn workload_name(&self) -> String {
        match &self.guest {
            GuestConfig::Shim(s) => s.workload.name.clone(),
            GuestConfig::Linux(l) => format!("linux {}", l.kernel.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::excache::EvictPolicy;

    #[test]
    fn disk_and_console_options_parse() {
        assert_eq!(
            "file:/a/b.img,ro".parse::<DiskSpec>().unwrap(),
            DiskSpec::File {
                path: "/a/b.img".into(),
                read_only: true
            }
        );
        assert_eq!("file:".parse::<DiskSpec>(), Err(DiskSpecError::NoPath));
        assert_eq!(
            "nbd://h:1/x,ro".parse::<DiskSpec>().unwrap(),
            DiskSpec::Nbd {
                url: "nbd://h:1/x".parse().unwrap(),
                read_only: true
            }
        );
        assert!(matches!(
            "nbd://h/x".parse::<DiskSpec>(),
            Err(DiskSpecError::Nbd(_))
        ));
        assert!(
            "iscsi://h:1/x"
                .parse::<DiskSpec>()
                .unwrap_err()
                .to_string()
                .contains("unsupported")
        );
        assert_eq!("stdio".parse::<Console>().unwrap(), Console::Stdio);
        assert_eq!("".parse::<Console>(), Err(ConsoleError::Empty));
    }

    #[test]
    fn disk_and_console_round_trip_through_their_strings() {
        for s in [
            "file:/a/b.img,ro",
            "file:/c.img",
            "nbd://h:1/x,ro",
            "nbd://h:1/y",
        ] {
            assert_eq!(s.parse::<DiskSpec>().unwrap().to_string(), s);
        }
        for s in ["stdio", "/tmp/console.log"] {
            assert_eq!(s.parse::<Console>().unwrap().to_string(), s);
        }
    }

    fn shim_config() -> VmConfig {
        VmConfig {
            mem: 64 << 20,
            vcpus: 2,
            cache: CacheConfig {
                budget_pages: 1024,
                policy: EvictPolicy::Clock,
                prefetch: 256,
                prefetcher: Default::default(),
                handlers: 4,
                remove_events: false,
                host_writes: false,
                dirty_log: false,
                rebalance: 0,
                encrypt_pages: false,
                rereplicate_rate: 1000,
            },
            memnodes: vec!["127.0.0.1:1".into()],
            replicas: 1,
            vm_id: 7,
            link: "latency=2us".parse().unwrap(),
            node_timeout: std::time::Duration::from_millis(750),
            api_sock: None,
            metrics: None,
            start_paused: false,
            guest: GuestConfig::Shim(ShimConfig {
                image: ShimImage::Builtin,
                workload: "seq:size=1M".parse().unwrap(),
            }),
            auth_key: Some(fabric::auth::Key::generate().unwrap()),
            vm_secret: Some(fabric::auth::Key::generate().unwrap()),
        }
    }

    #[test]
    fn a_config_survives_json() {
        let mut cfg = shim_config();
        cfg.guest = GuestConfig::Linux(LinuxConfig {
            kernel: "/boot/vmlinuz".into(),
            initrd: None,
            cmdline: "console=ttyS0".into(),
            console: Console::Stdio,
            disks: vec!["nbd://h:1/x,ro".parse().unwrap()],
            nets: vec!["tap=tap0,mac=52:54:00:00:00:01".parse().unwrap()],
            allow_software_kvm: false,
        });
        let j = serde_json::to_value(&cfg).unwrap();
        assert_eq!(j["link"], cfg.link.to_string());
        assert_eq!(j["guest"]["linux"]["disks"][0], "nbd://h:1/x,ro");
        let back: VmConfig = serde_json::from_value(j).unwrap();
        assert_eq!(back.link, cfg.link);
        let GuestConfig::Linux(l) = back.guest else {
            panic!("not linux")
        };
        assert_eq!(l.disks, vec!["nbd://h:1/x,ro".parse().unwrap()]);
        assert_eq!(l.nets[0].to_string(), "tap=tap0,mac=52:54:00:00:00:01");
        let j = serde_json::to_value(shim_config()).unwrap();
        // The key is never serialized.
        assert!(j.get("auth_key").is_none(), "{j}");
        assert!(j.get("vm_secret").is_none(), "{j}");
        let back: VmConfig = serde_json::from_value(j).unwrap();
        assert!(back.auth_key.is_none());
        assert!(back.vm_secret.is_none());
        let GuestConfig::Shim(s) = back.guest else {
            panic!("not shim")
        };
        assert_eq!(s.workload.size, 1 << 20);
    }

    #[test]
    fn shim_configs_are_checked() {
        let cfg = shim_config();
        cfg.validate().unwrap();
        let mut c = cfg.clone();
        c.mem = 4097;
        assert!(matches!(c.validate(), Err(ConfigError::Mem(4097))));
        let mut c = cfg.clone();
        c.memnodes.clear();
        let e = c.validate().unwrap_err();
        assert_eq!(e.to_string(), "at least one --memnode is needed");
        let mut c = cfg.clone();
        c.vcpus = 0;
        assert!(matches!(c.validate(), Err(ConfigError::Vcpus { .. })));
        let mut c = cfg;
        c.guest = GuestConfig::Shim(ShimConfig {
            image: ShimImage::Builtin,
            workload: "seq:size=40M".parse().unwrap(),
        });
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("workload size")
        );
    }
}
