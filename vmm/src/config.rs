//! What a VM is made of: one [`VmConfig`] for every guest kind, built by the
//! command line (and, serialized, by anything else that starts VMs), checked by
//! [`VmConfig::validate`] before anything is set up.

use crate::devices::nbd_disk::{NbdUrl, NbdUrlError};
use crate::devices::virtio_blk::{DiskError, FileBackend};
pub use crate::devices::virtio_net::NetSpec;

/// PCI slots for disks and network devices (bus 0 has 32; slot 0 is the host
/// bridge).
pub const MAX_PCI_DEVICES: usize = 31;
use crate::excache::{BudgetError, CacheConfig};
use crate::linux::boot::{self, BootError};
use crate::linux::layout;
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
    /// Memory node addresses.
    pub memnodes: Vec<String>,
    /// Address-space id on the memory nodes.
    pub vm_id: u64,
    /// Emulated link to the memory nodes.
    #[serde(with = "as_string")]
    pub link: LinkModel,
    /// Serve the control API on this Unix socket.
    pub api_sock: Option<PathBuf>,
    /// Start with the vCPUs paused (resumed through the API).
    pub start_paused: bool,
    /// What runs in the VM.
    pub guest: GuestConfig,
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

/// A Linux VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinuxConfig {
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
    /// Network devices on tap devices, in PCI slot order after the disks.
    #[serde(default)]
    pub nets: Vec<NetSpec>,
    /// Boot even on a software KVM (where guest kernel mode is emulated).
    pub allow_software_kvm: bool,
}

/// Where the serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Console {
    /// This process's stdout.
    Stdio,
    /// A file (created or truncated).
    File(PathBuf),
}

/// Why a `--console` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConsoleError {
    /// Nothing given.
    #[error("--console needs stdio or a file path")]
    Empty,
}

impl std::str::FromStr for Console {
    type Err = ConsoleError;
    fn from_str(s: &str) -> Result<Self, ConsoleError> {
        match s {
            "stdio" => Ok(Console::Stdio),
            "" => Err(ConsoleError::Empty),
            p => Ok(Console::File(PathBuf::from(p))),
        }
    }
}

impl std::fmt::Display for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Console::Stdio => f.write_str("stdio"),
            Console::File(p) => write!(f, "{}", p.display()),
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

/// Why a `--disk` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiskSpecError {
    /// `file:` without a path.
    #[error("--disk file: needs a path")]
    NoPath,
    /// A malformed `nbd://` address.
    #[error(transparent)]
    Nbd(#[from] NbdUrlError),
    /// Another URL scheme.
    #[error("unsupported disk {0:?}: use file:PATH[,ro] or nbd://HOST:PORT/EXPORT[,ro]")]
    Unsupported(String),
}

impl std::str::FromStr for DiskSpec {
    type Err = DiskSpecError;
    fn from_str(s: &str) -> Result<Self, DiskSpecError> {
        let (body, read_only) = match s.strip_suffix(",ro") {
            Some(b) => (b, true),
            None => (s, false),
        };
        if let Some(p) = body.strip_prefix("file:") {
            if p.is_empty() {
                return Err(DiskSpecError::NoPath);
            }
            return Ok(DiskSpec::File {
                path: p.into(),
                read_only,
            });
        }
        if body.starts_with("nbd://") {
            return Ok(DiskSpec::Nbd {
                url: body.parse()?,
                read_only,
            });
        }
        if body.contains("://") {
            return Err(DiskSpecError::Unsupported(s.to_string()));
        }
        Ok(DiskSpec::File {
            path: body.into(),
            read_only,
        })
    }
}

impl std::fmt::Display for DiskSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let read_only = match self {
            DiskSpec::File { path, read_only } => {
                write!(f, "file:{}", path.display())?;
                read_only
            }
            DiskSpec::Nbd { url, read_only } => {
                write!(f, "{url}")?;
                read_only
            }
        };
        if *read_only {
            f.write_str(",ro")
        } else {
            Ok(())
        }
    }
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

/// Serde through `Display` and `FromStr`: the option's own syntax.
mod as_string {
    use serde::{Deserialize, Deserializer, Serializer, de};
    use std::fmt::Display;
    use std::str::FromStr;

