//! A synthetic guest virtio driver: guest RAM (vm-memory, as the VMM allocates it), the real
//! [`MmioTransport`] around the device under test, the virtio-mmio register sequence a Linux
//! driver performs, and descriptor tables and rings written into guest RAM the way a driver
//! writes them (or, for hostile cases, any way the input says). Queue notifications reach the
//! device as the VMM thread delivers them ([`MmioTransport::notify_queue`]).

use std::collections::HashMap;
use std::sync::Arc;

use vm_device::bus::MmioAddress;
use vm_device::MutDeviceMmio;
use vm_memory::{Bytes, GuestAddress};
use vmm::devices::irq_trigger::IrqTrigger;
use vmm::memory::{create_guest_memory, GuestMemory};
use vmm::virtio::device::VirtioDevice;
use vmm::virtio::interrupt::InterruptLine;
use vmm::virtio::mmio::MmioTransport;

/// Guest RAM of a case, in MiB.
pub const RAM_MIB: u64 = 2;
/// Guest RAM of a case, in bytes.
pub const RAM: u64 = RAM_MIB << 20;
/// Where the driver's data buffers start; below are the queues' rings.
pub const BUFFERS: u64 = 0x4_0000;

/// virtio-mmio register offsets (virtio 1.x, section 4.2.2), as a driver knows them.
pub mod reg {
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    /// Start of the configuration space; the window is this plus the config size.
    pub const CONFIG: u64 = 0x100;
}

/// Descriptor flag: the chain continues at `next`.
pub const DESC_NEXT: u16 = 1;
/// Descriptor flag: the buffer is device-writable.
pub const DESC_WRITE: u16 = 2;
/// Device status bits: ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK.
const STATUS_DRIVER_OK: u32 = 15;
/// Device status bit: DEVICE_NEEDS_RESET.
pub const STATUS_NEEDS_RESET: u32 = 0x40;

/// Guest address of queue `q`'s descriptor table; its available ring is at +0x1000 and its
/// used ring at +0x2000 (room for 256 entries each).
pub fn queue_base(q: usize) -> u64 {
    0x1_0000 + q as u64 * 0x4000
}

/// Offset of the available ring from [`queue_base`].
pub const AVAIL_OFFSET: u64 = 0x1000;
/// Offset of the used ring from [`queue_base`].
pub const USED_OFFSET: u64 = 0x2000;

/// One buffer of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    /// Guest address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (else device-readable).
    pub writable: bool,
}

/// A used-ring entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Used {
    /// Head of the chain the device returned.
    pub head: u32,
    /// Bytes the device says it wrote.
    pub len: u32,
}

#[derive(Debug, Default, Clone)]
struct DriverQueue {
    size: u16,
    /// Descriptors not in a chain the device holds.
    free: Vec<u16>,
    /// The descriptors of each chain the device holds, by head.
    in_flight: HashMap<u16, Vec<u16>>,
    avail_idx: u16,
    used_seen: u16,
}

/// The driver side of one device.
pub struct GuestDriver {
    mem: Arc<GuestMemory>,
    transport: MmioTransport,
    queues: Vec<DriverQueue>,
    next_buffer: u64,
}

impl GuestDriver {
    /// Puts `device` behind a transport in fresh guest RAM.
    pub fn new(device: Box<dyn VirtioDevice>) -> Self {
        let mem = Arc::new(create_guest_memory(RAM_MIB).expect("guest RAM of a fuzz case"));
        let interrupt = Arc::new(InterruptLine::new(IrqTrigger::new().expect("an eventfd")));
        let transport =
            MmioTransport::new(device, mem.clone(), interrupt).expect("queues of the device");
        Self {
            mem,
            transport,
            queues: Vec::new(),
            next_buffer: BUFFERS,
        }
    }

    /// Guest RAM.
    pub fn mem(&self) -> &GuestMemory {
        &self.mem
    }

    /// The transport (for what only the VMM does: notifications, backend events).
    pub fn transport(&mut self) -> &mut MmioTransport {
        &mut self.transport
    }

