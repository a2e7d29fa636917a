//! virtio-net on a tap device (`--net tap=NAME[,mac=MAC]`): queue 0 receives,
//! queue 1 transmits. Served on the I/O event loop like virtio-blk: a transmit
//! notification (an ioeventfd) makes the loop copy each frame out of guest
//! memory to the tap; the tap becoming readable (edge-triggered) makes it copy
//! frames into the receive buffers the guest made available, until the tap is
//! empty or the guest has no buffer left (the frame then waits, and the next
//! receive notification resumes). Every frame is preceded by the 12-byte
//! `virtio_net_hdr_v1`; no offloads are offered, so the header is zero but for
//! `num_buffers` = 1.
//!
//! Bounds: a frame is at most [`MAX_FRAME`] bytes either way; a transmit chain
//! that is longer, has no data, or points outside guest memory is dropped
//! (returned with length 0, counted, logged rate-limited), and a received frame
//! that does not fit its buffer is dropped the same way. One frame is held at a
//! time: the VMM allocates nothing per frame.

pub mod tap;

use super::chain::{read_regions, write_regions};
use super::virtio_irq::VirtioInterrupt;
use super::virtio_pci::{F_VERSION_1, VirtioDevice};
use event_manager::{EventOps, Events, MutEventSubscriber};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use tap::{Tap, TapError};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

const F_MAC: u64 = 1 << 5;
const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
/// Bytes of `virtio_net_hdr_v1`.
pub const HDR: usize = 12;
/// Largest frame (a 64 KiB IP packet with its Ethernet and VLAN headers).
pub const MAX_FRAME: usize = 65_536 + 18;

static GUEST_ERRORS: fabric::ratelimit::RateLimiter = fabric::ratelimit::RateLimiter::new(2);

/// A `--net` option: `tap=NAME[,mac=XX:XX:XX:XX:XX:XX]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSpec {
    /// The tap device.
    pub tap: String,
    /// The guest's MAC address (default: 52:54:00:12:34:(56 + index)).
    pub mac: Option<[u8; 6]>,
}

/// Why a `--net` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetSpecError {
    /// No `tap=`.
    #[error("--net {0:?}: needs tap=NAME (e.g. --net tap=tap0,mac=52:54:00:12:34:56)")]
    NoTap(String),
    /// A bad interface name.
    #[error("--net {0:?}: tap=NAME must be an interface name of 1 to 15 characters")]
    Name(String),
    /// A bad MAC address.
    #[error(
        "--net {0:?}: mac= must be six hex bytes like 52:54:00:12:34:56, not a multicast address"
    )]
    Mac(String),
    /// An unknown key.
    #[error("--net {0:?}: unknown key {1:?} (tap=, mac=)")]
    Key(String, String),
}

impl std::str::FromStr for NetSpec {
    type Err = NetSpecError;
    fn from_str(s: &str) -> Result<Self, NetSpecError> {
        let (mut tap, mut mac) = (None, None);
        for kv in s.split(',') {
            match kv.split_once('=') {
                Some(("tap", n)) => {
                    tap::check_name(n).map_err(|_| NetSpecError::Name(s.into()))?;
                    tap = Some(n.to_string());
                }
                Some(("mac", m)) => mac = Some(parse_mac(m).ok_or(NetSpecError::Mac(s.into()))?),
                _ => return Err(NetSpecError::Key(s.into(), kv.into())),
            }
        }
        Ok(NetSpec {
            tap: tap.ok_or_else(|| NetSpecError::NoTap(s.into()))?,
            mac,
        })
    }
}

impl std::fmt::Display for NetSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "tap={}", self.tap)?;
        if let Some(m) = self.mac {
            write!(f, ",mac={}", format_mac(&m))?;
        }
        Ok(())
    }
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    (parts.next().is_none() && mac[0] & 1 == 0).then_some(mac)
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Device setup failures.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The tap device.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// A queue eventfd.
    #[error("cannot create a virtio-net queue eventfd")]
    EventFd(#[source] io::Error),
}

struct Active {
    rx: Queue,
    tx: Queue,
    mem: GuestMemoryMmap,
    irq: Arc<VirtioInterrupt>,
}

