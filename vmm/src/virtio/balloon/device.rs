//! The virtio-balloon device (id 5): three queues (inflate, deflate, free page reporting), a
//! configuration space of `num_pages` (the host's target, always 0: the host never asks the
//! guest to inflate) and `actual` (written by the driver, kept), and the features VERSION_1,
//! DEFLATE_ON_OOM and REPORTING. No statistics queue, no free page hinting.
//!
//! Queue indices: Linux's driver skips the queues of features it did not negotiate rather than
//! leaving holes, so with REPORTING (and neither STATS_VQ nor FREE_PAGE_HINT, which are not
//! offered) the reporting queue is transport queue 2. A driver that did not ack REPORTING
//! never sets queue 2 up; the device then runs with inflate and deflate only, and ignores
//! queue 2 even if a driver makes it ready anyway.
//!
//! Every available chain is answered with used length 0 (what Linux's driver expects: it
//! ignores the length) after: for a reported range or inflated pages, the host memory behind
//! them is dropped ([`super::discard`]); for deflated pages, nothing (they fault back in as
//! zeroes when the guest touches them). Each notification serves at most the chains available
//! when it starts (bounded by the queue size), each chain at most
//! [`crate::virtio::chain::MAX_CHAIN_DESCRIPTORS`] descriptors ([`super::ranges`]).

use std::sync::Arc;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON;
use virtio_queue::{Queue, QueueOwnedT, QueueState, QueueT};

use super::discard::{discard_range, host_page_size};
use super::ranges::{inflated_ranges, reported_ranges, ChainRanges, BALLOON_PAGE_SIZE};
use super::state::BalloonState;
use crate::memory::GuestMemory;
use crate::snapshot::virtio_state::DeviceSnapshot;
use crate::virtio::device::{read_config_bytes, DeviceFault, VirtioDevice};
use crate::virtio::interrupt::InterruptLine;

/// Inflate queue index.
pub const INFLATE_QUEUE: usize = 0;
/// Deflate queue index.
pub const DEFLATE_QUEUE: usize = 1;
/// Free page reporting queue index (see the module docs).
pub const REPORTING_QUEUE: usize = 2;
/// Size of each queue (free page reporting needs at least 32, Linux's
/// `PAGE_REPORTING_CAPACITY`).
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];

/// Feature bit: the guest may deflate the balloon when it runs out of memory.
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u32 = 2;
/// Feature bit: the guest reports free pages on the reporting queue.
pub const VIRTIO_BALLOON_F_REPORTING: u32 = 5;

/// Offset of `num_pages` in the configuration space.
const CONFIG_NUM_PAGES: usize = 0;
/// Offset of `actual` in the configuration space.
const CONFIG_ACTUAL: usize = 4;
/// Size of the configuration space (`num_pages`, `actual`).
const CONFIG_SIZE: usize = 8;

struct Active {
    mem: Arc<GuestMemory>,
    inflate: Queue,
    deflate: Queue,
    /// Only when the driver acked REPORTING and made the queue ready.
    reporting: Option<Queue>,
    interrupt: Arc<InterruptLine>,
}

/// The balloon device.
pub struct BalloonDevice {
    state: BalloonState,
    active: Option<Active>,
    /// The host's page size: the unit memory is dropped in.
    page_size: u64,
}

impl Default for BalloonDevice {
    fn default() -> Self {
        Self::new()
    }
}

impl BalloonDevice {
    /// A device that never asks for memory (`num_pages` 0) and gives back what the guest
    /// frees. Reads the host page size, so create it before the VMM thread's seccomp filter.
    pub fn new() -> Self {
        Self {
            state: BalloonState::default(),
            active: None,
            page_size: host_page_size(),
        }
    }

    /// The device's state.
    pub fn state(&self) -> &BalloonState {
        &self.state
    }

