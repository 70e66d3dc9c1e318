//! The snapshot file format, version [`FORMAT_VERSION`]. All integers are little endian.
//!
//! ```text
//! prelude   magic "SGEVMSNP" (8) | format version u32 | reserved u32 (0)
//! section   kind u32 | crc32 u32 | len u64 | len bytes         (four of them, in this order)
//!   1 header       postcard(Header): build id, vCPU count, guest RAM size, CPUID the vCPUs saw
//!   2 vm state     postcard(VmState): PIC master/slave, IOAPIC, PIT, KVM clock, serial, boot timer,
//!                  virtio devices (transport, queues, device state)
//!   3 vcpu states  postcard(Vec<VcpuState>), one per vCPU in index order
//!   4 memory       guest RAM, sparse (see [`super::memory`]); streamed, not postcard
//! end of file right after the memory section
//! ```
//!
//! The CRC-32 (IEEE) of each section covers its `len` payload bytes. A reader checks, in order:
//! the magic, the version, then for each section its kind, its length against the section's
//! limit and against what is left of the file (before allocating anything), its checksum, and
//! that it decodes completely; the header's build id must be this build's ([`build_id`]). Every
//! failure is a [`SnapshotError`]; nothing panics, and no allocation exceeds a section's limit
//! or the file's size. The memory section is checksummed by streaming it in bounded chunks.

use std::io::{Read, Seek, SeekFrom, Write};

use serde::{Deserialize, Serialize};

use super::vcpu_state::{CpuidEntry, VcpuState};
use super::vm_state::VmState;
use super::SnapshotError;

/// The first 8 bytes of every snapshot file.
pub const MAGIC: [u8; 8] = *b"SGEVMSNP";
/// The format version this VMM writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes before the first section.
pub const PRELUDE_LEN: u64 = 16;
/// Bytes of a section's frame (kind, crc, len).
pub const FRAME_LEN: u64 = 16;

/// Largest header section accepted.
pub const MAX_HEADER_LEN: u64 = 1 << 20;
/// Largest VM-state section accepted.
pub const MAX_VM_STATE_LEN: u64 = 1 << 20;
/// Largest vCPU-state section accepted (every vCPU together; one is about 10 KiB).
pub const MAX_VCPU_STATES_LEN: u64 = 64 << 20;

/// Chunk size for streaming the memory section.
pub(crate) const STREAM_CHUNK: usize = 1 << 20;

/// A section of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectionKind {
    /// Build id, vCPU count, RAM size, CPUID.
    Header = 1,
    /// Interrupt controllers, PIT, clock, legacy and virtio devices.
    VmState = 2,
    /// Every vCPU's state.
    VcpuStates = 3,
    /// Guest RAM.
    Memory = 4,
}

impl SectionKind {
    /// The sections in file order.
    pub const ORDER: [SectionKind; 4] = [
        SectionKind::Header,
        SectionKind::VmState,
        SectionKind::VcpuStates,
        SectionKind::Memory,
    ];

    fn limit(self) -> u64 {
        match self {
            Self::Header => MAX_HEADER_LEN,
            Self::VmState => MAX_VM_STATE_LEN,
            Self::VcpuStates => MAX_VCPU_STATES_LEN,
            // Bounded by the file's size here and by the guest's RAM when loaded.
            Self::Memory => u64::MAX,
        }
    }
}

impl std::fmt::Display for SectionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Header => "header",
            Self::VmState => "vm state",
            Self::VcpuStates => "vcpu states",
            Self::Memory => "memory",
        })
    }
}

/// The header section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// The VMM build that wrote it ([`build_id`]).
    pub build_id: String,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest RAM in bytes.
    pub guest_ram_bytes: u64,
    /// The CPUID the vCPUs were given (vCPU 0's; the others differ only in APIC ids and
    /// topology): the CPU features the guest may be using, checked against the restoring host
    /// ([`super::cpu_compat`]).
    pub cpuid: Vec<CpuidEntry>,
}

/// 64-bit FNV-1a, computable at compile time.
const fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = seed;
    let mut i = 0;
    while i < bytes.len() {
        h ^= bytes[i] as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    h
}

