//! Per-VM isolation and quotas against a real `memnode` process: a VM id is
//! bound to the VMM identity that first used it, so another authenticated VMM
//! claiming that id is refused (and the node serves the VM on); the VM's own
//! secret takes it over; a VM at its quota gets an error that says so while
//! other VMs are served.

mod common;

use common::{Node, pattern};
use fabric::auth::{self, Key};
use fabric::proto::{self, ErrorCode, Message, Role};
use fabric::{ClientConfig, ClientError, PageClient};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

fn client(addr: &str, vm: u64, role: Role, key: &Key, secret: &Key) -> Result<PageClient, String> {
    PageClient::connect(
        addr,
        &ClientConfig {
            vm_id: vm,
            role,
            auth_key: Some(key.clone()),
            vm_secret: Some(secret.clone()),
            ..ClientConfig::default()
        },
    )
    .map_err(|e| fabric::client::error_chain(&e))
}

fn read_frame(s: &mut TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Ok(Some((_, _, n))) = proto::decode_frame(&buf) {
            return buf[..n].to_vec();
        }
        let n = s.read(&mut chunk).expect("read a frame");
        assert!(n > 0, "connection closed before a frame");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[test]
fn an_authenticated_vmm_claiming_another_vms_id_is_refused() {
    let key = Key::generate().unwrap();
    let path = splitvisor_tests::secret_file("isolation", &key.to_hex());
    let node = Node::start(&["--auth-key", path.to_str().unwrap()]);
    let (victim_secret, attacker_secret) = (Key::generate().unwrap(), Key::generate().unwrap());
    const VM: u64 = 0x5eed;

    let victim = client(&node.addr, VM, Role::Vmm, &key, &victim_secret).unwrap();
    for g in 0..4 {
        victim.write_pages(&[(g, &pattern(VM, g, 1)[..])]).unwrap();
    }
    // Another tenant with the cluster key and its own VM secret: refused.
    let e = client(&node.addr, VM, Role::Vmm, &key, &attacker_secret)
        .err()
        .expect("refused");
    assert!(
        e.contains("authentication failed") && e.contains("bound on this node to another VMM"),
        "{e}"
    );
    // A VMM hello that proves no VM identity at all: refused.
    let nc: [u8; 32] = auth::random().unwrap();
    let mut s = TcpStream::connect(&node.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = Vec::new();
    Message::hello(Role::Vmm, VM, &nc).encode(0, &mut out);
    s.write_all(&out).unwrap();
    let frame = read_frame(&mut s);
    let Ok(Some((_, Message::Challenge { nonce, .. }, _))) = proto::decode_frame(&frame) else {
        panic!("not a challenge");
    };
    let binding = auth::hello_binding(Role::Vmm as u8, proto::PROTOCOL_VERSION, VM);
    let proof = key.client_proof(&binding, &nc, nonce);
    out.clear();
    Message::Proof {
        proof: Some(&proof),
        vm: None,
    }
    .encode(0, &mut out);
    s.write_all(&out).unwrap();
    let frame = read_frame(&mut s);
    let Ok(Some((_, Message::Error { code, message }, _))) = proto::decode_frame(&frame) else {
        panic!("not an error");
    };
    assert_eq!(code, ErrorCode::AuthFailed);
    assert!(message.contains("prove its VM's identity"), "{message}");

    // An admin tool sees the VM's counters without its secret, and cannot
    // move its pages.
    let admin = client(&node.addr, VM, Role::Admin, &key, &attacker_secret).unwrap();
    assert_eq!(admin.stats().unwrap().vm_pages, 4);
    let mut page = vec![0u8; 4096];
    assert!(matches!(
        admin.read_page(0, &mut page),
        Err(ClientError::Remote {
            code: ErrorCode::BadRequest,
            ..
        })
    ));

    // The node served the VM throughout; its pages keep the binding after its
    // VMM is gone, and the VM's own secret takes it over.
    for g in 0..4 {
        assert!(victim.read_page(g, &mut page).unwrap());
        assert_eq!(page, pattern(VM, g, 1));
    }
    drop(victim);
    assert!(client(&node.addr, VM, Role::Vmm, &key, &attacker_secret).is_err());
    let heir = client(&node.addr, VM, Role::Vmm, &key, &victim_secret).unwrap();
    for g in 0..4 {
        assert!(heir.read_page(g, &mut page).unwrap());
        assert_eq!(page, pattern(VM, g, 1));
    }
    // Once the VM has no pages and no sessions here, its id is free again.
    assert_eq!(heir.free_pages(&[0, 1, 2, 3]).unwrap(), 4);
    drop(heir);
    drop(admin);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match client(&node.addr, VM, Role::Vmm, &key, &attacker_secret) {
            Ok(_) => break,
            Err(e) => assert!(
                std::time::Instant::now() < deadline,
                "the forgotten id stays bound: {e}"
            ),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[test]
fn a_vm_at_its_quota_gets_a_clear_error_and_other_vms_are_served() {
    // 16 pages per VM on a node of 256.
    let maddr = splitvisor_tests::free_loopback_addr();
    let node = Node::start(&["--capacity", "1M", "--vm-quota", "64K", "--metrics", &maddr]);
    let (a, b) = (node.client(1), node.client(2));
    assert_eq!(
        a.node().capacity_pages,
        16,
        "the hello reports the VM's room"
    );
    let batch: Vec<Vec<u8>> = (0..16).map(|g| pattern(1, g, 0)).collect();
    let pages: Vec<(u64, &[u8])> = batch
        .iter()
        .enumerate()
        .map(|(g, p)| (g as u64, &p[..]))
        .collect();
    a.write_pages(&pages).unwrap();
    let e = a.write_pages(&[(16, &pattern(1, 16, 0)[..])]).unwrap_err();
    let ClientError::Remote { code, message, .. } = &e else {
        panic!("{e}");
    };
    assert_eq!(*code, ErrorCode::OutOfCapacity);
    assert!(
        message.contains("quota") && message.contains("--vm-quota"),
        "{message}"
    );
    let st = a.stats().unwrap();
    assert_eq!((st.vm_pages, st.vm_quota_pages, st.vm_room()), (16, 16, 0));
    // Overwrites fit; another VM's pages fit; the refused page was not stored.
    a.write_pages(&[(3, &pattern(1, 3, 9)[..])]).unwrap();
    b.write_pages(&pages).unwrap();
    let mut page = vec![0u8; 4096];
    assert!(!a.read_page(16, &mut page).unwrap());
    assert!(a.read_page(3, &mut page).unwrap());
    assert_eq!(page, pattern(1, 3, 9));
    let (_, metrics) = splitvisor_tests::http_get(&maddr, "/metrics");
    assert!(
        metrics.contains("splitvisor_memnode_vm_quota_refusals_total{vm=\"1\"} 1"),
        "{metrics}"
    );
}
