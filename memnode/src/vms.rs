//! The node's VMs: per-VM counters, the key each VM is bound to, and its quota.
//!
//! A VM id is an address space on the node. The first VMM session that proves a
//! VM identity ([`fabric::auth`]) binds the id to that identity's public key;
//! every later VMM session for the id must prove the same key, else it is
//! refused. The entry (binding included) lives while the VM has pages stored or
//! sessions open, so a VM whose pages are here cannot be claimed by another
//! key; an entry with neither is forgotten, so clients naming ever new ids
//! cannot grow the table without bound.

use fabric::auth::VmPublicKey;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock, RwLock};

/// Per-VM counters.
#[derive(Debug, Default)]
pub struct VmStats {
    /// Open connections acting on this VM.
    pub connections: AtomicU64,
    /// Pages stored (and, while a write is under way, reserved for it).
    pub pages: AtomicU64,
    /// Page reads served.
    pub reads: AtomicU64,
    /// Reads of pages never written.
    pub zero_reads: AtomicU64,
    /// Page writes stored.
    pub writes: AtomicU64,
    /// Pages freed.
    pub frees: AtomicU64,
    /// Page bytes received.
    pub bytes_in: AtomicU64,
    /// Page bytes sent.
    pub bytes_out: AtomicU64,
    /// Writes refused because the VM was at its quota.
    pub quota_refusals: AtomicU64,
    /// The VM identity the id is bound to (set by its first VMM session).
    owner: OnceLock<VmPublicKey>,
}

/// Why a session could not be opened for a VM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindError {
    /// The VM id is bound to another VMM's key.
    #[error(
        "vm {vm:#x} is bound on this node to another VMM's key: only the VMM holding that VM's secret (vmm run --vm-secret) may act for it"
    )]
    OtherOwner {
        /// The VM id.
        vm: u64,
    },
}

/// Every VM the node knows.
#[derive(Default)]
pub struct VmTable {
    vms: RwLock<HashMap<u64, Arc<VmStats>>>,
}

impl VmTable {
    /// Opens a session for `vm`. A VMM session gives the identity it proved
    /// (`owner`): the first binds the id to it, later ones must match. An
    /// admin session (`None`) sees counters only and binds nothing.
    pub fn open(&self, vm: u64, owner: Option<&VmPublicKey>) -> Result<Arc<VmStats>, BindError> {
        // The write lock orders this with `close`'s forgetting: an entry is
        // never dropped between its check here and its connection count.
        let mut vms = self.vms.write().unwrap();
        let stats = vms.entry(vm).or_default();
        if let Some(key) = owner
            && stats.owner.get_or_init(|| *key) != key
        {
            return Err(BindError::OtherOwner { vm });
        }
        stats.connections.fetch_add(1, Relaxed);
        Ok(stats.clone())
    }

    /// Ends a session opened with [`VmTable::open`]; forgets the VM (its
    /// binding too) once it has no pages and no sessions, and then returns true.
    pub fn close(&self, vm: u64, stats: Arc<VmStats>) -> bool {
        self.close_with(vm, stats, || {})
    }

    /// As [`VmTable::close`], calling `forgotten` if the VM is forgotten,
    /// while no session of it can open.
    pub fn close_with(&self, vm: u64, stats: Arc<VmStats>, forgotten: impl FnOnce()) -> bool {
        stats.connections.fetch_sub(1, Relaxed);
        drop(stats);
        let mut vms = self.vms.write().unwrap();
        if let Some(s) = vms.get(&vm)
            && s.pages.load(Relaxed) == 0
            && s.connections.load(Relaxed) == 0
        {
            vms.remove(&vm);
            forgotten();
            return true;
        }
        false
    }

    /// The counters of `vm`, if the node knows it.
    pub fn get(&self, vm: u64) -> Option<Arc<VmStats>> {
        self.vms.read().unwrap().get(&vm).cloned()
    }

    /// A snapshot of every VM's counters, by id.
    pub fn snapshot(&self) -> Vec<(u64, Arc<VmStats>)> {
        let mut v: Vec<_> = self
            .vms
            .read()
            .unwrap()
            .iter()
            .map(|(k, s)| (*k, s.clone()))
            .collect();
        v.sort_by_key(|(k, _)| *k);
        v
    }

    /// VMs that have pages stored.
    pub fn with_pages(&self) -> u64 {
        self.vms
            .read()
            .unwrap()
            .values()
            .filter(|s| s.pages.load(Relaxed) > 0)
            .count() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_is_bound_to_its_first_key_until_it_is_forgotten() {
        let t = VmTable::default();
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let s = t.open(7, Some(&a)).unwrap();
        assert_eq!(
            t.open(7, Some(&b)).unwrap_err(),
            BindError::OtherOwner { vm: 7 }
        );
        let again = t.open(7, Some(&a)).unwrap();
        let admin = t.open(7, None).unwrap();
        assert_eq!(s.connections.load(Relaxed), 3);
        // Pages keep the binding after every session ends.
        s.pages.store(1, Relaxed);
        for x in [again, admin, s.clone()] {
            t.close(7, x);
        }
        assert!(
            t.open(7, Some(&b)).is_err(),
            "the VM's pages are still here"
        );
        s.pages.store(0, Relaxed);
        let s2 = t.open(7, Some(&a)).unwrap();
        t.close(7, s2);
        assert!(t.get(7).is_none(), "no pages, no sessions: forgotten");
        let s3 = t.open(7, Some(&b)).unwrap();
        t.close(7, s3);
    }
}
