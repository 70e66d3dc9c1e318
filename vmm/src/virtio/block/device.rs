//! The virtio-blk device (id 2): one request queue of [`QUEUE_SIZE`] entries over a [`Disk`].
//! Offers VERSION_1, FLUSH, SEG_MAX and, for a read-only disk, RO; the configuration space holds
//! `capacity` (sectors) and `seg_max`. Each chain is validated ([`crate::virtio::chain`]) and
//! parsed ([`super::request`]); data moves between the disk and guest RAM through a bounded
//! host buffer with vm-memory. A chain without a status byte is returned unused and counted; a
//! broken queue puts the device in DEVICE_NEEDS_RESET.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{Address, Bytes};

use super::disk::{Disk, SECTOR_SIZE};
use super::request::{parse_request, BadRequest, MalformedRequest, Request, RequestKind};
use super::state::BlockState;
use crate::memory::GuestMemory;
use crate::snapshot::virtio_state::DeviceSnapshot;
use crate::virtio::chain::{validate_chain, MAX_CHAIN_DESCRIPTORS};
use crate::virtio::device::{read_config_bytes, serve_available_chains, DeviceFault, VirtioDevice};
use crate::virtio::interrupt::InterruptLine;

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 1] = [QUEUE_SIZE];
/// Data descriptors per request: a chain's descriptors less the header and the status.
pub const SEG_MAX: u32 = MAX_CHAIN_DESCRIPTORS as u32 - 2;
/// Bytes moved through the host buffer at a time.
const CHUNK: usize = 64 * 1024;

/// Counters of the device.
#[derive(Debug, Default)]
pub struct BlockStats {
    /// Chains returned unused (invalid, or no status byte).
    pub malformed_chains: AtomicU64,
    /// Requests answered VIRTIO_BLK_S_OK.
    pub ok: AtomicU64,
    /// Requests answered IOERR or UNSUPP.
    pub errors: AtomicU64,
}

struct Active {
    mem: Arc<GuestMemory>,
    queue: Queue,
    interrupt: Arc<InterruptLine>,
}

/// The block device.
pub struct BlockDevice {
    disk: Disk,
    serial: String,
    active: Option<Active>,
    stats: Arc<BlockStats>,
    buf: Vec<u8>,
}

impl BlockDevice {
    /// A device over `disk` that answers GET_ID with `serial` (truncated to 20 bytes).
    pub fn new(disk: Disk, serial: impl Into<String>) -> Self {
        Self {
            disk,
            serial: serial.into(),
            active: None,
            stats: Arc::new(BlockStats::default()),
            buf: vec![0; CHUNK],
        }
    }

    /// The device's counters.
    pub fn stats(&self) -> Arc<BlockStats> {
        self.stats.clone()
    }

