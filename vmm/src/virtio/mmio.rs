//! The virtio-mmio transport (virtio 1.x, register layout version 2): the register window the
//! driver programs — identification, feature negotiation, device status, queue set-up,
//! interrupt status/acknowledge, configuration generation and space — and the step to
//! DRIVER_OK that hands the queues to the [`VirtioDevice`]. Queue notifications arrive through
//! ioeventfds (one per queue, data-matched on the queue index), registered when the device is attached to the VM.
//!
//! Register accesses run on a vCPU thread, whose seccomp filter allows no device work. So no
//! device code that touches guest queues or host backends runs there: DRIVER_OK only parks the
//! queues as a pending activation and kicks the queue eventfds; the device's own (VMM) thread
//! then activates the device and serves whatever the driver posted before DRIVER_OK
//! ([`MmioTransport::finish_activation`]).
//!
//! For snapshots the transport saves its registers, queues and interrupt status with the
//! device's own state ([`MmioTransport::save_state`]), and a freshly attached transport takes
//! them back ([`MmioTransport::restore_state`]); a device that was running is activated again
//! the same deferred way, on the VMM thread, which then serves every queue once.

use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_queue::{Queue, QueueT};
use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::MutDeviceMmio;

use super::device::{DeviceFault, VirtioDevice};
use super::interrupt::InterruptLine;
use crate::memory::GuestMemory;
use crate::snapshot::virtio_state::{QueueSnapshot, TransportSnapshot};

/// Why a transport's saved state cannot be captured or restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportStateError {
    /// The device's state cannot be captured (the device type is named).
    #[error("virtio device {0} does not support snapshots")]
    Unsupported(u32),
    /// The saved state does not fit this transport or is invalid.
    #[error("virtio device {device_type}: {message}")]
    Invalid {
        /// The attached device's type.
        device_type: u32,
        /// What is wrong.
        message: String,
    },
}

/// "virt" in little endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// The modern (virtio 1.x) register layout.
pub const MMIO_VERSION: u32 = 2;
/// Vendor id reported to the driver ("SGEV").
pub const VENDOR_ID: u32 = 0x5645_4753;

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
/// QueueNotify; normally absorbed by the ioeventfds, handled here as a fallback.
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_AVAIL_LOW: u64 = 0x090;
const REG_QUEUE_AVAIL_HIGH: u64 = 0x094;
const REG_QUEUE_USED_LOW: u64 = 0x0a0;
const REG_QUEUE_USED_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const REG_CONFIG: u64 = 0x100;

/// The transport state of one device.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: Arc<GuestMemory>,
    interrupt: Arc<InterruptLine>,
    queues: Vec<Queue>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    status: u32,
    config_generation: u32,
    activated: bool,
    /// The queues of a DRIVER_OK that the VMM thread has not handed to the device yet.
    pending_activation: Option<Vec<Queue>>,
    /// Clones of the queue eventfds: writing one hands work for that queue to the VMM thread.
    queue_kicks: Vec<vmm_sys_util::eventfd::EventFd>,
}

