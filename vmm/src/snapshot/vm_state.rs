//! The VM-wide state: the in-kernel interrupt controllers (PIC master and slave, IOAPIC), the
//! in-kernel PIT, the KVM clock, and the legacy devices' state (the serial port's registers and
//! whether the boot timer was written), and the virtio devices' ([`super::virtio_state`]). The
//! i8042 holds no state (vm-superio's device only forwards the reset command).
//!
//! The KVM clock is handled as Firecracker does: `KVM_CLOCK_TSC_STABLE` is a flag KVM reports
//! but `KVM_SET_CLOCK` does not accept, so it is dropped on capture; on restore the flags are 0,
//! so the guest's clock continues from the captured value (the time the VM spent saved does not
//! pass for it), and `KVM_CLOCK_REALTIME` is never asked for.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_channel_state, kvm_pit_state2, KVM_CLOCK_TSC_STABLE,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use super::virtio_state::TransportSnapshot;
use super::SnapshotError;

/// Bytes of a `kvm_irqchip`'s state union.
pub const IRQCHIP_STATE_LEN: usize = 512;
/// The most bytes the serial port's receive FIFO holds.
pub const SERIAL_FIFO_LEN: usize = 64;

/// One PIT channel (`kvm_pit_channel_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct PitChannel {
    pub count: u32,
    pub latched_count: u16,
    pub count_latched: u8,
    pub status_latched: u8,
    pub status: u8,
    pub read_state: u8,
    pub write_state: u8,
    pub write_latch: u8,
    pub rw_mode: u8,
    pub mode: u8,
    pub bcd: u8,
    pub gate: u8,
    pub count_load_time: i64,
}

super::mirror_struct!(
    PitChannel,
    kvm_pit_channel_state,
    [
        count,
        latched_count,
        count_latched,
        status_latched,
        status,
        read_state,
        write_state,
        write_latch,
        rw_mode,
        mode,
        bcd,
        gate,
        count_load_time
    ]
);

/// The PIT (`kvm_pit_state2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PitState {
    /// Channels 0 to 2.
    pub channels: [PitChannel; 3],
    /// `KVM_PIT_FLAGS_*`.
    pub flags: u32,
}

/// The KVM clock (`kvm_clock_data`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ClockState {
    /// Guest clock in nanoseconds.
    pub clock: u64,
    /// Flags as captured, `KVM_CLOCK_TSC_STABLE` removed.
    pub flags: u32,
    /// Host wall-clock time at capture, where `KVM_CLOCK_REALTIME` is set.
    pub realtime: u64,
    /// Host TSC at capture, where `KVM_CLOCK_HOST_TSC` is set.
    pub host_tsc: u64,
}

/// The serial port's registers (vm-superio's `SerialState`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// Received bytes not yet read by the guest (at most [`SERIAL_FIFO_LEN`]).
    pub in_buffer: Vec<u8>,
}

super::mirror_struct!(
    SerialState,
    vm_superio::serial::SerialState,
    [
        baud_divisor_low,
        baud_divisor_high,
        interrupt_enable,
        interrupt_identification,
        line_control,
        line_status,
        modem_control,
        modem_status,
        scratch,
        in_buffer
    ]
);

/// The devices' state.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DeviceState {
    /// COM1.
    pub serial: SerialState,
    /// Whether the guest wrote the boot timer (reads then return the magic value). The host
    /// timestamp itself does not carry over: a restored VM records its restore time.
    pub boot_timer_written: bool,
    /// The virtio devices, in virtio-mmio slot order.
    pub virtio: Vec<TransportSnapshot>,
}

/// The whole VM-wide state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    /// The master PIC's `kvm_irqchip` state union, raw: KVM's own layout of the chip, which it
    /// hands over as this 512-byte union.
    pub pic_master: Vec<u8>,
    /// The slave PIC, likewise.
    pub pic_slave: Vec<u8>,
    /// The IOAPIC, likewise.
    pub ioapic: Vec<u8>,
    /// The PIT.
    pub pit: PitState,
    /// The KVM clock.
    pub clock: ClockState,
    /// The legacy devices.
    pub devices: DeviceState,
}

