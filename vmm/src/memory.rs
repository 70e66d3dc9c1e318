//! Guest RAM: allocation (vm-memory mmap regions laid out by [`crate::layout`]), registration of
//! the regions as KVM memory slots, and how much of it is resident on the host.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
};

use crate::layout;

/// The guest memory type used throughout the VMM.
pub type GuestMemory = GuestMemoryMmap<()>;

/// Errors while creating or registering guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size is zero or too large for the layout.
    #[error("invalid guest RAM size: {0} MiB")]
    InvalidSize(u64),
    /// vm-memory could not map the regions.
    #[error("cannot map guest RAM: {0}")]
    Map(#[from] vm_memory::mmap::FromRangesError),
    /// The host address of a region could not be resolved.
    #[error("cannot resolve host address of guest RAM: {0}")]
    HostAddress(#[from] vm_memory::GuestMemoryError),
    /// The host refused transparent huge pages for guest RAM (a kernel without THP).
    #[error("madvise(MADV_HUGEPAGE) on guest RAM failed: {0}")]
    HugePages(std::io::Error),
    /// KVM refused a memory slot.
    #[error("KVM_SET_USER_MEMORY_REGION failed: {0}")]
    SetUserMemoryRegion(kvm_ioctls::Error),
}

/// Smallest RAM a VM may have: room for the boot structures below 1 MiB plus a kernel.
pub const MIN_MEM_MIB: u64 = 2;
/// Largest RAM accepted (1 TiB); a sanity bound on a caller's number, not a KVM limit.
pub const MAX_MEM_MIB: u64 = 1 << 20;

/// Allocates guest RAM of `mem_mib` MiB, split around the MMIO gap.
pub fn create_guest_memory(mem_mib: u64) -> Result<GuestMemory, MemoryError> {
    if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&mem_mib) {
        return Err(MemoryError::InvalidSize(mem_mib));
    }
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(mem_mib << 20)
        .into_iter()
        .map(|(a, len)| (a, len as usize))
        .collect();
    Ok(GuestMemoryMmap::from_ranges(&ranges)?)
}

