//! # nbd-proto: the NBD protocol, for both ends of a connection
//!
//! The pieces of NBD (the Network Block Device protocol, `doc/proto.md` of
//! github.com/NetworkBlockDevice/nbd) that are not a server: the wire format
//! ([`wire`]), which the storage node (`storagenode`) and the client share, and the
//! pipelined client ([`client`]) that the VMM's virtio-blk backend
//! (`vmm::devices::nbd_disk`) uses to reach a storage node or any NBD server
//! (`qemu-nbd`, `nbdkit`). Nothing here serves volumes: the server, its volumes and
//! its accept loop stay in `storagenode`, which depends on this crate (never the
//! other way round), so the VMM gets the client without the server.
//!
//! How data flows through the client ([`client::NbdClient`]):
//!
//! 1. connecting, the client haggles options with the server (fixed-newstyle
//!    handshake, `NBD_OPT_GO` asking for block sizes, falling back to
//!    `NBD_OPT_EXPORT_NAME`), encoding and decoding each message with [`wire`];
//! 2. a request is checked against what the server advertised, takes a slot in the
//!    table of requests in flight, and its header ([`wire::Request`]) and any write
//!    payload go out with one `writev` ([`write_all_vectored`]);
//! 3. a reader thread decodes each reply header ([`wire::SimpleReply`]), matches it
//!    to its slot by handle, reads a read's data straight into the request's buffer
//!    and runs the request's completion callback.
//!
//! The server does the mirror image with the same [`wire`] types: it decodes
//! requests and encodes replies and handshake answers.

pub mod client;
pub mod stream;
pub mod tls;
pub mod wire;

use std::io::{self, IoSlice, Write};

/// Writes every byte of `bufs` with as few `writev` calls as the socket allows
/// (one, unless the send buffer is full). Used by the client for a request and its
/// payload, and by the server for a reply and its data.
pub fn write_all_vectored<W: Write>(w: &mut W, bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    let mut bufs = bufs;
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