impl VmState {
    /// Checks the sizes a crafted file could get wrong.
    pub fn validate(&self) -> Result<(), String> {
        for (name, chip) in [
            ("PIC master", &self.pic_master),
            ("PIC slave", &self.pic_slave),
            ("IOAPIC", &self.ioapic),
        ] {
            if chip.len() != IRQCHIP_STATE_LEN {
                return Err(format!(
                    "{name} state is {} bytes, not {IRQCHIP_STATE_LEN}",
                    chip.len()
                ));
            }
        }
        if self.devices.serial.in_buffer.len() > SERIAL_FIFO_LEN {
            return Err(format!(
                "serial FIFO holds {} bytes, more than {SERIAL_FIFO_LEN}",
                self.devices.serial.in_buffer.len()
            ));
        }
        Ok(())
    }
}

fn get_chip(vm: &VmFd, chip_id: u32, name: &str) -> Result<Vec<u8>, SnapshotError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(SnapshotError::kvm(format!("KVM_GET_IRQCHIP ({name})")))?;
    // SAFETY: every member of the union (`dummy`, `pic`, `ioapic`) is plain old data and
    // `dummy` spans all of it, so reading it yields the bytes KVM wrote, whatever the chip.
    let raw = unsafe { chip.chip.dummy };
    Ok(raw.iter().map(|b| *b as u8).collect())
}

fn set_chip(vm: &VmFd, chip_id: u32, name: &str, bytes: &[u8]) -> Result<(), SnapshotError> {
    let mut raw = [0 as std::os::raw::c_char; IRQCHIP_STATE_LEN];
    for (dst, src) in raw.iter_mut().zip(bytes) {
        *dst = *src as std::os::raw::c_char;
    }
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    chip.chip.dummy = raw;
    vm.set_irqchip(&chip)
        .map_err(SnapshotError::kvm(format!("KVM_SET_IRQCHIP ({name})")))
}

/// Captures the interrupt controllers, PIT and clock of `vm` (whose vCPUs are paused) with the
/// given device state.
pub fn capture(vm: &VmFd, devices: DeviceState) -> Result<VmState, SnapshotError> {
    let pit = vm.get_pit2().map_err(SnapshotError::kvm("KVM_GET_PIT2"))?;
    let clock = vm
        .get_clock()
        .map_err(SnapshotError::kvm("KVM_GET_CLOCK"))?;
    Ok(VmState {
        pic_master: get_chip(vm, KVM_IRQCHIP_PIC_MASTER, "PIC master")?,
        pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE, "PIC slave")?,
        ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC, "IOAPIC")?,
        pit: PitState {
            channels: [
                (&pit.channels[0]).into(),
                (&pit.channels[1]).into(),
                (&pit.channels[2]).into(),
            ],
            flags: pit.flags,
        },
        clock: ClockState {
            clock: clock.clock,
            flags: clock.flags & !KVM_CLOCK_TSC_STABLE,
            realtime: clock.realtime,
            host_tsc: clock.host_tsc,
        },
        devices,
    })
}

/// Restores the PIT, clock and interrupt controllers into a fresh `vm` after
/// `KVM_CREATE_IRQCHIP` and `KVM_CREATE_PIT2`, before its vCPUs are restored.
pub fn restore(vm: &VmFd, state: &VmState) -> Result<(), SnapshotError> {
    state.validate().map_err(SnapshotError::InvalidState)?;
    let pit = kvm_pit_state2 {
        channels: [
            (&state.pit.channels[0]).into(),
            (&state.pit.channels[1]).into(),
            (&state.pit.channels[2]).into(),
        ],
        flags: state.pit.flags,
        ..Default::default()
    };
    vm.set_pit2(&pit)
        .map_err(SnapshotError::kvm("KVM_SET_PIT2"))?;
    let clock = kvm_clock_data {
        clock: state.clock.clock,
        // See the module docs: continue from the captured value, nothing else.
        flags: 0,
        ..Default::default()
    };
    vm.set_clock(&clock)
        .map_err(SnapshotError::kvm("KVM_SET_CLOCK"))?;
    set_chip(vm, KVM_IRQCHIP_PIC_MASTER, "PIC master", &state.pic_master)?;
    set_chip(vm, KVM_IRQCHIP_PIC_SLAVE, "PIC slave", &state.pic_slave)?;
    set_chip(vm, KVM_IRQCHIP_IOAPIC, "IOAPIC", &state.ioapic)?;
    Ok(())
}
