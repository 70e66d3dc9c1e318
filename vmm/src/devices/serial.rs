//! COM1: a vm-superio 8250 UART on ports 0x3f8..=0x3ff, writing to the [`ConsoleLog`] and
//! interrupting on GSI 4. There is no guest input: jobs get their stdin over vsock.

use std::sync::Mutex;

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::Serial;

use super::console::ConsoleLog;
use super::irq_trigger::IrqTrigger;
use super::lock_device;

/// The serial port device.
pub struct SerialDevice {
    uart: Mutex<Serial<IrqTrigger, NoEvents, ConsoleLog>>,
}

impl SerialDevice {
    /// A UART that writes to `log` and interrupts through `irq`.
    pub fn new(irq: IrqTrigger, log: ConsoleLog) -> Self {
        Self {
            uart: Mutex::new(Serial::new(irq, log)),
        }
    }

    /// A UART with the registers of `state` (a restored snapshot); raises the interrupt the
    /// state has pending. Fails when the state's receive FIFO is over-full.
    pub fn from_state(
        state: &SerialState,
        irq: IrqTrigger,
        log: ConsoleLog,
    ) -> Result<Self, vm_superio::serial::Error<std::io::Error>> {
        Ok(Self {
            uart: Mutex::new(Serial::from_state(state, irq, NoEvents, log)?),
        })
    }

    /// The UART's registers, for a snapshot.
    pub fn state(&self) -> SerialState {
        lock_device(&self.uart).state()
    }
}

impl DevicePio for SerialDevice {
    fn pio_read(&self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        if data.len() == 1 && offset < 8 {
            data[0] = lock_device(&self.uart).read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn pio_write(&self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if data.len() == 1 && offset < 8 {
            if let Err(e) = lock_device(&self.uart).write(offset as u8, data[0]) {
                tracing::warn!("serial write failed: {e}");
            }
        }
    }
}
