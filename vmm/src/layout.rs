//! The guest physical address map: where the VMM puts RAM, the boot structures it writes for the
//! kernel, and the devices it emulates. Test guests and the guest agent rely on these addresses,
//! so they are public and stable.

use vm_memory::GuestAddress;

/// The boot GDT (null, 64-bit code, data, TSS descriptors).
pub const GDT_ADDR: u64 = 0x500;
/// An empty boot IDT: the kernel installs its own before enabling interrupts.
pub const IDT_ADDR: u64 = 0x520;
/// The Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU (grows down, below the page tables).
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
/// Boot page tables: one PML4, one PDPT and four page directories (2 MiB pages) identity-map the
/// first 4 GiB, so a guest entered in long mode can reach RAM and the MMIO gap alike.
pub const PML4_ADDR: u64 = 0x9000;
/// See [`PML4_ADDR`].
pub const PDPT_ADDR: u64 = 0xa000;
/// First of the four page directories; see [`PML4_ADDR`].
pub const PD_ADDR: u64 = 0xb000;
/// The kernel command line (NUL-terminated).
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Room reserved for the command line, terminator included.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// The MP table (Intel MultiProcessor spec) that tells Linux about the vCPUs and IO-APIC; it lives
/// in the last KiB of conventional memory, which the e820 map leaves out of usable RAM.
pub const MPTABLE_ADDR: u64 = 0x9fc00;
/// End of usable low RAM in the e820 map.
pub const LOW_RAM_END: u64 = 0x9fc00;
/// Start of "high" memory; kernels are loaded at or above it.
pub const HIMEM_START: u64 = 0x10_0000;
/// The MMIO gap below 4 GiB: no RAM here, devices only.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End (exclusive) of the MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Guest physical address of the first virtio-mmio device; device `i` is at `+ i * 0x1000`.
pub const VIRTIO_MMIO_BASE: u64 = MMIO_GAP_START;
/// Size of one virtio-mmio register window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// GSI of the first virtio-mmio device; device `i` uses `+ i`.
pub const VIRTIO_FIRST_GSI: u32 = 5;
/// Last GSI the IO-APIC routes (24 pins).
pub const MAX_LEGACY_GSI: u32 = 23;
/// GSI of the COM1 serial port.
pub const SERIAL_GSI: u32 = 4;
/// COM1 I/O ports.
pub const SERIAL_PORT_BASE: u16 = 0x3f8;
/// i8042 ports 0x60..=0x64 (data at +0, command/status at +4).
pub const I8042_PORT_BASE: u16 = 0x60;
/// The three pages KVM needs for the TSS on Intel (outside RAM, inside the MMIO gap's top).
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;

// The boot structures must not overlap; checked at compile time.
const _: () = {
    assert!(GDT_ADDR + 4 * 8 <= IDT_ADDR);
    assert!(ZERO_PAGE_ADDR + 0x1000 <= BOOT_STACK_TOP);
    assert!(BOOT_STACK_TOP < PML4_ADDR);
    assert!(PD_ADDR + 4 * 0x1000 <= CMDLINE_ADDR);
    assert!(CMDLINE_ADDR + CMDLINE_MAX_SIZE as u64 <= MPTABLE_ADDR);
    assert!(MPTABLE_ADDR < HIMEM_START);
};

/// Guest RAM ranges for `mem_bytes` of RAM: one range from 0, split around the MMIO gap when the
/// RAM does not fit below it.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(GuestAddress, u64)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(GuestAddress(0), mem_bytes)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(MMIO_GAP_END), mem_bytes - MMIO_GAP_START),
        ]
    }
}

/// Guest physical address of virtio-mmio device number `index`.
pub fn virtio_mmio_addr(index: u32) -> u64 {
    VIRTIO_MMIO_BASE + u64::from(index) * VIRTIO_MMIO_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_ram_is_one_range() {
        assert_eq!(ram_ranges(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
    }

    #[test]
    fn large_ram_skips_the_mmio_gap() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START));
        assert_eq!(r[1].0, GuestAddress(MMIO_GAP_END));
        assert_eq!(r[0].1 + r[1].1, 4 << 30);
    }
}
