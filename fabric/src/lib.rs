//! # fabric: the network between Splitvisor's components
//!
//! LegoOS joins its hardware components with a network stack; this crate is ours.
//! Data flows through it like this: a VMM fault handler calls
//! [`client::PageClient::read_page`], which encodes a `ReadPages` frame
//! ([`proto`]), sends it over a [`transport::Link`] (TCP by default), and reads the
//! memory node's `ReadPagesOk` reply off the same link; the optional
//! [`link_model::LinkModel`] delays the reply's visibility to emulate a slower
//! interconnect. Memory nodes decode the same frames with [`proto::decode_frame`].
//!
//! - [`proto`]: the versioned, length-prefixed wire protocol with request ids.
//! - [`transport`]: the `Link` abstraction and its TCP implementation.
//! - [`link_model`]: latency and bandwidth emulation.
//! - [`client`]: the pipelined, thread-safe page client.
//! - [`acceptor`]: the node daemons' accept loop, connection limit and shutdown.
//! - [`units`]: parsing of sizes, durations and bandwidths for command lines.
//! - [`prometheus`]: the metrics text format every component serves.

pub mod acceptor;
pub mod auth;
pub mod client;
pub mod link_model;
pub mod prometheus;
pub mod proto;
pub mod ratelimit;
pub mod transport;
pub mod units;

pub use client::{ClientConfig, ClientError, NodeInfo, PageClient, Presence};
pub use link_model::LinkModel;
