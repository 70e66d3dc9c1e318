//! What guest-physical ranges a balloon descriptor chain gives up: on the reporting queue, each
//! device-writable buffer *is* a free range (its address and length); on the inflate queue, the
//! device-readable buffers hold little-endian u32 page frame numbers of 4 KiB pages, which are
//! read through vm-memory and merged into runs of consecutive frames.
//!
//! Chains come from the guest: at most [`MAX_CHAIN_DESCRIPTORS`] descriptors and
//! [`MAX_PFNS_PER_CHAIN`] frame numbers of a chain are looked at (what Linux sends fits well
//! inside both), buffers of the wrong direction or that cannot be read are skipped, and nothing
//! here checks that a range is in guest RAM: that is [`super::discard`]'s job.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemory;
use crate::virtio::chain::MAX_CHAIN_DESCRIPTORS;

/// `VIRTIO_BALLOON_PFN_SHIFT`: the inflate and deflate queues count in 4 KiB pages, whatever
/// the guest's or the host's page size.
pub const BALLOON_PFN_SHIFT: u32 = 12;
/// Size of a balloon page.
pub const BALLOON_PAGE_SIZE: u64 = 1 << BALLOON_PFN_SHIFT;
/// Most frame numbers taken from one inflate chain (Linux's `VIRTIO_BALLOON_ARRAY_PFNS_MAX`:
/// it never sends more); the rest of a longer chain is skipped.
pub const MAX_PFNS_PER_CHAIN: usize = 256;

/// A guest-physical range, as the guest gave it (not checked against guest RAM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestRange {
    /// Start.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u64,
}

/// The ranges a chain names, and how much of it was not looked at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainRanges {
    /// The ranges, in the chain's order.
    pub ranges: Vec<GuestRange>,
    /// Descriptors skipped: the wrong direction, or (inflate) a buffer that could not be read.
    pub skipped_descriptors: u32,
    /// The chain went on past the descriptor or frame-number bound.
    pub truncated: bool,
}

/// The free ranges of a reporting-queue chain: its device-writable buffers.
pub fn reported_ranges<M>(chain: DescriptorChain<M>) -> ChainRanges
where
    M: Deref<Target = GuestMemory>,
{
    let mut out = ChainRanges::default();
    for (count, desc) in chain.enumerate() {
        if count >= MAX_CHAIN_DESCRIPTORS {
            out.truncated = true;
            break;
        }
        if !desc.is_write_only() {
            out.skipped_descriptors += 1;
            continue;
        }
        out.ranges.push(GuestRange {
            addr: desc.addr(),
            len: u64::from(desc.len()),
        });
    }
    out
}

/// The pages of an inflate-queue chain: the frame numbers in its device-readable buffers (a
/// trailing partial number is ignored), merged into runs of consecutive frames.
pub fn inflated_ranges<M>(chain: DescriptorChain<M>, mem: &GuestMemory) -> ChainRanges
where
    M: Deref<Target = GuestMemory>,
{
    let mut out = ChainRanges::default();
    let mut budget = MAX_PFNS_PER_CHAIN;
    let mut buf = [0u8; MAX_PFNS_PER_CHAIN * 4];
    for (count, desc) in chain.enumerate() {
        if count >= MAX_CHAIN_DESCRIPTORS {
            out.truncated = true;
            break;
        }
        if desc.is_write_only() {
            out.skipped_descriptors += 1;
            continue;
        }
        let in_buffer = desc.len() as usize / 4;
        let n = in_buffer.min(budget);
        if n < in_buffer {
            out.truncated = true;
        }
        if n == 0 {
            continue;
        }
        let bytes = &mut buf[..n * 4];
        if mem.read_slice(bytes, desc.addr()).is_err() {
            out.skipped_descriptors += 1;
            continue;
        }
        budget -= n;
        for pfn in bytes.chunks_exact(4) {
            let pfn = u32::from_le_bytes([pfn[0], pfn[1], pfn[2], pfn[3]]);
            push_page(
                &mut out.ranges,
                GuestAddress(u64::from(pfn) << BALLOON_PFN_SHIFT),
            );
        }
    }
    out
}

