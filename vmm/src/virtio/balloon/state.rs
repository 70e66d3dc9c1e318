//! The balloon device's state as a plain serializable value ([`BalloonState`]): what a
//! snapshot saves of the device besides its queues. Part of the snapshot format: the build id
//! hashes this file (see [`crate::snapshot::format`]).

use serde::{Deserialize, Serialize};

/// What the device holds: what the driver told it and what it gave back to the host. A plain
/// value: copied out for the VM's owner, and saved and restored with a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonState {
    /// `actual`: the balloon's size in 4 KiB pages, as the driver last wrote it. Reset with
    /// the device.
    pub actual: u32,
    /// Features the driver acked at the last activation (0 while not active).
    pub acked_features: u64,
    /// 4 KiB pages dropped from the host because the guest reported them free.
    pub reported_pages: u64,
    /// 4 KiB pages dropped from the host because the guest put them in the balloon.
    pub inflated_pages: u64,
    /// Ranges (a reported buffer, or a run of inflated frames) of which nothing was dropped:
    /// outside guest RAM, in the MMIO gap, shorter than a page, or empty.
    pub ignored_ranges: u64,
    /// Descriptors not looked at: the wrong direction, an unreadable frame-number buffer, or
    /// past a chain's bound.
    pub skipped_descriptors: u64,
    /// Ranges the host refused to drop (`madvise` failed).
    pub discard_failures: u64,
}
