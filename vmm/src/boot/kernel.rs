//! Loading the kernel image and the initrd into guest RAM.
//!
//! An uncompressed ELF `vmlinux` is loaded at its physical addresses and entered at `e_entry`
//! (64-bit boot protocol). A bzImage is the fallback: its protected-mode part goes to 1 MiB and
//! the 64-bit entry is 0x200 past it. PVH is not used.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{elf, BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::BootError;
use crate::layout;
use crate::memory::GuestMemory;

/// Offset of the 64-bit entry point from the start of a bzImage's protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Where the kernel landed.
#[derive(Debug, Clone)]
pub struct LoadedKernel {
    /// The 64-bit entry point.
    pub entry: GuestAddress,
    /// First byte after the loaded image (its memory size, not only its file size).
    pub end: u64,
    /// The bzImage setup header, if the image had one (copied into the zero page).
    pub setup_header: Option<setup_header>,
}

/// Loads `path` as an ELF vmlinux, or as a bzImage if it is not ELF.
pub fn load_kernel(mem: &GuestMemory, path: &Path) -> Result<LoadedKernel, BootError> {
    let mut file = File::open(path).map_err(|source| BootError::OpenKernel {
        path: path.to_owned(),
        source,
    })?;
    let himem = Some(GuestAddress(layout::HIMEM_START));
    match Elf::load(mem, None, &mut file, himem) {
        Ok(r) => Ok(LoadedKernel {
            entry: r.kernel_load,
            end: r.kernel_end,
            setup_header: None,
        }),
        Err(linux_loader::loader::Error::Elf(elf::Error::InvalidElfMagicNumber)) => {
            let r = BzImage::load(mem, None, &mut file, himem).map_err(BootError::LoadKernel)?;
            Ok(LoadedKernel {
                entry: GuestAddress(r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET),
                end: r.kernel_end,
                setup_header: r.setup_header,
            })
        }
        Err(e) => Err(BootError::LoadKernel(e)),
    }
}

/// Where the initrd was put.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdPlacement {
    /// Guest physical address (page aligned).
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Loads the initrd at the top of RAM below the MMIO gap (and below 4 GiB, as `ramdisk_image`
/// is 32 bits), page aligned, above `kernel_end`.
pub fn load_initrd(
    mem: &GuestMemory,
    path: &Path,
    kernel_end: u64,
) -> Result<InitrdPlacement, BootError> {
    let read_err = |source| BootError::ReadInitrd {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.seek(SeekFrom::End(0)).map_err(read_err)?;
    file.rewind().map_err(read_err)?;
    let low_ram_end = mem
        .iter()
        .map(|r| vm_memory::GuestMemoryRegion::last_addr(r).0 + 1)
        .filter(|end| *end <= layout::MMIO_GAP_START)
        .max()
        .unwrap_or(0);
    let addr = low_ram_end
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end.max(layout::HIMEM_START))
        .ok_or(BootError::InitrdTooLarge { size })?;
    let mut data = Vec::with_capacity(size as usize);
    file.read_to_end(&mut data).map_err(read_err)?;
    mem.write_slice(&data, GuestAddress(addr))?;
    Ok(InitrdPlacement { addr, size })
}

/// Writes raw code at [`layout::HIMEM_START`] and returns it as the entry point; used for the
/// built-in calibration guest that has no file.
pub fn load_raw_code(mem: &GuestMemory, code: &[u8]) -> Result<LoadedKernel, BootError> {
    mem.write_slice(code, GuestAddress(layout::HIMEM_START))?;
    Ok(LoadedKernel {
        entry: GuestAddress(layout::HIMEM_START),
        end: layout::HIMEM_START + code.len() as u64,
        setup_header: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;
    use std::io::Write;

    #[test]
    fn garbage_is_not_a_kernel() {
        let mem = create_guest_memory(8).unwrap();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[0x55u8; 4096]).unwrap();
        assert!(matches!(
            load_kernel(&mem, f.path()),
            Err(BootError::LoadKernel(_))
        ));
        assert!(matches!(
            load_kernel(&mem, Path::new("/nonexistent/vmlinux")),
            Err(BootError::OpenKernel { .. })
        ));
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_ram() {
        let mem = create_guest_memory(8).unwrap();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[7u8; 10000]).unwrap();
        let p = load_initrd(&mem, f.path(), 2 << 20).unwrap();
        assert_eq!(p.size, 10000);
        assert_eq!(p.addr % 4096, 0);
        assert!(p.addr + p.size <= 8 << 20);
        let mut b = [0u8; 1];
        mem.read_slice(&mut b, GuestAddress(p.addr + 9999)).unwrap();
        assert_eq!(b[0], 7);
    }

    #[test]
    fn initrd_that_does_not_fit_is_refused() {
        let mem = create_guest_memory(4).unwrap();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&vec![0u8; 3 << 20]).unwrap();
        assert!(matches!(
            load_initrd(&mem, f.path(), 2 << 20),
            Err(BootError::InitrdTooLarge { .. })
        ));
    }
}
