//! vCPU state for the Linux 64-bit boot protocol: long mode with identity page
//! tables, a flat GDT, the boot MSRs, a CPUID with each vCPU's APIC id, and the
//! local APIC's LINT0/LINT1 wired as on a PC (ExtINT, NMI).

use super::layout::*;
use kvm_bindings::{CpuId, Msrs, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// vCPU setup failures.
#[derive(Debug, thiserror::Error)]
#[error("vCPU {vcpu}: {what} failed")]
pub struct CpuError {
    /// The vCPU.
    pub vcpu: usize,
    /// The step.
    pub what: &'static str,
    /// Why.
    #[source]
    pub source: kvm_ioctls::Error,
}

const GDT: [u64; 4] = [
    0,
    0x00af_9b00_0000_ffff, // code64
    0x00cf_9300_0000_ffff, // data
    0x008f_8b00_0000_ffff, // TSS
];

/// Writes the GDT, an empty IDT and page tables identity-mapping 4 GiB.
pub fn write_tables(mem: &GuestMemoryMmap) -> Result<(), vm_memory::GuestMemoryError> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))?;
    mem.write_obj(PDPT_ADDR | 0x3, GuestAddress(PML4_ADDR))?;
    for i in 0..4u64 {
        let pd = PD_ADDR + i * 0x1000;
        mem.write_obj(pd | 0x3, GuestAddress(PDPT_ADDR + i * 8))?;
        let entries: Vec<u8> = (0..512u64)
            .flat_map(|j| (((i << 30) | (j << 21)) | 0x83).to_le_bytes())
            .collect();
        mem.write_slice(&entries, GuestAddress(pd))?;
    }
    Ok(())
}

fn segment(selector: u16, type_: u8, s: u8, l: u8, db: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

fn e(vcpu: usize, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CpuError {
    move |source| CpuError { vcpu, what, source }
}

/// Sets up vCPU `id` of `count` for the kernel entry at `entry`.
pub fn setup(
    vcpu: &VcpuFd,
    id: usize,
    count: usize,
    cpuid: &CpuId,
    entry: u64,
) -> Result<(), CpuError> {
    vcpu.set_cpuid2(&vcpu_cpuid(cpuid, id, count))
        .map_err(e(id, "set CPUID"))?;
    let msrs = Msrs::from_entries(&boot_msrs()).expect("fixed MSR list fits");
    vcpu.set_msrs(&msrs).map_err(e(id, "set MSRs"))?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(e(id, "set FPU"))?;
    set_lint(vcpu).map_err(e(id, "set local APIC"))?;
    if id != 0 {
        // Application processors wait for INIT/SIPI from the boot processor.
        return Ok(());
    }
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(e(id, "get sregs"))?;
    let code = segment(0x08, 0xb, 1, 1, 0);
    let data = segment(0x10, 0x3, 1, 0, 1);
    let mut tss = segment(0x18, 0xb, 0, 0, 0);
    tss.g = 0;
    tss.limit = 0xfffff;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cr0 = (1 << 0) | (1 << 4) | (1 << 31); // PE, ET, PG
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = 1 << 5; // PAE
    sregs.efer = (1 << 8) | (1 << 10); // LME, LMA
    vcpu.set_sregs(&sregs).map_err(e(id, "set sregs"))?;
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: ZERO_PAGE,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(e(id, "set registers"))
}

fn boot_msrs() -> Vec<kvm_msr_entry> {
    let m = |index: u32, data: u64| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        m(0x174, 0),             // SYSENTER_CS
        m(0x175, 0),             // SYSENTER_ESP
        m(0x176, 0),             // SYSENTER_EIP
        m(0xc000_0081, 0),       // STAR
        m(0xc000_0082, 0),       // LSTAR
        m(0xc000_0083, 0),       // CSTAR
        m(0xc000_0084, 0),       // SYSCALL_MASK
        m(0xc000_0102, 0),       // KERNEL_GS_BASE
        m(0x10, 0),              // TSC
        m(0x1a0, 1),             // MISC_ENABLE: fast strings
        m(0x2ff, (1 << 11) | 6), // MTRR default type: enabled, write-back
    ]
}

/// The supported CPUID with vCPU `id`'s APIC id and the topology filled in.
fn vcpu_cpuid(base: &CpuId, id: usize, count: usize) -> CpuId {
    let mut c = base.clone();
    for entry in c.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ebx = (entry.ebx & 0x0000_ffff)
                    | ((id as u32) << 24)
                    | ((count.max(1) as u32 & 0xff) << 16);
                if count > 1 {
                    entry.edx |= 1 << 28; // HTT: several logical processors
                }
                entry.ecx |= 1 << 31; // running under a hypervisor
            }
            0xb | 0x1f => entry.edx = id as u32,
            _ => {}
        }
    }
    c
}

fn set_lint(vcpu: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    const LVT_LINT0: usize = 0x350;
    const LVT_LINT1: usize = 0x360;
    const EXTINT: u32 = 7 << 8;
    const NMI: u32 = 4 << 8;
    let mut lapic = vcpu.get_lapic()?;
    for (off, mode) in [(LVT_LINT0, EXTINT), (LVT_LINT1, NMI)] {
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = lapic.regs[off + i] as u8;
        }
        let v = (u32::from_le_bytes(b) & !0x700) | mode;
        for (i, x) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *x as _;
        }
    }
    vcpu.set_lapic(&lapic)
}