    fn config_bytes(&self) -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        // num_pages: the host's target, always 0.
        c[CONFIG_NUM_PAGES..CONFIG_ACTUAL].copy_from_slice(&0u32.to_le_bytes());
        c[CONFIG_ACTUAL..].copy_from_slice(&self.state.actual.to_le_bytes());
        c
    }

    /// Answers every chain available on queue `index` now, then interrupts the driver if it
    /// asked to be told.
    fn serve(&mut self, index: usize) -> Result<(), DeviceFault> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let queue = match index {
            INFLATE_QUEUE => &mut active.inflate,
            DEFLATE_QUEUE => &mut active.deflate,
            REPORTING_QUEUE => match active.reporting.as_mut() {
                Some(q) => q,
                None => return Ok(()),
            },
            _ => return Ok(()),
        };
        let mem = active.mem.clone();
        // The chains available now, no more: at most the queue size (virtio-queue refuses an
        // available index further ahead than that). Chains the driver adds meanwhile come with
        // their own notification.
        let chains: Vec<_> = queue.iter(mem.as_ref())?.collect();
        if chains.is_empty() {
            return Ok(());
        }
        for chain in chains {
            let head = chain.head_index();
            let given_up = match index {
                INFLATE_QUEUE => Some((inflated_ranges(chain, &mem), Source::Inflate)),
                REPORTING_QUEUE => Some((reported_ranges(chain), Source::Report)),
                // Deflated pages are the guest's again; they fault back in on first touch.
                _ => None,
            };
            if let Some((ranges, source)) = given_up {
                give_back(&mut self.state, self.page_size, &mem, ranges, source);
            }
            queue.add_used(mem.as_ref(), head, 0)?;
        }
        if queue.needs_notification(mem.as_ref())? {
            active.interrupt.signal_used_queue();
        }
        Ok(())
    }
}

/// Where a range came from, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Inflate,
    Report,
}

/// Drops the host memory of each range of a chain and counts what happened.
fn give_back(
    state: &mut BalloonState,
    page_size: u64,
    mem: &GuestMemory,
    chain: ChainRanges,
    source: Source,
) {
    state.skipped_descriptors += u64::from(chain.skipped_descriptors) + u64::from(chain.truncated);
    for range in chain.ranges {
        match discard_range(mem, range.addr, range.len, page_size) {
            Ok(0) => state.ignored_ranges += 1,
            Ok(bytes) => {
                let pages = bytes / BALLOON_PAGE_SIZE;
                match source {
                    Source::Inflate => state.inflated_pages += pages,
                    Source::Report => state.reported_pages += pages,
                }
            }
            Err(e) => {
                state.discard_failures += 1;
                if state.discard_failures == 1 {
                    tracing::warn!("virtio-balloon: cannot give guest memory back: {e}");
                } else {
                    tracing::debug!("virtio-balloon: cannot give guest memory back: {e}");
                }
            }
        }
    }
}

