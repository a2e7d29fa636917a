//! The control API against its OpenAPI document (docs/openapi.yaml), checked
//! by schemathesis (PyPI; `.ci/run` installs it) on a running VM: every
//! operation's responses conform (status codes, content types, bodies), and
//! no generated request crashes the VMM or gets a 5xx. schemathesis speaks
//! TCP, so the test forwards a loopback port to the API's Unix socket.

use splitvisor_tests::{Daemon, sibling_bin};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const VMM: &str = env!("CARGO_BIN_EXE_vmm");

/// Forwards connections on a loopback port to `sock`; returns the port.
fn forward(sock: PathBuf) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for tcp in l.incoming().flatten() {
            let Ok(unix) = UnixStream::connect(&sock) else {
                continue;
            };
            let (mut t2, mut u2) = (tcp.try_clone().unwrap(), unix.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut t2, &mut u2);
                let _ = u2.shutdown(Shutdown::Write);
            });
            std::thread::spawn(move || {
                let (mut unix, mut tcp) = (unix, tcp);
                let _ = std::io::copy(&mut unix, &mut tcp);
                let _ = tcp.shutdown(Shutdown::Write);
            });
        }
    });
    port
}

/// The schemathesis command (`SCHEMATHESIS` overrides), or a loud failure.
fn schemathesis() -> Command {
    let mut c = match std::env::var("SCHEMATHESIS") {
        Ok(bin) => Command::new(bin),
        Err(_) => {
            let mut c = Command::new("python3");
            c.args([
                "-c",
                "from schemathesis.cli import schemathesis; schemathesis()",
            ]);
            c
        }
    };
    let probe = Command::new("python3")
        .args(["-c", "import schemathesis"])
        .output();
    assert!(
        std::env::var("SCHEMATHESIS").is_ok() || probe.is_ok_and(|o| o.status.success()),
        "schemathesis is needed to check the API against docs/openapi.yaml: python3 -m pip install 'schemathesis>=4,<5' (.ci/run does)"
    );
    c.env("SCHEMATHESIS_TELEMETRY", "false");
    c
}

fn get(port: u16, path: &str) -> (u16, String) {
    splitvisor_tests::http_get(&format!("127.0.0.1:{port}"), path)
}

#[test]
fn kvm_the_api_conforms_to_its_openapi_document() {
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.yaml");
    let node = Daemon::memnode(&sibling_bin(VMM, "memnode"), &["--capacity", "1G"]);
    let sock = std::env::temp_dir().join(format!("vmm-openapi-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    // A workload that outlasts the test (it is killed at the end); it starts
    // paused, and schemathesis pauses and resumes it at will.
    let mut vm = Command::new(VMM)
        .args([
            "run",
            "--workload",
            "rand:size=16M,ops=4000000000",
            "--mem",
            "64M",
            "--local-cache",
            "8M",
            "--memnode",
            &node.addr,
            "--paused",
        ])
        .arg("--api-sock")
        .arg(&sock)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "no API socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let port = forward(sock.clone());
    // The document the VMM serves is the one in docs/.
    let (code, served) = get(port, "/api/openapi");
    assert_eq!(code, 200);
    assert_eq!(served, std::fs::read_to_string(&spec).unwrap());

    let out = schemathesis()
        .args(["run"])
        .arg(&spec)
        .args([
            "--url",
            &format!("http://127.0.0.1:{port}"),
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,negative_data_rejection",
            "--max-examples",
            "25",
            "--phases",
            "examples,coverage,fuzzing",
            "--request-timeout",
            "20",
            "--generation-deterministic",
        ])
        // schemathesis keeps a cache in its working directory: not in the repo.
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap();
    let report =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    eprintln!("{report}");
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{report}"
    );
    // The VMM is alive and answering after all that.
    assert!(vm.try_wait().unwrap().is_none(), "the VMM exited");
    assert_eq!(get(port, "/vm").0, 200);
    let _ = vm.kill();
    let mut err = String::new();
    let _ = vm.stderr.take().unwrap().read_to_string(&mut err);
    let _ = vm.wait();
    assert!(!err.contains("panicked"), "{err}");
    let _ = std::io::stderr().flush();
}
