//! # guest-shim: a minimal freestanding guest
//!
//! A `no_std` x86-64 program that the VMM loads as an ELF and starts directly in
//! 64-bit user mode, where it runs at native speed even on the software nested KVM
//! of our machines (whose guest kernel mode is emulated). It runs one memory
//! workload over the guest RAM arena (sequential, random, pointer chase, hash
//! table), verifies every word it reads against what it wrote, and reports a result
//! and a checksum to the VMM through [`abi`].
//!
//! This crate is two things: the [`abi`] shared with the VMM, and the shim program
//! itself (`shim/main.rs`), which `build.rs` compiles with the installed toolchain
//! (`x86_64-unknown-linux-gnu`, `panic=abort`, a linker script, no libc) into an ELF
//! embedded here as [`SHIM_ELF`] and also written next to the other binaries as
//! `target/<profile>/guest-shim`.
#![no_std]

pub mod abi;

/// The shim program, an ELF64 executable linked at [`abi::SHIM_LOAD_ADDR`].
pub static SHIM_ELF: &[u8] = include_bytes!(env!("GUEST_SHIM_ELF"));
