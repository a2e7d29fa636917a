//! # storagenode: LegoOS's storage component (sComponent), speaking NBD
//!
//! A storage node serves block volumes over the network with the NBD protocol
//! (fixed-newstyle handshake, named exports, simple replies), so that the VMM's
//! virtio-blk device and standard tools (`qemu-io`, `qemu-img`, `nbd-client`) can
//! use them. A volume is a sparse file in the node's directory, named after its
//! export ([`volume`]).
//!
//! A block's path through the node: a client's request header (and a write's
//! payload) arrives on the connection's reader thread ([`server`]), which checks it
//! against the export (range, size, flags, read-only) and either serves it at once
//! — a read whose data is in the page cache, a small write without FUA — or hands
//! it to the node's I/O worker pool. Whoever served it sends the reply, header and
//! data with one `writev`. Replies may go out of order, as NBD allows.
//!
//! ## Durability
//!
//! A write is acknowledged once it is in the kernel's page cache, which survives the
//! storage node being killed (even with `SIGKILL`) but not the machine losing power.
//! What the client asks to be durable is made durable before the reply is sent:
//!
//! - a write with `NBD_CMD_FLAG_FUA`: `pwritev2(..., RWF_DSYNC)`, i.e. the data and
//!   the metadata needed to read it back are on stable storage when the call
//!   returns (where `RWF_DSYNC` is unsupported: `pwrite` then `fdatasync`);
//! - `NBD_CMD_FLUSH`: `fdatasync(2)` on the volume, issued after the flush was
//!   received, so it covers every write that had completed (been replied to) by
//!   then, on any connection: all connections to a volume share one file
//!   descriptor, which is why `NBD_FLAG_CAN_MULTI_CONN` is advertised;
//! - trim and write-zeroes with FUA: the `fallocate` (or zero writes), then
//!   `fdatasync`;
//! - `--create`: the new file and its directory entry are `fsync`ed before the node
//!   starts serving.
//!
//! At a clean stop (`SIGINT`/`SIGTERM`) the node also `fdatasync`s every volume it
//! opened.
//!
//! ## The wire format and the client
//!
//! The NBD wire format the server speaks ([`nbd_proto::wire`]) and the pipelined
//! client ([`nbd_proto::client::NbdClient`], which the VMM uses and which this
//! node's tests and benchmark drive it with) live in the `nbd-proto` crate: this
//! crate depends on it, so a client needs none of the server.

pub mod metrics;
pub mod server;
pub mod volume;

pub use server::{Server, ServerConfig, ServerError, ShutdownHandle};
pub use volume::{VolumeDir, VolumeError};
