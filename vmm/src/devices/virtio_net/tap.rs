//! A tap device: Ethernet frames to and from the host's network stack, one per
//! `read`/`write` on a file descriptor of `/dev/net/tun` (`IFF_TAP | IFF_NO_PI`,
//! non-blocking). The device is created if it does not exist (that needs
//! `CAP_NET_ADMIN`; it then goes away when `vmm` exits), or attached to if it
//! was made beforehand (`ip tuntap add NAME mode tap`, `tunctl -t NAME`).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
/// Longest interface name (IFNAMSIZ - 1).
pub const MAX_NAME: usize = 15;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Why a tap could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name is empty, too long, or has characters an interface name cannot.
    #[error(
        "tap device name {0:?} is not an interface name (1 to 15 characters, no '/', ':' or whitespace)"
    )]
    Name(String),
    /// `/dev/net/tun` cannot be opened.
    #[error("cannot open /dev/net/tun (is the tun module loaded?)")]
    Open(#[source] io::Error),
    /// The kernel refused the device.
    #[error("cannot create or attach tap device {name} (creating one needs CAP_NET_ADMIN)")]
    SetIff {
        /// The device.
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// An open tap device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// Checks an interface name.
pub fn check_name(name: &str) -> Result<(), TapError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if ok {
        Ok(())
    } else {
        Err(TapError::Name(name.to_string()))
    }
}

impl Tap {
    /// Opens (creating if need be) tap device `name`.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        check_name(name)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::Open)?;
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req`
        // is (name, flags, padding to its 40 bytes), valid for the call.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) };
        if r < 0 {
            return Err(TapError::SetIff {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(Tap {
            file,
            name: name.to_string(),
        })
    }

    /// Its interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (`WouldBlock` when none is waiting).
    pub fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    /// Writes one frame.
    pub fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.file.write(frame)
    }
}

use std::os::unix::fs::OpenOptionsExt;

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_checked() {
        assert!(check_name("tap0").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a-name-far-too-long").is_err());
        assert!(check_name("ta p").is_err());
        assert!(check_name("../x").is_err());
    }
}
