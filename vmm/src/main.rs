//! `vmm`: the Splitvisor processor monitor.

use clap::{Args, Parser, Subcommand};
use fabric::LinkModel;
use fabric::units::parse_size;
use std::path::PathBuf;
use std::process::ExitCode;
use vmm::excache::{CacheConfig, EvictPolicy};
use vmm::vm::{self, VmConfig};
use vmm::workload::Workload;

/// A KVM VMM whose guest RAM is a small local cache over remote memory nodes.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a VM until its guest finishes.
    Run(Box<RunArgs>),
    /// Show a running VM's statistics through its control API.
    Stats(StatsArgs),
    /// Attach a memory node to a running VM: new pages may be placed on it.
    AttachMemnode(NodeArgs),
    /// Detach a memory node from a running VM: its pages are moved to the other
    /// nodes while the guest runs; waits until it holds none.
    DetachMemnode(NodeArgs),
}

#[derive(Args, Debug)]
struct NodeArgs {
    /// The VM's control socket (`vmm run --api-sock`).
    #[arg(long)]
    api_sock: PathBuf,
    /// The memory node, HOST:PORT.
    addr: String,
    /// Return once the drain has started instead of waiting for it (detach).
    #[arg(long)]
    no_wait: bool,
}

#[derive(Args, Debug)]
struct StatsArgs {
    /// The VM's control socket (`vmm run --api-sock`).
    #[arg(long)]
    api_sock: PathBuf,
    /// Print the raw JSON.
    #[arg(long)]
    json: bool,
    /// Print a line a second with rates until the VM ends.
    #[arg(long)]
    watch: bool,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Guest-shim ELF to run (default: the one built into this binary).
    #[arg(long)]
    shim: Option<PathBuf>,
    /// Workload for the shim: NAME[:k=v,...], NAME one of seq, rand, chase, hash.
    #[arg(long, default_value = "seq")]
    workload: Workload,
    /// Guest RAM, e.g. 2G.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    mem: u64,
    /// Most guest RAM resident locally at once, e.g. 32M.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    local_cache: u64,
    /// A memory node (repeat for several; pages are striped over them). Without
    /// one, vmm starts a `memnode` process from beside its own binary on a free
    /// loopback port for the run. `ideal` (or `ideal:TAG`) is an in-process node
    /// standing for a perfect interconnect: the baseline that shows what the
    /// fabric costs (see docs/architecture.md, "The fabric").
    #[arg(long = "memnode", value_name = "ADDR")]
    memnodes: Vec<String>,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: usize,
    /// Eviction policy.
    #[arg(long, value_enum, default_value_t = EvictPolicy::Clock)]
    evict: EvictPolicy,
    /// Pages to prefetch on a sequential fault stream (0: off; at most 1024).
    #[arg(long, default_value_t = 256)]
    prefetch: usize,
    /// Track guest writes with KVM's dirty log too: CLOCK then also counts a
    /// page written since the hand last passed as referenced. Off by default: it
    /// stops KVM from mapping neighbouring resident pages on a fault, which costs
    /// a sequential guest an exit per page; dirty pages are found by content
    /// either way.
    #[arg(long)]
    dirty_log: bool,
    /// Fault handler threads.
    #[arg(long, default_value_t = 4)]
    fault_threads: usize,
    /// Emulated link to the memory nodes, e.g. latency=2us,bw=100Gbit.
    #[arg(long, default_value = "off")]
    link: LinkModel,
    /// Address-space id on the memory nodes (default: derived from the process id).
    #[arg(long)]
    vm_id: Option<u64>,
    /// Move existing pages towards an even spread over the memory nodes in the
    /// background, at most this many pages a second (4096 if no value is given).
    #[arg(long, value_name = "PAGES_PER_S", num_args = 0..=1, default_missing_value = "4096")]
    rebalance: Option<u64>,
    /// Serve the control API (HTTP/1.1 + JSON) on this Unix socket.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Start with the vCPUs paused, until `PUT /vm/resume` on the API socket
    /// (attach memory nodes or start measuring first). The run's elapsed time
    /// includes the time paused.
    #[arg(long, requires = "api_sock")]
    paused: bool,
    /// Write the run's statistics as JSON to this file.
    #[arg(long, value_name = "FILE")]
    stats_json: Option<PathBuf>,
    /// Boot this Linux kernel (bzImage or ELF vmlinux) instead of the guest shim.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["shim", "workload"])]
    kernel: Option<PathBuf>,
    /// Initial ramdisk for --kernel.
    #[arg(long, value_name = "PATH", requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Kernel command line for --kernel.
    #[arg(
        long,
        default_value = "console=ttyS0 reboot=k panic=-1",
        requires = "kernel"
    )]
    cmdline: String,
    /// Where the guest's serial console goes: stdio or a file path.
    #[arg(long, default_value = "stdio", requires = "kernel")]
    console: vmm::linux::Console,
    /// A virtio-blk disk: file:PATH[,ro] or nbd://HOST:PORT/EXPORT[,ro] (a storage
    /// node); repeat for several.
    #[arg(long = "disk", value_name = "SPEC", requires = "kernel")]
    disks: Vec<vmm::linux::DiskSpec>,
    /// Boot --kernel even where /dev/kvm is a software nested KVM (guest kernel
    /// mode is emulated there and a stock kernel does not finish booting).
    #[arg(long, requires = "kernel")]
    allow_software_kvm: bool,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run(a) => match run(*a) {
            Ok(code) => code,
            Err(e) => {
                // One line with the whole cause chain (a failed memory node's
                // address and why it failed).
                eprintln!("vmm: error: {}", fabric::client::error_chain(&*e));
                ExitCode::FAILURE
            }
        },
        Cmd::AttachMemnode(a) => report(attach_memnode(a)),
        Cmd::DetachMemnode(a) => report(detach_memnode(a)),
        Cmd::Stats(a) => match stats(a) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vmm: error: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn report(r: Result<(), String>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmm: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn api_error(code: u16, v: &serde_json::Value) -> String {
    format!(
        "the API answered {code}: {}",
        v["error"].as_str().unwrap_or("?")
    )
}

fn attach_memnode(a: NodeArgs) -> Result<(), String> {
    let body = serde_json::json!({ "addr": a.addr });
    match vmm::api::request_with_body(&a.api_sock, "PUT", "/memnodes", Some(&body))? {
        (200, _) => {
            println!("memory node {} attached", a.addr);
            Ok(())
        }
        (code, v) => Err(api_error(code, &v)),
    }
}

fn detach_memnode(a: NodeArgs) -> Result<(), String> {
    match vmm::api::request(&a.api_sock, "DELETE", &format!("/memnodes/{}", a.addr))? {
        (202, _) => {}
        (code, v) => return Err(api_error(code, &v)),
    }
    if a.no_wait {
        println!("memory node {}: draining", a.addr);
        return Ok(());
    }
    let t0 = std::time::Instant::now();
    let mut last = u64::MAX;
    loop {
        let (code, v) = vmm::api::request(&a.api_sock, "GET", "/memnodes")?;
        if code != 200 {
            return Err(api_error(code, &v));
        }
        let node = v
            .as_array()
            .and_then(|l| l.iter().rev().find(|n| n["addr"] == a.addr.as_str()))
            .cloned()
            .ok_or_else(|| format!("memory node {} vanished from the VM's list", a.addr))?;
        match node["state"].as_str() {
            Some("detached") => {
                println!(
                    "memory node {} detached ({:.1} s)",
                    a.addr,
                    t0.elapsed().as_secs_f64()
                );
                return Ok(());
            }
            Some("active") => {
                return Err(format!(
                    "detaching memory node {} failed: {}",
                    a.addr,
                    node["detach_error"].as_str().unwrap_or("unknown error")
                ));
            }
            _ => {
                let pages = node["pages"].as_u64().unwrap_or(0);
                if pages != last {
                    println!("memory node {}: draining, {pages} pages left", a.addr);
                    last = pages;
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// A memory node started for this run; stopped when dropped.
struct LocalMemnode(std::process::Child);

impl Drop for LocalMemnode {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_local_memnode(capacity: u64) -> Result<(LocalMemnode, String), String> {
    use std::io::BufRead;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let bin = exe.with_file_name("memnode");
    let mut child = std::process::Command::new(&bin)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--capacity",
            &capacity.to_string(),
        ])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("no --memnode given and cannot start {}: {e}", bin.display()))?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("piped stdout"))
        .read_line(&mut line)
        .map_err(|e| format!("reading from {}: {e}", bin.display()))?;
    let node = LocalMemnode(child);
    let addr = line
        .trim()
        .strip_prefix("memnode listening on ")
        .ok_or_else(|| format!("{} did not start: {line:?}", bin.display()))?
        .to_string();
    Ok((node, addr))
}

/// Why `vmm run` failed: a VM error with its causes, or a message.
type RunError = Box<dyn std::error::Error>;

fn run(mut a: RunArgs) -> Result<ExitCode, RunError> {
    let _local_node = if a.memnodes.is_empty() {
        let (node, addr) = start_local_memnode(a.mem + (64 << 20))?;
        log::info!("no --memnode given: started a memory node at {addr} for this run");
        a.memnodes.push(addr);
        Some(node)
    } else {
        None
    };
    let shim = match &a.shim {
        Some(p) => {
            std::fs::read(p).map_err(|e| format!("cannot read guest shim {}: {e}", p.display()))?
        }
        None => guest_shim::SHIM_ELF.to_vec(),
    };
    let vm_id = a.vm_id.unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        (u64::from(std::process::id()) << 32) ^ t
    });
    let cache = CacheConfig {
        budget_pages: (a.local_cache / 4096) as usize,
        policy: a.evict,
        prefetch: a.prefetch.min(1024),
        handlers: a.fault_threads.clamp(1, 64),
        remove_events: false,
        host_writes: false,
        dirty_log: a.dirty_log,
        rebalance: a.rebalance.unwrap_or(0),
    };
    // SIGINT/SIGTERM stop the VM cleanly (and the memory node started for it).
    let interrupt = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, interrupt.clone())
            .map_err(|e| format!("cannot handle signal {sig}: {e}"))?;
    }
    if let Some(kernel) = a.kernel.clone() {
        return run_linux(a, kernel, cache, vm_id, &interrupt);
    }
    let cfg = VmConfig {
        mem: a.mem,
        vcpus: a.vcpus,
        cache,
        memnodes: a.memnodes.clone(),
        shim,
        workload: a.workload.clone(),
        vm_id,
        link: a.link,
        api_sock: a.api_sock.clone(),
        start_paused: a.paused,
    };
    log::info!(
        "vm {vm_id:#x}: {} MiB guest RAM, {} MiB local cache ({:?}), {} vCPU(s), workload {}, memory nodes {}",
        a.mem >> 20,
        a.local_cache >> 20,
        a.evict,
        a.vcpus,
        a.workload.name,
        a.memnodes.join(", ")
    );
    let report = vm::run(&cfg, &interrupt)?;
    let mut ok = report.vcpus.len() == a.vcpus;
    let mut vcpus_json = Vec::new();
    for (i, o) in report.vcpus.iter().enumerate() {
        match &o.result {
            Some(r) => {
                let good = r.failed == 0 && o.exit_code == 0;
                ok &= good;
                println!(
                    "vCPU {i}: {} {}: {} ops over {} MiB, checksum {:#018x}, {} mismatches, exit code {}",
                    a.workload.name,
                    if good { "verified" } else { "FAILED" },
                    r.ops,
                    r.bytes >> 20,
                    r.checksum,
                    r.mismatches,
                    o.exit_code
                );
                vcpus_json.push(serde_json::json!({
                    "vcpu": i, "ok": good, "ops": r.ops, "bytes": r.bytes, "checksum": r.checksum,
                    "mismatches": r.mismatches, "cycles": r.cycles, "exit_code": o.exit_code,
                    "kvm": o.kvm,
                }));
            }
            None => {
                ok = false;
                println!(
                    "vCPU {i}: exited with code {} without reporting a result",
                    o.exit_code
                );
                vcpus_json.push(
                    serde_json::json!({"vcpu": i, "ok": false, "exit_code": o.exit_code, "kvm": o.kvm}),
                );
            }
        }
    }
    let kvm: Vec<_> = report.vcpus.iter().filter_map(|o| o.kvm).collect();
    let kvm_line = if kvm.is_empty() {
        String::new()
    } else {
        format!(
            "; KVM exits {} ({} page faults, {} mapping a page)",
            kvm.iter().map(|k| k.exits).sum::<u64>(),
            kvm.iter().map(|k| k.page_faults).sum::<u64>(),
            kvm.iter().map(|k| k.page_faults_fixed).sum::<u64>()
        )
    };
    println!(
        "elapsed {:.3} s; {}{kvm_line}",
        report.elapsed.as_secs_f64(),
        report.stats.summary()
    );
    if let Some(path) = &a.stats_json {
        let j = serde_json::json!({
            "ok": ok,
            "workload": a.workload,
            "mem_bytes": a.mem,
            "local_cache_bytes": a.local_cache,
            "vcpus": a.vcpus,
            "evict": a.evict,
            "prefetch": a.prefetch,
            "dirty_log": a.dirty_log,
            "memnodes": a.memnodes,
            "elapsed_s": report.elapsed.as_secs_f64(),
            "results": vcpus_json,
            "stats": report.stats,
        });
        std::fs::write(path, serde_json::to_string_pretty(&j).unwrap_or_default())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    if ok {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("vmm: error: the workload failed verification");
        Ok(ExitCode::FAILURE)
    }
}

