//! Giving the host memory behind a guest-physical range back to the host: the whole host pages
//! of the range that lie inside one RAM region are dropped with `madvise(MADV_DONTNEED)`. Guest
//! RAM is an anonymous private mapping, so a dropped page costs nothing until the guest touches
//! it again, and then reads back as zeroes (what a driver expects of a page it reported or put
//! in the balloon).
//!
//! The range comes from the guest and is not trusted: the part outside guest RAM (beyond its
//! end, or in the MMIO gap between regions), the partial pages at an unaligned start or end,
//! and a zero length are all skipped; an address whose end overflows is clipped. Each region
//! costs at most one `madvise` call, whatever the range.

use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap, MemoryRegionAddress,
};

use crate::memory::GuestMemory;

/// Why (part of) a range could not be discarded. Nothing is ever discarded outside guest RAM;
/// these are host-side failures on RAM the range does cover.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiscardError {
    /// The host refused to drop the pages.
    #[error("madvise(MADV_DONTNEED) of guest {addr:#x}+{len:#x} failed: {errno}")]
    Madvise {
        /// Guest-physical start of the part being dropped.
        addr: u64,
        /// Its length in bytes.
        len: u64,
        /// The error.
        errno: nix::errno::Errno,
    },
    /// vm-memory could not give the host address of a region.
    #[error("cannot resolve the host address of guest {0:#x}")]
    HostAddress(u64),
}

/// The host's page size (the unit `madvise` works in), from `sysconf`; 4 KiB if it cannot be
/// read. Read once, before the VMM thread's seccomp filter is installed.
pub fn host_page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    match u64::try_from(page) {
        Ok(p) if p.is_power_of_two() => p,
        _ => 4096,
    }
}

/// Whether dropping a region's pages makes them read back as zeroes: an anonymous private
/// mapping. (A file-backed one would read back the file, a shared one would not be freed.)
fn zero_fill_on_discard(region: &GuestRegionMmap<()>) -> bool {
    let wanted = libc::MAP_ANONYMOUS | libc::MAP_PRIVATE;
    region.file_offset().is_none() && region.flags() & wanted == wanted
}

