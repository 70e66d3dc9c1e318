//! The boot timer: an I/O port the guest agent writes once, as its first act, so the host can
//! record when the guest reached user space (like Firecracker's boot-timer device, which is MMIO;
//! a port is simpler for an agent: `ioperm(BOOT_TIMER_PORT, 1, 1)` then `outb`).
//!
//! Protocol: write the byte [`BOOT_TIMER_MAGIC`] to port [`BOOT_TIMER_PORT`]. The host records
//! its monotonic clock at the first such write
//! ([`Timestamps::boot_timer`](crate::Timestamps::boot_timer)); other values and later writes
//! are ignored. Reads return [`BOOT_TIMER_MAGIC`] once the timestamp is recorded, 0 before.

use std::sync::Arc;

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;

use crate::lifecycle::Lifecycle;

/// The boot timer's I/O port (unused by PC hardware that Linux probes in a microVM).
pub const BOOT_TIMER_PORT: u16 = 0x440;
/// The value to write (123, as Firecracker's boot timer).
pub const BOOT_TIMER_MAGIC: u8 = 123;

/// The boot-timer device.
pub(crate) struct BootTimer(Arc<Lifecycle>);

impl BootTimer {
    pub(crate) fn new(lifecycle: Arc<Lifecycle>) -> Self {
        Self(lifecycle)
    }
}

impl DevicePio for BootTimer {
    fn pio_read(&self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        let v = if self.0.timestamps.boot_timer().is_some() {
            BOOT_TIMER_MAGIC
        } else {
            0
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    fn pio_write(&self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if offset == 0
            && data.first() == Some(&BOOT_TIMER_MAGIC)
            && self.0.timestamps.mark_boot_timer()
        {
            tracing::debug!("guest wrote the boot timer");
        }
    }
}
