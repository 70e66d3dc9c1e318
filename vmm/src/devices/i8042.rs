//! The i8042 keyboard controller, present only so the guest can reset the machine: writing 0xfe
//! to port 0x64 (what Linux does with `reboot=k`) ends the VM with
//! [`ExitReason::GuestReset`](crate::ExitReason).

use std::sync::{Arc, Mutex};

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;
use vm_superio::I8042Device;

use super::lock_device;
use crate::lifecycle::{ExitReason, Lifecycle};

/// Turns the controller's reset line into a VM exit.
pub(crate) struct ResetLine(Arc<Lifecycle>);

impl vm_superio::Trigger for ResetLine {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request_exit(ExitReason::GuestReset);
        Ok(())
    }
}

/// The i8042 device on ports 0x60..=0x64.
pub(crate) struct I8042 {
    dev: Mutex<I8042Device<ResetLine>>,
}

impl I8042 {
    pub(crate) fn new(lifecycle: Arc<Lifecycle>) -> Self {
        Self {
            dev: Mutex::new(I8042Device::new(ResetLine(lifecycle))),
        }
    }
}

impl DevicePio for I8042 {
    fn pio_read(&self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        if data.len() == 1 && offset <= 4 {
            data[0] = lock_device(&self.dev).read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn pio_write(&self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if data.len() == 1 && offset <= 4 {
            let _ = lock_device(&self.dev).write(offset as u8, data[0]);
        }
    }
}
