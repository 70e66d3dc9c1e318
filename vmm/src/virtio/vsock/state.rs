//! The vsock device's state as a plain serializable value ([`VsockState`]): what a snapshot
//! saves of the device besides its queues. Connections are not in it: their host ends (Unix
//! sockets of the VMM process) do not outlive the process, so a restored device tells the
//! guest that every connection is gone (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET), as Firecracker
//! does, and the guest's programs connect again. Part of the snapshot format: the build id
//! hashes this file (see [`crate::snapshot::format`]).

use serde::{Deserialize, Serialize};

/// What a snapshot keeps of the vsock device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// The guest CID the device had (a restore may give another: the guest's driver reads the
    /// CID again on the transport reset).
    pub guest_cid: u64,
    /// A transport reset the guest has not been told of yet (its driver had no event buffer
    /// available): a snapshot of a freshly restored VM keeps it pending.
    pub transport_reset_pending: bool,
}
