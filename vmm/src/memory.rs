//! Guest physical memory: the boot region and the arena.
//!
//! - The *boot region* `[0, DOORBELL_ADDR)` holds page tables, the GDT, the vCPU
//!   mailboxes, the shim image and stacks. It is ordinary anonymous memory,
//!   always resident, KVM memslot 0.
//! - The *arena* `[ARENA_BASE, ARENA_BASE + --mem)` is guest RAM proper: KVM memslot
//!   1 (dirty-logged with `--dirty-log`), registered with userfaultfd and managed by the
//!   [`crate::excache`]: at most `--local-cache` bytes of it are resident.

use guest_shim::abi::{ARENA_BASE, DOORBELL_ADDR};
use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::VmFd;
use std::sync::Arc;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MmapRegion,
};

/// KVM memslot of the boot region.
pub const BOOT_SLOT: u32 = 0;
/// KVM memslot of the arena.
pub const ARENA_SLOT: u32 = 1;

/// Memory setup failures.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Mapping guest memory failed.
    #[error("cannot map {0} bytes of guest memory")]
    Map(u64, #[source] vm_memory::mmap::FromRangesError),
    /// The regions do not form a valid guest memory.
    #[error("invalid guest memory layout")]
    Layout(#[source] vm_memory::GuestRegionCollectionError),
    /// KVM refused a memslot.
    #[error("KVM refused memslot {slot}")]
    Memslot {
        /// The slot.
        slot: u32,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// The guest's memory.
pub struct GuestRam {
    /// Both regions, for reading mailboxes.
    pub mem: GuestMemoryMmap,
    /// The boot region alone: what the shim loader may write (a bad ELF cannot
    /// scribble over the arena).
    pub boot: GuestMemoryMmap,
    /// The arena's mapping (a share of it: the mapping is unmapped when the
    /// last share goes). The [`crate::excache::ExCache`] keeps one, so the arena
    /// stays mapped while any cache thread runs.
    pub arena: Arc<MmapRegion>,
    /// Host address of the arena's first byte.
    pub arena_host: usize,
    /// Arena size in bytes.
    pub arena_size: u64,
}

impl GuestRam {
    /// Maps a boot region and an arena of `arena_size` bytes (a multiple of 4 KiB).
    pub fn new(arena_size: u64) -> Result<Self, MemoryError> {
        let map = |addr: u64, size: u64| {
            GuestRegionMmap::from_range(GuestAddress(addr), size as usize, None)
                .map(Arc::new)
                .map_err(|e| MemoryError::Map(size, e))
        };
        let boot_region = map(0, DOORBELL_ADDR)?;
        let arena_region = map(ARENA_BASE, arena_size)?;
        let arena = arena_region.get_mmap();
        let arena_host = arena.as_ptr() as usize;
        let boot = GuestMemoryMmap::from_arc_regions(vec![boot_region.clone()])
            .map_err(MemoryError::Layout)?;
        let mem = GuestMemoryMmap::from_arc_regions(vec![boot_region, arena_region])
            .map_err(MemoryError::Layout)?;
        Ok(GuestRam {
            mem,
            boot,
            arena,
            arena_host,
            arena_size,
        })
    }

    /// Maps a Linux guest's RAM: one arena of `size` bytes at guest physical 0
    /// (see [`crate::linux::layout`]); `boot` is the same memory.
    pub fn linux(size: u64) -> Result<Self, MemoryError> {
        let region = GuestRegionMmap::from_range(GuestAddress(0), size as usize, None)
            .map(Arc::new)
            .map_err(|e| MemoryError::Map(size, e))?;
        let arena = region.get_mmap();
        let arena_host = arena.as_ptr() as usize;
        let mem = GuestMemoryMmap::from_arc_regions(vec![region]).map_err(MemoryError::Layout)?;
        Ok(GuestRam {
            boot: mem.clone(),
            mem,
            arena,
            arena_host,
            arena_size: size,
        })
    }

    /// Registers a [`GuestRam::linux`] arena as the arena slot, dirty-logged if
    /// `dirty_log`.
    pub fn register_linux(&self, vm: &VmFd, dirty_log: bool) -> Result<(), MemoryError> {
        let r = kvm_userspace_memory_region {
            slot: ARENA_SLOT,
            flags: arena_flags(dirty_log),
            guest_phys_addr: 0,
            memory_size: self.arena_size,
            userspace_addr: self.arena_host as u64,
        };
        // SAFETY: the arena is a live mapping of `arena_size` bytes owned by
        // `self` (and shared with the cache), which outlives the VM: a
        // `builder::Vmm` drops its `GuestRam` after the VM.
        unsafe { vm.set_user_memory_region(r) }.map_err(|source| MemoryError::Memslot {
            slot: ARENA_SLOT,
            source,
        })
    }

    /// Registers both regions with KVM; the arena logs dirty pages if `dirty_log`.
    pub fn register(&self, vm: &VmFd, dirty_log: bool) -> Result<(), MemoryError> {
        for (slot, region) in self.mem.iter().enumerate() {
            let slot = slot as u32;
            let flags = if slot == ARENA_SLOT {
                arena_flags(dirty_log)
            } else {
                0
            };
            let r = kvm_userspace_memory_region {
                slot,
                flags,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping owned by `self.mem`, which outlives
            // the VM (a `builder::Vmm` drops its `GuestRam` after the VM), and its
            // size matches.
            unsafe { vm.set_user_memory_region(r) }
                .map_err(|source| MemoryError::Memslot { slot, source })?;
        }
        Ok(())
    }
}

/// Memslot flags of the arena. The dirty log is optional: with it on, KVM maps
/// only the faulting page on each guest fault (its "prefetch" of neighbouring
/// present pages is off for dirty-logged slots), which on a shadow-paging KVM
/// costs the guest an exit for every page it touches (see [`crate::excache::evict`]).
fn arena_flags(dirty_log: bool) -> u32 {
    if dirty_log {
        KVM_MEM_LOG_DIRTY_PAGES
    } else {
        0
    }
}
