//! virtio-blk over a mock queue in plain guest memory: well-formed requests
//! reach the backend and complete; every malformed chain ends in a status the
//! spec allows (or, with no status byte to write, used length 0) without a
//! panic; the in-flight bound holds.

use super::*;
use crate::devices::virtio_irq::tests::Recorder;
use request::S_UNSUPP;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestAddress;

const MEM: usize = 16 << 20;
const DISK: usize = 8 << 20;
const HDR: u64 = 0x10_0000;
const STATUS: u64 = 0x10_1000;
const DATA: u64 = 0x20_0000;
const R: u16 = 0;
const W: u16 = VRING_DESC_F_WRITE as u16;
const N: u16 = VRING_DESC_F_NEXT as u16;

/// A disk in memory; with `hold` set, requests wait until it is cleared.
struct MemDisk {
    data: Arc<Mutex<Vec<u8>>>,
    read_only: bool,
    hold: Arc<AtomicBool>,
    held: Vec<(u64, BlockOp)>,
    submitted: Arc<AtomicUsize>,
}

impl MemDisk {
    fn run(data: &Mutex<Vec<u8>>, op: &mut BlockOp) {
        let mut d = data.lock().unwrap();
        let (at, n) = (op.offset as usize, op.buf.len());
        match op.kind {
            OpKind::Read => op.buf.copy_from_slice(&d[at..at + n]),
            OpKind::Write => d[at..at + n].copy_from_slice(&op.buf),
            OpKind::Flush => {}
        }
    }
}

impl BlockBackend for MemDisk {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn name(&self) -> String {
        "memdisk".into()
    }
    fn submit(&mut self, tag: u64, op: BlockOp) {
        self.submitted.fetch_add(1, SeqCst);
        self.held.push((tag, op));
    }
    fn completions(&mut self, out: &mut Vec<(u64, BlockOp)>) {
        if self.hold.load(SeqCst) {
            return;
        }
        for (tag, mut op) in self.held.drain(..) {
            MemDisk::run(&self.data, &mut op);
            out.push((tag, op));
        }
    }
}

struct Rig {
    mem: &'static GuestMemoryMmap,
    /// Made once: making one writes the rings' initial state.
    mq: MockSplitQueue<'static, GuestMemoryMmap>,
    blk: VirtioBlk,
    data: Arc<Mutex<Vec<u8>>>,
    hold: Arc<AtomicBool>,
    submitted: Arc<AtomicUsize>,
    irqs: Arc<Recorder>,
    next_desc: u16,
}

impl Rig {
    fn new(read_only: bool) -> Self {
        // Leaked: the mock queue borrows it for the test's lifetime.
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap(),
        ));
        let data = Arc::new(Mutex::new(vec![0u8; DISK]));
        let hold = Arc::new(AtomicBool::new(false));
        let submitted = Arc::new(AtomicUsize::new(0));
        let disk = MemDisk {
            data: data.clone(),
            read_only,
            hold: hold.clone(),
            held: Vec::new(),
            submitted: submitted.clone(),
        };
        let mut blk = VirtioBlk::new(Box::new(disk)).unwrap();
        let irqs = Arc::new(Recorder::default());
        let irq = Arc::new(VirtioInterrupt::new(irqs.clone(), 1));
        irq.table_write(0, &0xfee0_0000u32.to_le_bytes());
        irq.table_write(8, &0x30u32.to_le_bytes());
        irq.set_control(true, false);
        irq.set_queue_vector(0, 0);
        let mq = MockSplitQueue::create(mem, GuestAddress(0), 256);
        let q: Queue = mq.create_queue().unwrap();
        blk.activate(vec![q], mem.clone(), irq);
        mem.write_slice(&[0xee; 64], GuestAddress(STATUS)).unwrap();
        Rig {
            mem,
            mq,
            blk,
            data,
            hold,
            submitted,
            irqs,
            next_desc: 0,
        }
    }

    /// Makes a chain of `descs` (addr, len, flags; NEXT links are added unless
    /// `raw`) available; returns its head.
    fn add(&mut self, descs: &[(u64, u32, u16)], raw: bool) -> u16 {
        let head = self.next_desc;
        let n = descs.len() as u16;
        let chain: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(a, l, f))| {
                let (f, next) = if raw {
                    (f, 0)
                } else if (i as u16) < n - 1 {
                    (f | N, head + i as u16 + 1)
                } else {
                    (f, 0)
                };
                RawDescriptor::from(SplitDescriptor::new(a, l, f, next))
            })
            .collect();
        self.mq.add_desc_chains(&chain, head).unwrap();
        self.next_desc += n;
        head
    }

    fn header(&self, at: u64, ty: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&ty.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(at)).unwrap();
    }

    fn status(&self, at: u64) -> u8 {
        self.mem.read_obj::<u8>(GuestAddress(at)).unwrap()
    }

    /// The used ring's entries: (head, length).
    fn used(&self) -> Vec<(u32, u32)> {
        let base = self.mq.used_addr();
        let idx: u16 = self.mem.read_obj(base.unchecked_add(2)).unwrap();
        (0..idx as u64)
            .map(|i| {
                let e = base.unchecked_add(4 + 8 * i);
                (
                    self.mem.read_obj(e).unwrap(),
                    self.mem.read_obj(e.unchecked_add(4)).unwrap(),
                )
            })
            .collect()
    }
}

