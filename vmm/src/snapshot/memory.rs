//! Guest RAM in a snapshot, sparse: only pages holding a non-zero byte are stored, as runs of
//! contiguous pages. Fresh guest RAM is zero, so the pages left out need no writing on restore.
//!
//! ```text
//! payload   guest RAM bytes u64 | page size u32 (4096) | reserved u32 (0)
//!           then runs to the end of the section: guest address u64 | length u64 | bytes
//! ```
//!
//! Runs are page-aligned, non-empty, in ascending address order, never overlap and lie wholly
//! in guest RAM (a run never crosses a region boundary). RAM is read and written only through
//! vm-memory, in bounded chunks.

use std::io::Read;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::format::{StreamedSection, STREAM_CHUNK};
use super::SnapshotError;
use crate::memory::GuestMemory;

/// The page granularity of the memory section.
pub const PAGE_SIZE: u64 = 4096;
/// Bytes before the first run.
pub const MEMORY_PREAMBLE_LEN: u64 = 16;
/// Bytes of a run's header.
pub const RUN_HEADER_LEN: u64 = 16;

/// What [`save`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Bytes of RAM stored.
    pub bytes_stored: u64,
    /// Runs written.
    pub ranges: u64,
}

fn is_zero(page: &[u8]) -> bool {
    // Whole words: the compiler vectorises this; a page of zeros is the common case.
    page.chunks_exact(16)
        .all(|c| u128::from_ne_bytes(c.try_into().unwrap_or([1; 16])) == 0)
        && page.chunks_exact(16).remainder().iter().all(|b| *b == 0)
}

/// Writes every non-zero page of `mem` into `section`.
pub(crate) fn save<W: std::io::Write + std::io::Seek>(
    mem: &GuestMemory,
    section: &mut StreamedSection<'_, W>,
) -> Result<MemoryStats, SnapshotError> {
    let io = |e| SnapshotError::io("writing the snapshot's memory section")(e);
    let mut preamble = [0u8; MEMORY_PREAMBLE_LEN as usize];
    preamble[..8].copy_from_slice(&crate::memory::ram_size(mem).to_le_bytes());
    preamble[8..12].copy_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
    section.write_all(&preamble).map_err(io)?;

    let mut stats = MemoryStats::default();
    let mut buf = vec![0u8; STREAM_CHUNK];
    for region in mem.iter() {
        let start = region.start_addr().0;
        let len = region.len();
        // Chunks the guest never touched are zero: not even read (a large guest that uses
        // little of its RAM is paused for what it uses, not for its size). Without the page
        // map, every chunk is read.
        let touched = crate::memory::touched_pages(region).ok();
        let mut off = 0u64;
        while off < len {
            let n = (len - off).min(STREAM_CHUNK as u64) as usize;
            if let Some(t) = &touched {
                let first = (off / PAGE_SIZE) as usize;
                let last = ((off + n as u64).div_ceil(PAGE_SIZE) as usize).min(t.len());
                if !t[first.min(last)..last].iter().any(|p| *p) {
                    off += n as u64;
                    continue;
                }
            }
            let chunk = &mut buf[..n];
            mem.read_slice(chunk, GuestAddress(start + off))?;
            // Runs of non-zero pages within this chunk (a run is cut at chunk ends; the format
            // does not need runs to be maximal).
            let mut page = 0usize;
            let pages = n.div_ceil(PAGE_SIZE as usize);
            while page < pages {
                let at = |p: usize| {
                    &chunk[p * PAGE_SIZE as usize..((p + 1) * PAGE_SIZE as usize).min(n)]
                };
                if is_zero(at(page)) {
                    page += 1;
                    continue;
                }
                let first = page;
                while page < pages && !is_zero(at(page)) {
                    page += 1;
                }
                let from = first * PAGE_SIZE as usize;
                let to = (page * PAGE_SIZE as usize).min(n);
                let mut run = [0u8; RUN_HEADER_LEN as usize];
                run[..8].copy_from_slice(&(start + off + from as u64).to_le_bytes());
                run[8..].copy_from_slice(&((to - from) as u64).to_le_bytes());
                section.write_all(&run).map_err(io)?;
                section.write_all(&chunk[from..to]).map_err(io)?;
                stats.bytes_stored += (to - from) as u64;
                stats.ranges += 1;
            }
            off += n as u64;
        }
    }
    Ok(stats)
}

fn invalid(m: String) -> SnapshotError {
    SnapshotError::InvalidMemory(m)
}

fn read_u64(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(b)
}

