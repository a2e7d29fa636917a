//! `vmm`: the Splitvisor processor monitor.

use clap::{Args, Parser, Subcommand};
use fabric::LinkModel;
use fabric::units::parse_size;
use std::path::PathBuf;
use std::process::ExitCode;
use vmm::builder::{self, GuestOutcome, RunReport};
use vmm::config::{Console, DiskSpec, GuestConfig, LinuxConfig, ShimConfig, ShimImage, VmConfig};
use vmm::error::VmError;
use vmm::excache::{CacheConfig, EvictPolicy, Prefetcher};
use vmm::guest::shim::VcpuOutcome;
use vmm::linux::GuestExit;
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
    /// Write a new cluster key (32 random bytes as hex, mode 600) for
    /// `--auth-key` of vmm and memnode; an existing file is not replaced.
    Keygen {
        /// The key file to create.
        file: PathBuf,
    },
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
    /// Until the VM ends: on a terminal, a live view redrawn every second
    /// (rates, the fetch latency histogram, memory nodes), fitting its width;
    /// otherwise a line a second with rates (`--json`: the raw JSON).
    #[arg(long)]
    watch: bool,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Guest-shim ELF to run (default: the one built into this binary).
    #[arg(long)]
    shim: Option<PathBuf>,
    /// Workload for the shim: NAME[:k=v,...], NAME one of seq, rand, chase, hash,
    /// graph, kv, sort, stream, stride (docs/vmm.md#workloads).
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
    /// `ADDR,zone=NAME` puts the node in a failure domain: a page's copies
    /// (--replicas) go to distinct zones whenever enough zones have room.
    #[arg(long = "memnode", value_name = "ADDR[,zone=NAME]")]
    memnodes: Vec<String>,
    /// Copies of every page, on distinct memory nodes (1 to 4, at most the
    /// number of --memnode). With 2 or more the VM runs on through a node's
    /// failure and makes new copies in the background.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Most new copies a second the background makes after a node failed
    /// (pages/s).
    #[arg(long, value_name = "PAGES_PER_S", default_value_t = vmm::excache::default_rereplicate_rate())]
    rereplicate_rate: u64,
    /// The cluster key (file of 32 random bytes, raw or hex; mode 600): the
    /// memory nodes are reached with it, both sides proving it, and a node that
    /// cannot is refused. Without --memnode, the node started for the run gets
    /// this key, or a fresh one when none is given.
    #[arg(long, value_name = "FILE")]
    auth_key: Option<PathBuf>,
    /// The VM's secret (a key file like --auth-key's): the memory nodes bind
    /// this VM id to it, so only a VMM holding it can act for the VM (a later
    /// VMM given the same --vm-id and secret can take the VM over). Default: a
    /// fresh secret for this run.
    #[arg(long, value_name = "FILE")]
    vm_secret: Option<PathBuf>,
    /// Encrypt guest pages before they leave the VMM (AES-256-GCM under a key
    /// made for this run, never sent anywhere): memory nodes store ciphertext.
    /// Every fetched page's integrity is checked with or without this.
    #[arg(long)]
    encrypt_pages: bool,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: usize,
    /// Eviction policy.
    #[arg(long, value_enum, default_value_t = EvictPolicy::Clock)]
    evict: EvictPolicy,
    /// Most pages to prefetch along a fault stream's trend (0: off; at most 1024).
    #[arg(long, default_value_t = 256)]
    prefetch: usize,
    /// How fault streams are found: `leap` (a majority trend per stream:
    /// strides either way, interleaved streams, an adaptive window) or `seq`
    /// (ascending runs only, the full window at once: the read-ahead before
    /// Leap).
    #[arg(long, value_enum, default_value_t = Prefetcher::Leap)]
    prefetcher: Prefetcher,
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
    /// How long a memory node may leave a request unanswered before it counts
    /// as failed, e.g. 500ms, 10s. A failed node is never used again; its
    /// pages are read from their other copies (--replicas), or the VM stops
    /// with an error naming it and the pages lost.
    #[arg(long, value_name = "DURATION", default_value = "500ms", value_parser = fabric::units::parse_duration)]
    node_timeout: std::time::Duration,
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
    /// Serve Prometheus metrics (`GET /metrics`, also on the API socket) over
    /// TCP on this loopback address, e.g. 127.0.0.1:9101 or just 9101.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
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
    console: Console,
    /// A virtio-blk disk: file:PATH[,ro], nbd://HOST:PORT/EXPORT[,ro] (a storage
    /// node), or over TLS nbds://HOST:PORT/EXPORT,ca=FILE[,cert=FILE,key=FILE]
    /// [,tls-name=NAME][,ro]; repeat for several.
    #[arg(long = "disk", value_name = "SPEC", requires = "kernel")]
    disks: Vec<DiskSpec>,
    /// A virtio-net device on a tap device: tap=NAME[,mac=MAC] (the tap is
    /// created if it does not exist, which needs CAP_NET_ADMIN); repeat for
    /// several.
    #[arg(long = "net", value_name = "SPEC", requires = "kernel")]
    nets: Vec<vmm::config::NetSpec>,
    /// Boot --kernel even where /dev/kvm is a software nested KVM (guest kernel
    /// mode is emulated there and a stock kernel does not finish booting).
    #[arg(long, requires = "kernel")]
    allow_software_kvm: bool,
}

