//! Registers for entering a 64-bit kernel directly in long mode (Linux's 64-bit boot protocol):
//! a flat GDT, an empty IDT, identity-mapped page tables covering the first 4 GiB, paging and
//! long mode enabled, `rip` at the entry point and `rsi` at the zero page.

use kvm_bindings::{kvm_regs, kvm_segment};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::CpuError;
use crate::layout;
use crate::memory::GuestMemory;

const CR0_PE: u64 = 1 << 0;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// Page-table entry flags: present | writable.
const PTE_PRESENT_RW: u64 = 0x3;
/// Page-directory entry flags for a 2 MiB page: present | writable | page size.
const PDE_2M_PAGE: u64 = 0x83;
/// Number of page directories (one per GiB identity-mapped).
const PAGE_DIRECTORIES: u64 = 4;
/// RFLAGS bit 1 is reserved and always set.
const RFLAGS_RESERVED: u64 = 0x2;

/// Boot GDT: null, 64-bit code (selector 0x08), data (0x10), TSS (0x18).
/// Each entry is (access/flags word, base, limit).
const GDT: [(u16, u32, u32); 4] = [
    (0, 0, 0),
    (0xa09b, 0, 0xfffff),
    (0xc093, 0, 0xfffff),
    (0x808b, 0, 0xfffff),
];
const CODE_SELECTOR_INDEX: usize = 1;
const DATA_SELECTOR_INDEX: usize = 2;
const TSS_SELECTOR_INDEX: usize = 3;

/// Encodes one segment descriptor. `flags` holds the access byte (bits 0..=7) and the
/// granularity/size nibble (bits 12..=15) as they appear in descriptor bits 40..=55.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = u64::from(base);
    let limit = u64::from(limit);
    let flags = u64::from(flags);
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// Decodes a descriptor into the form KVM wants for a segment register.
pub fn segment_from_gdt(entry: u64, index: usize) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = (entry & 0xffff) | ((entry >> 32) & 0x000f_0000);
    let granular = bit(55) == 1;
    let limit = if granular {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    kvm_segment {
        base,
        limit: limit as u32,
        selector: (index * 8) as u16,
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        unusable: if bit(47) == 1 { 0 } else { 1 },
        padding: 0,
    }
}

/// Writes the GDT, an empty IDT and the identity-mapping page tables into guest memory.
pub fn write_boot_tables(mem: &GuestMemory) -> Result<(), CpuError> {
    for (i, (flags, base, limit)) in GDT.iter().enumerate() {
        mem.write_obj(
            gdt_entry(*flags, *base, *limit),
            GuestAddress(layout::GDT_ADDR + 8 * i as u64),
        )?;
    }
    mem.write_obj(0u64, GuestAddress(layout::IDT_ADDR))?;

    mem.write_obj(
        layout::PDPT_ADDR | PTE_PRESENT_RW,
        GuestAddress(layout::PML4_ADDR),
    )?;
    for d in 0..PAGE_DIRECTORIES {
        let pd = layout::PD_ADDR + d * 0x1000;
        mem.write_obj(pd | PTE_PRESENT_RW, GuestAddress(layout::PDPT_ADDR + d * 8))?;
        for e in 0..512u64 {
            let phys = ((d << 9) + e) << 21;
            mem.write_obj(phys | PDE_2M_PAGE, GuestAddress(pd + e * 8))?;
        }
    }
    Ok(())
}

/// Puts the vCPU in 64-bit mode with the boot GDT, IDT and page tables (written by
/// [`write_boot_tables`]).
pub fn setup_sregs(vcpu: &VcpuFd) -> Result<(), CpuError> {
    let mut sregs = vcpu.get_sregs().map_err(CpuError::Registers)?;
    let entry = |i: usize| gdt_entry(GDT[i].0, GDT[i].1, GDT[i].2);
    let code = segment_from_gdt(entry(CODE_SELECTOR_INDEX), CODE_SELECTOR_INDEX);
    let data = segment_from_gdt(entry(DATA_SELECTOR_INDEX), DATA_SELECTOR_INDEX);
    let tss = segment_from_gdt(entry(TSS_SELECTOR_INDEX), TSS_SELECTOR_INDEX);

    sregs.gdt.base = layout::GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = layout::IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    sregs.cr3 = layout::PML4_ADDR;
    sregs.cr4 |= CR4_PAE;
    sregs.cr0 |= CR0_PE | CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(CpuError::Registers)
}

/// Sets the general registers for the boot protocol: `rip` = entry, `rsi` = zero page.
pub fn setup_regs(vcpu: &VcpuFd, entry: GuestAddress) -> Result<(), CpuError> {
    let regs = kvm_regs {
        rflags: RFLAGS_RESERVED,
        rip: entry.0,
        rsp: layout::BOOT_STACK_TOP,
        rbp: layout::BOOT_STACK_TOP,
        rsi: layout::ZERO_PAGE_ADDR,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(CpuError::Registers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    #[test]
    fn code_segment_is_64_bit_present_ring0() {
        let e = gdt_entry(0xa09b, 0, 0xfffff);
        assert_eq!(e, 0x00af_9b00_0000_ffff);
        let s = segment_from_gdt(e, 1);
        assert_eq!((s.l, s.db, s.present, s.dpl, s.s, s.g), (1, 0, 1, 0, 1, 1));
        assert_eq!(s.type_, 0xb);
        assert_eq!(s.limit, 0xffff_ffff);
        assert_eq!(s.selector, 8);
    }

    #[test]
    fn data_segment_is_32_bit_default_size() {
        let s = segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!((s.l, s.db, s.type_, s.selector), (0, 1, 3, 0x10));
    }

    #[test]
    fn page_tables_identity_map_4_gib() {
        let mem = create_guest_memory(4).unwrap();
        write_boot_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(layout::PML4_ADDR)).unwrap();
        assert_eq!(pml4 & !0xfff, layout::PDPT_ADDR);
        // Walk the tables for an address in the MMIO gap.
        let va = layout::VIRTIO_MMIO_BASE + 0x123;
        let pdpte: u64 = mem
            .read_obj(GuestAddress(layout::PDPT_ADDR + ((va >> 30) & 0x1ff) * 8))
            .unwrap();
        let pde: u64 = mem
            .read_obj(GuestAddress((pdpte & !0xfff) + ((va >> 21) & 0x1ff) * 8))
            .unwrap();
        assert_eq!(pde & 0x83, 0x83);
        assert_eq!((pde & !0x1f_ffff) + (va & 0x1f_ffff), va);
    }
}
