//! Authenticated fabric connections against a real `memnode` process: a client
//! without the key, with a wrong key, or replaying a recorded handshake is
//! refused and the node serves others on; a node that cannot prove the key (a
//! fake one, or one run without a key) is refused by the client; a node on a
//! reachable address refuses to start without a key.

mod common;

use common::{Node, pattern, vm_secret};
use fabric::auth::{self, Key};
use fabric::proto::{self, ErrorCode, Message, Role};
use fabric::{ClientConfig, PageClient};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

fn key_file(tag: &str, key: &Key) -> PathBuf {
    splitvisor_tests::secret_file(&format!("auth-{tag}"), &key.to_hex())
}

fn connect(addr: &str, vm: u64, key: Option<&Key>) -> Result<PageClient, String> {
    PageClient::connect(
        addr,
        &ClientConfig {
            vm_id: vm,
            auth_key: key.cloned(),
            vm_secret: Some(vm_secret().clone()),
            ..ClientConfig::default()
        },
    )
    .map_err(|e| fabric::client::error_chain(&e))
}

/// Reads one frame.
fn read_frame(s: &mut TcpStream) -> (proto::Opcode, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Ok(Some((h, _, n))) = proto::decode_frame(&buf) {
            let frame = buf[..n].to_vec();
            return (h.opcode, frame);
        }
        let n = s.read(&mut chunk).expect("read a frame");
        assert!(n > 0, "connection closed before a frame");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[test]
fn only_holders_of_the_key_are_served_and_a_replayed_handshake_fails() {
    let key = Key::generate().unwrap();
    let path = key_file("node", &key);
    let node = Node::start(&["--auth-key", path.to_str().unwrap()]);

    // No key: refused, naming why.
    let e = connect(&node.addr, 1, None).err().expect("refused");
    assert!(e.contains("requires authentication"), "{e}");
    // A wrong key: the node's proof does not check out, so the client refuses
    // the node before proving anything.
    let e = connect(&node.addr, 1, Some(&Key::generate().unwrap()))
        .err()
        .expect("refused");
    assert!(e.contains("could not prove the cluster key"), "{e}");

    // The right key: served.
    let c = connect(&node.addr, 1, Some(&key)).unwrap();
    c.write_pages(&[(5, &pattern(1, 5, 0)[..])]).unwrap();
    let mut back = vec![0u8; 4096];
    assert!(c.read_page(5, &mut back).unwrap());
    assert_eq!(back, pattern(1, 5, 0));

    // A recorded handshake replayed on a new connection fails: the node's
    // nonce is fresh, so the recorded proof does not match it.
    let nc: [u8; 32] = auth::random().unwrap();
    let mut hello = Vec::new();
    Message::hello(Role::Vmm, 1, &nc).encode(0, &mut hello);
    let mut s = TcpStream::connect(&node.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&hello).unwrap();
    let (op, frame) = read_frame(&mut s);
    assert_eq!(op, proto::Opcode::Challenge);
    let Ok(Some((_, Message::Challenge { nonce, .. }, _))) = proto::decode_frame(&frame) else {
        panic!("not a challenge");
    };
    let binding = auth::hello_binding(Role::Vmm as u8, proto::PROTOCOL_VERSION, 1);
    let proof = key.client_proof(&binding, &nc, nonce);
    let id = vm_secret().vm_identity(1);
    let (vm_key, vm_sig) = (id.public(), id.sign(&binding, &nc, nonce));
    let mut proof_frame = Vec::new();
    Message::Proof {
        proof: Some(&proof),
        vm: Some((&vm_key, &vm_sig)),
    }
    .encode(0, &mut proof_frame);
    s.write_all(&proof_frame).unwrap();
    assert_eq!(
        read_frame(&mut s).0,
        proto::Opcode::HelloOk,
        "the recorded session itself works"
    );
    drop(s);
    let mut r = TcpStream::connect(&node.addr).unwrap();
    r.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    r.write_all(&hello).unwrap();
    assert_eq!(read_frame(&mut r).0, proto::Opcode::Challenge);
    r.write_all(&proof_frame).unwrap();
    let (op, frame) = read_frame(&mut r);
    assert_eq!(op, proto::Opcode::Error);
    let Ok(Some((_, Message::Error { code, .. }, _))) = proto::decode_frame(&frame) else {
        panic!("not an error");
    };
    assert_eq!(code, ErrorCode::AuthFailed);

    // The node served on throughout: the first client's page is there.
    assert!(c.read_page(5, &mut back).unwrap());
    assert_eq!(back, pattern(1, 5, 0));
    assert!(connect(&node.addr, 2, Some(&key)).is_ok());
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[test]
fn a_client_with_a_key_refuses_nodes_that_cannot_prove_it() {
    let key = Key::generate().unwrap();
    // A node run without a key (loopback): its challenge proves nothing.
    let open = Node::start(&[]);
    let e = connect(&open.addr, 1, Some(&key)).err().expect("refused");
    assert!(e.contains("could not prove the cluster key"), "{e}");
    // A fake node that sends a challenge with a made-up proof.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let fake = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let _ = read_frame(&mut s);
        let mut out = Vec::new();
        Message::Challenge {
            nonce: &[7; 32],
            proof: &[9; 32],
        }
        .encode(0, &mut out);
        s.write_all(&out).unwrap();
        // What the client sends next: nothing (it hangs up).
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        rest
    });
    let e = connect(&addr, 1, Some(&key)).err().expect("refused");
    assert!(e.contains("could not prove the cluster key"), "{e}");
    assert!(
        fake.join().unwrap().is_empty(),
        "the client sent its proof to a fake node"
    );
}

#[test]
fn a_reachable_node_needs_a_key_or_insecure() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_memnode"))
        .args(["--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--auth-key") && err.contains("--insecure"),
        "{err}"
    );
    // A key file readable by others is refused too.
    let key = Key::generate().unwrap();
    let path = key_file("perm", &key);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_memnode"))
        .args([
            "--listen",
            "0.0.0.0:0",
            "--auth-key",
            path.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chmod 600"), "{err}");
    assert!(
        !err.contains(&key.to_hex()),
        "the key leaked into the error: {err}"
    );
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}