/// Why a `vmm` command failed.
#[derive(Debug, thiserror::Error)]
enum CliError {
    /// The VM could not be built or did not run to its end.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The control API could not be reached.
    #[error(transparent)]
    Request(#[from] vmm::api::client::ClientError),
    /// The control API refused the request.
    #[error("the API answered {code}: {message}")]
    Api {
        /// The HTTP status.
        code: u16,
        /// The API's error message.
        message: String,
    },
    /// A node being detached is no longer listed.
    #[error("memory node {0} vanished from the VM's list")]
    Vanished(String),
    /// Draining a node failed; it stays attached.
    #[error("detaching memory node {addr} failed: {why}")]
    DetachFailed {
        /// The node.
        addr: String,
        /// The VM's reason.
        why: String,
    },
    /// `GET /stats` answered something else than statistics.
    #[error("unexpected stats from the API")]
    Stats(#[source] serde_json::Error),
    /// This binary's path is unknown (to find `memnode` beside it).
    #[error("cannot find this binary")]
    CurrentExe(#[source] std::io::Error),
    /// The local memory node could not be started.
    #[error("no --memnode given and cannot start {}", .path.display())]
    MemnodeSpawn {
        /// The memnode binary.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The local memory node's first line could not be read.
    #[error("reading from {}", .path.display())]
    MemnodeRead {
        /// The memnode binary.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The local memory node said something else than its address.
    #[error("{} did not start: {line:?}", .path.display())]
    MemnodeStart {
        /// The memnode binary.
        path: PathBuf,
        /// What it printed.
        line: String,
    },
    /// A signal handler could not be installed.
    #[error("cannot handle signal {sig}")]
    Signal {
        /// The signal.
        sig: i32,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The cluster key cannot be loaded or made.
    #[error(transparent)]
    Key(#[from] fabric::auth::KeyError),
    /// The started memory node could not be given its key.
    #[error("cannot hand the cluster key to {}", .path.display())]
    MemnodeKey {
        /// The memnode binary.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The `--stats-json` file could not be written.
    #[error("cannot write {}", .path.display())]
    WriteStats {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Run(a) => run(*a),
        Cmd::AttachMemnode(a) => attach_memnode(a).map(|()| ExitCode::SUCCESS),
        Cmd::DetachMemnode(a) => detach_memnode(a).map(|()| ExitCode::SUCCESS),
        Cmd::Stats(a) => stats(a).map(|()| ExitCode::SUCCESS),
        Cmd::Keygen { file } => fabric::auth::Key::generate()
            .and_then(|k| k.write_new(&file))
            .map(|()| {
                println!("wrote a new cluster key to {}", file.display());
                ExitCode::SUCCESS
            })
            .map_err(CliError::Key),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            // One line with the whole cause chain (a failed memory node's
            // address and why it failed).
            eprintln!("vmm: error: {}", fabric::client::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn api_error(code: u16, v: &serde_json::Value) -> CliError {
    CliError::Api {
        code,
        message: v["error"].as_str().unwrap_or("?").to_string(),
    }
}

fn attach_memnode(a: NodeArgs) -> Result<(), CliError> {
    let body = serde_json::json!({ "addr": a.addr });
    match vmm::api::request_with_body(&a.api_sock, "PUT", "/memnodes", Some(&body))? {
        (200, _) => {
            println!("memory node {} attached", a.addr);
            Ok(())
        }
        (code, v) => Err(api_error(code, &v)),
    }
}

fn detach_memnode(a: NodeArgs) -> Result<(), CliError> {
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
            .ok_or_else(|| CliError::Vanished(a.addr.clone()))?;
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
                return Err(CliError::DetachFailed {
                    addr: a.addr.clone(),
                    why: node["detach_error"]
                        .as_str()
                        .unwrap_or("unknown error")
                        .to_string(),
                });
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

/// Starts a memory node for this run on a free loopback port, holding `key`
/// (handed over its standard input, never in argv).
fn start_local_memnode(
    capacity: u64,
    key: &fabric::auth::Key,
) -> Result<(LocalMemnode, String), CliError> {
    use std::io::{BufRead, Write};
    let exe = std::env::current_exe().map_err(CliError::CurrentExe)?;
    let bin = exe.with_file_name("memnode");
    let mut child = std::process::Command::new(&bin)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--capacity",
            &capacity.to_string(),
            "--auth-key",
            "-",
        ])
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|source| CliError::MemnodeSpawn {
            path: bin.clone(),
            source,
        })?;
    {
        let mut stdin = child.stdin.take().expect("piped stdin");
        writeln!(stdin, "{}", key.to_hex()).map_err(|source| CliError::MemnodeKey {
            path: bin.clone(),
            source,
        })?;
    }
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("piped stdout"))
        .read_line(&mut line)
        .map_err(|source| CliError::MemnodeRead {
            path: bin.clone(),
            source,
        })?;
    let node = LocalMemnode(child);
    let addr = line
        .trim()
        .strip_prefix("memnode listening on ")
        .ok_or_else(|| CliError::MemnodeStart {
            path: bin.clone(),
            line: line.clone(),
        })?
        .to_string();
    Ok((node, addr))
}

/// The VM `vmm run` asked for.
fn vm_config(a: &RunArgs, vm_id: u64) -> VmConfig {
    let cache = CacheConfig {
        budget_pages: (a.local_cache / 4096) as usize,
        policy: a.evict,
        prefetch: a.prefetch.min(vmm::excache::MAX_PREFETCH),
        prefetcher: a.prefetcher,
        handlers: a.fault_threads.clamp(1, 64),
        remove_events: false,
        host_writes: false,
        dirty_log: a.dirty_log,
        rebalance: a.rebalance.unwrap_or(0),
        rereplicate_rate: a.rereplicate_rate,
        encrypt_pages: a.encrypt_pages,
    };
    let guest = match &a.kernel {
        Some(kernel) => GuestConfig::Linux(LinuxConfig {
            kernel: kernel.clone(),
            initrd: a.initrd.clone(),
            cmdline: a.cmdline.clone(),
            console: a.console.clone(),
            disks: a.disks.clone(),
            nets: a.nets.clone(),
            allow_software_kvm: a.allow_software_kvm,
        }),
        None => GuestConfig::Shim(ShimConfig {
            image: a.shim.clone().map_or(ShimImage::Builtin, ShimImage::Path),
            workload: a.workload.clone(),
        }),
    };
    VmConfig {
        mem: a.mem,
        vcpus: a.vcpus,
        cache,
        memnodes: a.memnodes.clone(),
        replicas: a.replicas,
        vm_id,
        link: a.link,
        node_timeout: a.node_timeout,
        api_sock: a.api_sock.clone(),
        metrics: a.metrics.clone(),
        start_paused: a.paused,
        guest,
        auth_key: None,
        vm_secret: None,
    }
}

fn run(mut a: RunArgs) -> Result<ExitCode, CliError> {
    let mut auth_key = match &a.auth_key {
        Some(p) => Some(fabric::auth::Key::load(p)?),
        None => None,
    };
    let _local_node = if a.memnodes.is_empty() {
        // The node started for this run gets the given key, else a fresh one.
        let key = match &auth_key {
            Some(k) => k.clone(),
            None => fabric::auth::Key::generate()?,
        };
        let (node, addr) = start_local_memnode(a.mem + (64 << 20), &key)?;
        auth_key = Some(key);
        log::info!("no --memnode given: started a memory node at {addr} for this run");
        a.memnodes.push(addr);
        Some(node)
    } else {
        None
    };
    let vm_id = a.vm_id.unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        (u64::from(std::process::id()) << 32) ^ t
    });
    // SIGINT/SIGTERM stop the VM cleanly (and the memory node started for it).
    let interrupt = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, interrupt.clone())
            .map_err(|source| CliError::Signal { sig, source })?;
    }
    let mut cfg = vm_config(&a, vm_id);
    cfg.auth_key = auth_key;
    cfg.vm_secret = match &a.vm_secret {
        Some(p) => Some(fabric::auth::Key::load(p)?),
        None => None,
    };
    match &cfg.guest {
        GuestConfig::Shim(s) => log::info!(
            "vm {vm_id:#x}: {} MiB guest RAM, {} MiB local cache ({:?}), {} vCPU(s), workload {}, memory nodes {}",
            a.mem >> 20,
            a.local_cache >> 20,
            a.evict,
            a.vcpus,
            s.workload.name,
            a.memnodes.join(", ")
        ),
        GuestConfig::Linux(l) => log::info!(
            "vm {vm_id:#x}: Linux {} ({} MiB guest RAM, {} MiB local cache, {} vCPU(s), {} disk(s)), memory nodes {}",
            l.kernel.display(),
            a.mem >> 20,
            a.local_cache >> 20,
            a.vcpus,
            l.disks.len(),
            a.memnodes.join(", ")
        ),
    }
    let report = builder::run(&cfg, &interrupt)?;
    let (ok, guest_json) = match (&report.outcome, &cfg.guest) {
        (GuestOutcome::Shim(outcomes), GuestConfig::Shim(s)) => {
            shim_summary(&s.workload, a.vcpus, outcomes, &report)
        }
        (GuestOutcome::Linux(exit), GuestConfig::Linux(l)) => linux_summary(l, exit, &report),
        _ => unreachable!("a run's outcome is of its guest's kind"),
    };
    if let Some(path) = &a.stats_json {
        write_stats(path, &a, &report, ok, guest_json)?;
    }
    if ok {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("vmm: error: the workload failed verification");
        Ok(ExitCode::FAILURE)
    }
}

/// Prints each shim vCPU's result and the run's totals; returns whether every
/// vCPU verified its workload, and the `--stats-json` keys of a shim run.
fn shim_summary(
    workload: &Workload,
    vcpus: usize,
    outcomes: &[VcpuOutcome],
    report: &RunReport,
) -> (bool, serde_json::Value) {
    let mut ok = outcomes.len() == vcpus;
    let mut vcpus_json = Vec::new();
    for (i, o) in outcomes.iter().enumerate() {
        let v = vmm::workload::report::vcpu(workload, i, o);
        ok &= v.ok;
        println!("{}", v.line);
        vcpus_json.push(v.json);
    }
    let kvm: Vec<_> = outcomes.iter().filter_map(|o| o.kvm).collect();
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
    let j = serde_json::json!({
        "guest": "shim",
        "workload": workload,
        "results": vcpus_json,
    });
    (ok, j)
}

/// Says how Linux ended (on stderr: stdout may be its console); returns the
/// `--stats-json` keys of a Linux run.
fn linux_summary(
    l: &LinuxConfig,
    exit: &GuestExit,
    report: &RunReport,
) -> (bool, serde_json::Value) {
    let how = match exit {
        GuestExit::PowerOff => "the guest powered off",
        GuestExit::Reset => "the guest rebooted (vmm does not restart it)",
    };
    eprintln!(
        "vmm: {how} after {:.3} s; {}",
        report.elapsed.as_secs_f64(),
        report.stats.summary()
    );
    let j = serde_json::json!({
        "guest": "linux",
        "kernel": l.kernel,
        "exit": format!("{exit:?}"),
    });
    (true, j)
}

/// Writes the `--stats-json` file: the keys of every run, then the guest
/// kind's (`guest_json`).
fn write_stats(
    path: &std::path::Path,
    a: &RunArgs,
    report: &RunReport,
    ok: bool,
    guest_json: serde_json::Value,
) -> Result<(), CliError> {
    let mut j = serde_json::json!({
        "ok": ok,
        "mem_bytes": a.mem,
        "local_cache_bytes": a.local_cache,
        "vcpus": a.vcpus,
        "evict": a.evict,
        "prefetch": a.prefetch,
        "prefetcher": a.prefetcher,
        "dirty_log": a.dirty_log,
        "memnodes": a.memnodes,
        "elapsed_s": report.elapsed.as_secs_f64(),
        "stats": report.stats,
        // [[µs, share of remote fetches at or below it], ...]
        "fetch_latency_cdf": report.fetch_cdf,
    });
    if let (Some(all), serde_json::Value::Object(guest)) = (j.as_object_mut(), guest_json) {
        all.extend(guest);
    }
    std::fs::write(path, serde_json::to_string_pretty(&j).unwrap_or_default()).map_err(|source| {
        CliError::WriteStats {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// `vmm stats --watch` on a terminal: the live view, redrawn every second.
fn watch_view(sock: &std::path::Path) -> Result<(), CliError> {
    use vmm::api::watch::{Sample, render, terminal_width};
    let Some(mut prev) = Sample::read(sock) else {
        println!("the VM has ended");
        return Ok(());
    };
    let mut at = std::time::Instant::now();
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
        let Some(cur) = Sample::read(sock) else {
            println!("the VM has ended");
            return Ok(());
        };
        let secs = at.elapsed().as_secs_f64();
        at = std::time::Instant::now();
        // Home the cursor and clear the screen, then draw.
        print!(
            "\x1b[H\x1b[2J{}",
            render(&prev, &cur, secs, terminal_width())
        );
        let _ = std::io::Write::flush(&mut std::io::stdout());
        prev = cur;
    }
}

fn get_stats(sock: &std::path::Path) -> Result<serde_json::Value, CliError> {
    match vmm::api::request(sock, "GET", "/stats")? {
        (200, v) => Ok(v),
        (code, v) => Err(api_error(code, &v)),
    }
}

fn stats(a: StatsArgs) -> Result<(), CliError> {
    let first = get_stats(&a.api_sock)?;
    if !a.watch {
        if a.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&first).unwrap_or_default()
            );
        } else {
            let s: vmm::excache::stats::StatsSnapshot =
                serde_json::from_value(first).map_err(CliError::Stats)?;
            println!("{}", s.summary());
        }
        return Ok(());
    }
    if !a.json && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        return watch_view(&a.api_sock);
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