    fn config_bytes(&self) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[..8].copy_from_slice(&self.disk.sectors().to_le_bytes());
        // size_max (bytes 8..12) is not offered; seg_max follows.
        c[12..].copy_from_slice(&SEG_MAX.to_le_bytes());
        c
    }

    /// Executes `req`; returns the status and the bytes written to the data buffers.
    fn execute(&mut self, mem: &GuestMemory, req: &Request) -> (u8, u32) {
        match req.kind {
            RequestKind::In | RequestKind::Out => {
                if req.kind == RequestKind::Out && self.disk.read_only() {
                    return (VIRTIO_BLK_S_IOERR as u8, 0);
                }
                match self.transfer(mem, req) {
                    Ok(n) => (VIRTIO_BLK_S_OK as u8, n),
                    Err(e) => {
                        tracing::debug!("virtio-blk: {:?} at sector {}: {e}", req.kind, req.sector);
                        (VIRTIO_BLK_S_IOERR as u8, 0)
                    }
                }
            }
            RequestKind::Flush => match self.disk.flush() {
                Ok(()) => (VIRTIO_BLK_S_OK as u8, 0),
                Err(e) => {
                    tracing::warn!("virtio-blk: flush failed: {e}");
                    (VIRTIO_BLK_S_IOERR as u8, 0)
                }
            },
            RequestKind::GetId => {
                let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
                let src = self.serial.as_bytes();
                let n = src.len().min(id.len());
                id[..n].copy_from_slice(&src[..n]);
                let mut written = 0u32;
                let mut rest = &id[..];
                for &(addr, len) in &req.data {
                    if rest.is_empty() {
                        break;
                    }
                    let k = rest.len().min(len as usize);
                    if mem.write_slice(&rest[..k], addr).is_err() {
                        return (VIRTIO_BLK_S_IOERR as u8, written);
                    }
                    rest = &rest[k..];
                    written += k as u32;
                }
                (VIRTIO_BLK_S_OK as u8, written)
            }
        }
    }

    /// Moves the data of an IN or OUT request; returns the bytes written to guest RAM.
    fn transfer(&mut self, mem: &GuestMemory, req: &Request) -> Result<u32, String> {
        let mut offset = req
            .sector
            .checked_mul(SECTOR_SIZE)
            .ok_or("sector overflows")?;
        let mut written = 0u32;
        for &(addr, len) in &req.data {
            let mut done = 0usize;
            while done < len as usize {
                let n = (len as usize - done).min(self.buf.len());
                let chunk = &mut self.buf[..n];
                let gaddr = addr
                    .checked_add(done as u64)
                    .ok_or("guest address overflows")?;
                if req.kind == RequestKind::In {
                    self.disk
                        .read_at(chunk, offset)
                        .map_err(|e| e.to_string())?;
                    mem.write_slice(chunk, gaddr).map_err(|e| e.to_string())?;
                    written += n as u32;
                } else {
                    mem.read_slice(chunk, gaddr).map_err(|e| e.to_string())?;
                    self.disk
                        .write_at(chunk, offset)
                        .map_err(|e| e.to_string())?;
                }
                done += n;
                offset += n as u64;
            }
        }
        Ok(written)
    }

    /// Answers one chain; returns the used length.
    fn handle_chain(
        &mut self,
        mem: &GuestMemory,
        chain: virtio_queue::DescriptorChain<&GuestMemory>,
    ) -> u32 {
        let parsed = validate_chain(chain, mem)
            .map_err(MalformedRequest::from)
            .and_then(|valid| parse_request(mem, &valid, self.disk.sectors()));
        let parsed = match parsed {
            Ok(p) => p,
            Err(e) => {
                self.stats.malformed_chains.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("virtio-blk: dropping a chain: {e}");
                return 0;
            }
        };
        let (status, written) = match &parsed.request {
            Ok(req) => self.execute(mem, req),
            Err(BadRequest::Unsupported(_)) => (VIRTIO_BLK_S_UNSUPP as u8, 0),
            Err(e) => {
                tracing::debug!("virtio-blk: refusing a request: {e}");
                (VIRTIO_BLK_S_IOERR as u8, 0)
            }
        };
        let counter = if u32::from(status) == VIRTIO_BLK_S_OK {
            &self.stats.ok
        } else {
            &self.stats.errors
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if mem.write_obj(status, parsed.status).is_err() {
            return written;
        }
        written + 1
    }

    fn process_queue(&mut self) -> Result<(), DeviceFault> {
        let Some(mut active) = self.active.take() else {
            return Ok(());
        };
        let result = self.process_active(&mut active);
        self.active = Some(active);
        result
    }

    fn process_active(&mut self, active: &mut Active) -> Result<(), DeviceFault> {
        let mem = active.mem.clone();
        serve_available_chains(&mut active.queue, &mem, &active.interrupt, |chain| {
            self.handle_chain(&mem, chain)
        })
    }
}