/// Asks the host for transparent huge pages behind every region of `mem`
/// (`madvise(MADV_HUGEPAGE)`): fewer TLB misses and page-table walks for guests with large
/// working sets, where the host's THP is `always` or `madvise`. Pages are still backed only as
/// the guest touches them, in 2 MiB steps, and free page reporting gives them back in the
/// same units.
pub fn advise_huge_pages(mem: &GuestMemory) -> Result<(), MemoryError> {
    for region in mem.iter() {
        let host = region.get_host_address(MemoryRegionAddress(0))?;
        // SAFETY: `host..host+len` is one live mapping owned by `mem`; MADV_HUGEPAGE changes
        // only how the kernel backs it, never its contents.
        let rc = unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_HUGEPAGE) };
        if rc != 0 {
            return Err(MemoryError::HugePages(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Registers every region of `mem` as a KVM memory slot (slot = region index).
pub fn register_with_kvm(vm: &VmFd, mem: &GuestMemory) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region.get_host_address(MemoryRegionAddress(0))?;
        let slot_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mmap owned by `mem`, which the VM keeps alive (in an Arc)
        // for as long as the VM fd exists; the slot covers exactly that mapping.
        unsafe { vm.set_user_memory_region(slot_desc) }
            .map_err(MemoryError::SetUserMemoryRegion)?;
    }
    Ok(())
}

/// Total size of guest RAM in bytes.
pub fn ram_size(mem: &GuestMemory) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

/// Bytes of guest RAM currently resident in host memory, measured with `mincore(2)` over each
/// region's mapping. Used to separate the VMM's own footprint from the guest's.
pub fn resident_bytes(mem: &GuestMemory) -> std::io::Result<u64> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let page = if page > 0 { page as u64 } else { 4096 };
    let mut total = 0u64;
    for region in mem.iter() {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(std::io::Error::other)?;
        let len = region.len() as usize;
        let pages = len.div_ceil(page as usize);
        let mut vec = vec![0u8; pages];
        // SAFETY: `host..host+len` is one page-aligned mapping owned by `mem` (alive during the
        // call); `vec` has one byte per page of that range as mincore requires.
        let rc = unsafe { libc::mincore(host.cast(), len, vec.as_mut_ptr()) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        total += vec.iter().filter(|b| **b & 1 != 0).count() as u64 * page;
    }
    Ok(total)
}

/// Which 4 KiB pages of `region` this process has ever given memory: present in RAM or
/// swapped out, per `/proc/self/pagemap`. Guest RAM is an anonymous private mapping, so a page
/// that is neither was never written (or was given back with `MADV_DONTNEED`) and reads as
/// zero: a snapshot need not read it. One bool per page.
pub fn touched_pages(region: &vm_memory::GuestRegionMmap<()>) -> std::io::Result<Vec<bool>> {
    use std::os::unix::fs::FileExt;
    const PAGE: u64 = 4096;
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    let host = region
        .get_host_address(MemoryRegionAddress(0))
        .map_err(std::io::Error::other)? as u64;
    let pages = region.len().div_ceil(PAGE) as usize;
    let pagemap = std::fs::File::open("/proc/self/pagemap")?;
    let mut touched = Vec::with_capacity(pages);
    // 64 Ki entries (512 KiB) a read: 256 MiB of guest RAM.
    let mut buf = vec![0u8; 8 << 16];
    while touched.len() < pages {
        let want = ((pages - touched.len()) * 8).min(buf.len());
        let at = (host / PAGE + touched.len() as u64) * 8;
        pagemap.read_exact_at(&mut buf[..want], at)?;
        touched.extend(buf[..want].chunks_exact(8).map(|e| {
            let entry = u64::from_ne_bytes(e.try_into().unwrap_or([0xff; 8]));
            entry & (PRESENT | SWAPPED) != 0
        }));
    }
    Ok(touched)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn pages_never_written_are_untouched() {
        let mem = create_guest_memory(64).unwrap();
        mem.write_obj(0xabu8, GuestAddress(5 * 4096 + 7)).unwrap();
        mem.write_obj(0xcdu8, GuestAddress(40 << 20)).unwrap();
        let region = mem.iter().next().unwrap();
        let touched = touched_pages(region).unwrap();
        assert_eq!(touched.len(), (region.len() / 4096) as usize);
        assert!(touched[5] && touched[(40 << 20) / 4096]);
        assert!(!touched[1000] && !touched[(60 << 20) / 4096]);
    }

    #[test]
    fn rejects_tiny_and_huge_sizes() {
        assert!(matches!(
            create_guest_memory(0),
            Err(MemoryError::InvalidSize(0))
        ));
        assert!(create_guest_memory(MAX_MEM_MIB + 1).is_err());
    }

    /// Whether the mapping at `addr` may get transparent huge pages, from /proc/self/smaps.
    fn thp_eligible(addr: u64) -> Option<bool> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((lo, hi)) = range.split_once('-') {
                    if let (Ok(lo), Ok(hi)) =
                        (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16))
                    {
                        inside = (lo..hi).contains(&addr);
                        continue;
                    }
                }
            }
            if inside {
                if let Some(v) = line.strip_prefix("THPeligible:") {
                    return Some(v.trim() == "1");
                }
            }
        }
        None
    }

    #[test]
    fn guest_ram_can_be_given_transparent_huge_pages() {
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default();
        if !(thp.contains("[always]") || thp.contains("[madvise]")) {
            eprintln!("SKIPPED guest_ram_can_be_given_transparent_huge_pages: host THP {thp:?}");
            return;
        }
        let mem = create_guest_memory(64).unwrap();
        let region = mem.iter().next().unwrap();
        let addr = region.get_host_address(MemoryRegionAddress(0)).unwrap() as u64;
        if thp.contains("[madvise]") {
            assert_eq!(thp_eligible(addr), Some(false), "before the advice");
        }
        advise_huge_pages(&mem).unwrap();
        assert_eq!(thp_eligible(addr), Some(true), "after the advice");
    }

    #[test]
    fn resident_bytes_grow_when_the_guest_touches_pages() {
        let mem = create_guest_memory(16).unwrap();
        assert_eq!(ram_size(&mem), 16 << 20);
        let before = resident_bytes(&mem).unwrap();
        for i in 0..64u64 {
            mem.write_obj(1u8, GuestAddress(i * 4096 + 8 * 4096 * 64))
                .unwrap();
        }
        let after = resident_bytes(&mem).unwrap();
        assert!(after >= before + 64 * 4096, "before {before} after {after}");
    }
}