/// Drops the host pages of guest RAM in `[addr, addr + len)`: in each RAM region, the whole
/// `page_size` pages of the part of the range inside that region. Returns the bytes dropped
/// (0 for a range with no whole page in RAM). `page_size` must be a power of two (the host's
/// page size, [`host_page_size`]); any other value drops nothing.
pub fn discard_range(
    mem: &GuestMemory,
    addr: GuestAddress,
    len: u64,
    page_size: u64,
) -> Result<u64, DiscardError> {
    if len == 0 || !page_size.is_power_of_two() {
        return Ok(0);
    }
    let start = addr.0;
    let end = start.saturating_add(len);
    let mut dropped = 0u64;
    for region in mem.iter() {
        let region_start = region.start_addr().0;
        let region_end = region_start.saturating_add(region.len());
        let lo = start.max(region_start);
        let hi = end.min(region_end);
        if lo >= hi || !zero_fill_on_discard(region) {
            continue;
        }
        // Offsets into the region, rounded inwards to whole pages. The mapping starts on a page
        // boundary, so page-aligned offsets are page-aligned host addresses.
        let Some(first) = (lo - region_start)
            .checked_add(page_size - 1)
            .map(|o| o & !(page_size - 1))
        else {
            continue;
        };
        let last = (hi - region_start) & !(page_size - 1);
        if first >= last {
            continue;
        }
        let bytes = last - first;
        let guest = region_start + first;
        let host = region
            .get_host_address(MemoryRegionAddress(first))
            .map_err(|_| DiscardError::HostAddress(guest))?;
        let Ok(host_len) = usize::try_from(bytes) else {
            continue;
        };
        if (host as usize) % (page_size as usize) != 0 {
            // A mapping not on a page boundary (not one vm-memory makes): madvise would round
            // the start down, past the range. Leave it alone.
            continue;
        }
        // SAFETY: `host..host + host_len` lies inside this region's mapping (the offsets are
        // within `0..region.len()`), which `mem` owns and keeps mapped for the call; it is
        // page-aligned, and its length is a whole number of pages, so madvise touches nothing
        // outside it. MADV_DONTNEED on an anonymous private mapping (checked above) keeps the
        // mapping and only replaces its contents with zero-fill-on-demand pages: no Rust
        // reference points into guest RAM (vm-memory reaches it through volatile accesses
        // only), so this is no different from the guest writing zeroes there, which it allowed
        // by giving the range up.
        let rc = unsafe { libc::madvise(host.cast(), host_len, libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err(DiscardError::Madvise {
                addr: guest,
                len: bytes,
                errno: nix::errno::Errno::last(),
            });
        }
        dropped += bytes;
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{create_guest_memory, resident_bytes};
    use proptest::prelude::*;
    use vm_memory::{Bytes, GuestMemoryMmap};

    const PAGE: u64 = 4096;

    /// Two 64 KiB regions with a 64 KiB hole between them (a miniature MMIO gap).
    fn gapped() -> GuestMemory {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x1_0000),
            (GuestAddress(0x2_0000), 0x1_0000),
        ])
        .unwrap()
    }

    fn fill(mem: &GuestMemory, addr: u64, len: u64, byte: u8) {
        mem.write_slice(&vec![byte; len as usize], GuestAddress(addr))
            .unwrap();
    }

    /// The pages of `[addr, addr + len)` that are all zero, by index from `addr`.
    fn zero_pages(mem: &GuestMemory, addr: u64, len: u64) -> Vec<u64> {
        let mut page = vec![0u8; PAGE as usize];
        (0..len / PAGE)
            .filter(|i| {
                mem.read_slice(&mut page, GuestAddress(addr + i * PAGE))
                    .unwrap();
                page.iter().all(|b| *b == 0)
            })
            .collect()
    }

    #[test]
    fn a_discarded_range_is_no_longer_resident_and_reads_back_zero() {
        let mem = create_guest_memory(16).unwrap();
        let base = 8 << 20;
        fill(&mem, base - PAGE, 66 * PAGE, 0xa5);
        let before = resident_bytes(&mem).unwrap();
        let dropped = discard_range(&mem, GuestAddress(base), 64 * PAGE, PAGE).unwrap();
        assert_eq!(dropped, 64 * PAGE);
        let after = resident_bytes(&mem).unwrap();
        assert!(
            after + 64 * PAGE <= before,
            "resident before {before}, after {after}"
        );
        assert_eq!(
            zero_pages(&mem, base - PAGE, 66 * PAGE),
            (1..=64).collect::<Vec<_>>(),
            "the 64 pages read back zero, their neighbours keep their data"
        );
    }

    #[test]
    fn unaligned_ranges_drop_only_their_whole_pages() {
        let mem = gapped();
        fill(&mem, 0, 0x1_0000, 0x11);
        // From the middle of page 1 to the middle of page 4: pages 2 and 3 only.
        let dropped = discard_range(&mem, GuestAddress(PAGE + 1), 3 * PAGE, PAGE).unwrap();
        assert_eq!(dropped, 2 * PAGE);
        assert_eq!(zero_pages(&mem, 0, 0x1_0000), vec![2, 3]);
        // Less than a page, even if it crosses a page boundary: nothing.
        assert_eq!(
            discard_range(&mem, GuestAddress(6 * PAGE - 8), 16, PAGE),
            Ok(0)
        );
        assert_eq!(discard_range(&mem, GuestAddress(8 * PAGE), 0, PAGE), Ok(0));
        assert_eq!(zero_pages(&mem, 0, 0x1_0000), vec![2, 3]);
    }

    #[test]
    fn ranges_beyond_ram_or_across_the_gap_drop_only_ram() {
        let mem = gapped();
        fill(&mem, 0, 0x1_0000, 0x22);
        fill(&mem, 0x2_0000, 0x1_0000, 0x33);
        // Entirely in the hole, entirely beyond RAM, and ending past the top of the address
        // space: nothing.
        assert_eq!(
            discard_range(&mem, GuestAddress(0x1_0000), 0x1_0000, PAGE),
            Ok(0)
        );
        assert_eq!(
            discard_range(&mem, GuestAddress(0x3_0000), u64::MAX, PAGE),
            Ok(0)
        );
        assert_eq!(
            discard_range(&mem, GuestAddress(u64::MAX - PAGE), u64::MAX, PAGE),
            Ok(0)
        );
        assert!(zero_pages(&mem, 0, 0x1_0000).is_empty());
        assert!(zero_pages(&mem, 0x2_0000, 0x1_0000).is_empty());
        // The last two pages of the first region, the hole, the first two of the second.
        let dropped = discard_range(&mem, GuestAddress(0xe000), 0x1_4000, PAGE).unwrap();
        assert_eq!(dropped, 4 * PAGE);
        assert_eq!(zero_pages(&mem, 0, 0x1_0000), vec![14, 15]);
        assert_eq!(zero_pages(&mem, 0x2_0000, 0x1_0000), vec![0, 1]);
        // A range covering everything: all of RAM, and no more.
        let dropped = discard_range(&mem, GuestAddress(0), u64::MAX, PAGE).unwrap();
        assert_eq!(dropped, 0x2_0000);
    }

    #[test]
    fn a_page_size_that_is_not_a_power_of_two_drops_nothing() {
        let mem = gapped();
        fill(&mem, 0, 0x1_0000, 0x44);
        assert_eq!(discard_range(&mem, GuestAddress(0), 0x1_0000, 0), Ok(0));
        assert_eq!(discard_range(&mem, GuestAddress(0), 0x1_0000, 3000), Ok(0));
        assert!(zero_pages(&mem, 0, 0x1_0000).is_empty());
    }

    #[test]
    fn the_host_page_size_is_a_power_of_two() {
        assert!(host_page_size().is_power_of_two());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Whatever the range, exactly the pages wholly inside it and inside RAM read back
        /// zero afterwards, and the returned count is their size.
        #[test]
        fn exactly_the_whole_pages_in_ram_are_dropped(
            addr in prop_oneof![0u64..0x4_0000, any::<u64>()],
            len in prop_oneof![0u64..0x4_0000, any::<u64>()],
        ) {
            let mem = gapped();
            fill(&mem, 0, 0x1_0000, 0x55);
            fill(&mem, 0x2_0000, 0x1_0000, 0x66);
            let dropped = discard_range(&mem, GuestAddress(addr), len, PAGE).unwrap();
            let end = addr.saturating_add(len);
            let mut expected = 0;
            for base in [0u64, 0x2_0000] {
                let zeroed = zero_pages(&mem, base, 0x1_0000);
                let inside: Vec<u64> = (0..16)
                    .filter(|i| {
                        let p = base + i * PAGE;
                        len > 0 && p >= addr && p + PAGE <= end
                    })
                    .collect();
                expected += inside.len() as u64 * PAGE;
                prop_assert_eq!(zeroed, inside);
            }
            prop_assert_eq!(dropped, expected);
        }
    }
}
