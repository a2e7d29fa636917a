//! ACPI tables for a Linux guest, built with the rust-vmm `acpi_tables` crate:
//! RSDP → XSDT → FADT (hardware-reduced, with sleep control/status and reset
//! registers), DSDT (`\_S5` for power-off, the PCI root bridge `PCI0` with its
//! resources), MADT (one local APIC per vCPU, the IOAPIC).
//!
//! Hardware-reduced ACPI needs no PM timer, GPEs or SCI: a guest `poweroff`
//! writes `SLP_TYP | SLP_EN` to the sleep control register and a reboot writes
//! the reset value to the reset register, both I/O ports handled by
//! [`crate::devices::power`].

use super::layout::*;
use crate::devices::power::{RESET_PORT, RESET_VALUE, S5_SLP_TYP, SLEEP_CONTROL_PORT};
use crate::devices::serial::{COM1_IRQ, COM1_PORT};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, MADT, ProcessorLocalApic,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, aml};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::IntoBytes;

const OEM_ID: [u8; 6] = *b"SPLTVS";
/// Offset of the MADT's flags (after the 36-byte header and the LAPIC address).
const MADT_FLAGS: usize = 40;
const OEM_TABLE: [u8; 8] = *b"SPLITVSR";

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// The DSDT's AML body.
fn dsdt_body() -> Vec<u8> {
    let s5 = aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&S5_SLP_TYP, &S5_SLP_TYP, &aml::ZERO, &aml::ZERO]),
    );
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A03"));
    let adr = aml::Name::new("_ADR".into(), &aml::ZERO);
    let seg = aml::Name::new("_SEG".into(), &aml::ZERO);
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let bbn = aml::Name::new("_BBN".into(), &aml::ZERO);
    let bus = aml::AddressSpace::new_bus_number(0u16, 0u16);
    let cfg_io = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let io_window = aml::AddressSpace::new_io(0x1000u16, 0xffffu16, None);
    let mmio = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO_START as u32,
        (PCI_MMIO_END - 1) as u32,
        None,
    );
    let crs = aml::Name::new(
        "_CRS".into(),
        &aml::ResourceTemplate::new(vec![&bus, &cfg_io, &io_window, &mmio]),
    );
    let pci0 = aml::Device::new("_SB_.PCI0".into(), vec![&hid, &adr, &seg, &uid, &bbn, &crs]);
    // COM1. Hardware-reduced ACPI means no legacy PIC to Linux, so ISA
    // interrupts exist only as declared here (8250_pnp picks this up).
    let com_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let com_uid = aml::Name::new("_UID".into(), &aml::ONE);
    let com_irq = aml::Interrupt::new(true, true, false, false, COM1_IRQ);
    let com_io = aml::IO::new(COM1_PORT as u16, COM1_PORT as u16, 1, 8);
    let com_crs = aml::Name::new(
        "_CRS".into(),
        &aml::ResourceTemplate::new(vec![&com_io, &com_irq]),
    );
    let com1 = aml::Device::new("_SB_.COM1".into(), vec![&com_hid, &com_uid, &com_crs]);
    let mut body = bytes(&s5);
    body.extend(bytes(&pci0));
    body.extend(bytes(&com1));
    body
}

/// Writes all tables at [`ACPI_ADDR`]; returns the RSDP address.
pub fn write_tables(
    mem: &GuestMemoryMmap,
    vcpus: usize,
) -> Result<u64, vm_memory::GuestMemoryError> {
    let mut at = ACPI_ADDR + 64; // RSDP first, tables after it
    let mut place = |data: &[u8]| -> Result<u64, vm_memory::GuestMemoryError> {
        let addr = at;
        mem.write_slice(data, GuestAddress(addr))?;
        at = (at + data.len() as u64).next_multiple_of(16);
        Ok(addr)
    };

    // DSDT.
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE, 1);
    dsdt.append_slice(&dsdt_body());
    let dsdt_addr = place(dsdt.as_slice())?;

    // FADT.
    let io_gas = |port: u64| GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, port);
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE, 1)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.sleep_control_reg = io_gas(SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_gas(SLEEP_CONTROL_PORT + 1);
    fadt.reset_reg = io_gas(RESET_PORT);
    fadt.reset_value = RESET_VALUE;
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"SPLITVSR").into();
    let fadt_addr = place(&bytes(&fadt.finalize()))?;

    // MADT.
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE,
        1,
        LocalInterruptController::Address(LAPIC_ADDR as u32),
    );
    for i in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(
            i as u8,
            i as u8,
            EnabledStatus::Enabled,
        ));
    }
    madt.add_structure(IoApic::new(vcpus as u8, IOAPIC_ADDR as u32, 0));
    // Flags: PCAT_COMPAT (dual 8259s present, as KVM's in-kernel irqchip has;
    // the crate has no setter: patch the byte and the checksum). Linux ignores
    // the PIC under hardware-reduced ACPI, hence COM1 in the DSDT.
    let mut madt = bytes(&madt);
    madt[MADT_FLAGS] |= 1;
    madt[9] = madt[9].wrapping_sub(1);
    let madt_addr = place(&madt)?;

    // XSDT, then the RSDP pointing at it.
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, 1);
    for a in [fadt_addr, madt_addr] {
        xsdt.add_entry(a);
    }
    let xsdt_addr = place(&bytes(&xsdt))?;
    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);
    mem.write_slice(rsdp.as_bytes(), GuestAddress(ACPI_ADDR))?;
    Ok(ACPI_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(t: &[u8]) -> bool {
        t.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_are_checksummed_and_linked() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let rsdp = write_tables(&mem, 2).unwrap();
        let mut r = [0u8; 36];
        mem.read_slice(&mut r, GuestAddress(rsdp)).unwrap();
        assert_eq!(&r[..8], b"RSD PTR ");
        assert!(checksum_ok(&r[..20]) && checksum_ok(&r));
        let xsdt = u64::from_le_bytes(r[24..32].try_into().unwrap());
        let table = |addr: u64| {
            let mut h = [0u8; 8];
            mem.read_slice(&mut h, GuestAddress(addr)).unwrap();
            let len = u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
            let mut t = vec![0u8; len];
            mem.read_slice(&mut t, GuestAddress(addr)).unwrap();
            assert!(
                checksum_ok(&t),
                "{} checksum",
                String::from_utf8_lossy(&t[..4])
            );
            t
        };
        let x = table(xsdt);
        assert_eq!(&x[..4], b"XSDT");
        let sigs: Vec<Vec<u8>> = x[36..]
            .chunks(8)
            .map(|c| table(u64::from_le_bytes(c.try_into().unwrap()))[..4].to_vec())
            .collect();
        assert_eq!(sigs, vec![b"FACP".to_vec(), b"APIC".to_vec()]);
        let fadt = table(u64::from_le_bytes(x[36..44].try_into().unwrap()));
        let dsdt = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let d = table(dsdt);
        assert!(d.windows(4).any(|w| w == b"_S5_"));
        assert!(d.windows(4).any(|w| w == b"PCI0"));
        assert!(d.windows(4).any(|w| w == b"COM1"));
        let madt = table(u64::from_le_bytes(x[44..52].try_into().unwrap()));
        assert_eq!(madt[MADT_FLAGS] & 1, 1, "PCAT_COMPAT");
    }
}
