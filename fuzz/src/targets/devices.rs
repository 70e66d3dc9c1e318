//! The virtio devices under test, each on its real host-side backend in a case's scratch
//! directory: vsock with its muxer (a Unix socket), virtio-blk on a disk image, virtio-fs on a
//! FUSE server over a share.

use vmm::fuse::FuseServer;
use vmm::virtio::block::{BlockDevice, Disk};
use vmm::virtio::device::VirtioDevice;
use vmm::virtio::fs::FsDevice;
use vmm::virtio::vsock::{Muxer, VsockDevice};

use super::scratch::Scratch;

/// The guest's vsock context id in every case.
pub const GUEST_CID: u64 = 3;
/// Sectors of a case's disk.
pub const DISK_SECTORS: u64 = 64;

/// Which device a case drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// virtio-vsock: RX, TX and event queues.
    Vsock,
    /// virtio-blk: one request queue.
    Block,
    /// virtio-fs: the high-priority queue and one request queue.
    Fs,
}

impl DeviceKind {
    /// The kind a selector byte picks.
    pub fn from_selector(b: u8) -> Self {
        match b % 3 {
            0 => Self::Vsock,
            1 => Self::Block,
            _ => Self::Fs,
        }
    }

    /// How many queues the device has.
    pub fn queue_count(self) -> usize {
        match self {
            Self::Vsock => 3,
            Self::Block => 1,
            Self::Fs => 2,
        }
    }

    /// A device of this kind backed by files in `scratch` (the disk and the share read-only
    /// when `read_only`).
    pub fn create(self, scratch: &Scratch, read_only: bool) -> Box<dyn VirtioDevice> {
        match self {
            Self::Vsock => Box::new(VsockDevice::new(
                GUEST_CID,
                Muxer::new(GUEST_CID, &scratch.path("v.sock")).expect("a vsock muxer"),
            )),
            Self::Block => Box::new(BlockDevice::new(
                Disk::open(&scratch.disk(DISK_SECTORS), read_only).expect("a disk"),
                "fuzz-disk",
            )),
            Self::Fs => Box::new(
                FsDevice::new(
                    "share",
                    FuseServer::new(&scratch.share(), read_only).expect("a FUSE server"),
                )
                .expect("a virtio-fs device"),
            ),
        }
    }
}
