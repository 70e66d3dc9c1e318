//! The interrupt of a virtio-mmio device: the InterruptStatus bits the driver reads and
//! acknowledges, and the irqfd that raises the device's GSI.

use std::sync::atomic::{AtomicU32, Ordering};

use crate::devices::irq_trigger::IrqTrigger;

/// InterruptStatus bit: a used ring was updated.
pub const INT_USED_RING: u32 = 0x1;
/// InterruptStatus bit: the configuration (or device status, e.g. NEEDS_RESET) changed.
pub const INT_CONFIG_CHANGE: u32 = 0x2;

/// A device's interrupt line.
#[derive(Debug)]
pub struct InterruptLine {
    status: AtomicU32,
    irq: IrqTrigger,
}

impl InterruptLine {
    /// An interrupt line raising `irq`.
    pub fn new(irq: IrqTrigger) -> Self {
        Self {
            status: AtomicU32::new(0),
            irq,
        }
    }

    /// The irqfd to register with KVM.
    pub fn trigger(&self) -> &IrqTrigger {
        &self.irq
    }

    /// Current InterruptStatus.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears the acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Sets InterruptStatus as a snapshot saved it, without raising the line: whether the
    /// guest still has the interrupt to take is the restored interrupt controllers' state.
    pub fn restore_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }

    /// Clears every bit (device reset).
    pub fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irq.fire() {
            tracing::warn!("cannot raise a virtio interrupt: {e}");
        }
    }

    /// Tells the driver a used ring changed.
    pub fn signal_used_queue(&self) {
        self.raise(INT_USED_RING);
    }

    /// Tells the driver the configuration or status changed.
    pub fn signal_config_change(&self) {
        self.raise(INT_CONFIG_CHANGE);
    }
}