    /// A 32-bit register write from a vCPU, then what the VMM thread does when that write
    /// kicked it: a DRIVER_OK only parks the queues and kicks their eventfds on the vCPU
    /// thread, and the device is activated and served on the VMM thread.
    pub fn write_reg(&mut self, offset: u64, value: u32) {
        self.transport
            .mmio_write(MmioAddress(0), offset, &value.to_le_bytes());
        self.transport.finish_activation();
    }

    /// A 32-bit register read from a vCPU.
    pub fn read_reg(&mut self, offset: u64) -> u32 {
        let mut buf = [0u8; 4];
        self.transport.mmio_read(MmioAddress(0), offset, &mut buf);
        u32::from_le_bytes(buf)
    }

    /// Negotiates VERSION_1 only, up to FEATURES_OK.
    pub fn negotiate(&mut self) {
        self.write_reg(reg::STATUS, 0);
        self.write_reg(reg::STATUS, 1);
        self.write_reg(reg::STATUS, 3);
        self.write_reg(reg::DRIVER_FEATURES_SEL, 1);
        self.write_reg(reg::DRIVER_FEATURES, 1);
        self.write_reg(reg::STATUS, 11);
    }

    /// Sets up queue `q` with `size` entries at [`queue_base`] (plus `skew` on the descriptor
    /// table, for hostile layouts) and marks it ready.
    pub fn setup_queue(&mut self, q: usize, size: u16, skew: u64) {
        let base = queue_base(q);
        self.write_reg(reg::QUEUE_SEL, q as u32);
        self.write_reg(reg::QUEUE_NUM, u32::from(size));
        self.write_reg(reg::QUEUE_DESC_LOW, base.wrapping_add(skew) as u32);
        self.write_reg(reg::QUEUE_AVAIL_LOW, (base + AVAIL_OFFSET) as u32);
        self.write_reg(reg::QUEUE_USED_LOW, (base + USED_OFFSET) as u32);
        self.write_reg(reg::QUEUE_READY, 1);
        if self.queues.len() <= q {
            self.queues.resize(q + 1, DriverQueue::default());
        }
        self.queues[q] = DriverQueue {
            size,
            free: (0..size).rev().collect(),
            ..DriverQueue::default()
        };
    }

    /// Sets DRIVER_OK; returns whether the device runs.
    pub fn driver_ok(&mut self) -> bool {
        self.write_reg(reg::STATUS, STATUS_DRIVER_OK);
        self.transport.is_activated()
    }

    /// What a Linux driver does: negotiate, set up one queue per entry of `sizes`, DRIVER_OK.
    pub fn start(&mut self, sizes: &[u16]) -> bool {
        self.negotiate();
        for (q, &size) in sizes.iter().enumerate() {
            self.setup_queue(q, size, 0);
        }
        self.driver_ok()
    }

    /// Whether the device is in DEVICE_NEEDS_RESET.
    pub fn needs_reset(&self) -> bool {
        self.transport.status() & STATUS_NEEDS_RESET != 0
    }

    /// A guest buffer of `len` bytes in the buffer area (reused round-robin), starting with
    /// `data` (the rest keeps whatever was there).
    pub fn alloc(&mut self, len: u32, data: &[u8]) -> u64 {
        let len = u64::from(len).min(RAM - BUFFERS);
        if self.next_buffer + len > RAM {
            self.next_buffer = BUFFERS;
        }
        let addr = self.next_buffer;
        // 8-byte alignment, as drivers allocate.
        self.next_buffer = (addr + len + 7) & !7;
        let n = data.len().min(len as usize);
        self.write(addr, &data[..n]);
        addr
    }

    /// Writes `data` to guest RAM at `addr` (bytes past the end of RAM are dropped).
    pub fn write(&self, addr: u64, data: &[u8]) {
        let n = data.len().min(RAM.saturating_sub(addr) as usize);
        if n > 0 {
            self.mem
                .write_slice(&data[..n], GuestAddress(addr))
                .expect("inside guest RAM");
        }
    }

