//! Snapshots of a running VM: everything needed to resume it in a fresh VMM process on a
//! compatible host — guest RAM, every vCPU's architectural state, the in-kernel interrupt
//! controllers, PIT and KVM clock, and the state of the legacy devices — in one versioned,
//! checksummed file. The first steps of checkpoint/restore: of the virtio devices, the balloon,
//! the vsock device, read-only disks and shared directories are captured (with their
//! transports; vsock connections end with a transport reset, see
//! [`crate::virtio::vsock::state`]; a share's open files are opened again by path, see
//! [`crate::fuse::session_state`]); a VM with a writable disk or a network device is refused
//! ([`SnapshotError::UnsupportedDevice`]).
//!
//! Use [`crate::VmHandle::snapshot`] (pauses the VM, writes the file, leaves the VM paused) and
//! [`crate::Vm::restore`] (builds a fresh VM from a [`crate::VmConfig`] and the file, then runs it).
//!
//! What each submodule owns:
//!
//! * [`format`]: the file layout (magic, format version, build id, section framing with lengths
//!   and CRC-32s), its limits, and the parser that refuses a truncated, corrupted or hostile file
//!   with a [`SnapshotError`] before anything reaches KVM or guest RAM.
//! * [`cpu_compat`]: which CPUID bits are CPU features, and the check that the restoring host's
//!   KVM supports every one the snapshot's guest saw.
//! * [`vcpu_state`]: one vCPU's state as plain serde types, captured from a `VcpuFd` on its own
//!   thread and restored into a fresh one, in KVM's required order.
//! * [`vm_state`]: the VM-wide state: PIC master/slave and IOAPIC, PIT, KVM clock, the serial
//!   port and boot timer, and the virtio devices.
//! * [`virtio_state`]: each virtio device's transport (registers, queues, interrupt status) and
//!   its own state, as plain serde types.
//! * [`memory`]: guest RAM written sparsely (runs of non-zero pages) and read back through
//!   vm-memory into fresh guest RAM, bounded by the configured size.
//! * `file` (private): creating the snapshot file safely (new, `O_EXCL`, `O_NOFOLLOW`, 0600) and
//!   writing or reading the whole thing.

/// `From` both ways, by reference, between a snapshot type and the foreign struct it mirrors
/// (kvm-bindings, vm-superio), field for field: the first list copied, the `via` list converted
/// with these `From`s in turn; the foreign struct's other fields (padding) take their defaults.
macro_rules! mirror_struct {
    ($ours:ty, $theirs:ty, [$($field:ident),+ $(,)?] $(, via [$($via:ident),+ $(,)?])?) => {
        impl From<&$theirs> for $ours {
            #[allow(clippy::clone_on_copy)]
            fn from(v: &$theirs) -> Self {
                Self {
                    $($field: v.$field.clone(),)+
                    $($($via: (&v.$via).into(),)+)?
                }
            }
        }

        impl From<&$ours> for $theirs {
            #[allow(clippy::clone_on_copy, clippy::needless_update)]
            fn from(v: &$ours) -> Self {
                Self {
                    $($field: v.$field.clone(),)+
                    $($($via: (&v.$via).into(),)+)?
                    ..Default::default()
                }
            }
        }
    };
}
use mirror_struct;

pub mod cpu_compat;
mod file;
pub mod format;
pub mod memory;
#[cfg(test)]
mod tests;
pub mod vcpu_state;
pub mod virtio_state;
pub mod vm_state;

use std::path::PathBuf;

pub use cpu_compat::MissingCpuFeature;
pub(crate) use file::{load_memory, read_snapshot_file, write_snapshot_file};
pub use format::{build_id, SectionKind, FORMAT_VERSION, MAGIC};

/// The first virtio device `config` asks for whose state snapshots cannot capture yet, by name:
/// such a VM is refused ([`SnapshotError::UnsupportedDevice`]). (The balloon's, vsock's,
/// read-only disks' and shares' are captured.)
pub(crate) fn unsupported_device(config: &crate::VmConfig) -> Option<&'static str> {
    if config.disks.iter().any(|d| !d.read_only) {
        Some("writable virtio-blk")
    } else if config.net.is_some() {
        Some("virtio-net")
    } else {
        None
    }
}

/// What [`crate::VmHandle::snapshot`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// The file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub file_bytes: u64,
    /// Bytes of guest RAM stored (non-zero pages only).
    pub memory_bytes_stored: u64,
    /// Runs of non-zero pages stored.
    pub memory_ranges: u64,
    /// Total guest RAM in bytes.
    pub guest_ram_bytes: u64,
    /// vCPUs captured.
    pub vcpus: u8,
    /// The build id recorded in the header ([`build_id`]).
    pub build_id: String,
}

