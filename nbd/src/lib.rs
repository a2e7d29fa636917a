//! The NBD protocol: the wire format shared by server and client ([`wire`]), and
//! the pipelined client ([`client`]) that the VMM's virtio-blk backend uses.

pub mod client;
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
