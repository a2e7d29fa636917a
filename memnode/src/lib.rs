//! # memnode: the memory node (LegoOS's mComponent)
//!
//! A memory node stores the pages of many VMs' guest memory and serves them over the
//! fabric protocol. A page's path through it: a VMM's `WritePages` frame arrives on
//! a connection thread ([`server`]), which decodes it and stores each 4 KiB page in
//! the sharded [`store::PageStore`] under (VM id, guest page number); a later
//! `ReadPages` copies the page straight from the store into the reply buffer. Pages
//! never written read as zeros and take no space. [`metrics`] exposes the counters
//! to Prometheus.

pub mod client_checks;
pub mod metrics;
#[cfg(feature = "rdma")]
pub mod rdma;
pub mod regions;
pub mod server;
pub mod store;
pub mod vms;

pub use server::{Server, ServerConfig, ServerError, ShutdownHandle};
