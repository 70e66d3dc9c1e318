//! The Linux zero page (`struct boot_params`): setup header, command line pointer, initrd and
//! the e820 memory map derived from guest RAM and [`crate::layout`].

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{load_cmdline, Cmdline};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::{BootError, InitrdPlacement};
use crate::layout;
use crate::memory::GuestMemory;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// "HdrS"
const SETUP_HEADER_MAGIC: u32 = 0x5372_6448;
/// "Undefined" boot loader id.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const KERNEL_ALIGNMENT: u32 = 0x0100_0000;
/// loadflags bit 0: the protected-mode code is loaded at 0x100000.
const LOADED_HIGH: u8 = 0x01;

/// The e820 map: conventional memory below the MP table, the MP table reserved, and RAM from
/// 1 MiB on (split around the MMIO gap).
pub fn e820_map(mem: &GuestMemory) -> Vec<boot_e820_entry> {
    let mut map = vec![
        boot_e820_entry {
            addr: 0,
            size: layout::LOW_RAM_END,
            r#type: E820_RAM,
        },
        boot_e820_entry {
            addr: layout::LOW_RAM_END,
            size: layout::HIMEM_START - layout::LOW_RAM_END,
            r#type: E820_RESERVED,
        },
    ];
    for region in mem.iter() {
        let start = region.start_addr().0.max(layout::HIMEM_START);
        let end = region.last_addr().0 + 1;
        if end > start {
            map.push(boot_e820_entry {
                addr: start,
                size: end - start,
                r#type: E820_RAM,
            });
        }
    }
    map
}

/// Builds the zero page contents.
pub fn build_boot_params(
    mem: &GuestMemory,
    cmdline_len: usize,
    header: Option<setup_header>,
    initrd: Option<InitrdPlacement>,
) -> boot_params {
    let mut params = boot_params::default();
    if let Some(h) = header {
        params.hdr = h;
    } else {
        params.hdr.boot_flag = BOOT_FLAG_MAGIC;
        params.hdr.header = SETUP_HEADER_MAGIC;
        params.hdr.kernel_alignment = KERNEL_ALIGNMENT;
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.loadflags |= LOADED_HIGH;
    params.hdr.cmd_line_ptr = layout::CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32 + 1;
    if let Some(i) = initrd {
        params.hdr.ramdisk_image = i.addr as u32;
        params.hdr.ramdisk_size = i.size as u32;
    }
    let map = e820_map(mem);
    let n = map.len().min(params.e820_table.len());
    params.e820_table[..n].copy_from_slice(&map[..n]);
    params.e820_entries = n as u8;
    params
}

/// Writes the command line and the zero page.
pub fn write_boot_info(
    mem: &GuestMemory,
    cmdline: &str,
    header: Option<setup_header>,
    initrd: Option<InitrdPlacement>,
) -> Result<(), BootError> {
    let cl = Cmdline::try_from(cmdline, layout::CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    load_cmdline(mem, GuestAddress(layout::CMDLINE_ADDR), &cl).map_err(BootError::WriteCmdline)?;
    let params = build_boot_params(mem, cmdline.len(), header, initrd);
    LinuxBootConfigurator::write_bootparams::<GuestMemory>(
        &BootParams::new(&params, GuestAddress(layout::ZERO_PAGE_ADDR)),
        mem,
    )
    .map_err(BootError::ZeroPage)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;
    use vm_memory::Bytes;

    #[test]
    fn e820_covers_low_and_high_ram_and_skips_the_gap() {
        let mem = create_guest_memory(4096).unwrap();
        let map = e820_map(&mem);
        assert_eq!({ map[0].addr }, 0);
        assert_eq!({ map[1].r#type }, E820_RESERVED);
        assert_eq!({ map[2].addr }, layout::HIMEM_START);
        assert_eq!({ map[2].addr } + { map[2].size }, layout::MMIO_GAP_START);
        assert_eq!({ map[3].addr }, layout::MMIO_GAP_END);
        let ram: u64 = map
            .iter()
            .filter(|e| e.r#type == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(
            ram,
            (4096 << 20) - (layout::HIMEM_START - layout::LOW_RAM_END)
        );
    }

    #[test]
    fn zero_page_points_at_cmdline_and_initrd() {
        let mem = create_guest_memory(16).unwrap();
        let initrd = InitrdPlacement {
            addr: 0x80_0000,
            size: 1234,
        };
        write_boot_info(&mem, "console=ttyS0 reboot=k", None, Some(initrd)).unwrap();
        let p: boot_params = mem.read_obj(GuestAddress(layout::ZERO_PAGE_ADDR)).unwrap();
        let hdr = p.hdr;
        assert_eq!({ hdr.boot_flag }, BOOT_FLAG_MAGIC);
        assert_eq!({ hdr.cmd_line_ptr }, layout::CMDLINE_ADDR as u32);
        assert_eq!({ hdr.ramdisk_image }, 0x80_0000);
        assert_eq!({ hdr.ramdisk_size }, 1234);
        let mut buf = [0u8; 23];
        mem.read_slice(&mut buf, GuestAddress(layout::CMDLINE_ADDR))
            .unwrap();
        assert_eq!(&buf, b"console=ttyS0 reboot=k\0");
    }

    #[test]
    fn overlong_cmdline_is_refused() {
        let mem = create_guest_memory(16).unwrap();
        let long = "a".repeat(layout::CMDLINE_MAX_SIZE + 1);
        assert!(matches!(
            write_boot_info(&mem, &long, None, None),
            Err(BootError::Cmdline(_))
        ));
    }
}
