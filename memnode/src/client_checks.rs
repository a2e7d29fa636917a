//! The fabric client's behaviour against a running memory node, written once
//! and run over every transport: over TCP by `cargo test` (memnode's tests),
//! over RDMA (`rdma://`) by `fabric-check` in the nested host's rdma scenario,
//! where Soft-RoCE runs. Each check panics with a message naming the page and
//! what was wrong.

use fabric::proto::PAGE_SIZE;
use fabric::{ClientError, PageClient};

/// Makes a client for a VM id on the node under test.
pub type Connect<'a> = &'a (dyn Fn(u64) -> Result<PageClient, ClientError> + Sync);

/// The bytes of page `gpn` of `vm` at `version`: distinct for every page,
/// VM and version, never all zeros.
pub fn pattern(vm: u64, gpn: u64, version: u64) -> Vec<u8> {
    let mut x = vm
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(gpn.wrapping_mul(0xff51_afd7_ed55_8ccd))
        .wrapping_add(version.wrapping_mul(0xc4ce_b9fe_1a85_ec53))
        | 1;
    (0..PAGE_SIZE / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}

fn client(connect: Connect<'_>, vm: u64) -> PageClient {
    connect(vm)
        .unwrap_or_else(|e| panic!("connect for vm {vm}: {}", fabric::client::error_chain(&e)))
}

/// Pages written in batches and singly, read back singly and in batches with
/// never-written pages among them (zeros, absent), overwritten, overwritten
/// with zeros, freed; stretches that cross the node's region chunks (512
/// pages) included.
pub fn round_trips(connect: Connect<'_>, vm: u64) {
    let c = client(connect, vm);
    let pages = 1200u64;
    for base in (0..pages).step_by(60) {
        let data: Vec<Vec<u8>> = (base..base + 60).map(|g| pattern(vm, g, 0)).collect();
        let batch: Vec<(u64, &[u8])> = (base..base + 60).zip(data.iter().map(|d| &d[..])).collect();
        c.write_pages(&batch).expect("batched write");
    }
    for g in (0..pages).step_by(97) {
        c.write_pages(&[(g, &pattern(vm, g, 1))])
            .expect("single write");
    }
    let want = |g: u64| pattern(vm, g, u64::from(g % 97 == 0));
    let mut buf = vec![0u8; PAGE_SIZE];
    for g in 0..pages {
        assert!(
            c.read_page(g, &mut buf).expect("read"),
            "vm {vm} page {g} absent"
        );
        assert!(buf == want(g), "vm {vm} page {g} differs");
    }
    // A full batch across the chunk boundary at 512, and one with pages never
    // written (in a chunk that exists, and far away in none) among them.
    let gpns: Vec<u64> = (480..544).collect();
    let mut out = vec![0u8; gpns.len() * PAGE_SIZE];
    let p = c.read_pages(&gpns, &mut out).expect("batched read");
    for (k, &g) in gpns.iter().enumerate() {
        assert!(p.is_present(k), "vm {vm} page {g} absent in a batch");
        assert!(
            out[k * PAGE_SIZE..(k + 1) * PAGE_SIZE] == want(g)[..],
            "vm {vm} page {g} differs in a batch"
        );
    }
    let gpns = [3u64, pages + 5, 4, 1 << 30, 600];
    let mut out = vec![0xeeu8; gpns.len() * PAGE_SIZE];
    let p = c
        .read_pages(&gpns, &mut out)
        .expect("read with absent pages");
    assert_eq!(p.0, 0b10101, "presence of {gpns:?}");
    for (k, &g) in gpns.iter().enumerate() {
        let page = &out[k * PAGE_SIZE..(k + 1) * PAGE_SIZE];
        if p.is_present(k) {
            assert!(page == want(g), "vm {vm} page {g} differs");
        } else {
            assert!(
                page.iter().all(|&b| b == 0),
                "vm {vm} never-written page {g} is not zeros"
            );
        }
    }
    // Overwrites are seen at once; a page overwritten with zeros and a freed
    // page read as zeros (absent).
    c.write_pages(&[(10, &pattern(vm, 10, 7))])
        .expect("overwrite");
    assert!(c.read_page(10, &mut buf).expect("read"));
    assert!(
        buf == pattern(vm, 10, 7),
        "vm {vm}: the overwrite of page 10 is not seen"
    );
    c.write_pages(&[(11, &vec![0u8; PAGE_SIZE])])
        .expect("zero write");
    assert_eq!(c.free_pages(&[12, pages + 100]).expect("free"), 1);
    for g in [11u64, 12] {
        buf.fill(0xaa);
        assert!(
            !c.read_page(g, &mut buf).expect("read"),
            "vm {vm} page {g} still present"
        );
        assert!(buf.iter().all(|&b| b == 0), "vm {vm} page {g} is not zeros");
    }
    let s = c.stats().expect("stats");
    assert_eq!(s.vm_pages, pages - 2, "vm {vm}: pages stored");
}

/// Four threads pipeline reads and writes on one shared connection, each
/// keeping several reads in flight, and other VMs' connections run beside.
pub fn threads_share_one_connection(connect: Connect<'_>, vm: u64) {
    let shared = client(connect, vm);
    std::thread::scope(|s| {
        for other in 1..=2u64 {
            s.spawn(move || {
                let c = client(connect, vm + other);
                for g in 0..200 {
                    c.write_pages(&[(g, &pattern(vm + other, g, 0))])
                        .expect("write");
                }
                let mut buf = vec![0u8; PAGE_SIZE];
                for g in 0..200 {
                    assert!(c.read_page(g, &mut buf).expect("read"));
                    assert!(
                        buf == pattern(vm + other, g, 0),
                        "vm {} page {g}",
                        vm + other
                    );
                }
            });
        }
        for t in 0..4u64 {
            let c = shared.clone();
            s.spawn(move || {
                for i in 0..200u64 {
                    let g = t * 1000 + i;
                    c.write_pages(&[(g, &pattern(vm, g, 0))]).expect("write");
                    let pend: Vec<_> = (0..4)
                        .map(|k| {
                            c.submit_read(&[t * 1000 + i.saturating_sub(k)])
                                .expect("submit")
                        })
                        .collect();
                    for (k, p) in pend.into_iter().enumerate() {
                        let mut buf = vec![0u8; PAGE_SIZE];
                        assert!(p.wait(&mut buf).expect("wait").is_present(0));
                        let g = t * 1000 + i.saturating_sub(k as u64);
                        assert!(buf == pattern(vm, g, 0), "vm {vm} shared page {g}");
                    }
                }
            });
        }
    });
}

/// 100 full-batch reads submitted before any is waited for, then writes:
/// no deadlock, whatever the transport buffers.
pub fn submits_far_ahead(connect: Connect<'_>, vm: u64) {
    let c = client(connect, vm);
    let gpns: Vec<u64> = (0..64).collect();
    c.write_pages(&[(5, &pattern(vm, 5, 0))]).expect("write");
    let pending: Vec<_> = (0..100)
        .map(|_| c.submit_read(&gpns).expect("submit"))
        .collect();
    for g in 20..40 {
        c.write_pages(&[(g, &pattern(vm, g, 0))]).expect("write");
    }
    let mut out = vec![0u8; 64 * PAGE_SIZE];
    for p in pending {
        let present = p.wait(&mut out).expect("wait");
        assert!(present.is_present(5), "vm {vm}: page 5 absent");
        assert!(out[5 * PAGE_SIZE..6 * PAGE_SIZE] == pattern(vm, 5, 0)[..]);
    }
    assert!(c.read_page(30, &mut out[..PAGE_SIZE]).expect("read"));
}

/// A closed connection fails every later call at once with an error naming
/// the node (no hang).
pub fn closed_connections_fail_fast(connect: Connect<'_>, vm: u64) {
    let c = client(connect, vm);
    c.write_pages(&[(1, &pattern(vm, 1, 0))]).expect("write");
    c.close();
    let started = std::time::Instant::now();
    let mut buf = vec![0u8; PAGE_SIZE];
    let e = c
        .read_page(1, &mut buf)
        .expect_err("a read on a closed connection");
    assert!(matches!(e, ClientError::ConnectionLost { .. }), "{e:?}");
    assert!(e.to_string().contains(c.addr()), "{e}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
}

/// Every check, each on its own VM ids from `vm_base` (10 apart).
pub fn all(connect: Connect<'_>, vm_base: u64) {
    round_trips(connect, vm_base);
    threads_share_one_connection(connect, vm_base + 10);
    submits_far_ahead(connect, vm_base + 20);
    closed_connections_fail_fast(connect, vm_base + 30);
}