impl MmioTransport {
    /// Wraps `device`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: Arc<GuestMemory>,
        interrupt: Arc<InterruptLine>,
    ) -> Result<Self, virtio_queue::Error> {
        let queues = Self::fresh_queues(device.as_ref())?;
        Ok(Self {
            device,
            mem,
            interrupt,
            queues,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            activated: false,
            pending_activation: None,
            queue_kicks: Vec::new(),
        })
    }

    /// Sets the eventfds that wake the VMM thread for each queue (the same ones KVM signals for
    /// QueueNotify writes).
    pub fn set_queue_kicks(&mut self, kicks: Vec<vmm_sys_util::eventfd::EventFd>) {
        self.queue_kicks = kicks;
    }

    /// Wakes the VMM thread for queue `index` (a no-op for an unknown queue).
    fn kick_queue(&self, index: usize) {
        if let Some(evt) = self.queue_kicks.get(index) {
            if let Err(e) = evt.write(1) {
                tracing::warn!("cannot wake the VMM thread for queue {index}: {e}");
            }
        }
    }

    fn fresh_queues(device: &dyn VirtioDevice) -> Result<Vec<Queue>, virtio_queue::Error> {
        device
            .queue_max_sizes()
            .iter()
            .map(|max| Queue::new(*max))
            .collect()
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the device reached DRIVER_OK and runs.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The device behind the transport.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The device behind the transport, mutably.
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// For a snapshot, with the VM paused (the caller holds the transport's lock until the
    /// snapshot is written, so the VMM thread does not touch the queues meanwhile): the
    /// registers, the queues and the device's own state.
    pub fn save_state(&self) -> Result<TransportSnapshot, TransportStateError> {
        let device_type = self.device.device_type();
        let device = self
            .device
            .save_state()
            .ok_or(TransportStateError::Unsupported(device_type))?;
        let running = self.activated || self.pending_activation.is_some();
        // The queues a pending activation will hand over, or the registers' (placeholders
        // while the device runs); an active device's own queues take their place.
        let registered = self.pending_activation.as_ref().unwrap_or(&self.queues);
        let active = self.device.running_queues();
        let queues: Vec<QueueSnapshot> = registered
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let state = active.get(i).copied().flatten();
                (&state.unwrap_or_else(|| q.state())).into()
            })
            .collect();
        Ok(TransportSnapshot {
            device_type,
            status: self.status,
            queue_select: self.queue_select,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            driver_features: self.driver_features,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            running,
            queues,
            device,
        })
    }

    /// On restore, into a freshly attached transport before the VM runs: takes back what
    /// [`Self::save_state`] gave. A device that was running gets its queues as a pending
    /// activation and every queue is kicked, so the VMM thread activates it and serves what the
    /// driver posted (including notifications the snapshot caught in flight). Refuses, leaving
    /// the transport as it was, state of another device type, another queue count, a queue
    /// virtio-queue rejects, or a ready queue outside guest RAM.
    pub fn restore_state(&mut self, saved: &TransportSnapshot) -> Result<(), TransportStateError> {
        let device_type = self.device.device_type();
        let invalid = |message: String| TransportStateError::Invalid {
            device_type,
            message,
        };
        if saved.device_type != device_type || saved.device.device_type() != device_type {
            return Err(invalid(format!(
                "the snapshot has a device of type {} here",
                saved.device_type
            )));
        }
        let max_sizes = self.device.queue_max_sizes();
        if saved.queues.len() != max_sizes.len() {
            return Err(invalid(format!(
                "the snapshot has {} queues, the device {}",
                saved.queues.len(),
                max_sizes.len()
            )));
        }
        let mut queues = Vec::with_capacity(saved.queues.len());
        for (i, (q, max)) in saved.queues.iter().zip(max_sizes).enumerate() {
            if q.max_size != *max {
                return Err(invalid(format!(
                    "queue {i}: maximum size {} in the snapshot, {max} offered",
                    q.max_size
                )));
            }
            let queue = Queue::try_from(virtio_queue::QueueState::from(q))
                .map_err(|e| invalid(format!("queue {i}: {e}")))?;
            if saved.running && queue.ready() && !queue.is_valid(self.mem.as_ref()) {
                return Err(invalid(format!("queue {i} lies outside guest RAM")));
            }
            queues.push(queue);
        }
        self.device.restore_state(&saved.device).map_err(invalid)?;
        self.status = saved.status;
        self.queue_select = saved.queue_select;
        self.device_features_select = saved.device_features_select;
        self.driver_features_select = saved.driver_features_select;
        self.driver_features = saved.driver_features;
        self.config_generation = saved.config_generation;
        self.interrupt.restore_status(saved.interrupt_status);
        self.activated = false;
        if saved.running {
            self.pending_activation = Some(queues);
            for i in 0..self.queues.len() {
                self.kick_queue(i);
            }
        } else {
            self.pending_activation = None;
            self.queues = queues;
        }
        Ok(())
    }

    /// Puts the device in DEVICE_NEEDS_RESET after a fault and tells the driver.
    pub fn fail(&mut self, fault: &DeviceFault) {
        tracing::warn!(
            "virtio device {} needs reset: {fault}",
            self.device.device_type()
        );
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.interrupt.signal_config_change();
    }

    /// On the VMM thread: hands the queues of a DRIVER_OK to the device, then serves every queue
    /// once (the driver may have posted chains before DRIVER_OK, and their notifications were
    /// dropped while the device was not active). A no-op without a pending activation.
    pub fn finish_activation(&mut self) {
        let Some(queues) = self.pending_activation.take() else {
            return;
        };
        let queue_count = queues.len();
        let result = self.device.activate(
            self.mem.clone(),
            queues,
            self.interrupt.clone(),
            self.driver_features,
        );
        match result {
            Ok(()) => {
                self.activated = true;
                for i in 0..queue_count {
                    self.notify_queue(i);
                }
            }
            Err(f) => self.fail(&f),
        }
    }

    /// On the VMM thread: forwards a queue notification to the device (if active and not
    /// failed), finishing a pending activation first.
    pub fn notify_queue(&mut self, index: usize) {
        self.finish_activation();
        if !self.activated || self.status & VIRTIO_CONFIG_S_NEEDS_RESET != 0 {
            return;
        }
        if let Err(f) = self.device.queue_notified(index) {
            self.fail(&f);
        }
    }

    /// On the VMM thread: forwards backend readiness to the device (if not failed), finishing a
    /// pending activation first.
    pub fn backend_ready(&mut self) {
        self.finish_activation();
        if self.status & VIRTIO_CONFIG_S_NEEDS_RESET != 0 {
            return;
        }
        if let Err(f) = self.device.backend_ready() {
            self.fail(&f);
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    fn reset(&mut self) {
        self.device.reset();
        self.activated = false;
        self.pending_activation = None;
        self.status = 0;
        self.driver_features = 0;
        self.driver_features_select = 0;
        self.device_features_select = 0;
        self.queue_select = 0;
        self.interrupt.clear();
        match Self::fresh_queues(self.device.as_ref()) {
            Ok(q) => self.queues = q,
            Err(_) => self.queues.iter_mut().for_each(QueueT::reset),
        }
    }

    /// Status writes: 0 resets; otherwise the driver may only add bits, in order.
    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let added = value & !self.status;
        if value & self.status != self.status {
            // Clearing bits other than by reset is not allowed.
            tracing::debug!("virtio-mmio: driver cleared status bits; ignored");
            return;
        }
        if added & VIRTIO_CONFIG_S_FAILED != 0 {
            self.status |= VIRTIO_CONFIG_S_FAILED;
            return;
        }
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let offered = self.device.features();
            let version_1 = 1u64 << VIRTIO_F_VERSION_1;
            // Refuse (leave FEATURES_OK clear) unknown features or a legacy driver.
            if self.driver_features & !offered != 0 || self.driver_features & version_1 == 0 {
                self.status = value & !VIRTIO_CONFIG_S_FEATURES_OK & !VIRTIO_CONFIG_S_DRIVER_OK;
                return;
            }
        }
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            let needed =
                VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
            if value & needed != needed {
                return;
            }
            self.status = value;
            self.activate();
            return;
        }
        self.status = value;
    }

    /// DRIVER_OK, on the vCPU thread: checks the queues, parks them for the VMM thread and
    /// wakes it. The device is activated there ([`Self::finish_activation`]), never here.
    fn activate(&mut self) {
        for (i, q) in self.queues.iter().enumerate() {
            if q.ready() && !q.is_valid(self.mem.as_ref()) {
                self.fail(&DeviceFault(format!(
                    "queue {i} is marked ready but invalid"
                )));
                return;
            }
        }
        // Keep placeholders so register reads stay in range.
        let fresh = Self::fresh_queues(self.device.as_ref()).unwrap_or_default();
        self.pending_activation = Some(std::mem::replace(&mut self.queues, fresh));
        for i in 0..self.queues.len() {
            self.kick_queue(i);
        }
    }

    fn read_register(&self, offset: u64) -> u32 {
        let q = self.queues.get(self.queue_select as usize);
        match offset {
            REG_MAGIC => MMIO_MAGIC,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_select {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => q.map(|q| u32::from(q.max_size())).unwrap_or(0),
            REG_QUEUE_READY => u32::from(q.map(|q| q.ready()).unwrap_or(false)),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn queue_setup_allowed(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_select = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            REG_DRIVER_FEATURES => {
                let driver_phase = self.status & VIRTIO_CONFIG_S_DRIVER != 0
                    && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0;
                if driver_phase {
                    match self.driver_features_select {
                        0 => {
                            self.driver_features =
                                (self.driver_features & !0xffff_ffff) | u64::from(value)
                        }
                        1 => {
                            self.driver_features =
                                (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                        }
                        _ => {}
                    }
                }
            }
            REG_QUEUE_SEL => self.queue_select = value,
            REG_INTERRUPT_ACK => self.interrupt.ack(value),
            REG_STATUS => self.write_status(value),
            // Normally absorbed by the ioeventfds; a write that reaches here is passed on the
            // same way, so queue processing always runs on the VMM thread.
            REG_QUEUE_NOTIFY => self.kick_queue(value as usize),
            REG_QUEUE_NUM | REG_QUEUE_READY | REG_QUEUE_DESC_LOW | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_AVAIL_LOW | REG_QUEUE_AVAIL_HIGH | REG_QUEUE_USED_LOW
            | REG_QUEUE_USED_HIGH => {
                if !self.queue_setup_allowed() {
                    return;
                }
                let Some(q) = self.selected_queue() else {
                    return;
                };
                match offset {
                    // virtio-queue refuses sizes that are 0, above the maximum, or not a power
                    // of two; the queue then stays invalid and activation fails.
                    REG_QUEUE_NUM => q.set_size(value as u16),
                    REG_QUEUE_READY => q.set_ready(value == 1),
                    REG_QUEUE_DESC_LOW => q.set_desc_table_address(Some(value), None),
                    REG_QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(value)),
                    REG_QUEUE_AVAIL_LOW => q.set_avail_ring_address(Some(value), None),
                    REG_QUEUE_AVAIL_HIGH => q.set_avail_ring_address(None, Some(value)),
                    REG_QUEUE_USED_LOW => q.set_used_ring_address(Some(value), None),
                    REG_QUEUE_USED_HIGH => q.set_used_ring_address(None, Some(value)),
                    _ => {}
                }
            }
            _ => tracing::trace!("virtio-mmio: write to read-only or unknown register {offset:#x}"),
        }
    }
}

impl MutDeviceMmio for MmioTransport {
    fn mmio_read(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            self.device.read_config(offset - REG_CONFIG, data);
        } else if data.len() == 4 && offset % 4 == 0 {
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn mmio_write(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        if offset >= REG_CONFIG {
            if self.status & VIRTIO_CONFIG_S_DRIVER != 0 {
                self.device.write_config(offset - REG_CONFIG, data);
            }
        } else if let Ok(bytes) = <[u8; 4]>::try_from(data) {
            if offset % 4 == 0 {
                self.write_register(offset, u32::from_le_bytes(bytes));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::irq_trigger::IrqTrigger;
    use crate::memory::create_guest_memory;
    use crate::virtio::vsock::{Muxer, VsockDevice};

    struct Fixture {
        t: MmioTransport,
        interrupt: Arc<InterruptLine>,
        _dir: tempfile::TempDir,
    }

    fn transport() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let device = VsockDevice::new(42, Muxer::new(42, &dir.path().join("v.sock")).unwrap());
        let mem = Arc::new(create_guest_memory(2).unwrap());
        let interrupt = Arc::new(InterruptLine::new(IrqTrigger::new().unwrap()));
        Fixture {
            t: MmioTransport::new(Box::new(device), mem, interrupt.clone()).unwrap(),
            interrupt,
            _dir: dir,
        }
    }

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.mmio_read(MmioAddress(0), off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.mmio_write(MmioAddress(0), off, &v.to_le_bytes());
    }

    /// ACKNOWLEDGE, DRIVER, features (page 1 = `high`), FEATURES_OK; returns the status.
    fn negotiate(t: &mut MmioTransport, high: u32) -> u32 {
        wr(t, REG_STATUS, 1);
        wr(t, REG_STATUS, 3);
        wr(t, REG_DRIVER_FEATURES_SEL, 1);
        wr(t, REG_DRIVER_FEATURES, high);
        wr(t, REG_STATUS, 11);
        rd(t, REG_STATUS)
    }

    fn setup_queue(t: &mut MmioTransport, q: u32, base: u32, size: u32) {
        wr(t, REG_QUEUE_SEL, q);
        wr(t, REG_QUEUE_NUM, size);
        wr(t, REG_QUEUE_DESC_LOW, base);
        wr(t, REG_QUEUE_AVAIL_LOW, base + 0x1000);
        wr(t, REG_QUEUE_USED_LOW, base + 0x2000);
        wr(t, REG_QUEUE_READY, 1);
    }

    #[test]
    fn identification_and_config_space() {
        let mut f = transport();
        assert_eq!(rd(&mut f.t, REG_MAGIC), MMIO_MAGIC);
        assert_eq!(rd(&mut f.t, REG_VERSION), 2);
        assert_eq!(rd(&mut f.t, REG_DEVICE_ID), 19);
        assert_eq!(rd(&mut f.t, REG_VENDOR_ID), VENDOR_ID);
        assert_eq!(rd(&mut f.t, REG_QUEUE_NUM_MAX), 256);
        wr(&mut f.t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut f.t, REG_DEVICE_FEATURES), 1, "VERSION_1 only");
        assert_eq!(rd(&mut f.t, REG_CONFIG), 42, "guest CID, low word");
        assert_eq!(rd(&mut f.t, REG_CONFIG + 4), 0, "guest CID, high word");
        assert_eq!(rd(&mut f.t, REG_CONFIG + 64), 0, "past the end");
        let mut odd = [0xffu8; 2];
        f.t.mmio_read(MmioAddress(0), REG_MAGIC, &mut odd);
        assert_eq!(odd, [0, 0], "registers are 32-bit only");
    }

    #[test]
    fn features_ok_needs_version_1_and_no_unknown_features() {
        let mut f = transport();
        assert_eq!(
            negotiate(&mut f.t, 0) & VIRTIO_CONFIG_S_FEATURES_OK,
            0,
            "legacy driver"
        );
        wr(&mut f.t, REG_STATUS, 0);
        assert_eq!(
            negotiate(&mut f.t, 1 | 2) & VIRTIO_CONFIG_S_FEATURES_OK,
            0,
            "unknown feature"
        );
        wr(&mut f.t, REG_STATUS, 0);
        assert_eq!(negotiate(&mut f.t, 1), 11);
    }

    #[test]
    fn driver_ok_activates_and_reset_deactivates() {
        let mut f = transport();
        negotiate(&mut f.t, 1);
        for q in 0..3 {
            setup_queue(&mut f.t, q, 0x10000 + q * 0x4000, 16);
        }
        wr(&mut f.t, REG_STATUS, 15);
        assert_eq!(rd(&mut f.t, REG_STATUS), 15);
        assert!(
            !f.t.is_activated(),
            "the vCPU thread's register write only parks the queues"
        );
        f.t.finish_activation();
        assert!(f.t.is_activated());
        // Queue registers are frozen after DRIVER_OK.
        wr(&mut f.t, REG_QUEUE_SEL, 0);
        wr(&mut f.t, REG_QUEUE_READY, 0);
        // Clearing status bits other than by reset is ignored.
        wr(&mut f.t, REG_STATUS, 3);
        assert_eq!(rd(&mut f.t, REG_STATUS), 15);
        f.interrupt.signal_used_queue();
        assert_eq!(rd(&mut f.t, REG_INTERRUPT_STATUS), 1);
        wr(&mut f.t, REG_INTERRUPT_ACK, 1);
        assert_eq!(rd(&mut f.t, REG_INTERRUPT_STATUS), 0);
        wr(&mut f.t, REG_STATUS, 0);
        assert!(!f.t.is_activated());
        assert_eq!(rd(&mut f.t, REG_STATUS), 0);
    }

    /// A device that records, per call, the thread it was called on.
    struct ThreadRecorder {
        calls: Arc<std::sync::Mutex<Vec<(String, std::thread::ThreadId)>>>,
    }

    impl ThreadRecorder {
        fn record(&self, what: String) {
            self.calls
                .lock()
                .unwrap()
                .push((what, std::thread::current().id()));
        }
    }

    impl VirtioDevice for ThreadRecorder {
        fn device_type(&self) -> u32 {
            2
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn features(&self) -> u64 {
            1 << VIRTIO_F_VERSION_1
        }
        fn read_config(&self, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(
            &mut self,
            _mem: Arc<GuestMemory>,
            _queues: Vec<Queue>,
            _interrupt: Arc<InterruptLine>,
            _acked_features: u64,
        ) -> Result<(), DeviceFault> {
            self.record("activate".into());
            Ok(())
        }
        fn queue_notified(&mut self, index: usize) -> Result<(), DeviceFault> {
            self.record(format!("queue {index}"));
            Ok(())
        }
        fn backend_fd(&self) -> Option<std::os::unix::io::RawFd> {
            None
        }
        fn backend_ready(&mut self) -> Result<(), DeviceFault> {
            Ok(())
        }
        fn reset(&mut self) {}
    }

    /// Issue 12 item 2: DRIVER_OK is written on a vCPU thread, whose seccomp filter allows no
    /// device work; the device must be activated and its queues served only on the thread that
    /// handles the queue eventfds, and that thread must be woken.
    #[test]
    fn driver_ok_defers_device_work_to_the_vmm_thread() {
        let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
        let device = ThreadRecorder {
            calls: calls.clone(),
        };
        let mem = Arc::new(create_guest_memory(2).unwrap());
        let interrupt = Arc::new(InterruptLine::new(IrqTrigger::new().unwrap()));
        let mut t = MmioTransport::new(Box::new(device), mem, interrupt).unwrap();
        let kicks: Vec<_> = (0..2)
            .map(|_| vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        t.set_queue_kicks(kicks.iter().map(|k| k.try_clone().unwrap()).collect());
        negotiate(&mut t, 1);
        setup_queue(&mut t, 0, 0x10000, 16);
        setup_queue(&mut t, 1, 0x14000, 16);

        // The "vCPU thread": the register write that reaches DRIVER_OK.
        let t = std::thread::spawn(move || {
            wr(&mut t, REG_STATUS, 15);
            t
        })
        .join()
        .unwrap();
        assert!(
            calls.lock().unwrap().is_empty(),
            "{:?}",
            calls.lock().unwrap()
        );
        assert!(!t.is_activated());
        for k in &kicks {
            assert_eq!(
                k.read().unwrap(),
                1,
                "the VMM thread is woken for every queue"
            );
        }

        // The "VMM thread": the first queue event activates, then serves every queue.
        let vmm_thread = std::thread::spawn(move || {
            let mut t = t;
            t.notify_queue(1);
            (t, std::thread::current().id())
        });
        let (t, vmm_id) = vmm_thread.join().unwrap();
        assert!(t.is_activated());
        let calls = calls.lock().unwrap();
        let names: Vec<&str> = calls.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["activate", "queue 0", "queue 1", "queue 1"]);
        assert!(calls.iter().all(|(_, id)| *id == vmm_id));
    }

    /// The balloon offers three queues, and a driver that did not ack REPORTING sets up only the
    /// first two (Linux compacts the queues of features it did not negotiate): DRIVER_OK
    /// activates it all the same, and a notification of the unset queue does not fail it.
    #[test]
    fn driver_ok_with_a_queue_the_driver_left_unset_activates() {
        use crate::virtio::balloon::device::{
            VIRTIO_BALLOON_F_DEFLATE_ON_OOM, VIRTIO_BALLOON_F_REPORTING,
        };
        use crate::virtio::balloon::BalloonDevice;
        for reporting in [false, true] {
            let mem = Arc::new(create_guest_memory(2).unwrap());
            let interrupt = Arc::new(InterruptLine::new(IrqTrigger::new().unwrap()));
            let device = Box::new(BalloonDevice::new());
            let mut t = MmioTransport::new(device, mem, interrupt).unwrap();
            wr(&mut t, REG_STATUS, 1);
            wr(&mut t, REG_STATUS, 3);
            let mut low = 1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM;
            if reporting {
                low |= 1 << VIRTIO_BALLOON_F_REPORTING;
            }
            wr(&mut t, REG_DRIVER_FEATURES_SEL, 0);
            wr(&mut t, REG_DRIVER_FEATURES, low);
            wr(&mut t, REG_DRIVER_FEATURES_SEL, 1);
            wr(&mut t, REG_DRIVER_FEATURES, 1);
            wr(&mut t, REG_STATUS, 11);
            assert_eq!(rd(&mut t, REG_STATUS), 11, "features accepted");
            let queues = if reporting { 3 } else { 2 };
            for q in 0..queues {
                setup_queue(&mut t, q, 0x10000 + q * 0x4000, 16);
            }
            wr(&mut t, REG_STATUS, 15);
            t.finish_activation();
            assert!(t.is_activated(), "reporting {reporting}");
            t.notify_queue(2);
            assert_eq!(rd(&mut t, REG_STATUS), 15, "reporting {reporting}");
        }
    }

    /// A balloon transport through DRIVER_OK with inflate and deflate queues at 0x10000 and
    /// 0x14000 (16 entries), `actual` written, activated on "the VMM thread".
    fn running_balloon(mem: &Arc<GuestMemory>) -> (MmioTransport, Arc<InterruptLine>) {
        use crate::virtio::balloon::BalloonDevice;
        let interrupt = Arc::new(InterruptLine::new(IrqTrigger::new().unwrap()));
        let mut t = MmioTransport::new(
            Box::new(BalloonDevice::new()),
            mem.clone(),
            interrupt.clone(),
        )
        .unwrap();
        negotiate(&mut t, 1);
        setup_queue(&mut t, 0, 0x10000, 16);
        setup_queue(&mut t, 1, 0x14000, 16);
        wr(&mut t, REG_STATUS, 15);
        t.finish_activation();
        assert!(t.is_activated());
        wr(&mut t, REG_CONFIG + 4, 77);
        (t, interrupt)
    }

    /// Posts one deflate chain (one readable 4-byte page-frame buffer) as available entry
    /// `n` of the deflate queue at 0x14000.
    fn post_deflate_chain(mem: &GuestMemory, n: u16) {
        use vm_memory::{Bytes, GuestAddress};
        let desc = 0x14000 + u64::from(n % 16) * 16;
        mem.write_obj(0x30000u64 + u64::from(n) * 4, GuestAddress(desc))
            .unwrap();
        mem.write_obj(4u32, GuestAddress(desc + 8)).unwrap();
        mem.write_obj(0u16, GuestAddress(desc + 12)).unwrap();
        mem.write_obj(n % 16, GuestAddress(0x15000 + 4 + u64::from(n % 16) * 2))
            .unwrap();
        mem.write_obj(n + 1, GuestAddress(0x15000 + 2)).unwrap();
    }

    /// The used ring's index of the deflate queue.
    fn deflate_used_idx(mem: &GuestMemory) -> u16 {
        use vm_memory::{Bytes, GuestAddress};
        mem.read_obj(GuestAddress(0x16000 + 2)).unwrap()
    }

    /// Issue 14: a running balloon's transport saved (through postcard, as in the file) and
    /// restored into a fresh transport over the same guest RAM carries on where it was: same
    /// registers and configuration, the device activated again only on the VMM thread after a
    /// kick of every queue, and the next chain answered in the next used-ring entry.
    #[test]
    fn a_running_device_is_saved_and_restored_where_it_was() {
        let mem = Arc::new(create_guest_memory(2).unwrap());
        let (mut t, interrupt) = running_balloon(&mem);
        post_deflate_chain(&mem, 0);
        t.notify_queue(1);
        assert_eq!(deflate_used_idx(&mem), 1);
        let saved = t.save_state().unwrap();
        assert!(saved.running);
        assert_eq!(saved.queues[1].next_avail, 1);
        assert_eq!(saved.queues[1].next_used, 1);
        assert_eq!(saved.interrupt_status, interrupt.status());
        let bytes = postcard::to_stdvec(&saved).unwrap();
        let saved: TransportSnapshot = postcard::from_bytes(&bytes).unwrap();

        let fresh_interrupt = Arc::new(InterruptLine::new(IrqTrigger::new().unwrap()));
        let mut r = MmioTransport::new(
            Box::new(crate::virtio::balloon::BalloonDevice::new()),
            mem.clone(),
            fresh_interrupt.clone(),
        )
        .unwrap();
        let kicks: Vec<_> = (0..3)
            .map(|_| vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        r.set_queue_kicks(kicks.iter().map(|k| k.try_clone().unwrap()).collect());
        r.restore_state(&saved).unwrap();
        assert_eq!(rd(&mut r, REG_STATUS), 15);
        assert_eq!(rd(&mut r, REG_CONFIG + 4), 77, "actual");
        assert_eq!(rd(&mut r, REG_INTERRUPT_STATUS), saved.interrupt_status);
        assert!(!r.is_activated(), "activation is the VMM thread's");
        for k in &kicks {
            assert_eq!(k.read().unwrap(), 1, "every queue is kicked");
        }
        assert_eq!(
            r.save_state().unwrap(),
            saved,
            "saving again gives the same state"
        );

        post_deflate_chain(&mem, 1);
        r.notify_queue(1);
        assert!(r.is_activated());
        assert_eq!(
            deflate_used_idx(&mem),
            2,
            "the next used entry, not the first"
        );
        let after = r.save_state().unwrap();
        assert_eq!(after.queues[1].next_avail, 2);
        assert_eq!(
            after.queues[0], saved.queues[0],
            "the inflate queue as it was"
        );
    }

    /// A device the driver is still setting up is restored with its queue registers, not
    /// activated.
    #[test]
    fn a_device_in_set_up_is_restored_with_its_registers() {
        let mut f = transport_balloon();
        negotiate(&mut f, 1);
        setup_queue(&mut f, 1, 0x14000, 16);
        wr(&mut f, REG_QUEUE_SEL, 1);
        let saved = f.save_state().unwrap();
        assert!(!saved.running);
        let mut r = transport_balloon();
        r.restore_state(&saved).unwrap();
        assert_eq!(rd(&mut r, REG_STATUS), 11);
        assert_eq!(rd(&mut r, REG_QUEUE_READY), 1, "queue 1 selected and ready");
        assert!(!r.is_activated());
        assert_eq!(r.save_state().unwrap(), saved);
    }

    fn transport_balloon() -> MmioTransport {
        let mem = Arc::new(create_guest_memory(2).unwrap());
        let interrupt = Arc::new(InterruptLine::new(IrqTrigger::new().unwrap()));
        MmioTransport::new(
            Box::new(crate::virtio::balloon::BalloonDevice::new()),
            mem,
            interrupt,
        )
        .unwrap()
    }

    /// Saved state that does not fit (another device type, another queue count, a queue
    /// virtio-queue rejects, a running queue outside guest RAM) is refused and changes nothing.
    #[test]
    fn restore_refuses_state_that_does_not_fit() {
        let mem = Arc::new(create_guest_memory(2).unwrap());
        let (t, _) = running_balloon(&mem);
        let good = t.save_state().unwrap();
        let mut bad = Vec::new();
        let mut s = good.clone();
        s.device_type = 19;
        bad.push(("device type", s));
        let mut s = good.clone();
        s.queues.pop();
        bad.push(("queue count", s));
        let mut s = good.clone();
        s.queues[0].size = 3;
        bad.push(("queue size", s));
        let mut s = good.clone();
        s.queues[0].max_size = 1024;
        bad.push(("maximum size", s));
        let mut s = good.clone();
        s.queues[1].used_ring = 0x40_0000;
        bad.push(("outside RAM", s));
        for (what, s) in bad {
            let mut r = transport_balloon();
            let err = r.restore_state(&s).unwrap_err();
            assert!(
                matches!(err, TransportStateError::Invalid { device_type: 5, .. }),
                "{what}: {err}"
            );
            assert_eq!(rd(&mut r, REG_STATUS), 0, "{what}: nothing restored");
        }
    }

    /// Devices whose state snapshots cannot capture say so.
    #[test]
    fn a_device_without_snapshot_support_is_named() {
        let device = ThreadRecorder {
            calls: Default::default(),
        };
        let mem = Arc::new(create_guest_memory(2).unwrap());
        let interrupt = Arc::new(InterruptLine::new(IrqTrigger::new().unwrap()));
        let t = MmioTransport::new(Box::new(device), mem, interrupt).unwrap();
        assert_eq!(t.save_state(), Err(TransportStateError::Unsupported(2)));
    }

    /// Makes one 4-byte device-writable buffer available on the vsock event queue at 0x18000
    /// (descriptor `n % 16`, avail index `n + 1`).
    fn post_event_buffer(mem: &GuestMemory, n: u16) {
        use vm_memory::{Bytes, GuestAddress};
        let slot = u64::from(n % 16);
        let desc = 0x18000 + slot * 16;
        mem.write_obj(0x40000u64 + slot * 8, GuestAddress(desc))
            .unwrap();
        mem.write_obj(4u32, GuestAddress(desc + 8)).unwrap();
        mem.write_obj(2u16, GuestAddress(desc + 12)).unwrap(); // VIRTQ_DESC_F_WRITE
        mem.write_obj(n % 16, GuestAddress(0x19000 + 4 + slot * 2))
            .unwrap();
        mem.write_obj(n + 1, GuestAddress(0x19000 + 2)).unwrap();
    }

    /// The used entries of the vsock event queue at 0x18000: its used index, and the first
    /// entry's length and the `id` in the first buffer.
    fn event_queue_used(mem: &GuestMemory) -> (u16, u32, u32) {
        use vm_memory::{Bytes, GuestAddress};
        (
            mem.read_obj(GuestAddress(0x1a000 + 2)).unwrap(),
            mem.read_obj(GuestAddress(0x1a000 + 4 + 4)).unwrap(),
            mem.read_obj(GuestAddress(0x40000)).unwrap(),
        )
    }

    /// A vsock transport through DRIVER_OK with its three queues at 0x10000, 0x14000 and
    /// 0x18000, activated.
    fn running_vsock(mem: &Arc<GuestMemory>, dir: &std::path::Path) -> MmioTransport {
        let device = VsockDevice::new(42, Muxer::new(42, &dir.join("v.sock")).unwrap());
        let interrupt = Arc::new(InterruptLine::new(IrqTrigger::new().unwrap()));
        let mut t = MmioTransport::new(Box::new(device), mem.clone(), interrupt).unwrap();
        negotiate(&mut t, 1);
        for q in 0..3 {
            setup_queue(&mut t, q, 0x10000 + q * 0x4000, 16);
        }
        wr(&mut t, REG_STATUS, 15);
        t.finish_activation();
        assert!(t.is_activated());
        t
    }

    /// Issue 14: a restored vsock device tells the guest that its connections are gone
    /// (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, once) in the buffer the driver left on the event
    /// queue; a running device never sends it.
    #[test]
    fn a_restored_vsock_device_sends_one_transport_reset() {
        let dir = tempfile::tempdir().unwrap();
        let mem = Arc::new(create_guest_memory(2).unwrap());
        let mut t = running_vsock(&mem, dir.path());
        post_event_buffer(&mem, 0);
        t.notify_queue(2);
        assert_eq!(event_queue_used(&mem).0, 0, "no event while running");
        let saved = t.save_state().unwrap();
        assert_eq!(saved.device_type, 19);
        drop(t);

        let other = tempfile::tempdir().unwrap();
        let device = VsockDevice::new(42, Muxer::new(42, &other.path().join("v.sock")).unwrap());
        let interrupt = Arc::new(InterruptLine::new(IrqTrigger::new().unwrap()));
        let mut r = MmioTransport::new(Box::new(device), mem.clone(), interrupt.clone()).unwrap();
        r.restore_state(&saved).unwrap();
        r.finish_activation();
        assert_eq!(event_queue_used(&mem), (1, 4, 0), "TRANSPORT_RESET, id 0");
        assert_ne!(interrupt.status() & 1, 0, "the driver is interrupted");
        post_event_buffer(&mem, 1);
        r.notify_queue(2);
        assert_eq!(event_queue_used(&mem).0, 1, "sent once");
    }

    /// Without an event buffer the reset waits for one, and a snapshot taken meanwhile keeps
    /// it pending.
    #[test]
    fn a_transport_reset_waits_for_an_event_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let mem = Arc::new(create_guest_memory(2).unwrap());
        let saved = running_vsock(&mem, dir.path()).save_state().unwrap();
        let restore = |saved: &TransportSnapshot, name: &str| {
            let device = VsockDevice::new(42, Muxer::new(42, &dir.path().join(name)).unwrap());
            let interrupt = Arc::new(InterruptLine::new(IrqTrigger::new().unwrap()));
            let mut r = MmioTransport::new(Box::new(device), mem.clone(), interrupt).unwrap();
            r.restore_state(saved).unwrap();
            r.finish_activation();
            r
        };
        let r = restore(&saved, "a.sock");
        assert_eq!(event_queue_used(&mem).0, 0);
        let again = r.save_state().unwrap();
        assert!(matches!(
            &again.device,
            crate::snapshot::virtio_state::DeviceSnapshot::Vsock(v) if v.transport_reset_pending
        ));
        drop(r);
        let mut r = restore(&again, "b.sock");
        post_event_buffer(&mem, 0);
        r.notify_queue(2);
        assert_eq!(event_queue_used(&mem), (1, 4, 0));
    }

    #[test]
    fn invalid_queue_at_driver_ok_needs_reset() {
        let mut f = transport();
        negotiate(&mut f.t, 1);
        setup_queue(&mut f.t, 0, 0x10000, 16);
        // TX ring beyond guest RAM (2 MiB).
        setup_queue(&mut f.t, 1, 0x40_0000, 16);
        wr(&mut f.t, REG_STATUS, 15);
        assert!(!f.t.is_activated());
        assert_ne!(rd(&mut f.t, REG_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert_eq!(
            rd(&mut f.t, REG_INTERRUPT_STATUS) & 2,
            2,
            "config-change interrupt"
        );
    }

    #[test]
    fn queue_setup_before_features_ok_is_ignored() {
        let mut f = transport();
        wr(&mut f.t, REG_STATUS, 1);
        wr(&mut f.t, REG_STATUS, 3);
        wr(&mut f.t, REG_QUEUE_SEL, 0);
        wr(&mut f.t, REG_QUEUE_READY, 1);
        assert_eq!(rd(&mut f.t, REG_QUEUE_READY), 0);
    }
}
