//! The VMM's Prometheus metrics, scraped from a running VM (guest-shim workload
//! on this machine's /dev/kvm over a memnode process) on the API socket and on
//! `--metrics`, and checked with Prometheus's own `promtool check metrics`.

use splitvisor_tests::{Daemon, http_get, promtool_check, sibling_bin};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const VMM: &str = env!("CARGO_BIN_EXE_vmm");

/// The value of the one sample whose line starts with `prefix` (name and labels).
fn value(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix) && l[prefix.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample {prefix} in:\n{text}"))
}

#[test]
fn kvm_metrics_are_served_on_the_socket_and_on_loopback_and_pass_promtool() {
    let node = Daemon::memnode(&sibling_bin(VMM, "memnode"), &["--capacity", "1G"]);
    let metrics_addr = splitvisor_tests::free_loopback_addr();
    let sock = std::env::temp_dir().join(format!("vmm-metrics-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let child = Command::new(VMM)
        .args([
            "run",
            "--workload",
            "rand:size=32M,ops=60000",
            "--mem",
            "64M",
            "--local-cache",
            "2M",
            "--memnode",
            &node.addr,
            "--paused",
            "--metrics",
            &metrics_addr,
        ])
        .arg("--api-sock")
        .arg(&sock)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let scrape = || {
        let (code, text) = vmm::api::request_text(&sock, "GET", "/metrics", None).unwrap();
        assert_eq!(code, 200, "{text}");
        text
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "no API socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Paused, before the guest ran.
    let t = scrape();
    promtool_check(&t);
    assert_eq!(value(&t, "splitvisor_vmm_paused"), 1.0);
    let active = format!(
        "splitvisor_vmm_node_state{{node=\"{}\",state=\"active\"}}",
        node.addr
    );
    assert_eq!(value(&t, &active), 1.0);
    // The loopback listener serves the same, and nothing else.
    let (code, tcp) = http_get(&metrics_addr, "/metrics");
    assert_eq!(code, 200, "{tcp}");
    promtool_check(&tcp);
    assert!(tcp.contains("# TYPE splitvisor_vmm_fetch_latency_seconds histogram"));
    assert_eq!(http_get(&metrics_addr, "/stats").0, 404);

    // Running: remote fetches show up in the histogram; paused again, the
    // counters are consistent with each other.
    vmm::api::request(&sock, "PUT", "/vm/resume").unwrap();
    while value(&scrape(), "splitvisor_vmm_fetch_latency_seconds_count") < 100.0 {
        assert!(Instant::now() < deadline, "no remote fetches");
        std::thread::sleep(Duration::from_millis(20));
    }
    vmm::api::request(&sock, "PUT", "/vm/pause").unwrap();
    let t = scrape();
    promtool_check(&t);
    let count = value(&t, "splitvisor_vmm_fetch_latency_seconds_count");
    let inf = value(
        &t,
        "splitvisor_vmm_fetch_latency_seconds_bucket{le=\"+Inf\"}",
    );
    assert_eq!(count, inf);
    let buckets: Vec<f64> = t
        .lines()
        .filter(|l| l.starts_with("splitvisor_vmm_fetch_latency_seconds_bucket"))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
    assert!(value(&t, "splitvisor_vmm_fetch_latency_seconds_sum") > 0.0);
    assert!(value(&t, "splitvisor_vmm_faults_total{kind=\"remote\"}") > 0.0);
    assert!(value(&t, "splitvisor_vmm_evictions_total{kind=\"dirty\"}") > 0.0);
    assert!(
        value(
            &t,
            &format!("splitvisor_vmm_node_pages{{node=\"{}\"}}", node.addr)
        ) > 0.0
    );
    assert!(value(&t, "splitvisor_vmm_resident_pages") <= 512.0);
    vmm::api::request(&sock, "PUT", "/vm/resume").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("rand verified"),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn kvm_metrics_refuse_a_reachable_address() {
    let out = Command::new(VMM)
        .args([
            "run",
            "--mem",
            "64M",
            "--local-cache",
            "4M",
            "--metrics",
            "0.0.0.0:9101",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("0.0.0.0:9101") && err.contains("loopback"),
        "{err}"
    );
}
