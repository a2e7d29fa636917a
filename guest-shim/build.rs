//! Compiles the shim program (`shim/main.rs`) into a freestanding ELF with the
//! installed toolchain: the host target, `panic=abort`, no libc, our linker script.
//! A separate rustc invocation, because cargo cannot build one workspace binary with
//! `panic=abort` and a custom link line while the rest unwinds.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let src = manifest.join("shim/main.rs");
    let ld = manifest.join("shim/link.ld");
    let elf = out_dir.join("guest-shim.elf");
    for f in ["shim", "src/abi.rs"] {
        println!("cargo:rerun-if-changed={f}");
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let status = Command::new(&rustc)
        .args([
            "--edition",
            "2024",
            "--crate-type",
            "bin",
            "--crate-name",
            "guest_shim",
        ])
        .args(["--target", "x86_64-unknown-linux-gnu"])
        .args([
            "-C",
            "panic=abort",
            "-C",
            "opt-level=3",
            "-C",
            "debuginfo=0",
            "-C",
            "strip=debuginfo",
        ])
        .args(["-C", "relocation-model=static", "-C", "code-model=small"])
        .args([
            "-C",
            "link-arg=-nostartfiles",
            "-C",
            "link-arg=-nostdlib",
            "-C",
            "link-arg=-static",
        ])
        .args([
            "-C",
            "link-arg=-no-pie",
            "-C",
            "link-arg=-Wl,--build-id=none",
        ])
        .arg("-C")
        .arg(format!("link-arg=-Wl,-T,{}", ld.display()))
        .arg("-o")
        .arg(&elf)
        .arg(&src)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()
        .expect("run rustc for the guest shim");
    assert!(status.success(), "building the guest shim failed");
    println!("cargo:rustc-env=GUEST_SHIM_ELF={}", elf.display());
    // Also place it beside the workspace's binaries: target/<profile>/guest-shim.
    if let Some(profile_dir) = out_dir.ancestors().nth(3) {
        let _ = std::fs::copy(&elf, profile_dir.join("guest-shim"));
    }
}
