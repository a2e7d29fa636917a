//! KVM's own counters (exits, page faults it fixed, shadow pages zapped, …) read
//! through the binary statistics interface (`KVM_GET_STATS_FD`, Linux 5.14+).
//!
//! Faulting a page in is only half of what remote memory costs a guest: each page
//! installed (or re-installed after eviction) also costs the vCPU a KVM exit when
//! it first touches it. These counters let a run report that cost next to the
//! cache's own figures. kvm-ioctls has no wrapper for the stats fd yet, so the
//! ioctl and the file layout (`struct kvm_stats_header`, `struct kvm_stats_desc`
//! from kvm-bindings) are read here.

use kvm_bindings::{kvm_stats_desc, kvm_stats_header};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use vmm_sys_util::ioctl::ioctl;

#[allow(missing_docs)]
mod ioctls {
    use vmm_sys_util::ioctl_io_nr;
    const KVMIO: u32 = 0xAE;
    ioctl_io_nr!(KVM_GET_STATS_FD, KVMIO, 0xce);
}
use ioctls::KVM_GET_STATS_FD;

/// Failures reading KVM statistics.
#[derive(Debug, thiserror::Error)]
pub enum KvmStatsError {
    /// The kernel has no binary statistics for this fd.
    #[error("KVM_GET_STATS_FD failed")]
    Open(#[source] std::io::Error),
    /// The statistics file could not be read.
    #[error("reading KVM statistics failed")]
    Read(#[source] std::io::Error),
    /// The statistics file's layout made no sense.
    #[error("malformed KVM statistics: {0}")]
    Malformed(&'static str),
}

/// Reads every counter of a VM or vCPU fd: name → first value.
pub fn read(fd: &impl AsRawFd) -> Result<BTreeMap<String, u64>, KvmStatsError> {
    // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd or -1.
    let raw = unsafe { ioctl(fd, KVM_GET_STATS_FD()) };
    if raw < 0 {
        return Err(KvmStatsError::Open(std::io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh fd that nothing else owns.
    let file = unsafe { File::from_raw_fd(raw) };
    let mut hdr = [0u8; size_of::<kvm_stats_header>()];
    file.read_exact_at(&mut hdr, 0)
        .map_err(KvmStatsError::Read)?;
    let word = |b: &[u8], i: usize| u32::from_ne_bytes(b[i * 4..i * 4 + 4].try_into().unwrap());
    let (name_size, num_desc, desc_offset, data_offset) = (
        word(&hdr, 1) as usize,
        word(&hdr, 2) as usize,
        word(&hdr, 4) as u64,
        word(&hdr, 5) as u64,
    );
    if name_size == 0 || name_size > 4096 || num_desc > 4096 {
        return Err(KvmStatsError::Malformed("implausible header"));
    }
    let desc_size = size_of::<kvm_stats_desc>() + name_size;
    let mut descs = vec![0u8; desc_size * num_desc];
    file.read_exact_at(&mut descs, desc_offset)
        .map_err(KvmStatsError::Read)?;
    let mut out = BTreeMap::new();
    for d in descs.chunks_exact(desc_size) {
        // flags u32, exponent i16, size u16, offset u32, bucket_size u32, name.
        let size = u16::from_ne_bytes([d[6], d[7]]);
        let offset = word(d, 2) as u64;
        let name = &d[size_of::<kvm_stats_desc>()..];
        let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
        if size == 0 {
            continue;
        }
        let mut v = [0u8; 8];
        file.read_exact_at(&mut v, data_offset + offset)
            .map_err(KvmStatsError::Read)?;
        out.insert(
            String::from_utf8_lossy(name).into_owned(),
            u64::from_ne_bytes(v),
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_a_fresh_vcpus_counters() {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let v = super::read(&vcpu).expect("vCPU statistics");
        assert_eq!(v.get("exits"), Some(&0), "{v:?}");
        assert!(v.contains_key("pf_fixed"), "{v:?}");
        let m = super::read(&vm).expect("VM statistics");
        assert!(m.contains_key("mmu_shadow_zapped"), "{m:?}");
    }
}
