//! virtio-fs (device id 26): a host directory shared with the guest, served in-process by the
//! FUSE passthrough server of [`crate::fuse`]. The device ([`device`]) moves FUSE requests and
//! replies between the guest's queues and the server; the guest mounts it with
//! `mount -t virtiofs <tag> <dir>`. What a snapshot keeps of it is in [`state`].

pub mod device;
pub mod state;

pub use device::{FsDevice, FsStats, TAG_MAX_LEN};
pub use state::FsState;