/// A hash of the source of the modules that define what a snapshot holds, computed at compile
/// time: a build whose state types or encoding changed gets a different [`build_id`], so it
/// refuses snapshots of the old layout instead of misreading them. (Conservative: an edit to a
/// comment in these files changes it too.)
const STATE_SOURCE_HASH: u64 = {
    let mut h = 0xcbf2_9ce4_8422_2325;
    h = fnv1a(h, include_bytes!("format.rs"));
    h = fnv1a(h, include_bytes!("vcpu_state.rs"));
    h = fnv1a(h, include_bytes!("vm_state.rs"));
    h = fnv1a(h, include_bytes!("memory.rs"));
    h = fnv1a(h, include_bytes!("virtio_state.rs"));
    h = fnv1a(h, include_bytes!("../virtio/balloon/state.rs"));
    h = fnv1a(h, include_bytes!("../virtio/vsock/state.rs"));
    h = fnv1a(h, include_bytes!("../virtio/block/state.rs"));
    h = fnv1a(h, include_bytes!("../virtio/fs/state.rs"));
    h = fnv1a(h, include_bytes!("../fuse/session_state.rs"));
    h
};

/// This build's id, recorded in every snapshot and required to match on restore: the crate
/// version and [`STATE_SOURCE_HASH`].
pub fn build_id() -> String {
    format!(
        "vmm {} state {STATE_SOURCE_HASH:016x}",
        env!("CARGO_PKG_VERSION")
    )
}

/// Where a streamed section's payload lies in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SectionSpan {
    /// Offset of its first payload byte.
    pub offset: u64,
    /// Payload length.
    pub len: u64,
}

/// A parsed snapshot whose every section passed its checksum: the decoded state, and where the
/// memory section lies (loaded later, straight into guest RAM).
#[derive(Debug, Clone)]
pub struct ParsedSnapshot {
    /// The header.
    pub header: Header,
    /// VM-wide state.
    pub vm: VmState,
    /// One state per vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// The memory section.
    pub memory: SectionSpan,
}

/// Encodes a section's value with postcard.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, SnapshotError> {
    postcard::to_stdvec(value).map_err(|e| SnapshotError::Encode(e.to_string()))
}

fn decode<'a, T: Deserialize<'a>>(
    section: SectionKind,
    bytes: &'a [u8],
) -> Result<T, SnapshotError> {
    let err = |message: String| SnapshotError::Decode { section, message };
    let (value, rest) = postcard::take_from_bytes(bytes).map_err(|e| err(e.to_string()))?;
    if !rest.is_empty() {
        return Err(err(format!("{} bytes left over", rest.len())));
    }
    Ok(value)
}

/// The prelude's bytes.
pub fn prelude() -> [u8; PRELUDE_LEN as usize] {
    let mut p = [0u8; PRELUDE_LEN as usize];
    p[..8].copy_from_slice(&MAGIC);
    p[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    p
}

/// A section frame's bytes.
pub fn frame(kind: SectionKind, crc: u32, len: u64) -> [u8; FRAME_LEN as usize] {
    let mut f = [0u8; FRAME_LEN as usize];
    f[..4].copy_from_slice(&(kind as u32).to_le_bytes());
    f[4..8].copy_from_slice(&crc.to_le_bytes());
    f[8..].copy_from_slice(&len.to_le_bytes());
    f
}

/// A whole file in memory from the four payloads, each framed with its correct length and CRC
/// (for tests and the fuzz target, which need files that get past the checksums).
pub fn frame_file(payloads: [&[u8]; 4]) -> Vec<u8> {
    let mut out = prelude().to_vec();
    for (kind, payload) in SectionKind::ORDER.into_iter().zip(payloads) {
        out.extend_from_slice(&frame(kind, crc32fast::hash(payload), payload.len() as u64));
        out.extend_from_slice(payload);
    }
    out
}

/// Writes a section whose payload is in memory.
pub(crate) fn write_section<W: Write>(
    w: &mut W,
    kind: SectionKind,
    payload: &[u8],
) -> std::io::Result<()> {
    w.write_all(&frame(kind, crc32fast::hash(payload), payload.len() as u64))?;
    w.write_all(payload)
}

/// A section written in pieces: a placeholder frame first, patched with the length and CRC by
/// [`StreamedSection::finish`].
pub(crate) struct StreamedSection<'a, W: Write + Seek> {
    w: &'a mut W,
    kind: SectionKind,
    frame_at: u64,
    len: u64,
    crc: crc32fast::Hasher,
}

impl<'a, W: Write + Seek> StreamedSection<'a, W> {
    pub(crate) fn begin(w: &'a mut W, kind: SectionKind) -> std::io::Result<Self> {
        let frame_at = w.stream_position()?;
        w.write_all(&frame(kind, 0, 0))?;
        Ok(Self {
            w,
            kind,
            frame_at,
            len: 0,
            crc: crc32fast::Hasher::new(),
        })
    }

