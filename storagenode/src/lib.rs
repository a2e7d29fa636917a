//! # storagenode: LegoOS's storage component (sComponent)
//!
//! Not built yet (issue "Remote storage"). This crate will hold the storage node
//! daemon: block volumes as sparse files in a directory, served over the NBD protocol
//! (fixed newstyle handshake, named exports) so that the VMM's virtio-blk device and
//! standard tools (`qemu-io`, `nbd-client`) can use them, with writes made durable
//! at FLUSH and FUA. Nothing here works yet, and nothing pretends to.