use vm_memory::Address;

#[test]
fn a_write_then_a_read_round_trip_through_the_backend() {
    let mut r = Rig::new(false);
    r.mem
        .write_slice(&[0xabu8; 4096], GuestAddress(DATA))
        .unwrap();
    r.header(HDR, 1, 8);
    let w = r.add(&[(HDR, 16, R), (DATA, 4096, R), (STATUS, 1, W)], false);
    r.blk.serve();
    assert_eq!(r.status(STATUS), S_OK);
    assert!(r.data.lock().unwrap()[4096..8192] == [0xab; 4096]);
    r.header(HDR + 16, 0, 8);
    let rd = r.add(
        &[
            (HDR + 16, 16, R),
            (DATA + 8192, 4096, W),
            (STATUS + 1, 1, W),
        ],
        false,
    );
    r.blk.serve();
    assert_eq!(r.status(STATUS + 1), S_OK);
    let mut back = [0u8; 4096];
    r.mem
        .read_slice(&mut back, GuestAddress(DATA + 8192))
        .unwrap();
    assert!(back == [0xab; 4096]);
    assert_eq!(r.used(), vec![(w as u32, 1), (rd as u32, 4097)]);
    assert_eq!(r.irqs.0.lock().unwrap().len(), 2);
    // GET_ID and FLUSH need no data from the guest.
    r.header(HDR + 32, 8, 0);
    r.add(
        &[(HDR + 32, 16, R), (DATA, 20, W), (STATUS + 2, 1, W)],
        false,
    );
    r.header(HDR + 48, 4, 0);
    r.add(&[(HDR + 48, 16, R), (STATUS + 3, 1, W)], false);
    r.blk.serve();
    assert_eq!((r.status(STATUS + 2), r.status(STATUS + 3)), (S_OK, S_OK));
    let mut id = [0u8; 7];
    r.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"memdisk");
}

#[test]
fn malformed_chains_end_in_an_allowed_status_without_a_panic() {
    let mut r = Rig::new(false);
    let before = r.submitted.load(SeqCst);
    // (descriptors, status address, expected status, expected used length)
    let outside = MEM as u64 - 2048;
    r.header(HDR, 0, 0);
    type Case = (Vec<(u64, u32, u16)>, u64, u8);
    let cases: Vec<Case> = vec![
        // A data descriptor past the end of guest memory.
        (
            vec![(HDR, 16, R), (outside, 4096, W), (STATUS, 1, W)],
            STATUS,
            S_IOERR,
        ),
        // A zero-length data descriptor.
        (
            vec![(HDR, 16, R), (DATA, 0, W), (STATUS + 1, 1, W)],
            STATUS + 1,
            S_IOERR,
        ),
        // A header of 8 bytes.
        (vec![(HDR, 8, R), (STATUS + 2, 1, W)], STATUS + 2, S_IOERR),
        // A read of more than the largest request.
        (
            vec![
                (HDR, 16, R),
                (DATA, 4 << 20, W),
                (DATA, 512, W),
                (STATUS + 3, 1, W),
            ],
            STATUS + 3,
            S_IOERR,
        ),
        // A read that is not whole sectors.
        (
            vec![(HDR, 16, R), (DATA, 100, W), (STATUS + 4, 1, W)],
            STATUS + 4,
            S_IOERR,
        ),
        // A readable descriptor after a writable one.
        (
            vec![
                (HDR, 16, R),
                (DATA, 512, W),
                (DATA, 512, R),
                (STATUS + 5, 1, W),
            ],
            STATUS + 5,
            S_IOERR,
        ),
    ];
    let mut heads = Vec::new();
    for (descs, _, _) in &cases {
        heads.push(r.add(descs, false));
    }
    // Past the end of the disk.
    r.header(HDR + 16, 0, (DISK / 512) as u64);
    heads.push(r.add(
        &[(HDR + 16, 16, R), (DATA, 512, W), (STATUS + 6, 1, W)],
        false,
    ));
    // An unknown request type.
    r.header(HDR + 32, 77, 0);
    heads.push(r.add(&[(HDR + 32, 16, R), (STATUS + 7, 1, W)], false));
    // A chain that loops: header -> status -> header -> ...
    let h = r.next_desc;
    r.add(&[(HDR, 16, R | N), (STATUS + 8, 1, W | N)], true);
    r.mq.desc_table()
        .store(
            h,
            RawDescriptor::from(SplitDescriptor::new(HDR, 16, R | N, h + 1)),
        )
        .unwrap();
    r.mq.desc_table()
        .store(
            h + 1,
            RawDescriptor::from(SplitDescriptor::new(STATUS + 8, 1, W | N, h)),
        )
        .unwrap();
    heads.push(h);
    // A read-only status descriptor: nothing can be answered.
    let ro = r.add(&[(HDR, 16, R), (STATUS + 9, 1, R)], false);
    r.mem.write_obj(0x55u8, GuestAddress(STATUS + 9)).unwrap();
    r.blk.serve();

    for (i, (_, at, want)) in cases.iter().enumerate() {
        assert_eq!(r.status(*at), *want, "case {i}");
    }
    assert_eq!(r.status(STATUS + 6), S_IOERR, "past the end of the disk");
    assert_eq!(r.status(STATUS + 7), S_UNSUPP, "unknown type");
    assert_eq!(r.status(STATUS + 8), S_IOERR, "a looping chain");
    assert_eq!(
        r.status(STATUS + 9),
        0x55,
        "a read-only status is not written"
    );
    let used = r.used();
    assert_eq!(used.len(), heads.len() + 1);
    for (&(head, len), &want) in used.iter().zip(heads.iter()) {
        assert_eq!((head, len), (want as u32, 1));
    }
    assert_eq!(*used.last().unwrap(), (ro as u32, 0));
    assert_eq!(r.submitted.load(SeqCst), before, "nothing reached the disk");
    assert_eq!(r.blk.errors.load(SeqCst), heads.len() as u64 + 1);
}

