//! What a Linux guest is made of ([`LinuxConfig`], part of
//! [`crate::config::VmConfig`]), its options' syntax (`--console`, `--disk`), and
//! the checks only a Linux guest needs ([`LinuxConfig::check_mem`],
//! [`LinuxConfig::check_files`]).

use super::boot::{self, BootError};
use super::layout;
use crate::devices::nbd_disk::{NbdUrl, NbdUrlError};
use crate::devices::virtio_blk::{DiskError, FileBackend};
pub use crate::devices::virtio_net::NetSpec;
use crate::serde_str::serde_as_string;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// PCI slots for disks and network devices (bus 0 has 32; slot 0 is the host
/// bridge).
pub const MAX_PCI_DEVICES: usize = 31;

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
    /// An export of a storage node (`nbd://HOST:PORT/EXPORT[,ro]`, or over TLS
    /// `nbds://HOST:PORT/EXPORT,ca=FILE[,cert=FILE,key=FILE][,tls-name=NAME][,ro]`).
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
    #[error(
        "unsupported disk {0:?}: use file:PATH[,ro], nbd://HOST:PORT/EXPORT[,ro] or nbds://HOST:PORT/EXPORT,ca=FILE[,cert=FILE,key=FILE][,ro]"
    )]
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
        if body.starts_with("nbd://") || body.starts_with("nbds://") {
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

serde_as_string!(Console, DiskSpec, NetSpec);

/// Why a Linux guest's configuration was refused; each names the option at fault.
#[derive(Debug, thiserror::Error)]
pub enum LinuxConfigError {
    /// Linux guest RAM that is too small or not whole pages.
    #[error("--mem for a Linux guest must be a multiple of 4 KiB and at least 64M (got {0})")]
    Mem(u64),
    /// More Linux guest RAM than fits below the PCI hole.
    #[error(
        "--mem of {mem} bytes is more than the {} GiB a Linux guest can have below the PCI hole in this version",
        .max >> 30
    )]
    MemTooLarge {
        /// Asked.
        mem: u64,
        /// The most there can be, in bytes.
        max: u64,
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
    /// An `nbds://` disk's certificate or key files cannot be used.
    #[error("--disk {url}: TLS files refused")]
    DiskTls {
        /// The disk.
        url: String,
        /// Why.
        #[source]
        source: nbd_proto::tls::TlsError,
    },
    /// More disks and network devices than PCI slots.
    #[error("{0} --disk and --net devices; at most {MAX_PCI_DEVICES} fit on the PCI bus")]
    TooManyDevices(usize),
    /// /dev/kvm is a software KVM and the user did not insist.
    #[error(
        "/dev/kvm here is a software nested KVM (kvm_pvm): guest kernel mode would be emulated instruction by instruction and a stock kernel would not finish booting; boot Linux in the nested test host (tests/nested/run) or on a machine with VT-x/AMD-V, or pass --allow-software-kvm to try anyway"
    )]
    SoftwareKvm,
}

impl LinuxConfig {
    /// Checks `mem` bytes of guest RAM for a Linux guest.
    pub fn check_mem(mem: u64) -> Result<(), LinuxConfigError> {
        if mem % 4096 != 0 || mem < (64 << 20) {
            return Err(LinuxConfigError::Mem(mem));
        }
        if mem > layout::MAX_RAM {
            return Err(LinuxConfigError::MemTooLarge {
                mem,
                max: layout::MAX_RAM,
            });
        }
        Ok(())
    }

    /// Checks the command line, then the files: a missing kernel, a file that
    /// is not one, an initrd that cannot fit next to it in `mem` bytes, a disk
    /// image that cannot be opened are named before anything is set up.
    pub fn check_files(&self, mem: u64) -> Result<(), LinuxConfigError> {
        if self.cmdline.len() >= layout::CMDLINE_MAX {
            return Err(LinuxConfigError::CmdlineTooLong {
                len: self.cmdline.len(),
                max: layout::CMDLINE_MAX - 1,
            });
        }
        boot::probe_kernel(&self.kernel)?;
        if let Some(p) = &self.initrd {
            let size = std::fs::metadata(p)
                .map_err(|source| LinuxConfigError::InitrdRead {
                    path: p.clone(),
                    source,
                })?
                .len();
            if size + layout::HIMEM_START + (16 << 20) > mem {
                return Err(LinuxConfigError::InitrdTooLarge {
                    path: p.clone(),
                    size,
                    mem,
                });
            }
        }
        let devices = self.disks.len() + self.nets.len();
        if devices > MAX_PCI_DEVICES {
            return Err(LinuxConfigError::TooManyDevices(devices));
        }
        for d in &self.disks {
            match d {
                DiskSpec::File { path, read_only } => drop(FileBackend::open(path, *read_only)?),
                // Connected when the VM is built, before KVM is touched (the
                // address is checked by the parser); TLS files are read now.
                DiskSpec::Nbd { url, .. } => {
                    if let Some(t) = &url.tls {
                        t.load().map_err(|source| LinuxConfigError::DiskTls {
                            url: url.to_string(),
                            source,
                        })?;
                    }
                }
            }
        }
        if super::software_kvm() && !self.allow_software_kvm {
            return Err(LinuxConfigError::SoftwareKvm);
        }
        Ok(())
    }
}