/// Frames and drops, for logs and tests.
#[derive(Debug, Default)]
pub struct NetCounters {
    /// Frames the guest sent.
    pub tx_frames: AtomicU64,
    /// Frames delivered to the guest.
    pub rx_frames: AtomicU64,
    /// Frames dropped (malformed chains, frames too large for their buffer).
    pub dropped: AtomicU64,
}

/// The virtio-net device.
pub struct VirtioNet {
    tap: Tap,
    mac: [u8; 6],
    queue_evts: [EventFd; 2],
    active: Option<Active>,
    /// One frame (header included) and its length while it waits for a buffer.
    frame: Vec<u8>,
    pending: Option<usize>,
    /// Frames and drops.
    pub counters: Arc<NetCounters>,
}

impl VirtioNet {
    /// A device on `tap` with address `mac`.
    pub fn new(tap: Tap, mac: [u8; 6]) -> Result<Self, NetError> {
        let evt = || EventFd::new(libc::EFD_NONBLOCK).map_err(NetError::EventFd);
        Ok(VirtioNet {
            tap,
            mac,
            queue_evts: [evt()?, evt()?],
            active: None,
            frame: vec![0; HDR + MAX_FRAME],
            pending: None,
            counters: Arc::default(),
        })
    }

    /// Sends every frame the guest queued; true if any chain was used.
    fn transmit(&mut self) -> bool {
        let Some(a) = &mut self.active else {
            return false;
        };
        let mem = a.mem.clone();
        let mut used = false;
        while let Some(chain) = a.tx.pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            match readable(chain, &mem) {
                Some((regions, len)) if len > HDR && len <= HDR + MAX_FRAME => {
                    let n = read_regions(&mem, &regions, &mut self.frame[..len]);
                    match self.tap.write_frame(&self.frame[HDR..n]) {
                        Ok(_) => {
                            self.counters.tx_frames.fetch_add(1, Relaxed);
                        }
                        Err(e) => {
                            self.counters.dropped.fetch_add(1, Relaxed);
                            fabric::warn_limited!(
                                GUEST_ERRORS,
                                "tap {}: cannot send a frame: {e}",
                                self.tap.name()
                            );
                        }
                    }
                }
                _ => {
                    self.counters.dropped.fetch_add(1, Relaxed);
                    fabric::warn_limited!(
                        GUEST_ERRORS,
                        "dropping a malformed virtio-net transmit chain (no frame, over {MAX_FRAME} bytes, or outside guest memory)"
                    );
                }
            }
            if let Err(e) = a.tx.add_used(&mem, head, 0) {
                fabric::warn_limited!(GUEST_ERRORS, "cannot complete a virtio-net chain: {e}");
            }
            used = true;
        }
        used
    }

    /// Moves frames from the tap into receive buffers; true if any was used.
    fn receive(&mut self) -> bool {
        let Some(a) = &mut self.active else {
            return false;
        };
        let mem = a.mem.clone();
        let mut used = false;
        loop {
            let len = match self.pending {
                Some(len) => len,
                None => match self.tap.read_frame(&mut self.frame[HDR..]) {
                    Ok(n) => {
                        // virtio_net_hdr_v1: no offloads; num_buffers = 1.
                        self.frame[..HDR].fill(0);
                        self.frame[HDR - 2] = 1;
                        HDR + n
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        fabric::warn_limited!(
                            GUEST_ERRORS,
                            "tap {}: cannot receive: {e}",
                            self.tap.name()
                        );
                        break;
                    }
                },
            };
            let Some(chain) = a.rx.pop_descriptor_chain(&mem) else {
                // No buffer: the frame waits for the guest's next one.
                self.pending = Some(len);
                break;
            };
            self.pending = None;
            let head = chain.head_index();
            let written = match writable(chain, &mem) {
                Some((regions, room)) if room >= len => {
                    write_regions(&mem, &regions, &self.frame[..len]).then_some(len)
                }
                _ => None,
            };
            let n = match written {
                Some(n) => {
                    self.counters.rx_frames.fetch_add(1, Relaxed);
                    n as u32
                }
                None => {
                    self.counters.dropped.fetch_add(1, Relaxed);
                    fabric::warn_limited!(
                        GUEST_ERRORS,
                        "dropping a received frame: its virtio-net buffer is too small or outside guest memory"
                    );
                    0
                }
            };
            if let Err(e) = a.rx.add_used(&mem, head, n) {
                fabric::warn_limited!(GUEST_ERRORS, "cannot complete a virtio-net chain: {e}");
            }
            used = true;
        }
        used
    }

    fn serve(&mut self, rx: bool, tx: bool) {
        let tx_used = tx && self.transmit();
        let rx_used = rx && self.receive();
        let Some(a) = &mut self.active else { return };
        for (q, queue, was_used) in [(RX, &mut a.rx, rx_used), (TX, &mut a.tx, tx_used)] {
            if was_used && queue.needs_notification(&a.mem).unwrap_or(true) {
                a.irq.queue_used(q);
            }
        }
    }
}

