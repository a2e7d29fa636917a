//! Transports: how fabric frames cross the network.
//!
//! A [`Link`] is one connection that carries whole frames in both directions. The
//! pipelined client and the node servers are written against it, so a new transport
//! only has to move bytes. TCP ([`tcp::TcpLink`]) carries every frame.
//!
//! RDMA (module `rdma`, cargo feature `rdma`) is not a `Link`: an `rdma://` node is
//! reached over TCP for the handshake and every two-sided message, and page
//! reads go one-sided over a queue pair set up on that connection
//! (`rdma::RdmaReader`); see docs/protocol.md, "RDMA".

#[cfg(feature = "rdma")]
pub mod rdma;
pub mod tcp;

use std::io::IoSlice;
use std::time::Duration;

/// Transport failures, each naming the peer.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The address did not resolve.
    #[error("cannot resolve `{addr}`")]
    Resolve {
        /// The address as given.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Connecting failed.
    #[error("cannot connect to {addr}")]
    Connect {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Sending or receiving failed.
    #[error("i/o error on the link to {peer}")]
    Io {
        /// The peer.
        peer: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An `rdma://` address in a build without the RDMA transport.
    #[error("cannot reach {addr}: this build has no RDMA transport (build with `--features rdma`)")]
    NoRdma {
        /// The address.
        addr: String,
    },
    /// Setting up the RDMA link failed.
    #[error("cannot set up the RDMA link to {addr}: {reason}")]
    Rdma {
        /// The node.
        addr: String,
        /// Why.
        reason: String,
    },
    /// Nothing arrived within the receive timeout, or a send could not proceed
    /// within the send timeout.
    #[error("{peer} did not answer within {after:?}")]
    TimedOut {
        /// The peer.
        peer: String,
        /// The timeout.
        after: Duration,
    },
}

/// One bidirectional connection carrying fabric frames.
///
/// Senders must not interleave frames: callers serialise `send_vectored` (the client
/// holds a lock around it). Only one thread receives at a time.
pub trait Link: Send + Sync {
    /// Sends all bytes of `bufs`, in order, as one contiguous stream segment.
    fn send_vectored(&self, bufs: &mut [IoSlice<'_>]) -> Result<(), TransportError>;
    /// Receives some bytes into `buf`; `Ok(0)` means the peer closed the link.
    fn recv(&self, buf: &mut [u8]) -> Result<usize, TransportError>;
    /// Sets how long `recv` waits before failing with [`TransportError::TimedOut`].
    fn set_recv_timeout(&self, timeout: Option<Duration>) -> Result<(), TransportError>;
    /// Sets how long `send_vectored` may block before failing with
    /// [`TransportError::TimedOut`] (a peer that stopped reading).
    fn set_send_timeout(&self, timeout: Option<Duration>) -> Result<(), TransportError>;
    /// Closes both directions; blocked `recv` calls return.
    fn shutdown(&self);
    /// The peer's address, for messages.
    fn peer(&self) -> &str;
}
