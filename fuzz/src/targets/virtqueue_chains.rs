//! Target `virtqueue_chains`: the virtio-mmio transport and the queue handling of the vsock,
//! block and fs devices under hostile descriptor tables and rings. Guest RAM, descriptor tables
//! (addresses a third of which fall outside RAM, any length, flags and `next`), available rings
//! (head indices in and out of range), queue sizes and ring addresses, plausible request headers
//! at random places, and a tail of notifications, backend events and raw register reads and
//! writes all come from the input. Properties: no panic, and every access stays inside guest
//! RAM (vm-memory checks each one; an escape would fault the process). This is the case
//! generator of the former proptest `vmm/tests/virtqueue_fuzz.rs`, for all three devices.

use super::devices::DeviceKind;
use super::scratch::Scratch;
use crate::guest_driver::{queue_base, reg, GuestDriver, AVAIL_OFFSET, RAM};
use crate::input::ByteCursor;

/// Descriptors written per queue.
const DESCRIPTORS: u16 = 8;

/// What a case reached, so a run can show it gets past the set-up.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CaseOutcome {
    /// The device reached DRIVER_OK.
    pub activated: bool,
    /// The device ended in DEVICE_NEEDS_RESET.
    pub needs_reset: bool,
}

/// A plausible request header for `kind` at `at`, so parsing goes past the first check.
fn plant_header(d: &GuestDriver, kind: DeviceKind, at: u64, input: &mut ByteCursor) {
    let mut h = Vec::with_capacity(44);
    match kind {
        DeviceKind::Vsock => {
            h.extend_from_slice(&3u64.to_le_bytes()); // src_cid
            h.extend_from_slice(&2u64.to_le_bytes()); // dst_cid
            h.extend_from_slice(&u32::from(input.u16()).to_le_bytes()); // src_port
            h.extend_from_slice(&u32::from(input.u16()).to_le_bytes()); // dst_port
            h.extend_from_slice(&(input.u32() % 9000).to_le_bytes()); // len
            h.extend_from_slice(&1u16.to_le_bytes()); // type: stream
            h.extend_from_slice(&u16::from(input.u8() % 9).to_le_bytes()); // op
            h.extend_from_slice(&0u32.to_le_bytes()); // flags
            h.extend_from_slice(&input.u32().to_le_bytes()); // buf_alloc
            h.extend_from_slice(&input.u32().to_le_bytes()); // fwd_cnt
        }
        DeviceKind::Block => {
            h.extend_from_slice(&u32::from(input.u8() % 9).to_le_bytes()); // type
            h.extend_from_slice(&0u32.to_le_bytes());
            h.extend_from_slice(&u64::from(input.u8()).to_le_bytes()); // sector
        }
        DeviceKind::Fs => {
            h.extend_from_slice(&(40 + u32::from(input.u8())).to_le_bytes()); // len
            h.extend_from_slice(&u32::from(input.u8() % 52).to_le_bytes()); // opcode
            h.extend_from_slice(&1u64.to_le_bytes()); // unique
            h.extend_from_slice(&u64::from(input.u8() % 4).to_le_bytes()); // nodeid
            h.extend_from_slice(&[0u8; 16]);
        }
    }
    d.write(at, &h);
}

/// One case; the first byte picks the device.
pub fn run(data: &[u8]) {
    run_case(data);
}

/// One case, with what it reached.
pub fn run_case(data: &[u8]) -> CaseOutcome {
    let mut input = ByteCursor::new(data);
    let kind = DeviceKind::from_selector(input.u8());
    let scratch = Scratch::new();
    let mut d = GuestDriver::new(kind.create(&scratch, false));
    // The input's own bytes over the rings (first 64 KiB from the queues' base).
    d.write(queue_base(0), &data[..data.len().min(64 * 1024)]);

    let queues = kind.queue_count();
    for q in 0..queues {
        for i in 0..DESCRIPTORS {
            let addr = u64::from(input.u32()) % (RAM + RAM / 2);
            let len = u32::from(input.u16()) % 8192;
            let flags = input.u16() & 0x7;
            let next = input.u16() % (DESCRIPTORS + 2);
            d.write_descriptor(q, i, addr, len, flags, next);
        }
        let idx = u16::from(input.u8() % 12);
        let heads: Vec<u16> = (0..DESCRIPTORS)
            .map(|_| u16::from(input.u8() % 10))
            .collect();
        d.write_avail(q, idx, &heads);
    }
    for _ in 0..4 {
        let at = u64::from(input.u32()) % (RAM - 64);
        plant_header(&d, kind, at, &mut input);
    }

    // The driver's set-up, with input-chosen queue sizes and descriptor-table skews.
    d.negotiate();
    for q in 0..queues {
        let skew = if input.u8() < 32 {
            u64::from(input.u32())
        } else {
            0
        };
        d.setup_queue(q, [8u16, 4, 16, 3][usize::from(input.u8() % 4)], skew);
    }
    let activated = d.driver_ok();

    // Notifications, backend events, register traffic and republished rings.
    for _ in 0..16 {
        match input.u8() % 6 {
            0 | 1 => d.notify(usize::from(input.u8() % 4)),
            2 => d.transport().backend_ready(),
            3 => {
                let offset = u64::from(input.u16() % 0x120);
                let value = input.u32();
                d.write_reg(offset, value);
            }
            4 => {
                d.read_reg(u64::from(input.u16() % 0x120) & !3);
            }
            _ => {
                let q = usize::from(input.u8()) % queues;
                let idx = u16::from(input.u8() % 20);
                d.write(queue_base(q) + AVAIL_OFFSET + 2, &idx.to_le_bytes());
            }
        }
    }
    // Reading the configuration space past its end is harmless too.
    d.read_reg(reg::CONFIG + u64::from(input.u8()));
    CaseOutcome {
        activated,
        needs_reset: d.needs_reset(),
    }
}

/// One all-zero case per device (rings in RAM, sizes 8: reaches DRIVER_OK) and a few with
/// chains that point into RAM.
pub fn seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for device in 0..3u8 {
        let mut zero = vec![0u8; 512];
        zero[0] = device;
        seeds.push(zero);
        let mut chained = vec![device];
        for i in 0..8u32 {
            chained.extend_from_slice(&(0x4_0000 + i * 0x1000).to_le_bytes());
            chained.extend_from_slice(&64u16.to_le_bytes());
            chained.extend_from_slice(&(if i % 2 == 0 { 1u16 } else { 2 }).to_le_bytes());
            chained.extend_from_slice(&((i as u16 + 1) % 8).to_le_bytes());
        }
        chained.extend_from_slice(&[1, 0, 2, 4, 6, 0, 0, 0, 0]);
        chained.resize(600, 0);
        seeds.push(chained);
    }
    seeds
}
