//! The snapshot file on disk: created new (`O_CREAT | O_EXCL | O_NOFOLLOW`, mode 0600, so an
//! existing file or a planted symlink is refused, never written through) and synced before the
//! snapshot counts as taken; read back in one checked pass, then memory in a second.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::format::{self, Header, ParsedSnapshot, SectionKind, StreamedSection};
use super::memory::{self, MemoryStats};
use super::vcpu_state::VcpuState;
use super::vm_state::VmState;
use super::{SnapshotError, SnapshotInfo};
use crate::memory::GuestMemory;

/// Creates `path` (which must not exist) and writes the snapshot into it. On failure the
/// partial file is removed.
pub(crate) fn write_snapshot_file(
    path: &Path,
    header: &Header,
    vm: &VmState,
    vcpus: &[VcpuState],
    mem: &GuestMemory,
) -> Result<SnapshotInfo, SnapshotError> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists
                || e.raw_os_error() == Some(libc::ELOOP)
            {
                SnapshotError::FileExists(path.to_path_buf())
            } else {
                SnapshotError::io(format!("cannot create {}", path.display()))(e)
            }
        })?;
    match write_into(file, header, vm, vcpus, mem) {
        Ok((file_bytes, stats)) => Ok(SnapshotInfo {
            path: path.to_path_buf(),
            file_bytes,
            memory_bytes_stored: stats.bytes_stored,
            memory_ranges: stats.ranges,
            guest_ram_bytes: header.guest_ram_bytes,
            vcpus: header.vcpus,
            build_id: header.build_id.clone(),
        }),
        Err(e) => {
            // We created it a moment ago; a partial snapshot must not be mistaken for one.
            let _ = std::fs::remove_file(path);
            Err(e)
        }
    }
}

fn write_into(
    file: File,
    header: &Header,
    vm: &VmState,
    vcpus: &[VcpuState],
    mem: &GuestMemory,
) -> Result<(u64, MemoryStats), SnapshotError> {
    let io = |e| SnapshotError::io("writing the snapshot")(e);
    let header_bytes = format::encode(header)?;
    let vm_bytes = format::encode(vm)?;
    let vcpu_bytes = format::encode(&vcpus)?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    w.write_all(&format::prelude()).map_err(io)?;
    format::write_section(&mut w, SectionKind::Header, &header_bytes).map_err(io)?;
    format::write_section(&mut w, SectionKind::VmState, &vm_bytes).map_err(io)?;
    format::write_section(&mut w, SectionKind::VcpuStates, &vcpu_bytes).map_err(io)?;
    let mut section = StreamedSection::begin(&mut w, SectionKind::Memory).map_err(io)?;
    let stats = memory::save(mem, &mut section)?;
    section.finish().map_err(io)?;
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    Ok((len, stats))
}

/// Opens and parses `path` (every checksum verified, the build id matched). Returns the file
/// for [`load_memory`].
pub(crate) fn read_snapshot_file(path: &Path) -> Result<(File, ParsedSnapshot), SnapshotError> {
    // O_NONBLOCK: a FIFO planted at the path must not block the open (it is then refused as
    // not a regular file); on a regular file the flag changes nothing.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(SnapshotError::io(format!("cannot open {}", path.display())))?;
    let meta = file
        .metadata()
        .map_err(SnapshotError::io(format!("cannot stat {}", path.display())))?;
    if !meta.is_file() {
        return Err(SnapshotError::Io {
            what: format!("cannot read {}", path.display()),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
        });
    }
    let len = meta.len();
    let mut r = BufReader::with_capacity(1 << 20, file);
    let parsed = format::parse(&mut r, len)?;
    Ok((r.into_inner(), parsed))
}

/// Loads the memory section of a parsed snapshot into fresh guest RAM.
pub(crate) fn load_memory(
    file: &mut File,
    parsed: &ParsedSnapshot,
    mem: &GuestMemory,
) -> Result<MemoryStats, SnapshotError> {
    file.seek(SeekFrom::Start(parsed.memory.offset))
        .map_err(SnapshotError::io("seeking to the memory section"))?;
    let mut r = BufReader::with_capacity(1 << 20, file);
    memory::load(&mut r, parsed.memory.len, mem)
}