/// Everything that can go wrong while taking, reading or restoring a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The snapshot file already exists (or is a symlink); snapshots never overwrite.
    #[error("snapshot file {0} already exists (snapshots are always written to a new file)")]
    FileExists(PathBuf),
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// The file ends before a structure it announces.
    #[error("snapshot truncated: {what} needs {needed} bytes, only {available} left in the file")]
    Truncated {
        /// What was being read.
        what: String,
        /// Bytes it needs.
        needed: u64,
        /// Bytes the file still has.
        available: u64,
    },
    /// The file does not start with [`MAGIC`].
    #[error("not a VM snapshot: bad magic {found:02x?}")]
    BadMagic {
        /// The first bytes found.
        found: [u8; 8],
    },
    /// The file's format version is not the one this VMM reads.
    #[error(
        "snapshot format version {found} is not supported (this VMM reads version {supported})"
    )]
    VersionMismatch {
        /// Version in the file.
        found: u32,
        /// Version this VMM reads.
        supported: u32,
    },
    /// The snapshot was written by a different build of the VMM.
    #[error("snapshot was taken by VMM build {snapshot:?}, this is build {this:?}")]
    BuildMismatch {
        /// Build id in the file.
        snapshot: String,
        /// This build's id.
        this: String,
    },
    /// A section's CRC-32 does not match its bytes.
    #[error(
        "checksum mismatch in section {section} (stored {stored:#010x}, computed {computed:#010x})"
    )]
    ChecksumMismatch {
        /// The section.
        section: SectionKind,
        /// CRC in the file.
        stored: u32,
        /// CRC of the bytes read.
        computed: u32,
    },
    /// Sections are out of order or of an unknown kind.
    #[error("expected section {expected}, found section kind {found}")]
    UnexpectedSection {
        /// The section that must come next.
        expected: SectionKind,
        /// The kind number found.
        found: u32,
    },
    /// A section is longer than this VMM accepts for its kind.
    #[error("section {section} is {len} bytes, more than the {limit} allowed")]
    SectionTooLarge {
        /// The section.
        section: SectionKind,
        /// Its announced length.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// Bytes follow the last section.
    #[error("{0} unexpected bytes after the last section")]
    TrailingData(u64),
    /// A section's bytes do not decode.
    #[error("section {section} does not decode: {message}")]
    Decode {
        /// The section.
        section: SectionKind,
        /// The decoder's message.
        message: String,
    },
    /// State could not be encoded.
    #[error("cannot encode snapshot state: {0}")]
    Encode(String),
    /// The snapshot's guest used CPU features this host's KVM does not offer.
    #[error("CPU incompatible: this host's KVM lacks features the snapshot's guest saw: {}", cpu_compat::describe(.0))]
    CpuIncompatible(Vec<MissingCpuFeature>),
    /// The restore configuration does not match the snapshot (memory size, vCPU count).
    #[error("the VM configuration does not match the snapshot: {0}")]
    ConfigMismatch(String),
    /// The VM has a device whose state snapshots cannot capture yet.
    #[error("snapshots of VMs with a {0} device are not supported yet")]
    UnsupportedDevice(String),
    /// The memory section describes RAM that is not there or is malformed.
    #[error("invalid memory section: {0}")]
    InvalidMemory(String),
    /// The state in the file is inconsistent (after its checksum matched: a bug or a crafted
    /// file).
    #[error("invalid snapshot state: {0}")]
    InvalidState(String),
    /// This host's KVM lacks a capability the snapshot needs.
    #[error("KVM lacks {0}, which this snapshot needs")]
    MissingCapability(&'static str),
    /// A KVM ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// The operation (and vCPU, where it is one).
        what: String,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// KVM refused to restore an MSR.
    #[error("vCPU {vcpu}: KVM refused MSR {index:#x} on restore")]
    MsrRefused {
        /// The vCPU.
        vcpu: u8,
        /// The first MSR refused.
        index: u32,
    },
    /// Guest RAM could not be read or written.
    #[error("guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    /// The VM is not running (stopped or stopping).
    #[error("the VM is not running")]
    NotRunning,
    /// The vCPUs did not pause, or did not report their state, in time.
    #[error("the vCPUs did not {0} within the time limit")]
    Timeout(&'static str),
}

impl SnapshotError {
    /// Whether the snapshot is sound but this host cannot resume it (its CPU, its KVM, its
    /// VMM build or format version): another host may, so a scheduler keeps the snapshot and
    /// tries elsewhere rather than giving up on it.
    pub fn is_host_mismatch(&self) -> bool {
        matches!(
            self,
            Self::CpuIncompatible(_)
                | Self::BuildMismatch { .. }
                | Self::VersionMismatch { .. }
                | Self::MissingCapability(_)
        )
    }

    /// A KVM ioctl error with what was being done.
    pub(crate) fn kvm(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> Self {
        let what = what.into();
        move |source| Self::Kvm { what, source }
    }

    /// An I/O error with what was being done.
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }
}
