//! The block device's state as a plain serializable value ([`BlockState`]): what a snapshot
//! saves of the device besides its queue. Requests complete before the device returns to its
//! event loop, so none is ever in flight. Only read-only disks are captured: a writable disk's
//! contents are not in the snapshot, and the guest's page cache would disagree with whatever
//! was written after it. Part of the snapshot format: the build id hashes this file (see
//! [`crate::snapshot::format`]).

use serde::{Deserialize, Serialize};

/// What a snapshot keeps of a (read-only) block device: what its driver read from it, which
/// the disk given at restore must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// Capacity in 512-byte sectors.
    pub sectors: u64,
}