#[test]
fn a_write_to_a_read_only_disk_fails() {
    let mut r = Rig::new(true);
    r.header(HDR, 1, 0);
    r.add(&[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)], false);
    r.blk.serve();
    assert_eq!(r.status(STATUS), S_IOERR);
    assert_eq!(r.submitted.load(SeqCst), 0);
}

#[test]
fn the_bytes_in_flight_stay_within_the_bound() {
    let mut r = Rig::new(false);
    r.hold.store(true, SeqCst);
    const REQS: u64 = 40;
    for i in 0..REQS {
        r.header(HDR + 16 * i, 0, 0);
        r.add(
            &[
                (HDR + 16 * i, 16, R),
                (DATA, 1 << 20, W),
                (STATUS + i, 1, W),
            ],
            false,
        );
    }
    r.blk.serve();
    // 40 requests of 1 MiB wait, 16 are with the backend.
    assert_eq!(
        r.submitted.load(SeqCst),
        MAX_INFLIGHT_BYTES / (1 << 20),
        "{} submitted",
        r.submitted.load(SeqCst)
    );
    r.hold.store(false, SeqCst);
    while r.used().len() < REQS as usize {
        r.blk.serve();
    }
    assert!(r.blk.peak_in_flight_bytes <= MAX_INFLIGHT_BYTES);
    assert!(r.used().iter().all(|&(_, len)| len == (1 << 20) + 1));
    assert_eq!(r.submitted.load(SeqCst), REQS as usize);
}

#[test]
fn completions_after_a_reset_touch_no_guest_memory() {
    let mut r = Rig::new(false);
    r.hold.store(true, SeqCst);
    r.data.lock().unwrap()[..512].fill(0x77);
    r.header(HDR, 0, 0);
    r.add(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)], false);
    r.blk.serve();
    assert_eq!(r.submitted.load(SeqCst), 1);
    r.blk.reset();
    r.hold.store(false, SeqCst);
    r.blk.serve();
    let mut b = [0u8; 512];
    r.mem.read_slice(&mut b, GuestAddress(DATA)).unwrap();
    assert!(b == [0u8; 512], "the read landed after the reset");
    assert!(r.used().is_empty());
    assert_eq!(r.blk.in_flight_bytes, 0);
}

/// Found by the `virtio_blk` fuzz target (branch `fuzz`): a status descriptor
/// that ends past 2^64 overflowed the status address (a panic with overflow
/// checks, else a status byte written where the address wrapped to, here the
/// descriptor table). It is malformed: used length 0, no write.
#[test]
fn a_status_descriptor_past_2_64_is_malformed_and_writes_nothing() {
    let mut r = Rig::new(false);
    r.header(HDR, 0, 0);
    let mut table = [0u8; 64];
    let head = r.add(&[(HDR, 16, R), (u64::MAX - 0xffe, 0x1000, W)], false);
    r.mem.read_slice(&mut table, GuestAddress(0)).unwrap();
    let errors = r.blk.errors.load(SeqCst);
    r.blk.serve();
    assert_eq!(r.used(), vec![(u32::from(head), 0)]);
    assert_eq!(r.blk.errors.load(SeqCst), errors + 1);
    let mut after = [0u8; 64];
    r.mem.read_slice(&mut after, GuestAddress(0)).unwrap();
    assert_eq!(after, table, "nothing written at the wrapped address");
}

/// The fuzz target's crashing input itself, replayed through its entry point.
#[test]
fn the_fuzz_input_with_a_status_past_2_64_runs_without_a_panic() {
    let input = include_bytes!("fuzz_regressions/status-past-2-64");
    assert!(fuzzing::run_queue(input).is_some());
}
