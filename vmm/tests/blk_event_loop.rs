//! virtio-blk devices on the VMM's I/O event loop, against a real storage node
//! process: a node that stops answering (SIGSTOP) does not stall the loop (a
//! second disk on the same loop keeps completing requests, and a notification
//! returns at once, as a vCPU's would), its request completes with IOERR after
//! the I/O timeout, and the node is named once in the log, not once per request.
//! A reconnect to a node that hangs in the handshake does not stall the loop
//! either; the request that waited for it succeeds once the node answers.
//! (The Linux-guest side of this runs in the nested host's disk scenarios.)

use splitvisor_tests::{Daemon, sibling_bin};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::Queue;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm::devices::block::FileBackend;
use vmm::devices::nbd_disk::{IO_TIMEOUT, NbdBackend, NbdUrl};
use vmm::devices::virtio_blk::VirtioBlk;
use vmm::devices::virtio_irq::{MsiSink, VirtioInterrupt};
use vmm::devices::virtio_pci::VirtioDevice;
use vmm::event_loop::EventLoopBuilder;

const VMM: &str = env!("CARGO_BIN_EXE_vmm");

/// Collects log lines.
struct Capture(Mutex<Vec<String>>);

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, r: &log::Record) {
        let line = format!("{} {}", r.level(), r.args());
        eprintln!("{line}");
        self.0.lock().unwrap().push(line);
    }
    fn flush(&self) {}
}

static LOG: Capture = Capture(Mutex::new(Vec::new()));

struct NoMsi;
impl MsiSink for NoMsi {
    fn send(&self, _: kvm_bindings::kvm_msi) -> Result<(), kvm_ioctls::Error> {
        Ok(())
    }
}

/// One disk's queue in its own guest memory.
struct Disk {
    mem: &'static GuestMemoryMmap,
    mq: MockSplitQueue<'static, GuestMemoryMmap>,
    notify: vmm_sys_util::eventfd::EventFd,
    next: u16,
}