impl VirtioDevice for BalloonDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM)
            | (1 << VIRTIO_BALLOON_F_REPORTING)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }

    /// Only `actual` is writable; any bytes of a write that land in it are kept, the rest
    /// (`num_pages`, or past the end) are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut actual = self.state.actual.to_le_bytes();
        for (i, b) in data.iter().enumerate() {
            let at = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| o.checked_sub(CONFIG_ACTUAL));
            if let Some(slot) = at.and_then(|o| actual.get_mut(o)) {
                *slot = *b;
            }
        }
        self.state.actual = u32::from_le_bytes(actual);
    }

    fn activate(
        &mut self,
        mem: Arc<GuestMemory>,
        queues: Vec<Queue>,
        interrupt: Arc<InterruptLine>,
        acked_features: u64,
    ) -> Result<(), DeviceFault> {
        let mut queues = queues.into_iter();
        let (Some(inflate), Some(deflate)) = (
            queues.next().filter(QueueT::ready),
            queues.next().filter(QueueT::ready),
        ) else {
            return Err(DeviceFault(
                "the inflate and deflate queues must be set up".into(),
            ));
        };
        let reporting = queues
            .next()
            .filter(|q| q.ready() && acked_features & (1 << VIRTIO_BALLOON_F_REPORTING) != 0);
        if reporting.is_none() && acked_features & (1 << VIRTIO_BALLOON_F_REPORTING) != 0 {
            tracing::debug!("virtio-balloon: REPORTING acked but its queue was not set up");
        }
        self.state.acked_features = acked_features;
        self.active = Some(Active {
            mem,
            inflate,
            deflate,
            reporting,
            interrupt,
        });
        Ok(())
    }

    fn queue_notified(&mut self, index: usize) -> Result<(), DeviceFault> {
        self.serve(index)
    }

    /// Drops the queues and what the driver set (`actual`, the acked features); the counters
    /// of memory given back are the host's and stay.
    fn reset(&mut self) {
        self.active = None;
        self.state.actual = 0;
        self.state.acked_features = 0;
    }

    fn save_state(&self) -> Option<DeviceSnapshot> {
        Some(DeviceSnapshot::Balloon(self.state.clone()))
    }

    fn running_queues(&self) -> Vec<Option<QueueState>> {
        match &self.active {
            None => Vec::new(),
            Some(a) => vec![
                Some(a.inflate.state()),
                Some(a.deflate.state()),
                a.reporting.as_ref().map(Queue::state),
            ],
        }
    }

    /// Takes `actual` and the counters back; the acked features come again with activation.
    fn restore_state(&mut self, state: &DeviceSnapshot) -> Result<(), String> {
        match state {
            DeviceSnapshot::Balloon(state) => {
                self.state = state.clone();
                Ok(())
            }
            other => Err(format!(
                "a virtio-balloon device cannot take the state of device type {}",
                other.device_type()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::irq_trigger::IrqTrigger;
    use crate::memory::{create_guest_memory, resident_bytes};
    use crate::virtio::chain::MAX_CHAIN_DESCRIPTORS;
    use crate::virtio::interrupt::INT_USED_RING;
    use vm_memory::{Bytes, GuestAddress};

    const PAGE: u64 = 4096;
    const MIB: u64 = 1 << 20;
    /// Guest RAM of the rig.
    const RAM: u64 = 16 * MIB;
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const SIZE: u16 = 16;
    const ALL_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM)
        | (1 << VIRTIO_BALLOON_F_REPORTING);
    const NO_REPORTING: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM);

    /// Descriptor table, available ring and used ring of queue `q`.
    fn rings(q: usize) -> (u64, u64, u64) {
        let base = 0x1_0000 * (q as u64 + 1);
        (base, base + 0x4000, base + 0x8000)
    }

    struct Rig {
        mem: Arc<GuestMemory>,
        dev: BalloonDevice,
        interrupt: Arc<InterruptLine>,
        avail: [u16; 3],
    }

    impl Rig {
        /// A device activated with the queues in `ready` made ready and `features` acked.
        fn new(ready: &[usize], features: u64) -> Self {
            let mut dev = BalloonDevice::new();
            let mem = Arc::new(create_guest_memory(RAM / MIB).unwrap());
            let queues = (0..3)
                .map(|i| {
                    let (desc, avail, used) = rings(i);
                    let mut q = Queue::new(QUEUE_SIZE).unwrap();
                    q.set_size(SIZE);
                    q.set_desc_table_address(Some(desc as u32), Some(0));
                    q.set_avail_ring_address(Some(avail as u32), Some(0));
                    q.set_used_ring_address(Some(used as u32), Some(0));
                    q.set_ready(ready.contains(&i));
                    q
                })
                .collect();
            // Touch the rings now, so that the resident size a test measures before posting
            // a chain does not grow with them.
            for i in 0..3 {
                let (desc, _, _) = rings(i);
                mem.write_slice(&[0u8; 0xc000], GuestAddress(desc)).unwrap();
            }
            let interrupt = Arc::new(InterruptLine::new(IrqTrigger::new().unwrap()));
            dev.activate(mem.clone(), queues, interrupt.clone(), features)
                .unwrap();
            Self {
                mem,
                dev,
                interrupt,
                avail: [0; 3],
            }
        }

        /// Posts descriptors (addr, len, flags) chained in order on queue `q` and notifies it;
        /// returns the used length if the device returned the chain.
        fn post(&mut self, q: usize, descs: &[(u64, u32, u16)]) -> Option<u32> {
            let m = self.mem.as_ref();
            let (desc, avail, used) = rings(q);
            for (i, (addr, len, flags)) in descs.iter().enumerate() {
                let d = desc + 16 * i as u64;
                let last = i + 1 == descs.len();
                let flags = if last { *flags } else { *flags | NEXT };
                m.write_obj(*addr, GuestAddress(d)).unwrap();
                m.write_obj(*len, GuestAddress(d + 8)).unwrap();
                m.write_obj(flags, GuestAddress(d + 12)).unwrap();
                m.write_obj((i as u16 + 1) % SIZE, GuestAddress(d + 14))
                    .unwrap();
            }
            let slot = u64::from(self.avail[q] % SIZE);
            m.write_obj(0u16, GuestAddress(avail + 4 + 2 * slot))
                .unwrap();
            self.avail[q] = self.avail[q].wrapping_add(1);
            m.write_obj(self.avail[q], GuestAddress(avail + 2)).unwrap();
            self.dev.queue_notified(q).unwrap();
            let used_idx: u16 = m.read_obj(GuestAddress(used + 2)).unwrap();
            (used_idx == self.avail[q])
                .then(|| m.read_obj(GuestAddress(used + 4 + 8 * slot + 4)).unwrap())
        }

        fn fill(&self, addr: u64, len: u64, byte: u8) {
            self.mem
                .write_slice(&vec![byte; len as usize], GuestAddress(addr))
                .unwrap();
        }

        /// Indices of the pages of `[addr, addr + pages * PAGE)` that read back all zero.
        fn zero_pages(&self, addr: u64, pages: u64) -> Vec<u64> {
            let mut buf = vec![0u8; PAGE as usize];
            (0..pages)
                .filter(|i| {
                    self.mem
                        .read_slice(&mut buf, GuestAddress(addr + i * PAGE))
                        .unwrap();
                    buf.iter().all(|b| *b == 0)
                })
                .collect()
        }
    }

    fn config_u32(dev: &BalloonDevice, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        dev.read_config(offset, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn identity_features_and_queues() {
        let dev = BalloonDevice::new();
        assert_eq!(dev.device_type(), 5);
        assert_eq!(dev.features(), ALL_FEATURES);
        assert_eq!(dev.queue_max_sizes(), &[QUEUE_SIZE; 3]);
        assert!(dev.backend_fd().is_none());
    }

    #[test]
    fn config_space_holds_a_zero_target_and_the_drivers_actual() {
        let mut dev = BalloonDevice::new();
        assert_eq!(config_u32(&dev, 0), 0, "num_pages");
        assert_eq!(config_u32(&dev, 4), 0, "actual");
        dev.write_config(4, &0x1234_5678u32.to_le_bytes());
        assert_eq!(config_u32(&dev, 4), 0x1234_5678);
        assert_eq!(dev.state().actual, 0x1234_5678);
        // num_pages is the host's: the driver cannot change it.
        dev.write_config(0, &7u32.to_le_bytes());
        assert_eq!(config_u32(&dev, 0), 0);
        // A write straddling num_pages and actual changes only actual's bytes; single bytes.
        dev.write_config(2, &[0xaa, 0xbb, 0xcc, 0xdd]);
        assert_eq!(config_u32(&dev, 4), 0x1234_ddcc);
        dev.write_config(7, &[0x01]);
        assert_eq!(config_u32(&dev, 4), 0x0134_ddcc);
        // Past the end: ignored on write, zero on read; huge offsets do not overflow.
        dev.write_config(8, &[0xff; 8]);
        dev.write_config(u64::MAX, &[0xff; 8]);
        assert_eq!(config_u32(&dev, 4), 0x0134_ddcc);
        assert_eq!(config_u32(&dev, 8), 0);
        let mut wide = [0xffu8; 16];
        dev.read_config(0, &mut wide);
        assert_eq!(wide[..8], [0, 0, 0, 0, 0xcc, 0xdd, 0x34, 0x01]);
        assert_eq!(wide[8..], [0; 8]);
    }

    #[test]
    fn reported_ranges_are_given_back_and_the_chain_returned() {
        let mut rig = Rig::new(&[0, 1, 2], ALL_FEATURES);
        let base = 8 * MIB;
        rig.fill(base, 2 * MIB + PAGE, 0x5a);
        let before = resident_bytes(&rig.mem).unwrap();
        // Two reported ranges, as Linux sends them: device-writable buffers.
        let used = rig.post(
            REPORTING_QUEUE,
            &[(base, MIB as u32, WRITE), (base + MIB, MIB as u32, WRITE)],
        );
        assert_eq!(used, Some(0), "returned with used length 0");
        let after = resident_bytes(&rig.mem).unwrap();
        assert!(
            after + 2 * MIB <= before,
            "resident before {before}, after {after}"
        );
        assert_eq!(
            rig.zero_pages(base, 2 * MIB / PAGE + 1),
            (0..512).collect::<Vec<_>>(),
            "the reported pages read back zero; the page after them keeps its data"
        );
        assert_eq!(rig.dev.state().reported_pages, 512);
        assert_eq!(rig.dev.state().inflated_pages, 0);
        assert_ne!(rig.interrupt.status() & INT_USED_RING, 0);
    }

    #[test]
    fn hostile_reports_give_back_only_whole_pages_of_ram() {
        let mut rig = Rig::new(&[0, 1, 2], ALL_FEATURES);
        rig.fill(4 * MIB, 8 * MIB, 0x77);
        rig.fill(RAM - 4 * PAGE, 4 * PAGE, 0x77);
        let used = rig.post(
            REPORTING_QUEUE,
            &[
                // Outside guest RAM, and in the MMIO gap.
                (0x7fff_0000_0000, 16 * PAGE as u32, WRITE),
                (crate::layout::MMIO_GAP_START, 0x1000_0000, WRITE),
                // Across the end of RAM: its last two pages only.
                (RAM - 2 * PAGE, 16 * PAGE as u32, WRITE),
                // Unaligned: the page in the middle only.
                (4 * MIB + 1, 2 * PAGE as u32, WRITE),
                // Zero-length, and ending past the top of the address space.
                (5 * MIB, 0, WRITE),
                (u64::MAX - PAGE, 2 * PAGE as u32, WRITE),
            ],
        );
        assert_eq!(used, Some(0));
        // The largest buffer a descriptor can describe, beyond RAM.
        assert_eq!(
            rig.post(REPORTING_QUEUE, &[(0x7fff_0000_0000, u32::MAX, WRITE)]),
            Some(0)
        );
        assert_eq!(rig.zero_pages(RAM - 4 * PAGE, 4), vec![2, 3]);
        assert_eq!(rig.zero_pages(4 * MIB, 8 * MIB / PAGE), vec![1]);
        let s = rig.dev.state();
        assert_eq!(s.reported_pages, 3);
        assert_eq!(s.ignored_ranges, 5);
        // A device-readable buffer is not a report: skipped, nothing dropped.
        assert_eq!(
            rig.post(REPORTING_QUEUE, &[(6 * MIB, MIB as u32, 0)]),
            Some(0)
        );
        assert_eq!(rig.dev.state().skipped_descriptors, 1);
        assert_eq!(rig.zero_pages(4 * MIB, 8 * MIB / PAGE), vec![1]);
    }

    #[test]
    fn looping_report_chains_end() {
        let mut rig = Rig::new(&[0, 1, 2], ALL_FEATURES);
        // A loop of SIZE descriptors, each reporting page i: the walk ends after SIZE
        // descriptors (virtio-queue), and in any case at MAX_CHAIN_DESCRIPTORS (see
        // `super::super::ranges`' tests).
        let descs: Vec<_> = (0..u64::from(SIZE))
            .map(|i| (4 * MIB + i * PAGE, PAGE as u32, WRITE | NEXT))
            .collect();
        assert!(descs.len() <= MAX_CHAIN_DESCRIPTORS);
        rig.fill(4 * MIB, u64::from(SIZE) * PAGE, 0x12);
        assert_eq!(rig.post(REPORTING_QUEUE, &descs), Some(0));
        assert_eq!(rig.dev.state().reported_pages, u64::from(SIZE));
    }

    #[test]
    fn inflated_pages_are_given_back() {
        let mut rig = Rig::new(&[0, 1], NO_REPORTING);
        let base = 8 * MIB;
        rig.fill(base, 8 * PAGE, 0x3c);
        // Frames 0..4 and 6 of `base`, a frame beyond RAM, and the frame of page 7 twice.
        let pfn = |addr: u64| (addr >> 12) as u32;
        let pfns = [
            pfn(base),
            pfn(base + PAGE),
            pfn(base + 2 * PAGE),
            pfn(base + 3 * PAGE),
            pfn(base + 6 * PAGE),
            pfn(64 * MIB),
            pfn(base + 7 * PAGE),
            pfn(base + 7 * PAGE),
        ];
        let list = 0x8_0000;
        for (i, p) in pfns.iter().enumerate() {
            rig.mem
                .write_obj(*p, GuestAddress(list + 4 * i as u64))
                .unwrap();
        }
        assert_eq!(
            rig.post(INFLATE_QUEUE, &[(list, 4 * pfns.len() as u32, 0)]),
            Some(0)
        );
        assert_eq!(rig.zero_pages(base, 8), vec![0, 1, 2, 3, 6, 7]);
        let s = rig.dev.state();
        assert_eq!(s.inflated_pages, 7, "page 7 was given twice");
        assert_eq!(s.ignored_ranges, 1, "the frame beyond RAM");
        assert_eq!(s.reported_pages, 0);
    }

    #[test]
    fn deflate_returns_chains_and_drops_nothing() {
        let mut rig = Rig::new(&[0, 1], NO_REPORTING);
        let base = 8 * MIB;
        rig.fill(base, PAGE, 0x3c);
        rig.mem
            .write_obj((base >> 12) as u32, GuestAddress(0x8_0000))
            .unwrap();
        assert_eq!(rig.post(DEFLATE_QUEUE, &[(0x8_0000, 4, 0)]), Some(0));
        assert!(rig.zero_pages(base, 1).is_empty());
        assert_eq!(rig.dev.state().inflated_pages, 0);
    }

    #[test]
    fn without_reporting_queue_2_is_ignored() {
        // The driver did not ack REPORTING and never set queue 2 up.
        let mut rig = Rig::new(&[0, 1], NO_REPORTING);
        assert_eq!(rig.dev.state().acked_features, NO_REPORTING);
        rig.fill(4 * MIB, PAGE, 0x01);
        assert_eq!(
            rig.post(REPORTING_QUEUE, &[(4 * MIB, PAGE as u32, WRITE)]),
            None
        );
        assert!(rig.zero_pages(4 * MIB, 1).is_empty());
        // Queue 2 ready but REPORTING not acked: still not a reporting queue.
        let mut rig = Rig::new(&[0, 1, 2], NO_REPORTING);
        rig.fill(4 * MIB, PAGE, 0x01);
        assert_eq!(
            rig.post(REPORTING_QUEUE, &[(4 * MIB, PAGE as u32, WRITE)]),
            None
        );
        assert!(rig.zero_pages(4 * MIB, 1).is_empty());
        // Inflate and deflate work.
        assert_eq!(rig.post(DEFLATE_QUEUE, &[(0x8_0000, 4, 0)]), Some(0));
        // Unknown queues are ignored.
        assert_eq!(rig.dev.queue_notified(3), Ok(()));
    }

    #[test]
    fn activation_needs_the_inflate_and_deflate_queues() {
        for ready in [&[0usize][..], &[1], &[0, 2], &[]] {
            let mut dev = BalloonDevice::new();
            let mem = Arc::new(create_guest_memory(2).unwrap());
            let queues = (0..3)
                .map(|i| {
                    let mut q = Queue::new(QUEUE_SIZE).unwrap();
                    q.set_ready(ready.contains(&i));
                    q
                })
                .collect();
            let interrupt = Arc::new(InterruptLine::new(IrqTrigger::new().unwrap()));
            assert!(
                dev.activate(mem, queues, interrupt, ALL_FEATURES).is_err(),
                "{ready:?}"
            );
            assert_eq!(dev.state().acked_features, 0);
        }
    }

    #[test]
    fn reset_drops_the_queues_and_the_drivers_state() {
        let mut rig = Rig::new(&[0, 1, 2], ALL_FEATURES);
        rig.dev.write_config(4, &9u32.to_le_bytes());
        rig.fill(4 * MIB, PAGE, 0x01);
        assert_eq!(
            rig.post(REPORTING_QUEUE, &[(4 * MIB, PAGE as u32, WRITE)]),
            Some(0)
        );
        rig.dev.reset();
        let s = rig.dev.state().clone();
        assert_eq!((s.actual, s.acked_features), (0, 0));
        assert_eq!(s.reported_pages, 1, "the host's counters stay");
        assert_eq!(config_u32(&rig.dev, 4), 0);
        // No queues any more: notifications do nothing.
        rig.fill(5 * MIB, PAGE, 0x01);
        assert_eq!(
            rig.post(REPORTING_QUEUE, &[(5 * MIB, PAGE as u32, WRITE)]),
            None
        );
        assert!(rig.zero_pages(5 * MIB, 1).is_empty());
        assert_eq!(rig.dev.state(), &s);
    }
}
