//! The session's side of a checkpoint, stored as `session.json` next to the VM's `vm.snap`.

use crate::session_progress::SessionPoint;

/// The record's format; another is refused.
pub const RECORD_FORMAT: u32 = 1;

/// Where the job stood when its VM's snapshot was taken.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointRecord {
    pub format: u32,
    /// The checkpoint's number in its directory (1, 2, ...).
    pub generation: u64,
    /// When the snapshot was taken (ms since the epoch).
    pub taken_unix_ms: u64,
    /// The job's stdout and stderr then.
    pub session: SessionPoint,
    /// The VM's size (a restore builds the same machine).
    pub mem_mib: u32,
    pub vcpus: u8,
    /// The snapshot file's size and the guest RAM it holds, in bytes.
    pub snapshot_bytes: u64,
    pub memory_bytes_stored: u64,
    /// The VMM build that wrote the snapshot (only the same build restores it).
    pub build_id: String,
}