impl Disk {
    fn new(blk: &Arc<Mutex<VirtioBlk>>) -> Disk {
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap(),
        ));
        let mq = MockSplitQueue::create(mem, GuestAddress(0), 256);
        let q: Queue = mq.create_queue().unwrap();
        let mut b = blk.lock().unwrap();
        let notify = b.queue_events()[0].try_clone().unwrap();
        b.activate(
            vec![q],
            mem.clone(),
            Arc::new(VirtioInterrupt::new(Arc::new(NoMsi), 1)),
        );
        Disk {
            mem,
            mq,
            notify,
            next: 0,
        }
    }

    /// Queues a 4 KiB read (`ty` 0) or write (1) of sector `sector`, notifies,
    /// and returns the status byte's address.
    fn request(&mut self, ty: u32, sector: u64) -> GuestAddress {
        let n = self.next as u64;
        let (hdr, data, status) = (
            0x10_0000 + 16 * n,
            0x20_0000 + 4096 * n,
            GuestAddress(0x18_0000 + n),
        );
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&ty.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        self.mem.write_obj(0xeeu8, status).unwrap();
        let data_flags = if ty == 0 {
            VRING_DESC_F_WRITE as u16
        } else {
            0
        };
        let d = self.next;
        let nf = VRING_DESC_F_NEXT as u16;
        let chain = [
            RawDescriptor::from(Descriptor::new(hdr, 16, nf, d + 1)),
            RawDescriptor::from(Descriptor::new(data, 4096, data_flags | nf, d + 2)),
            RawDescriptor::from(Descriptor::new(status.0, 1, VRING_DESC_F_WRITE as u16, 0)),
        ];
        self.mq.add_desc_chains(&chain, d).unwrap();
        self.next += 3;
        let t = Instant::now();
        self.notify.write(1).unwrap();
        assert!(
            t.elapsed() < Duration::from_millis(100),
            "a notification must return at once"
        );
        status
    }

    fn used(&self) -> u16 {
        self.mem
            .read_obj(self.mq.used_addr().unchecked_add(2))
            .unwrap()
    }

    /// Waits until `n` requests were used; their status bytes can then be read.
    fn wait_used(&self, n: u16, limit: Duration) -> Duration {
        let t = Instant::now();
        while self.used() < n {
            assert!(
                t.elapsed() < limit,
                "{} of {n} requests completed after {limit:?}",
                self.used()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        t.elapsed()
    }

    fn status(&self, at: GuestAddress) -> u8 {
        self.mem.read_obj(at).unwrap()
    }
}

#[test]
fn a_silent_storage_node_fails_its_request_after_the_timeout_and_stalls_nothing_else() {
    log::set_logger(&LOG).unwrap();
    log::set_max_level(log::LevelFilter::Info);
    let dir = std::env::temp_dir().join(format!("splitvisor-blkloop-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let node = Daemon::storagenode(
        &sibling_bin(VMM, "storagenode"),
        &dir,
        &["--create", "disk0:16M"],
    );
    let url: NbdUrl = format!("nbd://{}/disk0", node.addr).parse().unwrap();
    let img = dir.join("local.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();

    let remote = Arc::new(Mutex::new(
        VirtioBlk::new(Box::new(NbdBackend::connect(&url, false).unwrap())).unwrap(),
    ));
    let local = Arc::new(Mutex::new(
        VirtioBlk::new(Box::new(FileBackend::open(&img, false).unwrap())).unwrap(),
    ));
    let mut lb = EventLoopBuilder::new("test-io").unwrap();
    lb.add(remote.clone());
    lb.add(local.clone());
    let io = lb.start().unwrap();
    let mut r = Disk::new(&remote);
    let mut l = Disk::new(&local);

    // Both disks answer.
    let s = r.request(1, 0);
    r.wait_used(1, Duration::from_secs(10));
    assert_eq!(r.status(s), 0);
    let s = l.request(1, 0);
    l.wait_used(1, Duration::from_secs(10));
    assert_eq!(l.status(s), 0);

    // The node stops answering: its request stays in flight...
    node.freeze();
    let stuck = r.request(0, 0);
    let sent = Instant::now();
    // ...while the other disk on the same loop completes request after request.
    for i in 0..20u16 {
        let s = l.request(0, 0);
        let took = l.wait_used(2 + i, Duration::from_secs(5));
        assert!(
            took < Duration::from_secs(2),
            "the local disk took {took:?}"
        );
        assert_eq!(l.status(s), 0);
    }
    assert_eq!(
        r.used(),
        1,
        "the silent node's request cannot have completed"
    );
    // After the I/O timeout it completes, with an error.
    r.wait_used(2, IO_TIMEOUT + Duration::from_secs(10));
    assert!(sent.elapsed() >= IO_TIMEOUT - Duration::from_millis(500));
    assert_eq!(r.status(stuck), 1, "IOERR");
    // More requests while it is down fail at once (reconnect backoff), and the
    // node is named once as failed, not once per request.
    for i in 0..5u16 {
        let s = r.request(0, 0);
        r.wait_used(3 + i, Duration::from_secs(5));
        assert_eq!(r.status(s), 1);
    }
    let lines = LOG.0.lock().unwrap().clone();
    let failed = lines
        .iter()
        .filter(|l| l.contains(&format!("storage node {} failed", node.addr)))
        .count();
    assert_eq!(failed, 1, "{lines:#?}");
    assert!(lines.len() <= 8, "too many log lines: {lines:#?}");

    // Once the backoff has passed, a request starts a reconnect. The stopped
    // node's socket still accepts (the kernel's backlog), so the NBD handshake
    // hangs: that happens on a thread of its own, and the loop serves the
    // other disk meanwhile.
    std::thread::sleep(Duration::from_millis(500));
    let waits = r.request(0, 0);
    for i in 0..5u16 {
        let s = l.request(0, 0);
        let took = l.wait_used(22 + i, Duration::from_secs(5));
        assert!(
            took < Duration::from_secs(2),
            "the local disk took {took:?} during a reconnect"
        );
        assert_eq!(l.status(s), 0);
    }
    assert_eq!(r.used(), 7, "the request waits for the reconnect");
    // The node resumes: the handshake completes, and the waiting request goes
    // out on the new connection and succeeds.
    node.thaw();
    r.wait_used(8, IO_TIMEOUT + Duration::from_secs(5));
    assert_eq!(
        r.status(waits),
        0,
        "the request that waited for the reconnect"
    );
    let lines = LOG.0.lock().unwrap().clone();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("reconnected to the storage node")),
        "{lines:#?}"
    );
    drop(io);
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}
