//! The virtio devices' state as plain serde types: per device, its virtio-mmio transport
//! (registers, the queues' positions and addresses, the interrupt status) and the device's own
//! state. Captured by [`crate::virtio::mmio::MmioTransport::save_state`] and put back into a
//! freshly attached transport by [`crate::virtio::mmio::MmioTransport::restore_state`].
//!
//! Everything here comes from a file and is untrusted until restored: queues go through
//! virtio-queue's own validation (`Queue::try_from`), and the transport checks the device type,
//! the queue count and that every ready queue lies in guest RAM.

use serde::{Deserialize, Serialize};
use virtio_queue::QueueState;

use crate::virtio::balloon::BalloonState;
use crate::virtio::block::BlockState;
use crate::virtio::fs::FsState;
use crate::virtio::vsock::VsockState;

/// One virtqueue: virtio-queue's [`QueueState`], field for field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// The largest size the device offers.
    pub max_size: u16,
    /// The next available-ring entry the device will read.
    pub next_avail: u16,
    /// The next used-ring entry the device will write.
    pub next_used: u16,
    /// Whether VIRTIO_F_RING_EVENT_IDX was negotiated.
    pub event_idx_enabled: bool,
    /// The size the driver chose.
    pub size: u16,
    /// Whether the driver made it ready.
    pub ready: bool,
    /// Guest physical address of the descriptor table.
    pub desc_table: u64,
    /// Guest physical address of the available ring.
    pub avail_ring: u64,
    /// Guest physical address of the used ring.
    pub used_ring: u64,
}

super::mirror_struct!(
    QueueSnapshot,
    QueueState,
    [
        max_size,
        next_avail,
        next_used,
        event_idx_enabled,
        size,
        ready,
        desc_table,
        avail_ring,
        used_ring
    ]
);

/// A device's own state, beyond its queues: one variant per device type snapshots support.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceSnapshot {
    /// virtio-balloon.
    Balloon(BalloonState),
    /// virtio-vsock.
    Vsock(VsockState),
    /// virtio-blk (read-only disks).
    Block(BlockState),
    /// virtio-fs.
    Fs(FsState),
}

/// One virtio-mmio device: its transport registers, queues and interrupt status, and the
/// device's own state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportSnapshot {
    /// The virtio device id (checked against the device attached at restore).
    pub device_type: u32,
    /// The device status register.
    pub status: u32,
    /// QueueSel.
    pub queue_select: u32,
    /// DeviceFeaturesSel.
    pub device_features_select: u32,
    /// DriverFeaturesSel.
    pub driver_features_select: u32,
    /// The features the driver wrote (acked once FEATURES_OK is set).
    pub driver_features: u64,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// InterruptStatus: bits raised and not yet acknowledged.
    pub interrupt_status: u32,
    /// Whether the device was handed its queues at DRIVER_OK (or was about to be): it then
    /// runs with [`Self::queues`] after a restore.
    pub running: bool,
    /// Every queue in transport order: while [`Self::running`], the queues the device runs
    /// with (a queue it does not use is left as the device offers it); before, the queue
    /// registers as the driver programmed them so far.
    pub queues: Vec<QueueSnapshot>,
    /// The device's own state.
    pub device: DeviceSnapshot,
}

impl DeviceSnapshot {
    /// The virtio device id of the device this state belongs to.
    pub fn device_type(&self) -> u32 {
        match self {
            Self::Balloon(_) => virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON,
            Self::Vsock(_) => virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK,
            Self::Block(_) => virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK,
            Self::Fs(_) => virtio_bindings::virtio_ids::VIRTIO_ID_FS,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_state_round_trips_field_for_field() {
        let q = QueueState {
            max_size: 256,
            next_avail: 7,
            next_used: 6,
            event_idx_enabled: true,
            size: 64,
            ready: true,
            desc_table: 0x1000,
            avail_ring: 0x2000,
            used_ring: 0x3000,
        };
        let ours = QueueSnapshot::from(&q);
        assert_eq!(QueueState::from(&ours), q);
    }
}