/// Appends the balloon page at `addr`, extending the last range if it ends there.
fn push_page(ranges: &mut Vec<GuestRange>, addr: GuestAddress) {
    if let Some(last) = ranges.last_mut() {
        if last.addr.0.checked_add(last.len) == Some(addr.0) {
            last.len += BALLOON_PAGE_SIZE;
            return;
        }
    }
    ranges.push(GuestRange {
        addr,
        len: BALLOON_PAGE_SIZE,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;
    use virtio_queue::{Queue, QueueOwnedT, QueueT};

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x3000;
    const USED: u64 = 0x4000;
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;

    /// Writes descriptors (addr, len, flags), chained in order, publishes the chain and hands
    /// it to `f`.
    fn with_chain<'a, T>(
        mem: &'a GuestMemory,
        descs: &[(u64, u32, u16)],
        f: impl FnOnce(DescriptorChain<&'a GuestMemory>) -> T,
    ) -> T {
        for (i, (addr, len, flags)) in descs.iter().enumerate() {
            let d = DESC + 16 * i as u64;
            let flags = if i + 1 == descs.len() {
                *flags
            } else {
                *flags | NEXT
            };
            mem.write_obj(*addr, GuestAddress(d)).unwrap();
            mem.write_obj(*len, GuestAddress(d + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            mem.write_obj(i as u16 + 1, GuestAddress(d + 14)).unwrap();
        }
        mem.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap();
        mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
        let mut q = Queue::new(128).unwrap();
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_ready(true);
        let chain = q.iter(mem).unwrap().next().unwrap();
        f(chain)
    }

    fn range(addr: u64, len: u64) -> GuestRange {
        GuestRange {
            addr: GuestAddress(addr),
            len,
        }
    }

    #[test]
    fn reported_ranges_are_the_writable_buffers() {
        let mem = create_guest_memory(2).unwrap();
        let r = with_chain(
            &mem,
            &[
                (0x10_0000, 0x20_0000, WRITE),
                (0x7000, 16, 0),
                (u64::MAX - 5, 0x10_0000, WRITE),
            ],
            reported_ranges,
        );
        assert_eq!(
            r.ranges,
            vec![range(0x10_0000, 0x20_0000), range(u64::MAX - 5, 0x10_0000)]
        );
        assert_eq!((r.skipped_descriptors, r.truncated), (1, false));
    }

    #[test]
    fn overlong_reporting_chains_are_cut_at_the_descriptor_bound() {
        let mem = create_guest_memory(2).unwrap();
        let descs: Vec<_> = (0..100u64).map(|i| (i << 20, 4096, WRITE)).collect();
        let r = with_chain(&mem, &descs, reported_ranges);
        assert_eq!(r.ranges.len(), MAX_CHAIN_DESCRIPTORS);
        assert!(r.truncated);
    }

    #[test]
    fn inflated_frames_merge_into_runs() {
        let mem = create_guest_memory(2).unwrap();
        let pfns: [u32; 6] = [0x100, 0x101, 0x102, 0x180, 0xffff_ffff, 0x181];
        for (i, p) in pfns.iter().enumerate() {
            mem.write_obj(*p, GuestAddress(0x8000 + 4 * i as u64))
                .unwrap();
        }
        // 6 numbers and 3 stray bytes; a writable buffer is skipped.
        let r = with_chain(&mem, &[(0x8000, 27, 0), (0x9000, 8, WRITE)], |c| {
            inflated_ranges(c, &mem)
        });
        assert_eq!(
            r.ranges,
            vec![
                range(0x10_0000, 3 * 4096),
                range(0x18_0000, 4096),
                range(0xffff_ffff << 12, 4096),
                range(0x18_1000, 4096),
            ]
        );
        assert_eq!((r.skipped_descriptors, r.truncated), (1, false));
    }

    #[test]
    fn inflate_buffers_outside_ram_or_too_long_are_bounded() {
        let mem = create_guest_memory(2).unwrap();
        let r = with_chain(&mem, &[(0x1f_fffc, 8, 0), (0x8000, 2, 0)], |c| {
            inflated_ranges(c, &mem)
        });
        assert!(r.ranges.is_empty());
        assert_eq!(
            r.skipped_descriptors, 1,
            "the buffer crossing the end of RAM"
        );
        // 1024 frame numbers in one buffer: only the first MAX_PFNS_PER_CHAIN are taken.
        let r = with_chain(&mem, &[(0x1_0000, 4096, 0), (0x2_0000, 64, 0)], |c| {
            inflated_ranges(c, &mem)
        });
        assert!(r.truncated);
        // The buffer holds zeroes: frame 0, MAX_PFNS_PER_CHAIN times (a repeated frame is
        // not a run).
        assert_eq!(r.ranges, vec![range(0, 4096); MAX_PFNS_PER_CHAIN]);
        assert_eq!(r.skipped_descriptors, 0);
    }
}