    pub(crate) fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.w.write_all(bytes)?;
        self.crc.update(bytes);
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Patches the frame; leaves the writer at the end of the section. Returns the payload
    /// length.
    pub(crate) fn finish(self) -> std::io::Result<u64> {
        let end = self.w.stream_position()?;
        self.w.seek(SeekFrom::Start(self.frame_at))?;
        self.w
            .write_all(&frame(self.kind, self.crc.finalize(), self.len))?;
        self.w.seek(SeekFrom::Start(end))?;
        Ok(self.len)
    }
}

/// Reads `n` bytes, or says the file is truncated.
fn read_exact_or_truncated<R: Read>(
    r: &mut R,
    buf: &mut [u8],
    what: &str,
    available: u64,
) -> Result<(), SnapshotError> {
    if (buf.len() as u64) > available {
        return Err(SnapshotError::Truncated {
            what: what.to_string(),
            needed: buf.len() as u64,
            available,
        });
    }
    r.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            SnapshotError::Truncated {
                what: what.to_string(),
                needed: buf.len() as u64,
                available,
            }
        } else {
            SnapshotError::io(format!("reading the snapshot's {what}"))(e)
        }
    })
}

/// Reads one section frame and checks it against the expected kind, its limit and the bytes
/// left. Returns the stored CRC and the length.
fn read_frame<R: Read>(
    r: &mut R,
    expected: SectionKind,
    available: u64,
) -> Result<(u32, u64), SnapshotError> {
    let mut f = [0u8; FRAME_LEN as usize];
    read_exact_or_truncated(r, &mut f, &format!("{expected} section frame"), available)?;
    let word = |i: usize| u32::from_le_bytes([f[i], f[i + 1], f[i + 2], f[i + 3]]);
    let kind = word(0);
    let crc = word(4);
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&f[8..]);
    let len = u64::from_le_bytes(len_bytes);
    if kind != expected as u32 {
        return Err(SnapshotError::UnexpectedSection {
            expected,
            found: kind,
        });
    }
    if len > expected.limit() {
        return Err(SnapshotError::SectionTooLarge {
            section: expected,
            len,
            limit: expected.limit(),
        });
    }
    let left = available - FRAME_LEN;
    if len > left {
        return Err(SnapshotError::Truncated {
            what: format!("{expected} section"),
            needed: len,
            available: left,
        });
    }
    Ok((crc, len))
}

fn check_crc(section: SectionKind, stored: u32, computed: u32) -> Result<(), SnapshotError> {
    if stored == computed {
        Ok(())
    } else {
        Err(SnapshotError::ChecksumMismatch {
            section,
            stored,
            computed,
        })
    }
}

/// Reads a section held in memory: frame, payload (bounded by the limit and the file), CRC.
fn read_small_section<R: Read>(
    r: &mut R,
    kind: SectionKind,
    available: &mut u64,
) -> Result<Vec<u8>, SnapshotError> {
    let (crc, len) = read_frame(r, kind, *available)?;
    // `len` is at most the section's limit and at most what the file still holds.
    let mut payload = vec![0u8; len as usize];
    read_exact_or_truncated(
        r,
        &mut payload,
        &format!("{kind} section"),
        *available - FRAME_LEN,
    )?;
    *available -= FRAME_LEN + len;
    check_crc(kind, crc, crc32fast::hash(&payload))?;
    Ok(payload)
}

