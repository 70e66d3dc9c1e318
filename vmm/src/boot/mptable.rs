//! The MP table (Intel MultiProcessor Specification 1.4): how a guest without ACPI learns its
//! CPUs, the IO-APIC and the ISA interrupt routing. Placed at [`layout::MPTABLE_ADDR`], the last
//! KiB of conventional memory, where Linux scans for the `_MP_` floating pointer.

use vm_memory::{Bytes, GuestAddress};

use super::BootError;
use crate::layout;
use crate::memory::GuestMemory;

const APIC_DEFAULT_PHYS_BASE: u32 = 0xfee0_0000;
const IO_APIC_DEFAULT_PHYS_BASE: u32 = 0xfec0_0000;
const APIC_VERSION: u8 = 0x14;
const IO_APIC_VERSION: u8 = 0x11;
const MP_SPEC_REV: u8 = 4;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
/// Family 6 signature and the FPU + APIC feature flags, as firmware reports them.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IOINT: u8 = 3;
const ENTRY_LINTSRC: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const MP_APIC_ALL: u8 = 0xff;
const BSP_APIC_ID: u8 = 0;
const FLOATING_POINTER_SIZE: usize = 16;
/// Room for the whole table: the last KiB of conventional memory.
const MPTABLE_MAX_SIZE: usize = 1024;
/// Most vCPUs the table has room for (20 bytes each, after the fixed entries).
pub const MAX_CPUS: u8 = 32;

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_sub(*b))
}

/// Builds the floating pointer followed by the configuration table, for a table placed at
/// `base`.
pub fn build_mptable(base: u64, vcpus: u8) -> Result<Vec<u8>, BootError> {
    if vcpus == 0 || vcpus > MAX_CPUS {
        return Err(BootError::TooManyCpus(vcpus));
    }
    let ioapic_id = vcpus + 1;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..vcpus {
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION]);
        entries.push(CPU_ENABLED | if cpu == 0 { CPU_BSP } else { 0 });
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IO_APIC_VERSION, 1]);
    entries.extend_from_slice(&IO_APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    count += 1;
    // Every ISA IRQ is an ordinary interrupt on the IO-APIC pin of the same number, as KVM's
    // default GSI routing wires them (the in-kernel PIT raises GSI 0, hence pin 0). No pin is
    // ExtINT: the legacy PIC reaches the CPU through LINT0 only. An ExtINT IO-APIC entry makes
    // Linux route the timer through the PIC on that pin ("ExtINT not setup in hardware but
    // reported by MP table"), which KVM's IO-APIC does not do, and the guest dies in early boot.
    for irq in 0..=layout::MAX_LEGACY_GSI as u8 {
        entries.extend_from_slice(&[ENTRY_IOINT, INT_TYPE_INT, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // LINT0: the PIC's output (ExtINT), wired to the boot CPU only; LINT1: NMI on every CPU.
    entries.extend_from_slice(&[ENTRY_LINTSRC, INT_TYPE_EXTINT, 0, 0, 0, 0, BSP_APIC_ID, 0]);
    entries.extend_from_slice(&[ENTRY_LINTSRC, INT_TYPE_NMI, 0, 0, 0, 0, MP_APIC_ALL, 1]);
    count += 2;

    let table_addr = base + FLOATING_POINTER_SIZE as u64;
    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(MP_SPEC_REV);
    table.push(0); // checksum, filled below
    table.extend_from_slice(b"SGEVIRT ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    table.extend_from_slice(&[0u8; 4]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(FLOATING_POINTER_SIZE + table.len());
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fp.extend_from_slice(&[1, MP_SPEC_REV, 0, 0, 0, 0, 0, 0]);
    fp[10] = checksum(&fp);
    fp.extend_from_slice(&table);
    if fp.len() > MPTABLE_MAX_SIZE {
        return Err(BootError::TooManyCpus(vcpus));
    }
    Ok(fp)
}

/// Writes the MP table for `vcpus` vCPUs.
pub fn write_mptable(mem: &GuestMemory, vcpus: u8) -> Result<(), BootError> {
    let bytes = build_mptable(layout::MPTABLE_ADDR, vcpus)?;
    mem.write_slice(&bytes, GuestAddress(layout::MPTABLE_ADDR))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_make_each_structure_sum_to_zero() {
        for n in [1u8, 2, MAX_CPUS] {
            let t = build_mptable(layout::MPTABLE_ADDR, n).unwrap();
            let sum = |b: &[u8]| b.iter().fold(0u8, |a, x| a.wrapping_add(*x));
            assert_eq!(sum(&t[..16]), 0);
            let len = u16::from_le_bytes([t[20], t[21]]) as usize;
            assert_eq!(sum(&t[16..16 + len]), 0);
            assert_eq!(&t[16..20], b"PCMP");
            let count = u16::from_le_bytes([t[16 + 34], t[16 + 35]]);
            assert_eq!(count, u16::from(n) + 1 + 1 + 24 + 2);
            assert!(t.len() <= MPTABLE_MAX_SIZE);
        }
    }

    /// The entries after the table header, as (type, bytes) pairs.
    fn entries(t: &[u8]) -> Vec<&[u8]> {
        let len = u16::from_le_bytes([t[20], t[21]]) as usize;
        let mut rest = &t[16 + 44..16 + len];
        let mut out = Vec::new();
        while !rest.is_empty() {
            let size = if rest[0] == ENTRY_PROCESSOR { 20 } else { 8 };
            out.push(&rest[..size]);
            rest = &rest[size..];
        }
        out
    }

    /// Regression: IRQ 0 was an ExtINT IO-APIC entry, so Linux routed its timer through the
    /// PIC on IO-APIC pin 0 and died in early boot on real KVM.
    #[test]
    fn every_io_interrupt_is_an_ordinary_interrupt_on_the_same_pin() {
        let t = build_mptable(layout::MPTABLE_ADDR, 2).unwrap();
        let ioints: Vec<_> = entries(&t)
            .into_iter()
            .filter(|e| e[0] == ENTRY_IOINT)
            .collect();
        assert_eq!(ioints.len(), layout::MAX_LEGACY_GSI as usize + 1);
        for (irq, e) in ioints.iter().enumerate() {
            assert_eq!(e[1], INT_TYPE_INT, "IRQ {irq} is not an ordinary interrupt");
            assert_eq!((e[5], e[7]), (irq as u8, irq as u8), "IRQ {irq} pin");
            assert_eq!(e[6], 3, "IRQ {irq} goes to the IO-APIC (id vcpus + 1)");
        }
    }

    #[test]
    fn lint0_is_extint_on_the_boot_cpu_and_lint1_nmi_on_all() {
        let t = build_mptable(layout::MPTABLE_ADDR, 4).unwrap();
        let lints: Vec<_> = entries(&t)
            .into_iter()
            .filter(|e| e[0] == ENTRY_LINTSRC)
            .map(|e| (e[1], e[6], e[7]))
            .collect();
        assert_eq!(
            lints,
            [
                (INT_TYPE_EXTINT, BSP_APIC_ID, 0),
                (INT_TYPE_NMI, MP_APIC_ALL, 1)
            ]
        );
    }

    #[test]
    fn refuses_zero_or_too_many_cpus() {
        assert!(build_mptable(0, 0).is_err());
        assert!(build_mptable(0, MAX_CPUS + 1).is_err());
    }
}
