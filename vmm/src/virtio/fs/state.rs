//! The virtio-fs device's state as a plain serializable value ([`FsState`]): what a snapshot
//! saves of the device besides its queues: its tag and its FUSE session (every node id and
//! handle the guest holds, by path; see [`crate::fuse::session_state`]). Requests are answered
//! before the device returns to its event loop, so none is in flight. Part of the snapshot
//! format: the build id hashes this file (see [`crate::snapshot::format`]).

use serde::{Deserialize, Serialize};

use crate::fuse::SessionState;

/// What a snapshot keeps of a virtio-fs device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsState {
    /// The tag the guest mounted it by (the restoring configuration's share in the same slot
    /// must have it).
    pub tag: String,
    /// The FUSE session.
    pub session: SessionState,
}