/// Parses a snapshot of `file_len` bytes from `r` (positioned at its start): checks everything
/// the format promises (see the module docs) and decodes the state sections. The memory section
/// is only checksummed; [`super::memory::load`] reads it into guest RAM.
pub fn parse<R: Read + Seek>(r: &mut R, file_len: u64) -> Result<ParsedSnapshot, SnapshotError> {
    let mut available = file_len;
    let mut magic = [0u8; 8];
    read_exact_or_truncated(r, &mut magic, "magic", available)?;
    if magic != MAGIC {
        return Err(SnapshotError::BadMagic { found: magic });
    }
    let mut rest = [0u8; 8];
    read_exact_or_truncated(r, &mut rest, "prelude", available - 8)?;
    let version = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
    if version != FORMAT_VERSION {
        return Err(SnapshotError::VersionMismatch {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    available -= PRELUDE_LEN;

    let payload = read_small_section(r, SectionKind::Header, &mut available)?;
    let header: Header = decode(SectionKind::Header, &payload)?;
    let this = build_id();
    if header.build_id != this {
        return Err(SnapshotError::BuildMismatch {
            snapshot: header.build_id,
            this,
        });
    }

    let payload = read_small_section(r, SectionKind::VmState, &mut available)?;
    let vm: VmState = decode(SectionKind::VmState, &payload)?;
    let payload = read_small_section(r, SectionKind::VcpuStates, &mut available)?;
    let vcpus: Vec<VcpuState> = decode(SectionKind::VcpuStates, &payload)?;

    let (crc, len) = read_frame(r, SectionKind::Memory, available)?;
    let offset = file_len - available + FRAME_LEN;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; STREAM_CHUNK.min(len as usize)];
    let mut left = len;
    while left > 0 {
        let n = (left as usize).min(buf.len());
        read_exact_or_truncated(r, &mut buf[..n], "memory section", left)?;
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    check_crc(SectionKind::Memory, crc, hasher.finalize())?;
    available -= FRAME_LEN + len;
    if available != 0 {
        return Err(SnapshotError::TrailingData(available));
    }

    let parsed = ParsedSnapshot {
        header,
        vm,
        vcpus,
        memory: SectionSpan { offset, len },
    };
    validate(&parsed)?;
    Ok(parsed)
}

/// Cross-section consistency that the checksums cannot vouch for.
fn validate(s: &ParsedSnapshot) -> Result<(), SnapshotError> {
    let invalid = |m: String| Err(SnapshotError::InvalidState(m));
    if s.header.vcpus == 0 || s.header.vcpus > crate::config::MAX_VCPUS {
        return invalid(format!("{} vCPUs", s.header.vcpus));
    }
    if s.header.cpuid.len() > kvm_bindings::KVM_MAX_CPUID_ENTRIES {
        return invalid(format!("{} CPUID entries", s.header.cpuid.len()));
    }
    if s.vcpus.len() != usize::from(s.header.vcpus) {
        return invalid(format!(
            "the header says {} vCPUs, the vCPU section has {}",
            s.header.vcpus,
            s.vcpus.len()
        ));
    }
    for (i, v) in s.vcpus.iter().enumerate() {
        v.validate()
            .map_err(|m| SnapshotError::InvalidState(format!("vCPU {i}: {m}")))?;
    }
    s.vm.validate().map_err(SnapshotError::InvalidState)?;
    Ok(())
}

/// Parses a snapshot held in memory (tests, fuzzing).
pub fn parse_bytes(bytes: &[u8]) -> Result<ParsedSnapshot, SnapshotError> {
    parse(&mut std::io::Cursor::new(bytes), bytes.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_id_names_the_version_and_a_hash() {
        let id = build_id();
        assert!(id.starts_with(&format!("vmm {} state ", env!("CARGO_PKG_VERSION"))));
        assert_eq!(id, build_id());
    }

    #[test]
    fn short_files_are_truncated_not_panics() {
        for n in 0..PRELUDE_LEN as usize {
            let p = prelude();
            let err = parse_bytes(&p[..n]).unwrap_err();
            assert!(matches!(err, SnapshotError::Truncated { .. }), "{n}: {err}");
        }
        let err = parse_bytes(&prelude()).unwrap_err();
        assert!(matches!(err, SnapshotError::Truncated { .. }), "{err}");
    }

    #[test]
    fn bad_magic_and_version_are_named() {
        let mut p = prelude();
        p[0] = b'X';
        assert!(matches!(
            parse_bytes(&p),
            Err(SnapshotError::BadMagic { .. })
        ));
        let mut p = prelude();
        p[8] = 9;
        assert!(matches!(
            parse_bytes(&p),
            Err(SnapshotError::VersionMismatch { found: 9, .. })
        ));
    }

    #[test]
    fn a_section_longer_than_its_limit_or_the_file_is_refused_before_allocating() {
        let mut f = prelude().to_vec();
        f.extend_from_slice(&frame(SectionKind::Header, 0, u64::MAX));
        assert!(matches!(
            parse_bytes(&f),
            Err(SnapshotError::SectionTooLarge {
                section: SectionKind::Header,
                ..
            })
        ));
        let mut f = prelude().to_vec();
        f.extend_from_slice(&frame(SectionKind::Header, 0, 1000));
        f.extend_from_slice(&[0; 10]);
        assert!(matches!(
            parse_bytes(&f),
            Err(SnapshotError::Truncated { needed: 1000, .. })
        ));
        let mut f = prelude().to_vec();
        f.extend_from_slice(&frame(SectionKind::Memory, 0, 0));
        assert!(matches!(
            parse_bytes(&f),
            Err(SnapshotError::UnexpectedSection {
                expected: SectionKind::Header,
                found: 4
            })
        ));
    }
}
