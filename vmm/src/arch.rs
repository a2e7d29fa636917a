//! x86-64 state for a guest-shim VM: identity-mapping page tables, a GDT, and vCPU
//! registers that start the shim directly in 64-bit user mode (CPL3, IOPL 3).
//!
//! Starting at CPL3 is deliberate: on our machines' software nested KVM only guest
//! user mode runs natively, so the shim never enters kernel mode. There is no IDT;
//! any exception escalates to a triple fault, which the VMM reports with the
//! faulting instruction pointer.

use guest_shim::abi::{GDT_ADDR, MAX_MAPPED, PD_ADDR, PDPT_ADDR, PML4_ADDR};
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

const PTE_PRESENT: u64 = 1;
const PTE_WRITE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_HUGE: u64 = 1 << 7;

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const RFLAGS_RESERVED: u64 = 1 << 1;
const RFLAGS_IOPL3: u64 = 3 << 12;

/// GDT entries: null, kernel code64, kernel data, user data, user code64.
const GDT: [u64; 5] = [
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x00cf_f300_0000_ffff,
    0x00af_fb00_0000_ffff,
];
const USER_DATA_SEL: u16 = (3 << 3) | 3;
const USER_CODE_SEL: u16 = (4 << 3) | 3;

/// Writes the GDT and page tables identity-mapping `[0, mapped)` with 2 MiB pages,
/// user-accessible and writable.
pub fn write_tables<M: GuestMemoryBackend>(mem: &M, mapped: u64) -> Result<(), GuestMemoryError> {
    assert!(
        mapped <= MAX_MAPPED,
        "mapping beyond the page tables' reach"
    );
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + i as u64 * 8))?;
    }
    let flags = PTE_PRESENT | PTE_WRITE | PTE_USER;
    mem.write_obj(PDPT_ADDR | flags, GuestAddress(PML4_ADDR))?;
    let gibs = mapped.div_ceil(1 << 30);
    for g in 0..gibs {
        let pd = PD_ADDR + g * 0x1000;
        mem.write_obj(pd | flags, GuestAddress(PDPT_ADDR + g * 8))?;
        for e in 0..512u64 {
            let addr = (g << 30) + (e << 21);
            if addr >= mapped {
                break;
            }
            mem.write_obj(addr | flags | PTE_HUGE, GuestAddress(pd + e * 8))?;
        }
    }
    Ok(())
}

fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: 3,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Long-mode special registers for a CPL3 start, based on the vCPU's current ones.
pub fn user_mode_sregs(mut s: kvm_sregs) -> kvm_sregs {
    s.cs = segment(USER_CODE_SEL, true);
    let data = segment(USER_DATA_SEL, false);
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.gdt.base = GDT_ADDR;
    s.gdt.limit = (GDT.len() * 8 - 1) as u16;
    s.idt.base = 0;
    s.idt.limit = 0;
    s.tr = kvm_segment {
        base: 0,
        limit: 0x67,
        selector: 0,
        type_: 11,
        present: 1,
        s: 0,
        ..Default::default()
    };
    s.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    s.cr3 = PML4_ADDR;
    s.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    s.efer = EFER_LME | EFER_LMA;
    s
}

/// General registers: `rip` at the shim's entry, the System V arguments (vCPU index,
/// mailbox address) and a stack whose pointer is 8 below 16-byte alignment, as at
/// a function's entry.
pub fn user_mode_regs(entry: u64, stack_top: u64, vcpu: u64, mailbox: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: stack_top - 8,
        rdi: vcpu,
        rsi: mailbox,
        rflags: RFLAGS_RESERVED | RFLAGS_IOPL3,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn tables_map_identity_with_user_2m_pages() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap();
        write_tables(&mem, 3 << 30).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4, PDPT_ADDR | 7);
        let pdpt2: u64 = mem.read_obj(GuestAddress(PDPT_ADDR + 16)).unwrap();
        assert_eq!(pdpt2, (PD_ADDR + 0x2000) | 7);
        let e: u64 = mem
            .read_obj(GuestAddress(PD_ADDR + 0x2000 + 5 * 8))
            .unwrap();
        assert_eq!(e, ((2 << 30) + (5 << 21)) | 0x87);
    }
}
