//! # splitvisor-tests: cross-crate end-to-end tests
//!
//! Tests that start several of the workspace's daemons as separate processes
//! (`vmm`, `memnode`, `storagenode`) and check them together live here, with the
//! nested test host harness under `tests/nested/` (issue "vmm boots stock Linux
//! guests"). The per-crate integration tests stay next to their crates, e.g.
//! `memnode/tests/`.