    /// Writes `v` as its `Display` string.
    pub fn serialize<T: Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    /// Parses a string with `FromStr`.
    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

macro_rules! serde_as_string {
    ($($t:ty),*) => {$(
        impl Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                as_string::serialize(self, s)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                as_string::deserialize(d)
            }
        }
    )*};
}
serde_as_string!(Console, DiskSpec, NetSpec);

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
    /// Linux guest RAM that is too small or not whole pages.
    #[error("--mem for a Linux guest must be a multiple of 4 KiB and at least 64M (got {0})")]
    LinuxMem(u64),
    /// More Linux guest RAM than fits below the PCI hole.
    #[error(
        "--mem of {mem} bytes is more than the {} GiB a Linux guest can have below the PCI hole in this version",
        .max >> 30
    )]
    LinuxMemTooLarge {
        /// Asked.
        mem: u64,
        /// The most there can be, in bytes.
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
    /// The kernel command line is too long.
    #[error("--cmdline is {len} bytes; at most {max} fit")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The most that fits.
        max: usize,
    },
    /// The kernel is missing or not a kernel.
    #[error(transparent)]
    Kernel(#[from] BootError),
    /// The initrd cannot be read.
    #[error("cannot read initrd {}", .path.display())]
    InitrdRead {
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The initrd cannot fit in guest RAM.
    #[error("initrd {} ({size} bytes) does not fit in --mem {mem} bytes next to the kernel", .path.display())]
    InitrdTooLarge {
        /// Its path.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Guest RAM.
        mem: u64,
    },
    /// A disk image cannot be used.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// /dev/kvm is a software KVM and the user did not insist.
    #[error(
        "/dev/kvm here is a software nested KVM (kvm_pvm): guest kernel mode would be emulated instruction by instruction and a stock kernel would not finish booting; boot Linux in the nested test host (tests/nested/run) or on a machine with VT-x/AMD-V, or pass --allow-software-kvm to try anyway"
    )]
    SoftwareKvm,
    /// More disks and network devices than PCI slots.
    #[error("{0} --disk and --net devices; at most {MAX_PCI_DEVICES} fit on the PCI bus")]
    TooManyDevices(usize),
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
        if self.mem % 4096 != 0 || self.mem < (64 << 20) {
            return Err(ConfigError::LinuxMem(self.mem));
        }
        if self.mem > layout::MAX_RAM {
            return Err(ConfigError::LinuxMemTooLarge {
                mem: self.mem,
                max: layout::MAX_RAM,
            });
        }
        self.cache.check_budget(self.mem)?;
        self.check_vcpus(LINUX_MAX_VCPUS)?;
        self.check_memnodes()?;
        if l.cmdline.len() >= layout::CMDLINE_MAX {
            return Err(ConfigError::CmdlineTooLong {
                len: l.cmdline.len(),
                max: layout::CMDLINE_MAX - 1,
            });
        }
        // Files next: a missing kernel, a file that is not one, or an initrd
        // that cannot fit are named before anything else is set up.
        boot::probe_kernel(&l.kernel)?;
        if let Some(p) = &l.initrd {
            let size = std::fs::metadata(p)
                .map_err(|source| ConfigError::InitrdRead {
                    path: p.clone(),
                    source,
                })?
                .len();
            if size + layout::HIMEM_START + (16 << 20) > self.mem {
                return Err(ConfigError::InitrdTooLarge {
                    path: p.clone(),
                    size,
                    mem: self.mem,
                });
            }
        }
        if l.disks.len() + l.nets.len() > MAX_PCI_DEVICES {
            return Err(ConfigError::TooManyDevices(l.disks.len() + l.nets.len()));
        }
        for d in &l.disks {
            match d {
                DiskSpec::File { path, read_only } => drop(FileBackend::open(path, *read_only)?),
                // Connected when the VM is built, before KVM is touched (the
                // address is checked by the parser).
                DiskSpec::Nbd { .. } => {}
            }
        }
        if crate::linux::software_kvm() && !l.allow_software_kvm {
            return Err(ConfigError::SoftwareKvm);
        }
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
                handlers: 4,
                remove_events: false,
                host_writes: false,
                dirty_log: false,
                rebalance: 0,
            },
            memnodes: vec!["127.0.0.1:1".into()],
            vm_id: 7,
            link: "latency=2us".parse().unwrap(),
            api_sock: None,
            start_paused: false,
            guest: GuestConfig::Shim(ShimConfig {
                image: ShimImage::Builtin,
                workload: "seq:size=1M".parse().unwrap(),
            }),
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
        let back: VmConfig = serde_json::from_value(j).unwrap();
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