    /// Reads `len` bytes of guest RAM at `addr` (zeros past its end).
    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        let n = len.min(RAM.saturating_sub(addr) as usize);
        if n > 0 {
            self.mem
                .read_slice(&mut out[..n], GuestAddress(addr))
                .expect("inside guest RAM");
        }
        out
    }

    /// Writes descriptor `index` of queue `q`'s table, whatever it says.
    pub fn write_descriptor(
        &self,
        q: usize,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = queue_base(q) + 16 * u64::from(index);
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        self.write(at, &d);
    }

    /// Writes the available ring of queue `q`: its index and its first entries.
    pub fn write_avail(&self, q: usize, idx: u16, entries: &[u16]) {
        let ring = queue_base(q) + AVAIL_OFFSET;
        self.write(ring + 2, &idx.to_le_bytes());
        for (i, e) in entries.iter().enumerate() {
            self.write(ring + 4 + 2 * i as u64, &e.to_le_bytes());
        }
    }

    /// Writes `bufs` as a chain of free descriptors in queue `q`'s table and makes it
    /// available, as a driver does (never reusing a descriptor the device holds); returns its
    /// head, or None for a queue not set up, an empty chain, or too few free descriptors.
    pub fn post(&mut self, q: usize, bufs: &[Buffer]) -> Option<u16> {
        let dq = self.queues.get_mut(q)?;
        if dq.size == 0 || bufs.is_empty() || bufs.len() > dq.free.len() {
            return None;
        }
        let descs: Vec<u16> = (0..bufs.len()).filter_map(|_| dq.free.pop()).collect();
        let head = descs[0];
        let (size, slot) = (dq.size, dq.avail_idx % dq.size);
        dq.avail_idx = dq.avail_idx.wrapping_add(1);
        let avail_idx = dq.avail_idx;
        dq.in_flight.insert(head, descs.clone());
        for (i, b) in bufs.iter().enumerate() {
            let next = descs.get(i + 1).copied();
            let flags = if next.is_some() { DESC_NEXT } else { 0 }
                | if b.writable { DESC_WRITE } else { 0 };
            self.write_descriptor(q, descs[i], b.addr, b.len, flags, next.unwrap_or(0));
        }
        debug_assert!(slot < size);
        let ring = queue_base(q) + AVAIL_OFFSET;
        self.write(ring + 4 + 2 * u64::from(slot), &head.to_le_bytes());
        self.write(ring + 2, &avail_idx.to_le_bytes());
        Some(head)
    }

    /// The driver notifies queue `q`; the VMM thread passes it to the device.
    pub fn notify(&mut self, q: usize) {
        self.transport.notify_queue(q);
    }

    /// Used-ring entries queue `q` got since the last call.
    pub fn take_used(&mut self, q: usize) -> Vec<Used> {
        let Some(dq) = self.queues.get(q).cloned() else {
            return Vec::new();
        };
        if dq.size == 0 {
            return Vec::new();
        }
        let ring = queue_base(q) + USED_OFFSET;
        let idx = u16::from_le_bytes(self.read(ring + 2, 2).try_into().expect("2 bytes"));
        let mut out = Vec::new();
        let mut seen = dq.used_seen;
        while seen != idx {
            let at = ring + 4 + 8 * u64::from(seen % dq.size);
            let e = self.read(at, 8);
            out.push(Used {
                head: u32::from_le_bytes(e[..4].try_into().expect("4 bytes")),
                len: u32::from_le_bytes(e[4..].try_into().expect("4 bytes")),
            });
            seen = seen.wrapping_add(1);
            // A device that claims more than the queue holds is a bug; stop reading.
            assert!(
                out.len() <= usize::from(dq.size),
                "used index ran past the ring"
            );
        }
        let dq = &mut self.queues[q];
        dq.used_seen = seen;
        for u in &out {
            let head = u16::try_from(u.head).ok();
            let descs = head.and_then(|h| dq.in_flight.remove(&h));
            assert!(
                descs.is_some(),
                "the device used chain {} it did not hold",
                u.head
            );
            dq.free.extend(descs.into_iter().flatten());
        }
        out
    }
}