/// Reads a memory section of `len` bytes from `r` into fresh (all-zero) guest RAM `mem`,
/// checking every run against `mem` before writing it. `r` is positioned at the payload.
pub fn load<R: Read>(r: &mut R, len: u64, mem: &GuestMemory) -> Result<MemoryStats, SnapshotError> {
    let io = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            invalid("the file ends inside the memory section".into())
        } else {
            SnapshotError::io("reading the snapshot's memory section")(e)
        }
    };
    if len < MEMORY_PREAMBLE_LEN {
        return Err(invalid(format!("section of {len} bytes has no preamble")));
    }
    let mut preamble = [0u8; MEMORY_PREAMBLE_LEN as usize];
    r.read_exact(&mut preamble).map_err(io)?;
    let ram = read_u64(&preamble);
    let page = u32::from_le_bytes([preamble[8], preamble[9], preamble[10], preamble[11]]);
    let configured = crate::memory::ram_size(mem);
    if ram != configured {
        return Err(SnapshotError::ConfigMismatch(format!(
            "the snapshot has {ram} bytes of guest RAM, the VM is configured with {configured}"
        )));
    }
    if u64::from(page) != PAGE_SIZE {
        return Err(invalid(format!("page size {page}")));
    }

    let mut left = len - MEMORY_PREAMBLE_LEN;
    let mut next_free = 0u64;
    let mut stats = MemoryStats::default();
    let mut buf = vec![0u8; STREAM_CHUNK.min(left as usize)];
    while left > 0 {
        if left < RUN_HEADER_LEN {
            return Err(invalid(format!("{left} stray bytes at the end")));
        }
        let mut head = [0u8; RUN_HEADER_LEN as usize];
        r.read_exact(&mut head).map_err(io)?;
        left -= RUN_HEADER_LEN;
        let addr = read_u64(&head);
        let run_len = read_u64(&head[8..]);
        let end = addr
            .checked_add(run_len)
            .ok_or_else(|| invalid(format!("run at {addr:#x} of {run_len:#x} bytes overflows")))?;
        if run_len == 0 || addr % PAGE_SIZE != 0 || run_len % PAGE_SIZE != 0 {
            return Err(invalid(format!(
                "run at {addr:#x} of {run_len:#x} bytes is not whole pages"
            )));
        }
        if addr < next_free {
            return Err(invalid(format!(
                "run at {addr:#x} overlaps or precedes the previous one (which ends at {next_free:#x})"
            )));
        }
        if run_len > left {
            return Err(invalid(format!(
                "run at {addr:#x} of {run_len:#x} bytes is longer than the rest of the section"
            )));
        }
        let in_ram = mem.find_region(GuestAddress(addr)).is_some_and(|region| {
            region
                .start_addr()
                .0
                .checked_add(region.len())
                .is_some_and(|region_end| end <= region_end)
        });
        if !in_ram {
            return Err(invalid(format!(
                "run {addr:#x}..{end:#x} is not inside guest RAM"
            )));
        }
        let mut done = 0u64;
        while done < run_len {
            let n = ((run_len - done) as usize).min(buf.len());
            r.read_exact(&mut buf[..n]).map_err(io)?;
            mem.write_slice(&buf[..n], GuestAddress(addr + done))?;
            done += n as u64;
        }
        left -= run_len;
        next_free = end;
        stats.bytes_stored += run_len;
        stats.ranges += 1;
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;
    use crate::snapshot::format::SectionKind;
    use std::io::{Cursor, Seek, SeekFrom};

    fn saved(mem: &GuestMemory) -> (Vec<u8>, MemoryStats) {
        let mut out = Cursor::new(Vec::new());
        let mut section = StreamedSection::begin(&mut out, SectionKind::Memory).unwrap();
        let stats = save(mem, &mut section).unwrap();
        section.finish().unwrap();
        (out.into_inner(), stats)
    }

    #[test]
    fn only_non_zero_pages_are_stored_and_come_back() {
        let mem = create_guest_memory(4).unwrap();
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        mem.write_obj(1u8, GuestAddress(0x2fff)).unwrap();
        mem.write_obj(7u64, GuestAddress(0x3f_fff8)).unwrap();
        let (bytes, stats) = saved(&mem);
        assert_eq!(stats.ranges, 2, "0x1000..0x3000 and the last page");
        assert_eq!(stats.bytes_stored, 3 * PAGE_SIZE);
        let payload = &bytes[16..];
        let fresh = create_guest_memory(4).unwrap();
        let loaded = load(&mut Cursor::new(payload), payload.len() as u64, &fresh).unwrap();
        assert_eq!(loaded, stats);
        assert_eq!(
            fresh.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        assert_eq!(fresh.read_obj::<u8>(GuestAddress(0x2fff)).unwrap(), 1);
        assert_eq!(fresh.read_obj::<u64>(GuestAddress(0x3f_fff8)).unwrap(), 7);
    }

    fn payload_with_run(ram: u64, addr: u64, len: u64, data: usize) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&ram.to_le_bytes());
        p.extend_from_slice(&4096u32.to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
        p.extend_from_slice(&addr.to_le_bytes());
        p.extend_from_slice(&len.to_le_bytes());
        p.extend(std::iter::repeat_n(0xaa, data));
        p
    }

    #[test]
    fn runs_outside_ram_or_malformed_are_refused() {
        let mem = create_guest_memory(2).unwrap();
        let ram = 2 << 20;
        let load_p = |p: &[u8]| load(&mut Cursor::new(p), p.len() as u64, &mem);
        for (addr, len, data) in [
            (ram, 4096, 4096),             // past the end
            (ram - 4096, 8192, 8192),      // crosses the end
            (u64::MAX - 4095, 4096, 4096), // overflows
            (0x1001, 4096, 4096),          // unaligned
            (0, 0, 0),                     // empty
            (0, 1 << 40, 4096),            // longer than the section
        ] {
            let p = payload_with_run(ram, addr, len, data);
            assert!(
                matches!(load_p(&p), Err(SnapshotError::InvalidMemory(_))),
                "{addr:#x} {len:#x}"
            );
        }
        let p = payload_with_run(4 << 20, 0, 4096, 4096);
        assert!(matches!(load_p(&p), Err(SnapshotError::ConfigMismatch(_))));
        // Overlapping runs.
        let mut p = payload_with_run(ram, 0x2000, 4096, 4096);
        p.extend_from_slice(&0x1000u64.to_le_bytes());
        p.extend_from_slice(&4096u64.to_le_bytes());
        p.extend(std::iter::repeat_n(0, 4096));
        assert!(matches!(load_p(&p), Err(SnapshotError::InvalidMemory(_))));
        let mut r = Cursor::new(Vec::<u8>::new());
        r.seek(SeekFrom::Start(0)).unwrap();
        assert!(load(&mut r, 8, &mem).is_err());
    }
}
