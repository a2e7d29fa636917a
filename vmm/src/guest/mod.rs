//! Guest kinds' own parts of a VM, beside the common ones of
//! [`crate::builder`]: the guest shim here; Linux in [`crate::linux`].

pub mod shim;
