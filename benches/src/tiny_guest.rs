//! The minimal test guest both VMMs boot in the boot-latency and memory benchmarks: one ELF64
//! file whose few instructions decode the same in 32-bit protected mode (QEMU microvm enters it
//! through the PVH note) and in 64-bit mode (the embedded VMM enters it at `e_entry`). It signals
//! the host at once, through the boot-timer port (embedded VMM) and a byte on the serial port
//! (QEMU, which has no boot-timer device), then either triple-faults, which ends the VM, or halts
//! with interrupts off until the host stops it.
//!
//! ```text
//!   66 ba 40 04     mov dx, 0x440          ; vmm::BOOT_TIMER_PORT
//!   b0 7b           mov al, 123            ; vmm::BOOT_TIMER_MAGIC
//!   ee              out dx, al
//!   66 ba f8 03     mov dx, 0x3f8          ; COM1 data register
//!   b0 21           mov al, '!'
//!   ee              out dx, al
//! exit:
//!   b8 <idtr>       mov eax, idtr          ; a zero-limit IDT …
//!   0f 01 18        lidt [eax]
//!   0f 0b           ud2                    ; … turns #UD into #GP, #DF, triple fault
//! halt:
//!   fa              cli
//!   f4              hlt
//!   eb fd           jmp hlt
//! idtr:             10 zero bytes
//! ```

use std::path::Path;

/// Guest-physical load address (1 MiB, the embedded VMM's `layout::HIMEM_START`).
const LOAD_ADDR: u64 = 0x10_0000;
const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
/// Note: 12-byte header, "Xen\0", 8-byte descriptor (QEMU reads a full word).
const NOTE_SIZE: usize = 12 + 4 + 8;
const NOTE_OFFSET: usize = EHDR_SIZE + 2 * PHDR_SIZE;
const CODE_OFFSET: usize = NOTE_OFFSET + NOTE_SIZE;
/// `XEN_ELFNOTE_PHYS32_ENTRY`: the PVH entry point note.
const PVH_NOTE_TYPE: u32 = 18;

/// What the guest does after signalling the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterSignal {
    /// Triple-fault at once: the VM ends.
    Exit,
    /// Halt forever with interrupts off (for measuring a booted VM's memory).
    Halt,
}

fn code(after: AfterSignal) -> Vec<u8> {
    let boot_port = vmm::BOOT_TIMER_PORT.to_le_bytes();
    let mut c = vec![0x66, 0xba, boot_port[0], boot_port[1]];
    c.extend_from_slice(&[0xb0, vmm::BOOT_TIMER_MAGIC, 0xee]);
    c.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03, 0xb0, b'!', 0xee]);
    match after {
        AfterSignal::Exit => {
            // mov eax, imm32 (5) + lidt (3) + ud2 (2): the IDTR follows.
            let idtr = LOAD_ADDR + (CODE_OFFSET + c.len() + 10) as u64;
            c.push(0xb8);
            c.extend_from_slice(&(idtr as u32).to_le_bytes());
            c.extend_from_slice(&[0x0f, 0x01, 0x18, 0x0f, 0x0b]);
            c.extend_from_slice(&[0u8; 10]);
        }
        AfterSignal::Halt => c.extend_from_slice(&[0xfa, 0xf4, 0xeb, 0xfd]),
    }
    c
}

/// The complete ELF file.
pub fn elf(after: AfterSignal) -> Vec<u8> {
    let code = code(after);
    let entry = LOAD_ADDR + CODE_OFFSET as u64;
    let file_size = (CODE_OFFSET + code.len()) as u64;
    let mut f = Vec::with_capacity(file_size as usize);
    // ELF header.
    f.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]); // ELF64, LSB, version 1, SysV
    f.extend_from_slice(&[0u8; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    f.extend_from_slice(&1u32.to_le_bytes()); // EV_CURRENT
    f.extend_from_slice(&entry.to_le_bytes());
    f.extend_from_slice(&(EHDR_SIZE as u64).to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    f.extend_from_slice(&(EHDR_SIZE as u16).to_le_bytes());
    f.extend_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
    f.extend_from_slice(&2u16.to_le_bytes()); // e_phnum
    f.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    f.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    f.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
                                              // PT_LOAD: the whole file at LOAD_ADDR, read/write/execute.
    phdr(&mut f, 1, 7, 0, LOAD_ADDR, file_size, 0x1000);
    // PT_NOTE: the PVH entry.
    phdr(
        &mut f,
        4,
        4,
        NOTE_OFFSET as u64,
        LOAD_ADDR + NOTE_OFFSET as u64,
        NOTE_SIZE as u64,
        4,
    );
    f.extend_from_slice(&4u32.to_le_bytes()); // n_namesz
    f.extend_from_slice(&8u32.to_le_bytes()); // n_descsz
    f.extend_from_slice(&PVH_NOTE_TYPE.to_le_bytes());
    f.extend_from_slice(b"Xen\0");
    f.extend_from_slice(&entry.to_le_bytes());
    debug_assert_eq!(f.len(), CODE_OFFSET);
    f.extend_from_slice(&code);
    f
}

fn phdr(f: &mut Vec<u8>, kind: u32, flags: u32, offset: u64, addr: u64, size: u64, align: u64) {
    f.extend_from_slice(&kind.to_le_bytes());
    f.extend_from_slice(&flags.to_le_bytes());
    f.extend_from_slice(&offset.to_le_bytes());
    f.extend_from_slice(&addr.to_le_bytes()); // p_vaddr
    f.extend_from_slice(&addr.to_le_bytes()); // p_paddr
    f.extend_from_slice(&size.to_le_bytes()); // p_filesz
    f.extend_from_slice(&size.to_le_bytes()); // p_memsz
    f.extend_from_slice(&align.to_le_bytes());
}

/// Writes the guest to `path`.
pub fn write(path: &Path, after: AfterSignal) -> std::io::Result<()> {
    std::fs::write(path, elf(after))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_points_at_the_code() {
        let f = elf(AfterSignal::Exit);
        assert_eq!(&f[..4], b"\x7fELF");
        let entry = u64::from_le_bytes(f[24..32].try_into().unwrap());
        assert_eq!(entry, LOAD_ADDR + CODE_OFFSET as u64);
        assert_eq!(&f[CODE_OFFSET..CODE_OFFSET + 2], &[0x66, 0xba]);
        // The PVH note's descriptor is the same entry.
        let desc = NOTE_OFFSET + 16;
        assert_eq!(
            u64::from_le_bytes(f[desc..desc + 8].try_into().unwrap()),
            entry
        );
    }

    #[test]
    fn idtr_lies_inside_the_image() {
        let f = elf(AfterSignal::Exit);
        let mov = f.len() - 10 - 10;
        assert_eq!(f[mov], 0xb8);
        let idtr = u32::from_le_bytes(f[mov + 1..mov + 5].try_into().unwrap()) as u64;
        assert_eq!(idtr, LOAD_ADDR + (f.len() - 10) as u64);
    }
}