impl VirtioDevice for BlockDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        let mut f =
            (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_SEG_MAX);
        if self.disk.read_only() {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: Arc<GuestMemory>,
        queues: Vec<Queue>,
        interrupt: Arc<InterruptLine>,
        _acked_features: u64,
    ) -> Result<(), DeviceFault> {
        let Some(queue) = queues.into_iter().next().filter(|q| q.ready()) else {
            return Err(DeviceFault("the request queue must be set up".into()));
        };
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
        });
        Ok(())
    }

    fn queue_notified(&mut self, index: usize) -> Result<(), DeviceFault> {
        match index {
            0 => self.process_queue(),
            _ => Ok(()),
        }
    }

    fn reset(&mut self) {
        self.active = None;
    }

    /// Read-only disks only (see [`super::state`]).
    fn save_state(&self) -> Option<DeviceSnapshot> {
        self.disk.read_only().then(|| {
            DeviceSnapshot::Block(BlockState {
                sectors: self.disk.sectors(),
            })
        })
    }

    fn running_queues(&self) -> Vec<Option<QueueState>> {
        match &self.active {
            None => Vec::new(),
            Some(a) => vec![Some(a.queue.state())],
        }
    }

    /// The disk given now must be the one the driver knows: read-only, of the same capacity.
    fn restore_state(&mut self, state: &DeviceSnapshot) -> Result<(), String> {
        match state {
            DeviceSnapshot::Block(saved) if !self.disk.read_only() => Err(format!(
                "the snapshot's disk ({} sectors) was read-only, this one is writable",
                saved.sectors
            )),
            DeviceSnapshot::Block(saved) if saved.sectors != self.disk.sectors() => Err(format!(
                "the snapshot's disk has {} sectors, this one {}",
                saved.sectors,
                self.disk.sectors()
            )),
            DeviceSnapshot::Block(_) => Ok(()),
            other => Err(format!(
                "a virtio-blk device cannot take the state of device type {}",
                other.device_type()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::irq_trigger::IrqTrigger;
    use crate::memory::create_guest_memory;
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
    use vm_memory::GuestAddress;

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x3000;
    const USED: u64 = 0x4000;
    const HDR: u64 = 0x10000;
    const DATA: u64 = 0x20000;
    const STATUS: u64 = 0x30000;
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;

    struct Rig {
        mem: Arc<GuestMemory>,
        dev: BlockDevice,
        avail: u16,
        _dir: tempfile::TempDir,
    }

    impl Rig {
        fn new(read_only: bool) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("disk.img");
            let image: Vec<u8> = (0..4 * 512u32).map(|i| (i / 512) as u8 + 0x40).collect();
            std::fs::write(&path, image).unwrap();
            let mut dev = BlockDevice::new(Disk::open(&path, read_only).unwrap(), "serial-0");
            let mem = Arc::new(create_guest_memory(2).unwrap());
            let mut q = Queue::new(16).unwrap();
            q.set_size(16);
            q.set_desc_table_address(Some(DESC as u32), Some(0));
            q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
            q.set_used_ring_address(Some(USED as u32), Some(0));
            q.set_ready(true);
            let irq = Arc::new(InterruptLine::new(IrqTrigger::new().unwrap()));
            dev.activate(mem.clone(), vec![q], irq, 0).unwrap();
            Self {
                mem,
                dev,
                avail: 0,
                _dir: dir,
            }
        }

        /// Posts descriptors (addr, len, flags) chained in order, with header `type_`/`sector`;
        /// returns (used length, status byte).
        fn submit(&mut self, type_: u32, sector: u64, descs: &[(u64, u32, u16)]) -> (u32, u8) {
            let m = self.mem.as_ref();
            m.write_obj(type_, GuestAddress(HDR)).unwrap();
            m.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
            m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            for (i, (addr, len, flags)) in descs.iter().enumerate() {
                let d = DESC + 16 * i as u64;
                let last = i + 1 == descs.len();
                let flags = if last { *flags } else { *flags | NEXT };
                m.write_obj(*addr, GuestAddress(d)).unwrap();
                m.write_obj(*len, GuestAddress(d + 8)).unwrap();
                m.write_obj(flags, GuestAddress(d + 12)).unwrap();
                m.write_obj(i as u16 + 1, GuestAddress(d + 14)).unwrap();
            }
            let slot = u64::from(self.avail % 16);
            m.write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * slot))
                .unwrap();
            self.avail = self.avail.wrapping_add(1);
            m.write_obj(self.avail, GuestAddress(AVAIL + 2)).unwrap();
            self.dev.queue_notified(0).unwrap();
            let used_idx: u16 = m.read_obj(GuestAddress(USED + 2)).unwrap();
            assert_eq!(used_idx, self.avail);
            let len: u32 = m.read_obj(GuestAddress(USED + 4 + 8 * slot + 4)).unwrap();
            (len, m.read_obj(GuestAddress(STATUS)).unwrap())
        }
    }

    const OK: u8 = VIRTIO_BLK_S_OK as u8;
    const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;

    #[test]
    fn reads_land_in_guest_ram_and_bad_sectors_fail() {
        let mut rig = Rig::new(true);
        let r = rig.submit(
            VIRTIO_BLK_T_IN,
            2,
            &[
                (HDR, 16, 0),
                (DATA, 512, WRITE),
                (DATA + 512, 512, WRITE),
                (STATUS, 1, WRITE),
            ],
        );
        assert_eq!(r, (1025, OK));
        let mut got = [0u8; 1024];
        rig.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert!(got[..512].iter().all(|&b| b == 0x42));
        assert!(got[512..].iter().all(|&b| b == 0x43));
        let r = rig.submit(
            VIRTIO_BLK_T_IN,
            3,
            &[(HDR, 16, 0), (DATA, 1024, WRITE), (STATUS, 1, WRITE)],
        );
        assert_eq!(r, (1, IOERR));
        assert_eq!(rig.dev.stats().errors.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn writes_fail_on_a_read_only_disk_and_work_on_a_writable_one() {
        let out = [(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, WRITE)];
        rig_write(true, &out, IOERR);
        rig_write(false, &out, OK);
    }

    fn rig_write(read_only: bool, out: &[(u64, u32, u16)], expect: u8) {
        let mut rig = Rig::new(read_only);
        rig.mem
            .write_slice(&[0x99; 512], GuestAddress(DATA))
            .unwrap();
        assert_eq!(rig.submit(VIRTIO_BLK_T_OUT, 1, out), (1, expect));
        let r = rig.submit(
            VIRTIO_BLK_T_IN,
            1,
            &[(HDR, 16, 0), (DATA + 4096, 512, WRITE), (STATUS, 1, WRITE)],
        );
        assert_eq!(r, (513, OK));
        let b: u8 = rig.mem.read_obj(GuestAddress(DATA + 4096)).unwrap();
        assert_eq!(b, if expect == OK { 0x99 } else { 0x41 });
    }

    #[test]
    fn malformed_chains_are_returned_unused_and_get_id_answers() {
        let mut rig = Rig::new(true);
        // No status byte: the last writable buffer is 512 bytes.
        let r = rig.submit(VIRTIO_BLK_T_IN, 0, &[(HDR, 16, 0), (DATA, 512, WRITE)]);
        assert_eq!(r, (0, 0xff));
        // A buffer outside guest RAM.
        let r = rig.submit(
            VIRTIO_BLK_T_IN,
            0,
            &[
                (HDR, 16, 0),
                (0x7fff_0000_0000, 512, WRITE),
                (STATUS, 1, WRITE),
            ],
        );
        assert_eq!(r, (0, 0xff));
        assert_eq!(rig.dev.stats().malformed_chains.load(Ordering::Relaxed), 2);
        // Wrong direction: IN with a device-readable data buffer.
        let r = rig.submit(
            VIRTIO_BLK_T_IN,
            0,
            &[(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, WRITE)],
        );
        assert_eq!(r, (1, IOERR));
        let r = rig.submit(
            VIRTIO_BLK_T_GET_ID,
            0,
            &[(HDR, 16, 0), (DATA, 20, WRITE), (STATUS, 1, WRITE)],
        );
        assert_eq!(r, (21, OK));
        let mut id = [0u8; 20];
        rig.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..9], b"serial-0\0");
        let r = rig.submit(77, 0, &[(HDR, 16, 0), (STATUS, 1, WRITE)]);
        assert_eq!(r, (1, VIRTIO_BLK_S_UNSUPP as u8));
    }
}