fn run_linux(
    a: RunArgs,
    kernel: PathBuf,
    cache: CacheConfig,
    vm_id: u64,
    interrupt: &std::sync::atomic::AtomicBool,
) -> Result<ExitCode, RunError> {
    let cfg = vmm::linux::LinuxConfig {
        mem: a.mem,
        vcpus: a.vcpus,
        cache,
        memnodes: a.memnodes.clone(),
        vm_id,
        link: a.link,
        api_sock: a.api_sock.clone(),
        start_paused: a.paused,
        kernel,
        initrd: a.initrd.clone(),
        cmdline: a.cmdline.clone(),
        console: a.console.clone(),
        disks: a.disks.clone(),
        allow_software_kvm: a.allow_software_kvm,
    };
    log::info!(
        "vm {vm_id:#x}: Linux {} ({} MiB guest RAM, {} MiB local cache, {} vCPU(s), {} disk(s)), memory nodes {}",
        cfg.kernel.display(),
        a.mem >> 20,
        a.local_cache >> 20,
        a.vcpus,
        a.disks.len(),
        a.memnodes.join(", ")
    );
    let report = vmm::linux::run(&cfg, interrupt)?;
    let how = match report.exit {
        vmm::linux::GuestExit::PowerOff => "the guest powered off",
        vmm::linux::GuestExit::Reset => "the guest rebooted (vmm does not restart it)",
    };
    eprintln!(
        "vmm: {how} after {:.3} s; {}",
        report.elapsed.as_secs_f64(),
        report.stats.summary()
    );
    if let Some(path) = &a.stats_json {
        let j = serde_json::json!({
            "ok": true,
            "guest": "linux",
            "kernel": cfg.kernel,
            "exit": format!("{:?}", report.exit),
            "mem_bytes": a.mem,
            "local_cache_bytes": a.local_cache,
            "vcpus": a.vcpus,
            "memnodes": a.memnodes,
            "elapsed_s": report.elapsed.as_secs_f64(),
            "stats": report.stats,
        });
        std::fs::write(path, serde_json::to_string_pretty(&j).unwrap_or_default())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn get_stats(sock: &std::path::Path) -> Result<serde_json::Value, String> {
    match vmm::api::request(sock, "GET", "/stats")? {
        (200, v) => Ok(v),
        (code, v) => Err(format!(
            "the API answered {code}: {}",
            v["error"].as_str().unwrap_or("?")
        )),
    }
}

fn stats(a: StatsArgs) -> Result<(), String> {
    let first = get_stats(&a.api_sock)?;
    if !a.watch {
        if a.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&first).unwrap_or_default()
            );
        } else {
            let s: vmm::excache::stats::StatsSnapshot = serde_json::from_value(first)
                .map_err(|e| format!("unexpected stats from the API: {e}"))?;
            println!("{}", s.summary());
        }
        return Ok(());
    }
    let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0);
    let mut prev = first;
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
        let Ok(cur) = get_stats(&a.api_sock) else {
            println!("the VM has ended");
            return Ok(());
        };
        if a.json {
            println!("{cur}");
        } else {
            let faults = |v: &serde_json::Value| n(v, "faults_zero") + n(v, "faults_remote");
            println!(
                "resident {:>8}/{:<8} faults/s {:>7} (remote {:>7})  prefetched/s {:>7}  evictions/s {:>7}  fetch p50 {:>6.1} us p99 {:>7.1} us  nodes {}",
                n(&cur, "resident_pages"),
                n(&cur, "budget_pages"),
                faults(&cur) - faults(&prev),
                n(&cur, "faults_remote") - n(&prev, "faults_remote"),
                n(&cur, "prefetch_remote") + n(&cur, "prefetch_zero")
                    - n(&prev, "prefetch_remote")
                    - n(&prev, "prefetch_zero"),
                n(&cur, "evict_clean") + n(&cur, "evict_dirty")
                    - n(&prev, "evict_clean")
                    - n(&prev, "evict_dirty"),
                cur["fetch_p50_us"].as_f64().unwrap_or(0.0),
                cur["fetch_p99_us"].as_f64().unwrap_or(0.0),
                cur["node_pages"]
                    .as_array()
                    .map(|a| a
                        .iter()
                        .map(|p| format!("{}={}", p[0].as_str().unwrap_or("?"), p[1]))
                        .collect::<Vec<_>>()
                        .join(" "))
                    .unwrap_or_default()
            );
        }
        prev = cur;
    }
}
