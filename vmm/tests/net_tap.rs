//! virtio-net on a real tap device, served on the I/O event loop: a frame the
//! guest puts on its transmit queue comes out of the tap (seen by a raw packet
//! socket on the host side), a frame sent into the tap from the host lands in a
//! receive buffer with its virtio-net header, and an oversized transmit chain
//! is dropped. Needs root (CAP_NET_ADMIN) and /dev/net/tun; without them it
//! fails, naming what is missing. (A Linux guest's TCP traffic over the same
//! device runs in the nested host's `net` scenario.)

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::Queue;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm::devices::virtio_irq::{MsiSink, VirtioInterrupt};
use vmm::devices::virtio_net::tap::Tap;
use vmm::devices::virtio_net::{HDR, MAX_FRAME, VirtioNet};
use vmm::devices::virtio_pci::VirtioDevice;
use vmm::event_loop::EventLoopBuilder;

const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x99];
const ETHERTYPE: u16 = 0x88b5; // local experimental

struct NoMsi;
impl MsiSink for NoMsi {
    fn send(&self, _: kvm_bindings::kvm_msi) -> Result<(), kvm_ioctls::Error> {
        Ok(())
    }
}

/// A raw packet socket on interface `name` (brought up first).
struct Packet(libc::c_int);

impl Packet {
    fn open(name: &str) -> Packet {
        let cname = std::ffi::CString::new(name).unwrap();
        // SAFETY: plain socket/ioctl/bind calls on fds this function owns, with
        // structs sized and initialized as the calls expect.
        unsafe {
            let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
            assert!(s >= 0);
            let mut ifr: libc::ifreq = std::mem::zeroed();
            std::ptr::copy_nonoverlapping(cname.as_ptr(), ifr.ifr_name.as_mut_ptr(), name.len());
            assert_eq!(libc::ioctl(s, libc::SIOCGIFFLAGS, &mut ifr), 0);
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            assert_eq!(
                libc::ioctl(s, libc::SIOCSIFFLAGS, &ifr),
                0,
                "bring {name} up"
            );
            libc::close(s);
            let p = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                ETHERTYPE.to_be() as libc::c_int,
            );
            assert!(
                p >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = ETHERTYPE.to_be();
            sll.sll_ifindex = libc::if_nametoindex(cname.as_ptr()) as i32;
            let r = libc::bind(
                p,
                &sll as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
            let tv = libc::timeval {
                tv_sec: 5,
                tv_usec: 0,
            };
            libc::setsockopt(
                p,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            );
            Packet(p)
        }
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: send(2) of a valid buffer on our socket.
        let n = unsafe { libc::send(self.0, frame.as_ptr() as *const _, frame.len(), 0) };
        assert_eq!(
            n as usize,
            frame.len(),
            "{}",
            std::io::Error::last_os_error()
        );
    }

    fn recv(&self) -> Vec<u8> {
        let mut b = vec![0u8; 65536];
        // SAFETY: recv(2) into a buffer of the given size.
        let n = unsafe { libc::recv(self.0, b.as_mut_ptr() as *mut _, b.len(), 0) };
        assert!(
            n > 0,
            "nothing arrived: {}",
            std::io::Error::last_os_error()
        );
        b.truncate(n as usize);
        b
    }
}

impl Drop for Packet {
    fn drop(&mut self) {
        // SAFETY: closing our own fd.
        unsafe { libc::close(self.0) };
    }
}

fn frame(dst: [u8; 6], src: [u8; 6], fill: u8, len: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.resize(len, fill);
    f
}

#[test]
fn frames_cross_a_real_tap_both_ways_and_oversized_ones_are_dropped() {
    let name = format!("svt{}", std::process::id() % 100_000);
    let tap = Tap::open(&name).unwrap_or_else(|e| {
        panic!(
            "this test needs root (CAP_NET_ADMIN) and /dev/net/tun to create tap {name}: {}",
            fabric::client::error_chain(&e)
        )
    });
    let pkt = Packet::open(&name);
    let net = Arc::new(Mutex::new(VirtioNet::new(tap, MAC).unwrap()));
    let counters = net.lock().unwrap().counters.clone();
    let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap(),
    ));
    let rxq = MockSplitQueue::create(mem, GuestAddress(0), 64);
    let txq = MockSplitQueue::create(mem, GuestAddress(0x1_0000), 64);
    let (rx_evt, tx_evt) = {
        let mut n = net.lock().unwrap();
        let e = n.queue_events();
        let evts = (e[0].try_clone().unwrap(), e[1].try_clone().unwrap());
        let queues: Vec<Queue> = vec![rxq.create_queue().unwrap(), txq.create_queue().unwrap()];
        n.activate(
            queues,
            mem.clone(),
            Arc::new(VirtioInterrupt::new(Arc::new(NoMsi), 2)),
        );
        evts
    };
    let mut lb = EventLoopBuilder::new("test-net").unwrap();
    lb.add(net.clone());
    let io = lb.start().unwrap();

    // Guest -> host: header + frame in two descriptors.
    let out = frame([0xff; 6], MAC, 0xab, 300);
    mem.write_slice(&[0u8; HDR], GuestAddress(0x10_0000))
        .unwrap();
    mem.write_slice(&out, GuestAddress(0x10_1000)).unwrap();
    txq.build_desc_chain(&[
        RawDescriptor::from(Descriptor::new(0x10_0000, HDR as u32, 0, 0)),
        RawDescriptor::from(Descriptor::new(0x10_1000, out.len() as u32, 0, 0)),
    ])
    .unwrap();
    tx_evt.write(1).unwrap();
    let got = pkt.recv();
    assert_eq!(got, out, "the frame the guest sent");

    // Host -> guest: eight receive buffers, then a frame into the tap.
    let bufs: Vec<RawDescriptor> = (0..8u64)
        .map(|i| {
            RawDescriptor::from(Descriptor::new(
                0x20_0000 + i * 0x1000,
                (HDR + 1514) as u32,
                VRING_DESC_F_WRITE as u16,
                0,
            ))
        })
        .collect();
    rxq.add_desc_chains(&bufs, 0).unwrap();
    rx_evt.write(1).unwrap();
    let inbound = frame(MAC, [0x02, 0, 0, 0, 0, 1], 0xcd, 200);
    pkt.send(&inbound);
    let used_idx = |q: &MockSplitQueue<'_, GuestMemoryMmap>| -> u16 {
        mem.read_obj(q.used_addr().unchecked_add(2)).unwrap()
    };
    let t = Instant::now();
    let found = loop {
        // Other traffic (IPv6 neighbour discovery) may arrive too: look at
        // every used buffer for ours.
        let n = used_idx(&rxq);
        let hit = (0..n as u64).find_map(|i| {
            let e = rxq.used_addr().unchecked_add(4 + 8 * i);
            let id: u32 = mem.read_obj(e).unwrap();
            let len: u32 = mem.read_obj(e.unchecked_add(4)).unwrap();
            let mut b = vec![0u8; len as usize];
            mem.read_slice(&mut b, GuestAddress(0x20_0000 + id as u64 * 0x1000))
                .unwrap();
            (b.len() == HDR + inbound.len() && b[HDR..] == inbound[..]).then_some(b)
        });
        if let Some(b) = hit {
            break b;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the frame never reached a receive buffer ({n} used)"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut hdr = [0u8; HDR];
    hdr[HDR - 2] = 1; // num_buffers
    assert_eq!(found[..HDR], hdr);

    // An oversized transmit chain is dropped, not sent.
    let dropped = counters.dropped.load(std::sync::atomic::Ordering::SeqCst);
    txq.add_desc_chains(
        &[RawDescriptor::from(Descriptor::new(
            0x40_0000,
            (HDR + MAX_FRAME + 1) as u32,
            0,
            0,
        ))],
        2,
    )
    .unwrap();
    tx_evt.write(1).unwrap();
    let t = Instant::now();
    while counters.dropped.load(std::sync::atomic::Ordering::SeqCst) == dropped {
        assert!(t.elapsed() < Duration::from_secs(5), "not dropped");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(used_idx(&txq), 2);
    drop(io);
}
