//! Failures of the cache's fault, eviction and drain paths.
//!
//! Each variant's message is short and names what failed (a memory node by its
//! address); the cause, if any, is its [`source`](std::error::Error::source),
//! never repeated in the message. Render the whole chain with
//! [`fabric::client::error_chain`]: `memory node 10.0.0.2:7000 failed: connection
//! to node 10.0.0.2:7000 lost: ...`.

use super::uffd::UffdError;
use fabric::ClientError;

/// A failure of the fault path, the evictor or a drain. In the fault path and
/// the evictor it is fatal: the VM stops on it ([`super::ExCache::fatal`]).
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    /// A memory node failed while serving a fault or a prefetch.
    #[error("memory node {addr} failed")]
    Fetch {
        /// The node's address.
        addr: String,
        /// Why.
        #[source]
        source: ClientError,
    },
    /// A page a memory node returned failed its integrity check.
    #[error("memory node {addr} returned a bad page")]
    Seal {
        /// The node's address.
        addr: String,
        /// What was wrong.
        #[source]
        source: super::seal::SealError,
    },
    /// A page could not be sealed for writing out.
    #[error(transparent)]
    Sealing(super::seal::SealError),
    /// A memory node failed while guest pages were written back to it.
    #[error("memory node {addr} failed")]
    WriteBack {
        /// The node's address.
        addr: String,
        /// Why.
        #[source]
        source: ClientError,
    },
    /// Every memory node is full or leaving: dirty pages cannot be written back.
    #[error(
        "every memory node is full (or leaving): cannot write back guest pages; attach a memory node with free capacity ({reasons})"
    )]
    AllFull {
        /// What the full nodes said.
        reasons: String,
    },
    /// No memory node has room for the pages a drain or rebalance moves.
    #[error("no memory node has room for the pages being moved")]
    NoRoomToMove,
    /// Write-back gave up after trying every node.
    #[error("cannot place guest pages on any memory node")]
    Unplaceable,
    /// A page is marked as having remote data, but no memory node holds it.
    #[error("page {0} has remote data but no memory node")]
    NoNode(usize),
    /// userfaultfd reported a fault outside the guest RAM it was registered for.
    #[error("fault outside guest memory (page {0})")]
    OutsideGuestMemory(usize),
    /// Reading the KVM dirty log failed.
    #[error("KVM_GET_DIRTY_LOG failed")]
    DirtyLog(#[source] kvm_ioctls::Error),
    /// Write-protecting guest pages (or lifting the protection) failed.
    #[error("userfaultfd write-protect of guest pages failed")]
    WriteProtect(#[source] userfaultfd::Error),
    /// Discarding evicted pages failed.
    #[error("madvise(MADV_DONTNEED) failed")]
    Discard(#[source] std::io::Error),
    /// Installing pages with userfaultfd failed.
    #[error("installing guest pages failed")]
    Install(#[source] UffdError),
    /// A fault handler could not set up its wait on the userfaultfd.
    #[error("cannot wait on the userfaultfd")]
    WaitSetup(#[source] std::io::Error),
    /// Waiting on the userfaultfd failed.
    #[error("waiting on the userfaultfd failed")]
    Wait(#[source] std::io::Error),
    /// Reading a userfaultfd event failed.
    #[error("reading userfaultfd events failed")]
    ReadEvent(#[source] userfaultfd::Error),
    /// Every copy of some pages was on memory nodes that failed.
    #[error(
        "{pages} guest pages lost: every copy of them was on memory nodes that failed ({nodes})"
    )]
    Lost {
        /// Pages with no copy left.
        pages: u64,
        /// The failed nodes, each with its cause.
        nodes: String,
    },
    /// The node being drained failed; its pages' other copies are repaired
    /// like any failed node's.
    #[error("memory node {0} failed while it was drained")]
    DrainedNodeFailed(String),
    /// The VM stopped before a drain finished.
    #[error("the VM stopped during the drain")]
    Stopped,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_failures_name_the_node_once_with_their_cause() {
        let addr = "10.0.0.2:7000";
        let lost = || ClientError::ConnectionLost {
            addr: addr.into(),
            reason: "reset by peer".into(),
        };
        let e = PathError::Fetch {
            addr: addr.into(),
            source: lost(),
        };
        assert_eq!(
            fabric::client::error_chain(&e),
            "memory node 10.0.0.2:7000 failed: connection to node 10.0.0.2:7000 lost: reset by peer"
        );
        let e = PathError::Fetch {
            addr: addr.into(),
            source: lost(),
        };
        assert_eq!(e.to_string(), "memory node 10.0.0.2:7000 failed");
        assert!(std::error::Error::source(&e).is_some());
    }

    #[test]
    fn every_node_full_keeps_its_text() {
        assert!(
            PathError::AllFull {
                reasons: "a: out of capacity".into()
            }
            .to_string()
            .starts_with("every memory node is full")
        );
    }
}
