//! Legacy devices on the port-I/O bus (8250 serial, i8042 reset, the boot timer), the console log
//! the serial port writes to, and the interrupt trigger they share.

pub mod boot_timer;
pub mod console;
pub mod i8042;
pub mod irq_trigger;
pub mod serial;

use std::sync::{Mutex, MutexGuard};

/// Locks a device mutex; a poisoned lock still yields the device (device state is plain data,
/// and refusing guest I/O after an unrelated panic would only hang the guest).
pub(crate) fn lock_device<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
