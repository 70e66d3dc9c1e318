//! One fuzz case for the virtio-mmio transport + virtqueue + vsock packet path: guest RAM,
//! descriptor tables, rings, packet headers and a tail of raw register writes all come from the
//! input bytes. Shared by the proptest test (tests/virtqueue_fuzz.rs) and the long-running
//! fuzz driver (examples/fuzz_vsock_queue.rs). The property: nothing panics, and every access
//! stays inside guest RAM (vm-memory checks each one; an escape would fault the process).

use std::sync::Arc;

use vm_device::bus::MmioAddress;
use vm_device::MutDeviceMmio;
use vm_memory::{Bytes, GuestAddress};
use vmm::devices::irq_trigger::IrqTrigger;
use vmm::memory::create_guest_memory;
use vmm::virtio::interrupt::InterruptLine;
use vmm::virtio::mmio::MmioTransport;
use vmm::virtio::vsock::{Muxer, VsockDevice};

/// Guest RAM of a case (2 MiB); descriptor addresses range over 3 MiB so a third fall outside.
const RAM: u64 = 2 << 20;

/// A cursor over the input that yields zeros when exhausted.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
}

fn write_reg(t: &mut MmioTransport, offset: u64, value: u32) {
    t.mmio_write(MmioAddress(0), offset, &value.to_le_bytes());
}

/// What a case reached, so a fuzz run can show it gets past the set-up.
#[derive(Debug, Default, Clone, Copy)]
pub struct CaseOutcome {
    /// The device reached DRIVER_OK.
    pub activated: bool,
    /// The device ended in DEVICE_NEEDS_RESET.
    pub needs_reset: bool,
}

/// Runs one case. `uds` is a scratch socket path for the muxer.
pub fn run_case(data: &[u8], uds: &std::path::Path) -> CaseOutcome {
    let mut input = Input(data);
    let mem = Arc::new(create_guest_memory(2).unwrap());
    // Random bytes over the first 64 KiB (rings and buffers live there).
    mem.write_slice(&data[..data.len().min(64 * 1024)], GuestAddress(0x1000))
        .unwrap();
    let device = VsockDevice::new(3, Muxer::new(3, uds).unwrap());
    let interrupt = Arc::new(InterruptLine::new(IrqTrigger::new().unwrap()));
    let mut t = MmioTransport::new(Box::new(device), mem.clone(), interrupt).unwrap();

    // Queue rings: mostly in RAM, sometimes not; descriptor tables full of input-driven entries.
    for q in 0..3u32 {
        let base = 0x1000 + u64::from(q) * 0x1000;
        for d in 0..8u64 {
            let addr = u64::from(input.u32()) % (RAM + RAM / 2);
            let len = u32::from(input.u16()) % 8192;
            let flags = input.u16() & 0x7;
            let next = input.u16() % 10;
            let desc = base + d * 16;
            mem.write_obj(addr, GuestAddress(desc)).unwrap();
            mem.write_obj(len, GuestAddress(desc + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(desc + 12)).unwrap();
            mem.write_obj(next, GuestAddress(desc + 14)).unwrap();
        }
        // avail ring: idx and entries (head indices, some out of range).
        mem.write_obj(u16::from(input.u8() % 12), GuestAddress(base + 0x100 + 2))
            .unwrap();
        for e in 0..8u64 {
            mem.write_obj(
                u16::from(input.u8() % 10),
                GuestAddress(base + 0x100 + 4 + 2 * e),
            )
            .unwrap();
        }
    }
    // Plausible vsock headers at the start of some buffers so parsing goes deeper.
    for _ in 0..4 {
        let at = u64::from(input.u32()) % (RAM - 64);
        mem.write_obj(3u64, GuestAddress(at)).unwrap();
        mem.write_obj(2u64, GuestAddress(at + 8)).unwrap();
        mem.write_obj(u32::from(input.u16()), GuestAddress(at + 16))
            .unwrap();
        mem.write_obj(u32::from(input.u16()), GuestAddress(at + 20))
            .unwrap();
        mem.write_obj(input.u32() % 9000, GuestAddress(at + 24))
            .unwrap();
        mem.write_obj(1u16, GuestAddress(at + 28)).unwrap();
        mem.write_obj(u16::from(input.u8() % 9), GuestAddress(at + 30))
            .unwrap();
        mem.write_obj(input.u32(), GuestAddress(at + 36)).unwrap();
    }

    // The driver's set-up sequence, with input-chosen queue sizes and ring addresses.
    write_reg(&mut t, 0x70, 0);
    write_reg(&mut t, 0x70, 1);
    write_reg(&mut t, 0x70, 3);
    write_reg(&mut t, 0x24, 1);
    write_reg(&mut t, 0x20, 1);
    write_reg(&mut t, 0x70, 11);
    for q in 0..3u32 {
        let base = 0x1000 + u64::from(q) * 0x1000;
        let skew = if input.u8() < 32 {
            u64::from(input.u32())
        } else {
            0
        };
        write_reg(&mut t, 0x30, q);
        write_reg(&mut t, 0x38, [8u32, 4, 16, 3][usize::from(input.u8() % 4)]);
        write_reg(&mut t, 0x80, (base + skew) as u32);
        write_reg(&mut t, 0x90, (base + 0x100) as u32);
        write_reg(&mut t, 0xa0, (base + 0x200) as u32);
        write_reg(&mut t, 0x44, 1);
    }
    write_reg(&mut t, 0x70, 15);
    // What the VMM thread does when DRIVER_OK's queue kicks wake it.
    t.finish_activation();
    let activated = t.is_activated();

    // Notifications and raw register writes from the rest of the input.
    for _ in 0..16 {
        match input.u8() % 6 {
            0 | 1 => t.notify_queue(usize::from(input.u8() % 4)),
            2 => t.backend_ready(),
            3 => {
                let offset = u64::from(input.u16() % 0x120);
                let value = input.u32();
                write_reg(&mut t, offset, value);
            }
            4 => {
                let mut buf = [0u8; 4];
                t.mmio_read(MmioAddress(0), u64::from(input.u16() % 0x120), &mut buf);
            }
            _ => {
                // The guest republishes: bump an avail index.
                let q = u64::from(input.u8() % 3);
                let idx = input.u8() % 20;
                mem.write_obj(u16::from(idx), GuestAddress(0x1000 + q * 0x1000 + 0x102))
                    .unwrap();
            }
        }
    }
    CaseOutcome {
        activated,
        needs_reset: t.status() & 0x40 != 0,
    }
}