/// The device-readable part of a chain (checked inside guest memory) and its
/// length; `None` if a descriptor is outside guest memory.
fn readable(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
) -> Option<(Vec<(GuestAddress, usize)>, usize)> {
    regions(chain.readable(), mem)
}

/// The device-writable part of a chain, as [`readable`].
fn writable(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
) -> Option<(Vec<(GuestAddress, usize)>, usize)> {
    regions(chain.writable(), mem)
}

fn regions(
    descs: impl Iterator<Item = virtio_queue::desc::split::Descriptor>,
    mem: &GuestMemoryMmap,
) -> Option<(Vec<(GuestAddress, usize)>, usize)> {
    let mut out = Vec::new();
    let mut total = 0usize;
    for d in descs {
        let len = d.len() as usize;
        if !mem.check_range(d.addr(), len) {
            return None;
        }
        total = total.checked_add(len)?;
        if total > HDR + MAX_FRAME + 4096 {
            return None;
        }
        out.push((d.addr(), len));
    }
    Some((out, total))
}

impl VirtioDevice for VirtioNet {
    fn device_type(&self) -> u16 {
        1
    }

    fn pci_class(&self) -> u32 {
        0x02_00_00 // network, Ethernet
    }

    fn features(&self) -> u64 {
        F_VERSION_1 | F_MAC
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // mac[6], then status (not offered) and the rest zero.
        let mut cfg = [0u8; 0x20];
        cfg[..6].copy_from_slice(&self.mac);
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn activate(&mut self, queues: Vec<Queue>, mem: GuestMemoryMmap, irq: Arc<VirtioInterrupt>) {
        let mut q = queues.into_iter();
        if let (Some(rx), Some(tx)) = (q.next(), q.next()) {
            self.active = Some(Active { rx, tx, mem, irq });
            self.serve(true, true);
        }
    }

    fn reset(&mut self) {
        self.active = None;
        self.pending = None;
    }
}

impl MutEventSubscriber for VirtioNet {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        let (mut rx, mut tx) = (false, false);
        if fd == self.queue_evts[RX].as_raw_fd() {
            let _ = self.queue_evts[RX].read();
            rx = true;
        } else if fd == self.queue_evts[TX].as_raw_fd() {
            let _ = self.queue_evts[TX].read();
            tx = true;
        } else {
            rx = true;
        }
        self.serve(rx, tx);
    }

    fn init(&mut self, ops: &mut EventOps) {
        let name = self.tap.name().to_string();
        for e in [
            Events::new(&self.queue_evts[RX], EventSet::IN),
            Events::new(&self.queue_evts[TX], EventSet::IN),
            Events::new(&self.tap, EventSet::IN | EventSet::EDGE_TRIGGERED),
        ] {
            if let Err(err) = ops.add(e) {
                log::error!("tap {name}: cannot watch an eventfd: {err}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_options_parse_and_bad_ones_are_named() {
        let n: NetSpec = "tap=tap0,mac=52:54:00:ab:cd:ef".parse().unwrap();
        assert_eq!(n.tap, "tap0");
        assert_eq!(n.mac, Some([0x52, 0x54, 0, 0xab, 0xcd, 0xef]));
        assert_eq!(n.to_string(), "tap=tap0,mac=52:54:00:ab:cd:ef");
        assert_eq!("tap=t1".parse::<NetSpec>().unwrap().mac, None);
        for bad in [
            "",
            "mac=52:54:00:ab:cd:ef",
            "tap=",
            "tap=a-name-far-too-long",
            "tap=t,mac=01:00:00:00:00:00",
            "tap=t,mac=52:54:00",
            "tap=t,speed=10",
        ] {
            let e = bad.parse::<NetSpec>().unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }
}
