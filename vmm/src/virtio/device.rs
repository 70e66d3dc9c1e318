//! What a virtio device implements to sit behind the MMIO transport: identity, features,
//! configuration space, activation with the driver's queues, queue notifications, and reset;
//! and the pieces every device's queue handling shares (config-space reads, answering each
//! available chain). Devices that snapshots support also give their own state as a plain
//! value and the state of the queues they run with, and take that state back.

use std::os::unix::io::RawFd;
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueState, QueueT};

use super::interrupt::InterruptLine;
use crate::memory::GuestMemory;
use crate::snapshot::virtio_state::DeviceSnapshot;

/// A fault that leaves the device unusable until the driver resets it (the transport then sets
/// DEVICE_NEEDS_RESET). Faults come from the guest breaking the virtqueue protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("virtqueue fault: {0}")]
pub struct DeviceFault(pub String);

impl From<virtio_queue::Error> for DeviceFault {
    fn from(e: virtio_queue::Error) -> Self {
        DeviceFault(e.to_string())
    }
}

/// A virtio device model.
pub trait VirtioDevice: Send {
    /// Virtio device id (e.g. 19 for vsock).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the number of entries is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered.
    fn features(&self) -> u64;
    /// Reads the configuration space at `offset`; bytes past its end read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the configuration space (ignored by devices without writable fields).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// DRIVER_OK: takes the queues the driver set up. Called on the device's own (VMM) thread,
    /// which then serves every queue once through [`Self::queue_notified`]; so activation only
    /// takes the state and does no queue or backend work itself.
    fn activate(
        &mut self,
        mem: Arc<GuestMemory>,
        queues: Vec<Queue>,
        interrupt: Arc<InterruptLine>,
        acked_features: u64,
    ) -> Result<(), DeviceFault>;
    /// The driver notified queue `index`.
    fn queue_notified(&mut self, index: usize) -> Result<(), DeviceFault>;
    /// A host-side fd the event loop should watch for this device, if any (devices that only
    /// answer the driver's requests have none).
    fn backend_fd(&self) -> Option<RawFd> {
        None
    }
    /// The backend fd is ready.
    fn backend_ready(&mut self) -> Result<(), DeviceFault> {
        Ok(())
    }
    /// Device reset: drops the queues and all device state tied to the driver.
    fn reset(&mut self);
    /// For a snapshot (the VM paused, the transport locked): the device's own state, or `None`
    /// for a device whose state snapshots cannot capture.
    fn save_state(&self) -> Option<DeviceSnapshot> {
        None
    }
    /// For a snapshot of a running device: the queues it runs with, in transport order, with
    /// `None` for a queue it left unused. Empty while it is not active.
    fn running_queues(&self) -> Vec<Option<QueueState>> {
        Vec::new()
    }
    /// On restore, before activation: takes back what [`Self::save_state`] gave. Refuses
    /// another device's state.
    fn restore_state(&mut self, state: &DeviceSnapshot) -> Result<(), String> {
        Err(format!(
            "virtio device {} cannot restore a snapshot's state ({:?})",
            self.device_type(),
            state.device_type()
        ))
    }
}

/// The state of every queue of a device that runs with all of them, for
/// [`VirtioDevice::running_queues`].
pub fn all_queue_states(queues: &[Queue]) -> Vec<Option<QueueState>> {
    queues.iter().map(|q| Some(q.state())).collect()
}

/// Copies `config[offset..]` into `data`, as a device's [`VirtioDevice::read_config`] does:
/// bytes past the end of the configuration space (or an offset beyond it) read as 0.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o).copied())
            .unwrap_or(0);
    }
}

/// Answers every chain the driver has made available on `queue` with `serve`, which returns the
/// bytes it wrote (the used length), then interrupts the driver if it asked to be told.
pub fn serve_available_chains(
    queue: &mut Queue,
    mem: &GuestMemory,
    interrupt: &InterruptLine,
    mut serve: impl FnMut(DescriptorChain<&GuestMemory>) -> u32,
) -> Result<(), DeviceFault> {
    let mut used_any = false;
    while let Some(chain) = queue.iter(mem)?.next() {
        let head = chain.head_index();
        let used_len = serve(chain);
        queue.add_used(mem, head, used_len)?;
        used_any = true;
    }
    if used_any && queue.needs_notification(mem)? {
        interrupt.signal_used_queue();
    }
    Ok(())
}
